"""What the sync and async trackers share: configuration, submission, records, commits.

Rules of this module (the theory of operation is in ``docs/tracker.md``):

* The tracker holds no state between calls that matters for correctness: everything
  lives in a :class:`~mailrelay.tracker.store.Store`, and no SQL (or any other storage
  detail) appears here, so a store for another database fits unchanged. (What it does
  keep, the messages it submitted and has not sent yet, only saves reading them back:
  see :mod:`mailrelay.tracker.cache`.)
* :meth:`TrackerCore.submit` returns only after the store has committed the message
  bytes and its envelope: from then on the message is never lost.
* Work is taken by *claiming* due recipients under a lease (see
  :mod:`mailrelay.tracker.store`); a claim's recipients that share a domain go in one
  transaction when ``split_by_domain`` is on (a transport that routes by domain, such
  as ``MXTransport``), or all in one for a smart host.
* What each attempt does to each recipient is decided in
  :mod:`mailrelay.tracker.transitions`; DSN requests, reports and correlation live in
  :mod:`mailrelay.tracker.notifications`. A retry is sent only to the recipients still
  unresolved: the envelope is rebuilt with just those.
* Results are committed in batches (:meth:`TrackerCore._commit_many`, one store
  transaction), before their events fire. A crash between a server's acceptance and
  that commit re-sends on restart (once the lease expires): delivery is at-least-once.
* A failure DSN is queued in the very transaction that records the bounce or expiry it
  reports (the store's ``then``): a tracked message of its own
  (:attr:`MessageRecord.notification <mailrelay.tracker.store.MessageRecord.notification>`),
  claimed, sent through ``dsn_transport`` (or ``transport`` when there is none), retried
  and recorded like any other, but firing no events. A crash can lose neither the bounce
  without its report nor the report of a recorded bounce; at worst both happen again.
* A delay warning (``delay_warning_after``) is queued the same way, in the transaction
  that records the deferral calling for it together with the recipient's
  ``delay_warned`` mark: one report per message for the recipients of one commit, at
  most one per recipient ever, none lost by a crash. With ``delay_warning_after=None``
  (the default) the only cost per result is the ``None`` check where a deferral is
  decided.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import os
import platform
import random as _random
import secrets
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Generic, TypeVar

import attrs

from mailrelay._slots import new_instance, slot_setters
from mailrelay.address import Address
from mailrelay.envelope import Envelope, Recipient
from mailrelay.errors import ConfigurationError, InvalidAddress, MessageError, StoreError
from mailrelay.message import Message
from mailrelay.results import DeliveryResult
from mailrelay.tracker.cache import MessageCache
from mailrelay.tracker.events import Callback, EventHub, EventKind, TrackerEvent
from mailrelay.tracker.notifications import (
    VERP,
    DSNMatch,
    DSNRequest,
    delay_dsns,
    failure_dsns,
    ingest,
    outgoing_envelope,
)
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
    new_change,
    queued_record,
    recipient_lookup,
    to_micros,
)
from mailrelay.tracker.transitions import (
    AttemptMemo,
    Decision,
    from_result,
    put_back,
)
from mailrelay.transport.base import AsyncTransport, BatchItem, Transport, prepare_batch

__all__ = ["RELAY_KEY", "Entry", "Group", "RunSummary", "TrackerCore", "Unreadable", "Work"]

log = logging.getLogger(__name__)

# The shaper key for a smart-host transport: limits then apply to the relay as a whole.
RELAY_KEY = "*"
_EVENT_KINDS = {
    State.DELIVERED: EventKind.DELIVERED,
    State.DEFERRED: EventKind.DEFERRED,
    State.BOUNCED: EventKind.BOUNCED,
    State.EXPIRED: EventKind.EXPIRED,
}
# The states a failure DSN reports.
_FAILED = frozenset({State.BOUNCED, State.EXPIRED})
# The most cancelled messages a tracker remembers (see TrackerCore.cancel).
_CANCELLED_LIMIT = 4096


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
        if other is NOTHING_DONE:
            return self  # the common case in the run loop: no new object
        if self is NOTHING_DONE:
            return other
        return RunSummary(
            messages=self.messages + other.messages,
            delivered=self.delivered + other.delivered,
            deferred=self.deferred + other.deferred,
            bounced=self.bounced + other.bounced,
            expired=self.expired + other.expired,
            postponed=self.postponed + other.postponed,
        )


#: The first pause (seconds) of ``run_forever`` / ``arun_forever`` after a transient store
#: failure; each further failure in a row doubles it, up to the loop's ``idle``.
STORE_RETRY = 1.0


def store_failed(exc: StoreError, pause: float, idle: float) -> tuple[float, float]:
    """Log a transient store failure of the run loop; return how long to wait now and
    the pause after a further failure."""
    wait = min(pause, idle)
    log.warning("the store failed (%s); the run loop tries again in %.0f s", exc, wait)
    return wait, min(pause * 2, idle)


#: Shared summaries for the run loop's common cases (values are immutable, so sharing is safe).
NOTHING_DONE = RunSummary()
ONE_MESSAGE = RunSummary(messages=1)


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _queued_record(
    tracking_id: str,
    message: Message,
    envelope: Envelope,
    now: dt.datetime,
    *,
    notification: bool = False,
) -> MessageRecord:
    """A new message's record: every recipient QUEUED and due ``now``."""
    return queued_record(
        id=tracking_id,
        created_at=now,
        envelope=envelope,
        message_id=message.message_id,
        size=message.size,
        addresses=[r.address for r in envelope.recipients],
        notification=notification,
    )


def _id_prefix(now: dt.datetime) -> str:
    """The first 14 hex digits of the tracking ids made at ``now``: the time in microseconds."""
    return f"{to_micros(now) & 0xFFFF_FFFF_FFFF_FF:014x}"


def _new_id(now: dt.datetime) -> str:
    """A tracking id: 32 hex digits, the submission time in microseconds, then 72 random bits.

    Ids of messages submitted later sort later, so the store's indexes (keyed by tracking
    id) grow at their end instead of being written all over.
    """
    return _id_prefix(now) + secrets.token_hex(9)


def _new_ids(now: dt.datetime, count: int) -> list[str]:
    """``count`` ids as :func:`_new_id` makes them, at ``now``: the time is formatted once
    and the random bits drawn in one call (a batch of submissions shares its time)."""
    prefix = _id_prefix(now)
    random = secrets.token_hex(9 * count)
    return [prefix + random[i : i + 18] for i in range(0, 18 * count, 18)]


def _default_worker() -> str:
    return f"{platform.node() or 'host'}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@attrs.frozen
class Group:
    """One delivery transaction: a domain's (or all) claimed recipients."""

    key: str
    recipients: tuple[Recipient, ...]


@attrs.frozen
class Work:
    """A claim with what is needed to act on it.

    ``record`` is the record read when the batch was claimed, or, for a fresh claim of a
    message still held from submit, the record as submitted. The two differ only in the
    claimed recipients' state and lease (QUEUED and none instead of SENDING and ours):
    those recipients have no history either way, and no decision reads their state.
    """

    claim: Claim
    record: MessageRecord
    message: Message


# Fast builders (see mailrelay._slots): a Work per claimed message and a Group per
# transaction, for every message the runner sends. Neither class has a validator.
_set_group_key, _set_group_recipients = slot_setters(Group, ("key", "recipients"))
_set_work_claim, _set_work_record, _set_work_message = slot_setters(
    Work, ("claim", "record", "message")
)


def new_group(key: str, recipients: tuple[Recipient, ...]) -> Group:
    """``Group(key, recipients)``, built without attrs' ``__init__``."""
    group: Group = new_instance(Group)
    _set_group_key(group, key)
    _set_group_recipients(group, recipients)
    return group


def new_work(claim: Claim, record: MessageRecord, message: Message) -> Work:
    """``Work(claim=claim, record=record, message=message)``, built without attrs' ``__init__``."""
    work: Work = new_instance(Work)
    _set_work_claim(work, claim)
    _set_work_record(work, record)
    _set_work_message(work, message)
    return work


#: A claimed message's record, and the message itself when still held in memory.
Entry = tuple[MessageRecord, Message | None]


class Unreadable(Exception):
    """A claimed message whose stored bytes ``Message.from_bytes`` refuses (see
    :meth:`TrackerCore._reject_unreadable`): the claim, its record, the bytes, the error."""

    def __init__(
        self, claim: Claim, record: MessageRecord, content: bytes, error: Exception
    ) -> None:
        super().__init__(f"{record.id}: {error}")
        self.claim = claim
        self.record = record
        self.content = content
        self.error = error


T = TypeVar("T", Transport, AsyncTransport)


class TrackerCore(Generic[T]):
    """Everything the sync and async trackers share: configuration, records, decisions.

    Not used directly: see :class:`DeliveryTracker` (its docstring describes the
    arguments) and :class:`~mailrelay.tracker.async_engine.AsyncDeliveryTracker`.
    """

    _async_callbacks = False
    # Seconds per transaction of the last chunk sent, by ``clock`` (None: nothing sent yet).
    _pace: float | None = None

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
        delay_warning_after: dt.timedelta | None = None,
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
        if delay_warning_after is not None:
            if dsn_transport is None:
                # Reports are generated only with a dsn_transport (as failure reports):
                # without one, the setting would mark recipients warned and warn nobody.
                raise ConfigurationError("delay_warning_after needs a dsn_transport")
            if delay_warning_after < dt.timedelta(0):
                raise ConfigurationError("delay_warning_after must not be negative")
        self.delay_warning_after = delay_warning_after
        if request_dsn is True:
            request_dsn = DSNRequest()
        self.request_dsn = request_dsn or None
        self.verp = verp
        self.split_by_domain = split_by_domain
        self.shaper = limits if isinstance(limits, DomainShaper) else DomainShaper(limits)
        self.worker_id = worker_id or _default_worker()
        if lease <= dt.timedelta(0):
            raise ConfigurationError("the lease must be positive")
        self.lease = lease
        if batch_size < 1:
            raise ConfigurationError("batch_size must be at least 1")
        self.batch_size = batch_size
        if commit_batch < 1:
            raise ConfigurationError("commit_batch must be at least 1")
        self.commit_batch = commit_batch
        if commit_interval < dt.timedelta(0):
            raise ConfigurationError("commit_interval must not be negative")
        self.commit_interval = commit_interval
        self.messages = MessageCache(message_cache)
        self.events = EventHub(allow_async=self._async_callbacks, own_failure=self._own_failure)
        # Set when this tracker stores new work (submit, submit_many), from any thread:
        # it ends the runner's sleep between batches (run_forever, arun_forever), so that
        # a message submitted to an idle runner in this process goes out at once instead
        # of after ``idle`` seconds. Work stored by other processes is still noticed by
        # polling (``idle``).
        self._submitted = threading.Event()
        # The messages cancelled through this tracker (see cancel): a transaction of a
        # claimed batch whose message was cancelled after the claim is not sent. (Cancels
        # by other processes are seen only through the store, at the next claim.)
        self._cancelled: set[str] = set()

    @staticmethod
    def _own_failure(_exc: BaseException) -> bool:
        """Whether a callback's ``BaseException`` (not an ``Exception``) is its own
        failure, to log and skip; the sync tracker lets every one propagate."""
        return False

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
        self._wake()
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
        pairs = prepare_batch(items)
        ids = _new_ids(now, len(pairs))
        held = [
            (message, self._new_record(message, envelope, now, tracking_id))
            for (message, envelope), tracking_id in zip(pairs, ids, strict=True)
        ]
        self.store.add_many([(record, message.chunks()) for message, record in held])
        self.messages.put_many(held)
        self._wake()
        return ids

    def _wake(self) -> None:
        """Tell a sleeping runner of this tracker that new work is stored (see ``_submitted``)."""
        self._submitted.set()

    def _new_record(
        self,
        message: Message,
        envelope: Envelope,
        now: dt.datetime,
        tracking_id: str | None = None,
    ) -> MessageRecord:
        tracking_id = tracking_id or _new_id(now)
        envelope = outgoing_envelope(
            envelope, tracking_id, request_dsn=self.request_dsn, verp=self.verp
        )
        return _queued_record(tracking_id, message, envelope, now)

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
        A batch this tracker's runner claimed and has not sent yet leaves the
        message out; through another tracker or process, only later claims see it.

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
        cancelled = self.store.apply(tracking_id, changes)
        if cancelled:
            # Committed: a batch this tracker's runner claimed before may hold the message,
            # not sent yet; the runner now leaves it out (see _take_chunk). Every
            # unresolved recipient is cancelled, so no later claim can hold it again.
            if len(self._cancelled) >= _CANCELLED_LIMIT:
                self._cancelled.clear()  # forgetting only lets a claimed copy go out
            self._cancelled.add(tracking_id)
        return cancelled

    def release_leases(self) -> int:
        """Make every recipient leased to this tracker's ``worker_id`` due again at once;
        return how many.

        For a worker whose ``worker_id`` stays the same across restarts: called at
        start-up, before the runner, it sends what the previous run had claimed when it
        died now, instead of once its leases expire (``lease``, 15 minutes by default).
        Each recipient goes back as a put-back does: QUEUED if never tried, DEFERRED if
        tried, no attempt recorded. Never call it while another live process uses the
        same ``worker_id``: what that process is sending would be sent again.
        """
        now = self.clock()
        worker = self.worker_id
        released = 0
        for record in self.store.find(state=State.SENDING):
            mine = [
                r.address
                for r in record.recipients
                if r.state is State.SENDING and r.lease_owner == worker
            ]
            if mine:
                changes = self._put_back(record, mine, now)
                released += len(self.store.apply(record.id, changes, worker=worker))
        if released:
            log.info("released %d recipients leased to %s by an earlier run", released, worker)
            self._wake()
        return released

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

    def _read_batch(self, claims: Sequence[Claim]) -> dict[str, Entry]:
        """Each claim's record, and its message when still held from :meth:`submit`.

        A fresh claim of a message this tracker submitted needs no read at all (see
        :mod:`mailrelay.tracker.cache`); the other records come in one ``get_many``.
        Claims whose message no longer exists are left out.
        """
        found: dict[str, Entry] = {}
        missing: list[tuple[str, Message | None]] = []
        taken = self.messages.take_many([claim.tracking_id for claim in claims])
        for claim in claims:
            held = taken.get(claim.tracking_id)
            if held is not None and claim.fresh:
                message, record = held
                found[claim.tracking_id] = (record, message)
            else:
                missing.append((claim.tracking_id, None if held is None else held[0]))
        if missing:
            records = self.store.get_many([tracking_id for tracking_id, _ in missing])
            for tracking_id, kept in missing:
                if tracking_id in records:
                    found[tracking_id] = (records[tracking_id], kept)
        return found

    def _load(self, claim: Claim, entry: Entry | None) -> Work | None:
        """The work for a claim, from what :meth:`_read_batch` found for it.

        Raises:
            Unreadable: the stored message cannot be parsed back (see
                :meth:`_reject_unreadable`).
        """
        if entry is None:
            return None
        record, message = entry
        if message is None:
            content = self.store.content(claim.tracking_id)
            try:
                message = Message.from_bytes(content)
            except (MessageError, InvalidAddress) as exc:
                raise Unreadable(claim, record, content, exc) from exc
        return new_work(claim, record, message)

    def _reject_unreadable(self, failed: Unreadable) -> tuple[RunSummary, list[TrackerEvent]]:
        """Bounce the claimed recipients of a stored message that cannot be parsed back.

        The stored bytes never change, so no later try can send it (it was stored by a
        ``Message`` that ``Message.from_bytes`` refuses, say a header block over
        ``MAX_HEADER_BYTES``): put back, it would be claimed first at every run and
        stop the runner each time, holding up everything queued behind it. So it is
        decided now, under the claim's lease: BOUNCED, with the reason in an
        ``"error"`` attempt, a failure DSN queued in the same commit (quoting the stored
        bytes; none for the null reverse-path), and its events to fire.
        """
        claim, record = failed.claim, failed.record
        now = self.clock()
        attempt = Attempt(
            at=now,
            text=f"{type(failed.error).__name__}: the stored message cannot be read back"
            f" to be sent: {failed.error}",
            source="error",
        )
        changes = [new_change(address, State.BOUNCED, attempt) for address in claim.addresses]
        reports: list[tuple[Message, MessageRecord]] = []

        def then(
            changed_lists: Sequence[tuple[Address, ...]],
        ) -> list[tuple[MessageRecord, Iterable[bytes]]]:
            changed = set(changed_lists[0])
            find = recipient_lookup(record)
            bounced = [
                apply_change(find(change.address), change, worker=None)[0]
                for change in changes
                if change.address in changed
            ]
            dsns = failure_dsns(
                record, failed.content, bounced, reporting_mta=self.reporting_mta, date=now
            )
            for message, envelope in dsns:
                reports.append((message, self._notification_record(message, envelope, now)))
            return [(report, message.chunks()) for message, report in reports]

        reporting = self.dsn_transport is not None and record.envelope.sender is not None
        log.error("cannot send %s: %s", record.id, attempt.text)
        changed = self.store.apply_many(
            [(claim.tracking_id, changes)], worker=claim.worker, then=then if reporting else None
        )[0]
        for message, report in reports:
            self.messages.put(message, report)
        events = []
        if not record.notification and self.events.wants(EventKind.BOUNCED):
            find = recipient_lookup(record)
            events = [
                TrackerEvent(
                    kind=EventKind.BOUNCED,
                    tracking_id=record.id,
                    recipient=apply_change(find(change.address), change, worker=None)[0],
                    attempt=attempt,
                )
                for change in changes
                if change.address in changed
            ]
        return RunSummary(bounced=len(changed)), events

    def _groups(self, work: Work) -> list[Group]:
        everyone = work.record.envelope.recipients
        recipients: Sequence[Recipient]
        if len(work.claim.addresses) == len(everyone):
            # A claim holds at most one entry per recipient row: all of them (a first
            # attempt, the common case) needs no filtering.
            recipients = everyone
        else:
            claimed = set(work.claim.addresses)
            recipients = [r for r in everyone if r.address in claimed]
        if not self.split_by_domain:
            if not recipients:
                return []
            return [
                new_group(RELAY_KEY, recipients if type(recipients) is tuple else tuple(recipients))
            ]
        by_domain: dict[str, list[Recipient]] = {}
        for recipient in recipients:
            by_domain.setdefault(recipient.address.ascii_domain.lower(), []).append(recipient)
        return [new_group(key, tuple(group)) for key, group in by_domain.items()]

    @staticmethod
    def _envelope(record: MessageRecord, group: Group) -> Envelope:
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
        return put_back(record, addresses, when)

    def _chunk_limit(self, room: int) -> int:
        """How many transactions the next ``send_many`` (``asend_many``) call may carry.

        At most ``room`` (``commit_batch`` less the results awaiting their commit), and
        no more than take ``commit_interval`` at the pace of the last chunk: a slow
        server then gets small chunks, so its results are not held back. The first
        chunk a tracker sends, with no pace known yet, is a single transaction.
        """
        pace = self._pace
        if pace is None:
            return 1
        if pace <= 0:
            return room
        return max(1, min(room, int(self.commit_interval.total_seconds() / pace)))

    def _take_chunk(
        self,
        queue: deque[tuple[Work, Group]],
        pending: list[tuple[Work, Sequence[Change]]],
        room: int,
    ) -> tuple[list[tuple[Work, Group]], int]:
        """Take the next transactions to send together, with a shaper slot per domain.

        Returns the chunk and how many recipients were put off.

        A chunk takes one slot per domain (:meth:`DomainShaper.acquire`): one
        ``send_many`` call is one delivery to each of its domains, released once with
        what the domain said last (see :meth:`_send_chunk`), so a chunk refused whole
        backs its domain off once, not once per message. A transaction the shaper holds
        off is put back (into ``pending``) instead, as is one whose claim's lease has run
        out (the batch took longer than the lease: another worker may hold it now). A
        domain with a concurrency or rate limit (:meth:`DomainShaper.paces`) ends the
        chunk at its transaction, so that
        its limits count transactions one at a time. A chunk goes to one transport, so
        it ends where generated DSNs and the application's messages meet.
        """
        limit = self._chunk_limit(max(1, room))
        chunk: list[tuple[Work, Group]] = []
        held: set[str] = set()  # the domains this chunk holds a slot for
        postponed = 0
        now = self.clock()
        cancelled = self._cancelled
        while queue and len(chunk) < limit:
            if chunk and queue[0][0].record.notification != chunk[0][0].record.notification:
                break
            work, group = queue.popleft()
            if cancelled and work.claim.tracking_id in cancelled:
                # Cancelled through this tracker since the claim (its recipients are
                # CANCELLED in the store already): nothing to send or record.
                continue
            if work.claim.lease_until <= now:
                # The lease, stamped on the whole batch at its claim, ran out while the
                # chunks before this one were sent: another worker may have claimed and
                # sent these recipients since. Not sent; put back (which applies only if
                # they are still ours), they are claimed afresh.
                addresses = [r.address for r in group.recipients]
                pending.append((work, self._put_back(work.record, addresses, now)))
                continue
            if group.key in held:
                # A domain already in this chunk does not pace (the chunk would have ended
                # at its first transaction), so it needs no second look at the shaper.
                chunk.append((work, group))
                continue
            wait = self.shaper.acquire(group.key, now)
            if wait is not None:
                addresses = [r.address for r in group.recipients]
                pending.append((work, self._put_back(work.record, addresses, wait)))
                postponed += len(addresses)
                continue
            held.add(group.key)
            chunk.append((work, group))
            if self.shaper.paces(group.key):
                break
        return chunk, postponed

    def _chunk_items(self, chunk: Sequence[tuple[Work, Group]]) -> list[tuple[Message, Envelope]]:
        """What one ``send_many`` / ``asend_many`` call sends for ``chunk``."""
        return [(work.message, self._envelope(work.record, group)) for work, group in chunk]

    def _put_back_groups(
        self, undecided: Iterable[tuple[Work, Group]]
    ) -> list[tuple[Work, Sequence[Change]]]:
        """Changes that make every recipient of ``undecided`` due again now (no attempt)."""
        when = self.clock()
        return [
            (work, self._put_back(work.record, [r.address for r in group.recipients], when))
            for work, group in undecided
        ]

    def _release_domains(self, verdicts: dict[str, bool | None]) -> None:
        """Give back a chunk's shaper slots, with what each domain said last."""
        released = self.clock()
        for key, verdict in verdicts.items():
            self.shaper.release(key, released, refused=verdict)

    def _decide_chunk(
        self,
        sent_by: str,
        chunk: Sequence[tuple[Work, Group]],
        results: Sequence[DeliveryResult],
        started: dt.datetime,
        verdicts: dict[str, bool | None],
    ) -> list[tuple[Work, Sequence[Change]]]:
        """Each transaction's decision from a chunk's results (in order), noting in
        ``verdicts`` what each domain said last and the pace of the chunk. ``sent_by``
        names the call that returned the results, for the error.

        Raises:
            RuntimeError: the transport returned a result count other than the chunk's.
        """
        now = self.clock()
        if len(results) != len(chunk):
            raise RuntimeError(
                f"{sent_by} returned {len(results)} results for {len(chunk)} messages"
            )
        attempts: AttemptMemo = {}
        retry, random, warn_after = self.retry, self.random, self.delay_warning_after
        decisions: list[tuple[Work, Sequence[Change]]] = []
        for (work, group), result in zip(chunk, results, strict=True):
            # from_result directly, not _from_result: this runs for every message sent.
            outcome = from_result(
                work.record,
                group.recipients,
                result,
                now=now,
                retry=retry,
                random=random,
                attempts=attempts,
                delay_warning_after=warn_after,
            )
            decisions.append((work, outcome.changes))
            if outcome.refused is not None:
                verdicts[group.key] = outcome.refused
        self._pace = (now - started).total_seconds() / len(chunk)
        return decisions

    def _from_result(
        self,
        work: Work,
        group: Group,
        result: DeliveryResult,
        now: dt.datetime,
        attempts: AttemptMemo | None = None,
    ) -> Decision:
        return from_result(
            work.record,
            group.recipients,
            result,
            now=now,
            retry=self.retry,
            random=self.random,
            attempts=attempts,
            delay_warning_after=self.delay_warning_after,
        )

    def _transport_for(self, work: Work) -> T:
        """Where a claimed message goes: a generated DSN through ``dsn_transport``."""
        if work.record.notification and self.dsn_transport is not None:
            return self.dsn_transport
        return self.transport

    def _commit_many(
        self, batch: Sequence[tuple[Work, Sequence[Change]]]
    ) -> tuple[RunSummary, list[TrackerEvent]]:
        """Apply several transactions' changes in one commit; return what they did.

        Returns the counts and the events to fire. Events are reported only for changes
        that carry an attempt (putting work back is not an event), computed from the
        claim-time snapshot, so no second read is needed; an event nobody listens to is
        counted but not built.
        """
        if not batch:
            return RunSummary(), []
        return self._report(batch, self._store_results(batch))

    def _store_results(
        self, batch: Sequence[tuple[Work, Sequence[Change]]]
    ) -> list[tuple[Address, ...]]:
        """Apply several transactions' changes in one store transaction (no events).

        The failure DSNs they call for are queued in the same transaction (see the
        module docstring). Safe to call from another thread than the runner's: the
        stores and the message cache are thread-safe.
        """
        if not batch:
            return []
        reports: list[tuple[Message, MessageRecord]] = []
        then = functools.partial(self._failure_reports, batch, reports)
        changed = self.store.apply_many(
            [(work.claim.tracking_id, changes) for work, changes in batch],
            worker=self.worker_id,
            then=then if self._may_report(batch) else None,
        )
        # Committed: hold the reports in memory, so that sending them reads nothing back.
        for message, record in reports:
            self.messages.put(message, record)
        return changed

    def _may_report(self, batch: Sequence[tuple[Work, Sequence[Change]]]) -> bool:
        """Whether a failure DSN or delay warning may follow from ``batch`` (if not, none
        is looked for)."""
        if self.dsn_transport is None:
            return False
        return any(
            work.record.envelope.sender is not None
            and any(
                (change.state in _FAILED and change.attempt is not None) or change.delay_warned
                for change in changes
            )
            for work, changes in batch
        )

    def _failure_reports(
        self,
        batch: Sequence[tuple[Work, Sequence[Change]]],
        reports: list[tuple[Message, MessageRecord]],
        changed_lists: Sequence[tuple[Address, ...]],
    ) -> list[tuple[MessageRecord, Iterable[bytes]]]:
        """The failure DSNs and delay warnings that the applied changes call for, as new
        messages to store.

        Called by the store inside the transaction that records the changes, with what
        it changed: only a bounce or expiry that is recorded is reported, and only a
        deferral whose ``delay_warned`` mark is recorded is warned about. Each DSN is
        also appended to ``reports`` with its record.
        """
        now = self.clock()
        entries: list[tuple[MessageRecord, Iterable[bytes]]] = []
        # Gathered by message first: with split_by_domain one message is several
        # transactions of the batch, and its recipients of one commit share one report.
        gathered: dict[
            str,
            tuple[
                Work, dict[Address, RecipientRecord], list[RecipientRecord], list[RecipientRecord]
            ],
        ] = {}
        for (work, changes), changed_list in zip(batch, changed_lists, strict=True):
            if not changed_list or work.record.envelope.sender is None:
                continue
            changed = set(changed_list)
            for change in changes:
                reported = change.state in _FAILED and change.attempt is not None
                if (reported or change.delay_warned) and change.address in changed:
                    slot = gathered.get(work.record.id)
                    if slot is None:
                        snapshot = {r.address: r for r in work.record.recipients}
                        slot = gathered[work.record.id] = (work, snapshot, [], [])
                    # Applied by the store, so applied here the same way (no lease check:
                    # the snapshot may be the submitted record, see Work).
                    after, _did = apply_change(slot[1][change.address], change, worker=None)
                    (slot[3] if change.delay_warned else slot[2]).append(after)
        for work, _snapshot, failed, delayed in gathered.values():
            if len(failed) + len(delayed) > 1:
                # In envelope order, whichever transaction each came from.
                order = {r.address: i for i, r in enumerate(work.record.recipients)}
                failed.sort(key=lambda r: order[r.address])
                delayed.sort(key=lambda r: order[r.address])
            content = work.message.as_bytes()
            dsns = failure_dsns(
                work.record, content, failed, reporting_mta=self.reporting_mta, date=now
            )
            if delayed:
                dsns += delay_dsns(
                    work.record,
                    content,
                    delayed,
                    reporting_mta=self.reporting_mta,
                    date=now,
                    # The retry policy's deadline (RetryPolicy.next_attempt): the last
                    # try is made then, and a recipient still refused expires.
                    retry_until=work.record.created_at + dt.timedelta(seconds=self.retry.max_age),
                )
            for message, envelope in dsns:
                record = self._notification_record(message, envelope, now)
                reports.append((message, record))
                entries.append((record, message.chunks()))
        return entries

    @staticmethod
    def _notification_record(
        message: Message, envelope: Envelope, now: dt.datetime
    ) -> MessageRecord:
        # Sent as built: no DSN request and no VERP sender (it goes from the null
        # reverse-path, so nothing reports on it, RFC 3461 §6.2).
        return _queued_record(_new_id(now), message, envelope, now, notification=True)

    def _report(
        self,
        batch: Sequence[tuple[Work, Sequence[Change]]],
        changed_lists: Sequence[tuple[Address, ...]],
    ) -> tuple[RunSummary, list[TrackerEvent]]:
        """What a committed batch did: its counts and the events to fire.

        A generated DSN (:attr:`MessageRecord.notification`) is counted but fires no
        events: they are about the application's messages.
        """
        counts = dict.fromkeys(EventKind, 0)
        events: list[TrackerEvent] = []
        heard = {kind for kind in EventKind if self.events.wants(kind)}
        for (work, changes), changed_list in zip(batch, changed_lists, strict=True):
            if not changed_list:
                continue
            # One changed recipient (the common case) needs no set: the store returns the
            # change's own Address object, which a tuple finds by identity.
            changed = changed_list if len(changed_list) == 1 else set(changed_list)
            quiet = work.record.notification
            find: Callable[[Address], RecipientRecord] | None = None
            for change in changes:
                if change.attempt is None:
                    continue
                kind = _EVENT_KINDS.get(change.state)
                if kind is None or change.address not in changed:
                    continue
                counts[kind] += 1
                if quiet or kind not in heard:
                    continue
                # The store applied this change (it is in ``changed``), so apply it here
                # the same way; no lease check, since the snapshot may be the submitted
                # record (see Work).
                if find is None:
                    find = recipient_lookup(work.record)
                before = find(change.address)
                after, _did = apply_change(before, change, worker=None)
                events.append(
                    TrackerEvent(
                        kind=kind,
                        tracking_id=work.record.id,
                        recipient=after,
                        attempt=change.attempt,
                    )
                )
        summary = RunSummary(
            delivered=counts[EventKind.DELIVERED],
            deferred=counts[EventKind.DEFERRED],
            bounced=counts[EventKind.BOUNCED],
            expired=counts[EventKind.EXPIRED],
        )
        return summary, events

    def _ingest(self, raw: bytes) -> tuple[DSNMatch, list[TrackerEvent]]:
        return ingest(self.store, raw, verp=self.verp, clock=self.clock)
