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
import functools
import logging
import re
from collections.abc import Iterable, Iterator
from typing import Any

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


def _check_text(attribute: attrs.Attribute[Any], value: object, *, optional: bool) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value:
        raise TypeError(f"{attribute.name} must be a non-empty str: {value!r}")
    # Values may be written back into a generated DSN (build_dsn): a CR or LF
    # would let the text inject header fields there.
    if "\r" in value or "\n" in value or "\x00" in value:
        raise ValueError(f"{attribute.name} must not contain CR, LF or NUL: {value!r}")


def _text(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    _check_text(attribute, value, optional=False)


def _opt_text(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    _check_text(attribute, value, optional=True)


def _status_format(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and not (isinstance(value, str) and _STATUS_RE.match(value)):
        raise ValueError(f"{attribute.name} must be an enhanced status such as '5.1.1': {value!r}")


def _opt_bool(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{attribute.name} must be a bool or None: {value!r}")


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

    address: str = attrs.field(validator=_text)
    action: DSNAction = attrs.field(converter=DSNAction)
    status: str | None = attrs.field(default=None, validator=_status_format)
    reply_code: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of(int))
    )
    diagnostic: str | None = attrs.field(default=None, validator=_opt_text)
    remote_mta: str | None = attrs.field(default=None, validator=_opt_text)
    final_recipient: str | None = attrs.field(default=None, validator=_opt_text)
    original_recipient: str | None = attrs.field(default=None, validator=_opt_text)
    last_attempt_date: str | None = attrs.field(default=None, validator=_opt_text)
    will_retry_until: str | None = attrs.field(default=None, validator=_opt_text)
    is_permanent: bool | None = attrs.field(default=None, validator=_opt_bool)
    is_hard: bool | None = attrs.field(default=None, validator=_opt_bool)


def _recipient_tuple(value: Iterable[DSNRecipient]) -> tuple[DSNRecipient, ...]:
    return tuple(value)


@attrs.frozen(kw_only=True)
class DSNReport:
    """What :func:`parse_dsn` learned from one message.

    Attributes:
        kind: bounce, delay, delivered, relayed, auto-reply, feedback or not a report.
        recipients: one :class:`DSNRecipient` per recipient the report names.
        envid: ``Original-Envelope-Id`` (RFC 3464 §2.2.1): the ENVID we sent.
        original_message_id: Message-ID of the message this report is about,
            without angle brackets like :attr:`mailrelay.message.Message.message_id`
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

    kind: DSNKind = attrs.field(validator=attrs.validators.instance_of(DSNKind))
    recipients: tuple[DSNRecipient, ...] = attrs.field(
        default=(),
        converter=_recipient_tuple,
        validator=attrs.validators.deep_iterable(attrs.validators.instance_of(DSNRecipient)),
    )
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

# Provider phrasings that name a bad address even when sent after DATA.
_HARD_ALWAYS_RE = re.compile(
    r"doesn'?t\s+have\s+an?\s+\S+\s+account|invalid\s+recipient|"
    r"address\s+(?:couldn'?t|could\s+not)\s+be\s+found|domain\s+is\s+not\s+reachable|"
    r"not\s+listed\s+in\s+(?:the\s+)?(?:domino|public\s+name)",
    re.IGNORECASE,
)
# Words that say the *address* is bad, whatever else the text says.
_HARD_STRONG_RE = re.compile(
    r"user(?:name)?\s+(?:is\s+)?unknown|unknown\s+(?:user|recipient|local[- ]?part|mailbox|"
    r"alias|addressee)|addressee\s+unknown|no\s+such\s+(?:user|recipient|mailbox|account|"
    r"person|local\s+user|domain)|(?:user|recipient|mailbox|address|account)\s+"
    r"(?:\S+\s+)?(?:does\s+not|doesn'?t|did\s+not)\s+exist|not\s+listed\s+in\s+(?:the\s+)?"
    r"(?:domino|public|name|address|directory)|doesn'?t\s+have\s+an?\s+\S+\s+account|"
    r"recipient\s+address\s+rejected:\s+access\s+denied|invalid\s+(?:final\s+delivery\s+)?"
    r"userid|no\s+mailbox\s+here|bad\s+destination\s+mailbox|unrouteable\s+address|"
    r"host\s+(?:or\s+domain\s+name\s+)?(?:\S+\s+)?(?:not\s+found|unknown)|domain\s+(?:name\s+)?not\s+found|"
    r"(?:couldn'?t|could\s+not|cannot|can'?t)\s+find\s+(?:a\s+)?mail\s+exchanger|"
    r"no\s+smtp\s+service|does\s+not\s+accept\s+(?:any\s+)?mail|has\s+moved|"
    r"no\s+account\s+by\s+that\s+name|invalid\s+recipient|address\s+(?:couldn'?t|could\s+not)\s+be\s+found",
    re.IGNORECASE,
)
# Weaker words for a bad address, believed only when no soft word is present.
_HARD_TEXT_RE = re.compile(
    r"does\s+not\s+exist|(?:mailbox|recipient|user|address)\s+not\s+found|"
    r"not\s+a\s+valid\s+(?:mailbox|recipient|user)|invalid\s+(?:recipient|mailbox|address|"
    r"user|domain)|(?:user|recipient|mailbox|account)\s+(?:is\s+)?(?:invalid|not\s+known)|"
    r"name\s+service\s+error|no\s+(?:mx|mail\s+exchanger|valid\s+mx)\b|unknown\s+(?:host|"
    r"domain|address)|mailbox\s+unavailable|no\s+longer\s+(?:available|valid|active)|"
    r"domain\s+is\s+not\s+reachable|undeliverable\s+address|not\s+our\s+(?:customer|user)|"
    r"(?:recipient\s+)?address\s+rejected|illegal\s+host",
    re.IGNORECASE,
)
# Words that mean something other than a bad address: a full mailbox, a block,
# a policy. They keep a bounce soft even with a weak bad-address word.
_SOFT_TEXT_RE = re.compile(
    r"quota|mailbox\s+(?:is\s+)?full|full\s+mailbox|over\s*(?:the\s+)?(?:quota|limit)|"
    r"insufficient|exceed|too\s+(?:large|big|many)|size\s+limit|spam|black\s*list|block\s*list|"
    r"block(?:ed|ing)|reputation|policy|dnsbl|\brbl\b|(?<!not\s)listed\s+(?:at|on|in)|"
    r"rate\s*limit|greylist|try\s+again|temporar|disabled|suspend|virus|"
    r"relay(?:ing)?\s+(?:denied|not\s+permitted|access\s+denied)|not\s+permitted\s+to\s+relay|"
    r"authenticat|\bspf\b|dkim|dmarc|\bptr\b|reverse\s+dns|\btls\b|security|content|filter|"
    r"connection\s+(?:timed\s+out|refused)|timed\s+out|expired|loop|hop\s+count|"
    r"sender\s+address\s+rejected|not\s+allowed|prohibit|denied",
    re.IGNORECASE,
)
# Rejected only after the message text was sent (end of DATA): a "user unknown"
# there is a content filter's verdict on the message, not on the mailbox.
_AFTER_DATA_RE = re.compile(
    r"end\s+of\s+data|>>>\s*data\b|final\s+data|after\s+data|command\s+data|"
    r"reply\s+to\s+data|data\s+command",
    re.IGNORECASE,
)
_ABOUT_SENDER_RE = re.compile(
    r"(?:after|in\s+reply\s+to)\s+MAIL\s+FROM|sender\s+address|domain\s+of\s+sender|"
    r"sender\s+(?:rejected|refused|denied|unknown|domain)",
    re.IGNORECASE,
)
_ADDRESS_IN_TEXT_RE = re.compile(
    r"(?<![^\s<>()\[\]\"',;:])[^\s<>()\[\]\"',;:]+@[^\s<>()\[\]\"',;:]+"
)
# RFC 3463 §3.2: X.1.1 bad mailbox, X.1.2 bad system, X.1.3 bad mailbox syntax,
# X.1.6 mailbox moved; RFC 7505 §4.2: X.1.10 null MX (accepts no mail).
_HARD_STATUSES = frozenset({"1.1", "1.2", "1.3", "1.6", "1.10"})
# RFC 3463 §3.3-3.9: the mailbox exists but is disabled or full (X.2.x), the
# destination system, the content or the security policy refused (X.3.x, X.6.x,
# X.7.x); X.1.7/X.1.8 are about the *sender's* address. None is a bad address.
_SOFT_SUBJECTS = frozenset({"2", "3", "6", "7"})
_SOFT_STATUSES = frozenset({"1.7", "1.8"})


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


# Cached: a report often gives many recipients the same status and text (a mailing to
# one domain refused whole), and the regular expressions run over up to a kilobyte each.
@functools.lru_cache(maxsize=512)
def classify_hard(
    status: str | None, diagnostic: str | None, *, permanent: bool, context: str | None = None
) -> bool:
    """Whether a failure is a *hard* bounce: the address itself is bad.

    Args:
        status: the enhanced status code, when known.
        diagnostic: the remote server's text, when known.
        permanent: whether the reporting MTA gave up (``Action: failed``).
        context: more of the report's prose about this recipient (the SMTP
            phase of the rejection is often only there).

    Returns:
        ``True`` only for permanent failures whose status (X.1.1, X.1.2, X.1.3,
        X.1.6, X.1.10; RFC 3463 §3.2, RFC 7505) or words say the mailbox or
        domain does not exist or accepts no mail; ``False`` for everything else
        (full mailbox, policy, spam, a transient 4.x.x status, a refusal after
        the message text was sent).
    """
    if not permanent or (status is not None and not status.startswith("5")):
        return False
    # Addresses are dropped first: "filtered@example.org" is not a filter.
    # Without a diagnostic, the prose about the recipient is all there is.
    text = _ADDRESS_IN_TEXT_RE.sub(" ", diagnostic or context or "")
    around = _ADDRESS_IN_TEXT_RE.sub(" ", context or "")
    subject_detail = status.split(".", 1)[1] if status is not None else ""
    if subject_detail in _SOFT_STATUSES or _ABOUT_SENDER_RE.search(text):
        # RFC 3463 X.1.7/X.1.8, or refused at MAIL FROM: the *sender* was
        # refused, which says nothing about the recipient's address.
        return False
    strong = _HARD_STRONG_RE.search(text)
    soft = _SOFT_TEXT_RE.search(text)
    if subject_detail in _HARD_STATUSES:
        # The server named the failure a bad address: believe it unless the
        # words plainly say something else.
        return bool(strong or not soft)
    if _HARD_ALWAYS_RE.search(text):
        return True
    if _AFTER_DATA_RE.search(text) or _AFTER_DATA_RE.search(around):
        return False
    if strong:
        return True
    if subject_detail.split(".")[0] in _SOFT_SUBJECTS or subject_detail in _SOFT_STATUSES:
        return False
    if soft:
        return False
    return bool(_HARD_TEXT_RE.search(text))


# ---------------------------------------------------------------------------
# Header helpers


def header(msg: email.message.Message, name: str) -> str | None:
    """A header's value, RFC 2047-decoded and unfolded, or ``None``."""
    wanted = name.lower()
    # raw_items(): the stored value, before compat32 wraps 8-bit text in a Header.
    raw = next((v for k, v in msg.raw_items() if k.lower() == wanted), None)
    if raw is None:
        return None
    if isinstance(raw, str) and not raw.isascii():
        # Raw 8-bit header bytes (RFC 6532 UTF-8, or worse), kept by compat32
        # as surrogates: read them as UTF-8.
        text = raw.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        return _clean(text)
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
        if "@" in addr:
            return _clean(addr.strip())
    match = re.search(r"(?<![^\s<>\"'(),;:])[^\s<>\"'(),;:]+@[^\s<>\"'(),;:]+", value)
    return _clean(match.group(0)) if match else None


def message_id(value: str | None) -> str | None:
    """The first Message-ID in a header value, *without* angle brackets (as
    :attr:`mailrelay.message.Message.message_id` gives it)."""
    if not value:
        return None
    match = re.search(r"<([^<>\s]+)>", value)
    if match:
        return match.group(1)
    token = value.strip().split()
    if token and "@" in token[0]:
        return token[0].strip("<>") or None
    return None


def walk(
    msg: email.message.Message, *, into_returned: bool = False
) -> Iterator[email.message.Message]:
    """Depth-first parts of ``msg``; without ``into_returned``, the returned
    message inside a ``message/rfc822`` part is not entered."""
    yield msg
    if msg.get_content_maintype() == "message" and not into_returned:
        return
    # is_multipart() first: on a leaf, get_payload() decodes the text by its charset
    # parameter, and raises on one like "us-ascii\0".
    if msg.is_multipart():
        for sub in msg.get_payload():
            if isinstance(sub, email.message.Message):
                yield from walk(sub, into_returned=into_returned)


def part_text(part: email.message.Message) -> str:
    """A leaf part's text, transfer-decoded and charset-decoded, never raising."""
    try:
        data = part.get_payload(decode=True)
    except Exception:
        data = None
    if not isinstance(data, bytes):
        try:
            payload = part.get_payload()
        except (LookupError, UnicodeError, ValueError):  # a charset like "us-ascii\0"
            return ""
        return payload if isinstance(payload, str) else ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return data.decode(charset)
    except (LookupError, UnicodeError, ValueError):
        pass
    # Mislabelled text is most often UTF-8 in fact.
    try:
        return data.decode("utf-8")
    except UnicodeError:
        pass
    try:
        return data.decode(charset, "replace")
    except (LookupError, UnicodeError, ValueError):
        return data.decode("latin-1")
