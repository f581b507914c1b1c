"""What the blocking and the asyncio drivers share: errors, write coalescing, the TLS probe.

Rules of this module:

* Nothing here does I/O or waits: these are the decisions and the error texts that
  :mod:`mailrelay.transport.sync_driver` and :mod:`mailrelay.transport.async_driver` would
  otherwise each spell out, so the two drivers cannot drift apart in what they report.
* Errors are built here and raised by the drivers (``raise X(...) from exc``), so the
  original exception stays chained at the I/O boundary where it happened.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from collections.abc import Sequence
from typing import Any

from mailrelay.errors import ConfigurationError, ConnectError, ConnectionLost, TLSError
from mailrelay.flow import Write
from mailrelay.transport.errors_map import PLAIN_AGAINST_IMPLICIT, peer_name

__all__ = [
    "PROBE_TIMEOUT",
    "WriteQueue",
    "all_addresses_failed",
    "attempt_failure",
    "before_greeting",
    "check_source_address",
    "closed_error",
    "for_source",
    "implicit_tls_error",
    "peer_chain",
    "probe_context",
    "resolve_error",
]

#: The most seconds the implicit-TLS probe waits for a ServerHello after a silent greeting.
PROBE_TIMEOUT = 5.0


def resolve_error(exc: socket.gaierror, host: str, peer: str) -> ConnectError:
    """The error for a host name that did not resolve."""
    # "Name or service not known" will not fix itself; a resolver failure may.
    permanent = exc.errno in {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5)}
    return ConnectError(
        f"cannot resolve {host!r}: {exc.strerror}", is_transient=not permanent, host=peer
    )


def check_source_address(value: object) -> str | None:
    """``value`` as a source address to bind outgoing connections to (an IPv4 or IPv6
    address, in its canonical text), or None.

    Raises:
        ConfigurationError: not an IP address (a host name would need a DNS lookup per
            connection, and could name an address this host does not have).
    """
    if value is None:
        return None
    try:
        address = ipaddress.ip_address(value if isinstance(value, str) else "")
    except ValueError:
        raise ConfigurationError(
            f"source_address must be an IPv4 or IPv6 address of this host, not {value!r}"
        ) from None
    # An IPv4-mapped IPv6 address (RFC 4291 §2.5.5.2, ``::ffff:192.0.2.1``) is an IPv4
    # address: kept as such, it binds an IPv4 socket and reaches the server's IPv4
    # addresses (as IPv6 it would rule them all out, see for_source).
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def for_source(
    infos: Sequence[tuple[Any, ...]], source: str | None, host: str, peer: str
) -> list[tuple[Any, ...]]:
    """The ``getaddrinfo`` results a connection from ``source`` can reach: those of its
    address family (an IPv4 source cannot reach an IPv6 address), all without a source.

    Raises:
        ConnectError: (transient) none of ``host``'s addresses is of the source's family.
    """
    if source is None:
        return list(infos)
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    usable = [info for info in infos if info[0] == family]
    if not usable:
        version = "IPv6" if family == socket.AF_INET6 else "IPv4"
        raise ConnectError(
            f"{host} has no {version} address, and connections go from {source}",
            host=peer,
        )
    return usable


def attempt_failure(address: tuple[Any, ...], exc: BaseException) -> str:
    """One address's failed connection attempt, for the error that lists them all."""
    if isinstance(exc, TimeoutError):
        reason = "timed out"
    elif isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
    else:  # pragma: no cover - the drivers pass OSError or TimeoutError
        reason = str(exc)
    return f"{peer_name(str(address[0]), int(address[1]))}: {reason}"


def all_addresses_failed(peer: str, failures: list[str]) -> ConnectError:
    """The error when no address of the host accepted the connection."""
    return ConnectError(f"could not connect to {peer} ({'; '.join(failures)})", host=peer)


def closed_error(peer: str) -> ConnectionLost:
    """The error for I/O asked of a connection that is already closed."""
    return ConnectionLost(f"the connection to {peer} is closed", host=peer)


def before_greeting(bytes_received: int, phase: str, implicit_tls: bool) -> bool:
    """Whether a read that timed out was waiting for the greeting of a plain connection
    that has sent nothing at all (the case worth probing for implicit TLS)."""
    return bytes_received == 0 and phase == "greeting" and not implicit_tls


def probe_context() -> ssl.SSLContext:
    """A context that only asks "do you speak TLS?": it checks nothing and sends nothing."""
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.check_hostname = False
    probe.verify_mode = ssl.CERT_NONE
    return probe


def implicit_tls_error(peer: str) -> TLSError:
    """The error when a server that sent no greeting answered a TLS handshake."""
    return TLSError(
        f"no SMTP greeting from {peer}, but it answered a TLS handshake: {PLAIN_AGAINST_IMPLICIT}",
        is_transient=False,
        host=peer,
    )


class WriteQueue:
    """Writes waiting to go out together (see the drivers' module docstrings).

    Writes are coalesced until the dialogue waits for a reply (or a lot is pending): one
    send for "DATA chunk + terminator" instead of two. Nothing waits while the dialogue
    reads, so pipelining semantics are unchanged.

    Attributes:
        chunks: the pending writes' bytes, in order (true when any are pending).
        phase: the last pending write's phase, whose time limit bounds the send.
    """

    def __init__(self, limit: int) -> None:
        self.chunks: list[bytes] = []
        self.phase = "greeting"
        self._size = 0
        self._limit = limit

    def add(self, request: Write) -> bool:
        """Queue ``request``; whether it should all go out now (so much is pending, or the
        request asks to be flushed)."""
        self.chunks.append(request.data)
        self._size += len(request.data)
        self.phase = request.phase
        return request.flush or self._size >= self._limit

    def take(self) -> bytes:
        """Every pending byte, joined; the queue is empty afterwards."""
        chunks = self.chunks
        data = b"".join(chunks) if len(chunks) > 1 else chunks[0]
        chunks.clear()
        self._size = 0
        return data

    def clear(self) -> None:
        """Drop every pending write (the connection is closing)."""
        self.chunks.clear()
        self._size = 0


def peer_chain(tls: ssl.SSLSocket | ssl.SSLObject | None) -> tuple[bytes, ...]:
    """The certificates the server presented in the handshake (DER, leaf first), whether
    or not they were verified: what DANE matches (RFC 7672 §3.1).

    Python 3.13 has ``get_unverified_chain()``; 3.10 to 3.12 have it on the private
    ``_sslobj`` only. Where neither exists, the leaf alone (``getpeercert``).
    """
    if tls is None:
        return ()
    getter = getattr(tls, "get_unverified_chain", None)
    if getter is None:
        getter = getattr(getattr(tls, "_sslobj", None), "get_unverified_chain", None)
    if getter is not None:
        chain = getter() or []
        return tuple(
            cert if isinstance(cert, bytes) else cert.public_bytes(ssl._ssl.ENCODING_DER)  # type: ignore[attr-defined]
            for cert in chain
        )
    leaf = tls.getpeercert(binary_form=True)
    return (leaf,) if leaf else ()
