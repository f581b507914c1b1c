"""Generate delivery-status notifications, and VERP bounce addresses.

Rules of this module:

* :func:`build_dsn` writes an RFC 3464 ``multipart/report;
  report-type=delivery-status`` message (RFC 6522) as CRLF bytes: a
  human-readable part, the ``message/delivery-status`` part, and the returned
  headers (``text/rfc822-headers``, RFC 6522 §4) or whole message
  (``message/rfc822``) as the sender's RET asked (RFC 3461 §4.3).
* **Never a DSN to the null reverse-path** (RFC 3461 §6.2, RFC 5321 §4.5.5):
  :func:`build_dsn` raises :class:`~mailrelay.errors.MessageError` when the
  envelope sender is ``None`` or empty, so bounce loops cannot start here.
* The report is from ``MAILER-DAEMON@<reporting host>`` and carries
  ``Auto-Submitted: auto-replied`` (RFC 3834 §5) so that well-behaved systems
  answer it with nothing.
* Recipients' addresses or diagnostics with non-ASCII text switch the report to
  ``message/global-delivery-status`` with ``utf-8`` address types (RFC 6533 §3);
  a returned message with 8-bit headers goes back as ``message/global`` or
  ``message/global-headers`` (RFC 6533 §3.5, §6).
* Every value placed in a header or field was checked for CR, LF and NUL by
  :class:`DSNRecipient` or here: nothing the caller passes can inject a field.
* VERP (variable envelope return path): :func:`verp_encode` puts a tracking id
  in the bounce address's local part (``bounces+ID@example.org``), and
  :func:`verp_decode` takes it back out of the address a report was sent to
  (:attr:`DSNReport.bounce_address`).
"""

from __future__ import annotations

import datetime as dt
import email.utils
import re
import textwrap
import uuid
from collections.abc import Sequence

from mailrelay.address import Address
from mailrelay.envelope import Ret
from mailrelay.errors import InvalidAddress, MessageError
from mailrelay.tracker.dsn import DSNAction, DSNRecipient

__all__ = ["build_dsn", "verp_decode", "verp_encode"]

_HOST_RE = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)*[A-Za-z0-9-]+$|^\[[^\]\s]+\]$"
)
_DEFAULT_STATUS = {
    DSNAction.FAILED: "5.0.0",
    DSNAction.DELAYED: "4.0.0",
    DSNAction.DELIVERED: "2.0.0",
    DSNAction.RELAYED: "2.0.0",
    DSNAction.EXPANDED: "2.0.0",
}
_SUBJECTS = {
    DSNAction.FAILED: "Delivery Status Notification (Failure)",
    DSNAction.DELAYED: "Delivery Status Notification (Delay)",
    DSNAction.DELIVERED: "Delivery Status Notification (Success)",
    DSNAction.RELAYED: "Delivery Status Notification (Relayed)",
    DSNAction.EXPANDED: "Delivery Status Notification (Expanded)",
}
_FOLD_WIDTH = 76
#: The longest word a folded field keeps whole: with its fold's leading space it stays
#: well under the 998 characters RFC 5322 §2.1.1 allows a line.
_MAX_WORD = 900
# RFC 3464 §2.3.1: address-type ";" generic-address; an address never starts with a
# type-like atom and a semicolon (a quoted local part starts with the quote).
_TYPED_ADDRESS_RE = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)[ \t]*;[ \t]*(.*)", re.DOTALL)


def build_dsn(
    *,
    original: bytes,
    envelope_sender: str | None,
    recipients: Sequence[DSNRecipient],
    reporting_mta: str,
    envid: str | None = None,
    ret: Ret | str | None = None,
    arrival_date: dt.datetime | None = None,
    date: dt.datetime | None = None,
    message_id: str | None = None,
    explanation: str | None = None,
) -> bytes:
    """Build a delivery-status notification to send back to ``envelope_sender``.

    Args:
        original: the message the report is about, as submitted (any line endings).
        envelope_sender: the reverse-path the report goes to. ``None`` or ``""``
            (the null reverse-path) is refused.
        recipients: one entry per recipient being reported, with ``action``
            (``failed``, ``delayed``, ``delivered``, ...), ``status`` (defaults
            from the action when ``None``), and optionally ``diagnostic``,
            ``remote_mta``, ``original_recipient`` (the ORCPT), ``last_attempt_date``
            and, for delays, ``will_retry_until``.
        reporting_mta: our host name (ASCII, A-labels for IDNs), used in
            ``Reporting-MTA`` and the From address ``MAILER-DAEMON@reporting_mta``.
        envid: the ENVID the sender gave (``Original-Envelope-Id``, RFC 3464 §2.2.1).
        ret: the sender's RET (:class:`mailrelay.envelope.Ret` or its name):
            ``FULL`` returns the whole message, ``HDRS`` or ``None`` its headers
            only (RFC 3461 §4.3 leaves the default to us; headers are the safe
            choice).
        arrival_date: when we received the message (``Arrival-Date``).
        date: the report's Date (default: now, UTC).
        message_id: the report's Message-ID without brackets (default: a new one).
        explanation: the human-readable text (default: a short English summary
            naming each recipient); used as given, so keep its lines short.

    Returns:
        The report as CRLF bytes, ready for ``Message.from_bytes`` and a
        transport (with the null reverse-path as its own envelope sender).

    Raises:
        MessageError: for a null reverse-path, no recipients, a bad RET value,
            a host name or ENVID that cannot go in a header field.
    """
    if not envelope_sender:
        # RFC 3461 §6.2 / RFC 5321 §4.5.5: a message with the null
        # reverse-path must never be answered with a DSN (no bounce loops).
        raise MessageError("no DSN is sent for a message with the null reverse-path")
    _check_field("envelope sender", envelope_sender)
    try:
        # The envelope grammar (RFC 5321 §4.1.2), quoted local parts included: a sender
        # such as "john smith"@example.org is owed its report like any other.
        sender = Address.parse(envelope_sender)
    except InvalidAddress:
        raise MessageError(f"not an envelope address: {envelope_sender!r}") from None
    if not recipients:
        raise MessageError("a DSN needs at least one recipient")
    if not _HOST_RE.match(reporting_mta):
        raise MessageError(f"not a host name: {reporting_mta!r}")
    if envid is not None:
        _check_field("envid", envid)
    mode = (ret.value if isinstance(ret, Ret) else ret or "HDRS").upper()
    if mode not in ("FULL", "HDRS"):
        raise MessageError(f"RET must be FULL or HDRS, not {ret!r}")
    if message_id is not None:
        _check_field("message_id", message_id)
        message_id = message_id.strip("<>")

    now = date or dt.datetime.now(dt.UTC)
    original = _crlf(original)
    # RFC 5322 §2.1: the header block ends at the first empty line, which may be the
    # very first line (no header fields): then there is no header to return for HDRS.
    head = b"" if original.startswith(b"\r\n") else original.partition(b"\r\n\r\n")[0]
    returned = original if mode == "FULL" else head + b"\r\n"
    original_id = _original_message_id(head)
    utf8 = any(
        not (r.address + (r.diagnostic or "") + (r.original_recipient or "")).isascii()
        for r in recipients
    )
    boundary = _boundary(original)
    mid = message_id or email.utils.make_msgid(domain=reporting_mta).strip("<>")

    worst = _headline_action(recipients)
    headers = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{sender}>",
        f"Subject: {_SUBJECTS[worst]}",
        f"Date: {email.utils.format_datetime(_aware(now))}",
        f"Message-ID: <{mid}>",
        # RFC 3834 §5: automatic responses say so; no one should answer them.
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f' boundary="{boundary}"',
    ]
    if original_id:
        headers.insert(5, f"In-Reply-To: <{original_id}>")
        headers.insert(6, f"References: <{original_id}>")

    text = explanation if explanation is not None else _explanation(reporting_mta, recipients)
    status_type = "message/global-delivery-status" if utf8 else "message/delivery-status"
    returned_8bit = not head.isascii()
    if mode == "FULL":
        returned_type = "message/global" if returned_8bit else "message/rfc822"
    else:
        returned_type = "message/global-headers" if returned_8bit else "text/rfc822-headers"

    status = _status_body(
        recipients, reporting_mta=reporting_mta, envid=envid, arrival=arrival_date, utf8=utf8
    )
    if not (text.isascii() and status.isascii() and returned.isascii()):
        # RFC 2045 §6.4: a multipart's encoding is never narrower than its parts' (and
        # without one it is 7bit, §6.1).
        headers.append("Content-Transfer-Encoding: 8bit")
    parts = [
        # RFC 6532 §3: a non-ASCII sender address goes in the header as UTF-8.
        "\r\n".join(headers).encode("utf-8"),
        b"",
        b"This is a MIME-encapsulated delivery status notification.",
        b"",
        f"--{boundary}".encode("ascii"),
        b"Content-Type: text/plain; charset=utf-8",
        b"Content-Transfer-Encoding: " + (b"7bit" if text.isascii() else b"8bit"),
        b"Content-Description: Notification",
        b"",
        _crlf(text.encode("utf-8")).rstrip(b"\r\n"),
        b"",
        f"--{boundary}".encode("ascii"),
        f"Content-Type: {status_type}".encode("ascii"),
        b"Content-Description: Delivery report",
        # RFC 6533 registers message/global-delivery-status as UTF-8 text: 8bit (without a
        # Content-Transfer-Encoding a part is 7bit, RFC 2045 §6.1).
        *([] if status.isascii() else [b"Content-Transfer-Encoding: 8bit"]),
        b"",
        status,
        b"",
        f"--{boundary}".encode("ascii"),
        f"Content-Type: {returned_type}".encode("ascii"),
        b"Content-Description: " + (b"Returned message" if mode == "FULL" else b"Returned headers"),
    ]
    if not returned.isascii():
        # RFC 2046 §5.2.1: message/rfc822 may be 7bit, 8bit or binary only.
        parts.append(b"Content-Transfer-Encoding: 8bit")
    parts += [b"", returned.rstrip(b"\r\n"), b"", f"--{boundary}--".encode("ascii"), b""]
    return b"\r\n".join(parts)


def _status_body(
    recipients: Sequence[DSNRecipient],
    *,
    reporting_mta: str,
    envid: str | None,
    arrival: dt.datetime | None,
    utf8: bool,
) -> bytes:
    # RFC 3464 §2.2: the per-message fields, then one block per recipient (§2.3).
    blocks = [[f"Reporting-MTA: dns; {reporting_mta}"]]
    if envid is not None:
        blocks[0].append(f"Original-Envelope-Id: {envid}")
    if arrival is not None:
        blocks[0].append(f"Arrival-Date: {email.utils.format_datetime(_aware(arrival))}")
    address_type = "utf-8" if utf8 else "rfc822"
    for recipient in recipients:
        block = []
        if recipient.original_recipient:
            original = _typed_address(recipient.original_recipient, address_type)
            block.append(f"Original-Recipient: {original}")
        final = recipient.final_recipient or recipient.address
        block.append(f"Final-Recipient: {address_type}; {final}")
        block.append(f"Action: {recipient.action.value}")
        block.append(f"Status: {recipient.status or _DEFAULT_STATUS[recipient.action]}")
        if recipient.remote_mta:
            block.append(f"Remote-MTA: dns; {recipient.remote_mta}")
        if recipient.diagnostic:
            block.append(_fold(f"Diagnostic-Code: smtp; {recipient.diagnostic}"))
        if recipient.last_attempt_date:
            block.append(f"Last-Attempt-Date: {recipient.last_attempt_date}")
        if recipient.will_retry_until and recipient.action is DSNAction.DELAYED:
            block.append(f"Will-Retry-Until: {recipient.will_retry_until}")
        blocks.append(block)
    text = "\r\n\r\n".join("\r\n".join(block) for block in blocks)
    return text.encode("utf-8")


def _typed_address(value: str, default_type: str) -> str:
    """``type; address`` (RFC 3464 §2.3.1): a value that names its address type already
    (the ORCPT parameter's own form, ``rfc822;ann@example.org``) keeps it, once."""
    typed = _TYPED_ADDRESS_RE.fullmatch(value)
    if typed is not None:
        return f"{typed[1]}; {typed[2]}"
    return f"{default_type}; {value}"


def _fold(line: str) -> str:
    """Fold a long field at spaces (RFC 5322 §2.2.3) so lines stay short.

    A word too long for any line (a server's reply can hold one of thousands of
    characters) is cut into pieces (:func:`_pieces`): RFC 5322 §2.1.1 allows no line
    over 998 characters, and a receiving server may refuse the whole report for one.
    """
    line = line.rstrip()
    if len(line) <= _FOLD_WIDTH:
        return line
    out: list[str] = []
    current = ""
    words = (piece for word in line.split(" ") for piece in _pieces(word))
    for word in words:
        if current and len(current) + 1 + len(word) > _FOLD_WIDTH:
            out.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    out.append(current)
    return "\r\n ".join(out)


def _pieces(word: str) -> list[str]:
    """``word``, cut into pieces of at most :data:`_MAX_WORD` octets in UTF-8 (the line
    limit counts octets, RFC 6532 §3.4; a character is at most 4 of them)."""
    if len(word.encode("utf-8")) <= _MAX_WORD:
        return [word]
    size = _MAX_WORD if word.isascii() else _MAX_WORD // 4
    return [word[i : i + size] for i in range(0, len(word), size)]


def _explanation(host: str, recipients: Sequence[DSNRecipient]) -> str:
    lines = [f"This is the mail system at host {host}.", ""]
    failed = [r for r in recipients if r.action is DSNAction.FAILED]
    delayed = [r for r in recipients if r.action is DSNAction.DELAYED]
    done = [r for r in recipients if r.action not in (DSNAction.FAILED, DSNAction.DELAYED)]
    if failed:
        lines += ["Your message could not be delivered to these recipients:", ""]
        lines += [_line(r) for r in failed] + [""]
    if delayed:
        lines += [
            "Delivery to these recipients is delayed; we will keep trying:",
            "",
        ]
        lines += [_line(r) for r in delayed] + [""]
    if done:
        lines += ["Your message was delivered (or passed on) to these recipients:", ""]
        lines += [_line(r) for r in done] + [""]
    return "\n".join(lines)


def _line(recipient: DSNRecipient) -> str:
    detail = recipient.diagnostic or recipient.status or recipient.action.value
    if recipient.action is DSNAction.DELAYED and recipient.will_retry_until:
        detail += f" (retried until {recipient.will_retry_until})"
    # Keep the text part's lines short (RFC 5322 §2.1.1).
    return textwrap.fill(
        f"<{recipient.address}>: {detail}", width=_FOLD_WIDTH, subsequent_indent="    "
    )


def _headline_action(recipients: Sequence[DSNRecipient]) -> DSNAction:
    actions = {r.action for r in recipients}
    for action in (DSNAction.FAILED, DSNAction.DELAYED, DSNAction.DELIVERED, DSNAction.RELAYED):
        if action in actions:
            return action
    return DSNAction.EXPANDED


def _original_message_id(head: bytes) -> str | None:
    match = re.search(rb"(?im)^message-id[ \t]*:[ \t]*(?:\r\n[ \t]+)?<([^<>\s]+)>", head)
    if match is None:
        return None
    value = match.group(1).decode("ascii", "replace")
    return value if value.isascii() and "\ufffd" not in value else None


def _boundary(original: bytes) -> str:
    # A random boundary cannot plausibly occur in the returned content; check anyway.
    for _ in range(8):
        boundary = f"=_dsn_{uuid.uuid4().hex}"
        if boundary.encode("ascii") not in original:
            return boundary
    raise MessageError("could not find a MIME boundary absent from the message")


def _crlf(data: bytes) -> bytes:
    return re.sub(rb"\r?\n|\r", b"\r\n", data)


def _aware(when: dt.datetime) -> dt.datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


def _check_field(name: str, value: str) -> None:
    if any(c in value for c in "\r\n\x00"):
        raise MessageError(f"{name} must not contain CR, LF or NUL: {value!r}")


# ---------------------------------------------------------------------------
# VERP bounce addresses

# RFC 5321 §4.1.2: atext and dots make a dot-string, safe unquoted in a local part.
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~-"
_ID_RE = re.compile(rf"^[{_ATEXT}]+(?:\.[{_ATEXT}]+)*$")
_LOCAL_RE = _ID_RE


def verp_encode(local: str, domain: str, tracking_id: str, *, separator: str = "+") -> str:
    """Make a per-message bounce address: ``local+tracking_id@domain``.

    Use it as the envelope sender (MAIL FROM) of the tracked message; bounces then
    come back to an address that names the message even when a report carries
    nothing else usable.

    Args:
        local: the bounce mailbox's local part (``"bounces"``).
        domain: the domain whose mail server delivers ``local+anything`` to
            ``local`` (Postfix ``recipient_delimiter``, Exim/qmail defaults).
        tracking_id: the id to carry: RFC 5321 atext characters and dots, no
            separator. Prefer lower-case ids: some systems fold local-part case.
        separator: the sub-address delimiter the receiving system uses.

    Returns:
        The address, e.g. ``"bounces+4f2a9c@example.org"``.

    Raises:
        InvalidAddress: when a part cannot go in an address unquoted, or the
            local part would pass 64 octets (RFC 5321 §4.5.3.1.1).
    """
    if len(separator) != 1 or not _ID_RE.match(separator):
        raise InvalidAddress(f"bad VERP separator {separator!r}", address=separator)
    if not _LOCAL_RE.match(local) or separator in local:
        raise InvalidAddress(f"bad local part for VERP: {local!r}", address=local)
    if not _ID_RE.match(tracking_id) or separator in tracking_id:
        raise InvalidAddress(
            f"tracking id cannot go in an address: {tracking_id!r}", address=tracking_id
        )
    if not domain or not _HOST_RE.match(domain):
        raise InvalidAddress(f"bad domain for VERP: {domain!r}", address=domain)
    result_local = f"{local}{separator}{tracking_id}"
    if len(result_local.encode("utf-8")) > 64:
        # RFC 5321 §4.5.3.1.1: a local part is at most 64 octets.
        raise InvalidAddress("VERP local part longer than 64 octets", address=result_local)
    return f"{result_local}@{domain}"


def verp_decode(
    address: str | None, *, local: str | None = None, separator: str = "+"
) -> str | None:
    """Take the tracking id back out of a VERP bounce address.

    Args:
        address: the address a report was delivered to (for example
            :attr:`DSNReport.bounce_address`); angle brackets are allowed.
        local: when given, the address's base local part must be this one
            (compared case-insensitively), else ``None`` is returned.
        separator: the sub-address delimiter used by :func:`verp_encode`.

    Returns:
        The tracking id, or ``None`` when the address carries none.
    """
    if not address:
        return None
    text = address.strip().strip("<>").strip()
    local_part, at, _domain = text.rpartition("@")
    if not at or separator not in local_part:
        return None
    base, _sep, tracking_id = local_part.partition(separator)
    if local is not None and base.lower() != local.lower():
        return None
    if not tracking_id or not _ID_RE.match(tracking_id):
        return None
    return tracking_id
