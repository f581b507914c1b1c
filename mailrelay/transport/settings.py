"""What an SMTP or LMTP transport needs to open and reuse a connection, checked once.

Rules of this module:

* :class:`ConnectionSettings` is built by the transports' constructors, so every mistake
  (a port out of range, ``TLS.IMPLICIT`` with a unix socket, a password without a user)
  is a :class:`~mailrelay.errors.ConfigurationError` at construction, not at the first send.
* The password is never shown: not in ``repr``, not in any message built here.
* Certificate verification is on by default: without ``ssl_context`` the transports use
  :func:`ssl.create_default_context` (the system's trusted CAs, host name checking).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from typing import Any

import attrs

from mailrelay.errors import ConfigurationError
from mailrelay.flow import SessionConfig
from mailrelay.options import TLS, Timeouts
from mailrelay.transport.errors_map import peer_name

__all__ = ["ConnectionSettings", "PoolSettings"]

log = logging.getLogger(__name__)


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


@attrs.frozen(kw_only=True, repr=False)
class ConnectionSettings:
    """Where and how to connect; see :class:`~mailrelay.transport.smtp.SMTPTransport`."""

    host: str | None
    port: int | None
    unix_path: str | None = None
    tls: TLS
    ssl_context: ssl.SSLContext | None = None
    timeouts: Timeouts
    local_hostname: str | None = None
    server_hostname: str | None = None
    username: str | None = None
    password: str | None = None
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
            if not self.host or any(c in self.host for c in " \t\r\n\0/"):
                raise ConfigurationError(f"not a usable host: {self.host!r}")
            if self.port is None or isinstance(self.port, bool) or not 0 < self.port < 65536:
                raise ConfigurationError(
                    f"port must be a number from 1 to 65535, not {self.port!r}"
                )
        elif self.tls is TLS.IMPLICIT:
            raise ConfigurationError("implicit TLS over a unix socket makes no sense")
        if (self.username is None) != (self.password is None):
            raise ConfigurationError("give both a user name and a password (or token), or neither")
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

    def session_config(self, local_address: str | None) -> SessionConfig:
        """The dialogue's configuration for a connection whose local end is ``local_address``.

        Without an explicit ``local_hostname`` we announce our address as a literal
        (``[192.0.2.1]``, RFC 5321 §4.1.3): always true, and needs no DNS lookup.
        """
        return SessionConfig(
            local_hostname=self.local_hostname or local_address or "localhost",
            server_hostname=self.server_hostname or self.host or "localhost",
            tls=self.tls,
            username=self.username,
            password=self.password,
            auth_mechanisms=self.auth_mechanisms,
            allow_insecure_auth=self.allow_insecure_auth,
            pipelining=self.pipelining,
            chunking=self.chunking,
            lmtp=self.lmtp,
            peer=self.peer,
        )

    def __repr__(self) -> str:
        return f"ConnectionSettings({self.describe()})"

    def describe(self) -> str:
        """A one-line description without the password, for ``repr``."""
        user = f" user={self.username!r}" if self.username is not None else ""
        return f"{self.peer} tls={self.tls.name}{user}"


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
