"""Properties: several messages at once through pooled SMTP and LMTP transports cannot be
paired with the wrong replies, reported delivered or bounced falsely, or sent twice, however
the server miscounts its replies.

Replies pair with commands by their order alone (docs/dialogue.md, "Replies nobody asked
for"), so this suite's :class:`~tests.transport.hostile_server.HostileServer` plans are made
of the faults that break the count: replies nobody asked for (glued to a reply, or a little
later: while the connection waits in the pool, or just before the answer to the client's
next command), a command left unanswered (:attr:`~tests.transport.hostile_server.Behaviour.skip`),
a reply split across two writes, a 421 in the middle of a pipelined group (or as a stray,
followed by the server closing), and a hang-up or reset after the data. They drive, with and
without PIPELINING and CHUNKING (``chunking=True``):

- ``SMTPTransport.send_many``, and ``send`` from several threads sharing one pool;
- ``AsyncSMTPTransport.asend_many`` with a pool of 2-4, and ``asend`` from several tasks;
- ``LMTPTransport.send_many`` / ``AsyncLMTPTransport.asend_many`` and ``send`` from threads.

For every plan, per message, against the server's own records (per connection: which
message's data it took, what it answered to every command and to the end of the data, and
:attr:`~tests.transport.hostile_server.ConnectionRecord.events`):

1. Every call ends within a bound derived from the timeouts and what the server saw; a
   ``send`` raises only ``DeliveryError``, a batch nothing; one result per message.
2. No false delivery: ``ACCEPTED`` only when the server answered that very message's data
   with 2xx (LMTP: that recipient's own final reply), after a 2xx to its MAIL and RCPT.
3. No false bounce: ``PERMANENT`` only with a 5xx the server gave that message or
   recipient (or the session).
4. No duplicate from the transport itself: the server keeps each message's whole data at
   most once (no test here retries; RFC 1047: once the data went out, the message is
   answered, never sent again), where keeping is any answer to the data but a refusal (a
   message refused with 421 after its data may go again on a fresh connection).
5. A 2xx final reply that reached the client is kept (reported ACCEPTED; a timeout excuses).
6. No connection is reused after a pairing violation the client could see: after replies
   nobody asked for glued to the greeting, to the answer of EHLO/LHLO, NOOP, DATA (354)
   or an RSET sent alone (or of a single SMTP send's final reply), or come while it was
   idle, the connection carries no further MAIL, RSET, data or BDAT.

What no client can tell apart (docs/dialogue.md): a stray or a missing reply *in the middle
of an exchange* — a stray glued to a reply the client reads others after, one that arrives
while the client waits for the next answer, or a command the server skips — shifts every
later reply by one, and the shifted replies may look like plausible answers (a pipelined
batch reads the next message's MAIL 250 as the skipped final reply). Properties 2, 3 and
5 therefore hold only for messages on connections without such a fault
(:func:`blind_fault`); properties 1, 4 and 6 hold always.

Knobs: ``HOSTILE_POOL_EXAMPLES`` (default 5) is each test's ``max_examples``.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailrelay.errors import DeliveryError, ServerProtocolError
from mailrelay.options import TLS
from mailrelay.results import DeliveryResult, Outcome
from mailrelay.transport import (
    AsyncLMTPTransport,
    AsyncSMTPTransport,
    LMTPTransport,
    PoolSettings,
    SMTPTransport,
)
from mailrelay.transport.sync_driver import SyncDriver
from tests.transport.hostile_server import (
    IDLE_GRACE,
    NORMAL,
    Behaviour,
    HostileServer,
    Kind,
    Plan,
    Point,
    TransactionRecord,
)
from tests.transport.test_hostile_lmtp_mx import lmtp_accepts, lmtp_permanent_codes
from tests.transport.test_hostile_properties import (
    TIMEOUTS,
    Item,
    accepted_by_server,
    call_bounded,
    check_server_side,
    describe,
    make_item,
    one_in,
    permanent_explained,
    surely_received,
)

EXAMPLES = settings(
    max_examples=int(os.environ.get("HOSTILE_POOL_EXAMPLES", "5")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

#: Replies the plans give instead of the usual one (no 354: a 354 where the client did not
#: send DATA would be a different fault, one the other hostile suites draw).
CODES = (250, 421, 450, 451, 452, 550, 554)
#: How long a late stray waits for the client's next bytes (well within the timeouts).
LATE = 0.05
#: Glued strays after these answers are the last replies the client is owed in its step,
#: and arrive with them; idle ones came while it waited in the pool: the client can always
#: see them (property 6).
VISIBLE = frozenset({"stray-greeting", "stray-ehlo", "stray-noop", "stray-data", "stray-idle"})
#: RSET goes alone in a single send (a pipelined batch groups it with the next envelope).
ALONE_RSET = VISIBLE | {"stray-rset"}
#: A single SMTP send's final reply is also the last it is owed (a batch's is not: the next
#: message's commands may be on their way, LMTP's neither: more finals may follow).
VISIBLE_SINGLE = ALONE_RSET | {"stray-data-end"}
#: The pause between the two waves of the "waves" way: longer than a late stray's wait plus
#: the server's idle grace, so the second wave meets connections idle strays came on.
WAVE_PAUSE = LATE + IDLE_GRACE + 0.1
#: What a reused connection carries: a new transaction or its data.
REUSE = frozenset({"MAIL", "RSET", "CONTENT", "BDAT"})


# -- plans -----------------------------------------------------------------------------------


@st.composite
def pairing_faults(draw: st.DrawFn, point: Point) -> Behaviour:
    """Normal (4 in 10), a split reply, strays glued on, strays a little later, another
    code (421 among them), no reply at all, or a hang-up or reset (1 in 10 each); strays
    come a little later twice as often after the answers a connection may go idle after
    (the end of the data, NOOP)."""
    roll = draw(st.integers(0, 10 if point in (Point.DATA_END, Point.NOOP) else 9))
    if roll == 10:
        roll = 6
    stray_code = 421 if draw(one_in(4)) else 250
    strays = draw(st.integers(1, 2))
    if roll < 4:
        return NORMAL
    if roll == 4:
        return Behaviour(split=True, multiline=draw(st.booleans()))
    if roll == 5:
        return Behaviour(strays=strays, stray_code=stray_code, split=draw(one_in(3)))
    if roll == 6:
        return Behaviour(strays=strays, stray_code=stray_code, stray_delay=LATE)
    if roll == 7:
        return Behaviour(code=draw(st.sampled_from(CODES)))
    if roll == 8:
        return Behaviour(skip=True)
    return Behaviour(kind=draw(st.sampled_from([Kind.CLOSE, Kind.RESET])))


#: Where the plans misbehave.
POINTS = (
    Point.GREETING,
    Point.EHLO,
    Point.MAIL,
    Point.RCPT,
    Point.DATA,
    Point.DATA_END,
    Point.BDAT,
    Point.RSET,
    Point.NOOP,
)


@st.composite
def plans(draw: st.DrawFn, lmtp: bool = False) -> Plan:
    """Each point misbehaves with a chance of one in three, in some of its first 1-4
    occurrences; PIPELINING is offered three times in four, CHUNKING (not to LMTP) half the
    time."""
    planned = {
        point: tuple(draw(st.lists(pairing_faults(point), min_size=1, max_size=4)))
        for point in POINTS
        if draw(one_in(3))
    }
    offered = ["8BITMIME", "SMTPUTF8"]
    if not draw(one_in(4)):
        offered.append("PIPELINING")
    if not lmtp and draw(st.booleans()):
        offered.append("CHUNKING")
    return Plan(behaviours=planned, extensions=tuple(offered))


@st.composite
def items(draw: st.DrawFn) -> list[Item]:
    """Two to six small ASCII messages, each to one or two recipients."""
    count = draw(st.integers(2, 6))
    return [
        make_item(
            index,
            tuple(
                draw(
                    st.lists(
                        st.sampled_from(("a@example.com", "b@example.org")),
                        min_size=1,
                        max_size=2,
                        unique=True,
                    )
                )
            ),
            False,
            0,
        )
        for index in range(count)
    ]


Way = Literal["many", "threads", "waves"]
Flavour = Literal["sync", "async"]


@attrs.frozen(kw_only=True)
class Client:
    """A transport's settings for one example."""

    lmtp: bool
    pipelining: bool
    chunking: bool
    pool: PoolSettings

    def transport(self, flavour: Flavour, port: int) -> Any:
        if self.lmtp:
            lmtp = LMTPTransport if flavour == "sync" else AsyncLMTPTransport
            return lmtp(
                "127.0.0.1",
                port,
                tls=TLS.NONE,
                timeouts=TIMEOUTS,
                pipelining=self.pipelining,
                pool=self.pool,
            )
        smtp = SMTPTransport if flavour == "sync" else AsyncSMTPTransport
        return smtp(
            "127.0.0.1",
            port,
            tls=TLS.NONE,
            timeouts=TIMEOUTS,
            pipelining=self.pipelining,
            chunking=self.chunking,
            pool=self.pool,
        )


def clients(lmtp: bool) -> st.SearchStrategy[Client]:
    return st.builds(
        Client,
        lmtp=st.just(lmtp),
        pipelining=one_in(4).map(lambda off: not off),
        chunking=st.just(False) if lmtp else st.booleans(),
        pool=st.builds(
            PoolSettings,
            size=st.integers(2, 4),
            max_messages=st.integers(1, 6),
            # Tiny: every reused connection is checked with NOOP first; a day: never.
            health_check_after=st.sampled_from([1e-9, 86400.0]),
        ),
    )


# -- sending ---------------------------------------------------------------------------------


def send_all(flavour: Flavour, way: Way, client: Client, port: int, batch: list[Item]) -> Any:
    """Every item through one transport: ``send_many``/``asend_many`` (one list of
    results), or each item's ``send`` in a thread of its own / ``asend`` in a task of its
    own (per item, its result or the ``DeliveryError`` it raised), all at once ("threads")
    or in two waves :data:`WAVE_PAUSE` apart ("waves": the second meets idle connections)."""
    pairs = [(item.message, item.envelope) for item in batch]
    waves = [pairs] if way != "waves" else [pairs[: len(pairs) // 2], pairs[len(pairs) // 2 :]]
    outcomes: list[Any] = []
    if flavour == "sync":
        with client.transport(flavour, port) as transport:
            if way == "many":
                return transport.send_many(pairs)
            for number, wave in enumerate(waves):
                if number:
                    time.sleep(WAVE_PAUSE)
                outcomes += in_threads(transport.send, wave)
        return outcomes

    async def main() -> list[Any]:
        async with client.transport(flavour, port) as transport:
            if way == "many":
                return list(await transport.asend_many(pairs))
            for number, wave in enumerate(waves):
                if number:
                    await asyncio.sleep(WAVE_PAUSE)
                outcomes.extend(await asyncio.gather(*(caught(transport.asend, p) for p in wave)))
        return outcomes

    return asyncio.run(main())


async def caught(asend: Callable[..., Any], pair: tuple[Any, Any]) -> Any:
    try:
        return await asend(*pair)
    except DeliveryError as exc:
        return exc


def in_threads(send: Callable[..., Any], pairs: list[tuple[Any, Any]]) -> list[Any]:
    """``send`` each pair in a thread of its own, all sharing one pool."""
    outcomes: list[Any] = [None] * len(pairs)
    start = threading.Barrier(len(pairs), timeout=10.0)

    def target(index: int) -> None:
        start.wait()
        try:
            outcomes[index] = send(*pairs[index])
        except DeliveryError as exc:
            outcomes[index] = exc
        except BaseException as exc:  # judged in the test's thread
            outcomes[index] = AssertionError(f"send raised {exc!r}")

    threads = [threading.Thread(target=target, args=(n,)) for n in range(len(pairs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(50.0)
    assert not any(thread.is_alive() for thread in threads), "a sending thread hung"
    return outcomes


# -- the properties --------------------------------------------------------------------------


def blind_fault(event: str, visible: frozenset[str]) -> bool:
    """Whether a recorded fault is one no client can see before it reads a shifted reply
    (see the module docstring): a skipped command, a stray that came mid-exchange, or one
    glued to a reply the client reads more replies after."""
    return event in ("skip", "stray-mid", "stray-raced") or (
        event.startswith("stray-") and event not in visible
    )


def blinded(server: HostileServer, item: Item, visible: frozenset[str]) -> bool:
    """Whether the item was sent on a connection with a :func:`blind_fault`."""
    return any(
        any(t.sender == item.sender for t in connection.transactions)
        and any(blind_fault(event, visible) for event in connection.events)
        for connection in server.connections
    )


def kept(transaction: TransactionRecord) -> bool:
    """Whether the server took the transaction's whole data and did not refuse it: no
    final reply (it may have kept the message), or a 2xx (LMTP: any recipient's)."""
    if not transaction.complete:
        return False
    finals = [code for _, code in transaction.finals] or [transaction.final]
    return any(code is None or 200 <= code < 300 for code in finals)


def check_no_duplicate(server: HostileServer, item: Item) -> None:
    """Property 4 (a message refused after its data, 421 included, may go again)."""
    taken = [
        connection.index
        for connection in server.connections
        for transaction in connection.transactions
        if kept(transaction) and transaction.marker == item.index
    ]
    assert len(taken) <= 1, (
        f"message {item.index}: the server took its data on connections {taken}:\n"
        f"{describe(server)}"
    )


def check_no_reuse(server: HostileServer, visible: frozenset[str]) -> None:
    """Property 6, up to a connection's first :func:`blind_fault`: after one, the client
    reads every reply one command late and cannot know that a later stray is one (a
    greeting's late stray read as LHLO's answer makes LHLO's real answer MAIL's: MAIL is
    on its way before the stray glued to that answer arrives)."""
    for connection in server.connections:
        events = connection.events
        for at, event in enumerate(events):
            if blind_fault(event, visible):
                break
            if event in visible:
                later = [e for e in events[at + 1 :] if e in REUSE]
                assert not later, (
                    f"connection {connection.index} carried {later} after {event}:\n"
                    f"{describe(server)}"
                )


def check_item(
    server: HostileServer, client: Client, item: Item, outcome: Any, visible: frozenset[str]
) -> None:
    """Properties 2-5 for one message (``outcome``: its result or the error ``send``
    raised)."""
    check_no_duplicate(server, item)
    if isinstance(outcome, DeliveryError):
        return
    assert isinstance(outcome, DeliveryResult), outcome
    assert outcome.message_id == item.message.message_id
    assert [r.address for r in outcome.recipients] == [r.address for r in item.envelope.recipients]
    if blinded(server, item, visible):
        return
    for recipient in outcome.recipients:
        address = str(recipient.address)
        if recipient.outcome is Outcome.ACCEPTED:
            if client.lmtp:
                ok = any(
                    lmtp_accepts(t, item, address)
                    for c in server.connections
                    for t in c.transactions
                )
            else:
                ok = accepted_by_server(server, item, address)
            assert ok, (
                f"message {item.index}: {recipient} ACCEPTED, but the server never accepted "
                f"it:\n{describe(server)}"
            )
        elif recipient.outcome is Outcome.PERMANENT:
            if client.lmtp and recipient.reply is not None:
                ok = recipient.reply.code in lmtp_permanent_codes(server, item, address)
            else:
                ok = permanent_explained(server, item, recipient)
            assert ok, (
                f"message {item.index}: {recipient} PERMANENT, but the server never refused "
                f"it so:\n{describe(server)}"
            )
        elif not client.lmtp and surely_received(server, item, address):
            assert "DeliveryTimeout" in (recipient.reason or ""), (
                f"message {item.index}: the server accepted {address} and the reply reached "
                f"the client, yet it reports {recipient}:\n{describe(server)}"
            )


def send_against(
    flavour: Flavour, way: Way, plan: Plan, client: Client, batch: list[Item]
) -> tuple[HostileServer, list[Any]]:
    """Send ``batch`` ``way`` to a hostile server following ``plan`` over one connection at
    a time, check what the server saw, and return the stopped server (its records) and
    what each item got."""
    server = HostileServer(plan, lmtp=client.lmtp).start()
    try:
        outcome = call_bounded(server, lambda: send_all(flavour, way, client, server.port, batch))
        check_server_side(server, outcome, len(batch), 1)
    finally:
        server.stop()
    values = outcome.value
    assert isinstance(values, list)
    return server, values


def run(flavour: Flavour, way: Way, plan: Plan, client: Client, batch: list[Item]) -> None:
    server = HostileServer(plan, lmtp=client.lmtp).start()
    try:
        outcome = call_bounded(server, lambda: send_all(flavour, way, client, server.port, batch))
        if outcome.error is not None:
            raise AssertionError(f"raised {outcome.error!r}") from outcome.error
        check_server_side(server, outcome, len(batch), client.pool.size)
    finally:
        server.stop()
    outcomes = outcome.value
    assert isinstance(outcomes, list)
    assert len(outcomes) == len(batch)
    for value in outcomes:
        assert not isinstance(value, AssertionError), value
    if way != "many":
        visible = ALONE_RSET if client.lmtp else VISIBLE_SINGLE
    else:
        pipelined = client.pipelining and "PIPELINING" in plan.extensions
        visible = VISIBLE if pipelined else ALONE_RSET
    check_no_reuse(server, visible)
    for item, value in zip(batch, outcomes, strict=True):
        check_item(server, client, item, value, visible)


# -- the Hypothesis tests --------------------------------------------------------------------


@pytest.mark.parametrize("way", ["many", "threads", "waves"])
@pytest.mark.parametrize("flavour", ["sync", "async"])
@EXAMPLES
@given(plan=plans(), client=clients(lmtp=False), batch=items())
def test_smtp_pool_pairs_every_reply(
    flavour: Flavour, way: Way, plan: Plan, client: Client, batch: list[Item]
) -> None:
    """SMTP: ``send_many``/``asend_many``, and ``send``/``asend`` from threads/tasks."""
    run(flavour, way, plan, client, batch)


@pytest.mark.parametrize("way", ["many", "threads"])
@pytest.mark.parametrize("flavour", ["sync", "async"])
@EXAMPLES
@given(plan=plans(lmtp=True), client=clients(lmtp=True), batch=items())
def test_lmtp_pool_pairs_every_reply(
    flavour: Flavour, way: Way, plan: Plan, client: Client, batch: list[Item]
) -> None:
    """LMTP: the same, one final reply per recipient."""
    run(flavour, way, plan, client, batch)


# -- minimal examples of what the properties found -------------------------------------------

#: Replies and the message go out, the server takes the message and then ends the
#: connection before its final reply: with a reset, the replies it had written may be lost
#: with it; with skipped replies (a deterministic stand-in), they never existed.
LOST_REPLIES = {
    "reset": {Point.DATA_END: (NORMAL, Behaviour(kind=Kind.RESET))},
    "skipped": {
        Point.MAIL: (NORMAL, Behaviour(skip=True)),
        Point.RCPT: (NORMAL, Behaviour(skip=True)),
        Point.DATA_END: (NORMAL, Behaviour(kind=Kind.CLOSE)),
    },
}


def taken(server: HostileServer, index: int) -> int:
    """On how many connections the server took message ``index``'s whole data."""
    return sum(t.complete and t.marker == index for c in server.connections for t in c.transactions)


@pytest.mark.parametrize("flavour", ["sync", "async"])
@pytest.mark.parametrize("lost", sorted(LOST_REPLIES))
def test_a_pipelined_bdat_whose_mail_reply_was_lost_is_not_sent_again(
    flavour: Flavour, lost: str
) -> None:
    # With PIPELINING and CHUNKING a single send writes MAIL, RCPT and BDAT LAST at once.
    # The second message goes on the reused connection; the server takes it whole, and
    # the connection ends with MAIL's reply not read (lost with a reset, or never sent).
    # The pool looked only at the oldest unanswered command (MAIL), took the connection
    # for a stale one and sent the message again on a fresh one: delivered twice. Its
    # whole data went out, so it is TRANSIENT instead (RFC 1047).
    plan = Plan(behaviours=LOST_REPLIES[lost], extensions=("PIPELINING", "CHUNKING"))
    client = Client(
        lmtp=False,
        pipelining=True,
        chunking=True,
        pool=PoolSettings(size=1, health_check_after=86400.0),
    )
    batch = [make_item(n, ("a@example.com",), False, 0) for n in range(2)]
    server, values = send_against(flavour, "waves", plan, client, batch)
    first, second = values
    assert isinstance(first, DeliveryResult), first
    assert first.ok, first
    assert isinstance(second, DeliveryError), second
    assert second.is_transient
    assert [taken(server, n) for n in range(2)] == [1, 1], describe(server)


@pytest.mark.parametrize("flavour", ["sync", "async"])
@pytest.mark.parametrize("lost", sorted(LOST_REPLIES))
def test_every_whole_message_in_flight_is_answered_not_sent_again(
    flavour: Flavour, lost: str
) -> None:
    # A pipelined send_many with CHUNKING has several messages in flight (BDAT LAST needs
    # no 354). The server takes the first two whole and the connection ends with their
    # final replies (and the second one's MAIL and RCPT replies) not read. The pool kept
    # only the first from being sent again: the second went again on a fresh connection
    # and was delivered twice. Both are TRANSIENT now. The third's BDAT LAST went out too
    # (the client cannot tell that the server closed before reading it), so it is
    # TRANSIENT as well; delivered only if it is sent afresh, never twice.
    behaviours: dict[Point, tuple[Behaviour, ...]] = dict(LOST_REPLIES[lost])
    behaviours[Point.DATA_END] = (Behaviour(skip=True), *behaviours[Point.DATA_END][1:])
    if lost == "skipped":
        # The second message's group starts with RSET (a BDAT LAST refused may leave the
        # transaction open): its reply is lost with the others that the stand-in skips.
        behaviours[Point.RSET] = (Behaviour(skip=True),)
    plan = Plan(behaviours=behaviours, extensions=("PIPELINING", "CHUNKING"))
    client = Client(lmtp=False, pipelining=True, chunking=True, pool=PoolSettings(size=1))
    batch = [make_item(n, ("a@example.com",), False, 0) for n in range(3)]
    server, results = send_against(flavour, "many", plan, client, batch)
    assert [taken(server, n) for n in range(2)] == [1, 1], describe(server)
    assert taken(server, 2) <= 1, describe(server)
    for result in results[:2]:
        assert {r.outcome for r in result.recipients} == {Outcome.TRANSIENT}, results
    assert results[2].ok == bool(taken(server, 2)), results


@pytest.mark.parametrize("flavour", ["sync", "async"])
@pytest.mark.parametrize("lmtp", [False, True], ids=["smtp", "lmtp"])
def test_a_stray_with_the_354_to_a_refused_envelope_ends_the_session(
    flavour: Flavour, lmtp: bool
) -> None:
    # Pipelined: MAIL is refused but the RCPT accepted and DATA pipelined gets 354 with a
    # reply nobody asked for in the same packet. The client ended the empty message with a
    # lone "." anyway (it checked for such bytes only when someone was to get the message)
    # and read the stray as its answer, the server's own answer then waiting to be taken
    # for the next command's. The session ends at the 354 now; the refusal stands and the
    # next message goes on a fresh connection.
    plan = Plan(
        behaviours={
            Point.MAIL: (Behaviour(code=550),),
            Point.DATA: (Behaviour(strays=1),),
        },
        extensions=("PIPELINING",),
    )
    client = Client(
        lmtp=lmtp,
        pipelining=True,
        chunking=False,
        pool=PoolSettings(size=1, health_check_after=86400.0),
    )
    batch = [make_item(n, ("a@example.com",), False, 0) for n in range(2)]
    server, values = send_against(flavour, "waves", plan, client, batch)
    first, second = values
    assert isinstance(first, DeliveryResult), first
    assert [r.outcome for r in first.recipients] == [Outcome.PERMANENT], first
    assert isinstance(second, DeliveryResult), second
    assert second.ok, second
    assert "CONTENT" not in server.connections[0].events, describe(server)
    check_no_reuse(server, VISIBLE_SINGLE)


@pytest.mark.parametrize("flavour", ["sync", "async"])
@pytest.mark.parametrize("way", ["waves", "many"])
@pytest.mark.parametrize("lmtp", [False, True], ids=["smtp", "lmtp"])
def test_a_stray_with_the_rset_reply_ends_the_session(
    flavour: Flavour, way: Way, lmtp: bool
) -> None:
    # Without PIPELINING: the first message's RCPT is refused, so the reused connection
    # gets RSET before the second message, answered with a reply nobody asked for in the
    # same packet. The client sent MAIL, RCPT and DATA anyway, each reading the previous
    # command's reply, until DATA got a 250 (a protocol error). The session ends at the
    # RSET now, before a command of the second message goes out.
    plan = Plan(
        behaviours={
            Point.RCPT: (Behaviour(code=550),),
            Point.RSET: (Behaviour(strays=1),),
        },
    )
    client = Client(
        lmtp=lmtp,
        pipelining=True,
        chunking=False,
        pool=PoolSettings(size=1, health_check_after=86400.0),
    )
    batch = [make_item(n, ("a@example.com",), False, 0) for n in range(2)]
    server, values = send_against(flavour, way, plan, client, batch)
    first, second = values
    assert isinstance(first, DeliveryResult), first
    assert [r.outcome for r in first.recipients] == [Outcome.PERMANENT], first
    if isinstance(second, DeliveryResult):
        assert [r.outcome for r in second.recipients] == [Outcome.TRANSIENT], second
    else:
        assert isinstance(second, ServerProtocolError), second
    assert server.connections[0].events[-1] == "stray-rset", describe(server)
    check_no_reuse(server, ALONE_RSET)


def idle_stray_plan(code: int) -> Plan:
    """The first message's final reply is followed, a little later, by a stray ``code``."""
    return Plan(
        behaviours={Point.DATA_END: (Behaviour(strays=1, stray_code=code, stray_delay=LATE),)},
        extensions=("PIPELINING",),
    )


@pytest.mark.parametrize("flavour", ["sync", "async"])
@pytest.mark.parametrize("code", [250, 421])
def test_a_connection_a_stray_came_on_while_idle_is_not_reused(flavour: Flavour, code: int) -> None:
    # Property 6 made concrete: the second wave finds the connection the stray came on
    # (after the first message's final reply, while it waited in the pool) and opens
    # another; both messages are delivered once.
    client = Client(
        lmtp=False,
        pipelining=True,
        chunking=False,
        pool=PoolSettings(size=1, health_check_after=86400.0),
    )
    batch = [make_item(n, ("a@example.com",), False, 0) for n in range(2)]
    run(flavour, "waves", idle_stray_plan(code), client, batch)


def test_the_reuse_check_can_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    # With the pool's look at idle connections disabled, the connection the idle stray
    # came on is reused, and property 6 says so.
    monkeypatch.setattr(SyncDriver, "has_input", lambda self: False)
    client = Client(
        lmtp=False,
        pipelining=True,
        chunking=False,
        pool=PoolSettings(size=1, health_check_after=86400.0),
    )
    batch = [make_item(n, ("a@example.com",), False, 0) for n in range(2)]
    with pytest.raises(AssertionError, match=r"carried \['MAIL'.*after stray-idle"):
        run("sync", "waves", idle_stray_plan(250), client, batch)


@pytest.mark.parametrize("flavour", ["sync", "async"])
@pytest.mark.parametrize("lmtp", [False, True], ids=["smtp", "lmtp"])
def test_a_stray_with_the_greeting_ends_the_session(flavour: Flavour, lmtp: bool) -> None:
    # A reply nobody asked for in the same packet as the greeting. The client sent EHLO
    # (LHLO) anyway and took the stray for its answer (no extensions), the real answer was
    # then read as MAIL's, and so on until a reply made no sense. The session ends before
    # EHLO now (ServerProtocolError: a fresh connection is not tried again); the next
    # message opens another connection and is delivered.
    plan = Plan(behaviours={Point.GREETING: (Behaviour(strays=1),)}, extensions=("PIPELINING",))
    client = Client(
        lmtp=lmtp,
        pipelining=True,
        chunking=False,
        pool=PoolSettings(size=1, health_check_after=86400.0),
    )
    batch = [make_item(n, ("a@example.com",), False, 0) for n in range(2)]
    server, values = send_against(flavour, "waves", plan, client, batch)
    first, second = values
    assert isinstance(first, ServerProtocolError), first
    assert "after the greeting" in str(first)
    assert isinstance(second, DeliveryResult), second
    assert second.ok, second
    assert server.connections[0].events == ["stray-greeting"], describe(server)
