"""The callout through a proxy that fails about itself: the proxy is asked once per call, not
once per exchanger. A dead proxy (``ProxyError.proxy_unreachable``) or one that refuses our
login (``ProxyError.proxy_unusable``) fails every further exchanger at once, for every domain
of a ``probe_many`` call, as MX delivery does within one message; the results are
``UNKNOWN`` with the proxy's error. A proxy's failure about one exchanger still moves on."""

from __future__ import annotations

import random
import socket
from collections.abc import Callable
from typing import Any

import pytest

from mailrelay.callout import AsyncCallout, Callout, CalloutResult, CalloutStatus
from mailrelay.errors import ProxyError
from mailrelay.options import TLS, Timeouts
from mailrelay.resolver import DNSStatus, MailHost, MailHosts
from mailrelay.transport import async_driver, sync_driver
from mailrelay.transport.mx_plan import Target, Unreachable
from tests.peers.proxies import FakeFactory, ProxyFactory
from tests.peers.unbound import UnboundServer
from tests.test_callout import PEOPLE, prober
from tests.transport.helpers import FLAVOURS, Flavour, run
from tests.transport.test_mx import free_everywhere, port  # noqa: F401 -- fixtures
from tests.transport.test_mx_proxy_login import counted, start_proxy

EHLO_NAME = "probe.mailrelay.test"
FAST = Timeouts.all(3)
#: samepref.test has four exchangers (127.0.0.1, .4, .5, .6), failover.test two (.3, .1).
ADDRESSES = ["bob@samepref.test", "carol@failover.test"]
TARGETS = {"bob@samepref.test": 4, "carol@failover.test": 2}
REFUSED = "the proxy refused our user name and password"
NOT_TRIED = "not tried, the proxy failed"


def probe_many(
    flavour: Flavour,
    unbound: UnboundServer,
    exchanger_port: int,
    proxy_url: str,
    after_first: Callable[[], None] = lambda: None,
) -> list[list[CalloutResult]]:
    """Two ``probe_many(ADDRESSES)`` calls on one callout (``after_first`` between them)."""
    options: dict[str, Any] = {
        "port": exchanger_port,
        "timeouts": FAST,
        "tls": TLS.NONE,
        "refused_networks": (),
        "local_hostname": EHLO_NAME,
        "proxy": proxy_url,
        "max_addresses": 4,  # every exchanger of samepref.test
        "random": random.Random(1),
    }
    if flavour == "sync":
        prober = Callout(unbound.resolver(timeout=1.0), **options)
        first = prober.probe_many(ADDRESSES)
        after_first()
        return [first, prober.probe_many(ADDRESSES)]

    async def main() -> list[list[CalloutResult]]:
        prober = AsyncCallout(unbound.async_resolver(timeout=1.0), **options)
        first = await prober.probe_many(ADDRESSES)
        after_first()
        return [first, await prober.probe_many(ADDRESSES)]

    return run(main())


def check_all_unknown(results: list[CalloutResult], error: str) -> None:
    """Every exchanger of every domain reported with ``error``, one tried in all."""
    assert [str(r.address) for r in results] == ADDRESSES
    for result in results:
        assert result.status is CalloutStatus.UNKNOWN, result
        assert result.host is None, result
        detail = result.detail
        assert detail.startswith("no exchanger answered: "), detail
        assert detail.count(error) == TARGETS[str(result.address)], detail
        assert "s3cret" not in detail, detail
        assert "wrong" not in detail, detail
    # The first exchanger of the first domain was tried; the five others were not.
    tried = TARGETS[ADDRESSES[0]] - 1 + TARGETS[ADDRESSES[1]]
    assert sum(r.detail.count(NOT_TRIED) for r in results) == tried, results


@pytest.mark.parametrize("kind", ["socks5", "http"])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_refused_login_is_asked_once_per_call(  # noqa: PLR0917 -- fixtures
    flavour: Flavour,
    kind: str,
    unbound: UnboundServer,
    port: int,  # noqa: F811
    make_proxy: ProxyFactory,
    make_fake_proxy: FakeFactory,
) -> None:
    """Six exchangers over two domains, a wrong password (microsocks, tinyproxy): the first
    exchanger's refusal is every other one's, and the proxy is asked once per call (the
    memory is the call's: the next call asks again)."""
    real = start_proxy(kind, make_proxy, port)
    fake = counted(make_fake_proxy, real)

    def asked_once() -> None:
        assert len(fake.received) == 1, fake.received

    url = fake.url(kind, login="mx:wrong@")
    for results in probe_many(flavour, unbound, port, url, asked_once):
        check_all_unknown(results, REFUSED)
    assert len(fake.received) == 2, fake.received


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_dead_proxy_is_tried_once_not_once_per_exchanger(
    flavour: Flavour,
    unbound: UnboundServer,
    port: int,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Through a proxy nobody listens on, each exchanger would wait out its own connect
    timeout (refused at once here, on loopback): the drivers' connect is called once."""
    calls: list[str] = []
    if flavour == "sync":
        real_connect = sync_driver.connect

        def connect(host: str, port: int, **options: Any) -> sync_driver.SyncDriver:
            calls.append(host)
            return real_connect(host, port, **options)

        monkeypatch.setattr(sync_driver, "connect", connect)
    else:
        real_aconnect = async_driver.connect

        async def aconnect(host: str, port: int, **options: Any) -> async_driver.AsyncDriver:
            calls.append(host)
            return await real_aconnect(host, port, **options)

        monkeypatch.setattr(async_driver, "connect", aconnect)

    def connected_once() -> None:
        # One of samepref.test's three preference-10 exchangers (shuffled), and no other.
        assert len(calls) == 1, calls
        assert calls[0] in {"127.0.0.1", "127.0.0.4", "127.0.0.5"}, calls

    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    try:
        url = f"socks5://127.0.0.1:{dead.getsockname()[1]}"
        both = probe_many(flavour, unbound, port, url, connected_once)
    finally:
        dead.close()
    for results in both:
        check_all_unknown(results, "could not reach proxy")
    assert len(calls) == 2, calls


# -- the plan's rule ---------------------------------------------------------------------------

HOSTS = [Target(name=f"mx{i}.example.com", address=f"192.0.2.{i}", port=25) for i in (1, 2, 3)]
THREE_HOSTS = MailHosts(
    domain="example.com",
    status=DNSStatus.OK,
    hosts=tuple(
        MailHost(name=t.name, status=DNSStatus.OK, ipv4=(t.address,), preference=10 * i)
        for i, t in enumerate(HOSTS, 1)
    ),
)
FORBIDDEN = ProxyError("the proxy's rules forbid 192.0.2.1:25", is_transient=False)
LOGIN_REFUSED = ProxyError("the proxy refused our login", is_transient=False, proxy_unusable=True)


def test_a_failure_about_one_exchanger_moves_on_one_about_the_proxy_stops() -> None:
    """The proxy forbids the first exchanger (move on), refuses our login for the second
    (no other exchanger can be reached through it): the third is not tried, and the same
    call's next domain tries none."""
    unreachable = Unreachable()
    plan = prober(TLS.NONE)._plan("example.com", THREE_HOSTS, PEOPLE, unreachable)
    asked = [next(plan)]
    asked.append(plan.send(FORBIDDEN))
    with pytest.raises(StopIteration) as done:
        plan.send(LOGIN_REFUSED)
    assert [target for target, _ in asked] == HOSTS[:2]
    expected = (
        "no exchanger answered: mx1.example.com[192.0.2.1]:25: the proxy's rules forbid "
        "192.0.2.1:25; mx2.example.com[192.0.2.2]:25: the proxy refused our login; "
        "mx3.example.com[192.0.2.3]:25: not tried, the proxy failed: the proxy refused our login"
    )
    results: list[CalloutResult] = done.value.value
    assert [(r.status, r.detail) for r in results] == [(CalloutStatus.UNKNOWN, expected)] * 2

    again = prober(TLS.NONE)._plan("example.com", THREE_HOSTS, PEOPLE, unreachable)
    with pytest.raises(StopIteration) as skipped:
        next(again)
    assert {r.detail.count("not tried") for r in skipped.value.value} == {3}
