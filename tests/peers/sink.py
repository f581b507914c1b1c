"""Postfix's ``smtp-sink`` (a fast C test server) and ``smtp-source`` (a C load client).

For throughput measurements, not correctness: ``smtp-sink`` accepts every message and throws
it away, announcing PIPELINING, 8BITMIME, DSN and friends; ``smtp-source`` is the reference
client the benchmark compares against.

Rules:

- :class:`SMTPSink` starts ``smtp-sink`` as our child on ``127.0.0.1`` and a free port with a
  large listen backlog, waits (bounded) for its greeting, and stops exactly that PID
  (SIGTERM, then SIGKILL after a timeout). As root it must drop privileges (``-u nobody``;
  smtp-sink refuses to run as root otherwise).
- smtp-sink's EHLO reply ends with an empty ``250 `` line (it announces nothing after its
  last keyword), which a strict client must accept (RFC 5321 §4.2.1 allows empty text).
- :func:`run_smtp_source` runs ``smtp-source`` to completion and returns the elapsed wall
  time; it raises if the client fails or exceeds its timeout.

Both programs come with the Debian package ``postfix``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.peers.postfix import INSTALL_HINT
from tests.peers.scripted import free_port

_SEARCH = (Path("/usr/sbin"), Path("/usr/lib/postfix/sbin"), Path("/usr/libexec/postfix"))


def find_tool(name: str) -> str:
    """The path of ``smtp-sink`` or ``smtp-source``; fails the test with the install hint."""
    found = shutil.which(name)
    if found:
        return found
    for directory in _SEARCH:
        if (directory / name).is_file():
            return str(directory / name)
    pytest.fail(f"`{name}` not found (it comes with Postfix). Install with:\n  {INSTALL_HINT}")


class SMTPSink:
    """A running ``smtp-sink`` on 127.0.0.1 (use as a context manager or call start/stop).

    Args:
        backlog: The listen backlog (smtp-sink's required second argument).
        extra_args: More smtp-sink options, e.g. ``("-p",)`` to turn off PIPELINING.
        hostname: The name in its greeting and EHLO reply.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        *,
        backlog: int = 1024,
        extra_args: Sequence[str] = (),
        hostname: str = "sink.mailrelay.test",
    ) -> None:
        self.port = free_port()
        self.backlog = backlog
        self.extra_args = tuple(extra_args)
        self.hostname = hostname
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The smtp-sink process ID while it runs."""
        return None if self.process is None else self.process.pid

    def start(self, timeout: float = 10.0) -> SMTPSink:
        """Start smtp-sink and wait until it greets; returns the sink itself."""
        argv = [find_tool("smtp-sink"), "-4", "-h", self.hostname]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]
        argv += [*self.extra_args, f"inet:{self.host}:{self.port}", str(self.backlog)]
        self.process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        end = time.monotonic() + timeout
        while not self._greets():
            if self.process.poll() is not None or time.monotonic() > end:
                self.stop()
                raise RuntimeError(f"smtp-sink did not start within {timeout}s: {argv}")
            time.sleep(0.02)
        return self

    def _greets(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0) as sock:
                greeting = sock.recv(512)
                sock.sendall(b"QUIT\r\n")
        except OSError:
            return False
        return greeting.startswith(b"220")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop exactly the smtp-sink process started here (SIGTERM, then SIGKILL)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)
        self.process = None

    def __enter__(self) -> SMTPSink:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def run_smtp_source(
    host: str,
    port: int,
    *,
    messages: int,
    size: int,
    sessions: int = 1,
    reuse_connection: bool = True,
    sender: str = "bench@mailrelay.test",
    recipient: str = "sink@sink.mailrelay.test",
    timeout: float = 600.0,
) -> float:
    """Run ``smtp-source`` against ``host:port`` and return the elapsed seconds.

    Args:
        host: Server address.
        port: Server port.
        messages: Total number of messages (``-m``), spread over the sessions.
        size: Payload bytes per message (``-l``; headers not included).
        sessions: Parallel SMTP sessions (``-s``).
        reuse_connection: Send every message of a session over one connection (``-d``);
            otherwise smtp-source reconnects for each message.
        sender: Envelope sender (``-f``).
        recipient: Envelope recipient (``-t``).
        timeout: Give up (and raise ``subprocess.TimeoutExpired``) after this many seconds.

    Returns:
        Wall-clock seconds from start to exit.

    Raises:
        subprocess.CalledProcessError: If smtp-source reports a failure.
    """
    argv = [
        find_tool("smtp-source"),
        "-m", str(messages), "-l", str(size), "-s", str(sessions),
        "-f", sender, "-t", recipient, "-M", "client.mailrelay.test",
    ]  # fmt: skip
    if reuse_connection:
        argv.append("-d")
    argv.append(f"inet:{host}:{port}")
    started = time.perf_counter()
    subprocess.run(argv, capture_output=True, timeout=timeout, check=True)
    return time.perf_counter() - started


@pytest.fixture
def smtp_sink() -> Iterator[SMTPSink]:
    """A running ``smtp-sink`` on 127.0.0.1 (PIPELINING on, backlog 1024)."""
    with SMTPSink() as sink:
        yield sink
