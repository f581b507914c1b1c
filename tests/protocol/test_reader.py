"""Tests for mailrelay.protocol.reader: replies off the wire, limits, and garbage."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.errors import RemoteProtocolError
from mailrelay.protocol.reader import ReplyReader, parse_replies
from mailrelay.reply import EnhancedStatus, Reply


def status(text: str) -> EnhancedStatus:
    return EnhancedStatus.parse(text)


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        pytest.param(
            b"250 OK\r\n", [Reply(code=250, lines=("OK",), enhanced=None)], id="single-line"
        ),
        pytest.param(b"250\r\n", [Reply(code=250, lines=("",), enhanced=None)], id="bare-code"),
        pytest.param(b"250 \r\n", [Reply(code=250, lines=("",), enhanced=None)], id="code-space"),
        pytest.param(
            b"250-mx.example\r\n250-PIPELINING\r\n250 SIZE 100\r\n",
            [Reply(code=250, lines=("mx.example", "PIPELINING", "SIZE 100"), enhanced=None)],
            id="multi-line",
        ),
        pytest.param(
            b"250-first\n250 second\n",
            [Reply(code=250, lines=("first", "second"), enhanced=None)],
            id="bare-lf",
        ),
        pytest.param(
            b"250-first\r\n250 second\n",
            [Reply(code=250, lines=("first", "second"), enhanced=None)],
            id="mixed-line-ends",
        ),
        pytest.param(
            b"250-\r\n250 last\r\n",
            [Reply(code=250, lines=("", "last"), enhanced=None)],
            id="empty-continuation",
        ),
        pytest.param(
            "250 Grüße, 日本\r\n".encode(),
            [Reply(code=250, lines=("Grüße, 日本",), enhanced=None)],
            id="utf8-text",
        ),
        pytest.param(
            b"250 caf\xe9 \xff\r\n",
            [Reply(code=250, lines=("caf\ufffd \ufffd",), enhanced=None)],
            id="invalid-utf8-replaced",
        ),
        pytest.param(
            b"550 5.1.1 No such user\r\n",
            [Reply(code=550, lines=("5.1.1 No such user",), enhanced=status("5.1.1"))],
            id="enhanced-status",
        ),
        pytest.param(
            b"250-2.0.0 first\r\n250 2.0.0 second\r\n",
            [Reply(code=250, lines=("2.0.0 first", "2.0.0 second"), enhanced=status("2.0.0"))],
            id="enhanced-status-multi-line",
        ),
        pytest.param(
            b"550 4.2.2 class mismatch\r\n",
            [Reply(code=550, lines=("4.2.2 class mismatch",), enhanced=None)],
            id="enhanced-status-wrong-class-ignored",
        ),
        pytest.param(
            b"250 2.1.5\r\n",
            [Reply(code=250, lines=("2.1.5",), enhanced=status("2.1.5"))],
            id="enhanced-status-alone",
        ),
        pytest.param(
            b"250 2.1.5ok\r\n",
            [Reply(code=250, lines=("2.1.5ok",), enhanced=None)],
            id="enhanced-status-glued-to-text",
        ),
        pytest.param(
            b"354 2.0.0 go ahead\r\n",
            [Reply(code=354, lines=("2.0.0 go ahead",), enhanced=None)],
            id="no-enhanced-status-for-3xx",
        ),
        pytest.param(
            b"250 a\rb\r\n", [Reply(code=250, lines=("a\rb",), enhanced=None)], id="inner-cr-kept"
        ),
        pytest.param(
            b"220 hi\r\n250 ok\r\n354 go\r\n",
            [
                Reply(code=220, lines=("hi",), enhanced=None),
                Reply(code=250, lines=("ok",), enhanced=None),
                Reply(code=354, lines=("go",), enhanced=None),
            ],
            id="several-replies",
        ),
        pytest.param(b"599 x\r\n", [Reply(code=599, lines=("x",), enhanced=None)], id="code-599"),
        pytest.param(b"200 x\r\n", [Reply(code=200, lines=("x",), enhanced=None)], id="code-200"),
    ],
)
def test_parses(wire: bytes, expected: list[Reply]) -> None:
    assert parse_replies(wire) == expected


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(b"199 too low\r\n", id="code-below-200"),
        pytest.param(b"600 too high\r\n", id="code-above-599"),
        pytest.param(b"099 x\r\n", id="code-0xx"),
        pytest.param(b"25 short\r\n", id="two-digits"),
        pytest.param(b"\r\n", id="empty-line"),
        pytest.param(b"abc def\r\n", id="letters"),
        pytest.param(b"2x0 x\r\n", id="letter-in-code"),
        pytest.param(b"250_x\r\n", id="bad-separator"),
        pytest.param(b"250ok\r\n", id="no-separator"),
        pytest.param(b" 250 x\r\n", id="leading-space"),
        pytest.param(b"+25 x\r\n", id="sign"),
        pytest.param(b"250-first\r\n251 second\r\n", id="code-changes-in-multi-line"),
        pytest.param(b"250-first\r\n550-second\r\n550 third\r\n", id="code-changes-midway"),
        pytest.param("\uff12\uff15\uff10 fullwidth\r\n".encode(), id="non-ascii-digits"),
    ],
)
def test_malformed_is_remote_error(wire: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_replies(wire)


def test_replies_before_garbage_are_delivered_first() -> None:
    reader = ReplyReader()
    reader.feed(b"250 one\r\n250 two\r\nGARBAGE\r\n250 three\r\n")
    assert reader.pop() == Reply(code=250, lines=("one",))
    assert reader.pop() == Reply(code=250, lines=("two",))
    with pytest.raises(RemoteProtocolError):
        reader.pop()
    with pytest.raises(RemoteProtocolError):
        reader.pop()  # stays failed


def test_line_length_limit() -> None:
    reader = ReplyReader(max_line_length=20, max_reply_length=100)
    reader.feed(b"250 " + b"x" * 16 + b"\r\n")  # exactly 20 octets: fine
    assert reader.pop() == Reply(code=250, lines=("x" * 16,))
    reader.feed(b"250 " + b"x" * 17 + b"\r\n")
    with pytest.raises(RemoteProtocolError, match="longer than 20"):
        reader.pop()


def test_reply_length_limit() -> None:
    reader = ReplyReader(max_line_length=20, max_reply_length=30)
    reader.feed(b"250-0123456789\r\n")  # 16 octets so far
    assert reader.pop() is None
    reader.feed(b"250-0123456789\r\n")  # 32 > 30
    with pytest.raises(RemoteProtocolError, match="reply longer than 30"):
        reader.pop()


def test_default_limits_allow_real_replies() -> None:
    # A 100-line EHLO reply with 1000-octet lines is within the defaults.
    wire = b"".join(b"250-" + b"K" * 1000 + b"\r\n" for _ in range(50)) + b"250 END\r\n"
    (reply,) = parse_replies(wire)
    assert len(reply.lines) == 51


def test_endless_line_never_grows_the_buffer_beyond_the_limit() -> None:
    reader = ReplyReader(max_line_length=100, max_reply_length=1000)
    largest = 0
    failed_at = None
    for i in range(10_000):
        reader.feed(b"250 " + b"x" * 7)
        largest = max(largest, reader.buffered)
        try:
            reader.pop()
        except RemoteProtocolError:
            failed_at = i
            break
    assert failed_at is not None
    assert failed_at < 10
    assert largest <= 101


def test_endless_multi_line_reply_is_bounded() -> None:
    reader = ReplyReader(max_line_length=100, max_reply_length=1000)
    message = ""
    fed = 0
    while fed < 10_000 and not message:
        reader.feed(b"250-more\r\n")
        fed += 1
        try:
            assert reader.pop() is None
        except RemoteProtocolError as exc:
            message = str(exc)
    assert "reply longer than 1000" in message
    assert fed == 1000 // 10 + 1  # each line counts 10 octets; the 101st is too many


def test_partial_reply_then_rest() -> None:
    reader = ReplyReader()
    reader.feed(b"250-a\r\n25")
    assert reader.pop() is None
    assert reader.has_partial
    reader.feed(b"0 b\r")
    assert reader.pop() is None
    reader.feed(b"\n")
    assert reader.pop() == Reply(code=250, lines=("a", "b"))
    assert not reader.has_data


def test_cached_reply_is_equal_to_a_fresh_one() -> None:
    # The reader memoizes single-line replies; a repeated one must be the same value.
    reader = ReplyReader()
    reader.feed(b"250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\n")
    replies = [reader.pop() for _ in range(3)]
    expected = Reply(code=250, lines=("2.1.5 Ok",), enhanced=status("2.1.5"))
    assert replies == [expected] * 3


def test_fast_built_reply_behaves_like_a_constructed_one() -> None:
    (reply,) = parse_replies(b"451 4.3.0 try later\r\n")
    built = Reply.of(451, "4.3.0 try later")
    assert reply == built
    assert hash(reply) == hash(built)
    assert reply.is_transient
    assert str(reply) == "451 4.3.0 try later"


def test_unfinished_reply_at_end_is_an_error_for_parse_replies() -> None:
    with pytest.raises(RemoteProtocolError, match="unfinished"):
        parse_replies(b"250-a\r\n")


def test_rejects_silly_limits() -> None:
    with pytest.raises(ValueError, match="max_line_length"):
        ReplyReader(max_line_length=2)
    with pytest.raises(ValueError, match="max_line_length"):
        ReplyReader(max_line_length=100, max_reply_length=50)


# -- properties ---------------------------------------------------------------------------------

reply_text = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\r\n"), max_size=30
)


@st.composite
def wire_replies(draw: st.DrawFn) -> tuple[bytes, list[tuple[int, list[str]]]]:
    replies = draw(
        st.lists(
            st.tuples(st.integers(200, 599), st.lists(reply_text, min_size=1, max_size=4)),
            max_size=6,
        )
    )
    ending = draw(st.sampled_from([b"\r\n", b"\n"]))
    out = b""
    for code, lines in replies:
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            out += f"{code}{sep}{line}".encode() + ending
    return out, replies


def split_points(data: bytes) -> st.SearchStrategy[list[bytes]]:
    return st.lists(st.integers(0, len(data)), max_size=8).map(
        lambda cuts: [
            data[a:b] for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(data)], strict=True)
        ]
    )


def read_all(pieces: list[bytes]) -> list[Reply] | type[RemoteProtocolError]:
    reader = ReplyReader(max_line_length=200, max_reply_length=600)
    out: list[Reply] = []
    try:
        for piece in pieces:
            reader.feed(piece)
            while (reply := reader.pop()) is not None:
                out.append(reply)
    except RemoteProtocolError:
        return RemoteProtocolError
    return out


@given(st.data())
def test_parsing_does_not_depend_on_how_bytes_are_split(data: st.DataObject) -> None:
    wire, replies = data.draw(wire_replies())
    pieces = data.draw(split_points(wire))
    result = read_all(pieces)
    assert result == read_all([wire])
    assert isinstance(result, list)
    assert [(r.code, list(r.lines)) for r in result] == [(code, lines) for code, lines in replies]


@given(st.binary(max_size=300), st.data())
def test_arbitrary_bytes_only_yield_replies_or_remote_errors(
    garbage: bytes, data: st.DataObject
) -> None:
    pieces = data.draw(split_points(garbage))
    result = read_all(pieces)  # anything but RemoteProtocolError propagates and fails
    assert result == read_all([garbage])
