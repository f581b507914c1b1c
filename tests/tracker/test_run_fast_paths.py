"""The run loop's fast paths give exactly what the general code gives.

The builders in mailrelay.tracker.core and mailrelay.tracker.transitions fill slots
directly (see mailrelay._slots); ``from_result`` decides a single accepted recipient
without its general loop. Each is held equal to what it stands in for.
"""

from __future__ import annotations

import datetime as dt

from hypothesis import given
from hypothesis import strategies as st

from mailrelay.address import Address
from mailrelay.envelope import Envelope
from mailrelay.message import Message
from mailrelay.reply import Reply
from mailrelay.results import DeliveryResult, Outcome, RecipientResult
from mailrelay.tracker.core import Group, Work, new_group, new_work
from mailrelay.tracker.retry import RetryPolicy
from mailrelay.tracker.store import Claim, MessageRecord, RecipientRecord, State
from mailrelay.tracker.transitions import Decision, from_result, new_decision

T0 = dt.datetime(2026, 3, 1, 8, 0, tzinfo=dt.UTC)
A = Address.parse("a@example.org")
OTHER = Address.parse("other@example.net")
SECOND = Address.parse("second@example.com")
REFUSAL = Reply.of(550, "5.1.1 no such user")


def _record(*addresses: Address) -> MessageRecord:
    envelope = Envelope("sender@example.com", list(addresses))
    return MessageRecord(
        id="m1",
        created_at=T0,
        envelope=envelope,
        recipients=tuple(
            RecipientRecord(address=r.address, state=State.SENDING) for r in envelope.recipients
        ),
    )


def _decide(record: MessageRecord, result: DeliveryResult) -> Decision:
    return from_result(
        record,
        record.envelope.recipients,
        result,
        now=T0,
        retry=RetryPolicy(jitter=0),
        random=lambda: 0.5,
    )


REPLIES = st.none() | st.sampled_from(
    [Reply.of(250, "2.0.0 ok"), Reply.of(251, "forwarded"), Reply.of(421, "4.3.2 closing")]
)


@given(
    reply=REPLIES,
    reason=st.none() | st.sampled_from(["TimeoutError: late", "note"]),
    host=st.none() | st.just("mx:25"),
    result_host=st.none() | st.just("relay:587"),
    same_object=st.booleans(),
)
def test_one_accepted_recipient_is_decided_as_the_general_loop_decides(
    reply: Reply | None,
    reason: str | None,
    host: str | None,
    result_host: str | None,
    same_object: bool,
) -> None:
    # The general loop's decision for the same recipient: the same message with a second
    # recipient refused for good, which changes neither the first change nor whether
    # the domain is backed off (a 550 is neither a 421 nor transient).
    address = A if same_object else Address.parse(str(A))
    accepted = RecipientResult(
        address=address, outcome=Outcome.ACCEPTED, reply=reply, reason=reason, host=host
    )
    refused = RecipientResult(address=SECOND, outcome=Outcome.PERMANENT, reply=REFUSAL)
    alone = _decide(_record(A), DeliveryResult(recipients=(accepted,), host=result_host))
    general = _decide(
        _record(A, SECOND), DeliveryResult(recipients=(accepted, refused), host=result_host)
    )
    assert alone.changes == general.changes[:1]
    assert alone.refused == general.refused
    assert alone == new_decision(alone.changes, alone.refused)


@given(outcome=st.sampled_from(list(Outcome)), known=st.booleans())
def test_a_result_for_another_address_or_not_accepted_takes_the_general_path(
    outcome: Outcome, known: bool
) -> None:
    # The fast path is only for the recipient's own acceptance: anything else is decided
    # by the general rules (a result for an unknown address leaves the recipient to retry).
    found = RecipientResult(
        address=A if known else OTHER, outcome=outcome, reply=Reply.of(250, "ok")
    )
    decision = _decide(_record(A), DeliveryResult(recipients=(found,)))
    (change,) = decision.changes
    assert change.address == A
    if known and outcome is Outcome.ACCEPTED:
        assert change.state is State.DELIVERED
        assert decision.refused is False
    elif known and outcome is Outcome.PERMANENT:
        assert change.state is State.BOUNCED
    else:
        assert change.state is State.DEFERRED


@given(key=st.sampled_from(["", "example.org", "relay"]), count=st.integers(0, 3))
def test_new_group_equals_the_constructor(key: str, count: int) -> None:
    recipients = Envelope("s@example.com", [A, OTHER, SECOND][: max(count, 1)]).recipients
    assert new_group(key, recipients) == Group(key, recipients)


@given(fresh=st.booleans())
def test_new_work_equals_the_constructor(fresh: bool) -> None:
    record = _record(A)
    claim = Claim(tracking_id="m1", worker="w", lease_until=T0, addresses=(A,), fresh=fresh)
    message = Message.build(sender="sender@example.com", to=[str(A)], subject="s", text="t")
    built = new_work(claim, record, message)
    assert built == Work(claim=claim, record=record, message=message)
    assert built.message is message
