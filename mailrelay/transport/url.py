"""Transports named by URL: ``transport_from_url("smtp://user:pass@host:587?tls=starttls")``.

Rules of this module:

* Schemes: ``smtp://`` (default port 587, ``TLS.STARTTLS``), ``smtps://`` (implicit TLS,
  default port 465, RFC 8314 §3.3), ``lmtp://host[:port]`` (default port 24, RFC 2033 §5),
  ``lmtp:///path/to/socket`` and ``smtp:///path/to/socket`` (a unix socket), ``mx://``
  (straight to each recipient domain's mail exchangers: ``MXTransport``), ``memory://``,
  ``file:///path`` (``?format=maildir`` for a Maildir) and ``sendmail://`` (the local MTA's
  ``/usr/sbin/sendmail``; ``sendmail:///path/to/program`` for another one, ``?config=DIR``
  for its ``-C DIR``: :class:`~mailrelay.transport.sendmail.SendmailTransport`).
  :func:`async_transport_from_url` builds the asyncio twins.
* Query parameters: ``tls`` (``none``, ``opportunistic``, ``starttls``, ``implicit``),
  ``timeout`` (seconds, every phase: :meth:`Timeouts.all <mailrelay.options.Timeouts.all>`),
  ``local_hostname``, ``source_address`` (the local IP address to connect from), ``auth``
  (``smtp://``, ``smtps://``, ``lmtp://``: the SASL mechanisms to use, comma-separated, e.g.
  ``?auth=xoauth2`` or ``?auth=oauthbearer``; the only way to pick XOAUTH2 or OAUTHBEARER,
  which are never chosen unnamed), ``port`` (``mx://`` only, where the URL has no host),
  ``tls_policy`` (``mx://`` only: ``dane``, ``mta-sts``, or both comma-separated, for
  :class:`~mailrelay.transport.dane.DANE` and :class:`~mailrelay.transport.mtasts.MTASTS`
  hooks sharing the transport's resolver; with both, DANE decides wherever it applies and
  MTA-STS elsewhere, RFC 8461 §2), ``refused_networks`` (``mx://`` only: the exchanger
  addresses never connected to, comma-separated CIDR networks, ``loopback``, ``private``,
  or ``none``; the default refuses loopback), ``proxy`` (``smtp://``, ``smtps://``,
  ``lmtp://`` over TCP, and ``mx://``: an outbound proxy's URL, percent-encoded, e.g.
  ``?proxy=socks5h%3A%2F%2Fuser%3Apass%40127.0.0.1%3A1080``; see
  :class:`~mailrelay.transport.proxy.Proxy`), ``format`` (``file://`` only). An unknown, repeated or
  misplaced parameter is a :class:`~mailrelay.errors.ConfigurationError`, never silently
  ignored.
* User and password are percent-decoded (RFC 3986 §2.1), so ``p%40ss`` is ``p@ss``.
* The password never appears in a repr or an error message: both show the URL with the
  password replaced by ``***`` (:meth:`TransportURL.redacted`), the ``?proxy=`` URL's
  password too. The user name is kept, since
  it tells which account was meant.
* Keyword ``overrides`` go to the transport's constructor and win over the URL
  (``transport_from_url(url, ssl_context=ctx)``); a token provider is given this way:
  ``transport_from_url("smtp://me%40example.com@smtp.example.com?auth=xoauth2",
  password=get_token)``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import attrs

from mailrelay.errors import ConfigurationError
from mailrelay.options import TLS, Timeouts
from mailrelay.protocol.sasl import MECHANISMS
from mailrelay.resolver import AsyncResolver, Resolver
from mailrelay.transport.async_smtp import AsyncLMTPTransport, AsyncSMTPTransport
from mailrelay.transport.base import AsyncTransport, Transport
from mailrelay.transport.dane import DANE, AsyncDANE
from mailrelay.transport.driver_common import check_source_address
from mailrelay.transport.file import FORMATS, FileTransport
from mailrelay.transport.memory import MemoryTransport
from mailrelay.transport.mtasts import MTASTS, AsyncMTASTS
from mailrelay.transport.mx import MXTransport
from mailrelay.transport.mx_async import AsyncMXTransport
from mailrelay.transport.mx_plan import networks_from_text
from mailrelay.transport.proxy import Proxy
from mailrelay.transport.sendmail import SendmailTransport
from mailrelay.transport.smtp import LMTPTransport, SMTPTransport

__all__ = ["TransportURL", "async_transport_from_url", "transport_from_url"]

_DEFAULT_PORTS = {"smtp": 587, "smtps": 465, "lmtp": 24}
_DEFAULT_TLS = {
    "smtp": TLS.STARTTLS,
    "smtps": TLS.IMPLICIT,
    "lmtp": TLS.NONE,
    "mx": TLS.OPPORTUNISTIC,
}
_PARAMETERS = {
    "smtp": {"tls", "timeout", "local_hostname", "source_address", "auth", "proxy"},
    "smtps": {"tls", "timeout", "local_hostname", "source_address", "auth", "proxy"},
    "lmtp": {"tls", "timeout", "local_hostname", "source_address", "auth", "proxy"},
    "mx": {
        "tls",
        "timeout",
        "local_hostname",
        "source_address",
        "port",
        "tls_policy",
        "proxy",
        "refused_networks",
    },
    "memory": set[str](),
    "file": {"format"},
    "sendmail": {"timeout", "config"},
}
SCHEMES = tuple(_PARAMETERS)
#: ``?tls_policy=`` names for ``mx://``.
TLS_POLICIES = ("dane", "mta-sts")


def _redact(url: str) -> str:
    """``url`` with any password replaced by ``***``; safe to show even when unparsable.

    Works on the raw text, so that it also protects URLs too broken to parse (a password
    with an unencoded ``/`` or ``#``): everything between the first ``:`` after the scheme
    and the *last* ``@`` goes. Over-redacting a strange URL is fine; leaking is not.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    userinfo, at, after = rest.rpartition("@")
    if at and ":" in userinfo:
        url = f"{scheme}{sep}{userinfo.split(':', 1)[0]}:***@{after}"
    # ?proxy= holds a URL of its own, percent-encoded, with its own password: shown decoded,
    # redacted the same way (done after the above, whose last "@" it would otherwise be).
    return _PARAMETER.sub(_redact_proxy, url)


# A query parameter: its key and value as written (percent-encoded or not).
_PARAMETER = re.compile(r"([?&])([^=&#]*)=([^&#]*)")


def _redact_proxy(match: re.Match[str]) -> str:
    # The key as the query parser reads it (prox%79 is proxy), and the value decoded until
    # it no longer changes (a URL encoded twice still holds its password): a few rounds
    # suffice, and a value still encoded after them is not shown at all.
    if unquote(match[2]).lower() != "proxy":
        return match[0]
    value = match[3]
    for _ in range(_DECODING_ROUNDS):
        decoded = unquote(value)
        if decoded == value:
            return f"{match[1]}{match[2]}={_redact(value)}"
        value = decoded
    return f"{match[1]}{match[2]}=***"


_DECODING_ROUNDS = 8


@attrs.frozen(kw_only=True, repr=False)
class TransportURL:
    """A parsed transport URL. Its repr hides the password.

    Attributes:
        scheme: one of ``smtp``, ``smtps``, ``lmtp``, ``mx``, ``memory``, ``file``,
            ``sendmail``.
        host: the server, for ``smtps`` and TCP ``smtp`` and ``lmtp``.
        port: the port (the scheme's default when the URL names none).
        username: the percent-decoded user name, or ``None``.
        password: the percent-decoded password, or ``None``.
        path: the directory (``file``), unix socket path (``lmtp``, ``smtp``) or program
            (``sendmail``), or ``None``.
        tls: the TLS policy (for network schemes), or ``None``.
        timeouts: every-phase timeouts from ``?timeout=``, or ``None``.
        local_hostname: the name to announce in EHLO, or ``None``.
        source_address: the local IP address to connect from, or ``None``.
        auth_mechanisms: the SASL mechanisms from ``?auth=``, upper case, or ``None``.
        tls_policies: the ``mx://`` TLS policies from ``?tls_policy=`` (``dane``,
            ``mta-sts``), or ``None``.
        proxy: the outbound proxy from ``?proxy=`` (``smtp``, ``smtps``, ``lmtp`` over TCP,
            and ``mx``), or ``None``.
        refused_networks: the ``mx://`` exchanger networks never connected to, from
            ``?refused_networks=``, or ``None`` (the transport's default: loopback).
        format: ``eml`` or ``maildir`` (``file`` only).
        config: the ``sendmail`` program's configuration (its ``-C`` argument), or ``None``.
    """

    scheme: str
    host: str | None = None
    port: int | None = None
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    path: str | None = None
    tls: TLS | None = None
    timeouts: Timeouts | None = None
    local_hostname: str | None = None
    source_address: str | None = None
    auth_mechanisms: tuple[str, ...] | None = None
    tls_policies: tuple[str, ...] | None = None
    proxy: Proxy | None = None
    refused_networks: tuple[str, ...] | None = None
    format: str | None = None
    config: str | None = None

    def redacted(self) -> str:
        """The URL with the password shown as ``***`` (safe for logs and messages)."""
        userinfo = ""
        if self.username is not None:
            userinfo = quote(self.username, safe="")
            if self.password is not None:
                userinfo += ":***"
            userinfo += "@"
        host = self.host or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{self.port}" if self.port is not None and self.host else ""
        path = quote(self.path or "")
        return f"{self.scheme}://{userinfo}{host}{port}{path}"

    def __repr__(self) -> str:
        return f"TransportURL({self.redacted()!r})"

    @classmethod
    def parse(cls, url: str) -> TransportURL:
        """Parse a transport URL.

        Raises:
            ConfigurationError: for an unknown scheme, a bad port, a missing host or path,
                an unknown or repeated parameter, or a parameter value that makes no sense.
        """
        shown = _redact(url)
        try:
            parts = urlsplit(url.strip())
            port = parts.port
            if port == 0:
                raise ValueError("port 0")
        except ValueError:
            # urllib's messages may quote the netloc, password included: say it ourselves,
            # and do not chain its error (a logged traceback would show it).
            raise ConfigurationError(f"not a valid transport URL: {shown}") from None
        scheme = parts.scheme.lower()
        if scheme not in _PARAMETERS:
            raise ConfigurationError(
                f"unknown transport URL scheme {parts.scheme!r} in {shown} "
                f"(expected one of: {', '.join(SCHEMES)})"
            )
        if parts.fragment:
            raise ConfigurationError(f"a transport URL has no #fragment: {shown}")

        try:
            pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
        except ValueError:
            raise ConfigurationError(f"malformed query in transport URL {shown}") from None
        params: dict[str, str] = {}
        for key, value in pairs:
            name = key.lower()
            if name not in _PARAMETERS[scheme]:
                allowed = ", ".join(sorted(_PARAMETERS[scheme])) or "none"
                raise ConfigurationError(
                    f"unknown parameter {key!r} for {scheme}:// in {shown} (allowed: {allowed})"
                )
            if name in params:
                raise ConfigurationError(f"parameter {key!r} given twice in {shown}")
            params[name] = value

        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password is not None else None
        if password is not None and username is None:
            raise ConfigurationError(f"a password without a user name in {shown}")
        host = parts.hostname or None
        path = unquote(parts.path) or None

        if scheme in {"memory", "file", "mx", "sendmail"} and username is not None:
            raise ConfigurationError(f"{scheme}:// takes no user name or password: {shown}")

        fields: dict[str, Any] = {"scheme": scheme, "username": username, "password": password}
        if scheme == "memory":
            if host or port or path not in {None, "/"}:
                raise ConfigurationError(f"memory:// takes no host or path: {shown}")
        elif scheme == "file":
            if host not in {None, "localhost"} or port is not None:
                raise ConfigurationError(
                    f"file:// names a local directory: use file:///path (got {shown})"
                )
            if path is None:
                raise ConfigurationError(f"file:// needs a directory path: {shown}")
            fields["path"] = path
            fields["format"] = params.get("format", "eml")
            if fields["format"] not in FORMATS:
                raise ConfigurationError(
                    f"unknown file format {fields['format']!r} in {shown} (expected eml or maildir)"
                )
        elif scheme == "sendmail":
            if host not in {None, "localhost"} or port is not None:
                raise ConfigurationError(
                    "sendmail:// runs a local program: use sendmail:// or "
                    f"sendmail:///path/to/sendmail (got {shown})"
                )
            fields["path"] = None if path in {None, "/"} else path
            if "config" in params:
                if not params["config"] or "\0" in params["config"]:
                    raise ConfigurationError(
                        f"config must name the program's configuration: {shown}"
                    )
                fields["config"] = params["config"]
        elif scheme == "mx":
            if host or port is not None or path not in {None, "/"}:
                raise ConfigurationError(
                    f"mx:// finds its servers in DNS and takes no host or path "
                    f"(use ?port= to change the port): {shown}"
                )
            if "port" in params:
                fields["port"] = _port(params["port"], shown)
            if "tls_policy" in params:
                fields["tls_policies"] = _tls_policies(params["tls_policy"], shown)
            if "refused_networks" in params:
                fields["refused_networks"] = _refused(params["refused_networks"], shown)
        elif scheme in {"lmtp", "smtp"} and host is None:
            if path is None or path == "/":
                raise ConfigurationError(
                    f"{scheme}:// needs a host ({scheme}://host:{_DEFAULT_PORTS[scheme]}) "
                    f"or a socket path ({scheme}:///path): {shown}"
                )
            if port is not None:
                raise ConfigurationError(f"a unix-socket {scheme}:// URL has no port: {shown}")
            if "source_address" in params:
                raise ConfigurationError(f"a unix socket has no source address: {shown}")
            if "proxy" in params:
                raise ConfigurationError(
                    f"a unix socket cannot be reached through a proxy: {shown}"
                )
            fields["path"] = path
        else:
            if host is None:
                raise ConfigurationError(f"{scheme}:// needs a host: {shown}")
            if path not in {None, "/"}:
                raise ConfigurationError(f"{scheme}:// takes no path: {shown}")
            fields["host"] = host
            fields["port"] = port if port is not None else _DEFAULT_PORTS[scheme]

        if scheme in _DEFAULT_TLS:
            fields["tls"] = _tls(scheme, params.get("tls"), shown)
        if "timeout" in params:
            fields["timeouts"] = _timeouts(params["timeout"], shown)
        if "local_hostname" in params:
            if not params["local_hostname"]:
                raise ConfigurationError(f"empty local_hostname in {shown}")
            fields["local_hostname"] = params["local_hostname"]
        if "source_address" in params:
            try:
                fields["source_address"] = check_source_address(params["source_address"])
            except ConfigurationError as exc:
                raise ConfigurationError(f"{exc}: {shown}") from None
        if "auth" in params:
            fields["auth_mechanisms"] = _mechanisms(params["auth"], shown)
        if "proxy" in params:
            try:
                # parse_qsl has percent-decoded the value once: the proxy URL itself.
                fields["proxy"] = Proxy.parse(params["proxy"])
            except ConfigurationError as exc:
                raise ConfigurationError(f"{exc}: {shown}") from None
        return cls(**fields)


def _refused(text: str, shown: str) -> tuple[str, ...]:
    """``?refused_networks=`` (:func:`~mailrelay.transport.mx_plan.networks_from_text`)."""
    try:
        return networks_from_text(text)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{exc}: {shown}") from None


def _port(text: str, shown: str) -> int:
    # ASCII digits, few enough for int(): str.isdigit alone also takes "²" (int() refuses).
    if not (text.isascii() and text.isdigit() and len(text) <= 5) or not 0 < int(text) < 65536:
        raise ConfigurationError(f"port must be a number from 1 to 65535 in {shown}")
    return int(text)


def _tls(scheme: str, text: str | None, shown: str) -> TLS:
    if text is None:
        return _DEFAULT_TLS[scheme]
    try:
        policy = TLS.parse(text)
    except ValueError as exc:
        raise ConfigurationError(f"{exc} in {shown}") from None
    if scheme == "smtps" and policy is not TLS.IMPLICIT:
        raise ConfigurationError(
            f"smtps:// means implicit TLS; use smtp://...?tls={policy.value} instead: {shown}"
        )
    return policy


def _mechanisms(text: str, shown: str) -> tuple[str, ...]:
    names = tuple(name.strip().upper() for name in text.split(","))
    unknown = [name for name in names if name not in MECHANISMS]
    if not text or unknown:
        raise ConfigurationError(
            f"auth must name SASL mechanisms ({', '.join(MECHANISMS)}), comma-separated, in {shown}"
        )
    return names


def _timeouts(text: str, shown: str) -> Timeouts:
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigurationError(f"timeout must be a positive number of seconds in {shown}")
    return Timeouts.all(seconds)


Factory = Callable[[TransportURL, Mapping[str, Any], bool], Transport | AsyncTransport]


def _memory(parsed: TransportURL, overrides: Mapping[str, Any], asynchronous: bool) -> Any:
    return MemoryTransport(**overrides)


def _file(parsed: TransportURL, overrides: Mapping[str, Any], asynchronous: bool) -> Any:
    assert parsed.path is not None
    kwargs: dict[str, Any] = {"path": parsed.path, "format": parsed.format}
    kwargs.update(overrides)
    return FileTransport(**kwargs)


def _tls_policies(text: str, shown: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(part.strip().lower() for part in text.split(",")))
    if not names or not all(names) or set(names) - set(TLS_POLICIES):
        raise ConfigurationError(
            f"tls_policy must name dane, mta-sts or both (comma-separated), not {text!r}: {shown}"
        )
    return names


def _network_arguments(parsed: TransportURL) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"tls": parsed.tls}
    if parsed.username is not None:
        kwargs["username"] = parsed.username
        kwargs["password"] = parsed.password
    if parsed.timeouts is not None:
        kwargs["timeouts"] = parsed.timeouts
    if parsed.local_hostname is not None:
        kwargs["local_hostname"] = parsed.local_hostname
    if parsed.source_address is not None:
        kwargs["source_address"] = parsed.source_address
    if parsed.auth_mechanisms is not None:
        kwargs["auth_mechanisms"] = parsed.auth_mechanisms
    if parsed.proxy is not None:
        kwargs["proxy"] = parsed.proxy
    return kwargs


def _sendmail(parsed: TransportURL, overrides: Mapping[str, Any], asynchronous: bool) -> Any:
    kwargs: dict[str, Any] = {}
    if parsed.path is not None:
        kwargs["command"] = parsed.path
    if parsed.config is not None:
        kwargs["arguments"] = ["-C", parsed.config]
    if parsed.timeouts is not None:
        kwargs["timeout"] = parsed.timeouts.connect  # ?timeout= set every phase alike
    kwargs.update(overrides)
    return SendmailTransport(**kwargs)


def _smtp(parsed: TransportURL, overrides: Mapping[str, Any], asynchronous: bool) -> Any:
    kwargs = _network_arguments(parsed)
    if parsed.path is not None:
        kwargs["path"] = parsed.path
    else:
        kwargs.update(host=parsed.host, port=parsed.port)
    kwargs.update(overrides)
    return AsyncSMTPTransport(**kwargs) if asynchronous else SMTPTransport(**kwargs)


def _lmtp(parsed: TransportURL, overrides: Mapping[str, Any], asynchronous: bool) -> Any:
    kwargs = _network_arguments(parsed)
    if parsed.path is not None:
        kwargs["path"] = parsed.path
    else:
        kwargs.update(host=parsed.host, port=parsed.port)
    kwargs.update(overrides)
    return AsyncLMTPTransport(**kwargs) if asynchronous else LMTPTransport(**kwargs)


def _mx(parsed: TransportURL, overrides: Mapping[str, Any], asynchronous: bool) -> Any:
    kwargs = _network_arguments(parsed)
    if parsed.port is not None:
        kwargs["port"] = parsed.port
    if parsed.refused_networks is not None:
        kwargs["refused_networks"] = parsed.refused_networks
    kwargs.update(overrides)
    if parsed.tls_policies and "tls_policy" not in overrides:
        # The hooks share the transport's resolver (and so its cache and its DNSSEC view).
        if asynchronous:
            aresolver = kwargs.get("resolver") or AsyncResolver()
            kwargs["resolver"] = aresolver
            kwargs["tls_policy"] = _async_policy_hook(parsed.tls_policies, aresolver)
        else:
            resolver = kwargs.get("resolver") or Resolver()
            kwargs["resolver"] = resolver
            kwargs["tls_policy"] = _policy_hook(parsed.tls_policies, resolver)
    return AsyncMXTransport(**kwargs) if asynchronous else MXTransport(**kwargs)


def _policy_hook(names: tuple[str, ...], resolver: Resolver) -> DANE | MTASTS:
    """The ``tls_policy`` hook for ``?tls_policy=`` (DANE first: RFC 8461 §2)."""
    mta_sts = MTASTS(resolver) if "mta-sts" in names else None
    if "dane" in names:
        return DANE(resolver, fallback=mta_sts)
    assert mta_sts is not None
    return mta_sts


def _async_policy_hook(names: tuple[str, ...], resolver: AsyncResolver) -> AsyncDANE | AsyncMTASTS:
    """:func:`_policy_hook` for the asyncio transport."""
    mta_sts = AsyncMTASTS(resolver) if "mta-sts" in names else None
    if "dane" in names:
        return AsyncDANE(resolver, fallback=mta_sts)
    assert mta_sts is not None
    return mta_sts


_FACTORIES: dict[str, Factory] = {
    "memory": _memory,
    "file": _file,
    "smtp": _smtp,
    "smtps": _smtp,
    "lmtp": _lmtp,
    "mx": _mx,
    "sendmail": _sendmail,
}


def _build(url: str | os.PathLike[str], overrides: Mapping[str, Any], asynchronous: bool) -> Any:
    parsed = TransportURL.parse(os.fspath(url))
    try:
        return _FACTORIES[parsed.scheme](parsed, overrides, asynchronous)
    except TypeError as exc:
        # An unknown keyword override: say which transport refused it, without the password.
        raise ConfigurationError(
            f"{parsed.scheme}:// transport does not accept these arguments "
            f"({', '.join(sorted(overrides))}): {parsed.redacted()}"
        ) from exc


def transport_from_url(url: str | os.PathLike[str], **overrides: Any) -> Transport:
    """Build the (blocking) transport a URL names (see the module docstring for the schemes).

    Args:
        url: for example ``"smtp://user:p%40ss@smtp.example.com:587?tls=starttls"``.
        **overrides: constructor arguments that win over what the URL says
            (``ssl_context=...``, ``handler=...`` for ``memory://``).

    Raises:
        ConfigurationError: when the URL is malformed or names a transport that cannot be
            built. The message never contains the password.
    """
    transport: Transport = _build(url, overrides, asynchronous=False)
    return transport


def async_transport_from_url(url: str | os.PathLike[str], **overrides: Any) -> AsyncTransport:
    """Like :func:`transport_from_url`, for asyncio: ``smtp://`` gives an
    ``AsyncSMTPTransport``, ``lmtp://`` an ``AsyncLMTPTransport``; ``memory://`` and
    ``file://`` give the same objects (they implement both interfaces)."""
    transport: AsyncTransport = _build(url, overrides, asynchronous=True)
    return transport
