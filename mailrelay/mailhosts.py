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

__all__ = ["DNSStatus", "HostAddresses", "MailHost", "MailHosts", "TLSARecord", "TLSARecords"]


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
        secure: every address answer that was an answer (records, NODATA, NXDOMAIN) came
            with the AD bit from the resolver, and at least one did: DNSSEC-validated
            (RFC 4035 §3.2.3; meaningful only from a validating resolver on a trusted path,
            see :mod:`mailrelay.resolver`). RFC 7672 §2.2.2 uses it for MX hosts.
    """

    name: str
    status: DNSStatus
    ipv4: tuple[str, ...] = ()
    ipv6: tuple[str, ...] = ()
    secure: bool = False

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
        secure: the MX answer (for an implicit MX: the MX denial and the address answers)
            was DNSSEC-validated (the AD bit, see :attr:`HostAddresses.secure`): RFC 7672
            §2.2.1 applies DANE only to exchangers found through a secure MX RRset.
    """

    domain: str
    status: DNSStatus
    hosts: tuple[MailHost, ...] = ()
    null_mx: bool = False
    implicit: bool = False
    secure: bool = False

    @property
    def exists(self) -> bool:
        """Whether the domain exists in the DNS."""
        return self.status is not DNSStatus.NXDOMAIN

    @property
    def usable_hosts(self) -> tuple[MailHost, ...]:
        """The exchangers that have at least one address, in order."""
        return tuple(host for host in self.hosts if host.ipv4 or host.ipv6)


def _usage_field(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
        raise ValueError(f"{attribute.name} must be a number from 0 to 255, not {value!r}")


@attrs.frozen(kw_only=True)
class TLSARecord:
    """One TLSA record (RFC 6698 §2.1), as plain data.

    Attributes:
        usage: the certificate usage: 0 PKIX-TA, 1 PKIX-EE, 2 DANE-TA, 3 DANE-EE
            (RFC 7218 §2.1 names).
        selector: 0 the whole certificate, 1 its SubjectPublicKeyInfo (RFC 6698 §2.1.2).
        matching_type: 0 the selected content itself, 1 its SHA-256, 2 its SHA-512
            (RFC 6698 §2.1.3).
        data: the certificate association data.
    """

    usage: int = attrs.field(validator=_usage_field)
    selector: int = attrs.field(validator=_usage_field)
    matching_type: int = attrs.field(validator=_usage_field)
    data: bytes = attrs.field(validator=attrs.validators.instance_of(bytes))

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.matching_type} {self.data.hex()}"


@attrs.frozen(kw_only=True)
class TLSARecords:
    """The TLSA RRset of one service (``_<port>._tcp.<host>``, RFC 6698 §3).

    Attributes:
        name: the name looked up (``_25._tcp.mx.example.com``).
        status: ``OK`` (records found), ``NODATA`` or ``NXDOMAIN`` (none).
        records: the records, in the order the server gave them.
        secure: the answer (records or denial) was DNSSEC-validated (the AD bit). RFC 7672
            §2.2: only a secure TLSA RRset counts; insecure records are ignored.
    """

    name: str
    status: DNSStatus
    records: tuple[TLSARecord, ...] = ()
    secure: bool = False
