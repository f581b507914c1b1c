"""MX delivery and the callout never connect to a refused exchanger address (loopback by
default): a stranger's domain pointing at 127.0.0.1 must not make us deliver to ourselves."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.callout import AsyncCallout, Callout, CalloutStatus
from mailrelay.envelope import Envelope
from mailrelay.errors import ConfigurationError
from mailrelay.options import TLS, Timeouts
from mailrelay.resolver import DNSStatus, MailHost, MailHosts
from mailrelay.results import DeliveryResult, Outcome
from mailrelay.transport.mx import LOOPBACK_NETWORKS, PRIVATE_NETWORKS, MXTransport
from mailrelay.transport.mx_async import AsyncMXTransport
from mailrelay.transport.mx_plan import (
    MXPolicy,
    Target,
    Verdict,
    is_refused,
    plan,
    refused_networks,
)
from tests.peers.unbound import UnboundServer
from tests.transport.helpers import FLAVOURS, Flavour, make_message, run
from tests.transport.test_mx import Farm, farm, free_everywhere, port  # noqa: F401 -- fixtures

FAST = Timeouts.all(2)
LOOPBACK = refused_networks(LOOPBACK_NETWORKS)
PRIVATE = refused_networks(LOOPBACK_NETWORKS + PRIVATE_NETWORKS)


def hosts(*exchangers: tuple[str, tuple[str, ...]]) -> MailHosts:
    return MailHosts(
        domain="example.org",
        status=DNSStatus.OK,
        hosts=tuple(
            MailHost(
                name=name,
                status=DNSStatus.OK,
                ipv4=tuple(a for a in addresses if ":" not in a),
                ipv6=tuple(a for a in addresses if ":" in a),
                preference=10 * number,
            )
            for number, (name, addresses) in enumerate(exchangers, start=1)
        ),
    )


# -- the plan ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("addresses", "refused", "kept"),
    [
        (("127.0.0.1",), LOOPBACK, ()),
        (("127.45.6.7",), LOOPBACK, ()),
        (("::1",), LOOPBACK, ()),
        (("::ffff:127.0.0.1",), LOOPBACK, ()),
        (("127.0.0.1", "192.0.2.1"), LOOPBACK, ("192.0.2.1",)),
        (("10.1.2.3", "::1", "2001:db8::1"), LOOPBACK, ("10.1.2.3", "2001:db8::1")),
        (("10.1.2.3",), PRIVATE, ()),
        (("172.16.0.9", "192.168.1.1", "169.254.169.254"), PRIVATE, ()),
        (("fd00::25", "fe80::1"), PRIVATE, ()),
        (("::ffff:10.0.0.1", "198.51.100.7"), PRIVATE, ("198.51.100.7",)),
        (("127.0.0.1", "::1"), (), ("127.0.0.1", "::1")),
    ],
)
def test_refused_addresses_are_never_targets(
    addresses: tuple[str, ...], refused: tuple[Any, ...], kept: tuple[str, ...]
) -> None:
    found = hosts(("mx.example.org", addresses))
    got = plan("example.org", found, MXPolicy(), port=25, max_addresses=10, refused=refused)
    if kept:
        assert isinstance(got, list)
        assert tuple(target.address for target in got) == kept
    else:
        assert isinstance(got, Verdict)
        assert got.outcome is Outcome.PERMANENT
        assert "in a network this transport refuses" in got.reason
        assert f"mx.example.org[{addresses[0]}]:25" in got.reason


def test_a_refused_exchanger_is_skipped_and_the_next_one_tried() -> None:
    found = hosts(("mx1.example.org", ("127.0.0.1",)), ("mx2.example.org", ("192.0.2.9",)))
    got = plan("example.org", found, MXPolicy(), port=25, max_addresses=10, refused=LOOPBACK)
    assert got == [Target(name="mx2.example.org", address="192.0.2.9", port=25)]


def test_a_failed_lookup_elsewhere_keeps_the_domain_transient() -> None:
    """Refused here, not looked up there: the other exchanger may resolve later."""
    found = MailHosts(
        domain="example.org",
        status=DNSStatus.OK,
        hosts=(
            MailHost(
                name="mx1.example.org", status=DNSStatus.OK, ipv4=("127.0.0.1",), preference=10
            ),
            MailHost(name="mx2.example.org", status=DNSStatus.SERVFAIL, preference=20),
        ),
    )
    got = plan("example.org", found, MXPolicy(), port=25, max_addresses=10, refused=LOOPBACK)
    assert isinstance(got, Verdict)
    assert got.outcome is Outcome.TRANSIENT


@given(st.ip_addresses(v=4))
def test_an_ipv4_mapped_address_is_judged_by_its_ipv4_address(
    address: ipaddress.IPv4Address,
) -> None:
    for networks in (LOOPBACK, PRIVATE):
        assert is_refused(f"::ffff:{address}", networks) == is_refused(str(address), networks)
    # 0.0.0.0 reaches the local host: refused with loopback (review 72).
    assert is_refused(str(address), LOOPBACK) == (address.is_loopback or address.is_unspecified)


@pytest.mark.parametrize(
    "value",
    ["127.0.0.0/8", ("not a network",), ("10.0.0.0/33",), (b"10.0.0.0/8",), (None,)],
)
def test_nonsense_settings_are_configuration_errors(value: Any) -> None:
    for make in (MXTransport, AsyncMXTransport, Callout, AsyncCallout):
        with pytest.raises(ConfigurationError, match="refused_networks"):
            make(refused_networks=value)


# -- against real servers ------------------------------------------------------------------------


@pytest.fixture
def quiet_listener(port: int) -> Iterator[socket.socket]:  # noqa: F811 -- the fixture
    """A socket listening on 127.0.0.1 at the exchangers' port that records connections
    (the kernel completes them into its backlog even though nobody accepts)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(16)
    listener.setblocking(False)
    yield listener
    listener.close()


def connections(listener: socket.socket) -> int:
    count = 0
    while True:
        try:
            peer, _ = listener.accept()
        except BlockingIOError:
            return count
        peer.close()
        count += 1


def deliver(
    flavour: Flavour, unbound: UnboundServer, exchanger_port: int, recipient: str, **kwargs: Any
) -> DeliveryResult:
    message = make_message(to=(recipient,), sender="sender@mailrelay.test")
    envelope = Envelope.from_message(message)
    options: dict[str, Any] = {"port": exchanger_port, "timeouts": FAST, "tls": TLS.NONE, **kwargs}
    if flavour == "sync":
        with MXTransport(unbound.resolver(timeout=1.0), **options) as mx:
            return mx.send(message, envelope)

    async def main() -> DeliveryResult:
        async with AsyncMXTransport(unbound.async_resolver(timeout=1.0), **options) as mx:
            return await mx.asend(message, envelope)

    return run(main())


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("recipient", ["bob@mailrelay.test", "bob@[127.0.0.1]"])
def test_loopback_exchangers_are_refused_by_default(
    flavour: Flavour,
    unbound: UnboundServer,
    port: int,  # noqa: F811
    quiet_listener: socket.socket,
    recipient: str,
) -> None:
    """mailrelay.test's exchanger is 127.0.0.1 (and ::1): nothing connects to it."""
    result = deliver(flavour, unbound, port, recipient)
    (only,) = result.recipients
    assert only.outcome is Outcome.PERMANENT
    assert "in a network this transport refuses" in (only.reason or "")
    assert "127.0.0.1" in (only.reason or "")
    assert str(only.enhanced) == "5.4.4"  # RFC 3463: unable to route
    assert connections(quiet_listener) == 0


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_loopback_is_delivered_to_when_nothing_is_refused(
    flavour: Flavour,
    unbound: UnboundServer,
    farm: Farm,  # noqa: F811
) -> None:
    server = farm.start("127.0.0.1", tls=None)
    result = deliver(flavour, unbound, farm.port, "bob@mailrelay.test", refused_networks=())
    assert result.ok, result
    assert len(server.messages) == 1


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_refused_preferred_exchanger_is_passed_over_for_the_backup(
    flavour: Flavour,
    unbound: UnboundServer,
    farm: Farm,  # noqa: F811
) -> None:
    """mx2.test prefers 127.0.0.1 (and ::1), then 127.0.0.2: refusing the first host only
    sends the mail to the backup, which says so in the result."""
    preferred = farm.start("127.0.0.1", tls=None)
    backup = farm.start("127.0.0.2", tls=None)
    result = deliver(
        flavour,
        unbound,
        farm.port,
        "bob@mx2.test",
        refused_networks=("127.0.0.1/32", "::1/128"),
    )
    assert result.ok, result
    assert (len(preferred.messages), len(backup.messages)) == (0, 1)
    assert result.recipients[0].host == f"mx2.mx2.test[127.0.0.2]:{farm.port}"


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_the_callout_does_not_probe_a_refused_exchanger(
    flavour: Flavour,
    unbound: UnboundServer,
    port: int,  # noqa: F811
    quiet_listener: socket.socket,
) -> None:
    options: dict[str, Any] = {"port": port, "timeouts": FAST, "tls": TLS.NONE}
    if flavour == "sync":
        result = Callout(unbound.resolver(timeout=1.0), **options).probe("bob@mailrelay.test")
    else:
        prober = AsyncCallout(unbound.async_resolver(timeout=1.0), **options)
        result = run(prober.probe("bob@mailrelay.test"))
    assert result.status is CalloutStatus.UNKNOWN
    assert "in a network this transport refuses" in (result.detail or "")
    assert connections(quiet_listener) == 0


@pytest.mark.parametrize(
    ("value", "networks"),
    [
        ("none", ()),
        ("loopback", LOOPBACK_NETWORKS),
        ("loopback,private", LOOPBACK_NETWORKS + PRIVATE_NETWORKS),
        ("loopback, 192.0.2.0/24", (*LOOPBACK_NETWORKS, "192.0.2.0/24")),
    ],
)
def test_the_mx_url_sets_refused_networks(value: str, networks: tuple[str, ...]) -> None:
    from mailrelay.transport.url import TransportURL, transport_from_url

    assert TransportURL.parse(f"mx://?refused_networks={value}").refused_networks == networks
    with transport_from_url(f"mx://?refused_networks={value}") as mx:
        assert isinstance(mx, MXTransport)
        assert mx.settings.refused == refused_networks(networks)


@pytest.mark.parametrize("value", ["", "bogus", "loopback,10.0.0.0/33", "none,loopback"])
def test_the_mx_url_refuses_nonsense_networks(value: str) -> None:
    from mailrelay.transport.url import TransportURL

    with pytest.raises(ConfigurationError, match="refused_networks"):
        TransportURL.parse(f"mx://?refused_networks={value}")
