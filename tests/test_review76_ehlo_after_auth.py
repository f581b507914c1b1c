"""Review 76: EHLO again after AUTH on a session whose last transaction was left open.

Without PIPELINING a message whose every RCPT was refused sends no DATA: its MAIL stays
open (RSET comes before the next MAIL). The EHLO again after AUTH for the next message
must not be written into that open transaction (the connection refuses EHLO there, and a
LocalProtocolError, not a DeliveryError, escaped ``deliver``)."""

from __future__ import annotations

import ssl
from typing import Any

import pytest

from mailrelay.envelope import Envelope, Notify, Recipient, Ret
from mailrelay.errors import AuthenticationError
from mailrelay.options import Timeouts
from mailrelay.results import Outcome
from mailrelay.transport import AsyncSMTPTransport, SMTPTransport
from tests.peers.aiosmtpd_server import AiosmtpdServer
from tests.test_flow import GO_AHEAD, OK, QUEUED, ehlo, lines, message
from tests.test_flow_ehlo_after_auth import BEFORE, authenticated, commands, plain, with_dsn
from tests.transport.helpers import FLAVOURS, Flavour, make_message, run

NO_PIPELINING = ehlo("8BITMIME", "AUTH PLAIN", "ENHANCEDSTATUSCODES")
WITH_DSN = ehlo("8BITMIME", "ENHANCEDSTATUSCODES", "DSN")
UNKNOWN = lines(550, "5.1.1 no such user")


def test_rset_before_the_ehlo_after_a_transaction_left_open() -> None:
    session, driver = authenticated(
        OK, UNKNOWN, OK, WITH_DSN, OK, OK, GO_AHEAD, QUEUED, before=NO_PIPELINING
    )
    refused = driver.run(session.deliver(message(), plain()))
    assert [r.outcome for r in refused.recipients] == [Outcome.PERMANENT]
    result = driver.run(session.deliver(message(), with_dsn()))
    assert result.ok
    assert commands(driver)[2:] == [
        b"MAIL FROM:<alice@example.org>",
        b"RCPT TO:<bob@example.net>",
        b"RSET",
        b"EHLO client.example.org",
        b"MAIL FROM:<alice@example.org> RET=HDRS ENVID=T1",
        b"RCPT TO:<bob@example.net> NOTIFY=SUCCESS",
        b"DATA",
    ]


def test_in_a_batch_too() -> None:
    session, driver = authenticated(
        OK, UNKNOWN, OK, WITH_DSN, OK, OK, GO_AHEAD, QUEUED, before=NO_PIPELINING
    )
    driver.run(session.deliver(message(), plain()))
    outcome = driver.run(session.deliver_many([(message(), with_dsn())]))
    assert outcome.error is None
    (result,) = outcome.results
    assert result is not None
    assert result.ok
    assert commands(driver)[4:6] == [b"RSET", b"EHLO client.example.org"]


USER, PASSWORD = "alice@mailrelay.test", "alicepw"


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_pooled_connection_after_a_refused_recipient(
    flavour: Flavour, aiosmtpd_server: AiosmtpdServer
) -> None:
    # aiosmtpd offers neither PIPELINING nor DSN: the first send leaves its MAIL open
    # (the only RCPT refused), the second asks for DSN on the same pooled connection.
    args: dict[str, Any] = {
        "host": aiosmtpd_server.host,
        "port": aiosmtpd_server.port,
        "ssl_context": ssl.create_default_context(cafile=str(aiosmtpd_server.ca_file)),
        "timeouts": Timeouts.all(10),
        "username": USER,
        "password": PASSWORD,
    }
    refused = Envelope("alice@mailrelay.test", ["reject@x.test"])
    dsn = Envelope(
        "alice@mailrelay.test",
        [Recipient("bob@mailrelay.test", notify=frozenset({Notify.SUCCESS}))],
        ret=Ret.HDRS,
    )
    msg = make_message(to=("bob@mailrelay.test",))
    if flavour == "sync":
        with SMTPTransport(**args) as transport:
            first = transport.send(msg, refused)
            second = transport.send(msg, dsn)
    else:

        async def main() -> tuple[Any, Any]:
            async with AsyncSMTPTransport(**args) as transport:
                return await transport.asend(msg, refused), await transport.asend(msg, dsn)

        first, second = run(main())
    assert [r.outcome for r in first.recipients] == [Outcome.PERMANENT]
    assert second.ok, second
    (received,) = aiosmtpd_server.messages
    assert received.rcpt_tos == ("bob@mailrelay.test",)


# -- AUTH again refused as a failed login ------------------------------------------------------

MAIL_NEEDS_AUTH = lines(530, "5.7.0 Authentication required")
BYE = lines(221, "2.0.0 bye")


@pytest.mark.parametrize(
    ("refusal", "transient"),
    [
        (lines(454, "4.7.0 Temporary authentication failure"), True),
        (lines(535, "5.7.8 Authentication credentials invalid"), False),
    ],
    ids=["454", "535"],
)
def test_auth_again_refused_as_a_failed_login_is_an_authentication_error(
    refusal: bytes, transient: bool
) -> None:
    # Not 503: the server took the second AUTH for a login, so it had forgotten the first
    # (RFC 4954 §4); MAIL would get 530 and the message would bounce (PERMANENT) for a
    # failed login. The session ends instead, with the AUTH refusal.
    session, driver = authenticated(BEFORE, refusal, BYE, OK, MAIL_NEEDS_AUTH)
    with pytest.raises(AuthenticationError) as caught:
        driver.run(session.deliver(message(), with_dsn()))
    assert caught.value.is_transient is transient
    assert caught.value.reply is not None
    assert caught.value.reply.code in {454, 535}
    assert session.closed
    assert not any(c.startswith(b"MAIL") for c in commands(driver))
    assert commands(driver)[-1] == b"QUIT"


def test_in_a_batch_it_ends_the_batch_with_nothing_sent() -> None:
    refusal = lines(454, "4.7.0 Temporary authentication failure")
    session, driver = authenticated(BEFORE, refusal, BYE, OK, MAIL_NEEDS_AUTH)
    outcome = driver.run(session.deliver_many([(message(), with_dsn()), (message(), plain())]))
    assert isinstance(outcome.error, AuthenticationError)
    assert outcome.results == (None, None)
    assert not any(c.startswith(b"MAIL") for c in commands(driver))


def test_503_still_means_the_login_stands() -> None:
    already = lines(503, "5.5.1 Already authenticated")
    session, driver = authenticated(BEFORE, already, OK, OK, GO_AHEAD, QUEUED)
    assert driver.run(session.deliver(message(), with_dsn())).ok
