"""Recipient limits in the dialogue: a server's "too many recipients" (RFC 5321 §4.5.3.1.10)
and its announced LIMITS (RFC 9422), against a reactive in-process server.

:class:`LimitServer` reads what the client actually writes (pipelined or not) and answers
as a server with a per-transaction recipient limit would: each RCPT beyond ``limit`` gets
the ``too_many`` reply, DATA with no accepted recipient gets 554. It records every
transaction, so the tests check what arrived, not only what the client reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailrelay.envelope import Envelope
from mailrelay.errors import DeliveryError
from mailrelay.flow import BatchOutcome, Read, Session, SessionConfig, Step, Write
from mailrelay.flow.bookkeeping import too_many_recipients
from mailrelay.message import Message
from mailrelay.options import TLS
from mailrelay.protocol import Extensions
from mailrelay.reply import Reply
from mailrelay.results import Outcome

T = TypeVar("T")

MAX_REQUESTS = 20_000


class LimitServer:
    """An SMTP (or LMTP) server with a recipient limit per transaction."""

    def __init__(
        self,
        *,
        limit: int | None = None,
        domain_limit: int | None = None,
        too_many: bytes = b"452 4.5.3 Error: too many recipients\r\n",
        keywords: Sequence[str] = ("PIPELINING", "ENHANCEDSTATUSCODES", "8BITMIME"),
        lmtp: bool = False,
        close_after: int | None = None,
    ) -> None:
        self.limit = limit
        self.domain_limit = domain_limit
        self.too_many = too_many
        self.keywords = tuple(keywords)
        self.lmtp = lmtp
        # After this many transactions have ended (data or RSET), 421 and the end.
        self.close_after = close_after
        self.out = bytearray(b"220 test.example ESMTP\r\n")
        self.buffer = b""
        self.in_data = False
        self.data_lines: list[bytes] = []
        self.rcpts: list[str] = []
        self.mail: str | None = None
        self.dead = False
        self.ended = 0
        #: every transaction that reached the end of its data: (MAIL, RCPTs, data)
        self.delivered: list[tuple[str, list[str], bytes]] = []
        #: every RCPT refused as one too many
        self.refused: list[str] = []

    # -- the wire ------------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self.buffer += data
        while not self.dead:
            line, sep, rest = self.buffer.partition(b"\r\n")
            if not sep:
                return
            self.buffer = rest
            if self.in_data:
                self._data_line(line)
            else:
                self._command(line.decode())

    def take(self) -> bytes:
        data = bytes(self.out)
        self.out.clear()
        return data

    def run(self, step: Step[T]) -> T:
        value: bytes | None = None
        for _ in range(MAX_REQUESTS):
            try:
                request = step.send(value)
            except StopIteration as done:
                result: T = done.value
                return result
            value = None
            if isinstance(request, Write):
                self.feed(request.data)
            elif isinstance(request, Read):
                value = self.take()  # b"": the end of the connection
        raise AssertionError("the step never finished")

    # -- the server ----------------------------------------------------------------------------

    def _reply(self, text: str) -> None:
        self.out += text.encode() + b"\r\n"

    def _end_transaction(self) -> None:
        self.mail, self.rcpts = None, []
        self.ended += 1
        if self.close_after is not None and self.ended >= self.close_after:
            self._reply("421 4.3.2 closing")
            self.dead = True

    def _command(self, line: str) -> None:
        verb = line.split(" ", 1)[0].upper()
        if verb in ("EHLO", "LHLO"):
            lines = ["test.example", *self.keywords]
            for text in lines[:-1]:
                self._reply(f"250-{text}")
            self._reply(f"250 {lines[-1]}")
        elif verb == "MAIL":
            self.mail, self.rcpts = line, []
            self._reply("250 2.1.0 Ok")
        elif verb == "RCPT":
            address = line.split("<", 1)[1].split(">", 1)[0]
            domains = {a.rpartition("@")[2] for a in self.rcpts}
            domain = address.rpartition("@")[2]
            if self.mail is None:
                self._reply("503 5.5.1 Error: need MAIL command")
            elif (self.limit is not None and len(self.rcpts) >= self.limit) or (
                self.domain_limit is not None
                and domain not in domains
                and len(domains) >= self.domain_limit
            ):
                self.refused.append(address)
                self.out += self.too_many
            else:
                self.rcpts.append(address)
                self._reply("250 2.1.5 Ok")
        elif verb == "DATA":
            if not self.rcpts:
                self._reply("554 5.5.1 Error: no valid recipients")
            else:
                self.in_data, self.data_lines = True, []
                self._reply("354 go ahead")
        elif verb == "RSET":
            self._reply("250 2.0.0 Ok")
            if self.mail is not None:
                self._end_transaction()
        elif verb == "QUIT":
            self._reply("221 2.0.0 Bye")
            self.dead = True
        else:
            self._reply("502 5.5.2 Error: command not recognized")

    def _data_line(self, line: bytes) -> None:
        if line != b".":
            self.data_lines.append(line[1:] if line.startswith(b".") else line)
            return
        self.in_data = False
        assert self.mail is not None
        self.delivered.append((self.mail, list(self.rcpts), b"\r\n".join(self.data_lines)))
        if self.lmtp:
            for _ in self.rcpts:
                self._reply("250 2.0.0 delivered")
        else:
            self._reply(f"250 2.0.0 queued as Q{len(self.delivered)}")
        self._end_transaction()


def config(**changes: object) -> SessionConfig:
    settings_: dict[str, object] = {
        "local_hostname": "client.example.org",
        "server_hostname": "test.example",
        "tls": TLS.NONE,
    }
    settings_.update(changes)
    return SessionConfig(**settings_)  # type: ignore[arg-type]


def session_for(server: LimitServer, **changes: object) -> Session:
    session = Session(config(lmtp=server.lmtp, **changes))
    server.run(session.open())
    return session


def message(n: int = 0) -> Message:
    raw = (
        f"From: alice@example.org\r\nTo: list@example.net\r\nSubject: test {n}\r\n"
        f"Message-ID: <m{n}@example.org>\r\n\r\nbody {n}\r\n"
    )
    return Message.from_bytes(raw.encode())


def recipients(count: int, domains: int = 1) -> list[str]:
    return [f"r{i}@d{i % domains}.example" for i in range(count)]


def delivered_to(server: LimitServer) -> list[str]:
    return [rcpt for _, rcpts, _ in server.delivered for rcpt in rcpts]


# -- recognising "too many recipients" ------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("452 4.5.3 Error: too many recipients", True),
        ("452 Too many recipients", True),
        ("452 insufficient system storage", True),  # no enhanced code: the RFC's code for it
        ("552 5.5.3 Too many recipients", True),
        ("552 Too many recipients for this message", True),
        ("552 Requested mail action aborted: exceeded storage allocation", False),
        ("552 5.2.2 Mailbox full", False),
        ("452 4.2.2 Mailbox full", False),
        ("452 4.3.1 Insufficient system storage", False),
        ("450 4.5.3 too many recipients", False),  # only 452 and 552
        ("550 5.5.3 Too many recipients", False),
        ("250 2.1.5 Ok", False),
    ],
)
def test_too_many_recipients_is_recognised(line: str, expected: bool) -> None:
    code, _, text = line.partition(" ")
    assert too_many_recipients(Reply.of(int(code), text)) is expected


# -- LIMITS in the EHLO reply --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keyword", "rcpt_max", "domain_max", "mail_max"),
    [
        ("LIMITS RCPTMAX=3", 3, None, None),
        ("LIMITS MAILMAX=100 RCPTMAX=50 RCPTDOMAINMAX=2", 50, 2, 100),
        ("limits rcptmax=7", 7, None, None),
        ("LIMITS RCPTMAX=0", None, None, None),  # not a usable count: ignored
        ("LIMITS RCPTMAX=-1 MAILMAX=x RCPTDOMAINMAX=", None, None, None),
        ("LIMITS RCPTMAX=1234567890", None, None, None),  # over 9 digits
        ("LIMITS RCPTMAX=3 RCPTMAX=9", 3, None, None),  # the first one counts
        ("LIMITS FUTURE=1 RCPTMAX=4 FLAG", 4, None, None),
        ("LIMITS", None, None, None),
    ],
)
def test_limits_keyword(
    keyword: str, rcpt_max: int | None, domain_max: int | None, mail_max: int | None
) -> None:
    ext = Extensions.parse(["test.example", "PIPELINING", keyword])
    assert (ext.rcpt_max, ext.rcpt_domain_max, ext.mail_max) == (rcpt_max, domain_max, mail_max)
    assert "LIMITS" in ext
    assert ext.pipelining


# -- a server's limit, found out -----------------------------------------------------------------


@pytest.mark.parametrize("pipelining", [True, False])
@pytest.mark.parametrize(
    "too_many",
    [
        b"452 4.5.3 Error: too many recipients\r\n",
        b"552 5.5.3 Too many recipients\r\n",  # RFC 821's code: still temporary
        b"452 Too many recipients\r\n",
    ],
)
def test_recipients_over_the_limit_go_in_further_transactions(
    pipelining: bool, too_many: bytes
) -> None:
    keywords = ("PIPELINING", "8BITMIME") if pipelining else ("8BITMIME",)
    server = LimitServer(limit=3, too_many=too_many, keywords=keywords)
    session = session_for(server)
    addresses = recipients(8)
    result = server.run(session.deliver(message(), Envelope("alice@example.org", addresses)))
    assert result.ok, result
    assert [str(r.address) for r in result.recipients] == addresses
    assert [len(rcpts) for _, rcpts, _ in server.delivered] == [3, 3, 2]
    assert sorted(delivered_to(server)) == sorted(addresses)  # each exactly once
    assert all(data == server.delivered[0][2] for _, _, data in server.delivered)
    # Each transaction's recipients keep their own reply (queue ids differ).
    queue_ids = {r.reply.text for r in result.recipients if r.reply is not None}
    assert len(queue_ids) == 3
    assert not session.closed


def test_lmtp_recipients_over_the_limit_go_in_further_transactions() -> None:
    server = LimitServer(limit=2, lmtp=True)
    session = session_for(server)
    addresses = recipients(5)
    result = server.run(session.deliver(message(), Envelope("alice@example.org", addresses)))
    assert result.ok, result
    assert [len(rcpts) for _, rcpts, _ in server.delivered] == [2, 2, 1]


def test_a_server_that_takes_no_recipient_at_all_is_not_asked_again() -> None:
    server = LimitServer(limit=0)
    session = session_for(server)
    result = server.run(session.deliver(message(), Envelope("a@example.org", recipients(3))))
    # RFC 5321 §4.5.3.1.10: temporary, even as 552; one transaction only (no progress).
    assert [r.outcome for r in result.recipients] == [Outcome.TRANSIENT] * 3
    assert len(server.refused) == 3
    assert server.delivered == []


def test_a_552_too_many_with_no_progress_is_transient_not_a_bounce() -> None:
    server = LimitServer(limit=0, too_many=b"552 5.5.3 Too many recipients\r\n")
    session = session_for(server)
    result = server.run(session.deliver(message(), Envelope("a@example.org", recipients(2))))
    assert [r.outcome for r in result.recipients] == [Outcome.TRANSIENT] * 2
    assert all(r.reply is not None and r.reply.code == 552 for r in result.recipients)


def test_other_refusals_are_not_sent_again() -> None:
    server = LimitServer(limit=2, too_many=b"550 5.1.1 No such user\r\n")
    session = session_for(server)
    result = server.run(session.deliver(message(), Envelope("a@example.org", recipients(4))))
    assert [r.outcome for r in result.recipients] == [Outcome.ACCEPTED] * 2 + [
        Outcome.PERMANENT
    ] * 2
    assert len(server.delivered) == 1


def test_the_session_ending_between_transactions_leaves_the_rest_transient() -> None:
    # The server hangs up (421) after the first transaction: the first three recipients
    # are delivered, the rest keep a TRANSIENT result, nothing raises.
    server = LimitServer(limit=3, close_after=1)
    session = session_for(server)
    addresses = recipients(7)
    result = server.run(session.deliver(message(), Envelope("a@example.org", addresses)))
    outcomes = [r.outcome for r in result.recipients]
    assert outcomes == [Outcome.ACCEPTED] * 3 + [Outcome.TRANSIENT] * 4
    assert delivered_to(server) == addresses[:3]
    assert session.closed


# -- a server's announced LIMITS -----------------------------------------------------------------


@pytest.mark.parametrize("pipelining", [True, False])
def test_announced_rcptmax_splits_before_sending(pipelining: bool) -> None:
    keywords = ["LIMITS RCPTMAX=3", "8BITMIME"] + (["PIPELINING"] if pipelining else [])
    server = LimitServer(limit=3, keywords=keywords)
    session = session_for(server)
    addresses = recipients(7)
    result = server.run(session.deliver(message(), Envelope("a@example.org", addresses)))
    assert result.ok
    assert server.refused == []  # never went over
    assert [len(rcpts) for _, rcpts, _ in server.delivered] == [3, 3, 1]


def test_announced_rcptdomainmax_groups_recipients_by_domain() -> None:
    server = LimitServer(domain_limit=2, keywords=["PIPELINING", "LIMITS RCPTDOMAINMAX=2"])
    session = session_for(server)
    addresses = recipients(9, domains=3)  # d0, d1, d2, d0, d1, ...
    result = server.run(session.deliver(message(), Envelope("a@example.org", addresses)))
    assert result.ok
    assert [str(r.address) for r in result.recipients] == addresses
    assert server.refused == []
    groups = [{a.rpartition("@")[2] for a in rcpts} for _, rcpts, _ in server.delivered]
    assert groups == [{"d0.example", "d1.example"}, {"d2.example"}]


def test_an_envelope_within_the_limits_is_one_transaction() -> None:
    server = LimitServer(limit=3, keywords=["PIPELINING", "LIMITS RCPTMAX=3 RCPTDOMAINMAX=1"])
    session = session_for(server)
    result = server.run(session.deliver(message(), Envelope("a@example.org", recipients(3))))
    assert result.ok
    assert len(server.delivered) == 1


# -- batches -------------------------------------------------------------------------------------


@pytest.mark.parametrize("announced", [True, False])
def test_a_batch_sends_every_recipient_of_every_message(announced: bool) -> None:
    keywords = ["PIPELINING", "8BITMIME"] + (["LIMITS RCPTMAX=2"] if announced else [])
    server = LimitServer(limit=2, keywords=keywords)
    session = session_for(server)
    counts = [1, 5, 2, 3, 1]
    items = [
        (message(n), Envelope("a@example.org", [f"m{n}.{i}@x.example" for i in range(k)]))
        for n, k in enumerate(counts)
    ]
    outcome = server.run(session.deliver_many(items))
    assert outcome.error is None
    assert all(r is not None and r.ok for r in outcome.results), outcome
    for (_, envelope), result in zip(items, outcome.results, strict=True):
        assert result is not None
        assert [r.address for r in result.recipients] == [r.address for r in envelope.recipients]
    expected = sorted(str(r.address) for _, e in items for r in e.recipients)
    assert sorted(delivered_to(server)) == expected
    assert all(len(rcpts) <= 2 for _, rcpts, _ in server.delivered)
    if announced:
        assert server.refused == []
    # Each recipient got its own message's data.
    for _, rcpts, data in server.delivered:
        n = rcpts[0].split(".")[0][1:]
        assert f"body {n}".encode() in data


def batch_cut_short(close_after: int) -> tuple[LimitServer, Session, BatchOutcome]:
    """Three messages of 1, 5 and 1 recipients to a server that takes two a transaction
    (and says so) and hangs up (421) after ``close_after`` transactions. The messages go
    in order: message 1 needs three transactions of its own, between messages 0 and 2
    (so that a message handed back was never sent, nor any after it)."""
    server = LimitServer(
        limit=2, keywords=["PIPELINING", "LIMITS RCPTMAX=2"], close_after=close_after
    )
    session = session_for(server)
    items = [
        (message(n), Envelope("a@example.org", [f"m{n}.{i}@x.example" for i in range(k)]))
        for n, k in enumerate([1, 5, 1])
    ]
    outcome = server.run(session.deliver_many(items))
    first = outcome.results[0]
    assert first is not None
    assert first.ok
    return server, session, outcome


def test_a_batch_whose_session_ends_hands_back_the_messages_not_sent() -> None:
    # The hang-up comes before message 1 can begin: it and message 2 are handed back
    # unsent (None), with the error, for the transport to send on a fresh connection.
    server, _, outcome = batch_cut_short(close_after=1)
    assert outcome.results[1:] == (None, None)
    assert outcome.error is not None
    assert delivered_to(server) == ["m0.0@x.example"]


def test_a_batch_whose_session_ends_between_parts_keeps_the_answers() -> None:
    # The hang-up comes after message 1's first transaction: its first two recipients
    # are delivered, the rest are TRANSIENT (sending the whole message again would
    # deliver twice).
    _, session, outcome = batch_cut_short(close_after=2)
    second = outcome.results[1]
    assert second is not None
    assert [r.outcome for r in second.recipients] == [Outcome.ACCEPTED] * 2 + [
        Outcome.TRANSIENT
    ] * 3
    assert outcome.results[2] is None
    assert session.closed


# -- the property ---------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    count=st.integers(min_value=1, max_value=25),
    domains=st.integers(min_value=1, max_value=5),
    limit=st.integers(min_value=1, max_value=6),
    domain_limit=st.none() | st.integers(min_value=1, max_value=3),
    announce=st.booleans(),
    pipelining=st.booleans(),
    lmtp=st.booleans(),
    style=st.sampled_from(
        [
            b"452 4.5.3 Error: too many recipients\r\n",
            b"552 5.5.3 Too many recipients\r\n",
            b"452 Too many recipients\r\n",
        ]
    ),
)
def test_every_recipient_arrives_exactly_once_whatever_the_limits(
    *,
    count: int,
    domains: int,
    limit: int,
    domain_limit: int | None,
    announce: bool,
    pipelining: bool,
    lmtp: bool,
    style: bytes,
) -> None:
    keywords = ["ENHANCEDSTATUSCODES"] + (["PIPELINING"] if pipelining else [])
    if announce:
        announced = f"RCPTMAX={limit}" + (
            f" RCPTDOMAINMAX={domain_limit}" if domain_limit is not None else ""
        )
        keywords.append(f"LIMITS {announced}")
    server = LimitServer(
        limit=limit, domain_limit=domain_limit, too_many=style, keywords=keywords, lmtp=lmtp
    )
    session = session_for(server)
    addresses = recipients(count, domains)
    try:
        result = server.run(session.deliver(message(), Envelope("a@example.org", addresses)))
    except DeliveryError as exc:  # pragma: no cover - a failure, shown
        raise AssertionError(f"raised {exc!r}") from exc
    assert result.ok, result
    assert [str(r.address) for r in result.recipients] == addresses
    assert sorted(delivered_to(server)) == sorted(addresses)
    if announce:
        assert server.refused == []


# -- counting transactions (what MAILMAX counts) ----------------------------------------------


@pytest.mark.parametrize("pipelining", [True, False])
def test_the_session_counts_its_transactions(pipelining: bool) -> None:
    keywords = ["PIPELINING"] if pipelining else []
    server = LimitServer(limit=2, keywords=keywords)
    session = session_for(server)
    assert session.transactions == 0
    server.run(session.deliver(message(), Envelope("a@example.org", recipients(5))))
    assert session.transactions == 3 == len(server.delivered)
    items = [(message(n), Envelope("a@example.org", recipients(1))) for n in range(4)]
    server.run(session.deliver_many(items))
    assert session.transactions == 7 == len(server.delivered)
    server.run(
        session.probe(None, [Envelope("a@example.org", recipients(1)).recipients[0].address])
    )
    assert session.transactions == 8
