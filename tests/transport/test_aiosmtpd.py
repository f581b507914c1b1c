"""SMTP and LMTP transports, both drivers, against aiosmtpd (a second real server)."""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest

from mailrelay.envelope import Envelope, Notify, Recipient, Ret
from mailrelay.errors import AuthenticationError, ConnectError
from mailrelay.message import Message
from mailrelay.options import TLS, Timeouts
from mailrelay.results import Outcome
from mailrelay.transport import AsyncSMTPTransport, PoolSettings, SMTPTransport
from mailrelay.transport.base import BatchItem
from tests.peers.aiosmtpd_server import AiosmtpdServer
from tests.transport.helpers import (
    FLAVOURS,
    Flavour,
    make_message,
    run,
    send_many_with,
    send_with,
)

USER, PASSWORD = "alice@mailrelay.test", "alicepw"


def tls_args(server: AiosmtpdServer, **extra: Any) -> dict[str, Any]:
    """STARTTLS (required) to ``server``, trusting the test CA."""
    import ssl

    return {
        "host": server.host,
        "port": server.port,
        "ssl_context": ssl.create_default_context(cafile=str(server.ca_file)),
        "timeouts": Timeouts.all(10),
        **extra,
    }


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_starttls_then_auth(
    flavour: Flavour, mechanism: str, aiosmtpd_server: AiosmtpdServer
) -> None:
    message = make_message(to=("bob@mailrelay.test",), text="a line\n.a dot-started line\n")
    result = send_with(
        flavour,
        message,
        **tls_args(aiosmtpd_server, username=USER, password=PASSWORD, auth_mechanisms=[mechanism]),
    )
    assert result.ok
    (received,) = aiosmtpd_server.messages
    assert received.tls
    assert received.auth_login == USER
    assert received.content == message.as_bytes()
    assert received.mail_from == "alice@example.com"
    assert received.rcpt_tos == ("bob@mailrelay.test",)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_implicit_tls(flavour: Flavour, aiosmtpd_smtps: AiosmtpdServer) -> None:
    result = send_with(
        flavour,
        make_message(to=("bob@mailrelay.test",)),
        **tls_args(aiosmtpd_smtps, tls=TLS.IMPLICIT, username=USER, password=PASSWORD),
    )
    assert result.ok
    assert aiosmtpd_smtps.messages[0].tls


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_per_recipient_outcomes_in_one_transaction(
    flavour: Flavour, aiosmtpd_server: AiosmtpdServer
) -> None:
    message = make_message(to=("bob@mailrelay.test", "tempfail@mailrelay.test", "reject@x.test"))
    result = send_with(flavour, message, **tls_args(aiosmtpd_server))
    assert [r.outcome for r in result.recipients] == [
        Outcome.ACCEPTED,
        Outcome.TRANSIENT,
        Outcome.PERMANENT,
    ]
    assert [r.reply.code if r.reply else None for r in result.recipients] == [250, 450, 550]
    assert aiosmtpd_server.messages[0].rcpt_tos == ("bob@mailrelay.test",)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_smtputf8_and_8bitmime(flavour: Flavour, aiosmtpd_server: AiosmtpdServer) -> None:
    message = Message.build(
        sender="jörg@mailrelay.test",
        to=["björn@mailrelay.test"],
        subject="Grüße",
        text="Schöne Grüße!\n",
    )
    result = send_with(flavour, message, **tls_args(aiosmtpd_server))
    assert result.ok
    (received,) = aiosmtpd_server.messages
    assert received.smtputf8
    assert received.mail_from == "jörg@mailrelay.test"
    assert received.rcpt_tos == ("björn@mailrelay.test",)
    assert received.content == message.as_bytes()
    assert "SMTPUTF8" in received.mail_options


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_wrong_password_is_a_permanent_authentication_error(
    flavour: Flavour, aiosmtpd_server: AiosmtpdServer
) -> None:
    with pytest.raises(AuthenticationError) as caught:
        send_with(
            flavour,
            make_message(),
            **tls_args(aiosmtpd_server, username=USER, password="wrong"),
        )
    assert not caught.value.is_transient
    assert aiosmtpd_server.messages == []


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_no_auth_over_plain_text_unless_allowed(
    flavour: Flavour, aiosmtpd_server: AiosmtpdServer
) -> None:
    args = tls_args(aiosmtpd_server, tls=TLS.NONE, username=USER, password=PASSWORD)
    with pytest.raises(AuthenticationError, match="unencrypted"):
        send_with(flavour, make_message(to=("bob@mailrelay.test",)), **args)
    result = send_with(
        flavour, make_message(to=("bob@mailrelay.test",)), allow_insecure_auth=True, **args
    )
    assert result.ok
    assert not aiosmtpd_server.messages[0].tls
    assert aiosmtpd_server.messages[0].auth_login == USER


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_credentials_never_reach_the_log(
    flavour: Flavour,
    mechanism: str,
    aiosmtpd_server: AiosmtpdServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    result = send_with(
        flavour,
        make_message(to=("bob@mailrelay.test",)),
        **tls_args(aiosmtpd_server, username=USER, password=PASSWORD, auth_mechanisms=[mechanism]),
    )
    assert result.ok
    text = caplog.text
    assert ">>> EHLO" in text  # the wire trace is on: the test is looking at something
    secrets = [
        PASSWORD,
        base64.b64encode(PASSWORD.encode()).decode(),
        base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode(),
        base64.b64encode(USER.encode()).decode(),
    ]
    for secret in secrets:
        assert secret not in text


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
def test_lmtp_per_recipient_final_replies(
    flavour: Flavour,
    unix: bool,
    aiosmtpd_lmtp: AiosmtpdServer,
    aiosmtpd_lmtp_unix: AiosmtpdServer,
) -> None:
    server = aiosmtpd_lmtp_unix if unix else aiosmtpd_lmtp
    where: dict[str, Any] = (
        {"path": str(server.unix_socket)} if unix else {"host": server.host, "port": server.port}
    )
    envelope = Envelope(
        "alice@example.com",
        ["bob@mailrelay.test", "fail@mailrelay.test", "later@mailrelay.test", "reject@x.test"],
    )
    result = send_with(
        flavour, make_message(), envelope, lmtp=True, timeouts=Timeouts.all(10), **where
    )
    assert [r.outcome for r in result.recipients] == [
        Outcome.ACCEPTED,
        Outcome.PERMANENT,
        Outcome.TRANSIENT,
        Outcome.PERMANENT,
    ]
    assert [r.reply.code if r.reply else None for r in result.recipients] == [250, 550, 452, 550]
    assert server.messages[0].protocol == "LMTP"


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_send_many_reuses_connections_and_keeps_order(
    flavour: Flavour, aiosmtpd_server: AiosmtpdServer
) -> None:
    messages = [make_message(to=("bob@mailrelay.test",), subject=f"n{n}") for n in range(12)]
    results = send_many_with(
        flavour, list(messages), pool=PoolSettings(size=3), **tls_args(aiosmtpd_server)
    )
    assert [r.message_id for r in results] == [m.message_id for m in messages]
    assert all(r.ok for r in results)
    received = sorted(m.content for m in aiosmtpd_server.messages)
    assert received == sorted(m.as_bytes() for m in messages)


def test_the_sync_pool_is_thread_safe(aiosmtpd_server: AiosmtpdServer) -> None:
    errors: list[BaseException] = []
    with SMTPTransport(pool=PoolSettings(size=2), **tls_args(aiosmtpd_server)) as transport:

        def worker(n: int) -> None:
            try:
                for k in range(5):
                    message = make_message(to=("bob@mailrelay.test",), subject=f"{n}-{k}")
                    assert transport.send(message).ok
            except BaseException as exc:  # reported below, not lost in the thread
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert errors == []
    assert len(aiosmtpd_server.messages) == 20


def test_concurrent_async_sends_share_the_pool(aiosmtpd_server: AiosmtpdServer) -> None:
    transport = AsyncSMTPTransport(pool=PoolSettings(size=2), **tls_args(aiosmtpd_server))

    async def main() -> list[bool]:
        async with transport:
            results = await asyncio.gather(
                *(
                    transport.asend(make_message(to=("bob@mailrelay.test",), subject=str(n)))
                    for n in range(8)
                )
            )
        return [r.ok for r in results]

    assert run(main()) == [True] * 8
    assert len(aiosmtpd_server.messages) == 8


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_every_address_of_the_host_is_tried(
    flavour: Flavour, aiosmtpd_server: AiosmtpdServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = socket.getaddrinfo
    port = aiosmtpd_server.port

    def two_addresses(host: str, *args: Any, **kwargs: Any) -> list[Any]:
        if host != "dual.mailrelay.test":
            return real(host, *args, **kwargs)
        # ::1 first (nothing listens there on this port), then 127.0.0.1 (aiosmtpd).
        return [
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", two_addresses)
    args = tls_args(aiosmtpd_server, host="dual.mailrelay.test", server_hostname="localhost")
    assert send_with(flavour, make_message(to=("bob@mailrelay.test",)), **args).ok

    # And when no address answers, the error names each one.
    aiosmtpd_server.stop()
    with pytest.raises(ConnectError, match=r"\[::1\]:\d+: .*; 127\.0\.0\.1:\d+: "):
        send_with(flavour, make_message(to=("bob@mailrelay.test",)), **args)


def test_asend_many_streams_over_the_pool(aiosmtpd_server: AiosmtpdServer) -> None:
    built: list[str | None] = []

    async def items() -> AsyncIterator[Message]:
        for n in range(9):
            message = make_message(to=("bob@mailrelay.test",), subject=f"s{n}")
            built.append(message.message_id)
            yield message

    async def main() -> list[str | None]:
        transport = AsyncSMTPTransport(pool=PoolSettings(size=3), **tls_args(aiosmtpd_server))
        async with transport:
            assert await transport.asend_many([]) == []
            results = await transport.asend_many(items())
        assert all(r.ok for r in results)
        return [r.message_id for r in results]

    ids = run(main())
    assert ids == built  # results in item order, though three connections sent them
    sent = {
        m.content.split(b"Message-ID: <")[1].split(b">")[0].decode()
        for m in aiosmtpd_server.messages
    }
    assert sent == set(built)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_lmtp_send_many_pipelined_keeps_each_message_final_replies(
    flavour: Flavour, aiosmtpd_lmtp: AiosmtpdServer
) -> None:
    # aiosmtpd announces no PIPELINING, so the batch goes one command at a time over one
    # connection; LMTP's per-recipient final replies (RFC 2033 §4.2) must still land on the
    # right message. (The pipelined LMTP batch is covered against a model in test_flow.)
    mixed = Envelope("alice@example.com", ["bob@mailrelay.test", "later@mailrelay.test"])
    plain = Envelope("alice@example.com", ["bob@mailrelay.test"])
    items: list[BatchItem] = [
        (make_message(subject=f"n{n}"), mixed if n % 2 else plain) for n in range(6)
    ]
    results = send_many_with(
        flavour,
        items,
        lmtp=True,
        host=aiosmtpd_lmtp.host,
        port=aiosmtpd_lmtp.port,
        timeouts=Timeouts.all(10),
        pool=PoolSettings(size=1),
    )
    for n, result in enumerate(results):
        expected = [Outcome.ACCEPTED, Outcome.TRANSIENT] if n % 2 else [Outcome.ACCEPTED]
        assert [r.outcome for r in result.recipients] == expected


def asking_for_dsn() -> Envelope:
    """An envelope to bob whose recipient asks for a success DSN, with RET."""
    notify = frozenset({Notify.SUCCESS})
    return Envelope(
        "alice@mailrelay.test", [Recipient("bob@mailrelay.test", notify=notify)], ret=Ret.HDRS
    )


def sent_verbs(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The verb of every command the wire trace (``mailrelay.flow`` at DEBUG) shows sent."""
    return [r.getMessage().split()[1] for r in caplog.records if r.getMessage().startswith(">>> ")]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_dsn_asked_for_after_auth_with_a_server_that_never_offers_it(
    flavour: Flavour, aiosmtpd_server: AiosmtpdServer, caplog: pytest.LogCaptureFixture
) -> None:
    # aiosmtpd offers no DSN. A message asking for DSNs after AUTH brings EHLO once more; the
    # reply is the same as before login, so AUTH again asks whether the login stood (aiosmtpd
    # answers 503 when it did). Either way the message goes, without DSN parameters, on a
    # session that is still logged in.
    caplog.set_level(logging.DEBUG, logger="mailrelay")
    envelope = asking_for_dsn()
    result = send_with(
        flavour,
        make_message(to=("bob@mailrelay.test",)),
        envelope,
        **tls_args(aiosmtpd_server, username=USER, password=PASSWORD),
    )
    assert result.ok, result
    (received,) = aiosmtpd_server.messages
    assert received.auth_login == USER
    assert not any(o.startswith("RET=") for o in received.mail_options)
    verbs = sent_verbs(caplog)
    assert verbs[:6] == ["EHLO", "STARTTLS", "EHLO", "AUTH", "EHLO", "AUTH"]
    outcome = [
        r.getMessage()
        for r in caplog.records
        if "the login stands" in r.getMessage() or "forgot the login" in r.getMessage()
    ]
    assert len(outcome) == 1
    assert PASSWORD not in caplog.text


def _send_twice(flavour: Flavour, items: list[BatchItem], **kwargs: Any) -> list[bool]:
    """``send`` each item in turn on one transport whose connections carry one message each
    (so each message has a session of its own, and the sessions share the transport)."""
    pool = PoolSettings(size=1, max_messages=1)
    if flavour == "sync":
        with SMTPTransport(pool=pool, **kwargs) as transport:
            return [transport.send(*item).ok for item in items]  # type: ignore[misc]

    async def main() -> list[bool]:
        async with AsyncSMTPTransport(pool=pool, **kwargs) as transport:
            return [(await transport.asend(*item)).ok for item in items]  # type: ignore[misc]

    return asyncio.run(main())


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_later_session_spares_an_ehlo_after_auth_that_brought_nothing(
    flavour: Flavour, aiosmtpd_server: AiosmtpdServer, caplog: pytest.LogCaptureFixture
) -> None:
    # The first session learns that aiosmtpd's EHLO after AUTH changes nothing (and that it
    # kept the login); the transport's next session, on a new connection, asks neither.
    caplog.set_level(logging.DEBUG, logger="mailrelay")
    envelope = asking_for_dsn()
    items: list[BatchItem] = [
        (make_message(to=("bob@mailrelay.test",), subject=f"n{n}"), envelope) for n in range(2)
    ]
    oks = _send_twice(flavour, items, **tls_args(aiosmtpd_server, username=USER, password=PASSWORD))
    assert oks == [True, True]
    assert len(aiosmtpd_server.messages) == 2
    verbs = sent_verbs(caplog)
    sessions = " ".join(verbs).split("QUIT")
    assert sessions[0].split()[:6] == ["EHLO", "STARTTLS", "EHLO", "AUTH", "EHLO", "AUTH"]
    assert sessions[1].split()[:5] == ["EHLO", "STARTTLS", "EHLO", "AUTH", "MAIL"]
