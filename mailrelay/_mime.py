"""A direct MIME writer for the simple message shapes :meth:`Message.build` makes most.

Private to the package. :mod:`mailrelay.message` tries :func:`write` first and
falls back to the :mod:`email` package (the general path) whenever this raises
:class:`Unsupported`. The writer therefore handles only what it can write
exactly as the general path would be read back, and refuses everything else:

* shapes: ``text/plain``, ``text/html``, ``multipart/alternative`` (text then
  HTML), the HTML as the root of a ``multipart/related`` with its inline parts, and
  any of these in a ``multipart/mixed`` with attachments;
* header text: printable ASCII (written as it is, folded at spaces) or
  non-ASCII (written as RFC 2047 encoded-words). Values holding ``=?`` (which a
  reader would take for an encoded-word), control characters, runs of spaces
  that folding would turn into blank lines, or words too long to fold within
  78 characters are left to the general path;
* addresses: given as ready ``(display name, addr-spec)`` pairs with ASCII
  addr-specs (a non-ASCII local part needs the RFC 6532 form: general path).

It also writes, for the general path, what the email package would fold in time
quadratic in a field's length: long unstructured values (:func:`long_unstructured`)
and long address lists (:func:`long_address_list`), exactly (unfolded and decoded,
they give the text back) and in linear time.

Rules this module keeps:

* RFC 5322 §2.1.1: header lines are at most 78 characters; folding inserts CRLF
  before a space (§2.2.3) and never leaves a line of white space only (§3.2.2).
* RFC 2047 §2: an encoded-word is at most 75 characters and a line holding one
  at most 76; §5(3): in a Q-encoded word only letters, digits and ``!*+-/``
  stand for themselves (safe in phrases, comments and unstructured text alike);
  words never split a character's UTF-8 bytes (§5).
* RFC 2045 §2.7 / §6.7 / §6.8: a body goes out as ``7bit`` only when it is ASCII
  with lines of at most 78 characters (the general path's limit); otherwise as
  quoted-printable (lines of at most 76) or base64 (76-character lines, text
  line breaks as CRLF), whichever is shorter.
* RFC 2045 §6.4, RFC 2046 §5.2.1: a ``message/rfc822`` attachment (and
  ``message/partial``, ``message/external-body``: :data:`UNENCODED_TYPES`) is never
  base64 or quoted-printable: it goes as it is, its line breaks made CRLF, as ``7bit``
  (8-bit data, ``8bit``, is the general path's); data that cannot (a NUL, a line over 998
  octets: :func:`embedded_body` says ``None``) is not written as such a type at all.
* RFC 2046 §5.1.1: a boundary is chosen that occurs in no part's encoded body.
* RFC 2045 §4: only the top level says ``MIME-Version``.
* RFC 2387: inline parts go in a ``multipart/related`` whose first part is the HTML
  (the root, §3.2, so no ``start`` parameter) and whose ``type`` parameter, which §3.1
  requires, names the root's type; each inline part has ``Content-Disposition: inline``
  (RFC 2183) and ``Content-ID: <id>`` (RFC 2045 §7), which ``cid:id`` URLs in the HTML
  name (RFC 2392). Without HTML there is no related part.
"""

from __future__ import annotations

import base64
import binascii
import random
import re
from collections.abc import Sequence
from urllib.parse import quote

__all__ = [
    "UNENCODED_TYPES",
    "Part",
    "Unsupported",
    "address_list",
    "long_address_list",
    "long_unstructured",
    "unstructured",
    "write_body",
    "embedded_body",
    "header_is_ascii",
]

# RFC 5322 §2.1.1: the recommended limit on a header line, CRLF excluded.
_MAX_LINE = 78
# RFC 2047 §2: encoded-words 75 characters, lines holding them 76.
_MAX_EW = 75
_MAX_EW_LINE = 76
#: RFC 5322 §2.1.1: no line of a message may be longer (without its CRLF).
_MAX_TEXT_LINE = 998
_EW_PREFIX_Q = "=?utf-8?q?"
_EW_PREFIX_B = "=?utf-8?b?"
_EW_OVERHEAD = len(_EW_PREFIX_Q) + len("?=")

# RFC 5322 §3.2.3 atext: a display name of atext and single spaces needs no quotes.
_ATEXT_PHRASE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?: [A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
# Printable ASCII, for values written as they are.
_PRINTABLE = re.compile(r"[\x20-\x7e]*")

# RFC 2047 §5(3): the characters a Q-encoded word may carry as themselves.
_Q_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!*+-/")


def _q_char(char: str) -> str:
    if char == " ":
        return "_"  # RFC 2047 §4.2(2)
    out = []
    for byte in char.encode("utf-8"):
        out.append(chr(byte) if byte in _Q_SAFE else f"={byte:02X}")
    return "".join(out)


_HIGH_BYTES = bytes(range(0x80, 0x100))


class Unsupported(Exception):
    """The input is not a shape the direct writer handles: use the general path."""


def _check_text(value: str) -> None:
    if "=?" in value:
        # A reader would decode it as an encoded-word (RFC 2047 §6.1).
        raise Unsupported("looks like an encoded-word")
    if value.split() != value.split(" "):
        # White space other than single spaces between words: readers (the
        # email package among them) collapse or strip it in their own ways.
        raise Unsupported("unusual white space")


def _encoded_words(text: str, first_room: int) -> list[str]:
    """Return ``text`` as RFC 2047 encoded-words, one per line.

    ``first_room`` is the room left on the first line (after the field name);
    later lines start with one space. Q or B is chosen by which is shorter.
    """
    q_chars = [_q_char(char) for char in text]
    q_length = sum(len(piece) for piece in q_chars)
    b_length = (len(text.encode("utf-8")) + 2) // 3 * 4
    words: list[str] = []
    room = min(first_room, _MAX_EW) - _EW_OVERHEAD
    if q_length <= b_length:
        current = ""
        for piece in q_chars:
            if current and len(current) + len(piece) > room:
                words.append(_EW_PREFIX_Q + current + "?=")
                current = ""
                room = min(_MAX_EW_LINE - 1, _MAX_EW) - _EW_OVERHEAD
            current += piece
        words.append(_EW_PREFIX_Q + current + "?=")
    else:
        chunk = b""
        for char in text:
            data = char.encode("utf-8")
            if chunk and (len(chunk) + len(data) + 2) // 3 * 4 > room:
                words.append(_EW_PREFIX_B + base64.b64encode(chunk).decode("ascii") + "?=")
                chunk = b""
                room = min(_MAX_EW_LINE - 1, _MAX_EW) - _EW_OVERHEAD
            chunk += data
        words.append(_EW_PREFIX_B + base64.b64encode(chunk).decode("ascii") + "?=")
    if any(len(word) > _MAX_EW for word in words):
        raise Unsupported("no room for an encoded-word")
    return words


def unstructured(name: str, value: str) -> str:
    """Return the folded field ``name: value`` (no final CRLF) for unstructured text.

    Raises:
        Unsupported: a value the general path should write.
    """
    if not value or value[0] == " " or value[-1] == " ":
        raise Unsupported("empty value, or white space at either end")
    if value.isascii():
        if "=?" in value:
            raise Unsupported("looks like an encoded-word")
        if _PRINTABLE.fullmatch(value) is None:
            raise Unsupported("control characters")
        line = f"{name}: {value}"
        if len(line) <= _MAX_LINE:
            return line
        if "  " in value:
            # Folding at one of two spaces could leave a line of white space only.
            raise Unsupported("runs of spaces in a long value")
        # RFC 5322 §2.2.3: fold by putting CRLF before a space.
        words = value.split(" ")
        lines = [f"{name}: {words[0]}"]
        for word in words[1:]:
            if len(lines[-1]) + 1 + len(word) <= _MAX_LINE:
                lines[-1] += " " + word
            else:
                lines.append(" " + word)
        if any(len(one) > _MAX_LINE for one in lines):
            raise Unsupported("a word too long to fold")
        return "\r\n".join(lines)
    _check_text(value)
    if any(char < " " or char == "\x7f" for char in value):
        raise Unsupported("control characters")
    words = _encoded_words(value, _MAX_EW_LINE - len(name) - 2)
    if len(name) + 2 + len(words[0]) > _MAX_EW_LINE:
        raise Unsupported("a field name too long for an encoded-word after it")
    return f"{name}: " + "\r\n ".join(words)


# A word and the spaces before it: an ASCII value is the concatenation of these.
_SPACED_WORD = re.compile(r" *[^ ]+")


def long_unstructured(name: str, value: str) -> str:
    """Return the value of the field ``name: value``, folded (CRLF SP), for a value too
    long for the email package, whose folder takes time quadratic in a value's length.

    Linear in the length of ``value``, and exact: unfolding the result (RFC 5322
    §2.2.3) and decoding its encoded-words gives ``value`` back. Printable ASCII
    without ``=?`` or white space at either end is folded before a space, each new
    line starting with a word's spaces so that none is white space only (RFC 5322
    §3.2.2), at 78 characters where the words allow and never past 998 (§2.1.1).
    Anything else (non-ASCII, control characters, a word too long for a line) is
    written as RFC 2047 encoded-words, spaces and all inside them, one per line.

    Raises:
        UnicodeEncodeError: a lone surrogate, which no encoding can carry.
    """
    if (
        value.isascii()
        and "=?" not in value
        and _PRINTABLE.fullmatch(value) is not None
        and value[:1] != " "
        and value[-1:] != " "
    ):
        pieces: list[str] = []
        width = len(name) + 2  # the line so far, "name: " included
        fits = True
        for word in _SPACED_WORD.findall(value):
            if pieces and width + len(word) > _MAX_LINE:
                pieces.append("\r\n")
                width = 0
            pieces.append(word)
            width += len(word)
            if width > _MAX_TEXT_LINE:
                fits = False
                break
        if fits:
            return "".join(pieces)
    value.encode("utf-8")  # refuse a lone surrogate here, not halfway through
    words = _encoded_words(value, _MAX_EW_LINE - len(name) - 2)
    if len(name) + 2 + len(words[0]) > _MAX_EW_LINE:
        # A long field name: the first encoded-word goes on the next line.
        return "\r\n " + "\r\n ".join(_encoded_words(value, _MAX_EW_LINE - 1))
    return "\r\n ".join(words)


def _mailbox_tokens(display_name: str, addr_spec: str) -> list[str]:
    """A mailbox as tokens a fold may go between (one space apart when not folded)."""
    spec = f"<{addr_spec}>" if display_name else addr_spec
    if not display_name:
        return [spec]
    if display_name.isascii() and "=?" not in display_name:
        if _ATEXT_PHRASE.fullmatch(display_name) is not None:
            return [*display_name.split(" "), spec]  # RFC 5322 §3.2.5: atoms
        if _PRINTABLE.fullmatch(display_name) is not None and len(display_name) <= _MAX_LINE:
            # RFC 5322 §3.2.4: a quoted-string, with DQUOTE and backslash escaped.
            escaped = display_name.replace("\\", "\\\\").replace('"', '\\"')
            return [f'"{escaped}"', spec]
    # RFC 2047 §5(3): anything else as encoded-words of phrase-safe characters, its
    # white space inside them, so that the name reads back exactly.
    return [*_encoded_words(display_name, _MAX_EW), spec]


def long_address_list(name: str, mailboxes: Sequence[tuple[str, str]]) -> str:
    """Return the value of the address field ``name``, folded (CRLF SP), for a list too
    long for the email package, whose folder takes time quadratic in a field's length.

    Linear in the list's length. Folds go after a comma or between the words of a
    display name; lines are at most 78 characters (76 when they hold an encoded-word,
    RFC 2047 §2) unless one token is longer (a quoted display name or an address,
    at most 998 with the line's other text).

    Args:
        name: the field name.
        mailboxes: ``(display name, addr-spec)`` pairs; the addr-spec written as given
            (UTF-8 only in a message sent with SMTPUTF8).

    Raises:
        UnicodeEncodeError: a lone surrogate in a display name.
    """
    pieces: list[str] = []
    width = len(name) + 2
    encoded = False  # whether the current line holds an encoded-word
    last = len(mailboxes) - 1
    for index, (display_name, addr_spec) in enumerate(mailboxes):
        tokens = _mailbox_tokens(display_name, addr_spec)
        for position, token in enumerate(tokens):
            is_word = token.startswith("=?")
            limit = _MAX_EW_LINE if encoded or is_word else _MAX_LINE
            separator = "" if not pieces else ", " if position == 0 else " "
            # Room for the comma that follows a mailbox's last token.
            comma = 1 if position == len(tokens) - 1 and index < last else 0
            if pieces and width + len(separator) + len(token) + comma > limit:
                pieces.append(separator.rstrip(" ") + "\r\n ")
                width = 1
                encoded = False
            else:
                pieces.append(separator)
                width += len(separator)
            pieces.append(token)
            width += len(token)
            encoded = encoded or is_word
    return "".join(pieces)


def _mailbox(display_name: str, addr_spec: str) -> str:
    if not display_name:
        return addr_spec
    _check_text(display_name)
    if display_name.isascii():
        if _PRINTABLE.fullmatch(display_name) is None:
            raise Unsupported("control characters in a display name")
        if _ATEXT_PHRASE.fullmatch(display_name) is not None:
            return f"{display_name} <{addr_spec}>"
        # RFC 5322 §3.2.4: a quoted-string, with DQUOTE and backslash escaped.
        escaped = display_name.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}" <{addr_spec}>'
    if any(char < " " or char == "\x7f" for char in display_name):
        raise Unsupported("control characters in a display name")
    words = _encoded_words(display_name, _MAX_EW)
    if len(words) != 1:
        raise Unsupported("a display name longer than one encoded-word")
    return f"{words[0]} <{addr_spec}>"


def address_list(name: str, mailboxes: Sequence[tuple[str, str]]) -> str:
    """Return the folded field ``name: mailbox, ...`` (no final CRLF).

    Args:
        name: the field name.
        mailboxes: ``(display name, addr-spec)`` pairs, the addr-spec ASCII.

    Raises:
        Unsupported: a mailbox the general path should write.
    """
    lines = [f"{name}: "]
    # Lines holding one mailbox that has no white space to fold at (a long addr-spec).
    unfoldable: set[int] = set()
    last = len(mailboxes) - 1
    for index, (display_name, addr_spec) in enumerate(mailboxes):
        item = _mailbox(display_name, addr_spec)
        # Room for the comma that follows the item when the next one folds.
        room = _MAX_LINE if index == last else _MAX_LINE - 1
        if index == 0:
            lines[0] += item
        elif len(lines[-1]) + 2 + len(item) <= room:
            lines[-1] += ", " + item
            continue
        else:
            lines[-1] += ","
            lines.append(" " + item)
        if " " not in item:
            unfoldable.add(len(lines) - 1)
    for number, line in enumerate(lines):
        if "=?" in line:
            # RFC 2047 §2: a line holding an encoded-word is at most 76 characters.
            if len(line) > _MAX_EW_LINE:
                raise Unsupported("a mailbox too long for one line")
        elif len(line) > _MAX_LINE and (number not in unfoldable or len(line) > _MAX_TEXT_LINE):
            # RFC 5322 §2.1.1: 78 characters is a SHOULD, 998 a MUST. A mailbox with no
            # white space in it cannot be folded, by this writer or any other, so its line
            # may be longer (the email package's folder fails on some of those: CPython
            # gh-75171); anything else that does not fit is left to the general path.
            raise Unsupported("a mailbox too long for one line")
    return "\r\n".join(lines)


# -- bodies -------------------------------------------------------------------


class Part:
    """One leaf of the body: its header lines and its encoded content (CRLF)."""

    __slots__ = ("content", "head", "is_7bit_text")

    def __init__(self, head: str, content: bytes, is_7bit_text: bool) -> None:
        self.head = head
        self.content = content
        # Only 7bit content can hold a boundary line: QP and base64 never hold "=_".
        self.is_7bit_text = is_7bit_text


def text_part(text: str, subtype: str) -> Part:
    """Encode ``text`` as a ``text/<subtype>; charset="utf-8"`` part."""
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise Unsupported("not encodable") from exc  # the general path reports it
    # bytes.splitlines: CR, LF and CRLF end lines (as in the general path); the
    # body always ends with a line break.
    lines = data.splitlines()
    head = f'Content-Type: text/{subtype}; charset="utf-8"\r\nContent-Transfer-Encoding: '
    if data.isascii() and all(len(line) <= _MAX_LINE for line in lines):
        return Part(head + "7bit", b"\r\n".join(lines) + b"\r\n", True)
    # QP costs two extra characters per byte it escapes; base64 a third of all.
    size = len(data)
    escaped = size - len(data.translate(None, _HIGH_BYTES)) + data.count(b"=")
    if 3 * (size + 2 * escaped) <= 4 * size:
        body = binascii.b2a_qp(b"\n".join(lines) + b"\n", istext=True)
        return Part(head + "quoted-printable", body.replace(b"\n", b"\r\n"), False)
    # RFC 2045 §6.8: text line breaks are CRLF before base64 encoding.
    return Part(head + "base64", _base64_lines(b"\r\n".join(lines) + b"\r\n"), False)


def _base64_lines(data: bytes) -> bytes:
    # RFC 2045 §6.8: lines of at most 76 characters (57 bytes each).
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


#: Content types whose body RFC 2045 §6.4 and RFC 2046 §5.2 forbid to encode: a whole
#: message (§5.2.1), a fragment of one (§5.2.2.1) and an external body (§5.2.3.5) are
#: "7bit", "8bit" or "binary". (``message/global``, RFC 6532 §3.7, may be encoded.)
UNENCODED_TYPES = frozenset({"message/rfc822", "message/partial", "message/external-body"})

# RFC 5322 §2.1.1 / RFC 5321 §4.5.3.1.6: 998 octets a line, CRLF excluded.
_MAX_WIRE_LINE = 998


def embedded_body(data: bytes) -> tuple[bytes, str] | None:
    """``data`` as the unencoded body of a :data:`UNENCODED_TYPES` part: its lines
    ended by CRLF (a bare CR or LF ends a line too, as for text), and ``"7bit"`` or
    ``"8bit"``; ``None`` when it cannot go unencoded (a NUL, RFC 2045 §2.7-2.8; a line
    over 998 octets)."""
    if b"\0" in data:
        return None
    lines = data.splitlines()
    if any(len(line) > _MAX_WIRE_LINE for line in lines):
        return None
    return b"\r\n".join(lines) + b"\r\n", "7bit" if data.isascii() else "8bit"


def header_is_ascii(data: bytes) -> bool:
    """Whether the header section of the message ``data`` (up to its first empty line) is
    ASCII: a message whose header is not must be ``message/global`` (RFC 6532 §3.7), never
    ``message/rfc822``."""
    lines = data.splitlines()
    end = lines.index(b"") if b"" in lines else len(lines)
    return all(line.isascii() for line in lines[:end])


def attachment_part(
    filename: str, data: bytes, content_type: str, content_id: str | None = None
) -> Part:
    """Encode an attachment as a base64 part with its Content-Disposition: ``attachment``,
    or with a ``content_id`` (checked already, without brackets) ``inline`` and its
    Content-ID."""
    if content_type != content_type.lower():
        raise Unsupported("content type not in lower case")
    kind = "attachment" if content_id is None else "inline"
    if filename.isascii():
        if _PRINTABLE.fullmatch(filename) is None or '"' in filename or "\\" in filename:
            raise Unsupported("a file name that needs escaping")
        _check_text(filename)
        disposition = f'Content-Disposition: {kind}; filename="{filename}"'
    else:
        if any(char < " " or char == "\x7f" for char in filename):
            raise Unsupported("control characters in a file name")
        # RFC 2231 §4: charset''percent-encoded octets.
        disposition = f"Content-Disposition: {kind}; filename*=utf-8''" + quote(
            filename, safe="", encoding="utf-8"
        )
    if len(disposition) > _MAX_LINE:
        raise Unsupported("a file name too long for one line")
    if content_type in UNENCODED_TYPES:
        embedded = embedded_body(bytes(data))
        if embedded is None or embedded[1] != "7bit":
            raise Unsupported("an embedded message that is not 7bit")
        # Checked for the boundary like 7bit text: a message holds lines of its own.
        head = f"Content-Type: {content_type}\r\nContent-Transfer-Encoding: 7bit\r\n{disposition}"
        return Part(head, embedded[0], True)
    head = f"Content-Type: {content_type}\r\nContent-Transfer-Encoding: base64\r\n{disposition}"
    if content_id is not None:
        # On one line, as the general path writes it: a msg-id holds no white space to
        # fold at, and it is at most 998 characters with its field name.
        head += f"\r\nContent-ID: <{content_id}>"
    return Part(head, _base64_lines(bytes(data)), False)


def _boundary(parts: Sequence[Part]) -> str:
    # "=_" never occurs in quoted-printable or base64 output; 7bit text is
    # checked, and a colliding boundary (vanishingly rare) is drawn again.
    for _ in range(100):
        boundary = f"=_{random.getrandbits(96):024x}"
        marker = b"--" + boundary.encode("ascii")
        if not any(part.is_7bit_text and marker in part.content for part in parts):
            return boundary
    raise Unsupported("no free boundary")  # pragma: no cover - needs 100 collisions


def _multipart(subtype: str, parts: Sequence[Part], root_type: str | None = None) -> Part:
    boundary = _boundary(parts)
    delimiter = b"--" + boundary.encode("ascii")
    pieces: list[bytes] = []
    for part in parts:
        pieces += [delimiter, b"\r\n", part.head.encode("ascii"), b"\r\n\r\n", part.content]
        # RFC 2046 §5.1.1: the CRLF before a delimiter belongs to the delimiter.
        pieces.append(b"\r\n")
    pieces += [delimiter, b"--\r\n"]
    if root_type is None:
        head = f'Content-Type: multipart/{subtype}; boundary="{boundary}"'
    else:
        # RFC 2387 §3.1: the related part names its root's type. Written before the
        # boundary and folded, as the general path writes it: on one line the field
        # would pass 78 characters (RFC 5322 §2.1.1).
        head = f'Content-Type: multipart/{subtype}; type="{root_type}";\r\n boundary="{boundary}"'
    return Part(head, b"".join(pieces), any(part.is_7bit_text for part in parts))


def write_body(
    text: str | None,
    html: str | None,
    attachments: Sequence[tuple[str, bytes, str]],
    related: Sequence[tuple[str, bytes, str, str]] = (),
) -> tuple[str, bytes]:
    """Return the top-level content header lines and the encoded body.

    Args:
        text: the plain-text body, or ``None``.
        html: the HTML body, or ``None``.
        attachments: ``(filename, data, content type)`` triples.
        related: the HTML's inline parts, ``(filename, data, content type, content
            id)``; only with ``html`` (the caller checks).

    Returns:
        ``MIME-Version`` and the ``Content-*`` lines (CRLF-separated, no final
        CRLF; the related part's Content-Type is folded, CRLF SP), and the body
        bytes.

    Raises:
        Unsupported: a body the general path should write.
    """
    parts: list[Part] = []
    if related and html is not None:
        # RFC 2387 §3.2: the HTML is the root, first; the inline parts follow it.
        root = [text_part(html, "html"), *(attachment_part(*item) for item in related)]
        page = _multipart("related", root, root_type="text/html")
        parts.append(
            page if text is None else _multipart("alternative", [text_part(text, "plain"), page])
        )
    elif text is not None and html is not None:
        parts.append(_multipart("alternative", [text_part(text, "plain"), text_part(html, "html")]))
    elif html is not None:
        parts.append(text_part(html, "html"))
    elif text is not None or not attachments:
        parts.append(text_part(text or "", "plain"))
    if attachments:
        parts += [attachment_part(*item) for item in attachments]
        top = _multipart("mixed", parts)
    else:
        (top,) = parts
    return "MIME-Version: 1.0\r\n" + top.head, top.content
