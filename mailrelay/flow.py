"""The SMTP/ESMTP/LMTP conversation, written once, with no I/O of its own.

Theory of operation
-------------------
A :class:`Session` holds one sans-I/O :class:`~mailrelay.protocol.ClientConnection` and
offers the steps of a session as generator methods: :meth:`Session.open`,
:meth:`Session.deliver`, :meth:`Session.deliver_many`, :meth:`Session.probe`,
:meth:`Session.reset`, :meth:`Session.noop` and :meth:`Session.quit`.
Each generator yields *I/O requests* and its ``return`` value is the step's result. A driver
(blocking sockets or asyncio, in :mod:`mailrelay.transport`) runs a step like this::

    def run(step):
        reply = None
        while True:
            try:
                request = step.send(reply)
            except StopIteration as done:
                return done.value
            if isinstance(request, Write):      # send every byte; reply None
                ...
            elif isinstance(request, Read):     # recv up to 64 KiB; reply the bytes, b"" at EOF
                ...
            elif isinstance(request, StartTLS): # wrap the socket; reply None
                ...                             # on failure: step.throw(exc) instead
            elif isinstance(request, Close):    # close the socket; reply None
                ...

Every :class:`Write` and :class:`Read` names its *phase* (``"greeting"``, ``"mail"``,
``"rcpt"``, ``"data_init"``, ``"data_block"``, ``"data_end"``): the name of the
:class:`~mailrelay.options.Timeouts` field the driver applies (``timeouts.for_phase(phase)``).
Replies to EHLO, HELO, LHLO, STARTTLS, AUTH, RSET, NOOP and QUIT use ``"greeting"``
(RFC 5321 §4.5.3.2 names no limit for them; its 5 minutes are the general one).
A failed TLS handshake is thrown into the generator at its :class:`StartTLS` request; the
generator turns it into :class:`~mailrelay.errors.TLSError`. Any other exception the driver
meets (timeouts, resets) it raises itself, after closing the socket; the session is then dead.

Rules (the RFC sections are cited where they are enforced):

* Greeting: 220 goes on; anything else refuses the session (:class:`SessionRefused`,
  transient for 4xx such as 421, permanent for 554).
* EHLO, falling back to HELO when EHLO is refused with 500, 501, 502, 504 or 550
  (RFC 5321 §4.1.4); LMTP sends LHLO and never falls back (RFC 2033 §4.1). A local host name
  that is an IP address goes out as an address literal (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``,
  RFC 5321 §4.1.3).
* STARTTLS by policy (:class:`~mailrelay.options.TLS`): ``NONE`` never; ``OPPORTUNISTIC`` when
  offered, staying in plain text when not offered or refused — but a handshake that *fails*
  raises a transient :class:`TLSError` (the connection is unusable; the transport may retry in
  plain text); ``STARTTLS`` required raises :class:`TLSError` when not offered or refused;
  ``IMPLICIT`` never sends STARTTLS (the driver has already wrapped the socket). EHLO again
  after TLS (RFC 3207 §4.2).
* AUTH when a user name is configured, never over plain text unless ``allow_insecure_auth``.
  The strongest mechanism both sides offer, unless the caller names its own order; after 534
  "mechanism too weak" (or 504 "not supported") the next one is tried (RFC 4954 §6); other
  refusals raise :class:`AuthenticationError`.
* Per message, refused *before sending* with a PERMANENT result for every recipient and a
  ``reason`` when the server lacks what the message needs: SIZE (RFC 1870 §6), SMTPUTF8
  (RFC 6531 §3.4, for the message or any envelope address), 8BITMIME (RFC 6152 §3; we do not
  re-encode to 7 bit), REQUIRETLS (RFC 8689 §4.1: needs an encrypted connection and the
  server's keyword).
* MAIL, every RCPT and DATA (or the first BDAT chunk, RFC 3030 §4) are sent in one write when
  the server offers PIPELINING and the configuration allows it (RFC 2920 §3.1); later BDAT
  chunks each wait for the previous chunk's reply. A refused MAIL gives every recipient the MAIL
  reply (not the 503s that follow). If every RCPT was refused but DATA still got 354, a lone
  "." ends the empty transaction (RFC 2920 §3.1) and each recipient keeps its own reply.
* Many messages (:meth:`Session.deliver_many`): with PIPELINING, the next message's RSET
  (when needed), MAIL, RCPTs and DATA follow the previous message's data and terminator
  before its final reply is read (RFC 2920 §3.1: message content may start a group), so a
  message costs one round trip; with CHUNKING, whole messages sent as ``BDAT n LAST`` (no
  354 to wait for, RFC 3030 §4) share a bounded window (:data:`WINDOW_MESSAGES`,
  :data:`WINDOW_BYTES`) whose replies are read in order as it fills. Each message's result
  is what :meth:`Session.deliver` would have given it alone; when the session ends early,
  messages without any final answer are handed back (``None``) for the transport to send
  again on a fresh connection.
* :meth:`Session.probe`: MAIL and RCPTs, then RSET, never DATA (recipient callouts).
* Message data comes from ``message.chunks()``: a message up to 1 MiB goes out as one
  :class:`Write` with its terminator (its wire form is kept, so the same message sent to
  the next envelope is not dot-stuffed again); a larger one is streamed, one
  :class:`Write` per chunk, and never held whole. BDAT
  (RFC 3030) is used when the server offers CHUNKING *and* the configuration asks for it
  (``chunking=True``); otherwise DATA.
* LMTP: one final reply per accepted recipient, in RCPT order (RFC 2033 §4.2).
* After a transaction that did not reach its end-of-data reply, RSET is sent before the
  next one (RFC 5321 §4.1.1.5).
* 421 anywhere (and an unexpected end of the connection): the session is closed; recipients
  without a final answer become TRANSIENT. If *no* recipient got a final answer of its own,
  :class:`SessionRefused` (421) or :class:`ConnectionLost` (EOF) is raised instead of a
  result, so that a transport may try another host for the whole message. A driver's error
  (timeout, reset) thrown into a delivery is treated alike: once any recipient has a final
  answer (an LMTP final reply, a refused RCPT), the result keeps it and the rest are
  TRANSIENT, because sending the whole message again would deliver it twice.

Wire traces go to the ``mailrelay.flow`` logger at DEBUG; AUTH lines are redacted.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from typing import TypeAlias, TypeVar, cast

import attrs

from mailrelay.address import Address
from mailrelay.envelope import Envelope
from mailrelay.errors import (
    AuthenticationError,
    ConfigurationError,
    ConnectionLost,
    DeliveryError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    ServerProtocolError,
    SessionRefused,
    TLSError,
)
from mailrelay.message import Message
from mailrelay.options import TLS
from mailrelay.protocol import (
    NEED_DATA,
    Auth,
    AuthAbort,
    AuthContinue,
    Bdat,
    ClientConnection,
    Command,
    ConnectionClosed,
    Data,
    DataChunk,
    DotStuffer,
    Ehlo,
    EndOfData,
    Event,
    Extensions,
    Greeting,
    Helo,
    Lhlo,
    LMTPResponse,
    MailFrom,
    Noop,
    Quit,
    RcptTo,
    Response,
    Rset,
    ServiceClosing,
)
from mailrelay.protocol import StartTLS as StartTLSCommand
from mailrelay.protocol.sasl import Mechanism, candidate_mechanisms
from mailrelay.reply import Reply
from mailrelay.results import DeliveryResult, Outcome, RecipientResult

__all__ = [
    "WINDOW_BYTES",
    "WINDOW_MESSAGES",
    "BatchOutcome",
    "Close",
    "ProbeResult",
    "Read",
    "Request",
    "Session",
    "SessionConfig",
    "StartTLS",
    "Step",
    "Write",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# -- I/O requests ------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Write:
    """Write all of ``data`` to the connection; the driver sends back ``None``.

    Attributes:
        data: the bytes to write (never shown by ``repr``: they may hold credentials).
        phase: the :class:`~mailrelay.options.Timeouts` field that limits the write.
    """

    data: bytes = attrs.field(repr=False)
    phase: str


@attrs.frozen(kw_only=True)
class Read:
    """Read what the server has sent (at least one byte); the driver sends back the bytes,
    or ``b""`` at end of file.

    Attributes:
        phase: the :class:`~mailrelay.options.Timeouts` field that limits the wait.
    """

    phase: str


@attrs.frozen(kw_only=True)
class StartTLS:
    """Run the TLS handshake on the connection now; the driver sends back ``None``, or
    throws the handshake's exception into the generator.

    Attributes:
        server_hostname: the name to send in SNI and to check the certificate against.
    """

    server_hostname: str


@attrs.frozen(kw_only=True)
class Close:
    """Close the connection; the driver sends back ``None``."""


#: Anything a step may yield.
Request: TypeAlias = Write | Read | StartTLS | Close
#: A step of the session: yields requests, is sent ``bytes`` (for :class:`Read`) or ``None``,
#: and returns its result.
Step: TypeAlias = Generator[Request, bytes | None, _T]

# RFC 5321 §4.1.4: EHLO refused with one of these means "try HELO".
_HELO_FALLBACK = frozenset({500, 501, 502, 504, 550})
# RFC 4954 §6: 534 "mechanism too weak"; 504 "mechanism not supported" (some servers).
_NEXT_MECHANISM = frozenset({504, 534})
_NO_EXTENSIONS = Extensions.parse(())
_DATA = Data()
_END_OF_DATA = EndOfData()
# Messages up to this size are sent as one write with their terminator.
_JOIN_LIMIT = 1 << 20


# A Read is immutable and the phases are few: one request per phase serves every read.
_READS: dict[str, Read] = {}


def _read_request(phase: str) -> Read:
    request = _READS.get(phase)
    if request is None:
        request = _READS[phase] = Read(phase=phase)
    return request


def _check_hostname(instance: SessionConfig, attribute: attrs.Attribute[str], value: str) -> None:
    if not value or any(c in value for c in " \t\r\n\0<>"):
        raise ConfigurationError(f"{attribute.name} is not a usable host name: {value!r}")


def _check_credentials(
    instance: SessionConfig, attribute: attrs.Attribute[str | None], value: str | None
) -> None:
    if (instance.username is None) != (value is None):
        raise ConfigurationError("give both a user name and a password (or token), or neither")


def _mechanism_tuple(value: Iterable[str] | None) -> tuple[str, ...] | None:
    """``auth_mechanisms`` as a tuple (typed, unlike ``attrs.converters.optional(tuple)``,
    so that mypy accepts any iterable of names)."""
    return None if value is None else tuple(value)


@attrs.frozen(kw_only=True)
class SessionConfig:
    """What a :class:`Session` needs to know; the transport builds it.

    Attributes:
        local_hostname: our name for EHLO/HELO/LHLO. An IP address is sent as an address
            literal.
        server_hostname: the server's name, for TLS (SNI and certificate checks).
        tls: the TLS policy.
        username: the user name to authenticate as; ``None`` means no AUTH.
        password: the password (or, for XOAUTH2, the access token). Never shown by ``repr``.
        auth_mechanisms: the SASL mechanisms to use, in order; ``None`` means the strongest
            both sides support (XOAUTH2 only when named here).
        allow_insecure_auth: allow AUTH over an unencrypted connection.
        pipelining: use PIPELINING when the server offers it (turn off for broken servers).
        chunking: use BDAT when the server offers CHUNKING.
        lmtp: speak LMTP (LHLO, one final reply per recipient).
        peer: ``host:port`` of the server, recorded in the results.
    """

    local_hostname: str = attrs.field(validator=_check_hostname)
    server_hostname: str = attrs.field(validator=_check_hostname)
    tls: TLS = attrs.field(default=TLS.STARTTLS, validator=attrs.validators.instance_of(TLS))
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False, validator=_check_credentials)
    auth_mechanisms: tuple[str, ...] | None = attrs.field(default=None, converter=_mechanism_tuple)
    allow_insecure_auth: bool = False
    pipelining: bool = True
    chunking: bool = False
    lmtp: bool = False
    peer: str | None = None


def _hello_name(name: str) -> str:
    """RFC 5321 §4.1.3: an IP address goes in EHLO as an address literal."""
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return name
    if address.version == 6:
        return f"[IPv6:{address.compressed}]"
    return f"[{address}]"


def _trace(command: Command, data: bytes) -> str:
    """The wire trace of one write, with credentials redacted."""
    if isinstance(command, Auth):
        return f"AUTH {command.mechanism}" + (" <redacted>" if command.initial_response else "")
    if isinstance(command, AuthContinue):
        return "<redacted SASL response>"
    if isinstance(command, DataChunk | Bdat):
        return f"<{len(data)} bytes of message data>"
    return data.decode("utf-8", "replace").rstrip("\r\n")


#: The most messages whose replies are outstanding in a BDAT window (RFC 3030 with
#: RFC 2920): enough to hide the round trip, few enough that the replies never fill the
#: socket buffers while we are still writing.
WINDOW_MESSAGES = 32
#: The most message bytes outstanding in a BDAT window.
WINDOW_BYTES = 1 << 20
# A message up to this size goes in one BDAT LAST (and may then share the window).
_ONE_CHUNK = 1 << 20


@attrs.frozen(kw_only=True)
class ProbeResult:
    """What :meth:`Session.probe` learnt.

    Attributes:
        mail: the reply to MAIL, or ``None`` when the session ended before it came.
        recipients: one reply per recipient, in order; ``None`` where no RCPT was answered
            (MAIL refused, or the session ended first).
        ended: whether the session ended during the probe (421 or end of file).
    """

    mail: Reply | None
    recipients: tuple[Reply | None, ...]
    ended: bool = False


@attrs.frozen(kw_only=True)
class BatchOutcome:
    """What :meth:`Session.deliver_many` did with each message.

    Attributes:
        results: one entry per message, in order: its result, or ``None`` when it got no
            final answer because the session ended first (see ``error``).
        error: why the session ended before the batch did, or ``None``.
    """

    results: tuple[DeliveryResult | None, ...]
    error: DeliveryError | None = None


# -- the per-message bookkeeping ---------------------------------------------------------------


# Results are built on the hot path of every message; their classes have no validators
# and no converters that could change known-good values (a tuple stays a tuple), so the
# slots are filled directly, as attrs' __init__ would (a test checks the two agree).
def _slot_setters(cls: type, names: tuple[str, ...]) -> list[Callable[[object, object], None]]:
    if tuple(field.name for field in attrs.fields(cls)) != names:
        raise AssertionError(f"{cls.__name__}'s fields changed: update its fast builder")
    return [cls.__dict__[name].__set__ for name in names]


_new = object.__new__
_set_address, _set_outcome, _set_reply, _set_reason, _set_host = _slot_setters(
    RecipientResult, ("address", "outcome", "reply", "reason", "host")
)
_set_recipients, _set_message_id, _set_result_host = _slot_setters(
    DeliveryResult, ("recipients", "message_id", "host")
)
# Outcome.from_reply by the code's first digit; Outcome.TRANSIENT for anything else.
_OUTCOME_BY_CLASS = {2: Outcome.ACCEPTED, 5: Outcome.PERMANENT}


def _recipient_result(
    address: Address, outcome: Outcome, reply: Reply | None, reason: str | None, host: str | None
) -> RecipientResult:
    """``RecipientResult(address=..., ...)`` for values known to be of the right types."""
    result: RecipientResult = _new(RecipientResult)
    _set_address(result, address)
    _set_outcome(result, outcome)
    _set_reply(result, reply)
    _set_reason(result, reason)
    _set_host(result, host)
    return result


def _delivery_result(
    recipients: tuple[RecipientResult, ...], message_id: str | None, host: str | None
) -> DeliveryResult:
    """``DeliveryResult(recipients=..., ...)`` for a tuple of results (no conversion needed)."""
    result: DeliveryResult = _new(DeliveryResult)
    _set_recipients(result, recipients)
    _set_message_id(result, message_id)
    _set_result_host(result, host)
    return result


class _Transaction:
    """Which reply each recipient of one message has, and which are final."""

    __slots__ = ("addresses", "final", "message_id", "peer", "rcpt_replies")

    def __init__(
        self, recipients: Sequence[Address], peer: str | None, message_id: str | None = None
    ) -> None:
        self.addresses = tuple(recipients)
        self.peer = peer
        self.message_id = message_id
        self.rcpt_replies: list[Reply | None] = [None] * len(self.addresses)
        self.final: list[RecipientResult | None] = [None] * len(self.addresses)

    def settle(self, index: int, reply: Reply, reason: str | None = None) -> None:
        self.final[index] = _recipient_result(
            self.addresses[index],
            _OUTCOME_BY_CLASS.get(reply.code // 100, Outcome.TRANSIENT),
            reply,
            reason,
            self.peer,
        )

    def settle_all(self, reply: Reply, reason: str | None = None) -> None:
        for index, result in enumerate(self.final):
            if result is None:
                self.settle(index, reply, reason)

    def accepted(self) -> list[int]:
        """Indices of recipients whose RCPT was accepted and that have no final result yet."""
        return [
            i
            for i, reply in enumerate(self.rcpt_replies)
            if reply is not None and reply.is_positive and self.final[i] is None
        ]

    def all_final(self) -> bool:
        return None not in self.final

    def any_final(self) -> bool:
        return self.final.count(None) < len(self.final)

    def unfinished(self, reply: Reply | None, reason: str) -> None:
        """Every recipient still without a final answer becomes TRANSIENT."""
        for index, result in enumerate(self.final):
            if result is None:
                self.final[index] = RecipientResult(
                    address=self.addresses[index],
                    outcome=Outcome.TRANSIENT,
                    reply=reply,
                    reason=reason,
                    host=self.peer,
                )

    def result(self) -> DeliveryResult:
        assert None not in self.final, "every recipient must be settled"
        results = cast("tuple[RecipientResult, ...]", tuple(self.final))
        return _delivery_result(results, self.message_id, self.peer)


class _SessionClosed(Exception):
    """Internal: the server ended the session (421 or EOF) in the middle of a step."""

    def __init__(self, reply: Reply | None) -> None:
        super().__init__("session closed")
        self.reply = reply


# -- the session -------------------------------------------------------------------------------


class Session:
    """One SMTP/LMTP session over one connection, as generator steps (see the module docs).

    Attributes:
        config: the configuration.
        encrypted: whether the connection is protected by TLS (implicit or after STARTTLS).
        authenticated: whether AUTH succeeded.
        closed: whether the session is over (QUIT sent, 421 received, or the connection lost).
        greeting: the server's greeting, once read.
    """

    def __init__(self, config: SessionConfig) -> None:
        self.config = config
        self.encrypted = config.tls is TLS.IMPLICIT
        self.authenticated = False
        self.closed = False
        self.greeting: Reply | None = None
        self._conn = ClientConnection(lmtp=config.lmtp)
        self._needs_rset = False
        self._extensions: Extensions | None = None
        # The last small message sent by DATA, and its wire form (stuffed) and terminator.
        self._last_data: tuple[Message, tuple[DataChunk, EndOfData]] | None = None
        self._last_message: (
            tuple[Message, Envelope, Extensions, str | None, str | None, tuple[Address, ...]] | None
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
        """The next event from the connection, reading as needed."""
        while True:
            try:
                event = self._conn.next_event()
                if event is NEED_DATA:
                    data = yield _read_request(phase)
                    self._conn.receive_data(data if data is not None else b"")
                    continue
            except RemoteProtocolError as exc:
                yield from self._closed()
                raise ServerProtocolError(
                    f"the server broke the protocol: {exc}", host=self.config.peer
                ) from exc
            if isinstance(event, Greeting | Response | LMTPResponse | ServiceClosing):
                log.debug("<<< %s", event.reply)
            return event

    def _reply(self, phase: str) -> Step[Reply]:
        """The reply to the oldest pending command; 421 and EOF raise ``_SessionClosed``."""
        event = yield from self._event(phase)
        reply = yield from self._check_closing(event)
        return reply

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
            yield from self._write(Quit(), phase="greeting")
            yield from self._event("greeting")
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

    # -- open ----------------------------------------------------------------------------------

    def open(self) -> Step[None]:
        """Greeting, EHLO (or HELO/LHLO), STARTTLS per policy, EHLO again, AUTH.

        Raises:
            SessionRefused: the greeting refused the session, or the server sent 421.
            TLSError: the TLS policy cannot be met, or the handshake failed.
            AuthenticationError: AUTH failed or would have been unsafe.
            ConnectionLost: the server closed the connection.
            ServerProtocolError: the server broke the protocol.
        """
        return (yield from self._guarded(self._open_step()))

    def _open_step(self) -> Step[None]:
        self._ensure_open()
        if self.greeting is not None:
            raise LocalProtocolError("open() runs once per session")
        try:
            yield from self._open()
        except _SessionClosed as closed:
            raise self._refuse(closed.reply, "while opening the session") from None

    def _open(self) -> Step[None]:
        event = yield from self._event("greeting")
        if isinstance(event, ConnectionClosed):
            yield from self._closed()
            raise _SessionClosed(None)
        if not isinstance(event, Greeting):
            raise AssertionError(f"the first event is always the greeting, not {event}")
        self.greeting = event.reply
        if event.reply.code != 220:
            # RFC 5321 §3.1: a 554 greeting refuses the session; the server then waits for
            # QUIT. 421 (and any other code) also means "not now".
            if event.reply.code == 421:
                yield from self._closed()
            else:
                yield from self._abort()
            raise SessionRefused(
                f"the server refused the session: {event.reply}",
                reply=event.reply,
                host=self.config.peer,
            )
        yield from self._hello()
        if self._wants_starttls():
            yield from self._starttls()
        if self.config.username is not None:
            yield from self._authenticate()

    def _hello(self) -> Step[None]:
        name = _hello_name(self.config.local_hostname)
        if self.config.lmtp:
            # RFC 2033 §4.1: LHLO only; an LMTP server refusing it is not an SMTP server.
            yield from self._write(Lhlo(hostname=name), phase="greeting")
            reply = yield from self._reply("greeting")
            yield from self._check_hello(reply, "LHLO")
            return
        yield from self._write(Ehlo(hostname=name), phase="greeting")
        reply = yield from self._reply("greeting")
        if reply.code in _HELO_FALLBACK:
            log.debug("EHLO refused with %d; falling back to HELO", reply.code)
            yield from self._write(Helo(hostname=name), phase="greeting")
            reply = yield from self._reply("greeting")
            yield from self._check_hello(reply, "HELO")
            self._extensions = None
            return
        yield from self._check_hello(reply, "EHLO")

    def _check_hello(self, reply: Reply, verb: str) -> Step[None]:
        if not reply.is_positive:
            yield from self._abort()
            raise SessionRefused(
                f"the server refused {verb}: {reply}", reply=reply, host=self.config.peer
            )
        if verb != "HELO":
            self._extensions = self._conn.extensions

    def _wants_starttls(self) -> bool:
        policy = self.config.tls
        if policy in (TLS.NONE, TLS.IMPLICIT):
            return False
        return policy is TLS.STARTTLS or self.extensions.starttls

    def _starttls(self) -> Step[None]:
        required = self.config.tls is TLS.STARTTLS
        if not self.extensions.starttls:
            yield from self._abort()
            raise TLSError(
                "TLS is required but the server does not offer STARTTLS",
                host=self.config.peer,
            )
        yield from self._write(StartTLSCommand(), phase="greeting")
        reply = yield from self._reply("greeting")
        if reply.code != 220:
            if not required:
                # RFC 3207 §4: the client may go on without TLS when the server cannot start it.
                log.debug("STARTTLS refused (%d); going on in plain text", reply.code)
                return
            yield from self._abort()
            raise TLSError(
                f"TLS is required but the server refused STARTTLS: {reply}",
                reply=reply,
                host=self.config.peer,
            )
        try:
            yield StartTLS(server_hostname=self.config.server_hostname)
        except Exception as exc:
            yield from self._closed()
            transient = not required or (isinstance(exc, DeliveryError) and exc.is_transient)
            raise TLSError(
                f"the TLS handshake failed: {exc}", is_transient=transient, host=self.config.peer
            ) from exc
        try:
            self._conn.tls_established()
        except RemoteProtocolError as exc:
            # RFC 3207 §4.2: bytes that came with the 220 are a response-injection attempt.
            yield from self._closed()
            raise ServerProtocolError(str(exc), host=self.config.peer) from exc
        self.encrypted = True
        self._extensions = None
        # RFC 3207 §4.2: forget what the server said before TLS and ask again.
        yield from self._hello()

    # -- AUTH ----------------------------------------------------------------------------------

    def _authenticate(self) -> Step[None]:
        username, password = self.config.username, self.config.password
        assert username is not None
        assert password is not None
        if not self.encrypted and not self.config.allow_insecure_auth:
            yield from self._abort()
            raise AuthenticationError(
                "refusing to send credentials over an unencrypted connection "
                "(use TLS, or allow_insecure_auth=True)",
                host=self.config.peer,
            )
        try:
            mechanisms = candidate_mechanisms(
                self.extensions.auth, preferred=self.config.auth_mechanisms
            )
        except AuthenticationError as exc:
            exc.host = self.config.peer
            yield from self._abort()
            raise
        if not mechanisms:
            yield from self._abort()
            offered = ", ".join(sorted(self.extensions.auth)) or "no AUTH at all"
            raise AuthenticationError(
                f"no usable SASL mechanism in common with the server (it offers {offered})",
                host=self.config.peer,
            )
        last: Reply | None = None
        for mechanism in mechanisms:
            reply = yield from self._sasl(mechanism, username, password)
            if reply is None:
                self.authenticated = True
                return
            last = reply
            if reply.code not in _NEXT_MECHANISM:
                break
            log.debug(
                "AUTH %s refused with %d; trying the next mechanism", mechanism.name, reply.code
            )
        yield from self._abort()
        raise AuthenticationError(
            f"the server refused authentication: {last}", reply=last, host=self.config.peer
        )

    def _sasl(self, mechanism: Mechanism, username: str, password: str) -> Step[Reply | None]:
        """One AUTH exchange: ``None`` on success, else the refusing reply."""
        exchange = mechanism.start(username, password)
        try:
            initial = next(exchange)
        except AuthenticationError as exc:
            exc.host = self.config.peer
            yield from self._abort()
            raise
        yield from self._write(
            Auth(mechanism=mechanism.name, initial_response=initial), phase="greeting"
        )
        while True:
            reply = yield from self._reply("greeting")
            if reply.code == 235:
                try:
                    exchange.send(None)
                except StopIteration:
                    return None
                except AuthenticationError as exc:
                    exc.host = self.config.peer
                    yield from self._abort()
                    raise
                raise AssertionError("a SASL exchange must end when the server says 235")
            if reply.code != 334:
                exchange.close()
                return reply
            try:
                challenge = base64.b64decode(reply.lines[0].strip(), validate=True)
                response = exchange.send(challenge)
            except (binascii.Error, ValueError, AuthenticationError, StopIteration) as exc:
                # RFC 4954 §4: "*" cancels the exchange; the server answers 501.
                yield from self._write(AuthAbort(), phase="greeting")
                yield from self._reply("greeting")
                yield from self._abort()
                if isinstance(exc, AuthenticationError):
                    exc.host = self.config.peer
                    raise
                raise AuthenticationError(
                    f"AUTH {mechanism.name}: the server sent an unusable challenge",
                    host=self.config.peer,
                ) from None
            yield from self._write(AuthContinue(data=response or b""), phase="greeting")

    # -- per message ---------------------------------------------------------------------------

    def deliver(self, message: Message, envelope: Envelope) -> Step[DeliveryResult]:
        """Send one message to the envelope's recipients.

        Returns:
            one result per envelope recipient, in envelope order.

        Raises:
            SessionRefused: 421 before any recipient got a final answer.
            ConnectionLost: the connection ended before any recipient got a final answer,
                or the session was already closed.
            ServerProtocolError: the server broke the protocol.
        """
        return (yield from self._guarded(self._deliver(message, envelope)))

    def _deliver(self, message: Message, envelope: Envelope) -> Step[DeliveryResult]:
        self._ensure_open()
        transaction = self._prepared(message, envelope)
        if transaction.all_final():
            return transaction.result()
        try:
            if self._needs_rset:
                yield from self._rset()
            yield from self._transaction(message, envelope, transaction)
        except _SessionClosed as closed:
            if not transaction.any_final():
                raise self._refuse(closed.reply, "before any recipient was answered") from None
            what = "closed the session (421)" if closed.reply else "closed the connection"
            transaction.unfinished(closed.reply, f"the server {what} before a final reply")
        except DeliveryError as exc:
            # A timeout or reset thrown in by the driver (or a protocol violation). Answers
            # already given (LMTP finals, refused RCPTs) must not be lost with it: a retry of
            # the whole message would deliver twice (RFC 2033 §4.2). The rest are TRANSIENT.
            if not transaction.any_final():
                raise
            yield from self._closed()
            transaction.unfinished(exc.reply, f"{type(exc).__name__} before a final reply: {exc}")
        return transaction.result()

    def _prepared(self, message: Message, envelope: Envelope) -> _Transaction:
        """The message's bookkeeping; already final when it cannot be sent here at all (or
        has no recipient)."""
        last = self._last_message
        ext = self.extensions
        if last is not None and last[0] is message and last[1] is envelope and last[2] is ext:
            # The same pair again (one message, one list, many sends): nothing to re-derive.
            message_id, refusal, addresses = last[3], last[4], last[5]
        else:
            message_id = message.message_id
            refusal = self._precheck(message, envelope)
            addresses = tuple(r.address for r in envelope.recipients)
            self._last_message = (message, envelope, ext, message_id, refusal, addresses)
        transaction = _Transaction(addresses, self.config.peer, message_id)
        if refusal is not None:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("refusing the message before sending: %s", refusal)
            transaction.unfinished(None, refusal)
            for index, result in enumerate(transaction.final):
                assert result is not None
                transaction.final[index] = attrs.evolve(result, outcome=Outcome.PERMANENT)
        return transaction

    def _precheck(self, message: Message, envelope: Envelope) -> str | None:
        """Why the message cannot be sent to this server at all, or None."""
        ext = self.extensions
        if ext.size and message.size > ext.size:
            # RFC 1870 §6: the message is bigger than the server's fixed limit.
            return (
                f"the message is {message.size} bytes; the server accepts at most {ext.size} "
                "(SIZE, RFC 1870)"
            )
        if self._needs_smtputf8(message, envelope) and not ext.smtputf8:
            return (
                "the message or an envelope address needs SMTPUTF8 (RFC 6531), "
                "which the server does not offer"
            )
        if message.needs_8bitmime and not ext.eight_bit_mime:
            return "the message has 8-bit content and the server does not offer 8BITMIME (RFC 6152)"
        if envelope.requiretls:
            # RFC 8689 §4.1: only over TLS, and only to a server that offers REQUIRETLS.
            if not self.encrypted:
                return "REQUIRETLS was requested but the connection is not encrypted (RFC 8689)"
            if not ext.requiretls:
                return "REQUIRETLS was requested but the server does not offer it (RFC 8689)"
        return None

    @staticmethod
    def _needs_smtputf8(message: Message, envelope: Envelope) -> bool:
        return message.needs_smtputf8 or envelope.needs_smtputf8

    def _commands(self, message: Message, envelope: Envelope) -> tuple[MailFrom, list[RcptTo]]:
        """MAIL (with its parameters for this server) and one RCPT per recipient.

        The commands for the last envelope are kept: the same envelope again (a batch to
        one list of recipients) reuses them, and so their encoded lines
        (:class:`~mailrelay.protocol.MailFrom` encodes itself once).
        """
        ext = self.extensions
        smtputf8 = ext.smtputf8 and self._needs_smtputf8(message, envelope)
        body = "8BITMIME" if message.needs_8bitmime else None
        key = (message.size, body, smtputf8)
        cached = self._last_commands
        if cached is not None and cached[0] is envelope and cached[1] is ext and cached[2] == key:
            return cached[3], cached[4]
        mail = MailFrom(
            sender=envelope.sender,
            parameters=envelope.mail_parameters(
                size=message.size if "SIZE" in ext else None,  # RFC 1870 §6
                body=body,
                smtputf8=smtputf8,
                dsn=ext.dsn,
                requiretls=envelope.requiretls and ext.requiretls,
            ),
            smtputf8=smtputf8,
        )
        dsn = ext.dsn
        rcpts = [
            RcptTo(
                recipient=r.address,
                parameters=r.rcpt_parameters(dsn=dsn, smtputf8=smtputf8),
                smtputf8=smtputf8,
            )
            for r in envelope.recipients
        ]
        self._last_commands = (envelope, ext, key, mail, rcpts)
        return mail, rcpts

    def _transaction(
        self, message: Message, envelope: Envelope, transaction: _Transaction
    ) -> Step[None]:
        ext = self.extensions
        bdat = self.config.chunking and ext.chunking
        mail, rcpts = self._commands(message, envelope)
        # The transaction is open until its end-of-data reply: RSET before the next one if
        # anything stops it earlier (RFC 5321 §4.1.1.5).
        self._needs_rset = True
        chunks = _with_last(message.chunks())  # consumed only for BDAT
        first: Bdat | None = None
        pipelined = self.config.pipelining and ext.pipelining
        if pipelined:
            # RFC 2920 §3.1: MAIL, every RCPT and DATA (or the first BDAT, RFC 3030 §4)
            # in one write; the replies come back in the same order.
            group: list[Command] = [mail, *rcpts]
            if bdat:
                data, last = next(chunks)
                first = Bdat(data=data, last=last)
                group.append(first)
            else:
                group.append(Data())
            yield from self._write(*group, phase="mail")
            yield from self._read_envelope_replies(transaction)
        else:
            yield from self._send_envelope(mail, rcpts, transaction)
        if bdat:
            yield from self._send_bdat(chunks, first, transaction)
        else:
            yield from self._send_data(message, transaction, data_sent=pipelined)

    def _read_envelope_replies(self, transaction: _Transaction) -> Step[None]:
        """Read the replies to a pipelined group's MAIL and RCPTs."""
        mail_reply = yield from self._reply("mail")
        if not mail_reply.is_positive:
            # RFC 2920 §3.1: the RCPTs' 503s only echo the refused MAIL; the MAIL reply is
            # what each recipient needs to know.
            transaction.settle_all(mail_reply)
        for index in range(len(transaction.addresses)):
            reply = yield from self._reply("rcpt")
            transaction.rcpt_replies[index] = reply
            if mail_reply.is_positive and not reply.is_positive:
                transaction.settle(index, reply)

    def _send_envelope(
        self, mail: MailFrom, rcpts: list[RcptTo], transaction: _Transaction
    ) -> Step[None]:
        """MAIL and each RCPT, one at a time (no PIPELINING)."""
        yield from self._write(mail, phase="mail")
        mail_reply = yield from self._reply("mail")
        if not mail_reply.is_positive:
            transaction.settle_all(mail_reply)
            return
        for index, rcpt in enumerate(rcpts):
            yield from self._write(rcpt, phase="rcpt")
            reply = yield from self._reply("rcpt")
            transaction.rcpt_replies[index] = reply
            if not reply.is_positive:
                transaction.settle(index, reply)

    def _send_data(
        self, message: Message, transaction: _Transaction, *, data_sent: bool
    ) -> Step[None]:
        """DATA (unless pipelined already), the message after 354, and the final reply(s)."""
        if not data_sent:
            if transaction.all_final():
                return  # MAIL or every RCPT refused: no DATA
            yield from self._write(Data(), phase="data_init")
        if (yield from self._data_body(message, transaction)):
            yield from self._finals(transaction)

    def _data_body(
        self, message: Message, transaction: _Transaction, data_reply: Reply | None = None
    ) -> Step[bool]:
        """DATA's reply (read here unless given), then the message and its terminator after
        a 354.

        Returns:
            whether the final reply(s) are still to be read (the message was sent).
        """
        if data_reply is None:
            data_reply = yield from self._reply("data_init")
        if transaction.all_final():
            # RFC 2920 §3.1: DATA was pipelined and got 354 although nobody was accepted:
            # end the empty message with a lone "."; every recipient keeps its own reply.
            if data_reply.code == 354:
                yield from self._write(EndOfData(), phase="data_block")
                yield from self._reply("data_end")
                self._needs_rset = False
            return False
        if data_reply.code != 354:
            if data_reply.is_positive:
                # Not a go-ahead, whatever its code says: the message was not sent.
                transaction.unfinished(data_reply, "the server answered DATA without 354")
            else:
                transaction.settle_all(data_reply)
            return False
        if message.size <= _JOIN_LIMIT:
            # A small message goes out as one request with its terminator.
            yield Write(data=self._data_wire(message), phase="data_block")
            return True
        # Streamed: one request per chunk, so a huge message is never held whole.
        conn = self._conn
        for chunk in message.chunks():
            yield Write(data=conn.send(DataChunk(data=chunk)), phase="data_block")
        yield Write(data=conn.send(EndOfData()), phase="data_block")
        if log.isEnabledFor(logging.DEBUG):
            log.debug(">>> <%d bytes of message data and the terminator>", message.size)
        self._needs_rset = False
        return True

    def _data_wire(self, message: Message) -> bytes:
        """A small message's data and terminator, as one piece of wire bytes (after 354)."""
        return self._conn.send_group(self._data_commands(message))

    def _data_commands(self, message: Message) -> tuple[DataChunk, EndOfData]:
        """A small message's data, in wire form, and its terminator: the commands that send
        it after 354 (``send_group`` turns them into exactly the bytes ``send()`` would give
        for its chunks and ``EndOfData()``).

        The same message again (one message, many envelopes) reuses its wire form: it is
        not dot-stuffed a second time.
        """
        last = self._last_data
        if log.isEnabledFor(logging.DEBUG):
            log.debug(">>> <%d bytes of message data and the terminator>", message.size)
        self._needs_rset = False
        if last is not None and last[0] is message:
            return last[1]
        # The connection's stuffer is a fresh one after 354, so a fresh one here gives the
        # same bytes (RFC 5321 §4.5.2).
        stuffer = DotStuffer()
        pieces = [stuffer.chunk(chunk) for chunk in message.chunks()]
        pieces.append(stuffer.end())
        # Kept without the final ".CRLF" (but with any line end the terminator added), so
        # that it ends a line and EndOfData() gives the same terminator again.
        commands = (DataChunk(data=b"".join(pieces)[:-3], stuffed=True), _END_OF_DATA)
        self._last_data = (message, commands)
        return commands

    def _send_bdat(
        self,
        chunks: Iterator[tuple[bytes, bool]],
        first: Bdat | None,
        transaction: _Transaction,
    ) -> Step[None]:
        """The message in BDAT chunks (RFC 3030 §2), each chunk's reply read before the next.

        ``first`` is the chunk already sent in the pipelined group, if any.
        """
        if first is not None:
            if first.last:
                self._needs_rset = False
                if transaction.all_final():
                    yield from self._reply("data_end")  # one reply: nobody to deliver to
                else:
                    yield from self._finals(transaction)
                return
            reply = yield from self._reply("data_block")
            if transaction.all_final():
                return
            if not reply.is_positive:
                transaction.settle_all(reply)
                return
        elif transaction.all_final():
            return
        for data, last in chunks:
            yield from self._write(Bdat(data=data, last=last), phase="data_block")
            if last:
                self._needs_rset = False
                yield from self._finals(transaction)
                return
            reply = yield from self._reply("data_block")
            if not reply.is_positive:
                # RFC 3030 §2: after a refused chunk, send no more (the RSET comes next time).
                transaction.settle_all(reply)
                return

    def _finals(self, transaction: _Transaction) -> Step[None]:
        """The reply after the message data: one for SMTP; for LMTP one per accepted
        recipient, in RCPT order (RFC 2033 §4.2)."""
        if not self.config.lmtp:
            reply = yield from self._reply("data_end")
            transaction.settle_all(reply)
            return
        for index in transaction.accepted():
            event = yield from self._event("data_end")
            reply = yield from self._check_closing(event)
            transaction.settle(index, reply)

    # -- probing -------------------------------------------------------------------------------

    def probe(self, sender: Address | None, recipients: Sequence[Address]) -> Step[ProbeResult]:
        """Ask whether the server would take mail for ``recipients``, sending none: MAIL,
        one RCPT per recipient, then RSET (RFC 5321 §4.1.1.5); never DATA.

        Commands go one at a time (no pipelining): a probe is short, and a server that
        drops the connection after too many refused RCPTs then leaves clear, partial
        answers. A 421 or end of file ends the probe early instead of raising.

        Raises:
            ConnectionLost: the session was already closed.
            ServerProtocolError: the server broke the protocol before the RSET.
        """
        return (yield from self._guarded(self._probe(sender, tuple(recipients))))

    def _probe(self, sender: Address | None, recipients: tuple[Address, ...]) -> Step[ProbeResult]:
        self._ensure_open()
        utf8 = self.extensions.smtputf8 and (
            (sender is not None and sender.needs_smtputf8)
            or any(a.needs_smtputf8 for a in recipients)
        )
        params: tuple[tuple[str, str | None], ...] = (("SMTPUTF8", None),) if utf8 else ()
        mail: Reply | None = None
        replies: list[Reply | None] = [None] * len(recipients)
        try:
            if self._needs_rset:
                yield from self._rset()
            self._needs_rset = True
            yield from self._write(
                MailFrom(sender=sender, parameters=params, smtputf8=utf8), phase="mail"
            )
            mail = yield from self._reply("mail")
            if mail.is_positive:
                for index, address in enumerate(recipients):
                    yield from self._write(RcptTo(recipient=address, smtputf8=utf8), phase="rcpt")
                    replies[index] = yield from self._reply("rcpt")
            try:
                yield from self._rset()  # RFC 5321 §4.1.1.5: abandon it; no mail is sent
            except ServerProtocolError as exc:
                log.debug("RSET after a probe failed: %s", exc)  # the answers are in already
        except _SessionClosed:
            pass  # partial answers; the session is closed
        return ProbeResult(mail=mail, recipients=tuple(replies), ended=self.closed)

    # -- many messages ---------------------------------------------------------------------------

    def deliver_many(self, items: Sequence[tuple[Message, Envelope]]) -> Step[BatchOutcome]:
        """Send several messages, pipelined across messages when the server allows it.

        RFC 2920 §3.1 lets message content be the first "command" of a group, so with
        PIPELINING the next message's RSET (if needed), MAIL, RCPTs and DATA follow the
        previous message's data and terminator in one write, and the previous final reply
        is read with them (one round trip per message instead of two). With CHUNKING
        (``chunking=True``) a message that fits in one chunk goes as ``BDAT n LAST``, which
        needs no 354, so up to :data:`WINDOW_MESSAGES` such messages (or
        :data:`WINDOW_BYTES` of their data) are in flight at once; replies are read in
        order as the window fills. Each message's result is the one :meth:`deliver` would
        give it alone.

        A session that ends early (421, end of file, timeout, reset, protocol violation)
        does not raise: the outcome records the error, and each message then either has a
        result (when any of its recipients got a final answer; the rest are TRANSIENT) or
        ``None`` (no final answer: it was not sent, or its data got no reply; the caller may
        send it again on a fresh connection).
        """
        # _guarded() inlined: every request of a long batch passes through this frame.
        try:
            return (yield from self._deliver_many(items))
        except BaseException:
            self.closed = True
            raise

    def _deliver_many(self, items: Sequence[tuple[Message, Envelope]]) -> Step[BatchOutcome]:
        self._ensure_open()
        count = len(items)
        results: list[DeliveryResult | None] = [None] * count
        transactions: list[_Transaction | None] = [None] * count
        # Messages whose replies are still to be read, oldest first: (index, reader, bytes).
        inflight: deque[tuple[int, Step[None], int]] = deque()
        outstanding = 0
        ext = self.extensions
        pipelined = self.config.pipelining and ext.pipelining
        bdat = self.config.chunking and ext.chunking
        lmtp = self.config.lmtp
        # SMTP over DATA: the message whose final reply is still to be read.
        previous: tuple[int, _Transaction] | None = None
        # ...and its data and terminator, not written yet: they go with the next write.
        carry: tuple[Command, ...] = ()
        error: DeliveryError | None = None
        reason = ""
        try:
            for index, (message, envelope) in enumerate(items):
                transaction = self._prepared(message, envelope)
                transactions[index] = transaction
                if transaction.all_final():
                    results[index] = transaction.result()
                    continue
                if not pipelined or (bdat and message.size > _ONE_CHUNK):
                    # Nothing overlaps: read what is in flight, then one message alone.
                    # (A DATA message waits in ``previous`` only with PIPELINING, without
                    # BDAT, so never on the way here.)
                    assert previous is None
                    while inflight:
                        done, reader, size = inflight.popleft()
                        yield from reader
                        outstanding -= size
                        results[done] = _result_of(transactions[done])
                    if self._needs_rset:
                        yield from self._rset()
                    yield from self._transaction(message, envelope, transaction)
                    results[index] = transaction.result()
                    continue
                mail, rcpts = self._commands(message, envelope)
                rset = self._needs_rset
                group: list[Command] = [Rset(), mail, *rcpts] if rset else [mail, *rcpts]
                if bdat:
                    # RFC 3030 §2-4: BDAT LAST needs no 354, so it joins the group and the
                    # whole message can be in flight; its replies are read later, in order.
                    data = b"".join(message.chunks())
                    group.append(Bdat(data=data, last=True))
                    yield from self._write(*group, phase="mail")
                    self._needs_rset = False
                    inflight.append((index, self._bdat_replies(transaction, rset), len(data)))
                    outstanding += len(data)
                    while len(inflight) > WINDOW_MESSAGES or outstanding > WINDOW_BYTES:
                        done, reader, size = inflight.popleft()
                        yield from reader
                        outstanding -= size
                        results[done] = _result_of(transactions[done])
                    continue
                group.append(_DATA)
                self._needs_rset = True
                if not lmtp:
                    # One write: the previous message's data and terminator (if any), then
                    # this message's envelope (RFC 2920 §3.1).
                    conn = self._conn
                    commands = [*carry, *group] if carry else group
                    carry = ()
                    if log.isEnabledFor(logging.DEBUG):
                        pieces = [conn.send(command) for command in commands]
                        for command, data in zip(commands, pieces, strict=True):
                            log.debug(">>> %s", _trace(command, data))
                        wire = b"".join(pieces)
                    else:
                        wire = conn.send_group(commands)
                    yield Write(data=wire, phase="mail")
                    # The hot path: one collection of replies per message, in FIFO order:
                    # the previous message's final reply, then RSET's, MAIL's, the RCPTs',
                    # and DATA's.
                    expected = len(group) + (previous is not None)
                    replies, closed = yield from self._collect(
                        expected, "data_end" if previous is not None else "mail"
                    )
                    got = len(replies)
                    pos = 0
                    if previous is not None:
                        if not got:
                            raise _short(closed)
                        done, done_transaction = previous
                        previous = None
                        done_transaction.settle_all(replies[0])
                        results[done] = done_transaction.result()
                        pos = 1
                    pos = _apply_envelope(transaction, replies, pos + rset)
                    if pos >= got:
                        raise _short(closed)
                    data_reply = replies[pos]
                    if (
                        data_reply.code == 354
                        and message.size <= _JOIN_LIMIT
                        and not transaction.all_final()
                    ):
                        # Sent with the next message's envelope (or before the last read).
                        carry = self._data_commands(message)
                        previous = (index, transaction)
                    elif (yield from self._data_body(message, transaction, data_reply)):
                        previous = (index, transaction)
                    else:
                        results[index] = transaction.result()
                    continue
                yield from self._write(*group, phase="mail")
                # LMTP: the previous message's final replies come first (FIFO), then ours.
                while inflight:
                    done, reader, size = inflight.popleft()
                    yield from reader
                    outstanding -= size
                    results[done] = _result_of(transactions[done])
                if rset:
                    yield from self._rset_reply()
                yield from self._read_envelope_replies(transaction)
                if (yield from self._data_body(message, transaction)):
                    # The final reply is read with the next message's envelope replies.
                    inflight.append((index, self._finals(transaction), 0))
                else:
                    results[index] = transaction.result()
            while inflight:
                done, reader, size = inflight.popleft()
                yield from reader
                results[done] = _result_of(transactions[done])
            if carry:
                yield Write(data=self._conn.send_group(carry), phase="data_block")
            if previous is not None:
                done, done_transaction = previous
                done_transaction.settle_all((yield from self._reply("data_end")))
                results[done] = done_transaction.result()
        except _SessionClosed as closed:
            error = self._refuse(closed.reply, "before every message was answered")
            what = "closed the session (421)" if closed.reply else "closed the connection"
            reason = f"the server {what} before a final reply"
        except DeliveryError as exc:
            yield from self._closed()
            error = exc
            reason = f"{type(exc).__name__} before a final reply: {exc}"
        if error is not None:
            for index, begun in enumerate(transactions):
                if results[index] is None and begun is not None and begun.any_final():
                    begun.unfinished(error.reply, reason)
                    results[index] = begun.result()
        return BatchOutcome(results=tuple(results), error=error)

    def _collect(self, count: int, phase: str) -> Step[tuple[list[Reply], _SessionClosed | None]]:
        """The replies to the next ``count`` commands in flight, reading as needed; fewer
        (and the reason) when the server ends the session first (421 or end of file)."""
        conn = self._conn
        replies: list[Reply] = []
        debug = log.isEnabledFor(logging.DEBUG)
        while len(replies) < count:
            # Plain replies to commands in flight, without events; anything else (a 421,
            # the end of file, a need for more bytes) is left to next_event().
            ready = conn.next_replies(count - len(replies))
            if ready:
                if debug:
                    for reply in ready:
                        log.debug("<<< %s", reply)
                replies += ready
                continue
            try:
                event = conn.next_event()
                if event is NEED_DATA:
                    data = yield _read_request(phase)
                    conn.receive_data(data if data is not None else b"")
                    continue
            except RemoteProtocolError as exc:
                yield from self._closed()
                raise ServerProtocolError(
                    f"the server broke the protocol: {exc}", host=self.config.peer
                ) from exc
            if type(event) is Response:
                reply = event.reply
                if debug:
                    log.debug("<<< %s", reply)
                if reply.code != 421:
                    replies.append(reply)
                    continue
                closed = _SessionClosed(reply)  # RFC 5321 §3.8
            elif isinstance(event, ServiceClosing):
                closed = _SessionClosed(event.reply)
            elif isinstance(event, ConnectionClosed):
                closed = _SessionClosed(None)
            else:  # pragma: no cover - LMTP replies and greetings never come here
                raise AssertionError(f"unexpected event {event!r}")
            yield from self._closed()
            return replies, closed
        return replies, None

    def _bdat_replies(self, transaction: _Transaction, rset: bool) -> Step[None]:
        """The replies to a pipelined [RSET,] MAIL, RCPTs and BDAT LAST, in order."""
        if rset:
            yield from self._rset_reply()
        yield from self._read_envelope_replies(transaction)
        if transaction.all_final():
            yield from self._reply("data_end")  # one reply: nobody to deliver to
        else:
            yield from self._finals(transaction)

    def _rset_reply(self) -> Step[None]:
        reply = yield from self._reply("greeting")
        if not reply.is_positive and log.isEnabledFor(logging.DEBUG):
            log.debug("RSET refused with %d", reply.code)

    # -- between messages ----------------------------------------------------------------------

    def _rset(self) -> Step[None]:
        yield from self._write(Rset(), phase="greeting")
        reply = yield from self._reply("greeting")
        if not reply.is_positive:
            log.debug("RSET refused with %d", reply.code)
        self._needs_rset = False

    def reset(self) -> Step[None]:
        """RSET: abandon any transaction in progress.

        Raises:
            SessionRefused: the server answered 421.
            ConnectionLost: the connection ended.
        """
        return (yield from self._guarded(self._reset()))

    def _reset(self) -> Step[None]:
        self._ensure_open()
        try:
            yield from self._rset()
        except _SessionClosed as closed:
            raise self._refuse(closed.reply, "in answer to RSET") from None

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
        return reply.is_positive

    def quit(self) -> Step[None]:
        """QUIT, read the reply (an end of file instead is fine), and close."""
        return (yield from self._guarded(self._quit()))

    def _quit(self) -> Step[None]:
        if self.closed:
            return
        try:
            yield from self._write(Quit(), phase="greeting")
            event = yield from self._event("greeting")
            if isinstance(event, ConnectionClosed):
                log.debug("the server closed the connection without answering QUIT")
        except (ServerProtocolError, LocalProtocolError):
            pass  # the connection is unusable; closing is all that is left
        yield from self._closed()


def _apply_envelope(transaction: _Transaction, replies: list[Reply], pos: int) -> int:
    """Record the replies to a pipelined MAIL and its RCPTs, from ``replies[pos]`` on (as
    many as arrived); returns the position after them."""
    got = len(replies)
    if pos >= got:
        return pos
    mail_reply = replies[pos]
    pos += 1
    mail_ok = mail_reply.is_positive
    if not mail_ok:
        # RFC 2920 §3.1: the RCPTs' 503s only echo the refused MAIL.
        transaction.settle_all(mail_reply)
    rcpt_replies = transaction.rcpt_replies
    for index in range(len(rcpt_replies)):
        if pos >= got:
            return pos
        reply = replies[pos]
        pos += 1
        rcpt_replies[index] = reply
        if mail_ok and not reply.is_positive:
            transaction.settle(index, reply)
    return pos


def _short(closed: _SessionClosed | None) -> _SessionClosed:
    """The reason a collection of replies came up short."""
    assert closed is not None, "replies are only missing when the session ended"
    return closed


def _result_of(transaction: _Transaction | None) -> DeliveryResult:
    assert transaction is not None
    return transaction.result()


def _with_last(chunks: Iterator[bytes]) -> Iterator[tuple[bytes, bool]]:
    """Each chunk with a flag telling whether it is the last; one empty chunk for no data."""
    previous: bytes | None = None
    for chunk in chunks:
        if previous is not None:
            yield previous, False
        previous = chunk
    yield (previous if previous is not None else b""), True
