"""Tests for ``ClientConnection.abandon_data`` and ``replies_ready``: a reply that comes
before the end of the message data (the client's write failed; see
tests/transport/test_early_reply.py for the whole story over sockets)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.address import Address
from mailrelay.errors import LocalProtocolError
from mailrelay.protocol import (
    NEED_DATA,
    Bdat,
    ClientConnection,
    Command,
    Data,
    DataChunk,
    Ehlo,
    EndOfData,
    Lhlo,
    LMTPResponse,
    MailFrom,
    RcptTo,
    Response,
    State,
)

A = Address.parse("a@example.org")
B = Address.parse("b@example.org")
EARLY = b"552 5.3.4 Message size exceeds fixed limit\r\n"


def pending_of(conn: ClientConnection) -> tuple[Command, ...]:
    """The commands in flight, read through a call (mypy would narrow the attribute)."""
    return conn.pending


def state_of(conn: ClientConnection) -> State:
    """The state, read through a call (see pending_of)."""
    return conn.state


def in_transaction(*, lmtp: bool = False, chunking: bool = False) -> ClientConnection:
    """A connection after MAIL and two accepted RCPTs (and, without CHUNKING, DATA's 354)."""
    conn = ClientConnection(lmtp=lmtp)
    conn.receive_data(b"220 mx.example ESMTP\r\n")
    conn.next_event()
    conn.send(Lhlo(hostname="client.example") if lmtp else Ehlo(hostname="client.example"))
    conn.receive_data(b"250-mx.example\r\n250 CHUNKING\r\n")
    conn.next_event()
    for command in (MailFrom(sender=A), RcptTo(recipient=A), RcptTo(recipient=B)):
        conn.send(command)
        conn.receive_data(b"250 ok\r\n")
        assert isinstance(conn.next_event(), Response)
    if not chunking:
        conn.send(Data())
        conn.receive_data(b"354 go ahead\r\n")
        assert isinstance(conn.next_event(), Response)
    return conn


def test_the_early_reply_answers_the_data_cut_short() -> None:
    conn = in_transaction()
    conn.send(DataChunk(data=b"Subject: big\r\n\r\n" + b"x" * 1000))
    assert pending_of(conn) == ()
    conn.abandon_data()  # nothing to write: only the bookkeeping
    assert pending_of(conn) == (EndOfData(),)
    conn.receive_data(EARLY)
    assert conn.replies_ready == 1
    event = conn.next_event()
    assert isinstance(event, Response)
    assert event.command == EndOfData()
    assert event.reply.code == 552
    assert state_of(conn) is State.READY


def test_nothing_changes_once_the_terminator_awaits_its_reply() -> None:
    conn = in_transaction()
    conn.send(DataChunk(data=b"x\r\n"))
    conn.send(EndOfData())
    before = (pending_of(conn), state_of(conn))
    conn.abandon_data()
    assert (pending_of(conn), state_of(conn)) == before


@pytest.mark.parametrize("last", [False, True])
def test_a_bdat_chunk_already_awaits_its_reply(last: bool) -> None:
    conn = in_transaction(chunking=True)
    conn.send(Bdat(data=b"x" * 100, last=last))
    before = (pending_of(conn), state_of(conn))
    conn.abandon_data()
    assert (pending_of(conn), state_of(conn)) == before
    conn.receive_data(EARLY)
    event = conn.next_event()
    assert isinstance(event, LMTPResponse | Response)
    assert event.reply.code == 552


def test_lmtp_the_early_reply_is_matched_to_the_first_recipient() -> None:
    # The connection records facts: the first reply after the end of the data is the first
    # accepted recipient's (RFC 2033 §4.2). That one early reply stands for the whole
    # message is the dialogue's decision (mailrelay.flow), not the connection's.
    conn = in_transaction(lmtp=True)
    conn.send(DataChunk(data=b"x\r\n"))
    conn.abandon_data()
    conn.receive_data(EARLY)
    event = conn.next_event()
    assert isinstance(event, LMTPResponse)
    assert event.recipient == A


def test_abandon_data_in_error_is_refused() -> None:
    conn = in_transaction()
    with pytest.raises(LocalProtocolError):
        conn.send(MailFrom(sender=A))  # not while the data is open: ERROR
    with pytest.raises(LocalProtocolError):
        conn.abandon_data()


@given(st.binary(max_size=200), st.integers(min_value=0, max_value=5))
def test_replies_ready_counts_complete_replies_only(noise: bytes, count: int) -> None:
    conn = in_transaction()
    conn.send(DataChunk(data=b"x\r\n"))
    conn.abandon_data()
    partial = b"250 2.0.0 not fin" + noise.replace(b"\n", b"").replace(b"\r", b"")
    conn.receive_data(b"452 4.3.1 full\r\n" * count + partial)
    assert conn.replies_ready == count
    if count == 0:
        assert conn.next_event() is NEED_DATA
