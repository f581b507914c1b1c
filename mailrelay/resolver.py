"""DNS for mail: where a domain's mail goes, with a shared cache. The only user of dnspython.

Rules of this module:

- :meth:`Resolver.mail_hosts` answers "which hosts take mail for this domain, at which
  addresses" following RFC 5321 §5.1: exchangers sorted by preference, equal preferences
  shuffled on every call (an injectable :class:`random.Random`), no MX records but an A or
  AAAA record makes the domain its own *implicit* exchanger, and a lone MX ``0 .`` is
  RFC 7505's *null MX*: the domain accepts no mail. Any other ``.`` target is skipped.
  Every exchanger's A and AAAA records are looked up; CNAME chains are followed (dnspython
  does so). At most :data:`MAX_MAIL_HOSTS` exchangers are kept, the best by preference: each
  costs two queries, and a zone with thousands of MX records must not cost thousands (nor
  fill the cache: an MX answer is cached as those exchangers only). When none of those
  has an address while the domain names more, the lookup fails (transient): not having
  looked at the others is no ground for "no mail host", which would bounce the mail.
  Of one A or AAAA answer, at most :data:`MAX_HOST_ADDRESSES` addresses are kept; of a
  TXT answer, a few records of the kind asked for, of bounded length (:meth:`Resolver.txt`).
  An exchanger's addresses that no connection may go to (``0.0.0.0/8``, ``::``,
  multicast, the broadcast address: what DNS sinkholes answer for names they block) are
  dropped; an exchanger left with none has a failed (transient) lookup. Loopback and
  private addresses are kept: they are the caller's policy (tests deliver to 127.0.0.x).
- Facts are values, ignorance is an exception. NXDOMAIN and NODATA are answers about the
  domain and come back inside :class:`MailHosts` / :class:`HostAddresses` (their
  :class:`DNSStatus` says which). Timeouts, SERVFAIL, REFUSED and malformed answers mean we
  could not learn the facts: :class:`~mailrelay.errors.ResolverError` with
  ``is_transient=True`` is raised when nothing usable was learnt. An exchanger whose own
  lookups failed is kept, with its transient status, so callers can tell "no host" from
  "no host *yet*".
- One :class:`DNSCache` serves both resolvers (share it by passing ``cache=``). It honours
  TTLs, caches negative answers for the SOA's negative TTL (RFC 2308 §5: the smaller of the
  SOA's TTL and its MINIMUM field; negative answers without an SOA are not cached), keeps
  transient failures for a short ``failure_ttl`` (RFC 2308 §7 allows up to five minutes), is
  bounded (least recently used entries go first), and reads an injectable clock, so tests
  never sleep.
- Lookups of the same key that overlap share one query (in-flight de-duplication): threads
  wait on the first thread's future, tasks await the first task.
- A domain's exchangers are looked up at the same time (tasks in :class:`AsyncResolver`,
  threads in :class:`Resolver` when more than two answers are not cached), so a domain
  whose exchangers never answer costs about two timeouts, not one per query.
- At most ``max_in_flight`` queries (64 by default) are on the wire at once, per
  :class:`Resolver` (all its threads) and per event loop of an :class:`AsyncResolver`:
  each holds a socket, and bulk validation (32 domains at a time, each with up to 33
  queries) would otherwise open about a thousand, past a common ``ulimit -n``; a query
  that cannot open its socket fails, and a good address comes back ``TEMPFAIL``. A query
  waits for its turn before its timeout starts.
- A cache hit touches no dnspython object: answers are stored as plain tuples and whole
  :class:`MailHosts` values, so a warm lookup is a dictionary read.

- DNSSEC (RFC 6840 §5.7, RFC 4035 §3.2.3): queries carry the AD bit, which asks a
  validating recursive resolver to say, with AD in its answer, that it validated the
  records. Every answer records that bit (``secure`` on :class:`HostAddresses`,
  :class:`MailHosts` and :class:`TLSARecords`); an answer assembled from several (a CNAME
  chain we follow ourselves, a domain's MX and address records) is secure only when all its
  parts are. We do not validate signatures ourselves: the AD bit is only as trustworthy as
  the path to the resolver that set it, so give :class:`Resolver` a validating resolver on
  the same host (unbound or BIND on ``127.0.0.1``) or on a network path you trust. A
  validating resolver answers SERVFAIL for *bogus* data (RFC 4035 §5.5), which is a
  transient failure here, as every SERVFAIL is.
- :meth:`Resolver.tlsa` looks up a service's TLSA records (``_<port>._tcp.<host>``,
  RFC 6698 §3) for DANE (:mod:`mailrelay.transport.dane`). A TLSA record dnspython refuses
  (a digest whose length does not fit its matching type) makes dnspython refuse the whole
  answer; TLSA queries therefore go through :class:`_TLSANameserver`, which reads such an
  answer's TLSA RDATA itself (bounded: name pointers must point backwards, lengths must
  fit), so the record reaches DANE as an *unusable* one (RFC 7671 §4, RFC 7672 §2.1.1)
  instead of failing the exchanger's lookup. Only this resolver's
  TLSA queries use it: dnspython's global state (its rdata type registry) is untouched.
  Its UDP exchange reads on, as dnspython's does, past datagrams with the query's id that
  do not answer the question (a forger racing the server, damaged bytes): only at the
  deadline does such a datagram fail the lookup.

The result values live in :mod:`mailrelay.mailhosts` and the cache in :mod:`mailrelay.dnscache`
(neither touches dnspython); this module re-exports their public names.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import itertools
import logging
import math
import random
import re
import socket
import struct
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Generator, Hashable, Sequence
from typing import Any, Final, Generic, NamedTuple, TypeVar

import attrs
import dns.asyncresolver
import dns.exception
import dns.flags
import dns.inet
import dns.message
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import idna

from mailrelay.dnscache import _MISS, DEFAULT_CACHE_SIZE, DNSCache
from mailrelay.errors import ConfigurationError, ResolverError
from mailrelay.mailhosts import (
    DNSStatus,
    HostAddresses,
    MailHost,
    MailHosts,
    TLSARecord,
    TLSARecords,
)

__all__ = [
    "DEFAULT_MAX_IN_FLIGHT",
    "MAX_HOST_ADDRESSES",
    "MAX_MAIL_HOSTS",
    "MAX_TXT_LENGTH",
    "MAX_TXT_RECORDS",
    "AsyncResolver",
    "DNSCache",
    "DNSStatus",
    "HostAddresses",
    "MailHost",
    "MailHosts",
    "Resolver",
    "TLSARecord",
    "TLSARecords",
]

log = logging.getLogger(__name__)

DEFAULT_FAILURE_TTL: Final = 30.0
#: RFC 2308 §5: one to three hours is a sensible upper bound for negative caching.
DEFAULT_MAX_NEGATIVE_TTL: Final = 3 * 3600.0
DEFAULT_MAX_TTL: Final = 86_400.0

_MX: Final = dns.rdatatype.MX
_A: Final = dns.rdatatype.A
_AAAA: Final = dns.rdatatype.AAAA
_SOA: Final = dns.rdatatype.SOA
_TXT: Final = dns.rdatatype.TXT
_TLSA: Final = dns.rdatatype.TLSA
#: RFC 6840 §5.7: a stub sets AD in its queries to ask for the AD bit in the answers.
_QUERY_FLAGS: Final = dns.flags.RD | dns.flags.AD
#: Cache key "type" of an assembled MailHosts value (not a DNS type).
_MAIL_HOSTS: Final = -1
#: A plan asks for at most one batch per exchanger plus the MX query; bounds the driver loops.
_MAX_PLAN_STEPS: Final = 4
#: CNAMEs we follow ourselves when a server stops at one (dnspython's own chain limit is 16).
_MAX_CNAME_HOPS: Final = 8
#: The most exchangers of one domain kept (and looked up): the best by preference.
MAX_MAIL_HOSTS: Final = 16
#: The most addresses kept of one A or AAAA answer, in the order the server gave them.
MAX_HOST_ADDRESSES: Final = 32
#: The most records kept of one TXT answer, and the most characters of one record (longer
#: ones are kept as their version tag alone, see :func:`_txt_records`).
MAX_TXT_RECORDS: Final = 8
MAX_TXT_LENGTH: Final = 2048
#: Owner names that hold policy records beginning with a version tag, and their tags: the
#: readers discard every other record (MTA-STS, RFC 8461 §3.1; TLS-RPT, RFC 8460 §3).
_TXT_TAGS: Final = (("_mta-sts.", "v=STSv1"), ("_smtp._tls.", "v=TLSRPTv1"))
#: Threads a blocking resolver keeps for its exchangers' queries: one domain's worth.
_POOL_SIZE: Final = 2 * MAX_MAIL_HOSTS
#: The most queries one resolver has on the wire at the same time (each holds a socket).
DEFAULT_MAX_IN_FLIGHT: Final = 64
_HOST_CHARS: Final = re.compile(r"[a-z0-9_.-]+")


class _Answer(NamedTuple):
    """One query's outcome, as plain data (cached without any dnspython object)."""

    status: DNSStatus
    records: tuple[Any, ...]  # MX: (preference, target) with "" for "."; A/AAAA: address text
    ttl: float  # how long it may be cached; 0 = not at all
    detail: str = ""
    secure: bool = False  # the answer came with the AD bit (RFC 4035 §3.2.3)


# -- turning dnspython's results into plain answers ------------------------------------------


class _Limits(NamedTuple):
    """Upper bounds on how long answers are kept, in seconds."""

    positive: float
    negative: float
    failure: float


def _negative_ttl(response: dns.message.Message | None, cap: float) -> float:
    """RFC 2308 §5: min(SOA TTL, SOA MINIMUM) (and any CNAME TTL on the way); 0 without an SOA."""
    if response is None or not any(rrset.rdtype == _SOA for rrset in response.authority):
        return 0.0
    try:
        assert isinstance(response, dns.message.QueryMessage)
        return float(min(response.resolve_chaining().minimum_ttl, cap))
    except dns.exception.DNSException:
        return 0.0


def _validated(response: dns.message.Message | None) -> bool:
    """Whether the resolver said it validated the answer (AD, RFC 4035 §3.2.3)."""
    return response is not None and bool(response.flags & dns.flags.AD)


def _is_referral(response: dns.message.Message | None) -> bool:
    """RFC 2308 §2.2: an answer without records, with NS records and no SOA in its
    authority section, is a referral, not NODATA: the server did not recurse (it is not
    a recursive resolver, or a broken forwarder passed an authoritative server's referral
    on). It says nothing about whether the records exist."""
    if response is None:
        return False
    authority = {rrset.rdtype for rrset in response.authority}
    return dns.rdatatype.NS in authority and _SOA not in authority


def _from_answer(answer: dns.resolver.Answer, limits: _Limits, tag: str | None) -> _Answer:
    """An answer as it is cached; ``tag``: the version tag of the TXT records asked for."""
    rrset = answer.rrset
    secure = _validated(answer.response)
    if rrset is None:
        if _is_referral(answer.response):
            # Read as NODATA it would make a deliverable domain "no mail host" (a bounce).
            detail = "a referral, not an answer: the name server does not recurse"
            return _Answer(DNSStatus.ERROR, (), limits.failure, detail)
        ttl = _negative_ttl(answer.response, limits.negative)
        return _Answer(DNSStatus.NODATA, (), ttl, secure=secure)
    ttl = float(min(answer.chaining_result.minimum_ttl, limits.positive))
    if rrset.rdtype == _MX:
        records: tuple[Any, ...] = _mx_records(
            [
                (
                    rd.preference,
                    "" if rd.exchange == dns.name.root else rd.exchange.to_text(True).lower(),
                )
                for rd in rrset
            ]
        )
    elif rrset.rdtype == _TXT:
        records = _txt_records(rrset, tag)
    elif rrset.rdtype == _TLSA:
        records = tuple(_tlsa_fields(rd) for rd in rrset)
    else:
        # A name with thousands of addresses (a hostile zone's, one per domain of a bulk
        # list) must not fill the cache: a delivery tries a handful (max_addresses).
        records = tuple(rd.address for rd in itertools.islice(rrset, MAX_HOST_ADDRESSES))
    return _Answer(DNSStatus.OK, records, ttl, secure=secure)


def _txt_tag(name: str) -> str | None:
    """The version tag the TXT records of ``name`` (a query name) begin with, if known."""
    for prefix, tag in _TXT_TAGS:
        if name.startswith(prefix):
            return tag
    return None


def _txt_records(rrset: Any, tag: str | None) -> tuple[str, ...]:
    """What a TXT answer is kept as: at most :data:`MAX_TXT_RECORDS` records, in the
    server's order; at a policy name (:data:`_TXT_TAGS`), only those beginning with its
    version tag; a record longer than :data:`MAX_TXT_LENGTH` as its tag alone (``""``
    where there is none).

    One answer can hold ~64 KiB of records (over TCP), and a zone can publish that at the
    ``_mta-sts`` and ``_smtp._tls`` names of every domain of a bulk list: kept whole, it
    filled the cache. Their readers discard the records without the tag and take a policy
    only from exactly one that has it, so a few such records say all there is to say (one,
    or more than one). An over-long record is kept as its tag: it still counts (two records
    stay two, and then there is no policy), but it cannot be read as a policy, which a
    record cut elsewhere could (a TLS-RPT address cut in the middle names another mailbox).
    """
    kept: list[str] = []
    for rd in rrset:
        if len(kept) >= MAX_TXT_RECORDS:
            break
        # RFC 1035 §3.3.14: a TXT record is one or more strings of at most 255 octets;
        # the record's text is their concatenation (RFC 7208 §3.3, RFC 8461 §3.1).
        text = b"".join(rd.strings).decode("utf-8", "replace")
        if tag is not None and not text.startswith(tag):
            continue
        kept.append(text if len(text) <= MAX_TXT_LENGTH else tag or "")
    return tuple(kept)


def _mx_records(records: list[tuple[int, str]]) -> tuple[tuple[int, str], ...]:
    """What an MX answer is kept as: the null MX as it is (RFC 7505 §3), else the usable
    exchangers (:func:`_is_host_name`) by preference, each once, at its best preference,
    at most :data:`MAX_MAIL_HOSTS` of them plus one (which says that there were more).

    Only :data:`MAX_MAIL_HOSTS` exchangers are ever looked up; keeping every record would
    let a zone of thousands of MX records (a wildcard, a fresh name per address in a bulk
    list) fill the cache with hundreds of KiB per domain. Ties are put in name order
    (servers rotate RRsets); :meth:`_ResolverBase._deliver` shuffles them on every read.
    """
    if records == [(0, "")]:
        return ((0, ""),)
    usable = sorted((pref, target) for pref, target in records if _is_host_name(target))
    kept: dict[str, int] = {}
    for pref, target in usable:
        if len(kept) > MAX_MAIL_HOSTS:
            break
        kept.setdefault(target, pref)
    return tuple((pref, target) for target, pref in kept.items())


def _tlsa_fields(rd: Any) -> tuple[int, int, int, bytes]:
    """(usage, selector, matching type, data) of a TLSA rdata: a parsed one, or the raw
    RDATA :func:`_lenient_tlsa` kept (RFC 6698 §2.1: three octets, then the data)."""
    if isinstance(rd, dns.rdata.GenericRdata):
        data = bytes(rd.data)
        return data[0], data[1], data[2], data[3:]
    return rd.usage, rd.selector, rd.mtype, bytes(rd.cert)


def _aged(value: object, left: float) -> _Answer:
    """A cached answer with the TTL it has ``left``: what is built from it (a domain's mail
    hosts, cached whole) must not outlive it, however long ago it was asked for another
    domain (RFC 2181 §8: a TTL counts down while the record is cached)."""
    assert isinstance(value, _Answer)
    return value._replace(ttl=left) if left < value.ttl else value


def _from_error(exc: dns.exception.DNSException, limits: _Limits) -> _Answer:
    if isinstance(exc, dns.resolver.NXDOMAIN):
        responses = list(exc.kwargs.get("responses", {}).values())
        last = responses[-1] if responses else None
        ttl = _negative_ttl(last, limits.negative)
        return _Answer(DNSStatus.NXDOMAIN, (), ttl, secure=_validated(last))
    if isinstance(exc, dns.exception.Timeout):
        return _Answer(DNSStatus.TIMEOUT, (), limits.failure, "timed out")
    status = DNSStatus.ERROR
    if isinstance(exc, dns.resolver.NoNameservers):
        # Each error is (server, tcp, port, exception or rcode text, response or None).
        for _server, _tcp, _port, error, response in exc.kwargs.get("errors") or ():
            if response is not None and response.rcode() == dns.rcode.SERVFAIL:
                status = DNSStatus.SERVFAIL
            elif response is not None and response.rcode() == dns.rcode.REFUSED:
                status = DNSStatus.REFUSED
            elif isinstance(error, dns.exception.Timeout):
                status = DNSStatus.TIMEOUT
    return _Answer(status, (), limits.failure, str(exc))


def _plan_query(
    name: str, limits: _Limits
) -> Generator[str, dns.resolver.Answer | dns.exception.DNSException, _Answer]:
    """One query, following CNAMEs: yields names to ask, receives answers or errors.

    A recursive resolver hands back the whole CNAME chain; a server answering from local data
    may stop at the CNAME. Then we ask for the alias's target ourselves (RFC 1034 §5.3.3),
    and the chain's smallest TTL bounds the result's.
    """
    qname = name + "."
    tag = _txt_tag(name)  # the name asked decides, not a CNAME's target
    chain_ttl = limits.positive
    chain_secure = True  # every hop so far came with AD
    for _ in range(_MAX_CNAME_HOPS):
        outcome = yield qname
        if isinstance(outcome, dns.exception.DNSException):
            result = _from_error(outcome, limits)
        elif outcome.rrset is None and outcome.canonical_name != outcome.qname:
            chain_ttl = min(chain_ttl, *(c.ttl for c in outcome.chaining_result.cnames))
            chain_secure = chain_secure and _validated(outcome.response)
            qname = outcome.canonical_name.to_text()
            continue
        else:
            result = _from_answer(outcome, limits, tag)
        if not chain_secure:
            result = result._replace(secure=False)
        return result._replace(ttl=chain_ttl) if chain_ttl < result.ttl else result
    return _Answer(DNSStatus.ERROR, (), limits.failure, f"CNAME chain from {name} too long")


# -- the lookups, written once as plans both resolvers run -----------------------------------

_Query = tuple[str, dns.rdatatype.RdataType]
_Plan = Generator[list[_Query], list[_Answer], tuple[object, float]]


def _host(name: str, preference: int, a: _Answer, aaaa: _Answer) -> MailHost:
    ipv4 = a.records if a.status is DNSStatus.OK else ()
    ipv6 = aaaa.records if aaaa.status is DNSStatus.OK else ()
    if ipv4 or ipv6:
        status = DNSStatus.OK
    elif a.status.is_transient or aaaa.status.is_transient:
        status = a.status if a.status.is_transient else aaaa.status
    elif a.status is DNSStatus.NXDOMAIN and aaaa.status is DNSStatus.NXDOMAIN:
        status = DNSStatus.NXDOMAIN
    else:
        status = DNSStatus.NODATA
    return MailHost(
        name=name,
        preference=preference,
        status=status,
        ipv4=ipv4,
        ipv6=ipv6,
        secure=_all_secure(a, aaaa),
    )


def _all_secure(*answers: _Answer) -> bool:
    """Whether the answers that are answers (not failures) were all validated, and at
    least one was: a failed AAAA lookup does not make secure A records insecure."""
    facts = [answer for answer in answers if not answer.status.is_transient]
    return bool(facts) and all(answer.secure for answer in facts)


def _transient(domain: str, answer: _Answer, what: str) -> ResolverError:
    detail = f": {answer.detail}" if answer.detail else ""
    return ResolverError(
        f"{what} lookup for {domain} failed ({answer.status.value}){detail}",
        name=domain,
        is_transient=True,
    )


def _texts(name: str, answer: _Answer) -> tuple[str, ...]:
    """The records of a TXT answer; ``()`` for a name without any (NXDOMAIN, NODATA)."""
    if answer.status is DNSStatus.OK:
        return answer.records
    if answer.status in (DNSStatus.NXDOMAIN, DNSStatus.NODATA):
        return ()
    raise _transient(name, answer, "TXT")


#: IPv4 addresses no connection may go to: "this host on this network" (RFC 1122
#: §3.2.1.3: never a destination; Linux connects 0.0.0.0 to the local host), multicast
#: (RFC 5771) and the limited broadcast (RFC 919).
_NO_DESTINATION_V4: Final = (
    ipaddress.IPv4Network("0.0.0.0/8"),
    ipaddress.IPv4Network("224.0.0.0/4"),
    ipaddress.IPv4Network("255.255.255.255/32"),
)


def _is_destination(text: str) -> bool:
    """Whether a connection may go to the address ``text`` (an A or AAAA record)."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        elif address.is_unspecified or address.is_multicast:  # RFC 4291 §2.5.2, §2.7
            return False
    return not (
        isinstance(address, ipaddress.IPv4Address)
        and any(address in network for network in _NO_DESTINATION_V4)
    )


def _destinations(answer: _Answer, failure_ttl: float) -> _Answer:
    """A mail host's A or AAAA answer without the addresses no connection may go to.

    A filtering resolver (a DNS sinkhole) answers ``0.0.0.0`` or ``::`` for the names it
    blocks. Taken as an exchanger's address, that made the domain deliverable and sent its
    mail to the local host (which the domain never named); an answer holding nothing but
    such addresses is no answer at all: a transient failure, never a verdict.
    """
    if answer.status is not DNSStatus.OK or all(_is_destination(a) for a in answer.records):
        return answer
    kept = tuple(address for address in answer.records if _is_destination(address))
    if kept:
        return answer._replace(records=kept)
    shown = ", ".join(answer.records[:3])
    return _Answer(
        DNSStatus.ERROR,
        (),
        min(answer.ttl, failure_ttl),
        f"it resolves only to addresses no connection can go to ({shown})",
    )


def _plan_mail_hosts(domain: str, failure_ttl: float) -> _Plan:
    """Find a domain's exchangers; returns (MailHosts or ResolverError, ttl). A failure
    the plan itself finds is kept ``failure_ttl`` seconds at most."""
    (mx,) = yield [(domain, _MX)]
    if mx.status.is_transient:
        return _transient(domain, mx, "MX"), mx.ttl
    if mx.status is DNSStatus.NXDOMAIN:
        return MailHosts(domain=domain, status=DNSStatus.NXDOMAIN), mx.ttl
    if mx.status is DNSStatus.OK:
        # RFC 7505 §3: a null MX is the domain's only MX record, preference 0, target ".".
        if mx.records == ((0, ""),):
            null = MailHosts(domain=domain, status=DNSStatus.OK, null_mx=True, secure=mx.secure)
            return null, mx.ttl
        # Any other "." (next to real exchangers, or at another preference) is a
        # misconfiguration naming no host: it is skipped, and so is a target that is not a
        # host name ("*.example", "mx\\032x.example": the name would also be the TLS
        # server name), as Postfix skips them (:func:`_mx_records` did). MX records none
        # of which names a host leave no exchanger, and no implicit MX either (RFC 5321
        # §5.1: report it).
        exchangers = [(pref, target) for pref, target in mx.records if _is_host_name(target)]
        if not exchangers:
            return MailHosts(domain=domain, status=DNSStatus.OK, secure=mx.secure), mx.ttl
        # RFC 5321 §5.1: lowest preference first; the records come sorted, each target once
        # at its best preference. Each exchanger costs two queries: a hostile or broken
        # zone's thousands of MX records must not turn one lookup into thousands. The best
        # ones are looked up.
        targets = [target for _, target in exchangers[:MAX_MAIL_HOSTS]]
        best = {target: pref for pref, target in reversed(exchangers)}
        answers = yield [(t, _A) for t in targets] + [(t, _AAAA) for t in targets]
        answers = [_destinations(answer, failure_ttl) for answer in answers]
        count = len(targets)
        hosts = tuple(
            _host(t, best[t], answers[i], answers[count + i]) for i, t in enumerate(targets)
        )
        ttl = min([mx.ttl, *(answer.ttl for answer in answers)])
        if len(exchangers) > count and all(
            host.status in (DNSStatus.NXDOMAIN, DNSStatus.NODATA) for host in hosts
        ):
            # No exchanger looked up has an address, but some were not looked up: one of
            # them may take the mail. Not having looked is no ground for "no mail host"
            # (a bounce, a purged address): we could not tell.
            error = ResolverError(
                f"none of the {count} best exchangers of {domain} has an address; "
                "the others were not looked up",
                name=domain,
                is_transient=True,
            )
            return error, min(ttl, failure_ttl)
        # RFC 7672 §2.2.1: what counts for DANE is the MX RRset; each host's own address
        # answers are its MailHost.secure (§2.2.2).
        found = MailHosts(domain=domain, status=DNSStatus.OK, hosts=hosts, secure=mx.secure)
        return found, ttl
    # RFC 5321 §5.1: no MX records, so the domain's own address is an implicit MX.
    a, aaaa = yield [(domain, _A), (domain, _AAAA)]
    a, aaaa = _destinations(a, failure_ttl), _destinations(aaaa, failure_ttl)
    host = _host(domain, 0, a, aaaa)
    ttl = min(mx.ttl, a.ttl, aaaa.ttl)
    if host.status is DNSStatus.OK:
        secure = mx.secure and host.secure  # a secure denial of MX, then secure addresses
        implicit = MailHosts(
            domain=domain, status=DNSStatus.OK, hosts=(host,), implicit=True, secure=secure
        )
        return implicit, ttl
    if host.status.is_transient:
        failed = a if a.status.is_transient else aaaa
        return _transient(domain, failed, "address"), ttl
    return MailHosts(domain=domain, status=DNSStatus.NODATA), ttl


def _plan_addresses(name: str) -> _Plan:
    a, aaaa = yield [(name, _A), (name, _AAAA)]
    host = _host(name, 0, a, aaaa)
    if host.status.is_transient:
        return _transient(name, a if a.status.is_transient else aaaa, "address"), 0.0
    value = HostAddresses(
        name=name, status=host.status, ipv4=host.ipv4, ipv6=host.ipv6, secure=host.secure
    )
    return value, 0.0


def _tlsa_name(host: str, port: int) -> str:
    """RFC 6698 §3: the TLSA owner name of a TCP service, ``_<port>._tcp.<host>``."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigurationError(f"port must be a number from 1 to 65535, not {port!r}")
    return f"_{port}._tcp.{host}"


def _tlsa_queries(
    hosts: Sequence[str], port: int
) -> tuple[list[TLSARecords | ResolverError | None], list[tuple[int, str]]]:
    """For :meth:`Resolver.tlsa_many`: a slot per host (an invalid name's error already in
    it) and the (slot, owner name) pairs to ask."""
    found: list[TLSARecords | ResolverError | None] = [None] * len(hosts)
    queries: list[tuple[int, str]] = []
    for index, host in enumerate(hosts):
        try:
            queries.append((index, _check_name(_tlsa_name(_domain_key(host), port), host)))
        except ResolverError as exc:
            found[index] = exc
    return found, queries


def _queries_of(queries: list[tuple[int, str]]) -> list[_Query]:
    """The TLSA queries of :func:`_tlsa_queries`' pairs."""
    return [(key, _TLSA) for _, key in queries]


def _tlsa_or_error(key: str, answer: _Answer) -> TLSARecords | ResolverError:
    try:
        return _tlsa(key, answer)
    except ResolverError as exc:
        return exc


def _settled(found: list[TLSARecords | ResolverError | None]) -> list[TLSARecords | ResolverError]:
    settled = [item for item in found if item is not None]
    assert len(settled) == len(found), "every host has an answer"
    return settled


def _tlsa(name: str, answer: _Answer) -> TLSARecords:
    """The TLSA records of an answer; a lookup that failed raises (RFC 7672 §2.1.1: a
    bogus or indeterminate answer is no answer, and never "no TLSA records")."""
    if answer.status is DNSStatus.OK:
        records = tuple(
            TLSARecord(usage=usage, selector=selector, matching_type=mtype, data=data)
            for usage, selector, mtype, data in answer.records
        )
        return TLSARecords(name=name, status=answer.status, records=records, secure=answer.secure)
    if answer.status in (DNSStatus.NXDOMAIN, DNSStatus.NODATA):
        return TLSARecords(name=name, status=answer.status, secure=answer.secure)
    raise _transient(name, answer, "TLSA")


def _domain_key(domain: str) -> str:
    """The cache key and query name: ASCII (IDNA 2008 A-labels), lower case, no final dot."""
    if domain.isascii():
        key = domain.lower()
        if key.endswith("."):
            key = key[:-1]
    else:
        try:
            # UTS #46 mapping first, as browsers and MTAs do for user-typed names.
            key = idna.encode(domain.rstrip(".\u3002"), uts46=True).decode("ascii")
        except idna.IDNAError as exc:
            raise ResolverError(
                f"not a valid domain name: {domain!r}", name=domain, is_transient=False
            ) from exc
    return key


def _is_host_name(key: str) -> bool:
    """Whether ``key`` (lower-case, no final dot) is a name mail may be sent to.

    RFC 1035 §2.3.4: labels of 1 to 63 octets, names of at most 255 (253 as text). Mail
    domains are host names (RFC 5321 §2.3.5): letters, digits and hyphens; we also let
    "_" through, which some operators use in names they look up.
    """
    return (
        bool(key)
        and len(key) <= 253
        and _HOST_CHARS.fullmatch(key) is not None
        and all(0 < len(label) < 64 for label in key.split("."))
    )


def _check_name(key: str, domain: str) -> str:
    """``key`` if it can be asked of the DNS; checked on cache misses only (hits were checked)."""
    if not _is_host_name(key):
        raise ResolverError(f"not a valid domain name: {domain!r}", name=domain, is_transient=False)
    return key


_Y = TypeVar("_Y")
_S = TypeVar("_S")
_R = TypeVar("_R")


def _each_at_once(
    pool: concurrent.futures.Executor, call: Callable[[_Y], _R], items: Sequence[_Y]
) -> list[_R]:
    """``[call(item) for item in items]``, the calls made at the same time in ``pool``
    (:func:`_start_each`)."""
    return [future.result() for future in _start_each(pool, call, items)]


def _start_each(
    pool: concurrent.futures.Executor, call: Callable[[_Y], _R], items: Sequence[_Y]
) -> list[concurrent.futures.Future[_R]]:
    """``call(item)`` for each item, started at the same time in ``pool``: their futures.

    Calls the pool refuses get a plain thread each: concurrent.futures takes no new work
    once the main thread has ended (Python 3.9+), yet the interpreter waits for the other
    non-daemon threads, and a lookup in one of them must still be answered, within its
    timeout, not fail with a RuntimeError. Those threads are daemons: the caller waits for
    them; the interpreter need not (a daemon caller must not hold up the exit).
    """
    futures: list[concurrent.futures.Future[_R]] = []
    try:
        for item in items:
            futures.append(pool.submit(call, item))
    except RuntimeError as exc:
        log.debug("the thread pool refused work (%s): asking in threads of our own", exc)
        for item in items[len(futures) :]:
            future: concurrent.futures.Future[_R] = concurrent.futures.Future()
            threading.Thread(
                target=_settle, args=(future, call, item), name="mailrelay-dns-late", daemon=True
            ).start()
            futures.append(future)
    return futures


def _settle(future: concurrent.futures.Future[_R], call: Callable[[_Y], _R], item: _Y) -> None:
    try:
        future.set_result(call(item))
    except BaseException as exc:
        future.set_exception(exc)


class _Steps(Generic[_Y, _S, _R]):
    """A plan (a generator) as both resolvers drive it: :attr:`request` is what it asks
    now; :meth:`answer` sends it what that gave, until :attr:`done`, with :attr:`result`.

    The resolvers differ only in how they get the answers (blocking or awaited); the
    generator protocol and the bound on the plan's steps live here once.
    """

    def __init__(self, plan: Generator[_Y, _S, _R], max_steps: int) -> None:
        self._plan = plan
        self._left = max_steps
        self.request: _Y = next(plan)
        self.done = False
        self.result: _R

    def answer(self, value: _S) -> None:
        """Send ``value`` to the plan: it asks again (:attr:`request`), or it is done."""
        try:
            self.request = self._plan.send(value)
        except StopIteration as stop:
            self.done = True
            self.result = stop.value
            return
        self._left -= 1
        if self._left <= 0:
            raise AssertionError("a lookup plan took too many steps")


# -- TLSA answers dnspython refuses ----------------------------------------------------------

#: Datagrams read while waiting for one UDP answer (strays with another id, and ones with
#: the query's id that do not answer it); the deadline is the bound that counts.
_MAX_DATAGRAMS: Final = 256
_HEADER: Final = struct.Struct("!HHHHHH")
_RR: Final = struct.Struct("!HHIH")  # TYPE, CLASS, TTL, RDLENGTH (RFC 1035 §4.1.3)
_MAX_NAME: Final = 255  # RFC 1035 §2.3.4: octets of a name on the wire


class _Malformed(dns.exception.FormError):
    """A response this module cannot read (a FormError, as dnspython's own are)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)  # type: ignore[no-untyped-call]


def _read_name(wire: bytes, offset: int) -> tuple[dns.name.Name, int]:
    """The name at ``offset`` and the offset after it (RFC 1035 §4.1.4 compression).

    A pointer refers to a "prior occurrence" of a name: it must point before the start of
    the labels it ends, so each jump lands strictly lower than the last and a pointer loop
    cannot exist; a name stays within 255 octets.
    """
    labels: list[bytes] = []
    size = 0
    start = offset  # where the labels being read began
    end: int | None = None  # the offset after the name where it began
    while True:
        if offset >= len(wire):
            raise _Malformed("name runs past the message")
        length = wire[offset]
        if length >= 0xC0:
            if offset + 1 >= len(wire):
                raise _Malformed("pointer runs past the message")
            target = ((length & 0x3F) << 8) | wire[offset + 1]
            if target >= start:
                raise _Malformed("name pointer does not point before its name")
            if end is None:
                end = offset + 2
            offset = start = target
            continue
        if length > 63:
            raise _Malformed("unknown label type")
        size += length + 1
        if size > _MAX_NAME or offset + 1 + length > len(wire):
            raise _Malformed("name too long or past the message")
        labels.append(wire[offset + 1 : offset + 1 + length])
        offset += 1 + length
        if length == 0:
            return dns.name.Name(labels), offset if end is None else end


def _tlsa_rdata(wire: bytes) -> tuple[list[tuple[dns.name.Name, int, bytes]], int]:
    """The answer section's TLSA records (owner, TTL, RDATA) of a response, and how many
    other records it holds. RDATA is taken as it is: RFC 7671 §4 / RFC 7672 §2.1.1 make a
    record that cannot be used *unusable*, which the DANE matcher decides, not the parser.

    Raises:
        dns.exception.FormError: the message is malformed outside a TLSA record's data
            (header, question, names, lengths), or a TLSA RDATA is shorter than its three
            fixed octets (RFC 6698 §2.1), which no reading can make into a record.
    """
    if len(wire) < _HEADER.size:
        raise _Malformed("message shorter than a DNS header")
    _id, _flags, qdcount, ancount, _ns, _ar = _HEADER.unpack_from(wire)
    offset = _HEADER.size
    for _ in range(qdcount):  # at most 65,535; each consumes at least five octets
        _name, offset = _read_name(wire, offset)
        offset += 4
    records: list[tuple[dns.name.Name, int, bytes]] = []
    others = 0
    for _ in range(ancount):
        owner, offset = _read_name(wire, offset)
        if offset + _RR.size > len(wire):
            raise _Malformed("record header past the message")
        rdtype, rdclass, ttl, rdlength = _RR.unpack_from(wire, offset)
        offset += _RR.size
        if offset + rdlength > len(wire):
            raise _Malformed("RDLENGTH past the message")
        if rdtype == _TLSA and rdclass == dns.rdataclass.IN:
            if rdlength < 3:
                raise _Malformed("TLSA RDATA shorter than three octets")
            records.append((owner, ttl, wire[offset : offset + rdlength]))
        else:
            others += 1
        offset += rdlength
    return records, others


def _lenient_tlsa(wire: bytes) -> dns.message.Message:
    """A response dnspython refused for one of its TLSA records, with every TLSA record
    of its answer section kept as raw RDATA (:class:`dns.rdata.GenericRdata`).

    dnspython reads the rest (``continue_on_error``); should it have dropped anything in
    the answer section but TLSA records (a CNAME of the chain, say), the answer could
    read as "no TLSA records", which would turn DANE off (RFC 7672 §2.2): then the
    response stays refused.

    Raises:
        dns.exception.FormError: the response cannot be read so.
    """
    records, others = _tlsa_rdata(wire)
    try:
        message = dns.message.from_wire(wire, continue_on_error=True)
    except dns.exception.FormError:
        raise
    except (dns.exception.DNSException, ValueError, IndexError, struct.error) as exc:
        raise _Malformed(f"unreadable response: {exc}") from exc
    kept = [rrset for rrset in message.answer if rrset.rdtype != _TLSA]
    if sum(len(rrset) for rrset in kept) != others:
        raise _Malformed("the answer section holds malformed records")
    message.answer = kept
    # find_rrset trusts the message's index alone, which still holds the TLSA RRsets dnspython
    # read without the refused records: they go, else Answer would miss ours (NODATA: no DANE).
    message.index = {key: rrset for key, rrset in message.index.items() if rrset.rdtype != _TLSA}
    for owner, ttl, rdata in records:
        rrset = message.find_rrset(message.answer, owner, dns.rdataclass.IN, _TLSA, create=True)
        rrset.add(dns.rdata.GenericRdata(dns.rdataclass.IN, _TLSA, rdata), ttl)
    return message


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise dns.exception.Timeout
    return left


def _exchange(
    request: dns.message.Message, address: str, port: int, timeout: float, *, tcp: bool
) -> dns.message.Message:
    """The answer to ``request`` from ``address`` (UDP, or TCP with its length prefix,
    RFC 7766 §8), within ``timeout`` seconds.

    Over UDP, datagrams are read until one answers the question (:func:`_take`), as
    dnspython's own exchange does: a datagram with the query's id that does not answer it
    (a forger's, racing the server; damaged bytes) must not fail the lookup when the
    genuine answer comes next. What it was wrong with is raised at the deadline, when
    nothing better came.

    Raises:
        dns.exception.Timeout: no answer in time.
        dns.exception.FormError: the TCP answer, or the last datagram with the query's id,
            was unreadable or answered another question.
        dns.message.Truncated: a UDP answer with TC (dnspython asks again over TCP).
        OSError: the network said no.
    """
    deadline = time.monotonic() + timeout
    family = dns.inet.af_for_address(address)
    wire = request.to_wire()
    try:
        if tcp:
            with socket.create_connection((address, port), timeout=_left(deadline)) as sock:
                sock.settimeout(_left(deadline))
                sock.sendall(struct.pack("!H", len(wire)) + wire)
                (length,) = struct.unpack("!H", _read_exactly(sock, 2, deadline))
                return _read_answer(request, _read_exactly(sock, length, deadline), tcp=True)
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect((address, port))  # connected: the kernel drops other sources
            sock.send(wire)
            error: dns.exception.DNSException | None = None
            for _ in range(_MAX_DATAGRAMS):
                try:
                    sock.settimeout(_left(deadline))
                    datagram = sock.recv(65535)
                except (TimeoutError, dns.exception.Timeout):
                    break
                taken = _take(request, datagram)
                if isinstance(taken, dns.message.Message):
                    return taken
                error = taken if taken is not None else error
            raise error if error is not None else dns.exception.Timeout
    except TimeoutError as exc:
        raise dns.exception.Timeout from exc


def _take(
    request: dns.message.Message, datagram: bytes
) -> dns.message.Message | dns.exception.DNSException | None:
    """What a UDP ``datagram`` is to ``request``: its answer; the error it is when it has
    the query's id but answers nothing asked (unreadable, another question, not a
    response); or ``None``, a stray with another id.

    Raises:
        dns.message.Truncated: it is the answer, with TC set.
    """
    if datagram[:2] != struct.pack("!H", request.id):
        return None
    try:
        return _read_answer(request, datagram, tcp=False)
    except dns.message.Truncated:
        raise
    except dns.exception.DNSException as exc:
        return exc


def _read_exactly(sock: socket.socket, count: int, deadline: float) -> bytes:
    data = b""
    while len(data) < count:  # each pass reads at least one octet or ends
        sock.settimeout(_left(deadline))
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise EOFError("the server closed the connection")
        data += chunk
    return data


class _TLSANameserver(dns.nameserver.Do53Nameserver):
    """A plain-DNS server for TLSA queries whose answers dnspython may refuse: it reads
    them itself (:func:`_lenient_tlsa`) when dnspython cannot. The exchange is ours
    (:func:`_exchange`, :func:`_aexchange`) because dnspython's ignores a UDP answer it
    cannot read and waits out the timeout, the bytes lost. dnspython's resolver still does
    the rest (rcodes, the retry over TCP after TC, lifetimes, CNAMEs)."""

    def query(  # noqa: PLR0917 (dnspython's signature)
        self,
        request: dns.message.QueryMessage,
        timeout: float,
        source: str | None,
        source_port: int,
        max_size: bool,
        one_rr_per_rrset: bool = False,
        ignore_trailing: bool = False,
    ) -> dns.message.Message:
        return _exchange(request, self.address, self.port, timeout, tcp=max_size)

    async def async_query(  # noqa: PLR0917 (dnspython's signature)
        self,
        request: dns.message.QueryMessage,
        timeout: float,
        source: str | None,
        source_port: int,
        max_size: bool,
        backend: Any,
        one_rr_per_rrset: bool = False,
        ignore_trailing: bool = False,
    ) -> dns.message.Message:
        return await _aexchange(request, self.address, self.port, timeout, tcp=max_size)


async def _aexchange(
    request: dns.message.Message, address: str, port: int, timeout: float, *, tcp: bool
) -> dns.message.Message:
    """:func:`_exchange` awaited."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    wire = request.to_wire()
    if tcp:
        try:
            async with asyncio.timeout_at(deadline):
                reader, writer = await asyncio.open_connection(address, port)
                try:
                    writer.write(struct.pack("!H", len(wire)) + wire)
                    await writer.drain()
                    # IncompleteReadError is an EOFError: dnspython drops the server, as
                    # for its own.
                    (length,) = struct.unpack("!H", await reader.readexactly(2))
                    return _read_answer(request, await reader.readexactly(length), tcp=True)
                finally:
                    writer.close()
        except TimeoutError as exc:
            raise dns.exception.Timeout from exc
    with socket.socket(dns.inet.af_for_address(address), socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        try:
            async with asyncio.timeout_at(deadline):
                await loop.sock_connect(sock, (address, port))  # the kernel drops others
                await loop.sock_sendall(sock, wire)
        except TimeoutError as exc:
            raise dns.exception.Timeout from exc
        error: dns.exception.DNSException | None = None
        for _ in range(_MAX_DATAGRAMS):
            try:
                async with asyncio.timeout_at(deadline):
                    datagram = await loop.sock_recv(sock, 65535)
            except TimeoutError:
                break
            taken = _take(request, datagram)
            if isinstance(taken, dns.message.Message):
                return taken
            error = taken if taken is not None else error
    raise error if error is not None else dns.exception.Timeout


def _read_answer(request: dns.message.Message, wire: bytes, *, tcp: bool) -> dns.message.Message:
    """The response in ``wire``: dnspython's reading, or ours when dnspython refuses it.

    Raises:
        dns.message.Truncated: a UDP answer to ``request`` with TC: dnspython asks again
            over TCP (RFC 7766 §5).
        dns.exception.FormError: unreadable, or not the answer to ``request``.
    """
    try:
        response = dns.message.from_wire(wire, raise_on_truncation=not tcp)
    except dns.message.Truncated as exc:
        if not request.is_response(exc.message()):  # type: ignore[no-untyped-call]
            raise _Malformed("a truncated answer to another query") from None
        raise
    except dns.exception.FormError:
        response = _lenient_tlsa(wire)
        if not request.is_response(response):
            raise _Malformed("not the answer to the query") from None
        if response.flags & dns.flags.TC and not tcp:
            raise dns.message.Truncated(message=response) from None  # type: ignore[no-untyped-call]
    if not request.is_response(response):
        raise _Malformed("not the answer to the query")
    return response


def _tlsa_resolver(resolver: dns.resolver.BaseResolver, port: int) -> None:
    """Make ``resolver`` ask through :class:`_TLSANameserver` (plain-DNS servers only)."""
    resolver.nameservers = [
        _TLSANameserver(server, port) if isinstance(server, str) else server
        for server in resolver.nameservers
    ]


# -- the resolvers ---------------------------------------------------------------------------


class _ResolverBase:
    """Configuration, cache access and result delivery shared by both resolvers."""

    def __init__(
        self,
        *,
        nameservers: Sequence[str] | None,
        port: int,
        timeout: float,
        cache_size: int,
        cache: DNSCache | None,
        clock: Callable[[], float] | None,
        rng: random.Random | None,
        failure_ttl: float,
        max_ttl: float,
        max_negative_ttl: float,
        max_in_flight: int,
    ) -> None:
        if timeout <= 0:
            raise ConfigurationError("timeout must be positive")
        if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int):
            raise TypeError(f"max_in_flight must be an int, not {max_in_flight!r}")
        if max_in_flight < 1:
            raise ConfigurationError(f"max_in_flight must be at least 1, not {max_in_flight}")
        self.max_in_flight = max_in_flight
        self.nameservers = tuple(nameservers) if nameservers is not None else None
        self.port = port
        self.timeout = timeout
        self.cache = (
            cache if cache is not None else DNSCache(cache_size, clock=clock or time.monotonic)
        )
        self._random = rng if rng is not None else random.Random()
        self._limits = _Limits(max_ttl, max_negative_ttl, failure_ttl)

    def _configure(self, resolver: dns.resolver.BaseResolver) -> None:
        if self.nameservers is not None:
            resolver.nameservers = list(self.nameservers)
        resolver.port = self.port
        resolver.timeout = self.timeout
        resolver.lifetime = self.timeout
        resolver.cache = None  # ours is in front
        resolver.flags = _QUERY_FLAGS

    def _time_left(self, deadline: float) -> float:
        """What is left of one lookup's ``timeout``, as dnspython's ``lifetime``: it covers
        every CNAME hop we follow ourselves, not each hop anew (a server answering each hop
        late must not stretch a lookup to :data:`_MAX_CNAME_HOPS` timeouts). At 0 dnspython
        raises its lifetime timeout before sending anything."""
        return max(deadline - time.monotonic(), 0.0)

    def cached_mail_hosts(self, domain: str) -> MailHosts | None:
        """What :meth:`mail_hosts` would return from the cache alone, without asking the DNS.

        Returns ``None`` when nothing live is cached for ``domain``. Never waits and never
        queries, so bulk callers can skip scheduling lookups that are already answered.

        Raises:
            ResolverError: when the cache holds a recent transient failure for ``domain``.
        """
        value = self.cache.get((_domain_key(domain), _MAIL_HOSTS))
        return None if value is _MISS else self._deliver(value)

    def _deliver(self, value: object) -> MailHosts:
        if isinstance(value, ResolverError):
            # A fresh copy, so a cached failure does not collect tracebacks across raises.
            raise ResolverError(str(value), name=value.name, is_transient=value.is_transient)
        assert isinstance(value, MailHosts)
        hosts = value.hosts
        if len(hosts) > 1 and any(
            hosts[i].preference == hosts[i + 1].preference for i in range(len(hosts) - 1)
        ):  # sorted by preference, so equal ones are neighbours
            return attrs.evolve(value, hosts=self._shuffled(hosts))
        return value

    def _shuffled(self, hosts: tuple[MailHost, ...]) -> tuple[MailHost, ...]:
        # RFC 5321 §5.1: hosts of equal preference are tried in random order (load spreading).
        ordered: list[MailHost] = []
        start = 0
        while start < len(hosts):
            end = start + 1
            while end < len(hosts) and hosts[end].preference == hosts[start].preference:
                end += 1
            group = list(hosts[start:end])
            self._random.shuffle(group)
            ordered += group
            start = end
        return tuple(ordered)

    @staticmethod
    def _addresses_result(value: object) -> HostAddresses:
        if isinstance(value, ResolverError):
            raise value
        assert isinstance(value, HostAddresses)
        return value


class Resolver(_ResolverBase):
    """A caching DNS resolver for mail, blocking; safe to share between threads.

    Args:
        nameservers: the servers to ask (IP addresses); ``None`` reads the system's
            ``/etc/resolv.conf``.
        port: the servers' port.
        timeout: seconds a single lookup may take in all (every server, retry and CNAME
            hop included).
        cache_size: entries the cache holds, when this resolver makes its own cache.
        cache: a :class:`DNSCache` to share (with an :class:`AsyncResolver`, say).
        clock: the monotonic clock of the cache this resolver makes (tests inject one).
        random: the source of the shuffle of equal-preference exchangers.
        failure_ttl: seconds a transient failure is remembered (0 = not at all).
        max_ttl: upper bound on how long a positive answer is kept.
        max_negative_ttl: upper bound on how long NXDOMAIN/NODATA is kept (RFC 2308 §5).
        max_in_flight: the most queries this resolver has on the wire at the same time,
            whichever threads ask (each holds a socket, a file descriptor, while it waits
            for its answer). Bulk validation and MX delivery to many domains queue their
            queries behind this bound rather than run out of file descriptors (which made
            good addresses ``TEMPFAIL``). A query's ``timeout`` starts when it goes on the
            wire, not while it waits its turn.
    """

    def __init__(
        self,
        nameservers: Sequence[str] | None = None,
        port: int = 53,
        timeout: float = 5.0,
        cache_size: int = DEFAULT_CACHE_SIZE,
        *,
        cache: DNSCache | None = None,
        clock: Callable[[], float] | None = None,
        random: random.Random | None = None,
        failure_ttl: float = DEFAULT_FAILURE_TTL,
        max_ttl: float = DEFAULT_MAX_TTL,
        max_negative_ttl: float = DEFAULT_MAX_NEGATIVE_TTL,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        super().__init__(
            nameservers=nameservers, port=port, timeout=timeout, cache_size=cache_size,
            cache=cache, clock=clock, rng=random, failure_ttl=failure_ttl, max_ttl=max_ttl,
            max_negative_ttl=max_negative_ttl, max_in_flight=max_in_flight,
        )  # fmt: skip
        self._dns = dns.resolver.Resolver(configure=nameservers is None)
        self._configure(self._dns)
        # TLSA queries only: a resolver whose servers read answers dnspython refuses.
        self._tlsa_dns = dns.resolver.Resolver(configure=nameservers is None)
        self._configure(self._tlsa_dns)
        _tlsa_resolver(self._tlsa_dns, port)
        self._lock = threading.Lock()
        self._inflight: dict[Hashable, concurrent.futures.Future[object]] = {}
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._pooled = 0  # queries handed to the kept pool and not answered yet
        # Held by every query on the wire (the threads of every call share it).
        self._slots = threading.BoundedSemaphore(self.max_in_flight)

    def mail_hosts(self, domain: str) -> MailHosts:
        """The exchangers of ``domain`` in the order to try them (RFC 5321 §5.1).

        Raises:
            ResolverError: ``is_transient=True`` when the DNS could not tell (timeout,
                SERVFAIL, REFUSED); ``is_transient=False`` when ``domain`` is not a valid name.
        """
        key = (_domain_key(domain), _MAIL_HOSTS)
        value = self.cache.get(key)
        if value is _MISS:
            name = _check_name(key[0], domain)
            value = self._fetch(
                key, lambda: self._run(_plan_mail_hosts(name, self._limits.failure))
            )
        return self._deliver(value)

    def addresses(self, host: str) -> HostAddresses:
        """The IPv4 and IPv6 addresses of ``host`` (CNAMEs followed).

        Raises:
            ResolverError: ``is_transient=True`` when neither lookup gave an answer to rely on.
        """
        return self._addresses_result(
            self._run(_plan_addresses(_check_name(_domain_key(host), host)))[0]
        )

    def txt(self, name: str) -> tuple[str, ...]:
        """The TXT records of ``name`` (CNAMEs followed; cached for their TTL), each one's
        strings joined and decoded as UTF-8 (an invalid byte becomes U+FFFD); ``()`` when
        the name has none or does not exist.

        Meant for names that hold a policy record or two (MTA-STS, TLS-RPT, DKIM keys),
        not for a domain's whole list of TXT records: at most :data:`MAX_TXT_RECORDS` are
        kept; at ``_mta-sts.*`` and ``_smtp._tls.*`` only those beginning with
        ``v=STSv1`` / ``v=TLSRPTv1`` (RFC 8461 §3.1, RFC 8460 §3: their readers discard
        the others); a record longer than :data:`MAX_TXT_LENGTH` characters comes back
        as its version tag alone (``""`` at other names), so it still counts but is never
        read as a policy.

        Raises:
            ResolverError: ``is_transient=True`` when the DNS could not tell (timeout,
                SERVFAIL, REFUSED); ``is_transient=False`` when ``name`` is not a valid name.
        """
        key = _check_name(_domain_key(name), name)
        return _texts(key, self._lookup(key, _TXT))

    def tlsa(self, host: str, port: int = 25) -> TLSARecords:
        """The TLSA records of the TCP service ``port`` at ``host`` (``_25._tcp.<host>``,
        RFC 6698 §3; CNAMEs followed; cached for their TTL), with whether the answer was
        DNSSEC-validated.

        Raises:
            ResolverError: ``is_transient=True`` when the DNS could not tell (timeout,
                SERVFAIL, which is how a validating resolver reports *bogus* data,
                REFUSED); ``is_transient=False`` when ``host`` is not a valid name.
            ConfigurationError (a ``ValueError``): ``port`` is not a TCP port number.
        """
        key = _check_name(_tlsa_name(_domain_key(host), port), host)
        return _tlsa(key, self._lookup(key, _TLSA))

    def tlsa_many(self, hosts: Sequence[str], port: int = 25) -> list[TLSARecords | ResolverError]:
        """:meth:`tlsa` for several hosts (a domain's exchangers), asked at the same time
        when more than two are not cached, as the exchangers' addresses are: a zone whose
        servers never answer TLSA queries (RFC 7672 §2.1.1 warns of them) costs about one
        timeout, not one per exchanger. One answer per host, in order: its records, or the
        :class:`~mailrelay.errors.ResolverError` its lookup raised.

        Raises:
            ConfigurationError (a ``ValueError``): ``port`` is not a TCP port number.
        """
        found, queries = _tlsa_queries(hosts, port)
        for (index, key), answer in zip(queries, self._lookups(_queries_of(queries)), strict=True):
            found[index] = _tlsa_or_error(key, answer)
        return _settled(found)

    def _run(self, plan: _Plan) -> tuple[object, float]:
        steps = _Steps(plan, _MAX_PLAN_STEPS)
        while not steps.done:
            steps.answer(self._lookups(steps.request))
        return steps.result

    def _lookups(self, batch: list[_Query]) -> list[_Answer]:
        """One plan step's answers. When more than two are not cached (the exchangers' A
        and AAAA), they are asked at the same time, in threads, as :class:`AsyncResolver`
        asks them in tasks: one after another, 16 exchangers that never answer would cost
        33 timeouts instead of about two."""
        found: dict[_Query, _Answer] = {}
        missing = [query for query in batch if self.cache.get(query) is _MISS]
        if len(missing) > 2:
            found.update(zip(missing, self._at_once(missing), strict=True))
        return [found[query] if query in found else self._lookup(*query) for query in batch]

    def _at_once(self, queries: list[_Query]) -> list[_Answer]:
        """Ask ``queries`` at the same time: in the kept pool when it has a thread free for
        each, else in threads of this call's own. Queued behind other calls' queries (other
        threads' domains whose exchangers are slow), a domain's lookups would wait for those
        to be answered or time out first, one pool-full after another."""
        with self._lock:
            shared = self._pooled + len(queries) <= _POOL_SIZE
            if shared:
                self._pooled += len(queries)
        if not shared:
            with concurrent.futures.ThreadPoolExecutor(
                len(queries), thread_name_prefix="mailrelay-dns-extra"
            ) as own:
                return _each_at_once(own, lambda query: self._lookup(*query), queries)
        try:
            return _each_at_once(self._pool(), lambda query: self._lookup(*query), queries)
        finally:
            with self._lock:
                self._pooled -= len(queries)

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        """The threads that ask a domain's exchangers' queries at the same time, made on
        first use and kept (idle threads exit when the resolver is dropped): starting
        threads for every lookup cost more than the queries on a fast network."""
        with self._lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    _POOL_SIZE, thread_name_prefix="mailrelay-dns"
                )
            return self._executor

    def _lookup(self, name: str, rdtype: dns.rdatatype.RdataType) -> _Answer:
        key = (name, rdtype)
        value, left = self.cache.get_with_ttl(key)
        if value is _MISS:
            value, left = self._fetch(key, lambda: self._query(name, rdtype)), math.inf
        return _aged(value, left)

    def _query(self, name: str, rdtype: dns.rdatatype.RdataType) -> tuple[object, float]:
        # A slot first (max_in_flight): its wait is no part of the query's timeout, else a
        # long queue would turn into timeouts, which are TEMPFAIL verdicts. Each holder
        # gives it back within its own timeout, and holds nothing else meanwhile.
        with self._slots:
            return self._query_on_the_wire(name, rdtype)

    def _query_on_the_wire(
        self, name: str, rdtype: dns.rdatatype.RdataType
    ) -> tuple[object, float]:
        log.debug("DNS query %s %s", name, dns.rdatatype.to_text(rdtype))
        steps = _Steps(_plan_query(name, self._limits), _MAX_CNAME_HOPS + 1)
        deadline = time.monotonic() + self.timeout
        while not steps.done:
            outcome: dns.resolver.Answer | dns.exception.DNSException
            try:
                outcome = (self._tlsa_dns if rdtype == _TLSA else self._dns).resolve(
                    steps.request,
                    rdtype,
                    raise_on_no_answer=False,
                    search=False,
                    lifetime=self._time_left(deadline),
                )
            except dns.exception.DNSException as exc:
                outcome = exc
            steps.answer(outcome)
        return steps.result, steps.result.ttl

    def _fetch(self, key: Hashable, compute: Callable[[], tuple[object, float]]) -> object:
        """Compute ``key`` once however many threads ask at the same time.

        The threads waiting for another's lookup share its answer or its error, but not
        its interruption (``KeyboardInterrupt``, ``SystemExit``: the owner's own business,
        which would otherwise surface in threads that were never interrupted): they ask
        again, one of them in its place.
        """
        while True:
            with self._lock:
                # Re-check under the lock: the owner caches before it leaves the table.
                value = self.cache.get(key)
                if value is not _MISS:
                    return value
                future = self._inflight.get(key)
                owner = future is None
                if future is None:
                    future = self._inflight[key] = concurrent.futures.Future()
            if not owner:
                try:
                    return future.result()
                except _Interrupted:
                    continue
            try:
                value, ttl = compute()
                self.cache.put(key, value, ttl)
                future.set_result(value)
                return value
            except Exception as exc:
                future.set_exception(exc)
                raise
            except BaseException:
                future.set_exception(_Interrupted())
                raise
            finally:
                with self._lock:
                    del self._inflight[key]


class _Interrupted(Exception):
    """Internal: the thread computing a shared lookup was interrupted; ask again."""


class AsyncResolver(_ResolverBase):
    """The asyncio twin of :class:`Resolver`: the same arguments, awaited methods.

    Overlapping lookups within one event loop share one query. The cache may be shared with
    blocking resolvers in other threads. ``max_in_flight`` bounds the queries on the wire
    of each event loop the resolver is used from (an asyncio semaphore is one loop's).
    """

    def __init__(
        self,
        nameservers: Sequence[str] | None = None,
        port: int = 53,
        timeout: float = 5.0,
        cache_size: int = DEFAULT_CACHE_SIZE,
        *,
        cache: DNSCache | None = None,
        clock: Callable[[], float] | None = None,
        random: random.Random | None = None,
        failure_ttl: float = DEFAULT_FAILURE_TTL,
        max_ttl: float = DEFAULT_MAX_TTL,
        max_negative_ttl: float = DEFAULT_MAX_NEGATIVE_TTL,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        super().__init__(
            nameservers=nameservers, port=port, timeout=timeout, cache_size=cache_size,
            cache=cache, clock=clock, rng=random, failure_ttl=failure_ttl, max_ttl=max_ttl,
            max_negative_ttl=max_negative_ttl, max_in_flight=max_in_flight,
        )  # fmt: skip
        self._dns = dns.asyncresolver.Resolver(configure=nameservers is None)
        self._configure(self._dns)
        # TLSA queries only: a resolver whose servers read answers dnspython refuses.
        self._tlsa_dns = dns.asyncresolver.Resolver(configure=nameservers is None)
        self._configure(self._tlsa_dns)
        _tlsa_resolver(self._tlsa_dns, port)
        self._inflight: dict[Hashable, asyncio.Task[object]] = {}
        # An asyncio.Semaphore belongs to one event loop: each loop gets its own.
        self._slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore]
        self._slots = weakref.WeakKeyDictionary()
        self._slots_lock = threading.Lock()

    async def mail_hosts(self, domain: str) -> MailHosts:
        """The exchangers of ``domain``, in order; see :meth:`Resolver.mail_hosts`."""
        key = (_domain_key(domain), _MAIL_HOSTS)
        value = self.cache.get(key)
        if value is _MISS:
            name = _check_name(key[0], domain)
            value = await self._fetch(
                key, lambda: self._run(_plan_mail_hosts(name, self._limits.failure))
            )
        return self._deliver(value)

    async def addresses(self, host: str) -> HostAddresses:
        """The addresses of ``host``; see :meth:`Resolver.addresses`."""
        value, _ttl = await self._run(_plan_addresses(_check_name(_domain_key(host), host)))
        return self._addresses_result(value)

    async def txt(self, name: str) -> tuple[str, ...]:
        """The TXT records of ``name``; see :meth:`Resolver.txt`."""
        key = _check_name(_domain_key(name), name)
        return _texts(key, await self._lookup(key, _TXT))

    async def tlsa(self, host: str, port: int = 25) -> TLSARecords:
        """The TLSA records of ``_<port>._tcp.<host>``; see :meth:`Resolver.tlsa`."""
        key = _check_name(_tlsa_name(_domain_key(host), port), host)
        return _tlsa(key, await self._lookup(key, _TLSA))

    async def tlsa_many(
        self, hosts: Sequence[str], port: int = 25
    ) -> list[TLSARecords | ResolverError]:
        """The TLSA records of several hosts, looked up at the same time; see
        :meth:`Resolver.tlsa_many`."""
        found, queries = _tlsa_queries(hosts, port)
        answers = await asyncio.gather(*(self._lookup(n, t) for n, t in _queries_of(queries)))
        for (index, key), answer in zip(queries, answers, strict=True):
            found[index] = _tlsa_or_error(key, answer)
        return _settled(found)

    async def _run(self, plan: _Plan) -> tuple[object, float]:
        steps = _Steps(plan, _MAX_PLAN_STEPS)
        while not steps.done:
            batch = steps.request
            if len(batch) == 1:
                steps.answer([await self._lookup(*batch[0])])
            else:
                steps.answer(list(await asyncio.gather(*(self._lookup(n, t) for n, t in batch))))
        return steps.result

    async def _lookup(self, name: str, rdtype: dns.rdatatype.RdataType) -> _Answer:
        key = (name, rdtype)
        value, left = self.cache.get_with_ttl(key)
        if value is _MISS:
            value, left = await self._fetch(key, lambda: self._query(name, rdtype)), math.inf
        return _aged(value, left)

    async def _query(self, name: str, rdtype: dns.rdatatype.RdataType) -> tuple[object, float]:
        # As Resolver._query: a slot of this loop's max_in_flight first, then the timeout.
        async with self._loop_slots():
            return await self._query_on_the_wire(name, rdtype)

    def _loop_slots(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        with self._slots_lock:  # loops in several threads may share this resolver
            slots = self._slots.get(loop)
            if slots is None:
                slots = self._slots[loop] = asyncio.Semaphore(self.max_in_flight)
            return slots

    async def _query_on_the_wire(
        self, name: str, rdtype: dns.rdatatype.RdataType
    ) -> tuple[object, float]:
        log.debug("DNS query %s %s", name, dns.rdatatype.to_text(rdtype))
        steps = _Steps(_plan_query(name, self._limits), _MAX_CNAME_HOPS + 1)
        deadline = time.monotonic() + self.timeout
        while not steps.done:
            outcome: dns.resolver.Answer | dns.exception.DNSException
            try:
                outcome = await (self._tlsa_dns if rdtype == _TLSA else self._dns).resolve(
                    steps.request,
                    rdtype,
                    raise_on_no_answer=False,
                    search=False,
                    lifetime=self._time_left(deadline),
                )
            except dns.exception.DNSException as exc:
                outcome = exc
            steps.answer(outcome)
        return steps.result, steps.result.ttl

    async def _fetch(
        self, key: Hashable, compute: Callable[[], Awaitable[tuple[object, float]]]
    ) -> object:
        """Compute ``key`` once however many tasks of this loop ask at the same time."""
        loop = asyncio.get_running_loop()
        task = self._inflight.get(key)
        # A done task here was cancelled before it ever ran (so it could not remove
        # itself): someone cancelled every task of the loop. It is no lookup to share.
        if task is None or task.done() or task.get_loop() is not loop:
            task = loop.create_task(self._fill(key, compute))
            self._inflight[key] = task
        # Shielded: one caller's cancellation must not cancel the lookup the others await.
        return await asyncio.shield(task)

    async def _fill(
        self, key: Hashable, compute: Callable[[], Awaitable[tuple[object, float]]]
    ) -> object:
        try:
            value, ttl = await compute()
            self.cache.put(key, value, ttl)
            return value
        finally:
            # pop, not del: a resolver used from several threads' loops may see another
            # loop's task replace or remove the entry in between (that loop's lookup is
            # then merely not shared).
            if self._inflight.get(key) is asyncio.current_task():
                self._inflight.pop(key, None)
