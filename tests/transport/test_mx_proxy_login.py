"""MX delivery through a proxy that refuses our login: the proxy is asked once per delivery,
not once per exchanger. The refusal (RFC 1929 status, HTTP 401/407) is about the proxy, not
the target (``ProxyError.proxy_unusable``), so the delivery's other targets, of every domain
of the message, fail at once with it; a failure about one target still moves on."""

from __future__ import annotations

import re
import socket
from typing import Any

import pytest

from mailrelay.envelope import Envelope
from mailrelay.errors import ProxyError
from mailrelay.options import TLS, Timeouts
from mailrelay.results import DeliveryResult, Outcome
from mailrelay.transport.mx import MXTransport
from mailrelay.transport.mx_async import AsyncMXTransport
from mailrelay.transport.mx_plan import Target, Unreachable
from mailrelay.transport.proxy import Proxy, ProxyHandshake
from tests.peers.proxies import FakeFactory, FakeProxy, ProxyFactory, ProxyProcess, relay
from tests.peers.unbound import UnboundServer
from tests.transport.helpers import make_message, run
from tests.transport.test_mx import free_everywhere, port  # noqa: F401 -- fixtures
from tests.transport.test_proxy import feed

EHLO_NAME = "relay-out.mailrelay.test"
FAST = Timeouts.all(3)
#: samepref.test has four exchangers (127.0.0.1, .4, .5, .6), failover.test two (.3, .1).
RECIPIENTS = ("bob@samepref.test", "carol@failover.test")
TARGETS = {"bob@samepref.test": 4, "carol@failover.test": 2}
REFUSED = "the proxy refused our user name and password"


def counted(make_fake_proxy: FakeFactory, real: ProxyProcess) -> FakeProxy:
    """A relay in front of ``real``: each connection made to the proxy is one in
    ``received``."""

    def handler(fake: FakeProxy, conn: socket.socket) -> None:
        with socket.create_connection((real.host, real.port), 5) as upstream:
            relay(conn, upstream)

    return make_fake_proxy(handler)


def start_proxy(kind: str, make_proxy: ProxyFactory, exchanger_port: int) -> ProxyProcess:
    if kind == "http":
        return make_proxy("http", connect_ports=(exchanger_port,), username="mx", password="s3cret")
    return make_proxy("socks5", username="mx", password="s3cret")


def deliver(
    mode: str, unbound: UnboundServer, exchanger_port: int, proxy_url: str
) -> DeliveryResult:
    message = make_message(to=RECIPIENTS, sender="sender@mailrelay.test")
    envelope = Envelope.from_message(message)
    options: dict[str, Any] = {
        "port": exchanger_port,
        "timeouts": FAST,
        "tls": TLS.NONE,
        "refused_networks": (),
        "local_hostname": EHLO_NAME,
        "proxy": proxy_url,
    }
    if mode == "sync":
        with MXTransport(unbound.resolver(timeout=1.0), **options) as mx:
            return mx.send(message, envelope)
    if mode == "async-serial":
        options["concurrency"] = 1

    async def main() -> DeliveryResult:
        async with AsyncMXTransport(unbound.async_resolver(timeout=1.0), **options) as mx:
            return await mx.asend(message, envelope)

    return run(main())


@pytest.mark.parametrize("kind", ["socks5", "http"])
@pytest.mark.parametrize("mode", ["sync", "async-serial", "async"])
def test_a_refused_login_is_asked_once_for_the_whole_delivery(  # noqa: PLR0917 -- fixtures
    mode: str,
    kind: str,
    unbound: UnboundServer,
    port: int,  # noqa: F811
    make_proxy: ProxyFactory,
    make_fake_proxy: FakeFactory,
) -> None:
    """Six targets over two domains, a wrong password: the first target's refusal fails
    the other five at once. The asyncio transport delivers the two domains concurrently
    (their first exchangers differ), so each may have asked before the other's answer:
    one connection when it goes one domain at a time, at most one per domain else."""
    real = start_proxy(kind, make_proxy, port)
    fake = counted(make_fake_proxy, real)
    result = deliver(mode, unbound, port, fake.url(kind, login="mx:wrong@"))

    asked = len(fake.received)
    if mode == "async":
        assert 1 <= asked <= len(RECIPIENTS), asked
    else:
        assert asked == 1, asked
    named: set[str] = set()
    for recipient in result.recipients:
        # Unchanged: a proxy's failure defers MX recipients (the operator can fix the
        # login; the tracker retries), with X.4.1, the connection not made.
        assert recipient.outcome is Outcome.TRANSIENT, recipient
        assert str(recipient.enhanced) == "4.4.1", recipient
        reason = recipient.reason or ""
        # Every target reported, each with the refusal the proxy gave: no other was asked.
        assert reason.count(REFUSED) == TARGETS[str(recipient.address)], reason
        named |= set(re.findall(r"for (\S+): the proxy refused", reason))
        assert "s3cret" not in reason, reason
        assert "wrong" not in reason, reason
    assert 1 <= len(named) <= asked, named


# -- which failures are the proxy's -----------------------------------------------------------

LOGIN = Proxy(scheme="socks5", host="127.0.0.1", port=1080, username="mx", password="s3cret")
HTTP = Proxy(scheme="http", host="127.0.0.1", port=3128, username="mx", password="s3cret")
LOGGED_IN = b"\x05\x02\x01\x00"  # user name and password chosen, then accepted


@pytest.mark.parametrize(
    ("proxy", "stream", "unusable"),
    [
        # About the proxy: no target gets through it.
        (LOGIN, b"\x05\x02\x01\x01", True),  # RFC 1929: login refused
        (LOGIN, b"\x05\xff", True),  # RFC 1928 §3: none of our methods
        (LOGIN, b"\x05\x01", True),  # a method we did not offer (GSSAPI)
        (LOGIN, b"\x04\x5a", True),  # a SOCKS4 answer: not its protocol
        (LOGIN, b"\x05\x02\x02\x00", True),  # a login reply of another version
        (LOGIN, LOGGED_IN + b"\x05\x07", True),  # CONNECT not supported
        (LOGIN, LOGGED_IN + b"\x05\x00\x00\x09", True),  # an address type of no kind
        (HTTP, b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n", True),
        (HTTP, b"HTTP/1.1 401 Unauthorized\r\n\r\n", True),  # tinyproxy 1.11
        (HTTP, b"SSH-2.0-OpenSSH_9.2\r\n\r\n", True),
        # About this target: another may work.
        (LOGIN, LOGGED_IN + b"\x05\x02", False),  # its ruleset forbids this one
        (LOGIN, LOGGED_IN + b"\x05\x04", False),  # host unreachable
        (LOGIN, LOGGED_IN + b"\x05\x05", False),  # connection refused
        (LOGIN, LOGGED_IN + b"\x05\x01", False),  # general failure
        (LOGIN, LOGGED_IN, False),  # closed in the handshake
        (HTTP, b"HTTP/1.1 403 Access violation\r\n\r\n", False),
        (HTTP, b"HTTP/1.1 502 Bad Gateway\r\n\r\n", False),
    ],
)
def test_the_proxy_s_own_failures_are_told_apart(
    proxy: Proxy, stream: bytes, unusable: bool
) -> None:
    handshake = ProxyHandshake(proxy, "192.0.2.1", 25)
    with pytest.raises(ProxyError) as caught:
        feed(handshake, stream)
    assert caught.value.proxy_unusable is unusable
    assert not caught.value.proxy_unreachable


def _error(*, unusable: bool) -> ProxyError:
    return ProxyError("proxy says no", is_transient=not unusable, proxy_unusable=unusable)


@pytest.mark.parametrize("unusable", [True, False])
def test_only_the_proxy_s_own_failure_fails_the_other_targets(unusable: bool) -> None:
    first = Target(name="a.example", address="192.0.2.1", port=25)
    other = Target(name="b.example", address="192.0.2.2", port=25)
    unreachable = Unreachable()
    error = _error(unusable=unusable)
    unreachable.add(first, error)
    assert unreachable.get(first) is error
    assert unreachable.get(other) is (error if unusable else None)
