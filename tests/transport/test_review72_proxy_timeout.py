"""Review 72: connecting to the proxy counts against ``Timeouts.connect`` with the handshake.

The blocking driver set the attempt's deadline, then connected to the proxy giving each of
the *proxy's* addresses the whole ``Timeouts.connect``: a proxy name with three addresses
that do not answer kept the caller three times as long, and an address reached after the
time was spent was still connected to, only for the handshake to time out at once. The
asyncio driver already bounded both together. Here the proxy's name has two addresses whose
connections hang (a listener whose backlog is full drops the SYN) and then a listening one: once
the first has used up the time, neither driver goes on to the others.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import attrs
import pytest

from mailrelay.errors import ProxyError
from mailrelay.options import Timeouts
from mailrelay.transport import async_driver, sync_driver
from mailrelay.transport.proxy import Proxy
from tests.transport.helpers import FLAVOURS, Flavour, run

TIMEOUTS = attrs.evolve(Timeouts.all(10), connect=0.5)


@pytest.fixture
def full_backlog() -> Iterator[int]:
    """A port on 127.0.0.1 where a new connection hangs: its one backlog slot is taken."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    filler = socket.create_connection(listener.getsockname(), timeout=5)
    yield listener.getsockname()[1]
    filler.close()
    listener.close()


@pytest.fixture
def quiet() -> Iterator[socket.socket]:
    """A listener nobody accepts on: the kernel completes connections into its backlog,
    where :func:`connections` counts them."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.setblocking(False)
    yield listener
    listener.close()


def connections(listener: socket.socket) -> int:
    count = 0
    for _ in range(100):
        try:
            peer, _ = listener.accept()
        except BlockingIOError:
            break
        peer.close()
        count += 1
    return count


def open_through(flavour: Flavour, proxy: Proxy) -> None:
    if flavour == "sync":
        sync_driver.connect("mx.example", 25, timeouts=TIMEOUTS, proxy=proxy).close()
    else:
        run(async_driver.connect("mx.example", 25, timeouts=TIMEOUTS, proxy=proxy)).close()


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_the_proxys_addresses_share_the_connect_time(
    flavour: Flavour,
    full_backlog: int,
    quiet: socket.socket,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    live = quiet.getsockname()[1]
    real = socket.getaddrinfo

    def three_addresses(host: str, *rest: Any, **kwargs: Any) -> list[Any]:
        if host != "proxy.test":
            return real(host, *rest, **kwargs)
        stream = (socket.AF_INET, socket.SOCK_STREAM, 6, "")
        return [
            (*stream, ("127.0.0.1", full_backlog)),
            (*stream, ("127.0.0.1", full_backlog)),
            (*stream, ("127.0.0.1", live)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", three_addresses)
    with pytest.raises(ProxyError) as caught:
        open_through(flavour, Proxy(scheme="socks5h", host="proxy.test", port=1080))
    assert caught.value.is_transient
    assert "proxy.test:1080" in str(caught.value)
    # The time was spent on the first address: the live one was never connected to.
    assert connections(quiet) == 0
    if flavour == "sync":
        assert "not tried, no time left" in str(caught.value)
