"""The sans-I/O SMTP/ESMTP/LMTP client core.

``ClientConnection`` turns commands into bytes and server bytes into events,
without doing any I/O itself (the h11 design); see ``docs/protocol.md`` for the
API, a driving loop, the state diagram and the error rules.

Differences from the agreed interface (PROTOCOL_API.md), on purpose:

* LMTP final replies are a separate :class:`LMTPResponse` event (the first of
  the two options the agreement allowed), not a field of ``Response``.
* :class:`ConnectionClosed` carries ``pending`` (commands without a reply) and
  ``unanswered`` (LMTP recipients still owed a final reply).
* A 421 that arrives while no command awaits a reply (e.g. an idle timeout or a
  shutdown during the message data) is a :class:`ServiceClosing` event.
* ``ClientConnection`` also exposes ``tls`` (True after ``tls_established()``)
  and ``accepted_recipients``.
* ``Auth.mechanism`` is sent upper-cased; ``xtext_encode`` is offered for
  callers that build DSN parameters themselves.
"""

from __future__ import annotations

from mailrelay.protocol.commands import (
    Auth,
    AuthAbort,
    AuthContinue,
    Bdat,
    Command,
    Data,
    DataChunk,
    Ehlo,
    EndOfData,
    Helo,
    Lhlo,
    MailFrom,
    Noop,
    Parameters,
    Quit,
    RcptTo,
    Rset,
    StartTLS,
    Vrfy,
    xtext_encode,
)
from mailrelay.protocol.connection import ClientConnection
from mailrelay.protocol.data import DotStuffer
from mailrelay.protocol.events import (
    NEED_DATA,
    ConnectionClosed,
    Event,
    Greeting,
    LMTPResponse,
    NeedData,
    Response,
    ServiceClosing,
)
from mailrelay.protocol.extensions import Extensions
from mailrelay.protocol.reader import ReplyReader, parse_replies
from mailrelay.protocol.transitions import State

__all__ = [
    "NEED_DATA",
    "Auth",
    "AuthAbort",
    "AuthContinue",
    "Bdat",
    "ClientConnection",
    "Command",
    "ConnectionClosed",
    "Data",
    "DataChunk",
    "DotStuffer",
    "Ehlo",
    "EndOfData",
    "Event",
    "Extensions",
    "Greeting",
    "Helo",
    "LMTPResponse",
    "Lhlo",
    "MailFrom",
    "NeedData",
    "Noop",
    "Parameters",
    "Quit",
    "RcptTo",
    "ReplyReader",
    "Response",
    "Rset",
    "ServiceClosing",
    "StartTLS",
    "State",
    "Vrfy",
    "parse_replies",
    "xtext_encode",
]
