"""MXTransport and AsyncMXTransport against the real test DNS (unbound) and real servers.

The unbound zone (tests/peers/unbound.py) points exchangers at 127.0.0.x addresses. Every test
picks one TCP port that is free on all of them (and on ::1), starts real servers (aiosmtpd,
or the scripted server for faults) on the addresses it needs at that port, and gives the
transport that port: all exchangers share the transport's one ``port``, as they share 25 in
production. Addresses where nothing listens refuse the connection at once (Linux routes the
whole of 127/8 to the loopback interface).
"""

from __future__ import annotations

import asyncio
import random
import socket
import ssl
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.address import Address
from mailrelay.envelope import Envelope
from mailrelay.errors import ConfigurationError, ResolverError
from mailrelay.message import Message
from mailrelay.options import TLS, Timeouts
from mailrelay.resolver import DNSStatus, MailHost, MailHosts
from mailrelay.results import DeliveryResult, Outcome
from mailrelay.tracker.dsn import DSNAction
from mailrelay.tracker.dsn_parse import parse_dsn
from mailrelay.tracker.engine import DeliveryTracker
from mailrelay.tracker.store import MemoryStore, State
from mailrelay.transport.memory import MemoryTransport
from mailrelay.transport.mx import (
    MXPolicy,
    MXTransport,
    Target,
    Verdict,
    opportunistic_context,
)
from mailrelay.transport.mx_async import AsyncMXTransport
from mailrelay.transport.mx_plan import plan
from tests.peers.aiosmtpd_server import HOSTNAME, RecordingHandler
from tests.peers.postfix import PostfixInstance
from tests.peers.scripted import (
    Action,
    ScriptedServer,
    Step,
    accept_message,
    ehlo,
    greeting,
    quit_step,
)
from tests.peers.tls import TLSFiles
from tests.peers.unbound import UnboundServer
from tests.transport.helpers import FLAVOURS, Flavour, make_message, run

pytestmark = pytest.mark.unbound

LOOPBACKS = ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6")
FAST = Timeouts.all(2)


# -- servers on chosen loopback addresses ---------------------------------------------------------


def free_everywhere() -> int:
    """A TCP port free on every address in LOOPBACKS and on ::1 right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((LOOPBACKS[0], 0))
            port = int(probe.getsockname()[1])
        try:
            for address in (*LOOPBACKS[1:], "::1"):
                family = socket.AF_INET6 if ":" in address else socket.AF_INET
                with socket.socket(family, socket.SOCK_STREAM) as other:
                    other.bind((address, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on every loopback address in 50 tries")


@pytest.fixture
def port() -> int:
    """The exchangers' shared port for this test."""
    return free_everywhere()


class Farm:
    """Real SMTP servers (aiosmtpd) on chosen loopback addresses, all at one port."""

    def __init__(self, port: int, tls_files: TLSFiles) -> None:
        self.port = port
        self.tls_files = tls_files
        self.handlers: dict[str, RecordingHandler] = {}
        self._controllers: list[Controller] = []

    def start(self, address: str, *, tls: str | None = "trusted") -> RecordingHandler:
        """An aiosmtpd server on ``address``; ``tls`` is "trusted", "untrusted" or None."""
        handler = RecordingHandler()
        kwargs: dict[str, Any] = {
            "server_hostname": HOSTNAME,
            "enable_SMTPUTF8": True,
            "decode_data": False,
            "require_starttls": False,
            "timeout": 10,
        }
        if tls is not None:
            kwargs["tls_context"] = self.tls_files.server_context(trusted=tls == "trusted")
        controller = Controller(handler, hostname=address, port=self.port, **kwargs)
        controller.start()
        self._controllers.append(controller)
        self.handlers[address] = handler
        return handler

    def received(self) -> dict[str, int]:
        """How many messages each server took."""
        return {address: len(h.messages) for address, h in self.handlers.items()}

    def stop(self) -> None:
        for controller in self._controllers:
            controller.stop()


@pytest.fixture
def farm(port: int, tls_files: TLSFiles) -> Iterator[Farm]:
    """Start servers with ``farm.start(address)``; all are stopped at teardown."""
    servers = Farm(port, tls_files)
    yield servers
    servers.stop()


ScriptedAt = Callable[..., ScriptedServer]


@pytest.fixture
def scripted_at(port: int, tls_files: TLSFiles) -> Iterator[ScriptedAt]:
    """``scripted_at(address, scripts, tls="trusted")``: the scripted server on ``address``.

    The peer binds 127.0.0.1 and a free port; its listener is swapped for one on the
    exchanger's address and the shared port before it starts.
    """
    servers: list[ScriptedServer] = []

    def make(address: str, scripts: list[list[Step]], *, tls: str | None = "trusted") -> Any:
        context = None if tls is None else tls_files.server_context(trusted=tls == "trusted")
        server = ScriptedServer(scripts, ssl_context=context, timeout=5.0)
        server._listener.close()
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((address, port))
        listener.listen(16)
        listener.settimeout(0.05)
        server._listener = listener
        server.host, server.port = address, port
        servers.append(server)
        return server.start()

    yield make
    errors = []
    for server in servers:
        server.stop()
        errors.extend(server.errors)
    assert not errors, f"scripted server errors: {errors}"


# -- sending -----------------------------------------------------------------------------------


def send(
    flavour: Flavour,
    unbound: UnboundServer,
    message: Message,
    envelope: Envelope | None = None,
    *,
    resolver: dict[str, Any] | None = None,
    **kwargs: Any,
) -> DeliveryResult:
    """Send with a fresh (Async)MXTransport asking the test DNS."""
    kwargs.setdefault("timeouts", FAST)
    options = {"timeout": 1.0, **(resolver or {})}
    if flavour == "sync":
        with MXTransport(unbound.resolver(**options), **kwargs, refused_networks=()) as transport:
            return transport.send(message, envelope)

    async def main() -> DeliveryResult:
        async with AsyncMXTransport(
            unbound.async_resolver(**options), **kwargs, refused_networks=()
        ) as transport:
            return await transport.asend(message, envelope)

    return run(main())


def to(*recipients: str) -> tuple[Message, Envelope]:
    message = make_message(to=recipients, sender="sender@mailrelay.test")
    return message, Envelope.from_message(message)


# -- delivery through the DNS ------------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_delivers_to_the_mx(flavour: Flavour, unbound: UnboundServer, farm: Farm) -> None:
    server = farm.start("127.0.0.1")
    message, envelope = to("bob@mailrelay.test", "carol@mailrelay.test")
    result = send(flavour, unbound, message, envelope, port=farm.port)
    assert result.ok
    assert result.host == f"mx.mailrelay.test[127.0.0.1]:{farm.port}"
    assert [r.host for r in result.recipients] == [result.host] * 2
    [received] = server.messages
    assert received.rcpt_tos == ("bob@mailrelay.test", "carol@mailrelay.test")
    assert received.mail_from == "sender@mailrelay.test"
    assert received.tls  # opportunistic TLS: offered, so used


@pytest.mark.postfix
def test_delivers_to_postfix_end_to_end(unbound: UnboundServer, postfix: PostfixInstance) -> None:
    message = make_message(to=("alice@mailrelay.test",), subject="mx-e2e-7f3a")
    with MXTransport(
        unbound.resolver(), port=postfix.smtp_port, timeouts=Timeouts.all(10), refused_networks=()
    ) as mx:
        result = mx.send(message, Envelope("bob@mailrelay.test", ["alice@mailrelay.test"]))
    assert result.ok, result
    assert result.host == f"mx.mailrelay.test[127.0.0.1]:{postfix.smtp_port}"
    delivered = postfix.wait_for_message("alice", b"mx-e2e-7f3a", timeout=10.0)
    assert message.message_id is not None
    assert message.message_id.encode() in delivered


@pytest.mark.postfix
def test_fails_over_to_postfix_when_the_preferred_mx_is_down(
    unbound: UnboundServer, postfix: PostfixInstance
) -> None:
    # failover.test prefers 127.0.0.3 (nothing listens); Postfix is the backup on 127.0.0.1.
    # Postfix does not relay for failover.test, so its answer is a refusal: the point is who
    # gave it.
    message, envelope = to("bob@failover.test", "sink@sink.mailrelay.test")
    with MXTransport(
        unbound.resolver(), port=postfix.smtp_port, timeouts=Timeouts.all(10), refused_networks=()
    ) as mx:
        result = mx.send(message, envelope)
    refused, sunk = result.recipients
    assert refused.host == f"up.failover.test[127.0.0.1]:{postfix.smtp_port}"
    assert refused.outcome is Outcome.PERMANENT
    assert refused.reply is not None
    assert refused.reply.code == 554  # relay access denied, from the real Postfix
    assert sunk.outcome is Outcome.ACCEPTED
    assert sunk.host == f"mx.mailrelay.test[127.0.0.1]:{postfix.smtp_port}"


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_fails_over_when_the_preferred_mx_is_down(
    flavour: Flavour, unbound: UnboundServer, farm: Farm
) -> None:
    # failover.test: MX 10 down.failover.test (127.0.0.3, nothing listens), 20 up (127.0.0.1).
    server = farm.start("127.0.0.1")
    message, envelope = to("bob@failover.test")
    result = send(flavour, unbound, message, envelope, port=farm.port)
    assert result.ok
    assert result.recipients[0].host == f"up.failover.test[127.0.0.1]:{farm.port}"
    assert len(server.messages) == 1


def test_equal_preferences_spread_and_the_backup_waits(unbound: UnboundServer, farm: Farm) -> None:
    # samepref.test: a/b/c (127.0.0.1/.4/.5) at 10, backup (127.0.0.6) at 20.
    for address in ("127.0.0.1", "127.0.0.4", "127.0.0.5", "127.0.0.6"):
        farm.start(address, tls=None)
    resolver = unbound.resolver(timeout=1.0, random=random.Random(7))
    message, envelope = to("bob@samepref.test")
    with MXTransport(resolver, port=farm.port, timeouts=FAST, refused_networks=()) as mx:
        hosts = [mx.send(message, envelope).recipients[0].host for _ in range(12)]
    counts = farm.received()
    assert counts["127.0.0.6"] == 0
    assert sum(counts.values()) == 12
    # RFC 5321 §5.1: equal preferences are shuffled, so the load is spread (seeded shuffle).
    assert sum(1 for n in counts.values() if n) >= 2
    assert {h.split("[")[0] for h in hosts if h} <= {f"{x}.samepref.test" for x in "abc"}


def test_backup_mx_when_every_preferred_one_is_down(unbound: UnboundServer, farm: Farm) -> None:
    backup = farm.start("127.0.0.6")
    message, envelope = to("bob@samepref.test")
    result = send("sync", unbound, message, envelope, port=farm.port)
    assert result.ok
    assert result.host == f"backup.samepref.test[127.0.0.6]:{farm.port}"
    assert len(backup.messages) == 1


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_implicit_mx(flavour: Flavour, unbound: UnboundServer, farm: Farm) -> None:
    farm.start("127.0.0.1")
    message, envelope = to("bob@a-only.test")
    result = send(flavour, unbound, message, envelope, port=farm.port)
    assert result.ok
    assert result.host == f"a-only.test[127.0.0.1]:{farm.port}"


def test_half_dangling_mx_uses_the_exchanger_that_resolves(
    unbound: UnboundServer, farm: Farm
) -> None:
    farm.start("127.0.0.1")
    message, envelope = to("bob@halfdangling.test")
    result = send("sync", unbound, message, envelope, port=farm.port)
    assert result.ok
    assert result.host == f"mx.mailrelay.test[127.0.0.1]:{farm.port}"


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize(
    ("domain", "outcome", "reason", "status"),
    [
        # RFC 7505 §4.2's 5.1.10; RFC 3463's X.1.2 (bad destination system address), X.4.4
        # (unable to route), X.4.3 (directory server failure).
        ("nullmx.test", Outcome.PERMANENT, "null MX (RFC 7505)", "5.1.10"),
        ("no-such-domain.test", Outcome.PERMANENT, "does not exist (NXDOMAIN)", "5.1.2"),
        ("nomail.test", Outcome.PERMANENT, "neither MX nor address records", "5.1.2"),
        (
            "dangling.test",
            Outcome.PERMANENT,
            "no exchanger of dangling.test has an address",
            "5.4.4",
        ),
        ("x.servfail.test", Outcome.TRANSIENT, "DNS lookup failed", "4.4.3"),
        ("x.refused.test", Outcome.TRANSIENT, "DNS lookup failed", "4.4.3"),
        ("x.timeout.test", Outcome.TRANSIENT, "DNS lookup failed", "4.4.3"),
        ("slowmx.test", Outcome.TRANSIENT, "address lookups failed", "4.4.3"),
    ],
)
def test_dns_verdicts(
    flavour: Flavour,
    domain: str,
    outcome: Outcome,
    reason: str,
    status: str,
    *,
    unbound: UnboundServer,
    port: int,
) -> None:
    message, envelope = to(f"bob@{domain}", f"carol@{domain}")
    result = send(flavour, unbound, message, envelope, port=port, resolver={"timeout": 0.5})
    assert [r.outcome for r in result.recipients] == [outcome, outcome]
    for recipient in result.recipients:
        assert recipient.reason is not None
        assert reason in recipient.reason
        assert recipient.reply is None
        assert recipient.host is None
        assert str(recipient.enhanced) == status


def test_the_tracker_bounces_a_null_mx_domain_with_rfc_7505s_status(
    unbound: UnboundServer, port: int
) -> None:
    """Through a real resolver: the verdict's 5.1.10 reaches the attempt history and the
    failure DSN's Status (it said 5.0.0 before), with the verdict's reason as diagnostic."""
    dsn_out = MemoryTransport()
    with MXTransport(
        unbound.resolver(timeout=1.0), timeouts=FAST, port=port, refused_networks=()
    ) as transport:
        tracker = DeliveryTracker(transport, MemoryStore(), dsn_transport=dsn_out)
        message = Message.build(
            sender="alice@example.com", to=["bob@nullmx.test"], subject="hi", text="hi\n"
        )
        tracking_id = tracker.submit(message)
        tracker.run_pending()
    (recipient,) = tracker.status(tracking_id).recipients
    assert recipient.state is State.BOUNCED
    assert [a.enhanced for a in recipient.attempts] == ["5.1.10"]
    report = parse_dsn(dsn_out.outbox[0].message.as_bytes())
    assert [(r.action, r.status) for r in report.recipients] == [(DSNAction.FAILED, "5.1.10")]
    assert "null MX" in (report.recipients[0].diagnostic or "")


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize(
    "refusal",
    [
        [Step(reply=b"421 4.3.2 Busy, try another MX\r\n", action=Action.CLOSE)],
        [
            greeting(),
            Step(expect="EHLO .+", reply=b"421 4.3.2 Going down\r\n", action=Action.CLOSE),
        ],
        [
            greeting(),
            ehlo("PIPELINING"),
            Step(expect="MAIL FROM:.*", reply=b"421 4.3.2 Shutting down\r\n", action=Action.CLOSE),
        ],
    ],
    ids=["greeting", "ehlo", "mail"],
)
def test_421_from_the_first_mx_moves_to_the_next(
    flavour: Flavour,
    refusal: list[Step],
    unbound: UnboundServer,
    farm: Farm,
    scripted_at: ScriptedAt,
) -> None:
    # mx2.test: MX 10 mx1.mx2.test (127.0.0.1, and ::1 where nothing listens), 20 mx2 (.2).
    first = scripted_at("127.0.0.1", [refusal], tls=None)
    second = farm.start("127.0.0.2")
    message, envelope = to("bob@mx2.test")
    result = send(flavour, unbound, message, envelope, port=farm.port)
    assert result.ok
    assert result.host == f"mx2.mx2.test[127.0.0.2]:{farm.port}"
    assert len(second.messages) == 1
    assert first.session(0).events  # the first exchanger was really asked


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_mixed_domains_get_their_own_results_in_envelope_order(
    flavour: Flavour, unbound: UnboundServer, farm: Farm
) -> None:
    server = farm.start("127.0.0.1")
    message, envelope = to(
        "a@failover.test",
        "b@nullmx.test",
        "c@mailrelay.test",
        "d@no-such-domain.test",
        "reject@failover.test",
        "e@x.servfail.test",
    )
    result = send(flavour, unbound, message, envelope, port=farm.port, resolver={"timeout": 0.5})
    assert [str(r.address) for r in result.recipients] == [
        str(r.address) for r in envelope.recipients
    ]
    assert [r.outcome for r in result.recipients] == [
        Outcome.ACCEPTED,
        Outcome.PERMANENT,
        Outcome.ACCEPTED,
        Outcome.PERMANENT,
        Outcome.PERMANENT,  # the exchanger's own 550 for this recipient
        Outcome.TRANSIENT,
    ]
    assert result.recipients[0].host == f"up.failover.test[127.0.0.1]:{farm.port}"
    assert result.recipients[2].host == f"mx.mailrelay.test[127.0.0.1]:{farm.port}"
    rejected = result.recipients[4]
    assert rejected.reply is not None
    assert rejected.reply.code == 550
    assert result.host is None  # several hosts answered
    assert sorted(m.rcpt_tos for m in server.messages) == [
        ("a@failover.test",),
        ("c@mailrelay.test",),
    ]


def test_every_mx_down_is_transient_with_each_attempt_explained(
    unbound: UnboundServer, port: int
) -> None:
    message, envelope = to("bob@failover.test")
    result = send("sync", unbound, message, envelope, port=port)
    [recipient] = result.recipients
    assert recipient.outcome is Outcome.TRANSIENT
    assert recipient.reason is not None
    assert f"down.failover.test[127.0.0.3]:{port}" in recipient.reason
    assert f"up.failover.test[127.0.0.1]:{port}" in recipient.reason
    # No reply to take a status from: RFC 3463's X.4.1, no answer from host.
    assert str(recipient.enhanced) == "4.4.1"


def test_every_mx_refusing_with_554_is_permanent(
    unbound: UnboundServer, scripted_at: ScriptedAt, port: int
) -> None:
    refuse = [
        Step(reply=b"554 5.7.1 No SMTP service here\r\n"),
        Step(expect="QUIT", reply=b"221 Bye\r\n", action=Action.CLOSE),
    ]
    scripted_at("127.0.0.1", [refuse], tls=None)
    message, envelope = to("bob@a-only.test")
    result = send("sync", unbound, message, envelope, port=port)
    [recipient] = result.recipients
    assert recipient.outcome is Outcome.PERMANENT
    assert recipient.reply is not None
    assert recipient.reply.code == 554
    assert recipient.enhanced is None  # the reply carries its own (5.7.1)


# -- TLS -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_opportunistic_tls_delivers_despite_an_untrusted_certificate(
    flavour: Flavour, unbound: UnboundServer, farm: Farm
) -> None:
    server = farm.start("127.0.0.1", tls="untrusted")
    message, envelope = to("bob@a-only.test")
    result = send(flavour, unbound, message, envelope, port=farm.port)
    assert result.ok
    [received] = server.messages
    assert received.tls  # encrypted, without authentication (RFC 7435)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_strict_policy_refuses_an_untrusted_certificate(
    flavour: Flavour, unbound: UnboundServer, farm: Farm, tls_files: TLSFiles
) -> None:
    server = farm.start("127.0.0.1", tls="untrusted")
    message, envelope = to("bob@mailrelay.test")
    result = send(
        flavour,
        unbound,
        message,
        envelope,
        port=farm.port,
        ssl_context=tls_files.client_context(),
        tls_policy=lambda domain: TLS.STARTTLS if domain == "mailrelay.test" else None,
    )
    [recipient] = result.recipients
    # RFC 8461 §5: a TLS policy failure defers, it never bounces, and never goes plain.
    assert recipient.outcome is Outcome.TRANSIENT
    assert recipient.reason is not None
    assert "certificate" in recipient.reason
    assert server.messages == []


def test_strict_policy_delivers_with_a_verified_certificate(
    unbound: UnboundServer, farm: Farm, tls_files: TLSFiles
) -> None:
    server = farm.start("127.0.0.1", tls="trusted")
    message, envelope = to("bob@mailrelay.test")
    policy = MXPolicy(tls=TLS.STARTTLS, ssl_context=tls_files.client_context())
    result = send(
        "sync", unbound, message, envelope, port=farm.port, tls_policy=lambda domain: policy
    )
    assert result.ok
    assert server.messages[0].tls


def test_strict_policy_refuses_a_server_without_starttls(
    unbound: UnboundServer, farm: Farm
) -> None:
    server = farm.start("127.0.0.1", tls=None)
    message, envelope = to("bob@a-only.test")
    result = send("sync", unbound, message, envelope, port=farm.port, tls=TLS.STARTTLS)
    assert result.recipients[0].outcome is Outcome.TRANSIENT
    # RFC 3463's X.7.5 (cryptographic failure), in the class of the deferral.
    assert str(result.recipients[0].enhanced) == "4.7.5"
    assert server.messages == []


def _failing_handshake() -> list[Step]:
    return [
        greeting(),
        ehlo("STARTTLS"),
        Step(expect="STARTTLS", reply=b"220 2.0.0 Go ahead\r\n", action=Action.FAIL_TLS),
    ]


def _plain_delivery() -> list[Step]:
    return [greeting(), ehlo("STARTTLS"), *accept_message(1), quit_step()]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_failed_handshake_retries_the_same_host_in_plain_text(
    flavour: Flavour, unbound: UnboundServer, scripted_at: ScriptedAt
) -> None:
    server = scripted_at("127.0.0.1", [_failing_handshake(), _plain_delivery()])
    message, envelope = to("bob@a-only.test")
    result = send(flavour, unbound, message, envelope, port=server.port)
    assert result.ok
    assert result.host == f"a-only.test[127.0.0.1]:{server.port}"
    assert b"STARTTLS" not in bytes(server.session(1).received)


def test_failed_handshake_without_plaintext_fallback_gives_up(
    unbound: UnboundServer, scripted_at: ScriptedAt
) -> None:
    server = scripted_at("127.0.0.1", [_failing_handshake(), _plain_delivery()])
    message, envelope = to("bob@a-only.test")
    result = send("sync", unbound, message, envelope, port=server.port, plaintext_fallback=False)
    [recipient] = result.recipients
    assert recipient.outcome is Outcome.TRANSIENT
    assert recipient.reason is not None
    assert "TLS" in recipient.reason
    assert len(server.sessions) == 1


def test_tls_none_never_sends_starttls(unbound: UnboundServer, farm: Farm) -> None:
    server = farm.start("127.0.0.1")
    message, envelope = to("bob@a-only.test")
    assert send("sync", unbound, message, envelope, port=farm.port, tls=TLS.NONE).ok
    assert not server.messages[0].tls


def test_mx_patterns_skip_exchangers_the_policy_does_not_list(
    unbound: UnboundServer, farm: Farm
) -> None:
    farm.start("127.0.0.1")
    message, envelope = to("bob@failover.test", "carol@mailrelay.test")
    policies = {
        "failover.test": MXPolicy(mx_patterns=["*.failover.test"]),
        "mailrelay.test": MXPolicy(mx_patterns=["mx.elsewhere.test"]),
    }
    result = send("sync", unbound, message, envelope, port=farm.port, tls_policy=policies.get)
    allowed, refused = result.recipients
    assert allowed.outcome is Outcome.ACCEPTED
    assert refused.outcome is Outcome.TRANSIENT
    assert refused.reason is not None
    assert "matches its MX policy" in refused.reason


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_address_literal_goes_to_that_address(
    flavour: Flavour, unbound: UnboundServer, farm: Farm
) -> None:
    server = farm.start("127.0.0.2")
    message = make_message(to=("bob@[127.0.0.2]",))
    result = send(flavour, unbound, message, port=farm.port)
    assert result.ok
    assert result.host == f"127.0.0.2:{farm.port}"
    assert server.messages[0].rcpt_tos == ("bob@[127.0.0.2]",)


# -- configuration and planning ------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tls": TLS.IMPLICIT},
        {"port": 0},
        {"port": 70000},
        {"port": True},
        {"max_addresses": 0},
        {"local_hostname": "bad name"},
        {"timeouts": 5},
        {"ssl_context": "not a context"},
    ],
)
def test_bad_configuration_is_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        MXTransport(**kwargs, refused_networks=())
    with pytest.raises(ConfigurationError):
        AsyncMXTransport(**kwargs, refused_networks=())


def test_async_concurrency_must_be_positive() -> None:
    with pytest.raises(ConfigurationError):
        AsyncMXTransport(concurrency=0, refused_networks=())


def test_a_policy_hook_returning_nonsense_is_a_configuration_error(
    unbound: UnboundServer, port: int
) -> None:
    message, envelope = to("bob@a-only.test")
    with pytest.raises(ConfigurationError, match="tls_policy"):
        send("sync", unbound, message, envelope, port=port, tls_policy=lambda d: "strict")


@pytest.mark.parametrize(
    ("patterns", "host", "allowed"),
    [
        ((), "anything.example", True),
        (("mx.example.com",), "mx.example.com", True),
        (("mx.example.com",), "MX.Example.Com.", True),
        (("mx.example.com",), "mx2.example.com", False),
        (("*.example.com",), "mx.example.com", True),
        (("*.example.com",), "a.b.example.com", False),  # one label only (RFC 8461 §4.1)
        (("*.example.com",), "example.com", False),
        (("a.test", "*.b.test"), "x.b.test", True),
    ],
)
def test_mx_patterns(patterns: tuple[str, ...], host: str, allowed: bool) -> None:
    assert MXPolicy(mx_patterns=patterns).allows(host) is allowed


def _hosts(*hosts: tuple[str, int, tuple[str, ...]]) -> MailHosts:
    return MailHosts(
        domain="example.test",
        status=DNSStatus.OK,
        hosts=tuple(
            MailHost(
                name=name,
                status=DNSStatus.OK if addresses else DNSStatus.NODATA,
                ipv4=tuple(a for a in addresses if ":" not in a),
                ipv6=tuple(a for a in addresses if ":" in a),
                preference=preference,
            )
            for name, preference, addresses in hosts
        ),
    )


def test_plan_orders_hosts_then_addresses_and_skips_repeats() -> None:
    found = _hosts(
        ("mx1.example.test", 10, ("192.0.2.1", "2001:db8::1")),
        ("mx2.example.test", 20, ("192.0.2.1", "192.0.2.2")),
    )
    targets = plan("example.test", found, MXPolicy(), port=25, max_addresses=10)
    assert targets == [
        Target(name="mx1.example.test", address="192.0.2.1", port=25),
        Target(name="mx1.example.test", address="2001:db8::1", port=25),
        Target(name="mx2.example.test", address="192.0.2.2", port=25),
    ]


def test_plan_of_a_resolver_error() -> None:
    permanent = ResolverError("bad name", name="x", is_transient=False)
    verdict = plan("x", permanent, MXPolicy(), port=25, max_addresses=3)
    assert isinstance(verdict, Verdict)
    assert verdict.outcome is Outcome.PERMANENT
    results = verdict.results([Address.parse("a@x.test")])
    assert results[0].reason == verdict.reason


_names = st.sampled_from([f"mx{i}.example.test" for i in range(6)])
_ips = st.sampled_from([f"192.0.2.{i}" for i in range(1, 9)] + ["2001:db8::1", "2001:db8::2"])


@given(
    hosts=st.lists(
        st.tuples(_names, st.integers(0, 50), st.lists(_ips, max_size=4).map(tuple)),
        min_size=1,
        max_size=6,
        unique_by=lambda h: h[0],
    ),
    limit=st.integers(1, 12),
)
def test_plan_properties(hosts: list[tuple[str, int, tuple[str, ...]]], limit: int) -> None:
    ordered = sorted(hosts, key=lambda h: h[1])
    found = _hosts(*ordered)
    result = plan("example.test", found, MXPolicy(), port=25, max_addresses=limit)
    # Each host's IPv4 addresses, then its IPv6 ones (HostAddresses.addresses).
    every = [
        a
        for _, _, addresses in ordered
        for a in sorted(addresses, key=lambda a: ":" in a)  # stable: keeps each family's order
    ]
    if not every:
        assert isinstance(result, Verdict)
        assert result.outcome is Outcome.PERMANENT
        return
    assert isinstance(result, list)
    addresses = [t.address for t in result]
    assert len(addresses) == len(set(addresses)) <= limit  # no repeats, bounded
    assert addresses == list(dict.fromkeys(every))[:limit]  # the resolver's order, kept
    names = [t.name for t in result]
    preference = {name: pref for name, pref, _ in ordered}
    assert [preference[n] for n in names] == sorted(preference[n] for n in names)


def test_repr_names_the_policy() -> None:
    assert "tls=OPPORTUNISTIC" in repr(MXTransport(port=2525, refused_networks=()))
    assert "port=2525" in repr(AsyncMXTransport(port=2525, refused_networks=()))


def test_opportunistic_context_does_not_verify() -> None:
    context = opportunistic_context()
    assert context.verify_mode is ssl.CERT_NONE
    assert not context.check_hostname


# -- address families, IDN, and the asyncio specifics ------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_ipv6_address_when_the_ipv4_one_is_down(
    flavour: Flavour, unbound: UnboundServer, farm: Farm
) -> None:
    # mx.mailrelay.test is 127.0.0.1 (nothing listens) and ::1 (a server).
    server = farm.start("::1")
    message, envelope = to("bob@mailrelay.test")
    result = send(flavour, unbound, message, envelope, port=farm.port)
    assert result.ok
    assert result.host == f"mx.mailrelay.test[::1]:{farm.port}"
    assert len(server.messages) == 1


def test_idn_domain_is_routed_by_its_a_label(unbound: UnboundServer, farm: Farm) -> None:
    server = farm.start("127.0.0.1")
    message, envelope = to("bob@café.test", "carol@xn--caf-dma.test")
    result = send("sync", unbound, message, envelope, port=farm.port)
    assert result.ok
    [received] = server.messages  # one domain, so one transaction
    assert received.rcpt_tos == ("bob@xn--caf-dma.test", "carol@xn--caf-dma.test")


def test_cancelling_adeliver_closes_the_connection(
    unbound: UnboundServer, scripted_at: ScriptedAt
) -> None:
    silent = scripted_at("127.0.0.1", [[Step(action=Action.SILENT, silence=5.0)]], tls=None)
    message, envelope = to("bob@a-only.test")

    async def main() -> None:
        mx = AsyncMXTransport(
            unbound.async_resolver(timeout=1.0),
            port=silent.port,
            timeouts=Timeouts.all(30),
            refused_networks=(),
        )
        task = asyncio.create_task(mx.asend(message, envelope))
        for _ in range(500):  # bounded: until the server has the connection
            if silent.sessions:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())
    session = silent.session(0, timeout=5.0)
    assert "eof" in session.events  # we hung up; the server did not have to wait us out
    assert "silence over" not in session.events


class _CountingResolver:
    """An AsyncResolver stand-in that counts how many lookups overlap."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.active = 0
        self.most = 0

    async def mail_hosts(self, domain: str) -> MailHosts:
        self.active += 1
        self.most = max(self.most, self.active)
        try:
            await asyncio.sleep(0.05)  # every admitted task arrives before any leaves
            result: MailHosts = await self.inner.mail_hosts(domain)
            return result
        finally:
            self.active -= 1


@pytest.mark.parametrize(("concurrency", "expected"), [(1, 1), (2, 2), (8, 4)])
def test_async_domains_run_concurrently_but_bounded(
    concurrency: int, expected: int, unbound: UnboundServer, port: int
) -> None:
    domains = ("nullmx.test", "nomail.test", "dangling.test", "no-such-domain.test")
    message, envelope = to(*(f"bob@{d}" for d in domains))
    counter = _CountingResolver(unbound.async_resolver(timeout=1.0))

    async def main() -> DeliveryResult:
        mx = AsyncMXTransport(counter, port=port, concurrency=concurrency, refused_networks=())  # type: ignore[arg-type]
        return await mx.asend(message, envelope)

    result = run(main())
    assert [r.outcome for r in result.recipients] == [Outcome.PERMANENT] * 4
    assert counter.most == expected


@pytest.mark.parametrize(
    ("tls", "outcome", "reason"),
    [
        # RFC 8689 §4.2.1: verified TLS, so the untrusted certificate stops it...
        ("untrusted", Outcome.TRANSIENT, "certificate"),
        # ...and a verified server without the REQUIRETLS keyword gets no message: the next
        # address is tried (RFC 8689 §4.2.1), and since nothing answers there (::1) the
        # recipient waits for a later attempt rather than bouncing.
        ("trusted", Outcome.TRANSIENT, "REQUIRETLS support required"),
    ],
)
def test_requiretls_demands_verified_tls(
    tls: str,
    outcome: Outcome,
    reason: str,
    *,
    unbound: UnboundServer,
    farm: Farm,
    tls_files: TLSFiles,
) -> None:
    server = farm.start("127.0.0.1", tls=tls)
    message = make_message(to=("bob@mailrelay.test",), sender="sender@mailrelay.test")
    envelope = Envelope("sender@mailrelay.test", ["bob@mailrelay.test"], requiretls=True)
    result = send(
        "sync", unbound, message, envelope, port=farm.port, ssl_context=tls_files.client_context()
    )
    [recipient] = result.recipients
    assert recipient.outcome is outcome
    assert recipient.reason is not None
    assert reason in recipient.reason
    assert server.messages == []


def test_max_addresses_bounds_the_attempts(unbound: UnboundServer, port: int) -> None:
    # samepref.test has four exchangers; nothing listens on any of them.
    message, envelope = to("bob@samepref.test")
    result = send("sync", unbound, message, envelope, port=port, max_addresses=2)
    [recipient] = result.recipients
    assert recipient.outcome is Outcome.TRANSIENT
    assert recipient.reason is not None
    assert recipient.reason.count("could not connect") == 2


def test_send_many_delivers_each_message_through_the_mx(unbound: UnboundServer, farm: Farm) -> None:
    server = farm.start("127.0.0.1")
    first, _ = to("bob@a-only.test")
    second, _ = to("carol@nullmx.test", "dave@a-only.test")
    with MXTransport(
        unbound.resolver(timeout=1.0), port=farm.port, timeouts=FAST, refused_networks=()
    ) as mx:
        results = mx.send_many([first, second])
    assert [r.outcome for r in results[0].recipients] == [Outcome.ACCEPTED]
    assert [r.outcome for r in results[1].recipients] == [Outcome.PERMANENT, Outcome.ACCEPTED]
    assert [m.rcpt_tos for m in server.messages] == [("bob@a-only.test",), ("dave@a-only.test",)]
