"""RetryPolicy schedules and DomainShaper limits, with injected time and randomness."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.address import Address
from mailrelay.reply import Reply
from mailrelay.tracker.retry import DomainLimits, DomainShaper, RetryPolicy

T0 = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
A = Address.parse("a@example.org")


def middle() -> float:
    return 0.5


@pytest.mark.parametrize(
    ("policy", "delays"),
    [
        (RetryPolicy(), [300, 600, 1200, 2400, 4800, 9600, 14400, 14400]),
        (RetryPolicy(initial=60, factor=3, max_delay=1000), [60, 180, 540, 1000, 1000]),
        (RetryPolicy(initial=10, factor=1), [10, 10, 10]),
        (
            RetryPolicy(initial=dt.timedelta(minutes=1), max_delay=dt.timedelta(minutes=3)),
            [60, 120, 180],
        ),
    ],
)
def test_delays_grow_to_the_cap(policy: RetryPolicy, delays: list[float]) -> None:
    assert [policy.delay(n, middle) for n in range(1, len(delays) + 1)] == delays


@given(
    st.integers(min_value=1, max_value=200),
    st.floats(min_value=0.0, max_value=0.999999),
    st.floats(min_value=0.0, max_value=1.0),
)
def test_jitter_stays_in_its_band_and_under_the_cap(retry: int, draw: float, jitter: float) -> None:
    policy = RetryPolicy(initial=100, factor=2, max_delay=5000, jitter=jitter)
    base = min(5000.0, 100.0 * 2.0 ** (retry - 1)) if retry < 64 else 5000.0
    delay = policy.delay(retry, lambda: draw)
    assert base * (1 - jitter) - 1e-9 <= delay <= min(5000.0, base * (1 + jitter)) + 1e-9


@given(
    st.integers(min_value=1, max_value=50),
    st.floats(min_value=0, max_value=10 * 86400),
)
def test_next_attempt_never_passes_the_deadline(retry: int, age: float) -> None:
    policy = RetryPolicy(max_age=5 * 86400)
    now = T0 + dt.timedelta(seconds=age)
    when = policy.next_attempt(
        recipient=A, reply=None, retry=retry, created_at=T0, now=now, random=middle
    )
    deadline = T0 + dt.timedelta(days=5)
    if now >= deadline:
        assert when is None
    else:
        assert when is not None
        assert now <= when <= deadline


def test_the_default_maximum_age_is_five_days() -> None:
    # RFC 5321 §4.5.4.1: give up after 4-5 days.
    assert RetryPolicy().max_age == 5 * 86400


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (Reply.of(452, "4.2.2 mailbox full"), dt.timedelta(hours=12)),
        (Reply.of(451, "4.3.0 later"), dt.timedelta(minutes=5)),
        (None, dt.timedelta(minutes=5)),
    ],
)
def test_the_hook_decides_or_defers_to_the_schedule(
    reply: Reply | None, expected: dt.timedelta
) -> None:
    def hook(recipient: Address, reply: Reply | None) -> dt.timedelta | None:
        if reply is not None and str(reply.enhanced) == "4.2.2":
            return dt.timedelta(hours=12)
        return None

    policy = RetryPolicy(hook=hook)
    when = policy.next_attempt(
        recipient=A, reply=reply, retry=1, created_at=T0, now=T0, random=middle
    )
    assert when == T0 + expected


@pytest.mark.parametrize(
    "kwargs",
    [{"initial": 0}, {"factor": 0.5}, {"jitter": 1.5}, {"max_age": -1}, {"max_delay": 0}],
)
def test_bad_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 -- attrs validators word it variously
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_retries_count_from_one() -> None:
    with pytest.raises(ValueError, match="from 1"):
        RetryPolicy().delay(0, middle)


# -- DomainShaper ---------------------------------------------------------------------


def test_concurrency_limit() -> None:
    shaper = DomainShaper(DomainLimits(max_concurrent=2, busy_delay=3))
    assert shaper.acquire("Example.ORG", T0) is None
    assert shaper.acquire("example.org", T0) is None
    assert shaper.acquire("example.org", T0) == T0 + dt.timedelta(seconds=3)
    assert shaper.acquire("other.example", T0) is None
    assert shaper.in_flight("example.org") == 2
    shaper.release("example.org", T0, refused=None)
    assert shaper.acquire("example.org", T0) is None


def test_rate_limit_spaces_transactions() -> None:
    shaper = DomainShaper(DomainLimits(per_second=4))
    assert shaper.acquire("example.org", T0) is None
    shaper.release("example.org", T0, refused=False)
    assert shaper.acquire("example.org", T0) == T0 + dt.timedelta(seconds=0.25)
    assert shaper.acquire("example.org", T0 + dt.timedelta(seconds=0.25)) is None


def test_backoff_doubles_to_its_cap_and_resets_on_success() -> None:
    shaper = DomainShaper(DomainLimits(backoff_initial=10, backoff_max=35))
    holds = []
    now = T0
    for _ in range(4):
        assert shaper.acquire("example.org", now) is None
        shaper.release("example.org", now, refused=True)
        blocked = shaper.blocked_until("example.org")
        assert blocked is not None
        holds.append((blocked - now).total_seconds())
        assert shaper.acquire("example.org", now) == blocked
        now = blocked
    assert holds == [10, 20, 35, 35]
    assert shaper.acquire("example.org", now) is None
    shaper.release("example.org", now, refused=False)
    assert shaper.blocked_until("example.org") is None


def test_per_domain_overrides() -> None:
    shaper = DomainShaper(
        DomainLimits(max_concurrent=1), per_domain={"Big.Example": DomainLimits(max_concurrent=3)}
    )
    assert [shaper.acquire("big.example", T0) for _ in range(3)] == [None, None, None]
    assert shaper.acquire("small.example", T0) is None
    assert shaper.acquire("small.example", T0) is not None
