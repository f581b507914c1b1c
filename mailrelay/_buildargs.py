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
* Without SMTPUTF8 an address's domain is written in A-label form (RFC 5890).
"""

from __future__ import annotations

import email.headerregistry
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from mailrelay.address import Address
from mailrelay.errors import MessageError

if TYPE_CHECKING:
    from mailrelay.message import AddressLike

_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")
# RFC 6838 §4.2 restricted-name characters, for type and subtype.
_CONTENT_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*")
# RFC 5322 §3.6.4: msg-id = "<" id-left "@" id-right ">" (printable ASCII, no
# white space, no angle brackets inside).
_MSG_ID = re.compile(r"[\x21-\x3b\x3d\x3f-\x7e]+@[\x21-\x3b\x3d\x3f-\x7e]+")
_NAME_ADDR = re.compile(r"(?P<name>.*?)\s*<(?P<addr>[^<>]*)>\s*", re.DOTALL)
_LINE_BREAKS = re.compile(r"[\r\n\x00\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")

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
    _check_field("attachment filename", value)


def _check_data(_instance: object, _attribute: object, value: bytes) -> None:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise MessageError("an attachment's data must be bytes")


def _check_content_type(_instance: object, _attribute: object, value: str | None) -> None:
    if value is None:
        return
    if not isinstance(value, str):
        raise MessageError("an attachment's content type must be a string")
    _check_field("attachment content type", value)
    if _CONTENT_TYPE.fullmatch(value) is None:
        raise MessageError(f"invalid content type {value!r} (RFC 6838 §4.2)")


def _check_field(what: str, value: str) -> None:
    # RFC 5322 §2.2: CR and LF only end header lines; a caller's value holding
    # them could add fields of its own choosing. NUL is never allowed. The other
    # characters Python's str.splitlines() breaks at (VT, FF, FS, GS, RS, NEL,
    # LS, PS) are refused too: the email package and other line-splitting
    # consumers would treat them as line ends.
    if _LINE_BREAKS.search(value):
        raise MessageError(f"{what} contains CR, LF, NUL or another line break")


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
        _check_field(what, name)
        if isinstance(address, Address):
            return name, address
        _check_field(what, address)
        return name, Address.parse(address.strip())
    if not isinstance(value, str):
        raise MessageError(f"{what}: expected an address, got {type(value).__name__}")
    _check_field(what, value)
    match = _NAME_ADDR.fullmatch(value.strip())
    if match is None:
        return "", Address.parse(value.strip())
    name = match.group("name").strip()
    if len(name) >= 2 and name[0] == name[-1] == '"':
        name = re.sub(r"\\(.)", r"\1", name[1:-1])
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
    for name, value in pairs:
        if not isinstance(name, str) or not isinstance(value, str):
            raise MessageError("header names and values must be strings")
        _check_field("header name", name)
        _check_field(f"header {name!r}", value)
        if _FIELD_NAME.fullmatch(name) is None:
            # RFC 5322 §2.2: printable US-ASCII except the colon.
            raise MessageError(f"invalid header name {name!r}")
        if name.lower() in _MANAGED_FIELDS:
            raise MessageError(f"header {name!r} is set by its own build() parameter")
    return pairs


def _check_message_id(value: str) -> str:
    _check_field("message_id", value)
    bare = value.strip()
    if bare.startswith("<") and bare.endswith(">"):
        bare = bare[1:-1]
    if _MSG_ID.fullmatch(bare) is None:
        raise MessageError(f"invalid Message-ID {value!r} (RFC 5322 §3.6.4: id-left@id-right)")
    return bare
