"""A transport that keeps what it is given in a list: the test double of choice.

Rules of this module:

* :class:`MemoryTransport` implements both :class:`~mailrelay.transport.base.Transport` and
  :class:`~mailrelay.transport.base.AsyncTransport`, so one object serves sync and async code.
* Without a handler every recipient is accepted with a ``250 2.0.0`` reply.
* A *handler* scripts the answer, the way httpx's ``MockTransport`` does. It is called as
  ``handler(message, envelope)`` and returns either a complete
  :class:`~mailrelay.results.DeliveryResult` (one result per envelope recipient, in order), or a
  mapping from recipient (an :class:`~mailrelay.address.Address` or its text) to an
  :class:`~mailrelay.results.Outcome` or a :class:`~mailrelay.reply.Reply`; recipients the
  mapping does not name are accepted. It may raise a
  :class:`~mailrelay.errors.DeliveryError` to simulate an attempt that got no answer per
  recipient (a refused connection, a timeout). For ``asend`` the handler may be a coroutine
  function.
* :attr:`MemoryTransport.outbox` records every attempt that returned a result, as
  ``(message, envelope)`` items in the order they were sent; an attempt whose handler raised
  is not in it, since no server took the message.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Awaitable, Callable, Mapping
from typing import NamedTuple, TypeAlias

from mailrelay.address import Address
from mailrelay.envelope import Envelope
from mailrelay.errors import ConfigurationError
from mailrelay.message import Message
from mailrelay.reply import Reply
from mailrelay.results import DeliveryResult, Outcome, RecipientResult
from mailrelay.transport.base import AsyncTransport, Transport

__all__ = ["Handler", "HandlerAnswer", "MemoryTransport", "OutboxItem"]

#: What a handler may return: a whole result, or the outcome of the recipients it cares about.
#: (Mapping keys are invariant, hence the three spellings: ``dict[str, Outcome]`` fits.)
HandlerAnswer: TypeAlias = (
    DeliveryResult
    | Mapping[str, Outcome | Reply]
    | Mapping[Address, Outcome | Reply]
    | Mapping[Address | str, Outcome | Reply]
)

#: A handler for :class:`MemoryTransport`: ``(message, envelope) -> answer`` (or an awaitable
#: of one, for async use).
Handler: TypeAlias = Callable[[Message, Envelope], HandlerAnswer | Awaitable[HandlerAnswer]]

HOST = "memory"

# The reply a real server would give for each outcome when the handler names only the outcome.
_DEFAULT_REPLIES = {
    Outcome.ACCEPTED: Reply.of(250, "2.0.0 Ok: queued in memory"),
    Outcome.TRANSIENT: Reply.of(450, "4.0.0 Deferred by the memory transport's handler"),
    Outcome.PERMANENT: Reply.of(550, "5.0.0 Refused by the memory transport's handler"),
}
# Read for every recipient: globals, since in CPython 3.11 an attribute of an Enum class
# costs about 100 ns (EnumType defines __getattr__).
_ACCEPTED_REPLY = _DEFAULT_REPLIES[Outcome.ACCEPTED]
_from_reply = Outcome.from_reply


class OutboxItem(NamedTuple):
    """One message the transport took, with the envelope it was sent with.

    A named tuple so that ``message, envelope = transport.outbox[0]`` works too.
    """

    message: Message
    """The message as given to ``send``."""
    envelope: Envelope
    """The envelope it was sent with (derived from the headers when none was given)."""


def _address(key: Address | str) -> Address:
    return key if isinstance(key, Address) else Address.parse(key)


def _result_from_answer(envelope: Envelope, message: Message, answer: object) -> DeliveryResult:
    if isinstance(answer, DeliveryResult):
        got = [r.address for r in answer.recipients]
        wanted = [r.address for r in envelope.recipients]
        if got != wanted:
            raise ConfigurationError(
                "the memory transport's handler returned a DeliveryResult whose recipients "
                f"({', '.join(map(str, got))}) are not the envelope's "
                f"({', '.join(map(str, wanted))}), in order"
            )
        return answer
    if not isinstance(answer, Mapping):
        raise ConfigurationError(
            "the memory transport's handler must return a DeliveryResult or a mapping of "
            f"recipient to Outcome or Reply, not {type(answer).__name__}"
        )
    scripted: dict[Address, Reply] = {}
    for key, value in answer.items():
        address = _address(key)
        if isinstance(value, Reply):
            scripted[address] = value
        elif isinstance(value, Outcome):
            scripted[address] = _DEFAULT_REPLIES[value]
        else:
            raise ConfigurationError(
                f"the memory transport's handler gave {type(value).__name__} for {address}: "
                "expected an Outcome or a Reply"
            )
    recipients = {r.address for r in envelope.recipients}
    strangers = [str(a) for a in scripted if a not in recipients]
    if strangers:
        raise ConfigurationError(
            "the memory transport's handler scripted recipients that are not in the envelope: "
            + ", ".join(strangers)
        )
    accepted = _ACCEPTED_REPLY
    results = []
    for recipient in envelope.recipients:
        reply = scripted.get(recipient.address, accepted)
        results.append(
            RecipientResult(
                address=recipient.address,
                outcome=_from_reply(reply),
                reply=reply,
                host=HOST,
            )
        )
    return DeliveryResult(recipients=tuple(results), message_id=message.message_id, host=HOST)


class MemoryTransport(Transport, AsyncTransport):
    """Keeps every sent message in :attr:`outbox`; a handler may script the server's answers.

    Example::

        def handler(message, envelope):
            return {"bob@example.com": Outcome.PERMANENT}

        transport = MemoryTransport(handler)
        result = transport.send(message)
        assert transport.outbox[0].message is message

    Args:
        handler: ``(message, envelope) -> DeliveryResult | Mapping[address, Outcome | Reply]``;
            may raise :class:`~mailrelay.errors.DeliveryError`. ``None`` accepts everything.
    """

    def __init__(self, handler: Handler | None = None) -> None:
        self.handler = handler
        #: Every ``(message, envelope)`` that produced a result, in sending order.
        self.outbox: list[OutboxItem] = []
        # send() may be called from several threads; keep outbox order equal to result order.
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<MemoryTransport outbox={len(self.outbox)}>"

    def _accept(self, message: Message, envelope: Envelope, answer: object) -> DeliveryResult:
        result = _result_from_answer(envelope, message, answer)
        with self._lock:
            self.outbox.append(OutboxItem(message, envelope))
        return result

    def deliver(self, message: Message, envelope: Envelope) -> DeliveryResult:
        """Record the message and return the handler's (or an all-accepted) answer.

        Raises:
            DeliveryError: whatever the handler raised.
            ConfigurationError: when the handler's answer does not fit the envelope, or when
                it is a coroutine function (use ``asend`` for those).
        """
        if self.handler is None:
            return self._accept(message, envelope, {})
        answer = self.handler(message, envelope)
        if inspect.isawaitable(answer):
            # Never leave an un-awaited coroutine behind (it would warn at garbage collection).
            close = getattr(answer, "close", None)
            if close is not None:
                close()
            raise ConfigurationError(
                "the memory transport's handler is asynchronous: use asend(), not send()"
            )
        return self._accept(message, envelope, answer)

    async def adeliver(self, message: Message, envelope: Envelope) -> DeliveryResult:
        """Like :meth:`deliver`, awaiting the handler when it is a coroutine function."""
        if self.handler is None:
            return self._accept(message, envelope, {})
        answer = self.handler(message, envelope)
        if inspect.isawaitable(answer):
            answer = await answer
        return self._accept(message, envelope, answer)
