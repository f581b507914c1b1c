"""Review 72: a failed proxy login leaves no credential in the traceback's frames.

Error reporters (Sentry, pytest's ``--showlocals``, ``traceback.TracebackException(...,
capture_locals=True)``) show each frame's local variables. When a proxy refused the login,
the drivers' handshake loop still held the last bytes it had sent (the RFC 1929 request with
the password, or the CONNECT request with its ``Proxy-Authorization`` token) in a local, and
the handshake's SOCKS5 login step held the password itself.
"""

from __future__ import annotations

import base64
import socket
from types import TracebackType

import pytest

from mailrelay.errors import ProxyError
from mailrelay.options import Timeouts
from mailrelay.transport import async_driver, sync_driver
from mailrelay.transport.proxy import Proxy, ProxyHandshake
from tests.peers.proxies import FakeFactory, FakeProxy
from tests.transport.helpers import FLAVOURS, Flavour, run

SECRET = "s3cr3t-pw-72"
TOKEN = base64.b64encode(f"user:{SECRET}".encode()).decode()
TIMEOUTS = Timeouts.all(5)


def leaks(exc: BaseException) -> list[str]:
    """Every frame local, along the exception's chain, whose value shows a credential."""
    found: list[str] = []
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        pending += [error.__cause__, error.__context__]
        tb: TracebackType | None = error.__traceback__
        while tb is not None:
            for name, value in tb.tb_frame.f_locals.items():
                shown = value.decode("latin-1") if isinstance(value, bytes | bytearray) else None
                for text in (shown, repr(value)):
                    if text is not None and (SECRET in text or TOKEN in text):
                        found.append(f"{tb.tb_frame.f_code.co_name}: {name}")
            tb = tb.tb_next
    return found


def socks_refuses_login(proxy: FakeProxy, conn: socket.socket) -> None:
    proxy.recv_exactly(conn, 4)  # 05 02 00 02
    conn.sendall(b"\x05\x02")
    proxy.recv_exactly(conn, 3 + len("user") + len(SECRET))
    conn.sendall(b"\x01\x01")
    proxy.hold(conn)


def http_refuses_login(proxy: FakeProxy, conn: socket.socket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        piece = conn.recv(4096)
        if not piece:
            return
        data += piece
    conn.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
    proxy.hold(conn)


def login(scheme: str, port: int) -> Proxy:
    return Proxy(scheme=scheme, host="127.0.0.1", port=port, username="user", password=SECRET)


def refuse(handshake: ProxyHandshake, scheme: str) -> None:
    """Feed ``handshake`` the proxy's refusal of the login, a byte at a time."""
    handshake.data_to_send()
    if scheme == "socks5h":
        for byte in b"\x05\x02":
            handshake.receive_data(bytes((byte,)))
        handshake.data_to_send()
        handshake.receive_data(b"\x01\x01")
    else:
        for byte in b"HTTP/1.1 407 No\r\n\r\n":
            handshake.receive_data(bytes((byte,)))


@pytest.mark.parametrize("scheme", ["socks5h", "http"])
def test_the_handshake_keeps_no_credential_in_its_frames(scheme: str) -> None:
    handshake = ProxyHandshake(login(scheme, 1080), "mx.example", 25)
    with pytest.raises(ProxyError) as caught:
        refuse(handshake, scheme)
    assert leaks(caught.value) == []


def open_through(flavour: Flavour, proxy: Proxy) -> None:
    if flavour == "sync":
        sync_driver.connect("mx.example", 25, timeouts=TIMEOUTS, proxy=proxy).close()
    else:
        run(async_driver.connect("mx.example", 25, timeouts=TIMEOUTS, proxy=proxy)).close()


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("scheme", ["socks5h", "http"])
def test_a_refused_login_leaves_no_credential_in_the_traceback(
    flavour: Flavour, scheme: str, make_fake_proxy: FakeFactory
) -> None:
    fake = make_fake_proxy(socks_refuses_login if scheme == "socks5h" else http_refuses_login)
    with pytest.raises(ProxyError, match="user name and password") as caught:
        open_through(flavour, login(scheme, fake.port))
    assert leaks(caught.value) == []
