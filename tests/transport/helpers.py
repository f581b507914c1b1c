"""Small helpers shared by the transport tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar

from mailrelay.envelope import Envelope
from mailrelay.message import Message
from mailrelay.results import DeliveryResult
from mailrelay.transport import (
    AsyncLMTPTransport,
    AsyncSMTPTransport,
    LMTPTransport,
    SMTPTransport,
)
from mailrelay.transport.base import BatchItem

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion on a fresh event loop (no pytest plugin needed)."""
    return asyncio.run(coro)


def make_message(
    *,
    to: tuple[str, ...] = ("bob@example.com", "carol@example.org"),
    subject: str = "Hello",
    text: str = "Hi there!\n",
    sender: str = "alice@example.com",
) -> Message:
    """A small message from ``sender`` to ``to``."""
    return Message.build(sender=sender, to=list(to), subject=subject, text=text)


Flavour = Literal["sync", "async"]
FLAVOURS: tuple[Flavour, ...] = ("sync", "async")


def send_with(
    flavour: Flavour,
    message: Message,
    envelope: Envelope | None = None,
    *,
    lmtp: bool = False,
    **kwargs: Any,
) -> DeliveryResult:
    """Send one message with a fresh (Async)SMTPTransport or (Async)LMTPTransport."""
    if flavour == "sync":
        cls: type[SMTPTransport | LMTPTransport] = LMTPTransport if lmtp else SMTPTransport
        with cls(**kwargs) as transport:
            return transport.send(message, envelope)

    async def main() -> DeliveryResult:
        acls: type[AsyncSMTPTransport | AsyncLMTPTransport] = (
            AsyncLMTPTransport if lmtp else AsyncSMTPTransport
        )
        async with acls(**kwargs) as transport:
            return await transport.asend(message, envelope)

    return run(main())


def send_many_with(
    flavour: Flavour, items: list[BatchItem], *, lmtp: bool = False, **kwargs: Any
) -> list[DeliveryResult]:
    """``send_many`` / ``asend_many`` with a fresh transport."""
    if flavour == "sync":
        cls: type[SMTPTransport | LMTPTransport] = LMTPTransport if lmtp else SMTPTransport
        with cls(**kwargs) as transport:
            return transport.send_many(items)

    async def main() -> list[DeliveryResult]:
        acls: type[AsyncSMTPTransport | AsyncLMTPTransport] = (
            AsyncLMTPTransport if lmtp else AsyncSMTPTransport
        )
        async with acls(**kwargs) as transport:
            return await transport.asend_many(items)

    return run(main())


def send_each_with(
    flavour: Flavour,
    items: list[Message],
    *,
    lmtp: bool = False,
    pause: float = 0.0,
    **kwargs: Any,
) -> list[DeliveryResult]:
    """``send`` / ``asend`` once per message, in turn, on one fresh transport (so that the
    pool checks a connection out for each message, unlike a pipelined ``send_many``),
    waiting ``pause`` seconds between two sends (the connection idle in the pool)."""
    if flavour == "sync":
        cls: type[SMTPTransport | LMTPTransport] = LMTPTransport if lmtp else SMTPTransport
        with cls(**kwargs) as transport:
            results = []
            for n, message in enumerate(items):
                if n and pause:
                    time.sleep(pause)
                results.append(transport.send(message))
            return results

    async def main() -> list[DeliveryResult]:
        acls: type[AsyncSMTPTransport | AsyncLMTPTransport] = (
            AsyncLMTPTransport if lmtp else AsyncSMTPTransport
        )
        async with acls(**kwargs) as transport:
            results = []
            for n, message in enumerate(items):
                if n and pause:
                    await asyncio.sleep(pause)
                results.append(await transport.asend(message))
            return results

    return run(main())
