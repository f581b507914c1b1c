"""The embedded default store: one SQLite database file.

Rules of this module:

* The database runs in WAL mode (readers never block the writer). Two
  durability levels, chosen per transaction: what the application hands over
  (submissions, ``cancel``, DSN results: writes without a ``worker``) commits
  with ``synchronous`` (default ``FULL``: it survives a crash of the process
  *and* of the machine); the runner's own bookkeeping (claims and attempt
  results, written for a ``worker``) commits with ``work_synchronous`` (default
  ``NORMAL``: no fsync, it survives a crash of the process but a power loss may
  undo the last few). Undoing those can only make work due again, so a power
  loss costs re-sent mail (at-least-once), never a lost submission: WAL frames
  are replayed in order, and each ``FULL`` commit flushes everything before it.
  Every write is an explicit
  ``BEGIN IMMEDIATE`` transaction: it takes the write lock up front, so two
  workers racing to claim work serialize at ``BEGIN`` instead of deadlocking
  on a read-to-write upgrade. A busy timeout makes waiting writers wait, not fail.
* :meth:`SQLiteStore.add` writes the record and the message bytes in one
  transaction. A message over :data:`STREAM_THRESHOLD` bytes is streamed into a
  pre-sized BLOB (``zeroblob`` + incremental blob I/O), so no second copy of a
  large message is built in memory; smaller ones are bound whole, and the rows
  of a batch go in with ``executemany``.
* A worker's results (``apply_many`` with a ``worker``) for recipients that this
  store's own ``claim`` leased are written without reading the recipients first: a
  worker's change applies exactly when the recipient is SENDING under its lease, which
  the UPDATE states in its WHERE. Each attempt is appended with the number its claim
  counted (the primary key refuses it if an attempt was stored since). When a row count
  shows a change that did not apply, or the key refuses an attempt, the transaction is
  rolled back and the batch takes the general path, which reads the rows and applies
  the rules in Python. Either way the results are the rules' own.
* Every public method turns a failure of SQLite itself (``sqlite3.Error``: disk full,
  locked past the busy timeout, an I/O error, a corrupt, read-only or unopenable file)
  into :class:`~mailrelay.errors.StoreError`, transient or not by SQLite's result code,
  with the original as its cause. A transaction that fails, at any statement or at its
  ``COMMIT``, is rolled back, so the thread's connection is ready for the next one.
* Each thread gets its own connection (sqlite3 connections are not meant to be
  shared between threads), closed once the thread has ended (when another thread
  opens one), so submitting from a thread per request leaks nothing; several
  processes may open the same file.
* The schema carries a version (table ``schema_version``). Opening a database
  applies the migrations it lacks, in order, each in its own transaction; a
  database written by a newer mailrelay is refused rather than misread.
* Times are stored as integer microseconds since the epoch, so they come back
  exactly as given and compare in SQL.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import operator
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any, ParamSpec, TypeVar

from mailrelay.address import Address
from mailrelay.errors import ConfigurationError, StoreError
from mailrelay.tracker.store import (
    DUE_STATES,
    FINAL_STATES,
    Attempt,
    Change,
    Claim,
    FollowUp,
    MessageRecord,
    RecipientRecord,
    State,
    attempt_values,
    cached_address,
    envelope_to_json,
    micros_or_none,
    new_claim,
    records_from_rows,
    remember_address,
    repeats_confirmation,
    row_for,
    time_or_none,
    to_micros,
)

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "STREAM_THRESHOLD", "SQLiteStore"]

#: Messages larger than this (bytes) are streamed into their BLOB chunk by chunk; smaller
#: ones are joined in memory and bound as one parameter (fewer statements per message).
STREAM_THRESHOLD = 1 << 20
_LEVELS = frozenset({"FULL", "NORMAL", "EXTRA"})

# Binding parameters: the sqlite3 module binds an exact int, float, str or bytearray as it
# is, but looks for an adapter (PEP 246) for anything else, None and bytes included, and in
# CPython 3.11 that lookup raises and clears an AttributeError per value: it costs about as
# much as binding three ints. So the statements run for every message write the NULLs they
# always store as SQL literals, and a small message's bytes are bound as a bytearray (the
# copy costs less than the lookup up to this size; the column stores the same BLOB).
_COPY_LIMIT = 8192

# SQLite's primary result codes after which trying again later may help: BUSY, LOCKED,
# NOMEM, IOERR, FULL, PROTOCOL (https://sqlite.org/rescode.html). The others (CORRUPT,
# NOTADB, CANTOPEN, READONLY, PERM, a plain ERROR) say the database is unusable as it is.
_TRANSIENT_CODES = frozenset({5, 6, 7, 10, 13, 15})
# BUSY and LOCKED: another connection holds a lock the statement needs.
_BUSY_CODES = frozenset({5, 6})

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _store_error(exc: sqlite3.Error, what: str) -> StoreError:
    code = getattr(exc, "sqlite_errorcode", None)
    name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
    transient = code is not None and code & 0xFF in _TRANSIENT_CODES
    return StoreError(f"the SQLite store could not {what}: {exc} ({name})", is_transient=transient)


def _translated(what: str) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """Raise :class:`StoreError` (from the original) for any ``sqlite3.Error`` the method
    lets out; ``what`` says what it was doing, for the message."""

    def decorate(method: Callable[_P, _R]) -> Callable[_P, _R]:
        @functools.wraps(method)
        def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            try:
                return method(*args, **kwargs)
            except sqlite3.Error as exc:
                raise _store_error(exc, what) from exc

        return wrapper

    return decorate


#: The schema, one script per version: ``MIGRATIONS[n]`` takes version ``n`` to ``n + 1``.
MIGRATIONS: tuple[str, ...] = (
    # 0 -> 1: the tables.
    """
    CREATE TABLE messages (
        id TEXT PRIMARY KEY,
        created_at INTEGER NOT NULL,
        envelope TEXT NOT NULL,
        message_id TEXT,
        envid TEXT,
        size INTEGER NOT NULL,
        content BLOB NOT NULL
    );
    CREATE TABLE recipients (
        message TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        address TEXT NOT NULL,
        state TEXT NOT NULL,
        next_attempt_at INTEGER,
        confirmed INTEGER NOT NULL DEFAULT 0,
        lease_owner TEXT,
        lease_until INTEGER,
        PRIMARY KEY (message, position)
    );
    CREATE TABLE attempts (
        message TEXT NOT NULL,
        position INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        at INTEGER NOT NULL,
        host TEXT,
        code INTEGER,
        enhanced TEXT,
        text TEXT NOT NULL,
        source TEXT NOT NULL,
        PRIMARY KEY (message, position, seq),
        FOREIGN KEY (message, position) REFERENCES recipients(message, position)
            ON DELETE CASCADE
    );
    CREATE INDEX recipients_due ON recipients(state, next_attempt_at);
    """,
    # 1 -> 2: the lookups that dashboards and DSN correlation make.
    """
    CREATE INDEX recipients_lease ON recipients(state, lease_until);
    CREATE INDEX messages_created ON messages(created_at);
    CREATE INDEX messages_message_id ON messages(message_id);
    CREATE INDEX messages_envid ON messages(envid);
    """,
    # 2 -> 3: due work in due order, then message id, so that a claim reads an index in
    # order and stops after its batch instead of grouping the whole queue. The indexes are
    # partial: a recipient is in the first while due (QUEUED, DEFERRED), in the second while
    # SENDING, and in neither once final, so recording a result touches one index entry and
    # the indexes stay the size of the queue, not of the history. (The state names are
    # State's values.)
    """
    CREATE INDEX recipients_due_order ON recipients(next_attempt_at, message)
        WHERE state IN ('queued', 'deferred');
    CREATE INDEX recipients_lease_order ON recipients(lease_until, message)
        WHERE state = 'sending';
    DROP INDEX recipients_due;
    DROP INDEX recipients_lease;
    """,
    # 3 -> 4: which messages are failure DSNs the tracker generated (MessageRecord.notification).
    """
    ALTER TABLE messages ADD COLUMN notification INTEGER NOT NULL DEFAULT 0;
    """,
    # 4 -> 5: the ENVID index holds only the messages that have one (most have none), so
    # storing a message without one writes no entry. Lookups ask "envid = ?", which
    # implies "envid IS NOT NULL": SQLite still uses the index for them.
    """
    DROP INDEX messages_envid;
    CREATE INDEX messages_envid ON messages(envid) WHERE envid IS NOT NULL;
    """,
    # 5 -> 6: which recipients a delay warning was queued for (RecipientRecord.delay_warned).
    """
    ALTER TABLE recipients ADD COLUMN delay_warned INTEGER NOT NULL DEFAULT 0;
    """,
)

#: The version this code writes.
SCHEMA_VERSION = len(MIGRATIONS)

_SENDING = State.SENDING.value
# The due states' stored texts: a member's ``_value_`` and a set of str cost less than
# hashing the member (Enum.__hash__ is Python code), and a worker's results are checked
# one by one.
_DUE_TEXTS = frozenset(state.value for state in DUE_STATES)
_address_of = operator.attrgetter("address")
_first = operator.itemgetter(0)
# Each state's stored text: a dict lookup costs less than the ``value`` property, and rows
# are written for every recipient submitted and every result.
_STATE_TEXT = {state: state.value for state in State}
# Which recipients a claim takes (see the store rules), written out in full so that no
# SQL is ever assembled at run time. The WHERE clauses repeat the partial indexes' own
# (literal state names), which is what lets SQLite use them. A claim first reads due
# recipients in due order (then message id): four index range scans merged, read lazily
# until ``limit`` distinct messages are seen, so its cost follows the batch, not the queue.
# A message's first row carries its earliest due time, so this is the order of
# "MIN(due), message" (no due time sorts first). Then every due recipient of those
# messages is leased in one UPDATE ... RETURNING, which also says whether each has a
# history (Claim.fresh): its confirmation and attempt count. Both bind :now; the second
# also :ids (a JSON array), :worker and :until.
_DUE_IN_ORDER = """
    SELECT message, next_attempt_at FROM recipients
        WHERE state IN ('queued', 'deferred') AND next_attempt_at IS NULL
    UNION ALL SELECT message, next_attempt_at FROM recipients
        WHERE state IN ('queued', 'deferred') AND next_attempt_at <= :now
    UNION ALL SELECT message, lease_until FROM recipients
        WHERE state = 'sending' AND lease_until IS NULL
    UNION ALL SELECT message, lease_until FROM recipients
        WHERE state = 'sending' AND lease_until <= :now
    ORDER BY 2, 1
"""
_LEASE_DUE = """
    UPDATE recipients SET state = 'sending', lease_owner = :worker, lease_until = :until
    WHERE message IN (SELECT value FROM json_each(:ids))
      AND ((state IN ('queued', 'deferred')
            AND (next_attempt_at IS NULL OR next_attempt_at <= :now))
           OR (state = 'sending' AND (lease_until IS NULL OR lease_until <= :now)))
    RETURNING message, position, address, confirmed, (
        SELECT COUNT(*) FROM attempts a
        WHERE a.message = recipients.message AND a.position = recipients.position)
"""
# The earliest due time: the first entry of each partial index (MIN skips NULLs).
_NEXT_DUE = """
    SELECT MIN(due) FROM (
        SELECT MIN(next_attempt_at) AS due FROM recipients
            WHERE state IN ('queued', 'deferred')
        UNION ALL SELECT MIN(lease_until) FROM recipients WHERE state = 'sending')
"""


class SQLiteStore:
    """A :class:`~mailrelay.tracker.store.Store` in one SQLite file.

    Args:
        path: the database file (created when missing). ``":memory:"`` is refused:
            each thread would get a different, empty database.
        busy_timeout: seconds a writer waits for another's lock before failing.
        synchronous: SQLite's ``synchronous`` setting for what the application
            hands over (submissions, cancellations, DSN results); ``"FULL"`` (the
            default) survives power loss, ``"NORMAL"`` survives a process crash only.
        work_synchronous: the setting for the runner's claims and attempt results;
            ``"NORMAL"`` (the default) skips the fsync: a power loss may undo the
            last few, which makes their recipients due again (re-sent, never lost).
            ``"FULL"`` makes every commit survive power loss, at a disk flush each.

    Raises:
        ConfigurationError: ``":memory:"``, an unknown ``synchronous`` value, or a
            database whose schema is newer than this code.
    """

    @_translated("open the database")
    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = 30.0,
        synchronous: str = "FULL",
        work_synchronous: str = "NORMAL",
    ) -> None:
        if str(path) == ":memory:":
            raise ConfigurationError("SQLiteStore needs a file; use MemoryStore for tests")
        for name, value in (("synchronous", synchronous), ("work_synchronous", work_synchronous)):
            if value.upper() not in _LEVELS:
                raise ConfigurationError(f"{name} must be FULL, NORMAL or EXTRA: {value!r}")
        self.path = os.fspath(path)
        self._busy_timeout = busy_timeout
        self._synchronous = synchronous.upper()
        self._work_synchronous = work_synchronous.upper()
        self._local = threading.local()
        # Per claimed message, its claimed addresses and their rows (message, position,
        # address text, confirmed, attempt count), from this store's own claims: what
        # apply_many's fast path needs to write a worker's results without reading the
        # recipients first (see _apply_fast). A recipient's position never changes; its
        # attempt count only grows, and a count grown since the claim makes the fast
        # path's insert collide with the attempt stored meanwhile (primary key), never
        # skip a number.
        self._claimed: dict[str, tuple[tuple[Address, ...], Sequence[tuple[Any, ...]]]] = {}
        self._claimed_lock = threading.Lock()
        # Every thread's connection, by thread (see _connection).
        self._all: dict[threading.Thread, sqlite3.Connection] = {}
        self._all_lock = threading.Lock()
        self._closed = False
        self._migrate(self._connection())

    def __repr__(self) -> str:
        return f"<SQLiteStore {self.path!r}>"

    # -- connections and transactions -----------------------------------------

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        if self._closed:
            raise ConfigurationError("the store is closed")
        # isolation_level=None: no implicit transactions; we BEGIN explicitly.
        conn = sqlite3.connect(
            self.path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False
        )
        conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
        self._use_wal(conn)
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        conn.execute("PRAGMA foreign_keys = ON")
        self._local.conn = conn
        self._local.level = self._synchronous
        with self._all_lock:
            # A thread that has ended never uses its connection again: close those now,
            # or an application that submits from a thread per request would leak one
            # connection (and its file descriptors) per thread until the store is closed.
            for thread in [thread for thread in self._all if not thread.is_alive()]:
                with suppress(sqlite3.Error):
                    self._all.pop(thread).close()
            self._all[threading.current_thread()] = conn
        return conn

    def _use_wal(self, conn: sqlite3.Connection) -> None:
        """Put the database in WAL mode (the file keeps it).

        SQLite does not wait out the busy timeout to change the journal mode: while another
        connection holds a lock on the file (several workers opening a new database at
        once), the change fails at once with SQLITE_BUSY. So the mode is read first (a
        database already in WAL needs no change, and most opens find it so), and a change
        that found the file busy is tried again, for up to the busy timeout.
        """
        deadline = time.monotonic() + self._busy_timeout
        pause = 0.001
        while True:
            try:
                if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                code = getattr(exc, "sqlite_errorcode", None)
                busy = code is not None and code & 0xFF in _BUSY_CODES
                if not busy or time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    @contextmanager
    def _write(self, *, work: bool = False) -> Iterator[sqlite3.Connection]:
        """A write transaction; ``work``: the runner's bookkeeping (``work_synchronous``)."""
        conn = self._connection()
        level = self._work_synchronous if work else self._synchronous
        if self._local.level != level:
            # The level is read at COMMIT and may not change inside a transaction.
            conn.execute(f"PRAGMA synchronous = {level}")
            self._local.level = level
        # BEGIN IMMEDIATE takes the write lock now: a claim cannot interleave with another.
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            # SQLite may have rolled back already (after SQLITE_FULL, say); a failed
            # COMMIT may leave the transaction open. Either way the connection must come
            # out of it, and the original error is the one to report.
            if conn.in_transaction:
                with suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                conn.execute("INSERT INTO schema_version (version) VALUES (0)")
                version = 0
            else:
                version = int(row[0])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        if version > SCHEMA_VERSION:
            raise ConfigurationError(
                f"{self.path} has schema version {version}; this mailrelay knows up to "
                f"{SCHEMA_VERSION}: upgrade mailrelay"
            )
        while version < SCHEMA_VERSION:
            with self._write() as tx:
                # Another process may have migrated while we waited for the lock.
                current = int(tx.execute("SELECT version FROM schema_version").fetchone()[0])
                if current != version:
                    version = current
                    continue
                for statement in MIGRATIONS[version].split(";"):
                    if statement.strip():
                        tx.execute(statement)
                version += 1
                tx.execute("UPDATE schema_version SET version = ?", (version,))

    @property
    @_translated("read its schema version")
    def schema_version(self) -> int:
        """The database's schema version."""
        row = self._connection().execute("SELECT version FROM schema_version").fetchone()
        return int(row[0])

    # -- the Store protocol -----------------------------------------------------

    @_translated("store a message")
    def add(self, record: MessageRecord, content: Iterable[bytes]) -> None:
        """See :meth:`~mailrelay.tracker.store.Store.add` (streams the bytes into a BLOB)."""
        with self._write() as tx:
            self._add(tx, record, content)

    @_translated("store messages")
    def add_many(self, entries: Sequence[tuple[MessageRecord, Iterable[bytes]]]) -> None:
        """See :meth:`~mailrelay.tracker.store.Store.add_many`: one transaction, one commit.

        Small messages go in with one ``executemany`` per table; large ones are streamed.
        """
        small, large = _split(entries)
        with self._write() as tx:
            self._add_split(tx, small, large)

    def _add_split(
        self,
        tx: sqlite3.Connection,
        small: _Rows,
        large: Sequence[tuple[MessageRecord, Iterable[bytes]]],
    ) -> None:
        messages, unleased, leased, attempts = small
        if messages:
            try:
                # An absent ENVID is bound as "" (an Envelope refuses an empty one, RFC 3461
                # §4.4) and stored as NULL by the SQL: see _COPY_LIMIT for why.
                tx.executemany(
                    "INSERT INTO messages (id, created_at, envelope, message_id, envid, size,"
                    " content, notification) VALUES (?, ?, ?, ?, NULLIF(?, ''), ?, ?, ?)",
                    messages,
                )
            except sqlite3.IntegrityError:
                raise ValueError("a message with one of these ids is already stored") from None
        if unleased:
            # Recipients without a lease (every new one the tracker submits) go in with
            # their NULLs written in the SQL, not bound (see _COPY_LIMIT).
            tx.executemany(
                "INSERT INTO recipients (message, position, address, state, next_attempt_at,"
                " confirmed, lease_owner, lease_until) VALUES (?, ?, ?, ?, ?, ?, NULL, NULL)",
                unleased,
            )
        if leased:
            tx.executemany(_INSERT_RECIPIENT, leased)
        if attempts:
            tx.executemany(_INSERT_ATTEMPT, attempts)
        for record, content in large:
            self._add(tx, record, content)

    def _add(self, tx: sqlite3.Connection, record: MessageRecord, content: Iterable[bytes]) -> None:
        try:
            cursor = tx.execute(
                "INSERT INTO messages (id, created_at, envelope, message_id, envid, size,"
                " content, notification) VALUES (?, ?, ?, ?, ?, ?, zeroblob(?), ?)",
                (
                    record.id,
                    to_micros(record.created_at),
                    envelope_to_json(record.envelope),
                    record.message_id,
                    record.envelope.envid,
                    record.size,
                    record.size,
                    int(record.notification),
                ),
            )
        except sqlite3.IntegrityError:
            raise ValueError(f"a message with id {record.id!r} is already stored") from None
        rowid = cursor.lastrowid
        assert rowid is not None
        written = 0
        if record.size:
            with tx.blobopen("messages", "content", rowid) as blob:
                for chunk in content:
                    if written + len(chunk) > record.size:
                        raise ValueError(f"the content is longer than {record.size} bytes")
                    blob.write(chunk)
                    written += len(chunk)
        else:
            written = sum(len(chunk) for chunk in content)
        if written != record.size:
            raise ValueError(f"the content is {written} bytes, the record says {record.size}")
        for position, recipient in enumerate(record.recipients):
            self._insert_recipient(tx, record.id, position, recipient)

    def _insert_recipient(
        self, tx: sqlite3.Connection, tracking_id: str, position: int, recipient: RecipientRecord
    ) -> None:
        tx.execute(
            _INSERT_RECIPIENT,
            (
                *_recipient_values(tracking_id, position, recipient),
                recipient.lease_owner,
                micros_or_none(recipient.lease_until),
                1 if recipient.delay_warned else 0,
            ),
        )
        for seq, attempt in enumerate(recipient.attempts):
            tx.execute(_INSERT_ATTEMPT, _attempt_row(tracking_id, position, seq, attempt))

    @_translated("read a message record")
    def get(self, tracking_id: str) -> MessageRecord | None:
        """See :meth:`~mailrelay.tracker.store.Store.get`."""
        conn = self._connection()
        # One read transaction, so the record and its recipients are one snapshot.
        conn.execute("BEGIN")
        try:
            return self._read(conn, tracking_id)
        finally:
            conn.execute("COMMIT")

    @_translated("read message records")
    def get_many(self, tracking_ids: Sequence[str]) -> dict[str, MessageRecord]:
        """See :meth:`~mailrelay.tracker.store.Store.get_many` (three queries in all)."""
        conn = self._connection()
        conn.execute("BEGIN")
        try:
            return self._read_many(conn, tracking_ids)
        finally:
            conn.execute("COMMIT")

    def _read(self, conn: sqlite3.Connection, tracking_id: str) -> MessageRecord | None:
        return self._read_many(conn, [tracking_id]).get(tracking_id)

    def _read_many(
        self, conn: sqlite3.Connection, tracking_ids: Sequence[str]
    ) -> dict[str, MessageRecord]:
        # The ids travel as one JSON array parameter (json_each), so the SQL is constant.
        ids = _json_ids(list(tracking_ids))
        messages = conn.execute(
            "SELECT id, created_at, envelope, message_id, size, notification FROM messages"
            " WHERE id IN (SELECT value FROM json_each(?))",
            (ids,),
        ).fetchall()
        if not messages:
            return {}
        return records_from_rows(
            messages,
            conn.execute(
                "SELECT message, position, at, host, code, enhanced, text, source FROM attempts"
                " WHERE message IN (SELECT value FROM json_each(?))"
                " ORDER BY message, position, seq",
                (ids,),
            ),
            conn.execute(
                "SELECT message, position, address, state, next_attempt_at, confirmed, lease_owner,"
                " lease_until, delay_warned FROM recipients"
                " WHERE message IN (SELECT value FROM json_each(?)) ORDER BY message, position",
                (ids,),
            ),
        )

    @_translated("read a message's content")
    def content(self, tracking_id: str) -> bytes:
        """See :meth:`~mailrelay.tracker.store.Store.content`."""
        row = (
            self._connection()
            .execute("SELECT content FROM messages WHERE id = ?", (tracking_id,))
            .fetchone()
        )
        if row is None:
            raise KeyError(tracking_id)
        return bytes(row[0])

    @_translated("claim due work")
    def claim(
        self, *, worker: str, now: dt.datetime, lease: dt.timedelta, limit: int
    ) -> list[Claim]:
        """See :meth:`~mailrelay.tracker.store.Store.claim`."""
        until = now + lease
        if limit < 1:
            return []
        args: dict[str, Any] = {"now": to_micros(now)}
        order: dict[str, None] = {}  # an ordered set
        rows: list[tuple[Any, ...]] = []
        with self._write(work=True) as tx:
            cursor = tx.execute(_DUE_IN_ORDER, args)
            try:
                # Each row adds at most one message: fetching as many rows as messages
                # are missing never reads past the batch.
                need = limit
                while True:
                    due = cursor.fetchmany(need)
                    order.update(dict.fromkeys(map(_first, due)))
                    if len(due) < need or len(order) >= limit:
                        break
                    need = limit - len(order)
            finally:
                cursor.close()
            if order:
                args.update(ids=_json_ids(list(order)), worker=worker, until=to_micros(until))
                rows = tx.execute(_LEASE_DUE, args).fetchall()
        # Each row: message, position, address, confirmed, attempt count.
        claims = []
        claimed: dict[str, tuple[tuple[Address, ...], Sequence[tuple[Any, ...]]]] = {}
        by_id = dict(zip(map(_first, rows), rows, strict=True))
        if len(by_id) == len(rows):
            # One recipient per message (the common case): no grouping, no sorting.
            for tracking_id in order:
                row = by_id.get(tracking_id)
                if row is None:
                    continue
                addresses: tuple[Address, ...] = (cached_address(row[2]),)
                claimed[tracking_id] = (addresses, (row,))
                fresh = not (row[3] or row[4])
                claims.append(new_claim(tracking_id, worker, until, addresses, fresh))
        else:
            grouped: dict[str, list[tuple[Any, ...]]] = {}
            for row in rows:
                grouped.setdefault(row[0], []).append(row)
            for tracking_id in order:
                group = grouped.get(tracking_id)
                if group is None:
                    continue
                group.sort()  # envelope order (RETURNING gives no order)
                addresses = tuple([cached_address(row[2]) for row in group])
                claimed[tracking_id] = (addresses, group)
                fresh = not any(row[3] or row[4] for row in group)
                claims.append(new_claim(tracking_id, worker, until, addresses, fresh))
        if claimed:
            with self._claimed_lock:
                if len(self._claimed) + len(claimed) > _CLAIMED_LIMIT:
                    # Claims whose results never came (a worker that stopped): forget
                    # them all, simpler than LRU; their results take the slow path.
                    self._claimed.clear()
                self._claimed.update(claimed)
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
        return self.apply_many([(tracking_id, changes)], worker=worker)[0]

    @_translated("record changes")
    def apply_many(
        self,
        batch: Sequence[tuple[str, Sequence[Change]]],
        *,
        worker: str | None = None,
        then: FollowUp | None = None,
    ) -> list[tuple[Address, ...]]:
        """See :meth:`~mailrelay.tracker.store.Store.apply_many`: one transaction, one commit.

        Three statements whatever the batch's size: one read of the recipients concerned,
        one ``executemany`` for the new attempts, one for the new states (and the inserts
        of what ``then`` returns). A worker's results for what this store leased to it
        skip the read (see :meth:`_apply_fast`). Changes for a ``worker`` commit with
        ``work_synchronous``, the others with ``synchronous``: the messages ``then`` adds
        share their changes' fate, so a power loss that undoes a bounce undoes its report
        too, and the bounce happens again.
        """
        if not batch:
            return []
        if worker is not None:
            fast = self._fast_rows(batch, worker)
            if fast is not None:
                try:
                    with self._write(work=True) as tx:
                        changed = self._apply_fast(tx, batch, fast)
                        if then is not None:
                            self._add_split(tx, *_split(then(changed)))
                        return changed
                except _NotFast:
                    pass  # rolled back: the slow path decides, on what is stored now
        with self._write(work=worker is not None) as tx:
            changed = self._apply_batch(tx, batch, worker)
            if then is not None:
                # In the same transaction: the follow-up messages and the changes they
                # follow from are committed together or not at all.
                self._add_split(tx, *_split(then(changed)))
            return changed

    def _fast_rows(
        self, batch: Sequence[tuple[str, Sequence[Change]]], worker: str
    ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]]] | None:
        """The rows of :meth:`_apply_fast` for a worker's batch, or None if it cannot take it.

        It can when every change is for a recipient this store's ``claim`` leased (so its
        position is known without a read) and sets neither ``confirmed`` nor
        ``delay_warned`` (a delay warning is once per recipient: the general path takes
        it). Each message's entry is taken out of the claims remembered: its results
        come once.
        """
        with self._claimed_lock:
            pop = self._claimed.pop
            entries = [pop(tracking_id, None) for tracking_id, _ in batch]
        due_rows: list[tuple[Any, ...]] = []
        done_rows: list[tuple[Any, ...]] = []
        attempt_rows: list[tuple[Any, ...]] = []
        last_attempt: Attempt | None = None
        last_values: tuple[Any, ...] = ()
        for (tracking_id, changes), entry in zip(batch, entries, strict=True):
            if entry is None or not changes:
                return None
            addresses, rows = entry
            # Each claimed address's row: a scan per change (by identity first, since the
            # claim's addresses are the ones the worker holds, else by equality) for a few;
            # an index for many, or a message to thousands would cost a scan per recipient.
            where: Callable[[Address], int] = (
                addresses.index if len(addresses) <= 8 else _index_of(addresses)
            )
            for change in changes:
                try:
                    _, position, _, _, seq = rows[where(change.address)]
                except ValueError:
                    return None
                if change.confirmed is not None or change.delay_warned is not None:
                    return None
                attempt = change.attempt
                if attempt is not None:
                    if attempt is not last_attempt:
                        last_attempt, last_values = attempt, attempt_values(attempt)
                    attempt_rows.append((tracking_id, position, seq, *last_values))
                state = change.state._value_
                if state in _DUE_TEXTS:
                    due_rows.append(
                        (
                            state,
                            micros_or_none(change.next_attempt_at),
                            tracking_id,
                            position,
                            worker,
                        )
                    )
                else:
                    done_rows.append((state, tracking_id, position, worker))
        return due_rows, done_rows, attempt_rows

    def _apply_fast(
        self,
        tx: sqlite3.Connection,
        batch: Sequence[tuple[str, Sequence[Change]]],
        rows: tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]]],
    ) -> list[tuple[Address, ...]]:
        """A worker's results when every change applies, without reading the recipients.

        A worker's change applies iff the recipient is SENDING under its lease
        (:func:`~mailrelay.tracker.store.apply_change`): the UPDATEs say so in their
        WHERE, and their row counts say whether every change applied. If one did not (a
        lease lost, a recipient changed twice, a message gone), raises :class:`_NotFast`,
        and the caller rolls back and takes the slow path, whose results are the rules'
        own. Otherwise each change's attempt is appended with the sequence number its
        claim counted; if an attempt was stored since (a stale worker's late result, a
        DSN), that number is taken, the insert fails on the primary key, and the slow
        path, which counts again, takes the batch too.
        """
        due_rows, done_rows, attempt_rows = rows
        count = 0
        if due_rows:
            count += tx.executemany(_UPDATE_LEASED_DUE, due_rows).rowcount
        if done_rows:
            count += tx.executemany(_UPDATE_LEASED_DONE, done_rows).rowcount
        if count != len(due_rows) + len(done_rows):
            raise _NotFast
        if attempt_rows:
            try:
                tx.executemany(_INSERT_ATTEMPT, attempt_rows)
            except sqlite3.IntegrityError:
                raise _NotFast from None
        return [tuple(map(_address_of, changes)) for _, changes in batch]

    def _apply_batch(
        self,
        tx: sqlite3.Connection,
        batch: Sequence[tuple[str, Sequence[Change]]],
        worker: str | None,
    ) -> list[tuple[Address, ...]]:
        ids = _json_ids(sorted({tracking_id for tracking_id, _ in batch}))
        # Per message, per address text: the row as a list [position, state, next_attempt_at,
        # confirmed, lease_owner, lease_until, attempt count, delay_warned], changed in
        # place as the batch goes. Only the recipient rows and attempt counts are read: the history
        # itself is append-only.
        current: dict[str, dict[str, list[Any]]] = {}
        for message, address, *row in tx.execute(
            "SELECT r.message, r.address, r.position, r.state, r.next_attempt_at, r.confirmed,"
            " r.lease_owner, r.lease_until, (SELECT COUNT(*) FROM attempts a"
            " WHERE a.message = r.message AND a.position = r.position), r.delay_warned"
            " FROM recipients r WHERE r.message IN (SELECT value FROM json_each(?))",
            (ids,),
        ):
            current.setdefault(message, {})[address] = row
        attempt_rows: list[tuple[Any, ...]] = []
        state_rows: list[tuple[Any, ...]] = []
        results: list[tuple[Address, ...]] = []
        # The changes of one send_many call share their Attempt objects (see transitions):
        # the stored form of the last one seen is reused while they do.
        last_attempt: Attempt | None = None
        last_values: tuple[Any, ...] = ()
        for tracking_id, changes in batch:
            recipients = current.get(tracking_id)
            if recipients is None:
                raise KeyError(tracking_id)
            changed = []
            for change in changes:
                row = row_for(recipients, change.address)
                if row is None:
                    continue
                position = row[0]
                attempt = change.attempt
                if attempt is not None:
                    if attempt is not last_attempt:
                        last_attempt, last_values = attempt, attempt_values(attempt)
                    attempt_rows.append((tracking_id, position, row[6], *last_values))
                    row[6] += 1
                if _apply_row(row, change, worker):
                    changed.append(change.address)
                    state_rows.append((row[1], row[2], row[3], row[7], tracking_id, position))
            results.append(tuple(changed))
        if attempt_rows:
            tx.executemany(_INSERT_ATTEMPT, attempt_rows)
        if state_rows:
            # Rows are updated in batch order, so a recipient changed twice ends as the last.
            # A change that applies always ends the lease (_apply_row): its NULLs are
            # written in the SQL, not bound (see _COPY_LIMIT).
            tx.executemany(
                "UPDATE recipients SET state = ?, next_attempt_at = ?, confirmed = ?,"
                " delay_warned = ?, lease_owner = NULL, lease_until = NULL"
                " WHERE message = ? AND position = ?",
                state_rows,
            )
        return results

    @_translated("look messages up")
    def lookup(self, *, envid: str | None = None, message_id: str | None = None) -> list[str]:
        """See :meth:`~mailrelay.tracker.store.Store.lookup`."""
        rows = (
            self._connection()
            .execute(
                "SELECT id FROM messages WHERE (? IS NOT NULL AND envid = ?)"
                " OR (? IS NOT NULL AND message_id = ?) ORDER BY created_at, id",
                (envid, envid, message_id, message_id),
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
        conn = self._connection()
        conn.execute("BEGIN")
        try:
            ids = [
                row[0]
                for row in conn.execute(
                    "SELECT id FROM messages m WHERE (? IS NULL OR EXISTS (SELECT 1 FROM"
                    " recipients r WHERE r.message = m.id AND r.state = ?))"
                    " AND (? IS NULL OR created_at < ?) ORDER BY created_at, id LIMIT ?",
                    (
                        None if state is None else state.value,
                        None if state is None else state.value,
                        micros_or_none(created_before),
                        micros_or_none(created_before),
                        -1 if limit is None else limit,
                    ),
                )
            ]
            records = self._read_many(conn, ids)
        finally:
            conn.execute("COMMIT")
        return [records[tracking_id] for tracking_id in ids if tracking_id in records]

    @_translated("read the next due time")
    def next_due(self) -> dt.datetime | None:
        """See :meth:`~mailrelay.tracker.store.Store.next_due`."""
        row = self._connection().execute(_NEXT_DUE).fetchone()
        return time_or_none(row[0])

    def close(self) -> None:
        """Close every thread's connection. The store cannot be used afterwards."""
        self._closed = True
        with self._all_lock:
            connections, self._all = list(self._all.values()), {}
        for conn in connections:
            conn.close()
        self._local = threading.local()


# A worker's result, applied only under its lease (see _apply_fast); the lease's NULLs
# are written in the SQL (see _COPY_LIMIT). One statement for the due states, which keep
# a due time, one for the others, which clear it.
_UPDATE_LEASED_DUE = (
    "UPDATE recipients SET state = ?, next_attempt_at = ?, lease_owner = NULL,"
    " lease_until = NULL WHERE message = ? AND position = ? AND state = 'sending'"
    " AND lease_owner = ?"
)
_UPDATE_LEASED_DONE = (
    "UPDATE recipients SET state = ?, next_attempt_at = NULL, lease_owner = NULL,"
    " lease_until = NULL WHERE message = ? AND position = ? AND state = 'sending'"
    " AND lease_owner = ?"
)
#: How many claimed messages a store remembers for the fast path (see SQLiteStore._claimed).
_CLAIMED_LIMIT = 16384


def _index_of(addresses: tuple[Address, ...]) -> Callable[[Address], int]:
    """``addresses.index``, from a dict built once (``ValueError`` when missing)."""
    positions = {address: index for index, address in enumerate(addresses)}

    def index(address: Address) -> int:
        found = positions.get(address)
        if found is None:
            raise ValueError(address)
        return found

    return index


class _NotFast(Exception):
    """A worker's batch that the fast path cannot apply (see ``_apply_fast``)."""


_INSERT_RECIPIENT = (
    "INSERT INTO recipients (message, position, address, state, next_attempt_at,"
    " confirmed, lease_owner, lease_until, delay_warned) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_ATTEMPT = (
    "INSERT INTO attempts (message, position, seq, at, host, code, enhanced, text, source)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _apply_row(row: list[Any], change: Change, worker: str | None) -> bool:
    """:func:`~mailrelay.tracker.store.apply_change` on a row read by ``_apply_batch``.

    The same rules, on the stored values, without building records: this is the hot
    path of recording results. ``row`` is changed in place; returns whether it changed.
    """
    state = row[1]
    if worker is not None:
        allowed = state == _SENDING and row[4] == worker
    elif change.expect is not None:
        allowed = State(state) in change.expect
    else:
        allowed = State(state) not in FINAL_STATES
    if not allowed:
        return False
    new = change.state
    if change.confirmed is not None and repeats_confirmation(State(state), bool(row[3]), change):
        return False
    row[1] = _STATE_TEXT[new]
    row[2] = micros_or_none(change.next_attempt_at) if new in DUE_STATES else None
    if change.confirmed is not None:
        row[3] = int(change.confirmed)
    if change.delay_warned is not None:
        row[7] = int(change.delay_warned)
    row[4] = row[5] = None
    return True


# The rows of small messages' submission, one list per statement: messages, recipients
# without and with a lease, attempts.
_Rows = tuple[
    list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]]
]


def _split(
    entries: Sequence[tuple[MessageRecord, Iterable[bytes]]],
) -> tuple[_Rows, list[tuple[MessageRecord, Iterable[bytes]]]]:
    """The rows of the entries to bind whole (joined and checked), and those to stream.

    Built before the transaction, so that the write lock is held for the statements
    only; one pass per entry, for every message submitted.
    """
    messages: list[tuple[Any, ...]] = []
    unleased: list[tuple[Any, ...]] = []
    leased: list[tuple[Any, ...]] = []
    attempts: list[tuple[Any, ...]] = []
    large: list[tuple[MessageRecord, Iterable[bytes]]] = []
    for record, content in entries:
        size = record.size
        if size > STREAM_THRESHOLD:
            large.append((record, content))
            continue
        data = b"".join(content)
        if len(data) != size:
            raise ValueError(f"the content is {len(data)} bytes, the record says {size}")
        tracking_id = record.id
        envelope = record.envelope
        messages.append(
            (
                tracking_id,
                _batch_micros(record.created_at),
                envelope_to_json(envelope),
                record.message_id,
                envelope.envid or "",
                size,
                bytearray(data) if size <= _COPY_LIMIT else data,
                1 if record.notification else 0,
            )
        )
        for position, recipient in enumerate(record.recipients):
            address = recipient.address
            text = str(address)
            remember_address(text, address)  # a claim reads it back soon
            due = recipient.next_attempt_at
            values = (
                tracking_id,
                position,
                text,
                recipient.state._value_,
                None if due is None else _batch_micros(due),
                1 if recipient.confirmed else 0,
            )
            if (
                recipient.lease_owner is None
                and recipient.lease_until is None
                and not recipient.delay_warned
            ):
                unleased.append(values)
            else:
                leased.append(
                    (
                        *values,
                        recipient.lease_owner,
                        micros_or_none(recipient.lease_until),
                        1 if recipient.delay_warned else 0,
                    )
                )
            if recipient.attempts:
                attempts.extend(
                    _attempt_row(tracking_id, position, seq, attempt)
                    for seq, attempt in enumerate(recipient.attempts)
                )
    return (messages, unleased, leased, attempts), large


def _recipient_values(
    tracking_id: str, position: int, recipient: RecipientRecord
) -> tuple[Any, ...]:
    """A recipient's columns before ``lease_owner, lease_until`` in ``_INSERT_RECIPIENT``."""
    text = str(recipient.address)
    remember_address(text, recipient.address)  # a claim reads it back soon
    return (
        tracking_id,
        position,
        text,
        _STATE_TEXT[recipient.state],
        None if recipient.next_attempt_at is None else _batch_micros(recipient.next_attempt_at),
        int(recipient.confirmed),
    )


def _attempt_row(tracking_id: str, position: int, seq: int, attempt: Attempt) -> tuple[Any, ...]:
    return (tracking_id, position, seq, *attempt_values(attempt))


# to_micros for the times a batch of submissions shares: every record of a submit_many
# call has one creation time, which is also its recipients' due time (a pure function of an
# immutable value, so remembering a few is safe).
_batch_micros = functools.lru_cache(maxsize=16)(to_micros)


def _json_ids(ids: list[str]) -> str:
    """``json.dumps(ids)``, written directly when no id needs escaping (the usual case).

    A claim sends its batch's ids this way; the encoder escapes character by character,
    while these checks and the join run at C speed. Printable ASCII other than ``"``
    and ``\\`` is exactly what JSON (RFC 8259 §7) and ``json.dumps`` leave as it is.
    """
    if not ids:
        return "[]"
    joined = '", "'.join(ids)
    # The only quotes allowed are the separators' own.
    if (
        joined.isascii()
        and joined.isprintable()
        and "\\" not in joined
        and joined.count('"') == 2 * len(ids) - 2
    ):
        return '["' + joined + '"]'
    return json.dumps(ids)
