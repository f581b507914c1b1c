"""Text from outside is escaped where mailrelay logs it: a server's reply (or a DNS
record) with a CR, LF or escape sequence can neither forge a log line nor drive the
terminal that shows the log (mailrelay._shown)."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay._shown import Shown, printable
from mailrelay.errors import SessionRefused
from mailrelay.message import Message
from mailrelay.options import TLS, Timeouts
from mailrelay.reply import Reply
from mailrelay.transport import SMTPTransport
from mailrelay.transport.mx_plan import Target, Trail
from tests.peers.scripted import ScriptedServerFactory, Step, ehlo, greeting, quit_step

# Bare CR and LF (a forged log line), ESC (a terminal sequence), NUL, DEL.
HOSTILE = "no such user\r\n2026-11-29 INFO forged line\x1b[2J\x00\x7f"


def test_printable_escapes_what_is_not_printable_and_keeps_the_rest() -> None:
    assert printable("250 2.0.0 Ok: queued") == "250 2.0.0 Ok: queued"
    assert printable("Grüße, 日本") == "Grüße, 日本"
    assert printable("a\rb\nc\td\x1b[2Je\x00") == "a\\rb\\nc\\td\\x1b[2Je\\x00"


@given(st.text())
def test_printable_leaves_one_printable_line(text: str) -> None:
    shown = printable(text)
    assert shown.isprintable()
    assert len(shown) >= len(text)


def test_shown_formats_only_when_the_record_is() -> None:
    class Loud:
        formatted = 0

        def __str__(self) -> str:
            Loud.formatted += 1
            return "x\ry"

    log = logging.getLogger("mailrelay.test_shown")
    log.setLevel(logging.INFO)
    log.debug("%s", Shown(Loud()))  # below the level: never formatted
    assert Loud.formatted == 0
    assert str(Shown(Loud())) == "x\\ry"
    assert Loud.formatted == 1


def test_mx_delivery_logs_a_hostile_refusal_on_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="mailrelay")
    trail = Trail("example.org")
    target = Target(name="mx.example.org", address="192.0.2.1", port=25)
    reply = Reply.of(554, HOSTILE)
    trail.failed(target, SessionRefused(f"the server refused the session: {reply}", reply=reply))
    [record] = [r for r in caplog.records if "MX delivery" in r.getMessage()]
    message = record.getMessage()
    assert "forged line" in message  # the text is kept...
    assert message.isprintable()  # ...on one line, without control characters
    assert "\\r\\n" in message


def test_the_protocol_trace_escapes_a_hostile_reply(
    caplog: pytest.LogCaptureFixture, scripted_server: ScriptedServerFactory
) -> None:
    caplog.set_level(logging.DEBUG, logger="mailrelay")
    hostile = HOSTILE.replace("\r\n", "\r").encode()  # one line, with a bare CR in it
    server = scripted_server(
        [
            [
                greeting(),
                ehlo("PIPELINING"),
                Step(expect=r"MAIL FROM:<.*>.*", reply=b"250 2.1.0 Ok\r\n"),
                Step(expect=r"RCPT TO:<.*>.*", reply=b"550 5.1.1 " + hostile + b"\r\n"),
                quit_step(),
            ]
        ],
        tls=None,
    )
    message = Message.build(sender="a@example.com", to=["b@example.org"], subject="s", text="t\n")
    with SMTPTransport(
        "127.0.0.1", server.port, tls=TLS.NONE, timeouts=Timeouts.all(5)
    ) as transport:
        result = transport.send(message)
    # The result keeps the reply as the server sent it (the caller's data)...
    [recipient] = result.recipients
    assert recipient.reply is not None
    assert "\x1b" in recipient.reply.text
    # ...and the log shows it escaped.
    trace = [r.getMessage() for r in caplog.records if r.getMessage().startswith("<<< 550")]
    assert trace
    assert all(line.isprintable() for line in trace)
    assert "\\x1b[2J" in trace[0]
