"""``DeliveryResult.error``: a batch keeps the exception that ended a message's attempt, so
that code can tell a configuration or authentication problem from a refused recipient
without reading the ``reason`` text."""

from __future__ import annotations

import pytest

from mailrelay.errors import AuthenticationError, ConnectError
from mailrelay.message import Message
from mailrelay.options import TLS, Timeouts
from mailrelay.results import DeliveryResult, Outcome
from mailrelay.testing.server import SMTPTestServer
from mailrelay.transport import AsyncSMTPTransport, SMTPTransport
from tests.peers.scripted import free_port
from tests.transport.helpers import FLAVOURS, Flavour, run, send_many_with

USERS = {"alice@example.com": "alicepw"}


def messages(count: int = 3) -> list[Message]:
    return [
        Message.build(sender="alice@example.com", to=[f"r{n}@example.net"], text=f"{n}\n")
        for n in range(count)
    ]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_wrong_password_is_kept_as_the_error(flavour: Flavour) -> None:
    with SMTPTestServer(auth=USERS, allow_insecure_auth=True) as server:
        results = send_many_with(
            flavour,
            list(messages()),
            host=server.host,
            port=server.port,
            tls=TLS.NONE,
            allow_insecure_auth=True,
            username="alice@example.com",
            password="wrong",
            auth_mechanisms=["PLAIN"],
            timeouts=Timeouts.all(10),
        )
        assert server.messages == []
    assert len(results) == 3
    for result in results:
        assert isinstance(result.error, AuthenticationError)
        assert not result.error.is_transient
        assert [r.outcome for r in result.recipients] == [Outcome.PERMANENT]
        assert result.recipients[0].reason is not None
        assert "AuthenticationError" in result.recipients[0].reason
        # The server's reply is kept, with its own status: none is added beside it.
        assert result.recipients[0].reply is not None
        assert result.recipients[0].enhanced is None


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_server_that_is_not_there_is_kept_as_the_error(flavour: Flavour) -> None:
    results = send_many_with(
        flavour,
        list(messages(2)),
        host="127.0.0.1",
        port=free_port(),
        tls=TLS.NONE,
        timeouts=Timeouts.all(5),
    )
    for result in results:
        assert isinstance(result.error, ConnectError)
        assert result.error.is_transient
        assert [r.outcome for r in result.recipients] == [Outcome.TRANSIENT]
        # No reply to take a status from: RFC 3463's 4.4.1, no answer from host.
        assert [str(r.enhanced) for r in result.recipients] == ["4.4.1"]


def test_answers_from_the_server_carry_no_error() -> None:
    with SMTPTestServer(rcpt=lambda address, params: (550, "5.1.1 no such user")) as server:
        with SMTPTransport(server.host, server.port, tls=TLS.NONE) as transport:
            sent = transport.send_many(messages(2))

        async def main() -> list[DeliveryResult]:
            async with AsyncSMTPTransport(server.host, server.port, tls=TLS.NONE) as transport:
                return await transport.asend_many(messages(2))

        asent = run(main())
    for result in [*sent, *asent]:
        assert result.error is None
        assert [r.outcome for r in result.recipients] == [Outcome.PERMANENT]


def test_the_error_is_not_part_of_equality() -> None:
    (result,) = [DeliveryResult(recipients=(), message_id="<m@x>")]
    with_error = DeliveryResult(
        recipients=(), message_id="<m@x>", error=ConnectError("refused", host="h:25")
    )
    assert result == with_error
    assert result.error is None
