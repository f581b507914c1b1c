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

- Blocking sockets, one thread per connection plus one accept thread; every blocking call has
  a timeout (``timeout``), every loop is bounded in count or time, and :meth:`ScriptedServer.stop`
  joins every thread (failing loudly if one does not end).
- Lines are read from a buffer, so a pipelined group (RFC 2920) is consumed one command per
  step, exactly as a real server would, and a reply can be sent in the middle of the group.
- A command line matching ``BDAT <n>`` (RFC 3030) makes the step also read the ``n`` chunk
  bytes before replying; the :data:`MESSAGE` expectation reads DATA content up to and
  including the ``CRLF.CRLF`` terminator (RFC 5321 §4.1.1.4).
- A socket error (the client hung up) ends the session and is recorded as an event, not an
  error: fault-injection tests expect clients to give up. Any *other* exception inside the
  server is a bug in the test and is collected in :attr:`ScriptedServer.errors`; the fixture
  fails the test when that list is not empty.

The module also offers :func:`free_port`, which the other peers use to pick run-time ports.
"""

from __future__ import annotations

import contextlib
import enum
import re
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import attrs
import pytest

from tests.peers.tls import TLSFiles

ANY = "any"
"""Expectation: read one line, whatever it says."""

MESSAGE = "<message>"
"""Expectation: read DATA content up to and including the ``CRLF.CRLF`` line."""

_MAX_LINE = 65536
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


class _Ended(Exception):
    """The session is over (client hung up, script mismatch, server stopping)."""


class _Connection:
    def __init__(
        self, sock: socket.socket, session: Session, server: ScriptedServer, deadline: float
    ) -> None:
        self.sock: socket.socket = sock
        self.session = session
        self.server = server
        self.buffer = bytearray()
        self.deadline = deadline

    def _recv(self) -> bytes:
        if self.server.stopping.is_set():
            raise _Ended("server stopping")
        if time.monotonic() > self.deadline:
            self.session.events.append("session time limit reached")
            raise _Ended("time limit")
        data = self.sock.recv(65536)
        if not data:
            self.session.events.append("eof")
            raise _Ended("eof")
        self.session.received += data
        return data

    def read_line(self) -> bytes:
        while b"\n" not in self.buffer:
            if len(self.buffer) > _MAX_LINE:
                self.session.events.append("line too long")
                raise _Ended("line too long")
            self.buffer += self._recv()
        line, _, rest = bytes(self.buffer).partition(b"\n")
        self.buffer = bytearray(rest)
        return line.rstrip(b"\r")

    def read_exact(self, count: int) -> bytes:
        while len(self.buffer) < count:
            self.buffer += self._recv()
        data = bytes(self.buffer[:count])
        del self.buffer[:count]
        return data

    def read_message(self) -> bytes:
        lines: list[bytes] = []
        for _ in range(1_000_000):
            line = self.read_line()
            if line == b".":
                return b"\r\n".join(lines)
            lines.append(line)
        raise _Ended("message too long")

    def send(self, data: bytes) -> None:
        if data:
            self.sock.sendall(data)

    def wait(self, seconds: float) -> None:
        if self.server.stopping.wait(seconds):
            raise _Ended("server stopping")

    def run_step(self, step: Step) -> None:
        if step.expect == MESSAGE:
            self.read_message()
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
                raise _Ended("mismatch")
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
                raise _Ended("close")
            case Action.RESET:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.session.events.append("reset by script")
                raise _Ended("reset")
            case Action.START_TLS:
                self.start_tls()
            case Action.FAIL_TLS:
                hello = self.sock.recv(16384)
                self.session.events.append(f"tls refused after {len(hello)} bytes")
                self.send(b"this is not TLS\r\n")
                raise _Ended("fail-tls")
            case Action.SILENT:
                self.session.events.append("silent")
                end = time.monotonic() + step.silence
                while time.monotonic() < end:
                    self.sock.settimeout(max(0.01, min(0.2, end - time.monotonic())))
                    try:
                        self._recv()
                    except TimeoutError:
                        continue
                self.session.events.append("silence over")
                raise _Ended("silence over")
            case Action.ENDLESS:
                self.session.events.append("endless")
                chunk = b"x" * 4096
                for _ in range(_ENDLESS_LIMIT // len(chunk)):
                    if self.server.stopping.is_set():
                        break
                    self.send(chunk)
                self.session.events.append("endless limit reached")
                raise _Ended("endless")

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
            raise _Ended("tls failed") from exc
        self.session.events.append("tls")


class ScriptedServer:
    """A scripted SMTP server on 127.0.0.1 (see the module docstring).

    Args:
        scripts: One script (a sequence of steps) per expected connection, in order.
        ssl_context: The server TLS context for :attr:`Action.START_TLS` and implicit TLS.
        implicit_tls: Start TLS right after accepting, before the script (SMTPS, RFC 8314).
        timeout: Seconds any single socket wait may take.
        session_limit: Seconds a whole session may take.
    """

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
        self.timeout = timeout
        self.session_limit = session_limit
        self.host = "127.0.0.1"
        self.sessions: list[Session] = []
        """One :class:`Session` per accepted connection, in order."""
        self.errors: list[str] = []
        """Unexpected exceptions inside the server (bugs in a test's script)."""
        self.stopping = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind((self.host, 0))
        self._listener.listen(16)
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._acceptor = threading.Thread(target=self._accept_loop, name="scripted-accept")

    def start(self) -> ScriptedServer:
        """Start accepting connections; returns the server itself."""
        self._acceptor.start()
        return self

    def __enter__(self) -> ScriptedServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

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

    def stop(self) -> None:
        """Stop accepting, end every session, and join every thread."""
        self.stopping.set()
        if self._acceptor.is_alive():
            self._acceptor.join(timeout=5.0)
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                # Wake a thread blocked in recv/send; the socket is closed by its own thread.
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            threads = list(self._threads)
        stuck = []
        for thread in threads:
            thread.join(timeout=self.timeout + 5.0)
            if thread.is_alive():
                stuck.append(thread.name)
        if self._acceptor.is_alive():
            stuck.append(self._acceptor.name)
        if stuck:
            raise AssertionError(f"scripted server threads did not end: {stuck}")

    def _accept_loop(self) -> None:
        for _ in range(100_000):
            if self.stopping.is_set():
                return
            try:
                conn, _addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if not self.stopping.is_set():
                    self.errors.append(f"accept failed: {exc!r}")
                return
            conn.settimeout(self.timeout)
            session = Session(len(self.sessions))
            self.sessions.append(session)
            thread = threading.Thread(
                target=self._serve, args=(conn, session), name=f"scripted-{session.index}"
            )
            with self._lock:
                self._sockets.append(conn)
                self._threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket, session: Session) -> None:
        conn = _Connection(sock, session, self, time.monotonic() + self.session_limit)
        try:
            if session.index >= len(self.scripts):
                session.events.append("unscripted connection closed")
                return
            if self.implicit_tls:
                conn.start_tls()
            for step in self.scripts[session.index]:
                conn.run_step(step)
            session.events.append("script finished")
        except _Ended:
            pass
        except (OSError, ssl.SSLError) as exc:
            session.events.append(f"socket error: {exc!r}")
        except Exception as exc:
            self.errors.append(f"session {session.index}: {exc!r}")
        finally:
            try:
                conn.sock.close()
            finally:
                session.done.set()


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
