"""mailrelay.testing.strategies: every strategy draws what it promises.

Valid strategies: every value is accepted by the matching parser and round-trips.
Invalid addresses: every kind is refused with InvalidAddress. Edge cases: each
one the docstrings promise is reachable (``hypothesis.find``), so a strategy that
silently stops producing it fails here. The module imports without Hypothesis
only as far as it should (a subprocess with Hypothesis hidden).
"""

from __future__ import annotations

import email
import email.policy
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis import strategies as st

from mailrelay.address import MAX_ADDRESS, MAX_LOCAL_PART, Address
from mailrelay.envelope import Envelope, Notify, utf8_addr_xtext_decode, xtext_decode
from mailrelay.errors import InvalidAddress
from mailrelay.message import Attachment, Message
from mailrelay.protocol import (
    ClientConnection,
    DotStuffer,
    Ehlo,
    Greeting,
    Noop,
    ReplyReader,
    Response,
    parse_replies,
)
from mailrelay.protocol.extensions import Extensions
from mailrelay.reply import Reply
from mailrelay.testing import strategies as s
from tests.transport.test_docs import python_blocks

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "test-tools.md"

# Modest budgets: the whole file runs in seconds on a loaded machine.
FEW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SOME = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Searches stop at the first example found: shrinking it would only cost time.
SEARCH = settings(
    max_examples=1000,
    deadline=None,
    database=None,
    phases=[Phase.generate],
    suppress_health_check=list(HealthCheck),
)

_LINE_END = re.compile(rb"\r\n|\r|\n")


def reachable(strategy: st.SearchStrategy[T], condition: Callable[[T], bool]) -> T:
    """Return an example satisfying ``condition`` (fails when none is found)."""
    return find(strategy, condition, settings=SEARCH)


def raw_lines(data: bytes) -> list[bytes]:
    return _LINE_END.split(data)


def has_bare_cr_or_lf(data: bytes) -> bool:
    return data.count(b"\r") != data.count(b"\r\n") or data.count(b"\n") != data.count(b"\r\n")


def unstuff(data: bytes) -> bytes:
    """Undo DATA encoding: drop the terminator and one leading dot per line."""
    assert data.endswith(b".\r\n")
    body = data[: -len(b".\r\n")]
    lines = body.split(b"\r\n")
    assert lines[-1] == b""
    for line in lines[:-1]:
        assert line != b".", "an unstuffed terminator inside the data"
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


# -- import without Hypothesis ------------------------------------------------------

_HIDDEN = """
import sys
sys.modules["hypothesis"] = None  # import hypothesis now fails, as if not installed
import mailrelay.testing
try:
    {statement}
except ImportError as exc:
    print("ImportError:", exc)
else:
    print("imported")
"""


@pytest.mark.parametrize(
    "statement",
    [
        "import mailrelay.testing.strategies",
        "from mailrelay.testing.strategies import addresses",
        "mailrelay.testing.strategies",
    ],
)
def test_without_hypothesis_the_error_names_the_extra(statement: str) -> None:
    code = textwrap.dedent(_HIDDEN).format(statement=statement)
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ImportError:")
    assert 'pip install "mailrelay[testing]"' in done.stdout


def test_without_hypothesis_the_package_and_a_star_import_work() -> None:
    statement = "exec('from mailrelay.testing import *')"
    code = textwrap.dedent(_HIDDEN).format(statement=statement)
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "imported"


def test_the_package_points_to_the_strategies_lazily() -> None:
    import mailrelay.testing

    assert mailrelay.testing.strategies is s
    assert mailrelay.testing.server.__name__ == "mailrelay.testing.server"
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        mailrelay.testing.nothing  # noqa: B018


# -- domains, local parts, addresses ---------------------------------------------------


@SOME
@given(s.domains(literals=True))
def test_domains_make_valid_addresses(domain: str) -> None:
    address = Address.parse(f"x@{domain}")
    assert Address.parse(str(address)) == address
    assert (domain[0] == "[") == address.is_literal


@FEW
@given(s.domains(idn=False))
def test_ascii_domains_are_ascii_names(domain: str) -> None:
    assert domain.isascii()
    assert "[" not in domain
    assert "." in domain
    Address.parse(f"x@{domain}")


@SOME
@given(s.local_parts())
def test_local_parts_make_valid_addresses(local: str) -> None:
    address = Address.parse(f"{local}@example.com")
    assert Address.parse(str(address)) == address
    assert len(local.encode()) <= MAX_LOCAL_PART


@FEW
@given(s.local_parts(utf8=False, quoted=False))
def test_plain_local_parts_are_ascii_dot_strings(local: str) -> None:
    assert local.isascii()
    assert not local.startswith('"')
    assert str(Address.parse(f"{local}@example.com")) == f"{local}@example.com"


@SOME
@given(s.address_texts(literals=True))
def test_address_texts_parse_and_round_trip(text: str) -> None:
    address = Address.parse(text)
    again = Address.parse(str(address))
    assert again == address
    assert str(again) == str(address)
    if not address.needs_smtputf8:
        # The 7-bit path (A-labels) names the same address.
        assert Address.parse(address.smtp_path(False)) == address
    assert len(str(address).encode()) <= MAX_ADDRESS


@FEW
@given(s.addresses(utf8=False))
def test_addresses_without_utf8_need_no_smtputf8(address: Address) -> None:
    assert not address.needs_smtputf8
    assert address.smtp_path(False).isascii()


@FEW
@given(s.addresses(idn=False, utf8=False))
def test_ascii_addresses_are_ascii(address: Address) -> None:
    assert str(address).isascii()
    assert address.domain == address.ascii_domain


@pytest.mark.parametrize(
    ("what", "strategy", "condition"),
    [
        ("an IDN", s.domains(), lambda d: not d.isascii()),
        ("an A-label", s.domains(), lambda d: "xn--" in d),
        ("a long domain", s.domains(), lambda d: len(d.encode()) >= 240),
        ("an IPv4 literal", s.domains(literals=True), lambda d: re.fullmatch(r"\[[\d.]+\]", d)),
        ("an IPv6 literal", s.domains(literals=True), lambda d: d.startswith("[IPv6:")),
        ("a dotted IPv6 tail", s.domains(literals=True), lambda d: "IPv6" in d and "." in d),
        ("a UTF-8 local part", s.local_parts(), lambda x: not x.isascii()),
        ("a quoted local part", s.local_parts(), lambda x: x.startswith('"')),
        ("the empty local part", s.local_parts(), lambda x: x == '""'),
        ("a needless quoted-pair", s.local_parts(), lambda x: re.search(r'\\[^"\\]', x)),
        ("a space in quotes", s.local_parts(), lambda x: " " in x),
        ("a 64-octet local part", s.local_parts(), lambda x: len(x.encode()) == MAX_LOCAL_PART),
        ("a near-limit address", s.address_texts(), lambda t: len(t.encode()) >= MAX_ADDRESS - 8),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_text_edge_cases_are_reachable(
    what: str, strategy: st.SearchStrategy[str], condition: Callable[[str], Any]
) -> None:
    assert condition(reachable(strategy, lambda value: bool(condition(value))))


def test_addresses_reach_smtputf8_and_literals() -> None:
    assert reachable(s.addresses(), lambda a: a.needs_smtputf8).needs_smtputf8
    assert reachable(s.addresses(literals=True), lambda a: a.is_literal).is_literal


# -- invalid addresses ---------------------------------------------------------------


@pytest.mark.parametrize("kind", s.INVALID_ADDRESS_KINDS)
def test_every_invalid_kind_is_refused(kind: str) -> None:
    @SOME
    @given(s.invalid_address_texts(kinds=[kind]))
    def check(text: str) -> None:
        with pytest.raises(InvalidAddress):
            Address.parse(text)

    check()


@SOME
@given(s.invalid_address_texts())
def test_invalid_texts_are_refused(text: str) -> None:
    with pytest.raises(InvalidAddress):
        Address.parse(text)


@pytest.mark.parametrize(
    ("kind", "condition"),
    [
        ("injection", lambda t: "\r" in t),
        ("injection", lambda t: "\n" in t and "\r" not in t),
        ("injection", lambda t: "\x00" in t),
        ("injection", lambda t: t.startswith('"') and "\n" in t.partition('"@')[0]),
        ("missing_at", lambda t: "@" not in t),
        ("missing_at", lambda t: t.startswith('"') and t.endswith('"')),
        ("bad_dots", lambda t: t.startswith(".")),
        ("bad_dots", lambda t: t.endswith(".")),
        ("bad_dots", lambda t: ".." in t.partition("@")[2]),
        ("long_local_part", lambda t: len(t.partition("@")[0]) <= MAX_LOCAL_PART),
        ("long_domain", lambda t: len(t) > 255),
        ("unbalanced_quotes", lambda t: t.count('"') == 1),
        ("spaces", lambda t: "\u3000" in t),
        ("angle_brackets", lambda t: t.startswith("<") and t.endswith(">")),
        ("bad_domain", lambda t: t.endswith("]")),
    ],
)
def test_invalid_kinds_reach_their_variants(kind: str, condition: Callable[[str], bool]) -> None:
    assert condition(reachable(s.invalid_address_texts(kinds=[kind]), condition))


def test_unknown_invalid_kinds_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown"):
        s.invalid_address_texts(kinds=["nonsense"])
    with pytest.raises(ValueError, match="no invalid"):
        s.invalid_address_texts(kinds=[])


# -- envelopes ---------------------------------------------------------------------


@FEW
@given(s.envelopes(max_recipients=3))
def test_envelopes_encode_their_parameters(envelope: Envelope) -> None:
    assert 1 <= len(envelope.recipients) <= 3
    assert len({r.address for r in envelope.recipients}) == len(envelope.recipients)
    smtputf8 = envelope.needs_smtputf8
    mail = dict(envelope.mail_parameters(size=100, smtputf8=smtputf8))
    # The DSN parameters decode back to what was drawn.
    assert ("ENVID" in mail) == (envelope.envid is not None)
    if envelope.envid is not None:
        assert xtext_decode(str(mail["ENVID"])) == envelope.envid
    assert mail.get("RET") == (envelope.ret.value if envelope.ret else None)
    for recipient in envelope.recipients:
        rcpt = dict(recipient.rcpt_parameters(smtputf8=smtputf8))
        assert all(value is None or value.isascii() for value in rcpt.values())
        if recipient.orcpt is not None and "ORCPT" in rcpt:
            assert len(str(rcpt["ORCPT"])) <= 500  # RFC 3461 §4.2
            kind, _, value = str(rcpt["ORCPT"]).partition(";")
            decoded = xtext_decode(value) if kind == "rfc822" else utf8_addr_xtext_decode(value)
            assert Address.parse(decoded) == recipient.orcpt
        elif recipient.orcpt is not None:
            # Left out only when no form fits: a non-ASCII local part, too long escaped.
            assert recipient.orcpt.needs_smtputf8
        else:
            assert "ORCPT" not in rcpt


@FEW
@given(s.envelopes(dsn=False, utf8=False))
def test_envelopes_without_dsn_have_no_dsn_parameters(envelope: Envelope) -> None:
    assert envelope.ret is None
    assert envelope.envid is None
    assert envelope.notify is None
    assert not envelope.needs_smtputf8
    assert all(r.notify is None and r.orcpt is None for r in envelope.recipients)


def test_envelopes_reach_their_edge_cases() -> None:
    strategy = s.envelopes(max_recipients=3)
    assert reachable(strategy, lambda e: e.sender is None).sender is None
    # An ENVID with characters xtext must encode.
    assert reachable(strategy, lambda e: any(c in "+= " for c in e.envid or "")).envid
    found = reachable(
        strategy, lambda e: any(r.notify == frozenset({Notify.NEVER}) for r in e.recipients)
    )
    assert found.recipients
    assert reachable(strategy, lambda e: any(r.orcpt for r in e.recipients)).recipients
    assert len(reachable(strategy, lambda e: len(e.recipients) == 3).recipients) == 3


def test_strategy_options_are_checked() -> None:
    with pytest.raises(ValueError, match="max_recipients"):
        s.envelopes(max_recipients=0)
    with pytest.raises(ValueError, match="max_size"):
        s.message_bytes(max_size=100)
    with pytest.raises(ValueError, match="max_size"):
        s.messages(max_size=100)
    with pytest.raises(ValueError, match="klass"):
        s.replies(klass=6)
    with pytest.raises(ValueError, match="codes"):
        s.replies(codes=[199])
    with pytest.raises(ValueError, match="max_lines"):
        s.reply_lines(max_lines=0)


# -- messages ----------------------------------------------------------------------


@FEW
@given(s.message_bytes(), st.integers(2, 300))
def test_message_bytes_are_accepted(raw: bytes, size: int) -> None:
    message = Message.from_bytes(raw)
    wire = message.as_bytes()
    assert message.size == len(wire) <= 65536
    assert not has_bare_cr_or_lf(wire)
    chunks = list(message.chunks(size))
    assert b"".join(chunks) == wire
    assert not any(has_bare_cr_or_lf(chunk) for chunk in chunks)
    # The wire form is a fixed point: parsed again, it comes out unchanged.
    assert Message.from_bytes(wire).as_bytes() == wire
    # From and To hold valid addresses: the envelope can come from the headers.
    envelope = Envelope.from_message(message)
    assert envelope.recipients


@FEW
@given(s.message_bytes(eight_bit=False, max_size=8192))
def test_seven_bit_message_bytes_need_nothing(raw: bytes) -> None:
    message = Message.from_bytes(raw)
    assert not message.needs_8bitmime
    assert not message.needs_smtputf8
    assert message.size <= 8192


@pytest.mark.parametrize(
    ("what", "condition"),
    [
        ("a lone dot line", lambda b: b"." in raw_lines(b)),
        ("the brief's lone dot", lambda b: b"\n.\r\n" in b),
        ("a double dot line", lambda b: any(x.startswith(b"..") for x in raw_lines(b))),
        ("a bare LF", lambda b: re.search(rb"(?<!\r)\n", b) is not None),
        ("a bare CR", lambda b: re.search(rb"\r(?!\n)", b) is not None),
        ("no final line end", lambda b: not b.endswith((b"\n", b"\r"))),
        ("a 998-octet line", lambda b: any(len(x) == 998 for x in raw_lines(b))),
        ("an 8-bit octet", lambda b: not b.isascii()),
        ("a Bcc field", lambda b: b"\nBcc: " in b or b"\rBcc: " in b),
        ("a folded field", lambda b: b"\n\t" in b or b"\r\n " in b),
        ("an empty body", lambda b: Message.from_bytes(b).as_bytes().endswith(b"\r\n\r\n")),
        ("no blank line", lambda b: b"\r\n\r\n" not in Message.from_bytes(b).as_bytes()),
    ],
)
def test_message_bytes_reach_their_edge_cases(
    what: str, condition: Callable[[bytes], bool]
) -> None:
    assert condition(reachable(s.message_bytes(), condition))


def test_utf8_headers_are_reachable() -> None:
    raw = reachable(
        s.message_bytes(utf8_headers=True), lambda b: Message.from_bytes(b).needs_smtputf8
    )
    assert Message.from_bytes(raw).needs_smtputf8


def send_through_dot_stuffer(message: Message, size: int) -> bytes:
    stuffer = DotStuffer()
    data = b"".join(stuffer.chunk(chunk, normalized=True) for chunk in message.chunks(size))
    return data + stuffer.end()


@FEW
@given(s.messages(utf8_headers=True), st.integers(2, 200))
def test_messages_dot_stuff_and_round_trip(message: Message, size: int) -> None:
    wire = message.as_bytes()
    assert not has_bare_cr_or_lf(wire)
    assert all(not has_bare_cr_or_lf(chunk) for chunk in message.chunks(size))
    if wire:
        assert Message.from_bytes(wire).as_bytes() == wire
    data = send_through_dot_stuffer(message, size)
    expected = wire if not wire or wire.endswith(b"\r\n") else wire + b"\r\n"
    assert unstuff(data) == expected
    # The same bytes whatever the piece size.
    assert data == send_through_dot_stuffer(message, 65536)


@FEW
@given(s.messages(eight_bit=False, utf8_headers=False, max_size=8192))
def test_seven_bit_messages_need_nothing(message: Message) -> None:
    assert not message.needs_8bitmime
    assert not message.needs_smtputf8
    assert message.size <= 8192


def test_messages_reach_both_writers() -> None:
    built = reachable(s.messages(), lambda m: (m.get("Content-Type") or "").startswith("multipart"))
    assert built.get("MIME-Version") == "1.0"
    parsed = reachable(s.messages(), lambda m: m.get("Content-Type") is None)
    assert parsed.message_id is not None
    built_utf8 = reachable(
        s.messages(utf8_headers=True),
        lambda m: m.needs_smtputf8 and (m.get("Content-Type") or "").startswith("multipart"),
    )
    assert built_utf8.needs_smtputf8


_CID_SRC = re.compile(r'src="cid:([^"]*)"')


def crlf(data: bytes) -> bytes:
    """``data`` with every line ended by CRLF: what an attached message becomes."""
    return b"\r\n".join(data.splitlines()) + b"\r\n"


def check_parts_read_back(message: Message, attachments: list[Attachment]) -> None:
    """The inline parts and attached messages given to ``Message.build`` come back."""
    wire = message.as_bytes()
    parsed = email.message_from_bytes(wire, policy=email.policy.default)
    inline = {part.content_id: part.data for part in attachments if part.content_id}
    related = [part for part in parsed.walk() if part.get_content_type() == "multipart/related"]
    assert len(related) == (1 if inline else 0)
    for group in related:
        root, *others = group.iter_parts()
        assert root.get_content_type() == "text/html"
        # RFC 2392: every cid: URL in the HTML names one of the related part's members,
        # whose bytes are the inline part's data, and every member is named.
        by_id = {str(part["Content-ID"]): part for part in others}
        assert all(part.get_content_disposition() == "inline" for part in others)
        named = [unquote(url) for url in _CID_SRC.findall(root.get_content())]
        assert sorted(named) == sorted(inline)
        assert sorted(by_id) == sorted(f"<{content_id}>" for content_id in inline)
        for content_id, data in inline.items():
            assert by_id[f"<{content_id}>"].get_content() == data
    forwarded = [part for part in attachments if part.filename == "forwarded.eml"]
    kinds = [part for part in parsed.walk() if part.get_content_type() == "message/rfc822"]
    assert len(kinds) == len(forwarded)
    for part, read in zip(forwarded, kinds, strict=True):
        # RFC 2046 §5.2.1: unencoded, the same bytes with CRLF line ends.
        assert read["Content-Transfer-Encoding"] == ("7bit" if part.data.isascii() else "8bit")
        assert b"\r\n\r\n" + crlf(part.data) + b"\r\n--" in wire


@pytest.mark.parametrize(
    ("eight_bit", "utf8_headers"), [(True, False), (False, False), (True, True), (False, True)]
)
def test_built_inline_parts_and_attached_messages_read_back(
    eight_bit: bool, utf8_headers: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[tuple[Message, list[Attachment]]] = []
    build = Message.build

    def recording(**kwargs: Any) -> Message:
        message = build(**kwargs)
        built.append((message, list(kwargs.get("attachments") or ())))
        return message

    monkeypatch.setattr(Message, "build", recording)
    checked: list[Message] = []

    @FEW
    @given(s.messages(eight_bit=eight_bit, utf8_headers=utf8_headers, max_size=8192))
    def check(message: Message) -> None:
        given_parts = [parts for made, parts in built if made is message]
        if not given_parts:
            return  # parsed from message_bytes, not built
        check_parts_read_back(message, given_parts[-1])
        assert eight_bit or utf8_headers or not message.needs_8bitmime
        assert Message.from_bytes(message.as_bytes()).as_bytes() == message.as_bytes()
        checked.append(message)

    check()
    assert checked  # half the messages are built: some were


def _parts(wire: bytes) -> str:
    return wire.decode("utf-8", "replace")


@pytest.mark.parametrize(
    ("what", "condition"),
    [
        ("an inline part", lambda w: "\r\nContent-ID: <" in _parts(w)),
        ("two inline parts", lambda w: _parts(w).count("\r\nContent-ID: <") == 2),
        ("a lone dot-atom id", lambda w: re.search(r"Content-ID: <[^@>]*>", _parts(w))),
        ("a percent-encoded cid: URL", lambda w: re.search(r'"cid:[^"]*%[0-9A-F]{2}', _parts(w))),
        ("an attached message", lambda w: "Content-Type: message/rfc822\r\n" in _parts(w)),
        (
            "an 8-bit attached message",
            lambda w: "message/rfc822\r\nContent-Transfer-Encoding: 8bit" in _parts(w),
        ),
        (
            "inline parts and an attached message",
            lambda w: "Content-ID: <" in _parts(w) and "message/rfc822" in _parts(w),
        ),
    ],
)
def test_built_messages_reach_inline_parts_and_attached_messages(
    what: str, condition: Callable[[bytes], object]
) -> None:
    found = reachable(s.messages(), lambda m: bool(condition(m.as_bytes())))
    assert condition(found.as_bytes())


# -- replies -----------------------------------------------------------------------


@SOME
@given(s.replies(utf8=True, bare_lf=True))
def test_replies_parse_to_their_reply(pair: tuple[bytes, Reply]) -> None:
    data, reply = pair
    assert parse_replies(data) == [reply]


@FEW
@given(s.reply_lines(max_lines=6), st.data())
def test_reply_lines_parse_whatever_the_chunking(
    pair: tuple[tuple[bytes, ...], Reply], data: st.DataObject
) -> None:
    lines, reply = pair
    wire = b"".join(lines)
    reader = ReplyReader()
    start = 0
    while start < len(wire):
        end = data.draw(st.integers(start + 1, len(wire)))
        reader.feed(wire[start:end])
        start = end
    assert reader.pop() == reply
    assert reader.pop() is None
    assert not reader.has_partial
    # Line by line, too: the reply is complete only after its last line.
    reader = ReplyReader()
    for line in lines[:-1]:
        reader.feed(line)
        assert reader.pop() is None
    reader.feed(lines[-1])
    assert reader.pop() == reply


@FEW
@given(s.replies(klass=2, enhanced=True), s.replies(klass=5), s.replies(klass=4))
def test_replies_drive_the_client_connection(
    greeting: tuple[bytes, Reply], first: tuple[bytes, Reply], second: tuple[bytes, Reply]
) -> None:
    connection = ClientConnection()
    connection.receive_data(greeting[0])
    assert connection.next_event() == Greeting(reply=greeting[1])
    noop = Noop()
    connection.send(noop)
    connection.receive_data(first[0])
    assert connection.next_event() == Response(command=noop, reply=first[1])
    again = Noop()
    connection.send(again)
    connection.receive_data(second[0])
    assert connection.next_event() == Response(command=again, reply=second[1])


@FEW
@given(s.replies(klass=3, enhanced=True))
def test_intermediate_replies_have_no_enhanced_code(pair: tuple[bytes, Reply]) -> None:
    assert pair[1].enhanced is None
    assert 300 <= pair[1].code <= 399


@FEW
@given(s.replies(codes=[250, 550], enhanced=False))
def test_replies_keep_to_the_codes_asked_for(pair: tuple[bytes, Reply]) -> None:
    assert pair[1].code in (250, 550)
    assert pair[1].enhanced is None


@pytest.mark.parametrize(
    ("what", "condition"),
    [
        ("a multi-line reply", lambda p: len(p[1].lines) >= 3),
        ("an enhanced code", lambda p: p[1].enhanced is not None),
        (
            "a code on every line",
            lambda p: (
                p[1].enhanced is not None
                and len(p[1].lines) > 1
                and all(line.startswith(str(p[1].enhanced)) for line in p[1].lines)
            ),
        ),
        ("a decoy", lambda p: p[1].enhanced is None and p[1].lines[0][1:2] == "."),
        ("a bare code", lambda p: re.search(rb"(?m)^[0-9]{3}\r?$", p[0]) is not None),
        ("a bare LF", lambda p: re.search(rb"(?<!\r)\n", p[0]) is not None),
        ("UTF-8 text", lambda p: not p[0].isascii()),
        ("a tab", lambda p: "\t" in p[1].text),
        ("an unusual code", lambda p: p[1].code % 100 > 60),
    ],
)
def test_replies_reach_their_edge_cases(
    what: str, condition: Callable[[tuple[bytes, Reply]], bool]
) -> None:
    found = reachable(s.replies(utf8=True, bare_lf=True), condition)
    assert condition(found)
    assert parse_replies(found[0]) == [found[1]]


@FEW
@given(s.ehlo_replies())
def test_ehlo_replies_announce_their_extensions(pair: tuple[bytes, Extensions]) -> None:
    data, extensions = pair
    (reply,) = parse_replies(data)
    assert reply.code == 250
    assert Extensions.parse(reply.lines) == extensions
    connection = ClientConnection()
    connection.receive_data(b"220 mx.example ESMTP\r\n")
    connection.next_event()
    ehlo = Ehlo("client.example")
    connection.send(ehlo)
    connection.receive_data(data)
    assert connection.next_event() == Response(command=ehlo, reply=reply)
    assert connection.extensions == extensions


def test_ehlo_replies_reach_their_edge_cases() -> None:
    strategy = s.ehlo_replies()
    assert reachable(strategy, lambda p: p[1].size is not None and p[1].size > 10**9)[1].size
    assert reachable(strategy, lambda p: b"AUTH=" in p[0])[1].auth
    assert reachable(strategy, lambda p: b"pipelining" in p[0])[1].pipelining
    bare = reachable(strategy, lambda p: "SIZE" in p[1] and p[1].size is None)
    assert bare[1].keywords["SIZE"] in ("", "0")


# -- the documentation -------------------------------------------------------------


def test_the_doc_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks(DOC.read_text(encoding="utf-8"))
    assert blocks
    namespace: dict[str, object] = {"__name__": "docs_test_tools"}
    for number, block in enumerate(blocks, start=1):
        exec(compile(block, f"test-tools.md block {number}", "exec"), namespace)  # our own doc


def test_the_doc_names_every_strategy() -> None:
    text = DOC.read_text(encoding="utf-8")
    for name in s.__all__:
        assert f"`{name}" in text, name
