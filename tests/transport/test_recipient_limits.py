"""Recipient limits against real servers: Postfix's ``smtpd_recipient_limit`` (452 4.5.3 for
each RCPT over it) and an aiosmtpd that announces LIMITS RCPTMAX (RFC 9422) and enforces it.

What must hold: every recipient is delivered, in as many transactions as the server needs,
through both drivers, the smart-host and MX transports, one message and batches; a refusal
that is not "too many" keeps its own answer.
"""

from __future__ import annotations

import contextlib
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP
from aiosmtpd.smtp import Envelope as ServerEnvelope
from aiosmtpd.smtp import Session as ServerSession

from mailrelay.envelope import Envelope
from mailrelay.message import Message
from mailrelay.options import TLS, Timeouts
from mailrelay.results import DeliveryResult, Outcome
from mailrelay.transport import AsyncSMTPTransport, SMTPTransport
from mailrelay.transport.mx import MXTransport
from mailrelay.transport.mx_async import AsyncMXTransport
from tests.peers.aiosmtpd_server import HOSTNAME, RecordingHandler, _LMTPController
from tests.peers.postfix import RECIPIENT_LIMIT, PostfixInstance
from tests.peers.scripted import free_port
from tests.peers.unbound import UnboundServer
from tests.transport.helpers import FLAVOURS, Flavour, run, send_many_with, send_with

SINK = "sink.mailrelay.test"  # Postfix accepts and discards this domain


def postfix_args(postfix: PostfixInstance, *, chunking: bool = False) -> dict[str, Any]:
    return {
        "host": postfix.host,
        "port": postfix.limited_port,
        "tls": TLS.NONE,
        "timeouts": Timeouts.all(15),
        "chunking": chunking,  # BDAT (Postfix offers CHUNKING) or DATA
    }


def tagged(to: list[str]) -> Message:
    return Message.build(
        sender="carol@mailrelay.test",
        to=to,
        subject=f"limits {uuid.uuid4().hex}",
        text="Hello.\n",
    )


def queue_ids(texts: list[str]) -> set[str]:
    """Postfix's queue ids in "250 2.0.0 Ok: queued as 4Xyz" replies."""
    return {text.rsplit(" ", 1)[-1] for text in texts if "queued as" in text}


@pytest.mark.postfix
@pytest.mark.parametrize("chunking", [False, True])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_postfix_recipient_limit_one_message(
    flavour: Flavour, chunking: bool, postfix_clean: PostfixInstance
) -> None:
    sinks = [f"r{i}@{SINK}" for i in range(6)]
    to = ["alice@mailrelay.test", *sinks, "bob@mailrelay.test"]
    message = tagged(to)
    result = send_with(flavour, message, **postfix_args(postfix_clean, chunking=chunking))
    assert result.ok, result
    assert [str(r.address) for r in result.recipients] == to
    texts = [r.reply.text for r in result.recipients if r.reply is not None]
    # 8 recipients, 3 a transaction: three transactions, three queue ids.
    assert len(queue_ids(texts)) == -(-len(to) // RECIPIENT_LIMIT)
    marker = message.message_id
    assert marker is not None
    postfix_clean.wait_for_message("alice", marker.encode())
    postfix_clean.wait_for_message("bob", marker.encode())


@pytest.mark.postfix
@pytest.mark.parametrize("chunking", [False, True])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_postfix_recipient_limit_in_a_batch(
    flavour: Flavour, chunking: bool, postfix_clean: PostfixInstance
) -> None:
    counts = [1, 7, 2, 4]
    messages = [tagged([f"m{n}.{i}@{SINK}" for i in range(c)]) for n, c in enumerate(counts)]
    results = send_many_with(
        flavour, list(messages), **postfix_args(postfix_clean, chunking=chunking)
    )
    for message, result, count in zip(messages, results, counts, strict=True):
        assert result.ok, result
        assert len(result.recipients) == count
        assert result.message_id == message.message_id


@pytest.mark.postfix
@pytest.mark.unbound
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_mx_delivery_keeps_each_refusal(
    flavour: Flavour, unbound: UnboundServer, postfix_clean: PostfixInstance
) -> None:
    # alice, bob and a user Postfix does not know fill the first transaction; the fourth
    # recipient, refused as too many, goes in a second one, where it gets its own answer:
    # 550 5.1.1 (unknown user), not the 452.
    to = ["alice@mailrelay.test", "bob@mailrelay.test", "nobody1@mailrelay.test"]
    to.append("nobody2@mailrelay.test")
    message = tagged(to)
    envelope = Envelope("carol@mailrelay.test", to)
    options: dict[str, Any] = {"port": postfix_clean.limited_port, "timeouts": Timeouts.all(10)}
    if flavour == "sync":
        with MXTransport(unbound.resolver(), **options, refused_networks=()) as mx:
            result = mx.send(message, envelope)
    else:

        async def main() -> Any:
            async with AsyncMXTransport(
                unbound.async_resolver(), **options, refused_networks=()
            ) as mx:
                return await mx.asend(message, envelope)

        result = run(main())
    outcomes = [(r.outcome, r.reply.code if r.reply else None) for r in result.recipients]
    assert outcomes == [
        (Outcome.ACCEPTED, 250),
        (Outcome.ACCEPTED, 250),
        (Outcome.PERMANENT, 550),
        (Outcome.PERMANENT, 550),
    ], result
    marker = message.message_id
    assert marker is not None
    postfix_clean.wait_for_message("alice", marker.encode())


# -- an aiosmtpd that announces its limit ---------------------------------------------------------


class LimitsHandler(RecordingHandler):
    """Announces ``LIMITS RCPTMAX=n`` and/or ``MAILMAX=n`` (RFC 9422) and enforces them: a
    RCPT over the limit gets 452 4.5.3, a MAIL over it 421."""

    def __init__(self, *, rcpt_max: int | None = None, mail_max: int | None = None) -> None:
        super().__init__()
        self.rcpt_max = rcpt_max
        self.mail_max = mail_max
        self.refused = 0  # RCPTs refused as too many
        # MAILs per connection, by the session object itself: an id() could be reused by
        # the next connection's session once the last one is freed.
        self.per_session: dict[ServerSession, int] = {}
        self.over = 0  # MAILs refused as too many

    async def handle_EHLO(
        self,
        server: SMTP,
        session: ServerSession,
        envelope: ServerEnvelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        limits = [
            f"{name}={value}"
            for name, value in (("RCPTMAX", self.rcpt_max), ("MAILMAX", self.mail_max))
            if value is not None
        ]
        return [*responses[:-1], f"250-LIMITS {' '.join(limits)}", responses[-1]]

    async def handle_MAIL(
        self,
        server: SMTP,
        session: ServerSession,
        envelope: ServerEnvelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        count = self.per_session.get(session, 0) + 1
        self.per_session[session] = count
        if self.mail_max is not None and count > self.mail_max:
            self.over += 1
            return "421 4.7.0 Too many transactions on one connection"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: ServerSession,
        envelope: ServerEnvelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if self.rcpt_max is not None and len(envelope.rcpt_tos) >= self.rcpt_max:
            self.refused += 1
            return "452 4.5.3 Too many recipients"
        return await super().handle_RCPT(server, session, envelope, address, rcpt_options)


@contextlib.contextmanager
def serving(handler: LimitsHandler, *, lmtp: bool = False) -> Iterator[int]:
    """An aiosmtpd with ``handler`` on loopback (its LMTP server with ``lmtp``: one final
    reply per recipient after the data), for the ``with`` block; its port."""
    port = free_port()
    if lmtp:
        handler.lmtp = True
    server_class = _LMTPController if lmtp else Controller
    controller = server_class(
        handler, hostname="127.0.0.1", port=port, server_hostname=HOSTNAME, decode_data=False
    )
    controller.start()
    try:
        yield port
    finally:
        controller.stop()


def received(handler: LimitsHandler) -> Counter[str]:
    """How many times the server took the message for each recipient."""
    return Counter(rcpt for message in handler.messages for rcpt in message.rcpt_tos)


@pytest.fixture
def limited_aiosmtpd() -> Iterator[tuple[LimitsHandler, int]]:
    handler = LimitsHandler(rcpt_max=2)
    with serving(handler) as port:
        yield handler, port


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_announced_limit_is_kept_before_sending(
    flavour: Flavour, limited_aiosmtpd: tuple[LimitsHandler, int]
) -> None:
    handler, port = limited_aiosmtpd
    to = [f"user{i}@example.net" for i in range(5)]
    result = send_with(
        flavour,
        tagged(to),
        host="127.0.0.1",
        port=port,
        tls=TLS.NONE,
        timeouts=Timeouts.all(10),
    )
    assert result.ok, result
    assert handler.refused == 0  # never asked for a third recipient
    assert [m.rcpt_tos for m in handler.messages] == [tuple(to[0:2]), tuple(to[2:4]), (to[4],)]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_announced_limit_in_a_batch(
    flavour: Flavour, limited_aiosmtpd: tuple[LimitsHandler, int]
) -> None:
    handler, port = limited_aiosmtpd
    counts = [3, 1, 2, 5]
    messages = [tagged([f"m{n}.{i}@example.net" for i in range(c)]) for n, c in enumerate(counts)]
    results = send_many_with(
        flavour,
        list(messages),
        host="127.0.0.1",
        port=port,
        tls=TLS.NONE,
        timeouts=Timeouts.all(10),
    )
    assert all(r.ok for r in results), results
    assert handler.refused == 0
    received = sorted(rcpt for m in handler.messages for rcpt in m.rcpt_tos)
    assert received == sorted(
        f"m{n}.{i}@example.net" for n, c in enumerate(counts) for i in range(c)
    )
    assert all(len(m.rcpt_tos) <= 2 for m in handler.messages)


# -- MAILMAX: transactions per connection -------------------------------------------------------


@pytest.mark.parametrize("bulk", [True, False])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_announced_mailmax_replaces_the_connection_in_time(flavour: Flavour, bulk: bool) -> None:
    handler = LimitsHandler(mail_max=2)
    messages = [tagged([f"user{n}@example.net"]) for n in range(7)]
    with serving(handler) as port:
        options: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": port,
            "tls": TLS.NONE,
            "timeouts": Timeouts.all(10),
        }
        if bulk:
            results = send_many_with(flavour, list(messages), **options)
        elif flavour == "sync":
            with SMTPTransport(**options) as transport:
                results = [transport.send(m) for m in messages]
        else:

            async def main() -> list[DeliveryResult]:
                async with AsyncSMTPTransport(**options) as transport:
                    return [await transport.asend(m) for m in messages]

            results = run(main())
    assert all(r.ok for r in results), results
    assert handler.over == 0  # never a third MAIL on one connection
    assert sum(handler.per_session.values()) == len(handler.messages)
    assert max(handler.per_session.values()) == 2
