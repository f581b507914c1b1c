"""TLSA answers dnspython refuses (mailrelay.resolver's own reading of their TLSA RDATA).

dnspython 2.9 refuses a whole DNS message when one TLSA record's digest has the wrong length
for its matching type (a 31-octet "SHA-256"). RFC 7671 §4 / RFC 7672 §2.1.1 make such a
record *unusable*, to be ignored beside usable ones, not a lookup failure. Here: the wire
reader on hand-built responses (compression, pointer loops, lengths past the end), a
Hypothesis property that arbitrary bytes only raise ``FormError``, and both resolvers against
the in-process loopback server of :mod:`tests.peers.hostile_dns` serving the crafted bytes
(UDP, and TCP after truncation; with and without the AD bit).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator

import dns.exception
import dns.message
import dns.name
import dns.rdata
import dns.rdatatype
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailrelay.errors import ResolverError
from mailrelay.mailhosts import DNSStatus, TLSARecord, TLSARecords
from mailrelay.resolver import AsyncResolver, Resolver, _lenient_tlsa, _tlsa_fields, _tlsa_rdata
from tests.peers.hostile_dns import Fault, HostileDNS

OWNER = dns.name.from_text("_25._tcp.mx.test.")
GOOD = bytes(range(32))  # a SHA-256 digest's length
SHORT = bytes(range(100, 131))  # 31 octets: one short
QNAME = b"\x03_25\x04_tcp\x02mx\x04test\x00"
QUESTION = QNAME + struct.pack("!HH", 52, 1)
POINTER = b"\xc0\x0c"  # to the question's name, right after the 12-octet header
RESPONSE = 0x8180  # QR, RD, RA
AD = 0x0020
TLSA = 52
MODES = ["sync", "async"]


def header(answers: int, *, flags: int = RESPONSE, questions: int = 1) -> bytes:
    return struct.pack("!HHHHHH", 0x1234, flags, questions, answers, 0, 0)


def rr(
    owner: bytes, rdata: bytes, *, rdtype: int = TLSA, ttl: int = 300, length: int | None = None
) -> bytes:
    size = len(rdata) if length is None else length
    return owner + struct.pack("!HHIH", rdtype, 1, ttl, size) + rdata


def tlsa(data: bytes, usage: int = 3, selector: int = 1, mtype: int = 1) -> bytes:
    return bytes((usage, selector, mtype)) + data


def message(*records: bytes, flags: int = RESPONSE) -> bytes:
    return header(len(records), flags=flags) + QUESTION + b"".join(records)


# -- the wire reader ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wire", "expected", "others"),
    [
        (message(rr(POINTER, tlsa(GOOD))), [(OWNER, 300, tlsa(GOOD))], 0),
        (
            message(rr(POINTER, tlsa(GOOD)), rr(POINTER, tlsa(SHORT), ttl=60)),
            [(OWNER, 300, tlsa(GOOD)), (OWNER, 60, tlsa(SHORT))],
            0,
        ),
        # The owner written out in full, no compression.
        (message(rr(QNAME, tlsa(SHORT))), [(OWNER, 300, tlsa(SHORT))], 0),
        # Labels, then a pointer into the middle of the question's name ("mx.test").
        (
            message(rr(b"\x03_25\x04_tcp" + b"\xc0\x15", tlsa(GOOD, 2, 0, 2))),
            [(OWNER, 300, tlsa(GOOD, 2, 0, 2))],
            0,
        ),
        # A CNAME beside: counted, not read as TLSA; any data length (0) passes through.
        (
            message(rr(POINTER, b"\x02mx\x04test\x00", rdtype=5), rr(POINTER, tlsa(b""))),
            [(OWNER, 300, tlsa(b""))],
            1,
        ),
        (message(), [], 0),
    ],
    ids=["one", "short-beside-good", "uncompressed", "pointer-mid-name", "cname", "empty"],
)
def test_the_reader_takes_tlsa_rdata_as_it_is(
    wire: bytes, expected: list[tuple[dns.name.Name, int, bytes]], others: int
) -> None:
    assert _tlsa_rdata(wire) == (expected, others)


@pytest.mark.parametrize(
    "wire",
    [
        b"",
        header(0)[:11],
        message(rr(b"\xc0\x22", tlsa(GOOD))),  # a pointer to itself (a loop)
        message(rr(b"\xc0\x40", tlsa(GOOD))),  # a pointer forwards
        header(1) + b"\xc0",  # half a pointer
        message(rr(b"\x02mx\xc0\x22", tlsa(GOOD))),  # labels, then a pointer to them
        message(rr(b"\x41x\x00", tlsa(GOOD))),  # label type 01 (RFC 6891 §5: obsolete)
        message(rr(b"\x02mx", b"")),  # the name runs past the end
        message(rr(POINTER, tlsa(GOOD), length=40)),  # RDLENGTH past the end
        message(rr(POINTER, b"\x03\x01")),  # TLSA RDATA shorter than its three octets
        message(rr(POINTER, tlsa(GOOD)))[:-40],  # the record header cut
        header(2) + QUESTION + rr(POINTER, tlsa(GOOD)),  # ANCOUNT says two
        header(0, questions=2) + QUESTION,  # QDCOUNT says two
        header(0) + (b"\x3f" + b"a" * 63) * 5 + b"\x00",  # a name over 255 octets
    ],
)
def test_the_reader_refuses_malformed_messages(wire: bytes) -> None:
    with pytest.raises(dns.exception.FormError):
        _tlsa_rdata(wire)


def test_a_name_of_255_octets_is_read() -> None:
    # RFC 1035 §2.3.4: 255 octets with the root label; its pointers must not count twice.
    longest = (b"\x3f" + b"a" * 63) * 3 + b"\x3d" + b"a" * 61 + b"\x00"
    wire = header(2, questions=0) + rr(longest, tlsa(GOOD)) + rr(b"\xc0\x0c", tlsa(SHORT))
    records, _others = _tlsa_rdata(wire)
    assert [len(owner.to_wire() or b"") for owner, _ttl, _rdata in records] == [255, 255]


@given(st.binary(max_size=600))
def test_arbitrary_bytes_only_raise_formerror(wire: bytes) -> None:
    try:
        response = _lenient_tlsa(wire)
    except dns.exception.FormError:
        return
    assert isinstance(response, dns.message.Message)


@given(st.binary(max_size=300), st.sampled_from([RESPONSE, RESPONSE | AD]))
def test_bytes_after_a_good_question_only_raise_formerror(tail: bytes, flags: int) -> None:
    wire = header(3, flags=flags) + QUESTION + tail
    try:
        response = _lenient_tlsa(wire)
    except dns.exception.FormError:
        return
    assert bool(response.flags & dns.flags.AD) is bool(flags & AD)


def test_a_refused_message_keeps_its_tlsa_records_as_raw_rdata() -> None:
    wire = message(rr(POINTER, tlsa(GOOD)), rr(POINTER, tlsa(SHORT)), flags=RESPONSE | AD)
    with pytest.raises(dns.exception.FormError):
        dns.message.from_wire(wire)  # what dnspython makes of it
    response = _lenient_tlsa(wire)
    assert response.flags & dns.flags.AD
    [rrset] = response.answer
    assert rrset.name == OWNER
    assert rrset.rdtype == dns.rdatatype.TLSA
    assert all(isinstance(rd, dns.rdata.GenericRdata) for rd in rrset)
    assert sorted(_tlsa_fields(rd) for rd in rrset) == [(3, 1, 1, GOOD), (3, 1, 1, SHORT)]


def test_other_malformed_records_in_the_answer_keep_the_message_refused() -> None:
    # dnspython would drop the 3-octet A record; the answer must not read as "no TLSA".
    wire = message(rr(POINTER, b"\x7f\x00\x00", rdtype=1), rr(POINTER, tlsa(SHORT)))
    with pytest.raises(dns.exception.FormError):
        _lenient_tlsa(wire)


# -- both resolvers against a loopback server serving the crafted bytes -------------------

GOOD_TEXT = "3 1 1 " + GOOD.hex()
#: dnspython writes a record it would refuse when it holds the full digest; MANGLE cuts one.
CUT_TEXT = "3 1 1 " + (SHORT + b"\xff").hex()


def cut_digest(wire: bytes) -> bytes:
    """The answer with the second record's digest one octet short (RDLENGTH 34, not 35)."""
    full = struct.pack("!H", 35) + tlsa(SHORT + b"\xff")
    assert wire.count(full) == 1
    return wire.replace(full, struct.pack("!H", 34) + tlsa(SHORT))


def with_ad(wire: bytes) -> bytes:
    return wire[:3] + bytes((wire[3] | AD,)) + wire[4:]


@pytest.fixture(scope="module")
def dns_server() -> Iterator[HostileDNS]:
    with HostileDNS() as server:
        yield server
    assert not server.errors


@pytest.fixture
def server(dns_server: HostileDNS) -> HostileDNS:
    dns_server.reset()
    dns_server.fault("_25._tcp.mx.test", "TLSA", Fault.MANGLE)
    return dns_server


def tlsa_of(server: HostileDNS, mode: str, timeout: float = 2.0) -> TLSARecords:
    if mode == "sync":
        return Resolver(["127.0.0.1"], port=server.port, timeout=timeout).tlsa("mx.test")
    resolver = AsyncResolver(["127.0.0.1"], port=server.port, timeout=timeout)
    return asyncio.run(resolver.tlsa("mx.test"))


def records(*pairs: tuple[int, bytes]) -> tuple[TLSARecord, ...]:
    return tuple(TLSARecord(usage=3, selector=1, matching_type=m, data=d) for m, d in pairs)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("secure", [False, True])
@pytest.mark.parametrize("over_tcp", [False, True])
def test_a_short_digest_beside_a_good_record_reaches_dane(
    server: HostileDNS, mode: str, secure: bool, over_tcp: bool
) -> None:
    server.add("_25._tcp.mx.test", "TLSA", GOOD_TEXT, CUT_TEXT)
    server.mangle = (lambda wire: with_ad(cut_digest(wire))) if secure else cut_digest
    server.mangle_over_tcp = over_tcp  # UDP then says TC; the answer comes over TCP
    found = tlsa_of(server, mode)
    assert found.status is DNSStatus.OK
    assert found.secure is secure
    assert sorted(found.records, key=lambda r: r.data) == list(records((1, GOOD), (1, SHORT)))
    assert any(query.tcp for query in server.queries) is over_tcp


@pytest.mark.parametrize("mode", MODES)
def test_only_a_short_digest_is_a_record_not_none(server: HostileDNS, mode: str) -> None:
    # RFC 7672 §2.1.1: unusable records still mean "TLS required", never "no TLSA records".
    server.add("_25._tcp.mx.test", "TLSA", CUT_TEXT)
    server.mangle = cut_digest
    found = tlsa_of(server, mode)
    assert (found.status, found.records) == (DNSStatus.OK, records((1, SHORT)))


@pytest.mark.parametrize("mode", MODES)
def test_a_good_answer_is_read_as_before(server: HostileDNS, mode: str) -> None:
    server.add("_25._tcp.mx.test", "TLSA", GOOD_TEXT)
    server.mangle = with_ad
    found = tlsa_of(server, mode)
    assert (found.status, found.records, found.secure) == (DNSStatus.OK, records((1, GOOD)), True)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "mangle",
    [
        lambda wire: wire[:2] + b"\x81\x80" + b"\x00" * 8,  # a header only, counts of 0
        lambda wire: cut_digest(wire)[:-10],  # the last record cut short
        lambda wire: cut_digest(wire)[:12] + b"\xc0\x0c" + cut_digest(wire)[14:],  # loop
    ],
    ids=["nothing", "cut", "pointer-loop"],
)
def test_unreadable_answers_are_still_transient_failures(
    server: HostileDNS, mode: str, mangle: object
) -> None:
    server.add("_25._tcp.mx.test", "TLSA", GOOD_TEXT, CUT_TEXT)
    server.mangle = mangle  # type: ignore[assignment]
    # A datagram that answers nothing is waited past until the deadline: a short one.
    with pytest.raises(ResolverError) as caught:
        tlsa_of(server, mode, timeout=0.3)
    assert caught.value.is_transient


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("fault", "status"),
    [
        (Fault.SILENCE, "timeout"),
        (Fault.SERVFAIL, "servfail"),
        (Fault.WRONG_ID, "timeout"),
        (Fault.OTHER_NAME, "error"),
        (Fault.TCP_CLOSE, "error"),
        (Fault.GARBAGE, "error"),
    ],
)
def test_tlsa_lookups_that_fail_stay_transient(
    dns_server: HostileDNS, mode: str, fault: Fault, status: str
) -> None:
    # The TLSA queries' own exchange keeps dnspython's outcomes: no answer, no records.
    dns_server.reset()
    dns_server.add("_25._tcp.mx.test", "TLSA", GOOD_TEXT)
    dns_server.fault("_25._tcp.mx.test", "TLSA", fault)
    with pytest.raises(ResolverError) as caught:
        tlsa_of(dns_server, mode, timeout=0.3)
    assert caught.value.is_transient
    assert f"({status})" in str(caught.value)


@pytest.mark.parametrize("mode", MODES)
@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(wire=st.binary(max_size=200), keep=st.integers(min_value=0, max_value=120))
def test_whatever_the_server_sends_only_records_or_resolver_errors_come_out(
    dns_server: HostileDNS, mode: str, wire: bytes, keep: int
) -> None:
    dns_server.reset()
    dns_server.add("_25._tcp.mx.test", "TLSA", GOOD_TEXT, CUT_TEXT)
    dns_server.fault("_25._tcp.mx.test", "TLSA", Fault.MANGLE)
    # The real answer's first ``keep`` octets (its id and question: it reaches the reader),
    # then arbitrary bytes.
    dns_server.mangle = lambda real: cut_digest(real)[:keep] + wire
    try:  # an unreadable datagram is waited past until the deadline: a short one
        found: TLSARecords | ResolverError = tlsa_of(dns_server, mode, timeout=0.15)
    except ResolverError as exc:
        found = exc
    if isinstance(found, ResolverError):
        assert found.is_transient
    else:
        assert found.status in {DNSStatus.OK, DNSStatus.NODATA, DNSStatus.NXDOMAIN}
