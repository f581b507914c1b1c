"""MemoryTransport: the outbox, scripted answers, sync and async handlers."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.address import Address
from mailrelay.envelope import Envelope
from mailrelay.errors import ConfigurationError, ConnectError, DeliveryTimeout, SessionRefused
from mailrelay.message import Message
from mailrelay.reply import Reply
from mailrelay.results import DeliveryResult, Outcome, RecipientResult
from mailrelay.transport import MemoryTransport, OutboxItem
from mailrelay.transport.memory import HandlerAnswer
from tests.transport.helpers import make_message, run


def test_without_a_handler_everything_is_accepted_and_recorded() -> None:
    transport = MemoryTransport()
    message = make_message()
    result = transport.send(message)
    assert result.ok
    assert result.message_id == message.message_id
    assert all(r.reply is not None and r.reply.code == 250 for r in result.recipients)
    assert transport.outbox == [OutboxItem(message, Envelope.from_message(message))]
    sent, envelope = transport.outbox[0]
    assert sent is message
    assert envelope.sender == Address.parse("alice@example.com")


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ({}, [Outcome.ACCEPTED, Outcome.ACCEPTED]),
        ({"carol@example.org": Outcome.PERMANENT}, [Outcome.ACCEPTED, Outcome.PERMANENT]),
        ({"bob@example.com": Outcome.TRANSIENT}, [Outcome.TRANSIENT, Outcome.ACCEPTED]),
        (
            {Address.parse("bob@example.com"): Reply.of(452, "4.2.2 mailbox full")},
            [Outcome.TRANSIENT, Outcome.ACCEPTED],
        ),
        (
            {
                "bob@example.com": Reply.of(251, "2.1.5 will forward"),
                "carol@example.org": Reply.of(550, "5.1.1 no such user"),
            },
            [Outcome.ACCEPTED, Outcome.PERMANENT],
        ),
    ],
    ids=["empty", "permanent", "transient", "reply-4xx", "replies"],
)
def test_a_mapping_scripts_per_recipient_outcomes(
    answer: Mapping[Address | str, Outcome | Reply], expected: list[Outcome]
) -> None:
    transport = MemoryTransport(lambda message, envelope: answer)
    result = transport.send(make_message())
    assert [r.outcome for r in result.recipients] == expected
    for recipient in result.recipients:
        scripted = answer.get(str(recipient.address)) or answer.get(recipient.address)
        if isinstance(scripted, Reply):
            assert recipient.reply == scripted


def test_recipients_match_as_addresses() -> None:
    # The domain is case-insensitive, the local part is not (RFC 5321 §2.4).
    transport = MemoryTransport(lambda m, e: {"carol@EXAMPLE.ORG": Outcome.PERMANENT})
    assert [r.outcome for r in transport.send(make_message()).recipients] == [
        Outcome.ACCEPTED,
        Outcome.PERMANENT,
    ]
    transport = MemoryTransport(lambda m, e: {"CAROL@example.org": Outcome.PERMANENT})
    with pytest.raises(ConfigurationError, match="not in the envelope"):
        transport.send(make_message())


def test_a_whole_delivery_result_is_returned_as_is() -> None:
    def handler(message: Message, envelope: Envelope) -> DeliveryResult:
        return DeliveryResult(
            recipients=[
                RecipientResult(address=r.address, outcome=Outcome.TRANSIENT, reason="greylisted")
                for r in envelope.recipients
            ],
            host="mx.example.com:25",
        )

    result = MemoryTransport(handler).send(make_message())
    assert result.host == "mx.example.com:25"
    assert [r.reason for r in result.recipients] == ["greylisted", "greylisted"]


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        (
            DeliveryResult(
                recipients=[
                    RecipientResult(
                        address=Address.parse("bob@example.com"), outcome=Outcome.ACCEPTED
                    )
                ]
            ),
            "not the envelope's",
        ),
        ({"dave@example.net": Outcome.ACCEPTED}, "not in the envelope"),
        ({"bob@example.com": 250}, "expected an Outcome or a Reply"),
        (["bob@example.com"], "must return a DeliveryResult or a mapping"),
        (None, "must return a DeliveryResult or a mapping"),
    ],
    ids=["short-result", "stranger", "bad-value", "list", "none"],
)
def test_a_handler_answer_that_does_not_fit_is_an_error(answer: object, match: str) -> None:
    transport = MemoryTransport(lambda message, envelope: answer)  # type: ignore[arg-type,return-value]
    with pytest.raises(ConfigurationError, match=match):
        transport.send(make_message())
    assert transport.outbox == []


@pytest.mark.parametrize(
    "error",
    [ConnectError("refused"), DeliveryTimeout("slow"), SessionRefused("554 go away")],
    ids=lambda e: type(e).__name__,
)
def test_a_raising_handler_simulates_a_failed_attempt(error: Exception) -> None:
    def handler(message: Message, envelope: Envelope) -> HandlerAnswer:
        raise error

    transport = MemoryTransport(handler)
    with pytest.raises(type(error)):
        transport.send(make_message())
    assert transport.outbox == []
    (result,) = transport.send_many([make_message()])
    assert not result.ok
    assert transport.outbox == []


def test_async_use_with_an_async_handler() -> None:
    seen: list[str] = []

    async def handler(message: Message, envelope: Envelope) -> HandlerAnswer:
        await asyncio.sleep(0)
        seen.append(message.get("Subject") or "")
        return {"carol@example.org": Outcome.PERMANENT}

    transport = MemoryTransport(handler)

    async def main() -> list[DeliveryResult]:
        async with transport:
            return await transport.asend_many(
                [make_message(subject="one"), make_message(subject="two")]
            )

    results = run(main())
    assert seen == ["one", "two"]
    assert [[r.outcome for r in result.recipients] for result in results] == [
        [Outcome.ACCEPTED, Outcome.PERMANENT]
    ] * 2
    assert [item.message.get("Subject") for item in transport.outbox] == ["one", "two"]


def test_async_use_with_a_sync_handler() -> None:
    transport = MemoryTransport(lambda m, e: {"bob@example.com": Outcome.TRANSIENT})
    result = run(transport.asend(make_message()))
    assert [r.outcome for r in result.recipients] == [Outcome.TRANSIENT, Outcome.ACCEPTED]


def test_an_async_handler_cannot_serve_sync_send() -> None:
    async def handler(message: Message, envelope: Envelope) -> HandlerAnswer:
        return {}

    transport = MemoryTransport(handler)
    # pytest runs with warnings as errors: an un-awaited coroutine would fail the test.
    with pytest.raises(ConfigurationError, match="use asend"):
        transport.send(make_message())


def test_concurrent_sends_lose_nothing() -> None:
    transport = MemoryTransport()
    messages = [make_message(subject=str(n)) for n in range(40)]

    def worker(chunk: list[Message]) -> None:
        for message in chunk:
            transport.send(message)

    threads = [threading.Thread(target=worker, args=(messages[n::4],)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(int(item.message.get("Subject") or "") for item in transport.outbox) == list(
        range(40)
    )


def test_repr_counts_the_outbox() -> None:
    transport = MemoryTransport()
    transport.send(make_message())
    assert repr(transport) == "<MemoryTransport outbox=1>"


local_parts = st.from_regex(r"[a-z][a-z0-9]{0,7}", fullmatch=True)


@given(
    st.lists(local_parts, min_size=1, max_size=6, unique=True),
    st.data(),
)
def test_scripted_outcomes_land_on_the_right_recipients(
    names: list[str], data: st.DataObject
) -> None:
    recipients = [f"{name}@example.com" for name in names]
    script = data.draw(st.dictionaries(st.sampled_from(recipients), st.sampled_from(list(Outcome))))
    transport = MemoryTransport(lambda message, envelope: script)
    envelope = Envelope("alice@example.com", recipients)
    result = transport.send(make_message(), envelope)
    assert [str(r.address) for r in result.recipients] == recipients
    assert [r.outcome for r in result.recipients] == [
        script.get(address, Outcome.ACCEPTED) for address in recipients
    ]
