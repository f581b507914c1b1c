"""The Transport / AsyncTransport interface: send, send_many's contract, context managers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.envelope import Envelope
from mailrelay.errors import (
    AuthenticationError,
    ConnectError,
    DeliveryError,
    DeliveryTimeout,
    MessageError,
    TLSError,
)
from mailrelay.message import Message
from mailrelay.reply import Reply
from mailrelay.results import DeliveryResult, Outcome, RecipientResult
from mailrelay.transport.base import (
    AsyncBatch,
    AsyncTransport,
    BatchItem,
    Transport,
    failed_result,
    prepare_batch,
)
from tests.transport.helpers import make_message, run


class Recorder(Transport, AsyncTransport):
    """Accepts everything, remembers what it got; ``fail`` maps subjects to exceptions."""

    def __init__(self, fail: dict[str, BaseException] | None = None) -> None:
        self.fail = fail or {}
        self.calls: list[tuple[Message, Envelope]] = []
        self.closed = 0

    def _answer(self, message: Message, envelope: Envelope) -> DeliveryResult:
        self.calls.append((message, envelope))
        exc = self.fail.get(message.get("Subject") or "")
        if exc is not None:
            raise exc
        return DeliveryResult(
            recipients=[
                RecipientResult(address=r.address, outcome=Outcome.ACCEPTED)
                for r in envelope.recipients
            ],
            message_id=message.message_id,
        )

    def deliver(self, message: Message, envelope: Envelope) -> DeliveryResult:
        return self._answer(message, envelope)

    async def adeliver(self, message: Message, envelope: Envelope) -> DeliveryResult:
        await asyncio.sleep(0)
        return self._answer(message, envelope)

    def close(self) -> None:
        self.closed += 1

    async def aclose(self) -> None:
        self.closed += 1


def test_send_derives_the_envelope_from_the_headers() -> None:
    transport = Recorder()
    message = make_message()
    result = transport.send(message)
    ((_, envelope),) = transport.calls
    assert envelope == Envelope.from_message(message)
    assert [str(r.address) for r in result.recipients] == ["bob@example.com", "carol@example.org"]


def test_send_uses_the_given_envelope() -> None:
    transport = Recorder()
    envelope = Envelope("bounces@example.com", ["dave@example.net"])
    transport.send(make_message(), envelope)
    assert transport.calls[0][1] is envelope


def test_asend_derives_the_envelope_too() -> None:
    transport = Recorder()
    message = make_message()
    result = run(transport.asend(message))
    assert result.ok
    assert transport.calls[0][1] == Envelope.from_message(message)


def test_the_abstract_method_must_be_implemented() -> None:
    class Incomplete(Transport):
        pass

    with pytest.raises(TypeError, match="deliver"):
        Incomplete()  # type: ignore[abstract]


@pytest.mark.parametrize(
    "error",
    [
        ConnectError("refused", host="mx.example.com:25"),
        DeliveryTimeout("greeting took too long"),
        TLSError("certificate verify failed"),
        AuthenticationError("535 bad credentials", reply=Reply.of(535, "5.7.8 no")),
        DeliveryError("421 closing", reply=Reply.of(421, "4.3.2 shutting down")),
    ],
    ids=lambda e: type(e).__name__,
)
def test_send_many_turns_a_delivery_error_into_that_items_result(error: DeliveryError) -> None:
    transport = Recorder(fail={"bad": error})
    items = [make_message(subject="one"), make_message(subject="bad"), make_message(subject="two")]
    results = transport.send_many(items)
    assert len(results) == 3
    assert results[0].ok
    assert results[2].ok
    failed = results[1]
    assert not failed.ok
    expected = Outcome.TRANSIENT if error.is_transient else Outcome.PERMANENT
    assert [r.outcome for r in failed.recipients] == [expected, expected]
    for recipient in failed.recipients:
        assert recipient.reply == error.reply
        assert recipient.host == error.host
        assert recipient.reason is not None
        assert recipient.reason.startswith(type(error).__name__)
    assert failed.message_id == items[1].message_id


def test_send_single_message_raises_the_delivery_error() -> None:
    error = ConnectError("refused")
    transport = Recorder(fail={"bad": error})
    with pytest.raises(ConnectError) as caught:
        transport.send(make_message(subject="bad"))
    assert caught.value is error


def test_send_many_checks_a_list_whole_before_sending_anything() -> None:
    transport = Recorder()
    no_recipients = Message.build(sender="alice@example.com", subject="nobody")
    with pytest.raises(MessageError):
        transport.send_many([make_message(), no_recipients])
    assert transport.calls == []


@pytest.mark.parametrize(
    "bad_item",
    [b"raw bytes", "text", (make_message(),), (make_message(), "not an envelope"), None],
    ids=["bytes", "str", "1-tuple", "bad-envelope", "None"],
)
def test_send_many_rejects_a_malformed_item_before_sending(bad_item: object) -> None:
    transport = Recorder()
    with pytest.raises(TypeError, match="item 1"):
        transport.send_many([make_message(), bad_item])  # type: ignore[list-item]
    assert transport.calls == []


def test_a_generator_is_streamed_not_collected() -> None:
    log: list[str] = []

    class Logging(Recorder):
        def deliver(self, message: Message, envelope: Envelope) -> DeliveryResult:
            log.append(f"deliver {message.get('Subject')}")
            return super().deliver(message, envelope)

    def items() -> Iterator[Message]:
        for n in range(3):
            log.append(f"pull {n}")
            yield make_message(subject=str(n))

    results = Logging().send_many(items())
    assert len(results) == 3
    assert log == ["pull 0", "deliver 0", "pull 1", "deliver 1", "pull 2", "deliver 2"]


def test_a_bad_streamed_item_stops_the_batch_with_a_progress_note() -> None:
    transport = Recorder()

    def items() -> Iterator[object]:
        yield make_message(subject="one")
        yield make_message(subject="two")
        yield b"not a message"
        yield make_message(subject="never")

    with pytest.raises(TypeError, match="item 2") as caught:
        transport.send_many(items())  # type: ignore[arg-type]
    assert [m.get("Subject") for m, _ in transport.calls] == ["one", "two"]
    assert any("2 messages had been handed" in note for note in caught.value.__notes__)


def test_asend_many_streams_an_async_generator() -> None:
    log: list[str] = []

    class Logging(Recorder):
        async def adeliver(self, message: Message, envelope: Envelope) -> DeliveryResult:
            log.append(f"deliver {message.get('Subject')}")
            return await super().adeliver(message, envelope)

    async def items() -> AsyncIterator[Message]:
        for n in range(2):
            log.append(f"pull {n}")
            yield make_message(subject=str(n))

    assert len(run(Logging().asend_many(items()))) == 2
    assert log == ["pull 0", "deliver 0", "pull 1", "deliver 1"]


def test_empty_batches() -> None:
    assert Recorder().send_many([]) == []
    assert run(Recorder().asend_many([])) == []


def test_send_many_propagates_other_exceptions_with_a_progress_note() -> None:
    transport = Recorder(fail={"bug": RuntimeError("a bug")})
    items = [make_message(subject="one"), make_message(subject="bug"), make_message()]
    with pytest.raises(RuntimeError) as caught:
        transport.send_many(items)
    assert any("1 of 3 messages" in note for note in caught.value.__notes__)
    assert len(transport.calls) == 2  # the third was never attempted


def test_send_many_accepts_pairs_and_generators() -> None:
    transport = Recorder()
    envelope = Envelope(None, ["dave@example.net"])
    message = make_message()
    items: list[BatchItem] = [(message, envelope), message]
    results = transport.send_many(item for item in items)
    assert [str(r.recipients[0].address) for r in results] == [
        "dave@example.net",
        "bob@example.com",
    ]
    assert transport.calls[0][1] is envelope


def test_asend_many_accepts_async_iterables_and_keeps_order() -> None:
    transport = Recorder(fail={"bad": ConnectError("refused")})

    async def items() -> AsyncIterator[Message]:
        for subject in ("a", "bad", "c"):
            yield make_message(subject=subject)

    results = run(transport.asend_many(items()))
    assert [r.ok for r in results] == [True, False, True]
    assert [m.get("Subject") for m, _ in transport.calls] == ["a", "bad", "c"]


def test_asend_many_propagates_cancellation() -> None:
    transport = Recorder(fail={"stop": asyncio.CancelledError()})

    async def main() -> None:
        await transport.asend_many([make_message(), make_message(subject="stop")])

    with pytest.raises(asyncio.CancelledError):
        run(main())


def test_context_managers_close() -> None:
    transport = Recorder()
    with transport as entered:
        assert entered is transport
    assert transport.closed == 1

    async def main() -> None:
        async with transport as entered:
            assert entered is transport

    run(main())
    assert transport.closed == 2


def test_default_close_is_a_harmless_no_op() -> None:
    class Minimal(Transport, AsyncTransport):
        def deliver(self, message: Message, envelope: Envelope) -> DeliveryResult:
            raise AssertionError("not called")

        async def adeliver(self, message: Message, envelope: Envelope) -> DeliveryResult:
            raise AssertionError("not called")

    minimal = Minimal()
    minimal.close()
    minimal.close()
    run(minimal.aclose())


def test_prepare_batch_pairs() -> None:
    message = make_message()
    envelope = Envelope("x@example.com", ["y@example.com"])
    assert prepare_batch([message, (message, envelope)]) == [
        (message, Envelope.from_message(message)),
        (message, envelope),
    ]


addresses = st.lists(
    st.from_regex(r"[a-z]{1,8}@[a-z]{1,8}\.example", fullmatch=True),
    min_size=1,
    max_size=5,
    unique=True,
)


@given(addresses, st.booleans())
def test_failed_result_has_one_result_per_recipient_in_order(
    recipients: list[str], transient: bool
) -> None:
    envelope = Envelope("alice@example.com", recipients)
    error = DeliveryError("boom", is_transient=transient)
    result = failed_result(make_message(), envelope, error)
    assert [r.address for r in result.recipients] == [r.address for r in envelope.recipients]
    assert not result.ok
    assert (result.deferred if transient else result.rejected) == result.recipients


@given(st.lists(st.sampled_from(["ok", "transient", "permanent", "bug"]), max_size=8))
def test_send_many_never_loses_an_item(plan: list[str]) -> None:
    """Every item either has a result at its index or stopped the batch with an exception."""
    errors: dict[str, BaseException] = {
        "transient": DeliveryTimeout("slow"),
        "permanent": TLSError("bad cert"),
        "bug": ValueError("bug"),
    }
    transport = Recorder(fail=errors)
    items = [make_message(subject=kind, to=("bob@example.com",)) for kind in plan]
    if "bug" in plan:
        with pytest.raises(ValueError, match="bug"):
            transport.send_many(items)
        assert len(transport.calls) == plan.index("bug") + 1
        return
    results = transport.send_many(items)
    assert len(results) == len(plan)
    expected = {
        "ok": Outcome.ACCEPTED,
        "transient": Outcome.TRANSIENT,
        "permanent": Outcome.PERMANENT,
    }
    assert [r.recipients[0].outcome for r in results] == [expected[kind] for kind in plan]


# -- AsyncBatch: the items of asend_many, shared by the pool's workers ------------------------


@given(st.integers(min_value=0, max_value=9), st.lists(st.integers(0, 4), max_size=8))
def test_async_batch_take_and_next_share_one_order(size: int, plan: list[int]) -> None:
    """Mixing ``take(n)`` (0 for ``next()``) hands out every item of a sequence exactly
    once, with its own index and pair, in order; then both report the end."""
    pairs = [
        (make_message(subject=str(i)), Envelope("a@example.com", ["b@example.com"]))
        for i in range(size)
    ]

    async def main() -> list[tuple[int, Message, Envelope]]:
        batch = AsyncBatch(pairs)
        got: list[tuple[int, Message, Envelope]] = []
        for limit in [*plan, *[1] * size]:
            if limit:
                taken = batch.take(limit)
                assert taken is not None
                start, run_of = taken
                assert start == len(got)
                assert len(run_of) == min(limit, size - len(got))
                got += [(start + offset, *pair) for offset, pair in enumerate(run_of)]
            else:
                item = await batch.next()
                if item is not None:
                    got.append(item)
        assert batch.take(3) == (size, [])
        assert await batch.next() is None
        return got

    got = run(main())
    assert [index for index, _, _ in got] == list(range(size))
    assert [(m, e) for _, m, e in got] == pairs
    assert all(got[i][1] is pairs[i][0] and got[i][2] is pairs[i][1] for i in range(size))


def test_async_batch_take_is_only_for_sequences() -> None:
    def stream() -> Iterator[BatchItem]:
        yield make_message(to=("b@example.com",))

    async def main() -> None:
        batch = AsyncBatch(stream())
        assert batch.take(5) is None  # a streamed batch is taken one item at a time
        item = await batch.next()
        assert item is not None
        assert item[0] == 0
        assert await batch.next() is None

    run(main())
