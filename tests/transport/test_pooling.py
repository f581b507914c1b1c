"""The pool policy shared by the blocking and asyncio transports, without any I/O."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.address import Address
from mailrelay.envelope import Envelope
from mailrelay.errors import (
    ConnectError,
    ConnectionLost,
    DeliveryError,
    SessionRefused,
    TransportClosed,
)
from mailrelay.flow import BatchOutcome, Session, SessionConfig
from mailrelay.message import Message
from mailrelay.options import TLS, Timeouts
from mailrelay.reply import Reply
from mailrelay.results import DeliveryResult, Outcome, RecipientResult
from mailrelay.transport.base import failed_result
from mailrelay.transport.pooling import (
    ExchangerPool,
    IdleVerdict,
    PooledConnection,
    PoolPolicy,
    Settlement,
    greeting_hint,
    is_stale_connection_error,
    unanswered,
)
from mailrelay.transport.settings import ConnectionSettings, PoolSettings

POOL = PoolSettings(size=2, max_messages=3, idle_timeout=30.0, health_check_after=5.0)
POLICY = PoolPolicy(pool=POOL, peer="mx.example:25")


class FakeDriver:
    """Only what the policy reads of a driver."""

    def __init__(self, *, closed: bool = False) -> None:
        self.closed = closed

    def has_input(self) -> bool:
        return False


def connection(
    *, last_used: float = 100.0, messages: int = 0, driver_closed: bool = False
) -> PooledConnection[FakeDriver]:
    session = Session(SessionConfig(local_hostname="client.example", server_hostname="mx.example"))
    pooled = PooledConnection(FakeDriver(closed=driver_closed), session)
    pooled.last_used = last_used
    pooled.messages = messages
    return pooled


def accepted(n: int) -> DeliveryResult:
    address = Address.parse(f"user{n}@example.com")
    reply = Reply.of(250, "2.0.0 ok")
    return DeliveryResult(
        recipients=(RecipientResult(address=address, outcome=Outcome.ACCEPTED, reply=reply),)
    )


STALE = ConnectionLost("the server closed the connection", host="mx.example:25")
GOODBYE = SessionRefused("closing", reply=Reply.of(421, "4.4.2 bye"), host="mx.example:25")
BUSY = SessionRefused("busy", reply=Reply.of(450, "4.3.2 try later"), host="mx.example:25")
REFUSED = ConnectError("could not connect", host="mx.example:25")


@pytest.mark.parametrize(
    ("error", "stale"),
    [(STALE, True), (GOODBYE, True), (BUSY, False), (REFUSED, False)],
)
def test_which_errors_mean_a_stale_connection(error: DeliveryError, stale: bool) -> None:
    assert is_stale_connection_error(error) is stale


@pytest.mark.parametrize(
    ("idle", "driver_closed", "session_closed", "verdict"),
    [
        (0.0, False, False, IdleVerdict.REUSE),
        (5.0, False, False, IdleVerdict.REUSE),  # not *longer* than health_check_after
        (5.1, False, False, IdleVerdict.CHECK),
        (30.0, False, False, IdleVerdict.CHECK),
        (30.1, False, False, IdleVerdict.DISCARD),
        (0.0, True, False, IdleVerdict.DISCARD),
        (0.0, False, True, IdleVerdict.DISCARD),
        (10.0, True, True, IdleVerdict.DISCARD),
    ],
)
def test_idle_verdict(
    idle: float, driver_closed: bool, session_closed: bool, verdict: IdleVerdict
) -> None:
    pooled = connection(last_used=100.0, driver_closed=driver_closed)
    pooled.session.closed = session_closed
    assert POLICY.idle_verdict(pooled, 100.0 + idle) is verdict


@pytest.mark.parametrize(("idle", "expired"), [(0.0, False), (30.0, False), (30.5, True)])
def test_expiry(idle: float, expired: bool) -> None:
    assert POLICY.expired(connection(last_used=10.0), 10.0 + idle) is expired


@pytest.mark.parametrize(
    ("messages", "driver_closed", "keeps", "full", "room"),
    [
        (0, False, True, False, 3),
        (2, False, True, False, 1),
        (3, False, False, True, 1),
        (5, False, False, True, 1),
        (1, True, False, False, 2),
    ],
)
def test_per_connection_message_limit(
    messages: int, driver_closed: bool, keeps: bool, full: bool, room: int
) -> None:
    pooled = connection(messages=messages, driver_closed=driver_closed)
    assert POLICY.keeps(pooled) is keeps
    assert POLICY.full(pooled) is full
    assert POLICY.room(pooled) == room


@pytest.mark.parametrize(
    ("error", "reused", "resend"),
    [
        (STALE, True, True),
        (GOODBYE, True, True),
        (STALE, False, False),
        (GOODBYE, False, False),
        (BUSY, True, False),
    ],
)
def test_resend_only_after_a_reused_connection_died(
    error: DeliveryError, reused: bool, resend: bool
) -> None:
    assert POLICY.resend_on_fresh(error, reused=reused) is resend


def test_closed_error_names_the_transport_and_peer() -> None:
    error = POLICY.closed_error("SMTPTransport")
    assert isinstance(error, TransportClosed)
    assert "SMTPTransport for mx.example:25 is closed" in str(error)


@pytest.mark.parametrize(
    ("answers", "error", "carried", "answered", "failure"),
    [
        # Everything answered: nothing failed, whatever the error.
        (2, None, 0, 2, None),
        (2, STALE, 0, 2, None),
        # A stale end after messages were carried (before or in this run): sent again.
        (0, STALE, 1, 0, None),
        (1, STALE, 0, 1, None),
        (1, GOODBYE, 0, 1, None),
        # A stale end on a connection that carried nothing: the first unanswered fails.
        (0, STALE, 0, 0, STALE),
        # Not a stale end: the first unanswered fails, even on a used connection.
        (1, BUSY, 4, 1, BUSY),
    ],
)
def test_settle(
    answers: int,
    error: DeliveryError | None,
    carried: int,
    answered: int,
    failure: DeliveryError | None,
) -> None:
    sent = 2
    results = tuple(accepted(n) for n in range(answers)) + (None,) * (sent - answers)
    settlement = POLICY.settle(
        BatchOutcome(results=results, error=error), sent=sent, carried=carried
    )
    assert settlement.answered == results[:answered]
    assert settlement.failure is failure
    assert settlement.done == answered + (failure is not None)


def run_of(size: int) -> list[tuple[Message, Envelope]]:
    pairs = []
    for n in range(size):
        message = Message.build(sender="alice@example.org", to=[f"user{n}@example.com"], text="hi")
        pairs.append((message, Envelope.from_message(message)))
    return pairs


@pytest.mark.parametrize(
    ("answered", "failure"), [(0, None), (2, None), (0, STALE), (1, BUSY), (2, BUSY)]
)
def test_a_settlement_gives_the_settled_items_their_results(
    answered: int, failure: DeliveryError | None
) -> None:
    run = run_of(3)
    answers = tuple(accepted(n) for n in range(answered))
    settled = Settlement(answered=answers, failure=failure).results(run)
    assert len(settled) == Settlement(answered=answers, failure=failure).done
    assert settled[:answered] == answers
    if failure is not None:
        # The first unanswered item: each of its recipients carries the error.
        failed = settled[answered]
        message, envelope = run[answered]
        assert failed == failed_result(message, envelope, failure)
        assert [r.address for r in failed.recipients] == [r.address for r in envelope.recipients]
        assert {r.outcome for r in failed.recipients} == {Outcome.TRANSIENT}


@pytest.mark.parametrize(
    ("tls", "received", "hinted"),
    [
        (TLS.STARTTLS, 0, True),
        (TLS.NONE, 0, True),
        (TLS.STARTTLS, 12, False),  # the server spoke first: not the implicit-TLS mistake
        (TLS.IMPLICIT, 0, False),  # already TLS from the first byte
    ],
)
def test_the_implicit_tls_hint_only_for_a_silent_plain_connection(
    tls: TLS, received: int, hinted: bool
) -> None:
    settings = ConnectionSettings(host="mail.example", port=2525, tls=tls, timeouts=Timeouts())
    hint = greeting_hint(STALE, settings, received)
    if hinted:
        assert hint is not None
        assert hint.host == "mail.example:2525"
        assert str(hint).startswith(f"{STALE} without a greeting")
    else:
        assert hint is None


def test_unanswered_outcome() -> None:
    outcome = unanswered(3, STALE)
    assert outcome.results == (None, None, None)
    assert outcome.error is STALE
    assert POLICY.settle(outcome, sent=3, carried=0) == Settlement(answered=(), failure=STALE)


@given(
    answered=st.integers(min_value=0, max_value=6),
    tail=st.lists(st.booleans(), max_size=6),
    error=st.sampled_from([None, STALE, GOODBYE, BUSY]),
    carried=st.integers(min_value=0, max_value=5),
)
def test_settle_takes_the_answered_prefix_and_fails_at_most_one(
    answered: int, tail: list[bool], error: DeliveryError | None, carried: int
) -> None:
    # After the first unanswered message, later entries may be results or None.
    results: tuple[DeliveryResult | None, ...] = tuple(accepted(n) for n in range(answered))
    if tail:
        results += (None, *(accepted(n) if has else None for n, has in enumerate(tail[1:])))
    settlement = POLICY.settle(
        BatchOutcome(results=results, error=error), sent=len(results), carried=carried
    )
    assert settlement.answered == results[:answered]
    assert settlement.done <= len(results)
    if settlement.failure is not None:
        assert settlement.failure is error
        assert len(results) > answered
    if error is None or len(results) == answered:
        assert settlement.failure is None
    elif error is BUSY or carried + answered == 0:
        assert settlement.failure is error
    else:  # a stale end after messages went through: the rest go on a fresh connection
        assert settlement.failure is None


def test_decisions_are_logged_to_the_given_logger(caplog: pytest.LogCaptureFixture) -> None:
    policy = PoolPolicy(pool=POOL, peer="mx.example:25", logger=logging.getLogger("a.transport"))
    with caplog.at_level(logging.INFO, logger="a.transport"):
        assert policy.resend_on_fresh(STALE, reused=True)
    assert [record.name for record in caplog.records] == ["a.transport"]
    assert "sending on a fresh one" in caplog.text


# -- the keyed pool of idle sessions (the MX transports') ----------------------------------------

KEYED = PoolSettings(size=3, max_messages=10, idle_timeout=5.0, health_check_after=2.0)


@pytest.mark.parametrize(
    ("idle", "found", "check"),
    [(0.5, True, False), (3.0, True, True), (6.0, False, False)],
)
def test_keyed_take_reuses_checks_or_discards_by_idle_time(
    idle: float, found: bool, check: bool
) -> None:
    pool: ExchangerPool[PooledConnection[FakeDriver]] = ExchangerPool(KEYED)
    pooled = connection(last_used=0.0)
    assert pool.put("k", pooled, 0.0) == []
    taken, must_check, stale = pool.take("k", idle)
    assert (taken is pooled, must_check, stale == [pooled]) == (found, check, not found)
    assert pool.take("other", idle)[0] is None


def test_keyed_put_hands_back_what_may_not_be_kept() -> None:
    pool: ExchangerPool[PooledConnection[FakeDriver]] = ExchangerPool(KEYED)
    worn = connection(messages=10)  # max_messages reached
    assert pool.put("k", worn, 1.0) == [worn]
    dead = connection(driver_closed=True)
    assert pool.put("k", dead, 1.0) == [dead]
    old = connection()
    assert pool.put("a", old, 0.0) == []
    fresh = connection()
    assert pool.put("b", fresh, 6.0) == [old]  # expired meanwhile
    pool.closed = True
    late = connection()
    assert pool.put("b", late, 6.0) == [late]
    assert pool.drain() == [fresh]
    assert len(pool) == 0


@given(st.lists(st.sampled_from("abcd"), max_size=30))
def test_the_keyed_pool_keeps_the_most_recent_sessions_up_to_its_size(keys: list[str]) -> None:
    pool: ExchangerPool[PooledConnection[FakeDriver]] = ExchangerPool(KEYED)
    put: list[PooledConnection[FakeDriver]] = []
    for index, key in enumerate(keys):
        pooled = connection()
        put.append(pooled)
        leaving = pool.put(key, pooled, index / 10)  # never expired
        assert pooled not in leaving
        assert len(pool) == min(len(put), KEYED.size)
    # The least recently used left first: what is kept is the last ones put.
    kept = pool.drain()
    assert {id(c) for c in kept} == {id(c) for c in put[-KEYED.size :]}
