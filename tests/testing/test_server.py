"""mailrelay.testing.server: the test server speaks real ESMTP/LMTP, records exactly what
arrived, injects each fault as documented, and leaves no thread or socket behind.

Clients: mailrelay's SMTPTransport / AsyncSMTPTransport / LMTPTransport (both drivers) and,
as an independent client, the standard library's smtplib (plus a raw socket for the exact
bytes of a dialogue).
"""

from __future__ import annotations

import ast
import base64
import re
import smtplib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailrelay.envelope import Envelope, Recipient
from mailrelay.errors import (
    AuthenticationError,
    ConnectionLost,
    DeliveryError,
    DeliveryTimeout,
    SessionRefused,
    TLSError,
)
from mailrelay.message import Message
from mailrelay.options import TLS, Timeouts
from mailrelay.reply import Reply
from mailrelay.results import DeliveryResult, Outcome
from mailrelay.testing.server import (
    EXTENSIONS,
    Fault,
    FaultKind,
    Parameters,
    ReceivedMessage,
    SMTPTestServer,
)
from mailrelay.testing.strategies import message_bytes
from mailrelay.transport import PoolSettings, SMTPTransport, transport_from_url
from tests.peers.tls import TLSFiles
from tests.testing.raw_client import RawClient
from tests.transport.helpers import (
    FLAVOURS,
    Flavour,
    make_message,
    send_each_with,
    send_many_with,
    send_with,
)
from tests.transport.test_docs import python_blocks, server_blocks

USERS = {"alice@example.com": "alicepw", "bob": "s3cret"}
DOC = Path(__file__).resolve().parents[2] / "docs" / "test-server.md"


def plain(server: SMTPTestServer, **extra: Any) -> dict[str, Any]:
    """Transport arguments for ``server`` without TLS, with short timeouts."""
    return {
        "host": server.host,
        "port": server.port,
        "tls": TLS.NONE,
        "timeouts": Timeouts.all(5),
        **extra,
    }


def secure(server: SMTPTestServer, tls_files: TLSFiles, **extra: Any) -> dict[str, Any]:
    """Transport arguments for STARTTLS (required) to ``server``, trusting the test CA."""
    return plain(
        server, **{"tls": TLS.STARTTLS, "ssl_context": tls_files.client_context(), **extra}
    )


@pytest.fixture
def raw() -> Iterator[Any]:
    clients: list[RawClient] = []

    def connect(server: SMTPTestServer, *, greeting: int = 220) -> RawClient:
        client = RawClient(server, greeting=None)
        clients.append(client)
        assert client.code() == greeting
        return client

    yield connect
    for client in clients:
        client.close()


# -- what arrives ----------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("chunking", [False, True])
def test_send_records_exactly_what_mailrelay_sent(flavour: Flavour, chunking: bool) -> None:
    message = make_message(text="one\n.two starts with a dot\n.\n..\nend\n")
    with SMTPTestServer() as server:
        result = send_with(flavour, message, **plain(server, chunking=chunking))
        (received,) = server.wait_for(1)
    assert result.ok
    assert received.data == message.as_bytes()
    assert received.chunked is chunking
    assert received.mail_from == "alice@example.com"
    assert received.rcpt_tos == ("bob@example.com", "carol@example.org")
    assert received.mail_options == (("SIZE", str(message.size)),)
    assert received.rcpt_options == ((), ())
    assert not received.tls
    assert received.authenticated is None
    assert received.peer[0] == "127.0.0.1"
    assert received.session == 0
    (session,) = server.sessions
    assert session.closed
    assert received.ehlo_name is not None
    assert session.lines[0] == b"EHLO " + received.ehlo_name.encode()
    assert (b"BDAT " in session.received) is chunking
    # Dot-stuffing is the client's job on the wire, the server's to undo (RFC 5321 §4.5.2).
    assert (b"\r\n..two starts" in session.received) is not chunking


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("chunking", [False, True])
def test_send_many_pipelines_over_one_connection(flavour: Flavour, chunking: bool) -> None:
    messages = [make_message(subject=f"number {n}", text=f"body {n}\n") for n in range(4)]
    with SMTPTestServer() as server:
        # One connection, so that the async pool does not spread the batch over several.
        options = plain(server, chunking=chunking, pool=PoolSettings(size=1))
        results = send_many_with(flavour, list(messages), **options)
        received = server.wait_for(4)
    assert [r.ok for r in results] == [True] * 4
    assert [m.data for m in received] == [m.as_bytes() for m in messages]
    assert {m.session for m in received} == {0}
    (session,) = server.sessions
    # PIPELINING: the next message's MAIL went out right behind the previous data.
    tail = b"BDAT" if chunking else b".\r\nMAIL FROM"
    assert tail in session.received


def test_smtplib_as_an_independent_client() -> None:
    body = b"Subject: x\r\n\r\n.leading dot\r\nline\r\n..two dots\r\n"
    with SMTPTestServer() as server, smtplib.SMTP(server.host, server.port, timeout=5) as smtp:
        code, _ = smtp.ehlo("client.example")
        assert code == 250
        assert set(EXTENSIONS) - {"SIZE"} <= {k.upper() for k in smtp.esmtp_features}
        refused = smtp.sendmail(
            "",
            ["d@example.org", "e@example.org"],
            body,
            mail_options=["BODY=8BITMIME", "RET=HDRS", "ENVID=a+2Bb"],
            rcpt_options=["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;d@example.org"],
        )
        assert refused == {}
        assert smtp.verify("anyone")[0] == 252
        assert smtp.noop()[0] == 250
        (received,) = server.wait_for(1)
    assert received == ReceivedMessage(
        mail_from="",
        rcpt_tos=("d@example.org", "e@example.org"),
        mail_options=(
            ("SIZE", str(len(body))),
            ("BODY", "8BITMIME"),
            ("RET", "HDRS"),
            ("ENVID", "a+2Bb"),
        ),
        rcpt_options=(
            (("NOTIFY", "SUCCESS,FAILURE"), ("ORCPT", "rfc822;d@example.org")),
            (("NOTIFY", "SUCCESS,FAILURE"), ("ORCPT", "rfc822;d@example.org")),
        ),
        data=body,
        chunked=False,
        tls=False,
        authenticated=None,
        ehlo_name="client.example",
        peer=received.peer,
        session=0,
    )
    # smtplib doubled the leading dots on the wire; the server undid it.
    assert b"\r\n...two dots\r\n" in server.sessions[0].received


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_dsn_and_smtputf8_parameters_are_recorded_as_sent(flavour: Flavour) -> None:
    message = Message.build(sender="jörg@exämple.com", to=["bob@example.com"], text="hé\n")
    envelope = Envelope(
        "jörg@exämple.com",
        (Recipient("bob@example.com", notify=("SUCCESS", "DELAY"), orcpt="bob@example.com"),),
        ret="FULL",
        envid="id 42+",
    )
    with SMTPTestServer() as server:
        assert send_with(flavour, message, envelope, **plain(server)).ok
        (received,) = server.wait_for(1)
    assert received.mail_from == "jörg@exämple.com"
    assert received.mail_options == envelope.mail_parameters(
        size=message.size, body="8BITMIME", smtputf8=True
    )
    assert received.rcpt_options == (envelope.recipients[0].rcpt_parameters(smtputf8=True),)
    assert received.data == message.as_bytes()


# -- the dialogue, command by command --------------------------------------------------------

DIALOGUES: list[tuple[str, dict[str, Any], list[tuple[bytes, int]]]] = [
    ("mail before ehlo", {}, [(b"MAIL FROM:<a@b.example>", 503)]),
    ("rcpt before mail", {}, [(b"EHLO c", 250), (b"RCPT TO:<a@b.example>", 503)]),
    ("data before mail", {}, [(b"EHLO c", 250), (b"DATA", 503)]),
    ("data, no recipient", {}, [(b"EHLO c", 250), (b"MAIL FROM:<>", 250), (b"DATA", 554)]),
    ("nested mail", {}, [(b"EHLO c", 250), (b"MAIL FROM:<>", 250), (b"MAIL FROM:<>", 503)]),
    ("rset, noop, vrfy", {}, [(b"RSET", 250), (b"NOOP", 250), (b"VRFY bob", 252)]),
    ("unknown command", {}, [(b"XYZZY", 500), (b"", 500), (b"EXPN list", 502)]),
    ("command line over 512 octets", {}, [(b"NOOP " + b"x" * 508, 500), (b"NOOP", 250)]),
    # RFC 3461: with DSN, MAIL may be 100 octets longer and RCPT 500 (NOTIFY and ORCPT). The
    # longest lines are read whole and their parameters judged: 501, ENVID over 100 and ORCPT
    # over 500 characters (RFC 3461 §4.4, §4.2); one octet more is a line too long, 500.
    (
        "dsn lengthens mail and rcpt lines",
        {},
        [
            (b"EHLO c", 250),
            (b"MAIL FROM:<> ENVID=" + b"e" * 591, 501),
            (b"MAIL FROM:<> ENVID=" + b"e" * 592, 500),
            (b"MAIL FROM:<>", 250),
            (b"RCPT TO:<a@b.example> NOTIFY=NEVER ORCPT=rfc822;" + b"o" * 962, 501),
            (b"RCPT TO:<a@b.example> NOTIFY=NEVER ORCPT=rfc822;" + b"o" * 963, 500),
            (b"NOOP " + b"x" * 508, 500),
        ],
    ),
    (
        "no dsn, no longer lines",
        {"extensions": set(EXTENSIONS) - {"DSN"}},
        [(b"EHLO c", 250), (b"MAIL FROM:<> X=" + b"e" * 500, 500)],
    ),
    ("ehlo without a name", {}, [(b"EHLO", 501), (b"HELO", 501)]),
    ("lhlo to an smtp server", {}, [(b"LHLO c", 500)]),
    ("ehlo to an lmtp server", {"lmtp": True}, [(b"EHLO c", 500), (b"LHLO c", 250)]),
    ("bad mail syntax", {}, [(b"EHLO c", 250), (b"MAIL <a@b.example>", 501)]),
    ("unclosed path", {}, [(b"EHLO c", 250), (b"MAIL FROM:<a@b.example", 501)]),
    ("quoted > in a path", {}, [(b"EHLO c", 250), (b'MAIL FROM:<"a>b"@c.example>', 250)]),
    ("empty recipient", {}, [(b"EHLO c", 250), (b"MAIL FROM:<>", 250), (b"RCPT TO:<>", 501)]),
    ("unknown mail parameter", {}, [(b"EHLO c", 250), (b"MAIL FROM:<> XFOO=1", 555)]),
    ("parameter after helo", {}, [(b"HELO c", 250), (b"MAIL FROM:<> SIZE=10", 555)]),
    (
        "dsn not offered",
        {"extensions": set(EXTENSIONS) - {"DSN"}},
        [
            (b"EHLO c", 250),
            (b"MAIL FROM:<> RET=HDRS", 555),
            (b"MAIL FROM:<>", 250),
            (b"RCPT TO:<a@b.example> NOTIFY=NEVER", 555),
        ],
    ),
    ("bad body", {}, [(b"EHLO c", 250), (b"MAIL FROM:<> BODY=BINARYMIME", 501)]),
    (
        "declared size over max",
        {"max_size": 100},
        [(b"EHLO c", 250), (b"MAIL FROM:<> SIZE=101", 552)],
    ),
    (
        "declared size at max",
        {"max_size": 100},
        [(b"EHLO c", 250), (b"MAIL FROM:<> SIZE=100", 250)],
    ),
    (
        "utf-8 address without SMTPUTF8",
        {},
        [
            (b"EHLO c", 250),
            ("MAIL FROM:<jörg@b.example>".encode(), 553),
            ("MAIL FROM:<jörg@b.example> SMTPUTF8".encode(), 250),
        ],
    ),
    (
        "too many recipients",
        {"max_recipients": 2},
        [
            (b"EHLO c", 250),
            (b"MAIL FROM:<>", 250),
            (b"RCPT TO:<a@b.example>", 250),
            (b"RCPT TO:<c@b.example>", 250),
            (b"RCPT TO:<d@b.example>", 452),
        ],
    ),
    ("auth without tls", {"auth": USERS}, [(b"EHLO c", 250), (b"AUTH PLAIN", 538)]),
    ("auth not offered", {}, [(b"EHLO c", 250), (b"AUTH PLAIN", 502)]),
    ("starttls without a certificate", {}, [(b"EHLO c", 250), (b"STARTTLS", 502)]),
    (
        "bdat without chunking",
        {"extensions": set(EXTENSIONS) - {"CHUNKING"}},
        [
            (b"EHLO c", 250),
            (b"MAIL FROM:<>", 250),
            (b"RCPT TO:<a@b.example>", 250),
            (b"BDAT 4 LAST\r\nab", 502),
            (b"NOOP", 250),
        ],
    ),
    ("bdat without recipients", {}, [(b"EHLO c", 250), (b"BDAT 3\r\na", 503), (b"NOOP", 250)]),
    (
        "data after bdat",
        {},
        [
            (b"EHLO c", 250),
            (b"MAIL FROM:<>", 250),
            (b"RCPT TO:<a@b.example>", 250),
            (b"BDAT 3\r\na", 250),
            (b"DATA", 503),
            (b"BDAT 2 LAST\r\n", 250),
        ],
    ),
    ("quit", {}, [(b"QUIT", 221)]),
]


@pytest.mark.parametrize(
    ("options", "steps"), [(o, s) for _, o, s in DIALOGUES], ids=[n for n, _, _ in DIALOGUES]
)
def test_each_command_gets_the_rfc_reply(
    options: dict[str, Any], steps: list[tuple[bytes, int]], raw: Any
) -> None:
    with SMTPTestServer(**options) as server:
        client = raw(server)
        for line, expected in steps:
            assert (line, client.command(line)) == (line, expected)


def test_ehlo_advertises_what_was_asked(raw: Any) -> None:
    with SMTPTestServer(
        extensions={"PIPELINING", "SIZE"}, max_size=5000, hostname="mx.test.invalid"
    ) as server:
        client = raw(server)
        client.send(b"EHLO c\r\n")
        assert client.reply() == [
            b"250-mx.test.invalid Hello c",
            b"250-PIPELINING",
            b"250 SIZE 5000",
        ]
        # Without ENHANCEDSTATUSCODES the replies carry none (RFC 2034 §3).
        client.send(b"NOOP\r\n")
        assert client.reply() == [b"250 Ok"]


def test_a_pipelined_group_is_answered_in_order(raw: Any) -> None:
    def rcpt(address: str, params: Parameters) -> tuple[int, str] | None:
        return (550, "5.1.1 no") if address.startswith("x@") else None

    with SMTPTestServer(rcpt=rcpt) as server:
        client = raw(server)
        assert client.command(b"EHLO c") == 250
        client.send(
            b"MAIL FROM:<a@b.example>\r\nRCPT TO:<x@b.example>\r\nRCPT TO:<y@b.example>\r\nDATA\r\n"
        )
        assert [client.code() for _ in range(4)] == [250, 550, 250, 354]
        client.send(b"Subject: s\r\n\r\n..x\r\n.\r\nRSET\r\nQUIT\r\n")
        assert [client.code() for _ in range(3)] == [250, 250, 221]
        (received,) = server.wait_for(1)
    assert received.rcpt_tos == ("y@b.example",)
    assert received.data == b"Subject: s\r\n\r\n.x\r\n"


def test_data_over_the_size_cap_is_refused_after_it_is_read(raw: Any) -> None:
    with SMTPTestServer(max_size=50) as server:
        client = raw(server)
        for line in (b"EHLO c", b"MAIL FROM:<>", b"RCPT TO:<a@b.example>"):
            assert client.command(line) == 250
        assert client.command(b"DATA") == 354
        client.send(b"x" * 40 + b"\r\n" + b"y" * 40 + b"\r\n.\r\n")
        assert client.reply() == [b"552 5.3.4 Message too big"]
        # The connection is still in step: the next transaction works.
        for line in (b"MAIL FROM:<>", b"RCPT TO:<a@b.example>"):
            assert client.command(line) == 250
        assert client.command(b"BDAT 30\r\n" + b"z" * 28) == 250
        assert client.command(b"BDAT 30 LAST\r\n" + b"z" * 28) == 552
        assert client.command(b"BDAT 2 LAST\r\n") == 503
        assert client.command(b"RSET") == 250
        for line in (b"MAIL FROM:<>", b"RCPT TO:<a@b.example>"):
            assert client.command(line) == 250
        assert client.command(b"DATA") == 354
        assert client.command(b"short\r\n.") == 250
        (received,) = server.wait_for(1)
    assert received.data == b"short\r\n"


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_mailrelay_refuses_a_message_over_the_advertised_size(flavour: Flavour) -> None:
    message = make_message(text="x" * 500)
    with SMTPTestServer(max_size=200) as server:
        result = send_with(flavour, message, **plain(server))
        assert server.messages == []
    assert [r.outcome for r in result.recipients] == [Outcome.PERMANENT] * 2


def test_an_idle_client_gets_421_after_the_timeout(raw: Any) -> None:
    with SMTPTestServer(timeout=0.3) as server:
        client = raw(server)
        assert client.reply()[0].startswith(b"421 4.4.2")
        (session,) = server.sessions
        session.wait_closed()
        assert "timeout" in session.events


# -- TLS and AUTH ------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_starttls_then_auth(flavour: Flavour, mechanism: str, tls_files: TLSFiles) -> None:
    message = make_message()
    with SMTPTestServer(tls=tls_files.server_context(), auth=USERS) as server:
        result = send_with(
            flavour,
            message,
            **secure(
                server,
                tls_files,
                username="bob",
                password="s3cret",
                auth_mechanisms=[mechanism],
            ),
        )
        (received,) = server.wait_for(1)
    assert result.ok
    assert received.tls
    assert received.authenticated == "bob"
    assert received.data == message.as_bytes()
    (session,) = server.sessions
    assert session.tls
    assert session.sent_before_tls == b""
    assert "authenticated as bob" in session.events


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_wrong_password(flavour: Flavour, tls_files: TLSFiles) -> None:
    with SMTPTestServer(tls=tls_files.server_context(), auth=USERS) as server:
        with pytest.raises(AuthenticationError):
            send_with(
                flavour,
                make_message(),
                **secure(server, tls_files, username="bob", password="wrong"),
            )
        assert server.messages == []


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_implicit_tls_and_the_url(flavour: Flavour, tls_files: TLSFiles) -> None:
    with SMTPTestServer(tls=tls_files.server_context(), implicit_tls=True) as server:
        assert server.url == f"smtps://127.0.0.1:{server.port}"
        result = send_with(
            flavour, make_message(), **plain(server, tls=TLS.IMPLICIT,
                                             ssl_context=tls_files.client_context())
        )  # fmt: skip
        (received,) = server.wait_for(1)
    assert result.ok
    assert received.tls


def test_auth_over_plain_text_only_when_allowed() -> None:
    with SMTPTestServer(auth=USERS) as server, smtplib.SMTP(server.host, server.port) as smtp:
        smtp.ehlo()
        assert not smtp.has_extn("auth")
        assert smtp.docmd("AUTH", "PLAIN")[0] == 538
    with (
        SMTPTestServer(auth=USERS, allow_insecure_auth=True) as server,
        smtplib.SMTP(server.host, server.port) as smtp,
    ):
        smtp.ehlo()
        assert smtp.has_extn("auth")
        with pytest.raises(smtplib.SMTPAuthenticationError):
            smtp.login("alice@example.com", "nope")
        assert smtp.login("alice@example.com", "alicepw")[0] == 235
        smtp.sendmail("alice@example.com", ["bob@example.com"], b"Subject: s\r\n\r\nhi\r\n")
        (received,) = server.wait_for(1)
    assert received.authenticated == "alice@example.com"
    assert not received.tls


@pytest.mark.parametrize(
    ("lines", "code"),
    [
        ([b"AUTH PLAIN " + base64.b64encode(b"\0bob\0s3cret")], 235),
        ([b"AUTH PLAIN " + base64.b64encode(b"bob\0bob\0s3cret")], 235),
        ([b"AUTH PLAIN " + base64.b64encode(b"alice@example.com\0bob\0s3cret")], 535),
        ([b"AUTH PLAIN", base64.b64encode(b"\0bob\0s3cret")], 235),
        ([b"AUTH PLAIN", b"*"], 501),
        ([b"AUTH PLAIN", b"not base64!"], 501),
        ([b"AUTH PLAIN " + base64.b64encode(b"no nuls")], 501),
        ([b"AUTH LOGIN " + base64.b64encode(b"bob"), base64.b64encode(b"s3cret")], 235),
        ([b"AUTH LOGIN", base64.b64encode(b"bob"), base64.b64encode(b"bad")], 535),
        ([b"AUTH CRAM-MD5"], 504),
    ],
)
def test_sasl_exchanges(lines: list[bytes], code: int, raw: Any) -> None:
    with SMTPTestServer(auth=USERS, allow_insecure_auth=True) as server:
        client = raw(server)
        assert client.command(b"EHLO c") == 250
        for line in lines[:-1]:
            assert client.command(line) == 334
        assert client.command(lines[-1]) == code
        if code == 235:
            assert client.command(lines[0]) == 503  # once per session (RFC 4954 §4)


def test_an_auth_line_may_be_longer_than_a_command(raw: Any) -> None:
    users = {"bob": "p" * 3000}
    initial = base64.b64encode(b"\0bob\0" + b"p" * 3000)
    with SMTPTestServer(auth=users, allow_insecure_auth=True) as server:
        client = raw(server)
        assert client.command(b"EHLO c") == 250
        assert client.command(b"NOOP " + b"x" * len(initial)) == 500
        assert client.command(b"AUTH PLAIN " + initial) == 235


def test_ipv6_loopback() -> None:
    with SMTPTestServer(host="::1") as server:
        assert server.url == f"smtp://[::1]:{server.port}?tls=none"
        with transport_from_url(server.url) as transport:
            assert transport.send(make_message()).ok
        (received,) = server.wait_for(1)
    assert received.peer[0] == "::1"


def test_plaintext_pipelined_after_starttls_is_recorded_and_dropped(
    raw: Any, tls_files: TLSFiles
) -> None:
    with SMTPTestServer(tls=tls_files.server_context()) as server:
        client = raw(server)
        assert client.command(b"EHLO c") == 250
        # The response-injection bug: a command glued to STARTTLS (RFC 3207 §4.2).
        client.send(b"STARTTLS\r\nRSET\r\n")
        assert client.code() == 220
        context = tls_files.client_context()
        with context.wrap_socket(client.sock, server_hostname="localhost") as tls:
            # RFC 3207 §4.2: the EHLO before the handshake is forgotten.
            tls.sendall(b"MAIL FROM:<>\r\n")
            assert tls.recv(4096).startswith(b"503 5.5.1")
            tls.sendall(b"EHLO c\r\n")
            reply = b""
            for _ in range(50):
                reply += tls.recv(4096)
                if re.search(rb"(^|\r\n)250 [^\r\n]*\r\n$", reply):
                    break
            # Forgotten before the handshake; STARTTLS no longer offered.
            assert b"STARTTLS" not in reply
            tls.sendall(b"QUIT\r\n")
            assert tls.recv(4096).startswith(b"221")
        (session,) = server.sessions
        session.wait_closed()
    assert session.sent_before_tls == b"RSET\r\n"
    assert session.tls


# -- faults, as the client sees them --------------------------------------------------------


def outcomes(result: DeliveryResult) -> list[tuple[Outcome, int | None]]:
    return [(r.outcome, r.reply.code if r.reply else None) for r in result.recipients]


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize(
    ("fault", "expected", "arrived"),
    [
        (
            Fault.reply("RCPT", 450, "4.2.1 try later"),
            [(Outcome.TRANSIENT, 450), (Outcome.ACCEPTED, 250)],
            ("carol@example.org",),
        ),
        (
            Fault.reply("RCPT", 550, "5.1.1 no such user", match="carol"),
            [(Outcome.ACCEPTED, 250), (Outcome.PERMANENT, 550)],
            ("bob@example.com",),
        ),
        (Fault.reply("MAIL", 550, "5.7.1 go away"), [(Outcome.PERMANENT, 550)] * 2, None),
        (Fault.reply("DATA", 451, "4.3.0 not now"), [(Outcome.TRANSIENT, 451)] * 2, None),
    ],
    ids=["rcpt-450", "rcpt-550-matched", "mail-550", "data-451"],
)
def test_reply_faults(
    flavour: Flavour,
    fault: Fault,
    expected: list[tuple[Outcome, int]],
    arrived: tuple[str, ...] | None,
) -> None:
    with SMTPTestServer(faults=[fault]) as server:
        result = send_with(flavour, make_message(), **plain(server))
        assert outcomes(result) == expected
        if arrived is None:
            assert server.messages == []
        else:
            assert [m.rcpt_tos for m in server.wait_for(1)] == [arrived]
        (session,) = server.sessions
    assert f"fault: reply at {fault.command}" in session.events


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize(
    ("fault", "error", "transient"),
    [
        (Fault.disconnect("RCPT"), ConnectionLost, True),
        (Fault.disconnect("DATA"), ConnectionLost, True),
        (Fault.disconnect_in_data(30), ConnectionLost, True),
        (Fault.shutdown("MAIL"), SessionRefused, True),
        (Fault.greeting(), SessionRefused, False),
        (Fault.greeting(421, "4.3.2 busy"), SessionRefused, True),
        (Fault.fail_starttls(), TLSError, None),
        (Fault.fail_starttls(handshake=True), TLSError, None),
    ],
    ids=lambda value: value.kind.value if isinstance(value, Fault) else None,
)
def test_session_faults_raise_the_documented_errors(
    flavour: Flavour,
    fault: Fault,
    error: type[DeliveryError],
    transient: bool | None,
    tls_files: TLSFiles,
) -> None:
    with SMTPTestServer(faults=[fault], tls=tls_files.server_context()) as server:
        with pytest.raises(error) as caught:
            send_with(flavour, make_message(), **secure(server, tls_files))
        assert server.messages == []
    if transient is not None:
        assert caught.value.is_transient is transient


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize(
    "fault", [Fault.delay("MAIL", 2.0), Fault.silence("EHLO")], ids=["delay", "silence"]
)
def test_slow_and_silent_servers_time_the_client_out(flavour: Flavour, fault: Fault) -> None:
    with SMTPTestServer(faults=[fault], timeout=2.0) as server, pytest.raises(DeliveryTimeout):
        send_with(flavour, make_message(), **plain(server, timeouts=Timeouts.all(0.3)))
    (session,) = server.sessions
    assert f"fault: {fault.kind.value} at {fault.command}" in session.events


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_short_delay_only_slows_the_reply(flavour: Flavour) -> None:
    with SMTPTestServer(faults=[Fault.delay("DATA", 0.2)]) as server:
        assert send_with(flavour, make_message(), **plain(server)).ok
        assert len(server.wait_for(1)) == 1


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_421_in_the_middle_of_a_pipelined_group(flavour: Flavour) -> None:
    messages = [make_message(subject=f"n{n}") for n in range(3)]
    fault = Fault.shutdown("RCPT", match="carol")  # the group's second RCPT
    with SMTPTestServer(faults=[fault]) as server:
        options = plain(server, pool=PoolSettings(size=1))
        results = send_many_with(flavour, list(messages), **options)
        received = server.wait_for(2)
        sessions = server.sessions
    assert outcomes(results[0]) == [(Outcome.TRANSIENT, 421)] * 2
    assert [r.ok for r in results[1:]] == [True, True]
    assert [m.data for m in received] == [m.as_bytes() for m in messages[1:]]
    assert len(sessions) == 2
    # The 421 answered the second RCPT: the first was answered, the rest of the group dropped.
    assert sessions[0].received.count(b"RCPT TO:") >= 2


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_the_pool_reconnects_after_a_421_on_a_reused_connection(flavour: Flavour) -> None:
    first = make_message(sender="first@example.com")
    second = make_message(sender="second@example.com")
    with SMTPTestServer(faults=[Fault.shutdown("MAIL", match="second@")]) as server:
        results = send_each_with(flavour, [first, second], **plain(server))
        received = server.wait_for(2)
        sessions = server.sessions
    assert [r.ok for r in results] == [True, True]
    assert [m.mail_from for m in received] == ["first@example.com", "second@example.com"]
    assert [m.session for m in received] == [0, 1]
    assert len(sessions) == 2
    assert "fault: shutdown at MAIL" in sessions[0].events


def test_a_554_greeting_refuses_everything_but_quit(raw: Any) -> None:
    with SMTPTestServer(faults=[Fault.greeting(554, "5.3.2 closed (test)")]) as server:
        client = raw(server, greeting=554)
        assert client.command(b"EHLO c") == 503
        assert client.command(b"MAIL FROM:<>") == 503
        assert client.command(b"QUIT") == 221
        # The fault was used once: the next connection is greeted normally.
        raw(server, greeting=220)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_failed_starttls_with_opportunistic_tls_goes_on_in_plain_text(
    flavour: Flavour, tls_files: TLSFiles
) -> None:
    with SMTPTestServer(tls=tls_files.server_context(), faults=[Fault.fail_starttls()]) as server:
        options = secure(server, tls_files, tls=TLS.OPPORTUNISTIC)
        assert send_with(flavour, make_message(), **options).ok
        (received,) = server.wait_for(1)
    assert not received.tls
    assert server.sessions[0].lines[1] == b"STARTTLS"


def test_fault_times_and_every_time() -> None:
    faults = [Fault.reply("RCPT", 451, "4.3.0 again", times=2, match="bob")]
    with SMTPTestServer(faults=faults) as server, SMTPTransport(**plain(server)) as transport:
        codes = [outcomes(transport.send(make_message()))[0][1] for _ in range(3)]
    assert codes == [451, 451, 250]
    always = Fault.reply("NOOP", 250, "2.0.0 fine", times=None)
    with (
        SMTPTestServer(faults=[always]) as server,
        smtplib.SMTP(server.host, server.port) as smtp,
    ):
        assert [smtp.noop()[1] for _ in range(3)] == [b"2.0.0 fine"] * 3


@pytest.mark.parametrize(
    ("build", "problem"),
    [
        (lambda: Fault.reply("RCPT", 600, "x"), "200-599"),
        (lambda: Fault.reply("FROB", 450, "x"), "unknown command"),
        (lambda: Fault.reply("RCPT", 450, "x\r\n250 injected"), "CR"),
        (lambda: Fault.disconnect("RCPT", times=0), "at least 1"),
        (lambda: Fault.delay("MAIL", -1.0), "0.0"),
        (lambda: Fault(kind=FaultKind.DISCONNECT), "needs a command"),
        (lambda: Fault.reply("RCPT", 450, "x", match="(unclosed"), "regular expression"),
        (lambda: SMTPTestServer(extensions={"XFOO"}), "unknown extensions"),
        (lambda: SMTPTestServer(implicit_tls=True), "needs a tls context"),
        (lambda: SMTPTestServer(hostname="a b"), "not a host name"),
        (lambda: SMTPTestServer(timeout=0), "positive"),
    ],
)
def test_bad_options_are_refused(build: Any, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        build()


# -- hooks and LMTP --------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_hooks_choose_the_replies(flavour: Flavour) -> None:
    seen: list[tuple[str, Parameters]] = []

    def rcpt(address: str, params: Parameters) -> Reply | tuple[int, str] | None:
        seen.append((address, params))
        return Reply.of(452, "4.2.2 mailbox full") if address.startswith("carol") else None

    def data(message: ReceivedMessage, recipient: str | None) -> tuple[int, str]:
        assert recipient is None
        return (250, "2.0.0 kept\nas test-1")

    with SMTPTestServer(rcpt=rcpt, data=data) as server:
        result = send_with(flavour, make_message(), **plain(server))
        (received,) = server.wait_for(1)
    assert outcomes(result) == [(Outcome.ACCEPTED, 250), (Outcome.TRANSIENT, 452)]
    assert result.recipients[0].reply is not None
    assert result.recipients[0].reply.lines == ("2.0.0 kept", "as test-1")
    assert seen == [("bob@example.com", ()), ("carol@example.org", ())]
    assert received.rcpt_tos == ("bob@example.com",)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_refused_message_is_not_recorded(flavour: Flavour) -> None:
    with SMTPTestServer(data=lambda message, recipient: (554, "5.7.1 spam")) as server:
        result = send_with(flavour, make_message(), **plain(server))
        assert server.messages == []
    assert outcomes(result) == [(Outcome.PERMANENT, 554)] * 2


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("chunking", [False, True])
def test_lmtp_answers_once_per_recipient(flavour: Flavour, chunking: bool) -> None:
    answers = {"fail": (550, "5.1.1 gone"), "later": (452, "4.2.2 full")}
    calls: list[str | None] = []

    def data(message: ReceivedMessage, recipient: str | None) -> tuple[int, str] | None:
        calls.append(recipient)
        return answers.get((recipient or "").partition("@")[0])

    message = make_message(to=("ok@example.com", "fail@example.com", "later@example.com"))
    with SMTPTestServer(lmtp=True, data=data) as server:
        assert server.url == f"lmtp://127.0.0.1:{server.port}"
        result = send_with(flavour, message, lmtp=True, **plain(server, chunking=chunking))
        (received,) = server.wait_for(1)
    assert outcomes(result) == [
        (Outcome.ACCEPTED, 250),
        (Outcome.PERMANENT, 550),
        (Outcome.TRANSIENT, 452),
    ]
    assert calls == ["ok@example.com", "fail@example.com", "later@example.com"]
    assert received.rcpt_tos == ("ok@example.com",)
    assert received.data == message.as_bytes()
    assert received.ehlo_name is not None


def test_transport_from_url() -> None:
    with SMTPTestServer() as server:
        assert server.url == f"smtp://127.0.0.1:{server.port}?tls=none"
        with transport_from_url(server.url) as transport:
            assert transport.send(make_message()).ok
        assert len(server.wait_for(1)) == 1


# -- life and limits ---------------------------------------------------------------------------


def test_every_thread_and_socket_ends_with_the_block() -> None:
    before = set(threading.enumerate())
    server = SMTPTestServer(timeout=5)
    with server:
        idle = socket.create_connection((server.host, server.port), timeout=5)
        assert idle.recv(100).startswith(b"220 ")
        with smtplib.SMTP(server.host, server.port) as smtp:
            smtp.noop()
        assert len(set(threading.enumerate()) - before) >= 2
    # The idle client was disconnected, not waited for.
    assert idle.recv(100) == b""
    idle.close()
    assert set(threading.enumerate()) - before == set()
    assert all(session.closed for session in server.sessions)
    with (
        pytest.raises(ConnectionRefusedError),
        socket.create_connection((server.host, server.port), timeout=5),
    ):
        pass


def test_messages_can_be_read_while_threads_send() -> None:
    subjects = [f"thread {t} message {n}" for t in range(4) for n in range(5)]
    seen_counts: list[int] = []
    with SMTPTestServer() as server, SMTPTransport(**plain(server)) as transport:

        def send(thread: int) -> None:
            for subject in subjects[thread * 5 : thread * 5 + 5]:
                assert transport.send(make_message(subject=subject)).ok

        threads = [threading.Thread(target=send, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for _ in range(50):
            seen_counts.append(len(server.messages))
            if seen_counts[-1] == len(subjects):
                break
            server.wait_for(min(len(subjects), seen_counts[-1] + 1), timeout=10)
        for thread in threads:
            thread.join(timeout=30)
        received = server.wait_for(len(subjects))
    assert seen_counts == sorted(seen_counts)
    arrived = sorted(
        re.search(rb"Subject: (.*?)\r\n", m.data).group(1).decode()  # type: ignore[union-attr]
        for m in received
    )
    assert arrived == sorted(subjects)


def test_wait_for_is_bounded() -> None:
    with SMTPTestServer() as server:
        with pytest.raises(TimeoutError, match="0 of 1 messages"):
            server.wait_for(1, timeout=0.05)
        with SMTPTransport(**plain(server)) as transport:
            transport.send(make_message())
        assert len(server.wait_for(1, timeout=5)) == 1
        server.clear()
        assert server.messages == []


def test_a_server_starts_once() -> None:
    with SMTPTestServer() as server, pytest.raises(RuntimeError, match="only once"):
        server.start()


def test_a_failing_hook_is_reported_when_the_block_ends() -> None:
    def broken(address: str, params: Parameters) -> None:
        raise KeyError(address)

    server = SMTPTestServer(rcpt=broken)
    with pytest.raises(RuntimeError, match="KeyError"), server, pytest.raises(DeliveryError):
        send_with("sync", make_message(), **plain(server))
    assert any("server error" in e for e in server.sessions[0].events)


# -- the property ----------------------------------------------------------------------------


@pytest.mark.parametrize("chunking", [False, True])
def test_arbitrary_messages_arrive_byte_identical(chunking: bool) -> None:
    with SMTPTestServer() as server, SMTPTransport(**plain(server, chunking=chunking)) as smtp:

        @settings(
            max_examples=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        )
        @given(raw=st.one_of(message_bytes(max_size=4096), st.binary(min_size=1, max_size=2048)))
        def check(raw: bytes) -> None:
            message = Message.from_bytes(raw)
            server.clear()
            result = smtp.send(message, Envelope("a@example.com", (Recipient("b@example.com"),)))
            assert result.ok
            (received,) = server.wait_for(1)
            expected = Message.from_bytes(raw).as_bytes()
            if not chunking and expected and not expected.endswith(b"\r\n"):
                # DATA cannot carry an unterminated last line: the client ends it with the
                # CRLF of the terminator (RFC 5321 §4.1.1.4), and that CRLF arrives. BDAT can.
                expected += b"\r\n"
            assert received.data == expected

        check()


# -- the docs ----------------------------------------------------------------------------------


def test_the_docs_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks(DOC.read_text(encoding="utf-8"))
    assert len(blocks) >= 3
    namespace: dict[str, object] = {"__name__": "docs_test_server"}
    for number, block in enumerate(blocks, start=1):
        exec(compile(block, f"{DOC.name} block {number}", "exec"), namespace)  # our own doc


def test_the_docs_tls_example_compiles_and_its_imports_resolve() -> None:
    blocks = server_blocks(DOC.read_text(encoding="utf-8"))
    assert blocks
    for number, block in enumerate(blocks, start=1):
        tree = ast.parse(block, f"{DOC.name} py block {number}")
        imports = ast.Module(
            body=[node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)],
            type_ignores=[],
        )
        exec(compile(imports, f"{DOC.name} py block {number}", "exec"), {})
