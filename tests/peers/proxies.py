"""Real outbound proxies on loopback for the proxy tests: microsocks (SOCKS5) and tinyproxy
(HTTP CONNECT), plus a small in-process proxy for the faults real ones will not commit.

Theory of operation:

- :func:`start_microsocks` runs ``microsocks -i 127.0.0.1 -p PORT`` (``-u``/``-P`` for a
  login, RFC 1929; ``-b`` to bind its outgoing connections to another loopback address, so
  the target server sees where a connection really came from).
- :func:`start_tinyproxy` writes a tinyproxy 1.11 configuration into a temporary directory
  (``Listen``/``Allow`` 127.0.0.1, one ``ConnectPort`` per allowed target port, optional
  ``BasicAuth`` and ``Bind``, PidFile and LogFile in the directory) and runs it in the
  foreground (``-d -c conf``); its log names every CONNECT.
- Both are stopped by their own PID (terminate, then kill after a bounded wait); the
  ``make_proxy`` fixture stops every proxy it started.
- :class:`FakeProxy` is a listening socket on 127.0.0.1 whose every connection is handed
  to a function in its own thread (a scripted reply, silence, an endless header, or a
  working SOCKS5 that resolves names from a table and relays bytes): bounded in count and
  time, closed by the fixture.

Facts met (tinyproxy 1.11.1): a refused login to CONNECT is answered ``401`` (not ``407``),
a port without ``ConnectPort`` ``403 Access violation``; the ``200 Connection established``
and the target's greeting may arrive in one segment. microsocks answers a refused
connection with SOCKS5 reply ``0x05`` and a name it cannot resolve with ``0x01``.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.peers.scripted import free_port

_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 5.0


class ProxyProcess:
    """A running proxy program.

    Attributes:
        scheme: ``"socks5"`` (microsocks) or ``"http"`` (tinyproxy).
        host: ``"127.0.0.1"``.
        port: its port.
        username, password: its login, or ``None``.
        log_file: tinyproxy's log, or ``None``.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        *,
        scheme: str,
        port: int,
        username: str | None,
        password: str | None,
        log_file: Path | None = None,
        directory: tempfile.TemporaryDirectory[str] | None = None,
    ) -> None:
        self.process = process
        self.scheme = scheme
        self.port = port
        self.username = username
        self.password = password
        self.log_file = log_file
        self._directory = directory

    def url(
        self, scheme: str | None = None, *, username: str | None = None, password: str | None = None
    ) -> str:
        """The proxy's URL (``scheme`` to say ``socks5h``; a login other than its own)."""
        from urllib.parse import quote

        user = username if username is not None else self.username
        secret = password if password is not None else self.password
        login = f"{quote(user, safe='')}:{quote(secret or '', safe='')}@" if user else ""
        return f"{scheme or self.scheme}://{login}{self.host}:{self.port}"

    def log_text(self) -> str:
        """tinyproxy's log so far (``""`` for microsocks, whose stdout log is discarded)."""
        if self.log_file is None or not self.log_file.exists():
            return ""
        return self.log_file.read_text(errors="replace")

    def stop(self) -> None:
        """Stop the program by its PID (idempotent)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(_STOP_TIMEOUT)
        if self._directory is not None:
            self._directory.cleanup()
            self._directory = None


def _wait_listening(process: subprocess.Popen[bytes], port: int) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the proxy exited at once with status {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    process.kill()
    process.wait(_STOP_TIMEOUT)
    raise RuntimeError(f"the proxy did not listen on port {port} within {_START_TIMEOUT} s")


def start_microsocks(
    *, username: str | None = None, password: str | None = None, bind: str | None = None
) -> ProxyProcess:
    """Start microsocks on 127.0.0.1 and a free port."""
    port = free_port()
    command = ["microsocks", "-i", "127.0.0.1", "-p", str(port)]
    if username is not None:
        command += ["-u", username, "-P", password or ""]
    if bind is not None:
        command += ["-b", bind]
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _wait_listening(process, port)
    return ProxyProcess(process, scheme="socks5", port=port, username=username, password=password)


def start_tinyproxy(
    *,
    connect_ports: Sequence[int],
    username: str | None = None,
    password: str | None = None,
    bind: str | None = None,
) -> ProxyProcess:
    """Start tinyproxy on 127.0.0.1 and a free port, allowing CONNECT to ``connect_ports``."""
    directory = tempfile.TemporaryDirectory(prefix="mrtinyproxy-")
    root = Path(directory.name)
    port = free_port()
    lines = [
        f"Port {port}",
        "Listen 127.0.0.1",
        "Allow 127.0.0.1",
        "Timeout 60",
        "MaxClients 50",
        f'PidFile "{root / "tinyproxy.pid"}"',
        f'LogFile "{root / "tinyproxy.log"}"',
        "LogLevel Info",
    ]
    lines += [f"ConnectPort {each}" for each in connect_ports]
    if username is not None:
        lines.append(f"BasicAuth {username} {password}")
    if bind is not None:
        lines.append(f"Bind {bind}")
    config = root / "tinyproxy.conf"
    config.write_text("\n".join(lines) + "\n")
    process = subprocess.Popen(
        ["tinyproxy", "-d", "-c", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_listening(process, port)
    except BaseException:
        directory.cleanup()
        raise
    return ProxyProcess(
        process,
        scheme="http",
        port=port,
        username=username,
        password=password,
        log_file=root / "tinyproxy.log",
        directory=directory,
    )


Handler = Callable[["FakeProxy", socket.socket], None]
"""What a :class:`FakeProxy` does with each connection."""
FakeFactory = Callable[[Handler], "FakeProxy"]
"""The type of the ``make_fake_proxy`` fixture."""

ProxyFactory = Callable[..., ProxyProcess]
"""The type of the ``make_proxy`` fixture: ``make_proxy("socks5", username=..., ...)`` or
``make_proxy("http", connect_ports=[...], ...)``."""


@pytest.fixture
def make_proxy() -> Iterator[ProxyFactory]:
    """Start microsocks (``"socks5"``) or tinyproxy (``"http"``); stops each one it started."""
    started: list[ProxyProcess] = []

    def make(kind: str, **options: Any) -> ProxyProcess:
        proxy = start_microsocks(**options) if kind == "socks5" else start_tinyproxy(**options)
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.stop()


# -- in-process fakes ---------------------------------------------------------------------------

#: How long a fake's connection thread may live, and how many connections a fake takes.
FAKE_LIFETIME = 30.0
FAKE_CONNECTIONS = 50


class FakeProxy:
    """A loopback listener handing each connection to ``handler(conn)`` in a thread.

    Attributes:
        port: the listening port on 127.0.0.1.
        received: every byte each connection sent before the handler returned (what the
            handler read, recorded through :meth:`recv_exactly`).
        errors: exceptions the handlers raised (a bug in the test).
    """

    host = "127.0.0.1"

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self.received: list[bytes] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def url(self, scheme: str = "socks5", login: str = "") -> str:
        """This fake's proxy URL."""
        return f"{scheme}://{login}{self.host}:{self.port}"

    def _accept(self) -> None:
        deadline = time.monotonic() + FAKE_LIFETIME
        count = 0
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            count += 1
            if count > FAKE_CONNECTIONS:
                conn.close()
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(FAKE_LIFETIME)
        self.received.append(b"")
        try:
            self._handler(self, conn)
        except (OSError, EOFError):
            pass  # the client went away, as it may
        except BaseException as exc:  # pragma: no cover - a bug in the test
            self.errors.append(exc)
        finally:
            conn.close()

    def recv_exactly(self, conn: socket.socket, count: int) -> bytes:
        """Read ``count`` bytes (recorded in :attr:`received`)."""
        data = b""
        while len(data) < count:
            piece = conn.recv(count - len(data))
            if not piece:
                raise EOFError
            data += piece
        self.received[-1] += data
        return data

    def hold(self, conn: socket.socket) -> None:
        """Read and discard until the client closes or the stop (bounded by the lifetime)."""
        conn.settimeout(0.2)
        deadline = time.monotonic() + FAKE_LIFETIME
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                if not conn.recv(4096):
                    return
            except TimeoutError:
                continue

    def stop(self) -> None:
        """Stop accepting, close the listener and wait for the handlers (bounded)."""
        self._stop.set()
        self._listener.close()
        self._accepter.join(_STOP_TIMEOUT)
        for thread in self._threads:
            thread.join(_STOP_TIMEOUT)


def relay(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways between ``a`` and ``b`` until either side ends (bounded by
    :data:`FAKE_LIFETIME`)."""

    def pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    a.settimeout(FAKE_LIFETIME)
    b.settimeout(FAKE_LIFETIME)
    other = threading.Thread(target=pump, args=(b, a), daemon=True)
    other.start()
    pump(a, b)
    other.join(FAKE_LIFETIME)


def socks5h_resolving(names: dict[str, str]) -> Handler:
    """A working SOCKS5 proxy (no login) that resolves domain targets from ``names`` only
    (others: reply ``0x04``) and relays the tunnel."""

    def handler(proxy: FakeProxy, conn: socket.socket) -> None:
        _, count = proxy.recv_exactly(conn, 2)
        proxy.recv_exactly(conn, count)
        conn.sendall(b"\x05\x00")
        _, _, _, kind = proxy.recv_exactly(conn, 4)
        if kind == 3:
            (length,) = proxy.recv_exactly(conn, 1)
            host = proxy.recv_exactly(conn, length).decode()
        else:
            raw = proxy.recv_exactly(conn, 4 if kind == 1 else 16)
            host = socket.inet_ntop(socket.AF_INET if kind == 1 else socket.AF_INET6, raw)
        port = int.from_bytes(proxy.recv_exactly(conn, 2), "big")
        address = names.get(host)
        if address is None:
            conn.sendall(b"\x05\x04\x00\x01\0\0\0\0\0\0")
            return
        upstream = socket.create_connection((address, port), 5)
        with upstream:
            conn.sendall(b"\x05\x00\x00\x01\x7f\x00\x00\x01\x04\x38")
            relay(conn, upstream)

    return handler


@pytest.fixture
def make_fake_proxy() -> Iterator[FakeFactory]:
    """Start :class:`FakeProxy` listeners; stops each one (and checks none of its handlers
    failed)."""
    fakes: list[FakeProxy] = []

    def make(handler: Handler) -> FakeProxy:
        fake = FakeProxy(handler)
        fakes.append(fake)
        return fake

    yield make
    for fake in fakes:
        fake.stop()
    for fake in fakes:
        assert not fake.errors, fake.errors
