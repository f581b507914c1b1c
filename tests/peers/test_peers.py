"""The test peers work: each fixture is exercised with the stdlib's smtplib or a raw socket.

These tests check the fixtures, not mailrelay (whose client does not need to exist for them).
"""

from __future__ import annotations

import base64
import email
import hashlib
import hmac
import shutil
import smtplib
import socket
import ssl
import subprocess
import tempfile
import uuid
from email.message import EmailMessage
from email.policy import SMTPUTF8
from pathlib import Path

import pytest

from tests.peers.aiosmtpd_server import DATA_SIZE_LIMIT, AiosmtpdServer
from tests.peers.postfix import (
    IDLE_TIMEOUT,
    MESSAGE_SIZE_LIMIT,
    USERS,
    PostfixInstance,
    missing_requirements,
)
from tests.peers.scripted import (
    ANY,
    Action,
    ScriptedServerFactory,
    Step,
    accept_message,
    ehlo,
    greeting,
    quit_step,
)
from tests.peers.sink import SMTPSink, run_smtp_source
from tests.peers.tls import TLSFiles

ALICE = "alice@mailrelay.test"
BOB = "bob@mailrelay.test"
TIMEOUT = 10.0


def _message(subject: str, body: str = "hello from the peer tests\n") -> bytes:
    msg = EmailMessage()
    msg["From"] = ALICE
    msg["To"] = BOB
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{uuid.uuid4().hex}@mailrelay.test>"
    msg.set_content(body)
    return msg.as_bytes()


def _client_context(tls_files: TLSFiles) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(tls_files.ca_file))


def _raw_connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    sock.settimeout(TIMEOUT)
    return sock


def _read_until(sock: socket.socket, needle: bytes, limit: int = 1 << 20) -> bytes:
    """Read until ``needle`` arrives, EOF, or ``limit`` bytes (bounded)."""
    data = b""
    while needle not in data and len(data) < limit:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


# -- Postfix ------------------------------------------------------------------------------


def test_this_machine_can_run_postfix() -> None:
    assert missing_requirements() == []


@pytest.mark.postfix
def test_a_second_postfix_instance_runs_beside_the_first_and_stops(
    postfix: PostfixInstance, tls_files: TLSFiles
) -> None:
    # Not tmp_path: pytest's base directory is 0700, and virtual(8) delivers as nobody.
    root = Path(tempfile.mkdtemp(prefix="mailrelay-postfix-"))
    second = PostfixInstance(root, tls_files)
    assert second.smtp_port != postfix.smtp_port
    second.setup()
    try:
        second.start()
        with smtplib.SMTP(second.host, second.smtp_port, timeout=TIMEOUT) as client:
            client.sendmail("someone@example.org", [BOB], _message("second instance"))
        assert len(second.wait_for_delivery("bob", 1, timeout=TIMEOUT)) == 1
        assert all(b"second instance" not in raw for raw in postfix.read_maildir("bob"))
    finally:
        second.stop()
        shutil.rmtree(root)
    assert second.master_pid is not None
    assert not Path(f"/proc/{second.master_pid}").exists()


@pytest.mark.postfix
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_postfix_delivers_to_maildir(postfix_clean: PostfixInstance, host: str) -> None:
    subject = f"maildir {uuid.uuid4().hex}"
    with smtplib.SMTP(host, postfix_clean.smtp_port, timeout=TIMEOUT) as client:
        refused = client.sendmail("someone@example.org", [ALICE], _message(subject))
    assert refused == {}
    (raw,) = postfix_clean.wait_for_delivery("alice", 1, timeout=TIMEOUT)
    delivered = email.message_from_bytes(raw)
    assert delivered["Subject"] == subject
    assert delivered["Delivered-To"] == ALICE
    assert "hello from the peer tests" in delivered.get_payload()
    assert postfix_clean.read_maildir("bob") == []


@pytest.mark.postfix
def test_postfix_clear_maildirs(postfix_clean: PostfixInstance) -> None:
    with smtplib.SMTP(postfix_clean.host, postfix_clean.smtp_port, timeout=TIMEOUT) as client:
        client.sendmail("someone@example.org", [BOB], _message("to be cleared"))
    postfix_clean.wait_for_delivery("bob", 1, timeout=TIMEOUT)
    postfix_clean.clear_maildirs()
    assert postfix_clean.read_maildir("bob") == []


def _scram_sha256(client: smtplib.SMTP, username: str, password: str) -> int:
    """A minimal SCRAM-SHA-256 client (RFC 5802 §3, RFC 7677); returns the final reply code."""
    b64 = base64.b64encode
    client_first_bare = f"n={username},r={b64(uuid.uuid4().bytes).decode()}"
    code, challenge = client.docmd(
        "AUTH", "SCRAM-SHA-256 " + b64(b"n,," + client_first_bare.encode()).decode()
    )
    assert code == 334, challenge
    server_first = base64.b64decode(challenge).decode()
    fields = dict(item.split("=", 1) for item in server_first.split(","))
    salted = hashlib.pbkdf2_hmac(
        "sha256", password.encode(), base64.b64decode(fields["s"]), int(fields["i"])
    )
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    without_proof = f"c=biws,r={fields['r']}"
    auth_message = f"{client_first_bare},{server_first},{without_proof}".encode()
    signature = hmac.new(hashlib.sha256(client_key).digest(), auth_message, "sha256").digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    code, challenge = client.docmd(
        b64(f"{without_proof},p={b64(proof).decode()}".encode()).decode()
    )
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    expected = b64(hmac.new(server_key, auth_message, "sha256").digest()).decode()
    # Postfix sends the server-final message as a 334 challenge; an empty line answers it.
    assert (code, base64.b64decode(challenge).decode()) == (334, f"v={expected}")
    return client.docmd("")[0]


@pytest.mark.postfix
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256"])
def test_postfix_submission_starttls_then_auth(
    postfix_clean: PostfixInstance, tls_files: TLSFiles, mechanism: str
) -> None:
    with smtplib.SMTP(postfix_clean.host, postfix_clean.submission_port, timeout=TIMEOUT) as c:
        c.ehlo()
        assert c.has_extn("starttls")
        assert not c.has_extn("auth"), "AUTH must not be offered before TLS here"
        c.starttls(context=_client_context(tls_files))
        c.ehlo()
        assert set(c.esmtp_features["auth"].split()) == {
            "PLAIN",
            "LOGIN",
            "CRAM-MD5",
            "SCRAM-SHA-256",
        }
        c.user, c.password = ALICE, USERS[ALICE]
        if mechanism == "PLAIN":
            code, _ = c.auth(mechanism, c.auth_plain)
        elif mechanism == "LOGIN":
            code, _ = c.auth(mechanism, c.auth_login, initial_response_ok=False)
        elif mechanism == "CRAM-MD5":
            code, _ = c.auth(mechanism, c.auth_cram_md5, initial_response_ok=False)
        else:
            code = _scram_sha256(c, ALICE, USERS[ALICE])
        assert code == 235
        c.sendmail(ALICE, [BOB], _message(f"auth {mechanism}"))
    (raw,) = postfix_clean.wait_for_delivery("bob", 1, timeout=TIMEOUT)
    received = email.message_from_bytes(raw)["Received"]
    assert "Authenticated sender: alice@mailrelay.test" in received
    assert "using TLS" in received


@pytest.mark.postfix
def test_postfix_wrong_password_is_535(postfix: PostfixInstance, tls_files: TLSFiles) -> None:
    with smtplib.SMTP(postfix.host, postfix.submission_port, timeout=TIMEOUT) as client:
        client.starttls(context=_client_context(tls_files))
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            client.login(ALICE, "not-the-password")
    assert refused.value.smtp_code == 535


@pytest.mark.postfix
def test_postfix_submission_refuses_mail_before_starttls(postfix: PostfixInstance) -> None:
    with smtplib.SMTP(postfix.host, postfix.submission_port, timeout=TIMEOUT) as client:
        code, text = client.docmd("MAIL FROM:<alice@mailrelay.test>")
    assert (code, text.split()[0]) == (530, b"5.7.0")


@pytest.mark.postfix
def test_postfix_implicit_tls(postfix_clean: PostfixInstance, tls_files: TLSFiles) -> None:
    with smtplib.SMTP_SSL(
        "localhost", postfix_clean.smtps_port, timeout=TIMEOUT, context=_client_context(tls_files)
    ) as client:
        client.login(BOB, USERS[BOB])
        client.sendmail(BOB, [ALICE], _message("implicit tls"))
    (raw,) = postfix_clean.wait_for_delivery("alice", 1, timeout=TIMEOUT)
    assert "Authenticated sender: bob@mailrelay.test" in email.message_from_bytes(raw)["Received"]


@pytest.mark.postfix
def test_postfix_per_recipient_replies_in_one_transaction(postfix_clean: PostfixInstance) -> None:
    cases = [
        (ALICE, 250, b"2.1.5"),
        ("nobody@mailrelay.test", 550, b"5.1.1"),
        ("x@tempfail.mailrelay.test", 450, b"4.7.1"),
        ("x@reject.mailrelay.test", 550, b"5.7.1"),
        ("x@sink.mailrelay.test", 250, b"2.1.5"),
        ("x@example.org", 554, b"5.7.1"),
    ]
    with smtplib.SMTP(postfix_clean.host, postfix_clean.smtp_port, timeout=TIMEOUT) as client:
        client.ehlo()
        assert client.mail("sender@example.org")[0] == 250
        answers = [client.rcpt(address) for address, _, _ in cases]
        assert client.data(_message("mixed recipients"))[0] == 250
    assert [(code, text.split()[0]) for code, text in answers] == [
        (code, status) for _, code, status in cases
    ]
    assert len(postfix_clean.wait_for_delivery("alice", 1, timeout=TIMEOUT)) == 1


@pytest.mark.postfix
def test_postfix_refuses_declared_size_over_the_limit(postfix: PostfixInstance) -> None:
    with smtplib.SMTP(postfix.host, postfix.smtp_port, timeout=TIMEOUT) as client:
        client.ehlo()
        assert client.esmtp_features["size"] == str(MESSAGE_SIZE_LIMIT)
        code, text = client.mail(ALICE, [f"SIZE={MESSAGE_SIZE_LIMIT + 1}"])
        assert (code, text.split()[0]) == (552, b"5.3.4")
        assert client.mail(ALICE, [f"SIZE={MESSAGE_SIZE_LIMIT}"])[0] == 250


@pytest.mark.postfix
@pytest.mark.parametrize(
    ("port_name", "offered"),
    [
        ("smtp_port", {"pipelining", "chunking", "starttls", "auth"}),
        ("plain_port", {"pipelining", "chunking"}),
        ("no_pipelining_port", {"starttls", "auth"}),
    ],
)
def test_postfix_ehlo_keywords_per_port(
    postfix: PostfixInstance, port_name: str, offered: set[str]
) -> None:
    optional = ("pipelining", "chunking", "starttls", "auth")
    with smtplib.SMTP(postfix.host, getattr(postfix, port_name), timeout=TIMEOUT) as client:
        assert client.ehlo()[0] == 250
        assert {keyword for keyword in optional if client.has_extn(keyword)} == offered
        assert all(client.has_extn(keyword) for keyword in ("smtputf8", "dsn", "8bitmime"))


@pytest.mark.postfix
def test_postfix_helo_only_port_refuses_ehlo(postfix: PostfixInstance) -> None:
    with smtplib.SMTP(postfix.host, postfix.helo_only_port, timeout=TIMEOUT) as client:
        code, text = client.ehlo()
        assert (code, text.split()[0]) == (500, b"5.5.2")
        assert client.helo()[0] == 250
        assert client.mail("someone@example.org")[0] == 250


@pytest.mark.postfix
def test_postfix_closes_an_idle_connection_with_421(postfix: PostfixInstance) -> None:
    with _raw_connect(postfix.idle_timeout_port) as sock:
        assert _read_until(sock, b"\r\n").startswith(b"220 ")
        sock.sendall(b"EHLO client.mailrelay.test\r\n")
        _read_until(sock, b"250 ")
        sock.settimeout(IDLE_TIMEOUT + TIMEOUT)
        # Nothing more is sent: Postfix gives up waiting, says 421 and closes (read to EOF).
        rest = _read_until(sock, b"never sent")
    assert rest.split(b"\r\n")[-2].startswith(b"421 4.4.2 ")


@pytest.mark.postfix
def test_postfix_logs_dsn_parameters_and_sends_success_dsn(
    postfix_clean: PostfixInstance,
) -> None:
    envid = f"peer-{uuid.uuid4().hex}"
    with smtplib.SMTP(postfix_clean.host, postfix_clean.smtp_port, timeout=TIMEOUT) as client:
        client.sendmail(
            ALICE,
            [BOB],
            _message("dsn"),
            mail_options=["RET=HDRS", f"ENVID={envid}"],
            rcpt_options=["NOTIFY=SUCCESS", "ORCPT=rfc822;bob@mailrelay.test"],
        )
    log = postfix_clean.wait_for_log(f"ENVID={envid}", timeout=TIMEOUT)
    assert "NOTIFY=SUCCESS ORCPT=rfc822;bob@mailrelay.test" in log
    postfix_clean.wait_for_delivery("bob", 1, timeout=TIMEOUT)
    (dsn,) = postfix_clean.wait_for_delivery("alice", 1, timeout=TIMEOUT)
    assert b"multipart/report; report-type=delivery-status" in dsn
    assert f"Original-Envelope-Id: {envid}".encode() in dsn
    assert b"Original-Recipient: rfc822;bob@mailrelay.test" in dsn
    assert b"Action: delivered" in dsn


@pytest.mark.postfix
def test_postfix_accepts_smtputf8(postfix_clean: PostfixInstance) -> None:
    msg = EmailMessage(policy=SMTPUTF8)
    msg["From"] = "jörg@exämple.org"
    msg["To"] = ALICE
    msg["Subject"] = "grüße"
    msg.set_content("ünïcödé body\n", cte="8bit")
    with smtplib.SMTP(postfix_clean.host, postfix_clean.smtp_port, timeout=TIMEOUT) as client:
        client.send_message(msg, mail_options=["BODY=8BITMIME"])
    (raw,) = postfix_clean.wait_for_delivery("alice", 1, timeout=TIMEOUT)
    assert "Subject: grüße".encode() in raw
    assert "ünïcödé body".encode() in raw
    assert "jörg@exämple.org".encode() in raw


# -- aiosmtpd -----------------------------------------------------------------------------


def test_aiosmtpd_records_an_smtputf8_envelope(aiosmtpd_server: AiosmtpdServer) -> None:
    content = "Subject: grüße\r\n\r\n.leading dot and ünïcödé\r\n".encode()
    with smtplib.SMTP(aiosmtpd_server.host, aiosmtpd_server.port, timeout=TIMEOUT) as client:
        client.ehlo("client.mailrelay.test")
        assert client.has_extn("smtputf8")
        assert client.has_extn("8bitmime")
        assert client.esmtp_features["size"] == str(DATA_SIZE_LIMIT)
        client.command_encoding = "utf-8"
        refused = client.sendmail(
            "jörg@exämple.org",
            ["ålice@mailrelay.test", "bob@mailrelay.test"],
            content,
            mail_options=["SMTPUTF8", "BODY=8BITMIME"],
        )
    assert refused == {}
    (got,) = aiosmtpd_server.messages
    assert got.mail_from == "jörg@exämple.org"
    assert got.rcpt_tos == ("ålice@mailrelay.test", "bob@mailrelay.test")
    assert got.rcpt_options == ((), ())
    assert set(got.mail_options) >= {"SMTPUTF8", "BODY=8BITMIME"}
    assert got.smtputf8
    assert got.content == content
    assert got.helo_name == "client.mailrelay.test"
    assert (got.tls, got.auth_login, got.protocol) == (False, None, "SMTP")


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
@pytest.mark.parametrize("starttls", [False, True])
def test_aiosmtpd_auth(
    aiosmtpd_server: AiosmtpdServer, tls_files: TLSFiles, mechanism: str, starttls: bool
) -> None:
    with smtplib.SMTP(aiosmtpd_server.host, aiosmtpd_server.port, timeout=TIMEOUT) as client:
        client.ehlo()
        if starttls:
            client.starttls(context=_client_context(tls_files))
            client.ehlo()
        assert set(client.esmtp_features["auth"].split()) == {"PLAIN", "LOGIN"}
        client.user, client.password = BOB, USERS[BOB]
        if mechanism == "PLAIN":
            assert client.auth(mechanism, client.auth_plain)[0] == 235
        else:
            assert client.auth(mechanism, client.auth_login)[0] == 235
        client.sendmail(BOB, [ALICE], b"Subject: auth\r\n\r\nbody\r\n")
    (got,) = aiosmtpd_server.messages
    assert (got.auth_login, got.tls) == (BOB, starttls)


def test_aiosmtpd_wrong_password_is_535(aiosmtpd_server: AiosmtpdServer) -> None:
    with (
        smtplib.SMTP(aiosmtpd_server.host, aiosmtpd_server.port, timeout=TIMEOUT) as client,
        pytest.raises(smtplib.SMTPAuthenticationError) as refused,
    ):
        client.login(BOB, "wrong")
    assert refused.value.smtp_code == 535


def test_aiosmtpd_scripted_rcpt_replies(aiosmtpd_server: AiosmtpdServer) -> None:
    with smtplib.SMTP(aiosmtpd_server.host, aiosmtpd_server.port, timeout=TIMEOUT) as client:
        client.ehlo()
        client.mail(ALICE)
        answers = [
            client.rcpt(address)[0] for address in ("tempfail@x.test", "reject@x.test", "ok@x.test")
        ]
        assert client.data(b"Subject: x\r\n\r\nx\r\n")[0] == 250
    assert answers == [450, 550, 250]
    assert aiosmtpd_server.messages[0].rcpt_tos == ("ok@x.test",)


def test_aiosmtpd_implicit_tls(aiosmtpd_smtps: AiosmtpdServer, tls_files: TLSFiles) -> None:
    with smtplib.SMTP_SSL(
        aiosmtpd_smtps.host,
        aiosmtpd_smtps.port,
        timeout=TIMEOUT,
        context=_client_context(tls_files),
    ) as client:
        client.login(ALICE, USERS[ALICE])
        client.sendmail(ALICE, [BOB], b"Subject: smtps\r\n\r\nbody\r\n")
    (got,) = aiosmtpd_smtps.messages
    assert (got.tls, got.auth_login) == (True, ALICE)


def _lmtp_exchange(client: smtplib.LMTP, recipients: list[str]) -> list[int]:
    client.ehlo()  # smtplib's LMTP sends LHLO
    assert client.mail(ALICE)[0] == 250
    for address in recipients:
        assert client.rcpt(address)[0] == 250
    codes = [client.data(b"Subject: lmtp\r\n\r\nbody\r\n")[0]]
    # RFC 2033 §4.2: one reply per accepted recipient after the final dot.
    codes += [client.getreply()[0] for _ in recipients[1:]]
    return codes


def test_aiosmtpd_lmtp_per_recipient_replies(aiosmtpd_lmtp: AiosmtpdServer) -> None:
    recipients = ["a@mailrelay.test", "fail@mailrelay.test", "later@mailrelay.test"]
    with smtplib.LMTP(aiosmtpd_lmtp.host, aiosmtpd_lmtp.port, timeout=TIMEOUT) as client:
        assert _lmtp_exchange(client, recipients) == [250, 550, 452]
    (got,) = aiosmtpd_lmtp.messages
    assert (got.protocol, got.rcpt_tos) == ("LMTP", tuple(recipients))


def test_aiosmtpd_lmtp_refuses_ehlo(aiosmtpd_lmtp: AiosmtpdServer) -> None:
    with smtplib.SMTP(aiosmtpd_lmtp.host, aiosmtpd_lmtp.port, timeout=TIMEOUT) as client:
        assert client.ehlo()[0] == 500


def test_aiosmtpd_lmtp_over_a_unix_socket(aiosmtpd_lmtp_unix: AiosmtpdServer) -> None:
    assert aiosmtpd_lmtp_unix.unix_socket is not None
    with smtplib.LMTP(str(aiosmtpd_lmtp_unix.unix_socket), timeout=TIMEOUT) as client:
        assert _lmtp_exchange(client, ["x@a.test", "later@a.test"]) == [250, 452]


# -- scripted server ----------------------------------------------------------------------


def test_scripted_server_runs_a_session_and_records_bytes(
    scripted_server: ScriptedServerFactory,
) -> None:
    server = scripted_server(
        [[greeting(), ehlo("PIPELINING", "8BITMIME"), *accept_message(2), quit_step()]]
    )
    with smtplib.SMTP(server.host, server.port, timeout=TIMEOUT) as client:
        client.sendmail("a@x.test", ["b@x.test", "c@x.test"], b"Subject: s\r\n\r\n.dot\r\n")
    session = server.session(0)
    assert session.lines[1:4] == [
        b"mail FROM:<a@x.test>",
        b"rcpt TO:<b@x.test>",
        b"rcpt TO:<c@x.test>",
    ]
    assert b"\r\n..dot\r\n.\r\n" in session.received  # dot-stuffed on the wire
    assert session.events[-1] in {"closed by script", "script finished"}


def test_scripted_server_421_in_a_pipelined_group(scripted_server: ScriptedServerFactory) -> None:
    server = scripted_server(
        [
            [
                greeting(),
                ehlo("PIPELINING"),
                Step(expect=r"MAIL FROM:<.*>", reply=b"250 2.1.0 Ok\r\n"),
                Step(
                    expect=r"RCPT TO:<.*>",
                    reply=b"421 4.3.2 Shutting down\r\n",
                    action=Action.CLOSE,
                ),
            ]
        ]
    )
    with _raw_connect(server.port) as sock:
        _read_until(sock, b"\r\n")
        sock.sendall(b"EHLO c\r\n")
        _read_until(sock, b"250 PIPELINING\r\n")
        sock.sendall(
            b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nRCPT TO:<c@x.test>\r\nDATA\r\n"
        )
        replies = _read_until(sock, b"never sent")
    assert replies == b"250 2.1.0 Ok\r\n421 4.3.2 Shutting down\r\n"
    assert server.session(0).received.endswith(b"RCPT TO:<c@x.test>\r\nDATA\r\n")


def test_scripted_server_disconnects_mid_data(scripted_server: ScriptedServerFactory) -> None:
    server = scripted_server(
        [
            [
                greeting(),
                ehlo(),
                Step(expect="MAIL.*", reply=b"250 Ok\r\n"),
                Step(expect="RCPT.*", reply=b"250 Ok\r\n"),
                Step(expect="DATA", reply=b"354 Go\r\n"),
                Step(expect=ANY, action=Action.CLOSE),
            ]
        ]
    )
    with (
        smtplib.SMTP(server.host, server.port, timeout=TIMEOUT) as client,
        pytest.raises(smtplib.SMTPServerDisconnected),
    ):
        client.sendmail("a@x.test", ["b@x.test"], b"Subject: s\r\n\r\nbody\r\n")
    assert "closed by script" in server.session(0).events


def test_scripted_server_starttls(
    scripted_server: ScriptedServerFactory, tls_files: TLSFiles
) -> None:
    server = scripted_server(
        [
            [
                greeting(),
                ehlo("STARTTLS"),
                Step(expect="STARTTLS", reply=b"220 2.0.0 Ready\r\n", action=Action.START_TLS),
                ehlo("AUTH PLAIN"),
                quit_step(),
            ]
        ]
    )
    with smtplib.SMTP(
        "localhost", server.port, local_hostname="client.mailrelay.test", timeout=TIMEOUT
    ) as client:
        client.starttls(context=_client_context(tls_files))
        client.ehlo()
        assert client.has_extn("auth")
    session = server.session(0)
    assert "tls" in session.events
    assert session.lines[-2:] == [b"ehlo client.mailrelay.test", b"QUIT"]


def test_scripted_server_injects_plaintext_after_starttls(
    scripted_server: ScriptedServerFactory,
) -> None:
    injected = b"250-injected before the handshake\r\n"
    server = scripted_server(
        [
            [
                greeting(),
                ehlo("STARTTLS"),
                Step(
                    expect="STARTTLS",
                    reply=b"220 2.0.0 Ready\r\n" + injected,
                    action=Action.START_TLS,
                ),
            ]
        ]
    )
    with _raw_connect(server.port) as sock:
        _read_until(sock, b"\r\n")
        sock.sendall(b"EHLO c\r\n")
        _read_until(sock, b"250 STARTTLS\r\n")
        sock.sendall(b"STARTTLS\r\n")
        after = _read_until(sock, injected)
    assert after == b"220 2.0.0 Ready\r\n" + injected
    assert any(
        event.startswith(("tls-failed", "socket error")) for event in server.session(0).events
    )


def test_scripted_server_fails_the_tls_handshake(
    scripted_server: ScriptedServerFactory, tls_files: TLSFiles
) -> None:
    server = scripted_server(
        [
            [
                greeting(),
                ehlo("STARTTLS"),
                Step(expect="STARTTLS", reply=b"220 2.0.0 Ready\r\n", action=Action.FAIL_TLS),
            ]
        ]
    )
    with (
        smtplib.SMTP("localhost", server.port, timeout=TIMEOUT) as client,
        pytest.raises(ssl.SSLError),
    ):
        client.starttls(context=_client_context(tls_files))
    assert any(event.startswith("tls refused") for event in server.session(0).events)


def test_scripted_server_with_untrusted_certificate(
    scripted_server: ScriptedServerFactory, tls_files: TLSFiles
) -> None:
    server = scripted_server([[greeting()]], implicit_tls=True, tls="untrusted")
    with pytest.raises(ssl.SSLCertVerificationError):
        smtplib.SMTP_SSL(
            "localhost", server.port, timeout=TIMEOUT, context=_client_context(tls_files)
        )
    assert any(event.startswith("tls-failed") for event in server.session(0).events)


@pytest.mark.parametrize("implicit_tls", [True, False])
def test_scripted_server_implicit_tls_or_plaintext(
    scripted_server: ScriptedServerFactory, tls_files: TLSFiles, implicit_tls: bool
) -> None:
    server = scripted_server([[greeting(), quit_step()]], implicit_tls=implicit_tls)
    context = _client_context(tls_files)
    if implicit_tls:
        with smtplib.SMTP_SSL("localhost", server.port, timeout=TIMEOUT, context=context) as c:
            assert c.noop()[0] == 500  # the script expected QUIT: recorded as a mismatch
        assert server.session(0).events[0] == "tls"
    else:
        # A plaintext server on a "465" port: its greeting is not a TLS record.
        with pytest.raises(ssl.SSLError):
            smtplib.SMTP_SSL("localhost", server.port, timeout=TIMEOUT, context=context)


def test_scripted_server_endless_reply_line(scripted_server: ScriptedServerFactory) -> None:
    server = scripted_server(
        [[greeting(), Step(expect="EHLO.*", reply=b"250-", action=Action.ENDLESS)]]
    )
    with _raw_connect(server.port) as sock:
        _read_until(sock, b"\r\n")
        sock.sendall(b"EHLO c\r\n")
        data = _read_until(sock, b"\n", limit=256 * 1024)
    assert data.startswith(b"250-xxxx")
    assert b"\n" not in data
    assert len(data) >= 256 * 1024
    assert "endless" in server.session(0).events


def test_scripted_server_slow_reply_and_silence(scripted_server: ScriptedServerFactory) -> None:
    server = scripted_server(
        [[Step(delay=2.0, reply=b"220 late\r\n")], [Step(action=Action.SILENT, silence=5.0)]]
    )
    for _ in range(2):
        with pytest.raises(smtplib.SMTPServerDisconnected, match="timed out"):
            smtplib.SMTP(server.host, server.port, timeout=0.2)
    assert "silent" in server.session(1).events


def test_scripted_server_records_a_mismatch(scripted_server: ScriptedServerFactory) -> None:
    server = scripted_server([[greeting(), Step(expect="HELO .*", reply=b"250 hi\r\n")]])
    with smtplib.SMTP(server.host, server.port, timeout=TIMEOUT) as client:
        assert client.ehlo()[0] == 500
    assert server.session(0).events[0].startswith("mismatch: expected 'HELO .*'")


def test_scripted_server_closes_unscripted_connections(
    scripted_server: ScriptedServerFactory,
) -> None:
    server = scripted_server([])
    with pytest.raises(smtplib.SMTPServerDisconnected):
        smtplib.SMTP(server.host, server.port, timeout=TIMEOUT)
    assert server.session(0).events == ["unscripted connection closed"]


def test_scripted_server_reads_bdat_chunks(scripted_server: ScriptedServerFactory) -> None:
    server = scripted_server(
        [
            [
                greeting(),
                ehlo("CHUNKING"),
                Step(expect="MAIL.*", reply=b"250 Ok\r\n"),
                Step(expect="RCPT.*", reply=b"250 Ok\r\n"),
                Step(expect=r"BDAT 6", reply=b"250 6 octets\r\n"),
                Step(expect=r"BDAT 3 LAST", reply=b"250 queued\r\n"),
                quit_step(),
            ]
        ]
    )
    with smtplib.SMTP(server.host, server.port, timeout=TIMEOUT) as client:
        client.ehlo()
        client.mail("a@x.test")
        client.rcpt("b@x.test")
        # The chunk looks like a command: the server must take it as 6 bytes of content.
        client.send(b"BDAT 6\r\nQUIT\r\n")
        assert client.getreply() == (250, b"6 octets")
        client.send(b"BDAT 3 LAST\r\nx\r\n")
        assert client.getreply() == (250, b"queued")
    assert server.session(0).events[-1] in {"closed by script", "script finished"}


# -- smtp-sink / smtp-source --------------------------------------------------------------


def test_smtp_sink_accepts_mail(smtp_sink: SMTPSink) -> None:
    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=TIMEOUT) as client:
        client.ehlo()
        assert client.has_extn("pipelining")
        assert client.sendmail("a@x.test", ["b@x.test"], b"Subject: s\r\n\r\nbody\r\n") == {}


def test_smtp_source_against_the_sink(smtp_sink: SMTPSink) -> None:
    elapsed = run_smtp_source(
        smtp_sink.host, smtp_sink.port, messages=50, size=1000, sessions=2, timeout=60.0
    )
    assert elapsed > 0


def test_smtp_source_reports_failure() -> None:
    with SMTPSink() as sink:
        port = sink.port
    assert sink.pid is None
    with pytest.raises(subprocess.CalledProcessError):
        run_smtp_source("127.0.0.1", port, messages=1, size=10, timeout=30.0)
