"""Hypothesis strategies for property tests of SMTP edge cases.

Every strategy here draws values that mailrelay's own parsers accept (or, for
:func:`invalid_address_texts`, refuse), built to reach the corners where mail
software breaks: quoted and UTF-8 local parts, IDNs and address literals,
lengths at the RFC 5321 §4.5.3.1 limits, null reverse-paths and DSN
parameters, dot lines and bare line ends in message data, multi-line replies
with and without enhanced status codes.

Rules this module keeps:

* Hypothesis is an optional extra (``pip install "mailrelay[testing]"``); importing
  this module without it raises an :class:`ImportError` that says so.
* Valid strategies are valid by construction, not by filtering what a parser
  accepts: the generators follow the grammars themselves (RFC 5321 §4.1.2,
  §4.1.3, RFC 6531 §3.3, IDNA 2008), so a parser that wrongly refuses one of
  their values is caught by a test rather than hidden by the strategy. (The
  one filter on validity is the ``idna`` package's IDNA 2008 check of drawn
  U-labels, an independent implementation.)
* Generated domains are valid everywhere, not just for mailrelay: at least two
  labels, a top-level label of letters, no ``--`` in the third and fourth
  positions of an ASCII label (RFC 5891 §4.2.3.1), U-labels that the ``idna``
  package encodes under IDNA 2008, and no right-to-left scripts (so the
  RFC 5893 Bidi rule never applies).
* Generated text is NFC: a local part is normalized before it is written, so
  what is drawn is what the parser keeps.
* Each reply strategy pairs the wire bytes with the :class:`~mailrelay.reply.Reply`
  they stand for, computed from what was drawn, never by running the parser.
"""

from __future__ import annotations

import datetime as _dt
import functools
import ipaddress
import random
import string
import unicodedata
from collections.abc import Iterable
from email.utils import format_datetime
from typing import Final

import idna

from mailrelay.address import MAX_ADDRESS, MAX_LABEL, MAX_LOCAL_PART, Address
from mailrelay.envelope import Envelope, Notify, Recipient, Ret
from mailrelay.message import Attachment, Message
from mailrelay.protocol.extensions import Extensions
from mailrelay.reply import EnhancedStatus, Reply

try:
    from hypothesis import strategies as st
except ImportError as exc:  # pragma: no cover - the tests simulate this in a subprocess
    raise ImportError(
        "mailrelay.testing.strategies needs Hypothesis, an optional dependency: "
        'pip install "mailrelay[testing]"'
    ) from exc

__all__ = [
    "INVALID_ADDRESS_KINDS",
    "address_texts",
    "addresses",
    "domains",
    "ehlo_replies",
    "envelopes",
    "invalid_address_texts",
    "local_parts",
    "message_bytes",
    "messages",
    "replies",
    "reply_lines",
]

# RFC 1035 §2.3.4 / RFC 5321 §4.1.2: the longest domain name as text (255 octets on
# the wire in DNS form, which is 253 as dotted text).
_MAX_DOMAIN_TEXT: Final = 253

# RFC 5322 §3.2.3 atext, the characters of an RFC 5321 §4.1.2 Atom.
_ATEXT: Final = string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-"
_ATEXT_SET: Final = frozenset(_ATEXT)
# RFC 5321 §4.1.2 qtextSMTP and the quoted-pairSMTP targets: printable ASCII and
# space; mailrelay refuses "<" and ">" even quoted, so they are left out.
_QUOTED_ASCII: Final = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) not in "<>")
_LDH_INNER: Final = string.ascii_letters + string.digits + "-"
_ALNUM: Final = string.ascii_letters + string.digits
_JOINERS: Final = frozenset("\u200c\u200d")

# Letters that IDNA 2008 allows (PVALID), one left-to-right script per entry.
_IDN_SCRIPTS: Final = (
    "àáâãäåæçèéêëìíîïðñòóôõöøùúûüýþÿāăąćčďđēėęěğīįıķļľłńňņōőœŕřśşšţťūůűųźżžß",
    "αβγδεζηθικλμνξοπρστυφχψωάέήίόύώ",
    "абвгдежзийклмнопрстуфхцчшщъыьэюяё",
    "中文网络邮件测试例子域名电子",
    "あいうえおかきくけこさしすせそ",
    "가나다라마바사아자차카타파하",
)

# RFC 6531 §3.3: UTF8-non-ascii in a local part; mailrelay takes the printable
# categories (letters, marks, numbers, punctuation, symbols).
_NON_ASCII_LOCAL: Final = st.characters(min_codepoint=0x80, categories=("L", "M", "N", "P", "S"))

# Reply and header text: printable, no line breaks of any kind.
_NON_ASCII_TEXT: Final = st.characters(min_codepoint=0x80, categories=("L", "M", "N", "P", "S"))


def _octets(text: str) -> int:
    return len(text.encode("utf-8"))


# Strategies are immutable and reusable: the composites below draw from cached ones
# rather than building (and Hypothesis validating) new ones for every draw, which
# would cost more than the drawing itself.
@functools.cache
def _ints(low: int, high: int) -> st.SearchStrategy[int]:
    return st.integers(low, high)


@functools.cache
def _text(
    alphabet: str | st.SearchStrategy[str], min_size: int = 0, max_size: int | None = None
) -> st.SearchStrategy[str]:
    return st.text(alphabet=alphabet, min_size=min_size, max_size=max_size)


_BOOL: Final = st.booleans()


# -- domains ------------------------------------------------------------------


@functools.cache
@st.composite
def _ascii_label(draw: st.DrawFn, min_size: int = 1, max_size: int = MAX_LABEL) -> str:
    """An LDH label (RFC 5321 §4.1.2 sub-domain), mixed case, not an R-LDH label."""
    size = draw(_ints(min_size, max_size))
    first = draw(st.sampled_from(_ALNUM))
    if size == 1:
        return first
    middle = draw(_text(_LDH_INNER, min_size=size - 2, max_size=size - 2))
    label = first + middle + draw(st.sampled_from(_ALNUM))
    if label[2:4] == "--":
        # RFC 5891 §4.2.3.1: "--" in the third and fourth positions marks a
        # reserved label (an A-label is "xn--"); a plain label must not have it.
        label = label[:3] + "x" + label[4:]
    return label


def _a_label(label: str) -> str:
    return label if label.isascii() else idna.encode(label, strict=True).decode("ascii")


def _valid_u_label(label: str) -> bool:
    try:
        return len(idna.encode(label, strict=True)) <= MAX_LABEL
    except (UnicodeError, ValueError):  # idna.IDNAError is a UnicodeError
        return False


@functools.cache
def _script_chars(script: str) -> st.SearchStrategy[list[str]]:
    return st.lists(st.sampled_from(script + string.ascii_lowercase + string.digits), max_size=14)


@functools.cache
@st.composite
def _u_label_text(draw: st.DrawFn) -> str:
    script = draw(st.sampled_from(_IDN_SCRIPTS))
    chars = draw(_script_chars(script))
    # At least one letter of the script, so that the label is an IDN.
    chars.insert(draw(_ints(0, len(chars))), draw(st.sampled_from(script)))
    if len(chars) >= 3 and draw(_BOOL):
        # One hyphen inside the label (never first or last).
        chars.insert(draw(_ints(1, len(chars) - 1)), "-")
    return unicodedata.normalize("NFC", "".join(chars))


@functools.cache
def _u_label() -> st.SearchStrategy[str]:
    """An IDNA 2008 U-label, lowercase and NFC."""
    return _u_label_text().filter(_valid_u_label)


@functools.cache
@st.composite
def _idn_label(draw: st.DrawFn) -> str:
    label = draw(_u_label())
    # Sometimes written as its A-label ("xn--..."): the same domain.
    return _a_label(label) if draw(_ints(0, 3)) == 0 else label


def _domain_octets(labels: list[str]) -> int:
    """The length of a domain in the longest form it may be sent in (U- or A-labels)."""
    text = ".".join(labels)
    return max(_octets(text), len(".".join(_a_label(label) for label in labels)))


@functools.cache
def _domain_labels(idn: bool) -> st.SearchStrategy[list[str]]:
    label = st.one_of(_ascii_label(max_size=20), _idn_label()) if idn else _ascii_label()
    return st.lists(label, min_size=1, max_size=3)


@functools.cache
@st.composite
def _domain_name(draw: st.DrawFn, idn: bool, max_octets: int) -> str:
    if idn and draw(_ints(0, 5)) == 0:
        tld = draw(_u_label())
    else:
        tld = draw(_text(string.ascii_letters, min_size=2, max_size=10))
    labels = [tld]
    if draw(_ints(0, 7)) == 0:
        # Near the length limit: fill with ASCII labels up to a target close to it.
        target = draw(_ints(max(1, max_octets - 8), max_octets))
        while (room := target - _domain_octets(labels) - 1) >= 1:
            labels.insert(0, draw(_ascii_label(min_size=min(room, 40), max_size=min(room, 63))))
    else:
        labels[:0] = draw(_domain_labels(idn))
    # Too long (long labels drawn, or a short max_octets): drop labels from the left.
    while len(labels) > 2 and _domain_octets(labels) > max_octets:
        del labels[0]
    if _domain_octets(labels) > max_octets:
        labels = ["a", "b" * max(1, min(10, max_octets - 2))]
    return ".".join(labels)


def _ipv6_text(address: ipaddress.IPv6Address, form: int) -> str:
    if form == 0:
        return address.compressed
    if form == 1:
        # All eight groups, leading zeros kept, upper-case hex: valid RFC 5321 §4.1.3 too.
        return address.exploded.upper()
    # IPv6v4-full: six hex groups and a dotted IPv4 tail.
    groups = address.exploded.split(":")[:6]
    tail = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return ":".join(group.lstrip("0") or "0" for group in groups) + f":{tail}"


@functools.cache
@st.composite
def _address_literal(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(("ipv4", "ipv6", "mapped")))
    if kind == "ipv4":
        return f"[{draw(st.ip_addresses(v=4))}]"
    if kind == "mapped":
        # RFC 5321 §4.1.3 IPv6v4-comp, the usual spelling of an IPv4-mapped address.
        return f"[IPv6:::ffff:{draw(st.ip_addresses(v=4))}]"
    address = ipaddress.IPv6Address(int(draw(st.ip_addresses(v=6))))
    return f"[IPv6:{_ipv6_text(address, draw(_ints(0, 2)))}]"


@functools.cache
def _domains(idn: bool, literals: bool, max_octets: int) -> st.SearchStrategy[str]:
    names = _domain_name(idn, max_octets)
    return st.one_of(names, _address_literal()) if literals else names


# The longest domain that still makes a valid address with a one-octet local part
# ("x@" + domain, RFC 5321 §4.5.3.1.3: 254 octets).
_MAX_DOMAIN_ALONE: Final = MAX_ADDRESS - 2


def domains(*, idn: bool = True, literals: bool = False) -> st.SearchStrategy[str]:
    """Mail domains as a user would write them after the ``@``.

    Names have two or more labels: LDH labels in mixed case, and with ``idn``
    IDNA 2008 U-labels (Latin, Greek, Cyrillic, CJK, kana, Hangul), some
    written as A-labels (``xn--...``). Some are within 8 octets of 252, the
    longest domain that makes an address (``x@`` and the domain: 254 octets,
    RFC 5321 §4.5.3.1.3). Every one is accepted by
    ``Address.parse(f"x@{domain}")``; with a longer local part the whole may
    pass the 254-octet limit, which :func:`address_texts` keeps.

    Args:
        idn: also draw internationalized names.
        literals: also draw address literals: ``[192.0.2.1]``,
            ``[IPv6:2001:db8::1]`` (compressed, full upper-case, or with a
            dotted IPv4 tail) and ``[IPv6:::ffff:192.0.2.1]``.

    Returns:
        A strategy for domain text.

    """
    return _domains(idn, literals, _MAX_DOMAIN_ALONE)


# -- local parts ----------------------------------------------------------------


def _unicode_ok(char: str) -> bool:
    # RFC 6531 §3.3 UTF8-non-ascii, printable only (what mailrelay admits).
    return unicodedata.category(char)[0] in "LMNPS" or char in _JOINERS


def _is_dot_string(value: str) -> bool:
    """RFC 5321 §4.1.2 Dot-string (RFC 6531 §3.3 with UTF-8): may go unquoted."""
    if not value or value[0] == "." or value[-1] == "." or ".." in value:
        return False
    return all(c == "." or c in _ATEXT_SET or (c > "\x7f" and _unicode_ok(c)) for c in value)


def _quote(value: str, extra: frozenset[int] = frozenset()) -> str:
    """RFC 5321 §4.1.2 Quoted-string: '"' and '\\' escaped, and the ASCII characters at
    the positions in ``extra`` too (a quoted-pair may escape any printable ASCII)."""
    out = ['"']
    for index, char in enumerate(value):
        if char in '"\\' or (index in extra and " " <= char <= "~"):
            out.append("\\")
        out.append(char)
    out.append('"')
    return "".join(out)


_ATEXT_CHAR: Final = st.sampled_from(_ATEXT)
# The characters that make quoting necessary: specials and space.
_SPECIAL_CHAR: Final = st.sampled_from(' "\\(),:;@[].')
_QUOTED_ASCII_CHAR: Final = st.sampled_from(_QUOTED_ASCII)


@functools.cache
@st.composite
def _mixed_text(draw: st.DrawFn, kinds: tuple[st.SearchStrategy[str], ...], max_size: int) -> str:
    """Text whose every character comes from one of ``kinds``, each kind equally likely.

    (Hypothesis's own ``one_of`` weighs its branches by their size, so a few special
    characters next to all of Unicode would hardly ever be drawn.)
    """
    size = draw(_ints(0, max_size))
    last = len(kinds) - 1
    return "".join(draw(kinds[draw(_ints(0, last))]) for _ in range(size))


@functools.cache
@st.composite
def _atom(draw: st.DrawFn, utf8: bool) -> str:
    """An RFC 5321 §4.1.2 Atom: ASCII atext, with ``utf8`` also non-ASCII (RFC 6531 §3.3)."""
    mode = draw(_ints(0, 2)) if utf8 else 0
    if mode == 0:
        return draw(_text(_ATEXT, min_size=1, max_size=12))
    if mode == 1:
        return draw(_text(_NON_ASCII_LOCAL, min_size=1, max_size=8))
    atom = draw(_mixed_text((_ATEXT_CHAR, _NON_ASCII_LOCAL), 11))
    return atom + draw(_ATEXT_CHAR)


@functools.cache
@st.composite
def _local_part(draw: st.DrawFn, utf8: bool, quoted: bool) -> str:
    limit = MAX_LOCAL_PART
    if draw(_ints(0, 7)) == 0:
        # At (or just under) the RFC 5321 §4.5.3.1.1 limit of 64 octets.
        size = draw(_ints(limit - 4, limit))
        return draw(_text(_ATEXT, min_size=size, max_size=size))
    if quoted and draw(_ints(0, 4)) == 0:
        # A value that must be quoted (or that may be: quoting a dot-string is allowed).
        kinds = (_SPECIAL_CHAR, _QUOTED_ASCII_CHAR, _ATEXT_CHAR)
        value = draw(_mixed_text((*kinds, _NON_ASCII_LOCAL) if utf8 else kinds, 24))
    else:
        # Half the UTF-8 local parts are all ASCII all the same.
        atoms = _atom(utf8 and draw(_BOOL))
        value = ".".join(draw(st.lists(atoms, min_size=1, max_size=4)))
    value = unicodedata.normalize("NFC", value)
    dot_string = _is_dot_string(value)
    if dot_string and not (quoted and draw(_ints(0, 5)) == 0):
        text = value
    elif quoted:
        extra = frozenset(draw(st.sets(_ints(0, max(0, len(value) - 1)), max_size=3)))
        text = _quote(value, extra if value else frozenset())
    else:
        # NFC turned a character into one that needs quotes (U+037E is ";"), or the
        # quoted branch was not allowed: fall back to a plain atom.
        text = draw(_text(_ATEXT, min_size=1, max_size=12))
    # Shorten what is too long, keeping it valid.
    while _octets(text) > limit:
        value = unicodedata.normalize("NFC", value[: len(value) - 1])
        if text[0] == '"':
            text = _quote(value)
        else:
            value = value.strip(".").replace("..", ".") or "x"
            text = value
    return text


def local_parts(*, utf8: bool = True, quoted: bool = True) -> st.SearchStrategy[str]:
    """Local parts of envelope addresses, as written before the ``@``.

    Dot-strings of ``atext`` atoms; with ``utf8`` also non-ASCII letters, marks,
    numbers, punctuation and symbols (RFC 6531 §3.3); with ``quoted`` also
    quoted strings with spaces, specials, quoted-pairs (some needless, such as
    ``\\a``), the empty ``""``, and dot-strings quoted although they need not
    be. Some are 60 to 64 octets long (RFC 5321 §4.5.3.1.1). Text
    is NFC.

    Args:
        utf8: also draw non-ASCII local parts (which need SMTPUTF8).
        quoted: also draw quoted local parts.

    Returns:
        A strategy for local-part text (at most 64 octets).
    """
    return _local_part(utf8, quoted)


# -- addresses ------------------------------------------------------------------


@functools.cache
@st.composite
def _address_text(draw: st.DrawFn, utf8: bool, idn: bool, quoted: bool, literals: bool) -> str:
    local = draw(local_parts(utf8=utf8, quoted=quoted))
    # RFC 5321 §4.5.3.1.3: the whole address is at most 254 octets.
    room = min(_MAX_DOMAIN_TEXT, MAX_ADDRESS - 1 - _octets(local))
    return f"{local}@{draw(_domains(idn, literals, room))}"


def address_texts(
    *, utf8: bool = True, idn: bool = True, quoted: bool = True, literals: bool = False
) -> st.SearchStrategy[str]:
    """Valid envelope addresses as text (``local@domain``, without angle brackets).

    Combines :func:`local_parts` and :func:`domains`; the whole text stays within
    RFC 5321 §4.5.3.1.3 (254 octets). Every one is accepted by
    :meth:`Address.parse <mailrelay.address.Address.parse>`.

    Args:
        utf8: also draw non-ASCII local parts.
        idn: also draw internationalized domains.
        quoted: also draw quoted local parts.
        literals: also draw address-literal domains.

    Returns:
        A strategy for address text.
    """
    return _address_text(utf8, idn, quoted, literals)


def addresses(
    *, utf8: bool = True, idn: bool = True, quoted: bool = True, literals: bool = False
) -> st.SearchStrategy[Address]:
    """Valid :class:`~mailrelay.address.Address` values.

    Each is ``Address.parse`` of an :func:`address_texts` value, so it is
    normalized the way parsing normalizes (domain lowercased, A-labels decoded,
    quotes removed from the local part's value).

    Args:
        utf8: also draw non-ASCII local parts (``needs_smtputf8``).
        idn: also draw internationalized domains.
        quoted: also draw quoted local parts.
        literals: also draw address-literal domains.

    Returns:
        A strategy for addresses.
    """
    return _addresses(utf8, idn, quoted, literals)


@functools.cache
def _addresses(utf8: bool, idn: bool, quoted: bool, literals: bool) -> st.SearchStrategy[Address]:
    return _address_text(utf8, idn, quoted, literals).map(Address.parse)


# -- invalid addresses -------------------------------------------------------------


def _insert(text: str, index: int, piece: str) -> str:
    return text[:index] + piece + text[index:]


@st.composite
def _injected(draw: st.DrawFn) -> str:
    # Never accepted anywhere (RFC 5321 §4.1.2 has no controls in any rule; a CR or
    # LF would end the command line early: command injection).
    text = draw(address_texts(literals=True))
    piece = draw(st.sampled_from(("\r", "\n", "\r\n", "\x00", "\r\nRCPT TO:<x@example.org>")))
    return _insert(text, draw(_ints(0, len(text))), piece)


@st.composite
def _missing_at(draw: st.DrawFn) -> str:
    local = draw(local_parts(utf8=True, quoted=False))
    choice = draw(_ints(0, 2))
    if choice == 0:
        return local
    if choice == 1:
        return local + draw(domains())
    # A quoted local part that holds the "@": nothing follows the closing quote.
    return _quote(f"{local}@{draw(domains())}")


@st.composite
def _bad_dots(draw: st.DrawFn) -> str:
    atoms = draw(st.lists(_text(_ATEXT, min_size=1, max_size=8), min_size=2, max_size=3))
    labels = draw(st.lists(_ascii_label(max_size=10), min_size=2, max_size=3))
    local, domain = ".".join(atoms), ".".join(labels)
    where = draw(_ints(0, 5))
    # RFC 5321 §4.1.2: Dot-string = Atom *("." Atom); Domain = sub-domain *("." sub-domain).
    if where == 0:
        local = "." + local
    elif where == 1:
        local += "."
    elif where == 2:
        local = local.replace(".", "..", 1)
    elif where == 3:
        domain = "." + domain
    elif where == 4:
        domain += "."
    else:
        domain = domain.replace(".", "..", 1)
    return f"{local}@{domain}"


@st.composite
def _long_local(draw: st.DrawFn) -> str:
    # RFC 5321 §4.5.3.1.1: at most 64 octets; counted in octets, so 33 two-octet
    # letters (33 characters) are too many as well.
    if draw(_BOOL):
        local = draw(_text(_ATEXT, min_size=MAX_LOCAL_PART + 1, max_size=90))
    else:
        size = draw(_ints(MAX_LOCAL_PART // 2 + 1, 45))
        local = draw(_text("éüßδж", min_size=size, max_size=size))
    return f"{local}@{draw(domains(idn=False))}"


@st.composite
def _long_domain(draw: st.DrawFn) -> str:
    if draw(_BOOL):
        # RFC 1035 §2.3.4: a label is at most 63 octets.
        label = draw(_ascii_label(min_size=MAX_LABEL + 1, max_size=80))
        return f"user@{label}.example"
    # RFC 5321 §4.5.3.1.2: a domain is at most 255 octets (and the address 254).
    count = draw(_ints(5, 6))
    labels = [draw(_ascii_label(min_size=60, max_size=63)) for _ in range(count)]
    return "user@" + ".".join(labels) + ".com"


@st.composite
def _unbalanced_quotes(draw: st.DrawFn) -> str:
    word = draw(_text(string.ascii_letters, min_size=1, max_size=8))
    domain = draw(domains(idn=False))
    # RFC 5321 §4.1.2: a Quoted-string is DQUOTE *QcontentSMTP DQUOTE, and is the
    # whole local part; a quote inside a Dot-string is not atext.
    return draw(
        st.sampled_from(
            (
                f'"{word}@{domain}',  # no closing quote
                f'{word}"@{domain}',  # a closing quote with no opening one
                f'"{word}\\"@{domain}',  # the closing quote escaped
                f'"{word}"{word}"@{domain}',  # a third quote
                f'{word}"{word}@{domain}',  # a lone quote inside
                f'"{word}".{word}@{domain}',  # quoted and unquoted parts mixed
            )
        )
    )


@st.composite
def _spaces(draw: st.DrawFn) -> str:
    local = draw(_text(string.ascii_letters, min_size=2, max_size=8))
    domain = draw(domains(idn=False))
    space = draw(st.sampled_from((" ", "  ", "\u00a0", "\u3000")))
    # RFC 5321 §4.1.2 has no white space outside a Quoted-string (no CFWS, unlike RFC 5322).
    shapes = (
        f"{local[:1]}{space}{local[1:]}@{domain}",
        f"{local}{space}@{domain}",
        f"{local}@{space}{domain}",
        f"{local}@{domain[:1]}{space}{domain[1:]}",
        f"{space}{local}@{domain}",
        f"{local}@{domain}{space}",
    )
    # Unicode spaces are refused in the local part; in the domain only ASCII is tested
    # (a non-ASCII space there is simply not a valid IDNA character).
    chosen: str = draw(st.sampled_from(shapes if space.isascii() else shapes[:2]))
    return chosen


@st.composite
def _angle_brackets(draw: st.DrawFn) -> str:
    text = draw(address_texts(utf8=False, quoted=False))
    local, _, domain = text.rpartition("@")
    return draw(
        st.sampled_from(
            (
                f"<{text}>",
                f"<{text}",
                f"{text}>",
                f"{local[:1]}<{local[1:]}@{domain}",
                f'"{local}<x>"@{domain}',  # refused even quoted (a naive path parser breaks)
                f"{local}@{domain}>",
            )
        )
    )


@st.composite
def _bad_domain(draw: st.DrawFn) -> str:
    label = draw(_ascii_label(max_size=10))
    return "user@" + draw(
        st.sampled_from(
            (
                f"-{label}.com",  # RFC 5321 §4.1.2: a sub-domain starts with a Let-dig
                f"{label}-.com",  # and ends with one
                f"{label}_x.com",  # LDH only
                f"{label}.123",  # RFC 3696 §2: no all-numeric top-level label
                "",  # no domain at all
                f"{label}@{label}.com",  # a second "@" (unquoted)
                "[300.1.2.3]",  # RFC 5321 §4.1.3: IPv4 octets are at most 255
                "[192.0.2.01]",  # no leading zeros
                "[IPv6:1::2::3]",  # "::" only once
                "[IPv6:1:2:3:4:5:6:7::8]",  # "::" stands for at least two groups
                "[tag:content]",  # general literals are not taken
                "[192.0.2.1",  # unclosed literal
                "xn--a.com",  # not a valid A-label
            )
        )
    )


#: The kinds of invalid address :func:`invalid_address_texts` draws, by name.
INVALID_ADDRESS_KINDS: Final = (
    "injection",
    "missing_at",
    "bad_dots",
    "long_local_part",
    "long_domain",
    "unbalanced_quotes",
    "spaces",
    "angle_brackets",
    "bad_domain",
    "empty_local_part",
)

_INVALID: Final[dict[str, st.SearchStrategy[str]]] = {
    "injection": _injected(),
    "missing_at": _missing_at(),
    "bad_dots": _bad_dots(),
    "long_local_part": _long_local(),
    "long_domain": _long_domain(),
    "unbalanced_quotes": _unbalanced_quotes(),
    "spaces": _spaces(),
    "angle_brackets": _angle_brackets(),
    "bad_domain": _bad_domain(),
    # RFC 5321 §4.1.2: an Atom is 1*atext; an empty local part must be written "".
    "empty_local_part": domains().map(lambda domain: f"@{domain}"),
}


def invalid_address_texts(*, kinds: Iterable[str] | None = None) -> st.SearchStrategy[str]:
    """Texts that :meth:`Address.parse <mailrelay.address.Address.parse>` must refuse.

    Each kind breaks one rule of RFC 5321 §4.1.2, §4.1.3 or §4.5.3.1 (as
    ``mailrelay.address`` states them), starting from an otherwise valid address:

    * ``injection``: CR, LF, CRLF, NUL or a whole smuggled command anywhere,
      even inside quotes or a literal;
    * ``missing_at``: no ``@`` (also a quoted local part holding the only ``@``);
    * ``bad_dots``: a leading, trailing or doubled dot in the local part or domain;
    * ``long_local_part``: over 64 octets (also 33+ two-octet letters);
    * ``long_domain``: a label over 63 octets, or a domain over 255;
    * ``unbalanced_quotes``: unclosed, escaped-closed, stray or mixed quotes;
    * ``spaces``: white space outside quotes (ASCII, NBSP, ideographic space);
    * ``angle_brackets``: ``<`` or ``>`` anywhere, even quoted;
    * ``bad_domain``: hyphen at a label's end, ``_``, numeric TLD, empty domain,
      second ``@``, bad IPv4/IPv6/general literals, a broken A-label;
    * ``empty_local_part``: nothing before the ``@``.

    Args:
        kinds: draw only these kinds (names from :data:`INVALID_ADDRESS_KINDS`);
            all of them when ``None``.

    Returns:
        A strategy for invalid address text.

    Raises:
        ValueError: an unknown kind, or an empty selection.
    """
    chosen = INVALID_ADDRESS_KINDS if kinds is None else tuple(kinds)
    unknown = sorted(set(chosen) - set(INVALID_ADDRESS_KINDS))
    if unknown or not chosen:
        raise ValueError(
            f"unknown or no invalid address kinds {unknown}; choose from {INVALID_ADDRESS_KINDS}"
        )
    return st.one_of([_INVALID[kind] for kind in chosen])


# -- envelopes ------------------------------------------------------------------

_NOTIFY: Final = st.one_of(
    st.none(),
    st.just(frozenset({Notify.NEVER})),
    st.frozensets(st.sampled_from((Notify.SUCCESS, Notify.FAILURE, Notify.DELAY)), min_size=1),
)
# RFC 3461 §4.4: printable ASCII, at most 100 characters once xtext-encoded (each
# character is at most 3 then).
_ENVID: Final = _text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=33
)


@functools.cache
@st.composite
def _envelope(
    draw: st.DrawFn, *, utf8: bool, idn: bool, quoted: bool, dsn: bool, max_recipients: int
) -> Envelope:
    address = _addresses(utf8, idn, quoted, False)
    # RFC 5321 §4.5.5: the null reverse-path <> (bounces and other automatic mail).
    sender = draw(st.one_of(st.none(), address))
    targets = draw(st.lists(address, min_size=1, max_size=max_recipients, unique=True))
    if not dsn:
        return Envelope(sender, targets)
    recipients = [
        Recipient(target, notify=draw(_NOTIFY), orcpt=draw(st.one_of(st.none(), address)))
        for target in targets
    ]
    return Envelope(
        sender,
        recipients,
        ret=draw(st.sampled_from((None, Ret.FULL, Ret.HDRS))),
        envid=draw(st.one_of(st.none(), _ENVID)),
        notify=draw(_NOTIFY),
    )


def envelopes(
    *,
    utf8: bool = True,
    idn: bool = True,
    quoted: bool = True,
    dsn: bool = True,
    max_recipients: int = 5,
) -> st.SearchStrategy[Envelope]:
    """Valid :class:`~mailrelay.envelope.Envelope` values.

    The sender is sometimes the null reverse-path (``None``); recipients are
    1 to ``max_recipients`` distinct :func:`addresses` (no literals). With
    ``dsn``, RET, ENVID (printable ASCII, including spaces and ``+``/``=``,
    which xtext must encode) and a NOTIFY default are drawn, and each
    recipient may have its own NOTIFY (``NEVER`` alone, or a set of
    ``SUCCESS``/``FAILURE``/``DELAY``) and ORCPT.

    Args:
        utf8: also draw non-ASCII local parts (the envelope then needs SMTPUTF8).
        idn: also draw internationalized domains.
        quoted: also draw quoted local parts.
        dsn: also draw RFC 3461 DSN parameters.
        max_recipients: the most recipients in one envelope (at least 1).

    Returns:
        A strategy for envelopes.

    Raises:
        ValueError: ``max_recipients`` below 1.
    """
    if max_recipients < 1:
        raise ValueError("max_recipients must be at least 1")
    return _envelope(utf8=utf8, idn=idn, quoted=quoted, dsn=dsn, max_recipients=max_recipients)


# -- messages -------------------------------------------------------------------

# The smallest max_size the message strategies accept: room for the header block.
_MIN_MESSAGE_SIZE: Final = 4096
# RFC 5322 §2.1.1 / RFC 5321 §4.5.3.1.6: a line is at most 998 octets before its CRLF.
_MAX_LINE: Final = 998
_LINE_ENDS: Final = (b"\r\n", b"\n", b"\r")
_PRINTABLE: Final = "".join(chr(c) for c in range(0x20, 0x7F)) + "\t"
_WORD: Final = _text(string.ascii_letters + string.digits, min_size=1, max_size=10)
_DATES: Final = st.datetimes(
    min_value=_dt.datetime(1990, 1, 1),
    max_value=_dt.datetime(2099, 12, 31),
    timezones=st.sampled_from(
        (
            _dt.UTC,
            _dt.timezone(_dt.timedelta(hours=5, minutes=30)),
            _dt.timezone(-_dt.timedelta(hours=8)),
        )
    ),
)


@functools.cache
def _header_text(utf8: bool, max_size: int) -> st.SearchStrategy[str]:
    alphabet = (
        st.one_of(st.sampled_from(_PRINTABLE), _NON_ASCII_TEXT)
        if utf8
        else st.sampled_from(_PRINTABLE)
    )
    return _text(alphabet, max_size=max_size).map(lambda text: text.strip())


@functools.cache
@st.composite
def _mailbox(draw: st.DrawFn, utf8: bool) -> str:
    """An RFC 5322 mailbox whose address is a valid envelope address."""
    address = draw(_addresses(utf8, True, False, False))
    spec = address.smtp_path(smtputf8=utf8)
    shape = draw(_ints(0, 3))
    if shape == 0:
        return spec
    if shape == 1:
        return f"{' '.join(draw(st.lists(_WORD, min_size=1, max_size=3)))} <{spec}>"
    if shape == 2:
        return f'"{draw(_WORD)}, {draw(_WORD)}" <{spec}>'
    if utf8:
        # RFC 6532 §3.2: raw UTF-8 in a display name.
        return f"{draw(_text(_IDN_SCRIPTS[1], min_size=1, max_size=8))} <{spec}>"
    return f"=?utf-8?b?w6lsw6ht?= <{spec}>"


@functools.cache
@st.composite
def _header_lines(
    draw: st.DrawFn, utf8: bool, eight_bit_body: bool
) -> tuple[list[bytes], list[bytes]]:
    """The header block's lines (managed fields, extra fields), without line ends."""

    def line(text: str) -> bytes:
        return text.encode("utf-8")

    fields = [line(f"From: {draw(_mailbox(utf8))}")]
    fields.append(line("To: " + ", ".join(draw(st.lists(_mailbox(utf8), min_size=1, max_size=3)))))
    subject = draw(_header_text(utf8, 60))
    words = subject.split(" ")
    if len(words) > 2 and draw(_BOOL):
        # RFC 5322 §2.2.3: a folded field; the continuation starts with white space.
        cut = draw(_ints(1, len(words) - 1))
        fields.append(line("Subject: " + " ".join(words[:cut])))
        fields.append(line((" " if draw(_BOOL) else "\t") + " ".join(words[cut:])))
    else:
        fields.append(line(f"Subject: {subject}"))
    fields.append(line(f"Date: {format_datetime(draw(_DATES))}"))
    domain = draw(_domain_name(idn=False, max_octets=60))
    fields.append(line(f"Message-ID: <{draw(_WORD)}.{draw(_WORD)}@{domain}>"))
    if eight_bit_body:
        fields += [
            b"MIME-Version: 1.0",
            b"Content-Type: text/plain; charset=utf-8",
            b"Content-Transfer-Encoding: 8bit",
        ]
    extra: list[bytes] = []
    for _ in range(draw(_ints(0, 3))):
        name = "X-" + draw(_text(_LDH_INNER, min_size=1, max_size=12))
        kind = draw(_ints(0, 3))
        if kind == 0:
            extra.append(line(f"{name}:"))  # an empty value
        elif kind == 1:
            # The longest line RFC 5322 §2.1.1 allows: 998 octets.
            extra.append(line(f"{name}: ".ljust(_MAX_LINE, "v")))
        elif kind == 2:
            blind = draw(_addresses(False, False, False, False))
            extra.append(line(f"Bcc: {blind}"))  # RFC 5322 §3.6.3: never on the wire
        else:
            extra.append(line(f"{name}: {draw(_header_text(utf8, 40))}"))
    return fields, extra


@functools.cache
def _body_line(eight_bit: bool) -> st.SearchStrategy[bytes]:
    plain = _text(_PRINTABLE, max_size=78).map(lambda text: text.encode("ascii"))
    # RFC 5321 §4.5.2: lines the client must dot-stuff, and the would-be terminator.
    dots = st.one_of(
        st.sampled_from((b".", b"..", b"...", b". ", b".\t")),
        plain.map(lambda line: b"." + line),
        plain.map(lambda line: b".." + line),
    )
    long_size = st.one_of(st.just(_MAX_LINE), _ints(79, _MAX_LINE))
    long = st.builds(
        lambda size, char, dot: (b"." if dot else b"") + char * (size - dot),
        long_size,
        st.sampled_from((b"x", b" ", b"=")),
        _BOOL,
    )
    kinds = [plain, dots, long, st.sampled_from((b"", b" ", b"\t", b"From here", b"-- "))]
    if eight_bit:
        # RFC 6152: any octet but NUL, CR and LF; valid UTF-8 or not.
        utf8_text = _text(_NON_ASCII_TEXT, min_size=1, max_size=30).map(
            lambda text: text.encode("utf-8")
        )
        raw = st.binary(min_size=1, max_size=30).map(lambda data: bytes(b | 0x80 for b in data))
        kinds += [utf8_text, raw]
    return st.one_of(kinds)


@functools.cache
@st.composite
def _message_bytes(draw: st.DrawFn, eight_bit: bool, utf8_headers: bool, max_size: int) -> bytes:
    body = draw(st.lists(_body_line(eight_bit), max_size=20))
    eight_bit_body = any(not line.isascii() for line in body)
    fields, extra = draw(_header_lines(utf8_headers, eight_bit_body))

    def wire_size() -> int:
        # CRLF-normalized, every line ended: what Message.size will say at most.
        return sum(len(line) + 2 for line in (*fields, *extra, b"", *body))

    while wire_size() > max_size and body:
        body.pop()
    while wire_size() > max_size and extra:
        extra.pop()
    head = fields + extra
    separator = bool(body) or draw(_BOOL)  # an empty body may lack the blank line
    lines = head + ([b""] if separator else []) + body
    ends = draw(st.lists(st.sampled_from(_LINE_ENDS), min_size=len(lines), max_size=len(lines)))
    for index in range(1, len(lines)):
        if ends[index - 1] == b"\r" and not lines[index] and ends[index][:1] == b"\n":
            # A bare CR then an empty line ended by LF would read as one CRLF: the
            # empty line (maybe the header/body separator) would vanish.
            ends[index] = b"\r\n"
    if draw(_BOOL):
        ends[-1] = b""  # no line end after the last line
    return b"".join(line + end for line, end in zip(lines, ends, strict=True))


def _check_max_size(max_size: int) -> None:
    if max_size < _MIN_MESSAGE_SIZE:
        raise ValueError(f"max_size must be at least {_MIN_MESSAGE_SIZE}")


def message_bytes(
    *, eight_bit: bool = True, utf8_headers: bool = False, max_size: int = 65536
) -> st.SearchStrategy[bytes]:
    """Raw RFC 5322 messages whose bytes stress the SMTP data phase.

    The header block has From, To, Subject (sometimes folded), Date and
    Message-ID, and sometimes an empty field, a field line of exactly 998
    octets, or a ``Bcc`` field (which never reaches the wire). The body mixes
    lines starting with ``.`` or ``..``, lines that are exactly ``.``, lines of
    up to 998 octets, empty and white-space lines; and with ``eight_bit``, UTF-8
    text and raw 8-bit octets. Every line ends in CRLF, a bare LF or a bare CR,
    drawn line by line, and the last line may have no line end; the body may be
    empty. Every one is accepted by :meth:`Message.from_bytes
    <mailrelay.message.Message.from_bytes>`.

    Args:
        eight_bit: also draw bodies with octets above 127 (``needs_8bitmime``).
        utf8_headers: also draw raw UTF-8 in header fields, addresses included
            (RFC 6532; ``needs_smtputf8``).
        max_size: the largest wire size (CRLF-normalized), at least 4096.

    Returns:
        A strategy for message bytes.

    Raises:
        ValueError: ``max_size`` below 4096.
    """
    _check_max_size(max_size)
    return _message_bytes(eight_bit, utf8_headers, max_size)


@functools.cache
def _body_text(ascii_only: bool) -> st.SearchStrategy[str]:
    printable = st.sampled_from(_PRINTABLE)
    char = printable if ascii_only else st.one_of(printable, _NON_ASCII_TEXT)
    line = st.one_of(_text(char, max_size=80), st.sampled_from((".", "..", ".x", "")))
    return st.lists(line, max_size=12).map("\n".join)


_SUBJECT_CHAR: Final = st.one_of(st.sampled_from(_PRINTABLE[:-1]), _NON_ASCII_TEXT)


@functools.cache
def _attachments(max_data: int) -> st.SearchStrategy[list[Attachment]]:
    attachment = st.builds(
        Attachment,
        filename=_text(string.ascii_letters + string.digits + "._- é", min_size=1, max_size=20)
        .map(str.strip)
        .filter(bool),
        data=st.binary(max_size=max_data),
        content_type=st.sampled_from((None, "application/octet-stream", "text/plain", "image/png")),
    )
    return st.lists(attachment, max_size=2)


_INLINE_FILES: Final = (
    ("logo.png", "image/png"),
    ("chart.gif", None),  # guessed from the name
    ("photo.jpg", "image/jpeg"),
    ("bild-\u00e9.png", "image/png"),  # RFC 2231 file name
)


@functools.cache
@st.composite
def _inline_parts(draw: st.DrawFn, max_data: int) -> list[Attachment]:
    """Inline parts for an HTML body (RFC 2387), each with a content id unique in the
    message: an RFC 5322 msg-id or a lone dot-atom, drawn from atext so that the
    characters :attr:`~mailrelay.message.Attachment.cid_url` must percent-encode
    (``%``, ``?``, ``#``, ``&``: RFC 2392 §2) turn up."""
    parts = []
    for index in range(draw(_ints(0, 2))):
        # The index keeps the ids unique; a dot-atom, as id-left and a lone id must be.
        left = f"{draw(_text(_ATEXT, min_size=1, max_size=12))}.{index}"
        right = draw(st.one_of(st.none(), _domain_name(idn=False, max_octets=40)))
        filename, content_type = draw(st.sampled_from(_INLINE_FILES))
        parts.append(
            Attachment(
                filename=filename,
                data=draw(st.binary(max_size=max_data)),
                content_type=content_type,
                content_id=left if right is None else f"{left}@{right}",
            )
        )
    return parts


@functools.cache
def _attached_messages(eight_bit: bool, max_size: int) -> st.SearchStrategy[list[Attachment]]:
    """At most one whole message attached as ``message/rfc822`` (a forwarded message),
    drawn by :func:`message_bytes` (bare line ends, dot lines, 998-octet lines; 8-bit
    bodies with ``eight_bit``), its type given or guessed from ``.eml``."""
    attached = st.builds(
        lambda data, given: Attachment(
            filename="forwarded.eml",
            data=data,
            content_type="message/rfc822" if given else None,
        ),
        _message_bytes(eight_bit, False, max_size),
        _BOOL,
    )
    return st.lists(attached, max_size=1)


@functools.cache
@st.composite
def _built_message(draw: st.DrawFn, eight_bit: bool, utf8_headers: bool, max_size: int) -> Message:
    address = _addresses(utf8_headers, True, True, False)
    recipients = st.lists(address, max_size=2)
    # In the RFC 6532 form (a non-ASCII local part anywhere) bodies go out 8-bit:
    # keep them ASCII when 8-bit bodies are not wanted.
    text = _body_text(ascii_only=utf8_headers and not eight_bit)
    sender = draw(address)
    to = draw(st.lists(address, min_size=1, max_size=3))
    cc = draw(recipients)
    bcc = draw(recipients)
    subject = draw(st.one_of(st.none(), _text(_SUBJECT_CHAR, max_size=60)))
    body = draw(st.one_of(st.none(), text))
    html = draw(st.one_of(st.none(), text.map(lambda body: f"<p>{body}</p>")))
    # Base64 makes 4 octets of 3: two attachments of max_size / 8 leave room for the rest.
    files = draw(_attachments(min(2048, max_size // 8)))
    if html is not None:
        # RFC 2392: the HTML refers to each inline part by its cid: URL.
        inline = draw(_inline_parts(min(256, max_size // 64)))
        html += "".join(f'<img src="{part.cid_url}" alt="">' for part in inline)
        files += inline
    # An attached message goes unencoded (RFC 2046 §5.2.1): 8-bit only when allowed.
    files += draw(_attached_messages(eight_bit, min(2048, max_size // 8)))
    files = list(draw(st.permutations(files)))
    message_id = f"{draw(_WORD)}@{draw(_domain_name(idn=False, max_octets=60))}"
    date = draw(_DATES)
    # Message.build draws MIME boundaries from the global random module; Hypothesis
    # asks strategies to leave that state as they found it (and then the boundaries
    # follow the seed Hypothesis gives each example).
    state = random.getstate()
    try:
        return Message.build(
            sender=sender,
            to=to,
            cc=cc,
            bcc=bcc,
            subject=subject,
            text=body,
            html=html,
            attachments=files,
            message_id=message_id,
            date=date,
        )
    finally:
        random.setstate(state)


def messages(
    *,
    eight_bit: bool = True,
    utf8_headers: bool = False,
    max_size: int = 65536,
    built: bool = True,
) -> st.SearchStrategy[Message]:
    """:class:`~mailrelay.message.Message` values: parsed and built.

    Half come from :meth:`Message.from_bytes` of :func:`message_bytes` (the wire
    edge cases), and with ``built`` half from :meth:`Message.build` with drawn
    addresses (IDN, quoted, literal-free), subjects in any script, text and HTML
    bodies with dot lines, and attachments (so both of its writers are used). A
    built HTML body may have up to two inline parts (``Attachment.content_id``, in
    a ``multipart/related``, RFC 2387), which it names by their ``cid:`` URLs
    (RFC 2392; some need percent-encoding); a built message may carry one attached
    message (``message/rfc822``, unencoded as RFC 2046 §5.2.1 requires: a
    :func:`message_bytes` value, 8-bit only with ``eight_bit``).

    Args:
        eight_bit: allow messages that need 8BITMIME.
        utf8_headers: allow messages that need SMTPUTF8 (raw UTF-8 headers, or
            built with non-ASCII local parts).
        max_size: the largest :attr:`~mailrelay.message.Message.size`, at least 4096.
        built: also draw messages made by :meth:`Message.build`.

    Returns:
        A strategy for messages.

    Raises:
        ValueError: ``max_size`` below 4096.
    """
    _check_max_size(max_size)
    parsed = message_bytes(eight_bit=eight_bit, utf8_headers=utf8_headers, max_size=max_size).map(
        Message.from_bytes
    )
    if not built:
        return parsed
    made = _built_message(eight_bit, utf8_headers, max_size).filter(
        lambda message: message.size <= max_size
    )
    return st.one_of(parsed, made)


# -- replies --------------------------------------------------------------------

_COMMON_CODES: Final = {
    2: (211, 214, 220, 221, 235, 250, 251, 252),
    3: (334, 354),
    4: (421, 432, 450, 451, 452, 454, 455),
    5: (500, 501, 502, 503, 504, 521, 530, 534, 535, 538, 550, 551, 552, 553, 554, 555, 556),
}


@functools.cache
def _reply_text(utf8: bool) -> st.SearchStrategy[str]:
    # RFC 5321 §4.2 textstring: HT, SP and printable ASCII; RFC 6531 §3.7.3 adds UTF-8.
    ascii_char = st.sampled_from(_PRINTABLE)
    char = st.one_of(ascii_char, _NON_ASCII_TEXT) if utf8 else ascii_char
    return _text(char, max_size=60)


def _code_strategy(codes: Iterable[int] | None, klass: int | None) -> st.SearchStrategy[int]:
    if codes is not None:
        chosen = tuple(codes)
        if not chosen or any(not 200 <= code <= 599 for code in chosen):
            raise ValueError("codes must be reply codes from 200 to 599 (RFC 5321 §4.2)")
        return st.sampled_from(chosen)
    if klass is not None:
        if klass not in (2, 3, 4, 5):
            raise ValueError("klass must be 2, 3, 4 or 5")
        classes: tuple[int, ...] = (klass,)
    else:
        classes = (2, 3, 4, 5)
    common = st.sampled_from([code for digit in classes for code in _COMMON_CODES[digit]])
    anything = st.sampled_from(classes).flatmap(lambda digit: _ints(digit * 100, digit * 100 + 99))
    return st.one_of(common, anything)


@functools.cache
@st.composite
def _status(draw: st.DrawFn, digit: int) -> EnhancedStatus:
    part = st.one_of(_ints(0, 7), _ints(0, 999))
    return EnhancedStatus(klass=digit, subject=draw(part), detail=draw(part))


@st.composite
def _reply_lines(
    draw: st.DrawFn,
    *,
    codes: st.SearchStrategy[int],
    max_lines: int,
    enhanced: bool | None,
    utf8: bool,
    bare_lf: bool,
) -> tuple[tuple[bytes, ...], Reply]:
    code = draw(codes)
    digit = code // 100
    count = draw(_ints(1, max_lines))
    texts = draw(st.lists(_reply_text(utf8), min_size=count, max_size=count))
    status: EnhancedStatus | None = None
    # RFC 3463 has no class 3: a 3xx reply never carries an enhanced status code.
    if digit != 3 and (enhanced or (enhanced is None and draw(_BOOL))):
        status = draw(_status(digit))
        prefix = str(status)
        # RFC 2034 §3: the code starts every line; some servers put it on the first only.
        prefixed = len(texts) if draw(_BOOL) else 1
        texts = [
            (f"{prefix} {text}" if text else prefix) if index < prefixed else text
            for index, text in enumerate(texts)
        ]
    else:
        decoy = draw(_ints(0, 4))
        other = draw(st.sampled_from([d for d in (2, 4, 5) if d != digit]))
        if decoy == 1:
            texts[0] = f"{other}.1.1 {texts[0]}"  # another class: not this reply's code
        elif decoy == 2:
            texts[0] = f"{digit}.01.1 {texts[0]}"  # a leading zero: not RFC 3463
        elif decoy == 3:
            texts[0] = f"{digit}.1.1x {texts[0]}"  # glued to the text
        elif decoy == 4:
            texts[0] = f"{digit}.1.1000 {texts[0]}"  # a four-digit detail
        elif texts[0][1:2] == "." and texts[0][:1] == str(digit):
            texts[0] = "x" + texts[0]  # a drawn text that would read as a code
    end_strategy = st.sampled_from((b"\r\n", b"\n")) if bare_lf else st.just(b"\r\n")
    wire: list[bytes] = []
    for index, text in enumerate(texts):
        last = index == len(texts) - 1
        if last and not text and draw(_BOOL):
            line = str(code)  # RFC 5321 §4.2: a bare code is a whole last line
        else:
            line = f"{code}{' ' if last else '-'}{text}"
        wire.append(line.encode("utf-8") + draw(end_strategy))
    return tuple(wire), Reply(code=code, lines=tuple(texts), enhanced=status)


def reply_lines(
    *,
    codes: Iterable[int] | None = None,
    klass: int | None = None,
    max_lines: int = 4,
    enhanced: bool | None = None,
    utf8: bool = False,
    bare_lf: bool = False,
) -> st.SearchStrategy[tuple[tuple[bytes, ...], Reply]]:
    """Server replies as separate wire lines, paired with the reply they make.

    Like :func:`replies`, but the bytes come one line at a time (each with its
    line end), for tests that feed a parser line by line.

    Args:
        codes: draw the code from these; overrides ``klass``.
        klass: draw codes of this class only (2, 3, 4 or 5): common ones such as
            250 or 550, and any of ``klass*100`` to ``klass*100+99``.
        max_lines: the most lines in one reply (at least 1).
        enhanced: ``True`` always puts an RFC 3463 enhanced status code of the
            reply's class first (never for 3xx, which has none), ``False``
            never, ``None`` sometimes. Without one, the first line sometimes
            starts with a decoy that must not be read as one (another class,
            a leading zero, ``5.1.1x``, a four-digit part).
        utf8: also draw non-ASCII text (RFC 6531 §3.7.3).
        bare_lf: also end lines with a bare LF (which mailrelay's reader
            tolerates) instead of CRLF.

    Returns:
        A strategy for ``(lines, reply)`` pairs.

    Raises:
        ValueError: bad ``codes``, ``klass`` or ``max_lines``.
    """
    if max_lines < 1:
        raise ValueError("max_lines must be at least 1")
    return _reply_lines(
        codes=_code_strategy(codes, klass),
        max_lines=max_lines,
        enhanced=enhanced,
        utf8=utf8,
        bare_lf=bare_lf,
    )


def _joined(pair: tuple[tuple[bytes, ...], Reply]) -> tuple[bytes, Reply]:
    return b"".join(pair[0]), pair[1]


def replies(
    *,
    codes: Iterable[int] | None = None,
    klass: int | None = None,
    max_lines: int = 4,
    enhanced: bool | None = None,
    utf8: bool = False,
    bare_lf: bool = False,
) -> st.SearchStrategy[tuple[bytes, Reply]]:
    """Server replies as wire bytes, paired with the :class:`~mailrelay.reply.Reply`
    mailrelay's reader must make of them.

    Single- and multi-line (``250-...`` then ``250 ...``), with empty texts
    (``250-``, ``250 `` and a bare ``250``), text with tabs and trailing spaces,
    and enhanced status codes per ``enhanced``. The paired reply follows
    ``mailrelay.protocol.reader``: ``lines`` holds each line's text after the
    code and separator (the enhanced code stays in it), and ``enhanced`` is
    the code at the start of the first line when its class is the reply's.

    Args:
        codes: draw the code from these; overrides ``klass``.
        klass: draw codes of this class only (2, 3, 4 or 5).
        max_lines: the most lines in one reply (at least 1).
        enhanced: ``True`` always, ``False`` never, ``None`` sometimes an
            enhanced status code (never for 3xx).
        utf8: also draw non-ASCII text.
        bare_lf: also end lines with a bare LF.

    Returns:
        A strategy for ``(bytes, reply)`` pairs.

    Raises:
        ValueError: bad ``codes``, ``klass`` or ``max_lines``.
    """
    return reply_lines(
        codes=codes, klass=klass, max_lines=max_lines, enhanced=enhanced, utf8=utf8, bare_lf=bare_lf
    ).map(_joined)


# -- EHLO replies -----------------------------------------------------------------

_FLAG_KEYWORDS: Final = (
    "PIPELINING",
    "8BITMIME",
    "SMTPUTF8",
    "CHUNKING",
    "DSN",
    "ENHANCEDSTATUSCODES",
    "STARTTLS",
    "BINARYMIME",
    "REQUIRETLS",
    "ETRN",
    "VRFY",
    "HELP",
)
# RFC 1870 §4: no value, 0 (no fixed maximum), any size, and the sizes servers announce.
_SIZE_VALUES: Final = st.one_of(
    st.sampled_from(("", "0", "10240000", "35882577", "52428800", "157286400", "1000000000000")),
    _ints(1, 10**12).map(str),
)
_MECHANISMS: Final = ("PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2", "SCRAM-SHA-256", "GSSAPI")


@st.composite
def _ehlo_reply(draw: st.DrawFn) -> tuple[bytes, Extensions]:
    keywords: dict[str, str] = {}
    auth: set[str] = set()
    size: int | None = None
    lines: list[str] = []
    chosen = draw(st.lists(st.sampled_from((*_FLAG_KEYWORDS, "SIZE", "AUTH")), unique=True))
    for keyword in chosen:
        # RFC 5321 §4.1.1.1: keywords are case-insensitive.
        written = draw(st.sampled_from((keyword, keyword.lower(), keyword.title())))
        if keyword == "SIZE":
            # RFC 1870 §4: "SIZE" alone or "SIZE 0" declares no fixed maximum.
            value = draw(_SIZE_VALUES)
            size = (int(value) or None) if value else None
            keywords["SIZE"] = value
            lines.append(f"{written} {value}".rstrip())
        elif keyword == "AUTH":
            # RFC 4954 §3: AUTH mech *(SP mech); mechanism names are case-insensitive.
            mechs = draw(
                st.lists(st.sampled_from(_MECHANISMS), min_size=1, max_size=4, unique=True)
            )
            shown = [draw(st.sampled_from((mech, mech.lower()))) for mech in mechs]
            keywords["AUTH"] = " ".join(shown)
            auth.update(mechs)
            lines.append(f"{written} {' '.join(shown)}")
            if draw(_BOOL):
                # The pre-standard "AUTH=" form old servers send next to the standard line.
                old = draw(
                    st.lists(st.sampled_from(_MECHANISMS), min_size=1, max_size=2, unique=True)
                )
                auth.update(old)
                lines.append("AUTH=" + " ".join(old))
        else:
            keywords[keyword] = ""
            lines.append(written)
    greeting = draw(domains(idn=False))
    if draw(_BOOL):
        greeting += " " + draw(_text(string.ascii_letters + " ,!", max_size=30)).strip()
    all_lines = [greeting, *lines]
    wire = b"".join(
        f"250{'-' if index < len(all_lines) - 1 else ' '}{text}\r\n".encode("ascii")
        for index, text in enumerate(all_lines)
    )
    expected = Extensions(
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
        keywords=keywords,
    )
    return wire, expected


def ehlo_replies() -> st.SearchStrategy[tuple[bytes, Extensions]]:
    """250 replies to EHLO (or LHLO), paired with the extensions they announce.

    The first line names the server (and sometimes greets); the others announce
    a random subset, in random order and letter case, of SIZE (absent value,
    ``0`` or up to 10^12), AUTH (1 to 4 mechanisms, sometimes also the old
    ``AUTH=`` form), PIPELINING, 8BITMIME, SMTPUTF8, CHUNKING, DSN,
    ENHANCEDSTATUSCODES, STARTTLS, BINARYMIME, REQUIRETLS, ETRN, VRFY and HELP.
    The paired :class:`~mailrelay.protocol.Extensions` is built from what was
    drawn (not parsed), so it checks ``Extensions.parse`` and the connection.

    Returns:
        A strategy for ``(bytes, extensions)`` pairs.
    """
    return _ehlo_reply()
