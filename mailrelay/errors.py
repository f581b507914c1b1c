"""The exceptions mailrelay raises, all rooted at :class:`MailRelayError`.

Every exception also subclasses the builtin it most resembles, so code that
already catches ``ValueError`` or ``TimeoutError`` keeps working::

    MailRelayError
    ├── InvalidAddress (ValueError)        an address that is not a usable envelope address
    ├── MessageError (ValueError)          a message that cannot be built, parsed or sent as is
    ├── ConfigurationError (ValueError)    a transport, URL or policy that makes no sense
    ├── PolicyError (ValueError)           an MTA-STS or TLS-RPT record or policy that is not valid
    ├── PolicyFetchError                   an MTA-STS policy could not be fetched
    ├── ReportError                        a TLS report could not be submitted over HTTPS
    ├── ProtocolError                      the SMTP dialogue itself went wrong
    │   ├── LocalProtocolError             we asked for something the protocol forbids now
    │   └── RemoteProtocolError            the server sent something malformed or unexpected
    ├── ResolverError                      a DNS lookup failed (``is_transient`` says how)
    ├── TransportClosed (RuntimeError)     a transport used after ``close()`` / ``aclose()``
    ├── StoreError                         the tracker's store could not be read or written
    └── DeliveryError                      an attempt ended with no per-recipient answer
        ├── ConnectError (ConnectionError)       could not reach any address of the host
        │   └── ProxyError                       the outbound proxy failed or refused
        ├── DeliveryTimeout (TimeoutError)       a phase outlasted its timeout
        ├── ConnectionLost (ConnectionError)     the server closed or reset the connection
        ├── TLSError                             handshake, certificate, or TLS policy failure
        ├── AuthenticationError                  credentials refused, or AUTH not possible safely
        ├── SessionRefused                       the server refused the session (greeting, 421)
        ├── ServerProtocolError                  the server broke the protocol mid-session
        ├── NoRoute                              no mail exchanger to try (null MX, NXDOMAIN, ...)
        └── LocalMTAError                        the local sendmail program failed (exit status)

A refused *recipient* is never an exception: it is a
:class:`~mailrelay.results.RecipientResult` with a transient or permanent outcome.
A :class:`DeliveryError` is raised only when an attempt produced no answer per
recipient. Its :attr:`~DeliveryError.is_transient` tells a retrying caller
whether trying again later can help.

Every exception pickles and unpickles to an equal exception, so errors can
cross process boundaries (worker pools, task queues) intact.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mailrelay.reply import Reply

__all__ = [
    "AuthenticationError",
    "ConfigurationError",
    "ConnectError",
    "ConnectionLost",
    "DeliveryError",
    "DeliveryTimeout",
    "InvalidAddress",
    "LocalMTAError",
    "LocalProtocolError",
    "MailRelayError",
    "MessageError",
    "NoRoute",
    "PolicyError",
    "PolicyFetchError",
    "ProtocolError",
    "ProxyError",
    "RemoteProtocolError",
    "ReportError",
    "ResolverError",
    "ServerProtocolError",
    "SessionRefused",
    "StoreError",
    "TLSError",
    "TransportClosed",
]


class MailRelayError(Exception):
    """Root of every exception mailrelay raises.

    Two instances are equal when they have the same type, the same arguments and
    the same attributes; this keeps pickled round trips comparable.
    """

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, MailRelayError)
        return self.args == other.args and self.__dict__ == other.__dict__

    def __hash__(self) -> int:
        return hash((type(self), self.args))

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception's own reduce passes only ``args`` to ``__init__``; our
        # keyword-only attributes travel in the state dict instead.
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(
    cls: type[MailRelayError], args: tuple[Any, ...], state: dict[str, Any]
) -> MailRelayError:
    exc = cls.__new__(cls)
    Exception.__init__(exc, *args)
    exc.__dict__.update(state)
    return exc


class InvalidAddress(MailRelayError, ValueError):
    """An address is not a usable SMTP envelope address.

    Attributes:
        address: the text that was rejected.
    """

    def __init__(self, message: str, *, address: str = "") -> None:
        super().__init__(message)
        self.address = address


class MessageError(MailRelayError, ValueError):
    """A message cannot be built, parsed or sent as it is (for example a header
    value containing CR or LF, which would let a caller inject headers)."""


class ConfigurationError(MailRelayError, ValueError):
    """A transport, URL or policy was configured in a way that cannot work."""


class PolicyError(MailRelayError, ValueError):
    """An MTA-STS TXT record or policy text that is not valid (RFC 8461 §3.1, §3.2), or a
    TLS-RPT record that is not (RFC 8460 §3)."""


class PolicyFetchError(MailRelayError):
    """An MTA-STS policy could not be fetched (RFC 8461 §3.3): no address, a connection,
    TLS or certificate failure, a redirect, a status other than 200, the wrong media type,
    a body too large, a timeout, or a policy that does not parse."""


class ReportError(MailRelayError):
    """A TLS report (RFC 8460 §5.4) could not be submitted over HTTPS: a connection or TLS
    failure, a redirect, a status other than 2xx, or a timeout."""


class ProtocolError(MailRelayError):
    """The SMTP dialogue went wrong. Once raised by a protocol connection, that
    connection is in its absorbing ``ERROR`` state."""


class LocalProtocolError(ProtocolError):
    """We (the caller) asked for something the protocol forbids at this point,
    or gave a value that cannot go on the wire (CR, LF or NUL in a field)."""


class RemoteProtocolError(ProtocolError):
    """The server sent something malformed, unexpected or too large."""


class ResolverError(MailRelayError):
    """A DNS lookup failed.

    Attributes:
        name: the name that was looked up.
        is_transient: ``True`` for timeouts, SERVFAIL and REFUSED (asking again
            later may help); ``False`` for answers that say the name does not exist.
    """

    def __init__(self, message: str, *, name: str = "", is_transient: bool = True) -> None:
        super().__init__(message)
        self.name = name
        self.is_transient = is_transient


class TransportClosed(MailRelayError, RuntimeError):
    """A transport was asked to send after it was closed.

    A mistake in the calling code, not a delivery failure: it is deliberately *not* a
    :class:`DeliveryError`, so ``send_many`` raises it instead of turning it into
    (retryable) per-recipient results, and a tracker does not record it as an attempt.
    """


class StoreError(MailRelayError):
    """The delivery tracker's store could not be opened, read or written: the disk is
    full, the database stayed locked past the busy timeout, the file is corrupt, read-only
    or in a directory that does not exist. What was being stored was not stored (a
    ``submit`` that raises this did not submit).

    Attributes:
        is_transient: ``True`` when trying again later may help (locked, busy, full, an
            I/O error); ``False`` when the database itself is unusable (corrupt, not a
            database, cannot be opened, read-only).
    """

    def __init__(self, message: str, *, is_transient: bool = True) -> None:
        super().__init__(message)
        self.is_transient = is_transient


class DeliveryError(MailRelayError):
    """A delivery attempt ended without a per-recipient answer.

    Attributes:
        is_transient: whether trying again later can help.
        reply: the server reply behind the error, when there was one.
        host: the host (and port) the attempt was talking to, when known.
    """

    #: The default for :attr:`is_transient` when the constructor is not told.
    transient_by_default = True
    #: The RFC 3463 subject and detail (``(4, 1)`` for ``X.4.1``) of the status this kind
    #: of failure is reported with when no server reply gives one, or ``None``; the class
    #: follows :attr:`is_transient` (see :func:`mailrelay.results.error_status`).
    status_detail: tuple[int, int] | None = None

    def __init__(
        self,
        message: str,
        *,
        is_transient: bool | None = None,
        reply: Reply | None = None,
        host: str | None = None,
    ) -> None:
        super().__init__(message)
        if is_transient is None:
            is_transient = self.transient_by_default
            if reply is not None:
                is_transient = not 500 <= reply.code <= 599
        self.is_transient = is_transient
        self.reply = reply
        self.host = host


class ConnectError(DeliveryError, ConnectionError):
    """No address of the host accepted a connection."""

    # X.4.1 "No answer from host": the outbound connection attempt was not answered.
    status_detail = (4, 1)


class ProxyError(ConnectError):
    """The outbound proxy (SOCKS5 or HTTP CONNECT) could not open the tunnel to the server:
    it was unreachable or timed out, it refused our credentials or its rules forbid the
    target (permanent), it could not reach the target (transient), or it answered in a way
    that is not its protocol (permanent). The message names the proxy and the target, never
    the proxy's password.

    Attributes:
        proxy: the proxy's ``host:port``.
        proxy_unreachable: no address of the proxy itself accepted the connection (so no
            other server can be reached through it now either).
        proxy_unusable: the proxy was reached but fails whatever the target: it refused
            our login (or wants one we did not give), it does not support CONNECT, or it
            answered in a way that is not its protocol. No other server can be reached
            through it either. ``False`` for a failure about this target (the proxy
            could not reach it, or its rules forbid it), where another target may work.
    """

    def __init__(
        self,
        message: str,
        *,
        is_transient: bool | None = None,
        reply: Reply | None = None,
        host: str | None = None,
        proxy: str = "",
        proxy_unreachable: bool = False,
        proxy_unusable: bool = False,
    ) -> None:
        super().__init__(message, is_transient=is_transient, reply=reply, host=host)
        self.proxy = proxy
        self.proxy_unreachable = proxy_unreachable
        self.proxy_unusable = proxy_unusable


class DeliveryTimeout(DeliveryError, TimeoutError):
    """A phase of the dialogue (connect, greeting, MAIL, RCPT, DATA, ...) took
    longer than its timeout allows."""

    # X.4.2 "Bad connection": the transaction could not be completed "because of time-out,
    # or inadequate connection quality".
    status_detail = (4, 2)


class ConnectionLost(DeliveryError, ConnectionError):
    """The server closed or reset the connection before the dialogue finished."""

    status_detail = (4, 2)  # X.4.2 "Bad connection"


class TLSError(DeliveryError):
    """TLS could not be established or the TLS policy could not be met (a failed
    handshake, an untrusted certificate, STARTTLS required but not offered)."""

    transient_by_default = False
    # X.7.5 "Cryptographic failure" (what Postfix reports for a TLS handshake that failed).
    status_detail = (7, 5)


class AuthenticationError(DeliveryError):
    """The server refused our credentials, or authenticating would have sent
    them unsafely (over plaintext without ``allow_insecure_auth``)."""

    transient_by_default = False


class SessionRefused(DeliveryError):
    """The server refused the session: a 554 greeting, or a 421 at any point."""


class ServerProtocolError(DeliveryError):
    """The server broke the SMTP protocol in the middle of a session."""


class NoRoute(DeliveryError):
    """There is no mail exchanger to try for a domain (null MX, no such domain,
    no address for any exchanger)."""

    transient_by_default = False
    # X.4.4 "Unable to route": no next hop could be determined.
    status_detail = (4, 4)


class LocalMTAError(DeliveryError):
    """The local mail transfer agent's ``sendmail`` program did not take the message: it
    exited with a non-zero status (``sysexits.h``), was killed by a signal, or stopped
    reading the message before its end.

    Attributes:
        exit_status: the program's exit status; negative when it was killed by that signal
            (as :mod:`subprocess` reports it); ``None`` when it exited with 0 but did not
            read the whole message.
        status_detail: the RFC 3463 subject and detail it is reported with: the ones given
            (a relay-only sendmail's server reply said them), else Sendmail's own reading
            of the exit status (``EX_NOUSER`` X.1.1, ``EX_NOHOST`` X.1.2, ``EX_TEMPFAIL``
            X.2.0, ``EX_OSERR`` and ``EX_IOERR`` X.5.0, ``EX_USAGE`` X.5.4, ``EX_DATAERR``
            X.5.2, ``EX_NOINPUT``, ``EX_CANTCREAT`` and ``EX_NOPERM`` X.3.0, the other
            ``sysexits.h`` statuses X.5.0), ``None`` for a status outside ``sysexits.h`` or
            none.
    """

    def __init__(
        self,
        message: str,
        *,
        is_transient: bool | None = None,
        reply: Reply | None = None,
        host: str | None = None,
        exit_status: int | None = None,
        status_detail: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(message, is_transient=is_transient, reply=reply, host=host)
        self.exit_status = exit_status
        if status_detail is None and exit_status is not None:
            status_detail = _SYSEXIT_STATUS.get(exit_status)
        self.status_detail = status_detail


# The RFC 3463 subject and detail Sendmail reports a mailer's sysexits.h status with (its
# markfailure()), for LocalMTAError: 64 EX_USAGE, 65 EX_DATAERR, 66 EX_NOINPUT, 67
# EX_NOUSER, 68 EX_NOHOST, 69 EX_UNAVAILABLE, 70 EX_SOFTWARE, 71 EX_OSERR, 72 EX_OSFILE,
# 73 EX_CANTCREAT, 74 EX_IOERR, 75 EX_TEMPFAIL, 76 EX_PROTOCOL, 77 EX_NOPERM, 78 EX_CONFIG.
_SYSEXIT_STATUS: dict[int, tuple[int, int]] = {
    64: (5, 4),
    65: (5, 2),
    66: (3, 0),
    67: (1, 1),
    68: (1, 2),
    69: (5, 0),
    70: (5, 0),
    71: (5, 0),
    72: (5, 0),
    73: (3, 0),
    74: (5, 0),
    75: (2, 0),
    76: (5, 0),
    77: (3, 0),
    78: (5, 0),
}
