"""Session-10 review of the day's transport code: findings reproduced, then fixed.

Findings (each test failed before its fix):

* ``send_many`` / ``asend_many`` left a message's recipients refused as one too many
  (RFC 5321 §4.5.3.1.10) TRANSIENT, unsent, when the session ended before the batch
  could send them in another transaction (a pipelined next message met a 421): the
  continuation on another connection ran only when the session counted a split
  message, and this path does not count one.
"""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP
from aiosmtpd.smtp import Envelope as ServerEnvelope
from aiosmtpd.smtp import Session as ServerSession

from mailrelay.message import Message
from mailrelay.options import TLS, Timeouts
from mailrelay.transport.settings import PoolSettings
from tests.transport.helpers import FLAVOURS, Flavour, send_many_with
from tests.transport.test_recipient_limits import LimitsHandler, serving


def tagged(to: list[str]) -> Message:
    return Message.build(
        sender="carol@mailrelay.test", to=to, subject=f"review {uuid.uuid4().hex}", text="Hi.\n"
    )


def options(port: int, size: int = 4) -> dict[str, Any]:
    return {
        "host": "127.0.0.1",
        "port": port,
        "tls": TLS.NONE,
        "timeouts": Timeouts.all(10),
        "pool": PoolSettings(size=size),
    }


def received(handler: LimitsHandler) -> Counter[str]:
    return Counter(rcpt for message in handler.messages for rcpt in message.rcpt_tos)


class UnannouncedLimits(LimitsHandler):
    """Enforces its limits (452 4.5.3 past ``rcpt_max`` recipients, 421 past ``mail_max``
    transactions) without announcing them: the RFC 5321 way, no LIMITS keyword."""

    async def handle_EHLO(
        self,
        server: SMTP,
        session: ServerSession,
        envelope: ServerEnvelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        return responses


@pytest.mark.parametrize("size", [1, 4])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_batch_finishes_too_many_recipients_after_a_421(flavour: Flavour, size: int) -> None:
    handler = UnannouncedLimits(rcpt_max=2, mail_max=1)
    first = tagged([f"a{i}@example.net" for i in range(4)])
    second = tagged(["b@example.net"])
    with serving(handler) as port:
        results = send_many_with(flavour, [first, second], **options(port, size))
    assert [len(r.recipients) for r in results] == [4, 1]
    assert all(r.ok for r in results), results
    expected = Counter([f"a{i}@example.net" for i in range(4)] + ["b@example.net"])
    assert received(handler) == expected
