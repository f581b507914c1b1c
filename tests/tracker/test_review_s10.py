"""An adversarial review of the delivery tracker (session 10).

Each test either reproduces a bug found in review (now fixed; its commit names it) or
pins a property that was probed and held. Bugs: a retry policy hook that raised or
returned a non-finite, negative or enormous delay threw the whole transaction away (its
accepted recipients were sent again on every run, nothing was recorded, so the message
never expired, and the runner stopped); a clock stepped back stretched a domain's
hold-off (and the stored due times of what it put back) by the step; the SQL stores'
general path dropped changes for a recipient row spelt otherwise than ``str(Address)``
(an A-label or upper-case domain: left SENDING, or uncancellable); a coroutine
callback's own ``CancelledError`` ended the async run; recording an attempt and
ingesting a report did work per pair of recipients (seconds an attempt at a few
thousand); a stored message that ``Message.from_bytes`` refuses put its batch back and
raised at every run, holding up the whole queue; a claimed batch that outlived its
lease went on sending what another worker had claimed and sent meanwhile. Held: late
results for a lost lease (two SQLite connections), results out of order, repeated,
foreign or with the domain spelt otherwise, ``BaseException`` from a transport (sync
and async), a version-1 database with a dead worker's lease, ``cancel`` during a send,
hostile DSNs (strangers, a forged success after a bounce, cancelled messages, the
tracker's own report fed back), expiry at the deadline.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import sqlite3
from collections import Counter
from collections.abc import AsyncIterable, Callable, Iterable, Iterator
from pathlib import Path

import attrs
import pytest

from mailrelay.address import Address
from mailrelay.envelope import Envelope, Recipient
from mailrelay.errors import MessageError, SessionRefused
from mailrelay.message import MAX_HEADER_BYTES, Message
from mailrelay.reply import Reply
from mailrelay.results import DeliveryResult, Outcome, RecipientResult
from mailrelay.tracker.async_engine import AsyncDeliveryTracker
from mailrelay.tracker.dsn import DSNAction, DSNRecipient
from mailrelay.tracker.dsn_build import build_dsn
from mailrelay.tracker.engine import VERP, DeliveryTracker
from mailrelay.tracker.events import TrackerEvent
from mailrelay.tracker.postgres_store import PostgresStore
from mailrelay.tracker.retry import DomainLimits, DomainShaper, RetryPolicy
from mailrelay.tracker.sqlite_store import MIGRATIONS, SQLiteStore
from mailrelay.tracker.store import MemoryStore, State, Store, envelope_to_json, to_micros
from mailrelay.transport.base import BatchItem, Transport
from mailrelay.transport.memory import MemoryTransport
from tests.tracker.test_engine import T0, FakeClock, message, no_jitter, scripted


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "postgres":  # tests/peers/postgres.py: a fresh schema, dropped after
        yield request.getfixturevalue("postgres_store")
        return
    made: Store = MemoryStore() if request.param == "memory" else SQLiteStore(tmp_path / "t.db")
    yield made
    made.close()


# -- the retry policy's hook ----------------------------------------------------------


def _raises(_recipient: Address, _reply: Reply | None) -> float:
    raise ValueError("a bug in the application's hook")


def _returns(value: object) -> Callable[[Address, Reply | None], object]:
    return lambda _recipient, _reply: value


SCHEDULE = T0 + dt.timedelta(minutes=5)  # the first retry of the default schedule
DEADLINE = T0 + dt.timedelta(days=5)  # the default maximum age


@pytest.mark.parametrize(
    ("hook", "due"),
    [
        pytest.param(_raises, SCHEDULE, id="raises"),
        pytest.param(_returns(float("nan")), SCHEDULE, id="nan"),
        pytest.param(_returns(-60.0), SCHEDULE, id="negative"),
        pytest.param(_returns(dt.timedelta(seconds=-1)), SCHEDULE, id="negative-timedelta"),
        pytest.param(_returns("soon"), SCHEDULE, id="not-a-number"),
        pytest.param(_returns(float("inf")), DEADLINE, id="infinite"),
        pytest.param(_returns(1e300), DEADLINE, id="enormous"),
        pytest.param(_returns(10**400), DEADLINE, id="enormous-int"),
        pytest.param(_returns(dt.timedelta.max), DEADLINE, id="timedelta-max"),
    ],
)
def test_a_hook_that_raises_or_talks_nonsense_falls_back_and_stops_nothing(
    store: Store,
    hook: Callable[[Address, Reply | None], object],
    due: dt.datetime,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The hook is the application's code: when it raises or returns no usable delay,
    the recipient still gets a decision (the schedule's delay; an infinite or enormous
    one is held to the deadline), the other recipients keep theirs, the run goes on, and
    nothing is sent twice."""
    clock = FakeClock()
    transport = MemoryTransport(scripted({"b@example.net": Reply.of(451, "4.3.0 try later")}))
    tracker = DeliveryTracker(
        transport,
        store,
        clock=clock,
        random=no_jitter,
        worker_id="w1",
        retry=RetryPolicy(hook=hook),  # type: ignore[arg-type]
    )
    tracking_id = tracker.submit(message())
    with caplog.at_level(logging.WARNING, logger="mailrelay.tracker.retry"):
        summary = tracker.run_pending()
    assert (summary.delivered, summary.deferred) == (1, 1)
    a, b = tracker.status(tracking_id).recipients
    assert a.state is State.DELIVERED
    assert b.state is State.DEFERRED
    assert b.next_attempt_at == due
    assert len(transport.outbox) == 1  # nothing sent twice
    if due == SCHEDULE:
        assert any("retry hook" in r.getMessage() for r in caplog.records)


def test_a_hook_that_asks_for_no_wait_is_still_obeyed(store: Store) -> None:
    """Zero is a delay the hook may choose (try again at once); only nonsense is refused."""
    policy = RetryPolicy(hook=_returns(0.0))  # type: ignore[arg-type]
    when = policy.next_attempt(
        recipient=Address.parse("a@example.org"),
        reply=None,
        retry=1,
        created_at=T0,
        now=T0 + dt.timedelta(hours=1),
        random=no_jitter,
    )
    assert when == T0 + dt.timedelta(hours=1)


# -- a clock that goes backwards ------------------------------------------------------


def test_a_clock_stepped_back_does_not_stretch_a_domains_hold_off(store: Store) -> None:
    """A domain held off for 60 s, then the clock steps back a day (an NTP correction, a
    VM restored): the hold-off is still 60 s from now, not a day and 60 s, and the
    recipients it puts back (whose due time is stored, and outlives the process) are due
    then."""
    clock = FakeClock(T0 + dt.timedelta(days=1))
    busy = SessionRefused("busy", reply=Reply.of(421, "4.7.0 too many connections"))
    transport = MemoryTransport(scripted(busy))
    tracker = DeliveryTracker(
        transport,
        store,
        clock=clock,
        random=no_jitter,
        worker_id="w1",
        split_by_domain=True,
        limits=DomainLimits(backoff_initial=60),
        retry=RetryPolicy(initial=10, jitter=0),
    )
    first = tracker.submit(message(("a@one.example",)))
    tracker.run_pending()  # refused: one.example held off for 60 s
    clock.now = T0  # a day back
    second = tracker.submit(message(("b@one.example",)))
    assert tracker.run_pending().postponed == 1
    held = tracker.status(second).recipients[0]
    assert (held.state, held.attempts) == (State.QUEUED, ())
    assert held.next_attempt_at == T0 + dt.timedelta(seconds=60)
    clock.advance(60)
    assert tracker.run_pending().delivered == 1
    assert tracker.status(second).recipients[0].state is State.DELIVERED
    # The refused recipient's own retry was stored by the clock of its attempt (10 s
    # after it, a day ahead): the store keeps due times, whatever the clock does later.
    assert tracker.status(first).recipients[0].next_attempt_at == T0 + dt.timedelta(
        days=1, seconds=10
    )


def test_a_clock_stepped_back_does_not_stretch_a_rate_limit() -> None:
    """``per_second`` spaces transactions from the last one: a step back leaves the next
    slot at most one spacing away."""
    shaper = DomainShaper(DomainLimits(per_second=0.5))
    later = T0 + dt.timedelta(days=1)
    assert shaper.acquire("one.example", later) is None
    shaper.release("one.example", later, refused=None)
    assert shaper.acquire("one.example", T0) == T0 + dt.timedelta(seconds=2)
    assert shaper.acquire("one.example", T0 + dt.timedelta(seconds=2)) is None


# -- transports that break the result contract ------------------------------------------


class Scrambled(Transport):
    """Answers each envelope recipient by a rule on its local part, then scrambles the
    results: reversed, the first one repeated with the opposite outcome after it, and
    a result for an address that was never asked."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, ...]] = []

    def deliver(self, message: Message, envelope: Envelope) -> DeliveryResult:
        self.sent.append(tuple(str(r.address) for r in envelope.recipients))
        fates = {"ok": Outcome.ACCEPTED, "later": Outcome.TRANSIENT, "no": Outcome.PERMANENT}
        found = [
            RecipientResult(
                address=r.address,
                outcome=fates[r.address.local_part.lower().rstrip("0123456789")],
                reply=Reply.of(250, "2.0.0 ok"),
            )
            for r in envelope.recipients
        ]
        found.reverse()
        found.append(
            attrs.evolve(
                found[0],
                outcome=Outcome.ACCEPTED
                if found[0].outcome is not Outcome.ACCEPTED
                else Outcome.PERMANENT,
            )
        )
        found.append(
            RecipientResult(address=Address.parse("stranger@example.org"), outcome=Outcome.ACCEPTED)
        )
        return DeliveryResult(recipients=found)


def test_results_out_of_order_repeated_or_foreign_still_decide_each_recipient(
    store: Store,
) -> None:
    """Results are matched by address when they are not in envelope order; a foreign
    result changes nothing; and a recipient answered twice gets one of its answers (the
    transport broke its contract: either is a decision, neither loses the recipient)."""
    transport = Scrambled()
    tracker = DeliveryTracker(transport, store, clock=FakeClock(), random=no_jitter)
    envelope = Envelope(
        Address.parse("sender@example.com"),
        [
            Recipient(Address.parse(text))
            for text in (
                "ok1@one.example",
                "later@two.example",
                "no@three.example",
                "OK2@b\u00fccher.example",
            )
        ],
    )
    tracking_id = tracker.submit(message(), envelope)
    tracker.run_pending()
    states = {str(r.address): r.state for r in tracker.status(tracking_id).recipients}
    assert states == {
        "ok1@one.example": State.DELIVERED,
        "later@two.example": State.DEFERRED,
        "no@three.example": State.BOUNCED,
        # Answered twice (accepted, then refused for good): either is a final state.
        "OK2@b\u00fccher.example": states["OK2@b\u00fccher.example"],
    }
    assert states["OK2@b\u00fccher.example"] in {State.DELIVERED, State.BOUNCED}
    assert len(transport.sent) == 1


@pytest.mark.parametrize(
    ("asked", "answered"),
    [
        ("u@xn--bcher-kva.example", "u@b\u00fccher.example"),  # A-label asked, U-label answered
        ("u@b\u00fccher.example", "u@XN--BCHER-KVA.EXAMPLE"),
        ("u@Example.ORG", "u@example.org"),
    ],
)
def test_a_result_naming_the_domain_in_another_form_is_the_recipients(
    store: Store, asked: str, answered: str
) -> None:
    """The domain is compared in one form (IDNA, case): a transport that reports the
    recipient with its domain spelled otherwise still decides it."""

    def handler(_message: Message, envelope: Envelope) -> DeliveryResult:
        return DeliveryResult(
            recipients=[RecipientResult(address=Address.parse(answered), outcome=Outcome.PERMANENT)]
        )

    tracker = DeliveryTracker(MemoryTransport(handler), store, clock=FakeClock())
    tracking_id = tracker.submit(
        message(), Envelope(Address.parse("s@example.com"), [Recipient(Address.parse(asked))])
    )
    tracker.run_pending()
    assert tracker.status(tracking_id).recipients[0].state is State.BOUNCED


# -- two workers, one lease -----------------------------------------------------------


def _two_workers(
    tmp_path: Path, late: Outcome, second: Outcome
) -> tuple[DeliveryTracker, str, list[str]]:
    """Worker A's send outlives its lease: during it, worker B (another connection to
    the same database, as another process) claims the recipient and settles it with
    ``second``; then A's send returns ``late``. Returns B and the message's id."""
    path = tmp_path / "shared.db"
    clock = FakeClock()
    lease = dt.timedelta(minutes=1)
    reports: list[str] = []

    def report(sent: Message, _envelope: Envelope) -> dict[str, Reply]:
        reports.append(sent.as_bytes().decode())
        return {}

    dsn = MemoryTransport(report)
    replies = {
        Outcome.ACCEPTED: Reply.of(250, "2.0.0 ok"),
        Outcome.TRANSIENT: Reply.of(451, "4.3.0 later"),
        Outcome.PERMANENT: Reply.of(550, "5.1.1 no such user"),
    }
    b = DeliveryTracker(
        MemoryTransport(lambda _m, _e: {"a@example.org": replies[second]}),
        SQLiteStore(path),
        clock=clock,
        random=no_jitter,
        worker_id="B",
        lease=lease,
        dsn_transport=dsn,
    )

    def slow(_message: Message, _envelope: Envelope) -> dict[str, Reply]:
        clock.advance(61)  # A's lease runs out while it sends
        assert b.run_pending().messages >= 1  # the message (and a report it bounced)
        return {"a@example.org": replies[late]}

    a = DeliveryTracker(
        MemoryTransport(slow),
        SQLiteStore(path),
        clock=clock,
        random=no_jitter,
        worker_id="A",
        lease=lease,
        dsn_transport=dsn,
    )
    tracking_id = a.submit(message(("a@example.org",)))
    a.run_pending()
    a.close()
    return b, tracking_id, reports


@pytest.mark.parametrize(
    ("late", "second", "final"),
    [
        (Outcome.PERMANENT, Outcome.ACCEPTED, State.DELIVERED),
        (Outcome.TRANSIENT, Outcome.ACCEPTED, State.DELIVERED),
        (Outcome.ACCEPTED, Outcome.PERMANENT, State.BOUNCED),
        # A's acceptance came after B's deferral: kept in the history only (the rule for a
        # lost lease); the recipient is sent again, a duplicate, never a loss.
        (Outcome.ACCEPTED, Outcome.TRANSIENT, State.DEFERRED),
    ],
)
def test_a_late_result_for_a_lost_lease_never_overwrites_the_new_owners(
    tmp_path: Path, late: Outcome, second: Outcome, final: State
) -> None:
    b, tracking_id, reports = _two_workers(tmp_path, late, second)
    recipient = b.status(tracking_id).recipients[0]
    assert recipient.state is final
    assert [a.code for a in recipient.attempts] == [
        {Outcome.ACCEPTED: 250, Outcome.TRANSIENT: 451, Outcome.PERMANENT: 550}[o]
        for o in (second, late)
    ]
    # The late bounce reports nothing; B's own bounce is reported once.
    b.run_pending()
    assert len(reports) == (1 if final is State.BOUNCED else 0)
    b.close()


# -- a transport raising what is not an Exception ---------------------------------------


class Raising(MemoryTransport):
    """Raises ``error`` from every send (sync and async)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error = error

    def send_many(self, items: Iterable[BatchItem]) -> list[DeliveryResult]:
        raise self.error

    async def asend_many(
        self, items: Iterable[BatchItem] | AsyncIterable[BatchItem]
    ) -> list[DeliveryResult]:
        await asyncio.sleep(0)
        raise self.error


def _left_due(store: Store, tracking_id: str) -> None:
    record = store.get(tracking_id)
    assert record is not None
    for recipient in record.recipients:
        assert (recipient.state, recipient.attempts, recipient.lease_owner) == (
            State.QUEUED,
            (),
            None,
        )
        assert recipient.next_attempt_at == T0


@pytest.mark.parametrize(
    "error", [KeyboardInterrupt(), SystemExit(3), asyncio.CancelledError(), GeneratorExit()]
)
def test_a_sync_transport_raising_a_base_exception_leaves_the_work_due(
    store: Store, error: BaseException
) -> None:
    tracker = DeliveryTracker(Raising(error), store, clock=FakeClock())
    tracking_id = tracker.submit(message())
    with pytest.raises(type(error)):
        tracker.run_pending()
    _left_due(store, tracking_id)


@pytest.mark.parametrize("error", [KeyboardInterrupt(), SystemExit(3), asyncio.CancelledError()])
def test_an_async_transport_raising_a_base_exception_leaves_the_work_due(
    tmp_path: Path, error: BaseException
) -> None:
    """``KeyboardInterrupt`` and ``SystemExit`` escape the event loop from the chunk's
    task (asyncio re-raises them at once); ``CancelledError`` raised by the transport
    itself (say, a timeout inside it), not by a cancel of the run. Either way what was
    claimed goes back, due at once, nothing leased, no attempt recorded."""
    path = tmp_path / "t.db"
    store = SQLiteStore(path)
    tracker = AsyncDeliveryTracker(Raising(error), store, clock=FakeClock())
    tracking_id = tracker.submit(message())

    async def main() -> None:
        await tracker.arun_pending()

    with pytest.raises(type(error)):
        asyncio.run(main())
    store.close()
    reopened = SQLiteStore(path)  # what is stored, as a restarted process reads it
    _left_due(reopened, tracking_id)
    reopened.close()


# -- schema migration with work in flight -----------------------------------------------


def test_a_version_1_database_with_work_in_flight_is_migrated_and_resumed(
    tmp_path: Path,
) -> None:
    """A database from the first schema, left by a worker that died holding a lease: the
    migrations keep every row, the lease expires as before, only the unresolved are sent,
    and the migrated rows read as the application's messages, never warned about."""
    path = tmp_path / "old.db"
    raw = sqlite3.connect(path)
    raw.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    raw.execute("INSERT INTO schema_version VALUES (1)")
    raw.executescript(MIGRATIONS[0])
    rows: dict[str, list[tuple[str, str, int | None, str | None, int | None]]] = {
        "m1": [
            (
                "a@example.org",
                "sending",
                None,
                "dead-worker",
                to_micros(T0 - dt.timedelta(minutes=1)),
            ),
            ("b@example.net", "delivered", None, None, None),
        ],
        "m2": [("c@example.org", "queued", to_micros(T0), None, None)],
        "m3": [("d@example.org", "deferred", to_micros(T0 + dt.timedelta(hours=1)), None, None)],
    }
    for tracking_id, recipients in rows.items():
        content = message(tuple(r[0] for r in recipients))
        envelope = Envelope(Address.parse("sender@example.com"), [r[0] for r in recipients])
        raw.execute(
            "INSERT INTO messages (id, created_at, envelope, message_id, envid, size, content)"
            " VALUES (?, ?, ?, ?, NULL, ?, ?)",
            (
                tracking_id,
                to_micros(T0 - dt.timedelta(hours=2)),
                envelope_to_json(envelope),
                content.message_id,
                content.size,
                content.as_bytes(),
            ),
        )
        for position, (address, state, due, owner, until) in enumerate(recipients):
            raw.execute(
                "INSERT INTO recipients (message, position, address, state, next_attempt_at,"
                " lease_owner, lease_until) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (tracking_id, position, address, state, due, owner, until),
            )
    raw.commit()
    raw.close()
    store = SQLiteStore(path)
    assert store.schema_version == len(MIGRATIONS)
    transport = MemoryTransport()
    tracker = DeliveryTracker(transport, store, clock=FakeClock(), random=no_jitter)
    assert tracker.run_pending().delivered == 2
    sent = sorted(str(r.address) for item in transport.outbox for r in item.envelope.recipients)
    assert sent == ["a@example.org", "c@example.org"]
    states = {
        str(r.address): r.state
        for tracking_id in rows
        for r in tracker.status(tracking_id).recipients
    }
    assert states == {
        "a@example.org": State.DELIVERED,
        "b@example.net": State.DELIVERED,
        "c@example.org": State.DELIVERED,
        "d@example.org": State.DEFERRED,
    }
    records = [tracker.status(tracking_id) for tracking_id in rows]
    assert not any(r.notification for r in records)
    assert not any(r.delay_warned for record in records for r in record.recipients)
    tracker.close()


# -- cancel() racing a send -------------------------------------------------------------


@pytest.mark.parametrize("answer", [Reply.of(250, "2.0.0 ok"), Reply.of(550, "5.1.1 gone")])
def test_a_cancel_during_the_send_keeps_the_answer_in_the_history_only(
    store: Store, answer: Reply
) -> None:
    """Cancelled while its send is in flight: the answer is kept in the history, the
    recipient stays CANCELLED, no event fires for it, and no failure report is made."""
    holder: list[DeliveryTracker] = []
    ids: list[str] = []

    def cancelling(_message: Message, _envelope: Envelope) -> dict[str, Reply]:
        assert [str(a) for a in holder[0].cancel(ids[0])] == ["a@example.org"]
        return {"a@example.org": answer}

    reports = MemoryTransport()
    tracker = DeliveryTracker(
        MemoryTransport(cancelling), store, clock=FakeClock(), dsn_transport=reports
    )
    holder.append(tracker)
    seen: list[TrackerEvent] = []
    for kind in ("delivered", "bounced", "deferred", "expired"):
        tracker.on(kind, seen.append)
    ids.append(tracker.submit(message(("a@example.org",))))
    summary = tracker.run_pending()
    assert (summary.delivered, summary.bounced) == (0, 0)
    recipient = tracker.status(ids[0]).recipients[0]
    assert recipient.state is State.CANCELLED
    assert [a.code for a in recipient.attempts] == [answer.code]
    assert seen == []
    assert reports.outbox == []
    assert tracker.next_due() is None


# -- rows whose address text is not today's canonical form ------------------------------


def _legacy_database(path: Path, stored: str) -> None:
    """A database whose recipient row spells its address ``stored`` (an older writer's
    form: an A-label domain, an upper-case domain) rather than ``str(Address)``."""
    raw = sqlite3.connect(path)
    raw.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    raw.execute("INSERT INTO schema_version VALUES (1)")
    raw.executescript(MIGRATIONS[0])
    content = message(("u@xn--bcher-kva.example",))
    envelope = json.dumps(
        {
            "envid": None,
            "notify": None,
            "recipients": [{"address": stored, "notify": None, "orcpt": None}],
            "requiretls": False,
            "ret": None,
            "sender": "sender@example.com",
        }
    )
    raw.execute(
        "INSERT INTO messages (id, created_at, envelope, message_id, envid, size, content)"
        " VALUES ('m1', ?, ?, NULL, NULL, ?, ?)",
        (to_micros(T0), envelope, content.size, content.as_bytes()),
    )
    raw.execute(
        "INSERT INTO recipients (message, position, address, state, next_attempt_at)"
        " VALUES ('m1', 0, ?, 'queued', ?)",
        (stored, to_micros(T0)),
    )
    raw.commit()
    raw.close()


STORED_FORMS = ["u@xn--bcher-kva.example", "u@B\u00dcCHER.example", "u@XN--BCHER-KVA.EXAMPLE"]


@pytest.mark.parametrize("stored", STORED_FORMS)
def test_a_cancel_finds_a_recipient_stored_in_another_spelling(tmp_path: Path, stored: str) -> None:
    _legacy_database(tmp_path / "old.db", stored)
    tracker = DeliveryTracker(
        MemoryTransport(), SQLiteStore(tmp_path / "old.db"), clock=FakeClock()
    )
    assert [str(a) for a in tracker.cancel("m1")] == ["u@b\u00fccher.example"]
    assert tracker.status("m1").recipients[0].state is State.CANCELLED
    assert tracker.run_pending().messages == 0
    tracker.close()


@pytest.mark.parametrize("stored", STORED_FORMS)
def test_a_lost_fast_path_still_records_a_recipient_stored_in_another_spelling(
    tmp_path: Path, stored: str
) -> None:
    """A worker's result takes the general path when the fast one cannot (here: the
    store that claimed is not the one that records, as after a restart); the result
    must still reach the recipient, or it would stay SENDING, re-sent at every lease
    and never expiring."""
    path = tmp_path / "old.db"
    _legacy_database(path, stored)
    claiming = SQLiteStore(path)
    recording = SQLiteStore(path)
    clock = FakeClock()
    tracker = DeliveryTracker(
        MemoryTransport(lambda _m, _e: {"u@b\u00fccher.example": Reply.of(550, "5.1.1 gone")}),
        claiming,
        clock=clock,
        worker_id="w1",
    )
    tracker.store = recording  # results go through another connection's store
    claims = claiming.claim(worker="w1", now=T0, lease=dt.timedelta(minutes=5), limit=10)
    tracker._run_batch(claims)
    recipient = tracker.status("m1").recipients[0]
    assert (recipient.state, [a.code for a in recipient.attempts]) == (State.BOUNCED, [550])
    claiming.close()
    recording.close()


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
@pytest.mark.parametrize("stored", STORED_FORMS)
def test_every_sql_store_finds_a_recipient_stored_in_another_spelling(
    request: pytest.FixtureRequest, tmp_path: Path, kind: str, stored: str
) -> None:
    """The same through the store protocol, on both SQL stores: the row is respelled in
    place, then a change for the recipient (a cancel) must reach it."""
    store: Store
    if kind == "postgres":
        store = request.getfixturevalue("postgres_store")
    else:
        store = SQLiteStore(tmp_path / "t.db")
    tracker = DeliveryTracker(MemoryTransport(), store, clock=FakeClock())
    tracking_id = tracker.submit(
        message(),
        Envelope(
            Address.parse("s@example.com"), [Recipient(Address.parse("u@b\u00fccher.example"))]
        ),
    )
    if isinstance(store, SQLiteStore):
        raw = sqlite3.connect(tmp_path / "t.db")
        raw.execute("UPDATE recipients SET address = ?", (stored,))
        raw.commit()
        raw.close()
    else:
        assert isinstance(store, PostgresStore)
        conn = store._connection()
        conn.execute("UPDATE recipients SET address = %s", (stored,))
        conn.commit()
    assert [str(a) for a in tracker.cancel(tracking_id)] == ["u@b\u00fccher.example"]
    assert tracker.status(tracking_id).recipients[0].state is State.CANCELLED
    if isinstance(store, SQLiteStore):
        store.close()


# -- hostile or misdirected DSNs ----------------------------------------------------------


def _dsn(
    tracker: DeliveryTracker, tracking_id: str, address: str, action: DSNAction, envid: str
) -> bytes:
    return build_dsn(
        original=tracker.store.content(tracking_id),
        envelope_sender="sender@example.com",
        recipients=[
            DSNRecipient(
                address=address,
                action=action,
                status="2.0.0" if action is DSNAction.DELIVERED else "5.1.1",
                remote_mta="mx.downstream.example",
            )
        ],
        reporting_mta="mx.downstream.example",
        envid=envid,
    )


@pytest.mark.parametrize(
    ("answer", "cancel", "address", "action"),
    [
        # A report naming a recipient the message never had: nothing changes.
        (None, False, "stranger@example.org", DSNAction.FAILED),
        (None, False, "stranger@example.org", DSNAction.DELIVERED),
        # A (forged) success for a recipient bounced at our attempt: history only.
        (Reply.of(550, "5.1.1 gone"), False, "a@example.org", DSNAction.DELIVERED),
        # Reports about a cancelled message: history only.
        (None, True, "a@example.org", DSNAction.DELIVERED),
        (None, True, "a@example.org", DSNAction.FAILED),
    ],
)
def test_a_dsn_cannot_revive_or_invent_a_recipient(
    store: Store, answer: Reply | None, cancel: bool, address: str, action: DSNAction
) -> None:
    handler = scripted({"a@example.org": answer} if answer is not None else {})
    tracker = DeliveryTracker(MemoryTransport(handler), store, clock=FakeClock(), request_dsn=True)
    tracking_id = tracker.submit(message(("a@example.org",)))
    if cancel:
        tracker.cancel(tracking_id)
    else:
        tracker.run_pending()
    before = tracker.status(tracking_id).recipients[0]
    match = tracker.ingest_dsn(_dsn(tracker, tracking_id, address, action, envid=tracking_id))
    assert match.tracking_id == tracking_id
    assert match.changed == ()
    after = tracker.status(tracking_id).recipients[0]
    assert (after.state, after.confirmed) == (before.state, before.confirmed)
    assert tracker.next_due() is None


def test_the_trackers_own_report_fed_back_through_verp_changes_nothing(store: Store) -> None:
    """With VERP, the failure report the tracker generates goes to the VERP address,
    where the bounce processor feeds it to ``ingest_dsn``: it is about a bounce already
    recorded, and must change nothing (nor loop)."""
    reports = MemoryTransport()
    tracker = DeliveryTracker(
        MemoryTransport(scripted({"a@example.org": Reply.of(550, "5.1.1 gone")})),
        store,
        clock=FakeClock(),
        dsn_transport=reports,
        verp=VERP(local="bounces", domain="shop.example"),
    )
    tracking_id = tracker.submit(message(("a@example.org",)))
    tracker.run_pending()
    assert len(reports.outbox) == 1
    report = reports.outbox[0].message.as_bytes()
    match = tracker.ingest_dsn(report)
    assert (match.tracking_id, match.changed) == (tracking_id, ())
    assert tracker.status(tracking_id).recipients[0].state is State.BOUNCED
    assert tracker.run_pending().messages == 0
    assert len(reports.outbox) == 1


# -- expiry at the boundary -------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "expected"),
    [
        (dt.timedelta(microseconds=-1), T0 + dt.timedelta(hours=1)),  # the deadline itself
        (dt.timedelta(0), None),
        (dt.timedelta(microseconds=1), None),
    ],
)
def test_the_deadline_is_the_last_retry_and_a_refusal_there_expires(
    offset: dt.timedelta, expected: dt.datetime | None
) -> None:
    policy = RetryPolicy(initial=600, jitter=0, max_age=3600)
    when = policy.next_attempt(
        recipient=Address.parse("a@example.org"),
        reply=None,
        retry=1,
        created_at=T0,
        now=T0 + dt.timedelta(hours=1) + offset,
        random=no_jitter,
    )
    assert when == expected


@pytest.mark.parametrize("last", [Reply.of(450, "4.2.1 busy"), Reply.of(250, "2.0.0 ok")])
def test_a_recipient_refused_until_its_deadline_gets_its_last_try_there(
    store: Store, last: Reply
) -> None:
    # A refusal about the mailbox (4.2.x): the relay itself is not backed off.
    later = Reply.of(450, "4.2.1 busy")
    answers: list[Reply] = [later] * 6 + [last]
    clock = FakeClock()
    transport = MemoryTransport(lambda _m, _e: {"a@example.org": answers.pop(0)})
    tracker = DeliveryTracker(
        transport,
        store,
        clock=clock,
        random=no_jitter,
        retry=RetryPolicy(initial=600, factor=1, jitter=0, max_age=3600),
    )
    tracking_id = tracker.submit(message(("a@example.org",)))
    for _ in range(10):  # bounded: 7 tries are due, 10 minutes apart
        tracker.run_pending()
        due = tracker.next_due()
        if due is None:
            break
        assert due <= T0 + dt.timedelta(hours=1)
        clock.now = due
    recipient = tracker.status(tracking_id).recipients[0]
    assert [a.at for a in recipient.attempts] == [
        T0 + dt.timedelta(minutes=10 * i) for i in range(7)
    ]
    assert recipient.state is (State.EXPIRED if last.code == 450 else State.DELIVERED)


# -- callbacks --------------------------------------------------------------------------


def test_an_async_callback_raising_cancelled_error_of_its_own_stops_nothing(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """A coroutine callback that awaited something cancelled by someone else gets a
    ``CancelledError`` although nobody cancelled the runner: that is the callback's
    failure (logged and skipped, as any other), not a cancellation of the run."""
    calls: list[str] = []

    async def callback(event: TrackerEvent) -> None:
        calls.append(event.tracking_id)
        lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        lost.cancel()
        await lost

    tracker = AsyncDeliveryTracker(MemoryTransport(), store, clock=FakeClock(), commit_batch=1)
    tracker.on("delivered", callback)
    ids = [tracker.submit(message(("a@example.org",))) for _ in range(3)]

    async def main() -> int:
        summary = await tracker.arun_pending()
        return summary.delivered

    with caplog.at_level(logging.ERROR, logger="mailrelay.tracker.events"):
        assert asyncio.run(main()) == 3
    assert sorted(calls) == sorted(ids)
    assert [tracker.status(i).recipients[0].state for i in ids] == [State.DELIVERED] * 3
    assert sum("callback" in r.getMessage() for r in caplog.records) == 3


def test_a_cancelled_run_still_stops_when_a_callback_is_running(store: Store) -> None:
    """The converse: a run cancelled while a callback awaits is cancelled (the
    cancellation is the run's, not the callback's failure)."""
    started = asyncio.Event()

    async def callback(_event: TrackerEvent) -> None:
        started.set()
        await asyncio.sleep(10)  # cancelled long before (hang guard: a short test)

    tracker = AsyncDeliveryTracker(MemoryTransport(), store, clock=FakeClock(), commit_batch=1)
    tracker.on("delivered", callback)
    tracker.submit(message(("a@example.org",)))

    async def main() -> None:
        run = asyncio.create_task(tracker.arun_pending())
        await asyncio.wait_for(started.wait(), 5)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(run, 5)

    asyncio.run(main())


# -- messages with many recipients ------------------------------------------------------

#: Recipients of the large message: enough that work per recipient pair (n² / 2
#: comparisons, 45,000 here) stands far apart from work per recipient.
MANY = 300


class Comparisons:
    """Counts ``Address.__eq__`` calls: work that grows with the square of a message's
    recipients shows as a count, with no timing."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        original = Address.__eq__

        def counting(this: Address, other: object) -> bool:
            self.count += 1
            return original(this, other)

        monkeypatch.setattr(Address, "__eq__", counting)


def _large(n: int = MANY) -> tuple[Message, list[str]]:
    to = [f"user{i}@example.org" for i in range(n)]
    return Message.build(sender="sender@example.com", to=to, subject="x", text="hi\n"), to


@pytest.mark.parametrize("answer", [Reply.of(450, "4.2.1 busy"), Reply.of(250, "2.0.0 ok")])
def test_an_attempt_costs_work_per_recipient_not_per_pair(
    store: Store, monkeypatch: pytest.MonkeyPatch, answer: Reply
) -> None:
    """A message to a few thousand recipients (a newsletter with a long Bcc) is a
    plausible submission: recording an attempt must not compare every recipient with
    every other (at 4,000 recipients that took four seconds an attempt)."""
    big, to = _large()
    events: list[TrackerEvent] = []
    tracker = DeliveryTracker(
        MemoryTransport(lambda _m, _e: dict.fromkeys(to, answer)),
        store,
        clock=FakeClock(),
        random=no_jitter,
    )
    tracker.on("deferred", events.append)
    tracker.on("delivered", events.append)
    tracking_id = tracker.submit(big)
    comparisons = Comparisons(monkeypatch)
    tracker.run_pending()
    assert len(events) == MANY
    assert comparisons.count < 20 * MANY
    states = tracker.status(tracking_id).states()
    assert states == {State.DEFERRED if answer.code == 450 else State.DELIVERED: MANY}


@pytest.mark.parametrize("named", ["strangers", "recipients"])
def test_ingesting_a_report_costs_work_per_block_not_per_block_and_recipient(
    store: Store, monkeypatch: pytest.MonkeyPatch, named: str
) -> None:
    """A bounce is mail from anyone: a report of many blocks about a message of many
    recipients must be folded in in time linear in both, not their product."""
    big, to = _large()
    tracker = DeliveryTracker(MemoryTransport(), store, clock=FakeClock(), request_dsn=True)
    tracking_id = tracker.submit(big)
    tracker.run_pending()
    addresses = [f"Stranger{i}@example.net" for i in range(MANY)] if named == "strangers" else to
    raw = build_dsn(
        original=tracker.store.content(tracking_id),
        envelope_sender="sender@example.com",
        recipients=[
            DSNRecipient(address=address, action=DSNAction.DELIVERED, status="2.0.0")
            for address in addresses
        ],
        reporting_mta="mx.downstream.example",
        envid=tracking_id,
    )
    comparisons = Comparisons(monkeypatch)
    match = tracker.ingest_dsn(raw)
    assert comparisons.count < 20 * MANY
    assert len(match.changed) == (0 if named == "strangers" else MANY)


# -- a stored message that cannot be read back ------------------------------------------


def _unreadable_when_stored() -> Message:
    """A message whose stored bytes ``Message.from_bytes`` refuses: a header block over
    ``MAX_HEADER_BYTES`` (as one stored by a version of the library without that limit
    would be; ``Message.build`` refuses to make one since session 10). Over the cache's
    size limit, so the tracker reads it back from the store to send it."""
    small = Message.build(sender="sender@example.com", to="a@example.org", subject="x", text="hi\n")
    filler = b"".join(b"X-Filler: " + b"a" * 900 + b"\r\n" for _ in range(MAX_HEADER_BYTES // 900))
    wire = filler + small.as_bytes()
    big = attrs.evolve(small, wire=wire, size=len(wire))
    with pytest.raises(MessageError):
        Message.from_bytes(big.as_bytes())
    return big


def _submit_pair(tracker: DeliveryTracker | AsyncDeliveryTracker) -> tuple[str, str]:
    only = Envelope(Address.parse("sender@example.com"), ["a@example.org"])
    bad = tracker.submit(_unreadable_when_stored(), only)
    good = tracker.submit(message(("b@example.org",)))
    return bad, good


def _check_unreadable(
    tracker: DeliveryTracker | AsyncDeliveryTracker,
    bad: str,
    good: str,
    events: list[TrackerEvent],
    reports: MemoryTransport,
) -> None:
    """The unreadable message is decided (it can never be sent: bounced, with the reason
    in an error attempt, its event fired, the sender told), and blocks nothing."""
    assert tracker.status(good).recipients[0].state is State.DELIVERED
    recipient = tracker.status(bad).recipients[0]
    assert recipient.state is State.BOUNCED
    assert [a.source for a in recipient.attempts] == ["error"]
    assert "MessageError" in recipient.attempts[0].text
    assert [(e.kind.value, e.tracking_id) for e in events if e.kind.value == "bounced"] == [
        ("bounced", bad)
    ]
    assert tracker.next_due() is None
    assert len(reports.outbox) == 1
    assert reports.outbox[0].envelope.sender is None
    assert [str(r.address) for r in reports.outbox[0].envelope.recipients] == ["sender@example.com"]


def test_a_stored_message_that_cannot_be_read_back_blocks_nothing(store: Store) -> None:
    """It used to put its whole claimed batch back and raise, at every run: being the
    oldest due, it was claimed first each time, so nothing else was ever sent."""
    reports = MemoryTransport()
    tracker = DeliveryTracker(MemoryTransport(), store, clock=FakeClock(), dsn_transport=reports)
    events: list[TrackerEvent] = []
    tracker.on("bounced", events.append)
    tracker.on("delivered", events.append)
    bad, good = _submit_pair(tracker)
    summary = tracker.run_pending()
    assert (summary.bounced, summary.delivered) == (1, 2)  # the report is delivered too
    _check_unreadable(tracker, bad, good, events, reports)


def test_the_async_runner_decides_an_unreadable_message_too(store: Store) -> None:
    reports = MemoryTransport()
    tracker = AsyncDeliveryTracker(
        MemoryTransport(), store, clock=FakeClock(), dsn_transport=reports
    )
    events: list[TrackerEvent] = []
    tracker.on("bounced", events.append)
    tracker.on("delivered", events.append)
    bad, good = _submit_pair(tracker)

    async def main() -> None:
        await tracker.arun_pending()

    asyncio.run(main())
    _check_unreadable(tracker, bad, good, events, reports)


# -- a claimed batch that outlives its lease --------------------------------------------


@pytest.mark.parametrize("runner", ["sync", "async"])
def test_a_batch_whose_lease_ran_out_sends_nothing_another_worker_took(
    tmp_path: Path, runner: str
) -> None:
    """The lease is stamped on the whole claimed batch at once, and its chunks go out one
    after the other: a slow first send (a server at its timeouts) can outlast it. Worker
    B then claims the rest of the batch and delivers it; worker A must not send those
    messages again when it reaches them (it used to: one more duplicate per message)."""
    path = tmp_path / "shared.db"
    clock = FakeClock()
    lease = dt.timedelta(minutes=1)
    b_transport = MemoryTransport()
    b = DeliveryTracker(b_transport, SQLiteStore(path), clock=clock, worker_id="B", lease=lease)
    first_send = [True]

    def slow_first(_message: Message, _envelope: Envelope) -> dict[str, Reply]:
        if first_send[0]:
            first_send[0] = False
            clock.advance(61)  # A's lease runs out while it sends its first chunk
            b.run_pending()
        return {}

    a_transport = MemoryTransport(slow_first)
    kind = DeliveryTracker if runner == "sync" else AsyncDeliveryTracker
    a = kind(
        a_transport,
        SQLiteStore(path),
        clock=clock,
        worker_id="A",
        lease=lease,
        commit_batch=1,  # one message per chunk (and one chunk at a time)
    )
    ids = [a.submit(message((f"user{i}@example.org",))) for i in range(3)]
    if isinstance(a, DeliveryTracker):
        a.run_pending()
    else:
        asynchronous = a

        async def main() -> None:
            await asynchronous.arun_pending(concurrency=1)

        asyncio.run(main())
    sent = Counter(item.message.message_id for item in a_transport.outbox + b_transport.outbox)
    records = [a.status(i) for i in ids]
    # The message A sent first was in flight when its lease ran out: B sent it too (the
    # duplicate at-least-once allows). The two A had not started were B's alone.
    in_flight = a_transport.outbox[0].message.message_id
    assert [item.message.message_id for item in a_transport.outbox] == [in_flight]
    assert sent == {r.message_id: 2 if r.message_id == in_flight else 1 for r in records}
    assert [r.recipients[0].state for r in records] == [State.DELIVERED] * 3
    assert a.next_due() is None
    a.store.close()
    b.close()
