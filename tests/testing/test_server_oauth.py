"""mailrelay.testing.server: AUTH XOAUTH2 and OAUTHBEARER (RFC 7628) against a token table,
with the real servers' failure path (334 JSON error, dummy response, 535), byte by byte."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailrelay.errors import AuthenticationError
from mailrelay.options import TLS, Timeouts
from mailrelay.protocol.sasl import OAuthBearer, XOAuth2
from mailrelay.testing.server import SMTPTestServer
from mailrelay.transport import SMTPTransport
from tests.peers.tls import TLSFiles
from tests.testing.raw_client import RawClient
from tests.transport.helpers import FLAVOURS, Flavour, make_message, send_with

TOKENS = {"bob@example.com": {"good-token"}}


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def xoauth2(user: str, token: str) -> bytes:
    return b64(f"user={user}\x01auth=Bearer {token}\x01\x01".encode())


def oauthbearer(user: str, token: str, extra: str = "") -> bytes:
    return b64(f"n,a={user},\x01{extra}auth=Bearer {token}\x01\x01".encode())


@pytest.fixture
def raw() -> Iterator[Any]:
    clients: list[RawClient] = []

    def connect(server: SMTPTestServer) -> RawClient:
        client = RawClient(server, greeting=None)
        clients.append(client)
        assert client.code() == 220
        assert client.command(b"EHLO c") == 250
        return client

    yield connect
    for client in clients:
        client.close()


ERROR_CHALLENGE = (
    "334 "
    + base64.b64encode(
        b'{"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}'
    ).decode()
)


@pytest.mark.parametrize(
    ("lines", "code"),
    [
        ([b"AUTH XOAUTH2 " + xoauth2("bob@example.com", "good-token")], 235),
        ([b"AUTH XOAUTH2", xoauth2("bob@example.com", "good-token")], 235),
        ([b"AUTH XOAUTH2 " + xoauth2("bob@example.com", "bad-token"), b""], 535),
        ([b"AUTH XOAUTH2 " + xoauth2("bob@example.com", "bad-token"), b"AQ=="], 501),
        ([b"AUTH XOAUTH2 " + xoauth2("eve@example.com", "good-token"), b""], 535),
        ([b"AUTH XOAUTH2 " + b64(b"user=bob@example.com\x01auth=good-token\x01\x01")], 501),
        ([b"AUTH XOAUTH2 " + b64(b"user=bob@example.com\x01auth=Bearer good-token\x01")], 501),
        ([b"AUTH OAUTHBEARER " + oauthbearer("bob@example.com", "good-token")], 235),
        ([b"AUTH OAUTHBEARER", oauthbearer("bob@example.com", "good-token")], 235),
        (
            [
                b"AUTH OAUTHBEARER "
                + oauthbearer("bob@example.com", "good-token", "host=h.example\x01port=587\x01")
            ],
            235,
        ),
        ([b"AUTH OAUTHBEARER " + oauthbearer("bob@example.com", "bad-token"), b"AQ=="], 535),
        ([b"AUTH OAUTHBEARER " + oauthbearer("bob@example.com", "bad-token"), b""], 501),
        ([b"AUTH OAUTHBEARER " + b64(b"y,a=bob@example.com,\x01auth=Bearer t\x01\x01")], 501),
        ([b"AUTH OAUTHBEARER " + b64(b"n,a=bob@example.com,\x01auth=Bearer t\x01")], 501),
        ([b"AUTH OAUTHBEARER " + b64(b"n,a=bob@example.com,\x01\x01")], 501),
        ([b"AUTH OAUTHBEARER", b"*"], 501),
        ([b"AUTH OAUTHBEARER not-base64!"], 501),
        ([b"AUTH PLAIN " + b64(b"\0bob@example.com\0good-token")], 504),  # no users given
    ],
)
def test_bearer_exchanges(lines: list[bytes], code: int, raw: Any) -> None:
    with SMTPTestServer(oauth_tokens=TOKENS, allow_insecure_auth=True) as server:
        client = raw(server)
        for index, line in enumerate(lines[:-1]):
            client.send(line + b"\r\n")
            (reply,) = client.reply()
            # A bad token's challenge is the JSON error (RFC 7628 §3.2.2); else an empty one.
            bad = index == 0 and line.startswith(b"AUTH ") and len(line.split()) == 3
            assert reply.decode() == (ERROR_CHALLENGE if bad else "334 ")
        assert client.command(lines[-1]) == code
        if code == 235:
            assert client.command(lines[0]) == 503  # once per session (RFC 4954 §4)
        else:
            # RFC 4954 §4: a failed exchange leaves the client free to try again.
            good = b"AUTH XOAUTH2 " + xoauth2("bob@example.com", "good-token")
            assert client.command(good) == 235


@pytest.mark.parametrize(
    ("options", "advertised"),
    [
        ({"oauth_tokens": TOKENS}, b"250 AUTH XOAUTH2 OAUTHBEARER"),
        (
            {"oauth_tokens": TOKENS, "auth": {"bob": "pw"}},
            b"250 AUTH PLAIN LOGIN XOAUTH2 OAUTHBEARER",
        ),
        ({"auth": {"bob": "pw"}}, b"250 AUTH PLAIN LOGIN"),
    ],
)
def test_ehlo_advertises_the_mechanisms(options: dict[str, Any], advertised: bytes) -> None:
    with SMTPTestServer(allow_insecure_auth=True, extensions=["SIZE"], **options) as server:
        client = RawClient(server, greeting=None)
        try:
            assert client.code() == 220
            client.send(b"EHLO c\r\n")
            assert advertised in client.reply()
        finally:
            client.close()


def test_tokens_are_granted_and_revoked_while_running(raw: Any) -> None:
    with SMTPTestServer(oauth_tokens={}, allow_insecure_auth=True) as server:
        client = raw(server)
        assert client.command(b"AUTH XOAUTH2 " + xoauth2("bob", "t1")) == 334
        assert client.command(b"") == 535
        server.grant_token("bob", "t1")
        assert client.command(b"AUTH XOAUTH2 " + xoauth2("bob", "t1")) == 235
        server.revoke_token("t1")
        other = raw(server)
        assert other.command(b"AUTH OAUTHBEARER " + oauthbearer("bob", "t1")) == 334
        assert other.command(b"AQ==") == 535
    first, second = server.sessions
    assert "authenticated as bob" in first.events
    assert "authenticated as bob" not in second.events


def test_grant_and_revoke_need_a_token_table() -> None:
    with SMTPTestServer() as server:
        with pytest.raises(ValueError, match="oauth_tokens"):
            server.grant_token("bob", "t")
        with pytest.raises(ValueError, match="oauth_tokens"):
            server.revoke_token("t")


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("mechanism", ["XOAUTH2", "OAUTHBEARER"])
def test_mailrelay_over_starttls_with_a_token(
    flavour: Flavour, mechanism: str, tls_files: TLSFiles
) -> None:
    with SMTPTestServer(tls=tls_files.server_context(), oauth_tokens=TOKENS) as server:
        result = send_with(
            flavour,
            make_message(),
            host=server.host,
            port=server.port,
            ssl_context=tls_files.client_context(),
            timeouts=Timeouts.all(5),
            username="bob@example.com",
            password="good-token",
            auth_mechanisms=[mechanism],
        )
        (received,) = server.wait_for(1)
    assert result.ok
    assert received.authenticated == "bob@example.com"
    assert received.tls
    (session,) = server.sessions
    assert f"{mechanism} token offered for bob@example.com" in session.events


def test_a_refused_token_reaches_mailrelay_with_the_json_details() -> None:
    with SMTPTestServer(oauth_tokens=TOKENS, allow_insecure_auth=True) as server:
        transport = SMTPTransport(
            server.host,
            server.port,
            tls=TLS.NONE,
            allow_insecure_auth=True,
            username="bob@example.com",
            password="bad-token",
            auth_mechanisms=["OAUTHBEARER"],
            timeouts=Timeouts.all(5),
        )
        with transport, pytest.raises(AuthenticationError) as caught:
            transport.send(make_message())
    assert "535" in str(caught.value)
    assert "status=401" in str(caught.value)
    assert "bad-token" not in str(caught.value)
    (session,) = server.sessions
    assert session.lines[-2:] == [b"AQ==", b"QUIT"]


USERS = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=","),
    min_size=1,
    max_size=30,
)
TOKEN_TEXT = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(USERS, TOKEN_TEXT, st.booleans())
def test_the_server_reads_what_mailrelay_writes(user: str, token: str, bearer: bool) -> None:
    mechanism = OAuthBearer() if bearer else XOAuth2()
    response = next(mechanism.start(user, token))
    assert response is not None
    with SMTPTestServer(oauth_tokens={user: {token}}, allow_insecure_auth=True) as server:
        client = RawClient(server, greeting=None)
        try:
            assert client.code() == 220
            assert client.command(b"EHLO c") == 250
            line = f"AUTH {mechanism.name} ".encode() + b64(response)
            assert client.command(line) == 235
        finally:
            client.close()
