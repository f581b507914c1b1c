"""aiosmtpd servers that count connections and QUITs, for the pool and MX reuse tests.

:class:`CountingHandler` is the suite's :class:`~tests.peers.aiosmtpd_server.RecordingHandler`
plus three facts the pool tests assert on: how many connections greeted us with EHLO/LHLO
(one aiosmtpd protocol object per TCP connection, kept across STARTTLS), how many QUITs
arrived, and, with ``quit_barrier=n``, whether ``n`` QUITs were all in flight at once: each
QUIT's reply waits (bounded) until the ``n``-th QUIT has arrived, so a client that QUITs its
connections one after the other misses the barrier, and one that QUITs them together meets it.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.peers.aiosmtpd_server import HOSTNAME, RecordingHandler
from tests.peers.scripted import free_port

#: How long a QUIT waits for the others before the barrier counts as missed.
BARRIER_WAIT = 3.0


class CountingHandler(RecordingHandler):
    """Records transactions, counts connections and QUITs; optionally a QUIT barrier.

    Args:
        lmtp: answer DATA per recipient (RFC 2033 §4.2).
        quit_barrier: hold every QUIT's reply until this many QUITs have arrived (0: none).
    """

    def __init__(self, *, lmtp: bool = False, quit_barrier: int = 0) -> None:
        super().__init__(lmtp=lmtp)
        self.connections: list[SMTP] = []
        """One entry per connection that sent EHLO/LHLO, in order."""
        self.quits = 0
        """QUIT commands received."""
        self.rsets = 0
        """RSET commands received."""
        self.quit_barrier = quit_barrier
        self.barrier_missed = False
        """Whether a QUIT gave up waiting for the others (they were not sent together)."""
        self._all_quit: asyncio.Event | None = None

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: Any
    ) -> Any:
        """Count the connection (once, though EHLO comes again after STARTTLS)."""
        session.host_name = hostname  # what aiosmtpd does itself when there is no hook
        if not any(seen is server for seen in self.connections):
            self.connections.append(server)
        return responses

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Count RSETs."""
        self.rsets += 1
        return "250 2.0.0 OK"

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Count the QUIT; with a barrier, answer only once every expected QUIT arrived."""
        self.quits += 1
        if self.quit_barrier:
            if self._all_quit is None:
                self._all_quit = asyncio.Event()
            if self.quits >= self.quit_barrier:
                self._all_quit.set()
            try:
                await asyncio.wait_for(self._all_quit.wait(), BARRIER_WAIT)
            except TimeoutError:
                self.barrier_missed = True
        return "221 2.0.0 Bye"


class _LMTPController(Controller):
    def factory(self) -> SMTP:
        return LMTP(self.handler, **self.SMTP_kwargs)


def start_counting(
    handler: CountingHandler,
    *,
    address: str = "127.0.0.1",
    port: int | None = None,
    tls_context: ssl.SSLContext | None = None,
) -> Controller:
    """Start an aiosmtpd server (LMTP when ``handler.lmtp``) on ``address``; no AUTH, and
    STARTTLS only when given a server ``tls_context``.

    Returns:
        The running controller; the caller stops it.
    """
    cls = _LMTPController if handler.lmtp else Controller
    extra: dict[str, Any] = {} if tls_context is None else {"tls_context": tls_context}
    controller = cls(
        handler,
        hostname=address,
        port=port if port is not None else free_port(),
        server_hostname=HOSTNAME,
        enable_SMTPUTF8=True,
        decode_data=False,
        timeout=10,
        require_starttls=False,
        **extra,
    )
    controller.start()
    return controller
