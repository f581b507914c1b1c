"""Tests for mailrelay.message: building, parsing, streaming and the wire form."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import email.utils
import re
import tempfile
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from email.message import EmailMessage, MIMEPart
from pathlib import Path
from typing import Any
from unittest import mock

import attrs
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mailrelay import _mime
from mailrelay.address import Address
from mailrelay.envelope import Envelope
from mailrelay.errors import InvalidAddress, MessageError
from mailrelay.message import (
    MAX_HEADER_BYTES,
    Attachment,
    Message,
    _parsed_addr_specs,
    _simple_addresses,
)

BARE_CR_OR_LF = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def wire_field_names(wire: bytes) -> list[str]:
    """The field names of the header block of ``wire`` (which uses CRLF)."""
    names = []
    for line in wire.split(b"\r\n"):
        if not line:
            break  # the empty line that ends the header block
        if line[:1] not in (b" ", b"\t") and b":" in line:
            names.append(line.split(b":", 1)[0].decode("latin-1").strip().lower())
    return names


def parse_back(message: Message) -> EmailMessage:
    # The stdlib parser keeps line endings in payloads; give it local (LF) form.
    local = message.as_bytes().replace(b"\r\n", b"\n")
    parsed = email.message_from_bytes(local, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


# -- normalization and Bcc removal on parsed input -----------------------------

PARSE_CASES = [
    pytest.param(b"Subject: x\n\nbody\n", b"Subject: x\r\n\r\nbody\r\n", id="lf"),
    pytest.param(b"Subject: x\r\n\r\nbody\r\n", b"Subject: x\r\n\r\nbody\r\n", id="crlf"),
    pytest.param(b"Subject: x\r\rbody\r", b"Subject: x\r\n\r\nbody\r\n", id="bare-cr"),
    pytest.param(
        b"A: 1\r\nB: 2\n\r\nx\ry\n\rz", b"A: 1\r\nB: 2\r\n\r\nx\r\ny\r\n\r\nz", id="mixed-endings"
    ),
    pytest.param(b"Subject: x\r\n", b"Subject: x\r\n", id="no-body"),
    pytest.param(b"Subject: x", b"Subject: x", id="no-final-newline"),
    pytest.param(
        b"To: a@x.example\nBcc: b@x.example,\n c@x.example\nSubject: s\n\nhi\n",
        b"To: a@x.example\r\nSubject: s\r\n\r\nhi\r\n",
        id="folded-bcc-removed",
    ),
    pytest.param(
        b"Resent-To: a@x.example\nResent-Bcc: b@x.example\nFrom: c@x.example\n\nhi\n",
        b"Resent-To: a@x.example\r\nFrom: c@x.example\r\n\r\nhi\r\n",
        id="resent-bcc-removed",
    ),
    pytest.param(
        b"BCC : b@x.example\nSubject: s\n\nBcc: in the body stays\n",
        b"Subject: s\r\n\r\nBcc: in the body stays\r\n",
        id="bcc-any-case-space-before-colon",
    ),
    pytest.param(b"Bcc: b@x.example\n", b"", id="only-bcc"),
    pytest.param(
        b"A: 1\nnot a header line\nmore\n",
        b"A: 1\r\nnot a header line\r\nmore\r\n",
        id="missing-separator",
    ),
    pytest.param(b"\nbody only\n", b"\r\nbody only\r\n", id="empty-header-block"),
    pytest.param(
        b"Subject: caf\xc3\xa9\n\n\xff\xfe\n",
        b"Subject: caf\xc3\xa9\r\n\r\n\xff\xfe\r\n",
        id="8bit",
    ),
]


@pytest.mark.parametrize(("raw", "wire"), PARSE_CASES)
def test_from_bytes_normalizes_and_strips_bcc(raw: bytes, wire: bytes) -> None:
    message = Message.from_bytes(raw)
    assert message.as_bytes() == wire
    assert message.size == len(wire)
    assert b"".join(message.chunks(7)) == wire


@pytest.mark.parametrize(("raw", "wire"), PARSE_CASES)
def test_from_file_matches_from_bytes(raw: bytes, wire: bytes, tmp_path: Path) -> None:
    path = tmp_path / "message.eml"
    path.write_bytes(raw)
    from_file = Message.from_file(path)
    from_bytes = Message.from_bytes(raw)
    assert from_file.as_bytes() == wire
    assert b"".join(from_file.chunks(5)) == wire
    assert from_file.size == from_bytes.size
    assert from_file.headers == from_bytes.headers
    assert from_file.bcc == from_bytes.bcc
    assert from_file.needs_8bitmime == from_bytes.needs_8bitmime
    assert from_file.needs_smtputf8 == from_bytes.needs_smtputf8


def test_bcc_addresses_are_kept_for_the_envelope() -> None:
    raw = b"To: a@x.example\nBcc: B <b@x.example>,\n c@y.example\nBcc: d@z.example\n\nhi\n"
    message = Message.from_bytes(raw)
    assert message.bcc == (
        Address.parse("b@x.example"),
        Address.parse("c@y.example"),
        Address.parse("d@z.example"),
    )
    assert message.get_all("bcc") == ["B <b@x.example>, c@y.example", "d@z.example"]
    assert b"Bcc" not in message.as_bytes()


def test_unusable_bcc_address_is_an_error() -> None:
    with pytest.raises(InvalidAddress):
        Message.from_bytes(b"Bcc: not an address\n\nhi\n")


@pytest.mark.parametrize(
    "raw",
    [pytest.param(b"", id="empty"), pytest.param(b"X: " + b"y" * MAX_HEADER_BYTES, id="huge")],
)
def test_from_bytes_refuses(raw: bytes) -> None:
    with pytest.raises(MessageError):
        Message.from_bytes(raw)


# -- header access -------------------------------------------------------------


def test_headers_are_unfolded_and_in_order() -> None:
    raw = b"Subject: a\n  folded\tline \nX-A: 1\nx-a:2\nX-Empty:\n\nbody\n"
    message = Message.from_bytes(raw)
    assert message.headers == (
        ("Subject", "a  folded\tline"),
        ("X-A", "1"),
        ("x-a", "2"),
        ("X-Empty", ""),
    )
    assert message.get_all("X-A") == ["1", "2"]
    assert message.get("x-a") == "1"
    assert message.get("Missing") is None
    assert message.get_all("Missing") == []


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        pytest.param(b"Message-ID: <abc@x.example>", "abc@x.example", id="bracketed"),
        pytest.param(b"Message-Id:   <abc@x.example>  ", "abc@x.example", id="spaces"),
        pytest.param(b"Message-ID: <a@b> (comment)", "a@b", id="comment"),
        pytest.param(b"Message-ID: bare@x.example", "bare@x.example", id="no-brackets"),
        pytest.param(b"Message-ID: <>", None, id="empty-brackets"),
        pytest.param(b"X-Other: 1", None, id="missing"),
    ],
)
def test_message_id(field: bytes, expected: str | None) -> None:
    assert Message.from_bytes(field + b"\n\nbody\n").message_id == expected


@pytest.mark.parametrize(
    ("raw", "eight_bit", "utf8"),
    [
        pytest.param(b"Subject: x\n\nplain\n", False, False, id="ascii"),
        pytest.param(b"Subject: x\n\ncaf\xc3\xa9\n", True, False, id="8bit-body"),
        pytest.param(b"Subject: caf\xc3\xa9\n\nplain\n", False, True, id="utf8-header"),
        pytest.param(b"Bcc: z\xc3\xbc@x.example\n\nplain\n", False, False, id="utf8-only-in-bcc"),
        pytest.param(b"Subject: x\n\n\x00\x7f\n", False, False, id="controls-are-7bit"),
    ],
)
def test_needs_flags(raw: bytes, eight_bit: bool, utf8: bool) -> None:
    message = Message.from_bytes(raw)
    assert message.needs_8bitmime is eight_bit
    assert message.needs_smtputf8 is utf8


def test_get_addresses_understands_groups_and_names() -> None:
    message = Message.from_bytes(
        b"To: undisclosed-recipients:;\n"
        b'Cc: "Doe, J" <j@x.example>, team: a@x.example, b@y.example;\n\n'
    )
    assert message.get_addresses("To") == ()
    assert message.get_addresses("Cc") == tuple(
        Address.parse(a) for a in ("j@x.example", "a@x.example", "b@y.example")
    )


# -- chunks --------------------------------------------------------------------


@pytest.mark.parametrize("size", [2, 3, 4, 7, 64, 65536])
def test_chunks_are_bounded_and_never_split_crlf(size: int) -> None:
    message = Message.from_bytes(b"Subject: x\r\n\r\n" + b"a\r\n\r\nbc\rd\ne" * 50)
    pieces = list(message.chunks(size))
    assert all(0 < len(p) <= size for p in pieces)
    assert all(not p.endswith(b"\r") for p in pieces)
    assert all(BARE_CR_OR_LF.search(p) is None for p in pieces)
    assert b"".join(pieces) == message.as_bytes()


@pytest.mark.parametrize("size", [-1, 0, 1])
def test_chunk_size_must_hold_a_crlf(size: int) -> None:
    with pytest.raises(ValueError, match="at least 2"):
        list(Message.from_bytes(b"A: b\n\nc\n").chunks(size))


# -- building ------------------------------------------------------------------


def test_build_text_only() -> None:
    message = Message.build(
        sender="a@x.example", to=["b@y.example"], subject="Hello", text="Hi there\n"
    )
    parsed = parse_back(message)
    assert parsed.get_content_type() == "text/plain"
    assert parsed.get_content() == "Hi there\n"
    assert parsed["From"] == "a@x.example"
    assert parsed["To"] == "b@y.example"
    assert parsed["Subject"] == "Hello"
    assert parsed["MIME-Version"] == "1.0"
    assert message.needs_8bitmime is False
    assert message.needs_smtputf8 is False


@pytest.mark.parametrize(
    ("kwargs", "content_type", "parts"),
    [
        pytest.param({"text": "t"}, "text/plain", ["text/plain"], id="text"),
        pytest.param({"html": "<p>h</p>"}, "text/html", ["text/html"], id="html"),
        pytest.param(
            {"text": "t", "html": "<p>h</p>"},
            "multipart/alternative",
            ["text/plain", "text/html"],
            id="alternative",
        ),
        pytest.param(
            {"text": "t", "attachments": [("a.pdf", b"%PDF")]},
            "multipart/mixed",
            ["text/plain", "application/pdf"],
            id="text+attachment",
        ),
        pytest.param(
            {"text": "t", "html": "<b>h</b>", "attachments": [("d.bin", b"\0", "image/png")]},
            "multipart/mixed",
            ["text/plain", "text/html", "image/png"],
            id="alternative+attachment",
        ),
        pytest.param(
            {"attachments": [Attachment(filename="x.unknownext", data=b"x")]},
            "multipart/mixed",
            ["application/octet-stream"],
            id="attachment-only",
        ),
        pytest.param({}, "text/plain", ["text/plain"], id="empty"),
    ],
)
def test_build_structure(kwargs: dict[str, Any], content_type: str, parts: list[str]) -> None:
    message = Message.build(sender="a@x.example", to="b@y.example", **kwargs)
    parsed = parse_back(message)
    assert parsed.get_content_type() == content_type
    leaves = [p.get_content_type() for p in parsed.walk() if not p.is_multipart()]
    assert leaves == parts
    # Only the top level says MIME-Version (RFC 2045 §4).
    assert message.as_bytes().count(b"MIME-Version") == 1


def test_attachment_round_trips() -> None:
    data = bytes(range(256)) * 3
    message = Message.build(
        sender="a@x.example", to="b@y.example", attachments=[("résumé.bin", data, None)]
    )
    parsed = parse_back(message)
    (attachment,) = list(parsed.iter_attachments())
    assert attachment.get_filename() == "résumé.bin"
    assert attachment.get_content() == data
    assert message.as_bytes().isascii()


def test_non_ascii_subject_and_names_use_rfc2047() -> None:
    message = Message.build(
        sender=("Zoë Ünïcode", "zoe@bücher.example"),
        to=[("Ελένη", "eleni@x.example")],
        subject="Grüße aus Köln",
        text="Grüße\n",
        html="<p>Grüße</p>",
    )
    wire = message.as_bytes()
    assert wire.isascii()
    assert b"=?utf-8?" in wire
    assert b"xn--bcher-kva.example" in wire
    assert message.needs_8bitmime is False
    assert message.needs_smtputf8 is False
    parsed = parse_back(message)
    assert parsed["Subject"] == "Grüße aus Köln"
    assert parsed["From"].addresses[0].display_name == "Zoë Ünïcode"
    assert parsed["To"].addresses[0].display_name == "Ελένη"
    body = parsed.get_body(("plain",))
    assert body is not None
    # Base64 text carries its canonical CRLF line ends (RFC 2045 §6.8).
    assert body.get_content().replace("\r\n", "\n") == "Grüße\n"


def test_non_ascii_local_part_switches_to_smtputf8_form() -> None:
    message = Message.build(sender="zoë@例え.jp", to="b@y.example", subject="ü", text="ü\n")
    assert message.needs_smtputf8 is True
    assert "zoë@例え.jp".encode() in message.as_bytes()
    assert message.message_id is not None
    assert message.message_id.endswith("@xn--r8jz45g.jp")


def test_message_id_and_date_are_added() -> None:
    message = Message.build(sender="a@Mail.Example", to="b@y.example", text="t")
    assert message.message_id is not None
    assert re.fullmatch(r"[^@<>\s]+@mail\.example", message.message_id)
    date = message.get("Date")
    assert date is not None
    parsed = email.utils.parsedate_to_datetime(date)
    assert parsed.tzinfo is not None


def test_message_ids_are_unique() -> None:
    ids = {Message.build(sender="a@x.example", to="b@y.example").message_id for _ in range(20)}
    assert len(ids) == 20


@pytest.mark.parametrize("given_id", ["<id.1@x.example>", "id.1@x.example", " <id.1@x.example> "])
def test_explicit_message_id(given_id: str) -> None:
    message = Message.build(sender="a@x.example", to="b@y.example", message_id=given_id)
    assert message.message_id == "id.1@x.example"
    assert message.get_all("Message-ID") == ["<id.1@x.example>"]


def test_explicit_date() -> None:
    when = dt.datetime(2024, 2, 29, 13, 5, 9, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    message = Message.build(sender="a@x.example", to="b@y.example", date=when)
    assert message.get("Date") == "Thu, 29 Feb 2024 13:05:09 +0200"


def test_headers_from_mapping_and_pairs() -> None:
    message = Message.build(
        sender="a@x.example",
        to="b@y.example",
        headers=[("X-Tag", "one"), ("X-Tag", "two"), ("Message-ID", "<mine@x.example>")],
    )
    assert message.get_all("X-Tag") == ["one", "two"]
    assert message.message_id == "mine@x.example"
    mapped = Message.build(sender="a@x.example", headers={"X-One": "1", "X-Two": "2"})
    assert [name for name, _ in mapped.headers if name.startswith("X-")] == ["X-One", "X-Two"]


def test_header_with_non_ascii_value_is_encoded() -> None:
    message = Message.build(sender="a@x.example", headers={"X-Note": "naïve café"})
    assert message.as_bytes().isascii()
    assert str(parse_back(message)["X-Note"]) == "naïve café"


@pytest.mark.parametrize(
    ("value", "name", "address"),
    [
        pytest.param("a@x.example", "", "a@x.example", id="bare"),
        pytest.param("Alice <a@x.example>", "Alice", "a@x.example", id="name-addr"),
        pytest.param('"Doe, Jane" <j@x.example>', "Doe, Jane", "j@x.example", id="quoted-name"),
        pytest.param(("Bob <3", "b@x.example"), "Bob <3", "b@x.example", id="pair"),
        pytest.param(Address.parse("c@X.example"), "", "c@x.example", id="address"),
        pytest.param(
            ("Ann", Address.parse("d@x.example")), "Ann", "d@x.example", id="pair-address"
        ),
    ],
)
def test_address_forms(value: Any, name: str, address: str) -> None:
    message = Message.build(sender="s@x.example", to=[value])
    (header_address,) = parse_back(message)["To"].addresses
    assert header_address.display_name == name
    assert header_address.addr_spec == address
    assert message.get_addresses("To") == (Address.parse(address),)


def test_reply_to_and_cc() -> None:
    message = Message.build(
        sender="s@x.example",
        to="t@x.example",
        cc=["c1@x.example", "c2@x.example"],
        reply_to=("Help", "help@x.example"),
    )
    assert message.get_addresses("Cc") == (
        Address.parse("c1@x.example"),
        Address.parse("c2@x.example"),
    )
    assert message.get_addresses("Reply-To") == (Address.parse("help@x.example"),)
    many = Message.build(sender="s@x.example", reply_to=["r1@x.example", "r2@x.example"])
    assert len(many.get_addresses("Reply-To")) == 2


def test_bcc_is_never_on_the_wire_of_a_built_message() -> None:
    message = Message.build(
        sender="s@x.example", to="t@x.example", bcc=["h1@x.example", ("H", "h2@x.example")]
    )
    assert message.bcc == (Address.parse("h1@x.example"), Address.parse("h2@x.example"))
    assert "bcc" not in wire_field_names(message.as_bytes())
    assert b"h1@x.example" not in message.as_bytes()
    assert message.get_all("Bcc") == ["h1@x.example, H <h2@x.example>"]


INJECTION_FIELDS = [
    "sender",
    "sender-name",
    "to",
    "to-name",
    "cc",
    "bcc",
    "reply_to",
    "subject",
    "header-name",
    "header-value",
    "message_id",
    "attachment-name",
    "attachment-type",
]


def build_with(field: str, value: str) -> Message:
    """Build a message with ``value`` placed in the build() field ``field``."""
    kwargs: dict[str, Any] = {"sender": "s@x.example", "to": ["t@x.example"]}
    if field == "sender":
        kwargs["sender"] = f"s{value}@x.example"
    elif field == "sender-name":
        kwargs["sender"] = (f"Name{value}", "s@x.example")
    elif field == "to":
        kwargs["to"] = [f"Name{value} <t@x.example>"]
    elif field == "to-name":
        kwargs["to"] = [(f"N{value}", "t@x.example")]
    elif field == "cc":
        kwargs["cc"] = [f"c@x.example{value}"]
    elif field == "bcc":
        kwargs["bcc"] = [f"{value}b@x.example"]
    elif field == "reply_to":
        kwargs["reply_to"] = f"r@x.example{value}"
    elif field == "subject":
        kwargs["subject"] = f"Hello{value}Bcc: victim@x.example"
    elif field == "header-name":
        kwargs["headers"] = {f"X-A{value}": "v"}
    elif field == "header-value":
        kwargs["headers"] = {"X-A": f"v{value}X-B: w"}
    elif field == "message_id":
        kwargs["message_id"] = f"a{value}@x.example"
    elif field == "attachment-name":
        kwargs["attachments"] = [(f"a{value}.txt", b"x")]
    elif field == "attachment-type":
        kwargs["attachments"] = [("a.txt", b"x", f"text/plain{value}")]
    else:  # pragma: no cover - a typo in the test table
        raise AssertionError(field)
    return Message.build(**kwargs)


@pytest.mark.parametrize("char", ["\r", "\n", "\r\n", "\0"], ids=["cr", "lf", "crlf", "nul"])
@pytest.mark.parametrize("field", INJECTION_FIELDS)
def test_injection_is_refused(field: str, char: str) -> None:
    with pytest.raises(MessageError, match="CR, LF, NUL"):
        build_with(field, char)


@pytest.mark.parametrize("field", INJECTION_FIELDS)
def test_injection_fixture_builds_without_the_bad_character(field: str) -> None:
    # The table above must fail because of the character, not the fixture.
    message = build_with(field, "" if field not in ("subject", "header-value") else " ")
    assert message.size > 0


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        pytest.param({"to": ["not an address"]}, InvalidAddress, id="bad-to"),
        pytest.param({"sender": "a@"}, InvalidAddress, id="bad-sender"),
        pytest.param({"bcc": "x@@y"}, InvalidAddress, id="bad-bcc"),
        pytest.param({"to": [("a", "b", "c")]}, MessageError, id="triple"),
        pytest.param({"to": [42]}, MessageError, id="not-an-address"),
        pytest.param({"headers": {"Subject": "x"}}, MessageError, id="managed-header"),
        pytest.param({"headers": {"Bad Name": "x"}}, MessageError, id="space-in-name"),
        pytest.param({"headers": {"X-Ünï": "x"}}, MessageError, id="non-ascii-name"),
        pytest.param({"headers": {"X:Y": "x"}}, MessageError, id="colon-in-name"),
        pytest.param(
            {"headers": {"Message-ID": "<a@b>"}, "message_id": "c@d"},
            MessageError,
            id="message-id-twice",
        ),
        pytest.param(
            {"headers": {"Date": "x"}, "date": dt.datetime.now(dt.UTC)},
            MessageError,
            id="date-twice",
        ),
        pytest.param({"message_id": "no-at-sign"}, MessageError, id="bad-message-id"),
        pytest.param({"message_id": "a b@c"}, MessageError, id="space-in-message-id"),
        pytest.param({"date": dt.datetime(2024, 1, 1)}, MessageError, id="naive-date"),
        pytest.param({"attachments": [("a", b"x", "nonsense")]}, MessageError, id="bad-type"),
        pytest.param({"attachments": [("a", "text")]}, MessageError, id="str-data"),
        pytest.param({"attachments": ["a"]}, MessageError, id="bad-attachment"),
    ],
)
def test_build_refuses(kwargs: dict[str, Any], error: type[Exception]) -> None:
    arguments: dict[str, Any] = {"sender": "s@x.example", "to": ["t@x.example"], **kwargs}
    with pytest.raises(error):
        Message.build(**arguments)


# -- from_email ----------------------------------------------------------------


def test_from_email_strips_bcc_and_normalizes() -> None:
    source = EmailMessage()
    source["From"] = "a@x.example"
    source["To"] = "b@x.example"
    source["Bcc"] = "hidden@x.example"
    source["Subject"] = "Hi"
    source.set_content("line one\nline two\n")
    message = Message.from_email(source)
    assert message.bcc == (Address.parse("hidden@x.example"),)
    assert "bcc" not in wire_field_names(message.as_bytes())
    assert BARE_CR_OR_LF.search(message.as_bytes()) is None
    assert parse_back(message).get_content() == "line one\nline two\n"


def test_from_email_takes_legacy_messages_and_returns_ours_unchanged() -> None:
    legacy = email.message_from_string("From: a@x.example\nSubject: old\n\nbody\n")
    message = Message.from_email(legacy)
    assert message.get("Subject") == "old"
    assert message.as_bytes().endswith(b"\r\n\r\nbody\r\n")
    assert Message.from_email(message) is message


# -- from_file -----------------------------------------------------------------


def big_body_lines(count: int) -> Iterator[bytes]:
    endings = (b"\n", b"\r\n", b"\r")
    for number in range(count):
        yield b"line %07d of a large message body, some padding text here" % number
        yield endings[number % 3]


def test_from_file_streams_a_large_file(tmp_path: Path) -> None:
    path = tmp_path / "large.eml"
    with path.open("wb") as out:
        out.write(b"From: a@x.example\nBcc: hidden@x.example\nSubject: big\n\n")
        out.writelines(big_body_lines(120_000))  # about 7 MB
    file_size = path.stat().st_size
    assert file_size > 6_000_000

    tracemalloc.start()
    try:
        message = Message.from_file(path)
        largest = 0
        total = 0
        for piece in message.chunks(65536):
            largest = max(largest, len(piece))
            total += len(piece)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert largest <= 65536
    assert total == message.size
    # Never the whole file: a few chunks' worth of buffers at most.
    assert peak < 1_000_000
    assert peak < file_size // 6

    in_memory = Message.from_bytes(path.read_bytes())
    assert message.size == in_memory.size
    assert b"".join(message.chunks()) == in_memory.as_bytes()
    assert message.bcc == (Address.parse("hidden@x.example"),)


def test_from_file_notices_a_changed_file(tmp_path: Path) -> None:
    path = tmp_path / "m.eml"
    path.write_bytes(b"Subject: x\n\nbody\n")
    message = Message.from_file(path)
    path.write_bytes(b"Subject: x\n\nbody that grew\n")
    with pytest.raises(MessageError, match="changed"):
        list(message.chunks())


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"X: " + b"y" * (MAX_HEADER_BYTES + 1), id="huge"),
    ],
)
def test_from_file_refuses(content: bytes, tmp_path: Path) -> None:
    path = tmp_path / "bad.eml"
    path.write_bytes(content)
    with pytest.raises(MessageError):
        Message.from_file(path)


def test_repr_is_short() -> None:
    message = Message.build(sender="a@x.example", text="x" * 10_000, message_id="m@x.example")
    assert repr(message) == f"<Message message_id='m@x.example' size={message.size}>"


# -- properties ----------------------------------------------------------------

field_names = st.sampled_from(["Subject", "X-Test", "To", "Bcc", "bcc", "Resent-Bcc", "Comments"])
field_values = st.text(
    st.characters(codec="utf-8", exclude_characters="\r\n\0\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"),
    max_size=30,
)
endings = st.sampled_from([b"\n", b"\r\n", b"\r"])
local_parts = st.from_regex(r"[a-z0-9]{1,8}(\.[a-z0-9]{1,8}){0,2}", fullmatch=True)
domains = st.from_regex(r"[a-z][a-z0-9]{0,7}\.(example|test|org)", fullmatch=True)
addresses = st.builds(
    lambda local, domain: Address.parse(f"{local}@{domain}"), local_parts, domains
)


@st.composite
def raw_messages(draw: st.DrawFn) -> bytes:
    """Messages with assorted fields, line endings and arbitrary body bytes."""
    out = bytearray()
    for _ in range(draw(st.integers(0, 6))):
        name = draw(field_names)
        if name.lower().endswith("bcc"):
            value = ", ".join(str(a) for a in draw(st.lists(addresses, min_size=1, max_size=3)))
        else:
            value = draw(field_values)
        out += name.encode() + b": " + value.encode() + draw(endings)
        if draw(st.booleans()):
            out += b" continued" + draw(endings)
    out += draw(endings)
    out += draw(st.binary(max_size=300))
    return bytes(out or b"X: y")


@given(raw=raw_messages(), size=st.integers(2, 200))
def test_property_chunks_are_normalized_and_add_up(raw: bytes, size: int) -> None:
    message = Message.from_bytes(raw)
    pieces = list(message.chunks(size))
    assert all(0 < len(p) <= size for p in pieces)
    for piece in pieces:
        assert BARE_CR_OR_LF.search(piece) is None
    wire = message.as_bytes()
    assert b"".join(pieces) == wire
    assert sum(len(p) for p in pieces) == message.size == len(wire)
    assert not {"bcc", "resent-bcc"} & set(wire_field_names(wire))


@given(raw=st.binary(min_size=1, max_size=400), size=st.integers(2, 100))
def test_property_any_bytes_are_normalized(raw: bytes, size: int) -> None:
    try:
        message = Message.from_bytes(raw)
    except InvalidAddress:
        return  # only a Bcc field with a bad address may refuse arbitrary bytes
    wire = message.as_bytes()
    assert BARE_CR_OR_LF.search(wire) is None
    assert b"".join(message.chunks(size)) == wire
    assert len(wire) == message.size
    if b"bcc" not in raw.lower():
        # Normalization only completes line endings; it never drops other bytes.
        assert wire.replace(b"\r\n", b"") == re.sub(rb"\r\n|\r|\n", b"", raw)


@given(raw=raw_messages(), size=st.integers(2, 5000))
def test_property_from_file_agrees_with_from_bytes(raw: bytes, size: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "m.eml"
        path.write_bytes(raw)
        from_file = Message.from_file(path)
        from_bytes = Message.from_bytes(raw)
        assert b"".join(from_file.chunks(size)) == from_bytes.as_bytes()
        assert from_file.size == from_bytes.size
        assert from_file.headers == from_bytes.headers
        assert from_file.bcc == from_bytes.bcc


@given(
    to=st.lists(addresses, max_size=3),
    bcc=st.lists(addresses, min_size=1, max_size=3),
    subject=field_values,
)
def test_property_bcc_never_on_the_wire(
    to: list[Address], bcc: list[Address], subject: str
) -> None:
    message = Message.build(sender="s@x.example", to=to, bcc=bcc, subject=subject, text="t")
    assert message.bcc == tuple(bcc)
    wire = message.as_bytes()
    assert "bcc" not in wire_field_names(wire)
    assert message.get_addresses("Bcc") == tuple(bcc)
    for address in bcc:
        if address not in to:
            alone = rb"(?<![\w.@-])" + re.escape(str(address).encode()) + rb"(?![\w.-])"
            assert re.search(alone, wire) is None


@given(
    field=st.sampled_from(INJECTION_FIELDS),
    char=st.sampled_from(list("\r\n\0\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")),
    prefix=st.text(st.characters(codec="ascii", categories=["L", "N"]), max_size=5),
)
def test_property_control_characters_are_refused(field: str, char: str, prefix: str) -> None:
    with pytest.raises(MessageError):
        build_with(field, prefix + char)


@given(text=st.text(max_size=200), subject=field_values)
def test_property_built_text_round_trips(text: str, subject: str) -> None:
    text = text.replace("\r", "").replace("\x00", "")
    try:
        message = Message.build(sender="s@x.example", subject=subject, text=text)
    except MessageError:
        # Lone surrogates cannot be encoded; nothing else may fail.
        assert any(0xD800 <= ord(c) <= 0xDFFF for c in text + subject)
        return
    assert message.as_bytes().isascii()
    parsed = parse_back(message)
    body = parsed.get_content().replace("\r\n", "\n")
    assert body.rstrip("\n") == text.rstrip("\n")


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"filename": "a\r\nX-B: c", "data": b""}, id="crlf-filename"),
        pytest.param(
            {"filename": "a", "data": b"", "content_type": "text/x\nY: z"}, id="crlf-type"
        ),
        pytest.param({"filename": "a", "data": b"", "content_type": "text"}, id="no-subtype"),
        pytest.param({"filename": "a", "data": "text"}, id="str-data"),
    ],
)
def test_attachment_validates_at_construction(kwargs: dict[str, Any]) -> None:
    with pytest.raises(MessageError):
        Attachment(**kwargs)


def test_attachment_guesses_content_type() -> None:
    assert Attachment(filename="a.csv", data=b"").resolved_content_type() == "text/csv"
    assert Attachment(filename="a", data=b"").resolved_content_type() == "application/octet-stream"
    given_type = Attachment(filename="a.csv", data=b"", content_type="text/plain")
    assert given_type.resolved_content_type() == "text/plain"


# -- the direct writer against the email package ---------------------------------------

FIXED: dict[str, Any] = {
    "date": dt.datetime(2024, 2, 29, 13, 5, 9, tzinfo=dt.UTC),
    "message_id": "fixed.1@x.example",
}


@contextmanager
def general_path_only() -> Iterator[None]:
    """Make Message.build take the email-package path for every message."""

    def refuse(cls: type[Message], /, **kwargs: Any) -> Message:
        raise _mime.Unsupported("forced by the test")

    with mock.patch.object(Message, "_build_direct", classmethod(refuse)):
        yield


@contextmanager
def direct_path_only() -> Iterator[None]:
    """Fail the test if Message.build touches the email package."""
    with mock.patch("mailrelay.message.MIMEPart", side_effect=AssertionError("general path")):
        yield


def both_paths(**kwargs: Any) -> tuple[Message, Message, bool]:
    """Build the same message as build() chooses and through the email package.

    Returns both and whether build() chose the direct writer.
    """
    arguments = {**FIXED, **kwargs}
    with mock.patch("mailrelay.message.MIMEPart", wraps=MIMEPart) as general_used:
        chosen = Message.build(**arguments)
    with general_path_only():
        general = Message.build(**arguments)
    return chosen, general, not general_used.called


def readable(message: Message, *, addresses: bool = True) -> list[tuple[str, object]]:
    """What a reader sees in a message: decoded fields and decoded leaves, in order.

    With ``addresses=False`` the contents of address fields are left out.
    """
    parsed = parse_back(message)
    seen: list[tuple[str, object]] = []
    for part in parsed.walk():
        for name, value in part.items():
            if hasattr(value, "addresses"):
                shown: object = (
                    [(a.display_name, a.addr_spec) for a in value.addresses] if addresses else None
                )
            elif name.lower() == "content-type":
                shown = (part.get_content_type(), part.get_param("charset"))
            elif name.lower() == "content-transfer-encoding":
                continue  # the direct writer may pick the other of QP and base64
            else:
                shown = str(value)
            seen.append((name, shown))
        if part.is_multipart():
            continue
        if part.get_content_maintype() == "text":
            seen.append(("content", part.get_content().replace("\r\n", "\n")))
        else:
            seen.append(("content", part.get_payload(decode=True)))
    return seen


def boundaries(wire: bytes) -> list[bytes]:
    return re.findall(rb'boundary="([^"]+)"', wire)


def same_boundaries(wire: bytes, other: bytes) -> tuple[bytes, bytes]:
    """``wire`` with its boundaries renamed to those of ``other``, and ``other``.

    Both are unfolded: the email package's boundaries are long enough to push
    the parameter onto a line of its own, and it lets a folded address list's
    line reach 79 characters with its comma where the direct writer keeps to 78.
    """
    for mine, theirs in zip(boundaries(wire), boundaries(other), strict=True):
        wire = wire.replace(mine, theirs)
    return (
        re.sub(rb"\r\n(?=[ \t])", b"", wire),
        re.sub(rb"\r\n(?=[ \t])", b"", other),
    )


EXACT_CASES = [
    pytest.param({"to": "b@y.example", "subject": "Hello", "text": "Hi\n"}, id="text"),
    pytest.param({"to": ["b@y.example"], "text": "no final newline"}, id="newline-added"),
    pytest.param({"to": "b@y.example", "html": "<p>x</p>"}, id="html"),
    pytest.param({"to": "b@y.example", "text": "t", "html": "<b>h</b>"}, id="alternative"),
    pytest.param({}, id="empty"),
    pytest.param(
        {"to": "b@y.example", "text": "a\r\nb\rc\n\n", "subject": "x" * 60 + " " + "y" * 60},
        id="line-ends-and-folded-subject",
    ),
    pytest.param(
        {
            "sender": ("Alice Smith", "a@x.example"),
            "to": ['"Doe, J" <j@x.example>', ("a.b", "c@bücher.example"), "X <x@x.example>"],
            "cc": [f"user{n}@example.org" for n in range(8)],
            "bcc": "hidden@x.example",
            "reply_to": ("Help", "help@x.example"),
        },
        id="addresses-folded",
    ),
    pytest.param(
        {"headers": [("X-Campaign", "autumn"), ("x-tag", "one two"), ("X-Tag", "3")]},
        id="custom-headers",
    ),
    pytest.param(
        {
            "text": "t",
            "html": "<p>h</p>",
            "attachments": [("a b.pdf", b"%PDF" * 40), ("d.bin", b"\0\xff", "image/png")],
        },
        id="mixed",
    ),
    pytest.param({"attachments": [("résumé.bin", b"x")]}, id="attachment-rfc2231"),
]


@pytest.mark.parametrize("kwargs", EXACT_CASES)
def test_direct_writer_matches_the_email_package_byte_for_byte(kwargs: dict[str, Any]) -> None:
    # ASCII text with short lines: the direct writer makes the very bytes the
    # email package makes, boundaries apart.
    kwargs = {"sender": "a@x.example", **kwargs}
    with direct_path_only():
        direct = Message.build(**FIXED, **kwargs)
    with general_path_only():
        general = Message.build(**FIXED, **kwargs)
    mine, theirs = same_boundaries(direct.as_bytes(), general.as_bytes())
    assert mine == theirs
    assert len(boundaries(direct.as_bytes())) == len(boundaries(general.as_bytes()))
    if not boundaries(direct.as_bytes()):
        assert direct.headers == general.headers
    assert direct.bcc == general.bcc
    assert [name for name, _ in direct.headers] == [name for name, _ in general.headers]
    assert (direct.needs_8bitmime, direct.needs_smtputf8) == (False, False)
    if "to" in kwargs:
        assert Envelope.from_message(direct) == Envelope.from_message(general)


READS_THE_SAME_CASES = [
    pytest.param(
        {
            "sender": ("Zoë Ünïcode", "zoe@bücher.example"),
            "to": [("Ελένη", "eleni@x.example")],
            "subject": "Grüße aus Köln",
            "text": "Grüße\n",
            "html": "<p>Grüße</p>",
        },
        id="rfc2047",
    ),
    pytest.param({"subject": "日本語の件名" * 8, "text": "本文\n" * 50}, id="long-cjk"),
    pytest.param({"subject": "é" + "a" * 200, "text": "é" + "x" * 300}, id="long-latin"),
    pytest.param({"text": "x" * 100 + "\n" + "line  \n=\t\n"}, id="qp-ascii"),
    pytest.param({"headers": {"X-Note": "naïve café " * 9 + "fin"}}, id="custom-non-ascii"),
    pytest.param({"text": "--=_0\n--===============0==\n"}, id="boundary-like-text"),
]


@pytest.mark.parametrize("kwargs", READS_THE_SAME_CASES)
def test_direct_writer_reads_back_as_the_email_package(kwargs: dict[str, Any]) -> None:
    kwargs = {"sender": "a@x.example", "to": "b@y.example", **kwargs}
    with direct_path_only():
        direct = Message.build(**FIXED, **kwargs)
    with general_path_only():
        general = Message.build(**FIXED, **kwargs)
    assert readable(direct) == readable(general)
    assert [name for name, _ in direct.headers] == [name for name, _ in general.headers]
    assert direct.as_bytes().isascii()
    check_line_lengths(direct.as_bytes())


def check_line_lengths(wire: bytes) -> None:
    """RFC 5322 §2.1.1 and RFC 2047 §2 line limits on a 7-bit wire form."""
    head, _, body = wire.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        assert len(line) <= (76 if b"=?" in line else 78), line
        assert line.strip(b" \t"), "a header line of white space only"
    for word in re.findall(rb"=\?[^?]+\?[qQbB]\?[^?]*\?=", head):
        assert len(word) <= 75
    for line in body.split(b"\r\n"):
        assert len(line) <= 78, line


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"subject": "=?utf-8?q?x?="}, id="encoded-word-lookalike"),
        pytest.param({"subject": ""}, id="empty-subject"),
        pytest.param({"subject": " padded "}, id="padded-subject"),
        pytest.param({"subject": "tab\there"}, id="tab"),
        pytest.param({"subject": "w" * 100}, id="unfoldable-word"),
        pytest.param({"headers": {"Resent-From": "r@x.example"}}, id="structured-custom"),
        pytest.param({"headers": {"Sender": "s@x.example"}}, id="sender-field"),
        pytest.param({"to": [("  spaced  name", "b@y.example")]}, id="spaced-name"),
        pytest.param({"to": [("é" * 40, "b@y.example")]}, id="long-encoded-name"),
        pytest.param({"to": "zoë@x.example"}, id="smtputf8"),
        pytest.param({"attachments": [("a.txt", b"x", "Text/Plain")]}, id="type-case"),
        pytest.param({"attachments": [('q"uote.txt', b"x")]}, id="quote-in-filename"),
        pytest.param({"attachments": [("f" * 80 + ".txt", b"x")]}, id="long-filename"),
        pytest.param(
            {"date": dt.datetime(2024, 1, 1, tzinfo=dt.timezone(dt.timedelta(seconds=30)))},
            id="odd-zone",
        ),
    ],
)
def test_unusual_input_takes_the_general_path(kwargs: dict[str, Any]) -> None:
    arguments = {"sender": "a@x.example", "to": "b@y.example", **FIXED, **kwargs}
    with mock.patch("mailrelay.message.MIMEPart", wraps=MIMEPart) as general:
        message = Message.build(**arguments)
    assert general.called
    with general_path_only():
        assert message.as_bytes() == Message.build(**arguments).as_bytes() or boundaries(
            message.as_bytes()
        )


header_text = st.text(
    st.one_of(
        st.sampled_from(list("aZ09 .,;:<>@()\"\\'=?_-!*+/é€Ωü例😀")),
        st.characters(codec="utf-8", exclude_categories=["Cc", "Cs", "Zl", "Zp"]),
    ),
    max_size=60,
)
body_text = st.text(
    st.one_of(
        st.sampled_from(list("ab =\t.\n\r-é例😀")),
        st.characters(codec="utf-8", exclude_categories=["Cs"]),
    ),
    max_size=200,
).map(lambda text: text.replace("\x00", ""))
names = st.one_of(st.just(""), header_text.map(lambda text: text[:30]))
mailboxes = st.tuples(names, addresses)
filenames = st.text(st.sampled_from(list("abc. -_;=()'%*~éü例")), min_size=1, max_size=20)


build_arguments = st.fixed_dictionaries(
    {
        "sender": mailboxes,
        "to": st.lists(mailboxes, max_size=3),
        "cc": st.lists(mailboxes, max_size=2),
        "bcc": st.lists(addresses, max_size=2),
        "subject": st.none() | header_text,
        "text": st.none() | body_text,
        "html": st.none() | body_text,
        "headers": st.lists(
            st.tuples(st.sampled_from(["X-A", "List-Id", "x-b", "X-" + "N" * 60]), header_text),
            max_size=2,
        ),
        "attachments": st.lists(st.tuples(filenames, st.binary(max_size=100)), max_size=2),
    }
)


@given(kwargs=build_arguments)
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_property_direct_and_general_paths_read_the_same(kwargs: dict[str, Any]) -> None:
    to, cc, bcc, subject = kwargs["to"], kwargs["cc"], kwargs["bcc"], kwargs["subject"]
    try:
        chosen, general, was_direct = both_paths(**kwargs)
    except MessageError:
        with pytest.raises(MessageError), general_path_only():
            Message.build(**FIXED, **kwargs)
        return
    # Address fields are compared with the input below: the email package can
    # lose a mailbox (see test_email_package_can_drop_a_mailbox_the_direct_writer_keeps).
    assert readable(chosen, addresses=False) == readable(general, addresses=False)
    assert [name for name, _ in chosen.headers] == [name for name, _ in general.headers]
    assert chosen.bcc == general.bcc == tuple(bcc)
    assert (chosen.needs_8bitmime, chosen.needs_smtputf8) == (False, False)
    assert chosen.as_bytes().isascii()
    event("direct writer" if was_direct else "general path")
    if was_direct:
        # (The email package itself lets some lines with encoded-words reach 77.)
        check_line_lengths(chosen.as_bytes())
    if to or cc or bcc:
        assert Envelope.from_message(chosen) == Envelope.from_message(general)
    if (to or cc or bcc) and was_direct:
        # The recorded addresses agree with what the header fields say. (Not
        # always so for the email package: it can write a display name full of
        # odd white space so that reading the field back loses a mailbox, which
        # is why build() records the addresses instead of re-reading them.)
        assert Envelope.from_message(chosen) == Envelope.from_message(
            attrs.evolve(chosen, envelope_addresses=None)
        )
    if was_direct:
        # What the reader sees is what was given.
        parsed = parse_back(chosen)
        if subject is not None:
            assert str(parsed["Subject"]) == subject
        for field, given in (("From", [kwargs["sender"]]), ("To", to), ("Cc", cc)):
            if given:
                shown = [(a.display_name, a.addr_spec) for a in parsed[field].addresses]
                assert shown == [(name, address.smtp_path(False)) for name, address in given]
        text = kwargs["text"]
        if text is not None:
            part = parsed.get_body(("plain",))
            assert part is not None
            # Line ends as bytes.splitlines() sees them; a final one is added.
            lines = text.encode().splitlines()
            expected = (b"\n".join(lines) + b"\n").decode()
            assert part.get_content().replace("\r\n", "\n") == expected


def test_email_package_can_drop_a_mailbox_the_direct_writer_keeps() -> None:
    # Found by the property above: folding this list, the email package (3.11)
    # encodes the comma after the second mailbox as an encoded-word, so a
    # reader sees two mailboxes. The direct writer folds after the comma.
    to = [
        "000000.0.0@a000.example",
        ("0\U00010000", "00000000.0.0@a0000.example"),
        "0@a.example",
    ]
    direct, general, was_direct = both_paths(sender="0@a.example", to=to)
    assert was_direct
    specs = [a.addr_spec for a in parse_back(direct)["To"].addresses]
    assert specs == ["000000.0.0@a000.example", "00000000.0.0@a0000.example", "0@a.example"]
    # The envelope has all three either way: build() records the addresses.
    assert len(Envelope.from_message(general).recipients) == 3


# -- reading address fields ------------------------------------------------------------

address_tokens = st.sampled_from(
    [
        "a@x.example",
        "B.c@y.example",
        "Name",
        "J. Doe",
        "Zoë",
        " ",
        ",",
        "<",
        ">",
        '"',
        "(",
        ")",
        ":",
        ";",
        "@",
        "\\",
        "[1.2.3.4]",
        "=?utf-8?q?x?=",
        ".",
        "\t",
    ]
)


@given(st.lists(address_tokens, max_size=12).map("".join))
def test_property_simple_address_reading_agrees_with_the_email_package(value: str) -> None:
    simple = _simple_addresses(value)
    if simple is not None:
        assert simple == _parsed_addr_specs(value)


@pytest.mark.parametrize(
    ("value", "specs"),
    [
        pytest.param("a@x.example", ["a@x.example"], id="bare"),
        pytest.param("Bob <b@x.example>, c@y.example", ["b@x.example", "c@y.example"], id="list"),
        pytest.param("J. Doe <j@x.example>", ["j@x.example"], id="obsolete-phrase"),
        pytest.param('"Doe, J" <j@x.example>', None, id="quoted"),
        pytest.param("team: a@x.example;", None, id="group"),
        pytest.param("a@x.example (comment)", None, id="comment"),
        pytest.param("a@[127.0.0.1]", None, id="literal"),
        pytest.param("a@x.example,,b@x.example", None, id="empty-item"),
        # The email package decodes an encoded-word even inside an addr-spec.
        pytest.param("=?utf-8?q?x?=a@x.example", None, id="encoded-word-in-addr-spec"),
        pytest.param("=?utf-8?q?J=C3=B6rg?= <j@x.example>", None, id="encoded-word-name"),
    ],
)
def test_simple_addresses(value: str, specs: list[str] | None) -> None:
    assert _simple_addresses(value) == specs
    if specs is not None:
        assert _parsed_addr_specs(value) == specs


# -- cached wire form ------------------------------------------------------------------


def test_in_memory_wire_form_is_one_object() -> None:
    message = Message.build(sender="a@x.example", to="b@y.example", text="hi")
    wire = message.as_bytes()
    assert message.as_bytes() is wire
    (only,) = message.chunks()
    assert only is wire
    assert message.size == len(wire)


def test_reading_the_message_id_changes_neither_equality_nor_hash() -> None:
    # message_id is read from the headers once and kept; the kept value is no part of the
    # message's identity.
    raw = b"From: a@example.com\r\nMessage-ID: <x@example.com>\r\n\r\nhi\r\n"
    first, second = Message.from_bytes(raw), Message.from_bytes(raw)
    assert first.message_id == "x@example.com"
    assert first.message_id == "x@example.com"
    assert first == second
    assert hash(first) == hash(second)
    assert second.message_id == "x@example.com"
    assert Message.from_bytes(b"From: a@example.com\r\n\r\nhi\r\n").message_id is None


message_ids = st.from_regex(r"[a-zA-Z0-9.$%_+-]{1,40}@[a-z0-9.-]{1,30}", fullmatch=True)


@given(kwargs=build_arguments, message_id=st.none() | message_ids, bracketed=st.booleans())
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_property_built_message_id_is_the_one_its_header_holds(
    kwargs: dict[str, Any], message_id: str | None, bracketed: bool
) -> None:
    # Message.build keeps the Message-ID it writes (the direct writer does), so that
    # message_id need not scan the headers: the kept value must be what the scan finds.
    given_id = f"<{message_id}>" if bracketed and message_id is not None else message_id
    message = Message.build(**kwargs, message_id=given_id)
    scanned = attrs.evolve(message)  # an equal message that has kept nothing: scans
    reparsed = Message.from_bytes(message.as_bytes())
    assert message.message_id == scanned.message_id == reparsed.message_id
    assert message.message_id is not None
    if message_id is not None:
        assert message.message_id == message_id
    assert message == scanned
    assert hash(message) == hash(scanned)


@pytest.mark.parametrize("path", ["direct", "general"])
def test_a_message_id_in_custom_headers_is_read_from_them(path: str) -> None:
    kwargs: dict[str, Any] = {
        "sender": "a@x.example",
        "to": "b@y.example",
        "headers": {"Message-ID": " <given@x.example> "},
    }
    if path == "general":
        with general_path_only():
            message = Message.build(**kwargs)
    else:
        message = Message.build(**kwargs)
    assert message.message_id == "given@x.example"


# -- address fields the email package writes wrongly ------------------------------------------


@pytest.mark.parametrize("sender", ["ann@a.example", "jörg@a.example"])  # 7-bit and UTF-8 paths
@pytest.mark.parametrize(
    "to",
    [
        # A long first line (the field folds) and a local part that needs its quotes: the
        # email package wrote "." without them and could not read its own field back.
        ["0" * 64 + "@a.example", '"."@a.aa'],
        ['"."@a.aa'],
        ['Bjørn Ø <"."@a.aa>', "x" * 60 + "@b.example"],
        ['Jo "x" <"a..b"@c.example>', '"a b"@c.example'],
    ],
)
def test_build_writes_quoted_local_parts_that_read_back(sender: str, to: list[str]) -> None:
    message = Message.build(sender=sender, to=to, cc=['"."@cc.example'], subject="quoted")
    expected = [str(parse_box(item)) for item in to]
    recipients = [str(r.address) for r in Envelope.from_message(message).recipients]
    assert recipients == [*expected, '"."@cc.example']
    head = message.as_bytes().split(b"\r\n\r\n", 1)[0]
    assert all(len(line) <= 998 for line in head.split(b"\r\n"))
    for address in expected:
        local = address.rpartition("@")[0]
        assert local.encode() in head  # the quotes are kept on the wire


def parse_box(item: str) -> Address:
    """The address of a ``name <addr>`` or bare addr-spec item."""
    inner = item.rpartition("<")[2].rstrip(">") if item.endswith(">") else item
    return Address.parse(inner)


def test_the_direct_writer_keeps_an_unfoldable_mailbox_on_a_long_line() -> None:
    # RFC 5322 §2.1.1: 78 is a SHOULD; a mailbox without white space cannot fold anyway.
    field = _mime.address_list("To", [("", "0" * 64 + "@a.example"), ("", '"."@a.aa')])
    first, second = field.split("\r\n")
    assert len(first) == 79
    assert second == ' "."@a.aa'
    # Anything that could fold is left to the general path; 998 is the hard limit.
    with pytest.raises(_mime.Unsupported):
        _mime.address_list("To", [("A long display name " * 4, "a@b.example")])
    with pytest.raises(_mime.Unsupported):
        _mime.address_list("To", [("", "x" * 990 + "@b.example")])


# Local parts that need their quotes only for their dots, or because they are empty.
QUOTED_FOR_DOTS = ['""', '"."', '"john..doe"', '".john"', '"john."', '"jörg..doe"']


@pytest.mark.parametrize("local", QUOTED_FOR_DOTS)
def test_address_fields_keep_the_quotes_a_local_part_needs(local: str) -> None:
    # The email package reads '"john..doe"' as john..doe: read from its parts, requoted.
    address = Address.parse(f"{local}@example.com")
    hidden = Address.parse(f"{local}@bcc.example")
    raw = (
        b"From: a@example.com\r\nTo: Name <" + str(address).encode() + b">\r\nBcc: "
        + str(hidden).encode() + b"\r\n\r\nHi\r\n"
    )  # fmt: skip
    message = Message.from_bytes(raw)
    assert message.bcc == (hidden,)
    assert [r.address for r in Envelope.from_message(message).recipients] == [address, hidden]


@pytest.mark.parametrize(
    ("sender", "to", "name"),
    [
        ("jörg@example.com", '"."@bücher.example', ""),
        ("jörg@example.com", '""@bücher.example', "Bjørn, Ø"),
        ("ann@example.com", '"jö..b"@example.com', 'say "hi"'),
        ("ann@example.com", '"."@example.com', "Bjørn \\ Ø"),
    ],
)
def test_build_writes_quoted_utf8_addresses_and_any_display_name(
    sender: str, to: str, name: str
) -> None:
    address = Address.parse(to)
    message = Message.build(sender=sender, to=[(name, to)], subject="quoted", text="hi\n")
    assert [r.address for r in Envelope.from_message(message).recipients] == [address]
    # Read as text: the email package reads the raw UTF-8 of RFC 6532 fields from bytes as
    # surrogate escapes.
    parsed = email.message_from_string(
        message.as_bytes().decode("utf-8"), policy=email.policy.SMTPUTF8
    )
    (mailbox,) = parsed["To"].addresses
    assert mailbox.display_name == name
    assert mailbox.username == address.local_part
