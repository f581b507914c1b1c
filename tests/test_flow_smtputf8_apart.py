"""Recipients whose addresses alone need SMTPUTF8, to a server without it: each is refused
before MAIL (RFC 6531 §3.2), and the ASCII recipients of an ASCII message still go (a real
server without SMTPUTF8, Dovecot LMTP, is in tests/transport/test_lmtp_dovecot.py)."""

from __future__ import annotations

import pytest

from mailrelay.envelope import Envelope
from mailrelay.errors import ConnectionLost
from mailrelay.flow.bookkeeping import unsent_positions
from mailrelay.message import Message
from mailrelay.results import Outcome
from tests.test_flow import (
    GO_AHEAD,
    GREETING,
    OK,
    QUEUED,
    Driver,
    ehlo,
    lines,
    message,
    opened,
    outcomes,
)

NO_UTF8 = ehlo("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES")
UTF8 = ehlo("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8")


def rcpts(driver: Driver) -> list[bytes]:
    return [line for line in driver.sent.split(b"\r\n") if line.startswith(b"RCPT")]


def mails(driver: Driver) -> list[bytes]:
    return [line for line in driver.sent.split(b"\r\n") if line.startswith(b"MAIL")]


def mixed(sender: str = "alice@example.org") -> Envelope:
    return Envelope(sender, ["bob@example.net", "jöran@example.net", "carol@example.net"])


def test_the_others_go_and_keep_their_places() -> None:
    session, driver = opened([GREETING, NO_UTF8, OK, OK, OK, GO_AHEAD, QUEUED])
    result = driver.run(session.deliver(message(), mixed()))
    assert outcomes(result) == [
        ("bob@example.net", Outcome.ACCEPTED, 250),
        ("jöran@example.net", Outcome.PERMANENT, None),
        ("carol@example.net", Outcome.ACCEPTED, 250),
    ]
    assert "SMTPUTF8" in (result.recipients[1].reason or "")
    assert result.message_id == "m1@example.org"
    assert rcpts(driver) == [b"RCPT TO:<bob@example.net>", b"RCPT TO:<carol@example.net>"]
    assert mails(driver) == [b"MAIL FROM:<alice@example.org>"]


@pytest.mark.parametrize(
    ("msg", "envelope"),
    [
        # The message itself needs SMTPUTF8 (a UTF-8 header field): nothing can go.
        (message(Comments="Jöran"), Envelope("alice@example.org", ["bob@example.net"])),
        # So does a UTF-8 sender.
        (message(), mixed("jöran@example.org")),
        # Every recipient needs it.
        (message(), Envelope("alice@example.org", ["jöran@example.net", "åsa@example.net"])),
    ],
)
def test_nothing_goes_when_all_would_need_it(msg: Message, envelope: Envelope) -> None:
    session, driver = opened([GREETING, NO_UTF8])
    result = driver.run(session.deliver(msg, envelope))
    assert {r.outcome for r in result.recipients} == {Outcome.PERMANENT}
    assert all("SMTPUTF8" in (r.reason or "") for r in result.recipients)
    assert mails(driver) == []


def test_a_server_with_smtputf8_takes_them_all() -> None:
    session, driver = opened([GREETING, UTF8, OK, OK, OK, OK, GO_AHEAD, QUEUED])
    result = driver.run(session.deliver(message(), mixed()))
    assert result.ok
    assert mails(driver) == [b"MAIL FROM:<alice@example.org> SMTPUTF8"]
    assert len(rcpts(driver)) == 3


def test_an_error_before_any_answer_still_raises() -> None:
    # A pool takes the raise for "nothing was sent": it tries a fresh connection.
    session, driver = opened([GREETING, NO_UTF8])  # then end of file
    with pytest.raises(ConnectionLost):
        driver.run(session.deliver(message(), mixed()))


def test_in_a_batch_that_message_goes_alone_after_the_others() -> None:
    turns = [GREETING, NO_UTF8] + [OK, OK, GO_AHEAD, QUEUED] * 2 + [OK, OK, OK, GO_AHEAD, QUEUED]
    session, driver = opened(turns)
    plain = Envelope("alice@example.org", ["dan@example.net"])
    outcome = driver.run(
        session.deliver_many([(message(), plain), (message(), mixed()), (message(), plain)])
    )
    assert outcome.error is None
    first, middle, last = outcome.results
    assert first is not None
    assert first.ok
    assert last is not None
    assert last.ok
    assert middle is not None
    assert [r.outcome for r in middle.recipients] == [
        Outcome.ACCEPTED,
        Outcome.PERMANENT,
        Outcome.ACCEPTED,
    ]
    assert rcpts(driver) == [
        b"RCPT TO:<dan@example.net>",
        b"RCPT TO:<dan@example.net>",
        b"RCPT TO:<bob@example.net>",
        b"RCPT TO:<carol@example.net>",
    ]


def test_in_a_batch_that_ends_first_the_others_are_left_unsent() -> None:
    # The session ends (421) after the pipelined messages: the message whose UTF-8
    # recipient was refused has its others TRANSIENT, never taken (their MAIL got the
    # 421), for another connection to take (unsent_positions), and the UTF-8 one keeps
    # its refusal.
    closing = lines(421, "4.3.2 closing")
    turns = [GREETING, NO_UTF8, OK, OK, GO_AHEAD, QUEUED, closing]
    session, driver = opened(turns)
    plain = Envelope("alice@example.org", ["dan@example.net"])
    outcome = driver.run(session.deliver_many([(message(), mixed()), (message(), plain)]))
    assert outcome.error is not None
    middle, last = outcome.results
    assert last is not None
    assert last.ok
    assert middle is not None
    assert [r.outcome for r in middle.recipients] == [
        Outcome.TRANSIENT,
        Outcome.PERMANENT,
        Outcome.TRANSIENT,
    ]
    assert unsent_positions(middle) == [0, 2]
    assert session.left_unsent == 1
    assert "jöran".encode() not in driver.sent


def test_with_recipient_limits_too() -> None:
    # LIMITS RCPTMAX=2 (RFC 9422): the two ASCII recipients fit in one transaction (split
    # by the limit first, the UTF-8 one would have taken bob down with it).
    limited = ehlo("PIPELINING", "LIMITS RCPTMAX=2")
    session, driver = opened([GREETING, limited, OK, OK, OK, GO_AHEAD, QUEUED])
    outcome = driver.run(session.deliver_many([(message(), mixed())]))
    (result,) = outcome.results
    assert result is not None
    assert [r.outcome for r in result.recipients] == [
        Outcome.ACCEPTED,
        Outcome.PERMANENT,
        Outcome.ACCEPTED,
    ]
    assert rcpts(driver) == [b"RCPT TO:<bob@example.net>", b"RCPT TO:<carol@example.net>"]
    assert len(mails(driver)) == 1
