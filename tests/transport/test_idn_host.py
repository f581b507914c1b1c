"""An internationalized server name goes to the DNS, the proxy and TLS as its IDNA 2008
A-labels: the stdlib's own IDNA 2003 encoding maps ``straße.example`` to another domain,
``strasse.example``."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from mailrelay.errors import ConfigurationError, DeliveryError
from mailrelay.options import TLS, Timeouts
from mailrelay.transport.async_smtp import AsyncLMTPTransport, AsyncSMTPTransport
from mailrelay.transport.smtp import LMTPTransport, SMTPTransport
from tests.peers.tls import TLSFiles
from tests.transport.helpers import FLAVOURS, Flavour, make_message, run


@pytest.mark.parametrize(
    ("given", "ascii"),
    [
        ("smtp.straße.example", "smtp.xn--strae-oqa.example"),  # IDNA 2003 says strasse
        ("mail.café.example", "mail.xn--caf-dma.example"),
        ("MAIL.CAFÉ.example", "mail.xn--caf-dma.example"),  # UTS #46 maps case
        ("smtp.example.org", "smtp.example.org"),
        ("192.0.2.1", "192.0.2.1"),
        ("::1", "::1"),
    ],
)
def test_hosts_are_kept_as_a_labels(given: str, ascii: str) -> None:
    for make in (SMTPTransport, AsyncSMTPTransport, LMTPTransport, AsyncLMTPTransport):
        transport: Any = make(given, 2525, server_hostname=given)
        assert transport.settings.host == ascii
        assert transport.settings.server_hostname == ascii


@pytest.mark.parametrize("given", ["a..ß.example", "xn--zz-ß.example", "-ß.example"])
def test_a_host_that_is_no_idn_is_refused(given: str) -> None:
    with pytest.raises(ConfigurationError, match="not a usable host name"):
        SMTPTransport(given, 2525)


@pytest.fixture
def sni_listener(tls_files: TLSFiles) -> Iterator[tuple[int, list[str | None]]]:
    """A TLS listener on 127.0.0.1 that records the server name each client asks for."""
    seen: list[str | None] = []
    context = tls_files.server_context()

    def record(_sock: Any, name: str | None, _context: Any) -> None:
        seen.append(name)

    context.sni_callback = record
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    port = listener.getsockname()[1]

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"421 4.3.2 closing (test)\r\n")
            except (OSError, ssl.SSLError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield port, seen
    listener.close()
    thread.join(10)
    assert not thread.is_alive()


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_the_tls_server_name_is_the_a_label(
    flavour: Flavour, sni_listener: tuple[int, list[str | None]]
) -> None:
    port, seen = sni_listener
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    options: dict[str, Any] = {
        "tls": TLS.IMPLICIT,
        "server_hostname": "smtp.straße.example",
        "ssl_context": context,
        "timeouts": Timeouts.all(5),
    }
    message = make_message(to=("bob@mailrelay.test",))

    def send() -> None:
        if flavour == "sync":
            with SMTPTransport("127.0.0.1", port, **options) as transport:
                transport.send(message)
            return

        async def main() -> None:
            async with AsyncSMTPTransport("127.0.0.1", port, **options) as transport:
                await transport.asend(message)

        run(main())

    with pytest.raises(DeliveryError):  # the listener says 421 and hangs up
        send()
    assert seen == ["smtp.xn--strae-oqa.example"]
