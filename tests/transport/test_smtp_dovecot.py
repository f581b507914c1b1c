"""SMTP transports, both drivers, against Dovecot's submission server (a second real one).

Dovecot (:mod:`tests.peers.dovecot_submission`) authenticates from its own passdb and passes
each message on to a recording relay, so every test compares what mailrelay reported with
what Dovecot answered (recorded by :class:`tests.peers.dovecot.Recorder` where it matters)
and what Dovecot relayed with what mailrelay sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from mailrelay.envelope import Envelope, Notify, Recipient, Ret
from mailrelay.errors import AuthenticationError, DeliveryTimeout
from mailrelay.message import Message
from mailrelay.options import TLS, Timeouts
from mailrelay.results import DeliveryResult, Outcome
from mailrelay.testing.strategies import messages
from mailrelay.tracker import (
    AsyncDeliveryTracker,
    DeliveryTracker,
    MemoryStore,
    MessageRecord,
    State,
)
from mailrelay.transport import AsyncSMTPTransport, PoolSettings, SMTPTransport
from tests.peers.dovecot import Recorder
from tests.peers.dovecot_submission import (
    DOMAIN,
    INSECURE_SOURCE,
    MAX_SIZE,
    MECHANISMS,
    DovecotSubmission,
    strip_received,
)
from tests.transport.helpers import FLAVOURS, Flavour, send_many_with, send_with

pytestmark = pytest.mark.parametrize("flavour", FLAVOURS)

ALICE = f"alice@{DOMAIN}"
RCPT = "someone@elsewhere.mailrelay.test"


def login(dovecot: DovecotSubmission, user: str = ALICE, **extra: Any) -> dict[str, Any]:
    """Transport arguments for ``user`` with the right password, STARTTLS port."""
    fields: dict[str, Any] = {
        "username": user,
        "password": dovecot.users[user],
        "timeouts": Timeouts.all(15),
        **extra,
    }
    return dovecot.transport_args(**fields)


def unique_message(**kwargs: Any) -> Message:
    """A message from alice with a subject no other test uses."""
    fields: dict[str, Any] = {
        "sender": ALICE,
        "to": [RCPT],
        "subject": f"test {uuid.uuid4().hex}",
        "text": "Hello,\n.a line starting with a dot\n\nBye.\n",
    }
    fields.update(kwargs)
    return Message.build(**fields)


@contextlib.contextmanager
def recording(dovecot: DovecotSubmission) -> Iterator[Recorder]:
    """A :class:`Recorder` in front of Dovecot's STARTTLS port (it relays plain text)."""
    recorder = Recorder((dovecot.host, dovecot.port))
    try:
        yield recorder
    finally:
        recorder.close()


def recorded(dovecot: DovecotSubmission, recorder: Recorder, **extra: Any) -> dict[str, Any]:
    """Arguments to reach Dovecot through ``recorder`` in plain text: Dovecot counts the
    recorder's loopback connection as secured, so AUTH is offered without TLS."""
    return login(
        dovecot,
        host=dovecot.host,
        port=recorder.port,
        tls=TLS.NONE,
        allow_insecure_auth=True,
        **extra,
    )


_VERBS = frozenset(
    {b"EHLO", b"AUTH", b"MAIL", b"RCPT", b"DATA", b"BDAT", b"RSET", b"QUIT", b"NOOP"}
)


def client_lines(recorder: Recorder) -> list[bytes]:
    """The command lines the client sent, in order (the tests' messages have no line
    starting with a command's verb)."""
    lines = b"".join(bytes(sent) for sent in recorder.client_bytes).split(b"\r\n")
    return [line for line in lines if verb(line) in _VERBS]


def verb(line: bytes) -> bytes:
    """The command verb of ``line``, upper-cased."""
    return line.split(b" ")[0].split(b":")[0].upper()


def client_verbs(recorder: Recorder) -> list[bytes]:
    """The verbs of the commands the client sent, in order."""
    return [verb(line) for line in client_lines(recorder)]


def wire(message: Message) -> bytes:
    """What the server receives of ``message``: its bytes, ending in a CRLF (the client
    adds one when the message has none: RFC 5321 §4.1.1.4)."""
    sent = message.as_bytes()
    return sent if sent.endswith(b"\r\n") else sent + b"\r\n"


def assert_relayed_intact(dovecot: DovecotSubmission, message: Message) -> bytes:
    """The single relayed copy is ``message``'s wire bytes after Dovecot's Received field;
    returns that field."""
    (relayed,) = dovecot.relay.messages
    body = strip_received(relayed.content)
    assert body == wire(message)
    return relayed.content[: len(relayed.content) - len(body)]


# -- authentication --------------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", [*MECHANISMS, None])
def test_starttls_then_auth_each_mechanism(
    flavour: Flavour,
    mechanism: str | None,
    dovecot_submission_clean: DovecotSubmission,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="mailrelay")
    dovecot = dovecot_submission_clean
    message = unique_message()
    mechanisms = None if mechanism is None else [mechanism]
    result = send_with(flavour, message, **login(dovecot, auth_mechanisms=mechanisms))
    assert result.ok, result
    assert [r.reply and r.reply.code for r in result.recipients] == [250]
    received = assert_relayed_intact(dovecot, message)
    assert b"with ESMTPSA" in received  # TLS and authenticated (RFC 3848)
    (relayed,) = dovecot.relay.messages
    assert relayed.mail_from == ALICE
    assert relayed.rcpt_tos == (RCPT,)
    # The strongest mechanism in common is CRAM-MD5 (the only one that hides the password).
    used = mechanism or "CRAM-MD5"
    # The wire trace (inside TLS) shows the one AUTH sent; Dovecot accepted it (235).
    assert re.findall(r">>> AUTH [A-Z0-9-]+", caplog.text) == [f">>> AUTH {used}"]
    assert "<<< 235 2.7.0 Logged in." in caplog.text
    assert dovecot.users[ALICE] not in caplog.text


def test_implicit_tls(flavour: Flavour, dovecot_submission_clean: DovecotSubmission) -> None:
    dovecot = dovecot_submission_clean
    message = unique_message()
    result = send_with(flavour, message, **login(dovecot, port=dovecot.tls_port, tls=TLS.IMPLICIT))
    assert result.ok, result
    assert b"with ESMTPSA" in assert_relayed_intact(dovecot, message)


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_wrong_password_is_a_permanent_authentication_error(
    flavour: Flavour, mechanism: str, dovecot_submission_clean: DovecotSubmission
) -> None:
    dovecot = dovecot_submission_clean
    # Dovecot delays every AUTH from an address that failed before (its auth penalty,
    # 2 s doubling to 15 s): each case fails from an address of its own.
    source = f"127.0.{10 + MECHANISMS.index(mechanism)}.{1 + FLAVOURS.index(flavour)}"
    with pytest.raises(AuthenticationError) as caught:
        send_with(
            flavour,
            unique_message(),
            **login(dovecot, password="wrong", auth_mechanisms=[mechanism], source_address=source),
        )
    error = caught.value
    assert error.reply is not None
    assert (error.reply.code, str(error.reply.enhanced)) == (535, "5.7.8")
    assert "Authentication failed" in error.reply.text
    assert not error.is_transient  # the same password will fail again
    assert dovecot.relay.messages == []


def test_plain_text_auth_refused_by_mailrelay_without_allow_insecure_auth(
    flavour: Flavour, dovecot_submission_clean: DovecotSubmission
) -> None:
    dovecot = dovecot_submission_clean
    with (
        recording(dovecot) as recorder,
        pytest.raises(AuthenticationError, match="unencrypted") as caught,
    ):
        send_with(
            flavour,
            unique_message(),
            **login(dovecot, host=dovecot.host, port=recorder.port, tls=TLS.NONE),
        )
    assert not caught.value.is_transient
    # Dovecot offered AUTH in plain text (it counts loopback as secured); nothing was sent.
    assert "250-AUTH PLAIN LOGIN CRAM-MD5" in recorder.server_lines()
    assert client_verbs(recorder) == [b"EHLO", b"QUIT"]
    assert dovecot.relay.messages == []


def test_plain_text_auth_over_loopback_with_allow_insecure_auth(
    flavour: Flavour, dovecot_submission_clean: DovecotSubmission
) -> None:
    # From 127.0.0.1 to 127.0.0.1 Dovecot counts the connection as secured and offers AUTH.
    dovecot = dovecot_submission_clean
    message = unique_message()
    result = send_with(flavour, message, **login(dovecot, tls=TLS.NONE, allow_insecure_auth=True))
    assert result.ok, result
    received = assert_relayed_intact(dovecot, message)
    assert b"with ESMTPA" in received  # authenticated, no TLS


def test_no_auth_offered_before_tls_to_an_unsecured_client(
    flavour: Flavour, dovecot_submission_clean: DovecotSubmission
) -> None:
    # From 127.0.0.2 Dovecot (ssl = required) offers no AUTH in plain text at all.
    dovecot = dovecot_submission_clean
    with pytest.raises(AuthenticationError, match="no AUTH at all") as caught:
        send_with(
            flavour,
            unique_message(),
            **login(
                dovecot, tls=TLS.NONE, allow_insecure_auth=True, source_address=INSECURE_SOURCE
            ),
        )
    assert not caught.value.is_transient
    assert dovecot.relay.messages == []


def test_starttls_from_an_unsecured_client_then_auth(
    flavour: Flavour, dovecot_submission_clean: DovecotSubmission
) -> None:
    dovecot = dovecot_submission_clean
    message = unique_message()
    result = send_with(flavour, message, **login(dovecot, source_address=INSECURE_SOURCE))
    assert result.ok, result
    received = assert_relayed_intact(dovecot, message)
    assert b"[127.0.0.2]" in received
    assert b"with ESMTPSA" in received


# -- the transaction -------------------------------------------------------------------------


def test_several_recipients_and_a_refused_one(
    flavour: Flavour, dovecot_submission_clean: DovecotSubmission
) -> None:
    dovecot = dovecot_submission_clean
    message = unique_message()
    targets = (
        "one@elsewhere.mailrelay.test",
        "reject@elsewhere.mailrelay.test",
        "tempfail@elsewhere.mailrelay.test",
        "two@elsewhere.mailrelay.test",
    )
    with recording(dovecot) as recorder:
        result = send_with(
            flavour, message, Envelope(ALICE, targets), **recorded(dovecot, recorder)
        )
    outcomes = {str(r.address): r.outcome for r in result.recipients}
    assert outcomes == {
        targets[0]: Outcome.ACCEPTED,
        targets[1]: Outcome.PERMANENT,
        targets[2]: Outcome.TRANSIENT,
        targets[3]: Outcome.ACCEPTED,
    }
    # Each RCPT reply mailrelay reports is the very line Dovecot sent.
    lines = recorder.server_lines()
    for r in result.recipients:
        if r.outcome is not Outcome.ACCEPTED:
            assert r.reply is not None
            assert f"{r.reply.code} {r.reply.text}" in lines, (r.reply, lines)
    # Dovecot puts its own enhanced code first and keeps the relay's in the text: the one
    # mailrelay reports is Dovecot's (RFC 3463 §2: the code follows the reply code).
    refused = {str(r.address): r.reply for r in result.recipients if r.reply is not None}
    assert [str(refused[targets[1]]), str(refused[targets[2]])] == [
        f"550 5.0.0 <{targets[1]}> 5.1.1 No such user (test)",
        f"450 4.0.0 <{targets[2]}> 4.2.1 Mailbox temporarily unavailable (test)",
    ]
    assert [str(refused[t].enhanced) for t in targets[1:3]] == ["5.0.0", "4.0.0"]
    (relayed,) = dovecot.relay.messages
    assert relayed.rcpt_tos == (targets[0], targets[3])
    assert strip_received(relayed.content) == message.as_bytes()


def test_send_many_over_one_connection(
    flavour: Flavour, dovecot_submission_clean: DovecotSubmission
) -> None:
    # Without PIPELINING across messages (see the next test); the first message's only
    # recipient is refused, so its transaction is left open and RSET closes it.
    dovecot = dovecot_submission_clean
    messages = [
        unique_message(to=["reject@elsewhere.mailrelay.test"]),
        unique_message(),
        unique_message(),
    ]
    with recording(dovecot) as recorder:
        results = send_many_with(
            flavour,
            list(messages),
            **recorded(dovecot, recorder, pipelining=False, pool=PoolSettings(size=1)),
        )
    assert [r.recipients[0].outcome for r in results] == [
        Outcome.PERMANENT,
        Outcome.ACCEPTED,
        Outcome.ACCEPTED,
    ]
    assert len(recorder.client_bytes) == 1  # one connection, one login
    verbs = client_verbs(recorder)
    assert verbs == [
        *(b"EHLO", b"AUTH", b"MAIL", b"RCPT", b"RSET"),
        *(b"MAIL", b"RCPT", b"DATA") * 2,
        b"QUIT",
    ]
    relayed = [strip_received(m.content) for m in dovecot.relay.messages]
    assert relayed == [m.as_bytes() for m in messages[1:]]


# Dovecot 2.3.19's submission process panics (smtp-server-transaction.c line 226, assertion
# pending_rcpt_cmds == 0) when the next message's MAIL/RCPT/DATA follow the end of the data
# in one group, as RFC 2920 §3.1 allows: each message was relayed, but the 250 for each one
# followed by another was never sent, so those came back ConnectionLost (TRANSIENT) and a
# retry sent them twice. mailrelay knows it by its greeting and sends each message of a batch
# alone (MAIL, RCPT and DATA still pipelined within it).
def test_send_many_to_dovecot_sends_each_message_alone(
    flavour: Flavour, dovecot_submission_clean: DovecotSubmission
) -> None:
    dovecot = dovecot_submission_clean
    messages = [unique_message() for _ in range(3)]
    with recording(dovecot) as recorder:
        results = send_many_with(
            flavour,
            list(messages),
            **recorded(dovecot, recorder, pipelining=True, pool=PoolSettings(size=1)),
        )
    assert all(r.ok for r in results), results
    relayed = [strip_received(m.content) for m in dovecot.relay.messages]
    assert relayed == [m.as_bytes() for m in messages]  # each once, in order
    assert len(recorder.server_bytes) == 1  # one connection
    verbs = [verb(line) for line in client_lines(recorder)]
    assert verbs == [b"EHLO", b"AUTH", *(b"MAIL", b"RCPT", b"DATA") * 3, b"QUIT"]


def test_chunking(flavour: Flavour, dovecot_submission_clean: DovecotSubmission) -> None:
    dovecot = dovecot_submission_clean
    message = unique_message(text="many lines\n" * 6000)  # more than one chunk
    with recording(dovecot) as recorder:
        result = send_with(flavour, message, **recorded(dovecot, recorder, chunking=True))
    assert result.ok, result
    sent = b"".join(bytes(b) for b in recorder.client_bytes)
    assert b"\r\nBDAT " in sent
    assert b"\r\nDATA\r\n" not in sent
    assert re.search(rb"BDAT \d+ LAST\r\n", sent)
    assert_relayed_intact(dovecot, message)


def test_eight_bit_mime(flavour: Flavour, dovecot_submission_clean: DovecotSubmission) -> None:
    dovecot = dovecot_submission_clean
    message = Message.from_bytes(
        f"From: {ALICE}\r\nTo: {RCPT}\r\nSubject: 8 bit {uuid.uuid4().hex}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\nGrüße aus Köln, 8 bit wie geschrieben.\r\n".encode()
    )
    assert message.needs_8bitmime
    result = send_with(flavour, message, **login(dovecot))
    assert result.ok, result
    assert_relayed_intact(dovecot, message)
    (relayed,) = dovecot.relay.messages
    assert "BODY=8BITMIME" in relayed.mail.upper().split()


def test_smtputf8_not_offered_refused_before_sending(
    flavour: Flavour, dovecot_submission_clean: DovecotSubmission
) -> None:
    dovecot = dovecot_submission_clean
    message = unique_message(to=["jürgen@elsewhere.mailrelay.test"])
    assert message.needs_smtputf8
    with recording(dovecot) as recorder:
        result = send_with(flavour, message, **recorded(dovecot, recorder))
    (only,) = result.recipients
    assert only.outcome is Outcome.PERMANENT
    assert only.reason is not None
    assert "SMTPUTF8" in only.reason
    assert b"MAIL" not in client_verbs(recorder)
    assert dovecot.relay.messages == []


def test_size_parameter_and_a_message_over_size(
    flavour: Flavour, dovecot_submission_clean: DovecotSubmission
) -> None:
    dovecot = dovecot_submission_clean
    small = unique_message()
    big = unique_message(text="x" * 70 + "\n" * 1 + ("y" * 70 + "\n") * (MAX_SIZE // 71))
    assert big.size > MAX_SIZE
    with recording(dovecot) as recorder:
        results = send_many_with(flavour, [small, big], **recorded(dovecot, recorder))
    assert results[0].ok
    (refused,) = results[1].recipients
    assert refused.outcome is Outcome.PERMANENT
    assert refused.reason is not None
    assert "SIZE" in refused.reason
    mails = [line for line in client_lines(recorder) if verb(line) == b"MAIL"]
    assert mails == [f"MAIL FROM:<{ALICE}> SIZE={small.size}".encode()]
    assert f"SIZE {MAX_SIZE}" in " ".join(recorder.server_lines())
    assert [strip_received(m.content) for m in dovecot.relay.messages] == [small.as_bytes()]


def test_dsn_parameters_relayed(
    flavour: Flavour, dovecot_submission_clean: DovecotSubmission
) -> None:
    dovecot = dovecot_submission_clean
    message = unique_message()
    envelope = Envelope(
        ALICE,
        [Recipient(RCPT, notify=frozenset({Notify.SUCCESS, Notify.FAILURE}))],
        ret=Ret.HDRS,
        envid="QQ314159",
    )
    result = send_with(flavour, message, envelope, **login(dovecot))
    assert result.ok, result
    (relayed,) = dovecot.relay.messages
    assert strip_received(relayed.content) == message.as_bytes()
    assert "RET=HDRS" in relayed.mail.split()
    assert "ENVID=QQ314159" in relayed.mail.split()
    (rcpt,) = relayed.rcpts
    assert "NOTIFY=SUCCESS,FAILURE" in rcpt.split()


def ehlo_replies(server_lines: list[str]) -> list[list[str]]:
    """Each EHLO reply the server sent, as its lines."""
    replies: list[list[str]] = []
    current: list[str] | None = None
    for line in server_lines:
        if current is None and line.startswith("250-submit.mailrelay.test"):
            current = []
        if current is not None:
            current.append(line)
            if line.startswith("250 "):
                replies.append(current)
                current = None
    return replies


# Dovecot's submission service offers DSN only in the EHLO after AUTH (it learns its relay's
# extensions at login); its pre-login EHLO lacks it. mailrelay asks again after AUTH, once,
# before the first message that would otherwise lose something: its DSN requests here.
def test_dsn_offered_only_after_auth_is_asked_for_again(
    flavour: Flavour, dovecot_submission_clean: DovecotSubmission
) -> None:
    dovecot = dovecot_submission_clean
    envelope = Envelope(ALICE, [Recipient(RCPT, notify=frozenset({Notify.NEVER}))], ret=Ret.HDRS)
    with recording(dovecot) as recorder:
        result = send_with(flavour, unique_message(), envelope, **recorded(dovecot, recorder))
    assert result.ok, result
    before, after = ehlo_replies(recorder.server_lines())
    assert "250-CHUNKING" in before
    assert not any("DSN" in line for line in before)
    assert "250-DSN" in after
    verbs = [verb(line) for line in client_lines(recorder)]
    assert verbs == [b"EHLO", b"AUTH", b"EHLO", b"MAIL", b"RCPT", b"DATA", b"QUIT"]
    (mail,) = [line for line in client_lines(recorder) if verb(line) == b"MAIL"]
    (rcpt,) = [line for line in client_lines(recorder) if verb(line) == b"RCPT"]
    assert b"RET=HDRS" in mail.split()
    assert b"NOTIFY=NEVER" in rcpt.split()
    (relayed,) = dovecot.relay.messages
    assert "RET=HDRS" in relayed.mail.split()
    assert "NOTIFY=NEVER" in relayed.rcpts[0].split()


def test_every_session_asks_again_when_it_brought_something(
    flavour: Flavour, dovecot_submission_clean: DovecotSubmission
) -> None:
    # The EHLO after AUTH brought DSN: the transport's next session (a new connection, one
    # message each) asks again, and both messages carry their DSN parameters.
    dovecot = dovecot_submission_clean
    envelope = Envelope(ALICE, [Recipient(RCPT, notify=frozenset({Notify.NEVER}))], ret=Ret.HDRS)
    items = [(unique_message(), envelope), (unique_message(), envelope)]
    pool = PoolSettings(size=1, max_messages=1)
    with recording(dovecot) as recorder:
        args = recorded(dovecot, recorder, pool=pool)
        if flavour == "sync":
            with SMTPTransport(**args) as transport:
                results = [transport.send(*item) for item in items]
        else:

            async def main() -> list[DeliveryResult]:
                async with AsyncSMTPTransport(**args) as transport:
                    return [await transport.asend(*item) for item in items]

            results = asyncio.run(main())
    assert all(r.ok for r in results)
    verbs = [verb(line) for line in client_lines(recorder)]
    once = [b"EHLO", b"AUTH", b"EHLO", b"MAIL", b"RCPT", b"DATA", b"QUIT"]
    assert verbs == once * 2
    assert all("RET=HDRS" in relayed.mail.split() for relayed in dovecot.relay.messages)
    assert len(dovecot.relay.messages) == 2


def test_the_trackers_dsn_request_reaches_the_relay(
    flavour: Flavour, dovecot_submission_clean: DovecotSubmission
) -> None:
    # The mission's confirmation path through a real submission server: a tracker asking
    # for DSNs has them asked of the relay behind Dovecot (ENVID = the tracking id, so the
    # report that comes back correlates), which needs the EHLO after AUTH.
    dovecot = dovecot_submission_clean
    message = unique_message()
    if flavour == "sync":
        with SMTPTransport(**login(dovecot)) as transport:
            tracker = DeliveryTracker(transport, store=MemoryStore(), request_dsn=True)
            tracking_id = tracker.submit(message)
            tracker.run_pending()
            record = tracker.status(tracking_id)
    else:

        async def main() -> tuple[str, MessageRecord]:
            async with AsyncSMTPTransport(**login(dovecot)) as transport:
                tracker = AsyncDeliveryTracker(transport, store=MemoryStore(), request_dsn=True)
                tracking_id = await tracker.asubmit(message)
                await tracker.arun_pending()
                record = await tracker.astatus(tracking_id)
                await tracker.aclose()
                return tracking_id, record

        tracking_id, record = asyncio.run(main())
    (recipient,) = record.recipients
    assert recipient.state is State.DELIVERED
    (relayed,) = dovecot.relay.messages
    assert f"ENVID={tracking_id}" in relayed.mail.split()
    assert any(word.startswith("RET=") for word in relayed.mail.split())
    (rcpt,) = relayed.rcpts
    assert any(word.startswith("NOTIFY=") for word in rcpt.split())


def test_no_second_ehlo_when_nothing_is_missing(
    flavour: Flavour, dovecot_submission_clean: DovecotSubmission
) -> None:
    # A message that asks for nothing the first EHLO lacked costs no extra round trip.
    dovecot = dovecot_submission_clean
    with recording(dovecot) as recorder:
        result = send_with(flavour, unique_message(), **recorded(dovecot, recorder))
    assert result.ok, result
    verbs = [verb(line) for line in client_lines(recorder)]
    assert verbs == [b"EHLO", b"AUTH", b"MAIL", b"RCPT", b"DATA", b"QUIT"]
    assert len(ehlo_replies(recorder.server_lines())) == 1


# Found here: AUTH replies were read under the phase name "greeting", so this timeout said
# phase 'greeting'; AUTH has its own phase now, under the greeting limit.
def test_a_slow_auth_reply_is_reported_as_such(
    flavour: Flavour, dovecot_submission_clean: DovecotSubmission
) -> None:
    # Dovecot's auth penalty: after one failed AUTH from an address, the next AUTH from it
    # is answered only after 2 s. Greeting, EHLO and STARTTLS come at once.
    dovecot = dovecot_submission_clean
    source = f"127.0.20.{1 + FLAVOURS.index(flavour)}"
    with pytest.raises(AuthenticationError):
        send_with(flavour, unique_message(), **login(dovecot, password="no", source_address=source))
    with pytest.raises(DeliveryTimeout) as caught:
        send_with(
            flavour,
            unique_message(),
            **login(dovecot, source_address=source, timeouts=Timeouts.all(1)),
        )
    said = str(caught.value)
    assert "greeting" not in said, said
    assert "auth" in said.lower(), said


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(message=messages(eight_bit=True, utf8_headers=False, max_size=MAX_SIZE // 2))
def test_any_message_is_relayed_byte_for_byte(
    flavour: Flavour, dovecot_submission: DovecotSubmission, message: Message
) -> None:
    # The wire edge cases (dot lines, bare CR/LF, 998-octet lines, 8-bit bodies, Bcc) reach
    # the relay exactly as mailrelay put them on the wire, after Dovecot's Received field.
    dovecot = dovecot_submission
    dovecot.relay.clear()
    result = send_with(flavour, message, Envelope(ALICE, [RCPT]), **login(dovecot))
    assert result.ok, result
    assert_relayed_intact(dovecot, message)
