"""Review 77 of SMTPTestServer: where it departed from the RFCs it serves, each proved with a
raw-socket client (so mailrelay's own client is not the judge)."""

from __future__ import annotations

import contextlib
import socket
import ssl

import pytest

from mailrelay.testing.server import Fault, SMTPTestServer
from tests.peers.tls import TLSFiles
from tests.testing.raw_client import RawClient

# -- LMTP (RFC 2033) -----------------------------------------------------------------------


def test_lmtp_data_without_a_recipient_is_503() -> None:
    # RFC 2033 §4.2: "If there were no successful RCPT commands in the mail transaction, the
    # DATA command MUST fail with a 503 reply code" (SMTP may say 554; LMTP may not).
    with (
        SMTPTestServer(lmtp=True, rcpt=lambda address, params: (550, "5.1.1 no")) as server,
        RawClient(server) as client,
    ):
        assert client.command(b"LHLO c") == 250
        assert client.command(b"MAIL FROM:<>") == 250
        assert client.command(b"RCPT TO:<a@b.example>") == 550
        assert client.command(b"DATA") == 503
        assert client.command(b"BDAT 2 LAST\r\nx") == 503


def test_lmtp_data_over_the_size_limit_gets_a_reply_per_recipient() -> None:
    # RFC 2033 §4.2: after the final ".", one reply for each successful RCPT, whatever the
    # reply is; a single 552 leaves the client waiting for the second one.
    with SMTPTestServer(lmtp=True, max_size=10) as server, RawClient(server) as client:
        assert client.command(b"LHLO c") == 250
        assert client.command(b"MAIL FROM:<>") == 250
        assert client.command(b"RCPT TO:<a@b.example>") == 250
        assert client.command(b"RCPT TO:<c@b.example>") == 250
        assert client.command(b"DATA") == 354
        client.send(b"x" * 20 + b"\r\n.\r\n")
        assert [client.code(), client.code()] == [552, 552]
        assert client.command(b"NOOP") == 250  # in step
        # The same for the LAST chunk of BDAT (a chunk before it gets one reply).
        assert client.command(b"MAIL FROM:<>") == 250
        assert client.command(b"RCPT TO:<a@b.example>") == 250
        assert client.command(b"RCPT TO:<c@b.example>") == 250
        assert client.command(b"BDAT 20 LAST\r\n" + b"y" * 18) == 552
        assert client.code() == 552
        assert client.command(b"NOOP") == 250
        assert client.command(b"MAIL FROM:<>") == 250
        assert client.command(b"RCPT TO:<a@b.example>") == 250
        assert client.command(b"RCPT TO:<c@b.example>") == 250
        assert client.command(b"BDAT 20\r\n" + b"y" * 18) == 552
        assert client.command(b"NOOP") == 250
    assert server.messages == []


# -- SIZE (RFC 1870) -------------------------------------------------------------------------


def test_the_size_limit_counts_the_message_not_its_stuffing_dots() -> None:
    # RFC 1870 §3: the size is the message's octets, "not ... doubled quoting dots". This
    # 10-octet message goes out as 11 (its line starts with a dot) and declares SIZE=10.
    with SMTPTestServer(max_size=10) as server, RawClient(server) as client:
        assert client.command(b"EHLO c") == 250
        assert client.command(b"MAIL FROM:<> SIZE=10") == 250
        assert client.command(b"RCPT TO:<a@b.example>") == 250
        assert client.command(b"DATA") == 354
        assert client.command(b"..abcdefg\r\n.") == 250
        # One octet more is still refused, stuffed or not.
        for stuffed in (b"..abcdefgh\r\n.", b"abcdefghi\r\n."):
            assert client.command(b"MAIL FROM:<>") == 250
            assert client.command(b"RCPT TO:<a@b.example>") == 250
            assert client.command(b"DATA") == 354
            assert client.command(stuffed) == 552
        (received,) = server.wait_for(1)
    assert received.data == b".abcdefg\r\n"


# -- BDAT (RFC 3030) -------------------------------------------------------------------------


def test_a_bdat_chunk_is_read_even_after_a_554_greeting() -> None:
    # RFC 3030 §2: the chunk belongs to the BDAT command whatever the reply; after a 554
    # greeting (RFC 5321 §3.1) the chunk's bytes must not be run as commands.
    with (
        SMTPTestServer(faults=[Fault.greeting(554, "5.3.2 closed (test)")]) as server,
        socket.create_connection((server.host, server.port), timeout=5) as sock,
        sock.makefile("rb") as replies,
    ):
        assert replies.readline().startswith(b"554 ")
        sock.sendall(b"BDAT 6 LAST\r\nQUIT\r\nNOOP\r\n")
        assert replies.readline().startswith(b"503 ")
        assert replies.readline().startswith(b"503 ")  # NOOP; QUIT was data
        sock.sendall(b"QUIT\r\n")
        assert replies.readline().startswith(b"221 ")


# -- DSN parameters (RFC 3461 §4) ------------------------------------------------------------

_VALID_DSN = [
    b"MAIL FROM:<a@b.example> RET=HDRS ENVID=order+2B17",
    b"MAIL FROM:<a@b.example> RET=full",
    b"MAIL FROM:<a@b.example> ENVID=" + b"x" * 100,
    b"RCPT TO:<c@d.example> NOTIFY=NEVER",
    b"RCPT TO:<c@d.example> NOTIFY=success,Delay,FAILURE ORCPT=rfc822;c@d.example",
    b"RCPT TO:<c@d.example> ORCPT=utf-8;j\\x{E9}r\\x{F4}me@d.example",
]
_MALFORMED_DSN = [
    b"MAIL FROM:<a@b.example> RET=ALL",  # §4.3: FULL or HDRS
    b"MAIL FROM:<a@b.example> ENVID=a=b",  # §4: "=" is not an xchar
    b"MAIL FROM:<a@b.example> ENVID=a+2b",  # §4: hexchar is upper case
    b"RCPT TO:<c@d.example> NOTIFY=NEVER,SUCCESS",  # §4.1: NEVER stands alone
    b"RCPT TO:<c@d.example> NOTIFY=SOMETIMES",
    b"RCPT TO:<c@d.example> NOTIFY=SUCCESS,",
    b"RCPT TO:<c@d.example> ORCPT=c@d.example",  # §4.2: addr-type ";" xtext
    b"RCPT TO:<c@d.example> ORCPT=rfc822;c+d@d.example",
    b"RCPT TO:<c@d.example> ORCPT=rfc822;j\xc3\xa9@d.example",  # UTF-8 without SMTPUTF8
]


@pytest.mark.parametrize("command", _VALID_DSN + _MALFORMED_DSN)
def test_malformed_dsn_parameters_are_refused_with_501(command: bytes) -> None:
    # RFC 5321 §4.2.2 (501: syntax error in parameters) for the RFC 3461 §4 grammar: a server
    # that takes any value hides a client's bad DSN parameters until a real server refuses.
    expected = 501 if command in _MALFORMED_DSN else 250
    with SMTPTestServer() as server, RawClient(server) as client:
        assert client.command(b"EHLO c") == 250
        if command.startswith(b"RCPT"):
            assert client.command(b"MAIL FROM:<a@b.example>") == 250
        assert client.command(command) == expected


def test_a_utf8_orcpt_is_taken_with_smtputf8() -> None:
    # RFC 6533 §3: utf-8-addr-unitext may carry UTF-8 when the transaction has SMTPUTF8.
    with SMTPTestServer() as server, RawClient(server) as client:
        assert client.command(b"EHLO c") == 250
        assert client.command(b"MAIL FROM:<a@b.example> SMTPUTF8") == 250
        assert client.command(b"RCPT TO:<c@d.example> ORCPT=utf-8;j\xc3\xa9@d.example") == 250


# -- memory a client can make the server hold ------------------------------------------------

_MiB = 1024 * 1024


def test_data_the_server_drops_does_not_grow_the_session_without_bound() -> None:
    # The server reads data over max_size to its end and drops it (bounded), but the session
    # kept every byte: a client streaming a DATA (or a BDAT of 10**11 octets) that never ends
    # grew the server's memory without limit. The transcript keeps its first max_size + 1 MiB.
    junk = (b"x" * 1022 + b"\r\n") * (4 * 1024)  # 4 MiB
    with SMTPTestServer(max_size=1000) as server, RawClient(server) as client:
        assert client.command(b"EHLO c") == 250
        assert client.command(b"MAIL FROM:<>") == 250
        assert client.command(b"RCPT TO:<a@b.example>") == 250
        assert client.command(b"DATA") == 354
        client.send(junk)
        assert client.command(b".") == 552
        assert client.command(b"MAIL FROM:<>") == 250
        assert client.command(b"RCPT TO:<a@b.example>") == 250
        client.send(b"BDAT %d LAST\r\n" % len(junk) + junk)
        assert client.code() == 552
        assert client.command(b"NOOP") == 250
        (session,) = server.sessions
        received = session.received
        events = session.events
    assert len(received) == 1000 + _MiB
    assert received.startswith(b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<a@b.example>\r\nDATA\r\nxxx")
    assert events.count(f"received truncated at {1000 + _MiB} octets") == 1


# -- stop ------------------------------------------------------------------------------------


@pytest.mark.parametrize("implicit", [True, False])
def test_stop_wakes_a_connection_waiting_in_the_tls_handshake(
    implicit: bool, tls_files: TLSFiles
) -> None:
    # stop() shuts every connection's socket to wake its thread, but during the handshake the
    # thread's socket object was the one wrap_socket had detached: the shutdown missed, and the
    # ``with`` block waited for the handshake to time out (``timeout``, 10 s by default).
    server = SMTPTestServer(tls=tls_files.server_context(), implicit_tls=implicit, timeout=5)
    # The client hangs up only after the server stopped (the stack exits after the server).
    with contextlib.ExitStack() as client, server:
        sock = client.enter_context(socket.create_connection((server.host, server.port)))
        sock.settimeout(5)
        if not implicit:
            replies = client.enter_context(sock.makefile("rb"))
            assert replies.readline().startswith(b"220 ")
            sock.sendall(b"EHLO c\r\n")
            for _ in range(30):  # to the EHLO reply's last line
                if replies.readline().startswith(b"250 "):
                    break
            sock.sendall(b"STARTTLS\r\n")
            assert replies.readline().startswith(b"220 ")
        # Our ClientHello, and the server's answering flight: it waits for our Finished.
        hello = tls_files.client_context().wrap_bio(
            ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname="localhost"
        )
        with contextlib.suppress(ssl.SSLWantReadError):
            hello.do_handshake()
        sock.sendall(outgoing.read())
        assert sock.recv(65536)
    (session,) = server.sessions
    assert session.closed
    assert not [event for event in session.events if "timed out" in event], session.events


# -- argument syntax (RFC 5321 §4.1.1, RFC 6531 §3.4) ----------------------------------------


@pytest.mark.parametrize(
    ("command", "code"),
    [
        (b"VRFY", 501),  # §4.1.1.6: vrfy = "VRFY" SP String CRLF
        (b"VRFY postmaster", 252),
        (b"RSET now", 501),  # §4.1.1.5: rset = "RSET" CRLF
        (b"RSET", 250),
        (b"MAIL FROM:<a@b.example> SMTPUTF8=YES", 501),  # RFC 6531 §3.4: no value
        (b"MAIL FROM:<a@b.example> SMTPUTF8", 250),
    ],
)
def test_arguments_a_command_may_not_take_get_501(command: bytes, code: int) -> None:
    with SMTPTestServer() as server, RawClient(server) as client:
        assert client.command(b"EHLO c") == 250
        assert client.command(command) == code


@pytest.mark.parametrize(
    ("parameter", "code"),
    [(b"AUTH=<>", 250), (b"AUTH=app+40example.com", 250), (b"AUTH=a=b", 501), (b"AUTH", 501)],
)
def test_the_mail_auth_parameter_is_xtext_or_empty(parameter: bytes, code: int) -> None:
    # RFC 4954 §5: auth-param = "AUTH=" ("<>" / xtext).
    with (
        SMTPTestServer(auth={"app": "pw"}, allow_insecure_auth=True) as server,
        RawClient(server) as client,
    ):
        assert client.command(b"EHLO c") == 250
        assert client.command(b"MAIL FROM:<a@b.example> " + parameter) == code


# -- STARTTLS (RFC 3207) ---------------------------------------------------------------------


def test_plaintext_sent_after_the_220_is_recorded_as_sent_before_tls(tls_files: TLSFiles) -> None:
    # RFC 3207 §4.2: nothing but the handshake may follow STARTTLS. Bytes that came in the
    # same read as STARTTLS were kept in sent_before_tls; bytes a client wrote a moment later
    # (after the 220) were fed to the TLS handshake, which failed, and were recorded nowhere:
    # sent_before_tls == b"" passed for a client with the injection bug.
    with SMTPTestServer(tls=tls_files.server_context()) as server, RawClient(server) as client:
        assert client.command(b"EHLO c") == 250
        assert client.command(b"STARTTLS") == 220
        client.send(b"RSET\r\n")
        (session,) = server.sessions
        session.wait_closed()
    assert session.sent_before_tls == b"RSET\r\n"
    assert session.received.endswith(b"STARTTLS\r\nRSET\r\n")
    assert not session.tls
