"""The asyncio driver's own loop: steps answered from ``data_received`` while a Read waits.

The driver runs a step on from the protocol's callbacks (no task wake-up per reply); these
tests hold it to the same contract as the ordinary loop: every wait bounded by its phase
limit, even after replies already answered from the callbacks; the step's own errors
re-raised by ``run`` with the connection closed; cancellation closing the connection.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Generator

import pytest

from mailrelay.envelope import Envelope
from mailrelay.errors import DeliveryTimeout
from mailrelay.flow import Read, Request, Session, SessionConfig, Write
from mailrelay.options import TLS, Timeouts
from mailrelay.transport.async_driver import READ_SIZE, AsyncDriver, _Pipe, connect
from tests.peers.scripted import (
    MESSAGE,
    Action,
    ScriptedServerFactory,
    Step,
    accept_message,
    ehlo,
    greeting,
)
from tests.transport.helpers import make_message, run


async def _open(port: int, timeouts: Timeouts) -> tuple[AsyncDriver, Session]:
    driver = await connect("127.0.0.1", port, timeouts=timeouts)
    session = Session(
        SessionConfig(
            local_hostname="client.mailrelay.test",
            server_hostname="127.0.0.1",
            tls=TLS.NONE,
            peer=driver.peer,
        )
    )
    await driver.run(session.open())
    return driver, session


def test_a_server_silent_in_the_middle_of_a_pipelined_batch_times_out_in_its_phase(
    scripted_server: ScriptedServerFactory,
) -> None:
    # Message 1 is answered (its final reply comes with message 2's envelope replies, one
    # step at a time, so several reads feed the step from the callbacks); then the server
    # says nothing about message 2's data. The read waiting for it must end at the
    # data_end limit, not at the server's 10 s of silence (which would be an EOF), nor at
    # the later deadline of an earlier read's phase (30 s: the same EOF).
    server = scripted_server(
        [
            [
                greeting(),
                ehlo("PIPELINING", "8BITMIME"),
                *accept_message(1),
                Step(expect=r"MAIL FROM:<.*>.*", reply=b"250 2.1.0 Ok\r\n"),
                Step(expect=r"RCPT TO:<.*>.*", reply=b"250 2.1.5 Ok\r\n"),
                Step(expect="DATA", reply=b"354 go ahead\r\n"),
                Step(expect=MESSAGE, action=Action.SILENT, silence=10.0),
            ]
        ]
    )
    timeouts = Timeouts(connect=5, greeting=30, mail=30, rcpt=30, data_init=30, data_end=0.3)
    messages = [make_message(to=(f"user{n}@example.com",), subject=f"m{n}") for n in range(3)]

    async def main() -> None:
        driver, session = await _open(server.port, timeouts)
        items = [(m, Envelope.from_message(m)) for m in messages]
        outcome = await driver.run(session.deliver_many(items))
        assert isinstance(outcome.error, DeliveryTimeout), outcome.error
        assert "phase 'data_end'" in str(outcome.error)
        first, second, third = outcome.results
        assert first is not None
        assert first.ok
        assert second is None
        assert third is None
        assert driver.closed

    run(main())


def _noop_then_fail() -> Generator[Request, bytes | None, None]:
    yield Write(data=b"NOOP\r\n", phase="greeting")
    answer = yield Read(phase="greeting")
    assert answer is not None
    assert answer.startswith(b"250")
    raise ValueError("the step's own error")


def test_an_error_raised_by_the_step_while_fed_from_the_callbacks_reaches_run(
    scripted_server: ScriptedServerFactory,
) -> None:
    server = scripted_server(
        [[greeting(), ehlo(), Step(expect="NOOP", reply=b"250 2.0.0 Ok\r\n"), Step(expect="X")]]
    )

    async def main() -> None:
        driver, _session = await _open(server.port, Timeouts.all(5))
        with pytest.raises(ValueError, match="the step's own error"):
            await driver.run(_noop_then_fail())
        assert driver.closed

    run(main())


def test_cancelling_a_run_that_waits_for_a_reply_closes_the_connection(
    scripted_server: ScriptedServerFactory,
) -> None:
    server = scripted_server(
        [[greeting(), ehlo(), Step(expect="NOOP", action=Action.SILENT, silence=10.0)]]
    )
    closed: list[bool] = []

    def step() -> Generator[Request, bytes | None, None]:
        try:
            yield Write(data=b"NOOP\r\n", phase="greeting")
            yield Read(phase="greeting")
        finally:
            closed.append(True)

    async def main() -> None:
        driver, _session = await _open(server.port, Timeouts.all(5))
        task = asyncio.ensure_future(driver.run(step()))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert driver.closed
        assert closed == [True]  # the step was closed, its cleanup ran

    run(main())


class _QuietTransport(asyncio.Transport):
    """What the driver uses of a transport, for bytes handed to the protocol by the test."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self._closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self._closing

    def abort(self) -> None:
        self._closing = True

    def close(self) -> None:
        self._closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _one_exchange(
    line: bytes, got: list[bytes | None], reads: int = 1
) -> Generator[Request, bytes | None, None]:
    yield Write(data=line, phase="greeting", flush=True)
    for _ in range(reads):
        got.append((yield Read(phase="greeting")))


@pytest.mark.parametrize(
    "first_bytes", [b"250 first\r\n", b"250 " + b"x" * READ_SIZE + b"\r\n"], ids=["small", "large"]
)
def test_bytes_that_come_after_the_step_has_its_answer_wait_for_the_next_read(
    first_bytes: bytes,
) -> None:
    """Two deliveries in one turn of the loop: the first answers the step (which then
    ends), the second comes before the task resumes. Its bytes are kept for the next run,
    whether the first went straight to the step (small) or through the buffer (more than
    one read's worth)."""
    second_bytes = b"250 second\r\n"

    async def main() -> tuple[list[bytes | None], list[bytes | None], int]:
        loop = asyncio.get_running_loop()
        pipe = _Pipe()
        transport = _QuietTransport()
        pipe.connection_made(transport)
        driver = AsyncDriver(
            transport,
            pipe,
            timeouts=Timeouts.all(5),
            ssl_context=ssl.create_default_context(),
            peer="test:25",
        )

        def deliver() -> None:
            pipe.data_received(first_bytes)
            pipe.data_received(second_bytes)  # the step has ended by now

        first: list[bytes | None] = []
        loop.call_soon(deliver)
        await driver.run(_one_exchange(b"NOOP\r\n", first))
        buffered = pipe.buffered
        second: list[bytes | None] = []
        await driver.run(_one_exchange(b"NOOP\r\n", second))
        return first, second, buffered

    first, second, buffered = run(main())
    assert first == [first_bytes[:READ_SIZE]]
    rest = first_bytes[READ_SIZE:] + second_bytes
    assert buffered == len(rest)
    assert second == [rest]
