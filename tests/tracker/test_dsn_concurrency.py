"""The tracker's DSNs under real concurrency, crashes and cancellation.

Returned reports are ingested (``ingest_dsn``) from several threads while ``run_forever``
delivers in another and more threads submit and cancel; generated failure DSNs are made
by a child process (this module run as ``python -m tests.tracker.test_dsn_concurrency``)
killed with SIGKILL at random moments and then resumed, and by an async runner whose task
is cancelled at random moments while other tasks ingest reports (some of them cancelled
too). Real peers throughout: aiosmtpd servers on loopback (one as the relay, which
refuses ``reject@`` with 550 and ``tempfail@`` with 450 until it expires, one where
generated DSNs go, which refuses those to ``reject@`` and ``tempfail@`` likewise), each
recording what it accepts, and a ``SQLiteStore`` in a temporary directory. Properties,
by the store, the events and the servers' records (docs/tracker.md, DSNs, Events and
Durability):

* no exception escapes any thread or task;
* each recipient's state, ``confirmed`` flag and events are what its attempt history
  gives by the documented rules, whatever the interleaving (:func:`replay`): a success
  DSN makes an unresolved or delivered recipient DELIVERED and confirmed, and once
  confirmed another one (a report sent twice, even ingested at the same moment from two
  threads) is history only; a failure DSN makes an unresolved or delivered one BOUNCED;
  a DSN for a BOUNCED, EXPIRED or CANCELLED recipient, or a delay, is history only; a
  cancel may come between any two attempts;
* every state change fires its event exactly once (``delivered`` once for the delivery
  and once for the confirmation, ``bounced`` once), each showing the recipient as that
  change left it, also when the async ``aingest_dsn`` is cancelled while it records;
  ``dsn_received`` once per matched report;
* every recipient bounced or expired by an attempt has exactly one generated DSN, which
  reached the DSN server (copies of it only from what a kill or cancel re-sent: at most
  one more per interruption, at most a claim batch or ``commit_batch`` per
  interruption in all); none for a message from the null reverse-path, for a recipient
  bounced by a returned report, or for one not bounced or expired; a DSN refused for
  good is BOUNCED, one refused for now EXPIRED in the end, with no report about either.

The deterministic regression tests hold two reports at a store's ``apply`` so that both
read the record before either writes, record a second report between a report's commit
and its events, and cancel ``aingest_dsn`` while its worker thread commits.

``MAILRELAY_DSN_MESSAGES`` scales the thread and task scenarios, ``MAILRELAY_DSN_CANCELS``
the async cancellations, ``MAILRELAY_DSN_CRASH_RUNS`` and ``MAILRELAY_DSN_CRASH_COUNT`` the
kills and the messages of each child; ``MAILRELAY_DSN_SEED`` replays a run's random
choices (each test prints the seed). Every wait is bounded (:data:`BOUND`): the bounds
are hang guards, never assertions on speed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest

from mailrelay.address import Address
from mailrelay.envelope import Envelope, Recipient
from mailrelay.message import Message
from mailrelay.options import TLS, Timeouts
from mailrelay.tracker.async_engine import AsyncDeliveryTracker
from mailrelay.tracker.dsn import DSNAction, DSNKind, DSNRecipient
from mailrelay.tracker.dsn_build import build_dsn
from mailrelay.tracker.dsn_parse import parse_dsn
from mailrelay.tracker.engine import DeliveryTracker, DSNMatch
from mailrelay.tracker.events import TrackerEvent
from mailrelay.tracker.retry import RetryPolicy
from mailrelay.tracker.sqlite_store import SQLiteStore
from mailrelay.tracker.store import (
    Attempt,
    Change,
    MemoryStore,
    MessageRecord,
    RecipientRecord,
    State,
)
from mailrelay.transport import AsyncSMTPTransport, SMTPTransport
from tests.peers.aiosmtpd_server import AiosmtpdFactory, AiosmtpdServer

#: The longest any thread, process or loop of a test may take (seconds): a hang guard.
BOUND = 30.0
SEED = int(os.environ.get("MAILRELAY_DSN_SEED", random.randrange(1 << 32)))
SENDER = "app@mailrelay.test"
REFUSED_SENDER = "reject@mailrelay.test"
DEFERRING_SENDER = "tempfail@mailrelay.test"
#: How long a ``tempfail@`` recipient is retried before it expires (seconds).
MAX_AGE = 1.0
REPORTING_MTA = "relay.mailrelay.test"


@pytest.fixture(autouse=True)
def _replayable() -> None:
    """Name the seed of the random choices (pytest shows it with a failure's output)."""
    print(f"MAILRELAY_DSN_SEED={SEED}")


class Events:
    """Every event fired, from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.fired: list[TrackerEvent] = []

    def record(self, event: TrackerEvent) -> None:
        """A callback for every kind."""
        with self._lock:
            self.fired.append(event)

    def count(self) -> Counter[tuple[str, str, str, bool]]:
        """Per (tracking id, address, kind, recipient confirmed), how often it fired."""
        with self._lock:
            return Counter(
                (
                    e.tracking_id,
                    "" if e.recipient is None else str(e.recipient.address),
                    e.kind.value,
                    e.recipient is not None and e.recipient.confirmed,
                )
                for e in self.fired
            )


def _smtp(server: AiosmtpdServer) -> SMTPTransport:
    return SMTPTransport(server.host, server.port, tls=TLS.NONE, timeouts=Timeouts.all(10))


def _tracker(
    db: Path, relay: AiosmtpdServer, dsn_server: AiosmtpdServer | None, **options: Any
) -> tuple[DeliveryTracker, Events]:
    store = options.pop("store", None)
    tracker = DeliveryTracker(
        _smtp(relay),
        SQLiteStore(db) if store is None else store,
        dsn_transport=None if dsn_server is None else _smtp(dsn_server),
        reporting_mta=REPORTING_MTA,
        request_dsn=True,
        **options,
    )
    events = Events()
    for kind in ("delivered", "deferred", "bounced", "expired", "dsn_received"):
        tracker.on(kind, events.record)
    return tracker, events


def _report(message: Message, tracking_id: str, addresses: list[str], action: DSNAction) -> bytes:
    """A returned report about ``addresses`` of a tracked message, as a relay sends it."""
    status = {DSNAction.DELIVERED: "2.0.0", DSNAction.FAILED: "5.1.1"}.get(action, "4.2.0")
    return build_dsn(
        original=message.as_bytes(),
        envelope_sender=SENDER,
        recipients=[
            DSNRecipient(
                address=address,
                action=action,
                status=status,
                diagnostic=f"smtp; {status[0]}50 {status} downstream (test)",
                remote_mta="mx.downstream.test",
            )
            for address in addresses
        ],
        reporting_mta="mx.downstream.test",
        envid=tracking_id,
    )


class Gate:
    """What a store's ``apply`` (the DSN path's write) waits for before it writes.

    With a ``barrier``, two reports ingested at once both read the record before either
    writes: the interleaving that real threads reach only by chance. With ``held``, an
    ``apply`` says it has ``entered`` and waits until ``held`` is cleared (``release``).
    """

    def __init__(self, *, barrier: threading.Barrier | None = None, held: bool = False) -> None:
        self.barrier = barrier
        self.entered = threading.Event()
        self._released = threading.Event()
        if not held:
            self._released.set()

    def release(self) -> None:
        """Let a held ``apply`` go on."""
        self._released.set()

    def wait(self) -> None:
        """Wait at the barrier, if one is set, and until released."""
        self.entered.set()
        if self.barrier is not None:
            self.barrier.wait(BOUND)
        assert self._released.wait(BOUND)


class GatedSQLiteStore(SQLiteStore):
    """A ``SQLiteStore`` whose ``apply`` waits at its :class:`Gate` first."""

    gate = Gate()

    def apply(
        self, tracking_id: str, changes: Sequence[Change], *, worker: str | None = None
    ) -> tuple[Address, ...]:
        """See :meth:`SQLiteStore.apply`."""
        self.gate.wait()
        return super().apply(tracking_id, changes, worker=worker)


class GatedMemoryStore(MemoryStore):
    """A ``MemoryStore`` whose ``apply`` waits at its :class:`Gate` first."""

    gate = Gate()

    def apply(
        self, tracking_id: str, changes: Sequence[Change], *, worker: str | None = None
    ) -> tuple[Address, ...]:
        """See :meth:`MemoryStore.apply`."""
        self.gate.wait()
        return super().apply(tracking_id, changes, worker=worker)


# -- a report ingested twice at the same moment ---------------------------------------------


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
def test_a_success_dsn_ingested_twice_at_once_confirms_once(
    make_aiosmtpd: AiosmtpdFactory, tmp_path: Path, kind: str
) -> None:
    relay = make_aiosmtpd(starttls=False, auth=False)
    store: GatedSQLiteStore | GatedMemoryStore = (
        GatedSQLiteStore(tmp_path / "queue.db") if kind == "sqlite" else GatedMemoryStore()
    )
    store.gate = Gate()
    tracker, events = _tracker(tmp_path / "queue.db", relay, None, store=store)
    message = Message.build(sender=SENDER, to=["ann@mailrelay.test"], subject="s", text="t\n")
    tracking_id = tracker.submit(message)
    assert tracker.run_pending().delivered == 1
    raw = _report(message, tracking_id, ["ann@mailrelay.test"], DSNAction.DELIVERED)

    store.gate = Gate(barrier=threading.Barrier(2))
    matches: list[Any] = []
    errors: list[BaseException] = []

    def ingest() -> None:
        try:
            matches.append(tracker.ingest_dsn(raw))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=ingest) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(BOUND)
    assert not any(thread.is_alive() for thread in threads)
    store.gate = Gate()
    assert errors == []
    # One confirmation: one of the two reports changed the recipient, the other is a
    # report sent twice (docs/tracker.md, DSNs: "history only").
    assert sorted(len(m.changed) for m in matches) == [0, 1]
    fired = events.count()
    assert fired[(tracking_id, "ann@mailrelay.test", "delivered", True)] == 1
    assert fired[(tracking_id, "", "dsn_received", False)] == 2
    recipient = tracker.status(tracking_id).recipient("ann@mailrelay.test")
    assert recipient.state is State.DELIVERED
    assert recipient.confirmed
    assert [a.source for a in recipient.attempts] == ["reply", "dsn", "dsn"]
    tracker.close()


_F, _D, _W = DSNAction.FAILED, DSNAction.DELIVERED, DSNAction.DELAYED


@pytest.mark.parametrize(
    ("actions", "state", "kind"),
    [
        ((_F, _F), State.BOUNCED, "bounced"),
        ((_W, _F), State.BOUNCED, "bounced"),
        ((_D, _F), State.BOUNCED, "bounced"),
        ((_F, _D), State.BOUNCED, "bounced"),
        ((_D, _D), State.DELIVERED, "delivered"),
        ((_D, _W), State.DELIVERED, "delivered"),
    ],
)
def test_a_report_naming_a_recipient_twice_changes_it_once(
    make_aiosmtpd: AiosmtpdFactory,
    tmp_path: Path,
    actions: tuple[DSNAction, ...],
    state: State,
    kind: str,
) -> None:
    # An address expanded downstream (RFC 3464 §2.3.1) names the tracked recipient in
    # two blocks, through their Original-Recipient.
    relay = make_aiosmtpd(starttls=False, auth=False)
    tracker, events = _tracker(tmp_path / "queue.db", relay, None)
    message = Message.build(sender=SENDER, to=["ann@mailrelay.test"], subject="s", text="t\n")
    tracking_id = tracker.submit(message)
    assert tracker.run_pending().delivered == 1
    statuses = {_F: "5.1.1", _D: "2.0.0", _W: "4.2.0"}
    raw = build_dsn(
        original=message.as_bytes(),
        envelope_sender=SENDER,
        recipients=[
            DSNRecipient(
                address=f"box{n}@downstream.test",
                action=action,
                status=statuses[action],
                original_recipient="rfc822;ann@mailrelay.test",
            )
            for n, action in enumerate(actions)
        ],
        reporting_mta="mx.downstream.test",
        envid=tracking_id,
    )
    before = Counter(events.count())
    match = tracker.ingest_dsn(raw)
    fired = events.count() - before
    ann = Address.parse("ann@mailrelay.test")
    assert match.recipients == (ann,)
    assert match.changed == (ann,)
    # One state change, one event (no "delivered" for a delay block).
    assert fired == Counter(
        {
            (tracking_id, "", "dsn_received", False): 1,
            (tracking_id, "ann@mailrelay.test", kind, state is State.DELIVERED): 1,
        }
    )
    recipient = tracker.status(tracking_id).recipient(ann)
    assert recipient.state is state
    assert [a.source for a in recipient.attempts] == ["reply", "dsn", "dsn"]
    tracker.close()


class HookedSQLiteStore(SQLiteStore):
    """A ``SQLiteStore`` that calls ``hook`` once, right after the next ``apply``."""

    hook: Callable[[], object] | None = None

    def apply(
        self, tracking_id: str, changes: Sequence[Change], *, worker: str | None = None
    ) -> tuple[Address, ...]:
        """See :meth:`SQLiteStore.apply`."""
        changed = super().apply(tracking_id, changes, worker=worker)
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()
        return changed


def test_an_event_carries_the_recipient_as_its_report_left_it(
    make_aiosmtpd: AiosmtpdFactory, tmp_path: Path
) -> None:
    relay = make_aiosmtpd(starttls=False, auth=False)
    store = HookedSQLiteStore(tmp_path / "queue.db")
    tracker, events = _tracker(tmp_path / "queue.db", relay, None, store=store)
    message = Message.build(sender=SENDER, to=["ann@mailrelay.test"], subject="s", text="t\n")
    tracking_id = tracker.submit(message)
    assert tracker.run_pending().delivered == 1
    success = _report(message, tracking_id, ["ann@mailrelay.test"], DSNAction.DELIVERED)
    failure = _report(message, tracking_id, ["ann@mailrelay.test"], DSNAction.FAILED)
    # The failure report is recorded between the success report's commit and its events
    # (as another thread or process may do at any moment).
    store.hook = lambda: tracker.ingest_dsn(failure)
    tracker.ingest_dsn(success)
    by_kind = {e.kind.value: e.recipient for e in events.fired if e.recipient is not None}
    delivered, bounced = by_kind["delivered"], by_kind["bounced"]
    assert delivered is not None
    assert bounced is not None
    # Each event shows what its own change did (docs/tracker.md, Events), as the runner's
    # events do: the confirmation, then the bounce after relay.
    assert (delivered.state, delivered.confirmed) == (State.DELIVERED, True)
    assert (bounced.state, bounced.confirmed) == (State.BOUNCED, False)
    assert tracker.status(tracking_id).recipient("ann@mailrelay.test").state is State.BOUNCED
    tracker.close()


def test_a_cancelled_aingest_dsn_still_fires_the_events_of_what_it_recorded(
    make_aiosmtpd: AiosmtpdFactory, tmp_path: Path
) -> None:
    relay = make_aiosmtpd(starttls=False, auth=False)
    store = GatedSQLiteStore(tmp_path / "queue.db")
    events = Events()
    tracker = AsyncDeliveryTracker(
        AsyncSMTPTransport(relay.host, relay.port, tls=TLS.NONE, timeouts=Timeouts.all(10)),
        store,
        request_dsn=True,
    )
    for kind in ("delivered", "bounced", "dsn_received"):
        tracker.on(kind, events.record)
    message = Message.build(sender=SENDER, to=["ann@mailrelay.test"], subject="s", text="t\n")

    async def scenario() -> tuple[str, RecipientRecord]:
        tracking_id = await tracker.asubmit(message)
        assert (await tracker.arun_pending()).delivered == 1
        raw = _report(message, tracking_id, ["ann@mailrelay.test"], DSNAction.FAILED)
        store.gate = Gate(held=True)
        task = asyncio.create_task(tracker.aingest_dsn(raw))
        # Cancelled while its worker thread is about to commit the bounce.
        assert await asyncio.to_thread(store.gate.entered.wait, BOUND)
        task.cancel()
        await asyncio.sleep(0)
        store.gate.release()
        done, _ = await asyncio.wait([task], timeout=BOUND)
        assert done
        assert task.cancelled()
        record = await tracker.astatus(tracking_id)
        await tracker.aclose()
        return tracking_id, record.recipient("ann@mailrelay.test")

    tracking_id, recipient = asyncio.run(scenario())
    assert recipient.state is State.BOUNCED
    # The bounce was recorded, so its events fired, cancelled or not: a report ingested
    # again is history only, and would never fire them.
    fired = events.count()
    assert fired[tracking_id, "ann@mailrelay.test", "bounced", False] == 1
    assert fired[tracking_id, "", "dsn_received", False] == 1


# -- replaying a recipient's history by the documented rules --------------------------------


def _dsn_action(attempt: Attempt) -> str:
    """``delivered``, ``failed``, ``delayed``... for an attempt a DSN added (its text)."""
    return (attempt.text or "").removeprefix("DSN ").partition(":")[0]


def replay(
    attempts: Sequence[Attempt],
    cancel_at: int | None,
    *,
    expires: bool = False,
    sending_from: int | None = None,
) -> tuple[State, bool, Counter[tuple[str, bool]]]:
    """The state, ``confirmed`` and events that the documented rules give for a history.

    docs/tracker.md: a server's 2xx makes an unresolved recipient DELIVERED, its 5xx
    BOUNCED, its 4xx DEFERRED, or EXPIRED when ``expires`` and it is the last answer; a
    success DSN makes an unresolved or DELIVERED (unconfirmed) recipient
    DELIVERED and confirmed; a failure DSN makes an unresolved or DELIVERED one BOUNCED;
    either only once a server accepted the recipient (a 2xx earlier in its history) or
    while it is being sent (SENDING, which the history does not record: ``sending_from``
    is the index of the first attempt made while it was, ``None`` for never);
    anything else, or for another state, is history only; ``cancel_at`` is where the
    cancel came (between which attempts), ``None`` if it never did. The events are
    counted by (kind, recipient confirmed).
    """
    state, confirmed = State.QUEUED, False
    relayed = False  # a server accepted it: what a report can be about
    events: Counter[tuple[str, bool]] = Counter()
    replies = [index for index, attempt in enumerate(attempts) if attempt.source == "reply"]
    for index in range(len(attempts) + 1):
        if index == cancel_at and not state.is_final:
            state = State.CANCELLED
        if index == len(attempts):
            break
        attempt = attempts[index]
        unresolved = not state.is_final
        if attempt.source == "reply" and attempt.code is not None and attempt.code < 300:
            relayed = True
        if attempt.source == "reply" and unresolved:
            assert attempt.code is not None
            if attempt.code < 300:
                state = State.DELIVERED
                events["delivered", False] += 1
            elif attempt.code >= 500:
                state = State.BOUNCED
                events["bounced", False] += 1
            elif expires and index == replies[-1]:
                state = State.EXPIRED
                events["expired", False] += 1
            else:
                state = State.DEFERRED
        elif attempt.source == "dsn" and (
            relayed or (sending_from is not None and index >= sending_from)
        ):
            action = _dsn_action(attempt)
            delivered = state is State.DELIVERED
            if action == "delivered" and (unresolved or (delivered and not confirmed)):
                state, confirmed = State.DELIVERED, True
                events["delivered", True] += 1
            elif action == "failed" and (unresolved or delivered):
                state, confirmed = State.BOUNCED, False
                events["bounced", False] += 1
    return state, confirmed, events


def _events_of(
    fired: Counter[tuple[str, str, str, bool]], tracking_id: str, recipient: RecipientRecord
) -> Counter[tuple[str, bool]]:
    """The state events one recipient fired, by (kind, recipient confirmed)."""
    address = str(recipient.address)
    return Counter(
        {
            (kind, confirmed): n
            for (t, a, kind, confirmed), n in fired.items()
            if (t, a) == (tracking_id, address) and kind in ("delivered", "bounced", "expired")
        }
    )


def check_history(
    recipient: RecipientRecord, fired: Counter[tuple[str, bool]], cancelled: bool
) -> None:
    """The recipient's state and events are what its history gives by the rules.

    When its message was cancelled, the cancel may have come between any two attempts
    (the store does not record it): one of those places must explain what is stored.
    """
    places = range(len(recipient.attempts) + 1) if cancelled else [None]
    # A report ingested before the first recorded answer may have come while the
    # recipient was being sent (it then counts) or before (history only): from which
    # attempt on it was SENDING, if ever, is not recorded either.
    sending: list[int | None] = [None, *range(len(recipient.attempts))]
    outcomes = [
        replay(recipient.attempts, place, expires=expires, sending_from=start)
        for place in places
        for expires in (False, True)
        for start in sending
    ]
    assert (recipient.state, recipient.confirmed, fired) in outcomes, (recipient, fired, outcomes)


def generated_dsns(server: AiosmtpdServer) -> Counter[tuple[str | None, str]]:
    """Per (ENVID, reported recipient), how many generated DSNs the server accepted.

    Each accepted DSN must come from the null reverse-path (RFC 3461 §6.2) and report
    failures only; copies of one DSN (a crash's re-send) count once each.
    """
    counts: Counter[tuple[str | None, str]] = Counter()
    for received in server.messages:
        report = parse_dsn(received.content)
        assert received.mail_from == "", received.mail_from  # the null reverse-path
        assert report.kind is DSNKind.BOUNCE, report
        for item in report.recipients:
            assert item.action is DSNAction.FAILED, item
            counts[report.envid, item.address] += 1
    return counts


# -- 1. ingest_dsn from several threads while run_forever delivers ----------------------------


@attrs.frozen(kw_only=True)
class Plan:
    """What happens to one submitted message."""

    seq: int
    null_sender: bool
    reject: bool
    tempfail: bool
    reports: tuple[tuple[str, DSNAction, int], ...]  # (local part, action, copies)
    cancel: bool


def _plan(seq: int, chooser: random.Random) -> Plan:
    reject = chooser.random() < 0.5
    tempfail = chooser.random() < 0.25
    reports: list[tuple[str, DSNAction, int]] = []
    if chooser.random() < 0.5:
        reports.append(("ok", DSNAction.DELIVERED, chooser.choice((1, 2, 2))))
    if chooser.random() < 0.25:
        reports.append(("ok", DSNAction.FAILED, chooser.choice((1, 2))))
    if chooser.random() < 0.2:
        reports.append(("ok", DSNAction.DELAYED, 1))
    if reject and chooser.random() < 0.3:
        action = chooser.choice((DSNAction.DELIVERED, DSNAction.FAILED))
        reports.append(("reject", action, chooser.choice((1, 2))))
    if tempfail and chooser.random() < 0.5:
        action = chooser.choice((DSNAction.DELIVERED, DSNAction.FAILED, DSNAction.DELAYED))
        reports.append(("tempfail", action, chooser.choice((1, 2))))
    chooser.shuffle(reports)
    return Plan(
        seq=seq,
        null_sender=chooser.random() < 0.15,
        reject=reject,
        tempfail=tempfail,
        reports=tuple(reports),
        cancel=chooser.random() < 0.2,
    )


def _plan_message(plan: Plan) -> tuple[Message, Envelope]:
    to = [f"ok@m{plan.seq}.test"]
    to += [f"{local}@m{plan.seq}.test" for local in ("reject", "tempfail") if getattr(plan, local)]
    message = Message.build(
        sender=SENDER, to=to, subject=f"dsn {plan.seq}", text=f"message {plan.seq}\n"
    )
    sender = None if plan.null_sender else SENDER
    return message, Envelope(sender, [Recipient(address) for address in to])


class Failures:
    """Exceptions raised in the test's threads, for the test thread to report."""

    def __init__(self) -> None:
        self.caught: list[BaseException] = []

    def guard(self, work: Callable[[], object]) -> Callable[[], None]:
        """``work`` as a thread target that keeps what it raises."""

        def target() -> None:
            try:
                work()
            except BaseException as exc:
                self.caught.append(exc)

        return target


def test_dsns_ingested_from_threads_while_run_forever_delivers(
    make_aiosmtpd: AiosmtpdFactory, tmp_path: Path
) -> None:
    count = int(os.environ.get("MAILRELAY_DSN_MESSAGES", "60"))
    chooser = random.Random(SEED)
    plans = [_plan(seq, chooser) for seq in range(count)]
    relay = make_aiosmtpd(starttls=False, auth=False)
    dsn_server = make_aiosmtpd(starttls=False, auth=False)
    tracker, events = _tracker(
        tmp_path / "queue.db",
        relay,
        dsn_server,
        commit_batch=5,
        retry=RetryPolicy(initial=0.1, max_delay=0.2, jitter=0, max_age=MAX_AGE),
    )
    failures = Failures()
    reports: queue.Queue[bytes | None] = queue.Queue()
    cancels: queue.Queue[str | None] = queue.Queue()
    ids: dict[int, str] = {}
    matches: list[DSNMatch] = []
    cancelled: set[str] = set()
    lock = threading.Lock()

    def submit(share: Sequence[Plan]) -> None:
        pick = random.Random(SEED + share[0].seq)
        for plan in share:
            message, envelope = _plan_message(plan)
            tracking_id = tracker.submit(message, envelope)
            with lock:
                ids[plan.seq] = tracking_id
            for local, action, copies in plan.reports:
                raw = _report(message, tracking_id, [f"{local}@m{plan.seq}.test"], action)
                for _ in range(copies):
                    reports.put(raw)  # copies side by side: ingested at the same moment
            if plan.cancel:
                cancels.put(tracking_id)
            time.sleep(pick.uniform(0, 0.01))

    def ingest() -> None:
        for _ in range(10 * count):
            raw = reports.get(timeout=BOUND)
            if raw is None:
                return
            match = tracker.ingest_dsn(raw)
            with lock:
                matches.append(match)

    def cancel() -> None:
        for _ in range(count + 1):
            tracking_id = cancels.get(timeout=BOUND)
            if tracking_id is None:
                return
            if tracker.cancel(tracking_id):
                with lock:
                    cancelled.add(tracking_id)

    stop = threading.Event()
    runner = threading.Thread(target=failures.guard(lambda: tracker.run_forever(stop)))
    submitters = [
        threading.Thread(target=failures.guard(functools.partial(submit, plans[n::2])))
        for n in range(2)
    ]
    ingesters = [threading.Thread(target=failures.guard(ingest)) for _ in range(3)]
    canceller = threading.Thread(target=failures.guard(cancel))
    workers = [*submitters, *ingesters, canceller]
    runner.start()
    for thread in workers:
        thread.start()
    for thread in submitters:
        thread.join(BOUND)
    for _ in ingesters:
        reports.put(None)
    cancels.put(None)
    for thread in workers:
        thread.join(BOUND)
    # Everything is submitted: wait (bounded) until the runner has finished it all,
    # generated DSNs included.
    deadline = time.monotonic() + BOUND
    while tracker.next_due() is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    runner.join(BOUND)
    assert not any(thread.is_alive() for thread in [runner, *workers])
    assert failures.caught == []
    assert tracker.next_due() is None

    fired = events.count()
    matched = Counter(m.tracking_id for m in matches if m.tracking_id is not None)
    reported: set[tuple[str | None, str]] = set()
    for plan in plans:
        tracking_id = ids[plan.seq]
        assert fired[tracking_id, "", "dsn_received", False] == matched[tracking_id]
        record = tracker.status(tracking_id)
        for recipient in record.recipients:
            address = str(recipient.address)
            mine = _events_of(fired, tracking_id, recipient)
            check_history(recipient, mine, tracking_id in cancelled)
            # At most one final answer by the relay: no lease was lost, nothing sent twice.
            answers = [a.code for a in recipient.attempts if a.source == "reply"]
            assert sum(1 for code in answers if not 400 <= (code or 0) < 500) <= 1, recipient
            failed_by_reply = any(
                e.kind.value in ("bounced", "expired")
                and e.tracking_id == tracking_id
                and e.recipient is not None
                and e.recipient.address == recipient.address
                and e.attempt is not None
                and e.attempt.source == "reply"
                for e in events.fired
            )
            if failed_by_reply and not plan.null_sender:
                reported.add((tracking_id, address))
    # One generated DSN for each recipient an attempt bounced (not for one a returned
    # report bounced, nor for a message from the null reverse-path), and no other.
    assert generated_dsns(dsn_server) == Counter(dict.fromkeys(reported, 1))
    # The generated DSNs are tracked messages, all sent.
    notifications = [r for r in tracker.find() if r.notification]
    assert len(notifications) == len(dsn_server.messages)
    assert {r.state for n in notifications for r in n.recipients} <= {State.DELIVERED}
    tracker.close()


# -- 2. generated DSNs, the runner killed with SIGKILL at random moments ----------------------

#: Messages claimed at once by the crash children: with the default commit_batch (50), the
#: most results awaiting their commit, so the most transactions one kill re-sends.
BATCH_SIZE = 10
LEASE_SECONDS = 1.0
ROOT = Path(__file__).resolve().parents[2]


def crash_plan(seq: int) -> tuple[str | None, list[str]]:
    """Message ``seq``'s envelope sender and recipients, the same in the child and the test.

    Each recipient's domain names its message, so a DSN's recipients say what it is about;
    ``reject@`` bounces at the relay, ``tempfail@`` is refused for now until it expires.
    The sender is the null reverse-path for some (no report then), and for some a
    mailbox that refuses the reports.
    """
    pick = random.Random(seq)
    to = [f"ok@s{seq}.test"]
    if pick.random() < 0.4:
        to.append(f"reject@s{seq}.test")
    if pick.random() < 0.3:
        to.append(f"tempfail@s{seq}.test")
    roll = pick.random()
    # A report to reject@ is itself refused for good (BOUNCED), one to tempfail@ for now
    # until it expires (EXPIRED), with no report about either.
    if roll < 0.15:
        return None, to
    if roll < 0.3:
        return (REFUSED_SENDER if roll < 0.25 else DEFERRING_SENDER), to
    return SENDER, to


def _crash_tracker(db: str, relay_port: int, dsn_port: int) -> DeliveryTracker:
    def smtp(port: int) -> SMTPTransport:
        return SMTPTransport("127.0.0.1", port, tls=TLS.NONE, timeouts=Timeouts.all(10))

    return DeliveryTracker(
        smtp(relay_port),
        SQLiteStore(db),
        dsn_transport=smtp(dsn_port),
        reporting_mta=REPORTING_MTA,
        retry=RetryPolicy(initial=0.1, max_delay=0.2, jitter=0, max_age=MAX_AGE),
        lease=dt.timedelta(seconds=LEASE_SECONDS),
        worker_id=f"dsn-crash-{os.getpid()}",
        batch_size=BATCH_SIZE,
    )


def _drain(tracker: DeliveryTracker, bound: float) -> None:
    """Run until nothing is left to do (retries, expiries, reports), within ``bound`` s."""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        tracker.run_pending()
        due = tracker.next_due()
        if due is None:
            return
        wait = (due - dt.datetime.now(dt.UTC)).total_seconds()
        time.sleep(min(0.5, max(0.02, wait)))


def child_work(
    db: str, relay_port: int, dsn_port: int, *, start: int, count: int, ack: str
) -> None:
    """Submit ``count`` messages, sending what is due after every five, then drain."""
    tracker = _crash_tracker(db, relay_port, dsn_port)
    with open(ack, "a", buffering=1, encoding="ascii") as acks:
        for seq in range(start, start + count):
            sender, to = crash_plan(seq)
            message = Message.build(sender=SENDER, to=to, subject=f"m {seq}", text=f"{seq}\n")
            tracker.submit(message, Envelope(sender, [Recipient(a) for a in to]))
            acks.write(f"{seq}\n")  # after submit() returned: the message is durable
            if seq % 5 == 4:
                tracker.run_pending()
    _drain(tracker, 60)
    tracker.close()


def child_resume(db: str, relay_port: int, dsn_port: int) -> None:
    """Finish everything left, waiting out dead workers' leases."""
    tracker = _crash_tracker(db, relay_port, dsn_port)
    _drain(tracker, 120)
    tracker.close()


def _spawn(*args: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.tracker.test_dsn_concurrency", *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _acked(path: Path) -> list[int]:
    if not path.exists():
        return []
    return [int(line) for line in path.read_text(encoding="ascii").split("\n") if line.strip()]


def check_generated(dsn_server: AiosmtpdServer, db: Path, interruptions: int, batch: int) -> int:
    """Each bounce or expiry has exactly one generated DSN at ``dsn_server``, and no other.

    ``db`` is the store, read once everything is done. A report to a sender that refuses
    it is generated and stored, not received, and BOUNCED (or EXPIRED, when refused for
    now).

    Copies of one DSN (the same Message-ID) arrive only when it was in flight at one of
    the ``interruptions`` (kills or cancels): at most one more each, and at most
    ``batch`` in all for each. Returns how many copies arrived.
    """
    store = SQLiteStore(db)
    try:
        records = store.find()
        refused = [
            parse_dsn(store.content(record.id))
            for record in records
            if record.notification and record.recipients[0].state is not State.DELIVERED
        ]
    finally:
        store.close()
    distinct: dict[bytes, Counter[str]] = {}
    copies = Counter[bytes]()
    for received in dsn_server.messages:
        message = Message.from_bytes(received.content)
        key = (message.message_id or "").encode()
        copies[key] += 1
        report = parse_dsn(received.content)
        assert received.mail_from == "", received.mail_from  # the null reverse-path
        assert report.kind is DSNKind.BOUNCE, report
        distinct[key] = Counter(item.address for item in report.recipients)
    reported = Counter[str]()
    for counted in distinct.values():
        reported.update(counted)
    expected: set[str] = set()
    refused_reports = 0
    for record in records:
        if record.notification:
            # The generated DSNs themselves: sent, or refused for good, and none
            # reported in turn (they are from the null reverse-path).
            to = str(record.envelope.recipients[0].address)
            wanted = {REFUSED_SENDER: State.BOUNCED, DEFERRING_SENDER: State.EXPIRED}.get(
                to, State.DELIVERED
            )
            assert {r.state for r in record.recipients} == {wanted}, record
            assert record.envelope.sender is None, record
            continue
        sender = record.envelope.sender
        for recipient in record.recipients:
            failed = recipient.state in (State.BOUNCED, State.EXPIRED)
            # Bounced by a returned report (ingested for ok@ only): none is generated.
            by_report = any(_dsn_action(a) == "failed" for a in recipient.attempts)
            if failed and not by_report and sender is not None:
                if str(sender) not in (REFUSED_SENDER, DEFERRING_SENDER):
                    expected.add(str(recipient.address))
                else:
                    refused_reports += 1
    assert reported == Counter(dict.fromkeys(expected, 1)), (
        sorted(set(reported) ^ expected),
        {a: n for a, n in reported.items() if n > 1},
    )
    # Each report refused by its recipient was generated and stored all the same.
    assert sum(len(report.recipients) for report in refused) == refused_reports
    extra = sum(copies.values()) - len(copies)
    assert extra <= interruptions * batch, (extra, interruptions)
    assert all(n <= 1 + interruptions for n in copies.values()), copies
    return extra


def check_final(records: Sequence[MessageRecord]) -> None:
    """Each application recipient ended as its address says: delivered, bounced, expired.

    A delivered one then bounced by a returned failure report (after relay) is BOUNCED.
    """
    wanted = {"ok": State.DELIVERED, "reject": State.BOUNCED, "tempfail": State.EXPIRED}
    for record in records:
        if record.notification:
            continue
        for recipient in record.recipients:
            states = {wanted[recipient.address.local_part]}
            accepted = False  # a server took it: reports count from here on
            for attempt in recipient.attempts:
                if attempt.source == "reply" and (attempt.code or 0) < 300:
                    accepted = True
                elif _dsn_action(attempt) == "failed":
                    # Before a recorded acceptance a report counts only if the recipient
                    # was SENDING when it came (which the history does not record).
                    states = {State.BOUNCED} if accepted else states | {State.BOUNCED}
            assert recipient.state in states, recipient


def test_generated_dsns_survive_sigkill_at_random_moments(
    make_aiosmtpd: AiosmtpdFactory, tmp_path: Path
) -> None:
    runs = int(os.environ.get("MAILRELAY_DSN_CRASH_RUNS", "3"))
    count = int(os.environ.get("MAILRELAY_DSN_CRASH_COUNT", "80"))
    chooser = random.Random(SEED)
    relay = make_aiosmtpd(starttls=False, auth=False)
    dsn_server = make_aiosmtpd(starttls=False, auth=False)
    db = str(tmp_path / "queue.db")
    ack = tmp_path / "acked.txt"
    kills = 0
    for run in range(runs):
        child = _spawn("work", db, relay.port, dsn_server.port, run * count, count, ack)
        before = len(_acked(ack))
        deadline = time.monotonic() + BOUND
        while len(_acked(ack)) == before and child.poll() is None:
            assert time.monotonic() < deadline, "the child never submitted anything"
            time.sleep(0.02)
        time.sleep(chooser.uniform(0.05, 1.2))
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            kills += 1
        _out, err = child.communicate(timeout=BOUND * 2)
        assert child.returncode in (0, -signal.SIGKILL), err.decode(errors="replace")
    resume = _spawn("resume", db, relay.port, dsn_server.port)
    _out, err = resume.communicate(timeout=BOUND * 4)
    assert resume.returncode == 0, err.decode(errors="replace")

    store = SQLiteStore(db)
    try:
        records = store.find()
    finally:
        store.close()
    context = f"seed={SEED} kills={kills} records={len(records)}"
    assert kills >= 1, context  # a crash test that never crashed tests nothing
    domains = {r.address.domain for record in records for r in record.recipients}
    assert {f"s{seq}.test" for seq in _acked(ack)} <= domains, context  # nothing lost
    check_final(records)
    # A kill re-sends at most one claim batch's transactions, generated DSNs included.
    copies = check_generated(dsn_server, Path(db), kills, BATCH_SIZE)
    print(context, f"generated={len(dsn_server.messages)} copies={copies}")
    assert any(r.notification for r in records), context  # some DSN was generated


# -- 3. the async runner's generated DSNs, its task cancelled at random moments --------------


def test_async_generated_dsns_survive_cancellation_at_random_moments(
    make_aiosmtpd: AiosmtpdFactory, tmp_path: Path
) -> None:
    cancels = int(os.environ.get("MAILRELAY_DSN_CANCELS", "12"))
    count = int(os.environ.get("MAILRELAY_DSN_MESSAGES", "60"))
    chooser = random.Random(SEED)
    relay = make_aiosmtpd(starttls=False, auth=False)
    dsn_server = make_aiosmtpd(starttls=False, auth=False)
    events = Events()
    commit_batch = 5

    def smtp(server: AiosmtpdServer) -> AsyncSMTPTransport:
        return AsyncSMTPTransport(server.host, server.port, tls=TLS.NONE, timeouts=Timeouts.all(10))

    async def scenario() -> tuple[list[MessageRecord], int]:
        tracker = AsyncDeliveryTracker(
            smtp(relay),
            SQLiteStore(tmp_path / "queue.db"),
            dsn_transport=smtp(dsn_server),
            reporting_mta=REPORTING_MTA,
            retry=RetryPolicy(initial=0.1, max_delay=0.2, jitter=0, max_age=MAX_AGE),
            commit_batch=commit_batch,
        )
        for kind in ("delivered", "bounced", "expired"):
            tracker.on(kind, events.record)
        interrupted = 0
        for round_ in range(cancels):
            items = []
            for seq in range(round_ * count // cancels, (round_ + 1) * count // cancels):
                sender, to = crash_plan(seq)
                message = Message.build(sender=SENDER, to=to, subject=f"m {seq}", text="x\n")
                items.append((message, Envelope(sender, [Recipient(a) for a in to])))
            ids = await tracker.asubmit_many(items)
            task = asyncio.create_task(tracker.arun_pending(concurrency=3))
            # Returned reports about the ok@ recipients, while the runner works: some
            # twice at once, some of their tasks cancelled too.
            ingests = []
            for tracking_id, (message, envelope) in zip(ids, items, strict=True):
                ok = str(envelope.recipients[0].address)
                for action in (DSNAction.DELIVERED, DSNAction.FAILED):
                    if chooser.random() < (0.5 if action is DSNAction.DELIVERED else 0.2):
                        raw = _report(message, tracking_id, [ok], action)
                        for _ in range(chooser.choice((1, 2))):
                            ingests.append(asyncio.create_task(tracker.aingest_dsn(raw)))
            await asyncio.sleep(chooser.uniform(0, 0.03))
            interrupted += task.cancel()
            for ingest in ingests:
                if chooser.random() < 0.2:
                    ingest.cancel()
            done, _ = await asyncio.wait([task, *ingests], timeout=BOUND)
            assert len(done) == 1 + len(ingests), "a cancelled task did not end"
            for ended in done:
                if not ended.cancelled():
                    assert ended.exception() is None
            # A cancelled run leaves nothing leased (docs/tracker.md, Durability).
            leased = [
                r
                for record in await tracker.afind()
                for r in record.recipients
                if r.lease_owner is not None
            ]
            assert leased == []
        deadline = time.monotonic() + BOUND
        while time.monotonic() < deadline:
            await tracker.arun_pending()
            due = await tracker.anext_due()
            if due is None:
                break
            wait = (due - dt.datetime.now(dt.UTC)).total_seconds()
            await asyncio.sleep(min(0.5, max(0.02, wait)))
        assert await tracker.anext_due() is None
        records = await tracker.afind()
        await tracker.aclose()
        return records, interrupted

    records, interrupted = asyncio.run(scenario())
    context = f"seed={SEED} interrupted={interrupted} records={len(records)}"
    check_final(records)
    # Only what was in flight at a cancel goes again: at most commit_batch a cancel.
    copies = check_generated(dsn_server, tmp_path / "queue.db", interrupted, commit_batch)
    print(context, f"generated={len(dsn_server.messages)} copies={copies}")
    # Each application recipient's final event fired exactly once, none for a report.
    fired = events.count()
    final = {State.DELIVERED: "delivered", State.BOUNCED: "bounced", State.EXPIRED: "expired"}
    for record in records:
        for recipient in record.recipients:
            if recipient.address.local_part == "ok" and not record.notification:
                # With reports about it: what its history gives by the rules.
                check_history(recipient, _events_of(fired, record.id, recipient), False)
                continue
            mine = {
                kind: fired[record.id, str(recipient.address), kind, False]
                for kind in final.values()
            }
            wanted = dict.fromkeys(final.values(), 0)
            if not record.notification:
                wanted[final[recipient.state]] = 1
            assert mine == wanted, (context, recipient, mine)


if __name__ == "__main__":
    if sys.argv[1] == "work":
        child_work(
            sys.argv[2],
            int(sys.argv[3]),
            int(sys.argv[4]),
            start=int(sys.argv[5]),
            count=int(sys.argv[6]),
            ack=sys.argv[7],
        )
    else:
        child_resume(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
