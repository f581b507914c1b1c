"""PostgresStore against a real PostgreSQL server (tests/peers/postgres.py).

The Store contract itself runs on PostgresStore in tests/tracker/test_store.py (its ``store``
fixture). This module holds what is PostgreSQL's own: the schema and its migrations, several
stores ("machines") claiming from one database at once, worker processes sharing it for real
(one killed mid-send), errors translated to ``StoreError``, both trackers end to end, the
ImportError without psycopg, and the example of docs/postgres.md.

Run as ``python -m tests.tracker.test_postgres_store ...`` it is one worker process of
:func:`test_worker_processes_share_one_database_and_survive_one_being_killed`.
"""

from __future__ import annotations

import ast
import asyncio
import datetime as dt
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
from hypothesis import given, settings
from psycopg import sql

from mailrelay.address import Address
from mailrelay.envelope import Envelope
from mailrelay.errors import ConfigurationError, StoreError
from mailrelay.message import Message
from mailrelay.options import TLS, Timeouts
from mailrelay.reply import Reply
from mailrelay.tracker import postgres_store as postgres_store_module
from mailrelay.tracker.async_engine import AsyncDeliveryTracker
from mailrelay.tracker.engine import DeliveryTracker
from mailrelay.tracker.postgres_store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    PostgresStore,
    is_transient_sqlstate,
)
from mailrelay.tracker.store import Attempt, Change, MemoryStore, State, Store
from mailrelay.transport import MemoryTransport, SMTPTransport
from tests.peers.aiosmtpd_server import AiosmtpdFactory
from tests.peers.postgres import PostgresInstance, find_binaries
from tests.peers.scripted import free_port
from tests.tracker.test_engine_workers import _SEQ, _DyingTransport, _message, _wait_for
from tests.tracker.test_store import _OPS, LEASE, T0, make_record
from tests.transport.test_docs import python_blocks, server_blocks

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "postgres.md"
R = TypeVar("R")


def run(coro: Coroutine[Any, Any, R]) -> R:
    return asyncio.run(coro)


@pytest.fixture
def schema(postgres: PostgresInstance) -> Iterator[str]:
    """A fresh schema name, dropped after the test (whatever made it)."""
    name = postgres.new_schema()
    yield name
    postgres.drop_schema(name)


def _admin(postgres: PostgresInstance) -> psycopg.Connection[Any]:
    return psycopg.connect(postgres.dsn, autocommit=True)


def _tables(postgres: PostgresInstance, schema: str) -> set[str]:
    with _admin(postgres) as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = %s", (schema,)
        ).fetchall()
    return {row[0] for row in rows}


# -- schema and migrations ------------------------------------------------------------


def test_an_empty_database_is_migrated_and_reopened(
    postgres: PostgresInstance, schema: str
) -> None:
    assert _tables(postgres, schema) == set()
    first = PostgresStore(postgres.dsn, schema=schema)
    try:
        assert first.schema_version == SCHEMA_VERSION == len(MIGRATIONS)
        record = make_record("m1", envid="E1", message_id="x@y")
        first.add(record, [b"12345"])
    finally:
        first.close()
    assert _tables(postgres, schema) == {"schema_version", "messages", "recipients", "attempts"}
    second = PostgresStore(postgres.dsn, schema=schema)  # nothing to migrate: same data
    try:
        assert second.schema_version == SCHEMA_VERSION
        assert second.get("m1") == record
        assert second.lookup(envid="E1") == ["m1"]
    finally:
        second.close()
    with _admin(postgres) as conn:
        versions = conn.execute(
            sql.SQL("SELECT version FROM {}.schema_version").format(sql.Identifier(schema))
        ).fetchall()
    assert versions == [(SCHEMA_VERSION,)]


def test_stores_opening_a_new_schema_at_once_migrate_it_once(
    postgres: PostgresInstance, schema: str
) -> None:
    count = 6
    barrier = threading.Barrier(count)
    opened: list[PostgresStore] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def open_store() -> None:
        barrier.wait(timeout=30)
        try:
            store = PostgresStore(postgres.dsn, schema=schema)
        except BaseException as exc:
            with lock:
                failures.append(exc)
            return
        with lock:
            opened.append(store)

    threads = [threading.Thread(target=open_store) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    try:
        assert failures == []
        assert len(opened) == count
        opened[0].add(make_record("m1"), [b"12345"])
        assert all(store.get("m1") is not None for store in opened)
    finally:
        for store in opened:
            store.close()
    with _admin(postgres) as conn:
        rows = conn.execute(
            sql.SQL("SELECT version FROM {}.schema_version").format(sql.Identifier(schema))
        ).fetchall()
    assert rows == [(SCHEMA_VERSION,)]


def test_a_newer_schema_is_refused(postgres: PostgresInstance, schema: str) -> None:
    PostgresStore(postgres.dsn, schema=schema).close()
    with _admin(postgres) as conn:
        conn.execute(
            sql.SQL("UPDATE {}.schema_version SET version = %s").format(sql.Identifier(schema)),
            (SCHEMA_VERSION + 1,),
        )
    with pytest.raises(ConfigurationError, match="upgrade"):
        PostgresStore(postgres.dsn, schema=schema)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"schema": "Bad-Name"}, "schema"),
        ({"schema": "x" * 64}, "schema"),
        ({"work_synchronous_commit": "sometimes"}, "work_synchronous_commit"),
        ({"lock_timeout": 0}, "lock_timeout"),
        ({"statement_timeout": -1.0}, "statement_timeout"),
    ],
)
def test_bad_configuration_is_refused(
    postgres: PostgresInstance, options: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigurationError, match=match):
        PostgresStore(postgres.dsn, **options)


def _backends(postgres: PostgresInstance, application: str) -> int:
    with _admin(postgres) as conn:
        row = conn.execute(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE application_name = %s", (application,)
        ).fetchone()
    return 0 if row is None else int(row[0])


def test_a_closed_store_refuses_work_and_closed_every_connection(
    postgres: PostgresInstance, schema: str
) -> None:
    store = PostgresStore(f"{postgres.dsn} application_name=closing_{schema}", schema=schema)
    store.add(make_record("m1"), [b"12345"])
    barrier = threading.Barrier(3)

    def read() -> None:
        barrier.wait(timeout=30)  # three threads alive at once: three connections
        store.get("m1")
        barrier.wait(timeout=30)

    threads = [threading.Thread(target=read) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert _backends(postgres, f"closing_{schema}") >= 3
    store.close()
    with pytest.raises(ConfigurationError, match="closed"):
        store.get("m1")
    # A backend ends soon after its client closed the connection: wait, bounded.
    deadline = time.monotonic() + 10
    while _backends(postgres, f"closing_{schema}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _backends(postgres, f"closing_{schema}") == 0


def test_large_messages_are_streamed_and_checked(postgres_store: PostgresStore) -> None:
    chunk = bytes(range(256)) * 256  # 64 KiB, every byte value
    size = len(chunk) * 48  # 3 MiB
    record = make_record("big", size=size)
    postgres_store.add(record, (chunk for _ in range(48)))
    assert postgres_store.content("big") == chunk * 48
    with pytest.raises(ValueError, match="longer"):
        postgres_store.add(make_record("long", size=8), [b"12345", b"6789"])
    with pytest.raises(ValueError, match="bytes"):
        postgres_store.add(make_record("short", size=8), [b"12345", b"6"])
    assert postgres_store.get("long") is None
    assert postgres_store.get("short") is None
    # The failed adds left the thread's connection usable.
    postgres_store.add(make_record("after", size=2), [b"ok"])
    assert postgres_store.content("after") == b"ok"


def test_text_that_copy_must_escape_round_trips(postgres_store: PostgresStore) -> None:
    # The envelope JSON and ids travel in COPY's text format: backslashes, tabs and newlines
    # must come back as they went.
    envelope = Envelope('"a\\\\b\\"c"@example.com', ["rcpt@example.org"], envid="E\\1")
    record = make_record("id\twith\\odd\nbits", message_id="m\r\n@x")
    record = type(record)(
        id=record.id,
        created_at=record.created_at,
        envelope=envelope,
        message_id=record.message_id,
        size=3,
        recipients=record.recipients[:1],
    )
    postgres_store.add(record, [b"a\tb"])
    assert postgres_store.get(record.id) == record
    assert postgres_store.content(record.id) == b"a\tb"
    assert postgres_store.lookup(envid="E\\1") == [record.id]


def test_a_claim_reads_past_messages_with_many_recipients(postgres_store: PostgresStore) -> None:
    # A claim reads due rows in batches (64 rows at first, for a small limit): messages with
    # more due recipients than that still come whole, and as many as the limit asks.
    many = tuple(f"r{n:03}@example.org" for n in range(150))
    for index, minutes in enumerate([3, 1, 2]):
        record = make_record(f"m{index}", recipients=many, due=T0 + dt.timedelta(minutes=minutes))
        postgres_store.add(record, [b"12345"])
    now = T0 + dt.timedelta(hours=1)
    claims = postgres_store.claim(worker="w", now=now, lease=LEASE, limit=2)
    assert [c.tracking_id for c in claims] == ["m1", "m2"]
    assert [len(c.addresses) for c in claims] == [150, 150]
    assert [str(a) for a in claims[0].addresses] == list(many)
    assert [
        c.tracking_id for c in postgres_store.claim(worker="v", now=now, lease=LEASE, limit=5)
    ] == ["m0"]


def test_claims_and_next_due_can_read_the_partial_indexes(postgres_store: PostgresStore) -> None:
    # The SQL names states literally (partial indexes need it): keep them State's values.
    assert [State.QUEUED.value, State.DEFERRED.value, State.SENDING.value] == [
        "queued",
        "deferred",
        "sending",
    ]
    conn = postgres_store._connection()
    args = {"now": 0, "tried": [], "rows": 10, "ids": []}
    plans = {}
    with conn.transaction():
        # With sequential scans priced out, a plan that still scans the table whole would
        # mean the statements' expressions do not match the indexes'.
        conn.execute("SET LOCAL enable_seqscan = off")
        for name, statement in [
            ("due", postgres_store_module._DUE_ROWS),
            ("next", postgres_store_module._NEXT_DUE),
        ]:
            rows = conn.execute(f"EXPLAIN {statement}", args).fetchall()
            plans[name] = "\n".join(str(row[0]) for row in rows)
    for plan in plans.values():
        assert "recipients_due_order" in plan, plan
        assert "recipients_lease_order" in plan, plan
        assert "Seq Scan" not in plan, plan


# -- several machines -------------------------------------------------------------------


def test_two_machines_claiming_at_once_never_share_a_recipient(
    postgres: PostgresInstance, schema: str
) -> None:
    machines = [PostgresStore(postgres.dsn, schema=schema) for _ in range(2)]
    count = 60
    try:
        machines[0].add_many([(make_record(f"m{i:03}"), [b"12345"]) for i in range(count)])
        workers = [(f"w{n}", machines[n % 2]) for n in range(6)]
        taken: dict[str, list[tuple[str, Address]]] = {name: [] for name, _ in workers}
        barrier = threading.Barrier(len(workers))

        def work(name: str, store: PostgresStore) -> None:
            barrier.wait(timeout=30)
            for _ in range(count):  # bounded: each round takes a message or stops
                claims = store.claim(worker=name, now=T0, lease=LEASE, limit=3)
                if not claims:
                    return
                for claim in claims:
                    taken[name].extend((claim.tracking_id, a) for a in claim.addresses)

        threads = [threading.Thread(target=work, args=worker) for worker in workers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in threads)
        every = [item for items in taken.values() for item in items]
        assert len(every) == len(set(every)) == count * 2
        owners = {
            r.lease_owner
            for record in machines[1].find(state=State.SENDING)
            for r in record.recipients
        }
        assert owners <= set(taken)
        assert machines[1].claim(worker="late", now=T0, lease=LEASE, limit=100) == []
    finally:
        for machine in machines:
            machine.close()


def test_a_dead_machines_lease_expires_and_another_takes_the_work(
    postgres: PostgresInstance, schema: str
) -> None:
    # A process that claims and is killed at once (its connection dies with it): the
    # lease stays in the database until it runs out, then the next claim takes the work.
    PostgresStore(postgres.dsn, schema=schema).close()
    alive = PostgresStore(postgres.dsn, schema=schema)
    try:
        alive.add(make_record("m1"), [b"12345"])
        code = (
            "import datetime as dt, os, signal, sys\n"
            "from mailrelay.tracker.postgres_store import PostgresStore\n"
            "store = PostgresStore(sys.argv[1], schema=sys.argv[2])\n"
            "now = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)\n"
            "claims = store.claim(worker='dead', now=now, lease=dt.timedelta(minutes=5),"
            " limit=10)\n"
            "assert [c.tracking_id for c in claims] == ['m1']\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n"
        )
        child = subprocess.run(
            [sys.executable, "-c", code, postgres.dsn, schema],
            cwd=ROOT,
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert child.returncode == -signal.SIGKILL, child.stderr.decode(errors="replace")
        record = alive.get("m1")
        assert record is not None
        assert {(r.state, r.lease_owner) for r in record.recipients} == {(State.SENDING, "dead")}
        assert alive.claim(worker="alive", now=T0 + LEASE - dt.timedelta(microseconds=1),
                           lease=LEASE, limit=10) == []  # fmt: skip
        claims = alive.claim(worker="alive", now=T0 + LEASE, lease=LEASE, limit=10)
        assert [(c.tracking_id, c.fresh) for c in claims] == [("m1", True)]
        assert alive.next_due() == T0 + LEASE + LEASE
    finally:
        alive.close()


def test_writers_of_the_same_messages_in_opposite_orders_never_deadlock(
    postgres: PostgresInstance, schema: str
) -> None:
    # Each batch names the messages in the opposite order of the other machine's: without
    # the store locking them in id order, the two would deadlock (SQLSTATE 40P01).
    machines = [PostgresStore(postgres.dsn, schema=schema) for _ in range(2)]
    ids = [f"m{i}" for i in range(8)]
    try:
        machines[0].add_many([(make_record(i), [b"12345"]) for i in ids])
        barrier = threading.Barrier(2)
        failures: list[BaseException] = []

        def write(store: PostgresStore, order: list[str], text: str) -> None:
            barrier.wait(timeout=30)
            note = Change(
                address=Address.parse("a@example.org"),
                state=State.QUEUED,
                attempt=Attempt(at=T0, text=text, source="dsn"),
                expect=frozenset(),  # history only
            )
            try:
                for _ in range(15):
                    store.apply_many([(i, [note]) for i in order])
            except BaseException as exc:
                failures.append(exc)

        threads = [
            threading.Thread(target=write, args=(machines[0], ids, "one")),
            threading.Thread(target=write, args=(machines[1], ids[::-1], "two")),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert failures == []
        record = machines[0].get("m0")
        assert record is not None
        texts = Counter(a.text for a in record.recipient("a@example.org").attempts)
        assert texts == Counter({"one": 15, "two": 15})
    finally:
        for machine in machines:
            machine.close()


# -- errors become StoreError -----------------------------------------------------------


def test_a_refused_connection_is_a_transient_store_error() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(StoreError, match="open the database") as caught:
        PostgresStore(f"host=127.0.0.1 port={port} user=postgres dbname=x connect_timeout=5")
    assert caught.value.is_transient is True
    assert isinstance(caught.value.__cause__, psycopg.OperationalError)


@pytest.mark.parametrize(
    ("settings", "sqlstate"),
    [
        ({"lock_timeout": 0.1}, "55P03"),  # lock_not_available
        ({"lock_timeout": None, "statement_timeout": 0.1}, "57014"),  # query_canceled
    ],
    ids=["lock-timeout", "statement-timeout"],
)
def test_timeouts_are_transient_and_leave_the_store_usable(
    postgres: PostgresInstance, schema: str, settings: dict[str, Any], sqlstate: str
) -> None:
    store = PostgresStore(postgres.dsn, schema=schema, **settings)
    other = _admin(postgres)
    try:
        store.add(make_record("m1"), [b"12345"])
        with other.transaction():
            # Another machine holds the table: every statement of the store must wait.
            other.execute(
                sql.SQL("LOCK TABLE {}.messages IN ACCESS EXCLUSIVE MODE").format(
                    sql.Identifier(schema)
                )
            )
            with pytest.raises(StoreError, match=sqlstate) as caught:
                store.add(make_record("m2"), [b"12345"])
            assert caught.value.is_transient is True
        assert store.get("m2") is None  # nothing stored
        store.add(make_record("m2"), [b"12345"])
        assert store.content("m2") == b"12345"
    finally:
        other.close()
        store.close()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (("dbname=mailrelay_test", "dbname=no_such_db"), "does not exist"),
        (("user=postgres", "user=no_such_role"), "does not exist"),
    ],
    ids=["database", "role"],
)
def test_a_server_refusing_the_connection_for_good_is_a_permanent_store_error(
    postgres: PostgresInstance, change: tuple[str, str], match: str
) -> None:
    with pytest.raises(StoreError, match=match) as caught:
        PostgresStore(postgres.dsn.replace(*change))
    assert caught.value.is_transient is False
    assert isinstance(caught.value.__cause__, psycopg.OperationalError)


def test_a_server_with_no_connection_slot_left_is_a_transient_store_error(
    postgres: PostgresInstance, schema: str
) -> None:
    # A role limited to one connection, which another client holds (53300, "too many
    # connections for role"): the server refuses with FATAL, but only for now.
    PostgresStore(postgres.dsn, schema=schema).close()
    role = f"r_{schema}"
    grants = [
        "CREATE ROLE {role} LOGIN CONNECTION LIMIT 1",  # superusers have no limit
        "GRANT USAGE ON SCHEMA {schema} TO {role}",
        "GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA {schema} TO {role}",
    ]
    with _admin(postgres) as conn:
        for grant in grants:
            conn.execute(
                sql.SQL(grant).format(role=sql.Identifier(role), schema=sql.Identifier(schema))
            )
    dsn = postgres.dsn.replace("user=postgres", f"user={role}")
    try:
        with psycopg.connect(dsn):
            with pytest.raises(StoreError, match="too many connections") as caught:
                PostgresStore(dsn, schema=schema)
            assert caught.value.is_transient is True
        PostgresStore(dsn, schema=schema).close()  # the slot is free again
    finally:
        with _admin(postgres) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_a_connection_killed_by_the_server_is_transient_and_reopened(
    postgres: PostgresInstance, postgres_store: PostgresStore
) -> None:
    postgres_store.add(make_record("m1"), [b"12345"])
    (pid,) = postgres_store._connection().execute("SELECT pg_backend_pid()").fetchone() or (0,)
    with _admin(postgres) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with pytest.raises(StoreError) as caught:
        postgres_store.get("m1")
    assert caught.value.is_transient is True
    assert postgres_store.get("m1") == make_record("m1")  # a new connection


def test_a_missing_permission_is_a_permanent_store_error(
    postgres: PostgresInstance, schema: str
) -> None:
    PostgresStore(postgres.dsn, schema=schema).close()
    role = f"r_{schema}"
    with _admin(postgres) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        dsn = postgres.dsn.replace("user=postgres", f"user={role}")
        with pytest.raises(StoreError, match="42501") as caught:
            PostgresStore(dsn, schema=schema)
        assert caught.value.is_transient is False
    finally:
        with _admin(postgres) as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_a_role_with_only_data_rights_can_use_a_migrated_schema(
    postgres: PostgresInstance, schema: str
) -> None:
    # docs/postgres.md: the owner migrates once; the senders need no DDL rights.
    PostgresStore(postgres.dsn, schema=schema).close()
    role = f"r_{schema}"
    grants = [
        "CREATE ROLE {role} LOGIN",
        "GRANT USAGE ON SCHEMA {schema} TO {role}",
        "GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA {schema} TO {role}",
    ]
    with _admin(postgres) as conn:
        for grant in grants:
            conn.execute(
                sql.SQL(grant).format(role=sql.Identifier(role), schema=sql.Identifier(schema))
            )
    try:
        dsn = postgres.dsn.replace("user=postgres", f"user={role}")
        store = PostgresStore(dsn, schema=schema)
        try:
            tracker = DeliveryTracker(MemoryTransport(), store)
            tracking_id = tracker.submit(_message_to("a@example.org"))
            assert tracker.run_pending().delivered == 1
            assert tracker.status(tracking_id).recipients[0].state is State.DELIVERED
        finally:
            store.close()
    finally:
        with _admin(postgres) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


@pytest.mark.parametrize(
    ("sqlstate", "transient"),
    [
        ("40001", True),  # serialization_failure
        ("40P01", True),  # deadlock_detected
        ("55P03", True),  # lock_not_available
        ("57014", True),  # query_canceled (statement_timeout)
        ("57P01", True),  # admin_shutdown
        ("08006", True),  # connection_failure
        ("53100", True),  # disk_full
        ("53300", True),  # too_many_connections
        ("58030", True),  # io_error
        ("42501", False),  # insufficient_privilege
        ("42P01", False),  # undefined_table
        ("3D000", False),  # invalid_catalog_name
        ("28P01", False),  # invalid_password
        ("23505", False),  # unique_violation
        (None, False),
    ],
)
def test_sqlstates_are_sorted_by_whether_trying_again_may_help(
    sqlstate: str | None, transient: bool
) -> None:
    assert is_transient_sqlstate(sqlstate) is transient


# -- the trackers on PostgresStore ------------------------------------------------------


def _message_to(*to: str) -> Message:
    return Message.build(sender="shop@example.com", to=list(to), subject="Hi", text="Hello.\n")


def test_the_tracker_runs_end_to_end(postgres_store: PostgresStore) -> None:
    def handler(_message: Message, envelope: Envelope) -> dict[str, Reply]:
        refused = "b@example.net"
        if any(str(r.address) == refused for r in envelope.recipients):
            return {refused: Reply.of(550, "5.1.1 no such user")}
        return {}

    transport = MemoryTransport(handler)
    reports_out = MemoryTransport()  # where generated failure DSNs go
    tracker = DeliveryTracker(transport, postgres_store, dsn_transport=reports_out)
    ids = tracker.submit_many(
        [_message_to("a@example.org", "b@example.net"), _message_to("c@x.example")]
    )
    summary = tracker.run_pending()
    # Two recipients and, in a later round of the same run, the failure DSN.
    assert (summary.delivered, summary.bounced) == (3, 1)
    first = tracker.status(ids[0])
    assert [r.state for r in first.recipients] == [State.DELIVERED, State.BOUNCED]
    assert first.recipients[1].attempts[0].code == 550
    # The failure DSN to the sender was stored by the commit that recorded the bounce.
    reports = [r for r in postgres_store.find() if r.notification]
    assert [[r.state for r in report.recipients] for report in reports] == [[State.DELIVERED]]
    assert [str(r.address) for r in reports_out.outbox[0].envelope.recipients] == [
        "shop@example.com"
    ]
    assert tracker.next_due() is None
    tracker.close()


def test_the_async_tracker_runs_end_to_end(postgres_store: PostgresStore) -> None:
    async def main() -> list[State]:
        tracker = AsyncDeliveryTracker(MemoryTransport(), postgres_store)
        ids = await tracker.asubmit_many([_message_to(f"r{i}@example.org") for i in range(5)])
        summary = await tracker.arun_pending()
        assert summary.delivered == 5
        states = [(await tracker.astatus(i)).recipients[0].state for i in ids]
        await tracker.aclose()
        return states

    assert run(main()) == [State.DELIVERED] * 5


# -- worker processes sharing one database -----------------------------------------------

WORKERS = 3
LEASE_SECONDS = 1.0
BATCH_SIZE = 10
BOUND = 120.0


def worker(
    dsn: str, schema: str, port: int, *, name: str, go: str, done: str, report: str, die: str
) -> None:
    """One worker process (see test_engine_workers.worker, of which this is the PostgreSQL
    twin): deliver until ``done`` exists and nothing is due, counting into ``report``."""
    _wait_for(Path(go))
    settings: dict[str, Any] = {"tls": TLS.NONE, "timeouts": Timeouts.all(10)}
    transport = (
        SMTPTransport("127.0.0.1", port, **settings)
        if die == "-"
        else _DyingTransport("127.0.0.1", port, trigger=Path(die), **settings)
    )
    tracker = DeliveryTracker(
        transport,
        PostgresStore(dsn, schema=schema),
        lease=dt.timedelta(seconds=LEASE_SECONDS),
        worker_id=name,
        batch_size=BATCH_SIZE,
    )
    Path(report + ".ready").touch()
    delivered = 0
    deadline = time.monotonic() + BOUND
    while time.monotonic() < deadline:
        summary = tracker.run_pending(max_rounds=1)
        if summary.delivered:
            delivered += summary.delivered
            Path(report).write_text(str(delivered), encoding="ascii")
            continue
        if summary.messages:
            continue
        if os.path.exists(done) and tracker.next_due() is None:
            break
        time.sleep(0.01)
    else:
        raise SystemExit("the worker ran out of time")
    tracker.close()
    Path(report).write_text(str(delivered), encoding="ascii")


def test_worker_processes_share_one_database_and_survive_one_being_killed(
    postgres: PostgresInstance, schema: str, make_aiosmtpd: AiosmtpdFactory, tmp_path: Path
) -> None:
    count = int(os.environ.get("MAILRELAY_PG_WORKERS_COUNT", "300"))
    seed = int(os.environ.get("MAILRELAY_PG_WORKERS_SEED", str(random.randrange(1 << 30))))
    chooser = random.Random(seed)
    server = make_aiosmtpd(starttls=False, auth=False)
    go, done, die = tmp_path / "go", tmp_path / "done", tmp_path / "die"
    names = [f"machine-{n}" for n in range(WORKERS)]
    reports = [tmp_path / f"{name}.txt" for name in names]
    victim = chooser.randrange(WORKERS)
    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.tracker.test_postgres_store",
                postgres.dsn,
                schema,
                str(server.port),
                name,
                str(go),
                str(done),
                str(report),
                str(die) if n == victim else "-",
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for n, (name, report) in enumerate(zip(names, reports, strict=True))
    ]
    kill_after = chooser.randrange(count // 4, count // 2)
    context = f"seed={seed} victim={names[victim]} after={kill_after}"
    try:
        go.touch()  # every worker opens (and migrates) the new schema now
        for report in reports:
            _wait_for(Path(f"{report}.ready"))
        submitter = DeliveryTracker(MemoryTransport(), PostgresStore(postgres.dsn, schema=schema))
        for start in range(0, count, 20):
            submitter.submit_many([_message(seq) for seq in range(start, start + 20)])
            if start >= kill_after and reports[victim].exists():
                die.touch()
            time.sleep(0.01)
        deadline = time.monotonic() + BOUND
        while children[victim].poll() is None:
            assert time.monotonic() < deadline, f"{context}: the victim never sent again"
            if reports[victim].exists():
                die.touch()
            submitter.submit_many([_message(count)])
            count += 1
            time.sleep(0.01)
        done.touch()
        for child in children:
            _out, err = child.communicate(timeout=BOUND + 30)
            expected = -signal.SIGKILL if child is children[victim] else 0
            assert child.returncode == expected, (context, err.decode(errors="replace"))
        states = Counter(r.state for record in submitter.store.find() for r in record.recipients)
        submitter.close()
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait(timeout=30)

    shares = [
        int(report.read_text(encoding="ascii")) if report.exists() else 0 for report in reports
    ]
    received = Counter(
        int(match.group(1)) for m in server.messages for match in _SEQ.finditer(m.content)
    )
    duplicates = {seq: n for seq, n in received.items() if n > 1}
    context += f" shares={shares} received={sum(received.values())} duplicates={duplicates}"
    assert set(received) == set(range(count)), context  # none lost
    # Sent twice: exactly the victim's unrecorded chunk, each message twice.
    assert all(n == 2 for n in duplicates.values()), context
    assert 1 <= len(duplicates) <= BATCH_SIZE, context
    assert all(share > 0 for share in shares), context
    assert sum(shares) <= count, context
    assert states == Counter({State.DELIVERED: count}), context


# -- MemoryStore and PostgresStore agree ---------------------------------------------------


@pytest.fixture(scope="module")
def shared_schema(postgres: PostgresInstance) -> Iterator[PostgresStore]:
    name = postgres.new_schema()
    store = PostgresStore(postgres.dsn, schema=name)
    try:
        yield store
    finally:
        store.close()
        postgres.drop_schema(name)


@settings(max_examples=25, deadline=None)
@given(_OPS)
def test_memory_and_postgres_stores_agree(
    shared_schema: PostgresStore, ops: list[tuple[object, ...]]
) -> None:
    postgres_store = shared_schema
    postgres_store._connection().execute("TRUNCATE messages, recipients, attempts")
    stores: list[Store] = [MemoryStore(), postgres_store]
    for store in stores:
        store.add_many(
            [(make_record(f"m{i}", due=T0 + dt.timedelta(minutes=i)), [b"12345"]) for i in range(3)]
        )
    for op in ops:
        outcomes: list[object] = []
        for store in stores:
            if op[0] == "claim":
                _, name, minutes, limit = op
                assert isinstance(name, str)
                assert isinstance(minutes, int)
                assert isinstance(limit, int)
                now = T0 + dt.timedelta(minutes=minutes)
                outcomes.append(store.claim(worker=name, now=now, lease=LEASE, limit=limit))
            else:
                _, tracking_id, address, state, name, expect, entries = op
                assert isinstance(tracking_id, str)
                assert isinstance(address, str)
                assert isinstance(state, State)
                assert name is None or isinstance(name, str)
                assert expect is None or isinstance(expect, frozenset)
                assert isinstance(entries, int)
                change = Change(
                    address=Address.parse(address),
                    state=state,
                    attempt=Attempt(at=T0, text="x"),
                    next_attempt_at=T0 + dt.timedelta(minutes=5),
                    expect=expect,
                )
                outcomes.append(store.apply_many([(tracking_id, [change])] * entries, worker=name))
        assert outcomes[0] == outcomes[1], op
    for tracking_id in ("m0", "m1", "m2"):
        assert stores[0].get(tracking_id) == stores[1].get(tracking_id)
    assert stores[0].next_due() == stores[1].next_due()


# -- without psycopg, and the docs -------------------------------------------------------


def test_the_fixture_says_how_to_install_missing_binaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAILRELAY_PG_BIN", str(tmp_path))  # no initdb there
    with pytest.raises(FileNotFoundError, match=r"apt-get install .*postgresql"):
        find_binaries()


def test_without_psycopg_the_store_says_what_to_install() -> None:
    code = (
        "import sys\n"
        "sys.modules['psycopg'] = None\n"
        "import mailrelay\n"
        "from mailrelay.tracker.postgres_store import PostgresStore\n"
        "try:\n"
        "    PostgresStore('host=127.0.0.1')\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
        "else:\n"
        "    raise SystemExit('no ImportError')\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=60, check=False
    )
    assert child.returncode == 0, child.stderr.decode(errors="replace")
    assert 'pip install "mailrelay[postgres]"' in child.stdout.decode()


def test_the_docs_example_runs(
    postgres: PostgresInstance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MAILRELAY_POSTGRES", postgres.dsn)
    blocks = python_blocks(DOC.read_text(encoding="utf-8"))
    assert blocks
    namespace: dict[str, object] = {"__name__": "docs_postgres"}
    try:
        for number, block in enumerate(blocks, start=1):
            exec(compile(block, f"postgres.md block {number}", "exec"), namespace)  # our docs
    finally:
        postgres.drop_schema("mailrelay")


def test_the_docs_setup_block_compiles_and_its_imports_resolve() -> None:
    blocks = server_blocks(DOC.read_text(encoding="utf-8"))
    assert blocks
    for number, block in enumerate(blocks, start=1):
        tree = ast.parse(block, f"postgres.md py block {number}")
        imports: list[ast.stmt] = [
            node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)
        ]
        exec(compile(ast.Module(body=imports, type_ignores=[]), "imports", "exec"), {})


if __name__ == "__main__":
    dsn, schema_name, port_text, name, go, done, report, die = sys.argv[1:9]
    worker(dsn, schema_name, int(port_text), name=name, go=go, done=done, report=report, die=die)
