"""Review 76: recipients whose addresses alone need SMTPUTF8, refused on their own.

In a batch, such a message goes to its other recipients after the rest (``_send_apart``).
When that transaction ends after the whole message went out and before its final reply
(end of file, or a timeout the driver throws in), the server may have taken it (RFC 1047):
those recipients must not read as never offered (``unsent_positions``), which a pool sends
again on another connection (a second delivery)."""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

import pytest

from mailrelay.envelope import Envelope
from mailrelay.errors import ConnectionLost, DeliveryTimeout
from mailrelay.flow import Read, Step
from mailrelay.flow.bookkeeping import MAIL_MAX_REASON, unsent_positions
from mailrelay.options import TLS, Timeouts
from mailrelay.results import DeliveryResult, Outcome
from mailrelay.transport import AsyncSMTPTransport, PoolSettings, SMTPTransport
from mailrelay.transport.base import BatchItem
from tests.test_flow import GO_AHEAD, GREETING, OK, QUEUED, Driver, ehlo, lines, message, opened
from tests.test_flow_smtputf8_apart import NO_UTF8, mixed
from tests.transport.hostile_server import NORMAL, Behaviour, HostileServer, Kind, Plan, Point

T = TypeVar("T")

PLAIN = Envelope("alice@example.org", ["dan@example.net"])
# The plain message pipelined, then the mixed one's others alone: MAIL, 2 RCPT, DATA.
TURNS = [GREETING, NO_UTF8, OK, OK, GO_AHEAD, QUEUED, OK, OK, OK, GO_AHEAD]


class TimeoutAtLastRead(Driver):
    """Throws a timeout into the Read that would get the end of the script."""

    def run(self, step: Step[T]) -> T:
        value: bytes | None = None
        throw: Exception | None = None
        while True:
            try:
                request = step.throw(throw) if throw is not None else step.send(value)
            except StopIteration as done:
                result: T = done.value
                return result
            throw, value = None, None
            self.requests.append(request)
            if isinstance(request, Read):
                if self.pieces:
                    value = self.pieces.pop(0)
                else:
                    throw = DeliveryTimeout("no final reply", host="mx.example.net")


@pytest.mark.parametrize("ending", ["eof", "timeout"])
def test_a_lost_final_reply_is_not_never_sent(ending: str) -> None:
    session, driver = opened(TURNS)
    if ending == "timeout":
        driver = TimeoutAtLastRead(driver.pieces)
    outcome = driver.run(session.deliver_many([(message(), mixed()), (message(), PLAIN)]))
    assert isinstance(outcome.error, ConnectionLost | DeliveryTimeout)
    assert b".\r\n" in driver.sent.split(b"RCPT TO:<carol@example.net>")[1]  # all went out
    apart, last = outcome.results
    assert last is not None
    assert last.ok
    assert apart is not None
    assert [r.outcome for r in apart.recipients] == [
        Outcome.TRANSIENT,
        Outcome.PERMANENT,
        Outcome.TRANSIENT,
    ]
    # Maybe delivered: not for another connection to send again.
    assert unsent_positions(apart) == []
    assert session.left_unsent == 0
    assert apart.message_id == "m1@example.org"


def test_a_session_ended_before_the_data_still_leaves_them_unsent() -> None:
    # A 421 to that MAIL: the server never had the message; the others go elsewhere.
    turns = [GREETING, NO_UTF8, OK, OK, GO_AHEAD, QUEUED, lines(421, "4.3.2 bye")]
    session, driver = opened(turns)
    outcome = driver.run(session.deliver_many([(message(), mixed()), (message(), PLAIN)]))
    assert outcome.error is not None
    apart, _ = outcome.results
    assert apart is not None
    assert unsent_positions(apart) == [0, 2]
    assert session.left_unsent == 1


# -- through a pool: the server's view -------------------------------------------------------


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_pool_does_not_send_it_to_them_twice(flavour: str) -> None:
    # The server takes the apart transaction's whole data, then hangs up without its
    # final reply. bob and carol may have the message: no second transaction for them.
    plan = Plan(
        behaviours={Point.DATA_END: (NORMAL, Behaviour(kind=Kind.CLOSE))},
        extensions=("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"),
    )
    server = HostileServer(plan).start()
    try:
        items: list[BatchItem] = [(message(), mixed()), (message(), PLAIN)]
        settings: dict[str, Any] = {
            "host": server.host,
            "port": server.port,
            "tls": TLS.NONE,
            "timeouts": Timeouts.all(10),
            # One connection: the asyncio pool would spread the two over two at once.
            "pool": PoolSettings(size=1),
        }
        if flavour == "sync":
            with SMTPTransport(**settings) as transport:
                results = transport.send_many(items)
        else:

            async def main() -> list[DeliveryResult]:
                async with AsyncSMTPTransport(**settings) as transport:
                    return await transport.asend_many(items)

            results = asyncio.run(main())
        server.wait_idle()
    finally:
        server.stop()
    bob = [
        t
        for c in server.connections
        for t in c.transactions
        if any(r == "bob@example.net" for r, _ in t.recipients)
    ]
    assert len(bob) == 1
    assert bob[0].complete
    assert [r.outcome for r in results[0].recipients] == [
        Outcome.TRANSIENT,
        Outcome.PERMANENT,
        Outcome.TRANSIENT,
    ]
    assert results[1].ok


# -- LIMITS MAILMAX (RFC 9422) -----------------------------------------------------------------


def test_no_transaction_beyond_mailmax() -> None:
    # MAILMAX=2: the second message's recipient refused as one too many takes the second
    # transaction (_send_the_rest); the first message's others then wait for another
    # connection, unsent, instead of a third MAIL the server said it would not take.
    limited = ehlo("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "LIMITS MAILMAX=2")
    too_many = lines(452, "4.5.3 too many recipients")
    turns = [GREETING, limited, OK, OK, too_many, GO_AHEAD, QUEUED, OK, OK, GO_AHEAD, QUEUED]
    two = Envelope("alice@example.org", ["dan@example.net", "eve@example.net"])
    session, driver = opened(turns)
    outcome = driver.run(session.deliver_many([(message(), mixed()), (message(), two)]))
    assert outcome.error is None
    apart, last = outcome.results
    assert last is not None
    assert last.ok
    assert apart is not None
    assert [r.outcome for r in apart.recipients] == [
        Outcome.TRANSIENT,
        Outcome.PERMANENT,
        Outcome.TRANSIENT,
    ]
    assert unsent_positions(apart) == [0, 2]
    assert apart.recipients[0].reason == MAIL_MAX_REASON
    assert session.left_unsent == 1
    assert session.transactions == 2
    assert driver.sent.count(b"MAIL FROM:") == 2
    assert not session.closed
