"""Instructions per message, counted by valgrind, for sending through real sockets to smtp-sink.

Run from the repository root (needs ``valgrind`` and Postfix's ``smtp-sink``)::

    python benchmarks/instructions.py [--small 1000] [--large 3000]

Wall-clock and CPU figures on a shared machine move by more than most changes to the hot
path are worth; the number of instructions the client executes does not (valgrind counts
this process's user-space instructions, not the kernel's and not the server's, which runs
in its own process). Each case runs twice under ``valgrind --tool=cachegrind``, sending
``--small`` and then ``--large`` copies of the same 1 KB message (``smtp_throughput.py``'s
message and envelope), and the difference divided by the difference in messages is the
cost of one more message: start-up, imports and connecting cancel out.

Cases: ``SMTPTransport.send_many`` over one connection, and
``AsyncSMTPTransport.asend_many`` with a pool of four. With ``--tracker``, also the delivery
tracker's own work (``tracker_bench.py``'s distinct small messages, a fresh ``SQLiteStore``
in a temporary directory): ``submit_many`` in batches of 100, and ``run_pending`` over
already submitted messages through a ``MemoryTransport`` (which answers at once, so the
figure is the tracker's work plus that transport's small share).

Figures agree between runs to about 0.1% (every child runs with ``PYTHONHASHSEED=0``: with
random string hashes they move by about 1.5%); compare a change against its parent in the
same sitting (the machine's kernel and Python are part of the count). This script prints
figures; it asserts nothing but that every message was accepted or delivered.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: The cases: name, and how the child sends (``sync`` or the number of async connections).
CASES = (("send_many, one connection", "sync"), ("asend_many, 4 connections", "4"))
_REFS = re.compile(r"I\s+refs:\s+([\d,]+)")


def child(port: int, mode: str, count: int) -> None:
    """Send ``count`` messages to the sink on ``port`` (run under valgrind)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import smtp_throughput as bench

    from mailrelay.envelope import Envelope
    from mailrelay.message import Message

    class Sink:
        host = "127.0.0.1"

    Sink.port = port  # type: ignore[attr-defined]
    pair = (Message.from_bytes(bench.raw_message(1024)), Envelope(bench.SENDER, [bench.RECIPIENT]))
    items = [pair] * count
    if mode == "sync":
        bench.mailrelay_sync(Sink, items)  # type: ignore[arg-type]
    else:
        bench.mailrelay_async(Sink, items, int(mode))  # type: ignore[arg-type]


#: The tracker cases (``--tracker``): name, and the child's mode.
TRACKER_CASES = (("tracker submit_many(100)", "submit"), ("tracker run_pending", "run"))
#: Messages made for a tracker child, whatever its count (making them is not measured
#: apart: the same number is made in both runs of a case).
_TRACKER_MADE = 3200


def tracker_child(mode: str, count: int) -> None:
    """Submit ``count`` messages, or deliver ``count`` submitted ones (under valgrind)."""
    import tempfile

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import tracker_bench

    from mailrelay.tracker.engine import DeliveryTracker
    from mailrelay.tracker.sqlite_store import SQLiteStore
    from mailrelay.transport import MemoryTransport

    messages = tracker_bench.make_messages(_TRACKER_MADE)
    warm, rest = messages[:100], messages[100:]
    if count > len(rest):
        raise SystemExit(f"at most {len(rest)} messages for the tracker cases")
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(Path(tmp) / "q.db")
        tracker = DeliveryTracker(MemoryTransport(), store)
        tracker.submit_many(warm)
        tracker.run_pending()  # the first claim, commit and chunk: same in both runs
        # Submitted in both runs alike (the run case delivers ``count`` of them).
        submitted = count if mode == "submit" else len(rest)
        for index in range(0, submitted, 100):
            tracker.submit_many(rest[index : index + 100])
        if mode == "run":
            summary = tracker.run_pending(max_rounds=count // tracker.batch_size)
            assert summary.delivered == count, summary
        store.close()


def instructions(port: int, mode: str, count: int) -> int:
    """User-space instructions of one child run."""
    result = subprocess.run(
        [
            "valgrind",
            "--tool=cachegrind",
            "--cache-sim=no",
            "--cachegrind-out-file=/dev/null",
            sys.executable,
            __file__,
            "--child",
            str(port),
            mode,
            str(count),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONHASHSEED": "0"},
        capture_output=True,
        text=True,
        check=True,
    )
    found = _REFS.search(result.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{result.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", type=int, default=1000, help="messages in the first run")
    parser.add_argument("--large", type=int, default=3000, help="messages in the second run")
    parser.add_argument(
        "--tracker", action="store_true", help="also the delivery tracker's submit and run"
    )
    parser.add_argument(
        "--child", nargs=3, metavar=("PORT", "MODE", "COUNT"), help=argparse.SUPPRESS
    )
    options = parser.parse_args()
    if options.child:
        port, mode, count = options.child
        if mode in ("submit", "run"):
            tracker_child(mode, int(count))
        else:
            child(int(port), mode, int(count))
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is needed (Debian package: valgrind)")
    if options.large <= options.small:
        raise SystemExit("--large must be more than --small")
    from tests.peers.sink import SMTPSink

    print(
        f"Python {sys.version.split()[0]}; instructions per message "
        f"(runs of {options.large} and {options.small} messages):"
    )
    cases = CASES + (TRACKER_CASES if options.tracker else ())
    with SMTPSink() as sink:
        for name, mode in cases:
            small = instructions(sink.port, mode, options.small)
            large = instructions(sink.port, mode, options.large)
            per_message = (large - small) / (options.large - options.small)
            print(f"  {name:<28} {per_message:10,.0f}")


if __name__ == "__main__":
    main()
