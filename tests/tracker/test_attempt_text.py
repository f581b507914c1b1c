"""An attempt keeps at most MAX_ATTEMPT_TEXT characters of a reply: a server answering
every RCPT with a 64 KiB reply must not grow the store by 64 KiB per recipient and retry."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.reply import Reply
from mailrelay.tracker.engine import DeliveryTracker
from mailrelay.tracker.retry import RetryPolicy
from mailrelay.tracker.sqlite_store import SQLiteStore
from mailrelay.tracker.store import (
    MAX_ATTEMPT_HOST,
    MAX_ATTEMPT_TEXT,
    Attempt,
    MemoryStore,
    State,
    Store,
)
from mailrelay.transport.memory import MemoryTransport
from tests.tracker.test_engine import T0, FakeClock, message, no_jitter, scripted

RECIPIENTS = tuple(f"r{n}@example.org" for n in range(20))
ROUNDS = 5


NO_NUL = st.characters(exclude_characters="\0")


@given(st.text(NO_NUL, max_size=MAX_ATTEMPT_TEXT))
def test_a_text_within_the_bound_is_kept_whole(text: str) -> None:
    assert Attempt(at=T0, text=text).text == text


@given(st.text(NO_NUL, min_size=1, max_size=200), st.integers(min_value=1, max_value=100_000))
def test_a_longer_text_keeps_its_start_and_says_how_much_was_cut(unit: str, repeat: int) -> None:
    text = (unit * (MAX_ATTEMPT_TEXT // len(unit) + 1 + repeat))[: MAX_ATTEMPT_TEXT + repeat]
    kept = Attempt(at=T0, text=text).text
    assert kept.startswith(text[:MAX_ATTEMPT_TEXT])
    assert kept.endswith(f" [... {repeat} characters not kept]")
    assert len(kept) < MAX_ATTEMPT_TEXT + 64


def huge_reply() -> Reply:
    """16 lines of 4,000 characters: what the reply reader takes (64 KiB) and no more."""
    return Reply(code=450, lines=tuple(f"4.2.0 busy {n:02} " + "x" * 3985 for n in range(16)))


@pytest.mark.parametrize("persist", [True, False])
def test_retries_of_a_server_sending_huge_replies_keep_the_store_small(
    tmp_path: Path, persist: bool
) -> None:
    reply = huge_reply()
    assert len(reply.text) > 60_000
    answers = [dict.fromkeys(RECIPIENTS, reply) for _ in range(ROUNDS)]
    transport = MemoryTransport(scripted(*answers))
    clock = FakeClock()
    path = tmp_path / "tracker.db"
    store = SQLiteStore(path)
    tracker = DeliveryTracker(
        transport,
        store,
        clock=clock,
        random=no_jitter,
        worker_id="w1",
        retry=RetryPolicy(initial=60, max_delay=60),
    )
    tracking_id = tracker.submit(message(RECIPIENTS))
    for _ in range(ROUNDS):
        assert tracker.run_pending().deferred == len(RECIPIENTS)
        clock.advance(61)
    status = tracker.status(tracking_id)
    for record in status.recipients:
        assert record.state is State.DEFERRED
        assert len(record.attempts) == ROUNDS
        for attempt in record.attempts:
            assert attempt.code == 450
            assert attempt.text.startswith("4.2.0 busy 00 ")  # the start is what matters
            assert "characters not kept" in attempt.text
            assert len(attempt.text) < MAX_ATTEMPT_TEXT + 64
    store.close()
    if persist:
        # Whole, the replies would take 20 recipients x 5 rounds x 64 KiB = 6.4 MB.
        stored = sum(p.stat().st_size for p in tmp_path.iterdir())
        assert stored < len(RECIPIENTS) * ROUNDS * 2 * MAX_ATTEMPT_TEXT
        reopened = SQLiteStore(path)
        stored_record = reopened.get(tracking_id)
        assert stored_record is not None
        assert stored_record.recipients[0].attempts[0].text == status.recipients[0].attempts[0].text
        reopened.close()


@pytest.mark.parametrize("store_kind", ["memory", "sqlite", "postgres"])
def test_a_reply_holding_nul_is_recorded_in_every_store(
    request: pytest.FixtureRequest, tmp_path: Path, store_kind: str
) -> None:
    """PostgreSQL's text cannot hold NUL: a server that puts one in its reply made
    run_pending raise there, and the recipient stayed SENDING with no attempt."""
    store: Store
    if store_kind == "postgres":
        store = request.getfixturevalue("postgres_store")
    else:
        store = MemoryStore() if store_kind == "memory" else SQLiteStore(tmp_path / "t.db")
    refusal = Reply.of(550, "5.1.1 no\x00such user")
    transport = MemoryTransport(scripted(dict.fromkeys(RECIPIENTS[:2], refusal)))
    tracker = DeliveryTracker(transport, store, clock=FakeClock(), random=no_jitter)
    tracking_id = tracker.submit(message(RECIPIENTS[:2]))
    assert tracker.run_pending().bounced == 2
    for record in tracker.status(tracking_id).recipients:
        assert record.state is State.BOUNCED
        (attempt,) = record.attempts
        assert attempt.text == "5.1.1 no\ufffdsuch user"


def test_a_hostile_host_is_bounded() -> None:
    attempt = Attempt(at=T0, host="mx\x00" + "h" * 100_000)
    assert attempt.host is not None
    assert attempt.host.startswith("mx\ufffdhhh")
    assert len(attempt.host) == MAX_ATTEMPT_HOST
