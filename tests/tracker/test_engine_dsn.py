"""DeliveryTracker and DSNs: requesting them, generating them, and ingesting returned ones."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

import pytest

from mailrelay.address import Address
from mailrelay.envelope import Envelope, Notify, Recipient, Ret
from mailrelay.errors import ConnectError
from mailrelay.message import Message
from mailrelay.reply import Reply
from mailrelay.results import Outcome
from mailrelay.tracker.dsn import DSNAction, DSNKind, DSNRecipient
from mailrelay.tracker.dsn_build import build_dsn
from mailrelay.tracker.dsn_parse import parse_dsn
from mailrelay.tracker.engine import VERP, DeliveryTracker, DSNRequest
from mailrelay.tracker.events import EventKind, TrackerEvent
from mailrelay.tracker.retry import RetryPolicy
from mailrelay.tracker.sqlite_store import SQLiteStore
from mailrelay.tracker.store import Change, FollowUp, MemoryStore, State, Store
from mailrelay.transport.memory import MemoryTransport
from tests.tracker.test_engine import Answer, FakeClock, message, no_jitter, scripted

SENDER = "sender@example.com"


def make(
    transport: MemoryTransport | None = None,
    *,
    dsn_transport: MemoryTransport | None = None,
    request_dsn: bool | DSNRequest | None = None,
    verp: VERP | None = None,
    retry: RetryPolicy | None = None,
) -> tuple[DeliveryTracker, FakeClock, list[TrackerEvent]]:
    clock = FakeClock()
    tracker = DeliveryTracker(
        transport or MemoryTransport(),
        MemoryStore(),
        clock=clock,
        random=no_jitter,
        dsn_transport=dsn_transport,
        reporting_mta="relay.example.com",
        request_dsn=request_dsn,
        verp=verp,
        retry=retry,
    )
    seen: list[TrackerEvent] = []
    for kind in EventKind:
        tracker.on(kind, seen.append)
    return tracker, clock, seen


# -- requesting DSNs ------------------------------------------------------------------


def test_envelopes_ask_for_dsns_with_the_tracking_id_as_envid() -> None:
    transport = MemoryTransport()
    tracker, _clock, _ = make(transport, request_dsn=True)
    tracking_id = tracker.submit(message())
    tracker.run_pending()
    sent = transport.outbox[0].envelope
    assert sent.envid == tracking_id
    assert sent.ret is Ret.HDRS
    every = frozenset({Notify.SUCCESS, Notify.FAILURE, Notify.DELAY})
    assert all(r.notify == every for r in sent.recipients)
    assert ("ENVID", tracking_id) in sent.mail_parameters()
    assert tracker.status(tracking_id).envelope.envid == tracking_id


def test_the_callers_own_dsn_choices_are_kept() -> None:
    transport = MemoryTransport()
    tracker, _clock, _ = make(transport, request_dsn=DSNRequest(ret=Ret.FULL))
    envelope = Envelope(
        SENDER, [Recipient("a@example.org", notify="NEVER"), "b@example.net"], envid="mine"
    )
    tracker.submit(message(), envelope)
    tracker.run_pending()
    sent = transport.outbox[0].envelope
    assert (sent.envid, sent.ret) == ("mine", Ret.FULL)
    assert sent.recipients[0].notify == frozenset({Notify.NEVER})


def test_no_dsn_parameters_unless_asked() -> None:
    transport = MemoryTransport()
    tracker, _clock, _ = make(transport)
    tracker.submit(message())
    tracker.run_pending()
    sent = transport.outbox[0].envelope
    assert (sent.envid, sent.ret) == (None, None)
    assert all(r.notify is None for r in sent.recipients)


@pytest.mark.parametrize(
    ("sender", "expected"), [(SENDER, "bounces+{id}@bounce.example"), (None, None)]
)
def test_verp_sender_carries_the_tracking_id(sender: str | None, expected: str | None) -> None:
    transport = MemoryTransport()
    tracker, _clock, _ = make(transport, verp=VERP(local="bounces", domain="bounce.example"))
    tracking_id = tracker.submit(message(), Envelope(sender, ["a@example.org"]))
    tracker.run_pending()
    got = transport.outbox[0].envelope.sender
    assert (None if got is None else str(got)) == (
        None if expected is None else expected.format(id=tracking_id)
    )


# -- generating DSNs ------------------------------------------------------------------


def test_a_bounce_is_reported_to_the_sender() -> None:
    dsn_out = MemoryTransport()
    transport = MemoryTransport(scripted({"a@example.org": Reply.of(550, "5.1.1 no such user")}))
    tracker, _clock, _ = make(transport, dsn_transport=dsn_out, request_dsn=True)
    tracking_id = tracker.submit(message())
    tracker.run_pending()
    assert len(dsn_out.outbox) == 1
    report_message, envelope = dsn_out.outbox[0]
    # RFC 3461 §6.2: the DSN itself goes from the null reverse-path to the sender.
    assert envelope.sender is None
    assert [str(r.address) for r in envelope.recipients] == [SENDER]
    report = parse_dsn(report_message.as_bytes())
    assert report.kind is DSNKind.BOUNCE
    assert report.envid == tracking_id
    assert [(r.address, r.action, r.status) for r in report.recipients] == [
        ("a@example.org", DSNAction.FAILED, "5.1.1")
    ]
    assert "550" in (report.recipients[0].diagnostic or "")


def run_until_settled(tracker: DeliveryTracker, clock: FakeClock, *, rounds: int = 10) -> None:
    """Run the tracker at each next due time until nothing is due (at most ``rounds``)."""
    for _ in range(rounds):
        tracker.run_pending()
        due = tracker.next_due()
        if due is None:
            return
        clock.now = due


def test_an_expiry_is_reported_with_the_last_transient_status() -> None:
    dsn_out = MemoryTransport()
    transport = MemoryTransport(
        lambda m, e: {r.address: Reply.of(452, "4.2.2 mailbox full") for r in e.recipients}
    )
    retry = RetryPolicy(initial=3600, max_age=3 * 3600)
    tracker, clock, seen = make(transport, dsn_transport=dsn_out, retry=retry)
    tracking_id = tracker.submit(message(("a@example.org",)))
    run_until_settled(tracker, clock)
    assert tracker.status(tracking_id).recipients[0].state is State.EXPIRED
    assert [e.kind for e in seen].count(EventKind.EXPIRED) == 1
    report = parse_dsn(dsn_out.outbox[0].message.as_bytes())
    assert [(r.action, r.status) for r in report.recipients] == [(DSNAction.FAILED, "4.2.2")]


def test_a_server_never_reached_is_reported_with_the_status_of_that_failure() -> None:
    """A connection refused at every attempt has no reply to take a status from: the
    attempts record RFC 3463's 4.4.1 (no answer from host), and the expiry's report says
    it rather than the bare 4.4.7 (delivery time expired)."""
    dsn_out = MemoryTransport()
    transport = MemoryTransport(scripted(*[ConnectError("refused", host="mx:25")] * 10))
    retry = RetryPolicy(initial=3600, max_age=3 * 3600)
    tracker, clock, _seen = make(transport, dsn_transport=dsn_out, retry=retry)
    tracking_id = tracker.submit(message(("a@example.org",)))
    run_until_settled(tracker, clock)
    recipient = tracker.status(tracking_id).recipients[0]
    assert recipient.state is State.EXPIRED
    assert {a.enhanced for a in recipient.attempts} == {"4.4.1"}
    report = parse_dsn(dsn_out.outbox[0].message.as_bytes())
    assert [(r.action, r.status) for r in report.recipients] == [(DSNAction.FAILED, "4.4.1")]


@pytest.mark.parametrize(
    "envelope",
    [
        Envelope(None, ["a@example.org"]),  # null reverse-path: never a DSN
        Envelope(SENDER, [Recipient("a@example.org", notify="NEVER")]),
        Envelope(SENDER, [Recipient("a@example.org", notify="SUCCESS")]),
    ],
)
def test_no_dsn_when_none_may_be_sent(envelope: Envelope) -> None:
    dsn_out = MemoryTransport()
    transport = MemoryTransport(scripted({"a@example.org": Outcome.PERMANENT}))
    tracker, _clock, _ = make(transport, dsn_transport=dsn_out)
    tracking_id = tracker.submit(message(), envelope)
    tracker.run_pending()
    assert tracker.status(tracking_id).recipients[0].state is State.BOUNCED
    assert dsn_out.outbox == []


def test_a_failing_dsn_transport_leaves_the_report_queued() -> None:
    # Anything but a DeliveryError propagates, as for any message; the bounce stays
    # recorded and the report stays queued until a later run sends it.
    dsn_out = MemoryTransport(scripted(RuntimeError("dsn relay down")))
    transport = MemoryTransport(scripted({"a@example.org": Outcome.PERMANENT}))
    tracker, _clock, seen = make(transport, dsn_transport=dsn_out)
    tracking_id = tracker.submit(message(("a@example.org",)))
    with pytest.raises(RuntimeError, match="dsn relay down"):
        tracker.run_pending()
    assert tracker.status(tracking_id).recipients[0].state is State.BOUNCED
    assert [e.kind for e in seen] == [EventKind.BOUNCED]
    (queued,) = [r for r in tracker.find(state=State.QUEUED) if r.notification]
    assert dsn_out.outbox == []
    tracker.run_pending()
    assert len(dsn_out.outbox) == 1
    assert tracker.status(queued.id).recipients[0].state is State.DELIVERED
    assert [e.kind for e in seen] == [EventKind.BOUNCED]  # a generated DSN fires no events


class Killed(BaseException):
    """The process dying at a chosen instant (a BaseException, as SIGKILL spares nothing)."""


class DiesAfterCommit:
    """A store that dies right after committing the first bounce it records."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def apply_many(
        self,
        batch: Sequence[tuple[str, Sequence[Change]]],
        *,
        worker: str | None = None,
        then: FollowUp | None = None,
    ) -> list[tuple[Address, ...]]:
        changed = self.inner.apply_many(batch, worker=worker, then=then)
        if any(c.state is State.BOUNCED for _id, changes in batch for c in changes):
            raise Killed
        return changed


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_a_report_survives_a_crash_right_after_its_bounce_is_committed(
    kind: str, tmp_path: Path
) -> None:
    # Before DSNs were queued, this instant lost the report: the bounce was committed,
    # and the report was to be sent just after.
    path = tmp_path / "t.db"
    store: Store = MemoryStore() if kind == "memory" else SQLiteStore(path)
    clock = FakeClock()
    transport = MemoryTransport(scripted({"a@example.org": Reply.of(550, "5.1.1 no such user")}))
    first = DeliveryTracker(
        transport,
        DiesAfterCommit(store),  # type: ignore[arg-type]
        clock=clock,
        random=no_jitter,
        dsn_transport=MemoryTransport(),
        worker_id="first",
    )
    tracking_id = first.submit(message(("a@example.org",)))
    with pytest.raises(Killed):
        first.run_pending()
    if kind == "sqlite":
        store.close()
        store = SQLiteStore(path)  # what a restarted process opens
    # The restarted process: another worker, the same store.
    dsn_out = MemoryTransport()
    second = DeliveryTracker(
        MemoryTransport(), store, clock=clock, random=no_jitter, dsn_transport=dsn_out
    )
    second.run_pending()
    assert second.status(tracking_id).recipients[0].state is State.BOUNCED
    assert len(transport.outbox) == 1  # the bounce was recorded: never tried again
    assert len(dsn_out.outbox) == 1
    report_message, envelope = dsn_out.outbox[0]
    assert envelope.sender is None
    assert [str(r.address) for r in envelope.recipients] == [SENDER]
    report = parse_dsn(report_message.as_bytes())
    assert [(r.address, r.status) for r in report.recipients] == [("a@example.org", "5.1.1")]
    store.close()


@pytest.mark.parametrize(
    ("answers", "runs", "state"),
    [
        # Refused for now, then taken: retried like any message.
        ([{SENDER: Reply.of(451, "4.3.0 try later")}], 2, State.DELIVERED),
        # Refused for good: bounced, and no report about the report (null reverse-path).
        ([{SENDER: Reply.of(550, "5.1.1 no such user")}], 1, State.BOUNCED),
    ],
)
def test_a_generated_report_is_tracked_like_any_message(
    answers: list[Answer], runs: int, state: State
) -> None:
    dsn_out = MemoryTransport(scripted(*answers))
    transport = MemoryTransport(scripted({"a@example.org": Outcome.PERMANENT}))
    tracker, clock, seen = make(
        transport, dsn_transport=dsn_out, retry=RetryPolicy(initial=60, max_age=3600)
    )
    tracking_id = tracker.submit(message(("a@example.org",)))
    for _ in range(runs):
        tracker.run_pending()
        due = tracker.next_due()
        if due is not None:
            clock.now = due
    (report,) = [r for r in tracker.find() if r.notification]
    assert report.recipients[0].state is state
    assert len(report.recipients[0].attempts) == runs
    assert len(dsn_out.outbox) == runs
    assert not tracker.status(tracking_id).notification
    assert [e.tracking_id for e in seen] == [tracking_id]  # the report fires no events
    assert len([r for r in tracker.find() if r.notification]) == 1


def test_reports_and_the_applications_messages_go_through_their_own_transports() -> None:
    dsn_out = MemoryTransport()
    transport = MemoryTransport(scripted({"a@example.org": Outcome.PERMANENT}))
    tracker, _clock, _ = make(transport, dsn_transport=dsn_out)
    bounced = tracker.submit(message(("a@example.org",)))
    tracker.run_pending(max_rounds=1)  # the bounce, and its report queued, not yet sent
    later = tracker.submit(message(("b@example.net",)))
    summary = tracker.run_pending()  # one claim batch: the report and the new message
    assert summary.messages == 2
    assert [str(r.address) for sent in dsn_out.outbox for r in sent.envelope.recipients] == [SENDER]
    assert [str(r.address) for sent in transport.outbox for r in sent.envelope.recipients] == [
        "a@example.org",
        "b@example.net",
    ]
    assert tracker.status(bounced).recipients[0].state is State.BOUNCED
    assert tracker.status(later).recipients[0].state is State.DELIVERED


def test_a_report_goes_through_the_main_transport_without_a_dsn_transport(
    tmp_path: Path,
) -> None:
    # Queued by a tracker that had a dsn_transport, sent by one that has none: not lost.
    store = SQLiteStore(tmp_path / "t.db")
    clock = FakeClock()
    transport = MemoryTransport(scripted({"a@example.org": Outcome.PERMANENT}))
    first = DeliveryTracker(
        transport,
        store,
        clock=clock,
        random=no_jitter,
        dsn_transport=MemoryTransport(scripted(RuntimeError("down"))),
    )
    first.submit(message(("a@example.org",)))
    with pytest.raises(RuntimeError):
        first.run_pending()
    second = DeliveryTracker(transport, store, clock=clock, random=no_jitter)
    second.run_pending()
    sent = transport.outbox[-1]
    assert sent.envelope.sender is None
    assert parse_dsn(sent.message.as_bytes()).kind is DSNKind.BOUNCE
    store.close()


# -- ingesting DSNs -------------------------------------------------------------------


def returned(
    tracker: DeliveryTracker,
    tracking_id: str,
    action: DSNAction,
    status: str,
    *,
    envid: str | None,
    to: str = SENDER,
) -> bytes:
    """A report as a downstream server would send it back."""
    return build_dsn(
        original=tracker.store.content(tracking_id),
        envelope_sender=to,
        recipients=[
            DSNRecipient(
                address="a@example.org",
                action=action,
                status=status,
                diagnostic="smtp; 550 5.1.1 gone" if action is DSNAction.FAILED else None,
                remote_mta="mx.example.org",
            )
        ],
        reporting_mta="mx.downstream.example",
        envid=envid,
        date=dt.datetime(2026, 3, 2, tzinfo=dt.UTC),
    )


def test_a_success_dsn_confirms_delivery() -> None:
    tracker, _clock, seen = make(request_dsn=True)
    tracking_id = tracker.submit(message())
    tracker.run_pending()
    seen.clear()
    match = tracker.ingest_dsn(
        returned(tracker, tracking_id, DSNAction.DELIVERED, "2.0.0", envid=tracking_id)
    )
    a = Address.parse("a@example.org")
    assert (match.tracking_id, match.matched_by) == (tracking_id, "envid")
    assert (match.recipients, match.changed) == ((a,), (a,))
    recipient = tracker.status(tracking_id).recipient(a)
    assert (recipient.state, recipient.confirmed) == (State.DELIVERED, True)
    assert recipient.attempts[-1].source == "dsn"
    assert recipient.attempts[-1].host == "mx.example.org"
    assert [e.kind for e in seen] == [EventKind.DSN_RECEIVED, EventKind.DELIVERED]
    assert seen[0].report is match.report


def test_a_failure_dsn_after_relay_bounces_by_message_id() -> None:
    tracker, _clock, seen = make()
    tracking_id = tracker.submit(message())
    tracker.run_pending()
    match = tracker.ingest_dsn(
        returned(tracker, tracking_id, DSNAction.FAILED, "5.1.1", envid=None)
    )
    assert (match.tracking_id, match.matched_by) == (tracking_id, "message-id")
    recipient = tracker.status(tracking_id).recipient("a@example.org")
    assert (recipient.state, recipient.confirmed) == (State.BOUNCED, False)
    assert recipient.attempts[-1].enhanced == "5.1.1"
    assert tracker.status(tracking_id).recipient("b@example.net").state is State.DELIVERED
    assert seen[-1].kind is EventKind.BOUNCED


def test_verp_correlates_a_report_with_nothing_else_to_go_on() -> None:
    verp = VERP(local="bounces", domain="bounce.example")
    tracker, _clock, _ = make(verp=verp)
    bare = Message.from_bytes(b"From: sender@example.com\r\nTo: a@example.org\r\n\r\nhi\r\n")
    assert bare.message_id is None
    tracking_id = tracker.submit(bare)
    tracker.run_pending()
    to = str(tracker.status(tracking_id).envelope.sender)
    match = tracker.ingest_dsn(
        returned(tracker, tracking_id, DSNAction.FAILED, "5.1.1", envid=None, to=to)
    )
    assert (match.tracking_id, match.matched_by) == (tracking_id, "verp")
    assert tracker.status(tracking_id).recipients[0].state is State.BOUNCED


def test_a_delay_dsn_is_history_only() -> None:
    tracker, _clock, seen = make(request_dsn=True)
    tracking_id = tracker.submit(message())
    tracker.run_pending()
    seen.clear()
    match = tracker.ingest_dsn(
        returned(tracker, tracking_id, DSNAction.DELAYED, "4.4.1", envid=tracking_id)
    )
    assert match.changed == ()
    recipient = tracker.status(tracking_id).recipient("a@example.org")
    assert (recipient.state, recipient.confirmed) == (State.DELIVERED, False)
    assert recipient.attempts[-1].text.startswith("DSN delayed")
    assert [e.kind for e in seen] == [EventKind.DSN_RECEIVED]


@pytest.mark.parametrize(
    "raw",
    [
        b"From: friend@example.org\r\nSubject: lunch?\r\n\r\nsee you\r\n",
        b"",
    ],
)
def test_what_is_not_a_report_matches_nothing(raw: bytes) -> None:
    tracker, _clock, seen = make()
    tracker.submit(message())
    match = tracker.ingest_dsn(raw)
    assert match.tracking_id is None
    assert seen == []


def test_a_report_about_an_unknown_message_matches_nothing() -> None:
    tracker, _clock, _seen = make(request_dsn=True)
    tracking_id = tracker.submit(message())
    raw = returned(tracker, tracking_id, DSNAction.FAILED, "5.1.1", envid="someone-else")
    other, _clock2, other_seen = make()
    match = other.ingest_dsn(raw)
    assert match.report.kind is DSNKind.BOUNCE
    assert match.tracking_id is None
    assert other_seen == []


def test_a_callers_own_envid_still_correlates() -> None:
    tracker, _clock, _ = make(request_dsn=True)
    envelope = Envelope(SENDER, ["a@example.org"], envid="order-1234")
    bare = Message.from_bytes(b"From: sender@example.com\r\nTo: a@example.org\r\n\r\nhi\r\n")
    tracking_id = tracker.submit(bare, envelope)
    tracker.run_pending()
    match = tracker.ingest_dsn(
        returned(tracker, tracking_id, DSNAction.DELIVERED, "2.0.0", envid="order-1234")
    )
    assert (match.tracking_id, match.matched_by) == (tracking_id, "envid")
    assert tracker.status(tracking_id).recipients[0].confirmed
