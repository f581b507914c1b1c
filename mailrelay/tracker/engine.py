"""The delivery tracker: durable per-recipient tracking over any :class:`Transport`.

Rules of this module (the theory of operation is in ``docs/tracker.md``):

* The tracker holds no state between calls: everything lives in a
  :class:`~mailrelay.tracker.store.Store`, and no SQL (or any other storage
  detail) appears here, so a store for another database fits unchanged.
* :meth:`DeliveryTracker.submit` returns only after the store has committed the
  message bytes and its envelope: from then on the message is never lost.
* Work is taken by *claiming* due recipients under a lease (see
  :mod:`mailrelay.tracker.store`); a claim's recipients that share a domain go
  in one transaction when ``split_by_domain`` is on (a transport that routes by
  domain, such as ``MXTransport``), or all in one for a smart host.
* Each recipient's fate comes from its own reply: ``TRANSIENT`` → DEFERRED
  (retried per the :class:`~mailrelay.tracker.retry.RetryPolicy`, EXPIRED once
  its maximum age has passed), ``PERMANENT`` → BOUNCED, ``ACCEPTED`` →
  DELIVERED. A :class:`~mailrelay.errors.DeliveryError` decides for every
  recipient of the attempt by its ``is_transient``. Any other exception puts the
  claimed recipients back, due at once, and propagates: never a silent loss.
* A retry is sent only to the recipients still unresolved: the envelope is
  rebuilt with just those.
* Results are committed per delivery transaction, before events fire. A crash
  between a server's acceptance and that commit re-sends on restart (once the
  lease expires): delivery is at-least-once.
* DSNs (RFC 3461/3464): when ``request_dsn`` is set, envelopes carry NOTIFY,
  RET and ENVID (the tracking id). A recipient that bounces or expires is
  reported to the envelope sender with :func:`~mailrelay.tracker.build_dsn`
  through ``dsn_transport``, never to the null reverse-path (RFC 3461 §6.2) and
  not when its NOTIFY excludes FAILURE. :meth:`DeliveryTracker.ingest_dsn`
  folds returned reports into the records.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import platform
import random as _random
import secrets
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Generic, Protocol, TypeVar

import attrs

from mailrelay.address import Address
from mailrelay.envelope import Envelope, Notify, Recipient, Ret
from mailrelay.errors import DeliveryError, InvalidAddress, MessageError
from mailrelay.message import Message
from mailrelay.reply import Reply
from mailrelay.results import DeliveryResult, Outcome, RecipientResult
from mailrelay.tracker.cache import MessageCache
from mailrelay.tracker.dsn import DSNAction, DSNKind, DSNRecipient, DSNReport
from mailrelay.tracker.dsn_build import build_dsn, verp_decode, verp_encode
from mailrelay.tracker.dsn_parse import parse_dsn
from mailrelay.tracker.events import Callback, EventHub, EventKind, TrackerEvent
from mailrelay.tracker.retry import DomainLimits, DomainShaper, RetryPolicy
from mailrelay.tracker.store import (
    Attempt,
    Change,
    Claim,
    MessageRecord,
    RecipientRecord,
    State,
    Store,
    apply_change,
    to_micros,
)
from mailrelay.transport.base import AsyncTransport, BatchItem, Transport, prepare_batch

__all__ = [
    "DSNMatch",
    "DSNRequest",
    "DeliveryTracker",
    "RunSummary",
    "StopSignal",
    "VERP",
]

log = logging.getLogger(__name__)

_ALL_NOTIFY = frozenset({Notify.SUCCESS, Notify.FAILURE, Notify.DELAY})
# The shaper key for a smart-host transport: limits then apply to the relay as a whole.
RELAY_KEY = "*"
_EVENT_KINDS = {
    State.DELIVERED: EventKind.DELIVERED,
    State.DEFERRED: EventKind.DEFERRED,
    State.BOUNCED: EventKind.BOUNCED,
    State.EXPIRED: EventKind.EXPIRED,
}


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
class RunSummary:
    """What one :meth:`DeliveryTracker.run_pending` call did.

    Attributes:
        messages: claims processed (a message counts once per claim).
        delivered, deferred, bounced, expired: recipients that reached each state.
        postponed: recipients put off by per-domain shaping, without an attempt.
    """

    messages: int = 0
    delivered: int = 0
    deferred: int = 0
    bounced: int = 0
    expired: int = 0
    postponed: int = 0

    def __add__(self, other: RunSummary) -> RunSummary:
        if other is _NOTHING:
            return self  # the common case in the run loop: no new object
        if self is _NOTHING:
            return other
        return RunSummary(
            messages=self.messages + other.messages,
            delivered=self.delivered + other.delivered,
            deferred=self.deferred + other.deferred,
            bounced=self.bounced + other.bounced,
            expired=self.expired + other.expired,
            postponed=self.postponed + other.postponed,
        )


_NOTHING = RunSummary()
_ONE_MESSAGE = RunSummary(messages=1)


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


class StopSignal(Protocol):
    """What :meth:`DeliveryTracker.run_forever` needs of a stop flag (``threading.Event`` fits)."""

    def is_set(self) -> bool:
        """Whether to stop."""
        ...

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds for the flag; return whether it is set."""
        ...


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_id(now: dt.datetime) -> str:
    """A tracking id: 32 hex digits, the submission time in microseconds, then 72 random bits.

    Ids of messages submitted later sort later, so the store's indexes (keyed by tracking
    id) grow at their end instead of being written all over.
    """
    return f"{to_micros(now) & 0xFFFF_FFFF_FFFF_FF:014x}{secrets.token_hex(9)}"


def _default_worker() -> str:
    return f"{platform.node() or 'host'}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@attrs.frozen
class _Group:
    """One delivery transaction: a domain's (or all) claimed recipients."""

    key: str
    recipients: tuple[Recipient, ...]


@attrs.frozen
class _Work:
    """A claim with what is needed to act on it."""

    claim: Claim
    record: MessageRecord
    message: Message


@attrs.frozen
class _Outcome:
    """The changes one transaction produced, and what the shaper should learn."""

    changes: tuple[Change, ...]
    refused: bool | None


#: A claimed message's record, and the message itself when still held in memory.
_Entry = tuple[MessageRecord, Message | None]


def _as_claimed(record: MessageRecord, claim: Claim) -> MessageRecord:
    """The record as submitted, with a fresh claim's recipients leased as the store has them."""
    claimed = set(claim.addresses)
    # Built directly rather than with attrs.evolve: this runs for every message sent.
    return MessageRecord(
        id=record.id,
        created_at=record.created_at,
        envelope=record.envelope,
        message_id=record.message_id,
        size=record.size,
        recipients=tuple(
            RecipientRecord(
                address=r.address,
                state=State.SENDING,
                next_attempt_at=r.next_attempt_at,
                lease_owner=claim.worker,
                lease_until=claim.lease_until,
            )
            if r.address in claimed
            else r
            for r in record.recipients
        ),
    )


T = TypeVar("T", Transport, AsyncTransport)


class TrackerCore(Generic[T]):
    """Everything the sync and async trackers share: configuration, records, decisions.

    Not used directly: see :class:`DeliveryTracker` (its docstring describes the
    arguments) and :class:`~mailrelay.tracker.async_engine.AsyncDeliveryTracker`.
    """

    _async_callbacks = False

    def __init__(
        self,
        transport: T,
        store: Store,
        *,
        dsn_transport: T | None = None,
        clock: Callable[[], dt.datetime] = _utc_now,
        random: Callable[[], float] = _random.random,
        retry: RetryPolicy | None = None,
        reporting_mta: str = "localhost",
        request_dsn: DSNRequest | bool | None = None,
        verp: VERP | None = None,
        split_by_domain: bool = False,
        limits: DomainLimits | DomainShaper | None = None,
        worker_id: str | None = None,
        lease: dt.timedelta = dt.timedelta(minutes=15),
        batch_size: int = 100,
        commit_batch: int = 50,
        commit_interval: dt.timedelta = dt.timedelta(seconds=1),
        message_cache: int = 16 << 20,
    ) -> None:
        self.transport: T = transport
        self.dsn_transport: T | None = dsn_transport
        self.store = store
        self.clock = clock
        self.random = random
        self.retry = retry or RetryPolicy()
        self.reporting_mta = reporting_mta
        if request_dsn is True:
            request_dsn = DSNRequest()
        self.request_dsn = request_dsn or None
        self.verp = verp
        self.split_by_domain = split_by_domain
        self.shaper = limits if isinstance(limits, DomainShaper) else DomainShaper(limits)
        self.worker_id = worker_id or _default_worker()
        if lease <= dt.timedelta(0):
            raise ValueError("the lease must be positive")
        self.lease = lease
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.batch_size = batch_size
        if commit_batch < 1:
            raise ValueError("commit_batch must be at least 1")
        self.commit_batch = commit_batch
        if commit_interval < dt.timedelta(0):
            raise ValueError("commit_interval must not be negative")
        self.commit_interval = commit_interval
        self.messages = MessageCache(message_cache)
        self.events = EventHub(allow_async=self._async_callbacks)

    # -- the public, storage-only operations ---------------------------------------

    def on(self, kind: EventKind | str, callback: Callback) -> Callback:
        """Register a callback for ``"delivered"``, ``"deferred"``, ``"bounced"``,
        ``"expired"`` or ``"dsn_received"`` (see :mod:`mailrelay.tracker.events`)."""
        return self.events.on(kind, callback)

    def submit(self, message: Message, envelope: Envelope | None = None) -> str:
        """Store a message for delivery and return its tracking id.

        Returns only after the store has durably committed the message bytes and
        the envelope. With ``request_dsn`` the envelope asks for DSNs (its ENVID
        is the tracking id unless it has one); with ``verp`` its sender becomes
        the per-message VERP address (unless it is the null reverse-path).

        Raises:
            MessageError, InvalidAddress: the envelope cannot be derived or built.
        """
        if envelope is None:
            envelope = Envelope.from_message(message)
        record = self._new_record(message, envelope, self.clock())
        self.store.add(record, message.chunks())
        self.messages.put(message, record)
        log.debug("submitted %s (%d recipients)", record.id, len(record.recipients))
        return record.id

    def submit_many(self, items: Iterable[BatchItem]) -> list[str]:
        """Store several messages in one durable commit; return their tracking ids in order.

        Much faster than calling :meth:`submit` for each (one commit, one disk flush),
        with the same guarantee: every message is stored when this returns, and if it
        raises, none is.

        Args:
            items: messages, or ``(message, envelope)`` pairs.
        """
        now = self.clock()
        entries = []
        pairs = prepare_batch(items)
        for message, envelope in pairs:
            record = self._new_record(message, envelope, now)
            entries.append((record, message.chunks()))
        self.store.add_many(entries)
        for (record, _chunks), (message, _envelope) in zip(entries, pairs, strict=True):
            self.messages.put(message, record)
        return [record.id for record, _ in entries]

    def _new_record(self, message: Message, envelope: Envelope, now: dt.datetime) -> MessageRecord:
        tracking_id = _new_id(now)
        envelope = self._outgoing_envelope(envelope, tracking_id)
        return MessageRecord(
            id=tracking_id,
            created_at=now,
            envelope=envelope,
            message_id=message.message_id,
            size=message.size,
            recipients=tuple(
                RecipientRecord(address=r.address, state=State.QUEUED, next_attempt_at=now)
                for r in envelope.recipients
            ),
        )

    def _outgoing_envelope(self, envelope: Envelope, tracking_id: str) -> Envelope:
        if self.verp is None and self.request_dsn is None:
            return envelope  # nothing to add: skip re-validating every address
        sender: Address | str | None = envelope.sender
        if self.verp is not None and envelope.sender is not None:
            sender = verp_encode(
                self.verp.local, self.verp.domain, tracking_id, separator=self.verp.separator
            )
        ret, envid, notify = envelope.ret, envelope.envid, envelope.notify
        if self.request_dsn is not None:
            # RFC 3461 §4.4: ENVID comes back in every DSN; the tracking id correlates it.
            envid = envid or tracking_id
            ret = ret or self.request_dsn.ret
            notify = notify or self.request_dsn.notify
        return Envelope(
            sender,
            envelope.recipients,
            ret=ret,
            envid=envid,
            notify=notify,
            requiretls=envelope.requiretls,
        )

    def status(self, tracking_id: str) -> MessageRecord:
        """The record of a tracked message: each recipient's state and attempts.

        Raises:
            KeyError: no message with this id.
        """
        record = self.store.get(tracking_id)
        if record is None:
            raise KeyError(tracking_id)
        return record

    def cancel(self, tracking_id: str) -> tuple[Address, ...]:
        """Cancel every unresolved recipient of a message.

        A recipient being sent right now is marked CANCELLED too, but its
        attempt may still deliver (its result is then kept in the history only).

        Returns:
            The recipients cancelled.

        Raises:
            KeyError: no message with this id.
        """
        record = self.status(tracking_id)
        changes = [
            Change(address=r.address, state=State.CANCELLED)
            for r in record.recipients
            if not r.state.is_final
        ]
        return self.store.apply(tracking_id, changes)

    def find(
        self,
        *,
        state: State | None = None,
        older_than: dt.timedelta | None = None,
        limit: int | None = None,
    ) -> list[MessageRecord]:
        """Tracked messages with a recipient in ``state``, submitted more than
        ``older_than`` ago, oldest first (for dashboards and clean-up)."""
        before = None if older_than is None else self.clock() - older_than
        return self.store.find(state=state, created_before=before, limit=limit)

    def next_due(self) -> dt.datetime | None:
        """When the next piece of work becomes due (``None`` when there is none)."""
        return self.store.next_due()

    def _sleep_for(self, idle: float) -> float:
        """Seconds until the next due work, at most ``idle``."""
        due = self.store.next_due()
        if due is None:
            return idle
        return min(idle, max(0.0, (due - self.clock()).total_seconds()))

    # -- attempts: the decisions, with no I/O of their own --------------------------

    def _claim(self) -> list[Claim]:
        return self.store.claim(
            worker=self.worker_id, now=self.clock(), lease=self.lease, limit=self.batch_size
        )

    def _read_batch(self, claims: Sequence[Claim]) -> dict[str, _Entry]:
        """Each claim's record, and its message when still held from :meth:`submit`.

        A fresh claim of a message this tracker submitted needs no read at all (see
        :mod:`mailrelay.tracker.cache`); the other records come in one ``get_many``.
        Claims whose message no longer exists are left out.
        """
        found: dict[str, _Entry] = {}
        missing: list[tuple[str, Message | None]] = []
        for claim in claims:
            held = self.messages.take(claim.tracking_id)
            if held is not None and claim.fresh:
                message, record = held
                found[claim.tracking_id] = (_as_claimed(record, claim), message)
            else:
                missing.append((claim.tracking_id, None if held is None else held[0]))
        if missing:
            records = self.store.get_many([tracking_id for tracking_id, _ in missing])
            for tracking_id, kept in missing:
                if tracking_id in records:
                    found[tracking_id] = (records[tracking_id], kept)
        return found

    def _load(self, claim: Claim, entry: _Entry | None) -> _Work | None:
        """The work for a claim, from what :meth:`_read_batch` found for it."""
        if entry is None:
            return None
        record, message = entry
        if message is None:
            message = Message.from_bytes(self.store.content(claim.tracking_id))
        return _Work(claim=claim, record=record, message=message)

    def _groups(self, work: _Work) -> list[_Group]:
        claimed = set(work.claim.addresses)
        recipients = [r for r in work.record.envelope.recipients if r.address in claimed]
        if not self.split_by_domain:
            return [_Group(RELAY_KEY, tuple(recipients))] if recipients else []
        by_domain: dict[str, list[Recipient]] = {}
        for recipient in recipients:
            by_domain.setdefault(recipient.address.ascii_domain.lower(), []).append(recipient)
        return [_Group(key, tuple(group)) for key, group in by_domain.items()]

    @staticmethod
    def _envelope(record: MessageRecord, group: _Group) -> Envelope:
        # A retry goes only to the recipients still unresolved; each keeps its NOTIFY/ORCPT.
        original = record.envelope
        if group.recipients == original.recipients:
            return original
        return Envelope(
            original.sender,
            group.recipients,
            ret=original.ret,
            envid=original.envid,
            requiretls=original.requiretls,
        )

    @staticmethod
    def _put_back(
        record: MessageRecord, addresses: Iterable[Address], when: dt.datetime
    ) -> list[Change]:
        states = {r.address: r for r in record.recipients}
        changes = []
        for address in addresses:
            previous = states[address]
            tried = any(a.source != "dsn" for a in previous.attempts)
            changes.append(
                Change(
                    address=address,
                    state=State.DEFERRED if tried else State.QUEUED,
                    next_attempt_at=when,
                )
            )
        return changes

    def _failure_change(
        self, work: _Work, address: Address, attempt: Attempt, reply: Reply | None, now: dt.datetime
    ) -> Change:
        previous = work.record.recipient(address)
        retry = sum(1 for a in previous.attempts if a.source != "dsn") + 1
        when = self.retry.next_attempt(
            recipient=address,
            reply=reply,
            retry=retry,
            created_at=work.record.created_at,
            now=now,
            random=self.random,
        )
        if when is None:
            return Change(address=address, state=State.EXPIRED, attempt=attempt)
        return Change(address=address, state=State.DEFERRED, attempt=attempt, next_attempt_at=when)

    def _from_result(
        self, work: _Work, group: _Group, result: DeliveryResult, now: dt.datetime
    ) -> _Outcome:
        by_address: dict[Address, RecipientResult] = {r.address: r for r in result.recipients}
        changes = []
        any_accepted = False
        all_transient = True
        saw_421 = False
        for recipient in group.recipients:
            found = by_address.get(recipient.address)
            if found is None:
                # A transport that skipped a recipient broke its contract: retry it.
                found = RecipientResult(
                    address=recipient.address,
                    outcome=Outcome.TRANSIENT,
                    reason="the transport returned no result for this recipient",
                    host=result.host,
                )
            reply = found.reply
            attempt = Attempt(
                at=now,
                host=found.host or result.host,
                code=None if reply is None else reply.code,
                enhanced=None if reply is None or reply.enhanced is None else str(reply.enhanced),
                text=(reply.text if reply is not None else "") or (found.reason or ""),
                source="reply",
            )
            saw_421 = saw_421 or (reply is not None and reply.code == 421)
            if found.outcome is Outcome.ACCEPTED:
                any_accepted = True
                all_transient = False
                changes.append(
                    Change(address=recipient.address, state=State.DELIVERED, attempt=attempt)
                )
            elif found.outcome is Outcome.PERMANENT:
                all_transient = False
                changes.append(
                    Change(address=recipient.address, state=State.BOUNCED, attempt=attempt)
                )
            else:
                changes.append(self._failure_change(work, recipient.address, attempt, reply, now))
        refused: bool | None
        if saw_421 or (all_transient and changes):
            refused = True
        elif any_accepted:
            refused = False
        else:
            refused = None
        return _Outcome(tuple(changes), refused)

    def _from_error(
        self, work: _Work, group: _Group, error: DeliveryError, now: dt.datetime
    ) -> _Outcome:
        reply = error.reply
        attempt = Attempt(
            at=now,
            host=error.host,
            code=None if reply is None else reply.code,
            enhanced=None if reply is None or reply.enhanced is None else str(reply.enhanced),
            text=f"{type(error).__name__}: {error}",
            source="error",
        )
        changes = []
        for recipient in group.recipients:
            if error.is_transient:
                changes.append(self._failure_change(work, recipient.address, attempt, reply, now))
            else:
                changes.append(
                    Change(address=recipient.address, state=State.BOUNCED, attempt=attempt)
                )
        return _Outcome(tuple(changes), True if error.is_transient else None)

    def _commit_many(
        self, batch: Sequence[tuple[_Work, Sequence[Change]]]
    ) -> tuple[RunSummary, list[TrackerEvent], list[tuple[Message, Envelope]]]:
        """Apply several transactions' changes in one commit; return what they did.

        Returns the counts, the events to fire and the DSNs to send. Events are
        reported only for changes that carry an attempt (putting work back is not an
        event), computed from the claim-time snapshot, so no second read is needed;
        an event nobody listens to is counted but not built.
        """
        if not batch:
            return RunSummary(), [], []
        changed_lists = self.store.apply_many(
            [(work.claim.tracking_id, changes) for work, changes in batch],
            worker=self.worker_id,
        )
        counts = dict.fromkeys(EventKind, 0)
        events: list[TrackerEvent] = []
        dsns: list[tuple[Message, Envelope]] = []
        for (work, changes), changed_list in zip(batch, changed_lists, strict=True):
            if not changed_list:
                continue
            changed = set(changed_list)
            reports = self.dsn_transport is not None and work.record.envelope.sender is not None
            snapshot: dict[Address, RecipientRecord] | None = None
            failed: list[RecipientRecord] = []
            for change in changes:
                kind = _EVENT_KINDS.get(change.state)
                if change.address not in changed or change.attempt is None or kind is None:
                    continue
                counts[kind] += 1
                wanted = self.events.wants(kind)
                failure = reports and change.state in (State.BOUNCED, State.EXPIRED)
                if not (wanted or failure):
                    continue
                if snapshot is None:
                    snapshot = {r.address: r for r in work.record.recipients}
                after, _did = apply_change(
                    snapshot[change.address], change, worker=work.claim.worker
                )
                if wanted:
                    events.append(
                        TrackerEvent(
                            kind=kind,
                            tracking_id=work.record.id,
                            recipient=after,
                            attempt=change.attempt,
                        )
                    )
                if failure:
                    failed.append(after)
            if failed:
                dsns += self._failure_dsns(work.record, work.message.as_bytes(), failed)
        summary = RunSummary(
            delivered=counts[EventKind.DELIVERED],
            deferred=counts[EventKind.DEFERRED],
            bounced=counts[EventKind.BOUNCED],
            expired=counts[EventKind.EXPIRED],
        )
        return summary, events, dsns

    # -- DSNs ---------------------------------------------------------------------

    def _failure_dsns(
        self, record: MessageRecord, content: bytes, failed: Sequence[RecipientRecord]
    ) -> list[tuple[Message, Envelope]]:
        sender = record.envelope.sender
        if not failed or self.dsn_transport is None or sender is None:
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
        try:
            report = build_dsn(
                original=content,
                envelope_sender=str(sender),
                recipients=entries,
                reporting_mta=self.reporting_mta,
                envid=record.envelope.envid,
                ret=None if record.envelope.ret is None else record.envelope.ret.value,
                arrival_date=record.created_at,
                date=self.clock(),
            )
            message = Message.from_bytes(report)
            # RFC 3461 §6.2 / RFC 5321 §4.5.5: a DSN goes out from the null reverse-path.
            return [(message, Envelope(None, [sender]))]
        except (MessageError, InvalidAddress):
            log.exception("could not build a DSN for %s", record.id)
            return []

    def _correlate(self, report: DSNReport) -> tuple[str | None, str | None]:
        if report.envid:
            if self.store.get(report.envid) is not None:
                return report.envid, "envid"
            found = self.store.lookup(envid=report.envid)
            if found:
                return found[-1], "envid"
        if report.original_message_id:
            found = self.store.lookup(message_id=report.original_message_id)
            if found:
                return found[-1], "message-id"
        if self.verp is not None:
            tracking_id = verp_decode(
                report.bounce_address, local=self.verp.local, separator=self.verp.separator
            )
            if tracking_id is not None and self.store.get(tracking_id) is not None:
                return tracking_id, "verp"
        return None, None

    def _ingest(self, raw: bytes) -> tuple[DSNMatch, list[TrackerEvent]]:
        report = parse_dsn(raw)
        if report.kind in (DSNKind.NOT_A_REPORT, DSNKind.AUTO_REPLY, DSNKind.FEEDBACK):
            return DSNMatch(report=report), []
        tracking_id, matched_by = self._correlate(report)
        if tracking_id is None:
            return DSNMatch(report=report), []
        record = self.status(tracking_id)
        now = self.clock()
        changes: list[Change] = []
        named: list[Address] = []
        for item in report.recipients:
            address = _match_recipient(record, item)
            if address is None:
                continue
            named.append(address)
            changes.append(_dsn_change(item, address, now))
        changed = set(self.store.apply(tracking_id, changes)) if changes else set()
        events = [TrackerEvent(kind=EventKind.DSN_RECEIVED, tracking_id=tracking_id, report=report)]
        after = self.status(tracking_id)
        for change in changes:
            if change.address in changed:
                kind = EventKind.DELIVERED if change.state is State.DELIVERED else EventKind.BOUNCED
                events.append(
                    TrackerEvent(
                        kind=kind,
                        tracking_id=tracking_id,
                        recipient=after.recipient(change.address),
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


def _dsn_recipient(record: RecipientRecord, recipient: Recipient) -> DSNRecipient:
    last = next((a for a in reversed(record.attempts) if a.source != "dsn"), None)
    expired = record.state is State.EXPIRED
    status = last.enhanced if last is not None and last.enhanced else None
    if status is None or (expired and not status.startswith("4.")):
        # RFC 3463 §3.5: X.4.7 "delivery time expired".
        status = "4.4.7" if expired else "5.0.0"
    diagnostic = None
    if last is not None and last.text:
        text = " ".join(last.text.split())
        diagnostic = f"smtp; {last.code} {text}" if last.code else text
    return DSNRecipient(
        address=str(record.address),
        action=DSNAction.FAILED,
        status=status,
        diagnostic=diagnostic,
        remote_mta=None if last is None or not last.host else last.host,
        original_recipient=None if recipient.orcpt is None else f"rfc822;{recipient.orcpt}",
        last_attempt_date=None if last is None else _rfc5322_date(last.at),
    )


def _rfc5322_date(when: dt.datetime) -> str:
    return when.strftime("%a, %d %b %Y %H:%M:%S +0000")


def _match_recipient(record: MessageRecord, item: DSNRecipient) -> Address | None:
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
        for recipient in record.recipients:
            if recipient.address == address:
                return address
        # Some servers change the case of the local part: compare loosely as a last resort.
        for recipient in record.recipients:
            if str(recipient.address).lower() == str(address).lower():
                return recipient.address
    return None


def _dsn_change(item: DSNRecipient, address: Address, now: dt.datetime) -> Change:
    attempt = Attempt(
        at=now,
        host=item.remote_mta,
        code=item.reply_code,
        enhanced=item.status,
        text=f"DSN {item.action.value}" + (f": {item.diagnostic}" if item.diagnostic else ""),
        source="dsn",
    )
    if item.action is DSNAction.DELIVERED:
        # A success DSN from the destination: delivered and confirmed.
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
    # Delayed, relayed, expanded: history only (no state expects it).
    return Change(address=address, state=State.DELIVERED, attempt=attempt, expect=frozenset())


class DeliveryTracker(TrackerCore[Transport]):
    """Durable per-recipient delivery tracking over a blocking :class:`Transport`.

    Args:
        transport: how to send (any :class:`~mailrelay.transport.base.Transport`).
        store: where to keep the work (:class:`~mailrelay.tracker.sqlite_store.SQLiteStore`
            for durability, :class:`~mailrelay.tracker.store.MemoryStore` for tests).
        clock: returns the current time (timezone-aware); injected in tests.
        random: returns floats in ``[0, 1)`` for retry jitter; injected in tests.
        retry: the retry policy (default :class:`RetryPolicy()`).
        dsn_transport: where failure DSNs go; ``None`` sends none.
        reporting_mta: our host name for generated DSNs.
        request_dsn: ``True`` or a :class:`DSNRequest` to ask servers for DSNs.
        verp: a :class:`VERP` to use a per-message envelope sender.
        split_by_domain: one transaction per recipient domain (for per-domain
            transports such as ``MXTransport``); ``False`` sends all of a
            message's due recipients in one transaction (a smart host).
        limits: per-domain :class:`DomainLimits` (or a ready :class:`DomainShaper`).
        worker_id: this worker's name in leases (default host:pid:random).
        lease: how long a claim is held before another worker may take it over;
            longer than any delivery attempt can take.
        batch_size: messages claimed at once.
        commit_batch: the most delivery transactions whose results are committed
            together (default 50). Submissions are always committed before
            :meth:`submit` returns; results may wait, because delivery is
            at-least-once: a crash re-sends the transactions delivered but not yet
            committed (at most ``commit_batch``, and at most ``commit_interval`` worth).
            1 commits each result at once (at most the one transaction in flight is
            re-sent). The async tracker commits each transaction at once.
        commit_interval: the longest a result waits for its commit (default 1 s by
            ``clock``), so that a slow server does not hold results (and their events)
            back for ``commit_batch`` transactions.
        message_cache: bytes of submitted messages kept in memory until they are
            sent, so that sending them need not read and parse the stored copy
            (default 16 MiB; 0 keeps none). See :mod:`mailrelay.tracker.cache`.
    """

    def __repr__(self) -> str:
        return f"<DeliveryTracker worker={self.worker_id!r} store={self.store!r}>"

    def ingest_dsn(self, raw: bytes) -> DSNMatch:
        """Read a returned report and fold it into the tracked message it is about.

        Correlates by ENVID, then the original Message-ID, then the VERP address
        the report was sent to. A success DSN marks the recipient DELIVERED and
        confirmed; a failure DSN (after relay) marks it BOUNCED. Fires
        ``dsn_received`` (and ``delivered``/``bounced`` for changed recipients).
        """
        match, events = self._ingest(raw)
        for event in events:
            self.events.fire(event)
        return match

    def run_pending(self, *, max_rounds: int = 1000) -> RunSummary:
        """Send everything due now, then return what was done.

        Claims batches until nothing is due (at most ``max_rounds`` batches).

        Raises:
            Exception: whatever a transport raised that is not a
                :class:`~mailrelay.errors.DeliveryError` (after putting the
                claimed recipients back, due at once).
        """
        summary = _NOTHING
        for _ in range(max_rounds):
            claims = self._claim()
            if not claims:
                break
            pending: list[tuple[_Work, Sequence[Change]]] = []
            oldest: dt.datetime | None = None  # when the first uncommitted result came in
            try:
                try:
                    records = self._read_batch(claims)
                except BaseException:
                    self._release_claims(claims)
                    raise
                for index, claim in enumerate(claims):
                    try:
                        summary += self._process(claim, records.get(claim.tracking_id), pending)
                    except BaseException:
                        # The claims after this one were never started: give them back.
                        self._release_claims(claims[index + 1 :])
                        raise
                    if not pending:
                        continue
                    now = self.clock()
                    oldest = oldest or now
                    if len(pending) >= self.commit_batch or now - oldest >= self.commit_interval:
                        summary += self._flush(pending)
                        oldest = None
            finally:
                # Results already in hand are committed even when an error propagates.
                summary += self._flush(pending)
        return summary

    def _flush(self, pending: list[tuple[_Work, Sequence[Change]]]) -> RunSummary:
        batch = list(pending)
        pending.clear()
        summary, events, dsns = self._commit_many(batch)
        for event in events:
            self.events.fire(event)
        for message, envelope in dsns:
            self._send_dsn(message, envelope)
        return summary

    def _release_claims(self, claims: Sequence[Claim]) -> None:
        now = self.clock()
        for claim in claims:
            record = self.store.get(claim.tracking_id)
            if record is None:
                continue
            self.store.apply(
                claim.tracking_id,
                self._put_back(record, claim.addresses, now),
                worker=claim.worker,
            )

    def _process(
        self,
        claim: Claim,
        entry: _Entry | None,
        pending: list[tuple[_Work, Sequence[Change]]],
    ) -> RunSummary:
        try:
            work = self._load(claim, entry)
        except BaseException:
            self._release_claims([claim])
            raise
        if work is None:
            return _NOTHING
        summary = _ONE_MESSAGE
        groups = self._groups(work)
        for index, group in enumerate(groups):
            try:
                summary += self._transaction(work, group, pending)
            except BaseException:
                unsent = [r.address for g in groups[index:] for r in g.recipients]
                self.store.apply(
                    claim.tracking_id,
                    self._put_back(work.record, unsent, self.clock()),
                    worker=claim.worker,
                )
                raise
        return summary

    def _transaction(
        self, work: _Work, group: _Group, pending: list[tuple[_Work, Sequence[Change]]]
    ) -> RunSummary:
        now = self.clock()
        wait = self.shaper.acquire(group.key, now)
        if wait is not None:
            addresses = [r.address for r in group.recipients]
            pending.append((work, self._put_back(work.record, addresses, wait)))
            return RunSummary(postponed=len(addresses))
        refused: bool | None = None
        try:
            try:
                result = self.transport.deliver(work.message, self._envelope(work.record, group))
            except DeliveryError as error:
                outcome = self._from_error(work, group, error, self.clock())
            else:
                outcome = self._from_result(work, group, result, self.clock())
            refused = outcome.refused
        finally:
            self.shaper.release(group.key, self.clock(), refused=refused)
        pending.append((work, outcome.changes))
        return _NOTHING

    def _send_dsn(self, message: Message, envelope: Envelope) -> None:
        assert self.dsn_transport is not None
        try:
            result = self.dsn_transport.deliver(message, envelope)
        except Exception:
            log.exception("could not send a DSN to %s", envelope.recipients[0].address)
            return
        if not result.ok:
            log.warning("the DSN to %s was refused", envelope.recipients[0].address)

    def run_forever(
        self,
        stop: StopSignal | None = None,
        *,
        sleep: Callable[[float], object] | None = None,
        idle: float = 60.0,
        max_loops: int | None = None,
    ) -> None:
        """Send due work until ``stop`` is set, sleeping until the next due time in between.

        Args:
            stop: the stop flag (a ``threading.Event``); checked between batches, so
                an attempt in progress always finishes and is recorded.
            sleep: ``sleep(seconds)``; the default waits on ``stop`` so that setting it
                wakes the loop at once. Tests pass one that advances a fake clock.
            idle: the longest sleep (new submissions from other processes are noticed
                at least this often).
            max_loops: stop after this many loops (``None``: only ``stop`` ends it).
        """
        stop = stop or threading.Event()
        sleeper = sleep or stop.wait
        loops = 0
        while not stop.is_set() and (max_loops is None or loops < max_loops):
            loops += 1
            self.run_pending()
            if stop.is_set():
                break
            sleeper(self._sleep_for(idle))

    def close(self) -> None:
        """Close the store and the transports."""
        self.store.close()
        self.transport.close()
        if self.dsn_transport is not None:
            self.dsn_transport.close()
