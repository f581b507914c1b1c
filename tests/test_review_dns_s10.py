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
  looked at could take its mail;
- an exchanger's A/AAAA answer of ``0.0.0.0``, ``::``, multicast or broadcast (what DNS
  sinkholes answer for blocked names) made the address ``DELIVERABLE``, and
  ``MXTransport`` connected to it: to the local host, which the domain never named;
- an A/AAAA answer was cached with every address (1,000 of them fit over TCP).

What held, and is kept here as regression tests: truncated answers whose TCP retry never
answers or answers another question; forged datagrams (another id, another question,
unreadable bytes) sent just before the genuine answer of a mail-hosts lookup, and (since
helper-65's fix) of a TLSA lookup.

Rules of this file: timeouts are short (a fraction of a second) and every call sits under
a generous hang guard, never a speed assertion; loops are bounded.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import dns.flags
import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailrelay.errors import MailRelayError, ResolverError
from mailrelay.message import Message
from mailrelay.options import Timeouts
from mailrelay.resolver import MAX_MAIL_HOSTS, AsyncResolver, DNSStatus, MailHosts, Resolver
from mailrelay.results import Outcome
from mailrelay.transport.mx import MXTransport
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
# The lookup timeout of the memory tests below: tracemalloc slows this process (the test
# DNS server's thread included) several times over, more on a loaded machine; a hang guard.
SLOW = 10.0
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
        sync = RecipientValidator(resolver, special_use=SPECIAL_USE, refused_networks=())
        result = guarded(lookups, lambda: sync.validate(address))
    else:
        assert isinstance(resolver, AsyncResolver)
        asyn = AsyncRecipientValidator(resolver, special_use=SPECIAL_USE, refused_networks=())
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


# -- thousands of MX records: memory and the exchangers never looked at ----------------------


def retained(call: Callable[[], object]) -> int:
    """Bytes allocated during ``call()`` that are still alive after it (what the resolver's
    cache keeps; dnspython allocates the strings it keeps, so no file filter)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        call()
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    return sum(stat.size_diff for stat in after.compare_to(before, "filename"))


def test_a_cached_domain_keeps_a_bounded_number_of_mx_records(server: HostileDNS) -> None:
    # A wildcard zone can give every address of a bulk list its own domain with ~1,500 MX
    # records (as many as fit in 64 KiB over TCP). Only the best MAX_MAIL_HOSTS are ever
    # used, so only they may be kept: else 10,000 cached domains hold gigabytes. (Both
    # resolvers turn answers into cache entries with the same code: one is enough here.)
    mode = "sync"
    records = mx_records([(i % 50, f"mx{i}-a-longer-label.many.test.") for i in range(1000)])
    domains = [f"w{j}.test" for j in range(3)]
    for domain in domains:
        server.add(domain, "MX", *records)
    for i in range(1000):
        server.add(f"mx{i}-a-longer-label.many.test", "A", f"192.0.2.{i % 250 + 1}")
    # The server parses each domain's records once, on its first answer: not under tracing.
    warm = make_resolver(server, mode, timeout=SLOW)
    for domain in domains:
        guarded(1 + 2 * MAX_MAIL_HOSTS, functools.partial(warm.mail_hosts, domain), SLOW)
    resolver = make_resolver(server, mode, timeout=SLOW)
    # The first lookup also caches the exchangers' answers, which every domain here
    # shares: they are not what is measured.
    first = guarded(1 + 2 * MAX_MAIL_HOSTS, lambda: resolver.mail_hosts(domains[0]), SLOW)
    assert isinstance(first, MailHosts)
    assert len(first.hosts) == MAX_MAIL_HOSTS

    def look_up_the_rest() -> None:
        for domain in domains[1:]:
            found = guarded(2, functools.partial(resolver.mail_hosts, domain), timeout=SLOW)
            assert isinstance(found, MailHosts)
            assert len(found.hosts) == MAX_MAIL_HOSTS

    per_domain = retained(look_up_the_rest) / (len(domains) - 1)
    # About 40 KiB are kept (16 exchangers); the 1,000 records took about 175 KiB.
    assert per_domain < 64 * 1024, f"{per_domain / 1024:.0f} KiB kept per domain"


def dangling_beyond_the_cut(server: HostileDNS, domain: str, count: int) -> None:
    """``count`` preferred exchangers that exist without addresses (NODATA), then one
    backup exchanger with an address."""
    preferred = [(10, f"a{i:02}.{domain}.") for i in range(count)]
    server.add(domain, "MX", *mx_records([*preferred, (20, f"backup.{domain}.")]))
    for i in range(count):
        server.add(f"a{i:02}.{domain}", "TXT", '"no address here"')
    server.add(f"backup.{domain}", "A", "192.0.2.9")


@pytest.mark.parametrize("mode", MODES)
def test_exchangers_never_looked_up_keep_the_verdict_open(server: HostileDNS, mode: str) -> None:
    # The best MAX_MAIL_HOSTS exchangers dangle; a backup the resolver does not look at
    # (each costs two queries) has an address, so the domain does take mail. Not having
    # looked is no ground for "undeliverable" or a bounce: the verdict stays open.
    dangling_beyond_the_cut(server, "t.test", MAX_MAIL_HOSTS)
    lookups = 1 + 2 * MAX_MAIL_HOSTS
    result = validate(server, mode, "user@t.test", lookups=lookups)
    assert (result.verdict, result.reason) == (Judgement.UNKNOWN, Reason.TEMPFAIL), result
    assert "not looked up" in result.detail
    planned = route(server, mode, "t.test", lookups=lookups)
    assert isinstance(planned, Verdict)
    assert planned.outcome is Outcome.TRANSIENT


@pytest.mark.parametrize("mode", MODES)
def test_when_every_exchanger_was_looked_up_dangling_is_a_fact(
    server: HostileDNS, mode: str
) -> None:
    # The control: MAX_MAIL_HOSTS exchangers in all, every one looked up, none with an
    # address (the backup is the last of them and dangles too).
    dangling_beyond_the_cut(server, "u.test", MAX_MAIL_HOSTS - 1)
    server.add("backup.u.test", "TXT", '"no address either"')
    del server.records["backup.u.test", "A"]
    lookups = 1 + 2 * MAX_MAIL_HOSTS
    result = validate(server, mode, "user@u.test", lookups=lookups)
    assert (result.verdict, result.reason) == (Judgement.UNDELIVERABLE, Reason.NO_MAIL_HOST)
    planned = route(server, mode, "u.test", lookups=lookups)
    assert isinstance(planned, Verdict)
    assert planned.outcome is Outcome.PERMANENT


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    exchangers=st.lists(
        st.tuples(st.integers(0, 3), st.booleans()),  # (preference, has an address)
        min_size=1,
        max_size=MAX_MAIL_HOSTS + 4,
    ),
    mode=st.sampled_from(MODES),
)
def test_undeliverable_only_when_every_exchanger_was_seen_to_dangle(
    server: HostileDNS, exchangers: list[tuple[int, bool]], mode: str
) -> None:
    server.reset()
    server.add(
        "p.test",
        "MX",
        *mx_records([(pref, f"x{i:02}.p.test.") for i, (pref, _) in enumerate(exchangers)]),
    )
    for i, (_, has_address) in enumerate(exchangers):
        if has_address:
            server.add(f"x{i:02}.p.test", "A", f"192.0.2.{i + 1}")
        else:
            server.add(f"x{i:02}.p.test", "TXT", '"exists, without an address"')
    result = validate(server, mode, "user@p.test", lookups=1 + 2 * MAX_MAIL_HOSTS)
    looked_up = sorted((pref, i) for i, (pref, _) in enumerate(exchangers))[:MAX_MAIL_HOSTS]
    if any(exchangers[i][1] for _, i in looked_up):
        assert result.reason is Reason.OK
    elif any(has_address for _, has_address in exchangers):
        # The DNS names an exchanger with an address: never "undeliverable".
        assert (result.verdict, result.reason) == (Judgement.UNKNOWN, Reason.TEMPFAIL)
    else:
        expected = Reason.NO_MAIL_HOST if len(exchangers) <= MAX_MAIL_HOSTS else Reason.TEMPFAIL
        assert result.reason is expected


# -- addresses that are no destination: 0.0.0.0, ::, multicast, broadcast ----------------------


class Listener:
    """A TCP listener on 127.0.0.1 that counts the connections it gets and refuses each
    with a 554 greeting: where mail ends up when it is sent to "this host"."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(8)
        self._sock.settimeout(0.05)
        self.port: int = self._sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> Listener:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()
        assert not self._thread.is_alive()

    def _serve(self) -> None:
        for _ in range(2000):  # 0.05 s each: at most 100 s, ended by __exit__ long before
            if self._stop.is_set():
                return
            try:
                conn, _peer = self._sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            with conn:
                conn.sendall(b"554 5.7.1 this host is nobody's mail exchanger\r\n")


#: Addresses a name can resolve to that no connection may go to: "this host" (RFC 1122
#: §3.2.1.3, 0.0.0.0/8; Linux connects 0.0.0.0 to the local host), multicast (RFC 5771,
#: RFC 4291 §2.7), the limited broadcast, and the IPv6 unspecified address.
NO_DESTINATION = [
    ("A", "0.0.0.0"),
    ("A", "0.1.2.3"),
    ("A", "224.0.0.1"),
    ("A", "239.255.255.250"),
    ("A", "255.255.255.255"),
    ("AAAA", "::"),
    ("AAAA", "ff02::1"),
    ("AAAA", "::ffff:0.0.0.0"),
    ("AAAA", "::ffff:224.0.0.1"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("rdtype", "address"), NO_DESTINATION)
def test_an_exchanger_at_no_destination_address_is_no_mail_host(
    server: HostileDNS, mode: str, rdtype: str, address: str
) -> None:
    # A filtering resolver (a sinkhole: Pi-hole, many corporate DNS filters) answers
    # 0.0.0.0 or :: for names it blocks. That answer names no mail host: it must not make
    # the address DELIVERABLE, nor send mail to this host, nor bounce it.
    server.add("s.test", "MX", "10 mx.s.test.")
    server.add("mx.s.test", rdtype, address)
    result = validate(server, mode, "user@s.test")
    assert (result.verdict, result.reason) == (Judgement.UNKNOWN, Reason.TEMPFAIL), result
    planned = route(server, mode, "s.test")
    assert isinstance(planned, Verdict), planned
    assert planned.outcome is Outcome.TRANSIENT
    # The same for an implicit MX (the domain's own address).
    server.add("i.test", rdtype, address)
    result = validate(server, mode, "user@i.test")
    assert (result.verdict, result.reason) == (Judgement.UNKNOWN, Reason.TEMPFAIL), result


@pytest.mark.parametrize("mode", MODES)
def test_no_destination_addresses_are_skipped_next_to_good_ones(
    server: HostileDNS, mode: str
) -> None:
    server.add("m.test", "MX", "10 mx.m.test.")
    server.add("mx.m.test", "A", "0.0.0.0", "192.0.2.5", "224.0.0.1")
    server.add("mx.m.test", "AAAA", "::", "2001:db8::5")
    result = validate(server, mode, "user@m.test")
    assert result.reason is Reason.OK
    assert result.mail_hosts is not None
    [host] = result.mail_hosts.hosts
    assert (host.ipv4, host.ipv6) == (("192.0.2.5",), ("2001:db8::5",))
    planned = route(server, mode, "m.test")
    assert planned == [
        Target(name="mx.m.test", address="192.0.2.5", port=25),
        Target(name="mx.m.test", address="2001:db8::5", port=25),
    ]


def test_mail_never_goes_to_this_host_for_an_exchanger_at_0_0_0_0(server: HostileDNS) -> None:
    server.add("z.test", "MX", "10 mx.z.test.")
    server.add("mx.z.test", "A", "0.0.0.0")
    message = Message.build(
        sender="me@sender.test", to=["user@z.test"], subject="hi", text="hello\n"
    )
    resolver = make_resolver(server, "sync")
    assert isinstance(resolver, Resolver)
    with Listener() as listener:
        transport = MXTransport(
            resolver, port=listener.port, timeouts=Timeouts.all(2), refused_networks=()
        )
        with transport:
            result = guarded(3, lambda: transport.send(message))
    assert listener.connections == 0, "the message went to the local host"
    [recipient] = result.recipients
    assert recipient.outcome is Outcome.TRANSIENT, recipient


def test_a_cached_exchanger_keeps_a_bounded_number_of_addresses(server: HostileDNS) -> None:
    # As with MX records: an exchanger's A RRset of ~1,000 addresses (it fits over TCP),
    # for every domain of a bulk list, must not be kept whole: MX delivery tries at most a
    # handful of addresses per domain (max_addresses, 10 by default).
    mode = "sync"
    domains = [f"v{j}.test" for j in range(3)]
    for domain in domains:
        server.add(domain, "MX", *mx_records([(10, f"mx{k}.{domain}.") for k in range(4)]))
        for k in range(4):
            server.add(
                f"mx{k}.{domain}", "A", *(f"192.0.{i // 250}.{i % 250 + 1}" for i in range(1000))
            )
    warm = make_resolver(server, mode, timeout=SLOW)  # the server parses each RRset once
    for domain in domains:
        guarded(9, functools.partial(warm.mail_hosts, domain), SLOW)
    resolver = make_resolver(server, mode, timeout=SLOW)
    guarded(9, functools.partial(resolver.mail_hosts, domains[0]), SLOW)

    def look_up_the_rest() -> None:
        for domain in domains[1:]:
            found = guarded(9, functools.partial(resolver.mail_hosts, domain), timeout=SLOW)
            assert isinstance(found, MailHosts)
            assert len(found.hosts) == 4
            assert all(host.ipv4 for host in found.hosts)

    per_domain = retained(look_up_the_rest) / (len(domains) - 1)
    # 4 exchangers of 1,000 addresses took about 300 KiB; of 32 each, about 15 KiB.
    assert per_domain < 64 * 1024, f"{per_domain / 1024:.0f} KiB kept per domain"


# -- what held up: truncation whose TCP answer never comes or is another -------------------


class SilentOverTCP(HostileDNS):
    """Answers over UDP as :class:`HostileDNS` does; over TCP it accepts the connection and
    the query, then never answers (a :attr:`Fault.TRUNCATE` name: TC=1, then nothing)."""

    def respond(self, wire: bytes, *, tcp: bool) -> bytes | None:
        answer = super().respond(wire, tcp=tcp)
        return None if tcp else answer


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["t.test", "mx1.t.test"])
def test_truncated_answers_whose_tcp_answer_never_comes_end_in_time(mode: str, name: str) -> None:
    with SilentOverTCP() as server:
        simple_zone(server, "t.test")
        server.fault(name, "*", Fault.TRUNCATE)
        if name != "t.test":
            server.fault("mx2.t.test", "*", Fault.TRUNCATE)
        result = validate(server, mode, "user@t.test", lookups=3)
        assert (result.verdict, result.reason) == (Judgement.UNKNOWN, Reason.TEMPFAIL)
        assert any(query.tcp for query in server.queries)
    assert not server.errors


@pytest.mark.parametrize("mode", MODES)
def test_a_tcp_retry_answering_another_question_is_not_believed(
    server: HostileDNS, mode: str
) -> None:
    # TC over UDP, then over TCP an answer about another name carrying the records of the
    # name asked (Fault.OTHER_NAME), sent for every query over TCP.
    simple_zone(server)
    server.add("d.test", "MX", *mx_records([(10, "mx1.d.test.")]))
    server.fault("d.test", "MX", Fault.MANGLE)
    server.mangle_over_tcp = True

    def other_question(wire: bytes) -> bytes:
        message = dns.message.from_wire(wire)
        message.question = [
            dns.rrset.RRset(dns.name.from_text("evil.test."), dns.rdataclass.IN, dns.rdatatype.MX)
        ]
        for rrset in message.answer:
            rrset.name = dns.name.from_text("evil.test.")
        return message.to_wire()

    server.mangle = other_question
    found = outcome(server, mode, "d.test", lookups=2)
    assert isinstance(found, ResolverError), found
    assert found.is_transient


# -- a forged datagram racing the genuine answer ---------------------------------------------


def forged_first(decoy: Callable[[bytes], bytes]) -> type[HostileDNS]:
    """A :class:`HostileDNS` that sends, before each genuine UDP answer, ``decoy`` of it
    (what an off-path forger racing the server sends)."""

    class Forged(HostileDNS):
        def _send_udp(self, wire: bytes, peer: tuple[str, int]) -> None:
            answer = self.respond(wire, tcp=False)
            if answer is not None:
                self._udp.sendto(decoy(answer), peer)
                self._udp.sendto(answer, peer)

    return Forged


def other_id(wire: bytes) -> bytes:
    """The answer under another query id."""
    return bytes([wire[0] ^ 0x5A]) + wire[1:]


def other_question(wire: bytes) -> bytes:
    """The query's id, but a question (and records) about another name."""
    message = dns.message.from_wire(wire)
    evil = dns.name.from_text("evil.test.")
    message.question = [dns.rrset.RRset(evil, dns.rdataclass.IN, message.question[0].rdtype)]
    for rrset in message.answer:
        rrset.name = evil
    return message.to_wire()


def unreadable(wire: bytes) -> bytes:
    """The query's id, then bytes that are no DNS message."""
    return wire[:2] + b"\x81\x80 not a DNS message"


TLSA_OWNER = "_25._tcp.mx1.f.test"
TLSA_RDATA = "3 1 1 " + "ab" * 32


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("decoy", "what"),
    [
        (other_id, "mail hosts"),
        (other_question, "mail hosts"),
        (unreadable, "mail hosts"),
        (other_id, "tlsa"),
        # Held since the TLSA exchange (resolver._exchange) reads on until its deadline,
        # as dnspython's does (tests/test_resolver_limits_s10.py has more forgeries).
        (other_question, "tlsa"),
        (unreadable, "tlsa"),
    ],
)
def test_a_forged_datagram_before_the_answer_does_not_spoil_the_lookup(
    mode: str, decoy: Callable[[bytes], bytes], what: str
) -> None:
    with forged_first(decoy)() as server:
        simple_zone(server, "f.test")
        server.add(TLSA_OWNER, "TLSA", TLSA_RDATA)
        resolver = make_resolver(server, mode)
        if what == "mail hosts":
            found = guarded(3, functools.partial(resolver.mail_hosts, "f.test"))
            assert isinstance(found, MailHosts)
            assert [host.ipv4 for host in found.hosts] == [("192.0.2.1",), ("192.0.2.2",)]
        else:
            records = guarded(1, functools.partial(resolver.tlsa, "mx1.f.test"))
            assert [str(record) for record in records.records] == [TLSA_RDATA]
    assert not server.errors
