"""A real PostgreSQL server for the tests: Debian's PostgreSQL binaries on loopback.

Rules of this module:

- The server is our own child: ``initdb`` makes a fresh cluster in a temporary directory
  (trust authentication: it listens on ``127.0.0.1`` only, at a free port picked at
  start-up, and on a unix socket inside that directory), and ``postgres`` runs in the
  foreground from it. It is stopped by its own PID (SIGINT: PostgreSQL's fast shutdown)
  and nothing else, and the directory is removed.
- ``initdb`` and ``postgres`` refuse to run as root: when the tests run as root, both run
  as the ``postgres`` system user (the directory is chowned to it). Otherwise they run as
  the current user.
- One server per test session (the ``postgres`` session fixture), one database in it
  (:data:`DATABASE`). Tests isolate themselves by schema: :meth:`PostgresInstance.new_schema`
  gives a fresh name and ``postgres_store`` a :class:`PostgresStore` on a fresh schema,
  dropped afterwards.
- ``fsync`` stays on: the server behaves as in production.

If the binaries are missing, the fixture fails (never skips) with the command that installs
them.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailrelay.tracker.postgres_store import PostgresStore
from tests.peers.scripted import free_port

HOST = "127.0.0.1"
DATABASE = "mailrelay_test"
USER = "postgres"
INSTALL_HINT = (
    "DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql"
)
#: Seconds to wait for the server to accept connections, and for it to stop.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


def find_binaries() -> Path:
    """The ``bin`` directory of the newest PostgreSQL installed (Debian's layout), or of
    ``MAILRELAY_PG_BIN``.

    Raises:
        FileNotFoundError: no ``initdb`` and ``postgres`` there, with the install command.
    """
    override = os.environ.get("MAILRELAY_PG_BIN")
    candidates = (
        [override]
        if override
        else sorted(
            glob.glob("/usr/lib/postgresql/*/bin"),
            key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
        )
    )
    for directory in reversed(candidates):
        path = Path(directory)
        if (path / "initdb").exists() and (path / "postgres").exists():
            return path
    raise FileNotFoundError(
        "PostgreSQL's initdb and postgres were not found (looked in "
        f"{override or '/usr/lib/postgresql/*/bin'}); install them with: {INSTALL_HINT}"
    )


class PostgresInstance:
    """A running throw-away PostgreSQL server.

    Attributes:
        host: ``"127.0.0.1"``.
        port: its TCP port.
        dsn: a libpq connection string for :data:`DATABASE` as the superuser.
        pid: the postmaster's PID.
        directory: the temporary directory (data, socket, log).
    """

    def __init__(self, process: subprocess.Popen[bytes], port: int, directory: Path) -> None:
        self.process = process
        self.pid = process.pid
        self.host = HOST
        self.port = port
        self.directory = directory
        self.dsn = f"host={HOST} port={port} user={USER} dbname={DATABASE} connect_timeout=10"

    def log_text(self) -> str:
        """The server's log so far."""
        path = self.directory / "postgres.log"
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""

    def new_schema(self) -> str:
        """A schema name nobody has used yet (the schema itself is not created)."""
        return f"t_{uuid.uuid4().hex[:16]}"

    def drop_schema(self, schema: str) -> None:
        """Drop a schema and everything in it."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))

    def stop(self) -> None:
        """Stop the server (fast shutdown) by its PID, then remove its directory."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT)
        shutil.rmtree(self.directory, ignore_errors=True)


def start_postgres() -> PostgresInstance:
    """Make a fresh cluster in a temporary directory and start a server on it.

    Raises:
        FileNotFoundError: the binaries are missing.
        RuntimeError: the server did not start (with its log).
    """
    import psycopg

    binaries = find_binaries()
    directory = Path(tempfile.mkdtemp(prefix="mailrelay-postgres-"))
    as_root = os.geteuid() == 0
    user: str | None = None
    if as_root:
        user = USER
        entry = pwd.getpwnam(USER)
        os.chown(directory, entry.pw_uid, entry.pw_gid)
    directory.chmod(0o700)
    data, sockets, log = directory / "data", directory / "sock", directory / "postgres.log"
    try:
        init = subprocess.run(
            [
                str(binaries / "initdb"),
                "-D",
                str(data),
                "-U",
                USER,
                "--auth=trust",  # loopback and the private socket only
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",  # initdb's own flush of a throw-away cluster
            ],
            user=user,
            group=user,
            extra_groups=[] if as_root else None,
            cwd=directory,
            capture_output=True,
            timeout=START_TIMEOUT,
            check=False,
        )
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed: {init.stderr.decode(errors='replace')}")
        (sockets).mkdir()
        if as_root:
            shutil.chown(sockets, USER, USER)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    port = free_port()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                str(binaries / "postgres"),
                "-D",
                str(data),
                "-p",
                str(port),
                "-k",
                str(sockets),
                "-c",
                f"listen_addresses={HOST}",
                "-c",
                "max_connections=100",
            ],
            user=user,
            group=user,
            extra_groups=[] if as_root else None,
            cwd=directory,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    instance = PostgresInstance(process, port, directory)
    admin = f"host={HOST} port={port} user={USER} dbname=postgres connect_timeout=5"
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if process.poll() is not None:
            text = instance.log_text()
            instance.stop()
            raise RuntimeError(f"postgres exited at start ({process.returncode}):\n{text}")
        try:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f"CREATE DATABASE {DATABASE}")
            return instance
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                text = instance.log_text()
                instance.stop()
                raise RuntimeError(f"postgres did not accept connections:\n{text}") from None
            time.sleep(0.1)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresInstance]:
    """A PostgreSQL server for the whole session (fails, never skips, when it cannot start)."""
    try:
        instance = start_postgres()
    except (FileNotFoundError, RuntimeError) as exc:
        hint = " (the CI image must install it)" if os.environ.get("CI") == "true" else ""
        pytest.fail(f"cannot start the PostgreSQL test server{hint}: {exc}", pytrace=False)
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture
def postgres_store(postgres: PostgresInstance) -> Iterator[PostgresStore]:
    """A :class:`PostgresStore` on a fresh schema of the session's server, dropped after."""
    schema = postgres.new_schema()
    store = PostgresStore(postgres.dsn, schema=schema)
    try:
        yield store
    finally:
        store.close()
        postgres.drop_schema(schema)
