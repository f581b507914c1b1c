"""The tracker's side of delivery-status notifications: asking, reporting, correlating.

Rules of this module (RFC 3461, RFC 3464; the parser and builder themselves live in
:mod:`mailrelay.tracker.dsn_parse` and :mod:`mailrelay.tracker.dsn_build`):

* *Asking*: with a :class:`DSNRequest`, envelopes carry NOTIFY (for recipients without
  their own), RET, and ENVID = the tracking id unless the envelope has one (RFC 3461
  §4.4: the ENVID comes back in every DSN, so it correlates). With a :class:`VERP`, the
  envelope sender carries the tracking id too (a null reverse-path stays null).
* *Reporting*: a recipient that bounces or expires is reported to the envelope sender in
  an RFC 3464 report, sent from the null reverse-path; never for a message whose sender
  is the null reverse-path (RFC 3461 §6.2), and not for a recipient whose NOTIFY
  excludes FAILURE (RFC 3461 §4.1). An expired recipient is reported with its last
  transient status, or 4.4.7 (RFC 3463 §3.5).
* *Warning*: a recipient deferred for longer than the tracker's ``delay_warning_after``
  is reported once in a delay report (``Action: delayed``, RFC 3464 §2.3.3) with its
  last transient status (or 4.0.0), the last reply, and ``Will-Retry-Until`` (RFC 3464
  §2.3.9), when it will expire; under the same rules of who gets a report, with DELAY
  for FAILURE (the decision is :func:`~mailrelay.tracker.transitions.wants_delay_warning`).
  It returns the message's headers only, whatever RET asked: RFC 3461 §4.3's FULL is
  for a *failed* DSN.
* *Correlating*: a returned report is matched by ENVID, then by the original
  Message-ID, then by the VERP address it was sent to; its recipients by
  Final-Recipient, the address, or Original-Recipient. A success DSN marks the
  recipient DELIVERED and confirmed; a failure DSN (after relay) BOUNCED; a delay or
  relay report is history only. A report changes each recipient at most once (a
  failure if any of its blocks about it failed), however many blocks name it; every
  block goes to the history. Auto-replies, feedback reports and non-reports match
  nothing.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import logging
import re
from collections.abc import Callable, Sequence

import attrs

from mailrelay.address import Address
from mailrelay.envelope import Envelope, Notify, Recipient, Ret
from mailrelay.errors import InvalidAddress, MessageError
from mailrelay.message import Message
from mailrelay.tracker.dsn import DSNAction, DSNKind, DSNRecipient, DSNReport
from mailrelay.tracker.dsn_build import build_dsn, verp_decode, verp_encode
from mailrelay.tracker.dsn_parse import parse_dsn
from mailrelay.tracker.events import EventKind, TrackerEvent
from mailrelay.tracker.store import (
    Attempt,
    Change,
    MessageRecord,
    RecipientRecord,
    State,
    Store,
    apply_change,
    recipient_lookup,
)

__all__ = [
    "DSNMatch",
    "DSNRequest",
    "VERP",
    "correlate",
    "delay_dsns",
    "failure_dsns",
    "ingest",
    "outgoing_envelope",
]

log = logging.getLogger(__name__)

_ALL_NOTIFY = frozenset({Notify.SUCCESS, Notify.FAILURE, Notify.DELAY})
# C0 controls and DEL: never written into a report (CR, LF and NUL are refused there).
_CONTROLS = re.compile(r"[\x00-\x1f\x7f]")
#: The ``expect`` of a change that only adds its attempt to the history.
_HISTORY_ONLY: frozenset[State] = frozenset()
_REPORTABLE = frozenset({State.DELIVERED, State.SENDING})


@attrs.frozen(kw_only=True)
class DSNRequest:
    """What the tracker asks receiving servers to report (RFC 3461).

    Args:
        notify: the NOTIFY default for recipients without their own
            (default SUCCESS, FAILURE and DELAY).
        ret: what a failure DSN should return (default the headers only).
    """

    notify: frozenset[Notify] = _ALL_NOTIFY
    ret: Ret = Ret.HDRS


@attrs.frozen(kw_only=True)
class VERP:
    """A per-message envelope sender that carries the tracking id (``local+id@domain``).

    Args:
        local: the bounce mailbox's local part.
        domain: its domain (whose server delivers ``local+anything`` to ``local``).
        separator: the sub-address delimiter.
    """

    local: str
    domain: str
    separator: str = "+"


@attrs.frozen(kw_only=True)
class DSNMatch:
    """What :meth:`DeliveryTracker.ingest_dsn` made of a report.

    Attributes:
        report: the parsed report.
        tracking_id: the tracked message it was matched to, or ``None``.
        matched_by: ``"envid"``, ``"message-id"`` or ``"verp"`` (``None`` when unmatched).
        recipients: the tracked recipients the report named.
        changed: those whose state changed because of it.
    """

    report: DSNReport
    tracking_id: str | None = None
    matched_by: str | None = None
    recipients: tuple[Address, ...] = ()
    changed: tuple[Address, ...] = ()


def outgoing_envelope(
    envelope: Envelope, tracking_id: str, *, request_dsn: DSNRequest | None, verp: VERP | None
) -> Envelope:
    """The envelope as the tracker sends it: with DSN requests and the VERP sender, if asked."""
    if verp is None and request_dsn is None:
        return envelope  # nothing to add: skip re-validating every address
    sender: Address | str | None = envelope.sender
    if verp is not None and envelope.sender is not None:
        sender = verp_encode(verp.local, verp.domain, tracking_id, separator=verp.separator)
    ret, envid, notify = envelope.ret, envelope.envid, envelope.notify
    if request_dsn is not None:
        # RFC 3461 §4.4: ENVID comes back in every DSN; the tracking id correlates it.
        envid = envid or tracking_id
        ret = ret or request_dsn.ret
        notify = notify or request_dsn.notify
    return Envelope(
        sender,
        envelope.recipients,
        ret=ret,
        envid=envid,
        notify=notify,
        requiretls=envelope.requiretls,
    )


def failure_dsns(
    record: MessageRecord,
    content: bytes,
    failed: Sequence[RecipientRecord],
    *,
    reporting_mta: str,
    date: dt.datetime,
) -> list[tuple[Message, Envelope]]:
    """The failure DSN (with its envelope) reporting ``failed`` recipients, if one is due.

    ``failed`` are the records of recipients that just bounced or expired; ``content`` is
    the original message. Nothing for the null reverse-path, nor when every recipient's
    NOTIFY excludes FAILURE; a report that cannot be built is logged and skipped.
    """
    sender = record.envelope.sender
    if not failed or sender is None:
        # RFC 3461 §6.2: never a DSN for a message from the null reverse-path.
        return []
    wanted = {r.address: r for r in record.envelope.recipients}
    entries = []
    for recipient in failed:
        notify = wanted[recipient.address].notify
        # RFC 3461 §4.1: NOTIFY without FAILURE (or NEVER) asks for no failure DSN.
        if notify is not None and Notify.FAILURE not in notify:
            continue
        entries.append(_dsn_recipient(recipient, wanted[recipient.address]))
    if not entries:
        return []
    return _report(record, content, entries, sender, reporting_mta=reporting_mta, date=date)


def delay_dsns(
    record: MessageRecord,
    content: bytes,
    delayed: Sequence[RecipientRecord],
    *,
    reporting_mta: str,
    date: dt.datetime,
    retry_until: dt.datetime,
) -> list[tuple[Message, Envelope]]:
    """The delay report (with its envelope) warning about ``delayed`` recipients.

    ``delayed`` are the records of recipients just deferred whose change set
    ``delay_warned`` (the decision, NOTIFY and null reverse-path included, was made
    then); ``retry_until`` is when they will expire. One report for them all; nothing
    for the null reverse-path; a report that cannot be built is logged and skipped.
    """
    sender = record.envelope.sender
    if not delayed or sender is None:
        # RFC 3461 §6.2: never a DSN for a message from the null reverse-path.
        return []
    wanted = {r.address: r for r in record.envelope.recipients}
    until = _rfc5322_date(retry_until)
    entries = [
        _dsn_recipient(
            recipient, wanted[recipient.address], action=DSNAction.DELAYED, retry_until=until
        )
        for recipient in delayed
    ]
    # RFC 3461 §4.3: RET=FULL asks for the whole message in a *failed* DSN. A warning is
    # about a message still queued, which may yet be delivered: its headers are enough
    # (as Postfix's delay warnings do), and a large message is not sent back early.
    return _report(
        record, content, entries, sender, reporting_mta=reporting_mta, date=date, ret="HDRS"
    )


def _report(
    record: MessageRecord,
    content: bytes,
    entries: list[DSNRecipient],
    sender: Address,
    *,
    reporting_mta: str,
    date: dt.datetime,
    ret: str | None = None,
) -> list[tuple[Message, Envelope]]:
    if ret is None and record.envelope.ret is not None:
        ret = record.envelope.ret.value
    try:
        report = build_dsn(
            original=content,
            envelope_sender=str(sender),
            recipients=entries,
            reporting_mta=reporting_mta,
            envid=record.envelope.envid,
            ret=ret,
            arrival_date=record.created_at,
            date=date,
        )
        message = Message.from_bytes(report)
        # RFC 3461 §6.2 / RFC 5321 §4.5.5: a DSN goes out from the null reverse-path.
        return [(message, Envelope(None, [sender]))]
    except (MessageError, InvalidAddress):
        log.exception("could not build a DSN for %s", record.id)
        return []


def correlate(store: Store, report: DSNReport, verp: VERP | None) -> tuple[str | None, str | None]:
    """The tracking id a report is about, and how it was found (``None, None`` if not)."""
    if report.envid:
        if store.get(report.envid) is not None:
            return report.envid, "envid"
        found = store.lookup(envid=report.envid)
        if found:
            return found[-1], "envid"
    if report.original_message_id:
        found = store.lookup(message_id=report.original_message_id)
        if found:
            return found[-1], "message-id"
    if verp is not None:
        tracking_id = verp_decode(report.bounce_address, local=verp.local, separator=verp.separator)
        if tracking_id is not None and store.get(tracking_id) is not None:
            return tracking_id, "verp"
    return None, None


def ingest(
    store: Store, raw: bytes, *, verp: VERP | None, clock: Callable[[], dt.datetime]
) -> tuple[DSNMatch, list[TrackerEvent]]:
    """Parse a returned report and fold it into the record it is about.

    Returns what was matched and the events to fire once the change is committed (it is,
    when this returns).
    """
    report = parse_dsn(raw)
    if report.kind in (DSNKind.NOT_A_REPORT, DSNKind.AUTO_REPLY, DSNKind.FEEDBACK):
        return DSNMatch(report=report), []
    tracking_id, matched_by = correlate(store, report, verp)
    if tracking_id is None:
        return DSNMatch(report=report), []
    record = _status(store, tracking_id)
    now = clock()
    changes: list[Change] = []
    # A report is mail from anyone: each block is matched through indexes built once, so
    # the work follows the blocks plus the recipients, never their product.
    exact = {r.address: r for r in record.recipients}
    loose: dict[str, Address] = {}
    for r in record.recipients:
        loose.setdefault(str(r.address).lower(), r.address)
    named: dict[Address, None] = {}  # an ordered set
    for item in report.recipients:
        address = _match_recipient(exact, loose, item)
        if address is None:
            continue
        named.setdefault(address)
        changes.append(_dsn_change(item, exact[address], now))
    changes = _one_change_each(changes)
    changed = set(store.apply(tracking_id, changes)) if changes else set()
    events = [TrackerEvent(kind=EventKind.DSN_RECEIVED, tracking_id=tracking_id, report=report)]
    after = recipient_lookup(_status(store, tracking_id))
    for change in changes:
        if change.expect != _HISTORY_ONLY and change.address in changed:
            kind = EventKind.DELIVERED if change.state is State.DELIVERED else EventKind.BOUNCED
            recipient = after(change.address)
            if recipient.state is not change.state or recipient.confirmed != change.confirmed:
                # Changed again since this commit (another report, from another thread or
                # process): the event shows the recipient as this change left it.
                recipient = apply_change(exact[change.address], change, worker=None)[0]
            events.append(
                TrackerEvent(
                    kind=kind,
                    tracking_id=tracking_id,
                    recipient=recipient,
                    attempt=change.attempt,
                    report=report,
                )
            )
    match = DSNMatch(
        report=report,
        tracking_id=tracking_id,
        matched_by=matched_by,
        recipients=tuple(named),
        changed=tuple(a for a in named if a in changed),
    )
    return match, events


def _one_change_each(changes: list[Change]) -> list[Change]:
    """At most one state change per recipient: a report naming one several times.

    An expanded address (RFC 3464 §2.3.1: several Final-Recipients, one
    Original-Recipient) can name a tracked recipient in several blocks. Each block
    stays in the history, but only one changes the state, so one report fires at most
    one event per recipient: a failure if any block failed, else the first success.
    The state reached is the one the blocks would reach one after another.
    """
    deciding: dict[Address, int] = {}
    for index, change in enumerate(changes):
        if change.expect == _HISTORY_ONLY:
            continue
        first = deciding.get(change.address)
        if first is None or (
            change.state is State.BOUNCED and changes[first].state is not State.BOUNCED
        ):
            deciding[change.address] = index
    if len(deciding) == sum(1 for change in changes if change.expect != _HISTORY_ONLY):
        return changes  # one each already (the common case)
    return [
        change
        if deciding.get(change.address) == index
        else attrs.evolve(change, expect=_HISTORY_ONLY, confirmed=None)
        for index, change in enumerate(changes)
    ]


def _status(store: Store, tracking_id: str) -> MessageRecord:
    record = store.get(tracking_id)
    if record is None:
        raise KeyError(tracking_id)
    return record


def _dsn_recipient(
    record: RecipientRecord,
    recipient: Recipient,
    *,
    action: DSNAction = DSNAction.FAILED,
    retry_until: str | None = None,
) -> DSNRecipient:
    last = next((a for a in reversed(record.attempts) if a.source != "dsn"), None)
    expired = record.state is State.EXPIRED
    status = last.enhanced if last is not None and last.enhanced else None
    if action is DSNAction.DELAYED:
        # RFC 3464 §2.3.4: a delay carries a transient (4.x.x) status; 4.0.0 when the
        # last answer gave none (an error, or a reply without an enhanced code).
        if status is None or not status.startswith("4."):
            status = "4.0.0"
    elif status is None or (expired and not status.startswith("4.")):
        # RFC 3463 §3.5: X.4.7 "delivery time expired".
        status = "4.4.7" if expired else "5.0.0"
    diagnostic = None
    if last is not None and last.text:
        # A server's words may hold any control character (the reply reader passes a NUL
        # on, as the server sent it), none of which may go into a report's field: each
        # becomes a space, and runs of white space one space.
        text = " ".join(_CONTROLS.sub(" ", last.text).split())
        if text:
            # build_dsn writes the diagnostic-type itself ("smtp; ", RFC 3464 §2.3.6).
            diagnostic = f"{last.code} {text}" if last.code else text
    return DSNRecipient(
        address=str(record.address),
        action=action,
        status=status,
        diagnostic=diagnostic,
        remote_mta=None if last is None or not last.host else last.host,
        # The bare ORCPT: build_dsn writes its address type, utf-8 for a non-ASCII one
        # (RFC 6533 §3), where "rfc822;" here came out twice ("rfc822; rfc822;...").
        original_recipient=None if recipient.orcpt is None else str(recipient.orcpt),
        last_attempt_date=None if last is None else _rfc5322_date(last.at),
        # RFC 3464 §2.3.9: a per-recipient field, for delays only.
        will_retry_until=retry_until,
    )


def _rfc5322_date(when: dt.datetime) -> str:
    # RFC 5322 §3.3: English day and month names. Not strftime, whose %a and %b follow
    # the process's LC_TIME (an application may set it); and in UTC whatever the zone.
    return email.utils.format_datetime(when.astimezone(dt.UTC))


def _match_recipient(
    exact: dict[Address, RecipientRecord], loose: dict[str, Address], item: DSNRecipient
) -> Address | None:
    """The tracked recipient a report's block names: ``exact`` holds the message's
    recipients, ``loose`` them by lower-cased text (the first of each)."""
    candidates = [item.address, item.final_recipient, item.original_recipient]
    for text in candidates:
        if not text:
            continue
        # "rfc822;user@example.org" (RFC 3464 §2.3.2): drop the address type.
        _type, _sep, value = text.rpartition(";")
        try:
            address = Address.parse(value.strip().strip("<>"))
        except InvalidAddress:
            continue
        if address in exact:
            return address
        # Some servers change the case of the local part: compare loosely as a last resort.
        found = loose.get(str(address).lower())
        if found is not None:
            return found
    return None


def _accepted(current: RecipientRecord) -> bool:
    """Whether a server accepted the message for this recipient: DELIVERED, or a 2xx
    reply in its history (a lease lost after the server took it keeps that answer)."""
    return current.state is State.DELIVERED or any(
        attempt.source == "reply" and attempt.code is not None and 200 <= attempt.code < 300
        for attempt in current.attempts
    )


def _dsn_change(item: DSNRecipient, current: RecipientRecord, now: dt.datetime) -> Change:
    address = current.address
    attempt = Attempt(
        at=now,
        host=item.remote_mta,
        code=item.reply_code,
        enhanced=item.status,
        text=f"DSN {item.action.value}" + (f": {item.diagnostic}" if item.diagnostic else ""),
        source="dsn",
    )
    change = _reported(item, current, address, attempt)
    if change.expect and not _accepted(current):
        # Only a server that took the message for this recipient can report on it: anyone
        # who saw the message (its Message-ID, the ENVID) could forge a report, and one
        # that made a recipient never sent DELIVERED or BOUNCED would lose its mail. With
        # no acceptance in its history, the report counts only if, when the store applies
        # it, the recipient is being sent (SENDING: a report can come back before the
        # attempt's answer is recorded) or was accepted meanwhile (DELIVERED); else it is
        # history only, and the recipient is still sent.
        return attrs.evolve(change, expect=change.expect & _REPORTABLE)
    return change


def _reported(
    item: DSNRecipient, current: RecipientRecord, address: Address, attempt: Attempt
) -> Change:
    """What a report block does to a recipient a server accepted."""
    confirmed_already = current.state is State.DELIVERED and current.confirmed
    if item.action is DSNAction.DELIVERED and not confirmed_already:
        # A success DSN from the destination: delivered and confirmed. (Once confirmed,
        # another one, such as a report sent twice, changes nothing: history only, as a
        # second failure DSN for a BOUNCED recipient.)
        return Change(
            address=address,
            state=State.DELIVERED,
            attempt=attempt,
            confirmed=True,
            expect=frozenset({State.DELIVERED, State.DEFERRED, State.QUEUED, State.SENDING}),
        )
    if item.action is DSNAction.FAILED:
        # A failure after relay (DESIGN.md §7): the accepted recipient bounced downstream.
        return Change(
            address=address,
            state=State.BOUNCED,
            attempt=attempt,
            confirmed=False,
            expect=frozenset({State.DELIVERED, State.DEFERRED, State.QUEUED, State.SENDING}),
        )
    # Delayed, relayed, expanded, or a confirmation repeated: history only (no state
    # expects it).
    return Change(address=address, state=State.DELIVERED, attempt=attempt, expect=_HISTORY_ONLY)
