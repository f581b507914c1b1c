"""Properties: no LMTP server and no set of mail exchangers, however broken, can make the LMTP
or MX transports hang, lose an answer, deliver a recipient twice, or report a delivery or a
bounce the servers never gave.

Hypothesis draws the misbehaviour of :class:`~tests.transport.hostile_server.HostileServer`
(see :mod:`tests.transport.test_hostile_properties`, whose strategies and checks this module
reuses) on two surfaces that suite does not cover.

**LMTP** (``LMTPTransport`` / ``AsyncLMTPTransport`` over TCP, with ``send``/``asend`` and
``send_many``/``asend_many``): after the data an LMTP server answers once per accepted
recipient (RFC 2033 §4.2). The plan draws that phase too: each final reply may be any code
(mixed 2xx/4xx/5xx), a 421 that ends the session, a malformed line, garbage, silence past
the timeout, a hang-up or a reset (so fewer replies than recipients), and the first
transaction's finals may be followed by replies nobody asked for (more replies than
recipients); greeting, LHLO, MAIL, RCPT and DATA misbehave as in the SMTP suite. For every
plan:

1. No hang: the call ends within a bound derived from the timeouts and what the server saw.
2. Only typed errors: ``send`` raises nothing but ``DeliveryError``; a batch raises nothing.
3. One result per message, in order, one recipient result per envelope recipient.
4. No false delivery: ``ACCEPTED`` only with the recipient's *own* final reply, 2xx, and
   carrying that reply. No false bounce: ``PERMANENT`` only with a 5xx the server really
   gave that recipient (its RCPT or its own final reply) or the whole message (MAIL, DATA)
   or session. So a recipient whose final reply never came is never ACCEPTED nor PERMANENT.
5. Bounded memory (endless replies are cut).
6. A final reply received is kept: a recipient's own final reply that reached the client
   (on a connection not reset) decides its outcome class (2xx ACCEPTED, 4xx TRANSIENT, 5xx
   PERMANENT); the only excuse is a timeout.

**Direct to MX** (``MXTransport`` / ``AsyncMXTransport``): the domain ``mx.test`` has two or
three exchangers of increasing preference on 127.0.0.2, 127.0.0.3, 127.0.0.4 (one port for
all), served by :class:`~tests.peers.hostile_dns.HostileDNS`; each exchanger is a hostile
SMTP server with a plan of its own, or nothing listening. One or two messages are sent in
turn on one transport (so sessions are reused). For every draw:

1. No hang: bounded from the timeouts and what every exchanger saw.
2. ``send``/``asend`` raise nothing (docs/mx.md: every failure is a per-recipient result).
3. One result per envelope recipient, in order.
4. Failover as docs/mx.md says: the exchanger named in the results (``host``) is the first
   one, in preference order, that answered the message per recipient (an exchanger that
   answered — refused MAIL, an RCPT or DATA with anything but 421, or gave a final reply —
   ends the search, so no later exchanger sees the message); when the results say no
   exchanger took the message, none answered; PERMANENT of that kind only when every
   exchanger refused the session with 5xx.
5. No duplicate delivery: a recipient an exchanger surely accepted (2xx RCPT and 2xx final
   on a connection it did not reset) is never sent to any exchanger again, and is
   reported ACCEPTED.
6. No false delivery or bounce, as in the SMTP suite, against all exchangers' records.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailrelay.errors import DeliveryError, DeliveryTimeout
from mailrelay.options import TLS
from mailrelay.resolver import AsyncResolver, Resolver
from mailrelay.results import DeliveryResult, Outcome, RecipientResult
from mailrelay.transport import AsyncLMTPTransport, LMTPTransport, PoolSettings
from mailrelay.transport.mx import MXTransport
from mailrelay.transport.mx_async import AsyncMXTransport
from tests.peers.hostile_dns import HostileDNS, mx_records
from tests.transport.hostile_server import (
    NORMAL,
    Behaviour,
    ConnectionRecord,
    HostileServer,
    Plan,
    Point,
    TransactionRecord,
)
from tests.transport.test_hostile_properties import (
    SHORT,
    SLACK,
    TIMEOUT,
    TIMEOUTS,
    CallRecord,
    Flavour,
    Item,
    _positive,
    accepts,
    answered_on,
    batches,
    call_bounded,
    check_server_side,
    faults,
    make_item,
    one_in,
    plans,
    refused_before_sending,
    send_batch,
    send_each,
)

#: ``HOSTILE_LMTP_MX_EXAMPLES=500`` explores longer (each test's example count).
_EXPLORE = os.environ.get("HOSTILE_LMTP_MX_EXAMPLES")
EXAMPLES = settings(
    max_examples=int(_EXPLORE or 25),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
#: MX examples are cheaper (most plans fail fast at one exchanger and move on).
MX_EXAMPLES = settings(EXAMPLES, max_examples=int(_EXPLORE or 40))


def _klass(code: int) -> Outcome:
    return {2: Outcome.ACCEPTED, 4: Outcome.TRANSIENT, 5: Outcome.PERMANENT}[code // 100]


def _timed_out(result: object, recipient: RecipientResult | None = None) -> bool:
    """The excuse of property 6: the client stopped waiting (a reply may come just after)."""
    if isinstance(result, DeliveryTimeout):
        return True
    return recipient is not None and "DeliveryTimeout" in (recipient.reason or "")


class Servers:
    """Several servers' records seen as one (the checks only read ``connections``)."""

    def __init__(self, servers: list[HostileServer]) -> None:
        self.connections: list[ConnectionRecord] = [c for s in servers for c in s.connections]


def describe_all(servers: list[HostileServer] | list[HostileServer | None]) -> str:
    return "\n".join(
        f"exchanger {n}: " + ("nothing listening" if s is None else repr(s.connections))
        for n, s in enumerate(servers)
    )


# == LMTP ======================================================================================

#: Final replies per recipient: a mix of classes, 421 in the middle included.
FINAL_CODES = (250, 251, 421, 450, 451, 452, 550, 552, 554)


@st.composite
def finals(draw: st.DrawFn) -> Behaviour:
    """One recipient's final reply: normal (3 in 10), any final code (4 in 10, some late or
    multi-line), or a fault (3 in 10: malformed, garbage, silence, hang-up, reset, ...)."""
    roll = draw(st.integers(0, 9))
    if roll < 3:
        return NORMAL
    if roll < 7:
        return Behaviour(
            code=draw(st.sampled_from(FINAL_CODES)),
            multiline=draw(one_in(3)),
            delay=SHORT if draw(one_in(4)) else 0.0,
        )
    return draw(faults())


@st.composite
def lmtp_plans(draw: st.DrawFn) -> Plan:
    """Each recipient's final reply misbehaves in about half the plans (1-6 of them, across
    transactions); MAIL, RCPT and DATA one in three, the greeting, LHLO, RSET, NOOP and QUIT
    one in six (their behaviours as in the SMTP suite); one plan in five sends one or two
    replies more than there are recipients."""
    base = draw(plans())
    planned: dict[Point, tuple[Behaviour, ...]] = {
        point: behaviours
        for point, behaviours in base.behaviours.items()
        if point not in (Point.DATA_END, Point.BDAT, Point.HELO)
    }
    if draw(st.booleans()):
        planned[Point.DATA_END] = tuple(draw(st.lists(finals(), min_size=1, max_size=6)))
    extra = draw(st.integers(1, 2)) if draw(one_in(5)) else 0
    offered = tuple(k for k in base.extensions if k != "CHUNKING")
    return Plan(behaviours=planned, extensions=offered, extra_finals=extra)


@attrs.frozen(kw_only=True)
class LMTPClient:
    pipelining: bool
    pool: PoolSettings

    def transport(self, flavour: Flavour, port: int) -> Any:
        cls = LMTPTransport if flavour == "sync" else AsyncLMTPTransport
        return cls(
            "127.0.0.1",
            port,
            tls=TLS.NONE,
            timeouts=TIMEOUTS,
            pipelining=self.pipelining,
            pool=self.pool,
        )


lmtp_clients = st.builds(
    LMTPClient,
    pipelining=one_in(4).map(lambda off: not off),
    pool=st.builds(
        PoolSettings,
        size=st.integers(1, 2),
        max_messages=st.integers(1, 4),
        health_check_after=st.sampled_from([1e-9, 86400.0]),
    ),
)


def _mine(transaction: TransactionRecord, item: Item) -> bool:
    return transaction.sender == item.sender


def own_finals(server: HostileServer, item: Item, address: str) -> list[tuple[int, bool]]:
    """Each final reply the server wrote for ``address`` in ``item``'s transactions whose
    data it took: its code, and whether the connection was left unreset (so the reply
    surely reached the client)."""
    return [
        (code, not connection.reset)
        for connection in server.connections
        for transaction in connection.transactions
        if _mine(transaction, item) and transaction.marker == item.index
        for given, code in transaction.finals
        if given == address and code is not None
    ]


def lmtp_accepts(transaction: TransactionRecord, item: Item, address: str) -> bool:
    return (
        _mine(transaction, item)
        and transaction.marker == item.index
        and _positive(transaction.mail)
        and any(a == address and _positive(c) for a, c in transaction.recipients)
        and any(a == address and _positive(c) for a, c in transaction.finals)
    )


def lmtp_permanent_codes(server: HostileServer, item: Item, address: str) -> set[int]:
    """The 5xx codes that may explain ``address`` being PERMANENT: its own RCPT and final
    replies, the message's MAIL and DATA replies, and the session's codes."""
    codes: set[int] = set()
    for connection in server.connections:
        codes.update(c for _, c in connection.session_codes if c is not None)
        for transaction in connection.transactions:
            if not _mine(transaction, item):
                continue
            codes.update(c for c in (transaction.mail, transaction.data) if c is not None)
            for pairs in (transaction.recipients, transaction.finals):
                codes.update(c for a, c in pairs if a == address and c is not None)
    return {code for code in codes if 500 <= code < 600}


def check_lmtp_result(server: HostileServer, item: Item, result: object) -> None:
    """Properties 3, 4 and 6 for one message's result (``result`` may be an error)."""
    if isinstance(result, DeliveryResult):
        assert result.message_id == item.message.message_id
        assert [r.address for r in result.recipients] == [
            r.address for r in item.envelope.recipients
        ]
    for recipient in item.envelope.recipients:
        address = str(recipient.address)
        reported = None
        if isinstance(result, DeliveryResult):
            (reported,) = (r for r in result.recipients if r.address == recipient.address)
            if reported.outcome is Outcome.ACCEPTED:
                assert any(
                    lmtp_accepts(t, item, address)
                    for c in server.connections
                    for t in c.transactions
                ), f"{item.index}: {reported} ACCEPTED without its own 2xx final:\n" + "\n".join(
                    repr(c) for c in server.connections
                )
                assert reported.reply is not None
                assert reported.reply.code in {c for c, _ in own_finals(server, item, address)}
            elif reported.outcome is Outcome.PERMANENT:
                if reported.reply is None:
                    assert any(
                        refused_before_sending(offered, item)
                        for c in server.connections
                        for offered in c.offered
                    ), reported
                else:
                    assert reported.reply.code in lmtp_permanent_codes(server, item, address), (
                        f"{item.index}: {reported} PERMANENT, but the server never refused "
                        f"it so:\n" + "\n".join(repr(c) for c in server.connections)
                    )
        # Property 6: a final of its own that reached the client decides the class.
        received = [code for code, sure in own_finals(server, item, address) if sure]
        received = [code for code in received if code != 421]
        if not received or server.plan.extra_finals:
            continue
        if isinstance(result, DeliveryError):
            assert _timed_out(result), (
                f"{item.index}: {address} got its final {received}, yet {result!r}:\n"
                + "\n".join(repr(c) for c in server.connections)
            )
            continue
        assert reported is not None
        assert reported.outcome is _klass(received[0]) or _timed_out(result, reported), (
            f"{item.index}: {address} got its final {received}, yet {reported}:\n"
            + "\n".join(repr(c) for c in server.connections)
        )


def run_lmtp(
    plan: Plan, client: LMTPClient, items: list[Item], call: Any, refusal: str
) -> tuple[HostileServer, Any]:
    server = HostileServer(plan, lmtp=True).start()
    try:
        outcome = call_bounded(server, lambda: call(server.port))
        if outcome.error is not None:
            raise AssertionError(f"raised {outcome.error!r}: {refusal}") from outcome.error
        check_server_side(server, outcome, len(items), client.pool.size)
    finally:
        server.stop()
    return server, outcome.value


@pytest.mark.parametrize("flavour", ["sync", "async"])
@EXAMPLES
@given(plan=lmtp_plans(), client=lmtp_clients, items=batches(min_size=1, max_size=3))
def test_lmtp_send_never_hangs_loses_or_lies(
    flavour: Flavour, plan: Plan, client: LMTPClient, items: list[Item]
) -> None:
    server, outcomes = run_lmtp(
        plan,
        client,
        items,
        lambda port: send_each(flavour, client, port, items),
        "send may raise only a DeliveryError",
    )
    assert len(outcomes) == len(items)
    for item, result in zip(items, outcomes, strict=True):
        check_lmtp_result(server, item, result)


@pytest.mark.parametrize("flavour", ["sync", "async"])
@EXAMPLES
@given(plan=lmtp_plans(), client=lmtp_clients, items=batches(min_size=2, max_size=4))
def test_lmtp_send_many_never_hangs_loses_or_lies(
    flavour: Flavour, plan: Plan, client: LMTPClient, items: list[Item]
) -> None:
    server, results = run_lmtp(
        plan,
        client,
        items,
        lambda port: send_batch(flavour, client, port, items),
        "a batch of good items must not raise",
    )
    assert len(results) == len(items)
    for item, result in zip(items, results, strict=True):
        assert isinstance(result, DeliveryResult), result
        check_lmtp_result(server, item, result)


# == direct to MX ==============================================================================

DOMAIN = "mx.test"
MX_RECIPIENTS = ("bob@mx.test", "carol@mx.test", "dave@mx.test")


def exchanger(n: int) -> str:
    return f"mx{n + 1}.{DOMAIN}"


def address_of(n: int) -> str:
    return f"127.0.0.{n + 2}"


@pytest.fixture(scope="module")
def dns_server() -> Iterator[HostileDNS]:
    with HostileDNS() as server:
        yield server


@st.composite
def mx_items(draw: st.DrawFn) -> list[Item]:
    """One or two messages to 1-3 recipients at :data:`DOMAIN`."""
    count = draw(st.integers(1, 2))
    items = []
    for index in range(count):
        recipients = draw(
            st.lists(st.sampled_from(MX_RECIPIENTS), min_size=1, max_size=3, unique=True)
        )
        items.append(make_item(index, tuple(recipients), False, 0))
    return items


@st.composite
def mx_setups(draw: st.DrawFn) -> list[Plan | None]:
    """Two or three exchangers; each is down (nothing listening) one time in five."""
    count = draw(st.integers(2, 3))
    return [None if draw(one_in(5)) else draw(plans()) for _ in range(count)]


def start_exchangers(setup: list[Plan | None]) -> tuple[int, list[HostileServer | None]]:
    """Start the exchangers' servers on 127.0.0.2, .3, .4 at one port (retrying when the
    port the kernel gave the first is taken on another address)."""
    for _ in range(20):
        servers: list[HostileServer | None] = []
        port = 0
        try:
            for n, plan in enumerate(setup):
                if plan is None:
                    servers.append(None)
                    continue
                started = HostileServer(plan, host=address_of(n), port=port)
                port = started.port
                servers.append(started)
        except OSError as exc:
            for made in servers:
                if made is not None:
                    made._listener.close()
            if exc.errno != errno.EADDRINUSE:
                raise
            continue
        if port == 0:  # every exchanger down: any port with nothing listening will do
            with contextlib.closing(socket.socket()) as probe:
                probe.bind((address_of(0), 0))
                port = probe.getsockname()[1]
        for made in servers:
            if made is not None:
                made.start()
        return port, servers
    raise AssertionError("no common free port on the exchangers' addresses")


def zone(dns: HostileDNS, count: int) -> None:
    dns.reset()
    dns.add(DOMAIN, "MX", *mx_records([(10 * (n + 1), exchanger(n) + ".") for n in range(count)]))
    for n in range(count):
        dns.add(exchanger(n), "A", address_of(n))


@attrs.frozen(kw_only=True)
class MXClient:
    pipelining: bool
    reuse: bool

    def pool(self) -> PoolSettings:
        return PoolSettings(size=4, max_messages=10 if self.reuse else 1)


mx_clients = st.builds(MXClient, pipelining=one_in(4).map(lambda off: not off), reuse=st.booleans())


def mx_send(
    flavour: Flavour, client: MXClient, dns: HostileDNS, port: int, items: list[Item]
) -> list[DeliveryResult]:
    common: dict[str, Any] = {
        "port": port,
        "tls": TLS.NONE,
        "timeouts": TIMEOUTS,
        "local_hostname": "client.example",
        "pipelining": client.pipelining,
        "pool": client.pool(),
    }
    if flavour == "sync":
        resolver = Resolver(["127.0.0.1"], port=dns.port, timeout=2.0)
        with MXTransport(resolver, **common, refused_networks=()) as transport:
            return [transport.send(item.message, item.envelope) for item in items]

    async def main() -> list[DeliveryResult]:
        resolver = AsyncResolver(["127.0.0.1"], port=dns.port, timeout=2.0)
        async with AsyncMXTransport(resolver, **common, refused_networks=()) as transport:
            return [await transport.asend(item.message, item.envelope) for item in items]

    return asyncio.run(main())


def answered_by(server: HostileServer | None, item: Item) -> bool:
    """Whether the exchanger answered ``item`` per recipient on a connection it did not
    reset (so the answer surely reached the client)."""
    if server is None:
        return False
    return any(
        transaction.sender == item.sender and answered_on(transaction)
        for connection in server.connections
        if not connection.reset
        for transaction in connection.transactions
    )


def saw(server: HostileServer | None, item: Item) -> bool:
    """Whether the exchanger got any command of ``item``'s transaction."""
    return server is not None and any(
        transaction.sender == item.sender
        for connection in server.connections
        for transaction in connection.transactions
    )


def mx_permanent_explained(
    servers: list[HostileServer], item: Item, result: RecipientResult
) -> bool:
    """As the SMTP suite's check, over every exchanger's records."""
    address = str(result.address)
    if result.reply is None:
        return any(
            refused_before_sending(offered, item)
            for s in servers
            for c in s.connections
            for offered in c.offered
        )
    code = result.reply.code
    if not 500 <= code < 600:
        return False
    for server in servers:
        for connection in server.connections:
            if any(given == code for _, given in connection.session_codes):
                return True
            for t in connection.transactions:
                if t.sender != item.sender:
                    continue
                if code in (t.mail, t.data, t.final, *t.chunks) or (address, code) in t.recipients:
                    return True
    return False


def check_mx_item(servers: list[HostileServer | None], port: int, item: Item, result: Any) -> None:
    up = [s for s in servers if s is not None]
    where = describe_all(servers)
    assert isinstance(result, DeliveryResult), result
    assert [r.address for r in result.recipients] == [r.address for r in item.envelope.recipients]
    hosts = {f"{exchanger(n)}[{address_of(n)}]:{port}": n for n in range(len(servers))}
    tried_all = all(r.reason and r.reason.startswith("no exchanger of") for r in result.recipients)
    first_answer = next((n for n, s in enumerate(servers) if answered_by(s, item)), None)
    if tried_all:
        # Property 4: no exchanger took it, so none answered per recipient.
        assert first_answer is None, f"{item.index}: moved past an answer:\n{result}\n{where}"
        for r in result.recipients:
            if r.outcome is Outcome.PERMANENT:
                assert all(s is not None for s in servers), (r, where)
                for s in up:
                    assert any(
                        c is not None and c >= 500
                        for conn in s.connections
                        for _, c in conn.session_codes
                    ), (r, where)
    else:
        answering = {hosts.get(r.host or "") for r in result.recipients}
        assert len(answering) == 1, (result, where)
        (n,) = answering
        assert n is not None, (result, where)
        assert saw(servers[n], item), (result, where)
        # Property 4: every exchanger before it gave no answer, none after it saw the message.
        assert first_answer is None or first_answer >= n, (
            f"{item.index}: exchanger {first_answer} answered, yet the result is from {n}:\n"
            f"{result}\n{where}"
        )
        for later in servers[n + 1 :]:
            assert not saw(later, item), f"{item.index}: sent on after {n} answered:\n{where}"
    merged = Servers(up)
    for r in result.recipients:
        address = str(r.address)
        if r.outcome is Outcome.ACCEPTED:
            assert any(
                accepts(t, item, address) for c in merged.connections for t in c.transactions
            ), f"{item.index}: {r} ACCEPTED, never accepted:\n{where}"
        elif r.outcome is Outcome.PERMANENT:
            assert mx_permanent_explained(up, item, r), f"{item.index}: {r} PERMANENT:\n{where}"
    # Property 5: a recipient surely accepted is never sent again, and is ACCEPTED.
    for recipient in item.envelope.recipients:
        address = str(recipient.address)
        order = [
            (n, t, conn.reset)
            for n, s in enumerate(servers)
            if s is not None
            for conn in s.connections
            for t in conn.transactions
            if t.sender == item.sender
        ]
        sure = next(
            (i for i, (_, t, reset) in enumerate(order) if not reset and accepts(t, item, address)),
            None,
        )
        if sure is None:
            continue
        again = [t for _, t, _ in order[sure + 1 :] if any(a == address for a, _ in t.recipients)]
        assert not again, f"{item.index}: {address} accepted, then sent again:\n{where}"
        (reported,) = (r for r in result.recipients if r.address == recipient.address)
        assert reported.outcome is Outcome.ACCEPTED or _timed_out(result, reported), (
            f"{item.index}: {address} accepted, yet {reported}:\n{where}"
        )


def call_exchangers(
    dns: HostileDNS, setup: list[Plan | None], call: Callable[[int], Any], rounds: int
) -> tuple[CallRecord, int, list[HostileServer | None]]:
    """Serve ``setup``'s exchangers behind ``dns``, run ``call(port)`` under the hang guard
    and stop them; fails unless the call returned (no exception) within the bound its
    servers' connections and commands allow (each exchanger tried ``rounds`` times at most),
    every endless reply was cut and no server thread failed. Returns what the call did,
    the exchangers' port and their servers (``None``: down)."""
    zone(dns, len(setup))
    port, servers = start_exchangers(setup)
    up = [s for s in servers if s is not None]
    # The hang guard stops a server to wake the client; with every exchanger down, a
    # stand-in (started, so that stopping it is clean).
    guard = up[0] if up else HostileServer(Plan()).start()
    try:
        outcome = call_bounded(guard, lambda: call(port))
        if outcome.error is not None:
            raise AssertionError(f"the call raised {outcome.error!r}") from outcome.error
        for server in up:
            server.wait_idle(timeout=10.0)
        connections = sum(len(s.connections) for s in up)
        commands = sum(c.commands for s in up for c in s.connections)
        targets = len(servers) * rounds
        bound = TIMEOUT * (3 * connections + 2 * commands + 4 * targets + 4) + 4.0 + SLACK
        assert outcome.elapsed <= bound, (outcome.elapsed, bound, describe_all(servers))
        for server in up:
            for connection in server.connections:
                if "endless" in connection.ended:
                    assert connection.endless_cut, connection
            assert not server.errors, server.errors
    finally:
        for server in {id(s): s for s in [*up, guard]}.values():
            server.stop()
    return outcome, port, servers


@pytest.mark.parametrize("flavour", ["sync", "async"])
@MX_EXAMPLES
@given(setup=mx_setups(), client=mx_clients, items=mx_items())
def test_mx_failover_never_hangs_duplicates_or_lies(
    dns_server: HostileDNS,
    flavour: Flavour,
    setup: list[Plan | None],
    client: MXClient,
    items: list[Item],
) -> None:
    outcome, port, servers = call_exchangers(
        dns_server,
        setup,
        lambda port: mx_send(flavour, client, dns_server, port, items),
        len(items),
    )
    assert not dns_server.errors
    for item, result in zip(items, outcome.value, strict=True):
        check_mx_item(servers, port, item, result)


# -- minimal examples of what the properties found -------------------------------------------


@pytest.mark.parametrize("flavour", ["sync", "async"])
@pytest.mark.parametrize("batch", [False, True], ids=["send", "send_many"])
def test_lmtp_refused_mail_with_accepted_rcpts_reads_every_final(
    flavour: Flavour, batch: bool
) -> None:
    # A pipelined group: MAIL refused, yet both RCPTs answered 250 and DATA 354 (a broken
    # server). The client ends the empty transaction with a lone "."; the server then owes
    # one final reply per RCPT it accepted (RFC 2033 §4.2), two here. The client read only
    # one, and the next command on the connection raised LocalProtocolError (not a
    # DeliveryError) out of send: "nothing may follow NOOP before its reply".
    items = [
        make_item(0, ("bob@example.com", "carol@example.org"), False, 0),
        make_item(1, ("bob@example.com",), False, 0),
    ]
    plan = Plan(behaviours={Point.MAIL: (Behaviour(code=550),)}, extensions=("PIPELINING",))
    client = LMTPClient(
        pipelining=True, pool=PoolSettings(size=1, max_messages=2, health_check_after=1e-9)
    )
    send = send_batch if batch else send_each
    server, results = run_lmtp(
        plan, client, items, lambda port: send(flavour, client, port, items), "no error"
    )
    first, second = results
    assert isinstance(first, DeliveryResult), first
    assert [(r.outcome, r.reply and r.reply.code) for r in first.recipients] == [
        (Outcome.PERMANENT, 550),
        (Outcome.PERMANENT, 550),
    ]
    assert isinstance(second, DeliveryResult), second
    assert [r.outcome for r in second.recipients] == [Outcome.ACCEPTED]
    for item, result in zip(items, results, strict=True):
        check_lmtp_result(server, item, result)


@pytest.mark.parametrize("flavour", ["sync", "async"])
@pytest.mark.parametrize("health_check_after", [1e-9, 86400.0], ids=["noop", "no-noop"])
def test_lmtp_a_connection_with_unasked_replies_is_not_reused(
    flavour: Flavour, health_check_after: float
) -> None:
    # The server answers the first message's one recipient twice (more replies than
    # recipients). The extra reply came with the real one; it was left unread and taken as
    # the answer to the next command on the reused connection (the NOOP or the next MAIL),
    # so every reply after it answered the wrong command: the second message was reported
    # PERMANENT with the NOOP's 500, or TRANSIENT "answered DATA without 354", though the
    # server never refused it. The connection must be closed instead and the next message
    # sent on a fresh one.
    items = [make_item(n, ("bob@example.com",), False, 0) for n in range(2)]
    plan = Plan(
        behaviours={Point.NOOP: (Behaviour(code=500),)},
        extensions=("PIPELINING",),
        extra_finals=1,
    )
    client = LMTPClient(
        pipelining=True,
        pool=PoolSettings(size=1, max_messages=4, health_check_after=health_check_after),
    )
    server, results = run_lmtp(
        plan, client, items, lambda port: send_each(flavour, client, port, items), "none"
    )
    assert [[r.outcome for r in result.recipients] for result in results] == [
        [Outcome.ACCEPTED],
        [Outcome.ACCEPTED],
    ], results
    assert len(server.connections) == 2
    for item, result in zip(items, results, strict=True):
        check_lmtp_result(server, item, result)


# -- examples: the MX checks themselves ------------------------------------------------------


def run_mx(
    dns: HostileDNS, setup: list[Plan | None], flavour: Flavour, items: list[Item]
) -> tuple[int, list[HostileServer | None], list[DeliveryResult]]:
    zone(dns, len(setup))
    port, servers = start_exchangers(setup)
    try:
        client = MXClient(pipelining=True, reuse=True)
        results = mx_send(flavour, client, dns, port, items)
    finally:
        for server in servers:
            if server is not None:
                server.stop()
    return port, servers, results


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_mx_moves_on_after_a_421_greeting_and_stops_at_a_refused_rcpt(
    dns_server: HostileDNS, flavour: Flavour
) -> None:
    # docs/mx.md: a 421 greeting moves on; a 5xx to RCPT is the recipient's final answer.
    # Exchanger 1 says 421, exchanger 2 refuses carol and takes bob, exchanger 3 never
    # hears of the message; and the checks fail on a result that names the wrong exchanger.
    item = make_item(0, ("bob@mx.test", "carol@mx.test"), False, 0)
    setup: list[Plan | None] = [
        Plan(behaviours={Point.GREETING: (Behaviour(code=421),)}),
        Plan(behaviours={Point.RCPT: (NORMAL, Behaviour(code=550))}, extensions=("PIPELINING",)),
        Plan(),
    ]
    port, servers, (result,) = run_mx(dns_server, setup, flavour, [item])
    assert [(r.outcome, r.reply and r.reply.code) for r in result.recipients] == [
        (Outcome.ACCEPTED, 250),
        (Outcome.PERMANENT, 550),
    ]
    assert result.host == f"{exchanger(1)}[{address_of(1)}]:{port}"
    check_mx_item(servers, port, item, result)
    assert servers[2] is not None
    assert not servers[2].connections
    forged = attrs.evolve(
        result,
        recipients=tuple(
            attrs.evolve(r, host=f"{exchanger(2)}[{address_of(2)}]:{port}")
            for r in result.recipients
        ),
    )
    with pytest.raises(AssertionError):
        check_mx_item(servers, port, item, forged)


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_lmtp_a_2xx_to_data_ends_the_session(flavour: Flavour) -> None:
    # A pipelined batch: message 0's final reply comes with two replies nobody asked for,
    # and message 1's MAIL, RCPT and DATA are already on their way, so those replies answer
    # them, and DATA gets MAIL's 250. The client took that 2xx as "not sent" and went on,
    # every reply now answering the command before: message 2's RCPT got the 500 the server
    # gave message 1's DATA, and message 2 was bounced although nobody refused it. A 2xx to
    # DATA (RFC 5321 §4.3.2: 354 or a refusal) now ends the session; the messages without
    # an answer go again on a fresh connection.
    items = [make_item(n, ("bob@example.com",), False, 0) for n in range(3)]
    plan = Plan(
        behaviours={Point.DATA: (NORMAL, Behaviour(code=500))},
        extensions=("PIPELINING",),
        extra_finals=2,
    )
    client = LMTPClient(
        pipelining=True, pool=PoolSettings(size=1, max_messages=3, health_check_after=1e-9)
    )
    server, results = run_lmtp(
        plan, client, items, lambda port: send_batch(flavour, client, port, items), "none"
    )
    for item, result in zip(items, results, strict=True):
        check_lmtp_result(server, item, result)
    assert results[0].recipients[0].outcome is Outcome.ACCEPTED
    assert results[1].recipients[0].outcome is Outcome.TRANSIENT
    assert "without 354" in (results[1].recipients[0].reason or "")
    assert results[2].recipients[0].outcome is not Outcome.PERMANENT
