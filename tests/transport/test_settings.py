"""Transport settings are checked at construction; the password never shows."""

from __future__ import annotations

import logging
import ssl
from typing import Any

import pytest

from mailrelay.errors import ConfigurationError, TransportClosed
from mailrelay.options import TLS
from mailrelay.transport import (
    AsyncLMTPTransport,
    AsyncSMTPTransport,
    LMTPTransport,
    PoolSettings,
    SMTPTransport,
)
from mailrelay.transport.errors_map import peer_name
from tests.transport.helpers import make_message, run


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"host": ""}, "not a usable host"),
        ({"host": "a b"}, "not a usable host"),
        ({"host": "h\r\nRCPT"}, "not a usable host"),
        ({"port": 0}, "port must be"),
        ({"port": 65536}, "port must be"),
        ({"port": True}, "port must be"),
        ({"tls": "starttls"}, "tls must be a TLS policy"),
        ({"timeouts": 10}, "timeouts must be a Timeouts"),
        ({"username": "alice"}, "both a user name and a password"),
        ({"password": "secret"}, "both a user name and a password"),
        ({"ssl_context": "yes"}, "ssl_context must be"),
    ],
)
@pytest.mark.parametrize("cls", [SMTPTransport, AsyncSMTPTransport])
def test_bad_smtp_settings(cls: type[Any], kwargs: dict[str, Any], match: str) -> None:
    arguments: dict[str, Any] = {"host": "smtp.example.com", **kwargs}
    with pytest.raises(ConfigurationError, match=match) as caught:
        cls(**arguments)
    assert "secret" not in str(caught.value)


@pytest.mark.parametrize("cls", [LMTPTransport, AsyncLMTPTransport])
def test_lmtp_settings(cls: type[Any]) -> None:
    assert cls(path="/run/lmtp").settings.peer == "/run/lmtp"
    assert cls("store.example").settings.peer == "store.example:24"
    with pytest.raises(ConfigurationError, match="implicit TLS over a unix socket"):
        cls(path="/run/lmtp", tls=TLS.IMPLICIT)
    with pytest.raises(ConfigurationError, match="give the server's host"):
        cls()


@pytest.mark.parametrize(
    "kwargs",
    [{"size": 0}, {"max_messages": 0}, {"idle_timeout": 0}, {"health_check_after": -1}],
)
def test_bad_pool_settings(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError, match="must be positive"):
        PoolSettings(**kwargs)


@pytest.mark.parametrize("cls", [SMTPTransport, AsyncSMTPTransport])
def test_repr_hides_the_password(cls: type[Any]) -> None:
    transport = cls("smtp.example.com", username="alice", password="hunter2")
    expected = f"<{cls.__name__} smtp.example.com:587 tls=STARTTLS user='alice'>"
    assert repr(transport) == expected
    assert (
        repr(transport.settings)
        == "ConnectionSettings(smtp.example.com:587 tls=STARTTLS user='alice')"
    )
    assert "hunter2" not in repr(transport.settings)
    assert "hunter2" not in repr(transport.settings.session_config("192.0.2.1"))


def test_the_default_context_verifies_certificates() -> None:
    context = SMTPTransport("smtp.example.com").settings.context()
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname


def test_the_session_announces_an_address_literal_by_default() -> None:
    settings = SMTPTransport("smtp.example.com").settings
    assert settings.session_config("192.0.2.1").local_hostname == "192.0.2.1"
    assert settings.session_config(None).local_hostname == "localhost"
    named = SMTPTransport("smtp.example.com", local_hostname="client.example").settings
    assert named.session_config("192.0.2.1").local_hostname == "client.example"


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [("127.0.0.1", 25, "127.0.0.1:25"), ("::1", 25, "[::1]:25"), ("/run/x", None, "/run/x")],
)
def test_peer_name(host: str, port: int | None, expected: str) -> None:
    assert peer_name(host, port) == expected


def test_a_closed_transport_refuses_to_send() -> None:
    transport = SMTPTransport("smtp.example.com")
    transport.close()
    with pytest.raises(TransportClosed, match="closed"):
        transport.send(make_message())
    async_transport = AsyncSMTPTransport("smtp.example.com")

    async def main() -> None:
        await async_transport.aclose()
        await async_transport.asend(make_message())

    with pytest.raises(TransportClosed, match="closed"):
        run(main())


@pytest.mark.parametrize(
    ("port", "tls", "warned"),
    [
        (465, TLS.STARTTLS, "port 465 normally expects implicit TLS"),
        (465, TLS.NONE, "port 465 normally expects implicit TLS"),
        (587, TLS.IMPLICIT, "port 587 normally speaks plain text first"),
        (25, TLS.IMPLICIT, "port 25 normally speaks plain text first"),
        (465, TLS.IMPLICIT, None),
        (587, TLS.STARTTLS, None),
        (2525, TLS.IMPLICIT, None),
    ],
)
def test_port_and_policy_mismatches_are_logged(
    port: int, tls: TLS, warned: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="mailrelay.transport")
    SMTPTransport("smtp.example.com", port, tls=tls)
    if warned is None:
        assert caplog.records == []
    else:
        assert warned in caplog.text
