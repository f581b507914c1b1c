"""One MemoryTransport shared by threads and tasks, some of them cancelled.

Test suites share one :class:`~mailrelay.transport.MemoryTransport` between the threads or
tasks of the code under test. Its promises (``docs/transports.md``, the module docstring of
:mod:`mailrelay.transport.memory`) must hold however the calls overlap:

- ``outbox`` holds every attempt that returned a result, once, as the very
  ``(message, envelope)`` it was sent with; an attempt whose handler raised, and an ``asend``
  cancelled before it returned, are not in it;
- each caller's messages are in ``outbox`` in the order that caller sent them, and in the
  order of their results;
- the handler's scripted answer lands on the recipient it names, of the message it was asked
  about (the scripted replies name both), recipients it does not name are accepted, and an
  attempt it fails gives that error (``send``) or a failed result (``send_many``);
- a batch stopped by a cancellation had handed over a prefix of its items, no more.

The script is a function of the message and the recipient alone, so every result can be
checked against it. Every join and wait is bounded.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mailrelay.envelope import Envelope
from mailrelay.errors import ConnectError
from mailrelay.message import Message
from mailrelay.reply import Reply
from mailrelay.results import DeliveryResult, Outcome
from mailrelay.transport import MemoryTransport
from mailrelay.transport.memory import OutboxItem
from tests.transport.helpers import run

THREADS = 8
TASKS = 24
PER_CALLER = 8
#: A hang guard for every join and wait, in seconds.
GUARD = 60.0
RECIPIENTS = ("r0@example.com", "r1@example.org", "r2@example.net")
SENDER = "alice@example.com"


def make(tag: str) -> Message:
    return Message.build(sender=SENDER, to=list(RECIPIENTS), subject=tag, text=f"{tag}\n")


def _mix(*parts: str) -> int:
    return zlib.crc32("/".join(parts).encode())


def fails(tag: str) -> bool:
    """Whether the script fails the whole attempt for message ``tag``."""
    return _mix(tag) % 5 == 0


def scripted(tag: str, address: str) -> Reply | None:
    """The script's reply for one recipient of one message (``None``: not named)."""
    pick = _mix(tag, address) % 4
    if pick == 0:
        return None
    code = (250, 451, 550)[pick - 1]
    return Reply.of(code, f"{code // 100}.0.0 {tag} to {address}")


def answer(message: Message) -> dict[str, Reply]:
    tag = message.get("Subject") or ""
    if fails(tag):
        raise ConnectError(f"scripted: {tag} unreachable", host="memory")
    script = {a: scripted(tag, a) for a in RECIPIENTS}
    return {a: reply for a, reply in script.items() if reply is not None}


def sync_handler(message: Message, envelope: Envelope) -> dict[str, Reply]:
    time.sleep(0)  # let another thread in between the handler and the outbox
    return answer(message)


async def async_handler(message: Message, envelope: Envelope) -> dict[str, Reply]:
    tag = message.get("Subject") or ""
    for _ in range(_mix(tag, "turns") % 4):  # a few loop turns: room for cancellations
        await asyncio.sleep(0)
    return answer(message)


def check_result(tag: str, result: DeliveryResult) -> None:
    """The script's answer, on the right recipients of the right message."""
    assert [str(r.address) for r in result.recipients] == list(RECIPIENTS)
    if fails(tag):
        assert not result.ok
        for recipient in result.recipients:
            assert recipient.outcome is Outcome.TRANSIENT
            assert recipient.reason is not None
            assert tag in recipient.reason
        return
    for recipient in result.recipients:
        want = scripted(tag, str(recipient.address))
        assert recipient.reply is not None
        if want is None:
            assert recipient.outcome is Outcome.ACCEPTED
        else:
            assert recipient.reply == want
            assert recipient.outcome is Outcome.from_reply(want)


def tags_in(outbox: list[OutboxItem]) -> list[str]:
    return [item.message.get("Subject") or "" for item in outbox]


def check_outbox(
    transport: MemoryTransport,
    sent: dict[str, Message],
    callers: list[list[str]],
    done: set[str],
    maybe: set[str] = frozenset(),  # type: ignore[assignment]
) -> None:
    """Each message in ``done`` is in the outbox once (``maybe`` at most once), nothing else,
    each caller's in its order, with its envelope."""
    outbox = list(transport.outbox)
    tags = tags_in(outbox)
    assert len(tags) == len(set(tags)), sorted(t for t in tags if tags.count(t) > 1)
    assert done <= set(tags), sorted(done - set(tags))
    assert set(tags) <= done | maybe, sorted(set(tags) - done - maybe)
    for item, tag in zip(outbox, tags, strict=True):
        assert not fails(tag)
        assert item.message is sent[tag]
        assert [str(r.address) for r in item.envelope.recipients] == list(RECIPIENTS)
    position = {tag: index for index, tag in enumerate(tags)}
    for caller in callers:
        mine = [position[tag] for tag in caller if tag in position]
        assert mine == sorted(mine), caller


def thread_calls(
    transport: MemoryTransport, callers: list[list[str]], sent: dict[str, Message]
) -> tuple[list[Callable[[], None]], set[str]]:
    """One worker per caller (send one by one, send_many a list, or a generator)."""
    done: set[str] = set()
    lock = threading.Lock()

    def worker(index: int, group: list[str]) -> Callable[[], None]:
        def work() -> None:
            if index % 3 == 0:
                for tag in group:
                    if fails(tag):
                        with pytest.raises(ConnectError, match=tag):
                            transport.send(sent[tag])
                        continue
                    check_result(tag, transport.send(sent[tag]))
            else:
                items: Any = (
                    [sent[tag] for tag in group]
                    if index % 3 == 1
                    else ((sent[tag], Envelope.from_message(sent[tag])) for tag in group)
                )
                results = transport.send_many(items)
                for tag, result in zip(group, results, strict=True):
                    check_result(tag, result)
            with lock:
                done.update(tag for tag in group if not fails(tag))

        return work

    return [worker(i, group) for i, group in enumerate(callers)], done


def in_threads(workers: list[Callable[[], None]]) -> list[BaseException]:
    errors: list[BaseException] = []

    def wrap(work: Callable[[], None]) -> Callable[[], None]:
        def body() -> None:
            try:
                work()
            except BaseException as exc:  # reported by the test
                errors.append(exc)

        return body

    threads = [threading.Thread(target=wrap(work)) for work in workers]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + GUARD
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), "a sender outlived its guard"
    return errors


def groups(prefix: str, count: int) -> list[list[str]]:
    return [[f"{prefix}{c}m{m}" for m in range(PER_CALLER)] for c in range(count)]


def messages(callers: list[list[str]]) -> dict[str, Message]:
    return {tag: make(tag) for group in callers for tag in group}


def test_the_script_fails_some_and_names_others() -> None:
    tags = [tag for group in groups("x", THREADS) for tag in group]
    assert any(fails(tag) for tag in tags)
    assert not all(fails(tag) for tag in tags)
    replies = {scripted(tag, a) is None for tag in tags for a in RECIPIENTS}
    assert replies == {True, False}


def test_threads_share_one_transport() -> None:
    callers = groups("t", THREADS)
    sent = messages(callers)
    transport = MemoryTransport(sync_handler)
    workers, done = thread_calls(transport, callers, sent)
    assert in_threads(workers) == []
    check_outbox(transport, sent, callers, done)


def async_calls(
    transport: MemoryTransport,
    callers: list[list[str]],
    sent: dict[str, Message],
    done: set[str],
    maybe: set[str],
) -> Iterator[Any]:
    """One coroutine per caller: asend one by one, or asend_many (a list or an async
    generator); what returned goes in ``done``, what may have been handed over in ``maybe``."""

    async def one_by_one(group: list[str]) -> None:
        for tag in group:
            # Not in ``maybe``: an asend cancelled before it returned is not in the outbox.
            if fails(tag):
                with pytest.raises(ConnectError, match=tag):
                    await transport.asend(sent[tag])
                continue
            check_result(tag, await transport.asend(sent[tag]))
            done.add(tag)

    async def batch(group: list[str], streamed: bool) -> None:
        async def stream() -> Any:
            for tag in group:
                yield sent[tag]

        maybe.update(group)  # a prefix of the group, checked below
        items = stream() if streamed else [sent[tag] for tag in group]
        results = await transport.asend_many(items)
        for tag, result in zip(group, results, strict=True):
            check_result(tag, result)
        done.update(tag for tag in group if not fails(tag))

    for index, group in enumerate(callers):
        yield one_by_one(group) if index % 3 == 0 else batch(group, streamed=index % 3 == 2)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_tasks_share_one_transport_some_cancelled(seed: int) -> None:
    rng = random.Random(seed)
    callers = groups("a", TASKS)
    sent = messages(callers)
    transport = MemoryTransport(async_handler)
    done: set[str] = set()
    maybe: set[str] = set()
    cancelled = set(rng.sample(range(TASKS), TASKS // 2))
    turns = {index: rng.randint(0, 30) for index in cancelled}

    async def main() -> list[BaseException | None]:
        tasks = [
            asyncio.create_task(call) for call in async_calls(transport, callers, sent, done, maybe)
        ]

        async def cancel(index: int) -> None:
            for _ in range(turns[index]):
                await asyncio.sleep(0)
            tasks[index].cancel()

        async with asyncio.timeout(GUARD):
            await asyncio.gather(*(cancel(index) for index in cancelled))
            outcomes: list[BaseException | None] = await asyncio.gather(
                *tasks, return_exceptions=True
            )
            return outcomes

    outcomes = run(main())
    for index, outcome in enumerate(outcomes):
        if outcome is not None:
            assert index in cancelled, outcome
            assert isinstance(outcome, asyncio.CancelledError), outcome
    assert any(outcome is not None for outcome in outcomes)
    check_outbox(transport, sent, callers, done, maybe - done)
    # A cancelled batch handed over a prefix of its items: nothing after a gap.
    tags = set(tags_in(transport.outbox))
    for group in callers:
        taken = [tag in tags or fails(tag) for tag in group]
        last = max((i for i, t in enumerate(taken) if t and not fails(group[i])), default=-1)
        assert all(taken[: last + 1]), group


def test_threads_and_tasks_share_one_transport() -> None:
    thread_callers = groups("t", THREADS // 2)
    task_callers = groups("a", TASKS // 2)
    sent = {**messages(thread_callers), **messages(task_callers)}
    transport = MemoryTransport(sync_handler)
    workers, done = thread_calls(transport, thread_callers, sent)
    task_done: set[str] = set()
    maybe: set[str] = set()

    async def main() -> None:
        async with asyncio.timeout(GUARD):
            await asyncio.gather(*async_calls(transport, task_callers, sent, task_done, maybe))

    errors = in_threads([*workers, lambda: run(main())])
    assert errors == []
    check_outbox(transport, sent, [*thread_callers, *task_callers], done | task_done)
