"""The ``mailrelay`` command line: send a message, validate addresses, read a bounce, and
keep a delivery tracker's queue (the ``tracker`` commands, in :mod:`mailrelay.cli_tracker`).
``docs/cli.md`` is its manual.

Rules of this module:

* Standard library :mod:`argparse` only. :func:`main` parses, runs one subcommand and
  *returns* its exit status; it never calls :func:`sys.exit` (so tests and other programs
  can call it), and ``python -m mailrelay`` / the console script exit with what it returns.
* Exit statuses come from BSD's ``sysexits.h`` (the convention of mail programs since
  sendmail): one table, :func:`error_status`, maps every error to one, and each subcommand
  documents the statuses of its own verdicts. Bad arguments are ``EX_USAGE`` (64) with a
  usage line, never argparse's own 2.
* A password is never taken from the command line, where every local user can read it
  (``ps``, ``/proc/<pid>/cmdline``): it comes from the environment (``--password-env VAR``,
  else ``MAILRELAY_PASSWORD``). A URL that carries one still works, with a warning on
  stderr. The password is never printed or logged: the transports redact it in their
  reprs, errors and wire traces, and nothing here prints a URL but its redacted form. As a
  second line of defence, the passwords a run met are replaced by ``***`` in its log lines,
  error line and ``--debug`` traceback (whose chained causes come from other libraries:
  urllib quotes a whole netloc it cannot normalize).
* OAuth 2.0 (Gmail, Microsoft 365): ``--auth-mechanism XOAUTH2`` (or ``OAUTHBEARER``, or
  ``?auth=`` in the URL) with the access token as the password; or ``--oauth2-token-command
  CMD``, a command run (without a shell, standard input closed, at most 60 seconds) each
  time a connection authenticates, whose standard output is the token, so that a long
  ``tracker run --forever`` never sends an expired one. A command that fails makes the
  attempt a transient authentication error (the tracker retries later).
* Certificates are verified, host names checked (the transports' default); ``--ca-file``
  names the CA to trust instead of the system's (a private CA), never "trust anything".
* Everything that came from outside (server replies, DSN fields, addresses read from a
  file) is printed with control characters escaped (:func:`printable`), so a hostile reply
  cannot forge output lines (CR, LF, TAB are the field and line separators) or send escape
  sequences to the terminal. ``--json`` output is JSON, escaped by :mod:`json`.
* An error is one line on stderr: ``mailrelay: <ErrorClass>: <text>``, the class being the
  :mod:`mailrelay.errors` name; the traceback is shown only with ``--debug``, which also
  turns on the library's DEBUG logging (the SMTP wire trace, AUTH redacted).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import email.utils
import json
import logging
import os
import re
import shlex
import shutil
import ssl  # the SSLContext for --ca-file (pyproject's per-file-ignores allow it here)
import subprocess  # --oauth2-token-command runs the user's token command (no shell)
import sys
import tempfile
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, NoReturn
from urllib.parse import unquote

import mailrelay
from mailrelay._shown import printable
from mailrelay.address import Address
from mailrelay.dkim import DKIMSigner
from mailrelay.envelope import Envelope
from mailrelay.errors import (
    AuthenticationError,
    ConfigurationError,
    ConnectError,
    DeliveryError,
    InvalidAddress,
    MailRelayError,
    MessageError,
    ResolverError,
    ServerProtocolError,
    StoreError,
    TLSError,
)
from mailrelay.message import Message
from mailrelay.protocol.sasl import MECHANISMS
from mailrelay.resolver import Resolver
from mailrelay.results import DeliveryResult, Outcome, RecipientResult
from mailrelay.tracker import DSNReport, parse_dsn
from mailrelay.transport import SigningTransport, Transport, TransportURL, transport_from_url
from mailrelay.transport.mx_plan import networks_from_text
from mailrelay.transport.settings import PasswordProvider
from mailrelay.validate import DEFAULT_SPECIAL_USE, RecipientValidator, Validation, Verdict

__all__ = [
    "EX_CONFIG",
    "EX_DATAERR",
    "EX_NOINPUT",
    "EX_NOPERM",
    "EX_NOUSER",
    "EX_OK",
    "EX_PROTOCOL",
    "EX_SOFTWARE",
    "EX_TEMPFAIL",
    "EX_UNAVAILABLE",
    "EX_USAGE",
    "EX_IOERR",
    "PASSWORD_VARIABLE",
    "UNDELIVERABLE",
    "URL_VARIABLE",
    "MAX_INPUT_BYTES",
    "InputError",
    "UsageError",
    "build_parser",
    "error_status",
    "main",
    "printable",
    "redact",
    "send_status",
    "validate_status",
]

log = logging.getLogger(__name__)

# sysexits.h values (os.EX_* exists on Unix only; these are the same numbers everywhere).
#: Success.
EX_OK = 0
#: ``validate``: some address is undeliverable.
UNDELIVERABLE = 1
#: Bad arguments: an unknown option, a missing operand, no transport URL.
EX_USAGE = 64
#: Bad input data: an unparsable message, address or input file.
EX_DATAERR = 65
#: An input file (message, address list, tracker database) does not exist or cannot be read.
EX_NOINPUT = 66
#: ``send``: some recipient was refused for good (5xx).
EX_NOUSER = 67
#: The server could not be reached, or refused the session or the message for good.
EX_UNAVAILABLE = 69
#: An unexpected error (a bug): please report it, with ``--debug`` output.
EX_SOFTWARE = 70
#: A local file could not be written or read (other than the input), or the store failed.
EX_IOERR = 74
#: Try again later: a recipient refused for now (4xx), a transient delivery error, an
#: address whose DNS could not be asked.
EX_TEMPFAIL = 75
#: TLS could not be established as required, or the server broke the protocol.
EX_PROTOCOL = 76
#: Authentication failed (credentials refused, or AUTH would have gone out in plain text).
EX_NOPERM = 77
#: The configuration makes no sense: a malformed URL, a password variable that is not set.
EX_CONFIG = 78

#: The most ``parse-dsn``, ``validate --file`` and ``tracker ingest`` read of one input (a
#: file or standard input), which they hold in memory: a returned message carrying its
#: original in full fits; more (``/dev/zero``, a mailbox piped in by mistake) is refused.
MAX_INPUT_BYTES = 64 * 1024 * 1024

#: The environment variable holding the default transport URL.
URL_VARIABLE = "MAILRELAY_URL"
#: The environment variable holding the password when ``--password-env`` is not given.
PASSWORD_VARIABLE = "MAILRELAY_PASSWORD"  # noqa: S105 - a variable's name, not a password

_AUTH_SCHEMES = frozenset({"smtp", "smtps", "lmtp"})
_NETWORK_SCHEMES = frozenset({"smtp", "smtps", "lmtp", "mx"})
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class UsageError(Exception):
    """Bad arguments: reported with the usage line and :data:`EX_USAGE`."""


class InputError(Exception):
    """An input file could not be read: reported with :data:`EX_NOINPUT`."""


# -- output --------------------------------------------------------------------------------


def _field(value: object) -> str:
    """One tab-separated output field: ``-`` for nothing, escaped text otherwise."""
    if value is None or value == "":
        return "-"
    return printable(str(value))


def _row(*fields: object) -> str:
    return "\t".join(_field(f) for f in fields)


def _emit_json(document: object) -> None:
    print(json.dumps(document, ensure_ascii=False, indent=2))


def _one_line(text: str) -> str:
    return printable(" ".join(text.split("\n")))


def _url_secrets(url: str) -> set[str]:
    """The password a URL's text may carry, raw and percent-decoded, found as the library's
    own redaction finds it (between the first ``:`` after the scheme and the last ``@``), so
    that even a URL too broken to parse has its password kept out of a traceback."""
    _, sep, rest = url.partition("://")
    userinfo, at, _ = rest.rpartition("@")
    if not (sep and at and ":" in userinfo):
        return set()
    raw = userinfo.split(":", 1)[1]
    return {raw, unquote(raw)} - {""}


def redact(text: str, secrets: set[str]) -> str:
    """``text`` with every secret replaced by ``***`` (longest first)."""
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


class _RedactingFormatter(logging.Formatter):
    """Log lines with the run's secrets replaced: the library never logs a password, and
    this keeps it so should a message from elsewhere (a traceback's cause) quote one."""

    def __init__(self, fmt: str, secrets: set[str]) -> None:
        super().__init__(fmt)
        self.secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record), self.secrets)


def _time(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# -- errors and exit statuses --------------------------------------------------------------


def error_status(exc: BaseException) -> int:
    """The exit status for an error that ended a command (the table in ``docs/cli.md``)."""
    if isinstance(exc, UsageError):
        return EX_USAGE
    if isinstance(exc, InputError):
        return EX_NOINPUT
    if isinstance(exc, ConnectError):
        return EX_UNAVAILABLE  # nothing answered: check the host and port, or try later
    if isinstance(exc, AuthenticationError) and not exc.is_transient:
        return EX_NOPERM  # a transient one (a token command that failed) is EX_TEMPFAIL
    if isinstance(exc, DeliveryError):
        if exc.is_transient:
            return EX_TEMPFAIL
        if isinstance(exc, TLSError | ServerProtocolError):
            return EX_PROTOCOL
        return EX_UNAVAILABLE  # a 554 greeting, no route to the domain, ...
    if isinstance(exc, InvalidAddress | MessageError | UnicodeDecodeError):
        return EX_DATAERR
    if isinstance(exc, ConfigurationError):
        return EX_CONFIG
    if isinstance(exc, ImportError):
        return EX_CONFIG  # an optional extra is not installed (mailrelay[dkim])
    if isinstance(exc, StoreError):
        return EX_TEMPFAIL if exc.is_transient else EX_IOERR
    if isinstance(exc, ResolverError):
        return EX_TEMPFAIL if exc.is_transient else EX_DATAERR
    if isinstance(exc, OSError):
        return EX_IOERR
    return EX_SOFTWARE


def _describe(exc: BaseException) -> str:
    """The one-line error message: the error's class name and its text."""
    if isinstance(exc, UsageError | InputError):
        return _one_line(str(exc))
    if isinstance(exc, MailRelayError):
        return _one_line(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return _one_line(f"{type(exc).__name__}: {exc.strerror}{where}")
    return _one_line(f"{type(exc).__name__}: {exc}")


# -- argument parsing ----------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise :class:`UsageError` instead of exiting with 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.format_usage().rstrip()}\n{self.prog}: error: {message}")


def _duration(text: str) -> dt.timedelta:
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"not a duration: {text!r} (a number with s, m, h, d or w, e.g. 90s, 2h, 5d)"
        )
    return dt.timedelta(seconds=float(match[1]) * _UNITS[match[2]])


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number: {text!r}")
    return value


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit() and 0 < int(text) < 65536):
        raise argparse.ArgumentTypeError(f"must be a port number from 1 to 65535: {text!r}")
    return int(text)


def _positive_int(text: str) -> int:
    if not (text.isascii() and text.isdigit() and int(text) > 0):
        raise argparse.ArgumentTypeError(f"must be a positive whole number: {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``mailrelay`` and its subcommands."""
    common = _Parser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        help="log at DEBUG (SMTP wire trace, AUTH redacted) and show tracebacks",
    )
    common.add_argument("--json", action="store_true", help="print one JSON document")

    parser = _Parser(
        prog="mailrelay",
        description="Send mail, validate addresses, read bounces, inspect a delivery tracker.",
        epilog="Exit statuses follow sysexits.h; see docs/cli.md.",
    )
    parser.add_argument("--version", action="version", version=f"mailrelay {mailrelay.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    send = commands.add_parser(
        "send",
        parents=[common],
        help="send one RFC 5322 message through a transport URL",
        description="Send one RFC 5322 message (FILE, or standard input) through a transport.",
    )
    _transport_options(send)
    send.add_argument(
        "--from",
        dest="sender",
        metavar="ADDR",
        help='envelope sender (MAIL FROM); "" is the null sender <>; default: the headers',
    )
    send.add_argument(
        "--to",
        action="append",
        default=[],
        metavar="ADDR",
        help="envelope recipient (RCPT TO); repeat for more; default: To, Cc and Bcc",
    )
    send.add_argument(
        "--notify",
        metavar="LIST",
        help="DSN NOTIFY for every recipient: NEVER, or some of SUCCESS,FAILURE,DELAY",
    )
    send.add_argument("--ret", choices=["FULL", "HDRS"], type=str.upper, help="DSN RET")
    send.add_argument("--envid", metavar="ID", help="DSN ENVID, echoed in the reports")
    send.add_argument(
        "--requiretls", action="store_true", help="REQUIRETLS (RFC 8689): TLS on every hop"
    )
    send.add_argument(
        "file", nargs="?", default="-", metavar="FILE", help="the message; - is stdin"
    )
    send.set_defaults(parser=send, handler=_cmd_send)

    validate = commands.add_parser(
        "validate",
        parents=[common],
        help="check that addresses can receive mail (syntax and DNS)",
        description="Check addresses: syntax, special-use names, and where the DNS says "
        "their domain's mail goes.",
    )
    validate.add_argument(
        "--nameserver",
        action="append",
        default=[],
        metavar="IP",
        help="ask this name server (repeatable); default: /etc/resolv.conf",
    )
    validate.add_argument("--port", type=_port, default=53, help="name server port (53)")
    validate.add_argument(
        "--timeout", type=_positive_float, default=5.0, metavar="S", help="per lookup (5 s)"
    )
    validate.add_argument(
        "--allow-special",
        action="append",
        default=[],
        metavar="NAME",
        help="treat this special-use name (e.g. test) as an ordinary domain (repeatable)",
    )
    validate.add_argument(
        "--refused-networks",
        type=_refused_networks,
        default=None,
        metavar="NETS",
        help="mail host addresses that do not count, comma-separated: CIDR networks, "
        "loopback, private, or none (default: loopback)",
    )
    validate.add_argument(
        "--file", dest="address_file", metavar="F", help="read addresses, one a line; - is stdin"
    )
    validate.add_argument("addresses", nargs="*", metavar="ADDRESS")
    validate.set_defaults(parser=validate, handler=_cmd_validate)

    dsn = commands.add_parser(
        "parse-dsn",
        parents=[common],
        help="read a returned message (bounce, delay, delivery report)",
        description="Parse a delivery-status notification or other returned message.",
    )
    dsn.add_argument("file", metavar="FILE", help="the returned message; - is stdin")
    dsn.set_defaults(parser=dsn, handler=_cmd_parse_dsn)

    # The tracker's commands live in mailrelay.cli_tracker, which builds on this module's
    # helpers: imported here, once this module is complete, so that either module may be
    # imported first.
    from mailrelay import cli_tracker  # noqa: PLC0415

    cli_tracker.add_parser(commands, common)
    return parser


def _transport_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        help="transport URL (smtp://, smtps://, lmtp://, mx://, sendmail://, file://); "
        f"${URL_VARIABLE}",
    )
    parser.add_argument("--user", metavar="NAME", help="AUTH user name (instead of the URL's)")
    parser.add_argument(
        "--password-env",
        metavar="VAR",
        help=f"take the AUTH password from this environment variable (${PASSWORD_VARIABLE})",
    )
    parser.add_argument(
        "--auth-mechanism",
        action="append",
        type=_mechanism,
        metavar="NAME",
        help="the SASL mechanism to use (repeat for several, in order): e.g. XOAUTH2 or "
        "OAUTHBEARER for an OAuth 2.0 token; default: the strongest both sides support",
    )
    parser.add_argument(
        "--oauth2-token-command",
        metavar="CMD",
        help="run CMD (no shell) each time a connection authenticates; its output is the "
        "OAuth 2.0 access token (default mechanism XOAUTH2)",
    )
    parser.add_argument(
        "--ca-file",
        metavar="PEM",
        help="trust this CA certificate file instead of the system's CAs (a private CA)",
    )
    parser.add_argument(
        "--dkim-key",
        metavar="PEM",
        help="DKIM-sign every message with this private key file (RSA or Ed25519; "
        "needs mailrelay[dkim]); with --dkim-domain and --dkim-selector",
    )
    parser.add_argument("--dkim-domain", metavar="DOMAIN", help="the signing domain (d=)")
    parser.add_argument("--dkim-selector", metavar="NAME", help="the key's selector (s=)")


# -- transports ----------------------------------------------------------------------------


def _open_transport(args: argparse.Namespace) -> Transport:
    """The transport ``--url`` (or ``$MAILRELAY_URL``) names, with the password from the
    environment and ``--ca-file``'s context."""
    url = args.url or os.environ.get(URL_VARIABLE)
    if not url:
        raise UsageError(f"no transport URL: pass --url or set {URL_VARIABLE}")
    args.secrets |= _url_secrets(url)
    parsed = TransportURL.parse(url)  # ConfigurationError; its text never holds the password
    overrides: dict[str, Any] = {}
    if parsed.password is not None:
        print(
            f"mailrelay: warning: the URL {parsed.redacted()} carries a password, which other "
            f"users can read in the process list; use --password-env or ${PASSWORD_VARIABLE}",
            file=sys.stderr,
        )
    if parsed.scheme in _AUTH_SCHEMES:
        username = args.user if args.user is not None else parsed.username
        if args.auth_mechanism is not None:
            overrides["auth_mechanisms"] = tuple(args.auth_mechanism)
        overrides.update(_credentials(args, parsed, username))
    elif any(
        option is not None
        for option in (
            args.user,
            args.password_env,
            args.auth_mechanism,
            args.oauth2_token_command,
        )
    ):
        raise UsageError(
            "--user, --password-env, --auth-mechanism and --oauth2-token-command apply to "
            "smtp://, smtps:// and lmtp:// only"
        )
    if args.ca_file is not None:
        if parsed.scheme not in _NETWORK_SCHEMES:
            raise UsageError(f"--ca-file applies to network transports, not {parsed.scheme}://")
        try:
            overrides["ssl_context"] = ssl.create_default_context(cafile=args.ca_file)
        except FileNotFoundError as exc:
            raise InputError(f"cannot read the CA file {args.ca_file!r}: {exc.strerror}") from exc
        except ssl.SSLError as exc:
            raise ConfigurationError(f"not a CA certificate file: {args.ca_file!r}") from exc
    return _with_signer(transport_from_url(url, **overrides), args)


def _credentials(
    args: argparse.Namespace, parsed: TransportURL, username: str | None
) -> dict[str, Any]:
    """The transport's ``username`` and ``password`` (a token command's provider, or the
    password from the environment, else the URL's), when there is a user."""
    if args.oauth2_token_command is not None:
        if args.password_env is not None:
            raise UsageError("give --oauth2-token-command or --password-env, not both")
        if username is None:
            raise ConfigurationError("an OAuth 2.0 token needs a user name: in the URL or --user")
        credentials: dict[str, Any] = {
            "username": username,
            "password": _token_command(args.oauth2_token_command, args.secrets),
        }
        if args.auth_mechanism is None and parsed.auth_mechanisms is None:
            credentials["auth_mechanisms"] = ("XOAUTH2",)  # Gmail's and Microsoft 365's
        return credentials
    password = _password(args, username)
    if password is not None:
        args.secrets.add(password)
    if username is None:
        return {}
    if password is None:
        password = parsed.password
    if password is None:
        raise ConfigurationError(
            f"user {username!r} has no password: set ${PASSWORD_VARIABLE} "
            "or name a variable with --password-env"
        )
    return {"username": username, "password": password}


def _with_signer(transport: Transport, args: argparse.Namespace) -> Transport:
    """``transport``, DKIM-signing when the ``--dkim-*`` options ask for it."""
    try:
        signer = _signer(args)
    except BaseException:
        transport.close()
        raise
    return transport if signer is None else SigningTransport(transport, signer)


#: How long ``--oauth2-token-command`` may run.
TOKEN_COMMAND_TIMEOUT = 60.0


def _mechanism(text: str) -> str:
    """An ``--auth-mechanism`` value: a SASL mechanism mailrelay implements, upper case."""
    name = text.strip().upper()
    if name not in MECHANISMS:
        raise argparse.ArgumentTypeError(
            f"unknown SASL mechanism {text!r} (choose from {', '.join(MECHANISMS)})"
        )
    return name


def _token_command(command: str, secrets: set[str]) -> PasswordProvider:
    """A token provider running ``command`` (split like a shell would, never run by one).

    Its standard output, stripped, is the token; its standard error goes to ours (it is the
    command's own report). A failure raises, which the transport turns into a transient
    :class:`~mailrelay.errors.AuthenticationError`. Each token is added to ``secrets`` so
    that the log lines of the run never show it.
    """
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise UsageError(f"--oauth2-token-command cannot be split into words: {exc}") from None
    if not argv:
        raise UsageError("--oauth2-token-command is empty")

    def token() -> str:
        done = subprocess.run(  # noqa: S603 -- the user's own command, no shell, argv list
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            timeout=TOKEN_COMMAND_TIMEOUT,
            check=False,
        )
        if done.returncode != 0:
            raise OSError(f"the token command {argv[0]!r} exited with status {done.returncode}")
        value = done.stdout.decode("utf-8", "replace").strip()
        if value:
            secrets.add(value)
        return value

    return token


def _signer(args: argparse.Namespace) -> DKIMSigner | None:
    """The DKIM signer ``--dkim-key``, ``--dkim-domain`` and ``--dkim-selector`` describe
    (all three, or none); the key is read from a file, never from the command line."""
    given = [args.dkim_key, args.dkim_domain, args.dkim_selector]
    if all(value is None for value in given):
        return None
    if any(value is None for value in given):
        raise UsageError("DKIM signing needs --dkim-key, --dkim-domain and --dkim-selector")
    try:
        key = Path(args.dkim_key).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read the DKIM key {args.dkim_key!r}: {exc.strerror}") from None
    return DKIMSigner(domain=args.dkim_domain, selector=args.dkim_selector, private_key=key)


def _password(args: argparse.Namespace, username: str | None) -> str | None:
    """The password from the environment: ``--password-env``'s variable (which must be set),
    else ``$MAILRELAY_PASSWORD`` when there is a user to go with it."""
    if args.password_env is not None:
        value = os.environ.get(args.password_env)
        if not value:
            raise ConfigurationError(
                f"--password-env names {args.password_env}, which is not set or empty"
            )
        if username is None:
            raise ConfigurationError("a password needs a user name: in the URL or --user")
        return value
    if username is None:
        return None
    return os.environ.get(PASSWORD_VARIABLE) or None


# -- send ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _message_from(name: str) -> Iterator[Message]:
    """The message in file ``name``, or on standard input for ``-``; streamed either way
    (standard input is spooled to a private temporary file, never held in memory)."""
    if name != "-":
        try:
            message = Message.from_file(name)
        except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
            raise InputError(f"cannot read {name!r}: {exc.strerror}") from exc
        yield message  # (errors while sending are not the input's: they pass unchanged)
        return
    if sys.stdin is None:
        raise MessageError("no message: standard input is closed")
    # mkdtemp makes the directory 0700: the message is nobody else's to read.
    with tempfile.TemporaryDirectory(prefix="mailrelay-send-") as directory:
        path = Path(directory) / "message.eml"
        with path.open("wb") as spool:
            shutil.copyfileobj(sys.stdin.buffer, spool, 1 << 16)
        yield Message.from_file(path)


def _envelope(args: argparse.Namespace, message: Message) -> Envelope:
    """The envelope: ``--from`` / ``--to`` where given, the message's headers otherwise."""
    extra: dict[str, Any] = {
        "notify": args.notify,
        "ret": args.ret,
        "envid": args.envid,
        "requiretls": args.requiretls,
    }
    sender: Address | str | None
    if args.to:
        if args.sender is not None:
            sender = args.sender or None
        else:
            try:
                sender = Envelope.from_message(message).sender
            except (MessageError, InvalidAddress):
                # The header recipients (absent or unusable) do not matter here: --to
                # replaces them; only the sender is needed from the headers.
                sender = _header_sender(message)
        return Envelope(sender, args.to, **extra)
    derived = Envelope.from_message(message)
    sender = derived.sender if args.sender is None else (args.sender or None)
    return Envelope(sender, [r.address for r in derived.recipients], **extra)


def _header_sender(message: Message) -> Address:
    for name in ("Sender", "From"):
        value = message.get(name)
        if value:
            pairs = email.utils.getaddresses([str(value)])
            if pairs and pairs[0][1]:
                return Address.parse(pairs[0][1])
    raise MessageError("the message has no sender address (Sender or From): use --from")


def _recipient_json(result: RecipientResult) -> dict[str, Any]:
    reply = result.reply
    return {
        "address": str(result.address),
        "outcome": result.outcome.value,
        "code": reply.code if reply else None,
        "enhanced": str(reply.enhanced) if reply and reply.enhanced else None,
        "text": reply.text if reply else None,
        "reason": result.reason,
        "host": result.host,
    }


def send_status(result: DeliveryResult) -> int:
    """``send``'s status for a result: :data:`EX_NOUSER` when any recipient was refused
    for good, else :data:`EX_TEMPFAIL` when any was refused for now, else 0."""
    outcomes = {r.outcome for r in result.recipients}
    if Outcome.PERMANENT in outcomes:
        return EX_NOUSER
    if Outcome.TRANSIENT in outcomes:
        return EX_TEMPFAIL
    return EX_OK


def _cmd_send(args: argparse.Namespace) -> int:
    # The transport first: a missing or malformed URL is reported before stdin is read.
    with _open_transport(args) as transport, _message_from(args.file) as message:
        result = transport.send(message, _envelope(args, message))
    if args.json:
        _emit_json(
            {
                "message_id": result.message_id,
                "host": result.host,
                "ok": result.ok,
                "recipients": [_recipient_json(r) for r in result.recipients],
            }
        )
    else:
        for r in result.recipients:
            reply = r.reply
            print(
                _row(
                    r.address,
                    r.outcome.value,
                    reply.code if reply else None,
                    reply.enhanced if reply else None,
                    _one_line(reply.text) if reply else r.reason,
                )
            )
    return send_status(result)


# -- validate ------------------------------------------------------------------------------


def read_input(name: str, what: str) -> bytes:
    """The bytes of file ``name`` (``-``: standard input), of at most
    :data:`MAX_INPUT_BYTES`: an input that never ends cannot exhaust the memory.

    Raises:
        InputError: the file cannot be opened, standard input is closed, or the input
            is larger than the limit.
    """
    limit = MAX_INPUT_BYTES
    if name == "-":
        if sys.stdin is None:
            raise InputError(f"no {what}: standard input is closed")
        return _bounded(sys.stdin.buffer, "standard input", limit)
    try:
        with open(name, "rb") as source:
            return _bounded(source, repr(name), limit)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        raise InputError(f"cannot read {name!r}: {exc.strerror}") from exc


def _bounded(source: BinaryIO, name: str, limit: int) -> bytes:
    # One byte more than the limit tells a full input from a larger one; a buffered
    # read(n) returns n bytes unless the input ends first.
    data = source.read(limit + 1)
    if len(data) > limit:
        raise InputError(f"{name} is larger than {limit} bytes, the most this command reads")
    return data


def _read_lines(name: str) -> list[str]:
    data = read_input(name, "addresses")
    text = data.decode("utf-8")  # UnicodeDecodeError: EX_DATAERR
    return [line.strip() for line in text.splitlines() if line.strip()]


def _validation_json(v: Validation) -> dict[str, Any]:
    hosts = v.mail_hosts
    return {
        "input": v.input,
        "address": None if v.address is None else str(v.address),
        "verdict": v.verdict.value,
        "reason": v.reason.value,
        "detail": v.detail,
        "null_mx": None if hosts is None else hosts.null_mx,
        "implicit_mx": None if hosts is None else hosts.implicit,
        "mail_hosts": None
        if hosts is None
        else [
            {
                "name": h.name,
                "preference": h.preference,
                "status": h.status.value,
                "addresses": [*h.ipv4, *h.ipv6],
            }
            for h in hosts.hosts
        ],
    }


def validate_status(results: Sequence[Validation]) -> int:
    """``validate``'s status: 1 when any address is undeliverable, else
    :data:`EX_TEMPFAIL` when any is unknown, else 0."""
    verdicts = {v.verdict for v in results}
    if Verdict.UNDELIVERABLE in verdicts:
        return UNDELIVERABLE
    if Verdict.UNKNOWN in verdicts:
        return EX_TEMPFAIL
    return EX_OK


def _refused_networks(text: str) -> tuple[str, ...]:
    """``--refused-networks``: what :func:`~mailrelay.transport.mx_plan.networks_from_text`
    reads."""
    try:
        return networks_from_text(text)
    except ConfigurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cmd_validate(args: argparse.Namespace) -> int:
    addresses = list(args.addresses)
    if args.address_file is not None:
        addresses.extend(_read_lines(args.address_file))
    elif not addresses:
        raise UsageError("give addresses, or --file F (- for standard input)")
    resolver = Resolver(nameservers=args.nameserver or None, port=args.port, timeout=args.timeout)
    special = DEFAULT_SPECIAL_USE - {name.lower().strip(".") for name in args.allow_special}
    options: dict[str, Any] = {"special_use": special}
    if args.refused_networks is not None:
        options["refused_networks"] = args.refused_networks
    results = RecipientValidator(resolver, **options).validate_many(addresses)
    if args.json:
        _emit_json([_validation_json(v) for v in results])
    else:
        for v in results:
            hosts = ",".join(h.name for h in v.mail_hosts.hosts) if v.mail_hosts else None
            print(_row(v.input, v.verdict.value, v.reason.value, hosts, v.detail))
    return validate_status(results)


# -- parse-dsn -----------------------------------------------------------------------------


def _report_json(report: DSNReport) -> dict[str, Any]:
    return {
        "kind": report.kind.value,
        "format": report.format,
        "envid": report.envid,
        "original_message_id": report.original_message_id,
        "original_sender": report.original_sender,
        "original_recipient": report.original_recipient,
        "reporting_mta": report.reporting_mta,
        "bounce_address": report.bounce_address,
        "feedback_type": report.feedback_type,
        "recipients": [
            {
                "address": r.address,
                "action": r.action.value,
                "status": r.status,
                "reply_code": r.reply_code,
                "diagnostic": r.diagnostic,
                "remote_mta": r.remote_mta,
                "is_permanent": r.is_permanent,
                "is_hard": r.is_hard,
            }
            for r in report.recipients
        ],
    }


def _hardness(is_hard: bool | None) -> str | None:
    return None if is_hard is None else ("hard" if is_hard else "soft")


def _cmd_parse_dsn(args: argparse.Namespace) -> int:
    report = parse_dsn(read_input(args.file, "message"))
    if args.json:
        _emit_json(_report_json(report))
        return EX_OK
    for key, value in (
        ("kind", report.kind.value),
        ("format", report.format),
        ("envid", report.envid),
        ("original-message-id", report.original_message_id),
        ("reporting-mta", report.reporting_mta),
    ):
        print(f"{key}: {_field(value)}")
    for r in report.recipients:
        print(
            _row(
                r.address,
                r.action.value,
                r.status,
                _hardness(r.is_hard),
                r.remote_mta,
                r.diagnostic,
            )
        )
    return EX_OK


# -- entry point ---------------------------------------------------------------------------


@contextlib.contextmanager
def _logging(debug: bool, secrets: set[str]) -> Iterator[None]:
    """Library log records to stderr while a command runs: WARNING and up, or everything
    with ``--debug``. The handler is removed afterwards (``main`` may be called again)."""
    logger = logging.getLogger("mailrelay")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _RedactingFormatter("mailrelay: %(levelname)s %(name)s: %(message)s", secrets)
    )
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.WARNING)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@contextlib.contextmanager
def _escaping_output() -> Iterator[None]:
    """Standard output writes what its encoding lacks as escapes (``\\u65e5``) while a
    command runs: an address or a reply from anywhere must not end a command with a
    UnicodeEncodeError where the output is not UTF-8 (a legacy locale, a Windows pipe,
    ``PYTHONIOENCODING``). In ``--json`` output such an escape is JSON's own. The stream
    is left as it was found (``main`` may be called again)."""
    stream = sys.stdout
    errors = getattr(stream, "errors", None)
    reconfigure = getattr(stream, "reconfigure", None)
    if errors != "strict" or reconfigure is None:
        yield
        return
    reconfigure(errors="backslashreplace")
    try:
        yield
    finally:
        # The stream may be closed or broken by now (a broken pipe): nothing to restore.
        with contextlib.suppress(OSError, ValueError):
            reconfigure(errors=errors)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``mailrelay`` command line and return its exit status (never exits itself).

    Args:
        argv: the arguments after the program name; ``None`` reads ``sys.argv[1:]``.

    Returns:
        The exit status (``docs/cli.md`` has the table). The console script
        ``mailrelay = "mailrelay.cli:main"`` passes it to :func:`sys.exit`.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return EX_USAGE
    except SystemExit as exc:  # --help and --version print and "exit" 0
        return exc.code if isinstance(exc.code, int) else EX_OK
    debug: bool = getattr(args, "debug", False)
    # Passwords met during the run (the environment's, the URL's): kept out of every
    # traceback and log line, whatever quoted them.
    secrets: set[str] = set()
    args.secrets = secrets
    with _logging(debug, secrets), _escaping_output():
        try:
            status: int = args.handler(args)
        except KeyboardInterrupt:
            print("mailrelay: interrupted", file=sys.stderr)
            return 130  # 128 + SIGINT, as a shell reports it
        except BrokenPipeError:
            # The reader went away (``mailrelay validate ... | head``): nothing more to say.
            # Point stdout at /dev/null so that the interpreter's final flush cannot fail.
            with contextlib.suppress(OSError, ValueError):
                stdout = sys.stdout.fileno()
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, stdout)
                os.close(devnull)
            return EX_IOERR
        except Exception as exc:
            if debug:
                trace = "".join(traceback.format_exception(exc))
                print(redact(trace, secrets), end="", file=sys.stderr)
            if isinstance(exc, UsageError):
                leaf: argparse.ArgumentParser = args.parser
                print(leaf.format_usage().rstrip(), file=sys.stderr)
                print(f"{leaf.prog}: error: {_describe(exc)}", file=sys.stderr)
            else:
                print(f"mailrelay: {redact(_describe(exc), secrets)}", file=sys.stderr)
            return error_status(exc)
    return status
