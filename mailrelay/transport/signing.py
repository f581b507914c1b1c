"""Transports that DKIM-sign every message before another transport sends it.

:class:`SigningTransport` wraps any :class:`~mailrelay.transport.base.Transport` (SMTP,
LMTP, MX, memory, file, a user's subclass, the one a tracker drives) and
:class:`AsyncSigningTransport` any :class:`~mailrelay.transport.base.AsyncTransport`. Each
message is signed by a :class:`~mailrelay.dkim.DKIMSigner` at the moment it is handed on,
so every attempt (a tracker's retries included) carries a fresh ``t=``.

Rules of this module:

* Signing never changes the envelope: an envelope given is passed on as it is, and one
  derived from the headers is derived from the *unsigned* message (exactly what the wrapped
  transport would have derived itself).
* Results and errors of the wrapped transport pass through unchanged; so do ``close`` /
  ``aclose`` and the context managers, which close the wrapped transport.
* Batches keep the :mod:`base <mailrelay.transport.base>` contract, and go to the wrapped
  transport's own ``send_many`` / ``asend_many`` (so pooled transports still pipeline): a
  sequence is signed whole before anything is sent; any other iterable is streamed, each
  message signed as the wrapped transport takes it. In a batch, a message that cannot be
  signed (no ``From`` field: a :class:`~mailrelay.errors.MessageError`) is not sent and
  gets a result, every recipient PERMANENT with the reason, while the others go: one bad
  message must not stop a batch, nor a tracker's queue, where an exception would put the
  whole batch back to fail again at every run. ``send`` and ``deliver`` raise it.
* The async wrapper signs big messages (over :data:`THREAD_THRESHOLD` bytes, which may be
  read from a file) in a worker thread, so the event loop never waits on the disk or on
  hashing megabytes; small ones are signed in line (an RSA-2048 signature takes about a
  millisecond).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from typing import Final

from mailrelay.dkim import DKIMSigner
from mailrelay.envelope import Envelope
from mailrelay.errors import MessageError
from mailrelay.message import Message
from mailrelay.results import DeliveryResult, Outcome, RecipientResult
from mailrelay.transport.base import (
    AsyncBatch,
    AsyncTransport,
    BatchItem,
    Transport,
    iter_pairs,
)

__all__ = ["THREAD_THRESHOLD", "AsyncSigningTransport", "SigningTransport"]

#: Messages larger than this (bytes on the wire) are signed in a worker thread by
#: :class:`AsyncSigningTransport`.
THREAD_THRESHOLD: Final = 256 * 1024


def _unsignable(message: Message, envelope: Envelope, error: MessageError) -> DeliveryResult:
    """The result of a batch's message that could not be signed: nothing was sent, and
    signing it again will not succeed, so every recipient is PERMANENT with the reason."""
    reason = f"not sent: the message cannot be DKIM-signed: {error}"
    return DeliveryResult(
        recipients=tuple(
            RecipientResult(address=recipient.address, outcome=Outcome.PERMANENT, reason=reason)
            for recipient in envelope.recipients
        ),
        message_id=message.message_id,
        error=error,
    )


def _merged(sent: list[DeliveryResult], refused: dict[int, DeliveryResult]) -> list[DeliveryResult]:
    """The wrapped transport's results with the unsigned messages' put back in place."""
    if not refused:
        return sent
    others = iter(sent)
    return [
        refused[index] if index in refused else next(others)
        for index in range(len(sent) + len(refused))
    ]


class SigningTransport(Transport):
    """Signs every message with ``signer`` (DKIM, RFC 6376), then sends it through
    ``transport``.

    ::

        signer = DKIMSigner(domain="example.org", selector="mail2026", private_key=pem)
        with SigningTransport(SMTPTransport("smtp.example.org"), signer) as transport:
            transport.send(message)

    Attributes:
        transport: the wrapped transport, which sends the signed messages.
        signer: the signer.

    ``send`` and ``send_many`` raise what the wrapped transport raises; ``send`` and
    ``deliver`` also raise :class:`~mailrelay.errors.MessageError` for a message that
    cannot be signed (no ``From`` field), before it is handed on, where ``send_many``
    gives such a message a PERMANENT result and sends the others (see the module
    docstring).
    """

    def __init__(self, transport: Transport, signer: DKIMSigner) -> None:
        self.transport = transport
        self.signer = signer

    def __repr__(self) -> str:
        return (
            f"<SigningTransport d={self.signer.domain} s={self.signer.selector} {self.transport!r}>"
        )

    def deliver(self, message: Message, envelope: Envelope) -> DeliveryResult:
        """Sign ``message`` and deliver it through the wrapped transport's ``deliver``."""
        return self.transport.deliver(self.signer.sign(message), envelope)

    def send(self, message: Message, envelope: Envelope | None = None) -> DeliveryResult:
        """Sign ``message`` and send it through the wrapped transport's ``send``; the
        envelope, when not given, comes from the unsigned message's headers."""
        if envelope is None:
            envelope = Envelope.from_message(message)
        return self.transport.send(self.signer.sign(message), envelope)

    def send_many(self, items: Iterable[BatchItem]) -> list[DeliveryResult]:
        """Sign each message and send the batch through the wrapped transport's
        ``send_many`` (a sequence is signed whole first; a message that cannot be signed
        gets a PERMANENT result; see the module docstring)."""
        pairs, total = iter_pairs(items)
        refused: dict[int, DeliveryResult] = {}
        signed: Iterable[BatchItem] = self._signed(pairs, refused)
        if total is not None:
            signed = list(signed)
        return _merged(self.transport.send_many(signed), refused)

    def _signed(
        self, pairs: Iterator[tuple[Message, Envelope]], refused: dict[int, DeliveryResult]
    ) -> Iterator[BatchItem]:
        for index, (message, envelope) in enumerate(pairs):
            try:
                signed = self.signer.sign(message)
            except MessageError as exc:
                refused[index] = _unsignable(message, envelope, exc)
                continue
            yield signed, envelope

    def close(self) -> None:
        """Close the wrapped transport."""
        self.transport.close()


class AsyncSigningTransport(AsyncTransport):
    """:class:`SigningTransport` for an :class:`~mailrelay.transport.base.AsyncTransport`.

    Attributes:
        transport: the wrapped transport, which sends the signed messages.
        signer: the signer.
    """

    def __init__(self, transport: AsyncTransport, signer: DKIMSigner) -> None:
        self.transport = transport
        self.signer = signer

    def __repr__(self) -> str:
        return (
            f"<AsyncSigningTransport d={self.signer.domain} s={self.signer.selector} "
            f"{self.transport!r}>"
        )

    async def _sign(self, message: Message) -> Message:
        if message.size > THREAD_THRESHOLD:
            return await asyncio.to_thread(self.signer.sign, message)
        return self.signer.sign(message)

    async def adeliver(self, message: Message, envelope: Envelope) -> DeliveryResult:
        """Sign ``message`` and deliver it through the wrapped transport's ``adeliver``."""
        return await self.transport.adeliver(await self._sign(message), envelope)

    async def asend(self, message: Message, envelope: Envelope | None = None) -> DeliveryResult:
        """Sign ``message`` and send it through the wrapped transport's ``asend``; the
        envelope, when not given, comes from the unsigned message's headers."""
        if envelope is None:
            envelope = Envelope.from_message(message)
        return await self.transport.asend(await self._sign(message), envelope)

    async def asend_many(
        self, items: Iterable[BatchItem] | AsyncIterable[BatchItem]
    ) -> list[DeliveryResult]:
        """Sign each message and send the batch through the wrapped transport's
        ``asend_many`` (a sequence is signed whole first; a message that cannot be signed
        gets a PERMANENT result)."""
        refused: dict[int, DeliveryResult] = {}
        if isinstance(items, Sequence):
            pairs, _total = iter_pairs(items)
            signed: list[BatchItem] = []
            for index, (message, envelope) in enumerate(pairs):
                try:
                    signed.append((await self._sign(message), envelope))
                except MessageError as exc:
                    refused[index] = _unsignable(message, envelope, exc)
            return _merged(await self.transport.asend_many(signed), refused)
        sent = await self.transport.asend_many(self._signed(AsyncBatch(items), refused))
        return _merged(sent, refused)

    async def _signed(
        self, batch: AsyncBatch, refused: dict[int, DeliveryResult]
    ) -> AsyncIterator[BatchItem]:
        while (taken := await batch.next()) is not None:
            index, message, envelope = taken
            try:
                signed = await self._sign(message)
            except MessageError as exc:
                refused[index] = _unsignable(message, envelope, exc)
                continue
            yield signed, envelope

    async def aclose(self) -> None:
        """Close the wrapped transport."""
        await self.transport.aclose()
