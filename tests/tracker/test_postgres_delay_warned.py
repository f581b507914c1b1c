"""PostgresStore's migration 2: ``recipients.delay_warned``, the delay-warning mark.

A schema at version 1 (written by an older mailrelay, with a recipient in it) opens, gets
the column with every existing recipient unwarned, and takes the mark from then on.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from mailrelay.tracker.postgres_store import MIGRATIONS, SCHEMA_VERSION, PostgresStore
from mailrelay.tracker.store import Attempt, Change, State, envelope_to_json, to_micros
from tests.peers.postgres import PostgresInstance
from tests.tracker.test_store import LEASE, T0, make_record


@pytest.fixture
def schema(postgres: PostgresInstance) -> Iterator[str]:
    """A fresh schema name, dropped after the test."""
    name = postgres.new_schema()
    yield name
    postgres.drop_schema(name)


def _at_version_one(postgres: PostgresInstance, schema: str) -> None:
    """The schema as mailrelay's first PostgreSQL schema left it, with one message."""
    record = make_record("m1", recipients=("a@example.org",))
    conn: psycopg.Connection[Any]
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        with conn.transaction():
            for statement in MIGRATIONS[0].split(";"):
                if statement.strip():
                    conn.execute(statement.encode())
            conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            conn.execute("INSERT INTO schema_version (version) VALUES (1)")
            conn.execute(
                "INSERT INTO messages (id, created_at, envelope, size, content)"
                " VALUES (%s, %s, %s, 5, %s)",
                ("m1", to_micros(T0), envelope_to_json(record.envelope), b"12345"),
            )
            conn.execute(
                "INSERT INTO recipients (message, position, address, state, next_attempt_at)"
                " VALUES ('m1', 0, 'a@example.org', 'deferred', %s)",
                (to_micros(T0),),
            )


def test_a_version_one_schema_gains_the_delay_warned_mark(
    postgres: PostgresInstance, schema: str
) -> None:
    _at_version_one(postgres, schema)
    store = PostgresStore(postgres.dsn, schema=schema)
    try:
        assert store.schema_version == SCHEMA_VERSION == 2
        found = store.get("m1")
        assert found is not None
        (recipient,) = found.recipients
        assert (recipient.state, recipient.delay_warned) == (State.DEFERRED, False)
        store.claim(worker="w", now=T0, lease=LEASE, limit=1)
        change = Change(
            address=recipient.address,
            state=State.DEFERRED,
            attempt=Attempt(at=T0, code=450, enhanced="4.2.1", text="later"),
            next_attempt_at=T0 + dt.timedelta(hours=1),
            delay_warned=True,
        )
        assert store.apply_many([("m1", [change])], worker="w") == [(recipient.address,)]
        found = store.get("m1")
        assert found is not None
        assert found.recipients[0].delay_warned is True
    finally:
        store.close()
