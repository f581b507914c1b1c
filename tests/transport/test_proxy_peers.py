"""Sending through real proxies on loopback (microsocks for SOCKS5, tinyproxy for HTTP
CONNECT) to the real aiosmtpd servers, and through in-process fakes for the faults a real
proxy will not commit. Both drivers, every case.

How we know the traffic went through the proxy: the proxies bind their outgoing connections
to another loopback address (``127.0.0.2`` / ``127.0.0.3``), and the server records the
address each transaction came from; tinyproxy's log names every CONNECT too.
"""

from __future__ import annotations

import base64
import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

import attrs
import pytest

from mailrelay.errors import ProxyError, TLSError
from mailrelay.options import TLS, Timeouts
from mailrelay.transport import PoolSettings
from mailrelay.transport.url import async_transport_from_url, transport_from_url
from tests.peers.aiosmtpd_server import AiosmtpdServer
from tests.peers.proxies import (
    FakeFactory,
    FakeProxy,
    ProxyFactory,
    ProxyProcess,
    relay,
    socks5h_resolving,
)
from tests.transport.helpers import (
    FLAVOURS,
    Flavour,
    make_message,
    run,
    send_many_with,
    send_with,
)

SOCKS_SECRET = "p@ss:w/rd-69"  # percent-encoded in URLs; microsocks takes anything
HTTP_SECRET = "pw69secret"  # tinyproxy's BasicAuth takes letters and digits only
SOCKS_BIND = "127.0.0.2"
HTTP_BIND = "127.0.0.3"
TO = ("bob@mailrelay.test",)


def came_from(server: AiosmtpdServer) -> list[str]:
    """Start recording the address each transaction reaches ``server`` from."""
    peers: list[str] = []
    original = server.handler.handle_DATA

    async def handle_data(smtp: Any, session: Any, envelope: Any) -> str:
        peers.append(session.peer[0])
        return await original(smtp, session, envelope)

    # aiosmtpd looks its hooks up on the handler for each new connection.
    server.handler.handle_DATA = handle_data  # type: ignore[method-assign,assignment]
    return peers


def args(server: AiosmtpdServer, proxy: str, **extra: Any) -> dict[str, Any]:
    """Send to ``server`` by the name ``localhost`` (in its certificate) through ``proxy``,
    STARTTLS required, trusting the test CA."""
    return {
        "host": "localhost",
        "port": server.port,
        "ssl_context": ssl.create_default_context(cafile=str(server.ca_file)),
        "timeouts": Timeouts.all(10),
        "proxy": proxy,
        **extra,
    }


def socks_proxy(make_proxy: ProxyFactory, login: bool = True) -> ProxyProcess:
    if login:
        return make_proxy("socks5", username="relay", password=SOCKS_SECRET, bind=SOCKS_BIND)
    return make_proxy("socks5", bind=SOCKS_BIND)


def http_proxy(make_proxy: ProxyFactory, *ports: int, login: bool = True) -> ProxyProcess:
    if login:
        return make_proxy(
            "http", connect_ports=ports, username="relay", password=HTTP_SECRET, bind=HTTP_BIND
        )
    return make_proxy("http", connect_ports=ports, bind=HTTP_BIND)


# -- real proxies ---------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("scheme", ["socks5", "socks5h"])
@pytest.mark.parametrize("login", [True, False])
def test_send_through_microsocks(
    flavour: Flavour,
    scheme: str,
    login: bool,
    aiosmtpd_server: AiosmtpdServer,
    make_proxy: ProxyFactory,
) -> None:
    peers = came_from(aiosmtpd_server)
    proxy = socks_proxy(make_proxy, login)
    message = make_message(to=TO)
    result = send_with(flavour, message, **args(aiosmtpd_server, proxy.url(scheme)))
    assert result.ok
    (received,) = aiosmtpd_server.messages
    assert received.tls  # STARTTLS through the tunnel, checked against "localhost"
    assert received.content == message.as_bytes()
    assert peers == [SOCKS_BIND]


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("login", [True, False])
def test_send_through_tinyproxy(
    flavour: Flavour, login: bool, aiosmtpd_server: AiosmtpdServer, make_proxy: ProxyFactory
) -> None:
    peers = came_from(aiosmtpd_server)
    proxy = http_proxy(make_proxy, aiosmtpd_server.port, login=login)
    result = send_with(flavour, make_message(to=TO), **args(aiosmtpd_server, proxy.url()))
    assert result.ok
    assert aiosmtpd_server.messages[0].tls
    assert peers == [HTTP_BIND]
    assert f"CONNECT localhost:{aiosmtpd_server.port} HTTP/1.1" in proxy.log_text()


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("kind", ["socks5h", "http"])
def test_implicit_tls_through_the_tunnel(
    flavour: Flavour, kind: str, aiosmtpd_smtps: AiosmtpdServer, make_proxy: ProxyFactory
) -> None:
    peers = came_from(aiosmtpd_smtps)
    if kind == "http":
        url = http_proxy(make_proxy, aiosmtpd_smtps.port).url()
    else:
        url = socks_proxy(make_proxy).url(kind)
    result = send_with(flavour, make_message(to=TO), **args(aiosmtpd_smtps, url, tls=TLS.IMPLICIT))
    assert result.ok
    assert aiosmtpd_smtps.messages[0].tls
    assert peers == [HTTP_BIND if kind == "http" else SOCKS_BIND]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_lmtp_through_a_proxy(
    flavour: Flavour, aiosmtpd_lmtp: AiosmtpdServer, make_proxy: ProxyFactory
) -> None:
    peers = came_from(aiosmtpd_lmtp)
    proxy = socks_proxy(make_proxy)
    result = send_with(
        flavour,
        make_message(to=("bob@mailrelay.test", "fail@mailrelay.test")),
        lmtp=True,
        **args(aiosmtpd_lmtp, proxy.url("socks5h"), tls=TLS.NONE),
    )
    assert [each.outcome.name for each in result.recipients] == ["ACCEPTED", "PERMANENT"]
    assert peers == [SOCKS_BIND]


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("kind", ["socks5", "http"])
def test_send_many_over_the_pool_through_a_proxy(
    flavour: Flavour, kind: str, aiosmtpd_server: AiosmtpdServer, make_proxy: ProxyFactory
) -> None:
    peers = came_from(aiosmtpd_server)
    if kind == "http":
        url = http_proxy(make_proxy, aiosmtpd_server.port).url()
    else:
        url = socks_proxy(make_proxy).url()
    messages = [make_message(to=TO, subject=f"message {n}") for n in range(6)]
    results = send_many_with(
        flavour,
        list(messages),
        **args(aiosmtpd_server, url, pool=PoolSettings(size=2, max_messages=3)),
    )
    assert all(result.ok for result in results)
    subjects = sorted(
        m.content.split(b"Subject: ")[1].split(b"\r\n")[0] for m in aiosmtpd_server.messages
    )
    assert subjects == [f"message {n}".encode() for n in range(6)]
    assert set(peers) == {HTTP_BIND if kind == "http" else SOCKS_BIND}
    assert len(peers) == 6


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("kind", ["socks5h", "http"])
def test_url_form(
    flavour: Flavour, kind: str, aiosmtpd_server: AiosmtpdServer, make_proxy: ProxyFactory
) -> None:
    from urllib.parse import quote

    peers = came_from(aiosmtpd_server)
    if kind == "http":
        proxy_url = http_proxy(make_proxy, aiosmtpd_server.port).url()
    else:
        proxy_url = socks_proxy(make_proxy).url(kind)
    url = f"smtp://localhost:{aiosmtpd_server.port}?timeout=10&proxy={quote(proxy_url, safe='')}"
    context = ssl.create_default_context(cafile=str(aiosmtpd_server.ca_file))
    message = make_message(to=TO)
    if flavour == "sync":
        with transport_from_url(url, ssl_context=context) as transport:
            assert transport.send(message).ok
            shown = repr(transport)
    else:

        async def main() -> str:
            async with async_transport_from_url(url, ssl_context=context) as transport:
                assert (await transport.asend(message)).ok
                return repr(transport)

        shown = run(main())
    assert peers == [HTTP_BIND if kind == "http" else SOCKS_BIND]
    assert SOCKS_SECRET not in shown
    assert HTTP_SECRET not in shown


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_socks5_tries_each_address_of_the_target(
    flavour: Flavour,
    aiosmtpd_server: AiosmtpdServer,
    make_proxy: ProxyFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = socket.getaddrinfo
    port = aiosmtpd_server.port

    def two_addresses(host: str, *rest: Any, **kwargs: Any) -> list[Any]:
        if host != "mx.mailrelay.test":
            return real(host, *rest, **kwargs)
        # 127.0.0.9 first (nothing listens there: the proxy gets "connection refused"),
        # then 127.0.0.1 (aiosmtpd).
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.9", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", two_addresses)
    proxy = make_proxy("socks5")  # microsocks, unbound: it can reach 127.0.0.9
    options = args(aiosmtpd_server, proxy.url(), host="mx.mailrelay.test")
    assert send_with(flavour, make_message(to=TO), **options).ok

    # With no address left that works, the error lists what the proxy said for each.
    aiosmtpd_server.stop()
    with pytest.raises(ProxyError) as caught:
        send_with(flavour, make_message(to=TO), **options)
    text = str(caught.value)
    assert caught.value.is_transient
    assert f"127.0.0.9:{port}" in text
    assert f"127.0.0.1:{port}" in text
    assert text.count("connection refused") == 2


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_wrong_socks5_password_is_permanent(
    flavour: Flavour, aiosmtpd_server: AiosmtpdServer, make_proxy: ProxyFactory
) -> None:
    proxy = socks_proxy(make_proxy)
    url = proxy.url("socks5h", password="wrong-" + SOCKS_SECRET)
    with pytest.raises(ProxyError) as caught:
        send_with(flavour, make_message(to=TO), **args(aiosmtpd_server, url))
    error = caught.value
    assert not error.is_transient
    assert "refused our user name and password" in str(error)
    assert f"127.0.0.1:{proxy.port}" in str(error)
    assert f"localhost:{aiosmtpd_server.port}" in str(error)
    assert SOCKS_SECRET not in str(error)
    assert SOCKS_SECRET not in repr(error)
    assert not aiosmtpd_server.messages


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_socks5_proxy_wanting_a_login_refuses_none(
    flavour: Flavour, aiosmtpd_server: AiosmtpdServer, make_proxy: ProxyFactory
) -> None:
    proxy = socks_proxy(make_proxy)
    with pytest.raises(ProxyError, match="none of our methods") as caught:
        send_with(flavour, make_message(to=TO), **args(aiosmtpd_server, proxy.url(username="")))
    assert not caught.value.is_transient


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize(
    ("password", "words"),
    [("wrong69", "refused our user name and password"), ("", "requires a user name")],
)
def test_tinyproxy_refuses_wrong_credentials_for_good(
    flavour: Flavour,
    password: str,
    words: str,
    aiosmtpd_server: AiosmtpdServer,
    make_proxy: ProxyFactory,
) -> None:
    proxy = http_proxy(make_proxy, aiosmtpd_server.port)
    url = proxy.url(password=password) if password else proxy.url(username="")
    with pytest.raises(ProxyError, match=words) as caught:
        send_with(flavour, make_message(to=TO), **args(aiosmtpd_server, url))
    assert not caught.value.is_transient
    assert "wrong69" not in str(caught.value)
    assert not aiosmtpd_server.messages


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_port_the_proxy_does_not_allow_is_forbidden(
    flavour: Flavour, aiosmtpd_server: AiosmtpdServer, make_proxy: ProxyFactory
) -> None:
    proxy = http_proxy(make_proxy, aiosmtpd_server.port + 1)  # not the server's port
    with pytest.raises(ProxyError, match=r"rules forbid this connection \(403") as caught:
        send_with(flavour, make_message(to=TO), **args(aiosmtpd_server, proxy.url()))
    assert not caught.value.is_transient
    assert f"Refused CONNECT method on port {aiosmtpd_server.port}" in proxy.log_text()


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("kind", ["socks5", "http"])
def test_a_proxy_that_is_gone_is_transient(
    flavour: Flavour, kind: str, aiosmtpd_server: AiosmtpdServer, make_proxy: ProxyFactory
) -> None:
    if kind == "http":
        proxy = http_proxy(make_proxy, aiosmtpd_server.port)
    else:
        proxy = socks_proxy(make_proxy)
    proxy.stop()
    with pytest.raises(ProxyError, match="could not reach proxy") as caught:
        send_with(flavour, make_message(to=TO), **args(aiosmtpd_server, proxy.url()))
    assert caught.value.is_transient
    assert caught.value.proxy == f"127.0.0.1:{proxy.port}"


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_socks5_target_refused_is_transient(
    flavour: Flavour, aiosmtpd_server: AiosmtpdServer, make_proxy: ProxyFactory
) -> None:
    proxy = make_proxy("socks5")
    aiosmtpd_server.stop()
    with pytest.raises(ProxyError, match="connection refused") as caught:
        send_with(flavour, make_message(to=TO), **args(aiosmtpd_server, proxy.url("socks5h")))
    assert caught.value.is_transient


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_credentials_never_reach_the_log(
    flavour: Flavour,
    aiosmtpd_server: AiosmtpdServer,
    make_proxy: ProxyFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="mailrelay")
    socks = socks_proxy(make_proxy)
    http = http_proxy(make_proxy, aiosmtpd_server.port)
    errors: list[Exception] = []
    for url in (socks.url("socks5h"), http.url()):
        assert send_with(flavour, make_message(to=TO), **args(aiosmtpd_server, url)).ok
    for url in (
        socks.url(password=SOCKS_SECRET + "x"),
        http.url(password=HTTP_SECRET + "x"),
    ):
        with pytest.raises(ProxyError) as caught:
            send_with(flavour, make_message(to=TO), **args(aiosmtpd_server, url))
        errors.append(caught.value)
    assert "tunnel to localhost" in caplog.text  # the debug lines are there...
    tokens = [
        SOCKS_SECRET,
        HTTP_SECRET,
        base64.b64encode(f"relay:{HTTP_SECRET}".encode()).decode(),
        base64.b64encode(f"relay:{HTTP_SECRET}x".encode()).decode(),
    ]
    for token in tokens:  # ... and no secret in any of them, nor in the errors
        assert token not in caplog.text
        for error in errors:
            assert token not in str(error)
            assert token not in repr(error)
            assert token not in repr(error.args)


# -- in-process fakes -----------------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_the_certificate_is_checked_against_the_target_name(
    flavour: Flavour, aiosmtpd_server: AiosmtpdServer, make_fake_proxy: FakeFactory
) -> None:
    # The proxy (at 127.0.0.1, a name the certificate holds) maps both names to the server:
    # only the target's own name decides.
    fake = make_fake_proxy(
        socks5h_resolving({"mx.mailrelay.test": "127.0.0.1", "other.mailrelay.test": "127.0.0.1"})
    )
    good = args(aiosmtpd_server, fake.url("socks5h"), host="mx.mailrelay.test")
    assert send_with(flavour, make_message(to=TO), **good).ok
    bad = args(aiosmtpd_server, fake.url("socks5h"), host="other.mailrelay.test")
    with pytest.raises(TLSError, match=r"other\.mailrelay\.test") as caught:
        send_with(flavour, make_message(to=TO), **bad)
    assert not caught.value.is_transient
    assert len(aiosmtpd_server.messages) == 1


def silent(proxy: FakeProxy, conn: socket.socket) -> None:
    proxy.hold(conn)


def endless_header(proxy: FakeProxy, conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nX-Filler: ")
    for _ in range(64):
        conn.sendall(b"y" * 1024)
    proxy.hold(conn)


def wrong_version(proxy: FakeProxy, conn: socket.socket) -> None:
    proxy.recv_exactly(conn, 3)
    conn.sendall(b"\x04\x00")
    proxy.hold(conn)


def dripping(proxy: FakeProxy, conn: socket.socket) -> None:
    """A valid reply a byte every 20 ms, a 255-byte bound name: about 5 s in all. Each read
    gets a byte soon; only a limit on the whole handshake stops it."""
    proxy.recv_exactly(conn, 3)
    conn.sendall(b"\x05\x00")
    proxy.recv_exactly(conn, 4 + 1 + len("mx.mailrelay.test") + 2)
    conn.sendall(b"\x05\x00\x00\x03\xff")
    for _ in range(257):
        conn.sendall(b"a")
        time.sleep(0.02)


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize(
    "case",
    [
        (silent, "socks5h", True, "no tunnel within 0.5 s"),
        (silent, "http", True, "no tunnel within 0.5 s"),
        (dripping, "socks5h", True, "no tunnel within 0.5 s"),
        (endless_header, "http", False, "longer than 16384 bytes"),
        (wrong_version, "socks5h", False, "version is 4, not 5"),
    ],
    ids=["silent-socks", "silent-http", "dripping", "endless-header", "wrong-version"],
)
def test_hostile_proxies(
    flavour: Flavour,
    case: tuple[Callable[[FakeProxy, socket.socket], None], str, bool, str],
    make_fake_proxy: FakeFactory,
) -> None:
    handler, scheme, transient, words = case
    fake = make_fake_proxy(handler)
    options: dict[str, Any] = {
        "host": "mx.mailrelay.test",
        "port": 25,
        "timeouts": attrs.evolve(Timeouts.all(10), connect=0.5),
        "proxy": fake.url(scheme),
    }
    with pytest.raises(ProxyError, match=words) as caught:
        send_with(flavour, make_message(to=TO), **options)
    assert caught.value.is_transient is transient
    assert f"127.0.0.1:{fake.port}" in str(caught.value)
    assert "mx.mailrelay.test:25" in str(caught.value)


def dripping_socks5(server_port: int) -> Callable[[FakeProxy, socket.socket], None]:
    """A SOCKS5 proxy whose reply comes a byte at a time with a domain-name bound address,
    its last byte in the same segment as the server's greeting."""

    def handler(proxy: FakeProxy, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        proxy.recv_exactly(conn, 3)
        conn.sendall(b"\x05\x00")
        proxy.recv_exactly(conn, 4 + 1 + len("mx.mailrelay.test") + 2)
        upstream = socket.create_connection(("127.0.0.1", server_port), 5)
        with upstream:
            greeting = b""
            while not greeting.endswith(b"\r\n"):
                piece = upstream.recv(4096)
                if not piece:
                    return
                greeting += piece
            reply = b"\x05\x00\x00\x03\x10relay.proxy.test\x04\x38"
            for byte in reply[:-1]:
                conn.sendall(bytes((byte,)))
                time.sleep(0.002)
            conn.sendall(reply[-1:] + greeting)  # the greeting right behind the reply
            relay(conn, upstream)

    return handler


def dripping_http(server_port: int) -> Callable[[FakeProxy, socket.socket], None]:
    """An HTTP proxy whose reply comes a byte at a time, the greeting right behind it."""

    def handler(proxy: FakeProxy, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        request = b""
        while not request.endswith(b"\r\n\r\n"):
            request += proxy.recv_exactly(conn, 1)
        upstream = socket.create_connection(("127.0.0.1", server_port), 5)
        with upstream:
            greeting = upstream.recv(4096)
            reply = b"HTTP/1.1 200 Connection established\r\nVia: 1.1 fake\r\n\r\n"
            for byte in reply[:-1]:
                conn.sendall(bytes((byte,)))
            conn.sendall(reply[-1:] + greeting)
            relay(conn, upstream)

    return handler


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("kind", ["socks5h", "http"])
@pytest.mark.parametrize("tls", [TLS.STARTTLS, TLS.NONE])
def test_a_reply_in_pieces_with_the_greeting_behind_it_loses_nothing(
    flavour: Flavour,
    kind: str,
    tls: TLS,
    aiosmtpd_server: AiosmtpdServer,
    make_fake_proxy: FakeFactory,
) -> None:
    make = dripping_http if kind == "http" else dripping_socks5
    fake = make_fake_proxy(make(aiosmtpd_server.port))
    message = make_message(to=TO)
    options = args(aiosmtpd_server, fake.url(kind), host="mx.mailrelay.test", tls=tls)
    assert send_with(flavour, message, **options).ok
    (received,) = aiosmtpd_server.messages
    assert received.content == message.as_bytes()
    assert received.tls is (tls is TLS.STARTTLS)


def test_a_cancelled_async_handshake_leaves_no_socket(make_fake_proxy: FakeFactory) -> None:
    import asyncio
    import gc

    from mailrelay.transport import AsyncSMTPTransport

    fake = make_fake_proxy(silent)

    async def main() -> None:
        async with AsyncSMTPTransport(
            "mx.mailrelay.test", 25, timeouts=Timeouts.all(30), proxy=fake.url("socks5h")
        ) as smtp:
            task = asyncio.ensure_future(smtp.asend(make_message(to=TO)))
            for _ in range(200):  # until the proxy has the connection (bounded)
                await asyncio.sleep(0.01)
                if fake.received:
                    break
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    run(main())
    gc.collect()  # an unclosed socket would warn now: an error under pytest's settings
    assert fake.received  # the handshake had begun
