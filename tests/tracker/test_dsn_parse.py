"""parse_dsn: one small hand-written fixture per format, plus properties.

The fixtures imitate the *shape* of each format (field names, marker lines,
where the address and the reason sit); their text is our own.
"""

from __future__ import annotations

import base64
import quopri
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.tracker import DSNAction, DSNKind, DSNReport, parse_dsn
from mailrelay.tracker.dsn import find_reply_code, find_status
from mailrelay.tracker.dsn_parse import _parse


def msg(text: str) -> bytes:
    """Fixture text (indented in the source) as wire bytes."""
    lines = text.strip("\n").split("\n")
    return "\r\n".join(lines).encode("utf-8") + b"\r\n"


RFC3464 = msg("""
Return-Path: <>
X-Original-To: bounces+trk42@shop.example
From: Mail Delivery Subsystem <MAILER-DAEMON@relay.example.net>
To: <bounces+trk42@shop.example>
Subject: Returned mail: see transcript for details
Message-ID: <report-1@relay.example.net>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="BOUND"

--BOUND
Content-Type: text/plain

Two recipients could not be reached.

--BOUND
Content-Type: message/delivery-status

Reporting-MTA: dns; relay.example.net
Original-Envelope-Id: trk42
Arrival-Date: Mon, 2 Mar 2026 10:00:00 +0000

Original-Recipient: rfc822;Ann@Example.ORG
Final-Recipient: rfc822; ann@example.org
Action: failed
Status: 5.1.1
Remote-MTA: dns; mx.example.org
Diagnostic-Code: smtp; 550 5.1.1 <ann@example.org>: mailbox does not exist
Last-Attempt-Date: Mon, 2 Mar 2026 10:00:05 +0000

Final-Recipient: rfc822; <bob@example.com>
Action: failed
Status: 5.2.2
Remote-MTA: dns; mx.example.com
Diagnostic-Code: smtp; 552 5.2.2 mailbox full,
  try later

--BOUND
Content-Type: text/rfc822-headers

From: Shop <news@shop.example>
To: ann@example.org, bob@example.com
Subject: Your order
Message-ID: <order-77@shop.example>

--BOUND--
""")

GLOBAL = msg("""
From: MAILER-DAEMON@mx.example.jp
To: sender@shop.example
Subject: Undelivered Mail Returned to Sender
MIME-Version: 1.0
Content-Type: multipart/report; report-type=global-delivery-status; boundary="G"

--G
Content-Type: text/plain; charset=utf-8

Could not deliver.

--G
Content-Type: message/global-delivery-status

Reporting-MTA: dns; mx.example.jp

Final-Recipient: utf-8; 山田@example.jp
Action: failed
Status: 5.1.1
Diagnostic-Code: smtp; 550 5.1.1 no such user 山田

Final-Recipient: utf-8; j\\x{00F6}rg@example.de
Action: delayed
Status: 4.4.1

--G
Content-Type: message/global-headers

Message-ID: <intl-1@shop.example>
Subject: こんにちは

--G--
""")

DELAY = msg("""
From: Mail Delivery System <MAILER-DAEMON@out.example.net>
To: app@shop.example
Subject: Delayed Mail (still being retried)
Content-Type: multipart/report; report-type=delivery-status; boundary="D"

--D
Content-Type: text/plain

This is only a warning.

--D
Content-Type: message/delivery-status

Reporting-MTA: dns; out.example.net

Final-Recipient: rfc822; slow@example.org
Action: delayed
Status: 4.4.7
Will-Retry-Until: Fri, 6 Mar 2026 10:00:00 +0000

--D--
""")

SUCCESS = msg("""
From: postmaster@mx.example.org
To: app@shop.example
Subject: Successful Mail Delivery Report
In-Reply-To: <sent-9@shop.example>
Content-Type: multipart/report; report-type=delivery-status; boundary="S"

--S
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.org
Original-Envelope-Id: track-9

Final-Recipient: rfc822; happy@example.org
Action: delivered
Status: 2.0.0

--S--
""")

RELAYED = msg("""
From: MAILER-DAEMON@gw.example.org
To: app@shop.example
Subject: Relayed
Content-Type: multipart/report; report-type=delivery-status; boundary="R"

--R
Content-Type: message/delivery-status

Reporting-MTA: dns; gw.example.org

Final-Recipient: rfc822; far@legacy.example
Action: relayed
Status: 2.0.0

--R--
""")

QMAIL = msg("""
Return-Path: <>
From: MAILER-DAEMON@q.example.net
To: app@shop.example
Subject: failure notice

Hi. This is the qmail-send program at q.example.net.
I'm afraid I wasn't able to deliver your message to the following addresses.
This is a permanent error; I've given up. Sorry it didn't work out.

<gone@example.net>:
Sorry, no mailbox here by that name. (#5.1.1)

--- Below this line is a copy of the message.

Return-Path: <app@shop.example>
Message-ID: <q-1@shop.example>
From: app@shop.example
To: gone@example.net
Subject: hello

hi
""")

EXIM = msg("""
Return-path: <>
From: Mail Delivery System <Mailer-Daemon@exim.example.com>
To: app@shop.example
Subject: Mail delivery failed: returning message to sender
X-Failed-Recipients: full@example.com
Auto-Submitted: auto-replied

This message was created automatically by mail delivery software.

A message that you sent could not be delivered to one or more of its
recipients. This is a permanent error. The following address(es) failed:

  full@example.com
    host mx.example.com [192.0.2.7]
    SMTP error from remote mail server after RCPT TO:<full@example.com>:
    552 5.2.2 Over quota

------ This is a copy of the message, including all the headers. ------

Message-Id: <e-5@shop.example>
From: app@shop.example
To: full@example.com
Subject: news

body
""")

POSTFIX_PLAIN = msg("""
Return-Path: <>
From: MAILER-DAEMON@pf.example.org (Mail Delivery System)
To: app@shop.example
Subject: Undelivered Mail Returned to Sender

This is the mail system at host pf.example.org.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients.

<nobody@example.org>: host mx.example.org[192.0.2.9] said: 550 5.1.1
    <nobody@example.org>: Recipient address rejected: User unknown (in reply
    to RCPT TO command)
""")

SENDMAIL_OLD = msg("""
From: Mail Delivery Subsystem <MAILER-DAEMON@old.example.edu>
To: app@shop.example
Subject: Returned mail: User unknown

The original message was received at Mon, 2 Mar 2026 10:00:00 +0000
from shop.example [192.0.2.1]

   ----- The following addresses had permanent fatal errors -----
<student@old.example.edu>

   ----- Transcript of session follows -----
... while talking to mail.old.example.edu.:
>>> RCPT To:<student@old.example.edu>
<<< 550 <student@old.example.edu>... User unknown
""")

EXCHANGE = msg("""
From: System Administrator <postmaster@corp.example>
To: app@shop.example
Subject: Undeliverable: Quarterly report

Your message

  To:      boss@corp.example
  Subject: Quarterly report

did not reach the following recipient(s):

boss@corp.example on Mon, 2 Mar 2026 10:00:00 +0000
    The recipient name is not recognized
    The MTS-ID of the original message is: c=us;a= ;p=corp;l=X
    MSEXCH:IMS:CORP:SITE:SERVER 0 (000C05A6) Unknown Recipient
""")

SES_JSON = msg("""
From: SES Notifications <no-reply@sns.example.com>
To: app@shop.example
Subject: AWS Notification Message
Content-Type: text/plain; charset=UTF-8

{"notificationType":"Bounce","bounce":{"bounceType":"Permanent",
"bouncedRecipients":[{"emailAddress":"x@example.net","action":"failed",
"status":"5.1.1","diagnosticCode":"smtp; 550 5.1.1 user unknown"}]},
"mail":{"headers":[{"name":"Message-ID","value":"<ses-3@shop.example>"}]}}
""")

BROKEN_MIME = msg("""
Return-Path: <>
From: Mail Delivery Subsystem <MAILER-DAEMON@bad.example.org>
To: app@shop.example
Subject: Returned mail: Service unavailable
Content-Type: multipart/report; report-type=delivery-status;

The boundary parameter is missing, so this is all one text body.

Reporting-MTA: dns; bad.example.org

Final-Recipient: RFC822; lost@bad.example.org
Action: failed
Status: 5.5.0
""")

ARF = msg("""
From: abuse-reports@isp.example
To: fbl@shop.example
Subject: FW: complaint
Content-Type: multipart/report; report-type=feedback-report; boundary="F"

--F
Content-Type: text/plain

This is an abuse report.

--F
Content-Type: message/feedback-report

Feedback-Type: abuse
User-Agent: ReportBot/1.0
Version: 1
Original-Mail-From: <bounces+trk7@shop.example>
Original-Rcpt-To: <angry@isp.example>

--F
Content-Type: message/rfc822

From: news@shop.example
To: angry@isp.example
Message-ID: <news-7@shop.example>
Subject: Deals

deals
--F--
""")

VACATION = msg("""
Return-Path: <>
From: Carol <carol@example.org>
To: app@shop.example
Subject: Out of Office: Your order
Auto-Submitted: auto-replied
In-Reply-To: <order-1@shop.example>

I am away until Monday and will not be able to deliver your request.
""")

X_AUTOREPLY = msg("""
From: Dan <dan@example.org>
To: app@shop.example
Subject: Re: Your order
X-Autoreply: yes

Thanks, I'll answer soon. Your message was not delivered to my assistant.
""")

PRECEDENCE = msg("""
From: Eve <eve@example.org>
To: app@shop.example
Subject: Thanks for your mail
Precedence: auto_reply

Automatic answer.
""")

PLAIN = msg("""
From: Frank <frank@example.org>
To: app@shop.example
Subject: Question about delivery
Message-ID: <q-9@example.org>

Hi, my parcel could not be delivered, the courier said address unknown
at frank@example.org. Can you help?
""")

FORWARDED_BOUNCE = msg("""
From: Grace <grace@example.org>
To: helpdesk@shop.example
Subject: Fwd: Undelivered Mail Returned to Sender

Why did this fail?

<someone@example.net>: host mx.example.net said: 550 5.1.1 User unknown
""")

NESTED = msg("""
From: Mail Delivery Subsystem <MAILER-DAEMON@front.example.jp>
To: app@shop.example
Subject: Returned mail
Content-Type: multipart/mixed; boundary="OUT"

--OUT
Content-Type: text/plain

   ----- The following addresses had permanent delivery errors -----

--OUT
Content-Type: message/rfc822

From: MAILER-DAEMON@back.example.jp
To: app@shop.example
Subject: Returned mail
Content-Type: multipart/report; report-type=delivery-status; boundary="IN"

--IN
Content-Type: message/delivery-status

Reporting-MTA: dns; back.example.jp

Final-Recipient: rfc822; inner@example.jp
Action: failed
Status: 5.1.1

--IN--

--OUT--
""")


DELIVERY_RECEIPT = msg("""
From: Microsoft Outlook <postmaster@corp.example>
To: app@shop.example
Subject: Delivered: Quarterly report
Auto-Submitted: auto-replied

Your message has been delivered to the following recipients:

boss@corp.example (boss@corp.example)

Subject: Quarterly report
""")

READ_RECEIPT = msg("""
From: Heidi <heidi@example.org>
To: app@shop.example
Subject: Read: Your order
Content-Type: multipart/report; report-type=disposition-notification; boundary="M"

--M
Content-Type: text/plain

Your message was displayed. This is no guarantee that it was read.

--M
Content-Type: message/disposition-notification

Final-Recipient: rfc822; heidi@example.org
Original-Message-ID: <order-1@shop.example>
Disposition: manual-action/MDN-sent-manually; displayed

--M--
""")


PROSE_DELAY = msg("""
Return-Path: <>
From: Mail Delivery System <Mailer-Daemon@slow.example.net>
To: app@shop.example
Subject: Warning: message 1abc-0001 delayed 24 hours

This message was created automatically by mail delivery software.
A message that you sent has not yet been delivered to one or more of its
recipients after more than 24 hours on the queue on slow.example.net.

  later@example.net
    host mx.example.net [192.0.2.8]: 451 4.3.0 Temporary local problem

No action is required on your part. Delivery attempts will continue for some time.
""")

VACATION_PHOTOS = msg("""
From: Ivan <ivan@example.org>
To: app@shop.example
Subject: Vacation photos
Message-ID: <photos@example.org>

Here they are; the first upload failed with an error, sorry.
""")


FORMATS = [
    # (id, raw, kind, [(address, action, status, is_hard)], format)
    (
        "rfc3464",
        RFC3464,
        DSNKind.BOUNCE,
        [
            ("ann@example.org", "failed", "5.1.1", True),
            ("bob@example.com", "failed", "5.2.2", False),
        ],
        "rfc3464",
    ),
    (
        "rfc6533",
        GLOBAL,
        DSNKind.BOUNCE,
        [
            ("山田@example.jp", "failed", "5.1.1", True),
            ("jörg@example.de", "delayed", "4.4.1", False),
        ],
        "rfc6533",
    ),
    ("delay", DELAY, DSNKind.DELAY, [("slow@example.org", "delayed", "4.4.7", False)], "rfc3464"),
    (
        "success",
        SUCCESS,
        DSNKind.DELIVERED,
        [("happy@example.org", "delivered", "2.0.0", None)],
        "rfc3464",
    ),
    (
        "relayed",
        RELAYED,
        DSNKind.RELAYED,
        [("far@legacy.example", "relayed", "2.0.0", None)],
        "rfc3464",
    ),
    ("qmail", QMAIL, DSNKind.BOUNCE, [("gone@example.net", "failed", "5.1.1", True)], "qmail"),
    ("exim", EXIM, DSNKind.BOUNCE, [("full@example.com", "failed", "5.2.2", False)], "exim"),
    (
        "postfix-plain",
        POSTFIX_PLAIN,
        DSNKind.BOUNCE,
        [("nobody@example.org", "failed", "5.1.1", True)],
        "postfix",
    ),
    (
        "sendmail-old",
        SENDMAIL_OLD,
        DSNKind.BOUNCE,
        [("student@old.example.edu", "failed", None, True)],
        "sendmail",
    ),
    (
        "exchange",
        EXCHANGE,
        DSNKind.BOUNCE,
        [("boss@corp.example", "failed", None, True)],
        "exchange",
    ),
    (
        "ses-json",
        SES_JSON,
        DSNKind.BOUNCE,
        [("x@example.net", "failed", "5.1.1", True)],
        "amazonses",
    ),
    (
        "broken-mime",
        BROKEN_MIME,
        DSNKind.BOUNCE,
        [("lost@bad.example.org", "failed", "5.5.0", False)],
        "rfc3464-text",
    ),
    ("nested", NESTED, DSNKind.BOUNCE, [("inner@example.jp", "failed", "5.1.1", True)], "rfc3464"),
    ("arf", ARF, DSNKind.FEEDBACK, [], "arf"),
    ("vacation", VACATION, DSNKind.AUTO_REPLY, [], "rfc3834"),
    ("x-autoreply", X_AUTOREPLY, DSNKind.AUTO_REPLY, [], "rfc3834"),
    ("precedence", PRECEDENCE, DSNKind.AUTO_REPLY, [], "rfc3834"),
    (
        "delivery-receipt",
        DELIVERY_RECEIPT,
        DSNKind.DELIVERED,
        [("boss@corp.example", "delivered", None, None)],
        "prose",
    ),
    ("read-receipt", READ_RECEIPT, DSNKind.NOT_A_REPORT, [], "none"),
    (
        "prose-delay",
        PROSE_DELAY,
        DSNKind.DELAY,
        [("later@example.net", "delayed", "4.3.0", False)],
        "prose",
    ),
    ("vacation-photos", VACATION_PHOTOS, DSNKind.NOT_A_REPORT, [], "none"),
    ("plain", PLAIN, DSNKind.NOT_A_REPORT, [], "none"),
    ("forwarded-bounce", FORWARDED_BOUNCE, DSNKind.NOT_A_REPORT, [], "none"),
]


@pytest.mark.parametrize(
    ("raw", "kind", "expected", "format_name"),
    [pytest.param(raw, kind, expected, fmt, id=name) for name, raw, kind, expected, fmt in FORMATS],
)
def test_formats(
    raw: bytes,
    kind: DSNKind,
    expected: list[tuple[str, str, str | None, bool | None]],
    format_name: str,
) -> None:
    report = parse_dsn(raw)
    assert report.kind is kind
    assert report.format == format_name
    got = [(r.address, r.action.value, r.status, r.is_hard) for r in report.recipients]
    assert got == expected


def test_rfc3464_fields() -> None:
    report = parse_dsn(RFC3464)
    assert report.envid == "trk42"
    assert report.reporting_mta == "relay.example.net"
    assert report.arrival_date == "Mon, 2 Mar 2026 10:00:00 +0000"
    assert report.original_message_id == "order-77@shop.example"
    assert report.original_sender == "news@shop.example"
    assert report.original_recipient == "ann@example.org"
    assert report.bounce_address == "bounces+trk42@shop.example"
    ann, bob = report.recipients
    assert ann.original_recipient == "Ann@Example.ORG"
    assert ann.final_recipient == "ann@example.org"
    assert ann.remote_mta == "mx.example.org"
    assert ann.reply_code == 550
    assert ann.diagnostic == "550 5.1.1 <ann@example.org>: mailbox does not exist"
    assert ann.last_attempt_date == "Mon, 2 Mar 2026 10:00:05 +0000"
    assert ann.is_permanent is True
    # A folded Diagnostic-Code is unfolded into one line.
    assert bob.diagnostic == "552 5.2.2 mailbox full, try later"
    assert report.failed == report.recipients
    assert report.is_bounce


@pytest.mark.parametrize(
    ("raw", "message_id"),
    [
        pytest.param(GLOBAL, "intl-1@shop.example", id="global-headers"),
        pytest.param(SUCCESS, "sent-9@shop.example", id="in-reply-to"),
        pytest.param(QMAIL, "q-1@shop.example", id="qmail-copy"),
        pytest.param(EXIM, "e-5@shop.example", id="exim-copy"),
        pytest.param(SES_JSON, "ses-3@shop.example", id="ses-headers"),
        pytest.param(ARF, "news-7@shop.example", id="arf-rfc822"),
    ],
)
def test_original_message_id(raw: bytes, message_id: str) -> None:
    assert parse_dsn(raw).original_message_id == message_id


def test_delay_fields() -> None:
    (slow,) = parse_dsn(DELAY).recipients
    assert slow.will_retry_until == "Fri, 6 Mar 2026 10:00:00 +0000"
    assert slow.is_permanent is False


def test_success_envid() -> None:
    report = parse_dsn(SUCCESS)
    assert report.envid == "track-9"
    assert report.recipients[0].is_permanent is None


def test_feedback_fields() -> None:
    report = parse_dsn(ARF)
    assert report.feedback_type == "abuse"
    assert report.original_recipient == "angry@isp.example"
    assert report.original_sender == "news@shop.example"
    assert not report.is_bounce


@pytest.mark.parametrize(
    ("text", "status"),
    [
        ("550 5.1.1 <a@b.example> unknown", "5.1.1"),
        ("Sorry (#5.1.1)", "5.1.1"),
        ("550-5.7.26 Unauthenticated", "5.7.26"),
        ("smtp; 5.1.0 - Unknown address error 550-'5.7.1 denied'", "5.1.0"),
        ("host 192.0.2.1 said: 550 no", None),
        ("version 4.10.1.2 crashed", None),
        ("4.4.7 expired", "4.4.7"),
        ("", None),
    ],
)
def test_find_status(text: str, status: str | None) -> None:
    assert find_status(text) == status


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("550 5.1.1 no", 550),
        ("said: 452-4.2.2 full", 452),
        ("error 1550 and 2550", None),
        ("(code=421)", 421),
        ("nothing here", None),
    ],
)
def test_find_reply_code(text: str, code: int | None) -> None:
    assert find_reply_code(text) == code


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00\xff\xfe garbage",
        b"Content-Type: multipart/report; report-type=delivery-status\r\n\r\nno boundary",
        b"Content-Type: message/delivery-status\r\n\r\nFinal-Recipient: ;\r\nAction: failed\r\n",
        b"From: MAILER-DAEMON@x\r\nSubject: failure notice\r\n\r\n<@>:\r\n",
        b'Content-Type: text/plain\r\n\r\n{"notificationType":"Bounce","bounce":[]}',
    ],
)
def test_garbage_is_not_a_report(raw: bytes) -> None:
    report = _parse(raw)
    assert report.kind is DSNKind.NOT_A_REPORT


def test_non_bytes_input_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        parse_dsn("text")  # type: ignore[arg-type]


FIELD_LINES = st.sampled_from(
    [
        "Final-Recipient: rfc822; a@example.org",
        "Original-Recipient: rfc822;<b@example.org>",
        "Action: failed",
        "Action: delayed",
        "Action: bogus",
        "Status: 5.1.1",
        "Status: 9.9",
        "Diagnostic-Code: smtp; 550 5.1.1 no",
        "Reporting-MTA: dns; x",
        "X-Failed-Recipients: c@example.org",
        "Content-Type: message/delivery-status",
        "Content-Type: multipart/report; boundary=B",
        "--B",
        "--B--",
        "From: MAILER-DAEMON@example.org",
        "Subject: Undeliverable",
        "Auto-Submitted: auto-replied",
        "Hi. This is the qmail-send program at x.",
        "<d@example.org>:",
        "",
        " folded",
    ]
)


@given(st.lists(st.one_of(FIELD_LINES, st.text(max_size=40)), max_size=40))
def test_mixed_lines_never_raise(lines: list[str]) -> None:
    raw = "\r\n".join(lines).encode("utf-8", "surrogatepass")
    report = _parse(raw)
    assert isinstance(report, DSNReport)
    for recipient in report.recipients:
        assert recipient.action in DSNAction


@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_raise(raw: bytes) -> None:
    # _parse is the parser without parse_dsn's last-resort guard, so a bug
    # that raises shows up here instead of being swallowed.
    assert isinstance(_parse(raw), DSNReport)
    assert isinstance(parse_dsn(raw), DSNReport)


STATUS_BLOCKS = (
    "Reporting-MTA: dns; relay.example.net\r\n\r\n"
    "Final-Recipient: rfc822; ann@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n"
    "Diagnostic-Code: smtp; 550 5.1.1 Postfach unbekannt \u00fcber=gr\u00fc\u00dfe\r\n"
).encode()


def report_with_status(ctype: str, encoding: str | None, body: bytes) -> bytes:
    """A multipart/report whose status part is ``body`` under ``encoding``."""
    cte = f"Content-Transfer-Encoding: {encoding}\r\n" if encoding else ""
    return (
        (
            "From: MAILER-DAEMON@relay.example.net\r\nTo: shop@shop.example\r\n"
            "Subject: failure\r\nMIME-Version: 1.0\r\n"
            "Content-Type: multipart/report; report-type=delivery-status; boundary=B\r\n\r\n"
            "--B\r\nContent-Type: text/plain\r\n\r\nIt failed.\r\n"
            f"--B\r\nContent-Type: {ctype}\r\n{cte}\r\n"
        ).encode()
        + body
        + b"\r\n--B--\r\n"
    )


@pytest.mark.parametrize("ctype", ["message/delivery-status", "message/global-delivery-status"])
@pytest.mark.parametrize(
    ("encoding", "encode"),
    [
        (None, lambda data: data),
        ("7bit", lambda data: data),
        ("8bit", lambda data: data),
        ("quoted-printable", quopri.encodestring),
        ("base64", base64.encodebytes),
    ],
    ids=["none", "7bit", "8bit", "quoted-printable", "base64"],
)
def test_status_part_in_any_transfer_encoding(
    ctype: str, encoding: str | None, encode: Callable[[bytes], bytes]
) -> None:
    # Seen in the wild: status parts sent quoted-printable or base64 (the feedparser
    # splits them into blocks without decoding), and UTF-8 in a plain delivery-status.
    report = _parse(report_with_status(ctype, encoding, encode(STATUS_BLOCKS)))
    assert report.kind is DSNKind.BOUNCE
    [recipient] = report.recipients
    assert recipient.address == "ann@example.org"
    assert recipient.status == "5.1.1"
    assert recipient.diagnostic == "550 5.1.1 Postfach unbekannt über=grüße"


def test_status_block_the_generator_cannot_write_is_still_read() -> None:
    # A block with a text type, a charset its bytes do not fit and a line that is not
    # a field (so the block has a body): the standard library's generator raises on
    # it, and the parser, which used to write blocks back out with it, read the whole
    # report as "unreadable".
    body = (
        b"Reporting-MTA: dns; relay.example.net\r\n\r\n"
        b"Final-Recipient: rfc822; ann@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        b"Content-Type: text/plain; charset=us-ascii\r\nbyte \xff here\r\n"
    )
    report = _parse(report_with_status("message/delivery-status", "quoted-printable", body))
    assert report.kind is DSNKind.BOUNCE
    assert [(r.address, r.status) for r in report.recipients] == [("ann@example.org", "5.1.1")]


@pytest.mark.parametrize("where", ["notice", "status"])
def test_charset_with_a_nul_is_not_fatal(where: str) -> None:
    # A charset parameter with a NUL makes the standard library's get_payload() raise
    # ValueError on a leaf part with 8-bit text; the parser once asked every part for its
    # payload while walking the message, and read the whole report as "unreadable".
    notice_type = 'text/plain; charset="us-ascii\0"' if where == "notice" else "text/plain"
    status_type = (
        'message/delivery-status; charset="us-ascii\0"'
        if where == "status"
        else "message/delivery-status"
    )
    raw = (
        (
            "From: MAILER-DAEMON@relay.example.net\r\nTo: shop@shop.example\r\n"
            "Subject: failure\r\nMIME-Version: 1.0\r\n"
            "Content-Type: multipart/report; report-type=delivery-status; boundary=B\r\n\r\n"
            f"--B\r\nContent-Type: {notice_type}\r\n\r\n"
        ).encode()
        + b"It failed: caf\xc3\xa9.\r\n"
        + (
            f"--B\r\nContent-Type: {status_type}\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        ).encode()
        + STATUS_BLOCKS
        + b"\r\n--B--\r\n"
    )
    report = _parse(raw)
    assert report.kind is DSNKind.BOUNCE
    assert [(r.address, r.status) for r in report.recipients] == [("ann@example.org", "5.1.1")]
