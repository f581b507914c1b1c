"""A server's reply that comes before the end of the message data (both drivers).

A server may refuse a message while it is still arriving and close the connection: Exim and
several content filters send ``552 5.3.4 Message size exceeds fixed limit`` or ``554 5.7.1
rejected`` part-way through the data, then hang up. The client's next write then fails
(a reset or a broken pipe) before it reads the reply. That reply is the server's answer
to the message and must decide the recipients (5xx PERMANENT, 4xx TRANSIENT, with the
server's text); it was lost, and the message was reported as ``ConnectionLost``
(transient): retried until it expired, the server's reason never seen.

A server may also reply early and *not* close (it reads the rest of the data, or stops
reading and waits): the reply read after the end of the data is then the early one, and
must be taken as the message's answer exactly once. A broken server may also answer the
end of the data: one reply too many, which would answer the next command on the
connection. The dialogue therefore looks (``Peek``) before it writes the terminator of data
that went out before it: a reply already there came early; it is the answer, and the
session ends without the terminator.

Postfix (``message_size_limit``, SIZE hidden) was checked by hand the same way: it reads
the whole message and refuses it after the end of the data (``552 5.3.4 Error: message
file too big``), never early; both drivers report it PERMANENT and send the next message
on the same connection.

Each test runs a raw loopback server (:class:`~tests.transport.test_review_hostile_s10.
RawServer`) that reads part of the data, replies and closes (or not), over DATA and BDAT,
SMTP and LMTP, plain text and implicit TLS, with ``send`` and ``send_many``.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Callable

import pytest

from mailrelay.errors import ConnectionLost
from mailrelay.message import Message
from mailrelay.options import TLS, Timeouts
from mailrelay.results import DeliveryResult, Outcome
from mailrelay.transport.settings import PoolSettings
from tests.peers.tls import TLSFiles
from tests.transport.helpers import FLAVOURS, Flavour, make_message, send_many_with, send_with
from tests.transport.test_review_hostile_s10 import Gone, Peer, options, serving

# A message far bigger than the socket buffers on both sides: the client's writes fail (or
# block) once the server stops reading. Streamed (one write per chunk, over the 1 MiB the
# dialogue sends in one piece).
BIG = make_message(text=("x" * 76 + "\n") * 80_000)  # ~6 MB
# One the dialogue sends in one write with its terminator (under 1 MiB).
MEDIUM = make_message(text=("m" * 76 + "\n") * 12_000)  # ~0.9 MB
# How much of the data the server reads before it answers.
_READ_FIRST = 64 * 1024

# One connection at a time (the async transport's send_many otherwise opens several).
ONE = PoolSettings(size=1)

SIZES = [pytest.param(BIG, id="streamed"), pytest.param(MEDIUM, id="one-write")]

# (reply, outcome, code)
EARLY_REPLIES = [
    pytest.param(b"552 5.3.4 Message size exceeds fixed limit\r\n", Outcome.PERMANENT, 552,
                 id="552"),
    pytest.param(b"554-5.7.1 rejected: spam\r\n554 5.7.1 see you never\r\n", Outcome.PERMANENT,
                 554, id="554-multiline"),
    pytest.param(b"452 4.3.1 Insufficient system storage\r\n", Outcome.TRANSIENT, 452,
                 id="452"),
]  # fmt: skip


def _read_at_least(peer: Peer, count: int) -> None:
    """Read until ``count`` octets of the data are buffered (bounded: each read has a limit)."""
    for _ in range(10_000):
        if len(peer.buffer) >= count:
            return
        peer._fill()
    raise Gone("too many reads")


def _hang_up(peer: Peer, how: str) -> None:
    """End the connection with unread data in the kernel (a reset), after a TLS close_notify
    when ``how`` is ``"close_notify"``, or with a FIN and a reset for the rest
    (``"shutdown"``)."""
    sock = peer.sock
    if isinstance(sock, ssl.SSLSocket):
        # Over a network the reset comes a round trip after the reply (the client's next
        # segment must reach the server first); on loopback the two can land together,
        # between the asyncio loop's poll and its next write, and a write that meets the
        # reset ends the TLS transport before its records are read (plain text keeps them
        # in the kernel for the driver). A pause stands in for the round trip.
        peer.stopping.wait(0.05)
    if how == "close_notify" and isinstance(sock, ssl.SSLSocket):
        # The TLS alert goes out; the client's later records then meet a closed socket.
        with contextlib.suppress(OSError, ValueError):
            sock.settimeout(0.2)
            sock.unwrap()
    elif how == "shutdown":
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
    with contextlib.suppress(OSError):
        sock.close()


def _envelope(peer: Peer, count: int = 2) -> None:
    peer.expect(b"MAIL")
    peer.send(b"250 ok\r\n")
    for _ in range(count):
        peer.expect(b"RCPT")
        peer.send(b"250 ok\r\n")


def early_server(
    reply: bytes,
    *,
    bdat: bool = False,
    lmtp: bool = False,
    tls: ssl.SSLContext | None = None,
    how: str = "close",
) -> Callable[[Peer], None]:
    """A handler that reads part of the data, sends ``reply`` and hangs up."""

    def handler(peer: Peer) -> None:
        if tls is not None:
            peer.start_tls(tls)
        if lmtp:
            peer.send(b"220 raw.test LMTP\r\n")
            peer.expect(b"LHLO")
            peer.send(b"250-raw.test\r\n250 PIPELINING\r\n")
        else:
            peer.greet_and_ehlo(b"PIPELINING", *([b"CHUNKING"] if bdat else []))
        _envelope(peer)
        if bdat:
            peer.expect(b"BDAT")
        else:
            peer.expect(b"DATA")
            peer.send(b"354 go ahead\r\n")
        _read_at_least(peer, _READ_FIRST)
        peer.send(reply)
        _hang_up(peer, how)

    return handler


def _assert_refused(result: DeliveryResult, outcome: Outcome, code: int) -> None:
    assert [r.outcome for r in result.recipients] == [outcome] * len(result.recipients)
    for recipient in result.recipients:
        assert recipient.reply is not None
        assert recipient.reply.code == code


# -- the early reply, then the end of the connection ------------------------------------------


@pytest.mark.parametrize(("reply", "outcome", "code"), EARLY_REPLIES)
@pytest.mark.parametrize("message", SIZES)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_an_early_reply_before_a_hang_up_decides_the_recipients_over_data(
    flavour: Flavour, message: Message, reply: bytes, outcome: Outcome, code: int
) -> None:
    with serving(early_server(reply)) as server:
        result = send_with(flavour, message, **options(server, 2.0))
    _assert_refused(result, outcome, code)


@pytest.mark.parametrize(("reply", "outcome", "code"), EARLY_REPLIES)
@pytest.mark.parametrize("message", SIZES)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_an_early_reply_before_a_hang_up_decides_the_recipients_over_bdat(
    flavour: Flavour, message: Message, reply: bytes, outcome: Outcome, code: int
) -> None:
    with serving(early_server(reply, bdat=True)) as server:
        result = send_with(flavour, message, **options(server, 2.0, chunking=True))
    _assert_refused(result, outcome, code)


@pytest.mark.parametrize("how", ["close", "shutdown"])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_the_servers_text_reaches_the_result(flavour: Flavour, how: str) -> None:
    reply = b"554 5.7.1 rejected: spam\r\n"
    with serving(early_server(reply, how=how)) as server:
        result = send_with(flavour, BIG, **options(server, 2.0))
    _assert_refused(result, Outcome.PERMANENT, 554)
    assert result.recipients[0].reply is not None
    assert "rejected: spam" in result.recipients[0].reply.text


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_lmtp_an_early_reply_answers_every_recipient(flavour: Flavour) -> None:
    # RFC 2033 §4.2's one reply per recipient comes after the end of the data; a refusal
    # that cut the data short (the client's write failed) is the server's word on the whole
    # message, not on the first recipient. (When every write went through, one reply and a
    # hang-up cannot be told from a server that died after answering the first recipient:
    # the others stay TRANSIENT, as before.)
    reply = b"552 5.3.4 Message size exceeds fixed limit\r\n"
    with serving(early_server(reply, lmtp=True)) as server:
        result = send_with(flavour, BIG, lmtp=True, **options(server, 2.0))
    _assert_refused(result, Outcome.PERMANENT, 552)


@pytest.mark.parametrize("how", ["close", "close_notify"])
@pytest.mark.parametrize("bdat", [False, True], ids=["data", "bdat"])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_an_early_reply_over_tls(
    flavour: Flavour, bdat: bool, how: str, tls_files: TLSFiles
) -> None:
    reply = b"552 5.3.4 Message size exceeds fixed limit\r\n"
    handler = early_server(reply, bdat=bdat, tls=tls_files.server_context(), how=how)
    with serving(handler) as server:
        result = send_with(
            flavour,
            BIG,
            **options(
                server,
                2.0,
                tls=TLS.IMPLICIT,
                ssl_context=tls_files.client_context(),
                server_hostname="localhost",
                chunking=bdat,
            ),
        )
    _assert_refused(result, Outcome.PERMANENT, 552)


@pytest.mark.parametrize("message", SIZES)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_send_many_an_early_refusal_ends_that_message_only(
    flavour: Flavour, message: Message
) -> None:
    # The first message is refused part-way and the server hangs up; the second goes on a
    # fresh connection and is taken. (With PIPELINING a message under 1 MiB has its data
    # written as soon as its 354 comes, its terminator with the next envelope.)
    reply = b"552 5.3.4 Message size exceeds fixed limit\r\n"
    small = make_message(subject="second")

    def second(peer: Peer) -> None:
        peer.greet_and_ehlo(b"PIPELINING")
        _envelope(peer)
        peer.expect(b"DATA")
        peer.send(b"354 go ahead\r\n")
        peer.data()
        peer.send(b"250 2.0.0 queued\r\n")
        for _ in range(3):
            line = peer.line().upper()
            peer.send(b"221 bye\r\n" if line.startswith(b"QUIT") else b"250 ok\r\n")

    with serving(early_server(reply), second) as server:
        results = send_many_with(flavour, [message, small], **options(server, 2.0, pool=ONE))
    _assert_refused(results[0], Outcome.PERMANENT, 552)
    assert results[1].ok


# -- no complete reply: still a lost connection --------------------------------------------------


@pytest.mark.parametrize(
    "partial",
    [b"", b"552 5.3.4 Message size", b"250 2.0.0 ok\r\n"],
    ids=["nothing", "half", "positive"],
)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_hang_up_without_a_complete_reply_is_still_connection_lost(
    flavour: Flavour, partial: bytes
) -> None:
    # Half a reply is no answer; nor is a 250 before the end of the data (the server
    # never saw the terminator, so it cannot have taken the message).
    with serving(early_server(partial)) as server, pytest.raises(ConnectionLost):
        send_with(flavour, BIG, **options(server, 2.0))


# -- the early reply, and the connection kept ----------------------------------------------------


def _serve_rest(peer: Peer) -> None:
    """Answer whatever comes next as a server that takes everything (bounded)."""
    for _ in range(12):
        line = peer.line().upper()
        if line.startswith(b"QUIT"):
            peer.send(b"221 bye\r\n")
            return
        if line.startswith(b"DATA"):
            peer.send(b"354 go ahead\r\n")
            peer.data()
            peer.send(b"250 2.0.0 queued as NEXT\r\n")
        else:
            peer.send(b"250 ok\r\n")


def _fresh(peer: Peer, pipelining: bool) -> None:
    """A second connection: the usual opening, then :func:`_serve_rest`."""
    peer.greet_and_ehlo(*([b"PIPELINING"] if pipelining else []))
    _serve_rest(peer)


@pytest.mark.parametrize("pipelining", [False, True], ids=["lockstep", "pipelined"])
@pytest.mark.parametrize("message", SIZES)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_an_early_reply_from_a_server_that_reads_on_is_the_one_answer(
    flavour: Flavour, message: Message, pipelining: bool
) -> None:
    # The server refuses early but reads the rest of the data (to the terminator) and owes
    # nothing more. Seen before the terminator (the client looks when the data went out
    # before it), the refusal is the answer and the session ends there (the server might
    # answer the end of the data as well); seen after it, it is the reply to the end of
    # the data. Either way the message is refused with it, once, and the next message is
    # answered by its own replies (on this connection or a fresh one).
    small = make_message(subject="next")

    def handler(peer: Peer) -> None:
        peer.greet_and_ehlo(*([b"PIPELINING"] if pipelining else []))
        _envelope(peer)
        peer.expect(b"DATA")
        peer.send(b"354 go ahead\r\n")
        _read_at_least(peer, _READ_FIRST)
        peer.send(b"552 5.3.4 Message size exceeds fixed limit\r\n")
        peer.data()
        _serve_rest(peer)

    with serving(handler, lambda peer: _fresh(peer, pipelining)) as server:
        results = send_many_with(flavour, [message, small], **options(server, 2.0, pool=ONE))
    _assert_refused(results[0], Outcome.PERMANENT, 552)
    assert results[1].ok
    assert results[1].recipients[0].reply is not None
    assert "NEXT" in results[1].recipients[0].reply.text


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_an_early_reply_from_a_server_that_stops_reading(flavour: Flavour) -> None:
    # The server refuses early, then neither reads nor closes: the client's writes block
    # until the data phase's limit. The refusal it already sent is the answer (not a
    # timeout), found without waiting any longer than that limit.
    reply = b"554 5.7.1 rejected: spam\r\n"

    def handler(peer: Peer) -> None:
        peer.greet_and_ehlo()
        _envelope(peer)
        peer.expect(b"DATA")
        peer.send(b"354 go ahead\r\n")
        _read_at_least(peer, _READ_FIRST)
        peer.send(reply)
        peer.stopping.wait(4.0)  # until the client hangs up (the server is stopped)

    timeouts = Timeouts(connect=1, greeting=1, mail=1, rcpt=1, data_init=1, data_block=0.5,
                        data_end=1, quit=1)  # fmt: skip
    with serving(handler) as server:
        result = send_with(flavour, BIG, **options(server, timeouts=timeouts))
        server.stopping.set()
    _assert_refused(result, Outcome.PERMANENT, 554)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_an_early_refusal_and_a_second_reply_after_the_data(flavour: Flavour) -> None:
    # A broken server refuses early, reads on, and answers the end of the data as well.
    # The client reads replies only after its end of data (RFC 5321 §4.1.1.4): the first,
    # the refusal, is the message's answer; the later 250 never makes it ACCEPTED. (What
    # that 250 does to the next command on the connection is the test below.)
    def handler(peer: Peer) -> None:
        peer.greet_and_ehlo()
        _envelope(peer)
        peer.expect(b"DATA")
        peer.send(b"354 go ahead\r\n")
        _read_at_least(peer, _READ_FIRST)
        peer.send(b"552 5.3.4 Message size exceeds fixed limit\r\n")
        peer.data()
        peer.send(b"250 2.0.0 taken after all\r\n")
        for _ in range(3):
            line = peer.line().upper()
            peer.send(b"221 bye\r\n" if line.startswith(b"QUIT") else b"250 ok\r\n")

    with serving(handler) as server:
        result = send_with(flavour, MEDIUM, **options(server, 2.0))
    _assert_refused(result, Outcome.PERMANENT, 552)


@pytest.mark.parametrize("pipelining", [False, True], ids=["lockstep", "pipelined"])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_an_early_refusal_then_a_second_reply_does_not_answer_the_next_envelope(
    flavour: Flavour, pipelining: bool
) -> None:
    # As above, with the next message on the same connection. Read after the terminator,
    # the extra 250 would answer the next MAIL, MAIL's answer the first RCPT, the first
    # RCPT's 550 the second (pipelined, RFC 2920 §3.1: carol bounced with bob's refusal).
    # The refusal came while the data was still going out: the client sees it before it
    # writes the terminator, takes it, and ends the session; the next message goes on a
    # fresh connection. (A message small enough to be written whole before the server
    # answers cannot be looked at in time: there the one-reply rule is all there is.)
    small = make_message(subject="next")

    def handler(peer: Peer) -> None:
        # A small receive buffer (no autotuning): the client's writes wait for the server
        # to read, as they would over a network, instead of all fitting in loopback's
        # buffers before the server has read anything.
        peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        peer.greet_and_ehlo(*([b"PIPELINING"] if pipelining else []))
        _envelope(peer)
        peer.expect(b"DATA")
        peer.send(b"354 go ahead\r\n")
        _read_at_least(peer, _READ_FIRST)
        peer.send(b"552 5.3.4 Message size exceeds fixed limit\r\n")
        peer.stopping.wait(0.2)  # the refusal reaches the client while it still writes
        peer.data()
        peer.send(b"250 2.0.0 taken after all\r\n")
        for reply in (b"250 ok", b"550 5.1.1 bob unknown", b"250 ok", b"354 go ahead"):
            peer.line()
            peer.send(reply + b"\r\n")
        peer.data()
        peer.send(b"250 2.0.0 queued\r\n")
        peer.linger()

    with serving(handler, lambda peer: _fresh(peer, pipelining)) as server:
        results = send_many_with(flavour, [BIG, small], **options(server, 2.0, pool=ONE))
    _assert_refused(results[0], Outcome.PERMANENT, 552)
    assert results[1].ok
    assert results[1].recipients[0].reply is not None
    assert "NEXT" in results[1].recipients[0].reply.text
