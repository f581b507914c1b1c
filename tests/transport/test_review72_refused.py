"""Review 72: ``refused_networks`` judges an exchanger address by the host it reaches.

Connecting to the unspecified address (``0.0.0.0``, ``::``) reaches the sending host itself
on Linux and the BSDs. The resolver drops such answers, but an address literal
(``user@[0.0.0.0]``, ``user@[IPv6:::]``) walked past the loopback default to the local
host. IPv6 forms that carry an IPv4 address (IPv4-compatible ``::127.0.0.1``, NAT64's
well-known prefix ``64:ff9b::/96``, RFC 6052) are judged by that IPv4 address, as
IPv4-mapped ones already were.
"""

from __future__ import annotations

import ipaddress
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.results import Outcome
from mailrelay.transport.mx import LOOPBACK_NETWORKS, PRIVATE_NETWORKS
from mailrelay.transport.mx_plan import MXPolicy, Verdict, is_refused, plan, refused_networks
from tests.peers.unbound import UnboundServer
from tests.transport.helpers import FLAVOURS, Flavour
from tests.transport.test_mx import port  # noqa: F401 -- fixture
from tests.transport.test_mx_refused import connections, deliver, hosts, quiet_listener  # noqa: F401

LOOPBACK = refused_networks(LOOPBACK_NETWORKS)
PRIVATE = refused_networks(LOOPBACK_NETWORKS + PRIVATE_NETWORKS)


@pytest.mark.parametrize(
    ("address", "networks"),
    [
        ("0.0.0.0", LOOPBACK),
        ("::", LOOPBACK),
        ("::ffff:0.0.0.0", LOOPBACK),
        ("::127.0.0.1", LOOPBACK),
        ("::7f00:1", LOOPBACK),
        ("64:ff9b::127.0.0.1", LOOPBACK),
        ("64:ff9b::7f00:1", LOOPBACK),
        ("64:ff9b::10.0.0.1", PRIVATE),
        ("::192.168.0.1", PRIVATE),
    ],
)
def test_addresses_reaching_a_refused_host_are_refused(
    address: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
) -> None:
    assert is_refused(address, networks)
    got = plan(
        "example.org",
        hosts(("mx.example.org", (address,))),
        MXPolicy(),
        port=25,
        max_addresses=10,
        refused=networks,
    )
    assert isinstance(got, Verdict)
    assert got.outcome is Outcome.PERMANENT


@pytest.mark.parametrize(
    "address", ["192.0.2.1", "2001:db8::1", "64:ff9b::192.0.2.1", "::ffff:198.51.100.7"]
)
def test_public_addresses_stay_deliverable(address: str) -> None:
    assert not is_refused(address, PRIVATE)


@given(st.ip_addresses(v=4))
def test_embedded_ipv4_forms_are_judged_by_their_ipv4_address(
    address: ipaddress.IPv4Address,
) -> None:
    for networks in (LOOPBACK, PRIVATE):
        expected = is_refused(str(address), networks)
        assert is_refused(f"64:ff9b::{address}", networks) == expected
        if int(address) > 1:  # ::0.0.0.0 is "::" and ::0.0.0.1 is "::1"
            assert is_refused(f"::{address}", networks) == expected


def test_nothing_refused_means_nothing_refused() -> None:
    for address in ("0.0.0.0", "::", "::127.0.0.1", "64:ff9b::7f00:1"):
        assert not is_refused(address, ())


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_an_unspecified_address_literal_does_not_reach_the_local_host(
    flavour: Flavour,
    unbound: UnboundServer,
    port: int,  # noqa: F811
    quiet_listener: socket.socket,  # noqa: F811
) -> None:
    """``bob@[0.0.0.0]``: a connection to 0.0.0.0 lands on the listener at 127.0.0.1."""
    result = deliver(flavour, unbound, port, "bob@[0.0.0.0]")
    (only,) = result.recipients
    assert only.outcome is Outcome.PERMANENT
    assert "in a network this transport refuses" in (only.reason or "")
    assert connections(quiet_listener) == 0
