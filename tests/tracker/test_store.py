"""The Store contract, run against MemoryStore, SQLiteStore and PostgresStore alike."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailrelay.address import Address
from mailrelay.envelope import Envelope, Notify, Recipient
from mailrelay.errors import ConfigurationError, StoreError
from mailrelay.tracker import sqlite_store
from mailrelay.tracker.sqlite_store import MIGRATIONS, SCHEMA_VERSION, SQLiteStore
from mailrelay.tracker.store import (
    Attempt,
    Change,
    Claim,
    MemoryStore,
    MessageRecord,
    RecipientRecord,
    State,
    Store,
    envelope_from_json,
    envelope_to_json,
    from_micros,
    to_micros,
)

T0 = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
LEASE = dt.timedelta(minutes=5)


def make_record(
    tracking_id: str,
    *,
    recipients: tuple[str, ...] = ("a@example.org", "b@example.net"),
    created: dt.datetime = T0,
    due: dt.datetime | None = T0,
    message_id: str | None = None,
    envid: str | None = None,
    size: int = 5,
) -> MessageRecord:
    envelope = Envelope("sender@example.com", recipients, envid=envid)
    return MessageRecord(
        id=tracking_id,
        created_at=created,
        envelope=envelope,
        message_id=message_id,
        size=size,
        recipients=tuple(
            RecipientRecord(address=r.address, state=State.QUEUED, next_attempt_at=due)
            for r in envelope.recipients
        ),
    )


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "postgres":  # tests/peers/postgres.py: a fresh schema, dropped after
        yield request.getfixturevalue("postgres_store")
        return
    made: Store = MemoryStore() if request.param == "memory" else SQLiteStore(tmp_path / "t.db")
    yield made
    made.close()


def addr(text: str) -> Address:
    return Address.parse(text)


def test_add_get_and_content_round_trip(store: Store) -> None:
    record = make_record("m1", message_id="x@y", envid="env-1", size=10)
    store.add(record, [b"hello", b"world"])
    assert store.get("m1") == record
    assert store.content("m1") == b"helloworld"
    assert store.get("nope") is None
    with pytest.raises(KeyError):
        store.content("nope")


def test_add_refuses_duplicates_and_wrong_sizes(store: Store) -> None:
    store.add(make_record("m1"), [b"12345"])
    with pytest.raises(ValueError, match="already stored"):
        store.add(make_record("m1"), [b"12345"])
    with pytest.raises(ValueError, match="bytes"):
        store.add(make_record("m2", size=5), [b"1234"])
    with pytest.raises(ValueError, match="bytes"):
        store.add(make_record("m3", size=5), [b"123456"])
    # A failed add leaves nothing behind.
    assert store.get("m2") is None
    assert store.get("m3") is None


def test_empty_content(store: Store) -> None:
    store.add(make_record("m0", size=0), [])
    assert store.content("m0") == b""


def test_claim_takes_due_recipients_under_a_lease(store: Store) -> None:
    store.add(make_record("m1"), [b"12345"])
    store.add(make_record("later", due=T0 + dt.timedelta(hours=1)), [b"12345"])
    claims = store.claim(worker="w1", now=T0, lease=LEASE, limit=10)
    assert [c.tracking_id for c in claims] == ["m1"]
    assert claims[0].addresses == (addr("a@example.org"), addr("b@example.net"))
    assert claims[0].lease_until == T0 + LEASE
    record = store.get("m1")
    assert record is not None
    assert {r.state for r in record.recipients} == {State.SENDING}
    assert {r.lease_owner for r in record.recipients} == {"w1"}
    # Held by a current lease: nobody else gets them.
    assert store.claim(worker="w2", now=T0 + dt.timedelta(minutes=1), lease=LEASE, limit=10) == []


def test_claim_respects_limit_and_due_order(store: Store) -> None:
    for index, minutes in enumerate([30, 10, 20]):
        store.add(make_record(f"m{index}", due=T0 + dt.timedelta(minutes=minutes)), [b"12345"])
    now = T0 + dt.timedelta(hours=1)
    first = store.claim(worker="w", now=now, lease=LEASE, limit=2)
    assert [c.tracking_id for c in first] == ["m1", "m2"]
    second = store.claim(worker="w", now=now, lease=LEASE, limit=2)
    assert [c.tracking_id for c in second] == ["m0"]


def test_expired_lease_is_reclaimed_and_the_old_worker_loses_it(store: Store) -> None:
    store.add(make_record("m1"), [b"12345"])
    store.claim(worker="dead", now=T0, lease=LEASE, limit=10)
    later = T0 + LEASE
    claims = store.claim(worker="alive", now=later, lease=LEASE, limit=10)
    assert [c.tracking_id for c in claims] == ["m1"]
    attempt = Attempt(at=later, code=250, text="ok")
    # The dead worker's late result is kept in the history but changes nothing.
    changed = store.apply(
        "m1",
        [Change(address=addr("a@example.org"), state=State.DELIVERED, attempt=attempt)],
        worker="dead",
    )
    assert changed == ()
    record = store.get("m1")
    assert record is not None
    first = record.recipient("a@example.org")
    assert first.state is State.SENDING
    assert first.lease_owner == "alive"
    assert first.attempts == (attempt,)
    changed = store.apply(
        "m1",
        [Change(address=addr("a@example.org"), state=State.DELIVERED, attempt=attempt)],
        worker="alive",
    )
    assert changed == (addr("a@example.org"),)
    record = store.get("m1")
    assert record is not None
    first = record.recipient("a@example.org")
    assert (first.state, first.lease_owner, first.lease_until) == (State.DELIVERED, None, None)
    assert first.attempts == (attempt, attempt)


def test_deferred_becomes_due_at_its_time(store: Store) -> None:
    store.add(make_record("m1", recipients=("a@example.org",)), [b"12345"])
    store.claim(worker="w", now=T0, lease=LEASE, limit=10)
    retry_at = T0 + dt.timedelta(minutes=10)
    store.apply(
        "m1",
        [Change(address=addr("a@example.org"), state=State.DEFERRED, next_attempt_at=retry_at)],
        worker="w",
    )
    assert store.next_due() == retry_at
    assert (
        store.claim(worker="w", now=retry_at - dt.timedelta(seconds=1), lease=LEASE, limit=5) == []
    )
    assert len(store.claim(worker="w", now=retry_at, lease=LEASE, limit=5)) == 1
    assert store.next_due() == retry_at + LEASE


@pytest.mark.parametrize("final", [State.DELIVERED, State.BOUNCED, State.EXPIRED, State.CANCELLED])
def test_final_states_change_only_when_expected(store: Store, final: State) -> None:
    a = addr("a@example.org")
    store.add(make_record("m1", recipients=("a@example.org",)), [b"12345"])
    assert store.apply("m1", [Change(address=a, state=final)]) == (a,)
    assert store.next_due() is None
    assert store.apply("m1", [Change(address=a, state=State.QUEUED, next_attempt_at=T0)]) == ()
    assert store.apply(
        "m1", [Change(address=a, state=State.BOUNCED, expect=frozenset({final}))]
    ) == (a,)
    record = store.get("m1")
    assert record is not None
    assert record.recipient(a).state is State.BOUNCED


def test_apply_to_an_unknown_message_raises(store: Store) -> None:
    with pytest.raises(KeyError):
        store.apply("nope", [Change(address=addr("a@example.org"), state=State.CANCELLED)])


def test_find_and_lookup(store: Store) -> None:
    store.add(make_record("old", created=T0, message_id="m-old@x"), [b"12345"])
    store.add(make_record("new", created=T0 + dt.timedelta(days=1), envid="E1"), [b"12345"])
    store.apply("new", [Change(address=addr("a@example.org"), state=State.BOUNCED)])
    assert [r.id for r in store.find()] == ["old", "new"]
    assert [r.id for r in store.find(state=State.BOUNCED)] == ["new"]
    assert [r.id for r in store.find(state=State.QUEUED)] == ["old", "new"]
    assert [r.id for r in store.find(created_before=T0 + dt.timedelta(hours=1))] == ["old"]
    assert [r.id for r in store.find(limit=1)] == ["old"]
    assert store.find(state=State.EXPIRED) == []
    assert store.lookup(envid="E1") == ["new"]
    assert store.lookup(message_id="m-old@x") == ["old"]
    assert store.lookup(envid="nothing") == []


def test_two_workers_never_claim_the_same_recipient(store: Store) -> None:
    count = 40
    for index in range(count):
        store.add(make_record(f"m{index:03}"), [b"12345"])
    taken: dict[str, list[tuple[str, Address]]] = {"w1": [], "w2": []}
    barrier = threading.Barrier(2)

    def work(worker: str) -> None:
        barrier.wait(timeout=10)
        for _ in range(count):  # bounded: each round takes at least one message or stops
            claims = store.claim(worker=worker, now=T0, lease=LEASE, limit=3)
            if not claims:
                return
            for claim in claims:
                taken[worker].extend((claim.tracking_id, a) for a in claim.addresses)

    threads = [threading.Thread(target=work, args=(w,)) for w in taken]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    both = taken["w1"] + taken["w2"]
    assert len(both) == len(set(both)) == count * 2
    assert not set(taken["w1"]) & set(taken["w2"])


# -- SQLite specifics ---------------------------------------------------------------


def test_sqlite_persists_across_reopen_and_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    first = SQLiteStore(path)
    record = make_record("m1")
    first.add(record, [b"12345"])
    first.close()
    second = SQLiteStore(path)
    assert second.get("m1") == record
    assert second.schema_version == SCHEMA_VERSION
    second.close()
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize("existing", [False, True], ids=["new-file", "existing-table"])
def test_sqlite_opens_a_file_another_connection_is_writing(tmp_path: Path, existing: bool) -> None:
    # Another writer holds the lock of a database still in rollback-journal mode (as when
    # several workers open a new database at once, or an old file is being written).
    # SQLite refuses the switch to WAL at once, without the busy timeout: the store must
    # wait for the lock as for any other write, not fail.
    path = tmp_path / "t.db"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    if existing:
        holder.execute("CREATE TABLE other (a)")
    holder.execute("BEGIN IMMEDIATE")
    release = threading.Timer(0.3, lambda: holder.execute("COMMIT"))
    release.start()
    try:
        store = SQLiteStore(path, busy_timeout=30)
    finally:
        release.join()
        holder.close()
    try:
        store.add(make_record("m1"), [b"12345"])
        assert store.get("m1") == make_record("m1")
    finally:
        store.close()
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_sqlite_gives_up_on_a_lock_held_past_the_busy_timeout(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreError, match="locked") as caught:
            SQLiteStore(path, busy_timeout=0.2)
        assert caught.value.is_transient
    finally:
        holder.execute("COMMIT")
        holder.close()


def test_sqlite_migrates_an_old_schema(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    raw = sqlite3.connect(path)
    raw.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    raw.execute("INSERT INTO schema_version VALUES (1)")
    raw.executescript(MIGRATIONS[0])
    raw.commit()
    raw.close()
    store = SQLiteStore(path)
    assert store.schema_version == SCHEMA_VERSION
    store.add(make_record("m1", envid="E"), [b"12345"])
    assert store.lookup(envid="E") == ["m1"]
    store.close()
    with sqlite3.connect(path) as check:
        names = {row[0] for row in check.execute("SELECT name FROM sqlite_master")}
    assert "messages_envid" in names


def test_sqlite_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    with sqlite3.connect(path) as raw:
        raw.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        raw.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION + 1,))
    with pytest.raises(ConfigurationError, match="upgrade"):
        SQLiteStore(path)


@pytest.mark.parametrize(("path", "synchronous"), [(":memory:", "FULL"), ("x.db", "SOMETIMES")])
def test_sqlite_refuses_bad_configuration(tmp_path: Path, path: str, synchronous: str) -> None:
    target = path if path == ":memory:" else str(tmp_path / path)
    with pytest.raises(ConfigurationError):
        SQLiteStore(target, synchronous=synchronous)


def test_sqlite_closed_store_refuses_work(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    store.close()
    with pytest.raises(ConfigurationError, match="closed"):
        store.get("m1")


# -- values ------------------------------------------------------------------------


@given(st.datetimes(timezones=st.just(dt.UTC), min_value=dt.datetime(1971, 1, 1)))
def test_micros_round_trip(when: dt.datetime) -> None:
    assert from_micros(to_micros(when)) == when


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        Attempt(at=dt.datetime(2026, 1, 1))


@given(
    st.lists(st.sampled_from(["a@example.org", "b@x.example", "Ünï@bücher.example"]), min_size=1),
    st.sampled_from([None, "SUCCESS", "FAILURE,DELAY", "NEVER"]),
    st.sampled_from([None, "FULL", "HDRS"]),
    st.sampled_from([None, "env-1"]),
    st.booleans(),
)
def test_envelope_json_round_trip(
    recipients: list[str], notify: str | None, ret: str | None, envid: str | None, tls: bool
) -> None:
    envelope = Envelope(
        "s@example.com",
        [Recipient(r, orcpt="o@example.org") for r in recipients],
        notify=notify,
        ret=ret,
        envid=envid,
        requiretls=tls,
    )
    assert envelope_from_json(envelope_to_json(envelope)) == envelope
    null = attrs.evolve(envelope, sender=None)
    assert envelope_from_json(envelope_to_json(null)) == null


def _reference_json(envelope: Envelope) -> str:
    """The stored form as json itself writes it (what envelope_to_json must equal)."""

    def notify(values: frozenset[Notify] | None) -> list[str] | None:
        return None if values is None else sorted(v.value for v in values)

    data = {
        "sender": None if envelope.sender is None else str(envelope.sender),
        "recipients": [
            {
                "address": str(r.address),
                "notify": notify(r.notify),
                "orcpt": None if r.orcpt is None else str(r.orcpt),
            }
            for r in envelope.recipients
        ],
        "ret": None if envelope.ret is None else envelope.ret.value,
        "envid": envelope.envid,
        "notify": notify(envelope.notify),
        "requiretls": envelope.requiretls,
    }
    return json.dumps(data, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


@given(
    st.sampled_from([None, "s@example.com", '"a\\"b\\\\c"@example.com']),
    st.lists(
        st.tuples(
            st.sampled_from(["a@example.org", "Ünï@bücher.example", '"a b"@[127.0.0.1]']),
            st.sampled_from([None, "NEVER", "SUCCESS,FAILURE,DELAY"]),
            st.sampled_from([None, "o@example.org", "Ø@example.org"]),
        ),
        min_size=1,
        max_size=3,
    ),
    st.tuples(
        st.sampled_from([None, "SUCCESS", "FAILURE,DELAY"]),
        st.sampled_from([None, "FULL", "HDRS"]),
        st.sampled_from([None, "env-1", "0123abcd"]),
        st.booleans(),
    ),
)
def test_envelope_json_is_json_itself_would_write(
    sender: str | None,
    recipients: list[tuple[str, str | None, str | None]],
    options: tuple[str | None, str | None, str | None, bool],
) -> None:
    notify, ret, envid, tls = options
    envelope = Envelope(
        sender,
        [Recipient(a, notify=n, orcpt=o) for a, n, o in recipients],
        notify=notify,
        ret=ret,
        envid=envid,
        requiretls=tls,
    )
    text = envelope_to_json(envelope)
    assert text == _reference_json(envelope)
    assert envelope_from_json(text) == envelope


def test_add_many_is_all_or_nothing(store: Store) -> None:
    store.add_many([(make_record("m1"), [b"12345"]), (make_record("m2"), [b"123", b"45"])])
    assert store.content("m2") == b"12345"
    with pytest.raises(ValueError):  # noqa: PT011 -- duplicate or size, worded per store
        store.add_many([(make_record("m3"), [b"12345"]), (make_record("m1"), [b"12345"])])
    assert store.get("m3") is None
    with pytest.raises(ValueError, match="bytes"):
        store.add_many([(make_record("m4"), [b"12345"]), (make_record("m5"), [b"1"])])
    assert store.get("m4") is None


def test_apply_many_commits_several_messages_at_once(store: Store) -> None:
    store.add_many([(make_record(f"m{i}"), [b"12345"]) for i in range(3)])
    claims = store.claim(worker="w", now=T0, lease=LEASE, limit=10)
    attempt = Attempt(at=T0, code=250, text="ok")
    batch = [
        (claim.tracking_id, [Change(address=a, state=State.DELIVERED, attempt=attempt)])
        for claim in claims
        for a in claim.addresses[:1]
    ]
    changed = store.apply_many(batch, worker="w")
    assert changed == [(addr("a@example.org"),)] * 3
    for index in range(3):
        record = store.get(f"m{index}")
        assert record is not None
        assert [r.state for r in record.recipients] == [State.DELIVERED, State.SENDING]
        assert record.recipients[0].attempts == (attempt,)
    with pytest.raises(KeyError):
        store.apply_many([("m0", []), ("nope", [])])


def _bounce(claims: list[Claim]) -> list[tuple[str, list[Change]]]:
    attempt = Attempt(at=T0, code=550, text="5.1.1 no such user")
    return [
        (
            claim.tracking_id,
            [Change(address=claim.addresses[0], state=State.BOUNCED, attempt=attempt)],
        )
        for claim in claims
    ]


@pytest.mark.parametrize("size", [5, sqlite_store.STREAM_THRESHOLD + 1])
def test_apply_many_adds_what_then_returns_in_the_same_commit(store: Store, size: int) -> None:
    store.add(make_record("m1"), [b"12345"])
    claims = store.claim(worker="w", now=T0, lease=LEASE, limit=10)
    seen: list[list[tuple[Address, ...]]] = []
    report = attrs.evolve(
        make_record("r1", recipients=("sender@example.com",), size=size), notification=True
    )

    def then(changed: Sequence[tuple[Address, ...]]) -> list[tuple[MessageRecord, Iterable[bytes]]]:
        seen.append(list(changed))
        return [(report, [b"x" * size])]

    changed = store.apply_many(_bounce(claims), worker="w", then=then)
    assert seen == [changed] == [[(addr("a@example.org"),)]]
    assert store.get("r1") == report
    assert store.content("r1") == b"x" * size
    due = store.claim(worker="w", now=T0, lease=LEASE, limit=10)
    assert [c.tracking_id for c in due] == ["r1"]


@pytest.mark.parametrize("failure", ["raises", "duplicate id", "wrong size"])
def test_apply_many_stores_nothing_when_then_fails(store: Store, failure: str) -> None:
    store.add(make_record("m1"), [b"12345"])
    claims = store.claim(worker="w", now=T0, lease=LEASE, limit=10)
    before = store.get("m1")

    def then(
        _changed: Sequence[tuple[Address, ...]],
    ) -> list[tuple[MessageRecord, Iterable[bytes]]]:
        if failure == "raises":
            raise RuntimeError("no report")
        record = make_record("m1" if failure == "duplicate id" else "r1")
        return [(record, [b"12345" if failure == "duplicate id" else b"1"])]

    with pytest.raises((RuntimeError, ValueError)):
        store.apply_many(_bounce(claims), worker="w", then=then)
    assert store.get("m1") == before
    assert store.get("r1") is None


def test_the_notification_flag_round_trips(store: Store) -> None:
    plain = make_record("m1")
    report = attrs.evolve(make_record("m2"), notification=True)
    store.add_many([(plain, [b"12345"]), (report, [b"12345"])])
    assert store.get("m1") == plain
    assert store.get("m2") == report
    assert [r.notification for r in store.find()] == [False, True]


# -- the two stores agree -----------------------------------------------------------

_OPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("claim"),
            st.sampled_from(["w1", "w2"]),
            st.integers(min_value=0, max_value=20),  # minutes after T0
            st.integers(min_value=1, max_value=3),  # limit
        ),
        st.tuples(
            st.just("apply"),
            st.sampled_from(["m0", "m1", "m2"]),
            st.sampled_from(["a@example.org", "b@example.net"]),
            st.sampled_from(list(State)),
            st.sampled_from([None, "w1", "w2"]),
            st.sampled_from(
                [None, frozenset({State.DELIVERED}), frozenset({State.QUEUED, State.SENDING})]
            ),
            st.integers(min_value=1, max_value=2),  # batch entries (apply_many)
        ),
    ),
    max_size=12,
)


@settings(max_examples=40, deadline=None)
@given(_OPS)
def test_memory_and_sqlite_stores_agree(ops: list[tuple[object, ...]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        stores: list[Store] = [MemoryStore(), SQLiteStore(Path(tmp) / "t.db")]
        try:
            for store in stores:
                store.add_many(
                    [
                        (make_record(f"m{i}", due=T0 + dt.timedelta(minutes=i)), [b"12345"])
                        for i in range(3)
                    ]
                )
            for op in ops:
                outcomes: list[object] = []
                for store in stores:
                    if op[0] == "claim":
                        _, worker, minutes, limit = op
                        assert isinstance(worker, str)
                        assert isinstance(minutes, int)
                        assert isinstance(limit, int)
                        now = T0 + dt.timedelta(minutes=minutes)
                        outcomes.append(
                            store.claim(worker=worker, now=now, lease=LEASE, limit=limit)
                        )
                    else:
                        _, tracking_id, address, state, worker, expect, entries = op
                        assert isinstance(tracking_id, str)
                        assert isinstance(address, str)
                        assert isinstance(state, State)
                        assert worker is None or isinstance(worker, str)
                        assert expect is None or isinstance(expect, frozenset)
                        assert isinstance(entries, int)
                        change = Change(
                            address=addr(address),
                            state=state,
                            attempt=Attempt(at=T0, text="x"),
                            next_attempt_at=T0 + dt.timedelta(minutes=5),
                            expect=expect,
                        )
                        outcomes.append(
                            store.apply_many([(tracking_id, [change])] * entries, worker=worker)
                        )
                assert outcomes[0] == outcomes[1], op
            for tracking_id in ("m0", "m1", "m2"):
                assert stores[0].get(tracking_id) == stores[1].get(tracking_id)
            assert stores[0].next_due() == stores[1].next_due()
        finally:
            for store in stores:
                store.close()


def test_get_many(store: Store) -> None:
    records = [make_record(f"m{i}", message_id=f"{i}@x") for i in range(3)]
    store.add_many([(record, [b"12345"]) for record in records])
    store.apply(
        "m1",
        [
            Change(
                address=addr("a@example.org"), state=State.BOUNCED, attempt=Attempt(at=T0, code=550)
            )
        ],
    )
    found = store.get_many(["m2", "nope", "m1"])
    assert set(found) == {"m1", "m2"}
    assert found["m1"] == store.get("m1")
    assert found["m2"] == records[2]
    assert store.get_many([]) == {}


def test_apply_many_changes_one_recipient_twice_in_batch_order(store: Store) -> None:
    store.add(make_record("m1"), [b"12345"])
    a = addr("a@example.org")
    first = Attempt(at=T0, code=451, text="later")
    second = Attempt(at=T0 + dt.timedelta(minutes=1), code=250, text="ok")
    changed = store.apply_many(
        [
            ("m1", [Change(address=a, state=State.DEFERRED, attempt=first, next_attempt_at=T0)]),
            ("m1", [Change(address=a, state=State.DELIVERED, attempt=second)]),
        ]
    )
    assert changed == [(a,), (a,)]
    record = store.get("m1")
    assert record is not None
    assert record.recipient(a).state is State.DELIVERED
    assert record.recipient(a).next_attempt_at is None
    assert record.recipient(a).attempts == (first, second)


def test_claim_orders_by_earliest_due_recipient_then_id(store: Store) -> None:
    later = T0 + dt.timedelta(minutes=10)
    store.add(make_record("b", due=later), [b"12345"])
    store.add(make_record("a", due=later), [b"12345"])
    store.add(make_record("c", due=None), [b"12345"])  # no due time: due first
    mixed = make_record("d", due=later)
    early = attrs.evolve(mixed.recipients[1], next_attempt_at=T0)
    store.add(attrs.evolve(mixed, recipients=(mixed.recipients[0], early)), [b"12345"])
    claims = store.claim(worker="w", now=later, lease=LEASE, limit=3)
    assert [c.tracking_id for c in claims] == ["c", "d", "a"]
    assert claims[1].addresses == (addr("a@example.org"), addr("b@example.net"))
    assert [c.tracking_id for c in store.claim(worker="w", now=later, lease=LEASE, limit=3)] == [
        "b"
    ]
    assert store.claim(worker="w", now=later, lease=LEASE, limit=0) == []


def test_sqlite_streams_large_messages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_store, "STREAM_THRESHOLD", 6)
    store = SQLiteStore(tmp_path / "t.db")
    try:
        store.add_many(
            [
                (make_record("big", size=10), [b"hello", b"world"]),
                (make_record("small", size=5), [b"12345"]),
            ]
        )
        assert store.content("big") == b"helloworld"
        assert store.content("small") == b"12345"
        with pytest.raises(ValueError, match="longer"):
            store.add(make_record("long", size=8), [b"12345", b"6789"])
        with pytest.raises(ValueError, match="bytes"):
            store.add(make_record("short", size=8), [b"12345", b"6"])
        assert store.get("long") is None
        assert store.get("short") is None
    finally:
        store.close()


def _synchronous(store: SQLiteStore) -> int:
    # 1 = NORMAL, 2 = FULL: the level the connection commits with now.
    return int(store._connection().execute("PRAGMA synchronous").fetchone()[0])


def test_sqlite_commits_submissions_and_work_at_their_own_levels(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    try:
        store.add(make_record("m1"), [b"12345"])
        assert _synchronous(store) == 2
        store.claim(worker="w", now=T0, lease=LEASE, limit=1)
        assert _synchronous(store) == 1
        attempt = Attempt(at=T0, code=250)
        a = addr("a@example.org")
        store.apply("m1", [Change(address=a, state=State.DELIVERED, attempt=attempt)], worker="w")
        assert _synchronous(store) == 1
        store.apply("m1", [Change(address=addr("b@example.net"), state=State.CANCELLED)])
        assert _synchronous(store) == 2
    finally:
        store.close()
    strict = SQLiteStore(tmp_path / "strict.db", work_synchronous="FULL")
    try:
        strict.add(make_record("m1"), [b"12345"])
        strict.claim(worker="w", now=T0, lease=LEASE, limit=1)
        assert _synchronous(strict) == 2
    finally:
        strict.close()


def test_sqlite_refuses_a_bad_work_synchronous(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="work_synchronous"):
        SQLiteStore(tmp_path / "t.db", work_synchronous="OFF")


def test_sqlite_migration_three_replaces_the_due_indexes(tmp_path: Path) -> None:
    path = tmp_path / "v2.db"
    raw = sqlite3.connect(path)
    raw.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    raw.execute("INSERT INTO schema_version VALUES (2)")
    raw.executescript(MIGRATIONS[0] + MIGRATIONS[1])
    raw.commit()
    raw.close()
    SQLiteStore(path).close()
    with sqlite3.connect(path) as check:
        names = {row[0] for row in check.execute("SELECT name FROM sqlite_master")}
    assert {"recipients_due_order", "recipients_lease_order"} <= names
    assert not {"recipients_due", "recipients_lease"} & names


def test_sqlite_migration_four_marks_existing_messages_as_the_applications(
    tmp_path: Path,
) -> None:
    path = tmp_path / "v3.db"
    raw = sqlite3.connect(path)
    raw.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    raw.execute("INSERT INTO schema_version VALUES (3)")
    raw.executescript(MIGRATIONS[0] + MIGRATIONS[1] + MIGRATIONS[2])
    record = make_record("m1")
    raw.execute(
        "INSERT INTO messages (id, created_at, envelope, message_id, envid, size, content)"
        " VALUES (?, ?, ?, NULL, NULL, 5, ?)",
        ("m1", to_micros(T0), envelope_to_json(record.envelope), b"12345"),
    )
    raw.commit()
    raw.close()
    store = SQLiteStore(path)
    try:
        assert store.schema_version == SCHEMA_VERSION
        found = store.get("m1")
        assert found is not None
        assert found.notification is False
    finally:
        store.close()


def test_sqlite_migration_five_keeps_only_envids_in_their_index(tmp_path: Path) -> None:
    path = tmp_path / "v4.db"
    raw = sqlite3.connect(path)
    raw.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    raw.execute("INSERT INTO schema_version VALUES (4)")
    raw.executescript("".join(MIGRATIONS[:4]))
    # Written before the migration: one message with an ENVID, one without.
    for tracking_id, envid in (("m1", "E"), ("m2", None)):
        record = make_record(tracking_id, envid=envid)
        raw.execute(
            "INSERT INTO messages (id, created_at, envelope, message_id, envid, size, content)"
            " VALUES (?, ?, ?, NULL, ?, 5, ?)",
            (tracking_id, to_micros(T0), envelope_to_json(record.envelope), envid, b"12345"),
        )
    raw.commit()
    raw.close()
    store = SQLiteStore(path)
    try:
        assert store.schema_version == SCHEMA_VERSION
        store.add(make_record("m3", envid="E"), [b"12345"])
        store.add(make_record("m4"), [b"12345"])
        assert store.lookup(envid="E") == ["m1", "m3"]
        conn = store._connection()
        (sql,) = conn.execute(
            "SELECT sql FROM sqlite_master WHERE name = 'messages_envid'"
        ).fetchone()
        assert sql.endswith("WHERE envid IS NOT NULL")
        # The partial index answers for the messages stored before and after, and the
        # lookups' "envid = ?" (which implies "IS NOT NULL") still reads it.
        assert conn.execute(
            "SELECT COUNT(*) FROM messages INDEXED BY messages_envid WHERE envid IS NOT NULL"
        ).fetchone() == (2,)
        plan = " ".join(
            str(row[3])
            for row in conn.execute(
                "EXPLAIN QUERY PLAN SELECT id FROM messages WHERE envid = ?", ("E",)
            )
        )
        assert "messages_envid" in plan
    finally:
        store.close()


def test_a_claim_is_fresh_until_a_recipient_has_a_history(store: Store) -> None:
    store.add_many([(make_record("m1"), [b"12345"]), (make_record("m2"), [b"12345"])])
    note = Attempt(at=T0, text="DSN delayed", source="dsn")
    # History only (no state expects it): m2's first recipient stays QUEUED, with a past.
    store.apply(
        "m2",
        [
            Change(
                address=addr("a@example.org"), state=State.QUEUED, attempt=note, expect=frozenset()
            )
        ],
    )
    claims = store.claim(worker="w", now=T0, lease=LEASE, limit=10)
    assert {c.tracking_id: c.fresh for c in claims} == {"m1": True, "m2": False}
    put_back = Change(
        address=addr("b@example.net"),
        state=State.DEFERRED,
        attempt=Attempt(at=T0, code=451),
        next_attempt_at=T0,
    )
    store.apply("m1", [put_back], worker="w")
    again = store.claim(worker="w", now=T0, lease=LEASE, limit=10)
    assert [(c.tracking_id, c.addresses, c.fresh) for c in again] == [
        ("m1", (addr("b@example.net"),), False)
    ]


def test_sqlite_claims_and_next_due_read_the_partial_indexes(tmp_path: Path) -> None:
    # The SQL names states literally (partial indexes need it): keep them State's values.
    assert [State.QUEUED.value, State.DEFERRED.value, State.SENDING.value] == [
        "queued",
        "deferred",
        "sending",
    ]
    store = SQLiteStore(tmp_path / "t.db")
    try:
        conn = store._connection()
        plans = {
            name: " ".join(
                str(row[3])
                for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", {"now": 0, "ids": "[]"})
            )
            for name, sql in [
                ("due", sqlite_store._DUE_IN_ORDER),
                ("next", sqlite_store._NEXT_DUE),
            ]
        }
    finally:
        store.close()
    for plan in plans.values():
        assert "recipients_due_order" in plan
        assert "recipients_lease_order" in plan
        assert "TEMP B-TREE" not in plan  # read in index order, never sorted whole


# -- SQLite failures become StoreError --------------------------------------------------------


def test_a_database_in_a_missing_directory_is_a_permanent_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="open the database") as caught:
        SQLiteStore(tmp_path / "missing" / "t.db")
    assert caught.value.is_transient is False
    assert isinstance(caught.value.__cause__, sqlite3.Error)


def test_a_file_that_is_not_a_database_is_a_permanent_store_error(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    path.write_bytes(b"this is not an SQLite database, just some text " * 200)
    with pytest.raises(StoreError, match="SQLITE_NOTADB") as caught:
        SQLiteStore(path)
    assert caught.value.is_transient is False


def test_a_lock_held_past_the_busy_timeout_is_a_transient_store_error(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "t.db", busy_timeout=0.05)
    other = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        with pytest.raises(StoreError, match="SQLITE_BUSY") as caught:
            store.add(make_record("m1"), [b"hello"])
        assert caught.value.is_transient is True
        other.execute("ROLLBACK")
        # Nothing was stored, and the store's connection is usable again.
        assert store.get("m1") is None
        store.add(make_record("m1"), [b"hello"])
        assert store.content("m1") == b"hello"
    finally:
        other.close()
        store.close()


def test_a_full_database_is_a_transient_store_error_and_leaves_the_store_usable(
    tmp_path: Path,
) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    try:
        store.add(make_record("m1"), [b"hello"])
        # This thread's connection may not grow the file any more (as on a full disk).
        conn = store._connection()  # this thread's
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages}")
        big = b"x" * 200_000
        with pytest.raises(StoreError, match="SQLITE_FULL") as caught:
            store.add(make_record("m2", size=len(big)), [big])
        assert caught.value.is_transient is True
        assert store.get("m2") is None  # all or nothing
        conn.execute("PRAGMA max_page_count = 1073741823")
        store.add(make_record("m2", size=len(big)), [big])
        assert store.content("m2") == big
    finally:
        store.close()


# -- the delay-warning mark (RecipientRecord.delay_warned) ------------------------------


def _deferred(address: Address, *, warned: bool | None) -> Change:
    return Change(
        address=address,
        state=State.DEFERRED,
        attempt=Attempt(at=T0, code=450, enhanced="4.2.1", text="later"),
        next_attempt_at=T0 + dt.timedelta(hours=1),
        delay_warned=warned,
    )


def test_a_new_recipient_is_not_delay_warned(store: Store) -> None:
    store.add(make_record("m1"), [b"12345"])
    found = store.get("m1")
    assert found is not None
    assert [r.delay_warned for r in found.recipients] == [False, False]


def test_the_delay_warned_mark_round_trips_through_add(store: Store) -> None:
    record = make_record("m1")
    marked = attrs.evolve(
        record, recipients=(attrs.evolve(record.recipients[0], delay_warned=True),)
    )
    marked = attrs.evolve(marked, recipients=(*marked.recipients, record.recipients[1]))
    store.add(marked, [b"12345"])
    assert store.get("m1") == marked


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        (True, None, True),  # set, then kept by a change that does not say
        (None, None, False),  # never set
        (True, True, True),
        (None, True, True),  # set by a later deferral
    ],
)
def test_a_workers_change_sets_the_delay_warned_mark_and_later_ones_keep_it(
    store: Store, first: bool | None, second: bool | None, expected: bool
) -> None:
    store.add(make_record("m1", recipients=("a@example.org",)), [b"12345"])
    a = addr("a@example.org")
    store.claim(worker="w", now=T0, lease=LEASE, limit=1)
    assert store.apply_many([("m1", [_deferred(a, warned=first)])], worker="w") == [(a,)]
    later = T0 + dt.timedelta(hours=1)
    store.claim(worker="w", now=later, lease=LEASE, limit=1)
    assert store.apply_many([("m1", [_deferred(a, warned=second)])], worker="w") == [(a,)]
    found = store.get("m1")
    assert found is not None
    (recipient,) = found.recipients
    assert recipient.state is State.DEFERRED
    assert len(recipient.attempts) == 2
    assert recipient.delay_warned is expected


def test_a_change_that_does_not_apply_sets_no_delay_warned_mark(store: Store) -> None:
    # The lease was lost (another worker holds the recipient now): history only.
    store.add(make_record("m1", recipients=("a@example.org",)), [b"12345"])
    a = addr("a@example.org")
    store.claim(worker="w1", now=T0, lease=LEASE, limit=1)
    store.claim(worker="w2", now=T0 + LEASE, lease=LEASE, limit=1)
    assert store.apply_many([("m1", [_deferred(a, warned=True)])], worker="w1") == [()]
    found = store.get("m1")
    assert found is not None
    (recipient,) = found.recipients
    assert (recipient.state, recipient.lease_owner) == (State.SENDING, "w2")
    assert recipient.delay_warned is False
    assert len(recipient.attempts) == 1


def test_the_delay_warned_mark_is_stored_with_what_then_adds_or_not_at_all(
    store: Store,
) -> None:
    store.add(make_record("m1", recipients=("a@example.org",)), [b"12345"])
    a = addr("a@example.org")
    store.claim(worker="w", now=T0, lease=LEASE, limit=1)

    def failing(_changed: Sequence[tuple[Address, ...]]) -> list[tuple[MessageRecord, list[bytes]]]:
        raise RuntimeError("the warning could not be built")

    with pytest.raises(RuntimeError):
        store.apply_many([("m1", [_deferred(a, warned=True)])], worker="w", then=failing)
    found = store.get("m1")
    assert found is not None
    assert found.recipients[0].delay_warned is False
    assert found.recipients[0].state is State.SENDING  # nothing applied
    warning = make_record("warning", recipients=("sender@example.com",))

    def queued(changed: Sequence[tuple[Address, ...]]) -> list[tuple[MessageRecord, list[bytes]]]:
        assert changed == [(a,)]
        return [(warning, [b"12345"])]

    store.apply_many([("m1", [_deferred(a, warned=True)])], worker="w", then=queued)
    found = store.get("m1")
    assert found is not None
    assert found.recipients[0].delay_warned is True
    assert store.get("warning") == warning


def test_sqlite_migration_six_adds_the_delay_warned_mark(tmp_path: Path) -> None:
    path = tmp_path / "v5.db"
    raw = sqlite3.connect(path)
    raw.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    raw.execute("INSERT INTO schema_version VALUES (5)")
    raw.executescript("".join(MIGRATIONS[:5]))
    record = make_record("m1")
    raw.execute(
        "INSERT INTO messages (id, created_at, envelope, message_id, envid, size, content)"
        " VALUES (?, ?, ?, NULL, NULL, 5, ?)",
        ("m1", to_micros(T0), envelope_to_json(record.envelope), b"12345"),
    )
    for position, recipient in enumerate(record.recipients):
        raw.execute(
            "INSERT INTO recipients (message, position, address, state, next_attempt_at)"
            " VALUES (?, ?, ?, 'deferred', ?)",
            ("m1", position, str(recipient.address), to_micros(T0)),
        )
    raw.commit()
    raw.close()
    store = SQLiteStore(path)
    try:
        assert store.schema_version == SCHEMA_VERSION == 6
        found = store.get("m1")
        assert found is not None
        assert [(r.state, r.delay_warned) for r in found.recipients] == [
            (State.DEFERRED, False),
            (State.DEFERRED, False),
        ]
        # The column takes the mark from now on.
        a = found.recipients[0].address
        store.claim(worker="w", now=T0, lease=LEASE, limit=1)
        store.apply_many([("m1", [_deferred(a, warned=True)])], worker="w")
        found = store.get("m1")
        assert found is not None
        assert [r.delay_warned for r in found.recipients] == [True, False]
    finally:
        store.close()
