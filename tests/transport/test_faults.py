"""Both drivers against the scripted server: the faults a real server will not produce."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from mailrelay.errors import (
    ConnectError,
    ConnectionLost,
    DeliveryError,
    DeliveryTimeout,
    ServerProtocolError,
    SessionRefused,
    TLSError,
    TransportClosed,
)
from mailrelay.options import TLS, Timeouts
from mailrelay.results import Outcome
from mailrelay.transport import AsyncSMTPTransport, PoolSettings, SMTPTransport
from tests.peers.scripted import (
    ANY,
    MESSAGE,
    Action,
    ScriptedServerFactory,
    Step,
    accept_message,
    ehlo,
    free_port,
    greeting,
    quit_step,
)
from tests.peers.tls import TLSFiles
from tests.transport.helpers import (
    FLAVOURS,
    Flavour,
    make_message,
    run,
    send_each_with,
    send_many_with,
    send_with,
)

pytestmark = pytest.mark.parametrize("flavour", FLAVOURS)

FAST = Timeouts.all(5)


def plain(server_port: int, **kwargs: Any) -> dict[str, Any]:
    """Transport arguments for a plain-text scripted server."""
    return {"host": "127.0.0.1", "port": server_port, "tls": TLS.NONE, "timeouts": FAST, **kwargs}


def test_a_pipelined_transaction(flavour: Flavour, scripted_server: ScriptedServerFactory) -> None:
    server = scripted_server(
        [[greeting(), ehlo("PIPELINING", "8BITMIME"), *accept_message(2), quit_step()]]
    )
    result = send_with(flavour, make_message(), **plain(server.port))
    assert result.ok
    assert result.host == f"127.0.0.1:{server.port}"
    lines = server.session(0).lines
    assert lines[0].startswith(b"EHLO [127.0.0.1]")
    assert [line.split(b":")[0] for line in lines[1:5]] == [
        b"MAIL FROM",
        b"RCPT TO",
        b"RCPT TO",
        b"DATA",
    ]
    assert lines[-1] == b"QUIT"


def test_a_slow_reply_times_out_in_its_phase(
    flavour: Flavour, scripted_server: ScriptedServerFactory
) -> None:
    server = scripted_server(
        [[greeting(), ehlo(), Step(expect=r"MAIL FROM:.*", reply=b"250 ok\r\n", delay=3.0)]]
    )
    timeouts = Timeouts(connect=5, greeting=5, mail=0.3, rcpt=5)
    with pytest.raises(DeliveryTimeout, match="phase 'mail'") as caught:
        send_with(flavour, make_message(), **plain(server.port, timeouts=timeouts))
    assert caught.value.is_transient


def test_a_reply_slower_than_an_earlier_phase_limit_but_within_its_own_is_waited_for(
    flavour: Flavour, scripted_server: ScriptedServerFactory
) -> None:
    # The greeting's short limit passes while the MAIL reply is awaited under a longer one:
    # a read timer set for the earlier phase must not end this read.
    mail, *rest = accept_message(2)
    slow_mail = Step(expect=mail.expect, reply=mail.reply, delay=0.6)
    server = scripted_server([[greeting(), ehlo(), slow_mail, *rest, quit_step()]])
    timeouts = Timeouts(connect=5, greeting=0.3, mail=5, rcpt=5, data_init=5, data_end=5)
    result = send_with(flavour, make_message(), **plain(server.port, timeouts=timeouts))
    assert result.ok, result


def test_a_reply_sent_a_byte_at_a_time_cannot_stretch_its_phase_limit(
    flavour: Flavour, scripted_server: ScriptedServerFactory
) -> None:
    # Every byte comes well within the limit, the whole reply (30 bytes, 0.1 s apart) does
    # not: the limit bounds the wait for the reply, not each read (RFC 5321 §4.5.3.2).
    slow = Step(expect=r"MAIL FROM:.*", reply=b"250 2.1.0 sender ok, go ahead\r\n", dribble=0.1)
    server = scripted_server([[greeting(), ehlo(), slow]])
    timeouts = Timeouts(connect=5, greeting=5, mail=0.8, rcpt=5)
    with pytest.raises(DeliveryTimeout, match="phase 'mail'"):
        send_with(flavour, make_message(), **plain(server.port, timeouts=timeouts))


def test_a_batch_reply_sent_a_byte_at_a_time_cannot_stretch_its_phase_limit(
    flavour: Flavour, scripted_server: ScriptedServerFactory
) -> None:
    # The same in the middle of a pipelined batch (send_many reads its replies its own way).
    slow_data = Step(expect="DATA", reply=b"354 End data with <CR><LF>.<CR><LF>\r\n", dribble=0.1)
    server = scripted_server(
        [
            [
                greeting(),
                ehlo("PIPELINING"),
                Step(expect=r"MAIL FROM:<.*>.*", reply=b"250 2.1.0 Ok\r\n"),
                Step(expect=r"RCPT TO:<.*>.*", reply=b"250 2.1.5 Ok\r\n"),
                slow_data,
            ]
        ]
    )
    timeouts = Timeouts(connect=5, greeting=5, mail=0.8, rcpt=0.8, data_init=0.8)
    results = send_many_with(
        flavour,
        [make_message(to=("bob@example.com",)), make_message(to=("carol@example.com",))],
        **plain(server.port, timeouts=timeouts, pool=PoolSettings(size=1)),
    )
    assert [r.ok for r in results] == [False, False]
    # The first message's wait ran out (the group's replies are read in the "mail" phase);
    # the second found no server on a fresh connection (the script has one session).
    reason = results[0].recipients[0].reason or ""
    assert reason.startswith("DeliveryTimeout"), reason
    assert "phase 'mail'" in reason


def test_a_silent_server_times_out_at_the_greeting(
    flavour: Flavour, scripted_server: ScriptedServerFactory
) -> None:
    server = scripted_server([[Step(action=Action.SILENT, silence=3.0)]])
    timeouts = Timeouts(connect=0.5, greeting=0.3)
    with pytest.raises(DeliveryTimeout, match="phase 'greeting'"):
        send_with(flavour, make_message(), **plain(server.port, timeouts=timeouts))


def test_421_in_the_middle_of_a_pipelined_group(
    flavour: Flavour, scripted_server: ScriptedServerFactory
) -> None:
    server = scripted_server(
        [
            [
                greeting(),
                ehlo("PIPELINING"),
                Step(expect=r"MAIL FROM:.*", reply=b"250 2.1.0 ok\r\n"),
                Step(expect=r"RCPT TO:.*", reply=b"250 2.1.5 ok\r\n"),
                Step(
                    expect=r"RCPT TO:.*",
                    reply=b"421 4.3.2 shutting down\r\n",
                    action=Action.CLOSE,
                ),
            ]
        ]
    )
    with pytest.raises(SessionRefused) as caught:
        send_with(flavour, make_message(), **plain(server.port))
    assert caught.value.is_transient
    assert caught.value.reply is not None
    assert caught.value.reply.code == 421


def test_a_disconnect_in_the_middle_of_data(
    flavour: Flavour, scripted_server: ScriptedServerFactory
) -> None:
    server = scripted_server(
        [
            [
                greeting(),
                ehlo(),
                Step(expect=r"MAIL FROM:.*", reply=b"250 ok\r\n"),
                Step(expect=r"RCPT TO:.*", reply=b"250 ok\r\n"),
                Step(expect="DATA", reply=b"354 go\r\n"),
                Step(expect=ANY, action=Action.RESET),
            ]
        ]
    )
    big = make_message(to=("bob@example.com",), text="x" * 70 + "\n" * 1 + "line\n" * 50_000)
    with pytest.raises(ConnectionLost) as caught:
        send_with(flavour, big, **plain(server.port))
    assert caught.value.is_transient


def test_plaintext_injected_after_starttls_is_refused(
    flavour: Flavour, scripted_server: ScriptedServerFactory, tls_files: TLSFiles
) -> None:
    server = scripted_server(
        [
            [
                greeting(),
                ehlo("STARTTLS"),
                Step(
                    expect="STARTTLS",
                    reply=b"220 2.0.0 Ready\r\n250-injected\r\n250 AUTH PLAIN\r\n",
                    action=Action.START_TLS,
                ),
                Step(expect=ANY, reply=b"250 should never be reached\r\n"),
            ]
        ]
    )
    with pytest.raises((ServerProtocolError, TLSError)) as caught:
        send_with(
            flavour,
            make_message(),
            **plain(server.port, tls=TLS.STARTTLS, ssl_context=tls_files.client_context()),
        )
    assert (
        "220" in str(caught.value) or "STARTTLS" in str(caught.value) or "TLS" in str(caught.value)
    )
    session = server.session(0)
    # Nothing after STARTTLS: no EHLO, no MAIL went to the server.
    assert session.lines[-1] == b"STARTTLS"


def test_an_endless_reply_line_is_cut(
    flavour: Flavour, scripted_server: ScriptedServerFactory
) -> None:
    server = scripted_server([[Step(reply=b"220 ", action=Action.ENDLESS)]])
    with pytest.raises(ServerProtocolError, match="broke the protocol"):
        send_with(flavour, make_message(), **plain(server.port))
    assert "endless limit reached" not in server.session(0, timeout=10).events


def test_a_failed_tls_handshake(
    flavour: Flavour, scripted_server: ScriptedServerFactory, tls_files: TLSFiles
) -> None:
    server = scripted_server(
        [
            [
                greeting(),
                ehlo("STARTTLS"),
                Step(expect="STARTTLS", reply=b"220 go ahead\r\n", action=Action.FAIL_TLS),
            ]
        ]
    )
    with pytest.raises(TLSError, match="handshake"):
        send_with(
            flavour,
            make_message(),
            **plain(server.port, tls=TLS.STARTTLS, ssl_context=tls_files.client_context()),
        )


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit"])
def test_an_untrusted_certificate_is_a_permanent_tls_error(
    flavour: Flavour, scripted_server: ScriptedServerFactory, tls_files: TLSFiles, implicit: bool
) -> None:
    if implicit:
        server = scripted_server([[greeting(), quit_step()]], implicit_tls=True, tls="untrusted")
        policy = TLS.IMPLICIT
    else:
        server = scripted_server(
            [
                [
                    greeting(),
                    ehlo("STARTTLS"),
                    Step(expect="STARTTLS", reply=b"220 go ahead\r\n", action=Action.START_TLS),
                ]
            ],
            tls="untrusted",
        )
        policy = TLS.STARTTLS
    with pytest.raises(TLSError, match="verification") as caught:
        send_with(
            flavour,
            make_message(),
            **plain(server.port, tls=policy, ssl_context=tls_files.client_context()),
        )
    assert not caught.value.is_transient


def test_certificates_are_verified_by_default(
    flavour: Flavour, scripted_server: ScriptedServerFactory
) -> None:
    # The test CA is not in the system store: without ssl_context=, verification must fail.
    server = scripted_server([[greeting(), quit_step()]], implicit_tls=True)
    with pytest.raises(TLSError, match="verification"):
        send_with(flavour, make_message(), **plain(server.port, tls=TLS.IMPLICIT))


def test_starttls_required_but_not_offered(
    flavour: Flavour, scripted_server: ScriptedServerFactory
) -> None:
    server = scripted_server([[greeting(), ehlo("PIPELINING"), quit_step()]])
    with pytest.raises(TLSError, match="does not offer STARTTLS"):
        send_with(flavour, make_message(), **plain(server.port, tls=TLS.STARTTLS))


def test_starttls_against_an_implicit_tls_port_says_use_implicit(
    flavour: Flavour, scripted_server: ScriptedServerFactory, tls_files: TLSFiles
) -> None:
    server = scripted_server([[greeting(), quit_step()]], implicit_tls=True)
    timeouts = Timeouts(connect=2, greeting=0.5)
    with pytest.raises(TLSError, match=r"use TLS\.IMPLICIT") as caught:
        send_with(
            flavour,
            make_message(),
            **plain(
                server.port,
                tls=TLS.STARTTLS,
                timeouts=timeouts,
                ssl_context=tls_files.client_context(),
            ),
        )
    assert not caught.value.is_transient


def test_implicit_tls_against_a_plaintext_port_says_use_starttls(
    flavour: Flavour, scripted_server: ScriptedServerFactory, tls_files: TLSFiles
) -> None:
    server = scripted_server([[greeting(), Step(expect=ANY)]], tls=None)
    with pytest.raises(TLSError, match=r"use TLS\.STARTTLS") as caught:
        send_with(
            flavour,
            make_message(),
            **plain(server.port, tls=TLS.IMPLICIT, ssl_context=tls_files.client_context()),
        )
    assert not caught.value.is_transient


def test_nothing_listening_is_a_connect_error(flavour: Flavour) -> None:
    port = free_port()
    with pytest.raises(ConnectError, match=f"127.0.0.1:{port}") as caught:
        send_with(flavour, make_message(), **plain(port))
    assert caught.value.is_transient


@pytest.mark.parametrize(
    ("code", "transient"),
    [(socket.EAI_NONAME, False), (socket.EAI_AGAIN, True)],
    ids=["noname", "again"],
)
def test_a_name_that_does_not_resolve_is_a_connect_error(
    flavour: Flavour, monkeypatch: pytest.MonkeyPatch, code: int, transient: bool
) -> None:
    # No real lookup: tests talk to loopback only. The resolver's answer is simulated.
    def fail(host: str, *args: Any, **kwargs: Any) -> list[Any]:
        raise socket.gaierror(code, "simulated resolver failure")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    with pytest.raises(ConnectError, match=r"cannot resolve 'smtp\.example\.com'") as caught:
        send_with(flavour, make_message(), **plain(25, host="smtp.example.com"))
    assert caught.value.is_transient is transient


def second_message_steps() -> list[Step]:
    return [greeting(), ehlo("PIPELINING"), *accept_message(1), quit_step()]


@pytest.mark.parametrize(
    "death",
    [
        Step(expect=ANY, action=Action.CLOSE),
        Step(expect=ANY, reply=b"421 4.4.2 idle timeout\r\n", action=Action.CLOSE),
        Step(expect=ANY, action=Action.RESET),
    ],
    ids=["eof", "421", "reset"],
)
def test_a_dead_reused_connection_is_replaced_and_the_message_sent(
    flavour: Flavour, scripted_server: ScriptedServerFactory, death: Step
) -> None:
    server = scripted_server(
        [
            [greeting(), ehlo("PIPELINING"), *accept_message(1), death],
            second_message_steps(),
        ]
    )
    first = make_message(to=("bob@example.com",), subject="first")
    second = make_message(to=("bob@example.com",), subject="second")
    # Health checks off (a day): the dead connection is found while sending. One send at a
    # time, so the connection is idle (and dies) between the two.
    pool = PoolSettings(size=1, health_check_after=86400)
    results = send_each_with(flavour, [first, second], **plain(server.port, pool=pool))
    assert [r.ok for r in results] == [True, True]
    assert b"Subject: second" in bytes(server.session(1).received)


def test_a_noop_health_check_finds_a_dead_idle_connection(
    flavour: Flavour, scripted_server: ScriptedServerFactory
) -> None:
    server = scripted_server(
        [
            [
                greeting(),
                ehlo("PIPELINING"),
                *accept_message(1),
                Step(expect="NOOP", reply=b"421 4.4.2 closing\r\n", action=Action.CLOSE),
            ],
            second_message_steps(),
        ]
    )
    pool = PoolSettings(size=1, health_check_after=1e-9)
    messages = [make_message(to=("bob@example.com",), subject=s) for s in ("one", "two")]
    results = send_each_with(flavour, messages, **plain(server.port, pool=pool))
    assert [r.ok for r in results] == [True, True]
    assert server.session(0).lines[-1] == b"NOOP"
    # The second message never went to the dead connection.
    assert b"Subject: two" not in bytes(server.session(0).received)


@pytest.mark.parametrize(
    "unasked",
    [b"250 2.0.0 one reply too many\r\n", b"421 4.4.2 shutting down\r\n", b"garbage"],
    ids=["extra-reply", "421", "garbage"],
)
@pytest.mark.parametrize("health_check_after", [86400.0, 1e-9], ids=["reuse", "noop-check"])
def test_a_connection_the_server_spoke_on_while_idle_is_not_reused(
    flavour: Flavour,
    scripted_server: ScriptedServerFactory,
    unasked: bytes,
    health_check_after: float,
) -> None:
    # While the connection sits in the pool the server sends something nobody asked for,
    # and keeps the connection open. Reused, every reply after it would answer the wrong
    # command (the extra reply would be taken as MAIL's, or NOOP's): the transport must
    # drop it without sending anything more, and send the message on a fresh one.
    server = scripted_server(
        [
            [
                greeting(),
                ehlo("PIPELINING"),
                *accept_message(1),
                Step(reply=unasked, delay=0.05),
                *accept_message(1),
                quit_step(),
            ],
            second_message_steps(),
        ]
    )
    pool = PoolSettings(size=1, health_check_after=health_check_after)
    messages = [make_message(to=("bob@example.com",), subject=s) for s in ("one", "two")]
    results = send_each_with(flavour, messages, pause=0.5, **plain(server.port, pool=pool))
    assert [r.ok for r in results] == [True, True]
    lines = server.session(0).lines
    assert sum(line.startswith(b"MAIL") for line in lines) == 1
    assert b"NOOP" not in lines
    assert b"Subject: two" in bytes(server.session(1).received)


def test_a_noop_answered_twice_fails_the_health_check(
    flavour: Flavour, scripted_server: ScriptedServerFactory
) -> None:
    # The second reply came with the first: trusted, it would answer the next MAIL.
    server = scripted_server(
        [
            [
                greeting(),
                ehlo("PIPELINING"),
                *accept_message(1),
                Step(expect="NOOP", reply=b"250 2.0.0 Ok\r\n250 2.0.0 Ok again\r\n"),
                *accept_message(1),
                quit_step(),
            ],
            second_message_steps(),
        ]
    )
    pool = PoolSettings(size=1, health_check_after=1e-9)
    messages = [make_message(to=("bob@example.com",), subject=s) for s in ("one", "two")]
    results = send_each_with(flavour, messages, **plain(server.port, pool=pool))
    assert [r.ok for r in results] == [True, True]
    assert sum(line.startswith(b"MAIL") for line in server.session(0).lines) == 1
    assert b"Subject: two" in bytes(server.session(1).received)


def test_a_reply_after_the_ehlo_reply_fails_the_session_before_mail(
    flavour: Flavour, scripted_server: ScriptedServerFactory
) -> None:
    # A 550 nobody asked for, sent with the EHLO reply: read as MAIL's reply it would bounce
    # a message the server never saw. The session is refused as broken instead.
    server = scripted_server(
        [
            [
                greeting(),
                Step(
                    expect=r"EHLO .+",
                    reply=b"250-scripted\r\n250 PIPELINING\r\n550 5.7.1 nobody asked\r\n",
                ),
                *accept_message(1),
                quit_step(),
            ]
        ]
    )
    with pytest.raises(ServerProtocolError, match="while opening the session"):
        send_with(flavour, make_message(to=("bob@example.com",)), **plain(server.port))
    assert not any(line.startswith(b"MAIL") for line in server.session(0).lines)


@pytest.mark.parametrize("many", [False, True], ids=["send", "send_many"])
def test_a_reply_sent_with_the_354_is_not_taken_for_the_final_one(
    flavour: Flavour, scripted_server: ScriptedServerFactory, many: bool
) -> None:
    # The server sends a 250 with its 354, then refuses the message: read as the final
    # reply, that 250 would report a delivery the server never made. The message must not
    # be sent on a session that is out of step; it stays TRANSIENT (to try again).
    server = scripted_server(
        [
            [
                greeting(),
                ehlo("PIPELINING"),
                Step(expect=r"MAIL FROM:.*", reply=b"250 2.1.0 Ok\r\n"),
                Step(expect=r"RCPT TO:.*", reply=b"250 2.1.5 Ok\r\n"),
                Step(expect="DATA", reply=b"354 go ahead\r\n250 2.0.0 Ok: queued as EARLY\r\n"),
                Step(expect=MESSAGE, reply=b"550 5.7.1 refused after all\r\n"),
                quit_step(),
            ]
        ]
    )
    message = make_message(to=("bob@example.com",))
    sender = send_many_with if many else send_each_with
    (result,) = sender(flavour, [message], **plain(server.port))
    assert [r.outcome for r in result.recipients] == [Outcome.TRANSIENT]
    assert "354" in (result.recipients[0].reason or "")
    assert b"Subject: Hello" not in bytes(server.session(0).received)


def test_an_idle_tls_connection_is_reused(
    flavour: Flavour, scripted_server: ScriptedServerFactory, tls_files: TLSFiles
) -> None:
    # Over TLS the idle check reads without waiting (a TLS record may carry no data for
    # us); a quiet connection must come out of it usable, and the same session carry on.
    server = scripted_server(
        [
            [
                greeting(),
                ehlo("PIPELINING", "STARTTLS"),
                Step(expect="STARTTLS", reply=b"220 2.0.0 Ready\r\n", action=Action.START_TLS),
                ehlo("PIPELINING"),
                *accept_message(1),
                *accept_message(1),
                quit_step(),
            ]
        ]
    )
    pool = PoolSettings(size=1, health_check_after=86400)
    messages = [make_message(to=("bob@example.com",), subject=s) for s in ("one", "two")]
    results = send_each_with(
        flavour,
        messages,
        pause=0.2,
        **plain(server.port, pool=pool, tls=TLS.STARTTLS, ssl_context=tls_files.client_context()),
    )
    assert [r.ok for r in results] == [True, True]
    assert len(server.sessions) == 1
    assert b"Subject: two" in bytes(server.session(0).received)


def test_a_fresh_connection_failing_is_not_retried(
    flavour: Flavour, scripted_server: ScriptedServerFactory
) -> None:
    server = scripted_server(
        [
            [greeting(), ehlo(), Step(expect=r"MAIL FROM:.*", action=Action.CLOSE)],
            second_message_steps(),
        ]
    )
    with pytest.raises(ConnectionLost):
        send_with(flavour, make_message(to=("bob@example.com",)), **plain(server.port))
    assert len(server.sessions) == 1


def test_max_messages_per_connection(
    flavour: Flavour, scripted_server: ScriptedServerFactory
) -> None:
    one_message = [greeting(), ehlo("PIPELINING"), *accept_message(1), quit_step()]
    server = scripted_server([one_message, one_message, one_message])
    pool = PoolSettings(size=1, max_messages=1)
    messages = [make_message(to=("bob@example.com",), subject=str(n)) for n in range(3)]
    results = send_many_with(flavour, list(messages), **plain(server.port, pool=pool))
    assert all(r.ok for r in results)
    assert [server.session(n).lines[-1] for n in range(3)] == [b"QUIT"] * 3


def test_send_many_reports_a_failed_message_and_goes_on(
    flavour: Flavour, scripted_server: ScriptedServerFactory
) -> None:
    server = scripted_server(
        [
            [
                greeting(),
                ehlo(),
                *accept_message(1),
                Step(expect=r"MAIL FROM:.*", reply=b"421 4.3.2 bye\r\n", action=Action.CLOSE),
            ],
            [greeting(), Step(expect=ANY, action=Action.CLOSE)],  # the resend's connection dies too
            second_message_steps(),
        ]
    )
    pool = PoolSettings(size=1, health_check_after=86400)
    messages = [make_message(to=("bob@example.com",), subject=s) for s in ("a", "b", "c")]
    results = send_many_with(flavour, list(messages), **plain(server.port, pool=pool))
    assert results[0].ok
    assert [r.outcome for r in results[1].recipients] == [Outcome.TRANSIENT]
    assert results[1].recipients[0].reason is not None
    assert results[2].ok


def test_sending_on_a_closed_transport_raises_transport_closed(flavour: Flavour) -> None:
    settings = plain(free_port())  # nothing is ever connected to
    message = make_message()
    if flavour == "sync":
        transport = SMTPTransport(**settings)
        transport.close()
        with pytest.raises(TransportClosed, match="is closed"):
            transport.send(message)
        # Not a delivery failure: send_many raises instead of reporting failed results.
        with pytest.raises(TransportClosed) as caught:
            transport.send_many([message])
    else:

        async def main() -> None:
            transport = AsyncSMTPTransport(**settings)
            await transport.aclose()
            with pytest.raises(TransportClosed, match="is closed"):
                await transport.asend(message)
            with pytest.raises(TransportClosed) as caught:
                await transport.asend_many([message])
            assert not isinstance(caught.value, DeliveryError)

        run(main())
        return
    assert not isinstance(caught.value, DeliveryError)
