"""What an SMTP or LMTP transport needs to open and reuse a connection, checked once.

Rules of this module:

* :class:`ConnectionSettings` is built by the transports' constructors, so every mistake
  (a port out of range, ``TLS.IMPLICIT`` with a unix socket, a password without a user)
  is a :class:`~mailrelay.errors.ConfigurationError` at construction, not at the first send.
* The password is never shown: not in ``repr``, not in any message built here.
* The password may be a *provider*: a callable returning the secret (an OAuth 2.0 access
  token), and for the async transports also a coroutine function. It is called each time a
  new connection authenticates (:meth:`ConnectionSettings.secret`,
  :meth:`ConnectionSettings.asecret`), never at construction, so that a pool reconnecting
  hours later gets a current token; once more when the server refuses the token
  (:meth:`ConnectionSettings.renew`, :meth:`ConnectionSettings.arenew`). What it returns must
  be a non-empty ``str`` without CR, LF or NUL (a permanent
  :class:`~mailrelay.errors.AuthenticationError` otherwise: a bug, retrying will not help).
  A provider that raises is a *transient* ``AuthenticationError`` chained to the original
  (an identity provider out of reach is a temporary problem), unless it raised a
  :class:`~mailrelay.errors.DeliveryError` of its own, whose ``is_transient`` is kept. No
  message shows the secret or the provider's repr.
* A proxy (:class:`~mailrelay.transport.proxy.Proxy`, or its URL) carries TCP connections
  only; its password is never shown either (``describe`` shows the proxy's URL without it).
* An internationalized host (and ``server_hostname``) is kept as its A-labels (IDNA 2008,
  UTS #46): what is resolved, sent as the TLS server name and checked against the
  certificate, never the stdlib's IDNA 2003 form (``straße`` is not ``strasse``).
* Certificate verification is on by default: without ``ssl_context`` the transports use
  :func:`ssl.create_default_context` (the system's trusted CAs, host name checking).
"""

from __future__ import annotations

import inspect
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeAlias

import attrs
import idna

from mailrelay.errors import AuthenticationError, ConfigurationError, DeliveryError
from mailrelay.flow import ServerNotes, SessionConfig
from mailrelay.options import TLS, Timeouts
from mailrelay.transport.driver_common import check_source_address
from mailrelay.transport.errors_map import peer_name
from mailrelay.transport.proxy import Proxy, as_proxy

__all__ = [
    "AsyncPasswordProvider",
    "ConnectionSettings",
    "PasswordProvider",
    "PoolSettings",
    "is_async_provider",
]

log = logging.getLogger(__name__)

PasswordProvider: TypeAlias = Callable[[], str]
"""A callable returning the password (an OAuth 2.0 access token), called for each new
connection that authenticates; for :class:`~mailrelay.transport.smtp.SMTPTransport` and
:class:`~mailrelay.transport.smtp.LMTPTransport`."""

AsyncPasswordProvider: TypeAlias = Callable[[], Awaitable[str]] | Callable[[], str]
"""A coroutine function (or a plain callable) returning the password, for
:class:`~mailrelay.transport.async_smtp.AsyncSMTPTransport` and
:class:`~mailrelay.transport.async_smtp.AsyncLMTPTransport`."""


def is_async_provider(provider: object) -> bool:
    """Whether ``provider`` is a coroutine function (or an object with an ``async
    __call__``): usable by the async transports only."""
    return inspect.iscoroutinefunction(provider) or inspect.iscoroutinefunction(
        getattr(provider, "__call__", None)  # noqa: B004 -- the method itself, not callable()
    )


def _checked_secret(value: object, refusal: AuthenticationError | None, host: str) -> str:
    """What a provider returned, if usable as a password; never shows the value. On renewal
    (``refusal``: the server's refusal that led to it) the error tells the refusal too."""
    if isinstance(value, str) and value and not any(c in value for c in "\r\n\0"):
        return value
    if not isinstance(value, str):
        what = f"the password provider returned {type(value).__name__}, not str"
    else:
        what = "the password provider returned an empty secret or one holding CR, LF or NUL"
    if refusal is not None:
        what = f"{refusal}; asked for a fresh token, {what}"
    raise AuthenticationError(
        what,
        is_transient=False,
        reply=refusal.reply if refusal is not None else None,
        host=host,
    )


def _provider_failed(
    exc: Exception, refusal: AuthenticationError | None, host: str
) -> AuthenticationError:
    """The error for a provider that raised: transient unless it said otherwise."""
    transient = exc.is_transient if isinstance(exc, DeliveryError) else True
    # The original's text is the caller's own code speaking (a token provider knows better
    # than to put a token in its messages); it is cut short and kept printable, and the
    # original stays chained (``from``) for the whole story.
    text = "".join(c for c in str(exc) if c.isprintable())[:200]
    what = f"the password provider failed: {type(exc).__name__}" + (f": {text}" if text else "")
    if refusal is not None:
        what = f"{refusal}; asked for a fresh token, {what}"
    return AuthenticationError(
        what,
        is_transient=transient,
        reply=refusal.reply if refusal is not None else None,
        host=host,
    )


def _positive(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ConfigurationError(f"{attribute.name} must be positive, not {value!r}")


@attrs.frozen(kw_only=True)
class PoolSettings:
    """How a transport keeps and reuses connections.

    Attributes:
        size: the most connections open at once (sync: threads beyond it wait; async: tasks
            wait, and ``asend_many`` spreads its work over this many connections).
        max_messages: messages sent over one connection before it is closed and replaced.
        idle_timeout: seconds an idle connection is kept; an older one is closed, not reused
            (servers drop idle clients, RFC 5321 §4.5.3.2.7 allows 5 minutes).
        health_check_after: an idle connection older than this many seconds is checked with
            NOOP before it is reused.
    """

    size: int = attrs.field(default=4, validator=_positive)
    max_messages: int = attrs.field(default=100, validator=_positive)
    idle_timeout: float = attrs.field(default=30.0, validator=_positive)
    health_check_after: float = attrs.field(default=5.0, validator=_positive)


def _ascii_host(value: str | None) -> str | None:
    """An internationalized host name as its A-labels (IDNA 2008 with UTS #46 mapping), the
    form the DNS, the TLS server name and a certificate's names use. Left to itself the
    stdlib encodes with IDNA 2003, which maps ``straße.example`` to a different domain,
    ``strasse.example``, for the connection and the certificate check alike."""
    if not isinstance(value, str) or value.isascii():
        return value
    try:
        return idna.encode(value, uts46=True).decode("ascii")
    except idna.IDNAError as exc:
        raise ConfigurationError(f"not a usable host name: {value!r} ({exc})") from None


@attrs.frozen(kw_only=True, repr=False)
class ConnectionSettings:
    """Where and how to connect; see :class:`~mailrelay.transport.smtp.SMTPTransport`."""

    host: str | None = attrs.field(converter=_ascii_host)
    port: int | None
    unix_path: str | None = None
    tls: TLS
    ssl_context: ssl.SSLContext | None = None
    timeouts: Timeouts
    local_hostname: str | None = None
    server_hostname: str | None = attrs.field(default=None, converter=_ascii_host)
    source_address: str | None = attrs.field(default=None, converter=check_source_address)
    proxy: Proxy | None = attrs.field(default=None, converter=as_proxy)
    username: str | None = None
    password: str | AsyncPasswordProvider | None = None
    auth_mechanisms: tuple[str, ...] | None = None
    allow_insecure_auth: bool = False
    pipelining: bool = True
    chunking: bool = False
    lmtp: bool = False

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.tls, TLS):
            raise ConfigurationError(
                f"tls must be a TLS policy (TLS.STARTTLS, ...), not {self.tls!r}"
            )
        if not isinstance(self.timeouts, Timeouts):
            raise ConfigurationError("timeouts must be a Timeouts value (Timeouts.all(10), ...)")
        if self.unix_path is None:
            if self.host is None:
                raise ConfigurationError("give the server's host (or path= for a unix socket)")
            if not self.host or any(c in self.host for c in " \t\r\n\0/"):
                raise ConfigurationError(f"not a usable host: {self.host!r}")
            if self.port is None or isinstance(self.port, bool) or not 0 < self.port < 65536:
                raise ConfigurationError(
                    f"port must be a number from 1 to 65535, not {self.port!r}"
                )
        elif self.host is not None:
            raise ConfigurationError("give a host or a unix socket path, not both")
        elif not self.unix_path or "\0" in self.unix_path:
            raise ConfigurationError(f"not a usable socket path: {self.unix_path!r}")
        elif self.tls is TLS.IMPLICIT:
            raise ConfigurationError("implicit TLS over a unix socket makes no sense")
        elif self.source_address is not None:
            raise ConfigurationError("a unix socket has no source address")
        elif self.proxy is not None:
            raise ConfigurationError("a unix socket cannot be reached through a proxy")
        if (self.username is None) != (self.password is None):
            raise ConfigurationError("give both a user name and a password (or token), or neither")
        if self.password is not None and not (
            isinstance(self.password, str) or callable(self.password)
        ):
            raise ConfigurationError(
                "password must be a str or a callable returning one (a token provider), "
                f"not {type(self.password).__name__}"
            )
        if self.ssl_context is not None and not isinstance(self.ssl_context, ssl.SSLContext):
            raise ConfigurationError("ssl_context must be an ssl.SSLContext")
        # The classic mistakes, said early (RFC 8314 §3.3: 465 speaks TLS from the first
        # byte; 587 and 25 greet in plain text). A warning, not an error: ports are only
        # conventions, and the drivers give a precise error if the guess is right.
        if self.port == 465 and self.tls is not TLS.IMPLICIT:
            log.warning(
                "port 465 normally expects implicit TLS; tls=%s may hang until the "
                "greeting timeout: consider TLS.IMPLICIT",
                self.tls.name,
            )
        elif self.port in (25, 587) and self.tls is TLS.IMPLICIT:
            log.warning(
                "port %d normally speaks plain text first (then STARTTLS); "
                "TLS.IMPLICIT will fail: consider TLS.STARTTLS",
                self.port,
            )

    @property
    def peer(self) -> str:
        """``host:port``, or the socket path."""
        if self.unix_path is not None:
            return self.unix_path
        assert self.host is not None
        return peer_name(self.host, self.port)

    def context(self) -> ssl.SSLContext:
        """The TLS context: the caller's, or a verifying default one."""
        return self.ssl_context if self.ssl_context is not None else _default_context()

    @property
    def renewable(self) -> bool:
        """Whether the password is a provider (asked again when the server refuses it)."""
        return self.password is not None and not isinstance(self.password, str)

    def secret(self) -> str | None:
        """The password for a new connection: the string, or what the provider returns now.

        Raises:
            AuthenticationError: the provider raised (transient unless it said otherwise),
                returned an awaitable (use the async transports), or something unusable.
        """
        return self._call_provider(None)

    async def asecret(self) -> str | None:
        """:meth:`secret` for the async transports: a coroutine provider is awaited."""
        return await self._acall_provider(None)

    def renew(self, refusal: AuthenticationError) -> str | None:
        """Ask the provider again after the server refused its secret (``refusal``).

        Raises:
            AuthenticationError: as :meth:`secret`; the message also tells the refusal.
        """
        return self._call_provider(refusal)

    async def arenew(self, refusal: AuthenticationError) -> str | None:
        """:meth:`renew` for the async transports."""
        return await self._acall_provider(refusal)

    def _call_provider(self, refusal: AuthenticationError | None) -> str | None:
        provider = self.password
        if provider is None or isinstance(provider, str):
            return provider
        try:
            value: object = provider()
        except Exception as exc:
            raise _provider_failed(exc, refusal, self.peer) from exc
        if inspect.isawaitable(value):
            if inspect.iscoroutine(value):
                value.close()  # never awaited: close it so that no warning follows
            raise AuthenticationError(
                "the password provider returned an awaitable: use an async transport",
                is_transient=False,
                host=self.peer,
            )
        return _checked_secret(value, refusal, self.peer)

    async def _acall_provider(self, refusal: AuthenticationError | None) -> str | None:
        provider = self.password
        if provider is None or isinstance(provider, str):
            return provider
        try:
            value: object = provider()
            if inspect.isawaitable(value):
                value = await value
        except Exception as exc:
            raise _provider_failed(exc, refusal, self.peer) from exc
        return _checked_secret(value, refusal, self.peer)

    def session_config(
        self,
        local_address: str | None,
        *,
        secret: str | None = None,
        notes: ServerNotes | None = None,
    ) -> SessionConfig:
        """The dialogue's configuration for a connection whose local end is ``local_address``.

        Without an explicit ``local_hostname`` we announce our address as a literal
        (``[192.0.2.1]``, RFC 5321 §4.1.3): always true, and needs no DNS lookup.

        Args:
            local_address: our end's address, or ``None``.
            secret: the password for this connection (:meth:`secret`); needed when the
                password is a provider, ignored otherwise.
            notes: what the transport's earlier sessions to this server learnt.
        """
        password = self.password if isinstance(self.password, str) else secret
        return SessionConfig(
            local_hostname=self.local_hostname or local_address or "localhost",
            server_hostname=self.server_hostname or self.host or "localhost",
            tls=self.tls,
            username=self.username,
            password=password,
            password_renewable=self.renewable,
            auth_mechanisms=self.auth_mechanisms,
            allow_insecure_auth=self.allow_insecure_auth,
            pipelining=self.pipelining,
            chunking=self.chunking,
            lmtp=self.lmtp,
            peer=self.peer,
            notes=notes,
        )

    def __repr__(self) -> str:
        return f"ConnectionSettings({self.describe()})"

    def describe(self) -> str:
        """A one-line description without the password, for ``repr``."""
        user = f" user={self.username!r}" if self.username is not None else ""
        via = f" proxy={self.proxy}" if self.proxy is not None else ""
        return f"{self.peer} tls={self.tls.name}{user}{via}"


_DEFAULT_CONTEXT: ssl.SSLContext | None = None


def _default_context() -> ssl.SSLContext:
    # Loading the system CAs takes milliseconds; do it once per process.
    global _DEFAULT_CONTEXT  # noqa: PLW0603 -- a lazily built, read-only default
    if _DEFAULT_CONTEXT is None:
        _DEFAULT_CONTEXT = ssl.create_default_context()
    return _DEFAULT_CONTEXT


def mechanisms(value: Sequence[str] | None) -> tuple[str, ...] | None:
    """Normalise an ``auth_mechanisms`` argument (a single string is one mechanism)."""
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    return tuple(value)
