"""One validator, resolver and cache shared by many threads or tasks, against real name servers.

Apps validate bulk lists from many threads or tasks at once with one shared
:class:`~mailrelay.validate.RecipientValidator` (or its async twin), one resolver and one
:class:`~mailrelay.dnscache.DNSCache`. The name servers are real: unbound serving the test
zone (``tests/peers/unbound.py``) and the scriptable hostile server
(``tests/peers/hostile_dns.py``: slow answers, silence, error codes). What must hold however
the calls overlap:

- every verdict is the one a single-threaded run on a fresh validator gives, and nothing
  but a verdict comes out;
- the cache holds each answer under its own question: never an A answer for an AAAA or MX
  question, never one name's answer under another's;
- a waiter that is cancelled or times out does not cancel or poison the lookup other
  waiters share, nor leave anything behind that makes later lookups hang or answer wrong;
- each call ends within the bound its timeout documents, and a slow domain does not hold
  up the lookups of another domain;
- DNS trouble is ``UNKNOWN``, never ``UNDELIVERABLE``;
- ``validate_many`` keeps to its ``concurrency``, and threads validating bulk lists at once
  ask each name once;
- the blocking resolver's threads are bounded and go when the resolver goes; a process
  with lookups in flight in a daemon thread still exits, and a thread that validates after
  the main thread has ended gets its verdicts;
- an answer the cache serves again, for another domain, counts its TTL down.

Bounds are hang guards (the configured timeouts times the queries a call may make, plus a
margin), never speed measurements.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Hashable, Iterator
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailrelay.dnscache import DNSCache
from mailrelay.errors import ResolverError
from mailrelay.resolver import MAX_MAIL_HOSTS, AsyncResolver, MailHosts, Resolver
from mailrelay.validate import (
    DEFAULT_SPECIAL_USE,
    AsyncRecipientValidator,
    Reason,
    RecipientValidator,
    Validation,
)
from tests.peers.hostile_dns import Fault, HostileDNS, mx_records
from tests.peers.unbound import BULK_DOMAINS, UnboundServer

T = TypeVar("T")

#: The test zones live under .test, a special-use name: these tests allow it.
ALLOW_TEST = DEFAULT_SPECIAL_USE - {"test"}
#: Threads sharing one validator.
THREADS = 8
#: Seconds one lookup may take against unbound on loopback (generous: CI is loaded).
UNBOUND_TIMEOUT = 1.0
#: Seconds one lookup may take against the hostile server.
TIMEOUT = 0.3
#: dnspython pauses this long before it gives up on a server that never answered.
DNSPYTHON_BACKOFF = 0.1
#: Added to every hang guard: start-up, a loaded machine, the garbage collector.
MARGIN = 5.0

_DNS_THREAD_PREFIX = "mailrelay-dns"


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one coroutine to completion in a fresh event loop (no pytest plugin)."""
    return asyncio.run(coro)


def budget(lookups: int, timeout: float = TIMEOUT) -> float:
    """The most seconds ``lookups`` lookups may take one after another, plus the margin."""
    return lookups * (timeout + DNSPYTHON_BACKOFF) + MARGIN


def in_threads(count: int, work: Callable[[int], object], bound: float) -> list[object]:
    """``work(i)`` for ``i`` in ``range(count)``, each in a thread, all started at once.

    Returns each call's result, or the exception it raised (so the test can say which).
    Fails when a thread is still running after ``bound`` seconds (the hang guard).
    """
    results: list[object] = [None] * count
    barrier = threading.Barrier(count, timeout=bound)

    def target(index: int) -> None:
        try:
            barrier.wait()
            results[index] = work(index)
        except BaseException as exc:
            results[index] = exc

    threads = [threading.Thread(target=target, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + bound
    for thread in threads:
        thread.join(max(deadline - time.monotonic(), 0.0))
    assert not any(thread.is_alive() for thread in threads), f"still running after {bound} s"
    return results


def dns_threads() -> int:
    """How many of the blocking resolvers' query threads are alive."""
    return sum(1 for t in threading.enumerate() if t.name.startswith(_DNS_THREAD_PREFIX))


# -- comparing verdicts and cache entries ----------------------------------------------------------


def normal_hosts(found: MailHosts | None) -> object:
    """``found`` without what may differ between two correct runs: the shuffle of equal
    preferences (RFC 5321 §5.1) and the order in which a server rotates an RRset."""
    if found is None:
        return None
    assert [h.preference for h in found.hosts] == sorted(h.preference for h in found.hosts)
    hosts = sorted(
        (h.preference, h.name, h.status, sorted(h.ipv4), sorted(h.ipv6)) for h in found.hosts
    )
    return (found.domain, found.status, found.null_mx, found.implicit, hosts)


def verdict_of(result: object) -> object:
    """A validation as two correct runs must agree on it."""
    assert isinstance(result, Validation), f"not a verdict: {result!r}"
    assert result.verdict is result.reason.verdict
    address = None if result.address is None else str(result.address)
    hosts = normal_hosts(result.mail_hosts)
    return (result.input, result.verdict, result.reason, address, result.detail, hosts)


class RecordingCache(DNSCache):
    """A cache that remembers every entry put into it, to check each against its key."""

    def __init__(self) -> None:
        super().__init__()
        self.puts: list[tuple[Hashable, object]] = []
        self._puts_lock = threading.Lock()

    def put(self, key: Hashable, value: object, ttl: float) -> None:
        with self._puts_lock:
            self.puts.append((key, value))
        super().put(key, value, ttl)


def normal_entry(key: Hashable, value: object) -> object:
    """A cache entry in a comparable form, after checking it answers its own question.

    The resolver keys a query's answer by ``(name, type)`` and a domain's assembled mail
    hosts by ``(domain, -1)``; an answer is a plain ``(status, records, ttl, detail, secure)``
    tuple (``secure``: the resolver's AD bit, RFC 6840 §5.7).
    """
    assert isinstance(key, tuple)
    name, kind = key
    assert isinstance(name, str)
    if isinstance(value, MailHosts):
        assert kind == -1, f"mail hosts of {value.domain} under {key}"
        assert value.domain == name, f"mail hosts of {value.domain} under {key}"
        return normal_hosts(value)
    if isinstance(value, ResolverError):
        assert kind == -1, f"a domain's failure under {key}"
        assert value.name == name, f"the failure of {value.name} under {key}"
        return str(value)
    assert isinstance(value, tuple)
    status, records, ttl, detail, secure = value
    if int(kind) == 1:  # A
        assert all(ipaddress.ip_address(r).version == 4 for r in records), (key, records)
    elif int(kind) == 28:  # AAAA
        assert all(ipaddress.ip_address(r).version == 6 for r in records), (key, records)
    else:
        assert int(kind) == 15, f"an answer under {key}"  # MX: (preference, target) pairs
        assert all(isinstance(r, tuple) and len(r) == 2 for r in records), (key, records)
    return (status, sorted(records), ttl, detail, secure)


def check_cache(cache: RecordingCache, reference: RecordingCache) -> None:
    """Every entry put under a key is the entry a single-threaded run put under it."""
    expected = {key: normal_entry(key, value) for key, value in reference.puts}
    assert cache.puts
    for key, value in cache.puts:
        assert key in expected, f"{key} was never asked in the single-threaded run"
        assert normal_entry(key, value) == expected[key], key


# -- one blocking validator shared by many threads -------------------------------------------------

#: Valid, null MX, implicit MX, NXDOMAIN, IDN (both forms), no mail host, CNAMEs, equal
#: preferences, DNS trouble, literals, special-use names and syntax errors; duplicates and
#: case variants included on purpose.
ADDRESSES = [
    "user@mailrelay.test",
    "User.Name@MailRelay.TEST",
    "u@nullmx.test",
    "u@a-only.test",
    "u@aaaa-only.test",
    "u@both.test",
    "u@nx.test",
    "u@deeper.nx.test",
    "u@café.test",
    "usér@xn--caf-dma.test",
    "u@nomail.test",
    "u@dangling.test",
    "u@halfdangling.test",
    "u@mxcname.test",
    "u@cname.test",
    "u@samepref.test",
    "u@failover.test",
    "u@mx2.test",
    "u@refused.test",
    "u@timeout.test",
    "u@[127.0.0.1]",
    "user",
    "us er@mailrelay.test",
    "<u@mailrelay.test>",
    "u@-bad-.test",
    "u@example.com",
    *(f"u{i}@{domain}" for i, domain in enumerate(BULK_DOMAINS[:12])),
    "user@mailrelay.test",
    "u@samepref.test",
]


def recording_validator(unbound: UnboundServer) -> RecipientValidator:
    resolver = unbound.resolver(timeout=UNBOUND_TIMEOUT, cache=RecordingCache())
    return RecipientValidator(resolver, special_use=ALLOW_TEST, refused_networks=())


@pytest.fixture(scope="module")
def reference(unbound: UnboundServer) -> tuple[dict[str, object], RecordingCache]:
    """Each address's verdict from a single-threaded run on a fresh validator, and its cache."""
    validator = recording_validator(unbound)
    verdicts = {a: verdict_of(validator.validate(a)) for a in ADDRESSES}
    assert isinstance(validator.resolver.cache, RecordingCache)
    return verdicts, validator.resolver.cache


def test_threads_sharing_a_validator_get_the_single_threaded_verdicts(
    unbound: UnboundServer, reference: tuple[dict[str, object], RecordingCache]
) -> None:
    verdicts, reference_cache = reference
    validator = recording_validator(unbound)

    def work(index: int) -> list[tuple[str, object]]:
        # Each thread its own order of the list, one by one, then the whole list in bulk.
        order = ADDRESSES * 2
        random.Random(index).shuffle(order)
        seen = [(a, verdict_of(validator.validate(a))) for a in order]
        bulk = validator.validate_many(order)
        return seen + [(a, verdict_of(r)) for a, r in zip(order, bulk, strict=True)]

    # Every domain is looked up once (in-flight sharing, then the cache): the failing ones
    # cost a timeout each, one after another at worst.
    results = in_threads(THREADS, work, budget(len(ADDRESSES), UNBOUND_TIMEOUT))
    for result in results:
        assert isinstance(result, list), f"a thread raised {result!r}"
        for address, verdict in result:
            assert verdict == verdicts[address], address
    assert isinstance(validator.resolver.cache, RecordingCache)
    check_cache(validator.resolver.cache, reference_cache)


def test_threads_sharing_one_cache_through_their_own_resolvers(
    unbound: UnboundServer, reference: tuple[dict[str, object], RecordingCache]
) -> None:
    # Blocking and async resolvers of several threads, one cache.
    verdicts, reference_cache = reference
    cache = RecordingCache()

    def work(index: int) -> list[tuple[str, object]]:
        order = list(ADDRESSES)
        random.Random(index).shuffle(order)
        if index % 2:
            resolver = unbound.async_resolver(timeout=UNBOUND_TIMEOUT, cache=cache)
            validator = AsyncRecipientValidator(
                resolver, special_use=ALLOW_TEST, refused_networks=()
            )
            bulk = run(validator.validate_many(order))
            return [(a, verdict_of(r)) for a, r in zip(order, bulk, strict=True)]
        blocking = RecipientValidator(
            unbound.resolver(timeout=UNBOUND_TIMEOUT, cache=cache),
            special_use=ALLOW_TEST,
            refused_networks=(),
        )
        return [(a, verdict_of(blocking.validate(a))) for a in order]

    results = in_threads(THREADS, work, budget(len(ADDRESSES), UNBOUND_TIMEOUT))
    for result in results:
        assert isinstance(result, list), f"a thread raised {result!r}"
        for address, verdict in result:
            assert verdict == verdicts[address], address
    check_cache(cache, reference_cache)


# -- a slow domain and the blocking resolver's threads ---------------------------------------------


@pytest.fixture(scope="module")
def dns_server() -> Iterator[HostileDNS]:
    with HostileDNS() as server:
        yield server
    assert not server.errors


@pytest.fixture
def server(dns_server: HostileDNS) -> HostileDNS:
    dns_server.reset()
    return dns_server


def exchangers(server: HostileDNS, domain: str, count: int, fault: Fault | None = None) -> None:
    """``domain`` with ``count`` exchangers of equal preference, each with an IPv4 address,
    each answering with ``fault`` (none: at once)."""
    names = [f"mx{i}.{domain}" for i in range(count)]
    server.add(domain, "MX", *mx_records([(10, f"{name}.") for name in names]))
    for i, name in enumerate(names):
        server.add(name, "A", f"192.0.2.{i + 1}")
        if fault is not None:
            server.fault(name, "*", fault)


def test_a_slow_domain_does_not_hold_up_another_domains_exchangers() -> None:
    # One domain's 16 exchangers answer only when the test lets them (when the server
    # stops), so their 32 queries keep threads busy; meanwhile another domain, whose server
    # answers at once, is looked up with the same resolver. Its exchangers' queries must not
    # wait for threads the slow domain holds: a blocking mail_hosts call costs about two
    # timeouts (docs/validation.md), not one per other caller's slow queries. Before the fix
    # the resolver's one pool of 32 threads was full, so the fast domain's lookup could not
    # end before the slow answers came.
    hold = 5.0  # the slow answers come when the server stops, at the latest after this
    guard = 3.0  # the fast lookup's hang guard: it needs a few milliseconds
    with HostileDNS() as held:
        held.delay = hold
        exchangers(held, "slow.test", MAX_MAIL_HOSTS, Fault.SLOW)
        exchangers(held, "fast.test", 4)
        resolver = Resolver(["127.0.0.1"], port=held.port, timeout=hold + 1.0)
        slow: list[object] = []
        fast: list[object] = []
        slow_thread = threading.Thread(
            target=lambda: slow.append(resolver.mail_hosts("slow.test")), daemon=True
        )
        slow_thread.start()
        for _ in range(200):  # until every slow query has reached the server (at most 10 s)
            if held.most_waiting >= 2 * MAX_MAIL_HOSTS or not slow_thread.is_alive():
                break
            time.sleep(0.05)
        assert held.most_waiting == 2 * MAX_MAIL_HOSTS
        fast_thread = threading.Thread(
            target=lambda: fast.append(resolver.mail_hosts("fast.test")), daemon=True
        )
        fast_thread.start()
        fast_thread.join(guard)
        fast_done_first = not fast_thread.is_alive() and slow_thread.is_alive()
    # The server has stopped: the held answers went out, and every lookup can end.
    for thread in (slow_thread, fast_thread):
        thread.join(hold + MARGIN)
        assert not thread.is_alive()
    assert fast_done_first, "the fast domain waited for the slow domain's answers"
    (found,) = fast
    assert isinstance(found, MailHosts)
    assert sorted(h.name for h in found.usable_hosts) == [f"mx{i}.fast.test" for i in range(4)]
    (found,) = slow
    assert isinstance(found, MailHosts)
    assert len(found.usable_hosts) == MAX_MAIL_HOSTS


# -- async waiters cancelled at random moments -----------------------------------------------------

#: Each domain of the cancellation zone and the reason a validation of it must give.
CANCEL_ZONE = {
    "good.test": Reason.OK,
    "null.test": Reason.NULL_MX,
    "implicit.test": Reason.OK,
    "nx.test": Reason.NO_SUCH_DOMAIN,
    "broken.test": Reason.TEMPFAIL,
    "halfbroken.test": Reason.OK,
}
#: Seconds a slow answer waits: long enough for waiters to pile up and be cancelled.
SLOW_DELAY = 0.05
#: The async tests' lookup timeout: well above SLOW_DELAY, even on a loaded machine.
ASYNC_TIMEOUT = 2.0


def cancel_zone(server: HostileDNS) -> None:
    """Slow answers wherever a lookup can be shared: MX queries and exchangers' A/AAAA."""
    server.reset()
    server.delay = SLOW_DELAY
    server.add("good.test", "MX", *mx_records([(10, "mx1.good.test."), (20, "mx2.good.test.")]))
    server.add("mx1.good.test", "A", "192.0.2.1")
    server.add("mx2.good.test", "A", "192.0.2.2")
    server.add("null.test", "MX", "0 .")
    server.add("implicit.test", "A", "192.0.2.3")
    server.add("broken.test", "A", "192.0.2.4")
    server.add(
        "halfbroken.test", "MX", *mx_records([(10, "bad.halfbroken.test."), (20, "mx1.good.test.")])
    )
    for name in ("good.test", "mx1.good.test", "null.test", "implicit.test"):
        server.fault(name, "*", Fault.SLOW)
    server.fault("broken.test", "MX", Fault.SERVFAIL)
    server.fault("bad.halfbroken.test", "*", Fault.SERVFAIL)


async def cancel_at_random(validator: AsyncRecipientValidator, rng: random.Random) -> None:
    """Many tasks for the few domains of the zone, some under ``asyncio.timeout``, some
    cancelled at random moments; those left alone must get the zone's verdicts."""
    domains = sorted(CANCEL_ZONE)

    async def within(seconds: float, address: str) -> Validation | None:
        try:
            async with asyncio.timeout(seconds):
                return await validator.validate(address)
        except TimeoutError:
            return None

    tasks: list[tuple[str, asyncio.Task[Validation | None]]] = []
    for index in range(40):
        domain = rng.choice(domains)
        address = f"user{index}@{domain}"
        if rng.random() < 0.3:
            coro = within(rng.uniform(0.0, 3 * SLOW_DELAY), address)
        else:
            coro = validator.validate(address)
        tasks.append((domain, asyncio.ensure_future(coro)))
    cancelled: set[int] = set()
    for _ in range(12):
        await asyncio.sleep(rng.uniform(0.0, SLOW_DELAY / 2))
        index = rng.randrange(len(tasks))
        if tasks[index][1].cancel():
            cancelled.add(index)
    async with asyncio.timeout(budget(3, ASYNC_TIMEOUT)):
        results = await asyncio.gather(*(task for _, task in tasks), return_exceptions=True)
    for index, ((domain, _), result) in enumerate(zip(tasks, results, strict=True)):
        if index in cancelled:
            assert isinstance(result, asyncio.CancelledError), (domain, result)
        elif result is not None:  # None: its own asyncio.timeout ran out
            assert isinstance(result, Validation), (domain, result)
            assert result.reason is CANCEL_ZONE[domain], (domain, result)


async def fresh_verdicts(validator: AsyncRecipientValidator) -> dict[str, Reason]:
    """Each domain of the zone validated again, all at once, under a hang guard."""
    domains = sorted(CANCEL_ZONE)
    async with asyncio.timeout(budget(3, ASYNC_TIMEOUT)):
        results = await asyncio.gather(*(validator.validate(f"again@{d}") for d in domains))
    return {domain: result.reason for domain, result in zip(domains, results, strict=True)}


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seed=st.integers(min_value=0, max_value=2**32 - 1))
def test_cancelled_waiters_leave_the_shared_lookups_whole(server: HostileDNS, seed: int) -> None:
    cancel_zone(server)
    resolver = AsyncResolver(["127.0.0.1"], port=server.port, timeout=ASYNC_TIMEOUT)
    validator = AsyncRecipientValidator(resolver, special_use=ALLOW_TEST, refused_networks=())

    async def scenario() -> dict[str, Reason]:
        await cancel_at_random(validator, random.Random(seed))
        return await fresh_verdicts(validator)

    assert run(scenario()) == CANCEL_ZONE
    # In a new event loop too (what the first loop left in flight must not get in the way).
    assert run(fresh_verdicts(validator)) == CANCEL_ZONE
    # However many waiters gave up, each lookup was made once and shared.
    assert server.count("good.test") == 1
    assert server.count("mx1.good.test") == 2  # A and AAAA, shared by two domains


def test_a_lookup_cancelled_before_it_started_is_not_shared(server: HostileDNS) -> None:
    # An app that cancels every task of its loop (a shutdown of one component, a test
    # harness) may cancel a shared lookup's own task before it ever ran: then the task
    # never gets to clear its in-flight entry. Before the fix, every later validation of
    # the domain in that loop awaited the cancelled task and raised CancelledError,
    # though nobody had cancelled it.
    cancel_zone(server)
    resolver = AsyncResolver(["127.0.0.1"], port=server.port, timeout=ASYNC_TIMEOUT)
    validator = AsyncRecipientValidator(resolver, special_use=ALLOW_TEST, refused_networks=())

    async def scenario() -> list[Reason]:
        first = asyncio.ensure_future(validator.validate("first@good.test"))
        await asyncio.sleep(0)  # it asked: the shared lookup's task exists, not yet started
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task():
                task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        async with asyncio.timeout(budget(3, ASYNC_TIMEOUT)):
            again = await asyncio.gather(
                validator.validate("again@good.test"), validator.validate("more@good.test")
            )
        return [result.reason for result in again]

    assert run(scenario()) == [Reason.OK, Reason.OK]


# -- DNS trouble under concurrency -----------------------------------------------------------------

#: Domains of the trouble zone and the reason a validation must give; what the DNS could not
#: tell is TEMPFAIL (UNKNOWN), never UNDELIVERABLE (docs/validation.md).
TROUBLE_ZONE = {
    "silent.test": Reason.TEMPFAIL,  # the MX query is never answered
    "silentmx.test": Reason.TEMPFAIL,  # neither are any of its 16 exchangers' A/AAAA queries
    "servfail.test": Reason.TEMPFAIL,
    "fast1.test": Reason.OK,
    "fast2.test": Reason.OK,
    "nx.test": Reason.NO_SUCH_DOMAIN,
}
#: The most lookups one validation makes one after another (the MX query, then the
#: exchangers' A and AAAA queries, asked at the same time).
STEPS = 2


def trouble_zone(server: HostileDNS) -> None:
    server.fault("silent.test", "*", Fault.SILENCE)
    exchangers(server, "silentmx.test", MAX_MAIL_HOSTS)
    for i in range(MAX_MAIL_HOSTS):
        server.fault(f"mx{i}.silentmx.test", "*", Fault.SILENCE)
    server.fault("servfail.test", "*", Fault.SERVFAIL)
    exchangers(server, "fast1.test", 4)
    exchangers(server, "fast2.test", 3)


def timed(validate: Callable[[str], Validation], address: str) -> tuple[Validation, float]:
    """The validation of ``address``, and the seconds it took."""
    start = time.monotonic()
    result = validate(address)
    return result, time.monotonic() - start


async def atimed(
    validate: Callable[[str], Coroutine[Any, Any, Validation]], address: str
) -> tuple[Validation, float]:
    """The async validation of ``address``, and the seconds it took."""
    start = time.monotonic()
    result = await validate(address)
    return result, time.monotonic() - start


def check_trouble(results: list[tuple[str, tuple[Validation, float]]]) -> None:
    for domain, (result, seconds) in results:
        assert result.reason is TROUBLE_ZONE[domain], (domain, result)
        # A hang guard per call: its own lookups take about STEPS timeouts; a lookup it
        # joins in flight ends no later than that.
        assert seconds < budget(STEPS), (domain, seconds)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_dns_trouble_under_concurrency_is_bounded_and_never_undeliverable(
    server: HostileDNS, mode: str
) -> None:
    trouble_zone(server)
    # failure_ttl=0: nothing failed is remembered, so every pass asks again.
    domains = sorted(TROUBLE_ZONE) * 2
    if mode == "sync":
        resolver = Resolver(["127.0.0.1"], port=server.port, timeout=TIMEOUT, failure_ttl=0)
        validator = RecipientValidator(resolver, special_use=ALLOW_TEST, refused_networks=())
        before = dns_threads()

        def work(index: int) -> list[tuple[str, tuple[Validation, float]]]:
            order = list(domains)
            random.Random(index).shuffle(order)
            return [(d, timed(validator.validate, f"u{index}@{d}")) for d in order]

        results = in_threads(THREADS, work, budget(STEPS * len(domains)))
        # The threads a call starts when the kept ones are busy go with the call.
        assert dns_threads() - before <= 2 * MAX_MAIL_HOSTS
    else:
        aresolver = AsyncResolver(["127.0.0.1"], port=server.port, timeout=TIMEOUT, failure_ttl=0)
        avalidator = AsyncRecipientValidator(aresolver, special_use=ALLOW_TEST, refused_networks=())

        async def task(index: int) -> list[tuple[str, tuple[Validation, float]]]:
            order = list(domains)
            random.Random(index).shuffle(order)
            return [(d, await atimed(avalidator.validate, f"u{index}@{d}")) for d in order]

        async def tasks() -> list[list[tuple[str, tuple[Validation, float]]]]:
            async with asyncio.timeout(budget(STEPS * len(domains))):
                return await asyncio.gather(*(task(i) for i in range(THREADS)))

        results = list(run(tasks()))
    for result in results:
        assert isinstance(result, list), f"a thread raised {result!r}"
        check_trouble(result)


# -- threads at the end of a resolver and of a process ---------------------------------------------


def test_resolvers_made_and_dropped_leave_no_threads(server: HostileDNS) -> None:
    exchangers(server, "fast1.test", 4)
    exchangers(server, "fast2.test", 3)
    gc.collect()
    before = dns_threads()
    for _ in range(20):
        resolver = Resolver(["127.0.0.1"], port=server.port, timeout=2.0)
        validator = RecipientValidator(resolver, special_use=ALLOW_TEST, refused_networks=())
        found = validator.validate_many(["a@fast1.test", "b@fast2.test", "c@nx.test"])
        assert [r.reason for r in found] == [Reason.OK, Reason.OK, Reason.NO_SUCH_DOMAIN]
        assert dns_threads() - before <= 2 * MAX_MAIL_HOSTS  # this resolver's, at most
        del resolver, validator
    gc.collect()
    for _ in range(100):  # the idle threads notice their pool is gone (at most 5 s)
        if dns_threads() <= before:
            break
        time.sleep(0.05)
    assert dns_threads() <= before


#: A child whose main thread starts a validating thread and returns at once. A daemon thread,
#: validating a silent domain again and again (nothing failed is remembered), is left
#: behind at exit, with exchangers' queries waiting in the resolver's threads for answers
#: that never come: the process must not wait for its loop to end. A non-daemon thread
#: must finish its work: the interpreter waits for it.
EXIT_CHILD = """
import sys, threading, time
from mailrelay.resolver import Resolver
from mailrelay.validate import RecipientValidator
port, timeout, daemon = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3] == "daemon"
resolver = Resolver(["127.0.0.1"], port=port, timeout=timeout, failure_ttl=0)
validator = RecipientValidator(resolver, special_use=(), refused_networks=())
main = threading.main_thread()

def work():
    if daemon:
        for _ in range(100):  # about a minute of lookups
            validator.validate("u@silentmx.test")
        return
    main.join(5.0)  # validate once the main thread has ended, as a worker of a script may
    many = validator.validate_many(["a@fast1.test", "b@fast2.test", "c@nx.test"])
    one = validator.validate("d@silentmx.test")
    print(*(r.reason.value for r in [*many, one]), flush=True)

threading.Thread(target=work, daemon=daemon).start()
if daemon:
    for _ in range(200):  # until the exchangers are being asked
        if any(t.name.startswith("mailrelay-dns") for t in threading.enumerate()):
            break
        time.sleep(0.01)
print("main ends", flush=True)
"""


@pytest.mark.parametrize("kind", ["daemon", "worker"])
def test_a_process_ends_with_validations_in_threads(server: HostileDNS, kind: str) -> None:
    trouble_zone(server)
    command = [sys.executable, "-c", EXIT_CHILD, str(server.port), str(TIMEOUT), kind]
    # The hang guard: the resolver's threads are joined at exit, each within its timeout.
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=budget(2 * STEPS) + 5, check=False
    )
    assert (done.returncode, done.stderr) == (0, "")
    if kind == "daemon":
        assert done.stdout == "main ends\n"
    else:
        # The worker went on after the main thread ended, and its lookups ran as ever
        # (concurrent.futures takes no new work then, Python 3.9+).
        assert done.stdout == "main ends\nok ok no-such-domain tempfail\n"


# -- bulk validation from several threads; the concurrency limit -----------------------------------


def test_bulk_lists_from_several_threads_look_each_name_up_once(unbound: UnboundServer) -> None:
    domains = BULK_DOMAINS[30:]
    addresses = [f"user{i}@{domains[i % len(domains)]}" for i in range(300)]
    before = {d: (unbound.queries_for(d), unbound.queries_for(f"mx.{d}")) for d in domains}
    validator = RecipientValidator(
        unbound.resolver(timeout=UNBOUND_TIMEOUT),
        special_use=ALLOW_TEST,
        concurrency=8,
        refused_networks=(),
    )

    def work(index: int) -> list[Validation]:
        order = list(addresses)
        random.Random(index).shuffle(order)
        found = validator.validate_many(order)
        assert [r.input for r in found] == order
        return found

    results = in_threads(4, work, budget(3 * len(domains), UNBOUND_TIMEOUT))
    for result in results:
        assert isinstance(result, list), f"a thread raised {result!r}"
        for validation in result:
            assert validation.reason is Reason.OK, validation
            assert validation.mail_hosts is not None
            assert validation.address is not None
            (host,) = validation.mail_hosts.hosts
            assert host.name == f"mx.{validation.address.domain}"
    # One MX query per domain, and an A and an AAAA query per exchanger, for all threads:
    # overlapping lookups waited for the first one, later ones found the cache.
    after = {d: (unbound.queries_for(d), unbound.queries_for(f"mx.{d}")) for d in domains}
    asked = {d: (a[0] - before[d][0], a[1] - before[d][1]) for d, a in after.items()}
    assert asked == dict.fromkeys(domains, (1, 2))


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_validate_many_keeps_to_its_concurrency(server: HostileDNS, mode: str) -> None:
    # Every domain's MX answer comes late; the server counts how many wait at once.
    domains = [f"d{i}.test" for i in range(12)]
    for domain in domains:
        server.add(domain, "MX", f"10 mx.{domain}.")
        server.add(f"mx.{domain}", "A", "192.0.2.1")
        server.fault(domain, "MX", Fault.SLOW)
    addresses = [f"u@{domain}" for domain in domains]
    if mode == "sync":
        resolver = Resolver(["127.0.0.1"], port=server.port, timeout=ASYNC_TIMEOUT)
        validator = RecipientValidator(
            resolver, special_use=ALLOW_TEST, concurrency=3, refused_networks=()
        )
        results = in_threads(1, lambda _: validator.validate_many(addresses), budget(12))[0]
    else:
        aresolver = AsyncResolver(["127.0.0.1"], port=server.port, timeout=ASYNC_TIMEOUT)
        avalidator = AsyncRecipientValidator(
            aresolver, special_use=ALLOW_TEST, concurrency=3, refused_networks=()
        )
        results = run(avalidator.validate_many(addresses))
    assert isinstance(results, list)
    assert [r.reason for r in results] == [Reason.OK] * len(domains)
    assert 1 < server.most_waiting <= 3


# -- the shared cache: answers reused across domains count their TTL down --------------------------


class FakeClock:
    """A monotonic clock the test moves by hand (shared by everything using the cache)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_mail_hosts_built_from_cached_answers_expire_with_them(
    server: HostileDNS, mode: str
) -> None:
    # Two domains share an exchanger whose address records live 60 s; their MX records
    # live 300 s. The second domain is looked up 50 s after the first, from the cached
    # address answers: its mail hosts may live 10 s more, not another 60 (RFC 2181 §8: a
    # TTL counts down while the record is cached). Before the fix, the second domain kept
    # the exchanger's old address for 50 s after its record had expired and it had moved.
    for domain in ("first.test", "second.test"):
        server.add(domain, "MX", "10 mx.shared.test.", ttl=300)
    server.add("mx.shared.test", "A", "192.0.2.1", ttl=60)
    server.add("mx.shared.test", "AAAA", "2001:db8::1", ttl=60)
    clock = FakeClock()

    def ipv4(domain: str) -> tuple[str, ...]:
        if mode == "sync":
            sync = Resolver(["127.0.0.1"], port=server.port, timeout=ASYNC_TIMEOUT, cache=cache)
            found = sync.mail_hosts(domain)
        else:
            asyn = AsyncResolver(
                ["127.0.0.1"], port=server.port, timeout=ASYNC_TIMEOUT, cache=cache
            )
            found = run(asyn.mail_hosts(domain))
        (host,) = found.hosts
        return host.ipv4

    cache = DNSCache(clock=clock)
    assert ipv4("first.test") == ("192.0.2.1",)
    clock.now += 50
    assert ipv4("second.test") == ("192.0.2.1",)
    server.add("mx.shared.test", "A", "192.0.2.99", ttl=60)  # the exchanger moves
    clock.now += 11  # the first answer's 60 s are over
    assert ipv4("first.test") == ("192.0.2.99",)
    assert ipv4("second.test") == ("192.0.2.99",)
