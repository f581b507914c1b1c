"""Envelope addresses: the RFC 5321 §4.1.2 ``Mailbox``, extended by RFC 6531 and IDNA 2008.

An :class:`Address` is what goes between ``<`` and ``>`` in ``MAIL FROM`` and
``RCPT TO``. It is *not* an RFC 5322 header address: display names, comments,
folding whitespace, obsolete syntax and route prefixes are all refused.

Rules (each is cited again at the line that enforces it):

* Local part (RFC 5321 §4.1.2): a ``Dot-string`` (atoms of ``atext`` joined by
  single dots) or a ``Quoted-string`` whose quoted pairs escape only printable
  ASCII or space. A quoted string must be the whole local part. RFC 6531 §3.3
  adds non-ASCII characters to both; we admit letters, marks, numbers,
  punctuation, symbols and ZWNJ/ZWJ, never controls, format characters,
  unassigned or private-use code points, surrogates or Unicode spaces.
* Domain: LDH labels of at most 63 octets (RFC 5321 §4.1.2, RFC 1035 §2.3.4),
  no trailing root dot (the ``Domain`` rule has none), and a top-level label
  that is not all digits (RFC 3696 §2: ``user@192.0.2.1`` is a mistake for the
  literal ``[192.0.2.1]``). Non-ASCII labels must be valid IDNA 2008 U-labels
  and ``xn--`` labels valid A-labels (RFC 5891 §5.4), checked with ``idna``.
* Address literals: ``[IPv4]`` and ``[IPv6:...]`` following RFC 5321 §4.1.3
  exactly (``::`` stands for at least two zero groups; no zone index; no
  leading zeros in IPv4 parts). General address literals ``[tag:content]``
  are refused: no MTA we talk to needs them.
* Lengths (RFC 5321 §4.5.3.1): local part 64 octets, domain 255 octets, label
  63 octets, and the whole path 256 octets including ``<`` and ``>``, so the
  address itself at most 254. Lengths are counted in UTF-8 octets, for the
  text as given *and* for every form we may send (U-labels and A-labels).
* Never accepted anywhere: control characters (CR, LF, NUL, TAB, DEL, C1),
  ``<`` and ``>`` (even quoted: they would confuse a naive path parser), and
  outside quotes spaces and comments.

Normalization (equality and hashing use the normalized form):

* ``domain`` is lowercased and NFC-normalized; A-labels are decoded, so
  ``domain`` holds U-labels and ``ascii_domain`` the A-labels. IPv6 literals
  are rewritten in RFC 5952 form (lowercase, ``::`` for the longest run of
  zero groups, IPv4-mapped addresses with a dotted tail) behind the tag ``IPv6:``.
* ``local_part`` is NFC-normalized but keeps its case (local parts are
  case-sensitive, RFC 5321 §2.4) and holds the unquoted value; ``str()``
  adds quotes back only when the value is not a valid dot-string.

Parsing takes a fast path for the common all-ASCII ``dot-atom@ldh.domain``
case (one precompiled regular expression); everything else goes through a
careful character-by-character path that also produces the error messages.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import unicodedata
from typing import Final

import attrs
import idna

from mailrelay.errors import InvalidAddress

__all__ = [
    "MAX_ADDRESS",
    "MAX_DOMAIN",
    "MAX_LABEL",
    "MAX_LOCAL_PART",
    "Address",
]

#: RFC 5321 §4.5.3.1.1: the longest local part, in octets.
MAX_LOCAL_PART: Final = 64
#: RFC 5321 §4.5.3.1.2: the longest domain, in octets.
MAX_DOMAIN: Final = 255
#: RFC 1035 §2.3.4: the longest DNS label, in octets.
MAX_LABEL: Final = 63
#: RFC 5321 §4.5.3.1.3: a path is at most 256 octets including ``<`` and ``>``.
MAX_ADDRESS: Final = 256 - 2

# RFC 5322 §3.2.3 atext, which RFC 5321 §4.1.2 Atom reuses.
_ATEXT_CHARS: Final = "A-Za-z0-9!#$%&'*+/=?^_`{|}~-"
_ATEXT: Final = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+/=?^_`{|}~-"
)
_LDH_LABEL: Final = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"

# The fast path: all-ASCII Dot-string "@" Domain of LDH labels. A match still
# has to pass the length, A-label and numeric-TLD checks in Address.parse.
_FAST: Final = re.compile(
    rf"([{_ATEXT_CHARS}]+(?:\.[{_ATEXT_CHARS}]+)*)@((?:{_LDH_LABEL}\.)*{_LDH_LABEL})"
)
_ASCII_DOT_STRING: Final = re.compile(rf"[{_ATEXT_CHARS}]+(?:\.[{_ATEXT_CHARS}]+)*")
_LDH: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")
# C0 controls (CR, LF, NUL, TAB, ...), DEL, C1 controls and lone surrogates.
_FORBIDDEN: Final = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_IPV4_SHAPE: Final = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")
_HEX_GROUP: Final = re.compile(r"[0-9A-Fa-f]{1,4}")
# Zero-width non-joiner and joiner are format characters that some scripts need.
_JOINERS: Final = frozenset("\u200c\u200d")


class _Problem(Exception):
    """What is wrong with an address; Address turns it into InvalidAddress."""


def _unicode_ok(ch: str) -> bool:
    # RFC 6531 §3.3 admits any UTF8-non-ascii; we keep the printable ones.
    return unicodedata.category(ch)[0] in "LMNPS" or ch in _JOINERS


def _describe(ch: str) -> str:
    name = unicodedata.name(ch, "")
    return f"{ch!r} (U+{ord(ch):04X}{' ' + name if name else ''})"


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _is_dot_string(value: str) -> bool:
    """Whether ``value`` can be written unquoted (RFC 5321 §4.1.2 Dot-string)."""
    if value.isascii():
        return _ASCII_DOT_STRING.fullmatch(value) is not None
    if not value or value[0] == "." or value[-1] == "." or ".." in value:
        return False
    return all(c == "." or c in _ATEXT or (c > "\x7f" and _unicode_ok(c)) for c in value)


def _render_local(value: str) -> str:
    """The local part as written on the wire: quoted only when it has to be."""
    if _is_dot_string(value):
        return value
    # RFC 5321 §4.1.2: inside quotes only '"' and '\' need a quoted-pair.
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _check_local_value(value: str) -> None:
    """Every character of an (unquoted) local part value must be quotable."""
    for ch in value:
        if " " <= ch <= "~":
            if ch in "<>":
                raise _Problem("'<' and '>' are not allowed in an envelope address")
        elif ch <= "\x7f" or not _unicode_ok(ch):
            raise _Problem(f"character {_describe(ch)} is not allowed in the local part")


def _diagnose_dot_string(local: str) -> _Problem:
    """Explain why an unquoted local part is not a Dot-string."""
    if not local:
        return _Problem('the local part is empty (an empty local part is written "")')
    for ch in local:
        if ch == "." or ch in _ATEXT or (ch > "\x7f" and _unicode_ok(ch)):
            continue
        if ch == " " or unicodedata.category(ch) == "Zs":
            return _Problem("unquoted space in the local part (quote the local part to use one)")
        if ch in "()":
            return _Problem("comments are not allowed in an envelope address")
        if ch in "<>":
            return _Problem(
                "'<' and '>' are not part of an envelope address (pass the address without them)"
            )
        if ch == '"':
            return _Problem(
                "a quoted string must be the whole local part (RFC 5321 §4.1.2), "
                "not mixed with unquoted parts"
            )
        if ch <= "\x7f":
            return _Problem(f"character {ch!r} must be quoted in the local part")
        return _Problem(f"character {_describe(ch)} is not allowed in the local part")
    if local[0] == ".":
        return _Problem("the local part starts with a dot")
    if local[-1] == ".":
        return _Problem("the local part ends with a dot")
    return _Problem("the local part has two dots in a row")


def _quoted_local(text: str) -> tuple[str, int]:
    """Parse the Quoted-string at the start of ``text``.

    Returns the unquoted value and the index just after the closing quote.
    """
    out: list[str] = []
    i, n = 1, len(text)
    while i < n:
        ch = text[i]
        if ch == '"':
            return "".join(out), i + 1
        if ch == "\\":
            if i + 1 >= n:
                break
            ch = text[i + 1]
            # RFC 5321 §4.1.2 quoted-pairSMTP = "\" %d32-126: printable ASCII or space.
            if not " " <= ch <= "~":
                raise _Problem(
                    "a backslash in a quoted local part may only escape printable ASCII "
                    "or space (RFC 5321 §4.1.2)"
                )
            i += 1
        out.append(ch)
        i += 1
    raise _Problem("the quoted local part has no closing quote")


def _local_part(text: str) -> tuple[str, int, int]:
    """Split off the local part.

    Returns its NFC value, its length in octets as written, and the index of the "@".
    """
    if text[0] == '"':
        value, end = _quoted_local(text)
        if end == len(text):
            raise _Problem("there is no '@' and domain after the quoted local part")
        if text[end] != "@":
            if text[end] == ".":
                raise _Problem(
                    "a quoted string must be the whole local part (RFC 5321 §4.1.2), "
                    "not mixed with unquoted parts"
                )
            if text[end] in " (":
                raise _Problem("comments and whitespace are not allowed in an envelope address")
            raise _Problem(f"unexpected {text[end]!r} after the quoted local part")
        if not value.isascii():
            value = unicodedata.normalize("NFC", value)
        _check_local_value(value)
        return value, _utf8_len(text[:end]), end
    at = text.find("@")
    if at < 0:
        raise _Problem("there is no '@'")
    if at == 0:
        raise _Problem("the local part is missing")
    local = text[:at]
    if not local.isascii():
        local = unicodedata.normalize("NFC", local)
    # RFC 5321 §4.1.2: Dot-string = Atom *("." Atom); Atom = 1*atext (+ UTF-8, RFC 6531 §3.3).
    if not _is_dot_string(local):
        raise _diagnose_dot_string(local)
    return local, _utf8_len(text[:at]), at


def _ipv6(content: str) -> ipaddress.IPv6Address:
    """Check ``content`` against RFC 5321 §4.1.3 IPv6-addr and return the address."""
    text = content
    if "." in text:
        # IPv6v4-full / IPv6v4-comp: the IPv4 tail counts as two groups, which
        # makes the group limits below the same as for the pure forms.
        head, _, tail = text.rpartition(":")
        if not _IPV4_SHAPE.fullmatch(tail):
            raise _Problem(f"{tail!r} is not an IPv4 address inside the IPv6 literal")
        try:
            v4 = int(ipaddress.IPv4Address(tail))
        except ValueError:
            raise _Problem(f"{tail!r} is not a valid IPv4 address") from None
        text = f"{head}:{v4 >> 16:x}:{v4 & 0xFFFF:x}"
    if "::" in text:
        head, _, tail = text.partition("::")
        if "::" in tail:
            raise _Problem("an IPv6 literal may contain '::' only once")
        groups = (head.split(":") if head else []) + (tail.split(":") if tail else [])
        # RFC 5321 §4.1.3: '::' represents at least 2 groups, so at most 6 others.
        if len(groups) > 6:
            raise _Problem("'::' in an IPv6 literal must stand for at least two zero groups")
    else:
        groups = text.split(":")
        if len(groups) != 8:
            raise _Problem("an IPv6 literal without '::' needs exactly 8 groups")
    for group in groups:
        if not _HEX_GROUP.fullmatch(group):
            raise _Problem(f"{group!r} is not a group of 1 to 4 hex digits in the IPv6 literal")
    try:
        return ipaddress.IPv6Address(content)
    except ValueError as exc:  # pragma: no cover - the grammar above is stricter
        raise _Problem(f"invalid IPv6 literal: {exc}") from None


def _address_literal(raw: str) -> str:
    """Validate ``[...]`` and return its canonical text (RFC 5321 §4.1.3)."""
    close = raw.find("]")
    if close < 0:
        raise _Problem("the address literal has no closing ']'")
    if close != len(raw) - 1:
        raise _Problem("text follows the address literal")
    inner = raw[1:-1]
    if _IPV4_SHAPE.fullmatch(inner):
        try:
            # ipaddress also refuses leading zeros, which some stacks read as octal.
            return f"[{ipaddress.IPv4Address(inner)}]"
        except ValueError:
            raise _Problem(f"{inner!r} is not a valid IPv4 address") from None
    tag, colon, content = inner.partition(":")
    if colon and (not tag or _HEX_GROUP.fullmatch(tag)):
        raise _Problem("an IPv6 address literal needs the tag, as in [IPv6:2001:db8::1]")
    if not colon:
        raise _Problem(
            "an address literal must be an IPv4 address like [192.0.2.1] or [IPv6:2001:db8::1]"
        )
    # ABNF literal strings are case-insensitive, so "ipv6:" is the same tag.
    if tag.lower() != "ipv6":
        raise _Problem(
            "general address literals like [tag:content] are not supported; "
            "use [IPv4] or [IPv6:...]"
        )
    address = _ipv6(content)
    # RFC 5952 §4 text form; §5 writes IPv4-mapped addresses with a dotted tail
    # (done by hand: Python versions differ on how str() shows them).
    mapped = address.ipv4_mapped
    return f"[IPv6:::ffff:{mapped}]" if mapped is not None else f"[IPv6:{address.compressed}]"


def _idna_error(label: str, exc: Exception) -> _Problem:
    return _Problem(f"invalid internationalized domain label {label!r}: {exc}")


@functools.lru_cache(maxsize=4096)
def _a_label(label: str) -> tuple[str, str]:
    """U-label and A-label for an ``xn--`` label (bounded cache)."""
    try:
        ulabel = idna.decode(label, strict=True)
        # RFC 5891 §5.4: an A-label must survive decoding and re-encoding unchanged.
        if idna.encode(ulabel, strict=True).decode("ascii") != label:
            raise _Problem(f"{label!r} is not a canonical A-label")
    except (UnicodeError, ValueError) as exc:  # idna.IDNAError is a UnicodeError
        raise _idna_error(label, exc) from None
    return ulabel, label


@functools.lru_cache(maxsize=4096)
def _u_label(label: str) -> tuple[str, str]:
    """U-label and A-label for a non-ASCII label as written (bounded cache)."""
    lowered = unicodedata.normalize("NFC", label.lower())
    try:
        return lowered, idna.encode(lowered, strict=True).decode("ascii")
    except (UnicodeError, ValueError) as exc:
        problem = _idna_error(lowered, exc)
    as_written = unicodedata.normalize("NFC", label)
    if as_written != lowered:
        # A few PVALID letters (Cherokee capitals, for one) have DISALLOWED
        # lowercase forms: such a label is valid only as written, and that is
        # also what its A-label decodes to.
        try:
            return as_written, idna.encode(as_written, strict=True).decode("ascii")
        except (UnicodeError, ValueError):
            pass
    raise problem


def _diagnose_label(label: str) -> _Problem:
    label = label.lower()
    if not label:
        return _Problem("the domain has two dots in a row")
    if len(label) > MAX_LABEL:
        return _Problem(f"a domain label is {len(label)} octets long, more than {MAX_LABEL}")
    if label[0] == "-":
        return _Problem(f"the domain label {label!r} starts with a hyphen")
    if label[-1] == "-":
        return _Problem(f"the domain label {label!r} ends with a hyphen")
    for ch in label:
        if ch > "\x7f" or "a" <= ch <= "z" or "0" <= ch <= "9" or ch == "-":
            continue
        if ch == "@":
            return _Problem("more than one '@' (quote the local part if it contains '@')")
        if ch == " ":
            return _Problem("unquoted space in the domain")
        if ch in "()":
            return _Problem("comments are not allowed in an envelope address")
        if ch in "<>":
            return _Problem(
                "'<' and '>' are not part of an envelope address (pass the address without them)"
            )
        return _Problem(
            f"character {ch!r} is not allowed in a domain name (letters, digits and hyphens only)"
        )
    return _Problem(f"the domain label {label!r} is not valid")


def _domain_name(raw: str) -> tuple[str, str]:
    """Validate a domain name; return its U-label and A-label forms."""
    if raw[0] == ".":
        raise _Problem("the domain starts with a dot")
    # RFC 5321 §4.1.2: Domain = sub-domain *("." sub-domain); no root dot.
    if raw[-1] == ".":
        raise _Problem("the domain ends with a dot (write it without the trailing root dot)")
    ulabels: list[str] = []
    alabels: list[str] = []
    for part in raw.split("."):
        if part.isascii():
            label = part.lower()
            if label.startswith("xn--"):
                if len(label) > MAX_LABEL or not _LDH.fullmatch(label):
                    raise _diagnose_label(label)
                ulabel, alabel = _a_label(label)
            else:
                # RFC 5321 §4.1.2 sub-domain = Let-dig [Ldh-str]; RFC 1035 §2.3.4: 63 octets.
                if len(label) > MAX_LABEL or not _LDH.fullmatch(label):
                    raise _diagnose_label(label)
                ulabel = alabel = label
        else:
            for ch in part:
                if ch <= "\x7f" and not ("a" <= ch.lower() <= "z" or "0" <= ch <= "9" or ch == "-"):
                    raise _diagnose_label(part)
            ulabel, alabel = _u_label(part)
            if len(alabel) > MAX_LABEL:
                raise _Problem(f"a domain label is {len(alabel)} octets long, more than 63")
        ulabels.append(ulabel)
        alabels.append(alabel)
    # RFC 3696 §2: a top-level domain is never all-numeric.
    if alabels[-1].isdigit():
        raise _Problem(
            "the top-level domain is all digits; an IP address must be written as an "
            "address literal such as [192.0.2.1]"
        )
    return ".".join(ulabels), ".".join(alabels)


def _domain(raw: str) -> tuple[str, str]:
    if not raw:
        raise _Problem("the domain is missing")
    if raw[0] == "[":
        literal = _address_literal(raw)
        return literal, literal
    return _domain_name(raw)


def _check_lengths(local: str, domain: str, ascii_domain: str) -> None:
    """RFC 5321 §4.5.3.1 limits on every form of the address we may send."""
    local_octets = _utf8_len(_render_local(local))
    if local_octets > MAX_LOCAL_PART:
        raise _too_long_local(local_octets)
    domain_octets = max(len(ascii_domain), _utf8_len(domain))
    if domain_octets > MAX_DOMAIN:
        raise _Problem(f"the domain is {domain_octets} octets long, more than {MAX_DOMAIN}")
    total = local_octets + 1 + domain_octets
    if total > MAX_ADDRESS:
        raise _too_long_address(total)


def _too_long_local(octets: int) -> _Problem:
    return _Problem(
        f"the local part is {octets} octets long, more than {MAX_LOCAL_PART} (RFC 5321 §4.5.3.1.1)"
    )


def _too_long_address(octets: int) -> _Problem:
    return _Problem(
        f"the address is {octets} octets long, more than {MAX_ADDRESS} "
        "(a path is at most 256 octets with its angle brackets, RFC 5321 §4.5.3.1.3)"
    )


def _parse(text: str) -> tuple[str, str, str]:
    """The careful path: return (local part, domain, ascii domain) or raise _Problem."""
    bad = _FORBIDDEN.search(text)
    if bad is not None:
        ch = bad.group()
        if ch in "\r\n":
            raise _Problem("CR and LF are never allowed in an address")
        if "\ud800" <= ch <= "\udfff":
            raise _Problem("the address is not valid Unicode (it holds a lone surrogate)")
        raise _Problem(f"control character U+{ord(ch):04X} is not allowed in an address")
    if not text:
        raise _Problem("the address is empty")
    if text != text.strip():
        raise _Problem("the address has leading or trailing whitespace")
    if text[0] == "<" or text[-1] == ">":
        raise _Problem(
            "'<' and '>' are not part of an envelope address (pass the address without them)"
        )
    octets = _utf8_len(text)
    if octets > MAX_ADDRESS:
        raise _too_long_address(octets)
    local, local_octets, at = _local_part(text)
    if local_octets > MAX_LOCAL_PART:
        raise _too_long_local(local_octets)
    domain, ascii_domain = _domain(text[at + 1 :])
    _check_lengths(local, domain, ascii_domain)
    return local, domain, ascii_domain


def _shown(text: str) -> str:
    return repr(text) if len(text) <= 80 else repr(text[:77]) + "..."


@attrs.frozen(kw_only=True)
class Address:
    """An SMTP envelope address (an RFC 5321 ``Mailbox``), normalized.

    Build one with :meth:`parse`. The constructor takes the already normalized
    parts and refuses anything else, so every ``Address`` is valid.

    Attributes:
        local_part: the local part's value: unquoted, NFC, case preserved.
        domain: the domain in U-label form, lowercased and NFC; for an address
            literal the bracketed text, e.g. ``[192.0.2.1]`` or ``[IPv6:2001:db8::1]``.
        ascii_domain: the domain with A-labels (the same as ``domain`` when it
            is all ASCII); what goes on the wire without SMTPUTF8.
        needs_smtputf8: whether the local part is non-ASCII, so that the address
            can only be sent to a server offering SMTPUTF8 (RFC 6531). A non-ASCII
            domain alone does not need it: it can be sent as A-labels.

    Raises:
        InvalidAddress: from the constructor, when the parts are not valid or
            not in normalized form.
        TypeError: from the constructor, when a part is not a ``str``.
    """

    local_part: str
    domain: str
    ascii_domain: str = attrs.field(init=False, eq=False, repr=False)
    needs_smtputf8: bool = attrs.field(init=False, eq=False, repr=False)
    # The canonical text (str(self)), made once: an address is immutable, and its text is
    # asked for several times per message (stored, logged, sent), each time quoting the
    # local part again otherwise.
    _text: str = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        local, domain = self.local_part, self.domain
        if not isinstance(local, str) or not isinstance(domain, str):
            raise TypeError("Address needs str values for local_part and domain")
        try:
            bad = _FORBIDDEN.search(local + domain)
            if bad is not None:
                raise _Problem(f"control character U+{ord(bad.group()):04X} is not allowed")
            if local != unicodedata.normalize("NFC", local):
                raise _Problem("local_part is not NFC-normalized; use Address.parse()")
            _check_local_value(local)
            norm_domain, ascii_domain = _domain(domain)
            if norm_domain != domain:
                raise _Problem(
                    f"domain is not in normalized form (expected {norm_domain!r}); "
                    "use Address.parse()"
                )
            _check_lengths(local, norm_domain, ascii_domain)
        except _Problem as exc:
            raise InvalidAddress(
                f"invalid address parts {local!r}, {domain!r}: {exc}",
                address=f"{local}@{domain}",
            ) from None
        object.__setattr__(self, "ascii_domain", ascii_domain)
        object.__setattr__(self, "needs_smtputf8", not local.isascii())
        object.__setattr__(self, "_text", f"{_render_local(local)}@{domain}")

    @classmethod
    def _make(cls, local: str, domain: str, ascii_domain: str) -> Address:
        # Parsing has already checked and normalized every part; going through
        # __init__ would check it all a second time on the hot path.
        self = object.__new__(cls)
        object.__setattr__(self, "local_part", local)
        object.__setattr__(self, "domain", domain)
        object.__setattr__(self, "ascii_domain", ascii_domain)
        object.__setattr__(self, "needs_smtputf8", not local.isascii())
        object.__setattr__(self, "_text", f"{_render_local(local)}@{domain}")
        return self

    @classmethod
    def parse(cls, text: str) -> Address:
        """Parse and normalize an envelope address such as ``user@example.com``.

        Args:
            text: the address without angle brackets, e.g. ``"Jo.Doe@Example.COM"``,
                ``'"jo doe"@example.com'``, ``"δοκιμή@παράδειγμα.δοκιμή"`` or
                ``"postmaster@[IPv6:2001:db8::1]"``.

        Returns:
            The normalized address.

        Raises:
            InvalidAddress: when ``text`` is not a usable envelope address; the
                message says what is wrong and ``.address`` holds ``text``.
            TypeError: when ``text`` is not a ``str``.
        """
        if not isinstance(text, str):
            raise TypeError(f"Address.parse() needs a str, not {type(text).__name__}")
        match = _FAST.fullmatch(text)
        if match is not None and len(text) <= MAX_ADDRESS:
            local, domain = match.groups()
            domain = domain.lower()
            if (
                len(local) <= MAX_LOCAL_PART
                and "xn--" not in domain
                and not domain.rpartition(".")[2].isdigit()
            ):
                return cls._make(local, domain, domain)
        try:
            return cls._make(*_parse(text))
        except _Problem as exc:
            raise InvalidAddress(f"invalid address {_shown(text)}: {exc}", address=text) from None

    @property
    def is_literal(self) -> bool:
        """Whether the domain is an address literal such as ``[192.0.2.1]``."""
        return self.domain[0] == "["

    def smtp_path(self, smtputf8: bool) -> str:
        """The text between ``<`` and ``>`` in ``MAIL FROM`` or ``RCPT TO``.

        Args:
            smtputf8: whether the session uses SMTPUTF8 (RFC 6531). If it does,
                the domain goes out in U-labels; otherwise in A-labels.

        Raises:
            InvalidAddress: when the local part is non-ASCII and ``smtputf8`` is
                false, since such an address cannot be sent without SMTPUTF8.
        """
        if smtputf8:
            return self._text  # the canonical form is exactly this path
        if self.needs_smtputf8:
            raise InvalidAddress(
                f"the address {_shown(str(self))} has a non-ASCII local part and can only "
                "be sent with SMTPUTF8 (RFC 6531)",
                address=str(self),
            )
        if self.ascii_domain == self.domain:
            return self._text
        # The canonical text is the rendered local part, "@", then the U-label domain.
        local = self._text[: len(self._text) - len(self.domain) - 1]
        return f"{local}@{self.ascii_domain}"

    def __str__(self) -> str:
        """The canonical form: ``local@domain``, local part quoted only when needed."""
        return self._text
