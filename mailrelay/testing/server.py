"""A real SMTP/LMTP server on loopback for your own tests: records what arrived, fails on cue.

Theory of operation: :class:`SMTPTestServer` is a context manager. Entering it binds a
listening socket (``127.0.0.1`` and a port the kernel picks, by default) and starts one accept
thread; each accepted connection is served by a thread of its own, which speaks ESMTP
(RFC 5321) or LMTP (RFC 2033) from a read buffer, so a pipelined group (RFC 2920) is answered
one command at a time, in order, exactly as a real server does. Every transaction whose data
was accepted is recorded as a :class:`ReceivedMessage` in :attr:`SMTPTestServer.messages`;
every byte each connection sent (up to a bound) is kept in its :class:`Session`. Leaving the
``with`` block wakes and joins every thread and closes every socket, and raises when a thread
does not end or when the server itself failed (a bug, never a client's mistake).

A small declarative set of :class:`Fault` values makes the server misbehave on cue: another
reply at a command, a hang-up at a command or part-way through the data, a slow reply, a
silent server, a ``421`` at a command (also in the middle of a pipelined group), a ``554``
greeting, a STARTTLS that is offered but fails. Hooks (``rcpt=``, ``data=``) choose the reply
per recipient and per message.

Rules:

- Standard library only (``socket``, ``ssl``, ``threading``) and mailrelay's own values; no
  asyncio, no third-party server.
- Bounded: a command line may hold 512 octets with its CRLF (RFC 5321 §4.5.3.1.4; with DSN
  offered, MAIL 100 more and RCPT 500 more, RFC 3461; AUTH lines and SASL responses 12288,
  RFC 4954 §4), a message ``max_size`` octets (``552``
  beyond; 64 MiB when no SIZE is set), a transaction ``max_recipients`` recipients (``452``
  beyond, RFC 5321 §4.5.3.1.10), a connection 100,000 commands, and the bytes a session keeps
  (:attr:`Session.received`) ``max_size`` + 1 MiB octets. Every socket wait lasts at
  most ``timeout`` seconds: a client silent that long gets ``421 4.4.2`` and is disconnected
  (RFC 5321 §4.5.3.2.7).
- Replies go out as the commands are read; a connection the server ends is half-closed first
  and drained for a moment (bounded), so the client reads the replies already sent instead of
  a TCP reset.
- An exception in a server thread other than a socket or TLS error is a bug: it is collected
  in :attr:`SMTPTestServer.errors` and raised when the ``with`` block ends.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import enum
import hmac
import itertools
import re
import socket  # a test server is a network peer (allowed here by pyproject's per-file-ignores)
import ssl  # STARTTLS and implicit TLS
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Self

import attrs

from mailrelay.reply import Reply

__all__ = [
    "DataHook",
    "EXTENSIONS",
    "Fault",
    "FaultKind",
    "Parameters",
    "RcptHook",
    "ReceivedMessage",
    "ReplyLike",
    "SMTPTestServer",
    "Session",
]

Parameters = tuple[tuple[str, str | None], ...]
"""ESMTP parameters as ``(KEYWORD, value)`` pairs: keyword upper-cased, value as the client
sent it (``None`` for a bare keyword such as ``SMTPUTF8``)."""

ReplyLike = Reply | tuple[int, str]
"""A reply a hook returns: a :class:`~mailrelay.reply.Reply`, or ``(code, text)`` where the
text may hold several lines separated by ``\\n``, e.g. ``(450, "4.2.1 try later")``."""

RcptHook = Callable[[str, Parameters], ReplyLike | None]
"""``rcpt(address, params)``: the reply to one ``RCPT TO``; ``None`` accepts it
(``250 2.1.5 Ok``). Only recipients answered 2xx are part of the transaction."""

EXTENSIONS = (
    "PIPELINING",
    "8BITMIME",
    "SMTPUTF8",
    "ENHANCEDSTATUSCODES",
    "CHUNKING",
    "DSN",
    "SIZE",
)
"""The extensions the server implements and, by default, advertises (in this order).
``STARTTLS`` is added when a TLS context is given, ``AUTH PLAIN LOGIN`` when users are,
``XOAUTH2 OAUTHBEARER`` after them when OAuth tokens are."""

_COMMAND_LIMIT = 512  # RFC 5321 §4.5.3.1.4: a command line, CRLF included
# RFC 5321 §4.5.3.1.4 lets extensions lengthen command lines; RFC 3461 (DSN) does, by 100
# octets for MAIL (ENVID, RET) and 500 for RCPT (NOTIFY, ORCPT).
_DSN_ALLOWANCE = {b"MAIL ": 100, b"RCPT ": 500}
_AUTH_LIMIT = 12288  # RFC 4954 §4: a SASL response line
_DEFAULT_DATA_CAP = 64 * 1024 * 1024
_DISCARD_LIMIT = 1024 * 1024  # an over-long line is skipped up to this size, then we hang up
_MAX_COMMANDS = 100_000
_TRANSCRIPT_SLACK = 1024 * 1024  # a session's transcript keeps max_size + this many octets
_LINGER = 2.0  # seconds to drain a connection the server ends (bounded by ``timeout`` too)
_VERBS = frozenset(
    {"HELO", "EHLO", "LHLO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "QUIT", "VRFY",
     "EXPN", "HELP", "STARTTLS", "AUTH"}
)  # fmt: skip
_ENHANCED_PREFIX = re.compile(r"^[245]\.\d{1,3}\.\d{1,3} ?")
_BDAT_ARGS = re.compile(r"(\d{1,12})(?:[ \t]+(LAST))?", re.IGNORECASE)


class FaultKind(enum.Enum):
    """What a :class:`Fault` does (build faults with :class:`Fault`'s named constructors)."""

    REPLY = "reply"
    """Answer the command with the fault's reply; the command is not carried out."""
    DISCONNECT = "disconnect"
    """Hang up when the command arrives, without a reply."""
    SHUTDOWN = "shutdown"
    """Answer ``421`` and hang up (RFC 5321 §3.8)."""
    DELAY = "delay"
    """Wait ``seconds`` before carrying the command out."""
    SILENCE = "silence"
    """Answer nothing more; read until the client hangs up or ``timeout`` passes."""
    DISCONNECT_IN_DATA = "disconnect-in-data"
    """Hang up once ``octets`` octets of message data (DATA or BDAT) have arrived."""
    GREETING = "greeting"
    """Greet with the fault's reply (``554``: refuse every command but QUIT, RFC 5321 §3.1;
    ``4xx``: hang up after the greeting)."""
    BROKEN_TLS = "broken-tls"
    """Answer STARTTLS with ``220``, then send plaintext garbage instead of a TLS handshake."""


def _check_command(
    instance: Fault, attribute: attrs.Attribute[str | None], value: str | None
) -> None:
    if value is not None and value not in _VERBS:
        raise ValueError(f"unknown command {value!r}: one of {', '.join(sorted(_VERBS))}")


def _check_text(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if any(c in value for c in "\r\0"):
        raise ValueError(f"{attribute.name} must not contain CR or NUL: {value!r}")


def _check_times(instance: object, attribute: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"times must be at least 1 (or None for always), not {value}")


def _upper_or_none(value: str | None) -> str | None:
    return None if value is None else value.upper()


@attrs.frozen(kw_only=True)
class Fault:
    """One way the server misbehaves; build it with a named constructor.

    Every fault applies to the first ``times`` occasions it matches, counted over the server's
    whole life (all connections), so a client's retry on a fresh connection meets a healthy
    server; ``times=None`` applies it every time. ``match``, a regular expression, narrows a
    command fault to the command lines it is found in (case-insensitive), e.g.
    ``match="<bob@"``.

    Attributes:
        kind: What the fault does.
        command: The command verb it applies to (``None`` for the greeting and the data).
        code: The reply code (``REPLY``, ``SHUTDOWN``, ``GREETING``).
        text: The reply text (lines separated by ``\\n``).
        seconds: How long ``DELAY`` waits.
        octets: After how many data octets ``DISCONNECT_IN_DATA`` hangs up.
        times: How many occasions it applies to (``None``: all).
        match: A regular expression the command line must contain.
    """

    kind: FaultKind
    command: str | None = attrs.field(
        default=None, converter=_upper_or_none, validator=_check_command
    )
    code: int = attrs.field(default=0)
    text: str = attrs.field(default="", validator=_check_text)
    seconds: float = attrs.field(default=0.0, validator=attrs.validators.ge(0.0))
    octets: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    times: int | None = attrs.field(default=1, validator=_check_times)
    match: str | None = None

    def __attrs_post_init__(self) -> None:
        replies = self.kind in (FaultKind.REPLY, FaultKind.SHUTDOWN, FaultKind.GREETING)
        if replies and not 200 <= self.code <= 599:
            raise ValueError(f"a reply code is 200-599, not {self.code}")
        needs_command = self.kind not in (FaultKind.GREETING, FaultKind.DISCONNECT_IN_DATA)
        if needs_command and self.command is None:
            raise ValueError(f"a {self.kind.value} fault needs a command")
        if self.match is not None:
            try:
                re.compile(self.match)
            except re.error as exc:
                raise ValueError(f"match is not a regular expression: {exc}") from exc

    @classmethod
    def reply(
        cls, command: str, code: int, text: str, *, times: int | None = 1, match: str | None = None
    ) -> Fault:
        """Answer ``command`` with ``code`` and ``text`` instead of carrying it out.

        ``Fault.reply("RCPT", 450, "4.2.1 try later")``; at ``STARTTLS`` this is a STARTTLS
        that is advertised but fails (``454 4.7.0``, RFC 3207 §4).
        """
        return cls(kind=FaultKind.REPLY, command=command, code=code, text=text, times=times,
                   match=match)  # fmt: skip

    @classmethod
    def disconnect(cls, command: str, *, times: int | None = 1, match: str | None = None) -> Fault:
        """Hang up, without a reply, when ``command`` arrives."""
        return cls(kind=FaultKind.DISCONNECT, command=command, times=times, match=match)

    @classmethod
    def shutdown(
        cls,
        command: str,
        text: str = "4.3.2 Service shutting down (test)",
        *,
        times: int | None = 1,
        match: str | None = None,
    ) -> Fault:
        """Answer ``command`` with ``421`` and hang up; the rest of a pipelined group is
        dropped unanswered (RFC 5321 §3.8)."""
        return cls(kind=FaultKind.SHUTDOWN, command=command, code=421, text=text, times=times,
                   match=match)  # fmt: skip

    @classmethod
    def delay(
        cls, command: str, seconds: float, *, times: int | None = 1, match: str | None = None
    ) -> Fault:
        """Wait ``seconds`` before carrying ``command`` out (and replying)."""
        return cls(kind=FaultKind.DELAY, command=command, seconds=seconds, times=times,
                   match=match)  # fmt: skip

    @classmethod
    def silence(cls, command: str, *, times: int | None = 1, match: str | None = None) -> Fault:
        """Never answer ``command``: read until the client gives up (or the server's
        ``timeout``), then hang up."""
        return cls(kind=FaultKind.SILENCE, command=command, times=times, match=match)

    @classmethod
    def disconnect_in_data(cls, octets: int, *, times: int | None = 1) -> Fault:
        """Hang up once ``octets`` octets of a message's data (DATA or BDAT) have arrived."""
        return cls(kind=FaultKind.DISCONNECT_IN_DATA, octets=octets, times=times)

    @classmethod
    def greeting(
        cls, code: int = 554, text: str = "5.3.2 No SMTP service here (test)", *,
        times: int | None = 1,
    ) -> Fault:  # fmt: skip
        """Greet with ``code``: ``554`` refuses the session (every command but QUIT gets
        ``503``, RFC 5321 §3.1), a ``4xx`` greeting is followed by a hang-up."""
        return cls(kind=FaultKind.GREETING, code=code, text=text, times=times)

    @classmethod
    def fail_starttls(cls, *, handshake: bool = False, times: int | None = 1) -> Fault:
        """STARTTLS is advertised but fails: ``454 4.7.0`` (``handshake=False``), or a ``220``
        followed by plaintext garbage instead of the TLS handshake."""
        if handshake:
            return cls(kind=FaultKind.BROKEN_TLS, command="STARTTLS", times=times)
        return cls.reply("STARTTLS", 454, "4.7.0 TLS not available (test)", times=times)


@attrs.frozen(kw_only=True)
class ReceivedMessage:
    """One transaction whose data the server accepted, as the client sent it.

    Attributes:
        mail_from: The reverse-path between ``<`` and ``>`` (``""`` for the null sender).
        rcpt_tos: The accepted recipients (under LMTP, those whose final reply was 2xx), in
            order, as the client wrote them.
        mail_options: The MAIL parameters (``SIZE``, ``BODY``, ``SMTPUTF8``, ``RET``,
            ``ENVID``...), keyword upper-cased, value as given (xtext left encoded).
        rcpt_options: Each recorded recipient's parameters (``NOTIFY``, ``ORCPT``), in the
            same order as :attr:`rcpt_tos`.
        data: The message bytes: after dot-unstuffing for DATA (RFC 5321 §4.5.2), the
            chunks joined for BDAT; CRLF line ends as sent, without the terminating ``.``.
        chunked: Whether the data came with BDAT (RFC 3030) rather than DATA.
        tls: Whether the connection was encrypted (STARTTLS or implicit TLS).
        authenticated: The user the client authenticated as (AUTH), if it did.
        ehlo_name: The name the client gave in EHLO, HELO or LHLO.
        peer: The client's address and port.
        session: The index of the connection in :attr:`SMTPTestServer.sessions`.
    """

    mail_from: str
    rcpt_tos: tuple[str, ...]
    mail_options: Parameters
    rcpt_options: tuple[Parameters, ...]
    data: bytes
    chunked: bool
    tls: bool
    authenticated: str | None
    ehlo_name: str | None
    peer: tuple[str, int]
    session: int


DataHook = Callable[[ReceivedMessage, str | None], ReplyLike | None]
"""``data(message, recipient)``: the final reply after the data; ``None`` accepts it.
In SMTP it is called once per message with ``recipient=None``; under LMTP once per accepted
recipient (RFC 2033 §4.2), and ``message.rcpt_tos`` lists them all."""


class Session:
    """One accepted connection: what the client sent and what happened (thread-safe).

    Attributes:
        index: The connection's number, in accept order.
        peer: The client's address and port.
    """

    def __init__(self, index: int, peer: tuple[str, int], *, limit: int | None = None) -> None:
        self.index = index
        self.peer = peer
        self._limit = limit  # the most octets :attr:`received` keeps (None: all)
        self._lock = threading.Lock()
        self._received = bytearray()
        self._events: list[str] = []
        self._before_tls = b""
        self._tls = False
        self._done = threading.Event()

    @property
    def received(self) -> bytes:
        """Every byte the client sent so far, in order (decrypted after TLS; AUTH exchanges
        included, as sent), up to the server's ``max_size`` + 1 MiB octets (then the event
        ``received truncated at N octets``)."""
        with self._lock:
            return bytes(self._received)

    @property
    def lines(self) -> list[bytes]:
        """:attr:`received` split into lines at CRLF (line ends removed, last partial line
        dropped)."""
        return self.received.split(b"\r\n")[:-1]

    @property
    def events(self) -> list[str]:
        """Notable events in order: ``tls``, ``eof``, ``fault: ...``, ``timeout``, ..."""
        with self._lock:
            return list(self._events)

    @property
    def sent_before_tls(self) -> bytes:
        """Bytes the client sent after ``STARTTLS`` but before the TLS handshake, which the
        server discarded (RFC 3207 §4.2 forbids them: the STARTTLS command-injection bug)."""
        with self._lock:
            return self._before_tls

    @property
    def tls(self) -> bool:
        """Whether the connection is (or was, by its end) encrypted."""
        with self._lock:
            return self._tls

    @property
    def closed(self) -> bool:
        """Whether the connection has ended (then :attr:`received` is complete)."""
        return self._done.is_set()

    def wait_closed(self, timeout: float = 5.0) -> None:
        """Wait at most ``timeout`` seconds for the connection to end.

        Raises:
            TimeoutError: it is still open.
        """
        if not self._done.wait(timeout):
            raise TimeoutError(f"session {self.index} still open after {timeout}s")

    def __repr__(self) -> str:
        return f"<Session {self.index} peer={self.peer} events={self.events!r}>"

    def _add(self, data: bytes) -> None:
        with self._lock:
            if self._limit is None or len(self._received) + len(data) <= self._limit:
                self._received += data
            elif len(self._received) < self._limit:
                # A client may stream data the server drops without end: keep a bounded prefix.
                self._received += data[: self._limit - len(self._received)]
                self._events.append(f"received truncated at {self._limit} octets")

    def _event(self, event: str) -> None:
        with self._lock:
            self._events.append(event)


class _End(Exception):
    """The connection is over; the text says why."""


class _Timeout(Exception):
    """No bytes from the client within ``timeout``."""


class _Cancelled(Exception):
    """The client cancelled an AUTH exchange with ``*`` (RFC 4954 §4)."""


def _to_reply(value: ReplyLike) -> tuple[int, list[str]]:
    if isinstance(value, Reply):
        return value.code, list(value.lines)
    code, text = value
    if not 200 <= code <= 599:
        raise ValueError(f"a reply code is 200-599, not {code}")
    if "\r" in text or "\0" in text:
        raise ValueError(f"a reply text must not contain CR or NUL: {text!r}")
    return code, text.split("\n")


def _split_path(text: str) -> tuple[str, str]:
    """``<path> params`` -> (path, params text); raises ValueError when malformed."""
    text = text.lstrip(" ")
    if not text.startswith("<"):
        raise ValueError("no <path>")
    quoted = escaped = False
    for index in range(1, len(text)):
        char = text[index]
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            rest = text[index + 1 :]
            if rest and not rest.startswith(" "):
                raise ValueError("text after the path")
            return text[1:index], rest
    raise ValueError("no closing >")


def _parameters(text: str) -> Parameters:
    # RFC 5321 §4.1.2: esmtp-keyword ["=" esmtp-value], separated by spaces.
    params: list[tuple[str, str | None]] = []
    for word in text.split():
        keyword, equals, value = word.partition("=")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*", keyword) or (equals and not value):
            raise ValueError(f"malformed parameter {word!r}")
        params.append((keyword.upper(), value if equals else None))
    return tuple(params)


# RFC 3461 §4: xtext is "!".."~" but "+" and "=", or "+" and two upper-case hex digits;
# RFC 6533 §3's utf-8-addr-unitext (ORCPT under SMTPUTF8) also takes non-ASCII characters.
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})*")
_UNITEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2}|[^\x00-\x7f])*")
_ADDR_TYPE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")  # an atom (RFC 5322 §3.2.3)
_NOTIFY = frozenset({"SUCCESS", "FAILURE", "DELAY"})
# RFC 3461 §4.4: "The ENVID parameter MAY be up to 100 characters in length"; §4.2: "The
# entire ORCPT parameter MAY be up to 500 characters in length". Both count the parameter as
# sent, its xtext: where §4.4 means the decoded form it says "the value of the ENVID
# parameter prior to encoding as xtext", and ORCPT's "entire" parameter holds its addr-type
# too. The keyword is not counted (the lenient reading, and the one mailrelay's Envelope
# keeps to); characters, not octets, for a UTF-8 ORCPT under SMTPUTF8 (RFC 6533 §3).
_PARAMETER_LIMITS = {"ENVID": 100, "ORCPT": 500}


def _parameter_error(params: Parameters, *, smtputf8: bool) -> str | None:
    """The 501 text for a DSN parameter against RFC 3461 §4's grammar and lengths (or MAIL's
    AUTH against RFC 4954 §5's grammar), or None."""
    for keyword, given in params:
        value = given or ""
        if keyword == "RET":
            good = value.upper() in ("FULL", "HDRS")  # §4.3
        elif keyword == "ENVID":
            good = _XTEXT.fullmatch(value) is not None  # §4.4
        elif keyword == "NOTIFY":  # §4.1: NEVER, or a list of SUCCESS, FAILURE, DELAY
            words = value.upper().split(",")
            good = words == ["NEVER"] or all(word in _NOTIFY for word in words)
        elif keyword == "AUTH":  # RFC 4954 §5: "<>" or xtext
            good = given is not None and (value == "<>" or _XTEXT.fullmatch(value) is not None)
        elif keyword == "ORCPT":  # §4.2: addr-type ";" xtext
            kind, semicolon, address = value.partition(";")
            text = _UNITEXT if smtputf8 else _XTEXT
            good = bool(semicolon and _ADDR_TYPE.fullmatch(kind) and text.fullmatch(address))
        else:
            continue
        if not good:
            return f"5.5.4 Bad {keyword} parameter syntax"
        if (limit := _PARAMETER_LIMITS.get(keyword)) is not None and len(value) > limit:
            # RFC 3461 §5.1: a value that is not valid gets 501.
            return f"5.5.4 {keyword} parameter longer than {limit} characters"
    return None


_BEARER = frozenset({"XOAUTH2", "OAUTHBEARER"})
# What Google and Microsoft send for a refused token (RFC 7628 §3.2.2's shape).
_TOKEN_ERROR = b'{"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}'
_BEARER_AUTH = re.compile(r"Bearer ([\x21-\x7e]+)")


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError("not UTF-8") from exc


def _parse_xoauth2(response: bytes) -> tuple[str, str]:
    """``user=<user>^Aauth=Bearer <token>^A^A`` -> (user, token); ValueError if malformed."""
    text = _text(response)
    if not text.endswith("\x01\x01"):
        raise ValueError("not ended by ^A^A")
    fields = text[:-2].split("\x01")
    if len(fields) != 2 or not fields[0].startswith("user="):
        raise ValueError("not user= then auth=")
    auth = _BEARER_AUTH.fullmatch(fields[1].removeprefix("auth="))
    if not fields[1].startswith("auth=") or auth is None:
        raise ValueError("no bearer token")
    return fields[0].removeprefix("user="), auth.group(1)


def _parse_oauthbearer(response: bytes) -> tuple[str, str]:
    """RFC 7628 §3.1: ``gs2-header ^A *(kvpair ^A) ^A`` -> (user, token)."""
    text = _text(response)
    header, sep, rest = text.partition("\x01")
    # RFC 5801 §4: gs2-cb-flag "n" (no channel binding), then the authzid and an empty field.
    parts = header.split(",")
    if not sep or len(parts) != 3 or parts[0] != "n" or parts[2] != "":
        raise ValueError("bad gs2 header")
    if parts[1] and not parts[1].startswith("a="):
        raise ValueError("bad authzid")
    user = parts[1].removeprefix("a=")
    if "=" in user.replace("=3D", "").replace("=2C", ""):
        raise ValueError("bad saslname escape")
    user = user.replace("=2C", ",").replace("=3D", "=")
    # After the header: one or more "key=value^A", then the final ^A.
    body = rest[:-1]
    if not rest.endswith("\x01") or not body.endswith("\x01"):
        raise ValueError("not ended by ^A^A")
    pairs: dict[str, str] = {}
    for pair in body[:-1].split("\x01"):
        key, eq, value = pair.partition("=")
        if not eq or not key.isascii() or not key.isalpha() or key in pairs:
            raise ValueError("bad kvpair")
        pairs[key] = value
    auth = _BEARER_AUTH.fullmatch(pairs.get("auth", ""))
    if auth is None:
        raise ValueError("no bearer token")
    return user, auth.group(1)


class _Connection:
    """Serves one accepted connection (runs in its own thread)."""

    def __init__(self, server: SMTPTestServer, sock: socket.socket, session: Session) -> None:
        self.server = server
        self.sock = sock
        self.session = session
        self.buffer = bytearray()
        self.tls = False
        self.ehlo_name: str | None = None
        self.esmtp = False
        self.user: str | None = None
        self.refusing = False  # after a 554 greeting (RFC 5321 §3.1)
        self._reset()

    # -- state ------------------------------------------------------------------------------

    def _reset(self) -> None:
        self.mail_from: str | None = None
        self.mail_options: Parameters = ()
        self.rcpts: list[tuple[str, Parameters]] = []
        self.chunks: list[bytes] = []
        self.chunked_size = 0
        self.data_limit: int | None = None
        self.data_seen = 0

    def _offered(self) -> list[str]:
        server = self.server
        if not self.esmtp:
            return []
        offered = list(server.extensions)
        if server.tls is not None and not self.tls:
            offered.append("STARTTLS")
        if (server.auth is not None or server.oauth_tokens is not None) and (
            self.tls or server.allow_insecure_auth
        ):
            offered.append("AUTH")
        if server.announce_limits:
            offered.append("LIMITS")
        return offered

    # -- I/O --------------------------------------------------------------------------------

    def _recv(self) -> bytes:
        if self.server._stopping.is_set():
            raise _End("server stopping")
        try:
            data = self.sock.recv(65536)
        except TimeoutError as exc:
            raise _Timeout from exc
        if not data:
            self.session._event("eof")
            raise _End("client hung up")
        self.session._add(data)
        return data

    def _read_line(self, limit: int) -> bytes | None:
        """The next line without its line end, or ``None`` when it was longer than ``limit``
        octets with its CRLF (the line is skipped)."""
        while (end := self.buffer.find(b"\n")) < 0:
            if len(self.buffer) > limit:
                self._skip_line()
                return None
            self.buffer += self._recv()
        line = bytes(self.buffer[:end]).removesuffix(b"\r")
        del self.buffer[: end + 1]
        return None if len(line) + 2 > limit else line

    def _skip_line(self) -> None:
        skipped = 0
        while (end := self.buffer.find(b"\n")) < 0:
            skipped += len(self.buffer)
            self.buffer.clear()
            if skipped > _DISCARD_LIMIT:
                raise _End("line too long")
            self.buffer += self._recv()
        del self.buffer[: end + 1]

    def _send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _reply(self, code: int, text: str | list[str]) -> None:
        lines = text.split("\n") if isinstance(text, str) else text
        if "ENHANCEDSTATUSCODES" not in self.server.extensions:
            # RFC 2034 §3: enhanced codes only from a server that advertises them.
            lines = [_ENHANCED_PREFIX.sub("", line) for line in lines]
        out = b"".join(
            f"{code}{' ' if n == len(lines) - 1 else '-'}{line}\r\n".encode()
            for n, line in enumerate(lines)
        )
        self._send(out)

    def _reply_like(self, value: ReplyLike) -> int:
        code, lines = _to_reply(value)
        self._reply(code, lines)
        return code

    def close(self) -> None:
        """End the connection: half-close, drain briefly so the client reads our last
        replies rather than a reset, then close."""
        with contextlib.suppress(OSError):
            # The base method on purpose: SSLSocket.shutdown would drop the TLS layer first.
            socket.socket.shutdown(self.sock, socket.SHUT_WR)
            end = time.monotonic() + min(_LINGER, self.server.timeout)
            self.sock.settimeout(0.05)
            for _ in range(1000):
                if time.monotonic() > end or self.server._stopping.is_set():
                    break
                try:
                    if not self.sock.recv(65536):
                        break
                except (TimeoutError, ssl.SSLWantReadError):
                    continue
        self.sock.close()

    # -- the session ------------------------------------------------------------------------

    def run(self) -> None:
        """Serve the connection until it ends (raises :class:`_End` or socket errors)."""
        server = self.server
        if server.implicit_tls:
            self._wrap_tls()
        fault = server._take_fault(FaultKind.GREETING, None, "")
        if fault is None:
            self._reply(220, f"{server.hostname} {'LMTP' if server.lmtp else 'ESMTP'} "
                             "mailrelay test server")  # fmt: skip
        else:
            self.session._event(f"fault: greeting {fault.code}")
            self._reply(fault.code, fault.text)
            if fault.code >= 500:
                self.refusing = True
            elif fault.code >= 400:
                raise _End("greeting fault")
        try:
            for _ in range(_MAX_COMMANDS):
                line = self._read_line(_AUTH_LIMIT)
                if line is not None and len(line) + 2 > _COMMAND_LIMIT:
                    line = line if len(line) + 2 <= self._line_limit(line) else None
                if line is None:
                    self._reply(500, "5.5.2 Line too long")
                else:
                    self._command(line)
            self._reply(421, f"4.7.0 {server.hostname} Too many commands, closing")
        except _Timeout:
            self.session._event("timeout")
            with contextlib.suppress(OSError):
                self._reply(421, f"4.4.2 {server.hostname} Timeout, closing connection")

    def _line_limit(self, line: bytes) -> int:
        """How long ``line`` may be, CRLF included."""
        verb = line[:5].upper()
        if verb == b"AUTH ":
            return _AUTH_LIMIT  # RFC 4954 §4: an AUTH line carries an initial response
        if "DSN" in self.server.extensions:
            return _COMMAND_LIMIT + _DSN_ALLOWANCE.get(verb, 0)
        return _COMMAND_LIMIT

    def _command(self, line: bytes) -> None:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._reply(500, "5.5.2 Command is not UTF-8")
            return
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        if verb == "BDAT":
            # The chunk follows the command whatever the answer will be (RFC 3030 §2).
            self._bdat(text, arg)
            return
        if self.refusing and verb != "QUIT":
            self._reply(503, "5.5.1 No service here (test)")
            return
        if self._fault(verb, text):
            return
        handler = {
            "HELO": self._hello,
            "EHLO": self._hello,
            "LHLO": self._hello,
            "MAIL": self._mail,
            "RCPT": self._rcpt,
            "DATA": self._data,
            "RSET": self._rset,
            "NOOP": self._noop,
            "QUIT": self._quit,
            "VRFY": self._vrfy,
            "STARTTLS": self._starttls,
            "AUTH": self._auth,
        }.get(verb)
        if handler is None:
            if verb in ("EXPN", "HELP"):
                self._reply(502, "5.5.1 Command not implemented")
            else:
                self._reply(500, "5.5.2 Command unrecognized")
            return
        handler(verb, arg)

    def _fault(self, verb: str, text: str) -> bool:
        """Apply the first matching command fault; True when the command is done with."""
        fault = self.server._take_fault(None, verb, text)
        if fault is None:
            return False
        self.session._event(f"fault: {fault.kind.value} at {verb}")
        match fault.kind:
            case FaultKind.REPLY:
                self._reply(fault.code, fault.text)
                return True
            case FaultKind.DELAY:
                if self.server._stopping.wait(fault.seconds):
                    raise _End("server stopping")
                return False
            case FaultKind.SHUTDOWN:
                self._reply(fault.code, fault.text)
                raise _End("421 fault")
            case FaultKind.DISCONNECT:
                raise _End("disconnect fault")
            case FaultKind.SILENCE:
                self._stay_silent()
            case FaultKind.BROKEN_TLS:
                self._reply(220, "2.0.0 Ready to start TLS")
                self._send(b"this is not TLS\r\n")
                raise _End("broken TLS fault")
        return True  # pragma: no cover - every kind above returns or raises

    def _stay_silent(self) -> None:
        end = time.monotonic() + self.server.timeout
        self.sock.settimeout(0.1)
        for _ in range(int(self.server.timeout / 0.1) + 10):
            if time.monotonic() > end:
                break
            with contextlib.suppress(_Timeout):
                self._recv()
        raise _End("silence over")

    # -- commands ---------------------------------------------------------------------------

    def _hello(self, verb: str, arg: str) -> None:
        server = self.server
        if (verb == "LHLO") != server.lmtp:
            # RFC 2033 §4.1: an LMTP server answers HELO/EHLO with an error; SMTP knows no LHLO.
            self._reply(500, "5.5.1 Use LHLO" if server.lmtp else "5.5.2 Command unrecognized")
            return
        name = arg.strip()
        if not name:
            self._reply(501, f"5.5.4 Syntax: {verb} hostname")
            return
        self._reset()
        self.ehlo_name = name
        self.esmtp = verb != "HELO"
        lines = [f"{server.hostname} Hello {name}"]
        for keyword in self._offered():
            if keyword == "SIZE" and server.max_size is not None:
                lines.append(f"SIZE {server.max_size}")
            elif keyword == "AUTH":
                lines.append(f"AUTH {' '.join(server._mechanisms())}")
            elif keyword == "LIMITS":
                lines.append(f"LIMITS RCPTMAX={server.max_recipients}")  # RFC 9422
            else:
                lines.append(keyword)
        self._reply(250, lines)

    def _check_params(self, params: Parameters, allowed: dict[str, str]) -> str | None:
        """None when every parameter belongs to an offered extension, else the 555 text."""
        offered = self._offered()
        for keyword, _value in params:
            extension = allowed.get(keyword)
            if extension is None or extension not in offered:
                # RFC 5321 §4.1.1.11: parameters not recognized or not offered.
                return f"5.5.4 Unsupported parameter {keyword}"
        return None

    def _mail(self, verb: str, arg: str) -> None:
        server = self.server
        if self.ehlo_name is None:
            self._reply(503, "5.5.1 Send EHLO/HELO first")
            return
        if self.mail_from is not None:
            self._reply(503, "5.5.1 Nested MAIL command")
            return
        if not arg.upper().startswith("FROM:"):
            self._reply(501, "5.5.4 Syntax: MAIL FROM:<address>")
            return
        try:
            path, rest = _split_path(arg[5:])
            params = _parameters(rest)
        except ValueError as exc:
            self._reply(501, f"5.5.4 Syntax error: {exc}")
            return
        allowed = {"SIZE": "SIZE", "BODY": "8BITMIME", "SMTPUTF8": "SMTPUTF8", "RET": "DSN",
                   "ENVID": "DSN", "AUTH": "AUTH"}  # fmt: skip
        refusal = self._check_params(params, allowed)
        if refusal is not None:
            self._reply(555, refusal)
            return
        values = dict(params)
        if (error := _parameter_error(params, smtputf8="SMTPUTF8" in values)) is not None:
            self._reply(501, error)
            return
        if "SIZE" in values:
            size = values["SIZE"] or ""
            if not size.isdigit():
                self._reply(501, "5.5.4 SIZE needs a number")
                return
            if server.max_size is not None and int(size) > server.max_size:
                # RFC 1870 §6.1: refuse a declared size over the limit at MAIL.
                self._reply(552, "5.3.4 Message size exceeds fixed maximum message size")
                return
        if values.get("SMTPUTF8") is not None:
            self._reply(501, "5.5.4 SMTPUTF8 takes no value")  # RFC 6531 §3.4
            return
        body = values.get("BODY", "7BIT")
        if body is None or body.upper() not in ("7BIT", "8BITMIME"):
            self._reply(501, "5.5.4 BODY is 7BIT or 8BITMIME")
            return
        if not path.isascii() and "SMTPUTF8" not in values:
            # RFC 6531 §3.5: a UTF-8 mailbox needs SMTPUTF8 on MAIL.
            self._reply(553, "5.6.7 Non-ASCII address without SMTPUTF8")
            return
        self.mail_from, self.mail_options = path, params
        self._reply(250, "2.1.0 Ok")

    def _rcpt(self, verb: str, arg: str) -> None:
        server = self.server
        if self.mail_from is None:
            self._reply(503, "5.5.1 Need MAIL before RCPT")
            return
        if not arg.upper().startswith("TO:"):
            self._reply(501, "5.5.4 Syntax: RCPT TO:<address>")
            return
        try:
            path, rest = _split_path(arg[3:])
            params = _parameters(rest)
        except ValueError as exc:
            self._reply(501, f"5.5.4 Syntax error: {exc}")
            return
        if not path:
            self._reply(501, "5.1.3 Empty recipient address")
            return
        refusal = self._check_params(params, {"NOTIFY": "DSN", "ORCPT": "DSN"})
        if refusal is not None:
            self._reply(555, refusal)
            return
        smtputf8 = any(k == "SMTPUTF8" for k, _ in self.mail_options)
        if (error := _parameter_error(params, smtputf8=smtputf8)) is not None:
            self._reply(501, error)
            return
        if not path.isascii() and not smtputf8:
            self._reply(553, "5.6.7 Non-ASCII address without SMTPUTF8")
            return
        if len(self.rcpts) >= server.max_recipients:
            # RFC 5321 §4.5.3.1.10: too many recipients is a transient 452.
            self._reply(452, "4.5.3 Too many recipients")
            return
        answer = server.rcpt(path, params) if server.rcpt is not None else None
        code = self._reply_like(answer if answer is not None else (250, "2.1.5 Ok"))
        if 200 <= code < 300:
            self.rcpts.append((path, params))

    def _ready_for_data(self, arg: str, *, chunked: bool) -> bool:
        if self.mail_from is None:
            self._reply(503, "5.5.1 Need MAIL first")
            return False
        if not self.rcpts:
            # RFC 2920 §3.1: refuse the data when no recipient was accepted; RFC 2033 §4.2:
            # an LMTP server MUST refuse it with 503.
            self._reply(503 if self.server.lmtp else 554, "5.5.1 No valid recipients")
            return False
        if not chunked and (arg.strip() or self.chunks):
            self._reply(503 if self.chunks else 501, "5.5.1 DATA is not allowed here")
            return False
        return True

    def _start_data(self) -> None:
        if self.data_limit is None:
            fault = self.server._take_fault(FaultKind.DISCONNECT_IN_DATA, None, "")
            if fault is not None:
                self.session._event(f"fault: disconnect after {fault.octets} data octets")
                self.data_limit = fault.octets

    def _count_data(self, octets: int) -> None:
        self.data_seen += octets
        if self.data_limit is not None and self.data_seen >= self.data_limit:
            raise _End("disconnect-in-data fault")

    def _data(self, verb: str, arg: str) -> None:
        if not self._ready_for_data(arg, chunked=False):
            return
        self._start_data()
        self._reply(354, "End data with <CR><LF>.<CR><LF>")
        content = self._read_content()
        if content is None:
            self._too_big(final=True)
            return
        self._finish(content, chunked=False)

    def _too_big(self, *, final: bool) -> None:
        """Refuse data over the size cap with ``552`` and end the transaction; under LMTP, at
        the end of the data, once per accepted recipient (RFC 2033 §4.2)."""
        replies = len(self.rcpts) if final and self.server.lmtp else 1
        self._reset()
        for _ in range(replies):
            self._reply(552, "5.3.4 Message too big")

    def _read_content(self) -> bytes | None:
        """The DATA content through ``CRLF.CRLF`` (RFC 5321 §4.1.1.4), unstuffed; ``None``
        when it passed the size cap (then read to its end and dropped)."""
        cap = self.server._data_cap
        # A virtual CRLF in front makes the terminator one pattern, even for empty content.
        pending = bytearray(b"\r\n") + self.buffer
        self.buffer.clear()
        over = False
        scanned = 0
        # RFC 1870 §3: the size counts no stuffing dots. Until the terminator, every "CRLF."
        # starts a stuffed line or the terminator: its dot is never content.
        dots = pending.count(b"\r\n.")
        self._count_data(len(pending) - 2)
        while (end := pending.find(b"\r\n.\r\n", scanned)) < 0:
            scanned = max(0, len(pending) - 4)
            if over or len(pending) - 2 - dots > cap:
                # Over the cap: keep only what a terminator could start with.
                over = True
                del pending[:-4]
                scanned = 0
            data = self._recv()
            # An occurrence starting 2 octets or more before the old end was counted already.
            start = max(0, len(pending) - 2)
            pending += data
            dots += pending.count(b"\r\n.", start)
            self._count_data(len(data))
        self.buffer = pending[end + 5 :]
        if over:
            return None
        content = bytes(pending[2 : end + 2])
        if b"\n" in content.replace(b"\r\n", b"") or b"\r" in content.replace(b"\r\n", b""):
            self.session._event("bare CR or LF in data")
        # RFC 5321 §4.5.2: a line's leading dot is removed (the client doubled it).
        unstuffed = content.replace(b"\r\n.", b"\r\n")
        unstuffed = unstuffed[1:] if unstuffed.startswith(b".") else unstuffed
        return None if len(unstuffed) > cap else unstuffed

    def _bdat(self, text: str, arg: str) -> None:
        server = self.server
        args = _BDAT_ARGS.fullmatch(arg.strip())
        if args is None:
            # Without a size we cannot find the chunk's end: the stream is lost.
            self._reply(501, "5.5.4 Syntax: BDAT size [LAST]")
            raise _End("malformed BDAT")
        size, last = int(args.group(1)), args.group(2) is not None
        ready = self.mail_from is not None and bool(self.rcpts)
        if ready:
            self._start_data()
        chunk = self._read_chunk(size, keep=ready and size + self.chunked_size <= server._data_cap)
        if self.refusing:
            self._reply(503, "5.5.1 No service here (test)")
            return
        if self._fault("BDAT", text):
            return
        if "CHUNKING" not in self._offered():
            self._reply(502, "5.5.1 CHUNKING is not offered")
            return
        if not self._ready_for_data("", chunked=True):
            return
        self.chunked_size += size
        if chunk is None:
            self._too_big(final=last)  # RFC 3030 §2: later BDATs of this transaction get 503
            return
        self.chunks.append(chunk)
        if not last:
            self._reply(250, f"2.0.0 {size} octets received")
            return
        self._finish(b"".join(self.chunks), chunked=True)

    def _read_chunk(self, size: int, *, keep: bool) -> bytes | None:
        """Exactly ``size`` octets (RFC 3030 §2); ``None`` (read and dropped) unless ``keep``."""
        kept = bytearray()
        left = size
        while True:
            take = min(left, len(self.buffer))
            if keep:
                kept += self.buffer[:take]
            del self.buffer[:take]
            left -= take
            if take and self.data_limit is not None:
                self._count_data(take)
            if not left:
                return bytes(kept) if keep else None
            self.buffer += self._recv()

    def _finish(self, data: bytes, *, chunked: bool) -> None:
        server = self.server
        assert self.mail_from is not None
        message = ReceivedMessage(
            mail_from=self.mail_from,
            rcpt_tos=tuple(address for address, _ in self.rcpts),
            mail_options=self.mail_options,
            rcpt_options=tuple(params for _, params in self.rcpts),
            data=data,
            chunked=chunked,
            tls=self.tls,
            authenticated=self.user,
            ehlo_name=self.ehlo_name,
            peer=self.session.peer,
            session=self.session.index,
        )
        self._reset()
        queued = f"2.0.0 Ok: queued as T{server._next_id()}"
        if not server.lmtp:
            answer = server.data(message, None) if server.data is not None else None
            code = self._reply_like(answer if answer is not None else (250, queued))
            if 200 <= code < 300:
                server._record(message)
            return
        # RFC 2033 §4.2: one reply per accepted recipient, in RCPT order.
        delivered: list[int] = []
        for number, address in enumerate(message.rcpt_tos):
            answer = server.data(message, address) if server.data is not None else None
            code = self._reply_like(answer if answer is not None else (250, queued))
            if 200 <= code < 300:
                delivered.append(number)
        if delivered:
            server._record(
                attrs.evolve(
                    message,
                    rcpt_tos=tuple(message.rcpt_tos[n] for n in delivered),
                    rcpt_options=tuple(message.rcpt_options[n] for n in delivered),
                )
            )

    def _rset(self, verb: str, arg: str) -> None:
        if arg.strip():
            self._reply(501, "5.5.4 Syntax: RSET")  # RFC 5321 §4.1.1.5: no argument
            return
        self._reset()
        self._reply(250, "2.0.0 Ok")

    def _noop(self, verb: str, arg: str) -> None:
        self._reply(250, "2.0.0 Ok")

    def _vrfy(self, verb: str, arg: str) -> None:
        if not arg.strip():
            self._reply(501, "5.5.4 Syntax: VRFY address")  # RFC 5321 §4.1.1.6
            return
        # RFC 5321 §3.5.3: 252 when the server will not verify but will accept mail.
        self._reply(252, "2.5.0 Cannot VRFY user, but will accept message and attempt delivery")

    def _quit(self, verb: str, arg: str) -> None:
        self._reply(221, f"2.0.0 {self.server.hostname} Bye")
        raise _End("quit")

    def _starttls(self, verb: str, arg: str) -> None:
        if "STARTTLS" not in self._offered():
            self._reply(503 if self.tls else 502, "5.5.1 STARTTLS not available")
            return
        if arg.strip():
            self._reply(501, "5.5.4 Syntax: STARTTLS")
            return
        self._reply(220, "2.0.0 Ready to start TLS")
        if self.buffer:
            # RFC 3207 §4.2: nothing may follow STARTTLS before the handshake; whatever did
            # is dropped (as Postfix does) and recorded, since a client that pipelines past
            # STARTTLS has the command-injection bug (CVE-2011-0411 on the server side).
            injected = bytes(self.buffer)
            self.buffer.clear()
            with self.session._lock:
                self.session._before_tls += injected
            self.session._event(f"client sent {injected!r} before TLS")
        self._wrap_tls(after_starttls=True)
        # RFC 3207 §4.2: forget everything learnt before the handshake.
        self._reset()
        self.ehlo_name, self.esmtp, self.user = None, False, None

    def _wrap_tls(self, *, after_starttls: bool = False) -> None:
        context = self.server.tls
        assert context is not None
        try:
            if after_starttls:
                self._refuse_plaintext()
            # Hold the TLS socket before the handshake: stop() wakes this thread by shutting
            # down self.sock, and wrap_socket detaches the plain one.
            self.sock = context.wrap_socket(
                self.sock, server_side=True, do_handshake_on_connect=False
            )
            if self.server._stopping.is_set():
                raise _End("server stopping")
            self.sock.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            self.session._event(f"tls failed: {exc}")
            raise _End("TLS handshake failed") from exc
        self.tls = True
        with self.session._lock:
            self.session._tls = True
        self.session._event("tls")

    def _refuse_plaintext(self) -> None:
        """RFC 3207 §4.2: after the ``220`` the client's next bytes open the TLS handshake (a
        handshake record, type 22). Plaintext written instead, even after the ``220`` arrived,
        is kept as sent before TLS (the injection bug) and ends the connection."""
        head = self.sock.recv(1, socket.MSG_PEEK)
        if not head or head[0] == 22:
            return
        injected = self.sock.recv(65536)
        self.session._add(injected)
        with self.session._lock:
            self.session._before_tls += injected
        self.session._event(f"client sent {injected!r} before TLS")
        raise _End("plaintext instead of a TLS handshake")

    def _auth(self, verb: str, arg: str) -> None:
        server = self.server
        if not server._mechanisms():
            # RFC 5321 §4.2.4: 502 is for a command recognized but not implemented, and a
            # server never advertises one it would answer 502.
            self._reply(502, "5.5.1 AUTH not available")
            return
        if not self.esmtp:
            # AUTH is an EHLO extension (RFC 4954 §3): before EHLO, or after HELO (which
            # negotiates none), it is out of sequence: 503 (RFC 5321 §4.2.3), not the
            # "not implemented" of a server that offers it after EHLO.
            self._reply(503, "5.5.1 Send EHLO first")
            return
        if "AUTH" not in self._offered():
            # RFC 4954 §6: the mechanism needs an encrypted connection first.
            self._reply(538, "5.7.11 Encryption required for requested authentication mechanism")
            return
        if self.user is not None or self.mail_from is not None:
            self._reply(503, "5.5.1 AUTH not allowed now")
            return
        mechanism, _, initial = arg.strip().partition(" ")
        if mechanism.upper() not in server._mechanisms():
            self._reply(504, "5.5.4 Unrecognized authentication mechanism")
            return
        if mechanism.upper() in _BEARER:
            self._bearer(mechanism.upper(), initial)
            return
        assert server.auth is not None
        try:
            if mechanism.upper() == "PLAIN":
                response = self._sasl(initial, "")
                # RFC 4616 §2: [authzid] NUL authcid NUL passwd
                parts = response.split(b"\0")
                if len(parts) != 3:
                    self._reply(501, "5.5.2 Malformed PLAIN response")
                    return
                authzid, user, password = (part.decode("utf-8", "replace") for part in parts)
                if authzid not in ("", user):
                    user = ""  # no proxy users: fail below
            elif mechanism.upper() == "LOGIN":
                user = self._sasl(initial, "VXNlcm5hbWU6").decode("utf-8", "replace")
                password = self._sasl("", "UGFzc3dvcmQ6").decode("utf-8", "replace")
            else:
                self._reply(504, "5.5.4 Unrecognized authentication mechanism")
                return
        except _Cancelled:
            self._reply(501, "5.0.0 Authentication cancelled")
            return
        except ValueError:
            self._reply(501, "5.5.2 Cannot decode response")
            return
        expected = server.auth.get(user)
        if expected is not None and hmac.compare_digest(expected.encode(), password.encode()):
            self.user = user
            self.session._event(f"authenticated as {user}")
            self._reply(235, "2.7.0 Authentication successful")
        else:
            self._reply(535, "5.7.8 Authentication credentials invalid")

    def _bearer(self, mechanism: str, initial: str) -> None:
        """XOAUTH2 or OAUTHBEARER (RFC 7628): a bearer token checked against the server's
        tokens; a refused one gets the 334 JSON error, the dummy response, then 535."""
        try:
            response = self._sasl(initial, "")
            if mechanism == "XOAUTH2":
                user, token = _parse_xoauth2(response)
            else:
                user, token = _parse_oauthbearer(response)
        except _Cancelled:
            self._reply(501, "5.0.0 Authentication cancelled")
            return
        except ValueError:
            self._reply(501, f"5.5.2 Malformed {mechanism} response")
            return
        self.session._event(f"{mechanism} token offered for {user}")
        if self.server._token_valid(user, token):
            self.user = user
            self.session._event(f"authenticated as {user}")
            self._reply(235, "2.7.0 Authentication successful")
            return
        # RFC 7628 §3.2.2: the error is a 334 with a JSON document; §3.2.3: the client
        # answers with the dummy response (^A; an empty line for XOAUTH2), then 535.
        self._reply(334, base64.b64encode(_TOKEN_ERROR).decode("ascii"))
        line = self._read_line(_AUTH_LIMIT)
        dummy = b"AQ==" if mechanism == "OAUTHBEARER" else b""
        if line is None or line.strip() != dummy:
            self._reply(501, "5.5.2 Expected the dummy response after the error")
            return
        self._reply(535, "5.7.8 Username and Password not accepted (token refused)")

    def _sasl(self, initial: str, challenge: str) -> bytes:
        """The client's response: the initial one if given, else the answer to ``challenge``."""
        if initial:
            text = initial
        else:
            self._reply(334, challenge)
            line = self._read_line(_AUTH_LIMIT)
            if line is None:
                raise ValueError("response too long")
            text = line.decode("ascii", "replace")
        if text == "*":
            raise _Cancelled
        if text == "=":
            return b""  # RFC 4954 §4: an empty initial response
        try:
            return binascii.a2b_base64(text.encode(), strict_mode=True)
        except binascii.Error as exc:
            raise ValueError("not base64") from exc


class SMTPTestServer:
    """An ESMTP (or LMTP) server on loopback that records what arrived and fails on cue.

    Use it as a context manager; it listens between ``__enter__`` and ``__exit__``::

        with SMTPTestServer() as server:
            transport = SMTPTransport(server.host, server.port, tls=TLS.NONE)
            ...
            (received,) = server.wait_for(1)

    Args:
        host: The address to listen on (``"::1"`` for IPv6 loopback).
        port: The port; ``0`` lets the kernel pick a free one (see :attr:`port`).
        hostname: The name in the greeting and the EHLO reply.
        extensions: Which of :data:`EXTENSIONS` to advertise (and honour): a server without
            ``PIPELINING`` or ``CHUNKING`` is ``extensions=set(EXTENSIONS) - {"CHUNKING"}``.
            Parameters of extensions not advertised are refused with ``555``.
        tls: A server-side :class:`ssl.SSLContext`: STARTTLS is offered (RFC 3207), or used
            from the first byte with ``implicit_tls``.
        implicit_tls: TLS from the first byte (RFC 8314), like port 465.
        auth: Users and their passwords for AUTH PLAIN and LOGIN (RFC 4954); offered only over
            TLS unless ``allow_insecure_auth``.
        oauth_tokens: Users and the OAuth 2.0 bearer tokens each may use, for AUTH XOAUTH2
            and OAUTHBEARER (RFC 7628); change them while the server runs with
            :meth:`grant_token` and :meth:`revoke_token` (an expired token). A refused
            token gets the mechanism's failure path: ``334`` with a JSON error (``status``
            ``"401"``), the client's dummy response (OAUTHBEARER: ``^A``; XOAUTH2: an
            empty line; anything else gets ``501``), then ``535``.
        allow_insecure_auth: Offer AUTH over plain text too.
        max_size: The SIZE limit (RFC 1870) advertised and enforced with ``552``; ``None``
            advertises SIZE without a number and caps messages at 64 MiB.
        max_recipients: The most recipients of one transaction (more get ``452``).
        announce_limits: Announce ``max_recipients`` in the EHLO reply as
            ``LIMITS RCPTMAX=n`` (RFC 9422), so that a client keeps to it before sending.
        lmtp: Speak LMTP (RFC 2033): LHLO, and one final reply per accepted recipient.
        timeout: Seconds each socket wait may take; a client silent that long is
            disconnected with ``421``. Also bounds ``Fault.silence``.
        rcpt: Hook choosing the reply to each ``RCPT`` (see :data:`RcptHook`).
        data: Hook choosing the final reply after the data (see :data:`DataHook`).
        faults: The :class:`Fault` values to apply, first match first.

    Raises:
        ValueError: a bad option (unknown extension, ``implicit_tls`` without ``tls``...).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        hostname: str = "test.invalid",
        extensions: Collection[str] = EXTENSIONS,
        tls: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
        auth: Mapping[str, str] | None = None,
        oauth_tokens: Mapping[str, Collection[str]] | None = None,
        allow_insecure_auth: bool = False,
        max_size: int | None = None,
        max_recipients: int = 100,
        announce_limits: bool = False,
        lmtp: bool = False,
        timeout: float = 10.0,
        rcpt: RcptHook | None = None,
        data: DataHook | None = None,
        faults: Sequence[Fault] = (),
    ) -> None:
        wanted = {e.upper() for e in extensions}
        if unknown := wanted - set(EXTENSIONS):
            raise ValueError(f"unknown extensions {sorted(unknown)}: choose from {EXTENSIONS}")
        if implicit_tls and tls is None:
            raise ValueError("implicit_tls needs a tls context")
        if not re.fullmatch(r"[A-Za-z0-9.\-\[\]:]+", hostname):
            raise ValueError(f"not a host name: {hostname!r}")
        if max_size is not None and max_size < 1:
            raise ValueError(f"max_size must be positive, not {max_size}")
        if max_recipients < 1:
            raise ValueError(f"max_recipients must be positive, not {max_recipients}")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, not {timeout}")
        if not all(isinstance(fault, Fault) for fault in faults):
            raise TypeError("faults must be Fault values")
        self.hostname = hostname
        self.extensions = tuple(e for e in EXTENSIONS if e in wanted)
        self.tls = tls
        self.implicit_tls = implicit_tls
        self.auth = dict(auth) if auth is not None else None
        self.oauth_tokens: dict[str, set[str]] | None = (
            {user: set(tokens) for user, tokens in oauth_tokens.items()}
            if oauth_tokens is not None
            else None
        )
        self.allow_insecure_auth = allow_insecure_auth
        self.max_size = max_size
        self.max_recipients = max_recipients
        self.announce_limits = announce_limits
        self.lmtp = lmtp
        self.timeout = timeout
        self.rcpt = rcpt
        self.data = data
        self.faults = tuple(faults)
        self._data_cap = max_size if max_size is not None else _DEFAULT_DATA_CAP
        self._host = host
        self._port = port
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._messages: list[ReceivedMessage] = []
        self._sessions: list[Session] = []
        self._connections: list[_Connection] = []
        self._threads: list[threading.Thread] = []
        self._errors: list[str] = []
        self._fault_uses = [0] * len(self.faults)
        self._ids = itertools.count(1)
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None

    # -- life -------------------------------------------------------------------------------

    def start(self) -> Self:
        """Bind the listener and start accepting; returns the server itself.

        Raises:
            RuntimeError: the server was already started.
            OSError: the address could not be bound.
        """
        if self._acceptor is not None:
            raise RuntimeError("an SMTPTestServer can be started only once")
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.bind((self._host, self._port))
            listener.listen(64)
            listener.settimeout(0.05)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self._port = listener.getsockname()[1]
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"smtp-test-server-{self._port}-accept", daemon=True
        )
        self._acceptor.start()
        return self

    def stop(self) -> None:
        """Stop accepting, end every connection and join every thread (idempotent).

        Raises:
            RuntimeError: a thread did not end within ``timeout`` + 5 seconds.
        """
        self._stopping.set()
        if self._acceptor is not None:
            self._acceptor.join(timeout=self.timeout + 5.0)
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            connections = list(self._connections)
            threads = list(self._threads)
        for connection in connections:
            # Wake a thread blocked in recv; each socket is closed by its own thread.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(connection.sock, socket.SHUT_RDWR)
        stuck = []
        for thread in [*threads, *([self._acceptor] if self._acceptor else [])]:
            thread.join(timeout=self.timeout + 5.0)
            if thread.is_alive():
                stuck.append(thread.name)
        if stuck:
            raise RuntimeError(f"SMTPTestServer threads did not end: {stuck}")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        self.stop()
        if exc_type is None and self._errors:
            raise RuntimeError(f"SMTPTestServer failed: {self._errors}")

    # -- where it listens -------------------------------------------------------------------

    @property
    def host(self) -> str:
        """The address the server listens on."""
        return self._host

    @property
    def port(self) -> int:
        """The port the server listens on (the kernel's pick once started, when ``port=0``)."""
        return self._port

    @property
    def url(self) -> str:
        """A URL for :func:`mailrelay.transport.transport_from_url`: ``smtp://`` (with
        ``tls=none`` or ``tls=starttls``), ``smtps://`` for implicit TLS, ``lmtp://``."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        if self.lmtp:
            return f"lmtp://{host}:{self._port}"
        if self.implicit_tls:
            return f"smtps://{host}:{self._port}"
        tls = "none" if self.tls is None else "starttls"
        return f"smtp://{host}:{self._port}?tls={tls}"

    # -- what it recorded -------------------------------------------------------------------

    @property
    def messages(self) -> list[ReceivedMessage]:
        """The transactions whose data was accepted, in arrival order (a copy)."""
        with self._lock:
            return list(self._messages)

    @property
    def sessions(self) -> list[Session]:
        """One :class:`Session` per accepted connection, in accept order (a copy)."""
        with self._lock:
            return list(self._sessions)

    @property
    def errors(self) -> list[str]:
        """Unexpected exceptions in server threads (bugs, raised at ``__exit__``)."""
        with self._lock:
            return list(self._errors)

    def wait_for(self, count: int = 1, timeout: float = 10.0) -> list[ReceivedMessage]:
        """Wait until at least ``count`` messages have arrived; return them all.

        Raises:
            TimeoutError: fewer arrived within ``timeout`` seconds (the message says how many).
        """
        with self._arrived:
            if not self._arrived.wait_for(lambda: len(self._messages) >= count, timeout):
                raise TimeoutError(
                    f"{len(self._messages)} of {count} messages arrived within {timeout}s"
                )
            return list(self._messages)

    def grant_token(self, user: str, token: str) -> None:
        """Accept ``token`` for ``user`` from now on (XOAUTH2, OAUTHBEARER).

        Raises:
            ValueError: the server was made without ``oauth_tokens``.
        """
        with self._lock:
            if self.oauth_tokens is None:
                raise ValueError("this server takes no OAuth tokens (oauth_tokens=None)")
            self.oauth_tokens.setdefault(user, set()).add(token)

    def revoke_token(self, token: str) -> None:
        """Refuse ``token`` from now on, for every user (it expired or was revoked).

        Raises:
            ValueError: the server was made without ``oauth_tokens``.
        """
        with self._lock:
            if self.oauth_tokens is None:
                raise ValueError("this server takes no OAuth tokens (oauth_tokens=None)")
            for tokens in self.oauth_tokens.values():
                tokens.discard(token)

    def clear(self) -> None:
        """Forget the messages recorded so far (sessions and fault counts are kept)."""
        with self._lock:
            self._messages.clear()

    # -- internals --------------------------------------------------------------------------

    def _mechanisms(self) -> list[str]:
        """The AUTH mechanisms offered, in EHLO order."""
        names = ["PLAIN", "LOGIN"] if self.auth is not None else []
        if self.oauth_tokens is not None:
            names += ["XOAUTH2", "OAUTHBEARER"]
        return names

    def _token_valid(self, user: str, token: str) -> bool:
        with self._lock:
            tokens = (self.oauth_tokens or {}).get(user, set())
            return any(hmac.compare_digest(token.encode(), known.encode()) for known in tokens)

    @property
    def _listening(self) -> socket.socket:
        assert self._listener is not None
        return self._listener

    def _accept_loop(self) -> None:
        # Ends when stop() sets the flag: each poll waits at most 50 ms.
        while not self._stopping.is_set():
            try:
                sock, address = self._listening.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if not self._stopping.is_set():
                    with self._lock:
                        self._errors.append(f"accept failed: {exc!r}")
                return
            sock.settimeout(self.timeout)
            with self._lock:
                session = Session(
                    len(self._sessions),
                    (str(address[0]), int(address[1])),
                    limit=self._data_cap + _TRANSCRIPT_SLACK,
                )
                connection = _Connection(self, sock, session)
                thread = threading.Thread(
                    target=self._serve,
                    args=(connection,),
                    name=f"smtp-test-server-{self._port}-{session.index}",
                    daemon=True,
                )
                self._sessions.append(session)
                self._connections.append(connection)
                self._threads.append(thread)
            thread.start()

    def _serve(self, connection: _Connection) -> None:
        session = connection.session
        try:
            connection.run()
        except _End as end:
            session._event(f"end: {end}")
        except _Timeout:
            session._event("timeout")
        except OSError as exc:  # the client went away; ssl.SSLError included
            session._event(f"socket error: {exc!r}")
        except Exception as exc:
            session._event(f"server error: {exc!r}")
            with self._lock:
                self._errors.append(f"session {session.index}: {exc!r}")
        finally:
            try:
                connection.close()
            finally:
                session._done.set()

    def _take_fault(self, kind: FaultKind | None, verb: str | None, text: str) -> Fault | None:
        """The first applicable fault with uses left (counting this use), or None.

        ``kind`` picks the greeting or data faults; ``None`` picks the command faults for
        ``verb``.
        """
        with self._lock:
            for index, fault in enumerate(self.faults):
                if kind is not None and fault.kind is not kind:
                    continue
                if kind is None and (
                    fault.kind in (FaultKind.GREETING, FaultKind.DISCONNECT_IN_DATA)
                    or fault.command != verb
                    or (fault.match is not None and not re.search(fault.match, text, re.I))
                ):
                    continue
                if fault.times is not None and self._fault_uses[index] >= fault.times:
                    continue
                self._fault_uses[index] += 1
                return fault
        return None

    def _record(self, message: ReceivedMessage) -> None:
        with self._arrived:
            self._messages.append(message)
            self._arrived.notify_all()

    def _next_id(self) -> int:
        with self._lock:
            return next(self._ids)
