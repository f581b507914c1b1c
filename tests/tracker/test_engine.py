"""DeliveryTracker: submitting, states, retries, errors, events, queries, shaping, workers."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailrelay.address import Address
from mailrelay.envelope import Envelope
from mailrelay.errors import (
    AuthenticationError,
    ConnectError,
    SessionRefused,
    StoreError,
    TLSError,
)
from mailrelay.message import Message
from mailrelay.reply import Reply
from mailrelay.results import DeliveryResult, Outcome
from mailrelay.tracker.async_engine import AsyncDeliveryTracker
from mailrelay.tracker.core import RELAY_KEY
from mailrelay.tracker.engine import DeliveryTracker, RunSummary
from mailrelay.tracker.events import EventKind, TrackerEvent
from mailrelay.tracker.retry import DomainLimits, DomainShaper, RetryPolicy
from mailrelay.tracker.sqlite_store import SQLiteStore
from mailrelay.tracker.store import Claim, MemoryStore, State, Store
from mailrelay.transport.base import BatchItem
from mailrelay.transport.memory import MemoryTransport

T0 = dt.datetime(2026, 3, 1, 8, 0, tzinfo=dt.UTC)


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, start: dt.datetime = T0) -> None:
        self.now = start

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


def no_jitter() -> float:
    """The middle of the jitter range: delays come out exact."""
    return 0.5


def message(to: tuple[str, ...] = ("a@example.org", "b@example.net")) -> Message:
    return Message.build(sender="sender@example.com", to=list(to), subject="hello", text="hi\n")


Answer = Mapping[str, Outcome | Reply]


def scripted(*answers: Answer | Exception) -> Callable[[Message, Envelope], Answer]:
    """A handler that gives each answer in turn, then accepts everything."""
    queue = list(answers)

    def handler(_message: Message, _envelope: Envelope) -> Answer:
        if not queue:
            return {}
        answer = queue.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    return handler


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "postgres":  # tests/peers/postgres.py: a fresh schema, dropped after
        yield request.getfixturevalue("postgres_store")
        return
    made: Store = MemoryStore() if request.param == "memory" else SQLiteStore(tmp_path / "t.db")
    yield made
    made.close()


def tracker_for(
    transport: MemoryTransport, store: Store, clock: FakeClock, **options: object
) -> DeliveryTracker:
    return DeliveryTracker(
        transport,
        store,
        clock=clock,
        random=no_jitter,
        worker_id="w1",
        **options,  # type: ignore[arg-type]
    )


def collect(tracker: DeliveryTracker) -> list[TrackerEvent]:
    seen: list[TrackerEvent] = []
    for kind in EventKind:
        tracker.on(kind, seen.append)
    return seen


def test_submit_stores_durably_before_returning(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    store = SQLiteStore(path)
    tracker = DeliveryTracker(MemoryTransport(), store, clock=FakeClock())
    msg = message()
    tracking_id = tracker.submit(msg)
    store.close()
    # Another store on the same file (as after a crash) sees the message whole.
    reopened = SQLiteStore(path)
    record = reopened.get(tracking_id)
    assert record is not None
    assert reopened.content(tracking_id) == msg.as_bytes()
    assert record.message_id == msg.message_id
    assert [r.state for r in record.recipients] == [State.QUEUED, State.QUEUED]
    reopened.close()


def test_delivery_records_each_attempt(store: Store) -> None:
    clock = FakeClock()
    transport = MemoryTransport()
    tracker = tracker_for(transport, store, clock)
    events = collect(tracker)
    tracking_id = tracker.submit(message())
    summary = tracker.run_pending()
    assert summary == RunSummary(messages=1, delivered=2)
    record = tracker.status(tracking_id)
    assert [r.state for r in record.recipients] == [State.DELIVERED, State.DELIVERED]
    attempt = record.recipients[0].attempts[0]
    assert (attempt.at, attempt.host, attempt.code, attempt.enhanced) == (
        T0,
        "memory",
        250,
        "2.0.0",
    )
    assert [e.kind for e in events] == [EventKind.DELIVERED, EventKind.DELIVERED]
    assert len(transport.outbox) == 1
    # Nothing more to do.
    assert tracker.run_pending() == RunSummary()


def test_each_recipient_gets_its_own_outcome_and_retries_go_only_to_the_unresolved(
    store: Store,
) -> None:
    clock = FakeClock()
    transport = MemoryTransport(
        scripted(
            {
                "a@example.org": Reply.of(452, "4.2.2 mailbox full"),
                "b@example.net": Reply.of(550, "5.1.1 no such user"),
            }
        )
    )
    tracker = tracker_for(transport, store, clock)
    tracking_id = tracker.submit(message(("a@example.org", "b@example.net", "c@example.com")))
    assert tracker.run_pending() == RunSummary(messages=1, delivered=1, deferred=1, bounced=1)
    record = tracker.status(tracking_id)
    a, b, c = record.recipients
    assert (a.state, b.state, c.state) == (State.DEFERRED, State.BOUNCED, State.DELIVERED)
    assert a.next_attempt_at == T0 + dt.timedelta(seconds=300)
    assert (b.attempts[0].code, b.attempts[0].enhanced) == (550, "5.1.1")
    assert b.attempts[0].text == "5.1.1 no such user"
    clock.advance(299)
    assert tracker.run_pending() == RunSummary()
    clock.advance(1)
    assert tracker.run_pending() == RunSummary(messages=1, delivered=1)
    retry_envelope = transport.outbox[-1].envelope
    assert [str(r.address) for r in retry_envelope.recipients] == ["a@example.org"]
    a = tracker.status(tracking_id).recipients[0]
    assert a.state is State.DELIVERED
    assert [x.code for x in a.attempts] == [452, 250]


BAD_CREDENTIALS = AuthenticationError("bad credentials", reply=Reply.of(535, "5.7.8 no"))
UNTRUSTED = TLSError("certificate verify failed", host="mx:25")


@pytest.mark.parametrize(
    ("error", "policy", "state"),
    [
        (ConnectError("refused", host="mx:25"), RetryPolicy(), State.DEFERRED),
        (SessionRefused("busy", reply=Reply.of(421, "4.3.2 busy")), RetryPolicy(), State.DEFERRED),
        (SessionRefused("go away", reply=Reply.of(554, "5.7.1 no")), RetryPolicy(), State.BOUNCED),
        # Permanent, but about our side (credentials, TLS): deferred by default, so that a
        # wrong password does not bounce the whole queue...
        (BAD_CREDENTIALS, RetryPolicy(), State.DEFERRED),
        (UNTRUSTED, RetryPolicy(), State.DEFERRED),
        # ...and bounced when the policy says so.
        (BAD_CREDENTIALS, RetryPolicy(defer_errors=()), State.BOUNCED),
        (UNTRUSTED, RetryPolicy(defer_errors=[AuthenticationError]), State.BOUNCED),
    ],
)
def test_a_delivery_error_decides_for_every_recipient(
    store: Store, error: Exception, policy: RetryPolicy, state: State
) -> None:
    clock = FakeClock()
    tracker = tracker_for(MemoryTransport(scripted(error)), store, clock, retry=policy)
    tracking_id = tracker.submit(message())
    tracker.run_pending()
    record = tracker.status(tracking_id)
    assert [r.state for r in record.recipients] == [state, state]
    attempt = record.recipients[0].attempts[0]
    assert attempt.source == "error"
    assert type(error).__name__ in attempt.text


def test_any_other_exception_leaves_the_work_due_and_propagates(store: Store) -> None:
    clock = FakeClock()
    transport = MemoryTransport(scripted(RuntimeError("bug in a transport")))
    tracker = tracker_for(transport, store, clock)
    first = tracker.submit(message())
    second = tracker.submit(message(("c@example.com",)))
    with pytest.raises(RuntimeError, match="bug"):
        tracker.run_pending()
    for tracking_id in (first, second):
        record = tracker.status(tracking_id)
        assert {r.state for r in record.recipients} == {State.QUEUED}
        assert all(r.attempts == () and r.lease_owner is None for r in record.recipients)
    # Nothing was lost: the next run sends both.
    assert tracker.run_pending().delivered == 3


def test_recipients_expire_after_the_maximum_age(store: Store) -> None:
    clock = FakeClock()
    retry = RetryPolicy(initial=3600, factor=2, max_delay=6 * 3600, max_age=86400)
    transport = MemoryTransport(lambda m, e: {r.address: Outcome.TRANSIENT for r in e.recipients})
    tracker = tracker_for(transport, store, clock, retry=retry)
    events = collect(tracker)
    tracking_id = tracker.submit(message(("a@example.org",)))
    for _ in range(50):  # bounded: the policy expires it within a day of fake time
        tracker.run_pending()
        due = tracker.next_due()
        if due is None:
            break
        clock.now = due
    record = tracker.status(tracking_id)
    only = record.recipients[0]
    assert only.state is State.EXPIRED
    times = [(a.at - T0).total_seconds() / 3600 for a in only.attempts]
    # 1h, 2h, 4h, 6h (capped), 6h, then the last try at the 24h deadline.
    assert times == [0, 1, 3, 7, 13, 19, 24]
    assert [e.kind for e in events][-1] is EventKind.EXPIRED


def test_a_raising_callback_is_logged_and_changes_nothing(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    tracker = tracker_for(MemoryTransport(), store, clock)
    seen: list[TrackerEvent] = []

    def broken(event: TrackerEvent) -> None:
        raise ValueError("callback bug")

    tracker.on("delivered", broken)
    tracker.on("delivered", seen.append)
    tracking_id = tracker.submit(message())
    with caplog.at_level(logging.ERROR, logger="mailrelay.tracker.events"):
        summary = tracker.run_pending()
    assert summary.delivered == 2
    assert len(seen) == 2
    assert "callback bug" in caplog.text
    assert {r.state for r in tracker.status(tracking_id).recipients} == {State.DELIVERED}


def test_async_callbacks_are_refused_by_the_sync_tracker(store: Store) -> None:
    tracker = tracker_for(MemoryTransport(), store, FakeClock())

    async def callback(event: TrackerEvent) -> None:
        return None

    with pytest.raises(TypeError, match="async"):
        tracker.on("delivered", callback)
    with pytest.raises(ValueError, match="nonsense"):
        tracker.on("nonsense", print)


def test_cancel_stops_future_attempts(store: Store) -> None:
    clock = FakeClock()
    transport = MemoryTransport(scripted({"a@example.org": Outcome.TRANSIENT}))
    tracker = tracker_for(transport, store, clock)
    tracking_id = tracker.submit(message())
    tracker.run_pending()
    assert tracker.cancel(tracking_id) == (Address.parse("a@example.org"),)
    clock.advance(86400)
    assert tracker.run_pending() == RunSummary()
    states = [r.state for r in tracker.status(tracking_id).recipients]
    assert states == [State.CANCELLED, State.DELIVERED]
    with pytest.raises(KeyError):
        tracker.cancel("no-such-id")


def test_find_by_state_and_age(store: Store) -> None:
    clock = FakeClock()
    transport = MemoryTransport(scripted({"a@example.org": Outcome.TRANSIENT}))
    tracker = tracker_for(transport, store, clock)
    old = tracker.submit(message(("a@example.org",)))
    tracker.run_pending()
    clock.advance(7200)
    new = tracker.submit(message(("b@example.net",)))
    assert [r.id for r in tracker.find(state=State.DEFERRED)] == [old]
    assert [r.id for r in tracker.find(state=State.QUEUED)] == [new]
    assert [r.id for r in tracker.find(older_than=dt.timedelta(hours=1))] == [old]
    assert [r.id for r in tracker.find()] == [old, new]


def test_run_forever_sleeps_until_due_and_stops_cleanly(store: Store) -> None:
    clock = FakeClock()
    transport = MemoryTransport(scripted({"a@example.org": Outcome.TRANSIENT}))
    tracker = tracker_for(transport, store, clock)
    tracking_id = tracker.submit(message(("a@example.org",)))
    stop = threading.Event()
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.advance(seconds)
        if tracker.status(tracking_id).is_final:
            stop.set()

    tracker.run_forever(stop, sleep=sleep, idle=3600, max_loops=10)
    assert slept == [300.0, 3600.0]
    assert tracker.status(tracking_id).recipients[0].state is State.DELIVERED


def test_run_forever_honours_max_loops_and_idle(store: Store) -> None:
    tracker = tracker_for(MemoryTransport(), store, FakeClock())
    slept: list[float] = []
    tracker.run_forever(sleep=slept.append, idle=5.0, max_loops=3)
    assert slept == [5.0, 5.0, 5.0]


def test_retry_hook_chooses_the_delay(store: Store) -> None:
    clock = FakeClock()

    def hook(recipient: Address, reply: Reply | None) -> float | None:
        if reply is not None and reply.enhanced is not None and str(reply.enhanced) == "4.2.2":
            return 6 * 3600.0
        return None

    transport = MemoryTransport(
        scripted(
            {
                "a@example.org": Reply.of(452, "4.2.2 mailbox full"),
                "b@example.net": Reply.of(451, "4.3.0 try later"),
            }
        )
    )
    tracker = tracker_for(transport, store, clock, retry=RetryPolicy(hook=hook))
    tracking_id = tracker.submit(message())
    tracker.run_pending()
    a, b = tracker.status(tracking_id).recipients
    assert a.next_attempt_at == T0 + dt.timedelta(hours=6)
    assert b.next_attempt_at == T0 + dt.timedelta(minutes=5)


# -- bulk: domain transactions and shaping ------------------------------------------


RECIPIENTS = ("a1@one.example", "b@two.example", "a2@one.example")


@pytest.mark.parametrize(
    ("split", "calls"),
    [
        (False, [["a1@one.example", "b@two.example", "a2@one.example"]]),
        (True, [["a1@one.example", "a2@one.example"], ["b@two.example"]]),
    ],
)
def test_recipients_sharing_a_domain_go_in_one_transaction(
    store: Store, split: bool, calls: list[list[str]]
) -> None:
    transport = MemoryTransport()
    tracker = tracker_for(transport, store, FakeClock(), split_by_domain=split)
    tracker.submit(message(RECIPIENTS))
    assert tracker.run_pending().delivered == 3
    assert [
        [str(r.address) for r in item.envelope.recipients] for item in transport.outbox
    ] == calls


def test_per_domain_rate_limit_postpones_without_an_attempt(store: Store) -> None:
    clock = FakeClock()
    transport = MemoryTransport()
    tracker = tracker_for(
        transport, store, clock, split_by_domain=True, limits=DomainLimits(per_second=0.5)
    )
    first = tracker.submit(message(("a@one.example",)))
    second = tracker.submit(message(("b@one.example",)))
    other = tracker.submit(message(("c@two.example",)))
    summary = tracker.run_pending()
    assert (summary.delivered, summary.postponed) == (2, 1)
    assert tracker.status(other).recipients[0].state is State.DELIVERED
    # Equal due times: either of the two to one.example may go first.
    pair = [tracker.status(first).recipients[0], tracker.status(second).recipients[0]]
    assert sorted(r.state.value for r in pair) == ["delivered", "queued"]
    waiting = next(r for r in pair if r.state is State.QUEUED)
    assert (waiting.state, waiting.attempts) == (State.QUEUED, ())
    assert waiting.next_attempt_at == T0 + dt.timedelta(seconds=2)
    clock.advance(2)
    assert tracker.run_pending().delivered == 1


def test_a_domain_answering_421_is_backed_off_adaptively(store: Store) -> None:
    clock = FakeClock()
    busy = SessionRefused("busy", reply=Reply.of(421, "4.7.0 too many connections"))
    transport = MemoryTransport(scripted(busy, busy))
    limits = DomainLimits(backoff_initial=60, backoff_max=100)
    tracker = tracker_for(
        transport,
        store,
        clock,
        split_by_domain=True,
        limits=limits,
        retry=RetryPolicy(initial=10, jitter=0),
    )
    tracking_id = tracker.submit(message(("a@one.example",)))
    tracker.run_pending()  # refused: held off 60 s; the recipient's own retry is in 10 s
    assert tracker.shaper.blocked_until("one.example") == T0 + dt.timedelta(seconds=60)
    clock.advance(10)
    assert tracker.run_pending().postponed == 1
    recipient = tracker.status(tracking_id).recipients[0]
    assert recipient.next_attempt_at == T0 + dt.timedelta(seconds=60)
    assert len(recipient.attempts) == 1
    clock.advance(50)
    tracker.run_pending()  # refused again: the hold-off doubles, capped at 100 s
    assert tracker.shaper.blocked_until("one.example") == clock.now + dt.timedelta(seconds=100)
    clock.advance(100)
    assert tracker.run_pending().delivered == 1
    assert tracker.shaper.blocked_until("one.example") is None


# -- several workers ------------------------------------------------------------------


def test_two_trackers_sharing_a_store_deliver_each_recipient_once(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    clock = FakeClock()
    transport = MemoryTransport()
    stores = [SQLiteStore(path), SQLiteStore(path)]
    trackers = [
        DeliveryTracker(transport, s, clock=clock, worker_id=f"w{i}", batch_size=3)
        for i, s in enumerate(stores)
    ]
    ids = [trackers[0].submit(message((f"r{i}@example.org",))) for i in range(30)]
    barrier = threading.Barrier(2)

    def work(tracker: DeliveryTracker) -> None:
        barrier.wait(timeout=10)
        tracker.run_pending()

    threads = [threading.Thread(target=work, args=(t,)) for t in trackers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    sent = [str(item.envelope.recipients[0].address) for item in transport.outbox]
    assert sorted(sent) == sorted(f"r{i}@example.org" for i in range(30))
    assert all(trackers[0].status(i).recipients[0].state is State.DELIVERED for i in ids)
    for store in stores:
        store.close()


def test_a_dead_workers_claim_is_taken_over_after_its_lease(store: Store) -> None:
    clock = FakeClock()
    transport = MemoryTransport()
    tracker = tracker_for(transport, store, clock, lease=dt.timedelta(minutes=10))
    tracking_id = tracker.submit(message(("a@example.org",)))
    # A worker claims the message and dies before recording anything.
    store.claim(worker="dead", now=clock(), lease=dt.timedelta(minutes=10), limit=10)
    assert tracker.run_pending() == RunSummary()
    assert tracker.next_due() == T0 + dt.timedelta(minutes=10)
    clock.advance(600)
    assert tracker.run_pending().delivered == 1
    assert tracker.status(tracking_id).recipients[0].state is State.DELIVERED


@pytest.mark.parametrize(
    "options",
    [{"lease": dt.timedelta(0)}, {"batch_size": 0}],
)
def test_bad_options_are_refused(store: Store, options: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="must"):
        tracker_for(MemoryTransport(), store, FakeClock(), **options)


# -- batches --------------------------------------------------------------------------


def test_submit_many_stores_all_in_one_step(store: Store) -> None:
    tracker = tracker_for(MemoryTransport(), store, FakeClock())
    first = message(("a@example.org",))
    ids = tracker.submit_many([first, (message(), Envelope("x@example.com", ["c@example.com"]))])
    assert len(ids) == len(set(ids)) == 2
    assert [str(r.address) for r in tracker.status(ids[0]).recipients] == ["a@example.org"]
    assert [str(r.address) for r in tracker.status(ids[1]).recipients] == ["c@example.com"]
    assert store.content(ids[0]) == first.as_bytes()
    with pytest.raises(TypeError):
        tracker.submit_many([message(), "not a message"])  # type: ignore[list-item]
    assert len(tracker.find()) == 2


@pytest.mark.parametrize("commit_batch", [1, 3, 50])
def test_batched_commits_keep_every_result_even_when_a_bug_interrupts(
    store: Store, commit_batch: int
) -> None:
    def handler(msg: Message, envelope: Envelope) -> dict[str, Outcome]:
        if str(envelope.recipients[0].address) == "r7@example.org":
            raise RuntimeError("transport bug")
        return {}

    transport = MemoryTransport(handler)
    tracker = tracker_for(transport, store, FakeClock(), commit_batch=commit_batch)
    delivered: list[TrackerEvent] = []
    tracker.on("delivered", delivered.append)
    ids = [tracker.submit(message((f"r{i}@example.org",))) for i in range(10)]
    with pytest.raises(RuntimeError, match="transport bug"):
        tracker.run_pending()
    states = {
        str(tracker.status(i).recipients[0].address): tracker.status(i).recipients[0].state
        for i in ids
    }
    # Every result in hand was committed; the chunk the bug interrupted (at most
    # commit_batch messages, some of them sent: the transport does not say which) and
    # everything after it waits, due at once. None is lost.
    sent = [str(item.envelope.recipients[0].address) for item in transport.outbox]
    recorded = {a for a, s in states.items() if s is State.DELIVERED}
    assert recorded <= set(sent)
    assert all(s in (State.DELIVERED, State.QUEUED) for s in states.values())
    assert len(set(sent) - recorded) < commit_batch
    assert "r7@example.org" not in recorded
    assert len(delivered) == len(recorded)
    transport.handler = None
    assert tracker.run_pending().delivered == 10 - len(recorded)
    # Resent: only what was sent but not recorded, at most commit_batch - 1 here.
    again = [str(item.envelope.recipients[0].address) for item in transport.outbox]
    duplicates = [a for a in set(again) if again.count(a) > 1]
    assert set(duplicates) == set(sent) - recorded
    assert set(again) == {f"r{i}@example.org" for i in range(10)}


def test_run_forever_default_sleep_wakes_when_stopped(store: Store) -> None:
    tracker = tracker_for(MemoryTransport(), store, FakeClock())
    stop = threading.Event()
    thread = threading.Thread(target=tracker.run_forever, args=(stop,), kwargs={"idle": 30.0})
    thread.start()
    stop.set()
    thread.join(timeout=10)
    assert not thread.is_alive()


#: How long a test waits for the runner to notice a submission: far below the runner's
#: ``idle`` sleep (an hour), so only the wake-up can deliver within it (not a speed check).
NOTICE_LIMIT = 30.0


def wait_until_delivered(tracker: DeliveryTracker, tracking_id: str) -> None:
    """Poll ``tracking_id``'s state until every recipient is DELIVERED (or give up)."""
    done = threading.Event()
    for _ in range(int(NOTICE_LIMIT / 0.01)):
        if all(r.state is State.DELIVERED for r in tracker.status(tracking_id).recipients):
            return
        done.wait(0.01)
    raise AssertionError(f"not delivered within {NOTICE_LIMIT} s: {tracker.status(tracking_id)}")


@pytest.mark.parametrize("how", ["submit", "submit_many", "submit from another thread"])
def test_run_forever_wakes_when_this_tracker_stores_new_work(store: Store, how: str) -> None:
    transport = MemoryTransport()
    tracker = tracker_for(transport, store, FakeClock())
    stop = threading.Event()
    runner = threading.Thread(target=tracker.run_forever, args=(stop,), kwargs={"idle": 3600.0})
    runner.start()
    try:
        # Until nothing is due, the runner sleeps its idle hour; its first loop finds the
        # queue empty.
        stop.wait(0.1)
        if how == "submit":
            tracking_id = tracker.submit(message())
        elif how == "submit_many":
            [tracking_id] = tracker.submit_many([message()])
        else:
            ids: list[str] = []
            submitter = threading.Thread(target=lambda: ids.append(tracker.submit(message())))
            submitter.start()
            submitter.join(timeout=10)
            [tracking_id] = ids
        wait_until_delivered(tracker, tracking_id)
    finally:
        stop.set()
        runner.join(timeout=10)
    assert not runner.is_alive()
    assert len(transport.outbox) == 1


def stopping_after(count: int, stop: threading.Event) -> Callable[[Message, Envelope], Answer]:
    """A handler that accepts everything and sets ``stop`` while delivering message ``count``."""
    seen = [0]

    def handler(_message: Message, _envelope: Envelope) -> Answer:
        seen[0] += 1
        if seen[0] == count:
            stop.set()
        return {}

    return handler


def assert_stopped_between_chunks(tracker: DeliveryTracker, transport: MemoryTransport) -> None:
    """Everything sent was recorded DELIVERED; everything else is QUEUED, due at once, with
    no attempt; a later run sends the rest, each message once."""
    sent = len(transport.outbox)
    assert 3 <= sent < 10  # the chunk in flight finished; the batch did not
    delivered = tracker.find(state=State.DELIVERED)
    queued = tracker.find(state=State.QUEUED)
    assert len(delivered) == sent
    assert len(queued) == 10 - sent
    assert all(not r.attempts for q in queued for r in q.recipients)
    due = tracker.next_due()
    assert due is not None
    assert due <= tracker.clock()
    assert tracker.run_pending().delivered == 10 - sent
    subjects = [str(item.message.get("Subject")) for item in transport.outbox]
    assert sorted(subjects) == sorted(f"m{i}" for i in range(10))  # no duplicate


@pytest.mark.parametrize("runner", ["run_pending", "run_forever"])
def test_stopping_puts_back_what_the_claimed_batch_has_not_sent(store: Store, runner: str) -> None:
    stop = threading.Event()
    transport = MemoryTransport(stopping_after(3, stop))
    tracker = tracker_for(transport, store, FakeClock(), commit_batch=2)
    tracker.submit_many(
        [
            Message.build(sender="s@example.com", to=[f"r{i}@example.org"], subject=f"m{i}")
            for i in range(10)
        ]
    )
    if runner == "run_pending":
        summary = tracker.run_pending(stop=stop)
        assert summary.delivered == len(transport.outbox)
    else:
        tracker.run_forever(stop, idle=3600.0)  # returns once the chunk in flight is done
    assert_stopped_between_chunks(tracker, transport)


def test_release_leases_sends_at_once_what_a_dead_run_of_this_worker_had_claimed(
    store: Store,
) -> None:
    clock = FakeClock()
    first = tracker_for(
        MemoryTransport(scripted({"a@example.org": Outcome.TRANSIENT})), store, clock
    )
    tried = first.submit(message(("a@example.org",)))
    first.run_pending()  # a@ deferred, with an attempt
    clock.advance(3600)
    fresh = first.submit(message(("b@example.net",)))
    clock.advance(1)  # due one second after fresh: the claims below take them in that order
    other = first.submit(message(("c@example.org",)))
    # The run that dies: worker w1 (this tracker's id) claims two messages; w2 the third.
    lease = dt.timedelta(minutes=15)
    mine = store.claim(worker="w1", now=clock(), lease=lease, limit=2)
    assert {c.tracking_id for c in mine} == {tried, fresh}
    assert [c.tracking_id for c in store.claim(worker="w2", now=clock(), lease=lease, limit=5)] == [
        other
    ]

    transport = MemoryTransport()
    restarted = tracker_for(transport, store, clock)  # the same worker_id, "w1"
    assert restarted.run_pending().delivered == 0  # everything is leased
    assert restarted.release_leases() == 2
    assert restarted.status(tried).recipients[0].state is State.DEFERRED  # tried before
    assert restarted.status(fresh).recipients[0].state is State.QUEUED  # never tried
    assert restarted.status(other).recipients[0].state is State.SENDING  # w2's, untouched
    assert [a.code for a in restarted.status(tried).recipients[0].attempts] == [450]
    assert restarted.run_pending().delivered == 2
    assert restarted.release_leases() == 0
    assert sorted(str(item.envelope.recipients[0].address) for item in transport.outbox) == [
        "a@example.org",
        "b@example.net",
    ]


class FlakyStore(MemoryStore):
    """A MemoryStore whose first ``failures`` claims fail as a locked database does."""

    def __init__(self, failures: int, *, transient: bool = True) -> None:
        super().__init__()
        self.failures = failures
        self.transient = transient

    def claim(self, **kwargs: Any) -> list[Claim]:
        if self.failures:
            self.failures -= 1
            raise StoreError("database is locked", is_transient=self.transient)
        return super().claim(**kwargs)


def test_run_forever_waits_out_a_transient_store_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = FlakyStore(3)
    tracker = tracker_for(MemoryTransport(), store, FakeClock())
    tracking_id = tracker.submit(message())
    slept: list[float] = []
    with caplog.at_level(logging.WARNING, logger="mailrelay.tracker"):
        tracker.run_forever(sleep=slept.append, idle=3.0, max_loops=5)
    # 1, 2, then the pause is capped at idle; then a run that delivers, and an idle sleep.
    assert slept == [1.0, 2.0, 3.0, 3.0, 3.0]
    assert tracker.status(tracking_id).recipients[0].state is State.DELIVERED
    assert sum("the store failed" in r.getMessage() for r in caplog.records) == 3


def test_run_forever_raises_a_permanent_store_failure() -> None:
    tracker = tracker_for(MemoryTransport(), FlakyStore(1, transient=False), FakeClock())
    with pytest.raises(StoreError, match="locked"):
        tracker.run_forever(sleep=lambda _s: None, idle=3.0, max_loops=5)


def test_a_caller_sleep_is_not_cut_short_by_submissions(store: Store) -> None:
    """A ``sleep`` given by the caller (tests advancing a fake clock) is called as asked."""
    clock = FakeClock()
    tracker = tracker_for(MemoryTransport(), store, clock)
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        tracker.submit(message())  # stored while "asleep": the next loop sends it
        clock.advance(seconds)

    tracker.run_forever(sleep=sleep, idle=5.0, max_loops=3)
    # Each loop sends what the sleep before it stored, then sleeps the whole idle time
    # again: nothing is due, and the caller's sleep is the caller's.
    assert slept == [5.0, 5.0, 5.0]
    assert len(tracker.find(state=State.DELIVERED)) == 2
    assert len(tracker.find(state=State.QUEUED)) == 1


@pytest.mark.parametrize(
    ("step", "options", "seen"),
    [
        # Results wait for a batch of up to 50 (here: the end of the claim batch; the
        # first chunk of one message and the other four)...
        (0.0, {}, [5, 5, 5, 5, 5]),
        # ...or at most commit_interval: with 2 s per delivery, every second one commits.
        (2.0, {"commit_interval": dt.timedelta(seconds=1)}, [2, 2, 4, 4, 5]),
        (0.0, {"commit_batch": 2}, [2, 2, 4, 4, 5]),
        (0.0, {"commit_batch": 1}, [1, 2, 3, 4, 5]),
    ],
)
def test_results_are_committed_by_batch_or_by_age(
    store: Store, step: float, options: dict[str, object], seen: list[int]
) -> None:
    clock = FakeClock()

    def handler(_message: Message, _envelope: Envelope) -> dict[str, Outcome]:
        clock.advance(step)
        return {}

    transport = MemoryTransport(handler)
    tracker = tracker_for(transport, store, clock, **options)
    sent_when_committed: list[int] = []
    # Events fire right after the commit that recorded them.
    tracker.on("delivered", lambda _event: sent_when_committed.append(len(transport.outbox)))
    for index in range(5):
        tracker.submit(message((f"r{index}@example.org",)))
    assert tracker.run_pending().delivered == 5
    assert sent_when_committed == seen


@pytest.mark.parametrize(
    "options",
    [{"commit_batch": 0}, {"commit_interval": dt.timedelta(seconds=-1)}, {"message_cache": -1}],
)
def test_bad_commit_settings_are_refused(options: dict[str, object]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 -- each names its own setting
        tracker_for(MemoryTransport(), MemoryStore(), FakeClock(), **options)


# -- sending a claimed batch through send_many -----------------------------------------


class BatchRecorder(MemoryTransport):
    """A memory transport that records the size of every ``send_many`` call."""

    def __init__(self, handler: Callable[[Message, Envelope], Answer] | None = None) -> None:
        super().__init__(handler)
        self.batches: list[int] = []

    def send_many(self, items: Iterable[BatchItem]) -> list[DeliveryResult]:
        items = list(items)
        self.batches.append(len(items))
        return super().send_many(items)


@pytest.mark.parametrize(
    ("options", "batches"),
    [
        # The first chunk is one transaction (no pace known), then the claim batch whole.
        ({}, [1, 9]),
        ({"batch_size": 4}, [1, 3, 4, 2]),
        # A chunk never makes more than commit_batch results wait for their commit.
        ({"commit_batch": 3}, [1, 2, 3, 3, 1]),
        ({"commit_batch": 1}, [1] * 10),
    ],
)
def test_a_claimed_batch_goes_to_send_many_in_chunks(
    store: Store, options: dict[str, object], batches: list[int]
) -> None:
    transport = BatchRecorder()
    tracker = tracker_for(transport, store, FakeClock(), **options)
    tracker.submit_many([message((f"r{i}@example.org",)) for i in range(10)])
    assert tracker.run_pending().delivered == 10
    assert transport.batches == batches
    # Each message once.
    assert sorted(str(i.envelope.recipients[0].address) for i in transport.outbox) == sorted(
        f"r{i}@example.org" for i in range(10)
    )


def test_a_slow_server_gets_small_chunks(store: Store) -> None:
    clock = FakeClock()

    def handler(_message: Message, _envelope: Envelope) -> dict[str, Outcome]:
        clock.advance(0.3)
        return {}

    transport = BatchRecorder(handler)
    tracker = tracker_for(transport, store, clock)
    tracker.submit_many([message((f"r{i}@example.org",)) for i in range(10)])
    assert tracker.run_pending().delivered == 10
    # 0.3 s a transaction: three fit in the one-second commit_interval.
    assert transport.batches == [1, 3, 3, 3]


def test_a_delivery_error_inside_a_batch_decides_for_its_message_only(store: Store) -> None:
    # Permanent: a transient one would also back the relay off (and postpone the rest).
    refused = SessionRefused("go away", reply=Reply.of(554, "5.7.1 no"), host="mx:25")

    def handler(_message: Message, envelope: Envelope) -> Answer:
        if str(envelope.recipients[0].address) == "r2@example.org":
            raise refused
        return {}

    transport = BatchRecorder(handler)
    tracker = tracker_for(transport, store, FakeClock())
    ids = tracker.submit_many([message((f"r{i}@example.org",)) for i in range(5)])
    summary = tracker.run_pending()
    assert (summary.delivered, summary.bounced) == (4, 1)
    failed = tracker.status(ids[2]).recipients[0]
    assert failed.state is State.BOUNCED
    (attempt,) = failed.attempts
    assert (attempt.source, attempt.code, attempt.host) == ("error", 554, "mx:25")
    assert attempt.text.startswith("SessionRefused: ")
    others = [tracker.status(i).recipients[0] for i in ids if i != ids[2]]
    assert all(r.state is State.DELIVERED and r.attempts[0].source == "reply" for r in others)


def test_a_rate_limited_domain_is_sent_one_transaction_at_a_time(store: Store) -> None:
    transport = BatchRecorder()
    limits = DomainShaper(per_domain={"slow.example": DomainLimits(max_concurrent=1)})
    clock = FakeClock()
    tracker = tracker_for(transport, store, clock, split_by_domain=True, limits=limits)
    addresses = ["a@fast.example", "r0@slow.example", "r1@slow.example", "r2@slow.example"]
    for address in [*addresses, "b@fast.example", "c@fast.example"]:
        tracker.submit(message((address,)))
        clock.advance(0.001)  # claims go in due order: this order
    summary = tracker.run_pending()
    # Concurrency 1 holds: every transaction to slow.example went alone (and all went).
    assert (summary.delivered, summary.postponed) == (6, 0)
    assert transport.batches == [1, 1, 1, 1, 2]


def test_a_chunk_refused_whole_backs_its_domain_off_once(store: Store) -> None:
    clock = FakeClock()
    busy = Reply.of(421, "4.7.0 try later")
    transport = BatchRecorder()
    limits = DomainLimits(backoff_initial=60, backoff_max=3600)
    tracker = tracker_for(transport, store, clock, limits=limits)
    tracker.submit(message(("first@example.org",)))
    assert tracker.run_pending().delivered == 1  # the one-message first chunk
    transport.handler = lambda _m, e: {str(r.address): busy for r in e.recipients}
    tracker.submit_many([message((f"r{i}@example.org",)) for i in range(5)])
    summary = tracker.run_pending()
    assert (summary.deferred, transport.batches) == (5, [1, 5])
    # One send_many call is one delivery to the relay: backed off 60 s, not doubled 5 times.
    assert tracker.shaper.blocked_until(RELAY_KEY) == T0 + dt.timedelta(seconds=60)


class ShortChanging(MemoryTransport):
    """A transport whose ``send_many`` breaks the contract: one result too few."""

    def send_many(self, items: Iterable[BatchItem]) -> list[DeliveryResult]:
        return super().send_many(items)[:-1]


def test_send_many_with_too_few_results_puts_the_batch_back(store: Store) -> None:
    transport = ShortChanging()
    tracker = tracker_for(transport, store, FakeClock())
    ids = tracker.submit_many([message((f"r{i}@example.org",)) for i in range(3)])
    with pytest.raises(RuntimeError, match="returned 0 results for 1 messages"):
        tracker.run_pending()
    # Nothing recorded, nothing lost: every recipient is due again, with no attempt.
    for tracking_id in ids:
        (recipient,) = tracker.status(tracking_id).recipients
        assert (recipient.state, recipient.attempts, recipient.lease_owner) == (
            State.QUEUED,
            (),
            None,
        )


#: What each fate in the loses-nothing properties leaves a tried recipient in ("down" is a
#: ConnectError, a DeliveryError: that message's result; "bug" is any other exception,
#: which stops the run and leaves its chunk untried).
FATE_OF = {
    "ok": State.DELIVERED,
    "450": State.DEFERRED,
    "550": State.BOUNCED,
    "down": State.DEFERRED,
}
FATES = [*FATE_OF, "bug"]
_FATE_REPLIES = {
    "450": Reply.of(450, "4.3.2 system busy"),  # about the server: the domain backs off
    "550": Reply.of(550, "5.1.1 no such user"),
}


def fated(_message: Message, envelope: Envelope) -> Answer:
    """A handler answering each recipient ``<fate>-<n>@...`` as its fate says."""
    address = str(envelope.recipients[0].address)
    fate = address.split("-", maxsplit=1)[0]
    if fate == "bug":
        raise RuntimeError("transport bug")
    if fate == "down":
        raise ConnectError("refused", host="mx:25")
    reply = _FATE_REPLIES.get(fate)
    return {} if reply is None else {address: reply}


def fated_messages(fates: list[str]) -> list[Message]:
    return [message((f"{fate}-{index}@example.org",)) for index, fate in enumerate(fates)]


def assert_nothing_lost(
    tracker: DeliveryTracker | AsyncDeliveryTracker, fates: list[str], ids: list[str]
) -> None:
    """No recipient left SENDING; each tried one in its answer's state; each untried one
    due again with no attempt."""
    for fate, tracking_id in zip(fates, ids, strict=True):
        (recipient,) = tracker.status(tracking_id).recipients
        assert recipient.state is not State.SENDING
        assert recipient.lease_owner is None
        if recipient.attempts:
            assert fate != "bug"
            assert recipient.state is FATE_OF[fate], (fate, recipient)
        else:
            assert recipient.state is State.QUEUED, (fate, recipient)


@settings(max_examples=40, deadline=None)
@given(
    fates=st.lists(st.sampled_from(FATES), min_size=1, max_size=30),
    commit_batch=st.integers(1, 12),
    batch_size=st.integers(1, 12),
)
def test_the_sync_runner_loses_nothing(
    fates: list[str], commit_batch: int, batch_size: int
) -> None:
    # Whatever the outcomes and batch sizes, when run_pending returns or raises.
    tracker = tracker_for(
        BatchRecorder(fated),
        MemoryStore(),
        FakeClock(),
        commit_batch=commit_batch,
        batch_size=batch_size,
    )
    ids = tracker.submit_many(fated_messages(fates))
    with contextlib.suppress(RuntimeError):
        tracker.run_pending()
    assert_nothing_lost(tracker, fates, ids)
