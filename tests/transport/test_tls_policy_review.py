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

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import dns.flags
import dns.message
import dns.query
import pytest

from mailrelay.envelope import Envelope as MailEnvelope
from mailrelay.mailhosts import TLSARecord, TLSARecords
from mailrelay.message import Message
from mailrelay.options import TLS, Timeouts
from mailrelay.results import DeliveryResult, Outcome, RecipientResult
from mailrelay.transport.dane import DANE, AsyncDANE, DANEHost, DANEPolicy, HostState, spki
from mailrelay.transport.mx import MXPolicy, MXTransport
from mailrelay.transport.mx_async import AsyncMXTransport
from mailrelay.transport.mx_plan import (
    MAX_REQUESTS_PER_TARGET,
    DomainPlan,
    MXAnswer,
    OpenSession,
    ReuseIdle,
    SendMessage,
    Trail,
    deliver_plan,
)
from tests.peers.dnssec import INSECURE, SIGNED, DNSSECServer
from tests.transport.helpers import FLAVOURS, Flavour, run

# The DANE tests' fixtures (the validating unbound, certificate chains, the aiosmtpd factory)
# are imported by name, which is how pytest finds them; tests then take them as arguments
# of the same names (what F811, silenced for this file at its top, reports).
from tests.transport.test_dane import (  # noqa: F401
    FIRST,
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
            resolver, tls_policy=lambda domain: changed(hook(domain)), **options
        ) as transport:
            return [transport.send(message, envelope) for message, envelope in messages]

    async def main() -> list[DeliveryResult]:
        aresolver = dnssec.async_resolver(timeout=2.0)
        ahook = AsyncDANE(aresolver)

        async def policy(domain: str) -> Any:
            return changed(await ahook(domain))

        async with AsyncMXTransport(aresolver, tls_policy=policy, **options) as transport:
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
    env = envelope(requiretls=requiretls)
    config = settings()
    plan: DomainPlan[Conn] = deliver_plan(
        (dane_policy(state), [MX1]), env, Trail("example.com"), config
    )
    seen: list[str] = []
    answer: MXAnswer[Conn] = None
    for _ in range(MAX_REQUESTS_PER_TARGET + 1):
        try:
            request = plan.send(answer)
        except StopIteration as done:
            results: list[RecipientResult] = done.value
            break
        seen.append(describe(request))
        if isinstance(request, ReuseIdle | OpenSession):
            answer = conn()
        elif isinstance(request, SendMessage):
            answer = accepted(env)
        else:
            answer = None
    else:
        raise AssertionError("the plan made too many requests")
    assert "send" not in seen, seen
    assert {r.outcome for r in results} == {outcome_}


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
