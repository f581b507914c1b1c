"""Closing the SMTP/LMTP pools: QUIT on every connection, bounded, concurrent, never raising.

Each way a pooled transport ends is checked against a real server that records what it got:
``close()`` / ``aclose()`` and the context managers, an event loop that ends with the
transport still open, a transport dropped without closing (a ResourceWarning), a server that
misbehaves at QUIT, and a connection still in use while the transport closes.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from collections.abc import Callable, Iterator

import attrs
import pytest
from aiosmtpd.controller import Controller

from mailrelay.errors import TransportClosed
from mailrelay.options import TLS, Timeouts
from mailrelay.transport import (
    AsyncLMTPTransport,
    AsyncSMTPTransport,
    LMTPTransport,
    PoolSettings,
    SMTPTransport,
)
from tests.peers.scripted import (
    MESSAGE,
    Action,
    ScriptedServerFactory,
    Step,
    accept_message,
    ehlo,
    greeting,
    quit_step,
)
from tests.transport.counting_server import CountingHandler, start_counting
from tests.transport.helpers import FLAVOURS, Flavour, make_message, run

TIMEOUTS = Timeouts.all(10)
ONE = ("bob@example.com",)


Start = Callable[[CountingHandler], int]


@pytest.fixture
def counting() -> Iterator[Start]:
    """``counting(handler)`` starts an aiosmtpd server with ``handler``, returns its port;
    every server is stopped at teardown."""
    controllers: list[Controller] = []

    def start(handler: CountingHandler) -> int:
        controller = start_counting(handler)
        controllers.append(controller)
        return int(controller.port)

    yield start
    for controller in controllers:
        controller.stop()


# -- close() / aclose() QUIT every idle connection, all at once ----------------------------------


@pytest.mark.parametrize("lmtp", [False, True])
def test_aclose_quits_every_idle_connection_at_once(lmtp: bool, counting: Start) -> None:
    handler = CountingHandler(lmtp=lmtp, quit_barrier=3)
    port = counting(handler)
    cls = AsyncLMTPTransport if lmtp else AsyncSMTPTransport
    transport = cls("127.0.0.1", port, tls=TLS.NONE, timeouts=TIMEOUTS, pool=PoolSettings(size=3))

    async def main() -> list[bool]:
        async with transport:
            # Three sends at once open three connections, which then wait in the pool.
            results = await asyncio.gather(
                *(transport.asend(make_message(to=ONE, subject=str(n))) for n in range(3))
            )
        return [r.ok for r in results]

    assert run(main()) == [True] * 3
    assert len(handler.connections) == 3
    assert handler.quits == 3
    # Every QUIT reply waited until all three QUITs had arrived: they were sent together.
    assert not handler.barrier_missed


def test_close_quits_every_idle_connection_at_once(counting: Start) -> None:
    handler = CountingHandler(quit_barrier=3)
    port = counting(handler)
    transport = SMTPTransport(
        "127.0.0.1", port, tls=TLS.NONE, timeouts=TIMEOUTS, pool=PoolSettings(size=3)
    )
    with transport:
        # Three connections in the pool at once (as three threads sending together leave it).
        taken = [transport._checkout()[0] for _ in range(3)]
        for connection in taken:
            transport._checkin(connection)
        assert transport.send(make_message(to=ONE)).ok
    assert len(handler.connections) == 3
    assert handler.quits == 3
    assert not handler.barrier_missed
    assert len(handler.messages) == 1


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_lmtp_close_sends_quit(flavour: Flavour, counting: Start) -> None:
    handler = CountingHandler(lmtp=True)
    port = counting(handler)
    kwargs = {"host": "127.0.0.1", "port": port, "timeouts": TIMEOUTS}
    if flavour == "sync":
        with LMTPTransport(**kwargs) as transport:  # type: ignore[arg-type]
            assert transport.send(make_message(to=ONE)).ok
    else:

        async def main() -> None:
            async with AsyncLMTPTransport(**kwargs) as transport:  # type: ignore[arg-type]
                assert (await transport.asend(make_message(to=ONE))).ok

        run(main())
    assert (len(handler.connections), handler.quits) == (1, 1)


# -- a server that misbehaves at QUIT: bounded, logged, never raised -----------------------------


def _quit_answered_by(step: Step) -> list[Step]:
    return [greeting(), ehlo("PIPELINING"), *accept_message(1), step]


QUIT_FAULTS = {
    # Never answers: closing gives up after the quit limit (1 s here), long before the
    # server's silence ends (4 s), although every other limit is longer than that silence.
    "silent": Step(expect="QUIT", action=Action.SILENT, silence=4),
    "reset": Step(expect="QUIT", action=Action.RESET),
    "hangs up": Step(expect="QUIT", action=Action.CLOSE),
    "refuses": Step(expect="QUIT", reply=b"500 5.5.1 no\r\n"),
}


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("fault", sorted(QUIT_FAULTS))
def test_a_misbehaving_quit_neither_hangs_nor_raises(
    flavour: Flavour,
    fault: str,
    scripted_server: ScriptedServerFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = scripted_server([_quit_answered_by(QUIT_FAULTS[fault])])
    kwargs = {"host": "127.0.0.1", "port": server.port, "tls": TLS.NONE}
    timeouts = attrs.evolve(Timeouts.all(30), quit=1)
    caplog.set_level(logging.DEBUG, logger="mailrelay")
    if flavour == "sync":
        with SMTPTransport(**kwargs, timeouts=timeouts) as transport:  # type: ignore[arg-type]
            assert transport.send(make_message(to=ONE)).ok
    else:

        async def main() -> None:
            async with AsyncSMTPTransport(**kwargs, timeouts=timeouts) as transport:  # type: ignore[arg-type]
                assert (await transport.asend(make_message(to=ONE))).ok

        run(main())
    session = server.session(0)
    assert session.lines[-1] == b"QUIT"
    assert "silence over" not in session.events  # we hung up first
    if fault == "silent":
        assert any(
            "QUIT to" in r.getMessage() and "failed" in r.getMessage() for r in caplog.records
        )


# -- a connection in use while the transport closes ----------------------------------------------


def _slow_message() -> list[Step]:
    return [
        greeting(),
        ehlo("PIPELINING"),
        Step(expect=r"MAIL FROM:<.*>.*", reply=b"250 2.1.0 Ok\r\n"),
        Step(expect=r"RCPT TO:<.*>.*", reply=b"250 2.1.5 Ok\r\n"),
        Step(expect="DATA", reply=b"354 go ahead\r\n"),
        # The final reply comes late: the transport is closed in the meantime.
        Step(expect=MESSAGE, reply=b"250 2.0.0 Ok\r\n", delay=0.5),
        quit_step(),
    ]


def _wait_for_data(received: bytearray) -> None:
    for _ in range(500):  # bounded: at most 5 s
        if b"\r\n.\r\n" in bytes(received):
            return
        threading.Event().wait(0.01)
    raise AssertionError("the message never reached the server")


def test_a_connection_in_use_is_quit_when_given_back_after_aclose(
    scripted_server: ScriptedServerFactory,
) -> None:
    server = scripted_server([_slow_message()])
    transport = AsyncSMTPTransport("127.0.0.1", server.port, tls=TLS.NONE, timeouts=TIMEOUTS)

    async def main() -> bool:
        sending = asyncio.ensure_future(transport.asend(make_message(to=ONE)))
        for _ in range(500):  # bounded: at most 5 s
            if server.sessions and b"\r\n.\r\n" in bytes(server.sessions[0].received):
                break
            await asyncio.sleep(0.01)
        await transport.aclose()  # nothing idle yet: returns at once
        result = await sending
        with pytest.raises(TransportClosed):
            await transport.asend(make_message(to=ONE))
        return result.ok

    assert run(main())
    assert server.session(0).lines[-1] == b"QUIT"


def test_a_connection_in_use_is_quit_when_given_back_after_close(
    scripted_server: ScriptedServerFactory,
) -> None:
    server = scripted_server([_slow_message()])
    transport = SMTPTransport("127.0.0.1", server.port, tls=TLS.NONE, timeouts=TIMEOUTS)
    outcome: list[bool] = []
    sender = threading.Thread(
        target=lambda: outcome.append(transport.send(make_message(to=ONE)).ok)
    )
    sender.start()
    for _ in range(500):  # bounded: at most 5 s
        if server.sessions:
            break
        threading.Event().wait(0.01)
    _wait_for_data(server.sessions[0].received)
    transport.close()
    sender.join(timeout=10)
    assert outcome == [True]
    assert server.session(0).lines[-1] == b"QUIT"
    with pytest.raises(TransportClosed):
        transport.send(make_message(to=ONE))


# -- never closed ----------------------------------------------------------------------------------


def test_an_event_loop_ending_quits_the_idle_connections(
    scripted_server: ScriptedServerFactory,
) -> None:
    one_message = [greeting(), ehlo("PIPELINING"), *accept_message(1), quit_step()]
    server = scripted_server([one_message])
    transport = AsyncSMTPTransport("127.0.0.1", server.port, tls=TLS.NONE, timeouts=TIMEOUTS)
    assert run(transport.asend(make_message(to=ONE))).ok
    # asyncio.run cancelled the pool's keeper as the loop ended; it said QUIT first.
    assert server.session(0).lines[-2:] == [b".", b"QUIT"]
    # The transport itself was never closed: collecting it says so.
    with pytest.warns(ResourceWarning, match="unclosed transport <AsyncSMTPTransport"):
        del transport  # the last reference: collected at once


def test_a_forgotten_async_transport_warns_and_closes_its_connections(
    scripted_server: ScriptedServerFactory,
) -> None:
    server = scripted_server([[greeting(), ehlo("PIPELINING"), *accept_message(1), quit_step()]])

    async def main() -> None:
        transport = AsyncSMTPTransport("127.0.0.1", server.port, tls=TLS.NONE, timeouts=TIMEOUTS)
        assert (await transport.asend(make_message(to=ONE))).ok
        # Dropped while its loop runs: the keeper holds it only weakly, so it is collected.
        with pytest.warns(ResourceWarning, match="call aclose"):
            del transport  # the last reference (the keeper's is weak): collected at once
        await asyncio.sleep(0)  # let the aborted connection's callbacks run

    run(main())
    session = server.session(0)
    assert session.lines[-1] == b"."  # aborted, no QUIT: a finalizer cannot wait for a reply
    assert "eof" in session.events


@pytest.mark.parametrize("cls", [SMTPTransport, LMTPTransport])
def test_a_forgotten_sync_transport_warns_and_closes_its_sockets(
    cls: type[SMTPTransport | LMTPTransport], counting: Start
) -> None:
    handler = CountingHandler(lmtp=cls is LMTPTransport)
    port = counting(handler)
    transport = cls("127.0.0.1", port, tls=TLS.NONE, timeouts=TIMEOUTS)
    assert transport.send(make_message(to=ONE)).ok
    # Our warning, not the socket module's "unclosed <socket>": the transport closed it.
    with pytest.warns(ResourceWarning, match=f"unclosed transport <{cls.__name__}"):
        del transport  # the last reference: collected at once
    assert handler.quits == 0


@pytest.mark.parametrize("cls", [SMTPTransport, AsyncSMTPTransport])
def test_a_transport_that_never_connected_is_collected_quietly(
    cls: type[SMTPTransport | AsyncSMTPTransport],
) -> None:
    transport = cls("smtp.example.com")
    del transport
    gc.collect()  # pytest turns any warning into an error
