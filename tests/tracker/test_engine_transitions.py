"""The tracker's state transitions (mailrelay.tracker.transitions): pure decisions, no I/O."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.address import Address
from mailrelay.envelope import Envelope
from mailrelay.errors import (
    AuthenticationError,
    ConnectError,
    DeliveryError,
    NoRoute,
    SessionRefused,
    TLSError,
)
from mailrelay.message import Message
from mailrelay.reply import Reply
from mailrelay.results import DeliveryResult, Outcome, RecipientResult
from mailrelay.tracker.retry import RetryPolicy
from mailrelay.tracker.store import Attempt, MessageRecord, RecipientRecord, State
from mailrelay.tracker.transitions import from_error, from_result, put_back
from mailrelay.transport.base import failed_result

T0 = dt.datetime(2026, 3, 1, 8, 0, tzinfo=dt.UTC)
A = Address.parse("a@example.org")
B = Address.parse("b@example.net")
REPLIES = {
    Outcome.ACCEPTED: Reply.of(250, "2.0.0 ok"),
    Outcome.TRANSIENT: Reply.of(450, "4.2.0 busy"),
    Outcome.PERMANENT: Reply.of(550, "5.1.1 no such user"),
}


def record(*attempts: tuple[Attempt, ...], created: dt.datetime = T0) -> MessageRecord:
    envelope = Envelope("sender@example.com", [A, B])
    histories = list(attempts) + [()] * (2 - len(attempts))
    return MessageRecord(
        id="m1",
        created_at=created,
        envelope=envelope,
        recipients=tuple(
            RecipientRecord(address=r.address, state=State.SENDING, attempts=history)
            for r, history in zip(envelope.recipients, histories, strict=True)
        ),
    )


def result(*outcomes: Outcome, code: int | None = None) -> DeliveryResult:
    replies = [REPLIES[o] if code is None else Reply.of(code, "x") for o in outcomes]
    return DeliveryResult(
        recipients=tuple(
            RecipientResult(address=address, outcome=outcome, reply=reply)
            for address, outcome, reply in zip([A, B], outcomes, replies, strict=False)
        ),
        host="mx:25",
    )


def decide(rec: MessageRecord, res: DeliveryResult, now: dt.datetime = T0) -> tuple[object, ...]:
    decision = from_result(
        rec, rec.envelope.recipients, res, now=now, retry=RetryPolicy(jitter=0), random=lambda: 0.5
    )
    return tuple(c.state for c in decision.changes), decision.refused


@pytest.mark.parametrize(
    ("outcomes", "states", "refused"),
    [
        ((Outcome.ACCEPTED, Outcome.ACCEPTED), (State.DELIVERED, State.DELIVERED), False),
        ((Outcome.ACCEPTED, Outcome.PERMANENT), (State.DELIVERED, State.BOUNCED), False),
        ((Outcome.ACCEPTED, Outcome.TRANSIENT), (State.DELIVERED, State.DEFERRED), False),
        # "4.2.0 busy" is about the mailboxes: deferred, the domain not backed off.
        ((Outcome.TRANSIENT, Outcome.TRANSIENT), (State.DEFERRED, State.DEFERRED), None),
        ((Outcome.PERMANENT, Outcome.TRANSIENT), (State.BOUNCED, State.DEFERRED), None),
        ((Outcome.PERMANENT, Outcome.PERMANENT), (State.BOUNCED, State.BOUNCED), None),
        # A recipient the transport skipped is retried, never lost.
        ((Outcome.ACCEPTED,), (State.DELIVERED, State.DEFERRED), False),
    ],
)
def test_each_recipient_follows_its_own_reply(
    outcomes: tuple[Outcome, ...], states: tuple[State, ...], refused: bool | None
) -> None:
    assert decide(record(), result(*outcomes)) == (states, refused)


@pytest.mark.parametrize(
    ("texts", "refused"),
    [
        # About one address or mailbox (RFC 3463 X.1.x, X.2.x; a bare 450): not the domain.
        (("450 4.2.2 mailbox full", "450 4.2.1 mailbox busy"), None),
        (("450 4.1.1 no such mailbox here yet", "450 4.2.0 try later"), None),
        (("450 mailbox unavailable", "450 mailbox unavailable"), None),
        # About the server or the domain (mail system, network, policy, or no detail).
        (("451 4.3.0 local error in processing", "451 4.3.0 local error"), True),
        (("452 4.3.1 insufficient system storage", "450 4.2.2 mailbox full"), True),
        (("450 4.7.1 greylisted, try again later", "450 4.2.2 mailbox full"), True),
        (("451 local error", "451 local error"), True),
        (("421 4.7.0 too many connections", "450 4.2.2 mailbox full"), True),
    ],
)
def test_a_transient_refusal_backs_the_domain_off_unless_it_is_about_one_mailbox(
    texts: tuple[str, str], refused: bool | None
) -> None:
    replies = [_reply(text) for text in texts]
    res = DeliveryResult(
        recipients=tuple(
            RecipientResult(address=address, outcome=Outcome.TRANSIENT, reply=reply)
            for address, reply in zip([A, B], replies, strict=True)
        ),
        host="mx:25",
    )
    assert decide(record(), res) == ((State.DEFERRED, State.DEFERRED), refused)


def _reply(text: str) -> Reply:
    code, _, rest = text.partition(" ")
    return Reply.of(int(code), rest)


def test_a_421_backs_the_domain_off_even_with_an_acceptance() -> None:
    assert decide(record(), result(Outcome.ACCEPTED, Outcome.TRANSIENT, code=421))[1] is True


def test_a_transient_reply_after_max_age_expires() -> None:
    late = T0 + dt.timedelta(days=6)
    assert decide(record(), result(Outcome.TRANSIENT, Outcome.ACCEPTED), now=late)[0] == (
        State.EXPIRED,
        State.DELIVERED,
    )


@pytest.mark.parametrize(
    ("error", "state", "refused"),
    [
        (ConnectError("refused", host="mx:25"), State.DEFERRED, True),
        (SessionRefused("go away", reply=Reply.of(554, "5.7.1 no")), State.BOUNCED, None),
        # Our side, not the recipients': deferred (and the host backed off) by default.
        (AuthenticationError("no", reply=Reply.of(535, "5.7.8 no")), State.DEFERRED, True),
        (TLSError("certificate verify failed"), State.DEFERRED, True),
    ],
)
def test_a_delivery_error_decides_for_every_recipient(
    error: DeliveryError, state: State, refused: bool | None
) -> None:
    rec = record()
    decision = from_error(
        rec, rec.envelope.recipients, error, now=T0, retry=RetryPolicy(), random=lambda: 0.5
    )
    assert [c.state for c in decision.changes] == [state, state]
    assert decision.refused is refused
    assert all(c.attempt is not None and c.attempt.source == "error" for c in decision.changes)


@given(st.lists(st.sampled_from(["reply", "error", "dsn"]), max_size=4))
def test_put_back_records_nothing_and_queues_only_the_never_tried(sources: list[str]) -> None:
    history = tuple(Attempt(at=T0, text="x", source=s) for s in sources)
    when = T0 + dt.timedelta(minutes=3)
    changes = put_back(record(history), [A, B], when)
    tried = any(s != "dsn" for s in sources)
    assert [c.state for c in changes] == [State.DEFERRED if tried else State.QUEUED, State.QUEUED]
    assert all(c.attempt is None and c.next_attempt_at == when for c in changes)


def test_retries_count_only_replies_and_errors() -> None:
    policy = RetryPolicy(initial=60, factor=2, jitter=0)
    dsn = Attempt(at=T0, text="delayed", source="dsn")
    reply = Attempt(at=T0, code=450, text="busy")
    rec = record((dsn, dsn, reply))
    decision = from_result(
        rec,
        rec.envelope.recipients[:1],
        result(Outcome.TRANSIENT),
        now=T0,
        retry=policy,
        random=lambda: 0.5,
    )
    # One earlier try (the DSNs do not count): this is the second retry, 120 s later.
    assert decision.changes[0].next_attempt_at == T0 + dt.timedelta(seconds=120)


@pytest.mark.parametrize(
    ("reason", "outcome", "source"),
    [
        # What send_many's failed_result makes of a DeliveryError: an "error" attempt.
        ("ConnectError: refused", Outcome.TRANSIENT, "error"),
        ("SessionRefused: go away", Outcome.PERMANENT, "error"),
        # A reason of the transport's own, or a name that is no DeliveryError: a reply.
        ("server lacks SMTPUTF8", Outcome.PERMANENT, "reply"),
        ("ValueError: nonsense", Outcome.TRANSIENT, "reply"),
        ("ConnectError: accepted anyway", Outcome.ACCEPTED, "reply"),
    ],
)
def test_a_result_made_from_a_delivery_error_is_recorded_as_an_error(
    reason: str, outcome: Outcome, source: str
) -> None:
    res = DeliveryResult(
        recipients=tuple(
            RecipientResult(address=address, outcome=outcome, reason=reason) for address in (A, B)
        )
    )
    decision = from_result(
        record(), record().envelope.recipients, res, now=T0, retry=RetryPolicy(), random=lambda: 0.5
    )
    assert {c.attempt.source for c in decision.changes if c.attempt is not None} == {source}
    assert all(c.attempt is not None and c.attempt.text == reason for c in decision.changes)


class RelayLoginRefused(AuthenticationError):
    """An application's own kind of AuthenticationError (found by its name in a result)."""


@pytest.mark.parametrize(
    "policy",
    [
        RetryPolicy(jitter=0),
        RetryPolicy(jitter=0, defer_errors=()),
        RetryPolicy(jitter=0, defer_errors=[TLSError]),
    ],
    ids=["default", "bounce on every permanent error", "defer TLS only"],
)
def test_failed_result_decides_as_the_error_itself(policy: RetryPolicy) -> None:
    rec = record()
    for error in (
        ConnectError("refused", host="mx:25"),
        SessionRefused("go away", reply=Reply.of(554, "5.7.1 no")),
        AuthenticationError("no", reply=Reply.of(535, "5.7.8 no")),
        RelayLoginRefused("no", reply=Reply.of(535, "5.7.8 no")),
        TLSError("certificate verify failed", host="mx:25"),
        NoRoute("null MX"),
    ):
        folded = from_result(
            rec,
            rec.envelope.recipients,
            failed_result(
                Message.build(sender="s@example.com", to=["a@example.org"]), rec.envelope, error
            ),
            now=T0,
            retry=policy,
            random=lambda: 0.5,
        )
        raised = from_error(
            rec, rec.envelope.recipients, error, now=T0, retry=policy, random=lambda: 0.5
        )
        assert folded == raised, error
        deferred = error.is_transient or isinstance(error, policy.defer_errors)
        expected = State.DEFERRED if deferred else State.BOUNCED
        assert [c.state for c in raised.changes] == [expected, expected], error


def test_defer_errors_takes_delivery_error_classes_only() -> None:
    assert RetryPolicy(defer_errors=[TLSError]).defer_errors == (TLSError,)
    with pytest.raises(TypeError, match="DeliveryError subclasses"):
        RetryPolicy(defer_errors=[ValueError])  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("first", "second", "shared"),
    [
        (Outcome.ACCEPTED, Outcome.ACCEPTED, True),
        (Outcome.TRANSIENT, Outcome.TRANSIENT, True),
        # Different answers never share an attempt.
        (Outcome.ACCEPTED, Outcome.PERMANENT, False),
        (Outcome.TRANSIENT, Outcome.PERMANENT, False),
    ],
)
def test_equal_answers_in_one_batch_share_one_attempt(
    first: Outcome, second: Outcome, shared: bool
) -> None:
    memo: dict[tuple[object, ...], Attempt] = {}
    rec = record()
    decisions = [
        from_result(
            rec,
            rec.envelope.recipients[:1],
            result(outcome),
            now=T0,
            retry=RetryPolicy(jitter=0),
            random=lambda: 0.5,
            attempts=memo,
        )
        for outcome in (first, second)
    ]
    plain = [
        from_result(
            rec,
            rec.envelope.recipients[:1],
            result(outcome),
            now=T0,
            retry=RetryPolicy(jitter=0),
            random=lambda: 0.5,
        )
        for outcome in (first, second)
    ]
    # The same decisions as without sharing.
    assert decisions == plain
    a, b = (d.changes[0].attempt for d in decisions)
    assert (a is b) is shared
    assert (a == b) is shared


def test_a_shared_attempt_is_never_one_from_another_time() -> None:
    memo: dict[tuple[object, ...], Attempt] = {}
    rec = record()
    later = T0 + dt.timedelta(seconds=1)
    attempts = [
        from_result(
            rec,
            rec.envelope.recipients,
            result(Outcome.ACCEPTED, Outcome.ACCEPTED),
            now=now,
            retry=RetryPolicy(),
            random=lambda: 0.5,
            attempts=memo,
        )
        .changes[0]
        .attempt
        for now in (T0, later)
    ]
    assert [a.at for a in attempts if a is not None] == [T0, later]
