"""Limits of the resolver and the validator under load and against a hostile name server.

The server is :class:`tests.peers.hostile_dns.HostileDNS` (in process, on loopback). What
this file holds, each test written first and seen failing on the code before its fix:

- bulk validation opened a socket per query with nothing bounding how many at once: 32
  domains at a time, each with up to 16 exchangers' A and AAAA queries in flight, about
  1,000 sockets, so a process under a common ``ulimit -n`` of 1,024 (or less) ran out of
  file descriptors and good addresses came back ``TEMPFAIL``. A resolver now has at most
  ``max_in_flight`` queries on the wire (counted at the server; and run under a low
  ``RLIMIT_NOFILE`` in a child process);
- the TLSA queries' own UDP exchange took the first datagram with the query's id: a forged
  one (another question, unreadable bytes) failed the lookup although the genuine answer
  came right after; it now reads on until the deadline, as dnspython's exchange does;
- a TXT answer was cached whole: a zone answering ~64 KiB of TXT records at the
  ``_mta-sts`` or ``_smtp._tls`` name of every domain of a list filled the cache with
  them. A few records are kept, of the kind asked for, each of a bounded length;
- ``validate_many`` had no bound on its run time but the per-domain one times the
  domains over the concurrency; ``timeout=`` now bounds the whole call, the domains not
  looked up by then being ``TEMPFAIL`` (never a hard verdict).

Rules of this file: timeouts are short and every call sits under a generous hang guard,
never a speed assertion; loops are bounded; the network is loopback only.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import json
import math
import subprocess
import sys
import textwrap
import time
import tracemalloc
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from mailrelay.errors import PolicyError, ResolverError
from mailrelay.mailhosts import TLSARecords
from mailrelay.resolver import MAX_TXT_LENGTH, MAX_TXT_RECORDS, AsyncResolver, Resolver
from mailrelay.transport.mtasts import STSRecord
from mailrelay.transport.tlsrpt import TLSRPTRecord
from mailrelay.validate import (
    DEFAULT_SPECIAL_USE,
    AsyncRecipientValidator,
    Reason,
    RecipientValidator,
    Validation,
)
from mailrelay.validate import Verdict as Judgement
from tests.peers import hostile_dns
from tests.peers.hostile_dns import Fault, HostileDNS, mx_records

T = TypeVar("T")

#: Added to every hang guard: start-up, a busy machine, the garbage collector.
MARGIN = 10.0
MODES = ["sync", "async"]
SPECIAL_USE = DEFAULT_SPECIAL_USE - {"test"}


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one coroutine to completion (no pytest plugin)."""
    return asyncio.run(coro)


def guarded(bound: float, call: Callable[[], Any]) -> Any:
    """``call()`` (run to completion when it gives a coroutine), failing if it took longer
    than ``bound`` seconds: a hang guard, not a speed measurement."""
    start = time.monotonic()
    try:
        result = call()
        if asyncio.iscoroutine(result):
            result = run(result)
    finally:
        elapsed = time.monotonic() - start
        assert elapsed < bound, f"took {elapsed:.1f} s, bound {bound:.1f}"
    return result


@pytest.fixture(scope="module")
def dns_server() -> Iterator[HostileDNS]:
    with HostileDNS() as server:
        yield server
    assert not server.errors


@pytest.fixture
def server(dns_server: HostileDNS) -> HostileDNS:
    dns_server.reset()
    return dns_server


def validate_many(
    server: HostileDNS, mode: str, addresses: list[str], bound: float, **kwargs: Any
) -> list[Validation]:
    """``validate_many(addresses)`` through a fresh resolver of ``mode`` built with
    ``kwargs``, under a hang guard of ``bound`` seconds."""
    kwargs.setdefault("timeout", 2.0)
    if mode == "sync":
        sync = RecipientValidator(
            Resolver(["127.0.0.1"], port=server.port, **kwargs),
            special_use=SPECIAL_USE,
            refused_networks=(),
        )
        results = guarded(bound, lambda: sync.validate_many(addresses))
    else:
        asyn = AsyncRecipientValidator(
            AsyncResolver(["127.0.0.1"], port=server.port, **kwargs),
            special_use=SPECIAL_USE,
            refused_networks=(),
        )
        results = guarded(bound, lambda: asyn.validate_many(addresses))
    assert isinstance(results, list)
    return results


# -- queries in flight ---------------------------------------------------------------------


def bulk_zone(server: HostileDNS, domains: int, exchangers: int) -> dict[str, Reason]:
    """``domains`` domains, most with ``exchangers`` exchangers (an A record each), some
    without a name (NXDOMAIN), some with a null MX; every answer comes late (SLOW). The
    expected reason of an address at each domain."""
    expected: dict[str, Reason] = {}
    for d in range(domains):
        domain = f"b{d}.test"
        if d % 8 == 3:
            expected[domain] = Reason.NO_SUCH_DOMAIN
        elif d % 8 == 5:
            server.add(domain, "MX", "0 .")
            expected[domain] = Reason.NULL_MX
        else:
            hosts = [(10 + k, f"mx{k}.{domain}.") for k in range(exchangers)]
            server.add(domain, "MX", *mx_records(hosts))
            for k in range(exchangers):
                server.add(f"mx{k}.{domain}", "A", f"192.0.2.{k + 1}")
                server.fault(f"mx{k}.{domain}", "*", Fault.SLOW)
            expected[domain] = Reason.OK
        server.fault(domain, "*", Fault.SLOW)
    return expected


def check_verdicts(results: list[Validation], expected: dict[str, Reason], hosts: int) -> None:
    """Every result is the one the zone calls for (a TEMPFAIL shows its detail)."""
    assert [(r.input, r.reason) for r in results] == [
        (f"user@{domain}", reason) for domain, reason in expected.items()
    ], [r.detail for r in results if r.reason is Reason.TEMPFAIL][:3]
    for result in results:
        if result.reason is Reason.OK:
            assert result.mail_hosts is not None
            assert len(result.mail_hosts.hosts) == hosts


@pytest.mark.parametrize("mode", MODES)
def test_bulk_validation_keeps_at_most_max_in_flight_queries_on_the_wire(
    server: HostileDNS, mode: str
) -> None:
    # 24 domains at once (concurrency 32), each with 6 exchangers: 12 queries a domain at
    # the same time, 288 in all, each answered 50 ms late. The server counts the queries
    # waiting for their answer at the same time.
    server.delay = 0.05
    expected = bulk_zone(server, domains=24, exchangers=6)
    cap = 16
    addresses = [f"user@{domain}" for domain in expected]
    results = validate_many(server, mode, addresses, 60.0, max_in_flight=cap)
    check_verdicts(results, expected, hosts=6)
    assert 1 < server.most_waiting <= cap


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cap", [0, -1])
def test_max_in_flight_must_be_positive(mode: str, cap: int) -> None:
    kind = Resolver if mode == "sync" else AsyncResolver
    with pytest.raises(ValueError, match="max_in_flight"):
        kind(["127.0.0.1"], max_in_flight=cap)


#: The child: bulk validation under a low limit of open files, the resolver's default cap.
CHILD = textwrap.dedent(
    """
    import json, resource, sys
    from mailrelay.resolver import Resolver
    from mailrelay.validate import DEFAULT_SPECIAL_USE, RecipientValidator

    port, limit, domains = (int(arg) for arg in sys.argv[1:4])
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    resolver = Resolver(["127.0.0.1"], port=port, timeout=5.0)
    validator = RecipientValidator(
        resolver, special_use=DEFAULT_SPECIAL_USE - {"test"}, refused_networks=()
    )
    results = validator.validate_many([f"user@b{d}.test" for d in range(domains)])
    print(json.dumps([[r.input, r.reason.value, r.detail] for r in results]))
    """
)


def test_bulk_validation_under_a_low_open_file_limit_gives_no_spurious_tempfail(
    server: HostileDNS,
) -> None:
    # 32 domains at once, 8 exchangers each: 512 queries at the same time without a cap,
    # more than the 160 files the child may open; the resolver's default cap (64) fits.
    server.delay = 0.05
    expected = bulk_zone(server, domains=32, exchangers=8)
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(server.port), "160", str(len(expected))],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    found = json.loads(child.stdout)
    assert [(text, Reason(reason)) for text, reason, _detail in found] == [
        (f"user@{domain}", reason) for domain, reason in expected.items()
    ], [row for row in found if row[1] == "tempfail"][:3]


# -- a forged datagram before the genuine TLSA answer ------------------------------------------


def forged_first(decoys: Callable[[bytes], list[bytes]]) -> type[HostileDNS]:
    """A :class:`HostileDNS` that sends, before each genuine UDP answer, the datagrams
    ``decoys`` makes of it (what an off-path forger racing the server sends)."""

    class Forged(HostileDNS):
        def _send_udp(self, wire: bytes, peer: tuple[str, int]) -> None:
            answer = self.respond(wire, tcp=False)
            if answer is not None:
                for decoy in decoys(answer):
                    self._udp.sendto(decoy, peer)
                self._udp.sendto(answer, peer)

    return Forged


def other_question(wire: bytes) -> bytes:
    """The query's id, but a question (and records) about another name."""
    message = dns.message.from_wire(wire)
    evil = dns.name.from_text("evil.test.")
    message.question = [dns.rrset.RRset(evil, dns.rdataclass.IN, message.question[0].rdtype)]
    for rrset in message.answer:
        rrset.name = evil
    return message.to_wire()


def other_type(wire: bytes) -> bytes:
    """The query's id and name, but another type asked (and an A record answered)."""
    message = dns.message.from_wire(wire)
    name = message.question[0].name
    message.question = [dns.rrset.RRset(name, dns.rdataclass.IN, dns.rdatatype.A)]
    message.answer = [dns.rrset.from_text(name, 60, "IN", "A", "192.0.2.66")]
    return message.to_wire()


def unreadable(wire: bytes) -> bytes:
    """The query's id, then bytes that are no DNS message."""
    return wire[:2] + b"\x81\x80 not a DNS message"


def truncated_other(wire: bytes) -> bytes:
    """The query's id, TC set, a question about another name."""
    forged = other_question(wire)
    return forged[:2] + bytes((forged[2] | 0x02,)) + forged[3:]


def not_a_response(wire: bytes) -> bytes:
    """The answer with QR clear: a query, not a response."""
    return wire[:2] + bytes((wire[2] & 0x7F,)) + wire[3:]


TLSA_OWNER = "_25._tcp.mx1.f.test"
TLSA_RDATA = "3 1 1 " + "ab" * 32


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "decoys",
    [
        lambda wire: [other_question(wire)],
        lambda wire: [other_type(wire)],
        lambda wire: [unreadable(wire)],
        lambda wire: [not_a_response(wire)],
        lambda wire: [truncated_other(wire)],
        lambda wire: [unreadable(wire), other_question(wire), unreadable(wire)],
    ],
    ids=["other-question", "other-type", "unreadable", "not-a-response", "tc-other", "three"],
)
def test_a_forged_datagram_before_the_tlsa_answer_does_not_spoil_the_lookup(
    mode: str, decoys: Callable[[bytes], list[bytes]]
) -> None:
    # The TLSA queries' own exchange took the first datagram with the query's id: a forged
    # one failed the lookup (transiently: DANE then defers the mail) although the genuine
    # answer came right after. dnspython's own exchange reads on; so must ours.
    with forged_first(decoys)() as server:
        server.add(TLSA_OWNER, "TLSA", TLSA_RDATA)
        if mode == "sync":
            resolver = Resolver(["127.0.0.1"], port=server.port, timeout=2.0)
            found = guarded(MARGIN, lambda: resolver.tlsa("mx1.f.test"))
        else:
            aresolver = AsyncResolver(["127.0.0.1"], port=server.port, timeout=2.0)
            found = guarded(MARGIN, lambda: aresolver.tlsa("mx1.f.test"))
        assert isinstance(found, TLSARecords)
        assert [str(record) for record in found.records] == [TLSA_RDATA]
        assert not any(query.tcp for query in server.queries)
    assert not server.errors


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("decoy", [other_question, unreadable])
def test_a_forged_datagram_alone_is_still_a_transient_failure(
    mode: str, decoy: Callable[[bytes], bytes]
) -> None:
    # Nothing but the forged datagram comes: at the deadline, the lookup fails (the error
    # the datagram was, as before), never "no TLSA records" (which would turn DANE off).

    class OnlyForged(HostileDNS):
        def _send_udp(self, wire: bytes, peer: tuple[str, int]) -> None:
            answer = self.respond(wire, tcp=False)
            if answer is not None:
                self._udp.sendto(decoy(answer), peer)

    with OnlyForged() as server:
        server.add(TLSA_OWNER, "TLSA", TLSA_RDATA)
        kind = Resolver if mode == "sync" else AsyncResolver
        resolver = kind(["127.0.0.1"], port=server.port, timeout=0.3)
        with pytest.raises(ResolverError) as caught:
            guarded(MARGIN, lambda: resolver.tlsa("mx1.f.test"))
    assert caught.value.is_transient
    assert "(error)" in str(caught.value)
    assert not server.errors


# -- TXT answers in the cache ------------------------------------------------------------------


def retained(call: Callable[[], object]) -> int:
    """Bytes allocated during ``call()`` that are still alive after it (what the resolver's
    cache keeps; dnspython allocates the strings it keeps), but for the in-process
    server's (its UDP thread sits in ``recvfrom(65535)`` with a 64 KiB buffer)."""
    server_side = [tracemalloc.Filter(False, hostile_dns.__file__)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot().filter_traces(server_side)
        call()
        gc.collect()
        after = tracemalloc.take_snapshot().filter_traces(server_side)
    finally:
        tracemalloc.stop()
    return sum(stat.size_diff for stat in after.compare_to(before, "filename"))


def txt_strings(text: str) -> str:
    """TXT rdata text for ``text``: strings of at most 255 octets (RFC 1035 §3.3.14)."""
    return " ".join(f'"{text[i : i + 255]}"' for i in range(0, len(text), 255))


#: What a hostile zone puts beside the one record a policy name should hold.
JUNK = [txt_strings(f"junk-{i}=" + "x" * 290) for i in range(190)]


def test_a_cached_txt_answer_keeps_only_a_few_short_records_that_look_asked_for(
    server: HostileDNS,
) -> None:
    # Nearly 64 KiB of TXT records (over TCP) at every policy name of a list of domains:
    # MTA-STS and TLS-RPT read only the records that begin with their version tag (RFC
    # 8461 §3.1, RFC 8460 §3) and need exactly one, so a few of those are all that is kept.
    names = [f"_mta-sts.t{j}.test" for j in range(3)] + [f"_smtp._tls.t{j}.test" for j in range(3)]
    for name in names:
        tag = "v=STSv1; id=abc123" if name.startswith("_mta") else "v=TLSRPTv1; rua=mailto:r@t.test"
        server.add(name, "TXT", *JUNK[:95], f'"{tag}"', *JUNK[95:])
    warm = Resolver(["127.0.0.1"], port=server.port, timeout=2.0)
    for name in names:  # the server parses each RRset once, not under tracing
        guarded(MARGIN, functools.partial(warm.txt, name))
    resolver = Resolver(["127.0.0.1"], port=server.port, timeout=2.0)
    found: list[tuple[str, ...]] = []

    def look_up() -> None:
        for name in names:
            found.append(guarded(MARGIN, functools.partial(resolver.txt, name)))

    per_name = retained(look_up) / len(names)
    assert found == [("v=STSv1; id=abc123",)] * 3 + [("v=TLSRPTv1; rua=mailto:r@t.test",)] * 3
    # All ~190 records took about 120 KiB a name; the one kept, well under 1 KiB.
    assert per_name < 8 * 1024, f"{per_name / 1024:.0f} KiB kept per name"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("name", "records", "expected"),
    [
        # Several records of the kind asked for stay several (RFC 8461 §3.1: then none is
        # the policy); a few are kept, enough to tell one from many.
        ("_mta-sts.two.test", ["v=STSv1; id=a1", "v=STSv1; id=b2"], 2),
        ("_mta-sts.many.test", [f"v=STSv1; id=n{i}" for i in range(40)], MAX_TXT_RECORDS),
        (
            "_smtp._tls.many.test",
            [f"v=TLSRPTv1; rua=mailto:{i}@t.test" for i in range(40)],
            MAX_TXT_RECORDS,
        ),
        # Other names have no version tag: a few records of any kind.
        ("sel._domainkey.d.test", [f"v=DKIM1; p=key{i}" for i in range(40)], MAX_TXT_RECORDS),
        ("d.test", ["v=spf1 -all", "verification=1"], 2),
    ],
)
def test_a_txt_answer_keeps_a_few_records(
    server: HostileDNS, mode: str, name: str, records: list[str], expected: int
) -> None:
    server.add(name, "TXT", *(f'"{text}"' for text in records))
    kind = Resolver if mode == "sync" else AsyncResolver
    resolver = kind(["127.0.0.1"], port=server.port, timeout=2.0)
    found = guarded(MARGIN, functools.partial(resolver.txt, name))
    assert len(found) == expected
    assert set(found) <= set(records)


LONG_STS = "v=STSv1; id=abc123; " + "ext=" + "y" * 5000
LONG_TLSRPT = "v=TLSRPTv1; rua=mailto:" + ",mailto:".join(f"r{i}@t.test" for i in range(600))


@pytest.mark.parametrize("mode", MODES)
def test_an_overlong_txt_record_still_counts_and_is_never_read_as_a_policy(
    server: HostileDNS, mode: str
) -> None:
    # A record longer than MAX_TXT_LENGTH is kept as its version tag alone: cut anywhere
    # else it could parse (a TLS-RPT address cut in the middle names another mailbox), and
    # dropped it would make two records look like one.
    server.add("_mta-sts.long.test", "TXT", txt_strings(LONG_STS))
    server.add("_mta-sts.long2.test", "TXT", '"v=STSv1; id=good1"', txt_strings(LONG_STS))
    server.add("_smtp._tls.long.test", "TXT", txt_strings(LONG_TLSRPT))
    server.add("other.long.test", "TXT", txt_strings("z" * 5000), '"short"')
    kind = Resolver if mode == "sync" else AsyncResolver
    resolver = kind(["127.0.0.1"], port=server.port, timeout=2.0)

    def txt(name: str) -> tuple[str, ...]:
        found = guarded(MARGIN, functools.partial(resolver.txt, name))
        assert isinstance(found, tuple)
        return found

    assert txt("_mta-sts.long.test") == ("v=STSv1",)
    with pytest.raises(PolicyError):
        STSRecord.select(txt("_mta-sts.long.test"))
    assert sorted(txt("_mta-sts.long2.test")) == ["v=STSv1", "v=STSv1; id=good1"]
    with pytest.raises(PolicyError):
        STSRecord.select(txt("_mta-sts.long2.test"))  # two records: no policy
    assert txt("_smtp._tls.long.test") == ("v=TLSRPTv1",)
    assert TLSRPTRecord.select(txt("_smtp._tls.long.test")) is None
    assert sorted(txt("other.long.test")) == ["", "short"]
    assert len(LONG_TLSRPT) > MAX_TXT_LENGTH
    assert len(LONG_STS) > MAX_TXT_LENGTH


# -- an overall timeout for bulk validation ----------------------------------------------------


def bulk(mode: str, port: int, addresses: list[str], timeout: float | None) -> Any:
    """``validate_many(addresses, timeout=timeout)``: the call (a coroutine for async)."""
    if mode == "sync":
        sync = RecipientValidator(
            Resolver(["127.0.0.1"], port=port), special_use=SPECIAL_USE, refused_networks=()
        )
        return lambda: sync.validate_many(addresses, timeout=timeout)
    asyn = AsyncRecipientValidator(
        AsyncResolver(["127.0.0.1"], port=port), special_use=SPECIAL_USE, refused_networks=()
    )
    return lambda: asyn.validate_many(addresses, timeout=timeout)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("fast", "slow"), [(4, 4), (0, 1), (3, 40)])
def test_domains_unfinished_at_the_bulk_timeout_are_tempfail(
    mode: str, fast: int, slow: int
) -> None:
    # The slow domains' answers come after 4 s (the resolver waits 5 s for them); the bulk
    # call gives up on them after 1 s: TEMPFAIL, never a hard verdict, and the answers it
    # has are kept. Its own server: the slow lookups may outlive the call.
    with HostileDNS() as server:
        server.delay = 4.0
        for d in range(fast):
            server.add(f"fast{d}.test", "MX", f"10 mx.fast{d}.test.")
            server.add(f"mx.fast{d}.test", "A", "192.0.2.1")
        for d in range(slow):
            server.add(f"slow{d}.test", "MX", f"10 mx.slow{d}.test.")
            server.add(f"mx.slow{d}.test", "A", "192.0.2.2")
            server.fault(f"slow{d}.test", "*", Fault.SLOW)
        addresses = [f"user@fast{d}.test" for d in range(fast)]
        addresses += [f"user@slow{d}.test" for d in range(slow)]
        addresses.append("not an address")
        results = guarded(3.5, bulk(mode, server.port, addresses, 1.0))
    assert [r.input for r in results] == addresses
    assert [r.reason for r in results] == (
        [Reason.OK] * fast + [Reason.TEMPFAIL] * slow + [Reason.BAD_SYNTAX]
    )
    for result in results[fast : fast + slow]:
        assert result.verdict is Judgement.UNKNOWN
        assert result.mail_hosts is None
        assert "timeout (1 s) passed" in result.detail, result.detail
    assert not server.errors


@pytest.mark.parametrize("mode", MODES)
def test_a_bulk_timeout_that_is_not_reached_changes_nothing(server: HostileDNS, mode: str) -> None:
    expected = bulk_zone(server, domains=8, exchangers=2)
    server.faults.clear()  # no slow answers
    addresses = [f"user@{domain}" for domain in expected]
    results = guarded(MARGIN, bulk(mode, server.port, addresses, 30.0))
    check_verdicts(results, expected, hosts=2)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("timeout", [0.0, -1.0, math.nan])
def test_the_bulk_timeout_must_be_positive(mode: str, timeout: float) -> None:
    with pytest.raises(ValueError, match="timeout"):
        guarded(MARGIN, bulk(mode, 9, ["user@b0.test"], timeout))
