"""Helpers for the end-to-end fidelity properties (``test_fidelity.py``).

Theory of operation: the properties send generated messages through the real transports
to real servers and compare what the *server* received with what mailrelay promises. The
promise is computed here a second time, independently of :mod:`mailrelay.message` and
:mod:`mailrelay._wire`, straight from the rules in ``docs/messages.md``:

* RFC 5321 §2.3.8: every line ends in CRLF; a bare CR or a bare LF becomes CRLF (a CR
  followed by an LF is one line end, not two).
* RFC 5322 §3.6.3, §3.6.6: ``Bcc`` and ``Resent-Bcc`` fields (with their continuation
  lines) are not on the wire. The header block ends after its first empty line, or before
  the first line that is neither a field nor a continuation (the email package's reading
  of a malformed message); a continuation line cannot start the message.
* RFC 5321 §4.1.1.4: the data ends with CRLF, so one is added when the message does not
  end with one (an empty wire form stays empty: only the terminator goes out).
* RFC 6152 / RFC 6531: ``BODY=8BITMIME`` exactly when the body (after the header block)
  holds a byte of 0x80 or above; ``SMTPUTF8`` exactly when the header block on the wire
  does, or an envelope address has a non-ASCII local part.

Also here: :func:`start_fidelity_server`, aiosmtpd that also records each transaction's
MAIL and RCPT lines as they arrived and, when asked, offers PIPELINING (RFC 2920) and
STARTTLS (RFC 3207), so the client's pipelined and TLS paths meet a real server
in-process; and :func:`split_delivered`, which
takes apart a message Postfix delivered to a Maildir: the trace fields its delivery agent
prepends, then the message as received, with LF line ends.
"""

from __future__ import annotations

import re
import ssl
from typing import Any

import attrs
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from mailrelay.address import Address
from tests.peers.aiosmtpd_server import DATA_SIZE_LIMIT, HOSTNAME, RecordingHandler
from tests.peers.scripted import free_port

__all__ = [
    "TRACE_FIELDS",
    "Commands",
    "Expected",
    "FidelityHandler",
    "expected_path",
    "expected_wire",
    "split_delivered",
    "start_fidelity_server",
]

# RFC 5321 §2.3.8: CRLF, a bare CR or a bare LF each end one line.
_LINE_END = re.compile(rb"\r\n|\r|\n")
# RFC 5322 §2.2 field name (printable ASCII but ":"), obsolete white space before the colon.
_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")
_BLIND = frozenset({b"bcc", b"resent-bcc"})


@attrs.frozen(kw_only=True)
class Expected:
    """What a server must receive for one raw message.

    Attributes:
        head: the header block on the wire (CRLF line ends, no blind fields), with the
            empty line that ends it when there is one.
        body: the body on the wire (CRLF line ends).
    """

    head: bytes
    body: bytes

    @property
    def wire(self) -> bytes:
        """The wire form before the data's end: ``Message.as_bytes()``'s promise."""
        return self.head + self.body

    @property
    def received(self) -> bytes:
        """The data a server keeps (after dot-unstuffing): the wire form with a final CRLF."""
        wire = self.wire
        return wire if not wire or wire.endswith(b"\r\n") else wire + b"\r\n"

    @property
    def eight_bit_body(self) -> bool:
        """Whether the body needs 8BITMIME (RFC 6152)."""
        return not self.body.isascii()

    @property
    def utf8_head(self) -> bool:
        """Whether the header block needs SMTPUTF8 (RFC 6532)."""
        return not self.head.isascii()


def expected_wire(raw: bytes) -> Expected:
    """The wire form mailrelay promises for ``raw`` (see the module docstring)."""
    normalized = _LINE_END.sub(b"\r\n", raw)
    lines = normalized.splitlines(keepends=True)
    head: list[bytes] = []
    body_start = len(lines)
    dropping = False
    for index, line in enumerate(lines):
        text = line.removesuffix(b"\r\n")
        if not text:
            head.append(line)  # the empty line that ends the header block
            body_start = index + 1
            break
        if text[:1] in (b" ", b"\t"):
            if index == 0:
                body_start = 0  # a continuation cannot start the message
                break
            if not dropping:
                head.append(line)
            continue
        field = _FIELD.match(text)
        if field is None:
            body_start = index  # neither a field nor a continuation: the body starts
            break
        dropping = field.group(1).lower() in _BLIND
        if not dropping:
            head.append(line)
    return Expected(head=b"".join(head), body=b"".join(lines[body_start:]))


def expected_path(address: Address | None, smtputf8: bool) -> str:
    """The reverse- or forward-path a server records: U-labels with SMTPUTF8, else
    A-labels (RFC 6531 §3.2); ``""`` for the null reverse-path."""
    if address is None:
        return ""
    return address.smtp_path(smtputf8)


# -- aiosmtpd recording the command lines --------------------------------------------------


@attrs.frozen(kw_only=True)
class Commands:
    """The MAIL and RCPT arguments of one transaction exactly as they arrived.

    Attributes:
        mail: what followed ``MAIL `` (``FROM:<path> SIZE=...``), decoded as UTF-8.
        rcpts: what followed each ``RCPT `` (``TO:<path>``), refused ones included, in order.
    """

    mail: str
    rcpts: tuple[str, ...]


class FidelityHandler(RecordingHandler):
    """The suite's recording handler (replies scripted by local part, see
    :mod:`tests.peers.aiosmtpd_server`) that also keeps each transaction's command lines.

    aiosmtpd's own record of the paths is its parse of them (a quoted ``"."`` local part
    comes out as ``.``), so the paths are compared as they were written on the wire.

    Args:
        pipelining: offer PIPELINING (RFC 2920) in the EHLO reply.

    Attributes:
        commands: one :class:`Commands` per recorded message, in the order of ``messages``.
    """

    def __init__(self, *, pipelining: bool) -> None:
        super().__init__()
        self.pipelining = pipelining
        self.commands: list[Commands] = []
        self._open: dict[int, tuple[str, list[str]]] = {}

    def saw_mail(self, server: SMTP, arg: str | None) -> None:
        """A MAIL command arrived: a new transaction's commands start."""
        self._open[id(server)] = (arg or "", [])

    def saw_rcpt(self, server: SMTP, arg: str | None) -> None:
        """A RCPT command arrived."""
        opened = self._open.get(id(server))
        if opened is not None:
            opened[1].append(arg or "")

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: Any
    ) -> Any:
        """Offer PIPELINING when asked to, besides what aiosmtpd offers."""
        session.host_name = hostname  # what aiosmtpd does itself when there is no hook
        if not self.pipelining:
            return responses
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Record the transaction with its command lines."""
        mail, rcpts = self._open.pop(id(server), ("", []))
        self.commands.append(Commands(mail=mail, rcpts=tuple(rcpts)))
        return await super().handle_DATA(server, session, envelope)


class _CommandRecordingSMTP(SMTP):
    """aiosmtpd's SMTP, showing its handler each MAIL and RCPT argument first."""

    async def smtp_MAIL(self, arg: str | None) -> None:
        if isinstance(self.event_handler, FidelityHandler):
            self.event_handler.saw_mail(self, arg)
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        if isinstance(self.event_handler, FidelityHandler):
            self.event_handler.saw_rcpt(self, arg)
        await super().smtp_RCPT(arg)


class _Controller(Controller):
    def factory(self) -> SMTP:
        return _CommandRecordingSMTP(self.handler, **self.SMTP_kwargs)


def start_fidelity_server(
    *, pipelining: bool, tls_context: ssl.SSLContext | None = None
) -> tuple[Controller, FidelityHandler]:
    """Start aiosmtpd on 127.0.0.1 and a free port: no AUTH; SMTPUTF8, 8BITMIME, SIZE;
    PIPELINING when asked (aiosmtpd reads one command at a time, so a pipelined group is
    answered in order); STARTTLS (RFC 3207, not required) with a server ``tls_context``.
    The caller stops the controller."""
    handler = FidelityHandler(pipelining=pipelining)
    extra: dict[str, Any] = {}
    if tls_context is not None:
        extra = {"tls_context": tls_context, "require_starttls": False}
    controller = _Controller(
        handler,
        hostname="127.0.0.1",
        port=free_port(),
        server_hostname=HOSTNAME,
        enable_SMTPUTF8=True,
        decode_data=False,
        data_size_limit=DATA_SIZE_LIMIT,
        timeout=30,
        **extra,
    )
    controller.start()
    return controller, handler


# -- Postfix's Maildir copies -----------------------------------------------------------------

#: The fields Postfix's virtual(8) delivery agent prepends, in order (seen in delivered files:
#: Return-Path from the envelope sender, X-Original-To and Delivered-To from the recipient,
#: then smtpd's Received field, folded over three lines).
TRACE_FIELDS = ("Return-Path", "X-Original-To", "Delivered-To", "Received")


def split_delivered(copy: bytes) -> tuple[list[tuple[str, bytes]], bytes]:
    """Split a delivered Maildir file into the trace fields Postfix prepended and the rest.

    Returns:
        ``(name, value)`` for each prepended field (continuation lines joined, LF kept) and
        the message after them, as stored (LF line ends).

    Raises:
        AssertionError: the file does not start with exactly :data:`TRACE_FIELDS`.
    """
    fields: list[tuple[str, bytes]] = []
    rest = copy
    for name in TRACE_FIELDS:
        prefix = name.encode() + b": "
        assert rest.startswith(prefix), (name, copy[:400])
        end = rest.index(b"\n") + 1
        # Continuation lines (the Received field is folded with tabs).
        while rest[end : end + 1] in (b"\t", b" "):
            end = rest.index(b"\n", end) + 1
        fields.append((name, rest[len(prefix) : end]))
        rest = rest[end:]
    return fields, rest
