"""Transports: the ways mailrelay sends a message, all behind one interface.

* :mod:`~mailrelay.transport.base`: :class:`Transport` and :class:`AsyncTransport`, the
  interface (``send``, ``send_many``, ``deliver``, ``close`` and their ``a``-prefixed twins).
* :mod:`~mailrelay.transport.memory`: :class:`MemoryTransport`, an outbox list with an optional
  handler that scripts the server's answers (for tests).
* :mod:`~mailrelay.transport.file`: :class:`FileTransport`, ``.eml`` + ``.json`` files or a
  Maildir (for development).
* :mod:`~mailrelay.transport.smtp`: :class:`SMTPTransport` and :class:`LMTPTransport`
  (blocking, pooled); :mod:`~mailrelay.transport.async_smtp`: their asyncio twins.
* :mod:`~mailrelay.transport.mx`: :class:`MXTransport` (straight to each recipient domain's
  mail exchangers); :mod:`~mailrelay.transport.mx_async`: :class:`AsyncMXTransport`.
* :mod:`~mailrelay.transport.sync_driver` and :mod:`~mailrelay.transport.async_driver`: the two
  short loops that run the dialogue (:mod:`mailrelay.flow`) over sockets.
* :mod:`~mailrelay.transport.url`: :func:`transport_from_url`, :func:`async_transport_from_url`.
* :mod:`~mailrelay.transport.mtasts`: :class:`MTASTS` and :class:`AsyncMTASTS`, MTA-STS
  (RFC 8461) policies for the MX transports' ``tls_policy`` hook.
* :mod:`~mailrelay.transport.dane`: :class:`DANE` and :class:`AsyncDANE`, DANE for SMTP
  (RFC 7672) for the same hook.
* :mod:`~mailrelay.transport.tlsrpt`: :class:`TLSReportCollector`, SMTP TLS Reporting
  (RFC 8460) for the MX transports and MTA-STS hooks (``tls_reporter=``): counting, JSON
  reports, ``_smtp._tls`` discovery, the report email and the HTTPS POST.
* :mod:`~mailrelay.transport.sendmail`: :class:`SendmailTransport`, which hands each message
  to the local MTA's ``sendmail`` program (sync and async).
* :mod:`~mailrelay.transport.proxy`: :class:`Proxy`, an outbound SOCKS5 or HTTP CONNECT
  proxy for the SMTP and LMTP transports (``proxy=``), and the handshake both drivers run.
* :mod:`~mailrelay.transport.signing`: :class:`SigningTransport` and
  :class:`AsyncSigningTransport`, which DKIM-sign every message before another transport
  sends it.

Only the drivers in this package touch sockets, ssl and asyncio (DESIGN.md §2).
"""

from __future__ import annotations

from mailrelay.transport.async_smtp import AsyncLMTPTransport, AsyncSMTPTransport
from mailrelay.transport.base import AsyncTransport, Transport
from mailrelay.transport.dane import DANE, AsyncDANE
from mailrelay.transport.file import FileTransport
from mailrelay.transport.memory import MemoryTransport, OutboxItem
from mailrelay.transport.mtasts import MTASTS, AsyncMTASTS
from mailrelay.transport.mx import LOOPBACK_NETWORKS, PRIVATE_NETWORKS, MXTransport
from mailrelay.transport.mx_async import AsyncMXTransport
from mailrelay.transport.proxy import Proxy
from mailrelay.transport.sendmail import SendmailTransport
from mailrelay.transport.settings import AsyncPasswordProvider, PasswordProvider, PoolSettings
from mailrelay.transport.signing import AsyncSigningTransport, SigningTransport
from mailrelay.transport.smtp import LMTPTransport, SMTPTransport
from mailrelay.transport.tlsrpt import TLSReport, TLSReportCollector, TLSRPTRecord
from mailrelay.transport.url import TransportURL, async_transport_from_url, transport_from_url

__all__ = [
    "LOOPBACK_NETWORKS",
    "PRIVATE_NETWORKS",
    "DANE",
    "AsyncDANE",
    "AsyncLMTPTransport",
    "AsyncMTASTS",
    "AsyncMXTransport",
    "AsyncSMTPTransport",
    "AsyncSigningTransport",
    "AsyncTransport",
    "FileTransport",
    "LMTPTransport",
    "MTASTS",
    "MXTransport",
    "MemoryTransport",
    "OutboxItem",
    "PasswordProvider",
    "AsyncPasswordProvider",
    "PoolSettings",
    "Proxy",
    "SMTPTransport",
    "SendmailTransport",
    "SigningTransport",
    "TLSRPTRecord",
    "TLSReport",
    "TLSReportCollector",
    "Transport",
    "TransportURL",
    "async_transport_from_url",
    "transport_from_url",
]
