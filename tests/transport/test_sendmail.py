"""SendmailTransport: the real Postfix sendmail of the test instance, and fake programs.

The fakes are small Python scripts written to ``tmp_path`` (run by ``sys.executable``): one
records its command line and standard input, others exit with a chosen status, hang, flood
standard error, or exit without reading the message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import signal
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailrelay.address import Address
from mailrelay.envelope import Envelope, Recipient
from mailrelay.errors import (
    ConfigurationError,
    ConnectError,
    DeliveryError,
    DeliveryTimeout,
    InvalidAddress,
    LocalMTAError,
)
from mailrelay.message import Message
from mailrelay.results import (
    DeliveryResult,
    Outcome,
    error_status,
)
from mailrelay.transport import sendmail
from mailrelay.transport.base import BatchItem
from mailrelay.transport.sendmail import OUTPUT_LIMIT, SendmailTransport, exit_is_transient
from tests.peers.postfix import PostfixInstance
from tests.transport.helpers import FLAVOURS, Flavour, make_message, run

ALICE = "alice@mailrelay.test"


# -- helpers -------------------------------------------------------------------------------


def fake(tmp_path: Path, body: str, name: str = "sendmail") -> Path:
    """An executable Python script at ``tmp_path / name`` running ``body``."""
    path = tmp_path / name
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


def recorder(tmp_path: Path) -> tuple[Path, Path]:
    """A fake that appends ``{"argv", "stdin"}`` per run to a JSON-lines log and exits 0
    (75 when the message holds ``PLEASE-FAIL``); returns the program and the log."""
    log = tmp_path / "runs.jsonl"
    program = fake(
        tmp_path,
        f"""
        import json, sys
        data = sys.stdin.buffer.read()
        with open({str(log)!r}, "a") as out:
            out.write(json.dumps({{"argv": sys.argv[1:], "stdin": data.decode("latin-1")}}) + "\\n")
        if b"PLEASE-FAIL" in data:
            sys.stderr.write("queue file write error\\n")
            sys.exit(75)
        """,
    )
    return program, log


def runs(log: Path) -> list[dict[str, Any]]:
    """What the recorder saw, one dict per run."""
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def stdin_of(run_: dict[str, Any]) -> bytes:
    return str(run_["stdin"]).encode("latin-1")


def send(
    flavour: Flavour,
    transport: SendmailTransport,
    message: Message,
    envelope: Envelope | None = None,
) -> DeliveryResult:
    if flavour == "sync":
        with transport:
            return transport.send(message, envelope)

    async def main() -> DeliveryResult:
        async with transport:
            return await transport.asend(message, envelope)

    return run(main())


def send_many(
    flavour: Flavour, transport: SendmailTransport, items: list[BatchItem]
) -> list[DeliveryResult]:
    if flavour == "sync":
        return transport.send_many(items)
    return run(transport.asend_many(items))


def failure(
    flavour: Flavour,
    transport: SendmailTransport,
    message: Message,
    envelope: Envelope | None = None,
) -> DeliveryError:
    with pytest.raises(DeliveryError) as info:
        send(flavour, transport, message, envelope)
    return info.value


def lf(message: Message) -> bytes:
    return message.as_bytes().replace(b"\r\n", b"\n")


def big_message(size: int, **kwargs: Any) -> Message:
    """A message with a body of about ``size`` bytes, lines of 76 characters."""
    line = "0123456789" * 7 + "abcdef\n"
    return make_message(text=line * (size // len(line) + 1), **kwargs)


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


# -- construction --------------------------------------------------------------------------


def test_the_program_is_looked_up_at_construction(tmp_path: Path) -> None:
    program, _ = recorder(tmp_path)
    transport = SendmailTransport(program, arguments=["-C", "/etc/x"], timeout=5)
    assert transport.command == str(program)
    assert transport.arguments == ("-C", "/etc/x")
    assert transport.timeout == 5.0
    assert str(program) in repr(transport)
    # A bare name is found on PATH (python is, wherever the venv is).
    assert SendmailTransport(Path(sys.executable).name).command.endswith(Path(sys.executable).name)


def test_the_default_is_usr_sbin_sendmail() -> None:
    # Postfix is installed here (the test peer needs it).
    assert SendmailTransport().command == "/usr/sbin/sendmail"


@pytest.mark.parametrize(
    ("command", "kwargs", "needle"),
    [
        ("/nonexistent/sendmail", {}, "does not exist or is not executable"),
        ("", {}, "does not exist"),
        ("NOT-EXECUTABLE", {}, "not executable"),
        ("OK", {"arguments": "-C /etc/postfix"}, "sequence of strings"),
        ("OK", {"arguments": ["-C", b"/etc"]}, "sequence of strings"),
        ("OK", {"arguments": ["-C", "/etc\0x"]}, "without NUL"),
        ("OK", {"timeout": 0}, "positive number"),
        ("OK", {"timeout": -1.0}, "positive number"),
        ("OK", {"timeout": float("nan")}, "positive number"),
        ("OK", {"timeout": float("inf")}, "positive number"),
        ("OK", {"timeout": True}, "positive number"),
        ("OK", {"timeout": "10"}, "positive number"),
    ],
)
def test_bad_configuration_is_refused(
    tmp_path: Path, command: str, kwargs: dict[str, Any], needle: str
) -> None:
    program, _ = recorder(tmp_path)
    if command == "OK":
        command = str(program)
    elif command == "NOT-EXECUTABLE":
        command = str(tmp_path / "plain")
        Path(command).write_text("#!/bin/sh\n")
    with pytest.raises(ConfigurationError, match=needle):
        SendmailTransport(command, **kwargs)


# -- the command line and the bytes --------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_command_line_and_message_bytes(flavour: Flavour, tmp_path: Path) -> None:
    program, log = recorder(tmp_path)
    message = Message.build(
        sender="alice@example.com",
        to=["bob@example.com"],
        bcc=["hidden@example.org"],
        subject="dots",
        text="first\n.\n..\n.. two dots\nlast\n",
    )
    transport = SendmailTransport(program, arguments=["-C", "/etc/postfix-out"])
    result = send(flavour, transport, message)

    assert result.ok
    assert [r.address for r in result.recipients] == [
        Address.parse("bob@example.com"),
        Address.parse("hidden@example.org"),
    ]
    for recipient in result.recipients:
        assert recipient.reply is not None
        assert recipient.reply.code == 250
        assert recipient.reason is not None
        assert "queued" in recipient.reason
        assert "not yet delivered" in recipient.reason
    assert result.message_id == message.message_id
    (seen,) = runs(log)
    assert seen["argv"] == [
        "-C",
        "/etc/postfix-out",
        "-i",
        "-f",
        "alice@example.com",
        "--",
        "bob@example.com",
        "hidden@example.org",
    ]
    # LF line ends, no dot-stuffing, the lone "." line kept (-i), Bcc not on the wire.
    assert stdin_of(seen) == lf(message)
    assert b"\r" not in stdin_of(seen)
    assert b"hidden@example.org" not in stdin_of(seen)


@pytest.mark.parametrize(
    ("envelope", "expected"),
    [
        (Envelope(None, ["bob@example.com"]), ["-i", "-f", "<>", "--", "bob@example.com"]),
        (
            Envelope("a@example.com", ["b@example.com"], ret="HDRS", envid="id 42+x"),
            ["-i", "-f", "a@example.com", "-Rhdrs", "-Vid 42+x", "--", "b@example.com"],
        ),
        (
            Envelope("a@example.com", ["b@example.com"], ret="FULL", notify="SUCCESS,FAILURE"),
            ["-i", "-f", "a@example.com", "-Rfull", "-Nsuccess,failure", "--", "b@example.com"],
        ),
        (
            Envelope("a@example.com", ["b@example.com"], notify="NEVER"),
            ["-i", "-f", "a@example.com", "-Nnever", "--", "b@example.com"],
        ),
        (
            Envelope("a@example.com", ["b@example.com"], notify="DELAY,FAILURE,SUCCESS"),
            ["-i", "-f", "a@example.com", "-Nsuccess,failure,delay", "--", "b@example.com"],
        ),
        # A-label domains; address literals as they are.
        (
            Envelope("a@bücher.example", ["x@[192.0.2.1]", "y@[IPv6:2001:db8::1]"]),
            ["-i", "-f", "a@xn--bcher-kva.example", "--", "x@[192.0.2.1]", "y@[IPv6:2001:db8::1]"],
        ),
        # A non-ASCII local part stays UTF-8; its domain still goes as A-labels.
        (
            Envelope("jörg@bücher.example", ["b@example.com"]),
            ["-i", "-f", "jörg@xn--bcher-kva.example", "--", "b@example.com"],
        ),
        # atext specials are plain text for a sendmail program.
        (
            Envelope("a@example.com", ["o'neil+tag@example.com", "a|b=c@example.com"]),
            ["-i", "-f", "a@example.com", "--", "o'neil+tag@example.com", "a|b=c@example.com"],
        ),
    ],
)
def test_envelope_options(tmp_path: Path, envelope: Envelope, expected: list[str]) -> None:
    program, log = recorder(tmp_path)
    result = SendmailTransport(program).send(make_message(), envelope)
    assert result.ok
    (seen,) = runs(log)
    assert seen["argv"] == expected


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_recipients_asking_for_different_notify_go_in_one_process_each(
    flavour: Flavour, tmp_path: Path
) -> None:
    program, log = recorder(tmp_path)
    envelope = Envelope(
        "a@example.com",
        [
            Recipient("one@example.com", notify="SUCCESS"),
            Recipient("two@example.com"),
            Recipient("three@example.com", notify="SUCCESS"),
        ],
    )
    result = send(flavour, SendmailTransport(program), make_message(), envelope)
    assert result.ok
    assert [str(r.address) for r in result.recipients] == [
        "one@example.com",
        "two@example.com",
        "three@example.com",
    ]
    assert [seen["argv"] for seen in runs(log)] == [
        [
            "-i",
            "-f",
            "a@example.com",
            "-Nsuccess",
            "--",
            "one@example.com",
            "three@example.com",
        ],
        ["-i", "-f", "a@example.com", "--", "two@example.com"],
    ]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_one_notify_group_failing_does_not_hide_the_queued_one(
    flavour: Flavour, tmp_path: Path
) -> None:
    # The fake fails the run that gets "-Nnever" (so the second group).
    log = tmp_path / "runs.jsonl"
    program = fake(
        tmp_path,
        f"""
        import sys
        sys.stdin.buffer.read()
        open({str(log)!r}, "a").write(" ".join(sys.argv[1:]) + "\\n")
        sys.exit(67 if "-Nnever" in sys.argv else 0)
        """,
    )
    envelope = Envelope(
        "a@example.com",
        [Recipient("one@example.com"), Recipient("two@example.com", notify="NEVER")],
    )
    result = send(flavour, SendmailTransport(program), make_message(), envelope)
    assert [r.outcome for r in result.recipients] == [Outcome.ACCEPTED, Outcome.PERMANENT]
    reason = result.recipients[1].reason
    assert reason is not None
    assert reason.startswith("LocalMTAError:")
    assert "EX_NOUSER" in reason
    assert str(result.recipients[1].enhanced) == "5.1.1"  # as Sendmail reports EX_NOUSER
    assert len(log.read_text().splitlines()) == 2


# -- addresses that are refused before anything runs ---------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize(
    "bad",
    ["-oQ/tmp@example.com", "-bs@example.com", '"a b"@example.com', '"a,b"@example.com'],
)
def test_unsafe_recipients_are_refused_and_the_others_sent(
    flavour: Flavour, tmp_path: Path, bad: str
) -> None:
    program, log = recorder(tmp_path)
    envelope = Envelope("a@example.com", ["ok@example.com", bad])
    result = send(flavour, SendmailTransport(program), make_message(), envelope)
    assert [r.outcome for r in result.recipients] == [Outcome.ACCEPTED, Outcome.PERMANENT]
    refused = result.recipients[1]
    assert refused.address == Address.parse(bad)
    assert refused.reply is None
    assert refused.reason is not None
    assert "not passed to the sendmail program" in refused.reason
    (seen,) = runs(log)
    assert seen["argv"] == ["-i", "-f", "a@example.com", "--", "ok@example.com"]


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize(
    ("envelope", "needle", "kwargs"),
    [
        (Envelope("-f@example.com", ["b@example.com"]), "could be read as an option", {}),
        (Envelope('"x y"@example.com', ["b@example.com"]), "address syntax", {}),
        (Envelope("a@example.com", ["-b@example.com"]), "could be read as an option", {}),
        (Envelope("a@example.com", ["b@example.com"], requiretls=True), "REQUIRETLS", {}),
        (Envelope("a@example.com", ["jörg@example.com"]), "SMTPUTF8", {"smtputf8": False}),
        (Envelope("jörg@example.com", ["b@example.com"]), "SMTPUTF8", {"smtputf8": False}),
    ],
)
def test_nothing_runs_when_no_recipient_can_be_handed_over(
    flavour: Flavour,
    tmp_path: Path,
    envelope: Envelope,
    needle: str,
    kwargs: dict[str, Any],
) -> None:
    program, log = recorder(tmp_path)
    result = send(flavour, SendmailTransport(program, **kwargs), make_message(), envelope)
    assert result.rejected == result.recipients
    for refused in result.recipients:
        assert refused.reason is not None
        assert needle in refused.reason
    assert runs(log) == []


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    local=st.text(
        st.characters(min_codepoint=0x20, max_codepoint=0x17F, blacklist_characters="\x7f"),
        min_size=1,
        max_size=12,
    ),
    smtputf8=st.booleans(),
)
def test_property_every_argument_after_the_options_is_a_safe_recipient(
    tmp_path: Path, local: str, smtputf8: bool
) -> None:
    """Whatever the local part: refused with a reason, or passed after "--" exactly as its
    dot-atom form, never starting with "-" and holding no address syntax."""
    try:
        address = Address.parse(f'"{local}"@example.com')
    except InvalidAddress:
        return
    program, _ = recorder(tmp_path)
    transport = SendmailTransport(program, smtputf8=smtputf8)
    # The planning step only: no process per example.
    plan = transport._plan(Envelope("a@example.com", [address]))
    if plan.final[0] is not None:
        assert plan.final[0].outcome is Outcome.PERMANENT
        assert not plan.groups
        return
    ((positions, argv),) = plan.groups
    assert positions == [0]
    tail = argv[argv.index("--") + 1 :]
    assert tail == [str(address)]
    assert not tail[0].startswith("-")
    assert not set(tail[0]) & set(' \t"(),:;<>[]\\')
    assert smtputf8 or tail[0].isascii()


# -- exit statuses -------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize(
    ("status", "transient", "name", "enhanced"),
    [
        # The RFC 3463 statuses are those Sendmail reports a mailer's exit status with.
        (75, True, "EX_TEMPFAIL", "4.2.0"),
        (71, True, "EX_OSERR", "4.5.0"),
        (74, True, "EX_IOERR", "4.5.0"),
        (64, False, "EX_USAGE", "5.5.4"),
        (65, False, "EX_DATAERR", "5.5.2"),
        (67, False, "EX_NOUSER", "5.1.1"),
        (68, False, "EX_NOHOST", "5.1.2"),
        (69, False, "EX_UNAVAILABLE", "5.5.0"),
        (77, False, "EX_NOPERM", "5.3.0"),
        (78, False, "EX_CONFIG", "5.5.0"),
        (1, True, "status 1", None),
        (99, True, "status 99", None),
    ],
)
def test_exit_statuses(
    flavour: Flavour,
    tmp_path: Path,
    status: int,
    transient: bool,
    name: str,
    *,
    enhanced: str | None,
) -> None:
    program = fake(
        tmp_path,
        f"""
        import sys
        sys.stdin.buffer.read()
        sys.stderr.write("sendmail: fatal: something about \\xe9 (status {status})\\n")
        sys.exit({status})
        """,
    )
    error = failure(flavour, SendmailTransport(program), make_message())
    assert isinstance(error, LocalMTAError)
    assert error.exit_status == status
    assert error.is_transient is transient
    assert exit_is_transient(status) is transient
    assert name in str(error)
    assert f"something about é (status {status})" in str(error)
    assert str(program) in str(error)
    found = error_status(error)
    assert (None if found is None else str(found)) == enhanced


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_killed_by_a_signal_is_transient(flavour: Flavour, tmp_path: Path) -> None:
    program = fake(
        tmp_path,
        """
        import os, signal, sys
        sys.stdin.buffer.read()
        os.kill(os.getpid(), signal.SIGSEGV)
        """,
    )
    error = failure(flavour, SendmailTransport(program), make_message())
    assert isinstance(error, LocalMTAError)
    assert error.exit_status == -signal.SIGSEGV
    assert error.is_transient
    assert "killed by SIGSEGV" in str(error)


def test_local_mta_error_pickles() -> None:
    error = LocalMTAError("sendmail exited with status 75", is_transient=True, exit_status=75)
    assert pickle.loads(pickle.dumps(error)) == error
    assert isinstance(error, DeliveryError)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_send_many_keeps_going_after_a_failed_message(flavour: Flavour, tmp_path: Path) -> None:
    program, log = recorder(tmp_path)
    good = make_message(subject="one")
    bad = make_message(subject="two", text="PLEASE-FAIL\n")
    last = make_message(subject="three")
    results = send_many(flavour, SendmailTransport(program), [good, bad, last])
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].deferred == results[1].recipients
    assert isinstance(results[1].error, LocalMTAError)
    assert "queue file write error" in str(results[1].error)
    assert [stdin_of(seen) for seen in runs(log)] == [lf(good), lf(bad), lf(last)]


# -- hostile and broken programs -----------------------------------------------------------


@pytest.fixture
def short_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sendmail, "TERMINATE_GRACE", 0.5)


@pytest.mark.usefixtures("short_grace")
@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("ignores_sigterm", [False, True])
@pytest.mark.parametrize("reads", [False, True])
def test_a_hung_program_is_killed_and_the_send_times_out(
    flavour: Flavour, tmp_path: Path, ignores_sigterm: bool, reads: bool
) -> None:
    pid_file = tmp_path / "pid"
    program = fake(
        tmp_path,
        f"""
        import os, signal, sys, time
        if {ignores_sigterm}:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        open({str(pid_file)!r}, "w").write(str(os.getpid()))
        if {reads}:
            sys.stdin.buffer.read()
        time.sleep(60)
        """,
    )
    # 1 MB: more than a pipe holds, so a program that does not read blocks our writes.
    error = failure(flavour, SendmailTransport(program, timeout=2.0), big_message(1_000_000))
    assert isinstance(error, DeliveryTimeout)
    assert error.is_transient
    assert "did not finish within 2 s" in str(error)
    # (On a machine loaded enough, the fake may be killed before it wrote its PID.)
    if pid_file.exists() and pid_file.read_text():
        assert not alive(int(pid_file.read_text()))


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("stream", ["stderr", "stdout"])
def test_megabytes_of_output_are_read_but_not_kept(
    flavour: Flavour, tmp_path: Path, stream: str
) -> None:
    program = fake(
        tmp_path,
        f"""
        import sys
        sys.stdin.buffer.read()
        for _ in range(64):
            sys.{stream}.write("x" * 131072)
        sys.{stream}.flush()
        sys.exit(75)
        """,
    )
    error = failure(flavour, SendmailTransport(program), make_message())
    assert isinstance(error, LocalMTAError)
    assert error.exit_status == 75
    assert "[output truncated]" in str(error)
    assert "xxxx" in str(error)
    assert len(str(error)) < OUTPUT_LIMIT


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_megabytes_of_output_do_not_block_a_successful_hand_over(
    flavour: Flavour, tmp_path: Path
) -> None:
    program = fake(
        tmp_path,
        """
        import sys
        for _ in range(32):
            sys.stderr.write("warning: " + "y" * 131072 + "\\n")
            sys.stdout.write("z" * 131072)
        sys.stdin.buffer.read()
        """,
    )
    result = send(flavour, SendmailTransport(program, timeout=30), big_message(500_000))
    assert result.ok


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("status", [0, 1, 75])
def test_a_program_that_exits_without_reading_the_message(
    flavour: Flavour, tmp_path: Path, status: int
) -> None:
    program = fake(
        tmp_path,
        f"""
        import sys
        sys.stderr.write("bye\\n")
        sys.exit({status})
        """,
    )
    error = failure(flavour, SendmailTransport(program, timeout=30), big_message(2_000_000))
    assert isinstance(error, LocalMTAError)
    assert "before reading the whole message" in str(error)
    assert "bye" in str(error)
    assert error.is_transient
    assert error.exit_status == (None if status == 0 else status)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_program_gone_at_send_time_is_a_connect_error(flavour: Flavour, tmp_path: Path) -> None:
    program, _ = recorder(tmp_path)
    transport = SendmailTransport(program)
    program.unlink()
    error = failure(flavour, transport, make_message())
    assert isinstance(error, ConnectError)
    assert error.is_transient
    assert "could not start" in str(error)


def test_a_cancelled_asend_stops_the_program(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    program = fake(
        tmp_path,
        f"""
        import os, sys, time
        open({str(pid_file)!r}, "w").write(str(os.getpid()))
        sys.stdin.buffer.read()
        time.sleep(60)
        """,
    )

    async def main() -> None:
        transport = SendmailTransport(program, timeout=60)
        task = asyncio.ensure_future(transport.asend(make_message()))
        for _ in range(200):  # up to 10 s for the fake to start
            if pid_file.exists() and pid_file.read_text():
                break
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())
    assert not alive(int(pid_file.read_text()))


# -- the real Postfix sendmail -------------------------------------------------------------


def postfix_transport(postfix: PostfixInstance, **kwargs: Any) -> SendmailTransport:
    """Postfix's sendmail, queueing into the test instance (``-C`` its config directory)."""
    return SendmailTransport(arguments=["-C", str(postfix.etc)], timeout=30, **kwargs)


def unique(**kwargs: Any) -> Message:
    fields: dict[str, Any] = {
        "sender": "carol@mailrelay.test",
        "to": [ALICE],
        "subject": f"sendmail {uuid.uuid4().hex}",
        "text": "Hello Alice,\n.\n..a line starting with two dots\n.x\n\nBye.\n",
    }
    fields.update(kwargs)
    return Message.build(**fields)


def marker(message: Message) -> bytes:
    assert message.message_id is not None
    return f"<{message.message_id}>".encode()


@pytest.mark.postfix
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_postfix_queues_and_delivers_the_message_intact(
    flavour: Flavour, postfix: PostfixInstance
) -> None:
    message = unique()
    result = send(flavour, postfix_transport(postfix), message)
    assert result.ok
    copy = postfix.wait_for_message("alice", marker(message))
    assert copy.startswith(b"Return-Path: <carol@mailrelay.test>\n")
    # Postfix prepends its trace headers and stores LF line ends; the rest is ours.
    assert copy.endswith(lf(message))


@pytest.mark.postfix
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_postfix_streams_a_large_message(flavour: Flavour, postfix: PostfixInstance) -> None:
    message = big_message(3_000_000, sender="carol@mailrelay.test", to=(ALICE,))
    result = send(flavour, postfix_transport(postfix), message)
    assert result.ok
    copy = postfix.wait_for_message("alice", marker(message), timeout=30)
    assert copy.endswith(lf(message))


@pytest.mark.postfix
@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize(
    ("sender", "return_path"),
    [(None, b"<>"), ("jörg@mailrelay.test", "<jörg@mailrelay.test>".encode())],
)
def test_postfix_null_and_utf8_senders(
    flavour: Flavour, postfix: PostfixInstance, sender: str | None, return_path: bytes
) -> None:
    message = unique()
    result = send(flavour, postfix_transport(postfix), message, Envelope(sender, [ALICE]))
    assert result.ok
    copy = postfix.wait_for_message("alice", marker(message))
    assert copy.startswith(b"Return-Path: " + return_path + b"\n")


@pytest.mark.postfix
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_postfix_honours_notify_ret_and_envid(flavour: Flavour, postfix: PostfixInstance) -> None:
    """NOTIFY=SUCCESS: Postfix sends bob a "delivered" DSN with our ENVID and (RET=HDRS)
    only the original's header."""
    message = unique(sender="bob@mailrelay.test")
    envid = f"sendmail-{uuid.uuid4().hex[:12]}"
    envelope = Envelope(
        "bob@mailrelay.test", [ALICE], ret="HDRS", envid=envid, notify="SUCCESS,FAILURE"
    )
    assert send(flavour, postfix_transport(postfix), message, envelope).ok
    postfix.wait_for_message("alice", marker(message))
    dsn = postfix.wait_for_message("bob", f"Original-Envelope-Id: {envid}".encode())
    assert b"Action: delivered" in dsn
    assert b"text/rfc822-headers" in dsn
    assert marker(message) in dsn
    assert b"Hello Alice" not in dsn


@pytest.mark.postfix
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_postfix_send_many(flavour: Flavour, postfix: PostfixInstance) -> None:
    messages = [unique() for _ in range(3)]
    items: list[BatchItem] = list(messages)
    results = send_many(flavour, postfix_transport(postfix), items)
    assert [r.ok for r in results] == [True, True, True]
    for message in messages:
        assert postfix.wait_for_message("alice", marker(message)).endswith(lf(message))


@pytest.mark.postfix
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_postfix_tempfail_carries_its_stderr(
    flavour: Flavour, postfix: PostfixInstance, tmp_path: Path
) -> None:
    """Postfix's sendmail exits 75 (EX_TEMPFAIL) for its fatal errors, here a configuration
    directory without main.cf."""
    transport = SendmailTransport(arguments=["-C", str(tmp_path)], timeout=30)
    error = failure(flavour, transport, unique())
    assert isinstance(error, LocalMTAError)
    assert error.exit_status == 75
    assert error.is_transient
    assert f"open {tmp_path}/main.cf" in str(error)
    assert os.path.exists(postfix.etc / "main.cf")


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_child_holding_the_pipes_open_does_not_hold_the_send(
    flavour: Flavour, tmp_path: Path
) -> None:
    """The program exits at once but leaves a child with its stdout and stderr: the send
    ends with the program (after EXIT_GRACE), not with the child, and does not time out."""
    pid_file = tmp_path / "child"
    program = fake(
        tmp_path,
        f"""
        import subprocess, sys
        sys.stdin.buffer.read()
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(8)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        """,
    )
    # Waiting for the child (8 s) would outlast the timeout.
    result = send(flavour, SendmailTransport(program, timeout=6), make_message())
    assert result.ok
    # The child was not ours to stop: it is still there (it ends by itself).
    assert alive(int(pid_file.read_text()))


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_what_a_successful_program_says_is_logged(
    flavour: Flavour, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    program = fake(
        tmp_path,
        """
        import sys
        sys.stdin.buffer.read()
        sys.stderr.write("sendmail: warning: bad -N option value -- ignored\\n")
        """,
    )
    with caplog.at_level(logging.WARNING, logger="mailrelay.transport.sendmail"):
        assert send(flavour, SendmailTransport(program), make_message()).ok
    assert "bad -N option value -- ignored" in caplog.text
