"""Adversarial review (session 10) of the SMTP client against hostile or broken servers.

Each test drives a real client (both drivers: blocking and asyncio) against a small raw
server on loopback (:class:`RawServer`) whose every byte a handler function writes, so a
test can send what no real server would.

Bugs these tests reproduced (each failed before its fix):

* A reply beyond the one owed to EHLO (or to a refused STARTTLS) was taken as the reply to
  the next opening command: AUTH "succeeded" on a stray 235, the session went on
  unauthenticated, and the server's real answer to AUTH (535) answered MAIL, bouncing every
  recipient (PERMANENT) with a reply the message never got.
* A BDAT chunk answered twice: the extra 250 was taken for the last chunk's reply, so the
  message was reported ACCEPTED although the server's real final reply refused it.
* Plain text instead of the handshake after STARTTLS's 220 was reported with the hint for
  implicit TLS against a plain-text port ("use TLS.STARTTLS instead of TLS.IMPLICIT").
* The async driver connected to a scoped IPv6 address without its scope id.
* The async driver answered the first read of a reply from bytes buffered while its writes
  drained without starting that reply's time limit; the read resuming the reply then kept
  an earlier reply's deadline, long past: a false DeliveryTimeout after the whole message.
* The async driver reported an implicit-TLS handshake that ran out of time as "could not
  connect" (ConnectError, and the next address tried), not as the TLSError the blocking
  driver gives.

Properties that held (probed while reviewing; most have tests elsewhere, some here): a
reply trickled a byte at a time is bounded by its phase limit in both drivers (one deadline
per reply, RFC 5321 §4.5.3.2), and so is a TLS handshake fed a byte at a time (tested here);
endless continuation lines and huge EHLO replies are cut at the reply limit; 200,000 extra
250s after RCPT or after a pipelined group end the session with a ServerProtocolError; NUL
and non-UTF-8 octets in replies are kept, replaced, never raised; TLS close_notify in the
middle of the dialogue (even followed by plain text) is an end of file; a server that
half-closes after the data is ConnectionLost and the message is not sent twice; a 421 in
the middle of a pipelined send_many leaves every message with one result, in order; LMTP
servers that give fewer or more final replies than owed keep the answers given.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mailrelay.errors import ServerProtocolError, TLSError
from mailrelay.message import Message
from mailrelay.options import TLS, Timeouts
from mailrelay.results import Outcome
from mailrelay.transport import async_driver
from tests.peers.tls import TLSFiles
from tests.transport.helpers import FLAVOURS, Flavour, make_message, run, send_with

# Every blocking call of the server has this limit; a connection lives at most _LIFE s.
_WAIT = 3.0
_LIFE = 8.0
_MAX_LINE = 65536
_MAX_DATA = 32 * 1024 * 1024


class Gone(Exception):
    """The client hung up (or a server limit was reached): the handler is over."""


class Peer:
    """The server side of one connection, for a handler: buffered lines, raw writes."""

    def __init__(self, sock: socket.socket, stopping: threading.Event) -> None:
        self.sock = sock
        self.stopping = stopping
        self.buffer = bytearray()
        self.received = bytearray()
        self.deadline = time.monotonic() + _LIFE
        sock.settimeout(_WAIT)

    def _fill(self) -> None:
        if self.stopping.is_set() or time.monotonic() > self.deadline:
            raise Gone("stopping")
        try:
            data = self.sock.recv(65536)
        except (OSError, ValueError) as exc:
            raise Gone(str(exc)) from exc
        if not data:
            raise Gone("client hung up")
        self.buffer += data
        self.received += data

    def line(self) -> bytes:
        """One line from the client, without its CRLF."""
        for _ in range(10_000):
            end = self.buffer.find(b"\n")
            if end >= 0:
                line = bytes(self.buffer[:end]).rstrip(b"\r")
                del self.buffer[: end + 1]
                return line
            if len(self.buffer) > _MAX_LINE:
                raise Gone("line too long")
            self._fill()
        raise Gone("too many reads")

    def data(self) -> bytes:
        """DATA content up to and including the CRLF.CRLF terminator."""
        if self.buffer.startswith(b".\r\n"):
            del self.buffer[:3]
            return b".\r\n"
        start = 0
        for _ in range(100_000):
            end = self.buffer.find(b"\r\n.\r\n", start)
            if end >= 0:
                content = bytes(self.buffer[: end + 5])
                del self.buffer[: end + 5]
                return content
            if len(self.buffer) > _MAX_DATA:
                raise Gone("data too long")
            start = max(0, len(self.buffer) - 4)  # only new bytes can complete it
            self._fill()
        raise Gone("too many reads")

    def exactly(self, count: int) -> bytes:
        """``count`` octets (a BDAT chunk)."""
        for _ in range(100_000):
            if len(self.buffer) >= count:
                chunk = bytes(self.buffer[:count])
                del self.buffer[:count]
                return chunk
            self._fill()
        raise Gone("too many reads")

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (OSError, ValueError) as exc:
            raise Gone(str(exc)) from exc

    def trickle(self, data: bytes, pause: float) -> None:
        """Send ``data`` one octet at a time, ``pause`` seconds apart (bounded by _LIFE)."""
        for octet in data:
            if self.stopping.wait(pause) or time.monotonic() > self.deadline:
                raise Gone("stopping")
            self.send(bytes([octet]))

    def expect(self, verb: bytes) -> bytes:
        line = self.line()
        assert line.upper().startswith(verb), (verb, line)
        return line

    def greet_and_ehlo(self, *extensions: bytes) -> None:
        """The usual opening: 220, then EHLO answered with ``extensions``."""
        self.send(b"220 raw.test ESMTP\r\n")
        self.expect(b"EHLO")
        lines = [b"raw.test", *extensions]
        reply = b"".join(
            b"250" + (b" " if n == len(lines) - 1 else b"-") + text + b"\r\n"
            for n, text in enumerate(lines)
        )
        self.send(reply)

    def start_tls(self, context: ssl.SSLContext) -> None:
        """Run the server side of a TLS handshake on the connection."""
        if self.buffer:
            raise Gone("the client sent bytes before its ClientHello")
        try:
            self.sock = context.wrap_socket(self.sock, server_side=True)
        except (OSError, ValueError) as exc:
            raise Gone(str(exc)) from exc

    def linger(self) -> None:
        """Half-close and wait (bounded) for the client to hang up, so no RST eats replies."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(Gone):
            for _ in range(1000):
                self._fill()


Handler = Callable[[Peer], None]


class RawServer:
    """Loopback listener running ``handlers[n]`` for the n-th connection (later connections
    are closed at once). Errors other than :class:`Gone` are kept in :attr:`errors`."""

    def __init__(self, handlers: list[Handler]) -> None:
        self.handlers = handlers
        self.errors: list[BaseException] = []
        self.connections = 0
        self.peers: list[Peer] = []
        self.stopping = threading.Event()
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.listener.settimeout(0.1)
        self.port: int = self.listener.getsockname()[1]
        self.threads: list[threading.Thread] = []
        self.accepter = threading.Thread(target=self._accept, daemon=True)
        self.accepter.start()

    def _accept(self) -> None:
        for _ in range(int(_LIFE * 20)):
            if self.stopping.is_set():
                return
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            index = self.connections
            self.connections += 1
            if index >= len(self.handlers):
                sock.close()
                continue
            thread = threading.Thread(target=self._serve, args=(sock, index), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket, index: int) -> None:
        peer = Peer(sock, self.stopping)
        self.peers.append(peer)
        try:
            self.handlers[index](peer)
        except Gone:
            pass
        except BaseException as exc:  # a bug in the test's handler
            self.errors.append(exc)
        finally:
            with contextlib.suppress(OSError):
                sock.close()

    def stop(self) -> None:
        self.stopping.set()
        self.accepter.join(_WAIT)
        for thread in self.threads:
            thread.join(_LIFE)
        self.listener.close()
        assert not self.accepter.is_alive()
        assert not any(thread.is_alive() for thread in self.threads)
        if self.errors:
            raise self.errors[0]


@contextlib.contextmanager
def serving(*handlers: Handler) -> Iterator[RawServer]:
    """A :class:`RawServer` for the block; stopped (and its handlers' errors raised) after."""
    server = RawServer(list(handlers))
    try:
        yield server
    finally:
        server.stop()


def options(server: RawServer, seconds: float = 1.0, **kwargs: Any) -> dict[str, Any]:
    """A transport's arguments for ``server``: plain text, every phase limited to ``seconds``."""
    return {
        "host": "127.0.0.1",
        "port": server.port,
        "tls": TLS.NONE,
        "timeouts": Timeouts.all(seconds),
        **kwargs,
    }


def bdat_chunk(peer: Peer) -> bool:
    """Read one ``BDAT n [LAST]`` command and its chunk; whether it was the last."""
    line = peer.expect(b"BDAT")
    words = line.split()
    peer.exactly(int(words[1]))
    return len(words) > 2 and words[2].upper() == b"LAST"


def two_chunks() -> Message:
    """A message sent in more than one BDAT chunk (``Message.chunks()`` gives 64 KiB ones)."""
    message = make_message(text=("y" * 70 + "\n") * 1500)
    assert len(list(message.chunks())) >= 2
    return message


# -- a reply to a command nobody sent (one command in flight, two replies) -----------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_bdat_chunk_answered_twice_is_not_taken_for_the_final_reply(flavour: Flavour) -> None:
    # The server answers the first chunk twice. The extra 250 is already buffered with the
    # chunk's reply; taken for the last chunk's reply, it made the message ACCEPTED although
    # the server's real final reply refused it (false delivery: the message is lost).
    seen: list[bool] = []

    def handler(peer: Peer) -> None:
        peer.greet_and_ehlo(b"CHUNKING")
        peer.expect(b"MAIL")
        peer.send(b"250 ok\r\n")
        for _ in range(2):
            peer.expect(b"RCPT")
            peer.send(b"250 ok\r\n")
        seen.append(bdat_chunk(peer))
        peer.send(b"250 2.0.0 chunk taken\r\n250 2.0.0 stray\r\n")
        for _ in range(100):
            last = bdat_chunk(peer)
            seen.append(last)
            if last:
                break
            peer.send(b"250 2.0.0 chunk taken\r\n")
        peer.send(b"554 5.6.0 refused after all\r\n")
        peer.linger()

    with serving(handler) as server:
        result = send_with(flavour, two_chunks(), **options(server, chunking=True))
    assert [r.outcome for r in result.recipients] == [Outcome.TRANSIENT] * 2
    assert seen == [False]  # nothing more was sent once the replies were out of step


# Where a stray reply comes before AUTH: with the EHLO reply, or with a refusal of STARTTLS
# (TLS.OPPORTUNISTIC then goes on in plain text).
STRAY_BEFORE_AUTH = [
    pytest.param(b"", b"235 2.7.0 stray\r\n", TLS.NONE, id="after-ehlo"),
    pytest.param(b"STARTTLS", b"454 4.7.0 no TLS now\r\n235 2.7.0 stray\r\n", TLS.OPPORTUNISTIC,
                 id="after-starttls-refused"),
]  # fmt: skip


@pytest.mark.parametrize(("offer", "stray", "tls"), STRAY_BEFORE_AUTH)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_stray_reply_before_auth_does_not_answer_it(
    flavour: Flavour, offer: bytes, stray: bytes, tls: TLS
) -> None:
    # A second reply to EHLO (or to a refused STARTTLS) was taken as AUTH's reply: the
    # client went on unauthenticated, and the server's real answer to AUTH (535) answered
    # MAIL: every recipient PERMANENT, with a reply nobody gave the message (false bounce).
    commands: list[bytes] = []

    def handler(peer: Peer) -> None:
        peer.send(b"220 raw.test ESMTP\r\n")
        peer.expect(b"EHLO")
        extensions = b"250-raw.test\r\n" + (b"250-" + offer + b"\r\n" if offer else b"")
        peer.send(extensions + b"250 AUTH PLAIN\r\n" + (b"" if offer else stray))
        if offer:
            peer.expect(b"STARTTLS")
            peer.send(stray)
        for _ in range(10):
            line = peer.line()
            commands.append(line.split(b" ")[0].upper())
            if commands[-1] == b"AUTH":
                time.sleep(0.1)  # the real reply comes after the stray one, as it would
                peer.send(b"535 5.7.8 bad credentials\r\n")
            elif commands[-1] == b"QUIT":
                peer.send(b"221 bye\r\n")
            else:
                peer.send(b"250 ok\r\n")

    with serving(handler) as server, pytest.raises(ServerProtocolError):
        send_with(
            flavour,
            make_message(),
            **options(server, tls=tls, username="u", password="p", allow_insecure_auth=True),
        )
    assert b"MAIL" not in commands


# -- STARTTLS ------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_plain_text_instead_of_the_handshake_after_starttls_says_so(
    flavour: Flavour, tls_files: TLSFiles
) -> None:
    # After its 220 the server sends plain text (a second reply: a broken server, or an
    # attacker's injection) where the handshake should begin. The client must not trust it,
    # and the error must say what happened: it said "use TLS.STARTTLS instead of
    # TLS.IMPLICIT", the hint for implicit TLS against a plain-text port, to a client that
    # was using STARTTLS.
    def handler(peer: Peer) -> None:
        peer.greet_and_ehlo(b"STARTTLS")
        peer.expect(b"STARTTLS")
        peer.send(b"220 2.0.0 go ahead\r\n")
        time.sleep(0.2)  # the client has read the 220 and begun its handshake
        peer.send(b"250-injected\r\n250 AUTH PLAIN\r\n")
        peer.linger()

    with serving(handler) as server, pytest.raises(TLSError) as info:
        send_with(
            flavour,
            make_message(),
            **options(
                server,
                tls=TLS.STARTTLS,
                ssl_context=tls_files.client_context(),
                server_hostname="localhost",
            ),
        )
    assert "TLS.IMPLICIT" not in str(info.value)
    assert "STARTTLS" in str(info.value)
    assert not info.value.is_transient


# -- connecting ----------------------------------------------------------------------------------


def test_the_async_driver_keeps_an_ipv6_scope_id() -> None:
    # getaddrinfo gives a scoped IPv6 address as (host, port, flowinfo, scope_id): for a
    # link-local address (fe80::1%eth0) the scope id names the interface, and without it
    # the connection cannot be made. The async driver passed only the host and the port on
    # (the blocking driver connects with the whole tuple). ::1 on the loopback interface
    # stands in for the link-local address: the kernel accepts the scope id there too.
    scope = socket.if_nametoindex("lo")
    seen: list[tuple[Any, ...]] = []

    async def main() -> None:
        async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"220 scoped.test ESMTP\r\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(greet, "::1", 0)
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        connect_socket = loop.sock_connect

        async def getaddrinfo(host: str, port_: int, **kwargs: Any) -> list[tuple[Any, ...]]:
            assert host == "scoped.test"
            return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port_, 0, scope))]

        async def sock_connect(sock: socket.socket, address: Any) -> None:
            seen.append(tuple(address))
            await connect_socket(sock, address)

        loop.getaddrinfo = getaddrinfo  # type: ignore[method-assign,assignment]
        loop.sock_connect = sock_connect  # type: ignore[method-assign]
        async with server:
            driver = await async_driver.connect(
                "scoped.test", port, timeouts=Timeouts.all(1), source_address=None
            )
            try:
                for _ in range(100):
                    if driver.bytes_received:
                        break
                    await asyncio.sleep(0.01)
                assert driver.bytes_received > 0
            finally:
                driver.close()

    run(main())
    assert seen == [("::1", seen[0][1], 0, scope)]


# -- deadlines -----------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_reply_begun_while_the_data_drains_gets_its_own_time_limit(flavour: Flavour) -> None:
    # The first line of the final reply arrives while the client still waits for room to
    # write the message (the server reads slowly). The async driver answered the final
    # reply's first Read from its buffer without starting that reply's time limit, so the
    # Read that resumed it kept the deadline of the wait for the 354, long past: a false
    # DeliveryTimeout after the whole message went out (the server had it; a retry would
    # deliver it twice). The limit for a reply starts when the wait for it does.
    message = make_message(text=("z" * 76 + "\n") * 110_000)  # ~8.5 MB: writes must wait

    def handler(peer: Peer) -> None:
        peer.greet_and_ehlo()
        peer.expect(b"MAIL")
        peer.send(b"250 ok\r\n")
        for _ in range(2):
            peer.expect(b"RCPT")
            peer.send(b"250 ok\r\n")
        peer.expect(b"DATA")
        peer.send(b"354 go ahead\r\n")
        time.sleep(0.1)  # (not with the 354: that would be a reply sent too soon)
        peer.send(b"250-2.0.0 taken, more to say\r\n")
        time.sleep(1.0)  # reads nothing meanwhile: the client's writes wait
        peer.data()
        peer.send(b"250 2.0.0 queued\r\n")
        peer.expect(b"QUIT")
        peer.send(b"221 bye\r\n")

    timeouts = Timeouts(connect=1, greeting=1, mail=1, rcpt=1, data_init=0.5, data_block=5,
                        data_end=2, quit=1)  # fmt: skip
    with serving(handler) as server:
        result = send_with(flavour, message, **options(server, timeouts=timeouts))
    assert [r.outcome for r in result.recipients] == [Outcome.ACCEPTED] * 2


_DRIP = 50  # octets of a handshake record, one every 0.1 s: 5 s in all


@pytest.mark.parametrize("tls", [TLS.IMPLICIT, TLS.STARTTLS])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_handshake_fed_a_byte_at_a_time_is_cut_at_the_connect_limit(
    flavour: Flavour, tls: TLS, tls_files: TLSFiles
) -> None:
    # Each read of the handshake returns well within any per-read limit; the connect limit
    # (0.5 s) must bound the handshake as a whole, for implicit TLS and after STARTTLS.
    dripped: list[int] = []

    def handler(peer: Peer) -> None:
        if tls is TLS.STARTTLS:
            peer.greet_and_ehlo(b"STARTTLS")
            peer.expect(b"STARTTLS")
            peer.send(b"220 2.0.0 go ahead\r\n")
        peer._fill()  # the ClientHello
        peer.send(b"\x16\x03\x03\x40\x00")  # a handshake record of 16 KiB follows...
        for _ in range(_DRIP):
            peer.trickle(b"\x02", 0.1)  # ...very slowly
            dripped.append(1)

    with serving(handler) as server, pytest.raises(TLSError):
        send_with(
            flavour,
            make_message(),
            **options(
                server,
                0.5,
                tls=tls,
                ssl_context=tls_files.client_context(),
                server_hostname="localhost",
            ),
        )
    assert len(dripped) < _DRIP  # the client hung up long before the server was done
