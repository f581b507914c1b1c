"""Both trackers through the real SMTP transports to aiosmtpd (a real server on loopback).

The runners hand chunks to ``send_many`` / ``asend_many``, which the SMTP pool spreads
over its connections: each recipient's state must follow its own reply from the server,
and the server must have received exactly the messages the tracker says it delivered.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import pytest

from mailrelay.message import Message
from mailrelay.options import Timeouts
from mailrelay.tracker.async_engine import AsyncDeliveryTracker
from mailrelay.tracker.engine import DeliveryTracker, RunSummary
from mailrelay.tracker.sqlite_store import SQLiteStore
from mailrelay.tracker.store import State
from mailrelay.transport import AsyncSMTPTransport, PoolSettings, SMTPTransport
from tests.peers.aiosmtpd_server import AiosmtpdServer

# aiosmtpd's test server answers by local part: ``tempfail`` 450, ``reject`` 550.
FATES = {"ok": State.DELIVERED, "tempfail": State.DEFERRED, "reject": State.BOUNCED}


def _messages(count: int) -> list[tuple[Message, str]]:
    """``count`` distinct messages, one recipient each: accepted, deferred (``450 4.2.1``,
    about that mailbox: the relay is not backed off) and refused for good, in turn."""
    kinds = ("ok", "ok", "tempfail", "ok", "reject")
    made = []
    for index in range(count):
        kind = kinds[index % len(kinds)]
        local = f"user{index}" if kind == "ok" else kind
        message = Message.build(
            sender="tracker@mailrelay.test",
            to=[f"{local}@mailrelay.test"],
            subject=f"tracked {index}",
            text=f"message number {index}\n.a line that starts with a dot\n",
        )
        made.append((message, kind))
    return made


def _settings(server: AiosmtpdServer) -> dict[str, Any]:
    return {
        "host": server.host,
        "port": server.port,
        "ssl_context": ssl.create_default_context(cafile=str(server.ca_file)),
        "timeouts": Timeouts.all(10),
        "pool": PoolSettings(size=3),
    }


def _check(
    tracker: DeliveryTracker | AsyncDeliveryTracker,
    server: AiosmtpdServer,
    made: list[tuple[Message, str]],
    ids: list[str],
    summary: RunSummary,
) -> None:
    delivered = [message for message, kind in made if kind == "ok"]
    assert summary.delivered == len(delivered), summary
    assert summary.deferred == sum(kind == "tempfail" for _, kind in made)
    assert summary.bounced == sum(kind == "reject" for _, kind in made)
    for (_message, kind), tracking_id in zip(made, ids, strict=True):
        (recipient,) = tracker.status(tracking_id).recipients
        assert recipient.state is FATES[kind], (kind, recipient)
        (attempt,) = recipient.attempts
        assert attempt.code == {"ok": 250, "tempfail": 450, "reject": 550}[kind]
    # The server has exactly the delivered messages, each whole (order across the pool's
    # connections is not defined).
    received = sorted(m.content for m in server.messages)
    assert received == sorted(message.as_bytes() for message in delivered)


def test_the_sync_tracker_through_smtp_to_a_real_server(
    aiosmtpd_server: AiosmtpdServer, tmp_path: Path
) -> None:
    made = _messages(40)
    store = SQLiteStore(tmp_path / "q.db")
    with SMTPTransport(**_settings(aiosmtpd_server)) as transport:
        tracker = DeliveryTracker(transport, store, commit_batch=7)
        ids = tracker.submit_many([message for message, _ in made])
        summary = tracker.run_pending()
        assert summary.postponed == 0
        _check(tracker, aiosmtpd_server, made, ids, summary)
    store.close()


@pytest.mark.parametrize("concurrency", [1, 4])
def test_the_async_tracker_through_smtp_to_a_real_server(
    aiosmtpd_server: AiosmtpdServer, tmp_path: Path, concurrency: int
) -> None:
    made = _messages(40)
    store = SQLiteStore(tmp_path / "q.db")

    async def scenario() -> tuple[AsyncDeliveryTracker, list[str], RunSummary]:
        async with AsyncSMTPTransport(**_settings(aiosmtpd_server)) as transport:
            tracker = AsyncDeliveryTracker(transport, store, commit_batch=7)
            ids = await tracker.asubmit_many([message for message, _ in made])
            summary = await tracker.arun_pending(concurrency=concurrency)
            return tracker, ids, summary

    tracker, ids, summary = asyncio.run(scenario())
    assert summary.postponed == 0
    _check(tracker, aiosmtpd_server, made, ids, summary)
    store.close()
