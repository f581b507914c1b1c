"""SMTP throughput against Postfix's ``smtp-sink`` on loopback, side by side in one run.

Run from the repository root (so ``tests.peers`` imports)::

    python benchmarks/smtp_throughput.py [--scale 0.25] [--repeat 3] [--placement split]

Scenarios (issue 4; the counts are multiplied by ``--scale``):

1. 20,000 x 1 KB messages over one connection: mailrelay (``SMTPTransport.send_many``,
   pipelined) beside the standard library's ``smtplib`` (``sendmail`` per message, no
   pipelining) and Postfix's C client ``smtp-source`` (one session, ``-d``).
2. The same over 4 connections: ``AsyncSMTPTransport.asend_many`` with a pool of 4, beside
   aiosmtplib with 4 tasks (one connection each) and ``smtp-source -s 4``.
3. 5,000 x 100 KB over one connection: mailrelay beside smtplib.
4. Building a personalised message per recipient and sending it: ``Message.build`` +
   ``send_many`` beside ``email.message.EmailMessage`` + ``smtplib.send_message``.

Fairness: every client sends the same bytes with an explicit envelope (``sendmail`` gets
the sender and recipient list too: no header parsing on either side); each client runs
``--repeat`` times, round-robin with the others, and its best run counts.

mailrelay pipelines across messages (RFC 2920 §3.1: the next MAIL/RCPT/DATA follow the
previous message's terminator in one write). smtp-sink does not offer CHUNKING, so DATA's
354 still costs one round trip per message; against a server with CHUNKING
(``chunking=True``) whole messages are in flight at once.

A *reference* row in scenarios 1-3 is a bare loop over a socket (or an asyncio Protocol)
that pipelines exactly as mailrelay does and checks only the reply codes: no library, no
per-recipient results. It shows what any RFC-compliant client can reach against this server
on this machine at this moment, so how much of a ratio is left to the client and how much
the server (and the one round trip per message) fixes.

CPU placement (``--placement``, see ``benchmarks/placement.py``): by default the clients
(this process, and ``smtp-source``) run on one CPU and ``smtp-sink`` on another, as a server
across a network would; ``shared`` puts them all on one CPU (every client is then several
times faster on this kind of machine, and each figure counts the server's work too), and
``free`` leaves it to the scheduler, whose choice can change within a run.

For the in-process clients it also prints client CPU microseconds per message
(``time.process_time``; smtp-sink runs in its own process, so this is the client alone).
Goals, as ratios of the same run: (1) >= 3x smtplib, (2) >= 5x aiosmtplib,
(3) >= 2.5x smtplib, (4) >= 3x smtplib. This script prints figures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import smtplib
import socket
import statistics
import sys
import time
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiosmtplib  # type: ignore[import-untyped,unused-ignore]
from placement import MODES, default_mode, place

from mailrelay.envelope import Envelope
from mailrelay.message import Message
from mailrelay.options import TLS, Timeouts
from mailrelay.transport import AsyncSMTPTransport, PoolSettings, SMTPTransport
from tests.peers.sink import SMTPSink, run_smtp_source

#: The reference rows: the best an RFC-compliant client can do against this server here.
FLOOR = "reference: bare pipelined socket loop"
FLOOR_ASYNC = "reference: bare asyncio loop (4 conns)"

SENDER = "bench@mailrelay.test"
RECIPIENT = "sink@sink.mailrelay.test"
TIMEOUTS = Timeouts.all(60)


def raw_message(size: int) -> bytes:
    """A message of about ``size`` bytes: a few headers and 78-character lines."""
    head = (
        f"From: {SENDER}\r\nTo: {RECIPIENT}\r\nSubject: benchmark\r\n"
        "Message-ID: <bench@mailrelay.test>\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
    ).encode()
    line = b"x" * 76 + b"\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head + body


class Figure:
    """One measured run: messages, wall seconds, client CPU seconds."""

    def __init__(self, name: str, messages: int, wall: float, cpu: float | None) -> None:
        self.name = name
        self.messages = messages
        self.wall = wall
        self.cpu = cpu

    @property
    def rate(self) -> float:
        return self.messages / self.wall

    def line(self) -> str:
        cpu = f"{self.cpu / self.messages * 1e6:9.1f} µs CPU/msg" if self.cpu is not None else ""
        return f"  {self.name:<44} {self.rate:10.0f} msg/s  {self.wall:7.2f} s  {cpu}"


def measure(name: str, messages: int, work: Callable[[], object], *, cpu: bool = True) -> Figure:
    started_cpu = time.process_time()
    started = time.perf_counter()
    work()
    wall = time.perf_counter() - started
    used = time.process_time() - started_cpu
    return Figure(name, messages, wall, used if cpu else None)


def best(figures: list[Figure]) -> Figure:
    return max(figures, key=lambda f: f.rate)


class Runs:
    """Every run of one client, in round order."""

    def __init__(self, figures: list[Figure]) -> None:
        self.figures = figures

    @property
    def best(self) -> Figure:
        return best(self.figures)

    def line(self) -> str:
        return self.best.line()


def ratio(ours: Runs, theirs: Runs) -> str:
    """``ours`` over ``theirs``: the ratio of the best runs, and the median of the ratios
    within each round (runs next to each other in time, so a change in the machine's speed
    between rounds cancels out)."""
    rounds = [a.rate / b.rate for a, b in zip(ours.figures, theirs.figures, strict=True)]
    return (
        f"{ours.best.rate / theirs.best.rate:.2f}x (round median {statistics.median(rounds):.2f}x)"
    )


def compare(times: int, *runs: Callable[[], Figure]) -> list[Runs]:
    """Run every client ``times`` times, round-robin (so that a change in the machine's load
    touches all of them alike); each one's runs, of which the best is shown."""
    figures: list[list[Figure]] = [[] for _ in runs]
    for _ in range(times):
        for index, run in enumerate(runs):
            figures[index].append(run())
    return [Runs(f) for f in figures]


# -- clients -------------------------------------------------------------------------------


def mailrelay_sync(sink: SMTPSink, messages: list[tuple[Message, Envelope]]) -> None:
    pool = PoolSettings(size=1, max_messages=10**9)
    with SMTPTransport(sink.host, sink.port, tls=TLS.NONE, timeouts=TIMEOUTS, pool=pool) as smtp:
        results = smtp.send_many(list(messages))
    assert all(r.ok for r in results)


def mailrelay_async(
    sink: SMTPSink, messages: list[tuple[Message, Envelope]], connections: int
) -> None:
    pool = PoolSettings(size=connections, max_messages=10**9)

    async def main() -> None:
        async with AsyncSMTPTransport(
            sink.host, sink.port, tls=TLS.NONE, timeouts=TIMEOUTS, pool=pool
        ) as smtp:
            results = await smtp.asend_many(list(messages))
        assert all(r.ok for r in results)

    asyncio.run(main())


def smtplib_raw(sink: SMTPSink, raw: bytes, count: int) -> None:
    with smtplib.SMTP(sink.host, sink.port, timeout=60) as client:
        for _ in range(count):
            client.sendmail(SENDER, [RECIPIENT], raw)


def aiosmtplib_raw(sink: SMTPSink, raw: bytes, count: int, connections: int) -> None:
    async def one(n: int) -> None:
        client = aiosmtplib.SMTP(hostname=sink.host, port=sink.port, start_tls=False, timeout=60)
        await client.connect()
        for _ in range(n):
            await client.sendmail(SENDER, [RECIPIENT], raw)
        await client.quit()

    async def main() -> None:
        share = [
            count // connections + (1 if i < count % connections else 0) for i in range(connections)
        ]
        await asyncio.gather(*(one(n) for n in share))

    asyncio.run(main())


class _Replies:
    """Reads whole SMTP replies from a byte stream and checks their codes (for the
    reference clients below; no parsing beyond the code and the final-line marker)."""

    def __init__(self) -> None:
        self.buffer = b""

    def take(self, data: bytes, expected: list[bytes]) -> bool:
        """Add ``data``; ``True`` once ``expected`` (codes of final lines, in order) have all
        arrived, which are then consumed; raises on any other code."""
        self.buffer += data
        finals: list[bytes] = []
        start = 0
        while len(finals) < len(expected):
            end = self.buffer.find(b"\r\n", start)
            if end < 0:
                return False
            line = self.buffer[start:end]
            start = end + 2
            if line[3:4] != b"-":
                finals.append(line[:3])
        if finals != expected:
            raise RuntimeError(f"unexpected replies {finals}, wanted {expected}")
        self.buffer = self.buffer[start:]
        return True


def _reference_groups(raw: bytes) -> tuple[bytes, bytes, list[bytes], list[bytes]]:
    envelope = f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RECIPIENT}>\r\nDATA\r\n".encode()
    data = raw + b".\r\n"  # raw ends in CRLF and has no line starting with "."
    return envelope, data, [b"250", b"250", b"354"], [b"250", b"250", b"250", b"354"]


def reference_sync(sink: SMTPSink, raw: bytes, count: int) -> None:
    """The floor for any RFC-compliant client on one connection: a bare socket loop that
    pipelines exactly as mailrelay does (the message's data and terminator, then the next
    MAIL/RCPT/DATA, in one write; one round trip per message, since DATA's 354 must come
    before the data, RFC 2920 §3.1) and checks only the reply codes."""
    envelope, data, first, then = _reference_groups(raw)
    replies = _Replies()
    with socket.create_connection((sink.host, sink.port), timeout=60) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def wait(expected: list[bytes]) -> None:
            data_in = b""
            while not replies.take(data_in, expected):
                data_in = sock.recv(65536)
                if not data_in:
                    raise RuntimeError("the server closed the connection")

        wait([b"220"])
        sock.sendall(b"EHLO client.mailrelay.test\r\n")
        wait([b"250"])
        sock.sendall(envelope)
        wait(first)
        both = data + envelope
        for _ in range(count - 1):
            sock.sendall(both)
            wait(then)
        sock.sendall(data + b"QUIT\r\n")
        wait([b"250", b"221"])


class _ReferenceProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.replies = _Replies()
        self.expected: list[bytes] = [b"220"]
        self.waiter: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        waiter = self.waiter
        try:
            done = self.replies.take(data, self.expected)
        except RuntimeError as exc:
            if waiter is not None and not waiter.done():
                waiter.set_exception(exc)
            return
        if done and waiter is not None and not waiter.done():
            waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc or ConnectionError("closed"))

    async def exchange(self, data: bytes | None, expected: list[bytes]) -> None:
        self.expected = expected
        self.waiter = asyncio.get_running_loop().create_future()
        if data is not None:
            assert self.transport is not None
            self.transport.write(data)
        if not self.replies.take(b"", expected):
            await asyncio.wait_for(self.waiter, 60)


def reference_async(sink: SMTPSink, raw: bytes, count: int, connections: int) -> None:
    """The same floor on ``connections`` asyncio connections (a bare Protocol each)."""
    envelope, data, first, then = _reference_groups(raw)

    async def one(n: int) -> None:
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_connection(_ReferenceProtocol, sink.host, sink.port)
        await protocol.exchange(None, [b"220"])
        await protocol.exchange(b"EHLO client.mailrelay.test\r\n", [b"250"])
        await protocol.exchange(envelope, first)
        both = data + envelope
        for _ in range(n - 1):
            await protocol.exchange(both, then)
        await protocol.exchange(data + b"QUIT\r\n", [b"250", b"221"])
        transport.close()

    async def main() -> None:
        share = [
            count // connections + (1 if i < count % connections else 0) for i in range(connections)
        ]
        await asyncio.gather(*(one(n) for n in share if n))

    asyncio.run(main())


def personalised_mailrelay(sink: SMTPSink, count: int) -> None:
    pool = PoolSettings(size=1, max_messages=10**9)
    with SMTPTransport(sink.host, sink.port, tls=TLS.NONE, timeouts=TIMEOUTS, pool=pool) as smtp:
        messages = (
            Message.build(
                sender=SENDER,
                to=[f"user{n}@sink.mailrelay.test"],
                subject=f"Hello user {n}",
                text=f"Dear user {n},\n\nyour code is {n * 7919 % 100000:05d}.\n",
            )
            for n in range(count)
        )
        results = smtp.send_many(messages)
    assert all(r.ok for r in results)


def personalised_smtplib(sink: SMTPSink, count: int) -> None:
    with smtplib.SMTP(sink.host, sink.port, timeout=60) as client:
        for n in range(count):
            message = EmailMessage()
            message["From"] = SENDER
            message["To"] = f"user{n}@sink.mailrelay.test"
            message["Subject"] = f"Hello user {n}"
            message.set_content(f"Dear user {n},\n\nyour code is {n * 7919 % 100000:05d}.\n")
            client.send_message(message)


# -- the run -------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every count")
    parser.add_argument("--repeat", type=int, default=3, help="runs per client (best kept)")
    parser.add_argument(
        "--placement",
        choices=MODES,
        default=default_mode(),
        help="where client and server run (see benchmarks/placement.py)",
    )
    options = parser.parse_args()

    def scaled(count: int) -> int:
        return max(10, int(count * options.scale))

    r = options.repeat

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"Python {sys.version.split()[0]}, scale {options.scale}, best of {r} "
        f"(clients run round-robin), {os.cpu_count()} CPUs, load average {load}"
    )
    with SMTPSink() as sink:
        assert sink.pid is not None
        print(place(options.placement, [sink.pid]))
        # 1. one connection, 1 KB
        n = scaled(20_000)
        raw = raw_message(1024)
        # Explicit envelopes, as smtplib.sendmail is given: no header parsing on either side.
        envelope = Envelope(SENDER, [RECIPIENT])
        message = Message.from_bytes(raw)
        pair = (message, envelope)
        print(f"\n1. {n} x 1 KB over one connection")
        ours, theirs, source, floor = compare(
            r,
            lambda: measure(
                "mailrelay SMTPTransport (pipelined)",
                n,
                lambda: mailrelay_sync(sink, [pair] * n),
            ),
            lambda: measure("smtplib", n, lambda: smtplib_raw(sink, raw, n)),
            lambda: measure(
                "smtp-source (C, Postfix)",
                n,
                lambda: run_smtp_source(sink.host, sink.port, messages=n, size=1024),
                cpu=False,
            ),
            lambda: measure(FLOOR, n, lambda: reference_sync(sink, raw, n)),
        )
        for figure in (ours, theirs, source, floor):
            print(figure.line())
        print(
            f"  ratio mailrelay/smtplib {ratio(ours, theirs)} (goal >= 3x); "
            f"mailrelay/smtp-source {ratio(ours, source)}; "
            f"floor/smtplib {ratio(floor, theirs)}"
        )

        # 2. four connections
        print(f"\n2. {n} x 1 KB over 4 connections")
        ours4, aio4, source4, floor4 = compare(
            r,
            lambda: measure(
                "mailrelay AsyncSMTPTransport (pool 4)",
                n,
                lambda: mailrelay_async(sink, [pair] * n, 4),
            ),
            lambda: measure("aiosmtplib (4 tasks)", n, lambda: aiosmtplib_raw(sink, raw, n, 4)),
            lambda: measure(
                "smtp-source -s 4 (C, Postfix)",
                n,
                lambda: run_smtp_source(sink.host, sink.port, messages=n, size=1024, sessions=4),
                cpu=False,
            ),
            lambda: measure(FLOOR_ASYNC, n, lambda: reference_async(sink, raw, n, 4)),
        )
        for figure in (ours4, aio4, source4, floor4):
            print(figure.line())
        print(
            f"  ratio mailrelay/aiosmtplib {ratio(ours4, aio4)} (goal >= 5x); "
            f"mailrelay/smtp-source {ratio(ours4, source4)}; "
            f"floor/aiosmtplib {ratio(floor4, aio4)}"
        )

        # 3. 100 KB
        m = scaled(5_000)
        raw100 = raw_message(100 * 1024)
        message100 = Message.from_bytes(raw100)
        print(f"\n3. {m} x 100 KB over one connection")
        ours100, lib100, floor100 = compare(
            r,
            lambda: measure(
                "mailrelay SMTPTransport",
                m,
                lambda: mailrelay_sync(sink, [(message100, envelope)] * m),
            ),
            lambda: measure("smtplib", m, lambda: smtplib_raw(sink, raw100, m)),
            lambda: measure(FLOOR, m, lambda: reference_sync(sink, raw100, m)),
        )
        for figure in (ours100, lib100, floor100):
            print(figure.line())
        print(
            f"  ratio mailrelay/smtplib {ratio(ours100, lib100)} (goal >= 2.5x); "
            f"floor/smtplib {ratio(floor100, lib100)}"
        )

        # 4. personalised
        p = scaled(20_000)
        print(f"\n4. {p} personalised messages (build one per recipient, then send)")
        ours_p, lib_p = compare(
            r,
            lambda: measure(
                "mailrelay Message.build + send_many", p, lambda: personalised_mailrelay(sink, p)
            ),
            lambda: measure(
                "smtplib EmailMessage + send_message", p, lambda: personalised_smtplib(sink, p)
            ),
        )
        for figure in (ours_p, lib_p):
            print(figure.line())
        print(f"  ratio mailrelay/smtplib {ratio(ours_p, lib_p)} (goal >= 3x)")


if __name__ == "__main__":
    main()
