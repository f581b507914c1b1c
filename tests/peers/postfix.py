"""A throw-away Postfix instance on loopback: the real SMTP server the transport tests talk to.

Theory of operation: the session fixture :func:`postfix` writes a complete Postfix
configuration (``main.cf``, ``master.cf``, lookup tables, a Cyrus sasldb, the CA-signed
certificate of :mod:`tests.peers.tls`) into a fresh temporary directory, picks free loopback
ports at run time, and starts ``postfix -c <dir> start-fg`` as a child process. Nothing in
``/etc/postfix`` is read or changed except the package's ``postfix-files`` (``meta_directory``);
no port-25 listener is configured and nothing is ever delivered off the machine (every
non-local transport is ``discard``).

Listeners (all loopback; attribute names of :class:`PostfixInstance`):

============================ ==================================================================
``smtp_port`` (127.0.0.1     plain SMTP; STARTTLS and AUTH offered (AUTH before TLS too);
and ::1)                     ``smtpd -v``, so every command and reply is in :meth:`log_text`
``submission_port``          STARTTLS required (``encrypt``), AUTH only after TLS, relaying
                             only when authenticated
``smtps_port``               implicit TLS (RFC 8314), AUTH; relaying only when authenticated
``plain_port``               no STARTTLS, no AUTH (a server without TLS)
``no_pipelining_port``       EHLO without PIPELINING and CHUNKING (``smtpd_discard_ehlo_keywords``)
``helo_only_port``           EHLO refused with ``500 5.5.2`` (``smtpd_command_filter`` rewrites
                             EHLO into an unknown command), HELO works: the HELO fallback
``idle_timeout_port``        STARTTLS and AUTH offered, ``smtpd_timeout`` = :data:`IDLE_TIMEOUT`
                             seconds: an idle connection gets ``421 4.4.2`` and is closed (the
                             pool's reconnect path, against a real server)
``limited_port``             no STARTTLS, no AUTH; ``smtpd_recipient_limit`` =
                             :data:`RECIPIENT_LIMIT`: each RCPT beyond it in a transaction gets
                             ``452 4.5.3 Error: too many recipients``
============================ ==================================================================

Domains: ``mailrelay.test`` (virtual Maildirs ``alice``, ``bob``; other users 550 5.1.1),
``sink.mailrelay.test`` (accepted, discarded), ``tempfail.mailrelay.test`` (RCPT 450 4.7.1),
``reject.mailrelay.test`` (RCPT 550 5.7.1). Any other domain: 554 5.7.1 relay denied unless the
client authenticated (then accepted and discarded). The 450/550 domains answer on every port,
so one transaction can mix accepted, deferred and refused recipients.

SASL (Cyrus sasldb, no daemon): ``alice@mailrelay.test``/``alicepw``,
``bob@mailrelay.test``/``bobpw``; mechanisms PLAIN, LOGIN, CRAM-MD5 and SCRAM-SHA-256 (Cyrus's
scram plugin; note that Postfix sends the SCRAM server-final message ``v=...`` as a ``334``
challenge and gives ``235`` only after the client's empty answer, RFC 4954 §4).

Limits and extras: ``message_size_limit`` = :data:`MESSAGE_SIZE_LIMIT` (advertised as
``SIZE 10240000``; a bigger ``MAIL FROM ... SIZE=`` gets 552 5.3.4), ``smtputf8_enable = yes``,
DSN on (a ``NOTIFY=SUCCESS`` for a Maildir user makes Postfix send a "delivered" DSN back to a
``mailrelay.test`` sender, carrying ENVID and ORCPT), Received headers that say whether TLS
was used and who authenticated (``smtpd_tls_received_header``, ``smtpd_sasl_authenticated_header``).

Needs root (Postfix's master refuses to run otherwise) and the Debian packages
:data:`APT_PACKAGES`. The fixture fails (never skips) with the install command when they are
missing. At teardown it runs ``postfix stop`` and waits for exactly the master PID it started;
if that PID is still alive it is killed by PID, nothing else.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers.scripted import free_port
from tests.peers.tls import TLSFiles

APT_PACKAGES = ("postfix", "sasl2-bin", "libsasl2-modules", "openssl")
DEBCONF_LINE = "postfix postfix/main_mailer_type select No configuration"
INSTALL_HINT = (
    f"echo '{DEBCONF_LINE}' | debconf-set-selections && "
    "DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "
    + " ".join(APT_PACKAGES)
)

DOMAIN = "mailrelay.test"
SINK_DOMAIN = "sink.mailrelay.test"
TEMPFAIL_DOMAIN = "tempfail.mailrelay.test"
REJECT_DOMAIN = "reject.mailrelay.test"
USERS = {"alice@mailrelay.test": "alicepw", "bob@mailrelay.test": "bobpw"}
"""SASL user name -> password; each also has a Maildir (its local part)."""
SASL_MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256")
MESSAGE_SIZE_LIMIT = 10_240_000
"""Postfix's ``message_size_limit`` here, in bytes (advertised in the EHLO SIZE keyword)."""
IDLE_TIMEOUT = 2
RECIPIENT_LIMIT = 3
"""Recipients per transaction ``limited_port`` takes (``smtpd_recipient_limit``)."""
"""Seconds ``idle_timeout_port`` waits for a command before it says 421 and hangs up."""

_SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/bin")
_SASL_PLUGIN_DIRS = (Path("/usr/lib/x86_64-linux-gnu/sasl2"), Path("/usr/lib/sasl2"))
_START_TIMEOUT = 20.0
_STOP_TIMEOUT = 10.0


class PostfixInstance:
    """A running test Postfix (see the module docstring for ports, domains and users).

    Attributes:
        root: The instance's directory (config in ``etc/``, queue in ``spool/``,
            Maildirs in ``vmail/``, log in ``log/maillog``).
        host: ``"127.0.0.1"``; ``host6`` is ``"::1"`` (only :attr:`smtp_port` listens there).
        ca_file: The CA certificate a client should trust to verify the server.
        users: SASL user name -> password.
        message_size_limit: Postfix's ``message_size_limit`` in bytes.
    """

    host = "127.0.0.1"
    host6 = "::1"
    hostname = "mx.mailrelay.test"
    users = USERS
    message_size_limit = MESSAGE_SIZE_LIMIT

    def __init__(self, root: Path, tls: TLSFiles) -> None:
        self.root = root
        self.etc = root / "etc"
        self.vmail = root / "vmail"
        self.log_file = root / "log" / "maillog"
        self.ca_file = tls.ca_file
        self._tls = tls
        self.smtp_port = free_port(ipv6=True)
        self.submission_port = free_port()
        self.smtps_port = free_port()
        self.plain_port = free_port()
        self.no_pipelining_port = free_port()
        self.helo_only_port = free_port()
        self.idle_timeout_port = free_port()
        self.limited_port = free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self.master_pid: int | None = None

    # -- reading what Postfix did ----------------------------------------------------------

    def maildir(self, user: str) -> Path:
        """The Maildir of ``user`` (``"alice"`` or ``"alice@mailrelay.test"``)."""
        local = user.partition("@")[0]
        return self.vmail / DOMAIN / local

    def read_maildir(self, user: str) -> list[bytes]:
        """The raw messages in ``user``'s Maildir ``new/``, oldest first."""
        new = self.maildir(user) / "new"
        if not new.is_dir():
            return []
        files = sorted(new.iterdir(), key=lambda p: (p.stat().st_mtime_ns, p.name))
        return [path.read_bytes() for path in files]

    def wait_for_delivery(self, user: str, count: int = 1, timeout: float = 10.0) -> list[bytes]:
        """Poll ``user``'s Maildir until it holds at least ``count`` messages; return them.

        Raises:
            AssertionError: After ``timeout`` seconds, with the end of the mail log.
        """
        end = time.monotonic() + timeout
        while True:
            messages = self.read_maildir(user)
            if len(messages) >= count or time.monotonic() > end:
                break
            time.sleep(0.05)
        if len(messages) < count:
            raise AssertionError(
                f"{user}: {len(messages)} of {count} messages after {timeout}s; "
                f"end of the mail log:\n{self.log_tail()}"
            )
        return messages

    def wait_for_message(self, user: str, marker: bytes, timeout: float = 10.0) -> bytes:
        """Poll ``user``'s Maildir until a message containing ``marker`` arrives; return it.

        Prefer this to :meth:`wait_for_delivery` when other tests share the instance: a
        message from an earlier test can still be in Postfix's queue after
        :meth:`clear_maildirs`, so counting messages is racy, while a unique marker
        (a subject, a Message-ID) is not.

        Raises:
            AssertionError: After ``timeout`` seconds, with the end of the mail log.
        """
        end = time.monotonic() + timeout
        while True:
            for raw in self.read_maildir(user):
                if marker in raw:
                    return raw
            if time.monotonic() > end:
                raise AssertionError(
                    f"{user}: no message containing {marker!r} after {timeout}s; "
                    f"end of the mail log:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def clear_maildirs(self) -> None:
        """Delete every delivered message (the Maildir folders stay)."""
        for user in self.users:
            for sub in ("new", "cur", "tmp"):
                folder = self.maildir(user) / sub
                if folder.is_dir():
                    for path in folder.iterdir():
                        path.unlink()

    def log_text(self) -> str:
        """The whole mail log so far (Postfix writes it through ``postlogd``)."""
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the mail log."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_for_log(self, text: str, timeout: float = 10.0) -> str:
        """Poll the mail log until it contains ``text``; return the whole log.

        Raises:
            AssertionError: After ``timeout`` seconds, with the end of the log.
        """
        end = time.monotonic() + timeout
        while True:
            log = self.log_text()
            if text in log:
                return log
            if time.monotonic() > end:
                raise AssertionError(
                    f"{text!r} not in the mail log after {timeout}s; end:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    # -- life cycle ------------------------------------------------------------------------

    def setup(self) -> None:
        """Write the configuration, certificate copies and the SASL database.

        ``postfix start-fg`` checks the configuration and creates the queue directories
        itself, so no separate ``postfix check`` runs here.
        """
        for sub in ("etc/sasl", "spool", "data", "vmail", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # The virtual(8) agent writes Maildirs as nobody and smtpd reads the sasldb as
        # postfix, so every directory on the way must be searchable by them.
        for path in (self.root, self.etc, self.root / "log"):
            path.chmod(0o755)
        shutil.chown(self.root / "data", "postfix", "postfix")
        shutil.chown(self.vmail, "nobody", "nogroup")
        shutil.copy(self._tls.cert_file, self.etc / "cert.pem")
        shutil.copy(self._tls.key_file, self.etc / "key.pem")
        (self.etc / "key.pem").chmod(0o600)
        (self.etc / "main.cf").write_text(self._main_cf())
        (self.etc / "master.cf").write_text(self._master_cf())
        (self.etc / "vmailbox").write_text(
            "".join(f"{user} {DOMAIN}/{user.partition('@')[0]}/\n" for user in self.users)
        )
        (self.etc / "transport").write_text(
            f"{SINK_DOMAIN} discard:sink\n{TEMPFAIL_DOMAIN} discard:\n{REJECT_DOMAIN} discard:\n"
        )
        (self.etc / "rcpt_access").write_text(
            f"{TEMPFAIL_DOMAIN} 450 4.7.1 Try again later (test)\n"
            f"{REJECT_DOMAIN} 550 5.7.1 Rejected (test)\n"
        )
        # RFC 5321 §4.1.4: a server may refuse EHLO; rewriting it into an unknown command
        # makes this listener answer "502 5.5.2 Error: command not recognized".
        (self.etc / "no_ehlo").write_text("/^EHLO(\\s.*)?$/ XEHLO-REFUSED-FOR-TESTS\n")
        (self.etc / "sasl" / "smtpd.conf").write_text(
            "pwcheck_method: auxprop\n"
            "auxprop_plugin: sasldb\n"
            f"mech_list: {' '.join(SASL_MECHANISMS)}\n"
            f"sasldb_path: {self.etc / 'sasldb2'}\n"
        )
        for user, password in self.users.items():
            local, _, realm = user.partition("@")
            _run(
                [
                    _tool("saslpasswd2"),
                    "-p",
                    "-c",
                    "-f",
                    str(self.etc / "sasldb2"),
                    "-u",
                    realm,
                    local,
                ],
                stdin=password,
            )
        shutil.chown(self.etc / "sasldb2", "root", "postfix")
        (self.etc / "sasldb2").chmod(0o640)

    def start(self) -> None:
        """Start the master in the foreground (our child) and wait until every port answers."""
        self._process = subprocess.Popen(
            [_tool("postfix"), "-c", str(self.etc), "start-fg"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        end = time.monotonic() + _START_TIMEOUT
        pid_file = self.root / "spool" / "pid" / "master.pid"
        probes = [
            (self.host, self.smtp_port, False),
            (self.host6, self.smtp_port, False),
            (self.host, self.submission_port, False),
            (self.host, self.smtps_port, True),
            (self.host, self.plain_port, False),
            (self.host, self.no_pipelining_port, False),
            (self.host, self.helo_only_port, False),
            (self.host, self.idle_timeout_port, False),
            (self.host, self.limited_port, False),
        ]
        while probes:
            if self._process.poll() is not None or time.monotonic() > end:
                raise RuntimeError(
                    f"Postfix did not start (exit status {self._process.returncode}); "
                    f"end of its log:\n{self.log_tail()}"
                )
            if _greets(*probes[0], ca_file=self.ca_file):
                probes.pop(0)
            else:
                time.sleep(0.05)
        with contextlib.suppress(FileNotFoundError, ValueError):
            self.master_pid = int(pid_file.read_text().strip())

    def stop(self) -> None:
        """``postfix stop``, then wait for the master we started; kill it by PID if needed."""
        if self._process is None:
            return
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            subprocess.run(
                [_tool("postfix"), "-c", str(self.etc), "stop"],
                capture_output=True,
                timeout=_STOP_TIMEOUT,
                check=False,
            )
        end = time.monotonic() + _STOP_TIMEOUT
        while self.master_pid is not None and _alive(self.master_pid):
            if time.monotonic() > end:
                os.kill(self.master_pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        try:
            self._process.wait(timeout=_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=_STOP_TIMEOUT)
        self._process = None

    # -- configuration ---------------------------------------------------------------------

    def _main_cf(self) -> str:
        etc, root = self.etc, self.root
        return f"""\
compatibility_level = 3.6
meta_directory = /etc/postfix
queue_directory = {root}/spool
data_directory = {root}/data
maillog_file_prefixes = {root}
maillog_file = {self.log_file}
myhostname = {self.hostname}
mydomain = {DOMAIN}
myorigin = $myhostname
mydestination =
alias_maps =
alias_database =
local_recipient_maps =
inet_interfaces = loopback-only
inet_protocols = all
mynetworks = 127.0.0.0/8 [::1]/128
smtpd_banner = $myhostname ESMTP mailrelay-test
biff = no
message_size_limit = {MESSAGE_SIZE_LIMIT}
smtputf8_enable = yes
# nothing is ever delivered off this machine
default_transport = discard:not delivered (test instance)
relay_transport = discard:not delivered (test instance)
virtual_mailbox_domains = {DOMAIN}
virtual_mailbox_base = {self.vmail}
virtual_mailbox_maps = texthash:{etc}/vmailbox
virtual_uid_maps = static:65534
virtual_gid_maps = static:65534
virtual_minimum_uid = 100
relay_domains = {SINK_DOMAIN} {TEMPFAIL_DOMAIN} {REJECT_DOMAIN}
transport_maps = texthash:{etc}/transport
smtpd_relay_restrictions = {_RELAY_RESTRICTIONS}
smtpd_tls_cert_file = {etc}/cert.pem
smtpd_tls_key_file = {etc}/key.pem
smtpd_tls_security_level = may
smtpd_tls_auth_only = no
smtpd_tls_loglevel = 1
smtpd_tls_received_header = yes
smtpd_tls_session_cache_database =
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = cyrus
smtpd_sasl_path = smtpd
cyrus_sasl_config_path = {etc}/sasl
smtpd_sasl_security_options = noanonymous
smtpd_sasl_authenticated_header = yes
broken_sasl_auth_clients = no
# fast and deterministic: no DNS for client names, no tarpit, no rate limits
smtpd_peername_lookup = no
smtpd_error_sleep_time = 0
smtpd_soft_error_limit = 1000
smtpd_hard_error_limit = 1000
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
"""

    def _master_cf(self) -> str:
        services = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""
        authenticated_only = (
            f"  -o smtpd_client_restrictions=permit_sasl_authenticated,reject\n"
            f"  -o smtpd_relay_restrictions={_SUBMISSION_RELAY_RESTRICTIONS}\n"
        )
        listeners = f"""\
{self.host}:{self.smtp_port} inet n - n - - smtpd -v
[{self.host6}]:{self.smtp_port} inet n - n - - smtpd -v
{self.host}:{self.submission_port} inet n - n - - smtpd
  -o syslog_name=postfix/submission
  -o smtpd_tls_security_level=encrypt
  -o smtpd_tls_auth_only=yes
{authenticated_only}\
{self.host}:{self.smtps_port} inet n - n - - smtpd
  -o syslog_name=postfix/smtps
  -o smtpd_tls_wrappermode=yes
{authenticated_only}\
{self.host}:{self.plain_port} inet n - n - - smtpd
  -o syslog_name=postfix/plain
  -o smtpd_tls_security_level=none
  -o smtpd_sasl_auth_enable=no
{self.host}:{self.no_pipelining_port} inet n - n - - smtpd
  -o syslog_name=postfix/nopipelining
  -o smtpd_discard_ehlo_keywords=pipelining,chunking
{self.host}:{self.helo_only_port} inet n - n - - smtpd
  -o syslog_name=postfix/heloonly
  -o smtpd_tls_security_level=none
  -o smtpd_sasl_auth_enable=no
  -o smtpd_command_filter=regexp:{self.etc}/no_ehlo
{self.host}:{self.idle_timeout_port} inet n - n - - smtpd
  -o syslog_name=postfix/idle
  -o smtpd_timeout={IDLE_TIMEOUT}s
{self.host}:{self.limited_port} inet n - n - - smtpd
  -o syslog_name=postfix/limited
  -o smtpd_tls_security_level=none
  -o smtpd_sasl_auth_enable=no
  -o smtpd_recipient_limit={RECIPIENT_LIMIT}
"""
        return services + listeners


# Recipients in the test domains get their scripted 450/550 first, on every port.
_RELAY_RESTRICTIONS = (
    "check_recipient_access texthash:$config_directory/rcpt_access, "
    "permit_sasl_authenticated, reject_unauth_destination"
)
_SUBMISSION_RELAY_RESTRICTIONS = (
    "check_recipient_access,texthash:$config_directory/rcpt_access,permit_sasl_authenticated,reject"
)


def tool(name: str) -> str | None:
    """The path of a Postfix/SASL command: on PATH, or in the sbin directories that a
    non-root PATH often lacks."""
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(_SBIN_DIRS))


def _tool(name: str) -> str:
    found = tool(name)
    if found is None:
        raise RuntimeError(f"`{name}` not found; install with: {INSTALL_HINT}")
    return found


def _run(argv: list[str], stdin: str | None = None) -> None:
    result = subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=30.0, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}"
        )


def _greets(host: str, port: int, implicit_tls: bool, *, ca_file: Path) -> bool:
    """Whether the listener answers with a 220 greeting (through TLS for SMTPS)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(2.0)
            sock.connect((host, port))
            if implicit_tls:
                context = ssl.create_default_context(cafile=str(ca_file))
                with context.wrap_socket(sock, server_hostname="mx.mailrelay.test") as tls:
                    greeting = tls.recv(512)
                    tls.sendall(b"QUIT\r\n")
            else:
                greeting = sock.recv(512)
                sock.sendall(b"QUIT\r\n")
    except OSError:
        return False
    return greeting.startswith(b"220")


def _alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The state letter follows the ")" that closes the command name.
    return stat.rpartition(")")[2].split()[0] != "Z"


def missing_requirements() -> list[str]:
    """What this machine lacks to run the test Postfix (empty when it can)."""
    missing = []
    for command in ("postfix", "postconf", "saslpasswd2", "openssl"):
        if tool(command) is None:
            missing.append(f"the `{command}` command")
    if not Path("/etc/postfix/postfix-files").exists():
        missing.append("/etc/postfix/postfix-files (package postfix)")
    if not any((d / "libplain.so").exists() for d in _SASL_PLUGIN_DIRS):
        missing.append("the Cyrus SASL plugins (package libsasl2-modules)")
    if os.geteuid() != 0:
        missing.append("root privileges (Postfix's master must start as root)")
    return missing


@pytest.fixture(scope="session")
def postfix(tls_files: TLSFiles) -> Iterator[PostfixInstance]:
    """A running test Postfix for the whole session (see :class:`PostfixInstance`).

    Tests that read Maildirs should call ``postfix.clear_maildirs()`` first (or use the
    ``postfix_clean`` fixture).
    """
    missing = missing_requirements()
    if missing:
        ci = " (CI=true: the CI image must install these)" if os.environ.get("CI") else ""
        pytest.fail(
            f"the Postfix test peer cannot run{ci}: missing {', '.join(missing)}.\n"
            f"Install as root with:\n  {INSTALL_HINT}\nand run the tests as root.",
            pytrace=False,
        )
    root = Path(tempfile.mkdtemp(prefix="mailrelay-postfix-"))
    instance = PostfixInstance(root, tls_files)
    try:
        instance.setup()
        instance.start()
        yield instance
    finally:
        instance.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postfix_clean(postfix: PostfixInstance) -> PostfixInstance:
    """The session's Postfix with empty Maildirs."""
    postfix.clear_maildirs()
    return postfix
