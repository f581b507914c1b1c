"""Adversarial review of the DNS-facing code against a hostile or broken name server.

The server is :class:`tests.peers.hostile_dns.HostileDNS` (in process, on loopback, UDP and
TCP, answers built with dnspython); :mod:`tests.test_dns_hostile` already covers silence,
error codes, truncation, wrong ids, garbage, CNAME loops and the like. This file holds what
the review found beyond that, each test written first and seen failing on the code before
its fix:

- a *referral* (NOERROR, no answer, NS records and no SOA in the authority section: the
  answer of a server that does not recurse, RFC 2308 §2.2) was read as NODATA, so a
  deliverable address became ``UNDELIVERABLE``/``NO_MAIL_HOST`` and MX delivery bounced it;
- an MX answer was cached with every record, so a zone publishing thousands of MX records
  (a wildcard, a fresh name per address) made each cached domain hold hundreds of KiB;
- when more exchangers were published than the resolver looks up
  (:data:`~mailrelay.resolver.MAX_MAIL_HOSTS`) and none of those looked up had an address,
  the domain was ``NO_MAIL_HOST`` (a hard verdict, a bounce) although an exchanger never
  looked at could take its mail.

Rules of this file: timeouts are short (a fraction of a second) and every call sits under
a generous hang guard, never a speed assertion; loops are bounded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import dns.flags
import dns.message
import dns.rrset
import pytest

from mailrelay.errors import MailRelayError
from mailrelay.resolver import AsyncResolver, DNSStatus, MailHosts, Resolver
from mailrelay.results import Outcome
from mailrelay.transport.mx_async import amail_hosts_of
from mailrelay.transport.mx_plan import MXPolicy, Target, Verdict, mail_hosts_of, plan
from mailrelay.validate import (
    DEFAULT_SPECIAL_USE,
    AsyncRecipientValidator,
    Reason,
    RecipientValidator,
    Validation,
)
from mailrelay.validate import Verdict as Judgement
from tests.peers.hostile_dns import Fault, HostileDNS, mx_records

T = TypeVar("T")

#: Seconds one lookup may take.
TIMEOUT = 0.3
#: Added to every hang guard: start-up, a busy machine, the garbage collector.
MARGIN = 5.0
MODES = ["sync", "async"]
SPECIAL_USE = DEFAULT_SPECIAL_USE - {"test"}


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one coroutine to completion (no pytest plugin)."""
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def dns_server() -> Iterator[HostileDNS]:
    with HostileDNS() as server:
        yield server
    assert not server.errors


@pytest.fixture
def server(dns_server: HostileDNS) -> HostileDNS:
    dns_server.reset()
    return dns_server


def make_resolver(server: HostileDNS, mode: str, **kwargs: Any) -> Resolver | AsyncResolver:
    kwargs.setdefault("timeout", TIMEOUT)
    if mode == "sync":
        return Resolver(["127.0.0.1"], port=server.port, **kwargs)
    return AsyncResolver(["127.0.0.1"], port=server.port, **kwargs)


def guarded(lookups: int, call: Callable[[], Any], timeout: float = TIMEOUT) -> Any:
    """``call()`` (run to completion when it gives a coroutine), failing if it took longer
    than ``lookups`` timeouts plus :data:`MARGIN`: a hang guard, not a speed measurement."""
    start = time.monotonic()
    try:
        result = call()
        if asyncio.iscoroutine(result):
            result = run(result)
    finally:
        elapsed = time.monotonic() - start
        bound = lookups * (timeout + 0.1) + MARGIN
        assert elapsed < bound, f"took {elapsed:.1f} s, bound {bound:.1f}"
    return result


def outcome(server: HostileDNS, mode: str, domain: str, *, lookups: int = 3) -> object:
    """The resolver's MailHosts for ``domain``, or the typed error it raised."""
    resolver = make_resolver(server, mode)
    try:
        return guarded(lookups, lambda: resolver.mail_hosts(domain))
    except MailRelayError as exc:
        return exc


def validate(server: HostileDNS, mode: str, address: str, *, lookups: int = 3) -> Validation:
    resolver = make_resolver(server, mode)
    if mode == "sync":
        assert isinstance(resolver, Resolver)
        sync = RecipientValidator(resolver, special_use=SPECIAL_USE)
        result = guarded(lookups, lambda: sync.validate(address))
    else:
        assert isinstance(resolver, AsyncResolver)
        asyn = AsyncRecipientValidator(resolver, special_use=SPECIAL_USE)
        result = guarded(lookups, lambda: asyn.validate(address))
    assert isinstance(result, Validation)
    return result


def route(
    server: HostileDNS, mode: str, domain: str, *, lookups: int = 3
) -> list[Target] | Verdict:
    """The MX transport's plan for ``domain`` (no connection is made)."""
    resolver = make_resolver(server, mode)
    if mode == "sync":
        assert isinstance(resolver, Resolver)
        found = guarded(lookups, lambda: mail_hosts_of(resolver, domain))
    else:
        assert isinstance(resolver, AsyncResolver)
        found = guarded(lookups, lambda: amail_hosts_of(resolver, domain))
    return plan(domain, found, MXPolicy(), port=25, max_addresses=10)


# -- a referral is no answer -------------------------------------------------------------------


def referral(wire: bytes) -> bytes:
    """The zone's answer turned into a referral: no answer records, not authoritative, the
    zone's NS records in the authority section and no SOA (RFC 2308 §2.2), what a server
    that does not recurse (or a broken forwarder) sends to a recursive query."""
    message = dns.message.from_wire(wire)
    message.answer = []
    message.additional = []
    message.authority = [dns.rrset.from_text("test.", 3600, "IN", "NS", "ns1.test.")]
    message.flags &= ~(dns.flags.AA | dns.flags.RA)
    return message.to_wire()


def upward_referral(wire: bytes) -> bytes:
    """A referral to the root, as old BIND versions answered what they were not
    authoritative for."""
    message = dns.message.from_wire(wire)
    message.answer = []
    message.authority = [dns.rrset.from_text(".", 518400, "IN", "NS", "a.root-servers.net.")]
    message.flags &= ~(dns.flags.AA | dns.flags.RA)
    return message.to_wire()


def simple_zone(server: HostileDNS, domain: str = "d.test") -> None:
    """``domain`` with two exchangers, each with an IPv4 address."""
    server.add(domain, "MX", *mx_records([(10, f"mx1.{domain}."), (20, f"mx2.{domain}.")]))
    server.add(f"mx1.{domain}", "A", "192.0.2.1")
    server.add(f"mx2.{domain}", "A", "192.0.2.2")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mangle", [referral, upward_referral])
@pytest.mark.parametrize(
    ("name", "rdtype"),
    [
        ("d.test", "*"),  # the domain's MX, then its A and AAAA (implicit MX)
        ("mx1.d.test", "*"),  # the exchangers' A and AAAA
    ],
)
def test_a_referral_is_a_transient_failure_not_nodata(
    server: HostileDNS,
    mode: str,
    mangle: Callable[[bytes], bytes],
    name: str,
    rdtype: str,
) -> None:
    simple_zone(server)
    server.fault(name, rdtype, Fault.MANGLE)
    if name != "d.test":
        server.fault("mx2.d.test", rdtype, Fault.MANGLE)
    server.mangle = mangle
    result = validate(server, mode, "user@d.test", lookups=5)
    assert (result.verdict, result.reason) == (Judgement.UNKNOWN, Reason.TEMPFAIL), result
    if name == "d.test":
        assert "referral" in result.detail
    else:
        assert result.mail_hosts is not None
        assert {host.status for host in result.mail_hosts.hosts} == {DNSStatus.ERROR}
    planned = route(server, mode, "d.test", lookups=5)
    assert isinstance(planned, Verdict)
    assert planned.outcome is Outcome.TRANSIENT


@pytest.mark.parametrize("mode", MODES)
def test_nodata_with_the_zone_s_ns_and_soa_is_still_nodata(server: HostileDNS, mode: str) -> None:
    # RFC 2308 §2.2.1 NODATA type 1: SOA *and* NS in the authority section is no referral.
    def nodata_with_ns(wire: bytes) -> bytes:
        message = dns.message.from_wire(wire)
        message.answer = []
        message.authority = [
            dns.rrset.from_text(
                "test.", 60, "IN", "SOA", "ns.test. admin.test. 1 3600 600 86400 30"
            ),
            dns.rrset.from_text("test.", 3600, "IN", "NS", "ns1.test."),
        ]
        return message.to_wire()

    server.add("nomail.test", "TXT", '"exists"')
    server.fault("nomail.test", "*", Fault.MANGLE)
    server.mangle = nodata_with_ns
    found = outcome(server, mode, "nomail.test")
    assert isinstance(found, MailHosts)
    assert found.status is DNSStatus.NODATA
    result = validate(server, mode, "user@nomail.test")
    assert (result.verdict, result.reason) == (Judgement.UNDELIVERABLE, Reason.NO_MAIL_HOST)
