"""The delivery tracker: durable per-recipient tracking over a blocking :class:`Transport`.

This module holds :class:`DeliveryTracker`, the sync runner; what it shares with the
asyncio runner (:mod:`mailrelay.tracker.async_engine`) is in :mod:`mailrelay.tracker.core`
(configuration, submission, records, commits), :mod:`mailrelay.tracker.transitions`
(what an attempt does to each recipient) and :mod:`mailrelay.tracker.notifications`
(DSNs). The theory of operation is in ``docs/tracker.md``.

Rules of this module:

* :meth:`DeliveryTracker.run_pending` claims a batch of due messages, delivers them one
  transaction at a time, and commits the results in batches (``commit_batch``
  transactions, or ``commit_interval``, whichever comes first), then fires their events
  and sends their failure DSNs. Results already in hand are committed even when an
  exception propagates.
* Any exception other than a :class:`~mailrelay.errors.DeliveryError` puts the claimed
  recipients not yet attempted back, due at once, and propagates: never a silent loss.
* :meth:`DeliveryTracker.run_forever` checks its stop flag between batches, so an
  attempt in progress always finishes and is recorded.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from mailrelay.envelope import Envelope
from mailrelay.errors import DeliveryError
from mailrelay.message import Message
from mailrelay.tracker.core import (
    NOTHING_DONE,
    ONE_MESSAGE,
    Entry,
    Group,
    RunSummary,
    TrackerCore,
    Work,
)
from mailrelay.tracker.notifications import VERP, DSNMatch, DSNRequest
from mailrelay.tracker.store import Change, Claim
from mailrelay.transport.base import Transport

__all__ = [
    "DSNMatch",
    "DSNRequest",
    "DeliveryTracker",
    "RunSummary",
    "StopSignal",
    "VERP",
]

log = logging.getLogger(__name__)


class StopSignal(Protocol):
    """What :meth:`DeliveryTracker.run_forever` needs of a stop flag (``threading.Event`` fits)."""

    def is_set(self) -> bool:
        """Whether to stop."""
        ...

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds for the flag; return whether it is set."""
        ...


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
            (default 16 MiB in all, messages up to 256 KiB each; 0 keeps none).
            See :mod:`mailrelay.tracker.cache`.
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
        summary = NOTHING_DONE
        for _ in range(max_rounds):
            claims = self._claim()
            if not claims:
                break
            pending: list[tuple[Work, Sequence[Change]]] = []
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

    def _flush(self, pending: list[tuple[Work, Sequence[Change]]]) -> RunSummary:
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
        entry: Entry | None,
        pending: list[tuple[Work, Sequence[Change]]],
    ) -> RunSummary:
        try:
            work = self._load(claim, entry)
        except BaseException:
            self._release_claims([claim])
            raise
        if work is None:
            return NOTHING_DONE
        summary = ONE_MESSAGE
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
        self, work: Work, group: Group, pending: list[tuple[Work, Sequence[Change]]]
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
        return NOTHING_DONE

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
