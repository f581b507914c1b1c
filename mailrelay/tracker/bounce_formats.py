"""Read the unstructured bounce formats of real mail systems.

Many MTAs still send failure notices as prose: qmail ("Hi. This is the
qmail-send program"), Exim ("A message that you sent could not be delivered"),
older Sendmail ("----- Transcript of session follows -----"), Postfix without
DSN, Exchange 2003 ("did not reach the following recipient(s)"), Lotus Notes,
the big providers' own texts, and Amazon SES' JSON notifications.

Rather than one parser per product, one reader handles the shape they share:

* **Gate** (zero false bounces): the message must come from a mail system
  (MAILER-DAEMON, postmaster, a null ``Return-Path``, "Mail Delivery System")
  *or* carry a failure-notice subject, and its text must name at least one
  recipient. A person's mail that merely quotes a bounce has neither.
* **Recipients** come from ``X-Failed-Recipients`` (Exim and others) when
  present, else from the addresses the notice text names, minus the addresses
  that are plainly not recipients (the report's own sender and receiver,
  postmaster and friends, ``MAIL FROM`` and ``From:`` lines).
* **Diagnostic** for a recipient is the text from where it is first named up to
  where the next recipient is named (bounded); its status and reply code are
  the first RFC 3463 code and SMTP reply code found there (qmail's ``#5.1.1``
  included), else those of the whole notice when there is one recipient.
* **Delay** notices ("will keep trying", "still being retried") give
  ``delayed`` recipients; prose delivery receipts ("Your message has been
  delivered to the following recipients", with no word of failure) give
  ``delivered`` ones; everything else that passes the gate is ``failed``.
* The **returned copy** that follows a marker line ("Below this line is a copy
  of the message", "Original message follows", ...) is read as headers, for
  the Message-ID.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import html
import json
import re
from typing import Any

import attrs

from mailrelay.tracker.dsn import (
    DSNAction,
    DSNKind,
    DSNRecipient,
    _clean,
    find_reply_code,
    find_status,
    first_address,
    header,
    part_text,
)

__all__ = [
    "Prose",
    "auto_reply_strength",
    "from_mail_system",
    "looks_like_notice",
    "message_id_in_text",
    "notice_text",
    "read_prose",
]

_DAEMON_LOCALS = frozenset(
    {
        "mailer-daemon",
        "mailer_daemon",
        "mailerdaemon",
        "mail-daemon",
        "maildaemon",
        "postmaster",
        "mailmaster",
        "mail.delivery",
        "mail-delivery",
        "bounce",
        "bounces",
        "mdaemon",
        "mailadmin",
        "mail-notify",
        "post_master",
    }
)
_DAEMON_NAME_RE = re.compile(
    r"mail\s*delivery\s*(?:system|subsystem|service)|mailer[-_ ]?daemon|post\s*master|"
    r"mail\s+administrator|delivery\s+status\s+notification|mail\s+system|\bNDR\b",
    re.IGNORECASE,
)
_BOUNCE_SUBJECT_RE = re.compile(
    r"undeliver|undelivered|returned\s+mail|return(?:ed)?\s+to\s+sender|"
    r"delivery\s+(?:status\s+notification|failure|failed|has\s+failed|problem|notification)|"
    r"failure\s+notice|mail\s+delivery\s+fail|non[- ]?deliver|not\s+(?:be\s+)?delivered|"
    r"could\s+not\s+(?:be\s+)?(?:send|sent|deliver)|delivery\s+(?:report|error)|"
    r"mail\s+system\s+error|message\s+(?:not\s+delivered|delivery\s+failed|blocked)|"
    r"rejected|bounce|nicht\s+zustellbar|unzustellbar|permanent\s+error|"
    r"delayed\s+mail|warning:\s+could\s+not|delivery\s+(?:delay|delayed)|"
    r"mail\s+could\s+not\s+be|error\s+sending|problem\s+delivering|"
    r"メールエラー|配信エラー|送信エラー|不達|配送エラー|エラー通知",
    re.IGNORECASE,
)
_REPLY_PREFIX_RE = re.compile(r"^\s*(?:re|fwd?|aw|wg|sv|vs|tr|rif|odp|antw)\s*:", re.IGNORECASE)
# Subjects only auto-responders use ...
_AUTO_SUBJECT_RE = re.compile(
    r"out\s+of\s+(?:the\s+)?office|automatic\s+reply|auto(?:matic)?[- ]?(?:reply|response|"
    r"respon)|autoreply|^\s*auto:|abwesenheitsnotiz|r[ée]ponse\s+automatique|"
    r"respuesta\s+autom|自動応答|自動返信",
    re.IGNORECASE,
)
# ... and words people use too ("Vacation photos"): believed with a sign of automation.
_AWAY_SUBJECT_RE = re.compile(
    r"vacation|away\s+from|\baway\b|on\s+leave|abwesen|absence|不在", re.IGNORECASE
)
# A line that starts the returned copy: decoration (spaces, rules, quote marks), then
# words. The decoration is split off in Python (see _is_returned_marker): as one regex,
# a decoration class followed by "two or more rule characters" backtracks quadratically
# over a long run of them (a line of 10,000 stars took seconds).
_MARKER_DECORATION_RE = re.compile(r"[\s\-=_*>|]*")  # one greedy run: linear
_RETURNED_MARKER_RE = re.compile(
    r"(?:below\s+this\s+line\s+is\s+a\s+copy|"
    r"this\s+is\s+a\s+copy\s+of\s+the\s+(?:original\s+)?message|"
    r"(?:the\s+)?original\s+message\s+(?:follows|headers|below)|"
    r"headers\s+of\s+(?:the\s+)?(?:original|returned)|message\s+headers\s+follow|"
    r"the\s+header\s+of\s+the\s+original|here\s+is\s+a\s+copy|included\s+is\s+a\s+copy|"
    r"your\s+original\s+message\s+(?:follows|is\s+(?:attached|below|included))|"
    r"content-type:\s*message/rfc822|unsent\s+message\s+below)",
    re.IGNORECASE,
)
# After a rule ("---- Original message"), these words are enough.
_RULED_MARKER_RE = re.compile(r"(?:the\s+)?(?:original|returned|unsent)\s+message", re.IGNORECASE)
_HEADER_LINE_RE = re.compile(
    r"^(?:Return-Path|Received|Message-I[dD]|From|Date|Subject|To|"
    r"DKIM-Signature|X-[A-Za-z-]+|MIME-Version|Delivered-To)\s*:",
    re.IGNORECASE,
)
_ADDRESS_RE = re.compile(
    # The look-behind covers every local-part character, so a match can start
    # only at the beginning of a run: linear time on hostile text.
    r"(?<![\w.!#$%&'*+/=?^`{|}~-])"
    r"([A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"\.)+[A-Za-z][A-Za-z0-9-]*[A-Za-z0-9]|[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@\[[0-9.]+\])",
)
# Lines that name an address that is not a recipient of the failed message.
_NOT_RECIPIENT_LINE_RE = re.compile(
    r"mail\s+from|envelope-from|^\s*(?:from|sender|reply-to|return-path|reporting-mta)\s*:|"
    r"(?:contact|write\s+to|send\s+(?:mail|email)\s+to|please\s+(?:contact|e-?mail))",
    re.IGNORECASE,
)
_DELAY_RE = re.compile(
    r"will\s+(?:continue\s+to\s+|keep\s+)?(?:try|trying|retry|retrying)|still\s+being\s+retried|"
    r"has\s+not\s+(?:yet\s+)?been\s+delivered|delivery\s+(?:is|has\s+been)\s+delayed|"
    r"temporarily\s+deferred|this\s+is\s+(?:only\s+)?a\s+warning|delayed\s+mail|"
    r"no\s+action\s+is\s+required\s+on\s+your\s+part",
    re.IGNORECASE,
)
_SUCCESS_RE = re.compile(
    r"(?:has\s+been|was)\s+(?:successfully\s+)?delivered\s+to\s+the\s+following|"
    r"delivery\s+to\s+(?:these|the\s+following)\s+recipients\s+(?:or\s+groups\s+)?"
    r"(?:is|was|has\s+been)\s+(?:complete|completed|successful)",
    re.IGNORECASE,
)
_GIVEN_UP_RE = re.compile(
    r"permanent|given\s+up|gave\s+up|could\s+not\s+be\s+delivered|undeliverable|"
    r"failed|not\s+delivered|rejected",
    re.IGNORECASE,
)
_FAILURE_WORDS_RE = re.compile(
    r"undeliver|could\s+not\s+be\s+delivered|couldn'?t\s+be\s+delivered|not\s+(?:be\s+)?delivered|"
    r"delivery\s+(?:to|has)\s+[^\n]{0,200}?fail|failed|failure|permanent|unable\s+to\s+deliver|"
    r"wasn'?t\s+able\s+to\s+deliver|did\s+not\s+reach|rejected|unknown|does\s+not\s+exist|"
    r"error|refused|returned|bounced|delayed|deferred|retry|aborted|warning",
    re.IGNORECASE,
)
_MAX_DIAGNOSTIC_LINES = 12
_MAX_DIAGNOSTIC_CHARS = 1000


@attrs.frozen(kw_only=True)
class Prose:
    """What the prose reader found: recipients plus context.

    Attributes:
        recipients: the recipients named, with action/status/diagnostic.
        reporting_mta: the host the notice names as its own, when found.
        format: a short name of the recognised shape (``"qmail"``, ``"exim"``, ...).
        returned: headers of the copy of the original appended to the notice.
        kind: an explicit kind for formats that say it (Amazon SES JSON).
        text: the notice's own words (without the returned copy).
    """

    recipients: tuple[DSNRecipient, ...]
    reporting_mta: str | None = None
    format: str = "prose"
    returned: email.message.Message | None = None
    kind: DSNKind | None = None
    text: str | None = None


def from_mail_system(msg: email.message.Message) -> bool:
    """Whether the message was sent by a mail system rather than a person."""
    for name in ("From", "Sender", "Return-Path"):
        value = header(msg, name)
        if not value:
            continue
        address = first_address(value) or ""
        local = address.rsplit("@", 1)[0].lower()
        if local in _DAEMON_LOCALS or _DAEMON_NAME_RE.search(value):
            return True
    return False


def auto_reply_strength(msg: email.message.Message) -> int:
    """How plainly a message says it is an automatic reply (RFC 3834).

    Returns:
        2 for explicit auto-reply markers (``X-Autoreply``, ``X-Autorespond``,
        ``Precedence: auto_reply``, an out-of-office subject, or a "vacation"
        subject on an automatic message), 1 when only ``Auto-Submitted`` says it
        is automatic (bounces say that too), else 0.
    """
    # X-Auto-Response-Suppress is deliberately absent: Outlook puts it on
    # ordinary mail to *ask* for no auto-replies.
    for name in ("X-Autoreply", "X-Autorespond", "X-Autorespond-Status", "X-Vacation"):
        value = (header(msg, name) or "").lower()
        if value and value not in ("no", "false", "0"):
            return 2
    if (header(msg, "Precedence") or "").lower() == "auto_reply":
        return 2
    subject = header(msg, "Subject") or ""
    if _AUTO_SUBJECT_RE.search(subject):
        return 2
    # RFC 3834 §5.1: any value other than "no" marks an automatic message.
    automatic = not (header(msg, "Auto-Submitted") or "no").lower().startswith("no")
    return_path = header(msg, "Return-Path")
    if (automatic or (return_path or "x").strip() in ("<>", "")) and _AWAY_SUBJECT_RE.search(
        subject
    ):
        return 2
    return 1 if automatic else 0


def read_prose(msg: email.message.Message, parts: list[email.message.Message]) -> Prose | None:
    """Read an unstructured failure notice, or return ``None`` if it is not one.

    Args:
        msg: the whole message.
        parts: its parts outside any returned message (``dsn.walk(msg)``).
    """
    ses = _amazon_ses(parts)
    if ses is not None:
        return ses
    subject = header(msg, "Subject") or ""
    if not looks_like_notice(msg):
        return None
    text, tail = notice_text(parts)
    # A delivery receipt in prose (Exchange's "Delivered:"), with no word of failure.
    success = bool(_SUCCESS_RE.search(text)) and not _GIVEN_UP_RE.search(text + " " + subject)
    if not success and not _FAILURE_WORDS_RE.search(text + " " + subject):
        return None

    excluded = _excluded_addresses(msg)
    failed_header = header(msg, "X-Failed-Recipients")
    named = _addresses_in(failed_header) if failed_header else []
    lines = text.split("\n")
    sender = (first_address(header(msg, "From")) or "").lower() or None
    spans = _recipient_spans(lines, excluded, named, sender=sender)
    returned = _returned_from_text(tail)
    if not spans:
        # No address in the words (some carriers' notices): the returned copy's
        # single To recipient is the one that failed.
        copy = returned or _returned_part(parts)
        to_field = (header(copy, "To") if copy is not None else None) or ""
        to = first_address(to_field)
        if to is None or "," in to_field:
            return None
        spans = [(to, _clean(text[:_MAX_DIAGNOSTIC_CHARS]))]

    delayed = bool(_DELAY_RE.search(text + " " + subject)) and not _GIVEN_UP_RE.search(subject)
    whole_status = find_status(text)
    whole_reply = find_reply_code(text)
    recipients = []
    for address, span in spans:
        status = find_status(span)
        reply = find_reply_code(span)
        diagnostic = span
        if status is None and reply is None and len(spans) == 1:
            status, reply = whole_status, whole_reply
        if status is None and reply is None and diagnostic is None and len(spans) == 1:
            diagnostic = _clean(text[:_MAX_DIAGNOSTIC_CHARS])
        action = DSNAction.DELIVERED if success else DSNAction.FAILED
        if not success and (
            delayed
            and (status is None or status.startswith("4"))
            and (reply is None or reply < 500)
        ):
            action = DSNAction.DELAYED
        recipients.append(
            DSNRecipient(
                address=address,
                action=action,
                status=status,
                reply_code=reply,
                diagnostic=diagnostic,
            )
        )
    return Prose(
        recipients=tuple(recipients),
        reporting_mta=_reporting_host(text, msg),
        format=_format_name(text, msg),
        returned=returned,
        text=_clean(text[: _MAX_DIAGNOSTIC_CHARS * 4]),
    )


def recipient_context(parts: list[email.message.Message], addresses: list[str]) -> dict[str, str]:
    """The notice text about each of ``addresses`` (lower-cased keys), where named."""
    text, _tail = notice_text(parts)
    if not text.strip() or not addresses:
        return {}
    spans = _recipient_spans(text.split("\n"), set(), addresses, only_named=True)
    return {address.lower(): diagnostic for address, diagnostic in spans if diagnostic}


# ---------------------------------------------------------------------------
# Helpers


def looks_like_notice(msg: email.message.Message) -> bool:
    """The gate: sent by a mail system, or an automatic message titled like a
    failure notice. A person's reply or forward ("Re: Undeliverable ...") is not."""
    if from_mail_system(msg):
        return True
    subject = header(msg, "Subject") or ""
    if not _BOUNCE_SUBJECT_RE.search(subject) or _REPLY_PREFIX_RE.match(subject):
        return False
    # The subject alone is a person's word; some sign of automation must agree.
    return_path = header(msg, "Return-Path")
    null_path = return_path is not None and return_path.strip() in ("<>", "")
    automatic = (header(msg, "Auto-Submitted") or "no").lower() not in ("no", "")
    sender = (first_address(header(msg, "From")) or "").rsplit("@", 1)[0].lower()
    no_reply = sender.replace("-", "").replace("_", "") in ("noreply", "donotreply")
    return null_path or automatic or no_reply or header(msg, "X-Failed-Recipients") is not None


def notice_text(parts: list[email.message.Message]) -> tuple[str, str]:
    """The notice's own words (up to a returned-copy marker) and what follows."""
    chunks: list[str] = []
    for part in parts:
        ctype = part.get_content_type()
        if part.is_multipart() or ctype.startswith("message/"):
            continue
        if ctype.startswith("multipart/"):
            # A multipart whose boundary never matched: its body is all text.
            chunks.append(part_text(part))
            continue
        if ctype == "text/plain" or (
            ctype == "text/html" and not any(p.get_content_type() == "text/plain" for p in parts)
        ):
            text = part_text(part)
            if ctype == "text/html":
                text = _strip_html(text)
            chunks.append(text)
        elif ctype.startswith("text/") and ctype != "text/rfc822-headers":
            chunks.append(part_text(part))
    text = "\n".join(chunks).replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    for index, line in enumerate(lines):
        if index > 0 and _is_returned_marker(line):
            return "\n".join(lines[:index]), "\n".join(lines[index + 1 :])
    # No marker: a returned header block still ends the notice.
    for index, line in enumerate(lines):
        if index > 2 and re.match(r"^(?:Return-Path|Received):", line, re.IGNORECASE):
            return "\n".join(lines[:index]), "\n".join(lines[index:])
    return text, ""


def _is_returned_marker(line: str) -> bool:
    """Whether ``line`` starts the returned copy ("------ Original message ------",
    "Below this line is a copy of the message."), in time linear in its length."""
    decoration = _MARKER_DECORATION_RE.match(line)  # always matches, maybe ""
    end = decoration.end() if decoration else 0
    words = line[end:]
    if _RETURNED_MARKER_RE.match(words):
        return True
    rule = line[:end].rstrip()
    return (
        len(rule) >= 2
        and rule[-1] in "-=_*"
        and rule[-2] in "-=_*"
        and bool(_RULED_MARKER_RE.match(words))
    )


_BREAK_TAGS = frozenset({"br", "p", "/p", "div", "/div", "tr", "/tr", "li", "/li", "h1", "/h1"})


def _strip_html(text: str) -> str:
    """Visible text of an HTML part, in one linear pass (no regex backtracking
    over hostile input such as thousands of unclosed ``<``)."""
    lowered = text.lower()
    out: list[str] = []
    position = 0
    while position < len(text):
        start = text.find("<", position)
        if start < 0:
            out.append(text[position:])
            break
        out.append(text[position:start])
        end = text.find(">", start + 1)
        if end < 0:
            out.append(text[start:])
            break
        name = lowered[start + 1 : end].split(None, 1)[0].rstrip("/") if end > start + 1 else ""
        if name in ("script", "style"):
            close = lowered.find(f"</{name}", end)
            if close < 0:
                break
            end = lowered.find(">", close)
            if end < 0:
                break
        out.append("\n" if name in _BREAK_TAGS else " ")
        position = end + 1
    return html.unescape("".join(out))


def _addresses_in(text: str) -> list[str]:
    found = []
    for match in _ADDRESS_RE.finditer(text):
        address = match.group(1).strip(".")
        if address and address not in found:
            found.append(address)
    return found


def _excluded_addresses(msg: email.message.Message) -> set[str]:
    excluded = set()
    # X-Original-To is left out: some agents (DragonFly) put the failed
    # recipient there.
    for name in (
        "From",
        "To",
        "Sender",
        "Return-Path",
        "Reply-To",
        "Cc",
        "Delivered-To",
        "Envelope-To",
    ):
        address = first_address(header(msg, name))
        if address:
            excluded.add(address.lower())
    return excluded


def _is_candidate(address: str, excluded: set[str]) -> bool:
    lowered = address.lower()
    local = lowered.rsplit("@", 1)[0]
    return (
        lowered not in excluded
        and local not in _DAEMON_LOCALS
        and local
        not in (
            "abuse",
            "help",
            "support",
            "noreply",
            "no-reply",
        )
    )


def _recipient_spans(
    lines: list[str],
    excluded: set[str],
    named: list[str],
    *,
    only_named: bool = False,
    sender: str | None = None,
) -> list[tuple[str, str | None]]:
    """(address, diagnostic) per recipient, in the order the notice names them."""
    firsts = _first_mentions(lines, excluded, named, strict=True)
    if not firsts and not named:
        # Nothing but "excluded" addresses: a notice sent to the same address
        # that failed, or a failed postmaster@. Only the notice's own sender
        # stays out.
        firsts = _first_mentions(lines, {sender} if sender else set(), named, strict=False)
    # Header-named recipients the text never mentions still count.
    seen = {address.lower() for _, address in firsts}
    for address in [] if only_named else named:
        if address.lower() not in seen:
            seen.add(address.lower())
            firsts.append((len(lines), address))
    spans = []
    for number, (start, address) in enumerate(firsts):
        end = firsts[number + 1][0] if number + 1 < len(firsts) else len(lines)
        end = min(end if end > start else start + 1, start + _MAX_DIAGNOSTIC_LINES)
        chunk = " ".join(lines[start:end])
        # Drop the address itself so a 5.1.1 in it is not mistaken for text.
        diagnostic = _clean(chunk.replace(address, " ", 1))
        if diagnostic is not None:
            diagnostic = diagnostic[:_MAX_DIAGNOSTIC_CHARS]
        spans.append((address, diagnostic))
    return spans


def _first_mentions(
    lines: list[str], excluded: set[str], named: list[str], *, strict: bool
) -> list[tuple[int, str]]:
    firsts: list[tuple[int, str]] = []
    seen: set[str] = set()
    wanted = {a.lower() for a in named}
    for index, line in enumerate(lines):
        if _NOT_RECIPIENT_LINE_RE.search(line) and not wanted:
            continue
        for address in _addresses_in(line):
            key = address.lower()
            if key in seen:
                continue
            if wanted and key not in wanted:
                continue
            if not wanted and (
                key in excluded or (strict and not _is_candidate(address, excluded))
            ):
                continue
            seen.add(key)
            firsts.append((index, address))
    return firsts


def _reporting_host(text: str, msg: email.message.Message) -> str | None:
    match = re.search(
        r"(?:qmail-send\s+program|mail\s+system)\s+at\s+(?:host\s+)?([\w.-]+\w)",
        text,
        re.IGNORECASE,
    )
    if match:
        return match.group(1)
    address = first_address(header(msg, "From"))
    return address.rsplit("@", 1)[1] if address and "@" in address else None


def _format_name(text: str, msg: email.message.Message) -> str:
    lowered = text.lower()
    for needle, name in (
        ("qmail-send program", "qmail"),
        ("this is the mail system at host", "postfix"),
        ("could not be delivered to one or more of its", "exim"),
        ("transcript of session follows", "sendmail"),
        ("did not reach the following recipient", "exchange"),
        ("delivery has failed to these recipients", "exchange"),
    ):
        if needle in lowered:
            return name
    return "prose"


_MESSAGE_ID_LINE_RE = re.compile(
    r"^[ >]*Message-I[Dd][ \t]*:[ \t]*\n?[ \t]*<([^<>\s]+)>", re.MULTILINE
)


def message_id_in_text(parts: list[email.message.Message]) -> str | None:
    """The first ``Message-ID:`` header line in the body text (a returned copy
    whose header block the MIME structure or a marker line did not reveal)."""
    text, tail = notice_text(parts)
    for chunk in (tail, text):
        match = _MESSAGE_ID_LINE_RE.search(chunk)
        if match:
            return match.group(1)
    return None


def _returned_part(parts: list[email.message.Message]) -> email.message.Message | None:
    for part in parts:
        if part.get_content_type() in ("message/rfc822", "text/rfc822-headers"):
            payload = part.get_payload() if part.is_multipart() else None
            if (
                isinstance(payload, list)
                and payload
                and isinstance(payload[0], email.message.Message)
            ):
                return payload[0]
            return email.message_from_string(part_text(part), policy=email.policy.compat32)
    return None


def _returned_from_text(tail: str) -> email.message.Message | None:
    lines = tail.split("\n")
    for index, line in enumerate(lines[:50]):
        if _HEADER_LINE_RE.match(line):
            block = "\n".join(lines[index:])
            return email.message_from_string(block, policy=email.policy.compat32)
    return None


def _amazon_ses(parts: list[email.message.Message]) -> Prose | None:
    """Amazon SES bounce/complaint/delivery notifications (JSON via SNS)."""
    for part in parts:
        if part.is_multipart() or not part.get_content_type().startswith(("text/", "application/")):
            continue
        text = part_text(part)
        start = text.find("{")
        if start < 0 or "notificationType" not in text:
            continue
        try:
            # strict=False: mail transports wrap long lines, even inside strings.
            data = json.loads(text[start : text.rfind("}") + 1], strict=False)
        except ValueError:
            continue
        if isinstance(data, dict) and isinstance(data.get("Message"), str):
            try:  # SNS wraps the SES notification as a JSON string
                data = json.loads(data["Message"], strict=False)
            except ValueError:
                continue
        if isinstance(data, dict) and "notificationType" in data:
            return _ses_notification(data)
    return None


def _object(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def _ses_notification(data: dict[str, Any]) -> Prose | None:
    kind_name = str(data.get("notificationType", "")).lower()
    mail = _object(data, "mail")
    returned = None
    headers = mail.get("headers")
    if isinstance(headers, list):
        text = "".join(
            f"{h.get('name')}: {h.get('value')}\n" for h in headers if isinstance(h, dict)
        )
        returned = email.message_from_string(text, policy=email.policy.compat32)
    recipients: list[DSNRecipient] = []
    if kind_name == "bounce":
        bounce = _object(data, "bounce")
        permanent = str(bounce.get("bounceType", "")).lower() == "permanent"
        for item in bounce.get("bouncedRecipients") or []:
            address = (
                _clean(str(item.get("emailAddress") or "")) if isinstance(item, dict) else None
            )
            if address is None:
                continue
            diagnostic = _clean(str(item.get("diagnosticCode") or "")) or None
            status = find_status(str(item.get("status") or "")) or find_status(diagnostic)
            action = (
                DSNAction.FAILED
                if permanent or str(item.get("action")) == "failed"
                else (DSNAction.DELAYED)
            )
            recipients.append(
                DSNRecipient(
                    address=address,
                    action=action,
                    status=status,
                    reply_code=find_reply_code(diagnostic),
                    diagnostic=diagnostic,
                )
            )
        return Prose(recipients=tuple(recipients), format="amazonses", returned=returned)
    if kind_name == "delivery":
        delivery = _object(data, "delivery")
        for item in delivery.get("recipients") or []:
            address = _clean(str(item))
            if address is None:
                continue
            diagnostic = _clean(str(delivery.get("smtpResponse") or "")) or None
            recipients.append(
                DSNRecipient(
                    address=address,
                    action=DSNAction.DELIVERED,
                    status=find_status(diagnostic),
                    reply_code=find_reply_code(diagnostic),
                    diagnostic=diagnostic,
                    remote_mta=_clean(str(delivery.get("reportingMTA") or "")) or None,
                )
            )
        return Prose(recipients=tuple(recipients), format="amazonses", returned=returned)
    if kind_name == "complaint":
        return Prose(recipients=(), format="amazonses", returned=returned, kind=DSNKind.FEEDBACK)
    return None
