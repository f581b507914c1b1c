"""Delivery tracking: delivery-status notifications (parse, build) and VERP.

The tracker engine and its store are added alongside; this package exports
the pure DSN tools they build on.
"""

from __future__ import annotations

from mailrelay.tracker.dsn import DSNAction, DSNKind, DSNRecipient, DSNReport, classify_hard
from mailrelay.tracker.dsn_parse import parse_dsn

__all__ = [
    "DSNAction",
    "DSNKind",
    "DSNRecipient",
    "DSNReport",
    "classify_hard",
    "parse_dsn",
]
