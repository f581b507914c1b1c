"""Which IP addresses outbound HTTPS may reach: a guard against server-side request forgery.

MTA-STS policy fetches (:mod:`mailrelay.transport.mtasts`) and TLS-RPT report POSTs
(:mod:`mailrelay.transport.tlsrpt`) connect to hosts that *other people's DNS* names: the
recipient domain's ``mta-sts.<domain>``, the ``rua`` of its ``_smtp._tls`` record. A hostile
domain can point them at loopback, a private network or the cloud metadata service, and
make a sender that runs inside a private network send requests to internal services. Both
modules therefore connect, by default, only to *public* addresses, as decided here.

Rules of this module:

- An address is public when it is a globally routable unicast address: :mod:`ipaddress`'s
  ``is_global`` (the IANA special-purpose registries, RFC 6890), and not multicast (Python
  counts some multicast as global). That excludes loopback, RFC 1918, link-local
  (169.254.0.0/16: the metadata service; fe80::/10), CGNAT (100.64.0.0/10, RFC 6598),
  unique-local (fc00::/7, RFC 4193), unspecified, reserved and the documentation and
  benchmarking ranges.
- Gaps of Python 3.11's ``is_global``, closed here explicitly: an IPv6 address that embeds
  an IPv4 address is judged by the IPv4 address it reaches (IPv4-mapped ``::ffff:0:0/96``,
  whose ``is_global`` says True for ``::ffff:100.64.0.1``; the NAT64 well-known prefix
  ``64:ff9b::/96``, RFC 6052; 6to4 ``2002::/16``, RFC 3056); the deprecated IPv4-compatible
  form ``::/96`` (RFC 4291 §2.5.5.1) is never public; other IPv6 must lie in the global
  unicast space ``2000::/3`` (RFC 4291 §2.4: so site-local ``fec0::/10`` and local-use
  NAT64 ``64:ff9b:1::/48`` are out) and outside the IPv6 documentation prefix
  ``3fff::/20`` (RFC 9637); 100.64.0.0/10 is listed here too, whatever the Python version
  says.
- Callers check *every* address a name resolves to before the first connection, refuse the
  whole name when one is not public, and then connect only to the addresses they checked
  (never resolving again): that is what defeats DNS rebinding. Both callers do it through
  :mod:`mailrelay.transport._https` (``refuse_private``, ``PinnedHTTPSConnection``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Final

__all__ = ["is_public_address", "non_public_addresses"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# RFC 6598 shared address space (CGNAT): not global, whatever a Python version says.
_NOT_PUBLIC_V4: Final = (ipaddress.IPv4Network("100.64.0.0/10"),)
# RFC 4291 §2.4: global unicast is 2000::/3; everything else is special or unassigned.
_GLOBAL_UNICAST_V6: Final = ipaddress.IPv6Network("2000::/3")
_NOT_PUBLIC_V6: Final = (
    ipaddress.IPv6Network("3fff::/20"),  # RFC 9637: documentation
    ipaddress.IPv6Network("2001:db8::/32"),  # RFC 3849: documentation
)
# RFC 6052 §2.1: the NAT64 well-known prefix; the IPv4 address is the low 32 bits.
_NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")
# RFC 4291 §2.5.5.1: IPv4-compatible IPv6 addresses (deprecated).
_IPV4_COMPATIBLE: Final = ipaddress.IPv6Network("::/96")


def _public_v4(address: ipaddress.IPv4Address) -> bool:
    if address.is_multicast or any(address in net for net in _NOT_PUBLIC_V4):
        return False
    return address.is_global


def _public_v6(address: ipaddress.IPv6Address) -> bool:
    mapped = address.ipv4_mapped
    if mapped is not None:
        return _public_v4(mapped)
    if address in _NAT64:
        return _public_v4(ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF))
    if address in _IPV4_COMPATIBLE:
        return False  # also :: and ::1
    embedded = address.sixtofour
    if embedded is not None:
        # A 6to4 address is routed to the IPv4 address it embeds (RFC 3056 §2).
        return _public_v4(embedded)
    if address not in _GLOBAL_UNICAST_V6 or any(address in net for net in _NOT_PUBLIC_V6):
        return False
    return address.is_global and not address.is_multicast


def is_public_address(address: str | IPAddress) -> bool:
    """Whether ``address`` is a public unicast address, fit for outbound HTTPS to a host
    named by someone else's DNS (see the module's rules).

    Args:
        address: an IPv4 or IPv6 address (text may carry an IPv6 zone, ``fe80::1%eth0``).

    Raises:
        ValueError: ``address`` is not an IP address.
    """
    if isinstance(address, str):
        # The zone only says which link: the address alone decides.
        address = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv4Address):
        return _public_v4(address)
    return _public_v6(address)


def non_public_addresses(addresses: Iterable[str]) -> tuple[str, ...]:
    """The addresses among ``addresses`` that are not public (text that is no IP address
    counts as not public), in their order."""
    refused: list[str] = []
    for address in addresses:
        try:
            public = is_public_address(address)
        except ValueError:
            public = False
        if not public:
            refused.append(address)
    return tuple(refused)
