"""SMTP transports, both drivers, against a real Postfix: every branch of the dialogue."""

from __future__ import annotations

import base64
import logging
import ssl
import time
import uuid
from typing import Any

import pytest

from mailrelay.envelope import Envelope, Recipient, Ret
from mailrelay.errors import TLSError
from mailrelay.message import Message
from mailrelay.options import TLS, Timeouts
from mailrelay.results import Outcome
from mailrelay.transport import PoolSettings
from tests.peers.postfix import IDLE_TIMEOUT, PostfixInstance
from tests.transport.helpers import FLAVOURS, Flavour, send_many_with, send_with

pytestmark = [pytest.mark.postfix, pytest.mark.parametrize("flavour", FLAVOURS)]

ALICE = "alice@mailrelay.test"


def args(postfix: PostfixInstance, port: int, **extra: Any) -> dict[str, Any]:
    """Transport arguments for one of Postfix's ports, trusting the test CA."""
    return {
        "host": postfix.host,
        "port": port,
        "ssl_context": ssl.create_default_context(cafile=str(postfix.ca_file)),
        "timeouts": Timeouts.all(15),
        **extra,
    }


def unique_message(**kwargs: Any) -> Message:
    """A message to alice with a subject no other test uses."""
    fields: dict[str, Any] = {
        "sender": "carol@mailrelay.test",
        "to": [ALICE],
        "subject": f"test {uuid.uuid4().hex}",
        "text": "Hello Alice,\n.a line starting with a dot\n\nBye.\n",
    }
    fields.update(kwargs)
    return Message.build(**fields)


def delivered(postfix: PostfixInstance, message: Message, user: str = "alice") -> bytes:
    """The delivered copy of ``message`` (found by its Message-ID), waiting for it."""
    marker = f"<{message.message_id}>".encode()
    deadline = time.monotonic() + 15
    while True:
        found = [m for m in postfix.read_maildir(user) if marker in m]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert found, f"{message.message_id} not delivered; log:\n{postfix.log_tail()}"
    return found[0]


def assert_intact(copy: bytes, message: Message) -> None:
    """Postfix prepends trace headers and stores LF line ends; the rest must be ours."""
    assert copy.endswith(message.as_bytes().replace(b"\r\n", b"\n"))


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256", None])
def test_submission_starttls_then_auth(
    flavour: Flavour,
    mechanism: str | None,
    postfix_clean: PostfixInstance,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    message = unique_message()
    result = send_with(
        flavour,
        message,
        **args(
            postfix_clean,
            postfix_clean.submission_port,
            username=ALICE,
            password="alicepw",
            auth_mechanisms=None if mechanism is None else [mechanism],
        ),
    )
    assert result.ok, result
    copy = delivered(postfix_clean, message)
    assert_intact(copy, message)
    assert b"with ESMTPSA" in copy  # TLS and authenticated (RFC 3848)
    # Credentials never reach the log, even at DEBUG with the wire trace on.
    assert ">>> AUTH" in caplog.text
    for secret in ("alicepw", base64.b64encode(b"alicepw").decode(), "AGFsaWNl"):
        assert secret not in caplog.text


def test_implicit_tls(flavour: Flavour, postfix_clean: PostfixInstance) -> None:
    message = unique_message()
    result = send_with(
        flavour,
        message,
        **args(
            postfix_clean,
            postfix_clean.smtps_port,
            tls=TLS.IMPLICIT,
            username=ALICE,
            password="alicepw",
        ),
    )
    assert result.ok
    assert b"with ESMTPSA" in delivered(postfix_clean, message)


@pytest.mark.parametrize(
    ("port_name", "policy", "marker"),
    [
        ("smtp_port", TLS.OPPORTUNISTIC, b"with ESMTPS "),
        ("plain_port", TLS.OPPORTUNISTIC, b"with ESMTP "),
        ("smtp_port", TLS.NONE, b"with ESMTP "),
        ("smtp_port", TLS.STARTTLS, b"with ESMTPS "),
    ],
)
def test_tls_policies(
    flavour: Flavour,
    port_name: str,
    policy: TLS,
    marker: bytes,
    postfix_clean: PostfixInstance,
) -> None:
    message = unique_message()
    port = getattr(postfix_clean, port_name)
    assert send_with(flavour, message, **args(postfix_clean, port, tls=policy)).ok
    assert marker in delivered(postfix_clean, message)


def test_starttls_required_against_a_server_without_it(
    flavour: Flavour, postfix: PostfixInstance
) -> None:
    with pytest.raises(TLSError, match="does not offer STARTTLS") as caught:
        send_with(flavour, unique_message(), **args(postfix, postfix.plain_port))
    assert not caught.value.is_transient


def test_ipv6(flavour: Flavour, postfix_clean: PostfixInstance) -> None:
    message = unique_message()
    result = send_with(
        flavour,
        message,
        **args(postfix_clean, postfix_clean.smtp_port, host=postfix_clean.host6),
    )
    assert result.ok
    assert result.host == f"[::1]:{postfix_clean.smtp_port}"
    copy = delivered(postfix_clean, message)
    assert b"[IPv6:::1]" in copy, copy[:400]


def test_helo_fallback(flavour: Flavour, postfix_clean: PostfixInstance) -> None:
    message = unique_message()
    result = send_with(
        flavour, message, **args(postfix_clean, postfix_clean.helo_only_port, tls=TLS.NONE)
    )
    assert result.ok
    assert b"with SMTP " in delivered(postfix_clean, message)  # HELO, not EHLO


@pytest.mark.parametrize("port_name", ["smtp_port", "no_pipelining_port"])
def test_with_and_without_pipelining(
    flavour: Flavour, port_name: str, postfix_clean: PostfixInstance
) -> None:
    messages = [unique_message() for _ in range(3)]
    port = getattr(postfix_clean, port_name)
    results = send_many_with(flavour, list(messages), **args(postfix_clean, port))
    assert all(r.ok for r in results)
    for message in messages:
        assert_intact(delivered(postfix_clean, message), message)


def test_chunking(flavour: Flavour, postfix_clean: PostfixInstance) -> None:
    message = unique_message(text="many lines\n" * 20_000)  # several chunks
    result = send_with(
        flavour, message, **args(postfix_clean, postfix_clean.smtp_port, chunking=True)
    )
    assert result.ok
    assert_intact(delivered(postfix_clean, message), message)
    assert "BDAT " in postfix_clean.log_text()


def test_per_recipient_outcomes_in_one_transaction(
    flavour: Flavour, postfix_clean: PostfixInstance
) -> None:
    message = unique_message()
    envelope = Envelope(
        "carol@mailrelay.test",
        [
            ALICE,
            "someone@tempfail.mailrelay.test",
            "someone@reject.mailrelay.test",
            "nobody@mailrelay.test",
        ],
    )
    result = send_with(flavour, message, envelope, **args(postfix_clean, postfix_clean.smtp_port))
    assert [r.outcome for r in result.recipients] == [
        Outcome.ACCEPTED,
        Outcome.TRANSIENT,
        Outcome.PERMANENT,
        Outcome.PERMANENT,
    ]
    replies = [r.reply for r in result.recipients]
    assert [str(r.enhanced) if r and r.enhanced else None for r in replies] == [
        "2.0.0",
        "4.7.1",
        "5.7.1",
        "5.1.1",
    ]
    delivered(postfix_clean, message)


def test_dsn_parameters_reach_postfix(flavour: Flavour, postfix_clean: PostfixInstance) -> None:
    envid = uuid.uuid4().hex
    envelope = Envelope(
        "carol@mailrelay.test",
        [Recipient(ALICE, notify="SUCCESS,FAILURE", orcpt="alias@mailrelay.test")],
        ret=Ret.HDRS,
        envid=envid,
    )
    message = unique_message()
    assert send_with(flavour, message, envelope, **args(postfix_clean, postfix_clean.smtp_port)).ok
    log = postfix_clean.wait_for_log(f"ENVID={envid}")
    (mail_line,) = [line for line in log.splitlines() if f"ENVID={envid}" in line]
    assert "RET=HDRS" in mail_line
    assert "NOTIFY=SUCCESS,FAILURE" in log
    assert "ORCPT=rfc822;alias@mailrelay.test" in log


def test_smtputf8_and_8bitmime(flavour: Flavour, postfix_clean: PostfixInstance) -> None:
    message = unique_message(sender="jörg@mailrelay.test", text="Schöne Grüße!\n")
    assert message.needs_smtputf8
    assert message.needs_8bitmime
    assert send_with(flavour, message, **args(postfix_clean, postfix_clean.smtp_port)).ok
    copy = delivered(postfix_clean, message)
    assert_intact(copy, message)
    assert "jörg@mailrelay.test" in copy.decode("utf-8")
    log = postfix_clean.log_text()
    assert "SMTPUTF8" in log
    assert "BODY=8BITMIME" in log


def test_size_refusal_before_sending(flavour: Flavour, postfix: PostfixInstance) -> None:
    line = "0123456789" * 7 + "\n"
    big = unique_message(text=line * (postfix.message_size_limit // len(line) + 100))
    assert big.size > postfix.message_size_limit
    result = send_with(flavour, big, **args(postfix, postfix.smtp_port))
    assert [r.outcome for r in result.recipients] == [Outcome.PERMANENT]
    reason = result.recipients[0].reason
    assert reason is not None
    assert "SIZE" in reason
    assert f"SIZE={big.size}" not in postfix.log_text()  # nothing was sent


@pytest.mark.parametrize("check", ["noop", "resend"])
def test_pool_reconnects_after_the_server_dropped_an_idle_connection(
    flavour: Flavour, check: str, postfix_clean: PostfixInstance, caplog: pytest.LogCaptureFixture
) -> None:
    """Postfix closes an idle client after IDLE_TIMEOUT seconds with 421; the next message
    must go out on a fresh connection, and nothing more on the dead one."""
    pool = PoolSettings(size=1, health_check_after=0.5 if check == "noop" else 3600)
    first, second = unique_message(), unique_message()
    kwargs = args(postfix_clean, postfix_clean.idle_timeout_port, pool=pool)
    marker = "timeout after END-OF-MESSAGE"

    def wait_for_the_drop(before: int) -> None:
        # Bounded polling of the server's log: no fixed sleep, no timed assertion.
        deadline = time.monotonic() + IDLE_TIMEOUT + 15
        while postfix_clean.log_text().count(marker) <= before:
            assert time.monotonic() < deadline, postfix_clean.log_tail()
            time.sleep(0.05)

    caplog.set_level(logging.DEBUG, logger="mailrelay.transport")
    before = postfix_clean.log_text().count(marker)
    if flavour == "sync":
        from mailrelay.transport import SMTPTransport

        with SMTPTransport(**kwargs) as transport:
            assert transport.send(first).ok
            wait_for_the_drop(before)
            assert transport.send(second).ok
    else:
        import asyncio

        from mailrelay.transport import AsyncSMTPTransport

        async def main() -> None:
            async with AsyncSMTPTransport(**kwargs) as transport:
                assert (await transport.asend(first)).ok
                await asyncio.to_thread(wait_for_the_drop, before)
                assert (await transport.asend(second)).ok

        asyncio.run(main())
    delivered(postfix_clean, first)
    delivered(postfix_clean, second)
    # The server's 421 and end of file came while the connection sat idle: both drivers
    # find it dead when it is taken from the pool, before a NOOP or the message is sent
    # (the asyncio one may also have seen the end of file already, and closed it).
    assert "sent something unasked or closed; reconnecting" in caplog.text or (
        flavour == "async" and "was closed by the server; reconnecting" in caplog.text
    )
    assert "failed NOOP" not in caplog.text
    assert "sending on a fresh one" not in caplog.text


@pytest.mark.parametrize("chunking", [False, True], ids=["data", "bdat"])
@pytest.mark.parametrize("port_name", ["smtp_port", "no_pipelining_port"])
def test_send_many_with_a_refused_message_in_the_middle(
    flavour: Flavour, chunking: bool, port_name: str, postfix_clean: PostfixInstance
) -> None:
    # Pipelined across messages on smtp_port (RFC 2920 §3.1; with BDAT LAST, RFC 3030, a
    # window of whole messages), one message at a time on no_pipelining_port: the same
    # results either way, and the refused one leaves the others intact.
    good = [unique_message() for _ in range(4)]
    refused = unique_message()
    items: list[Any] = [
        *good[:2],
        (refused, Envelope("carol@mailrelay.test", ["someone@reject.mailrelay.test"])),
        *good[2:],
    ]
    port = getattr(postfix_clean, port_name)
    pool = PoolSettings(size=1)
    results = send_many_with(
        flavour, items, **args(postfix_clean, port, chunking=chunking, pool=pool)
    )
    assert [r.ok for r in results] == [True, True, False, True, True]
    assert [r.outcome for r in results[2].recipients] == [Outcome.PERMANENT]
    for message in good:
        assert_intact(delivered(postfix_clean, message), message)
    if chunking and port_name == "smtp_port":
        assert "BDAT " in postfix_clean.log_text()
