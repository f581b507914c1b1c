"""TLSA matching (RFC 6698 §2.1, RFC 7672 §3.1) on DER bytes: tables and properties.

The certificates are the test CA's (:mod:`tests.peers.tls`); the expected SubjectPublicKeyInfo
comes from ``cryptography`` (a test dependency only), so the library's own DER walk is checked
against an independent parser.
"""

from __future__ import annotations

import hashlib
import ssl
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.errors import TLSError
from mailrelay.mailhosts import TLSARecord
from mailrelay.options import TLS, Timeouts
from mailrelay.transport.dane import (
    DANEHost,
    DANEPolicy,
    HostState,
    check_chain,
    is_usable,
    matches,
    spki,
    trust_anchor_context,
)
from mailrelay.transport.mx_plan import MXPolicy, MXSettings, Target, reuse_key
from tests.peers.dnssec import spki_of
from tests.peers.tls import TLSFiles

VERDICTS = DANEPolicy(hosts=(DANEHost(name="mx.example", state=HostState.ENCRYPT),))


def der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


@pytest.fixture(scope="module")
def certs(tls_files: TLSFiles) -> dict[str, bytes]:
    return {
        "leaf": der(tls_files.cert_file),
        "ca": der(tls_files.ca_file),
        "other": der(tls_files.untrusted_cert_file),
    }


def record(usage: int, selector: int, mtype: int, content: bytes) -> TLSARecord:
    """The record for ``content`` (the certificate or SPKI) under ``mtype``."""
    data = {0: content, 1: hashlib.sha256(content).digest(), 2: hashlib.sha512(content).digest()}
    return TLSARecord(usage=usage, selector=selector, matching_type=mtype, data=data[mtype])


@pytest.mark.parametrize("name", ["leaf", "ca", "other"])
def test_spki_is_what_an_x509_parser_finds(certs: dict[str, bytes], name: str) -> None:
    assert spki(certs[name]) == spki_of(certs[name])


@pytest.mark.parametrize("selector", [0, 1])
@pytest.mark.parametrize("mtype", [0, 1, 2])
def test_a_record_matches_its_certificate_and_no_other(
    certs: dict[str, bytes], selector: int, mtype: int
) -> None:
    leaf = certs["leaf"]
    made = record(3, selector, mtype, leaf if selector == 0 else spki_of(leaf))
    assert matches(made, leaf)
    assert not matches(made, certs["other"])
    assert not matches(made, certs["ca"])


@pytest.mark.parametrize(
    ("usage", "selector", "mtype", "size", "usable"),
    [
        (3, 1, 1, 32, True),
        (3, 0, 1, 32, True),
        (3, 1, 2, 64, True),
        (3, 1, 0, 91, True),
        (2, 0, 1, 32, True),
        (2, 1, 2, 64, True),
        # RFC 7672 §3.1.3: PKIX-TA and PKIX-EE are unusable for SMTP.
        (0, 0, 1, 32, False),
        (1, 1, 1, 32, False),
        # Unknown usage, selector or matching type.
        (4, 1, 1, 32, False),
        (3, 2, 1, 32, False),
        (3, 1, 3, 32, False),
        # Digests of the wrong length never match.
        (3, 1, 1, 31, False),
        (3, 1, 2, 32, False),
        (3, 1, 0, 0, False),
    ],
)
def test_which_records_are_usable(
    usage: int, selector: int, mtype: int, size: int, usable: bool
) -> None:
    made = TLSARecord(usage=usage, selector=selector, matching_type=mtype, data=b"\x01" * size)
    assert is_usable(made) is usable


@pytest.mark.parametrize(
    ("records", "chain", "expected"),
    [
        # DANE-EE matches the leaf only.
        ([("ee", "leaf")], ["leaf", "ca"], ("ee", None)),
        ([("ee", "ca")], ["leaf", "ca"], None),
        # DANE-TA matches a certificate above the leaf, never the leaf itself.
        ([("ta", "ca")], ["leaf", "ca"], ("ta", "ca")),
        ([("ta", "leaf")], ["leaf", "ca"], None),
        ([("ta", "ca")], ["leaf"], None),
        # DANE-EE wins when both match: it needs no second check.
        ([("ta", "ca"), ("ee", "leaf")], ["leaf", "ca"], ("ee", None)),
        # Any one matching record is enough (RFC 6698 §4.1).
        ([("ee", "other"), ("ee", "leaf")], ["leaf"], ("ee", None)),
        # No certificate at all.
        ([("ee", "leaf")], [], None),
    ],
)
def test_check_chain(
    certs: dict[str, bytes],
    records: list[tuple[str, str]],
    chain: list[str],
    expected: tuple[str, str | None] | None,
) -> None:
    made = [record(3 if kind == "ee" else 2, 1, 1, spki_of(certs[name])) for kind, name in records]
    host = DANEHost(name="mx.example", state=HostState.AUTHENTICATE, records=tuple(made))
    presented = [certs[name] for name in chain]
    if expected is None:
        with pytest.raises(TLSError, match="DANE") as caught:
            check_chain(host, presented, peer="mx.example[192.0.2.1]:25")
        assert caught.value.is_transient
        assert caught.value.host == "mx.example[192.0.2.1]:25"
        return
    found = check_chain(host, presented)
    kind, anchor = expected
    assert found.record.usage == (3 if kind == "ee" else 2)
    assert found.trust_anchor == (certs[anchor] if anchor is not None else None)


def test_policy_looks_hosts_up_by_name() -> None:
    host = DANEHost(name="mx.example", state=HostState.ENCRYPT)
    policy = DANEPolicy(hosts=(host,))
    assert policy.for_host("MX.Example.") is host
    assert policy.for_host("other.example") is None


@pytest.mark.parametrize(("field", "value"), [("usage", 256), ("selector", -1), ("usage", True)])
def test_record_fields_are_checked(field: str, value: object) -> None:
    fields: dict[str, object] = {"usage": 3, "selector": 1, "matching_type": 1, "data": b"x"}
    fields[field] = value
    with pytest.raises(ValueError, match=field):
        TLSARecord(**fields)  # type: ignore[arg-type]


@given(st.binary(min_size=1, max_size=300), st.sampled_from([0, 1, 2]), st.integers(0, 299))
def test_selector_0_matches_exactly_the_bytes_it_names(
    certificate: bytes, mtype: int, flip: int
) -> None:
    made = record(3, 0, mtype, certificate)
    assert matches(made, certificate)
    changed = bytearray(certificate)
    changed[flip % len(changed)] ^= 0x01
    assert not matches(made, bytes(changed))


@given(st.binary(max_size=400))
def test_spki_raises_only_value_error_on_garbage(data: bytes) -> None:
    try:
        found = spki(data)
    except ValueError:
        return
    assert found[0] == 0x30
    assert found in data


@given(st.data())
def test_a_truncated_certificate_has_no_spki(certs: dict[str, bytes], data: st.DataObject) -> None:
    # Cut short anywhere, a real certificate is refused rather than read past its end.
    leaf = certs["leaf"]
    cut = data.draw(st.integers(0, len(leaf) - 1))
    with pytest.raises(ValueError, match="DER"):
        spki(leaf[:cut])
    made = record(3, 1, 1, spki_of(leaf))
    assert not matches(made, leaf[:cut])


@pytest.mark.parametrize("tls", [TLS.NONE, TLS.OPPORTUNISTIC, TLS.STARTTLS])
def test_a_dane_verdict_keeps_the_transport_defaults_for_other_exchangers(tls: TLS) -> None:
    settings = MXSettings(
        port=25, tls=tls, ssl_context=None, timeouts=Timeouts(), local_hostname=None,
        tls_policy=lambda domain: MXPolicy(dane=VERDICTS), plaintext_fallback=False,
        pipelining=True, chunking=False, max_addresses=10, refused=(),)  # fmt: skip
    policy = settings.policy("example.com")
    assert policy == MXPolicy(tls=tls, plaintext_fallback=False, dane=VERDICTS)
    # A hook that says more than the verdicts is taken as it is.
    strict = MXPolicy(tls=TLS.STARTTLS, plaintext_fallback=False, dane=VERDICTS)
    settings.tls_policy = lambda domain: strict
    assert settings.policy("example.com") is strict


@pytest.mark.parametrize(
    ("state", "tls", "key_kind"),
    [
        (HostState.AUTHENTICATE, TLS.STARTTLS, "DANE"),
        (HostState.ENCRYPT, TLS.STARTTLS, "DANE"),
        (HostState.FAILED, TLS.OPPORTUNISTIC, TLS.OPPORTUNISTIC),
    ],
)
def test_dane_hosts_get_their_own_context_and_reuse_key(
    state: HostState, tls: TLS, key_kind: object
) -> None:
    target = Target(name="mx.example", address="192.0.2.1", port=25)
    policy = MXPolicy(dane=DANEPolicy(hosts=(DANEHost(name="mx.example", state=state),)))
    settings = MXSettings(
        port=25, tls=TLS.OPPORTUNISTIC, ssl_context=None, timeouts=Timeouts(),
        local_hostname=None, tls_policy=None, plaintext_fallback=True, pipelining=True,
        chunking=False, max_addresses=10, refused=(),)  # fmt: skip
    context = settings.context(policy, tls, target)
    # No WebPKI for a DANE host: the TLSA records authenticate it (RFC 7672 §3.1.1).
    assert context.verify_mode is ssl.CERT_NONE
    assert not context.check_hostname
    key = reuse_key(target, policy, context)
    assert isinstance(key, tuple)
    assert key[3] == key_kind


@given(junk=st.binary(max_size=64))
def test_an_anchor_openssl_cannot_load_fails_dane_not_the_delivery(junk: bytes) -> None:
    # A certificate from the server that matched a DANE-TA record but cannot be loaded as a
    # trust anchor is that exchanger's TLSError (the transports skip it), never a bare
    # ssl.SSLError out of the delivery.
    with pytest.raises(TLSError, match="cannot serve as a trust anchor") as info:
        trust_anchor_context(junk)
    assert info.value.is_transient


def test_a_real_anchor_gives_a_verifying_context(tls_files: TLSFiles) -> None:
    der = ssl.PEM_cert_to_DER_cert(Path(tls_files.ca_file).read_text())
    context = trust_anchor_context(der)
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname
    assert context.verify_flags & ssl.VERIFY_X509_PARTIAL_CHAIN
