"""The delivery tracker as a state machine: random operation sequences, every store in step.

A Hypothesis :class:`~hypothesis.stateful.RuleBasedStateMachine` drives the same
operations, in lock-step, on a :class:`DeliveryTracker` over :class:`MemoryStore`, one
over :class:`SQLiteStore` (a temporary file) and an :class:`AsyncDeliveryTracker` over
:class:`MemoryStore` (each call run with ``asyncio.run``; ``arun_pending`` with one chunk
in flight, so that it sends what the sync runner sends in the same order), each with its
own :class:`MemoryTransport` scripted identically, the same fake clock and the same
seeded random. The operations:
submissions (one message or a batch, 1-4 recipients over three domains, some shared
between messages, with or without a null sender and per-recipient NOTIFY), scripting
the transport (per recipient: accept, 4xx, 5xx; per attempt: a transient or permanent
``DeliveryError``, refused credentials, or a non-``DeliveryError`` "bug"), runs, clock
moves (seconds to days, past the retry delays and the 5-day maximum age), cancellations
(also from an event callback in the middle of a run), returned success, failure and
delay DSNs, the DSN transport's answers to generated reports, a stop request after a few
transactions, crashes (a new tracker over the same store, maybe after a claim that was
never recorded, maybe releasing its leases) and kills (the store refuses every write
from a scripted transaction on, as a process killed before its commit). The set-up draws
DSN requests, per-domain splitting, batch sizes, per-domain limits, and how long each
transaction takes by the trackers' clock (so commits by ``commit_interval`` and chunks
sized by pace happen too).

Tracking ids are normally 72 random bits after the time, so two stores order messages
submitted at the same instant differently, and with them what the transport is sent in
which order, which random draw each retry gets and what the per-domain back-off learns.
The machine makes ids deterministic (a counter in place of ``secrets`` in
:mod:`mailrelay.tracker.core`, one per store), so both stores get the same ids and must
agree on everything, to the microsecond.

What must hold after every step (besides equal records in both stores):

* nothing submitted is ever lost; ``find`` (by state, age, limit) and ``next_due``
  agree with the records; events are the same everywhere and show what the store holds;
* attempts only grow (the history before a step is a prefix of the history after it);
* a final state never changes, except as docs/tracker.md allows: a DELIVERED recipient
  becomes BOUNCED by a failure DSN (after relay), and a success DSN confirms it;
* DELIVERED only for a recipient the transport accepted at some attempt, or that a
  success DSN reported delivered;
* every transaction the transport receives goes to recipients leased to the running
  worker, each once (so a retry goes only to the unresolved ones);
* a run that returns leaves nothing due, so nothing queued or deferred past the maximum
  age unless the per-domain back-off holds it off; a run that raises (the transport's
  bug) leaves the recipients of the failed transaction due again at once, with no
  attempt recorded; no run (but a killed one) leaves a lease of its own behind;
* each run queues failure reports for exactly the bounces and expiries it recorded whose
  sender is not null and whose NOTIFY asks for failures.

A second machine runs the async tracker alone with four chunks in flight (interleaved by
a yielding handler), where only these invariants apply.

``MAILRELAY_STATEFUL_EXAMPLES`` and ``MAILRELAY_STATEFUL_STEPS`` scale the exploration.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import random
import shutil
import tempfile
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast
from unittest import mock

import attrs
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

import mailrelay.tracker.core as tracker_core
from mailrelay.envelope import Envelope, Recipient
from mailrelay.errors import AuthenticationError, ConnectError, DeliveryError, NoRoute
from mailrelay.message import Message
from mailrelay.reply import Reply
from mailrelay.tracker.async_engine import AsyncDeliveryTracker
from mailrelay.tracker.dsn import DSNAction, DSNRecipient
from mailrelay.tracker.dsn_build import build_dsn
from mailrelay.tracker.dsn_parse import parse_dsn
from mailrelay.tracker.engine import DeliveryTracker
from mailrelay.tracker.events import EventKind, TrackerEvent
from mailrelay.tracker.retry import DomainLimits, RetryPolicy
from mailrelay.tracker.sqlite_store import SQLiteStore
from mailrelay.tracker.store import (
    FINAL_STATES,
    MemoryStore,
    MessageRecord,
    RecipientRecord,
    State,
    Store,
)
from mailrelay.transport.memory import MemoryTransport

T0 = dt.datetime(2026, 3, 1, 8, 0, tzinfo=dt.UTC)
SENDER = "sender@example.com"
#: Recipients over three domains; messages draw from the same few, so they share some.
POOL = (
    "ann@one.example",
    "bob@one.example",
    "cy@two.example",
    "di@two.example",
    "ed@three.example",
)
LEASE = dt.timedelta(minutes=10)
POLICY = RetryPolicy()
MAX_AGE = dt.timedelta(seconds=POLICY.max_age)
MAX_MESSAGES = 10
#: The participants: sync trackers over each store, and the async one over MemoryStore.
SIDES = ("memory", "sqlite", "async")
#: Per-domain shaping: none, or limits that hold domains off within one run.
LIMITS = (
    None,
    DomainLimits(backoff_initial=30, backoff_max=120),
    DomainLimits(per_second=0.5),
    DomainLimits(max_concurrent=1),
)

#: The NOTIFY values drawn that ask for failure reports.
REPORTING = ("FAILURE", "SUCCESS,FAILURE,DELAY")
STATUSES = {DSNAction.DELIVERED: "2.0.0", DSNAction.FAILED: "5.1.1", DSNAction.DELAYED: "4.4.1"}
REPLIES = {
    "accept": Reply.of(250, "2.0.0 Ok"),
    "mailbox-full": Reply.of(452, "4.2.2 Mailbox full"),
    "try-later": Reply.of(451, "4.3.0 Try again later"),
    "busy": Reply.of(421, "4.7.0 Too busy, closing"),
    "no-such-user": Reply.of(550, "5.1.1 No such user"),
}


class TransportBug(RuntimeError):
    """What the scripted transport raises for a "bug": not a DeliveryError."""


class Killed(Exception):
    """The process died: a :class:`MortalStore` write that never happens."""


class MortalStore:
    """A store whose process can die: once :attr:`dead`, every write raises
    :class:`Killed` and changes nothing (the kill came before the commit)."""

    WRITES = frozenset({"add", "add_many", "apply", "apply_many", "claim"})

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.dead = False

    def __getattr__(self, name: str) -> Any:
        if self.dead and name in self.WRITES:
            raise Killed(name)
        return getattr(self.inner, name)


def _attempt_error(kind: str) -> DeliveryError:
    if kind == "transient":
        return ConnectError("connection refused", host="mx.test")
    if kind == "permanent":
        return NoRoute("null MX", host="mx.test")
    return AuthenticationError("535 5.7.8 credentials refused", host="mx.test")


ATTEMPT_KINDS = ("transient", "permanent", "auth", "bug")


def _countdown(side: Side) -> None:
    """Count a transaction toward the kill scripted for ``side``: the kill comes once the
    transport took it, before the tracker could record anything more. The transaction
    took ``tick`` of the side's clock."""
    side.now += side.tick
    if side.stop_after is not None:
        side.stop_after -= 1
        if side.stop_after <= 0:
            side.stop_after = None
            assert side.stop is not None
            side.stop.set()
    if side.kill_after is None:
        return
    side.kill_after -= 1
    if side.kill_after <= 0:
        side.kill_after = None
        assert side.mortal is not None
        side.mortal.dead = True


def _yielding(handler: Any, side: Side) -> Any:
    """``handler`` as a coroutine function that first lets other tasks run (0 to 2 times,
    by how many transactions were sent), so that chunks in flight interleave."""

    async def answer(message: Message, envelope: Envelope) -> Any:
        for _ in range(len(side.sent) % 3):
            await asyncio.sleep(0)
        return handler(message, envelope)

    return answer


class CountingIds:
    """Stands in for ``secrets`` in :mod:`mailrelay.tracker.core`: tracking ids from a
    counter per participant, so that every store gets the same ids in the same order."""

    def __init__(self) -> None:
        self.current = ""
        self._next: dict[str, int] = {}

    def token_hex(self, nbytes: int) -> str:
        # core draws 9 bytes per id (_new_ids draws 9 * count at once and slices them).
        count = max(1, nbytes // 9)
        start = self._next.get(self.current, 0)
        self._next[self.current] = start + count
        return "".join(f"{n:018x}" for n in range(start, start + count))


@attrs.define
class Side:
    """One participant of the lock-step comparison."""

    name: str
    store: Store
    tracker: DeliveryTracker | AsyncDeliveryTracker
    transport: MemoryTransport
    dsn_transport: MemoryTransport
    path: Path | None = None
    #: Per (label, address), the replies scripted for its next attempts.
    replies: dict[tuple[str, str], deque[str]] = attrs.Factory(dict)
    #: Per label, what its next transactions raise.
    raises: dict[str, deque[str]] = attrs.Factory(dict)
    #: (label, address) pairs the transport accepted at some attempt.
    accepted: set[tuple[str, str]] = attrs.Factory(set)
    #: Every transaction the transport was handed: (label, addresses).
    sent: list[tuple[str, tuple[str, ...]]] = attrs.Factory(list)
    #: The transactions whose attempt raised the bug.
    bugged: list[tuple[str, tuple[str, ...]]] = attrs.Factory(list)
    #: This tracker's clock: the machine's time, moved on by each transaction sent.
    now: dt.datetime = T0
    #: How long a transaction takes by that clock.
    tick: dt.timedelta = dt.timedelta(0)
    #: The store as the tracker sees it (it can die).
    mortal: MortalStore | None = None
    #: Die once this many more transactions were sent (None: live on).
    kill_after: int | None = None
    #: Ask the runner to stop once this many more transactions were sent (None: never).
    stop_after: int | None = None
    #: The stop flag of the current (or last) run.
    stop: threading.Event | asyncio.Event | None = None
    #: Messages that callbacks cancel, one per event, during the next runs.
    cancel_on_event: deque[str] = attrs.Factory(deque)
    #: What those cancels returned.
    callback_cancels: list[tuple[object, ...]] = attrs.Factory(list)
    #: The messages callbacks cancelled during the current run.
    cancelled_mid_run: set[str] = attrs.Factory(set)
    #: What the DSN transport answers to the next generated reports.
    report_answers: deque[str] = attrs.Factory(deque)
    #: The events fired, as (kind, tracking id, recipient record).
    events: list[tuple[EventKind, str, object]] = attrs.Factory(list)

    #: ``arun_pending``'s concurrency, for the async tracker.
    concurrency: int = 1

    def call(self, name: str, *args: Any) -> Any:
        """The tracker's ``name`` method; for the async tracker its ``a`` twin, run to
        its end (``arun_pending`` with :attr:`concurrency`)."""
        tracker = self.tracker
        if isinstance(tracker, AsyncDeliveryTracker):
            if name == "run_pending":
                return asyncio.run(self._arun(tracker))
            return asyncio.run(getattr(tracker, f"a{name}")(*args))
        if name == "run_pending":
            flag = threading.Event()
            self.stop = flag
            return tracker.run_pending(stop=flag)
        return getattr(tracker, name)(*args)

    async def _arun(self, tracker: AsyncDeliveryTracker) -> Any:
        flag = asyncio.Event()  # made in the loop that runs
        self.stop = flag
        return await tracker.arun_pending(concurrency=self.concurrency, stop=flag)

    @property
    def stopped(self) -> bool:
        """Whether the last run was asked to stop."""
        return self.stop is not None and self.stop.is_set()


def _normal(record: MessageRecord) -> MessageRecord:
    """What two stores must agree on: all of it, but a generated DSN's own Message-ID
    (drawn at random by the DSN builder) and so its size."""
    return attrs.evolve(record, message_id=None, size=0) if record.notification else record


class TrackerMachine(RuleBasedStateMachine):
    """Lock-step operations on trackers over MemoryStore and SQLiteStore."""

    messages = Bundle("messages")
    #: The participants (names from :data:`SIDES`), and the async runner's concurrency.
    SIDES: tuple[str, ...] = SIDES
    CONCURRENCY = 1

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="mailrelay-stateful-"))
        self.ids = CountingIds()
        self._patch = mock.patch.object(tracker_core, "secrets", self.ids)
        self._patch.start()
        self.now = T0
        self.sides: list[Side] = []
        self.options: dict[str, Any] = {}
        self.workers = 0
        self.labels: dict[str, str] = {}  # Message-ID -> label
        self.tracking: dict[str, str] = {}  # label -> tracking id
        self.addresses: dict[str, tuple[str, ...]] = {}
        self.contents: dict[str, bytes] = {}
        self.confirmed_by_dsn: set[tuple[str, str]] = set()
        self.failed_by_dsn: set[tuple[str, str]] = set()  # this step's failure DSNs
        self.before: dict[str, MessageRecord] = {}  # the memory side's records, last step
        self.reports = 0
        self.reported: dict[str, bool] = {}  # label -> whether its failures are reported

    def teardown(self) -> None:
        self._patch.stop()
        for side in self.sides:
            side.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- set-up -----------------------------------------------------------------------

    @contextmanager
    def acting(self, side: Side) -> Iterator[Side]:
        """Make ``side`` the one whose tracking ids are drawn, its clock at the machine's
        time (each transaction it sends moves it on by the tick)."""
        self.ids.current = side.name
        side.now = self.now
        try:
            yield side
        finally:
            self.ids.current = ""

    def _tracker(self, side: Side, worker: str) -> DeliveryTracker | AsyncDeliveryTracker:
        runner = AsyncDeliveryTracker if side.name == "async" else DeliveryTracker
        side.mortal = MortalStore(side.store)
        tracker = runner(
            side.transport,
            cast(Store, side.mortal),
            dsn_transport=side.dsn_transport,
            clock=lambda: side.now,
            random=random.Random(self.options["seed"] + self.workers).random,
            reporting_mta="relay.example.com",
            worker_id=worker,
            lease=LEASE,
            **{k: v for k, v in self.options.items() if k != "seed"},
        )
        for kind in EventKind:
            tracker.on(kind, self._listener(side))
        return tracker

    def _listener(self, side: Side) -> Any:
        def listen(event: TrackerEvent) -> None:
            # Fired after the commit: the store shows what the event says.
            assert event.tracking_id in self.tracking.values(), event  # none for reports
            if event.recipient is not None and event.tracking_id not in side.cancelled_mid_run:
                stored = side.store.get(event.tracking_id)
                assert stored is not None
                now = stored.recipient(event.recipient.address)
                assert (now.state, now.attempts[: len(event.recipient.attempts)]) == (
                    event.recipient.state,
                    event.recipient.attempts,
                ), (side.name, event, now)
            side.events.append((event.kind, event.tracking_id, event.recipient))
            if side.cancel_on_event and event.kind is not EventKind.DSN_RECEIVED:
                # An application that cancels a message from a callback, mid-run.
                tracking_id = self.tracking[side.cancel_on_event.popleft()]
                side.cancelled_mid_run.add(tracking_id)
                side.callback_cancels.append(side.tracker.cancel(tracking_id))

        return listen

    def _side(self, name: str) -> Side:
        path = self.dir / f"{name}.db" if name == "sqlite" else None
        store: Store = SQLiteStore(path) if path is not None else MemoryStore()
        transport = MemoryTransport()
        side = Side(
            name=name,
            store=store,
            tracker=None,  # type: ignore[arg-type]  # set below, once the handler exists
            transport=transport,
            dsn_transport=MemoryTransport(),
            path=path,
        )
        transport.handler = self._handler(side)
        side.dsn_transport.handler = self._report_handler(side)
        side.tracker = self._tracker(side, "w0")
        return side

    @initialize(
        request_dsn=st.booleans(),
        split_by_domain=st.booleans(),
        batch_size=st.sampled_from([1, 2, 100]),
        commit_batch=st.sampled_from([1, 3, 50]),
        limits=st.sampled_from(LIMITS),
        tick_ms=st.sampled_from([0, 0, 300, 1500]),
        seed=st.integers(0, 2**16),
    )
    def setup(
        self,
        *,
        request_dsn: bool,
        split_by_domain: bool,
        batch_size: int,
        commit_batch: int,
        limits: DomainLimits | None,
        tick_ms: int,
        seed: int,
    ) -> None:
        self.options = {
            "request_dsn": request_dsn,
            "split_by_domain": split_by_domain,
            "batch_size": batch_size,
            "commit_batch": commit_batch,
            "limits": limits,
            "seed": seed,
        }
        self.sides = [self._side(name) for name in self.SIDES]
        for side in self.sides:
            side.concurrency = self.CONCURRENCY
            side.tick = dt.timedelta(milliseconds=tick_ms)
            if self.CONCURRENCY > 1:
                side.transport.handler = _yielding(self._handler(side), side)
                side.dsn_transport.handler = _yielding(self._report_handler(side), side)

    def _report_handler(self, side: Side) -> Any:
        def handler(message: Message, envelope: Envelope) -> dict[str, Reply]:
            assert message.message_id is not None
            assert message.message_id not in self.labels, "a report went to the DSN transport"
            (tracking_id,) = side.store.lookup(message_id=message.message_id)
            record = side.store.get(tracking_id)
            assert record is not None
            assert record.notification, record
            assert envelope.sender is None, envelope  # RFC 3461 §6.2
            for recipient in envelope.recipients:
                stored = record.recipient(recipient.address)
                assert stored.state is State.SENDING, (side.name, stored)
                assert stored.lease_owner == side.tracker.worker_id, (side.name, stored)
            side.sent.append(("report", tuple(str(r.address) for r in envelope.recipients)))
            _countdown(side)
            kind = side.report_answers.popleft() if side.report_answers else "accept"
            if kind == "bug":
                raise TransportBug("bug while sending a report")
            if kind in ATTEMPT_KINDS:
                raise _attempt_error(kind)
            return {str(r.address): REPLIES[kind] for r in envelope.recipients}

        return handler

    def _handler(self, side: Side) -> Any:
        def handler(message: Message, envelope: Envelope) -> dict[str, Reply]:
            assert message.message_id is not None
            label = self.labels[message.message_id]
            record = side.store.get(self.tracking[label])
            assert record is not None
            addresses = tuple(str(r.address) for r in envelope.recipients)
            assert len(set(addresses)) == len(addresses), f"{label}: sent twice in {addresses}"
            for recipient in envelope.recipients:
                stored = record.recipient(recipient.address)
                # Only what this worker has claimed is sent: never a resolved recipient,
                # nor one a callback cancelled since the claim, unless its chunk was in
                # flight already (only with chunks in flight at once: docs/tracker.md,
                # Queries, cancel).
                if (
                    self.CONCURRENCY > 1
                    and record.id in side.cancelled_mid_run
                    and stored.state is State.CANCELLED
                ):
                    continue
                assert stored.state is State.SENDING, (side.name, label, stored)
                assert stored.lease_owner == side.tracker.worker_id, (side.name, label, stored)
            side.sent.append((label, addresses))
            _countdown(side)
            planned = side.raises.get(label)
            if planned:
                kind = planned.popleft()
                if kind == "bug":
                    side.bugged.append((label, addresses))
                    raise TransportBug(f"bug while sending {label}")
                raise _attempt_error(kind)
            answer = {}
            for address in addresses:
                queue = side.replies.get((label, address))
                reply = REPLIES[queue.popleft() if queue else "accept"]
                if reply.is_positive:
                    side.accepted.add((label, address))
                answer[address] = reply
            return answer

        return handler

    # -- operations -------------------------------------------------------------------

    def _submit_all(self, specs: list[tuple[list[str], bool, str | None]]) -> list[str]:
        items: list[tuple[Message, Envelope]] = []
        labels: list[str] = []
        for recipients, null_sender, notify in specs:
            label = f"m{len(self.tracking) + len(labels)}"
            message = Message.build(
                sender=SENDER, to=recipients, subject=label, text=f"body of {label}\n"
            )
            envelope = Envelope(
                None if null_sender else SENDER,
                [Recipient(address, notify=notify) for address in recipients],
            )
            assert message.message_id is not None
            self.labels[message.message_id] = label
            # RFC 3461 §6.2, §4.1: failures are reported unless the sender is null or
            # NOTIFY leaves FAILURE out.
            self.reported[label] = not null_sender and notify in (None, *REPORTING)
            self.addresses[label] = tuple(recipients)
            self.contents[label] = message.as_bytes()
            items.append((message, envelope))
            labels.append(label)
        got = []
        for side in self.sides:
            with self.acting(side):
                if len(items) == 1:
                    got.append([side.call("submit", *items[0])])
                else:
                    got.append(side.call("submit_many", items))
        assert all(ids == got[0] for ids in got), got
        self.tracking.update(zip(labels, got[0], strict=True))
        return labels

    message_spec = st.tuples(
        st.lists(st.sampled_from(POOL), min_size=1, max_size=4, unique=True),
        st.booleans(),
        st.sampled_from([None, None, "NEVER", "FAILURE", "SUCCESS,FAILURE,DELAY"]),
    )

    @precondition(lambda self: len(self.tracking) < MAX_MESSAGES)
    @rule(target=messages, spec=message_spec)
    def submit(self, spec: tuple[list[str], bool, str | None]) -> str:
        return self._submit_all([spec])[0]

    @precondition(lambda self: len(self.tracking) < MAX_MESSAGES)
    @rule(target=messages, specs=st.lists(message_spec, min_size=2, max_size=3))
    def submit_many(self, specs: list[tuple[list[str], bool, str | None]]) -> Any:
        return multiple(*self._submit_all(specs))

    @rule(
        label=messages,
        index=st.integers(0, 3),
        replies=st.lists(st.sampled_from(sorted(REPLIES)), min_size=1, max_size=3),
    )
    def script_replies(self, label: str, index: int, replies: list[str]) -> None:
        addresses = self.addresses[label]
        address = addresses[index % len(addresses)]
        for side in self.sides:
            side.replies.setdefault((label, address), deque()).extend(replies)

    @rule(label=messages, kind=st.sampled_from(ATTEMPT_KINDS))
    def script_attempt(self, label: str, kind: str) -> None:
        for side in self.sides:
            side.raises.setdefault(label, deque()).append(kind)

    @rule(answers=st.lists(st.sampled_from([*sorted(REPLIES), *ATTEMPT_KINDS]), max_size=3))
    def script_reports(self, answers: list[str]) -> None:
        for side in self.sides:
            side.report_answers.extend(answers)

    @rule(after=st.integers(1, 4))
    def script_kill(self, after: int) -> None:
        """The process dies after the transport takes this many more transactions."""
        for side in self.sides:
            side.kill_after = after

    @rule(label=messages)
    def cancel_from_callback(self, label: str) -> None:
        """The next event a run fires has its callback cancel ``label``."""
        for side in self.sides:
            side.cancel_on_event.append(label)

    @rule(after=st.integers(1, 4))
    def script_stop(self, after: int) -> None:
        """The runner is asked to stop after the transport takes this many more
        transactions (as ``run_forever``'s flag, between chunks)."""
        for side in self.sides:
            side.stop_after = after

    @rule()
    def run_pending(self) -> None:
        self._run()

    @rule(seconds=st.sampled_from([330, 700, 3 * 3600, 5 * 86400]))
    def advance_and_run(self, seconds: int) -> None:
        """A shortcut through the retry schedule (5 min, then 10, ..., the maximum age)."""
        self.now += dt.timedelta(seconds=seconds)
        self._run()

    def _run(self) -> None:
        outcomes: list[tuple[str, object]] = []
        reports_before = {
            side.name: {r.id for r in side.store.find() if r.notification} for side in self.sides
        }
        leases_before = {side.name: self._leases(side) for side in self.sides}
        for side in self.sides:
            side.sent.clear()
            side.bugged.clear()
            side.events.clear()
            side.cancelled_mid_run.clear()
            side.callback_cancels.clear()
            with self.acting(side):
                try:
                    summary = side.call("run_pending")
                    outcomes.append(("stopped" if side.stopped else "returned", summary))
                except TransportBug as exc:
                    outcomes.append(("raised", str(exc)))
                except Killed:
                    outcomes.append(("killed", None))
        assert all(o == outcomes[0] for o in outcomes), outcomes
        assert all(s.sent == self.sides[0].sent for s in self.sides), [s.sent for s in self.sides]
        assert all(s.events == self.sides[0].events for s in self.sides)
        assert all(s.callback_cancels == self.sides[0].callback_cancels for s in self.sides)
        ends = {side.now for side in self.sides}
        assert len(ends) == 1, ends
        self.now = ends.pop()
        if outcomes[0][0] == "killed":
            self._restart()
            return
        for side in self.sides:
            self._check_reports(side, reports_before[side.name])
            self._check_no_lease_left(side, leases_before[side.name])
            if outcomes[0][0] == "stopped":
                continue
            if outcomes[0][0] == "returned":
                self._check_nothing_due(side)
            else:
                self._check_put_back(side)

    def _restart(self) -> None:
        """A killed tracker's process starts again: a new worker over the same store
        (reopened), whose leases the dead one's are not."""
        self.workers += 1
        for side in self.sides:
            if side.path is not None:
                side.store.close()
                side.store = SQLiteStore(side.path)
            side.tracker = self._tracker(side, f"w{self.workers}")

    def _check_reports(self, side: Side, before: set[str]) -> None:
        """The failure reports this run queued are exactly about the failures it recorded
        that ask for one (docs/tracker.md, DSNs: Generating)."""
        by_id = {i: label for label, i in self.tracking.items()}
        failed = {
            (by_id[tracking_id], str(recipient.address))
            for kind, tracking_id, recipient in side.events
            if kind in (EventKind.BOUNCED, EventKind.EXPIRED)
            and isinstance(recipient, RecipientRecord)
            and self.reported[by_id[tracking_id]]
        }
        reported = set()
        for record in side.store.find():
            if not record.notification or record.id in before:
                continue
            assert [str(r.address) for r in record.recipients] == [SENDER], record
            report = parse_dsn(side.store.content(record.id))
            assert report.original_message_id is not None, report
            label = self.labels[report.original_message_id]
            if self.options["request_dsn"]:
                assert report.envid == self.tracking[label], report
            for item in report.recipients:
                assert item.action is DSNAction.FAILED, item
                reported.add((label, item.address))
        assert reported == failed, (side.name, reported, failed)

    @staticmethod
    def _leases(side: Side) -> set[tuple[str, str, object, object]]:
        return {
            (record.id, str(r.address), r.lease_owner, r.lease_until)
            for record in side.store.find(state=State.SENDING)
            for r in record.recipients
            if r.state is State.SENDING
        }

    def _check_no_lease_left(
        self, side: Side, before: set[tuple[str, str, object, object]]
    ) -> None:
        """However a run ends (but a kill), it leaves no lease of its own: what it claimed
        and did not decide went back. (Leases from before it, of a crashed tracker with the
        same worker id, not expired yet, may stay.)"""
        worker = side.tracker.worker_id
        for lease in self._leases(side) - before:
            assert lease[2] != worker, (side.name, lease)

    def _check_nothing_due(self, side: Side) -> None:
        due = side.tracker.next_due()
        assert due is None or due > self.now, (side.name, due, self.now)
        for record in side.store.find():
            for recipient in record.recipients:
                if recipient.state in (State.QUEUED, State.DEFERRED):
                    # Past the maximum age only while the per-domain back-off holds it off.
                    assert recipient.next_attempt_at is not None
                    assert record.created_at + MAX_AGE > self.now or (
                        recipient.next_attempt_at > self.now
                    ), (side.name, record.id, recipient)

    def _check_put_back(self, side: Side) -> None:
        for label, addresses in side.bugged:
            record = side.tracker.status(self.tracking[label])
            for address in addresses:
                recipient = record.recipient(address)
                if record.id in side.cancelled_mid_run and recipient.state is State.CANCELLED:
                    # A callback cancelled the message while its attempt was under way (the
                    # events of the results before it fire when the bug propagates): the
                    # cancel wins over putting it back.
                    continue
                assert recipient.state in (State.QUEUED, State.DEFERRED), (side.name, recipient)
                assert recipient.is_due(self.now), (side.name, recipient)
                assert recipient.lease_owner is None, (side.name, recipient)

    @rule(
        seconds=st.one_of(
            st.integers(1, 900),
            st.sampled_from([3600, 4 * 3600, 86400, 2 * 86400, 5 * 86400, 6 * 86400]),
        )
    )
    def advance(self, seconds: int) -> None:
        self.now += dt.timedelta(seconds=seconds)

    @rule(label=messages)
    def cancel(self, label: str) -> None:
        results = []
        for side in self.sides:
            with self.acting(side):
                results.append(side.call("cancel", self.tracking[label]))
        assert all(r == results[0] for r in results), results
        before = self.before[label]
        expected = tuple(r.address for r in before.recipients if not r.state.is_final)
        assert results[0] == expected, (results[0], expected)

    @rule(
        label=messages,
        index=st.integers(0, 3),
        action=st.sampled_from([DSNAction.DELIVERED, DSNAction.FAILED, DSNAction.DELAYED]),
    )
    def ingest_dsn(self, label: str, index: int, action: DSNAction) -> None:
        success = action is DSNAction.DELIVERED
        addresses = self.addresses[label]
        address = addresses[index % len(addresses)]
        self.reports += 1
        raw = build_dsn(
            original=self.contents[label],
            envelope_sender=SENDER,
            recipients=[
                DSNRecipient(
                    address=address,
                    action=action,
                    status=STATUSES[action],
                    diagnostic="smtp; 550 5.1.1 gone" if action is DSNAction.FAILED else None,
                    remote_mta="mx.downstream.example",
                )
            ],
            reporting_mta="mx.downstream.example",
            envid=self.tracking[label] if self.options["request_dsn"] else None,
            date=self.now,
            message_id=f"report-{self.reports}@downstream.example",
        )
        matches = []
        for side in self.sides:
            side.events.clear()
            with self.acting(side):
                matches.append(side.call("ingest_dsn", raw))
        assert all(m == matches[0] for m in matches), matches
        assert all(s.events == self.sides[0].events for s in self.sides)
        match = matches[0]
        assert match.tracking_id == self.tracking[label], match
        # docs/tracker.md, Ingesting: success -> DELIVERED and confirmed, failure (after
        # relay) -> BOUNCED, from any state but BOUNCED, EXPIRED and CANCELLED, and only
        # for a recipient a server accepted (DELIVERED, SENDING, or a 2xx in its history:
        # else anyone who saw the message could forge its fate); a delay, or a success for a
        # recipient confirmed already, is history only.
        before = self.before[label].recipient(address)
        after = self.sides[0].tracker.status(self.tracking[label]).recipient(address)
        assert after.attempts[-1].source == "dsn", after
        assert len(after.attempts) == len(before.attempts) + 1, (before, after)
        if action is DSNAction.DELAYED:
            assert not match.changed, match
            assert (after.state, after.confirmed) == (before.state, before.confirmed), after
            return
        relayed = before.state in (State.DELIVERED, State.SENDING) or any(
            a.source == "reply" and a.code is not None and 200 <= a.code < 300
            for a in before.attempts
        )
        may_change = (
            relayed
            and before.state not in (State.BOUNCED, State.EXPIRED, State.CANCELLED)
            and not (success and before.state is State.DELIVERED and before.confirmed)
        )
        if may_change:
            if success:
                self.confirmed_by_dsn.add((label, address))
            else:
                self.failed_by_dsn.add((label, address))
        # (A success DSN for a DELIVERED recipient changes it too: it confirms it.)
        assert bool(match.changed) == may_change, (before, match)
        if may_change:
            assert after.state is (State.DELIVERED if success else State.BOUNCED), after
            assert after.confirmed is success, after
        else:
            assert (after.state, after.confirmed) == (before.state, before.confirmed), after
            assert [e[0] for e in self.sides[0].events] == [EventKind.DSN_RECEIVED]

    @rule(
        claimed=st.integers(0, 3),
        same_worker=st.booleans(),
        release=st.booleans(),
        reopen=st.booleans(),
    )
    def crash(self, claimed: int, same_worker: bool, release: bool, reopen: bool) -> None:
        """A tracker dies (maybe holding a claim it never recorded) and a new one starts."""
        old = self.sides[0].tracker.worker_id
        if not same_worker:
            self.workers += 1
        worker = old if same_worker else f"w{self.workers}"
        claims = []
        released = []
        for side in self.sides:
            with self.acting(side):
                if claimed:
                    claims.append(
                        side.store.claim(worker=old, now=self.now, lease=LEASE, limit=claimed)
                    )
                if reopen and side.path is not None:
                    side.store.close()
                    side.store = SQLiteStore(side.path)
                side.tracker = self._tracker(side, worker)
                if release:
                    released.append(side.call("release_leases"))
        assert all(c == claims[0] for c in claims), claims
        assert all(r == released[0] for r in released), released
        if release:
            for side in self.sides:
                for record in side.store.find(state=State.SENDING):
                    for recipient in record.recipients:
                        assert recipient.lease_owner != worker, (side.name, recipient)

    # -- what must hold after every step ----------------------------------------------

    @invariant()
    def stores_agree_and_nothing_is_lost(self) -> None:
        if not self.sides:
            return
        reference = self.sides[0]
        for side in self.sides:
            side.now = self.now  # the trackers' clocks between steps
            everything = side.store.find()
            by_id = {record.id: record for record in everything}
            for state in State:
                found = [r.id for r in side.store.find(state=state)]
                wanted = [r.id for r in everything if any(x.state is state for x in r.recipients)]
                assert found == wanted, (side.name, state, found, wanted)
            for label, tracking_id in self.tracking.items():
                record = side.tracker.status(tracking_id)
                assert by_id[tracking_id] == record
                assert tuple(str(r.address) for r in record.recipients) == self.addresses[label]
            # The queries the tracker offers agree with the records.
            assert [r.id for r in side.tracker.find(limit=2)] == [r.id for r in everything[:2]]
            day = dt.timedelta(days=1)
            old = [r.id for r in side.tracker.find(older_than=day)]
            assert old == [r.id for r in everything if r.created_at < self.now - day], old
            due = [r.due_at for record in everything for r in record.recipients if r.due_at]
            assert side.tracker.next_due() == min(due, default=None), side.name
            if side is not reference:
                mine = [_normal(r) for r in everything]
                theirs = [_normal(r) for r in reference.store.find()]
                assert mine == theirs, (side.name, mine, theirs)

    @invariant()
    def histories_and_final_states_hold(self) -> None:
        if not self.sides:
            return
        for label, tracking_id in self.tracking.items():
            for side in self.sides:
                record = side.tracker.status(tracking_id)
                for recipient in record.recipients:
                    address = str(recipient.address)
                    if recipient.state is State.DELIVERED:
                        assert (label, address) in side.accepted or (
                            label,
                            address,
                        ) in self.confirmed_by_dsn, (side.name, label, recipient)
                    previous = self.before.get(label)
                    if previous is None:
                        continue
                    was = previous.recipient(address)
                    assert recipient.attempts[: len(was.attempts)] == was.attempts, (
                        side.name,
                        was,
                        recipient,
                    )
                    if was.state in FINAL_STATES and recipient.state is not was.state:
                        # docs/tracker.md: only a failure DSN after relay changes a final
                        # state (DELIVERED -> BOUNCED).
                        assert was.state is State.DELIVERED, (side.name, was, recipient)
                        assert recipient.state is State.BOUNCED, (side.name, was, recipient)
                        assert (label, address) in self.failed_by_dsn, (side.name, recipient)
        self.failed_by_dsn.clear()
        reference = self.sides[0].tracker
        self.before = {label: reference.status(i) for label, i in self.tracking.items()}


TrackerMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("MAILRELAY_STATEFUL_EXAMPLES", "150")),
    stateful_step_count=int(os.environ.get("MAILRELAY_STATEFUL_STEPS", "30")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestTrackerMachine = TrackerMachine.TestCase


@pytest.mark.parametrize("runner", ["sync", "async"])
@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_a_message_cancelled_after_its_claim_is_not_sent(
    runner: str, kind: str, tmp_path: Path
) -> None:
    """Found by the state machine: a callback (or any thread) that cancelled a message
    claimed in the batch being run, before its transaction went out, saw it sent all the
    same (and the result kept in the history only). Now the runner leaves it out."""
    store: Store = MemoryStore() if kind == "memory" else SQLiteStore(tmp_path / "t.db")
    transport = MemoryTransport()
    options: dict[str, Any] = {"clock": lambda: T0, "worker_id": "w1", "commit_batch": 1}
    tracker: DeliveryTracker | AsyncDeliveryTracker
    if runner == "sync":
        tracker = DeliveryTracker(transport, store, **options)
    else:
        tracker = AsyncDeliveryTracker(transport, store, **options)
    ids = tracker.submit_many(
        [
            Message.build(sender=SENDER, to=[to], subject="s", text="hi\n")
            for to in ("a@example.org", "b@example.org")
        ]
    )
    cancelled: list[tuple[str, tuple[object, ...]]] = []

    def cancel_the_other(event: TrackerEvent) -> None:
        # The first result is committed alone (commit_batch=1), before the other goes out.
        if not cancelled:
            (other,) = [i for i in ids if i != event.tracking_id]
            cancelled.append((other, tracker.cancel(other)))

    tracker.on("delivered", cancel_the_other)
    if isinstance(tracker, AsyncDeliveryTracker):
        summary = asyncio.run(tracker.arun_pending(concurrency=1))
    else:
        summary = tracker.run_pending()
    ((other, addresses),) = cancelled
    record = tracker.status(other)
    assert addresses == tuple(r.address for r in record.recipients)
    assert len(transport.outbox) == 1
    assert [(r.state, r.attempts) for r in record.recipients] == [(State.CANCELLED, ())]
    assert summary.delivered == 1
    store.close()


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_a_repeated_success_dsn_changes_nothing(kind: str, tmp_path: Path) -> None:
    """Found by the state machine: the same success DSN ingested twice reported the
    recipient as changed again and fired a second ``delivered`` event, though it was
    DELIVERED and confirmed already. A repeat is history only, as a second failure DSN
    for a BOUNCED recipient is."""
    store: Store = MemoryStore() if kind == "memory" else SQLiteStore(tmp_path / "t.db")
    tracker = DeliveryTracker(MemoryTransport(), store, clock=lambda: T0, request_dsn=True)
    seen: list[EventKind] = []
    for event_kind in EventKind:
        tracker.on(event_kind, lambda event: seen.append(event.kind))
    content = Message.build(sender=SENDER, to=["a@example.org"], subject="s", text="hi\n")
    tracking_id = tracker.submit(content)
    tracker.run_pending()
    raw = build_dsn(
        original=content.as_bytes(),
        envelope_sender=SENDER,
        recipients=[DSNRecipient(address="a@example.org", action=DSNAction.DELIVERED)],
        reporting_mta="mx.downstream.example",
        envid=tracking_id,
        date=T0,
        message_id="report@downstream.example",
    )
    first = tracker.ingest_dsn(raw)
    seen.clear()
    again = tracker.ingest_dsn(raw)
    (recipient,) = tracker.status(tracking_id).recipients
    assert [str(a) for a in first.changed] == ["a@example.org"]
    assert (again.recipients, again.changed) == (first.recipients, ())
    assert seen == [EventKind.DSN_RECEIVED]
    assert (recipient.state, recipient.confirmed) == (State.DELIVERED, True)
    assert [a.source for a in recipient.attempts] == ["reply", "dsn", "dsn"]
    store.close()


class ConcurrentAsyncMachine(TrackerMachine):
    """The async tracker alone, with four chunks in flight at once.

    Its chunks finish in an order of their own, so no other tracker would do the same;
    what is checked is what must hold of any tracker (the invariants above).
    """

    SIDES = ("async",)
    CONCURRENCY = 4


ConcurrentAsyncMachine.TestCase.settings = settings(
    TrackerMachine.TestCase.settings,
    max_examples=max(1, TrackerMachine.TestCase.settings.max_examples // 3),
)
TestConcurrentAsyncMachine = ConcurrentAsyncMachine.TestCase
