"""Peak memory while sending one large file-backed message (issue 4: growth under 32 MB).

Run from the repository root (so ``tests.peers`` imports)::

    python benchmarks/large_message_memory.py [--megabytes 200]

It writes a message of ``--megabytes`` MB to a temporary file (streamed, never in memory),
opens it with ``Message.from_file`` and sends it to Postfix's ``smtp-sink`` on loopback,
once with ``SMTPTransport`` and once with ``AsyncSMTPTransport``, with and without BDAT.
A thread samples the process's resident set size (``VmRSS`` in ``/proc/self/status``) every
few milliseconds; the figure is the highest sample minus the RSS just before sending. The
kernel's own peak (``VmHWM``) is printed too, as a cross-check. It prints figures and asserts
nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mailrelay.envelope import Envelope
from mailrelay.message import Message
from mailrelay.options import TLS, Timeouts
from mailrelay.transport import AsyncSMTPTransport, SMTPTransport
from tests.peers.sink import SMTPSink

MB = 1024 * 1024
SENDER = "bench@mailrelay.test"
RECIPIENT = "sink@sink.mailrelay.test"


def status_kb(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class Sampler:
    """Samples VmRSS in a background thread until stopped; remembers the highest value."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak_kb = status_kb("VmRSS")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_kb = max(self.peak_kb, status_kb("VmRSS"))

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.peak_kb = max(self.peak_kb, status_kb("VmRSS"))


def write_message(path: Path, megabytes: int) -> None:
    """A text message of about ``megabytes`` MB, written line by line."""
    line = b"0123456789abcdefghijklmnopqrstuvwxyz" * 2 + b"\n"
    block = line * (MB // len(line))
    with path.open("wb") as out:
        out.write(f"From: {SENDER}\nTo: {RECIPIENT}\nSubject: large\n\n".encode())
        for _ in range(megabytes):
            out.write(block)


def measure(name: str, send: Callable[[], bool]) -> None:
    before = status_kb("VmRSS")
    started = time.perf_counter()
    with Sampler() as sampler:
        ok = send()
    elapsed = time.perf_counter() - started
    growth = (sampler.peak_kb - before) / 1024
    print(
        f"  {name:<40} ok={ok}  peak RSS growth {growth:6.1f} MB  "
        f"({elapsed:5.1f} s, VmHWM {status_kb('VmHWM') / 1024:.0f} MB)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=200)
    options = parser.parse_args()
    timeouts = Timeouts.all(300)
    envelope = Envelope(SENDER, [RECIPIENT])
    with tempfile.TemporaryDirectory(prefix="mailrelay-bench-") as directory, SMTPSink() as sink:
        path = Path(directory) / "large.eml"
        write_message(path, options.megabytes)
        message = Message.from_file(path)
        print(
            f"Python {sys.version.split()[0]}: one {message.size / MB:.0f} MB message "
            f"(file-backed), baseline RSS {status_kb('VmRSS') / 1024:.0f} MB"
        )
        for chunking in (False, True):
            label = "BDAT" if chunking else "DATA"

            def sync_send(chunking: bool = chunking) -> bool:
                with SMTPTransport(
                    sink.host, sink.port, tls=TLS.NONE, timeouts=timeouts, chunking=chunking
                ) as smtp:
                    return smtp.send(message, envelope).ok

            def async_send(chunking: bool = chunking) -> bool:
                async def run() -> bool:
                    async with AsyncSMTPTransport(
                        sink.host, sink.port, tls=TLS.NONE, timeouts=timeouts, chunking=chunking
                    ) as smtp:
                        return (await smtp.asend(message, envelope)).ok

                return asyncio.run(run())

            measure(f"SMTPTransport ({label})", sync_send)
            measure(f"AsyncSMTPTransport ({label})", async_send)


if __name__ == "__main__":
    main()
