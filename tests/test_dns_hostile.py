"""The DNS layer against a hostile or broken name server (tests/peers/hostile_dns.py).

The friendly unbound zone (tests/test_resolver.py) shows what the resolver makes of good
answers; here the server stays silent, answers with error codes, truncates, lies about the
query id or the name, sends garbage, hangs up half-way, publishes thousands of MX records,
odd null MX variants, MX targets that look like IP addresses, CNAME loops, extreme TTLs and
names at the length limit. What must hold whatever it does:

- only typed errors (:class:`~mailrelay.errors.MailRelayError`) or values come out;
- DNS trouble is ``UNKNOWN``/``TEMPFAIL`` for the validator and ``TRANSIENT`` for the MX
  plan, never ``UNDELIVERABLE``/``PERMANENT``;
- every call ends within a bound derived from the configured timeout (a hang guard with a
  generous margin, not a speed measurement);
- the mail hosts kept are bounded (:data:`mailrelay.resolver.MAX_MAIL_HOSTS`);
- RFC 7505: a null MX is only the sole record ``MX 0 .``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Iterable, Iterator
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailrelay.errors import MailRelayError, ResolverError
from mailrelay.resolver import (
    MAX_MAIL_HOSTS,
    AsyncResolver,
    DNSStatus,
    MailHosts,
    Resolver,
)
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

#: Seconds one lookup may take (dnspython's lifetime): short, the server is on loopback.
TIMEOUT = 0.2
#: Added to every hang guard: start-up, a busy machine, the garbage collector.
MARGIN = 5.0
#: dnspython pauses this long before it gives up on a server that never answered, even
#: when the lifetime is spent (its first retry backoff), so a silent lookup costs this more.
DNSPYTHON_BACKOFF = 0.1
MODES = ["sync", "async"]
SPECIAL_USE = DEFAULT_SPECIAL_USE - {"test"}

#: Faults after which the resolver learnt nothing: a transient failure.
TRANSIENT: frozenset[Fault] = frozenset(
    {
        Fault.SILENCE,
        Fault.SERVFAIL,
        Fault.REFUSED,
        Fault.FORMERR,
        Fault.NOTIMP,
        Fault.YXDOMAIN,
        Fault.GARBAGE,
        Fault.WRONG_ID,
        Fault.OTHER_NAME,
        Fault.TCP_CLOSE,
    }
)


def in_order(faults: Iterable[Fault]) -> list[Fault]:
    """``faults`` in a fixed order (test ids and Hypothesis draws must not vary by run)."""
    return sorted(faults, key=lambda fault: fault.value)


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


def sync_resolver(server: HostileDNS, **kwargs: Any) -> Resolver:
    kwargs.setdefault("timeout", TIMEOUT)
    return Resolver(["127.0.0.1"], port=server.port, **kwargs)


def async_resolver(server: HostileDNS, **kwargs: Any) -> AsyncResolver:
    kwargs.setdefault("timeout", TIMEOUT)
    return AsyncResolver(["127.0.0.1"], port=server.port, **kwargs)


def make_resolver(server: HostileDNS, mode: str, **kwargs: Any) -> Resolver | AsyncResolver:
    return (sync_resolver if mode == "sync" else async_resolver)(server, **kwargs)


def budget(lookups: int, timeout: float = TIMEOUT) -> float:
    """The most seconds ``lookups`` lookups may take one after another (no margin)."""
    return lookups * (timeout + DNSPYTHON_BACKOFF)


def guarded(seconds: float, call: Any) -> Any:
    """``call()`` (awaited when it is a coroutine), failing if it took longer than ``seconds``.

    A hang guard: the bound is the configured timeouts times the queries the call may make,
    plus :data:`MARGIN`; no test relies on how fast it is.
    """
    start = time.monotonic()
    try:
        result = call()
        if asyncio.iscoroutine(result):
            result = run(result)
    finally:
        elapsed = time.monotonic() - start
        assert elapsed < seconds + MARGIN, f"took {elapsed:.1f} s, bound {seconds + MARGIN:.1f}"
    return result


def mail_hosts(server: HostileDNS, mode: str, domain: str, *, lookups: int = 3) -> MailHosts:
    resolver = make_resolver(server, mode)
    found = guarded(budget(lookups), lambda: resolver.mail_hosts(domain))
    assert isinstance(found, MailHosts)
    return found


def outcome(server: HostileDNS, mode: str, domain: str, *, lookups: int = 3) -> object:
    """The resolver's MailHosts, or the typed error it raised (anything else fails)."""
    try:
        return mail_hosts(server, mode, domain, lookups=lookups)
    except MailRelayError as exc:
        return exc


def validate(
    server: HostileDNS, mode: str, address: str, *, lookups: int = 3, timeout: float = TIMEOUT
) -> Validation:
    """Validate ``address`` against the server (the validator lets only ResolverError pass
    into a verdict, so any other exception from the DNS layer fails the test)."""
    seconds = budget(lookups, timeout)
    if mode == "sync":
        sync = RecipientValidator(
            sync_resolver(server, timeout=timeout), special_use=SPECIAL_USE, refused_networks=()
        )
        result = guarded(seconds, lambda: sync.validate(address))
    else:
        asyn = AsyncRecipientValidator(
            async_resolver(server, timeout=timeout), special_use=SPECIAL_USE, refused_networks=()
        )
        result = guarded(seconds, lambda: asyn.validate(address))
    assert isinstance(result, Validation)
    return result


def route(
    server: HostileDNS, mode: str, domain: str, *, lookups: int = 3
) -> list[Target] | Verdict:
    """The MX transport's plan for ``domain`` (no connection is made)."""
    if mode == "sync":
        sync = sync_resolver(server)
        found = guarded(budget(lookups), lambda: mail_hosts_of(sync, domain))
    else:
        asyn = async_resolver(server)
        found = guarded(budget(lookups), lambda: amail_hosts_of(asyn, domain))
    return plan(domain, found, MXPolicy(), port=25, max_addresses=10)


def simple_zone(server: HostileDNS, domain: str = "d.test") -> None:
    """``domain`` with two exchangers, each with an IPv4 address and no IPv6."""
    server.add(domain, "MX", *mx_records([(10, f"mx1.{domain}."), (20, f"mx2.{domain}.")]))
    server.add(f"mx1.{domain}", "A", "192.0.2.1")
    server.add(f"mx2.{domain}", "A", "192.0.2.2")


# -- the domain's own MX query misbehaves ------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        (Fault.SILENCE, DNSStatus.TIMEOUT),
        (Fault.SERVFAIL, DNSStatus.SERVFAIL),
        (Fault.REFUSED, DNSStatus.REFUSED),
        (Fault.FORMERR, DNSStatus.ERROR),
        (Fault.NOTIMP, DNSStatus.ERROR),
        (Fault.YXDOMAIN, DNSStatus.ERROR),
        (Fault.GARBAGE, DNSStatus.TIMEOUT),  # dnspython drops what does not parse, waits on
        (Fault.WRONG_ID, DNSStatus.TIMEOUT),  # ... and what answers another query
        (Fault.OTHER_NAME, DNSStatus.TIMEOUT),  # ... or another question
        (Fault.TCP_CLOSE, DNSStatus.ERROR),
    ],
)
def test_a_failed_mx_query_is_a_transient_error(
    server: HostileDNS, mode: str, fault: Fault, expected: DNSStatus
) -> None:
    simple_zone(server)
    server.fault("d.test", "MX", fault)
    found = outcome(server, mode, "d.test", lookups=1)
    assert isinstance(found, ResolverError)
    assert found.is_transient
    assert f"({expected.value})" in str(found)
    result = validate(server, mode, "user@d.test", lookups=1)
    assert (result.verdict, result.reason) == (Judgement.UNKNOWN, Reason.TEMPFAIL)
    planned = route(server, mode, "d.test", lookups=1)
    assert isinstance(planned, Verdict)
    assert planned.outcome is Outcome.TRANSIENT


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fault", [Fault.TRUNCATE, Fault.SLOW, None])
def test_answers_that_arrive_are_used(server: HostileDNS, mode: str, fault: Fault | None) -> None:
    simple_zone(server)
    if fault is not None:
        server.fault("d.test", "MX", fault)
    found = mail_hosts(server, mode, "d.test", lookups=5)
    assert [(h.name, h.preference, h.ipv4) for h in found.hosts] == [
        ("mx1.d.test", 10, ("192.0.2.1",)),
        ("mx2.d.test", 20, ("192.0.2.2",)),
    ]
    if fault is Fault.TRUNCATE:  # RFC 7766: after TC the question is asked again over TCP
        assert [q.tcp for q in server.queries if q.rdtype == "MX"] == [False, True]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("faults", "reason"),
    [
        ({"MX": Fault.NXDOMAIN}, Reason.NO_SUCH_DOMAIN),
        ({"MX": Fault.NODATA, "A": Fault.NODATA, "AAAA": Fault.NODATA}, Reason.NO_MAIL_HOST),
        ({"MX": Fault.NODATA, "A": Fault.SILENCE, "AAAA": Fault.NODATA}, Reason.TEMPFAIL),
        ({"MX": Fault.NODATA, "A": Fault.NODATA, "AAAA": Fault.SERVFAIL}, Reason.TEMPFAIL),
    ],
)
def test_negative_answers_are_facts_and_failures_are_not(
    server: HostileDNS, mode: str, faults: dict[str, Fault], reason: Reason
) -> None:
    simple_zone(server)
    for rdtype, fault in faults.items():
        server.fault("d.test", rdtype, fault)
    assert validate(server, mode, "user@d.test").reason is reason


# -- the exchangers' address queries misbehave -------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fault", in_order(TRANSIENT))
def test_failed_exchanger_lookups_are_tempfail_never_undeliverable(
    server: HostileDNS, mode: str, fault: Fault
) -> None:
    simple_zone(server)
    for name in ("mx1.d.test", "mx2.d.test"):
        server.fault(name, "A", fault)
    result = validate(server, mode, "user@d.test", lookups=5)
    assert (result.verdict, result.reason) == (Judgement.UNKNOWN, Reason.TEMPFAIL)
    assert result.mail_hosts is not None
    assert all(host.status.is_transient for host in result.mail_hosts.hosts)
    planned = route(server, mode, "d.test", lookups=5)
    assert isinstance(planned, Verdict)
    assert planned.outcome is Outcome.TRANSIENT


@pytest.mark.parametrize("mode", MODES)
def test_one_failed_exchanger_does_not_hide_a_good_one(server: HostileDNS, mode: str) -> None:
    simple_zone(server)
    server.fault("mx1.d.test", "*", Fault.SERVFAIL)
    result = validate(server, mode, "user@d.test", lookups=5)
    assert result.reason is Reason.OK
    planned = route(server, mode, "d.test", lookups=5)
    assert planned == [Target(name="mx2.d.test", address="192.0.2.2", port=25)]


# -- many records, odd records ---------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_thousands_of_mx_records_are_cut_to_the_best_few(server: HostileDNS, mode: str) -> None:
    # 2,000 MX records do not fit in UDP: TC, then TCP. Each kept exchanger costs two
    # queries (A and AAAA), so keeping them all would send 4,000 queries for one domain.
    count = 2000
    server.add(
        "many.test", "MX", *mx_records([(i % 50, f"mx{i}.many.test.") for i in range(count)])
    )
    for i in range(count):
        server.add(f"mx{i}.many.test", "A", f"192.0.2.{i % 250 + 1}")
    resolver = make_resolver(server, mode, timeout=2.0)  # 2,000 records take a while to parse
    found = guarded(budget(1 + 2 * MAX_MAIL_HOSTS, 2.0), lambda: resolver.mail_hosts("many.test"))
    assert isinstance(found, MailHosts)
    assert 0 < len(found.hosts) <= MAX_MAIL_HOSTS
    # The best preferences are the ones kept (RFC 5321 §5.1: lowest first).
    assert max(h.preference for h in found.hosts) <= min(
        i % 50 for i in range(count) if f"mx{i}.many.test" not in {h.name for h in found.hosts}
    )
    assert server.count() <= 2 + 2 * MAX_MAIL_HOSTS


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("records", "null_mx", "hosts", "reason"),
    [
        # RFC 7505 §3: the null MX is the domain's one MX record, preference 0, target ".".
        ([(0, ".")], True, [], Reason.NULL_MX),
        # A "." among real exchangers is a misconfiguration: it is skipped.
        ([(0, "."), (10, "mx1.d.test.")], False, ["mx1.d.test"], Reason.OK),
        ([(5, "."), (10, "mx1.d.test.")], False, ["mx1.d.test"], Reason.OK),
        # "." at another preference is no null MX: MX records naming no usable exchanger.
        ([(10, ".")], False, [], Reason.NO_MAIL_HOST),
        ([(0, "."), (10, ".")], False, [], Reason.NO_MAIL_HOST),
    ],
)
def test_null_mx_is_only_the_sole_mx_0_dot(  # noqa: PLR0917 -- one argument per table column
    server: HostileDNS,
    mode: str,
    records: list[tuple[int, str]],
    null_mx: bool,
    hosts: list[str],
    reason: Reason,
) -> None:
    simple_zone(server)
    server.add("d.test", "MX", *mx_records(records))
    server.add("d.test", "A", "192.0.2.99")  # never an implicit MX: the domain has MX records
    found = mail_hosts(server, mode, "d.test")
    assert (found.null_mx, [h.name for h in found.hosts], found.implicit) == (null_mx, hosts, False)
    result = validate(server, mode, "user@d.test")
    assert result.reason is reason
    planned = route(server, mode, "d.test")
    if reason is Reason.OK:
        assert isinstance(planned, list)
    else:
        assert isinstance(planned, Verdict)
        assert planned.outcome is Outcome.PERMANENT
        assert ("null MX" in planned.reason) is null_mx
        assert ("name no exchanger" in planned.reason) is (not null_mx)
        assert ("name no exchanger" in result.detail) is (not null_mx)


@pytest.mark.parametrize("mode", MODES)
def test_an_mx_target_that_looks_like_an_ip_address_is_a_name(
    server: HostileDNS, mode: str
) -> None:
    # RFC 5321 §5.1: the MX target is a domain name; "192.0.2.7" is looked up, not dialled.
    server.add("d.test", "MX", "10 192.0.2.7.")
    found = mail_hosts(server, mode, "d.test")
    (host,) = found.hosts
    assert (host.name, host.addresses, host.status) == ("192.0.2.7", (), DNSStatus.NXDOMAIN)
    assert validate(server, mode, "user@d.test").reason is Reason.NO_MAIL_HOST
    planned = route(server, mode, "d.test")
    assert isinstance(planned, Verdict)
    assert planned.outcome is Outcome.PERMANENT


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("targets", "hosts"),
    [
        # Not host names: skipped (as Postfix skips them), so nothing is looked up for them
        # and no such name becomes a TLS server name.
        (["*.d.test.", "mx\\032x.d.test.", "mx\\040x.d.test."], []),
        (["*.d.test.", "mx1.d.test."], ["mx1.d.test"]),
        (["mx\\@x.d.test.", "mx_1.d.test."], ["mx_1.d.test"]),
    ],
)
def test_mx_targets_that_are_not_host_names_are_skipped(
    server: HostileDNS, mode: str, targets: list[str], hosts: list[str]
) -> None:
    simple_zone(server)
    server.add("d.test", "MX", *mx_records([(10, target) for target in targets]))
    for target in targets:
        server.add(target, "A", "127.0.0.1")
    found = mail_hosts(server, mode, "d.test")
    assert ([h.name for h in found.hosts], found.null_mx, found.implicit) == (hosts, False, False)
    result = validate(server, mode, "user@d.test")
    assert result.reason is (Reason.OK if hosts else Reason.NO_MAIL_HOST)


# -- CNAMEs, TTLs, long names ------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chase", [True, False])
def test_cname_chains_are_followed(server: HostileDNS, mode: str, chase: bool) -> None:
    server.chase_cnames = chase
    server.add("d.test", "CNAME", "alias1.test.")
    server.add("alias1.test", "CNAME", "alias2.test.")
    server.add("alias2.test", "MX", "10 mxalias.test.")
    server.add("mxalias.test", "CNAME", "mx.real.test.")
    server.add("mx.real.test", "A", "192.0.2.5")
    found = mail_hosts(server, mode, "d.test", lookups=9)
    assert [(h.name, h.ipv4) for h in found.hosts] == [("mxalias.test", ("192.0.2.5",))]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chase", [True, False])
@pytest.mark.parametrize("where", ["domain", "exchanger"])
def test_cname_loops_are_transient_failures(
    server: HostileDNS, mode: str, chase: bool, where: str
) -> None:
    server.chase_cnames = chase
    if where == "exchanger":
        server.add("d.test", "MX", "10 mx.d.test.")
    looped = "d.test" if where == "domain" else "mx.d.test"
    server.add(looped, "CNAME", "loop.test.")
    server.add("loop.test", "CNAME", f"{looped}.")
    # Each CNAME hop we follow ourselves is a lookup of its own.
    result = validate(server, mode, "user@d.test", lookups=3 * 9)
    assert (result.verdict, result.reason) == (Judgement.UNKNOWN, Reason.TEMPFAIL)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("ttl", "kept"), [(0, 0.0), (2**31 - 1, 3600.0), (4_000_000_000, 0.0)])
def test_ttls_are_bounded(server: HostileDNS, mode: str, ttl: int, kept: float) -> None:
    # TTL 0: not cached; huge TTLs stop at max_ttl; RFC 2181 §8: a TTL with its top bit
    # set counts as 0 (dnspython reads it so), so it is not cached either.
    server.add("d.test", "MX", "10 mx.d.test.", ttl=ttl)
    server.add("mx.d.test", "A", "192.0.2.1", ttl=ttl)
    server.add("mx.d.test", "AAAA", "2001:db8::1", ttl=ttl)
    clock = FakeClock()
    resolver = make_resolver(server, mode, clock=clock, max_ttl=3600.0)

    def ask() -> MailHosts:
        found = guarded(budget(3), lambda: resolver.mail_hosts("d.test"))
        assert isinstance(found, MailHosts)
        return found

    assert ask().hosts[0].addresses == ("192.0.2.1", "2001:db8::1")
    sent = server.count()
    clock.now += kept - 1 if kept else 0
    ask()
    assert server.count() == (sent if kept else 2 * sent)
    clock.now += 2
    ask()
    assert server.count() == (2 * sent if kept else 3 * sent)


@pytest.mark.parametrize("mode", MODES)
def test_names_at_the_length_limit(server: HostileDNS, mode: str) -> None:
    # RFC 1035 §2.3.4: labels of 63 octets, names of 255 octets (253 characters as text);
    # RFC 5321 §4.5.3.1.3: a path of 256 octets, so the address's domain has 252 here.
    label = "a" * 63
    domain = f"{label}.{label}.{label}.{'b' * 55}.test"
    target = f"{'c' * 63}.{'d' * 63}.{'e' * 63}.{'f' * 56}.test"
    assert (len(domain), len(target)) == (252, 253)
    server.add(domain, "MX", f"10 {target}.")
    server.add(target, "A", "192.0.2.9")
    found = mail_hosts(server, mode, domain)
    assert [(h.name, h.ipv4) for h in found.hosts] == [(target, ("192.0.2.9",))]
    assert validate(server, mode, f"u@{domain}").reason is Reason.OK
    before = server.count()
    with pytest.raises(ResolverError) as raised:
        mail_hosts(server, mode, "xx" + domain)
    assert not raised.value.is_transient
    assert server.count() == before  # refused without a query


# -- properties ---------------------------------------------------------------------------------

FAULTS = st.sampled_from([None, None, None, *in_order(Fault)]).filter(
    lambda f: f is not Fault.SLOW  # a slow answer can hold up others: timing, not logic
)
RDTYPES = ("MX", "A", "AAAA")


def expected_status(server: HostileDNS, name: str, rdtype: str) -> DNSStatus:
    """What one query tells the resolver, by the server's script."""
    fault = server.faults.get((name, rdtype)) or server.faults.get((name, "*"))
    if fault in TRANSIENT:
        return DNSStatus.ERROR  # some transient status
    if fault is Fault.NXDOMAIN:
        return DNSStatus.NXDOMAIN
    if fault is Fault.NODATA:
        return DNSStatus.NODATA
    if (name, rdtype) in server.records:
        return DNSStatus.OK
    return DNSStatus.NODATA if any(k[0] == name for k in server.records) else DNSStatus.NXDOMAIN


def expected_reason(server: HostileDNS, domain: str) -> Reason:
    """The validator's reason for ``user@domain``, worked out from the script alone."""

    def host(name: str) -> DNSStatus:
        a, aaaa = expected_status(server, name, "A"), expected_status(server, name, "AAAA")
        if DNSStatus.OK in {a, aaaa}:
            return DNSStatus.OK
        if DNSStatus.ERROR in {a, aaaa}:
            return DNSStatus.ERROR
        return DNSStatus.NODATA

    mx = expected_status(server, domain, "MX")
    if mx is DNSStatus.ERROR:
        return Reason.TEMPFAIL
    if mx is DNSStatus.NXDOMAIN:
        return Reason.NO_SUCH_DOMAIN
    if mx is DNSStatus.NODATA:
        implicit = host(domain)
        return {DNSStatus.OK: Reason.OK, DNSStatus.ERROR: Reason.TEMPFAIL}.get(
            implicit, Reason.NO_MAIL_HOST
        )
    targets = [text.split()[1].rstrip(".") for text in server.records[domain, "MX"][1]]
    statuses = {host(target) for target in targets}
    if DNSStatus.OK in statuses:
        return Reason.OK
    return Reason.TEMPFAIL if DNSStatus.ERROR in statuses else Reason.NO_MAIL_HOST


@st.composite
def scripts(draw: st.DrawFn) -> dict[tuple[str, str], Fault | None]:
    """A fault (or none) for each query the lookup of ``d.test`` may make."""
    names = ["d.test"] + [f"mx{i}.d.test" for i in range(draw(st.integers(0, 2)))]
    return {(name, rdtype): draw(FAULTS) for name in names for rdtype in RDTYPES}


def apply(server: HostileDNS, script: dict[tuple[str, str], Fault | None]) -> None:
    server.reset()
    exchangers = list(dict.fromkeys(name for name, _ in script if name != "d.test"))
    if exchangers:
        server.add(
            "d.test", "MX", *mx_records([(10 * i, f"{n}.") for i, n in enumerate(exchangers)])
        )
    server.add("d.test", "A", "192.0.2.100")
    for i, name in enumerate(exchangers):
        server.add(name, "A", f"192.0.2.{i + 1}")
    for (name, rdtype), fault in script.items():
        if fault is not None:
            server.fault(name, rdtype, fault)


PROPERTY = settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@PROPERTY
@given(script=scripts(), mode=st.sampled_from(MODES), many=st.booleans())
def test_validation_follows_the_dns_and_never_blames_trouble_on_the_address(
    server: HostileDNS, script: dict[tuple[str, str], Fault | None], mode: str, many: bool
) -> None:
    apply(server, script)
    reason = expected_reason(server, "d.test")
    seconds = budget(len(script) * 2)  # every query once, two domains at most
    texts = ["user@d.test", "other@d.test", "x@nowhere.test"]
    results: list[Validation]
    if mode == "sync":
        sync = RecipientValidator(
            sync_resolver(server), special_use=SPECIAL_USE, refused_networks=()
        )
        if many:
            results = guarded(seconds, lambda: sync.validate_many(texts))
        else:
            results = [guarded(seconds, lambda t=text: sync.validate(t)) for text in texts]
    else:
        asyn = AsyncRecipientValidator(
            async_resolver(server), special_use=SPECIAL_USE, refused_networks=()
        )
        if many:
            results = guarded(seconds, lambda: asyn.validate_many(texts))
        else:
            results = [guarded(seconds, lambda t=text: asyn.validate(t)) for text in texts]
    # TEMPFAIL (verdict UNKNOWN) exactly when the lookups the verdict rests on failed.
    assert [r.reason for r in results] == [reason, reason, Reason.NO_SUCH_DOMAIN]


@PROPERTY
@given(script=scripts(), mode=st.sampled_from(MODES))
def test_the_mx_plan_is_transient_exactly_when_the_dns_failed(
    server: HostileDNS, script: dict[tuple[str, str], Fault | None], mode: str
) -> None:
    apply(server, script)
    reason = expected_reason(server, "d.test")
    try:
        planned = route(server, mode, "d.test", lookups=len(script))
    except MailRelayError as exc:  # pragma: no cover -- a failure message, should it happen
        pytest.fail(f"the plan step raised {exc!r}")
    if reason is Reason.OK:
        assert isinstance(planned, list)
        assert {t.address for t in planned} <= {
            address
            for (name, rdtype), (_ttl, values) in server.records.items()
            if rdtype in {"A", "AAAA"}
            for address in values
        }
    else:
        assert isinstance(planned, Verdict)
        transient = reason is Reason.TEMPFAIL
        assert planned.outcome is (Outcome.TRANSIENT if transient else Outcome.PERMANENT)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    fault=st.sampled_from(in_order(Fault)),
    rdtype=st.sampled_from(["A", "AAAA"]),
    mode=st.sampled_from(MODES),
)
def test_addresses_return_facts_or_raise_typed_errors(
    server: HostileDNS, fault: Fault, rdtype: str, mode: str
) -> None:
    server.reset()
    server.add("h.test", "A", "192.0.2.1")
    server.add("h.test", "AAAA", "2001:db8::1")
    server.fault("h.test", rdtype, fault)
    resolver = make_resolver(server, mode)
    try:
        found = guarded(budget(2), lambda: resolver.addresses("h.test"))
    except MailRelayError as exc:
        pytest.fail(f"one good family is enough, yet it raised {exc!r}")
    assert found.status is DNSStatus.OK
    kept = found.ipv6 if rdtype == "A" else found.ipv4
    assert kept  # the other family's answer is never lost to this one's failure


@pytest.mark.parametrize("mode", MODES)
def test_the_timeout_bounds_a_lookup_across_the_cname_hops_it_follows(
    server: HostileDNS, mode: str
) -> None:
    # The server stops at each CNAME and answers every hop after 0.6 of the timeout; the
    # chain ends in an address six hops on. The timeout is for the whole lookup (Resolver's
    # documentation), so the chain cannot be walked in time: the second hop already ends
    # past it. Before, each hop had a timeout of its own and the lookup took 6 x 0.6 of it.
    server.chase_cnames = False
    server.delay = 0.6 * TIMEOUT
    for hop in range(6):
        server.add(f"hop{hop}.test", "CNAME", f"hop{hop + 1}.test.")
        server.fault(f"hop{hop}.test", "*", Fault.SLOW)
    server.add("hop6.test", "A", "192.0.2.6")
    resolver = make_resolver(server, mode)
    with pytest.raises(ResolverError) as raised:
        guarded(budget(2), lambda: resolver.addresses("hop0.test"))
    assert raised.value.is_transient
    assert "(timeout)" in str(raised.value)
    # A and AAAA each give up within their timeout: at most two hops each.
    assert server.count() <= 4


@pytest.mark.parametrize("mode", MODES)
def test_silent_exchangers_cost_bounded_time_and_queries(server: HostileDNS, mode: str) -> None:
    # 40 exchangers, none of whose names the server answers: only the best MAX_MAIL_HOSTS
    # are asked about, and the lookup ends within a timeout per query it made (the hang
    # guard; asked at the same time, they take about two).
    timeout = 0.05
    names = [f"mx{i:02}.d.test" for i in range(40)]
    server.add("d.test", "MX", *mx_records([(i, f"{name}.") for i, name in enumerate(names)]))
    for name in names:
        server.fault(name, "*", Fault.SILENCE)
    resolver = make_resolver(server, mode, timeout=timeout)
    found = guarded(budget(1 + 2 * MAX_MAIL_HOSTS, timeout), lambda: resolver.mail_hosts("d.test"))
    assert isinstance(found, MailHosts)
    assert [h.name for h in found.hosts] == names[:MAX_MAIL_HOSTS]
    assert all(h.status is DNSStatus.TIMEOUT for h in found.hosts)
    asked = {q.name for q in server.queries} - {"d.test"}
    assert asked == set(names[:MAX_MAIL_HOSTS])


@pytest.mark.parametrize("mode", MODES)
def test_unasked_for_records_are_never_believed(server: HostileDNS, mode: str) -> None:
    # RFC 2181 §5.4.1: data in the additional section ranks below an authoritative answer;
    # a resolver that took it would let any server it asks redirect others' mail.
    simple_zone(server)
    server.glue = [("mx1.d.test", "A", "203.0.113.66"), ("victim.test", "A", "203.0.113.66")]
    server.add("victim.test", "A", "192.0.2.77")
    resolver = make_resolver(server, mode)
    found = guarded(budget(5), lambda: resolver.mail_hosts("d.test"))
    assert isinstance(found, MailHosts)
    assert [h.ipv4 for h in found.hosts] == [("192.0.2.1",), ("192.0.2.2",)]
    victim = guarded(budget(2), lambda: resolver.addresses("victim.test"))
    assert victim.ipv4 == ("192.0.2.77",)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    records=st.lists(
        st.tuples(st.sampled_from([0, 1, 10, 65535]), st.sampled_from([".", "mx1", "mx2", "mx3"])),
        min_size=1,
        max_size=6,
        unique=True,
    ),
    mode=st.sampled_from(MODES),
)
def test_mx_records_give_hosts_by_preference_and_null_mx_only_when_alone(
    server: HostileDNS, records: list[tuple[int, str]], mode: str
) -> None:
    server.reset()
    server.add("d.test", "A", "192.0.2.99")
    server.add(
        "d.test", "MX", *mx_records([(p, t if t == "." else f"{t}.d.test.") for p, t in records])
    )
    for name in ("mx1", "mx2", "mx3"):
        server.add(f"{name}.d.test", "A", f"192.0.2.{name[-1]}")
    found = mail_hosts(server, mode, "d.test", lookups=7)
    # RFC 7505 §3: only the lone record "0 ." is a null MX; other "." records are skipped.
    assert found.null_mx is (records == [(0, ".")])
    assert not found.implicit  # MX records exist, so the domain's A record is no exchanger
    best: dict[str, int] = {}
    for preference, target in records:
        if target != ".":
            best[target] = min(preference, best.get(target, preference))
    # RFC 5321 §5.1: lowest preference first (ties in any order); a target listed twice
    # keeps its best preference.
    hosts = [(h.preference, h.name.removesuffix(".d.test")) for h in found.hosts]
    assert sorted(hosts) == sorted((preference, name) for name, preference in best.items())
    assert [preference for preference, _ in hosts] == sorted(best.values())
    result = validate(server, mode, "user@d.test", lookups=7)
    expected = Reason.NULL_MX if found.null_mx else Reason.OK if best else Reason.NO_MAIL_HOST
    assert result.reason is expected


@st.composite
def manglers(draw: st.DrawFn) -> tuple[list[tuple[int, int]], int | None, bytes]:
    """Byte changes (position past the id, new value), a cut, and bytes added at the end."""
    changes = draw(st.lists(st.tuples(st.integers(2, 300), st.integers(0, 255)), max_size=6))
    cut = draw(st.none() | st.integers(2, 120))
    return changes, cut, draw(st.binary(max_size=40))


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    mangler=manglers(),
    rdtype=st.sampled_from(RDTYPES),
    truncate=st.booleans(),
    mode=st.sampled_from(MODES),
)
def test_mangled_answers_give_values_or_typed_errors(
    server: HostileDNS,
    mangler: tuple[list[tuple[int, int]], int | None, bytes],
    rdtype: str,
    truncate: bool,
    mode: str,
) -> None:
    changes, cut, tail = mangler

    def mangle(wire: bytes) -> bytes:
        data = bytearray(wire)
        for position, value in changes:
            if position < len(data):
                data[position] = value
        return bytes(data[:cut] if cut is not None else data) + tail

    server.reset()
    simple_zone(server)
    server.add("d.test", "A", "192.0.2.100")
    server.mangle = mangle
    server.mangle_over_tcp = truncate  # TC over UDP first, the mangled bytes over TCP
    for name in ["d.test"] if rdtype == "MX" else ["mx1.d.test", "mx2.d.test"]:
        server.fault(name, rdtype, Fault.MANGLE)
    # dnspython drops a UDP answer it cannot parse and waits on: a short timeout keeps the
    # many examples that end that way quick.
    result = validate(server, mode, "user@d.test", lookups=5, timeout=0.1)
    # Whatever the bytes said, the verdict is one the DNS could give; trouble is TEMPFAIL.
    assert result.reason in {
        Reason.OK,
        Reason.TEMPFAIL,
        Reason.NO_SUCH_DOMAIN,
        Reason.NULL_MX,
        Reason.NO_MAIL_HOST,
    }


@pytest.mark.parametrize("mode", MODES)
def test_exchangers_are_looked_up_at_the_same_time(server: HostileDNS, mode: str) -> None:
    # Every exchanger's A and AAAA answer comes late. Asked one after another, a domain
    # whose 16 exchangers never answer costs 33 timeouts in a blocking call; asked at the
    # same time (threads for Resolver, tasks for AsyncResolver), about two.
    server.delay = 0.1
    names = [f"mx{i}.d.test" for i in range(4)]
    server.add("d.test", "MX", *mx_records([(10, f"{name}.") for name in names]))
    for i, name in enumerate(names):
        server.add(name, "A", f"192.0.2.{i + 1}")
        server.fault(name, "*", Fault.SLOW)
    resolver = make_resolver(server, mode, timeout=2.0)
    found = guarded(budget(9, 2.0), lambda: resolver.mail_hosts("d.test"))
    assert isinstance(found, MailHosts)
    assert sorted(h.name for h in found.hosts) == names
    assert all(h.status is DNSStatus.OK for h in found.hosts)
    assert server.most_waiting > 1
