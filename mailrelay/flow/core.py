"""The session's state and the low-level steps every part of the dialogue uses.

Rules: every write goes through ``_write`` (which traces it, credentials redacted, to the
``mailrelay.flow`` logger) and every reply through ``_reply``/``_event``; 421 and end of file
end the session (RFC 5321 §3.8) by raising ``_SessionClosed`` after yielding one
:class:`~mailrelay.flow.Close`. No I/O here: only requests are yielded.
"""

from __future__ import annotations

import logging

from mailrelay._shown import Shown
from mailrelay.address import Address
from mailrelay.envelope import Envelope
from mailrelay.errors import (
    ConnectionLost,
    DeliveryError,
    ProtocolError,
    RemoteProtocolError,
    ServerProtocolError,
    SessionRefused,
)
from mailrelay.flow.bookkeeping import (
    _SessionClosed,
)
from mailrelay.flow.config import SessionConfig
from mailrelay.flow.requests import _T, Close, Step, Write, _read_request
from mailrelay.message import Message
from mailrelay.options import TLS
from mailrelay.protocol import (
    NEED_DATA,
    Auth,
    AuthContinue,
    Bdat,
    ClientConnection,
    Command,
    ConnectionClosed,
    DataChunk,
    EndOfData,
    Event,
    Extensions,
    Greeting,
    LMTPResponse,
    MailFrom,
    Quit,
    RcptTo,
    Response,
    Rset,
    ServiceClosing,
)
from mailrelay.protocol.sasl import Mechanism
from mailrelay.reply import EnhancedStatus, Reply

# The ``mailrelay.flow`` logger, whichever module of the package writes the trace.
log = logging.getLogger("mailrelay.flow")

_NO_EXTENSIONS = Extensions.parse(())
# The most Reads _leftovers() asks for (the drivers keep at most 4 reads' worth).
_LEFTOVER_READS = 8


def _trace(command: Command, data: bytes) -> str:
    """The wire trace of one write, with credentials redacted."""
    if isinstance(command, Auth):
        return f"AUTH {command.mechanism}" + (" <redacted>" if command.initial_response else "")
    if isinstance(command, AuthContinue):
        return "<redacted SASL response>"
    if isinstance(command, DataChunk | Bdat):
        return f"<{len(data)} bytes of message data>"
    return data.decode("utf-8", "replace").rstrip("\r\n")


class _SessionCore:
    """The state of a :class:`~mailrelay.flow.Session` and the steps every other part uses:
    writing commands, reading replies, noticing the end of the session, RSET."""

    def __init__(self, config: SessionConfig) -> None:
        self.config = config
        self.encrypted = config.tls is TLS.IMPLICIT
        self.authenticated = False
        self.closed = False
        self.greeting: Reply | None = None
        #: How many mail transactions (MAIL commands) this session has begun: what a
        #: server's LIMITS MAILMAX (RFC 9422) counts.
        self.transactions = 0
        #: How many results this session gave with recipients it never offered the server
        #: (:func:`~mailrelay.flow.bookkeeping.unsent_positions`: MAILMAX reached, the
        #: session ended, refused as one too many): a transport that sees it grow sends
        #: those recipients on another connection.
        self.left_unsent = 0
        self._conn = ClientConnection(lmtp=config.lmtp)
        self._needs_rset = False
        self._extensions: Extensions | None = None
        # Whether a RCPT was refused as one too many since deliver_many began (its
        # recipients are then sent in further transactions once the batch is done).
        self._too_many_seen = False
        # Whether the session has said (once) that the server drops the envelopes' DSN
        # requests (it does not offer DSN, RFC 3461).
        self._dsn_dropped_said = False
        # Whether EHLO may still be sent again for what AUTH unlocks: set by a successful
        # AUTH, cleared by that EHLO (once a session; see _Opening._hello_after_auth).
        self._hello_after_auth_due = False
        # The SASL mechanism and password of the successful AUTH (for _authenticate_again).
        self._login: tuple[Mechanism, str] | None = None
        # Whether a message was refused before sending only because some of its recipients
        # need SMTPUTF8 (set by _prepared; the caller then sends to the others).
        self._apart_seen = False
        # Whether deliver_many sends each message alone (a server that mishandles pipelining
        # across messages; see _Opening._open).
        self._each_alone = False
        # What ended the session in (or right after) a transaction whose answers were kept
        # (_Delivery._attempt), and what cut a message's parts short (_Delivery._in_parts):
        # a batch reports the latter as its error.
        self._closing_error: DeliveryError | None = None
        self._ended_by: DeliveryError | None = None
        # The last small message sent by DATA, and its wire form (stuffed) and terminator.
        self._last_data: tuple[Message, tuple[DataChunk, EndOfData]] | None = None
        self._last_message: (
            tuple[
                Message,
                Envelope,
                Extensions,
                str | None,
                tuple[str, EnhancedStatus] | None,
                tuple[Address, ...],
            ]
            | None
        ) = None
        self._last_commands: (
            tuple[Envelope, Extensions, tuple[int, str | None, bool], MailFrom, list[RcptTo]] | None
        ) = None

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Session {self.config.server_hostname} {state} encrypted={self.encrypted}>"

    @property
    def extensions(self) -> Extensions:
        """What the server offered in its last EHLO/LHLO reply (nothing after HELO)."""
        return self._extensions if self._extensions is not None else _NO_EXTENSIONS

    @property
    def unanswered(self) -> tuple[Command, ...]:
        """The commands sent and not answered yet, oldest first; once the session has ended,
        those the server never answered (a pool reads it to tell whether a lost reply was a
        message's final one)."""
        return self._conn.pending

    # -- low-level helpers ---------------------------------------------------------------------

    def _write(self, *commands: Command, phase: str) -> Step[None]:
        """Send commands in one write."""
        pieces = []
        for command in commands:
            data = self._conn.send(command)
            if log.isEnabledFor(logging.DEBUG):
                log.debug(">>> %s", _trace(command, data))
            pieces.append(data)
        data = b"".join(pieces)
        if data:
            yield Write(data=data, phase=phase)

    def _event(self, phase: str) -> Step[Event]:
        """The next event from the connection, reading as needed (one deadline for the
        whole wait: a read after bytes that did not complete the event resumes it)."""
        resume = False
        while True:
            try:
                event = self._conn.next_event()
                if event is NEED_DATA:
                    data = yield _read_request(phase, resume)
                    self._conn.receive_data(data if data is not None else b"")
                    resume = True
                    continue
            except RemoteProtocolError as exc:
                yield from self._closed()
                raise ServerProtocolError(
                    f"the server broke the protocol: {exc}", host=self.config.peer
                ) from exc
            if isinstance(
                event, Greeting | Response | LMTPResponse | ServiceClosing
            ) and log.isEnabledFor(logging.DEBUG):
                log.debug("<<< %s", Shown(event.reply))
            return event

    def _reply(self, phase: str) -> Step[Reply]:
        """The reply to the oldest pending command; 421 and EOF raise ``_SessionClosed``."""
        event = yield from self._event(phase)
        reply = yield from self._check_closing(event)
        return reply

    def _sole_reply(self, phase: str, verb: str) -> Step[Reply]:
        """The reply to the one command in flight, without pipelining (see
        :meth:`_nothing_more`)."""
        reply = yield from self._reply(phase)
        yield from self._nothing_more(verb)
        return reply

    def _nothing_more(self, verb: str) -> Step[None]:
        """After the reply to ``verb``, with nothing else in flight: a reply beyond it,
        already received with it, closes the session and raises (see
        :meth:`_close_if_unsolicited`), since it would answer the next command."""
        unasked = yield from self._close_if_unsolicited(f"after {verb}")
        if unasked is not None:
            raise unasked

    def _check_closing(self, event: Event) -> Step[Reply]:
        """The event's reply, unless the server is ending the session (``_SessionClosed``)."""
        if isinstance(event, ConnectionClosed):
            yield from self._closed()
            raise _SessionClosed(None)
        if isinstance(event, ServiceClosing) or event.reply.code == 421:
            # RFC 5321 §3.8: 421 means the server is closing the channel.
            yield from self._closed()
            raise _SessionClosed(event.reply)
        return event.reply

    def _close_if_unsolicited(self, when: str = "between commands") -> Step[DeliveryError | None]:
        """At the end of an exchange, with no command in flight: close the session when the
        server has already sent something nobody asked for. Such a reply (an LMTP server
        answering more often than it accepted recipients, RFC 2033 §4.2) would otherwise be
        taken as the answer to the next command on this connection, and every reply after
        it would answer the wrong command. A 421 announced meanwhile (RFC 5321 §3.8) or an
        end of file closes it too. Only bytes already received can be judged; the results
        of the exchange that just ended stand (its replies came first, in order).

        Returns the error that describes what was found, ``when`` saying where the dialogue
        was (for a step that must fail for it, such as opening the session), or ``None``
        when nothing was."""
        if self.closed or self._conn.pending:
            return None
        try:
            event = self._conn.next_event()
        except ProtocolError as exc:
            log.debug("closing the session: %s", Shown(exc))
            yield from self._closed()
            return ServerProtocolError(
                f"the server broke the protocol {when}: {exc}", host=self.config.peer
            )
        if event is NEED_DATA:
            return None
        log.debug("closing the session: the server sent %r unasked", event)
        yield from self._closed()
        if isinstance(event, ConnectionClosed):
            return self._refuse(None, when)
        if isinstance(event, ServiceClosing):
            return self._refuse(event.reply, when)
        return ServerProtocolError(
            f"the server sent a reply nobody asked for {when}: {event}", host=self.config.peer
        )

    def _leftovers(self) -> Step[bytes]:
        """After an I/O error the driver threw in: what the server had sent and the dialogue
        had not read yet (``b""`` when nothing, or when the connection is simply closed).

        A driver whose write failed keeps what had already arrived (bounded, read without
        waiting) and answers the Reads that follow with it, then with ``b""``; after any
        other error a Read fails at once, and that is taken as nothing. Bounded in reads
        (the driver keeps at most a few reads' worth)."""
        pieces: list[bytes] = []
        for _ in range(_LEFTOVER_READS):
            try:
                data = yield _read_request("data_end")
            except DeliveryError:
                break  # the connection is closed and nothing was kept
            if not data:
                break
            pieces.append(data)
        return b"".join(pieces)

    def _closed(self) -> Step[None]:
        if not self.closed:
            self.closed = True
            yield Close()

    def _refuse(self, reply: Reply | None, what: str) -> DeliveryError:
        """The exception for a session that ended with no per-recipient answer."""
        if reply is None:
            return ConnectionLost(f"the server closed the connection {what}", host=self.config.peer)
        return SessionRefused(
            f"the server closed the session {what}: {reply}", reply=reply, host=self.config.peer
        )

    def _abort(self) -> Step[None]:
        """End the session politely after a local decision to stop: QUIT, then close."""
        if self.closed:
            return
        try:
            yield from self._write(Quit(), phase="quit")
            yield from self._event("quit")
        except (DeliveryError, ProtocolError, _SessionClosed):
            pass  # we are leaving anyway; the server's manners no longer matter
        yield from self._closed()

    def _guarded(self, step: Step[_T]) -> Step[_T]:
        """Run a step; if anything escapes it, the session is dead (its state is unknown)."""
        try:
            return (yield from step)
        except BaseException:
            self.closed = True
            raise

    def _ensure_open(self) -> None:
        if self.closed:
            raise ConnectionLost("the session is closed", host=self.config.peer)

    def _rset_reply(self) -> Step[None]:
        reply = yield from self._reply("greeting")
        if not reply.is_positive and log.isEnabledFor(logging.DEBUG):
            log.debug("RSET refused with %d", reply.code)

    def _rset(self) -> Step[None]:
        yield from self._write(Rset(), phase="greeting")
        # Alone in flight: a reply beyond RSET's would answer the next command (MAIL).
        reply = yield from self._sole_reply("greeting", "RSET")
        if not reply.is_positive:
            log.debug("RSET refused with %d", reply.code)
        self._needs_rset = False
