"""mailrelay.transport.netguard: which addresses outbound HTTPS may reach."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.transport.netguard import is_public_address, non_public_addresses

NOT_PUBLIC = [
    # IPv4
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("10.1.2.3", "RFC 1918"),
    ("172.16.0.1", "RFC 1918"),
    ("172.31.255.255", "RFC 1918"),
    ("192.168.1.1", "RFC 1918"),
    ("169.254.169.254", "link-local: the cloud metadata service"),
    ("100.64.0.1", "CGNAT, RFC 6598"),
    ("100.127.255.254", "CGNAT, RFC 6598"),
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "this network"),
    ("224.0.0.1", "multicast (Python calls it global)"),
    ("233.252.0.1", "multicast documentation (Python calls it global)"),
    ("239.255.255.250", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "limited broadcast"),
    ("192.0.2.1", "documentation"),
    ("198.51.100.7", "documentation"),
    ("203.0.113.9", "documentation"),
    ("198.18.0.1", "benchmarking"),
    ("192.0.0.1", "IETF protocol assignments"),
    # IPv6
    ("::1", "loopback"),
    ("::", "unspecified"),
    ("fd00::1", "unique local, RFC 4193"),
    ("fc00::1", "unique local, RFC 4193"),
    ("fe80::1", "link-local"),
    ("fe80::1%eth0", "link-local with a zone"),
    ("fec0::1", "site-local (Python calls it global)"),
    ("ff0e::1", "global-scope multicast (Python calls it global)"),
    ("ff02::1", "multicast"),
    ("2001:db8::1", "documentation"),
    ("3fff::1", "documentation, RFC 9637 (Python 3.11 calls it global)"),
    ("2001::1", "Teredo"),
    ("100::1", "discard-only"),
    ("5f00::1", "SRv6 SIDs (outside 2000::/3)"),
    ("::ffff:127.0.0.1", "IPv4-mapped loopback"),
    ("::ffff:10.0.0.1", "IPv4-mapped RFC 1918"),
    ("::ffff:169.254.169.254", "IPv4-mapped metadata service"),
    ("::ffff:100.64.0.1", "IPv4-mapped CGNAT (Python 3.11 calls it global)"),
    ("::ffff:224.0.0.1", "IPv4-mapped multicast (Python 3.11 calls it global)"),
    ("::7f00:1", "IPv4-compatible loopback (Python 3.11 calls it global)"),
    ("::808:808", "IPv4-compatible, deprecated"),
    ("64:ff9b::7f00:1", "NAT64 of loopback (Python 3.11 calls it global)"),
    ("64:ff9b::a9fe:a9fe", "NAT64 of the metadata service"),
    ("64:ff9b:1::1", "local-use NAT64, RFC 8215"),
    ("2002:7f00:1::1", "6to4 of loopback (Python 3.11 calls it global)"),
    ("2002:a00:1::1", "6to4 of RFC 1918"),
    ("2002:a9fe:a9fe::1", "6to4 of the metadata service"),
]

PUBLIC = [
    ("8.8.8.8", "public IPv4"),
    ("1.1.1.1", "public IPv4"),
    ("93.184.216.34", "public IPv4"),
    ("100.63.255.255", "just below CGNAT"),
    ("100.128.0.1", "just above CGNAT"),
    ("172.32.0.1", "just above 172.16/12"),
    ("2606:4700:4700::1111", "public IPv6"),
    ("2a00:1450:4001:830::200e", "public IPv6"),
    ("::ffff:8.8.8.8", "IPv4-mapped public"),
    ("64:ff9b::808:808", "NAT64 of a public address"),
    ("2002:808:808::1", "6to4 of a public address"),
]


@pytest.mark.parametrize(("address", "why"), NOT_PUBLIC)
def test_not_public(address: str, why: str) -> None:
    assert not is_public_address(address), why
    assert non_public_addresses([address]) == (address,)


@pytest.mark.parametrize(("address", "why"), PUBLIC)
def test_public(address: str, why: str) -> None:
    assert is_public_address(address), why
    assert is_public_address(ipaddress.ip_address(address)), why
    assert non_public_addresses([address]) == ()


@pytest.mark.parametrize("text", ["", "localhost", "mta-sts.example.com", "1.2.3", "::g"])
def test_not_an_address(text: str) -> None:
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 address"):
        is_public_address(text)
    assert non_public_addresses([text]) == (text,)


def test_every_address_is_checked_and_the_order_kept() -> None:
    found = ["8.8.8.8", "10.0.0.1", "2606:4700::1", "::1", "1.1.1.1", "169.254.169.254"]
    assert non_public_addresses(found) == ("10.0.0.1", "::1", "169.254.169.254")


_PRIVATE_V4 = [
    ipaddress.IPv4Network(net)
    for net in (
        *("127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"),
        *("100.64.0.0/10", "224.0.0.0/4", "240.0.0.0/4", "0.0.0.0/8"),
    )
]
_v4 = st.integers(min_value=0, max_value=2**32 - 1).map(ipaddress.IPv4Address)


@given(_v4)
def test_embedded_forms_judged_by_the_ipv4_address(address: ipaddress.IPv4Address) -> None:
    verdict = is_public_address(address)
    mapped = ipaddress.IPv6Address(f"::ffff:{address}")
    nat64 = ipaddress.IPv6Address(int(ipaddress.IPv6Address("64:ff9b::")) | int(address))
    sixtofour = ipaddress.IPv6Address((0x2002 << 112) | (int(address) << 80) | 1)
    assert is_public_address(mapped) == verdict
    assert is_public_address(nat64) == verdict
    assert is_public_address(sixtofour) == verdict
    # The IPv4-compatible form is deprecated: never public.
    assert not is_public_address(ipaddress.IPv6Address(int(address)))


@given(st.sampled_from(_PRIVATE_V4), st.integers(min_value=0, max_value=2**32 - 1))
def test_no_address_of_a_private_range_is_public(
    network: ipaddress.IPv4Network, offset: int
) -> None:
    address = network[offset % network.num_addresses]
    assert not is_public_address(address)
    assert not is_public_address(str(address))


@given(st.integers(min_value=0, max_value=2**128 - 1).map(ipaddress.IPv6Address))
def test_public_ipv6_is_global_unicast(address: ipaddress.IPv6Address) -> None:
    if is_public_address(address):
        assert address.is_global
        assert not address.is_multicast
        embeds = (
            address.ipv4_mapped
            or address.sixtofour
            or address in ipaddress.ip_network("64:ff9b::/96")
        )
        assert embeds or address in ipaddress.ip_network("2000::/3")
