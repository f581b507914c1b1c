"""The trackers' runners under real concurrency: threads, tasks, a real server, a real store.

An application embeds the tracker: ``run_forever`` runs in a background thread (or
``arun_forever`` as a task) while request handlers submit, cancel and read from other
threads or tasks, and event callbacks fire. Every test here does that for real, with an
aiosmtpd server on loopback that records what it accepts (each message carries a unique
``X-Seq`` header, so deliveries are counted by the server's record) and a ``SQLiteStore``
in a temporary directory. Properties, by the server's record and the store:

* no exception escapes any thread or task, and every snapshot a reader gets is
  consistent (DELIVERED has the server's 250 last, QUEUED has no attempt, only SENDING
  has a lease);
* a message not cancelled is delivered exactly once and is DELIVERED, its recipients'
  final event fired exactly once each;
* a cancelled message (docs/tracker.md, Queries: "an attempt already in flight may still
  deliver; its result is then kept in the history only") is CANCELLED and never
  received, or received and then either DELIVERED (the cancel came too late) or
  CANCELLED with the server's 250 in its history; it fires no ``delivered`` event unless
  it ended DELIVERED. Cancelled through the runner's own tracker (another thread, a task,
  an event callback) while its claimed batch holds it unsent, it is never sent;
* the runner returns soon after its stop flag, leaving nothing leased and re-sending
  nothing, and picks up submissions of its own process without waiting for its idle
  timeout (60 s here: the test's bound is far less, so a missed wake-up fails it);
* a cancelled async runner leaves nothing leased either (what it claimed and has no
  result for goes back, due at once), commits what it has and fires those events, so a
  new tracker resumes at once; the only duplicates are transactions in flight at a
  cancel;
* callbacks that call back into the tracker (submit, cancel, status) neither deadlock
  nor see anything but the committed change, and one that raises stops nothing;
* a sync and an async runner share one database file;
* submitting from a thread per request leaves no SQLite connection behind per thread.

Every wait is bounded (:data:`BOUND`); the bounds are hang guards, never assertions on
speed. ``MAILRELAY_CONCURRENCY_SEED`` replays a run's random choices (each test prints
the seed it used).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import os
import random
import re
import threading
import time
from collections import Counter
from collections.abc import AsyncIterable, Callable, Coroutine, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from mailrelay.message import Message
from mailrelay.options import TLS, Timeouts
from mailrelay.results import DeliveryResult
from mailrelay.tracker.async_engine import AsyncDeliveryTracker
from mailrelay.tracker.engine import DeliveryTracker
from mailrelay.tracker.events import TrackerEvent
from mailrelay.tracker.sqlite_store import SQLiteStore
from mailrelay.tracker.store import Claim, MessageRecord, State
from mailrelay.transport import AsyncSMTPTransport, SMTPTransport
from mailrelay.transport.base import BatchItem
from tests.peers.aiosmtpd_server import AiosmtpdFactory, AiosmtpdServer

R = TypeVar("R")

#: The longest any thread, task or loop of a test may take (seconds): a hang guard.
BOUND = 20.0
#: The runners' idle sleep: far longer than BOUND, so a missed wake-up fails a test.
IDLE = 60.0
SEED = int(os.environ.get("MAILRELAY_CONCURRENCY_SEED", random.randrange(1 << 32)))
_SEQ = re.compile(rb"^X-Seq: (\d+)\r?$", re.MULTILINE)
_FINAL_EVENTS = ("delivered", "bounced", "expired")


def run(coro: Coroutine[Any, Any, R]) -> R:
    """Run a coroutine on a fresh event loop."""
    return asyncio.run(coro)


@pytest.fixture(autouse=True)
def _replayable() -> None:
    """Name the seed of the random choices (pytest shows it with a failure's output)."""
    print(f"MAILRELAY_CONCURRENCY_SEED={SEED}")


class Sequencer:
    """Makes messages with unique ``X-Seq`` headers, from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next = 0

    def message(self, recipients: int = 1) -> tuple[int, Message]:
        """A new message with ``recipients`` recipients, and its sequence number."""
        with self._lock:
            seq = self._next
            self._next += 1
        message = Message.build(
            sender="app@mailrelay.test",
            to=[f"user{seq}-{n}@mailrelay.test" for n in range(recipients)],
            subject=f"concurrent {seq}",
            text=f"message {seq}\n",
            headers={"X-Seq": str(seq)},
        )
        return seq, message


class Events:
    """Every event fired, counted per (tracking id, address, kind), from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.fired: Counter[tuple[str, str, str]] = Counter()

    def record(self, event: TrackerEvent) -> None:
        """A callback for every kind."""
        address = "" if event.recipient is None else str(event.recipient.address)
        with self._lock:
            self.fired[(event.tracking_id, address, event.kind.value)] += 1

    def listen(self, tracker: DeliveryTracker | AsyncDeliveryTracker) -> None:
        """Register :meth:`record` for every recipient event."""
        for kind in ("delivered", "deferred", "bounced", "expired"):
            tracker.on(kind, self.record)


class Threads:
    """Threads whose exceptions are kept, joined within a bound."""

    def __init__(self) -> None:
        self.errors: list[BaseException] = []
        self._threads: list[threading.Thread] = []

    def start(self, target: Callable[[], object], name: str) -> threading.Thread:
        """Start ``target`` in a daemon thread (a hang must not keep pytest alive)."""

        def guarded() -> None:
            try:
                target()
            except BaseException as exc:
                self.errors.append(exc)

        thread = threading.Thread(target=guarded, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()
        return thread

    def join(self, threads: Iterable[threading.Thread], deadline: float) -> None:
        """Join ``threads`` by ``deadline`` (monotonic); fail on one still running."""
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            assert not thread.is_alive(), f"{thread.name} did not finish within the bound"


def received(server: AiosmtpdServer) -> Counter[tuple[int, str]]:
    """How often the server accepted each (X-Seq, recipient)."""
    counts: Counter[tuple[int, str]] = Counter()
    for message in list(server.messages):
        match = _SEQ.search(message.content)
        assert match is not None, message.content[:200]
        for rcpt in message.rcpt_tos:
            counts[(int(match.group(1)), rcpt)] += 1
    return counts


def smtp(server: AiosmtpdServer) -> SMTPTransport:
    """A plain (no TLS) blocking transport to ``server``."""
    return SMTPTransport(server.host, server.port, tls=TLS.NONE, timeouts=Timeouts.all(10))


def async_smtp(server: AiosmtpdServer) -> AsyncSMTPTransport:
    """A plain (no TLS) asyncio transport to ``server``."""
    return AsyncSMTPTransport(server.host, server.port, tls=TLS.NONE, timeouts=Timeouts.all(10))


def check_record(record: MessageRecord) -> None:
    """What any snapshot of a record read while the runner works must satisfy."""
    for recipient in record.recipients:
        codes = [attempt.code for attempt in recipient.attempts]
        if recipient.state is State.DELIVERED:
            assert codes, recipient
            assert codes[-1] == 250, recipient
        if recipient.state is State.QUEUED:
            assert not codes, recipient  # put back without an attempt, never tried
        if recipient.state is State.SENDING:
            assert recipient.lease_owner is not None, recipient
            assert recipient.lease_until is not None, recipient
        else:
            assert recipient.lease_owner is None, recipient


def check_outcome(
    records: dict[str, MessageRecord],
    seqs: dict[str, int],
    cancelled: set[str],
    server: AiosmtpdServer,
    events: Events,
    *,
    duplicates_allowed: int = 0,
) -> int:
    """The end-of-test properties (see the module docstring); returns the duplicates."""
    counts = received(server)
    duplicates = 0
    for tracking_id, record in records.items():
        check_record(record)
        seq = seqs[tracking_id]
        for recipient in record.recipients:
            address = str(recipient.address)
            got = counts.get((seq, address), 0)
            fired = {k: events.fired[(tracking_id, address, k)] for k in _FINAL_EVENTS}
            codes = [attempt.code for attempt in recipient.attempts]
            if recipient.state is State.DELIVERED:
                assert got >= 1, (tracking_id, recipient)
                assert fired == {"delivered": 1, "bounced": 0, "expired": 0}, fired
            else:
                assert tracking_id in cancelled, (tracking_id, recipient)
                assert recipient.state is State.CANCELLED, recipient
                # Received only if an attempt was in flight at the cancel, and then the
                # server's answer is in the history (kept there only).
                assert (got > 0) == (250 in codes), (tracking_id, got, recipient)
                assert fired == {"delivered": 0, "bounced": 0, "expired": 0}, fired
            assert got <= 1 + duplicates_allowed, (tracking_id, address, got)
            duplicates += max(0, got - 1)
    # Nothing the server accepted is unknown to the store.
    known = {(seqs[t], str(r.address)) for t, rec in records.items() for r in rec.recipients}
    assert set(counts) <= known
    return duplicates


# -- 1. the sync runner in a thread, submitters, a canceller and a dashboard ----------------


@pytest.mark.parametrize("commit_batch", [1, 10])
def test_run_forever_with_concurrent_submitters_cancels_and_readers(
    make_aiosmtpd: AiosmtpdFactory, tmp_path: Path, commit_batch: int
) -> None:
    rng = random.Random(SEED)
    server = make_aiosmtpd(starttls=False, auth=False)
    store = SQLiteStore(tmp_path / "outbox.db")
    tracker = DeliveryTracker(smtp(server), store, batch_size=10, commit_batch=commit_batch)
    events = Events()
    events.listen(tracker)
    sequencer = Sequencer()
    seqs: dict[str, int] = {}
    submitted: list[str] = []
    lock = threading.Lock()
    cancelled: set[str] = set()
    submitters_done = threading.Event()
    stop = threading.Event()
    threads = Threads()
    deadline = time.monotonic() + BOUND

    def submitter(index: int) -> None:
        local = random.Random(SEED + index)
        for _ in range(8):
            if local.random() < 0.5:
                seq, message = sequencer.message(local.choice((1, 1, 2)))
                ids = [tracker.submit(message)]
                made = [seq]
            else:
                pairs = [sequencer.message(local.choice((1, 2))) for _ in range(3)]
                ids = tracker.submit_many(message for _, message in pairs)
                made = [seq for seq, _ in pairs]
            with lock:
                for tracking_id, seq in zip(ids, made, strict=True):
                    seqs[tracking_id] = seq
                    submitted.append(tracking_id)
            time.sleep(local.random() * 0.01)

    def dashboard() -> None:
        for _ in range(10_000):
            if submitters_done.is_set() or time.monotonic() > deadline:
                break
            with lock:
                choices = list(submitted)
            if choices and rng.random() < 0.3:
                tracking_id = rng.choice(choices)
                taken = tracker.cancel(tracking_id)
                if taken:
                    with lock:
                        cancelled.add(tracking_id)
                after = tracker.status(tracking_id)
                for recipient in after.recipients:
                    # Whatever the race, a cancelled recipient stays cancelled, and one
                    # the cancel did not take was final already.
                    if recipient.address in taken:
                        assert recipient.state is State.CANCELLED, recipient
                    else:
                        assert recipient.state.is_final, recipient
            for record in tracker.find(limit=20):
                check_record(record)
            for record in tracker.find(state=State.SENDING, limit=5):
                check_record(record)
            tracker.next_due()
            time.sleep(0.002)

    runner = threads.start(lambda: tracker.run_forever(stop, idle=IDLE), "runner")
    submitters = [
        threads.start(functools.partial(submitter, i), f"submitter-{i}") for i in range(4)
    ]
    reader = threads.start(dashboard, "dashboard")
    threads.join(submitters, deadline)
    submitters_done.set()
    threads.join([reader], deadline)
    assert not threads.errors, threads.errors
    # Every submission is picked up by the running loop, with no help: its idle sleep is
    # longer than the bound, so a missed wake-up ends here.
    for _ in range(10_000):
        if store.next_due() is None and not store.find(state=State.SENDING, limit=1):
            break
        assert time.monotonic() < deadline, "the runner left work undone"
        assert runner.is_alive(), threads.errors
        time.sleep(0.01)
    stop.set()
    threads.join([runner], deadline)
    assert not threads.errors, threads.errors
    records = store.get_many(list(seqs))
    assert set(records) == set(seqs)
    check_outcome(records, seqs, cancelled, server, events)
    tracker.close()


# -- 2. the async runner, cancelled at random moments, and resumed --------------------------


def test_arun_forever_cancelled_at_random_moments_then_resumed(
    make_aiosmtpd: AiosmtpdFactory, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    server = make_aiosmtpd(starttls=False, auth=False)
    path = tmp_path / "outbox.db"
    sequencer = Sequencer()
    seqs: dict[str, int] = {}
    events = Events()
    cancels = 8
    commit_batch = 5

    async def submit_some(tracker: AsyncDeliveryTracker, count: int) -> None:
        for _ in range(count):
            if rng.random() < 0.5:
                seq, message = sequencer.message()
                seqs[await tracker.asubmit(message)] = seq
            else:
                pairs = [sequencer.message() for _ in range(3)]
                ids = await tracker.asubmit_many(message for _, message in pairs)
                seqs.update(zip(ids, (seq for seq, _ in pairs), strict=True))
            await asyncio.sleep(rng.random() * 0.005)

    def submit_from_thread(tracker: AsyncDeliveryTracker, count: int) -> None:
        for _ in range(count):
            seq, message = sequencer.message()
            seqs[tracker.submit(message)] = seq

    async def main() -> None:
        tracker: AsyncDeliveryTracker | None = None
        for round_ in range(cancels + 1):
            # Every other round a new tracker (and worker id) on the same file, as after a
            # restart; in between the cancelled one runs again (its transport too).
            if tracker is None or round_ % 2 == 0:
                if tracker is not None:
                    await tracker.aclose()
                tracker = AsyncDeliveryTracker(
                    async_smtp(server),
                    SQLiteStore(path),
                    batch_size=8,
                    commit_batch=commit_batch,
                    worker_id="mailer-1",
                )
                events.listen(tracker)
                # A restarted worker releases its old leases (docs/tracker.md, Several
                # workers): a cancelled run left none.
                assert await tracker.arelease_leases() == 0
            stop = asyncio.Event()
            runner = asyncio.create_task(tracker.arun_forever(stop, idle=IDLE, concurrency=3))
            feeding = asyncio.gather(
                submit_some(tracker, 6), asyncio.to_thread(submit_from_thread, tracker, 4)
            )
            async with asyncio.timeout(BOUND):
                if round_ < cancels:
                    # Cancelled while submissions go on, at a random moment.
                    await asyncio.sleep(rng.random() * 0.03)
                    runner.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await runner
                    assert runner.cancelled() or runner.exception() is None
                    # Nothing is left leased: results in hand were committed, and what
                    # was claimed and not decided went back, due at once.
                    leased = await tracker.afind(state=State.SENDING)
                    assert not leased, [r.recipients for r in leased]
                    await feeding
                else:
                    await feeding
                    while await tracker.anext_due() is not None:
                        await asyncio.sleep(0.01)
                    stop.set()
                    await runner
        assert tracker is not None
        await tracker.aclose()

    run(main())
    store = SQLiteStore(path)
    records = store.get_many(list(seqs))
    store.close()
    assert set(records) == set(seqs)
    # Delivered more than once only when in flight at a cancel: at most commit_batch
    # transactions per cancel, each at most once more per cancel.
    duplicates = check_outcome(records, seqs, set(), server, events, duplicates_allowed=cancels)
    assert duplicates <= cancels * commit_batch


# -- 2b. cancelling the async runner at each await that holds claimed work -------------------


class _GatedStore(SQLiteStore):
    """A SQLiteStore whose ``claim`` or worker ``apply_many`` waits at a gate (once).

    ``entered`` is set when the gated call starts and ``left`` when it has returned, so
    a test can cancel the runner while the call runs in its worker thread, then look at
    the store once the call is over, whether or not the runner waited for it.
    """

    def __init__(self, path: Path, *, gate: str) -> None:
        super().__init__(path)
        self.gate = gate
        self.entered = threading.Event()
        self.release = threading.Event()
        self.left = threading.Event()

    def _gated(self, name: str) -> bool:
        if self.gate != name or self.entered.is_set():
            return False
        self.entered.set()
        assert self.release.wait(BOUND), "never released"
        return True

    def claim(
        self, *, worker: str, now: dt.datetime, lease: dt.timedelta, limit: int
    ) -> list[Claim]:
        gated = self._gated("claim")
        try:
            return super().claim(worker=worker, now=now, lease=lease, limit=limit)
        finally:
            if gated:
                self.left.set()

    def get_many(self, tracking_ids: Sequence[str]) -> dict[str, MessageRecord]:
        gated = self._gated("load")
        try:
            return super().get_many(tracking_ids)
        finally:
            if gated:
                self.left.set()

    def apply_many(self, batch: Any, *, worker: str | None = None, then: Any = None) -> Any:
        gated = worker is not None and self._gated("commit")
        try:
            return super().apply_many(batch, worker=worker, then=then)
        finally:
            if gated:
                self.left.set()


class _HeldTransport(AsyncSMTPTransport):
    """Sends through the real server, but its first ``asend_many`` call never returns."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.entered = asyncio.Event()

    async def asend_many(
        self, items: Iterable[BatchItem] | AsyncIterable[BatchItem]
    ) -> list[DeliveryResult]:
        if not self.entered.is_set():
            self.entered.set()
            await asyncio.Event().wait()  # held until cancelled
        return await super().asend_many(items)


@pytest.mark.parametrize("gate", ["claim", "load", "commit", "send"])
def test_a_cancelled_async_run_leaves_nothing_leased_and_loses_no_event(
    make_aiosmtpd: AiosmtpdFactory, tmp_path: Path, gate: str
) -> None:
    """``task.cancel()`` while the runner claims, loads, commits (each in a worker thread)
    or sends: once that call is over, nothing is left SENDING under the cancelled runner's
    lease (the rest of its claim is due again at once, as after a stop or any other
    exception: docs/tracker.md, Lifecycle), and every result committed fired its event."""
    server = make_aiosmtpd(starttls=False, auth=False)
    store = _GatedStore(tmp_path / "outbox.db", gate="none" if gate == "send" else gate)
    transport = _HeldTransport(server.host, server.port, tls=TLS.NONE, timeouts=Timeouts.all(10))
    # Chunks of one: the first transaction is committed alone (gate "commit") and, held in
    # the transport (gate "send"), keeps the rest of the claimed batch queued.
    # Gate "load": no messages held from submit, so the claim's records are read.
    cache = 0 if gate == "load" else 16 << 20
    tracker = AsyncDeliveryTracker(transport, store, commit_batch=1, message_cache=cache)
    events = Events()
    events.listen(tracker)
    sequencer = Sequencer()

    async def main() -> dict[str, int]:
        pairs = [sequencer.message() for _ in range(4)]
        ids = await tracker.asubmit_many(message for _, message in pairs)
        if gate == "commit":
            transport.entered.set()  # not held: the first result reaches the gated commit
        task = asyncio.create_task(tracker.arun_pending(concurrency=1))
        async with asyncio.timeout(BOUND):
            if gate == "send":
                await transport.entered.wait()
            else:
                await asyncio.to_thread(store.entered.wait, BOUND)
            task.cancel()
            store.release.set()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert task.cancelled()
            if gate != "send":
                await asyncio.to_thread(store.left.wait, BOUND)
        return dict(zip(ids, (seq for seq, _ in pairs), strict=True))

    try:
        seqs = run(main())
        records = store.get_many(list(seqs))
        leased = [r for record in records.values() for r in record.recipients if r.lease_owner]
        assert not leased, leased
        for record in records.values():
            check_record(record)
        counts = received(server)
        for tracking_id, record in records.items():
            (recipient,) = record.recipients
            address = str(recipient.address)
            delivered = recipient.state is State.DELIVERED
            assert recipient.state is (State.DELIVERED if delivered else State.QUEUED)
            assert events.fired[(tracking_id, address, "delivered")] == delivered
            assert counts[(seqs[tracking_id], address)] == delivered
        assert store.next_due() is not None or gate == "commit"
    finally:
        store.release.set()
        store.close()
        run(transport.aclose())


# -- 3. callbacks that call back into the tracker --------------------------------------------


class Reentrant:
    """What the re-entrant callbacks do and saw, for one tracker.

    Messages come in pairs (two one-recipient messages submitted together); the first of
    a pair to be delivered cancels the other, which the runner holds in the same claimed
    batch, not sent yet (``commit_batch=1``: each result is committed, and its event
    fired, before the next transaction is taken). Every delivered original submits one
    follow-up (a follow-up submits nothing). Every callback reads ``status`` and expects
    what the event reports (events fire after the commit).
    """

    def __init__(self, sequencer: Sequencer) -> None:
        self.sequencer = sequencer
        self.partner: dict[str, str] = {}
        self.seqs: dict[str, int] = {}
        self.followups: set[str] = set()
        self.cancelled: set[str] = set()
        self.errors: list[BaseException] = []

    def add_pairs(self, ids: Sequence[str], seqs: Sequence[int]) -> None:
        """Remember messages submitted in pairs, in order."""
        self.seqs.update(zip(ids, seqs, strict=True))
        for first, second in zip(ids[::2], ids[1::2], strict=True):
            self.partner[first], self.partner[second] = second, first

    def seen(self, event: TrackerEvent, record: MessageRecord) -> None:
        """The snapshot ``status`` gave a callback of ``event`` must show the event."""
        assert event.recipient is not None
        assert record.recipient(event.recipient.address).state is event.recipient.state

    def boom(self, event: TrackerEvent) -> None:
        """A callback that always raises (logged and skipped by the runner)."""
        raise RuntimeError(f"a broken callback ({event.tracking_id})")


def check_broken_logged(
    caplog: pytest.LogCaptureFixture, events: Events, *, per_event: int
) -> None:
    """Each broken callback's failure for each ``delivered`` event was logged, and only those."""
    failures = [r for r in caplog.records if r.name == "mailrelay.tracker.events"]
    delivered = sum(count for key, count in events.fired.items() if key[2] == "delivered")
    assert len(failures) == per_event * delivered
    for record in failures:
        assert record.exc_info is not None
        assert isinstance(record.exc_info[1], RuntimeError), record.exc_info


def _check_reentrant(
    records: dict[str, MessageRecord], calls: Reentrant, server: AiosmtpdServer, events: Events
) -> None:
    assert not calls.errors, calls.errors
    assert set(records) == set(calls.seqs)
    check_outcome(records, calls.seqs, calls.cancelled, server, events)
    for first, second in calls.partner.items():
        states = {records[first].recipients[0].state, records[second].recipients[0].state}
        assert states == {State.DELIVERED, State.CANCELLED}, (first, second, states)
    counts = received(server)
    # A partner cancelled from the callback was left out of the batch: never sent.
    for tracking_id in calls.cancelled:
        (recipient,) = records[tracking_id].recipients
        assert not recipient.attempts, recipient
        assert counts[(calls.seqs[tracking_id], str(recipient.address))] == 0
    delivered_originals = sum(
        record.recipients[0].state is State.DELIVERED
        for tracking_id, record in records.items()
        if tracking_id in calls.partner
    )
    assert len(calls.followups) == delivered_originals == len(calls.partner) // 2


def test_sync_callbacks_that_submit_cancel_and_read_during_run_forever(
    make_aiosmtpd: AiosmtpdFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = make_aiosmtpd(starttls=False, auth=False)
    store = SQLiteStore(tmp_path / "outbox.db")
    tracker = DeliveryTracker(smtp(server), store, batch_size=20, commit_batch=1)
    calls = Reentrant(Sequencer())
    events = Events()
    tracker.on("delivered", calls.boom)  # registered first: the others still run
    events.listen(tracker)

    def delivered(event: TrackerEvent) -> None:
        try:
            calls.seen(event, tracker.status(event.tracking_id))
            partner = calls.partner.get(event.tracking_id)
            if partner is None:
                return  # a follow-up
            if tracker.cancel(partner):
                calls.cancelled.add(partner)
            seq, message = calls.sequencer.message()
            followup = tracker.submit(message)
            calls.seqs[followup] = seq
            calls.followups.add(followup)
        except BaseException as exc:
            calls.errors.append(exc)
            raise

    tracker.on("delivered", delivered)
    stop = threading.Event()
    threads = Threads()
    deadline = time.monotonic() + BOUND
    pairs = [calls.sequencer.message() for _ in range(12)]
    # Submitted before the runner starts, so each pair is in one claimed batch.
    calls.add_pairs(tracker.submit_many(m for _, m in pairs), [seq for seq, _ in pairs])
    runner = threads.start(lambda: tracker.run_forever(stop, idle=IDLE), "runner")
    for _ in range(10_000):
        followed = len(calls.followups) == len(pairs) // 2
        if followed and store.next_due() is None and not store.find(state=State.SENDING):
            break
        assert time.monotonic() < deadline, "the runner left work undone"
        assert runner.is_alive(), threads.errors
        time.sleep(0.01)
    stop.set()
    threads.join([runner], deadline)
    assert not threads.errors, threads.errors
    _check_reentrant(store.get_many(list(calls.seqs)), calls, server, events)
    check_broken_logged(caplog, events, per_event=1)
    tracker.close()


def test_async_callbacks_that_submit_cancel_and_read_during_arun_forever(
    make_aiosmtpd: AiosmtpdFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = make_aiosmtpd(starttls=False, auth=False)
    path = tmp_path / "outbox.db"
    calls = Reentrant(Sequencer())
    events = Events()

    async def main() -> dict[str, MessageRecord]:
        tracker = AsyncDeliveryTracker(
            async_smtp(server), SQLiteStore(path), batch_size=20, commit_batch=1
        )
        tracker.on("delivered", calls.boom)

        async def broken(event: TrackerEvent) -> None:
            await asyncio.sleep(0)
            raise RuntimeError("a broken coroutine callback")

        tracker.on("delivered", broken)
        events.listen(tracker)

        async def delivered(event: TrackerEvent) -> None:
            try:
                calls.seen(event, await tracker.astatus(event.tracking_id))
                calls.seen(event, tracker.status(event.tracking_id))  # blocking, in the loop
                partner = calls.partner.get(event.tracking_id)
                if partner is None:
                    return
                if await tracker.acancel(partner):
                    calls.cancelled.add(partner)
                seq, message = calls.sequencer.message()
                followup = await tracker.asubmit(message)
                calls.seqs[followup] = seq
                calls.followups.add(followup)
            except BaseException as exc:
                calls.errors.append(exc)
                raise

        tracker.on("delivered", delivered)
        pairs = [calls.sequencer.message() for _ in range(12)]
        ids = await tracker.asubmit_many(m for _, m in pairs)
        calls.add_pairs(ids, [seq for seq, _ in pairs])
        stop = asyncio.Event()
        runner = asyncio.create_task(tracker.arun_forever(stop, idle=IDLE, concurrency=1))
        async with asyncio.timeout(BOUND):
            while not (
                len(calls.followups) == len(pairs) // 2 and await tracker.anext_due() is None
            ):
                assert not runner.done(), runner
                await asyncio.sleep(0.01)
            stop.set()
            await runner
        records = tracker.store.get_many(list(calls.seqs))
        await tracker.aclose()
        return records

    records = run(main())
    _check_reentrant(records, calls, server, events)
    check_broken_logged(caplog, events, per_event=2)


# -- 4. a sync and an async tracker on one SQLite file, both running --------------------------


@pytest.mark.parametrize("shared", [False, True], ids=["two-stores", "one-store-object"])
def test_a_sync_and_an_async_runner_on_one_database(
    make_aiosmtpd: AiosmtpdFactory, tmp_path: Path, shared: bool
) -> None:
    """``run_forever`` in a thread and ``arun_forever`` in the main thread's loop, over one
    file (through two ``SQLiteStore`` objects, or one shared); each tracker gets
    submissions, and cancels go through the other tracker (so they reach the runner only
    through the store: a message it claimed before may still go out, and is then
    CANCELLED with the server's answer in its history)."""
    rng = random.Random(SEED)
    server = make_aiosmtpd(starttls=False, auth=False)
    path = tmp_path / "outbox.db"
    sync_store = SQLiteStore(path)
    sync_tracker = DeliveryTracker(smtp(server), sync_store, batch_size=5, commit_batch=5)
    events = Events()
    events.listen(sync_tracker)
    sequencer = Sequencer()
    seqs: dict[str, int] = {}
    owner: dict[str, DeliveryTracker | AsyncDeliveryTracker] = {}
    cancelled: set[str] = set()
    stop = threading.Event()
    threads = Threads()
    deadline = time.monotonic() + BOUND

    def submit_sync(count: int) -> list[str]:
        made = []
        for index in range(count):
            if index % 2:
                seq, message = sequencer.message(2)
                ids, numbers = [sync_tracker.submit(message)], [seq]
            else:
                pairs = [sequencer.message() for _ in range(3)]
                ids = sync_tracker.submit_many(m for _, m in pairs)
                numbers = [seq for seq, _ in pairs]
            seqs.update(zip(ids, numbers, strict=True))
            made.extend(ids)
            time.sleep(0.002)
        return made

    async def main() -> None:
        store = sync_store if shared else SQLiteStore(path)
        tracker = AsyncDeliveryTracker(async_smtp(server), store, batch_size=5, commit_batch=5)
        events.listen(tracker)
        astop = asyncio.Event()
        arunner = asyncio.create_task(tracker.arun_forever(astop, idle=IDLE, concurrency=2))
        async with asyncio.timeout(BOUND):
            for _ in range(6):
                from_sync = asyncio.create_task(asyncio.to_thread(submit_sync, 4))
                pairs = [sequencer.message(rng.choice((1, 2))) for _ in range(4)]
                ids = await tracker.asubmit_many(m for _, m in pairs)
                seqs.update(zip(ids, (seq for seq, _ in pairs), strict=True))
                owner.update(dict.fromkeys(ids, tracker))
                owner.update(dict.fromkeys(await from_sync, sync_tracker))
                # Cancel a few of the newest through the tracker that did not submit them.
                for tracking_id in rng.sample(sorted(owner)[-12:], 3):
                    if owner[tracking_id] is tracker:
                        taken = await asyncio.to_thread(sync_tracker.cancel, tracking_id)
                    else:
                        taken = await tracker.acancel(tracking_id)
                    if taken:
                        cancelled.add(tracking_id)
                await asyncio.sleep(rng.random() * 0.02)
            # Both runners together empty the queue: each woken by its own submissions.
            while await tracker.anext_due() is not None or await tracker.afind(
                state=State.SENDING, limit=1
            ):
                assert not arunner.done(), arunner
                await asyncio.sleep(0.01)
            astop.set()
            await arunner
        if shared:
            await tracker.transport.aclose()  # the store is the sync tracker's to close
        else:
            await tracker.aclose()

    runner = threads.start(lambda: sync_tracker.run_forever(stop, idle=IDLE), "sync-runner")
    run(main())
    stop.set()
    threads.join([runner], deadline)
    assert not threads.errors, threads.errors
    reopened = SQLiteStore(path)
    records = reopened.get_many(list(seqs))
    reopened.close()
    sync_tracker.close()
    assert set(records) == set(seqs)
    check_outcome(records, seqs, cancelled, server, events)


# -- 5. stopping the runners at random moments -----------------------------------------------


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_runners_stopped_at_random_moments_send_each_message_once(
    make_aiosmtpd: AiosmtpdFactory, tmp_path: Path, flavour: str
) -> None:
    """A stop flag set while submissions go on: the runner returns with nothing leased
    (the chunks in flight finish and are recorded, the rest of the claim goes back: unlike
    a cancel, a stop re-sends nothing), and a new tracker on the file carries on. In the
    end every message was received exactly once."""
    rng = random.Random(SEED)
    server = make_aiosmtpd(starttls=False, auth=False)
    path = tmp_path / "outbox.db"
    sequencer = Sequencer()
    seqs: dict[str, int] = {}
    events = Events()
    rounds = 6
    threads = Threads()

    def submit(tracker: DeliveryTracker | AsyncDeliveryTracker, count: int) -> None:
        for _ in range(count):
            pairs = [sequencer.message(rng.choice((1, 2))) for _ in range(rng.choice((1, 4)))]
            ids = tracker.submit_many(m for _, m in pairs)
            seqs.update(zip(ids, (seq for seq, _ in pairs), strict=True))
            time.sleep(rng.random() * 0.003)

    def sync_round(last: bool) -> None:
        deadline = time.monotonic() + BOUND
        tracker = DeliveryTracker(smtp(server), SQLiteStore(path), batch_size=8, commit_batch=4)
        events.listen(tracker)
        stop = threading.Event()
        runner = threads.start(lambda: tracker.run_forever(stop, idle=IDLE), "runner")
        feeder = threads.start(lambda: submit(tracker, 8), "feeder")
        if last:
            threads.join([feeder], deadline)
            while tracker.next_due() is not None:
                assert time.monotonic() < deadline, "the runner left work undone"
                time.sleep(0.01)
        else:
            time.sleep(rng.random() * 0.03)
        stop.set()
        threads.join([runner, feeder], deadline)
        assert not threads.errors, threads.errors
        leased = tracker.find(state=State.SENDING)
        assert not leased, [r.recipients for r in leased]
        tracker.close()

    async def async_round(last: bool) -> None:
        tracker = AsyncDeliveryTracker(
            async_smtp(server), SQLiteStore(path), batch_size=8, commit_batch=4
        )
        events.listen(tracker)
        stop = asyncio.Event()
        runner = asyncio.create_task(tracker.arun_forever(stop, idle=IDLE, concurrency=2))
        async with asyncio.timeout(BOUND):
            feeder = asyncio.create_task(asyncio.to_thread(submit, tracker, 8))
            if last:
                await feeder
                while await tracker.anext_due() is not None:
                    await asyncio.sleep(0.01)
            else:
                await asyncio.sleep(rng.random() * 0.03)
            stop.set()
            await runner
            await feeder
        leased = await tracker.afind(state=State.SENDING)
        assert not leased, [r.recipients for r in leased]
        await tracker.aclose()

    for round_ in range(rounds + 1):
        if flavour == "sync":
            sync_round(round_ == rounds)
        else:
            run(async_round(round_ == rounds))
    store = SQLiteStore(path)
    records = store.get_many(list(seqs))
    store.close()
    assert set(records) == set(seqs)
    assert check_outcome(records, seqs, set(), server, events) == 0


# -- 6. a cancel from another thread or task while the runner holds the message ---------------


class _HeldSyncTransport(SMTPTransport):
    """Sends through the real server, but its first ``send_many`` waits for ``release``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.entered = threading.Event()
        self.release = threading.Event()

    def send_many(self, items: Iterable[BatchItem]) -> list[DeliveryResult]:
        if not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(BOUND), "never released"
        return super().send_many(items)


class _PausedTransport(AsyncSMTPTransport):
    """Sends through the real server, but its first ``asend_many`` waits for ``release``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def asend_many(
        self, items: Iterable[BatchItem] | AsyncIterable[BatchItem]
    ) -> list[DeliveryResult]:
        if not self.entered.is_set():
            self.entered.set()
            await self.release.wait()
        return await super().asend_many(items)


def _check_left_out(
    records: dict[str, MessageRecord], seqs: dict[str, int], server: AiosmtpdServer
) -> None:
    """Every message was cancelled while the first transaction of the claimed batch was
    held in the transport: only that one went out (CANCELLED, the server's answer in its
    history only); the others were left out of the batch (no attempt, never received)."""
    counts = received(server)
    assert sum(counts.values()) == 1, counts
    for tracking_id, record in records.items():
        (recipient,) = record.recipients
        assert recipient.state is State.CANCELLED, recipient
        sent = counts[(seqs[tracking_id], str(recipient.address))]
        assert [a.code for a in recipient.attempts] == [250] * sent, recipient


def test_a_cancel_from_another_thread_leaves_the_message_out_of_the_claimed_batch(
    make_aiosmtpd: AiosmtpdFactory, tmp_path: Path
) -> None:
    """docs/tracker.md, Queries: a message cancelled through the tracker whose runner holds
    it in a claimed batch, not sent yet, is left out of that batch (here from another
    thread during ``run_forever``)."""
    server = make_aiosmtpd(starttls=False, auth=False)
    transport = _HeldSyncTransport(
        server.host, server.port, tls=TLS.NONE, timeouts=Timeouts.all(10)
    )
    store = SQLiteStore(tmp_path / "outbox.db")
    tracker = DeliveryTracker(transport, store, batch_size=10)
    sequencer = Sequencer()
    pairs = [sequencer.message() for _ in range(6)]
    seqs = dict(zip(tracker.submit_many(m for _, m in pairs), (s for s, _ in pairs), strict=True))
    stop = threading.Event()
    threads = Threads()
    deadline = time.monotonic() + BOUND
    runner = threads.start(lambda: tracker.run_forever(stop, idle=IDLE), "runner")
    try:
        assert transport.entered.wait(BOUND)
        cancelled = [tracking_id for tracking_id in seqs if tracker.cancel(tracking_id)]
        # The held one is SENDING: cancelled too (its attempt may still deliver).
        assert len(cancelled) == len(seqs)
    finally:
        transport.release.set()
    while store.find(state=State.SENDING, limit=1):
        assert time.monotonic() < deadline, "the held transaction was never recorded"
        time.sleep(0.01)
    stop.set()
    threads.join([runner], deadline)
    assert not threads.errors, threads.errors
    _check_left_out(store.get_many(list(seqs)), seqs, server)
    tracker.close()


def test_a_cancel_from_another_task_or_thread_leaves_the_message_out_of_the_claimed_batch(
    make_aiosmtpd: AiosmtpdFactory, tmp_path: Path
) -> None:
    """The same for ``arun_forever``: ``acancel`` from another task and ``cancel`` from
    another thread while the first chunk is held in the transport."""
    server = make_aiosmtpd(starttls=False, auth=False)
    transport = _PausedTransport(server.host, server.port, tls=TLS.NONE, timeouts=Timeouts.all(10))
    store = SQLiteStore(tmp_path / "outbox.db")
    sequencer = Sequencer()
    pairs = [sequencer.message() for _ in range(6)]

    async def main() -> dict[str, int]:
        tracker = AsyncDeliveryTracker(transport, store, batch_size=10)
        ids = await tracker.asubmit_many(m for _, m in pairs)
        stop = asyncio.Event()
        runner = asyncio.create_task(tracker.arun_forever(stop, idle=IDLE, concurrency=1))
        async with asyncio.timeout(BOUND):
            await transport.entered.wait()
            taken = [await tracker.acancel(tracking_id) for tracking_id in ids[::2]]
            taken += await asyncio.to_thread(lambda: [tracker.cancel(t) for t in ids[1::2]])
            assert all(taken), taken
            transport.release.set()
            while await tracker.afind(state=State.SENDING, limit=1):
                await asyncio.sleep(0.01)
            stop.set()
            await runner
        await tracker.aclose()
        return dict(zip(ids, (seq for seq, _ in pairs), strict=True))

    seqs = run(main())
    reopened = SQLiteStore(tmp_path / "outbox.db")
    _check_left_out(reopened.get_many(list(seqs)), seqs, server)
    reopened.close()


# -- 7. a thread per request --------------------------------------------------------------------


def _open_files_under(directory: Path) -> int:
    """How many of this process's file descriptors are open on files under ``directory``."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, closed by now
            if os.readlink(f"/proc/self/fd/{fd}").startswith(str(directory)):
                count += 1
    return count


def test_submitting_from_a_thread_per_request_leaks_no_connections(
    make_aiosmtpd: AiosmtpdFactory, tmp_path: Path
) -> None:
    """An application server that runs each request in a new thread (``ThreadingHTTPServer``)
    submits and reads from many short-lived threads: each opens its own SQLite connection,
    which must not outlive its thread (it did until the store was closed: two or three file
    descriptors per request, until the process ran out of them)."""
    server = make_aiosmtpd(starttls=False, auth=False)
    store = SQLiteStore(tmp_path / "outbox.db")
    tracker = DeliveryTracker(smtp(server), store)
    one_connection = _open_files_under(tmp_path)  # the store's first, this thread's
    assert one_connection > 0
    sequencer = Sequencer()
    seqs: dict[str, int] = {}
    threads = Threads()
    deadline = time.monotonic() + BOUND

    def request() -> None:
        seq, message = sequencer.message()
        tracking_id = tracker.submit(message)
        seqs[tracking_id] = seq
        assert tracker.status(tracking_id).recipients[0].state is State.QUEUED

    for index in range(40):
        threads.join([threads.start(request, f"request-{index}")], deadline)
    assert not threads.errors, threads.errors
    # This thread's connection, and at most the last request's (closed when the next
    # thread opens one).
    assert _open_files_under(tmp_path) <= 2 * one_connection
    summary = tracker.run_pending()
    assert summary.delivered == len(seqs) == 40
    assert set(received(server)) == {(seq, f"user{seq}-0@mailrelay.test") for seq in seqs.values()}
    tracker.close()
    assert _open_files_under(tmp_path) == 0


# -- 8. the sync runner interrupted between chunks ----------------------------------------------


def test_a_sync_run_interrupted_between_chunks_leaves_nothing_leased(
    make_aiosmtpd: AiosmtpdFactory, tmp_path: Path
) -> None:
    """docs/tracker.md, Lifecycle: any exception other than a delivery error (a
    ``KeyboardInterrupt``) puts the claimed recipients without a result back, due at once.
    Here it comes from an event callback, between chunks (a Ctrl-C lands there as well as
    in the transport): the rest of the claimed batch must not stay leased."""
    server = make_aiosmtpd(starttls=False, auth=False)
    store = SQLiteStore(tmp_path / "outbox.db")
    tracker = DeliveryTracker(smtp(server), store, commit_batch=1)
    sequencer = Sequencer()
    pairs = [sequencer.message() for _ in range(5)]
    seqs = dict(zip(tracker.submit_many(m for _, m in pairs), (s for s, _ in pairs), strict=True))

    def interrupt(event: TrackerEvent) -> None:
        raise KeyboardInterrupt

    tracker.on("delivered", interrupt)
    with pytest.raises(KeyboardInterrupt):
        tracker.run_pending()
    records = store.get_many(list(seqs))
    leased = [r for record in records.values() for r in record.recipients if r.lease_owner]
    assert not leased, leased
    states = Counter(record.recipients[0].state for record in records.values())
    assert states == {State.DELIVERED: 1, State.QUEUED: 4}, states
    tracker.events.off("delivered", interrupt)
    assert tracker.run_pending().delivered == 4
    records = store.get_many(list(seqs))
    assert all(record.recipients[0].state is State.DELIVERED for record in records.values())
    assert Counter(received(server).values()) == {1: 5}
    tracker.close()
