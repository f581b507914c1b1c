"""Per-message cost of building personalised messages: mailrelay beside the standard library.

Run from the repository root::

    python benchmarks/message_bench.py [--count 2000] [--repeat 5]

For each content shape it times, per message:

* **mailrelay**: ``Message.build(...)`` + ``Envelope.from_message(message)`` +
  ``message.as_bytes()`` — everything a bulk sender pays before the SMTP dialogue;
* **stdlib**: ``email.message.EmailMessage`` built with the same fields (Date and
  Message-ID included, as ``Message.build`` adds them) + what ``smtplib``'s
  ``send_message`` does before ``sendmail``: read the envelope addresses with
  ``email.utils.getaddresses``, copy the message, drop ``Bcc``, flatten it with a
  ``BytesGenerator`` (CRLF line ends).

It prints microseconds per message (best of ``--repeat`` runs) and the ratio. The goal
(issue 4, item 9): mailrelay at least 3x faster than the stdlib path. It asserts nothing.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import email.utils
import io
import sys
import time
from collections.abc import Callable
from email.generator import BytesGenerator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mailrelay.envelope import Envelope
from mailrelay.message import Message

SENDER = "news@mailrelay.test"
SENDER_NAME = "Mailrelay News"
PDF = b"%PDF-1.4\n" + bytes(range(256)) * 8


def fields(n: int, shape: str) -> dict[str, Any]:
    """The content of message ``n`` for one shape, as build() arguments."""
    code = f"{n * 7919 % 100000:05d}"
    content: dict[str, Any] = {
        "sender": (SENDER_NAME, SENDER),
        "to": [(f"User {n}", f"user{n}@example.com")],
        "subject": f"Hello user {n}, your code",
        "text": f"Dear user {n},\n\nyour code is {code}.\n\nRegards,\nthe team\n",
        "headers": [("X-Campaign", "autumn"), ("X-User-Id", str(n))],
    }
    if shape in ("alternative", "attachment"):
        content["html"] = f"<p>Dear user {n},</p><p>your code is <b>{code}</b>.</p>"
    if shape == "utf-8":
        content["to"] = [(f"Zoë {n}", f"user{n}@example.com")]
        content["subject"] = f"Grüße, Nutzer {n}"
        content["text"] = f"Liebe Zoë {n},\n\nIhr Code lautet {code}.\n\nGrüße\n"
    if shape == "attachment":
        content["attachments"] = [("invoice.pdf", PDF, "application/pdf")]
    return content


def mailrelay_path(n: int, shape: str) -> bytes:
    message = Message.build(**fields(n, shape))
    Envelope.from_message(message)
    return message.as_bytes()


def stdlib_path(n: int, shape: str) -> bytes:
    content = fields(n, shape)
    message = EmailMessage()
    name, address = content["sender"]
    message["From"] = email.utils.formataddr((name, address))
    message["To"] = ", ".join(email.utils.formataddr(pair) for pair in content["to"])
    message["Subject"] = content["subject"]
    message["Date"] = email.utils.format_datetime(dt.datetime.now(dt.UTC))
    message["Message-ID"] = email.utils.make_msgid(domain="mailrelay.test")
    for key, value in content["headers"]:
        message[key] = value
    message.set_content(content["text"])
    if "html" in content:
        message.add_alternative(content["html"], subtype="html")
    for filename, data, content_type in content.get("attachments", ()):
        maintype, _, subtype = content_type.partition("/")
        message.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    # What smtplib.SMTP.send_message does before sendmail():
    sender = email.utils.getaddresses([message["From"]])[0][1]
    recipients = [a[1] for a in email.utils.getaddresses([message["To"]])]
    assert sender
    assert recipients
    flat = copy.copy(message)
    del flat["Bcc"]
    del flat["Resent-Bcc"]
    with io.BytesIO() as out:
        BytesGenerator(out).flatten(flat, linesep="\r\n")
        return out.getvalue()


def per_message(work: Callable[[int, str], bytes], shape: str, count: int, repeat: int) -> float:
    """Best wall-clock microseconds per message over ``repeat`` runs of ``count``."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for n in range(count):
            work(n, shape)
        best = min(best, time.perf_counter() - start)
    return best / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=2000, help="messages per run")
    parser.add_argument("--repeat", type=int, default=5, help="runs per path (best kept)")
    args = parser.parse_args()
    print(f"{args.count} messages per run, best of {args.repeat}; µs per message")
    print(f"  {'shape':<12} {'mailrelay':>10} {'stdlib':>10} {'ratio':>7}")
    for shape in ("text", "alternative", "utf-8", "attachment"):
        ours = per_message(mailrelay_path, shape, args.count, args.repeat)
        theirs = per_message(stdlib_path, shape, args.count, args.repeat)
        print(f"  {shape:<12} {ours:10.1f} {theirs:10.1f} {theirs / ours:6.1f}x")


if __name__ == "__main__":
    main()
