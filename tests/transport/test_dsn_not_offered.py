"""A server that does not offer DSN (RFC 3461) gets no DSN parameters, and the session says
so once in the log: the request is dropped, never the message (aiosmtpd offers no DSN)."""

from __future__ import annotations

import logging

import pytest

from mailrelay.envelope import Envelope, Notify, Recipient, Ret
from mailrelay.options import TLS, Timeouts
from mailrelay.transport.base import BatchItem
from mailrelay.transport.settings import PoolSettings
from tests.peers.aiosmtpd_server import AiosmtpdFactory
from tests.transport.helpers import FLAVOURS, Flavour, make_message, send_many_with

NOTICE = "does not offer DSN (RFC 3461)"


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("asks", [True, False])
def test_dropped_dsn_requests_are_said_once_a_session(
    flavour: Flavour,
    asks: bool,
    make_aiosmtpd: AiosmtpdFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = make_aiosmtpd(starttls=False, auth=False)
    notify = frozenset({Notify.SUCCESS, Notify.FAILURE}) if asks else None
    items: list[BatchItem] = []
    for n in range(3):
        message = make_message(to=("bob@mailrelay.test",), subject=f"m{n}")
        envelope = Envelope(
            "alice@mailrelay.test",
            [Recipient("bob@mailrelay.test", notify=notify)],
            ret=Ret.HDRS if asks else None,
        )
        items.append((message, envelope))
    with caplog.at_level(logging.INFO, logger="mailrelay"):
        results = send_many_with(
            flavour, items, host=server.host, port=server.port, tls=TLS.NONE,
            timeouts=Timeouts.all(10), pool=PoolSettings(size=1),
        )  # fmt: skip
    assert all(r.ok for r in results)
    assert len(server.messages) == 3
    for received in server.messages:
        assert not any(o.startswith("RET=") for o in received.mail_options)
        assert not any(o.startswith("NOTIFY=") for each in received.rcpt_options for o in each)
    said = [r for r in caplog.records if NOTICE in r.getMessage()]
    assert len(said) == (1 if asks else 0)
