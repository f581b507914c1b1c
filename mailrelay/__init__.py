"""mailrelay: send, relay and track email.

The public API is re-exported here (DESIGN.md §3); see ``docs/`` for guides and
:mod:`mailrelay.errors` for the exception tree.
"""

from __future__ import annotations

from mailrelay import errors
from mailrelay.address import Address
from mailrelay.callout import AsyncCallout, Callout, CalloutResult, CalloutStatus
from mailrelay.dkim import DKIMSigner
from mailrelay.envelope import Envelope, Notify, Recipient, Ret
from mailrelay.errors import MailRelayError
from mailrelay.message import Attachment, ListHeaders, Message
from mailrelay.options import TLS, Timeouts
from mailrelay.reply import EnhancedStatus, Reply
from mailrelay.resolver import AsyncResolver, Resolver
from mailrelay.results import DeliveryResult, Outcome, RecipientResult
from mailrelay.tracker import (
    AsyncDeliveryTracker,
    DeliveryTracker,
    DomainLimits,
    MemoryStore,
    PostgresStore,
    RetryPolicy,
    SQLiteStore,
    State,
)
from mailrelay.transport import (
    AsyncLMTPTransport,
    AsyncSigningTransport,
    AsyncSMTPTransport,
    AsyncTransport,
    FileTransport,
    LMTPTransport,
    MemoryTransport,
    PoolSettings,
    Proxy,
    SendmailTransport,
    SigningTransport,
    SMTPTransport,
    Transport,
    async_transport_from_url,
    transport_from_url,
)
from mailrelay.transport.dane import DANE, AsyncDANE
from mailrelay.transport.mtasts import MTASTS, AsyncMTASTS
from mailrelay.transport.mx import MXPolicy, MXTransport
from mailrelay.transport.mx_async import AsyncMXTransport
from mailrelay.validate import (
    AsyncRecipientValidator,
    Reason,
    RecipientValidator,
    Validation,
    Verdict,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "AsyncDeliveryTracker",
    "DeliveryTracker",
    "DomainLimits",
    "MemoryStore",
    "PostgresStore",
    "RetryPolicy",
    "SQLiteStore",
    "State",
    "AsyncCallout",
    "AsyncLMTPTransport",
    "AsyncDANE",
    "AsyncMTASTS",
    "AsyncMXTransport",
    "AsyncSMTPTransport",
    "AsyncSigningTransport",
    "Callout",
    "CalloutResult",
    "CalloutStatus",
    "LMTPTransport",
    "DANE",
    "MTASTS",
    "MXPolicy",
    "MXTransport",
    "PoolSettings",
    "Proxy",
    "SMTPTransport",
    "SendmailTransport",
    "SigningTransport",
    "async_transport_from_url",
    "TLS",
    "Address",
    "AsyncRecipientValidator",
    "AsyncResolver",
    "AsyncTransport",
    "Attachment",
    "DKIMSigner",
    "DeliveryResult",
    "EnhancedStatus",
    "Envelope",
    "FileTransport",
    "ListHeaders",
    "MailRelayError",
    "MemoryTransport",
    "Message",
    "Notify",
    "Outcome",
    "Reason",
    "RecipientResult",
    "RecipientValidator",
    "Recipient",
    "Reply",
    "Resolver",
    "Ret",
    "Timeouts",
    "Transport",
    "Validation",
    "Verdict",
    "__version__",
    "errors",
    "transport_from_url",
]
