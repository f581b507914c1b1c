"""Delivery-status notifications: the values, status codes, and MIME reading helpers.

The parser is :func:`mailrelay.tracker.dsn_parse.parse_dsn`; the generator is
:func:`mailrelay.tracker.dsn_build.build_dsn`.

Rules of this module:

* :func:`parse_dsn` is pure: bytes in, a :class:`DSNReport` out. No I/O, no
  clock. It never raises on bad input: anything that is not a report comes back
  as :attr:`DSNKind.NOT_A_REPORT`.
* **Zero false bounces.** A message is reported as a bounce only when it says so
  in a structured way (RFC 3464 ``message/delivery-status``) or when both its
  sender and its text look like a mail system's failure notice. Feedback reports
  (RFC 5965) and auto-replies (RFC 3834) are recognised *before* the heuristics
  for unstructured bounces run, and a message that names no failed recipient is
  never a bounce.
* Structured data wins over prose: the per-recipient fields of a
  ``message/delivery-status`` (RFC 3464 §2.3) or ``message/global-delivery-status``
  (RFC 6533 §3) part are taken as they are; the unstructured formats of real MTAs
  (qmail, Sendmail, Exim, Postfix without DSN, Exchange, the big providers) are
  read by :mod:`mailrelay.tracker.bounce_formats`.
* ``status`` is always an RFC 3463 enhanced status code (``"5.1.1"``) or
  ``None``; a bare SMTP reply code is kept apart in ``reply_code``.
* ``is_permanent`` is the RFC 3463 class (5 = permanent, 4 = persistent
  transient). ``is_hard`` is the mailing-list sense of a *hard bounce*: the
  address itself will never work (no such user, no such domain, moved, accepts
  no mail), so the sender should stop using it. A full mailbox or a spam block
  is permanent for this message but *soft* for the address.
"""

from __future__ import annotations

import email
import email.header
import email.message
import email.policy
import email.utils
import enum
import logging
import re
from collections.abc import Iterator

import attrs

__all__ = [
    "DSNAction",
    "DSNKind",
    "DSNRecipient",
    "DSNReport",
    "classify_hard",
    "find_reply_code",
    "find_status",
]

log = logging.getLogger(__name__)

_STATUS_RE = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]+")


class DSNKind(enum.Enum):
    """What kind of message :func:`parse_dsn` was given."""

    #: At least one recipient failed permanently (``Action: failed``).
    BOUNCE = "bounce"
    #: Delivery is delayed and still being retried (``Action: delayed``).
    DELAY = "delay"
    #: The message was delivered (``Action: delivered``), e.g. NOTIFY=SUCCESS.
    DELIVERED = "delivered"
    #: Relayed to a system that does not send DSNs, or expanded (a list/alias).
    RELAYED = "relayed"
    #: An automatic reply (vacation, out of office; RFC 3834), not a bounce.
    AUTO_REPLY = "auto-reply"
    #: An abuse/feedback report (ARF, RFC 5965), not a bounce.
    FEEDBACK = "feedback"
    #: Anything else, including unparseable input.
    NOT_A_REPORT = "not-a-report"


class DSNAction(enum.StrEnum):
    """The per-recipient ``Action`` of RFC 3464 §2.3.3."""

    FAILED = "failed"
    DELAYED = "delayed"
    DELIVERED = "delivered"
    RELAYED = "relayed"
    EXPANDED = "expanded"


def _clean(value: str | None) -> str | None:
    """Collapse folding and control characters; empty becomes ``None``."""
    if value is None:
        return None
    value = _CONTROL_RE.sub(" ", value)
    value = " ".join(value.split())
    return value or None


def _no_line_breaks(_instance: object, attribute: attrs.Attribute[object], value: object) -> None:
    # Values may be written back into a generated DSN (build_dsn): a CR or LF
    # would let the text inject header fields there.
    if isinstance(value, str) and ("\r" in value or "\n" in value or "\x00" in value):
        raise ValueError(f"{attribute.name} must not contain CR, LF or NUL: {value!r}")


def _status_format(_instance: object, attribute: attrs.Attribute[object], value: object) -> None:
    if value is not None and not (isinstance(value, str) and _STATUS_RE.match(value)):
        raise ValueError(f"{attribute.name} must be an enhanced status such as '5.1.1': {value!r}")


_opt_str = attrs.validators.optional(attrs.validators.instance_of(str))


@attrs.frozen(kw_only=True)
class DSNRecipient:
    """One recipient's fate as a delivery report tells it.

    Attributes:
        address: the recipient address (Final-Recipient, else Original-Recipient,
            else whatever address the prose names), without angle brackets.
        action: ``failed``, ``delayed``, ``delivered``, ``relayed`` or ``expanded``.
        status: RFC 3463 enhanced status code such as ``"5.1.1"``, or ``None``.
        reply_code: the SMTP reply code when the diagnostic shows one (``550``).
        diagnostic: the remote server's words (``Diagnostic-Code`` or the prose).
        remote_mta: the host that gave the answer, when known.
        final_recipient: the ``Final-Recipient`` value (RFC 3464 §2.3.2).
        original_recipient: the ``Original-Recipient`` value (RFC 3464 §2.3.1),
            i.e. the ORCPT the sender gave.
        last_attempt_date: ``Last-Attempt-Date`` as written, when present.
        will_retry_until: ``Will-Retry-Until`` as written, for delays.
        is_permanent: ``True`` when the reporting MTA gave up (``failed``, whatever
            the status class: an expired 4.x.x is given up too), ``False`` for a
            delay, ``None`` when nothing failed (delivered, relayed).
        is_hard: ``True`` when the address itself is bad (stop sending to it),
            ``False`` for any other failure or delay, ``None`` when nothing failed.
    """

    address: str = attrs.field(validator=[attrs.validators.instance_of(str), _no_line_breaks])
    action: DSNAction = attrs.field(converter=DSNAction)
    status: str | None = attrs.field(default=None, validator=_status_format)
    reply_code: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of(int))
    )
    diagnostic: str | None = attrs.field(default=None, validator=[_opt_str, _no_line_breaks])
    remote_mta: str | None = attrs.field(default=None, validator=[_opt_str, _no_line_breaks])
    final_recipient: str | None = attrs.field(default=None, validator=[_opt_str, _no_line_breaks])
    original_recipient: str | None = attrs.field(
        default=None, validator=[_opt_str, _no_line_breaks]
    )
    last_attempt_date: str | None = attrs.field(
        default=None, validator=[_opt_str, _no_line_breaks]
    )
    will_retry_until: str | None = attrs.field(default=None, validator=[_opt_str, _no_line_breaks])
    is_permanent: bool | None = None
    is_hard: bool | None = None


@attrs.frozen(kw_only=True)
class DSNReport:
    """What :func:`parse_dsn` learned from one message.

    Attributes:
        kind: bounce, delay, delivered, relayed, auto-reply, feedback or not a report.
        recipients: one :class:`DSNRecipient` per recipient the report names.
        envid: ``Original-Envelope-Id`` (RFC 3464 §2.2.1): the ENVID we sent.
        original_message_id: Message-ID of the message this report is about
            (from the returned message or headers, else In-Reply-To/References).
        original_sender: the returned message's sender (From), when known.
        original_recipient: the returned message's first To address, when known.
        original_subject: the returned message's Subject, when known.
        reporting_mta: ``Reporting-MTA`` (RFC 3464 §2.2.2), or the host the
            prose names.
        arrival_date: ``Arrival-Date`` as written, when present.
        bounce_address: the address this report was sent to (X-Original-To,
            Delivered-To, Envelope-To, else To). With VERP it carries the
            tracking id: see :func:`mailrelay.tracker.verp_decode`.
        feedback_type: the ARF ``Feedback-Type`` (``abuse``, ``opt-out``, ...).
        format: a short name of the format recognised (``"rfc3464"``,
            ``"qmail"``, ``"arf"``, ...), for logs and statistics.
    """

    kind: DSNKind
    recipients: tuple[DSNRecipient, ...] = ()
    envid: str | None = None
    original_message_id: str | None = None
    original_sender: str | None = None
    original_recipient: str | None = None
    original_subject: str | None = None
    reporting_mta: str | None = None
    arrival_date: str | None = None
    bounce_address: str | None = None
    feedback_type: str | None = None
    format: str = "none"

    @property
    def failed(self) -> tuple[DSNRecipient, ...]:
        """The recipients whose action is ``failed``."""
        return tuple(r for r in self.recipients if r.action is DSNAction.FAILED)

    @property
    def is_bounce(self) -> bool:
        """Whether this is a failure report (kind :attr:`DSNKind.BOUNCE`)."""
        return self.kind is DSNKind.BOUNCE


# ---------------------------------------------------------------------------
# Status codes and the hard/soft class

_ENHANCED_RE = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d]|\.\d)")
_REPLY_RE = re.compile(r"(?:^|[\s:;(\[\"'<>=#])([245][0-5]\d)(?=[\s\-.:;,)\]]|$)")

# Texts that mean the *address* is bad: a hard bounce.
_HARD_TEXT_RE = re.compile(
    r"user(?:name)?\s+(?:is\s+)?unknown|unknown\s+(?:user|recipient|local[- ]part|"
    r"mailbox|address|alias)|no\s+such\s+(?:user|recipient|mailbox|address|"
    r"account|person|local\s+user|domain)|(?:user|recipient|mailbox|address|account)"
    r"(?:\s+\S+)?\s+(?:does\s+not|doesn'?t|did\s+not)\s+exist|does\s+not\s+exist|"
    r"(?:mailbox|recipient|user|address)\s+not\s+found|not\s+a\s+valid\s+(?:mailbox|"
    r"recipient|user)|invalid\s+(?:recipient|mailbox|address|user)|"
    r"(?:user|recipient|mailbox|account)\s+(?:is\s+)?(?:invalid|not\s+known|unavailable)|"
    r"unrouteable\s+address|no\s+mailbox\s+here|host\s+(?:or\s+domain\s+name\s+)?"
    r"(?:not\s+found|unknown)|domain\s+(?:name\s+)?not\s+found|name\s+service\s+error|"
    r"no\s+(?:mx|mail\s+exchanger|dns|valid\s+mx)|unknown\s+(?:host|domain)|"
    r"host\s+not\s+found|has\s+moved|not\s+listed\s+in|does\s+not\s+accept\s+mail|"
    r"no\s+longer\s+(?:available|valid|active)|mailbox\s+unavailable|"
    r"recipient\s+rejected|address\s+rejected|rejected.*recipient|"
    r"recipient\s+address\s+rejected|unknown\s+in\s+(?:local|virtual|relay)|"
    r"mailbox\s+is\s+(?:inactive|not\s+available)|addressee\s+unknown|"
    r"account\s+(?:is\s+)?(?:not\s+found|unknown)|undeliverable\s+address|"
    r"bad\s+destination\s+mailbox|invalid\s+address|not\s+our\s+customer|"
    r"no\s+account\s+by\s+that\s+name",
    re.IGNORECASE,
)
# Texts that mean something other than a bad address, even with a 5.1.x code
# or a "rejected" word: checked first, they keep the bounce soft.
_SOFT_TEXT_RE = re.compile(
    r"quota|mailbox\s+(?:is\s+)?full|over\s*(?:the\s+)?(?:quota|limit)|insufficient|"
    r"exceed|too\s+(?:large|big|many)|size\s+limit|spam|blacklist|blocklist|"
    r"block(?:ed|ing)|reputation|policy|dnsbl|rbl\b|listed\s+(?:at|on|in)|"
    r"rate\s*limit|greylist|try\s+again|temporar|disabled|suspend|inactive|"
    r"virus|relay(?:ing)?\s+(?:denied|not\s+permitted|access\s+denied)|"
    r"not\s+permitted\s+to\s+relay|authenticat|spf|dkim|dmarc|ptr|reverse\s+dns|"
    r"tls|security|content|filter|timed?\s*out|expired|connection|refused|"
    r"too\s+long|loop|hop\s+count|sender|mail\s+from|not\s+allowed|denied|prohibit",
    re.IGNORECASE,
)
# RFC 3463 §3.2: X.1.1 bad mailbox, X.1.2 bad system, X.1.3 bad mailbox syntax,
# X.1.6 mailbox moved; RFC 7505 §4.2: X.1.10 null MX (accepts no mail).
_HARD_STATUSES = frozenset({"1.1", "1.2", "1.3", "1.6", "1.10"})


def find_status(text: str | None) -> str | None:
    """The first RFC 3463 enhanced status code in ``text`` (``"5.1.1"``), if any."""
    if not text:
        return None
    match = _ENHANCED_RE.search(text)
    if match is None:
        return None
    klass, subject, detail = match.groups()
    return f"{klass}.{int(subject)}.{int(detail)}"


def find_reply_code(text: str | None) -> int | None:
    """The first three-digit SMTP reply code (2xx, 4xx, 5xx) in ``text``, if any."""
    if not text:
        return None
    match = _REPLY_RE.search(text)
    return int(match.group(1)) if match else None


def classify_hard(status: str | None, diagnostic: str | None, *, permanent: bool) -> bool:
    """Whether a failure is a *hard* bounce: the address itself is bad.

    Args:
        status: the enhanced status code, when known.
        diagnostic: the remote server's text, when known.
        permanent: whether the failure is permanent (5.x.x / 5xx / "failed").

    Returns:
        ``True`` only for permanent failures whose status (X.1.1, X.1.2, X.1.3,
        X.1.6, X.1.10) or text says the mailbox or domain does not exist or
        accepts no mail; ``False`` otherwise (full mailbox, policy, spam, ...).
    """
    if not permanent:
        return False
    text = diagnostic or ""
    if status is not None and status.split(".", 1)[1] in _HARD_STATUSES:
        # A bad-address code wins unless the words plainly say otherwise.
        return not (_SOFT_TEXT_RE.search(text) and not _HARD_TEXT_RE.search(text))
    if _SOFT_TEXT_RE.search(text):
        return False
    return bool(_HARD_TEXT_RE.search(text))


# ---------------------------------------------------------------------------
# Header helpers


def header(msg: email.message.Message, name: str) -> str | None:
    """A header's value, RFC 2047-decoded and unfolded, or ``None``."""
    try:
        raw = msg.get(name)
    except Exception:  # a malformed header must not stop the parse
        return None
    if raw is None:
        return None
    try:
        text = str(email.header.make_header(email.header.decode_header(raw)))
    except Exception:
        text = str(raw)
    return _clean(text.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))


def first_address(value: str | None) -> str | None:
    """The first addr-spec in an address header value, without brackets."""
    if not value:
        return None
    try:
        pairs = email.utils.getaddresses([value])
    except Exception:
        pairs = []
    for _name, addr in pairs:
        addr = addr.strip()
        if "@" in addr:
            return _clean(addr)
    match = re.search(r"[^\s<>\"'(),;:]+@[^\s<>\"'(),;:]+", value)
    return _clean(match.group(0)) if match else None


def message_id(value: str | None) -> str | None:
    """The first ``<...>`` Message-ID in a header value (a bare id gets brackets)."""
    if not value:
        return None
    match = re.search(r"<[^<>\s]+>", value)
    if match:
        return match.group(0)
    token = value.strip().split()
    if token and "@" in token[0]:
        return f"<{token[0].strip('<>')}>"
    return None


def walk(msg: email.message.Message, *, into_returned: bool = False) -> Iterator[email.message.Message]:
    """Depth-first parts of ``msg``; without ``into_returned``, the returned
    message inside a ``message/rfc822`` part is not entered."""
    yield msg
    if msg.get_content_maintype() == "message" and not into_returned:
        return
    payload = msg.get_payload()
    if isinstance(payload, list):
        for sub in payload:
            if isinstance(sub, email.message.Message):
                yield from walk(sub, into_returned=into_returned)


def part_text(part: email.message.Message) -> str:
    """A leaf part's text, transfer-decoded and charset-decoded, never raising."""
    try:
        data = part.get_payload(decode=True)
    except Exception:
        data = None
    if not isinstance(data, bytes):
        payload = part.get_payload()
        return payload if isinstance(payload, str) else ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return data.decode(charset, "replace")
    except (LookupError, UnicodeError, ValueError):
        return data.decode("latin-1")

