"""AsyncDeliveryTracker: the same decisions over an AsyncTransport, with async callbacks."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailrelay.address import Address
from mailrelay.envelope import Envelope
from mailrelay.errors import ConnectError, StoreError
from mailrelay.message import Message
from mailrelay.reply import Reply
from mailrelay.results import Outcome
from mailrelay.tracker.async_engine import AsyncDeliveryTracker
from mailrelay.tracker.dsn import DSNAction, DSNRecipient
from mailrelay.tracker.dsn_build import build_dsn
from mailrelay.tracker.dsn_parse import parse_dsn
from mailrelay.tracker.engine import RunSummary
from mailrelay.tracker.events import EventKind, TrackerEvent
from mailrelay.tracker.retry import DomainLimits
from mailrelay.tracker.sqlite_store import SQLiteStore
from mailrelay.tracker.store import MemoryStore, State, Store
from mailrelay.transport.memory import MemoryTransport
from tests.tracker.test_engine import (
    FATES,
    NOTICE_LIMIT,
    T0,
    FakeClock,
    FlakyStore,
    assert_nothing_lost,
    fated,
    fated_messages,
    message,
    no_jitter,
    scripted,
)

R = TypeVar("R")


def run(coro: Coroutine[Any, Any, R]) -> R:
    return asyncio.run(coro)


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "postgres":  # tests/peers/postgres.py: a fresh schema, dropped after
        yield request.getfixturevalue("postgres_store")
        return
    made: Store = MemoryStore() if request.param == "memory" else SQLiteStore(tmp_path / "t.db")
    yield made
    made.close()


def make(
    transport: MemoryTransport, store: Store, clock: FakeClock, **options: Any
) -> AsyncDeliveryTracker:
    return AsyncDeliveryTracker(
        transport, store, clock=clock, random=no_jitter, worker_id="aw", **options
    )


def test_async_delivery_with_sync_and_async_callbacks(store: Store) -> None:
    clock = FakeClock()
    transport = MemoryTransport(scripted({"a@example.org": Reply.of(450, "4.2.1 later")}))
    tracker = make(transport, store, clock)
    seen: list[tuple[str, EventKind]] = []

    async def async_callback(event: TrackerEvent) -> None:
        await asyncio.sleep(0)
        seen.append(("async", event.kind))

    tracker.on("delivered", async_callback)
    tracker.on("deferred", lambda event: seen.append(("sync", event.kind)))

    async def scenario() -> tuple[str, RunSummary, RunSummary]:
        tracking_id = await tracker.asubmit(message())
        first = await tracker.arun_pending()
        clock.advance(300)
        second = await tracker.arun_pending()
        return tracking_id, first, second

    tracking_id, first, second = run(scenario())
    assert first == RunSummary(messages=1, delivered=1, deferred=1)
    assert second == RunSummary(messages=1, delivered=1)
    assert sorted(seen) == [
        ("async", EventKind.DELIVERED),
        ("async", EventKind.DELIVERED),
        ("sync", EventKind.DEFERRED),
    ]
    assert {r.state for r in tracker.status(tracking_id).recipients} == {State.DELIVERED}
    assert [str(r.address) for r in transport.outbox[-1].envelope.recipients] == ["a@example.org"]


def test_many_messages_concurrently(store: Store) -> None:
    transport = MemoryTransport()
    tracker = make(transport, store, FakeClock(), batch_size=7)

    async def scenario() -> RunSummary:
        for index in range(25):
            await tracker.asubmit(message((f"r{index}@example.org",)))
        return await tracker.arun_pending(concurrency=4)

    summary = run(scenario())
    assert (summary.messages, summary.delivered) == (25, 25)
    sent = sorted(str(item.envelope.recipients[0].address) for item in transport.outbox)
    assert sent == sorted(f"r{i}@example.org" for i in range(25))


def test_a_raising_async_callback_is_logged(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    tracker = make(MemoryTransport(), store, FakeClock())

    async def broken(event: TrackerEvent) -> None:
        raise RuntimeError("async callback bug")

    tracker.on("delivered", broken)

    async def scenario() -> RunSummary:
        await tracker.asubmit(message(("a@example.org",)))
        return await tracker.arun_pending()

    with caplog.at_level(logging.ERROR, logger="mailrelay.tracker.events"):
        assert run(scenario()).delivered == 1
    assert "async callback bug" in caplog.text


def test_unexpected_errors_put_the_work_back_after_the_batch(store: Store) -> None:
    async def handler(msg: Message, envelope: Envelope) -> dict[str, Outcome]:
        if str(envelope.recipients[0].address) == "bad@bad.example":
            raise RuntimeError("transport bug")
        if str(envelope.recipients[0].address) == "down@down.example":
            raise ConnectError("refused")
        return {}

    # One domain each: the transient failure's back-off must not hold the others.
    tracker = make(MemoryTransport(handler), store, FakeClock(), split_by_domain=True)

    async def scenario() -> tuple[str, str, str]:
        ok = await tracker.asubmit(message(("ok@ok.example",)))
        bad = await tracker.asubmit(message(("bad@bad.example",)))
        down = await tracker.asubmit(message(("down@down.example",)))
        with pytest.raises(RuntimeError, match="transport bug"):
            await tracker.arun_pending()
        return ok, bad, down

    ok, bad, down = run(scenario())
    assert tracker.status(ok).recipients[0].state is State.DELIVERED
    assert tracker.status(down).recipients[0].state is State.DEFERRED
    bad_record = tracker.status(bad).recipients[0]
    assert (bad_record.state, bad_record.attempts, bad_record.lease_owner) == (
        State.QUEUED,
        (),
        None,
    )


def test_async_ingest_and_generated_dsn(store: Store) -> None:
    dsn_out = MemoryTransport()
    transport = MemoryTransport(scripted({"b@example.net": Outcome.PERMANENT}))
    tracker = make(transport, store, FakeClock(), dsn_transport=dsn_out, request_dsn=True)
    seen: list[EventKind] = []

    async def on_dsn(event: TrackerEvent) -> None:
        seen.append(event.kind)

    tracker.on("dsn_received", on_dsn)

    async def scenario() -> str:
        tracking_id = await tracker.asubmit(message())
        await tracker.arun_pending()
        raw = build_dsn(
            original=store.content(tracking_id),
            envelope_sender="sender@example.com",
            recipients=[DSNRecipient(address="a@example.org", action=DSNAction.DELIVERED)],
            reporting_mta="mx.example.org",
            envid=tracking_id,
        )
        match = await tracker.aingest_dsn(raw)
        assert match.tracking_id == tracking_id
        return tracking_id

    tracking_id = run(scenario())
    a = tracker.status(tracking_id).recipient("a@example.org")
    assert (a.state, a.confirmed) == (State.DELIVERED, True)
    assert seen == [EventKind.DSN_RECEIVED]
    report = parse_dsn(dsn_out.outbox[0].message.as_bytes())
    assert [r.address for r in report.failed] == ["b@example.net"]


def test_arun_forever_sleeps_until_due_and_stops(store: Store) -> None:
    clock = FakeClock()
    transport = MemoryTransport(scripted({"a@example.org": Outcome.TRANSIENT}))
    tracker = make(transport, store, clock, limits=DomainLimits())
    slept: list[float] = []

    async def scenario() -> str:
        tracking_id = await tracker.asubmit(message(("a@example.org",)))
        stop = asyncio.Event()

        async def sleep(seconds: float) -> None:
            slept.append(seconds)
            clock.advance(seconds)
            if tracker.status(tracking_id).is_final:
                stop.set()

        await tracker.arun_forever(stop, sleep=sleep, idle=120, max_loops=10)
        return tracking_id

    tracking_id = run(scenario())
    assert slept == [120.0, 120.0, 60.0, 120.0]
    assert tracker.status(tracking_id).recipients[0].attempts[-1].at == T0 + dt.timedelta(
        seconds=300
    )


def test_arun_forever_default_sleep_wakes_on_stop(store: Store) -> None:
    tracker = make(MemoryTransport(), store, FakeClock())

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(tracker.arun_forever(stop, idle=30))
        await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(task, timeout=10)

    run(scenario())


@pytest.mark.parametrize("how", ["asubmit", "asubmit_many", "submit in the loop", "thread"])
def test_arun_forever_wakes_when_this_tracker_stores_new_work(store: Store, how: str) -> None:
    transport = MemoryTransport()
    tracker = make(transport, store, FakeClock())

    async def submit() -> str:
        if how == "asubmit":
            return await tracker.asubmit(message())
        if how == "asubmit_many":
            [tracking_id] = await tracker.asubmit_many([message()])
            return tracking_id
        if how == "submit in the loop":
            return tracker.submit(message())
        # From a thread of the application's own (not one of asyncio's workers).
        ids: list[str] = []
        submitter = threading.Thread(target=lambda: ids.append(tracker.submit(message())))
        submitter.start()
        await asyncio.to_thread(submitter.join, 10)
        return ids[0]

    async def scenario() -> None:
        stop = asyncio.Event()
        runner = asyncio.create_task(tracker.arun_forever(stop, idle=3600))
        try:
            await asyncio.sleep(0.1)  # the first loop finds nothing: the runner sleeps
            tracking_id = await submit()

            async def delivered() -> None:
                while not all(
                    r.state is State.DELIVERED
                    for r in (await tracker.astatus(tracking_id)).recipients
                ):
                    await asyncio.sleep(0.01)

            await asyncio.wait_for(delivered(), timeout=NOTICE_LIMIT)
        finally:
            stop.set()
            await asyncio.wait_for(runner, timeout=10)
        assert tracker._waking is None  # arun_forever let go of its loop

    run(scenario())
    assert len(transport.outbox) == 1


@pytest.mark.parametrize("runner", ["arun_pending", "arun_forever"])
@pytest.mark.parametrize("concurrency", [1, 3])
def test_stopping_puts_back_what_the_claimed_batch_has_not_sent(
    store: Store, runner: str, concurrency: int
) -> None:
    stop = asyncio.Event()
    seen = [0]

    def handler(_message: Message, _envelope: Envelope) -> dict[str, Outcome]:
        seen[0] += 1
        if seen[0] == 3:
            stop.set()  # on the loop's thread: MemoryTransport calls it in asend
        return {}

    transport = MemoryTransport(handler)
    tracker = make(transport, store, FakeClock(), commit_batch=2)
    tracker.submit_many(
        [
            Message.build(sender="s@example.com", to=[f"r{i}@example.org"], subject=f"m{i}")
            for i in range(10)
        ]
    )

    async def scenario() -> None:
        if runner == "arun_pending":
            summary = await tracker.arun_pending(concurrency=concurrency, stop=stop)
            assert summary.delivered == len(transport.outbox)
        else:
            await asyncio.wait_for(
                tracker.arun_forever(stop, idle=3600, concurrency=concurrency), timeout=10
            )

    run(scenario())
    sent = len(transport.outbox)
    assert 3 <= sent < 10  # the chunks in flight finished; the batch did not
    assert len(tracker.find(state=State.DELIVERED)) == sent
    queued = tracker.find(state=State.QUEUED)
    assert len(queued) == 10 - sent
    assert all(not r.attempts for q in queued for r in q.recipients)
    assert run(tracker.arun_pending()).delivered == 10 - sent
    subjects = sorted(str(item.message.get("Subject")) for item in transport.outbox)
    assert subjects == sorted(f"m{i}" for i in range(10))  # each sent once


def test_arun_forever_waits_out_a_transient_store_failure() -> None:
    tracker = make(MemoryTransport(), FlakyStore(2), FakeClock())
    tracking_id = tracker.submit(message())
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    run(tracker.arun_forever(sleep=sleep, idle=5.0, max_loops=4))
    assert slept == [1.0, 2.0, 5.0, 5.0]
    assert tracker.status(tracking_id).recipients[0].state is State.DELIVERED

    broken = make(MemoryTransport(), FlakyStore(1, transient=False), FakeClock())
    with pytest.raises(StoreError, match="locked"):
        run(broken.arun_forever(sleep=sleep, idle=5.0, max_loops=4))


def test_arelease_leases_puts_back_this_worker_s_leases(store: Store) -> None:
    clock = FakeClock()
    tracker = make(MemoryTransport(), store, clock)
    tracking_id = tracker.submit(message(("a@example.org",)))
    store.claim(worker=tracker.worker_id, now=clock(), lease=dt.timedelta(minutes=15), limit=9)
    assert run(tracker.arelease_leases()) == 1
    assert run(tracker.arun_pending()).delivered == 1
    assert tracker.status(tracking_id).recipients[0].state is State.DELIVERED


def test_aclose_closes_everything(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    tracker = make(MemoryTransport(), store, FakeClock())
    run(tracker.aclose())
    with pytest.raises(Exception, match="closed"):
        store.get("x")


def counting(delay: float) -> tuple[Any, dict[str, int]]:
    """A handler that accepts after ``delay`` seconds, and its count of deliveries in
    flight (``now``) and the most at once (``most``)."""
    in_flight = {"now": 0, "most": 0}

    async def handler(msg: Message, envelope: Envelope) -> dict[str, Outcome]:
        in_flight["now"] += 1
        in_flight["most"] = max(in_flight["most"], in_flight["now"])
        await asyncio.sleep(delay)
        in_flight["now"] -= 1
        return {}

    return handler, in_flight


def test_per_domain_concurrency_holds_under_concurrent_claims(store: Store) -> None:
    handler, in_flight = counting(0.01)
    clock = FakeClock()
    transport = MemoryTransport(handler)
    tracker = make(
        transport,
        store,
        clock,
        split_by_domain=True,
        limits=DomainLimits(max_concurrent=2, busy_delay=5),
    )

    async def scenario() -> tuple[RunSummary, RunSummary]:
        for index in range(6):
            await tracker.asubmit(message((f"r{index}@one.example",)))
        first = await tracker.arun_pending(concurrency=6)
        clock.advance(5)
        second = await tracker.arun_pending(concurrency=6)
        return first, second

    first, second = run(scenario())
    assert in_flight["most"] == 2
    assert (first.delivered, first.postponed) == (2, 4)
    assert (second.delivered, second.postponed) == (2, 2)


class CountingStore(MemoryStore):
    """A MemoryStore that counts the commits of results (``apply_many`` calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.commits: list[int] = []

    def apply_many(self, batch: Any, **options: Any) -> Any:
        self.commits.append(len(batch))
        return super().apply_many(batch, **options)


@pytest.mark.parametrize(("concurrency", "count", "commit_batch"), [(1, 12, 5), (4, 12, 5)])
def test_results_are_committed_in_batches(concurrency: int, count: int, commit_batch: int) -> None:
    store = CountingStore()
    tracker = make(MemoryTransport(), store, FakeClock(), commit_batch=commit_batch)

    async def scenario() -> RunSummary:
        tracker.submit_many([message((f"r{i}@example.org",)) for i in range(count)])
        return await tracker.arun_pending(concurrency=concurrency)

    assert run(scenario()).delivered == count
    # Full batches while results come in, the rest when the claimed batch ends; never
    # more than commit_batch (results awaiting their commit plus transactions in flight
    # are bounded by it, as in the sync tracker).
    assert sum(store.commits) == count
    assert len(store.commits) < count
    assert all(size <= commit_batch for size in store.commits)
    assert store.commits[0] >= commit_batch


def test_a_result_waits_no_longer_than_commit_interval() -> None:
    store = CountingStore()
    clock = FakeClock()

    async def slow(msg: Message, envelope: Envelope) -> dict[str, Outcome]:
        clock.advance(2)  # each delivery takes longer than commit_interval
        return {}

    tracker = make(
        MemoryTransport(slow),
        store,
        clock,
        commit_batch=50,
        commit_interval=dt.timedelta(seconds=1),
    )

    async def scenario() -> RunSummary:
        tracker.submit_many([message((f"r{i}@example.org",)) for i in range(4)])
        return await tracker.arun_pending(concurrency=1)

    assert run(scenario()).delivered == 4
    # As in the sync runner, the wait is noticed when the next result comes in: each
    # commit holds a result that waited past commit_interval and the one that noticed.
    # (Without the interval, all four would wait for the end of the batch: [4].)
    assert store.commits == [2, 2]


def test_events_fire_after_their_commit(store: Store) -> None:
    tracker = make(MemoryTransport(), store, FakeClock(), commit_batch=3)
    seen: list[State] = []

    async def check(event: TrackerEvent) -> None:
        # The change an event reports is already in the store.
        seen.append(tracker.status(event.tracking_id).recipients[0].state)

    tracker.on("delivered", check)

    async def scenario() -> RunSummary:
        tracker.submit_many([message((f"r{i}@example.org",)) for i in range(7)])
        return await tracker.arun_pending(concurrency=2)

    assert run(scenario()).delivered == 7
    assert seen == [State.DELIVERED] * 7


def test_a_cancelled_run_commits_the_results_in_hand() -> None:
    store = CountingStore()
    started = asyncio.Event()

    async def stuck(msg: Message, envelope: Envelope) -> dict[str, Outcome]:
        if str(envelope.recipients[0].address) == "slow@example.org":
            started.set()
            await asyncio.sleep(3600)
        return {}

    tracker = make(MemoryTransport(stuck), store, FakeClock(), commit_batch=50)

    async def scenario() -> tuple[str, str]:
        fast = await tracker.asubmit(message(("fast@example.org",)))
        slow = await tracker.asubmit(message(("slow@example.org",)))
        task = asyncio.create_task(tracker.arun_pending(concurrency=2))
        await started.wait()
        await asyncio.sleep(0.01)  # the fast one's result is in hand, not yet committed
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return fast, slow

    fast, slow = run(scenario())
    assert tracker.status(fast).recipients[0].state is State.DELIVERED
    # The interrupted one is put back, due at once, in the same commit: never lost.
    interrupted = tracker.status(slow).recipients[0]
    assert (interrupted.state, interrupted.attempts, interrupted.lease_owner) == (
        State.QUEUED,
        (),
        None,
    )
    assert store.commits == [2]


class BatchingTransport(MemoryTransport):
    """A MemoryTransport with an ``asend_many`` of its own (as the SMTP pool has), which
    records how many messages each call carried."""

    def __init__(self, handler: Any = None) -> None:
        super().__init__(handler)
        self.calls: list[int] = []

    async def asend_many(self, items: Any) -> Any:
        items = list(items)
        self.calls.append(len(items))
        return await super().asend_many(items)


def test_a_transport_with_its_own_asend_many_gets_whole_chunks(store: Store) -> None:
    transport = BatchingTransport()
    tracker = make(transport, store, FakeClock(), commit_batch=50)

    async def scenario() -> RunSummary:
        tracker.submit_many([message((f"r{i}@example.org",)) for i in range(60)])
        first = await tracker.arun_pending(concurrency=10)
        tracker.submit_many([message((f"s{i}@example.org",)) for i in range(60)])
        return first + await tracker.arun_pending(concurrency=10)

    assert run(scenario()).delivered == 120
    assert sum(transport.calls) == 120
    # Until the first chunk has set a pace, chunks are single messages (at most
    # ``concurrency`` of them); then each takes what commit_batch leaves room for.
    assert max(transport.calls) >= 40
    assert transport.calls[-1] > 1
    assert len(transport.calls) < 20


def test_the_base_asend_many_gets_shares_so_messages_overlap() -> None:
    slow, in_flight = counting(0.002)
    tracker = make(MemoryTransport(slow), MemoryStore(), FakeClock(), commit_batch=40)

    async def scenario() -> RunSummary:
        tracker.submit_many([message((f"r{i}@example.org",)) for i in range(40)])
        return await tracker.arun_pending(concurrency=4)

    assert run(scenario()).delivered == 40
    # MemoryTransport keeps the base asend_many (one message at a time): chunks of
    # 40 / 4 = 10 keep four messages going at once.
    assert in_flight["most"] == 4


def test_an_unexpected_error_in_one_chunk_puts_back_it_and_the_queue(store: Store) -> None:
    async def handler(msg: Message, envelope: Envelope) -> dict[str, Outcome]:
        if str(envelope.recipients[0].address) == "r3@example.org":
            raise RuntimeError("transport bug")
        return {}

    transport = BatchingTransport(handler)
    tracker = make(transport, store, FakeClock(), commit_batch=50)

    async def scenario() -> list[str]:
        ids = tracker.submit_many([message((f"r{i}@example.org",)) for i in range(8)])
        with pytest.raises(RuntimeError, match="transport bug"):
            await tracker.arun_pending(concurrency=1)
        return ids

    ids = run(scenario())
    states = [tracker.status(i).recipients[0] for i in ids]
    delivered = [i for i, s in enumerate(states) if s.state is State.DELIVERED]
    queued = [
        i
        for i, s in enumerate(states)
        if (s.state, s.attempts, s.lease_owner) == (State.QUEUED, (), None)
    ]
    # The first chunk is one message (no pace yet), the next all the rest. Whichever
    # raised, nothing of it was decided: all of it, and all still queued, is back in the
    # queue, due at once, with no attempt (at-least-once: the ones the transport had
    # taken before r3 go again). What finished before is recorded.
    assert 3 in queued
    if transport.calls == [1]:  # r3 went first
        assert queued == list(range(8))
    else:
        assert transport.calls == [1, 7]
        assert len(delivered) == 1
        assert sorted(delivered + queued) == list(range(8))


class ThreadRecordingStore(MemoryStore):
    """A MemoryStore that records which threads called it."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: set[int] = set()

    def __getattribute__(self, name: str) -> Any:
        if name in {"add_many", "get", "apply", "apply_many", "find", "next_due"}:
            object.__getattribute__(self, "threads").add(threading.get_ident())
        return object.__getattribute__(self, name)


def test_the_async_queries_and_changes_run_off_the_event_loop() -> None:
    store = ThreadRecordingStore()
    clock = FakeClock()
    tracker = make(MemoryTransport(), store, clock)

    async def scenario() -> int:
        loop_thread = threading.get_ident()
        first, second = await tracker.asubmit_many(
            [
                message(("a@example.org",)),
                (message(("b@example.org",)), Envelope("s@x.example", ["c@example.org"])),
            ]
        )
        assert [str(r.address) for r in (await tracker.astatus(second)).recipients] == [
            "c@example.org"
        ]
        assert await tracker.anext_due() == T0
        assert await tracker.acancel(first) == (Address.parse("a@example.org"),)
        clock.advance(60)
        found = await tracker.afind(state=State.CANCELLED, older_than=dt.timedelta(seconds=30))
        assert [record.id for record in found] == [first]
        with pytest.raises(KeyError):
            await tracker.astatus("no-such-id")
        with pytest.raises(KeyError):
            await tracker.acancel("no-such-id")
        return loop_thread

    loop_thread = run(scenario())
    assert store.threads
    assert loop_thread not in store.threads


class ShortChangingAsync(MemoryTransport):
    """A transport whose ``asend_many`` breaks the contract: one result too few."""

    async def asend_many(self, items: Any) -> Any:
        return (await super().asend_many(items))[:-1]


def test_asend_many_with_too_few_results_puts_the_chunk_back(store: Store) -> None:
    tracker = make(ShortChangingAsync(), store, FakeClock())

    async def scenario() -> list[str]:
        ids = await tracker.asubmit_many([message((f"r{i}@example.org",)) for i in range(3)])
        with pytest.raises(RuntimeError, match=r"ShortChangingAsync\.asend_many returned 0"):
            await tracker.arun_pending()
        return ids

    # Nothing recorded, nothing lost: every recipient is due again, with no attempt.
    for tracking_id in run(scenario()):
        (recipient,) = tracker.status(tracking_id).recipients
        assert (recipient.state, recipient.attempts, recipient.lease_owner) == (
            State.QUEUED,
            (),
            None,
        )


@settings(max_examples=40, deadline=None)
@given(
    fates=st.lists(st.sampled_from(FATES), min_size=1, max_size=30),
    concurrency=st.integers(1, 5),
    commit_batch=st.integers(1, 12),
    batch_size=st.integers(1, 12),
    own_asend_many=st.booleans(),
)
def test_the_async_runner_loses_nothing(
    fates: list[str],
    concurrency: int,
    commit_batch: int,
    batch_size: int,
    own_asend_many: bool,
) -> None:
    # Whatever the outcomes, chunking and concurrency, when arun_pending returns or raises
    # (the same property as the sync runner's, test_engine.py).
    transport = BatchingTransport(fated) if own_asend_many else MemoryTransport(fated)
    tracker = make(
        transport, MemoryStore(), FakeClock(), commit_batch=commit_batch, batch_size=batch_size
    )
    ids = tracker.submit_many(fated_messages(fates))

    async def scenario() -> None:
        with contextlib.suppress(RuntimeError):
            await tracker.arun_pending(concurrency=concurrency)

    run(scenario())
    assert_nothing_lost(tracker, fates, ids)
