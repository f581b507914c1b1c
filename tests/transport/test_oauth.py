"""OAuth 2.0 submission that keeps working for hours: token providers, the expired-token
retry, XOAUTH2 and OAUTHBEARER (RFC 7628), both drivers.

Peers: aiosmtpd over STARTTLS with the test CA (:class:`tests.peers.aiosmtpd_server.OAuthHandler`
checks each mechanism's exact wire form against a token table that tests change while it runs),
and mailrelay's own :class:`~mailrelay.testing.server.SMTPTestServer` where a test needs to
count connections.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import logging
import ssl
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import pytest

from mailrelay.errors import AuthenticationError, ConfigurationError, DeliveryError
from mailrelay.message import Message
from mailrelay.options import TLS, Timeouts
from mailrelay.results import DeliveryResult, Outcome
from mailrelay.testing.server import Fault, SMTPTestServer
from mailrelay.tracker import DeliveryTracker, SQLiteStore, State
from mailrelay.transport import (
    AsyncSMTPTransport,
    LMTPTransport,
    PoolSettings,
    SMTPTransport,
    TransportURL,
    async_transport_from_url,
    transport_from_url,
)
from tests.peers.aiosmtpd_server import AiosmtpdFactory, AiosmtpdServer, TokenTable
from tests.transport.helpers import make_message, run

USER = "alice@mailrelay.test"
MECHANISMS = ("XOAUTH2", "OAUTHBEARER")

#: How the provider is given: a plain callable to SMTPTransport, a plain callable to
#: AsyncSMTPTransport, a coroutine function to AsyncSMTPTransport.
Kind = Literal["sync", "async-plain", "async-coroutine"]
KINDS: tuple[Kind, ...] = ("sync", "async-plain", "async-coroutine")


class Tokens:
    """A token provider that hands out a script (the last entry repeats) and counts calls.

    An entry that is an exception is raised instead of returned.
    """

    def __init__(self, *script: str | Exception) -> None:
        self.script = list(script)
        self.calls = 0

    def __call__(self) -> str:
        item = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        if isinstance(item, Exception):
            raise item
        return item

    async def coroutine(self) -> str:
        await asyncio.sleep(0)  # a real provider would await an HTTP request here
        return self()

    def provider(self, kind: Kind) -> Callable[[], Any]:
        return self.coroutine if kind == "async-coroutine" else self


def wire(mechanism: str, token: str, user: str = USER) -> bytes:
    """The decoded initial response each mechanism must send (checked server-side too)."""
    if mechanism == "XOAUTH2":
        return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()
    return f"n,a={user},\x01auth=Bearer {token}\x01\x01".encode()


DUMMY = {"XOAUTH2": b"", "OAUTHBEARER": b"\x01"}


def tls_args(server: AiosmtpdServer, **extra: Any) -> dict[str, Any]:
    """STARTTLS (required) to the aiosmtpd ``server``, trusting the test CA."""
    return {
        "host": server.host,
        "port": server.port,
        "tls": TLS.STARTTLS,
        "ssl_context": ssl.create_default_context(cafile=str(server.ca_file)),
        "timeouts": Timeouts.all(10),
        "username": USER,
        **extra,
    }


def send_each(
    kind: Kind,
    messages: list[Message],
    *,
    between: Callable[[int], None] = lambda index: None,
    **kwargs: Any,
) -> list[DeliveryResult]:
    """Send ``messages`` one by one through one transport of ``kind``, calling
    ``between(i)`` after message ``i`` (to revoke a token while the pool lives)."""
    if kind == "sync":
        with SMTPTransport(**kwargs) as transport:
            results = []
            for index, message in enumerate(messages):
                results.append(transport.send(message))
                between(index)
            return results

    async def main() -> list[DeliveryResult]:
        async with AsyncSMTPTransport(**kwargs) as transport:
            results = []
            for index, message in enumerate(messages):
                results.append(await transport.asend(message))
                between(index)
            return results

    return run(main())


def send_many(kind: Kind, messages: list[Message], **kwargs: Any) -> list[DeliveryResult]:
    if kind == "sync":
        with SMTPTransport(**kwargs) as transport:
            return transport.send_many(messages)

    async def main() -> list[DeliveryResult]:
        async with AsyncSMTPTransport(**kwargs) as transport:
            return await transport.asend_many(messages)

    return run(main())


@pytest.fixture
def tokens() -> TokenTable:
    return TokenTable({USER: {"t1"}})


@pytest.fixture
def oauth_server(make_aiosmtpd: AiosmtpdFactory, tokens: TokenTable) -> AiosmtpdServer:
    """aiosmtpd with STARTTLS, AUTH XOAUTH2 and OAUTHBEARER over the ``tokens`` table."""
    return make_aiosmtpd(oauth_tokens=tokens)


def mailrelay_log(caplog: pytest.LogCaptureFixture) -> str:
    """What mailrelay's own loggers wrote (aiosmtpd runs in this process and logs too)."""
    return "\n".join(
        record.getMessage() for record in caplog.records if record.name.startswith("mailrelay")
    )


def secrets_of(mechanism: str, *tokens: str) -> list[str]:
    """Every form in which a token could leak: raw, and inside the base64 AUTH line."""
    found = []
    for token in tokens:
        found += [token, base64.b64encode(wire(mechanism, token)).decode()]
    return found


# -- a provider on every new connection -------------------------------------------------------


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("kind", KINDS)
def test_the_provider_is_asked_for_each_new_connection(
    kind: Kind, mechanism: str, oauth_server: AiosmtpdServer, tokens: TokenTable
) -> None:
    provider = Tokens("t1")
    results = send_each(
        kind,
        [make_message(subject=f"m{i}") for i in range(3)],
        **tls_args(
            oauth_server,
            password=provider.provider(kind),
            auth_mechanisms=[mechanism],
            pool=PoolSettings(max_messages=1),
        ),
    )
    assert [r.ok for r in results] == [True, True, True]
    assert provider.calls == 3  # once per connection, never at construction
    assert tokens.responses == [(mechanism, wire(mechanism, "t1"))] * 3
    assert [m.auth_login for m in oauth_server.messages] == [USER] * 3
    assert all(m.tls for m in oauth_server.messages)


@pytest.mark.parametrize("kind", KINDS)
def test_a_provider_is_not_called_at_construction(kind: Kind) -> None:
    provider = Tokens("t1")
    if kind == "sync":
        SMTPTransport("mail.invalid", username=USER, password=provider).close()
    else:

        async def main() -> None:
            transport = AsyncSMTPTransport(
                "mail.invalid", username=USER, password=provider.provider(kind)
            )
            await transport.aclose()

        run(main())
    assert provider.calls == 0


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("kind", KINDS)
def test_after_a_revocation_the_next_connection_gets_a_current_token(
    kind: Kind, mechanism: str, oauth_server: AiosmtpdServer, tokens: TokenTable
) -> None:
    provider = Tokens("t1")

    def expire(index: int) -> None:
        # The identity provider rotates the token; the server forgets the old one.
        tokens.revoke("t1")
        tokens.grant(USER, "t2")
        provider.script = ["t2"]

    results = send_each(
        kind,
        [make_message(subject="before"), make_message(subject="after")],
        between=expire,
        **tls_args(
            oauth_server,
            password=provider.provider(kind),
            auth_mechanisms=[mechanism],
            pool=PoolSettings(max_messages=1),
        ),
    )
    assert [r.ok for r in results] == [True, True]
    assert provider.calls == 2
    # No failed AUTH: the pool's new connection asked the provider first.
    assert tokens.responses == [
        (mechanism, wire(mechanism, "t1")),
        (mechanism, wire(mechanism, "t2")),
    ]
    assert len(oauth_server.messages) == 2


# -- the expired-token retry ------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("kind", KINDS)
def test_an_expired_token_is_renewed_once_and_the_message_goes_once(
    kind: Kind,
    mechanism: str,
    oauth_server: AiosmtpdServer,
    tokens: TokenTable,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="mailrelay")
    tokens.revoke("t1")
    tokens.grant(USER, "fresh-token")
    provider = Tokens("stale-token", "fresh-token")
    message = make_message()
    (result,) = send_each(
        kind,
        [message],
        **tls_args(oauth_server, password=provider.provider(kind), auth_mechanisms=[mechanism]),
    )
    assert result.ok
    assert provider.calls == 2
    # The whole failure path, on the wire: the stale token, the dummy response after the
    # server's 334 JSON error, then AUTH again with the fresh token.
    assert tokens.responses == [
        (mechanism, wire(mechanism, "stale-token")),
        (mechanism, DUMMY[mechanism]),
        (mechanism, wire(mechanism, "fresh-token")),
    ]
    (received,) = oauth_server.messages
    assert received.content == message.as_bytes()
    trace = mailrelay_log(caplog)
    assert f">>> AUTH {mechanism} <redacted>" in trace
    for secret in secrets_of(mechanism, "stale-token", "fresh-token"):
        assert secret not in trace


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("kind", KINDS)
def test_a_token_refused_twice_is_one_retry_and_a_permanent_error(
    kind: Kind,
    mechanism: str,
    oauth_server: AiosmtpdServer,
    tokens: TokenTable,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="mailrelay")
    provider = Tokens("bad-token-1", "bad-token-2", "never-asked")
    with pytest.raises(AuthenticationError) as caught:
        send_each(
            kind,
            [make_message()],
            **tls_args(oauth_server, password=provider.provider(kind), auth_mechanisms=[mechanism]),
        )
    error = caught.value
    assert provider.calls == 2  # one renewal, never a loop
    assert [r for r in tokens.responses if r[1] != DUMMY[mechanism]] == [
        (mechanism, wire(mechanism, "bad-token-1")),
        (mechanism, wire(mechanism, "bad-token-2")),
    ]
    assert oauth_server.messages == []
    assert error.reply is not None
    assert error.reply.code == 535
    assert not error.is_transient
    # The server's JSON error, decoded, without the token.
    assert "status=401" in str(error)
    assert "scope=https://mail.google.com/" in str(error)
    for secret in secrets_of(mechanism, "bad-token-1", "bad-token-2"):
        assert secret not in str(error)
        assert secret not in repr(error)
        assert secret not in mailrelay_log(caplog)


@pytest.mark.parametrize("kind", KINDS)
def test_the_same_token_again_is_not_retried(
    kind: Kind, oauth_server: AiosmtpdServer, tokens: TokenTable
) -> None:
    provider = Tokens("bad-token")
    with pytest.raises(AuthenticationError, match="535"):
        send_each(
            kind,
            [make_message()],
            **tls_args(oauth_server, password=provider.provider(kind), auth_mechanisms=["XOAUTH2"]),
        )
    assert provider.calls == 2
    assert tokens.responses == [("XOAUTH2", wire("XOAUTH2", "bad-token")), ("XOAUTH2", b"")]


@pytest.mark.parametrize("kind", KINDS)
def test_a_static_token_is_not_renewed(
    kind: Kind, oauth_server: AiosmtpdServer, tokens: TokenTable
) -> None:
    with pytest.raises(AuthenticationError, match="status=401"):
        send_each(
            kind,
            [make_message()],
            **tls_args(oauth_server, password="expired", auth_mechanisms=["OAUTHBEARER"]),
        )
    assert tokens.responses == [
        ("OAUTHBEARER", wire("OAUTHBEARER", "expired")),
        ("OAUTHBEARER", DUMMY["OAUTHBEARER"]),
    ]


# -- a provider that fails ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_provider_that_raises_is_a_transient_authentication_error(
    kind: Kind, oauth_server: AiosmtpdServer, tokens: TokenTable
) -> None:
    cause = OSError("login.example.com unreachable")
    provider = Tokens(cause)
    with pytest.raises(AuthenticationError) as caught:
        send_each(
            kind,
            [make_message()],
            **tls_args(oauth_server, password=provider.provider(kind), auth_mechanisms=["XOAUTH2"]),
        )
    error = caught.value
    assert error.is_transient  # an identity provider out of reach: try again later
    assert error.__cause__ is cause
    assert "password provider failed: OSError: login.example.com unreachable" in str(error)
    assert error.host == f"{oauth_server.host}:{oauth_server.port}"
    assert tokens.responses == []  # asked before connecting: nothing was sent
    assert oauth_server.messages == []


@pytest.mark.parametrize("kind", KINDS)
def test_send_many_reports_a_failing_provider_per_message(
    kind: Kind, oauth_server: AiosmtpdServer
) -> None:
    provider = Tokens(OSError("no network"))
    results = send_many(
        kind,
        [make_message(subject="a"), make_message(subject="b")],
        **tls_args(oauth_server, password=provider.provider(kind), auth_mechanisms=["XOAUTH2"]),
    )
    assert [r.ok for r in results] == [False, False]
    for result in results:
        assert {r.outcome for r in result.recipients} == {Outcome.TRANSIENT}
        assert all("password provider failed" in (r.reason or "") for r in result.recipients)
    assert oauth_server.messages == []


@pytest.mark.parametrize("kind", KINDS)
def test_a_provider_failing_at_renewal(
    kind: Kind, oauth_server: AiosmtpdServer, tokens: TokenTable
) -> None:
    cause = TimeoutError("token endpoint timed out")
    provider = Tokens("stale", cause)
    with pytest.raises(AuthenticationError) as caught:
        send_each(
            kind,
            [make_message()],
            **tls_args(oauth_server, password=provider.provider(kind), auth_mechanisms=["XOAUTH2"]),
        )
    error = caught.value
    assert error.__cause__ is cause
    assert error.is_transient
    assert error.reply is not None
    assert error.reply.code == 535
    assert "asked for a fresh token" in str(error)
    assert "stale" not in str(error)
    assert provider.calls == 2
    assert oauth_server.messages == []


class Permanent(DeliveryError):
    transient_by_default = False


def test_a_provider_may_say_its_failure_is_permanent(oauth_server: AiosmtpdServer) -> None:
    provider = Tokens(Permanent("the refresh token was revoked"))
    with pytest.raises(AuthenticationError) as caught:
        send_each("sync", [make_message()], **tls_args(oauth_server, password=provider))
    assert not caught.value.is_transient


@pytest.mark.parametrize(
    ("returned", "match"),
    [
        (b"bytes-token", "returned bytes, not str"),
        (None, "returned NoneType, not str"),
        ("", "empty secret"),
        ("tok\r\nQUIT", "CR, LF or NUL"),
        ("tok\0en", "CR, LF or NUL"),
    ],
)
@pytest.mark.parametrize("kind", KINDS)
def test_an_unusable_secret_is_a_permanent_error(
    kind: Kind, returned: object, match: str, oauth_server: AiosmtpdServer, tokens: TokenTable
) -> None:
    def provider() -> Any:
        return returned

    async def coroutine() -> Any:
        return returned

    with pytest.raises(AuthenticationError, match=match) as caught:
        send_each(
            kind,
            [make_message()],
            **tls_args(oauth_server, password=coroutine if kind == "async-coroutine" else provider),
        )
    assert not caught.value.is_transient
    if isinstance(returned, str) and returned:
        assert returned not in str(caught.value)
    assert tokens.responses == []


@pytest.mark.parametrize("token", ["tok\x01en", "tok en", "tøken"])
def test_a_token_the_mechanism_cannot_carry_is_refused_before_sending(
    token: str, oauth_server: AiosmtpdServer, tokens: TokenTable
) -> None:
    with pytest.raises(AuthenticationError, match="bearer token cannot contain") as caught:
        send_each(
            "sync",
            [make_message()],
            **tls_args(oauth_server, password=Tokens(token), auth_mechanisms=["OAUTHBEARER"]),
        )
    assert token not in str(caught.value)
    assert tokens.responses == []


def test_the_blocking_transports_refuse_a_coroutine_provider() -> None:
    async def token() -> str:
        return "t"

    class Callable_:
        async def __call__(self) -> str:
            return "t"

    for provider in (token, Callable_()):
        with pytest.raises(ConfigurationError, match="coroutine"):
            SMTPTransport("mail.invalid", username=USER, password=provider)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="coroutine"):
            LMTPTransport("mail.invalid", username=USER, password=provider)  # type: ignore[arg-type]


def test_a_plain_callable_returning_a_coroutine_fails_cleanly(
    oauth_server: AiosmtpdServer,
) -> None:
    async def token() -> str:
        return "t1"

    def provider() -> Any:
        return token()  # a plain callable, so the constructor cannot tell

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "coroutine was never awaited"
        with pytest.raises(AuthenticationError, match="awaitable"):
            send_each("sync", [make_message()], **tls_args(oauth_server, password=provider))


@pytest.mark.parametrize("password", [42, b"bytes"])
def test_a_password_that_is_neither_str_nor_callable(password: object) -> None:
    with pytest.raises(ConfigurationError, match="password must be a str or a callable"):
        SMTPTransport("mail.invalid", username=USER, password=password)  # type: ignore[arg-type]


def test_repr_shows_no_provider_or_token() -> None:
    provider = Tokens("secret-token")
    transport = SMTPTransport("mail.invalid", username=USER, password=provider)
    try:
        assert "secret" not in repr(transport)
        assert "Tokens" not in repr(transport)
        assert "secret" not in repr(transport.settings)
    finally:
        transport.close()


# -- one connection, counted (mailrelay's test server) ------------------------------------------


def plain_args(server: SMTPTestServer, **extra: Any) -> dict[str, Any]:
    return {
        "host": server.host,
        "port": server.port,
        "tls": TLS.NONE,
        "allow_insecure_auth": True,
        "timeouts": Timeouts.all(5),
        "username": "me@example.com",
        **extra,
    }


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("kind", KINDS)
def test_the_retry_happens_on_the_same_connection(kind: Kind, mechanism: str) -> None:
    provider = Tokens("stale", "fresh")
    with SMTPTestServer(
        oauth_tokens={"me@example.com": {"fresh"}}, allow_insecure_auth=True
    ) as server:
        (result,) = send_each(
            kind,
            [make_message()],
            **plain_args(server, password=provider.provider(kind), auth_mechanisms=[mechanism]),
        )
        (received,) = server.wait_for(1)
    assert result.ok
    (session,) = server.sessions  # RFC 4954 §4: AUTH again after a failed exchange
    offers = [e for e in session.events if e.startswith(f"{mechanism} token offered")]
    assert len(offers) == 2
    assert received.authenticated == "me@example.com"


@pytest.mark.parametrize("kind", KINDS)
def test_a_dropped_idle_connection_is_replaced_with_a_current_token(kind: Kind) -> None:
    provider = Tokens("t1")
    with SMTPTestServer(
        oauth_tokens={"me@example.com": {"t1"}},
        allow_insecure_auth=True,
        # The server ends the pooled connection when the second message starts (421).
        faults=[Fault.shutdown("MAIL", match="<second@")],
    ) as server:

        def expire(index: int) -> None:
            server.revoke_token("t1")
            server.grant_token("me@example.com", "t2")
            provider.script = ["t2"]

        results = send_each(
            kind,
            [make_message(sender="first@example.com"), make_message(sender="second@example.com")],
            between=expire,
            **plain_args(server, password=provider.provider(kind), auth_mechanisms=["XOAUTH2"]),
        )
        received = server.wait_for(2)
    assert [r.ok for r in results] == [True, True]
    assert provider.calls == 2  # the fresh connection asked for a token again
    assert [m.authenticated for m in received] == ["me@example.com"] * 2
    assert len(server.sessions) == 2


def test_a_refused_retry_ends_the_session_with_quit() -> None:
    provider = Tokens("stale", "still-bad")
    with SMTPTestServer(
        oauth_tokens={"me@example.com": {"fresh"}}, allow_insecure_auth=True
    ) as server:
        with pytest.raises(AuthenticationError, match="status=401"):
            send_each(
                "sync",
                [make_message()],
                **plain_args(server, password=provider, auth_mechanisms=["XOAUTH2"]),
            )
        (session,) = server.sessions
        session.wait_closed()
    assert session.lines[-1] == b"QUIT"
    assert server.messages == []


def test_lmtp_takes_a_provider_too() -> None:
    provider = Tokens("t")
    with SMTPTestServer(
        lmtp=True, oauth_tokens={"me@example.com": {"t"}}, allow_insecure_auth=True
    ) as server:
        args = plain_args(server, password=provider, auth_mechanisms=["OAUTHBEARER"])
        with LMTPTransport(**args) as transport:
            assert transport.send(make_message()).ok
        (received,) = server.wait_for(1)
    assert received.authenticated == "me@example.com"
    assert provider.calls == 1


# -- naming the mechanism in a URL --------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("auth=xoauth2", ("XOAUTH2",)),
        ("auth=OAuthBearer", ("OAUTHBEARER",)),
        ("auth=oauthbearer,xoauth2", ("OAUTHBEARER", "XOAUTH2")),
        ("auth=scram-sha-256, plain", ("SCRAM-SHA-256", "PLAIN")),
        ("local_hostname=me.example.com", None),
    ],
)
def test_the_url_names_the_mechanisms(query: str, expected: tuple[str, ...] | None) -> None:
    for scheme in ("smtp", "smtps", "lmtp"):
        parsed = TransportURL.parse(f"{scheme}://u:p@mail.example.com?timeout=5&{query}")
        assert parsed.auth_mechanisms == expected


@pytest.mark.parametrize(
    "url",
    [
        "smtp://mail.example.com?auth=",
        "smtp://mail.example.com?auth=gssapi",
        "smtp://mail.example.com?auth=xoauth2,",
        "smtp://mail.example.com?auth=xoauth2&auth=plain",
        "mx://?auth=xoauth2",
        "memory://?auth=xoauth2",
    ],
)
def test_bad_auth_parameters(url: str) -> None:
    with pytest.raises(ConfigurationError, match="auth"):
        TransportURL.parse(url)


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_url_with_a_token_provider_override(asynchronous: bool) -> None:
    provider = Tokens("t")
    with SMTPTestServer(oauth_tokens={"me@example.com": {"t"}}, allow_insecure_auth=True) as server:
        url = f"smtp://me%40example.com@{server.host}:{server.port}?tls=none&auth=oauthbearer"
        if not asynchronous:
            with transport_from_url(url, password=provider, allow_insecure_auth=True) as sync:
                assert isinstance(sync, SMTPTransport)
                assert sync.settings.auth_mechanisms == ("OAUTHBEARER",)
                assert sync.send(make_message()).ok
        else:

            async def main() -> bool:
                transport = async_transport_from_url(
                    url, password=provider.coroutine, allow_insecure_auth=True
                )
                assert isinstance(transport, AsyncSMTPTransport)
                async with transport:
                    return (await transport.asend(make_message())).ok

            assert run(main())
        (received,) = server.wait_for(1)
    assert received.authenticated == "me@example.com"
    assert provider.calls == 1


# -- a tracker over a token provider --------------------------------------------------------------


def test_a_tracker_defers_while_the_provider_fails_and_delivers_after(
    tmp_path: Path, oauth_server: AiosmtpdServer
) -> None:
    provider = Tokens(OSError("identity provider down"))
    transport = SMTPTransport(
        **tls_args(oauth_server, password=provider, auth_mechanisms=["XOAUTH2"])
    )
    now = [dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)]
    store = SQLiteStore(tmp_path / "queue.sqlite")
    tracker = DeliveryTracker(transport, store, clock=lambda: now[0])
    try:
        tracking_id = tracker.submit(make_message(to=("bob@example.com",)))
        tracker.run_pending()
        (recipient,) = tracker.status(tracking_id).recipients
        assert recipient.state is State.DEFERRED  # a transient failure: not bounced
        provider.script = ["t1"]  # the identity provider is back
        now[0] += dt.timedelta(days=1)  # past any retry delay
        tracker.run_pending()
        (recipient,) = tracker.status(tracking_id).recipients
        assert recipient.state is State.DELIVERED
    finally:
        tracker.close()  # the store and the transport too
    assert len(oauth_server.messages) == 1
