"""Outbound proxies: reaching the SMTP or LMTP server through SOCKS5 or an HTTP CONNECT tunnel.

Theory of operation: a :class:`Proxy` says which proxy to use and how to log in to it;
:class:`ProxyHandshake` is the conversation with the proxy, written once, without I/O, and
run by both drivers (:mod:`mailrelay.transport.sync_driver`,
:mod:`mailrelay.transport.async_driver`) in a short loop::

    handshake = ProxyHandshake(proxy, target_host, target_port)
    while not handshake.done:
        send(handshake.data_to_send())
        handshake.receive_data(recv(handshake.read_limit))   # b"" at end of file

Once it is done, the socket is a tunnel to the target: the SMTP dialogue (and implicit TLS
or STARTTLS, checked against the *target's* name) runs over it unchanged.

Rules of this module:

* Never a byte of the target's: :attr:`ProxyHandshake.read_limit` is the most bytes the
  driver may read without passing the end of the proxy's reply (exact for SOCKS5, whose
  reply lengths are known once its address type is; at most what could still complete the
  blank line for HTTP), so the server's greeting stays in the socket for the dialogue. Bytes
  fed beyond the reply anyway are kept in :attr:`ProxyHandshake.leftover`.
* Bounded: a SOCKS5 reply is at most 262 bytes by construction; an HTTP reply's status line
  and header section at most :data:`MAX_HTTP_REPLY` bytes, or the proxy is refused. The
  drivers bound the whole exchange (connecting to the proxy included) by
  ``Timeouts.connect``.
* Credentials never show: not in ``repr``, not in any message, not in logs.
* Errors are :class:`~mailrelay.errors.ProxyError`, transient when waiting may help (the
  proxy or the target is unreachable, a general failure), permanent when it cannot (the
  proxy refused our credentials or rules out the target, or it does not speak the protocol).
  A failure that is the proxy's whatever the target (it refused our login, will not
  CONNECT, or does not speak its protocol) is marked
  :attr:`~mailrelay.errors.ProxyError.proxy_unusable`, so that MX delivery tries no other
  exchanger through it; one about this target (unreachable, forbidden by its rules) is not.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
from collections.abc import Generator
from typing import Any, Final
from urllib.parse import unquote_to_bytes, urlsplit

import attrs
import idna

from mailrelay.errors import ConfigurationError, ProxyError
from mailrelay.transport.errors_map import peer_name

__all__ = [
    "DEFAULT_PORTS",
    "MAX_HTTP_REPLY",
    "SCHEMES",
    "SOCKS5_REPLIES",
    "Proxy",
    "ProxyHandshake",
    "as_proxy",
]

log = logging.getLogger(__name__)

#: The proxy kinds understood: ``socks5`` (we resolve the target's name and pass an
#: address), ``socks5h`` (the proxy resolves the name), ``http`` (HTTP/1.1 CONNECT).
SCHEMES: Final = frozenset({"socks5", "socks5h", "http"})

#: The port assumed when a proxy URL gives none: 1080 for SOCKS (IANA's ``socks`` port),
#: 80 for ``http`` (the URL scheme's own default, RFC 9110 §4.2.1, as urllib and requests
#: assume; most HTTP proxies listen elsewhere, 3128 or 8080, so give the port).
DEFAULT_PORTS: Final = {"socks5": 1080, "socks5h": 1080, "http": 80}

#: The most bytes of an HTTP proxy's status line and header fields read before it is
#: refused as hostile.
MAX_HTTP_REPLY: Final = 16384

#: RFC 1928 §6: the reply field's meanings, and whether each is worth trying again later.
SOCKS5_REPLIES: Final[dict[int, tuple[str, bool]]] = {
    0x01: ("general SOCKS server failure", True),
    0x02: ("connection not allowed by ruleset", False),
    0x03: ("network unreachable", True),
    0x04: ("host unreachable", True),
    0x05: ("connection refused", True),
    0x06: ("TTL expired", True),
    0x07: ("command not supported", False),
    0x08: ("address type not supported", False),
}

_FORBIDDEN = ("\r", "\n", "\0")
_NEVER_HELPS = "retrying will not help"


def _check_text(name: str, value: str | None) -> None:
    if value is not None and any(c in value for c in _FORBIDDEN):
        raise ConfigurationError(f"the proxy's {name} holds CR, LF or NUL")


def _check_host(instance: Any, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str) or not value or any(c in value for c in " \t\r\n\0/@?#"):
        raise ConfigurationError("not a usable proxy host")
    if not value.isascii() and _ip(value) is None:
        # The lookup (getaddrinfo) encodes a non-ASCII name with the "idna" codec: a name
        # it cannot encode (an empty or over-long label) fails here, typed, not there.
        try:
            value.encode("idna")
        except UnicodeError:
            raise ConfigurationError(
                f"not a usable proxy host: {value!r} is not a valid domain name"
            ) from None


def _check_port(instance: Any, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 65536:
        raise ConfigurationError(f"the proxy port must be a number from 1 to 65535, not {value!r}")


def _check_scheme(instance: Any, attribute: attrs.Attribute[Any], value: object) -> None:
    _known_scheme(value)


def _known_scheme(value: object) -> None:
    if value not in SCHEMES:
        raise ConfigurationError(
            f"unknown proxy scheme {value!r}: use socks5, socks5h or http"
            + (" (TLS to the proxy is not supported)" if value == "https" else "")
        )


@attrs.frozen(kw_only=True)
class Proxy:
    """An outbound proxy the SMTP or LMTP connection goes through.

    Attributes:
        scheme: ``"socks5"`` (RFC 1928; the client resolves the target's name and passes
            its address), ``"socks5h"`` (the proxy resolves the name: the name is passed),
            or ``"http"`` (an HTTP/1.1 ``CONNECT`` tunnel, RFC 9110 §9.3.6).
        host: the proxy's host name or IP address.
        port: the proxy's port.
        username: the user name to log in with (RFC 1929 for SOCKS5, ``Basic`` for HTTP),
            or ``None``.
        password: its password; never shown in ``repr`` or any message.
    """

    scheme: str = attrs.field(validator=_check_scheme)
    host: str = attrs.field(validator=_check_host)
    port: int = attrs.field(validator=_check_port)
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)

    def __attrs_post_init__(self) -> None:
        _check_text("user name", self.username)
        _check_text("password", self.password)
        if (self.username is None) != (self.password is None):
            raise ConfigurationError("give the proxy both a user name and a password, or neither")
        if self.username is None or self.password is None:
            return
        if self.scheme == "http":
            # RFC 7617 §2: the user-id cannot contain a colon (it separates the password).
            if ":" in self.username:
                raise ConfigurationError("an HTTP proxy's user name cannot contain ':'")
            return
        # RFC 1929 §2: ULEN and PLEN are one byte each, and at least 1.
        for name, value in (("user name", self.username), ("password", self.password)):
            if not 0 < len(value.encode("utf-8")) <= 255:
                raise ConfigurationError(
                    f"a SOCKS5 proxy's {name} must be 1 to 255 bytes (RFC 1929)"
                )

    @classmethod
    def parse(cls, url: str) -> Proxy:
        """A proxy from its URL: ``scheme://[user:password@]host[:port]``.

        The user name and password are percent-decoded (``pa%40ss`` is ``pa@ss``); an IPv6
        address goes in brackets (``socks5://[::1]:1080``). Without a port,
        :data:`DEFAULT_PORTS` applies.

        Raises:
            ConfigurationError: an unknown scheme, no host, a bad port, a path, query or
                fragment, or CR, LF or NUL anywhere. The message never shows the password.
        """
        if not isinstance(url, str):
            raise ConfigurationError(f"a proxy URL must be a str, not {type(url).__name__}")
        if any(c in url for c in _FORBIDDEN):
            raise ConfigurationError("a proxy URL cannot hold CR, LF or NUL")
        try:
            parts = urlsplit(url.strip())
            port = parts.port
        except ValueError:
            raise ConfigurationError("not a usable proxy URL (its host or port)") from None
        scheme = parts.scheme.lower()
        _known_scheme(scheme)
        if parts.path not in ("", "/") or parts.query or parts.fragment or "?" in url:
            raise ConfigurationError("a proxy URL has no path, query or fragment")
        host = parts.hostname
        if not host:
            raise ConfigurationError("a proxy URL needs a host")
        username = _decoded(parts.username, "user name")
        password = _decoded(parts.password, "password")
        if username is not None and password is None:
            password = ""  # "user@host": an empty password, refused below for SOCKS5
        return cls(
            scheme=scheme,
            host=host,
            port=port if port is not None else DEFAULT_PORTS[scheme],
            username=username,
            password=password,
        )

    @property
    def peer(self) -> str:
        """``host:port`` of the proxy, for messages."""
        return peer_name(self.host, self.port)

    @property
    def resolves_locally(self) -> bool:
        """Whether we resolve the target's name and pass its addresses (``socks5``)."""
        return self.scheme == "socks5"

    def __str__(self) -> str:
        """The URL without the password (``socks5h://user@127.0.0.1:1080``)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{self.username}@" if self.username is not None else ""
        return f"{self.scheme}://{user}{host}:{self.port}"


def _decoded(text: str | None, name: str) -> str | None:
    if text is None:
        return None
    try:
        value = unquote_to_bytes(text).decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigurationError(f"the proxy's {name} is not UTF-8 once decoded") from None
    _check_text(name, value)
    return value


def as_proxy(value: object) -> Proxy | None:
    """``value`` as a :class:`Proxy`: a ``Proxy``, a proxy URL, or ``None``.

    Raises:
        ConfigurationError: anything else, or a URL :meth:`Proxy.parse` refuses.
    """
    if value is None or isinstance(value, Proxy):
        return value
    if isinstance(value, str):
        return Proxy.parse(value)
    raise ConfigurationError(
        f"proxy must be a Proxy or a proxy URL (socks5h://host:1080), not {type(value).__name__}"
    )


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _unscoped(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """``address`` as text without an IPv6 zone id (``fe80::1%eth0`` is ``fe80::1``): the
    zone names one of *our* interfaces, which means nothing to the proxy (and RFC 6874 §2
    would have it escaped in a URI's authority)."""
    return str(address).partition("%")[0]


#: What a name passed to the proxy may hold, once in ASCII: printable characters, no space
#: (it would end the CONNECT request's target, RFC 9112 §3), no ``:`` (it would read as the
#: port), no brackets (an IPv6 literal's), no ``/`` or ``@`` (URI delimiters).
_NAME_BYTES: Final = frozenset(range(0x21, 0x7F)) - frozenset(b":[]/@")


def _ascii_name(host: str) -> bytes:
    """The target's name as the proxy must get it: ASCII, IDNs as A-labels.

    Raises:
        ConfigurationError: a name that is no usable IDN, or that holds a byte outside
            :data:`_NAME_BYTES` (a control character, a colon, a bracket).
    """
    try:
        name = host.encode("ascii")
    except UnicodeEncodeError:
        try:
            name = idna.encode(host, uts46=True)
        except idna.IDNAError as exc:
            raise ConfigurationError(
                f"the host {host!r} is not a usable domain name: {exc}"
            ) from None
    if not name or not _NAME_BYTES.issuperset(name):
        raise ConfigurationError(f"the host {host!r} is not a usable domain name")
    return name


class ProxyHandshake:
    """The conversation with a proxy that opens a tunnel to ``host:port``, without I/O.

    Call :meth:`data_to_send` and send what it returns; while not :attr:`done`, read at most
    :attr:`read_limit` bytes and pass them to :meth:`receive_data` (``b""`` at end of file).
    Any split of the proxy's reply gives the same outcome.

    Attributes:
        proxy: the proxy.
        host: the target, as passed to the proxy (an IP address, or a name for ``socks5h``
            and ``http``).
        port: the target's port.
        done: the tunnel is open.
        leftover: bytes fed after the end of the proxy's reply (the target's; empty when the
            driver kept to :attr:`read_limit`).
        target_failed: the proxy reached no connection to *this* target address (SOCKS5
            "network or host unreachable", "connection refused", "TTL expired", "address
            type not supported"): another address of the same host may work.
    """

    def __init__(self, proxy: Proxy, host: str, port: int) -> None:
        if not host or any(c in host for c in " \t\r\n\0/@"):
            # It goes into a request line or a length-prefixed field: nothing may break out.
            raise ConfigurationError(f"not a usable target host for a proxy: {host!r}")
        self.proxy = proxy
        self.host = host
        self.port = port
        self.done = False
        self.leftover = b""
        self.target_failed = False
        self._outgoing = bytearray()
        self._buffer = bytearray()
        self._eof = False
        self._need = 0
        self._error: ProxyError | None = None
        self._scanned = 0  # HTTP: how much of the buffer holds no end of header section
        # Built first, so that a target the proxy cannot be asked for fails here, at once.
        self._request = self._http_request() if proxy.scheme == "http" else self._socks5_connect()
        steps = self._http() if proxy.scheme == "http" else self._socks5()
        self._steps: Generator[int, None, None] = steps
        self._advance()

    def __repr__(self) -> str:
        state = "done" if self.done else "failed" if self._error else "open"
        return f"<ProxyHandshake {self.proxy.scheme} {self.proxy.peer} -> {self.target} {state}>"

    @property
    def target(self) -> str:
        """``host:port`` of the target, for messages."""
        return peer_name(self.host, self.port)

    @property
    def read_limit(self) -> int:
        """The most bytes to read now without passing the end of the proxy's reply (0 once
        done or failed)."""
        if self.done or self._error is not None:
            return 0
        return self._need

    def data_to_send(self) -> bytes:
        """The bytes to send to the proxy now (``b""`` when there are none)."""
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data

    def receive_data(self, data: bytes) -> None:
        """Feed what the proxy sent (``b""``: it closed the connection).

        Raises:
            ProxyError: the proxy refused, failed, closed, or sent something malformed;
                every later call raises the same error.
        """
        if self._error is not None:
            raise self._error
        if self.done:
            self.leftover += data
            return
        if data:
            self._buffer += data
        else:
            self._eof = True
        self._advance()

    # -- the steps ---------------------------------------------------------------------------

    def _advance(self) -> None:
        try:
            self._need = next(self._steps)
        except StopIteration:
            self.done = True
            self.leftover = bytes(self._buffer)
            self._buffer.clear()
        except ProxyError as exc:
            self._error = exc
            raise

    def _fail(self, what: str, *, transient: bool, unusable: bool = False) -> ProxyError:
        """The error ``what``; ``unusable``: the proxy fails whatever the target."""
        return ProxyError(
            f"proxy {self.proxy.peer} ({self.proxy.scheme}) for {self.target}: {what}",
            is_transient=transient,
            host=self.target,
            proxy=self.proxy.peer,
            proxy_unusable=unusable,
        )

    def _malformed(self, what: str) -> ProxyError:
        # Not its protocol: no other target will get a better answer from it.
        kind = "an HTTP" if self.proxy.scheme == "http" else "a SOCKS5"
        return self._fail(
            f"{what} (is it {kind} proxy? {_NEVER_HELPS})",
            transient=False,
            unusable=True,
        )

    def _take(self, count: int) -> Generator[int, None, bytes]:
        """Wait for ``count`` bytes and return them."""
        while len(self._buffer) < count:
            if self._eof:
                raise self._fail("the proxy closed the connection in the handshake", transient=True)
            yield count - len(self._buffer)
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data

    def _socks5(self) -> Generator[int, None, None]:
        proxy = self.proxy
        login = proxy.username is not None and proxy.password is not None
        # RFC 1928 §3: version, the methods we offer: 0x00 none, 0x02 user name/password.
        methods = b"\x00\x02" if login else b"\x00"
        self._outgoing += bytes((5, len(methods))) + methods
        version, method = yield from self._take(2)
        if version != 5:
            raise self._malformed(f"the reply's version is {version}, not 5")
        if method == 0xFF:  # RFC 1928 §3: no acceptable methods
            need = "our user name and password" if login else "no authentication"
            raise self._fail(
                f"the proxy accepts none of our methods ({need}): "
                f"check the proxy's credentials, {_NEVER_HELPS}",
                transient=False,
                unusable=True,
            )
        if method == 0x02 and login:
            yield from self._socks5_login()
        elif method != 0x00:
            raise self._malformed(f"the proxy chose method {method:#04x}, which we did not offer")
        self._outgoing += self._request
        # RFC 1928 §6: VER REP RSV ATYP BND.ADDR BND.PORT; REP first, as a failing proxy
        # may close before sending the rest.
        version, reply = yield from self._take(2)
        if version != 5:
            raise self._malformed(f"the reply's version is {version}, not 5")
        if reply != 0:
            meaning, transient = SOCKS5_REPLIES.get(reply, (f"unassigned reply {reply:#04x}", True))
            if reply == 0x08:
                meaning += " (try socks5 instead of socks5h, or the other way round)"
            # 0x03-0x06 say this address could not be reached, 0x08 that its type cannot
            # be (an IPv6 address through an IPv4-only proxy): another address may be.
            self.target_failed = reply in {0x03, 0x04, 0x05, 0x06, 0x08}
            suffix = "" if transient else f", {_NEVER_HELPS}"
            raise self._fail(
                f"the proxy refused the connection: {meaning}{suffix}",
                transient=transient,
                # 0x07: it does not CONNECT, the one command we send, whatever the target.
                unusable=reply == 0x07,
            )
        _, address_type = yield from self._take(2)
        # The bound address has a length set by its type: consumed exactly, so the target's
        # first bytes stay unread.
        if address_type == 0x01:
            yield from self._take(4 + 2)
        elif address_type == 0x04:
            yield from self._take(16 + 2)
        elif address_type == 0x03:
            (length,) = yield from self._take(1)
            yield from self._take(length + 2)
        else:
            raise self._malformed(f"the reply's address type is {address_type:#04x}")
        log.debug("SOCKS5 tunnel to %s through %s open", self.target, proxy.peer)

    def _socks5_login(self) -> Generator[int, None, None]:
        # Built elsewhere: this frame waits for the reply, and is in the traceback when the
        # proxy refuses; it must hold no password for an error reporter to show.
        self._outgoing += _socks5_login_request(self.proxy)
        version, status = yield from self._take(2)
        if version != 1:
            raise self._malformed(f"the login reply's version is {version}, not 1")
        if status != 0:  # RFC 1929 §2: anything but 0 is a failure, and the proxy closes
            raise self._fail(
                f"the proxy refused our user name and password, {_NEVER_HELPS}",
                transient=False,
                unusable=True,
            )

    def _socks5_connect(self) -> bytes:
        # RFC 1928 §4: VER CMD=CONNECT RSV ATYP DST.ADDR DST.PORT.
        # An address literal goes as an address whatever the scheme (socks5h has nothing to
        # resolve then); a name goes as a name (socks5 passes addresses only: the drivers
        # resolve the name first).
        address = _ip(self.host)
        if isinstance(address, ipaddress.IPv4Address):
            destination = b"\x01" + address.packed
        elif isinstance(address, ipaddress.IPv6Address):
            destination = b"\x04" + address.packed
        else:
            name = _ascii_name(self.host)
            if not 0 < len(name) <= 255:
                raise ConfigurationError(f"the host {self.host!r} is too long for SOCKS5")
            destination = b"\x03" + bytes((len(name),)) + name
        return b"\x05\x01\x00" + destination + self.port.to_bytes(2, "big")

    def _http_request(self) -> bytes:
        proxy = self.proxy
        # RFC 9110 §9.3.6: the request target is host:port (RFC 9112 §3.2.3, authority
        # form), an IPv6 literal in brackets; Host carries the same.
        address = _ip(self.host)
        name = _unscoped(address) if address is not None else _ascii_name(self.host).decode()
        authority = f"[{name}]:{self.port}" if ":" in name else f"{name}:{self.port}"
        lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
        if proxy.username is not None and proxy.password is not None:
            # RFC 7617 §2: Basic, base64 of user-id ":" password, in UTF-8 (§2.1).
            token = base64.b64encode(f"{proxy.username}:{proxy.password}".encode()).decode()
            lines.append(f"Proxy-Authorization: Basic {token}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")

    def _http(self) -> Generator[int, None, None]:
        proxy = self.proxy
        self._outgoing += self._request
        end = yield from self._header_section()
        head = bytes(self._buffer[:end])
        del self._buffer[:end]
        status_line = head.split(b"\n", 1)[0].rstrip(b"\r")
        parts = status_line.split(b" ", 2)
        # RFC 9112 §4: HTTP-version SP status-code SP [reason-phrase].
        if (
            len(parts) < 2
            or not parts[0].startswith(b"HTTP/1.")
            or len(parts[1]) != 3
            or not parts[1].isdigit()
        ):
            raise self._malformed("the reply is not an HTTP/1.x status line")
        code = int(parts[1])
        reason = parts[2].decode("ascii", "replace") if len(parts) > 2 else ""
        reason = _scrubbed("".join(c for c in reason if c.isprintable())[:100], proxy)
        shown = f"{code} {reason}".strip()
        if 200 <= code <= 299:  # RFC 9110 §9.3.6: any 2xx means the tunnel is open
            log.debug("HTTP CONNECT tunnel to %s through %s open", self.target, proxy.peer)
            return
        # 407 is RFC 9110 §15.5.8's answer; some proxies (tinyproxy 1.11) send 401 instead.
        if code in (401, 407):
            what = (
                "the proxy refused our user name and password"
                if proxy.username is not None
                else "the proxy requires a user name and password"
            )
            raise self._fail(f"{what} ({shown}), {_NEVER_HELPS}", transient=False, unusable=True)
        if code == 403:
            raise self._fail(
                f"the proxy's rules forbid this connection ({shown}), {_NEVER_HELPS}",
                transient=False,
            )
        # 5xx (502 bad gateway, 503, 504 gateway timeout), 408 and 429 may pass; another
        # 4xx, or 1xx or 3xx to CONNECT, will not.
        transient = code >= 500 or code in (408, 429)
        suffix = "" if transient else f", {_NEVER_HELPS}"
        raise self._fail(f"the proxy refused the tunnel ({shown}){suffix}", transient=transient)

    def _header_section(self) -> Generator[int, None, int]:
        """Wait for the end of the status line and header fields (an empty line; a bare LF
        is taken as a line end too, RFC 9112 §2.2) and return its offset."""
        while True:
            buffer = self._buffer
            start = max(self._scanned - 2, 0)
            ends = [
                found + len(mark)
                for mark in (b"\n\r\n", b"\n\n")
                if (found := buffer.find(mark, start)) >= 0
            ]
            if ends:
                end = min(ends)
                if end > MAX_HTTP_REPLY:
                    break
                return end
            self._scanned = len(buffer)
            if len(buffer) >= MAX_HTTP_REPLY:
                break
            if self._eof:
                raise self._fail(
                    "the proxy closed the connection before the end of its reply",
                    transient=True,
                )
            yield min(self._http_step(), MAX_HTTP_REPLY - len(buffer))
        raise self._malformed(f"the reply's header is longer than {MAX_HTTP_REPLY} bytes")

    def _http_step(self) -> int:
        """How many bytes can be read without passing the empty line, whatever they are."""
        tail = bytes(self._buffer[-2:])
        if tail.endswith(b"\n") or tail == b"\n\r":
            return 1  # LF or CR LF could end it
        if tail.endswith(b"\r"):
            return 2  # LF then LF, or LF CR LF: 2 at least
        return 2  # LF LF at the least


def _scrubbed(reason: str, proxy: Proxy) -> str:
    """``reason``, an HTTP proxy's reason phrase, without our login in it: a broken proxy
    may echo what it was sent, and the phrase goes into the error. (A function of its own,
    so that no frame in a traceback holds the token.)"""
    if proxy.password is None:
        return reason
    token = base64.b64encode(f"{proxy.username}:{proxy.password}".encode()).decode()
    for secret in (token, proxy.password):
        if secret:
            reason = reason.replace(secret, "***")
    return reason


def _socks5_login_request(proxy: Proxy) -> bytes:
    """RFC 1929 §2: VER=1 ULEN UNAME PLEN PASSWD (the lengths checked by :class:`Proxy`)."""
    assert proxy.username is not None
    assert proxy.password is not None
    user = proxy.username.encode("utf-8")
    password = proxy.password.encode("utf-8")
    return bytes((1, len(user))) + user + bytes((len(password),)) + password


# -- what both drivers decide and report alike ---------------------------------------------


def tunnel_targets(proxy: Proxy, host: str, infos: list[tuple[Any, ...]] | None) -> list[str]:
    """The targets to ask the proxy for, in turn: each address ``getaddrinfo`` gave for
    ``host`` (``infos``, once each, in its order) when we resolve (``socks5``), else the
    name itself (``infos`` is then ``None``)."""
    if infos is None or not proxy.resolves_locally:
        return [host]
    seen: dict[str, None] = {}
    for info in infos:
        seen.setdefault(str(info[4][0]).partition("%")[0], None)
    return list(seen)


def proxy_unreachable(handshake: ProxyHandshake, exc: BaseException) -> ProxyError:
    """The error when no address of the proxy accepted the connection (``exc``: the
    drivers' :class:`~mailrelay.errors.ConnectError` for the proxy, which says why)."""
    transient = getattr(exc, "is_transient", True)
    return ProxyError(
        f"could not reach proxy {handshake.proxy.peer} for {handshake.target}: {exc}",
        is_transient=transient,
        host=handshake.target,
        proxy=handshake.proxy.peer,
        proxy_unreachable=True,
    )


def handshake_failed(handshake: ProxyHandshake, exc: BaseException, timeout: float) -> ProxyError:
    """The error for an I/O failure (``exc``) while talking to the proxy: a timeout (the
    connection and handshake together outlasted ``timeout``) or a lost connection."""
    if isinstance(exc, TimeoutError):
        what = f"no tunnel within {timeout:g} s (Timeouts.connect)"
    elif isinstance(exc, OSError):
        what = f"the connection failed in the handshake: {exc.strerror or type(exc).__name__}"
    else:
        what = f"the connection failed in the handshake: {type(exc).__name__}"
    return handshake._fail(what, transient=True)


def all_targets_failed(proxy: Proxy, peer: str, failures: list[ProxyError]) -> ProxyError:
    """The error when the proxy reached none of the target's addresses (``socks5``):
    transient when any of the failures was."""
    if len(failures) == 1:
        return failures[0]
    reasons = "; ".join(str(each) for each in failures)
    return ProxyError(
        f"proxy {proxy.peer} reached no address of {peer} ({reasons})",
        is_transient=any(each.is_transient for each in failures),
        host=peer,
        proxy=proxy.peer,
    )
