"""The tracker's store for several machines: one PostgreSQL database.

:class:`PostgresStore` implements :class:`~mailrelay.tracker.store.Store` with the same
semantics as :class:`~mailrelay.tracker.sqlite_store.SQLiteStore`, so workers on several
machines can share one queue. It needs the optional extra ``mailrelay[postgres]``
(psycopg 3), imported only when a store is made, so ``import mailrelay`` never needs it.

Rules of this module:

* Everything lives in one PostgreSQL schema (``schema=``, default ``mailrelay``): tables
  ``schema_version``, ``messages``, ``recipients``, ``attempts``. Opening a store applies
  the migrations the schema lacks (:data:`MIGRATIONS`), all in one transaction under a
  transaction-level advisory lock keyed by the schema's name, so several processes opening
  a new database at once migrate it once; a schema written by a newer mailrelay is refused
  rather than misread.
* Every write is one explicit transaction (READ COMMITTED) that first locks the rows of
  ``messages`` it changes (``FOR NO KEY UPDATE``, in id order): whoever changes a message's
  recipients holds its message row, so writers of one message serialize and two writers
  can never deadlock on each other's recipients.
* **Claims are atomic across machines.** A claim reads due recipients in due order
  (earliest due time, then message id) from two partial indexes, only as far as its
  batch needs; locks the messages it picked with ``FOR NO KEY UPDATE SKIP LOCKED`` (a
  message another claim or write holds is skipped, not waited for); then one ``UPDATE
  ... RETURNING`` leases the due recipients of the messages it locked, with a WHERE that
  states "due" again: PostgreSQL checks it on the newest row versions, so a recipient
  leased (or cancelled) by a transaction that committed meanwhile is not taken. When
  some picked messages were taken by others, the claim reads further (a bounded number
  of rounds), so a claim racing another still fills its batch.
* Reads run in a REPEATABLE READ, READ ONLY transaction, so a record and its recipients
  and attempts are one snapshot.
* The message bytes are a ``BYTEA``, sent with ``COPY ... FROM STDIN`` chunk by chunk as
  the tracker hands them over, so the client never builds a second copy of a large
  message. The server still holds the whole value while it stores it, and PostgreSQL
  limits a ``BYTEA`` to 1 GB (see docs/postgres.md).
* Durability: what the application hands over (submissions, ``cancel``, DSN results)
  commits with the server's ``synchronous_commit`` as configured (on by default: flushed
  to disk before the commit returns); the runner's own claims and results commit with
  ``work_synchronous_commit`` (default ``off``: a server crash may undo the last few,
  which only makes their recipients due again, like SQLiteStore's ``work_synchronous``).
* Every public method turns a failure of the database (``psycopg.Error``) into
  :class:`~mailrelay.errors.StoreError` with the original as its cause, transient for a
  lost or refused connection, a serialization failure or deadlock, a lock or statement
  timeout, a server shutting down, or a lack of resources (disk full, out of memory, too
  many connections); permanent otherwise (a missing permission, a missing database, bad
  SQL). A transaction that fails is rolled back; a connection that broke is dropped and
  the next call opens a new one.
* Each thread gets its own connection (a psycopg connection runs one statement at a
  time), closed once the thread has ended (when another thread opens one); :meth:`close`
  closes every connection the store opened.
* Times are stored as integer microseconds since the epoch (``BIGINT``), as in
  SQLiteStore, so they come back exactly as given.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from mailrelay.address import Address
from mailrelay.errors import ConfigurationError, StoreError
from mailrelay.tracker.store import (
    DUE_STATES,
    FINAL_STATES,
    Change,
    Claim,
    FollowUp,
    MessageRecord,
    State,
    attempt_values,
    cached_address,
    envelope_to_json,
    micros_or_none,
    new_claim,
    records_from_rows,
    repeats_confirmation,
    row_for,
    time_or_none,
    to_micros,
)

if TYPE_CHECKING:
    import psycopg

__all__ = ["INSTALL_HINT", "MIGRATIONS", "SCHEMA_VERSION", "PostgresStore", "is_transient_sqlstate"]

#: How to install what this module needs (said by the ImportError without it).
INSTALL_HINT = 'pip install "mailrelay[postgres]"'

#: The schema, one script per version: ``MIGRATIONS[n]`` takes version ``n`` to ``n + 1``.
#: The partial indexes hold a recipient while it is due or leased, so they stay the size of
#: the queue, not of the history. (The state names are State's values.)
MIGRATIONS: tuple[str, ...] = (
    # 0 -> 1: the tables and their indexes.
    """
    CREATE TABLE messages (
        id TEXT PRIMARY KEY,
        created_at BIGINT NOT NULL,
        envelope TEXT NOT NULL,
        message_id TEXT,
        envid TEXT,
        size BIGINT NOT NULL,
        content BYTEA NOT NULL,
        notification BOOLEAN NOT NULL DEFAULT FALSE
    );
    CREATE TABLE recipients (
        message TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        address TEXT NOT NULL,
        state TEXT NOT NULL,
        next_attempt_at BIGINT,
        confirmed BOOLEAN NOT NULL DEFAULT FALSE,
        lease_owner TEXT,
        lease_until BIGINT,
        PRIMARY KEY (message, position)
    );
    CREATE TABLE attempts (
        message TEXT NOT NULL,
        position INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        at BIGINT NOT NULL,
        host TEXT,
        code INTEGER,
        enhanced TEXT,
        text TEXT NOT NULL,
        source TEXT NOT NULL,
        PRIMARY KEY (message, position, seq),
        FOREIGN KEY (message, position) REFERENCES recipients(message, position)
            ON DELETE CASCADE
    );
    CREATE INDEX recipients_due_order ON recipients((COALESCE(next_attempt_at, 0)), message)
        WHERE state IN ('queued', 'deferred');
    CREATE INDEX recipients_lease_order ON recipients((COALESCE(lease_until, 0)), message)
        WHERE state = 'sending';
    CREATE INDEX messages_created ON messages(created_at, id);
    CREATE INDEX messages_message_id ON messages(message_id);
    CREATE INDEX messages_envid ON messages(envid) WHERE envid IS NOT NULL;
    """,
    # 1 -> 2: which recipients a delay warning was queued for (RecipientRecord.delay_warned).
    """
    ALTER TABLE recipients ADD COLUMN delay_warned BOOLEAN NOT NULL DEFAULT FALSE;
    """,
)

#: The version this code writes.
SCHEMA_VERSION = len(MIGRATIONS)

_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_COMMIT_LEVELS = frozenset({"on", "off", "local", "remote_write", "remote_apply"})
#: How many times a claim reads further for messages when those it read were taken by other
#: claims meanwhile (or had many due recipients each): a bound, rarely reached.
_CLAIM_ROUNDS = 8

# SQLSTATE classes and codes after which trying again later may help (PostgreSQL's
# "Appendix A. Error Codes"): 08 connection exception, 40 transaction rollback
# (serialization failure, deadlock), 53 insufficient resources (disk full, out of memory,
# too many connections), 57 operator intervention (statement timeout = query canceled,
# server shutting down), 58 system error (I/O); and 55P03 lock_not_available (lock_timeout).
_TRANSIENT_CLASSES = frozenset({"08", "40", "53", "57", "58"})
_TRANSIENT_CODES = frozenset({"55P03"})

_P = ParamSpec("_P")
_R = TypeVar("_R")

# A claim, in three statements (see the module docstring), written out in full so that no
# SQL is assembled at run time. _DUE_ROWS: due recipients in due order, then message id,
# from the two partial indexes (one per kind of due: QUEUED/DEFERRED by next_attempt_at,
# SENDING by lease_until), merged and read only as far as LIMIT: its cost follows the
# batch, not the queue. A message's first row carries its earliest due time, so this is
# the order of "MIN(due), message". No due time counts as 0 (the epoch), as in MemoryStore;
# so "COALESCE(x, 0) <= now" means "x IS NULL OR x <= now" for any claim made after 1970.
# _LOCK: of the messages picked, those no other transaction holds, locked. _LEASE: their
# due recipients leased, the "due" condition checked again on the newest rows.
_DUE_ROWS = """
    SELECT message FROM (
        SELECT message, COALESCE(next_attempt_at, 0) AS due FROM recipients
            WHERE state IN ('queued', 'deferred') AND COALESCE(next_attempt_at, 0) <= %(now)s
        UNION ALL
        SELECT message, COALESCE(lease_until, 0) AS due FROM recipients
            WHERE state = 'sending' AND COALESCE(lease_until, 0) <= %(now)s
    ) due_rows
    WHERE message <> ALL(%(tried)s)
    ORDER BY due, message
    LIMIT %(rows)s
"""
_LOCK = "SELECT id FROM messages WHERE id = ANY(%(ids)s) FOR NO KEY UPDATE SKIP LOCKED"
_LEASE = """
    UPDATE recipients SET state = 'sending', lease_owner = %(worker)s, lease_until = %(until)s
    WHERE message = ANY(%(ids)s) AND (
            (state IN ('queued', 'deferred')
             AND (next_attempt_at IS NULL OR next_attempt_at <= %(now)s))
            OR (state = 'sending' AND (lease_until IS NULL OR lease_until <= %(now)s)))
    RETURNING message, position, address, confirmed, (
        SELECT COUNT(*) FROM attempts a
        WHERE a.message = recipients.message AND a.position = recipients.position)
"""
# The earliest due time (recipients without one are left out, as by SQLiteStore): the
# first entry of each partial index that has a time.
_NEXT_DUE = """
    SELECT MIN(due) FROM (
        SELECT MIN(COALESCE(next_attempt_at, 0)) AS due FROM recipients
            WHERE state IN ('queued', 'deferred') AND next_attempt_at IS NOT NULL
        UNION ALL SELECT MIN(COALESCE(lease_until, 0)) FROM recipients
            WHERE state = 'sending' AND lease_until IS NOT NULL) t
"""
_INSERT_RECIPIENT = (
    "INSERT INTO recipients (message, position, address, state, next_attempt_at,"
    " confirmed, lease_owner, lease_until, delay_warned)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
)
_INSERT_ATTEMPT = (
    "INSERT INTO attempts (message, position, seq, at, host, code, enhanced, text, source)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
)
_COPY_MESSAGES = (
    "COPY messages (id, created_at, envelope, message_id, envid, size, notification, content)"
    " FROM STDIN"
)


def _import_psycopg() -> Any:
    try:
        import psycopg  # noqa: PLC0415 -- optional extra, imported lazily
    except ImportError as exc:
        raise ImportError(
            f"PostgresStore needs psycopg 3, which is not installed: {INSTALL_HINT}"
        ) from exc
    return psycopg


def is_transient_sqlstate(sqlstate: str | None) -> bool:
    """Whether an error with this SQLSTATE may go away if tried again later."""
    if sqlstate is None:
        return False
    return sqlstate[:2] in _TRANSIENT_CLASSES or sqlstate in _TRANSIENT_CODES


# A server that answers a new connection with FATAL refuses it for good (no such database
# or role, failed authentication, no pg_hba.conf entry), unless it is one of these, which
# pass: starting up or shutting down (57P03), too many connections (53300). Read from the
# server's message, libpq's only account of it; a server whose messages are translated
# (lc_messages) has every refusal taken as transient, the safe side: the tracker retries.
_FATAL = "FATAL:"
_PASSING_REFUSALS = (
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "the database system is not yet accepting connections",
    "too many clients",
    "too many connections",
    "connection slots are reserved",
    "terminating connection",
)


def _refused_for_good(message: str) -> bool:
    """Whether a connection error's message is a server's lasting refusal."""
    return _FATAL in message and not any(text in message for text in _PASSING_REFUSALS)


def _store_error(exc: Exception, what: str) -> StoreError:
    psycopg = _import_psycopg()
    sqlstate: str | None = getattr(exc, "sqlstate", None)
    if sqlstate is None:
        # The connection could not be made or broke: psycopg reports those as
        # OperationalError, without an SQLSTATE (libpq gives none for connection errors).
        transient = isinstance(exc, psycopg.OperationalError) and not _refused_for_good(str(exc))
    else:
        transient = is_transient_sqlstate(sqlstate)
    code = f"SQLSTATE {sqlstate}" if sqlstate else type(exc).__name__
    return StoreError(
        f"the PostgreSQL store could not {what}: {str(exc).strip()} ({code})",
        is_transient=transient,
    )


def _translated(what: str) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """Raise :class:`StoreError` (from the original) for any ``psycopg.Error`` the method
    lets out; ``what`` says what it was doing, for the message."""

    def decorate(method: Callable[_P, _R]) -> Callable[_P, _R]:
        @functools.wraps(method)
        def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            try:
                return method(*args, **kwargs)
            except Exception as exc:
                psycopg = _import_psycopg()
                if isinstance(exc, psycopg.Error):
                    store = args[0]
                    if isinstance(store, PostgresStore):
                        store._drop_if_broken()
                    raise _store_error(exc, what) from exc
                raise

        return wrapper

    return decorate


def _copy_text(value: str | None) -> str:
    """A text value as a field of COPY's text format (backslash escapes; ``\\N`` is NULL)."""
    if value is None:
        return "\\N"
    return (
        value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    )


class PostgresStore:
    """A :class:`~mailrelay.tracker.store.Store` in a PostgreSQL database, for workers on
    several machines.

    Args:
        conninfo: a libpq connection string or URI (``"host=db dbname=mail user=relay"``,
            ``"postgresql://relay@db/mail"``); passwords may also come from ``~/.pgpass``
            or ``PGPASSWORD``, as for any libpq client.
        schema: the PostgreSQL schema holding the tables (created when missing; lower-case
            letters, digits and ``_``).
        lock_timeout: seconds a statement waits for a row or table lock before failing
            with a transient :class:`StoreError` (``None``: the server's setting).
        statement_timeout: seconds any statement may run before failing with a transient
            :class:`StoreError` (``None``: the server's setting).
        connect_timeout: seconds to wait for a connection.
        work_synchronous_commit: ``synchronous_commit`` for the runner's claims and
            results: ``"off"`` (the default) skips waiting for the disk flush; a server
            crash may undo the last few, which makes their recipients due again
            (re-sent, never lost). ``"on"`` makes every commit durable.

    Raises:
        ImportError: psycopg is not installed (``pip install "mailrelay[postgres]"``).
        ConfigurationError: a bad schema name or setting, or a schema written by a newer
            mailrelay.
        StoreError: the database could not be reached or migrated.
    """

    def __init__(
        self,
        conninfo: str,
        *,
        schema: str = "mailrelay",
        lock_timeout: float | None = 30.0,
        statement_timeout: float | None = None,
        connect_timeout: float = 10.0,
        work_synchronous_commit: str = "off",
    ) -> None:
        self._psycopg = _import_psycopg()
        if not _SCHEMA_NAME.fullmatch(schema):
            raise ConfigurationError(
                f"schema must be lower-case letters, digits and _, at most 63: {schema!r}"
            )
        if work_synchronous_commit not in _COMMIT_LEVELS:
            raise ConfigurationError(
                f"work_synchronous_commit must be one of {sorted(_COMMIT_LEVELS)}: "
                f"{work_synchronous_commit!r}"
            )
        for name, value in (
            ("lock_timeout", lock_timeout),
            ("statement_timeout", statement_timeout),
        ):
            if value is not None and value <= 0:
                raise ConfigurationError(f"{name} must be positive: {value!r}")
        self.conninfo = conninfo
        self.schema = schema
        self._lock_timeout = lock_timeout
        self._statement_timeout = statement_timeout
        self._connect_timeout = connect_timeout
        self._work_commit = work_synchronous_commit
        self._local = threading.local()
        self._all: dict[threading.Thread, psycopg.Connection[Any]] = {}
        self._all_lock = threading.Lock()
        self._closed = False
        try:
            self._migrate()
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"<PostgresStore schema={self.schema!r}>"

    # -- connections and transactions -----------------------------------------

    def _connection(self) -> psycopg.Connection[Any]:
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if conn is not None and not conn.closed:
            return conn
        if self._closed:
            raise ConfigurationError("the store is closed")
        psycopg = self._psycopg
        # autocommit: no implicit transactions; every transaction is an explicit block.
        conn = psycopg.connect(
            self.conninfo, autocommit=True, connect_timeout=max(1, round(self._connect_timeout))
        )
        try:
            sql = psycopg.sql
            conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))
            for name, value in (
                ("lock_timeout", self._lock_timeout),
                ("statement_timeout", self._statement_timeout),
            ):
                if value is not None:  # at least 1 ms: 0 would mean no limit at all
                    conn.execute(
                        sql.SQL("SET {} = {}").format(
                            sql.Identifier(name), sql.Literal(f"{max(1, round(value * 1000))}ms")
                        )
                    )
        except BaseException:
            conn.close()
            raise
        self._local.conn = conn
        with self._all_lock:
            # A thread that has ended never uses its connection again: close those now,
            # or an application submitting from a thread per request would keep one
            # server connection per thread it ever had.
            for thread in [thread for thread in self._all if not thread.is_alive()]:
                with suppress(Exception):
                    self._all.pop(thread).close()
            self._all[threading.current_thread()] = conn
        return conn

    def _drop_if_broken(self) -> None:
        """Forget this thread's connection if it broke (the next call opens a new one)."""
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if conn is not None and (conn.closed or conn.broken):
            self._local.conn = None
            with self._all_lock:
                self._all.pop(threading.current_thread(), None)
            with suppress(Exception):
                conn.close()

    @contextmanager
    def _transaction(self, *, work: bool = False) -> Iterator[psycopg.Connection[Any]]:
        """A write transaction; ``work``: the runner's bookkeeping (``work_synchronous_commit``)."""
        conn = self._connection()
        with conn.transaction():
            if work:
                conn.execute(
                    self._psycopg.sql.SQL("SET LOCAL synchronous_commit = {}").format(
                        self._psycopg.sql.Literal(self._work_commit)
                    )
                )
            yield conn

    @contextmanager
    def _snapshot(self) -> Iterator[psycopg.Connection[Any]]:
        """A read-only transaction that sees one snapshot."""
        conn = self._connection()
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield conn

    @_translated("open the database")
    def _migrate(self) -> None:
        sql = self._psycopg.sql
        with self._transaction() as tx:
            # One migrator at a time per schema, across processes and machines.
            tx.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"mailrelay:{self.schema}",))
            exists = tx.execute(
                "SELECT 1 FROM pg_namespace WHERE nspname = %s", (self.schema,)
            ).fetchone()
            if exists is None:
                tx.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(self.schema)))
            table = tx.execute(
                "SELECT to_regclass(%s)", (f'"{self.schema}".schema_version',)
            ).fetchone()
            if table is None or table[0] is None:
                tx.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
                tx.execute("INSERT INTO schema_version (version) VALUES (0)")
            row = tx.execute("SELECT version FROM schema_version").fetchone()
            version = 0 if row is None else int(row[0])
            if version > SCHEMA_VERSION:
                raise ConfigurationError(
                    f"schema {self.schema!r} has version {version}; this mailrelay knows up "
                    f"to {SCHEMA_VERSION}: upgrade mailrelay"
                )
            if version == SCHEMA_VERSION:
                return  # up to date: a role without DDL rights may open it
            # PostgreSQL's DDL is transactional: every step commits together or not at all.
            while version < SCHEMA_VERSION:
                for statement in MIGRATIONS[version].split(";"):
                    if statement.strip():
                        tx.execute(statement.encode())
                version += 1
            tx.execute("UPDATE schema_version SET version = %s", (version,))

    @property
    @_translated("read its schema version")
    def schema_version(self) -> int:
        """The schema's version."""
        row = self._connection().execute("SELECT version FROM schema_version").fetchone()
        assert row is not None
        return int(row[0])

    # -- the Store protocol -----------------------------------------------------

    @_translated("store a message")
    def add(self, record: MessageRecord, content: Iterable[bytes]) -> None:
        """See :meth:`~mailrelay.tracker.store.Store.add` (the bytes are streamed)."""
        with self._transaction() as tx:
            self._add(tx, [(record, content)])

    @_translated("store messages")
    def add_many(self, entries: Sequence[tuple[MessageRecord, Iterable[bytes]]]) -> None:
        """See :meth:`~mailrelay.tracker.store.Store.add_many`: one transaction, one commit."""
        if not entries:
            return
        with self._transaction() as tx:
            self._add(tx, entries)

    def _add(
        self,
        tx: psycopg.Connection[Any],
        entries: Sequence[tuple[MessageRecord, Iterable[bytes]]],
    ) -> None:
        ids = [record.id for record, _ in entries]
        if len(set(ids)) != len(ids):
            raise ValueError("a message with one of these ids is already stored")
        cursor = tx.cursor()
        try:
            with cursor.copy(_COPY_MESSAGES) as copy:
                for record, content in entries:
                    envelope = record.envelope
                    fields = (
                        _copy_text(record.id),
                        str(to_micros(record.created_at)),
                        _copy_text(envelope_to_json(envelope)),
                        _copy_text(record.message_id),
                        _copy_text(envelope.envid),
                        str(record.size),
                        "t" if record.notification else "f",
                    )
                    # The BYTEA in hex form (\x...), its backslash escaped for COPY.
                    copy.write("\t".join(fields) + "\t\\\\x")
                    written = 0
                    for chunk in content:
                        written += len(chunk)
                        if written > record.size:
                            raise ValueError(f"the content is longer than {record.size} bytes")
                        copy.write(chunk.hex())
                    if written != record.size:
                        raise ValueError(
                            f"the content is {written} bytes, the record says {record.size}"
                        )
                    copy.write("\n")
        except self._psycopg.errors.UniqueViolation:
            # Worded as SQLiteStore words it.
            if len(entries) == 1:
                raise ValueError(f"a message with id {ids[0]!r} is already stored") from None
            raise ValueError("a message with one of these ids is already stored") from None
        finally:
            cursor.close()
        recipients: list[tuple[Any, ...]] = []
        attempts: list[tuple[Any, ...]] = []
        for record, _ in entries:
            for position, r in enumerate(record.recipients):
                recipients.append(
                    (
                        record.id,
                        position,
                        str(r.address),
                        r.state.value,
                        micros_or_none(r.next_attempt_at),
                        r.confirmed,
                        r.lease_owner,
                        micros_or_none(r.lease_until),
                        r.delay_warned,
                    )
                )
                attempts.extend(
                    (record.id, position, seq, *attempt_values(attempt))
                    for seq, attempt in enumerate(r.attempts)
                )
        with tx.cursor() as cur:
            if recipients:
                cur.executemany(_INSERT_RECIPIENT, recipients)
            if attempts:
                cur.executemany(_INSERT_ATTEMPT, attempts)

    @_translated("read a message record")
    def get(self, tracking_id: str) -> MessageRecord | None:
        """See :meth:`~mailrelay.tracker.store.Store.get`."""
        with self._snapshot() as conn:
            return self._read_many(conn, [tracking_id]).get(tracking_id)

    @_translated("read message records")
    def get_many(self, tracking_ids: Sequence[str]) -> dict[str, MessageRecord]:
        """See :meth:`~mailrelay.tracker.store.Store.get_many` (three queries in all)."""
        if not tracking_ids:
            return {}
        with self._snapshot() as conn:
            return self._read_many(conn, tracking_ids)

    def _read_many(
        self, conn: psycopg.Connection[Any], tracking_ids: Sequence[str]
    ) -> dict[str, MessageRecord]:
        ids = list(tracking_ids)
        messages = conn.execute(
            "SELECT id, created_at, envelope, message_id, size, notification FROM messages"
            " WHERE id = ANY(%s)",
            (ids,),
        ).fetchall()
        if not messages:
            return {}
        return records_from_rows(
            messages,
            conn.execute(
                "SELECT message, position, at, host, code, enhanced, text, source FROM attempts"
                " WHERE message = ANY(%s) ORDER BY message, position, seq",
                (ids,),
            ),
            conn.execute(
                "SELECT message, position, address, state, next_attempt_at, confirmed, lease_owner,"
                " lease_until, delay_warned FROM recipients WHERE message = ANY(%s)"
                " ORDER BY message, position",
                (ids,),
            ),
        )

    @_translated("read a message's content")
    def content(self, tracking_id: str) -> bytes:
        """See :meth:`~mailrelay.tracker.store.Store.content`."""
        row = (
            self._connection()
            .execute("SELECT content FROM messages WHERE id = %s", (tracking_id,))
            .fetchone()
        )
        if row is None:
            raise KeyError(tracking_id)
        return bytes(row[0])

    @_translated("claim due work")
    def claim(
        self, *, worker: str, now: dt.datetime, lease: dt.timedelta, limit: int
    ) -> list[Claim]:
        """See :meth:`~mailrelay.tracker.store.Store.claim` (see the module docstring)."""
        if limit < 1:
            return []
        until = now + lease
        args: dict[str, Any] = {
            "now": to_micros(now),
            "until": to_micros(until),
            "worker": worker,
        }
        order: list[str] = []  # the messages leased, in due order
        grouped: dict[str, list[tuple[Any, ...]]] = {}
        tried: list[str] = []
        rows = max(4 * limit, 64)
        with self._transaction(work=True) as tx:
            for _ in range(_CLAIM_ROUNDS):
                need = limit - len(order)
                due = tx.execute(_DUE_ROWS, {**args, "tried": tried, "rows": rows}).fetchall()
                # The first ``need`` messages, in due order.
                picked = list(dict.fromkeys(row[0] for row in due))[:need]
                if not picked:
                    break
                tried.extend(picked)
                locked = {row[0] for row in tx.execute(_LOCK, {"ids": picked})}
                if locked:
                    for row in tx.execute(_LEASE, {**args, "ids": list(locked)}):
                        grouped.setdefault(row[0], []).append(row)
                    order.extend(tracking_id for tracking_id in picked if tracking_id in grouped)
                if len(due) < rows or len(order) >= limit:
                    break  # the due rows are all read, or the batch is full
                rows *= 2  # messages with many recipients, or taken by others: read further
        claims = []
        for tracking_id in order:
            group = sorted(grouped[tracking_id], key=lambda row: row[1])  # envelope order
            addresses = tuple(cached_address(row[2]) for row in group)
            fresh = not any(row[3] or row[4] for row in group)
            claims.append(new_claim(tracking_id, worker, until, addresses, fresh))
        return claims

    @_translated("record changes")
    def apply(
        self,
        tracking_id: str,
        changes: Sequence[Change],
        *,
        worker: str | None = None,
    ) -> tuple[Address, ...]:
        """See :meth:`~mailrelay.tracker.store.Store.apply`."""
        return self._apply_many([(tracking_id, changes)], worker, None)[0]

    @_translated("record changes")
    def apply_many(
        self,
        batch: Sequence[tuple[str, Sequence[Change]]],
        *,
        worker: str | None = None,
        then: FollowUp | None = None,
    ) -> list[tuple[Address, ...]]:
        """See :meth:`~mailrelay.tracker.store.Store.apply_many`: one transaction, one commit.

        The messages concerned are locked (in id order), their recipients read, the rules
        applied in Python (:func:`_apply_row`), and the new attempts and states written
        with one ``executemany`` each; what ``then`` returns is added in the same
        transaction.
        """
        return self._apply_many(batch, worker, then)

    def _apply_many(
        self,
        batch: Sequence[tuple[str, Sequence[Change]]],
        worker: str | None,
        then: FollowUp | None,
    ) -> list[tuple[Address, ...]]:
        if not batch:
            return []
        ids = sorted({tracking_id for tracking_id, _ in batch})
        with self._transaction(work=worker is not None) as tx:
            locked = {
                row[0]
                for row in tx.execute(
                    "SELECT id FROM messages WHERE id = ANY(%s) ORDER BY id FOR NO KEY UPDATE",
                    (ids,),
                )
            }
            for tracking_id, _ in batch:
                if tracking_id not in locked:
                    raise KeyError(tracking_id)
            # Per message, per address text: [position, state, next_attempt_at, confirmed,
            # lease_owner, lease_until, attempt count, delay_warned], changed in place as
            # the batch goes.
            current: dict[str, dict[str, list[Any]]] = {}
            for message, address, *row in tx.execute(
                "SELECT r.message, r.address, r.position, r.state, r.next_attempt_at,"
                " r.confirmed, r.lease_owner, r.lease_until, (SELECT COUNT(*) FROM attempts a"
                " WHERE a.message = r.message AND a.position = r.position), r.delay_warned"
                " FROM recipients r WHERE r.message = ANY(%s)",
                (ids,),
            ):
                current.setdefault(message, {})[address] = row
            attempt_rows: list[tuple[Any, ...]] = []
            state_rows: list[tuple[Any, ...]] = []
            results: list[tuple[Address, ...]] = []
            for tracking_id, changes in batch:
                recipients = current.get(tracking_id, {})
                changed = []
                for change in changes:
                    row = row_for(recipients, change.address)
                    if row is None:
                        continue
                    if change.attempt is not None:
                        attempt_rows.append(
                            (tracking_id, row[0], row[6], *attempt_values(change.attempt))
                        )
                        row[6] += 1
                    if _apply_row(row, change, worker):
                        changed.append(change.address)
                        state_rows.append((row[1], row[2], row[3], row[7], tracking_id, row[0]))
                results.append(tuple(changed))
            with tx.cursor() as cur:
                if attempt_rows:
                    cur.executemany(_INSERT_ATTEMPT, attempt_rows)
                if state_rows:
                    # In batch order: a recipient changed twice ends as the last change.
                    cur.executemany(
                        "UPDATE recipients SET state = %s, next_attempt_at = %s, confirmed = %s,"
                        " delay_warned = %s, lease_owner = NULL, lease_until = NULL"
                        " WHERE message = %s AND position = %s",
                        state_rows,
                    )
            if then is not None:
                follow = then(results)
                if follow:
                    self._add(tx, follow)
            return results

    @_translated("look messages up")
    def lookup(self, *, envid: str | None = None, message_id: str | None = None) -> list[str]:
        """See :meth:`~mailrelay.tracker.store.Store.lookup`."""
        rows = (
            self._connection()
            .execute(
                "SELECT id FROM messages WHERE (%(envid)s::text IS NOT NULL AND envid = %(envid)s)"
                " OR (%(mid)s::text IS NOT NULL AND message_id = %(mid)s)"
                " ORDER BY created_at, id",
                {"envid": envid, "mid": message_id},
            )
            .fetchall()
        )
        return [row[0] for row in rows]

    @_translated("find messages")
    def find(
        self,
        *,
        state: State | None = None,
        created_before: dt.datetime | None = None,
        limit: int | None = None,
    ) -> list[MessageRecord]:
        """See :meth:`~mailrelay.tracker.store.Store.find`."""
        with self._snapshot() as conn:
            ids = [
                row[0]
                for row in conn.execute(
                    "SELECT id FROM messages m WHERE (%(state)s::text IS NULL OR EXISTS (SELECT 1"
                    " FROM recipients r WHERE r.message = m.id AND r.state = %(state)s))"
                    " AND (%(before)s::bigint IS NULL OR created_at < %(before)s)"
                    " ORDER BY created_at, id LIMIT %(limit)s",
                    {
                        "state": None if state is None else state.value,
                        "before": micros_or_none(created_before),
                        "limit": limit,
                    },
                )
            ]
            records = self._read_many(conn, ids) if ids else {}
        return [records[tracking_id] for tracking_id in ids if tracking_id in records]

    @_translated("read the next due time")
    def next_due(self) -> dt.datetime | None:
        """See :meth:`~mailrelay.tracker.store.Store.next_due`."""
        row = self._connection().execute(_NEXT_DUE).fetchone()
        return None if row is None else time_or_none(row[0])

    def close(self) -> None:
        """Close every connection the store opened. The store cannot be used afterwards."""
        self._closed = True
        with self._all_lock:
            connections, self._all = list(self._all.values()), {}
        for conn in connections:
            with suppress(Exception):
                conn.close()
        self._local = threading.local()


def _apply_row(row: list[Any], change: Change, worker: str | None) -> bool:
    """:func:`~mailrelay.tracker.store.apply_change` on a row read by ``_apply_many``.

    ``row`` is changed in place; returns whether the recipient's state changed.
    """
    state = State(row[1])
    if worker is not None:
        allowed = state is State.SENDING and row[4] == worker
    elif change.expect is not None:
        allowed = state in change.expect
    else:
        allowed = state not in FINAL_STATES
    if not allowed:
        return False
    if repeats_confirmation(state, bool(row[3]), change):
        return False
    row[1] = change.state.value
    row[2] = micros_or_none(change.next_attempt_at) if change.state in DUE_STATES else None
    if change.confirmed is not None:
        row[3] = change.confirmed
    if change.delay_warned is not None:
        row[7] = change.delay_warned
    row[4] = row[5] = None
    return True
