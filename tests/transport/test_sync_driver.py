"""The blocking driver's own rules: kernel time limits on a blocking socket, for plain text
and TLS, and a write bounded as a whole even when the server stops reading."""

from __future__ import annotations

import socket
import threading
from collections.abc import Generator, Iterator

import pytest

from mailrelay.errors import DeliveryTimeout
from mailrelay.flow import Read, Request, Write
from mailrelay.options import TLS, Timeouts
from mailrelay.transport import SMTPTransport
from mailrelay.transport.sync_driver import connect
from tests.peers.scripted import (
    Action,
    ScriptedServerFactory,
    Step,
    ehlo,
    greeting,
)
from tests.peers.tls import TLSFiles
from tests.transport.helpers import make_message


def test_a_reply_that_never_comes_over_tls_times_out_in_its_phase(
    scripted_server: ScriptedServerFactory, tls_files: TLSFiles
) -> None:
    # After STARTTLS the socket is blocking with a kernel limit: the TLS layer's "want
    # read" when it runs out must be the phase's timeout, not an SSL error.
    server = scripted_server(
        [
            [
                greeting(),
                ehlo("STARTTLS", "PIPELINING"),
                Step(expect="STARTTLS", reply=b"220 2.0.0 go\r\n", action=Action.START_TLS),
                ehlo("PIPELINING"),
                Step(expect=r"MAIL FROM:.*", action=Action.SILENT, silence=10.0),
            ]
        ]
    )
    timeouts = Timeouts(connect=5, greeting=5, mail=0.3, rcpt=5)
    with (
        SMTPTransport(
            "127.0.0.1",
            server.port,
            tls=TLS.STARTTLS,
            timeouts=timeouts,
            ssl_context=tls_files.client_context(),
        ) as transport,
        pytest.raises(DeliveryTimeout, match="phase 'mail'"),
    ):
        transport.send(make_message())
    assert "tls" in server.session(0).events


@pytest.fixture
def deaf_server() -> Iterator[int]:
    """A server on loopback that accepts, greets, and then never reads: its receive buffer
    fills and the client's writes block."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    port: int = listener.getsockname()[1]
    accepted: list[socket.socket] = []

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        conn.sendall(b"220 deaf.mailrelay.test ESMTP\r\n")
        accepted.append(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield port
    thread.join(timeout=10)
    for conn in accepted:
        conn.close()
    listener.close()


def _greeting_then_a_huge_write() -> Generator[Request, bytes | None, None]:
    greeting_reply = yield Read(phase="greeting")
    assert greeting_reply is not None
    assert greeting_reply.startswith(b"220")
    # Far more than the socket buffers of both ends hold: the write has to wait.
    yield Write(data=b"x" * (64 << 20), phase="data_block", flush=True)
    yield Read(phase="data_end")


def test_a_write_the_server_never_reads_times_out_as_a_whole(deaf_server: int) -> None:
    timeouts = Timeouts(connect=5, greeting=5, data_block=0.5, data_end=5)
    driver = connect("127.0.0.1", deaf_server, timeouts=timeouts)
    with pytest.raises(DeliveryTimeout, match="phase 'data_block'"):
        driver.run(_greeting_then_a_huge_write())
    assert driver.closed
