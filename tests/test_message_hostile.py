"""Hostile messages: what apps hand to mailrelay from anywhere, and what goes on the wire.

Apps parse messages from untrusted sources (``Message.from_bytes``, ``Message.from_file``,
``Message.from_email``) and let mailrelay derive their envelopes (``Envelope.from_message``).
Whatever the bytes, these tests hold the promises made for them: a refusal is a typed error
from :mod:`mailrelay.errors` (never a bare ``IndexError`` from the standard library's
parser), the DATA payload is dot-stuffed and terminated exactly once, no CR or LF reaches a
``MAIL`` or ``RCPT`` command, ``Bcc`` stays off the wire, ``size`` is the length of the wire
form, and reading takes time linear in the input. A mutation fuzzer over the sisimai corpus
found the regressions below. The time bounds are hang guards, not speed measurements: the
hostile inputs are read in a child process (``python -m`` this module), since a parser
stuck in a loop holds the GIL and a thread of the test process could not notice.
"""

from __future__ import annotations

import email
import email.headerregistry
import email.message
import email.policy
import json
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mailrelay import _wire
from mailrelay.envelope import Envelope
from mailrelay.errors import InvalidAddress, MailRelayError
from mailrelay.flow import Read, Session, SessionConfig, Write
from mailrelay.message import (
    MAX_HEADER_BYTES,
    MAX_MAILBOX_CHARS,
    Message,
    _list_items,
    _parsed_addr_specs,
)
from mailrelay.options import TLS, Timeouts
from mailrelay.results import DeliveryResult
from mailrelay.transport import FileTransport, MemoryTransport, SMTPTransport
from tests.hang_guard import HANG_BOUND, results_of
from tests.peers.aiosmtpd_server import AiosmtpdServer

HEAD = b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: hostile\r\n"

# Address fields the standard library's header parser crashes on (IndexError in
# get_angle_addr for an unclosed "<", RecursionError in deeply nested comments).
UNREADABLE_ADDRESS_FIELDS = [
    pytest.param(b"<", id="lone-angle"),
    pytest.param(b"Message-ID: <", id="group-then-unclosed-angle"),
    pytest.param(b"a@b.example " + b"(" * 1200 + b")" * 1200, id="deeply-nested-comments"),
]


@pytest.mark.parametrize("value", UNREADABLE_ADDRESS_FIELDS)
def test_an_unreadable_bcc_field_is_an_invalid_address(value: bytes) -> None:
    with pytest.raises(InvalidAddress):
        Message.from_bytes(HEAD + b"Bcc: " + value + b"\r\n\r\nbody\r\n")


@pytest.mark.parametrize("field", [b"To", b"Cc", b"From", b"Sender", b"Resent-To"])
@pytest.mark.parametrize("value", UNREADABLE_ADDRESS_FIELDS)
def test_an_unreadable_address_field_is_a_typed_error(field: bytes, value: bytes) -> None:
    message = Message.from_bytes(field + b": " + value + b"\r\n" + HEAD + b"\r\nbody\r\n")
    with pytest.raises(MailRelayError):
        Envelope.from_message(message)


# Lists the email package's parser, given the whole field, crashed on (AttributeError when a
# mailbox or a group follows a group); read one mailbox at a time, they hold these addresses.
@pytest.mark.parametrize(
    ("value", "specs"),
    [
        pytest.param(b"g:; d:;", [], id="two-groups"),
        pytest.param(
            b"g: a@b.example; x <k@e.example>;", ["a@b.example", "k@e.example"], id="after-group"
        ),
        pytest.param(b"g: a@b.example;;", ["a@b.example"], id="group-then-semicolon"),
    ],
)
def test_lists_after_a_group_are_read(value: bytes, specs: list[str]) -> None:
    message = Message.from_bytes(HEAD + b"Bcc: " + value + b"\r\n\r\nbody\r\n")
    assert [str(a) for a in message.bcc] == specs
    recipients = Envelope.from_message(message).recipients
    assert [str(r.address) for r in recipients] == ["bob@example.net", *specs]


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        pytest.param(b"Message-ID: <", None, id="lone-angle"),
        pytest.param(b"Message-ID: <abc@x.example", "abc@x.example", id="unclosed"),
        pytest.param(b"Message-ID: abc@x.example>", "abc@x.example", id="unopened"),
        pytest.param(b"Message-ID: <<abc@x.example>>", "abc@x.example", id="doubled"),
        pytest.param(b"Message-ID: <a <abc@x.example", "abc@x.example", id="two-unclosed"),
        pytest.param(b"Message-ID: bare@x.example (c)", "bare@x.example (c)", id="bare"),
    ],
)
def test_message_id_never_holds_an_angle_bracket(field: bytes, expected: str | None) -> None:
    # As the DSN parser reads the original's Message-ID, so that the tracker matches them.
    assert Message.from_bytes(field + b"\r\n\r\nbody\r\n").message_id == expected


def test_from_email_keeps_parsed_header_lines_as_they_were() -> None:
    # A parsed field is not refolded: what the source said goes out, as from_bytes sends
    # it (the email package refolds a long field in time quadratic in its length).
    raw = b"From: a@x.example\r\nSubject: " + b"caf\xc3\xa9 " * 40 + b"end\r\n\r\nbody\r\n"
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    message = Message.from_email(parsed)
    assert message.as_bytes() == Message.from_bytes(raw).as_bytes() == raw
    assert message.needs_smtputf8


# -- address lists: read one mailbox at a time, in linear time --------------------------------

LOCALS = st.from_regex(r"[a-z0-9]{1,6}(\.[a-z0-9]{1,6})?", fullmatch=True)
DOMAINS = st.sampled_from(["x.example", "y.test", "[192.0.2.7]", "[IPv6:2001:db8::1]"])
SPECS = st.builds(lambda local, domain: f"{local}@{domain}", LOCALS, DOMAINS)
# Pieces that would split a list if a reader missed the quoting or comment around them.
QUOTED_PIECES = st.sampled_from(["Doe", " ", ",", ";", ":", "<", ">", "@", "(", ")", '\\"', "\\\\"])
COMMENT_PIECES = st.sampled_from(
    ["a", " ", ",", ";", ":", "<", ">", "@", '"', "\\)", "\\(", "(b, c)", "(d; (e:))"]
)


@st.composite
def mailboxes(draw: st.DrawFn) -> tuple[str, str]:
    """One mailbox in one of RFC 5322's spellings, and its addr-spec."""
    spec = draw(SPECS)
    form = draw(st.sampled_from(["bare", "comment", "quoted", "atom", "route"]))
    if form == "comment":
        comment = "".join(draw(st.lists(COMMENT_PIECES, max_size=6)))
        return f"{spec} ({comment})", spec
    if form == "quoted":
        name = "".join(draw(st.lists(QUOTED_PIECES, max_size=6)))
        return f'"{name}" <{spec}>', spec
    if form == "route":
        return f"<@relay1.example,@relay2.example:{spec}>", spec  # RFC 5322 §4.4 obs-route
    return (f"Ann Lee <{spec}>" if form == "atom" else spec), spec


@st.composite
def address_lists(draw: st.DrawFn) -> tuple[str, list[str]]:
    """An address list of mailboxes and groups, and its addr-specs in order."""
    items: list[str] = []
    specs: list[str] = []
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            members = draw(st.lists(mailboxes(), max_size=3))
            items.append('"Team, A": ' + ", ".join(text for text, _ in members) + ";")
            specs += [spec for _, spec in members]
        else:
            text, spec = draw(mailboxes())
            items.append(text)
            specs.append(spec)
    return ", ".join(items), specs


@given(address_lists())
def test_property_address_lists_are_read_mailbox_by_mailbox(case: tuple[str, list[str]]) -> None:
    value, specs = case
    assert _parsed_addr_specs(value) == specs
    # What the email package reads from the whole field at once (on lists it can read).
    whole = email.headerregistry.HeaderRegistry()("to", value)
    assert isinstance(whole, email.headerregistry.AddressHeader)
    assert [m.addr_spec for m in whole.addresses] == specs


@pytest.mark.parametrize(
    ("value", "items"),
    [
        pytest.param("a@x.example", ["a@x.example"], id="one"),
        pytest.param("a@x.example,b@x.example", ["a@x.example", "b@x.example"], id="two"),
        pytest.param('"a,b" <c@x.example>', ['"a,b" <c@x.example>'], id="comma-in-quotes"),
        pytest.param('"a\\",b" <c@x.example>', ['"a\\",b" <c@x.example>'], id="escaped-quote"),
        pytest.param("c@x.example (a, (b, c))", ["c@x.example (a, (b, c))"], id="nested-comment"),
        pytest.param("<@r.example,@s.example:c@x.example>", None, id="route"),
        pytest.param("c@[IPv6:2001:db8::1]", ["c@[IPv6:2001:db8::1]"], id="literal"),
        pytest.param("team: a@x.example, b@x.example;", [" a@x.example", " b@x.example", ""],
                     id="group"),
        pytest.param("undisclosed-recipients:;", ["", ""], id="empty-group"),
        pytest.param("<a@x.example", ["<a@x.example"], id="unclosed-angle"),
        pytest.param('"a, b', ['"a, b'], id="unclosed-quote"),
    ],
)  # fmt: skip
def test_list_items(value: str, items: list[str] | None) -> None:
    # None: the value is one item.
    assert _list_items(value) == (items if items is not None else [value])


def test_a_mailbox_longer_than_a_line_is_read_by_its_address() -> None:
    # RFC 5322 §2.1.1's line limit bounds one mailbox; a list may hold many of them.
    name = "N" * (MAX_MAILBOX_CHARS - len(" <a@x.example>"))
    longest = f"{name} <a@x.example>"
    assert len(longest) == MAX_MAILBOX_CHARS
    message = Message.from_bytes(
        b"From: s@x.example\r\nTo: " + ",".join([longest] * 3).encode() + b"\r\n\r\nhi\r\n"
    )
    assert [str(r.address) for r in Envelope.from_message(message).recipients] == ["a@x.example"]
    # Longer: a long display name (legal in a folded field) is skipped, the address read.
    long_names = Message.from_bytes(
        b"From: s@x.example\r\nTo: N"
        + longest.encode()
        + b',\r\n "Q'
        + b"q" * 2000
        + b'" <b@x.example>  , =?utf-8?q?'
        + b"=C3=A9" * 300
        + b"?= <c@x.example>\r\n\r\nhi\r\n"
    )
    recipients = Envelope.from_message(long_names).recipients
    assert [str(r.address) for r in recipients] == ["a@x.example", "b@x.example", "c@x.example"]
    # Without an angle-addr, or with one itself too long, it is refused.
    for field in [b"a" * 1000 + b"@x.example", b"N <" + b"a" * 1000 + b"@x.example>"]:
        too_long = Message.from_bytes(b"From: s@x.example\r\nTo: " + field + b"\r\n\r\nhi\r\n")
        with pytest.raises(InvalidAddress, match="longer than"):
            Envelope.from_message(too_long)


# -- hostile messages end to end: parse, envelope, and the bytes that reach the wire ----------

HEADER_LINES = st.sampled_from(
    [
        b"From: a@x.example",
        b"To: b@y.test",
        b'Cc: "c, d" <c@y.test>',
        b"Bcc: hidden@z.example",
        b"bcc:hidden2@z.example",
        b"BCC \t: hidden3@z.example",
        b"Resent-Bcc: rb@z.example",
        b"Resent-To: rt@y.test",
        b"Resent-From: rf@x.example",
        b"Sender: s@x.example",
        b"Message-ID: <m@x.example>",
        b"Message-ID: <",
        b"Message-ID:",
        b"To: <",
        b"To: g:;",
        b"Bcc: (((",
        b'Content-Type: multipart/mixed; boundary=""',
        b"Subject: \xff\xfe",
        b"Subject: caf\xc3\xa9",
        b"X-Dot: .",
        b".",
        b"..",
        b" folded",
        b"\tBcc: folded@z.example",
        b"\x00",
        b"Not a field",
        b"",
    ]
)
BODY_PIECES = st.sampled_from(
    [
        b"text",
        b".",
        b"..",
        b"\r\n.\r\n",
        b".\r\n",
        b"\n.\n",
        b"\r.\r",
        b"\r",
        b"\n",
        b"\r\n",
        b"\x00",
        b"\xff",
        b"Bcc: in-body@z.example",
        b"--b--",
        b"From x",
    ]
)
LINE_ENDS = st.sampled_from([b"\r\n", b"\n", b"\r", b""])


@st.composite
def hostile_raw(draw: st.DrawFn) -> bytes:
    """A message from pieces that break naive readers and writers of mail (most of them
    with a sender and a recipient, so that they reach the wire)."""
    out = b"From: a@x.example\r\nTo: b@y.test\r\n" if draw(st.integers(0, 3)) else b""
    for _ in range(draw(st.integers(0, 8))):
        out += draw(HEADER_LINES) + draw(LINE_ENDS)
    out += draw(st.sampled_from([b"\r\n", b"\n", b"\r", b""]))
    out += b"".join(draw(st.lists(BODY_PIECES, max_size=12)))
    return out or b"X: y"


def reply(code: int, *texts: str) -> bytes:
    """A (multi-line) SMTP reply."""
    texts = texts or ("ok",)
    return "".join(
        f"{code}{'-' if i < len(texts) - 1 else ' '}{t}\r\n" for i, t in enumerate(texts)
    ).encode()


def sent_by_client(message: Message, envelope: Envelope, *, pipelining: bool, bdat: bool) -> bytes:
    """What the client writes to a server that accepts everything (no sockets: the dialogue
    is run against scripted replies)."""
    keywords = ["SIZE 100000000", "8BITMIME", "SMTPUTF8", "DSN"]
    keywords += ["PIPELINING"] * pipelining + ["CHUNKING"] * bdat
    turns = [reply(220, "mx"), reply(250, "mx", *keywords), reply(250)]
    turns += [reply(250)] * len(envelope.recipients)
    turns += [reply(250)] * 100 if bdat else [reply(354, "go"), reply(250)]
    config = SessionConfig(
        local_hostname="client.example", server_hostname="mx.example", tls=TLS.NONE, chunking=bdat
    )
    session = Session(config)
    written: list[bytes] = []
    results: list[object] = []
    for step in (session.open(), session.deliver(message, envelope)):
        answer: bytes | None = None
        for _ in range(10_000):
            try:
                request = step.send(answer)
            except StopIteration as done:
                results.append(done.value)
                break
            answer = None
            if isinstance(request, Write):
                written.append(request.data)
            elif isinstance(request, Read):
                answer = turns.pop(0)
        else:
            raise AssertionError("the dialogue did not finish")
    result = results[-1]
    assert isinstance(result, DeliveryResult)
    assert result.ok
    return b"".join(written)


def head_of(wire: bytes) -> bytes:
    """The header block of CRLF wire bytes, as a receiving server reads it."""
    end = _wire.find_head_end(wire, final=True)
    assert end is not None
    return wire[:end]


BLIND_FIELD = re.compile(rb"(?im)^(resent-)?bcc[ \t]*:")
COMMAND = re.compile(rb"(EHLO|MAIL FROM:<|RCPT TO:<)[^\r\n]*\r\n")


def check_data_section(sent: bytes, message: Message, envelope: Envelope) -> None:
    """DATA: the commands before it are single lines; the payload unstuffs to the message and
    holds one terminator, at its end."""
    commands, marker, payload = sent.partition(b"DATA\r\n")
    assert marker
    assert COMMAND.sub(b"", commands) == b""  # every command one line, no CR/LF inside
    assert commands.count(b"RCPT TO:") == len(envelope.recipients)
    wire = message.as_bytes()
    expected = wire if wire.endswith(b"\r\n") or not wire else wire + b"\r\n"
    assert payload.endswith(b".\r\n")
    lines = payload[:-3].split(b"\r\n")
    assert lines[-1] == b""
    assert b"." not in lines[:-1]  # no line "." before the terminator (RFC 5321 §4.5.2)
    unstuffed = b"\r\n".join(line[1:] if line[:1] == b"." else line for line in lines)
    assert unstuffed == expected


def check_bdat(sent: bytes, message: Message) -> None:
    """BDAT: the chunks, each exactly as long as it says, add up to the message."""
    received = b""
    rest = sent[sent.index(b"BDAT ") :]
    for _ in range(10_000):
        match = re.match(rb"BDAT (\d+)( LAST)?\r\n", rest)
        assert match is not None
        size = int(match.group(1))
        received += rest[match.end() : match.end() + size]
        rest = rest[match.end() + size :]
        if match.group(2):
            break
    assert rest == b""
    assert received == message.as_bytes()


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(raw=hostile_raw(), size=st.integers(2, 64), pipelining=st.booleans())
def test_property_hostile_messages_keep_every_promise(
    raw: bytes, size: int, pipelining: bool
) -> None:
    try:
        message = Message.from_bytes(raw)
    except MailRelayError:
        return  # a typed refusal (an unusable Bcc address) is a kept promise
    wire = message.as_bytes()
    assert len(wire) == message.size
    assert b"".join(message.chunks(size)) == wire
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", wire) is None
    assert BLIND_FIELD.search(head_of(wire)) is None
    message_id = message.message_id
    assert message_id is None or not re.search(r"[\r\n<>]", message_id)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "m.eml"
        path.write_bytes(raw)
        from_file = Message.from_file(path)
        assert (from_file.as_bytes(), from_file.headers, from_file.bcc) == (
            wire,
            message.headers,
            message.bcc,
        )
    try:
        envelope = Envelope.from_message(message)
    except MailRelayError:
        return
    event("reached the wire")
    if not any(name.lower().startswith("resent-") for name, _ in message.headers):
        # (With a resent block, its fields name the recipients instead.)
        assert set(message.bcc) <= {r.address for r in envelope.recipients}
    sent = sent_by_client(message, envelope, pipelining=pipelining, bdat=False)
    check_data_section(sent, message, envelope)
    check_bdat(sent_by_client(message, envelope, pipelining=pipelining, bdat=True), message)


TAIL_LINES = st.sampled_from(
    [b"To: b@y.test", b" folded", b"Bcc: h@z.example", b"", b"Not a field", b"body", b"."]
)


@given(
    pad=st.integers(_wire.READ_SIZE - 24, _wire.READ_SIZE + 8),
    first_end=LINE_ENDS,
    tail=st.lists(st.tuples(TAIL_LINES, LINE_ENDS), max_size=6),
)
def test_property_from_file_reads_a_header_block_across_reads(
    pad: int, first_end: bytes, tail: list[tuple[bytes, bytes]]
) -> None:
    # The header block's scan resumes where the last read's stopped (each byte scanned
    # once); a line or a CRLF cut by a read boundary reads as from_bytes reads it whole.
    raw = b"X-Pad: " + b"p" * (pad - 7) + first_end + b"".join(a + b for a, b in tail)
    try:
        expected = Message.from_bytes(raw)
    except MailRelayError:
        return
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "m.eml"
        path.write_bytes(raw)
        message = Message.from_file(path)
        assert message.as_bytes() == expected.as_bytes()  # (read from the file)
    assert (message.headers, message.bcc, message.size) == (
        expected.headers,
        expected.bcc,
        expected.size,
    )


# -- hostile messages through the real sending paths -------------------------------------------

SENDER_HEAD = b"From: alice@mailrelay.test\r\nTo: bob@mailrelay.test\r\n"
WIRE_CASES = {
    "dot lines": SENDER_HEAD + b"\r\n.\r\n..\r\n.x\r\nmid\r\n.\r\nend\r\n.",
    "terminator as the body": SENDER_HEAD + b"\r\n.\r\n",
    "bare CR and LF": b"From: alice@mailrelay.test\rTo: bob@mailrelay.test\n\r.\r.\n\r\n.\rx\r",
    "blind fields": SENDER_HEAD
    + b"Bcc: hidden@mailrelay.test\r\nbcc\t: other@mailrelay.test\r\n\r\nBcc: in@body.test\r\n",
    "8-bit and NUL": SENDER_HEAD + b"Subject: caf\xc3\xa9\r\n\r\n\x00\xff\xfe\r\n.\x00\r\n",
    "no body": SENDER_HEAD,
    "no final line end": SENDER_HEAD + b"\r\nlast line",
}


def delivered_data(wire: bytes) -> bytes:
    """What a server stores after unstuffing: the wire form, ending in CRLF."""
    return wire if wire.endswith(b"\r\n") else wire + b"\r\n"


@pytest.mark.parametrize("name", list(WIRE_CASES))
def test_memory_and_file_transports_keep_hostile_messages_as_they_are(
    name: str, tmp_path: Path
) -> None:
    message = Message.from_bytes(WIRE_CASES[name])
    wire = message.as_bytes()
    memory = MemoryTransport()
    assert memory.send(message).ok
    assert memory.outbox[0].message.as_bytes() == wire
    eml = FileTransport(tmp_path / "eml")
    assert eml.send(message).ok
    (stored,) = (tmp_path / "eml").glob("*.eml")
    assert stored.read_bytes() == wire
    assert Message.from_file(stored).bcc == ()
    maildir = FileTransport(tmp_path / "maildir", format="maildir")
    assert maildir.send(message).ok
    (delivered,) = (tmp_path / "maildir" / "new").iterdir()
    expected = b"Return-Path: <alice@mailrelay.test>\n" + wire.replace(b"\r\n", b"\n")
    assert delivered.read_bytes() == expected


def test_smtp_server_receives_hostile_messages_as_they_are(aiosmtpd_server: AiosmtpdServer) -> None:
    # One connection for every case: RSET between them, and each dot-stuffed anew.
    messages = [Message.from_bytes(raw) for raw in WIRE_CASES.values()]
    with SMTPTransport(
        aiosmtpd_server.host, aiosmtpd_server.port, tls=TLS.NONE, timeouts=Timeouts.all(10)
    ) as transport:
        results = [transport.send(message) for message in messages]
    assert all(result.ok for result in results)
    received = aiosmtpd_server.messages
    assert [r.content for r in received] == [delivered_data(m.as_bytes()) for m in messages]
    blind = received[list(WIRE_CASES).index("blind fields")]
    assert blind.rcpt_tos == (
        "bob@mailrelay.test",
        "hidden@mailrelay.test",
        "other@mailrelay.test",
    )
    assert BLIND_FIELD.search(head_of(blind.content)) is None


# -- hang guard: hostile fields are read in time linear in their size -------------------------

#: Seconds the child may take for every input before it counts as hung; a linear reader
#: needs a few seconds for all of them on a busy two-core machine.
#: Characters in each hostile field: a quadratic reader of most of these shapes would
#: take many minutes (a 20 KB field of dots took 3 s when the whole field was parsed).
RUN = 200_000

# Each hostile field, and what reading it as To or Bcc ends in: "ok", "InvalidAddress", or
# "none" (no address: a To field alone leaves no recipient, MessageError; Bcc is fine).
HOSTILE_FIELDS = {
    "dots in one address": ("a" + "." * RUN + "@b.example", "InvalidAddress"),
    "obsolete phrase": ("x. " * (RUN // 3) + "<a@b.example>", "ok"),  # read by its <addr-spec>
    "comment of words": ("(" + "x " * (RUN // 2) + ") a@b.example", "InvalidAddress"),
    "unclosed angle of dots": ("<" + "a." * (RUN // 2), "InvalidAddress"),
    "quoted run": ('"' + "x" * RUN + '" <a@b.example>', "ok"),  # read by its <addr-spec>
    "quoted run, no angle-addr": ('"' + "x" * RUN + '"', "InvalidAddress"),
    "opening parentheses": ("(" * RUN, "InvalidAddress"),
    # Many mailboxes, each just within MAX_MAILBOX_CHARS: linear in their number.
    "phrases under the limit": (("x. " * 300 + "<a@b.example>, ") * (RUN // 1830), "ok"),
    "dots under the limit": (("a" + "." * 900 + "@b.example, ") * (RUN // 1826), "InvalidAddress"),
    "commas": ("," * RUN, "none"),
    "colons": (":" * RUN, "none"),
}


# A header block of MAX_HEADER_BYTES, nearly all of it one field's continuation lines (each
# a tab and a bare LF, three bytes once normalized): 12 s for 680 KB when each line was
# added to the field read so far.
CONTINUED = (
    HEAD + b"X-Folded: a\n" + b"\t\n" * ((MAX_HEADER_BYTES - len(HEAD) - 100) // 2) + b"\r\nhi\r\n"
)


def hostile_messages() -> dict[str, tuple[bytes, str]]:
    """Each hostile message by name, and what reading it (with its envelope) ends in.

    Every hostile field goes in as a To field and as a Bcc field (read by from_bytes).
    """
    out: dict[str, tuple[bytes, str]] = {}
    for name, (value, expected) in HOSTILE_FIELDS.items():
        field = value.encode()
        to = HEAD.replace(b"To: bob@example.net", b"To: " + field) + b"\r\nhi\r\n"
        out["To: " + name] = (to, "MessageError" if expected == "none" else expected)
        out["Bcc: " + name] = (
            HEAD + b"Bcc: " + field + b"\r\n\r\nhi\r\n",
            "ok" if expected == "none" else expected,
        )
    out["continuation lines"] = (CONTINUED, "ok")
    # For from_email (the email package refolded it: 9 s for 160 KB, minutes for this).
    out["from_email: long field of 8-bit words"] = (
        HEAD + b"X-Words: " + b"caf\xc3\xa9 " * (3 * RUN // 6) + b"\r\n\r\nhi\r\n",
        "ok",
    )
    return out


def read(name: str, raw: bytes, directory: Path) -> None:
    """Read one hostile message the way its name says (and its envelope)."""
    if name.startswith("from_email: "):
        source = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(source, email.message.EmailMessage)
        assert Message.from_email(source).as_bytes() == raw
        return
    message = Message.from_bytes(raw)
    Envelope.from_message(message)
    if not name.startswith(("To: ", "Bcc: ")):
        path = directory / "m.eml"
        path.write_bytes(raw)
        assert Message.from_file(path).headers == message.headers


def main() -> None:
    """The child: read each hostile message, one JSON line per result as soon as it is known."""
    with tempfile.TemporaryDirectory() as directory:
        for name, (raw, _) in hostile_messages().items():
            outcome = "ok"
            try:
                read(name, raw, Path(directory))
            except MailRelayError as exc:
                outcome = type(exc).__name__
            except Exception as exc:  # reported, and failed by the parent
                outcome = "untyped " + type(exc).__name__
            print(json.dumps({"name": name, "outcome": outcome}), flush=True)


@pytest.fixture(scope="module")
def outcomes() -> dict[str, str]:
    """Each input's outcome from the child (none for those it had not reached)."""
    return {
        name: line["outcome"] for name, line in results_of("tests.test_message_hostile").items()
    }


@pytest.mark.parametrize("name", list(hostile_messages()))
def test_hostile_messages_are_read_in_time(name: str, outcomes: dict[str, str]) -> None:
    if name not in outcomes:
        pytest.fail(f"reading had not finished {name!r} after {HANG_BOUND} s (all inputs)")
    assert outcomes[name] == hostile_messages()[name][1]


if __name__ == "__main__":
    main()
