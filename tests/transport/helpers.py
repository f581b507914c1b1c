"""Small helpers shared by the transport tests."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from mailrelay.message import Message

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
