"""Conversation tests for mailrelay.flow: the dialogue driven by scripted server bytes.

No sockets: :class:`Driver` answers each :class:`Read` with the next scripted server turn
(optionally cut into pieces), records every :class:`Write`, and plays the TLS handshake.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import logging
import pickle
from collections.abc import Sequence
from typing import TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay import flow
from mailrelay.address import Address
from mailrelay.envelope import Envelope
from mailrelay.errors import (
    AuthenticationError,
    ConfigurationError,
    ConnectionLost,
    DeliveryError,
    DeliveryTimeout,
    LocalProtocolError,
    ServerProtocolError,
    SessionRefused,
    TLSError,
)
from mailrelay.flow import Close, Read, Request, Session, SessionConfig, StartTLS, Step, Write
from mailrelay.flow import batch as batch_module
from mailrelay.flow import requests as flow_requests
from mailrelay.flow.batch import _flushed_write
from mailrelay.message import Message
from mailrelay.options import TLS
from mailrelay.protocol import sasl
from mailrelay.protocol.data import stuff
from mailrelay.reply import Reply
from mailrelay.results import DeliveryResult, Outcome, RecipientResult

T = TypeVar("T")

MAX_REQUESTS = 10_000


class HandshakeFailed(Exception):
    """What the fake driver throws in when told the TLS handshake fails."""


class Driver:
    """Runs session steps against a script of server turns.

    Each ``Read`` gets the next piece; a turn may be given as several pieces (to test
    splitting). An exhausted script reads as end of file.
    """

    def __init__(self, turns: Sequence[bytes | Sequence[bytes]], *, tls_fails: bool = False):
        self.pieces: list[bytes] = []
        for turn in turns:
            self.pieces.extend([turn] if isinstance(turn, bytes) else turn)
        self.tls_fails = tls_fails
        self.requests: list[Request] = []

    @property
    def writes(self) -> list[Write]:
        return [r for r in self.requests if isinstance(r, Write)]

    @property
    def sent(self) -> bytes:
        return b"".join(w.data for w in self.writes)

    @property
    def closed(self) -> bool:
        return any(isinstance(r, Close) for r in self.requests)

    def run(self, step: Step[T]) -> T:
        value: bytes | None = None
        throw: Exception | None = None
        for _ in range(MAX_REQUESTS):
            try:
                request = step.throw(throw) if throw is not None else step.send(value)
            except StopIteration as done:
                result: T = done.value
                return result
            throw, value = None, None
            self.requests.append(request)
            if isinstance(request, Read):
                value = self.pieces.pop(0) if self.pieces else b""
            elif isinstance(request, StartTLS) and self.tls_fails:
                throw = HandshakeFailed("certificate verify failed")
        raise AssertionError("the step never finished")


def lines(code: int, *texts: str) -> bytes:
    """A (multi-line) reply."""
    texts = texts or ("",)
    out = [f"{code}-{t}\r\n" for t in texts[:-1]]
    out.append(f"{code} {texts[-1]}\r\n")
    return "".join(out).encode()


GREETING = lines(220, "mx.example.net ESMTP ready")


def ehlo(*keywords: str) -> bytes:
    return lines(250, "mx.example.net greets you", *keywords)


PIPE = ehlo("PIPELINING", "SIZE 1000000", "8BITMIME", "ENHANCEDSTATUSCODES", "DSN")
PLAIN_EHLO = ehlo("SIZE 1000000", "8BITMIME")
OK = lines(250, "2.0.0 OK")
GO_AHEAD = lines(354, "go ahead")
QUEUED = lines(250, "2.0.0 queued as ABC")
BYE = lines(221, "2.0.0 bye")


def config(**changes: object) -> SessionConfig:
    settings: dict[str, object] = {
        "local_hostname": "client.example.org",
        "server_hostname": "mx.example.net",
        "tls": TLS.NONE,
    }
    settings.update(changes)
    return SessionConfig(**settings)  # type: ignore[arg-type]


def message(body: str = "Hello.\n", **headers: str) -> Message:
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    raw = (
        "From: alice@example.org\r\nTo: bob@example.net\r\nSubject: test\r\n"
        "Message-ID: <m1@example.org>\r\n" + extra + "\r\n" + body
    )
    return Message.from_bytes(raw.encode())


def envelope(
    *recipients: str, sender: str | None = "alice@example.org", requiretls: bool = False
) -> Envelope:
    return Envelope(sender, recipients or ("bob@example.net",), requiretls=requiretls)


def opened(turns: Sequence[bytes], **changes: object) -> tuple[Session, Driver]:
    """A session after open(), with the remaining turns queued for the next steps."""
    session = Session(config(**changes))
    driver = Driver(turns)
    driver.run(session.open())
    return session, driver


def outcomes(result: DeliveryResult) -> list[tuple[str, Outcome, int | None]]:
    return [
        (str(r.address), r.outcome, r.reply.code if r.reply else None) for r in result.recipients
    ]


# -- read deadlines ----------------------------------------------------------------------------


def test_a_reply_read_in_pieces_resumes_one_wait() -> None:
    # The greeting comes in three pieces, EHLO's reply whole: only the reads after bytes
    # that completed no reply resume a wait (the driver keeps its deadline, Read.resume).
    session = Session(config())
    driver = Driver([[b"220 mx.exa", b"mple.net ESMTP", b" ready\r\n"], ehlo("PIPELINING")])
    driver.run(session.open())
    reads = [(r.phase, r.resume) for r in driver.requests if isinstance(r, Read)]
    assert reads == [
        ("greeting", False),
        ("greeting", True),
        ("greeting", True),
        ("greeting", False),
    ]


def test_a_batch_resumes_a_wait_only_until_a_reply_completes() -> None:
    scripts = [{"mail": 250, "rcpts": [250], "finals": [250]}] * 2
    session, server = model_session(scripts)
    step = session.deliver_many(batch_items(scripts))
    reads: list[bool] = []
    pieces: list[bytes] = []
    value: bytes | None = None
    pending = b""
    for _ in range(MAX_REQUESTS):
        try:
            request = step.send(value)
        except StopIteration as done:
            outcome = done.value
            break
        value = None
        if isinstance(request, Write):
            server.feed(request.data)
        elif isinstance(request, Read):
            assert request.phase in ("mail", "data_end")
            reads.append(request.resume)
            # The replies, a few bytes at a time.
            pending += server.take()
            value, pending = pending[:9], pending[9:]
            pieces.append(value)
    else:
        raise AssertionError("the step never finished")
    assert outcome.error is None
    assert all(r is not None and r.ok for r in outcome.results)
    # A read resumes the wait exactly when the piece before it completed no reply (every
    # reply here is one line).
    expected = [False] + [b"\n" not in piece for piece in pieces[:-1]]
    assert reads == expected
    assert True in reads


# -- greeting ----------------------------------------------------------------------------------


def test_greeting_554_refuses_the_session_permanently_and_quits() -> None:
    session = Session(config())
    driver = Driver([lines(554, "5.7.1 go away"), BYE])
    with pytest.raises(SessionRefused) as info:
        driver.run(session.open())
    assert not info.value.is_transient
    assert info.value.reply is not None
    assert info.value.reply.code == 554
    assert driver.sent == b"QUIT\r\n"  # RFC 5321 §3.1: the server waits for QUIT
    assert driver.closed
    assert session.closed


def test_greeting_421_refuses_the_session_transiently() -> None:
    session = Session(config())
    driver = Driver([lines(421, "4.3.2 busy, try later")])
    with pytest.raises(SessionRefused) as info:
        driver.run(session.open())
    assert info.value.is_transient
    assert driver.sent == b""
    assert driver.closed


def test_no_greeting_at_all_is_connection_lost() -> None:
    with pytest.raises(ConnectionLost):
        Driver([]).run(Session(config()).open())


def test_garbage_greeting_is_server_protocol_error() -> None:
    driver = Driver([b"HTTP/1.1 400 Bad Request\r\n"])
    with pytest.raises(ServerProtocolError):
        driver.run(Session(config()).open())
    assert driver.closed


# -- EHLO / HELO / LHLO ------------------------------------------------------------------------


def test_ehlo_records_extensions() -> None:
    session, driver = opened([GREETING, PIPE])
    assert driver.sent == b"EHLO client.example.org\r\n"
    assert session.extensions.pipelining
    assert session.extensions.size == 1_000_000


@pytest.mark.parametrize("code", [500, 501, 502, 504, 550])
def test_ehlo_refused_falls_back_to_helo(code: int) -> None:
    # RFC 5321 §4.1.4.
    session, driver = opened([GREETING, lines(code, "what?"), lines(250, "hello")])
    assert driver.sent == b"EHLO client.example.org\r\nHELO client.example.org\r\n"
    assert not session.extensions.pipelining
    assert not session.closed


@pytest.mark.parametrize("code", [451, 554])
def test_ehlo_refused_otherwise_refuses_the_session(code: int) -> None:
    driver = Driver([GREETING, lines(code, "no"), BYE])
    with pytest.raises(SessionRefused) as info:
        driver.run(Session(config()).open())
    assert info.value.is_transient == (code < 500)
    assert b"HELO" not in driver.sent


def test_helo_refused_refuses_the_session() -> None:
    driver = Driver([GREETING, lines(502, "no EHLO"), lines(550, "no HELO either"), BYE])
    with pytest.raises(SessionRefused):
        driver.run(Session(config()).open())


@pytest.mark.parametrize(
    ("local", "sent"),
    [
        ("192.0.2.1", b"EHLO [192.0.2.1]\r\n"),
        ("2001:db8::1", b"EHLO [IPv6:2001:db8::1]\r\n"),
        ("2001:0db8:0:0:0:0:0:1", b"EHLO [IPv6:2001:db8::1]\r\n"),
        ("[192.0.2.1]", b"EHLO [192.0.2.1]\r\n"),
    ],
)
def test_ip_local_hostname_goes_out_as_address_literal(local: str, sent: bytes) -> None:
    # RFC 5321 §4.1.3.
    _, driver = opened([GREETING, PIPE], local_hostname=local)
    assert driver.sent == sent


def test_lmtp_uses_lhlo() -> None:
    session, driver = opened([GREETING, PIPE], lmtp=True)
    assert driver.sent == b"LHLO client.example.org\r\n"
    assert session.extensions.pipelining


def test_lmtp_never_falls_back_to_helo() -> None:
    driver = Driver([GREETING, lines(500, "what?"), BYE])
    with pytest.raises(SessionRefused):
        driver.run(Session(config(lmtp=True)).open())
    assert b"HELO" not in driver.sent


def test_421_in_answer_to_ehlo() -> None:
    driver = Driver([GREETING, lines(421, "4.3.2 shutting down")])
    with pytest.raises(SessionRefused) as info:
        driver.run(Session(config()).open())
    assert info.value.is_transient
    assert driver.closed


# -- STARTTLS ----------------------------------------------------------------------------------

TLS_EHLO = ehlo("PIPELINING", "STARTTLS", "8BITMIME")
AFTER_TLS = ehlo("PIPELINING", "8BITMIME", "AUTH PLAIN LOGIN", "REQUIRETLS")
READY = lines(220, "2.0.0 ready to start TLS")


def test_tls_none_never_sends_starttls() -> None:
    session, driver = opened([GREETING, TLS_EHLO], tls=TLS.NONE)
    assert b"STARTTLS" not in driver.sent
    assert not session.encrypted


def test_opportunistic_starttls_when_offered_then_ehlo_again() -> None:
    session, driver = opened([GREETING, TLS_EHLO, READY, AFTER_TLS], tls=TLS.OPPORTUNISTIC)
    assert driver.sent == b"EHLO client.example.org\r\nSTARTTLS\r\nEHLO client.example.org\r\n"
    assert StartTLS(server_hostname="mx.example.net") in driver.requests
    assert session.encrypted
    # RFC 3207 §4.2: what the server said before TLS is forgotten.
    assert session.extensions.auth == {"PLAIN", "LOGIN"}
    assert not session.extensions.starttls


def test_opportunistic_stays_plain_when_not_offered() -> None:
    session, driver = opened([GREETING, PIPE], tls=TLS.OPPORTUNISTIC)
    assert b"STARTTLS" not in driver.sent
    assert not session.encrypted


def test_opportunistic_stays_plain_when_starttls_refused() -> None:
    session, driver = opened(
        [GREETING, TLS_EHLO, lines(454, "4.7.0 TLS not available")], tls=TLS.OPPORTUNISTIC
    )
    assert not session.encrypted
    assert not session.closed
    assert not any(isinstance(r, StartTLS) for r in driver.requests)


def test_opportunistic_handshake_failure_is_transient_tls_error() -> None:
    session = Session(config(tls=TLS.OPPORTUNISTIC))
    driver = Driver([GREETING, TLS_EHLO, READY], tls_fails=True)
    with pytest.raises(TLSError) as info:
        driver.run(session.open())
    assert info.value.is_transient
    assert isinstance(info.value.__cause__, HandshakeFailed)
    assert session.closed
    assert driver.closed


def test_required_handshake_failure_is_permanent_tls_error() -> None:
    driver = Driver([GREETING, TLS_EHLO, READY], tls_fails=True)
    with pytest.raises(TLSError) as info:
        driver.run(Session(config(tls=TLS.STARTTLS)).open())
    assert not info.value.is_transient


def test_required_starttls_not_offered_raises_before_anything_else() -> None:
    driver = Driver([GREETING, PIPE, BYE])
    with pytest.raises(TLSError, match="does not offer STARTTLS"):
        driver.run(Session(config(tls=TLS.STARTTLS)).open())
    assert driver.sent == b"EHLO client.example.org\r\nQUIT\r\n"


def test_required_starttls_refused_raises() -> None:
    driver = Driver([GREETING, TLS_EHLO, lines(454, "4.7.0 later"), BYE])
    with pytest.raises(TLSError) as info:
        driver.run(Session(config(tls=TLS.STARTTLS)).open())
    assert info.value.is_transient


def test_required_starttls_after_helo_fallback_raises() -> None:
    driver = Driver([GREETING, lines(502, "no"), lines(250, "hi"), BYE])
    with pytest.raises(TLSError):
        driver.run(Session(config(tls=TLS.STARTTLS)).open())


def test_implicit_tls_never_sends_starttls() -> None:
    session, driver = opened([GREETING, TLS_EHLO], tls=TLS.IMPLICIT)
    assert b"STARTTLS" not in driver.sent
    assert session.encrypted


def test_bytes_injected_after_starttls_220_are_refused() -> None:
    # The response-injection attack: a reply smuggled in with the 220.
    driver = Driver([GREETING, TLS_EHLO, READY + lines(250, "injected")])
    with pytest.raises(ServerProtocolError):
        driver.run(Session(config(tls=TLS.STARTTLS)).open())


# -- AUTH --------------------------------------------------------------------------------------

AUTH_OK = lines(235, "2.7.0 Authentication successful")


def auth_config(**changes: object) -> dict[str, object]:
    settings: dict[str, object] = {"username": "tim", "password": "tanstaaftanstaaf"}
    settings.update(changes)
    return settings


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_auth_never_over_plain_text_by_default() -> None:
    session = Session(config(**auth_config()))
    driver = Driver([GREETING, ehlo("AUTH PLAIN"), BYE])
    with pytest.raises(AuthenticationError, match="unencrypted"):
        driver.run(session.open())
    assert b"AUTH" not in driver.sent
    assert b"tanstaaf" not in driver.sent


def test_auth_over_plain_text_when_allowed() -> None:
    session, driver = opened(
        [GREETING, ehlo("AUTH PLAIN"), AUTH_OK], **auth_config(allow_insecure_auth=True)
    )
    assert driver.sent.endswith(b"AUTH PLAIN " + b64(b"\0tim\0tanstaaftanstaaf").encode() + b"\r\n")
    assert session.authenticated


def test_auth_after_starttls() -> None:
    session, driver = opened(
        [GREETING, TLS_EHLO, READY, AFTER_TLS, AUTH_OK], tls=TLS.STARTTLS, **auth_config()
    )
    assert session.authenticated
    assert driver.sent.splitlines()[-1].startswith(b"AUTH PLAIN ")


def test_auth_over_implicit_tls() -> None:
    session, _ = opened(
        [
            GREETING,
            ehlo("AUTH LOGIN"),
            lines(334, b64(b"Username:")),
            lines(334, b64(b"Password:")),
            AUTH_OK,
        ],
        tls=TLS.IMPLICIT,
        **auth_config(),
    )
    assert session.authenticated


def test_auth_login_exchange() -> None:
    _, driver = opened(
        [
            GREETING,
            ehlo("AUTH LOGIN"),
            lines(334, "VXNlcm5hbWU6"),
            lines(334, "UGFzc3dvcmQ6"),
            AUTH_OK,
        ],
        tls=TLS.IMPLICIT,
        **auth_config(),
    )
    assert driver.sent.splitlines()[-3:] == [
        b"AUTH LOGIN",
        b64(b"tim").encode(),
        b64(b"tanstaaftanstaaf").encode(),
    ]


def test_auth_chooses_the_strongest_common_mechanism() -> None:
    challenge = b"<1896.697170952@postoffice.reston.mci.net>"
    _, driver = opened(
        [GREETING, ehlo("AUTH LOGIN PLAIN CRAM-MD5"), lines(334, b64(challenge)), AUTH_OK],
        tls=TLS.IMPLICIT,
        **auth_config(),
    )
    # RFC 2195 §2's example answer.
    assert driver.sent.splitlines()[-2:] == [
        b"AUTH CRAM-MD5",
        b64(b"tim b913a602c7eda7a495b4e6e7334d3890").encode(),
    ]


def test_auth_uses_the_named_mechanism() -> None:
    _, driver = opened(
        [GREETING, ehlo("AUTH CRAM-MD5 PLAIN LOGIN"), AUTH_OK],
        tls=TLS.IMPLICIT,
        **auth_config(auth_mechanisms=("PLAIN",)),
    )
    assert driver.sent.splitlines()[-1].startswith(b"AUTH PLAIN ")


def test_auth_534_tries_the_next_mechanism() -> None:
    _, driver = opened(
        [GREETING, ehlo("AUTH CRAM-MD5 PLAIN"), lines(534, "5.7.9 mechanism too weak"), AUTH_OK],
        tls=TLS.IMPLICIT,
        **auth_config(),
    )
    sent = driver.sent.splitlines()
    assert sent[-2] == b"AUTH CRAM-MD5"
    assert sent[-1].startswith(b"AUTH PLAIN ")


def test_auth_534_with_nothing_left_raises() -> None:
    driver = Driver([GREETING, ehlo("AUTH PLAIN"), lines(534, "5.7.9 too weak"), BYE])
    with pytest.raises(AuthenticationError) as info:
        driver.run(Session(config(tls=TLS.IMPLICIT, **auth_config())).open())
    assert info.value.reply is not None
    assert info.value.reply.code == 534


def test_auth_535_raises_without_trying_others() -> None:
    driver = Driver(
        [GREETING, ehlo("AUTH CRAM-MD5 PLAIN"), lines(535, "5.7.8 bad credentials"), BYE]
    )
    session = Session(config(tls=TLS.IMPLICIT, **auth_config()))
    with pytest.raises(AuthenticationError) as info:
        driver.run(session.open())
    assert not info.value.is_transient
    assert b"AUTH PLAIN" not in driver.sent
    assert driver.sent.endswith(b"QUIT\r\n")
    assert session.closed


def test_auth_454_is_transient() -> None:
    driver = Driver([GREETING, ehlo("AUTH PLAIN"), lines(454, "4.7.0 try later"), BYE])
    with pytest.raises(AuthenticationError) as info:
        driver.run(Session(config(tls=TLS.IMPLICIT, **auth_config())).open())
    assert info.value.is_transient


def test_auth_without_common_mechanism() -> None:
    driver = Driver([GREETING, ehlo("AUTH GSSAPI NTLM"), BYE])
    with pytest.raises(AuthenticationError, match="GSSAPI"):
        driver.run(Session(config(tls=TLS.IMPLICIT, **auth_config())).open())


def test_auth_not_offered_at_all() -> None:
    driver = Driver([GREETING, ehlo("8BITMIME"), BYE])
    with pytest.raises(AuthenticationError, match="no AUTH"):
        driver.run(Session(config(tls=TLS.IMPLICIT, **auth_config())).open())


def scram_server_turns(password: str, *, forge: bool = False) -> list[bytes]:
    """A SCRAM-SHA-256 server knowing ``password`` (RFC 5802 §3), for client nonce 'cnonce'."""
    salt, iterations = b"salt-of-the-earth", 4096
    server_first = b"r=cnonceSRV,s=" + base64.b64encode(salt) + b",i=4096"
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    auth_message = b"n=tim,r=cnonce," + server_first + b",c=biws,r=cnonceSRV"
    signature = hmac.digest(hmac.digest(salted, b"Server Key", "sha256"), auth_message, "sha256")
    if forge:
        signature = bytes(32)
    server_final = b"v=" + base64.b64encode(signature)
    return [lines(334, b64(server_first)), lines(334, b64(server_final)), AUTH_OK]


def test_auth_scram_sha_256_verifies_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sasl.MECHANISMS, "SCRAM-SHA-256", sasl.ScramSHA256(nonce=lambda: "cnonce"))
    session, driver = opened(
        [GREETING, ehlo("AUTH PLAIN SCRAM-SHA-256"), *scram_server_turns("tanstaaftanstaaf")],
        tls=TLS.IMPLICIT,
        **auth_config(),
    )
    assert session.authenticated
    assert driver.sent.splitlines()[-1] == b""  # the empty answer to server-final


def test_auth_scram_refuses_a_forged_server_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sasl.MECHANISMS, "SCRAM-SHA-256", sasl.ScramSHA256(nonce=lambda: "cnonce"))
    turns = scram_server_turns("tanstaaftanstaaf", forge=True)[:2]
    driver = Driver([GREETING, ehlo("AUTH SCRAM-SHA-256"), *turns, lines(501, "cancelled"), BYE])
    session = Session(config(tls=TLS.IMPLICIT, peer="mx.example.net:465", **auth_config()))
    with pytest.raises(AuthenticationError, match="signature") as info:
        driver.run(session.open())
    assert info.value.host == "mx.example.net:465"
    assert not session.authenticated
    assert b"*\r\n" in driver.sent  # RFC 4954 §4: the exchange was cancelled


def test_auth_scram_success_without_server_signature_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sasl.MECHANISMS, "SCRAM-SHA-256", sasl.ScramSHA256(nonce=lambda: "cnonce"))
    server_first = scram_server_turns("tanstaaftanstaaf")[0]
    driver = Driver([GREETING, ehlo("AUTH SCRAM-SHA-256"), server_first, AUTH_OK, BYE])
    session = Session(config(tls=TLS.IMPLICIT, **auth_config()))
    with pytest.raises(AuthenticationError, match="without proving"):
        driver.run(session.open())
    assert not session.authenticated
    assert session.closed


def test_auth_xoauth2_error_challenge_gets_an_empty_answer() -> None:
    error = b'{"status":"401","schemes":"bearer"}'
    driver = Driver(
        [
            GREETING,
            ehlo("AUTH PLAIN XOAUTH2"),
            lines(334, b64(error)),
            lines(535, "5.7.8 Username and Password not accepted"),
            BYE,
        ]
    )
    settings = auth_config(username="u@example.com", password="ya29.token")
    session = Session(config(tls=TLS.IMPLICIT, auth_mechanisms=("XOAUTH2",), **settings))
    with pytest.raises(AuthenticationError):
        driver.run(session.open())
    sent = driver.sent.splitlines()
    assert (
        sent[1]
        == b"AUTH XOAUTH2 " + b64(b"user=u@example.com\x01auth=Bearer ya29.token\x01\x01").encode()
    )
    assert sent[2] == b""


def test_auth_lines_are_redacted_in_the_wire_trace(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="mailrelay.flow")
    opened(
        [
            GREETING,
            ehlo("AUTH LOGIN"),
            lines(334, "VXNlcm5hbWU6"),
            lines(334, "UGFzc3dvcmQ6"),
            AUTH_OK,
        ],
        tls=TLS.IMPLICIT,
        **auth_config(),
    )
    trace = caplog.text
    assert "EHLO client.example.org" in trace
    assert "AUTH LOGIN" in trace
    for secret in ("tanstaaftanstaaf", b64(b"tanstaaftanstaaf"), b64(b"tim")):
        assert secret not in trace


# -- configuration -----------------------------------------------------------------------------


def test_config_repr_hides_the_password() -> None:
    cfg = config(username="tim", password="s3cret-pass")
    assert "s3cret-pass" not in repr(cfg)
    assert "s3cret-pass" not in repr(Session(cfg))


@pytest.mark.parametrize(
    "changes",
    [
        {"username": "tim"},
        {"password": "x"},
        {"local_hostname": "bad name"},
        {"local_hostname": ""},
        {"server_hostname": "a\r\nb"},
    ],
)
def test_config_refuses_nonsense(changes: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        config(**changes)


def test_write_repr_hides_data() -> None:
    assert "secret" not in repr(Write(data=b"AUTH PLAIN secret", phase="greeting"))


# -- delivery ----------------------------------------------------------------------------------


def deliver(
    turns: Sequence[bytes],
    msg: Message | None = None,
    env: Envelope | None = None,
    *,
    hello: bytes = PIPE,
    **changes: object,
) -> tuple[DeliveryResult, Session, Driver]:
    session, driver = opened([GREETING, hello, *turns], **changes)
    before = len(driver.requests)
    result = driver.run(session.deliver(msg or message(), env or envelope()))
    del driver.requests[:before]
    return result, session, driver


def test_pipelined_mail_rcpt_data_go_out_in_one_write() -> None:
    result, session, driver = deliver(
        [OK + OK + OK + GO_AHEAD, QUEUED], env=envelope("bob@example.net", "carol@example.net")
    )
    assert result.ok
    assert outcomes(result) == [
        ("bob@example.net", Outcome.ACCEPTED, 250),
        ("carol@example.net", Outcome.ACCEPTED, 250),
    ]
    first = driver.writes[0]
    assert first.phase == "mail"
    assert first.data.splitlines() == [
        b"MAIL FROM:<alice@example.org> SIZE=%d" % message().size,
        b"RCPT TO:<bob@example.net>",
        b"RCPT TO:<carol@example.net>",
        b"DATA",
    ]
    assert driver.writes[-1].data.endswith(b"\r\nHello.\r\n.\r\n")  # no extra CRLF
    assert [r.phase for r in driver.requests if isinstance(r, Read)] == ["mail", "data_end"]
    assert result.message_id == "m1@example.org"
    assert not session.closed


def test_not_pipelined_when_the_server_lacks_it() -> None:
    result, _, driver = deliver([OK, OK, GO_AHEAD, QUEUED], hello=PLAIN_EHLO)
    assert result.ok
    assert [w.phase for w in driver.writes[:3]] == ["mail", "rcpt", "data_init"]
    assert [r.phase for r in driver.requests if isinstance(r, Read)] == [
        "mail",
        "rcpt",
        "data_init",
        "data_end",
    ]


def test_not_pipelined_when_configured_off() -> None:
    result, _, driver = deliver([OK, OK, GO_AHEAD, QUEUED], pipelining=False)
    assert result.ok
    assert driver.writes[0].data == b"MAIL FROM:<alice@example.org> SIZE=%d\r\n" % message().size


def test_null_sender() -> None:
    _, _, driver = deliver([OK + OK + GO_AHEAD, QUEUED], env=envelope(sender=None))
    assert driver.writes[0].data.startswith(b"MAIL FROM:<> ")


def test_some_recipients_refused() -> None:
    result, _, _ = deliver(
        [OK + lines(550, "5.1.1 no such user") + OK + GO_AHEAD, QUEUED],
        env=envelope("nobody@example.net", "carol@example.net"),
    )
    assert outcomes(result) == [
        ("nobody@example.net", Outcome.PERMANENT, 550),
        ("carol@example.net", Outcome.ACCEPTED, 250),
    ]
    assert not result.ok


def test_pipelined_mail_refused_every_recipient_carries_the_mail_reply() -> None:
    refused = lines(553, "5.7.1 sender not allowed")
    no = lines(503, "5.5.1 need MAIL first")
    result, _, driver = deliver(
        [refused + no + no + no, OK], env=envelope("bob@example.net", "carol@example.net")
    )
    assert outcomes(result) == [
        ("bob@example.net", Outcome.PERMANENT, 553),
        ("carol@example.net", Outcome.PERMANENT, 553),
    ]
    assert len(driver.writes) == 1  # no data sent


def test_every_rcpt_refused_but_data_354_sends_a_lone_dot() -> None:
    # RFC 2920 §3.1.
    result, session, driver = deliver(
        [
            OK + lines(550, "5.1.1 no") + lines(450, "4.2.1 later") + GO_AHEAD,
            lines(554, "5.5.1 no valid recipients"),
        ],
        env=envelope("a@example.net", "b@example.net"),
    )
    assert outcomes(result) == [
        ("a@example.net", Outcome.PERMANENT, 550),
        ("b@example.net", Outcome.TRANSIENT, 450),
    ]
    assert driver.writes[1].data == b".\r\n"
    assert len(driver.writes) == 2
    assert not session.closed


def test_every_rcpt_refused_and_data_refused_sends_nothing_more() -> None:
    result, _, driver = deliver(
        [OK + lines(550, "5.1.1 no") + lines(554, "5.5.1 no valid recipients"), OK]
    )
    assert outcomes(result) == [("bob@example.net", Outcome.PERMANENT, 550)]
    assert len(driver.writes) == 1


def test_data_refused_after_accepted_recipients() -> None:
    result, _, _ = deliver([OK + OK + lines(451, "4.3.0 try later")])
    assert outcomes(result) == [("bob@example.net", Outcome.TRANSIENT, 451)]


def test_final_reply_refuses() -> None:
    result, _, _ = deliver([OK + OK + GO_AHEAD, lines(554, "5.6.0 spam")])
    assert outcomes(result) == [("bob@example.net", Outcome.PERMANENT, 554)]


def test_large_data_is_streamed_one_write_per_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flow_requests, "_JOIN_LIMIT", 100_000)
    body = ("x" * 998 + "\r\n") * 200  # about 200 KB: four chunks of 64 KiB
    msg = message(body)
    result, _, driver = deliver([OK + OK + GO_AHEAD, QUEUED], msg)
    assert result.ok
    data_writes = [w for w in driver.writes if w.phase == "data_block"]
    chunks = list(msg.chunks())
    assert len(chunks) > 1
    assert len(data_writes) == len(chunks) + 1  # and the terminator
    assert b"".join(w.data for w in data_writes) == msg.as_bytes() + b".\r\n"


def test_small_data_and_its_terminator_go_out_in_one_write() -> None:
    body = ("x" * 998 + "\r\n") * 200  # four chunks, but below the join limit
    msg = message(body)
    result, _, driver = deliver([OK + OK + GO_AHEAD, QUEUED], msg)
    assert result.ok
    data_writes = [w for w in driver.writes if w.phase == "data_block"]
    assert [w.data for w in data_writes] == [msg.as_bytes() + b".\r\n"]


def test_dot_stuffing_on_the_wire() -> None:
    _, _, driver = deliver([OK + OK + GO_AHEAD, QUEUED], message(".hidden\r\n..\r\n"))
    wire = b"".join(w.data for w in driver.writes[1:])
    assert wire.endswith(b"\r\n..hidden\r\n...\r\n.\r\n")


def test_mail_parameters_8bitmime_smtputf8_and_dsn() -> None:
    hello = ehlo("PIPELINING", "SIZE", "8BITMIME", "SMTPUTF8", "DSN")
    env = Envelope("alice@example.org", ["jörg@example.net"], ret="HDRS", notify=["FAILURE"])
    msg = message("caf\u00e9\n")
    _, _, driver = deliver([OK + OK + GO_AHEAD, QUEUED], msg, env, hello=hello)
    mail, rcpt = driver.writes[0].data.decode().splitlines()[:2]
    assert mail == f"MAIL FROM:<alice@example.org> SIZE={msg.size} BODY=8BITMIME SMTPUTF8 RET=HDRS"
    assert rcpt.startswith("RCPT TO:<jörg@example.net> NOTIFY=FAILURE")


def test_no_size_parameter_when_the_server_lacks_size() -> None:
    _, _, driver = deliver([OK + OK + GO_AHEAD, QUEUED], hello=ehlo("PIPELINING"))
    assert driver.writes[0].data.startswith(b"MAIL FROM:<alice@example.org>\r\n")


@pytest.mark.parametrize(
    ("hello", "msg", "env", "reason"),
    [
        pytest.param(ehlo("SIZE 100"), message("x" * 200), envelope(), "SIZE", id="too-big"),
        pytest.param(PIPE, message(Subject="caf\u00e9"), envelope(), "SMTPUTF8", id="utf8-header"),
        pytest.param(PIPE, message(), envelope("jörg@example.net"), "SMTPUTF8", id="utf8-rcpt"),
        pytest.param(
            PIPE, message(), envelope(sender="jörg@example.org"), "SMTPUTF8", id="utf8-sender"
        ),
        pytest.param(ehlo("PIPELINING"), message("caf\u00e9\n"), envelope(), "8BITMIME", id="8bit"),
        pytest.param(
            ehlo("REQUIRETLS"),
            message(),
            envelope(requiretls=True),
            "not encrypted",
            id="rtls-plain",
        ),
    ],
)
def test_refused_before_sending(hello: bytes, msg: Message, env: Envelope, reason: str) -> None:
    result, session, driver = deliver([], msg, env, hello=hello)
    assert driver.requests == []  # nothing was sent
    assert all(r.outcome is Outcome.PERMANENT and r.reply is None for r in result.recipients)
    assert all(reason in (r.reason or "") for r in result.recipients)
    assert not session.closed


def test_requiretls_refused_when_the_server_lacks_it_over_tls() -> None:
    result, _, driver = deliver(
        [], env=envelope(requiretls=True), hello=ehlo("PIPELINING"), tls=TLS.IMPLICIT
    )
    assert driver.requests == []
    assert "does not offer" in (result.recipients[0].reason or "")


def test_requiretls_sent_over_tls_to_a_server_that_offers_it() -> None:
    _, _, driver = deliver(
        [OK + OK + GO_AHEAD, QUEUED],
        env=envelope(requiretls=True),
        hello=ehlo("PIPELINING", "REQUIRETLS"),
        tls=TLS.IMPLICIT,
    )
    assert driver.writes[0].data.splitlines()[0] == b"MAIL FROM:<alice@example.org> REQUIRETLS"


def test_8bit_size_boundary_is_inclusive() -> None:
    msg = message("x")
    result, _, _ = deliver(
        [OK + OK + GO_AHEAD, QUEUED], msg, hello=ehlo("PIPELINING", f"SIZE {msg.size}")
    )
    assert result.ok


# -- BDAT --------------------------------------------------------------------------------------

CHUNKING = ehlo("PIPELINING", "CHUNKING", "8BITMIME", "SIZE")


def test_bdat_when_chunking_offered_and_asked_pipelined_with_the_envelope() -> None:
    msg = message()
    result, _, driver = deliver([OK + OK + QUEUED], msg, hello=CHUNKING, chunking=True)
    assert result.ok
    assert len(driver.writes) == 1
    assert driver.writes[0].data == (
        b"MAIL FROM:<alice@example.org> SIZE=%d\r\nRCPT TO:<bob@example.net>\r\n" % msg.size
        + b"BDAT %d LAST\r\n" % msg.size
        + msg.as_bytes()
    )


def test_bdat_without_pipelining() -> None:
    msg = message()
    result, _, driver = deliver(
        [OK, OK, QUEUED], msg, hello=ehlo("CHUNKING", "8BITMIME"), chunking=True
    )
    assert result.ok
    assert [w.data.split(b" ")[0] for w in driver.writes] == [b"MAIL", b"RCPT", b"BDAT"]
    assert driver.writes[2].data == b"BDAT %d LAST\r\n" % msg.size + msg.as_bytes()


def big_message() -> Message:
    return message(("y" * 998 + "\r\n") * 100)


def test_bdat_several_chunks() -> None:
    msg = big_message()
    chunks = list(msg.chunks())
    assert len(chunks) > 1
    replies = [OK + OK + OK] + [OK] * (len(chunks) - 2) + [QUEUED]
    result, _, driver = deliver(replies, msg, hello=CHUNKING, chunking=True)
    assert result.ok
    assert driver.writes[0].data.endswith(b"BDAT %d\r\n" % len(chunks[0]) + chunks[0])
    later = driver.writes[1:]
    assert [w.data for w in later] == [
        b"BDAT %d%s\r\n" % (len(c), b" LAST" if i == len(chunks) - 1 else b"") + c
        for i, c in enumerate(chunks)
    ][1:]


def test_bdat_chunk_refused_ends_the_transaction_and_rsets_next_time() -> None:
    result, session, driver = deliver(
        [OK + OK + lines(552, "5.3.4 too much"), OK, OK + OK + QUEUED],
        big_message(),
        hello=CHUNKING,
        chunking=True,
    )
    assert outcomes(result) == [("bob@example.net", Outcome.PERMANENT, 552)]
    assert len(driver.writes) == 1  # no chunk after the refused one
    driver.requests.clear()
    second = driver.run(session.deliver(message(), envelope()))
    assert second.ok
    assert driver.writes[0].data == b"RSET\r\n"


def test_bdat_every_rcpt_refused() -> None:
    result, session, _ = deliver(
        [OK + lines(550, "5.1.1 no") + lines(554, "5.5.1 no valid recipients")],
        hello=CHUNKING,
        chunking=True,
    )
    assert outcomes(result) == [("bob@example.net", Outcome.PERMANENT, 550)]
    assert not session.closed


def test_bdat_not_used_by_default() -> None:
    _, _, driver = deliver([OK + OK + GO_AHEAD, QUEUED], hello=CHUNKING)
    assert b"BDAT" not in driver.sent
    assert driver.writes[0].data.endswith(b"DATA\r\n")


# -- LMTP --------------------------------------------------------------------------------------


def test_lmtp_one_final_reply_per_accepted_recipient() -> None:
    env = envelope("a@example.net", "b@example.net", "c@example.net")
    finals = lines(250, "2.1.5 a delivered") + lines(452, "4.2.2 c over quota")
    result, _, _ = deliver(
        [OK + OK + lines(550, "5.1.1 no b") + OK + GO_AHEAD, finals], env=env, lmtp=True
    )
    assert outcomes(result) == [
        ("a@example.net", Outcome.ACCEPTED, 250),
        ("b@example.net", Outcome.PERMANENT, 550),
        ("c@example.net", Outcome.TRANSIENT, 452),
    ]


def test_lmtp_eof_before_every_final_reply_makes_the_rest_transient() -> None:
    env = envelope("a@example.net", "b@example.net")
    result, session, _ = deliver(
        [OK + OK + OK + GO_AHEAD, lines(250, "2.1.5 a delivered")], env=env, lmtp=True
    )
    assert [r.outcome for r in result.recipients] == [Outcome.ACCEPTED, Outcome.TRANSIENT]
    assert "closed the connection" in (result.recipients[1].reason or "")
    assert session.closed


def test_lmtp_with_bdat() -> None:
    env = envelope("a@example.net", "b@example.net")
    result, _, _ = deliver(
        [OK + OK + OK, lines(250, "2.1.5 ok a") + lines(550, "5.2.1 b disabled")],
        env=env,
        lmtp=True,
        hello=CHUNKING,
        chunking=True,
    )
    assert [r.outcome for r in result.recipients] == [Outcome.ACCEPTED, Outcome.PERMANENT]


# -- RSET, 421, EOF ----------------------------------------------------------------------------


def test_rset_after_a_failed_transaction_before_the_next_message() -> None:
    session, driver = opened(
        [
            GREETING,
            PIPE,
            lines(451, "4.3.0 busy") + OK + lines(503, "no"),
            OK,
            OK + OK + GO_AHEAD,
            QUEUED,
        ]
    )
    first = driver.run(session.deliver(message(), envelope()))
    assert first.deferred
    driver.requests.clear()
    second = driver.run(session.deliver(message(), envelope()))
    assert second.ok
    assert driver.writes[0].data == b"RSET\r\n"


def test_no_rset_after_a_completed_transaction() -> None:
    session, driver = opened(
        [GREETING, PIPE, OK + OK + GO_AHEAD, lines(554, "5.6.0 no"), OK + OK + GO_AHEAD, QUEUED]
    )
    driver.run(session.deliver(message(), envelope()))
    driver.requests.clear()
    driver.run(session.deliver(message(), envelope()))
    assert driver.writes[0].data.startswith(b"MAIL FROM")


def test_421_after_some_final_answers_gives_a_result() -> None:
    env = envelope("a@example.net", "b@example.net")
    result, session, driver = deliver(
        [OK + lines(550, "5.1.1 no a") + lines(421, "4.3.2 shutting down")], env=env
    )
    assert outcomes(result) == [
        ("a@example.net", Outcome.PERMANENT, 550),
        ("b@example.net", Outcome.TRANSIENT, 421),
    ]
    assert session.closed
    assert driver.closed
    with pytest.raises(ConnectionLost):
        driver.run(session.deliver(message(), envelope()))


def test_421_before_any_final_answer_raises_session_refused() -> None:
    with pytest.raises(SessionRefused) as info:
        deliver([OK + OK + GO_AHEAD, lines(421, "4.3.2 shutting down")])
    assert info.value.is_transient


def test_eof_before_any_final_answer_raises_connection_lost() -> None:
    with pytest.raises(ConnectionLost):
        deliver([OK + OK + GO_AHEAD])


def test_eof_after_a_final_answer_gives_a_result() -> None:
    env = envelope("a@example.net", "b@example.net")
    result, session, _ = deliver([OK + lines(550, "5.1.1 no a") + OK + GO_AHEAD], env=env)
    assert outcomes(result) == [
        ("a@example.net", Outcome.PERMANENT, 550),
        ("b@example.net", Outcome.TRANSIENT, None),
    ]
    assert session.closed


def test_reset() -> None:
    session, driver = opened([GREETING, PIPE, OK])
    driver.run(session.reset())
    assert driver.writes[-1].data == b"RSET\r\n"


def test_reset_answered_with_421_raises() -> None:
    session, driver = opened([GREETING, PIPE, lines(421, "bye")])
    with pytest.raises(SessionRefused):
        driver.run(session.reset())
    assert session.closed


@pytest.mark.parametrize(
    ("turn", "healthy"),
    [
        (OK, True),
        (lines(421, "4.3.2 bye"), False),
        (b"", False),
        (b"garbage\r\n", False),
        # More than one reply: the second would answer the next command (MAIL).
        (OK + OK, False),
        (OK + lines(421, "4.3.2 bye"), False),
        (OK + b"garbage\r\n", False),
    ],
)
def test_noop_as_a_health_check(turn: bytes, healthy: bool) -> None:
    session, driver = opened([GREETING, PIPE, turn])
    assert driver.run(session.noop()) is healthy
    assert session.closed is not healthy


@pytest.mark.parametrize(
    ("unasked", "error"),
    [
        (OK, ServerProtocolError),
        (lines(550, "5.7.1 no"), ServerProtocolError),
        (b"garbage\r\n", ServerProtocolError),
        (lines(421, "4.3.2 going down"), SessionRefused),
    ],
)
@pytest.mark.parametrize("step", ["open", "reset"])
def test_a_reply_nobody_asked_for_fails_the_opening_or_rset(
    step: str, unasked: bytes, error: type[DeliveryError]
) -> None:
    # Left in the buffer, it would be read as the first MAIL's reply (a 550 would refuse a
    # message the server never saw) and shift every reply after it.
    session = Session(config())
    if step == "open":
        driver = Driver([GREETING, PIPE + unasked])
        with pytest.raises(error, match="opening the session"):
            driver.run(session.open())
        assert driver.writes[-1].data.startswith(b"EHLO ")
    else:
        driver = Driver([GREETING, PIPE, OK + unasked])
        driver.run(session.open())
        with pytest.raises(error, match="after RSET"):
            driver.run(session.reset())
    assert session.closed
    assert driver.closed
    assert not any(w.data.startswith(b"MAIL") for w in driver.writes)


def test_quit_reads_the_reply_and_closes() -> None:
    session, driver = opened([GREETING, PIPE, BYE])
    driver.run(session.quit())
    assert driver.writes[-1].data == b"QUIT\r\n"
    assert isinstance(driver.requests[-1], Close)
    assert session.closed


def test_quit_tolerates_eof() -> None:
    session, driver = opened([GREETING, PIPE])
    driver.run(session.quit())
    assert isinstance(driver.requests[-1], Close)


def test_quit_twice_is_harmless() -> None:
    session, driver = opened([GREETING, PIPE, BYE])
    driver.run(session.quit())
    count = len(driver.requests)
    driver.run(session.quit())
    assert len(driver.requests) == count


# -- properties --------------------------------------------------------------------------------


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


REPLY_CODES = st.sampled_from([250, 251, 354, 421, 450, 451, 452, 503, 550, 552, 553, 554])


@given(cuts=st.lists(st.lists(st.integers(0, 400), max_size=6), min_size=6, max_size=6))
def test_any_split_of_the_server_bytes_gives_the_same_conversation(cuts: list[list[int]]) -> None:
    turns = [
        GREETING,
        PIPE,
        OK + lines(550, "5.1.1 no") + OK + GO_AHEAD,
        QUEUED,
        OK + OK + OK + GO_AHEAD,
        lines(250, "2.0.0 second"),
    ]
    env = envelope("a@example.net", "b@example.net")

    def conversation(pieces: list[bytes | list[bytes]]) -> tuple[object, ...]:
        session = Session(config())
        driver = Driver(pieces)
        driver.run(session.open())
        first = driver.run(session.deliver(message(), env))
        second = driver.run(session.deliver(message(), env))
        return first, second, driver.sent

    whole = conversation(list(turns))
    assert conversation([split(t, c) for t, c in zip(turns, cuts, strict=True)]) == whole


@given(
    codes=st.lists(REPLY_CODES, min_size=4, max_size=10),
    count=st.integers(1, 5),
    pipelined=st.booleans(),
    lmtp=st.booleans(),
    chunking=st.booleans(),
)
def test_one_result_per_recipient_in_order_whatever_the_replies(
    codes: list[int], count: int, pipelined: bool, lmtp: bool, chunking: bool
) -> None:
    recipients = [f"r{i}@example.net" for i in range(count)]
    hello = ehlo("PIPELINING", "CHUNKING", "SIZE 1000000", "8BITMIME")
    session, driver = opened([GREETING, hello], lmtp=lmtp, pipelining=pipelined, chunking=chunking)
    # Feed the replies one at a time, whatever the dialogue asks for.
    driver.pieces = [lines(code, f"reply {i}") for i, code in enumerate(codes)]
    try:
        result = driver.run(session.deliver(big_message(), envelope(*recipients)))
    except DeliveryError:
        assert session.closed
        return
    assert [str(r.address) for r in result.recipients] == recipients
    assert all(r.outcome is not None for r in result.recipients)


def test_a_step_cut_short_by_the_driver_kills_the_session() -> None:
    session, driver = opened([GREETING, PIPE])
    step = session.deliver(message(), envelope())
    assert isinstance(next(step), Write)
    assert isinstance(step.send(None), Read)
    with pytest.raises(TimeoutError):
        step.throw(TimeoutError("mail phase timed out"))
    assert session.closed
    assert driver.run(session.noop()) is False
    with pytest.raises(ConnectionLost):
        driver.run(session.deliver(message(), envelope()))


def test_an_abandoned_step_kills_the_session() -> None:
    session, _ = opened([GREETING, PIPE])
    step = session.deliver(message(), envelope())
    next(step)
    step.close()
    assert session.closed


def test_open_runs_once() -> None:
    session, driver = opened([GREETING, PIPE])
    with pytest.raises(LocalProtocolError):
        driver.run(session.open())


def test_deliver_before_open_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        Driver([]).run(Session(config()).deliver(message(), envelope()))


# -- many messages, pipelined across messages (deliver_many) -------------------------------------


class ModelServer:
    """A reactive fake server for whole batches: it answers what the client actually wrote,
    each message (counted by MAIL) following its own script of reply codes."""

    def __init__(
        self, scripts: Sequence[dict[str, object]], *, lmtp: bool = False, cut: int | None = None
    ) -> None:
        self.scripts = list(scripts)
        self.lmtp = lmtp
        self.cut = cut  # after this many replies: 421, then the end of the connection
        self.emitted: list[int] = []  # per reply sent: the index of the message it belongs to
        self.dead = False
        self.buffer = b""
        self.out: list[tuple[int, bytes]] = []
        self.mails = -1
        self.script: dict[str, object] = {}
        self.mail_ok = False
        self.accepted = 0
        self.rcpt_index = 0
        self.in_data = False
        self.requests: list[Request] = []

    def emit(self, replies: bytes) -> None:
        for line in replies.splitlines(keepends=True):
            self.out.append((self.mails, line))

    def take(self) -> bytes:
        """What the server sends now, cut short (421, then nothing) after ``cut`` replies."""
        if self.dead:
            return b""
        sent = []
        for owner, line in self.out:
            if self.cut is not None and len(self.emitted) == self.cut:
                self.dead = True
                sent.append(lines(421, "4.3.2 shutting down"))
                break
            self.emitted.append(owner)
            sent.append(line)
        self.out = []
        return b"".join(sent)

    def final(self) -> bytes:
        finals = self.script["finals"]
        assert isinstance(finals, list)
        if self.lmtp:
            return b"".join(lines(finals[i], f"final {i}") for i in range(self.accepted))
        return lines(finals[0], "final")

    def feed(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0:
                    return
                self.buffer = self.buffer[end + 5 :]
                self.in_data = False
                self.emit(self.final())
                continue
            line, sep, rest = self.buffer.partition(b"\r\n")
            if not sep:
                return
            self.buffer = rest
            verb = line.split(b" ")[0].split(b":")[0].upper()
            if verb == b"MAIL":
                self.mails += 1
                self.script = self.scripts[self.mails]
                code = self.script["mail"]
                assert isinstance(code, int)
                self.mail_ok = code < 300
                self.accepted = 0
                self.rcpt_index = 0
                self.emit(lines(code, "mail"))
            elif verb == b"RCPT":
                codes = self.script["rcpts"]
                assert isinstance(codes, list)
                code = codes[self.rcpt_index] if self.mail_ok else 503
                self.rcpt_index += 1
                self.accepted += code < 300
                self.emit(lines(code, "rcpt"))
            elif verb == b"DATA":
                if not self.mail_ok or not self.accepted:
                    self.emit(lines(503 if not self.mail_ok else 554, "no valid recipients"))
                else:
                    self.emit(GO_AHEAD)
                    self.in_data = True
            elif verb == b"BDAT":
                size = int(line.split()[1])
                self.buffer = self.buffer[size:]  # chunks here always arrive whole
                self.emit(self.final() if self.mail_ok and self.accepted else lines(503, "no"))
            elif verb == b"RSET":
                self.emit(OK)
            else:
                raise AssertionError(f"unexpected {line!r}")

    def run(self, step: Step[T]) -> T:
        value: bytes | None = None
        for _ in range(MAX_REQUESTS):
            try:
                request = step.send(value)
            except StopIteration as done:
                result: T = done.value
                return result
            value = None
            self.requests.append(request)
            if isinstance(request, Write):
                if not self.dead:
                    self.feed(request.data)
            elif isinstance(request, Read):
                value = self.take()
        raise AssertionError("the step never finished")


def model_session(
    scripts: Sequence[dict[str, object]], *, cut: int | None = None, **changes: object
) -> tuple[Session, ModelServer]:
    hello = ehlo("PIPELINING", "CHUNKING", "SIZE 1000000", "8BITMIME")
    session = Session(config(**changes))
    driver = Driver([GREETING, hello])
    driver.run(session.open())
    return session, ModelServer(scripts, lmtp=bool(changes.get("lmtp")), cut=cut)


#: A body over the size whose data goes out on its own as soon as its 354 comes.
BIG_BODY = ".dotted first line\n" + "y" * 76 + "\n" + ("z" * 78 + "\n") * 250


def batch_items(scripts: Sequence[dict[str, object]]) -> list[tuple[Message, Envelope]]:
    items = []
    for n, script in enumerate(scripts):
        codes = script["rcpts"]
        assert isinstance(codes, list)
        recipients = [f"r{n}.{i}@example.net" for i in range(len(codes))]
        body = f"message {n}\n" + (BIG_BODY if script.get("big") else "")
        items.append((message(body), envelope(*recipients)))
    return items


def test_deliver_many_writes_a_large_message_data_at_its_354_and_its_terminator_later() -> None:
    scripts = [{"mail": 250, "rcpts": [250], "finals": [250], "big": True}] * 3
    items = batch_items(scripts)
    assert all(m.size > batch_module._EARLY_DATA for m, _ in items)
    session, server = model_session(scripts)
    outcome = server.run(session.deliver_many(items))
    assert outcome.error is None
    assert [r is not None and r.ok for r in outcome.results] == [True] * 3
    writes = [r for r in server.requests if isinstance(r, Write)]
    # The first envelope; then per message its data alone (at once), and its terminator
    # with the next envelope (the last one's alone).
    assert [w.data.split(b"\r\n", 1)[0] for w in writes] == [
        b"MAIL FROM:<alice@example.org> SIZE=" + str(items[0][0].size).encode(),
        b"From: alice@example.org",
        b".",
        b"From: alice@example.org",
        b".",
        b"From: alice@example.org",
        b".",
    ]
    data_writes = writes[1::2]
    assert all(w.flush and w.phase == "data_block" for w in data_writes)
    for (msg, _), write in zip(items, data_writes, strict=True):
        assert write.data == stuff(msg.as_bytes())[: -len(b".\r\n")]  # stuffed, no terminator
    assert writes[2].data.startswith(b".\r\nMAIL FROM:")
    assert writes[-1].data == b".\r\n"
    # On the wire, the same bytes as when each data went out with the next envelope.
    small_session, small_server = model_session(scripts)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(batch_module, "_EARLY_DATA", 1 << 30)
        small_server.run(small_session.deliver_many(items))
    joined = [r.data for r in small_server.requests if isinstance(r, Write)]
    assert b"".join(w.data for w in writes) == b"".join(joined)
    assert len(joined) == 4


@pytest.mark.parametrize("stray", [QUEUED, lines(250, "2.0.0 Ok"), b"2"])
@pytest.mark.parametrize("how", ["pipelined", "one at a time", "batch", "lmtp batch"])
def test_bytes_after_the_354_end_the_session_before_the_message(stray: bytes, how: str) -> None:
    # After 354 the server waits for the data: a reply then answers nothing, and read as
    # the message's final reply it would report a delivery the server never confirmed.
    lmtp = how == "lmtp batch"
    hello = lines(250, "mx.example.net", "PIPELINING") if how != "one at a time" else PLAIN_EHLO
    session = Session(config(lmtp=lmtp))
    driver = Driver([GREETING, hello])
    driver.run(session.open())
    refused = lines(550, "5.1.1 no such user")
    if how == "one at a time":
        driver.pieces = [OK, refused, OK, GO_AHEAD + stray, QUEUED]
    else:
        driver.pieces = [OK + refused + OK + GO_AHEAD + stray, QUEUED]
    item = (message(), envelope("gone@example.net", "bob@example.net"))
    if how.endswith("batch"):
        outcome = driver.run(session.deliver_many([item]))
        (result,) = outcome.results
        assert result is not None
    else:
        result = driver.run(session.deliver(*item))
    # The refused recipient keeps its own answer; the other was never sent the message.
    assert outcomes(result) == [
        ("gone@example.net", Outcome.PERMANENT, 550),
        ("bob@example.net", Outcome.TRANSIENT, None),
    ]
    assert "354" in (result.recipients[1].reason or "")
    assert session.closed
    assert driver.closed
    assert b"Subject: test" not in driver.sent


def test_bytes_after_the_354_leave_every_recipient_transient() -> None:
    # As for a 2xx to DATA: the message was not sent, so it may go again later.
    session, driver = opened([GREETING, PIPE, OK + OK + GO_AHEAD + QUEUED, QUEUED])
    result = driver.run(session.deliver(message(), envelope()))
    assert outcomes(result) == [("bob@example.net", Outcome.TRANSIENT, None)]
    assert "354" in (result.recipients[0].reason or "")
    assert session.closed
    assert b"Subject: test" not in driver.sent


def test_one_at_a_time_a_reply_beyond_mail_s_raises_before_rcpt() -> None:
    session, driver = opened([GREETING, PLAIN_EHLO, OK + lines(550, "5.1.1 no"), OK])
    with pytest.raises(ServerProtocolError, match="after MAIL"):
        driver.run(session.deliver(message(), envelope()))
    assert session.closed
    assert b"RCPT" not in driver.sent


def test_deliver_many_writes_the_next_envelope_after_the_data_before_reading() -> None:
    scripts = [{"mail": 250, "rcpts": [250], "finals": [250]}] * 3
    session, server = model_session(scripts)
    outcome = server.run(session.deliver_many(batch_items(scripts)))
    assert outcome.error is None
    assert [r is not None and r.ok for r in outcome.results] == [True] * 3
    # Per message after the first: one write (the previous data and terminator, then the next
    # envelope) and one read; the last data goes before the last read.
    kinds = ["W" if isinstance(r, Write) else "R" for r in server.requests]
    assert "".join(kinds) == "WR" + "WR" * 2 + "WR"
    second_group = server.requests[2]
    assert isinstance(second_group, Write)
    assert b"message 0\r\n.\r\nMAIL FROM:" in second_group.data
    # Each group goes out at once: the step records results and prepares the next message
    # while the server answers, before it reads.
    groups = [r for r in server.requests if isinstance(r, Write) and b"MAIL FROM:" in r.data]
    assert len(groups) == 3
    assert all(group.flush for group in groups)


def test_deliver_many_skips_a_message_refused_before_sending_and_goes_on() -> None:
    # The middle message is bigger than the server's SIZE (1,000,000 in model_session): it
    # is refused without a command (RFC 1870 §6), and the pipelined messages around it,
    # whose commands are prepared ahead, go out as usual.
    scripts = [{"mail": 250, "rcpts": [250], "finals": [250]}] * 2
    session, server = model_session(scripts)
    small = batch_items(scripts)
    big = (message("x" * 1_000_100 + "\n"), envelope("big@example.net"))
    outcome = server.run(session.deliver_many([small[0], big, small[1]]))
    assert outcome.error is None
    first, refused, last = outcome.results
    assert first is not None
    assert first.ok
    assert last is not None
    assert last.ok
    assert refused is not None
    assert [r.outcome for r in refused.recipients] == [Outcome.PERMANENT]
    assert "SIZE" in (refused.recipients[0].reason or "")
    assert server.mails == 1  # two transactions reached the server, not three


def test_deliver_many_with_bdat_keeps_a_window_of_messages_in_flight() -> None:
    scripts = [{"mail": 250, "rcpts": [250], "finals": [250]}] * 5
    session, server = model_session(scripts, chunking=True)
    outcome = server.run(session.deliver_many(batch_items(scripts)))
    assert [r is not None and r.ok for r in outcome.results] == [True] * 5
    kinds = "".join("W" if isinstance(r, Write) else "R" for r in server.requests)
    assert kinds.startswith("WWWWW")  # every message written before the first read


def test_deliver_many_lmtp_reads_each_final_reply() -> None:
    scripts = [
        {"mail": 250, "rcpts": [250, 550, 250], "finals": [250, 452]},
        {"mail": 250, "rcpts": [250], "finals": [250]},
    ]
    session, server = model_session(scripts, lmtp=True)
    outcome = server.run(session.deliver_many(batch_items(scripts)))
    first, second = outcome.results
    assert first is not None
    assert second is not None
    assert [r.outcome for r in first.recipients] == [
        Outcome.ACCEPTED,
        Outcome.PERMANENT,
        Outcome.TRANSIENT,
    ]
    assert second.ok


def after_throw(step: Step[T], exc: Exception) -> T:
    """Throw a driver's error into ``step``; answer its ``Close``; return its result."""
    assert isinstance(step.throw(exc), Close)
    with pytest.raises(StopIteration) as done:
        step.send(None)
    result: T = done.value.value
    return result


def test_deliver_many_a_timeout_mid_window_keeps_what_was_answered() -> None:
    session, _ = opened([GREETING, PIPE])
    items = [(message(), envelope("a@example.net", "b@example.net")), (message(), envelope())]
    step = session.deliver_many(items)
    assert isinstance(next(step), Write)  # first envelope
    assert isinstance(step.send(None), Read)
    request = step.send(OK + OK + lines(550, "5.1.1 no b") + GO_AHEAD)
    assert isinstance(request, Write)  # the data, then the second envelope
    assert request.data.endswith(b"DATA\r\n")
    assert isinstance(step.send(None), Read)
    outcome = after_throw(step, DeliveryTimeout("data_end timed out", host="mx"))
    first, second = outcome.results
    assert isinstance(outcome.error, DeliveryTimeout)
    assert first is not None
    assert [r.outcome for r in first.recipients] == [Outcome.TRANSIENT, Outcome.PERMANENT]
    assert second is None  # no answer at all: the transport may send it again
    assert session.closed


def test_lmtp_a_timeout_after_some_final_replies_keeps_them() -> None:
    env = envelope("a@example.net", "b@example.net")
    session, _ = opened([GREETING, ehlo("PIPELINING")], lmtp=True)
    step = session.deliver(message(), env)
    next(step)
    step.send(None)
    assert isinstance(step.send(OK + OK + OK + GO_AHEAD), Write)
    assert isinstance(step.send(None), Read)
    assert isinstance(step.send(lines(250, "2.1.5 a delivered")), Read)
    result = after_throw(step, DeliveryTimeout("data_end timed out", host="mx"))
    assert [r.outcome for r in result.recipients] == [Outcome.ACCEPTED, Outcome.TRANSIENT]
    assert "DeliveryTimeout" in (result.recipients[1].reason or "")
    assert session.closed


def test_a_timeout_before_any_final_answer_still_raises() -> None:
    session, _ = opened([GREETING, PIPE])
    step = session.deliver(message(), envelope())
    next(step)
    step.send(None)
    with pytest.raises(DeliveryTimeout):
        step.throw(DeliveryTimeout("mail timed out", host="mx"))
    assert session.closed


_scripts = st.lists(
    st.fixed_dictionaries(
        {
            "mail": st.sampled_from([250, 451, 553]),
            "rcpts": st.lists(st.sampled_from([250, 250, 450, 550]), min_size=1, max_size=3),
            "finals": st.lists(st.sampled_from([250, 451, 554]), min_size=3, max_size=3),
            "big": st.booleans(),
        }
    ),
    min_size=1,
    max_size=5,
)


@given(scripts=_scripts, lmtp=st.booleans(), chunking=st.booleans(), pipelining=st.booleans())
def test_deliver_many_gives_the_results_of_sending_one_by_one(
    scripts: list[dict[str, object]], lmtp: bool, chunking: bool, pipelining: bool
) -> None:
    changes = {"lmtp": lmtp, "chunking": chunking, "pipelining": pipelining}
    items = batch_items(scripts)
    alone, server = model_session(scripts, **changes)
    expected = [outcomes(server.run(alone.deliver(m, e))) for m, e in items]
    together, server = model_session(scripts, **changes)
    outcome = server.run(together.deliver_many(items))
    assert outcome.error is None
    assert [outcomes(r) if r is not None else None for r in outcome.results] == expected


# -- probe -------------------------------------------------------------------------------------


def addresses(*texts: str) -> list[Address]:
    return [Address.parse(t) for t in texts]


def test_probe_asks_mail_and_each_rcpt_then_rsets_and_never_sends_data() -> None:
    session, driver = opened(
        [GREETING, PIPE, OK, OK, lines(550, "5.1.1 no such user"), lines(450, "4.2.0 later"), OK]
    )
    driver.requests.clear()
    probe = driver.run(
        session.probe(
            Address.parse("probe@example.org"),
            addresses("a@example.net", "b@example.net", "c@example.net"),
        )
    )
    assert probe.mail is not None
    assert probe.mail.code == 250
    assert [r.code if r else None for r in probe.recipients] == [250, 550, 450]
    assert not probe.ended
    assert [w.data.split(b":")[0].split(b"\r")[0] for w in driver.writes] == [
        b"MAIL FROM",
        b"RCPT TO",
        b"RCPT TO",
        b"RCPT TO",
        b"RSET",
    ]
    assert b"DATA" not in driver.sent
    # The session is clean again: the next message needs no RSET first.
    driver.pieces = [OK + OK + GO_AHEAD, QUEUED]
    driver.requests.clear()
    assert driver.run(session.deliver(message(), envelope())).ok
    assert driver.writes[0].data.startswith(b"MAIL FROM")


def test_probe_with_a_refused_mail_asks_no_rcpt() -> None:
    session, driver = opened([GREETING, PIPE, lines(553, "5.7.1 go away"), OK])
    probe = driver.run(session.probe(None, addresses("a@example.net")))
    assert probe.mail is not None
    assert probe.mail.code == 553
    assert probe.recipients == (None,)
    assert b"RCPT" not in driver.sent


@pytest.mark.parametrize("ending", [lines(421, "4.7.0 too many errors"), b""])
def test_probe_cut_short_keeps_the_answers_it_got(ending: bytes) -> None:
    session, driver = opened([GREETING, PIPE, OK, lines(550, "5.1.1 no"), ending])
    probe = driver.run(session.probe(None, addresses("a@example.net", "b@example.net")))
    assert [r.code if r else None for r in probe.recipients] == [550, None]
    assert probe.ended
    assert session.closed


@pytest.mark.parametrize("stray", [OK, lines(550, "5.1.1 no such user"), b"x\r\n"])
def test_probe_stops_at_a_reply_nobody_asked_for(stray: bytes) -> None:
    # Without pipelining each reply answers the one command in flight; one more, received
    # with MAIL's, would be read as the first RCPT's verdict.
    session, driver = opened([GREETING, PIPE, OK + stray, lines(550, "5.1.1 no"), OK])
    probe = driver.run(session.probe(None, addresses("a@example.net")))
    assert probe.mail is not None
    assert probe.mail.code == 250
    assert probe.recipients == (None,)
    assert probe.ended
    assert session.closed
    assert b"RCPT" not in driver.sent


def test_probe_on_a_closed_session_raises() -> None:
    session, driver = opened([GREETING, PIPE, BYE])
    driver.run(session.quit())
    with pytest.raises(ConnectionLost):
        driver.run(session.probe(None, addresses("a@example.net")))


def test_config_takes_any_iterable_of_mechanisms_as_a_tuple() -> None:
    assert config(auth_mechanisms=["PLAIN", "LOGIN"]).auth_mechanisms == ("PLAIN", "LOGIN")
    assert config(auth_mechanisms=iter(["PLAIN"])).auth_mechanisms == ("PLAIN",)
    assert config().auth_mechanisms is None


@pytest.mark.parametrize("body", [".hidden\r\nend\r\n", ".hidden\r\nno line end"])
def test_the_same_message_twice_goes_out_identically_stuffed_once(body: str) -> None:
    msg = message(body)
    session, driver = opened(
        [GREETING, PIPE, OK + OK + GO_AHEAD, QUEUED, OK + OK + GO_AHEAD, QUEUED]
    )
    driver.requests.clear()
    for _ in range(2):
        assert driver.run(session.deliver(msg, envelope())).ok
    data = [w.data for w in driver.writes if w.phase == "data_block"]
    assert data[0] == data[1]
    assert data[0].endswith(b"\r\n..hidden\r\n" + body[9:].rstrip("\r\n").encode() + b"\r\n.\r\n")


@given(
    scripts=_scripts,
    lmtp=st.booleans(),
    chunking=st.booleans(),
    pipelining=st.booleans(),
    cut=st.integers(min_value=0, max_value=40),
)
def test_deliver_many_cut_short_keeps_every_answer_and_hands_back_the_rest(
    scripts: list[dict[str, object]], lmtp: bool, chunking: bool, pipelining: bool, cut: int
) -> None:
    # The server says 421 and hangs up after ``cut`` replies, wherever that falls.
    changes = {"lmtp": lmtp, "chunking": chunking, "pipelining": pipelining}
    items = batch_items(scripts)
    alone, server = model_session(scripts, **changes)
    expected = [outcomes(server.run(alone.deliver(m, e))) for m, e in items]
    together, server = model_session(scripts, cut=cut, **changes)
    outcome = server.run(together.deliver_many(items))
    if outcome.error is None:
        assert [outcomes(r) if r else None for r in outcome.results] == expected
        return
    assert together.closed
    for index, result in enumerate(outcome.results):
        # Every reply of a message comes before the next message's first one (FIFO).
        answered = any(owner > index for owner in server.emitted)
        if answered:
            assert result is not None
            assert outcomes(result) == expected[index]
        elif result is not None and outcomes(result) != expected[index]:
            # Some answers came, not all: those are kept; the rest are TRANSIENT, saying why.
            assert len(result.recipients) == len(items[index][1].recipients)
            pending = [r for r in result.recipients if "before a final reply" in (r.reason or "")]
            assert pending
            assert all(r.outcome is Outcome.TRANSIENT for r in pending)
        # else: None, no final answer at all: handed back for the transport to send again.


# -- the fast result builders ----------------------------------------------------------------


@given(
    code=st.integers(200, 599),
    text=st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=20),
    reason=st.none() | st.text(max_size=20),
    host=st.none() | st.sampled_from(["mx.example:25", "[::1]:2525"]),
    message_id=st.none() | st.sampled_from(["<a@b>", "<x.y@z>"]),
)
def test_fast_result_builders_equal_the_validated_construction(
    code: int, text: str, reason: str | None, host: str | None, message_id: str | None
) -> None:
    address = Address.parse("user@example.org")
    reply = Reply(code=code, lines=(text,), enhanced=None)
    transaction = flow._Transaction((address,), host, message_id)
    transaction.settle(0, reply, reason)
    fast = transaction.result()
    slow = DeliveryResult(
        recipients=[
            RecipientResult(
                address=address,
                outcome=Outcome.from_reply(reply),
                reply=reply,
                reason=reason,
                host=host,
            )
        ],
        message_id=message_id,
        host=host,
    )
    assert fast == slow
    assert repr(fast) == repr(slow)
    assert hash(fast) == hash(slow)
    assert pickle.loads(pickle.dumps(fast)) == slow
    assert fast.ok is slow.ok
    assert (fast.accepted, fast.deferred, fast.rejected) == (
        slow.accepted,
        slow.deferred,
        slow.rejected,
    )


@given(
    final=st.integers(200, 599),
    refused=st.lists(st.none() | st.integers(400, 599), min_size=1, max_size=4),
)
def test_finish_is_settle_all_then_result(final: int, refused: list[int | None]) -> None:
    addresses = [Address.parse(f"r{i}@example.org") for i in range(len(refused))]
    reply = Reply(code=final, lines=("final",), enhanced=None)
    one, two = (flow._Transaction(addresses, "mx:25", "<id@x>") for _ in range(2))
    for index, code in enumerate(refused):
        if code is not None:
            for transaction in (one, two):
                transaction.settle(index, Reply(code=code, lines=("no",), enhanced=None))
    two.settle_all(reply)
    assert one.finish(reply) == two.result()
    assert one.all_final()
    assert not one.open


@given(data=st.binary(max_size=64), phase=st.sampled_from(["mail", "data_block", "data_end"]))
def test_fast_write_builder_equals_the_attrs_construction(data: bytes, phase: str) -> None:
    fast = _flushed_write(data, phase)
    slow = Write(data=data, phase=phase, flush=True)
    assert type(fast) is Write
    assert fast == slow
    assert repr(fast) == repr(slow)
    assert hash(fast) == hash(slow)
    assert pickle.loads(pickle.dumps(fast)) == slow


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        (250, Outcome.ACCEPTED),
        (251, Outcome.ACCEPTED),
        (354, Outcome.TRANSIENT),
        (421, Outcome.TRANSIENT),
        (452, Outcome.TRANSIENT),
        (550, Outcome.PERMANENT),
        (554, Outcome.PERMANENT),
    ],
)
def test_settle_gives_the_outcome_of_the_reply(code: int, outcome: Outcome) -> None:
    transaction = flow._Transaction((Address.parse("a@example.org"),), None)
    reply = Reply(code=code, lines=("x",), enhanced=None)
    transaction.settle(0, reply)
    (result,) = transaction.result().recipients
    assert result.outcome is outcome is Outcome.from_reply(reply)
