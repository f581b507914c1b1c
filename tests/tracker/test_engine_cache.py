"""The tracker's in-memory copies of submitted messages (mailrelay.tracker.cache)."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailrelay.envelope import Envelope
from mailrelay.message import Message
from mailrelay.results import Outcome
from mailrelay.tracker.async_engine import AsyncDeliveryTracker
from mailrelay.tracker.cache import MAX_KEPT, MessageCache, held_in_memory
from mailrelay.tracker.engine import DeliveryTracker
from mailrelay.tracker.events import TrackerEvent
from mailrelay.tracker.sqlite_store import SQLiteStore
from mailrelay.tracker.store import Attempt, Change, MemoryStore, MessageRecord, State
from mailrelay.transport.memory import MemoryTransport

T0 = dt.datetime(2026, 3, 1, 8, 0, tzinfo=dt.UTC)
R = TypeVar("R")


def run(coro: Coroutine[Any, Any, R]) -> R:
    return asyncio.run(coro)


def message(index: int = 0, text: str = "hi\n") -> Message:
    return Message.build(
        sender="sender@example.com", to=[f"r{index}@example.org"], subject="s", text=text
    )


def record(tracking_id: str) -> MessageRecord:
    envelope = Envelope("sender@example.com", ["r@example.org"])
    return MessageRecord(id=tracking_id, created_at=T0, envelope=envelope)


class CountingStore(MemoryStore):
    """A MemoryStore that counts how often message bytes are read back."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def content(self, tracking_id: str) -> bytes:
        self.reads += 1
        return super().content(tracking_id)


def test_built_messages_are_held_in_memory_and_file_messages_are_not(tmp_path: Path) -> None:
    path = tmp_path / "m.eml"
    path.write_bytes(message().as_bytes())
    assert held_in_memory(message())
    assert held_in_memory(Message.from_bytes(message().as_bytes()))
    assert not held_in_memory(Message.from_file(path))


def test_put_many_keeps_exactly_the_messages_held_in_memory(tmp_path: Path) -> None:
    # put_many writes held_in_memory's test out; it must keep the same messages.
    path = tmp_path / "m.eml"
    path.write_bytes(message().as_bytes())
    messages = {
        "built": message(),
        "file": Message.from_file(path),
        "bytes": Message.from_bytes(message(1).as_bytes()),
    }
    cache = MessageCache(1 << 20)
    cache.put_many([(m, record(name)) for name, m in messages.items()])
    kept = {name for name in messages if cache.take(name) is not None}
    assert kept == {name for name, m in messages.items() if held_in_memory(m)}
    assert kept == {"built", "bytes"}


def test_cache_takes_each_message_once() -> None:
    cache = MessageCache(1 << 20)
    first = message()
    cache.put(first, record("a"))
    assert len(cache) == 1
    assert cache.take("a") == (first, record("a"))
    assert cache.take("a") is None
    assert cache.take("unknown") is None


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=5), max_size=20), st.integers(0, 3))
def test_cache_never_holds_more_than_its_bytes(keys: list[int], fit: int) -> None:
    same = message()
    cache = MessageCache(same.size * fit)
    for key in keys:
        cache.put(same, record(str(key)))
        assert len(cache) <= fit
    # The most recently added (distinct) keys are the ones kept.
    recent = list(dict.fromkeys(reversed([str(k) for k in keys])))[:fit]
    for kept in recent:
        assert cache.take(kept) is not None
    assert len(cache) == 0


def test_cache_refuses_a_negative_size_and_clears() -> None:
    with pytest.raises(ValueError, match="negative"):
        MessageCache(-1)
    cache = MessageCache(1 << 20)
    cache.put(message(), record("a"))
    cache.clear()
    assert cache.take("a") is None


@pytest.mark.parametrize(("cache_bytes", "reads"), [(16 << 20, 0), (0, 3)])
def test_tracker_sends_the_submitted_object_without_reading_it_back(
    cache_bytes: int, reads: int
) -> None:
    store = CountingStore()
    transport = MemoryTransport()
    tracker = DeliveryTracker(transport, store, message_cache=cache_bytes)
    sent = [message(i) for i in range(3)]
    tracker.submit(sent[0])
    tracker.submit_many(sent[1:])
    assert tracker.run_pending().delivered == 3
    assert store.reads == reads
    # Due at the same time, messages go in tracking id order: compare as sets.
    assert {item.message.as_bytes() for item in transport.outbox} == {m.as_bytes() for m in sent}
    assert len(tracker.messages) == 0


def test_a_retry_reads_the_stored_copy() -> None:
    store = CountingStore()
    clock = [T0]
    transport = MemoryTransport(lambda _m, e: {e.recipients[0].address: Outcome.TRANSIENT})
    tracker = DeliveryTracker(transport, store, clock=lambda: clock[0], random=lambda: 0.5)
    tracking_id = tracker.submit(message())
    assert tracker.run_pending().deferred == 1
    assert store.reads == 0
    transport.handler = None
    clock[0] = T0 + dt.timedelta(hours=1)
    assert tracker.run_pending().delivered == 1
    assert store.reads == 1
    assert tracker.status(tracking_id).recipients[0].state is State.DELIVERED


def test_a_file_message_is_sent_as_stored_even_if_its_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "m.eml"
    original = message(text="the original\n")
    path.write_bytes(original.as_bytes())
    store = SQLiteStore(tmp_path / "t.db")
    transport = MemoryTransport()
    tracker = DeliveryTracker(transport, store)
    tracker.submit(Message.from_file(path))
    assert len(tracker.messages) == 0
    path.unlink()
    assert tracker.run_pending().delivered == 1
    assert transport.outbox[0].message.as_bytes() == original.as_bytes()
    tracker.close()


def test_async_tracker_uses_the_cache_too() -> None:
    store = CountingStore()
    transport = MemoryTransport()
    tracker = AsyncDeliveryTracker(transport, store)

    async def scenario() -> int:
        await tracker.asubmit(message())
        summary = await tracker.arun_pending()
        return summary.delivered

    assert run(scenario()) == 1
    assert store.reads == 0


def test_a_held_message_whose_recipients_have_a_history_is_read_back() -> None:
    store = CountingStore()
    transport = MemoryTransport()
    tracker = DeliveryTracker(transport, store)
    events: list[TrackerEvent] = []
    tracker.on("delivered", events.append)
    tracking_id = tracker.submit(message())
    recipient = tracker.status(tracking_id).recipients[0].address
    note = Attempt(at=T0, text="DSN delayed", source="dsn")
    store.apply(
        tracking_id,
        [Change(address=recipient, state=State.QUEUED, attempt=note, expect=frozenset())],
    )
    assert tracker.run_pending().delivered == 1
    # The held message is still sent (no bytes read), but the record came from the store.
    assert store.reads == 0
    assert events[0].recipient is not None
    assert events[0].recipient.attempts[0] == note
    assert [a.source for a in events[0].recipient.attempts] == ["dsn", "reply"]


def test_large_messages_are_not_kept() -> None:
    big = Message.build(
        sender="sender@example.com", to=["r@example.org"], subject="s", text="x" * MAX_KEPT
    )
    cache = MessageCache(16 << 20)
    cache.put(big, record("big"))
    assert cache.take("big") is None
    cache.put(message(), record("small"))
    assert cache.take("small") is not None
