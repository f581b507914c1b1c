"""An adversarial review of the delivery tracker (session 10).

Each test either reproduces a bug found in review (now fixed; its commit names it) or
pins a property that was probed and held. Bugs: a retry policy hook that raised or
returned a non-finite, negative or enormous delay threw the whole transaction away (its
accepted recipients were sent again on every run, nothing was recorded, so the message
never expired, and the runner stopped).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mailrelay.address import Address
from mailrelay.errors import SessionRefused
from mailrelay.reply import Reply
from mailrelay.tracker.engine import DeliveryTracker
from mailrelay.tracker.retry import DomainLimits, DomainShaper, RetryPolicy
from mailrelay.tracker.sqlite_store import SQLiteStore
from mailrelay.tracker.store import MemoryStore, State, Store
from mailrelay.transport.memory import MemoryTransport
from tests.tracker.test_engine import T0, FakeClock, message, no_jitter, scripted


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    made: Store = MemoryStore() if request.param == "memory" else SQLiteStore(tmp_path / "t.db")
    yield made
    made.close()


# -- the retry policy's hook ----------------------------------------------------------


def _raises(_recipient: Address, _reply: Reply | None) -> float:
    raise ValueError("a bug in the application's hook")


def _returns(value: object) -> Callable[[Address, Reply | None], object]:
    return lambda _recipient, _reply: value


SCHEDULE = T0 + dt.timedelta(minutes=5)  # the first retry of the default schedule
DEADLINE = T0 + dt.timedelta(days=5)  # the default maximum age


@pytest.mark.parametrize(
    ("hook", "due"),
    [
        pytest.param(_raises, SCHEDULE, id="raises"),
        pytest.param(_returns(float("nan")), SCHEDULE, id="nan"),
        pytest.param(_returns(-60.0), SCHEDULE, id="negative"),
        pytest.param(_returns(dt.timedelta(seconds=-1)), SCHEDULE, id="negative-timedelta"),
        pytest.param(_returns("soon"), SCHEDULE, id="not-a-number"),
        pytest.param(_returns(float("inf")), DEADLINE, id="infinite"),
        pytest.param(_returns(1e300), DEADLINE, id="enormous"),
        pytest.param(_returns(10**400), DEADLINE, id="enormous-int"),
        pytest.param(_returns(dt.timedelta.max), DEADLINE, id="timedelta-max"),
    ],
)
def test_a_hook_that_raises_or_talks_nonsense_falls_back_and_stops_nothing(
    store: Store,
    hook: Callable[[Address, Reply | None], object],
    due: dt.datetime,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The hook is the application's code: when it raises or returns no usable delay,
    the recipient still gets a decision (the schedule's delay; an infinite or enormous
    one is held to the deadline), the other recipients keep theirs, the run goes on, and
    nothing is sent twice."""
    clock = FakeClock()
    transport = MemoryTransport(scripted({"b@example.net": Reply.of(451, "4.3.0 try later")}))
    tracker = DeliveryTracker(
        transport,
        store,
        clock=clock,
        random=no_jitter,
        worker_id="w1",
        retry=RetryPolicy(hook=hook),  # type: ignore[arg-type]
    )
    tracking_id = tracker.submit(message())
    with caplog.at_level(logging.WARNING, logger="mailrelay.tracker.retry"):
        summary = tracker.run_pending()
    assert (summary.delivered, summary.deferred) == (1, 1)
    a, b = tracker.status(tracking_id).recipients
    assert a.state is State.DELIVERED
    assert b.state is State.DEFERRED
    assert b.next_attempt_at == due
    assert len(transport.outbox) == 1  # nothing sent twice
    if due == SCHEDULE:
        assert any("retry hook" in r.getMessage() for r in caplog.records)


def test_a_hook_that_asks_for_no_wait_is_still_obeyed(store: Store) -> None:
    """Zero is a delay the hook may choose (try again at once); only nonsense is refused."""
    policy = RetryPolicy(hook=_returns(0.0))  # type: ignore[arg-type]
    when = policy.next_attempt(
        recipient=Address.parse("a@example.org"),
        reply=None,
        retry=1,
        created_at=T0,
        now=T0 + dt.timedelta(hours=1),
        random=no_jitter,
    )
    assert when == T0 + dt.timedelta(hours=1)


# -- a clock that goes backwards ------------------------------------------------------


def test_a_clock_stepped_back_does_not_stretch_a_domains_hold_off(store: Store) -> None:
    """A domain held off for 60 s, then the clock steps back a day (an NTP correction, a
    VM restored): the hold-off is still 60 s from now, not a day and 60 s, and the
    recipients it puts back (whose due time is stored, and outlives the process) are due
    then."""
    clock = FakeClock(T0 + dt.timedelta(days=1))
    busy = SessionRefused("busy", reply=Reply.of(421, "4.7.0 too many connections"))
    transport = MemoryTransport(scripted(busy))
    tracker = DeliveryTracker(
        transport,
        store,
        clock=clock,
        random=no_jitter,
        worker_id="w1",
        split_by_domain=True,
        limits=DomainLimits(backoff_initial=60),
        retry=RetryPolicy(initial=10, jitter=0),
    )
    first = tracker.submit(message(("a@one.example",)))
    tracker.run_pending()  # refused: one.example held off for 60 s
    clock.now = T0  # a day back
    second = tracker.submit(message(("b@one.example",)))
    assert tracker.run_pending().postponed == 1
    held = tracker.status(second).recipients[0]
    assert (held.state, held.attempts) == (State.QUEUED, ())
    assert held.next_attempt_at == T0 + dt.timedelta(seconds=60)
    clock.advance(60)
    assert tracker.run_pending().delivered == 1
    assert tracker.status(second).recipients[0].state is State.DELIVERED
    # The refused recipient's own retry was stored by the clock of its attempt (10 s
    # after it, a day ahead): the store keeps due times, whatever the clock does later.
    assert tracker.status(first).recipients[0].next_attempt_at == T0 + dt.timedelta(
        days=1, seconds=10
    )


def test_a_clock_stepped_back_does_not_stretch_a_rate_limit() -> None:
    """``per_second`` spaces transactions from the last one: a step back leaves the next
    slot at most one spacing away."""
    shaper = DomainShaper(DomainLimits(per_second=0.5))
    later = T0 + dt.timedelta(days=1)
    assert shaper.acquire("one.example", later) is None
    shaper.release("one.example", later, refused=None)
    assert shaper.acquire("one.example", T0) == T0 + dt.timedelta(seconds=2)
    assert shaper.acquire("one.example", T0 + dt.timedelta(seconds=2)) is None
