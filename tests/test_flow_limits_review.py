"""Review of recipient limits in the dialogue: edge cases probed with :class:`LimitServer`
and a driver that throws its errors in (a timeout, a reset) at a chosen read.

Each test states a behaviour that must hold: the ones that failed on the code as first
written are regression tests for the fix that followed them.
"""

from __future__ import annotations

from typing import TypeVar

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mailrelay.envelope import Envelope
from mailrelay.errors import DeliveryTimeout, SessionRefused
from mailrelay.flow import Close, Read, Step, Write
from mailrelay.results import Outcome
from tests.test_flow_limits import LimitServer, delivered_to, message, recipients, session_for

T = TypeVar("T")

MAX_REQUESTS = 20_000


def run_throwing(server: LimitServer, step: Step[T], *, at_read: int) -> tuple[T, list[object]]:
    """Run ``step`` against ``server``, throwing a timeout in at its ``at_read``-th read
    (0-based) instead of answering it; also returns the requests it made after that."""
    value: bytes | None = None
    throw: Exception | None = None
    reads = 0
    after: list[object] = []
    thrown = False
    for _ in range(MAX_REQUESTS):
        try:
            request = step.throw(throw) if throw is not None else step.send(value)
        except StopIteration as done:
            result: T = done.value
            return result, after
        throw, value = None, None
        if thrown:
            after.append(request)
        if isinstance(request, Write):
            server.feed(request.data)
        elif isinstance(request, Read):
            if reads == at_read:
                throw = DeliveryTimeout("read timed out", host="test.example")
                thrown = True
            else:
                value = server.take()
            reads += 1
    raise AssertionError("the step never finished")


def limited(limit: int, *extra: str) -> LimitServer:
    return LimitServer(limit=limit, keywords=["PIPELINING", f"LIMITS RCPTMAX={limit}", *extra])


def test_a_timeout_in_a_later_part_ends_the_session() -> None:
    # Part 1 (r0) is delivered: two reads (envelope replies, final reply). The timeout at
    # part 2's envelope replies leaves the connection out of step: r0 keeps its answer,
    # r1 is TRANSIENT, and the session must be closed (Close yielded), never reused.
    server = limited(1)
    session = session_for(server)
    addresses = recipients(2)
    step = session.deliver(message(), Envelope("a@example.org", addresses))
    result, after = run_throwing(server, step, at_read=2)
    assert [r.outcome for r in result.recipients] == [Outcome.ACCEPTED, Outcome.TRANSIENT]
    assert "DeliveryTimeout" in (result.recipients[1].reason or "")
    assert delivered_to(server) == addresses[:1]
    assert session.closed
    assert any(isinstance(r, Close) for r in after)


def test_a_timeout_in_a_batch_message_sent_in_parts_ends_the_session() -> None:
    # A batch whose only message needs parts: the timeout on its first part (no answer
    # yet) hands it back with the error, and the session is closed.
    server = limited(1)
    session = session_for(server)
    items = [(message(), Envelope("a@example.org", recipients(2)))]
    outcome, after = run_throwing(server, session.deliver_many(items), at_read=0)
    assert outcome.results == (None,)
    assert isinstance(outcome.error, DeliveryTimeout)
    assert session.closed
    assert any(isinstance(r, Close) for r in after)


@pytest.mark.parametrize("announced", [True, False])
def test_a_batch_whose_last_message_is_cut_between_parts_records_the_error(
    announced: bool,
) -> None:
    # The split message comes last; the server hangs up (421) after its first part. The
    # batch did not finish: the outcome must say why (the 421), as any early end does.
    keywords = ["PIPELINING"] + (["LIMITS RCPTMAX=2"] if announced else [])
    server = LimitServer(limit=2, keywords=keywords, close_after=3)
    session = session_for(server)
    items = [
        (message(n), Envelope("a@example.org", [f"m{n}.{i}@x.example" for i in range(k)]))
        for n, k in enumerate([1, 1, 5])
    ]
    outcome = server.run(session.deliver_many(items))
    last = outcome.results[2]
    assert last is not None
    assert [r.outcome for r in last.recipients] == [Outcome.ACCEPTED] * 2 + [Outcome.TRANSIENT] * 3
    assert session.closed
    assert isinstance(outcome.error, SessionRefused)
    assert outcome.error.reply is not None
    assert outcome.error.reply.code == 421


def test_a_batch_cut_in_a_split_message_reports_the_421_not_a_closed_session() -> None:
    # The split message is followed by another: that one is handed back, and the error is
    # the server's 421, not "the session is closed" (which a pool would take for a stale
    # connection).
    server = limited(2)
    server.close_after = 3
    session = session_for(server)
    items = [
        (message(n), Envelope("a@example.org", [f"m{n}.{i}@x.example" for i in range(k)]))
        for n, k in enumerate([1, 1, 5, 3])
    ]
    outcome = server.run(session.deliver_many(items))
    assert outcome.results[3] is None
    assert isinstance(outcome.error, SessionRefused)


@pytest.mark.parametrize("close_after", [1, 2, 3, 4, 5])
def test_a_batch_with_limits_keeps_its_order_so_no_message_is_sent_twice(
    close_after: int,
) -> None:
    # A pool hands back the messages from the first one without a result and sends them
    # again on a fresh connection (replies come in order, so later ones were not sent).
    # Messages that need parts must therefore not be put after later messages: a hang-up
    # in their parts would leave a delivered later message behind a None.
    server = limited(2)
    server.close_after = close_after
    session = session_for(server)
    items = [
        (message(n), Envelope("a@example.org", [f"m{n}.{i}@x.example" for i in range(k)]))
        for n, k in enumerate([5, 1, 3, 2])
    ]
    outcome = server.run(session.deliver_many(items))
    results = list(outcome.results)
    first_none = results.index(None) if None in results else len(results)
    assert all(result is None for result in results[first_none:]), results
    # Every message the server took has a result: none would be sent twice.
    taken = {rcpts[0].split(".")[0] for _, rcpts, _ in server.delivered}
    answered = {f"m{n}" for n, result in enumerate(results) if result is not None}
    assert taken <= answered
    assert outcome.error is not None


class FaultyServer(LimitServer):
    """A LimitServer that answers ``verb`` of its ``at``-th transaction with ``answer``
    (and hangs up after a 421 or an empty answer: the end of the connection)."""

    def __init__(self, verb: str, answer: bytes, at: int, **options: object) -> None:
        super().__init__(**options)  # type: ignore[arg-type]
        self.verb, self.answer, self.at = verb, answer, at
        self.mails = 0

    def _command(self, line: str) -> None:
        verb = line.split(" ", 1)[0].upper()
        if verb == "MAIL":
            self.mails += 1
        if self.mails == self.at and verb == self.verb:
            self.out += self.answer
            self.dead = not self.answer.startswith(b"550")
            if verb == "MAIL":
                self.mail = None  # the RCPTs then get 503
            return
        super()._command(line)


@pytest.mark.parametrize("lmtp", [False, True])
@pytest.mark.parametrize("pipelining", [True, False])
@pytest.mark.parametrize(
    ("verb", "answer"),
    [
        ("MAIL", b"550 5.7.1 not from you\r\n"),
        ("MAIL", b"421 4.3.2 bye\r\n"),
        ("RCPT", b"421 4.3.2 bye\r\n"),
        ("DATA", b"421 4.3.2 bye\r\n"),
        ("DATA", b""),
    ],
)
def test_a_fault_in_a_later_part_keeps_the_earlier_answers(
    verb: str, answer: bytes, pipelining: bool, lmtp: bool
) -> None:
    keywords = ["LIMITS RCPTMAX=2"] + (["PIPELINING"] if pipelining else [])
    server = FaultyServer(verb, answer, 2, limit=2, keywords=keywords, lmtp=lmtp)
    session = session_for(server)
    addresses = recipients(5)
    result = server.run(session.deliver(message(), Envelope("a@example.org", addresses)))
    outcomes = [r.outcome for r in result.recipients]
    assert outcomes[:2] == [Outcome.ACCEPTED] * 2
    if answer.startswith(b"550"):
        # MAIL refused for part 2 only: its recipients get the refusal, part 3 goes on.
        assert outcomes[2:] == [Outcome.PERMANENT] * 2 + [Outcome.ACCEPTED]
        assert not session.closed
    else:
        assert outcomes[2:] == [Outcome.TRANSIENT] * 3
        assert session.closed
    assert len(delivered_to(server)) == len(set(delivered_to(server)))
    assert session.transactions == server.mails


class FullMailboxServer(LimitServer):
    """An LMTP LimitServer whose final reply for a recipient named ``full@...`` is
    ``452 mailbox full``: a per-recipient delivery result (RFC 2033 §4.2), not "too many
    recipients" (which only a RCPT gets)."""

    def _data_line(self, line: bytes) -> None:
        if line != b".":
            super()._data_line(line)
            return
        self.in_data = False
        assert self.mail is not None
        self.delivered.append((self.mail, list(self.rcpts), b""))
        for rcpt in self.rcpts:
            self._reply("452 mailbox full" if rcpt.startswith("full@") else "250 2.0.0 ok")
        self._end_transaction()


@pytest.mark.parametrize("announced", [True, False])
def test_an_lmtp_final_452_is_not_taken_for_too_many_recipients(announced: bool) -> None:
    keywords = ["PIPELINING"] + (["LIMITS RCPTMAX=2"] if announced else [])
    server = FullMailboxServer(limit=2, keywords=keywords, lmtp=True)
    session = session_for(server)
    addresses = ["a@x.example", "full@x.example", "c@x.example"]
    result = server.run(session.deliver(message(), Envelope("a@example.org", addresses)))
    assert [r.outcome for r in result.recipients] == [
        Outcome.ACCEPTED,
        Outcome.TRANSIENT,
        Outcome.ACCEPTED,
    ]
    # The full mailbox got the message once; only c went in a second transaction.
    assert sorted(delivered_to(server)) == sorted(addresses)
    assert len(server.delivered) == 2


@settings(max_examples=200, deadline=None)
@example(counts=[3, 1], limit=2, announce=True, close_after=1, pipelining=True)
@given(
    counts=st.lists(st.integers(min_value=1, max_value=6), min_size=1, max_size=6),
    limit=st.integers(min_value=1, max_value=3),
    announce=st.booleans(),
    close_after=st.none() | st.integers(min_value=1, max_value=12),
    pipelining=st.booleans(),
)
def test_a_batch_cut_anywhere_hands_back_only_unsent_messages(
    *,
    counts: list[int],
    limit: int,
    announce: bool,
    close_after: int | None,
    pipelining: bool,
) -> None:
    keywords = (["PIPELINING"] if pipelining else []) + (
        [f"LIMITS RCPTMAX={limit}"] if announce else []
    )
    server = LimitServer(limit=limit, keywords=keywords, close_after=close_after)
    session = session_for(server)
    items = [
        (message(n), Envelope("a@example.org", [f"m{n}.{i}@x.example" for i in range(k)]))
        for n, k in enumerate(counts)
    ]
    outcome = server.run(session.deliver_many(items))
    results = list(outcome.results)
    first_none = results.index(None) if None in results else len(results)
    # From the first message handed back on, none was sent (a pool sends them again).
    assert all(result is None for result in results[first_none:])
    taken = {rcpts[0].split(".")[0] for _, rcpts, _ in server.delivered}
    assert taken <= {f"m{n}" for n in range(first_none)}
    # No recipient got the message twice, and every delivered one is ACCEPTED.
    delivered = delivered_to(server)
    assert len(delivered) == len(set(delivered))
    accepted = {str(r.address) for result in results if result for r in result.accepted}
    assert accepted == set(delivered)
    if None in results or any(result and not result.ok for result in results):
        assert outcome.error is not None
    else:
        assert outcome.error is None


def test_a_split_message_stops_at_mailmax_and_the_batch_hands_back_the_rest() -> None:
    server = LimitServer(limit=2, keywords=["PIPELINING", "LIMITS RCPTMAX=2 MAILMAX=2"])
    session = session_for(server)
    items = [
        (message(0), Envelope("a@example.org", recipients(5))),
        (message(1), Envelope("a@example.org", ["s@x.example"])),
    ]
    outcome = server.run(session.deliver_many(items))
    first, second = outcome.results
    assert first is not None
    assert [r.outcome for r in first.recipients] == [Outcome.ACCEPTED] * 4 + [Outcome.TRANSIENT]
    assert second is None  # unsent: for another session
    assert outcome.error is None
    assert session.transactions == 2 == len(server.delivered)
    assert not session.closed
