"""Messages: the bytes that travel between ``DATA`` and the final dot.

A :class:`Message` is an immutable value with a small interface: its wire
bytes (:meth:`Message.chunks`, :meth:`Message.as_bytes`), what a server must
support to take them (:attr:`~Message.needs_8bitmime`,
:attr:`~Message.needs_smtputf8`, :attr:`~Message.size`), its header fields (for
:meth:`mailrelay.envelope.Envelope.from_message`) and its blind recipients
(:attr:`~Message.bcc`). It uses the standard library's :mod:`email` package
for what is unusual but does not expose or subclass it; the common shapes are
written and read by the package's own helpers (:mod:`mailrelay._mime`,
:mod:`mailrelay._wire`), which cost a bulk sender a few microseconds where the
email package costs hundreds.

Rules this module keeps:

* The wire form is CRLF-normalized: a bare LF or a bare CR becomes CRLF
  (RFC 5321 §2.3.8 forbids sending them bare). Dot-stuffing is *not* applied
  here; it belongs to the protocol layer.
* ``Bcc`` and ``Resent-Bcc`` fields never reach the wire (RFC 5322 §3.6.3 and
  §3.6.6); their addresses are kept for the envelope.
* :meth:`Message.build` refuses CR, LF or NUL in any header name, header value,
  display name, address, file name or content type it is given, so a caller's
  input can never add header fields (header injection); the checks are in
  :mod:`mailrelay._buildargs`.
* Inline parts (an :class:`Attachment` with a ``content_id``) go with the HTML in a
  ``multipart/related`` (RFC 2387) whose root, first, is the HTML (§3.2) and whose
  ``type`` parameter names it (§3.1); each carries ``Content-ID: <id>`` (RFC 2045 §7),
  which the HTML's ``cid:id`` URLs name (RFC 2392). A content id is checked when the
  attachment is made; :meth:`Message.build` refuses inline parts without ``html`` and
  two with one id. Without inline parts every shape is written as before.
* Mailing-list fields come from one :class:`ListHeaders` value, checked when it is
  made: angle-bracketed ``mailto:``/``https:``/``http:`` URIs (RFC 2369 §2) that no
  character can break out of, a List-Id of RFC 2919 §2's form, and one-click
  unsubscribe (RFC 8058 §3.1) only beside exactly one HTTPS unsubscribe URI. Both
  writers put the same pre-folded 7-bit text on the wire (RFC 8058 §4 wants
  ``List-Unsubscribe`` and ``List-Unsubscribe-Post`` DKIM-signed:
  :data:`mailrelay.dkim.DEFAULT_HEADERS` names both).
* :meth:`Message.build` writes 7-bit headers: non-ASCII subjects, display names
  and other unstructured values become RFC 2047 encoded-words, IDN domains go
  out as A-labels, and non-ASCII text bodies are quoted-printable or base64, so
  any server takes the result. The single exception is an address whose local
  part is non-ASCII: it cannot be written in 7 bits at all, so the whole
  message is then written in the RFC 6532 form (raw UTF-8 headers and 8-bit
  bodies) and needs a server that offers SMTPUTF8 (which implies 8BITMIME,
  RFC 6531 §3.1).
* :meth:`Message.build` refuses, with a :class:`~mailrelay.errors.MessageError`
  naming the field, what :meth:`Message.from_bytes` would refuse to read back: a
  header block over :data:`MAX_HEADER_BYTES` (``Bcc`` fields counted, as the general
  path writes and parses them). It checks the fields' least sizes before writing
  anything, so the refusal is fast, and the written block again; it never writes a
  line over 998 characters (RFC 5322 §2.1.1). Single items have limits of their own
  (display names, addresses, field names, file names, Message-IDs; see
  :mod:`mailrelay._buildargs`), and everything under them is written in time linear
  in its length: long values and address lists, and every field of a large header
  block, are folded by :mod:`mailrelay._mime`, not by the email package, whose
  folder takes time quadratic in a field's length.
* :meth:`Message.build` writes simple messages (text and/or HTML, few
  attachments, ordinary header text) directly and everything else through the
  email package; both paths give the same fields in the same order, and text
  that reads back the same (the tests compare them). A built message remembers
  the addresses it was given, so :meth:`Envelope.from_message` reads no header
  text for it.
* Address fields (for :attr:`Message.bcc`, :meth:`Message.get_addresses` and
  :meth:`Envelope.from_message`) are read in time linear in their length: the list
  is split into mailboxes first and each is read alone; a mailbox longer than
  :data:`MAX_MAILBOX_CHARS` is read by the ``<addr-spec>`` it ends with, and raises
  :class:`~mailrelay.errors.InvalidAddress` without one, as does one the email
  package's parser cannot read.
* :meth:`Message.from_file` never holds the file's body in memory: it parses the
  header block, measures the body in one streaming pass, and reads the body
  again piece by piece whenever :meth:`Message.chunks` is called.
"""

from __future__ import annotations

import datetime as _dt
import email.errors
import email.headerregistry
import email.policy
import enum
import io
import mimetypes
import os
import re
import secrets
from collections.abc import Iterable, Iterator, Mapping
from email.message import Message as _StdlibMessage
from email.message import MIMEPart
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Final, TypeAlias
from urllib.parse import quote

import attrs

from mailrelay import _mime, _wire
from mailrelay._buildargs import (
    MAX_LINE_CHARS,
    STRUCTURED_EXTRA,
    _address_items,
    _check_content_id,
    _check_content_type,
    _check_data,
    _check_field,
    _check_filename,
    _check_list_headers,
    _check_list_id,
    _check_message_id,
    _check_no_list_fields,
    _check_related,
    _extra_headers,
    _header_addresses,
    _list_fields,
    _list_post,
    _list_uris,
    _mailbox,
    _spec,
)
from mailrelay.address import Address, _render_local
from mailrelay.errors import InvalidAddress, MessageError

__all__ = [
    "AddressLike",
    "Attachment",
    "ListHeaders",
    "Message",
    "MAX_HEADER_BYTES",
    "MAX_MAILBOX_CHARS",
]

#: An address as :meth:`Message.build` accepts it: an :class:`Address`, its text
#: (``"a@example.org"`` or ``"Name <a@example.org>"``) or a ``(display name,
#: address)`` pair.
AddressLike: TypeAlias = "str | Address | tuple[str, str | Address]"

#: The largest header block :meth:`Message.from_bytes` and
#: :meth:`Message.from_file` accept before giving up (a file with no blank line
#: would otherwise be read whole while looking for the end of its headers).
MAX_HEADER_BYTES = 1 << 20

#: The longest mailbox (one item of an address list: display name, comments and
#: address) that header fields may hold for :meth:`Message.get_addresses`,
#: :attr:`Message.bcc` and :meth:`Envelope.from_message` read whole: the longest line
#: RFC 5322 §2.1.1 allows. A longer one is read by the ``<addr-spec>`` it ends with (a
#: long display name is legal in a folded field), and raises
#: :class:`~mailrelay.errors.InvalidAddress` if it has none of at most this length; the
#: bound keeps reading a hostile field linear in its length.
MAX_MAILBOX_CHARS = 998

_BRACKETED = re.compile(r"<([^<>]*)>")
_ANGLE = re.compile(r"[<>]")

# In the general path, an unstructured value longer than this is folded by
# mailrelay._mime.long_unstructured, and an address list with more text than this is
# given to the email package in groups of about this much: its folder takes time
# quadratic in a field's length (a 200 KB Subject took 9 s). Shorter ones are its to
# write, as they always were.
_LONG_TEXT = 998
# A header block sure to hold more than this is written by those folders throughout.
_BULK_HEAD = 1 << 14

_ADDRESS_PARSER = email.headerregistry.HeaderRegistry()


@attrs.frozen(kw_only=True)
class Attachment:
    """A file attached to a built message, or with a ``content_id`` an inline part of
    its HTML body (an embedded image, say).

    An inline part goes beside the HTML in a ``multipart/related`` (RFC 2387), with
    ``Content-Disposition: inline`` and ``Content-ID: <content_id>``; the HTML refers to
    it by the URL ``cid:content_id`` (RFC 2392), which :attr:`cid_url` gives ready to
    use. :meth:`inline` makes one with a fresh, unique id.

    Raises:
        MessageError: from the constructor: CR, LF, NUL or another line break in
            the file name or content type, a file name over 998 characters, a
            content type that is not ``type/subtype`` or has a type or subtype name
            over 127 characters (RFC 6838 §4.2), data that is not bytes, or a
            content id that is not ``id-left@id-right`` (RFC 5322 §3.6.4) or a lone
            dot-atom, is given in angle brackets, or is over
            :data:`~mailrelay._buildargs.MAX_CONTENT_ID_CHARS` (984) characters; a
            ``multipart/*`` content type (its boundary could not be given); a
            ``message/rfc822`` (``message/partial``, ``message/external-body``) one
            with a content id, or with data that cannot go unencoded (a NUL, a line
            over 998 octets); a ``message/rfc822`` one whose header fields are not
            ASCII (that is ``message/global``, RFC 6532 §3.7).

    Attributes:
        filename: the name the recipient sees (non-ASCII names are written with
            RFC 2231 encoding).
        data: the file's bytes (sent base64-encoded; a ``message/rfc822`` one, a
            whole message, unencoded with CRLF line ends, RFC 2046 §5.2.1).
        content_type: ``type/subtype``; ``None`` guesses from the file name and
            falls back to ``application/octet-stream``.
        content_id: ``None`` for an attachment; for an inline part, its id without
            angle brackets: ``"logo@example.org"`` (RFC 5322 msg-id syntax) or a lone
            dot-atom such as ``"logo"`` (not a msg-id, but mail clients resolve it).
            Unique within a message.
    """

    filename: str = attrs.field(validator=_check_filename)
    data: bytes = attrs.field(validator=_check_data)
    content_type: str | None = attrs.field(default=None, validator=_check_content_type)
    content_id: str | None = attrs.field(default=None, validator=_check_content_id)

    @classmethod
    def inline(
        cls,
        filename: str,
        data: bytes,
        content_type: str | None = None,
        *,
        domain: str = "inline.invalid",
    ) -> Attachment:
        """Make an inline part with a fresh content id: 128 random bits and ``domain``.

        Put its :attr:`cid_url` in the HTML. The id is unique whatever the domain (RFC
        2392 asks content ids to be globally unique), so the default, a name reserved
        never to resolve (RFC 2606), serves; give your own domain to brand it.

        Args:
            filename: the name the recipient sees.
            data: the file's bytes.
            content_type: ``type/subtype``, or ``None`` to guess from ``filename``.
            domain: the id's right-hand side, a dot-atom.

        Raises:
            MessageError: what the constructor raises, or a ``domain`` that is not a
                dot-atom (or an address literal such as ``[192.0.2.1]``).
        """
        return cls(
            filename=filename,
            data=data,
            content_type=content_type,
            content_id=f"{secrets.token_hex(16)}@{domain}",
        )

    @property
    def cid_url(self) -> str:
        """The ``cid:`` URL that refers to this inline part from the HTML (RFC 2392):
        the content id, its URL-unsafe characters percent-encoded.

        Raises:
            MessageError: an attachment without a content id.
        """
        if self.content_id is None:
            raise MessageError(
                f"attachment {self.filename!r} has no content_id, so no cid: URL refers to it"
            )
        # RFC 2392 §2: "%" hex hex stands for a character a URL cannot hold, or that
        # means something in one ("%", "?", "#"); "&" too, so that the URL can go into
        # an HTML attribute as it is. Usual ids (letters, digits, ".", "-", "@") are
        # written unchanged.
        return "cid:" + quote(self.content_id, safe="/:@!$'()*+,;=")

    def __attrs_post_init__(self) -> None:
        if self.content_type is None:
            return
        kind = self.content_type.lower()
        if kind.startswith("multipart/"):
            # RFC 2046 §5.1.1: a multipart body is read by its boundary parameter, which
            # an attachment's bare type/subtype cannot give.
            raise MessageError(
                f"attachment {self.filename!r}: a {kind} body needs its boundary parameter; "
                "attach a whole message as message/rfc822, anything else as "
                "application/octet-stream"
            )
        if kind in _mime.UNENCODED_TYPES:
            if self.content_id is not None:
                raise MessageError(
                    f"attachment {self.filename!r}: a {kind} part cannot be inline (nothing "
                    "in HTML shows it); attach it without content_id"
                )
            if kind == "message/rfc822" and not _mime.header_is_ascii(self.data):
                # RFC 6532 §3.7: a message with UTF-8 header fields is message/global.
                raise MessageError(
                    f"attachment {self.filename!r}: a message whose header fields are not "
                    "ASCII is message/global (RFC 6532 §3.7), not message/rfc822"
                )
            if _mime.embedded_body(self.data) is None:
                # RFC 2046 §5.2.1: never base64 or quoted-printable.
                raise MessageError(
                    f"attachment {self.filename!r}: a {kind} body goes unencoded (RFC 2046 "
                    "§5.2.1) and this one holds a NUL or a line over 998 octets; attach it "
                    "as application/octet-stream"
                )

    def resolved_content_type(self) -> str:
        """Return the content type to send: the given one or a guess.

        A guess that must go unencoded (``message/rfc822`` for ``.eml``: RFC 2046
        §5.2.1) for data that cannot (a NUL, a line over 998 octets) is
        ``application/octet-stream`` instead, sent base64-encoded; a ``.eml`` whose header
        fields are not ASCII is ``message/global`` (RFC 6532 §3.7), base64-encoded too.
        """
        if self.content_type is not None:
            return self.content_type
        guessed, _ = mimetypes.guess_type(self.filename, strict=False)
        if guessed is None:
            return "application/octet-stream"
        if guessed in _mime.UNENCODED_TYPES:
            if self.content_id is not None or _mime.embedded_body(self.data) is None:
                return "application/octet-stream"
            if guessed == "message/rfc822" and not _mime.header_is_ascii(self.data):
                return "message/global"  # RFC 6532 §3.7 (sent base64-encoded)
        return guessed


@attrs.frozen(kw_only=True)
class ListHeaders:
    """The mailing-list header fields of a built message: RFC 2369's ``List-*``
    fields, RFC 2919's ``List-Id`` and RFC 8058's one-click unsubscribe.

    Give it to :meth:`Message.build` as ``list_headers``. Every URI field takes one
    URI or several (in order of preference), with or without angle brackets; each is
    written between angle brackets, comma-separated (RFC 2369 §2). Only ``mailto:``,
    ``https:`` and ``http:`` URIs are taken. A list's fixed fields can be made once
    and the per-recipient unsubscribe URI added with :func:`attrs.evolve`.

    Raises:
        MessageError: from the constructor: a URI with another scheme, a line break,
            white space, ``<``, ``>`` or any other character a URI cannot hold
            (RFC 3986 §2), non-ASCII text in an ``http(s)`` URI, an ``http(s)`` URI
            without a host; a List-Id that is not ``[description]
            <list-label.namespace>`` or whose id passes 255 octets (RFC 2919 §2);
            ``one_click`` without exactly one ``https:`` unsubscribe URI, or beside an
            ``http:`` one (RFC 8058 §3.1), a ``mailto:`` URI naming an address
            that is not valid.

    Attributes:
        id: ``List-Id``: ``"news.example.org"``, ``"<news.example.org>"`` or
            ``"Autumn news <news.example.org>"`` (a non-ASCII description becomes
            RFC 2047 encoded-words).
        unsubscribe: ``List-Unsubscribe`` URIs. In a ``mailto:`` URI non-ASCII text
            is percent-encoded as UTF-8 and a non-ASCII domain written in A-labels
            (RFC 6068 §2); the stored value is that encoded form.
        one_click: also write ``List-Unsubscribe-Post: List-Unsubscribe=One-Click``
            (RFC 8058): the receiver may then POST to the ``https:`` URI without
            asking the reader to confirm. Sign the message with DKIM (RFC 8058 §4):
            :class:`~mailrelay.dkim.DKIMSigner` covers both fields by default.
        help: ``List-Help`` URIs.
        subscribe: ``List-Subscribe`` URIs.
        post: ``List-Post`` URIs, or ``"NO"`` for a list that takes no posts
            (RFC 2369 §3.4).
        owner: ``List-Owner`` URIs.
        archive: ``List-Archive`` URIs.
    """

    id: str | None = attrs.field(default=None, validator=_check_list_id)
    unsubscribe: tuple[str, ...] = attrs.field(default=(), converter=_list_uris)
    one_click: bool = False
    help: tuple[str, ...] = attrs.field(default=(), converter=_list_uris)
    subscribe: tuple[str, ...] = attrs.field(default=(), converter=_list_uris)
    post: tuple[str, ...] = attrs.field(default=(), converter=_list_post)
    owner: tuple[str, ...] = attrs.field(default=(), converter=_list_uris)
    archive: tuple[str, ...] = attrs.field(default=(), converter=_list_uris)

    def __attrs_post_init__(self) -> None:
        _check_list_headers(self)

    def fields(self) -> list[tuple[str, str]]:
        """Return the header fields as ``(name, value)`` pairs, in the order
        :meth:`Message.build` writes them; values are 7-bit text, folded with CRLF SP
        where a line would pass 78 characters (never inside angle brackets).

        Raises:
            MessageError: a URI too long for a header line (RFC 5322 §2.1.1: 998
                characters).
        """
        return _list_fields(self)


class _Unknown(enum.Enum):
    """The type of :data:`_UNKNOWN`: a cached value not computed yet.

    (A one-member enum, so that an identity test tells it apart, for mypy too:
    cheaper than ``isinstance`` in a property read for every message.)
    """

    UNKNOWN = enum.auto()


_UNKNOWN: Final = _Unknown.UNKNOWN


@attrs.frozen(kw_only=True, repr=False)
class Message:
    """An email message ready for the wire.

    Create one with :meth:`build`, :meth:`from_bytes`, :meth:`from_email` or
    :meth:`from_file`; the constructor itself is internal.

    Attributes:
        headers: every header field as ``(name, value)`` pairs in message order,
            unfolded (RFC 5322 §2.2.3), values decoded as UTF-8 with RFC 2047
            encoded-words left as they are. Includes ``Bcc`` fields, which are
            not on the wire.
        bcc: the addresses of the ``Bcc`` fields, which go in the envelope only.
        size: the length in bytes of the wire form (CRLF-normalized, Bcc removed,
            before dot-stuffing): the value for the SIZE parameter (RFC 1870).
        needs_8bitmime: whether the body holds any byte of 0x80 or above, so
            that the server must offer 8BITMIME (RFC 6152).
        needs_smtputf8: whether the header block on the wire holds raw non-ASCII
            bytes (RFC 6532), so that the server must offer SMTPUTF8 (RFC 6531).
    """

    headers: tuple[tuple[str, str], ...]
    bcc: tuple[Address, ...]
    size: int
    needs_8bitmime: bool
    needs_smtputf8: bool
    # The whole wire form, or for a file-backed message its header block only.
    _wire: bytes
    _path: Path | None = None
    _body_offset: int = 0
    _file_size: int = 0
    _file_mtime_ns: int = 0
    # For a built message: the From address and the To, Cc and Bcc addresses it
    # was given, so that Envelope.from_message need not parse header text. None
    # when the headers must be read (parsed messages, or a Sender or Resent-*
    # field among the custom headers).
    _envelope_addresses: tuple[Address, tuple[Address, ...]] | None = attrs.field(
        default=None, eq=False
    )
    # message_id, once asked for (a message is immutable: it is read from the headers once;
    # the dialogue and the tracker ask for it for every message they send).
    _message_id: str | _Unknown | None = attrs.field(init=False, default=_UNKNOWN, eq=False)

    # -- constructors -------------------------------------------------------

    @classmethod
    def build(
        cls,
        *,
        sender: AddressLike,
        to: AddressLike | Iterable[AddressLike] = (),
        cc: AddressLike | Iterable[AddressLike] = (),
        bcc: AddressLike | Iterable[AddressLike] = (),
        reply_to: AddressLike | list[AddressLike] | None = None,
        subject: str | None = None,
        text: str | None = None,
        html: str | None = None,
        attachments: Iterable[Attachment | tuple[str, bytes] | tuple[str, bytes, str | None]] = (),
        headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
        message_id: str | None = None,
        date: _dt.datetime | None = None,
        list_headers: ListHeaders | None = None,
    ) -> Message:
        """Build a new message.

        Args:
            sender: the author, written as ``From``; its domain also names the
                generated Message-ID.
            to: the ``To`` addresses. A single ``str`` or :class:`Address` is one
                address; anything else is iterated.
            cc: the ``Cc`` addresses, like ``to``.
            bcc: blind recipients: in :attr:`bcc` and the envelope, never on the
                wire.
            reply_to: one address (a ``(name, address)`` tuple is one address) or
                a list of addresses for ``Reply-To``.
            subject: the ``Subject``; omitted when ``None``.
            text: the plain-text body.
            html: the HTML body; with ``text`` too the two become a
                ``multipart/alternative``.
            attachments: :class:`Attachment` values or ``(filename, data)`` /
                ``(filename, data, content_type)`` tuples; any attachment makes
                the message ``multipart/mixed``. Those with a ``content_id`` are
                inline parts of the HTML instead: the HTML and they, in order, become
                a ``multipart/related`` (RFC 2387) where the HTML alone would be.
            headers: extra header fields, a mapping or ``(name, value)`` pairs (use
                pairs to repeat a name). They may not repeat a field set by another
                parameter.
            message_id: the Message-ID, with or without angle brackets; generated
                from the sender's domain when omitted (and not in ``headers``).
            date: an aware datetime for ``Date``; now (UTC) when omitted.
            list_headers: mailing-list and unsubscribe fields (``List-Id``,
                ``List-Unsubscribe``, one-click ``List-Unsubscribe-Post``...), written
                after ``Message-ID``; ``headers`` may then hold none of the eight
                list fields (``List-Id``, ``List-Help``, ``List-Unsubscribe``,
                ``List-Unsubscribe-Post``, ``List-Subscribe``, ``List-Post``,
                ``List-Owner``, ``List-Archive``).

        Returns:
            The message.

        Raises:
            MessageError: CR, LF or NUL in any field (header injection), a bad
                header name, a repeated managed field, a bad content type,
                Message-ID or date, ``list_headers`` that is not a
                :class:`ListHeaders` or beside a ``List-*`` field in ``headers``,
                or a list field too long for a line; inline attachments (with a
                ``content_id``) without ``html``, or two with the same content id
                (case aside); a header block over
                :data:`MAX_HEADER_BYTES` (``Bcc`` included), which
                :meth:`from_bytes` would refuse; a display name over 998
                characters, an address given as text over 2994, a header name over
                995, a Message-ID that does not fit a 998-character line, custom
                ``Sender``/``Resent-*``/``Date``/``Message-ID`` fields over 8192
                characters together, a lone surrogate in any of them (an attachment's
                file name over 998 characters, or its type or subtype over 127,
                raises from :class:`Attachment`).
            InvalidAddress: an address that is not a valid envelope address.
        """
        author = _mailbox("sender", sender)
        to_list = [_mailbox("to", a) for a in _address_items(to)]
        cc_list = [_mailbox("cc", a) for a in _address_items(cc)]
        bcc_list = [_mailbox("bcc", a) for a in _address_items(bcc)]
        if reply_to is None:
            reply_list = []
        elif isinstance(reply_to, list):
            reply_list = [_mailbox("reply_to", a) for a in reply_to]
        else:
            reply_list = [_mailbox("reply_to", reply_to)]
        if subject is not None:
            _check_field("subject", subject)
        extra = _extra_headers(headers)
        extra_names = {name.lower() for name, _ in extra}
        if message_id is not None:
            if "message-id" in extra_names:
                raise MessageError("Message-ID given both as message_id and in headers")
            message_id = _check_message_id(message_id)
        if date is not None:
            if "date" in extra_names:
                raise MessageError("Date given both as date and in headers")
            if date.tzinfo is None or date.utcoffset() is None:
                raise MessageError("date must be an aware datetime (RFC 5322 §3.3 needs a zone)")
        files = [_attachment(item) for item in attachments]
        related: list[Attachment] = []
        if files and any(item.content_id is not None for item in files):
            related = [item for item in files if item.content_id is not None]
            _check_related([item.content_id for item in related if item.content_id], html)
            files = [item for item in files if item.content_id is None]
        listed: list[tuple[str, str]] = []
        if list_headers is not None:
            if not isinstance(list_headers, ListHeaders):
                raise MessageError(
                    f"list_headers must be a ListHeaders, got {type(list_headers).__name__}"
                )
            _check_no_list_fields(extra)
            listed = list_headers.fields()
        # The fewest bytes the header fields will take (refused over the limit, and a
        # large block goes to the linear folders): worked out only when the fields'
        # plain lengths (an upper bound of that, give or take a few bytes a field)
        # could come near a large block at all, as they never do for a usual message.
        boxes_count = 1 + len(reply_list) + len(to_list) + len(cc_list) + len(bcc_list)
        rough = (
            len(subject or "")
            + sum(len(name) + len(value) for name, value in extra)
            + sum(len(name) + len(value) for name, value in listed)
            + (
                sum(
                    len(display) + len(address.local_part) + len(address.domain)
                    for display, address in (author, *reply_list, *to_list, *cc_list, *bcc_list)
                )
                if boxes_count < 64
                else _BULK_HEAD
            )
        )
        least_header_bytes = 0
        if rough + 16 * (boxes_count + len(extra) + len(listed) + 6) > _BULK_HEAD:
            least_header_bytes = _check_header_estimate(
                [
                    _boxes_estimate("From", [author]),
                    _boxes_estimate("Reply-To", reply_list),
                    _boxes_estimate("To", to_list),
                    _boxes_estimate("Cc", cc_list),
                    _boxes_estimate("Bcc", bcc_list),
                    _text_estimate("Subject", subject),
                    *(_text_estimate(name, value) for name, value in extra),
                    *(_text_estimate(name, value) for name, value in listed),
                ]
            )

        all_boxes = [author, *to_list, *cc_list, *bcc_list, *reply_list]
        # An address with a non-ASCII local part has no 7-bit spelling, so the
        # message can only be sent with SMTPUTF8: write it in RFC 6532 form.
        utf8 = any(addr.needs_smtputf8 for _, addr in all_boxes)
        recorded: tuple[Address, tuple[Address, ...]] | None = None
        if not any(name == "sender" or name.startswith("resent-") for name in extra_names):
            recorded = (
                author[1],
                tuple(addr for _, addr in (*to_list, *cc_list, *bcc_list)),
            )
        when = date if date is not None else _dt.datetime.now(_dt.UTC)
        if message_id is None and "message-id" not in extra_names:
            message_id = make_msgid(domain=author[1].ascii_domain)[1:-1]
        if not utf8:
            try:
                return cls._build_direct(
                    author=author,
                    reply_list=reply_list,
                    to_list=to_list,
                    cc_list=cc_list,
                    bcc_list=bcc_list,
                    subject=subject,
                    date=None if "date" in extra_names else when,
                    message_id=message_id,
                    listed=listed,
                    extra=extra,
                    text=text,
                    html=html,
                    files=files,
                    related=related,
                    recorded=recorded,
                )
            except _mime.Unsupported:
                pass  # a shape the direct writer leaves to the email package
        policy = email.policy.SMTPUTF8 if utf8 else email.policy.SMTP.clone(cte_type="7bit")
        # The list fields, and long values (see _LONG_TEXT), are set as raw text
        # (set_raw), already folded; "none" keeps the package from refolding a line
        # a long URI or word makes longer than 78 characters. It changes nothing
        # else: every other field is a header object.
        policy = policy.clone(refold_source="none")

        root = MIMEPart(policy=policy)
        try:
            # A large header block is written by mailrelay's own linear folders
            # throughout: the package's costs some 10 µs a character even for short
            # fields (1 MB of them, 30 s).
            bulk = least_header_bytes > _BULK_HEAD
            _set_addresses(root, "From", [author], utf8, bulk)
            _set_addresses(root, "Reply-To", reply_list, utf8, bulk)
            _set_addresses(root, "To", to_list, utf8, bulk)
            _set_addresses(root, "Cc", cc_list, utf8, bulk)
            _set_addresses(root, "Bcc", bcc_list, utf8, bulk)
            if subject is not None:
                _set_text(root, "Subject", subject, bulk)
            if "date" not in extra_names:
                root["Date"] = format_datetime(when)
            if message_id is not None:
                root["Message-ID"] = f"<{message_id}>"
            for name, value in listed:
                root.set_raw(name, value)
            for name, value in extra:
                if name.lower() in STRUCTURED_EXTRA:
                    root[name] = value  # (bounded, all together: MAX_STRUCTURED_CHARS)
                else:
                    _set_text(root, name, value, bulk)
            root["MIME-Version"] = "1.0"
            page = root  # the part holding the HTML
            if text is not None and html is not None:
                root.set_content(text)
                root.add_alternative(html, subtype="html")
                if related:
                    *_, page = root.iter_parts()  # (text, html)
            elif html is not None:
                root.set_content(html, subtype="html")
            elif text is not None or not files:
                root.set_content(text or "")
            if related:
                _add_related(page, related)
            embedded: list[tuple[bytes, bytes]] = []
            for item in files:
                content_type = item.resolved_content_type()
                maintype, _, subtype = content_type.partition("/")
                if content_type.lower() in _mime.UNENCODED_TYPES:
                    embedded.append(_add_embedded(root, item, maintype, subtype))
                    continue
                root.add_attachment(
                    item.data, maintype=maintype, subtype=subtype, filename=item.filename
                )
            wire = root.as_bytes(policy=policy)
            if embedded:
                wire = _splice(root, wire, embedded)
        except (ValueError, TypeError, UnicodeError, email.errors.MessageError) as exc:
            raise MessageError(f"cannot build the message: {exc}") from exc
        _check_written_head(wire[: wire.find(b"\r\n\r\n") + 4])
        return cls._parse(wire, bcc=tuple(addr for _, addr in bcc_list), recorded=recorded)

    @classmethod
    def _build_direct(
        cls,
        *,
        author: tuple[str, Address],
        reply_list: list[tuple[str, Address]],
        to_list: list[tuple[str, Address]],
        cc_list: list[tuple[str, Address]],
        bcc_list: list[tuple[str, Address]],
        subject: str | None,
        date: _dt.datetime | None,
        message_id: str | None,
        listed: list[tuple[str, str]],
        extra: list[tuple[str, str]],
        text: str | None,
        html: str | None,
        files: list[Attachment],
        related: list[Attachment],
        recorded: tuple[Address, tuple[Address, ...]] | None,
    ) -> Message:
        """Write a 7-bit message without the email package (see :mod:`mailrelay._mime`).

        Produces the fields in the same order, and text that reads back the
        same, as the general path in :meth:`build`.

        Raises:
            _mime.Unsupported: the general path must write this message.
        """
        # (field line, on the wire?) in the general path's order.
        lines: list[tuple[str, bool]] = [(_mime.address_list("From", [_spec(author)]), True)]
        if reply_list:
            lines.append((_mime.address_list("Reply-To", [_spec(b) for b in reply_list]), True))
        if to_list:
            lines.append((_mime.address_list("To", [_spec(b) for b in to_list]), True))
        if cc_list:
            lines.append((_mime.address_list("Cc", [_spec(b) for b in cc_list]), True))
        if bcc_list:
            lines.append((_mime.address_list("Bcc", [_spec(b) for b in bcc_list]), False))
        if subject is not None:
            lines.append((_mime.unstructured("Subject", subject), True))
        if date is not None:
            offset = date.utcoffset()
            if offset is None or offset.seconds % 60 or offset.microseconds:
                # The email package rounds such zones its own way.
                raise _mime.Unsupported("a zone offset in seconds")
            lines.append(("Date: " + format_datetime(date), True))
        if message_id is not None:
            lines.append((f"Message-ID: <{message_id}>", True))
        # Written and folded by ListHeaders.fields, the same text the general path sets.
        lines += [(f"{name}: {value}", True) for name, value in listed]
        for name, value in extra:
            if name.lower() in STRUCTURED_EXTRA:
                raise _mime.Unsupported("a structured custom field")
            lines.append((_mime.unstructured(name, value), True))
        content_head, body = _mime.write_body(
            text,
            html,
            [(item.filename, item.data, item.resolved_content_type()) for item in files],
            [
                (item.filename, item.data, item.resolved_content_type(), item.content_id)
                for item in related
                if item.content_id is not None
            ],
        )
        fields: list[tuple[str, str]] = []
        wire_lines: list[str] = []
        for line, on_wire in lines:
            name, _, value = line.partition(":")
            fields.append((name, value.replace("\r\n", "").strip(" \t")))
            if on_wire:
                wire_lines.append(line)
        for line in content_head.split("\r\n"):
            if line[:1] == " ":
                # A folded Content-Type (a multipart/related's): unfolded, RFC 5322 §2.2.3.
                name, value = fields[-1]
                fields[-1] = (name, value + line.rstrip(" \t"))
                continue
            name, _, value = line.partition(":")
            fields.append((name, value.strip(" \t")))
        wire_lines.append(content_head)
        wire_lines.append("\r\n")
        try:
            head = "\r\n".join(wire_lines).encode("ascii")
        except UnicodeEncodeError as exc:  # pragma: no cover - every piece is checked
            raise _mime.Unsupported("non-ASCII header text") from exc
        # The limit counts Bcc fields, as the general path's does (it parses its output
        # with them); every line here is at most 998 characters already (the writers
        # in _mime refuse longer ones).
        blind = sum(len(line) + 2 for line, on_wire in lines if not on_wire)
        if len(head) + blind > MAX_HEADER_BYTES:
            largest = max(lines, key=lambda item: len(item[0]))[0]
            _refuse_head(len(head) + blind, largest.partition(":")[0], len(largest) + 2)
        wire = head + body
        message = cls(
            headers=tuple(fields),
            bcc=tuple(addr for _, addr in bcc_list),
            size=len(wire),
            needs_8bitmime=False,
            needs_smtputf8=False,
            wire=wire,
            envelope_addresses=recorded,
        )
        if message_id is not None:
            # The Message-ID field written above holds exactly ``<message_id>`` (checked
            # id-left@id-right, no white space), so the header scan of message_id would
            # find this value: keep it instead of scanning for every message sent.
            object.__setattr__(message, "_message_id", message_id)
        return message

    @classmethod
    def from_bytes(cls, raw: bytes) -> Message:
        """Take a complete message as bytes (any line endings).

        The bytes pass through unchanged except for CRLF normalization and the
        removal of ``Bcc``/``Resent-Bcc`` fields.

        Args:
            raw: the message, header block first.

        Returns:
            The message.

        Raises:
            MessageError: empty input, or a header block over
                :data:`MAX_HEADER_BYTES`.
            InvalidAddress: a ``Bcc`` field holding an unusable address.
        """
        return cls._parse(bytes(raw), bcc=None, recorded=None)

    @classmethod
    def from_email(cls, message: _StdlibMessage | Message) -> Message:
        """Take a message from the standard library's :mod:`email` package.

        Args:
            message: an :class:`email.message.EmailMessage` (or legacy
                :class:`email.message.Message`); a :class:`Message` is returned as
                it is.

        Returns:
            The message, serialized with the message's own policy and CRLF line
            endings; header fields the email package parsed from source are
            written as they were read, not refolded.

        Raises:
            MessageError: the email package cannot serialize the message.
            InvalidAddress: a ``Bcc`` field holding an unusable address.
        """
        if isinstance(message, Message):
            return message
        policy = message.policy.clone(linesep="\r\n")
        if isinstance(policy, email.policy.EmailPolicy):
            # Parsed fields go out as they were read, as from_bytes sends them: refolding
            # them ("long", the default) takes time quadratic in a field's length (a
            # 160 KB field of 8-bit words took 9 s), and turned a long 8-bit field, but not
            # a short one, into encoded-words.
            policy = policy.clone(refold_source="none")
        try:
            # as_bytes() serializes with mangle_from_=False: no ">From " lines.
            wire = message.as_bytes(policy=policy)
        except (ValueError, TypeError, UnicodeError, email.errors.MessageError) as exc:
            raise MessageError(f"cannot serialize the message: {exc}") from exc
        return cls._parse(wire, bcc=None, recorded=None)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Message:
        """Take a message stored in a file, without loading its body.

        Only the header block is read into memory. The body is measured in one
        streaming pass now and read again, piece by piece, by each call to
        :meth:`chunks`; the file must not change in between (if it does,
        :meth:`chunks` raises :class:`MessageError`).

        Args:
            path: the file, in any line-ending convention.

        Returns:
            The message.

        Raises:
            OSError: the file cannot be read.
            MessageError: an empty file, or a header block over
                :data:`MAX_HEADER_BYTES`.
            InvalidAddress: a ``Bcc`` field holding an unusable address.
        """
        file_path = Path(path)
        with file_path.open("rb") as stream:
            stat = os.fstat(stream.fileno())
            buffer = b""
            scanned = 0  # each read's scan resumes here: linear in the header block's size
            while True:
                data = stream.read(_wire.READ_SIZE)
                buffer += data
                head_end, scanned = _wire.scan_head(buffer, final=not data, start=scanned)
                if head_end is not None:
                    break
                if len(buffer) > MAX_HEADER_BYTES:
                    raise MessageError(f"header block longer than {MAX_HEADER_BYTES} bytes")
            if not buffer:
                raise MessageError("empty message")
            head = _wire.normalize(buffer[:head_end])
            stream.seek(head_end)
            body_size = 0
            eight_bit = False
            normalizer = _wire.Normalizer()
            while data := stream.read(_wire.READ_SIZE):
                piece = normalizer.feed(data)
                body_size += len(piece)
                eight_bit = eight_bit or not piece.isascii()
            body_size += len(normalizer.flush())
        fields, wire_head = _wire.split_head(head)
        return cls(
            headers=fields,
            bcc=_blind_addresses(fields),
            size=len(wire_head) + body_size,
            needs_8bitmime=eight_bit,
            needs_smtputf8=not wire_head.isascii(),
            wire=wire_head,
            path=file_path,
            body_offset=head_end,
            file_size=stat.st_size,
            file_mtime_ns=stat.st_mtime_ns,
        )

    @classmethod
    def _parse(
        cls,
        raw: bytes,
        *,
        bcc: tuple[Address, ...] | None,
        recorded: tuple[Address, tuple[Address, ...]] | None,
    ) -> Message:
        if not raw:
            raise MessageError("empty message")
        head_end = _wire.find_head_end(raw, final=True)
        assert head_end is not None  # always found once the input is final
        if head_end > MAX_HEADER_BYTES:
            raise MessageError(f"header block longer than {MAX_HEADER_BYTES} bytes")
        fields, wire_head = _wire.split_head(_wire.normalize(raw[:head_end]))
        body = _wire.normalize(raw[head_end:])
        return cls(
            headers=fields,
            bcc=_blind_addresses(fields) if bcc is None else bcc,
            size=len(wire_head) + len(body),
            needs_8bitmime=not body.isascii(),
            needs_smtputf8=not wire_head.isascii(),
            wire=wire_head + body,
            envelope_addresses=recorded,
        )

    # -- header access ------------------------------------------------------

    def get_all(self, name: str) -> list[str]:
        """Return the values of every field called ``name`` (any case), in order.

        Values are unfolded and stripped; ``Bcc`` fields are included.
        """
        key = name.lower()
        return [value for field, value in self.headers if field.lower() == key]

    def get(self, name: str) -> str | None:
        """Return the value of the first field called ``name``, or ``None``."""
        values = self.get_all(name)
        return values[0] if values else None

    def get_addresses(self, name: str) -> tuple[Address, ...]:
        """Return the addresses in every field called ``name``, in order.

        Group syntax is understood (``undisclosed-recipients:;`` holds none);
        display names are dropped.

        Raises:
            InvalidAddress: a mailbox in those fields is not a usable envelope
                address.
        """
        return _addresses_in(self.get_all(name))

    @property
    def message_id(self) -> str | None:
        """The Message-ID without its angle brackets, or ``None``."""
        known = self._message_id
        if known is not _UNKNOWN:
            return known
        value = self.get("Message-ID")
        found: str | None = None
        if value is not None:
            match = _BRACKETED.search(value)
            if match:
                found = match.group(1).strip() or None
            else:
                # No bracketed id (an unclosed "<" in a malformed field): the last text
                # between stray angle brackets, so the id is never returned with one.
                pieces = [piece.strip() for piece in _ANGLE.split(value)]
                found = next((piece for piece in reversed(pieces) if piece), None)
        object.__setattr__(self, "_message_id", found)
        return found

    # -- wire form ----------------------------------------------------------

    def chunks(self, size: int = 65536) -> Iterator[bytes]:
        """Yield the wire bytes in pieces of at most ``size`` bytes.

        The bytes are CRLF-normalized and carry no ``Bcc`` field. No piece ends
        between the CR and the LF of a line ending, so every piece is itself
        free of bare CR and LF; the pieces joined equal :meth:`as_bytes` and
        their lengths add up to :attr:`size`. For a message from
        :meth:`from_file` the body is read from the file as the pieces are
        consumed.

        Args:
            size: the largest piece, at least 2 (room for one CRLF).

        Raises:
            ValueError: ``size`` below 2.
            MessageError: a file-backed message whose file changed.
            OSError: a file-backed message whose file can no longer be read.
        """
        if size < 2:
            raise ValueError("chunk size must be at least 2")
        if self._path is None:
            wire = self._wire
            if wire and len(wire) <= size:
                # What _wire.slices yields then (the one bytes object), without a generator:
                # the common case, once for every message sent or stored.
                return iter((wire,))
            return _wire.slices(wire, size)
        return self._file_chunks(size)

    def as_bytes(self) -> bytes:
        """Return the whole wire form (for a file-backed message, this reads the
        whole file into memory; prefer :meth:`chunks`)."""
        if self._path is None:
            return self._wire
        return b"".join(self._file_chunks(_wire.READ_SIZE))

    def _file_chunks(self, size: int) -> Iterator[bytes]:
        assert self._path is not None
        with self._path.open("rb") as stream:
            stat = os.fstat(stream.fileno())
            if (stat.st_size, stat.st_mtime_ns) != (self._file_size, self._file_mtime_ns):
                raise MessageError(f"{self._path} changed since the message was read")
            stream.seek(self._body_offset)
            total = 0
            for piece in _wire.rechunk(self._file_pieces(stream, size), size):
                total += len(piece)
                yield piece
        if total != self.size:
            raise MessageError(f"{self._path} changed while it was being read")

    def _file_pieces(self, stream: io.BufferedReader, size: int) -> Iterator[bytes]:
        yield self._wire
        normalizer = _wire.Normalizer()
        read_size = max(size, 4096)
        while data := stream.read(read_size):
            yield normalizer.feed(data)
        yield normalizer.flush()

    def __repr__(self) -> str:
        source = f" file={str(self._path)!r}" if self._path is not None else ""
        return f"<Message message_id={self.message_id!r} size={self.size}{source}>"


# -- header addresses ---------------------------------------------------------


def _blind_addresses(fields: tuple[tuple[str, str], ...]) -> tuple[Address, ...]:
    return _addresses_in([value for name, value in fields if name.lower() == "bcc"])


def _addresses_in(values: Iterable[str]) -> tuple[Address, ...]:
    found: list[Address] = []
    for value in values:
        simple = _simple_addresses(value)
        if simple is not None:
            found += map(Address.parse, simple)
            continue
        found += map(Address.parse, _parsed_addr_specs(value))
    return tuple(found)


def _parsed_addr_specs(value: str) -> list[str]:
    """Return the addr-specs of an address list, read by the email package."""
    # Its RFC 5322 parser copes with groups, comments and quoted display names; only
    # the addr-spec is kept. It is given one mailbox at a time, of bounded length: it
    # copies the rest of its input at every token it reads, so a whole field of n
    # characters would take time quadratic in n (a 20 KB field of dots took 3 s).
    specs: list[str] = []
    for item in _list_items(value):
        if not item.strip(" \t"):
            continue  # an empty item, or a group's empty member list
        text = item if len(item) <= MAX_MAILBOX_CHARS else _angle_addr(item)
        try:
            header = _ADDRESS_PARSER("to", text)
        except (IndexError, AttributeError, ValueError, RecursionError) as exc:
            # Its parser has bugs on malformed lists (IndexError on an unclosed "<",
            # AttributeError when a mailbox follows a group, RecursionError on deeply
            # nested comments): a field it cannot read holds no usable address.
            raise InvalidAddress(f"cannot read the address {_excerpt(item)}", address=item) from exc
        assert isinstance(header, email.headerregistry.AddressHeader)
        # Written from the parts, not taken from addr_spec: the package leaves out the
        # quotes some local parts need ('"john..doe"' comes back as john..doe, which is
        # no address), and its local part is the value inside them (RFC 5322 §3.4.1).
        specs += [
            f"{_render_local(mailbox.username)}@{mailbox.domain}"
            for mailbox in header.addresses
            if mailbox.addr_spec not in ("", "<>")
        ]
    return specs


def _angle_addr(item: str) -> str:
    """The ``<addr-spec>`` that ends a mailbox too long to read whole.

    Only the address is wanted, and a display name has no length limit of its own (a
    folded field can carry a long one, RFC 5322 §2.2.3), so a long ``name <addr>`` is
    read by its angle-addr alone.

    Raises:
        InvalidAddress: the mailbox does not end in one, or that too is too long.
    """
    tail = item.rstrip(" \t\r\n")
    start = tail.rfind("<")
    if not tail.endswith(">") or start < 0 or len(tail) - start > MAX_MAILBOX_CHARS:
        raise InvalidAddress(
            f"an address longer than {MAX_MAILBOX_CHARS} characters: {_excerpt(item)}",
            address=item,
        )
    return tail[start:]


# RFC 5322 §3.2: the characters that enclose (quoted strings, comments, domain
# literals, angle brackets), escape, or separate (",", and ":" ";" around a group's
# members) the items of an address list.
_LIST_SPECIAL = re.compile(r'[\\"()\[\]<>,:;]')


def _list_items(value: str) -> list[str]:
    """Split an address list into its mailboxes, in one linear pass.

    RFC 5322 §3.4: items are separated by commas; a group (``name: a, b;``) holds
    its members between its colon and semicolon, and its name is dropped here (only
    addresses are wanted). Separators inside a quoted string, a (nested) comment, a
    domain literal or angle brackets (an obsolete route, ``<@a,@b:x@y>``) do not
    count, nor does a character escaped with a backslash (RFC 5322 §3.2.1).
    """
    items: list[str] = []
    start = 0
    quoted = literal = angle = False
    depth = 0  # of comments, which nest (RFC 5322 §3.2.2)
    skip_to = 0
    for match in _LIST_SPECIAL.finditer(value):
        pos = match.start()
        if pos < skip_to:
            continue  # the character after a backslash
        char = match.group()
        if char == "\\":
            if quoted or depth or literal:
                skip_to = pos + 2
        elif quoted:
            quoted = char != '"'
        elif depth:
            if char == "(":
                depth += 1
            elif char == ")":
                depth -= 1
        elif literal:
            literal = char != "]"
        elif char == '"':
            quoted = True
        elif char == "(":
            depth = 1
        elif char == "[":
            literal = True
        elif char in "<>":
            angle = char == "<"
        elif angle:
            continue
        elif char == ":":
            start = pos + 1
        elif char in ",;":
            items.append(value[start:pos])
            start = pos + 1
    items.append(value[start:])
    return items


def _excerpt(value: str, limit: int = 60) -> str:
    """``value`` for an error message: quoted, and cut short when long."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + "..."


# The common address-list shapes, read without the email package's parser:
# "a@b.example" and "Name <a@b.example>" separated by commas. The display name
# may hold no character that changes how the list splits or where the address
# is (quotes, comments, group syntax, escapes, brackets, "@", ",") and the
# addr-spec must be a plain ASCII dot-atom (RFC 5322 §3.4.1); anything else goes
# to the general parser.
_DOT_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
_SIMPLE_SPEC = _DOT_ATOM + "@" + _DOT_ATOM
_SIMPLE_NAME = r"[^\x00-\x1f\x7f\"()<>\[\]:;@\\,]*"
_SIMPLE_MAILBOX = re.compile(rf"[ \t]*(?:({_SIMPLE_SPEC})|{_SIMPLE_NAME}<({_SIMPLE_SPEC})>)[ \t]*")


def _simple_addresses(value: str) -> list[str] | None:
    """Return the addr-specs of a simple address list, or ``None`` if it is not one."""
    if "=?" in value:
        # An RFC 2047 encoded-word: the email package decodes it, even where RFC 2047 §5
        # does not allow one (inside an addr-spec); leave such lists to it so both readers
        # always agree.
        return None
    specs: list[str] = []
    for item in value.split(","):
        match = _SIMPLE_MAILBOX.fullmatch(item)
        if match is None or len(item) > MAX_MAILBOX_CHARS:
            return None  # (the general reader refuses an over-long mailbox)
        specs.append(match.group(1) or match.group(2))
    return specs


# -- build helpers (the others are in mailrelay._buildargs) -------------------


def _least_chars(text: str) -> int:
    """The fewest characters ``text`` can take in a header field: a writer may fold or
    collapse its white space, but writes every other character as one or more."""
    if text.isascii() and text.isprintable():
        # The common case, in C: the only white space printable ASCII holds is " ".
        return len(text) - text.count(" ")
    return len(text) - len(_WHITE_SPACE.findall(text))


_WHITE_SPACE = re.compile(r"\s")


def _boxes_estimate(name: str, boxes: list[tuple[str, Address]]) -> tuple[str, int]:
    """``(name, the fewest bytes an address field holding boxes can take)``."""
    if not boxes:
        return name, 0
    text = sum(
        _least_chars(display) + len(address.local_part) + 1 + len(address.domain)
        for display, address in boxes
    )
    # "name: " and CRLF; ", " between mailboxes.
    return name, len(name) + 4 + text + 2 * (len(boxes) - 1)


def _text_estimate(name: str, value: str | None) -> tuple[str, int]:
    """``(name, the fewest bytes a field holding value can take)``."""
    if value is None:
        return name, 0
    return name, len(name) + 4 + _least_chars(value)


def _check_header_estimate(estimates: list[tuple[str, int]]) -> int:
    """Refuse, before anything is written, a header block sure to pass the limit;
    return the fewest bytes the header fields will take.

    Raises:
        MessageError: the fields' least sizes add up to over :data:`MAX_HEADER_BYTES`.
    """
    total = sum(size for _, size in estimates)
    if total > MAX_HEADER_BYTES:
        name, size = max(estimates, key=lambda item: item[1])
        _refuse_head(total, name, size, at_least=True)
    return total


def _refuse_head(total: int, name: str, size: int, *, at_least: bool = False) -> None:
    bound = "at least " if at_least else ""
    raise MessageError(
        f"the header block would be {bound}{total} bytes, over MAX_HEADER_BYTES "
        f"({MAX_HEADER_BYTES} bytes), the most Message.from_bytes reads back; "
        f"the largest field, {name}, takes {bound}{size}"
    )


def _check_written_head(head: bytes) -> None:
    """The general path's header block, checked as :meth:`Message.from_bytes` will.

    Raises:
        MessageError: a block over :data:`MAX_HEADER_BYTES` (Bcc fields included, as
            written), or a line over 998 characters (RFC 5322 §2.1.1).
    """
    lines = head.split(b"\r\n")
    if len(head) <= MAX_HEADER_BYTES and max(map(len, lines)) <= MAX_LINE_CHARS:
        return
    sizes: dict[str, int] = {}
    field = ""
    for line in lines:
        if line[:1] not in (b" ", b"\t"):
            field = line.partition(b":")[0].decode("ascii", "replace")
        sizes[field] = sizes.get(field, 0) + len(line) + 2
        if len(line) > MAX_LINE_CHARS:
            raise MessageError(
                f"{field}: a header line of {len(line)} characters, over the "
                f"{MAX_LINE_CHARS} RFC 5322 §2.1.1 allows"
            )
    name, size = max(sizes.items(), key=lambda item: item[1])
    _refuse_head(len(head), name, size)


def _set_text(root: MIMEPart, name: str, value: str, bulk: bool) -> None:
    """Set an unstructured field in the general path: a long value folded by
    :func:`mailrelay._mime.long_unstructured` (linear), a short one by the package."""
    if len(value) <= _LONG_TEXT and not bulk:
        root[name] = value
    else:
        root.set_raw(name, _mime.long_unstructured(name, value))


def _set_addresses(
    root: MIMEPart, name: str, boxes: list[tuple[str, Address]], utf8: bool, bulk: bool
) -> None:
    """Set an address field in the general path: a list of more than
    :data:`_LONG_TEXT` characters written by :func:`mailrelay._mime.long_address_list`
    (linear), a shorter one by the package."""
    if not boxes:
        return
    size = sum(len(box[0]) + len(box[1].local_part) + len(box[1].domain) + 4 for box in boxes)
    if size <= _LONG_TEXT and not bulk:
        root[name] = _header_addresses(boxes, utf8)
    else:
        specs = [(display, address.smtp_path(utf8)) for display, address in boxes]
        root.set_raw(name, _mime.long_address_list(name, specs))


def _add_related(page: MIMEPart, related: list[Attachment]) -> None:
    """Make ``page``, the HTML part, a ``multipart/related`` holding the HTML and then
    the inline parts (the general path's form of :func:`mailrelay._mime.write_body`)."""
    page.make_related()
    for item in related:
        maintype, _, subtype = item.resolved_content_type().partition("/")
        part = MIMEPart(policy=page.policy)
        part.set_content(
            item.data,
            maintype=maintype,
            subtype=subtype,
            disposition="inline",
            filename=item.filename,
        )
        # Raw, on one line: the package would fold a long id into encoded-words, which
        # no cid: URL matches (RFC 2392).
        part.set_raw("Content-ID", f"<{item.content_id}>")
        page.attach(part)
    # RFC 2387 §3.1: the type of the root, the HTML, which is first (§3.2).
    page.set_param("type", "text/html")


def _add_embedded(
    root: MIMEPart, item: Attachment, maintype: str, subtype: str
) -> tuple[bytes, bytes]:
    """Attach ``item``, a whole message (or another :data:`~mailrelay._mime.UNENCODED_TYPES`
    body), unencoded (RFC 2046 §5.2.1): the email package would write it base64, or fail
    on 8-bit data, so the part holds a random placeholder that :func:`_splice` replaces.
    Returns (placeholder, body)."""
    embedded = _mime.embedded_body(item.data)
    if embedded is None:  # pragma: no cover - Attachment refuses such data
        raise MessageError(f"attachment {item.filename!r} cannot go unencoded")
    body, encoding = embedded
    placeholder = f"mailrelay-embedded-{secrets.token_hex(16)}"
    root.add_attachment(
        placeholder.encode("ascii"),
        maintype=maintype,
        subtype=subtype,
        filename=item.filename,
        cte="7bit",
    )
    *_, part = root.iter_parts()
    part.replace_header("Content-Transfer-Encoding", encoding)
    # The package writes CRLF and the next delimiter right after the placeholder (RFC
    # 2046 §5.1.1: that CRLF is the delimiter's), so the body keeps its own last line
    # break, as the direct writer writes it.
    return placeholder.encode("ascii"), body


def _splice(root: MIMEPart, wire: bytes, embedded: list[tuple[bytes, bytes]]) -> bytes:
    """``wire`` with each placeholder replaced by its body, checked against the message's
    boundaries (RFC 2046 §5.1.1), which were chosen before the bodies were in."""
    delimiters = [
        b"--" + boundary.encode("ascii")
        for part in root.walk()
        if (boundary := part.get_boundary()) is not None
    ]
    for placeholder, body in embedded:
        if any(delimiter in body for delimiter in delimiters):
            raise MessageError("an attached message holds one of this message's boundaries")
        if wire.count(placeholder) != 1:  # pragma: no cover - 128 random bits
            raise MessageError("cannot place an attached message")
        wire = wire.replace(placeholder, body, 1)
    return wire


def _attachment(item: Attachment | tuple[str, bytes] | tuple[str, bytes, str | None]) -> Attachment:
    if isinstance(item, Attachment):
        return item
    if not isinstance(item, tuple) or len(item) not in (2, 3):
        raise MessageError("an attachment is (filename, data) or (filename, data, type)")
    return Attachment(
        filename=item[0], data=item[1], content_type=item[2] if len(item) == 3 else None
    )
