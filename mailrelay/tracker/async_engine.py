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
* Callbacks may be plain functions or coroutine functions; both are called
  after the change they report is committed.
* Failure DSNs are queued in the commit of the bounce or expiry they report, and sent
  through ``dsn_transport`` by a later claim, as in the sync tracker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from mailrelay.envelope import Envelope
from mailrelay.errors import DeliveryError
from mailrelay.message import Message
from mailrelay.tracker.core import Entry, Group, RunSummary, TrackerCore, Work
from mailrelay.tracker.notifications import DSNMatch
from mailrelay.tracker.store import Claim
from mailrelay.transport.base import AsyncTransport

__all__ = ["AsyncDeliveryTracker"]

log = logging.getLogger(__name__)


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

        async def one(claim: Claim, entry: Entry | None) -> RunSummary:
            async with gate:
                return await self._aprocess(claim, entry)

        for _ in range(max_rounds):
            claims = await asyncio.to_thread(self._claim)
            if not claims:
                break
            try:
                records = await asyncio.to_thread(self._read_batch, claims)
            except BaseException:
                for claim in claims:
                    await asyncio.to_thread(self._put_back_claim, claim)
                raise
            results = await asyncio.gather(
                *(one(c, records.get(c.tracking_id)) for c in claims), return_exceptions=True
            )
            failure: BaseException | None = None
            for result in results:
                if isinstance(result, BaseException):
                    failure = failure or result
                else:
                    summary += result
            if failure is not None:
                raise failure
        return summary

    async def _aprocess(self, claim: Claim, entry: Entry | None) -> RunSummary:
        try:
            work = await asyncio.to_thread(self._load, claim, entry)
        except BaseException:
            await asyncio.to_thread(self._put_back_claim, claim)
            raise
        if work is None:
            return RunSummary()
        summary = RunSummary(messages=1)
        groups = self._groups(work)
        for index, group in enumerate(groups):
            try:
                summary += await self._atransaction(work, group)
            except BaseException:
                pending = [r.address for g in groups[index:] for r in g.recipients]
                changes = self._put_back(work.record, pending, self.clock())
                await asyncio.to_thread(
                    self.store.apply, claim.tracking_id, changes, worker=claim.worker
                )
                raise
        return summary

    def _put_back_claim(self, claim: Claim) -> None:
        record = self.store.get(claim.tracking_id)
        if record is not None:
            changes = self._put_back(record, claim.addresses, self.clock())
            self.store.apply(claim.tracking_id, changes, worker=claim.worker)

    async def _atransaction(self, work: Work, group: Group) -> RunSummary:
        now = self.clock()
        wait = self.shaper.acquire(group.key, now)
        if wait is not None:
            addresses = [r.address for r in group.recipients]
            changes = self._put_back(work.record, addresses, wait)
            await asyncio.to_thread(
                self.store.apply, work.claim.tracking_id, changes, worker=work.claim.worker
            )
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
        summary, events = await asyncio.to_thread(self._commit_many, [(work, outcome.changes)])
        for event in events:
            await self.events.afire(event)
        return summary

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
