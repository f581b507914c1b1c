"""A throw-away Dovecot submission server (RFC 6409) on loopback, relaying to a recording relay.

Theory of operation: the session fixture :func:`dovecot_submission` starts a small aiosmtpd
*relay* (:class:`Relay`, in a thread on ``127.0.0.1``) that records every transaction it
accepts, then writes a ``dovecot.conf`` and a ``passwd-file`` into a fresh temporary
directory and starts ``dovecot -F -c <dir>/dovecot.conf`` as a child process (the master in
the foreground). Only the submission service runs (``protocols = submission``), with
``submission_relay_host``/``submission_relay_port`` naming the relay, so a test sees exactly
what Dovecot passed on: sender, recipients, MAIL and RCPT parameters as Dovecot wrote them,
and the message bytes. ``base_dir``, ``state_dir``, the log and the (unused) mail location
are in the directory; nothing in ``/etc/dovecot`` is read, a system Dovecot is not touched.

Listeners (``submission-login``), both on ``127.0.0.1`` at free ports:

- :attr:`DovecotSubmission.port`: plain text with STARTTLS (RFC 3207);
- :attr:`DovecotSubmission.tls_port`: implicit TLS (RFC 8314, ``ssl = yes`` on the listener).

Both use the suite's CA-signed certificate (:mod:`tests.peers.tls`: it names ``localhost``,
``mx.mailrelay.test``, ``127.0.0.1``, ``::1``). ``ssl = required``: AUTH only over TLS, **but
Dovecot counts a connection whose remote address equals its local address as secured**
(``rip == lip``), so from ``127.0.0.1`` to ``127.0.0.1`` it offers and accepts AUTH in plain
text. A client connecting *from* :data:`INSECURE_SOURCE` (``127.0.0.2``) is not secured:
before STARTTLS the EHLO has no AUTH and an AUTH command gets ``530 5.7.0 TLS required.``.

Users (``passwd-file``, ``{PLAIN}`` passwords so that CRAM-MD5 works):
:data:`USERS` (``alice@submit.mailrelay.test`` / ``alicepw``, ``bob@...`` / ``bobpw``);
``auth_mechanisms = plain login cram-md5``. A wrong password is answered, after Dovecot's
failure delay (0 here), ``535 5.7.8 Authentication failed.``; after that Dovecot's *auth
penalty* delays every later AUTH from the same address (2 s, doubling up to 15 s; anvil keeps
it per remote IP), so tests that fail on purpose connect from an address of their own
(``source_address``, any of ``127.0.0.0/8``).

Relay replies, chosen by the recipient's local part (case-insensitive), as
:mod:`tests.peers.aiosmtpd_server`'s: ``tempfail`` -> ``450 4.2.1``, ``reject`` ->
``550 5.1.1``, anything else ``250``. The relay offers DSN (RFC 3461) and accepts its
parameters, so that Dovecot may pass them on; it records MAIL and RCPT arguments raw.

Dovecot 2.3.19 facts the tests rely on (observed with ``smtplib``): ``submission_max_mail_size``
is :data:`MAX_SIZE` (``SIZE 102400``); no SMTPUTF8 (a ``SMTPUTF8`` MAIL parameter gets
``555 5.5.4 Unsupported parameters``); Dovecot puts its own ``Received:`` field on top of
the message (see :func:`strip_received`) and passes the client's ``BODY=`` on with a
``SIZE=`` of its own. DSN is offered only in the EHLO *after* AUTH (when the relay offers
it), never in the one before. A reply the relay gave is passed on with Dovecot's enhanced
code in front of the relay's: ``550 5.0.0 <addr> 5.1.1 No such user (test)``. Dovecot
2.3.19's submission process panics (and drops the connection) when a client pipelines the
next message's MAIL after the end of data; the message before is relayed all the same.

Running as root in a container (as :mod:`tests.peers.dovecot`): internal, login and mail
processes run as ``nobody``. The fixture fails (never skips) with the install command when
Dovecot's submission service is missing or the tests do not run as root. At teardown it
sends SIGTERM to the master it started (by PID), waits for it, checks that every process
it had forked is gone (a straggler is killed by its PID), and stops the relay.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.peers.dovecot import DovecotMaster, missing_requirements, tool
from tests.peers.scripted import free_port
from tests.peers.tls import TLSFiles

APT_PACKAGES = ("dovecot-core", "dovecot-submissiond")
INSTALL_HINT = (
    "DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "
    + " ".join(APT_PACKAGES)
)

DOMAIN = "submit.mailrelay.test"
HOSTNAME = "submit.mailrelay.test"
"""The name Dovecot greets with."""
USERS = {f"alice@{DOMAIN}": "alicepw", f"bob@{DOMAIN}": "bobpw"}
"""The users Dovecot authenticates, with their passwords."""
MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5")
"""``auth_mechanisms``, as Dovecot lists them in EHLO."""
MAX_SIZE = 102_400
"""``submission_max_mail_size``: the SIZE Dovecot advertises."""
INSECURE_SOURCE = "127.0.0.2"
"""A source address Dovecot does not count as secured (it differs from its own address)."""

_START_TIMEOUT = 20.0
_STOP_TIMEOUT = 10.0
_RCPT_REPLIES = {
    "tempfail": "450 4.2.1 Mailbox temporarily unavailable (test)",
    "reject": "550 5.1.1 No such user (test)",
}
# RFC 3461 parameters aiosmtpd does not know; the relay accepts them (recorded raw).
_DSN_PARAMETERS = frozenset({"RET", "ENVID", "NOTIFY", "ORCPT"})


def strip_received(relayed: bytes) -> bytes:
    """``relayed`` without the one ``Received:`` field Dovecot put on top (folded lines too)."""
    if not relayed.lower().startswith(b"received:"):
        return relayed
    end = relayed.find(b"\r\n")
    # Folded continuation lines start with white space (RFC 5322 §2.2.3).
    while end != -1 and relayed[end + 2 : end + 3] in (b" ", b"\t"):
        end = relayed.find(b"\r\n", end + 2)
    return b"" if end == -1 else relayed[end + 2 :]


@attrs.frozen(kw_only=True)
class Relayed:
    """One transaction the relay accepted from Dovecot.

    Attributes:
        mail: The MAIL command's argument, as Dovecot sent it (``FROM:<...> BODY=8BITMIME``).
        rcpts: Each RCPT command's argument for an accepted recipient, in order.
        mail_from: The reverse-path without ``<>``.
        rcpt_tos: The accepted recipients, in order.
        content: The message bytes (dot-unstuffed, CRLFs kept), Dovecot's Received first.
    """

    mail: str
    rcpts: tuple[str, ...]
    mail_from: str
    rcpt_tos: tuple[str, ...]
    content: bytes


class _RelaySMTP(SMTP):
    """aiosmtpd's SMTP that accepts DSN parameters and records MAIL/RCPT arguments raw."""

    raw_mail: str = ""
    raw_rcpts: list[str]

    def _getparams(self, params: Sequence[str]) -> dict[str, str | bool] | None:
        parsed = super()._getparams(params)
        if parsed is None:
            return None
        return {k: v for k, v in parsed.items() if k.upper() not in _DSN_PARAMETERS}

    async def smtp_MAIL(self, arg: str) -> None:
        self.raw_mail, self.raw_rcpts = arg, []
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str) -> None:
        self.raw_rcpts = [*getattr(self, "raw_rcpts", []), arg]
        await super().smtp_RCPT(arg)


class _RelayHandler:
    def __init__(self) -> None:
        self.messages: list[Relayed] = []
        self._lock = threading.Lock()

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        # Offer DSN (RFC 3461 §4) before the last line ("250 HELP").
        return [*responses[:-1], "250-DSN", responses[-1]]

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = _RCPT_REPLIES.get(address.rpartition("@")[0].lower())
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(server, _RelaySMTP)
        accepted = {a.lower() for a in envelope.rcpt_tos}
        rcpts = tuple(
            arg
            for arg in server.raw_rcpts
            if arg.partition("<")[2].partition(">")[0].lower() in accepted
        )
        with self._lock:
            self.messages.append(
                Relayed(
                    mail=server.raw_mail,
                    rcpts=rcpts,
                    mail_from=envelope.mail_from or "",
                    rcpt_tos=tuple(envelope.rcpt_tos),
                    content=envelope.original_content or b"",
                )
            )
        return "250 2.0.0 Relayed (test)"


class _RelayController(Controller):
    def factory(self) -> SMTP:
        return _RelaySMTP(self.handler, **self.SMTP_kwargs)


class Relay:
    """The recording relay Dovecot passes mail on to (aiosmtpd in a thread on 127.0.0.1).

    Attributes:
        port: Its port.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self._handler = _RelayHandler()
        self._controller = _RelayController(
            self._handler,
            hostname="127.0.0.1",
            port=self.port,
            server_hostname="relay.mailrelay.test",
            decode_data=False,
            enable_SMTPUTF8=True,
            timeout=30,
        )

    @property
    def messages(self) -> list[Relayed]:
        """The transactions relayed so far, in order."""
        return self._handler.messages

    def clear(self) -> None:
        """Forget what was relayed so far."""
        self._handler.messages.clear()

    def start(self) -> None:
        """Start the server thread."""
        self._controller.start()

    def stop(self) -> None:
        """Stop the server thread (joins it)."""
        self._controller.stop()


class DovecotSubmission(DovecotMaster):
    """A running test Dovecot, submission only (see the module docstring).

    Attributes:
        root: The instance's directory (``dovecot.conf``, ``passwd``, ``run/``, the log).
        host: ``"127.0.0.1"``; ``port`` (STARTTLS) and ``tls_port`` (implicit TLS).
        relay: The recording relay behind it.
        ca_file: The CA that signed Dovecot's certificate.
    """

    host = "127.0.0.1"
    hostname = HOSTNAME
    users = USERS

    def __init__(self, root: Path, binary: str, tls: TLSFiles, relay: Relay) -> None:
        self.root = root
        self.relay = relay
        self.ca_file = tls.ca_file
        self.config = root / "dovecot.conf"
        self.base_dir = root / "run"
        self.log_file = root / "dovecot.log"
        self.port = free_port()
        self.tls_port = free_port()
        self._tls = tls
        self._binary = binary
        self._process: subprocess.Popen[bytes] | None = None
        self._children: set[int] = set()

    def ssl_context(self) -> ssl.SSLContext:
        """A client context trusting the test CA (certificate and name checked)."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def transport_args(self, *, port: int | None = None, **extra: Any) -> dict[str, Any]:
        """Keyword arguments for an (Async)SMTPTransport to this Dovecot, as a user would
        give them: the STARTTLS port, the name ``localhost`` (in the certificate), the test
        CA; ``extra`` overrides."""
        return {
            "host": "localhost",
            "port": self.port if port is None else port,
            "ssl_context": self.ssl_context(),
            **extra,
        }

    def log_text(self) -> str:
        """Dovecot's whole log so far."""
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of Dovecot's log."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    # -- life cycle ------------------------------------------------------------------------

    def setup(self) -> None:
        """Write ``dovecot.conf`` and the ``passwd-file``; make the (unused) mail root."""
        self.root.chmod(0o755)  # nobody must reach passwd and mail/ through it
        mail = self.root / "mail"
        mail.mkdir()
        shutil.chown(mail, "nobody", "nogroup")
        passwd = self.root / "passwd"
        passwd.write_text("".join(f"{u}:{{PLAIN}}{p}::::::\n" for u, p in USERS.items()))
        passwd.chmod(0o644)  # the auth process runs as nobody
        self.config.write_text(self._config_text())

    def start(self) -> None:
        """Start the master in the foreground (our child); wait until both listeners greet."""
        self.start_master(
            [
                lambda: self._greets(self.port, implicit=False),
                lambda: self._greets(self.tls_port, implicit=True),
            ]
        )

    def _greets(self, port: int, *, implicit: bool) -> bool:
        """Whether the listener answers with a 220 greeting (through TLS when ``implicit``)."""
        try:
            with contextlib.ExitStack() as stack:
                sock = stack.enter_context(socket.create_connection((self.host, port), 2.0))
                if implicit:
                    context = self.ssl_context()
                    sock = stack.enter_context(
                        context.wrap_socket(sock, server_hostname="localhost")
                    )
                greeting = sock.recv(512)
                sock.sendall(b"QUIT\r\n")
        except (OSError, ssl.SSLError):
            return False
        return greeting.startswith(b"220")

    def _config_text(self) -> str:
        root = self.root
        return f"""\
# mailrelay's test Dovecot (tests/peers/dovecot_submission.py); submission only, in {root}
protocols = submission
hostname = {HOSTNAME}
base_dir = {self.base_dir}
state_dir = {root}/state
log_path = {self.log_file}
info_log_path = {self.log_file}
ssl = required
ssl_cert = <{self._tls.cert_file}
ssl_key = <{self._tls.key_file}
# root in a container: internal, login and user processes as nobody
default_internal_user = nobody
default_internal_group = nogroup
default_login_user = nobody
first_valid_uid = 0
mail_uid = nobody
mail_gid = nogroup
# submission opens the user's mail storage (for BURL) even though nothing is stored
mail_location = maildir:{root}/mail/%u
auth_mechanisms = plain login cram-md5
# answer a wrong password at once (the default waits 2 s): keeps the tests fast
auth_failure_delay = 0
submission_relay_host = 127.0.0.1
submission_relay_port = {self.relay.port}
submission_max_mail_size = {MAX_SIZE}
passdb {{
  driver = passwd-file
  args = {root}/passwd
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home={root}/mail/%u
}}
service submission-login {{
  inet_listener submission {{
    address = {self.host}
    port = {self.port}
  }}
  inet_listener submissions {{
    address = {self.host}
    port = {self.tls_port}
    ssl = yes
  }}
}}
"""


@pytest.fixture(scope="session")
def dovecot_submission(tls_files: TLSFiles) -> Iterator[DovecotSubmission]:
    """A running Dovecot submission server and its recording relay, for the whole session.

    Tests that read what was relayed should use ``dovecot_submission_clean``.
    """
    missing = missing_requirements("submission", "dovecot-submissiond")
    binary = tool("dovecot")
    if missing or binary is None:
        ci = " (CI=true: the CI image must install these)" if os.environ.get("CI") else ""
        pytest.fail(
            f"the Dovecot submission test peer cannot run{ci}: missing {', '.join(missing)}.\n"
            f"Install as root with:\n  {INSTALL_HINT}\nand run the tests as root.",
            pytrace=False,
        )
    relay = Relay()
    relay.start()
    root = Path(tempfile.mkdtemp(prefix="mailrelay-submission-"))
    instance = DovecotSubmission(root, binary, tls_files, relay)
    try:
        instance.setup()
        instance.start()
        yield instance
    finally:
        try:
            instance.stop()
        finally:
            relay.stop()
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def dovecot_submission_clean(dovecot_submission: DovecotSubmission) -> DovecotSubmission:
    """The session's Dovecot submission server with the relay's record emptied."""
    dovecot_submission.relay.clear()
    return dovecot_submission
