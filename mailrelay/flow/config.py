"""What a session needs to know: :class:`SessionConfig`.

Rules: validated at construction (host names usable in EHLO and SNI; a user name only with a
password); the password never appears in ``repr``.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from mailrelay.errors import (
    ConfigurationError,
)
from mailrelay.options import TLS


def _check_hostname(instance: SessionConfig, attribute: attrs.Attribute[str], value: str) -> None:
    if not value or any(c in value for c in " \t\r\n\0<>"):
        raise ConfigurationError(f"{attribute.name} is not a usable host name: {value!r}")


def _check_credentials(
    instance: SessionConfig, attribute: attrs.Attribute[str | None], value: str | None
) -> None:
    if (instance.username is None) != (value is None):
        raise ConfigurationError("give both a user name and a password (or token), or neither")


def _mechanism_tuple(value: Iterable[str] | None) -> tuple[str, ...] | None:
    """``auth_mechanisms`` as a tuple (typed, unlike ``attrs.converters.optional(tuple)``,
    so that mypy accepts any iterable of names)."""
    return None if value is None else tuple(value)


@attrs.define(kw_only=True)
class ServerNotes:
    """What sessions to one server have learnt that the next ones may use: a transport
    gives the same notes to every session it opens to that server (thread-safe enough:
    each attribute is a flag that only ever goes one way).

    Attributes:
        ehlo_after_auth: whether an EHLO after AUTH is still worth sending (see
            :class:`Session`): it turns ``False`` once one was refused, ended the session,
            or brought nothing the EHLO before login had not offered (so later sessions
            spare the round trip, and the server that mishandles it the risk).
    """

    ehlo_after_auth: bool = True


@attrs.frozen(kw_only=True)
class SessionConfig:
    """What a :class:`Session` needs to know; the transport builds it.

    Attributes:
        local_hostname: our name for EHLO/HELO/LHLO. An IP address is sent as an address
            literal.
        server_hostname: the server's name, for TLS (SNI and certificate checks).
        tls: the TLS policy.
        username: the user name to authenticate as; ``None`` means no AUTH.
        password: the password (or, for XOAUTH2 and OAUTHBEARER, the access token). Never
            shown by ``repr``.
        password_renewable: the password came from a provider that can give a fresh one
            (an OAuth 2.0 token): a refused AUTH (535, or a transient 4xx) does not end
            :meth:`Session.open <mailrelay.flow.Session.open>`; it is kept in
            ``Session.auth_refusal`` for the transport to call
            ``Session.retry_authentication`` once with a renewed password.
        auth_mechanisms: the SASL mechanisms to use, in order; ``None`` means the strongest
            both sides support (XOAUTH2 only when named here).
        allow_insecure_auth: allow AUTH over an unencrypted connection.
        pipelining: use PIPELINING when the server offers it (turn off for broken servers).
        chunking: use BDAT when the server offers CHUNKING.
        lmtp: speak LMTP (LHLO, one final reply per recipient).
        peer: ``host:port`` of the server, recorded in the results.
        notes: what earlier sessions to this server learnt (:class:`ServerNotes`), shared
            and updated; ``None``: every session starts from nothing.
    """

    local_hostname: str = attrs.field(validator=_check_hostname)
    server_hostname: str = attrs.field(validator=_check_hostname)
    tls: TLS = attrs.field(default=TLS.STARTTLS, validator=attrs.validators.instance_of(TLS))
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False, validator=_check_credentials)
    password_renewable: bool = False
    auth_mechanisms: tuple[str, ...] | None = attrs.field(default=None, converter=_mechanism_tuple)
    allow_insecure_auth: bool = False
    pipelining: bool = True
    chunking: bool = False
    lmtp: bool = False
    peer: str | None = None
    notes: ServerNotes | None = attrs.field(default=None, eq=False, repr=False)
