"""The asyncio driver: runs the dialogue's steps (:mod:`mailrelay.flow`) on an event loop.

Theory of operation: the same loop as :mod:`mailrelay.transport.sync_driver`, awaited.
:func:`connect` opens a TCP connection (every address of the host in turn, IPv6 and IPv4,
each connected with the whole address ``getaddrinfo`` gave, a scope id included) or a unix
socket, with TLS from the start for ``TLS.IMPLICIT`` (a handshake that fails or runs out of
time is a ``TLSError``, as in the blocking driver, not a failed connection); :meth:`AsyncDriver.run`
answers each request a step yields until the step returns.
With a ``proxy``, the socket connects to the proxy and runs its handshake
(:class:`~mailrelay.transport.proxy.ProxyHandshake`, as the blocking driver does, with
``sock_recv`` of at most ``read_limit`` bytes, all within ``Timeouts.connect``) before the
transport (and any implicit TLS, checked against the server's name) is made over it.

Rules:

* The connection is a small :class:`asyncio.Protocol` of our own rather than asyncio's
  streams, for two reasons. Reads are bounded: one ``Read`` returns at most
  :data:`READ_SIZE` bytes, and the transport stops reading from the socket while more than
  that is buffered (``pause_reading``), so an endless line costs bounded memory while the
  protocol core cuts it. And STARTTLS is safe: bytes the server sent after its ``220`` but
  before the handshake are visible in our buffer, and are refused (RFC 3207 §4.2, the
  response-injection attack) instead of being read later as if they had come encrypted.
* Writes are queued and sent together before the next ``Read`` or ``StartTLS`` (or once
  64 KiB are queued), as in the blocking driver.
* Every wait is bounded by the request's phase limit (a reply read in several pieces by the
  one deadline its first read set, ``Read.resume``, even when that read was answered at once
  from bytes already buffered; while reading, one timer per connection,
  set again only when a read needs an earlier deadline or outlives the one it was set for;
  ``asyncio.timeout`` elsewhere); connecting and TLS handshakes use ``Timeouts.connect``.
* I/O errors are translated (:mod:`mailrelay.transport.errors_map`), the connection is
  closed, and the error is thrown into the step at the failed request.
* A failed write keeps what the server had sent, as in the blocking driver (at most
  :data:`LEFTOVER_LIMIT` bytes, without waiting): the buffered bytes and, over plain text,
  what the kernel still holds (asyncio stops reading a transport at its first write
  error). Over TLS those records could no longer be decrypted, so message data
  (``data_block``) waits, when the socket has something to read, for the event loop to
  read it first (one ``poll`` per write of data over TLS).
* Cancellation is never swallowed: a cancelled ``run`` closes the connection and re-raises.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import select
import socket
import ssl
from collections.abc import Callable, Generator
from typing import Any, TypeVar, cast

import attrs

from mailrelay.errors import ConnectError, ConnectionLost, DeliveryError, ProxyError, TLSError
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

__all__ = ["READ_SIZE", "AsyncDriver", "connect"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The most bytes one ``Read`` returns; also the buffer size at which reading pauses.
READ_SIZE = 65536
#: The most bytes kept, after a failed write, of what the server had sent (see
#: :meth:`AsyncDriver._keep_leftovers`).
LEFTOVER_LIMIT = 4 * READ_SIZE


# What stopped a step in AsyncDriver._advance: a Read with nothing buffered; a Read that
# needs the ordinary (slow) read, at the end of the connection; a Read whose limit passed;
# writes waiting for the transport to drain; StartTLS or Close; the step's end; message
# data held back over TLS while the event loop reads what has arrived (_look_first).
_WAIT, _READ, _TIMEOUT, _DRAIN, _OTHER, _DONE, _LOOK = range(7)

# A timer that fires this close to the deadline counts as on time (the event loop runs
# timers up to its clock resolution early).
_EARLY = 0.001


def _readable(fd: int) -> bool:
    """Whether the kernel holds bytes (or an end of file, or an error) for socket ``fd``,
    asked without waiting."""
    try:
        if hasattr(select, "poll"):  # no limit on the descriptor's number, unlike select()
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            return bool(poller.poll(0))
        readable, _, _ = select.select([fd], [], [], 0)
    except (OSError, ValueError):
        return True  # a socket the kernel will not even poll is no use
    return bool(readable)


class _Pipe(asyncio.Protocol):
    """A byte pipe with a bounded receive buffer and write flow control."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._eof = False
        self._error: BaseException | None = None
        # The reader waiting in read_within(), woken by the callbacks: a bare future and a
        # timer handle cost less than an Event plus an asyncio.timeout scope per reply.
        self._waiter: asyncio.Future[Any] | None = None
        # One timer serves many reads (a timer handle per reply costs more than the rest
        # of the wait): it fires at the latest deadline it was set for; if the read then
        # waiting has a later one, it is set again for that (see _on_timer).
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._paused = False
        self.bytes_received = 0
        # While the driver runs a step from the callbacks (AsyncDriver._wait): its function
        # that answers the waiting Read as soon as bytes arrive, instead of waking a task;
        # called with the bytes when they can go straight to the step, else with None
        # (the bytes are in the buffer).
        self.feeder: Callable[[bytes | None], None] | None = None

    # -- asyncio.Protocol callbacks -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.bytes_received += len(data)
        feeder = self.feeder
        if feeder is not None and not self._buffer and len(data) <= READ_SIZE:
            # The hot path: a step waits and nothing is buffered, so these bytes are the
            # whole answer to its Read (no copy into the buffer and out again).
            feeder(data)
            return
        self.keep(data)
        if feeder is not None:
            feeder(None)
        else:
            self._wake()

    def keep(self, data: bytes) -> None:
        """Buffer ``data`` for later reads (reading pauses while a lot is buffered)."""
        self._buffer.extend(data)
        if len(self._buffer) >= READ_SIZE and self.transport is not None and not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.drain_socket()
        self._eof = True
        self._error = exc
        self._wake()
        self._writable.set()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def drain_socket(self) -> None:
        """The connection failed (a write met a reset, say): before the event loop closes
        the socket, buffer what the kernel still holds of the server's bytes (a reply sent
        just before the server hung up), up to :data:`LEFTOVER_LIMIT`, without waiting.
        Plain text only: over TLS the records are the TLS layer's to read."""
        transport = self.transport
        if transport is None or transport.get_extra_info("ssl_object") is not None:
            return
        raw = transport.get_extra_info("socket")
        if raw is None:
            return
        try:
            with socket.fromfd(raw.fileno(), raw.family, raw.type) as sock:
                sock.setblocking(False)
                for _ in range(LEFTOVER_LIMIT // READ_SIZE):
                    if len(self._buffer) >= LEFTOVER_LIMIT:
                        break
                    data = sock.recv(READ_SIZE)
                    if not data:
                        break
                    self.bytes_received += len(data)
                    self._buffer.extend(data)
        except (OSError, ValueError):
            pass  # nothing more (would block), or a reset: what came is kept

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- used by the driver --------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Bytes received and not read yet."""
        return len(self._buffer)

    @property
    def ended(self) -> bool:
        """Whether the server has closed its side (or the connection is lost)."""
        return self._eof

    def arm(self, waiter: asyncio.Future[Any], deadline: float) -> None:
        """Let ``waiter`` wait until ``deadline`` (loop time) at most: the timer then ends
        it with :class:`TimeoutError`; end of file and loss of the connection end it with
        ``None`` (see :meth:`_wake`)."""
        self._waiter = waiter
        self._deadline = deadline
        timer = self._timer
        if timer is None or timer.when() > deadline:
            # No timer, or one too late for this read (a shorter phase limit).
            if timer is not None:
                timer.cancel()
            self._timer = waiter.get_loop().call_at(deadline, self._on_timer)

    def disarm(self) -> None:
        """Forget the waiter (the timer stays, for the next read)."""
        self._waiter = None

    async def read_within(self, timeout: float) -> bytes:
        """Up to :data:`READ_SIZE` bytes, ``b""`` at end of file; :class:`TimeoutError` when
        nothing came within ``timeout`` seconds."""
        if self._buffer:
            return self.take()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._buffer:
            if self._eof:
                if self._error is not None and not isinstance(self._error, ssl.SSLError):
                    raise self._error
                return b""
            waiter: asyncio.Future[None] = loop.create_future()
            self.arm(waiter, deadline)
            try:
                await waiter
            finally:
                self._waiter = None
        return self.take()

    def _on_timer(self) -> None:
        """The read timer fired: time out the waiting read if its deadline has come, set the
        timer again for a later deadline, or (nobody waiting) let the next read set one."""
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        loop = waiter.get_loop()
        if self._deadline - loop.time() <= _EARLY:
            waiter.set_exception(TimeoutError())
        else:
            self._timer = loop.call_at(self._deadline, self._on_timer)

    def take(self) -> bytes:
        """Up to :data:`READ_SIZE` buffered bytes, without waiting (``b""`` if none)."""
        if len(self._buffer) <= READ_SIZE:
            data = bytes(self._buffer)
            self._buffer.clear()
        else:
            data = bytes(self._buffer[:READ_SIZE])
            del self._buffer[:READ_SIZE]
        if self._paused and len(self._buffer) < READ_SIZE and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    def write_now(self, data: bytes) -> bool:
        """Hand ``data`` to the transport; ``True`` when there is no need to wait for it to
        drain (the transport's buffer is below its high-water mark)."""
        if self.transport is None or self.transport.is_closing():
            raise self._error or ConnectionResetError("the connection is closed")
        self.transport.write(data)
        return self._writable.is_set()

    async def drain(self) -> None:
        """Wait until the transport's buffer is below its high-water mark again."""
        await self._writable.wait()
        if self._error is not None:
            raise self._error


async def _open_tcp(
    host: str,
    port: int,
    *,
    timeout: float,
    ssl_context: ssl.SSLContext | None,
    server_hostname: str | None,
    source: str | None,
) -> tuple[asyncio.Transport, _Pipe]:
    sock = await _connect_socket(host, port, timeout=timeout, source=source)
    return await _wrap(sock, ssl_context, server_hostname or host, timeout, peer_name(host, port))


async def _connect_socket(
    host: str, port: int, *, timeout: float, source: str | None
) -> socket.socket:
    """A non-blocking socket connected to ``host:port`` (each address in turn, each within
    ``timeout``)."""
    loop = asyncio.get_running_loop()
    peer = peer_name(host, port)
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise resolve_error(exc, host, peer) from exc
    failures: list[str] = []
    last: BaseException | None = None
    for family, kind, proto, _, address in for_source(infos, source, host, peer):
        # Our own socket, connected to the whole address getaddrinfo gave, as the blocking
        # driver does: a scoped IPv6 address (fe80::1%eth0) is (host, port, flowinfo,
        # scope_id), and its host and port alone lose the interface it is reached on.
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            if source is not None:
                sock.bind((source, 0))  # "Cannot assign requested address" if not ours
            async with asyncio.timeout(timeout):
                await loop.sock_connect(sock, address)
        except (OSError, TimeoutError) as exc:
            sock.close()
            last = exc
            failures.append(attempt_failure(address, exc))
            continue
        except BaseException:
            sock.close()  # a cancellation: no socket is left behind
            raise
        return sock
    raise all_addresses_failed(peer, failures) from last


async def _open_proxied(
    proxy: Proxy,
    host: str,
    port: int,
    *,
    timeout: float,
    ssl_context: ssl.SSLContext | None,
    server_hostname: str | None,
    source: str | None,
) -> tuple[asyncio.Transport, _Pipe]:
    """The transport tunnelled through ``proxy`` to ``host:port``, as the blocking driver's
    ``_connect_proxied`` (each attempt, connecting to the proxy included, within
    ``timeout``), then wrapped as :func:`_open_tcp` does."""
    loop = asyncio.get_running_loop()
    peer = peer_name(host, port)
    infos = None
    if proxy.resolves_locally:
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise resolve_error(exc, host, peer) from exc
    failures: list[ProxyError] = []
    for target in tunnel_targets(proxy, host, infos):
        handshake = ProxyHandshake(proxy, target, port)
        sock: socket.socket | None = None
        try:
            async with asyncio.timeout(timeout):
                try:
                    sock = await _connect_socket(
                        proxy.host, proxy.port, timeout=timeout, source=source
                    )
                except ProxyError:
                    raise
                except ConnectError as exc:
                    raise proxy_unreachable(handshake, exc) from exc
                await _run_handshake(loop, sock, handshake)
        except ProxyError as exc:
            if sock is not None:
                sock.close()
            if not handshake.target_failed:
                raise
            failures.append(exc)
            continue
        except (OSError, ValueError) as exc:  # TimeoutError is an OSError
            if sock is not None:
                sock.close()
            raise handshake_failed(handshake, exc, timeout) from exc
        except BaseException:
            if sock is not None:
                sock.close()
            raise
        assert sock is not None
        return await _wrap(sock, ssl_context, server_hostname or host, timeout, peer)
    raise all_targets_failed(proxy, peer, failures)


async def _run_handshake(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, handshake: ProxyHandshake
) -> None:
    """Run ``handshake`` on ``sock``, reading no byte past the proxy's reply (the caller
    bounds the time)."""
    while True:
        data = handshake.data_to_send()
        if data:
            await loop.sock_sendall(sock, data)
        # It may hold the proxy's password (RFC 1929's request, or the Basic token): not a
        # local for a traceback's frame, which error reporters show, when the proxy refuses.
        del data
        if handshake.done:
            break
        handshake.receive_data(await loop.sock_recv(sock, handshake.read_limit))
    # Reads kept to read_limit: whatever the target sent first is still in the socket.
    assert not handshake.leftover


async def _wrap(
    sock: socket.socket,
    ssl_context: ssl.SSLContext | None,
    server_hostname: str,
    timeout: float,
    peer: str,
) -> tuple[asyncio.Transport, _Pipe]:
    """The transport over ``sock``, a connected socket, with implicit TLS when there is a
    context: its handshake, within ``timeout`` in all, failing as the blocking driver's
    does (a :class:`TLSError`, not a failed connection: the server was reached)."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            transport, pipe = await loop.create_connection(
                _Pipe,
                sock=sock,
                ssl=ssl_context,
                server_hostname=server_hostname if ssl_context is not None else None,
                ssl_handshake_timeout=timeout if ssl_context is not None else None,
            )
    except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
        sock.close()
        if ssl_context is None:  # no handshake: the connection was lost at once
            raise map_io_error(exc, peer=peer, phase="connect", timeout=timeout) from exc
        raise map_tls_error(exc, peer=peer, server_hostname=server_hostname) from exc
    except BaseException:
        sock.close()
        raise
    assert isinstance(transport, asyncio.Transport)
    return transport, pipe


async def _open_unix(path: str, timeout: float) -> tuple[asyncio.Transport, _Pipe]:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            transport, pipe = await loop.create_unix_connection(_Pipe, path)
    except (OSError, TimeoutError) as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise ConnectError(f"could not connect to {path}: {reason}", host=path) from exc
    assert isinstance(transport, asyncio.Transport)
    return transport, pipe


async def connect(
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
) -> AsyncDriver:
    """Open a connection and return its driver (see :func:`sync_driver.connect`, which
    documents the arguments).

    Raises:
        ConnectError: no address accepted the connection.
        ProxyError: the proxy was unreachable, refused, or could not reach the server.
        TLSError: the implicit-TLS handshake failed.
    """
    context = ssl_context if ssl_context is not None else ssl.create_default_context()
    if unix_path is not None:
        transport, pipe = await _open_unix(unix_path, timeouts.connect)
        peer = unix_path
    else:
        assert host is not None
        assert port is not None
        opener = _open_tcp if proxy is None else functools.partial(_open_proxied, proxy)
        transport, pipe = await opener(
            host,
            port,
            timeout=timeouts.connect,
            ssl_context=context if implicit_tls else None,
            server_hostname=server_hostname or host,
            source=source_address,
        )
        peer = peer_name(host, port)
    driver = AsyncDriver(transport, pipe, timeouts=timeouts, ssl_context=context, peer=peer)
    driver.implicit_tls = implicit_tls
    return driver


class AsyncDriver:
    """One asyncio connection, running :mod:`mailrelay.flow` steps.

    Attributes:
        peer: ``host:port`` (or the socket path), for messages.
        implicit_tls: whether the connection was wrapped in TLS from the start.
    """

    def __init__(
        self,
        transport: asyncio.Transport,
        pipe: _Pipe,
        *,
        timeouts: Timeouts,
        ssl_context: ssl.SSLContext,
        peer: str,
    ) -> None:
        self._transport: asyncio.Transport | None = transport
        self._pipe = pipe
        self.timeouts = timeouts
        self.ssl_context = ssl_context
        self.peer = peer
        self.implicit_tls = False
        self._writes = WriteQueue(READ_SIZE)
        self._pending = self._writes.chunks  # the same list: a cheap "anything queued?"
        # Timeouts.for_phase checks the name each time; the phases are a fixed set.
        # AUTH replies wait under the greeting limit, but errors name their own phase.
        self._limits: dict[str, float] = {**attrs.asdict(timeouts), "auth": timeouts.greeting}
        # The step waiting in _wait(), its Read, and the future that wakes the task.
        self._step: Generator[Request, bytes | None, Any] | None = None
        self._waiting: Read | None = None
        self._waiter: asyncio.Future[tuple[int, Any] | None] | None = None
        # When the reply being read must have come (loop time; see Read.resume).
        self._read_deadline = 0.0
        # After a failed write: its error, and what the server had sent that no Read has
        # taken yet (see _keep_leftovers).
        self._write_error: DeliveryError | None = None
        self._leftovers = b""

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<AsyncDriver {self.peer} {state}>"

    @property
    def closed(self) -> bool:
        """Whether the connection has been closed (by us or by the server)."""
        return self._transport is None or self._transport.is_closing()

    @property
    def bytes_received(self) -> int:
        """How many bytes the server has sent (0 means not even a greeting)."""
        return self._pipe.bytes_received

    def has_input(self) -> bool:
        """Whether the server has sent something not read yet, or closed its side (or the
        connection is gone), found without waiting. As for the blocking driver: on a
        connection between exchanges, anything there is unsolicited.

        The buffer holds what the event loop has read; bytes that arrived since its last
        turn are still in the kernel (a task may take the connection from the pool in the
        very turn they came in), so the socket is asked too, without reading from it. Over
        TLS a record that carries no data for us would count as well: the connection is
        then replaced, which costs a connect, never a misread reply.
        """
        pipe = self._pipe
        if self.closed or pipe.buffered > 0 or pipe.ended:
            return True
        assert self._transport is not None  # not closed
        sock = self._transport.get_extra_info("socket")
        return sock is not None and _readable(sock.fileno())

    @property
    def local_address(self) -> str | None:
        """Our end's IP address (for EHLO), or ``None`` for a unix socket."""
        if self._transport is None:
            return None
        name: Any = self._transport.get_extra_info("sockname")
        if isinstance(name, tuple) and name:
            return str(name[0])
        return None

    def close(self) -> None:
        """Close the connection (idempotent; does not wait).

        ``abort``, not ``close``: by the time the dialogue asks to close, QUIT has had its
        answer (or the session is dead), and a graceful TLS shutdown would wait for the
        server's close_notify, possibly past the end of the event loop, leaking the socket.
        """
        self._writes.clear()
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.abort()

    # -- the loop ----------------------------------------------------------------------------

    async def run(self, step: Generator[Request, bytes | None, T]) -> T:
        """Drive ``step`` to completion and return its result.

        Raises:
            DeliveryError: whatever the step raises, including translated I/O errors.
        """
        try:
            kind, payload = self._advance(step, None, None)
            while True:
                if kind is _WAIT:
                    kind, payload = await self._wait(step, payload)
                    continue
                if kind is _DONE:
                    if self._pending:
                        await self._flush()
                    return cast("T", payload)
                answer: bytes | None = None
                error: DeliveryError | None = None
                try:
                    if kind is _READ:
                        answer = await self._read(payload)
                    elif kind is _TIMEOUT:
                        raise await self._read_failed(payload, TimeoutError())
                    elif kind is _DRAIN:
                        await self._drain()
                        if payload is not None:  # a Read waited for the writes to drain
                            kind = _WAIT
                            continue
                    elif kind is _LOOK:
                        await self._look()
                        if payload is not None:  # a Read waited for the writes to go
                            kind = _WAIT
                            continue
                    elif isinstance(payload, StartTLS):
                        if self._pending:
                            await self._flush()
                        await self.start_tls(payload.server_hostname)
                    elif isinstance(payload, Close):
                        self.close()
                    else:  # pragma: no cover - the flow yields only the four requests
                        raise TypeError(f"unknown I/O request {payload!r}")
                except DeliveryError as exc:
                    self.close()
                    if type(payload) is Read and exc is self._write_error and self._leftovers:
                        # The writes a Read waited for failed, and the server had said
                        # something first: that is the answer (the error comes after it).
                        answer = self._take_leftovers()
                    else:
                        error = exc
                kind, payload = self._advance(step, answer, error)
        except BaseException:
            # The step's own error, a cancellation (or a bug): the session is dead; never
            # leave the socket open.
            self.close()
            step.close()
            raise

    def _advance(
        self,
        step: Generator[Request, bytes | None, Any],
        answer: bytes | None,
        error: DeliveryError | None,
    ) -> tuple[int, Any]:
        """Run ``step`` on as far as it goes without waiting; return what stopped it.

        Writes are queued (and sent once 64 KiB are queued); a Read is answered from the
        buffer when bytes are there. It stops at a Read with nothing buffered (``_WAIT``),
        a write that must wait for the transport to drain (``_DRAIN``, with the Read that
        was to follow, if any), a StartTLS or Close (``_OTHER``), or the step's end
        (``_DONE`` with its value). A translated I/O error is thrown into the step, as the
        waiting loop does. Called by :meth:`run` and, while a Read waits, from
        ``data_received`` (:meth:`_fed`): one call answers a whole group of replies.
        """
        pipe = self._pipe
        while True:
            try:
                request = step.throw(error) if error is not None else step.send(answer)
            except StopIteration as done:
                return _DONE, done.value
            answer, error = None, None
            kind = type(request)
            try:
                if kind is Write:
                    assert isinstance(request, Write)
                    if self._transport is None:
                        raise closed_error(self.peer)
                    if request.flush and not self._pending:
                        # The hot path (a pipelined group, nothing queued before it):
                        # straight to the transport, without the queue.
                        if self._look_first(request.phase):
                            self._writes.add(request)
                            return _LOOK, None
                        self._writes.phase = request.phase
                        if not self._send(request.data):
                            return _DRAIN, None
                    elif self._writes.add(request):
                        if self._look_first(request.phase):
                            return _LOOK, None
                        if not self._send_pending():
                            return _DRAIN, None
                elif kind is Read:
                    if self._pending:
                        if self._look_first(self._writes.phase):
                            return _LOOK, request
                        if not self._send_pending():
                            return _DRAIN, request
                    if self._transport is None or not pipe._buffer:
                        return _WAIT, request
                    read = cast("Read", request)
                    if not read.resume:
                        # Answered at once, from bytes that came meanwhile: the wait for
                        # this reply starts now all the same (see _started).
                        self._started(read)
                    answer = pipe.take()
                elif kind is Peek:
                    # What the event loop has read (no waiting, no flush: held-back
                    # writes go with the next Read).
                    answer = pipe.take() if pipe._buffer else None
                else:
                    return _OTHER, request
            except DeliveryError as exc:
                self.close()
                if kind is Read and exc is self._write_error and self._leftovers:
                    answer = self._take_leftovers()  # as in run()
                else:
                    error = exc

    async def _wait(
        self, step: Generator[Request, bytes | None, Any], request: Read
    ) -> tuple[int, Any]:
        """Wait for the bytes that answer ``request``; return what stops the step next.

        While it waits, ``data_received`` hands the bytes straight to the step
        (:meth:`_fed`), which may answer many Reads and Writes without waking this task: a
        task wake-up per reply costs more than the rest of the work on a reply. Each Read
        is bounded by its phase limit.
        """
        pipe = self._pipe
        if self._transport is None or pipe.ended:
            return _READ, request  # the ordinary read says what the end means
        if pipe.buffered:
            # Bytes came while the writes drained: the answer is here already.
            self._started(request)
            return self._advance(step, pipe.take(), None)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[tuple[int, Any] | None] = loop.create_future()
        self._step = step
        self._waiting = request
        self._waiter = waiter
        pipe.feeder = self._fed
        pipe.arm(waiter, self._deadline_for(request, loop.time()))
        try:
            woken = await waiter
        except TimeoutError:
            return _TIMEOUT, self._waiting
        finally:
            pipe.feeder = None
            pipe.disarm()
            self._step = None
            self._waiter = None
        if woken is None:  # end of file or a lost connection: the ordinary read handles it
            return _READ, self._waiting
        return woken

    def _fed(self, data: bytes | None) -> None:
        """``data_received`` while a step waits: answer its Read with ``data`` (or, when
        ``None``, from the buffer) and run it on."""
        waiter = self._waiter
        step = self._step
        if waiter is None or waiter.done() or step is None:
            # The task already has its answer; the bytes wait in the buffer.
            if data is not None:
                self._pipe.keep(data)
            return
        try:
            kind, payload = self._advance(
                step, data if data is not None else self._pipe.take(), None
            )
        except BaseException as exc:  # the step's own error: the task re-raises it
            self.close()
            waiter.set_exception(exc)
            return
        pipe = self._pipe
        if kind is _WAIT and self._transport is not None and not pipe._eof:
            # The step waits again (the next message's replies): the same waiter, a new
            # deadline. Usually the connection's timer is set no later than that, and then
            # only the deadline changes (see _Pipe.arm and _Pipe._on_timer).
            self._waiting = payload
            deadline = self._deadline_for(payload, waiter.get_loop().time())
            timer = pipe._timer
            if timer is not None and timer.when() <= deadline:
                pipe._deadline = deadline
            else:
                pipe.arm(waiter, deadline)
            return
        waiter.set_result((kind, payload))

    def _live(self) -> asyncio.Transport:
        if self._transport is None:
            raise closed_error(self.peer)
        return self._transport

    async def _flush(self) -> None:
        """Send every pending write, limited by the last write's phase timeout."""
        if not self._send_pending():
            await self._drain()

    def _send_pending(self) -> bool:
        """Hand every pending write to the transport; ``True`` when there is no need to wait
        for it to drain (the common case: the kernel took the bytes at once)."""
        self._live()
        return self._send(self._writes.take())

    def _send(self, data: bytes) -> bool:
        """Hand ``data`` to the transport (the last write's phase bounds it); as
        :meth:`_send_pending`."""
        try:
            return self._pipe.write_now(data)
        except OSError as exc:
            phase = self._writes.phase
            raise self._write_failed(exc, phase, self._limits[phase]) from exc

    async def _drain(self) -> None:
        """Wait until the transport's buffer is low again, within the last write's phase."""
        phase = self._writes.phase
        timeout = self._limits[phase]
        try:
            async with asyncio.timeout(timeout):
                await self._pipe.drain()
        except (OSError, TimeoutError) as exc:
            raise self._write_failed(exc, phase, timeout) from exc

    def _write_failed(self, exc: BaseException, phase: str, timeout: float) -> DeliveryError:
        """The error for a failed write, remembered with what the server had sent (see
        :meth:`_keep_leftovers`)."""
        self._keep_leftovers()
        error = map_io_error(exc, peer=self.peer, phase=phase, timeout=timeout)
        self._write_error = error
        return error

    def _look_first(self, phase: str) -> bool:
        """Whether message data about to go out over TLS should wait until the event loop
        has read what the server sent meanwhile (see :meth:`_look`).

        A server may refuse a message part-way through its data and hang up (RFC 5321
        §3.8). Over plain text the kernel keeps its reply for :meth:`_keep_leftovers`;
        over TLS a write that meets the reset ends the transport at once, and the TLS
        records still in the kernel can no longer be decrypted: the reply is lost. So,
        in the data phase, when the socket has something to read (one ``poll``), the
        data waits for the event loop's read. Elsewhere, and over plain text, writes go
        out at once."""
        if phase != "data_block":
            return False
        transport = self._transport
        if transport is None or transport.get_extra_info("ssl_object") is None:
            return False
        sock = transport.get_extra_info("socket")
        return sock is not None and _readable(sock.fileno())

    async def _look(self) -> None:
        """Let the event loop read what has arrived, then send the writes held back (see
        :meth:`_look_first`). The loop reads in the turn after the one this task yields
        in, so it yields twice."""
        for _ in range(2):
            await asyncio.sleep(0)
        if self._pending:
            await self._flush()

    def _keep_leftovers(self) -> None:
        """After a failed write: keep what the server has sent and no Read has taken, up to
        :data:`LEFTOVER_LIMIT` bytes, without waiting (see the blocking driver's
        ``_keep_leftovers``: a reply sent before the server hung up). The connection is
        closed by the caller, as after any error; the Reads that follow get these bytes,
        then the write's error again (a Read whose held-back writes failed gets them at
        once, in place of the error)."""
        pipe = self._pipe
        # A write that fails in the transport ends it at once, before the event loop has
        # read what the kernel holds: that is read here, while the socket is still open.
        pipe.drain_socket()
        kept = bytearray()
        while pipe.buffered and len(kept) < LEFTOVER_LIMIT:
            kept += pipe.take()
        self._leftovers = bytes(kept)

    def _take_leftovers(self) -> bytes:
        """The next Read's share of what :meth:`_keep_leftovers` kept."""
        data = self._leftovers[:READ_SIZE]
        self._leftovers = self._leftovers[READ_SIZE:]
        return data

    def _started(self, request: Read) -> None:
        """Start the time limit of the reply ``request`` begins to wait for (unless it
        resumes one), when it is answered without waiting.

        Every Read that begins a wait must set its deadline, even one answered from bytes
        already buffered (they came while the writes drained): the Read that resumes the
        same reply keeps that deadline (``Read.resume``), and would otherwise keep the one
        of an earlier reply, long past (a false timeout after a whole message went out).
        """
        if not request.resume:
            self._deadline_for(request, asyncio.get_running_loop().time())

    def _deadline_for(self, request: Read, now: float) -> float:
        """When the bytes ``request`` waits for must have come (loop time): the phase's limit
        from now, or, when the read resumes the wait for the same reply, the deadline that
        wait began with (see ``Read.resume``)."""
        if not request.resume:
            self._read_deadline = now + self._limits[request.phase]
        return self._read_deadline

    async def _read(self, request: Read) -> bytes:
        if self._transport is None and self._write_error is not None:
            # After a failed write: what the server had sent, then the write's error.
            if self._leftovers:
                return self._take_leftovers()
            raise self._write_error
        self._live()
        now = asyncio.get_running_loop().time()
        deadline = self._deadline_for(request, now)  # set even when no wait follows
        if self._pipe.buffered:
            return self._pipe.take()  # already here: no timer needed
        timeout = max(0.0, deadline - now)
        try:
            return await self._pipe.read_within(timeout)
        except (TimeoutError, OSError) as exc:
            raise await self._read_failed(request, exc) from exc

    async def _read_failed(self, request: Read, exc: OSError) -> DeliveryError:
        """The error a failed read means (a silent greeting may be a TLS port)."""
        timeout = self._limits[request.phase]
        if (
            isinstance(exc, TimeoutError)
            and self._before_greeting(request)
            and await self._probe_tls()
        ):
            error: DeliveryError = implicit_tls_error(self.peer)
        else:
            error = map_io_error(exc, peer=self.peer, phase=request.phase, timeout=timeout)
        error.__cause__ = exc
        return error

    def _before_greeting(self, request: Read) -> bool:
        return before_greeting(self.bytes_received, request.phase, self.implicit_tls)

    async def _probe_tls(self) -> bool:
        """After a silent greeting: does the server answer a TLS handshake?"""
        probe = probe_context()
        try:
            await self._upgrade(probe, None, min(PROBE_TIMEOUT, self.timeouts.connect))
        except (OSError, TimeoutError):
            return False
        return True

    async def _upgrade(
        self, context: ssl.SSLContext, server_hostname: str | None, timeout: float
    ) -> None:
        transport = self._live()
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            new = await loop.start_tls(
                transport,
                self._pipe,
                context,
                server_hostname=server_hostname,
                ssl_handshake_timeout=timeout,
            )
        if new is None:  # pragma: no cover - only for transports without TLS support
            raise ConnectionLost("the connection cannot start TLS", host=self.peer)
        self._transport = new
        self._pipe.transport = new  # flow control now goes through the TLS transport

    def peer_chain(self) -> tuple[bytes, ...]:
        """The certificates the server presented (DER, leaf first; see
        :func:`~mailrelay.transport.driver_common.peer_chain`); ``()`` without TLS."""
        if self._transport is None:
            return ()
        tls = self._transport.get_extra_info("ssl_object")
        return peer_chain(tls if isinstance(tls, ssl.SSLObject | ssl.SSLSocket) else None)

    async def start_tls(self, server_hostname: str) -> None:
        """Run the TLS handshake on the connection (bounded by ``Timeouts.connect``).

        Raises:
            TLSError: the handshake or the certificate check failed, or the server sent
                bytes between its 220 and the handshake (RFC 3207 §4.2).
        """
        if self._pipe.buffered:
            self.close()
            raise TLSError(
                f"{self.peer} sent {self._pipe.buffered} bytes after its 220 to STARTTLS and "
                "before the TLS handshake (RFC 3207 §4.2: a response-injection attempt)",
                is_transient=False,
                host=self.peer,
            )
        try:
            await self._upgrade(self.ssl_context, server_hostname, self.timeouts.connect)
        except (OSError, TimeoutError) as exc:
            self.close()
            raise map_tls_error(
                exc, peer=self.peer, server_hostname=server_hostname, starttls=True
            ) from exc
        log.debug("TLS established with %s", self.peer)
