"""The delivery tracker: durable per-recipient tracking over a blocking :class:`Transport`.

This module holds :class:`DeliveryTracker`, the sync runner; what it shares with the
asyncio runner (:mod:`mailrelay.tracker.async_engine`) is in :mod:`mailrelay.tracker.core`
(configuration, submission, records, commits), :mod:`mailrelay.tracker.transitions`
(what an attempt does to each recipient) and :mod:`mailrelay.tracker.notifications`
(DSNs). The theory of operation is in ``docs/tracker.md``.

Rules of this module:

* :meth:`DeliveryTracker.run_pending` claims a batch of due messages and hands its
  delivery transactions to the transport's ``send_many`` in chunks, so a transport that
  pipelines across messages (``SMTPTransport``, RFC 2920) does so for tracked mail too.
  A chunk holds at most ``commit_batch`` transactions less the results still awaiting
  their commit, and no more than the last chunk's pace fits in ``commit_interval`` (the
  first chunk is one transaction). Results are committed when ``commit_batch`` of them
  are in hand, when the oldest has waited ``commit_interval``, and at the end of the
  claim batch, with the failure DSNs (and delay warnings) they call for queued in the
  same commit; then their events fire. So a crash re-sends at most ``commit_batch``
  delivered transactions, as before, and loses no DSN.
* A queued DSN is a claimed message like any other, sent through ``dsn_transport``: a
  chunk holds either generated DSNs or the application's messages, never both.
* ``send_many`` turns a :class:`~mailrelay.errors.DeliveryError` into that message's
  result, which decides as the error would have. Any other exception puts back every
  transaction of the chunk without a result and every one not yet sent, due at once,
  commits the results already in hand, and propagates: the transport may have sent
  some of that chunk (they go again: at-least-once), but nothing is lost.
* A domain with a concurrency or rate limit (``DomainLimits.max_concurrent`` or
  ``per_second``) has its transactions sent one at a time, so those limits count
  transactions exactly; the adaptive back-off applies between chunks.
* :meth:`DeliveryTracker.run_forever` checks its stop flag between chunks, so an
  attempt in progress always finishes and is recorded, and what the claimed batch still
  holds goes back, due at once (stopping takes about one chunk, not one batch). Its
  default sleep ends at once when the flag is set, and within :data:`WAKE_CHECK` seconds
  when this tracker stores new work (from any thread): a ``threading.Event`` given by
  the caller cannot wake two waits at once, so the sleep waits on the flag in slices and
  looks at the submissions between them.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

from mailrelay.address import Address
from mailrelay.errors import StoreError
from mailrelay.tracker.core import (
    NOTHING_DONE,
    ONE_MESSAGE,
    STORE_RETRY,
    Group,
    RunSummary,
    TrackerCore,
    Unreadable,
    Work,
    store_failed,
)
from mailrelay.tracker.events import TrackerEvent
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
    "WAKE_CHECK",
]

log = logging.getLogger(__name__)


#: The longest that :meth:`DeliveryTracker.run_forever`'s default sleep takes to notice
#: new work submitted in this process (seconds).
WAKE_CHECK = 0.05


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
        dsn_transport: where failure DSNs go; ``None`` generates none. A DSN is queued
            with the bounce or expiry it reports and sent by the runner like any
            message (see :mod:`mailrelay.tracker.core`).
        reporting_mta: our host name for generated DSNs.
        delay_warning_after: warn the sender once (an RFC 3464 ``Action: delayed``
            report, sent through ``dsn_transport``, which it needs) about a recipient
            deferred when its message is at least this old; ``None`` (the default)
            sends no warnings. Decided where a deferral is (see
            :mod:`mailrelay.tracker.transitions`), queued with it.
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
            It also bounds each ``send_many`` call (a chunk): results awaiting their
            commit plus the chunk never exceed it. 1 commits each result at once (at
            most the one transaction in flight is re-sent) and so sends one message per
            ``send_many`` call, without pipelining across messages. The async tracker
            commits the same way, with the same bound on results awaiting their commit
            plus transactions in flight.
        commit_interval: the longest a result waits for its commit (default 1 s by
            ``clock``), plus the chunk it came in; chunks are sized so that one takes
            about this long at most, so that a slow server does not hold results (and
            their events) back for ``commit_batch`` transactions.
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

    def run_pending(self, *, max_rounds: int = 1000, stop: StopSignal | None = None) -> RunSummary:
        """Send everything due now, then return what was done.

        Claims batches until nothing is due (at most ``max_rounds`` batches). Each
        claimed batch goes to the transport's ``send_many`` in chunks (see the module
        docstring), so a transport that pipelines across messages does so here too.

        Args:
            max_rounds: the most batches to claim.
            stop: a stop flag, looked at between chunks: once it is set, the rest of the
                claimed batch is put back (due at once, no attempt recorded), the results
                in hand are committed, and the run returns. A chunk is at most
                ``commit_batch`` transactions and about ``commit_interval`` of work, so
                stopping takes about that long, not a whole batch.

        Raises:
            Exception: whatever a transport raised that is not a
                :class:`~mailrelay.errors.DeliveryError` (after putting the
                claimed recipients without a result back, due at once).
        """
        summary = NOTHING_DONE
        for _ in range(max_rounds):
            if stop is not None and stop.is_set():
                break
            claims = self._claim()
            if not claims:
                break
            summary += self._run_batch(claims, stop)
        return summary

    def _run_batch(self, claims: Sequence[Claim], stop: StopSignal | None = None) -> RunSummary:
        rejected: list[TrackerEvent] = []
        summary = NOTHING_DONE
        try:
            records = self._read_batch(claims)
            works = []
            for claim in claims:
                try:
                    work = self._load(claim, records.get(claim.tracking_id))
                except Unreadable as unreadable:
                    # It can never be sent: decided now, so that it holds nothing up.
                    done, events = self._reject_unreadable(unreadable)
                    summary += done + ONE_MESSAGE
                    rejected += events
                    continue
                if work is not None:
                    works.append(work)
        except BaseException:
            self._release_claims(claims)
            raise
        for event in rejected:
            self.events.fire(event)
        if works:
            summary += RunSummary(messages=len(works))
        queue = deque((work, group) for work in works for group in self._groups(work))
        if not queue:
            return summary
        pending: list[tuple[Work, Sequence[Change]]] = []
        oldest: dt.datetime | None = None  # when the first uncommitted result came in
        try:
            while queue:
                if stop is not None and stop.is_set():
                    # Stopping: what is not sent yet goes back, due at once (committed
                    # with the results in hand, below).
                    pending.extend(self._put_back_groups(queue))
                    queue.clear()
                    break
                room = self.commit_batch - len(pending)
                chunk, postponed = self._take_chunk(queue, pending, room)
                if postponed:
                    summary += RunSummary(postponed=postponed)
                if chunk:
                    self._send_chunk(chunk, queue, pending)
                if not pending:
                    continue
                now = self.clock()
                oldest = oldest or now
                if len(pending) >= self.commit_batch or now - oldest >= self.commit_interval:
                    summary += self._flush(pending)
                    oldest = None
        finally:
            if queue:
                # Interrupted between chunks (a KeyboardInterrupt, say, in a commit or an
                # event callback): what is not sent goes back, due now, as when a chunk fails.
                pending.extend(self._put_back_groups(queue))
                queue.clear()
            # Results already in hand (and work put back) are committed even when an
            # error propagates.
            summary += self._flush(pending)
        return summary

    def _flush(self, pending: list[tuple[Work, Sequence[Change]]]) -> RunSummary:
        """Commit what ``pending`` holds (one store transaction), then report it."""
        batch = list(pending)
        pending.clear()
        return self._after_commit(batch, self._store_results(batch))

    def _after_commit(
        self,
        batch: Sequence[tuple[Work, Sequence[Change]]],
        changed: Sequence[tuple[Address, ...]],
    ) -> RunSummary:
        """Fire the events of a committed batch (its DSNs were queued in its commit)."""
        if not batch:
            return NOTHING_DONE
        summary, events = self._report(batch, changed)
        for event in events:
            self.events.fire(event)
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

    def _send_chunk(
        self,
        chunk: list[tuple[Work, Group]],
        queue: deque[tuple[Work, Group]],
        pending: list[tuple[Work, Sequence[Change]]],
    ) -> None:
        """Send a chunk with one ``send_many`` call; its decisions go into ``pending``.

        Anything but a :class:`DeliveryError` (which ``send_many`` turns into that
        message's result) puts back every transaction of the chunk without a decision,
        and every one still queued, then propagates. Whether the transport had sent
        them is unknown: they are sent again (at-least-once), never lost.
        """
        decided = 0
        # Per domain, what it said last: True refused for now, False accepted, None neither.
        verdicts: dict[str, bool | None] = {group.key: None for _work, group in chunk}
        started = self.clock()
        transport = self._transport_for(chunk[0][0])
        try:
            results = transport.send_many(self._chunk_items(chunk))
            decisions = self._decide_chunk(
                f"{type(transport).__name__}.send_many", chunk, results, started, verdicts
            )
            pending.extend(decisions)
            decided = len(decisions)
        except BaseException:
            pending.extend(self._put_back_groups([*chunk[decided:], *queue]))
            queue.clear()
            raise
        finally:
            self._release_domains(verdicts)

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
            stop: the stop flag (a ``threading.Event``); checked between chunks (see
                :meth:`run_pending`): the chunk in flight finishes and is recorded, the
                rest of the claimed batch is put back, due at once.
            sleep: ``sleep(seconds)``; the default waits on ``stop`` so that setting it
                wakes the loop at once, and also ends when this tracker's ``submit`` or
                ``submit_many`` stores new work (within :data:`WAKE_CHECK` seconds).
                Tests pass one that advances a fake clock.
            idle: the longest sleep (new submissions from other processes are noticed
                at least this often).
            max_loops: stop after this many loops (``None``: only ``stop`` ends it).

        Raises:
            StoreError: the store failed for good (``is_transient`` false). A transient
                failure (locked past its busy timeout, a full disk) is logged and the
                loop tries again after a pause that doubles from :data:`STORE_RETRY`
                seconds up to ``idle``.
            Exception: whatever :meth:`run_pending` raises that is not a store failure.
        """
        flag = stop or threading.Event()
        sleeper = sleep or functools.partial(self._nap, flag)
        loops = 0
        pause = STORE_RETRY
        while not flag.is_set() and (max_loops is None or loops < max_loops):
            loops += 1
            # Cleared before the run: a submission from now on (during the run, say) ends
            # the sleep that follows it.
            self._submitted.clear()
            try:
                self.run_pending(stop=flag)
                if flag.is_set():
                    break
                wait = self._sleep_for(idle)
                pause = STORE_RETRY
            except StoreError as exc:
                # A store that is locked, full or failing for now: wait and go on (what
                # was sent and not recorded is due again once its lease expires).
                if not exc.is_transient:
                    raise
                wait, pause = store_failed(exc, pause, idle)
            sleeper(wait)

    def _nap(self, stop: StopSignal, seconds: float) -> None:
        """Wait ``seconds``, less when ``stop`` is set (at once) or when this tracker
        stores new work (within :data:`WAKE_CHECK`)."""
        deadline = time.monotonic() + seconds
        while not self._submitted.is_set():
            left = deadline - time.monotonic()
            if left <= 0 or stop.wait(min(left, WAKE_CHECK)):
                return

    def close(self) -> None:
        """Close the store and the transports."""
        self.store.close()
        self.transport.close()
        if self.dsn_transport is not None:
            self.dsn_transport.close()
