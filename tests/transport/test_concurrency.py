"""The SMTP, LMTP and MX pools under real concurrency: threads sharing a sync transport,
tasks sharing an async one, closing, cancelling and timing out at arbitrary moments, against
real servers on loopback.

Every message carries a unique tag (a header); the server (tests/transport/
concurrency_server.py) records which tags it received, and how many connections the client
held open at once. The properties:

* every result of an undisturbed send is ACCEPTED, and a message reported ACCEPTED was
  received exactly once; no message is ever received twice (a send that was cancelled may or
  may not have arrived, but never twice);
* never more connections open at once than the pool's ``size``;
* every thread and task ends (joins and waits are bounded: hang guards, not timings);
* after ``close()`` / ``aclose()`` every connection ends server-side, no ResourceWarning
  (pytest turns it into an error), and a send begun after closing raises ``TransportClosed``.

Randomness is seeded (a failure names its seed, and reruns the same choices; the timing of
real sockets still varies). ``CONCURRENCY_SEEDS=500`` and ``CONCURRENCY_MX_SEEDS=200`` run
the seeded async scenarios longer. The faults found here have deterministic tests at the end
(scripted servers, or a loop held still on purpose).
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import select
import socket
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator

import attrs
import pytest
from aiosmtpd.controller import Controller

from mailrelay.envelope import Envelope
from mailrelay.errors import DeliveryError, TransportClosed
from mailrelay.message import Message
from mailrelay.options import TLS, Timeouts
from mailrelay.results import DeliveryResult, Outcome
from mailrelay.transport import (
    AsyncLMTPTransport,
    AsyncSMTPTransport,
    LMTPTransport,
    PoolSettings,
    SMTPTransport,
)
from mailrelay.transport.base import failed_result
from mailrelay.transport.mx import MXTransport
from mailrelay.transport.mx_async import AsyncMXTransport
from tests.peers.scripted import (
    MESSAGE,
    Action,
    ScriptedServer,
    ScriptedServerFactory,
    Step,
    accept_message,
    ehlo,
    free_port,
    greeting,
    quit_step,
)
from tests.peers.tls import TLSFiles
from tests.peers.unbound import UnboundServer
from tests.transport.concurrency_server import (
    TAG_HEADER,
    ConcurrencyHandler,
    start_concurrency_server,
)
from tests.transport.helpers import run
from tests.transport.test_mx import free_everywhere

#: Either pooled asyncio transport (they share their pool).
AsyncSMTPBase = AsyncSMTPTransport | AsyncLMTPTransport

TIMEOUTS = Timeouts.all(10)
#: The hang guard for joining threads and waiting for tasks (never reached when all is well).
GUARD = 30.0


@attrs.frozen(kw_only=True)
class Server:
    """A running concurrency server: its port and its handler (what it saw)."""

    port: int
    seen: ConcurrencyHandler


@pytest.fixture
def server() -> Iterator[Server]:
    """A fresh counting aiosmtpd server on 127.0.0.1, stopped at teardown."""
    handler = ConcurrencyHandler()
    controller = start_concurrency_server(handler)
    yield Server(port=int(controller.port), seen=handler)
    controller.stop()


@pytest.fixture
def lmtp_server() -> Iterator[Server]:
    """The same in LMTP (one reply per recipient after the data)."""
    handler = ConcurrencyHandler(lmtp=True)
    controller = start_concurrency_server(handler)
    yield Server(port=int(controller.port), seen=handler)
    controller.stop()


RECIPIENTS = ("bob@example.com", "carol@example.org", "dave@example.net")


def tagged(tag: str, recipients: int = 1) -> Message:
    """A message to the first ``recipients`` of :data:`RECIPIENTS`, carrying ``tag``."""
    return Message.build(
        sender="alice@example.com",
        to=list(RECIPIENTS[:recipients]),
        subject=tag,
        text=f"message {tag}\n",
        headers={TAG_HEADER: tag},
    )


def sync_transport(server: Server, pool: PoolSettings) -> SMTPTransport:
    return SMTPTransport("127.0.0.1", server.port, tls=TLS.NONE, timeouts=TIMEOUTS, pool=pool)


class Ledger:
    """What the senders were told, per tag (thread- and task-safe: one lock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.results: dict[str, DeliveryResult] = {}
        """The result each tag got."""
        self.unsent: set[str] = set()
        """Tags whose single send raised TransportClosed (nothing may have left)."""
        self.unknown: set[str] = set()
        """Tags whose call ended without a result (cancelled, or a batch cut short)."""
        self.errors: list[BaseException] = []
        """Anything a sender met that it should not have."""

    def record(self, tags: list[str], results: list[DeliveryResult]) -> None:
        with self._lock:
            assert len(results) == len(tags), (tags, results)
            self.results.update(zip(tags, results, strict=True))
            self.unknown.difference_update(tags)

    def mark(self, which: set[str], tags: list[str]) -> None:
        with self._lock:
            which.update(tags)

    def error(self, exc: BaseException) -> None:
        with self._lock:
            self.errors.append(exc)

    def check(self, received: Counter[str], *, hangups: bool = False) -> None:
        """The properties every scenario shares (see the module docstring); with
        ``hangups`` (the server drops connections), a result may also be a transient
        failure: for a message that did not arrive, or whose final reply the hang-up lost
        (RFC 1047: it may have arrived, once)."""
        assert not self.errors, self.errors
        twice = {tag: n for tag, n in received.items() if n > 1}
        assert not twice, f"received more than once: {twice}"
        for tag, result in self.results.items():
            if hangups and not result.ok:
                assert {r.outcome for r in result.recipients} == {Outcome.TRANSIENT}
                continue
            assert result.ok, (tag, result)
            assert {r.outcome for r in result.recipients} == {Outcome.ACCEPTED}
            assert received[tag] == 1, f"{tag} reported ACCEPTED but received {received[tag]}x"
        sent_unasked = {tag for tag in self.unsent if received[tag]}
        assert not sent_unasked, f"TransportClosed, yet received: {sorted(sent_unasked)}"
        known = set(self.results) | self.unsent | self.unknown
        assert set(received) <= known, f"received, never sent: {set(received) - known}"


def join_all(threads: list[threading.Thread]) -> None:
    """Join every thread, within :data:`GUARD` seconds in all."""
    deadline = threading.Event()
    timer = threading.Timer(GUARD, deadline.set)
    timer.start()
    try:
        for thread in threads:
            while thread.is_alive() and not deadline.is_set():
                thread.join(timeout=0.05)
    finally:
        timer.cancel()
    stuck = [t.name for t in threads if t.is_alive()]
    assert not stuck, f"threads still running after {GUARD} s: {stuck}"


def send_some(
    transport: SMTPTransport | LMTPTransport,
    tags: list[str],
    rng: random.Random,
    recipients: int = 1,
) -> list[DeliveryResult]:
    """``tags`` sent as one ``send``, a ``send_many`` of a list, or a streamed one."""
    if len(tags) == 1 and rng.random() < 0.7:
        return [transport.send(tagged(tags[0], recipients))]
    if rng.random() < 0.5:
        return transport.send_many([tagged(tag, recipients) for tag in tags])
    return transport.send_many(tagged(tag, recipients) for tag in tags)


# -- 1. threads share one sync pool -----------------------------------------------------------

THREADS = 8
ROUNDS = 6

SYNC_POOLS = {
    # Connections replaced often (QUIT after 5 messages) while others wait for a slot.
    "replaced": PoolSettings(size=3, max_messages=5),
    # Every reuse checked with NOOP first; two connections for eight threads.
    "noop-checked": PoolSettings(size=2, health_check_after=1e-6),
}


def threads_sharing(server: Server, pool: PoolSettings, *, lmtp: bool = False) -> None:
    """Eight threads send through one transport at once (see the section's tests)."""
    transport: SMTPTransport | LMTPTransport
    if lmtp:
        transport = LMTPTransport(
            "127.0.0.1", server.port, tls=TLS.NONE, timeouts=TIMEOUTS, pool=pool
        )
    else:
        transport = sync_transport(server, pool)
    ledger = Ledger()
    start = threading.Barrier(THREADS, timeout=GUARD)

    def worker(n: int) -> None:
        rng = random.Random(n)
        try:
            start.wait()
            for r in range(ROUNDS):
                tags = [f"s{n}-{r}-{i}" for i in range(rng.choice([1, 1, 2, 3, 4]))]
                recipients = rng.randint(1, 3) if lmtp else 1
                ledger.record(tags, send_some(transport, tags, rng, recipients))
        except BaseException as exc:  # any exception is a failure: report it to the test
            ledger.error(exc)

    threads = [
        threading.Thread(target=worker, args=(n,), name=f"sender {n}") for n in range(THREADS)
    ]
    for thread in threads:
        thread.start()
    join_all(threads)
    transport.close()
    received = server.seen.tags()
    ledger.check(received)
    assert len(ledger.results) == len(received) > THREADS * ROUNDS - 1
    assert server.seen.most_at_once <= pool.size
    assert server.seen.wait_all_closed(), "a connection outlived close()"


@pytest.mark.parametrize("name", sorted(SYNC_POOLS))
def test_threads_sharing_a_sync_pool_each_message_arrives_once(name: str, server: Server) -> None:
    threads_sharing(server, SYNC_POOLS[name])


def test_threads_sharing_a_sync_lmtp_pool(lmtp_server: Server) -> None:
    # LMTP: one final reply per recipient after the data, one to three recipients.
    threads_sharing(lmtp_server, SYNC_POOLS["replaced"], lmtp=True)


# -- 2. close() from another thread while threads send ---------------------------------------------


def test_close_while_threads_send(server: Server) -> None:
    pool = PoolSettings(size=3, max_messages=7)
    transport = sync_transport(server, pool)
    ledger = Ledger()
    closed = threading.Event()  # set once close() has returned
    after_close: list[str] = []  # tags first sent after close() returned

    def worker(n: int) -> None:
        rng = random.Random(100 + n)
        try:
            for r in range(200):  # bounded; TransportClosed ends it long before
                tags = [f"c{n}-{r}-{i}" for i in range(rng.choice([1, 1, 2, 3]))]
                began_closed = closed.is_set()
                try:
                    results = send_some(transport, tags, rng)
                except TransportClosed:
                    # A single send refused by a closed pool sent nothing; a batch may have
                    # handed some of its messages over before the pool closed.
                    ledger.mark(ledger.unsent if len(tags) == 1 else ledger.unknown, tags)
                    return
                if began_closed:
                    after_close.extend(tags)
                ledger.record(tags, results)
        except BaseException as exc:  # any other exception is a failure
            ledger.error(exc)

    threads = [
        threading.Thread(target=worker, args=(n,), name=f"sender {n}") for n in range(THREADS)
    ]
    for thread in threads:
        thread.start()
    for _ in range(1000):  # bounded: at most 10 s
        if len(server.seen.messages) >= 30:
            break
        threading.Event().wait(0.01)
    transport.close()
    closed.set()
    join_all(threads)
    assert not after_close, f"sent after close() returned: {after_close}"
    with pytest.raises(TransportClosed):
        transport.send(tagged("late"))
    ledger.check(server.seen.tags())
    assert server.seen.most_at_once <= pool.size
    assert server.seen.wait_all_closed(), "a connection outlived close()"
    gc.collect()  # a socket left unclosed warns here (an error under pytest)


# -- 2b. the server hangs up on idle connections while threads and tasks use the pool ------------

#: The server's idle limit in the hang-up scenario: shorter than some pauses between sends.
HANGUP_AFTER = 0.02


@pytest.fixture
def impatient_server() -> Iterator[Server]:
    """A counting server that hangs up on a client silent for :data:`HANGUP_AFTER` seconds."""
    handler = ConcurrencyHandler()
    controller = start_concurrency_server(handler, idle_timeout=HANGUP_AFTER)
    yield Server(port=int(controller.port), seen=handler)
    controller.stop()


HANGUP_POOLS = {
    "as-is": PoolSettings(size=3),
    "noop-checked": PoolSettings(size=3, health_check_after=1e-6),
}


def hung_up(tags: list[str], error: DeliveryError) -> DeliveryResult:
    """The result of a single send that raised ``error`` (checked as any failed result)."""
    [tag] = tags
    message = tagged(tag)
    return failed_result(message, Envelope.from_message(message), error)


@pytest.mark.parametrize("name", sorted(HANGUP_POOLS))
def test_threads_meet_connections_the_server_dropped(name: str, impatient_server: Server) -> None:
    # Pauses around the server's idle limit: a connection taken from the pool may have been
    # dropped while idle, or be dropped as it is taken. Nothing is lost silently (a reused
    # dead connection means sending again on a fresh one) and nothing arrives twice.
    pool = HANGUP_POOLS[name]
    transport = sync_transport(impatient_server, pool)
    ledger = Ledger()

    def worker(n: int) -> None:
        rng = random.Random(200 + n)
        try:
            for r in range(10):
                threading.Event().wait(rng.uniform(0.6, 1.4) * HANGUP_AFTER)
                tags = [f"h{n}-{r}-{i}" for i in range(rng.choice([1, 1, 2, 3]))]
                try:
                    results = send_some(transport, tags, rng)
                except DeliveryError as exc:  # a single send on a fresh connection it dropped
                    results = [hung_up(tags, exc)]
                ledger.record(tags, results)
        except BaseException as exc:  # any exception is a failure: report it to the test
            ledger.error(exc)

    threads = [threading.Thread(target=worker, args=(n,), name=f"sender {n}") for n in range(4)]
    for thread in threads:
        thread.start()
    join_all(threads)
    transport.close()
    ledger.check(impatient_server.seen.tags(), hangups=True)
    assert impatient_server.seen.most_at_once <= pool.size
    assert impatient_server.seen.wait_all_closed(), "a connection outlived close()"


@pytest.mark.parametrize("name", sorted(HANGUP_POOLS))
def test_tasks_meet_connections_the_server_dropped(name: str, impatient_server: Server) -> None:
    pool = HANGUP_POOLS[name]
    ledger = Ledger()

    async def worker(transport: AsyncSMTPTransport, n: int) -> None:
        rng = random.Random(300 + n)
        for r in range(10):
            await asyncio.sleep(rng.uniform(0.6, 1.4) * HANGUP_AFTER)
            plan = TaskPlan(
                tags=[f"h{n}-{r}-{i}" for i in range(rng.choice([1, 1, 2, 3]))],
                call=rng.choice(["send", "many", "stream"]),
                start=0,
                deadline=None,
                cancel_after=None,
            )
            if plan.call == "send":
                plan = attrs.evolve(plan, tags=plan.tags[:1])
            await sender(transport, plan, ledger, hangups=True)

    async def main() -> None:
        async with AsyncSMTPTransport(
            "127.0.0.1", impatient_server.port, tls=TLS.NONE, timeouts=TIMEOUTS, pool=pool
        ) as transport:
            async with asyncio.timeout(GUARD):
                await asyncio.gather(*(worker(transport, n) for n in range(4)))

    run(main())
    gc.collect()
    ledger.check(impatient_server.seen.tags(), hangups=True)
    assert not ledger.unknown
    assert impatient_server.seen.most_at_once <= pool.size
    assert impatient_server.seen.wait_all_closed(), "a connection outlived aclose()"


# -- 3. tasks share one async pool; cancellations, timeouts and aclose() at random moments ---------


@attrs.frozen(kw_only=True)
class TaskPlan:
    """What one sending task does, drawn from a seeded random.

    Attributes:
        tags: the tags of its messages.
        call: ``"send"`` (``asend``, one message), ``"many"`` (``asend_many`` of a list) or
            ``"stream"`` (``asend_many`` of an async generator).
        start: ``asyncio.sleep(0)`` calls before it begins.
        deadline: an ``asyncio.timeout`` around the call (seconds), or ``None``.
        cancel_after: cancel the task after this many ``asyncio.sleep(0)`` calls (an ``int``)
            or this many seconds (a ``float``), or never (``None``).
        recipients: the recipients of each message (:func:`tagged`).
    """

    tags: list[str]
    call: str
    start: int
    deadline: float | None
    cancel_after: int | float | None
    recipients: int = 1


def draw_plans(rng: random.Random, tasks: int, recipients: int = 1) -> list[TaskPlan]:
    plans = []
    for n in range(tasks):
        call = rng.choice(["send", "send", "many", "stream"])
        count = 1 if call == "send" else rng.randint(1, 5)
        disturb = rng.random()
        plans.append(
            TaskPlan(
                tags=[f"a{n}-{i}" for i in range(count)],
                call=call,
                start=rng.randint(0, 20),
                deadline=rng.uniform(0.0, 0.03) if 0.2 <= disturb < 0.35 else None,
                cancel_after=(
                    rng.randint(0, 60)
                    if disturb < 0.1
                    else rng.uniform(0.0, 0.03)
                    if disturb < 0.2
                    else None
                ),
                recipients=recipients,
            )
        )
    return plans


async def _messages(plan: TaskPlan) -> AsyncIterator[Message]:
    for tag in plan.tags:
        await asyncio.sleep(0)  # another task may run between two items
        yield tagged(tag, plan.recipients)


async def call_plan(transport: AsyncSMTPBase, plan: TaskPlan) -> list[DeliveryResult]:
    if plan.call == "send":
        return [await transport.asend(tagged(plan.tags[0], plan.recipients))]
    if plan.call == "many":
        return await transport.asend_many([tagged(tag, plan.recipients) for tag in plan.tags])
    return await transport.asend_many(_messages(plan))


async def sender(
    transport: AsyncSMTPBase, plan: TaskPlan, ledger: Ledger, *, hangups: bool = False
) -> None:
    """Carry out ``plan``, recording what it was told in ``ledger``; with ``hangups`` (the
    server drops connections) a single send may raise a DeliveryError (its result then)."""
    ledger.mark(ledger.unknown, plan.tags)  # until it has a result
    for _ in range(plan.start):
        await asyncio.sleep(0)
    try:
        if plan.deadline is None:
            results = await call_plan(transport, plan)
        else:
            try:
                async with asyncio.timeout(plan.deadline) as scope:
                    results = await call_plan(transport, plan)
            except TimeoutError:
                if not scope.expired():
                    raise
                return  # our own deadline: the messages' fate is unknown
    except TransportClosed:
        if plan.call == "send":
            ledger.mark(ledger.unsent, plan.tags)
        return
    except asyncio.CancelledError:
        raise  # the test cancelled it: unknown
    except DeliveryError as exc:
        if not hangups:
            ledger.error(exc)
            return
        results = [hung_up(plan.tags, exc)]
    except BaseException as exc:  # anything else is a failure
        ledger.error(exc)
        return
    ledger.record(plan.tags, results)


async def cancel_later(task: asyncio.Task[None], after: int | float) -> None:
    if isinstance(after, int):
        for _ in range(after):
            await asyncio.sleep(0)
    else:
        await asyncio.sleep(after)
    task.cancel()


#: Seeds of the async scenario; ``CONCURRENCY_SEEDS=500`` searches longer (about 0.1 s each).
ASYNC_SEEDS = range(int(os.environ.get("CONCURRENCY_SEEDS", "12")))


def tasks_cancellations_and_aclose(seed: int, server: Server, *, lmtp: bool = False) -> None:
    """The async scenario for ``seed`` (see the section's tests)."""
    rng = random.Random(seed)
    pool = PoolSettings(
        size=rng.randint(2, 4),
        max_messages=rng.choice([2, 5, 100]),
        # Every reuse NOOP-checked, or none; the keeper expiring idle connections as
        # tasks take them, or not.
        health_check_after=rng.choice([1e-6, 5.0]),
        idle_timeout=rng.choice([0.01, 0.05, 30.0]),
    )
    plans = draw_plans(rng, tasks=24, recipients=rng.randint(1, 3) if lmtp else 1)
    close_after = rng.choice([rng.randint(0, 200), rng.uniform(0.0, 0.1)])
    ledger = Ledger()
    cls: type[AsyncSMTPTransport] | type[AsyncLMTPTransport] = (
        AsyncLMTPTransport if lmtp else AsyncSMTPTransport
    )

    async def main() -> None:
        transport = cls("127.0.0.1", server.port, tls=TLS.NONE, timeouts=TIMEOUTS, pool=pool)
        tasks = [asyncio.ensure_future(sender(transport, plan, ledger)) for plan in plans]
        helpers = [
            asyncio.ensure_future(cancel_later(task, plan.cancel_after))
            for task, plan in zip(tasks, plans, strict=True)
            if plan.cancel_after is not None
        ]
        if isinstance(close_after, int):
            for _ in range(close_after):
                await asyncio.sleep(0)
        else:
            await asyncio.sleep(close_after)
        async with asyncio.timeout(GUARD):
            await transport.aclose()
        _, pending = await asyncio.wait([*tasks, *helpers], timeout=GUARD)
        assert not pending, f"{len(pending)} task(s) still running after {GUARD} s"
        with pytest.raises(TransportClosed):
            await transport.asend(tagged("late"))
        # A fresh transport works at once.
        fresh = cls("127.0.0.1", server.port, tls=TLS.NONE, timeouts=TIMEOUTS)
        async with fresh:
            result = await fresh.asend(tagged(f"fresh-{seed}"))
        ledger.record([f"fresh-{seed}"], [result])

    run(main())
    ledger.check(server.seen.tags())
    assert server.seen.most_at_once <= pool.size
    assert server.seen.wait_all_closed(), "a connection outlived aclose()"
    gc.collect()  # a socket left unclosed warns here (an error under pytest)


@pytest.mark.parametrize("seed", ASYNC_SEEDS)
def test_async_tasks_with_cancellations_and_aclose(seed: int, server: Server) -> None:
    tasks_cancellations_and_aclose(seed, server)


@pytest.mark.parametrize("seed", ASYNC_SEEDS[: len(ASYNC_SEEDS) // 2])
def test_async_lmtp_tasks_with_cancellations_and_aclose(seed: int, lmtp_server: Server) -> None:
    # LMTP: one final reply per recipient after the data, several recipients per message.
    tasks_cancellations_and_aclose(1000 + seed, lmtp_server, lmtp=True)


# -- 4. aclose() itself cancelled ---------------------------------------------------------------


@pytest.mark.parametrize("ticks", range(5))
def test_a_cancelled_aclose_leaves_no_connection_open(ticks: int, server: Server) -> None:
    # aclose() cancelled `ticks` turns of the event loop after it began (as a shutdown that cancels
    # the task closing the pool, or an asyncio.timeout around it, would): whatever it had
    # not QUIT yet is still closed, not left to the garbage collector.
    tags = [f"k{ticks}-{n}" for n in range(3)]
    ledger = Ledger()

    async def main() -> None:
        transport = AsyncSMTPTransport(
            "127.0.0.1", server.port, tls=TLS.NONE, timeouts=TIMEOUTS, pool=PoolSettings(size=3)
        )
        # Three sends at once leave three connections idle in the pool.
        results = await asyncio.gather(*(transport.asend(tagged(tag)) for tag in tags))
        ledger.record(tags, list(results))
        closing = asyncio.ensure_future(transport.aclose())
        for _ in range(1 + ticks):  # the first turn starts it
            await asyncio.sleep(0)
        closing.cancel()
        await asyncio.wait([closing], timeout=GUARD)
        assert closing.done()
        with pytest.raises(TransportClosed):
            await transport.asend(tagged("late"))
        await asyncio.sleep(0)  # the aborted connections' close callbacks

    run(main())
    gc.collect()  # a socket left unclosed warns here (an error under pytest)
    ledger.check(server.seen.tags())
    assert server.seen.wait_all_closed(), "a connection outlived aclose()"


# -- 5. one send cancelled at every turn of the event loop ---------------------------------------

SWEEP_POOLS = {
    # The send opens a connection.
    "fresh": PoolSettings(size=1),
    # The send takes an idle connection as it is.
    "reused": PoolSettings(size=1),
    # The send checks an idle connection with NOOP first.
    "noop-checked": PoolSettings(size=1, health_check_after=1e-6),
    # The send QUITs the connection after its message (one message per connection).
    "replaced": PoolSettings(size=1, max_messages=1),
}
#: Cancellation points swept: turns of the event loop, and moments up to 20 ms.
SWEEP = 40


@pytest.mark.parametrize("call", ["send", "many"])
@pytest.mark.parametrize("mode", sorted(SWEEP_POOLS))
def test_a_send_cancelled_at_any_turn_leaves_the_pool_sound(
    mode: str, call: str, server: Server
) -> None:
    pool = SWEEP_POOLS[mode]
    ledger = Ledger()

    async def once(turns: int) -> None:
        transport = AsyncSMTPTransport(
            "127.0.0.1", server.port, tls=TLS.NONE, timeouts=TIMEOUTS, pool=pool
        )
        async with transport:
            if mode != "fresh":
                before = f"before-{mode}-{call}-{turns}"
                ledger.record([before], [await transport.asend(tagged(before))])
            plan = TaskPlan(
                tags=[f"cut-{mode}-{call}-{turns}-{i}" for i in range(1 if call == "send" else 3)],
                call=call,
                start=0,
                deadline=None,
                cancel_after=turns,
            )
            task = asyncio.ensure_future(sender(transport, plan, ledger))
            # Turns of the loop, and (connecting takes a thread's getaddrinfo) moments.
            await cancel_later(task, turns if turns % 2 == 0 else turns * 0.0005)
            await asyncio.wait([task], timeout=GUARD)
            assert task.done()
            # The slot is free and the pool sound: the next message goes through.
            after = f"after-{mode}-{call}-{turns}"
            async with asyncio.timeout(GUARD):
                ledger.record([after], [await transport.asend(tagged(after))])

    async def main() -> None:
        for turns in range(SWEEP):
            await once(turns)

    run(main())
    gc.collect()  # a socket left unclosed warns here (an error under pytest)
    ledger.check(server.seen.tags())
    assert server.seen.most_at_once <= pool.size
    assert server.seen.wait_all_closed(), "a connection outlived aclose()"


@pytest.mark.parametrize("mode", ["fresh", "reused"])
def test_a_send_cancelled_during_starttls_leaves_the_pool_sound(
    mode: str, tls_files: TLSFiles
) -> None:
    # As above, over STARTTLS: cancelled while connecting, in the TLS handshake, or in the
    # encrypted dialogue, the connection is closed (no ResourceWarning from a half-made TLS
    # transport) and the pool goes on.
    handler = ConcurrencyHandler()
    controller = start_concurrency_server(handler, tls_context=tls_files.server_context())
    ledger = Ledger()

    async def once(turns: int) -> None:
        async with AsyncSMTPTransport(
            "127.0.0.1",
            int(controller.port),
            tls=TLS.STARTTLS,
            ssl_context=tls_files.client_context(),
            timeouts=TIMEOUTS,
            pool=PoolSettings(size=1),
        ) as transport:
            if mode == "reused":
                before = f"tls-before-{turns}"
                ledger.record([before], [await transport.asend(tagged(before))])
            plan = TaskPlan(
                tags=[f"tls-cut-{mode}-{turns}"],
                call="send",
                start=0,
                deadline=None,
                cancel_after=0,
            )
            task = asyncio.ensure_future(sender(transport, plan, ledger))
            await cancel_later(task, turns if turns % 2 == 0 else turns * 0.0005)
            await asyncio.wait([task], timeout=GUARD)
            assert task.done()
            after = f"tls-after-{mode}-{turns}"
            async with asyncio.timeout(GUARD):
                ledger.record([after], [await transport.asend(tagged(after))])

    async def main() -> None:
        for turns in range(SWEEP):
            await once(turns)

    try:
        run(main())
        gc.collect()  # a socket or TLS transport left unclosed warns here
        ledger.check(handler.tags())
        assert handler.most_at_once <= 1
        assert handler.wait_all_closed(), "a connection outlived aclose()"
    finally:
        controller.stop()


# -- 6. MX transports shared by threads and tasks, several domains per message ---------------------

#: Test-zone domains (tests/peers/unbound.py) and the address of each one's exchanger:
#: mailrelay.test and sink.mailrelay.test share mx.mailrelay.test (so they share sessions),
#: a-only.test is its own exchanger at the same address, dom00/dom01 have their own addresses.
MX_DOMAINS = {
    "mailrelay.test": "127.0.0.1",
    "sink.mailrelay.test": "127.0.0.1",
    "a-only.test": "127.0.0.1",
    "dom00.test": "127.0.1.1",
    "dom01.test": "127.0.1.2",
}
MX_POOL = PoolSettings(size=2, max_messages=3, idle_timeout=30.0, health_check_after=1e-6)


@attrs.frozen(kw_only=True)
class Exchangers:
    """The servers behind :data:`MX_DOMAINS`, all on one port."""

    port: int
    servers: dict[str, ConcurrencyHandler]

    def deliveries(self) -> Counter[tuple[str, str]]:
        total: Counter[tuple[str, str]] = Counter()
        for handler in self.servers.values():
            total += handler.deliveries()
        return total

    def all_closed(self) -> bool:
        return all(handler.wait_all_closed() for handler in self.servers.values())


@pytest.fixture
def exchangers() -> Iterator[Exchangers]:
    """A concurrency server on every exchanger address of :data:`MX_DOMAINS`, one port."""
    addresses = sorted(set(MX_DOMAINS.values()))
    controllers: list[Controller] = []
    try:
        for _ in range(20):  # a port free on every address (bounded tries)
            for controller in controllers:
                controller.stop()
            controllers, handlers = [], {}
            port = free_port()
            try:
                for address in addresses:
                    handlers[address] = ConcurrencyHandler()
                    controllers.append(
                        start_concurrency_server(handlers[address], address=address, port=port)
                    )
            except (OSError, RuntimeError):
                continue
            break
        yield Exchangers(port=port, servers=handlers)
    finally:
        for controller in controllers:
            controller.stop()


class MXLedger(Ledger):
    """A :class:`Ledger` of MX sends: a message reaches each of its domains separately."""

    def __init__(self) -> None:
        super().__init__()
        self.recipients: dict[str, list[str]] = {}

    def check_mx(self, received: Counter[tuple[str, str]]) -> None:
        assert not self.errors, self.errors
        twice = {key: n for key, n in received.items() if n > 1}
        assert not twice, f"received more than once: {twice}"
        for tag, result in self.results.items():
            for r in result.recipients:
                assert r.outcome is Outcome.ACCEPTED, (tag, r)
                assert received[tag, str(r.address)] == 1, (tag, r, received[tag, str(r.address)])
        sent_unasked = {tag for tag, _ in received if tag in self.unsent}
        assert not sent_unasked, f"TransportClosed, yet received: {sorted(sent_unasked)}"
        known = set(self.results) | self.unknown
        assert {tag for tag, _ in received} <= known


def mx_message(tag: str, rng: random.Random, ledger: MXLedger) -> Message:
    """A message to one to three random domains of :data:`MX_DOMAINS`."""
    domains = rng.sample(sorted(MX_DOMAINS), rng.randint(1, 3))
    to = [f"user{rng.randint(0, 9)}@{domain}" for domain in domains]
    ledger.recipients[tag] = to
    return Message.build(
        sender="sender@mailrelay.test",
        to=to,
        subject=tag,
        text=f"message {tag}\n",
        headers={TAG_HEADER: tag},
    )


@pytest.mark.unbound
def test_threads_sharing_an_mx_transport(unbound: UnboundServer, exchangers: Exchangers) -> None:
    ledger = MXLedger()
    transport = MXTransport(
        unbound.resolver(timeout=2.0),
        port=exchangers.port,
        timeouts=TIMEOUTS,
        pool=MX_POOL,
        refused_networks=(),
    )
    start = threading.Barrier(6, timeout=GUARD)

    def worker(n: int) -> None:
        rng = random.Random(1000 + n)
        try:
            start.wait()
            for r in range(5):
                tags = [f"m{n}-{r}-{i}" for i in range(rng.choice([1, 1, 2]))]
                messages = [mx_message(tag, rng, ledger) for tag in tags]
                if len(messages) == 1:
                    results = [transport.send(messages[0])]
                else:
                    results = transport.send_many(messages)
                ledger.record(tags, results)
                assert len(transport._pool) <= MX_POOL.size
        except BaseException as exc:  # any exception is a failure: report it to the test
            ledger.error(exc)

    threads = [threading.Thread(target=worker, args=(n,), name=f"mx {n}") for n in range(6)]
    for thread in threads:
        thread.start()
    join_all(threads)
    transport.close()
    ledger.check_mx(exchangers.deliveries())
    assert len(ledger.results) >= 30
    assert exchangers.all_closed(), "a connection outlived close()"
    gc.collect()


@pytest.mark.unbound
def test_mx_close_while_threads_send(unbound: UnboundServer, exchangers: Exchangers) -> None:
    # close() from the main thread while six threads send: a send under way answers every
    # recipient (its sessions are QUIT when given back), a send begun after close() raises
    # TransportClosed and sends nothing (as the SMTP transports do), every copy arrives
    # once, and no session outlives the senders.
    ledger = MXLedger()
    transport = MXTransport(
        unbound.resolver(timeout=2.0),
        port=exchangers.port,
        timeouts=TIMEOUTS,
        pool=MX_POOL,
        refused_networks=(),
    )

    def worker(n: int) -> None:
        rng = random.Random(2000 + n)
        try:
            for r in range(6):
                tag = f"mc{n}-{r}"
                message = mx_message(tag, rng, ledger)
                try:
                    result = transport.send(message)
                except TransportClosed:
                    ledger.mark(ledger.unsent, [tag])
                    return
                ledger.record([tag], [result])
        except BaseException as exc:  # any exception is a failure: report it to the test
            ledger.error(exc)

    threads = [threading.Thread(target=worker, args=(n,), name=f"mx {n}") for n in range(6)]
    for thread in threads:
        thread.start()
    for _ in range(1000):  # bounded: at most 10 s
        if sum(len(h.messages) for h in exchangers.servers.values()) >= 10:
            break
        threading.Event().wait(0.01)
    transport.close()
    join_all(threads)
    assert len(transport._pool) == 0
    ledger.check_mx(exchangers.deliveries())
    assert 0 < len(ledger.results) < 36
    assert len(ledger.unsent) == 6  # every thread's next send after close()
    assert exchangers.all_closed(), "a connection outlived close()"
    gc.collect()


@pytest.mark.unbound
@pytest.mark.parametrize("seed", range(int(os.environ.get("CONCURRENCY_MX_SEEDS", "4"))))
def test_async_mx_tasks_with_cancellations_and_aclose(
    seed: int, unbound: UnboundServer, exchangers: Exchangers
) -> None:
    rng = random.Random(seed)
    ledger = MXLedger()
    plans = draw_plans(rng, tasks=16)
    close_after = rng.choice([rng.randint(0, 200), rng.uniform(0.0, 0.1)])
    messages = {tag: mx_message(tag, rng, ledger) for plan in plans for tag in plan.tags}

    async def call(transport: AsyncMXTransport, plan: TaskPlan) -> list[DeliveryResult]:
        if plan.call == "send":
            return [await transport.asend(messages[plan.tags[0]])]
        return await transport.asend_many([messages[tag] for tag in plan.tags])

    async def mx_sender(transport: AsyncMXTransport, plan: TaskPlan) -> None:
        ledger.mark(ledger.unknown, plan.tags)
        for _ in range(plan.start):
            await asyncio.sleep(0)
        try:
            async with asyncio.timeout(plan.deadline) as scope:
                results = await call(transport, plan)
        except TimeoutError:
            if not scope.expired():
                ledger.error(AssertionError(f"{plan.tags}: a timeout that was not ours"))
            return
        except asyncio.CancelledError:
            raise  # the test cancelled it: unknown
        except TransportClosed:
            # Begun after aclose(): a single send sent nothing; a batch may have sent the
            # messages before it (unknown).
            if plan.call == "send":
                ledger.mark(ledger.unsent, plan.tags)
            return
        except BaseException as exc:  # anything else is a failure
            ledger.error(exc)
            return
        ledger.record(plan.tags, results)

    async def main() -> None:
        transport = AsyncMXTransport(
            unbound.async_resolver(timeout=2.0),
            port=exchangers.port,
            timeouts=TIMEOUTS,
            pool=MX_POOL,
            refused_networks=(),
        )
        tasks = [asyncio.ensure_future(mx_sender(transport, plan)) for plan in plans]
        helpers = [
            asyncio.ensure_future(cancel_later(task, plan.cancel_after))
            for task, plan in zip(tasks, plans, strict=True)
            if plan.cancel_after is not None
        ]
        if isinstance(close_after, int):
            for _ in range(close_after):
                await asyncio.sleep(0)
        else:
            await asyncio.sleep(close_after)
        async with asyncio.timeout(GUARD):
            await transport.aclose()
        _, pending = await asyncio.wait([*tasks, *helpers], timeout=GUARD)
        assert not pending, f"{len(pending)} task(s) still running after {GUARD} s"
        assert len(transport._pool) == 0  # closed: nothing kept idle

    run(main())
    gc.collect()  # a socket left unclosed warns here (an error under pytest)
    ledger.check_mx(exchangers.deliveries())
    assert exchangers.all_closed(), "a connection outlived aclose()"


@pytest.mark.unbound
@pytest.mark.parametrize("ticks", range(5))
def test_a_cancelled_mx_aclose_leaves_no_connection_open(
    ticks: int, unbound: UnboundServer, exchangers: Exchangers
) -> None:
    # As test_a_cancelled_aclose_leaves_no_connection_open, for the MX pool.
    ledger = MXLedger()
    tag = f"mk{ticks}"
    message = Message.build(
        sender="sender@mailrelay.test",
        to=["a@mailrelay.test", "b@dom00.test", "c@dom01.test"],
        subject=tag,
        text="three exchangers\n",
        headers={TAG_HEADER: tag},
    )

    async def main() -> None:
        transport = AsyncMXTransport(
            unbound.async_resolver(timeout=2.0),
            port=exchangers.port,
            timeouts=TIMEOUTS,
            pool=PoolSettings(size=3, idle_timeout=30.0),
            refused_networks=(),
        )
        ledger.record([tag], [await transport.asend(message)])
        assert len(transport._pool) == 3  # one idle session per exchanger
        closing = asyncio.ensure_future(transport.aclose())
        for _ in range(1 + ticks):  # the first turn starts it
            await asyncio.sleep(0)
        closing.cancel()
        await asyncio.wait([closing], timeout=GUARD)
        assert closing.done()
        await asyncio.sleep(0)  # the aborted connections' close callbacks

    run(main())
    gc.collect()  # a socket left unclosed warns here (an error under pytest)
    ledger.check_mx(exchangers.deliveries())
    assert exchangers.all_closed(), "a connection outlived aclose()"


# -- 7. bytes the server sent while idle that the event loop has not read yet -------------------

STRAY = {
    "extra-reply": b"250 2.0.0 one reply too many\r\n",
    "421": b"421 4.4.2 shutting down\r\n",
}


def _await_readable(transport: AsyncSMTPTransport) -> None:
    """Block (the event loop too, on purpose) until the kernel holds bytes for the idle
    connection, without reading them: the loop has not seen them when the next send starts."""
    [idle] = transport._idle
    driver_transport = idle.driver._transport
    assert driver_transport is not None
    sock = driver_transport.get_extra_info("socket")
    readable, _, _ = select.select([sock], [], [], GUARD)
    assert readable, "the server never sent its stray bytes"


@pytest.mark.parametrize("stray", sorted(STRAY))
def test_stray_bytes_not_yet_read_by_the_loop_keep_a_connection_out_of_use(
    stray: str, scripted_server: ScriptedServerFactory
) -> None:
    # A task takes a connection from the pool in the same turn of the event loop in which
    # the server's unasked bytes arrived (the loop has not called data_received yet). Looking
    # at the pipe's buffer alone says "nothing there": the connection must still not be
    # used, or the stray reply answers the next MAIL and every reply after it the wrong
    # command (the blocking driver peeks at the socket itself and never reuses it).
    server = scripted_server(
        [
            [
                greeting(),
                ehlo("PIPELINING"),
                *accept_message(1),
                Step(reply=STRAY[stray], delay=0.05, action=Action.SILENT, silence=GUARD),
            ],
            [greeting(), ehlo("PIPELINING"), *accept_message(1), quit_step()],
        ],
        tls=None,
    )

    async def main() -> list[bool]:
        async with AsyncSMTPTransport(
            "127.0.0.1",
            server.port,
            tls=TLS.NONE,
            timeouts=Timeouts.all(3),
            pool=PoolSettings(size=1, health_check_after=86400.0),
        ) as transport:
            first = await transport.asend(tagged("one"))
            _await_readable(transport)
            second = await transport.asend(tagged("two"))  # no turn of the loop in between
            return [first.ok, second.ok]

    assert run(main()) == [True, True]
    lines = server.session(0).lines
    assert sum(line.startswith(b"MAIL") for line in lines) == 1  # nothing more sent on it
    assert b"X-Test-Tag: two" in bytes(server.session(1).received)


# -- 8. a reused connection that ends after the server had the whole message -------------------


def _ends_after_data(action: Action) -> list[Step]:
    """A session that takes one message, then a second one whole, and ends before replying
    to its end of data (as a server whose idle timer fired while it stored the message, or
    that crashed after storing it: RFC 1047)."""
    return [
        greeting(),
        ehlo("PIPELINING"),
        *accept_message(1),
        *accept_message(1)[:-1],
        Step(expect=MESSAGE, action=action),
    ]


ENDINGS = {"eof": Action.CLOSE, "reset": Action.RESET}


def quick_sync(port: int, pool: PoolSettings) -> SMTPTransport:
    return SMTPTransport("127.0.0.1", port, tls=TLS.NONE, timeouts=Timeouts.all(5), pool=pool)


def quick_async(port: int, pool: PoolSettings) -> AsyncSMTPTransport:
    return AsyncSMTPTransport("127.0.0.1", port, tls=TLS.NONE, timeouts=Timeouts.all(5), pool=pool)


@pytest.mark.parametrize("flavour", ["sync", "async"])
@pytest.mark.parametrize("ending", sorted(ENDINGS))
def test_a_message_the_server_may_have_taken_is_not_sent_again(
    flavour: str, ending: str, scripted_server: ScriptedServerFactory
) -> None:
    # The connection is reused (it carried the first message), but it did not die while
    # idle: MAIL, RCPT and DATA were answered and the whole message went out. Its final
    # reply never came, so the server may have taken it; sending it again at once on a
    # fresh connection would deliver it twice. It is TRANSIENT (the caller decides).
    server = scripted_server(
        [
            _ends_after_data(ENDINGS[ending]),
            [greeting(), ehlo("PIPELINING"), *accept_message(1), quit_step()],
        ],
        tls=None,
    )
    pool = PoolSettings(size=1, health_check_after=86400.0)
    messages = [tagged("one"), tagged("two")]
    outcomes: list[bool | str] = []
    if flavour == "sync":
        with quick_sync(server.port, pool) as transport:
            outcomes.append(transport.send(messages[0]).ok)
            try:
                outcomes.append(transport.send(messages[1]).ok)
            except DeliveryError as exc:
                outcomes.append(type(exc).__name__)
    else:

        async def main() -> None:
            async with quick_async(server.port, pool) as transport:
                outcomes.append((await transport.asend(messages[0])).ok)
                try:
                    outcomes.append((await transport.asend(messages[1])).ok)
                except DeliveryError as exc:
                    outcomes.append(type(exc).__name__)

        run(main())
    assert outcomes == [True, "ConnectionLost"]
    assert b"X-Test-Tag: two" in bytes(server.session(0).received)
    assert len(server.sessions) == 1  # no fresh connection: not sent a second time


@pytest.mark.parametrize("flavour", ["sync", "async"])
@pytest.mark.parametrize("ending", sorted(ENDINGS))
def test_a_batch_message_the_server_may_have_taken_is_not_sent_again(
    flavour: str, ending: str, scripted_server: ScriptedServerFactory
) -> None:
    # The same in a pipelined batch: the first message is answered, the second's data went
    # out whole and its final reply never came (TRANSIENT), the third had not begun (its
    # envelope went with the second's data): it goes on a fresh connection.
    server = scripted_server(
        [
            _ends_after_data(ENDINGS[ending]),
            [greeting(), ehlo("PIPELINING"), *accept_message(1), quit_step()],
        ],
        tls=None,
    )
    pool = PoolSettings(size=1)
    batch = [tagged("one"), tagged("two"), tagged("three")]
    if flavour == "sync":
        with quick_sync(server.port, pool) as transport:
            results = transport.send_many(batch)
    else:

        async def main() -> list[DeliveryResult]:
            async with quick_async(server.port, pool) as transport:
                return await transport.asend_many(batch)

        results = run(main())
    assert [r.ok for r in results] == [True, False, True]
    assert [r.outcome for r in results[1].recipients] == [Outcome.TRANSIENT]
    fresh = bytes(server.session(1).received)
    assert b"X-Test-Tag: two" not in fresh  # never sent twice
    assert b"X-Test-Tag: three" in fresh


@pytest.fixture
def mx_port() -> int:
    """The exchangers' shared port for one test."""
    return free_everywhere()


ScriptedMX = Callable[[str, list[list[Step]]], ScriptedServer]


@pytest.fixture
def scripted_mx(mx_port: int) -> Iterator[ScriptedMX]:
    """``scripted_mx(address, scripts)``: a plain-text scripted server on an exchanger's
    address and :func:`mx_port` (its listener swapped before it starts, as test_mx does)."""
    servers: list[ScriptedServer] = []

    def make(address: str, scripts: list[list[Step]]) -> ScriptedServer:
        server = ScriptedServer(scripts, ssl_context=None, timeout=5.0)
        server._listener.close()
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((address, mx_port))
        listener.listen(16)
        listener.settimeout(0.05)
        server._listener = listener
        server.host, server.port = address, mx_port
        servers.append(server)
        return server.start()

    yield make
    errors = []
    for server in servers:
        server.stop()
        errors.extend(server.errors)
    assert not errors, f"scripted server errors: {errors}"


def _mx_send_each(
    flavour: str, unbound: UnboundServer, port: int, messages: list[Message]
) -> list[DeliveryResult]:
    """``send`` / ``asend`` each message in turn on one MX transport (closed at the end)."""
    pool = PoolSettings(size=2, health_check_after=86400.0)
    if flavour == "sync":
        resolver = unbound.resolver(timeout=1.0)
        with MXTransport(
            resolver, port=port, timeouts=Timeouts.all(3), pool=pool, refused_networks=()
        ) as mx:
            return [mx.send(message) for message in messages]

    async def main() -> list[DeliveryResult]:
        resolver = unbound.async_resolver(timeout=1.0)
        async with AsyncMXTransport(
            resolver, port=port, timeouts=Timeouts.all(3), pool=pool, refused_networks=()
        ) as mx:
            return [await mx.asend(message) for message in messages]

    return run(main())


def _to_mx(domain: str, tag: str) -> Message:
    return Message.build(
        sender="sender@mailrelay.test",
        to=[f"bob@{domain}"],
        subject=tag,
        text="one copy only\n",
        headers={TAG_HEADER: tag},
    )


@pytest.mark.unbound
@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_an_mx_message_the_exchanger_may_have_taken_is_not_sent_again(
    flavour: str, unbound: UnboundServer, scripted_mx: ScriptedMX, mx_port: int
) -> None:
    # The second message goes on the session the first left idle; the exchanger has all of
    # it, then hangs up before its final reply. A fresh session to the same exchanger (the
    # stale-session rule) would deliver it twice: the recipient is TRANSIENT instead.
    server = scripted_mx(
        "127.0.0.1",
        [
            _ends_after_data(Action.CLOSE),
            [greeting(), ehlo("PIPELINING"), *accept_message(1), quit_step()],
        ],
    )
    first, second = _mx_send_each(
        flavour,
        unbound,
        mx_port,
        [_to_mx("mailrelay.test", "one"), _to_mx("mailrelay.test", "two")],
    )
    assert first.ok
    assert [r.outcome for r in second.recipients] == [Outcome.TRANSIENT]
    assert second.recipients[0].host == f"mx.mailrelay.test[127.0.0.1]:{mx_port}"
    assert b"X-Test-Tag: two" in bytes(server.session(0).received)
    assert len(server.sessions) == 1  # not sent a second time


@pytest.mark.unbound
@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_an_mx_message_the_exchanger_may_have_taken_is_not_sent_to_the_next(
    flavour: str, unbound: UnboundServer, scripted_mx: ScriptedMX, mx_port: int
) -> None:
    # mx2.test prefers 127.0.0.1 over 127.0.0.2. The first exchanger has the whole message
    # and hangs up before its final reply: trying the second would deliver it twice.
    first = scripted_mx(
        "127.0.0.1",
        [
            [
                greeting(),
                ehlo("PIPELINING"),
                *accept_message(1)[:-1],
                Step(expect=MESSAGE, action=Action.CLOSE),
            ]
        ],
    )
    second = scripted_mx(
        "127.0.0.2", [[greeting(), ehlo("PIPELINING"), *accept_message(1), quit_step()]]
    )
    [result] = _mx_send_each(flavour, unbound, mx_port, [_to_mx("mx2.test", "once")])
    assert [r.outcome for r in result.recipients] == [Outcome.TRANSIENT]
    assert b"X-Test-Tag: once" in bytes(first.session(0).received)
    assert not second.sessions  # the next exchanger was not asked
