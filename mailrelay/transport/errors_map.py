"""Translating OS and ssl exceptions into :mod:`mailrelay.errors`, shared by both drivers.

Rules of this module:

* Exceptions are translated at the I/O boundary only, here, and always chained
  (``raise mapped from exc``), so the original stays in the traceback.
* A timeout is :class:`~mailrelay.errors.DeliveryTimeout` naming the phase and its limit;
  a certificate that fails verification is a permanent :class:`~mailrelay.errors.TLSError`
  (retrying cannot make it valid); other TLS failures are transient ``TLSError``; resets,
  broken pipes and other socket errors are :class:`~mailrelay.errors.ConnectionLost`.
* The two most common TLS mistakes get messages that say what to do (RFC 8314 §3.3):
  implicit TLS against a port that speaks plain text first, and STARTTLS (or plain text)
  against a port that expects TLS from the first byte. Plain text in place of the handshake
  after STARTTLS's 220 is neither: it says so (RFC 3207 §4.2).
"""

from __future__ import annotations

import socket
import ssl

from mailrelay.errors import ConnectionLost, DeliveryError, DeliveryTimeout, TLSError

__all__ = [
    "IMPLICIT_AGAINST_PLAIN",
    "PLAIN_AFTER_STARTTLS",
    "PLAIN_AGAINST_IMPLICIT",
    "map_io_error",
    "map_tls_error",
    "peer_name",
]

#: The hint for TLS.IMPLICIT against a server that greets in plain text.
IMPLICIT_AGAINST_PLAIN = (
    "the server speaks plain text first, not TLS: it does not expect implicit TLS on this "
    "port: use TLS.STARTTLS (usually port 587) instead of TLS.IMPLICIT"
)
#: The hint for STARTTLS (or no TLS) against a server that waits for a TLS handshake.
PLAIN_AGAINST_IMPLICIT = "the server expects implicit TLS (as port 465 does): use TLS.IMPLICIT"
#: What plain text in place of the handshake means after STARTTLS's 220 (where the port
#: choice is not in question).
PLAIN_AFTER_STARTTLS = (
    "the server sent plain text after its 220 to STARTTLS instead of a TLS handshake "
    "(RFC 3207 §4.2: a broken server, or a response-injection attempt)"
)

# OpenSSL's reasons when the "TLS" bytes it read were plain text (an SMTP greeting).
_PLAINTEXT_REASONS = frozenset(
    {
        "WRONG_VERSION_NUMBER",
        "RECORD_LAYER_FAILURE",
        "PACKET_LENGTH_TOO_LONG",
        "UNKNOWN_PROTOCOL",
        "HTTP_REQUEST",
        "RECORD_TOO_LARGE",
    }
)


def peer_name(host: str, port: int | None) -> str:
    """``host:port`` for messages and results (``[::1]:25`` for IPv6, the path for unix)."""
    if port is None:
        return host
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def is_plaintext_reply(exc: BaseException) -> bool:
    """Whether a handshake failed because the server sent plain text instead of TLS."""
    return isinstance(exc, ssl.SSLError) and (exc.reason or "") in _PLAINTEXT_REASONS


def map_tls_error(
    exc: BaseException, *, peer: str, server_hostname: str, starttls: bool = False
) -> DeliveryError:
    """The mailrelay error for a failed TLS handshake (``starttls``: one begun after
    STARTTLS's 220, not implicit TLS)."""
    if isinstance(exc, DeliveryError):
        return exc
    if isinstance(exc, ssl.SSLCertVerificationError):
        return TLSError(
            f"the certificate of {peer} failed verification for {server_hostname!r}: "
            f"{exc.verify_message or exc} (pass ssl_context= to trust another CA)",
            is_transient=False,
            host=peer,
        )
    if isinstance(exc, TimeoutError | socket.timeout):
        return TLSError(f"the TLS handshake with {peer} timed out", is_transient=True, host=peer)
    if is_plaintext_reply(exc):
        # Plain text where the handshake should be: on an implicit-TLS connection, the port
        # speaks plain text first; after STARTTLS's 220, the server said more in plain text.
        hint = PLAIN_AFTER_STARTTLS if starttls else IMPLICIT_AGAINST_PLAIN
        return TLSError(f"TLS with {peer} failed: {hint}", is_transient=False, host=peer)
    return TLSError(f"the TLS handshake with {peer} failed: {exc}", is_transient=True, host=peer)


def map_io_error(
    exc: BaseException, *, peer: str, phase: str, timeout: float | None = None
) -> DeliveryError:
    """The mailrelay error for an exception met while reading or writing in ``phase``."""
    if isinstance(exc, DeliveryError):
        return exc
    if isinstance(exc, TimeoutError | socket.timeout):
        limit = f" within {timeout:g} s" if timeout is not None else ""
        return DeliveryTimeout(
            f"{peer} did not answer{limit} (phase {phase!r}, RFC 5321 §4.5.3.2)", host=peer
        )
    if isinstance(exc, ssl.SSLError):
        return ConnectionLost(f"the TLS connection to {peer} failed: {exc}", host=peer)
    if isinstance(exc, OSError):
        reason = exc.strerror or type(exc).__name__
        return ConnectionLost(f"the connection to {peer} failed ({phase}): {reason}", host=peer)
    return ConnectionLost(f"the connection to {peer} failed ({phase}): {exc!r}", host=peer)
