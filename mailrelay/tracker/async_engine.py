"""The delivery tracker for asyncio: the same engine over an :class:`AsyncTransport`.

Rules of this module:

* Every decision is the shared :class:`~mailrelay.tracker.core.TrackerCore`'s,
  so the sync and async trackers behave alike; only the I/O differs.
* Store calls run in worker threads (:func:`asyncio.to_thread`) so that a
  commit's fsync never stalls the event loop; the stores are thread-safe.
* A claimed batch is delivered in chunks taken as the sync tracker takes them
  (:meth:`~mailrelay.tracker.core.TrackerCore._take_chunk`: per-domain slots and
  pacing, at most ``commit_batch`` transactions awaiting their commit or in flight),
  each sent with one ``asend_many`` call, so the SMTP pool pipelines and spreads
  them over its connections; at most ``concurrency`` chunks are in flight at once (a
  domain with a concurrency or rate limit has one transaction per chunk, so its
  limits count transactions). For a transport that keeps the base class's
  ``asend_many`` (one message at a time), chunks are an even share of
  ``commit_batch`` among ``concurrency``, so that many messages are still in flight.
* A chunk whose ``asend_many`` raised something other than a ``DeliveryError`` puts
  back its transactions without a decision and every one still queued, due at once;
  the chunks in flight finish and are recorded, then that exception is raised.
* A cancelled run (``task.cancel()``) leaves nothing leased: a claim, load or commit
  running in its worker thread is waited for (a cancelled ``to_thread`` abandons the
  thread, not its work), what was claimed and not decided goes back, due at once (the
  chunks in flight too: the server may have taken them, and they go again), and the
  results in hand are committed and their events fired before the cancellation goes on.
* Results are committed as the sync tracker commits them: when ``commit_batch`` are
  in hand, when the oldest has waited ``commit_interval``, and when the claimed batch
  ends (one store transaction in a worker thread each time, one at a time), then
  their events fire. A batch's claims are read and loaded in one worker-thread call.
* Callbacks may be plain functions or coroutine functions; both are called
  after the change they report is committed.
* Failure DSNs are queued in the commit of the bounce or expiry they report (delay
  warnings in the commit of the deferral that calls for one), and sent through
  ``dsn_transport`` by a later claim, as in the sync tracker.
* :meth:`AsyncDeliveryTracker.arun_forever`'s default sleep ends at once when its stop
  flag is set or when this tracker stores new work (``submit``, ``asubmit`` and their
  ``_many`` forms, from the loop or from any thread: the news reaches the loop through
  ``call_soon_threadsafe``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TypeVar

from mailrelay.address import Address
from mailrelay.envelope import Envelope
from mailrelay.errors import ConfigurationError, StoreError
from mailrelay.message import Message
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
from mailrelay.tracker.notifications import DSNMatch
from mailrelay.tracker.store import Change, Claim, MessageRecord, State
from mailrelay.transport.base import AsyncTransport, BatchItem

__all__ = ["AsyncDeliveryTracker"]

log = logging.getLogger(__name__)

R = TypeVar("R")
#: What loading a claim gave: its work, ``None`` (the message is gone), the exception to
#: raise after the batch, or a claim decided at loading (what it did, the events to fire).
_Loaded = Work | BaseException | tuple[RunSummary, list[TrackerEvent]] | None


async def _seen_through(call: Callable[[], R], settle: Callable[[R], Awaitable[object]]) -> R:
    """``await asyncio.to_thread(call)``, except that a cancellation does not abandon the call.

    A cancelled ``to_thread`` stops the waiting, not the thread: a claim or a commit made
    there would be done with nobody to act on it (the claimed recipients leased until the
    lease expires, the committed results' events never fired). So when the caller is
    cancelled, this waits for the call to end, hands its result to ``settle``, and then
    lets the cancellation go on. A call that failed has nothing to settle.
    """
    future = asyncio.ensure_future(asyncio.to_thread(call))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):  # the call failed: nothing was done
            await settle(await future)
        raise


class _Commits:
    """The results of one claimed batch awaiting their commit, as in the sync runner.

    Results are committed (in a worker thread, one store transaction) when
    ``commit_batch`` of them are in hand, when the oldest has waited ``commit_interval``,
    and when the batch ends; then their events fire. One commit at a time: results that
    come in meanwhile wait for the next.
    """

    def __init__(self, tracker: AsyncDeliveryTracker) -> None:
        self._tracker = tracker
        #: what awaits the next commit (work put back by the chunk taker goes here too)
        self.pending: list[tuple[Work, Sequence[Change]]] = []
        self._oldest: dt.datetime | None = None
        self._lock = asyncio.Lock()

    def add(self, decisions: Iterable[tuple[Work, Sequence[Change]]]) -> None:
        """Hold ``decisions`` for the next commit."""
        before = len(self.pending)
        self.pending.extend(decisions)
        if self._oldest is None and len(self.pending) > before:
            self._oldest = self._tracker.clock()

    async def maybe_flush(self) -> RunSummary:
        """Commit what is held if it is enough, or the oldest has waited long enough."""
        tracker = self._tracker
        if not self.pending:
            return NOTHING_DONE
        if self._oldest is None:
            self._oldest = tracker.clock()  # put back by the chunk taker
        if (
            len(self.pending) >= tracker.commit_batch
            or tracker.clock() - self._oldest >= tracker.commit_interval
        ):
            return await self.flush()
        return NOTHING_DONE

    async def flush(self) -> RunSummary:
        """Commit everything held now, then fire its events."""
        summary = NOTHING_DONE
        async with self._lock:
            while self.pending:
                batch = list(self.pending)
                self.pending.clear()
                self._oldest = None
                # Cancelled during the commit, the events of what it committed still fire.
                done, events = await _seen_through(
                    functools.partial(self._tracker._commit_many, batch), self._fire
                )
                summary += done
                await self._fire((done, events))
        return summary

    async def _fire(self, committed: tuple[RunSummary, list[TrackerEvent]]) -> None:
        for event in committed[1]:
            await self._tracker.events.afire(event)


class AsyncDeliveryTracker(TrackerCore[AsyncTransport]):
    """Durable per-recipient delivery tracking over an :class:`AsyncTransport`.

    Takes the same arguments as :class:`~mailrelay.tracker.engine.DeliveryTracker`
    (``transport`` and ``dsn_transport`` are asynchronous).
    """

    _async_callbacks = True
    # While arun_forever sleeps with its default sleep: its loop and the event that ends
    # the sleep when new work is stored (see _wake).
    _waking: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None

    def __repr__(self) -> str:
        return f"<AsyncDeliveryTracker worker={self.worker_id!r} store={self.store!r}>"

    @staticmethod
    def _own_failure(exc: BaseException) -> bool:
        """A coroutine callback's ``CancelledError`` while nobody cancels the task that
        runs it (it awaited something that someone else cancelled) is the callback's
        own failure: logged and skipped, it must not end the run as a cancellation."""
        if not isinstance(exc, asyncio.CancelledError):
            return False
        task = asyncio.current_task()
        return task is not None and not task.cancelling()

    def _wake(self) -> None:
        super()._wake()
        waking = self._waking
        if waking is not None:
            loop, event = waking
            # From the loop's own thread (submit called in a coroutine) or from a worker
            # thread (asubmit) or any other: the event is set by the loop.
            with contextlib.suppress(RuntimeError):  # the loop has closed meanwhile
                loop.call_soon_threadsafe(event.set)

    async def asubmit(self, message: Message, envelope: Envelope | None = None) -> str:
        """:meth:`submit`, with the store's commit in a worker thread."""
        return await asyncio.to_thread(self.submit, message, envelope)

    async def asubmit_many(self, items: Iterable[BatchItem]) -> list[str]:
        """:meth:`submit_many` (one durable commit for them all), in a worker thread."""
        return await asyncio.to_thread(self.submit_many, list(items))

    async def astatus(self, tracking_id: str) -> MessageRecord:
        """:meth:`status`, with the store's read in a worker thread.

        Raises:
            KeyError: no message with this id.
        """
        return await asyncio.to_thread(self.status, tracking_id)

    async def arelease_leases(self) -> int:
        """:meth:`release_leases`, with the store's work in a worker thread."""
        return await asyncio.to_thread(self.release_leases)

    async def acancel(self, tracking_id: str) -> tuple[Address, ...]:
        """:meth:`cancel`, with the store's commit in a worker thread.

        Raises:
            KeyError: no message with this id.
        """
        return await asyncio.to_thread(self.cancel, tracking_id)

    async def afind(
        self,
        *,
        state: State | None = None,
        older_than: dt.timedelta | None = None,
        limit: int | None = None,
    ) -> list[MessageRecord]:
        """:meth:`find`, with the store's query in a worker thread."""
        return await asyncio.to_thread(
            functools.partial(self.find, state=state, older_than=older_than, limit=limit)
        )

    async def anext_due(self) -> dt.datetime | None:
        """:meth:`next_due`, with the store's query in a worker thread."""
        return await asyncio.to_thread(self.next_due)

    async def aingest_dsn(self, raw: bytes) -> DSNMatch:
        """Read a returned report and fold it into its tracked message.

        See :meth:`mailrelay.tracker.engine.DeliveryTracker.ingest_dsn`. Cancelled
        while the report is being recorded (in a worker thread), it waits for that
        commit and fires its events before the cancellation goes on.
        """
        # Cancelled while the report is folded in, the change it commits still fires
        # its events: the same report ingested again would be history only.
        match, events = await _seen_through(
            functools.partial(self._ingest, raw), self._fire_ingested
        )
        await self._fire_ingested((match, events))
        return match

    async def _fire_ingested(self, ingested: tuple[DSNMatch, list[TrackerEvent]]) -> None:
        for event in ingested[1]:
            await self.events.afire(event)

    async def arun_pending(
        self,
        *,
        concurrency: int = 10,
        max_rounds: int = 1000,
        stop: asyncio.Event | None = None,
    ) -> RunSummary:
        """Send everything due now, at most ``concurrency`` ``asend_many`` calls at a time.

        ``stop``, looked at before each chunk starts: once it is set, no chunk starts;
        the ones in flight finish and are recorded, the rest of the claimed batch is put
        back (due at once, no attempt recorded), and the run returns. Cancelling the
        task that runs it puts back what it claimed and has no result for (the chunks in
        flight included), commits the results in hand and fires their events; it leaves
        nothing leased.

        Raises:
            Exception: the first exception other than a ``DeliveryError`` that a
                chunk's delivery raised (or a claim's loading), once the rest of its
                batch is done and recorded.
        """
        if concurrency < 1:
            raise ConfigurationError("concurrency must be at least 1")
        summary = NOTHING_DONE
        for _ in range(max_rounds):
            if stop is not None and stop.is_set():
                break
            # Cancelled while claiming or loading, the claim goes back (due at once).
            claims = await _seen_through(self._claim, self._aput_back_claims)
            if not claims:
                break
            loaded = await _seen_through(
                functools.partial(self._load_all, claims),
                functools.partial(self._aput_back_loaded, claims),
            )
            works = [work for work in loaded if isinstance(work, Work)]
            for outcome in loaded:
                if isinstance(outcome, tuple):  # decided at loading (see _load_all)
                    summary += outcome[0] + ONE_MESSAGE
                    for event in outcome[1]:
                        await self.events.afire(event)
            commits = _Commits(self)
            try:
                summary += await self._arun_batch(works, concurrency, commits, stop)
            finally:
                # Results in hand (and work put back) are committed, and their events
                # fired, even when an error propagates or the run is cancelled.
                summary += await commits.flush()
            for outcome in loaded:
                if isinstance(outcome, BaseException):
                    raise outcome
        return summary

    def _load_all(self, claims: Sequence[Claim]) -> list[_Loaded]:
        """Each claim's work (``None``: its message is gone), in one worker-thread call.

        A claim whose stored message cannot be parsed back is decided here (bounced,
        see :meth:`TrackerCore._reject_unreadable`) and stands as what that did and the
        events to fire. A claim whose message cannot be read otherwise is put back and
        stands as the exception, raised once the rest of the batch is done.
        """
        try:
            records = self._read_batch(claims)
        except BaseException:
            for claim in claims:
                self._put_back_claim(claim)
            raise
        loaded: list[_Loaded] = []
        for claim in claims:
            try:
                loaded.append(self._load(claim, records.get(claim.tracking_id)))
            except Unreadable as unreadable:
                loaded.append(self._reject_unreadable(unreadable))
            except Exception as exc:
                self._put_back_claim(claim)
                loaded.append(exc)
        return loaded

    async def _aput_back_claims(self, claims: Sequence[Claim]) -> None:
        await asyncio.to_thread(self._put_back_claims, claims)

    async def _aput_back_loaded(self, claims: Sequence[Claim], _loaded: Sequence[_Loaded]) -> None:
        await self._aput_back_claims(claims)

    def _put_back_claims(self, claims: Sequence[Claim]) -> None:
        for claim in claims:
            self._put_back_claim(claim)

    def _put_back_claim(self, claim: Claim) -> None:
        record = self.store.get(claim.tracking_id)
        if record is not None:
            changes = self._put_back(record, claim.addresses, self.clock())
            self.store.apply(claim.tracking_id, changes, worker=claim.worker)

    async def _arun_batch(
        self,
        works: Sequence[Work],
        concurrency: int,
        commits: _Commits,
        stop: asyncio.Event | None = None,
    ) -> RunSummary:
        """Deliver a claimed batch in chunks, up to ``concurrency`` of them at once.

        Chunks are taken as the sync runner takes them (per-domain slots, pacing, at
        most ``commit_batch`` transactions awaiting their commit or in flight). For a
        transport that keeps the base class's ``asend_many`` (one message at a time),
        each chunk is at most an even share of ``commit_batch`` among ``concurrency``
        chunks, so that ``concurrency`` messages are still in flight at once.
        """
        summary = RunSummary(messages=len(works)) if works else NOTHING_DONE
        queue = deque((work, group) for work in works for group in self._groups(work))
        share = self.commit_batch
        if type(self.transport).asend_many is AsyncTransport.asend_many:
            # The base asend_many sends one message at a time: smaller chunks, so that
            # ``concurrency`` of them are in flight. (A transport with its own, such as
            # the SMTP pool, spreads and pipelines a chunk itself.)
            share = max(1, self.commit_batch // concurrency)
        running: dict[asyncio.Task[None], int] = {}  # each chunk, and its transactions
        failure: BaseException | None = None
        try:
            while True:
                if queue and stop is not None and stop.is_set():
                    # Stopping: nothing more starts; what is not sent goes back, due now.
                    commits.add(self._put_back_groups(queue))
                    queue.clear()
                while queue and failure is None and len(running) < concurrency:
                    room = self.commit_batch - len(commits.pending) - sum(running.values())
                    if room < 1:
                        break
                    chunk, postponed = self._take_chunk(queue, commits.pending, min(room, share))
                    if postponed:
                        summary += RunSummary(postponed=postponed)
                    if chunk:
                        task = asyncio.create_task(self._asend_chunk(chunk, commits))
                        running[task] = len(chunk)
                if not running:
                    if not queue or failure is not None:
                        break
                    # Nothing in flight and no room: commit what is held, then go on.
                    summary += await commits.flush()
                    continue
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    del running[task]
                    error = task.exception()
                    if error is not None and failure is None:
                        failure = error
                        # Nothing more is sent: what is still queued goes back, due now.
                        commits.add(self._put_back_groups(queue))
                        queue.clear()
                summary += await commits.maybe_flush()
        finally:
            if queue:
                # Cancelled: what is not sent goes back, due now (committed by the caller
                # with the results in hand), as when a chunk fails.
                commits.add(self._put_back_groups(queue))
                queue.clear()
            if running:  # cancelled: the chunks in flight put back what they hold
                for task in running:
                    task.cancel()
                await asyncio.gather(*running, return_exceptions=True)
        if failure is not None:
            raise failure
        return summary

    async def _asend_chunk(self, chunk: list[tuple[Work, Group]], commits: _Commits) -> None:
        """Send a chunk with one ``asend_many`` call; its decisions go to ``commits``.

        Anything but a :class:`DeliveryError` (which ``asend_many`` turns into that
        message's result) puts back every transaction of the chunk without a decision,
        then propagates, as in the sync runner.
        """
        decided = 0
        verdicts: dict[str, bool | None] = {group.key: None for _work, group in chunk}
        started = self.clock()
        transport = self._transport_for(chunk[0][0])
        try:
            results = await transport.asend_many(self._chunk_items(chunk))
            decisions = self._decide_chunk(
                f"{type(transport).__name__}.asend_many", chunk, results, started, verdicts
            )
            commits.add(decisions)
            decided = len(decisions)
        except BaseException:
            commits.add(self._put_back_groups(chunk[decided:]))
            raise
        finally:
            self._release_domains(verdicts)

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
            stop: the stop flag; setting it wakes the default sleep at once; the chunks
                in flight finish and are recorded, and the rest of the claimed batch is
                put back, due at once (see :meth:`arun_pending`).
            sleep: ``await sleep(seconds)``; the default also ends at once when this
                tracker stores new work. Tests pass one that advances a fake clock.
            idle: the longest sleep (new submissions from other processes are noticed
                at least this often).
            concurrency: ``asend_many`` calls (chunks) in flight at once.
            max_loops: stop after this many loops (``None``: only ``stop`` ends it).

        Raises:
            StoreError: the store failed for good; a transient failure is logged and
                retried after a pause, as in the sync runner's ``run_forever``.
            Exception: whatever :meth:`arun_pending` raises that is not a store failure.
        """
        stop = stop or asyncio.Event()
        submitted = asyncio.Event()

        async def nap(seconds: float) -> None:
            if self._submitted.is_set():
                return  # stored during the run: no sleep
            waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(submitted.wait())]
            try:
                await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()
                await asyncio.gather(*waits, return_exceptions=True)

        sleeper = sleep or nap
        if sleep is None:
            self._waking = (asyncio.get_running_loop(), submitted)
        try:
            loops = 0
            pause = STORE_RETRY
            while not stop.is_set() and (max_loops is None or loops < max_loops):
                loops += 1
                # Cleared before the run: a submission from now on ends the next sleep.
                self._submitted.clear()
                submitted.clear()
                try:
                    await self.arun_pending(concurrency=concurrency, stop=stop)
                    if stop.is_set():
                        break
                    wait = await asyncio.to_thread(self._sleep_for, idle)
                    pause = STORE_RETRY
                except StoreError as exc:
                    # Locked, full or failing for now: wait and go on (see the sync runner).
                    if not exc.is_transient:
                        raise
                    wait, pause = store_failed(exc, pause, idle)
                await sleeper(wait)
        finally:
            if sleep is None:
                self._waking = None

    async def aclose(self) -> None:
        """Close the store and the transports."""
        await asyncio.to_thread(self.store.close)
        await self.transport.aclose()
        if self.dsn_transport is not None:
            await self.dsn_transport.aclose()
