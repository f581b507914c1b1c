"""What the server said, as events returned by ``ClientConnection.next_event()``.

Rules:

* Every complete server reply becomes exactly one event, in the order the bytes
  arrived: the first reply is a :class:`Greeting`; every later one is matched,
  first in first out, to the oldest command still awaiting a reply (RFC 2920
  §3.1) and becomes a :class:`Response` -- or, for LMTP's final replies after the
  message data (RFC 2033 §4.2), one :class:`LMTPResponse` per accepted recipient.
* The end of the server's byte stream becomes :class:`ConnectionClosed`, which
  lists the commands that never got their reply, so the caller can decide what
  they mean (for LMTP, recipients without a final reply are transient).
* Events are frozen values; they hold the command object that was sent, so the
  caller can match a reply to its recipient by identity.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Literal, TypeAlias

import attrs

from mailrelay.reply import Reply

if TYPE_CHECKING:
    from mailrelay.address import Address
    from mailrelay.protocol.commands import Bdat, Command, EndOfData

__all__ = [
    "NEED_DATA",
    "ConnectionClosed",
    "Event",
    "Greeting",
    "LMTPResponse",
    "NeedData",
    "Response",
    "ServiceClosing",
]


class NeedData(enum.Enum):
    """The type of the :data:`NEED_DATA` sentinel."""

    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by ``next_event()`` when more bytes from the server are needed.
NEED_DATA: Literal[NeedData.NEED_DATA] = NeedData.NEED_DATA


@attrs.frozen(kw_only=True)
class Greeting:
    """The server's opening reply (RFC 5321 §4.3.1).

    ``220`` means go ahead; ``554`` means the server refuses the session (RFC 5321
    §3.1) and ``421`` that it is shutting down. The connection only records the
    reply; what to do about a refusal is the caller's decision.

    Attributes:
        reply: the greeting.
    """

    reply: Reply


@attrs.frozen(kw_only=True)
class Response:
    """The reply to one command.

    Attributes:
        command: the command this reply answers (the very object that was sent).
        reply: the server's reply.
    """

    command: Command
    reply: Reply


@attrs.frozen(kw_only=True)
class LMTPResponse:
    """One LMTP final reply for one accepted recipient (RFC 2033 §4.2).

    After the end of the message data (``EndOfData`` or ``Bdat(last=True)``), an
    LMTP server gives one reply per recipient whose ``RCPT TO`` got a 2xx, in the
    order of those ``RCPT`` commands.

    Attributes:
        command: the ``EndOfData`` or last ``Bdat`` the reply answers.
        recipient: the recipient this reply is about.
        reply: the server's reply for that recipient.
    """

    command: EndOfData | Bdat
    recipient: Address
    reply: Reply


@attrs.frozen(kw_only=True)
class ServiceClosing:
    """A 421 reply that arrived while no command awaited a reply (RFC 5321 §3.8:
    the server may announce at any time that it is closing the connection, e.g.
    an idle timeout or a shutdown during the message data).

    Attributes:
        reply: the 421 reply.
    """

    reply: Reply


@attrs.frozen(kw_only=True)
class ConnectionClosed:
    """The server closed its side of the connection (end of file).

    Attributes:
        pending: commands sent that got no (complete) reply, oldest first.
        unanswered: LMTP recipients still owed a final reply, in ``RCPT`` order.
    """

    pending: tuple[Command, ...] = ()
    unanswered: tuple[Address, ...] = ()


#: Everything ``next_event()`` can return besides :data:`NEED_DATA`.
Event: TypeAlias = Greeting | Response | LMTPResponse | ServiceClosing | ConnectionClosed
