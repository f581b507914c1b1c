"""A batch to Dovecot's submission service (known by its greeting) sends each message alone:
Dovecot 2.3.19 crashes when the next message's commands follow the end of the data in one
group (tests/transport/test_smtp_dovecot.py has the real server)."""

from __future__ import annotations

import pytest

from mailrelay.flow import Write
from tests.test_flow import GO_AHEAD, OK, QUEUED, ehlo, envelope, lines, message, opened

PIPE = ehlo("PIPELINING", "8BITMIME")


def groups(writes: list[Write]) -> list[bytes]:
    return [w.data for w in writes]


@pytest.mark.parametrize(
    ("greeting", "alone"),
    [
        (lines(220, "submit.example.org Dovecot (Debian) ready."), True),
        (lines(220, "mx.example.net ESMTP Postfix"), False),
    ],
)
@pytest.mark.parametrize("burl", [False, True])
def test_each_message_alone_only_for_dovecot(greeting: bytes, alone: bool, burl: bool) -> None:
    # Known by its greeting, or (greeting changed) by the BURL it offers.
    hello = ehlo("PIPELINING", "8BITMIME", "BURL imap") if burl else PIPE
    alone = alone or burl
    turns = [greeting, hello] + [OK, OK, GO_AHEAD, QUEUED] * 3
    session, driver = opened(turns)
    items = [(message(), envelope()) for _ in range(3)]
    outcome = driver.run(session.deliver_many(items))
    assert outcome.error is None
    assert all(r is not None and r.ok for r in outcome.results)
    data = groups(driver.writes)
    mail = b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n"
    # Each transaction's MAIL, RCPT and DATA go in one write either way (pipelined within).
    assert sum(1 for w in data if w.startswith(mail) or w.endswith(mail)) == 3
    # Across messages: the next MAIL follows the end of the data in one write, or never.
    across = [w for w in data if b"\r\n.\r\nMAIL FROM:" in w]
    assert bool(across) is not alone


def test_lmtp_is_left_as_it_is() -> None:
    # Only Dovecot's submission service needs it: an LMTP batch to Dovecot goes exactly as
    # to any other LMTP server.
    hello = lines(250, "lmtp.example.org", "PIPELINING", "8BITMIME")
    sent = []
    for greeting in ("lmtp.example.org Dovecot (Debian) ready.", "lmtp.example.org ready."):
        turns = [lines(220, greeting), hello] + [OK, OK, GO_AHEAD, QUEUED] * 2
        session, driver = opened(turns, lmtp=True)
        outcome = driver.run(session.deliver_many([(message(), envelope()) for _ in range(2)]))
        assert all(r is not None and r.ok for r in outcome.results)
        sent.append(groups(driver.writes))
    assert sent[0] == sent[1]
