"""Crash safety, for real: a tracker process killed with SIGKILL at random moments loses nothing.

A child process (this module run as ``python -m tests.tracker.test_engine_crash``) submits
messages to a ``DeliveryTracker`` over a ``SQLiteStore`` and sends them through
``SMTPTransport`` to an aiosmtpd server running in the test process, which records every
message it accepts. After each ``submit()`` returns, the child appends the message's sequence
number to an acknowledgement file (one ``write`` per line, so it survives SIGKILL). The test
kills the child at a random moment, several times, then runs it once more to resume. Then,
by the server's own record:

* every acknowledged message was delivered at least once (none lost);
* a message was delivered more than once only if it was in flight at a kill: delivered, but
  its result not yet committed. The tracker commits results in batches (``commit_batch``, at
  most one claim batch of ``BATCH_SIZE`` here), so that is at most ``BATCH_SIZE`` extra
  copies per kill (a message caught by two kills arrives three times);
* every message in the store is DELIVERED.

``MAILRELAY_CRASH_RUNS`` and ``MAILRELAY_CRASH_COUNT`` change the number of kills and the
messages each run submits; ``MAILRELAY_CRASH_SEED`` replays a failing run's kill times.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from mailrelay.message import Message
from mailrelay.options import TLS, Timeouts
from mailrelay.tracker.engine import DeliveryTracker
from mailrelay.tracker.sqlite_store import SQLiteStore
from mailrelay.tracker.store import State
from mailrelay.transport import SMTPTransport
from tests.peers.aiosmtpd_server import AiosmtpdFactory

ROOT = Path(__file__).resolve().parents[2]
LEASE_SECONDS = 1.0
#: Messages claimed at once; with the default commit_batch (50) also the most results
#: awaiting their commit, so the most duplicates one kill can cause.
BATCH_SIZE = 10
_SEQ = re.compile(rb"^X-Seq: (\d+)\r?$", re.MULTILINE)


def _tracker(db: str, port: int) -> DeliveryTracker:
    store = SQLiteStore(db)
    transport = SMTPTransport("127.0.0.1", port, tls=TLS.NONE, timeouts=Timeouts.all(10))
    return DeliveryTracker(
        transport,
        store,
        lease=dt.timedelta(seconds=LEASE_SECONDS),
        worker_id=f"crash-{os.getpid()}",
        batch_size=BATCH_SIZE,
    )


def child_work(db: str, port: int, start: int, count: int, ack_path: str) -> None:
    """Submit ``count`` messages, sending what is due after every ten."""
    tracker = _tracker(db, port)
    with open(ack_path, "a", buffering=1, encoding="ascii") as ack:
        for seq in range(start, start + count):
            message = Message.build(
                sender="sender@mailrelay.test",
                to=["rcpt@mailrelay.test"],
                subject=f"message {seq}",
                text=f"body of message {seq}\n",
                headers={"X-Seq": str(seq)},
            )
            tracker.submit(message)
            ack.write(f"{seq}\n")  # after submit() returned: the message is durable
            if seq % 10 == 9:
                tracker.run_pending()
    tracker.run_pending()


def child_resume(db: str, port: int) -> None:
    """Send everything left, waiting out dead workers' leases; bounded to two minutes."""
    tracker = _tracker(db, port)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        tracker.run_pending()
        due = tracker.next_due()
        if due is None:
            break
        wait = (due - dt.datetime.now(dt.UTC)).total_seconds()
        time.sleep(min(1.0, max(0.05, wait)))
    tracker.close()


def _spawn(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.tracker.test_engine_crash", *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _acked(path: Path) -> list[int]:
    if not path.exists():
        return []
    return [int(line) for line in path.read_text(encoding="ascii").split("\n") if line.strip()]


def _unfinished(db: str) -> int:
    """How many recipients in the store are still QUEUED or SENDING."""
    snapshot = SQLiteStore(db)
    try:
        return sum(
            1
            for record in snapshot.find()
            for r in record.recipients
            if r.state in (State.QUEUED, State.SENDING)
        )
    finally:
        snapshot.close()


def test_sigkill_at_random_moments_loses_nothing(
    make_aiosmtpd: AiosmtpdFactory, tmp_path: Path
) -> None:
    runs = int(os.environ.get("MAILRELAY_CRASH_RUNS", "5"))
    count = int(os.environ.get("MAILRELAY_CRASH_COUNT", "5000"))
    seed = int(os.environ.get("MAILRELAY_CRASH_SEED", str(random.randrange(1 << 30))))
    chooser = random.Random(seed)
    server = make_aiosmtpd(starttls=False, auth=False)
    db = str(tmp_path / "queue.db")
    ack = tmp_path / "acked.txt"
    kills = 0
    # Recipients each kill left QUEUED or SENDING (leased by the dead worker), for the next
    # child or the final resume to finish. Counted after every kill, not only the last:
    # a child may finish its messages before its kill time comes.
    left_behind = 0
    for run in range(runs):
        child = _spawn("work", db, str(server.port), str(run * count), str(count), str(ack))
        before = len(_acked(ack))
        # Wait (bounded) until this child has acknowledged something, then kill it later.
        deadline = time.monotonic() + 60
        while len(_acked(ack)) == before and child.poll() is None:
            assert time.monotonic() < deadline, "the child never submitted anything"
            time.sleep(0.02)
        time.sleep(chooser.uniform(0.05, 2.5))
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            kills += 1
        _out, err = child.communicate(timeout=60)
        assert child.returncode in (0, -signal.SIGKILL), err.decode(errors="replace")
        if child.returncode == -signal.SIGKILL:
            left_behind += _unfinished(db)
    # The kills left work behind (queued, or leased by a dead worker) that a later process
    # had to take over: otherwise this run tested no resumption.
    assert left_behind > 0, f"seed={seed} kills={kills}: the kills left nothing to resume"
    resume = _spawn("resume", db, str(server.port))
    _out, err = resume.communicate(timeout=180)
    assert resume.returncode == 0, err.decode(errors="replace")

    acked = _acked(ack)
    received = Counter(
        int(match.group(1)) for m in server.messages for match in _SEQ.finditer(m.content)
    )
    lost = sorted(set(acked) - set(received))
    duplicates = {seq: n for seq, n in received.items() if n > 1}
    context = f"seed={seed} kills={kills} acked={len(acked)} received={sum(received.values())}"
    assert acked, context
    assert kills >= 1, context  # a crash test that never crashed tests nothing
    assert lost == [], context
    # A copy beyond the first comes only from a kill that caught the message in flight (sent,
    # its result not committed): at most BATCH_SIZE per kill. A message may be caught by two
    # kills (re-sent by the next child once the dead one's lease expired, and that child is
    # killed before committing it too), so it may arrive up to kills + 1 times.
    extra = sum(n - 1 for n in duplicates.values())
    context += f" duplicates={duplicates}"
    assert all(n <= kills + 1 for n in duplicates.values()), context
    assert extra <= kills * BATCH_SIZE, context

    store = SQLiteStore(db)
    try:
        records = store.find()
        states = Counter(r.state for record in records for r in record.recipients)
    finally:
        store.close()
    assert set(states) == {State.DELIVERED}, (context, states)
    # Every message the store holds was received, acknowledged or not (a kill may land
    # between the commit and the acknowledgement).
    assert len(records) == len(received), context


if __name__ == "__main__":
    if sys.argv[1] == "work":
        child_work(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
    else:
        child_resume(sys.argv[2], int(sys.argv[3]))
