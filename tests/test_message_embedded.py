"""A whole message attached (message/rfc822, a forwarded ".eml") goes unencoded, as RFC 2046
§5.2.1 requires ("no encoding other than 7bit, 8bit, or binary is permitted"), in both
writers; data that cannot go unencoded is refused as such a type, never sent base64."""

from __future__ import annotations

import base64
import email
import email.policy
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from email.message import EmailMessage
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay import _mime
from mailrelay.envelope import Envelope
from mailrelay.errors import MessageError
from mailrelay.message import Attachment, Message
from mailrelay.options import TLS, Timeouts
from tests.peers.aiosmtpd_server import AiosmtpdFactory
from tests.test_message import FIXED, general_path_only
from tests.transport.helpers import FLAVOURS, Flavour, send_with

INNER = b"From: x@example.com\nTo: y@example.org\nSubject: hi\n\nbody line\n.\n--not-a-boundary\n"
INNER_8BIT = "From: x@example.com\r\nSubject: cafe\r\n\r\nbody \u00e9\r\n".encode()
#: UTF-8 in the header fields: that message is message/global (RFC 6532 §3.7).
INNER_GLOBAL = "From: j\u00f6rg@example.net\r\nSubject: caf\u00e9\r\n\r\nbody\r\n".encode()
WRITERS: dict[str, Callable[[], AbstractContextManager[None]]] = {
    "chosen": nullcontext,
    "general": general_path_only,
}


def crlf(data: bytes) -> bytes:
    return b"\r\n".join(data.splitlines()) + b"\r\n"


def build(writer: str, *attachments: Attachment, **kwargs: Any) -> Message:
    with WRITERS[writer]():
        return Message.build(
            sender="a@example.com",
            to="b@example.org",
            text="see attached",
            attachments=attachments,
            **{**FIXED, **kwargs},
        )


def attached(message: Message) -> list[EmailMessage]:
    parsed = email.message_from_bytes(message.as_bytes(), policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return list(parsed.iter_attachments())


def inner_bytes(part: EmailMessage) -> bytes:
    """The attached message's bytes as they are on the wire."""
    payload = part.get_payload()
    assert isinstance(payload, list)
    (inner,) = payload
    assert isinstance(inner, email.message.Message)
    return bytes(inner.as_bytes(policy=email.policy.SMTP))


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize(
    "attachment",
    [
        Attachment(filename="forwarded.eml", data=INNER),  # guessed from the name
        Attachment(filename="forwarded", data=INNER, content_type="message/rfc822"),
        Attachment(
            filename="x.bin", data=INNER.replace(b"\n", b"\r\n"), content_type="message/rfc822"
        ),
    ],
)
def test_an_attached_message_goes_unencoded(writer: str, attachment: Attachment) -> None:
    message = build(writer, attachment)
    (part,) = attached(message)
    assert part.get_content_type() == "message/rfc822"
    assert part["Content-Transfer-Encoding"] == "7bit"
    assert inner_bytes(part) == crlf(INNER)
    assert crlf(INNER) in message.as_bytes()  # byte for byte, line breaks made CRLF
    assert not message.needs_8bitmime


def test_both_writers_write_the_same_part() -> None:
    attachment = Attachment(filename="forwarded.eml", data=INNER)
    direct = build("chosen", attachment).as_bytes()
    general = build("general", attachment).as_bytes()

    def part_of(wire: bytes) -> bytes:
        start = wire.index(b"Content-Type: message/rfc822")
        return wire[start : wire.index(b"\r\n--", start + 1)]

    assert part_of(direct) == part_of(general)


@pytest.mark.parametrize("writer", WRITERS)
def test_an_8bit_message_goes_8bit_and_asks_for_8bitmime(writer: str) -> None:
    message = build(writer, Attachment(filename="fwd.eml", data=INNER_8BIT))
    (part,) = attached(message)
    assert part["Content-Transfer-Encoding"] == "8bit"
    assert inner_bytes(part) == INNER_8BIT
    assert message.needs_8bitmime


@pytest.mark.parametrize("writer", WRITERS)
def test_a_message_with_utf8_header_fields_is_message_global(writer: str) -> None:
    guessed = Attachment(filename="fwd.eml", data=INNER_GLOBAL)
    assert guessed.resolved_content_type() == "message/global"
    message = build(writer, guessed)
    (part,) = attached(message)
    assert part.get_content_type() == "message/global"
    assert part["Content-Transfer-Encoding"] == "base64"  # RFC 6532 §3.7 allows it
    wire = message.as_bytes()
    start = wire.index(b'filename="fwd.eml"\r\n\r\n') + len(b'filename="fwd.eml"\r\n\r\n')
    assert base64.b64decode(wire[start : wire.index(b"\r\n--", start)]) == INNER_GLOBAL
    assert not message.needs_8bitmime
    with pytest.raises(MessageError, match="message/global"):
        Attachment(filename="fwd.eml", data=INNER_GLOBAL, content_type="message/rfc822")


@pytest.mark.parametrize(
    "data",
    [b"From: x@example.com\n\nnul \0 here\n", b"From: x@example.com\n\n" + b"x" * 999 + b"\n"],
)
def test_data_that_cannot_go_unencoded(data: bytes) -> None:
    """Guessed from the name: sent as application/octet-stream (base64). Given
    explicitly: refused, with what to do instead."""
    guessed = Attachment(filename="odd.eml", data=data)
    assert guessed.resolved_content_type() == "application/octet-stream"
    (part,) = attached(build("chosen", guessed))
    assert part["Content-Transfer-Encoding"] == "base64"
    assert part.get_content() == data
    with pytest.raises(MessageError, match="application/octet-stream"):
        Attachment(filename="odd.eml", data=data, content_type="message/rfc822")


def test_998_octet_lines_still_go_unencoded() -> None:
    data = b"From: x@example.com\n\n" + b"x" * 998 + b"\n"
    (part,) = attached(build("chosen", Attachment(filename="long.eml", data=data)))
    assert part["Content-Transfer-Encoding"] == "7bit"


@pytest.mark.parametrize(
    ("kwargs", "said"),
    [
        ({"content_type": "multipart/mixed"}, "boundary parameter"),
        ({"content_type": "Multipart/Alternative"}, "boundary parameter"),
        ({"content_type": "message/rfc822", "content_id": "fwd@x.example"}, "cannot be inline"),
        ({"content_type": "message/partial", "data": b"a\0b"}, "unencoded"),
    ],
)
def test_types_that_cannot_work_are_refused(kwargs: dict[str, Any], said: str) -> None:
    with pytest.raises(MessageError, match=said):
        Attachment(**{"filename": "f", "data": INNER, **kwargs})


def test_an_inline_eml_is_an_ordinary_inline_part() -> None:
    """Guessed message/rfc822 with a content id: no type could show it inline, so it
    goes as application/octet-stream, as any unknown inline file."""
    part = Attachment(filename="fwd.eml", data=INNER, content_id="fwd@x.example")
    assert part.resolved_content_type() == "application/octet-stream"


_LINE = st.text(
    st.characters(min_codepoint=32, max_codepoint=0x2FF, exclude_characters="\x7f"),
    max_size=60,
)


@given(
    headers=st.lists(_LINE, max_size=4),
    body=st.lists(_LINE, max_size=8),
    newline=st.sampled_from(["\n", "\r\n", "\r"]),
    writer=st.sampled_from(list(WRITERS)),
)
def test_property_any_message_reads_back_as_sent(
    headers: list[str], body: list[str], newline: str, writer: str
) -> None:
    """Whatever the attached message holds (delimiter-like lines too), it comes back
    exactly, CRLF-normalized, never base64."""
    # Header fields ASCII (non-ASCII ones make it message/global), the body anything.
    fields = [value.encode("ascii", "replace").decode() for value in headers]
    lines = [f"X-H{n}: {value}" for n, value in enumerate(fields)] + ["", *body]
    lines += ["--" + (body[0] if body else "b"), "."]
    data = newline.join(lines).encode() + newline.encode()
    message = build(writer, Attachment(filename="m.eml", data=data))
    (part,) = attached(message)
    assert part["Content-Transfer-Encoding"] == ("7bit" if data.isascii() else "8bit")
    start = message.as_bytes().index(b'filename="m.eml"\r\n\r\n') + len(b'filename="m.eml"\r\n\r\n')
    assert message.as_bytes()[start:].startswith(crlf(data))
    assert _mime.embedded_body(data) == (crlf(data), "7bit" if data.isascii() else "8bit")


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("data", [INNER, INNER_8BIT])
def test_sent_through_a_real_server_unchanged(
    flavour: Flavour, make_aiosmtpd: AiosmtpdFactory, data: bytes
) -> None:
    server = make_aiosmtpd(starttls=False, auth=False)
    message = build("chosen", Attachment(filename="fwd.eml", data=data))
    result = send_with(
        flavour,
        message,
        Envelope.from_message(message),
        host=server.host,
        port=server.port,
        tls=TLS.NONE,
        timeouts=Timeouts.all(10),
    )
    assert result.ok
    (received,) = server.messages
    assert received.content == message.as_bytes()
    assert ("BODY=8BITMIME" in received.mail_options) == (not data.isascii())
    (part,) = attached(Message.from_bytes(received.content))
    assert inner_bytes(part) == crlf(data)
