"""A hostile SMTP server on loopback whose misbehaviour is chosen, command by command, by a plan.

Theory of operation: unlike :mod:`tests.peers.scripted`, whose scripts spell out one
connection's bytes in order, this server *understands* the client's commands (greeting,
EHLO, HELO, MAIL, RCPT, DATA and its content, BDAT, RSET, NOOP, QUIT) and answers each as a
:class:`Plan` says: the ``n``-th time the server reaches a :class:`Point` (counted across
all its connections) it behaves as the plan's ``n``-th :class:`Behaviour` for that point,
and normally once the plan's list for the point runs out. So a plan drawn by Hypothesis
says "the second RCPT is answered 452, the first end of data waits, then resets" without
knowing how many connections the client will open or how it pipelines.

What the server did is recorded per connection (:class:`ConnectionRecord`): the extensions
it offered, each transaction (:class:`TransactionRecord`: the sender, the code it gave MAIL,
each RCPT and DATA, the data it took and the code of its final reply), how many commands it
read, and how the connection ended. A code is recorded only for a well-formed reply the
server actually wrote; a malformed one, garbage, silence or a hang-up records ``None``.
Tests compare the client's results with these records.

Rules:

- Loopback only (``127.0.0.1``, or another 127.0.0.0/8 address given as ``host``);
  blocking sockets, one thread per connection plus one accept thread (the listener,
  threads and line reading are :mod:`tests.peers.threaded`'s). Every wait has a timeout,
  every loop a bound in count or time (a connection's whole life is bounded by
  ``session_limit``); :meth:`HostileServer.stop` wakes and joins every thread and fails
  loudly when one does not end. Every socket is closed by its own thread.
- Faults are terminal where the protocol gives no way back: after a malformed reply,
  garbage or a reply without its line end the server goes silent, closes or resets (its
  :class:`Ending`); after 421 it closes (RFC 5321 §3.8); an endless reply runs until the
  client hangs up or ``endless_limit`` octets have gone out. The server never sends a
  well-formed reply the client did not ask for, nor leaves a command unanswered, except
  where the plan asks for that fault on purpose (an LMTP plan's ``extra_finals``, a
  behaviour's ``strays``, :attr:`Behaviour.skip`; each recorded in
  :attr:`ConnectionRecord.events`), so without those the client's reading of the replies
  and the records always agree on which reply answered which command.
- Every connection the plan does not reset ends with a lingering close (our side shut, the
  client's input taken until it hangs up, bounded): closing with unread input would make
  the kernel send a RST, which can destroy replies the client had not read yet.
- A socket error (the client hung up or reset) ends a connection and is recorded in
  :attr:`ConnectionRecord.ended`, never an error: hostile tests expect clients to give up.
  Any other exception inside the server is a bug in the test and is collected in
  :attr:`HostileServer.errors`.
"""

from __future__ import annotations

import contextlib
import enum
import re
import socket
import threading
import time
from collections.abc import Mapping

import attrs

from tests.peers.threaded import Ended, LinePeer, ThreadedServer

__all__ = [
    "MALFORMED_REPLIES",
    "NORMAL",
    "NORMAL_CODES",
    "Behaviour",
    "ConnectionRecord",
    "Ending",
    "HostileServer",
    "Kind",
    "Plan",
    "Point",
    "TransactionRecord",
]

_MAX_LINE = 65536
_MAX_CONTENT = 4 * 1024 * 1024
_MAX_COMMANDS = 10_000
_MARKER = re.compile(rb"MARK-(\d+)\b")
_BDAT = re.compile(rb"^BDAT\s+(\d+)(\s+LAST)?\s*$", re.IGNORECASE)
_PATH = re.compile(rb"<([^>]*)>")


class Point(enum.Enum):
    """A place in the dialogue where the server answers."""

    GREETING = "greeting"
    EHLO = "ehlo"
    HELO = "helo"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    DATA_END = "data-end"
    """The final reply, after DATA's content or a ``BDAT ... LAST`` chunk."""
    BDAT = "bdat"
    """The reply to a BDAT chunk that is not the last (RFC 3030 §2)."""
    RSET = "rset"
    NOOP = "noop"
    QUIT = "quit"
    OTHER = "other"
    """Any other command line."""


#: What a well-behaved server answers at each point.
NORMAL_CODES: Mapping[Point, int] = {
    Point.GREETING: 220,
    Point.EHLO: 250,
    Point.HELO: 250,
    Point.MAIL: 250,
    Point.RCPT: 250,
    Point.DATA: 354,
    Point.DATA_END: 250,
    Point.BDAT: 250,
    Point.RSET: 250,
    Point.NOOP: 250,
    Point.QUIT: 221,
    Point.OTHER: 500,
}


class Kind(enum.Enum):
    """How the server answers at one point."""

    REPLY = "reply"
    """A well-formed reply (after ``delay``), single- or multi-line."""
    MALFORMED = "malformed"
    """``payload``, a reply the RFC 5321 §4.2 grammar rejects, then the ``ending``."""
    GARBAGE = "garbage"
    """``payload``, arbitrary bytes starting with a letter (never a reply), then the ``ending``."""
    NO_CRLF = "no-crlf"
    """A reply with no line end, then the ``ending``."""
    SILENT = "silent"
    """No answer at all: wait until the client hangs up (bounded), then close."""
    CLOSE = "close"
    """Close the connection without answering (the client reads end of file)."""
    RESET = "reset"
    """Abort the connection with a TCP RST (SO_LINGER 0)."""
    ENDLESS_LINE = "endless-line"
    """A reply line that never ends: its code, then ``x`` for ever (bounded)."""
    ENDLESS_REPLY = "endless-reply"
    """A multi-line reply that never ends: ``250-xxx`` lines for ever (bounded)."""


class Ending(enum.Enum):
    """What follows a malformed reply, garbage or a reply without its line end."""

    SILENT = "silent"
    CLOSE = "close"
    RESET = "reset"


#: Replies the RFC 5321 §4.2 grammar rejects (a letter in the code, 1xx, 6xx, an unknown
#: separator, a multi-line reply that changes its code, a short or empty line, plain text).
MALFORMED_REPLIES: tuple[bytes, ...] = (
    b"25O 2.0.0 a letter in the code\r\n",
    b"199 one hundred and ninety-nine\r\n",
    b"600 six hundred\r\n",
    b"250x an unknown separator\r\n",
    b"250-first line\r\n550 second line with another code\r\n",
    b"25\r\n",
    b"\r\n",
    b"hello there\r\n",
    b"2500 four digits\r\n",
)


@attrs.frozen(kw_only=True)
class Behaviour:
    """How the server answers once, at one point.

    Attributes:
        kind: what it does.
        code: for :attr:`Kind.REPLY` and :attr:`Kind.NO_CRLF`, the reply code; ``None`` is the
            point's usual code (:data:`NORMAL_CODES`).
        multiline: for :attr:`Kind.REPLY`, send the reply as two lines.
        delay: seconds to wait before doing anything.
        payload: the bytes of :attr:`Kind.MALFORMED` and :attr:`Kind.GARBAGE`.
        ending: what follows :attr:`Kind.MALFORMED`, :attr:`Kind.GARBAGE`, :attr:`Kind.NO_CRLF`.
        skip: no answer at all to this command, and carry on reading the next one: one
            reply too few (the next reply the server writes answers a later command in the
            client's count). Not a :class:`Kind`, so that strategies drawing every kind
            never meet it.
        split: for :attr:`Kind.REPLY`, write the reply in two pieces (cut inside its first
            line), :data:`SPLIT_PAUSE` apart.
        strays: for :attr:`Kind.REPLY`, this many well-formed ``stray_code`` replies nobody
            asked for after the reply (a pairing fault on purpose; recorded in
            :attr:`ConnectionRecord.events`). After a ``421`` stray the server closes.
        stray_code: the code of the strays.
        stray_delay: ``0``: the strays go in the same write as the reply. Otherwise, once
            the command is answered (an LMTP data's every final reply), the server waits up
            to this long for the client's next bytes, then writes them:
            ``"stray-mid"`` when the client's next command came first (the strays then
            precede its answer); otherwise, after a ``421`` stray (the server then closes)
            or when nothing more comes for :data:`IDLE_GRACE` after them, ``"stray-idle"``
            (the client was idle: it had them long before it wrote again), and
            ``"stray-raced"`` when the client wrote within that grace (it may have looked
            before they came).
    """

    kind: Kind = Kind.REPLY
    code: int | None = None
    multiline: bool = False
    delay: float = attrs.field(default=0.0, validator=attrs.validators.ge(0.0))
    payload: bytes = b""
    ending: Ending = Ending.CLOSE
    skip: bool = False
    split: bool = False
    strays: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    stray_code: int = 250
    stray_delay: float = attrs.field(default=0.0, validator=attrs.validators.ge(0.0))


#: How long the client must stay quiet after a late stray for it to count as idle.
IDLE_GRACE = 0.3

#: The pause between the two pieces of a :attr:`Behaviour.split` reply.
SPLIT_PAUSE = 0.02

#: Answer as a well-behaved server would.
NORMAL = Behaviour()


@attrs.frozen(kw_only=True)
class Plan:
    """How the server misbehaves.

    Attributes:
        behaviours: per point, the behaviours of its first occurrences (across connections),
            in order; later occurrences, and points not named, are answered normally.
        extensions: the EHLO keywords offered (``"PIPELINING"``, ``"SIZE 1000"``, ...).
        extra_finals: LMTP only: after the first transaction's finals, this many more
            well-formed ``250`` replies nobody asked for (more replies than recipients).
    """

    behaviours: Mapping[Point, tuple[Behaviour, ...]] = attrs.field(factory=dict)
    extensions: tuple[str, ...] = ()
    extra_finals: int = 0


@attrs.define
class TransactionRecord:
    """One mail transaction as the server saw it (from MAIL to its final reply or RSET).

    Attributes:
        sender: the reverse-path of MAIL (``None`` when the data came without a MAIL).
        mail: the code MAIL was answered with.
        recipients: each RCPT's forward-path and the code it was answered with.
        data: the code DATA was answered with.
        chunks: the codes each non-last BDAT chunk was answered with.
        content: the message data taken (DATA content, or the BDAT chunks).
        final: the code of the final reply after the data (SMTP).
        finals: LMTP (RFC 2033 §4.2): each accepted recipient's forward-path and the code of
            its own final reply, in RCPT order; a reply never sent records ``None``, a
            recipient the server gave up before (421, a fault) is missing.
        extras: LMTP: how many unasked-for replies followed the finals
            (:attr:`Plan.extra_finals`).
        complete: whether the server took the whole data (DATA's content up to its
            terminator, or every BDAT chunk up to ``LAST``).
    """

    sender: str | None
    mail: int | None = None
    recipients: list[tuple[str, int | None]] = attrs.field(factory=list)
    data: int | None = None
    chunks: list[int | None] = attrs.field(factory=list)
    content: bytearray = attrs.field(factory=bytearray)
    final: int | None = None
    finals: list[tuple[str, int | None]] = attrs.field(factory=list)
    extras: int = 0
    complete: bool = False

    @property
    def marker(self) -> int | None:
        """The number ``n`` of the ``MARK-n`` in the data taken, if any."""
        found = _MARKER.search(bytes(self.content))
        return int(found.group(1)) if found else None

    def codes(self) -> list[int | None]:
        """Every code the server gave in this transaction."""
        return [
            self.mail,
            *(code for _, code in self.recipients),
            self.data,
            *self.chunks,
            self.final,
        ]


@attrs.define(eq=False)
class ConnectionRecord:
    """What happened on one accepted connection.

    Attributes:
        index: the connection's number, in accept order.
        offered: each extension set in force after a positive EHLO (the plan's) or HELO
            (none), in order.
        session_codes: the codes given to the greeting, EHLO and HELO.
        transactions: the transactions, in order.
        commands: how many command lines (and message contents) the server read.
        ended: how the connection ended.
        reset: whether the plan ended it with a RST.
        endless_bytes: how many octets an endless reply sent.
        endless_cut: whether an endless reply ended because the client hung up.
        events: in order, each command's verb as read (upper case; ``"CONTENT"`` for a
            DATA content), ``"skip"`` for a command left unanswered (:attr:`Behaviour.skip`), and
            ``"stray-<point>"``, ``"stray-idle"``, ``"stray-raced"`` or ``"stray-mid"`` for
            replies nobody asked for (:attr:`Behaviour.strays`; ``<point>``: glued to the
            answer there).
    """

    index: int
    offered: list[tuple[str, ...]] = attrs.field(factory=list)
    session_codes: list[tuple[Point, int | None]] = attrs.field(factory=list)
    transactions: list[TransactionRecord] = attrs.field(factory=list)
    commands: int = 0
    ended: str = ""
    reset: bool = False
    endless_bytes: int = 0
    endless_cut: bool = False
    events: list[str] = attrs.field(factory=list)
    done: threading.Event = attrs.field(factory=threading.Event, repr=False)


def _text(code: int) -> str:
    if code == 354:
        return "end data with <CR><LF>.<CR><LF>"
    if 200 <= code < 600:
        klass = code // 100
        return f"{klass}.0.0 hostile says {code}" if klass != 3 else f"hostile says {code}"
    return "hostile"


class _Peer(LinePeer):
    """The server side of one connection."""

    max_line = _MAX_LINE

    def __init__(
        self, sock: socket.socket, record: ConnectionRecord, server: HostileServer
    ) -> None:
        super().__init__(sock, stopping=server.stopping, deadline=server.deadline())
        self.record = record
        self.server = server
        self.current: TransactionRecord | None = None
        self.point = ""
        self.hangup = ""
        self.later: Behaviour | None = None

    # -- writing -----------------------------------------------------------------------------

    def answer(self, point: Point, extensions: tuple[str, ...] = ()) -> int | None:
        """Answer at ``point`` as the plan says; the code of the well-formed reply written,
        or ``None``. Raises ``Ended`` after a terminal behaviour (the caller has recorded
        ``None`` for this answer before calling)."""
        behaviour = self.server.next_behaviour(point)
        self.point = point.value
        if behaviour.delay:
            self.wait(behaviour.delay)
        code = behaviour.code if behaviour.code is not None else NORMAL_CODES[point]
        if behaviour.skip:
            self.record.events.append("skip")
            return None
        match behaviour.kind:
            case Kind.REPLY:
                self.reply(behaviour, self._reply(code, behaviour.multiline, point, extensions))
                if behaviour.strays and behaviour.stray_delay:
                    # Once the answer in hand is recorded (the client may hang up meanwhile).
                    self.later = behaviour
                return code
            case Kind.MALFORMED | Kind.GARBAGE:
                self.send(behaviour.payload)
                self.end(behaviour.ending)
            case Kind.NO_CRLF:
                self.send(f"{code} {_text(code)}".encode())
                self.end(behaviour.ending)
            case Kind.SILENT:
                self.end(Ending.SILENT)
            case Kind.CLOSE:
                self.end(Ending.CLOSE)
            case Kind.RESET:
                self.end(Ending.RESET)
            case Kind.ENDLESS_LINE:
                self.endless(f"{code} ".encode(), b"x" * 4096)
            case Kind.ENDLESS_REPLY:
                self.endless(b"", b"250-" + b"x" * 60 + b"\r\n")
        raise AssertionError(f"unhandled behaviour {behaviour}")  # pragma: no cover

    def reply(self, behaviour: Behaviour, data: bytes) -> None:
        """Write a well-formed reply as ``behaviour`` says: whole or split, with any strays
        glued on. A ``421`` stray ends the connection afterwards (RFC 5321 §3.8)."""
        strays = _stray(behaviour) if not behaviour.stray_delay else b""
        if behaviour.split:
            self.send(data[:2])
            self.wait(SPLIT_PAUSE)
            self.send(data[2:] + strays)
        else:
            self.send(data + strays)
        if strays:
            self.record.events.append(f"stray-{self.point}")
            self.hang_up_after(behaviour)

    def after_answer(self) -> None:
        """Late strays planned by the last answer, then any hang-up a stray 421 asked for."""
        if self.later is not None:
            behaviour, self.later = self.later, None
            self.late_strays(behaviour)
        if self.hangup:
            raise Ended(self.hangup)

    def late_strays(self, behaviour: Behaviour) -> None:
        """Wait up to ``stray_delay`` for the client's next bytes, then write the strays."""
        idle = not self.buffer
        if idle:
            self.sock.settimeout(behaviour.stray_delay)
            with contextlib.suppress(TimeoutError):
                self.buffer += self.recv()
                idle = False
            self.sock.settimeout(self.server.timeout)
        self.send(_stray(behaviour))
        if not idle:
            self.record.events.append("stray-mid")
        elif behaviour.stray_code == 421:
            self.record.events.append("stray-idle")
        else:
            self.sock.settimeout(IDLE_GRACE)
            with contextlib.suppress(TimeoutError):
                self.buffer += self.recv()
                idle = False
            self.sock.settimeout(self.server.timeout)
            self.record.events.append("stray-idle" if idle else "stray-raced")
        self.hang_up_after(behaviour)

    def hang_up_after(self, behaviour: Behaviour) -> None:
        """After a ``421`` stray, close once the answer in hand is recorded (RFC 5321 §3.8)."""
        if behaviour.stray_code == 421:
            self.hangup = "closed after a stray 421"

    @staticmethod
    def _reply(code: int, multiline: bool, point: Point, extensions: tuple[str, ...]) -> bytes:
        if point is Point.EHLO and 200 <= code < 300:
            lines = ["hostile.mailrelay.test", *extensions]
        elif multiline:
            lines = [_text(code), "and a second line"]
        else:
            lines = [_text(code)]
        return b"".join(
            f"{code}{' ' if i == len(lines) - 1 else '-'}{line}\r\n".encode()
            for i, line in enumerate(lines)
        )

    def end(self, ending: Ending) -> None:
        match ending:
            case Ending.CLOSE:
                raise Ended("closed by plan")
            case Ending.RESET:
                self.arm_reset()
                self.record.reset = True
                raise Ended("reset by plan")
            case Ending.SILENT:
                self.take_until_quiet(self.server.silence_limit, poll=0.1)
                raise Ended("silence limit reached")

    def endless(self, head: bytes, piece: bytes) -> None:
        record = self.record
        try:
            self.send(head)
            while record.endless_bytes < self.server.endless_limit:
                if self.server.stopping.is_set():
                    raise Ended("server stopping")
                self.send(piece)
                record.endless_bytes += len(piece)
        except (BrokenPipeError, ConnectionResetError) as exc:
            record.endless_cut = True
            raise Ended(f"endless reply cut by the client: {exc!r}") from exc
        raise Ended("endless limit reached")

    def on_end(self, reason: str, exc: Exception) -> None:
        self.record.ended = reason

    def close(self) -> None:
        self.linger()
        self.sock.close()

    def linger(self) -> None:
        """End a connection the plan does not reset with a FIN the client can read up to:
        shut our side, then take what the client still sends until it hangs up (bounded).
        Closing a socket with unread input makes the kernel send a RST instead, which may
        destroy replies the client had not read yet (as a pipelining client still writing
        would), and the records would then claim replies the client could never see."""
        if self.record.reset:
            return
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
            end = time.monotonic() + self.server.linger_limit
            while time.monotonic() < end and not self.server.stopping.is_set():
                self.sock.settimeout(max(0.01, min(0.1, end - time.monotonic())))
                try:
                    if not self.sock.recv(65536):
                        return
                except TimeoutError:
                    continue

    # -- the dialogue ------------------------------------------------------------------------

    def transaction(self) -> TransactionRecord:
        """The transaction in progress (one is begun for commands sent without MAIL)."""
        if self.current is None:
            self.current = TransactionRecord(sender=None)
            self.record.transactions.append(self.current)
        return self.current

    def run(self) -> None:
        record = self.record
        record.session_codes.append((Point.GREETING, None))
        record.session_codes[-1] = (Point.GREETING, self.answer(Point.GREETING))
        if record.session_codes[-1][1] == 421:
            raise Ended("421 greeting")
        self.after_answer()
        for _ in range(_MAX_COMMANDS):
            line = self.read_line()
            record.commands += 1
            verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper()
            record.events.append(verb.decode("ascii", "replace"))
            code = self.command(verb, line)
            if code == 421:
                raise Ended("closed after 421")  # RFC 5321 §3.8
            self.after_answer()
        raise Ended("too many commands")

    def command(self, verb: bytes, line: bytes) -> int | None:
        record = self.record
        if verb in (b"EHLO", b"HELO"):
            point = Point.EHLO if verb == b"EHLO" else Point.HELO
            offered = self.server.plan.extensions if point is Point.EHLO else ()
            record.session_codes.append((point, None))
            code = self.answer(point, offered)
            record.session_codes[-1] = (point, code)
            if code is not None and 200 <= code < 300:
                record.offered.append(offered)
            return code
        if verb == b"MAIL":
            path = _PATH.search(line)
            sender = path.group(1).decode("utf-8", "replace") if path else ""
            self.current = TransactionRecord(sender=sender)
            record.transactions.append(self.current)
            self.current.mail = code = self.answer(Point.MAIL)
            return code
        if verb == b"RCPT":
            path = _PATH.search(line)
            address = path.group(1).decode("utf-8", "replace") if path else ""
            transaction = self.transaction()
            transaction.recipients.append((address, None))
            code = self.answer(Point.RCPT)
            transaction.recipients[-1] = (address, code)
            return code
        if verb == b"DATA":
            transaction = self.transaction()
            transaction.data = code = self.answer(Point.DATA)
            if code != 354:
                return code
            content = self.read_content(_MAX_CONTENT)
            record.commands += 1
            record.events.append("CONTENT")
            transaction.content += content
            transaction.complete = True
            transaction.final = code = self.answer(Point.DATA_END)
            self.current = None
            return code
        if verb == b"BDAT":
            bdat = _BDAT.match(line)
            if bdat is None:
                return self.answer(Point.OTHER)
            transaction = self.transaction()
            transaction.content += self.read_exact(int(bdat.group(1)))
            if bdat.group(2):
                transaction.complete = True
                transaction.final = code = self.answer(Point.DATA_END)
                self.current = None
                return code
            transaction.chunks.append(None)
            code = self.answer(Point.BDAT)
            transaction.chunks[-1] = code
            return code
        if verb == b"RSET":
            self.current = None
            return self.answer(Point.RSET)
        if verb == b"NOOP":
            return self.answer(Point.NOOP)
        if verb == b"QUIT":
            self.answer(Point.QUIT)
            raise Ended("QUIT")
        return self.answer(Point.OTHER)


class _LMTPPeer(_Peer):
    """The server side of one LMTP connection (RFC 2033): LHLO is answered as EHLO, and
    after the data each recipient whose RCPT got 2xx gets a final reply of its own, each
    one the next :attr:`Point.DATA_END` behaviour (§4.2); a fault or 421 among them ends
    the connection with the rest unsent. The plan's ``extra_finals`` go out once, with the
    last final reply of the first transaction that gets that far."""

    trailer = b""
    trailed = False

    def command(self, verb: bytes, line: bytes) -> int | None:
        if verb == b"LHLO":
            return super().command(b"EHLO", line)
        if verb in (b"EHLO", b"HELO", b"BDAT"):
            return self.answer(Point.OTHER)  # RFC 2033 §4.1: LHLO only; no CHUNKING offered
        if verb != b"DATA":
            return super().command(verb, line)
        transaction = self.transaction()
        accepted = [address for address, code in transaction.recipients if _positive(code)]
        if not accepted:
            # RFC 2033 §4.2: DATA with no successful RCPT is answered 503.
            self.send(b"503 5.5.1 no valid recipients\r\n")
            transaction.data = 503
            return 503
        transaction.data = code = self.answer(Point.DATA)
        if code != 354:
            return code
        transaction.content += self.read_content(_MAX_CONTENT)
        self.record.commands += 1
        self.record.events.append("CONTENT")
        transaction.complete = True
        self.current = None
        extra = self.server.take_extra_finals()
        for position, address in enumerate(accepted, 1):
            transaction.finals.append((address, None))
            if extra and position == len(accepted):
                # In the same write as the last final reply, as a server answering all at
                # once would: the client has them all when it has read that reply.
                self.trailer = b"250 2.0.0 a reply nobody asked for\r\n" * extra
            code = self.answer(Point.DATA_END)
            transaction.finals[-1] = (address, code)
            if self.trailed:
                transaction.extras = extra
            self.trailer, self.trailed = b"", False
            if code == 421 or self.hangup:
                return code
        return code

    def send(self, data: bytes) -> None:
        trailer, self.trailer = self.trailer, b""
        # Only after a whole reply (not glued to a reply without its line end).
        if trailer and data.endswith(b"\r\n"):
            data += trailer
            self.trailed = True
        super().send(data)


def _stray(behaviour: Behaviour) -> bytes:
    code = behaviour.stray_code
    return f"{code} {_text(code)} (nobody asked)\r\n".encode() * behaviour.strays


def _positive(code: int | None) -> bool:
    return code is not None and 200 <= code < 300


class HostileServer(ThreadedServer[ConnectionRecord]):
    """An SMTP server on 127.0.0.1 that misbehaves as a :class:`Plan` says (see the module
    docstring).

    Args:
        plan: the misbehaviour.
        silence_limit: the longest a silent connection waits for the client to hang up.
        linger_limit: the longest a closing connection takes the client's input (see
            ``_Peer.linger``) before it closes anyway.
        endless_limit: the most octets an endless reply sends.
        timeout, session_limit: the socket wait and connection time limits, in seconds (see
            :class:`tests.peers.threaded.ThreadedServer`).
        host, port: where to listen (any loopback address; port 0: the kernel picks).
        lmtp: speak LMTP (RFC 2033): see :class:`_LMTPPeer`.
    """

    name = "hostile"
    backlog = 32
    max_polls = 1_000_000

    def __init__(
        self,
        plan: Plan,
        *,
        silence_limit: float = 10.0,
        linger_limit: float = 5.0,
        endless_limit: int = 32 * 1024 * 1024,
        timeout: float = 10.0,
        session_limit: float = 30.0,
        host: str = "127.0.0.1",
        port: int = 0,
        lmtp: bool = False,
    ) -> None:
        self.plan = plan
        self.lmtp = lmtp
        self._extra_finals = plan.extra_finals
        self.silence_limit = silence_limit
        self.linger_limit = linger_limit
        self.endless_limit = endless_limit
        self._counters: dict[Point, int] = {}
        super().__init__(timeout=timeout, session_limit=session_limit)
        if (host, port) != (self.host, 0):
            # Another loopback address (an MX test's second exchanger) or a given port
            # (every exchanger of an MX test listens on one port).
            self._listener.close()
            self.host = host
            self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                self._listener.bind((host, port))
            except OSError:
                self._listener.close()  # the caller may try another port
                raise
            self._listener.listen(self.backlog)
            self._listener.settimeout(0.05)
            self.port = self._listener.getsockname()[1]

    def take_extra_finals(self) -> int:
        """How many unasked-for replies to send now (the plan's, once; thread-safe)."""
        with self._lock:
            extra, self._extra_finals = self._extra_finals, 0
        return extra

    def next_behaviour(self, point: Point) -> Behaviour:
        """The behaviour for the next occurrence of ``point`` (thread-safe)."""
        with self._lock:
            count = self._counters.get(point, 0)
            self._counters[point] = count + 1
        planned = self.plan.behaviours.get(point, ())
        return planned[count] if count < len(planned) else NORMAL

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until every connection accepted so far has ended."""
        end = time.monotonic() + timeout
        with self._lock:
            records = list(self.connections)
        for record in records:
            if not record.done.wait(max(0.0, end - time.monotonic())):
                raise AssertionError(f"connection {record.index} still open after {timeout}s")

    @property
    def connections(self) -> list[ConnectionRecord]:
        """One record per accepted connection, in order."""
        return self.records

    def new_record(self, index: int) -> ConnectionRecord:
        """A new :class:`ConnectionRecord`."""
        return ConnectionRecord(index=index)

    def new_peer(self, sock: socket.socket, record: ConnectionRecord) -> LinePeer:
        """The peer that answers the connection as the plan says."""
        return _LMTPPeer(sock, record, self) if self.lmtp else _Peer(sock, record, self)
