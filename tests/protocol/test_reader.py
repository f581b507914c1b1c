"""Tests for mailrelay.protocol.reader: replies off the wire, limits, and garbage."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.errors import RemoteProtocolError
from mailrelay.protocol import reader as reader_module
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
        pytest.param(
            b"250-a\r\n250\r\n",
            [Reply(code=250, lines=("a", ""), enhanced=None)],
            id="bare-code-ends-multi-line",
        ),
        pytest.param(
            b"250 a\x0bb\x0cc\x1cd\x1de\x1ef\r\n",
            [Reply(code=250, lines=("a\x0bb\x0cc\x1cd\x1de\x1ef",), enhanced=None)],
            id="other-line-breaks-stay-in-text",
        ),
        pytest.param(
            b"250-a\x1e\n250 b\x0c\n",
            [Reply(code=250, lines=("a\x1e", "b\x0c"), enhanced=None)],
            id="other-line-breaks-end-lines",
        ),
        pytest.param(
            b"250 a\r\r\n", [Reply(code=250, lines=("a\r",), enhanced=None)], id="cr-before-crlf"
        ),
        pytest.param(
            b"250-a\r\n250-b\n250 c\r\n",
            [Reply(code=250, lines=("a", "b", "c"), enhanced=None)],
            id="bare-lf-inside-crlf-block",
        ),
        pytest.param(
            "250-Grüße\r\n250 2.0.0 ok\r\n".encode(),
            [Reply(code=250, lines=("Grüße", "2.0.0 ok"), enhanced=None)],
            id="utf8-multi-line",
        ),
        pytest.param(
            "550 5.1.1 Empfänger unbekannt\r\n".encode(),
            [Reply(code=550, lines=("5.1.1 Empfänger unbekannt",), enhanced=status("5.1.1"))],
            id="utf8-with-enhanced-status",
        ),
        pytest.param(
            b"250 2.1.50\r\n250 2.1.500 x\r\n250 2.1.5000 x\r\n250 2.1.5\r\n",
            [
                Reply(code=250, lines=("2.1.50",), enhanced=status("2.1.50")),
                Reply(code=250, lines=("2.1.500 x",), enhanced=status("2.1.500")),
                Reply(code=250, lines=("2.1.5000 x",), enhanced=None),
                Reply(code=250, lines=("2.1.5",), enhanced=status("2.1.5")),
            ],
            id="enhanced-status-sharing-a-start",
        ),
        pytest.param(
            b"250 2.1.5\tok\r\n",
            [Reply(code=250, lines=("2.1.5\tok",), enhanced=status("2.1.5"))],
            id="enhanced-status-then-tab",
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
        pytest.param("25\u00e9 x\r\n".encode(), id="non-ascii-in-code"),
        pytest.param("250\u00a0x\r\n".encode(), id="non-ascii-separator"),
        pytest.param(b"250-first\r\n251\r\n", id="bare-code-changes-code"),
        pytest.param(b"250-first\r\n25\r\n", id="short-line-in-multi-line"),
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


def test_line_length_limit_counts_octets() -> None:
    # 13 characters, but "é" is two octets in UTF-8: 22 octets in all.
    reader = ReplyReader(max_line_length=20, max_reply_length=100)
    reader.feed(b"250 ok\r\n250 " + ("é" * 9).encode() + b"\r\n")
    assert reader.pop() == Reply(code=250, lines=("ok",))
    with pytest.raises(RemoteProtocolError, match="longer than 20"):
        reader.pop()


@pytest.mark.parametrize("utf8_first", [True, False], ids=["utf8-first", "utf8-second"])
def test_reply_length_limit_counts_octets_across_feeds(utf8_first: bool) -> None:
    # 16 octets each with CRLF, but only 11 characters for the UTF-8 line: 32 > 30.
    reader = ReplyReader(max_line_length=20, max_reply_length=30)
    lines = ["250-" + "é" * 5 + "\r\n", "250-0123456789\r\n"]
    if not utf8_first:
        lines.reverse()
    reader.feed(lines[0].encode())
    assert reader.pop() is None
    reader.feed(lines[1].encode())
    with pytest.raises(RemoteProtocolError, match="reply longer than 30"):
        reader.pop()


def test_over_long_line_after_replies_in_one_feed() -> None:
    reader = ReplyReader(max_line_length=20, max_reply_length=100)
    reader.feed(b"250 one\r\n250-two\r\n250 " + b"x" * 17 + b"\r\n")
    assert reader.pop() == Reply(code=250, lines=("one",))
    with pytest.raises(RemoteProtocolError, match="longer than 20"):
        reader.pop()


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        pytest.param(["250-{}", "xyz {}"], "malformed", id="malformed-and-too-long"),
        pytest.param(["250-{}", "251 {}"], "changed its code", id="code-change-and-too-long"),
        pytest.param(["250-{}", "250 {}"], "reply longer", id="only-too-long"),
    ],
)
@pytest.mark.parametrize("filler", ["x" * 12, "é" * 6], ids=["ascii", "utf8"])
def test_errors_on_one_line_are_reported_in_the_same_order(
    lines: list[str], message: str, filler: str
) -> None:
    # Each line is 16 (ASCII) or 22 (UTF-8) octets with CRLF; the second breaks the
    # reply limit. A malformed line is reported as malformed whatever the text.
    wire = "".join(line.format(filler) + "\r\n" for line in lines).encode()
    with pytest.raises(RemoteProtocolError, match=message):
        parse_replies(wire, max_line_length=20, max_reply_length=30)


def test_single_line_reply_limit_when_it_is_below_a_line() -> None:
    # max_reply_length may be as low as max_line_length: a full line then does
    # not fit with its CRLF; this holds for a line seen (and memoized) before.
    for wire in (b"250 " + b"x" * 16 + b"\r\n", ("250 " + "é" * 8 + "\r\n").encode()):
        reader = ReplyReader(max_line_length=20, max_reply_length=20)
        reader.feed(b"250 " + b"x" * 14 + b"\r\n")  # 18 + 2 octets: fits
        assert reader.pop() == Reply(code=250, lines=("x" * 14,))
        reader.feed(wire)
        with pytest.raises(RemoteProtocolError, match="reply longer than 20"):
            reader.pop()


def parse_all(reader: ReplyReader, wire: bytes, size: int = 4096) -> list[Reply]:
    """Feed ``wire`` in pieces of ``size`` octets; return every reply."""
    replies = []
    for offset in range(0, len(wire), size):
        reader.feed(wire[offset : offset + size])
        while (reply := reader.pop()) is not None:
            replies.append(reply)
    return replies


def test_memo_off_and_on_again_keeps_values() -> None:
    # A long run of distinct replies turns the memo off for a while; repeated
    # replies before, during and after that are parsed to the same values.
    reader = ReplyReader()
    expected: list[Reply] = []
    wire = b""
    for i in range(3000):
        if i % 3:
            wire += b"250 2.1.5 Recipient %d ok\r\n" % i
            expected.append(Reply.of(250, f"2.1.5 Recipient {i} ok"))
        else:
            wire += b"250 2.1.5 Ok\r\n"
            expected.append(Reply.of(250, "2.1.5 Ok"))
    wire += b"250 2.1.5 Ok\r\n" * 300
    expected += [Reply.of(250, "2.1.5 Ok")] * 300
    assert parse_all(reader, wire) == expected


def test_caches_stay_bounded() -> None:
    # Texts that vary from their first character, and enhanced status codes that
    # vary, cannot grow the reader's caches past their bounds.
    reader = ReplyReader()
    wire = b"".join(
        b"250 %d ok\r\n250 2.%d.%d x\r\n250-%d\r\n250 a.%d\r\n" % (i, i % 10, i // 10 % 10, i, i)
        for i in range(3000)
    )
    replies = parse_all(reader, wire)
    assert len(replies) == 9000
    assert replies[-1] == Reply.of(250, "2999", "a.2999")
    assert len(reader_module._HEADS) <= reader_module._HEADS_SIZE
    assert len(reader._memo) <= reader_module._MEMO_SIZE


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


# Texts that start like enhanced status codes, often sharing their first characters
# (the reader caches what a line's start decides), and a few that repeat verbatim
# (it memoizes repeated replies).
status_like_text = st.builds(
    lambda klass, subject, detail, rest: f"{klass}.{subject}.{detail}{rest}",
    st.sampled_from("2345"),
    st.sampled_from(["0", "1", "10", "100", "01", "1000"]),
    st.sampled_from(["0", "5", "50", "500", "5000"]),
    st.sampled_from(["", " ", " ok", "ok", "\tok", ".1", " Grüße"]),
)
line_text = st.one_of(
    reply_text, status_like_text, st.sampled_from(["Ok", "2.1.5 Ok", "PIPELINING", ""])
)


def expected_reply(code: int, lines: list[str]) -> Reply:
    """What the rules say the reply is, computed without the reader."""
    found = EnhancedStatus.search(lines[0])
    enhanced = found if found is not None and found.klass == code // 100 else None
    return Reply(code=code, lines=tuple(lines), enhanced=enhanced)


@given(
    st.lists(
        st.tuples(
            st.sampled_from([220, 250, 354, 421, 451, 550, 599]),
            st.lists(line_text, min_size=1, max_size=3),
        ),
        max_size=8,
    ),
    st.sampled_from([b"\r\n", b"\n"]),
    st.data(),
)
def test_replies_follow_the_rules(
    replies: list[tuple[int, list[str]]], ending: bytes, data: st.DataObject
) -> None:
    wire = b""
    for code, lines in replies:
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            wire += f"{code}{sep}{line}".encode() + ending
    pieces = data.draw(split_points(wire))
    assert read_all(pieces) == [expected_reply(code, lines) for code, lines in replies]
