"""Review of this session's transport changes: token providers' bad answers on renewal.

What must hold: an unusable secret from a provider (on a new connection or on renewal
after a refusal) is an :class:`AuthenticationError` that names the server and, on renewal,
tells the refusal that led to it, never the secret itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from mailrelay.errors import AuthenticationError, SessionRefused
from mailrelay.message import Message
from mailrelay.options import TLS, Timeouts
from mailrelay.reply import Reply
from mailrelay.results import Outcome
from mailrelay.testing.server import Fault, SMTPTestServer
from mailrelay.transport import AsyncSMTPTransport
from mailrelay.transport.driver_common import check_source_address
from mailrelay.transport.settings import ConnectionSettings
from tests.transport.helpers import FLAVOURS, Flavour, send_many_with, send_with
from tests.transport.test_recipient_limits import LimitsHandler, serving

T = TypeVar("T")

REFUSAL = AuthenticationError(
    "the server refused authentication: 535 5.7.8 expired",
    reply=Reply(code=535, lines=("5.7.8 expired",), enhanced=None),
    host="smtp.example.net:587",
)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def settings_returning(value: object) -> ConnectionSettings:
    def provider() -> str:
        return value  # type: ignore[return-value]  # a provider that breaks its promise

    return ConnectionSettings(
        host="smtp.example.net",
        port=587,
        tls=TLS.STARTTLS,
        timeouts=Timeouts.all(5),
        username="alice",
        password=provider,
    )


BAD = ["tok\r\nen", "tok\nMAIL FROM:<x>", "", "tok\0", 42, None]


@pytest.mark.parametrize("value", BAD)
def test_a_bad_secret_names_the_server(value: object) -> None:
    settings = settings_returning(value)
    with pytest.raises(AuthenticationError) as info:
        settings.secret()
    assert info.value.host == settings.peer
    assert not info.value.is_transient
    with pytest.raises(AuthenticationError) as info:
        run(settings.asecret())
    assert info.value.host == settings.peer


@pytest.mark.parametrize("value", BAD)
def test_a_bad_renewed_secret_tells_the_refusal(value: object) -> None:
    settings = settings_returning(value)
    for renewing in (settings.renew, lambda r: run(settings.arenew(r))):
        with pytest.raises(AuthenticationError) as info:
            renewing(REFUSAL)
        assert info.value.host == settings.peer
        assert "535" in str(info.value)
        assert info.value.reply == REFUSAL.reply
        if isinstance(value, str) and value:
            assert value not in str(info.value)


# -- source_address -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("::ffff:127.0.0.2", "127.0.0.2"),  # an IPv4 address written as IPv6 is IPv4
        ("::FFFF:7f00:2", "127.0.0.2"),
        ("::1", "::1"),
        ("fe80::1%eth0", "fe80::1%eth0"),  # a scope stays: a link-local address needs it
    ],
)
def test_a_source_address_is_kept_in_the_family_it_binds_in(given: str, kept: str) -> None:
    assert check_source_address(given) == kept


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_an_ipv4_mapped_source_reaches_an_ipv4_server(flavour: Flavour) -> None:
    with SMTPTestServer() as server:
        result = send_with(
            flavour,
            Message.build(sender="a@example.org", to=["b@example.net"], subject="s", text="Hi.\n"),
            host=server.host,
            port=server.port,
            tls=TLS.NONE,
            timeouts=Timeouts.all(10),
            source_address="::ffff:127.0.0.2",
        )
        (received,) = server.wait_for(1)
    assert result.ok, result
    assert received.peer[0] == "127.0.0.2"


# -- a token renewal cut short ------------------------------------------------------------------


def test_a_renewal_cancelled_meanwhile_closes_the_connection() -> None:
    # The server refuses the first token; while the provider fetches a fresh one the
    # caller gives up (a timeout cancels the send). The connection must not be left open.
    calls = 0
    forever = asyncio.Event()

    async def provider() -> str:
        nonlocal calls
        calls += 1
        if calls > 1:
            await forever.wait()  # a token endpoint that never answers
        return "stale"

    with SMTPTestServer(
        oauth_tokens={"me@example.com": {"fresh"}}, allow_insecure_auth=True
    ) as server:

        async def main() -> None:
            transport = AsyncSMTPTransport(
                server.host,
                server.port,
                tls=TLS.NONE,
                allow_insecure_auth=True,
                timeouts=Timeouts.all(5),
                username="me@example.com",
                password=provider,
                auth_mechanisms=["XOAUTH2"],
            )
            message = Message.build(
                sender="a@example.org", to=["b@example.net"], subject="s", text="Hi.\n"
            )
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(transport.asend(message), 1.0)
            await transport.aclose()

        run(main())
        (session,) = server.sessions
        session.wait_closed(timeout=5.0)
        assert session.closed
    assert calls == 2
    assert server.messages == []


# -- a batch with LIMITS through the pool ----------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_hang_up_in_a_split_message_sends_no_later_message_twice(flavour: Flavour) -> None:
    # The first message needs two transactions (RCPTMAX=2); the server hangs up (421)
    # at its first MAIL. The second message must reach the server once, on the fresh
    # connection, however the batch was ordered on the first.
    with SMTPTestServer(
        max_recipients=2,
        announce_limits=True,
        faults=[Fault.shutdown("MAIL", match="<over@")],
    ) as server:
        split = Message.build(
            sender="over@example.org",
            to=[f"r{i}@example.net" for i in range(3)],
            subject="split",
            text="Hi.\n",
        )
        single = Message.build(
            sender="within@example.org", to=["s@example.net"], subject="single", text="Hi.\n"
        )
        results = send_many_with(
            flavour,
            [split, single],
            host=server.host,
            port=server.port,
            tls=TLS.NONE,
            timeouts=Timeouts.all(10),
        )
        received = server.wait_for(1)
    assert [r.ok for r in results] == [False, True]
    assert isinstance(results[0].error, SessionRefused)
    assert [m.mail_from for m in received] == ["within@example.org"]


# -- MAILMAX and messages sent in several transactions -------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_split_message_never_goes_over_mailmax(flavour: Flavour) -> None:
    # RCPTMAX=2, MAILMAX=2: a message to five recipients needs three transactions, one
    # more than a connection may carry. The third is not attempted on it (the server
    # would 421 it): that recipient goes on another connection (session 10: it came back
    # TRANSIENT before), as does the next message, and the server never sees a MAIL over
    # its limit.
    handler = LimitsHandler(rcpt_max=2, mail_max=2)
    to = [f"r{i}@example.net" for i in range(5)]
    split = Message.build(sender="a@example.org", to=to, subject="split", text="Hi.\n")
    single = Message.build(sender="a@example.org", to=["s@example.net"], subject="1", text=".\n")
    with serving(handler) as port:
        results = send_many_with(
            flavour,
            [split, single],
            host="127.0.0.1",
            port=port,
            tls=TLS.NONE,
            timeouts=Timeouts.all(10),
        )
    first, second = results
    assert [r.outcome for r in first.recipients] == [Outcome.ACCEPTED] * 5
    assert second.ok
    assert sorted(r for m in handler.messages for r in m.rcpt_tos) == sorted([*to, "s@example.net"])
    assert handler.over == 0
    assert max(handler.per_session.values()) == 2
