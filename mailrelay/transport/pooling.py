"""The connection-pool policy shared by the blocking and the asyncio SMTP/LMTP transports,
and the keyed pool of idle sessions the MX transports share across exchangers.

Rules of this module:

* It decides, and never does I/O: whether an idle connection may be reused, must be checked
  with NOOP first, or must be dropped; whether a used one goes back to the pool; how many
  messages the next pipelined run may put on a connection; whether a failed send is made
  again on a fresh connection; and how a pipelined run's outcome turns into results. The
  transports (:mod:`mailrelay.transport.smtp`, :mod:`mailrelay.transport.async_smtp`, and
  for :class:`ExchangerPool` :mod:`mailrelay.transport.mx` / ``mx_async``) do the
  connecting, the NOOP, the QUIT and the locking, each in its own way.
* A connection taken from the idle list is dropped when its server has sent anything, or
  closed, since it was put there (the driver's ``has_input``, which does not wait): nothing
  was owed, so whatever came is unsolicited, and the replies read after it would answer the
  wrong commands. The transports ask this before any NOOP (which would read the stray reply
  as its own).
* Time comes in as an argument (``now``, from :func:`time.monotonic` in the transports), so
  every decision can be tested without waiting.
* **Never lose a message to a stale connection** (lettre#743, nodemailer#511,
  aiosmtplib#243): an error that means "the server had dropped the connection" (end of
  file, reset, or a 421) on a connection that had carried messages before is answered by
  sending again on a fresh connection; the server had given no final reply, so this is the
  caller's retry minus the wait. Any other error, or one on a fresh connection, is reported.
* **Never deliver a message twice that way**: when the connection ended (without a 421)
  after the server had the whole message, with its final reply still owed
  (:func:`answer_lost`), the server may have taken it and the reply been lost with the
  connection (RFC 1047). That message is not sent again: it gets the error as its result
  (TRANSIENT), and the caller decides. This holds for every such message of a pipelined
  run (with CHUNKING several may be in flight, :func:`answers_lost`), and for a message
  whose ``BDAT LAST`` went out with its MAIL: a reset can destroy replies the server had
  sent, so an unanswered MAIL before it does not prove the server never read it. A
  connection that died while idle fails before any message data goes out, so the rule
  above still covers it.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Awaitable, Callable, Generator, Hashable, Sequence
from typing import Any, Generic, Protocol, TypeVar

import attrs

from mailrelay.envelope import Envelope
from mailrelay.errors import ConnectionLost, DeliveryError, SessionRefused, TransportClosed
from mailrelay.flow import BatchOutcome, Session, unsent_positions
from mailrelay.message import Message
from mailrelay.options import TLS, Timeouts
from mailrelay.protocol import Bdat, EndOfData
from mailrelay.results import DeliveryResult
from mailrelay.transport.base import failed_result
from mailrelay.transport.errors_map import PLAIN_AGAINST_IMPLICIT
from mailrelay.transport.settings import ConnectionSettings, PoolSettings

__all__ = [
    "CHUNK",
    "ExchangerPool",
    "IdleVerdict",
    "PoolPolicy",
    "PooledConnection",
    "Settlement",
    "answer_lost",
    "answers_lost",
    "asend_unsent",
    "continued",
    "greeting_hint",
    "is_stale_connection_error",
    "merged",
    "no_greeting_hint",
    "quit_timeout",
    "reply_lost",
    "send_unsent",
]

log = logging.getLogger(__name__)

#: Items taken from a streamed batch at a time (the pipeline drains at each boundary).
CHUNK = 256


def is_stale_connection_error(exc: DeliveryError) -> bool:
    """Whether ``exc`` on a reused connection means "the server had dropped it"."""
    if isinstance(exc, ConnectionLost):
        return True
    # RFC 5321 §3.8: 421 is how a server says it is closing the transmission channel.
    return isinstance(exc, SessionRefused) and exc.reply is not None and exc.reply.code == 421


def answer_lost(session: Session) -> bool:
    """Whether a command still awaiting its reply on ``session`` is the end of a message's
    data (the ``.`` line, RFC 5321 §4.1.1.4, or ``BDAT ... LAST``, RFC 3030): the session
    ended after the server had the whole message and before its final reply came, so the
    server may have taken the message (RFC 1047), and sending it again could deliver it
    twice. Not only the oldest: a pipelined ``MAIL``, ``RCPT``, ``BDAT ... LAST`` group
    whose replies a reset destroyed leaves MAIL unanswered first."""
    return answers_lost(session) > 0


def answers_lost(session: Session) -> int:
    """How many messages' whole data went out on ``session`` with their final reply still
    owed (see :func:`answer_lost`; a pipelined run with CHUNKING has several in flight).
    Asked only after a session ended early."""
    return sum(
        isinstance(command, EndOfData) or (isinstance(command, Bdat) and command.last)
        for command in session.unanswered
    )


def reply_lost(message: Message, envelope: Envelope, error: DeliveryError) -> DeliveryResult:
    """The result of a message whose final reply was lost with the connection
    (:func:`answer_lost`): every recipient carries ``error`` (TRANSIENT for a lost
    connection or a timeout), with no host named (the MX plan names the target)."""
    result = failed_result(message, envelope, error)
    return attrs.evolve(
        result,
        recipients=tuple(attrs.evolve(r, host=None) for r in result.recipients),
        host=None,
    )


def merged(
    result: DeliveryResult,
    positions: Sequence[int],
    more: DeliveryResult,
    error: DeliveryError | None = None,
) -> DeliveryResult:
    """``result`` with the recipients at ``positions`` replaced by ``more``'s, in order: a
    message's recipients sent again on another connection (:func:`unsent_positions
    <mailrelay.flow.unsent_positions>`). ``error``: what ended that attempt, if anything."""
    recipients = list(result.recipients)
    for index, recipient in zip(positions, more.recipients, strict=True):
        recipients[index] = recipient
    return attrs.evolve(result, recipients=tuple(recipients), error=error or result.error)


def continued(
    message: Message, envelope: Envelope, result: DeliveryResult
) -> Generator[Envelope, DeliveryResult | DeliveryError, DeliveryResult]:
    """The rounds that send a message's unsent recipients (RFC 9422 MAILMAX reached, the
    session ended between a split message's transactions, refused as one too many) on
    other connections, as a generator the transports drive: it yields the envelope of a
    round and is sent that round's result (or the :class:`DeliveryError` that ended it);
    it returns ``result`` with every round's answers merged in.

    Each round must answer at least one of its recipients otherwise, or the rounds stop
    (the rest keep their TRANSIENT result, for the caller to retry later): at most one
    round per recipient.
    """
    rest = unsent_positions(result)
    for _ in range(len(envelope.recipients)):
        if not rest:
            break
        part = envelope.subset(rest)
        answer = yield part
        if isinstance(answer, DeliveryError):
            return merged(result, rest, failed_result(message, part, answer), answer)
        result = merged(result, rest, answer)
        rest = [rest[index] for index in unsent_positions(answer)]
    return result


def send_unsent(
    message: Message,
    envelope: Envelope,
    result: DeliveryResult,
    send: Callable[[Message, Envelope], DeliveryResult],
) -> DeliveryResult:
    """``result`` after sending its unsent recipients with ``send(message, envelope)``
    (:func:`continued`)."""
    if not unsent_positions(result):
        return result
    rounds = continued(message, envelope, result)
    try:
        part = next(rounds)
        while True:
            answer: DeliveryResult | DeliveryError
            try:
                answer = send(message, part)
            except DeliveryError as exc:
                answer = exc
            part = rounds.send(answer)
    except StopIteration as done:
        final: DeliveryResult = done.value
        return final


async def asend_unsent(
    message: Message,
    envelope: Envelope,
    result: DeliveryResult,
    send: Callable[[Message, Envelope], Awaitable[DeliveryResult]],
) -> DeliveryResult:
    """:func:`send_unsent` for the asyncio transports."""
    if not unsent_positions(result):
        return result
    rounds = continued(message, envelope, result)
    try:
        part = next(rounds)
        while True:
            answer: DeliveryResult | DeliveryError
            try:
                answer = await send(message, part)
            except DeliveryError as exc:
                answer = exc
            part = rounds.send(answer)
    except StopIteration as done:
        final: DeliveryResult = done.value
        return final


def quit_timeout(timeouts: Timeouts) -> float:
    """The longest closing a pool may wait for the QUIT replies of its idle connections.

    The dialogue sends QUIT and reads its reply under the ``quit`` phase limit, so closing
    several connections at once (their QUITs sent concurrently) never waits longer than one
    QUIT may. RFC 5321 §4.1.1.10: the client SHOULD wait for the reply to QUIT before closing.
    """
    return timeouts.quit


def no_greeting_hint(exc: ConnectionLost, settings: ConnectionSettings) -> ConnectionLost:
    """A clearer error when the server hung up before greeting us (the implicit-TLS mistake)."""
    return ConnectionLost(
        f"{exc} without a greeting; if the server expects implicit TLS: {PLAIN_AGAINST_IMPLICIT}",
        host=settings.peer,
    )


def greeting_hint(
    exc: ConnectionLost, settings: ConnectionSettings, bytes_received: int
) -> ConnectionLost | None:
    """:func:`no_greeting_hint` when a plain connection ended before the server sent a
    single byte (so perhaps it expected implicit TLS), or ``None`` for ``exc`` as it is."""
    if bytes_received == 0 and settings.tls is not TLS.IMPLICIT:
        return no_greeting_hint(exc, settings)
    return None


class _Driver(Protocol):
    """What the pool needs to know of a driver (blocking or asyncio)."""

    @property
    def closed(self) -> bool: ...  # pragma: no cover - a protocol

    def has_input(self) -> bool: ...  # pragma: no cover - a protocol


D = TypeVar("D", bound=_Driver)


class PooledConnection(Generic[D]):
    """One open session on one driver, with the bookkeeping the policy reads.

    Attributes:
        driver: the blocking or asyncio driver.
        session: the dialogue running on it.
        messages: how many messages it has carried (final answers received).
        last_used: :func:`time.monotonic` when it was last given back to the pool.
    """

    def __init__(self, driver: D, session: Session) -> None:
        self.driver = driver
        self.session = session
        self.messages = 0
        self.last_used = time.monotonic()

    @property
    def usable(self) -> bool:
        """Whether neither the socket nor the session has been closed."""
        return not self.driver.closed and not self.session.closed


def _transactions_left(session: Session) -> int | None:
    """How many more transactions the server's ``LIMITS MAILMAX`` (RFC 9422) lets
    ``session`` begin, or None when it announced no such limit."""
    most = session.extensions.mail_max
    return None if most is None else most - session.transactions


class IdleVerdict(enum.Enum):
    """What to do with a connection taken from the idle list."""

    #: Closed by the server, or idle too long: QUIT it (if it can) and take another.
    DISCARD = "discard"
    #: Idle long enough to doubt: send NOOP, and reuse it only if that succeeds.
    CHECK = "check"
    #: Use it as it is.
    REUSE = "reuse"


@attrs.frozen(kw_only=True)
class Settlement:
    """How a pipelined run's outcome turns into results.

    Attributes:
        answered: the results of the run's first messages, in order (those with a final
            answer before anything went wrong).
        failure: the error the first unanswered message gets as its result, or ``None``
            when nothing failed or it is to be sent again on a fresh connection.
    """

    answered: tuple[DeliveryResult, ...]
    failure: DeliveryError | None
    failed: int = 1
    """How many messages after the answered ones get :attr:`failure` (the first, and any
    later one whose whole data went out too: see :func:`answers_lost`)."""

    @property
    def done(self) -> int:
        """How many of the run's messages have a result now (answered, plus the failed ones)."""
        return len(self.answered) + (self.failed if self.failure is not None else 0)

    def results(self, run: Sequence[tuple[Message, Envelope]]) -> tuple[DeliveryResult, ...]:
        """The results of the first :attr:`done` items of ``run`` (the messages sent, in
        order): the answered ones, then the failed ones, whose every recipient carries the
        error (:func:`~mailrelay.transport.base.failed_result`)."""
        if self.failure is None:
            return self.answered
        first = len(self.answered)
        failure = self.failure
        return (
            *self.answered,
            *(failed_result(m, e, failure) for m, e in run[first : first + self.failed]),
        )


@attrs.frozen(kw_only=True)
class PoolPolicy:
    """The pool's decisions for one server, without I/O (see the module docstring).

    Attributes:
        pool: the pool's settings.
        peer: the server, for log messages.
        logger: where the decisions are logged (the transport's own logger, so records keep
            the logger name they had before this policy was shared).
    """

    pool: PoolSettings
    peer: str
    logger: logging.Logger = attrs.field(default=log, repr=False, eq=False)

    def closed_error(self, transport: str) -> TransportClosed:
        """The error for a send after ``close()``."""
        return TransportClosed(
            f"{transport} for {self.peer} is closed: open a new transport to send"
        )

    def expired(self, connection: PooledConnection[D], now: float) -> bool:
        """Whether an idle connection has been idle longer than ``idle_timeout``."""
        return now - connection.last_used > self.pool.idle_timeout

    def idle_verdict(self, connection: PooledConnection[D], now: float) -> IdleVerdict:
        """What to do with ``connection``, just taken from the idle list."""
        idle = now - connection.last_used
        if not connection.usable or idle > self.pool.idle_timeout:
            self.logger.debug(
                "idle connection to %s %s; reconnecting",
                self.peer,
                "expired" if connection.usable else "was closed by the server",
            )
            return IdleVerdict.DISCARD
        if idle > self.pool.health_check_after:
            return IdleVerdict.CHECK
        return IdleVerdict.REUSE

    def failed_check(self) -> None:
        """Note that an idle connection failed its NOOP (the caller closes it)."""
        self.logger.debug("idle connection to %s failed NOOP; reconnecting", self.peer)

    def heard_while_idle(self) -> None:
        """Note that the server sent something, or closed, while a connection was idle
        (``has_input``; the caller closes it, without QUIT: its replies would be misread)."""
        self.logger.debug(
            "idle connection to %s: the server sent something unasked or closed; reconnecting",
            self.peer,
        )

    def keeps(self, connection: PooledConnection[D]) -> bool:
        """Whether a connection just used may go back to the idle list (it is open and
        has carried fewer than ``max_messages``, and fewer transactions than the server's
        ``LIMITS MAILMAX``)."""
        return connection.usable and not self.full(connection)

    def full(self, connection: PooledConnection[D]) -> bool:
        """Whether ``connection`` has carried ``max_messages``, or begun as many
        transactions as the server's ``LIMITS MAILMAX`` allows (RFC 9422), and must be
        replaced."""
        if connection.messages >= self.pool.max_messages:
            return True
        left = _transactions_left(connection.session)
        return left is not None and left <= 0

    def room(self, connection: PooledConnection[D]) -> int:
        """How many messages the next pipelined run may put on ``connection`` (at least one):
        what ``max_messages`` and the server's ``MAILMAX`` leave."""
        room = self.pool.max_messages - connection.messages
        left = _transactions_left(connection.session)
        if left is not None and left < room:
            room = left
        return max(1, room)

    def resend_on_fresh(
        self, exc: DeliveryError, *, reused: bool, answer_lost: bool = False
    ) -> bool:
        """Whether a single send that failed with ``exc`` is made again on a fresh
        connection (only on a reused connection that turned out to be dead, and not when
        the message's final reply was lost: ``answer_lost``, see the module docstring)."""
        if not (reused and is_stale_connection_error(exc)):
            return False
        if answer_lost and exc.reply is None:
            self._taken_maybe(exc)
            return False
        self.logger.info(
            "the reused connection to %s was dead (%s); sending on a fresh one", self.peer, exc
        )
        return True

    def _taken_maybe(self, exc: DeliveryError) -> None:
        self.logger.info(
            "the connection to %s ended (%s) after the server had a whole message and before "
            "its reply; not sending that message again (it may have been delivered)",
            self.peer,
            exc,
        )

    def settle(
        self, outcome: BatchOutcome, *, sent: int, carried: int, answer_lost: int = 0
    ) -> Settlement:
        """Turn the outcome of a pipelined run of ``sent`` messages, on a connection that
        had carried ``carried`` before it, into results.

        After an early end, the first unanswered message is sent again when the connection
        had carried messages before it and the end looks like a stale connection, unless its
        final reply was lost (``answer_lost``: how many messages' whole data went out
        unanswered, :func:`answers_lost`; see the module docstring); otherwise it gets the
        error as its result, and so does each later one of those ``answer_lost`` messages
        (never sent again either). Results after them can only be refusals made before
        sending (replies come in order), so they are simply made again next time.
        """
        answered: list[DeliveryResult] = []
        for result in outcome.results:
            if result is None:
                break
            answered.append(result)
        error = outcome.error
        failure: DeliveryError | None = None
        failed = 1
        if error is not None and len(answered) < sent:
            stale = carried + len(answered) > 0 and is_stale_connection_error(error)
            if answer_lost and error.reply is None:
                # RFC 1047: none of them goes again, stale connection or not.
                failed = max(1, min(answer_lost, sent - len(answered)))
            if stale and answer_lost and error.reply is None:
                self._taken_maybe(error)
                failure = error
            elif stale:
                self.logger.info(
                    "the connection to %s ended (%s); sending the %d unanswered message(s) "
                    "on a fresh one",
                    error.host,
                    error,
                    sent - len(answered),
                )
            else:
                failure = error
        return Settlement(answered=tuple(answered), failure=failure, failed=failed)


C = TypeVar("C", bound=PooledConnection[Any])


class ExchangerPool(Generic[C]):
    """Idle sessions by key (the MX transports key them by
    :func:`~mailrelay.transport.mx.reuse_key`); decisions only, no I/O (the transports QUIT
    what it hands back, and lock around it where threads share it).

    Args:
        settings: ``size`` is the most idle sessions kept (across exchangers), and
            ``max_messages``, ``idle_timeout``, ``health_check_after`` mean what they mean
            for the SMTP pool.
        logger: where the pool's decisions are logged (the transport's own logger).
    """

    def __init__(self, settings: PoolSettings, *, logger: logging.Logger = log) -> None:
        self.settings = settings
        self.policy = PoolPolicy(pool=settings, peer="the exchangers", logger=logger)
        self._idle: dict[Hashable, list[C]] = {}
        self.closed = False
        self.opened = 0

    def __len__(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    def take(self, key: Hashable, now: float) -> tuple[C | None, bool, list[C]]:
        """An idle session for ``key`` (the most recently used), whether it must pass a NOOP
        first, and the sessions found too old or closed on the way (to QUIT)."""
        idle = self._idle.get(key)
        stale: list[C] = []
        while idle:
            connection = idle.pop()
            verdict = self.policy.idle_verdict(connection, now)
            if verdict is IdleVerdict.DISCARD:
                stale.append(connection)
                continue
            return connection, verdict is IdleVerdict.CHECK, stale
        self._idle.pop(key, None)
        return None, False, stale

    def put(self, key: Hashable, connection: C, now: float) -> list[C]:
        """Keep ``connection`` idle under ``key``; returns the sessions to QUIT: this one
        if it may not be kept, the expired ones, and the least recently used beyond ``size``."""
        connection.last_used = now
        if self.closed or not self.policy.keeps(connection):
            return [connection]
        self._idle.setdefault(key, []).append(connection)
        leaving = self.expired(now)
        while len(self) > self.settings.size:
            oldest_key = min(self._idle, key=lambda k: self._idle[k][0].last_used)
            leaving.append(self._idle[oldest_key].pop(0))
            if not self._idle[oldest_key]:
                del self._idle[oldest_key]
        return leaving

    def expired(self, now: float) -> list[C]:
        """Remove and return the idle sessions older than ``idle_timeout``."""
        leaving: list[C] = []
        for key in list(self._idle):
            keep: list[C] = []
            for connection in self._idle[key]:
                (leaving if self.policy.expired(connection, now) else keep).append(connection)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        return leaving

    def drain(self) -> list[C]:
        """Remove and return every idle session."""
        leaving = [c for idle in self._idle.values() for c in idle]
        self._idle.clear()
        return leaving


def unanswered(size: int, error: DeliveryError) -> BatchOutcome:
    """The outcome of a pipelined run of ``size`` messages that ended in ``error`` raised
    by the driver before any answer was returned."""
    return BatchOutcome(results=(None,) * size, error=error)
