"""Outcome, RecipientResult and DeliveryResult: the per-recipient views."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.address import Address
from mailrelay.reply import Reply
from mailrelay.results import DeliveryResult, Outcome, RecipientResult


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        (250, Outcome.ACCEPTED),
        (251, Outcome.ACCEPTED),
        (421, Outcome.TRANSIENT),
        (450, Outcome.TRANSIENT),
        (452, Outcome.TRANSIENT),
        (354, Outcome.TRANSIENT),  # not a final answer: never taken for success
        (550, Outcome.PERMANENT),
        (554, Outcome.PERMANENT),
    ],
)
def test_outcome_from_reply(code: int, outcome: Outcome) -> None:
    assert Outcome.from_reply(Reply.of(code, "x")) is outcome


def _result(local: str, outcome: Outcome) -> RecipientResult:
    return RecipientResult(address=Address.parse(f"{local}@example.test"), outcome=outcome)


def test_views_partition_the_recipients_in_envelope_order() -> None:
    result = DeliveryResult(
        recipients=[
            _result("a", Outcome.ACCEPTED),
            _result("b", Outcome.PERMANENT),
            _result("c", Outcome.TRANSIENT),
            _result("d", Outcome.ACCEPTED),
        ]
    )
    assert [r.address.local_part for r in result.accepted] == ["a", "d"]
    assert [r.address.local_part for r in result.rejected] == ["b"]
    assert [r.address.local_part for r in result.deferred] == ["c"]
    assert not result.ok


def test_ok_needs_every_recipient_accepted_and_at_least_one() -> None:
    assert DeliveryResult(recipients=[_result("a", Outcome.ACCEPTED)]).ok
    assert not DeliveryResult(recipients=[]).ok


@given(st.lists(st.sampled_from(list(Outcome)), max_size=20))
def test_views_account_for_every_recipient(outcomes: list[Outcome]) -> None:
    result = DeliveryResult(
        recipients=[_result(f"r{i}", outcome) for i, outcome in enumerate(outcomes)]
    )
    total = len(result.accepted) + len(result.deferred) + len(result.rejected)
    assert total == len(outcomes)
    assert result.ok == (bool(outcomes) and all(o is Outcome.ACCEPTED for o in outcomes))


def test_results_are_frozen_and_pickle() -> None:
    result = DeliveryResult(
        recipients=[_result("a", Outcome.ACCEPTED)], message_id="m@x", host="mx:25"
    )
    assert pickle.loads(pickle.dumps(result)) == result
    with pytest.raises(AttributeError):
        result.host = "other"  # type: ignore[misc]
