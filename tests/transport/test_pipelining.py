"""``send_many`` pipelined across messages (RFC 2920 §3.1), both drivers, against the scripted
server: what must happen when a message in the middle of a window fails, or the session ends.
"""

from __future__ import annotations

from typing import Any

import pytest

from mailrelay.options import TLS, Timeouts
from mailrelay.results import Outcome
from mailrelay.transport import PoolSettings
from tests.peers.scripted import (
    ANY,
    MESSAGE,
    Action,
    ScriptedServerFactory,
    Step,
    accept_message,
    ehlo,
    greeting,
    quit_step,
)
from tests.transport.helpers import FLAVOURS, Flavour, make_message, send_many_with

pytestmark = pytest.mark.parametrize("flavour", FLAVOURS)

POOL = PoolSettings(size=1, health_check_after=86400)


def plain(port: int, **kwargs: Any) -> dict[str, Any]:
    return {
        "host": "127.0.0.1",
        "port": port,
        "tls": TLS.NONE,
        "timeouts": Timeouts.all(5),
        "pool": POOL,
        **kwargs,
    }


def messages(count: int) -> list[Any]:
    return [make_message(to=("bob@example.com",), subject=f"m{n}") for n in range(count)]


def test_a_batch_goes_over_one_connection_with_the_next_envelope_after_the_data(
    flavour: Flavour, scripted_server: ScriptedServerFactory
) -> None:
    server = scripted_server(
        [[greeting(), ehlo("PIPELINING"), *accept_message(1) * 3, quit_step()]]
    )
    results = send_many_with(flavour, messages(3), **plain(server.port))
    assert [r.ok for r in results] == [True, True, True]
    assert len(server.sessions) == 1
    received = bytes(server.session(0).received)
    # The second message's envelope follows the first one's terminator directly.
    assert b"\r\n.\r\nMAIL FROM:" in received


def test_a_refused_mail_in_the_middle_of_a_window(
    flavour: Flavour, scripted_server: ScriptedServerFactory
) -> None:
    refused = [
        Step(expect=r"MAIL FROM:.*", reply=b"553 5.7.1 sender refused\r\n"),
        Step(expect=r"RCPT TO:.*", reply=b"503 5.5.1 need MAIL\r\n"),
        Step(expect="DATA", reply=b"503 5.5.1 need RCPT\r\n"),
    ]
    server = scripted_server(
        [
            [
                greeting(),
                ehlo("PIPELINING"),
                *accept_message(1),
                *refused,
                # RFC 5321 §4.1.1.5: RSET before the next transaction, pipelined with it.
                Step(expect="RSET", reply=b"250 2.0.0 Ok\r\n"),
                *accept_message(1),
                quit_step(),
            ]
        ]
    )
    results = send_many_with(flavour, messages(3), **plain(server.port))
    assert [r.ok for r in results] == [True, False, True]
    middle = results[1].recipients[0]
    assert middle.outcome is Outcome.PERMANENT
    assert middle.reply is not None
    assert middle.reply.code == 553  # the MAIL reply, not the 503s
    assert server.session(0).events.count("mismatch") == 0


@pytest.mark.parametrize(
    "ending",
    [
        Step(expect=ANY, reply=b"421 4.3.2 shutting down\r\n", action=Action.CLOSE),
        Step(expect=ANY, action=Action.CLOSE),
    ],
    ids=["421", "eof"],
)
def test_the_session_ending_mid_window_resends_the_unanswered_messages(
    flavour: Flavour, scripted_server: ScriptedServerFactory, ending: Step
) -> None:
    server = scripted_server(
        [
            [greeting(), ehlo("PIPELINING"), *accept_message(1), ending],
            [greeting(), ehlo("PIPELINING"), *accept_message(1) * 2, quit_step()],
        ]
    )
    batch = messages(3)
    results = send_many_with(flavour, batch, **plain(server.port))
    assert [r.ok for r in results] == [True, True, True]
    assert [r.message_id for r in results] == [m.message_id for m in batch]
    first, second = (bytes(server.session(n).received) for n in (0, 1))
    assert b"Subject: m0" in first
    assert b"Subject: m0" not in second  # answered: never sent twice
    assert b"Subject: m1" in second
    assert b"Subject: m2" in second


def test_no_final_reply_on_a_fresh_connection_is_reported_not_resent_there(
    flavour: Flavour, scripted_server: ScriptedServerFactory
) -> None:
    server = scripted_server(
        [
            [
                greeting(),
                ehlo("PIPELINING"),
                *accept_message(1)[:-1],
                Step(expect=MESSAGE, reply=b"421 4.3.2 shutting down\r\n", action=Action.CLOSE),
            ],
            [greeting(), ehlo("PIPELINING"), *accept_message(1), quit_step()],
        ]
    )
    results = send_many_with(flavour, messages(2), **plain(server.port))
    first = results[0].recipients[0]
    assert first.outcome is Outcome.TRANSIENT
    assert first.reply is not None
    assert first.reply.code == 421
    assert "SessionRefused" in (first.reason or "")
    assert results[1].ok
    assert b"Subject: m0" not in bytes(server.session(1).received)


def test_a_refused_recipient_survives_the_session_ending(
    flavour: Flavour, scripted_server: ScriptedServerFactory
) -> None:
    server = scripted_server(
        [
            [
                greeting(),
                ehlo("PIPELINING"),
                Step(expect=r"MAIL FROM:.*", reply=b"250 2.1.0 Ok\r\n"),
                Step(expect=r"RCPT TO:<bob@.*", reply=b"550 5.1.1 no bob\r\n"),
                Step(expect=r"RCPT TO:<carol@.*", reply=b"250 2.1.5 Ok\r\n"),
                Step(expect="DATA", reply=b"421 4.3.2 bye\r\n", action=Action.CLOSE),
            ],
            [greeting(), ehlo("PIPELINING"), *accept_message(1), quit_step()],
        ]
    )
    batch = [make_message(to=("bob@example.com", "carol@example.org")), *messages(1)]
    results = send_many_with(flavour, batch, **plain(server.port))
    assert [r.outcome for r in results[0].recipients] == [Outcome.PERMANENT, Outcome.TRANSIENT]
    # The second message had not been answered at all: it went on a fresh connection.
    assert results[1].ok


def accept_rset() -> list[Step]:
    """RSET, answered positively."""
    return [Step(expect=r"RSET", reply=b"250 2.0.0 Ok\r\n")]


def accept_bdat_message() -> list[Step]:
    """MAIL, one RCPT and one ``BDAT n LAST`` chunk (RFC 3030), each answered positively."""
    return [
        Step(expect=r"MAIL FROM:<.*>.*", reply=b"250 2.1.0 Ok\r\n"),
        Step(expect=r"RCPT TO:<.*>.*", reply=b"250 2.1.5 Ok\r\n"),
        Step(expect=r"BDAT \d+ LAST", reply=b"250 2.0.0 Ok: queued\r\n"),
    ]


def test_a_bdat_window_with_a_421_in_the_middle_resends_the_rest(
    flavour: Flavour, scripted_server: ScriptedServerFactory
) -> None:
    offers = ehlo("PIPELINING", "CHUNKING")
    server = scripted_server(
        [
            [
                greeting(),
                offers,
                *accept_bdat_message(),
                # The second group starts with RSET (see below): the 421 answers it.
                Step(expect=r"RSET", reply=b"421 4.3.2 bye\r\n", action=Action.CLOSE),
            ],
            [
                greeting(),
                offers,
                *accept_bdat_message(),
                # Each later group starts with RSET: a refused BDAT LAST may leave the
                # server's transaction open (RFC 3030 §2).
                *(accept_rset() + accept_bdat_message()) * 2,
                quit_step(),
            ],
        ]
    )
    batch = messages(4)
    results = send_many_with(flavour, batch, **plain(server.port, chunking=True))
    assert [r.ok for r in results] == [True] * 4
    second = bytes(server.session(1).received)
    # The four went out together on the first connection (a window); only the one answered
    # there is not sent again.
    assert b"Subject: m0" not in second
    assert all(f"Subject: m{n}".encode() in second for n in (1, 2, 3))
