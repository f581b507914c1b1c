"""A scripted SMTP server on loopback, for the faults a real server will not produce on demand.

Theory of operation: the server listens on ``127.0.0.1`` on a free port and runs one *script*
per accepted connection (the first connection gets ``scripts[0]``, the second ``scripts[1]``;
connections beyond the scripts are closed at once). A script is a list of :class:`Step`; each
step optionally reads one line from the client and checks it against a regular expression,
optionally waits, writes its reply bytes verbatim (the script spells out every CRLF, so it can
also send malformed or pipelined-out-of-order replies), then performs an :class:`Action`:
close, reset, switch to TLS, fail the TLS handshake, stay silent, or send an endless line.

Everything the client sends is recorded raw in :attr:`Session.received` (decrypted bytes
after TLS), with events (``tls``, ``eof``, mismatches) in :attr:`Session.events`.

Rules:

- Blocking sockets, one thread per connection plus one accept thread (the listener, threads
  and line reading are :mod:`tests.peers.threaded`'s); every blocking call has a timeout
  (``timeout``), every loop is bounded in count or time, and :meth:`ScriptedServer.stop`
  joins every thread (failing loudly if one does not end).
- Lines are read from a buffer, so a pipelined group (RFC 2920) is consumed one command per
  step, exactly as a real server would, and a reply can be sent in the middle of the group.
- A command line matching ``BDAT <n>`` (RFC 3030) makes the step also read the ``n`` chunk
  bytes before replying; the :data:`MESSAGE` expectation reads DATA content up to and
  including the ``CRLF.CRLF`` terminator (RFC 5321 §4.1.1.4), at most 64 MiB of it.
- A socket error (the client hung up) ends the session and is recorded as an event, not an
  error: fault-injection tests expect clients to give up. Any *other* exception inside the
  server is a bug in the test and is collected in :attr:`ScriptedServer.errors`; the fixture
  fails the test when that list is not empty.

The module also offers :func:`free_port`, which the other peers use to pick run-time ports.
"""

from __future__ import annotations

import enum
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import attrs
import pytest

from tests.peers.threaded import Ended, LinePeer, ThreadedServer
from tests.peers.tls import TLSFiles

ANY = "any"
"""Expectation: read one line, whatever it says."""

MESSAGE = "<message>"
"""Expectation: read DATA content up to and including the ``CRLF.CRLF`` line."""

_MAX_LINE = 65536
_MAX_CONTENT = 64 * 1024 * 1024
_ENDLESS_LIMIT = 16 * 1024 * 1024
_BDAT = re.compile(rb"^BDAT\s+(\d+)", re.IGNORECASE)


def free_port(*, ipv6: bool = False) -> int:
    """A TCP port that is free on 127.0.0.1 right now (and on ::1 too when ``ipv6``).

    The kernel picks the port (bind to port 0), so two test runs at the same time do not
    collide; the small window between closing this probe and the peer binding the port is
    accepted for tests.
    """
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
            if not ipv6:
                return port
            try:
                with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe6:
                    probe6.bind(("::1", port))
            except OSError:
                continue
            return port
    where = "127.0.0.1 and ::1 (is the IPv6 loopback enabled?)" if ipv6 else "127.0.0.1"
    raise RuntimeError(f"no free port on {where} in 50 tries")


class Action(enum.Enum):
    """What a step does after writing its reply."""

    NONE = "none"
    """Go on with the next step."""
    CLOSE = "close"
    """Close the connection cleanly (the client reads EOF)."""
    RESET = "reset"
    """Abort the connection with a TCP RST (SO_LINGER 0)."""
    START_TLS = "start-tls"
    """Run the server side of a TLS handshake, then go on encrypted (RFC 3207)."""
    FAIL_TLS = "fail-tls"
    """Read the ClientHello, answer with plaintext garbage and close: the handshake fails."""
    SILENT = "silent"
    """Send nothing more; read and record until the client hangs up or ``silence`` ends."""
    ENDLESS = "endless"
    """Keep writing ``x`` bytes with no line end until the client hangs up (bounded)."""


@attrs.frozen(kw_only=True)
class Step:
    """One step of a script.

    Attributes:
        expect: ``None`` reads nothing (a greeting, or unsolicited bytes); :data:`ANY` reads
            one line; :data:`MESSAGE` reads DATA content through ``CRLF.CRLF``; anything else
            is a regular expression that must match the whole line (without CRLF,
            case-insensitive). A mismatch is recorded and ends the session with a 500 reply.
        reply: Bytes written verbatim after the read (include the CRLFs).
        delay: Seconds to wait before writing the reply.
        dribble: When positive, the reply goes out one byte at a time, this many seconds
            apart (a server that keeps a client waiting while always sending something).
        action: What to do after the reply.
        silence: For :attr:`Action.SILENT`, the longest time to stay silent.
    """

    expect: str | None = None
    reply: bytes = b""
    delay: float = attrs.field(default=0.0, validator=attrs.validators.ge(0.0))
    dribble: float = attrs.field(default=0.0, validator=attrs.validators.ge(0.0))
    action: Action = Action.NONE
    silence: float = attrs.field(default=10.0, validator=attrs.validators.ge(0.0))


class Session:
    """What happened on one accepted connection."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.received = bytearray()
        """Every byte the client sent, in order (decrypted after TLS)."""
        self.events: list[str] = []
        """Notable events: ``tls``, ``tls-failed: ...``, ``eof``, ``mismatch: ...``, ..."""
        self.done = threading.Event()
        """Set when the session has ended."""

    @property
    def lines(self) -> list[bytes]:
        """The received bytes split into CRLF-terminated lines (terminators removed)."""
        return bytes(self.received).split(b"\r\n")[:-1] if self.received else []

    def __repr__(self) -> str:
        return f"<Session {self.index} events={self.events!r} received={bytes(self.received)!r}>"


class _Connection(LinePeer):
    max_line = _MAX_LINE

    def __init__(
        self, sock: socket.socket, session: Session, server: ScriptedServer, deadline: float
    ) -> None:
        super().__init__(sock, stopping=server.stopping, deadline=deadline)
        self.session = session
        self.server = server

    def on_received(self, data: bytes) -> None:
        self.session.received += data

    def on_event(self, event: str) -> None:
        self.session.events.append(event)

    def on_end(self, reason: str, exc: Exception) -> None:
        # The steps record the ends that matter to tests as events; a socket error is one too
        # (a bug in the server goes to ``errors`` instead, an ordinary end to nothing).
        if isinstance(exc, OSError):
            self.session.events.append(reason)

    def run(self) -> None:
        session, server = self.session, self.server
        if session.index >= len(server.scripts):
            session.events.append("unscripted connection closed")
            return
        if server.implicit_tls:
            self.start_tls()
        for step in server.scripts[session.index]:
            self.run_step(step)
        session.events.append("script finished")

    def run_step(self, step: Step) -> None:
        if step.expect == MESSAGE:
            self.read_content(_MAX_CONTENT)
        elif step.expect is not None:
            line = self.read_line()
            bdat = _BDAT.match(line)
            if bdat:
                self.read_exact(int(bdat.group(1)))
            if step.expect != ANY and not re.fullmatch(
                step.expect, line.decode("utf-8", "replace"), re.IGNORECASE | re.DOTALL
            ):
                self.session.events.append(f"mismatch: expected {step.expect!r}, got {line!r}")
                self.send(b"500 5.5.1 scripted server: unexpected command\r\n")
                raise Ended("mismatch")
        if step.delay:
            self.wait(step.delay)
        if step.dribble:
            for index in range(len(step.reply)):
                if index:
                    self.wait(step.dribble)
                self.send(step.reply[index : index + 1])
        else:
            self.send(step.reply)
        self.act(step)

    def act(self, step: Step) -> None:
        match step.action:
            case Action.NONE:
                return
            case Action.CLOSE:
                self.session.events.append("closed by script")
                raise Ended("close")
            case Action.RESET:
                self.arm_reset()
                self.session.events.append("reset by script")
                raise Ended("reset")
            case Action.START_TLS:
                self.start_tls()
            case Action.FAIL_TLS:
                hello = self.sock.recv(16384)
                self.session.events.append(f"tls refused after {len(hello)} bytes")
                self.send(b"this is not TLS\r\n")
                raise Ended("fail-tls")
            case Action.SILENT:
                self.session.events.append("silent")
                self.take_until_quiet(step.silence, poll=0.2)
                self.session.events.append("silence over")
                raise Ended("silence over")
            case Action.ENDLESS:
                self.session.events.append("endless")
                chunk = b"x" * 4096
                for _ in range(_ENDLESS_LIMIT // len(chunk)):
                    if self.server.stopping.is_set():
                        break
                    self.send(chunk)
                self.session.events.append("endless limit reached")
                raise Ended("endless")

    def start_tls(self) -> None:
        if self.buffer:
            # The client must wait for the 220 before the handshake (RFC 3207 §4); bytes it
            # pipelined after STARTTLS are recorded and dropped, as Postfix does.
            self.session.events.append(f"client sent {bytes(self.buffer)!r} before TLS")
            self.buffer.clear()
        context = self.server.ssl_context
        if context is None:
            raise RuntimeError("this scripted server has no TLS certificate")
        try:
            self.sock = context.wrap_socket(self.sock, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            self.session.events.append(f"tls-failed: {exc}")
            raise Ended("tls failed") from exc
        self.session.events.append("tls")


class ScriptedServer(ThreadedServer[Session]):
    """A scripted SMTP server on 127.0.0.1 (see the module docstring).

    Args:
        scripts: One script (a sequence of steps) per expected connection, in order.
        ssl_context: The server TLS context for :attr:`Action.START_TLS` and implicit TLS.
        implicit_tls: Start TLS right after accepting, before the script (SMTPS, RFC 8314).
        timeout, session_limit: The socket wait and session time limits, in seconds (see
            :class:`tests.peers.threaded.ThreadedServer`).
    """

    name = "scripted"
    record_name = "session"

    def __init__(
        self,
        scripts: Sequence[Sequence[Step]],
        *,
        ssl_context: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
        timeout: float = 5.0,
        session_limit: float = 30.0,
    ) -> None:
        self.scripts = [tuple(script) for script in scripts]
        self.ssl_context = ssl_context
        self.implicit_tls = implicit_tls
        super().__init__(timeout=timeout, session_limit=session_limit)

    def session(self, index: int = 0, timeout: float = 5.0) -> Session:
        """The ``index``-th session once it has ended (waits at most ``timeout`` seconds)."""
        end = time.monotonic() + timeout
        while len(self.sessions) <= index:
            if time.monotonic() > end:
                raise AssertionError(f"no connection number {index} within {timeout}s")
            time.sleep(0.01)
        session = self.sessions[index]
        if not session.done.wait(max(0.0, end - time.monotonic())):
            raise AssertionError(f"session {index} still running after {timeout}s: {session!r}")
        return session

    @property
    def sessions(self) -> list[Session]:
        """One :class:`Session` per accepted connection, in order."""
        return self.records

    def new_record(self, index: int) -> Session:
        """A new :class:`Session`."""
        return Session(index)

    def new_peer(self, sock: socket.socket, session: Session) -> LinePeer:
        """The peer that runs the session's script."""
        return _Connection(sock, session, self, self.deadline())


# -- script building blocks ---------------------------------------------------------------


def greeting(text: str = "220 scripted.mailrelay.test ESMTP scripted") -> Step:
    """The server greeting (RFC 5321 §4.2)."""
    return Step(reply=text.encode() + b"\r\n")


def ehlo(*extensions: str, hostname: str = "scripted.mailrelay.test") -> Step:
    """Read EHLO and answer with ``extensions`` (RFC 5321 §4.1.1.1)."""
    lines = [hostname, *extensions]
    reply = b"".join(
        b"250" + (b" " if i == len(lines) - 1 else b"-") + line.encode("utf-8") + b"\r\n"
        for i, line in enumerate(lines)
    )
    return Step(expect=r"EHLO .+", reply=reply)


def accept_message(recipients: int = 1) -> list[Step]:
    """MAIL, ``recipients`` x RCPT, DATA, the content, each answered positively."""
    return [
        Step(expect=r"MAIL FROM:<.*>.*", reply=b"250 2.1.0 Ok\r\n"),
        *[Step(expect=r"RCPT TO:<.*>.*", reply=b"250 2.1.5 Ok\r\n")] * recipients,
        Step(expect="DATA", reply=b"354 End data with <CR><LF>.<CR><LF>\r\n"),
        Step(expect=MESSAGE, reply=b"250 2.0.0 Ok: queued as SCRIPTED\r\n"),
    ]


def quit_step() -> Step:
    """Read QUIT, answer 221 and close (RFC 5321 §4.1.1.10)."""
    return Step(expect="QUIT", reply=b"221 2.0.0 Bye\r\n", action=Action.CLOSE)


ScriptedServerFactory = Callable[..., ScriptedServer]
"""The type of the ``scripted_server`` fixture, for annotating tests."""


@pytest.fixture
def scripted_server(tls_files: TLSFiles) -> Iterator[ScriptedServerFactory]:
    """A factory: ``scripted_server(scripts, *, implicit_tls=False, tls="trusted")``.

    ``tls`` is ``"trusted"`` (the CA-signed certificate of ``tls_files``), ``"untrusted"``
    (a self-signed one, so client verification fails) or ``None`` (no TLS). Every server
    made is stopped at teardown, and the test fails if a server thread raised.
    """
    servers: list[ScriptedServer] = []

    def make(
        scripts: Sequence[Sequence[Step]],
        *,
        implicit_tls: bool = False,
        tls: str | None = "trusted",
        timeout: float = 5.0,
    ) -> ScriptedServer:
        context = None if tls is None else tls_files.server_context(trusted=tls == "trusted")
        server = ScriptedServer(
            scripts, ssl_context=context, implicit_tls=implicit_tls, timeout=timeout
        )
        servers.append(server)
        return server.start()

    yield make
    errors = []
    for server in servers:
        server.stop()
        errors.extend(server.errors)
    assert not errors, f"scripted server errors: {errors}"
