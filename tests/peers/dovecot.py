"""A throw-away Dovecot LMTP server on loopback: the mail store real deployments deliver to.

Theory of operation: the session fixture :func:`dovecot` writes a ``dovecot.conf`` and a
``passwd-file`` into a fresh temporary directory and starts ``dovecot -F -c <dir>/dovecot.conf``
as a child process (the master in the foreground). Only LMTP runs (``protocols = lmtp``), on
``127.0.0.1`` at a free port and on a unix socket in the directory; the runtime directory
(``base_dir``), ``state_dir``, the log and the Maildirs are in the directory too. Nothing in
``/etc/dovecot`` is read (``-c`` names the only configuration file) and a system Dovecot, if
one runs, is never touched: its ``base_dir`` is elsewhere.

Users (``passwd-file`` as passdb and userdb; Maildirs under ``mail/<user>/Maildir``):

=========================== ================================================================
``alice@``, ``bob@``,       ordinary mailboxes
``carol@lmtp.mailrelay.test``
``full@``                   ``quota_rule = *:storage=1B``: every message is refused *after
                            the data* with ``552 5.2.2 <full@...> Quota exceeded``
``later@``                  the same quota and ``quota_full_tempfail = yes``: ``452 4.2.2``
``broken@``                 its Maildir cannot be created (a root-owned directory): ``451
                            4.2.0 <broken@...> Internal error occurred. ...`` after the data
any other user              ``550 5.1.1 <...> User doesn't exist`` at RCPT
=========================== ================================================================

Dovecot 2.3.19's LHLO offers ``8BITMIME CHUNKING ENHANCEDSTATUSCODES PIPELINING``: no SIZE (a
``SIZE=`` parameter gets ``555 5.5.4``), no DSN, no SMTPUTF8, no STARTTLS (``ssl = no``).
``mail_save_crlf = yes`` makes the Maildir files keep the CRLFs the client sent, so a test can
compare them byte for byte after the headers Dovecot prepends (``Return-Path``,
``Delivered-To`` for a single recipient, ``Received``; see :func:`strip_trace_headers`).

Running as root in a container: the master, log and config processes stay root; the auth and
other internal processes run as ``nobody`` (``default_internal_user``, ``default_login_user``)
and mail is written as ``nobody:nogroup`` (``mail_uid``/``mail_gid``; ``first_valid_uid = 0``
lets the userdb's empty uid pass), so the Maildir root is owned by ``nobody``.

:class:`DovecotInstance` also records conversations: :meth:`DovecotInstance.recorder` starts a
small TCP relay in front of the LMTP port that keeps every byte Dovecot sent, so a test can
compare a :class:`~mailrelay.results.RecipientResult` with the very line Dovecot answered.

The fixture fails (never skips) with the install command when Dovecot is missing or the tests
do not run as root. At teardown it sends SIGTERM to the master it started (by PID), waits for
it, and checks that every process it had forked is gone; a straggler is killed by its PID.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from tests.peers.scripted import free_port

APT_PACKAGES = ("dovecot-core", "dovecot-lmtpd")
INSTALL_HINT = (
    "DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "
    + " ".join(APT_PACKAGES)
)

DOMAIN = "lmtp.mailrelay.test"
MAILBOXES = ("alice", "bob", "carol")
"""Local parts of the ordinary users."""
OVER_QUOTA = "full"
"""Local part of the user whose every message is refused over quota (552 5.2.2)."""
OVER_QUOTA_TEMPFAIL = "later"
"""Local part of the over-quota user Dovecot defers instead (452 4.2.2)."""
UNWRITABLE = "broken"
"""Local part of the user whose Maildir cannot be created (451 4.2.0 after the data)."""
USERS = (*MAILBOXES, OVER_QUOTA, OVER_QUOTA_TEMPFAIL, UNWRITABLE)

_SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/bin")
_START_TIMEOUT = 20.0
_STOP_TIMEOUT = 10.0
# Dovecot's LMTP prepends these trace fields to each delivered message (RFC 5321 §4.4).
_TRACE_FIELDS = (b"return-path:", b"delivered-to:", b"received:")
_BDAT = re.compile(rb"BDAT (\d+)(?: LAST)?$", re.IGNORECASE)
# A command line at the start of what follows DATA (so no message data came after it).
_COMMAND = re.compile(
    rb"(?:LHLO |MAIL FROM:|RCPT TO:|DATA\r\n|BDAT |RSET\r\n|NOOP|QUIT\r\n)", re.IGNORECASE
)


def address(local: str) -> str:
    """The envelope address of test user ``local``."""
    return f"{local}@{DOMAIN}"


def strip_trace_headers(stored: bytes) -> bytes:
    """``stored`` without the trace header fields Dovecot put in front of the message.

    Only leading ``Return-Path``, ``Delivered-To`` and ``Received`` fields (with their folded
    continuation lines) are removed; the rest is returned untouched.
    """
    rest = stored
    while rest.lower().startswith(_TRACE_FIELDS):
        end = rest.find(b"\n")
        # Folded continuation lines start with white space (RFC 5322 §2.2.3).
        while end != -1 and rest[end + 1 : end + 2] in (b" ", b"\t"):
            end = rest.find(b"\n", end + 1)
        if end == -1:
            return b""
        rest = rest[end + 1 :]
    return rest


class Recorder:
    """A TCP relay on 127.0.0.1 in front of Dovecot's LMTP port that records Dovecot's bytes.

    Each accepted connection is relayed to the target in its own thread; :attr:`server_bytes`
    and :attr:`client_bytes` hold everything each side sent, per connection, in connection
    order.

    Attributes:
        port: The relay's port (connect the transport here).
        server_bytes: What the server sent on each connection so far.
        client_bytes: What the client sent on each connection so far.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.02)
        self.port: int = self._listener.getsockname()[1]
        self.server_bytes: list[bytearray] = []
        self.client_bytes: list[bytearray] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []
        self._acceptor = threading.Thread(target=self._accept, name="dovecot-recorder")
        self._acceptor.start()

    def server_lines(self) -> list[str]:
        """Every line the server sent, on every connection, without the CRLF."""
        return [
            line
            for received in self.server_bytes
            for line in bytes(received).decode("utf-8", "replace").split("\r\n")
            if line
        ]

    def client_commands(self) -> list[bytes]:
        """The LMTP command lines the client sent, every connection, in order.

        Message data is skipped: a ``BDAT n`` chunk by its size (RFC 3030 §2), DATA's up to
        the ``CRLF.CRLF`` terminator, unless a command follows DATA at once (refused DATA,
        RFC 2920 §3.1: the client sends no message then; the tests' messages never start
        with a command).
        """
        commands = []
        for sent in self.client_bytes:
            data = bytes(sent)
            at = 0
            while at < len(data):
                end = data.find(b"\r\n", at)
                if end == -1:
                    break
                line = data[at:end]
                commands.append(line)
                at = end + 2
                bdat = _BDAT.match(line)
                if bdat:
                    at += int(bdat.group(1))
                elif line.upper() == b"DATA" and not _COMMAND.match(data, at):
                    terminator = data.find(b"\r\n.\r\n", at - 2)
                    at = len(data) if terminator == -1 else terminator + 5
        return commands

    def close(self) -> None:
        """Stop relaying; join every thread (bounded) and re-raise a relay thread's error."""
        self._stop.set()
        self._acceptor.join(timeout=5.0)
        for thread in self._threads:
            thread.join(timeout=5.0)
        self._listener.close()
        if self._errors:
            raise self._errors[0]

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            from_server, from_client = bytearray(), bytearray()
            self.server_bytes.append(from_server)
            self.client_bytes.append(from_client)
            thread = threading.Thread(
                target=self._relay, args=(client, from_server, from_client), daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def _relay(self, client: socket.socket, from_server: bytearray, from_client: bytearray) -> None:
        try:
            with client, socket.create_connection(self._target, timeout=5.0) as server:
                ends = {client: server, server: client}
                # Bounded: the relay ends when either side closes or the recorder stops.
                while not self._stop.is_set():
                    readable, _, _ = select.select(list(ends), [], [], 0.05)
                    for sock in readable:
                        data = sock.recv(65536)
                        if not data:
                            return
                        (from_server if sock is server else from_client).extend(data)
                        ends[sock].sendall(data)
        except OSError as exc:  # a reset is the client's business, anything else is ours
            if not isinstance(exc, ConnectionResetError):
                self._errors.append(exc)


class DovecotMaster:
    """A Dovecot master run in the foreground as our child from its own directory: what the
    LMTP peer here and the submission peer (:mod:`tests.peers.dovecot_submission`) share.

    Subclasses set ``config`` (the ``dovecot.conf`` path), ``_binary``, ``_process`` (None)
    and ``_children`` (empty) in their constructor, and give :meth:`log_tail`.
    """

    config: Path
    _binary: str
    _process: subprocess.Popen[bytes] | None
    _children: set[int]

    def log_tail(self, lines: int = 40) -> str:
        """The end of the instance's log (for error messages)."""
        raise NotImplementedError

    def start_master(self, ready: Sequence[Callable[[], bool]]) -> None:
        """Start ``dovecot -F``; wait until every check in ``ready`` passes (in turn)."""
        self._process = subprocess.Popen(
            [self._binary, "-F", "-c", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        end = time.monotonic() + _START_TIMEOUT
        for check in ready:
            while not check():
                if self._process.poll() is not None or time.monotonic() > end:
                    stderr = b""
                    if self._process.poll() is not None and self._process.stderr is not None:
                        stderr = self._process.stderr.read()
                    raise RuntimeError(
                        f"Dovecot did not start (exit status {self._process.returncode}): "
                        f"{stderr.decode(errors='replace').strip()}\n"
                        f"end of its log:\n{self.log_tail()}"
                    )
                time.sleep(0.05)
        self._children = _children_of(self._process.pid)

    def stop(self) -> None:
        """SIGTERM the master we started, wait for it, and make sure its children are gone.

        Raises:
            AssertionError: A child process outlived the master (it is killed first).
        """
        process = self._process
        if process is None:
            return
        self._process = None
        self._children |= _children_of(process.pid)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=_STOP_TIMEOUT)
        if process.stderr is not None:
            process.stderr.close()
        end = time.monotonic() + _STOP_TIMEOUT
        left = {pid for pid in self._children if _is_dovecot_child(pid, process.pid)}
        while left and time.monotonic() < end:
            time.sleep(0.05)
            left = {pid for pid in left if _is_dovecot_child(pid, process.pid)}
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if left:
            raise AssertionError(f"Dovecot processes outlived their master: {sorted(left)}")


class DovecotInstance(DovecotMaster):
    """A running test Dovecot, LMTP only (see the module docstring for users and replies).

    Attributes:
        root: The instance's directory (``dovecot.conf``, ``passwd``, ``run/``, ``mail/``).
        host: ``"127.0.0.1"``; ``port`` is the LMTP TCP port.
        socket_path: The LMTP unix socket.
        hostname: The name Dovecot greets with (``hostname`` setting).
    """

    host = "127.0.0.1"
    hostname = "store.lmtp.mailrelay.test"
    domain = DOMAIN

    def __init__(self, root: Path, binary: str) -> None:
        self.root = root
        self.config = root / "dovecot.conf"
        self.base_dir = root / "run"
        self.mail = root / "mail"
        self.log_file = root / "dovecot.log"
        self.socket_path = self.base_dir / "lmtp"
        self.port = free_port()
        self._binary = binary
        self._process: subprocess.Popen[bytes] | None = None
        self._children: set[int] = set()

    # -- reading what Dovecot did ----------------------------------------------------------

    def maildir(self, user: str) -> Path:
        """The Maildir of ``user`` (a local part or a whole address)."""
        if "@" not in user:
            user = address(user)
        return self.mail / user / "Maildir"

    def read_maildir(self, user: str) -> list[bytes]:
        """The raw messages in ``user``'s Maildir ``new/``, in delivery order.

        Dovecot delivers before it answers, so there is nothing to wait for.
        """
        new = self.maildir(user) / "new"
        if not new.is_dir():
            return []
        # Dovecot's Maildir names start with seconds, then M<microseconds>: sort on both.
        files = sorted(new.iterdir(), key=lambda p: (p.stat().st_mtime_ns, p.name))
        return [path.read_bytes() for path in files]

    def clear_maildirs(self) -> None:
        """Remove every user's Maildir (Dovecot creates it again at the next delivery)."""
        if self.mail.is_dir():
            for user_dir in self.mail.iterdir():
                shutil.rmtree(user_dir, ignore_errors=True)

    def log_text(self) -> str:
        """Dovecot's whole log so far."""
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of Dovecot's log."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    @contextlib.contextmanager
    def recorder(self) -> Iterator[Recorder]:
        """A :class:`Recorder` in front of the LMTP port, closed on exit."""
        relay = Recorder((self.host, self.port))
        try:
            yield relay
        finally:
            relay.close()

    # -- life cycle ------------------------------------------------------------------------

    def setup(self) -> None:
        """Write ``dovecot.conf`` and the ``passwd-file``; make the Maildir root."""
        self.root.chmod(0o755)  # nobody must reach mail/ through it
        self.mail.mkdir()
        shutil.chown(self.mail, "nobody", "nogroup")
        quota = "*:storage=1B"
        lines = [f"{address(local)}:{{PLAIN}}secret::::::\n" for local in MAILBOXES]
        lines.append(f"{address(OVER_QUOTA)}:{{PLAIN}}secret::::::userdb_quota_rule={quota}\n")
        lines.append(
            f"{address(OVER_QUOTA_TEMPFAIL)}:{{PLAIN}}secret::::::"
            f"userdb_quota_rule={quota} userdb_quota_full_tempfail=yes\n"
        )
        # A mail location under a root-owned directory: mail is written as nobody, so
        # Dovecot cannot create the Maildir and answers 451 4.2.0 "Internal error".
        locked = self.root / "locked"
        locked.mkdir(mode=0o755)
        lines.append(
            f"{address(UNWRITABLE)}:{{PLAIN}}secret::::::userdb_mail=maildir:{locked}/%u\n"
        )
        passwd = self.root / "passwd"
        passwd.write_text("".join(lines))
        passwd.chmod(0o644)  # the auth process runs as nobody
        self.config.write_text(self._config_text())

    def start(self) -> None:
        """Start the master in the foreground (our child); wait until both listeners greet."""
        self.start_master(
            [
                lambda: _greets(socket.AF_INET, (self.host, self.port)),
                lambda: _greets(socket.AF_UNIX, str(self.socket_path)),
            ]
        )

    # -- configuration ---------------------------------------------------------------------

    def _config_text(self) -> str:
        root = self.root
        return f"""\
# mailrelay's test Dovecot (tests/peers/dovecot.py); LMTP only, everything in {root}
protocols = lmtp
hostname = {self.hostname}
base_dir = {self.base_dir}
state_dir = {root}/state
log_path = {self.log_file}
info_log_path = {self.log_file}
ssl = no
# root in a container: internal processes and mail access as nobody
default_internal_user = nobody
default_internal_group = nogroup
default_login_user = nobody
first_valid_uid = 0
mail_uid = nobody
mail_gid = nogroup
mail_location = maildir:{self.mail}/%u/Maildir
# keep the client's CRLFs, so that tests compare delivered files byte for byte
mail_save_crlf = yes
mail_plugins = quota
plugin {{
  quota = maildir:User quota
}}
recipient_delimiter = +
passdb {{
  driver = passwd-file
  args = {root}/passwd
}}
userdb {{
  driver = passwd-file
  args = {root}/passwd
}}
service lmtp {{
  inet_listener lmtp {{
    address = {self.host}
    port = {self.port}
  }}
  unix_listener lmtp {{
    mode = 0666
  }}
}}
"""


def tool(name: str) -> str | None:
    """The path of a Dovecot command: on PATH, or in the sbin directories a non-root PATH
    often lacks."""
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(_SBIN_DIRS))


def _greets(family: socket.AddressFamily, target: tuple[str, int] | str) -> bool:
    """Whether the LMTP listener answers with a 220 greeting."""
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(2.0)
            sock.connect(target)
            greeting = sock.recv(512)
            sock.sendall(b"QUIT\r\n")
    except OSError:
        return False
    return greeting.startswith(b"220")


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name, or None when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The state letter follows the ")" that closes the command name; the parent PID next.
    return stat.rpartition(")")[2].split()


def _children_of(pid: int) -> set[int]:
    """The PIDs of ``pid``'s live children."""
    children = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and fields[0] != "Z" and fields[1] == str(pid):
                children.add(int(entry.name))
    return children


def _is_dovecot_child(pid: int, master: int) -> bool:
    """Whether ``pid`` is still a live process the master forked (a reused PID is not)."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] == "Z":
        return False
    # An orphan is re-parented (to 1 or a subreaper): a live PID whose parent is neither the
    # master nor a reaper is a new process that reused the number.
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return command.startswith(b"dovecot") or fields[1] == str(master)


def missing_requirements(service: str = "lmtp", package: str = "dovecot-lmtpd") -> list[str]:
    """What this machine lacks to run a test Dovecot with ``service`` (a program in
    ``/usr/lib/dovecot`` that ``package`` installs); empty when it can."""
    missing = []
    if tool("dovecot") is None:
        missing.append("the `dovecot` command (package dovecot-core)")
    if not Path(f"/usr/lib/dovecot/{service}").exists():
        missing.append(f"/usr/lib/dovecot/{service} (package {package})")
    if os.geteuid() != 0:
        missing.append("root privileges (Dovecot's master must start as root)")
    return missing


@pytest.fixture(scope="session")
def dovecot() -> Iterator[DovecotInstance]:
    """A running test Dovecot (LMTP only) for the whole session (see :class:`DovecotInstance`).

    Tests that read Maildirs should use ``dovecot_clean`` (Maildirs emptied first).
    """
    missing = missing_requirements()
    binary = tool("dovecot")
    if missing or binary is None:
        ci = " (CI=true: the CI image must install these)" if os.environ.get("CI") else ""
        pytest.fail(
            f"the Dovecot test peer cannot run{ci}: missing {', '.join(missing)}.\n"
            f"Install as root with:\n  {INSTALL_HINT}\nand run the tests as root.",
            pytrace=False,
        )
    root = Path(tempfile.mkdtemp(prefix="mailrelay-dovecot-"))
    instance = DovecotInstance(root, binary)
    try:
        instance.setup()
        instance.start()
        yield instance
    finally:
        instance.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def dovecot_clean(dovecot: DovecotInstance) -> DovecotInstance:
    """The session's Dovecot with every Maildir removed."""
    dovecot.clear_maildirs()
    return dovecot
