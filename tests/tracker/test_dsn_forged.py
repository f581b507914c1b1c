"""A delivery report counts only for a recipient a server took the message for.

Anyone who saw a message knows its Message-ID (and its ENVID, which the tracker sets to the
tracking id), so anyone can forge a report about it. A report that made a recipient never
sent DELIVERED or BOUNCED would lose its mail: such a report is history only, and the
recipient is still sent. A recipient accepted by a server (DELIVERED, or a 2xx in its
history after a lost lease) or being sent (SENDING) takes reports as before.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailrelay.reply import Reply
from mailrelay.tracker.dsn import DSNAction, DSNRecipient
from mailrelay.tracker.dsn_build import build_dsn
from mailrelay.tracker.engine import DeliveryTracker
from mailrelay.tracker.sqlite_store import SQLiteStore
from mailrelay.tracker.store import Attempt, Change, MemoryStore, State, Store
from mailrelay.transport.memory import MemoryTransport
from tests.tracker.test_engine import FakeClock, message, scripted


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    made: Store = MemoryStore() if request.param == "memory" else SQLiteStore(tmp_path / "t.db")
    yield made
    made.close()


def report(tracker: DeliveryTracker, tracking_id: str, action: DSNAction) -> bytes:
    return build_dsn(
        original=tracker.store.content(tracking_id),
        envelope_sender="sender@example.com",
        recipients=[
            DSNRecipient(
                address="a@example.org",
                action=action,
                status="2.0.0" if action is DSNAction.DELIVERED else "5.1.1",
                remote_mta="mx.forger.example",
            )
        ],
        reporting_mta="mx.forger.example",
        envid=tracking_id,
    )


@pytest.mark.parametrize("action", [DSNAction.DELIVERED, DSNAction.FAILED])
@pytest.mark.parametrize("deferred", [False, True], ids=["queued", "deferred"])
def test_a_report_about_a_recipient_never_accepted_changes_nothing(
    store: Store, action: DSNAction, deferred: bool
) -> None:
    clock = FakeClock()
    answers = [{"a@example.org": Reply.of(451, "4.3.0 try later")}] if deferred else []
    transport = MemoryTransport(scripted(*answers))
    tracker = DeliveryTracker(transport, store, clock=clock, request_dsn=True)
    tracking_id = tracker.submit(message(("a@example.org",)))
    if deferred:
        tracker.run_pending()
    before = tracker.status(tracking_id).recipients[0]
    assert before.state is (State.DEFERRED if deferred else State.QUEUED)

    match = tracker.ingest_dsn(report(tracker, tracking_id, action))
    assert match.tracking_id == tracking_id
    assert match.changed == ()
    after = tracker.status(tracking_id).recipients[0]
    assert (after.state, after.confirmed) == (before.state, before.confirmed)
    assert after.attempts[-1].source == "dsn"  # kept in the history

    # The recipient is still sent, and its own answer decides.
    clock.advance(86400)
    tracker.run_pending()
    final = tracker.status(tracking_id).recipients[0]
    assert final.state is State.DELIVERED
    assert not final.confirmed
    # Sent once more after the report (the outbox records every attempt).
    assert len(transport.outbox) == (2 if deferred else 1)


@pytest.mark.parametrize(
    ("action", "state", "confirmed"),
    [(DSNAction.DELIVERED, State.DELIVERED, True), (DSNAction.FAILED, State.BOUNCED, False)],
)
def test_a_report_about_an_accepted_recipient_counts(
    store: Store, action: DSNAction, state: State, confirmed: bool
) -> None:
    tracker = DeliveryTracker(MemoryTransport(), store, clock=FakeClock(), request_dsn=True)
    tracking_id = tracker.submit(message(("a@example.org",)))
    tracker.run_pending()
    assert tracker.status(tracking_id).recipients[0].state is State.DELIVERED
    match = tracker.ingest_dsn(report(tracker, tracking_id, action))
    assert [str(a) for a in match.changed] == ["a@example.org"]
    after = tracker.status(tracking_id).recipients[0]
    assert (after.state, after.confirmed) == (state, confirmed)


def test_a_report_about_a_recipient_being_sent_counts(store: Store) -> None:
    # Claimed (SENDING): the report may come back before the attempt's answer is recorded.
    tracker = DeliveryTracker(MemoryTransport(), store, clock=FakeClock(), request_dsn=True)
    tracking_id = tracker.submit(message(("a@example.org",)))
    claimed = store.claim(worker="w1", now=tracker.clock(), lease=dt.timedelta(minutes=5), limit=10)
    assert len(claimed) == 1
    assert tracker.status(tracking_id).recipients[0].state is State.SENDING
    match = tracker.ingest_dsn(report(tracker, tracking_id, DSNAction.DELIVERED))
    assert [str(a) for a in match.changed] == ["a@example.org"]
    after = tracker.status(tracking_id).recipients[0]
    assert (after.state, after.confirmed) == (State.DELIVERED, True)


def test_a_lost_lease_keeps_the_acceptance_a_report_can_confirm(store: Store) -> None:
    # Another worker deferred the recipient after the first one's server took the message:
    # that 2xx is in the history, so the destination's report counts.
    tracker = DeliveryTracker(MemoryTransport(), store, clock=FakeClock(), request_dsn=True)
    tracking_id = tracker.submit(message(("a@example.org",)))
    record = tracker.status(tracking_id)
    now = tracker.clock()
    accepted = Attempt(at=now, host="mx.example.org:25", code=250, text="ok", source="reply")
    store.apply(
        tracking_id,
        [
            Change(
                address=record.recipients[0].address,
                state=State.DEFERRED,
                attempt=accepted,
                next_attempt_at=now + dt.timedelta(hours=1),
            )
        ],
    )
    assert tracker.status(tracking_id).recipients[0].state is State.DEFERRED
    match = tracker.ingest_dsn(report(tracker, tracking_id, DSNAction.DELIVERED))
    assert [str(a) for a in match.changed] == ["a@example.org"]
    assert tracker.status(tracking_id).recipients[0].state is State.DELIVERED
