"""``source_address``: connections go out from the local address the caller names (a host
with several addresses: the one the EHLO name, the reverse DNS and the SPF record belong to).

Loopback has all of 127.0.0.0/8, so a test can send from 127.0.0.2 to a server on 127.0.0.1
and read, on the server's side, which address the connection came from.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP
from aiosmtpd.smtp import Envelope as ServerEnvelope
from aiosmtpd.smtp import Session as ServerSession

from mailrelay.callout import AsyncCallout, Callout, CalloutStatus
from mailrelay.envelope import Envelope
from mailrelay.errors import ConfigurationError, ConnectError
from mailrelay.message import Message
from mailrelay.options import TLS, Timeouts
from mailrelay.results import Outcome
from mailrelay.testing.server import SMTPTestServer
from mailrelay.transport import (
    AsyncLMTPTransport,
    AsyncMXTransport,
    LMTPTransport,
    MXTransport,
    SMTPTransport,
    TransportURL,
    transport_from_url,
)
from tests.peers.aiosmtpd_server import HOSTNAME, RecordingHandler
from tests.peers.postfix import PostfixInstance
from tests.peers.scripted import free_port
from tests.transport.helpers import FLAVOURS, Flavour, run, send_with

FAST = Timeouts.all(10)


def message(to: str = "bob@example.net") -> Message:
    return Message.build(sender="alice@example.org", to=[to], subject="source", text="Hi.\n")


# -- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "kept"),
    [("127.0.0.2", "127.0.0.2"), ("::1", "::1"), ("0:0::1", "::1"), (None, None)],
)
def test_a_source_address_is_an_ip_address(given: str | None, kept: str | None) -> None:
    transport = SMTPTransport("127.0.0.1", 2525, tls=TLS.NONE, source_address=given)
    assert transport.settings.source_address == kept
    mx = MXTransport(source_address=given, refused_networks=())
    assert mx.settings.source_address == kept


@pytest.mark.parametrize("bad", ["mail.example.com", "", "127.0.0.256", "127.0.0.1:25"])
def test_anything_else_is_refused_at_construction(bad: str) -> None:
    with pytest.raises(ConfigurationError, match="source_address must be an IPv4 or IPv6"):
        SMTPTransport("127.0.0.1", tls=TLS.NONE, source_address=bad)
    with pytest.raises(ConfigurationError, match="source_address"):
        AsyncMXTransport(source_address=bad, refused_networks=())
    with pytest.raises(ConfigurationError, match="source_address"):
        Callout(source_address=bad, refused_networks=())


def test_a_unix_socket_has_no_source_address() -> None:
    with pytest.raises(ConfigurationError, match="unix socket has no source address"):
        LMTPTransport(path="/run/lmtp.sock", source_address="127.0.0.2")
    with pytest.raises(ConfigurationError, match="unix socket has no source address"):
        AsyncLMTPTransport(path="/run/lmtp.sock", source_address="127.0.0.2")


@pytest.mark.parametrize(
    "url", ["smtp://h?source_address=127.0.0.2", "mx://?source_address=127.0.0.2"]
)
def test_urls_take_a_source_address(url: str) -> None:
    assert TransportURL.parse(url).source_address == "127.0.0.2"
    transport = transport_from_url(url)
    assert isinstance(transport, SMTPTransport | MXTransport)
    assert transport.settings.source_address == "127.0.0.2"


def test_a_url_with_a_bad_source_address_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"source_address must be .*smtp://h"):
        TransportURL.parse("smtp://h?source_address=localhost")
    with pytest.raises(ConfigurationError, match="unknown parameter 'source_address'"):
        TransportURL.parse("file:///tmp/x?source_address=127.0.0.2")


# -- what the server sees ----------------------------------------------------------------------


@pytest.mark.parametrize("source", ["127.0.0.2", "127.0.0.7"])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_smtp_connects_from_the_source_address(flavour: Flavour, source: str) -> None:
    with SMTPTestServer() as server:
        result = send_with(
            flavour,
            message(),
            host=server.host,
            port=server.port,
            tls=TLS.NONE,
            timeouts=FAST,
            source_address=source,
        )
        (received,) = server.wait_for(1)
    assert result.ok, result
    assert received.peer[0] == source


class PeerHandler(RecordingHandler):
    """Remembers the client address of every transaction."""

    def __init__(self) -> None:
        super().__init__()
        self.peers: list[str] = []

    async def handle_DATA(
        self, server: SMTP, session: ServerSession, envelope: ServerEnvelope
    ) -> str:
        peer: Any = session.peer  # (host, port); typed loosely by aiosmtpd
        self.peers.append(str(peer[0]))
        return await super().handle_DATA(server, session, envelope)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_aiosmtpd_sees_the_source_address(flavour: Flavour) -> None:
    handler = PeerHandler()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, server_hostname=HOSTNAME)
    controller.start()
    try:
        result = send_with(
            flavour,
            message(),
            host="127.0.0.1",
            port=port,
            tls=TLS.NONE,
            timeouts=FAST,
            source_address="127.0.0.3",
        )
    finally:
        controller.stop()
    assert result.ok, result
    assert handler.peers == ["127.0.0.3"]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_mx_delivery_connects_from_the_source_address(flavour: Flavour) -> None:
    # An address literal needs no DNS: the transport goes to 127.0.0.1 at the given port.
    to = "bob@[127.0.0.1]"
    with SMTPTestServer() as server:
        options: dict[str, Any] = {
            "port": server.port,
            "timeouts": FAST,
            "source_address": "127.0.0.4",
        }
        envelope = Envelope("alice@example.org", [to])
        if flavour == "sync":
            with MXTransport(**options, refused_networks=()) as mx:
                result = mx.send(message(to), envelope)
        else:

            async def main() -> Any:
                async with AsyncMXTransport(**options, refused_networks=()) as mx:
                    return await mx.asend(message(to), envelope)

            result = run(main())
        (received,) = server.wait_for(1)
    assert result.ok, result
    assert received.peer[0] == "127.0.0.4"


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_callout_probes_from_the_source_address(flavour: Flavour) -> None:
    with SMTPTestServer() as server:
        options: dict[str, Any] = {"port": server.port, "source_address": "127.0.0.5"}
        if flavour == "sync":
            result = Callout(**options, refused_networks=()).probe("bob@[127.0.0.1]")
        else:
            result = run(AsyncCallout(**options, refused_networks=()).probe("bob@[127.0.0.1]"))
        deadline = time.monotonic() + 5
        while not server.sessions and time.monotonic() < deadline:
            time.sleep(0.01)
        peers = {session.peer[0] for session in server.sessions}
    assert result.status is CalloutStatus.ACCEPTED, result
    assert peers == {"127.0.0.5"}


@pytest.mark.postfix
def test_postfix_logs_the_source_address(postfix: PostfixInstance) -> None:
    with SMTPTransport(
        postfix.host,
        postfix.smtp_port,
        tls=TLS.NONE,
        timeouts=FAST,
        source_address="127.0.0.9",
    ) as transport:
        result = transport.send(message(f"r{time.monotonic_ns()}@sink.mailrelay.test"))
    assert result.ok, result
    postfix.wait_for_log("[127.0.0.9]")


# -- what cannot work, said ----------------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_server_without_an_address_of_the_source_family(flavour: Flavour) -> None:
    with pytest.raises(ConnectError, match=r"127\.0\.0\.1 has no IPv6 address") as info:
        send_with(
            flavour,
            message(),
            host="127.0.0.1",
            port=free_port(),
            tls=TLS.NONE,
            timeouts=FAST,
            source_address="::1",
        )
    assert info.value.is_transient


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_an_address_this_host_does_not_have(flavour: Flavour) -> None:
    # 192.0.2.0/24 is TEST-NET-1 (RFC 5737): never configured here, so binding fails at
    # once, and nothing leaves the machine.
    with SMTPTestServer() as server:
        with pytest.raises(ConnectError, match="could not connect") as info:
            send_with(
                flavour,
                message(),
                host=server.host,
                port=server.port,
                tls=TLS.NONE,
                timeouts=FAST,
                source_address="192.0.2.1",
            )
        assert server.sessions == []
    assert "assign requested address" in str(info.value).lower()


def test_mx_delivery_with_no_reachable_family_is_transient() -> None:
    with MXTransport(
        port=free_port(), timeouts=FAST, source_address="::1", refused_networks=()
    ) as mx:
        result = mx.send(message("bob@[127.0.0.1]"), Envelope("a@example.org", ["bob@[127.0.0.1]"]))
    (recipient,) = result.recipients
    assert recipient.outcome is Outcome.TRANSIENT
    assert recipient.reason is not None
    assert "no IPv6 address" in recipient.reason
