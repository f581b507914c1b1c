"""MTA-STS testing mode's decisions in the MX plan (mailrelay.transport.mx_plan), no I/O.

The plan is answered from a script, as in test_mx_plan.py: which sessions it opens (a
verified probe, then opportunistic delivery), what it tells the reporter, what it keeps
(:class:`STSVerdicts`) and which reuse key it files sessions under.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.address import Address
from mailrelay.envelope import Envelope
from mailrelay.errors import ConfigurationError, ConnectError, TLSError
from mailrelay.flow import Session
from mailrelay.options import TLS, Timeouts
from mailrelay.reply import Reply
from mailrelay.resolver import DNSStatus, MailHost, MailHosts
from mailrelay.results import DeliveryResult, Outcome, RecipientResult
from mailrelay.transport.mtasts import Mode, STSPolicy
from mailrelay.transport.mx_plan import (
    MAX_REQUESTS_PER_TARGET,
    DomainPlan,
    MXAnswer,
    MXPolicy,
    MXSettings,
    OpenSession,
    ReuseIdle,
    SendMessage,
    STSVerdicts,
    Target,
    TLSAttempt,
    Trail,
    deliver_plan,
    plan,
)
from mailrelay.transport.pooling import PooledConnection
from mailrelay.transport.tlsrpt import ResultType, classify


class FakeExtensions:
    requiretls = False


class FakeSession:
    def __init__(self, encrypted: bool) -> None:
        self.encrypted = encrypted
        self.extensions = FakeExtensions()
        self.closed = False


class FakeDriver:
    closed = False
    local_address = "192.0.2.99"


Conn = PooledConnection[Any]


def conn(*, encrypted: bool = True) -> Conn:
    return PooledConnection(FakeDriver(), cast(Session, FakeSession(encrypted)))


class Reporter:
    def __init__(self) -> None:
        self.attempts: list[TLSAttempt] = []

    def tls_attempt(self, attempt: TLSAttempt) -> None:
        self.attempts.append(attempt)

    def results(self) -> list[ResultType | None]:
        return [classify(a).result for a in self.attempts]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


MX1 = Target(name="mx1.example.com", address="192.0.2.1", port=25)
MX2 = Target(name="mx2.example.com", address="192.0.2.2", port=25)
TESTING = STSPolicy(mode=Mode.TESTING, max_age=86400, mx=("*.example.com",))
VERIFYING = ssl.create_default_context()
BAD_CERT = TLSError("certificate failed verification for 'mx1.example.com': self-signed")
NO_STARTTLS = TLSError("mx1.example.com does not offer STARTTLS")
DOWN = ConnectError("connection refused", host="peer")
# Script tokens.
CONN, PLAIN, OK = "conn", "plain", "ok"


def settings(
    reporter: Reporter | None, tls: TLS = TLS.OPPORTUNISTIC, clock: Clock | None = None
) -> MXSettings:
    config = MXSettings(
        port=25, tls=tls, ssl_context=VERIFYING, timeouts=Timeouts.all(1), local_hostname=None,
        tls_policy=None, plaintext_fallback=True, pipelining=True, chunking=False,
        max_addresses=10, tls_reporter=reporter, refused=(),)  # fmt: skip
    if clock is not None:
        config.sts_verdicts = STSVerdicts(clock=clock)
    return config


def policy_of(config: MXSettings, mx: tuple[str, ...] = ("*.example.com",)) -> MXPolicy:
    """What the transport makes of the MTA-STS hook's testing answer."""
    answer = STSPolicy(mode=Mode.TESTING, max_age=86400, mx=mx).testing_policy()
    assert answer is not None
    config.tls_policy = lambda domain: answer
    return config.policy("example.com")


def envelope() -> Envelope:
    return Envelope(Address.parse("alice@example.org"), [Address.parse("bob@example.com")])


def accepted(env: Envelope) -> DeliveryResult:
    ok = Reply(code=250, lines=("OK",), enhanced=None)
    return DeliveryResult(
        recipients=tuple(
            RecipientResult(address=r.address, outcome=Outcome.ACCEPTED, reply=ok)
            for r in env.recipients
        )
    )


def drive(
    config: MXSettings,
    policy: MXPolicy,
    script: Sequence[object],
    targets: Sequence[Target] = (MX1,),
) -> tuple[list[str], list[RecipientResult]]:
    """Run a plan, answering its requests from ``script``; what it asked, and the results."""
    env = envelope()
    domain_plan: DomainPlan[Conn] = deliver_plan(
        (policy, list(targets)), env, Trail("example.com"), config
    )
    seen: list[str] = []
    tokens = iter(script)
    answer: MXAnswer[Conn] = None
    for _ in range(len(targets) * MAX_REQUESTS_PER_TARGET + 1):
        try:
            request = domain_plan.send(answer)
        except StopIteration as done:
            results: list[RecipientResult] = done.value
            return seen, results
        if isinstance(request, ReuseIdle):
            seen.append("reuse")
            answer = None
        elif isinstance(request, OpenSession):
            seen.append(f"open {request.target.name} {request.tls.name}")
            token = next(tokens)
            answer = conn(encrypted=token == CONN) if token in (CONN, PLAIN) else token  # type: ignore[assignment]
        elif isinstance(request, SendMessage):
            seen.append("send")
            token = next(tokens)
            answer = accepted(env) if token == OK else token  # type: ignore[assignment]
        else:
            seen.append("give back")
            answer = None
    raise AssertionError("too many requests")


PROBE = "open mx1.example.com STARTTLS"
OPPORTUNISTIC = "open mx1.example.com OPPORTUNISTIC"
PLAINTEXT = "open mx1.example.com NONE"


@pytest.mark.parametrize(
    ("script", "requests", "reported"),
    [
        # Verified: that session carries the message, reported as a success.
        ([CONN, OK], ["reuse", PROBE, "send", "give back"], [None]),
        # A bad certificate: reported, then a fresh opportunistic session delivers.
        (
            [BAD_CERT, CONN, OK],
            ["reuse", PROBE, OPPORTUNISTIC, "send", "give back"],
            [ResultType.CERTIFICATE_NOT_TRUSTED],
        ),
        # No STARTTLS: reported; opportunistic delivery goes on (here it gets plain text).
        (
            [NO_STARTTLS, PLAIN, OK],
            ["reuse", PROBE, OPPORTUNISTIC, "send", "give back"],
            [ResultType.STARTTLS_NOT_SUPPORTED],
        ),
        # The opportunistic handshake fails too: plain text, and still one report.
        (
            [BAD_CERT, BAD_CERT, PLAIN, OK],
            ["reuse", PROBE, OPPORTUNISTIC, PLAINTEXT, "send", "give back"],
            [ResultType.CERTIFICATE_NOT_TRUSTED],
        ),
    ],
)
def test_the_probe_decides_what_is_reported_never_whether_to_deliver(
    script: list[object], requests: list[str], reported: list[ResultType | None]
) -> None:
    reporter = Reporter()
    config = settings(reporter)
    seen, results = drive(config, policy_of(config), script)
    assert seen == requests
    assert [r.outcome for r in results] == [Outcome.ACCEPTED]
    assert reporter.results() == reported
    for attempt in reporter.attempts:
        assert attempt.policy.sts_policy_string == TESTING.policy_string()
        assert classify(attempt).policy.policy_type.value == "sts"


def test_an_unreachable_exchanger_is_not_reported_and_the_next_is_probed() -> None:
    reporter = Reporter()
    config = settings(reporter)
    seen, results = drive(config, policy_of(config), [DOWN, CONN, OK], targets=(MX1, MX2))
    assert seen == ["reuse", PROBE, "reuse", "open mx2.example.com STARTTLS", "send", "give back"]
    assert [r.outcome for r in results] == [Outcome.ACCEPTED]
    assert reporter.results() == [None]
    assert len(config.sts_verdicts) == 1  # only mx2's verdict: mx1 was never judged


def test_an_exchanger_outside_the_patterns_is_reported_without_a_probe() -> None:
    reporter = Reporter()
    config = settings(reporter)
    policy = policy_of(config, mx=("mx.elsewhere.example",))
    seen, results = drive(config, policy, [CONN, OK])
    assert seen == ["reuse", OPPORTUNISTIC, "send", "give back"]
    assert [r.outcome for r in results] == [Outcome.ACCEPTED]
    [record] = [classify(a) for a in reporter.attempts]
    assert record.result is ResultType.VALIDATION_FAILURE
    assert record.failure_reason_code == "mx-mismatch"


def test_a_kept_failure_spares_the_probe_until_it_expires() -> None:
    reporter = Reporter()
    clock = Clock()
    config = settings(reporter, clock=clock)
    policy = policy_of(config)
    drive(config, policy, [BAD_CERT, CONN, OK])
    # The next fresh session: no probe, counted as the failure kept.
    seen, _ = drive(config, policy, [CONN, OK])
    assert seen == ["reuse", OPPORTUNISTIC, "send", "give back"]
    assert reporter.results() == [ResultType.CERTIFICATE_NOT_TRUSTED] * 2
    # A connection that never opened is no session: nothing reported for it.
    drive(config, policy, [DOWN])
    assert len(reporter.attempts) == 2
    clock.now += config.sts_verdicts.ttl
    seen, _ = drive(config, policy, [CONN, OK])
    assert seen == ["reuse", PROBE, "send", "give back"]  # probed again, verified now
    assert reporter.results()[-1] is None


def test_a_new_policy_is_probed_afresh() -> None:
    reporter = Reporter()
    config = settings(reporter)
    drive(config, policy_of(config), [BAD_CERT, CONN, OK])
    seen, _ = drive(config, policy_of(config, mx=("*.example.com", "mx9.example.net")), [CONN, OK])
    assert seen[:2] == ["reuse", PROBE]


@pytest.mark.parametrize(
    ("reporter", "tls"),
    [(None, TLS.OPPORTUNISTIC), (Reporter(), TLS.NONE), (Reporter(), TLS.STARTTLS)],
)
def test_no_probe_without_a_reporter_or_with_another_tls_mode(
    reporter: Reporter | None, tls: TLS
) -> None:
    config = settings(reporter, tls=tls)
    policy = policy_of(config)
    assert not config.sts_probes(policy, MX1)
    seen, _ = drive(config, policy, [CONN, OK])
    assert seen == ["reuse", f"open mx1.example.com {tls.name}", "send", "give back"]
    assert len(config.sts_verdicts) == 0


def test_testing_mode_keeps_the_transports_defaults_and_every_exchanger() -> None:
    config = settings(Reporter(), tls=TLS.OPPORTUNISTIC)
    policy = policy_of(config, mx=("mx.elsewhere.example",))
    assert policy.sts_testing
    assert policy.tls is TLS.OPPORTUNISTIC
    assert policy.ssl_context is VERIFYING  # the transport's: what the probe verifies with
    assert policy.mx_patterns == ("mx.elsewhere.example",)
    hosts = MailHosts(
        domain="example.com",
        status=DNSStatus.OK,
        hosts=(
            MailHost(
                name="mx1.example.com",
                status=DNSStatus.OK,
                ipv4=("192.0.2.1",),
                ipv6=(),
                preference=10,
            ),
        ),
    )
    # RFC 8461 §5: the patterns are reported against, never used to skip an exchanger.
    assert plan("example.com", hosts, policy, port=25, max_addresses=10) == [MX1]
    enforcing = enforce_version(policy)
    assert not isinstance(plan("example.com", hosts, enforcing, port=25, max_addresses=10), list)


def enforce_version(policy: MXPolicy) -> MXPolicy:
    return MXPolicy(tls=TLS.STARTTLS, mx_patterns=policy.mx_patterns, plaintext_fallback=False)


def test_probed_sessions_have_their_own_reuse_key() -> None:
    with_reporter = settings(Reporter())
    without = settings(None)
    policy = policy_of(with_reporter)
    plain_key = without.reuse_key(MX1, without.default)
    assert with_reporter.reuse_key(MX1, policy) != plain_key
    assert with_reporter.reuse_key(MX1, policy) == with_reporter.reuse_key(MX1, policy)
    # Without a reporter, a testing domain shares the plain opportunistic sessions.
    assert without.reuse_key(MX1, policy_of(without)) == plain_key


def test_the_hook_answers_a_testing_policy_only_for_testing_mode() -> None:
    assert STSPolicy(mode=Mode.ENFORCE, max_age=1, mx=("a.example",)).testing_policy() is None
    assert STSPolicy(mode=Mode.NONE, max_age=1).testing_policy() is None
    answer = TESTING.testing_policy()
    assert answer is not None
    assert answer.sts_testing
    assert answer.sts_policy_string == TESTING.policy_string()


def test_the_verdict_cache_needs_sane_limits() -> None:
    with pytest.raises(ConfigurationError):
        STSVerdicts(ttl=0)
    with pytest.raises(ConfigurationError):
        STSVerdicts(size=0)


@given(st.lists(st.integers(min_value=0, max_value=50), max_size=200), st.integers(1, 10))
def test_the_verdict_cache_is_bounded_and_keeps_the_latest(names: list[int], size: int) -> None:
    clock = Clock()
    verdicts = STSVerdicts(size=size, clock=clock)
    policy = MXPolicy(sts_testing=True, sts_policy_string=("version: STSv1",))
    for number in names:
        target = Target(name=f"mx{number}.example.com", address="192.0.2.1", port=25)
        verdicts.put(target, policy, VERIFYING, BAD_CERT)
        assert len(verdicts) <= size
        assert verdicts.get(target, policy, VERIFYING) is BAD_CERT
