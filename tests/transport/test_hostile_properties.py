"""Properties: no server, however broken, can make the SMTP transports hang, lose a message
silently, or report a message delivered that the server never accepted.

Hypothesis draws a :class:`~tests.transport.hostile_server.Plan` (per command: a normal
reply, any code, multi-line, a short delay, a malformed reply, garbage, a reply without its
line end, silence past the timeout, a hang-up, a reset, an endless line or multi-line reply;
and the extensions offered) and a batch of messages, and drives ``SMTPTransport.send`` /
``send_many`` and ``AsyncSMTPTransport.asend`` / ``asend_many`` against a
:class:`~tests.transport.hostile_server.HostileServer` on 127.0.0.1. For every plan:

1. The call ends within a bound derived from the timeouts and what the server saw
   (connections and commands: each can make the client wait at most one phase limit);
   a call that runs past :data:`HANG_LIMIT` fails as a hang. This is a hang detector, not a
   speed test: the bound is generous.
2. ``send`` / ``asend`` raise nothing but :class:`~mailrelay.errors.DeliveryError`
   subclasses (docs/transports.md: "A transport raises only ``DeliveryError`` subclasses");
   ``send_many`` / ``asend_many`` raise nothing at all (a ``DeliveryError`` becomes that
   item's result; only a bad item, a bug or a cancellation may stop a batch).
3. A batch gets exactly one result per message, in order, each with one recipient result
   per envelope recipient, in envelope order (docs/transports.md, "send_many never loses a
   message").
4. No false delivery: a recipient reported ``ACCEPTED`` was answered 2xx to its RCPT in a
   transaction of that message whose data the server took and answered 2xx. No false
   bounce: a recipient reported ``PERMANENT`` carries a 5xx the server really gave that
   message or recipient (or the session: greeting, EHLO, HELO), or a refusal before sending
   that the extensions offered explain (SIZE, 8BITMIME, SMTPUTF8); so a message whose data
   got a 2xx is never reported as a permanent failure unless the server also refused it.
5. Bounded memory: an endless reply line or multi-line reply is cut by the client (it hangs
   up) long before the server's cap on what it sends.
6. A final reply the client received is never lost: when the server answered a message's
   data 2xx on a connection it did not then reset, the client reports the message ACCEPTED
   for each recipient whose RCPT got 2xx (the only excuse is a timeout: the reply may have
   come just after the client stopped waiting). Otherwise a retry would deliver it twice.
7. A refused recipient is a result, never an exception (docs/transports.md): when the
   server answered a message (refused MAIL, an RCPT or DATA, or gave a final reply) on a
   connection it did not then reset, ``send`` returns a result (again, a timeout excuses).

Plus: once the transport is closed, every connection the server accepted has ended (no
socket outlives the transport), and no plan makes the client open more than two
connections per message (plus one per pool slot).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any, Literal, Protocol

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailrelay.envelope import Envelope
from mailrelay.errors import DeliveryError, DeliveryTimeout, ServerProtocolError
from mailrelay.message import Message
from mailrelay.options import TLS, Timeouts
from mailrelay.results import DeliveryResult, Outcome, RecipientResult
from mailrelay.transport import AsyncSMTPTransport, PoolSettings, SMTPTransport
from tests.transport.hostile_server import (
    MALFORMED_REPLIES,
    NORMAL,
    Behaviour,
    ConnectionRecord,
    Ending,
    HostileServer,
    Kind,
    Plan,
    Point,
    TransactionRecord,
)

#: Every phase's limit: short, so that a plan with silence costs little.
TIMEOUT = 0.3
TIMEOUTS = Timeouts.all(TIMEOUT)
#: A delay well within :data:`TIMEOUT` ("silence shorter than the timeout").
SHORT = 0.03
#: Seconds of CPU and scheduling a call may add to its waits on a busy machine.
SLACK = 5.0
#: A call still running after this long has hung (the bound of property 1 is far below).
HANG_LIMIT = 60.0

RECIPIENTS = ("bob@example.com", "carol@example.org", "dave@example.net", "jörg@example.com")

EXAMPLES = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
#: Batches have more ways to go wrong (pipelining across messages, resends, pools).
BATCH_EXAMPLES = settings(EXAMPLES, max_examples=50)


# -- what is sent ----------------------------------------------------------------------------


@attrs.frozen(kw_only=True, repr=False)
class Item:
    """One message of a batch, numbered: its sender and ``MARK-n`` subject name it on the
    server's side."""

    index: int
    message: Message
    envelope: Envelope

    @property
    def sender(self) -> str:
        return sender_of(self.index)

    def __repr__(self) -> str:
        # Short: Hypothesis prints (and warns about the size of) the examples it draws, and
        # a message's repr holds its wire bytes.
        recipients = [str(r.address) for r in self.envelope.recipients]
        return (
            f"Item(index={self.index}, size={self.message.size}, "
            f"needs_8bitmime={self.message.needs_8bitmime}, recipients={recipients})"
        )

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        # Hypothesis's printer would list an attrs instance's fields instead of its repr.
        printer.text(repr(self))


def sender_of(index: int) -> str:
    return f"sender{index}@example.com"


#: Padding that makes a message span several BDAT chunks (65536 octets each) when sent alone.
BIG = 150_000


def make_item(index: int, recipients: tuple[str, ...], eight_bit: bool, padding: int) -> Item:
    """Message ``index``: 8-bit text or ASCII, about ``padding`` more octets (for SIZE, and
    for BDAT chunks), in lines of 78 octets."""
    body = ("h\u00e9llo " if eight_bit else "hello ") + ("x" * 76 + "\r\n") * (padding // 78)
    raw = (
        f"From: {sender_of(index)}\r\n"
        f"Subject: MARK-{index}\r\n"
        f"Message-ID: <mark-{index}@example.com>\r\n"
        f"\r\n{body}\r\n"
    ).encode()
    return Item(
        index=index,
        message=Message.from_bytes(raw),
        envelope=Envelope(sender_of(index), list(recipients)),
    )


def one_in(chance: int) -> st.SearchStrategy[bool]:
    """True about once in ``chance`` draws (shrinking towards False)."""
    return st.integers(0, chance - 1).map(lambda roll: roll == chance - 1)


@st.composite
def batches(draw: st.DrawFn, min_size: int, max_size: int) -> list[Item]:
    """``min_size``..``max_size`` messages, each to 1..4 distinct recipients (one may need
    SMTPUTF8)."""
    count = draw(st.integers(min_size, max_size))
    items = []
    for index in range(count):
        recipients = draw(
            st.lists(st.sampled_from(RECIPIENTS[:3]), min_size=1, max_size=3, unique=True)
        )
        if draw(one_in(4)):
            recipients.append(RECIPIENTS[3])  # needs SMTPUTF8
        eight_bit = draw(one_in(3))
        padding = BIG if draw(one_in(6)) else draw(st.sampled_from([0, 234]))
        items.append(make_item(index, tuple(recipients), eight_bit, padding))
    return items


# -- how the server misbehaves ---------------------------------------------------------------

CODES = (220, 221, 250, 251, 354, 421, 450, 451, 452, 500, 501, 502, 503, 550, 552, 554)

# Hypothesis favours the first branches and simplest values of its strategies, so the mix of
# behaviours is drawn as explicit rolls of a die: otherwise most plans would kill every
# session at once and rarely reach the questions of property 4.


@st.composite
def faults(draw: st.DrawFn) -> Behaviour:
    """A broken answer: malformed, garbage, unfinished, silent, hung up, reset, endless."""
    kind = draw(st.sampled_from(Kind))
    ending = draw(st.sampled_from(Ending))
    if kind is Kind.REPLY:
        return Behaviour(kind=Kind.NO_CRLF, code=draw(st.sampled_from(CODES)), ending=ending)
    if kind is Kind.MALFORMED:
        return Behaviour(kind=kind, payload=draw(st.sampled_from(MALFORMED_REPLIES)), ending=ending)
    if kind is Kind.GARBAGE:
        # A letter first: never a reply line, whatever follows.
        payload = b"X" + draw(st.binary(max_size=40))
        return Behaviour(kind=kind, payload=payload, ending=ending)
    if kind is Kind.NO_CRLF:
        return Behaviour(kind=kind, ending=ending)
    return Behaviour(kind=kind)


@st.composite
def behaviours(draw: st.DrawFn) -> Behaviour:
    """Normal (4 in 10), a well-formed reply with any code (3 in 10, some late), or a
    fault (3 in 10)."""
    roll = draw(st.integers(0, 9))
    if roll < 4:
        return NORMAL
    if roll < 7:
        return Behaviour(
            code=draw(st.sampled_from(CODES)),
            multiline=draw(one_in(3)),
            delay=SHORT if draw(one_in(4)) else 0.0,
        )
    return draw(faults())


#: Where a mail transaction is answered: misbehaviour here meets the most bookkeeping.
TRANSACTION_POINTS = frozenset({Point.MAIL, Point.RCPT, Point.DATA, Point.DATA_END, Point.BDAT})


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    """Each point of a transaction misbehaves with a chance of one in three, each other
    point (greeting, EHLO, HELO, RSET, NOOP, QUIT) one in six, in some of its first 1-4
    occurrences (a batch's later messages meet the later ones). PIPELINING is offered with
    a chance of seven in eight (it is what batches are made of), each other extension
    three in four."""
    planned = {}
    for point in Point:
        if draw(one_in(3 if point in TRANSACTION_POINTS else 6)):
            planned[point] = tuple(draw(st.lists(behaviours(), min_size=1, max_size=4)))
    offered = [
        keyword
        for keyword, chance in (
            ("PIPELINING", 8),
            ("CHUNKING", 4),
            ("8BITMIME", 4),
            ("SMTPUTF8", 4),
        )
        if not draw(one_in(chance))
    ]
    size = draw(st.sampled_from([None, 10_000_000, 300]))
    if size is not None:
        offered.append(f"SIZE {size}")
    return Plan(behaviours=planned, extensions=tuple(offered))


Flavour = Literal["sync", "async"]


@attrs.frozen(kw_only=True)
class Client:
    """The transport's settings for one example."""

    pipelining: bool
    chunking: bool
    pool: PoolSettings

    def transport(self, flavour: Flavour, port: int) -> Any:
        """A new ``SMTPTransport`` (sync) or ``AsyncSMTPTransport`` with these settings."""
        cls = SMTPTransport if flavour == "sync" else AsyncSMTPTransport
        return cls(
            "127.0.0.1",
            port,
            tls=TLS.NONE,
            timeouts=TIMEOUTS,
            pipelining=self.pipelining,
            chunking=self.chunking,
            pool=self.pool,
        )


clients = st.builds(
    Client,
    pipelining=one_in(4).map(lambda off: not off),
    chunking=st.booleans(),
    pool=st.builds(
        PoolSettings,
        size=st.integers(1, 3),
        max_messages=st.integers(1, 4),
        # Tiny: every reused connection is checked with NOOP first; a day: never.
        health_check_after=st.sampled_from([1e-9, 86400.0]),
    ),
)


# -- running a call under the hang detector --------------------------------------------------


@attrs.define
class CallRecord:
    """What a call did: its value or exception, and how long it took."""

    value: Any = None
    error: BaseException | None = None
    elapsed: float = 0.0


def call_bounded(server: HostileServer, call: Callable[[], Any]) -> CallRecord:
    """Run ``call`` in a thread; fail as a hang if it runs past :data:`HANG_LIMIT` (the
    server is then stopped, which shuts its sockets and so wakes the client)."""
    outcome = CallRecord()

    def target() -> None:
        start = time.monotonic()
        try:
            outcome.value = call()
        except BaseException as exc:  # judged by the caller, in the test's thread
            outcome.error = exc
        finally:
            outcome.elapsed = time.monotonic() - start

    thread = threading.Thread(target=target, name="hostile-client")
    thread.start()
    thread.join(HANG_LIMIT)
    if thread.is_alive():
        server.stop()
        thread.join(30.0)
        raise AssertionError(f"the client hung: still running after {HANG_LIMIT}s")
    return outcome


class MakesTransports(Protocol):
    """A client's settings: makes the transport of a flavour (SMTP here, LMTP elsewhere)."""

    def transport(self, flavour: Flavour, port: int) -> Any: ...


def send_each(flavour: Flavour, client: MakesTransports, port: int, items: list[Item]) -> list[Any]:
    """``send`` / ``asend`` each item in turn on one transport: per item, its result or the
    ``DeliveryError`` it raised (anything else propagates)."""
    outcomes: list[Any] = []
    if flavour == "sync":
        with client.transport(flavour, port) as transport:
            for item in items:
                try:
                    outcomes.append(transport.send(item.message, item.envelope))
                except DeliveryError as exc:
                    outcomes.append(exc)
        return outcomes

    async def main() -> None:
        async with client.transport(flavour, port) as transport:
            for item in items:
                try:
                    outcomes.append(await transport.asend(item.message, item.envelope))
                except DeliveryError as exc:
                    outcomes.append(exc)

    asyncio.run(main())
    return outcomes


def send_batch(flavour: Flavour, client: MakesTransports, port: int, items: list[Item]) -> Any:
    """``send_many`` / ``asend_many`` of the items' pairs on a fresh transport."""
    pairs = [(item.message, item.envelope) for item in items]
    if flavour == "sync":
        with client.transport(flavour, port) as transport:
            return transport.send_many(pairs)

    async def main() -> list[DeliveryResult]:
        async with client.transport(flavour, port) as transport:
            return list(await transport.asend_many(pairs))

    return asyncio.run(main())


# -- the properties --------------------------------------------------------------------------


def _positive(code: int | None) -> bool:
    return code is not None and 200 <= code < 300


def accepts(transaction: TransactionRecord, item: Item, address: str) -> bool:
    """Whether ``transaction`` is one of ``item``'s, took its data, and answered 2xx to MAIL,
    to the recipient's RCPT, to every BDAT chunk and to the data."""
    return (
        transaction.sender == item.sender
        and transaction.marker == item.index
        and _positive(transaction.mail)
        and any(a == address and _positive(c) for a, c in transaction.recipients)
        and all(_positive(code) for code in transaction.chunks)
        and _positive(transaction.final)
    )


def accepted_by_server(server: HostileServer, item: Item, address: str) -> bool:
    """Whether some transaction accepted ``item`` for the recipient (property 4)."""
    return any(
        accepts(transaction, item, address)
        for connection in server.connections
        for transaction in connection.transactions
    )


def surely_received(server: HostileServer, item: Item, address: str) -> bool:
    """Whether a transaction accepted ``item`` for the recipient on a connection the plan
    did not then reset: the client's kernel has the reply, so the client can have missed
    it only by giving up waiting first (property 6). (A RST can make the kernel drop
    replies the client had not read yet.)"""
    return any(
        accepts(transaction, item, address)
        for connection in server.connections
        if not connection.reset
        for transaction in connection.transactions
    )


def check_answers_kept(server: HostileServer, item: Item, result: object) -> None:
    """Property 6: a final 2xx the client received is never lost. The message is reported
    ACCEPTED for that recipient; the only excuse is a timeout (the reply may have come
    just after the client stopped waiting for it)."""
    for recipient in item.envelope.recipients:
        address = str(recipient.address)
        if not surely_received(server, item, address):
            continue
        if isinstance(result, DeliveryError):
            assert isinstance(result, DeliveryTimeout), (
                f"message {item.index}: the server accepted {address}, yet send raised "
                f"{result!r}:\n{describe(server)}"
            )
            continue
        assert isinstance(result, DeliveryResult)
        (reported,) = (r for r in result.recipients if r.address == recipient.address)
        assert reported.outcome is Outcome.ACCEPTED or (
            reported.outcome is Outcome.TRANSIENT and "DeliveryTimeout" in (reported.reason or "")
        ), (
            f"message {item.index}: the server accepted {address} and the reply reached the "
            f"client, yet it reports {reported}:\n{describe(server)}"
        )


def answered_on(transaction: TransactionRecord) -> bool:
    """Whether the server gave this transaction an answer per recipient that the client
    keeps as a result: a refusal of MAIL, an RCPT or DATA (anything but 421, which ends the
    session), a final reply, or a refused BDAT chunk."""

    def refusal(code: int | None) -> bool:
        return code is not None and code != 421 and not _positive(code)

    return (
        refusal(transaction.mail)
        or any(refusal(code) for _, code in transaction.recipients)
        or (transaction.data is not None and transaction.data not in (354, 421))
        or any(refusal(code) for code in transaction.chunks)
        or (transaction.final is not None and transaction.final != 421)
    )


def check_refusals_are_results(server: HostileServer, item: Item, result: object) -> None:
    """Property 7, for ``send``: a refused recipient is a result, never an exception. When
    the server answered the message (:func:`answered_on`) on a connection it did not then
    reset, ``send`` returns a result; the only excuse is a timeout (the answer may have come
    just after the client stopped waiting)."""
    if not isinstance(result, DeliveryError) or isinstance(result, DeliveryTimeout):
        return
    for connection in server.connections:
        if connection.reset:
            continue  # a RST can make the kernel drop replies the client had not read yet
        for transaction in connection.transactions:
            assert not (transaction.sender == item.sender and answered_on(transaction)), (
                f"message {item.index}: the server answered it ({transaction}), yet send "
                f"raised {result!r}:\n{describe(server)}"
            )


def refused_before_sending(offered: tuple[str, ...], item: Item) -> bool:
    """Whether a server offering ``offered`` cannot take the message at all."""
    message, envelope = item.message, item.envelope
    for keyword in offered:
        if keyword.startswith("SIZE ") and message.size > int(keyword.split()[1]):
            return True  # RFC 1870 §6
    if (message.needs_smtputf8 or envelope.needs_smtputf8) and "SMTPUTF8" not in offered:
        return True  # RFC 6531 §3.4
    return message.needs_8bitmime and "8BITMIME" not in offered  # RFC 6152 §3


def permanent_explained(server: HostileServer, item: Item, result: RecipientResult) -> bool:
    """Whether the server's own answers explain a PERMANENT outcome (property 4)."""
    address = str(result.address)
    if result.reply is None:
        return any(
            refused_before_sending(offered, item)
            for connection in server.connections
            for offered in connection.offered
        )
    code = result.reply.code
    if not 500 <= code < 600:
        return False
    for connection in server.connections:
        if any(given == code for _, given in connection.session_codes):
            return True
        for transaction in connection.transactions:
            if transaction.sender != item.sender:
                continue
            if code in (transaction.mail, transaction.data, transaction.final, *transaction.chunks):
                return True
            if (address, code) in transaction.recipients:
                return True
    return False


def describe(server: HostileServer) -> str:
    return "\n".join(repr(connection) for connection in server.connections)


def check_result(server: HostileServer, item: Item, result: object) -> None:
    """Properties 3 and 4 for one message's result."""
    assert isinstance(result, DeliveryResult), result
    assert result.message_id == item.message.message_id, (result, item.index)
    assert [r.address for r in result.recipients] == [r.address for r in item.envelope.recipients]
    for recipient in result.recipients:
        assert isinstance(recipient.outcome, Outcome)
        if recipient.outcome is Outcome.ACCEPTED:
            assert accepted_by_server(server, item, str(recipient.address)), (
                f"message {item.index}: {recipient} reported ACCEPTED, but the server never "
                f"accepted it:\n{describe(server)}"
            )
        elif recipient.outcome is Outcome.PERMANENT:
            assert permanent_explained(server, item, recipient), (
                f"message {item.index}: {recipient} reported PERMANENT, but the server never "
                f"refused it so:\n{describe(server)}"
            )


def check_server_side(
    server: HostileServer, outcome: CallRecord, messages: int, slots: int
) -> None:
    """Properties 1 and 5, and every connection ended with the transport."""
    # The transport is closed: every connection it opened must end (the server notices).
    server.wait_idle(timeout=10.0)
    connections: list[ConnectionRecord] = list(server.connections)
    commands = sum(connection.commands for connection in connections)
    # Each connection can make the client wait for its connect, greeting and QUIT; each
    # command the server read, for its reply and for its write.
    bound = TIMEOUT * (3 * len(connections) + 2 * commands + 4) + SLACK
    assert outcome.elapsed <= bound, (
        f"the call took {outcome.elapsed:.2f}s, more than {bound:.2f}s for "
        f"{len(connections)} connection(s) and {commands} command(s):\n{describe(server)}"
    )
    assert len(connections) <= 2 * messages + slots + 1, describe(server)
    for connection in connections:
        if "endless" in connection.ended:
            assert connection.endless_cut, connection
    assert not server.errors, server.errors


def run_against(
    plan: Plan,
    client: Client,
    items: list[Item],
    send: Callable[[int], Any],
    refusal: str,
) -> tuple[HostileServer, Any]:
    """Run ``send(port)`` against a hostile server playing ``plan``, under the hang bound,
    check the server's side, and return the server and what ``send`` returned.
    ``refusal`` says why raising at all is wrong for this call."""
    server = HostileServer(plan).start()
    try:
        outcome = call_bounded(server, lambda: send(server.port))
        if outcome.error is not None:
            raise AssertionError(f"raised {outcome.error!r}: {refusal}") from outcome.error
        check_server_side(server, outcome, len(items), client.pool.size)
    finally:
        server.stop()
    return server, outcome.value


def check_each(
    flavour: Flavour, plan: Plan, client: Client, items: list[Item]
) -> tuple[HostileServer, list[Any]]:
    server, outcomes = run_against(
        plan,
        client,
        items,
        lambda port: send_each(flavour, client, port, items),
        "send may raise only a DeliveryError",
    )
    assert len(outcomes) == len(items)
    for item, result in zip(items, outcomes, strict=True):
        check_answers_kept(server, item, result)
        check_refusals_are_results(server, item, result)
        if isinstance(result, DeliveryError):
            continue  # property 2: only DeliveryError escapes send (checked in send_each)
        check_result(server, item, result)
    return server, outcomes


def check_batch(flavour: Flavour, plan: Plan, client: Client, items: list[Item]) -> None:
    server, results = run_against(
        plan,
        client,
        items,
        lambda port: send_batch(flavour, client, port, items),
        "a batch of good items must not raise",
    )
    assert isinstance(results, list)
    assert len(results) == len(items), (len(results), len(items), describe(server))
    for item, result in zip(items, results, strict=True):
        check_result(server, item, result)
        check_answers_kept(server, item, result)


# -- the Hypothesis tests --------------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["sync", "async"])
@EXAMPLES
@given(plan=plans(), client=clients, items=batches(min_size=1, max_size=3))
def test_send_never_hangs_loses_or_lies(
    flavour: Flavour, plan: Plan, client: Client, items: list[Item]
) -> None:
    """``send`` (sync) and ``asend`` (async), one message at a time."""
    check_each(flavour, plan, client, items)


@pytest.mark.parametrize("flavour", ["sync", "async"])
@BATCH_EXAMPLES
@given(plan=plans(), client=clients, items=batches(min_size=2, max_size=4))
def test_send_many_never_hangs_loses_or_lies(
    flavour: Flavour, plan: Plan, client: Client, items: list[Item]
) -> None:
    """``send_many`` (sync) and ``asend_many`` (async)."""
    check_batch(flavour, plan, client, items)


# -- examples: the server and the checks themselves ------------------------------------------


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_well_behaved_plan_delivers_everything(flavour: Flavour) -> None:
    # The checks can pass: a normal server accepts every message, and the records say so.
    items = [make_item(n, RECIPIENTS[:2], False, 0) for n in range(3)]
    client = Client(pipelining=True, chunking=False, pool=PoolSettings(size=1))
    plan = Plan(extensions=("PIPELINING", "8BITMIME"))
    server = HostileServer(plan).start()
    try:
        outcome = call_bounded(server, lambda: send_batch(flavour, client, server.port, items))
        check_server_side(server, outcome, len(items), 1)
    finally:
        server.stop()
    assert [result.ok for result in outcome.value] == [True, True, True]
    for item, result in zip(items, outcome.value, strict=True):
        check_result(server, item, result)


def test_the_false_delivery_check_can_fail() -> None:
    # A result claiming ACCEPTED for a message the server refused must fail check_result.
    item = make_item(0, ("bob@example.com",), False, 0)
    plan = Plan(behaviours={Point.DATA_END: (Behaviour(code=554),)})
    server, outcomes = check_each(
        "sync", plan, Client(pipelining=False, chunking=False, pool=PoolSettings()), [item]
    )
    (result,) = outcomes
    assert isinstance(result, DeliveryResult)
    assert [r.outcome for r in result.recipients] == [Outcome.PERMANENT]
    forged = attrs.evolve(
        result,
        recipients=tuple(attrs.evolve(r, outcome=Outcome.ACCEPTED) for r in result.recipients),
    )
    with pytest.raises(AssertionError, match="never accepted"):
        check_result(server, item, forged)


@pytest.mark.parametrize("flavour", ["sync", "async"])
@pytest.mark.parametrize("kind", [Kind.ENDLESS_LINE, Kind.ENDLESS_REPLY])
@pytest.mark.parametrize("point", [Point.GREETING, Point.RCPT, Point.DATA_END])
def test_an_endless_reply_is_cut(flavour: Flavour, kind: Kind, point: Point) -> None:
    # Property 5 made concrete: the client gives up with a protocol error after at most a
    # reply's worth of octets, long before the server's cap.
    item = make_item(0, ("bob@example.com",), False, 0)
    plan = Plan(behaviours={point: (Behaviour(kind=kind),)})
    client = Client(pipelining=False, chunking=False, pool=PoolSettings())
    server = HostileServer(plan, endless_limit=64 * 1024 * 1024).start()
    try:
        outcome = call_bounded(server, lambda: send_each(flavour, client, server.port, [item]))
        check_server_side(server, outcome, 1, 1)
    finally:
        server.stop()
    (error,) = outcome.value
    assert isinstance(error, ServerProtocolError), error
    assert "longer than" in str(error)
    (connection,) = server.connections
    assert connection.endless_cut
    assert connection.endless_bytes < 32 * 1024 * 1024


# -- minimal examples of what the properties found -------------------------------------------


@pytest.mark.parametrize("flavour", ["sync", "async"])
@pytest.mark.parametrize(
    "fault",
    [
        Behaviour(kind=Kind.MALFORMED, payload=MALFORMED_REPLIES[0], ending=Ending.CLOSE),
        Behaviour(kind=Kind.SILENT),
    ],
    ids=["malformed", "silent"],
)
def test_a_final_reply_read_with_the_next_envelope_is_kept(
    flavour: Flavour, fault: Behaviour
) -> None:
    # Pipelined send_many reads message 0's final reply together with the replies to
    # message 1's MAIL, RCPT and DATA. The server accepts message 0 (the client receives
    # the 250) and then breaks on message 1's MAIL: message 0 must still be ACCEPTED (it
    # was reported TRANSIENT, so that a retry would deliver it twice), and message 1 is sent
    # again on a fresh connection or reported as failed.
    items = [make_item(n, ("bob@example.com",), False, 0) for n in range(2)]
    plan = Plan(behaviours={Point.MAIL: (NORMAL, fault)}, extensions=("PIPELINING",))
    client = Client(pipelining=True, chunking=False, pool=PoolSettings(size=1))
    server = HostileServer(plan).start()
    try:
        outcome = call_bounded(server, lambda: send_batch(flavour, client, server.port, items))
        check_server_side(server, outcome, len(items), 1)
    finally:
        server.stop()
    first, _second = outcome.value
    assert [r.outcome for r in first.recipients] == [Outcome.ACCEPTED], first
    assert first.recipients[0].reply is not None
    assert first.recipients[0].reply.code == 250
    assert server.connections[0].transactions[0].final == 250
    for item, result in zip(items, outcome.value, strict=True):
        check_result(server, item, result)
        check_answers_kept(server, item, result)
