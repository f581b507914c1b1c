"""A hostile review of the TLS policies of direct-to-MX delivery: DANE (RFC 7672), TLS-RPT
(RFC 8460), MTA-STS testing mode (RFC 8461 §5) and the SSRF guard of outbound HTTPS.

Each test states one security property. The DANE tests run both MX transports against the
validating unbound of :mod:`tests.peers.dnssec` and aiosmtpd servers that count the MAIL
commands they received ("nothing was sent" is checked where it happens); the plan tests
drive :func:`~mailrelay.transport.mx_plan.deliver_plan` without I/O; parsers and matchers get
Hypothesis properties.
"""

# ruff: noqa: F811
from __future__ import annotations

import datetime as _dt
import hashlib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import dns.flags
import dns.message
import dns.query
import pytest
from aiosmtpd.controller import Controller
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from mailrelay.envelope import Envelope as MailEnvelope
from mailrelay.errors import (
    ConfigurationError,
    DeliveryError,
    PolicyFetchError,
    ReportError,
    TLSError,
)
from mailrelay.mailhosts import TLSARecord, TLSARecords
from mailrelay.message import Message
from mailrelay.options import TLS, Timeouts
from mailrelay.results import DeliveryResult, Outcome, RecipientResult
from mailrelay.transport import tlsrpt
from mailrelay.transport.dane import (
    DANE,
    DANE_EE,
    DANE_TA,
    AsyncDANE,
    DANEHost,
    DANEPolicy,
    HostState,
    check_chain,
    is_usable,
    matches,
    spki,
)
from mailrelay.transport.mtasts import fetch_policy
from mailrelay.transport.mx import MXPolicy, MXTransport
from mailrelay.transport.mx_async import AsyncMXTransport
from mailrelay.transport.mx_plan import (
    MAX_REQUESTS_PER_TARGET,
    DomainPlan,
    MXAnswer,
    OpenSession,
    ReuseIdle,
    SendMessage,
    STSVerdicts,
    Target,
    Trail,
    deliver_plan,
)
from mailrelay.transport.netguard import non_public_addresses
from mailrelay.transport.tlsrpt import (
    PolicyType,
    ReportPolicy,
    ResultType,
    SessionRecord,
    TLSReport,
    TLSReportCollector,
    post_report,
    report_message,
)
from tests.peers.aiosmtpd_server import HOSTNAME
from tests.peers.dnssec import INSECURE, SIGNED, DNSSECServer
from tests.peers.https_policy import issue_certificate
from tests.peers.tls import TLSFiles
from tests.transport.helpers import FLAVOURS, Flavour, run

# The DANE tests' fixtures (the validating unbound, certificate chains, the aiosmtpd factory)
# are imported by name, which is how pytest finds them; tests then take them as arguments
# of the same names (what F811, silenced for this file at its top, reports).
from tests.transport.test_dane import (  # noqa: F401
    FIRST,
    MailCountingHandler,
    World,
    chains,
    dnssec,
    mx_server,
    smtp_port,
    world,
)
from tests.transport.test_mx_plan import MX1, Conn, accepted, conn, describe, envelope, settings

Wrap = Callable[[int, MXPolicy | None], MXPolicy | None]


def deliver_each(
    flavour: Flavour,
    dnssec: DNSSECServer,
    port: int,
    domains: Sequence[str],
    *,
    wrap: Wrap | None = None,
    plaintext_fallback: bool = True,
) -> list[DeliveryResult]:
    """One message to ``bob@<domain>`` per domain, in turn, through *one* MX transport under
    DANE (so its pool carries sessions from one message to the next). ``wrap(n, answer)``
    may change the hook's ``n``-th answer."""
    options: dict[str, Any] = {
        "port": port,
        "timeouts": Timeouts.all(3),
        "plaintext_fallback": plaintext_fallback,
    }
    messages = []
    for domain in domains:
        message = Message.build(
            sender="sender@mailrelay.test", to=[f"bob@{domain}"], subject="DANE", text="Hi\n"
        )
        messages.append((message, MailEnvelope.from_message(message)))
    calls = [0]

    def changed(answer: Any) -> Any:
        calls[0] += 1
        return wrap(calls[0], answer) if wrap is not None else answer

    if flavour == "sync":
        resolver = dnssec.resolver(timeout=2.0)
        hook = DANE(resolver)
        with MXTransport(
            resolver,
            tls_policy=lambda domain: changed(hook(domain)),
            **options,
            refused_networks=(),
        ) as transport:
            return [transport.send(message, envelope) for message, envelope in messages]

    async def main() -> list[DeliveryResult]:
        aresolver = dnssec.async_resolver(timeout=2.0)
        ahook = AsyncDANE(aresolver)

        async def policy(domain: str) -> Any:
            return changed(await ahook(domain))

        async with AsyncMXTransport(
            aresolver, tls_policy=policy, **options, refused_networks=()
        ) as transport:
            return [await transport.asend(message, envelope) for message, envelope in messages]

    return run(main())


def outcome(result: DeliveryResult) -> Outcome:
    [recipient] = result.recipients
    return recipient.outcome


# -- DANE: pooled sessions -----------------------------------------------------------------------


@pytest.mark.unbound
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_failed_tlsa_lookup_never_reuses_a_plain_text_session(
    flavour: Flavour, world: World
) -> None:
    # viabogus.insecure.test: an insecure MX RRset naming mx-bogus.dane.test, so no DANE:
    # delivered opportunistically, in plain text (the server has no STARTTLS), and the
    # session is pooled. bogus.dane.test: a secure MX RRset naming the same exchanger,
    # whose TLSA RRset is bogus: RFC 7672 §2.1.1 forbids delivery without authentication,
    # so the pooled plain-text session must not carry it.
    handler = world.server(FIRST, None)
    first, second = deliver_each(
        flavour, world.dnssec, world.port, [f"viabogus.{INSECURE}", f"bogus.{SIGNED}"]
    )
    assert first.ok, first.recipients
    assert not handler.messages[0].tls
    assert outcome(second) is Outcome.TRANSIENT, second.recipients
    assert "TLSA lookup" in (second.recipients[0].reason or "")
    assert handler.mail_commands == 1


@pytest.mark.unbound
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_an_unauthenticated_pooled_session_never_carries_dane_mail(
    flavour: Flavour, world: World
) -> None:
    # viaee.insecure.test reaches mx-ee.dane.test without DANE: opportunistic TLS accepts the
    # "untrusted" certificate and pools the session. ee.dane.test then needs mx-ee's
    # certificate to match its TLSA record, which the untrusted one does not.
    handler = world.server(FIRST, "untrusted")
    first, second = deliver_each(
        flavour, world.dnssec, world.port, [f"viaee.{INSECURE}", f"ee.{SIGNED}"]
    )
    assert first.ok, first.recipients
    assert outcome(second) is Outcome.TRANSIENT, second.recipients
    assert "matches none of its TLSA records" in (second.recipients[0].reason or "")
    assert handler.mail_commands == 1


def other_records(dnssec: DNSSECServer) -> tuple[TLSARecord, ...]:
    """A DANE-EE record naming the key of a certificate no test server presents."""
    digest = hashlib.sha256(spki(dnssec.certs.other)).digest()
    return (TLSARecord(usage=3, selector=1, matching_type=1, data=digest),)


@pytest.mark.unbound
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_session_is_not_reused_once_the_tlsa_records_changed(
    flavour: Flavour, world: World
) -> None:
    # The first message authenticates mx-ee under its signed record; before the second, the
    # records change (a key rollover, say) to one the server's certificate does not match:
    # the pooled session's old verdict must not carry the second message.
    handler = world.server(FIRST, "leaf")
    changed = other_records(world.dnssec)

    def wrap(call: int, answer: MXPolicy | None) -> MXPolicy | None:
        if call == 1 or answer is None or answer.dane is None:
            return answer
        hosts = tuple(attrs.evolve(host, records=changed) for host in answer.dane.hosts)
        return attrs.evolve(answer, dane=DANEPolicy(hosts=hosts))

    first, second = deliver_each(
        flavour, world.dnssec, world.port, [f"ee.{SIGNED}", f"ee.{SIGNED}"], wrap=wrap
    )
    assert first.ok, first.recipients
    assert outcome(second) is Outcome.TRANSIENT, second.recipients
    assert handler.mail_commands == 1


@pytest.mark.unbound
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_dane_host_is_never_sent_to_in_plain_text_even_with_fallback(
    flavour: Flavour, world: World
) -> None:
    # plaintext_fallback=True is the transport's default; a DANE host overrides it.
    handler = world.server(FIRST, None)
    [result] = deliver_each(
        flavour, world.dnssec, world.port, [f"notls.{SIGNED}"], plaintext_fallback=True
    )
    assert outcome(result) is Outcome.TRANSIENT, result.recipients
    assert handler.mail_commands == 0


# -- DANE: the plan's order of checks (no I/O) ---------------------------------------------------


def dane_policy(state: HostState, *, tls: TLS = TLS.OPPORTUNISTIC) -> MXPolicy:
    """A policy whose only verdict is ``state`` for MX1 (``reason`` for a failed lookup)."""
    reason = "SERVFAIL" if state is HostState.FAILED else ""
    host = DANEHost(name=MX1.name, state=state, reason=reason)
    return MXPolicy(tls=tls, dane=DANEPolicy(hosts=(host,)))


@pytest.mark.parametrize(
    ("state", "requiretls", "outcome_"),
    [
        pytest.param(HostState.FAILED, False, Outcome.TRANSIENT, id="failed TLSA lookup"),
        pytest.param(HostState.FAILED, True, Outcome.TRANSIENT, id="failed lookup, REQUIRETLS"),
        pytest.param(HostState.ENCRYPT, True, Outcome.PERMANENT, id="unusable TLSA, REQUIRETLS"),
    ],
)
def test_a_host_dane_refuses_is_refused_before_the_pool_is_asked(
    state: HostState, requiretls: bool, outcome_: Outcome
) -> None:
    # The pool answers with an idle, encrypted session that offers REQUIRETLS: one opened
    # for other mail, never authenticated. Nothing may be sent on it.
    seen, results = run_plan(dane_policy(state), envelope(requiretls=requiretls), idle=True)
    assert "send" not in seen, seen
    assert {r.outcome for r in results} == {outcome_}


def run_plan(
    policy: MXPolicy, env: MailEnvelope, *, idle: bool, opened: object = "session"
) -> tuple[list[str], list[RecipientResult]]:
    """Run one domain's plan for MX1 alone: the pool has an idle session (``idle``) or none;
    opening one gives a session, or ``opened`` when that is an error; sending succeeds."""
    plan: DomainPlan[Conn] = deliver_plan((policy, [MX1]), env, Trail("example.com"), settings())
    seen: list[str] = []
    answer: MXAnswer[Conn] = None
    for _ in range(MAX_REQUESTS_PER_TARGET + 1):
        try:
            request = plan.send(answer)
        except StopIteration as done:
            results: list[RecipientResult] = done.value
            return seen, results
        seen.append(describe(request))
        if isinstance(request, ReuseIdle):
            answer = conn() if idle else None
        elif isinstance(request, OpenSession):
            answer = opened if isinstance(opened, DeliveryError) else conn()
        elif isinstance(request, SendMessage):
            answer = accepted(env)
        else:
            answer = None
    raise AssertionError("the plan made too many requests")


@pytest.mark.parametrize("state", [HostState.AUTHENTICATE, HostState.ENCRYPT])
@pytest.mark.parametrize(
    "error",
    [
        TLSError("handshake failed", host="peer"),
        TLSError("the server does not offer STARTTLS", host="peer"),
    ],
)
def test_a_dane_host_s_tls_failure_never_falls_back_to_plain_text(
    state: HostState, error: TLSError
) -> None:
    # The policy asks for opportunistic TLS with plain-text fallback (the transport's
    # default); a DANE host overrides both (RFC 7672 §2.2): the failure defers.
    policy = attrs.evolve(dane_policy(state), plaintext_fallback=True)
    seen, results = run_plan(policy, envelope(), idle=False, opened=error)
    assert seen == ["reuse mx1.example.com", "open mx1.example.com STARTTLS"]
    assert {r.outcome for r in results} == {Outcome.TRANSIENT}


# -- DANE: DNS answers ----------------------------------------------------------------------------


@pytest.mark.unbound
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_tlsa_answer_too_large_for_udp_keeps_its_ad_bit(flavour: Flavour, world: World) -> None:
    # The RRset does not fit a UDP answer (checked first, so the test is not vacuous): the
    # resolver asks again over TCP, and that answer's AD bit must still make it secure.
    query = dns.message.make_query(f"_25._tcp.mx-big.{SIGNED}.", "TLSA", want_dnssec=True)
    query.flags |= dns.flags.AD
    query.use_edns(0, dns.flags.DO, 1232)
    udp = dns.query.udp(query, world.dnssec.host, port=world.dnssec.port, timeout=2.0)
    assert udp.flags & dns.flags.TC
    if flavour == "sync":
        found = world.dnssec.resolver(timeout=2.0).tlsa(f"mx-big.{SIGNED}", 25)
    else:
        found = run(world.dnssec.async_resolver(timeout=2.0).tlsa(f"mx-big.{SIGNED}", 25))
    assert isinstance(found, TLSARecords)
    assert found.secure
    assert {r.data for r in found.records} == {
        world.dnssec.certs.other, world.dnssec.certs.ca, world.dnssec.certs.leaf
    }  # fmt: skip
    handler = world.server(FIRST, "leaf")
    [result] = deliver_each(flavour, world.dnssec, world.port, [f"big.{SIGNED}"])
    assert result.ok, result.recipients
    assert handler.messages[0].tls


@pytest.mark.unbound
@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize(("cert", "ok"), [("leaf", True), ("untrusted", False)])
def test_in_a_mixed_tlsa_rrset_only_usable_records_count(
    flavour: Flavour, world: World, cert: str, ok: bool
) -> None:
    # mx-mixed: PKIX-TA naming the leaf (unusable for SMTP, RFC 7672 §3.1.3), DANE-EE with
    # a private matching type and with a private selector (both naming the leaf's key or
    # certificate: unusable all the same), and DANE-EE 3 1 2 of the leaf.
    # The host is authenticated by the last alone: never merely encrypted.
    verdict = DANE(world.dnssec.resolver(timeout=2.0)).policy(f"mixed.{SIGNED}")
    assert verdict is not None
    assert verdict.dane is not None
    [host] = verdict.dane.hosts
    assert host.state is HostState.AUTHENTICATE
    assert [(r.usage, r.selector, r.matching_type) for r in host.records] == [(3, 1, 2)]
    handler = world.server(FIRST, cert)
    [result] = deliver_each(flavour, world.dnssec, world.port, [f"mixed.{SIGNED}"])
    assert result.ok is ok, result.recipients
    assert handler.mail_commands == (1 if ok else 0)


@pytest.mark.unbound
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_an_insecure_mx_rrset_means_no_dane_even_for_secure_tlsa(
    flavour: Flavour, world: World
) -> None:
    # RFC 7672 §2.2.1 makes DANE for an insecure MX RRset a MAY; this library (like Postfix)
    # does not apply it: viaee.insecure.test names mx-ee.dane.test, whose TLSA RRset is
    # secure, and gets plain opportunistic TLS (any certificate; plain text if no STARTTLS).
    verdict = DANE(world.dnssec.resolver(timeout=2.0)).policy(f"viaee.{INSECURE}")
    assert verdict is None
    handler = world.server(FIRST, None)
    [result] = deliver_each(flavour, world.dnssec, world.port, [f"viaee.{INSECURE}"])
    assert result.ok, result.recipients
    assert not handler.messages[0].tls


@pytest.mark.unbound
@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize(("domain", "sni"), [("ee", "mx-ee"), ("ta", "mx-ta")])
def test_dane_sends_the_exchanger_s_name_as_sni(
    flavour: Flavour,
    world: World,
    chains: dict[str, tuple[Path, Path]],
    domain: str,
    sni: str,
) -> None:
    # RFC 7672 §8.1: the client sends SNI, the TLSA base domain (the MX host name), on every
    # handshake, the DANE-TA one's second handshake included.
    names: list[str | None] = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*chains["leaf" if domain == "ee" else "ta"])
    context.sni_callback = lambda _sock, name, _ctx: names.append(name)
    handler = MailCountingHandler()
    controller = Controller(
        handler, hostname=FIRST, port=world.port, server_hostname=HOSTNAME,
        decode_data=False, tls_context=context, timeout=10,
    )  # fmt: skip
    controller.start()
    try:
        [result] = deliver_each(flavour, world.dnssec, world.port, [f"{domain}.{SIGNED}"])
    finally:
        controller.stop()
    assert result.ok, result.recipients
    assert names, "no handshake"
    assert set(names) == {f"{sni}.{SIGNED}"}
    assert len(names) == (1 if domain == "ee" else 2)


# -- DANE matching: properties --------------------------------------------------------------------

_records = st.builds(
    TLSARecord,
    usage=st.sampled_from([DANE_TA, DANE_EE]),
    selector=st.sampled_from([0, 1]),
    matching_type=st.sampled_from([0, 1, 2]),
    data=st.binary(min_size=1, max_size=80),
)


@given(
    records=st.lists(_records, min_size=1, max_size=4),
    chain=st.lists(st.binary(max_size=120), max_size=4),
)
def test_check_chain_on_garbage_raises_tls_error_or_really_matched(
    records: list[TLSARecord], chain: list[bytes]
) -> None:
    # Malformed DER anywhere in the chain: a clean TLSError, or a match that is genuine
    # (DANE-EE on the leaf, DANE-TA on a certificate above it): never another exception.
    host = DANEHost(name="mx.example", state=HostState.AUTHENTICATE, records=tuple(records))
    try:
        found = check_chain(host, chain)
    except TLSError:
        return  # nothing matched (transient: test_dane_match checks the flag)
    assert matches(found.record, chain[0] if found.trust_anchor is None else found.trust_anchor)
    if found.trust_anchor is None:
        assert found.record.usage == DANE_EE
    else:
        assert found.record.usage == DANE_TA
        assert found.trust_anchor in chain[1:]


@given(leaf=st.binary(min_size=1, max_size=200))
def test_a_dane_ta_record_naming_the_leaf_alone_is_no_trust_anchor(leaf: bytes) -> None:
    # RFC 7672 §3.1.2: a trust anchor is a certificate *above* the leaf; a chain of the
    # leaf alone matches no DANE-TA record, even one made from that very leaf.
    digest = hashlib.sha256(leaf).digest()
    ta = TLSARecord(usage=DANE_TA, selector=0, matching_type=1, data=digest)
    host = DANEHost(name="mx.example", state=HostState.AUTHENTICATE, records=(ta,))
    with pytest.raises(TLSError):
        check_chain(host, [leaf])


@given(
    usage=st.integers(0, 255),
    selector=st.integers(0, 255),
    mtype=st.integers(0, 255),
    size=st.integers(0, 80),
)
def test_usable_means_dane_usage_known_selector_and_exact_digest_length(
    usage: int, selector: int, mtype: int, size: int
) -> None:
    made = TLSARecord(usage=usage, selector=selector, matching_type=mtype, data=b"\x00" * size)
    # RFC 6698 §2.1.3: matching type 0 is the content itself, 1 and 2 digests of a fixed size.
    right_size = size > 0 if mtype == 0 else size == {1: 32, 2: 64}.get(mtype)
    expected = usage in (DANE_TA, DANE_EE) and selector in (0, 1) and right_size
    assert is_usable(made) is expected


# -- TLS-RPT: headers and memory bounds -----------------------------------------------------------

_START = _dt.datetime(2026, 11, 28, tzinfo=_dt.UTC)
_END = _dt.datetime(2026, 11, 28, 23, 59, 59, tzinfo=_dt.UTC)


@given(domain=st.text(max_size=40), submitter=st.text(max_size=40))
def test_hostile_domains_never_reach_report_headers_with_line_breaks(
    domain: str, submitter: str
) -> None:
    # The policy domain comes from the recipient's address and the DNS; it goes into
    # TLS-Report-Domain and Subject. Refused at construction, or a header without CR/LF.
    try:
        report = TLSReport(
            organization_name="Org", start=_START, end=_END, contact_info="tls@example.org",
            report_id="r1", policy_domain=domain, policies=(),
        )  # fmt: skip
        message = report_message(
            report, sender="tls@example.org", to=["rua@example.net"], submitter=submitter
        )
    except ConfigurationError:
        return
    head = message.as_bytes().split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n"):
        assert b"\r" not in line
        assert b"\n" not in line
        if line[:1] not in (b" ", b"\t"):  # not a folded continuation
            name = line.split(b":", 1)[0]
            assert name.isascii(), line
            assert b" " not in name, line


_sessions = st.builds(
    SessionRecord,
    policy=st.builds(
        ReportPolicy,
        policy_type=st.sampled_from(list(PolicyType)),
        policy_domain=st.from_regex(r"[a-z]{1,3}\.example", fullmatch=True),
    ),
    result=st.none() | st.sampled_from(list(ResultType)),
    receiving_mx_hostname=st.text(max_size=8),
    receiving_ip=st.ip_addresses().map(str),
    sending_ip=st.ip_addresses().map(str),
    failure_reason_code=st.none() | st.text(max_size=8),
)


@hypothesis_settings(max_examples=50)
@given(
    sessions=st.lists(_sessions, max_size=200),
    max_policies=st.integers(1, 5),
    max_details=st.integers(1, 5),
)
def test_the_collector_stays_bounded_under_a_flood(
    sessions: list[SessionRecord], max_policies: int, max_details: int
) -> None:
    collector = TLSReportCollector(max_policies=max_policies, max_failure_details=max_details)
    for session in sessions:
        collector.record(session)
    dropped = collector.dropped
    reports = collector.reports(_START, _END, organization="Org", contact="c")
    results = [result for report in reports for result in report.policies]
    assert len(results) <= max_policies
    assert all(len(result.failure_details) <= max_details for result in results)
    # Nothing is lost silently: counted, or counted as dropped.
    assert sum(r.successful + r.failed for r in results) + dropped == len(sessions)


# -- MTA-STS testing: the verdict cache -----------------------------------------------------------


@given(
    puts=st.lists(
        st.tuples(st.integers(0, 30), st.sampled_from(["a", "b"]), st.booleans()), max_size=60
    ),
    size=st.integers(1, 8),
)
def test_sts_verdicts_are_bounded_and_keyed_by_the_policy_text(
    puts: list[tuple[int, str, bool]], size: int
) -> None:
    context = ssl.create_default_context()
    verdicts = STSVerdicts(size=size, ttl=100.0, clock=lambda: 0.0)
    failure = TLSError("certificate verify failed", is_transient=True, host="p")
    for index, text, failed in puts:
        target = Target(name=f"mx{index}.example", address="192.0.2.1", port=25)
        policy = MXPolicy(tls=TLS.OPPORTUNISTIC, sts_policy_string=(f"mode: testing {text}",))
        verdicts.put(target, policy, context, failure if failed else None)
        assert len(verdicts) <= size
        # A changed policy text is a different key: probed again, whatever was kept.
        other = MXPolicy(tls=TLS.OPPORTUNISTIC, sts_policy_string=(f"mode: testing {text}!",))
        assert verdicts.get(target, other, context) is None
        assert verdicts.get(target, policy, context) is (failure if failed else None)


# -- SSRF guard: more address forms ---------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "::ffff:127.0.0.1%eth0",  # mapped loopback with a zone
        "::ffff:7f00:1",  # the same, written in hex
        "::ffff:0:7f00:1",  # IPv4-translated (RFC 2765), outside 2000::/3
        "::127.0.0.1",  # IPv4-compatible (deprecated)
        "64:ff9b::10.0.0.1",  # NAT64 of RFC 1918, dotted form
        "2002:a9fe:a9fe::1",  # 6to4 of the metadata service
        "2001::1",  # Teredo (RFC 4380): not global
        "fe80::1%1",  # link-local, numeric zone
        "ff02::1",  # multicast
        "0.0.0.0",
        "255.255.255.255",
        "127.1",  # no IP address to ipaddress (inet_aton would read loopback)
        "0x7f.0.0.1",
        "2130706433",  # loopback as one number, to inet_aton
        "1.2.3.4 ",  # trailing space
    ],
)
def test_more_non_public_forms(address: str) -> None:
    assert non_public_addresses([address]) == (address,)


# -- TLS-RPT: the HTTPS POST's time bound ---------------------------------------------------------


class FakeClock:
    """A monotonic clock that moves only when a (fake) connection attempt waits."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.mark.parametrize("count", [1, 3, 8])
def test_a_post_to_many_unresponsive_addresses_stays_within_its_timeout(
    count: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A hostile rua host resolves to many public addresses that never answer (SYNs dropped).
    # The whole exchange may take ``timeout`` seconds, not ``timeout`` per address: each
    # attempt gets only the time that is left, and none starts after the deadline.
    addresses = tuple(f"93.184.216.{index}" for index in range(1, count + 1))
    clock = FakeClock()
    waited: list[float] = []

    def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in addresses]

    def hang(address: tuple[str, int], timeout: float, *args: Any, **kwargs: Any) -> Any:
        waited.append(timeout)
        clock.now += timeout  # the SYN is never answered: the whole timeout passes
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket, "create_connection", hang)
    monkeypatch.setattr(tlsrpt, "time", clock)
    report = TLSReport(
        organization_name="Org", start=_START, end=_END, contact_info="tls@example.org",
        report_id="r1", policy_domain="example.com",
    )  # fmt: skip
    with pytest.raises(ReportError, match="timed out"):
        post_report(report, "https://reports.example.com/tlsrpt", timeout=5.0)
    assert waited
    assert sum(waited) <= 5.0


# -- DANE-TA: wildcard names (RFC 7672 §3.2.3) ----------------------------------------------------


@pytest.fixture(scope="module")
def wildcard_chains(
    tls_files: TLSFiles, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, Path]]:
    """Leaves signed by the test CA (the DANE-TA anchor of mx-ta.dane.test), each naming
    only a wildcard pattern, chained with the CA: {pattern: (chain, key)}."""
    made = {}
    for index, pattern in enumerate(WILDCARDS):
        directory = tmp_path_factory.mktemp(f"wildcard{index}")
        cert, key = issue_certificate(tls_files, [pattern], directory)
        chain = directory / "chain.pem"
        chain.write_text(cert.read_text() + tls_files.ca_file.read_text())
        made[pattern] = (chain, key)
    return made


WILDCARDS = {
    f"*.{SIGNED}": True,  # the leftmost label alone: mx-ta
    f"mx-*.{SIGNED}": False,  # a partial label
    "*.test": False,  # one label only, not mx-ta.dane
    f"mx-ta.*.{SIGNED.split('.', 1)[1]}": False,  # not the leftmost label
    f"*.mx-ta.{SIGNED}": False,  # a label the name does not have
}


@pytest.mark.unbound
@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("pattern", list(WILDCARDS))
def test_dane_ta_accepts_a_wildcard_in_the_leftmost_label_only(
    flavour: Flavour,
    world: World,
    wildcard_chains: dict[str, tuple[Path, Path]],
    pattern: str,
) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*wildcard_chains[pattern])
    handler = MailCountingHandler()
    controller = Controller(
        handler, hostname=FIRST, port=world.port, server_hostname=HOSTNAME,
        decode_data=False, tls_context=context, timeout=10,
    )  # fmt: skip
    controller.start()
    try:
        [result] = deliver_each(flavour, world.dnssec, world.port, [f"ta.{SIGNED}"])
    finally:
        controller.stop()
    assert result.ok is WILDCARDS[pattern], result.recipients
    assert handler.mail_commands == (1 if WILDCARDS[pattern] else 0)
    if not result.ok:
        # The anchor matched; the leaf's name is what failed, in the second handshake.
        assert "did not verify against its DANE-TA certificate" in (
            result.recipients[0].reason or ""
        )


# -- HTTPS: a handshake fed a byte at a time ------------------------------------------------------

_DRIP_BYTES = 60
_DRIP_PAUSE = 0.1


class DripServer:
    """A TCP server on 127.0.0.1 that answers a TLS ClientHello with the header of a large
    handshake record and then one byte every ``_DRIP_PAUSE`` seconds, at most
    ``_DRIP_BYTES`` (so each read a client makes returns long before a per-read timeout).
    ``dripped`` counts the bytes sent before the client hung up."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(10.0)
        self.port = int(self.listener.getsockname()[1])
        self.dripped = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10.0)
            try:
                conn.recv(4096)  # the ClientHello
                conn.sendall(b"\x16\x03\x03\x40\x00")  # a handshake record of 16 KiB follows
                for _ in range(_DRIP_BYTES):
                    conn.sendall(b"\x02")
                    self.dripped += 1
                    time.sleep(_DRIP_PAUSE)
            except OSError:
                return  # the client hung up

    def close(self) -> None:
        self.thread.join(timeout=_DRIP_BYTES * _DRIP_PAUSE + 10.0)
        self.listener.close()


@pytest.mark.parametrize("what", ["mta-sts fetch", "tls-rpt post"])
def test_a_handshake_fed_a_byte_at_a_time_is_cut_at_the_deadline(what: str) -> None:
    # The policy host (MTA-STS) or the rua host (TLS-RPT) is chosen by the recipient domain.
    # The fetch or POST may take ``timeout`` seconds in all; a server that never lets a
    # single read time out must not hold the handshake (and the delivery waiting on the
    # policy) for as long as it likes. The server would drip for 6 s; the timeout is 0.5 s.
    server = DripServer()
    try:
        if what == "mta-sts fetch":
            with pytest.raises(PolicyFetchError):
                fetch_policy(
                    "example.com", ["127.0.0.1"], port=server.port,
                    context=ssl.create_default_context(), timeout=0.5,
                    allow_private_addresses=True,
                )  # fmt: skip
        else:
            report = TLSReport(
                organization_name="Org", start=_START, end=_END, contact_info="t@example.org",
                report_id="r1", policy_domain="example.com",
            )  # fmt: skip
            with pytest.raises(ReportError):
                post_report(
                    report, "https://reports.example.com/tlsrpt", address="127.0.0.1",
                    port=server.port, timeout=0.5, allow_private_addresses=True,
                )  # fmt: skip
    finally:
        server.close()
    # The client hung up while the server still had bytes to drip.
    assert server.dripped < _DRIP_BYTES
