"""The delivery tracker for asyncio: the same engine over an :class:`AsyncTransport`.

Rules of this module:

* Every decision is the shared :class:`~mailrelay.tracker.core.TrackerCore`'s,
  so the sync and async trackers behave alike; only the I/O differs.
* Store calls run in worker threads (:func:`asyncio.to_thread`) so that a
  commit's fsync never stalls the event loop; the stores are thread-safe.
* Claims of one batch are delivered concurrently, at most ``concurrency`` at a
  time (per-domain limits still apply through the shaper). A claim whose
  transport raised something other than a ``DeliveryError`` puts its recipients
  back, due at once; the other claims finish and are recorded, then that
  exception is raised.
* Results are committed as the sync tracker commits them: when ``commit_batch`` are
  in hand, when the oldest has waited ``commit_interval``, and when the claimed batch
  ends (one store transaction in a worker thread each time, one at a time), then
  their events fire. A batch's claims are read and loaded in one worker-thread call.
* Callbacks may be plain functions or coroutine functions; both are called
  after the change they report is committed.
* Failure DSNs are queued in the commit of the bounce or expiry they report, and sent
  through ``dsn_transport`` by a later claim, as in the sync tracker.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Sequence

from mailrelay.envelope import Envelope
from mailrelay.errors import DeliveryError
from mailrelay.message import Message
from mailrelay.tracker.core import NOTHING_DONE, ONE_MESSAGE, Group, RunSummary, TrackerCore, Work
from mailrelay.tracker.notifications import DSNMatch
from mailrelay.tracker.store import Change, Claim
from mailrelay.transport.base import AsyncTransport

__all__ = ["AsyncDeliveryTracker"]

log = logging.getLogger(__name__)


class _Commits:
    """The results of one claimed batch awaiting their commit, as in the sync runner.

    Results are committed (in a worker thread, one store transaction) when
    ``commit_batch`` of them are in hand, when the oldest has waited ``commit_interval``,
    and when the batch ends; then their events fire. One commit at a time: a result
    that comes in meanwhile waits for the next.
    """

    def __init__(self, tracker: AsyncDeliveryTracker) -> None:
        self._tracker = tracker
        self._pending: list[tuple[Work, Sequence[Change]]] = []
        self._oldest: dt.datetime | None = None
        self._lock = asyncio.Lock()

    def add(self, work: Work, changes: Sequence[Change]) -> None:
        """Hold ``changes`` (of ``work``) for the next commit."""
        if changes:
            self._pending.append((work, changes))
            self._oldest = self._oldest or self._tracker.clock()

    async def maybe_flush(self) -> RunSummary:
        """Commit what is held if it is enough, or the oldest has waited long enough."""
        tracker = self._tracker
        if len(self._pending) >= tracker.commit_batch or (
            self._oldest is not None and tracker.clock() - self._oldest >= tracker.commit_interval
        ):
            return await self.flush()
        return NOTHING_DONE

    async def flush(self) -> RunSummary:
        """Commit everything held now, then fire its events."""
        summary = NOTHING_DONE
        async with self._lock:
            while self._pending:
                batch, self._pending, self._oldest = self._pending, [], None
                done, events = await asyncio.to_thread(self._tracker._commit_many, batch)
                summary += done
                for event in events:
                    await self._tracker.events.afire(event)
        return summary


class AsyncDeliveryTracker(TrackerCore[AsyncTransport]):
    """Durable per-recipient delivery tracking over an :class:`AsyncTransport`.

    Takes the same arguments as :class:`~mailrelay.tracker.engine.DeliveryTracker`
    (``transport`` and ``dsn_transport`` are asynchronous).
    """

    _async_callbacks = True

    def __repr__(self) -> str:
        return f"<AsyncDeliveryTracker worker={self.worker_id!r} store={self.store!r}>"

    async def asubmit(self, message: Message, envelope: Envelope | None = None) -> str:
        """:meth:`submit`, with the store's commit in a worker thread."""
        return await asyncio.to_thread(self.submit, message, envelope)

    async def aingest_dsn(self, raw: bytes) -> DSNMatch:
        """Read a returned report and fold it into its tracked message.

        See :meth:`mailrelay.tracker.engine.DeliveryTracker.ingest_dsn`.
        """
        match, events = await asyncio.to_thread(self._ingest, raw)
        for event in events:
            await self.events.afire(event)
        return match

    async def arun_pending(self, *, concurrency: int = 10, max_rounds: int = 1000) -> RunSummary:
        """Send everything due now, ``concurrency`` claims at a time.

        Raises:
            Exception: the first exception other than a ``DeliveryError`` that a
                claim's delivery raised, after every claim of its batch finished.
        """
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        gate = asyncio.Semaphore(concurrency)
        summary = RunSummary()

        for _ in range(max_rounds):
            claims = await asyncio.to_thread(self._claim)
            if not claims:
                break
            results = await asyncio.to_thread(self._load_all, claims)
            commits = _Commits(self)

            async def one(work: Work, commits: _Commits = commits) -> RunSummary:
                async with gate:
                    return await self._aprocess(work, commits)

            outcomes: list[RunSummary | BaseException] = []
            try:
                outcomes = await asyncio.gather(
                    *(one(r) for r in results if isinstance(r, Work)), return_exceptions=True
                )
            finally:
                # Results in hand are committed (and their events fired) even when the
                # batch was cancelled.
                summary += await commits.flush()
            failure: BaseException | None = None
            for outcome in [*results, *outcomes]:
                if isinstance(outcome, BaseException):
                    failure = failure or outcome
                elif isinstance(outcome, RunSummary):
                    summary += outcome
            if failure is not None:
                raise failure
        return summary

    def _load_all(self, claims: Sequence[Claim]) -> list[Work | BaseException | None]:
        """Each claim's work (``None``: its message is gone), in one worker-thread call.

        A claim whose message cannot be read or parsed is put back and stands as the
        exception, raised once the rest of the batch is done.
        """
        try:
            records = self._read_batch(claims)
        except BaseException:
            for claim in claims:
                self._put_back_claim(claim)
            raise
        loaded: list[Work | BaseException | None] = []
        for claim in claims:
            try:
                loaded.append(self._load(claim, records.get(claim.tracking_id)))
            except Exception as exc:
                self._put_back_claim(claim)
                loaded.append(exc)
        return loaded

    async def _aprocess(self, work: Work, commits: _Commits) -> RunSummary:
        summary = ONE_MESSAGE
        groups = self._groups(work)
        for index, group in enumerate(groups):
            try:
                summary += await self._atransaction(work, group, commits)
            except BaseException:
                pending = [r.address for g in groups[index:] for r in g.recipients]
                commits.add(work, self._put_back(work.record, pending, self.clock()))
                raise
        return summary

    def _put_back_claim(self, claim: Claim) -> None:
        record = self.store.get(claim.tracking_id)
        if record is not None:
            changes = self._put_back(record, claim.addresses, self.clock())
            self.store.apply(claim.tracking_id, changes, worker=claim.worker)

    async def _atransaction(self, work: Work, group: Group, commits: _Commits) -> RunSummary:
        now = self.clock()
        wait = self.shaper.acquire(group.key, now)
        if wait is not None:
            addresses = [r.address for r in group.recipients]
            commits.add(work, self._put_back(work.record, addresses, wait))
            return RunSummary(postponed=len(addresses))
        refused: bool | None = None
        try:
            envelope = self._envelope(work.record, group)
            try:
                result = await self._transport_for(work).adeliver(work.message, envelope)
            except DeliveryError as error:
                outcome = self._from_error(work, group, error, self.clock())
            else:
                outcome = self._from_result(work, group, result, self.clock())
            refused = outcome.refused
        finally:
            self.shaper.release(group.key, self.clock(), refused=refused)
        # The failure DSNs this calls for are queued in the same commit (see
        # mailrelay.tracker.core); a later claim of this run sends them.
        commits.add(work, outcome.changes)
        return await commits.maybe_flush()

    async def arun_forever(
        self,
        stop: asyncio.Event | None = None,
        *,
        sleep: Callable[[float], Awaitable[object]] | None = None,
        idle: float = 60.0,
        concurrency: int = 10,
        max_loops: int | None = None,
    ) -> None:
        """Send due work until ``stop`` is set, sleeping until the next due time.

        Args:
            stop: the stop flag; setting it wakes the default sleep at once, and an
                attempt in progress always finishes and is recorded.
            sleep: ``await sleep(seconds)``; tests pass one that advances a fake clock.
            idle: the longest sleep.
            concurrency: claims delivered at once.
            max_loops: stop after this many loops (``None``: only ``stop`` ends it).
        """
        stop = stop or asyncio.Event()

        async def wait_for_stop(seconds: float) -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=seconds)

        sleeper = sleep or wait_for_stop
        loops = 0
        while not stop.is_set() and (max_loops is None or loops < max_loops):
            loops += 1
            await self.arun_pending(concurrency=concurrency)
            if stop.is_set():
                break
            await sleeper(await asyncio.to_thread(self._sleep_for, idle))

    async def aclose(self) -> None:
        """Close the store and the transports."""
        await asyncio.to_thread(self.store.close)
        await self.transport.aclose()
        if self.dsn_transport is not None:
            await self.dsn_transport.aclose()
