"""A message split over more transactions than one connection may carry (RFC 9422 LIMITS
MAILMAX with RCPTMAX, RFC 5321 §4.5.3.1.10) is finished on other connections.

What must hold: every recipient is delivered exactly once, no connection is asked for one
MAIL more than its server announced, through both drivers, the smart-host and MX
transports, one message and batches; a continuation that fails gives its recipients that
failure and keeps the answers already had.
"""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

import pytest

from mailrelay.address import Address
from mailrelay.envelope import Envelope
from mailrelay.errors import ConnectError
from mailrelay.flow import unsent_positions
from mailrelay.flow.bookkeeping import MAIL_MAX_REASON, SESSION_ENDED_REASON, TOO_MANY_REASON
from mailrelay.message import Message
from mailrelay.options import TLS, Timeouts
from mailrelay.reply import Reply
from mailrelay.results import DeliveryResult, Outcome, RecipientResult
from mailrelay.transport.mx import MXTransport
from mailrelay.transport.mx_async import AsyncMXTransport
from mailrelay.transport.pooling import continued
from tests.transport.helpers import FLAVOURS, Flavour, run, send_many_with, send_with
from tests.transport.test_recipient_limits import LimitsHandler, received, serving


def tagged(to: list[str]) -> Message:
    return Message.build(
        sender="carol@mailrelay.test",
        to=to,
        subject=f"continued {uuid.uuid4().hex}",
        text="Hello.\n",
    )


def options(port: int) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": port, "tls": TLS.NONE, "timeouts": Timeouts.all(10)}


def check_server(handler: LimitsHandler, mail_max: int) -> None:
    assert handler.over == 0  # never a MAIL over the announced MAILMAX
    assert handler.refused == 0  # never a RCPT over the announced RCPTMAX
    assert max(handler.per_session.values()) <= mail_max


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize(("rcpt_max", "mail_max", "count"), [(2, 2, 7), (1, 1, 3), (3, 2, 13)])
def test_one_message_over_several_connections(
    flavour: Flavour, rcpt_max: int, mail_max: int, count: int
) -> None:
    handler = LimitsHandler(rcpt_max=rcpt_max, mail_max=mail_max)
    to = [f"user{i}@example.net" for i in range(count)]
    with serving(handler) as port:
        result = send_with(flavour, tagged(to), **options(port))
    assert result.ok, result
    assert [r.address for r in result.recipients] == [Address.parse(a) for a in to]
    assert received(handler) == Counter(to)  # each exactly once
    check_server(handler, mail_max)
    assert len(handler.per_session) == -(-count // (rcpt_max * mail_max))


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_reused_connection_with_one_transaction_left(flavour: Flavour) -> None:
    handler = LimitsHandler(rcpt_max=2, mail_max=2)
    first = tagged(["a@example.net"])
    second = tagged([f"b{i}@example.net" for i in range(4)])
    with serving(handler) as port:
        if flavour == "sync":
            from mailrelay.transport import SMTPTransport

            with SMTPTransport(**options(port)) as transport:
                results = [transport.send(first), transport.send(second)]
        else:
            from mailrelay.transport import AsyncSMTPTransport

            async def main() -> list[DeliveryResult]:
                async with AsyncSMTPTransport(**options(port)) as transport:
                    return [await transport.asend(first), await transport.asend(second)]

            results = run(main())
    assert all(r.ok for r in results), results
    assert received(handler) == Counter(["a@example.net"] + [f"b{i}@example.net" for i in range(4)])
    check_server(handler, 2)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_batches_finish_split_messages_elsewhere(flavour: Flavour) -> None:
    handler = LimitsHandler(rcpt_max=2, mail_max=3)
    counts = [1, 9, 2, 7, 1, 1, 5]
    messages = [tagged([f"m{n}.{i}@example.net" for i in range(c)]) for n, c in enumerate(counts)]
    with serving(handler) as port:
        results = send_many_with(flavour, list(messages), **options(port))
    assert [len(r.recipients) for r in results] == counts
    assert all(r.ok for r in results), [r for r in results if not r.ok]
    expected = Counter(f"m{n}.{i}@example.net" for n, c in enumerate(counts) for i in range(c))
    assert received(handler) == expected
    check_server(handler, 3)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_mx_delivery_finishes_on_a_fresh_session(flavour: Flavour) -> None:
    # An address literal goes to that address (at the transport's port): no DNS needed.
    handler = LimitsHandler(rcpt_max=2, mail_max=2)
    to = [f"user{i}@[127.0.0.1]" for i in range(9)]
    message = tagged(to)
    with serving(handler) as port:
        settings: dict[str, Any] = {"port": port, "tls": TLS.NONE, "timeouts": Timeouts.all(10)}
        if flavour == "sync":
            with MXTransport(**settings, refused_networks=()) as mx:
                result = mx.send(message)
        else:

            async def main() -> DeliveryResult:
                async with AsyncMXTransport(**settings, refused_networks=()) as mx:
                    return await mx.asend(message)

            result = run(main())
    assert result.ok, result
    assert received(handler) == Counter(to)
    check_server(handler, 2)


# -- the rounds themselves -----------------------------------------------------------------


def result_of(*outcomes: tuple[str, Outcome, str | None]) -> DeliveryResult:
    return DeliveryResult(
        recipients=[
            RecipientResult(
                address=Address.parse(address),
                outcome=outcome,
                reply=Reply(code=250, lines=("ok",)) if outcome is Outcome.ACCEPTED else None,
                reason=reason,
            )
            for address, outcome, reason in outcomes
        ]
    )


OK = Outcome.ACCEPTED
LATER = Outcome.TRANSIENT


def test_unsent_positions() -> None:
    result = result_of(
        ("a@x.test", OK, None),
        ("b@x.test", LATER, MAIL_MAX_REASON),
        ("c@x.test", LATER, "450 mailbox busy"),
        ("d@x.test", LATER, SESSION_ENDED_REASON),
        ("e@x.test", LATER, TOO_MANY_REASON),
    )
    assert unsent_positions(result) == [1, 3, 4]
    # None answered: the message failed as a whole (the caller's retry rules apply).
    assert unsent_positions(result_of(("b@x.test", LATER, MAIL_MAX_REASON))) == []


def drive(rounds: Any, answers: list[DeliveryResult | Exception]) -> tuple[list[Envelope], Any]:
    asked: list[Envelope] = []
    try:
        part = next(rounds)
        for answer in answers:
            asked.append(part)
            part = rounds.send(answer)
    except StopIteration as done:
        return asked, done.value
    raise AssertionError("the rounds asked for more than the test gave")


def test_rounds_merge_in_envelope_order_and_stop_without_progress() -> None:
    envelope = Envelope("s@x.test", ["a@x.test", "b@x.test", "c@x.test", "d@x.test"])
    message = tagged(["a@x.test"])
    first = result_of(
        ("a@x.test", OK, None),
        ("b@x.test", LATER, MAIL_MAX_REASON),
        ("c@x.test", LATER, MAIL_MAX_REASON),
        ("d@x.test", LATER, MAIL_MAX_REASON),
    )
    second = result_of(
        ("b@x.test", OK, None),
        ("c@x.test", LATER, MAIL_MAX_REASON),
        ("d@x.test", LATER, MAIL_MAX_REASON),
    )
    stuck = result_of(("c@x.test", LATER, MAIL_MAX_REASON), ("d@x.test", LATER, MAIL_MAX_REASON))
    asked, final = drive(continued(message, envelope, first), [second, stuck])
    assert [[str(r.address) for r in part.recipients] for part in asked] == [
        ["b@x.test", "c@x.test", "d@x.test"],
        ["c@x.test", "d@x.test"],
    ]
    assert [r.outcome for r in final.recipients] == [OK, OK, LATER, LATER]
    assert [str(r.address) for r in final.recipients] == [
        "a@x.test",
        "b@x.test",
        "c@x.test",
        "d@x.test",
    ]


def test_a_failed_round_gives_its_recipients_the_error() -> None:
    envelope = Envelope("s@x.test", ["a@x.test", "b@x.test"])
    first = result_of(("a@x.test", OK, None), ("b@x.test", LATER, MAIL_MAX_REASON))
    error = ConnectError("no address answered", host="127.0.0.1:25")
    asked, final = drive(continued(tagged(["a@x.test"]), envelope, first), [error])
    assert len(asked) == 1
    assert final.recipients[0] == first.recipients[0]
    assert final.recipients[1].outcome is LATER
    assert "no address answered" in (final.recipients[1].reason or "")
    assert final.error is error
