"""Review 71: the DSNs the tracker generates, against hostile replies and odd envelopes.

Each test here failed before its fix: the ORCPT written with two address types; a long
word in a server's reply making a line longer than RFC 5322 §2.1.1 allows; a sender whose
local part is quoted getting no report at all; 8-bit parts of a UTF-8 report labelled
7bit; a reply holding a NUL making the tracker raise instead of bouncing and reporting;
RET=HDRS returning the body of a message without header fields. The property checks what
any reply text (no CR, LF or NUL: those the values refuse) does to a report: lines stay
short, and our parser and the standard library's read back the same recipients and
statuses.
"""

from __future__ import annotations

import datetime as dt
import email
import email.message
import email.policy
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.address import Address
from mailrelay.envelope import Envelope, Recipient
from mailrelay.errors import MessageError
from mailrelay.message import Message
from mailrelay.reply import Reply
from mailrelay.tracker.dsn import DSNAction, DSNKind, DSNRecipient
from mailrelay.tracker.dsn_build import build_dsn
from mailrelay.tracker.dsn_parse import parse_dsn
from mailrelay.tracker.engine import DeliveryTracker
from mailrelay.tracker.notifications import failure_dsns
from mailrelay.tracker.store import (
    Attempt,
    MemoryStore,
    MessageRecord,
    RecipientRecord,
    State,
    queued_record,
)
from mailrelay.transport.memory import MemoryTransport

T0 = dt.datetime(2026, 3, 2, 10, 0, tzinfo=dt.UTC)
ORIGINAL = (
    b"From: Shop <news@shop.example>\r\nTo: ann@example.org\r\nSubject: Your order\r\n"
    b"Message-ID: <order-1@shop.example>\r\n\r\nThanks for your order.\r\n"
)
#: RFC 5322 §2.1.1: a line MUST be at most 998 characters, CRLF excluded.
MAX_LINE = 998


def record_for(envelope: Envelope) -> MessageRecord:
    return queued_record(
        id="t1",
        created_at=T0,
        envelope=envelope,
        message_id="order-1@shop.example",
        size=len(ORIGINAL),
        addresses=[r.address for r in envelope.recipients],
    )


def bounced(
    address: str, text: str, *, code: int = 550, enhanced: str = "5.1.1"
) -> RecipientRecord:
    attempt = Attempt(
        at=T0, host="mx.example.net:25", code=code, enhanced=enhanced, text=text, source="reply"
    )
    return RecipientRecord(address=Address.parse(address), state=State.BOUNCED, attempts=(attempt,))


def report_for(envelope: Envelope, failed: list[RecipientRecord]) -> bytes:
    reports = failure_dsns(
        record_for(envelope), ORIGINAL, failed, reporting_mta="mx.shop.example", date=T0
    )
    assert len(reports) == 1, "a report is due and must be built"
    message, dsn_envelope = reports[0]
    assert dsn_envelope.sender is None  # RFC 3461 §6.2: from the null reverse-path
    return message.as_bytes()


def status_fields(raw: bytes) -> list[dict[str, str]]:
    """The delivery-status part's blocks as the standard library reads them."""
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    for part in msg.walk():
        blocks: list[email.message.Message] = []
        if part.get_content_type() == "message/delivery-status":
            # The stdlib parses it into one message a block.
            blocks = [b for b in part.get_payload() if isinstance(b, email.message.Message)]
        elif part.get_content_type() == "message/global-delivery-status":
            # Unknown to the stdlib, which reads it as one message: the first block is its
            # header, the other blocks its body, read the same way.
            first = part.get_payload(0)
            assert isinstance(first, email.message.Message)
            rest = first.get_payload(decode=True)
            assert isinstance(rest, bytes)
            blocks = [first] + [
                email.message_from_bytes(block + b"\r\n", policy=email.policy.default)
                for block in re.split(rb"(?:\r?\n){2,}", rest.strip(b"\r\n"))
            ]
        else:
            continue
        return [{name: str(value) for name, value in block.items()} for block in blocks]
    raise AssertionError("no delivery-status part")


# -- Original-Recipient ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("orcpt", "expected"),
    [
        ("ann.original@example.org", "rfc822; ann.original@example.org"),
        # RFC 6533 §3: a non-ASCII ORCPT is a utf-8 address (the report turns global).
        ("jörg@example.org", "utf-8; jörg@example.org"),
    ],
    ids=["ascii", "utf8"],
)
def test_the_orcpt_is_reported_with_one_address_type(orcpt: str, expected: str) -> None:
    envelope = Envelope("news@shop.example", [Recipient("ann@example.org", orcpt=orcpt)])
    raw = report_for(envelope, [bounced("ann@example.org", "5.1.1 no such user")])
    lines = [line for line in raw.split(b"\r\n") if line.startswith(b"Original-Recipient:")]
    assert lines == [f"Original-Recipient: {expected}".encode()]
    (_per_message, block) = status_fields(raw)
    assert block["Original-Recipient"] == expected
    (recipient,) = parse_dsn(raw).recipients
    assert recipient.original_recipient == orcpt


def test_build_dsn_keeps_a_typed_original_recipient() -> None:
    # An ORCPT in the form the RFC 3461 §4.2 parameter has carries its type already.
    recipient = DSNRecipient(
        address="ann@example.org",
        action=DSNAction.FAILED,
        status="5.1.1",
        original_recipient="rfc822;Ann@example.org",
    )
    raw = build_dsn(
        original=ORIGINAL,
        envelope_sender="news@shop.example",
        recipients=[recipient],
        reporting_mta="mx.shop.example",
        date=T0,
    )
    assert b"Original-Recipient: rfc822; Ann@example.org\r\n" in raw
    assert b"rfc822; rfc822" not in raw


# -- hostile reply text ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("letter", "length"), [("x", 1000), ("x", 4000), ("x", 65536), ("日", 1000), ("ü", 4000)]
)
def test_a_long_word_in_the_reply_keeps_every_line_short(letter: str, length: int) -> None:
    word = letter * length
    envelope = Envelope("news@shop.example", ["ann@example.org"])
    failed = bounced("ann@example.org", f"5.1.1 {word}")
    raw = report_for(envelope, [failed])
    assert max(len(line) for line in raw.split(b"\r\n")) <= MAX_LINE
    (recipient,) = parse_dsn(raw).recipients
    assert (recipient.address, recipient.action, recipient.status) == (
        "ann@example.org",
        DSNAction.FAILED,
        "5.1.1",
    )
    # Broken into pieces by the folding, but nothing the tracker kept of it is lost.
    kept = "".join(failed.attempts[-1].text.split())
    assert kept in "".join((recipient.diagnostic or "").split())


def _squeezed(text: str) -> str:
    return "".join(re.sub(r"[\x00-\x1f\x7f]", " ", text).split())


@given(
    diagnostic=st.text(
        alphabet=st.characters(codec="utf-8", blacklist_characters="\r\n\x00"),
        min_size=1,
        max_size=3000,
    ),
    address=st.sampled_from(["ann@example.org", "jörg@bücher.example"]),
)
def test_any_diagnostic_reads_back_with_short_lines(diagnostic: str, address: str) -> None:
    recipient = DSNRecipient(
        address=address, action=DSNAction.FAILED, status="5.1.1", diagnostic=diagnostic
    )
    raw = build_dsn(
        original=ORIGINAL,
        envelope_sender="news@shop.example",
        recipients=[recipient],
        reporting_mta="mx.shop.example",
        date=T0,
    )
    assert max(len(line) for line in raw.split(b"\r\n")) <= MAX_LINE
    Message.from_bytes(raw)  # a message the transports take
    report = parse_dsn(raw)
    assert report.kind is DSNKind.BOUNCE
    ((got),) = report.recipients
    assert (got.address, got.action, got.status) == (address, DSNAction.FAILED, "5.1.1")
    assert _squeezed(got.diagnostic or "") == _squeezed(diagnostic)
    _per_message, block = status_fields(raw)
    address_type = "rfc822" if (address + diagnostic).isascii() else "utf-8"
    assert block["Final-Recipient"] == f"{address_type}; {address}"
    assert (block["Action"], block["Status"]) == ("failed", "5.1.1")


# -- who gets the report -------------------------------------------------------------------


@pytest.mark.parametrize(
    "sender", ['"john smith"@example.org', '"a;b"@example.org', "o'brien@example.org"]
)
def test_a_sender_with_a_quoted_local_part_gets_its_report(sender: str) -> None:
    envelope = Envelope(sender, ["ann@example.org"])
    raw = report_for(envelope, [bounced("ann@example.org", "5.1.1 no such user")])
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["To"].addresses[0].addr_spec == str(Address.parse(sender))
    (recipient,) = parse_dsn(raw).recipients
    assert recipient.address == "ann@example.org"


@pytest.mark.parametrize("sender", [None, "", "<>"])
def test_still_no_report_to_the_null_sender(sender: str | None) -> None:
    with pytest.raises(MessageError):
        build_dsn(
            original=ORIGINAL,
            envelope_sender=sender,
            recipients=[DSNRecipient(address="ann@example.org", action=DSNAction.FAILED)],
            reporting_mta="mx.shop.example",
        )


# -- 8-bit parts are labelled ----------------------------------------------------------------


def test_a_utf8_report_labels_its_8bit_parts() -> None:
    # RFC 2045 §6.1: without a Content-Transfer-Encoding a part is 7bit; RFC 6533's
    # message/global-delivery-status holds UTF-8, so it must say 8bit, as must the
    # multipart holding it (RFC 2045 §6.4: never a narrower encoding than its parts').
    recipient = DSNRecipient(
        address="jörg@bücher.example",
        action=DSNAction.FAILED,
        status="5.1.1",
        diagnostic="550 Benutzer unbekannt: jörg",
    )
    raw = build_dsn(
        original=ORIGINAL,
        envelope_sender="news@shop.example",
        recipients=[recipient],
        reporting_mta="mx.shop.example",
        date=T0,
    )
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["Content-Transfer-Encoding"] == "8bit"
    for part in msg.walk():
        if part.get_content_type() == "message/global-delivery-status":
            assert part["Content-Transfer-Encoding"] == "8bit"
            break
    else:
        raise AssertionError("no message/global-delivery-status part")


def test_an_ascii_report_declares_no_encoding() -> None:
    raw = build_dsn(
        original=ORIGINAL,
        envelope_sender="news@shop.example",
        recipients=[DSNRecipient(address="ann@example.org", action=DSNAction.FAILED)],
        reporting_mta="mx.shop.example",
        date=T0,
    )
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["Content-Transfer-Encoding"] is None
    assert b"8bit" not in raw


# -- control characters in a reply --------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["5.1.1 no\x00such user", "5.1.1 \x00\x00\x00", "5.1.1 bell\x07 and\x0bvt\x1b[31m red"],
    ids=["nul", "only-nul", "controls"],
)
def test_a_reply_with_control_characters_is_reported(text: str) -> None:
    # The reply reader passes a NUL through (Reply keeps the server's words): the report
    # must still be built, and carry none.
    def refuse(message: Message, envelope: Envelope) -> dict[str, Reply]:
        return {str(r.address): Reply.of(550, text) for r in envelope.recipients}

    out = MemoryTransport()
    tracker = DeliveryTracker(
        MemoryTransport(refuse),
        MemoryStore(),
        clock=lambda: T0,
        dsn_transport=out,
        reporting_mta="relay.example.com",
    )
    tracking_id = tracker.submit(
        Message.build(sender="news@shop.example", to=["ann@example.org"], subject="x", text="y")
    )
    tracker.run_pending()  # raised ValueError: the bounce was never recorded
    (recipient,) = tracker.status(tracking_id).recipients
    assert recipient.state is State.BOUNCED
    (report,) = out.outbox
    raw = report.message.as_bytes()
    assert b"\x00" not in raw
    (reported,) = parse_dsn(raw).recipients
    assert (reported.address, reported.status) == ("ann@example.org", "5.1.1")


# -- RET=HDRS returns headers only ---------------------------------------------------------


@pytest.mark.parametrize("original", [b"\r\nthe secret body\r\n", b"\nthe secret body\n"])
def test_headers_only_never_return_the_body_of_a_headerless_message(original: bytes) -> None:
    raw = build_dsn(
        original=original,
        envelope_sender="news@shop.example",
        recipients=[DSNRecipient(address="ann@example.org", action=DSNAction.FAILED)],
        reporting_mta="mx.shop.example",
        ret="HDRS",
        date=T0,
    )
    assert b"secret" not in raw
    (recipient,) = parse_dsn(raw).recipients
    assert recipient.address == "ann@example.org"
