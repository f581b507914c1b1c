"""A message refused before sending says why in an RFC 3463 status too (``RecipientResult.
enhanced``), and the tracker's failure DSN reports that status instead of 5.0.0."""

from __future__ import annotations

import pytest

from mailrelay.envelope import Envelope
from mailrelay.message import Message
from mailrelay.options import TLS
from mailrelay.results import Outcome
from mailrelay.testing.server import SMTPTestServer
from mailrelay.tracker import DeliveryTracker, MemoryStore, State
from mailrelay.transport import MemoryTransport, SMTPTransport
from tests.test_flow import GO_AHEAD, GREETING, OK, QUEUED, ehlo, message, opened

EIGHT_BIT = (
    "From: alice@example.org\r\nTo: bob@example.net\r\nSubject: 8\r\nMIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    "Grüße\r\n"
).encode()


@pytest.mark.parametrize(
    ("offered", "msg", "envelope", "status"),
    [
        (("SIZE 10",), message(), Envelope("alice@example.org", ["bob@example.net"]), "5.3.4"),
        ((), message(), Envelope("alice@example.org", ["jöran@example.net"]), "5.6.7"),
        ((), message(), Envelope("jöran@example.org", ["bob@example.net"]), "5.6.7"),
        (
            ("8BITMIME",),
            message(Comments="Jöran"),
            Envelope("alice@example.org", ["bob@example.net"]),
            "5.6.0",
        ),
        (
            (),
            Message.from_bytes(EIGHT_BIT),
            Envelope("alice@example.org", ["bob@example.net"]),
            "5.6.3",
        ),
        (
            ("8BITMIME",),
            message(),
            Envelope("alice@example.org", ["bob@example.net"], requiretls=True),
            "5.7.30",
        ),
    ],
)
def test_each_refusal_before_sending_has_its_status(
    offered: tuple[str, ...], msg: Message, envelope: Envelope, status: str
) -> None:
    session, driver = opened([GREETING, ehlo("PIPELINING", *offered)])
    result = driver.run(session.deliver(msg, envelope))
    assert [r.outcome for r in result.recipients] == [Outcome.PERMANENT]
    (refused,) = result.recipients
    assert refused.reply is None
    assert str(refused.enhanced) == status


def test_a_recipient_refused_on_its_own_has_5_6_7_the_others_none() -> None:
    session, driver = opened([GREETING, ehlo("PIPELINING"), OK, OK, GO_AHEAD, QUEUED])
    envelope = Envelope("alice@example.org", ["jöran@example.net", "bob@example.net"])
    result = driver.run(session.deliver(message(), envelope))
    wide, ascii_ = result.recipients
    assert str(wide.enhanced) == "5.6.7"
    assert ascii_.accepted
    assert ascii_.enhanced is None


def test_the_tracker_reports_the_status_in_its_dsn() -> None:
    # A real server (the shipped test server) announcing SIZE 2000; the message is bigger:
    # refused before sending, BOUNCED, and the failure DSN says 5.3.4, not 5.0.0.
    big = Message.build(
        sender="alice@example.org", to=["bob@example.net"], subject="big", text="x" * 5000
    )
    dsn_out = MemoryTransport()
    with (
        SMTPTestServer(max_size=2000) as server,
        SMTPTransport(server.host, server.port, tls=TLS.NONE) as transport,
    ):
        tracker = DeliveryTracker(transport, store=MemoryStore(), dsn_transport=dsn_out)
        tracking_id = tracker.submit(big)
        tracker.run_pending()
        (recipient,) = tracker.status(tracking_id).recipients
        tracker.run_pending()  # sends the queued DSN
    assert recipient.state is State.BOUNCED
    assert recipient.attempts[-1].enhanced == "5.3.4"
    assert server.messages == []
    (report,) = dsn_out.outbox
    assert b"Status: 5.3.4" in report.message.as_bytes()
