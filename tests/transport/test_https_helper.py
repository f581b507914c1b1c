"""The outbound HTTPS of MTA-STS fetches and TLS-RPT POSTs (mailrelay.transport._https).

Name resolution counts against the fetch's or the POST's deadline: a resolver that never
answers must not hold the call past its timeout. Nothing here leaves the machine: the
resolvers are stand-ins and every connection attempt is refused by the test.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import functools
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailrelay.errors import PolicyFetchError, ReportError, ResolverError
from mailrelay.mailhosts import HostAddresses
from mailrelay.resolver import AsyncResolver, Resolver
from mailrelay.transport import _https
from mailrelay.transport.mtasts import MTASTS, AsyncMTASTS, fetch_policy
from mailrelay.transport.tlsrpt import TLSReport, apost_report, post_report
from tests.transport.helpers import FLAVOURS, Flavour, run

_START = _dt.datetime(2026, 1, 1, tzinfo=_dt.UTC)
_END = _START + _dt.timedelta(days=1)

# The call's timeout, and how long the stand-in resolver would block (it is released when
# the test ends). A call that waits for the resolver takes HOLD; one that keeps its
# deadline returns soon after TIMEOUT. The bound is generous: it tells a hang from a
# return, it measures no speed.
TIMEOUT = 0.3
HOLD = 5.0
HANG_BOUND = 2.0


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """Set when the test ends: a resolution still blocked then gives up."""
    event = threading.Event()
    yield event
    event.set()


@pytest.fixture
def tried(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every connection attempt, recorded and refused (none leaves the test)."""
    attempts: list[tuple[str, int]] = []

    def refuse(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        attempts.append((str(address[0]), int(address[1])))
        raise ConnectionRefusedError("refused by the test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


def _report() -> TLSReport:
    return TLSReport(
        organization_name="Org", start=_START, end=_END, contact_info="tls@example.org",
        report_id="r1", policy_domain="example.com",
    )  # fmt: skip


def _post(flavour: Flavour, url: str, **kwargs: Any) -> int:
    if flavour == "sync":
        return post_report(_report(), url, **kwargs)
    return run(apost_report(_report(), url, **kwargs))


# -- TLS-RPT: the rua host's name is resolved within the POST's timeout --------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_post_whose_host_never_resolves_ends_at_its_timeout(
    flavour: Flavour,
    release: threading.Event,
    tried: list[tuple[str, int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[str] = []

    def slow_getaddrinfo(host: str, *args: Any, **kwargs: Any) -> list[Any]:
        asked.append(host)
        release.wait(HOLD)  # the system's resolver, stuck on an unanswering server
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", slow_getaddrinfo)
    url = "https://reports.example.com/tlsrpt"
    started = time.monotonic()
    with pytest.raises(ReportError, match="timed out") as caught:
        _post(flavour, url, timeout=TIMEOUT)
    assert time.monotonic() - started < HANG_BOUND
    assert asked == ["reports.example.com"]
    assert tried == []
    assert "reports.example.com" in str(caught.value)


# -- MTA-STS: the policy host's addresses are looked up within the fetch's timeout ---------------


class FailureLog:
    """A ``tls_reporter`` that keeps the failed fetches it is told about."""

    def __init__(self) -> None:
        self.errors: list[tuple[str, PolicyFetchError]] = []

    def sts_policy_failure(self, domain: str, error: PolicyFetchError) -> None:
        self.errors.append((domain, error))


_RECORD = ("v=STSv1; id=slow1",)


class SlowResolver(Resolver):
    """Finds the ``_mta-sts`` record at once; the policy host's addresses, never."""

    def __init__(self, release: threading.Event) -> None:
        super().__init__(nameservers=["127.0.0.1"], timeout=1.0)
        self.release = release
        self.asked: list[str] = []

    def txt(self, name: str) -> tuple[str, ...]:
        return _RECORD

    def addresses(self, host: str) -> HostAddresses:
        self.asked.append(host)
        self.release.wait(HOLD)
        raise ResolverError(f"{host}: no answer", name=host)


class SlowAsyncResolver(AsyncResolver):
    """:class:`SlowResolver` for asyncio."""

    def __init__(self) -> None:
        super().__init__(nameservers=["127.0.0.1"], timeout=1.0)
        self.asked: list[str] = []

    async def txt(self, name: str) -> tuple[str, ...]:
        return _RECORD

    async def addresses(self, host: str) -> HostAddresses:
        self.asked.append(host)
        await asyncio.sleep(HOLD)
        raise ResolverError(f"{host}: no answer", name=host)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_fetch_whose_policy_host_never_resolves_ends_at_its_timeout(
    flavour: Flavour, release: threading.Event, tried: list[tuple[str, int]]
) -> None:
    failures = FailureLog()
    options: dict[str, Any] = {"timeout": TIMEOUT, "tls_reporter": failures}
    started = time.monotonic()
    if flavour == "sync":
        resolver = SlowResolver(release)
        answer = MTASTS(resolver, **options)("example.com")
    else:
        aresolver = SlowAsyncResolver()
        answer = run(AsyncMTASTS(aresolver, **options)("example.com"))
    assert time.monotonic() - started < HANG_BOUND
    assert answer is None  # no policy: the transport's defaults
    asked = resolver.asked if flavour == "sync" else aresolver.asked
    assert asked == ["mta-sts.example.com"]
    assert tried == []
    # The failed fetch is one like any other: reported (RFC 8460 §4.3.2.2).
    [(domain, error)] = failures.errors
    assert domain == "example.com"
    assert "mta-sts.example.com" in str(error)
    assert "timed out" in str(error)


# -- the resolution pool ----------------------------------------------------------------------


def _fails() -> object:
    raise ResolverError("no such name", name="x.test", is_transient=False)


@pytest.mark.parametrize(
    ("lookup", "outcome"),
    [
        (lambda: ("192.0.2.1",), ("192.0.2.1",)),
        (lambda: (), ()),
        (_fails, ResolverError("no such name", name="x.test", is_transient=False)),
        (lambda: socket.getaddrinfo, socket.getaddrinfo),  # any value, handed back as it is
    ],
)
def test_resolve_before_hands_back_what_the_lookup_gives(lookup: Any, outcome: object) -> None:
    deadline = time.monotonic() + HOLD
    if isinstance(outcome, Exception):
        with pytest.raises(type(outcome)) as caught:
            _https.resolve_before(deadline, lookup)
        assert caught.value == outcome
    else:
        assert _https.resolve_before(deadline, lookup) == outcome


@pytest.mark.parametrize("left", [0.0, -1.0])
def test_resolve_before_a_deadline_passed_runs_nothing(left: float) -> None:
    ran: list[bool] = []
    with pytest.raises(TimeoutError):
        _https.resolve_before(time.monotonic() + left, lambda: ran.append(True))
    assert ran == []


def _resolver_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("mailrelay-https-resolve")]


def test_blocked_lookups_hold_at_most_the_pools_threads(release: threading.Event) -> None:
    # More callers than threads, each stuck on a resolver that never answers: every one
    # returns at its own deadline, the pool does not grow, and the lookups that never got
    # a thread are dropped when their callers give up (they never run).
    started: list[int] = []

    def stuck(index: int) -> object:
        started.append(index)
        release.wait(HOLD)
        return None

    callers = _https.RESOLVER_THREADS + 3
    for index in range(callers):
        began = time.monotonic()
        with pytest.raises(TimeoutError):
            _https.resolve_before(time.monotonic() + 0.1, functools.partial(stuck, index))
        assert time.monotonic() - began < HANG_BOUND
    assert len(_resolver_threads()) <= _https.RESOLVER_THREADS
    assert len(started) <= _https.RESOLVER_THREADS
    release.set()  # the stuck lookups finish in the background
    # Once a thread is free again, lookups are answered; the dropped ones stay dropped.
    assert _https.resolve_before(time.monotonic() + HOLD, lambda: "answered") == "answered"
    assert len(started) <= _https.RESOLVER_THREADS
    assert all(t.daemon for t in _resolver_threads())


# -- property: connections go to the checked addresses only --------------------------------------

_PUBLIC = ("93.184.216.34", "2606:2800:220:1::1", "1.1.1.1", "2001:4860:4860::8888")
_PRIVATE = ("127.0.0.1", "10.0.0.1", "169.254.169.254", "fd00::1", "::ffff:192.168.0.1")
_CONTEXT = ssl.create_default_context()  # never used: no connection is made


def _reach(what: str, addresses: list[str]) -> object:
    if what == "mta-sts fetch":
        return fetch_policy("example.com", addresses, port=443, context=_CONTEXT, timeout=HOLD)
    return post_report(_report(), "https://reports.example.com/x", timeout=HOLD)


@settings(max_examples=40)
@given(
    addresses=st.lists(st.sampled_from(_PUBLIC + _PRIVATE), min_size=1, max_size=6),
    what=st.sampled_from(["mta-sts fetch", "tls-rpt post"]),
)
def test_connections_go_only_to_checked_public_addresses(addresses: list[str], what: str) -> None:
    # Whatever the DNS answers, either the name is refused before any connection (naming
    # every address that is not public) or exactly its addresses are tried, in order.
    tried: list[str] = []

    def refuse(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        tried.append(str(address[0]))
        raise ConnectionRefusedError("refused by the test")

    def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
            for a in addresses
        ]

    private = [a for a in addresses if a in _PRIVATE]
    error: type[Exception] = PolicyFetchError if what == "mta-sts fetch" else ReportError
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket, "create_connection", refuse)
        patch.setattr(socket, "getaddrinfo", getaddrinfo)
        with pytest.raises(error) as caught:
            _reach(what, addresses)
    text = str(caught.value)
    if private:
        assert tried == []
        assert "not a public address" in text
        for address in private:
            assert address in text
        assert all(a not in text for a in addresses if a not in private)
    else:
        assert "ConnectionRefusedError" in text
        # A fetch tries each address it was given; a POST each one the system resolver
        # gave, once (its answer's repeats are dropped).
        expected = addresses if what == "mta-sts fetch" else list(dict.fromkeys(addresses))
        assert tried == expected
