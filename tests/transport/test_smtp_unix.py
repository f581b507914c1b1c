"""SMTP over a unix socket (``path=``, ``smtp:///path``), both drivers, against aiosmtpd."""

from __future__ import annotations

import ssl
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailrelay.errors import AuthenticationError, ConfigurationError
from mailrelay.options import TLS, Timeouts
from mailrelay.transport import (
    AsyncSMTPTransport,
    SMTPTransport,
    async_transport_from_url,
    transport_from_url,
)
from mailrelay.transport.url import TransportURL
from tests.peers.aiosmtpd_server import AiosmtpdFactory, AiosmtpdServer
from tests.transport.helpers import FLAVOURS, Flavour, make_message, run, send_many_with, send_with

USER, PASSWORD = "alice@mailrelay.test", "alicepw"


@pytest.fixture
def smtp_unix(make_aiosmtpd: AiosmtpdFactory) -> Iterator[AiosmtpdServer]:
    """aiosmtpd SMTP (STARTTLS, AUTH) listening on a unix socket."""
    # A short directory of our own: unix socket paths are limited to ~107 bytes.
    with tempfile.TemporaryDirectory(prefix="mrsmtp-") as directory:
        server = make_aiosmtpd(unix_socket=Path(directory) / "smtp.sock")
        yield server
        server.stop()


def where(server: AiosmtpdServer, **extra: Any) -> dict[str, Any]:
    return {"path": str(server.unix_socket), "timeouts": Timeouts.all(10), **extra}


def trusting(server: AiosmtpdServer) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(server.ca_file))


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_starttls_and_auth_over_a_unix_socket(flavour: Flavour, smtp_unix: AiosmtpdServer) -> None:
    # The certificate is checked against "localhost" (the default name for a socket path).
    message = make_message(to=("bob@mailrelay.test",), text="a line\n.a dot-started line\n")
    result = send_with(
        flavour,
        message,
        **where(smtp_unix, ssl_context=trusting(smtp_unix), username=USER, password=PASSWORD),
    )
    assert result.ok
    assert result.host == str(smtp_unix.unix_socket)
    (received,) = smtp_unix.messages
    assert received.tls
    assert received.auth_login == USER
    assert received.content == message.as_bytes()
    assert received.protocol != "LMTP"


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_certificate_checked_against_server_hostname(
    flavour: Flavour, smtp_unix: AiosmtpdServer
) -> None:
    # A name the certificate does not carry fails: a socket path is no reason to trust.
    from mailrelay.errors import TLSError

    with pytest.raises(TLSError):
        send_with(
            flavour,
            make_message(),
            **where(smtp_unix, ssl_context=trusting(smtp_unix), server_hostname="other.test"),
        )
    assert smtp_unix.messages == []


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_no_auth_in_plain_text_over_a_socket_unless_allowed(
    flavour: Flavour, smtp_unix: AiosmtpdServer
) -> None:
    with pytest.raises(AuthenticationError):
        send_with(
            flavour, make_message(), **where(smtp_unix, tls=TLS.NONE, username=USER, password="x")
        )
    assert smtp_unix.messages == []
    result = send_with(
        flavour,
        make_message(),
        **where(
            smtp_unix, tls=TLS.NONE, username=USER, password=PASSWORD, allow_insecure_auth=True
        ),
    )
    assert result.ok
    assert not smtp_unix.messages[0].tls


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_send_many_over_a_unix_socket(flavour: Flavour, smtp_unix: AiosmtpdServer) -> None:
    messages = [make_message(subject=f"n{index}") for index in range(5)]
    results = send_many_with(flavour, list(messages), **where(smtp_unix, tls=TLS.NONE))
    assert [r.ok for r in results] == [True] * 5
    # The async transport spreads a batch over several connections: any arrival order.
    assert sorted(m.content for m in smtp_unix.messages) == sorted(m.as_bytes() for m in messages)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("smtp:///run/smtp.sock", {"scheme": "smtp", "path": "/run/smtp.sock", "host": None}),
        (
            "smtp://u:p@/run/x%20y.sock?tls=none",
            {"path": "/run/x y.sock", "tls": TLS.NONE, "username": "u"},
        ),
    ],
)
def test_url_names_a_unix_socket(url: str, expected: dict[str, Any]) -> None:
    parsed = TransportURL.parse(url)
    for name, value in expected.items():
        assert getattr(parsed, name) == value


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("smtp:///", "needs a host"),
        ("smtps:///run/smtp.sock", "needs a host"),
        ("smtp:///run/smtp.sock?source_address=127.0.0.2", "no source address"),
    ],
)
def test_bad_unix_socket_urls(url: str, error: str) -> None:
    with pytest.raises(ConfigurationError, match=error):
        TransportURL.parse(url)


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        ({}, "give the server's host"),
        ({"host": "h", "path": "/run/smtp.sock"}, "not both"),
        ({"path": ""}, "not a usable socket path"),
        ({"path": "/run/a\0b"}, "not a usable socket path"),
        ({"path": "/run/smtp.sock", "tls": TLS.IMPLICIT}, "implicit TLS"),
        ({"path": "/run/smtp.sock", "source_address": "127.0.0.2"}, "no source address"),
    ],
)
def test_bad_unix_socket_arguments(arguments: dict[str, Any], error: str) -> None:
    for cls in (SMTPTransport, AsyncSMTPTransport):
        with pytest.raises(ConfigurationError, match=error):
            cls(**arguments)


def test_url_transport_sends_over_the_socket(smtp_unix: AiosmtpdServer) -> None:
    url = f"smtp://{smtp_unix.unix_socket}?tls=none&timeout=10"  # smtp:///tmp/...
    with transport_from_url(url) as transport:
        assert transport.send(make_message()).ok

    async def main() -> bool:
        async with async_transport_from_url(url) as transport:
            return (await transport.asend(make_message())).ok

    assert run(main())
    assert len(smtp_unix.messages) == 2
