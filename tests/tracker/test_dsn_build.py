"""build_dsn and the VERP helpers: structure, refusals, and build → parse round trips."""

from __future__ import annotations

import datetime as dt
import email
import email.message
import email.policy

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from mailrelay.envelope import Ret
from mailrelay.errors import InvalidAddress, MessageError
from mailrelay.tracker import (
    DSNAction,
    DSNKind,
    DSNRecipient,
    build_dsn,
    parse_dsn,
    verp_decode,
    verp_encode,
)

ORIGINAL = (
    b"From: Shop <news@shop.example>\n"
    b"To: ann@example.org\n"
    b"Subject: Your order\n"
    b"Message-ID: <order-1@shop.example>\n"
    b"\n"
    b"Thanks for your order.\n"
)
WHEN = dt.datetime(2026, 3, 2, 10, 0, tzinfo=dt.UTC)
FAILED = DSNRecipient(
    address="ann@example.org",
    action=DSNAction.FAILED,
    status="5.1.1",
    diagnostic="550 5.1.1 <ann@example.org>: no such user",
    remote_mta="mx.example.org",
    original_recipient="Ann@example.org",
    last_attempt_date="Mon, 2 Mar 2026 10:00:00 +0000",
)
DELAYED = DSNRecipient(
    address="bob@example.com",
    action=DSNAction.DELAYED,
    status="4.4.1",
    diagnostic="connection timed out",
    will_retry_until="Sat, 7 Mar 2026 10:00:00 +0000",
)


def build(**overrides: object) -> bytes:
    arguments: dict[str, object] = {
        "original": ORIGINAL,
        "envelope_sender": "bounces+t1@shop.example",
        "recipients": [FAILED, DELAYED],
        "reporting_mta": "mx.shop.example",
        "envid": "t1",
        "arrival_date": WHEN,
        "date": WHEN,
        "message_id": "dsn-1@mx.shop.example",
    }
    arguments.update(overrides)
    return build_dsn(**arguments)  # type: ignore[arg-type]


def parse_mime(raw: bytes) -> email.message.Message:
    return email.message_from_bytes(raw, policy=email.policy.compat32)


def status_blocks(raw: bytes) -> list[email.message.Message]:
    report = parse_mime(raw)
    (part,) = [p for p in report.walk() if p.get_content_type() == "message/delivery-status"]
    payload = part.get_payload()
    assert isinstance(payload, list)
    return [block for block in payload if isinstance(block, email.message.Message)]


def test_headers_and_structure() -> None:
    raw = build()
    assert b"\r\n" in raw
    assert b"\n" not in raw.replace(b"\r\n", b"")
    report = parse_mime(raw)
    assert report["From"] == "Mail Delivery System <MAILER-DAEMON@mx.shop.example>"
    assert report["To"] == "<bounces+t1@shop.example>"
    assert report["Auto-Submitted"] == "auto-replied"
    assert report["Message-ID"] == "<dsn-1@mx.shop.example>"
    assert report["In-Reply-To"] == "<order-1@shop.example>"
    assert report["Subject"] == "Delivery Status Notification (Failure)"
    assert report["Date"] == "Mon, 02 Mar 2026 10:00:00 +0000"
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    types = [p.get_content_type() for p in report.get_payload()]  # type: ignore[union-attr]
    assert types == ["text/plain", "message/delivery-status", "text/rfc822-headers"]


def test_delivery_status_fields() -> None:
    per_message, first, second = status_blocks(build())
    assert per_message["Reporting-MTA"] == "dns; mx.shop.example"
    assert per_message["Original-Envelope-Id"] == "t1"
    assert per_message["Arrival-Date"] == "Mon, 02 Mar 2026 10:00:00 +0000"
    assert first["Final-Recipient"] == "rfc822; ann@example.org"
    assert first["Original-Recipient"] == "rfc822; Ann@example.org"
    assert first["Action"] == "failed"
    assert first["Status"] == "5.1.1"
    assert first["Remote-MTA"] == "dns; mx.example.org"
    assert first["Diagnostic-Code"] == "smtp; 550 5.1.1 <ann@example.org>: no such user"
    assert first["Last-Attempt-Date"] == "Mon, 2 Mar 2026 10:00:00 +0000"
    assert first["Will-Retry-Until"] is None
    assert second["Action"] == "delayed"
    assert second["Will-Retry-Until"] == "Sat, 7 Mar 2026 10:00:00 +0000"


@pytest.mark.parametrize(
    ("ret", "content_type", "has_body"),
    [
        (None, "text/rfc822-headers", False),
        ("HDRS", "text/rfc822-headers", False),
        ("hdrs", "text/rfc822-headers", False),
        ("FULL", "message/rfc822", True),
        (Ret.FULL, "message/rfc822", True),
        (Ret.HDRS, "text/rfc822-headers", False),
    ],
)
def test_ret_returns_headers_or_message(
    ret: Ret | str | None, content_type: str, has_body: bool
) -> None:
    raw = build(ret=ret)
    payload = parse_mime(raw).get_payload()
    assert isinstance(payload, list)
    last = payload[-1]
    assert isinstance(last, email.message.Message)
    assert last.get_content_type() == content_type
    assert (b"Thanks for your order." in raw) is has_body
    assert parse_dsn(raw).original_message_id == "order-1@shop.example"


@pytest.mark.parametrize(
    ("recipients", "subject"),
    [
        ([FAILED], "Delivery Status Notification (Failure)"),
        ([DELAYED], "Delivery Status Notification (Delay)"),
        (
            [DSNRecipient(address="c@example.net", action=DSNAction.DELIVERED)],
            "Delivery Status Notification (Success)",
        ),
    ],
)
def test_subject_follows_the_worst_action(recipients: list[DSNRecipient], subject: str) -> None:
    assert parse_mime(build(recipients=recipients))["Subject"] == subject


@pytest.mark.parametrize(
    ("action", "status"),
    [
        (DSNAction.FAILED, "5.0.0"),
        (DSNAction.DELAYED, "4.0.0"),
        (DSNAction.DELIVERED, "2.0.0"),
        (DSNAction.RELAYED, "2.0.0"),
    ],
)
def test_missing_status_defaults_from_action(action: DSNAction, status: str) -> None:
    recipient = DSNRecipient(address="c@example.net", action=action)
    _per_message, block = status_blocks(build(recipients=[recipient]))
    assert block["Status"] == status


@pytest.mark.parametrize("sender", [None, ""])
def test_never_a_dsn_to_the_null_reverse_path(sender: str | None) -> None:
    with pytest.raises(MessageError, match="null reverse-path"):
        build(envelope_sender=sender)


@pytest.mark.parametrize(
    "overrides",
    [
        {"recipients": []},
        {"ret": "BODY"},
        {"envid": "a\r\nBcc: x@example.org"},
        {"reporting_mta": "mx.example.org\r\nX-Evil: 1"},
        {"reporting_mta": "not a host"},
        {"envelope_sender": "no-at-sign"},
        {"envelope_sender": "a@b.example>\r\nX: y"},
        {"message_id": "x\n@y"},
    ],
)
def test_bad_arguments_are_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(MessageError):
        build(**overrides)


@pytest.mark.parametrize(
    "field", ["address", "diagnostic", "remote_mta", "original_recipient", "last_attempt_date"]
)
def test_recipient_values_refuse_line_breaks(field: str) -> None:
    values: dict[str, object] = {"address": "a@example.org", "action": DSNAction.FAILED}
    values[field] = "x@example.org\r\nInjected: yes"
    with pytest.raises(ValueError, match="CR, LF or NUL"):
        DSNRecipient(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value"),
    [("status", "5.1"), ("status", "550"), ("action", "bounced"), ("address", "")],
)
def test_recipient_values_are_validated(field: str, value: str) -> None:
    values: dict[str, object] = {"address": "a@example.org", "action": DSNAction.FAILED}
    values[field] = value
    with pytest.raises((ValueError, TypeError)):
        DSNRecipient(**values)  # type: ignore[arg-type]


def test_utf8_recipient_makes_a_global_report() -> None:
    recipient = DSNRecipient(address="山田@example.jp", action=DSNAction.FAILED, status="5.1.1")
    original = "From: 山田 <yamada@example.jp>\nMessage-ID: <u-1@example.jp>\n\nhi\n".encode()
    raw = build(recipients=[recipient], original=original)
    types = [p.get_content_type() for p in parse_mime(raw).walk()]
    assert "message/global-delivery-status" in types
    assert "message/global-headers" in types
    report = parse_dsn(raw)
    assert report.format == "rfc6533"
    assert [(r.address, r.status) for r in report.recipients] == [("山田@example.jp", "5.1.1")]
    assert report.original_message_id == "u-1@example.jp"


def test_long_diagnostic_is_folded_and_reads_back() -> None:
    diagnostic = "550 5.7.1 " + " ".join(["word"] * 80)
    recipient = DSNRecipient(
        address="a@example.org", action=DSNAction.FAILED, diagnostic=diagnostic
    )
    raw = build(recipients=[recipient])
    assert max(len(line) for line in raw.split(b"\r\n")) <= 100
    assert parse_dsn(raw).recipients[0].diagnostic == diagnostic


def test_round_trip_table() -> None:
    report = parse_dsn(build())
    assert report.kind is DSNKind.BOUNCE
    assert report.envid == "t1"
    assert report.reporting_mta == "mx.shop.example"
    assert report.original_message_id == "order-1@shop.example"
    assert report.bounce_address == "bounces+t1@shop.example"
    assert verp_decode(report.bounce_address) == "t1"
    got = [
        (r.address, r.action, r.status, r.diagnostic, r.remote_mta, r.original_recipient)
        for r in report.recipients
    ]
    assert got == [
        (
            "ann@example.org",
            DSNAction.FAILED,
            "5.1.1",
            FAILED.diagnostic,
            "mx.example.org",
            "Ann@example.org",
        ),
        ("bob@example.com", DSNAction.DELAYED, "4.4.1", "connection timed out", None, None),
    ]
    assert report.recipients[0].is_hard is True
    assert report.recipients[1].will_retry_until == DELAYED.will_retry_until


LOCAL = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1, max_size=20).filter(
    lambda s: not s.startswith(".") and not s.endswith(".") and ".." not in s
)
DOMAIN = st.sampled_from(["example.org", "mx.example.net", "例え.jp", "xn--r8jz45g.jp"])
ACTION_STATUS = st.sampled_from(
    [
        (DSNAction.FAILED, "5"),
        (DSNAction.DELAYED, "4"),
        (DSNAction.DELIVERED, "2"),
        (DSNAction.RELAYED, "2"),
    ]
)
TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=200
).filter(lambda s: s.strip() != "")


@st.composite
def recipients(draw: st.DrawFn) -> DSNRecipient:
    action, klass = draw(ACTION_STATUS)
    status = f"{klass}.{draw(st.integers(0, 7))}.{draw(st.integers(0, 30))}"
    return DSNRecipient(
        address=f"{draw(LOCAL)}@{draw(DOMAIN)}",
        action=action,
        status=status,
        diagnostic=draw(st.none() | TEXT),
        remote_mta=draw(st.none() | st.sampled_from(["mx.example.org", "[192.0.2.1]"])),
    )


@given(st.lists(recipients(), min_size=1, max_size=5), st.none() | LOCAL)
def test_build_parse_round_trip(people: list[DSNRecipient], envid: str | None) -> None:
    raw = build(recipients=people, envid=envid)
    report = parse_dsn(raw)
    assert report.envid == envid
    got = [(r.address, r.action, r.status, r.remote_mta) for r in report.recipients]
    assert got == [(p.address, p.action, p.status, p.remote_mta) for p in people]
    # Whitespace runs are not significant in a field (RFC 5322 folding).
    assert [r.diagnostic for r in report.recipients] == [
        " ".join(p.diagnostic.split()) if p.diagnostic else None for p in people
    ]
    expected_kind = {
        DSNAction.FAILED: DSNKind.BOUNCE,
        DSNAction.DELAYED: DSNKind.DELAY,
        DSNAction.DELIVERED: DSNKind.DELIVERED,
        DSNAction.RELAYED: DSNKind.RELAYED,
    }
    for action in (DSNAction.FAILED, DSNAction.DELAYED, DSNAction.DELIVERED, DSNAction.RELAYED):
        if any(p.action is action for p in people):
            assert report.kind is expected_kind[action]
            break


# ---------------------------------------------------------------------------
# VERP


@pytest.mark.parametrize(
    ("local", "domain", "tracking_id", "separator", "address"),
    [
        ("bounces", "shop.example", "4f2a9c", "+", "bounces+4f2a9c@shop.example"),
        ("b", "shop.example", "a.b-c_d", "+", "b+a.b-c_d@shop.example"),
        ("bounce", "mx.shop.example", "t1", "-", "bounce-t1@mx.shop.example"),
        ("bounces", "[192.0.2.1]", "x", "+", "bounces+x@[192.0.2.1]"),
    ],
)
def test_verp_table(
    local: str, domain: str, tracking_id: str, separator: str, address: str
) -> None:
    assert verp_encode(local, domain, tracking_id, separator=separator) == address
    assert verp_decode(address, separator=separator) == tracking_id
    assert verp_decode(f"<{address}>", local=local, separator=separator) == tracking_id


@pytest.mark.parametrize(
    ("local", "domain", "tracking_id", "separator"),
    [
        ("bounces", "shop.example", "has space", "+"),
        ("bounces", "shop.example", "a+b", "+"),
        ("bounces", "shop.example", "", "+"),
        ("bounces", "shop.example", "x" * 60, "+"),
        ("bounces", "shop.example", "a\r\nb", "+"),
        ("bou nces", "shop.example", "a", "+"),
        ("bounces", "", "a", "+"),
        ("bounces", "shop example", "a", "+"),
        ("bounces", "shop.example", "a", "++"),
        ("bounces", "shop.example", "a", "@"),
    ],
)
def test_verp_refuses_unsafe_parts(
    local: str, domain: str, tracking_id: str, separator: str
) -> None:
    with pytest.raises(InvalidAddress):
        verp_encode(local, domain, tracking_id, separator=separator)


@pytest.mark.parametrize(
    ("address", "local", "result"),
    [
        ("bounces@shop.example", None, None),
        ("bounces+@shop.example", None, None),
        ("other+t1@shop.example", "bounces", None),
        ("BOUNCES+t1@shop.example", "bounces", "t1"),
        ("no-at-sign+t1", None, None),
        ("", None, None),
        (None, None, None),
    ],
)
def test_verp_decode_without_an_id(
    address: str | None, local: str | None, result: str | None
) -> None:
    assert verp_decode(address, local=local) == result


@given(LOCAL.filter(lambda s: "+" not in s), DOMAIN.filter(str.isascii), LOCAL)
def test_verp_round_trip(local: str, domain: str, tracking_id: str) -> None:
    assume(len(local) + 1 + len(tracking_id) <= 64)
    assert verp_decode(verp_encode(local, domain, tracking_id), local=local) == tracking_id
