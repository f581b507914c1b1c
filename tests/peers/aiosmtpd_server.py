"""aiosmtpd as a second real server: SMTP (SMTPUTF8, 8BITMIME, AUTH, STARTTLS) and LMTP.

Theory of operation: aiosmtpd's threaded ``Controller`` runs an asyncio server in its own
thread on ``127.0.0.1`` and a free port (or, for LMTP, also a unix socket). A
:class:`RecordingHandler` answers RCPT and DATA and records each accepted transaction as a
:class:`ReceivedMessage`, so tests assert on exactly what the client put on the wire.

Scripted answers, chosen by the recipient's local part (case-insensitive):

=============== ============================== ==========================================
local part      SMTP and LMTP, at RCPT         LMTP only, after DATA (RFC 2033 §4.2)
=============== ============================== ==========================================
``tempfail``    ``450 4.2.1`` (transient)
``reject``      ``550 5.1.1`` (permanent)
``fail``                                       ``550 5.1.1`` for this recipient
``later``                                      ``452 4.2.2`` for this recipient
anything else   ``250``                        ``250 2.0.0``
=============== ============================== ==========================================

Facts about aiosmtpd 1.4 that tests meet (read from its source):

- EHLO offers ``8BITMIME``, ``SMTPUTF8`` (``enable_SMTPUTF8``), ``SIZE`` and, when a TLS
  context is given, ``STARTTLS``; ``AUTH PLAIN LOGIN`` when an authenticator is set (here
  before TLS too: ``auth_require_tls=False``). No PIPELINING keyword, no CHUNKING, no DSN; it
  answers ``555`` to any RCPT parameter and to unknown MAIL parameters.
- MAIL parameters are recorded upper-cased as aiosmtpd splits them (``BODY=8BITMIME``).
- ``decode_data=False``: content is the raw bytes after dot-unstuffing, CRLF line ends kept.
- Warnings: nothing configured here makes aiosmtpd call ``warnings.warn`` (it does for
  ``auth_required`` without TLS, the deprecated ``server_kwargs`` and old-style hooks, none
  of which are used), so pytest's warnings-as-errors holds in the server thread too.
"""

from __future__ import annotations

import base64
import binascii
import re
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from aiosmtpd.controller import Controller, UnixSocketController
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, LoginPassword, Session

from tests.peers.postfix import USERS
from tests.peers.scripted import free_port
from tests.peers.tls import TLSFiles

HOSTNAME = "aiosmtpd.mailrelay.test"
DATA_SIZE_LIMIT = 10_240_000
"""The SIZE aiosmtpd advertises here (same as the test Postfix)."""

_RCPT_REPLIES = {
    "tempfail": "450 4.2.1 Mailbox temporarily unavailable (test)",
    "reject": "550 5.1.1 No such user (test)",
}
_LMTP_DATA_REPLIES = {
    "fail": "550 5.1.1 Delivery failed for this recipient (test)",
    "later": "452 4.2.2 Mailbox full, try later (test)",
}


def _is_tls(server: SMTP) -> bool:
    # session.ssl is only set after STARTTLS; the transport knows for implicit TLS too.
    transport = server.transport
    return transport is not None and transport.get_extra_info("ssl_object") is not None


def _local_part(address: str) -> str:
    return address.rpartition("@")[0].lower()


@attrs.frozen(kw_only=True)
class ReceivedMessage:
    """One transaction the server accepted, as the client sent it.

    Attributes:
        mail_from: The reverse-path without ``<>`` (``""`` for the null sender).
        mail_options: MAIL parameters, upper-cased by aiosmtpd (``("SMTPUTF8", "SIZE=12")``).
        rcpt_tos: The accepted recipients, in order.
        rcpt_options: The RCPT parameters of each accepted recipient, in the same order.
        content: The message bytes after dot-unstuffing (CRLF line ends kept).
        smtputf8: Whether MAIL carried SMTPUTF8.
        helo_name: The name the client gave in EHLO/HELO/LHLO.
        tls: Whether the transaction ran over TLS.
        auth_login: The user name the client authenticated as, if it did.
        protocol: ``"SMTP"`` or ``"LMTP"``.
    """

    mail_from: str
    mail_options: tuple[str, ...]
    rcpt_tos: tuple[str, ...]
    rcpt_options: tuple[tuple[str, ...], ...]
    content: bytes
    smtputf8: bool
    helo_name: str | None
    tls: bool
    auth_login: str | None
    protocol: str


class RecordingHandler:
    """An aiosmtpd handler that scripts replies by local part and records transactions.

    Args:
        lmtp: Answer DATA with one reply per accepted recipient (RFC 2033 §4.2).
    """

    def __init__(self, *, lmtp: bool = False) -> None:
        self.lmtp = lmtp
        self.messages: list[ReceivedMessage] = []
        """Accepted transactions, in order."""
        # aiosmtpd flattens every recipient's parameters into one list; keep them per
        # recipient, keyed by the (per-transaction) envelope so concurrent sessions don't mix.
        self._rcpt_options: weakref.WeakKeyDictionary[Envelope, list[tuple[str, ...]]] = (
            weakref.WeakKeyDictionary()
        )

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        """Refuse the scripted local parts, accept and remember the others."""
        reply = _RCPT_REPLIES.get(_local_part(address))
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        self._rcpt_options.setdefault(envelope, []).append(tuple(rcpt_options))
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Record the transaction; for LMTP answer once per recipient."""
        auth = session.auth_data
        content = envelope.original_content or b""
        self.messages.append(
            ReceivedMessage(
                # aiosmtpd keeps the null reverse-path as "<>": recorded as documented, "".
                mail_from="" if envelope.mail_from in (None, "<>") else envelope.mail_from,
                mail_options=tuple(envelope.mail_options),
                rcpt_tos=tuple(envelope.rcpt_tos),
                rcpt_options=tuple(self._rcpt_options.get(envelope, [])),
                content=content,
                smtputf8=envelope.smtp_utf8,
                helo_name=session.host_name,
                tls=_is_tls(server),
                auth_login=auth.login.decode() if isinstance(auth, LoginPassword) else None,
                protocol="LMTP" if self.lmtp else "SMTP",
            )
        )
        if not self.lmtp:
            return "250 2.0.0 Message accepted for delivery"
        # aiosmtpd writes the string and one CRLF, so joining with CRLF sends one reply per
        # recipient, in RCPT order, as RFC 2033 §4.2 requires.
        return "\r\n".join(
            _LMTP_DATA_REPLIES.get(_local_part(rcpt), f"250 2.0.0 <{rcpt}> delivered")
            for rcpt in envelope.rcpt_tos
        )


def authenticate(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
) -> AuthResult:
    """aiosmtpd authenticator accepting the test users (:data:`tests.peers.postfix.USERS`)."""
    if isinstance(auth_data, LoginPassword):
        login = auth_data.login.decode("utf-8", "replace")
        if USERS.get(login) == auth_data.password.decode("utf-8", "replace"):
            return AuthResult(success=True, auth_data=auth_data)
    return AuthResult(success=False, handled=False)


# -- OAuth 2.0 bearer tokens (XOAUTH2, OAUTHBEARER) --------------------------------------------

#: The exact wire forms mailrelay must send (RFC 7628 §3.1 for OAUTHBEARER; Google's XOAUTH2).
_XOAUTH2 = re.compile(rb"user=([^\x00-\x1f]+)\x01auth=Bearer ([\x21-\x7e]+)\x01\x01")
_OAUTHBEARER = re.compile(
    rb"n,a=([^,\x00-\x1f]*),\x01(?:host=[\x21-\x7e]+\x01)?(?:port=[1-9][0-9]{0,4}\x01)?"
    rb"auth=Bearer ([\x21-\x7e]+)\x01\x01"
)
#: RFC 7628 §3.2.2's error document, as Google sends it for a refused token.
TOKEN_ERROR = b'{"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}'
_DUMMY = {"XOAUTH2": b"", "OAUTHBEARER": b"\x01"}  # RFC 7628 §3.2.3 (XOAUTH2: empty)


class TokenTable:
    """The bearer tokens the server accepts, per user; tests grant and revoke them while the
    server runs (an expiring token). Thread-safe: the server runs in its own thread.

    Attributes:
        responses: every decoded AUTH response the server read, as ``(mechanism, bytes)``:
            initial responses and the dummy responses after an error, in order.
    """

    def __init__(self, tokens: dict[str, set[str]]) -> None:
        self._tokens = {user: set(each) for user, each in tokens.items()}
        self._lock = threading.Lock()
        self.responses: list[tuple[str, bytes]] = []

    def grant(self, user: str, token: str) -> None:
        """Accept ``token`` for ``user`` from now on."""
        with self._lock:
            self._tokens.setdefault(user, set()).add(token)

    def revoke(self, token: str) -> None:
        """Refuse ``token`` from now on (it expired)."""
        with self._lock:
            for each in self._tokens.values():
                each.discard(token)

    def valid(self, user: str, token: str) -> bool:
        """Whether ``token`` is accepted for ``user`` now."""
        with self._lock:
            return token in self._tokens.get(user, set())

    def record(self, mechanism: str, response: bytes) -> None:
        with self._lock:
            self.responses.append((mechanism, response))


class OAuthHandler(RecordingHandler):
    """:class:`RecordingHandler` that also offers AUTH XOAUTH2 and OAUTHBEARER (aiosmtpd
    finds ``auth_<NAME>`` methods on the handler), checking the exact wire form and the
    token against a :class:`TokenTable`. A refused token gets the real servers' failure
    path: ``334`` with base64 JSON, the client's dummy response, then ``535``; a wrong dummy
    response gets ``501``."""

    def __init__(self, tokens: TokenTable, *, lmtp: bool = False) -> None:
        super().__init__(lmtp=lmtp)
        self.tokens = tokens

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:
        """AUTH XOAUTH2 (aiosmtpd's naming: ``auth_`` + the mechanism)."""
        return await self._bearer(server, args, "XOAUTH2", _XOAUTH2)

    async def auth_OAUTHBEARER(self, server: SMTP, args: list[str]) -> AuthResult:
        """AUTH OAUTHBEARER (RFC 7628)."""
        return await self._bearer(server, args, "OAUTHBEARER", _OAUTHBEARER)

    async def _bearer(
        self, server: SMTP, args: list[str], mechanism: str, form: re.Pattern[bytes]
    ) -> AuthResult:
        if len(args) == 2:
            try:
                response = base64.b64decode(args[1], validate=True)
            except binascii.Error:
                await server.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        else:
            challenged = await server.challenge_auth("")
            if challenged is MISSING:
                return AuthResult(success=False, handled=True)  # 501 already sent
            assert isinstance(challenged, bytes)
            response = challenged
        self.tokens.record(mechanism, response)
        match = form.fullmatch(response)
        if match is None:
            await server.push(f"501 5.5.2 Malformed {mechanism} response")
            return AuthResult(success=False, handled=True)
        raw_user, token = match.group(1), match.group(2).decode("ascii")
        user = raw_user.decode("utf-8", "replace")
        if mechanism == "OAUTHBEARER":
            user = user.replace("=2C", ",").replace("=3D", "=")
        if self.tokens.valid(user, token):
            return AuthResult(success=True, auth_data=LoginPassword(user.encode(), b""))
        dummy = await server.challenge_auth(TOKEN_ERROR)
        if dummy is MISSING:
            return AuthResult(success=False, handled=True)
        assert isinstance(dummy, bytes)
        self.tokens.record(mechanism, dummy)
        if dummy != _DUMMY[mechanism]:
            await server.push("501 5.5.2 Expected the dummy response after the error")
            return AuthResult(success=False, handled=True)
        return AuthResult(
            success=False, handled=False, message="535 5.7.8 Username and Password not accepted"
        )


class _LMTPController(Controller):
    def factory(self) -> SMTP:
        return LMTP(self.handler, **self.SMTP_kwargs)


class _LMTPUnixController(UnixSocketController):
    def factory(self) -> SMTP:
        return LMTP(self.handler, **self.SMTP_kwargs)


class AiosmtpdServer:
    """A running aiosmtpd server and what it recorded.

    Attributes:
        host: ``"127.0.0.1"``.
        port: The TCP port (``0`` for a unix-socket server).
        unix_socket: The socket path of a unix-socket LMTP server, else ``None``.
        handler: The :class:`RecordingHandler`; its ``messages`` are also :attr:`messages`.
        ca_file: The CA that signed the server certificate (when TLS is on).
        users: The accepted AUTH user name -> password.
    """

    host = "127.0.0.1"
    hostname = HOSTNAME
    users = USERS

    def __init__(
        self,
        controller: Controller | UnixSocketController,
        handler: RecordingHandler,
        *,
        port: int,
        unix_socket: Path | None,
        ca_file: Path,
    ) -> None:
        self.controller = controller
        self.handler = handler
        self.port = port
        self.unix_socket = unix_socket
        self.ca_file = ca_file
        self._stopped = False

    @property
    def messages(self) -> list[ReceivedMessage]:
        """The accepted transactions, in order."""
        return self.handler.messages

    def stop(self) -> None:
        """Stop the server thread (joins it); a second call does nothing."""
        if not self._stopped:
            self._stopped = True
            self.controller.stop()


def start_aiosmtpd(
    tls_files: TLSFiles,
    *,
    lmtp: bool = False,
    starttls: bool = True,
    implicit_tls: bool = False,
    auth: bool = True,
    unix_socket: Path | None = None,
    oauth_tokens: TokenTable | None = None,
) -> AiosmtpdServer:
    """Start an aiosmtpd server in a thread on 127.0.0.1 (or ``unix_socket``).

    Args:
        tls_files: Certificates; the server uses the CA-signed one.
        lmtp: Speak LMTP (LHLO, per-recipient replies after DATA) instead of SMTP.
        starttls: Offer STARTTLS (RFC 3207).
        implicit_tls: TLS from the first byte (RFC 8314) instead of STARTTLS.
        auth: Offer AUTH PLAIN and LOGIN (RFC 4954), before TLS too.
        unix_socket: Listen on this unix socket path instead of TCP.
        oauth_tokens: Also offer AUTH XOAUTH2 and OAUTHBEARER, accepting these tokens
            (:class:`OAuthHandler`).

    Returns:
        The running server; call ``stop()`` when done.
    """
    handler = (
        RecordingHandler(lmtp=lmtp)
        if oauth_tokens is None
        else OAuthHandler(oauth_tokens, lmtp=lmtp)
    )
    smtp_kwargs: dict[str, Any] = {
        "server_hostname": HOSTNAME,
        "enable_SMTPUTF8": True,
        "decode_data": False,
        "data_size_limit": DATA_SIZE_LIMIT,
        "require_starttls": False,
        "auth_require_tls": False,
        "timeout": 30,
    }
    if auth:
        smtp_kwargs["authenticator"] = authenticate
    if starttls and not implicit_tls:
        smtp_kwargs["tls_context"] = tls_files.server_context()
    ssl_context = tls_files.server_context() if implicit_tls else None
    controller: Controller | UnixSocketController
    port = 0
    if unix_socket is not None:
        unix_class = _LMTPUnixController if lmtp else UnixSocketController
        controller = unix_class(
            handler, unix_socket=unix_socket, ssl_context=ssl_context, **smtp_kwargs
        )
    else:
        port = free_port()
        inet_class = _LMTPController if lmtp else Controller
        controller = inet_class(
            handler, hostname="127.0.0.1", port=port, ssl_context=ssl_context, **smtp_kwargs
        )
    controller.start()
    return AiosmtpdServer(
        controller, handler, port=port, unix_socket=unix_socket, ca_file=tls_files.ca_file
    )


AiosmtpdFactory = Callable[..., AiosmtpdServer]
"""The type of the ``make_aiosmtpd`` fixture, for annotating tests."""


@pytest.fixture
def make_aiosmtpd(tls_files: TLSFiles) -> Iterator[AiosmtpdFactory]:
    """A factory taking :func:`start_aiosmtpd`'s keyword arguments; stops every server made."""
    servers: list[AiosmtpdServer] = []

    def make(**options: Any) -> AiosmtpdServer:
        server = start_aiosmtpd(tls_files, **options)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def aiosmtpd_server(make_aiosmtpd: AiosmtpdFactory) -> AiosmtpdServer:
    """aiosmtpd SMTP on 127.0.0.1: SMTPUTF8, 8BITMIME, STARTTLS, AUTH PLAIN/LOGIN."""
    return make_aiosmtpd()


@pytest.fixture
def aiosmtpd_smtps(make_aiosmtpd: AiosmtpdFactory) -> AiosmtpdServer:
    """aiosmtpd SMTP with implicit TLS (SMTPS) and AUTH PLAIN/LOGIN."""
    return make_aiosmtpd(implicit_tls=True)


@pytest.fixture
def aiosmtpd_lmtp(make_aiosmtpd: AiosmtpdFactory) -> AiosmtpdServer:
    """aiosmtpd LMTP on 127.0.0.1 with per-recipient replies scripted by local part."""
    return make_aiosmtpd(lmtp=True, starttls=False, auth=False)


@pytest.fixture
def aiosmtpd_lmtp_unix(
    make_aiosmtpd: AiosmtpdFactory,
) -> Iterator[AiosmtpdServer]:
    """aiosmtpd LMTP on a unix socket (``.unix_socket``), replies scripted as for TCP."""
    # A short directory of our own: unix socket paths are limited to ~107 bytes.
    with tempfile.TemporaryDirectory(prefix="mrlmtp-") as directory:
        server = make_aiosmtpd(
            lmtp=True, starttls=False, auth=False, unix_socket=Path(directory) / "lmtp.sock"
        )
        yield server
        server.stop()
