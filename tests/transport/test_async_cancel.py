"""Cancelling an asyncio send: the connection is closed and the pool slot freed."""

from __future__ import annotations

import asyncio

import pytest

from mailrelay.options import TLS, Timeouts
from mailrelay.transport import AsyncSMTPTransport, PoolSettings
from tests.peers.scripted import (
    Action,
    ScriptedServerFactory,
    Step,
    accept_message,
    ehlo,
    greeting,
    quit_step,
)
from tests.transport.helpers import make_message, run


def test_a_cancelled_send_closes_its_connection_and_frees_its_slot(
    scripted_server: ScriptedServerFactory,
) -> None:
    server = scripted_server(
        [
            [
                greeting(),
                ehlo("PIPELINING"),
                Step(expect=r"MAIL FROM:.*", action=Action.SILENT, silence=4),
            ],
            [greeting(), ehlo("PIPELINING"), *accept_message(1), quit_step()],
        ]
    )
    transport = AsyncSMTPTransport(
        "127.0.0.1",
        server.port,
        tls=TLS.NONE,
        timeouts=Timeouts.all(5),
        pool=PoolSettings(size=1),
    )

    async def main() -> bool:
        async with transport:
            stuck = asyncio.ensure_future(transport.asend(make_message(to=("bob@example.com",))))
            # Let it reach the silent reply (bounded: the server stays silent for 4 s).
            for _ in range(200):
                if server.sessions and b"MAIL FROM" in bytes(server.sessions[0].received):
                    break
                await asyncio.sleep(0.01)
            stuck.cancel()
            with pytest.raises(asyncio.CancelledError):
                await stuck
            # The only slot is free again; the next message goes on a fresh connection.
            result = await transport.asend(make_message(to=("bob@example.com",)))
            return result.ok

    assert run(main())
    first = server.session(0)
    # The cancelled connection was closed by the client, long before the silence ended.
    assert "silence over" not in first.events
    assert server.session(1).lines[-1] == b"QUIT"


def test_a_transport_can_serve_a_second_event_loop(
    scripted_server: ScriptedServerFactory,
) -> None:
    one_message = [greeting(), ehlo("PIPELINING"), *accept_message(1), quit_step()]
    server = scripted_server([one_message, one_message])
    transport = AsyncSMTPTransport("127.0.0.1", server.port, tls=TLS.NONE, timeouts=Timeouts.all(5))
    # No aclose() between the two loops: the first loop's connection must not leak (pytest
    # turns a ResourceWarning into a failure) nor be reused from the second loop.
    assert run(transport.asend(make_message(to=("bob@example.com",)))).ok
    assert run(transport.asend(make_message(to=("bob@example.com",)))).ok
    run(transport.aclose())
    # Each loop's connection was ended with QUIT as its loop ended (by the pool's keeper task).
    for index in (0, 1):
        session = server.session(index)
        assert session.lines[-2:] == [b".", b"QUIT"]  # the message, then QUIT
        assert "closed by script" in session.events


def test_idle_connections_expire_in_the_background(
    scripted_server: ScriptedServerFactory,
) -> None:
    server = scripted_server([[greeting(), ehlo("PIPELINING"), *accept_message(1), quit_step()]])
    transport = AsyncSMTPTransport(
        "127.0.0.1",
        server.port,
        tls=TLS.NONE,
        timeouts=Timeouts.all(5),
        pool=PoolSettings(idle_timeout=0.2),
    )

    async def main() -> None:
        async with transport:
            assert (await transport.asend(make_message(to=("bob@example.com",)))).ok
            # Wait (bounded) until the server saw the session end: the keeper sent QUIT.
            session = await asyncio.to_thread(server.session, 0, 5.0)
            assert session.lines[-1] == b"QUIT"

    run(main())
