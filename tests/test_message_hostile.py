"""Hostile messages: what apps hand to mailrelay from anywhere, and what goes on the wire.

Apps parse messages from untrusted sources (``Message.from_bytes``, ``Message.from_file``)
and let mailrelay derive their envelopes (``Envelope.from_message``). Whatever the bytes,
these tests hold the promises made for them: a refusal is a typed error from
:mod:`mailrelay.errors` (never a bare ``IndexError`` from the standard library's parser),
the DATA payload is dot-stuffed and terminated exactly once, no CR or LF reaches a
``MAIL`` or ``RCPT`` command, ``Bcc`` stays off the wire, and ``size`` is the length of
the wire form. A mutation fuzzer over the sisimai corpus found the regressions below.
"""

from __future__ import annotations

import pytest

from mailrelay.envelope import Envelope
from mailrelay.errors import InvalidAddress, MailRelayError
from mailrelay.message import Message

HEAD = b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: hostile\r\n"

# Address fields the standard library's header parser crashes on (IndexError in
# get_angle_addr for an unclosed "<", AttributeError when a mailbox or group follows a
# group, RecursionError in nested comments).
UNREADABLE_ADDRESS_FIELDS = [
    pytest.param(b"<", id="lone-angle"),
    pytest.param(b"Message-ID: <", id="group-then-unclosed-angle"),
    pytest.param(b"g:; d:;", id="two-groups"),
    pytest.param(b"g: a@b.example; x <k@e.example>;", id="mailbox-after-group"),
    pytest.param(b"g: a@b.example;;", id="group-then-semicolon"),
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
