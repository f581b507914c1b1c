"""The machinery the test suite's threaded, line-based fake SMTP servers share.

Theory of operation: a :class:`ThreadedServer` listens on ``127.0.0.1`` on a port the kernel
picks, accepts connections in one thread and serves each in a thread of its own; a subclass
says what record it keeps per connection (:meth:`ThreadedServer.new_record`) and which
:class:`LinePeer` serves one (:meth:`ThreadedServer.new_peer`). The peer reads command
lines, exact byte counts and DATA content from a buffer over one socket, answers in its
:meth:`LinePeer.run` and ends the connection by raising :class:`Ended`.
:mod:`tests.peers.scripted` and :mod:`tests.transport.hostile_server` are built on these.

Rules:

- Blocking sockets; every blocking call has a timeout (``timeout``, set on each accepted
  socket), every loop is bounded in count, octets or time (a connection's whole life by its
  ``deadline``), and :meth:`ThreadedServer.stop` wakes and joins every thread, failing loudly
  when one does not end. Each connection's socket is closed by its own thread.
- Reading is buffered, so a pipelined group (RFC 2920) is consumed one command at a time, as
  a real server would; a line longer than :attr:`LinePeer.max_line` ends the connection
  (RFC 5321 §4.5.3.1.4 and §4.5.3.1.6 set far smaller limits; this bound only keeps a broken
  client from filling memory), and so does DATA content over the caller's octet bound.
- :class:`Ended` is the normal way out of a connection (the client hung up, the server is
  stopping, a time limit, a terminal fault); its text says why. A socket error (the client
  went away) ends a connection too. Any other exception is a bug in the test: it is put in
  :attr:`ThreadedServer.errors`, which fixtures check. Subclasses record what they need
  through hooks: :meth:`LinePeer.on_received`, :meth:`LinePeer.on_event`,
  :meth:`LinePeer.on_end`.
"""

from __future__ import annotations

import abc
import contextlib
import socket
import struct
import threading
import time
from typing import Generic, Protocol, Self, TypeVar

__all__ = ["Ended", "LinePeer", "Record", "ThreadedServer"]


class Record(Protocol):
    """What a server keeps about one connection (at least)."""

    @property
    def index(self) -> int:
        """The connection's number, in accept order."""

    @property
    def done(self) -> threading.Event:
        """Set when the connection has ended."""


RecordT = TypeVar("RecordT", bound=Record)


class Ended(Exception):
    """The connection is over; the message says why (``"client hung up"``, ...)."""


class LinePeer:
    """The server side of one connection: buffered, bounded reading and plain writing.

    Args:
        sock: the accepted socket (its timeout already set); :attr:`sock` may be replaced,
            e.g. by its TLS-wrapped self.
        stopping: set when the server stops; every read and wait checks it.
        deadline: the :func:`time.monotonic` time after which no more reads are made.
    """

    max_line = 65536
    """The longest line (in octets, line end excluded) the peer buffers before giving up."""

    def __init__(self, sock: socket.socket, *, stopping: threading.Event, deadline: float) -> None:
        self.sock = sock
        self.stopping = stopping
        self.deadline = deadline
        self.buffer = bytearray()

    # -- hooks -------------------------------------------------------------------------------

    def run(self) -> None:
        """Serve the connection (subclasses must); returning or raising :class:`Ended` ends
        it normally."""
        raise NotImplementedError

    def on_end(self, reason: str, exc: Exception) -> None:
        """Called once when :meth:`run` raised: ``reason`` is the text of :class:`Ended`,
        ``"socket error: ..."`` for an :class:`OSError` (the client went away) or
        ``"server error: ..."`` for anything else (a bug, also put in the server's errors)."""

    def close(self) -> None:
        """Close the connection (after :meth:`run`, whatever happened)."""
        self.sock.close()

    def on_received(self, data: bytes) -> None:
        """Called with every chunk of bytes read from the client, in order."""

    def on_event(self, event: str) -> None:
        """Called with a notable event: ``"eof"``, ``"line too long"``,
        ``"session time limit reached"``."""

    # -- reading -----------------------------------------------------------------------------

    def recv(self) -> bytes:
        """The next chunk from the client.

        Raises:
            Ended: the server is stopping, the deadline has passed, or the client hung up.
            TimeoutError: nothing arrived within the socket's timeout.
        """
        if self.stopping.is_set():
            raise Ended("server stopping")
        if time.monotonic() > self.deadline:
            self.on_event("session time limit reached")
            raise Ended("session time limit")
        data = self.sock.recv(65536)
        if not data:
            self.on_event("eof")
            raise Ended("client hung up")
        self.on_received(data)
        return data

    def read_line(self) -> bytes:
        """The next line, without its LF and any CR before it."""
        while b"\n" not in self.buffer:
            if len(self.buffer) > self.max_line:
                self.on_event("line too long")
                raise Ended("command line too long")
            self.buffer += self.recv()
        line, _, rest = bytes(self.buffer).partition(b"\n")
        self.buffer = bytearray(rest)
        return line.rstrip(b"\r")

    def read_exact(self, count: int) -> bytes:
        """Exactly ``count`` octets (a BDAT chunk, RFC 3030 §2)."""
        while len(self.buffer) < count:
            self.buffer += self.recv()
        data = bytes(self.buffer[:count])
        del self.buffer[:count]
        return data

    def read_content(self, max_octets: int) -> bytes:
        """DATA content up to the line holding a lone ``.`` (RFC 5321 §4.1.1.4): the lines
        before it joined with CRLF, dot-stuffing left in place.

        Raises:
            Ended: the content passed ``max_octets`` (counting CRLF line ends).
        """
        lines: list[bytes] = []
        size = 0
        # Each line adds at least 2 to ``size``, so the bound below is never what stops it.
        for _ in range(max_octets // 2 + 2):
            line = self.read_line()
            if line == b".":
                return b"\r\n".join(lines)
            size += len(line) + 2
            if size > max_octets:
                break
            lines.append(line)
        raise Ended("message content too long")

    def take_until_quiet(self, seconds: float, *, poll: float) -> None:
        """Send nothing and read (recording through the hooks) for ``seconds``; returns when
        the time is up, raises :class:`Ended` when the client hangs up first."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.sock.settimeout(max(0.01, min(poll, end - time.monotonic())))
            try:
                self.recv()
            except TimeoutError:
                continue

    # -- writing -----------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Write all of ``data`` (nothing for empty bytes)."""
        if data:
            self.sock.sendall(data)

    def wait(self, seconds: float) -> None:
        """Sleep ``seconds``, ending the connection at once if the server stops meanwhile."""
        if self.stopping.wait(seconds):
            raise Ended("server stopping")

    def arm_reset(self) -> None:
        """Make closing the socket abort the connection with a TCP RST (SO_LINGER 0)."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class ThreadedServer(abc.ABC, Generic[RecordT]):
    """A loopback listener with an accept thread and one thread per connection.

    Args:
        timeout: seconds any single socket wait may take.
        session_limit: seconds a whole connection may take (see :meth:`deadline`).
    """

    name = "threaded"
    """Names the threads (``<name>-accept``, ``<name>-<index>``) and the server in failure
    messages."""
    record_name = "connection"
    """Names a connection in :attr:`errors` (``"<record_name> <index>: ..."``)."""
    backlog = 16
    """The listener's backlog."""
    max_polls = 100_000
    """How many accepts or 50 ms polls the accept loop makes before it gives up."""

    def __init__(self, *, timeout: float, session_limit: float) -> None:
        self.timeout = timeout
        self.session_limit = session_limit
        self.host = "127.0.0.1"
        self.records: list[RecordT] = []
        """One record per accepted connection, in accept order."""
        self.errors: list[str] = []
        """Unexpected exceptions inside the server (bugs in a test)."""
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind((self.host, 0))
        self._listener.listen(self.backlog)
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"{self.name}-accept")

    @abc.abstractmethod
    def new_record(self, index: int) -> RecordT:
        """A new record for the ``index``-th accepted connection."""

    @abc.abstractmethod
    def new_peer(self, sock: socket.socket, record: RecordT) -> LinePeer:
        """The peer that serves the connection of ``record`` (called in its own thread)."""

    def deadline(self) -> float:
        """The :func:`time.monotonic` time by which a connection accepted now must end."""
        return time.monotonic() + self.session_limit

    def start(self) -> Self:
        """Start accepting connections; returns the server itself."""
        self._acceptor.start()
        return self

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop accepting, end every connection, and join every thread."""
        self.stopping.set()
        if self._acceptor.ident is not None:
            self._acceptor.join(timeout=5.0)
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                # Wake a thread blocked in recv/send; the socket is closed by its own thread.
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            threads = list(self._threads)
        stuck = []
        for thread in threads:
            thread.join(timeout=self.timeout + 5.0)
            if thread.is_alive():
                stuck.append(thread.name)
        if self._acceptor.is_alive():
            stuck.append(self._acceptor.name)
        if stuck:
            raise AssertionError(f"{self.name} server threads did not end: {stuck}")

    def _accept_loop(self) -> None:
        for _ in range(self.max_polls):
            if self.stopping.is_set():
                return
            try:
                conn, _addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if not self.stopping.is_set():
                    self.errors.append(f"accept failed: {exc!r}")
                return
            conn.settimeout(self.timeout)
            with self._lock:
                record = self.new_record(len(self.records))
                self.records.append(record)
                thread = threading.Thread(
                    target=self._serve, args=(conn, record), name=f"{self.name}-{record.index}"
                )
                self._sockets.append(conn)
                self._threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket, record: RecordT) -> None:
        peer = self.new_peer(sock, record)
        try:
            peer.run()
        except Ended as ended:
            peer.on_end(str(ended), ended)
        except OSError as exc:  # ssl.SSLError included
            peer.on_end(f"socket error: {exc!r}", exc)
        except Exception as exc:
            peer.on_end(f"server error: {exc!r}", exc)
            self.errors.append(f"{self.record_name} {record.index}: {exc!r}")
        finally:
            try:
                peer.close()
            finally:
                record.done.set()
