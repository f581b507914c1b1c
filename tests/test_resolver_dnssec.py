"""DNSSEC-aware lookups (the AD bit, RFC 6840 §5.7) and TLSA records (RFC 6698 §3), against a
real validating resolver (:mod:`tests.peers.dnssec`) and the unsigned test zone's unbound."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.errors import ResolverError
from mailrelay.mailhosts import DNSStatus, MailHosts, TLSARecords
from mailrelay.resolver import AsyncResolver, Resolver, _tlsa_name
from tests.peers.dnssec import (
    INSECURE,
    SIGNED,
    DNSSECServer,
    serve_dnssec,
    tlsa_data,
)
from tests.peers.tls import TLSFiles
from tests.peers.unbound import UnboundServer
from tests.transport.helpers import FLAVOURS, Flavour, run

pytestmark = pytest.mark.unbound


@pytest.fixture(scope="module")
def dnssec(tls_files: TLSFiles) -> Iterator[DNSSECServer]:
    """The validating resolver serving the signed test zone (tests.peers.dnssec)."""
    yield from serve_dnssec(tls_files)


def ask(flavour: Flavour, server: UnboundServer, method: str, *args: Any) -> Any:
    """Call ``method`` on a fresh resolver of ``flavour`` asking ``server``."""
    if flavour == "sync":
        return getattr(server.resolver(), method)(*args)

    async def main() -> Any:
        resolver: AsyncResolver = server.async_resolver()
        return await getattr(resolver, method)(*args)

    return run(main())


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize(
    ("domain", "secure"),
    [(f"ee.{SIGNED}", True), (f"failover.{SIGNED}", True), (f"plain.{INSECURE}", False)],
)
def test_mail_hosts_say_whether_they_were_validated(
    flavour: Flavour, dnssec: DNSSECServer, domain: str, secure: bool
) -> None:
    found: MailHosts = ask(flavour, dnssec, "mail_hosts", domain)
    assert found.status is DNSStatus.OK
    assert found.hosts
    assert found.secure is secure
    assert all(host.secure is secure for host in found.hosts)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_resolver_that_does_not_validate_gives_nothing_secure(
    flavour: Flavour, unbound: UnboundServer
) -> None:
    found: MailHosts = ask(flavour, unbound, "mail_hosts", "mx2.test")
    assert found.hosts
    assert not found.secure
    assert not any(host.secure for host in found.hosts)
    assert not ask(flavour, unbound, "addresses", "mx.mailrelay.test").secure


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_addresses_say_whether_they_were_validated(flavour: Flavour, dnssec: DNSSECServer) -> None:
    assert ask(flavour, dnssec, "addresses", f"mx-ee.{SIGNED}").secure
    assert not ask(flavour, dnssec, "addresses", f"mx.{INSECURE}").secure


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_tlsa_records_of_a_signed_zone_are_secure(flavour: Flavour, dnssec: DNSSECServer) -> None:
    found: TLSARecords = ask(flavour, dnssec, "tlsa", f"mx-ee.{SIGNED}")
    assert found.name == f"_25._tcp.mx-ee.{SIGNED}"
    assert found.status is DNSStatus.OK
    assert found.secure
    [record] = found.records
    assert str(record) == tlsa_data(3, 1, 1, dnssec.certs.leaf)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_several_tlsa_records_come_back(flavour: Flavour, dnssec: DNSSECServer) -> None:
    found: TLSARecords = ask(flavour, dnssec, "tlsa", f"mx-ee312.{SIGNED}")
    assert found.secure
    assert sorted(str(r) for r in found.records) == sorted(
        [tlsa_data(3, 1, 2, dnssec.certs.leaf), tlsa_data(3, 1, 1, dnssec.certs.other)]
    )


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_secure_denial_is_no_records_and_secure(flavour: Flavour, dnssec: DNSSECServer) -> None:
    found: TLSARecords = ask(flavour, dnssec, "tlsa", f"mx-notlsa.{SIGNED}")
    assert found.records == ()
    assert found.status in (DNSStatus.NXDOMAIN, DNSStatus.NODATA)
    assert found.secure


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_tlsa_records_of_an_unsigned_zone_are_insecure(
    flavour: Flavour, dnssec: DNSSECServer
) -> None:
    found: TLSARecords = ask(flavour, dnssec, "tlsa", f"mx.{INSECURE}")
    assert found.records
    assert not found.secure


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_bogus_tlsa_rrset_is_a_transient_failure(flavour: Flavour, dnssec: DNSSECServer) -> None:
    # RFC 4035 §5.5: the validating resolver answers SERVFAIL; RFC 7672 §2.1.1: that is not
    # "no records".
    with pytest.raises(ResolverError, match="servfail") as caught:
        ask(flavour, dnssec, "tlsa", f"mx-bogus.{SIGNED}")
    assert caught.value.is_transient


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_tlsa_names_other_ports(flavour: Flavour, dnssec: DNSSECServer) -> None:
    found: TLSARecords = ask(flavour, dnssec, "tlsa", f"mx-ee.{SIGNED}", 465)
    assert found.name == f"_465._tcp.mx-ee.{SIGNED}"
    assert found.records == ()


@pytest.mark.parametrize("port", [0, 65536, -1, True])
def test_tlsa_refuses_what_is_not_a_port(port: int) -> None:
    with pytest.raises(ValueError, match="port"):
        Resolver(nameservers=["127.0.0.1"]).tlsa("mx.example", port)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_tlsa_many_answers_each_host_in_order(flavour: Flavour, dnssec: DNSSECServer) -> None:
    hosts = [
        f"mx-ee.{SIGNED}",
        f"mx-bogus.{SIGNED}",
        "not a host name",
        f"mx-notlsa.{SIGNED}",
        f"mx.{INSECURE}",
    ]
    found = ask(flavour, dnssec, "tlsa_many", hosts)
    assert len(found) == len(hosts)
    assert isinstance(found[0], TLSARecords)
    assert found[0].secure
    assert found[0].records
    assert isinstance(found[1], ResolverError)
    assert found[1].is_transient
    assert isinstance(found[2], ResolverError)
    assert not found[2].is_transient
    assert isinstance(found[3], TLSARecords)
    assert found[3].secure
    assert not found[3].records
    assert isinstance(found[4], TLSARecords)
    assert not found[4].secure
    assert found[0] == ask(flavour, dnssec, "tlsa", hosts[0])


def test_tlsa_answers_are_cached(dnssec: DNSSECServer) -> None:
    resolver = dnssec.resolver()
    first = resolver.tlsa(f"mx-ee.{SIGNED}")
    cached = len(resolver.cache)
    assert cached >= 1
    # The second lookup is served from the cache: asking a closed port would time out.
    closed = Resolver(nameservers=[dnssec.host], port=9, timeout=0.5, cache=resolver.cache)
    assert closed.tlsa(f"mx-ee.{SIGNED}") == first
    assert len(resolver.cache) == cached


@given(st.from_regex(r"[a-z]{1,10}(\.[a-z]{1,10}){1,3}", fullmatch=True), st.integers(1, 65535))
def test_tlsa_owner_names_follow_rfc_6698(host: str, port: int) -> None:
    assert _tlsa_name(host, port) == f"_{port}._tcp.{host}"
