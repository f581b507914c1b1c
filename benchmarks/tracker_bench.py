"""Delivery tracker throughput: submissions into SQLite, and end-to-end delivery to smtp-sink.

Run: ``python benchmarks/tracker_bench.py [--messages N] [--repeat R] [--rtt MS]
[--placement split]`` (needs Postfix's ``smtp-sink``, started here on loopback).

Every measurement sends the same ``N`` small messages (one recipient each, about 600 bytes)
through an ``SMTPTransport`` built the same way (one pooled connection, PIPELINING as
smtp-sink offers it, no TLS) to the same ``smtp-sink``, which accepts and discards everything:

* **direct**: ``transport.send_many(messages)``, no tracking: the baseline. It is the API
  the tracker's runner uses (each claimed batch goes to ``send_many``, pipelined across
  messages), and it derives each envelope from the headers, as ``submit`` does.
* **direct, send() per message**: ``transport.send(message)`` one at a time, for reference
  (no pipelining across messages).
* **tracked**: end to end, from the first submission to the last recorded delivery, with a
  fresh ``SQLiteStore``: ``submit_many`` in batches of 100 (each one durable commit), then
  ``run_pending()``. First with the defaults (results committed in batches of up to 50,
  ``work_synchronous=NORMAL``), then with each durability knob turned up:
  ``work_synchronous=FULL`` (every result commit flushed to disk) and ``commit_batch=1``
  (each result committed alone: at most one duplicate per crash, and so one message per
  ``send_many`` call, without pipelining across messages).
* **tracked, delivery only**: the defaults again, timed from the first claim to the last
  recorded delivery, once every message is submitted: the runner's own throughput, which
  is what an application that submits ahead of time (or in another process) sees. The
  submission's cost is the *submit only* rows below; the end-to-end rows count both.
* **tracked, submit() one at a time**: the same, but each message its own durable commit
  (one fsync each): what an application pays that submits messages one by one.
* **async direct** and **async tracked, delivery only**: the same for asyncio:
  ``AsyncSMTPTransport.asend_many(messages)`` (the default pool), and
  ``AsyncDeliveryTracker.arun_pending()`` through an equal transport once everything is
  submitted; the async tracked row is compared with the async baseline.
* **submit only**: ``submit`` one at a time and ``submit_many(100)``, no delivery.
* **store floor**: the SQL alone that ``SQLiteStore`` runs for the tracked phase (the
  same statements in the same transactions, every row built beforehand, nothing sent),
  on a fresh store: what tracking costs on this schema with these durability settings
  even if the tracker's own Python cost nothing. The last line of the report is the
  ceiling it leaves end to end, ``direct / (direct + floor)``, round by round.
* with ``--postgres``, **tracked, PostgresStore** end to end and delivery only: the same
  tracker on a ``PostgresStore`` (a PostgreSQL server started here on loopback, placed with
  the other servers, a fresh schema per phase), so the store's SQL runs in the server's
  processes and the client's CPU figure counts only the driver's side of it.

With ``--rtt MS``, every phase that talks to the server goes through a relay on loopback
that holds each chunk of bytes for half of that round-trip time in each direction (a
network between client and server; the relay is a child process), and only the phases
that stay within the time limit at such a delay run: the baseline and the tracked ones that
send through ``send_many`` in chunks. (smtp-sink offers no CHUNKING, so every message waits
one round trip for its ``354``; the relay's timers have about a millisecond's resolution, so
round trips under 2 ms are not meaningful.)

By default this process runs on one CPU and ``smtp-sink`` (and the relay) on another, as a
server across a network would (``--placement``; see ``benchmarks/placement.py``: left to
the scheduler, a run's figures change with whether it puts client and server on one CPU).

Rounds interleave the phases (direct, then each tracked variant, and again), so a burst of
load from other processes on a shared machine hits all of them alike; each figure is the
best of ``--repeat`` rounds. The tracking overhead is ``1 - tracked rate / direct rate``,
also taken round by round (each tracked phase against the baseline's run of the same
round) and summarised by the median: on a shared machine the best runs of two phases may
come from different moments.

Each phase also reports this process's CPU time per message (user + system, from
``getrusage``; ``smtp-sink`` is another process and not counted), the lowest of its rounds:
on loopback the client's CPU is what bounds the rates, and the difference between a tracked
phase and the baseline is what the tracking itself costs per message.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from placement import MODES, default_mode, place

from mailrelay.envelope import Envelope
from mailrelay.message import Message
from mailrelay.options import TLS, Timeouts
from mailrelay.tracker import sqlite_store
from mailrelay.tracker.async_engine import AsyncDeliveryTracker
from mailrelay.tracker.engine import DeliveryTracker
from mailrelay.tracker.sqlite_store import SQLiteStore
from mailrelay.tracker.store import Store, envelope_to_json
from mailrelay.transport import AsyncSMTPTransport, SMTPTransport
from tests.peers.sink import SMTPSink

#: A phase that takes longer than this is reported and the run stops.
PHASE_LIMIT = 600.0
#: Messages per ``submit_many`` call.
SUBMIT_BATCH = 100
#: The phase the tracked ones are compared with.
BASELINE = "direct: transport.send_many (baseline)"
#: The tracked phase that times the delivery alone (the submission is timed on its own too).
DELIVERY_ONLY = "tracked, delivery only (run_pending)"
#: The store's SQL alone (see store_floor), and what it leaves of the baseline's rate.
FLOOR = "store floor: the SQLiteStore's SQL alone"
#: The asyncio baseline, and the async tracker's delivery compared with it.
ASYNC_BASELINE = "async direct: transport.asend_many (baseline)"
ASYNC_TRACKED = "async tracked, delivery only (arun_pending)"


#: The longest wait for the relay to start, in seconds.
RELAY_START = 10.0


class Server(Protocol):
    """Where the phases send: ``smtp-sink`` itself, or the relay in front of it."""

    host: str
    port: int


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy ``reader`` to ``writer``, each chunk ``delay`` seconds after it arrived, in order."""
    loop = asyncio.get_running_loop()
    held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await held.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    delivering = asyncio.create_task(deliver())
    while True:
        data = await reader.read(1 << 16)
        held.put_nowait((loop.time() + delay, data))
        if not data:
            break
    await delivering


async def _relay(target: tuple[str, int], delay: float, report: Connection) -> None:
    async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*target)
        try:
            await asyncio.gather(_pump(reader, up_writer, delay), _pump(up_reader, writer, delay))
        except OSError:
            pass  # one side went away: close both
        finally:
            up_writer.close()
            writer.close()

    server = await asyncio.start_server(connected, "127.0.0.1", 0)
    report.send(server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()


def _run_relay(target: tuple[str, int], delay: float, report: Connection) -> None:
    asyncio.run(_relay(target, delay, report))


class DelayRelay:
    """A relay on 127.0.0.1 in front of ``target`` that adds ``rtt`` seconds per round trip.

    Runs in a child process (so its work does not share this process's interpreter lock)
    and is stopped by its PID.
    """

    host = "127.0.0.1"

    def __init__(self, target: Server, rtt: float) -> None:
        self.port = 0
        self.pid: int | None = None
        receive, send = multiprocessing.Pipe(duplex=False)
        self._receive = receive
        self._process = multiprocessing.Process(
            target=_run_relay, args=((target.host, target.port), rtt / 2, send), daemon=True
        )

    def __enter__(self) -> Self:
        self._process.start()
        if not self._receive.poll(RELAY_START):
            self._stop()
            raise RuntimeError("the delay relay did not start")
        self.port = int(self._receive.recv())
        self.pid = self._process.pid
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop()

    def _stop(self) -> None:
        self._process.terminate()
        self._process.join(5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)


#: Seconds of wall-clock time and of this process's CPU time (user + system).
Timing = tuple[float, float]


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Stopwatch:
    """Wall-clock and CPU time from its creation to :meth:`stop`."""

    def __init__(self) -> None:
        self._cpu = _cpu()
        self._wall = time.perf_counter()

    def stop(self) -> Timing:
        """The wall-clock and CPU seconds since the stopwatch was created."""
        return time.perf_counter() - self._wall, _cpu() - self._cpu


def make_messages(count: int) -> list[Message]:
    """``count`` distinct small messages, one recipient each."""
    return [
        Message.build(
            sender="bench@mailrelay.test",
            to=[f"rcpt{i}@sink.mailrelay.test"],
            subject=f"benchmark message {i}",
            text="A line of text for the benchmark.\n" * 8,
        )
        for i in range(count)
    ]


def transport_for(sink: Server) -> SMTPTransport:
    """The one transport configuration every phase uses."""
    return SMTPTransport(sink.host, sink.port, tls=TLS.NONE, timeouts=Timeouts.all(30))


def direct(sink: Server, messages: list[Message]) -> Timing:
    """Seconds to send every message straight through the transport's ``send_many``."""
    with transport_for(sink) as transport:
        watch = Stopwatch()
        results = transport.send_many(messages)
        timing = watch.stop()
    assert len(results) == len(messages)
    assert all(r.ok for r in results), results
    return timing


def direct_one_by_one(sink: Server, messages: list[Message]) -> Timing:
    """Seconds to send every message with its own ``transport.send`` call."""
    with transport_for(sink) as transport:
        watch = Stopwatch()
        for message in messages:
            result = transport.send(message)
            assert result.ok, result
        return watch.stop()


def tracked(
    sink: Server,
    messages: list[Message],
    *,
    one_by_one: bool = False,
    delivery_only: bool = False,
    store_options: dict[str, Any] | None = None,
    tracker_options: dict[str, Any] | None = None,
    make_store: Callable[[], contextlib.AbstractContextManager[Store]] | None = None,
) -> Timing:
    """Seconds from the first submission to the last delivery recorded in the store
    (``delivery_only``: from the first claim, once everything is submitted). The store is
    a fresh ``SQLiteStore`` unless ``make_store`` gives another (``--postgres``)."""
    with contextlib.ExitStack() as stack:
        if make_store is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory())
            store: Store = SQLiteStore(Path(tmp) / "q.db", **(store_options or {}))
        else:
            store = stack.enter_context(make_store())
        with transport_for(sink) as transport:
            tracker = DeliveryTracker(transport, store, **(tracker_options or {}))
            watch = Stopwatch()
            if one_by_one:
                for message in messages:
                    tracker.submit(message)
            else:
                for index in range(0, len(messages), SUBMIT_BATCH):
                    tracker.submit_many(messages[index : index + SUBMIT_BATCH])
            if delivery_only:
                watch = Stopwatch()
            summary = tracker.run_pending()
            timing = watch.stop()
        assert summary.delivered == len(messages), summary
        store.close()
    return timing


def async_transport_for(sink: Server) -> AsyncSMTPTransport:
    """The asyncio phases' transport: the same settings, the default pool."""
    return AsyncSMTPTransport(sink.host, sink.port, tls=TLS.NONE, timeouts=Timeouts.all(30))


def async_direct(sink: Server, messages: list[Message]) -> Timing:
    """Seconds to send every message straight through ``asend_many`` (the async baseline)."""

    async def send() -> Timing:
        async with async_transport_for(sink) as transport:
            watch = Stopwatch()
            results = await transport.asend_many(messages)
            timing = watch.stop()
        assert len(results) == len(messages)
        assert all(r.ok for r in results), results
        return timing

    return asyncio.run(send())


def async_tracked(sink: Server, messages: list[Message]) -> Timing:
    """Seconds for ``AsyncDeliveryTracker.arun_pending`` once every message is submitted."""

    async def deliver(store: SQLiteStore) -> Timing:
        async with async_transport_for(sink) as transport:
            tracker = AsyncDeliveryTracker(transport, store)
            for index in range(0, len(messages), SUBMIT_BATCH):
                tracker.submit_many(messages[index : index + SUBMIT_BATCH])
            watch = Stopwatch()
            summary = await tracker.arun_pending()
            timing = watch.stop()
        assert summary.delivered == len(messages), summary
        return timing

    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(Path(tmp) / "q.db")
        try:
            return asyncio.run(deliver(store))
        finally:
            store.close()


def submit_only(messages: list[Message], *, one_by_one: bool) -> Timing:
    """Seconds to submit every message (nothing is sent)."""
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(Path(tmp) / "q.db")
        tracker = DeliveryTracker(SMTPTransport("127.0.0.1", 9, tls=TLS.NONE), store)
        watch = Stopwatch()
        if one_by_one:
            for message in messages:
                tracker.submit(message)
        else:
            for index in range(0, len(messages), SUBMIT_BATCH):
                tracker.submit_many(messages[index : index + SUBMIT_BATCH])
        timing = watch.stop()
        store.close()
    return timing


#: The attempt the floor phase records for each delivery: what the tracker stores for
#: smtp-sink's reply (host, code, enhanced status, text, source).
_FLOOR_ATTEMPT = ("127.0.0.1:25", 250, "2.0.0", "2.0.0 Ok", "reply")


def store_floor(messages: list[Message]) -> Timing:
    """Seconds for the SQL alone that ``SQLiteStore`` runs to track ``messages`` through
    the tracked phase, nothing sent: the floor of any tracker on this schema, with these
    durability settings, whatever its Python costs.

    Every row is built before the stopwatch starts; then, on a fresh store, exactly the
    store's statements in its transactions: per ``submit_many`` batch, the inserts of the
    messages and their recipients and a ``synchronous=FULL`` commit; per claim of 100, the
    claim's read and its leasing ``UPDATE``; per ``commit_batch`` (50) of results, the
    state updates and the attempts (the store's fast path for a worker's results), each
    committed with ``work_synchronous=NORMAL``.
    """
    now = 1_800_000_000_000_000  # microseconds; every message due at once
    worker = "floor-worker"
    message_rows: list[tuple[Any, ...]] = []
    recipient_rows: list[tuple[Any, ...]] = []
    for index, message in enumerate(messages):
        envelope = Envelope.from_message(message)
        tracking_id = f"{now:014x}{index:018x}"
        data = message.as_bytes()
        message_rows.append(
            (
                tracking_id,
                now,
                envelope_to_json(envelope),
                message.message_id,
                "",
                len(data),
                bytearray(data),
                0,
            )
        )
        address = str(envelope.recipients[0].address)
        recipient_rows.append((tracking_id, 0, address, "queued", now, 0))
    # The store's own transactions (_write) and statements, private on purpose: this phase
    # measures them and nothing else.
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(Path(tmp) / "q.db")
        try:
            watch = Stopwatch()
            for index in range(0, len(messages), SUBMIT_BATCH):
                with store._write() as tx:
                    tx.executemany(
                        "INSERT INTO messages (id, created_at, envelope, message_id, envid,"
                        " size, content, notification) VALUES (?, ?, ?, ?, NULLIF(?, ''), ?, ?, ?)",
                        message_rows[index : index + SUBMIT_BATCH],
                    )
                    tx.executemany(
                        "INSERT INTO recipients (message, position, address, state,"
                        " next_attempt_at, confirmed, lease_owner, lease_until)"
                        " VALUES (?, ?, ?, ?, ?, ?, NULL, NULL)",
                        recipient_rows[index : index + SUBMIT_BATCH],
                    )
            delivered = 0
            while True:
                with store._write(work=True) as tx:
                    ids = [
                        row[0]
                        for row in tx.execute(
                            sqlite_store._DUE_IN_ORDER,
                            {"now": now},
                        ).fetchmany(SUBMIT_BATCH)
                    ]
                    if not ids:
                        break
                    leased = tx.execute(
                        sqlite_store._LEASE_DUE,
                        {"now": now, "ids": json.dumps(ids), "worker": worker, "until": now + 1},
                    ).fetchall()
                for start in range(0, len(leased), 50):
                    chunk = leased[start : start + 50]
                    with store._write(work=True) as tx:
                        tx.executemany(
                            sqlite_store._UPDATE_LEASED_DONE,
                            [("delivered", row[0], row[1], worker) for row in chunk],
                        )
                        tx.executemany(
                            sqlite_store._INSERT_ATTEMPT,
                            [(row[0], row[1], 0, now, *_FLOOR_ATTEMPT) for row in chunk],
                        )
                    delivered += len(chunk)
            timing = watch.stop()
        finally:
            store.close()
    assert delivered == len(messages), delivered
    return timing


@contextlib.contextmanager
def _postgres() -> Iterator[Callable[[], contextlib.AbstractContextManager[Store]]]:
    """A PostgreSQL server on loopback (tests/peers/postgres.py), as a maker of fresh
    ``PostgresStore`` values, each on a schema of its own dropped afterwards. The maker
    carries the server's ``pid`` (for the placement)."""
    from mailrelay.tracker.postgres_store import PostgresStore
    from tests.peers.postgres import start_postgres

    server = start_postgres()

    @contextlib.contextmanager
    def fresh_store() -> Iterator[Store]:
        schema = server.new_schema()
        store = PostgresStore(server.dsn, schema=schema)
        try:
            yield store
        finally:
            store.close()
            server.drop_schema(schema)

    fresh_store.pid = server.pid  # type: ignore[attr-defined]
    try:
        yield fresh_store
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--rtt", type=float, default=0.0, help="milliseconds of round trip to add (a relay)"
    )
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="also run the tracked phases on a PostgresStore (PostgreSQL started on loopback)",
    )
    parser.add_argument(
        "--placement",
        choices=MODES,
        default=default_mode(),
        help="where client and server run (see benchmarks/placement.py)",
    )
    args = parser.parse_args()
    messages = make_messages(args.messages)
    count = len(messages)

    with contextlib.ExitStack() as stack:
        smtp_sink = stack.enter_context(SMTPSink())
        sink: Server = smtp_sink
        servers = [smtp_sink.pid]
        if args.rtt > 0:
            relay = stack.enter_context(DelayRelay(sink, args.rtt / 1000))
            servers.append(relay.pid)
            sink = relay
        postgres_store = None
        if args.postgres:
            postgres_store = stack.enter_context(_postgres())
            servers.append(postgres_store.pid)  # type: ignore[attr-defined]
        where = place(args.placement, [pid for pid in servers if pid is not None])
        phases: dict[str, Callable[[], Timing]] = {
            BASELINE: lambda: direct(sink, messages),
            "direct: transport.send per message": lambda: direct_one_by_one(sink, messages),
            "tracked, defaults": lambda: tracked(sink, messages),
            DELIVERY_ONLY: lambda: tracked(sink, messages, delivery_only=True),
            "tracked, work_synchronous=FULL": lambda: tracked(
                sink, messages, store_options={"work_synchronous": "FULL"}
            ),
            "tracked, commit_batch=1": lambda: tracked(
                sink, messages, tracker_options={"commit_batch": 1}
            ),
            "tracked, submit() one at a time": lambda: tracked(sink, messages, one_by_one=True),
            ASYNC_BASELINE: lambda: async_direct(sink, messages),
            ASYNC_TRACKED: lambda: async_tracked(sink, messages),
            "submit() one at a time, no delivery": lambda: submit_only(messages, one_by_one=True),
            f"submit_many({SUBMIT_BATCH}), no delivery": lambda: submit_only(
                messages, one_by_one=False
            ),
            FLOOR: lambda: store_floor(messages),
        }
        if postgres_store is not None:
            make = postgres_store
            phases["tracked, PostgresStore"] = lambda: tracked(sink, messages, make_store=make)
            phases["tracked, PostgresStore, delivery only"] = lambda: tracked(
                sink, messages, delivery_only=True, make_store=make
            )
        if args.rtt > 0:
            # One message per send_many call (or per send) pays whole round trips each.
            slow = ("send per message", "commit_batch=1", "one at a time")
            phases = {k: v for k, v in phases.items() if not any(w in k for w in slow)}
        runs: dict[str, list[float]] = {label: [] for label in phases}
        least_cpu = dict.fromkeys(phases, float("inf"))
        for _round in range(args.repeat):
            for label, phase in phases.items():
                elapsed, cpu = phase()
                if elapsed > PHASE_LIMIT:
                    sys.exit(f"{label} took {elapsed:.0f}s; stopping")
                runs[label].append(elapsed)
                least_cpu[label] = min(least_cpu[label], cpu)
        best = {label: min(times) for label, times in runs.items()}

    delay = f", {args.rtt:g} ms round trip added" if args.rtt > 0 else ""
    print(f"{count} messages, best of {args.repeat} interleaved rounds{delay}; {where}\n")
    width = max(len(label) for label in best)

    def baseline(label: str) -> str | None:
        """The phase ``label`` is compared with, if it is a tracked one."""
        if label.startswith("tracked"):
            return BASELINE
        if label.startswith("async tracked"):
            return ASYNC_BASELINE
        return None

    for label, elapsed in best.items():
        rate = count / elapsed
        cpu = least_cpu[label] / count * 1e6
        ratio, extra = " " * 15, ""
        against = baseline(label)
        if against is not None:
            ratio = f"{rate / (count / best[against]):6.2f} of direct"
            extra = f" ({cpu - least_cpu[against] / count * 1e6:+.0f})"
        print(f"{label:<{width}}  {rate:7.0f} msg/s  {ratio}  {cpu:5.0f} µs CPU/msg{extra}")
    print(
        "\nof direct, round by round (each tracked phase against its own baseline's run in the"
        "\nsame round, so a change in the machine's speed between rounds cancels out), and the"
        "\ntracking overhead of the median (1 - tracked / direct):"
    )
    for label, times in runs.items():
        against = baseline(label)
        if against is not None:
            rounds = [base / mine for base, mine in zip(runs[against], times, strict=True)]
            median = statistics.median(rounds)
            listed = " ".join(f"{r:.2f}" for r in rounds)
            print(f"{label:<{width}}  median {median:.2f}  overhead {1 - median:4.0%}  ({listed})")
    # The best end to end a tracker on this store could reach if its own Python were free:
    # the baseline's time plus the store's SQL alone.
    ceilings = [
        base / (base + floor) for base, floor in zip(runs[BASELINE], runs[FLOOR], strict=True)
    ]
    print(
        f"\nceiling of end to end (direct / (direct + store floor), round by round): "
        f"median {statistics.median(ceilings):.2f}  ({' '.join(f'{c:.2f}' for c in ceilings)})"
    )


if __name__ == "__main__":
    main()
