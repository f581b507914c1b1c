"""mailrelay: send, relay and track email.

The public API is re-exported here; see ``docs/`` for guides and
``mailrelay.errors`` for the exception tree.
"""

from __future__ import annotations

from mailrelay import errors
from mailrelay.errors import MailRelayError

__version__ = "0.1.0.dev0"

__all__ = [
    "MailRelayError",
    "__version__",
    "errors",
]
