"""An aiosmtpd server that knows how many of its connections a client holds open at once.

Theory of operation: the suite's :class:`~tests.peers.aiosmtpd_server.RecordingHandler`
(every accepted transaction recorded) on an aiosmtpd server whose protocol objects report
``connection_made`` and ``connection_lost`` to the handler, so the pool tests can assert on
facts the client cannot fake: the most connections open at the same time, which tagged
messages arrived (and how often), and whether every connection has ended.

Rules:

* A connection counts as the client's from its EHLO (aiosmtpd's controller connects once
  itself, silently, to see that the server is up). It stops counting when its QUIT arrives
  (the client waits for the 221 before it opens anything in its place), or when the client
  has closed its side: at each new EHLO the other connections' TCP state is read
  (``TCP_INFO``), and one no longer ``ESTABLISHED`` (the client's FIN or RST came first,
  which on loopback it does when the client closed before connecting again) is not
  counted. No clock is read, so the count does not depend on how fast the machine is.
* The server offers PIPELINING (aiosmtpd reads commands one at a time, so a pipelined group
  is answered in order), so the client's pipelined paths are the ones under test.
* Every wait (:meth:`ConcurrencyHandler.wait_all_closed`) is bounded.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import threading
import time
from collections import Counter
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.peers.aiosmtpd_server import HOSTNAME, RecordingHandler
from tests.peers.scripted import free_port

#: The header that names a test message (one unique value per message sent).
TAG_HEADER = "X-Test-Tag"

_TAG = re.compile(rb"^X-Test-Tag: *(\S+)\r?$", re.MULTILINE | re.IGNORECASE)
# Linux's TCP states (include/net/tcp_states.h); the first byte of struct tcp_info.
_TCP_ESTABLISHED = 1


def _established(transport: asyncio.BaseTransport) -> bool:
    """Whether the client has not closed its side of ``transport``'s socket yet."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    try:
        info: bytes = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    except OSError:
        return False  # closed under us: not open
    return info[0] == _TCP_ESTABLISHED


class ConcurrencyHandler(RecordingHandler):
    """Records transactions and counts the connections the client holds open at once.

    Args:
        lmtp: answer DATA per recipient (RFC 2033 §4.2).
    """

    def __init__(self, *, lmtp: bool = False) -> None:
        super().__init__(lmtp=lmtp)
        self._lock = threading.Lock()
        self._open: dict[int, asyncio.BaseTransport] = {}
        self._quit: set[int] = set()
        # The connections that sent EHLO (aiosmtpd's controller connects once itself, to
        # see that the server is up, and says nothing).
        self._clients: set[int] = set()
        self.accepted = 0
        """Connections the client opened (that sent EHLO)."""
        self.quits = 0
        """QUIT commands received."""
        self.most_at_once = 0
        """The most connections the client held open at the same time."""

    # -- what the protocol objects report ------------------------------------------------------

    def opened(self, server: SMTP, transport: asyncio.BaseTransport) -> None:
        """A connection was accepted (it counts as the client's from its EHLO)."""
        with self._lock:
            self._open[id(server)] = transport

    def lost(self, server: SMTP) -> None:
        """A connection ended."""
        with self._lock:
            self._open.pop(id(server), None)
            self._quit.discard(id(server))
            self._clients.discard(id(server))

    # -- hooks ---------------------------------------------------------------------------------

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: Any
    ) -> Any:
        """Count the connection and the others the client still holds; offer PIPELINING
        (RFC 2920) besides what aiosmtpd offers."""
        session.host_name = hostname  # what aiosmtpd does itself when there is no hook
        with self._lock:
            key = id(server)
            if key not in self._clients:
                self._clients.add(key)
                self.accepted += 1
                held = sum(
                    1
                    for other in self._clients
                    if other != key and other not in self._quit and _established(self._open[other])
                )
                self.most_at_once = max(self.most_at_once, held + 1)
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Count the QUIT; the connection no longer counts as held (the 221 comes next)."""
        with self._lock:
            self.quits += 1
            self._quit.add(id(server))
        return "221 2.0.0 Bye"

    # -- what the tests read -------------------------------------------------------------------

    @property
    def open_now(self) -> int:
        """Connections not ended yet (as the server's event loop has seen)."""
        with self._lock:
            return len(self._open)

    def tags(self) -> Counter[str]:
        """How many times each tagged message was received."""
        found: Counter[str] = Counter()
        for message in list(self.messages):
            match = _TAG.search(message.content)
            if match is not None:
                found[match.group(1).decode()] += 1
        return found

    def deliveries(self) -> Counter[tuple[str, str]]:
        """How many times each tagged message was received for each recipient."""
        found: Counter[tuple[str, str]] = Counter()
        for message in list(self.messages):
            match = _TAG.search(message.content)
            if match is not None:
                found.update((match.group(1).decode(), rcpt) for rcpt in message.rcpt_tos)
        return found

    def wait_all_closed(self, timeout: float = 10.0) -> bool:
        """Wait (at most ``timeout`` seconds) until every connection has ended."""
        deadline = time.monotonic() + timeout
        while self.open_now and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self.open_now


class _CountingSMTP(SMTP):
    """aiosmtpd's SMTP, telling its handler when a connection begins and ends."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        fresh = self.transport is None  # not the TLS transport replacing the plain one
        super().connection_made(transport)
        if fresh and isinstance(self.event_handler, ConcurrencyHandler):
            self.event_handler.opened(self, transport)

    def connection_lost(self, error: Exception | None) -> None:
        if isinstance(self.event_handler, ConcurrencyHandler):
            self.event_handler.lost(self)
        super().connection_lost(error)


class _CountingLMTP(_CountingSMTP, LMTP):
    """aiosmtpd's LMTP, telling its handler when a connection begins and ends."""


class _Controller(Controller):
    def factory(self) -> SMTP:
        cls = _CountingLMTP if self.handler.lmtp else _CountingSMTP
        return cls(self.handler, **self.SMTP_kwargs)


def start_concurrency_server(
    handler: ConcurrencyHandler,
    *,
    address: str = "127.0.0.1",
    port: int | None = None,
    idle_timeout: float = 30.0,
    tls_context: ssl.SSLContext | None = None,
) -> Controller:
    """Start the server (LMTP when ``handler.lmtp``) on ``address`` (a loopback one) and
    ``port`` (by default a free one), in plain text, without AUTH; it hangs up on a client
    silent for ``idle_timeout`` seconds (aiosmtpd closes without a word, as a server whose
    idle timer fires may). With a server ``tls_context`` it offers STARTTLS (RFC 3207).

    Returns:
        The running controller; the caller stops it.
    """
    extra: dict[str, Any] = {}
    if tls_context is not None:
        extra = {"tls_context": tls_context, "require_starttls": False}
    controller = _Controller(
        handler,
        hostname=address,
        port=port if port is not None else free_port(),
        server_hostname=HOSTNAME,
        enable_SMTPUTF8=True,
        decode_data=False,
        timeout=idle_timeout,
        **extra,
    )
    controller.start()
    return controller
