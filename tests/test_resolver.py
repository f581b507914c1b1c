"""The caching resolver, against the real unbound serving tests/peers/unbound.py's zone."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import pickle
import random
import threading
from collections.abc import Coroutine, Generator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.errors import ResolverError
from mailrelay.resolver import DNSCache, DNSStatus, HostAddresses, MailHosts, _Steps
from tests.peers import unbound as unbound_peer
from tests.peers.unbound import NEGATIVE_TTL, SHORT_TTL, UnboundServer

pytestmark = pytest.mark.unbound

T = TypeVar("T")

OK, NXDOMAIN, NODATA, TIMEOUT = (
    DNSStatus.OK,
    DNSStatus.NXDOMAIN,
    DNSStatus.NODATA,
    DNSStatus.TIMEOUT,
)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion in a fresh event loop."""
    return asyncio.run(coro)


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def mail_hosts(unbound: UnboundServer, mode: str, domain: str, **kwargs: Any) -> MailHosts:
    """``mail_hosts`` through the blocking or the async resolver."""
    if mode == "sync":
        return unbound.resolver(**kwargs).mail_hosts(domain)
    return run(unbound.async_resolver(**kwargs).mail_hosts(domain))


def summary(found: MailHosts) -> list[tuple[str, int, DNSStatus, tuple[str, ...], tuple[str, ...]]]:
    return [(h.name, h.preference, h.status, h.ipv4, h.ipv6) for h in found.hosts]


MX_LOCAL = ("mx.mailrelay.test", 10, OK, ("127.0.0.1",), ("::1",))

# (domain asked, domain reported, status, null_mx, implicit, hosts in order)
CASES = [
    ("mailrelay.test", "mailrelay.test", OK, False, False, [MX_LOCAL]),
    ("MailRelay.TEST.", "mailrelay.test", OK, False, False, [MX_LOCAL]),
    (
        "mx2.test",
        "mx2.test",
        OK,
        False,
        False,
        [
            ("mx1.mx2.test", 10, OK, ("127.0.0.1",), ("::1",)),
            ("mx2.mx2.test", 20, OK, ("127.0.0.2",), ()),
        ],
    ),
    (
        "failover.test",
        "failover.test",
        OK,
        False,
        False,
        [
            ("down.failover.test", 10, OK, ("127.0.0.3",), ()),
            ("up.failover.test", 20, OK, ("127.0.0.1",), ()),
        ],
    ),
    ("nullmx.test", "nullmx.test", OK, True, False, []),
    ("a-only.test", "a-only.test", OK, False, True, [("a-only.test", 0, OK, ("127.0.0.1",), ())]),
    (
        "aaaa-only.test",
        "aaaa-only.test",
        OK,
        False,
        True,
        [("aaaa-only.test", 0, OK, (), ("::1",))],
    ),
    ("both.test", "both.test", OK, False, True, [("both.test", 0, OK, ("127.0.0.1",), ("::1",))]),
    ("nomail.test", "nomail.test", NODATA, False, False, []),
    (
        "dangling.test",
        "dangling.test",
        OK,
        False,
        False,
        [("missing.dangling.test", 10, NXDOMAIN, (), ())],
    ),
    (
        "halfdangling.test",
        "halfdangling.test",
        OK,
        False,
        False,
        [
            ("missing.halfdangling.test", 10, NXDOMAIN, (), ()),
            ("mx.mailrelay.test", 20, OK, ("127.0.0.1",), ("::1",)),
        ],
    ),
    # The exchanger is an alias; its addresses are those of the CNAME's target.
    (
        "mxcname.test",
        "mxcname.test",
        OK,
        False,
        False,
        [("alias.mxcname.test", 10, OK, ("127.0.0.1",), ("::1",))],
    ),
    # The domain itself is an alias of mailrelay.test.
    ("cname.test", "cname.test", OK, False, False, [MX_LOCAL]),
    ("café.test", "xn--caf-dma.test", OK, False, False, [MX_LOCAL]),
    ("xn--caf-dma.test", "xn--caf-dma.test", OK, False, False, [MX_LOCAL]),
    ("nx.test", "nx.test", NXDOMAIN, False, False, []),
    ("no.such.name.invalid", "no.such.name.invalid", NXDOMAIN, False, False, []),
    (
        "dom42.test",
        "dom42.test",
        OK,
        False,
        False,
        [("mx.dom42.test", 10, OK, ("127.0.1.43",), ())],
    ),
    ("slowmx.test", "slowmx.test", OK, False, False, [("mx.timeout.test", 10, TIMEOUT, (), ())]),
]


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize(
    ("domain", "reported", "status", "null_mx", "implicit", "hosts"),
    CASES,
    ids=[case[0] for case in CASES],
)
def test_mail_hosts(  # noqa: PLR0917 -- one argument per table column
    unbound: UnboundServer,
    mode: str,
    domain: str,
    reported: str,
    status: DNSStatus,
    null_mx: bool,
    implicit: bool,
    hosts: list[tuple[str, int, DNSStatus, tuple[str, ...], tuple[str, ...]]],
) -> None:
    found = mail_hosts(unbound, mode, domain, timeout=0.5)
    assert found.domain == reported
    assert found.status is status
    assert found.exists is (status is not NXDOMAIN)
    assert found.null_mx is null_mx
    assert found.implicit is implicit
    assert summary(found) == hosts
    assert [h.name for h in found.usable_hosts] == [h[0] for h in hosts if h[3] or h[4]]


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize(
    ("domain", "status"),
    [
        ("timeout.test", "timeout"),
        ("deep.name.timeout.test", "timeout"),
        ("servfail.test", "servfail"),
        ("refused.test", "refused"),
        ("x.refused.test", "refused"),
    ],
)
def test_dns_trouble_is_a_transient_error(
    unbound: UnboundServer, mode: str, domain: str, status: str
) -> None:
    with pytest.raises(ResolverError, match=rf"\({status}\)") as caught:
        mail_hosts(unbound, mode, domain, timeout=0.5)
    assert caught.value.is_transient
    assert caught.value.name == domain
    assert pickle.loads(pickle.dumps(caught.value)) == caught.value


@pytest.mark.parametrize(
    "domain",
    ["", ".", "a..test", "x" * 64 + ".test", "a." * 127 + "test", "a b.test", "a\\.test", "@.test"],
)
def test_invalid_names_are_refused_without_a_query(unbound: UnboundServer, domain: str) -> None:
    resolver = unbound.resolver()
    with pytest.raises(ResolverError, match="not a valid domain name") as caught:
        resolver.mail_hosts(domain)
    assert not caught.value.is_transient
    assert len(resolver.cache) == 0


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize(
    ("host", "status", "ipv4", "ipv6"),
    [
        ("mx.mailrelay.test", OK, ("127.0.0.1",), ("::1",)),
        ("alias.mxcname.test", OK, ("127.0.0.1",), ("::1",)),
        ("mx2.mx2.test", OK, ("127.0.0.2",), ()),
        ("aaaa-only.test", OK, (), ("::1",)),
        ("missing.dangling.test", NXDOMAIN, (), ()),
        ("nomail.test", NODATA, (), ()),
    ],
)
def test_addresses(  # noqa: PLR0917 -- one argument per table column
    unbound: UnboundServer,
    mode: str,
    host: str,
    status: DNSStatus,
    ipv4: tuple[str, ...],
    ipv6: tuple[str, ...],
) -> None:
    if mode == "sync":
        found = unbound.resolver().addresses(host)
    else:
        found = run(unbound.async_resolver().addresses(host))
    assert found == HostAddresses(name=host, status=status, ipv4=ipv4, ipv6=ipv6)
    assert found.addresses == ipv4 + ipv6


def test_addresses_that_cannot_be_looked_up_raise(unbound: UnboundServer) -> None:
    with pytest.raises(ResolverError, match="timeout") as caught:
        unbound.resolver(timeout=0.3).addresses("mx.timeout.test")
    assert caught.value.is_transient


# -- equal preferences ---------------------------------------------------------------------


def test_equal_preferences_are_shuffled_with_the_injected_random(unbound: UnboundServer) -> None:
    resolver = unbound.resolver(random=random.Random(5321))
    orders = [tuple(h.name for h in resolver.mail_hosts("samepref.test").hosts) for _ in range(120)]
    equal = ("a.samepref.test", "b.samepref.test", "c.samepref.test")
    assert {order[3] for order in orders} == {"backup.samepref.test"}
    assert {order[:3] for order in orders} == set(itertools.permutations(equal))
    # The same seed gives the same sequence: the shuffle comes from the injected random only.
    again = unbound.resolver(random=random.Random(5321))
    assert [
        tuple(h.name for h in again.mail_hosts("samepref.test").hosts) for _ in range(120)
    ] == orders


def test_async_resolver_shuffles_too(unbound: UnboundServer) -> None:
    async def orders() -> set[tuple[str, ...]]:
        resolver = unbound.async_resolver(random=random.Random(7505))
        found = [await resolver.mail_hosts("samepref.test") for _ in range(60)]
        return {tuple(h.name for h in f.hosts[:3]) for f in found}

    assert len(run(orders())) == 6


def test_distinct_preferences_keep_their_order(unbound: UnboundServer) -> None:
    resolver = unbound.resolver(random=random.Random(1))
    for _ in range(20):
        assert [h.name for h in resolver.mail_hosts("mx2.test").hosts] == [
            "mx1.mx2.test",
            "mx2.mx2.test",
        ]


# -- the cache -----------------------------------------------------------------------------


def test_positive_answers_live_for_their_ttl(unbound: UnboundServer) -> None:
    clock = FakeClock()
    resolver = unbound.resolver(clock=clock)
    before_mx = unbound.queries_for("short.ttl.test")
    before_a = unbound.queries_for("mx.ttl.test")
    first = resolver.mail_hosts("short.ttl.test")
    assert unbound.queries_for("short.ttl.test") == before_mx + 1
    clock.now += SHORT_TTL - 1
    assert resolver.mail_hosts("short.ttl.test") == first
    assert unbound.queries_for("short.ttl.test") == before_mx + 1
    clock.now += 2  # past the MX record's TTL, still within the exchanger's A TTL (60 s)
    assert resolver.mail_hosts("short.ttl.test") == first
    assert unbound.queries_for("short.ttl.test") == before_mx + 2
    # mx.ttl.test was asked A and AAAA once each; neither has expired.
    assert unbound.queries_for("mx.ttl.test") == before_a + 2


def test_negative_answers_live_for_the_soa_negative_ttl(unbound: UnboundServer) -> None:
    clock = FakeClock()
    resolver = unbound.resolver(clock=clock)
    name = "negative-cache.test"
    before = unbound.queries_for(name)
    assert resolver.mail_hosts(name).status is NXDOMAIN
    clock.now += NEGATIVE_TTL - 1
    assert resolver.mail_hosts(name).status is NXDOMAIN
    assert unbound.queries_for(name) == before + 1
    clock.now += 2
    assert resolver.mail_hosts(name).status is NXDOMAIN
    assert unbound.queries_for(name) == before + 2


def test_nodata_is_cached_negatively(unbound: UnboundServer) -> None:
    clock = FakeClock()
    resolver = unbound.resolver(clock=clock)
    before = unbound.queries_for("nomail.test")
    for _ in range(3):
        assert resolver.mail_hosts("nomail.test").status is NODATA
    assert unbound.queries_for("nomail.test") == before + 3  # MX, A, AAAA: once each
    clock.now += NEGATIVE_TTL + 1
    resolver.mail_hosts("nomail.test")
    assert unbound.queries_for("nomail.test") == before + 6


def test_negative_ttl_is_capped(unbound: UnboundServer) -> None:
    clock = FakeClock()
    resolver = unbound.resolver(clock=clock, max_negative_ttl=10)
    name = "capped-negative.test"
    before = unbound.queries_for(name)
    resolver.mail_hosts(name)
    clock.now += 11
    resolver.mail_hosts(name)
    assert unbound.queries_for(name) == before + 2


def test_transient_failures_are_kept_for_failure_ttl(unbound: UnboundServer) -> None:
    clock = FakeClock()
    resolver = unbound.resolver(clock=clock, failure_ttl=30)
    name = "kept.refused.test"
    before = unbound.queries_for(name)
    for _ in range(3):
        with pytest.raises(ResolverError, match="refused"):
            resolver.mail_hosts(name)
        clock.now += 10
    assert unbound.queries_for(name) == before + 1
    clock.now += 1  # 31 s after the first lookup
    with pytest.raises(ResolverError, match="refused"):
        resolver.mail_hosts(name)
    assert unbound.queries_for(name) == before + 2


def test_failure_ttl_zero_keeps_nothing(unbound: UnboundServer) -> None:
    resolver = unbound.resolver(failure_ttl=0)
    name = "unkept.refused.test"
    before = unbound.queries_for(name)
    for _ in range(2):
        with pytest.raises(ResolverError):
            resolver.mail_hosts(name)
    assert unbound.queries_for(name) == before + 2


def test_a_cache_hit_sends_no_query(
    unbound: UnboundServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    resolver = unbound.resolver()
    first = resolver.mail_hosts("mx2.test")

    def no_query(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached lookup reached dnspython")

    monkeypatch.setattr(resolver._dns, "resolve", no_query)
    assert resolver.mail_hosts("mx2.test") == first


def test_the_cache_is_shared_between_sync_and_async(unbound: UnboundServer) -> None:
    sync = unbound.resolver()
    found = sync.mail_hosts("dom03.test")
    shared = unbound.async_resolver(cache=sync.cache)
    before = unbound.queries_for("dom03.test")
    assert run(shared.mail_hosts("dom03.test")) == found
    assert unbound.queries_for("dom03.test") == before


def test_the_cache_size_is_bounded(unbound: UnboundServer) -> None:
    resolver = unbound.resolver(cache_size=5)
    for domain in ("dom10.test", "dom11.test", "dom12.test", "dom13.test"):
        resolver.mail_hosts(domain)
        assert len(resolver.cache) <= 5


def test_lru_evicts_the_least_recently_used() -> None:
    cache = DNSCache(3, clock=FakeClock())
    for key in "abc":
        cache.put(key, key.upper(), 10)
    assert cache.get("a") == "A"  # now b is the least recently used
    cache.put("d", "D", 10)
    assert [cache.get(k) == k.upper() for k in "abcd"] == [True, False, True, True]
    assert len(cache) == 3


def test_cache_entries_expire_and_zero_ttl_is_not_stored() -> None:
    clock = FakeClock()
    cache = DNSCache(10, clock=clock)
    cache.put("k", "v", 5)
    cache.put("z", "v", 0)
    assert cache.get("k") == "v"
    assert cache.get("z") != "v"
    clock.now += 5
    assert cache.get("k") != "v"
    assert len(cache) == 0
    cache.put("k", "v", 1)
    cache.clear()
    assert len(cache) == 0


def test_cache_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_size"):
        DNSCache(0)


@given(
    size=st.integers(min_value=1, max_value=8),
    operations=st.lists(
        st.tuples(st.sampled_from(["put", "get", "tick"]), st.integers(0, 12), st.integers(0, 4)),
        max_size=60,
    ),
)
def test_cache_behaves_like_a_bounded_ttl_map(
    size: int, operations: list[tuple[str, int, int]]
) -> None:
    """The cache never exceeds its size and never returns an expired or evicted-then-wrong value."""
    clock = FakeClock()
    cache = DNSCache(size, clock=clock)
    model: dict[int, tuple[int, float]] = {}
    for operation, key, amount in operations:
        if operation == "put":
            cache.put(key, (key, clock.now), amount)
            if amount > 0:
                model[key] = (key, clock.now + amount)
        elif operation == "get":
            got = cache.get(key)
            if isinstance(got, tuple):
                # Anything returned is the latest value put, and still alive.
                assert key in model
                assert model[key][1] > clock.now
                assert got[0] == key
        else:
            clock.now += amount
        assert len(cache) <= size


# -- in-flight de-duplication --------------------------------------------------------------


def test_threads_asking_at_once_share_one_query(unbound: UnboundServer) -> None:
    # A name that times out, and no caching of failures: only de-duplication can save queries.
    name = "threads.timeout.test"
    resolver = unbound.resolver(timeout=0.5, failure_ttl=0)
    before = unbound.queries_for(name)
    barrier = threading.Barrier(100, timeout=10)
    errors: list[BaseException] = []

    def ask() -> None:
        barrier.wait()
        try:
            resolver.mail_hosts(name)
        except ResolverError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(100)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert not any(thread.is_alive() for thread in threads)
    assert len(errors) == 100
    assert all(isinstance(e, ResolverError) and e.is_transient for e in errors)
    assert unbound.queries_for(name) == before + 1


def test_tasks_asking_at_once_share_one_query(unbound: UnboundServer) -> None:
    name = "tasks.timeout.test"
    before = unbound.queries_for(name)

    async def ask_all() -> list[MailHosts | BaseException]:
        resolver = unbound.async_resolver(timeout=0.5, failure_ttl=0)
        return await asyncio.gather(
            *(resolver.mail_hosts(name) for _ in range(100)), return_exceptions=True
        )

    results = run(ask_all())
    assert all(isinstance(r, ResolverError) and r.is_transient for r in results)
    assert unbound.queries_for(name) == before + 1


def test_tasks_share_successful_lookups(unbound: UnboundServer) -> None:
    before = unbound.queries_for("dom20.test")

    async def ask_all() -> list[MailHosts]:
        resolver = unbound.async_resolver()
        return await asyncio.gather(*(resolver.mail_hosts("dom20.test") for _ in range(100)))

    results = run(ask_all())
    assert len({id(r) for r in results}) == 1  # one value, handed to every task
    assert unbound.queries_for("dom20.test") == before + 1


def test_a_cancelled_task_does_not_cancel_the_shared_lookup(unbound: UnboundServer) -> None:
    async def scenario() -> MailHosts:
        resolver = unbound.async_resolver()
        first = asyncio.ensure_future(resolver.mail_hosts("dom21.test"))
        second = asyncio.ensure_future(resolver.mail_hosts("dom21.test"))
        await asyncio.sleep(0)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        return await second

    assert run(scenario()).domain == "dom21.test"


def test_cached_mail_hosts_never_queries(unbound: UnboundServer) -> None:
    resolver = unbound.resolver()
    before = unbound.queries_for("dom30.test")
    assert resolver.cached_mail_hosts("dom30.test") is None
    assert unbound.queries_for("dom30.test") == before
    found = resolver.mail_hosts("dom30.test")
    assert resolver.cached_mail_hosts("DOM30.test.") == found
    with pytest.raises(ResolverError):
        resolver.mail_hosts("cached.refused.test")
    with pytest.raises(ResolverError, match="refused") as caught:
        resolver.cached_mail_hosts("cached.refused.test")
    assert caught.value.is_transient
    assert run(unbound.async_resolver(cache=resolver.cache).mail_hosts("dom30.test")) == found


def test_the_fixture_says_how_to_install_a_missing_unbound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(unbound_peer, "find_unbound", lambda: None)
    with pytest.raises(FileNotFoundError, match=r"apt-get install .*unbound"):
        unbound_peer.start_unbound(tmp_path)


@given(text=st.text(max_size=40))
def test_any_text_gives_mail_hosts_or_a_resolver_error(unbound: UnboundServer, text: str) -> None:
    resolver = unbound.resolver(timeout=0.5)
    found: MailHosts | ResolverError
    try:
        found = resolver.mail_hosts(text)
    except ResolverError as exc:
        found = exc
    if isinstance(found, ResolverError):
        # Only a name that cannot be asked is a permanent error; the zone never times out here.
        assert not found.is_transient
        assert "not a valid domain name" in str(found)
    else:
        assert found.domain.isascii()


# -- the plan stepper both resolvers drive their plans with -------------------------------------


def counting_plan(asks: int) -> Generator[int, str, list[str]]:
    """Asks ``asks`` numbered questions and returns the answers it got."""
    got = []
    for question in range(asks):
        got.append((yield question))
    return got


@pytest.mark.parametrize("asks", [1, 2, 4])
def test_steps_drive_a_plan_to_its_result(asks: int) -> None:
    steps = _Steps(counting_plan(asks), max_steps=4)
    asked = []
    while not steps.done:
        asked.append(steps.request)
        steps.answer(f"answer {steps.request}")
    assert asked == list(range(asks))
    assert steps.result == [f"answer {i}" for i in range(asks)]


@given(asks=st.integers(1, 10), bound=st.integers(1, 10))
def test_steps_refuse_a_plan_that_asks_more_than_its_bound(asks: int, bound: int) -> None:
    steps = _Steps(counting_plan(asks), max_steps=bound)
    if asks > bound:
        for _ in range(bound - 1):
            steps.answer("x")
        # The bound-th answer finds the plan asking yet again.
        with pytest.raises(AssertionError, match="too many steps"):
            steps.answer("x")
    else:
        for _ in range(asks):
            steps.answer("x")
        assert steps.done
        assert steps.result == ["x"] * asks


def test_threads_waiting_on_an_interrupted_lookup_ask_again_instead_of_sharing_it() -> None:
    # The thread that owns a shared lookup is interrupted (KeyboardInterrupt reaches the
    # main thread, SystemExit a thread that exits): that is its own business. A thread
    # waiting for the same name must not get the interruption; it asks again itself.
    from mailrelay.resolver import Resolver

    resolver = Resolver(["127.0.0.1"], port=9)  # never asked: both computations are given
    started, release = threading.Event(), threading.Event()

    def interrupted() -> tuple[object, float]:
        started.set()
        release.wait(10)
        raise KeyboardInterrupt

    answers: list[object] = []
    errors: list[BaseException] = []

    def owner() -> None:
        with contextlib.suppress(KeyboardInterrupt):
            resolver._fetch("key", interrupted)

    def waiter() -> None:
        try:
            answers.append(resolver._fetch("key", lambda: ("answer", 60.0)))
        except BaseException as exc:  # reported below, on the test's thread
            errors.append(exc)

    first = threading.Thread(target=owner)
    first.start()
    assert started.wait(10)
    second = threading.Thread(target=waiter)
    second.start()
    for _ in range(1000):  # bounded: until the waiter waits on the owner's lookup
        if second.is_alive() and resolver._inflight:
            break
        threading.Event().wait(0.001)
    threading.Event().wait(0.05)
    release.set()
    first.join(10)
    second.join(10)
    assert not first.is_alive()
    assert not second.is_alive()
    assert errors == []
    assert answers == ["answer"]
    assert resolver._fetch("key", lambda: ("never", 60.0)) == "answer"  # cached


# -- TXT records ---------------------------------------------------------------------------

TXT_CASES = [
    # A record longer than one string (RFC 1035 §3.3.14): its strings are joined.
    ("sel-rsa._domainkey.dkim.test", (unbound_peer.DKIM_RSA_2048,)),
    ("SEL-ED._domainkey.DKIM.test.", (unbound_peer.DKIM_ED25519,)),
    ("_mta-sts.twotxt.sts.test", ("v=STSv1; id=first1", "v=STSv1; id=second2")),
    ("mailrelay.test", ()),  # the name exists, with no TXT (NODATA)
    ("no-such-name.mailrelay.test", ()),  # NXDOMAIN
]


@pytest.mark.parametrize(("name", "expected"), TXT_CASES)
def test_txt(unbound: UnboundServer, name: str, expected: tuple[str, ...]) -> None:
    assert sorted(unbound.resolver().txt(name)) == sorted(expected)
    assert sorted(run(unbound.async_resolver().txt(name))) == sorted(expected)


def test_txt_answers_are_cached(unbound: UnboundServer) -> None:
    resolver = unbound.resolver()
    name = "_mta-sts.enforce.sts.test"
    before = unbound.queries_for(name)
    assert resolver.txt(name) == ("v=STSv1; id=enforce1",)
    assert resolver.txt(name.upper()) == ("v=STSv1; id=enforce1",)
    assert unbound.queries_for(name) == before + 1


@pytest.mark.parametrize(
    ("name", "status"),
    [
        (f"x.{unbound_peer.TIMEOUT_ZONE}", "timeout"),
        (f"x.{unbound_peer.SERVFAIL_ZONE}", "servfail"),
        (f"x.{unbound_peer.REFUSED_ZONE}", "refused"),
    ],
)
def test_txt_trouble_is_a_transient_error(unbound: UnboundServer, name: str, status: str) -> None:
    with pytest.raises(ResolverError, match=rf"TXT lookup .*\({status}\)") as caught:
        unbound.resolver(timeout=0.5).txt(name)
    assert caught.value.is_transient
    with pytest.raises(ResolverError, match=rf"\({status}\)"):
        run(unbound.async_resolver(timeout=0.5).txt(name))


@pytest.mark.parametrize("name", ["", "a..test", "a b.test", "x" * 64 + ".test"])
def test_txt_refuses_invalid_names(unbound: UnboundServer, name: str) -> None:
    with pytest.raises(ResolverError, match="not a valid domain name") as caught:
        unbound.resolver().txt(name)
    assert not caught.value.is_transient
