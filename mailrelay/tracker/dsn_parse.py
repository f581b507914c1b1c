"""Parse a returned delivery report: :func:`parse_dsn`.

Theory of operation, in the order the checks run:

1. The message is read with the stdlib ``email`` package (``compat32`` policy,
   which never raises on malformed headers).
2. A ``message/delivery-status`` (RFC 3464 §2.1) or
   ``message/global-delivery-status`` (RFC 6533 §3) part anywhere outside the
   returned message gives the structured answer. Its per-recipient blocks
   (RFC 3464 §2.3) become :class:`DSNRecipient` values; the kind follows from
   the actions (any ``failed`` → bounce, else ``delayed`` → delay, ...).
3. A ``message/feedback-report`` part or ``report-type=feedback-report``
   (RFC 5965 §2) makes an ARF feedback report: never a bounce.
4. An automatic reply (RFC 3834 §5 ``Auto-Submitted: auto-replied`` and the
   common de-facto markers) is an auto-reply unless its sender is a mail system.
5. Otherwise the prose readers of :mod:`mailrelay.tracker.bounce_formats` try
   the unstructured formats; they answer only when sender and text both look
   like a failure notice and at least one recipient can be named.
6. Anything else is :attr:`DSNKind.NOT_A_REPORT`.

The original message is correlated through the returned ``message/rfc822``
(or ``text/rfc822-headers``, RFC 3462; ``message/global``/``message/global-headers``,
RFC 6533 §6) part, else the copy appended to the prose, else the report's own
``In-Reply-To``/``References``.
"""

from __future__ import annotations

import email
import email.header
import email.message
import email.policy
import logging
import re
from email.errors import MissingHeaderBodySeparatorDefect

import attrs

from mailrelay.tracker import bounce_formats
from mailrelay.tracker.dsn import (
    DSNAction,
    DSNKind,
    DSNRecipient,
    DSNReport,
    _clean,
    classify_hard,
    find_reply_code,
    find_status,
    first_address,
    header,
    message_id,
    part_text,
    walk,
)

__all__ = ["parse_dsn"]

log = logging.getLogger(__name__)

_DELIVERY_KINDS = frozenset({DSNKind.BOUNCE, DSNKind.DELAY, DSNKind.DELIVERED, DSNKind.RELAYED})
_STATUS_TYPES = frozenset({"message/delivery-status", "message/global-delivery-status"})
_RETURNED_TYPES = frozenset(
    {
        "message/rfc822",
        "message/global",
        "text/rfc822-headers",
        "message/global-headers",
        "text/rfc822-header",
        "message/rfc822-headers",
    }
)
_RECIPIENT_FIELD_RE = re.compile(r"^(?:final|original)-recipient\s*:", re.IGNORECASE | re.MULTILINE)
_FIELD_RE = re.compile(r"^([A-Za-z][A-Za-z0-9-]*)\s*:\s*(.*)$")
# RFC 6533 §3: in a utf-8 address-type value, non-ASCII may be written \x{HEX}.
_UTF8_ESCAPE_RE = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")


def parse_dsn(raw: bytes) -> DSNReport:
    """Read a delivery report (bounce, delay, success notice) or tell what else it is.

    Args:
        raw: the whole message as received, headers included.

    Returns:
        A :class:`DSNReport`. Input that is not a report, or cannot be read at
        all, gives kind :attr:`DSNKind.NOT_A_REPORT`; this function does not
        raise on bad input.

    Raises:
        TypeError: when ``raw`` is not bytes (a programming error, not bad input).
    """
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise TypeError(f"parse_dsn wants bytes, not {type(raw).__name__}")
    try:
        report = _parse(raw)
    except Exception:  # the last line of defence: a tracker must keep ingesting
        log.warning("unreadable delivery report (%d bytes)", len(raw), exc_info=True)
        return DSNReport(kind=DSNKind.NOT_A_REPORT, format="unreadable")
    return report


def _parse(raw: bytes) -> DSNReport:
    msg = email.message_from_bytes(bytes(raw), policy=email.policy.compat32)
    report = _parse_message(msg, nested=False)
    if report.original_message_id is None and report.kind in _DELIVERY_KINDS:
        found = bounce_formats.message_id_in_text(list(walk(msg)))
        if found is not None:
            report = attrs.evolve(report, original_message_id=found)
    return report


def _parse_message(msg: email.message.Message, *, nested: bool) -> DSNReport:
    bounce_address = _bounce_address(msg)
    parts = list(walk(msg))

    returned = _returned_headers(parts)
    base = DSNReport(
        kind=DSNKind.NOT_A_REPORT,
        bounce_address=bounce_address,
        original_message_id=_returned_id(returned),
        original_sender=first_address(header(returned, "From")) if returned else None,
        original_recipient=first_address(header(returned, "To")) if returned else None,
        original_subject=header(returned, "Subject") if returned else None,
    )

    status_parts = [p for p in parts if p.get_content_type() in _STATUS_TYPES]
    if status_parts:
        blocks = [block for part in status_parts for block in _blocks(part)]
        global_ = any(
            p.get_content_type() == "message/global-delivery-status" for p in status_parts
        )
        report = _structured(base, msg, parts, blocks, "rfc6533" if global_ else "rfc3464")
        if report.recipients:
            return report
    if bounce_formats.looks_like_notice(msg):
        # RFC 3464 fields outside a delivery-status part: a broken MIME
        # structure, or a text/plain part holding the fields.
        text, _tail = bounce_formats.notice_text(parts)
        if _RECIPIENT_FIELD_RE.search(text):
            report = _structured(base, msg, parts, _parse_blocks(text), "rfc3464-text")
            if report.recipients:
                return report

    feedback = [p for p in parts if p.get_content_type() == "message/feedback-report"]
    if feedback or _report_type(msg) == "feedback-report":
        return _feedback(base, feedback)

    if (header(msg, "X-Apple-Unsubscribe") or "").lower() == "true":
        # Apple Mail's one-click unsubscribe request (a mailto: List-Unsubscribe
        # answered automatically): the recipient opts out; not a bounce.
        return attrs.evolve(
            base, kind=DSNKind.FEEDBACK, feedback_type="opt-out", format="unsubscribe"
        )

    daemon = bounce_formats.from_mail_system(msg)
    if not daemon and bounce_formats.auto_reply_strength(msg) >= 2:
        return attrs.evolve(base, kind=DSNKind.AUTO_REPLY, format="rfc3834")

    if daemon and not nested:
        # A mail system that forwarded another system's report as an attachment.
        for inner in _attached_reports(parts):
            report = _parse_message(inner, nested=True)
            if report.kind in (DSNKind.BOUNCE, DSNKind.DELAY, DSNKind.DELIVERED):
                return attrs.evolve(report, bounce_address=bounce_address)

    prose = bounce_formats.read_prose(msg, parts)
    if prose is not None and prose.kind is DSNKind.FEEDBACK:
        return attrs.evolve(base, kind=DSNKind.FEEDBACK, format=prose.format)
    if prose is not None and prose.recipients:
        # One recipient: the whole notice is about it (the reason may come
        # before the address).
        context = prose.text if len(prose.recipients) == 1 else None
        recipients = tuple(_finish(r, context) for r in prose.recipients)
        kind = _kind(recipients)
        if kind is not DSNKind.NOT_A_REPORT:
            original_id = base.original_message_id
            sender = base.original_sender
            if prose.returned is not None:
                original_id = original_id or _returned_id(prose.returned)
                sender = sender or first_address(header(prose.returned, "From"))
            return attrs.evolve(
                base,
                kind=kind,
                recipients=recipients,
                reporting_mta=prose.reporting_mta,
                original_message_id=original_id or _reply_id(msg),
                original_sender=sender,
                format=prose.format,
            )

    if bounce_formats.auto_reply_strength(msg) >= 1 and not daemon:
        return attrs.evolve(base, kind=DSNKind.AUTO_REPLY, format="rfc3834")
    return base


# ---------------------------------------------------------------------------
# RFC 3464 / RFC 6533 structured reports


def _structured(
    base: DSNReport,
    base_msg: email.message.Message,
    parts: list[email.message.Message],
    blocks: list[list[tuple[str, str]]],
    format_name: str,
) -> DSNReport:
    per_message: dict[str, str] = {}
    recipients: list[DSNRecipient] = []
    for block in blocks:
        for fields in _split_recipients(block):
            names = {name for name, _ in fields}
            if names & {"final-recipient", "original-recipient"}:
                recipient = _recipient(dict(fields))
                if recipient is not None:
                    recipients.append(recipient)
            # Per-message fields (RFC 3464 §2.2) may share a block with the
            # first recipient when an MTA forgets the blank line.
            for name, value in fields:
                per_message.setdefault(name, value)
    # The prose beside the fields often tells more (the SMTP phase, or the
    # only diagnostic there is): read it per recipient for the classification.
    context = bounce_formats.recipient_context(parts, [r.address for r in recipients])
    finished = tuple(_finish(r, context.get(r.address.lower())) for r in recipients)
    return attrs.evolve(
        base,
        kind=_kind(finished),
        recipients=finished,
        envid=_clean(per_message.get("original-envelope-id")),
        reporting_mta=_typed_value(per_message.get("reporting-mta")),
        arrival_date=_clean(per_message.get("arrival-date")),
        original_sender=base.original_sender or _typed_value(per_message.get("x-postfix-sender")),
        original_message_id=base.original_message_id
        or message_id(per_message.get("x-original-message-id"))
        or _reply_id(base_msg),
        format=format_name,
    )


def _blocks(part: email.message.Message) -> list[list[tuple[str, str]]]:
    """The field groups of a delivery-status body, as (lower name, value) pairs."""
    # Only a split body (a list) is taken from get_payload(): on a leaf it decodes the
    # text by its charset parameter and raises on one like "us-ascii\0".
    payload = part.get_payload() if part.is_multipart() else None
    encoding = " ".join(str(part.get("Content-Transfer-Encoding", "")).split()).lower()
    if isinstance(payload, list) and payload and encoding in _IDENTITY_ENCODINGS:
        # compat32 already split message/delivery-status into one Message per block.
        blocks = []
        for sub in payload:
            if isinstance(sub, email.message.Message):
                blocks.append([(str(k).lower(), _field_text(v)) for k, v in sub.items()])
                # A block the feedparser could not read as headers ends up as body.
                if sub.is_multipart():
                    continue
                # decode=True hands back the raw bytes; without it compat32
                # replaces 8-bit text (RFC 6533 UTF-8) with U+FFFD.
                body = sub.get_payload(decode=True)
                if isinstance(body, bytes) and body.strip():
                    blocks.extend(_parse_blocks(body.decode("utf-8", "replace")))
        return blocks
    if isinstance(payload, list):
        # Transfer-encoded (quoted-printable, base64): the feedparser split the body
        # without decoding it. Put its source back together and decode that.
        source = b"\n\n".join(_source_bytes(sub) for sub in payload)
        leaf = email.message.Message()
        leaf["Content-Transfer-Encoding"] = encoding
        leaf.set_payload(source.decode("latin-1"))  # one character per byte
        text = part_text(leaf)
    else:
        text = part_text(part)
    return _parse_blocks(text)


def _source_bytes(sub: object) -> bytes:
    """A parsed block as the bytes it was parsed from (its fields, then any body).

    Not ``str(sub)``: the generator re-folds and re-encodes the fields, which takes time
    quadratic in a long field's length in the standard library and raises on an unknown
    or mismatched charset; a hostile report could stall or blind the parser that way.
    """
    if not isinstance(sub, email.message.Message):
        return str(sub).encode("utf-8", "surrogateescape")
    lines = [f"{name}: {_field_text(value)}".encode() for name, value in sub.items()]
    # The body began at a blank line, or at the first line that was not a field (a
    # quoted-printable soft line break, say), which must not gain a blank line.
    separator = (
        [] if any(isinstance(d, MissingHeaderBodySeparatorDefect) for d in sub.defects) else [b""]
    )
    if sub.is_multipart():
        lines += [*separator, *(_source_bytes(inner) for inner in sub.get_payload())]
    else:
        # decode=True: the bytes as they came (no charset decoding, which can raise).
        body = sub.get_payload(decode=True)
        if isinstance(body, bytes) and body:
            lines += [*separator, body]
    return b"\n".join(lines)


# Transfer encodings that leave the text as it is: the feedparser's split into blocks
# can be read directly.
_IDENTITY_ENCODINGS = frozenset({"", "7bit", "8bit", "binary"})


def _field_text(value: object) -> str:
    if isinstance(value, email.header.Header):
        # compat32 wraps a field with 8-bit bytes in a Header ("unknown-8bit"), whose
        # str() replaces them; the bytes are most often UTF-8 (RFC 6533 §3).
        return "".join(
            chunk.decode("utf-8", "replace") if isinstance(chunk, bytes) else chunk
            for chunk, _charset in email.header.decode_header(value)
        )
    text = str(value)
    # compat32 keeps undecodable bytes as surrogates; RFC 6533 §3 text is UTF-8.
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _parse_blocks(text: str) -> list[list[tuple[str, str]]]:
    blocks: list[list[tuple[str, str]]] = []
    current: list[tuple[str, str]] = []
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if not line.strip():
            if current:
                blocks.append(current)
                current = []
            continue
        if line[:1] in (" ", "\t") and current:
            name, value = current[-1]
            current[-1] = (name, value + " " + line.strip())
            continue
        match = _FIELD_RE.match(line)
        if match:
            current.append((match.group(1).lower(), match.group(2)))
    if current:
        blocks.append(current)
    return blocks


def _split_recipients(block: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """Split a block holding several recipients run together (a missing blank line)."""
    groups: list[list[tuple[str, str]]] = [[]]
    seen: set[str] = set()
    for name, value in block:
        if name in ("final-recipient", "original-recipient") and name in seen:
            groups.append([])
            seen = set()
        if name in ("final-recipient", "original-recipient"):
            seen.add(name)
        groups[-1].append((name, value))
    return [g for g in groups if g]


def _typed_value(value: str | None, *, address: bool = True) -> str | None:
    """``"rfc822; a@b"`` → ``"a@b"``: drop the RFC 3464 §2.1.2 type (and, for
    an address, its angle brackets)."""
    if value is None:
        return None
    kind, sep, rest = value.partition(";")
    text = rest if sep and re.fullmatch(r"[A-Za-z0-9-]*", kind.strip()) else value
    if sep and kind.strip().lower() in ("utf-8", "x-utf-8"):
        text = _UTF8_ESCAPE_RE.sub(lambda m: _chr(m.group(1)), text)
    text = text.strip()
    if address and text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    return _clean(text)


def _chr(hexdigits: str) -> str:
    code = int(hexdigits, 16)
    return chr(code) if 0x20 <= code <= 0x10FFFF and not 0xD800 <= code <= 0xDFFF else "?"


def _recipient(fields: dict[str, str]) -> DSNRecipient | None:
    final = _typed_value(fields.get("final-recipient"))
    original = _typed_value(fields.get("original-recipient"))
    address = final or original
    if not address or not any(c.isalnum() for c in address):
        return None
    status_text = fields.get("status")
    diagnostic = _typed_value(fields.get("diagnostic-code"), address=False)
    status = find_status(status_text) or find_status(diagnostic)
    action_word = (fields.get("action") or "").strip().lower().split(" ", 1)[0]
    action = _action(action_word, status)
    return DSNRecipient(
        address=address,
        action=action,
        status=status,
        reply_code=find_reply_code(diagnostic),
        diagnostic=diagnostic,
        remote_mta=_typed_value(fields.get("remote-mta")),
        final_recipient=final,
        original_recipient=original,
        last_attempt_date=_clean(fields.get("last-attempt-date")),
        will_retry_until=_clean(fields.get("will-retry-until")),
    )


def _action(word: str, status: str | None) -> DSNAction:
    try:
        return DSNAction(word)
    except ValueError:
        pass
    # No (or a non-standard) Action: RFC 3463 §3.1 class tells success,
    # persistent transient failure (still retrying) or permanent failure.
    if word.startswith("fail") or word in ("error", "undeliverable"):
        return DSNAction.FAILED
    if status is not None:
        return {"2": DSNAction.DELIVERED, "4": DSNAction.DELAYED}.get(status[0], DSNAction.FAILED)
    return DSNAction.FAILED


def _finish(recipient: DSNRecipient, context: str | None = None) -> DSNRecipient:
    """Fill ``is_permanent`` / ``is_hard``; ``context`` is the prose about the recipient."""
    if recipient.action is DSNAction.FAILED:
        hard = classify_hard(
            recipient.status, recipient.diagnostic, permanent=True, context=context
        )
        return attrs.evolve(recipient, is_permanent=True, is_hard=hard)
    if recipient.action is DSNAction.DELAYED:
        return attrs.evolve(recipient, is_permanent=False, is_hard=False)
    return attrs.evolve(recipient, is_permanent=None, is_hard=None)


def _kind(recipients: tuple[DSNRecipient, ...]) -> DSNKind:
    actions = {r.action for r in recipients}
    if DSNAction.FAILED in actions:
        return DSNKind.BOUNCE
    if DSNAction.DELAYED in actions:
        return DSNKind.DELAY
    if DSNAction.DELIVERED in actions:
        return DSNKind.DELIVERED
    if actions & {DSNAction.RELAYED, DSNAction.EXPANDED}:
        return DSNKind.RELAYED
    return DSNKind.NOT_A_REPORT


# ---------------------------------------------------------------------------
# Feedback reports (RFC 5965)


def _feedback(base: DSNReport, parts: list[email.message.Message]) -> DSNReport:
    fields: dict[str, str] = {}
    for part in parts:
        for block in _blocks(part):
            for name, value in block:
                fields.setdefault(name, value)
    return attrs.evolve(
        base,
        kind=DSNKind.FEEDBACK,
        feedback_type=_clean(fields.get("feedback-type")),
        original_sender=base.original_sender or _typed_value(fields.get("original-mail-from")),
        original_recipient=base.original_recipient or _typed_value(fields.get("original-rcpt-to")),
        reporting_mta=_typed_value(fields.get("reporting-mta")),
        format="arf",
    )


def _attached_reports(parts: list[email.message.Message]) -> list[email.message.Message]:
    found = []
    for part in parts:
        payload = (
            part.get_payload()
            if part.get_content_type() == "message/rfc822" and part.is_multipart()
            else None
        )
        if isinstance(payload, list) and payload and isinstance(payload[0], email.message.Message):
            inner = payload[0]
            if inner.get_content_type() == "multipart/report":
                found.append(inner)
    return found


def _report_type(msg: email.message.Message) -> str | None:
    if msg.get_content_type() != "multipart/report":
        return None
    value = msg.get_param("report-type")
    return value.lower() if isinstance(value, str) else None


# ---------------------------------------------------------------------------
# Correlation


def _bounce_address(msg: email.message.Message) -> str | None:
    # The envelope recipient the report was delivered to: with VERP it carries
    # the tracking id. Delivery agents record it in these fields, topmost first.
    for name in ("X-Original-To", "Delivered-To", "Envelope-To", "X-Envelope-To", "To"):
        address = first_address(header(msg, name))
        if address:
            return address
    return None


def _returned_headers(parts: list[email.message.Message]) -> email.message.Message | None:
    for part in parts:
        ctype = part.get_content_type()
        if ctype not in _RETURNED_TYPES:
            continue
        payload = part.get_payload() if part.is_multipart() else None
        if isinstance(payload, list) and payload:
            first = payload[0]
            if isinstance(first, email.message.Message):
                return first
        text = part_text(part)
        if text.strip():
            return email.message_from_string(text.lstrip(), policy=email.policy.compat32)
    return None


def _returned_id(returned: email.message.Message | None) -> str | None:
    if returned is None:
        return None
    return message_id(header(returned, "Message-ID"))


def _reply_id(msg: email.message.Message) -> str | None:
    return message_id(header(msg, "In-Reply-To")) or message_id(header(msg, "References"))
