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
``AsyncSMTPTransport.asend_many`` with a pool of four. Figures agree between runs to about
0.1%; compare a change against its parent in the same sitting (the machine's kernel and
Python are part of the count). This script prints figures; it asserts nothing but that
every message was accepted.
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
        "--child", nargs=3, metavar=("PORT", "MODE", "COUNT"), help=argparse.SUPPRESS
    )
    options = parser.parse_args()
    if options.child:
        port, mode, count = options.child
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
    with SMTPSink() as sink:
        for name, mode in CASES:
            small = instructions(sink.port, mode, options.small)
            large = instructions(sink.port, mode, options.large)
            per_message = (large - small) / (options.large - options.small)
            print(f"  {name:<28} {per_message:10,.0f}")


if __name__ == "__main__":
    main()
