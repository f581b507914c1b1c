"""Transports: the ways mailrelay sends a message, all behind one interface.

* :mod:`~mailrelay.transport.base`: :class:`Transport` and :class:`AsyncTransport`, the
  interface (``send``, ``send_many``, ``deliver``, ``close`` and their ``a``-prefixed twins).
* :mod:`~mailrelay.transport.memory`: :class:`MemoryTransport`, an outbox list with an optional
  handler that scripts the server's answers (for tests).
* :mod:`~mailrelay.transport.file`: :class:`FileTransport`, ``.eml`` + ``.json`` files or a
  Maildir (for development).
* :mod:`~mailrelay.transport.url`: :func:`transport_from_url`.

Only the drivers in this package touch sockets, ssl and asyncio (DESIGN.md §2).
"""

from __future__ import annotations

from mailrelay.transport.base import AsyncTransport, Transport
from mailrelay.transport.file import FileTransport
from mailrelay.transport.memory import MemoryTransport, OutboxItem
from mailrelay.transport.url import TransportURL, transport_from_url

__all__ = [
    "AsyncTransport",
    "FileTransport",
    "MemoryTransport",
    "OutboxItem",
    "Transport",
    "TransportURL",
    "transport_from_url",
]
