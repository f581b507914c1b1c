"""Delay warnings: the tracker tells the sender once that a message is waiting (RFC 3464).

With ``delay_warning_after``, a recipient deferred when its message is at least that old
is reported to the envelope sender in one ``Action: delayed`` report, with
``Will-Retry-Until``: at most once per recipient, queued in the very commit that records
the deferral and the recipient's ``delay_warned`` mark. These tests check the decision
(table-driven), both trackers with a scripted transport and through real SMTP to aiosmtpd
(a recipient answered 450), every store, and a crash on either side of the commit.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import ssl
from collections.abc import Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailrelay.address import Address
from mailrelay.envelope import Envelope, Recipient
from mailrelay.message import Message
from mailrelay.options import Timeouts
from mailrelay.reply import Reply
from mailrelay.results import DeliveryResult, Outcome, RecipientResult
from mailrelay.tracker.async_engine import AsyncDeliveryTracker
from mailrelay.tracker.dsn import DSNAction, DSNKind, DSNReport
from mailrelay.tracker.dsn_parse import parse_dsn
from mailrelay.tracker.engine import DeliveryTracker
from mailrelay.tracker.events import EventKind, TrackerEvent
from mailrelay.tracker.retry import RetryPolicy
from mailrelay.tracker.sqlite_store import SQLiteStore
from mailrelay.tracker.store import (
    Change,
    FollowUp,
    MemoryStore,
    MessageRecord,
    RecipientRecord,
    State,
    Store,
    queued_record,
)
from mailrelay.tracker.transitions import from_result, wants_delay_warning
from mailrelay.transport import AsyncSMTPTransport, SMTPTransport
from mailrelay.transport.memory import MemoryTransport
from tests.peers.aiosmtpd_server import AiosmtpdServer
from tests.tracker.test_engine import T0, FakeClock, no_jitter

R = TypeVar("R")
SENDER = "sender@example.com"
HOUR = dt.timedelta(hours=1)
#: Tries at T0, T0+30m, T0+1h30m, T0+3h30m (deferred), then T0+4h, the deadline: expired.
RETRY = RetryPolicy(initial=1800, max_age=4 * 3600)
#: The tests' delay_warning_after: the try at T0+1h30m is the first one past it.
AFTER = HOUR
DEADLINE = T0 + 4 * HOUR
#: The aiosmtpd test server's answer to ``tempfail@``.
TEMPFAIL = Reply.of(450, "4.2.1 Mailbox temporarily unavailable (test)")


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


def message(*to: str) -> Message:
    return Message.build(sender=SENDER, to=list(to), subject="hello", text="hi\n")


def deferring(*addresses: str, reply: Reply = TEMPFAIL) -> MemoryTransport:
    """A transport that defers ``addresses`` with ``reply`` every time and takes the rest."""
    refused = {Address.parse(a) for a in addresses}
    return MemoryTransport(
        lambda _m, e: {r.address: reply for r in e.recipients if r.address in refused}
    )


def warnings(outbox: Sequence[Any]) -> list[DSNReport]:
    return [
        report
        for sent in outbox
        if (report := parse_dsn(sent.message.as_bytes())).kind is DSNKind.DELAY
    ]


def bounces(outbox: Sequence[Any]) -> list[DSNReport]:
    return [
        report
        for sent in outbox
        if (report := parse_dsn(sent.message.as_bytes())).kind is DSNKind.BOUNCE
    ]


def check_warning(report: DSNReport, addresses: Sequence[str], *, envid: str | None = None) -> None:
    """A delay report about ``addresses``, field by field (RFC 3464 §2.2, §2.3)."""
    assert report.kind is DSNKind.DELAY
    assert report.envid == envid
    assert report.reporting_mta == "relay.example.com"
    assert report.arrival_date is not None
    assert email.utils.parsedate_to_datetime(report.arrival_date) == T0
    assert [r.address for r in report.recipients] == list(addresses)
    for recipient in report.recipients:
        assert recipient.action is DSNAction.DELAYED
        assert recipient.status == "4.2.1"  # the last transient status
        assert recipient.reply_code == 450
        assert "Mailbox temporarily unavailable" in (recipient.diagnostic or "")
        assert recipient.is_permanent is False
        assert recipient.will_retry_until is not None
        # RFC 3464 §2.3.9: when the tracker gives up, the retry policy's deadline.
        assert email.utils.parsedate_to_datetime(recipient.will_retry_until) == DEADLINE
        assert recipient.last_attempt_date is not None


def make(
    transport: MemoryTransport,
    store: Store,
    clock: FakeClock,
    dsn_out: MemoryTransport,
    **options: Any,
) -> DeliveryTracker:
    options.setdefault("delay_warning_after", AFTER)
    return DeliveryTracker(
        transport,
        store,
        clock=clock,
        random=no_jitter,
        retry=RETRY,
        dsn_transport=dsn_out,
        reporting_mta="relay.example.com",
        **options,
    )


def run_until_done(tracker: DeliveryTracker, clock: FakeClock, *, until: dt.datetime) -> None:
    """Run every attempt due up to ``until``, moving the clock to each due time."""
    for _ in range(20):
        tracker.run_pending()
        due = tracker.next_due()
        if due is None or due > until:
            return
        clock.now = max(clock.now, due)
    raise AssertionError("the tracker did not settle")


# -- the decision -----------------------------------------------------------------------


def _record(
    envelope: Envelope, *, warned: bool = False, created: dt.datetime = T0
) -> MessageRecord:
    record = queued_record(
        id="m1",
        created_at=created,
        envelope=envelope,
        message_id=None,
        size=1,
        addresses=[r.address for r in envelope.recipients],
    )
    recipients = tuple(attrs.evolve(r, delay_warned=warned) for r in record.recipients)
    return attrs.evolve(record, recipients=recipients)


@pytest.mark.parametrize(
    ("age", "notify", "sender", "warned", "expected"),
    [
        (2 * HOUR, None, SENDER, False, True),  # the threshold itself: due
        (3 * HOUR, None, SENDER, False, True),
        (2 * HOUR - dt.timedelta(microseconds=1), None, SENDER, False, False),  # not yet
        (3 * HOUR, None, SENDER, True, False),  # warned already: once ever
        (3 * HOUR, None, None, False, False),  # RFC 3461 §6.2: null reverse-path
        (3 * HOUR, "DELAY", SENDER, False, True),  # RFC 3461 §4.1
        (3 * HOUR, "FAILURE,DELAY", SENDER, False, True),
        (3 * HOUR, "SUCCESS,DELAY", SENDER, False, True),
        (3 * HOUR, "FAILURE", SENDER, False, False),  # DELAY not asked for
        (3 * HOUR, "SUCCESS,FAILURE", SENDER, False, False),
        (3 * HOUR, "NEVER", SENDER, False, False),
    ],
)
def test_when_a_deferral_calls_for_a_delay_warning(
    age: dt.timedelta, notify: str | None, sender: str | None, warned: bool, expected: bool
) -> None:
    envelope = Envelope(sender, [Recipient("a@example.org", notify=notify)])
    record = _record(envelope, warned=warned)
    (recipient,) = record.recipients
    assert wants_delay_warning(record, recipient, now=T0 + age, after=2 * HOUR) is expected


def _result(outcome: Outcome, reply: Reply) -> DeliveryResult:
    address = Address.parse("a@example.org")
    return DeliveryResult(
        recipients=(RecipientResult(address=address, outcome=outcome, reply=reply),)
    )


@pytest.mark.parametrize(
    ("outcome", "reply", "age", "after", "state", "warned"),
    [
        (Outcome.TRANSIENT, TEMPFAIL, 3 * HOUR, 2 * HOUR, State.DEFERRED, True),
        (Outcome.TRANSIENT, TEMPFAIL, HOUR, 2 * HOUR, State.DEFERRED, None),
        (Outcome.TRANSIENT, TEMPFAIL, 3 * HOUR, None, State.DEFERRED, None),  # off
        # An already-late first deferral is warned about at once.
        (Outcome.TRANSIENT, TEMPFAIL, dt.timedelta(0), dt.timedelta(0), State.DEFERRED, True),
        # At the deadline the recipient expires: a failure report, not a warning.
        (Outcome.TRANSIENT, TEMPFAIL, 4 * HOUR, 2 * HOUR, State.EXPIRED, None),
        (Outcome.PERMANENT, Reply.of(550, "5.1.1 no"), 3 * HOUR, 2 * HOUR, State.BOUNCED, None),
        (Outcome.ACCEPTED, Reply.of(250, "2.0.0 ok"), 3 * HOUR, 2 * HOUR, State.DELIVERED, None),
    ],
)
def test_the_deferral_carries_the_delay_warned_mark(
    outcome: Outcome,
    *,
    reply: Reply,
    age: dt.timedelta,
    after: dt.timedelta | None,
    state: State,
    warned: bool | None,
) -> None:
    envelope = Envelope(SENDER, ["a@example.org"])
    record = _record(envelope)
    decision = from_result(
        record,
        envelope.recipients,
        _result(outcome, reply),
        now=T0 + age,
        retry=RETRY,
        random=no_jitter,
        delay_warning_after=after,
    )
    (change,) = decision.changes
    assert (change.state, change.delay_warned) == (state, warned)


def test_the_setting_needs_a_dsn_transport_and_a_non_negative_time() -> None:
    with pytest.raises(ValueError, match="dsn_transport"):
        DeliveryTracker(MemoryTransport(), MemoryStore(), delay_warning_after=HOUR)
    with pytest.raises(ValueError, match="negative"):
        DeliveryTracker(
            MemoryTransport(),
            MemoryStore(),
            dsn_transport=MemoryTransport(),
            delay_warning_after=-HOUR,
        )


# -- the sync tracker, every store --------------------------------------------------------


def test_one_warning_after_the_threshold_then_the_failure_report(store: Store) -> None:
    dsn_out = MemoryTransport()
    clock = FakeClock()
    tracker = make(deferring("a@example.org"), store, clock, dsn_out)
    seen: list[TrackerEvent] = []
    for kind in EventKind:
        tracker.on(kind, seen.append)
    tracking_id = tracker.submit(message("a@example.org", "b@example.net"))
    run_until_done(tracker, clock, until=T0 + 3 * HOUR)
    # Tried at T0 and T0+30m (too young), warned with the deferral at T0+1h30m.
    recipient = tracker.status(tracking_id).recipient("a@example.org")
    assert (recipient.state, len(recipient.attempts)) == (State.DEFERRED, 3)
    assert recipient.attempts[-1].at == T0 + 1.5 * HOUR
    assert recipient.delay_warned is True
    assert tracker.status(tracking_id).recipient("b@example.net").delay_warned is False
    (warning,) = warnings(dsn_out.outbox)
    check_warning(warning, ["a@example.org"])
    sent = dsn_out.outbox[0]
    assert sent.envelope.sender is None  # RFC 3461 §6.2: from the null reverse-path
    assert [str(r.address) for r in sent.envelope.recipients] == [SENDER]
    raw = sent.message.as_bytes()
    assert b"is delayed" in raw
    # The text says until when (its lines are wrapped: compare the words).
    words = " ".join(raw.decode().split())
    assert "(retried until Sun, 01 Mar 2026 12:00:00 +0000)" in words
    assert b"Subject: Delivery Status Notification (Delay)" in raw
    # RFC 3464 §2.3.6: one diagnostic-type, then the reply.
    assert b"Diagnostic-Code: smtp; 450 4.2.1 Mailbox temporarily unavailable" in raw
    # A later deferral (T0+3h30m) sends no second warning.
    run_until_done(tracker, clock, until=T0 + 3.75 * HOUR)
    recipient = tracker.status(tracking_id).recipient("a@example.org")
    assert (recipient.state, len(recipient.attempts)) == (State.DEFERRED, 4)
    assert len(warnings(dsn_out.outbox)) == 1
    # The deadline: the recipient expires, and its failure report still goes out; no
    # second warning.
    run_until_done(tracker, clock, until=DEADLINE + HOUR)
    assert tracker.status(tracking_id).recipient("a@example.org").state is State.EXPIRED
    assert len(warnings(dsn_out.outbox)) == 1
    (bounce,) = bounces(dsn_out.outbox)
    assert [(r.address, r.action) for r in bounce.recipients] == [
        ("a@example.org", DSNAction.FAILED)
    ]
    # Generated reports fire no events: only the application's message's.
    assert {e.tracking_id for e in seen} == {tracking_id}
    assert [e.kind for e in seen].count(EventKind.DEFERRED) == 4


def test_recipients_crossing_the_threshold_together_share_one_warning(store: Store) -> None:
    dsn_out = MemoryTransport()
    clock = FakeClock()
    tracker = make(
        deferring("a@example.org", "b@example.net", "c@example.net"), store, clock, dsn_out
    )
    envelope = Envelope(
        SENDER,
        [
            "a@example.org",
            Recipient("b@example.net", notify="FAILURE"),  # asks for no delay report
            Recipient("c@example.net", notify="DELAY", orcpt="c.original@example.net"),
        ],
        envid="order-1",
    )
    tracking_id = tracker.submit(
        message("a@example.org", "b@example.net", "c@example.net"), envelope
    )
    run_until_done(tracker, clock, until=T0 + 3 * HOUR + dt.timedelta(minutes=30))
    (warning,) = warnings(dsn_out.outbox)
    check_warning(warning, ["a@example.org", "c@example.net"], envid="order-1")
    assert "c.original@example.net" in (warning.recipients[1].original_recipient or "")
    record = tracker.status(tracking_id)
    assert [r.delay_warned for r in record.recipients] == [True, False, True]


def test_a_recipient_already_late_at_its_first_deferral_is_warned_then(store: Store) -> None:
    dsn_out = MemoryTransport()
    clock = FakeClock()
    tracker = make(deferring("a@example.org"), store, clock, dsn_out)
    tracking_id = tracker.submit(message("a@example.org"))
    clock.now = T0 + 3 * HOUR  # the runner was down: the first try is late
    tracker.run_pending()
    (recipient,) = tracker.status(tracking_id).recipients
    assert (recipient.state, len(recipient.attempts), recipient.delay_warned) == (
        State.DEFERRED,
        1,
        True,
    )
    (warning,) = warnings(dsn_out.outbox)
    check_warning(warning, ["a@example.org"])


@pytest.mark.parametrize(
    "envelope",
    [
        Envelope(None, ["a@example.org"]),  # RFC 3461 §6.2: never to the null reverse-path
        Envelope(SENDER, [Recipient("a@example.org", notify="NEVER")]),
        Envelope(SENDER, [Recipient("a@example.org", notify="FAILURE")]),
    ],
)
def test_no_warning_when_none_may_be_sent(store: Store, envelope: Envelope) -> None:
    dsn_out = MemoryTransport()
    clock = FakeClock()
    tracker = make(deferring("a@example.org"), store, clock, dsn_out)
    tracking_id = tracker.submit(message("a@example.org"), envelope)
    run_until_done(tracker, clock, until=T0 + 3 * HOUR + dt.timedelta(minutes=30))
    (recipient,) = tracker.status(tracking_id).recipients
    assert (recipient.state, recipient.delay_warned) == (State.DEFERRED, False)
    assert warnings(dsn_out.outbox) == []


def test_off_by_default(store: Store) -> None:
    dsn_out = MemoryTransport()
    clock = FakeClock()
    tracker = make(deferring("a@example.org"), store, clock, dsn_out, delay_warning_after=None)
    tracker.submit(message("a@example.org"))
    run_until_done(tracker, clock, until=DEADLINE + HOUR)
    assert warnings(dsn_out.outbox) == []
    assert len(bounces(dsn_out.outbox)) == 1


_ANSWERS = {"450": TEMPFAIL, "250": Reply.of(250, "2.0.0 ok"), "550": Reply.of(550, "5.1.1 no")}


@settings(max_examples=40, deadline=None)
@given(
    answers=st.lists(
        st.lists(st.sampled_from(["450", "450", "250", "550"]), max_size=6),
        min_size=2,
        max_size=2,
    ),
    lateness=st.lists(st.integers(min_value=0, max_value=90), min_size=8, max_size=8),
    after_minutes=st.integers(min_value=0, max_value=300),
)
def test_a_recipient_is_warned_about_once_exactly_when_deferred_late_enough(
    answers: list[list[str]], lateness: list[int], after_minutes: int
) -> None:
    """Whatever the answers and however late the runner comes: a recipient is warned
    about iff some attempt deferred it (a 450 before the deadline) when the message was at
    least ``delay_warning_after`` old, and then in exactly one report."""
    addresses = ["a@example.org", "b@example.net"]
    queues = {Address.parse(a): list(q) for a, q in zip(addresses, answers, strict=True)}

    def handler(_m: Message, envelope: Envelope) -> dict[Address, Reply]:
        return {
            r.address: _ANSWERS[queues[r.address].pop(0) if queues[r.address] else "450"]
            for r in envelope.recipients
        }

    dsn_out = MemoryTransport()
    clock = FakeClock()
    after = dt.timedelta(minutes=after_minutes)
    tracker = make(
        MemoryTransport(handler), MemoryStore(), clock, dsn_out, delay_warning_after=after
    )
    tracking_id = tracker.submit(message(*addresses))
    for late in lateness:
        tracker.run_pending()
        due = tracker.next_due()
        if due is None:
            break
        clock.now = max(clock.now, due) + dt.timedelta(minutes=late)
    tracker.run_pending()  # the reports queued by the last commit
    warned_in = [r.address for report in warnings(dsn_out.outbox) for r in report.recipients]
    for recipient in tracker.status(tracking_id).recipients:
        late_deferral = any(
            a.code == 450 and a.at - T0 >= after and a.at < DEADLINE for a in recipient.attempts
        )
        assert recipient.delay_warned is late_deferral
        assert warned_in.count(str(recipient.address)) == (1 if late_deferral else 0)


# -- crashes ----------------------------------------------------------------------------


class Killed(BaseException):
    """The process dying at a chosen instant (a BaseException, as SIGKILL spares nothing)."""


class Dies:
    """A store that dies at the first commit that marks a recipient warned: just after it
    (``after=True``) or inside its transaction, once the warning is built (``False``)."""

    def __init__(self, inner: Store, *, after: bool) -> None:
        self.inner = inner
        self.after = after

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def apply_many(
        self,
        batch: Sequence[tuple[str, Sequence[Change]]],
        *,
        worker: str | None = None,
        then: FollowUp | None = None,
    ) -> list[tuple[Address, ...]]:
        warns = any(c.delay_warned for _id, changes in batch for c in changes)
        if warns and not self.after and then is not None:
            inner_then = then

            def dying(changed: Sequence[tuple[Address, ...]]) -> Any:
                inner_then(changed)  # the warning is built...
                raise Killed  # ...and the process dies before the commit

            then = dying
        changed = self.inner.apply_many(batch, worker=worker, then=then)
        if warns:
            raise Killed
        return changed


@pytest.mark.parametrize("after", [True, False])
def test_a_crash_around_the_warnings_commit_neither_loses_nor_repeats_it(
    tmp_path: Path, after: bool
) -> None:
    path = tmp_path / "t.db"
    clock = FakeClock()
    transport = deferring("a@example.org")
    first = make(
        transport,
        Dies(SQLiteStore(path), after=after),  # type: ignore[arg-type]
        clock,
        MemoryTransport(),
        worker_id="first",
    )
    tracking_id = first.submit(message("a@example.org"))
    with pytest.raises(Killed):
        run_until_done(first, clock, until=T0 + 3 * HOUR)
    assert clock.now == T0 + 1.5 * HOUR  # died at the first deferral past the threshold
    # The restarted process: a fresh tracker on the same file, once the dead worker's
    # lease has run out.
    clock.now += dt.timedelta(minutes=16)
    store = SQLiteStore(path)
    dsn_out = MemoryTransport()
    second = make(transport, store, clock, dsn_out, worker_id="second")
    recipient = second.status(tracking_id).recipients[0]
    # Committed with its warning, or not at all (the recipient still leased, unwarned).
    assert recipient.delay_warned is after
    assert recipient.state is (State.DEFERRED if after else State.SENDING)
    run_until_done(second, clock, until=DEADLINE - dt.timedelta(minutes=1))
    (warning,) = warnings(dsn_out.outbox)
    check_warning(warning, ["a@example.org"])
    recipient = second.status(tracking_id).recipients[0]
    assert (recipient.state, recipient.delay_warned) == (State.DEFERRED, True)
    # Exactly one warning stored in all: the one sent.
    notes = [r for r in second.find() if r.notification]
    assert len(notes) == 1
    assert notes[0].recipients[0].state is State.DELIVERED
    store.close()


# -- the async tracker ---------------------------------------------------------------


def test_the_async_tracker_warns_once(store: Store) -> None:
    dsn_out = MemoryTransport()
    clock = FakeClock()
    tracker = AsyncDeliveryTracker(
        deferring("a@example.org"),
        store,
        clock=clock,
        random=no_jitter,
        retry=RETRY,
        dsn_transport=dsn_out,
        reporting_mta="relay.example.com",
        delay_warning_after=AFTER,
    )

    async def scenario() -> str:
        tracking_id = await tracker.asubmit(message("a@example.org"))
        for _ in range(20):
            await tracker.arun_pending()
            due = tracker.next_due()
            if due is None or due > DEADLINE + HOUR:
                break
            clock.now = max(clock.now, due)
        return tracking_id

    tracking_id = run(scenario())
    recipient = tracker.status(tracking_id).recipients[0]
    assert (recipient.state, len(recipient.attempts)) == (State.EXPIRED, 5)
    (warning,) = warnings(dsn_out.outbox)
    check_warning(warning, ["a@example.org"])
    assert len(bounces(dsn_out.outbox)) == 1


# -- through real SMTP: aiosmtpd answers 450 to tempfail@ ---------------------------------


def _smtp(server: AiosmtpdServer) -> dict[str, Any]:
    return {
        "host": server.host,
        "port": server.port,
        "ssl_context": ssl.create_default_context(cafile=str(server.ca_file)),
        "timeouts": Timeouts.all(10),
    }


def _real_message() -> Message:
    return Message.build(
        sender=SENDER,
        to=["tempfail@mailrelay.test", "someone@mailrelay.test"],
        subject="delayed",
        text="hi\n",
    )


def _check_real(record: MessageRecord, dsn_out: MemoryTransport, server: AiosmtpdServer) -> None:
    late, taken = record.recipients
    assert (late.state, late.delay_warned) == (State.DEFERRED, True)
    assert [a.code for a in late.attempts] == [450, 450, 450, 450]
    assert (taken.state, taken.delay_warned) == (State.DELIVERED, False)
    (warning,) = warnings(dsn_out.outbox)
    assert warning.kind is DSNKind.DELAY
    (about,) = warning.recipients
    assert (about.address, about.action, about.status) == (
        "tempfail@mailrelay.test",
        DSNAction.DELAYED,
        "4.2.1",
    )
    assert about.reply_code == 450
    assert about.will_retry_until is not None
    assert email.utils.parsedate_to_datetime(about.will_retry_until) == DEADLINE
    assert about.remote_mta is not None
    assert len(server.messages) == 1  # someone@ got it once; the warning went elsewhere


def test_the_sync_tracker_warns_about_a_real_servers_450(
    aiosmtpd_server: AiosmtpdServer, tmp_path: Path
) -> None:
    store = SQLiteStore(tmp_path / "q.db")
    dsn_out = MemoryTransport()
    clock = FakeClock()
    with SMTPTransport(**_smtp(aiosmtpd_server)) as transport:
        tracker = DeliveryTracker(
            transport,
            store,
            clock=clock,
            random=no_jitter,
            retry=RETRY,
            dsn_transport=dsn_out,
            reporting_mta="relay.example.com",
            delay_warning_after=AFTER,
        )
        tracking_id = tracker.submit(_real_message())
        # T0, T0+30m, T0+1h30m (warned), T0+3h30m (not again); then only the deadline.
        for _ in range(4):
            tracker.run_pending()
            due = tracker.next_due()
            assert due is not None
            if due >= DEADLINE:
                break
            clock.now = due
        _check_real(tracker.status(tracking_id), dsn_out, aiosmtpd_server)
    store.close()


def test_the_async_tracker_warns_about_a_real_servers_450(
    aiosmtpd_server: AiosmtpdServer, tmp_path: Path
) -> None:
    store = SQLiteStore(tmp_path / "q.db")
    dsn_out = MemoryTransport()
    clock = FakeClock()

    async def scenario() -> MessageRecord:
        async with AsyncSMTPTransport(**_smtp(aiosmtpd_server)) as transport:
            tracker = AsyncDeliveryTracker(
                transport,
                store,
                clock=clock,
                random=no_jitter,
                retry=RETRY,
                dsn_transport=dsn_out,
                reporting_mta="relay.example.com",
                delay_warning_after=AFTER,
            )
            tracking_id = await tracker.asubmit(_real_message())
            for _ in range(4):
                await tracker.arun_pending()
                due = tracker.next_due()
                assert due is not None
                if due >= DEADLINE:
                    break
                clock.now = due
            return tracker.status(tracking_id)

    _check_real(run(scenario()), dsn_out, aiosmtpd_server)
    store.close()


def test_the_warned_recipients_record_is_what_the_report_says(store: Store) -> None:
    # The record the report was built from is the committed one: its last attempt is the
    # deferral that crossed the threshold.
    dsn_out = MemoryTransport()
    clock = FakeClock()
    tracker = make(deferring("a@example.org"), store, clock, dsn_out)
    tracking_id = tracker.submit(message("a@example.org"))
    run_until_done(tracker, clock, until=T0 + 3 * HOUR)
    recipient: RecipientRecord = tracker.status(tracking_id).recipients[0]
    (warning,) = warnings(dsn_out.outbox)
    last = recipient.attempts[-1]
    assert last.at == T0 + 1.5 * HOUR
    assert warning.recipients[0].last_attempt_date is not None
    assert email.utils.parsedate_to_datetime(warning.recipients[0].last_attempt_date) == last.at
