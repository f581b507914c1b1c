"""The arguments of :meth:`Message.build`, checked and put in the shapes its writers take.

Private to the package: :mod:`mailrelay.message` calls these before it writes a
message by either path (its own direct writer or the :mod:`email` package).

Rules this module keeps:

* RFC 5322 §2.2: no CR, LF or NUL (nor another character a line-splitting
  reader breaks at) in any header name, header value, display name, address,
  Message-ID, file name or content type a caller gives, so a caller's input can
  never add header fields of its own (header injection).
* RFC 5322 §2.2: a custom field name is printable US-ASCII without the colon,
  and may not repeat a field :meth:`Message.build` writes from its own
  parameters.
* RFC 5322 §3.6.4: a Message-ID is ``id-left@id-right``; RFC 6838 §4.2: a
  content type is ``type/subtype`` of restricted-name characters.
* Inline parts (RFC 2387 ``multipart/related``): a content id is a msg-id without its
  angle brackets (RFC 2045 §7, RFC 5322 §3.6.4: ``id-left@id-right``) or a lone
  dot-atom-text (``logo``, which mail clients resolve as well), short enough for
  ``Content-ID: <id>`` to fit a line; no two inline parts of a message have the same
  id (compared without regard to case), and inline parts need an HTML body to refer
  to them.
* Every item has a size limit, checked before any other work on it, so that
  hostile input is refused in time linear in its length: display names and file
  names of at most 998 characters, field names that fit a line with their colon
  (RFC 5322 §2.1.1), type and subtype names of at most 127 (RFC 6838 §4.2), and
  custom fields the email package parses as structured (``Resent-To``...) of at
  most :data:`MAX_STRUCTURED_CHARS` together. A lone surrogate (no UTF-8 form) is
  refused wherever CR and LF are.
* Without SMTPUTF8 an address's domain is written in A-label form (RFC 5890).
* Mailing-list fields (:class:`~mailrelay.message.ListHeaders`): every URI is
  written between angle brackets (RFC 2369 §2), is ``mailto:``, ``https:`` or
  ``http:``, and holds only the characters RFC 3986 §2 allows (so no white
  space, ``<``, ``>`` or line break can end it or the field early); a
  ``mailto:`` URI's non-ASCII text becomes percent-encoded UTF-8 and its domain
  A-labels (RFC 6068 §2); other URIs must be ASCII already. One-click
  unsubscribe (RFC 8058 §3.1) needs a ``List-Unsubscribe`` field holding exactly
  one HTTPS URI and no HTTP one. A List-Id is an optional phrase and
  ``<list-label.namespace>``, a dot-atom of at most 255 octets (RFC 2919 §2).
  The fields are written here, folded, in 7 bits, and both writers put this
  text on the wire unchanged.
"""

from __future__ import annotations

import email.headerregistry
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote, urlsplit

from mailrelay import _mime
from mailrelay.address import Address
from mailrelay.errors import InvalidAddress, MessageError

if TYPE_CHECKING:
    from mailrelay.message import AddressLike, ListHeaders

_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")
# RFC 6838 §4.2 restricted-name characters, for type and subtype.
_CONTENT_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*")
# RFC 5322 §3.6.4: msg-id = "<" id-left "@" id-right ">" (printable ASCII, no
# white space, no angle brackets inside).
_MSG_ID = re.compile(r"[\x21-\x3b\x3d\x3f-\x7e]+@[\x21-\x3b\x3d\x3f-\x7e]+")
# RFC 5322 §3.6.4 msg-id without its brackets: id-left is a dot-atom-text, id-right a
# dot-atom-text or a no-fold-literal ("[" dtext "]", §3.4.1; here without "<" and ">",
# which would end the Content-ID early for a lenient reader); or a lone dot-atom-text.
_DOT_ATOM_TEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
_CONTENT_ID = re.compile(
    rf"{_DOT_ATOM_TEXT}(?:@(?:{_DOT_ATOM_TEXT}|\[[\x21-\x3b\x3d\x3f-\x5a\x5e-\x7e]*\]))?"
)
_NAME_ADDR = re.compile(r"(?P<name>.*?)\s*<(?P<addr>[^<>]*)>\s*", re.DOTALL)
_LINE_BREAKS = re.compile(r"[\r\n\x00\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
_SURROGATE = re.compile("[\ud800-\udfff]")
# Either of the two, in one search (every header value passes here).
_UNWRITABLE = re.compile("[\r\n\x00\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029\ud800-\udfff]")

# Size limits on what build() is given. Each bounds the work one item costs (the email
# package folds a field in time quadratic in its length, and some of the patterns
# here are quadratic on hostile text), so an item over its limit is refused before
# any of that work is done; none is near what a real message holds.
#: RFC 5322 §2.1.1: the longest line a message may hold, CRLF excluded.
MAX_LINE_CHARS = 998
#: The longest display name: a line's worth (a longer one is no name a reader shows).
MAX_DISPLAY_NAME_CHARS = MAX_LINE_CHARS
#: The longest address given as text (``"Name <a@b>"``): room for a quoted display
#: name of the longest kind, with every character escaped, and the address.
MAX_MAILBOX_TEXT_CHARS = 3 * MAX_LINE_CHARS
#: RFC 5322 §2.1.1 and §2.2: a field name cannot be folded, so it, the colon, a space
#: and one character of the value must fit on one line.
MAX_FIELD_NAME_CHARS = MAX_LINE_CHARS - 3
#: The most text all custom fields the email package reads as structured (``Resent-To``,
#: ``Sender``...) may hold together: written by it alone, in time quadratic in a
#: field's length and some 10 µs a character at best.
MAX_STRUCTURED_CHARS = 8192
#: The longest attachment file name (file systems allow 255 bytes; this is generous).
MAX_FILENAME_CHARS = MAX_LINE_CHARS
#: RFC 6838 §4.2: type and subtype names are at most 127 characters each.
MAX_TYPE_NAME_CHARS = 127
#: RFC 5322 §2.1.1: ``Message-ID: <`` id ``>`` on one line.
MAX_MESSAGE_ID_CHARS = MAX_LINE_CHARS - len("Message-ID: <>")
#: RFC 5322 §2.1.1: ``Content-ID: <`` id ``>`` on one line (a msg-id has no white space
#: to fold at).
MAX_CONTENT_ID_CHARS = MAX_LINE_CHARS - len("Content-ID: <>")

# Custom fields the email package parses as structured values (its header
# registry) rather than unstructured text: the direct writer leaves them to it.
STRUCTURED_EXTRA = frozenset(
    {
        "date",
        "orig-date",
        "sender",
        "message-id",
        "resent-date",
        "resent-sender",
        "resent-from",
        "resent-to",
        "resent-cc",
        "resent-bcc",
    }
)

# Fields build() writes from its own parameters; `headers` may not repeat them.
_MANAGED_FIELDS = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "reply-to",
        "subject",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "content-disposition",
    }
)


def _check_filename(_instance: object, _attribute: object, value: str) -> None:
    if not isinstance(value, str):
        raise MessageError("an attachment's filename must be a string")
    _check_length("attachment filename", value, MAX_FILENAME_CHARS)
    _check_field("attachment filename", value)


def _check_data(_instance: object, _attribute: object, value: bytes) -> None:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise MessageError("an attachment's data must be bytes")


def _check_content_type(_instance: object, _attribute: object, value: str | None) -> None:
    if value is None:
        return
    if not isinstance(value, str):
        raise MessageError("an attachment's content type must be a string")
    _check_length("attachment content type", value, 2 * MAX_TYPE_NAME_CHARS + 1)
    _check_field("attachment content type", value)
    if _CONTENT_TYPE.fullmatch(value) is None:
        raise MessageError(f"invalid content type {value!r} (RFC 6838 §4.2)")
    maintype, _, subtype = value.partition("/")
    if max(len(maintype), len(subtype)) > MAX_TYPE_NAME_CHARS:
        raise MessageError(
            f"content type {_short(value)}: a type or subtype name longer than "
            f"{MAX_TYPE_NAME_CHARS} characters (RFC 6838 §4.2)"
        )


def _check_content_id(_instance: object, _attribute: object, value: str | None) -> None:
    if value is None:
        return
    if not isinstance(value, str):
        raise MessageError("an attachment's content_id must be a string")
    _check_length("attachment content_id", value, MAX_CONTENT_ID_CHARS)
    _check_field("attachment content_id", value)
    if value[:1] == "<" or value[-1:] == ">":
        raise MessageError(
            f"content_id {_short(value)}: give the id without angle brackets; it is "
            "written as Content-ID: <id> and the HTML refers to it as cid:id (RFC 2392)"
        )
    if _CONTENT_ID.fullmatch(value) is None:
        raise MessageError(
            f"invalid content_id {_short(value)} (RFC 5322 §3.6.4: id-left@id-right, "
            "or a lone dot-atom such as 'logo'; no white space, quotes, brackets or commas)"
        )


def _check_related(content_ids: list[str], html: str | None) -> None:
    """Refuse inline parts a built message could not use.

    Raises:
        MessageError: inline parts without ``html`` (nothing could refer to them), or
            two of them with the same content id.
    """
    if html is None:
        raise MessageError(
            "inline attachments (with a content_id) need html=: only an HTML body can "
            "refer to them (cid: URLs, RFC 2392); give them without content_id to attach them"
        )
    seen: set[str] = set()
    for content_id in content_ids:
        # RFC 2392 §2 matches a cid: URL to a Content-ID; clients differ in whether case
        # counts, so ids that differ only in case would be ambiguous too.
        key = content_id.lower()
        if key in seen:
            raise MessageError(
                f"two inline attachments have the content_id {_short(content_id)}: "
                "a cid: URL must name exactly one part (RFC 2392)"
            )
        seen.add(key)


def _short(value: str, limit: int = 40) -> str:
    """``value`` for an error message: quoted, and cut short when long."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + "..."


def _check_length(what: str, value: str, limit: int) -> None:
    """Refuse ``value`` longer than ``limit`` characters, before any other work on it."""
    if len(value) > limit:
        raise MessageError(
            f"{what} is {len(value)} characters long, over the limit of {limit}: {_short(value)}"
        )


def _check_field(what: str, value: str) -> None:
    # RFC 5322 §2.2: CR and LF only end header lines; a caller's value holding
    # them could add fields of its own choosing. NUL is never allowed. The other
    # characters Python's str.splitlines() breaks at (VT, FF, FS, GS, RS, NEL,
    # LS, PS) are refused too: the email package and other line-splitting
    # consumers would treat them as line ends.
    if _UNWRITABLE.search(value) is None:
        return
    if _LINE_BREAKS.search(value):
        raise MessageError(f"{what} contains CR, LF, NUL or another line break")
    # A lone surrogate has no UTF-8 form: no writer can put it in a header (it would
    # otherwise escape as a UnicodeEncodeError from deep inside one of them).
    if _SURROGATE.search(value):
        raise MessageError(f"{what} holds a lone surrogate, not encodable as UTF-8")


def _address_items(value: AddressLike | Iterable[AddressLike]) -> list[AddressLike]:
    if isinstance(value, str | Address):
        return [value]
    return list(value)


def _mailbox(what: str, value: AddressLike) -> tuple[str, Address]:
    """Return ``(display name, address)`` for an address given to build()."""
    if isinstance(value, Address):
        return "", value
    if isinstance(value, tuple):
        if len(value) != 2:
            raise MessageError(f"{what}: a tuple must be (display name, address)")
        name, address = value
        if not isinstance(name, str):
            raise MessageError(f"{what}: the display name must be a string")
        if len(name) > MAX_DISPLAY_NAME_CHARS:
            _check_length(f"{what}: a display name", name, MAX_DISPLAY_NAME_CHARS)
        _check_field(what, name)
        if isinstance(address, Address):
            return name, address
        # (An addr-spec is far shorter: RFC 5321 §4.5.3.1 allows 64 + 1 + 255.)
        if isinstance(address, str) and len(address) > MAX_LINE_CHARS:
            _check_length(f"{what}: an address", address, MAX_LINE_CHARS)
        _check_field(what, address)
        return name, Address.parse(address.strip())
    if not isinstance(value, str):
        raise MessageError(f"{what}: expected an address, got {type(value).__name__}")
    # Before the pattern below, which takes time quadratic in a long run of spaces.
    if len(value) > MAX_MAILBOX_TEXT_CHARS:
        _check_length(f"{what}: an address", value, MAX_MAILBOX_TEXT_CHARS)
    _check_field(what, value)
    match = _NAME_ADDR.fullmatch(value.strip())
    if match is None:
        return "", Address.parse(value.strip())
    name = match.group("name").strip()
    if len(name) >= 2 and name[0] == name[-1] == '"':
        name = re.sub(r"\\(.)", r"\1", name[1:-1])
    if len(name) > MAX_DISPLAY_NAME_CHARS:
        _check_length(f"{what}: a display name", name, MAX_DISPLAY_NAME_CHARS)
    return name, Address.parse(match.group("addr").strip())


def _spec(box: tuple[str, Address]) -> tuple[str, str]:
    # The direct writer's (display name, addr-spec), the domain in A-labels.
    name, address = box
    return name, address.smtp_path(False)


def _header_address(box: tuple[str, Address], utf8: bool) -> email.headerregistry.Address:
    name, address = box
    # Without SMTPUTF8 the domain must be in A-label form (RFC 5890); the
    # display name is left to the email package, which RFC 2047-encodes it.
    domain = address.domain if utf8 else address.ascii_domain
    return email.headerregistry.Address(
        display_name=name, username=address.local_part, domain=domain
    )


def _header_addresses(
    boxes: Iterable[tuple[str, Address]], utf8: bool
) -> list[email.headerregistry.Address] | str:
    """The value the email package is given for an address field.

    Its ``Address`` objects, unless one of them would be written wrongly: the package
    leaves some local parts that need quotes without them (``"."`` becomes ``.``, which
    is no address, and then fails to read its own field back). Such a list goes as text,
    each addr-spec written by :class:`~mailrelay.address.Address` (quoted as RFC 5322
    §3.4.1 requires), which the package reads and keeps as written.
    """
    boxes = list(boxes)
    objects = [_header_address(box, utf8) for box in boxes]
    if all(
        obj.addr_spec == box[1].smtp_path(utf8) for obj, box in zip(objects, boxes, strict=True)
    ):
        return objects
    return ", ".join(
        f"{_phrase(name)} <{address.smtp_path(utf8)}>" if name else address.smtp_path(utf8)
        for name, address in boxes
    )


# RFC 5322 §3.2.3 atext, and RFC 6532 §3.2's UTF-8 characters, with the spaces between words.
_PHRASE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\- \u0080-\U0010ffff]+")


def _phrase(name: str) -> str:
    """A display name as a phrase: its words as they are, or one quoted-string.

    Non-ASCII text is written as is; the email package turns it into encoded-words
    (RFC 2047) when the message is not UTF-8.
    """
    if _PHRASE.fullmatch(name) and name == name.strip(" ") and "  " not in name:
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _extra_headers(
    headers: Mapping[str, str] | Iterable[tuple[str, str]] | None,
) -> list[tuple[str, str]]:
    if headers is None:
        return []
    pairs = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
    structured = 0
    for name, value in pairs:
        if not isinstance(name, str) or not isinstance(value, str):
            raise MessageError("header names and values must be strings")
        _check_length("header name", name, MAX_FIELD_NAME_CHARS)
        if name.lower() in STRUCTURED_EXTRA:
            structured += len(value)
            if structured > MAX_STRUCTURED_CHARS:
                raise MessageError(
                    f"header {name!r}: the custom fields read as structured ("
                    + ", ".join(sorted(STRUCTURED_EXTRA))
                    + f") hold over {MAX_STRUCTURED_CHARS} characters together"
                )
        _check_field("header name", name)
        _check_field(f"header {name!r}", value)
        if _FIELD_NAME.fullmatch(name) is None:
            # RFC 5322 §2.2: printable US-ASCII except the colon.
            raise MessageError(f"invalid header name {name!r}")
        if name.lower() in _MANAGED_FIELDS:
            raise MessageError(f"header {name!r} is set by its own build() parameter")
    return pairs


def _check_message_id(value: str) -> str:
    _check_length("message_id", value, MAX_LINE_CHARS)
    _check_field("message_id", value)
    bare = value.strip()
    if bare.startswith("<") and bare.endswith(">"):
        bare = bare[1:-1]
    _check_length("message_id", bare, MAX_MESSAGE_ID_CHARS)
    if _MSG_ID.fullmatch(bare) is None:
        raise MessageError(f"invalid Message-ID {value!r} (RFC 5322 §3.6.4: id-left@id-right)")
    return bare


# -- mailing-list fields (RFC 2369, RFC 2919, RFC 8058) -------------------------------

#: The fields a :class:`~mailrelay.message.ListHeaders` writes, in the order written
#: (RFC 2919's List-Id, then RFC 2369 §3's order, RFC 8058's field after the one it
#: qualifies); ``headers`` may not repeat them beside it.
_LIST_FIELDS = (
    "List-Id",
    "List-Help",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "List-Subscribe",
    "List-Post",
    "List-Owner",
    "List-Archive",
)
_LIST_FIELD_NAMES = frozenset(name.lower() for name in _LIST_FIELDS)
# RFC 8058 §3.1: the single key/value pair List-Unsubscribe-Post holds.
_ONE_CLICK = "List-Unsubscribe=One-Click"
_LIST_SCHEMES = ("mailto", "https", "http")
# RFC 3986 §3.1: scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ).
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
# RFC 3986 §2: unreserved, reserved and "%" are all a URI may hold. Neither white
# space, "<", ">" nor a line break is among them, so a URI can end neither its angle
# brackets nor the field.
_NOT_URI_CHAR = re.compile(r"[^A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]")
# RFC 3986 §2.1: "%" only starts a pct-encoded octet.
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
# RFC 2919 §2: list-id = list-label "." list-id-namespace, both dot-atom-text
# (RFC 5322 §3.2.3), so at least two atoms.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LIST_ID = re.compile(rf"{_ATOM}(?:\.{_ATOM})+")
_LIST_ID_FIELD = re.compile(r"(?P<phrase>[^<>]*?)[ \t]*<(?P<id>[^<>]*)>")
_ATEXT_WORDS = re.compile(rf"{_ATOM}(?: {_ATOM})*")
# RFC 5322 §2.1.1: lines SHOULD be at most 78 characters and MUST be at most 998;
# RFC 2047 §2: a line holding an encoded-word at most 76.
_FOLD_AT = 78
_FOLD_AT_EW = 76
_MAX_LINE = 998


def _list_uris(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """Converter of :class:`~mailrelay.message.ListHeaders`' URI fields: one URI or
    several, each checked and in its written form (see :func:`_list_uri`)."""
    return tuple(_list_uri(item) for item in _uri_items(value))


def _uri_items(value: str | Iterable[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Iterable):
        raise MessageError(f"list URIs must be a string or strings, got {type(value).__name__}")
    return list(value)


def _list_post(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """Converter of ``ListHeaders.post``: URIs, or ``"NO"`` alone (RFC 2369 §3.4: a
    list that takes no posts)."""
    items = _uri_items(value)
    if "NO" in items:
        if len(items) != 1:
            raise MessageError('List-Post "NO" cannot be given beside URIs (RFC 2369 §3.4)')
        return ("NO",)
    return tuple(_list_uri(item) for item in items)


def _list_uri(value: str) -> str:
    """Check one list URI and return it as it goes between the angle brackets.

    Enclosing angle brackets are dropped; the scheme is lower-cased (RFC 3986 §3.1);
    a ``mailto:`` URI's non-ASCII characters become percent-encoded UTF-8 and a
    non-ASCII domain in its addresses A-labels (RFC 6068 §2).

    Raises:
        MessageError: not a string, a line break, no or another scheme, a character
            a URI cannot hold (white space, ``<``, ``>``, ``"``...), a bad ``%``
            escape, an ``http(s)`` URI with no host or with non-ASCII text.
    """
    if not isinstance(value, str):
        raise MessageError(f"a list URI must be a string, got {type(value).__name__}")
    _check_field("list URI", value)
    _check_encodable("list URI", value)
    uri = value
    if len(uri) >= 2 and uri[0] == "<" and uri[-1] == ">":
        uri = uri[1:-1]
    match = _SCHEME.match(uri)
    scheme = match.group(1).lower() if match is not None else ""
    if match is None or scheme not in _LIST_SCHEMES:
        raise MessageError(
            f"list URI {value!r} must be a mailto:, https: or http: URI (RFC 2369 §2)"
        )
    uri = scheme + uri[match.end(1) :]
    if not uri.isascii():
        if scheme != "mailto":
            raise MessageError(
                f"list URI {value!r} holds non-ASCII text: percent-encode its path and query "
                "(RFC 3986 §2.1) and write its host in A-labels"
            )
        uri = _ascii_mailto(uri)
    bad = _NOT_URI_CHAR.search(uri)
    if bad is not None:
        raise MessageError(
            f"list URI {value!r} holds {bad.group()!r}, which a URI cannot hold "
            "(RFC 3986 §2; RFC 2369 §2: nothing may break its angle brackets): percent-encode it"
        )
    if _BAD_PERCENT.search(uri):
        raise MessageError(
            f"list URI {value!r}: '%' not followed by two hex digits (RFC 3986 §2.1)"
        )
    rest = uri[len(scheme) + 1 :]
    if scheme == "mailto":
        if not rest:
            raise MessageError(f"list URI {value!r} names no address (RFC 6068 §2)")
        _check_mailto_addresses(value, rest.partition("?")[0])
    else:
        try:
            parts = urlsplit(uri)
            host = parts.hostname
            parts.port  # noqa: B018 -- read for its check: ValueError on a bad port
        except ValueError as exc:  # a malformed port or IPv6 literal
            raise MessageError(f"list URI {value!r}: {exc}") from exc
        if not rest.startswith("//") or not host:
            raise MessageError(f"list URI {value!r} has no host (RFC 9110 §4.2)")
    return uri


def _check_mailto_addresses(value: str, to: str) -> None:
    """RFC 6068 §2: the part before ``?`` is a list of addr-specs, percent-encoded."""
    if not to:
        return  # the addresses may all be in a "to=" field (RFC 6068 §2)
    for item in to.split(","):
        try:
            Address.parse(unquote(item))
        except InvalidAddress as exc:
            raise MessageError(f"list URI {value!r}: {exc}") from exc


def _check_encodable(what: str, value: str) -> None:
    # A lone surrogate has no UTF-8 form: neither percent-encoding nor an
    # encoded-word can carry it.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise MessageError(f"{what} {value!r} is not encodable as UTF-8") from exc


def _ascii_mailto(uri: str) -> str:
    """A mailto URI's non-ASCII text in 7 bits (RFC 6068 §2)."""
    to, question, query = uri[len("mailto:") :].partition("?")
    addresses = []
    for item in to.split(","):
        local, at, domain = item.rpartition("@")
        if at and not domain.isascii():
            try:
                domain = Address.parse(f"x@{domain}").ascii_domain
            except InvalidAddress as exc:
                raise MessageError(f"list URI {uri!r}: {exc}") from exc
            addresses.append(f"{local}@{domain}")
        else:
            addresses.append(item)
    text = "mailto:" + ",".join(addresses) + question + query
    # Only non-ASCII characters are encoded: the rest is checked as it is, so
    # white space or a bracket is still refused rather than hidden.
    return "".join(char if char.isascii() else quote(char, safe="") for char in text)


def _check_list_id(_instance: object, _attribute: object, value: str | None) -> None:
    """Validator of ``ListHeaders.id`` (see :func:`_list_id_parts`)."""
    if value is not None:
        _list_id_parts(value)


def _list_id_parts(value: str) -> tuple[str, str]:
    """``(phrase, list-id)`` of a List-Id given as ``"list.example.org"``,
    ``"<list.example.org>"`` or ``"Description <list.example.org>"``.

    Raises:
        MessageError: not a string, a line break or other control character, or a
            list-id that is not ``list-label.namespace`` (RFC 2919 §2) or is longer than
            255 octets.
    """
    if not isinstance(value, str):
        raise MessageError(f"a List-Id must be a string, got {type(value).__name__}")
    _check_field("List-Id", value)
    _check_encodable("List-Id", value)
    text = value.strip(" \t")
    match = _LIST_ID_FIELD.fullmatch(text)
    phrase, ident = (match.group("phrase").strip(" \t"), match.group("id")) if match else ("", text)
    if _LIST_ID.fullmatch(ident) is None:
        raise MessageError(
            f"invalid List-Id {value!r} (RFC 2919 §2: [description] <list-label.namespace>, "
            "the id a dot-atom such as 'news.example.org')"
        )
    if len(ident) > 255:
        raise MessageError(f"List-Id {ident[:40]!r}... is longer than 255 octets (RFC 2919 §2)")
    if any(char < " " or char == "\x7f" for char in phrase):
        raise MessageError(f"List-Id {value!r}: control characters in its description")
    return phrase, ident


def _check_list_headers(value: ListHeaders) -> None:
    """The rules between :class:`~mailrelay.message.ListHeaders`' fields.

    Raises:
        MessageError: ``one_click`` that is not a bool, or asked for without exactly
            one HTTPS and no HTTP unsubscribe URI.
    """
    if not isinstance(value.one_click, bool):
        raise MessageError("one_click must be True or False")
    if not value.one_click:
        return
    if not value.unsubscribe:
        raise MessageError(
            "one_click needs an unsubscribe URI: List-Unsubscribe-Post qualifies the "
            "List-Unsubscribe field (RFC 8058 §3.1)"
        )
    # RFC 8058 §3.1: "The List-Unsubscribe header field MUST contain one HTTPS URI";
    # the receiver POSTs to it, so two would be ambiguous and plain HTTP would send the
    # request in the clear.
    https = [uri for uri in value.unsubscribe if uri.startswith("https:")]
    if len(https) != 1 or any(uri.startswith("http:") for uri in value.unsubscribe):
        raise MessageError(
            "one-click unsubscribe needs exactly one https: URI and no http: one in "
            f"unsubscribe (RFC 8058 §3.1), got {list(value.unsubscribe)!r}"
        )


def _fold(name: str, items: list[str], limit: int) -> str:
    """``items`` joined by single spaces after ``name: ``, folded before a space
    (RFC 5322 §2.2.3) where a line would pass ``limit`` characters; returns the value
    (folds as CRLF SP) without the name.

    Raises:
        MessageError: an item too long for a line of 998 characters (RFC 5322 §2.1.1).
    """
    lines = [f"{name}: {items[0]}"]
    for item in items[1:]:
        if len(lines[-1]) + 1 + len(item) <= limit:
            lines[-1] += " " + item
        else:
            lines.append(" " + item)
    if any(len(line) > _MAX_LINE for line in lines):
        raise MessageError(
            f"{name}: an item too long for one header line (RFC 5322 §2.1.1: 998 characters)"
        )
    return "\r\n".join(lines)[len(name) + 2 :]


def _uri_field(name: str, uris: tuple[str, ...]) -> str:
    # RFC 2369 §2: angle-bracketed URIs separated by commas, in order of preference;
    # folding only between them (never inside the brackets).
    items = [f"<{uri}>," for uri in uris[:-1]] + [f"<{uris[-1]}>"]
    return _fold(name, items, _FOLD_AT)


def _phrase_items(phrase: str, name: str) -> tuple[list[str], int]:
    """A List-Id description as phrase words (RFC 5322 §3.2.5) and the fold limit."""
    if not phrase:
        return [], _FOLD_AT
    if phrase.isascii():
        if _ATEXT_WORDS.fullmatch(phrase) and "=?" not in phrase:
            return phrase.split(" "), _FOLD_AT
        # RFC 5322 §3.2.4: a quoted-string, with DQUOTE and backslash escaped; "=?"
        # inside one is no encoded-word (RFC 2047 §5), so text that looks like one
        # is shown as it was given.
        return ['"' + phrase.replace("\\", "\\\\").replace('"', '\\"') + '"'], _FOLD_AT
    # RFC 2047 §5(3): encoded-words of phrase-safe characters, each on its own line
    # when needed, in lines of at most 76 characters.
    return _mime._encoded_words(phrase, _FOLD_AT_EW - len(name) - 2), _FOLD_AT_EW


def _list_fields(value: ListHeaders) -> list[tuple[str, str]]:
    """The fields ``value`` asks for, as ``(name, folded value)`` pairs in
    :data:`_LIST_FIELDS` order: 7-bit text both writers put on the wire as it is.

    Raises:
        MessageError: a field too long to write (a URI over 998 characters).
    """
    fields: list[tuple[str, str]] = []
    if value.id is not None:
        phrase, ident = _list_id_parts(value.id)
        items, limit = _phrase_items(phrase, "List-Id")
        fields.append(("List-Id", _fold("List-Id", [*items, f"<{ident}>"], limit)))
    if value.help:
        fields.append(("List-Help", _uri_field("List-Help", value.help)))
    if value.unsubscribe:
        fields.append(("List-Unsubscribe", _uri_field("List-Unsubscribe", value.unsubscribe)))
    if value.one_click:
        fields.append(("List-Unsubscribe-Post", _ONE_CLICK))
    if value.subscribe:
        fields.append(("List-Subscribe", _uri_field("List-Subscribe", value.subscribe)))
    if value.post == ("NO",):
        fields.append(("List-Post", "NO"))
    elif value.post:
        fields.append(("List-Post", _uri_field("List-Post", value.post)))
    if value.owner:
        fields.append(("List-Owner", _uri_field("List-Owner", value.owner)))
    if value.archive:
        fields.append(("List-Archive", _uri_field("List-Archive", value.archive)))
    return fields


def _check_no_list_fields(extra: list[tuple[str, str]]) -> None:
    """With ``list_headers`` given, ``headers`` may not hold a list field too (RFC 8058
    §3.1 wants one List-Unsubscribe and one List-Unsubscribe-Post field)."""
    for name, _ in extra:
        if name.lower() in _LIST_FIELD_NAMES:
            raise MessageError(f"header {name!r} is set by list_headers; leave it out of headers")
