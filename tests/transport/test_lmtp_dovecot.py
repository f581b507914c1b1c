"""LMTPTransport and AsyncLMTPTransport against a real Dovecot LMTP server.

Dovecot (``tests/peers/dovecot.py``) is what most deployments deliver to. These tests send
through the transports, then read what Dovecot stored (its Maildirs: the message byte for
byte after the trace fields Dovecot prepends) and what it said (a recording relay keeps every
byte it sent): each recipient's :class:`~mailrelay.results.RecipientResult` must carry exactly
the reply Dovecot gave that recipient, at RCPT or after the data (RFC 2033 §4.2).

Dovecot 2.3.19's LHLO offers 8BITMIME, CHUNKING, ENHANCEDSTATUSCODES and PIPELINING: no SIZE,
no DSN, no SMTPUTF8, so those tests check that mailrelay leaves the parameters out (Dovecot
answers ``555 5.5.4`` to any parameter it does not know) or refuses before sending.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from mailrelay.envelope import Envelope
from mailrelay.message import Message
from mailrelay.options import Timeouts
from mailrelay.results import DeliveryResult, Outcome, RecipientResult
from mailrelay.transport import PoolSettings
from mailrelay.transport.base import BatchItem
from tests.peers.dovecot import (
    OVER_QUOTA,
    OVER_QUOTA_TEMPFAIL,
    UNWRITABLE,
    DovecotInstance,
    Recorder,
    address,
    strip_trace_headers,
)
from tests.transport.helpers import FLAVOURS, Flavour, send_each_with, send_many_with, send_with

SENDER = "sender@example.com"
BODY = (
    "First line.\n"
    ".A line that starts with a dot (RFC 5321 §4.5.2 stuffing)\n"
    "..two dots\n"
    ".\n"
    "a line with trailing spaces   \n" + "x" * 900 + "\n"
)
LHLO_KEYWORDS = {"8BITMIME", "CHUNKING", "ENHANCEDSTATUSCODES", "PIPELINING"}
"""What Dovecot 2.3.19 offers (its LHLO reply, checked below)."""


def make(to: list[str], subject: str, text: str = BODY) -> Message:
    """A message from :data:`SENDER` to the local parts ``to`` of the test domain."""
    return Message.build(
        sender=SENDER, to=[address(local) for local in to], subject=subject, text=text
    )


def wire(message: Message) -> bytes:
    """The message as it goes on the wire (CRLF, Bcc removed), before dot-stuffing."""
    return b"".join(message.chunks())


def delivered(dovecot: DovecotInstance, user: str) -> list[bytes]:
    """``user``'s delivered messages without the trace fields Dovecot prepended."""
    return [strip_trace_headers(raw) for raw in dovecot.read_maildir(user)]


def rendered(result: RecipientResult) -> str:
    """The reply line a recipient's result carries, as it was on the wire (one line)."""
    assert result.reply is not None, result
    assert len(result.reply.lines) == 1, result.reply
    return f"{result.reply.code} {result.reply.lines[0]}"


def transactions(recorder: Recorder) -> list[list[str]]:
    """Dovecot's reply lines, split before each ``250 2.1.0`` (its answer to MAIL)."""
    parts: list[list[str]] = [[]]
    for line in recorder.server_lines():
        if line.startswith("250 2.1.0 "):
            parts.append([])
        parts[-1].append(line)
    return parts[1:]


_OUTCOMES = {"2": Outcome.ACCEPTED, "4": Outcome.TRANSIENT, "5": Outcome.PERMANENT}


def assert_as_dovecot_said(result: DeliveryResult, lines: list[str]) -> None:
    """Each recipient's result holds the last reply line in ``lines`` that names that
    recipient (Dovecot puts ``<address>`` in a RCPT refusal and in each final reply)."""
    for recipient in result.recipients:
        about = [line for line in lines if f"<{recipient.address}>" in line]
        assert about, f"Dovecot said nothing about {recipient.address}"
        assert rendered(recipient) == about[-1]
        assert recipient.outcome is _OUTCOMES[about[-1][0]]


def by_local(result: DeliveryResult) -> dict[str, RecipientResult]:
    """The result's recipients by local part."""
    return {r.address.local_part: r for r in result.recipients}


def tcp(recorder: Recorder, **kwargs: Any) -> dict[str, Any]:
    """Transport arguments for Dovecot's TCP listener, through ``recorder``."""
    return {"host": "127.0.0.1", "port": recorder.port, "lmtp": True, **kwargs}


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_lhlo_offers_what_we_expect_and_no_size_parameter_is_sent(
    flavour: Flavour, dovecot_clean: DovecotInstance
) -> None:
    message = make(["alice"], "lhlo")
    with dovecot_clean.recorder() as recorder:
        result = send_with(flavour, message, **tcp(recorder))
    assert result.ok
    lines = recorder.server_lines()
    assert lines[0].startswith("220 ")
    start = lines.index(f"250-{dovecot_clean.hostname}")
    keywords = set()
    for line in lines[start + 1 :]:
        keywords.add(line[4:].split()[0])
        if line[3] == " ":
            break
    assert keywords == LHLO_KEYWORDS
    commands = recorder.client_commands()
    assert commands[0].startswith(b"LHLO ")
    mail = [c for c in commands if c.startswith(b"MAIL FROM:")]
    # RFC 1870 §6: SIZE= only to a server that offers SIZE (Dovecot would answer 555).
    assert mail == [f"MAIL FROM:<{SENDER}>".encode()]


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("via", ["tcp", "unix"])
def test_several_users_in_one_transaction_get_the_message_byte_for_byte(
    flavour: Flavour, via: str, dovecot_clean: DovecotInstance
) -> None:
    users = ["alice", "bob", "carol"]
    message = make(users, f"three users {via}")
    if via == "unix":
        result = send_with(flavour, message, lmtp=True, path=str(dovecot_clean.socket_path))
        for local, recipient in by_local(result).items():
            assert recipient.outcome is Outcome.ACCEPTED
            assert recipient.reply is not None
            assert recipient.reply.code == 250
            assert re.fullmatch(rf"2\.0\.0 <{local}@\S+> \S+ Saved", recipient.reply.lines[0])
    else:
        with dovecot_clean.recorder() as recorder:
            result = send_with(flavour, message, **tcp(recorder))
        (lines,) = transactions(recorder)
        assert_as_dovecot_said(result, lines)
    assert result.ok
    assert [r.address.local_part for r in result.recipients] == users
    for user in users:
        assert delivered(dovecot_clean, user) == [wire(message)]


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "lockstep"])
@pytest.mark.parametrize("chunking", [False, True], ids=["data", "bdat"])
def test_refusals_at_rcpt_and_after_the_data_are_reported_per_recipient(
    flavour: Flavour, pipelining: bool, chunking: bool, dovecot_clean: DovecotInstance
) -> None:
    """Unknown user: 550 at RCPT. Over quota: 552 (or 452 with quota_full_tempfail), and an
    unwritable Maildir: 451, in the final replies after the data, while the others in the
    same transaction are delivered."""
    users = ["alice", "nobody", OVER_QUOTA, "bob", OVER_QUOTA_TEMPFAIL, UNWRITABLE]
    message = make(users, f"mixed {pipelining} {chunking}")
    with dovecot_clean.recorder() as recorder:
        result = send_with(
            flavour, message, **tcp(recorder, pipelining=pipelining, chunking=chunking)
        )
    (lines,) = transactions(recorder)
    assert_as_dovecot_said(result, lines)
    results = by_local(result)
    assert {local for local, r in results.items() if r.outcome is Outcome.ACCEPTED} == {
        "alice",
        "bob",
    }
    nobody, full, later = results["nobody"], results[OVER_QUOTA], results[OVER_QUOTA_TEMPFAIL]
    assert (nobody.outcome, str(nobody.reply and nobody.reply.enhanced)) == (
        Outcome.PERMANENT,
        "5.1.1",
    )
    assert (full.outcome, str(full.reply and full.reply.enhanced)) == (Outcome.PERMANENT, "5.2.2")
    assert (later.outcome, str(later.reply and later.reply.enhanced)) == (
        Outcome.TRANSIENT,
        "4.2.2",
    )
    broken = results[UNWRITABLE]
    assert (broken.outcome, str(broken.reply and broken.reply.enhanced)) == (
        Outcome.TRANSIENT,
        "4.2.0",
    )
    # These are final replies to the data, not RCPT replies (those were 250).
    for local in (OVER_QUOTA, OVER_QUOTA_TEMPFAIL):
        assert "Quota exceeded" in rendered(results[local])
    assert "Internal error occurred" in rendered(broken)
    assert [r.address.local_part for r in result.rejected] == ["nobody", OVER_QUOTA]
    assert [r.address.local_part for r in result.deferred] == [OVER_QUOTA_TEMPFAIL, UNWRITABLE]
    sent = recorder.client_commands()
    assert any(c.startswith(b"BDAT ") for c in sent) is chunking
    assert (b"DATA" in sent) is not chunking
    for user in ("alice", "bob"):
        assert delivered(dovecot_clean, user) == [wire(message)]
    for user in ("nobody", OVER_QUOTA, OVER_QUOTA_TEMPFAIL, UNWRITABLE):
        assert dovecot_clean.read_maildir(user) == []


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_refusals_over_the_unix_socket(flavour: Flavour, dovecot_clean: DovecotInstance) -> None:
    users = ["carol", OVER_QUOTA, "ghost", OVER_QUOTA_TEMPFAIL]
    message = make(users, "unix refusals")
    result = send_with(flavour, message, lmtp=True, path=str(dovecot_clean.socket_path))
    got = {
        local: (r.outcome, r.reply and r.reply.code, r.reply and r.reply.lines[0])
        for local, r in by_local(result).items()
    }
    domain = dovecot_clean.domain
    assert got["carol"][:2] == (Outcome.ACCEPTED, 250)
    assert got[OVER_QUOTA] == (
        Outcome.PERMANENT,
        552,
        f"5.2.2 <{OVER_QUOTA}@{domain}> Quota exceeded (mailbox for user is full)",
    )
    assert got[OVER_QUOTA_TEMPFAIL] == (
        Outcome.TRANSIENT,
        452,
        f"4.2.2 <{OVER_QUOTA_TEMPFAIL}@{domain}> Quota exceeded (mailbox for user is full)",
    )
    assert got["ghost"] == (
        Outcome.PERMANENT,
        550,
        f"5.1.1 <ghost@{domain}> User doesn't exist: ghost@{domain}",
    )
    assert delivered(dovecot_clean, "carol") == [wire(message)]


_SHORT = Timeouts(connect=5, greeting=5, mail=5, rcpt=5, data_init=5, data_end=2, quit=2)

# A batch whose second message has no valid recipient: the transaction after it must
# start clean (RSET, RFC 5321 §4.1.1.5) on the same connection.
# Found here: with PIPELINING and CHUNKING, a message whose every RCPT is refused still has
# its "BDAT n LAST" in the pipelined group; Dovecot answers it "503 5.5.0 No valid
# recipients" and keeps the transaction (its MAIL) open (RFC 3030 §2: the transaction
# failed). The next MAIL on the connection, sent without RSET, was answered "503 5.5.0 MAIL
# already given" and its deliverable recipients bounced; in send_many the next groups were
# already on the wire. The client now sends RSET first.


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize(
    ("pipelining", "chunking"),
    [
        (True, False),
        (False, False),
        (False, True),
        (True, True),
    ],
    ids=["pipelining-data", "lockstep-data", "lockstep-bdat", "pipelining-bdat"],
)
def test_send_many_over_one_connection_with_rset_after_a_refused_message(
    flavour: Flavour, pipelining: bool, chunking: bool, dovecot_clean: DovecotInstance
) -> None:
    first = make(["alice"], "batch 1")
    nobody = make(["nobody", "ghost"], "batch 2")
    third = make(["bob", OVER_QUOTA], "batch 3")
    fourth = make(["carol", "alice"], "batch 4")
    items: list[BatchItem] = [first, nobody, third, fourth]
    with dovecot_clean.recorder() as recorder:
        results = send_many_with(
            flavour,
            items,
            # One connection (async send_many would otherwise spread the batch over several).
            pool=PoolSettings(size=1),
            # Bounded waits: with the bug below, a final reply never comes (Dovecot answered
            # the BDAT with one 503), and the default data_end wait is 10 minutes.
            timeouts=_SHORT,
            **tcp(recorder, pipelining=pipelining, chunking=chunking),
        )
    assert len(recorder.server_bytes) == 1  # one pooled connection for the whole batch
    parts = transactions(recorder)
    assert len(parts) == len(results)
    for result, lines in zip(results, parts, strict=True):
        assert_as_dovecot_said(result, lines)
    assert [[r.outcome for r in result.recipients] for result in results] == [
        [Outcome.ACCEPTED],
        [Outcome.PERMANENT, Outcome.PERMANENT],
        [Outcome.ACCEPTED, Outcome.PERMANENT],
        [Outcome.ACCEPTED, Outcome.ACCEPTED],
    ]
    commands = recorder.client_commands()
    mails = [n for n, c in enumerate(commands) if c.startswith(b"MAIL FROM:")]
    assert len(mails) == 4
    # RSET between the refused message and the next one.
    assert b"RSET" in commands[mails[1] : mails[2]]
    assert delivered(dovecot_clean, "alice") == [wire(first), wire(fourth)]
    assert delivered(dovecot_clean, "bob") == [wire(third)]
    assert delivered(dovecot_clean, "carol") == [wire(fourth)]


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize(
    ("pipelining", "chunking"),
    [
        (True, False),
        (False, False),
        (False, True),
        (True, True),
    ],
    ids=["pipelining-data", "lockstep-data", "lockstep-bdat", "pipelining-bdat"],
)
def test_a_message_after_one_nobody_could_take_on_the_same_connection(
    flavour: Flavour, pipelining: bool, chunking: bool, dovecot_clean: DovecotInstance
) -> None:
    """Two ``send`` calls (not a batch): the pooled connection is reused, so the second
    transaction must start clean after the first one failed whole."""
    refused = make(["nobody"], "nobody")
    second = make(["alice"], "after nobody")
    with dovecot_clean.recorder() as recorder:
        results = send_each_with(
            flavour,
            [refused, second],
            timeouts=_SHORT,
            **tcp(recorder, pipelining=pipelining, chunking=chunking),
        )
    assert len(recorder.server_bytes) == 1  # the pooled connection, reused
    parts = transactions(recorder)
    for result, lines in zip(results, parts, strict=True):
        assert_as_dovecot_said(result, lines)
    assert [r.outcome for r in results[0].recipients] == [Outcome.PERMANENT]
    assert results[1].ok
    assert delivered(dovecot_clean, "alice") == [wire(second)]


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("chunking", [False, True], ids=["data", "bdat"])
def test_a_large_message_is_delivered_whole(
    flavour: Flavour, chunking: bool, dovecot_clean: DovecotInstance
) -> None:
    line = "".join(chr(0x21 + n % 94) for n in range(76)) + "\n"
    text = "".join(f"{n:06d} {line}" if n % 50 else f".{n:06d} {line}" for n in range(40_000))
    message = make(["alice", "bob"], f"large {chunking}", text=text)
    assert message.size > 3_000_000
    with dovecot_clean.recorder() as recorder:
        result = send_with(flavour, message, **tcp(recorder, chunking=chunking))
    (lines,) = transactions(recorder)
    assert_as_dovecot_said(result, lines)
    assert result.ok
    bdats = [c for c in recorder.client_commands() if c.startswith(b"BDAT ")]
    if chunking:
        # RFC 3030 §2: chunk sizes add up to the message; only the last says LAST.
        sizes = [int(c.split()[1]) for c in bdats]
        assert sum(sizes) == message.size
        assert len(sizes) > 1
        assert [c.endswith(b" LAST") for c in bdats] == [False] * (len(bdats) - 1) + [True]
    else:
        assert bdats == []
    for user in ("alice", "bob"):
        assert delivered(dovecot_clean, user) == [wire(message)]


_EIGHT_BIT = (
    "From: sender@example.com\r\n"
    "To: alice@lmtp.mailrelay.test\r\n"
    "Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
    "Message-ID: <eight-bit@example.com>\r\n"
    "MIME-Version: 1.0\r\n"
    'Content-Type: text/plain; charset="utf-8"\r\n'
    "Content-Transfer-Encoding: 8bit\r\n"
    "\r\n"
    "Grüße aus Köln, 東京 and Zürich.\r\n"
    ".Ünïcödé after a dot\r\n"
).encode()


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("chunking", [False, True], ids=["data", "bdat"])
def test_eight_bit_content_goes_with_body_8bitmime(
    flavour: Flavour, chunking: bool, dovecot_clean: DovecotInstance
) -> None:
    message = Message.from_bytes(_EIGHT_BIT)
    assert message.needs_8bitmime
    assert not message.needs_smtputf8
    with dovecot_clean.recorder() as recorder:
        result = send_with(flavour, message, **tcp(recorder, chunking=chunking))
    (lines,) = transactions(recorder)
    assert_as_dovecot_said(result, lines)
    assert result.ok
    mail = [c for c in recorder.client_commands() if c.startswith(b"MAIL FROM:")]
    assert mail == [f"MAIL FROM:<{SENDER}> BODY=8BITMIME".encode()]  # RFC 6152 §3
    assert delivered(dovecot_clean, "alice") == [_EIGHT_BIT]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_dsn_parameters_are_left_out_for_a_server_without_dsn(
    flavour: Flavour, dovecot_clean: DovecotInstance
) -> None:
    message = make(["alice", "bob"], "dsn")
    envelope = Envelope(
        SENDER,
        [address("alice"), address("bob")],
        ret="HDRS",
        envid="mailrelay-dovecot-1",
        notify="SUCCESS,FAILURE",
    )
    with dovecot_clean.recorder() as recorder:
        result = send_with(flavour, message, envelope, **tcp(recorder))
    (lines,) = transactions(recorder)
    assert_as_dovecot_said(result, lines)
    assert result.ok
    commands = recorder.client_commands()
    # RFC 3461 §4: the parameters only to a server that offers DSN (Dovecot answers 555).
    for command in commands:
        if command.startswith((b"MAIL", b"RCPT")):
            assert not re.search(rb" (NOTIFY|ORCPT|RET|ENVID)=", command), command
    for user in ("alice", "bob"):
        assert delivered(dovecot_clean, user) == [wire(message)]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_utf8_local_part_is_not_sent_to_a_server_without_smtputf8(
    flavour: Flavour, dovecot_clean: DovecotInstance
) -> None:
    """Dovecot 2.3 offers no SMTPUTF8: the recipient whose address needs it is refused
    before MAIL, with a reason and no server reply (RFC 6531 §3.2); the ASCII recipient of
    the same ASCII message is delivered, in a transaction without it."""
    message = make(["alice"], "utf8")
    envelope = Envelope(SENDER, [address("alice"), address("jösé")])
    with dovecot_clean.recorder() as recorder:
        result = send_with(flavour, message, envelope, **tcp(recorder))
    alice, jose = result.recipients
    assert alice.outcome is Outcome.ACCEPTED
    assert (jose.outcome, jose.reply) == (Outcome.PERMANENT, None)
    assert "SMTPUTF8" in (jose.reason or "")
    (lines,) = transactions(recorder)
    assert rendered(alice) in lines
    rcpts = [c for c in recorder.client_commands() if c.startswith(b"RCPT")]
    assert rcpts == [f"RCPT TO:<{address('alice')}>".encode()]
    assert not any(b"SMTPUTF8" in c for c in recorder.client_commands())
    assert delivered(dovecot_clean, "alice") == [wire(message)]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_utf8_local_part_apart_in_a_batch(
    flavour: Flavour, dovecot_clean: DovecotInstance
) -> None:
    """As above, for a message in the middle of a batch: the messages around it go as
    usual, and its ASCII recipient too."""
    first, middle, last = (make(["alice"], f"batch {n}") for n in (1, 2, 3))
    items: list[BatchItem] = [
        first,
        (middle, Envelope(SENDER, [address("jösé"), address("bob")])),
        (last, Envelope(SENDER, [address("jösé")])),
    ]
    with dovecot_clean.recorder() as recorder:
        results = send_many_with(
            flavour, items, pool=PoolSettings(size=1), timeouts=_SHORT, **tcp(recorder)
        )
    assert [[r.outcome for r in result.recipients] for result in results] == [
        [Outcome.ACCEPTED],
        [Outcome.PERMANENT, Outcome.ACCEPTED],
        [Outcome.PERMANENT],  # nothing else: the whole transaction is refused
    ]
    assert all(
        "SMTPUTF8" in (r.reason or "") for r in (results[1].recipients[0], results[2].recipients[0])
    )
    rcpts = [c for c in recorder.client_commands() if c.startswith(b"RCPT")]
    assert rcpts == [f"RCPT TO:<{address(user)}>".encode() for user in ("alice", "bob")]
    assert delivered(dovecot_clean, "alice") == [wire(first)]
    assert delivered(dovecot_clean, "bob") == [wire(middle)]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_null_sender_and_a_detail_address(flavour: Flavour, dovecot_clean: DovecotInstance) -> None:
    """``MAIL FROM:<>`` (a bounce) to ``bob+news``: Dovecot strips the detail
    (``recipient_delimiter``), files it in bob's INBOX and writes ``Return-Path: <>``."""
    message = make(["bob"], "bounce")
    envelope = Envelope(None, [address("bob+news")])
    with dovecot_clean.recorder() as recorder:
        result = send_with(flavour, message, envelope, **tcp(recorder))
    (lines,) = transactions(recorder)
    assert_as_dovecot_said(result, lines)
    assert result.ok
    assert b"MAIL FROM:<>" in recorder.client_commands()
    (raw,) = dovecot_clean.read_maildir("bob")
    assert raw.startswith(b"Return-Path: <>\r\n")
    assert strip_trace_headers(raw) == wire(message)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_batch_over_several_pooled_connections_delivers_each_message_once(
    flavour: Flavour, dovecot_clean: DovecotInstance
) -> None:
    messages = [make(["alice", "bob"] if n % 2 else ["carol"], f"pooled {n}") for n in range(12)]
    with dovecot_clean.recorder() as recorder:
        results = send_many_with(
            flavour, list(messages), pool=PoolSettings(size=3), timeouts=_SHORT, **tcp(recorder)
        )
    assert [r.ok for r in results] == [True] * len(messages)
    assert 1 <= len(recorder.server_bytes) <= 3
    for user, expected in (
        ("alice", messages[1::2]),
        ("bob", messages[1::2]),
        ("carol", messages[0::2]),
    ):
        # Order across connections is not fixed: compare as sorted lists (each exactly once).
        assert sorted(delivered(dovecot_clean, user)) == sorted(wire(m) for m in expected)
