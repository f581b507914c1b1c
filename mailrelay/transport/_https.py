"""Outbound HTTPS to hosts that other people's DNS names, under one deadline (stdlib only).

MTA-STS policy fetches (:mod:`mailrelay.transport.mtasts`, RFC 8461 §3.3) and TLS-RPT
report POSTs (:mod:`mailrelay.transport.tlsrpt`, RFC 8460 §5.4) share this machinery; what
each asks of the server (method, statuses, media type, its error type and messages) stays
with them.

Rules of this module:

- One deadline (an instant on the caller's monotonic clock) bounds the whole exchange:
  name resolution, each TCP connection attempt (given only the time left, so a host with
  many addresses that never answer cannot stretch it), the TLS handshake, the request and
  the response. A socket timeout bounds each read, not the exchange: a server that sends a
  byte at a time never trips it, so a watchdog timer shuts the socket down at the deadline
  (:func:`pinned_connection`).
- Resolution (:func:`resolve_before`) runs in a small pool of daemon threads
  (:data:`RESOLVER_THREADS`) and is waited for only until the deadline. A blocked
  ``getaddrinfo`` cannot be interrupted: the caller returns at the deadline and the thread
  finishes its lookup in the background, its answer dropped. The pool never grows beyond
  its size: while all its threads are blocked, further lookups wait in its queue, and one
  whose caller's deadline passed first is dropped without running (it stays queued, a few
  bytes, until a thread is free). The price of that bound: while every thread is blocked,
  a name that would resolve at once waits too, and fails at its deadline like the others.
  Daemon threads, because a lookup blocked for good must not hold the interpreter at exit
  (the workers of :class:`concurrent.futures.ThreadPoolExecutor` are joined at exit).
- Server-side request forgery (:mod:`mailrelay.transport.netguard`): every address is
  checked before the first connection (:func:`refuse_private`), and the connection goes
  only to those addresses, given as literals, so nothing is resolved again and DNS
  rebinding cannot swap them (:class:`PinnedHTTPSConnection`).
- Redirects are never followed (RFC 8461 §3.3; a report is not re-sent elsewhere either):
  :func:`status_refusal` names a 3xx as a refused redirect.
- A response body is read to a bound (:func:`read_limited`), before the deadline.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import os
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, TypeAlias, TypeVar

from mailrelay.transport.netguard import non_public_addresses

__all__ = [
    "RESOLVER_THREADS",
    "PinnedHTTPSConnection",
    "pinned_connection",
    "read_limited",
    "refuse_private",
    "resolve_before",
    "status_refusal",
]

_T = TypeVar("_T")

#: The most threads resolving names for outbound HTTPS at once, process-wide.
RESOLVER_THREADS: Final = 4
#: A timeout handed to the socket layer is never zero (zero would mean non-blocking).
_LEAST: Final = 0.001

_Clock: TypeAlias = Callable[[], float]


# -- resolution, bounded by the deadline ----------------------------------------------------


# A call for a pool thread, and the future that gets its outcome.
_Job: TypeAlias = tuple[concurrent.futures.Future[Any], Callable[[], Any]]


class _DaemonPool:
    """At most ``size`` daemon threads running the calls handed to them, started as needed
    and kept, waiting on one queue."""

    def __init__(self, size: int, name: str) -> None:
        self._size = size
        self._name = name
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def forget_threads(self) -> None:
        """Start afresh: in a forked child, the parent's threads do not exist."""
        self._lock = threading.Lock()
        self._jobs = queue.SimpleQueue()
        self._threads = []

    def submit(self, call: Callable[[], _T]) -> concurrent.futures.Future[_T]:
        """Run ``call`` in one of the threads; its future gets the outcome."""
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()
        with self._lock:
            self._jobs.put((future, call))
            if len(self._threads) < self._size:
                thread = threading.Thread(
                    target=self._work,
                    args=(self._jobs,),
                    name=f"{self._name}-{len(self._threads)}",
                    daemon=True,
                )
                thread.start()
                self._threads.append(thread)
        return future

    @staticmethod
    def _work(jobs: queue.SimpleQueue[_Job]) -> None:
        while True:
            future, call = jobs.get()
            # False when the caller gave up (its deadline passed) before the job started.
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(call())
                except BaseException as exc:  # the caller's to handle, whatever it is
                    future.set_exception(exc)
            del future, call  # keep no answer alive while waiting for the next job


_RESOLVERS: Final = _DaemonPool(RESOLVER_THREADS, "mailrelay-https-resolve")
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_RESOLVERS.forget_threads)


def resolve_before(
    deadline: float, lookup: Callable[[], _T], *, clock: _Clock = time.monotonic
) -> _T:
    """``lookup()`` (a name resolution that may block), waited for until ``deadline``.

    It runs in the module's pool of daemon threads. When the deadline comes first, this
    returns (raises) at once and the lookup, which nothing can interrupt, finishes in the
    background with its answer dropped; one that had not started yet never starts.

    Args:
        deadline: the instant, on ``clock``, by which the answer is needed.
        lookup: the blocking lookup.
        clock: the monotonic clock ``deadline`` is on.

    Raises:
        TimeoutError: the deadline came before the answer.
        Exception: whatever ``lookup`` raised.
    """
    left = deadline - clock()
    if left <= 0:
        raise TimeoutError("no time left to resolve the name")
    future = _RESOLVERS.submit(lookup)
    done, _ = concurrent.futures.wait((future,), timeout=left)
    if not done:
        future.cancel()  # not started yet: it never will be
        raise TimeoutError("the name was not resolved in time")
    return future.result()


# -- where connections may go ----------------------------------------------------------------


def refuse_private(
    host: str,
    addresses: Iterable[str],
    *,
    allow_private_addresses: bool,
    error: Callable[[str], Exception],
    action: str,
) -> None:
    """Refuse ``host`` when one of ``addresses`` is not public (unless allowed).

    Every address that would be tried is checked before the first connection, and only
    these are then connected to: a second lookup could answer differently (DNS rebinding).

    Args:
        host: the host name, for the message (never the URL: its query may hold a token).
        addresses: every address that would be tried.
        allow_private_addresses: skip the check (internal deployments).
        error: makes the caller's exception from the message.
        action: what ``allow_private_addresses=True`` would allow, for the message
            (``"fetch from"``, ``"post to"``).

    Raises:
        Exception: ``error(message)``, when an address is not public.
    """
    if allow_private_addresses:
        return
    refused = non_public_addresses(addresses)
    if refused:
        raise error(
            f"{host} resolves to {', '.join(refused)}, not a public address: refused "
            f"(pass allow_private_addresses=True to {action} internal hosts)"
        )


# -- the connection ---------------------------------------------------------------------------


class PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to ``host`` at addresses resolved (and checked) beforehand, tried in turn until
    one accepts the TCP connection, all before ``deadline``: TCP to the address; SNI,
    certificate check and ``Host:`` header for ``host``.

    Args:
        host: the name the certificate must carry.
        addresses: IP addresses (literals: nothing is resolved again), tried in order.
        port: the TCP port.
        context: verifies the server's certificate.
        deadline: the instant, on ``clock``, after which no attempt starts.
        clock: the monotonic clock ``deadline`` is on.
    """

    def __init__(
        self,
        host: str,
        addresses: tuple[str, ...],
        port: int,
        context: ssl.SSLContext,
        deadline: float,
        *,
        clock: _Clock = time.monotonic,
    ) -> None:
        super().__init__(host, port, timeout=max(deadline - clock(), _LEAST), context=context)
        self._addresses = addresses
        self._verifying = context
        self._deadline = deadline
        self._clock = clock

    def connect(self) -> None:
        """Connect TCP to the first address that answers in time, then TLS for ``host``."""
        sock: socket.socket | None = None
        failure: OSError = OSError(f"{self.host} has no address")
        for address in self._addresses:
            # Each attempt gets only the time left: a host with many addresses that never
            # answer must not stretch the exchange to ``timeout`` per address.
            left = self._deadline - self._clock()
            if left <= 0:
                failure = TimeoutError(f"{self.host}: no address answered in time")
                break
            try:
                # An address literal: create_connection does not resolve anything again.
                sock = socket.create_connection((address, self.port), left)
                break
            except OSError as exc:
                failure = exc
        if sock is None:
            raise failure
        try:
            self.sock = self._verifying.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise


def _cut(conn: http.client.HTTPConnection) -> None:
    """Shut the connection's socket down: a read blocked in another thread returns at once."""
    sock = conn.sock
    if sock is not None:
        with contextlib.suppress(OSError):  # already closed
            sock.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def pinned_connection(
    host: str,
    addresses: tuple[str, ...],
    port: int,
    context: ssl.SSLContext,
    deadline: float,
    *,
    clock: _Clock = time.monotonic,
) -> Iterator[PinnedHTTPSConnection]:
    """A :class:`PinnedHTTPSConnection` (not connected yet: its first request connects),
    cut off at ``deadline`` and closed at the end of the block.

    A socket timeout bounds each read, not the exchange: a server that sends its handshake
    or headers a byte at a time could hold us for hours, so a watchdog shuts the socket
    down at the deadline and the blocked read returns (with an error, or end of file).
    """
    conn = PinnedHTTPSConnection(host, addresses, port, context, deadline, clock=clock)
    watchdog = threading.Timer(max(deadline - clock(), _LEAST), _cut, args=(conn,))
    watchdog.daemon = True
    watchdog.start()
    try:
        yield conn
    finally:
        watchdog.cancel()
        conn.close()


# -- the response ---------------------------------------------------------------------------


def status_refusal(
    response: http.client.HTTPResponse, accepted: Callable[[int], bool]
) -> str | None:
    """Why the response's status is refused, or ``None`` when ``accepted(status)``.

    A redirect is named as one, never followed (RFC 8461 §3.3).
    """
    status = response.status
    if 300 <= status < 400:
        where = response.getheader("Location", "?")
        return f"HTTP {status} redirect to {where} (not followed)"
    if not accepted(status):
        return f"HTTP {status} {response.reason}"
    return None


def read_limited(
    response: http.client.HTTPResponse,
    conn: http.client.HTTPConnection,
    deadline: float,
    limit: int,
    *,
    clock: _Clock = time.monotonic,
) -> bytes:
    """The body, or its first ``limit`` bytes, read before ``deadline``.

    Raises:
        TimeoutError: the deadline came before the end (or the ``limit``-th byte).
        OSError, http.client.HTTPException: the connection failed.
    """
    body = bytearray()
    while len(body) < limit:
        left = deadline - clock()
        if left <= 0:
            raise TimeoutError("timed out reading the body")
        if conn.sock is not None:
            conn.sock.settimeout(left)
        chunk = response.read1(limit - len(body))
        if not chunk:
            break
        body += chunk
    return bytes(body)
