"""MX delivery reuses sessions across domains and messages, and fails over for REQUIRETLS.

The test DNS (unbound, tests/peers/unbound.py) routes ``mailrelay.test``,
``sink.mailrelay.test`` and ``café.test`` to the one exchanger ``mx.mailrelay.test``
(127.0.0.1); ``a-only.test`` is its own exchanger at the same address; ``mx2.test`` prefers
``mx1.mx2.test`` (127.0.0.1) over ``mx2.mx2.test`` (127.0.0.2). Real servers listen there
and count the connections they get (tests/transport/counting_server.py).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from mailrelay.envelope import Envelope
from mailrelay.message import Message
from mailrelay.options import TLS, Timeouts
from mailrelay.results import DeliveryResult, Outcome
from mailrelay.transport import mx as mx_sync
from mailrelay.transport import mx_async
from mailrelay.transport.mx import (
    MXPolicy,
    MXTransport,
    Target,
    reuse_key,
)
from mailrelay.transport.mx_async import AsyncMXTransport
from mailrelay.transport.settings import PoolSettings
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
from tests.transport.counting_server import CountingHandler, start_counting
from tests.transport.helpers import FLAVOURS, Flavour, make_message, run
from tests.transport.test_mx import ScriptedAt, free_everywhere

pytestmark = pytest.mark.unbound

FAST = Timeouts.all(2)
SHARED = ("bob@mailrelay.test", "carol@sink.mailrelay.test", "dave@café.test")


@pytest.fixture
def port() -> int:
    """The exchangers' shared port for this test."""
    return free_everywhere()


@pytest.fixture
def scripted_at(port: int, tls_files: TLSFiles) -> Iterator[ScriptedAt]:
    """``scripted_at(address, scripts, tls="trusted")``: the scripted server on ``address``."""
    servers: list[ScriptedServer] = []

    def make(address: str, scripts: list[list[Step]], *, tls: str | None = "trusted") -> Any:
        context = None if tls is None else tls_files.server_context(trusted=tls == "trusted")
        server = ScriptedServer(scripts, ssl_context=context, timeout=5.0)
        server._listener.close()
        server._listener = socket.create_server((address, port), backlog=16, reuse_port=False)
        server._listener.settimeout(0.05)
        server.host, server.port = address, port
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.stop()
    assert [e for server in servers for e in server.errors] == []


Serve = Callable[..., CountingHandler]


@pytest.fixture
def serve(port: int, tls_files: TLSFiles) -> Iterator[Serve]:
    """``serve(address="127.0.0.1", tls=False)``: a counting aiosmtpd server at ``port``."""
    controllers: list[Controller] = []

    def start(address: str = "127.0.0.1", *, tls: bool = False) -> CountingHandler:
        handler = CountingHandler()
        context = tls_files.server_context() if tls else None
        controllers.append(start_counting(handler, address=address, port=port, tls_context=context))
        return handler

    yield start
    for controller in controllers:
        controller.stop()


def deliver_each(
    flavour: Flavour,
    unbound: UnboundServer,
    items: list[tuple[Message, Envelope]],
    *,
    pause: float = 0.0,
    **kwargs: Any,
) -> list[DeliveryResult]:
    """One ``send`` per item, in turn, on one fresh MX transport (closed at the end),
    ``pause`` seconds apart."""
    kwargs.setdefault("timeouts", FAST)
    if flavour == "sync":
        with MXTransport(unbound.resolver(timeout=1.0), **kwargs, refused_networks=()) as mx:
            results = []
            for n, (message, envelope) in enumerate(items):
                if n and pause:
                    time.sleep(pause)
                results.append(mx.send(message, envelope))
            return results

    async def main() -> list[DeliveryResult]:
        async with AsyncMXTransport(
            unbound.async_resolver(timeout=1.0), **kwargs, refused_networks=()
        ) as mx:
            results = []
            for n, (message, envelope) in enumerate(items):
                if n and pause:
                    await asyncio.sleep(pause)
                results.append(await mx.asend(message, envelope))
            return results

    return run(main())


def to(*recipients: str, requiretls: bool = False) -> tuple[Message, Envelope]:
    message = make_message(to=recipients, sender="sender@mailrelay.test")
    envelope = Envelope.from_message(message)
    if requiretls:
        envelope = Envelope(
            envelope.sender, [r.address for r in envelope.recipients], requiretls=True
        )
    return message, envelope


# -- one session for the domains of one exchanger ------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_domains_sharing_an_exchanger_share_one_session(
    flavour: Flavour, unbound: UnboundServer, serve: Serve, port: int
) -> None:
    handler = serve()
    [result] = deliver_each(flavour, unbound, [to(*SHARED)], port=port)
    assert [r.outcome for r in result.recipients] == [Outcome.ACCEPTED] * 3
    assert result.host == f"mx.mailrelay.test[127.0.0.1]:{port}"
    assert len(handler.connections) == 1
    # Still one transaction per domain: each copy went to its own domain's recipient.
    assert sorted(m.rcpt_tos for m in handler.messages) == [
        ("bob@mailrelay.test",),
        ("carol@sink.mailrelay.test",),
        ("dave@xn--caf-dma.test",),
    ]
    assert handler.quits == 1  # the shared session was QUIT once, at close


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_batch_and_later_calls_reuse_the_session(
    flavour: Flavour, unbound: UnboundServer, serve: Serve, port: int
) -> None:
    handler = serve()
    items = [to(address) for address in SHARED]
    if flavour == "sync":
        with MXTransport(
            unbound.resolver(timeout=1.0), port=port, timeouts=FAST, refused_networks=()
        ) as mx:
            results = mx.send_many([message for message, _ in items])
            results.append(mx.send(items[0][0]))
    else:

        async def main() -> list[DeliveryResult]:
            resolver = unbound.async_resolver(timeout=1.0)
            async with AsyncMXTransport(
                resolver, port=port, timeouts=FAST, refused_networks=()
            ) as mx:
                batch = await mx.asend_many([message for message, _ in items])
                return [*batch, await mx.asend(items[0][0])]

        results = run(main())
    assert [r.ok for r in results] == [True] * 4
    assert len(handler.connections) == 1
    assert len(handler.messages) == 4


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_refused_transaction_is_reset_before_the_next_domain(
    flavour: Flavour, unbound: UnboundServer, serve: Serve, port: int
) -> None:
    handler = serve()
    # The test server refuses "reject" at RCPT: that domain's transaction is left open.
    [result] = deliver_each(
        flavour, unbound, [to("reject@mailrelay.test", "bob@sink.mailrelay.test")], port=port
    )
    assert [r.outcome for r in result.recipients] == [Outcome.PERMANENT, Outcome.ACCEPTED]
    assert len(handler.connections) == 1
    assert handler.rsets >= 1  # RFC 5321 §4.1.1.5: RSET before the next MAIL
    assert [m.rcpt_tos for m in handler.messages] == [("bob@sink.mailrelay.test",)]


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize(
    ("recipients", "policy"),
    [
        # Another exchanger name at the same address: results and certificates name it.
        (("bob@mailrelay.test", "carol@a-only.test"), None),
        # The same exchanger, but one domain's policy makes other TLS decisions.
        (SHARED[:2], {"sink.mailrelay.test": TLS.NONE}),
    ],
)
def test_sessions_are_not_shared_across_names_or_tls_decisions(
    flavour: Flavour,
    recipients: tuple[str, ...],
    policy: dict[str, TLS] | None,
    *,
    unbound: UnboundServer,
    serve: Serve,
    port: int,
) -> None:
    handler = serve()
    hook = None if policy is None else policy.get
    [result] = deliver_each(flavour, unbound, [to(*recipients)], port=port, tls_policy=hook)
    assert result.ok
    assert len(handler.connections) == 2


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_reuse_can_be_turned_off(
    flavour: Flavour, unbound: UnboundServer, serve: Serve, port: int
) -> None:
    handler = serve()
    off = PoolSettings(max_messages=1)
    [result] = deliver_each(flavour, unbound, [to(*SHARED)], port=port, pool=off)
    assert result.ok
    assert len(handler.connections) == 3
    assert handler.quits == 3


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_session_the_server_dropped_is_replaced(
    flavour: Flavour, unbound: UnboundServer, scripted_at: ScriptedAt, port: int
) -> None:
    one_then_hang_up = [
        greeting(),
        ehlo("PIPELINING"),
        *accept_message(1),
        Step(expect=r"(MAIL FROM:.*|NOOP|RSET)", reply=b"421 4.4.2 idle too long\r\n"),
    ]
    server = scripted_at(
        "127.0.0.1",
        [one_then_hang_up, [greeting(), ehlo("PIPELINING"), *accept_message(1), quit_step()]],
        tls=None,
    )
    results = deliver_each(
        flavour, unbound, [to("bob@mailrelay.test"), to("carol@sink.mailrelay.test")], port=port
    )
    assert [r.ok for r in results] == [True, True]
    assert len(server.sessions) == 2  # the dead session was replaced, not reported


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_session_the_server_spoke_on_while_idle_is_replaced(
    flavour: Flavour, unbound: UnboundServer, scripted_at: ScriptedAt, port: int
) -> None:
    # An extra reply while the session waits in the pool: reused, it would be read as the
    # next MAIL's reply and pair every later reply with the wrong command.
    one_then_an_extra_reply = [
        greeting(),
        ehlo("PIPELINING"),
        *accept_message(1),
        Step(reply=b"250 2.0.0 one reply too many\r\n", delay=0.05),
        *accept_message(1),
        quit_step(),
    ]
    one_message = [greeting(), ehlo("PIPELINING"), *accept_message(1), quit_step()]
    server = scripted_at("127.0.0.1", [one_then_an_extra_reply, one_message], tls=None)
    results = deliver_each(
        flavour,
        unbound,
        [to("bob@mailrelay.test"), to("carol@sink.mailrelay.test")],
        pause=0.5,
        port=port,
    )
    assert [r.ok for r in results] == [True, True]
    assert len(server.sessions) == 2
    assert sum(line.startswith(b"MAIL") for line in server.session(0).lines) == 1


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_an_exchanger_that_could_not_be_reached_is_not_retried_for_the_next_domain(
    flavour: Flavour, unbound: UnboundServer, port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing listens at mx.mailrelay.test (127.0.0.1 and ::1) on this port.
    module = mx_sync if flavour == "sync" else mx_async
    real = module.connect
    attempts: list[str] = []

    def counting(host: str | None, *args: Any, **kwargs: Any) -> Any:
        attempts.append(str(host))
        return real(host, *args, **kwargs)

    monkeypatch.setattr(module, "connect", counting)
    [result] = deliver_each(flavour, unbound, [to(*SHARED)], port=port)
    assert [r.outcome for r in result.recipients] == [Outcome.TRANSIENT] * 3
    # Each address was tried once for the message, not once per domain...
    assert sorted(attempts) == ["127.0.0.1", "::1"]
    # ...and every domain's reason still says what each target did.
    for recipient in result.recipients:
        assert recipient.reason is not None
        assert recipient.reason.count("could not connect") == 2


# -- REQUIRETLS: the next exchanger when one lacks the keyword ------------------------------------


def _verifying_without_names(tls_files: TLSFiles) -> ssl.SSLContext:
    # The test certificate names only mx.mailrelay.test and localhost: verify the chain
    # (our CA) but not the name, so the mx2.test exchangers count as verified.
    context = tls_files.client_context()
    context.check_hostname = False
    return context


def _with_requiretls() -> list[Step]:
    return [
        greeting(),
        ehlo("STARTTLS", "PIPELINING"),
        Step(expect="STARTTLS", reply=b"220 2.0.0 Ready\r\n", action=Action.START_TLS),
        ehlo("REQUIRETLS", "PIPELINING"),
        *accept_message(1),
        quit_step(),
    ]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_requiretls_moves_on_to_an_exchanger_that_offers_it(
    flavour: Flavour,
    *,
    unbound: UnboundServer,
    serve: Serve,
    scripted_at: ScriptedAt,
    port: int,
    tls_files: TLSFiles,
) -> None:
    lacking = serve("127.0.0.1", tls=True)  # mx1.mx2.test: verified TLS, no REQUIRETLS
    offering = scripted_at("127.0.0.2", [_with_requiretls()])  # mx2.mx2.test
    policy = MXPolicy(tls=TLS.STARTTLS, ssl_context=_verifying_without_names(tls_files))
    [result] = deliver_each(
        flavour,
        unbound,
        [to("bob@mx2.test", requiretls=True)],
        port=port,
        tls_policy=lambda domain: policy,
    )
    [recipient] = result.recipients
    assert recipient.outcome is Outcome.ACCEPTED
    assert recipient.host == f"mx2.mx2.test[127.0.0.2]:{port}"
    assert lacking.messages == []
    assert len(lacking.connections) == 1
    assert lacking.quits == 1  # asked, skipped, QUIT at close
    session = offering.session(0)
    assert "tls" in session.events
    [mail] = [line for line in session.lines if line.startswith(b"MAIL FROM")]
    assert b" REQUIRETLS" in mail


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_requiretls_with_no_exchanger_offering_it_is_not_sent(
    flavour: Flavour, unbound: UnboundServer, serve: Serve, port: int, tls_files: TLSFiles
) -> None:
    lacking = serve("127.0.0.1", tls=True)  # a-only.test has this one exchanger
    policy = MXPolicy(tls=TLS.STARTTLS, ssl_context=_verifying_without_names(tls_files))
    [result] = deliver_each(
        flavour,
        unbound,
        [to("bob@a-only.test", requiretls=True)],
        port=port,
        tls_policy=lambda domain: policy,
    )
    [recipient] = result.recipients
    # RFC 8689 §5: no exchanger offers REQUIRETLS: not sent, a permanent failure (5.7.30).
    assert recipient.outcome is Outcome.PERMANENT
    assert recipient.reason is not None
    assert "REQUIRETLS support required" in recipient.reason
    assert str(recipient.enhanced) == "5.7.30"  # for the DSN reporting it
    assert lacking.messages == []


# -- reuse keys ----------------------------------------------------------------------------------


def test_reuse_keys_follow_the_tls_decision() -> None:
    target = Target(name="mx.example.org", address="192.0.2.1", port=25)
    other_name = Target(name="mx.example.net", address="192.0.2.1", port=25)
    a, b = ssl.create_default_context(), ssl.create_default_context()
    opportunistic = MXPolicy()
    assert reuse_key(target, opportunistic, a) == reuse_key(target, opportunistic, b)
    assert reuse_key(target, opportunistic, a) != reuse_key(other_name, opportunistic, a)
    no_fallback = MXPolicy(plaintext_fallback=False)
    assert reuse_key(target, opportunistic, a) != reuse_key(target, no_fallback, a)
    strict = MXPolicy(tls=TLS.STARTTLS)
    assert reuse_key(target, strict, a) == reuse_key(target, strict, a)
    assert reuse_key(target, strict, a) != reuse_key(target, strict, b)  # another trust
    assert reuse_key(target, strict, a) != reuse_key(target, opportunistic, a)
    assert reuse_key(target, MXPolicy(tls=TLS.NONE), a) != reuse_key(target, opportunistic, a)
