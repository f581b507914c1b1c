"""``sendmail://`` URLs: parsing, the transport they build, and a send through Postfix."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from mailrelay.errors import ConfigurationError
from mailrelay.message import Message
from mailrelay.transport import (
    SendmailTransport,
    TransportURL,
    async_transport_from_url,
    transport_from_url,
)
from mailrelay.transport.sendmail import DEFAULT_COMMAND, DEFAULT_TIMEOUT
from tests.peers.postfix import PostfixInstance
from tests.transport.helpers import run


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sendmail://", {"path": None, "config": None, "timeouts": None}),
        ("sendmail:///", {"path": None}),
        ("sendmail://localhost/usr/sbin/sendmail", {"path": "/usr/sbin/sendmail"}),
        ("sendmail:///opt/x%20y/sendmail", {"path": "/opt/x y/sendmail"}),
        ("sendmail://?config=/etc/postfix-out", {"config": "/etc/postfix-out"}),
    ],
)
def test_parse(url: str, expected: dict[str, Any]) -> None:
    parsed = TransportURL.parse(url)
    assert parsed.scheme == "sendmail"
    for name, value in expected.items():
        assert getattr(parsed, name) == value


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("sendmail://mail.example.com/usr/sbin/sendmail", "runs a local program"),
        ("sendmail://:25", "runs a local program"),
        ("sendmail://me:pw@/usr/sbin/sendmail", "no user name"),
        ("sendmail://?config=", "config must name"),
        ("sendmail://?tls=none", "unknown parameter"),
        ("sendmail://?timeout=0", "timeout must be a positive"),
        ("sendmail://?config=a&config=b", "given twice"),
    ],
)
def test_bad_urls(url: str, error: str) -> None:
    with pytest.raises(ConfigurationError, match=error) as caught:
        TransportURL.parse(url)
    assert "pw" not in str(caught.value)


def test_builds_the_transport() -> None:
    default = transport_from_url("sendmail://")
    assert isinstance(default, SendmailTransport)
    assert default.command == DEFAULT_COMMAND
    assert default.arguments == ()
    assert default.timeout == DEFAULT_TIMEOUT
    tuned = async_transport_from_url("sendmail:///usr/sbin/sendmail?config=/etc/pf&timeout=7.5")
    assert isinstance(tuned, SendmailTransport)
    assert tuned.arguments == ("-C", "/etc/pf")
    assert tuned.timeout == 7.5
    # Keyword overrides win over the URL, as for every scheme.
    overridden = transport_from_url("sendmail://?timeout=3", timeout=9)
    assert isinstance(overridden, SendmailTransport)
    assert overridden.timeout == 9


def test_a_missing_program_is_a_configuration_error(tmp_path: Any) -> None:
    with pytest.raises(ConfigurationError):
        transport_from_url(f"sendmail://{tmp_path}/no-such-sendmail")


@pytest.mark.postfix
def test_sends_through_postfix_by_url(postfix: PostfixInstance) -> None:
    url = f"sendmail://?config={postfix.etc}&timeout=30"
    messages = [
        Message.build(
            sender="carol@mailrelay.test",
            to=["alice@mailrelay.test"],
            subject=f"by url {uuid.uuid4().hex}",
            text="hello\n",
        )
        for _ in range(2)
    ]
    with transport_from_url(url) as transport:
        assert transport.send(messages[0]).ok

    async def main() -> bool:
        async with async_transport_from_url(url) as transport:
            return (await transport.asend(messages[1])).ok

    assert run(main())
    for message in messages:
        assert message.message_id is not None
        postfix.wait_for_message("alice", f"<{message.message_id}>".encode())
