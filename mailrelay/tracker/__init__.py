"""Delivery tracking: delivery-status notifications (parse, build) and VERP.

The tracker engine and its store build on these pure tools:

* :func:`parse_dsn` reads a returned report (RFC 3464, RFC 6533, ARF, the
  prose formats of real MTAs) into a :class:`DSNReport`;
* :func:`build_dsn` writes an RFC 3464 report to a message's sender;
* :func:`verp_encode` / :func:`verp_decode` carry a tracking id in the bounce
  address.
"""

from __future__ import annotations

from mailrelay.tracker.async_engine import AsyncDeliveryTracker
from mailrelay.tracker.dsn import DSNAction, DSNKind, DSNRecipient, DSNReport, classify_hard
from mailrelay.tracker.dsn_build import build_dsn, verp_decode, verp_encode
from mailrelay.tracker.dsn_parse import parse_dsn
from mailrelay.tracker.engine import VERP, DeliveryTracker, DSNMatch, DSNRequest, RunSummary
from mailrelay.tracker.events import EventKind, TrackerEvent
from mailrelay.tracker.postgres_store import PostgresStore
from mailrelay.tracker.retry import DomainLimits, DomainShaper, RetryPolicy
from mailrelay.tracker.sqlite_store import SQLiteStore
from mailrelay.tracker.store import (
    MAX_ATTEMPT_TEXT,
    Attempt,
    MemoryStore,
    MessageRecord,
    RecipientRecord,
    State,
    Store,
)

__all__ = [
    "MAX_ATTEMPT_TEXT",
    "AsyncDeliveryTracker",
    "Attempt",
    "DeliveryTracker",
    "DomainLimits",
    "DomainShaper",
    "DSNMatch",
    "DSNRequest",
    "EventKind",
    "MemoryStore",
    "MessageRecord",
    "RecipientRecord",
    "RetryPolicy",
    "RunSummary",
    "PostgresStore",
    "SQLiteStore",
    "State",
    "Store",
    "TrackerEvent",
    "VERP",
    "DSNAction",
    "DSNKind",
    "DSNRecipient",
    "DSNReport",
    "build_dsn",
    "classify_hard",
    "parse_dsn",
    "verp_decode",
    "verp_encode",
]
