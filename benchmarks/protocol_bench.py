"""Benchmark the sans-I/O protocol core: CPU per pipelined message cycle, and reply parsing.

Run: ``python benchmarks/protocol_bench.py [--messages N] [--replies N]``.

1. One full pipelined transaction through :class:`ClientConnection`, no I/O:
   ``MAIL``/``RCPT``/``DATA`` sent as one group, their three replies parsed and
   matched, a 1 KiB body dot-stuffed, the terminator sent and the final reply
   parsed. Commands are built inside the loop, as a dialogue would. Goal: at
   most 25 µs per message.
   The same cycle once more through the batch forms the dialogue's ``send_many`` uses:
   :meth:`~ClientConnection.send_group` for the group (and for the data with its
   terminator, in wire form as a repeated message is sent) and
   :meth:`~ClientConnection.next_replies` for the replies.
2. Reply parsing in lines per second: :class:`ReplyReader` beside the parser of
   the standard library's ``smtplib`` (``SMTP.getreply`` reading from
   ``self.file``, here a ``BytesIO``) on the same bytes, once with the realistic
   mix of repeated replies (which our reader memoizes) and once with the first
   line of every reply distinct (which it cannot). Both sides do their whole job
   and nothing else: ``getreply`` reads each line, checks the code and collects
   the raw text (it neither decodes it nor parses enhanced status codes);
   ``ReplyReader`` gets the bytes in 4 KiB reads, as from a socket, and every
   reply is taken with ``pop()`` as a :class:`~mailrelay.reply.Reply` with its
   code, decoded lines and enhanced status. Neither side's input set-up (the
   ``BytesIO``, the list of reads) is timed.
"""

from __future__ import annotations

import argparse
import io
import smtplib
import time

from mailrelay.address import Address
from mailrelay.protocol import (
    NEED_DATA,
    ClientConnection,
    Data,
    DataChunk,
    Ehlo,
    EndOfData,
    MailFrom,
    RcptTo,
    ReplyReader,
    Response,
)
from mailrelay.protocol.data import stuff

BODY = (b"Subject: benchmark\r\n\r\n" + b"x" * 70 + b"\r\n.leading dot\r\n") * 11
BODY = BODY[:1024]
GREETING = b"220 mx.example ESMTP ready\r\n"
EHLO_REPLY = (
    b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 52428800\r\n250-8BITMIME\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n250 CHUNKING\r\n"
)
GROUP_REPLIES = b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
FINAL_REPLY = b"250 2.0.0 Ok: queued as 4XyZ1\r\n"


def drain(conn: ClientConnection) -> int:
    """Take every ready event; return how many there were."""
    count = 0
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return count
        assert isinstance(event, Response)
        count += 1


def message_cycles(messages: int) -> float:
    """CPU seconds per pipelined message cycle."""
    conn = ClientConnection()
    conn.receive_data(GREETING)
    conn.next_event()
    conn.send(Ehlo("client.example"))
    conn.receive_data(EHLO_REPLY)
    drain(conn)
    sender = Address.parse("sender@example.org")
    recipient = Address.parse("rcpt@example.net")
    size = str(len(BODY))
    start = time.process_time()
    for _ in range(messages):
        group = (
            conn.send(MailFrom(sender, (("SIZE", size), ("BODY", "8BITMIME"))))
            + conn.send(RcptTo(recipient))
            + conn.send(Data())
        )
        assert group.endswith(b"DATA\r\n")
        conn.receive_data(GROUP_REPLIES)
        events = drain(conn)
        wire = conn.send(DataChunk(BODY)) + conn.send(EndOfData())
        conn.receive_data(FINAL_REPLY)
        events += drain(conn)
        assert events == 4
        assert wire.endswith(b"\r\n.\r\n")
    return (time.process_time() - start) / messages


def batch_cycles(messages: int) -> float:
    """CPU seconds per pipelined message cycle through send_group() and next_replies()."""
    conn = ClientConnection()
    conn.receive_data(GREETING)
    conn.next_event()
    conn.send(Ehlo("client.example"))
    conn.receive_data(EHLO_REPLY)
    drain(conn)
    sender = Address.parse("sender@example.org")
    recipient = Address.parse("rcpt@example.net")
    size = str(len(BODY))
    # The wire form of the body, as the dialogue keeps it for a message sent again.
    wire = stuff(BODY)[:-3]
    start = time.process_time()
    for _ in range(messages):
        group = conn.send_group(
            [MailFrom(sender, (("SIZE", size), ("BODY", "8BITMIME"))), RcptTo(recipient), Data()]
        )
        assert group.endswith(b"DATA\r\n")
        conn.receive_data(GROUP_REPLIES)
        events = len(conn.next_replies(3))
        data = conn.send_group([DataChunk(wire, stuffed=True), EndOfData()])
        conn.receive_data(FINAL_REPLY)
        events += len(conn.next_replies(1))
        assert events == 4
        assert data.endswith(b"\r\n.\r\n")
    return (time.process_time() - start) / messages


class _FakeSMTP(smtplib.SMTP):
    """smtplib's reply parser, reading from a BytesIO instead of a socket."""

    def __init__(self, data: bytes) -> None:
        super().__init__()  # no host: does not connect
        self.file = io.BytesIO(data)


def reply_stream(lines: int, distinct: bool) -> bytes:
    """A stream of single- and multi-line replies, ``lines`` lines in all."""
    out = []
    n = 0
    while n < lines:
        tag = f" {n}" if distinct else ""
        out.append(f"250 2.1.5 Recipient ok{tag}\r\n")
        out.append(f"250-mx.example{tag}\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 8BITMIME\r\n")
        out.append(f"354 End data with <CR><LF>.<CR><LF>{tag}\r\n")
        out.append(f"550 5.1.1 <u@example.net>: Recipient address rejected{tag}\r\n")
        n += 7
    return "".join(out).encode()


def parse_ours(data: bytes, feed_size: int) -> tuple[float, int]:
    reads = [data[offset : offset + feed_size] for offset in range(0, len(data), feed_size)]
    start = time.process_time()
    reader = ReplyReader()
    replies = 0
    for read in reads:
        reader.feed(read)
        while reader.pop() is not None:
            replies += 1
    return time.process_time() - start, replies


def parse_smtplib(data: bytes) -> tuple[float, int]:
    fake = _FakeSMTP(data)
    replies = 0
    start = time.process_time()
    try:
        while True:
            code, _ = fake.getreply()
            if code == -1:
                break
            replies += 1
    except smtplib.SMTPServerDisconnected:
        pass
    return time.process_time() - start, replies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--replies", type=int, default=200_000, help="reply lines to parse")
    args = parser.parse_args()

    message_cycles(min(2_000, args.messages))  # warm up
    per_message = min(message_cycles(args.messages) for _ in range(3))
    label = "pipelined MAIL/RCPT/DATA + 1 KiB body + replies"
    print(f"{label}: {per_message * 1e6:.1f} µs CPU/message")
    print(f"  ({1 / per_message:,.0f} messages/s; goal <= 25 µs)")
    batch_cycles(min(2_000, args.messages))  # warm up
    per_message = min(batch_cycles(args.messages) for _ in range(3))
    print(f"the same through send_group/next_replies: {per_message * 1e6:.1f} µs CPU/message")

    for distinct in (False, True):
        data = reply_stream(args.replies, distinct)
        lines = data.count(b"\n")
        ours_time, ours_replies = min(parse_ours(data, 4096) for _ in range(3))
        lib_time, lib_replies = min(parse_smtplib(data) for _ in range(3))
        assert ours_replies == lib_replies, (ours_replies, lib_replies)
        label = "distinct lines" if distinct else "repeated replies"
        print(f"reply parsing, {label} ({lines:,} lines, {ours_replies:,} replies):")
        print(f"  mailrelay ReplyReader: {lines / ours_time:,.0f} lines/s")
        print(f"  smtplib getreply     : {lines / lib_time:,.0f} lines/s")
        print(f"  ratio                : {lib_time / ours_time:.2f}x")


if __name__ == "__main__":
    main()
