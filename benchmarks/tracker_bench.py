"""Delivery tracker throughput: submissions into SQLite, and end-to-end delivery to smtp-sink.

Run: ``python benchmarks/tracker_bench.py [--messages N] [--repeat R]``
(needs Postfix's ``smtp-sink``, started here on loopback).

Every phase sends the same ``N`` small messages (one recipient each, about 600 bytes) over
one pooled, pipelining ``SMTPTransport`` connection to ``smtp-sink``, which accepts and
discards everything:

1. **direct**: ``transport.send(message)`` for each message, no tracking: the baseline.
2. **submit**: ``tracker.submit(message)`` one at a time into a fresh ``SQLiteStore``
   (each a durable commit), and ``tracker.submit_many`` in batches of 100 (one commit each).
3. **tracked**: end to end, from the first submission to the last recorded delivery:
   ``submit_many`` in batches of 100, then ``run_pending()``; with one commit per delivery
   (``commit_batch=1``, the default: at most one duplicate per crash) and with
   ``commit_batch=50`` (up to 50 deliveries re-sent after a crash). Each with SQLite's
   ``synchronous=FULL`` (the default: survives power loss) and ``NORMAL`` (survives a
   process crash; a power loss may undo the last commits).

The tracking overhead is ``1 - tracked rate / direct rate``. Figures are the best of
``--repeat`` runs. The machine's fsync speed dominates the FULL rows.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mailrelay.message import Message
from mailrelay.options import TLS, Timeouts
from mailrelay.tracker.engine import DeliveryTracker
from mailrelay.tracker.sqlite_store import SQLiteStore
from mailrelay.transport import SMTPTransport
from tests.peers.sink import SMTPSink

#: A phase that takes longer than this is reported and the run stops.
PHASE_LIMIT = 600.0


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


def transport_for(sink: SMTPSink) -> SMTPTransport:
    return SMTPTransport(sink.host, sink.port, tls=TLS.NONE, timeouts=Timeouts.all(30))


def best(repeat: int, action: Callable[[], float]) -> float:
    """The shortest of ``repeat`` timings (seconds)."""
    times = [action() for _ in range(repeat)]
    return min(times)


def direct(sink: SMTPSink, messages: list[Message]) -> float:
    with transport_for(sink) as transport:
        start = time.perf_counter()
        for message in messages:
            result = transport.send(message)
            assert result.ok, result
        return time.perf_counter() - start


def submit_one_by_one(messages: list[Message], synchronous: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(Path(tmp) / "q.db", synchronous=synchronous)
        tracker = DeliveryTracker(SMTPTransport("127.0.0.1", 9, tls=TLS.NONE), store)
        start = time.perf_counter()
        for message in messages:
            tracker.submit(message)
        elapsed = time.perf_counter() - start
        store.close()
    return elapsed


def submit_batched(messages: list[Message], synchronous: str, batch: int = 100) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(Path(tmp) / "q.db", synchronous=synchronous)
        tracker = DeliveryTracker(SMTPTransport("127.0.0.1", 9, tls=TLS.NONE), store)
        start = time.perf_counter()
        for index in range(0, len(messages), batch):
            tracker.submit_many(messages[index : index + batch])
        elapsed = time.perf_counter() - start
        store.close()
    return elapsed


def tracked(sink: SMTPSink, messages: list[Message], synchronous: str, commit_batch: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(Path(tmp) / "q.db", synchronous=synchronous)
        with transport_for(sink) as transport:
            tracker = DeliveryTracker(transport, store, commit_batch=commit_batch)
            start = time.perf_counter()
            for index in range(0, len(messages), 100):
                tracker.submit_many(messages[index : index + 100])
            summary = tracker.run_pending()
            elapsed = time.perf_counter() - start
        assert summary.delivered == len(messages), summary
        store.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    messages = make_messages(args.messages)
    count = len(messages)
    rows: list[tuple[str, float]] = []

    with SMTPSink() as sink:
        base = best(args.repeat, lambda: direct(sink, messages))
        rows.append(("direct: transport.send per message (baseline)", count / base))
        for sync in ("FULL", "NORMAL"):
            elapsed = best(args.repeat, partial(submit_one_by_one, messages, sync))
            rows.append((f"submit() one by one, synchronous={sync}", count / elapsed))
            elapsed = best(args.repeat, partial(submit_batched, messages, sync))
            rows.append((f"submit_many(100), synchronous={sync}", count / elapsed))
        tracked_rows = []
        for sync in ("FULL", "NORMAL"):
            for commit_batch in (1, 50):
                elapsed = best(args.repeat, partial(tracked, sink, messages, sync, commit_batch))
                if elapsed > PHASE_LIMIT:
                    print(f"phase took {elapsed:.0f}s; stopping")
                    break
                label = f"tracked end to end, synchronous={sync}, commit_batch={commit_batch}"
                rows.append((label, count / elapsed))
                tracked_rows.append((label, count / elapsed))

    print(f"{count} messages, best of {args.repeat} runs\n")
    width = max(len(label) for label, _ in rows)
    for label, rate in rows:
        print(f"{label:<{width}}  {rate:9.0f} msg/s")
    print("\ntracking overhead (1 - tracked / direct):")
    for label, rate in tracked_rows:
        print(f"{label:<{width}}  {1 - rate / (count / base):8.0%}")


if __name__ == "__main__":
    main()
