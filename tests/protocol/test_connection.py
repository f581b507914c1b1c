"""Tests for mailrelay.protocol.connection: conversations with scripted server bytes."""

from __future__ import annotations

import pytest

from mailrelay.address import Address
from mailrelay.errors import LocalProtocolError, RemoteProtocolError
from mailrelay.protocol import (
    NEED_DATA,
    Auth,
    AuthAbort,
    AuthContinue,
    Bdat,
    ClientConnection,
    Command,
    ConnectionClosed,
    Data,
    DataChunk,
    Ehlo,
    EndOfData,
    Event,
    Greeting,
    Helo,
    Lhlo,
    LMTPResponse,
    MailFrom,
    Noop,
    Quit,
    RcptTo,
    Response,
    Rset,
    ServiceClosing,
    StartTLS,
    State,
    Vrfy,
)
from mailrelay.reply import Reply

A = Address.parse("a@example.org")
B = Address.parse("b@example.org")
C = Address.parse("c@example.org")
UTF8 = Address.parse("jörg@example.org")

EHLO_REPLY = b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 CHUNKING\r\n"


def state_of(conn: ClientConnection) -> State:
    """The state, read through a call so that mypy does not narrow it between steps."""
    return conn.state


def pending_of(conn: ClientConnection) -> tuple[Command, ...]:
    """The commands in flight, read through a call (see state_of)."""
    return conn.pending


def drain(conn: ClientConnection) -> list[Event]:
    """Every event ready now (stops at NEED_DATA or ConnectionClosed)."""
    out: list[Event] = []
    for _ in range(1000):
        event = conn.next_event()
        if event is NEED_DATA:
            return out
        out.append(event)
        if isinstance(event, ConnectionClosed):
            return out
    raise AssertionError("too many events")


def reply(conn: ClientConnection, data: bytes) -> list[Event]:
    conn.receive_data(data)
    return drain(conn)


def greeted(*, lmtp: bool = False, ehlo_reply: bytes = EHLO_REPLY) -> ClientConnection:
    conn = ClientConnection(lmtp=lmtp)
    assert reply(conn, b"220 mx.example ESMTP\r\n") == [
        Greeting(reply=Reply(code=220, lines=("mx.example ESMTP",)))
    ]
    conn.send(Lhlo("client.example") if lmtp else Ehlo("client.example"))
    (event,) = reply(conn, ehlo_reply)
    assert isinstance(event, Response)
    assert state_of(conn) is State.READY
    return conn


def codes(events: list[Event]) -> list[int]:
    return [e.reply.code for e in events if not isinstance(e, ConnectionClosed)]


# -- greeting --------------------------------------------------------------------------------


def test_greeting_220() -> None:
    conn = ClientConnection()
    assert state_of(conn) is State.GREETING
    assert conn.next_event() is NEED_DATA
    (event,) = reply(conn, b"220-mx.example\r\n220 ready\r\n")
    assert event == Greeting(reply=Reply(code=220, lines=("mx.example", "ready")))
    assert state_of(conn) is State.CONNECTED


def test_greeting_in_pieces() -> None:
    conn = ClientConnection()
    for piece in (b"2", b"20 r", b"eady\r", b"\n"):
        conn.receive_data(piece)
    assert codes(drain(conn)) == [220]


def test_greeting_554_refuses_session_but_leaves_choice_to_caller() -> None:
    conn = ClientConnection()
    (event,) = reply(conn, b"554 5.7.1 go away\r\n")
    assert isinstance(event, Greeting)
    assert event.reply.is_permanent
    assert state_of(conn) is State.CONNECTED
    assert conn.send(Quit()) == b"QUIT\r\n"  # RFC 5321 §3.1: the client should QUIT
    assert codes(reply(conn, b"221 bye\r\n")) == [221]


def test_greeting_421_closes() -> None:
    conn = ClientConnection()
    (event,) = reply(conn, b"421 4.3.2 shutting down\r\n")
    assert isinstance(event, Greeting)
    assert state_of(conn) is State.CLOSING
    with pytest.raises(LocalProtocolError):
        conn.send(Ehlo("client.example"))


def test_no_command_before_greeting() -> None:
    conn = ClientConnection()
    with pytest.raises(LocalProtocolError, match="GREETING"):
        conn.send(Ehlo("client.example"))
    assert state_of(conn) is State.ERROR


@pytest.mark.parametrize("extra", [b"250 surprise\r\n", b"550 5.0.0 x\n", b"xyz\r\n"])
def test_data_when_no_reply_is_expected_is_remote_error(extra: bytes) -> None:
    conn = ClientConnection()
    conn.receive_data(b"220 hi\r\n" + extra[:3])
    assert isinstance(conn.next_event(), Greeting)
    assert conn.next_event() is NEED_DATA  # judged once the line is complete
    conn.receive_data(extra[3:])
    with pytest.raises(RemoteProtocolError, match=r"no command awaits|malformed"):
        conn.next_event()
    assert state_of(conn) is State.ERROR


def test_extra_reply_after_the_last_expected_one_is_remote_error() -> None:
    conn = greeted()
    conn.send(Noop())
    conn.receive_data(b"250 ok\r\n250 extra\r\n")
    assert codes([conn.next_event()]) == [250]  # type: ignore[list-item]
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


# -- hello and extensions --------------------------------------------------------------------


def test_ehlo_sets_extensions() -> None:
    conn = greeted()
    assert conn.extensions is not None
    assert conn.extensions.pipelining
    assert conn.extensions.size == 1000
    assert conn.extensions.chunking


def test_refused_ehlo_then_helo() -> None:
    conn = ClientConnection()
    reply(conn, b"220 hi\r\n")
    conn.send(Ehlo("client.example"))
    (event,) = reply(conn, b"502 5.5.1 what?\r\n")
    assert isinstance(event, Response)
    assert event.reply.code == 502
    assert state_of(conn) is State.CONNECTED
    assert conn.extensions is None
    with pytest.raises(LocalProtocolError):
        ClientConnection().send(MailFrom(A))
    conn.send(Helo("client.example"))
    reply(conn, b"250 hello\r\n")
    assert state_of(conn) is State.READY
    assert conn.extensions is None


def test_mail_before_hello_is_local_error() -> None:
    conn = ClientConnection()
    reply(conn, b"220 hi\r\n")
    with pytest.raises(LocalProtocolError, match="MAIL"):
        conn.send(MailFrom(A))


def test_lmtp_and_smtp_hellos_do_not_mix() -> None:
    smtp = ClientConnection()
    reply(smtp, b"220 hi\r\n")
    with pytest.raises(LocalProtocolError, match="LMTP"):
        smtp.send(Lhlo("client.example"))
    lmtp = ClientConnection(lmtp=True)
    reply(lmtp, b"220 hi\r\n")
    with pytest.raises(LocalProtocolError, match="LHLO"):
        lmtp.send(Ehlo("client.example"))


# -- transactions and pipelining -------------------------------------------------------------


def test_pipelined_transaction_matches_replies_in_order() -> None:
    conn = greeted()
    mail, rcpt_a, rcpt_b, data = MailFrom(A), RcptTo(A), RcptTo(B), Data()
    wire = b"".join(conn.send(c) for c in (mail, rcpt_a, rcpt_b, data))
    assert wire == (
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<a@example.org>\r\n"
        b"RCPT TO:<b@example.org>\r\nDATA\r\n"
    )
    assert pending_of(conn) == (mail, rcpt_a, rcpt_b, data)
    events = reply(conn, b"250 2.1.0 ok\r\n550 5.1.1 no such user\r\n250 2.1.5 ok\r\n354 go\r\n")
    assert [(e.command, e.reply.code) for e in events if isinstance(e, Response)] == [
        (mail, 250),
        (rcpt_a, 550),
        (rcpt_b, 250),
        (data, 354),
    ]
    assert state_of(conn) is State.DATA
    assert pending_of(conn) == ()
    out = conn.send(DataChunk(b"Subject: x\n\n.hidden\n")) + conn.send(EndOfData())
    assert out == b"Subject: x\r\n\r\n..hidden\r\n.\r\n"
    assert state_of(conn) is State.READY
    (event,) = reply(conn, b"250 2.0.0 queued\r\n")
    assert isinstance(event, Response)
    assert isinstance(event.command, EndOfData)


def test_without_pipelining_one_command_at_a_time() -> None:
    conn = greeted(ehlo_reply=b"250-mx.example\r\n250 8BITMIME\r\n")
    conn.send(MailFrom(A))
    with pytest.raises(LocalProtocolError, match="PIPELINING"):
        conn.send(RcptTo(A))
    assert state_of(conn) is State.ERROR


def test_without_pipelining_after_helo() -> None:
    conn = ClientConnection()
    reply(conn, b"220 hi\r\n")
    conn.send(Helo("client.example"))
    reply(conn, b"250 ok\r\n")
    conn.send(MailFrom(A))
    with pytest.raises(LocalProtocolError, match="PIPELINING"):
        conn.send(RcptTo(A))


def test_nothing_may_follow_data_before_its_reply() -> None:
    conn = greeted()
    conn.send(MailFrom(A))
    conn.send(RcptTo(A))
    conn.send(Data())
    with pytest.raises(LocalProtocolError, match="DATA"):
        conn.send(Rset())


@pytest.mark.parametrize(
    "command",
    [StartTLS(), Auth("PLAIN"), Helo("client.example")],
    ids=["starttls", "auth", "helo"],
)
def test_commands_that_never_join_a_pipeline(command: Command) -> None:
    conn = greeted()
    conn.send(Rset())
    with pytest.raises(LocalProtocolError, match="pipelined"):
        conn.send(command)


def test_refused_mail_closes_the_transaction_and_data_is_refused() -> None:
    conn = greeted()
    for command in (MailFrom(A), RcptTo(A), Data()):
        conn.send(command)
    events = reply(conn, b"550 5.7.1 sender refused\r\n503 5.5.1 no MAIL\r\n503 5.5.1 no RCPT\r\n")
    assert codes(events) == [550, 503, 503]
    assert state_of(conn) is State.READY
    assert pending_of(conn) == ()
    conn.send(MailFrom(B))  # a fresh transaction may start


def test_data_354_after_every_rcpt_refused_sends_lone_dot() -> None:
    # RFC 2920 §3.1: if DATA gets 354 anyway, the client sends just the terminator.
    conn = greeted()
    for command in (MailFrom(A), RcptTo(A), Data()):
        conn.send(command)
    assert codes(reply(conn, b"250 ok\r\n550 no\r\n354 go\r\n")) == [250, 550, 354]
    assert state_of(conn) is State.DATA
    assert conn.send(EndOfData()) == b".\r\n"
    assert codes(reply(conn, b"554 no valid recipients\r\n")) == [554]
    assert state_of(conn) is State.READY


def test_data_354_after_mail_refused() -> None:
    conn = greeted()
    for command in (MailFrom(A), RcptTo(A), Data()):
        conn.send(command)
    assert codes(reply(conn, b"550 no\r\n503 no\r\n354 go\r\n")) == [550, 503, 354]
    assert state_of(conn) is State.DATA


def test_late_refusal_of_previous_mail_does_not_close_the_new_transaction() -> None:
    conn = greeted()
    conn.send(MailFrom(A))
    conn.send(Rset())
    conn.send(MailFrom(B))
    conn.send(RcptTo(B))
    assert state_of(conn) is State.MAIL
    assert codes(reply(conn, b"451 later\r\n")) == [451]
    assert state_of(conn) is State.MAIL  # the 451 was about the first MAIL
    assert codes(reply(conn, b"250 reset\r\n451 again\r\n")) == [250, 451]
    assert state_of(conn) is State.READY  # now the current MAIL was refused


def test_rset_ends_transaction() -> None:
    conn = greeted()
    conn.send(MailFrom(A))
    reply(conn, b"250 ok\r\n")
    conn.send(Rset())
    assert state_of(conn) is State.READY
    assert codes(reply(conn, b"250 ok\r\n")) == [250]


def test_vrfy_and_noop() -> None:
    conn = greeted()
    assert conn.send(Vrfy("postmaster")) == b"VRFY postmaster\r\n"
    assert codes(reply(conn, b"252 2.1.5 cannot verify\r\n")) == [252]
    conn.send(Noop())
    assert codes(reply(conn, b"250 ok\r\n")) == [250]
    assert state_of(conn) is State.READY


def test_data_chunk_outside_data_is_local_error() -> None:
    conn = greeted()
    with pytest.raises(LocalProtocolError, match="DATA-CHUNK"):
        conn.send(DataChunk(b"x"))


def test_non_ascii_address_without_smtputf8_is_local_error_on_send() -> None:
    conn = greeted()
    with pytest.raises(LocalProtocolError, match="SMTPUTF8"):
        conn.send(MailFrom(UTF8))
    assert state_of(conn) is State.ERROR


def test_data_streaming_keeps_state_across_chunks() -> None:
    conn = greeted()
    conn.send(MailFrom(A))
    conn.send(RcptTo(A))
    conn.send(Data())
    reply(conn, b"250 ok\r\n250 ok\r\n354 go\r\n")
    chunks = [b"line\r", b"\n.", b"dot\r\n", b".", b"\r\n", b"end"]
    wire = b"".join(conn.send(DataChunk(c)) for c in chunks) + conn.send(EndOfData())
    assert wire == b"line\r\n..dot\r\n..\r\nend\r\n.\r\n"


def test_second_message_gets_a_fresh_stuffer() -> None:
    conn = greeted()
    for body in (b"no newline", b".starts with dot"):
        for command in (MailFrom(A), RcptTo(A), Data()):
            conn.send(command)
        reply(conn, b"250 ok\r\n250 ok\r\n354 go\r\n")
        wire = conn.send(DataChunk(body)) + conn.send(EndOfData())
        assert wire.endswith(b"\r\n.\r\n")
        assert wire.startswith(b"..") == body.startswith(b".")
        reply(conn, b"250 queued\r\n")


def test_end_of_data_pipelined_with_next_mail() -> None:
    # RFC 2920 §3.1: message content may start a group: "." and the next MAIL together.
    conn = greeted()
    for command in (MailFrom(A), RcptTo(A), Data()):
        conn.send(command)
    reply(conn, b"250 ok\r\n250 ok\r\n354 go\r\n")
    conn.send(DataChunk(b"x\r\n"))
    end, mail = EndOfData(), MailFrom(B)
    conn.send(end)
    conn.send(mail)
    events = reply(conn, b"250 queued\r\n250 ok\r\n")
    assert [e.command for e in events if isinstance(e, Response)] == [end, mail]
    assert state_of(conn) is State.MAIL


def test_end_of_data_and_next_mail_need_pipelining() -> None:
    conn = greeted(ehlo_reply=b"250 mx.example\r\n")
    conn.send(MailFrom(A))
    reply(conn, b"250 ok\r\n")
    conn.send(RcptTo(A))
    reply(conn, b"250 ok\r\n")
    conn.send(Data())
    reply(conn, b"354 go\r\n")
    conn.send(EndOfData())
    with pytest.raises(LocalProtocolError, match="PIPELINING"):
        conn.send(MailFrom(B))


def test_bdat_last_windows_across_messages() -> None:
    # RFC 3030 §4 with RFC 2920: BDAT LAST needs no 354, so several whole messages may be
    # in flight; a refusal in the middle touches only its own transaction.
    conn = greeted()
    sent = []
    for sender in (A, B, C):
        for command in (MailFrom(sender), RcptTo(A), Bdat(b"x\r\n", last=True)):
            conn.send(command)
            sent.append(command)
        assert state_of(conn) is State.READY
    events = reply(
        conn,
        b"250 ok\r\n250 ok\r\n250 queued\r\n"
        b"553 no\r\n503 no\r\n503 no\r\n"
        b"250 ok\r\n250 ok\r\n250 queued\r\n",
    )
    assert [e.command for e in events if isinstance(e, Response)] == sent
    assert codes(events) == [250, 250, 250, 553, 503, 503, 250, 250, 250]
    assert pending_of(conn) == ()
    assert state_of(conn) is State.READY


def test_rset_pipelined_after_a_refused_transaction_and_before_the_next() -> None:
    conn = greeted()
    conn.send(MailFrom(A))
    conn.send(RcptTo(A))
    conn.send(Data())
    assert codes(reply(conn, b"250 ok\r\n550 no\r\n554 no valid recipients\r\n")) == [
        250,
        550,
        554,
    ]
    for command in (Rset(), MailFrom(B), RcptTo(B), Data()):
        conn.send(command)
    events = reply(conn, b"250 reset\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    assert codes(events) == [250, 250, 250, 354]
    assert state_of(conn) is State.DATA


def test_lmtp_end_of_data_pipelined_with_the_next_transaction() -> None:
    conn = greeted(lmtp=True)
    lmtp_transaction(conn)
    end = EndOfData()
    conn.send(end)
    for command in (MailFrom(B), RcptTo(B), Data()):
        conn.send(command)
    events = reply(conn, b"250 a\r\n452 c\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    assert [(e.recipient, e.reply.code) for e in events if isinstance(e, LMTPResponse)] == [
        (A, 250),
        (C, 452),
    ]
    assert codes(events)[2:] == [250, 250, 354]
    assert conn.accepted_recipients == (B,)
    assert state_of(conn) is State.DATA


# -- BDAT --------------------------------------------------------------------------------------


def test_bdat_chunks() -> None:
    conn = greeted()
    conn.send(MailFrom(A))
    conn.send(RcptTo(A))
    assert conn.send(Bdat(b"abc")) == b"BDAT 3\r\nabc"
    assert state_of(conn) is State.BDAT
    with pytest.raises(LocalProtocolError):
        ClientConnection().send(Data())
    assert conn.send(Bdat(b"de", last=True)) == b"BDAT 2 LAST\r\nde"
    assert state_of(conn) is State.READY
    events = reply(conn, b"250 ok\r\n250 ok\r\n250 2.0.0 3 octets\r\n250 2.0.0 queued\r\n")
    assert codes(events) == [250, 250, 250, 250]
    assert state_of(conn) is State.READY


def test_data_after_bdat_is_local_error() -> None:
    conn = greeted()
    conn.send(MailFrom(A))
    reply(conn, b"250 ok\r\n")
    conn.send(Bdat(b"abc"))
    reply(conn, b"250 ok\r\n")
    with pytest.raises(LocalProtocolError, match="DATA"):
        conn.send(Data())


def test_refused_bdat_ends_the_transaction() -> None:
    conn = greeted()
    conn.send(MailFrom(A))
    conn.send(RcptTo(A))
    conn.send(Bdat(b"abc"))
    assert codes(reply(conn, b"250 ok\r\n250 ok\r\n552 too big\r\n")) == [250, 250, 552]
    assert state_of(conn) is State.READY


# -- LMTP --------------------------------------------------------------------------------------


def lmtp_transaction(conn: ClientConnection) -> tuple[RcptTo, RcptTo, RcptTo]:
    rcpts = RcptTo(A), RcptTo(B), RcptTo(C)
    conn.send(MailFrom(A))
    for rcpt in rcpts:
        conn.send(rcpt)
    conn.send(Data())
    events = reply(conn, b"250 ok\r\n250 ok\r\n550 no such user\r\n250 ok\r\n354 go\r\n")
    assert codes(events) == [250, 250, 550, 250, 354]
    assert conn.accepted_recipients == (A, C)
    conn.send(DataChunk(b"body\r\n"))
    return rcpts


def test_lmtp_one_reply_per_accepted_recipient_in_rcpt_order() -> None:
    conn = greeted(lmtp=True)
    lmtp_transaction(conn)
    end = EndOfData()
    conn.send(end)
    events = reply(conn, b"250 2.0.0 delivered to a\r\n452 4.2.2 c is over quota\r\n")
    assert events == [
        LMTPResponse(command=end, recipient=A, reply=Reply.of(250, "2.0.0 delivered to a")),
        LMTPResponse(command=end, recipient=C, reply=Reply.of(452, "4.2.2 c is over quota")),
    ]
    assert pending_of(conn) == ()
    assert state_of(conn) is State.READY


def test_lmtp_replies_arriving_one_by_one() -> None:
    conn = greeted(lmtp=True)
    lmtp_transaction(conn)
    end = EndOfData()
    conn.send(end)
    (first,) = reply(conn, b"250 ok a\r\n")
    assert isinstance(first, LMTPResponse)
    assert first.recipient == A
    assert pending_of(conn) == (end,)  # still owed a reply for C
    (second,) = reply(conn, b"250 ok c\r\n")
    assert isinstance(second, LMTPResponse)
    assert second.recipient == C
    assert pending_of(conn) == ()


def test_lmtp_eof_before_every_final_reply_reports_the_rest() -> None:
    conn = greeted(lmtp=True)
    lmtp_transaction(conn)
    end = EndOfData()
    conn.send(end)
    events = reply(conn, b"250 ok a\r\n")
    assert len(events) == 1
    conn.receive_data(b"")
    (closed,) = drain(conn)
    assert closed == ConnectionClosed(pending=(end,), unanswered=(C,))
    assert state_of(conn) is State.CLOSED


def test_lmtp_eof_before_any_final_reply() -> None:
    conn = greeted(lmtp=True)
    lmtp_transaction(conn)
    conn.send(EndOfData())
    conn.receive_data(b"")
    (closed,) = drain(conn)
    assert isinstance(closed, ConnectionClosed)
    assert closed.unanswered == (A, C)


def test_lmtp_bdat_last_gets_per_recipient_replies() -> None:
    conn = greeted(lmtp=True)
    conn.send(MailFrom(A))
    conn.send(RcptTo(A))
    conn.send(RcptTo(B))
    last = Bdat(b"body\r\n", last=True)
    conn.send(last)
    events = reply(conn, b"250 ok\r\n250 ok\r\n250 ok\r\n250 a done\r\n550 b failed\r\n")
    assert [type(e) for e in events] == [Response, Response, Response, LMTPResponse, LMTPResponse]
    assert [(e.recipient, e.reply.code) for e in events if isinstance(e, LMTPResponse)] == [
        (A, 250),
        (B, 550),
    ]


def test_lmtp_transactions_do_not_share_recipients() -> None:
    conn = greeted(lmtp=True)
    lmtp_transaction(conn)
    conn.send(EndOfData())
    reply(conn, b"250 a\r\n250 c\r\n")
    conn.send(MailFrom(A))
    conn.send(RcptTo(B))
    conn.send(Data())
    reply(conn, b"250 ok\r\n250 ok\r\n354 go\r\n")
    assert conn.accepted_recipients == (B,)
    conn.send(EndOfData())
    (event,) = reply(conn, b"250 b\r\n")
    assert isinstance(event, LMTPResponse)
    assert event.recipient == B


# -- STARTTLS ----------------------------------------------------------------------------------


def test_starttls_then_ehlo_again() -> None:
    conn = greeted(ehlo_reply=b"250-mx.example\r\n250 STARTTLS\r\n")
    assert conn.send(StartTLS()) == b"STARTTLS\r\n"
    (event,) = reply(conn, b"220 2.0.0 go ahead\r\n")
    assert isinstance(event, Response)
    assert event.reply.code == 220
    assert state_of(conn) is State.TLS_PENDING
    assert conn.next_event() is NEED_DATA
    with pytest.raises(LocalProtocolError):
        ClientConnection().tls_established()
    conn.tls_established()
    assert conn.tls
    assert state_of(conn) is State.CONNECTED
    assert conn.extensions is None
    with pytest.raises(LocalProtocolError, match="MAIL"):
        conn.send(MailFrom(A))


def test_starttls_refused_stays_ready() -> None:
    conn = greeted()
    conn.send(StartTLS())
    assert codes(reply(conn, b"454 4.7.0 TLS not available\r\n")) == [454]
    assert state_of(conn) is State.READY


@pytest.mark.parametrize(
    "injected", [b"250 injected\r\n", b"2", b"250-PIPELINING\r\n"], ids=["reply", "byte", "partial"]
)
def test_bytes_before_tls_handshake_are_response_injection(injected: bytes) -> None:
    conn = greeted()
    conn.send(StartTLS())
    conn.receive_data(b"220 go ahead\r\n" + injected)  # the same read as the 220
    (event,) = [conn.next_event()]
    assert isinstance(event, Response)
    assert event.reply.code == 220
    with pytest.raises(RemoteProtocolError, match="injection"):
        conn.tls_established()
    assert state_of(conn) is State.ERROR


def test_injection_detected_by_next_event_too() -> None:
    conn = greeted()
    conn.send(StartTLS())
    reply(conn, b"220 go\r\n")
    conn.receive_data(b"250 later bytes\r\n")
    with pytest.raises(RemoteProtocolError, match="injection"):
        conn.next_event()


def test_tls_established_outside_tls_pending() -> None:
    conn = greeted()
    with pytest.raises(LocalProtocolError, match="TLS_PENDING"):
        conn.tls_established()
    assert state_of(conn) is State.ERROR


# -- AUTH --------------------------------------------------------------------------------------


def test_auth_exchange() -> None:
    conn = greeted()
    assert conn.send(Auth("LOGIN")) == b"AUTH LOGIN\r\n"
    with pytest.raises(LocalProtocolError):
        greeted().send(AuthContinue(b"x"))  # no exchange under way
    assert codes(reply(conn, b"334 VXNlcm5hbWU6\r\n")) == [334]
    assert state_of(conn) is State.AUTH
    assert conn.send(AuthContinue(b"user")) == b"dXNlcg==\r\n"
    assert codes(reply(conn, b"334 UGFzc3dvcmQ6\r\n")) == [334]
    conn.send(AuthContinue(b"pass"))
    assert codes(reply(conn, b"235 2.7.0 ok\r\n")) == [235]
    assert state_of(conn) is State.READY


def test_auth_abort_and_failure() -> None:
    conn = greeted()
    conn.send(Auth("CRAM-MD5"))
    reply(conn, b"334 PDEyMzQ+\r\n")
    with pytest.raises(LocalProtocolError):
        greeted().send(AuthAbort())
    assert conn.send(AuthAbort()) == b"*\r\n"
    assert codes(reply(conn, b"501 5.7.0 cancelled\r\n")) == [501]
    assert state_of(conn) is State.READY
    conn.send(Auth("PLAIN", b"\0u\0p"))
    assert codes(reply(conn, b"535 5.7.8 bad credentials\r\n")) == [535]
    assert state_of(conn) is State.READY


def test_quit_is_not_allowed_mid_auth() -> None:
    conn = greeted()
    conn.send(Auth("LOGIN"))
    reply(conn, b"334 VXNlcm5hbWU6\r\n")
    with pytest.raises(LocalProtocolError):
        conn.send(Quit())


# -- 421, QUIT, EOF ----------------------------------------------------------------------------


def test_421_to_a_command_closes() -> None:
    conn = greeted()
    mail, rcpt, data = MailFrom(A), RcptTo(A), Data()
    for command in (mail, rcpt, data):
        conn.send(command)
    (event,) = reply(conn, b"421 4.3.2 shutting down\r\n")
    assert isinstance(event, Response)
    assert event.command is mail
    assert state_of(conn) is State.CLOSING
    assert pending_of(conn) == (rcpt, data)
    with pytest.raises(LocalProtocolError, match="CLOSING"):
        conn.send(Quit())


def test_421_then_eof_reports_pending() -> None:
    conn = greeted()
    mail, rcpt, data = MailFrom(A), RcptTo(A), Data()
    for command in (mail, rcpt, data):
        conn.send(command)
    conn.receive_data(b"250 ok\r\n421 bye\r\n")
    conn.receive_data(b"")
    events = drain(conn)
    assert codes(events) == [250, 421]
    assert events[-1] == ConnectionClosed(pending=(data,))
    assert state_of(conn) is State.CLOSED


def test_unsolicited_421_during_data() -> None:
    conn = greeted()
    for command in (MailFrom(A), RcptTo(A), Data()):
        conn.send(command)
    reply(conn, b"250 ok\r\n250 ok\r\n354 go\r\n")
    (event,) = reply(conn, b"421 4.4.2 timeout\r\n")
    assert event == ServiceClosing(reply=Reply.of(421, "4.4.2 timeout"))
    assert state_of(conn) is State.CLOSING
    with pytest.raises(LocalProtocolError):
        conn.send(DataChunk(b"x"))


def test_421_in_lmtp_final_replies_leaves_the_rest_unanswered() -> None:
    conn = greeted(lmtp=True)
    lmtp_transaction(conn)
    conn.send(EndOfData())
    conn.receive_data(b"421 4.3.0 crash\r\n")
    conn.receive_data(b"")
    events = drain(conn)
    assert isinstance(events[0], LMTPResponse)
    assert events[0].recipient == A
    assert state_of(conn) is State.CLOSED
    assert isinstance(events[-1], ConnectionClosed)
    assert events[-1].unanswered == (C,)


def test_quit() -> None:
    conn = greeted()
    assert conn.send(Quit()) == b"QUIT\r\n"
    assert state_of(conn) is State.CLOSING
    assert codes(reply(conn, b"221 2.0.0 bye\r\n")) == [221]
    conn.receive_data(b"")
    assert drain(conn) == [ConnectionClosed()]
    assert conn.next_event() == ConnectionClosed()  # stays closed
    assert state_of(conn) is State.CLOSED


def test_eof_mid_reply_is_connection_closed_with_pending() -> None:
    conn = greeted()
    noop = Noop()
    conn.send(noop)
    conn.receive_data(b"250-partial\r\n250 unfini")
    conn.receive_data(b"")
    assert drain(conn) == [ConnectionClosed(pending=(noop,))]


def test_eof_before_greeting() -> None:
    conn = ClientConnection()
    conn.receive_data(b"")
    conn.receive_data(b"")  # a second EOF is harmless
    assert drain(conn) == [ConnectionClosed()]


def test_send_after_close_is_local_error() -> None:
    conn = greeted()
    conn.receive_data(b"")
    drain(conn)
    with pytest.raises(LocalProtocolError):
        conn.send(Noop())


def test_data_after_eof_is_local_error() -> None:
    conn = greeted()
    conn.receive_data(b"")
    with pytest.raises(LocalProtocolError, match="end of file"):
        conn.receive_data(b"250 late\r\n")


# -- ERROR is absorbing ------------------------------------------------------------------------


def assert_absorbing(conn: ClientConnection, remote: bool) -> None:
    assert state_of(conn) is State.ERROR
    with pytest.raises(RemoteProtocolError if remote else LocalProtocolError):
        conn.next_event()
    with pytest.raises(LocalProtocolError):
        conn.send(Noop())
    with pytest.raises(LocalProtocolError):
        conn.send(Quit())
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"250 ok\r\n")
    with pytest.raises(LocalProtocolError):
        conn.tls_established()
    assert state_of(conn) is State.ERROR


def test_local_error_is_absorbing() -> None:
    conn = greeted()
    with pytest.raises(LocalProtocolError):
        conn.send(Data())
    assert_absorbing(conn, remote=False)


def test_remote_error_is_absorbing() -> None:
    conn = greeted()
    conn.send(Noop())
    conn.receive_data(b"999 what\r\n")
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    assert_absorbing(conn, remote=True)


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (b"250-a\r\n251 b\r\n", "changed its code"),
        (b"2500 x\r\n", "malformed"),
        (b"650 x\r\n", "malformed"),
        (b"250 " + b"x" * 5000 + b"\r\n", "longer than"),
        (b"250 " + b"x" * 5000, "longer than"),
    ],
)
def test_malformed_replies_through_the_connection(wire: bytes, message: str) -> None:
    conn = greeted()
    conn.send(Noop())
    conn.receive_data(wire)
    with pytest.raises(RemoteProtocolError, match=message):
        conn.next_event()


def test_limits_are_configurable() -> None:
    conn = ClientConnection(max_line_length=10, max_reply_length=20)
    conn.receive_data(b"220 0123456789\r\n")
    with pytest.raises(RemoteProtocolError, match="longer than 10"):
        conn.next_event()


def test_lmtp_data_taken_without_accepted_recipients_gets_one_reply() -> None:
    conn = greeted(lmtp=True)
    conn.send(MailFrom(A))
    conn.send(RcptTo(B))
    conn.send(Data())
    assert codes(reply(conn, b"250 ok\r\n550 no\r\n354 go\r\n")) == [250, 550, 354]
    end = EndOfData()
    assert conn.send(end) == b".\r\n"
    (event,) = reply(conn, b"554 5.5.1 no valid recipients\r\n")
    assert event == Response(command=end, reply=Reply.of(554, "5.5.1 no valid recipients"))
    assert pending_of(conn) == ()


def test_data_chunk_in_wire_form_passes_through() -> None:
    conn = greeted()
    for command in (MailFrom(A), RcptTo(A), Data()):
        conn.send(command)
    reply(conn, b"250 ok\r\n250 ok\r\n354 go\r\n")
    assert conn.send(DataChunk(b"..dot\r\nlast", stuffed=True)) == b"..dot\r\nlast"
    assert conn.send(EndOfData()) == b"\r\n.\r\n"


def test_data_chunk_in_wire_form_mid_line_is_a_local_error() -> None:
    conn = greeted()
    for command in (MailFrom(A), RcptTo(A), Data()):
        conn.send(command)
    reply(conn, b"250 ok\r\n250 ok\r\n354 go\r\n")
    conn.send(DataChunk(b"half a line"))
    with pytest.raises(LocalProtocolError, match="start a line"):
        conn.send(DataChunk(b"x\r\n", stuffed=True))
    assert state_of(conn) is State.ERROR


# -- the batch fast paths: send_group() and next_replies() ---------------------------------


@pytest.mark.parametrize(
    "group",
    [
        [MailFrom(A), RcptTo(A), RcptTo(B), Data()],
        [Rset(), MailFrom(A), RcptTo(A), Data()],
        [MailFrom(A), RcptTo(B), Bdat(b"Subject: x\r\n\r\nbody\r\n", last=True)],
        [MailFrom(A), RcptTo(A), Bdat(b"12345"), Bdat(b"", last=True)],
        [Noop()],
        [],
    ],
)
def test_send_group_is_send_of_each_joined(group: list[Command]) -> None:
    one, many = greeted(), greeted()
    assert many.send_group(group) == b"".join(one.send(c) for c in group)
    assert pending_of(many) == pending_of(one)
    assert state_of(many) is state_of(one)


def test_send_group_passes_data_through_send() -> None:
    one, many = greeted(), greeted()
    for conn in (one, many):
        for command in (MailFrom(A), RcptTo(A), Data()):
            conn.send(command)
        reply(conn, b"250 ok\r\n250 ok\r\n354 go\r\n")
    group = [DataChunk(b".dot\nline"), EndOfData(), MailFrom(B), RcptTo(B), Data()]
    wire = many.send_group(group)
    assert wire == b"".join(one.send(c) for c in group)
    assert wire.startswith(b"..dot\r\nline\r\n.\r\nMAIL FROM:<b@example.org>\r\n")
    assert pending_of(many) == pending_of(one)
    assert state_of(many) is state_of(one) is State.MAIL


def send_each(conn: ClientConnection, group: list[Command]) -> None:
    for command in group:
        conn.send(command)


@pytest.mark.parametrize(
    ("ehlo_reply", "group", "message"),
    [
        (EHLO_REPLY, [MailFrom(A), RcptTo(A), Data(), RcptTo(B)], "nothing may follow DATA"),
        (b"250 mx.example\r\n", [MailFrom(A), RcptTo(A)], "did not announce PIPELINING"),
        (EHLO_REPLY, [RcptTo(A)], "cannot send RCPT in state READY"),
        (EHLO_REPLY, [MailFrom(A), RcptTo(UTF8)], "SMTPUTF8"),
        (EHLO_REPLY, [Rset(), StartTLS()], "cannot be pipelined"),
    ],
)
def test_send_group_refuses_as_send_does(
    ehlo_reply: bytes, group: list[Command], message: str
) -> None:
    one, many = greeted(ehlo_reply=ehlo_reply), greeted(ehlo_reply=ehlo_reply)
    with pytest.raises(LocalProtocolError, match=message) as group_error:
        many.send_group(group)
    with pytest.raises(LocalProtocolError) as send_error:
        send_each(one, group)
    assert str(group_error.value) == str(send_error.value)
    assert pending_of(many) == pending_of(one)
    assert state_of(many) is state_of(one) is State.ERROR
    with pytest.raises(LocalProtocolError, match="ERROR state"):
        many.send_group([Noop()])


def test_next_replies_takes_a_pipelined_groups_replies() -> None:
    conn = greeted()
    mail, rcpt_a, rcpt_b, data = MailFrom(A), RcptTo(A), RcptTo(B), Data()
    conn.send_group([mail, rcpt_a, rcpt_b, data])
    assert conn.next_replies(10) == []  # nothing read yet
    conn.receive_data(b"250 2.1.0 ok\r\n550 5.1.1 no such user\r\n250 2.1.5 ok\r\n354 go\r\n")
    first = conn.next_replies(2)
    assert [r.code for r in first] == [250, 550]
    assert pending_of(conn) == (rcpt_b, data)
    assert [r.code for r in conn.next_replies(10)] == [250, 354]
    assert conn.accepted_recipients == (B,)
    assert state_of(conn) is State.DATA
    assert pending_of(conn) == ()
    assert conn.next_event() is NEED_DATA


@pytest.mark.parametrize(
    ("server", "taken", "then"),
    [
        # 421 is left to next_event (RFC 5321 §3.8), which also closes the connection.
        (b"250 ok\r\n421 4.3.2 bye\r\n250 ok\r\n", [250], Response),
        # A malformed line waits for next_event, which raises.
        (b"250 ok\r\nxyz\r\n", [250], RemoteProtocolError),
        # A reply nobody awaits is next_event's business too.
        (b"250 ok\r\n250 ok\r\n354 go\r\n250 extra\r\n", [250, 250, 354], RemoteProtocolError),
        # An unfinished reply is not taken.
        (b"250 ok\r\n250-partial\r\n", [250], type(NEED_DATA)),
    ],
)
def test_next_replies_stops_where_next_event_is_needed(
    server: bytes, taken: list[int], then: type[object]
) -> None:
    conn = greeted()
    conn.send_group([MailFrom(A), RcptTo(A), Data()])
    conn.receive_data(server)
    assert [r.code for r in conn.next_replies(10)] == taken
    assert conn.next_replies(10) == []
    if issubclass(then, Exception):
        with pytest.raises(then):
            conn.next_event()
    else:
        assert isinstance(conn.next_event(), then)


def test_next_replies_leaves_lmtp_final_replies_to_next_event() -> None:
    conn = greeted(lmtp=True)
    conn.send_group([MailFrom(A), RcptTo(A), RcptTo(B), Data()])
    conn.receive_data(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    assert [r.code for r in conn.next_replies(10)] == [250, 250, 250, 354]
    conn.send_group([DataChunk(b"x\r\n"), EndOfData()])
    conn.receive_data(b"250 a done\r\n452 b later\r\n")
    assert conn.next_replies(10) == []
    events = drain(conn)
    assert [(e.recipient, e.reply.code) for e in events if isinstance(e, LMTPResponse)] == [
        (A, 250),
        (B, 452),
    ]


def test_next_replies_outside_matching_states_takes_nothing() -> None:
    conn = ClientConnection()
    conn.receive_data(b"220 mx.example ESMTP\r\n")
    assert conn.next_replies(5) == []  # the greeting is an event of its own
    assert isinstance(conn.next_event(), Greeting)


@pytest.mark.parametrize(
    "group",
    [
        [DataChunk(b"ab\r\n.c\r\n", stuffed=True), EndOfData()],
        [DataChunk(b"abc"), DataChunk(b"..x\r\n", stuffed=True)],  # not at a line start
        [DataChunk(b"abc\r"), DataChunk(b"x\r\n", stuffed=True)],  # a CR held back
        [DataChunk(b"abc"), EndOfData(), DataChunk(b"x")],  # no data after the end
    ],
)
def test_send_group_sends_data_as_send_does(group: list[Command]) -> None:
    one, many = greeted(), greeted()
    for conn in (one, many):
        conn.send_group([MailFrom(A), RcptTo(A), Data()])
        reply(conn, b"250 ok\r\n250 ok\r\n354 go\r\n")
    try:
        expected: bytes | str = b"".join(one.send(c) for c in group)
    except LocalProtocolError as exc:
        expected = str(exc)
    try:
        got: bytes | str = many.send_group(group)
    except LocalProtocolError as exc:
        got = str(exc)
    assert got == expected
    assert state_of(many) is state_of(one)
    assert pending_of(many) == pending_of(one)
