"""What the DNS says about where a domain's mail goes, as plain values.

Rules of this module:

- These are facts, never failures: NXDOMAIN and NODATA are answers about a name and are
  recorded in a :class:`DNSStatus`; only the transient statuses (timeout, SERVFAIL, REFUSED,
  anything malformed) mean "we could not learn", and :attr:`DNSStatus.is_transient` says so.
- The values are frozen and hold no dnspython object, so they can be cached whole and shared
  between threads. :mod:`mailrelay.resolver` makes them (it is the only user of dnspython) and
  re-exports every public name here.
"""

from __future__ import annotations

import enum
from typing import Final

import attrs

__all__ = ["DNSStatus", "HostAddresses", "MailHost", "MailHosts"]


class DNSStatus(enum.Enum):
    """What a DNS query told us."""

    #: Records of the asked type exist.
    OK = "ok"
    #: The name does not exist (RCODE 3, RFC 1035 §4.1.1; RFC 8020: nor anything below it).
    NXDOMAIN = "nxdomain"
    #: The name exists but has no records of the asked type (RFC 2308 §2.2).
    NODATA = "nodata"
    #: The server could not answer (RCODE 2).
    SERVFAIL = "servfail"
    #: The server refused to answer (RCODE 5).
    REFUSED = "refused"
    #: No answer arrived in time.
    TIMEOUT = "timeout"
    #: Anything else: a malformed answer, an unreachable server.
    ERROR = "error"

    @property
    def is_transient(self) -> bool:
        """Whether asking again later may give a different answer."""
        return self not in _FACTS


_FACTS: Final = frozenset({DNSStatus.OK, DNSStatus.NXDOMAIN, DNSStatus.NODATA})


@attrs.frozen(kw_only=True)
class HostAddresses:
    """The addresses of one host name.

    Attributes:
        name: the host name looked up (ASCII, lower case, no final dot).
        status: ``OK`` when at least one address was found; otherwise why not (a transient
            status when a lookup failed and no address was found).
        ipv4: the A records, in the order the server gave them.
        ipv6: the AAAA records, in the order the server gave them.
    """

    name: str
    status: DNSStatus
    ipv4: tuple[str, ...] = ()
    ipv6: tuple[str, ...] = ()

    @property
    def addresses(self) -> tuple[str, ...]:
        """Every address, IPv4 first (still the family most likely to work), then IPv6."""
        return self.ipv4 + self.ipv6


@attrs.frozen(kw_only=True)
class MailHost(HostAddresses):
    """One mail exchanger of a domain, with its preference and addresses.

    Attributes:
        preference: the MX preference (lower is tried first); 0 for an implicit exchanger.
    """

    preference: int


@attrs.frozen(kw_only=True)
class MailHosts:
    """Where mail for a domain goes (RFC 5321 §5.1).

    Attributes:
        domain: the domain looked up (ASCII A-label form, lower case, no final dot).
        status: ``OK`` when the domain has MX records, or none but an address (implicit MX);
            ``NXDOMAIN`` when the domain does not exist; ``NODATA`` when it exists but has
            neither MX nor address records.
        hosts: the exchangers in the order to try them: by preference, equal preferences
            shuffled. Empty for a null MX, NXDOMAIN and NODATA, and when every MX record's
            target is ``.`` without being a null MX (``MX 10 .``): no usable exchanger.
        null_mx: the domain publishes RFC 7505's null MX (its one MX record is ``0 .``):
            it accepts no mail.
        implicit: the domain has no MX records; its own address is the exchanger.
    """

    domain: str
    status: DNSStatus
    hosts: tuple[MailHost, ...] = ()
    null_mx: bool = False
    implicit: bool = False

    @property
    def exists(self) -> bool:
        """Whether the domain exists in the DNS."""
        return self.status is not DNSStatus.NXDOMAIN

    @property
    def usable_hosts(self) -> tuple[MailHost, ...]:
        """The exchangers that have at least one address, in order."""
        return tuple(host for host in self.hosts if host.ipv4 or host.ipv6)
