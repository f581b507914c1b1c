"""The :class:`Session` itself: the opening, transaction and batch steps, plus RSET, NOOP
and QUIT between messages.

Rules: each public step runs guarded (anything escaping it marks the session dead); NOOP
never raises for the server's sake. No I/O here: only requests.
"""

from __future__ import annotations

from mailrelay.errors import (
    LocalProtocolError,
    ServerProtocolError,
)
from mailrelay.flow.batch import _Batch
from mailrelay.flow.bookkeeping import (
    _SessionClosed,
)
from mailrelay.flow.core import log
from mailrelay.flow.requests import Step
from mailrelay.protocol import (
    ConnectionClosed,
    Noop,
    Quit,
)


class Session(_Batch):
    """One SMTP/LMTP session over one connection, as generator steps (see the module docs).

    Attributes:
        config: the configuration.
        encrypted: whether the connection is protected by TLS (implicit or after STARTTLS).
        authenticated: whether AUTH succeeded.
        auth_refusal: after :meth:`open` with a renewable password, the refusal that
            :meth:`retry_authentication` may answer with a fresh one; else ``None``.
        closed: whether the session is over (QUIT sent, 421 received, or the connection lost).
        greeting: the server's greeting, once read.
        transactions: how many mail transactions (MAIL commands) the session has begun,
            probes included: what a server's ``LIMITS MAILMAX`` (RFC 9422) counts.
    """

    # -- between messages ----------------------------------------------------------------------

    def reset(self) -> Step[None]:
        """RSET: abandon any transaction in progress.

        Raises:
            SessionRefused: the server answered 421 (or announced it with its reply).
            ConnectionLost: the connection ended.
            ServerProtocolError: the server sent more replies than RSET asked for (the
                session is closed: they would answer the next commands).
        """
        return (yield from self._guarded(self._reset()))

    def _reset(self) -> Step[None]:
        self._ensure_open()
        try:
            yield from self._rset()
        except _SessionClosed as closed:
            raise self._refuse(closed.reply, "in answer to RSET") from None
        unasked = yield from self._close_if_unsolicited("after RSET")
        if unasked is not None:
            raise unasked

    def noop(self) -> Step[bool]:
        """NOOP, as a health check: ``True`` when the server answered 250.

        A dead session (421, EOF, protocol error) gives ``False`` and is closed; this step
        never raises for the server's sake.
        """
        return (yield from self._guarded(self._noop()))

    def _noop(self) -> Step[bool]:
        if self.closed:
            return False
        try:
            yield from self._write(Noop(), phase="greeting")
            reply = yield from self._reply("greeting")
        except (_SessionClosed, ServerProtocolError, LocalProtocolError):
            # LocalProtocolError: an earlier step was cut short (a driver's timeout, say) and
            # left the connection where NOOP is not allowed: the session is unusable.
            yield from self._closed()
            return False
        # A second reply with NOOP's would answer the next command: not healthy.
        unasked = yield from self._close_if_unsolicited("after NOOP")
        return reply.is_positive and unasked is None

    def quit(self) -> Step[None]:
        """QUIT, read the reply (an end of file instead is fine), and close."""
        return (yield from self._guarded(self._quit()))

    def _quit(self) -> Step[None]:
        if self.closed:
            return
        try:
            yield from self._write(Quit(), phase="quit")
            event = yield from self._event("quit")
            if isinstance(event, ConnectionClosed):
                log.debug("the server closed the connection without answering QUIT")
        except (ServerProtocolError, LocalProtocolError):
            pass  # the connection is unusable; closing is all that is left
        yield from self._closed()
