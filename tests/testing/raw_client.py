"""A line client on a plain socket for the test server's own tests: what a client sends and
what the server answers, byte for byte, with every read bounded by the socket timeout."""

from __future__ import annotations

import socket

from mailrelay.testing.server import SMTPTestServer


class RawClient:
    """Connects to ``server`` and, unless told not to (``greeting=None``), reads its
    greeting and checks its code (220 by default)."""

    def __init__(self, server: SMTPTestServer, *, greeting: int | None = 220) -> None:
        self.sock = socket.create_connection((server.host, server.port), timeout=5)
        self.file = self.sock.makefile("rb")
        if greeting is not None:
            assert self.code() == greeting

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection."""
        self.file.close()
        self.sock.close()

    def reply(self) -> list[bytes]:
        """The lines of the next reply, without their CRLF."""
        lines = []
        for _ in range(100):
            line = self.file.readline(4096)
            assert line.endswith(b"\r\n"), f"no reply line: {line!r}"
            lines.append(line[:-2])
            if line[3:4] != b"-":
                return lines
        raise AssertionError("endless reply")

    def code(self) -> int:
        """The code of the next reply."""
        return int(self.reply()[-1][:3])

    def send(self, data: bytes) -> None:
        """Send ``data`` as it is."""
        self.sock.sendall(data)

    def command(self, line: bytes) -> int:
        """Send one command line; the code of its reply."""
        self.send(line + b"\r\n")
        return self.code()

    def exchange(self, line: bytes) -> bytes:
        """Send one command line; the last line of its reply."""
        self.send(line + b"\r\n")
        return self.reply()[-1]
