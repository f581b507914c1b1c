"""The service extensions a server announced in its EHLO/LHLO reply.

Rules (RFC 5321 §4.1.1.1, §4.1.2):

* The first line of a 250 EHLO reply is the server's name and greeting, not a
  keyword; every later line is ``ehlo-keyword *(SP ehlo-param)``.
* Keywords are case-insensitive: they are stored upper-cased. Unknown keywords
  are kept with their parameter text in :attr:`Extensions.keywords`.
* ``AUTH`` mechanisms come from ``AUTH mech ...`` and also from the pre-standard
  ``AUTH=mech ...`` form some old servers still send; both are merged.
* ``SIZE`` (RFC 1870 §4): ``SIZE n`` declares a maximum; ``SIZE`` alone or
  ``SIZE 0`` means "no fixed maximum" (``size`` is None, ``"SIZE" in ext`` is True).
* ``LIMITS`` (RFC 9422 §3): ``LIMITS name[=value] ...``; the three limits RFC 9422
  registers are read: ``RCPTMAX`` (RCPTs per transaction), ``RCPTDOMAINMAX`` (recipient
  domains per transaction) and ``MAILMAX`` (transactions per session). A malformed value
  (not a positive decimal number of at most 9 digits) is ignored, as RFC 9422 asks of a
  limit the client cannot read; unknown limits stay in :attr:`Extensions.keywords`.
* Lines that are not a keyword at all are ignored: servers send odd things, and
  an extension we cannot read is one we do not use.
"""

from __future__ import annotations

import re
import types
from collections.abc import Iterable, Mapping
from typing import Final

import attrs

__all__ = ["Extensions"]

# RFC 5321 §4.1.1.1: ehlo-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-").
_KEYWORD: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_EMPTY: Final[Mapping[str, str]] = types.MappingProxyType({})


def _freeze(value: Mapping[str, str]) -> Mapping[str, str]:
    return types.MappingProxyType(dict(value))


# RFC 9422: the registered limits, whose values we use, each a count (1*DIGIT); more than 9 digits
# is no limit in practice, and int() of a huge string is slow.
_COUNTED_LIMITS: Final = frozenset({"RCPTMAX", "RCPTDOMAINMAX", "MAILMAX"})
_COUNT: Final = re.compile(r"[0-9]{1,9}")


def _limits(params: str | None) -> dict[str, int]:
    """The counted limits of a ``LIMITS`` keyword's parameters (RFC 9422 §3:
    ``limit-name ["=" limit-value]``, separated by spaces), by upper-cased name."""
    found: dict[str, int] = {}
    if not params:
        return found
    for item in params.split(" "):
        name, _, value = item.partition("=")
        name = name.upper()
        if name in _COUNTED_LIMITS and _COUNT.fullmatch(value) and int(value) > 0:
            found.setdefault(name, int(value))
    return found


@attrs.frozen(kw_only=True, eq=True, hash=False)
class Extensions:
    """What the server offers, parsed from its EHLO/LHLO reply.

    Compared by value; not hashable (it holds a mapping).

    Attributes:
        size: the declared maximum message size in octets (RFC 1870), or None
            when no limit was declared (also for ``SIZE`` with no or zero value, or a
            value of more than 20 digits).
        pipelining: PIPELINING (RFC 2920).
        eight_bit_mime: 8BITMIME (RFC 6152).
        smtputf8: SMTPUTF8 (RFC 6531).
        starttls: STARTTLS (RFC 3207).
        auth: the SASL mechanisms offered, upper-cased (RFC 4954, incl. ``AUTH=``).
        dsn: DSN (RFC 3461).
        enhanced_status_codes: ENHANCEDSTATUSCODES (RFC 2034).
        chunking: CHUNKING, i.e. BDAT (RFC 3030).
        binary_mime: BINARYMIME (RFC 3030).
        requiretls: REQUIRETLS (RFC 8689).
        rcpt_max: LIMITS ``RCPTMAX`` (RFC 9422): the most RCPT commands the server
            takes in one transaction, or None.
        rcpt_domain_max: LIMITS ``RCPTDOMAINMAX`` (RFC 9422): the most different
            recipient domains in one transaction, or None.
        mail_max: LIMITS ``MAILMAX`` (RFC 9422): the most transactions in one
            session, or None.
        keywords: every keyword announced (upper-cased) -> its parameter text
            (``""`` when it had none).
    """

    size: int | None = None
    pipelining: bool = False
    eight_bit_mime: bool = False
    smtputf8: bool = False
    starttls: bool = False
    auth: frozenset[str] = frozenset()
    dsn: bool = False
    enhanced_status_codes: bool = False
    chunking: bool = False
    binary_mime: bool = False
    requiretls: bool = False
    rcpt_max: int | None = None
    rcpt_domain_max: int | None = None
    mail_max: int | None = None
    keywords: Mapping[str, str] = attrs.field(default=_EMPTY, converter=_freeze)

    @classmethod
    def parse(cls, reply_lines: Iterable[str]) -> Extensions:
        """Parse the lines of a 250 EHLO/LHLO reply (the first line is the greeting).

        Args:
            reply_lines: the reply's text lines, without codes (``Reply.lines``).
        """
        keywords: dict[str, str] = {}
        auth: set[str] = set()
        old_auth: str | None = None
        lines = iter(reply_lines)
        next(lines, None)  # RFC 5321 §4.1.1.1: the first line is the domain and greeting.
        for line in lines:
            word, _, params = line.strip().partition(" ")
            params = " ".join(params.split())
            if word[:5].upper() == "AUTH=":
                # The pre-RFC 2554 form "AUTH=LOGIN PLAIN", sent by old servers
                # (and by some current ones next to the standard line).
                first = word[5:]
                old_auth = f"{first} {params}".strip()
                auth.update(m.upper() for m in old_auth.split())
                continue
            if _KEYWORD.fullmatch(word) is None:
                continue
            keyword = word.upper()
            keywords[keyword] = params
            if keyword == "AUTH":
                auth.update(m.upper() for m in params.split())
        if old_auth is not None and "AUTH" not in keywords:
            keywords["AUTH"] = old_auth
        size: int | None = None
        size_text = keywords.get("SIZE", "")
        # Up to 20 digits (10^20 octets is no limit in practice): int() refuses a string
        # of over 4,300 digits, and a server's reply line may be longer than that.
        if size_text.isdecimal() and size_text.isascii() and len(size_text) <= 20:
            size = int(size_text) or None  # RFC 1870 §4: 0 means no fixed maximum.
        limits = _limits(keywords.get("LIMITS"))
        return cls(
            size=size,
            pipelining="PIPELINING" in keywords,
            eight_bit_mime="8BITMIME" in keywords,
            smtputf8="SMTPUTF8" in keywords,
            starttls="STARTTLS" in keywords,
            auth=frozenset(auth),
            dsn="DSN" in keywords,
            enhanced_status_codes="ENHANCEDSTATUSCODES" in keywords,
            chunking="CHUNKING" in keywords,
            binary_mime="BINARYMIME" in keywords,
            requiretls="REQUIRETLS" in keywords,
            rcpt_max=limits.get("RCPTMAX"),
            rcpt_domain_max=limits.get("RCPTDOMAINMAX"),
            mail_max=limits.get("MAILMAX"),
            keywords=keywords,
        )

    def __contains__(self, keyword: object) -> bool:
        """``"PIPELINING" in extensions``: whether the keyword was announced (any case)."""
        return isinstance(keyword, str) and keyword.upper() in self.keywords
