"""Review 72: an attempt's text, once cut to MAX_ATTEMPT_TEXT, reads back as it was kept.

The bound was applied again to a text that was already cut (its " [... N characters not
kept]" note makes it longer than the bound): each time a store built the attempt from its
row, the note was cut off and replaced by a wrong one ("[... 30 characters not kept]" for a
reply that lost 5,904), so the recorded count of what was lost was itself lost, and
``status()`` read from SQLite disagreed with the attempt the tracker had recorded.
"""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from mailrelay.reply import Reply
from mailrelay.tracker.engine import DeliveryTracker
from mailrelay.tracker.sqlite_store import SQLiteStore
from mailrelay.tracker.store import MAX_ATTEMPT_TEXT, Attempt, State
from mailrelay.transport.memory import MemoryTransport
from tests.tracker.test_engine import T0, FakeClock, message, no_jitter, scripted


@given(st.text(max_size=10), st.integers(min_value=0, max_value=20_000))
def test_bounding_twice_changes_nothing(unit: str, length: int) -> None:
    text = (unit or "x") * (length // max(len(unit), 1) + 1)
    once = Attempt(at=T0, text=text).text
    assert Attempt(at=T0, text=once).text == once


def test_a_cut_reply_reads_back_from_sqlite_with_its_true_count(tmp_path: Path) -> None:
    reply = Reply.of(450, "4.2.0 " + "x" * 10_000)
    lost = len(reply.text) - MAX_ATTEMPT_TEXT
    transport = MemoryTransport(scripted({"r@example.org": reply}))
    store = SQLiteStore(tmp_path / "t.db")
    tracker = DeliveryTracker(transport, store, clock=FakeClock(), random=no_jitter)
    tracking_id = tracker.submit(message(("r@example.org",)))
    assert tracker.run_pending().deferred == 1
    (record,) = tracker.status(tracking_id).recipients
    assert record.state is State.DEFERRED
    (attempt,) = record.attempts
    assert attempt.text == reply.text[:MAX_ATTEMPT_TEXT] + f" [... {lost} characters not kept]"
    store.close()
