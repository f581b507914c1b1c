"""Probing UTF-8 addresses (RFC 6531) with a server without SMTPUTF8: never sent, never a
LocalProtocolError (it used to escape after MAIL had gone out); the callout says why."""

from __future__ import annotations

from mailrelay.address import Address
from mailrelay.callout import CalloutStatus, _judge, _Probe
from tests.test_flow import GREETING, OK, ehlo, lines, opened

NO_UTF8 = ehlo("PIPELINING", "8BITMIME")
UTF8 = ehlo("PIPELINING", "8BITMIME", "SMTPUTF8")
ASCII, WIDE = Address.parse("bob@example.net"), Address.parse("jöran@example.net")
SENDER = Address.parse("probe@example.org")


def test_a_utf8_recipient_is_left_unasked() -> None:
    session, driver = opened([GREETING, NO_UTF8, OK, lines(550, "5.1.1 no such user"), OK])
    probe = driver.run(session.probe(SENDER, [WIDE, ASCII]))
    assert probe.mail is not None
    assert probe.mail.is_positive
    assert probe.recipients[0] is None
    assert probe.recipients[1] is not None
    assert probe.recipients[1].code == 550
    assert not probe.ended
    assert "jöran".encode() not in driver.sent
    assert driver.sent.endswith(b"RCPT TO:<bob@example.net>\r\nRSET\r\n")


def test_a_utf8_sender_sends_nothing() -> None:
    session, driver = opened([GREETING, NO_UTF8])
    probe = driver.run(session.probe(Address.parse("jöran@example.org"), [ASCII]))
    assert probe.mail is None
    assert probe.recipients == (None,)
    assert not probe.ended
    assert not session.closed
    assert b"MAIL" not in driver.sent


def test_with_smtputf8_they_are_asked() -> None:
    session, driver = opened([GREETING, UTF8, OK, OK, OK])
    probe = driver.run(session.probe(SENDER, [WIDE]))
    assert probe.recipients[0] is not None
    assert probe.recipients[0].is_positive
    assert "RCPT TO:<jöran@example.net>".encode() in driver.sent


def test_the_callout_says_why() -> None:
    session, driver = opened([GREETING, NO_UTF8, OK, OK, OK])
    probe = driver.run(session.probe(SENDER, [WIDE, ASCII]))
    judged = _judge(
        [WIDE, ASCII], _Probe(mail=probe.mail, rcpts=probe.recipients, decoy=None), "mx"
    )
    assert judged[0].status is CalloutStatus.UNKNOWN
    assert "SMTPUTF8" in judged[0].detail
    assert judged[1].status is CalloutStatus.ACCEPTED
