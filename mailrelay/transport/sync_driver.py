"""The blocking driver: runs the dialogue's steps (:mod:`mailrelay.flow`) over a socket.

Theory of operation: :func:`connect` opens a TCP connection (trying every address of the
host, IPv6 and IPv4, in the order the resolver gives them) or a unix socket, wraps it in TLS
at once for ``TLS.IMPLICIT``, and returns a :class:`SyncDriver`.
With a ``proxy`` the TCP connection goes to the proxy instead, and the proxy's handshake
(:class:`~mailrelay.transport.proxy.ProxyHandshake`, shared with the asyncio driver) runs on
it before anything else, reading no byte past the proxy's reply, all within
``Timeouts.connect``; TLS then runs through the tunnel against the server's name.
:meth:`SyncDriver.run` drives one step of a :class:`~mailrelay.flow.Session`: it answers
each request the step yields (``Write`` → queued, then sent with one ``sendall`` before
the next ``Read`` or ``StartTLS``, or once 64 KiB are queued, or at once when it asks to be
(``Write.flush``); ``Read`` → one ``recv_into``; ``StartTLS`` → wrap the socket and
handshake; ``Close`` → close) until the step returns its result. Coalescing the writes
saves a system call per message (the data and its terminator go together) and changes
nothing on the wire that matters: the dialogue waits for replies only through ``Read``.

Rules:

* Every wait is bounded by the request's phase limit
  (:meth:`Timeouts.for_phase <mailrelay.options.Timeouts.for_phase>`), a reply read in several
  pieces by the one deadline its first read set (``Read.resume``); connecting and TLS
  handshakes use ``connect``. Once connected, a plain-text socket is in blocking mode and the
  limit is the kernel's (``SO_RCVTIMEO`` / ``SO_SNDTIMEO``, set when the phase's limit differs
  from the last one): CPython polls before every call on a socket that has a Python-level
  timeout, one more system call per read and per write. A TLS socket keeps CPython's timeout
  (see :meth:`SyncDriver._blocking`). A write bigger than the kernel takes at once is bounded
  as a whole: each further ``send`` gets only the time left.
* Reads are bounded: one ``recv_into`` of at most :data:`READ_SIZE` bytes per ``Read``. The
  protocol core cuts an over-long reply line (``max_line_length``), so a hostile server's
  endless line costs at most a line limit plus one read of memory.
* An exception met while doing I/O is translated (:mod:`mailrelay.transport.errors_map`),
  the socket is closed, and the translated error is thrown into the step at the request that
  failed (the step may still yield ``Close``, which is answered), so it reaches the caller
  as a :class:`~mailrelay.errors.DeliveryError`.
* A failed write (a reset, a broken pipe, its time limit) first keeps what the server had
  already sent, read without waiting, at most :data:`LEFTOVER_LIMIT` bytes: a server may
  refuse a message part-way through its data and hang up, and its reply is then in the
  kernel, unread. The Reads that follow get those bytes, then the write's error again; a
  Read whose held-back writes failed gets them at once instead of the error. What the
  bytes mean is the dialogue's business (``_Delivery._cut_short`` in :mod:`mailrelay.flow`).
* A server that sends nothing before the greeting times out, when the policy is not
  ``TLS.IMPLICIT``, is probed with a TLS handshake: if it answers one, it expects implicit
  TLS, and the error says "use TLS.IMPLICIT" instead of merely "timed out".
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import struct
import sys
import time
from collections.abc import Generator
from typing import TypeVar

import attrs

from mailrelay.errors import ConnectError, DeliveryError, ProxyError
from mailrelay.flow import Close, Peek, Read, Request, StartTLS, Write
from mailrelay.options import Timeouts
from mailrelay.transport.driver_common import (
    PROBE_TIMEOUT,
    WriteQueue,
    all_addresses_failed,
    attempt_failure,
    before_greeting,
    closed_error,
    for_source,
    implicit_tls_error,
    peer_chain,
    probe_context,
    resolve_error,
)
from mailrelay.transport.errors_map import map_io_error, map_tls_error, peer_name
from mailrelay.transport.proxy import (
    Proxy,
    ProxyHandshake,
    all_targets_failed,
    handshake_failed,
    proxy_unreachable,
    tunnel_targets,
)

__all__ = ["READ_SIZE", "SyncDriver", "connect"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The most bytes one ``Read`` takes from the socket.
READ_SIZE = 65536
#: The most bytes kept, after a failed write, of what the server had sent (see
#: :meth:`SyncDriver._keep_leftovers`): a few replies' worth (a reply is at most 64 KiB).
LEFTOVER_LIMIT = 4 * READ_SIZE

# Kernel time limits take a ``struct timeval`` on Linux and the BSDs (Windows wants
# milliseconds and is left to CPython's own timeouts).
_KERNEL_TIMEOUTS = sys.platform != "win32" and hasattr(socket, "SO_RCVTIMEO")
# What a blocking call that ran out of its kernel time limit raises.
_EXPIRED = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    micro = int((seconds - whole) * 1_000_000)
    if whole == 0 and micro == 0:
        micro = 1  # a zero timeval means "no limit at all"
    return struct.pack("ll", whole, micro)


def _remaining(deadline: float) -> float:
    """The time left until ``deadline``; a timeout at once when there is none."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("timed out")
    return left


def _expired(exc: OSError) -> OSError:
    """The error to report for ``exc``: a kernel time limit running out is a timeout."""
    if isinstance(exc, _EXPIRED):
        return TimeoutError("timed out")
    return exc


def _connect_tcp(
    host: str, port: int, timeout: float, source: str | None, deadline: float | None = None
) -> socket.socket:
    """A socket connected to ``host:port``: each address in turn, each within ``timeout``
    and, when there is a ``deadline`` (a proxy's: its handshake shares the time), by then;
    an address left with no time is not tried."""
    peer = peer_name(host, port)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise resolve_error(exc, host, peer) from exc
    failures: list[str] = []
    last: OSError | None = None
    for family, kind, proto, _, address in for_source(infos, source, host, peer):
        limit = timeout if deadline is None else min(timeout, deadline - time.monotonic())
        if limit <= 0:
            failures.append(
                f"{peer_name(str(address[0]), int(address[1]))}: not tried, no time left"
            )
            break
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(limit)
            if source is not None:
                sock.bind((source, 0))  # "Cannot assign requested address" if not ours
            sock.connect(address)
        except OSError as exc:
            sock.close()
            last = exc
            failures.append(attempt_failure(address, exc))
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise all_addresses_failed(peer, failures) from last


def _connect_proxied(
    proxy: Proxy, host: str, port: int, timeout: float, source: str | None
) -> socket.socket:
    """A socket tunnelled through ``proxy`` to ``host:port`` (see
    :mod:`mailrelay.transport.proxy`): each address of ``host`` in turn when we resolve
    (``socks5``), else the name once. Each attempt, connecting to the proxy included, is
    bounded by ``timeout``; ``source`` binds the connection to the proxy."""
    peer = peer_name(host, port)
    infos = None
    if proxy.resolves_locally:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise resolve_error(exc, host, peer) from exc
    failures: list[ProxyError] = []
    for target in tunnel_targets(proxy, host, infos):
        handshake = ProxyHandshake(proxy, target, port)
        deadline = time.monotonic() + timeout
        try:
            sock = _connect_tcp(proxy.host, proxy.port, timeout, source, deadline)
        except ConnectError as exc:
            raise proxy_unreachable(handshake, exc) from exc
        try:
            _run_handshake(sock, handshake, deadline)
        except ProxyError as exc:
            sock.close()
            if not handshake.target_failed:
                raise
            failures.append(exc)
            continue
        except (OSError, ValueError) as exc:
            sock.close()
            error = _expired(exc) if isinstance(exc, OSError) else exc
            raise handshake_failed(handshake, error, timeout) from exc
        except BaseException:
            sock.close()
            raise
        return sock
    raise all_targets_failed(proxy, peer, failures)


def _run_handshake(sock: socket.socket, handshake: ProxyHandshake, deadline: float) -> None:
    """Run ``handshake`` on ``sock`` by ``deadline``, reading no byte past the proxy's reply."""
    while True:
        data = handshake.data_to_send()
        if data:
            sock.settimeout(_remaining(deadline))
            sock.sendall(data)
        # It may hold the proxy's password (RFC 1929's request, or the Basic token): not a
        # local for a traceback's frame, which error reporters show, when the proxy refuses.
        del data
        if handshake.done:
            break
        sock.settimeout(_remaining(deadline))
        handshake.receive_data(sock.recv(handshake.read_limit))
    # Reads kept to read_limit: whatever the target sent first is still in the socket.
    assert not handshake.leftover


def _connect_unix(path: str, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise ConnectError(
            f"could not connect to {path}: {exc.strerror or exc}", host=path
        ) from exc
    return sock


def connect(
    host: str | None,
    port: int | None,
    *,
    timeouts: Timeouts,
    implicit_tls: bool = False,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    unix_path: str | None = None,
    source_address: str | None = None,
    proxy: Proxy | None = None,
) -> SyncDriver:
    """Open a connection and return its driver.

    Args:
        host, port: the TCP server (ignored when ``unix_path`` is given).
        timeouts: the per-phase limits; ``connect`` bounds each address's attempt and the
            TLS handshake.
        implicit_tls: wrap the socket in TLS before anything else (RFC 8314 §3.3).
        ssl_context: the context for implicit TLS and STARTTLS.
        server_hostname: the name to check the certificate against (default ``host``).
        unix_path: a unix socket path instead of ``host``/``port``.
        source_address: the local IP address to connect from (see
            :func:`~mailrelay.transport.driver_common.check_source_address`); only the
            server's addresses of its family are tried. With a ``proxy``: the address
            the connection to the proxy goes from.
        proxy: reach ``host:port`` through this proxy (SOCKS5 or HTTP CONNECT, see
            :mod:`mailrelay.transport.proxy`); TLS runs end to end, the certificate checked
            against ``server_hostname`` or ``host``, never the proxy's name.

    Raises:
        ConnectError: no address accepted the connection (or could be reached from
            ``source_address``).
        ProxyError: the proxy was unreachable, refused, or could not reach the server.
        TLSError: the implicit-TLS handshake failed.
    """
    if unix_path is not None:
        sock = _connect_unix(unix_path, timeouts.connect)
        peer = unix_path
    else:
        assert host is not None
        assert port is not None
        if proxy is not None:
            sock = _connect_proxied(proxy, host, port, timeouts.connect, source_address)
        else:
            sock = _connect_tcp(host, port, timeouts.connect, source_address)
        peer = peer_name(host, port)
    name = server_hostname or host or "localhost"
    context = ssl_context if ssl_context is not None else ssl.create_default_context()
    driver = SyncDriver(sock, timeouts=timeouts, ssl_context=context, peer=peer)
    driver.implicit_tls = implicit_tls
    if implicit_tls:
        driver.start_tls(name)
    return driver


class SyncDriver:
    """One blocking connection, running :mod:`mailrelay.flow` steps.

    Attributes:
        peer: ``host:port`` (or the socket path), for messages.
        bytes_received: how many bytes the server has sent (0 means not even a greeting).
        implicit_tls: whether the connection was wrapped in TLS from the start.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        timeouts: Timeouts,
        ssl_context: ssl.SSLContext,
        peer: str,
    ) -> None:
        self._sock: socket.socket | None = sock
        self.timeouts = timeouts
        self.ssl_context = ssl_context
        self.peer = peer
        self.bytes_received = 0
        self.implicit_tls = False
        self._writes = WriteQueue(READ_SIZE)
        self._pending = self._writes.chunks  # the same list: a cheap "anything queued?"
        # The limit the socket has now (None: not set since the last change of mode), and
        # whether it is the kernel's (see _blocking()).
        self._timeout: float | None = None
        self._kernel_limits = False
        # When the reply being read must have come (see Read.resume).
        self._deadline = 0.0
        # After a failed write: its error, and what the server had sent that no Read has
        # taken yet (see _keep_leftovers).
        self._write_error: DeliveryError | None = None
        self._leftovers = b""
        self._buffer = bytearray(READ_SIZE)
        self._view = memoryview(self._buffer)
        # Timeouts.for_phase checks the name each time; the phases are a fixed set.
        # AUTH replies wait under the greeting limit, but errors name their own phase.
        self._limits: dict[str, float] = {**attrs.asdict(timeouts), "auth": timeouts.greeting}
        self._blocking(sock)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<SyncDriver {self.peer} {state}>"

    @property
    def closed(self) -> bool:
        """Whether the socket has been closed."""
        return self._sock is None

    @property
    def local_address(self) -> str | None:
        """Our end's IP address (for EHLO), or ``None`` for a unix socket or a closed one."""
        if self._sock is None or self._sock.family not in (socket.AF_INET, socket.AF_INET6):
            return None
        return str(self._sock.getsockname()[0])

    def close(self) -> None:
        """Close the socket (idempotent)."""
        self._writes.clear()
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise closed_error(self.peer)
        return self._sock

    def has_input(self) -> bool:
        """Whether the server has sent something not read yet, or closed its side (or the
        connection is gone), found without waiting.

        For a connection between exchanges, where nothing is owed: anything there is
        unsolicited (a late extra reply, a ``421`` announced while idle, an end of file),
        so the connection cannot be trusted to pair the next replies with their commands.
        Plain text is peeked at; over TLS a record may be only the protocol's own (a
        session ticket), so application data is read, and counts only if there is some.
        """
        sock = self._sock
        if sock is None:
            return True
        try:
            if self._kernel_limits:
                # A blocking socket: this one call does not wait, and leaves the bytes.
                sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            elif not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                self._timeout = 0.0  # the next read or write sets its own limit again
                sock.settimeout(0.0)
                sock.recv_into(self._buffer, 1)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False  # nothing there (or a TLS record with no data for us)
        except (OSError, ValueError):
            return True  # reset, or a TLS end: gone
        return True  # data, or b"" at end of file

    # -- the loop ----------------------------------------------------------------------------

    def run(self, step: Generator[Request, bytes | None, T]) -> T:
        """Drive ``step`` to completion and return its result.

        Raises:
            DeliveryError: whatever the step raises, including the translated I/O errors
                thrown into it.
        """
        answer: bytes | None = None
        error: DeliveryError | None = None
        while True:
            try:
                request = step.throw(error) if error is not None else step.send(answer)
            except StopIteration as done:
                value: T = done.value
                if self._pending:
                    try:
                        self._flush()
                    except BaseException:
                        self.close()
                        raise
                return value
            except BaseException:
                self.close()
                raise
            answer, error = None, None
            kind = type(request)
            try:
                if kind is Write:
                    assert isinstance(request, Write)
                    if self._sock is None:
                        raise closed_error(self.peer)
                    if request.flush and not self._pending:
                        # Nothing is held back: it goes out as it is, without the queue
                        # (deliver_many's one write per message).
                        self._send(request.data, request.phase)
                    # Queue it; it goes out with the next flush (see the module docstring).
                    elif self._writes.add(request):
                        self._flush()
                elif kind is Read:
                    assert isinstance(request, Read)
                    if self._pending:
                        self._flush()
                    answer = self._read(request)
                elif isinstance(request, StartTLS):
                    if self._pending:
                        self._flush()
                    self.start_tls(request.server_hostname)
                elif isinstance(request, Close):
                    self.close()
                elif isinstance(request, Peek):
                    if self._pending:
                        self._flush()
                    answer = self._peek(request)
                else:  # pragma: no cover - the flow yields only the five requests
                    raise TypeError(f"unknown I/O request {request!r}")
            except DeliveryError as exc:
                self.close()
                if kind is Read and exc is self._write_error and self._leftovers:
                    # The writes sent before this Read failed, and the server had said
                    # something first: that is the answer (the error comes after it).
                    answer = self._take_leftovers()
                else:
                    error = exc

    def _flush(self) -> None:
        """Send every pending write, limited by the last write's phase timeout."""
        self._socket()
        self._send(self._writes.take(), self._writes.phase)

    def _send(self, data: bytes, phase: str) -> None:
        """Send all of ``data``, limited by ``phase``'s timeout (the socket is open)."""
        sock = self._sock
        assert sock is not None
        timeout = self._limits[phase]
        try:
            if timeout != self._timeout:
                self._set_timeout(sock, timeout)
            sent = sock.send(data)
            if sent < len(data):
                self._send_rest(sock, memoryview(data)[sent:], timeout)
        except (OSError, ValueError) as exc:
            error = _expired(exc) if isinstance(exc, OSError) else exc
            self._keep_leftovers(sock)
            mapped = map_io_error(error, peer=self.peer, phase=phase, timeout=timeout)
            self._write_error = mapped
            raise mapped from exc

    def _keep_leftovers(self, sock: socket.socket) -> None:
        """After a failed write: keep what the server has already sent, without waiting.

        A server may answer before the end of the data and hang up (RFC 5321 §3.8:
        ``552``/``554`` part-way through a message); the write that meets the closed
        connection fails before the reply is read. The kernel still holds the reply (it
        came before the reset), so it is read now, up to :data:`LEFTOVER_LIMIT` bytes,
        without waiting (the write already had the phase's limit). The socket is closed by
        the caller, as after any error; the Reads that follow get these bytes, then the
        write's error again (a Read whose held-back writes failed gets them at once, in
        place of the error): the dialogue decides what they mean.
        """
        kept = bytearray()
        try:
            sock.settimeout(0.0)
            self._timeout = None
            for _ in range(LEFTOVER_LIMIT // READ_SIZE):
                count = sock.recv_into(self._buffer)
                if not count:
                    break
                kept += self._view[:count]
        except (OSError, ValueError):
            pass  # nothing more (would block), a reset, or a TLS end: what came is kept
        self.bytes_received += len(kept)
        self._leftovers = bytes(kept)

    def _take_leftovers(self) -> bytes:
        """The next Read's share of what :meth:`_keep_leftovers` kept."""
        data = self._leftovers[:READ_SIZE]
        self._leftovers = self._leftovers[READ_SIZE:]
        return data

    def _send_rest(self, sock: socket.socket, rest: memoryview, timeout: float) -> None:
        """Send what the first ``send`` left, all of it within ``timeout`` of now (roughly:
        the first ``send`` had its own limit)."""
        deadline = time.monotonic() + timeout
        while rest:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("timed out")
            self._set_timeout(sock, left)
            rest = rest[sock.send(rest) :]

    def _read(self, request: Read) -> bytes:
        sock = self._sock
        if sock is None:
            if self._write_error is not None:
                # After a failed write: what the server had sent, then the write's error.
                if self._leftovers:
                    return self._take_leftovers()
                raise self._write_error
            raise closed_error(self.peer)
        timeout = self._limits[request.phase]
        try:
            if request.resume:
                # The same reply's wait goes on, under the deadline it began with.
                self._set_timeout(sock, _remaining(self._deadline))
            else:
                self._deadline = time.monotonic() + timeout
                if timeout != self._timeout:  # _set_timeout's own test, without the call
                    self._set_timeout(sock, timeout)
            # Into a buffer kept for the connection's life: recv() would allocate READ_SIZE
            # bytes for every read and shrink them again.
            data = self._view[: sock.recv_into(self._buffer)].tobytes()
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            # A TLS peer that closes without close_notify: SMTP servers do; it is an EOF.
            return b""
        except (TimeoutError, *_EXPIRED) as exc:
            if self._before_greeting(request) and self._probe_tls():
                raise implicit_tls_error(self.peer) from exc
            error = _expired(exc)
            raise map_io_error(error, peer=self.peer, phase=request.phase, timeout=timeout) from exc
        except (OSError, ValueError) as exc:
            raise map_io_error(exc, peer=self.peer, phase=request.phase, timeout=timeout) from exc
        self.bytes_received += len(data)
        return data

    def _peek(self, request: Peek) -> bytes | None:
        """What the server has sent and no Read has taken, read without waiting (at most
        :data:`READ_SIZE` bytes; ``b""`` at end of file), or ``None`` when nothing has come."""
        sock = self._socket()
        try:
            if self._kernel_limits:
                # A blocking socket: this one call does not wait.
                count = sock.recv_into(self._buffer, READ_SIZE, socket.MSG_DONTWAIT)
            else:
                self._timeout = 0.0  # the next read or write sets its own limit again
                sock.settimeout(0.0)
                count = sock.recv_into(self._buffer)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return None
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return b""  # a TLS end, with or without close_notify: an end of file
        except (OSError, ValueError) as exc:
            raise map_io_error(exc, peer=self.peer, phase=request.phase) from exc
        self.bytes_received += count
        return self._view[:count].tobytes()

    def _set_timeout(self, sock: socket.socket, timeout: float) -> None:
        # Setting a limit costs system calls every time; phases often share a limit.
        if timeout != self._timeout:
            if self._kernel_limits:
                value = _timeval(timeout)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
            else:
                sock.settimeout(timeout)
            self._timeout = timeout

    def _blocking(self, sock: socket.socket) -> None:
        """Put ``sock`` in the mode the reads and writes expect (see the module docs).

        Not for TLS: on a blocking socket CPython's TLS layer retries a read that ran out of
        its kernel limit, forever. It needs no such help anyway: with a Python-level timeout
        it reads first and polls only when nothing has come.
        """
        self._kernel_limits = _KERNEL_TIMEOUTS and not isinstance(sock, ssl.SSLSocket)
        if self._kernel_limits:
            sock.settimeout(None)
        self._timeout = None

    def _before_greeting(self, request: Read) -> bool:
        return before_greeting(self.bytes_received, request.phase, self.implicit_tls)

    def _probe_tls(self) -> bool:
        """After a silent greeting: does the server answer a TLS handshake? (It is dead to
        us either way; this only chooses the error message.)"""
        sock = self._sock
        if sock is None or isinstance(sock, ssl.SSLSocket):
            return False
        probe = probe_context()
        try:
            self._timeout = None
            sock.settimeout(min(PROBE_TIMEOUT, self.timeouts.connect))
            wrapped = probe.wrap_socket(sock, do_handshake_on_connect=False)
            self._sock = wrapped
            wrapped.do_handshake()
        except (OSError, ValueError):
            return False
        return True

    def start_tls(self, server_hostname: str) -> None:
        """Wrap the socket in TLS and run the handshake (bounded by ``Timeouts.connect``).

        Raises:
            TLSError: the handshake or the certificate check failed.
        """
        sock = self._socket()
        try:
            self._timeout = None
            sock.settimeout(self.timeouts.connect)
            wrapped = self.ssl_context.wrap_socket(
                sock, server_hostname=server_hostname, do_handshake_on_connect=False
            )
            self._sock = wrapped
            wrapped.do_handshake()
        except (OSError, ValueError) as exc:
            self.close()
            raise map_tls_error(
                exc,
                peer=self.peer,
                server_hostname=server_hostname,
                # connect() wraps an implicit-TLS socket here too; else this is STARTTLS.
                starttls=not self.implicit_tls,
            ) from exc
        self._blocking(wrapped)
        log.debug("TLS established with %s: %s", self.peer, self._tls_description())

    def peer_chain(self) -> tuple[bytes, ...]:
        """The certificates the server presented (DER, leaf first; see
        :func:`~mailrelay.transport.driver_common.peer_chain`); ``()`` without TLS."""
        sock = self._sock
        return peer_chain(sock if isinstance(sock, ssl.SSLSocket) else None)

    def _tls_description(self) -> str:
        sock = self._sock
        if isinstance(sock, ssl.SSLSocket):
            cipher = sock.cipher()
            return f"{sock.version()} {cipher[0] if cipher else ''}".strip()
        return "no TLS"
