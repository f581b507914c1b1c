"""The sans-I/O SMTP/LMTP client connection.

Rules and theory of operation:

* Three verbs, as in h11: :meth:`ClientConnection.send` turns a command into the
  bytes to write; :meth:`~ClientConnection.receive_data` takes bytes read from
  the server (``b""`` for end of file); :meth:`~ClientConnection.next_event`
  returns the next :mod:`event <mailrelay.protocol.events>` or :data:`NEED_DATA`.
  Nothing here blocks, reads a clock or touches a socket.
* Two batch forms do the same for a pipelined group at less cost per command:
  :meth:`~ClientConnection.send_group` (``send()`` of each, joined) and
  :meth:`~ClientConnection.next_replies` (the plain replies to commands in flight,
  without building events; it leaves anything else, such as a 421, to ``next_event()``).
* Which command may be sent when, and what each reply does, is looked up in
  :mod:`mailrelay.protocol.transitions`; this module only applies the tables.
* Replies are matched first in, first out to the commands awaiting them
  (RFC 2920 §3.1), including LMTP's one final reply per accepted recipient
  after the data (RFC 2033 §4.2): the connection sees the ``RCPT`` replies, so it
  knows who was accepted and how many replies the end of the data will get.
* The connection records facts and makes no policy: it does not fall back to
  HELO, decide to use STARTTLS, retry or interpret a refusal. It checks that
  PIPELINING was announced before letting commands overlap, but not that other
  extensions (CHUNKING, AUTH, ...) were; that is the dialogue's business.
* Errors: a command that is illegal now, or cannot be encoded, raises
  :class:`~mailrelay.errors.LocalProtocolError`; malformed, oversized,
  unexpected or injected server bytes raise
  :class:`~mailrelay.errors.RemoteProtocolError`. Either moves the connection
  to ``State.ERROR`` for good: every later call raises again.
* A 421 reply to anything (RFC 5321 §3.8) is delivered as usual and then moves
  the connection to ``State.CLOSING``: nothing more may be sent, and only the
  end of file (or replies to commands already in flight) is expected. A 421 that
  arrives while no command awaits a reply is a :class:`ServiceClosing` event.
* STARTTLS (RFC 3207 §4.2): after its 220 the connection is in
  ``State.TLS_PENDING``; a byte received before :meth:`tls_established` is a
  response-injection attempt and a ``RemoteProtocolError``. After TLS the
  extensions are forgotten and a new EHLO is needed before MAIL.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Final, NoReturn

from mailrelay.address import Address
from mailrelay.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from mailrelay.protocol.commands import (
    Bdat,
    Command,
    DataChunk,
    EndOfData,
    RcptTo,
)
from mailrelay.protocol.data import DotStuffer
from mailrelay.protocol.events import (
    NEED_DATA,
    ConnectionClosed,
    Event,
    Greeting,
    LMTPResponse,
    NeedData,
    Response,
    ServiceClosing,
)
from mailrelay.protocol.extensions import Extensions
from mailrelay.protocol.reader import (
    DEFAULT_MAX_LINE_LENGTH,
    DEFAULT_MAX_REPLY_LENGTH,
    ReplyReader,
)
from mailrelay.protocol.transitions import (
    CLOSING_CODE,
    GREETING,
    LMTP_ONLY,
    ON_421,
    ON_EOF,
    ON_ERROR,
    ON_TLS_ESTABLISHED,
    PIPELINE_CONTINUES,
    PIPELINE_JOINS,
    REPLY,
    SEND,
    SMTP_ONLY,
    State,
    reply_kind,
)
from mailrelay.reply import Reply

__all__ = ["ClientConnection"]

_FINAL_DATA: Final = frozenset({"END-OF-DATA", "BDAT-LAST"})
# Members read on every command and every read. In CPython 3.11 ``State.X`` costs about
# 100 ns (EnumType defines __getattr__, so each class attribute read takes the slow
# lookup hook); a module global costs a few.
_ERROR: Final = State.ERROR
_DATA: Final = State.DATA
# States in which a reply is matched to the oldest command in flight.
_MATCHING: Final = frozenset(State) - {
    State.GREETING,
    State.TLS_PENDING,
    State.CLOSED,
    State.ERROR,
}
# REPLY keyed by the reply's first digit instead of its ReplyKind.
_REPLY_BY_CLASS: Final = {
    (state, kind, digit): target
    for (state, kind, reply), target in REPLY.items()
    for digit in range(2, 6)
    if reply_kind(digit * 100) is reply
}
# The command kinds whose replies _match() records something about.
_RECORDED: Final = frozenset({"RCPT", "MAIL", "RSET", "EHLO", "LHLO", "HELO"})
_SMTP_SEND: Final = {key: state for key, state in SEND.items() if key[1] not in LMTP_ONLY}
_LMTP_SEND: Final = {key: state for key, state in SEND.items() if key[1] not in SMTP_ONLY}


def command_kind(command: Command) -> str:
    """The key of ``command`` in the transition tables: its verb, or ``BDAT-LAST``."""
    if type(command) is Bdat and command.last:
        return "BDAT-LAST"
    return command.verb


class ClientConnection:
    """One client side of an SMTP or LMTP conversation, without I/O.

    Args:
        lmtp: speak LMTP (RFC 2033): LHLO instead of EHLO/HELO, and one final
            reply per accepted recipient after the message data.
        max_line_length: the longest reply line accepted, in octets.
        max_reply_length: the longest (multi-line) reply accepted, in octets.

    Attributes:
        extensions: what the last accepted EHLO/LHLO announced; None before it,
            after HELO, and after TLS is established.
        tls: whether :meth:`tls_established` was called.
    """

    __slots__ = (
        "_accepted",
        "_eof",
        "_error",
        "_lmtp",
        "_owed",
        "_pending",
        "_reader",
        "_replies",
        "_send_table",
        "_serial",
        "_state",
        "_stuffer",
        "extensions",
        "tls",
    )

    def __init__(
        self,
        *,
        lmtp: bool = False,
        max_line_length: int = DEFAULT_MAX_LINE_LENGTH,
        max_reply_length: int = DEFAULT_MAX_REPLY_LENGTH,
    ) -> None:
        self._lmtp = lmtp
        self.extensions: Extensions | None = None
        self.tls = False
        self._state = State.GREETING
        self._reader = ReplyReader(
            max_line_length=max_line_length, max_reply_length=max_reply_length
        )
        # The reader's queue of parsed replies, read directly on the hot path.
        self._replies = self._reader.replies
        self._send_table = _LMTP_SEND if lmtp else _SMTP_SEND
        # Commands awaiting replies, oldest first, each with the serial number
        # of the mail transaction it was sent in.
        self._pending: deque[tuple[Command, str, int]] = deque()
        self._serial = 0
        self._stuffer = DotStuffer()
        # LMTP bookkeeping, in reply order: RCPTs accepted in the transaction
        # whose replies are being read, and recipients still owed a final reply.
        self._accepted: list[RcptTo] = []
        self._owed: deque[RcptTo] | None = None
        self._eof = False
        self._error: ProtocolError | None = None

    # -- state ---------------------------------------------------------------------------

    @property
    def lmtp(self) -> bool:
        """Whether this is an LMTP connection (fixed at construction)."""
        return self._lmtp

    @property
    def state(self) -> State:
        """The connection's current :class:`State`."""
        return self._state

    @property
    def pending(self) -> tuple[Command, ...]:
        """Commands sent and still awaiting their reply, oldest first."""
        return tuple(entry[0] for entry in self._pending)

    @property
    def has_unread(self) -> bool:
        """Whether bytes have been received that no event has consumed yet (a reply, part
        of one, or an error to report). With nothing in :attr:`pending`, anything here was
        sent unasked."""
        # The reader's has_data, read in place: the dialogue asks after every DATA's 354.
        reader = self._reader
        return bool(self._replies or reader._buffer or reader._lines or reader.error)

    @property
    def replies_ready(self) -> int:
        """How many complete replies have been received and not taken yet (by
        :meth:`next_event` or :meth:`next_replies`)."""
        return len(self._replies)

    def abandon_data(self) -> None:
        """Record that the message data could not be written to its end (a write failed).

        A server may answer before the end of the data (a size limit, a content filter)
        and close the connection (RFC 5321 §3.8); the client then meets a closed connection
        before it has sent the terminator. The reply it received meanwhile answers the
        message as a whole, as the reply to the end of the data would: in ``State.DATA``
        (the terminator not sent) the end of the data is recorded as sent and awaiting its
        reply, with nothing to write. Elsewhere nothing changes: the terminator, or the
        BDAT chunk (RFC 3030 §2), already awaits its reply.

        Raises:
            LocalProtocolError: the connection is in ``State.ERROR``.
        """
        self._check_usable()
        if self._state is _DATA:
            self.send(EndOfData())  # the bytes are never written: only the bookkeeping

    @property
    def accepted_recipients(self) -> tuple[Address, ...]:
        """Recipients whose RCPT got a 2xx in the transaction being answered (LMTP bookkeeping)."""
        return tuple(rcpt.recipient for rcpt in self._accepted)

    def _fail(self, exc: ProtocolError) -> None:
        self._state = ON_ERROR
        self._error = exc

    def _check_usable(self) -> None:
        if self._state is State.ERROR:
            raise LocalProtocolError(
                f"the connection is in the ERROR state after: {self._error}"
            ) from self._error

    # -- sending -------------------------------------------------------------------------

    def send(self, command: Command) -> bytes:
        """Return the bytes that send ``command`` now.

        Raises:
            LocalProtocolError: the command is not allowed in the current state,
                would overlap a command in flight without PIPELINING, or cannot be
                encoded (e.g. a non-ASCII address without SMTPUTF8). The
                connection is then in ``State.ERROR``.
        """
        kind = command.verb
        if kind == "BDAT" and isinstance(command, Bdat) and command.last:
            kind = "BDAT-LAST"
        new_state = self._send_table.get((self._state, kind))
        pending = self._pending
        if new_state is None or (
            # RFC 2920 §3.1: only the newest command in flight can be one that
            # must end a group, so checking it suffices (see _refuse).
            pending
            and not (
                self._pipelining and pending[-1][1] in PIPELINE_CONTINUES and kind in PIPELINE_JOINS
            )
        ):
            self._refuse(kind)
        if kind == "DATA-CHUNK":
            assert isinstance(command, DataChunk)
            if command.stuffed:
                return self._stuffed(command.data)
            return self._stuffer.chunk(command.data)
        if kind == "END-OF-DATA":
            data = self._stuffer.end()
        else:
            try:
                data = command.encode()
            except LocalProtocolError as exc:
                self._fail(exc)
                raise
            if kind == "MAIL":
                self._serial += 1
        pending.append((command, kind, self._serial))
        self._state = new_state
        return data

    def send_group(self, commands: Iterable[Command]) -> bytes:
        """Return the bytes that send ``commands`` now, one after the other.

        Exactly what joining :meth:`send` of each gives, with the same checks, the same
        errors and the same state afterwards, for less work per command: one call for a
        whole pipelined group (RFC 2920 §3.1: ``MAIL``, every ``RCPT`` and ``DATA`` in
        one write). A command that is refused leaves the ones before it sent (in flight)
        and the connection in ``State.ERROR``, as with :meth:`send`.

        Raises:
            LocalProtocolError: as :meth:`send`, for the first command that cannot be sent.
        """
        table = self._send_table
        pending = self._pending
        append = pending.append
        extensions = self.extensions
        pipelining = extensions is not None and extensions.pipelining  # _pipelining, inlined
        state = self._state
        pieces: list[bytes] = []
        for command in commands:
            kind = command.verb
            if kind == "BDAT":
                self._state = state
                pieces.append(self.send(command))
                state = self._state
                continue
            new_state = table.get((state, kind))
            if new_state is None or (
                # The same rule as in send(): see there.
                pending
                and not (
                    pipelining and pending[-1][1] in PIPELINE_CONTINUES and kind in PIPELINE_JOINS
                )
            ):
                self._state = state
                self._refuse(kind)
            if kind == "DATA-CHUNK":
                # As in send(): no reply awaited, no change of state.
                assert isinstance(command, DataChunk)
                if command.stuffed:
                    self._state = state
                    pieces.append(self._stuffed(command.data))
                else:
                    pieces.append(self._stuffer.chunk(command.data))
                continue
            if kind == "END-OF-DATA":
                data = self._stuffer.end()
            else:
                try:
                    data = command.encode()
                except LocalProtocolError as exc:
                    self._state = state
                    self._fail(exc)
                    raise
            if kind == "MAIL":
                self._serial += 1
            append((command, kind, self._serial))
            state = new_state
            pieces.append(data)
        self._state = state
        return b"".join(pieces)

    def _stuffed(self, data: bytes) -> bytes:
        try:
            return self._stuffer.stuffed(data)
        except ValueError as exc:
            error = LocalProtocolError(f"cannot send wire-form data here: {exc}")
            self._fail(error)
            raise error from None

    @property
    def _pipelining(self) -> bool:
        extensions = self.extensions
        return extensions is not None and extensions.pipelining

    def _refuse(self, kind: str) -> NoReturn:
        """Raise the LocalProtocolError that explains why ``kind`` cannot be sent now."""
        self._check_usable()
        state = self._state
        exc: LocalProtocolError
        if self.lmtp and kind in SMTP_ONLY:
            exc = LocalProtocolError(f"an LMTP connection sends LHLO, not {kind}")
        elif not self.lmtp and kind in LMTP_ONLY:
            exc = LocalProtocolError("LHLO is for LMTP connections only")
        elif (state, kind) not in SEND:
            exc = LocalProtocolError(f"cannot send {kind} in state {state.name}")
        elif not self._pipelining:
            exc = LocalProtocolError(
                f"cannot send {kind} before the reply to {self._pending[-1][1]}: "
                "the server did not announce PIPELINING"
            )
        elif kind not in PIPELINE_JOINS:
            exc = LocalProtocolError(f"{kind} cannot be pipelined (RFC 2920 §3.1)")
        else:
            exc = LocalProtocolError(
                f"nothing may follow {self._pending[-1][1]} before its reply (RFC 2920 §3.1)"
            )
        self._fail(exc)
        raise exc

    def tls_established(self) -> None:
        """Tell the connection that the TLS handshake after STARTTLS's 220 succeeded.

        Raises:
            LocalProtocolError: not in ``State.TLS_PENDING``.
            RemoteProtocolError: bytes arrived between the 220 and the handshake
                (RFC 3207 §4.2 / response injection); they must not be trusted.
        """
        self._check_usable()
        if self._state is not State.TLS_PENDING:
            exc: ProtocolError = LocalProtocolError(
                f"tls_established() in state {self._state.name}, expected TLS_PENDING"
            )
            self._fail(exc)
            raise exc
        if self._reader.has_data:
            exc = _injection_error()
            self._fail(exc)
            raise exc
        # RFC 3207 §4.2: forget everything learnt before TLS; EHLO again.
        self.extensions = None
        self.tls = True
        self._state = ON_TLS_ESTABLISHED[self._state]

    # -- receiving -----------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the server; ``b""`` means the server closed the connection.

        Raises:
            LocalProtocolError: data after the end of file, or the connection is in ERROR.
        """
        if self._state is _ERROR:
            self._check_usable()
        if self._eof:
            if data:
                exc = LocalProtocolError("receive_data() after the end of file")
                self._fail(exc)
                raise exc
            return
        if not data:
            self._eof = True
            return
        self._reader.feed(data)

    def next_event(self) -> Event | NeedData:
        """The next event, or :data:`NEED_DATA` when more bytes are needed.

        Raises:
            RemoteProtocolError: the server sent something malformed, oversized,
                unexpected or injected; the connection is then in ``State.ERROR``.
            LocalProtocolError: the connection was already in ``State.ERROR``
                because of a local error.
        """
        # Hot path: a reply is ready and a command awaits it.
        if self._replies:
            if self._pending and self._state in _MATCHING:
                return self._response(self._replies.popleft())
        elif self._state in _MATCHING and not self._eof and self._reader.error is None:
            # The other hot path, before every read: no reply is ready (what _next_event()
            # finds after asking the reader, in these states).
            return NEED_DATA
        if self._state is State.ERROR:
            if isinstance(self._error, RemoteProtocolError):
                raise RemoteProtocolError(
                    f"the connection is in the ERROR state after: {self._error}"
                ) from self._error
            self._check_usable()
        try:
            return self._next_event()
        except RemoteProtocolError as exc:
            self._fail(exc)
            raise

    def _next_event(self) -> Event | NeedData:
        state = self._state
        reader = self._reader
        if state is State.TLS_PENDING:
            if reader.has_data:
                raise _injection_error()
            if self._eof:
                return self._closed()
            return NEED_DATA
        if state is State.CLOSED:
            return self._closed()
        reply = reader.pop()
        if reply is None:
            # An unfinished line while no reply is expected is judged once it is
            # complete: it may be an unsolicited 421 (RFC 5321 §3.8).
            if self._eof:
                return self._closed()
            return NEED_DATA
        if state is State.GREETING:
            if reply.code == CLOSING_CODE:
                self._state = ON_421
            else:
                self._state = REPLY[state, GREETING, reply_kind(reply.code)]
            return Greeting(reply=reply)
        if not self._pending:
            if reply.code == CLOSING_CODE:
                # RFC 5321 §3.8: a server may announce shutdown at any time.
                self._state = ON_421
                return ServiceClosing(reply=reply)
            raise RemoteProtocolError(f"unexpected reply while no command awaits one: {reply}")
        return self._response(reply)

    def next_replies(self, limit: int) -> list[Reply]:
        """Up to ``limit`` replies that are ready, each matched to the command awaiting it.

        The replies that :meth:`next_event` would give, in order, as
        :class:`~mailrelay.protocol.events.Response` events, with the same effect on the
        connection, but without building the events: the fast way to read the replies to
        a pipelined group. It stops short (possibly at none) where :meth:`next_event` is
        needed: no complete reply is buffered, no command awaits one, the reply is a 421
        (RFC 5321 §3.8) or an LMTP final reply, or the connection is not reading replies
        to commands (greeting, STARTTLS, closed, error). It never raises: a malformed
        reply waits for :meth:`next_event` too.
        """
        replies = self._replies
        if not replies:
            return []  # the usual answer before each read
        taken: list[Reply] = []
        pending = self._pending
        lmtp = self._lmtp
        # _match() inlined (keep the two alike): this loop takes nearly every reply of a
        # pipelined session, and a call per reply is a good part of the cost of one.
        while replies and pending and len(taken) < limit and self._state in _MATCHING:
            reply = replies[0]
            code = reply.code
            if code == CLOSING_CODE or (lmtp and pending[0][1] in _FINAL_DATA):
                break
            replies.popleft()
            command, kind, serial = pending.popleft()
            if kind not in _RECORDED:
                pass
            elif kind == "RCPT":
                if code < 300:
                    assert isinstance(command, RcptTo)
                    self._accepted.append(command)
            elif kind in ("MAIL", "RSET"):
                self._accepted = []
            elif kind in ("EHLO", "LHLO"):
                if code < 300:
                    self.extensions = Extensions.parse(reply.lines)
            elif kind == "HELO" and code < 300:
                self.extensions = None
            if serial == self._serial:  # (never a 421 here: see above)
                new_state = _REPLY_BY_CLASS.get((self._state, kind, code // 100))
                if new_state is not None:
                    if new_state is _DATA:
                        self._stuffer.reset()
                    self._state = new_state
            taken.append(reply)
        return taken

    def _response(self, reply: Reply) -> Event:
        pending = self._pending
        command, kind, serial = pending[0]
        if kind in _FINAL_DATA and self._lmtp:
            event = self._lmtp_response(command, reply)
            self._after_reply(kind, serial, reply.code)
            return event
        return Response(command=self._match(reply), reply=reply)

    def _match(self, reply: Reply) -> Command:
        """Take the oldest command in flight as answered by ``reply`` (not an LMTP final
        reply); record what the reply tells; return the command. (next_replies() has its
        own copy of this: keep the two alike.)"""
        command, kind, serial = self._pending.popleft()
        code = reply.code
        if kind not in _RECORDED:
            pass  # DATA, the end of the data, ...: nothing to record (half the replies)
        elif kind == "RCPT":
            if code < 300:
                assert isinstance(command, RcptTo)
                self._accepted.append(command)
        elif kind in ("MAIL", "RSET"):
            self._accepted = []
        elif kind in ("EHLO", "LHLO"):
            if code < 300:
                self.extensions = Extensions.parse(reply.lines)
        elif kind == "HELO" and code < 300:
            self.extensions = None
        # Inlined _after_reply(): this is the hot path of every reply.
        if code == CLOSING_CODE:
            self._state = ON_421
        elif serial == self._serial:
            new_state = _REPLY_BY_CLASS.get((self._state, kind, code // 100))
            if new_state is not None:
                if new_state is _DATA:
                    # A new message's data begins (reset, not a new stuffer: every message).
                    self._stuffer.reset()
                self._state = new_state
        return command

    def _after_reply(self, kind: str, serial: int, code: int) -> None:
        """The state a reply leads to (the code of 421, or the REPLY table when the reply
        belongs to the current transaction)."""
        if code == CLOSING_CODE:
            self._state = ON_421
        elif serial == self._serial:
            new_state = _REPLY_BY_CLASS.get((self._state, kind, code // 100))
            if new_state is not None:
                if new_state is _DATA:
                    self._stuffer.reset()
                self._state = new_state

    def _lmtp_response(self, command: Command, reply: Reply) -> Event:
        # RFC 2033 §4.2: one reply per RCPT that got a 2xx, in RCPT order.
        owed = self._owed
        if owed is None:
            owed = self._owed = deque(self._accepted)
            self._accepted = []
        event: Event
        if owed:
            rcpt = owed.popleft()
            assert isinstance(command, EndOfData | Bdat)
            event = LMTPResponse(command=command, recipient=rcpt.recipient, reply=reply)
        else:
            # No recipient was accepted yet the data was taken: one reply.
            event = Response(command=command, reply=reply)
        if not owed:
            self._owed = None
            self._pending.popleft()
        return event

    def _closed(self) -> ConnectionClosed:
        self._state = ON_EOF
        unanswered: tuple[Address, ...] = ()
        if self.lmtp and self._pending and self._pending[0][1] in _FINAL_DATA:
            owed = self._owed if self._owed is not None else self._accepted
            unanswered = tuple(rcpt.recipient for rcpt in owed)
        return ConnectionClosed(pending=self.pending, unanswered=unanswered)


def _injection_error() -> RemoteProtocolError:
    return RemoteProtocolError(
        "the server sent data after STARTTLS's 220 and before the TLS handshake "
        "(RFC 3207 §4.2; possible response injection)"
    )
