"""CPU per pipelined message through the dialogue, the protocol core and each driver, with the
network faked out: what mailrelay itself costs per message, apart from the kernel and the server.

Run from the repository root::

    python benchmarks/hotpath_bench.py [--messages 20000] [--runs 7] [--profile]

``deliver_many`` sends the messages, pipelined across messages (RFC 2920 §3.1), over:

* the blocking driver on a fake socket whose ``recv_into`` hands back what a fast server
  would answer (each message's final reply, with a queue id that differs every time as real
  servers' do, then the next message's MAIL, RCPT and DATA replies);
* the asyncio driver on a fake transport that answers each write on the next turn of the
  event loop, the same replies.

Each runs twice: the same 1 KB message every time (``smtp_throughput.py``'s case), and a
different message to a different recipient every time (real traffic; the messages are built
before the clock starts). Figures are CPU microseconds per message (``time.process_time``),
the minimum and median of ``--runs`` runs: on a shared machine the minimum is the steadier.
``--profile`` adds a cProfile of one blocking run. This script prints figures; it asserts
nothing but that every message was accepted.

For a figure that does not move with the machine's load, count instructions instead, e.g.
``valgrind --tool=cachegrind --cache-sim=no python benchmarks/hotpath_bench.py --messages
2000 --runs 1`` against ``--messages 500`` and divide the difference by 1,500.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import ssl
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mailrelay.envelope import Envelope
from mailrelay.flow import Session, SessionConfig
from mailrelay.message import Message
from mailrelay.options import TLS, Timeouts
from mailrelay.transport.async_driver import AsyncDriver, _Pipe
from mailrelay.transport.sync_driver import SyncDriver

SENDER = "bench@mailrelay.test"
GREETING = b"220 sink.mailrelay.test ESMTP\r\n"
EHLO = (
    b"250-sink.mailrelay.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n250-DSN\r\n250 \r\n"
)
ENVELOPE_REPLIES = b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
TIMEOUTS = Timeouts.all(60)

Items = Sequence[tuple[Message, Envelope]]


def final_reply(serial: int) -> bytes:
    """A final reply with a queue id of its own, as real servers give."""
    return b"250 2.0.0 Ok: queued as %06X\r\n" % serial


def message_bytes(recipient: str, serial: int) -> bytes:
    """About 1 KB: a few headers and 78-character lines."""
    head = (
        f"From: {SENDER}\r\nTo: {recipient}\r\nSubject: benchmark {serial}\r\n"
        f"Message-ID: <bench{serial}@mailrelay.test>\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
    ).encode()
    return head + (b"x" * 76 + b"\r\n") * 11


def same_items(count: int) -> list[tuple[Message, Envelope]]:
    recipient = "sink@sink.mailrelay.test"
    pair = (Message.from_bytes(message_bytes(recipient, 0)), Envelope(SENDER, [recipient]))
    return [pair] * count


def distinct_items(count: int) -> list[tuple[Message, Envelope]]:
    items = []
    for serial in range(count):
        recipient = f"user{serial}@sink{serial % 50}.mailrelay.test"
        message = Message.from_bytes(message_bytes(recipient, serial))
        items.append((message, Envelope(SENDER, [recipient])))
    return items


def new_session() -> Session:
    return Session(
        SessionConfig(
            local_hostname="client.mailrelay.test",
            server_hostname="sink.mailrelay.test",
            tls=TLS.NONE,
        )
    )


def check(outcome: Any) -> None:
    if outcome.error is not None or not all(r is not None and r.ok for r in outcome.results):
        raise RuntimeError(f"not every message was accepted: {outcome.error}")


# -- the blocking driver -------------------------------------------------------------------


class FakeSocket:
    """What ``SyncDriver`` uses of a socket; reads answer as a fast server would."""

    family = 2  # AF_INET

    def __init__(self, messages: int) -> None:
        self._messages = messages
        self._opening = [GREETING, EHLO, ENVELOPE_REPLIES]
        self._finals = 0

    def settimeout(self, timeout: float | None) -> None:
        pass

    def setsockopt(self, *args: object) -> None:
        pass

    def send(self, data: bytes) -> int:
        return len(data)

    def recv_into(self, buffer: bytearray) -> int:
        if self._opening:
            data = self._opening.pop(0)
        else:
            self._finals += 1
            data = final_reply(self._finals)
            if self._finals < self._messages:
                data += ENVELOPE_REPLIES
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        pass


def run_blocking(items: Items, profile: bool = False) -> float:
    """CPU seconds per message for one blocking run."""
    sock = FakeSocket(len(items))
    driver = SyncDriver(
        sock,  # type: ignore[arg-type]
        timeouts=TIMEOUTS,
        ssl_context=ssl.create_default_context(),
        peer="sink:25",
    )
    session = new_session()
    driver.run(session.open())
    profiler = cProfile.Profile() if profile else None
    start = time.process_time()
    if profiler is not None:
        profiler.enable()
    outcome = driver.run(session.deliver_many(items))
    if profiler is not None:
        profiler.disable()
    used = time.process_time() - start
    check(outcome)
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    return used / len(items)


# -- the asyncio driver --------------------------------------------------------------------


class FakeTransport(asyncio.Transport):
    """What ``AsyncDriver`` uses of a transport; each write is answered on the next turn of
    the event loop, as a fast server would."""

    def __init__(self, pipe: _Pipe, messages: int) -> None:
        super().__init__()
        self._pipe = pipe
        self._messages = messages
        self._loop = asyncio.get_running_loop()
        self._writes = 0
        self._closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._writes += 1
        if self._writes == 1:
            reply = EHLO
        elif self._writes == 2:
            reply = ENVELOPE_REPLIES
        else:
            reply = final_reply(self._writes)
            if self._writes < self._messages + 2:
                reply += ENVELOPE_REPLIES
        self._loop.call_soon(self._pipe.data_received, reply)

    def is_closing(self) -> bool:
        return self._closing

    def abort(self) -> None:
        self._closing = True

    def close(self) -> None:
        self._closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def run_asyncio(items: Items) -> float:
    """CPU seconds per message for one asyncio run."""

    async def main() -> float:
        pipe = _Pipe()
        transport = FakeTransport(pipe, len(items))
        pipe.connection_made(transport)
        driver = AsyncDriver(
            transport,
            pipe,
            timeouts=TIMEOUTS,
            ssl_context=ssl.create_default_context(),
            peer="sink:25",
        )
        session = new_session()
        asyncio.get_running_loop().call_soon(pipe.data_received, GREETING)
        await driver.run(session.open())
        start = time.process_time()
        outcome = await driver.run(session.deliver_many(items))
        used = time.process_time() - start
        check(outcome)
        return used / len(items)

    return asyncio.run(main())


# -- the run -------------------------------------------------------------------------------


def figures(runs: int, once: Callable[[], float]) -> tuple[float, float]:
    """Minimum and median microseconds per message over ``runs`` runs."""
    results = [once() * 1e6 for _ in range(runs)]
    return min(results), statistics.median(results)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=20_000, help="messages per run")
    parser.add_argument("--runs", type=int, default=7, help="runs per figure")
    parser.add_argument("--profile", action="store_true", help="cProfile one blocking run")
    options = parser.parse_args()
    count = max(2, options.messages)
    same = same_items(count)
    distinct = distinct_items(count)
    print(f"Python {sys.version.split()[0]}, {count} messages per run, {options.runs} runs")
    print("CPU µs per pipelined message (min / median):")
    for name, once in (
        ("blocking driver, same message", lambda: run_blocking(same)),
        ("blocking driver, distinct messages", lambda: run_blocking(distinct)),
        ("asyncio driver, same message", lambda: run_asyncio(same)),
        ("asyncio driver, distinct messages", lambda: run_asyncio(distinct)),
    ):
        low, middle = figures(options.runs, once)
        print(f"  {name:<38} {low:7.2f} / {middle:7.2f}")
    if options.profile:
        run_blocking(same, profile=True)


if __name__ == "__main__":
    main()
