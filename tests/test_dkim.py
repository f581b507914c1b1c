"""DKIM signing (mailrelay.dkim) and the signing transports, checked by an independent
verifier: dkimpy, fetching the public keys from the test DNS server (unbound), where
``tests/peers/unbound.py`` publishes the public test keys of ``tests/data/dkim``."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import functools
import logging
import re
import ssl
import subprocess
import sys
import time
import tracemalloc
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import attrs
import dkim  # type: ignore[import-untyped]  # dkimpy ships no type information
import dns.exception
import dns.resolver
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.dkim import (
    DEFAULT_HEADERS,
    DKIMSigner,
    _BodyCanonicalizer,
    canonicalize_body,
    canonicalize_header,
)
from mailrelay.envelope import Envelope
from mailrelay.errors import ConfigurationError, DeliveryError, MessageError
from mailrelay.message import Message
from mailrelay.options import Timeouts
from mailrelay.results import DeliveryResult, Outcome
from mailrelay.testing import strategies
from mailrelay.tracker.async_engine import AsyncDeliveryTracker
from mailrelay.tracker.engine import DeliveryTracker
from mailrelay.tracker.sqlite_store import SQLiteStore
from mailrelay.tracker.store import State
from mailrelay.transport import AsyncSMTPTransport, MemoryTransport, SMTPTransport
from mailrelay.transport.base import BatchItem
from mailrelay.transport.signing import AsyncSigningTransport, SigningTransport
from tests.peers.aiosmtpd_server import AiosmtpdServer
from tests.peers.postfix import PostfixInstance
from tests.peers.unbound import DKIM_ED25519, DKIM_RSA_1024, DKIM_RSA_2048, UnboundServer
from tests.transport.test_docs import python_blocks, server_blocks

pytestmark = pytest.mark.unbound

T = TypeVar("T")

KEYS = Path(__file__).parent / "data" / "dkim"
DOMAIN = "dkim.test"
#: selector -> (key file, the record tests/peers/unbound.py publishes for it)
SELECTORS = {
    "sel-rsa": ("rsa2048.pem", DKIM_RSA_2048),
    "sel-ed": ("ed25519.pem", DKIM_ED25519),
    "sel-rsa1024": ("rsa1024.pem", DKIM_RSA_1024),
}
CANONICALIZATIONS = ("relaxed/relaxed", "simple/simple", "relaxed/simple", "simple/relaxed")
#: A fixed signing time in the past (dkimpy refuses t= in the future and x= in the past,
#: measured by the real clock).
SIGNED_AT = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on a fresh event loop."""
    return asyncio.run(coro)


def pem(selector: str) -> bytes:
    return (KEYS / SELECTORS[selector][0]).read_bytes()


def signer(selector: str = "sel-rsa", **options: Any) -> DKIMSigner:
    options.setdefault("now", lambda: SIGNED_AT)
    return DKIMSigner(domain=DOMAIN, selector=selector, private_key=pem(selector), **options)


DNSFunc = Callable[..., bytes | None]


@pytest.fixture(scope="session")
def dnsfunc(unbound: UnboundServer) -> DNSFunc:
    """dkimpy's TXT lookup, answered by the test DNS server (cached: the zone is static)."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [unbound.host]
    resolver.port = unbound.port
    resolver.lifetime = 5.0

    @functools.cache
    def lookup(name: bytes) -> bytes | None:
        try:
            answer = resolver.resolve(name.decode("ascii"), "TXT")
        except dns.exception.DNSException:
            return None
        return b"".join(b"".join(record.strings) for record in answer)

    def txt(name: bytes, timeout: float = 5) -> bytes | None:
        return lookup(name)

    return txt


def on_the_wire(data: bytes) -> bytes:
    """What a server receives for wire bytes: the protocol layer ends the data with CRLF
    when it does not end so (RFC 5321 §4.1.1.4)."""
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def verifies(data: bytes, dnsfunc: DNSFunc) -> bool:
    return bool(dkim.verify(on_the_wire(data), dnsfunc=dnsfunc))


def signature_field(data: bytes) -> bytes:
    """The first DKIM-Signature field of wire bytes, with its continuation lines."""
    match = re.match(rb"DKIM-Signature:.*?\r\n(?![ \t])", data, re.DOTALL)
    assert match is not None
    return match.group()


def tags(field: bytes) -> dict[str, str]:
    value = re.sub(rb"\s+", b"", field.partition(b":")[2]).decode("ascii")
    return dict(tag.split("=", 1) for tag in value.split(";") if tag)


# -- messages ------------------------------------------------------------------------

UTF8_BODY = "Grüße, ça va? 日本語\n".encode()
SHAPES: dict[str, bytes] = {
    "plain": (
        b"From: Ann <ann@dkim.test>\nTo: bob@example.net\nSubject: Hello\n"
        b"Date: Fri, 02 Jan 2026 03:04:05 +0000\nMessage-ID: <1@dkim.test>\n\nHi Bob.\n"
    ),
    "folded headers": (
        b"From: Ann <ann@dkim.test>\nTo: bob@example.net,\n  carol@example.net\n"
        b"Subject: a subject\n\tfolded over\n   three lines\n\n"
        b"Hello\n"
    ),
    "white space": (
        b"From:ann@dkim.test\nSubject:   spaced \t out  \t \nTo:bob@example.net \n\n"
        b"trailing  \t\nmiddle   runs\t\there\n \t \n\tindented\nend\n"
    ),
    "empty body": b"From: ann@dkim.test\nTo: bob@example.net\n\n",
    "no body, no empty line": b"From: ann@dkim.test\nTo: bob@example.net\n",
    "trailing empty lines": b"From: ann@dkim.test\nTo: bob@example.net\n\nbody\n\n\n \n\t\n\n",
    "only empty lines": b"From: ann@dkim.test\nTo: bob@example.net\n\n\n\n\n",
    "no final line end": b"From: ann@dkim.test\nTo: bob@example.net\n\nthe end, unended  ",
    "bare CR and LF": b"From: ann@dkim.test\rTo: bob@example.net\n\r\nline one\rline two\n",
    "8-bit body": (
        b"From: ann@dkim.test\nTo: bob@example.net\nContent-Type: text/plain; charset=utf-8\n"
        b"Content-Transfer-Encoding: 8bit\n\n" + UTF8_BODY + b"raw \xff\xfe\x80 bytes\n"
    ),
    "UTF-8 headers": (
        "From: Zoë Example <zoë@dkim.test>\nTo: jörg@bücher.example\n"
        "Subject: Grüße  aus\n Köln\nContent-Type: text/plain; charset=utf-8\n\nHallo\n"
    ).encode(),
    "dot lines": b"From: ann@dkim.test\nTo: bob@example.net\n\n.\n..\n.leading dot\n",
    "repeated fields": (
        b"From: ann@dkim.test\nTo: bob@example.net\nX-Tag: one\nTo: carol@example.net\n"
        b"Subject: first\nSubject: second\n\nbody\n"
    ),
    "Bcc removed": b"From: ann@dkim.test\nBcc: hidden@example.net\nTo: bob@example.net\n\nhi\n",
}


def built_message() -> Message:
    return Message.build(
        sender=("Zoë Example", "zoe@dkim.test"),
        to=["bob@example.net"],
        cc="carol@example.org",
        bcc=["audit@dkim.test"],
        subject="Grüße — the report",
        text="Hello,\nthe report is attached.\n\n",
        html="<p>Hello,<br>the report is attached.</p>",
        attachments=[("report.pdf", b"%PDF-1.4\n" + bytes(range(256)) * 8, "application/pdf")],
        headers={"List-Unsubscribe": "<mailto:unsub@dkim.test>"},
    )


# -- independent verification ----------------------------------------------------------


def test_the_zone_serves_each_signers_record(dnsfunc: DNSFunc, unbound: UnboundServer) -> None:
    for selector, (_file, record) in SELECTORS.items():
        key_signer = signer(selector)
        assert key_signer.dns_name == f"{selector}._domainkey.{DOMAIN}"
        assert key_signer.dns_txt == record
        assert dnsfunc(f"{key_signer.dns_name}.".encode()) == record.encode("ascii")
    assert unbound.queries_for("sel-rsa._domainkey.dkim.test") >= 1


@pytest.mark.parametrize("canonicalization", CANONICALIZATIONS)
@pytest.mark.parametrize("selector", ["sel-rsa", "sel-ed"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=str)
def test_signed_messages_verify(
    shape: str, selector: str, canonicalization: str, dnsfunc: DNSFunc
) -> None:
    message = Message.from_bytes(SHAPES[shape])
    signed = signer(selector, canonicalization=canonicalization).sign(message)
    data = signed.as_bytes()
    assert data.endswith(message.as_bytes())
    assert verifies(data, dnsfunc)
    # The verifier really checked our signature: a changed From fails.
    assert not verifies(data.replace(b"\r\nFrom:", b"\r\nFrom:X", 1), dnsfunc)


@pytest.mark.parametrize("canonicalization", CANONICALIZATIONS)
@pytest.mark.parametrize("selector", list(SELECTORS))
def test_built_messages_verify(selector: str, canonicalization: str, dnsfunc: DNSFunc) -> None:
    message = built_message()
    signed = signer(selector, canonicalization=canonicalization, oversign=True).sign(message)
    assert verifies(signed.as_bytes(), dnsfunc)
    assert b"audit@dkim.test" not in signed.as_bytes()


@pytest.mark.parametrize("canonicalization", ["relaxed/relaxed", "simple/simple"])
@pytest.mark.parametrize("selector", ["sel-rsa", "sel-ed"])
def test_big_file_message_verifies(
    selector: str, canonicalization: str, dnsfunc: DNSFunc, tmp_path: Path
) -> None:
    path = tmp_path / "big.eml"
    line = b"a line with  runs of \t white space and a trailing one \n"
    with path.open("wb") as out:
        out.write(b"From: ann@dkim.test\nTo: bob@example.net\nSubject: big\n\n")
        for index in range(2 * 1024 * 1024 // len(line) + 1):
            out.write(line if index % 100 else b"8-bit \xc3\xa9t\xc3\xa9 line\r\n\n")
        out.write(b"\n\n\n")
    message = Message.from_file(path)
    assert message.size > 2 * 1024 * 1024
    signed = signer(selector, canonicalization=canonicalization).sign(message)
    assert "file=" in repr(signed)  # still file-backed: the body was not copied
    assert signed.size == message.size + len(signature_field(signed.as_bytes()))
    assert verifies(signed.as_bytes(), dnsfunc)


def test_signing_a_file_streams_it(tmp_path: Path) -> None:
    path = tmp_path / "huge.eml"
    with path.open("wb") as out:
        out.write(b"From: ann@dkim.test\nTo: bob@example.net\n\n")
        out.write(b"0123456789 abcdef\t \n" * (16 * 1024 * 1024 // 20))
    message = Message.from_file(path)
    signing = signer("sel-ed")
    tracemalloc.start()
    try:
        signing.sign(message)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert message.size > 16_000_000
    assert peak < 4_000_000  # measured: about 1.3 MB


@pytest.mark.parametrize("selector", ["sel-rsa", "sel-ed", "sel-rsa1024"])
def test_header_only_and_message_bytes_agree(selector: str, dnsfunc: DNSFunc) -> None:
    message = built_message()
    key_signer = signer(selector)
    header = key_signer.signature_header(message)
    assert header.startswith("DKIM-Signature: v=1; ")
    assert header.endswith("\r\n")
    assert key_signer.sign(message).as_bytes() == header.encode("ascii") + message.as_bytes()
    assert verifies(header.encode("ascii") + message.as_bytes(), dnsfunc)


def test_expired_signatures_fail(dnsfunc: DNSFunc) -> None:
    message = Message.from_bytes(SHAPES["plain"])
    old = signer(expire_after=dt.timedelta(days=1)).sign(message).as_bytes()
    fields = tags(signature_field(old))
    assert int(fields["x"]) == int(fields["t"]) + 86400 == int(SIGNED_AT.timestamp()) + 86400
    assert not verifies(old, dnsfunc)  # SIGNED_AT + 1 day is long past
    fresh = signer(now=lambda: dt.datetime.now(dt.UTC), expire_after=dt.timedelta(days=1))
    assert verifies(fresh.sign(message).as_bytes(), dnsfunc)


def test_unknown_selector_fails(dnsfunc: DNSFunc) -> None:
    other = DKIMSigner(domain=DOMAIN, selector="nokey", private_key=pem("sel-rsa"))
    assert not verifies(other.sign(Message.from_bytes(SHAPES["plain"])).as_bytes(), dnsfunc)


# -- what is signed -----------------------------------------------------------------


def test_tags_and_signed_fields() -> None:
    message = Message.from_bytes(SHAPES["repeated fields"])
    field = signature_field(signer(identity="news@mail.dkim.test").sign(message).as_bytes())
    values = tags(field)
    assert values["v"] == "1"
    assert values["a"] == "rsa-sha256"
    assert values["c"] == "relaxed/relaxed"
    assert values["d"] == DOMAIN
    assert values["s"] == "sel-rsa"
    assert values["t"] == str(int(SIGNED_AT.timestamp()))
    assert values["i"] == "news@mail.dkim.test"
    assert "x" not in values
    assert "l" not in values
    # Only the configured fields that are present, each occurrence (X-Tag is not listed).
    assert values["h"] == "from:to:to:subject:subject"
    assert len(base64.b64decode(values["bh"])) == 32
    assert len(base64.b64decode(values["b"])) == 256


def test_ed25519_signature_is_64_bytes() -> None:
    field = signature_field(signer("sel-ed").sign(Message.from_bytes(SHAPES["plain"])).as_bytes())
    assert tags(field)["a"] == "ed25519-sha256"
    assert len(base64.b64decode(tags(field)["b"])) == 64


def test_oversigning_locks_out_added_fields(dnsfunc: DNSFunc) -> None:
    message = Message.from_bytes(SHAPES["plain"])
    plain = signer().sign(message).as_bytes()
    locked = signer(oversign=True).sign(message).as_bytes()
    names = tags(signature_field(locked))["h"].split(":")
    assert names[:5] == ["from", "to", "subject", "date", "message-id"]
    assert names[5:] == [name.lower() for name in DEFAULT_HEADERS]

    def add_subject(data: bytes) -> bytes:
        # A second Subject above the signed one: bottom-up selection still finds the
        # original, so only the oversigned entry notices the addition.
        field = signature_field(data)
        return field + b"Subject: SPECIAL OFFER\r\n" + data[len(field) :]

    assert verifies(add_subject(plain), dnsfunc)
    assert not verifies(add_subject(locked), dnsfunc)
    # A field outside the list may be added to either.
    unlisted = b"X-Mailer: added later\r\n"
    assert verifies(
        signature_field(plain) + unlisted + plain[len(signature_field(plain)) :], dnsfunc
    )


def test_from_is_always_signed() -> None:
    few = signer(headers=["Subject", "subject", "X-Tag"])
    assert few.headers == ("From", "Subject", "X-Tag")
    field = signature_field(few.sign(Message.from_bytes(SHAPES["repeated fields"])).as_bytes())
    assert tags(field)["h"] == "from:x-tag:subject:subject"


def test_signing_keeps_envelope_and_blind_recipients() -> None:
    for message in (Message.from_bytes(SHAPES["Bcc removed"]), built_message()):
        signed = signer().sign(message)
        assert signed.bcc == message.bcc
        assert Envelope.from_message(signed) == Envelope.from_message(message)
        assert signed.message_id == message.message_id
        assert signed.headers[0][0] == "DKIM-Signature"
        assert signed.headers[1:] == message.headers
        assert signed.size == len(signed.as_bytes())
        assert signed.needs_smtputf8 == message.needs_smtputf8
        assert signed.needs_8bitmime == message.needs_8bitmime


def test_signature_field_is_folded() -> None:
    message = Message.from_bytes(SHAPES["repeated fields"])
    long = signer(
        oversign=True,
        identity="a.rather.long.local.part.for.folding@deep.sub.domain.of.dkim.test",
        expire_after=dt.timedelta(days=7),
    )
    for key_signer in (signer(), signer("sel-ed"), long):
        header = key_signer.signature_header(message)
        assert header.endswith("\r\n")
        lines = header[:-2].split("\r\n")
        assert len(lines) > 1
        assert all(len(line) <= 78 for line in lines)
        assert all(line.startswith("\t") and line.strip() for line in lines[1:])


def test_signing_is_deterministic_for_a_fixed_clock() -> None:
    message = built_message()
    for selector in ("sel-rsa", "sel-ed"):
        assert signer(selector).sign(message) == signer(selector).sign(message)


def test_idn_domain_and_selector_become_a_labels() -> None:
    idn = DKIMSigner(
        domain="Bücher.Example.",
        selector="schlüssel",
        private_key=pem("sel-ed"),
        now=lambda: SIGNED_AT,
    )
    assert idn.domain == "xn--bcher-kva.example"
    assert idn.selector == "xn--schlssel-95a"
    assert idn.dns_name == "xn--schlssel-95a._domainkey.xn--bcher-kva.example"
    values = tags(signature_field(idn.sign(Message.from_bytes(SHAPES["plain"])).as_bytes()))
    assert (values["d"], values["s"]) == ("xn--bcher-kva.example", "xn--schlssel-95a")


def test_identity_local_part_is_quoted_printable() -> None:
    value = signer(identity="zoë;x=y@dkim.test").sign(Message.from_bytes(SHAPES["plain"]))
    assert tags(signature_field(value.as_bytes()))["i"] == "zo=C3=AB=3Bx=3Dy@dkim.test"


# -- tampering (Hypothesis) -------------------------------------------------------------

_WSP = st.sampled_from([" ", "\t", "  ", " \t ", "\t\t"])
_WORD = st.text(
    alphabet=st.one_of(
        st.characters(min_codepoint=0x21, max_codepoint=0x7E), st.sampled_from("éßü日本€")
    ),
    min_size=1,
    max_size=10,
)


@st.composite
def field_values(draw: st.DrawFn) -> str:
    """A header value with runs of white space and folds (RFC 5322 §2.2.3)."""
    parts = [draw(st.sampled_from(["", " ", "  ", "\t"]))]
    for _ in range(draw(st.integers(0, 6))):
        parts.append(draw(_WORD))
        separator = draw(_WSP)
        if draw(st.integers(0, 4)) == 0:
            separator = "\r\n" + separator  # a fold: a continuation line starts with WSP
        parts.append(separator)
    return "".join(parts)


_BODY_LINE = st.lists(
    st.one_of(
        st.binary(min_size=1, max_size=8).map(lambda data: bytes(b | 0x80 for b in data)),
        st.sampled_from([b" ", b"\t", b"  \t", b".", b"text", b"From x", b"--"]),
        st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=12).map(
            str.encode
        ),
    ),
    max_size=8,
).map(b"".join)


@st.composite
def raw_messages(draw: st.DrawFn) -> bytes:
    """Messages with one From field (for tampering), others around it, and bodies full of
    white space, empty lines and 8-bit octets; line ends CRLF, LF or CR."""
    names = ["To", "Cc", "Subject", "Date", "Message-ID", "X-Custom", "Received", "subject", "TO"]
    others = draw(st.lists(st.sampled_from(names), max_size=5))
    position = draw(st.integers(0, len(others)))
    fields = [f"{name}:{draw(field_values())}" for name in others]
    fields.insert(position, f"From:{draw(field_values())}x@dkim.test")
    body = draw(st.lists(_BODY_LINE, max_size=10))
    body += [b""] * draw(st.integers(0, 3))
    lines = [field.encode("utf-8") for field in fields] + [b"", *body]
    end = draw(st.sampled_from([b"\r\n", b"\n", b"\r"]))
    data = end.join(lines)
    return data if draw(st.booleans()) else data + end


@given(
    raw=raw_messages(),
    selector=st.sampled_from(["sel-rsa", "sel-ed"]),
    canonicalization=st.sampled_from(CANONICALIZATIONS),
    oversign=st.booleans(),
)
def test_property_signed_verifies_and_tampering_fails(
    raw: bytes, selector: str, canonicalization: str, oversign: bool, dnsfunc: DNSFunc
) -> None:
    message = Message.from_bytes(raw)
    signed = signer(selector, canonicalization=canonicalization, oversign=oversign).sign(message)
    data = on_the_wire(signed.as_bytes())
    assert verifies(data, dnsfunc)
    # A changed From field fails (From is always signed) ...
    assert b"\r\nFrom:" in data
    assert not verifies(data.replace(b"\r\nFrom:", b"\r\nFrom:X", 1), dnsfunc)
    # ... and so does a changed body.
    head_end = data.find(b"\r\n\r\n") + 4
    tampered = data[:head_end] + b"X" + data[head_end:] if head_end > 3 else data + b"\r\nX\r\n"
    assert not verifies(tampered, dnsfunc)


@given(
    message=strategies.messages(eight_bit=True, utf8_headers=True, max_size=8192),
    selector=st.sampled_from(["sel-rsa", "sel-ed"]),
    canonicalization=st.sampled_from(CANONICALIZATIONS),
)
def test_property_generated_messages_verify(
    message: Message, selector: str, canonicalization: str, dnsfunc: DNSFunc
) -> None:
    """mailrelay.testing's messages: parsed edge cases (dot lines, 998-octet lines, mixed
    line ends, Bcc) and built ones (IDN and UTF-8 addresses, attachments)."""
    signed = signer(selector, canonicalization=canonicalization).sign(message)
    data = on_the_wire(signed.as_bytes())
    assert verifies(data, dnsfunc)
    assert not verifies(data.replace(b"\r\nFrom:", b"\r\nFrom:X", 1), dnsfunc)


# -- canonicalization (RFC 6376 §3.4) -------------------------------------------------

# RFC 6376 §3.4.5, the worked example: two header fields and a body.
EXAMPLE_HEADERS = [b"A: X\r\n", b"B : Y\t\r\n\tZ  \r\n"]
EXAMPLE_BODY = b" C \r\nD \t E\r\n\r\n\r\n"


def test_rfc6376_example_relaxed() -> None:
    assert [canonicalize_header(f, "relaxed") for f in EXAMPLE_HEADERS] == [
        b"a:X\r\n",
        b"b:Y Z\r\n",
    ]
    assert canonicalize_body(EXAMPLE_BODY, "relaxed") == b" C\r\nD E\r\n"


def test_rfc6376_example_simple() -> None:
    assert [canonicalize_header(f, "simple") for f in EXAMPLE_HEADERS] == EXAMPLE_HEADERS
    assert canonicalize_body(EXAMPLE_BODY, "simple") == b" C \r\nD \t E\r\n"


@pytest.mark.parametrize(
    ("body", "simple", "relaxed"),
    [
        (b"", b"\r\n", b""),  # §3.4.3: an empty body is one CRLF; §3.4.4: it stays empty
        (b"\r\n", b"\r\n", b""),
        (b"\r\n\r\n\r\n", b"\r\n", b""),
        (b" \t \r\n", b" \t \r\n", b""),  # relaxed: a line of white space is an empty line
        (b"a\r\n\r\nb\r\n\r\n", b"a\r\n\r\nb\r\n", b"a\r\n\r\nb\r\n"),  # inner ones stay
        (b"a  \t b \r\n", b"a  \t b \r\n", b"a b\r\n"),
        (b"\t lead\r\n", b"\t lead\r\n", b" lead\r\n"),
        (b"unended", b"unended\r\n", b"unended\r\n"),  # the CRLF SMTP adds
        (b"unended \t", b"unended \t\r\n", b"unended\r\n"),
        (b"8bit \xff\xa0 \r\n", b"8bit \xff\xa0 \r\n", b"8bit \xff\xa0\r\n"),  # only SP/HTAB
    ],
)
def test_body_canonicalization(body: bytes, simple: bytes, relaxed: bytes) -> None:
    assert canonicalize_body(body, "simple") == simple
    assert canonicalize_body(body, "relaxed") == relaxed


@pytest.mark.parametrize(
    ("field", "relaxed"),
    [
        (b"Subject: Hello\r\n", b"subject:Hello\r\n"),
        (b"SUBJECT:Hello   World \t\r\n", b"subject:Hello World\r\n"),
        (b"Subject \t:  \t x\r\n", b"subject:x\r\n"),
        (b"To: a,\r\n  b,\r\n\tc\r\n", b"to:a, b, c\r\n"),
        (b"X-Empty:\r\n", b"x-empty:\r\n"),
        (b"X-Empty:   \r\n", b"x-empty:\r\n"),
        ("Subject: Grüße  aus Köln\r\n".encode(), "subject:Grüße aus Köln\r\n".encode()),
    ],
)
def test_header_canonicalization(field: bytes, relaxed: bytes) -> None:
    assert canonicalize_header(field, "relaxed") == relaxed
    assert canonicalize_header(field, "simple") == field


def test_unknown_canonicalization_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown canonicalization"):
        canonicalize_body(b"", "nowsp")
    with pytest.raises(ValueError, match="unknown canonicalization"):
        canonicalize_header(b"A: b\r\n", "nowsp")


@given(
    lines=st.lists(_BODY_LINE, max_size=12),
    trailing=st.integers(0, 3),
    ended=st.booleans(),
    cuts=st.lists(st.integers(0, 400), max_size=6),
)
def test_property_body_canonicalization_matches_dkimpy_and_streams(
    lines: list[bytes], trailing: int, ended: bool, cuts: list[int]
) -> None:
    body = b"\r\n".join(lines + [b""] * trailing) + (b"\r\n" if ended else b"")
    wire = on_the_wire(body) if body else body
    for method, theirs in (
        ("simple", dkim.canonicalization.Simple),
        ("relaxed", dkim.canonicalization.Relaxed),
    ):
        ours = canonicalize_body(body, method)
        assert ours == theirs.canonicalize_body(wire)
        # Fed in arbitrary pieces (never between CR and LF: the wire form's chunks are not
        # cut there either), the streaming signer hashes the same bytes.
        pieces = []
        start = 0
        for cut in sorted({c for c in cuts if 0 < c < len(body)}):
            if body[cut - 1 : cut + 1] != b"\r\n":
                pieces.append(body[start:cut])
                start = cut
        pieces.append(body[start:])
        out: list[bytes] = []
        canon = _BodyCanonicalizer(relaxed=method == "relaxed", sink=out.append)
        for piece in pieces:
            canon.feed(piece)
        canon.finish()
        assert b"".join(out) == ours


# -- the signing transports -----------------------------------------------------------


class ClosingMemory(MemoryTransport):
    """A MemoryTransport that records close() and aclose()."""

    closed = 0

    def close(self) -> None:
        self.closed += 1

    async def aclose(self) -> None:
        self.closed += 1


def refuse_bob(message: Message, envelope: Envelope) -> dict[str, Outcome]:
    addresses = {str(recipient.address) for recipient in envelope.recipients}
    return {"bob@example.net": Outcome.PERMANENT} if "bob@example.net" in addresses else {}


def test_signing_transport_signs_and_passes_results_through(dnsfunc: DNSFunc) -> None:
    inner = ClosingMemory(refuse_bob)
    message = Message.from_bytes(SHAPES["Bcc removed"])
    with SigningTransport(inner, signer("sel-ed")) as transport:
        result = transport.send(message)
        explicit = Envelope("bounces@dkim.test", ["carol@example.org"])
        second = transport.send(message, explicit)
        third = transport.deliver(message, explicit)
    assert inner.closed == 1
    assert [r.outcome for r in result.recipients] == [Outcome.PERMANENT, Outcome.ACCEPTED]
    assert second.ok
    assert third.ok
    (sent, envelope), (_, envelope2), (_, envelope3) = inner.outbox
    assert envelope == Envelope.from_message(message)  # Bcc recipient kept
    assert envelope2 is explicit
    assert envelope3 is explicit
    assert verifies(sent.as_bytes(), dnsfunc)
    assert "SigningTransport d=dkim.test s=sel-ed" in repr(transport)


def test_signing_transport_passes_errors_through() -> None:
    error = DeliveryError("relay unreachable", is_transient=True)

    def fail(message: Message, envelope: Envelope) -> DeliveryResult:
        raise error

    transport = SigningTransport(MemoryTransport(fail), signer())
    message = Message.from_bytes(SHAPES["plain"])
    with pytest.raises(DeliveryError) as caught:
        transport.send(message)
    assert caught.value is error
    (result,) = transport.send_many([message])
    assert result.deferred
    assert "relay unreachable" in str(result.deferred[0].reason)


def test_send_many_signs_every_message(dnsfunc: DNSFunc) -> None:
    inner = MemoryTransport()
    transport = SigningTransport(inner, signer())
    messages = [Message.from_bytes(SHAPES[shape]) for shape in ("plain", "8-bit body")]
    pair = (messages[0], Envelope(None, ["dave@example.org"]))
    items: list[BatchItem] = [messages[0], pair, messages[1]]
    assert all(result.ok for result in transport.send_many(items))
    assert all(result.ok for result in transport.send_many(item for item in items))
    assert len(inner.outbox) == 6
    for (sent, envelope), item in zip(inner.outbox, items * 2, strict=True):
        original = item if isinstance(item, Message) else item[0]
        expected = Envelope.from_message(original) if isinstance(item, Message) else item[1]
        assert envelope == expected
        assert sent.as_bytes().endswith(original.as_bytes())
        assert verifies(sent.as_bytes(), dnsfunc)


NO_FROM = b"Sender: a@dkim.test\nTo: b@example.net\n\nhi\n"


def test_send_refuses_a_message_it_cannot_sign() -> None:
    inner = MemoryTransport()
    transport = SigningTransport(inner, signer())
    no_from = Message.from_bytes(NO_FROM)
    with pytest.raises(MessageError, match="without a From field"):
        transport.send(no_from)
    with pytest.raises(MessageError, match="without a From field"):
        transport.deliver(no_from, Envelope.from_message(no_from))
    assert inner.outbox == []


def unsigned_was_refused(result: DeliveryResult) -> bool:
    # The exception itself is kept (DeliveryResult.error), not only its text.
    if not isinstance(result.error, MessageError):
        return False
    return bool(result.recipients) and all(
        r.outcome is Outcome.PERMANENT
        and r.reply is None
        and "cannot be DKIM-signed" in str(r.reason)
        and "without a From field" in str(r.reason)
        for r in result.recipients
    )


@pytest.mark.parametrize("streamed", [False, True])
def test_send_many_refuses_only_the_messages_it_cannot_sign(
    streamed: bool, dnsfunc: DNSFunc
) -> None:
    inner = MemoryTransport()
    transport = SigningTransport(inner, signer())
    no_from = Message.from_bytes(NO_FROM)
    good = Message.from_bytes(SHAPES["plain"])
    items: list[BatchItem] = [
        no_from,
        good,
        (no_from, Envelope(None, ["c@example.net", "d@example.net"])),
        good,
    ]
    results = transport.send_many(iter(items) if streamed else items)
    assert len(results) == 4
    assert unsigned_was_refused(results[0])
    assert results[1].ok
    assert results[3].ok
    assert unsigned_was_refused(results[2])
    assert [str(r.address) for r in results[2].recipients] == ["c@example.net", "d@example.net"]
    assert len(inner.outbox) == 2
    assert all(verifies(sent.as_bytes(), dnsfunc) for sent, _ in inner.outbox)
    assert [r.ok for r in transport.send_many([no_from])] == [False]


@pytest.mark.parametrize("kind", ["sequence", "iterator", "async iterable"])
def test_asend_many_refuses_only_the_messages_it_cannot_sign(kind: str) -> None:
    no_from = Message.from_bytes(NO_FROM)
    good = Message.from_bytes(SHAPES["plain"])
    items: list[BatchItem] = [good, no_from, good]

    async def stream() -> Any:
        for item in items:
            yield item

    async def scenario() -> tuple[list[DeliveryResult], int]:
        inner = ClosingMemory()
        transport = AsyncSigningTransport(inner, signer("sel-ed"))
        batch: Any = {"sequence": items, "iterator": iter(items), "async iterable": stream()}
        results = await transport.asend_many(batch[kind])
        return results, len(inner.outbox)

    results, sent = run(scenario())
    assert [r.ok for r in results] == [True, False, True]
    assert unsigned_was_refused(results[1])
    assert sent == 2


def test_a_tracker_bounces_a_message_it_cannot_sign_and_sends_the_rest(tmp_path: Path) -> None:
    # Raised from send_many, the error would put the whole batch back at every run: the
    # good message would never go, and run_pending would raise for ever.
    inner = MemoryTransport()
    tracker = DeliveryTracker(SigningTransport(inner, signer()), SQLiteStore(tmp_path / "q.db"))
    try:
        no_from = Message.from_bytes(NO_FROM)
        bad = tracker.submit(no_from, Envelope("a@dkim.test", ["b@example.net"]))
        good = tracker.submit(built_message())
        summary = tracker.run_pending()
        assert summary.delivered == 3
        assert summary.bounced == 1
        assert [r.state for r in tracker.status(bad).recipients] == [State.BOUNCED]
        (attempt,) = tracker.status(bad).recipients[0].attempts
        assert "cannot be DKIM-signed" in attempt.text
        assert all(r.state is State.DELIVERED for r in tracker.status(good).recipients)
        assert tracker.run_pending().messages == 0
    finally:
        tracker.close()
    assert len(inner.outbox) == 1


def test_async_signing_transport(dnsfunc: DNSFunc, tmp_path: Path) -> None:
    path = tmp_path / "big.eml"
    path.write_bytes(b"From: ann@dkim.test\nTo: bob@example.net\n\n" + b"x \t y\n" * 100_000)
    big = Message.from_file(path)
    small = Message.from_bytes(SHAPES["Bcc removed"])

    async def stream() -> Any:
        yield small
        yield big

    async def scenario() -> list[DeliveryResult]:
        inner = ClosingMemory()
        async with AsyncSigningTransport(inner, signer("sel-rsa")) as transport:
            results = [
                await transport.asend(small),
                await transport.adeliver(big, Envelope.from_message(big)),
            ]
            results += await transport.asend_many([small, big])
            results += await transport.asend_many(stream())
            results += await transport.asend_many(iter([small]))
        assert inner.closed == 1
        assert len(inner.outbox) == 7
        for sent, envelope in inner.outbox:
            assert verifies(sent.as_bytes(), dnsfunc)
            original = big if sent.size > big.size else small
            assert envelope == Envelope.from_message(original)
        return results

    assert all(result.ok for result in run(scenario()))


def test_tracker_over_a_signing_transport(dnsfunc: DNSFunc, tmp_path: Path) -> None:
    inner = MemoryTransport()
    tracker = DeliveryTracker(SigningTransport(inner, signer()), SQLiteStore(tmp_path / "q.db"))
    try:
        tracking_id = tracker.submit(built_message())
        tracker.run_pending()
        assert all(r.state is State.DELIVERED for r in tracker.status(tracking_id).recipients)
    finally:
        tracker.close()
    ((sent, envelope),) = inner.outbox
    assert verifies(sent.as_bytes(), dnsfunc)
    assert {str(r.address) for r in envelope.recipients} == {
        "bob@example.net",
        "carol@example.org",
        "audit@dkim.test",
    }


def test_async_tracker_over_an_async_signing_transport(dnsfunc: DNSFunc, tmp_path: Path) -> None:
    inner = MemoryTransport()
    messages = [built_message(), Message.from_bytes(SHAPES["8-bit body"])]

    async def scenario() -> None:
        tracker = AsyncDeliveryTracker(
            AsyncSigningTransport(inner, signer("sel-ed")), SQLiteStore(tmp_path / "q.db")
        )
        try:
            await tracker.asubmit_many(messages)
            summary = await tracker.arun_pending()
            assert (summary.messages, summary.delivered) == (2, 4)  # recipients: 3 + 1
        finally:
            await tracker.aclose()

    run(scenario())
    assert len(inner.outbox) == 2
    # The tracker chooses the order (by domain): match each sent message to its original.
    originals = sorted(message.as_bytes() for message in messages)
    sent = sorted(item.message.as_bytes() for item in inner.outbox)
    for data in sent:
        assert verifies(data, dnsfunc)
    assert sorted(data[len(signature_field(data)) :] for data in sent) == originals


# -- end to end: a real SMTP server -----------------------------------------------------


def smtp_args(server: AiosmtpdServer) -> dict[str, Any]:
    return {
        "host": server.host,
        "port": server.port,
        "ssl_context": ssl.create_default_context(cafile=str(server.ca_file)),
        "timeouts": Timeouts.all(10),
    }


@pytest.mark.parametrize("selector", ["sel-rsa", "sel-ed"])
def test_what_the_server_received_verifies(
    selector: str, aiosmtpd_server: AiosmtpdServer, dnsfunc: DNSFunc
) -> None:
    messages = [
        Message.from_bytes(SHAPES[s]) for s in ("dot lines", "no final line end", "UTF-8 headers")
    ]
    messages.append(built_message())
    with SigningTransport(SMTPTransport(**smtp_args(aiosmtpd_server)), signer(selector)) as smtp:
        assert smtp.send(messages[0]).ok
        assert all(result.ok for result in smtp.send_many(messages[1:]))
    received = aiosmtpd_server.messages
    assert len(received) == len(messages)
    for got, message in zip(received, messages, strict=True):
        assert dkim.verify(got.content, dnsfunc=dnsfunc)
        envelope = Envelope.from_message(message)
        assert got.mail_from == str(envelope.sender)
        assert got.rcpt_tos == tuple(str(r.address) for r in envelope.recipients)


def test_async_what_the_server_received_verifies(
    aiosmtpd_server: AiosmtpdServer, dnsfunc: DNSFunc
) -> None:
    message = built_message()

    async def send() -> DeliveryResult:
        async with AsyncSigningTransport(
            AsyncSMTPTransport(**smtp_args(aiosmtpd_server)), signer("sel-ed")
        ) as smtp:
            return await smtp.asend(message)

    assert run(send()).ok
    (got,) = aiosmtpd_server.messages
    assert dkim.verify(got.content, dnsfunc=dnsfunc)
    assert "audit@dkim.test" in got.rcpt_tos


def delivered_by_postfix(postfix: PostfixInstance, message: Message) -> bytes:
    """The Maildir copy of ``message`` (found by its Message-ID), with CRLF line ends again."""
    marker = f"<{message.message_id}>".encode()
    deadline = time.monotonic() + 15
    while not (found := [m for m in postfix.read_maildir("alice") if marker in m]):
        assert time.monotonic() < deadline, f"not delivered; log:\n{postfix.log_tail()}"
        time.sleep(0.05)
    return found[0].replace(b"\n", b"\r\n")


@pytest.mark.postfix
@pytest.mark.parametrize("chunking", [False, True])
def test_what_postfix_delivered_verifies(
    chunking: bool, postfix_clean: PostfixInstance, dnsfunc: DNSFunc
) -> None:
    # Postfix adds its trace fields on top and stores LF line ends: the signature must
    # survive a real MTA's handling, over DATA and over BDAT.
    raw = (
        "From: Ann <ann@dkim.test>\nTo: alice@mailrelay.test\nSubject: 8-bit, spaced  out \n"
        "Message-ID: <{}@dkim.test>\nContent-Type: text/plain; charset=utf-8\n"
        "Content-Transfer-Encoding: 8bit\n\n.dot first\nGr\u00fc\u00dfe \t \n\n\n"
    )
    messages = [
        Message.from_bytes(raw.format(uuid.uuid4().hex).encode()),
        Message.build(
            sender="ann@dkim.test",
            to=["alice@mailrelay.test"],
            subject=f"built {uuid.uuid4().hex}",
            text="line one\n.line two\n" * 500,
        ),
    ]
    transport = SMTPTransport(
        host=postfix_clean.host,
        port=postfix_clean.smtp_port,
        ssl_context=ssl.create_default_context(cafile=str(postfix_clean.ca_file)),
        timeouts=Timeouts.all(15),
        chunking=chunking,
    )
    with SigningTransport(transport, signer("sel-ed" if chunking else "sel-rsa")) as smtp:
        assert all(result.ok for result in smtp.send_many(messages))
    for message in messages:
        copy = delivered_by_postfix(postfix_clean, message)
        assert copy.startswith(b"Return-Path:")  # Postfix's fields came first
        assert dkim.verify(copy, dnsfunc=dnsfunc)
        head, _, body = copy.partition(b"\r\n\r\n")
        assert not dkim.verify(head + b"\r\n\r\nX" + body, dnsfunc=dnsfunc)  # can fail
    if chunking:
        assert "BDAT " in postfix_clean.log_text()


# -- the key stays secret ------------------------------------------------------------------


def key_lines(selector: str) -> list[str]:
    """The base64 lines of a PEM key (any of them showing would leak key material)."""
    return [line for line in pem(selector).decode().splitlines() if not line.startswith("-----")]


@pytest.mark.parametrize("selector", list(SELECTORS))
def test_the_key_never_shows(selector: str, caplog: pytest.LogCaptureFixture) -> None:
    key_signer = signer(selector)
    caplog.set_level(logging.DEBUG)
    key_signer.sign(Message.from_bytes(SHAPES["plain"]))
    with pytest.raises(MessageError) as caught:
        key_signer.sign(Message.from_bytes(b"To: b@example.net\n\nno from\n"))
    shown = "\n".join(
        [repr(key_signer), str(key_signer), caplog.text, str(caught.value), repr(caught.value)]
    )
    assert "DKIMSigner(domain='dkim.test'" in shown  # the repr is there ...
    assert "dkim.test" in caplog.text  # ... and the log line
    for line in key_lines(selector):
        assert line[:20] not in shown
    assert "private_key" not in repr(key_signer)


def test_a_broken_key_does_not_leak_into_the_error() -> None:
    broken = pem("sel-rsa").replace(b"MII", b"XXX", 1)
    with pytest.raises(ConfigurationError) as caught:
        DKIMSigner(domain=DOMAIN, selector="s", private_key=broken)
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__
    text = str(caught.value) + repr(caught.value)
    assert all(line[:20] not in text for line in key_lines("sel-rsa")[1:])


# -- errors --------------------------------------------------------------------------------


def ec_key() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def encrypted_key() -> bytes:
    key = serialization.load_pem_private_key(pem("sel-ed"), password=None)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"private_key": b"not a key"}, "not a PEM private key"),
        ({"private_key": "-----BEGIN PRIVATE KEY-----\nü\n"}, "not a PEM private key"),
        ({"private_key": 42}, "PEM text"),
        ({"private_key": (KEYS / "rsa512.pem").read_bytes()}, "512 bits; DKIM needs at least 1024"),
        ({"private_key": ec_key()}, "RSA or Ed25519"),
        ({"private_key": encrypted_key()}, "encrypted"),
        ({"identity": "news@example.org"}, "outside the signing domain"),
        ({"identity": "news@notdkim.test"}, "outside the signing domain"),
        ({"identity": "no-at-sign"}, "has no '@domain'"),
        ({"domain": "bad domain"}, "not a domain name"),
        ({"domain": "[127.0.0.1]"}, "address literal"),
        ({"selector": "bad_selector"}, "not a DNS name"),
        ({"selector": ""}, "non-empty"),
        ({"canonicalization": "nofws/simple"}, "simple or relaxed"),
        ({"headers": ["Sub ject"]}, "not a header field name"),
        ({"headers": "From"}, "list of field names"),
        ({"expire_after": dt.timedelta(0)}, "at least one second"),
    ],
)
def test_bad_configuration(options: dict[str, Any], match: str) -> None:
    arguments: dict[str, Any] = {"domain": DOMAIN, "selector": "s", "private_key": pem("sel-ed")}
    arguments.update(options)
    with pytest.raises(ConfigurationError, match=re.escape(match)):
        DKIMSigner(**arguments)


def test_good_configuration_variants() -> None:
    text_key = DKIMSigner(
        domain="DKIM.test", selector="S1.Mail", private_key=pem("sel-ed").decode()
    )
    assert (text_key.domain, text_key.selector, text_key.algorithm) == (
        "dkim.test",
        "s1.mail",
        "ed25519-sha256",
    )
    assert signer("sel-rsa1024").key_bits == 1024
    assert signer(canonicalization="relaxed").canonicalization == "relaxed/simple"
    assert signer(canonicalization=" Simple/Relaxed ").canonicalization == "simple/relaxed"
    assert signer(identity="@dkim.test").identity == "@dkim.test"
    assert attrs.evolve(signer(), oversign=True).oversign


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"To: b@example.net\nSubject: no from\n\nhi\n", "without a From field"),
        (b"\nbody only\n", "without a From field"),
        (b"From: a@dkim.test\nnot a field\nmore\n", "not a header field"),
    ],
)
def test_unsignable_messages(raw: bytes, match: str) -> None:
    with pytest.raises(MessageError, match=match):
        signer().sign(Message.from_bytes(raw))


def test_a_naive_clock_is_refused() -> None:
    naive = signer(now=lambda: dt.datetime(2026, 1, 1))
    with pytest.raises(ConfigurationError, match="aware datetime"):
        naive.sign(Message.from_bytes(SHAPES["plain"]))


# -- the documentation --------------------------------------------------------------------


def test_the_docs_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (Path(__file__).resolve().parents[1] / "docs" / "dkim.md").read_text(encoding="utf-8")
    blocks = python_blocks(text)
    assert len(blocks) >= 6
    monkeypatch.chdir(tmp_path)  # the examples write keys and a tracker database
    namespace: dict[str, object] = {"__name__": "docs_dkim"}
    for number, block in enumerate(blocks, start=1):
        exec(compile(block, f"dkim.md block {number}", "exec"), namespace)  # our own docs
    for number, block in enumerate(server_blocks(text), start=1):
        compile(block, f"dkim.md server block {number}", "exec")


# -- the optional dependency ----------------------------------------------------------------


def test_without_cryptography(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "sys.modules['cryptography'] = None\n"  # makes every import of it fail
        "import mailrelay, mailrelay.dkim, mailrelay.transport.signing\n"
        "try:\n"
        "    mailrelay.dkim.DKIMSigner(domain='dkim.test', selector='s', private_key=b'x')\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert 'pip install "mailrelay[dkim]"' in done.stdout


def test_importing_mailrelay_does_not_import_cryptography() -> None:
    script = (
        "import sys\n"
        "import mailrelay, mailrelay.dkim, mailrelay.transport.signing\n"
        "print('cryptography' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "False"
