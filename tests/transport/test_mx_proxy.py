"""MX delivery and the callout through a real outbound proxy (microsocks, tinyproxy): the
exchangers see the proxy's outgoing address, a proxy that cannot reach one exchanger moves
delivery on to the next, and the EHLO name must then be given."""

from __future__ import annotations

import re
import socket
from typing import Any
from urllib.parse import quote

import pytest

from mailrelay.callout import AsyncCallout, Callout, CalloutStatus
from mailrelay.errors import ConfigurationError
from mailrelay.options import TLS, Timeouts
from mailrelay.results import DeliveryResult, Outcome
from mailrelay.transport.mx import MXTransport
from mailrelay.transport.mx_async import AsyncMXTransport
from mailrelay.transport.url import transport_from_url
from tests.peers.aiosmtpd_server import RecordingHandler
from tests.peers.proxies import ProxyFactory
from tests.peers.unbound import UnboundServer
from tests.transport.helpers import FLAVOURS, Flavour, make_message, run
from tests.transport.test_mx import Farm, farm, free_everywhere, port  # noqa: F401 -- fixtures
from tests.transport.test_mx_refused import deliver as deliver_to

SOCKS_BIND = "127.0.0.2"
HTTP_BIND = "127.0.0.3"
EHLO_NAME = "relay-out.mailrelay.test"
FAST = Timeouts.all(3)


def record_peers(handler: RecordingHandler) -> list[tuple[str, str]]:
    """Record (peer address, EHLO name) for each transaction ``handler`` takes."""
    seen: list[tuple[str, str]] = []
    original = handler.handle_DATA

    async def handle_data(smtp: Any, session: Any, envelope: Any) -> str:
        seen.append((session.peer[0], session.host_name))
        return await original(smtp, session, envelope)

    handler.handle_DATA = handle_data  # type: ignore[method-assign,assignment]
    return seen


def deliver(
    flavour: Flavour, unbound: UnboundServer, exchanger_port: int, recipient: str, proxy: str
) -> DeliveryResult:
    return deliver_to(
        flavour,
        unbound,
        exchanger_port,
        recipient,
        refused_networks=(),
        local_hostname=EHLO_NAME,
        proxy=proxy,
    )


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("kind", ["socks5", "socks5h", "http"])
def test_mx_delivery_goes_through_the_proxy(
    flavour: Flavour,
    kind: str,
    unbound: UnboundServer,
    farm: Farm,  # noqa: F811
    make_proxy: ProxyFactory,
) -> None:
    seen = record_peers(farm.start("127.0.0.1", tls=None))
    if kind == "http":
        proxy = make_proxy("http", connect_ports=(farm.port,), bind=HTTP_BIND)
    else:
        proxy = make_proxy("socks5", username="mx", password="s3cret", bind=SOCKS_BIND)
    result = deliver(flavour, unbound, farm.port, "bob@mailrelay.test", proxy.url(kind))
    assert result.ok, result
    assert seen == [(HTTP_BIND if kind == "http" else SOCKS_BIND, EHLO_NAME)]
    # The result names the exchanger, not the proxy.
    assert result.recipients[0].host == f"mx.mailrelay.test[127.0.0.1]:{farm.port}"


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_an_exchanger_the_proxy_cannot_reach_is_passed_over(
    flavour: Flavour,
    unbound: UnboundServer,
    farm: Farm,  # noqa: F811
    make_proxy: ProxyFactory,
) -> None:
    """failover.test prefers 127.0.0.3, where nothing listens: the proxy says so (a
    transient ProxyError) and the backup at 127.0.0.1 takes the mail."""
    seen = record_peers(farm.start("127.0.0.1", tls=None))
    proxy = make_proxy("socks5", bind=SOCKS_BIND)
    result = deliver(flavour, unbound, farm.port, "bob@failover.test", proxy.url("socks5"))
    assert result.ok, result
    assert seen == [(SOCKS_BIND, EHLO_NAME)]
    assert result.recipients[0].host == f"up.failover.test[127.0.0.1]:{farm.port}"


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_the_callout_probes_through_the_proxy(
    flavour: Flavour,
    unbound: UnboundServer,
    farm: Farm,  # noqa: F811
    make_proxy: ProxyFactory,
) -> None:
    farm.start("127.0.0.1", tls=None)
    proxy = make_proxy("socks5", bind=SOCKS_BIND)
    options: dict[str, Any] = {
        "port": farm.port,
        "timeouts": FAST,
        "tls": TLS.NONE,
        "refused_networks": (),
        "local_hostname": EHLO_NAME,
        "proxy": proxy.url("socks5h"),
        "detect_catch_all": False,
    }
    if flavour == "sync":
        result = Callout(unbound.resolver(timeout=1.0), **options).probe("bob@mailrelay.test")
    else:
        prober = AsyncCallout(unbound.async_resolver(timeout=1.0), **options)
        result = run(prober.probe("bob@mailrelay.test"))
    assert result.status is CalloutStatus.ACCEPTED, result


def test_the_mx_url_takes_a_proxy_and_refused_networks(
    unbound: UnboundServer,
    farm: Farm,  # noqa: F811
    make_proxy: ProxyFactory,
) -> None:
    seen = record_peers(farm.start("127.0.0.1", tls=None))
    proxy = make_proxy("socks5", username="mx", password="p@ss/word", bind=SOCKS_BIND)
    url = (
        f"mx://?port={farm.port}&tls=none&timeout=3&refused_networks=none"
        f"&local_hostname={EHLO_NAME}&proxy={quote(proxy.url('socks5'), safe='')}"
    )
    message = make_message(to=("bob@mailrelay.test",), sender="sender@mailrelay.test")
    with transport_from_url(url, resolver=unbound.resolver(timeout=1.0)) as mx:
        assert "p@ss" not in repr(mx)
        result = mx.send(message)
    assert result.ok, result
    assert seen == [(SOCKS_BIND, EHLO_NAME)]


@pytest.mark.parametrize("make", [MXTransport, AsyncMXTransport, Callout, AsyncCallout])
def test_a_proxy_needs_the_ehlo_name(make: Any) -> None:
    with pytest.raises(ConfigurationError, match="local_hostname"):
        make(proxy="socks5://127.0.0.1:1080")


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_dead_proxy_is_tried_once_not_once_per_target(
    flavour: Flavour,
    unbound: UnboundServer,
    farm: Farm,  # noqa: F811
) -> None:
    """samepref.test has four exchangers: through a proxy nobody listens on, each would
    wait out its own connect timeout. The first failure says the proxy itself is
    unreachable, and every other target fails with it at once."""
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    url = f"socks5://127.0.0.1:{dead.getsockname()[1]}"
    try:
        result = deliver(flavour, unbound, farm.port, "bob@samepref.test", url)
    finally:
        dead.close()
    (only,) = result.recipients
    assert only.outcome is Outcome.TRANSIENT
    reason = only.reason or ""
    # Four targets reported, all with the first one's error: only it was tried.
    assert reason.count("could not reach proxy") == 4, reason
    assert len(set(re.findall(r"could not reach proxy \S+ for (\S+):", reason))) == 1, reason
