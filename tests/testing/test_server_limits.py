"""SMTPTestServer's recipient limit, announced (``LIMITS RCPTMAX``, RFC 9422) or not, with
mailrelay as the client: every recipient arrives, in transactions the limit allows."""

from __future__ import annotations

import smtplib

import pytest

from mailrelay.message import Message
from mailrelay.options import TLS, Timeouts
from mailrelay.protocol import Extensions
from mailrelay.testing.server import SMTPTestServer
from mailrelay.transport import SMTPTransport


@pytest.mark.parametrize("announce", [True, False])
def test_limits_are_announced_only_when_asked(announce: bool) -> None:
    with (
        SMTPTestServer(max_recipients=3, announce_limits=announce) as server,
        smtplib.SMTP(server.host, server.port, timeout=10) as client,
    ):
        code, text = client.ehlo("client.example")
    assert code == 250
    lines = text.decode().splitlines()
    assert ("LIMITS RCPTMAX=3" in lines) is announce
    assert Extensions.parse(lines).rcpt_max == (3 if announce else None)


@pytest.mark.parametrize("announce", [True, False])
def test_every_recipient_arrives_within_the_limit(announce: bool) -> None:
    to = [f"user{i}@example.net" for i in range(7)]
    message = Message.build(sender="a@x.example", to=to, subject="limits", text="Hi.\n")
    with SMTPTestServer(max_recipients=3, announce_limits=announce) as server:
        with SMTPTransport(
            server.host, server.port, tls=TLS.NONE, timeouts=Timeouts.all(10)
        ) as transport:
            result = transport.send(message)
        received = server.wait_for(3)
        sent = b"\n".join(server.sessions[0].lines)
    assert result.ok, result
    assert [m.rcpt_tos for m in received] == [tuple(to[0:3]), tuple(to[3:6]), (to[6],)]
    rcpts = sent.count(b"RCPT TO:")
    # Announced: never a RCPT too many; otherwise the refused ones are asked again.
    assert rcpts == (7 if announce else 7 + 4 + 1)
