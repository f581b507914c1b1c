"""A signed TLSA RRset holding a digest of the wrong length beside a valid record (RFC 7672).

``_25._tcp.mx-short.dane.test`` in the validating unbound of :mod:`tests.peers.dnssec` holds a
``3 1 2`` record of the test certificate and a ``3 1 1`` record whose "SHA-256" is 31 octets
(:func:`tests.peers.dnssec.short_digest_rdata`, added to the zone as raw RDATA before it is
signed). dnspython refuses the whole answer for that record; RFC 7671 §4 / RFC 7672 §2.1.1
make it *unusable*, ignored beside the usable one. Both resolvers must hand over both
records, validated; both MX transports must deliver, authenticated by the valid one.
"""

from __future__ import annotations

from typing import Any

import pytest

from mailrelay.mailhosts import DNSStatus, TLSARecords
from mailrelay.resolver import AsyncResolver
from mailrelay.transport.dane import is_usable
from tests.peers.dnssec import SIGNED, DNSSECServer, short_digest_rdata, tlsa_data
from tests.transport.helpers import FLAVOURS, Flavour, run
from tests.transport.test_dane import (  # the fixtures of the DANE tests, shared
    FIRST,
    World,
    chains,  # noqa: F401
    dnssec,  # noqa: F401
    mx_server,  # noqa: F401
    smtp_port,  # noqa: F401
    world,  # noqa: F401
)

pytestmark = pytest.mark.unbound


def tlsa(flavour: Flavour, server: DNSSECServer, host: str) -> TLSARecords:
    if flavour == "sync":
        return server.resolver().tlsa(host)

    async def main() -> Any:
        resolver: AsyncResolver = server.async_resolver()
        return await resolver.tlsa(host)

    result = run(main())
    assert isinstance(result, TLSARecords)
    return result


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_both_records_arrive_validated(flavour: Flavour, world: World) -> None:  # noqa: F811
    found = tlsa(flavour, world.dnssec, f"mx-short.{SIGNED}")
    assert found.status is DNSStatus.OK
    assert found.secure
    short = short_digest_rdata(world.dnssec.certs)
    valid = tlsa_data(3, 1, 2, world.dnssec.certs.leaf)
    assert sorted(str(record) for record in found.records) == sorted(
        [valid, f"{short[0]} {short[1]} {short[2]} {short[3:].hex()}"]
    )
    assert [is_usable(record) for record in found.records if len(record.data) == 31] == [False]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_mail_is_delivered_by_the_valid_record(
    flavour: Flavour,
    world: World,  # noqa: F811 (the fixture imported above)
) -> None:
    handler = world.server(FIRST, "leaf")
    result = world.deliver(flavour, f"short.{SIGNED}")
    assert result.ok, result.recipients
    [received] = handler.messages
    assert received.tls
