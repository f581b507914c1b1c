"""Properties: no exchanger, however broken, can make a callout hang, raise, deliver, or
report a verdict the server never gave.

The exchangers of one domain (two or three, on 127.0.0.2-4, resolved by the hostile DNS
test server) are hostile SMTP servers whose answer to each command Hypothesis draws (the
plans of ``tests/transport/test_hostile_properties.py``), or down. For every draw,
``Callout.probe_many`` / ``AsyncCallout.probe_many`` (module docstring of
:mod:`mailrelay.callout`):

1. ends within a bound derived from the timeouts and what the servers saw (a hang guard,
   not a speed test) and raises nothing;
2. gives one result per address, in order, for that address;
3. says ACCEPTED only for an address some exchanger answered 2xx at RCPT, and REFUSED only
   for one some exchanger answered 5xx at RCPT, with that reply's code (a callout never
   guesses: everything else is UNKNOWN);
4. never sends a message: no exchanger took any data.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mailrelay.callout import AsyncCallout, Callout, CalloutResult, CalloutStatus
from mailrelay.options import TLS
from mailrelay.resolver import AsyncResolver, Resolver
from tests.peers.hostile_dns import HostileDNS
from tests.transport.hostile_server import HostileServer, Plan
from tests.transport.test_hostile_lmtp_mx import (
    MX_RECIPIENTS,
    call_exchangers,
    describe_all,
    dns_server,
    mx_setups,
)
from tests.transport.test_hostile_properties import (
    TIMEOUTS,
    Flavour,
)

__all__ = ["dns_server"]  # the fixture, imported for pytest

EXAMPLES = settings(
    max_examples=int(os.environ.get("HOSTILE_CALLOUT_EXAMPLES", "30")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def probe(flavour: Flavour, dns: HostileDNS, port: int, addresses: list[str]) -> Any:
    """The callout's results for ``addresses``, blocking or asyncio."""
    common: dict[str, Any] = {
        "port": port,
        "tls": TLS.NONE,
        "timeouts": TIMEOUTS,
        "local_hostname": "probe.example",
        "sender": "probe@client.example",
    }
    if flavour == "sync":
        resolver = Resolver(["127.0.0.1"], port=dns.port, timeout=2.0)
        return Callout(resolver, **common, refused_networks=()).probe_many(addresses)

    async def main() -> list[CalloutResult]:
        resolver = AsyncResolver(["127.0.0.1"], port=dns.port, timeout=2.0)
        return await AsyncCallout(resolver, **common, refused_networks=()).probe_many(addresses)

    return asyncio.run(main())


def rcpt_codes(servers: list[HostileServer | None], address: str) -> set[int]:
    """Every code any exchanger gave a RCPT for ``address``."""
    return {
        code
        for server in servers
        if server is not None
        for connection in server.connections
        for transaction in connection.transactions
        for forward, code in transaction.recipients
        if code is not None and forward.lower() == address.lower()
    }


@given(
    flavour=st.sampled_from(["sync", "async"]),
    setup=mx_setups(),
    addresses=st.lists(st.sampled_from(MX_RECIPIENTS), min_size=1, max_size=3, unique=True),
)
@EXAMPLES
def test_a_callout_never_hangs_raises_sends_or_guesses(
    dns_server: HostileDNS,
    flavour: Flavour,
    setup: list[Plan | None],
    addresses: list[str],
) -> None:
    outcome, _port, servers = call_exchangers(
        dns_server, setup, lambda port: probe(flavour, dns_server, port, addresses), 1
    )
    for server in servers:
        for connection in server.connections if server is not None else []:
            for transaction in connection.transactions:
                assert not transaction.content, f"data sent:\n{describe_all(servers)}"
    results: list[CalloutResult] = outcome.value
    assert [str(r.address) for r in results] == addresses
    for address, result in zip(addresses, results, strict=True):
        codes = rcpt_codes(servers, address)
        where = f"{address}: {result}\n{describe_all(servers)}"
        event(f"status: {result.status.value}")
        if result.status is CalloutStatus.ACCEPTED:
            assert result.reply is not None, where
            assert 200 <= result.reply.code < 300, where
            assert result.reply.code in codes, where
        elif result.status is CalloutStatus.REFUSED:
            assert result.reply is not None, where
            assert 500 <= result.reply.code < 600, where
            assert result.reply.code in codes, where
