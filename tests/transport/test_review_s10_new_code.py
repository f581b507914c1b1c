"""Session-10 review of the day's transport code: findings reproduced, then fixed.

Findings (each test failed before its fix):

* ``send_many`` / ``asend_many`` left a message's recipients refused as one too many
  (RFC 5321 §4.5.3.1.10) TRANSIENT, unsent, when the session ended before the batch
  could send them in another transaction (a pipelined next message met a 421): the
  continuation on another connection ran only when the session counted a split
  message, and this path does not count one.
* Recipients refused as one too many and sent in a further transaction on the same
  session kept their first "too many" result when that transaction then failed after its
  data went out (its final reply lost to end of file or a timeout, after DATA or BDAT):
  the transports took them for never-sent recipients and sent them again on another
  connection, a second delivery to each of them (SMTP and LMTP alike). Fixed in
  mailrelay/flow/transaction.py (_Delivery._in_parts) by the lead.
* SendmailTransport (blocking): a program that exited 0 without reading the message,
  leaving a child that held its standard input unread, was taken for a success once
  EXIT_GRACE had passed: the message was never handed over. Now a transient
  LocalMTAError ("before reading the whole message"); asend gives the same at
  EXIT_GRACE instead of waiting for the child (or the timeout) on a blocked write.
* SendmailTransport.asend past its timeout (or cancelled) never ended while a child of
  the killed program held its standard output: stopping the program waited on
  ``Process.wait()``, which also waits for every pipe to close. It now waits for the
  exit status and closes the pipes.
* SendmailTransport: an envelope whose recipients overflow the system's ARG_MAX (80,000
  recipients on Linux) could never be handed over (E2BIG: a transient ConnectError at
  every retry). The recipients now go in runs of at most 128 KiB of command line.
* SendmailTransport with Exim as the sendmail program (Debian's default MTA): NOTIFY
  went as ``-N success,failure``, and Exim reads a lone ``-N`` as its "do not deliver"
  option (allowed to any caller submitting a message): exit 0, every recipient
  ACCEPTED, the message never delivered. ``-R`` and ``-V`` (a queue run, an unknown
  option there) made every such message fail for ever. DSN values are now attached
  (``-Nsuccess,failure``: one form for getopt programs, a loud refusal from an Exim not
  recognised), and a program whose real name starts with ``exim`` gets no DSN options.
* (Held:) split messages in a batch meeting an unannounced per-connection MAIL cap (421)
  are never delivered twice, through both drivers, SMTP and LMTP, and pools of 1 and 4;
  the recipients of a part whose MAIL met the 421 stay TRANSIENT though the server never
  took the message for them (not sent on: flow/transaction.py gives them the 421's
  error, not the "session ended" reason that would send them on another connection).
* (Held:) MX delivery finishes a split message on the next exchanger when the first one
  refuses the rest (421 to MAIL), each recipient once, in envelope order, each naming
  the exchanger that took it (both transports).
* (Held, and kept by the fixes above:) past the timeout, a running program is stopped
  with its standard input still open, never given an end of file that would let it
  queue a truncated message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import textwrap
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP
from aiosmtpd.smtp import Envelope as ServerEnvelope
from aiosmtpd.smtp import Session as ServerSession

from mailrelay.envelope import Envelope, Recipient
from mailrelay.errors import DeliveryTimeout, LocalMTAError
from mailrelay.flow.bookkeeping import TOO_MANY_REASON
from mailrelay.message import Message
from mailrelay.options import TLS, Timeouts
from mailrelay.results import DeliveryResult, Outcome
from mailrelay.testing.server import ReceivedMessage, SMTPTestServer
from mailrelay.transport import sendmail
from mailrelay.transport.mx import MXTransport
from mailrelay.transport.mx_async import AsyncMXTransport
from mailrelay.transport.sendmail import SendmailTransport
from mailrelay.transport.settings import PoolSettings
from tests.peers.aiosmtpd_server import HOSTNAME
from tests.peers.scripted import free_port
from tests.peers.unbound import UnboundServer
from tests.transport.helpers import FLAVOURS, Flavour, run, send_many_with, send_with
from tests.transport.test_recipient_limits import LimitsHandler, received, serving


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


class LostAfterSecondData(UnannouncedLimits):
    """Takes each session's second message and closes the connection instead of replying
    (the final reply is lost after the server has the message)."""

    def __init__(self, *, rcpt_max: int) -> None:
        super().__init__(rcpt_max=rcpt_max)
        # By the session object itself: an id() could be reused by the next connection's.
        self.data_per_session: Counter[object] = Counter()

    async def handle_DATA(
        self, server: SMTP, session: ServerSession, envelope: ServerEnvelope
    ) -> str:
        reply = await super().handle_DATA(server, session, envelope)
        self.data_per_session[session] += 1
        if self.data_per_session[session] == 2 and server.transport is not None:
            server.transport.close()
        return reply


# The fix is in mailrelay/flow/transaction.py (_Delivery._in_parts): when the failed
# part's data went out unanswered, that part's recipients do not keep an earlier "too
# many" result.
@pytest.mark.parametrize("lmtp", [False, True])
@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_recipients_retried_in_a_lost_transaction_are_not_sent_again(
    flavour: Flavour, batch: bool, lmtp: bool
) -> None:
    handler = LostAfterSecondData(rcpt_max=2)
    to = [f"a{i}@example.net" for i in range(4)]
    with serving(handler, lmtp=lmtp) as port:
        if batch:
            [result] = send_many_with(flavour, [tagged(to)], lmtp=lmtp, **options(port, 1))
        else:
            result = send_with(flavour, tagged(to), lmtp=lmtp, **options(port, 1))
    assert max(received(handler).values()) == 1, received(handler)  # never twice
    assert [r.outcome for r in result.recipients[:2]] == [Outcome.ACCEPTED] * 2
    # The server may have the message for these two: TRANSIENT, for the caller to decide.
    assert [r.outcome for r in result.recipients[2:]] == [Outcome.TRANSIENT] * 2
    assert all(r.reason != TOO_MANY_REASON for r in result.recipients)


# -- SendmailTransport -----------------------------------------------------------------------


def fake_program(tmp_path: Path, body: str) -> Path:
    """An executable Python script at ``tmp_path / "sendmail"`` running ``body``."""
    path = tmp_path / "sendmail"
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


def big(size: int) -> Message:
    line = "0123456789" * 7 + "abcdef\n"
    return Message.build(
        sender="carol@mailrelay.test",
        to=["dave@example.net"],
        subject="big",
        text=line * (size // len(line) + 1),
    )


def hand_over(flavour: Flavour, transport: SendmailTransport, message: Message) -> DeliveryResult:
    if flavour == "sync":
        with transport:
            return transport.send(message)

    async def main() -> DeliveryResult:
        async with transport:
            return await transport.asend(message)

    return run(main())


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_sendmail_exiting_0_unread_while_a_child_holds_stdin_is_not_success(
    flavour: Flavour, tmp_path: Path
) -> None:
    """The program exits 0 at once, without reading, and leaves a child holding its
    standard input (unread, for a few seconds): the message was not handed over."""
    program = fake_program(
        tmp_path,
        """
        import subprocess, sys
        subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(4)"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        """,
    )
    # 1 MB: more than a pipe holds, so the writes block once the pipe is full.
    with pytest.raises(LocalMTAError) as info:
        hand_over(flavour, SendmailTransport(program, timeout=30), big(1_000_000))
    assert info.value.is_transient
    assert "before reading the whole message" in str(info.value)


def test_sendmail_timeout_is_kept_when_a_child_holds_the_output_pipes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """asend past its timeout stops the program and ends, though a child of the program
    (not ours to stop) still holds its standard output and error."""
    monkeypatch.setattr(sendmail, "TERMINATE_GRACE", 0.5)
    child_pid = tmp_path / "child"
    program = fake_program(
        tmp_path,
        f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open({str(child_pid)!r}, "w").write(str(child.pid))
        time.sleep(60)
        """,
    )
    transport = SendmailTransport(program, timeout=2)

    async def main() -> Exception | None:
        # A bound far above timeout + TERMINATE_GRACE + EXIT_GRACE, for a send that hangs.
        try:
            await asyncio.wait_for(transport.asend(big(1_000)), 30)
        except Exception as exc:  # the test inspects it
            return exc
        return None

    try:
        error = run(main())
    finally:
        for _ in range(100):  # the child writes its PID as soon as it starts
            if child_pid.exists() and child_pid.read_text():
                break
            time.sleep(0.05)
        if child_pid.exists() and child_pid.read_text():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(child_pid.read_text()), signal.SIGKILL)
    assert isinstance(error, DeliveryTimeout), repr(error)


def recording_program(tmp_path: Path) -> tuple[Path, Path]:
    """A fake sendmail that appends its argv (one JSON list per run) to a log, reads the
    message and exits 0."""
    log = tmp_path / "argv.jsonl"
    program = fake_program(
        tmp_path,
        f"""
        import json, sys
        sys.stdin.buffer.read()
        with open({str(log)!r}, "a") as out:
            out.write(json.dumps(sys.argv[1:]) + "\\n")
        """,
    )
    return program, log


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_sendmail_hands_over_more_recipients_than_one_command_line_holds(
    flavour: Flavour, tmp_path: Path
) -> None:
    """80,000 recipients make a command line over Linux's 2 MiB ARG_MAX: the program could
    never be started (a transient ConnectError at every retry, for ever)."""
    program, log = recording_program(tmp_path)
    to = [f"user{i}@example.net" for i in range(80_000)]
    envelope = Envelope("carol@mailrelay.test", to)
    transport = SendmailTransport(program, timeout=60)
    message = tagged(["user0@example.net"])
    if flavour == "sync":
        result = transport.send(message, envelope)
    else:
        result = run(transport.asend(message, envelope))
    assert result.ok
    assert [str(r.address) for r in result.recipients] == to
    argvs = [json.loads(line) for line in log.read_text().splitlines()]
    handed: list[str] = []
    for argv in argvs:
        assert argv[:3] == ["-i", "-f", "carol@mailrelay.test"]
        handed += argv[argv.index("--") + 1 :]
    assert handed == to  # each once, in order


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_sendmail_timeout_never_ends_the_message_for_a_running_program(
    flavour: Flavour, tmp_path: Path
) -> None:
    """Past the timeout, the program is stopped with its standard input still open: an end
    of file first would let it queue the part of the message it has (a truncated copy)."""
    marker = tmp_path / "queued"
    program = fake_program(
        tmp_path,
        f"""
        import signal, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(2)  # past the timeout, before the SIGKILL (TERMINATE_GRACE later)
        sys.stdin.buffer.read()
        open({str(marker)!r}, "w").write("queued a truncated message")
        """,
    )
    with pytest.raises(DeliveryTimeout):
        hand_over(flavour, SendmailTransport(program, timeout=1), big(1_000_000))
    assert not marker.exists()


class CutsSessions(LimitsHandler):
    """Announces ``RCPTMAX`` (kept) but not its real MAIL limit: the ``cut``-th MAIL of a
    session gets 421 and the connection ends (a server's unannounced per-connection cap)."""

    def __init__(self, *, rcpt_max: int, cut: int) -> None:
        super().__init__(rcpt_max=rcpt_max)
        self.cut = cut

    async def handle_MAIL(
        self,
        server: SMTP,
        session: ServerSession,
        envelope: ServerEnvelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        count = self.per_session.get(session, 0) + 1
        if count >= self.cut:
            self.per_session[session] = count
            return "421 4.7.0 Too many messages on this connection"
        return await super().handle_MAIL(server, session, envelope, address, mail_options)


@pytest.mark.parametrize("lmtp", [False, True])
@pytest.mark.parametrize("size", [1, 4])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_split_messages_in_a_batch_with_sessions_cut_short_never_duplicate(
    flavour: Flavour, size: int, lmtp: bool
) -> None:
    handler = CutsSessions(rcpt_max=2, cut=3)
    counts = [1, 5, 2, 7, 1, 3, 4]
    messages = [tagged([f"m{n}.{i}@example.net" for i in range(c)]) for n, c in enumerate(counts)]
    with serving(handler, lmtp=lmtp) as port:
        results = send_many_with(flavour, list(messages), lmtp=lmtp, **options(port, size))
    assert [len(r.recipients) for r in results] == counts
    got = received(handler)
    assert max(got.values()) == 1, got  # never twice
    for result in results:
        for recipient in result.recipients:
            if recipient.outcome is Outcome.ACCEPTED:
                assert got[str(recipient.address)] == 1
            else:  # never taken, and said so
                assert recipient.outcome is Outcome.TRANSIENT, recipient
                assert got[str(recipient.address)] == 0, recipient


@pytest.mark.parametrize("chunking", [False, True])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_recipients_retried_in_a_timed_out_transaction_are_not_sent_again(
    flavour: Flavour, chunking: bool
) -> None:
    """As above, with the final reply to DATA's end (or BDAT ... LAST) coming after the
    client's data_end limit: the server took the message; the client timed out."""
    lock = threading.Lock()
    calls = Counter[str]()
    slow_done = threading.Event()

    def slow_second(message: ReceivedMessage, recipient: str | None) -> None:
        with lock:
            calls["data"] += 1
            second = calls["data"] == 2
        if second:
            time.sleep(2.5)  # past the client's data_end (1 s); then accepted
            slow_done.set()

    to = [f"a{i}@example.net" for i in range(4)]
    with SMTPTestServer(max_recipients=2, data=slow_second, timeout=10) as server:
        result = send_with(
            flavour,
            tagged(to),
            host=server.host,
            port=server.port,
            tls=TLS.NONE,
            chunking=chunking,
            timeouts=attrs.evolve(Timeouts.all(10), data_end=1.0),
            pool=PoolSettings(size=1),
        )
        assert slow_done.wait(10)
        with lock:
            accepted = calls["data"]  # every call accepts: each is a recorded message
        arrived = server.wait_for(accepted, timeout=10)
        got = Counter(rcpt for message in arrived for rcpt in message.rcpt_tos)
    assert max(got.values()) == 1, got
    assert [r.outcome for r in result.recipients[2:]] == [Outcome.TRANSIENT] * 2


class RefusesAfterFirstMail(LimitsHandler):
    """Announces LIMITS; takes one transaction in its whole life, then answers every MAIL
    with 421 (an exchanger that went away for a while)."""

    async def handle_MAIL(
        self,
        server: SMTP,
        session: ServerSession,
        envelope: ServerEnvelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if self.messages or sum(self.per_session.values()):
            self.over += 1
            return "421 4.3.2 Going away"
        return await super().handle_MAIL(server, session, envelope, address, mail_options)


@contextlib.contextmanager
def serving_at(handler: LimitsHandler, host: str, port: int) -> Iterator[None]:
    controller = Controller(
        handler, hostname=host, port=port, server_hostname=HOSTNAME, decode_data=False
    )
    controller.start()
    try:
        yield
    finally:
        controller.stop()


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_mx_finishes_a_split_message_on_the_next_exchanger(
    flavour: Flavour, unbound: UnboundServer
) -> None:
    """mx2.test: MX 10 at 127.0.0.1, MX 20 at 127.0.0.2. The first exchanger takes one
    transaction (MAILMAX=1, RCPTMAX=2), then refuses MAIL with 421: the rest of the
    message goes to the second exchanger, each recipient exactly once, in envelope order."""
    first = RefusesAfterFirstMail(rcpt_max=2, mail_max=1)
    second = LimitsHandler(rcpt_max=2, mail_max=1)
    port = free_port()
    to = [f"user{i}@mx2.test" for i in range(7)]
    message = tagged(to)
    settings: dict[str, Any] = {"port": port, "tls": TLS.NONE, "timeouts": Timeouts.all(10)}
    with serving_at(first, "127.0.0.1", port), serving_at(second, "127.0.0.2", port):
        if flavour == "sync":
            with MXTransport(unbound.resolver(), **settings, refused_networks=()) as mx:
                result = mx.send(message)
        else:

            async def main() -> DeliveryResult:
                async with AsyncMXTransport(
                    unbound.async_resolver(), **settings, refused_networks=()
                ) as mx:
                    return await mx.asend(message)

            result = run(main())
    assert result.ok, result
    assert [str(r.address) for r in result.recipients] == to
    assert received(first) == Counter(to[:2])
    assert received(second) == Counter(to[2:])
    hosts = [f"mx1.mx2.test[127.0.0.1]:{port}"] * 2 + [f"mx2.mx2.test[127.0.0.2]:{port}"] * 5
    assert [r.host for r in result.recipients] == hosts


DSN_ENVELOPE = Envelope(
    "a@example.com",
    [Recipient("b@example.com", notify="SUCCESS,FAILURE"), Recipient("c@example.com")],
    ret="HDRS",
    envid="id42",
)


def test_sendmail_dsn_values_are_attached_to_their_options(tmp_path: Path) -> None:
    """Exim's sendmail takes a lone ``-N`` as "do not deliver" (a debugging option any
    caller may use on a message it submits) and exits 0: ``-N success,failure`` lost the
    message silently there. Attached (``-Nsuccess,failure``), every getopt-based program
    (Postfix, Sendmail, OpenSMTPD, msmtp) reads the same, and Exim refuses it loudly."""
    program, log = recording_program(tmp_path)
    result = SendmailTransport(program).send(tagged(["b@example.com"]), DSN_ENVELOPE)
    assert result.ok
    argvs = [json.loads(line) for line in log.read_text().splitlines()]
    assert sorted(argvs) == sorted(
        [
            [
                "-i",
                "-f",
                "a@example.com",
                "-Rhdrs",
                "-Vid42",
                "-Nsuccess,failure",
                "--",
                "b@example.com",
            ],
            ["-i", "-f", "a@example.com", "-Rhdrs", "-Vid42", "--", "c@example.com"],
        ]
    )


@pytest.mark.parametrize("name", ["exim4", "exim"])
def test_sendmail_to_exim_passes_no_dsn_options(tmp_path: Path, name: str) -> None:
    """/usr/sbin/sendmail a link to Exim (Debian's default MTA): no -N, -R, -V (Exim
    reads them as "do not deliver" and queue-run options), as an SMTP server without DSN
    gets no DSN parameters; the recipients go in one process."""
    program, log = recording_program(tmp_path)
    real = program.rename(tmp_path / name)
    (tmp_path / "sendmail").symlink_to(real)
    transport = SendmailTransport(tmp_path / "sendmail")
    result = transport.send(tagged(["b@example.com"]), DSN_ENVELOPE)
    assert result.ok
    argvs = [json.loads(line) for line in log.read_text().splitlines()]
    assert argvs == [["-i", "-f", "a@example.com", "--", "b@example.com", "c@example.com"]]
