"""A validating DNS resolver for the DANE tests: a second unbound, with a zone signed here.

Rules of this module:

- It is separate from :mod:`tests.peers.unbound` (whose unsigned ``local-data`` zone the other
  tests use and which must not change): its own process, configuration directory and free
  loopback port, stopped by its own PID (:class:`~tests.peers.unbound.UnboundServer`).
- At set-up the zone :data:`SIGNED` is built from the test certificates (its TLSA records are
  digests of them), signed with dnspython (``dns.dnssec.sign_zone``, one ECDSA P-256 key
  with the SEP flag made with ``cryptography``), written as a zone file and served with
  unbound's ``auth-zone:`` (``for-upstream: yes``, ``for-downstream: no``): unbound's
  iterator reads it as if from an authoritative server, and its validator checks it against
  the ``trust-anchor:`` for that key. Validated answers carry the AD bit (RFC 4035 §3.2.3).
- :data:`INSECURE` is an unsigned auth-zone no trust anchor covers (unbound has no root
  anchor here): its answers are insecure, without AD, never SERVFAIL.
- In the signed zone, ``_25._tcp.mx-bogus`` has TLSA data, and ``bogusmx`` an MX record,
  that do not match their signatures: unbound finds those RRsets bogus and answers SERVFAIL
  (RFC 4035 §5.5).
- Nothing leaves the machine: ``"."`` is a static local zone (every other name is
  NXDOMAIN) and the two test zones are ``transparent`` holes in it.

:func:`serve_dnssec` starts one and stops it; the test modules that need it wrap it in a
module fixture named ``dnssec`` (it gives a :class:`DNSSECServer`).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
import ssl
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import dns.dnssec
import dns.dnssectypes
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.zone
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from mailrelay.resolver import AsyncResolver, Resolver
from tests.peers.https_policy import issue_certificate
from tests.peers.tls import TLSFiles
from tests.peers.unbound import (
    HOST,
    INSTALL_HINT,
    UnboundServer,
    find_unbound,
    launch,
    server_lines,
)

SIGNED = "dane.test"
INSECURE = "insecure.test"
TTL = 300
#: The second loopback address some exchangers use (a domain's two exchangers must have
#: different addresses: MX delivery never tries one address twice).
SECOND = "127.0.0.2"
#: The name the DANE-TA certificate (:attr:`DNSSECServer.ta_cert`) is issued for.
TA_HOST = f"mx-ta.{SIGNED}"

_START_TIMEOUT = 10.0


def _pem_to_der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


def spki_of(cert_der: bytes) -> bytes:
    """The SubjectPublicKeyInfo of a DER certificate (with ``cryptography``: test-only)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_der_x509_certificate(cert_der)
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def tlsa_data(usage: int, selector: int, mtype: int, cert_der: bytes) -> str:
    """The presentation form of a TLSA record for ``cert_der`` (RFC 6698 §2.1, §2.2)."""
    content = cert_der if selector == 0 else spki_of(cert_der)
    if mtype == 1:
        content = hashlib.sha256(content).digest()
    elif mtype == 2:
        content = hashlib.sha512(content).digest()
    return f"{usage} {selector} {mtype} {content.hex()}"


@attrs.frozen(kw_only=True)
class Certificates:
    """The DER certificates the zone's TLSA records describe."""

    leaf: bytes  # the test server certificate (tests.peers.tls)
    other: bytes  # the untrusted self-signed one: what a mismatching record names
    ca: bytes  # the test CA
    ta_chain: Path  # PEM: a leaf for TA_HOST signed by the test CA, then the CA
    ta_key: Path
    expired: Path  # PEM: self-signed, for another name, expired in 2002
    expired_key: Path

    @property
    def expired_der(self) -> bytes:
        return _pem_to_der(self.expired)


def signed_records(certs: Certificates) -> list[tuple[str, str, str]]:
    """(owner relative to :data:`SIGNED`, type, rdata) of the signed zone."""
    good = tlsa_data(3, 1, 1, certs.leaf)
    bad = tlsa_data(3, 1, 1, certs.other)
    records: list[tuple[str, str, str]] = [
        ("@", "SOA", f"ns.{SIGNED}. hostmaster.{SIGNED}. 1 3600 900 86400 60"),
        ("@", "NS", f"ns.{SIGNED}."),
        ("ns", "A", HOST),
    ]

    def domain(name: str, *hosts: tuple[int, str, str, tuple[str, ...]]) -> None:
        for preference, host, address, tlsa in hosts:
            records.append((name, "MX", f"{preference} {host}.{SIGNED}."))
            if (host, "A", address) not in records:
                records.append((host, "A", address))
                records.extend((f"_25._tcp.{host}", "TLSA", data) for data in tlsa)

    domain("ee", (10, "mx-ee", HOST, (good,)))
    domain("ee301", (10, "mx-ee301", HOST, (tlsa_data(3, 0, 1, certs.leaf),)))
    domain("ee312", (10, "mx-ee312", HOST, (tlsa_data(3, 1, 2, certs.leaf), bad)))
    domain("failover", (10, "mx-bad", HOST, (bad,)), (20, "mx-good2", SECOND, (good,)))
    domain("allbad", (10, "mx-bad", HOST, (bad,)), (20, "mx-bad2", SECOND, (bad,)))
    domain("notls", (10, "mx-notls", HOST, (good,)))
    domain("notlsa", (10, "mx-notlsa", HOST, ()))
    domain("bogus", (10, "mx-bogus", HOST, (good,)))
    domain("bogusmx", (10, "mx-ee", HOST, (good,)))
    # RFC 7672 §3.1.1: DANE-EE checks neither names nor dates.
    domain(
        "expired", (10, "mx-expired", HOST, (tlsa_data(3, 1, 1, certs.expired_der),))
    )  # its MX RRset is broken after signing
    domain("ta", (10, "mx-ta", HOST, (tlsa_data(2, 0, 1, certs.ca),)))
    # TLS-RPT (RFC 8460 §3): where the DANE domains' reports go (tests/transport/test_tlsrpt.py).
    records.extend(
        (f"_smtp._tls.{name}", "TXT", f'"v=TLSRPTv1; rua=mailto:tlsrpt@{name}.{SIGNED}"')
        for name in ("ee", "failover", "notls", "bogus")
    )
    domain(
        "pkix",
        (10, "mx-pkix", HOST, (tlsa_data(0, 0, 1, certs.ca), tlsa_data(1, 1, 1, certs.leaf))),
    )
    # Whole certificates (matching type 0): a TLSA RRset too large for a 1232-byte UDP
    # answer, so the resolver retries over TCP (tests/transport/test_tls_policy_review.py).
    domain(
        "big",
        (
            10,
            "mx-big",
            HOST,
            tuple(tlsa_data(3, 0, 0, der) for der in (certs.other, certs.ca, certs.leaf)),
        ),
    )
    # Usable and unusable records side by side: only the usable ones count (RFC 7672 §3.1):
    # PKIX-TA (unusable for SMTP), a private matching type, a private selector, DANE-EE.
    # (A digest of the wrong length: "short" below, added as raw RDATA by add_short_digest.)
    unusable = (
        tlsa_data(0, 0, 1, certs.leaf),
        f"3 1 255 {hashlib.sha256(spki_of(certs.leaf)).hexdigest()}",
        f"3 255 1 {hashlib.sha256(certs.leaf).hexdigest()}",
    )
    domain("mixed", (10, "mx-mixed", HOST, (*unusable, tlsa_data(3, 1, 2, certs.leaf))))
    # A valid record; add_short_digest puts one dnspython refuses beside it after the build.
    domain("short", (10, "mx-short", HOST, (tlsa_data(3, 1, 2, certs.leaf),)))
    return records


#: The owner (relative to :data:`SIGNED`) whose TLSA RRset holds a digest of the wrong length.
SHORT_DIGEST = "_25._tcp.mx-short"


def short_digest_rdata(certs: Certificates) -> bytes:
    """TLSA RDATA ``3 1 1`` with a 31-octet "SHA-256" (RFC 6698 §2.1.3 wants 32): unusable."""
    return bytes((3, 1, 1)) + hashlib.sha256(spki_of(certs.leaf)).digest()[:31]


def add_short_digest(zone: dns.zone.Zone, certs: Certificates) -> None:
    """Add :func:`short_digest_rdata` to :data:`SHORT_DIGEST`'s RRset before signing. As raw
    RDATA (``GenericRdata``): dnspython's TLSA type refuses the record, so neither its
    presentation form nor its wire form can be read into one (the zone file then writes it
    in RFC 3597 ``\\#`` form, which unbound loads and signs' RRSIG covers)."""
    name = dns.name.from_text(SHORT_DIGEST, zone.origin)
    rdata = dns.rdata.GenericRdata(dns.rdataclass.IN, dns.rdatatype.TLSA, short_digest_rdata(certs))
    with zone.writer() as txn:
        txn.add(name, TTL, rdata)


def insecure_records(certs: Certificates) -> list[tuple[str, str, str]]:
    """The unsigned zone: a TLSA record that would fail, were it trusted."""
    return [
        ("@", "SOA", f"ns.{INSECURE}. hostmaster.{INSECURE}. 1 3600 900 86400 60"),
        ("@", "NS", f"ns.{INSECURE}."),
        ("ns", "A", HOST),
        ("plain", "MX", f"10 mx.{INSECURE}."),
        ("mx", "A", HOST),
        ("_25._tcp.mx", "TLSA", tlsa_data(3, 1, 1, certs.other)),
        # An insecure MX RRset naming exchangers of the signed zone: no DANE for this
        # domain (RFC 7672 §2.2.1), whatever those exchangers' TLSA records say
        # (tests/transport/test_tls_policy_review.py: sessions it leaves in the pool).
        ("viabogus", "MX", f"10 mx-bogus.{SIGNED}."),
        ("viaee", "MX", f"10 mx-ee.{SIGNED}."),
    ]


def build_zone(origin: str, records: list[tuple[str, str, str]]) -> dns.zone.Zone:
    zone = dns.zone.Zone(dns.name.from_text(origin), relativize=False)
    with zone.writer() as txn:
        for owner, rtype, rdata in records:
            rd = dns.rdata.from_text(dns.rdataclass.IN, rtype, rdata, origin=zone.origin)
            name = zone.origin if owner == "@" else dns.name.from_text(owner, zone.origin)
            txn.add(name, TTL, rd)
    return zone


def sign(zone: dns.zone.Zone) -> str:
    """Sign ``zone`` in place with a fresh key; its DNSKEY as a ``trust-anchor:`` line."""
    private = ec.generate_private_key(ec.SECP256R1())
    dnskey = dns.dnssec.make_dnskey(
        private.public_key(), dns.dnssectypes.Algorithm.ECDSAP256SHA256, flags=257
    )
    now = datetime.datetime.now(datetime.UTC)
    dns.dnssec.sign_zone(
        zone,
        keys=[(private, dnskey)],
        inception=now - datetime.timedelta(hours=1),
        expiration=now + datetime.timedelta(days=2),
    )
    key = base64.b64encode(dnskey.key).decode("ascii")
    assert zone.origin is not None
    fields = f"{dnskey.flags} {dnskey.protocol} {int(dnskey.algorithm)} {key}"
    return f"{zone.origin.to_text()} DNSKEY {fields}"


def break_rrset(zone: dns.zone.Zone, owner: str, rtype: str, rdata: str) -> None:
    """Replace an RRset's data after signing, so its RRSIG no longer matches (bogus)."""
    name = dns.name.from_text(owner, zone.origin)
    rdataset = dns.rdataset.from_text(dns.rdataclass.IN, rtype, TTL, rdata)
    with zone.writer() as txn:
        txn.replace(name, rdataset)


def config_text(directory: Path, port: int, anchor: str) -> str:
    lines = [
        *server_lines(directory, port, verbosity=1),
        '    module-config: "validator iterator"',
        "    do-not-query-localhost: no",
        "    minimal-responses: no",
        # Bogus answers are not kept long: a test that fixes nothing should still see them.
        "    val-bogus-ttl: 1",
        '    local-zone: "." static',
        f'    local-zone: "{SIGNED}." transparent',
        f'    local-zone: "{INSECURE}." transparent',
        f'    trust-anchor: "{anchor}"',
        "remote-control:",
        "    control-enable: no",
    ]
    for origin in (SIGNED, INSECURE):
        lines += [
            "auth-zone:",
            f'    name: "{origin}."',
            f'    zonefile: "{directory / (origin + ".zone")}"',
            "    for-upstream: yes",
            "    for-downstream: no",
            "    fallback-enabled: no",
        ]
    return "\n".join(lines) + "\n"


class DNSSECServer(UnboundServer):
    """A running validating unbound serving :data:`SIGNED` and :data:`INSECURE`.

    Attributes:
        certs: the certificates the TLSA records were made from.
        anchor: the ``trust-anchor:`` text (the zone's DNSKEY).
    """

    certs: Certificates
    anchor: str

    def answers(self) -> bool:
        import dns.exception
        import dns.message
        import dns.query
        import dns.rcode

        query = dns.message.make_query(f"mx-ee.{SIGNED}.", "A")
        try:
            response = dns.query.udp(query, self.host, port=self.port, timeout=0.2)
        except (dns.exception.DNSException, OSError):
            return False
        return response.rcode() == dns.rcode.NOERROR

    def resolver(self, **kwargs: Any) -> Resolver:
        """A :class:`~mailrelay.resolver.Resolver` asking only this server."""
        kwargs.setdefault("timeout", 2.0)
        return Resolver(nameservers=[self.host], port=self.port, **kwargs)

    def async_resolver(self, **kwargs: Any) -> AsyncResolver:
        """An :class:`~mailrelay.resolver.AsyncResolver` asking only this server."""
        kwargs.setdefault("timeout", 2.0)
        return AsyncResolver(nameservers=[self.host], port=self.port, **kwargs)


def expired_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for ``expired.invalid``, valid in 2001 only: (cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "expired.invalid")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.datetime(2001, 1, 1, tzinfo=datetime.UTC))
        .not_valid_after(datetime.datetime(2002, 1, 1, tzinfo=datetime.UTC))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("expired.invalid")]), False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "expired.pem", directory / "expired.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def make_certificates(tls_files: TLSFiles, directory: Path) -> Certificates:
    cert, key = issue_certificate(tls_files, [TA_HOST], directory)
    chain = directory / "ta-chain.pem"
    chain.write_text(cert.read_text() + tls_files.ca_file.read_text())
    expired, expired_key = expired_certificate(directory)
    return Certificates(
        expired=expired,
        expired_key=expired_key,
        leaf=_pem_to_der(tls_files.cert_file),
        other=_pem_to_der(tls_files.untrusted_cert_file),
        ca=_pem_to_der(tls_files.ca_file),
        ta_chain=chain,
        ta_key=key,
    )


def start_dnssec(directory: Path, certs: Certificates) -> DNSSECServer:
    """Build and sign the zones in ``directory``, start unbound, wait until it answers."""
    signed = build_zone(SIGNED, signed_records(certs))
    add_short_digest(signed, certs)
    anchor = sign(signed)
    break_rrset(signed, "_25._tcp.mx-bogus", "TLSA", tlsa_data(3, 1, 1, certs.other))
    break_rrset(signed, "bogusmx", "MX", f"10 mx-bogus.{SIGNED}.")
    (directory / f"{SIGNED}.zone").write_text(signed.to_text(relativize=False))
    plain = build_zone(INSECURE, insecure_records(certs))
    (directory / f"{INSECURE}.zone").write_text(plain.to_text(relativize=False))
    server = launch(
        directory,
        lambda port: config_text(directory, port, anchor),
        DNSSECServer,
        "unbound (DNSSEC)",
    )
    server.certs = certs
    server.anchor = anchor
    return server


def serve_dnssec(tls_files: TLSFiles) -> Iterator[DNSSECServer]:
    """Start the validating test resolver, yield it, stop it: the body of the test modules'
    ``dnssec`` fixtures (``yield from serve_dnssec(tls_files)``). It is not registered in
    ``tests/conftest.py``'s ``pytest_plugins``, whose list docs/testing.md shows."""
    if find_unbound() is None:
        where = "CI must install it" if os.environ.get("CI") == "true" else "install it"
        pytest.fail(f"unbound (the test DNS server) is missing; {where}: {INSTALL_HINT}")
    with tempfile.TemporaryDirectory(prefix="mailrelay-dnssec-") as tmp:
        directory = Path(tmp)
        certs = make_certificates(tls_files, directory)
        server = start_dnssec(directory, certs)
        try:
            yield server
        finally:
            server.stop()
