"""The MX delivery plan (mailrelay.transport.mx_plan.deliver_plan), without any I/O.

Both MX transports carry out the same plan; these tests answer its requests from a script
and check what it asks for, in which order, and what it makes of the answers. Also the
routing both transports share (MXSettings.route, mail_hosts_of / amail_hosts_of).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.address import Address
from mailrelay.envelope import Envelope
from mailrelay.errors import (
    ConnectError,
    ConnectionLost,
    DeliveryError,
    ResolverError,
    SessionRefused,
    TLSError,
)
from mailrelay.flow import Session
from mailrelay.options import TLS, Timeouts
from mailrelay.reply import Reply
from mailrelay.resolver import DNSStatus, MailHost, MailHosts
from mailrelay.results import DeliveryResult, Outcome, RecipientResult
from mailrelay.transport.mx_async import amail_hosts_of
from mailrelay.transport.mx_plan import (
    MAX_REQUESTS_PER_TARGET,
    DomainPlan,
    GiveBack,
    MXAnswer,
    MXPolicy,
    MXRequest,
    MXSettings,
    OpenSession,
    ReuseIdle,
    SendMessage,
    Target,
    Trail,
    Unreachable,
    deliver_plan,
    mail_hosts_of,
)
from mailrelay.transport.pooling import PooledConnection
from tests.transport.helpers import run


class FakeExtensions:
    def __init__(self, requiretls: bool) -> None:
        self.requiretls = requiretls


class FakeSession:
    def __init__(self, *, encrypted: bool, requiretls: bool) -> None:
        self.encrypted = encrypted
        self.extensions = FakeExtensions(requiretls)
        self.closed = False


class FakeDriver:
    closed = False


Conn = PooledConnection[Any]


def conn(*, encrypted: bool = True, requiretls: bool = True) -> Conn:
    session = cast(Session, FakeSession(encrypted=encrypted, requiretls=requiretls))
    return PooledConnection(FakeDriver(), session)


RECIPIENTS = ("bob@example.com", "carol@example.com")


def envelope(*, requiretls: bool = False) -> Envelope:
    return Envelope(
        Address.parse("alice@example.org"),
        [Address.parse(r) for r in RECIPIENTS],
        requiretls=requiretls,
    )


def accepted(env: Envelope) -> DeliveryResult:
    ok = Reply(code=250, lines=("OK",), enhanced=None)
    return DeliveryResult(
        recipients=tuple(
            RecipientResult(address=r.address, outcome=Outcome.ACCEPTED, reply=ok)
            for r in env.recipients
        )
    )


def settings(tls: TLS = TLS.OPPORTUNISTIC, *, fallback: bool = True) -> MXSettings:
    return MXSettings(
        port=25,
        tls=tls,
        ssl_context=None,
        timeouts=Timeouts.all(1),
        local_hostname=None,
        tls_policy=None,
        plaintext_fallback=fallback,
        pipelining=True,
        chunking=False,
        max_addresses=10,
        refused=(),
    )


MX1 = Target(name="mx1.example.com", address="192.0.2.1", port=25)
MX2 = Target(name="mx2.example.com", address="192.0.2.2", port=25)

# Script tokens: what to answer the next request with.
CONN = "conn"  # a fresh, encrypted session that offers REQUIRETLS
PLAIN = "plain"  # a session without TLS
OK = "ok"  # the message was accepted
LOST = ConnectionLost("connection lost", host="peer")
REFUSED_5XX = SessionRefused(
    "go away", reply=Reply(code=554, lines=("no",), enhanced=None), host="peer"
)
DOWN = ConnectError("connection refused", host="peer")
BAD_TLS = TLSError("handshake failed", host="peer")
BROKEN = DeliveryError("protocol violation", is_transient=True, host="peer")


def describe(request: MXRequest[Conn]) -> str:
    if isinstance(request, ReuseIdle):
        return f"reuse {request.key[0]}"  # type: ignore[index]
    if isinstance(request, OpenSession):
        return f"open {request.target.name} {request.tls.name}"
    if isinstance(request, SendMessage):
        return "send"
    return "give back"


def drive(
    script: Sequence[object],
    *,
    targets: Sequence[Target] = (MX1, MX2),
    policy: MXPolicy | None = None,
    env: Envelope | None = None,
    unreachable: Unreachable | None = None,
) -> tuple[list[str], list[RecipientResult]]:
    """Run a plan, answering its requests from ``script`` in order."""
    env = env if env is not None else envelope()
    config = settings()
    policy = policy if policy is not None else config.default
    plan: DomainPlan[Conn] = deliver_plan(
        (policy, list(targets)), env, Trail("example.com", unreachable), config
    )
    seen: list[str] = []
    tokens = iter(script)
    answer: MXAnswer[Conn] = None
    for _ in range(len(targets) * MAX_REQUESTS_PER_TARGET + 1):
        try:
            request = plan.send(answer)
        except StopIteration as done:
            assert next(tokens, None) is None, "the script was not used up"
            results: list[RecipientResult] = done.value
            return seen, results
        seen.append(describe(request))
        token = next(tokens)
        if token == CONN:
            answer = conn()
        elif token == PLAIN:
            answer = conn(encrypted=False, requiretls=False)
        elif token == OK:
            answer = accepted(env)
        else:
            assert token is None or isinstance(token, DeliveryError)
            answer = token
    raise AssertionError("the plan made too many requests")


@pytest.mark.parametrize(
    ("script", "expected", "outcome"),
    [
        pytest.param(
            [CONN, OK, None],
            ["reuse mx1.example.com", "send", "give back"],
            Outcome.ACCEPTED,
            id="an idle session is reused",
        ),
        pytest.param(
            [None, CONN, OK, None],
            ["reuse mx1.example.com", "open mx1.example.com OPPORTUNISTIC", "send", "give back"],
            Outcome.ACCEPTED,
            id="no idle session: a fresh one",
        ),
        pytest.param(
            [CONN, LOST, CONN, OK, None],
            [
                "reuse mx1.example.com",
                "send",
                "open mx1.example.com OPPORTUNISTIC",
                "send",
                "give back",
            ],
            Outcome.ACCEPTED,
            id="a dead reused session is replaced by a fresh one to the same target",
        ),
        pytest.param(
            [CONN, BROKEN, None, CONN, OK, None],
            [
                "reuse mx1.example.com",
                "send",
                "reuse mx2.example.com",
                "open mx2.example.com OPPORTUNISTIC",
                "send",
                "give back",
            ],
            Outcome.ACCEPTED,
            id="another failure on a reused session moves on to the next target",
        ),
        pytest.param(
            [None, CONN, LOST, None, CONN, OK, None],
            [
                "reuse mx1.example.com",
                "open mx1.example.com OPPORTUNISTIC",
                "send",
                "reuse mx2.example.com",
                "open mx2.example.com OPPORTUNISTIC",
                "send",
                "give back",
            ],
            Outcome.ACCEPTED,
            id="a fresh session that dies is not retried",
        ),
        pytest.param(
            [None, BAD_TLS, CONN, OK, None],
            [
                "reuse mx1.example.com",
                "open mx1.example.com OPPORTUNISTIC",
                "open mx1.example.com NONE",
                "send",
                "give back",
            ],
            Outcome.ACCEPTED,
            id="a failed handshake falls back to plain text (RFC 7435)",
        ),
        pytest.param(
            [None, DOWN, None, DOWN],
            [
                "reuse mx1.example.com",
                "open mx1.example.com OPPORTUNISTIC",
                "reuse mx2.example.com",
                "open mx2.example.com OPPORTUNISTIC",
            ],
            Outcome.TRANSIENT,
            id="every target down is transient",
        ),
        pytest.param(
            [None, REFUSED_5XX, None, REFUSED_5XX],
            [
                "reuse mx1.example.com",
                "open mx1.example.com OPPORTUNISTIC",
                "reuse mx2.example.com",
                "open mx2.example.com OPPORTUNISTIC",
            ],
            Outcome.PERMANENT,
            id="every target refusing with 5xx is permanent",
        ),
    ],
)
def test_the_plan_asks_for_what_each_answer_calls_for(
    script: list[object], expected: list[str], outcome: Outcome
) -> None:
    seen, results = drive(script)
    assert seen == expected
    assert [r.outcome for r in results] == [outcome] * len(RECIPIENTS)
    if outcome is Outcome.ACCEPTED:
        last = [line.split()[1] for line in seen if line.startswith("reuse")][-1]
        assert {r.host for r in results} == {(MX1 if last == MX1.name else MX2).peer}


def test_a_failed_handshake_under_required_tls_moves_on_without_plain_text() -> None:
    policy = MXPolicy(tls=TLS.STARTTLS, plaintext_fallback=False)
    seen, results = drive([None, BAD_TLS, None, BAD_TLS], policy=policy)
    assert seen == [
        "reuse mx1.example.com",
        "open mx1.example.com STARTTLS",
        "reuse mx2.example.com",
        "open mx2.example.com STARTTLS",
    ]
    # RFC 8461 §5: a TLS policy failure is temporary, never a bounce.
    assert {r.outcome for r in results} == {Outcome.TRANSIENT}


def test_requiretls_skips_a_session_without_it_and_gives_it_back() -> None:
    env = envelope(requiretls=True)
    seen, results = drive([None, PLAIN, None, None, CONN, OK, None], env=env)
    assert seen == [
        "reuse mx1.example.com",
        "open mx1.example.com OPPORTUNISTIC",
        "give back",
        "reuse mx2.example.com",
        "open mx2.example.com OPPORTUNISTIC",
        "send",
        "give back",
    ]
    assert {r.outcome for r in results} == {Outcome.ACCEPTED}


def test_requiretls_refused_everywhere_is_permanent() -> None:
    env = envelope(requiretls=True)
    _, results = drive([PLAIN, None, None, PLAIN, None], targets=(MX1,), env=env)
    assert {r.outcome for r in results} == {Outcome.PERMANENT}
    assert all("REQUIRETLS" in (r.reason or "") for r in results)
    assert {str(r.enhanced) for r in results} == {"5.7.30"}  # RFC 8689 §5


def test_a_target_that_could_not_be_opened_is_skipped_by_the_next_domain() -> None:
    unreachable = Unreachable()
    drive([None, DOWN], targets=(MX1,), unreachable=unreachable)
    seen, results = drive([None], targets=(MX1,), unreachable=unreachable)
    assert seen == ["reuse mx1.example.com"]  # no second open, no second timeout
    assert {r.outcome for r in results} == {Outcome.TRANSIENT}
    assert all(str(DOWN) in (r.reason or "") for r in results)


def test_a_sent_message_is_counted_on_its_session() -> None:
    env = envelope()
    config = settings()
    plan: DomainPlan[Conn] = deliver_plan(
        (config.default, [MX1]), env, Trail("example.com"), config
    )
    session: Conn = conn()
    assert isinstance(plan.send(None), ReuseIdle)
    assert isinstance(plan.send(session), SendMessage)
    request = plan.send(accepted(env))
    assert isinstance(request, GiveBack)
    assert request.connection is session
    assert session.messages == 1


# What a transport may answer each request with.
IDLE_ANSWERS = st.sampled_from([None, CONN, PLAIN])
OPEN_ANSWERS = st.sampled_from([CONN, PLAIN, DOWN, BAD_TLS, REFUSED_5XX, LOST])
SEND_ANSWERS = st.sampled_from([OK, LOST, BROKEN, REFUSED_5XX])


@given(data=st.data(), requiretls=st.booleans(), targets=st.integers(1, 3))
def test_the_plan_ends_with_one_result_per_recipient_and_hands_back_what_it_keeps(
    data: st.DataObject, requiretls: bool, targets: int
) -> None:
    env = envelope(requiretls=requiretls)
    config = settings()
    chosen = [MX1, MX2, Target(name="mx3.example.com", address="192.0.2.3", port=25)][:targets]
    plan: DomainPlan[Conn] = deliver_plan(
        (config.default, chosen), env, Trail("example.com"), config
    )
    answer: MXAnswer[Conn] = None
    received: list[Conn] = []
    given_back: list[Conn] = []
    failed_sends: list[Conn] = []
    sent_ok = False
    for _ in range(targets * MAX_REQUESTS_PER_TARGET + 1):
        try:
            request = plan.send(answer)
        except StopIteration as done:
            results: list[RecipientResult] = done.value
            break
        if isinstance(request, ReuseIdle | OpenSession):
            pool = IDLE_ANSWERS if isinstance(request, ReuseIdle) else OPEN_ANSWERS
            token = data.draw(pool)
            if token in (CONN, PLAIN):
                answer = conn(encrypted=token == CONN, requiretls=token == CONN)
                received.append(answer)
            else:
                answer = cast(DeliveryError | None, token)
        elif isinstance(request, SendMessage):
            assert request.connection in received
            token = data.draw(SEND_ANSWERS)
            if token == OK:
                answer = accepted(env)
                sent_ok = True
            else:
                answer = cast(DeliveryError, token)
                failed_sends.append(request.connection)
        else:
            assert request.connection in received
            given_back.append(request.connection)
            answer = None
    else:
        raise AssertionError("the plan made too many requests")
    assert len(results) == len(env.recipients)
    assert ({r.outcome for r in results} == {Outcome.ACCEPTED}) == sent_ok
    # Every session the plan got is given back once, unless its send failed (then the
    # transport has closed it, and it must not go back to the pool).
    assert sorted(map(id, given_back)) == sorted(id(c) for c in received if c not in failed_sends)


# -- routing ------------------------------------------------------------------------------


def hosts(*names: str) -> MailHosts:
    return MailHosts(
        domain="example.com",
        status=DNSStatus.OK,
        hosts=tuple(
            MailHost(name=n, status=DNSStatus.OK, ipv4=(f"192.0.2.{i}",), preference=10)
            for i, n in enumerate(names, start=1)
        ),
    )


@pytest.mark.parametrize(
    ("found", "outcome"),
    [
        (ResolverError("timed out", name="example.com", is_transient=True), Outcome.TRANSIENT),
        (ResolverError("bad name", name="example.com", is_transient=False), Outcome.PERMANENT),
        (MailHosts(domain="example.com", status=DNSStatus.OK, null_mx=True), Outcome.PERMANENT),
        (MailHosts(domain="example.com", status=DNSStatus.NXDOMAIN), Outcome.PERMANENT),
        (hosts("mx1.example.com", "mx2.example.com"), None),
    ],
)
def test_route_gives_targets_or_every_recipient_the_dns_verdict(
    found: MailHosts | ResolverError, outcome: Outcome | None
) -> None:
    config = settings()
    env = envelope()
    routed = config.route("example.com", env, config.default, found)
    if outcome is None:
        assert not isinstance(routed, list)
        assert routed[0] is config.default
        assert [t.name for t in routed[1]] == ["mx1.example.com", "mx2.example.com"]
    else:
        assert isinstance(routed, list)
        assert [r.address for r in routed] == [r.address for r in env.recipients]
        assert {r.outcome for r in routed} == {outcome}


class FakeResolver:
    def __init__(self, answer: MailHosts | ResolverError) -> None:
        self.answer = answer
        self.asked: list[str] = []

    def mail_hosts(self, domain: str) -> MailHosts:
        self.asked.append(domain)
        if isinstance(self.answer, ResolverError):
            raise self.answer
        return self.answer


class FakeAsyncResolver(FakeResolver):
    async def mail_hosts(self, domain: str) -> MailHosts:  # type: ignore[override]
        return FakeResolver.mail_hosts(self, domain)


@pytest.mark.parametrize(
    "answer",
    [hosts("mx.example.com"), ResolverError("SERVFAIL", name="example.com", is_transient=True)],
)
def test_mail_hosts_of_returns_the_resolver_answer_or_its_error(
    answer: MailHosts | ResolverError,
) -> None:
    sync = FakeResolver(answer)
    assert mail_hosts_of(sync, "example.com") is answer  # type: ignore[arg-type]
    asynchronous = FakeAsyncResolver(answer)
    found = run(amail_hosts_of(asynchronous, "example.com"))  # type: ignore[arg-type]
    assert found is answer
    assert sync.asked == asynchronous.asked == ["example.com"]


@pytest.mark.parametrize(
    ("literal", "v4", "v6"),
    [("[192.0.2.7]", ("192.0.2.7",), ()), ("[IPv6:2001:db8::1]", (), ("2001:db8::1",))],
)
def test_an_address_literal_needs_no_lookup(
    literal: str, v4: tuple[str, ...], v6: tuple[str, ...]
) -> None:
    resolver = FakeResolver(ResolverError("must not be asked"))
    found = mail_hosts_of(resolver, literal)  # type: ignore[arg-type]
    assert isinstance(found, MailHosts)
    assert (found.hosts[0].ipv4, found.hosts[0].ipv6) == (v4, v6)
    found_async = run(amail_hosts_of(FakeAsyncResolver(resolver.answer), literal))  # type: ignore[arg-type]
    assert found_async == found
    assert resolver.asked == []
