"""An adversarial review of delay warnings: the once-only promise on every path, and the
report itself.

Each test either reproduces a bug found in review (now fixed; its commit names it) or
pins a property that was probed and held. Bugs: two reports for one message in one
commit under ``split_by_domain``; the whole message returned in a warning with RET=FULL
(RFC 3461 §4.3 asks for it in failed DSNs only); report dates following the process's
LC_TIME. Held: two workers racing on an expired lease (every store, two SQLite
connections, two PostgreSQL stores), a generated report that is itself deferred (RFC 3461
§6.2), NOTIFY from the envelope default, the recipient or a DSN request, VERP, a batch
mixing the SQLite fast and general paths, the async tracker cancelled mid-commit, a
database upgraded from schema 5 with recipients long deferred, Will-Retry-Until under a
hook, aware non-UTC clocks, non-ASCII recipients, put-backs and extreme thresholds.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import locale
import sqlite3
import subprocess
import tempfile
import threading
from collections.abc import Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailrelay.address import Address
from mailrelay.envelope import Envelope, Notify, Recipient
from mailrelay.message import Message
from mailrelay.reply import Reply
from mailrelay.tracker.async_engine import AsyncDeliveryTracker
from mailrelay.tracker.dsn import DSNAction
from mailrelay.tracker.dsn_parse import parse_dsn
from mailrelay.tracker.engine import DeliveryTracker
from mailrelay.tracker.notifications import VERP, DSNRequest
from mailrelay.tracker.postgres_store import PostgresStore
from mailrelay.tracker.retry import RetryPolicy
from mailrelay.tracker.sqlite_store import MIGRATIONS, SQLiteStore
from mailrelay.tracker.store import (
    Change,
    FollowUp,
    MemoryStore,
    State,
    Store,
    envelope_to_json,
    queued_record,
    to_micros,
)
from mailrelay.tracker.transitions import put_back
from mailrelay.transport.memory import MemoryTransport
from tests.peers.postgres import PostgresInstance
from tests.tracker.test_engine import T0, FakeClock, no_jitter
from tests.tracker.test_engine_delay import (
    DEADLINE,
    HOUR,
    RETRY,
    SENDER,
    TEMPFAIL,
    bounces,
    deferring,
    make,
    message,
    run_until_done,
    warnings,
)

BODY = b"THE-BODY-LINE"
A = "a@example.org"
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


# -- one report per message per commit --------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "kind"),
    [(TEMPFAIL, "delay"), (Reply.of(550, "5.1.1 no such user"), "failure")],
)
def test_split_transactions_of_one_message_share_one_report(
    store: Store, reply: Reply, kind: str
) -> None:
    """Bug: with ``split_by_domain`` a message's domains are separate transactions of one
    commit, and each got its own report: two delay warnings (or bounces) for one message
    in one commit, where the docs promise one report for the recipients of one commit."""
    dsn_out = MemoryTransport()
    clock = FakeClock()
    tracker = make(
        deferring("a@example.org", "b@example.net", reply=reply),
        store,
        clock,
        dsn_out,
        split_by_domain=True,
    )
    tracking_id = tracker.submit(message("a@example.org", "b@example.net", "c@example.com"))
    clock.now = T0 + 3 * HOUR  # late at the first try: warned at once
    tracker.run_pending()
    tracker.run_pending()  # sends what the first run queued
    reports = warnings(dsn_out.outbox) if kind == "delay" else bounces(dsn_out.outbox)
    (report,) = reports
    # In envelope order, as a single transaction's report names them.
    assert [r.address for r in report.recipients] == ["a@example.org", "b@example.net"]
    assert len([r for r in tracker.find() if r.notification]) == 1
    states = [r.state for r in tracker.status(tracking_id).recipients]
    expected = State.DEFERRED if kind == "delay" else State.BOUNCED
    assert states == [expected, expected, State.DELIVERED]


@settings(max_examples=25, deadline=None)
@given(
    refused=st.lists(st.sampled_from(["450", "550", "250"]), min_size=1, max_size=4),
    split=st.booleans(),
)
def test_at_most_one_report_of_each_kind_per_message_per_commit(
    refused: list[str], split: bool
) -> None:
    """Whatever each recipient's answer and however the message is split: the first
    commit queues at most one delay report and one failure report, naming exactly the
    recipients deferred (late) and bounced."""
    domains = ["a.example", "b.example", "c.example", "d.example"]
    addresses = [f"u{i}@{domains[i]}" for i in range(len(refused))]
    answers = {
        Address.parse(a): Reply.of(int(code), "4.2.1 x" if code == "450" else "5.1.1 x")
        for a, code in zip(addresses, refused, strict=True)
        if code != "250"
    }
    transport = MemoryTransport(
        lambda _m, e: {r.address: answers[r.address] for r in e.recipients if r.address in answers}
    )
    dsn_out = MemoryTransport()
    clock = FakeClock()
    tracker = make(transport, MemoryStore(), clock, dsn_out, split_by_domain=split)
    tracker.submit(message(*addresses))
    clock.now = T0 + 3 * HOUR
    tracker.run_pending()
    tracker.run_pending()
    delayed = [a for a, code in zip(addresses, refused, strict=True) if code == "450"]
    bounced = [a for a, code in zip(addresses, refused, strict=True) if code == "550"]
    assert [[r.address for r in w.recipients] for w in warnings(dsn_out.outbox)] == (
        [delayed] if delayed else []
    )
    assert [[r.address for r in b.recipients] for b in bounces(dsn_out.outbox)] == (
        [bounced] if bounced else []
    )


# -- what the report returns ----------------------------------------------------------


@pytest.mark.parametrize("ret", ["FULL", "HDRS", None])
def test_a_delay_report_returns_headers_only_whatever_ret_says(ret: str | None) -> None:
    """Bug: RET=FULL made every delay warning carry the whole message. RFC 3461 §4.3:
    FULL asks for the message in a *failed* DSN; a warning (the message is still
    queued and may well be delivered) returns the headers only, as Postfix does. The
    failure report that follows still honours RET=FULL."""
    dsn_out = MemoryTransport()
    clock = FakeClock()
    tracker = make(deferring("a@example.org"), MemoryStore(), clock, dsn_out)
    original = Message.build(
        sender=SENDER, to=["a@example.org"], subject="big", text=(BODY.decode() + "\n") * 400
    )
    tracker.submit(original, Envelope(SENDER, ["a@example.org"], ret=ret))
    run_until_done(tracker, clock, until=DEADLINE + HOUR)
    (warning,) = [
        s for s in dsn_out.outbox if parse_dsn(s.message.as_bytes()).kind.value == "delay"
    ]
    raw = warning.message.as_bytes()
    assert BODY not in raw
    assert b"Content-Type: text/rfc822-headers" in raw
    assert b"Subject: big" in raw
    assert len(raw) < original.size
    (bounce,) = bounces(dsn_out.outbox)
    bounce_raw = next(
        s.message.as_bytes()
        for s in dsn_out.outbox
        if parse_dsn(s.message.as_bytes()).kind is bounce.kind
    )
    assert (BODY in bounce_raw) is (ret == "FULL")


def test_a_non_ascii_recipient_gets_a_global_delivery_status() -> None:
    dsn_out = MemoryTransport()
    clock = FakeClock()
    tracker = make(deferring("jörg@example.org"), MemoryStore(), clock, dsn_out)
    tracker.submit(message("jörg@example.org"))
    clock.now = T0 + 3 * HOUR
    tracker.run_pending()
    (sent,) = dsn_out.outbox
    raw = sent.message.as_bytes()
    assert b"Content-Type: message/global-delivery-status" in raw
    assert "Final-Recipient: utf-8; jörg@example.org".encode() in raw
    (warning,) = warnings(dsn_out.outbox)
    assert [(r.address, r.action) for r in warning.recipients] == [
        ("jörg@example.org", DSNAction.DELAYED)
    ]


@pytest.mark.parametrize("offset_hours", [0, 5, -8])
def test_report_times_are_right_with_an_aware_non_utc_clock(offset_hours: int) -> None:
    """Every time in the report is the real instant (written as +0000 or with its own
    offset), whatever zone the injected clock answers in."""
    zone = dt.timezone(dt.timedelta(hours=offset_hours))
    clock = FakeClock(T0.astimezone(zone))
    dsn_out = MemoryTransport()
    tracker = make(deferring("a@example.org"), MemoryStore(), clock, dsn_out)
    tracker.submit(message("a@example.org"))
    clock.now = (T0 + 3 * HOUR).astimezone(zone)
    tracker.run_pending()
    (warning,) = warnings(dsn_out.outbox)
    (about,) = warning.recipients
    assert about.will_retry_until is not None
    assert about.last_attempt_date is not None
    assert email.utils.parsedate_to_datetime(about.will_retry_until) == DEADLINE
    assert email.utils.parsedate_to_datetime(about.last_attempt_date) == T0 + 3 * HOUR
    assert warning.arrival_date is not None
    assert email.utils.parsedate_to_datetime(warning.arrival_date) == T0


# -- who is never warned ----------------------------------------------------------------


def test_a_generated_report_that_is_deferred_is_never_warned_about() -> None:
    """RFC 3461 §6.2: no DSN about a DSN. A bounce whose own delivery is deferred past
    the threshold (its sender is the null reverse-path) queues nothing more."""
    clock = FakeClock()
    tries: list[dt.datetime] = []

    def slow_dsn(_m: Message, envelope: Envelope) -> dict[Address, Reply]:
        tries.append(clock.now)
        # Deferred for hours, then taken.
        if clock.now < T0 + 3 * HOUR:
            return {r.address: TEMPFAIL for r in envelope.recipients}
        return {}

    dsn_out = MemoryTransport(slow_dsn)
    tracker = make(
        deferring("a@example.org", reply=Reply.of(550, "5.1.1 no")),
        MemoryStore(),
        clock,
        dsn_out,
        delay_warning_after=dt.timedelta(0),
    )
    tracker.submit(message("a@example.org"))
    run_until_done(tracker, clock, until=DEADLINE)
    notes = [r for r in tracker.find() if r.notification]
    assert len(notes) == 1  # the bounce, and nothing about it
    (note,) = notes
    assert note.envelope.sender is None
    assert note.recipients[0].state is State.DELIVERED
    assert note.recipients[0].delay_warned is False
    assert len(tries) >= 3  # it was deferred, late, more than once


def test_putting_work_back_never_carries_the_mark() -> None:
    envelope = Envelope(SENDER, ["a@example.org"])
    record = queued_record(
        id="m1",
        created_at=T0 - 30 * HOUR,
        envelope=envelope,
        message_id=None,
        size=1,
        addresses=[r.address for r in envelope.recipients],
    )
    (change,) = put_back(record, [record.recipients[0].address], T0)
    assert change.delay_warned is None
    assert change.attempt is None


# -- two workers, one recipient ---------------------------------------------------------


def _race(first: Store, second: Store) -> None:
    """Worker A sends, stalls past its lease; worker B claims the message again, defers
    it (warning once) and commits; then A's late result comes."""
    clock = FakeClock()
    dsn_out = MemoryTransport()
    b = make(deferring("a@example.org"), second, clock, dsn_out, worker_id="b")
    ran_b: list[bool] = []

    def stalls(_m: Message, envelope: Envelope) -> dict[Address, Reply]:
        if not ran_b:
            ran_b.append(True)
            clock.now += dt.timedelta(minutes=16)  # A's 15-minute lease runs out
            b.run_pending()  # B takes the message, defers it, warns
        return {r.address: TEMPFAIL for r in envelope.recipients}

    a = make(MemoryTransport(stalls), first, clock, dsn_out, worker_id="a")
    tracking_id = a.submit(message("a@example.org"))
    clock.now = T0 + 3 * HOUR
    a.run_pending()
    assert ran_b
    b.run_pending()
    a.run_pending()
    (recipient,) = a.status(tracking_id).recipients
    assert (recipient.state, recipient.delay_warned) == (State.DEFERRED, True)
    # A's late 450 is history (two tries), but its change was refused: one warning.
    assert [x.code for x in recipient.attempts] == [450, 450]
    assert len(warnings(dsn_out.outbox)) == 1
    assert len([r for r in a.find() if r.notification]) == 1


def test_a_worker_whose_lease_expired_cannot_warn_a_second_time(store: Store) -> None:
    """A's change is refused (its lease was lost): one warning in all, on every store."""
    _race(store, store)


def test_two_sqlite_connections_race_for_one_warning(tmp_path: Path) -> None:
    """The same race between two processes' stores on one SQLite file."""
    first = SQLiteStore(tmp_path / "q.db")
    second = SQLiteStore(tmp_path / "q.db")
    try:
        _race(first, second)
    finally:
        first.close()
        second.close()


# -- an upgraded database ---------------------------------------------------------------


def test_recipients_deferred_before_the_upgrade_are_warned_once_at_their_next_deferral(
    tmp_path: Path,
) -> None:
    """A schema-5 database (no mark) with a message deferred for a day already: after
    the upgrade (migration 6), the recipient has never been warned about, so its next
    deferral warns, once; a recipient delivered since needs nothing."""
    path = tmp_path / "v5.db"
    raw = sqlite3.connect(path)
    raw.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    raw.execute("INSERT INTO schema_version VALUES (5)")
    raw.executescript("".join(MIGRATIONS[:5]))
    created = T0 - 24 * HOUR
    content = message("a@example.org", "b@example.net")
    envelope = Envelope(SENDER, ["a@example.org", "b@example.net"])
    raw.execute(
        "INSERT INTO messages (id, created_at, envelope, message_id, envid, size, content)"
        " VALUES (?, ?, ?, NULL, NULL, ?, ?)",
        ("m1", to_micros(created), envelope_to_json(envelope), content.size, content.as_bytes()),
    )
    for position, address in enumerate(["a@example.org", "b@example.net"]):
        raw.execute(
            "INSERT INTO recipients (message, position, address, state, next_attempt_at)"
            " VALUES (?, ?, ?, 'deferred', ?)",
            ("m1", position, address, to_micros(T0)),
        )
        raw.execute(
            "INSERT INTO attempts (message, position, seq, at, host, code, enhanced, text,"
            " source) VALUES (?, ?, 0, ?, 'mx.example', 450, '4.2.1', 'busy', 'reply')",
            ("m1", position, to_micros(T0 - HOUR)),
        )
    raw.commit()
    raw.close()
    store = SQLiteStore(path)
    dsn_out = MemoryTransport()
    clock = FakeClock()
    tracker = DeliveryTracker(
        deferring("a@example.org"),
        store,
        clock=clock,
        random=no_jitter,
        dsn_transport=dsn_out,  # the default retry policy: five days
        delay_warning_after=HOUR,
    )
    run_until_done(tracker, clock, until=T0 + 6 * HOUR)
    (warning,) = warnings(dsn_out.outbox)
    assert [r.address for r in warning.recipients] == ["a@example.org"]
    record = tracker.status("m1")
    assert [(r.state, r.delay_warned) for r in record.recipients] == [
        (State.DEFERRED, True),
        (State.DELIVERED, False),
    ]
    store.close()


def test_two_postgres_stores_race_for_one_warning(postgres: PostgresInstance) -> None:
    """The same race between two processes' PostgresStores on one schema."""
    schema = postgres.new_schema()
    first = PostgresStore(postgres.dsn, schema=schema)
    second = PostgresStore(postgres.dsn, schema=schema)
    try:
        _race(first, second)
    finally:
        first.close()
        second.close()
        postgres.drop_schema(schema)


# -- the async tracker cancelled inside the commit that queues a warning ----------------


class SlowFollowUp:
    """A store whose ``then`` (the follow-up that builds the warning, inside the commit)
    waits until the test lets it go, so the runner can be cancelled meanwhile."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.inside = threading.Event()
        self.go = threading.Event()

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def apply_many(
        self,
        batch: Sequence[tuple[str, Sequence[Change]]],
        *,
        worker: str | None = None,
        then: FollowUp | None = None,
    ) -> list[tuple[Address, ...]]:
        if then is not None:
            inner_then = then

            def slow(changed: Sequence[tuple[Address, ...]]) -> Any:
                self.inside.set()
                self.go.wait(10)
                return inner_then(changed)

            then = slow
        return self.inner.apply_many(batch, worker=worker, then=then)


def test_the_async_tracker_cancelled_mid_commit_warns_once(store: Store) -> None:
    slow = SlowFollowUp(store)
    dsn_out = MemoryTransport()
    clock = FakeClock()
    tracker = AsyncDeliveryTracker(
        deferring("a@example.org"),
        slow,  # type: ignore[arg-type]
        clock=clock,
        random=no_jitter,
        retry=RETRY,
        dsn_transport=dsn_out,
        reporting_mta="relay.example.com",
        delay_warning_after=HOUR,
    )

    async def scenario() -> str:
        tracking_id = await tracker.asubmit(message("a@example.org"))
        clock.now = T0 + 3 * HOUR
        task = asyncio.create_task(tracker.arun_pending())
        assert await asyncio.to_thread(slow.inside.wait, 10)
        task.cancel()
        slow.go.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        await tracker.arun_pending()  # sends the warning queued by the cancelled run
        await tracker.arun_pending()
        return tracking_id

    tracking_id = run(scenario())
    (recipient,) = tracker.status(tracking_id).recipients
    assert (recipient.state, recipient.delay_warned) == (State.DEFERRED, True)
    assert len(warnings(dsn_out.outbox)) == 1
    assert len([r for r in tracker.find() if r.notification]) == 1


# -- NOTIFY, VERP, settings -------------------------------------------------------------


@pytest.mark.parametrize(
    ("envelope", "request_dsn", "warned"),
    [
        # The envelope's NOTIFY is the default of recipients without their own.
        (Envelope(SENDER, ["a@example.org"], notify="NEVER"), None, False),
        (Envelope(SENDER, ["a@example.org"], notify="FAILURE"), None, False),
        (Envelope(SENDER, ["a@example.org"], notify="DELAY,FAILURE"), None, True),
        # A recipient's own NOTIFY wins over the envelope's.
        (
            Envelope(SENDER, [Recipient("a@example.org", notify="FAILURE")], notify="DELAY"),
            None,
            False,
        ),
        (
            Envelope(SENDER, [Recipient("a@example.org", notify="DELAY")], notify="NEVER"),
            None,
            True,
        ),
        # A DSN request fills in NOTIFY where the envelope has none.
        (
            Envelope(SENDER, ["a@example.org"]),
            DSNRequest(notify=frozenset({Notify.FAILURE})),
            False,
        ),
        (Envelope(SENDER, ["a@example.org"]), DSNRequest(), True),
    ],
)
def test_notify_as_the_envelope_carries_it(
    store: Store, envelope: Envelope, request_dsn: DSNRequest | None, warned: bool
) -> None:
    dsn_out = MemoryTransport()
    clock = FakeClock()
    tracker = make(deferring("a@example.org"), store, clock, dsn_out, request_dsn=request_dsn)
    tracking_id = tracker.submit(message("a@example.org"), envelope)
    clock.now = T0 + 3 * HOUR
    tracker.run_pending()
    tracker.run_pending()
    assert tracker.status(tracking_id).recipients[0].delay_warned is warned
    assert len(warnings(dsn_out.outbox)) == (1 if warned else 0)


def test_a_verp_warning_goes_to_the_verp_address_and_ingesting_it_changes_nothing(
    store: Store,
) -> None:
    """The warning goes to the per-message VERP sender; a bounce processor that feeds it
    back (``ingest_dsn``) adds history only: no state change, no second warning."""
    dsn_out = MemoryTransport()
    clock = FakeClock()
    verp = VERP(local="bounces", domain="shop.example")
    tracker = make(deferring("a@example.org"), store, clock, dsn_out, verp=verp)
    tracking_id = tracker.submit(message("a@example.org"))
    clock.now = T0 + 3 * HOUR
    tracker.run_pending()
    (sent,) = dsn_out.outbox
    assert [str(r.address) for r in sent.envelope.recipients] == [
        f"bounces+{tracking_id}@shop.example"
    ]
    match = tracker.ingest_dsn(sent.message.as_bytes())
    assert match.tracking_id == tracking_id
    assert match.changed == ()
    clock.now = T0 + 3.75 * HOUR
    run_until_done(tracker, clock, until=DEADLINE - dt.timedelta(minutes=1))
    (recipient,) = tracker.status(tracking_id).recipients
    assert (recipient.state, recipient.delay_warned) == (State.DEFERRED, True)
    assert len(warnings(dsn_out.outbox)) == 1


@pytest.mark.parametrize(
    ("after", "expected"),
    [(dt.timedelta(0), 1), (dt.timedelta.max, 0), (dt.timedelta(days=365), 0)],
)
def test_extreme_thresholds(after: dt.timedelta, expected: int) -> None:
    dsn_out = MemoryTransport()
    clock = FakeClock()
    tracker = make(
        deferring("a@example.org"), MemoryStore(), clock, dsn_out, delay_warning_after=after
    )
    tracker.submit(message("a@example.org"))
    run_until_done(tracker, clock, until=DEADLINE + HOUR)
    assert len(warnings(dsn_out.outbox)) == expected
    assert len(bounces(dsn_out.outbox)) == 1  # the expiry is reported either way


# -- batches mixing the fast and general paths --------------------------------------------


def test_a_batch_mixing_delivered_warned_and_plain_messages(store: Store) -> None:
    """One commit holds a message whose recipients are delivered and warned, a message
    only delivered, and a message deferred late: on SQLite the fast path refuses the
    batch (a mark to set) and the general path records each change exactly once."""
    dsn_out = MemoryTransport()
    clock = FakeClock()
    tracker = make(deferring("a@example.org", "late@example.org"), store, clock, dsn_out)
    mixed = tracker.submit(message("a@example.org", "b@example.net"))
    plain = tracker.submit(message("c@example.net"))
    late = tracker.submit(message("late@example.org"))
    clock.now = T0 + 3 * HOUR
    summary = tracker.run_pending()
    # b@ and c@, then the two warnings that commit queued (sent in the same run).
    assert (summary.delivered, summary.deferred) == (4, 2)
    recipients = tracker.status(mixed).recipients
    assert [(r.state, r.delay_warned, len(r.attempts)) for r in recipients] == [
        (State.DEFERRED, True, 1),
        (State.DELIVERED, False, 1),
    ]
    assert [(r.state, r.delay_warned) for r in tracker.status(plain).recipients] == [
        (State.DELIVERED, False)
    ]
    assert [(r.state, r.delay_warned) for r in tracker.status(late).recipients] == [
        (State.DEFERRED, True)
    ]
    tracker.run_pending()
    about = sorted(r.address for w in warnings(dsn_out.outbox) for r in w.recipients)
    assert about == ["a@example.org", "late@example.org"]
    # The next deferrals (fast path again on SQLite: no mark to set) warn nobody.
    run_until_done(tracker, clock, until=DEADLINE - dt.timedelta(minutes=1))
    assert len(warnings(dsn_out.outbox)) == 2


# -- the process locale -----------------------------------------------------------------


@pytest.fixture(scope="module")
def german_locales(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding a compiled ``de_DE.UTF-8`` locale (glibc's ``localedef``, from
    Debian's ``locales`` sources), for ``LOCPATH``: the image has no locale but C."""
    where = tmp_path_factory.mktemp("locales")
    done = subprocess.run(
        ["localedef", "-i", "de_DE", "-f", "UTF-8", str(where / "de_DE.UTF-8")],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert (where / "de_DE.UTF-8").is_dir(), (
        f"localedef failed ({done.returncode}): {done.stderr!r}; apt-get install locales"
    )
    return where


@pytest.fixture
def german_time(german_locales: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """LC_TIME set to German for the test (as an application may set it), then restored."""
    monkeypatch.setenv("LOCPATH", str(german_locales))  # glibc reads it at each setlocale
    saved = locale.setlocale(locale.LC_TIME)
    locale.setlocale(locale.LC_TIME, "de_DE.UTF-8")
    try:
        assert dt.datetime(2026, 3, 1, tzinfo=dt.UTC).strftime("%a %b") == "So Mär"
        yield
    finally:
        locale.setlocale(locale.LC_TIME, saved)


@pytest.mark.usefixtures("german_time")
def test_report_dates_do_not_follow_the_process_locale() -> None:
    """Bug: ``Will-Retry-Until``, ``Last-Attempt-Date`` and the text's "(retried until
    ...)" were written with ``strftime``, whose day and month names follow LC_TIME: an
    application running in a German locale sent "So, 01 Mär 2026 ..." (not an RFC 5322
    date, and not even ASCII). RFC 5322 §3.3 names the days and months in English."""
    dsn_out = MemoryTransport()
    clock = FakeClock()
    tracker = make(deferring("a@example.org"), MemoryStore(), clock, dsn_out)
    tracker.submit(message("a@example.org"))
    clock.now = T0 + 3 * HOUR
    tracker.run_pending()
    (sent,) = dsn_out.outbox
    raw = sent.message.as_bytes()
    assert raw.isascii()
    assert b"Will-Retry-Until: Sun, 01 Mar 2026 12:00:00 +0000" in raw
    assert b"Last-Attempt-Date: Sun, 01 Mar 2026 11:00:00 +0000" in raw
    assert "(retried until Sun, 01 Mar 2026 12:00:00 +0000)" in " ".join(raw.decode().split())
    (warning,) = warnings(dsn_out.outbox)
    (about,) = warning.recipients
    assert about.will_retry_until is not None
    assert email.utils.parsedate_to_datetime(about.will_retry_until) == DEADLINE


# -- Will-Retry-Until is when the tracker really gives up ----------------------------


def test_will_retry_until_is_the_next_attempt_a_hook_cannot_pass() -> None:
    """A hook asking for a ten-day wait is held to the deadline (the last try is made
    then): the warning's Will-Retry-Until is that very time, and the try at it expires
    the recipient."""
    policy = RetryPolicy(initial=1800, max_age=4 * 3600, hook=lambda _a, _r: 10 * 86400.0)
    dsn_out = MemoryTransport()
    clock = FakeClock()
    tracker = DeliveryTracker(
        deferring("a@example.org"),
        MemoryStore(),
        clock=clock,
        random=no_jitter,
        retry=policy,
        dsn_transport=dsn_out,
        delay_warning_after=HOUR,
    )
    tracking_id = tracker.submit(message("a@example.org"))
    clock.now = T0 + 3 * HOUR
    tracker.run_pending()
    (recipient,) = tracker.status(tracking_id).recipients
    (warning,) = warnings(dsn_out.outbox)
    (about,) = warning.recipients
    assert about.will_retry_until is not None
    assert email.utils.parsedate_to_datetime(about.will_retry_until) == DEADLINE
    assert recipient.next_attempt_at == DEADLINE
    clock.now = DEADLINE
    tracker.run_pending()
    (recipient,) = tracker.status(tracking_id).recipients
    assert recipient.state is State.EXPIRED
    assert recipient.attempts[-1].at == DEADLINE


# -- the once-only promise, SQLite, split or not, over many rounds -------------------------


_CODES = {"450": TEMPFAIL, "550": Reply.of(550, "5.1.1 no")}


@settings(max_examples=20, deadline=None)
@given(
    answers=st.lists(
        st.lists(st.sampled_from(["450", "450", "250", "550"]), max_size=5),
        min_size=3,
        max_size=3,
    ),
    lateness=st.lists(st.integers(min_value=0, max_value=90), min_size=6, max_size=6),
    after_minutes=st.integers(min_value=0, max_value=240),
    split=st.booleans(),
)
def test_sqlite_warns_each_recipient_once_exactly_when_deferred_late(
    answers: list[list[str]], lateness: list[int], after_minutes: int, split: bool
) -> None:
    """The property of ``test_engine_delay`` on SQLite, where results take the fast path
    (no mark to set) or the general one (a mark), with ``split_by_domain`` or not: each
    recipient is warned about iff an attempt deferred it late, in exactly one report, and
    no commit queues two delay reports for one message."""
    addresses = ["a@one.example", "b@two.example", "c@one.example"]
    queues = {Address.parse(a): list(q) for a, q in zip(addresses, answers, strict=True)}

    def handler(_m: Message, envelope: Envelope) -> dict[Address, Reply]:
        out = {}
        for r in envelope.recipients:
            code = queues[r.address].pop(0) if queues[r.address] else "450"
            if code != "250":
                out[r.address] = _CODES[code]
        return out

    with tempfile.TemporaryDirectory() as where:
        store = SQLiteStore(Path(where) / "q.db")
        try:
            dsn_out = MemoryTransport()
            clock = FakeClock()
            after = dt.timedelta(minutes=after_minutes)
            tracker = make(
                MemoryTransport(handler),
                store,
                clock,
                dsn_out,
                delay_warning_after=after,
                split_by_domain=split,
            )
            tracking_id = tracker.submit(message(*addresses))
            for late in lateness:
                tracker.run_pending()
                due = tracker.next_due()
                if due is None:
                    break
                clock.now = max(clock.now, due) + dt.timedelta(minutes=late)
            tracker.run_pending()
            reports = warnings(dsn_out.outbox)
            warned_in = [r.address for report in reports for r in report.recipients]
            for recipient in tracker.status(tracking_id).recipients:
                late_deferral = any(
                    a.code == 450 and a.at - T0 >= after and a.at < DEADLINE
                    for a in recipient.attempts
                )
                assert recipient.delay_warned is late_deferral
                assert warned_in.count(str(recipient.address)) == (1 if late_deferral else 0)
            # One report per commit: no two reports from one instant.
            dates = [report.recipients[0].last_attempt_date for report in reports]
            assert len(dates) == len(set(dates))
        finally:
            store.close()
