"""EHLO again after AUTH, in the dialogue: once a session, only before a message that would
otherwise lose something (its DSN requests dropped, or itself refused for SMTPUTF8, 8BITMIME or
REQUIRETLS), and a refusal keeps what the server offered before (a real server that offers DSN
only after AUTH, Dovecot's submission service, is in tests/transport/test_smtp_dovecot.py)."""

from __future__ import annotations

import base64
import contextlib
import logging

import pytest

from mailrelay.envelope import Envelope, Notify, Recipient, Ret
from mailrelay.errors import ConnectionLost, DeliveryError, ServerProtocolError, SessionRefused
from mailrelay.flow import ServerNotes, Session
from mailrelay.message import Message
from mailrelay.results import Outcome
from tests.test_flow import GO_AHEAD, OK, QUEUED, Driver, ehlo, lines, message, opened

ACCEPTED = lines(235, "2.7.0 Accepted")
BEFORE = ehlo("PIPELINING", "8BITMIME", "AUTH PLAIN", "ENHANCEDSTATUSCODES")
AFTER = ehlo("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "DSN", "SMTPUTF8")
AUTH = {"username": "alice@example.org", "password": "secret", "allow_insecure_auth": True}
EHLO_LINE = b"EHLO client.example.org\r\n"
ALREADY = lines(503, "5.5.1 Already authenticated")
VERBS = frozenset(b"EHLO LHLO AUTH MAIL RCPT DATA RSET QUIT BDAT".split())


def authenticated(
    *turns: bytes, before: bytes = BEFORE, **changes: object
) -> tuple[Session, Driver]:
    return opened([lines(220, "ready"), before, ACCEPTED, *turns], **{**AUTH, **changes})


def with_dsn(*recipients: str) -> Envelope:
    return Envelope(
        "alice@example.org",
        [
            Recipient(r, notify=frozenset({Notify.SUCCESS}))
            for r in recipients or ("bob@example.net",)
        ],
        ret=Ret.HDRS,
        envid="T1",
    )


def plain(*recipients: str) -> Envelope:
    return Envelope("alice@example.org", recipients or ("bob@example.net",))


def commands(driver: Driver) -> list[bytes]:
    """Every command line written, in order (message data left out)."""
    out: list[bytes] = []
    for write in driver.writes:
        for line in write.data.split(b"\r\n"):
            word = line.split(b" ", 1)[0].upper()
            if word in VERBS:
                out.append(line)
    return out


def ehlo_lines(driver: Driver) -> list[bytes]:
    return [c for c in commands(driver) if c.startswith(b"EHLO")]


def test_dsn_asked_for_after_auth_brings_an_ehlo_and_the_parameters() -> None:
    session, driver = authenticated(AFTER, OK, OK, GO_AHEAD, QUEUED)
    result = driver.run(session.deliver(message(), with_dsn()))
    assert result.ok
    sent = commands(driver)
    assert sent[2:] == [
        b"EHLO client.example.org",
        b"MAIL FROM:<alice@example.org> RET=HDRS ENVID=T1",
        b"RCPT TO:<bob@example.net> NOTIFY=SUCCESS",
        b"DATA",
    ]
    assert session.extensions.dsn
    # Alone in flight: the EHLO went in a write of its own.
    assert any(w.data == EHLO_LINE for w in driver.writes)


def test_only_once_a_session() -> None:
    # The second EHLO offers no DSN (and changed nothing: AUTH again, refused: the login
    # stands): the next message does not ask again.
    turns = [BEFORE, ALREADY, OK, OK, GO_AHEAD, QUEUED, OK, OK, GO_AHEAD, QUEUED]
    session, driver = authenticated(*turns)
    for _ in range(2):
        assert driver.run(session.deliver(message(), with_dsn())).ok
    assert ehlo_lines(driver) == [b"EHLO client.example.org"] * 2
    assert all(b"RET=" not in c and b"NOTIFY=" not in c for c in commands(driver))


@pytest.mark.parametrize(
    ("before", "envelope", "msg"),
    [
        # Nothing asked for that is missing.
        (BEFORE, plain(), message()),
        # DSN asked for, and offered already.
        (ehlo("PIPELINING", "AUTH PLAIN", "DSN"), with_dsn(), message()),
    ],
)
def test_no_ehlo_when_nothing_would_be_lost(
    before: bytes, envelope: Envelope, msg: Message
) -> None:
    session, driver = authenticated(OK, OK, GO_AHEAD, QUEUED, before=before)
    assert driver.run(session.deliver(msg, envelope)).ok
    assert ehlo_lines(driver) == [b"EHLO client.example.org"]


def test_never_without_auth() -> None:
    session, driver = opened([lines(220, "ready"), BEFORE, OK, OK, GO_AHEAD, QUEUED])
    assert driver.run(session.deliver(message(), with_dsn())).ok
    assert ehlo_lines(driver) == [b"EHLO client.example.org"]


def test_smtputf8_unlocked_after_auth_sends_the_message() -> None:
    # Refused (PERMANENT, nothing sent) without the second EHLO.
    session, driver = authenticated(AFTER, OK, OK, GO_AHEAD, QUEUED)
    result = driver.run(session.deliver(message(), plain("jöran@example.net")))
    assert result.ok
    assert b"MAIL FROM:<alice@example.org> SMTPUTF8" in commands(driver)


def test_smtputf8_still_missing_after_auth_is_refused_as_before() -> None:
    session, driver = authenticated(BEFORE, ALREADY)
    result = driver.run(session.deliver(message(), plain("jöran@example.net")))
    (only,) = result.recipients
    assert only.outcome is Outcome.PERMANENT
    assert "SMTPUTF8" in (only.reason or "")
    assert not any(c.startswith(b"MAIL") for c in commands(driver))


@pytest.mark.parametrize("code", [503, 500, 502])
def test_a_refused_ehlo_keeps_what_was_offered_before(
    code: int, caplog: pytest.LogCaptureFixture
) -> None:
    # Some servers answer 503 to an EHLO after AUTH: the session goes on without DSN.
    session, driver = authenticated(
        lines(code, "5.5.1 already said hello"), OK, OK, GO_AHEAD, QUEUED
    )
    with caplog.at_level(logging.INFO, logger="mailrelay"):
        result = driver.run(session.deliver(message(), with_dsn()))
    assert result.ok
    assert session.extensions.pipelining
    assert b"MAIL FROM:<alice@example.org>" in commands(driver)
    assert not session.closed
    assert any(f"refused EHLO after AUTH ({code})" in r.getMessage() for r in caplog.records)


def test_421_to_the_ehlo_refuses_with_nothing_sent() -> None:
    session, driver = authenticated(lines(421, "4.3.2 shutting down"))
    with pytest.raises(SessionRefused) as caught:
        driver.run(session.deliver(message(), with_dsn()))
    assert caught.value.is_transient
    assert not any(c.startswith(b"MAIL") for c in commands(driver))
    assert session.closed


def test_a_reply_beyond_the_ehlos_ends_the_session() -> None:
    # A second reply with EHLO's would answer MAIL.
    session, driver = authenticated(AFTER + OK)
    with pytest.raises(ServerProtocolError):
        driver.run(session.deliver(message(), with_dsn()))
    assert not any(c.startswith(b"MAIL") for c in commands(driver))
    assert session.closed


def test_a_batch_asks_once_before_its_first_message() -> None:
    turns = [AFTER] + [OK, OK, GO_AHEAD, QUEUED] * 3
    session, driver = authenticated(*turns)
    items = [(message(), plain()), (message(), with_dsn()), (message(), plain())]
    outcome = driver.run(session.deliver_many(items))
    assert outcome.error is None
    assert all(r is not None and r.ok for r in outcome.results)
    sent = commands(driver)
    ehlos = [i for i, c in enumerate(sent) if c.startswith(b"EHLO")]
    first_mail = next(i for i, c in enumerate(sent) if c.startswith(b"MAIL"))
    assert len(ehlos) == 2
    assert ehlos[1] < first_mail
    assert b"MAIL FROM:<alice@example.org> RET=HDRS ENVID=T1" in sent


def test_a_batch_whose_ehlo_is_answered_by_a_hang_up_sends_nothing() -> None:
    session, driver = authenticated()  # end of file in answer to EHLO
    items = [(message(), with_dsn()), (message(), plain())]
    outcome = driver.run(session.deliver_many(items))
    assert outcome.results == (None, None)
    assert isinstance(outcome.error, ConnectionLost)
    assert not any(c.startswith(b"MAIL") for c in commands(driver))
    assert session.closed


def test_a_batch_with_nothing_missing_asks_nothing() -> None:
    session, driver = authenticated(*([OK, OK, GO_AHEAD, QUEUED] * 2))
    outcome = driver.run(session.deliver_many([(message(), plain()), (message(), plain())]))
    assert all(r is not None and r.ok for r in outcome.results)
    assert ehlo_lines(driver) == [b"EHLO client.example.org"]


# -- a server that may have forgotten the login ------------------------------------------------


def auth_lines(driver: Driver) -> list[bytes]:
    return [c for c in commands(driver) if c.startswith(b"AUTH")]


@pytest.mark.parametrize(
    ("answer", "said"),
    [(ALREADY, "the login stands"), (ACCEPTED, "forgot the login on EHLO after AUTH")],
)
def test_the_same_ehlo_again_brings_auth_again(
    answer: bytes, said: str, caplog: pytest.LogCaptureFixture
) -> None:
    # An EHLO reply identical to the one before login says nothing about the login (some
    # servers forget it on EHLO: MAIL then gets 530); AUTH again tells.
    session, driver = authenticated(BEFORE, answer, OK, OK, GO_AHEAD, QUEUED)
    with caplog.at_level(logging.DEBUG, logger="mailrelay"):
        assert driver.run(session.deliver(message(), with_dsn())).ok
    assert len(auth_lines(driver)) == 2
    assert auth_lines(driver)[0] == auth_lines(driver)[1]
    verbs = [c.split(b" ", 1)[0] for c in commands(driver)]
    assert verbs == [b"EHLO", b"AUTH", b"EHLO", b"AUTH", b"MAIL", b"RCPT", b"DATA"]
    assert any(said in r.getMessage() for r in caplog.records)
    # Credentials never reach the log, the second time either.
    token = base64.b64encode(b"\0alice@example.org\0secret").decode()
    assert not any(token in r.getMessage() or "secret" in r.getMessage() for r in caplog.records)
    assert any("AUTH PLAIN <redacted>" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "after",
    [
        # Changed (DSN now), AUTH still listed: the server tells logged-in clients apart.
        ehlo("PIPELINING", "8BITMIME", "AUTH PLAIN", "ENHANCEDSTATUSCODES", "DSN"),
        # The same, but no AUTH mechanism listed any more.
        ehlo("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"),
    ],
)
def test_a_changed_ehlo_or_one_without_auth_brings_no_auth_again(after: bytes) -> None:
    session, driver = authenticated(after, OK, OK, GO_AHEAD, QUEUED)
    assert driver.run(session.deliver(message(), with_dsn())).ok
    assert len(auth_lines(driver)) == 1


def test_an_unusable_challenge_to_auth_again_ends_the_session_not_the_message() -> None:
    # CRAM-MD5's challenge must be base64: this one is not. The session ends (QUIT); the
    # message was never sent, and that is a transient failure, not the credentials'.
    cram = ehlo("PIPELINING", "AUTH CRAM-MD5")
    challenge = base64.b64encode(b"<1.2@mx.example.net>").decode()
    turns = [
        lines(220, "ready"),
        cram,
        lines(334, challenge),
        ACCEPTED,
        cram,
        lines(334, "not base64!"),
        lines(501, "5.5.2 cancelled"),
        lines(221, "bye"),
    ]
    session, driver = opened(turns, **{**AUTH, "auth_mechanisms": ["CRAM-MD5"]})
    with pytest.raises(ConnectionLost) as caught:
        driver.run(session.deliver(message(), with_dsn()))
    assert caught.value.is_transient
    assert session.closed
    assert not any(c.startswith(b"MAIL") for c in commands(driver))


# -- what later sessions learn (ServerNotes) --------------------------------------------------


@pytest.mark.parametrize(
    ("turns", "keeps_asking"),
    [
        # Brought something (DSN): the next session asks again.
        ([AFTER, OK, OK, GO_AHEAD, QUEUED], True),
        # The same offer as before login (the login stood): nothing to gain next time.
        ([BEFORE, ALREADY, OK, OK, GO_AHEAD, QUEUED], False),
        # Refused.
        ([lines(503, "5.5.1 already said hello"), OK, OK, GO_AHEAD, QUEUED], False),
        # The session ended on it.
        ([lines(421, "4.3.2 going away")], False),
        ([], False),
    ],
)
def test_the_notes_say_whether_to_ask_next_time(turns: list[bytes], keeps_asking: bool) -> None:
    notes = ServerNotes()
    session, driver = authenticated(*turns, notes=notes)
    with contextlib.suppress(DeliveryError):
        driver.run(session.deliver(message(), with_dsn()))
    assert notes.ehlo_after_auth is keeps_asking


def test_a_session_whose_notes_say_no_asks_nothing() -> None:
    notes = ServerNotes(ehlo_after_auth=False)
    session, driver = authenticated(OK, OK, GO_AHEAD, QUEUED, notes=notes)
    assert driver.run(session.deliver(message(), with_dsn())).ok
    assert ehlo_lines(driver) == [b"EHLO client.example.org"]
    assert len(auth_lines(driver)) == 1
