"""The SMTP callout against the scripted server, aiosmtpd, Postfix and the test DNS.

Scripted servers listen on 127.0.0.1 at a free port, so most probes go to an address literal
(``bob@[127.0.0.1]``) with the callout's ``port`` pointed at that server: no DNS involved.
"""

from __future__ import annotations

import random
import re
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.address import Address
from mailrelay.callout import (
    AsyncCallout,
    Callout,
    CalloutResult,
    CalloutStatus,
    _CalloutBase,
    _judge,
    _Probe,
    acallout,
    callout,
)
from mailrelay.errors import ConnectError, DeliveryError, ResolverError, TLSError
from mailrelay.flow import ProbeResult, Session
from mailrelay.flow import Step as DialogueStep
from mailrelay.options import TLS, Timeouts
from mailrelay.protocol import Extensions
from mailrelay.reply import Reply
from mailrelay.resolver import DNSStatus, MailHost, MailHosts
from mailrelay.transport.mx import Target
from mailrelay.validate import AsyncRecipientValidator, Reason, RecipientValidator, Verdict
from tests.peers.aiosmtpd_server import AiosmtpdServer
from tests.peers.postfix import PostfixInstance
from tests.peers.scripted import (
    Action,
    ScriptedServerFactory,
    Step,
    ehlo,
    free_port,
    greeting,
    quit_step,
)
from tests.peers.unbound import UnboundServer
from tests.transport.helpers import FLAVOURS, Flavour, run

FAST = Timeouts.all(2)
DECOY = r"RCPT TO:<nobody-[a-z0-9]{16}@\[127\.0\.0\.1\]>"


def probe(
    flavour: Flavour, addresses: list[str], *, unbound: UnboundServer, **kwargs: Any
) -> list[CalloutResult]:
    kwargs.setdefault("timeouts", FAST)
    kwargs.setdefault("random", random.Random(1))
    if flavour == "sync":
        return Callout(unbound.resolver(timeout=0.5), **kwargs, refused_networks=()).probe_many(
            addresses
        )

    async def main() -> list[CalloutResult]:
        prober = AsyncCallout(unbound.async_resolver(timeout=0.5), **kwargs, refused_networks=())
        return await prober.probe_many(addresses)

    return run(main())


def ok(expect: str, text: bytes = b"250 2.1.5 Ok\r\n") -> Step:
    return Step(expect=expect, reply=text)


def rset() -> Step:
    return ok("RSET", b"250 2.0.0 Ok\r\n")


def mail(sender: str = "") -> Step:
    return ok(f"MAIL FROM:<{re.escape(sender)}>", b"250 2.1.0 Ok\r\n")


# -- the dialogue, exactly -------------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_probe_dialogue_never_sends_data(
    flavour: Flavour, scripted_server: ScriptedServerFactory, unbound: UnboundServer
) -> None:
    server = scripted_server(
        [
            [
                greeting(),
                ehlo("PIPELINING"),
                mail(),
                ok(r"RCPT TO:<bob@\[127\.0\.0\.1\]>"),
                Step(expect=DECOY, reply=b"550 5.1.1 No such user\r\n"),
                rset(),
                quit_step(),
            ]
        ],
        tls=None,
    )
    [result] = probe(flavour, ["bob@[127.0.0.1]"], unbound=unbound, port=server.port)
    assert result.status is CalloutStatus.ACCEPTED
    assert result.catch_all is False
    assert result.conclusive
    assert result.host == f"127.0.0.1:{server.port}"
    session = server.session(0)
    assert not [e for e in session.events if e.startswith("mismatch")], session.events
    assert b"DATA" not in bytes(session.received)


@pytest.mark.parametrize(
    ("rcpt", "decoy", "status", "catch_all"),
    [
        (b"250 2.1.5 Ok\r\n", b"250 2.1.5 Ok\r\n", CalloutStatus.ACCEPTED, True),
        (
            b"550 5.1.1 Unknown user\r\n",
            b"550 5.1.1 Unknown user\r\n",
            CalloutStatus.REFUSED,
            False,
        ),
        (b"450 4.2.0 Greylisted\r\n", b"450 4.2.0 Greylisted\r\n", CalloutStatus.UNKNOWN, None),
        (b"553 5.1.3 Bad mailbox\r\n", b"451 4.3.0 Later\r\n", CalloutStatus.REFUSED, None),
    ],
)
def test_rcpt_replies_decide_the_status(
    rcpt: bytes,
    decoy: bytes,
    status: CalloutStatus,
    catch_all: bool | None,
    *,
    scripted_server: ScriptedServerFactory,
    unbound: UnboundServer,
) -> None:
    server = scripted_server(
        [
            [
                greeting(),
                ehlo(),
                mail(),
                Step(expect="RCPT TO:<bob@.*>", reply=rcpt),
                Step(expect=DECOY, reply=decoy),
                rset(),
                quit_step(),
            ]
        ],
        tls=None,
    )
    [result] = probe("sync", ["bob@[127.0.0.1]"], unbound=unbound, port=server.port)
    assert result.status is status
    assert result.catch_all is catch_all
    assert result.reply is not None
    assert str(result.reply.code) == rcpt.decode()[:3]
    assert result.conclusive is (
        status is CalloutStatus.REFUSED or (status is CalloutStatus.ACCEPTED and not catch_all)
    )


def test_refused_mail_from_says_nothing_about_the_address(
    scripted_server: ScriptedServerFactory, unbound: UnboundServer
) -> None:
    server = scripted_server(
        [
            [
                greeting(),
                ehlo(),
                Step(expect="MAIL FROM:<>", reply=b"550 5.7.1 No null senders here\r\n"),
                rset(),
                quit_step(),
            ]
        ],
        tls=None,
    )
    [result] = probe("sync", ["bob@[127.0.0.1]"], unbound=unbound, port=server.port)
    assert result.status is CalloutStatus.UNKNOWN
    assert result.reply is not None
    assert result.reply.code == 550
    assert "MAIL FROM" in result.detail
    assert b"RCPT" not in bytes(server.session(0).received)


def test_configured_sender_and_no_catch_all_probe(
    scripted_server: ScriptedServerFactory, unbound: UnboundServer
) -> None:
    server = scripted_server(
        [
            [
                greeting(),
                ehlo(),
                mail("probe@mailrelay.test"),
                ok("RCPT TO:<bob@.*>"),
                rset(),
                quit_step(),
            ]
        ],
        tls=None,
    )
    [result] = probe(
        "sync",
        ["bob@[127.0.0.1]"],
        unbound=unbound,
        port=server.port,
        sender="probe@mailrelay.test",
        detect_catch_all=False,
    )
    assert result.status is CalloutStatus.ACCEPTED
    assert result.catch_all is None
    assert not result.conclusive
    assert not [e for e in server.session(0).events if e.startswith("mismatch")]


def test_recipients_are_batched_with_rset_between(
    scripted_server: ScriptedServerFactory, unbound: UnboundServer
) -> None:
    server = scripted_server(
        [
            [
                greeting(),
                ehlo(),
                mail(),
                ok("RCPT TO:<a@.*>"),
                Step(expect="RCPT TO:<b@.*>", reply=b"550 5.1.1 No\r\n"),
                Step(expect=DECOY, reply=b"550 5.1.1 No\r\n"),
                rset(),
                mail(),
                ok("RCPT TO:<c@.*>"),
                rset(),
                quit_step(),
            ]
        ],
        tls=None,
    )
    results = probe(
        "sync",
        ["a@[127.0.0.1]", "b@[127.0.0.1]", "c@[127.0.0.1]"],
        unbound=unbound,
        port=server.port,
        max_recipients=2,
    )
    assert [r.status for r in results] == [
        CalloutStatus.ACCEPTED,
        CalloutStatus.REFUSED,
        CalloutStatus.ACCEPTED,
    ]
    # The decoy went with the first batch; the second batch learns its answer too.
    assert [r.catch_all for r in results] == [False, False, False]
    assert not [e for e in server.session(0).events if e.startswith("mismatch")]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_421_mid_probe_leaves_the_rest_unknown(
    flavour: Flavour, scripted_server: ScriptedServerFactory, unbound: UnboundServer
) -> None:
    server = scripted_server(
        [
            [
                greeting(),
                ehlo(),
                mail(),
                Step(expect="RCPT TO:<a@.*>", reply=b"550 5.1.1 No\r\n"),
                Step(
                    expect="RCPT TO:<b@.*>",
                    reply=b"421 4.7.0 Too many errors\r\n",
                    action=Action.CLOSE,
                ),
            ]
        ],
        tls=None,
    )
    results = probe(flavour, ["a@[127.0.0.1]", "b@[127.0.0.1]"], unbound=unbound, port=server.port)
    assert [r.status for r in results] == [CalloutStatus.REFUSED, CalloutStatus.UNKNOWN]
    assert "ended the session" in results[1].detail


def test_failed_starttls_probes_again_in_plain_text(
    scripted_server: ScriptedServerFactory, unbound: UnboundServer
) -> None:
    server = scripted_server(
        [
            [
                greeting(),
                ehlo("STARTTLS"),
                Step(expect="STARTTLS", reply=b"220 Go ahead\r\n", action=Action.FAIL_TLS),
            ],
            [
                greeting(),
                ehlo("STARTTLS"),
                mail(),
                ok("RCPT TO:<bob@.*>"),
                Step(expect=DECOY, reply=b"550 5.1.1 No\r\n"),
                rset(),
                quit_step(),
            ],
        ]
    )
    [result] = probe("sync", ["bob@[127.0.0.1]"], unbound=unbound, port=server.port)
    assert result.status is CalloutStatus.ACCEPTED
    assert len(server.sessions) == 2


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize(
    ("address", "detail"),
    [
        ("bob@nullmx.test", "null MX"),
        ("bob@no-such-domain.test", "NXDOMAIN"),
        ("bob@x.servfail.test", "DNS lookup failed"),
        ("bob@[127.0.0.1]", "no exchanger answered"),  # nothing listens on the port
    ],
)
def test_no_server_to_ask_is_unknown(
    flavour: Flavour, address: str, detail: str, unbound: UnboundServer
) -> None:
    [result] = probe(flavour, [address], unbound=unbound, port=free_port())
    assert result.status is CalloutStatus.UNKNOWN
    assert detail in result.detail
    assert result.reply is None


# -- real servers ------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_aiosmtpd_accepts_everything_so_acceptance_is_a_catch_all(
    flavour: Flavour, aiosmtpd_server: AiosmtpdServer, unbound: UnboundServer
) -> None:
    results = probe(
        flavour,
        ["bob@[127.0.0.1]", "reject@[127.0.0.1]", "tempfail@[127.0.0.1]"],
        unbound=unbound,
        port=aiosmtpd_server.port,
    )
    assert [r.status for r in results] == [
        CalloutStatus.ACCEPTED,
        CalloutStatus.REFUSED,
        CalloutStatus.UNKNOWN,
    ]
    assert results[0].catch_all is True
    assert not results[0].conclusive
    assert aiosmtpd_server.messages == []  # nothing was delivered


@pytest.mark.postfix
@pytest.mark.unbound
def test_postfix_through_the_mx(postfix: PostfixInstance, unbound: UnboundServer) -> None:
    results = probe(
        "sync",
        ["alice@mailrelay.test", "nobody-here@mailrelay.test"],
        unbound=unbound,
        port=postfix.smtp_port,
        timeouts=Timeouts.all(10),
    )
    alice, nobody = results
    assert alice.status is CalloutStatus.ACCEPTED
    assert alice.catch_all is False
    assert alice.conclusive
    assert alice.host == f"mx.mailrelay.test[127.0.0.1]:{postfix.smtp_port}"
    assert nobody.status is CalloutStatus.REFUSED
    assert nobody.reply is not None
    assert nobody.reply.code == 550


def test_one_off_helpers(aiosmtpd_server: AiosmtpdServer, unbound: UnboundServer) -> None:
    options = {
        "port": aiosmtpd_server.port,
        "timeouts": FAST,
        "tls": TLS.NONE,
        "refused_networks": (),
    }
    result = callout("reject@[127.0.0.1]", unbound.resolver(), **options)
    assert result.status is CalloutStatus.REFUSED
    result = run(acallout(Address.parse("bob@[127.0.0.1]"), unbound.async_resolver(), **options))
    assert result.status is CalloutStatus.ACCEPTED


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="max_recipients"):
        Callout(max_recipients=0, refused_networks=())
    with pytest.raises(ValueError, match="TLS"):
        Callout(tls=TLS.IMPLICIT, refused_networks=())


# -- the validator's optional hook -------------------------------------------------------------


@pytest.mark.postfix
@pytest.mark.unbound
def test_validator_runs_the_callout_after_a_deliverable_dns_verdict(
    postfix: PostfixInstance, unbound: UnboundServer
) -> None:
    prober = Callout(
        unbound.resolver(), port=postfix.smtp_port, timeouts=Timeouts.all(10), refused_networks=()
    )
    validator = RecipientValidator(
        unbound.resolver(), special_use=(), callout=prober, refused_networks=()
    )
    alice = validator.validate("alice@mailrelay.test")
    assert alice.verdict is Verdict.DELIVERABLE
    assert alice.callout is not None
    assert alice.callout.status is CalloutStatus.ACCEPTED
    texts = ["nobody-here@mailrelay.test", "x@nullmx.test", "alice@mailrelay.test"]
    many = validator.validate_many(texts)
    assert [v.reason for v in many] == [Reason.MAILBOX_REFUSED, Reason.NULL_MX, Reason.OK]
    assert many[0].verdict is Verdict.UNDELIVERABLE
    assert many[1].callout is None  # never probed: the DNS already said no
    assert many[2].callout is not None


@pytest.mark.unbound
def test_async_validator_hook(aiosmtpd_server: AiosmtpdServer, unbound: UnboundServer) -> None:
    # a-only.test is an implicit MX at 127.0.0.1, where aiosmtpd listens.
    async def main() -> list[Any]:
        prober = AsyncCallout(
            unbound.async_resolver(), port=aiosmtpd_server.port, timeouts=FAST, refused_networks=()
        )
        validator = AsyncRecipientValidator(
            unbound.async_resolver(), special_use=(), callout=prober, refused_networks=()
        )
        one = await validator.validate("reject@a-only.test")
        return [one, *await validator.validate_many(["bob@a-only.test", "x@nullmx.test"])]

    refused, accepted, null = run(main())
    assert refused.reason is Reason.MAILBOX_REFUSED
    assert accepted.reason is Reason.OK
    assert accepted.callout.catch_all is True
    assert null.callout is None


def test_validator_without_a_callout_never_probes(unbound: UnboundServer) -> None:
    validation = RecipientValidator(
        unbound.resolver(), special_use=(), refused_networks=()
    ).validate("bob@mailrelay.test")
    assert validation.reason is Reason.OK
    assert validation.callout is None


# -- the judgement, as a property ---------------------------------------------------------------

_codes = st.sampled_from([250, 251, 252, 421, 450, 451, 452, 550, 551, 552, 553, 554])


@given(
    mail=st.one_of(st.none(), _codes),
    rcpts=st.lists(st.one_of(st.none(), _codes), min_size=1, max_size=5),
    decoy=st.one_of(st.none(), _codes),
)
def test_judge_properties(mail: int | None, rcpts: list[int | None], decoy: int | None) -> None:
    addresses = [Address.parse(f"u{i}@example.test") for i in range(len(rcpts))]
    probe_result = _Probe(
        mail=None if mail is None else Reply.of(mail, "x"),
        rcpts=tuple(None if c is None else Reply.of(c, "x") for c in rcpts),
        decoy=None if decoy is None else Reply.of(decoy, "x"),
    )
    results = _judge(addresses, probe_result, "mx.example.test[192.0.2.1]:25")
    assert [r.address for r in results] == addresses
    for result, code in zip(results, rcpts, strict=True):
        if mail is None or mail >= 300:
            expected = CalloutStatus.UNKNOWN  # MAIL refused: nothing learnt about addresses
        elif code is not None and code < 300:
            expected = CalloutStatus.ACCEPTED
        elif code is not None and code >= 500:
            expected = CalloutStatus.REFUSED
        else:
            expected = CalloutStatus.UNKNOWN
        assert result.status is expected
        assert result.refused is (expected is CalloutStatus.REFUSED)
        if expected is not CalloutStatus.UNKNOWN:
            assert result.catch_all is (
                None if decoy is None or 300 <= decoy < 500 else decoy < 300
            )


# -- the decisions both classes share, without I/O --------------------------------------------

MX_A = Target(name="mx1.example.com", address="192.0.2.1", port=25)
MX_B = Target(name="mx2.example.com", address="192.0.2.2", port=25)
TWO_HOSTS = MailHosts(
    domain="example.com",
    status=DNSStatus.OK,
    hosts=(
        MailHost(name=MX_A.name, status=DNSStatus.OK, ipv4=(MX_A.address,), preference=10),
        MailHost(name=MX_B.name, status=DNSStatus.OK, ipv4=(MX_B.address,), preference=20),
    ),
)
PEOPLE = [Address.parse("bob@example.com"), Address.parse("carol@example.com")]


def prober(tls: TLS = TLS.OPPORTUNISTIC, **kwargs: Any) -> _CalloutBase:
    options: dict[str, Any] = {
        "sender": None,
        "port": 25,
        "tls": tls,
        "ssl_context": None,
        "timeouts": FAST,
        "local_hostname": None,
        "detect_catch_all": True,
        "max_recipients": 50,
        "max_addresses": 3,
        "random": random.Random(1),
    }
    options.update(kwargs)
    return _CalloutBase(**options)


def answered(status: CalloutStatus) -> list[CalloutResult]:
    return [CalloutResult(address=a, status=status, detail="scripted") for a in PEOPLE]


BAD_HANDSHAKE = TLSError("handshake failed", host="peer")
REFUSED = ConnectError("connection refused", host="peer")


@pytest.mark.parametrize(
    ("tls", "outcomes", "attempts", "detail"),
    [
        pytest.param(
            TLS.OPPORTUNISTIC,
            [answered(CalloutStatus.REFUSED)],
            [(MX_A, TLS.OPPORTUNISTIC)],
            "scripted",
            id="the first exchanger answers",
        ),
        pytest.param(
            TLS.OPPORTUNISTIC,
            [REFUSED, answered(CalloutStatus.ACCEPTED)],
            [(MX_A, TLS.OPPORTUNISTIC), (MX_B, TLS.OPPORTUNISTIC)],
            "scripted",
            id="a connect failure moves on",
        ),
        pytest.param(
            TLS.OPPORTUNISTIC,
            [BAD_HANDSHAKE, answered(CalloutStatus.ACCEPTED)],
            [(MX_A, TLS.OPPORTUNISTIC), (MX_A, TLS.NONE)],
            "scripted",
            id="a failed handshake is retried in plain text",
        ),
        pytest.param(
            TLS.STARTTLS,
            [BAD_HANDSHAKE, BAD_HANDSHAKE],
            [(MX_A, TLS.STARTTLS), (MX_B, TLS.STARTTLS)],
            "no exchanger answered: mx1.example.com[192.0.2.1]:25: handshake failed; "
            "mx2.example.com[192.0.2.2]:25: handshake failed",
            id="required TLS never falls back",
        ),
        pytest.param(
            TLS.OPPORTUNISTIC,
            [BAD_HANDSHAKE, REFUSED, REFUSED],
            [(MX_A, TLS.OPPORTUNISTIC), (MX_A, TLS.NONE), (MX_B, TLS.OPPORTUNISTIC)],
            "no exchanger answered: mx1.example.com[192.0.2.1]:25: handshake failed; "
            "mx1.example.com[192.0.2.1]:25: connection refused; "
            "mx2.example.com[192.0.2.2]:25: connection refused",
            id="every failure is listed",
        ),
    ],
)
def test_the_plan_tries_exchangers_in_order_with_tls_fallback(
    tls: TLS,
    outcomes: list[list[CalloutResult] | DeliveryError],
    attempts: list[tuple[Target, TLS]],
    detail: str,
) -> None:
    plan = prober(tls)._plan("example.com", TWO_HOSTS, PEOPLE)
    asked = []
    answer: list[CalloutResult] | DeliveryError | None = None
    script = iter(outcomes)
    while True:
        try:
            asked.append(plan.send(answer))
        except StopIteration as done:
            results: list[CalloutResult] = done.value
            break
        answer = next(script)
    assert asked == attempts
    assert next(script, None) is None
    assert [r.address for r in results] == PEOPLE
    assert {r.detail for r in results} == {detail}


@pytest.mark.parametrize(
    ("found", "detail"),
    [
        (
            ResolverError("timed out", name="example.com", is_transient=True),
            "DNS lookup failed: timed out",
        ),
        (
            MailHosts(domain="example.com", status=DNSStatus.OK, null_mx=True),
            "no server to ask: example.com publishes a null MX (RFC 7505): it accepts no mail",
        ),
    ],
)
def test_the_plan_needs_no_server_when_the_dns_settles_it(
    found: MailHosts | ResolverError, detail: str
) -> None:
    plan = prober()._plan("example.com", found, PEOPLE)
    with pytest.raises(StopIteration) as done:
        next(plan)
    assert [(r.status, r.detail) for r in done.value.value] == [(CalloutStatus.UNKNOWN, detail)] * 2


class ScriptedProbes:
    """A session stand-in whose probes answer from a list, one per transaction."""

    def __init__(self, answers: list[tuple[int, bool]], *, ehlo: tuple[str, ...] = ()) -> None:
        self.answers = answers  # (RCPT reply code for everyone, whether the session then ends)
        self.asked: list[list[str]] = []
        self.closed = False
        self.extensions = Extensions.parse(["mx.example.com", *ehlo])

    def probe(self, sender: Address | None, recipients: list[Address]) -> DialogueStep[ProbeResult]:
        code, ends = self.answers[len(self.asked)]
        self.asked.append([a.local_part for a in recipients])
        self.closed = ends
        reply = Reply(code=code, lines=("scripted",), enhanced=None)
        mail = Reply(code=250, lines=("ok",), enhanced=None)
        return ProbeResult(mail=mail, recipients=(reply,) * len(recipients), ended=ends)
        yield  # a generator, like the dialogue's steps


def probe_all(session: ScriptedProbes, count: int, max_recipients: int) -> list[CalloutResult]:
    recipients = [Address.parse(f"user{i}@example.com") for i in range(count)]
    step = prober(max_recipients=max_recipients)._probe_all(
        cast(Session, session), "example.com", recipients, "mx.example.com[192.0.2.1]:25"
    )
    with pytest.raises(StopIteration) as done:
        next(step)
    results: list[CalloutResult] = done.value.value
    return results


def test_probe_all_batches_and_sends_the_decoy_once() -> None:
    session = ScriptedProbes([(550, False), (550, False), (550, False)])
    results = probe_all(session, 5, 2)
    assert [len(batch) for batch in session.asked] == [3, 2, 1]  # the first with the decoy
    assert session.asked[0][-1].startswith("nobody-")
    assert {r.status for r in results} == {CalloutStatus.REFUSED}
    # The decoy's refusal, learnt in the first batch, is carried to the later ones.
    assert {r.catch_all for r in results} == {False}


@pytest.mark.parametrize(
    ("rcpt_max", "max_recipients", "sizes", "catch_all"),
    [
        (2, 10, [2, 2, 2], False),  # 1 + decoy, then 2 and 2
        (3, 10, [3, 3], False),  # 2 + decoy, then 3
        (10, 2, [3, 2, 1], False),  # the announced limit leaves room: as without it
        (3, 3, [3, 3], False),  # max_recipients = RCPTMAX: the decoy takes a place
        (1, 10, [1, 1, 1, 1, 1], None),  # no room for the decoy: left out
    ],
)
def test_probe_all_keeps_to_the_announced_rcptmax(
    rcpt_max: int, max_recipients: int, sizes: list[int], catch_all: bool | None
) -> None:
    # RFC 9422: never more RCPTs in a transaction than the server said it takes.
    session = ScriptedProbes([(550, False)] * 5, ehlo=(f"LIMITS RCPTMAX={rcpt_max}",))
    results = probe_all(session, 5, max_recipients)
    assert [len(batch) for batch in session.asked] == sizes
    assert [r.address.local_part for r in results] == [f"user{i}" for i in range(5)]
    assert {r.catch_all for r in results} == {catch_all}
    decoys = [part for batch in session.asked for part in batch if part.startswith("nobody-")]
    assert len(decoys) == (catch_all is not None)


def test_probe_all_leaves_batches_unknown_after_the_server_ended_the_session() -> None:
    session = ScriptedProbes([(250, True)])
    results = probe_all(session, 3, 2)
    assert len(session.asked) == 1
    assert [r.status for r in results] == [CalloutStatus.ACCEPTED] * 2 + [CalloutStatus.UNKNOWN]
    assert results[0].catch_all is True
    assert results[2].detail == "the server ended the session"


@given(count=st.integers(1, 12), size=st.integers(1, 5))
def test_probe_all_gives_one_result_per_recipient_in_order(count: int, size: int) -> None:
    session = ScriptedProbes([(550, False)] * count)
    results = probe_all(session, count, size)
    assert [r.address.local_part for r in results] == [f"user{i}" for i in range(count)]
    assert len(session.asked) == -(-count // size)
