"""Outcome, RecipientResult and DeliveryResult: the per-recipient views."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.address import Address
from mailrelay.errors import (
    AuthenticationError,
    ConnectError,
    ConnectionLost,
    DeliveryError,
    DeliveryTimeout,
    NoRoute,
    ProxyError,
    ServerProtocolError,
    TLSError,
)
from mailrelay.reply import Reply
from mailrelay.results import DeliveryResult, Outcome, RecipientResult, error_status


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


@pytest.mark.parametrize(
    ("error", "status"),
    [
        # RFC 3463 §3.5: X.4.1 no answer from host, X.4.2 bad connection, X.4.4 unable to
        # route; §3.8: X.7.5 cryptographic failure. The class follows is_transient.
        (ConnectError("connection refused"), "4.4.1"),
        (ProxyError("the proxy refused our login", is_transient=False), "5.4.1"),
        (DeliveryTimeout("DATA timed out"), "4.4.2"),
        (ConnectionLost("reset"), "4.4.2"),
        (NoRoute("null MX"), "5.4.4"),
        (TLSError("handshake failed"), "5.7.5"),
        (TLSError("handshake failed", is_transient=True), "4.7.5"),
        # Nothing fits a kind without a status of its own.
        (DeliveryError("something"), None),
        (ServerProtocolError("garbage"), None),
        (AuthenticationError("would send the password in plain text"), None),
    ],
)
def test_error_status_without_a_reply_follows_the_kind_of_failure(
    error: DeliveryError, status: str | None
) -> None:
    found = error_status(error)
    assert (None if found is None else str(found)) == status


def test_error_status_is_the_replys_own_when_there_is_one() -> None:
    refused = Reply.of(535, "5.7.8 Authentication credentials invalid")
    assert str(error_status(AuthenticationError("refused", reply=refused))) == "5.7.8"
    # A reply without an enhanced status says none: no status is made up beside it.
    bare = Reply.of(421, "Service not available")
    assert error_status(ConnectionLost("closed", reply=bare)) is None


def test_error_status_takes_the_class_it_is_told() -> None:
    error = ConnectError("connection refused")  # transient by default
    assert str(error_status(error, transient=False)) == "5.4.1"
    assert str(error_status(error, transient=True)) == "4.4.1"
