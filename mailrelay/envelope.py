"""Envelopes: who sends a message to whom, and what the server should report.

An :class:`Envelope` is the SMTP envelope (RFC 5321 §2.3.1): the reverse-path
for ``MAIL FROM``, the forward-paths for ``RCPT TO``, and the DSN requests of
RFC 3461 that ride on them as parameters. It knows nothing of sockets; the
protocol layer asks it for ready-encoded parameters
(:meth:`Envelope.mail_parameters`, :meth:`Recipient.rcpt_parameters`).

Rules this module keeps:

* ``sender=None`` (or ``""``) is the null reverse-path ``<>`` (RFC 5321 §4.5.5).
* At least one recipient; repeated recipients (equal :class:`Address`) are
  dropped, the first occurrence kept, order otherwise unchanged.
* ``NOTIFY=NEVER`` excludes every other NOTIFY value (RFC 3461 §4.1). The
  envelope's ``notify`` is the default for recipients without their own; it is
  applied at construction, so each :class:`Recipient` in
  :attr:`Envelope.recipients` carries its final value.
* ENVID is printable US-ASCII, at most 100 characters *after* xtext encoding
  (RFC 3461 §4.4; counting the encoded form keeps within every reading of the
  limit), and goes on the wire xtext-encoded.
* ORCPT (RFC 3461 §4.2) is ``rfc822;`` + xtext for an ASCII address (A-label
  domain), and ``utf-8;`` + utf-8-addr-xtext (RFC 6533 §3) when the address has
  a non-ASCII local part, or is non-ASCII at all in an SMTPUTF8 session. The
  utf-8-addr-xtext form is 7-bit, so it is safe with or without SMTPUTF8. The
  whole parameter holds at most 500 characters (RFC 3461 §4.2), which only the
  utf-8 form can pass (each non-ASCII character takes 8): then an address with
  an ASCII local part goes in the ``rfc822;`` form (its domain as A-labels, the
  same address), and one that has no such form is left out (ORCPT is only
  reported back in DSNs; an over-long one may get the recipient refused).
* Parameters come out in one stable order: SIZE, BODY, SMTPUTF8, RET, ENVID,
  REQUIRETLS for ``MAIL``; NOTIFY, ORCPT for ``RCPT``.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from typing import TypeAlias

import attrs

from mailrelay._slots import new_instance, slot_setters
from mailrelay.address import Address
from mailrelay.errors import MessageError
from mailrelay.message import Message, _addresses_in

__all__ = [
    "Envelope",
    "Notify",
    "Parameters",
    "Recipient",
    "Ret",
    "utf8_addr_xtext_decode",
    "utf8_addr_xtext_encode",
    "xtext_decode",
    "xtext_encode",
]

#: ESMTP parameters as ``(keyword, value)`` pairs; ``None`` for a keyword
#: without a value (``SMTPUTF8``, ``REQUIRETLS``).
Parameters: TypeAlias = tuple[tuple[str, str | None], ...]

#: RFC 3461 §4.4: the ENVID parameter holds at most 100 characters.
MAX_ENVID = 100
#: RFC 3461 §4.2: "The entire ORCPT parameter MAY be up to 500 characters in length."
MAX_ORCPT = 500

_BODY_TYPES = ("7BIT", "8BITMIME", "BINARYMIME")
_XTEXT_HEXCHAR = re.compile(r"\+([0-9A-Fa-f]{2})")
_UTF8_ADDR_ESCAPE = re.compile(r"\\x\{([0-9A-Fa-f]{2,6})\}")


class Ret(enum.Enum):
    """What a failure DSN should return of the message (RFC 3461 §4.3)."""

    #: the whole message
    FULL = "FULL"
    #: the header block only
    HDRS = "HDRS"


class Notify(enum.Enum):
    """When a recipient's server should send a DSN (RFC 3461 §4.1)."""

    #: never (excludes every other value)
    NEVER = "NEVER"
    #: on successful delivery
    SUCCESS = "SUCCESS"
    #: on failure
    FAILURE = "FAILURE"
    #: when delivery is delayed
    DELAY = "DELAY"


_NOTIFY_ORDER = (Notify.NEVER, Notify.SUCCESS, Notify.FAILURE, Notify.DELAY)

NotifyLike: TypeAlias = "Notify | str | Iterable[Notify | str] | None"


# -- xtext --------------------------------------------------------------------


def xtext_encode(text: str) -> str:
    """Encode ``text`` as RFC 3461 §4 xtext.

    Characters from ``!`` to ``~`` other than ``+`` and ``=`` stand for
    themselves; every other byte of the UTF-8 encoding becomes ``+XX`` with two
    upper-case hex digits. (RFC 3461 values are US-ASCII; UTF-8 is used only so
    that any ``str`` has an encoding that :func:`xtext_decode` undoes.)
    """
    out: list[str] = []
    for byte in text.encode("utf-8"):
        if 0x21 <= byte <= 0x7E and byte not in (0x2B, 0x3D):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)


def xtext_decode(xtext: str) -> str:
    """Decode RFC 3461 §4 xtext; the inverse of :func:`xtext_encode`.

    Lower-case hex digits are accepted too (some servers write them).

    Raises:
        MessageError: a character outside ``!``..``~``, a ``+`` not followed by
            two hex digits, a bare ``=``, or bytes that are not UTF-8.
    """
    out = bytearray()
    pos = 0
    while pos < len(xtext):
        char = xtext[pos]
        if char == "+":
            match = _XTEXT_HEXCHAR.match(xtext, pos)
            if match is None:
                raise MessageError(f"invalid xtext {xtext!r}: '+' needs two hex digits")
            out.append(int(match.group(1), 16))
            pos = match.end()
            continue
        if not "!" <= char <= "~" or char == "=":
            raise MessageError(f"invalid xtext {xtext!r}: {char!r} must be encoded")
        out.append(ord(char))
        pos += 1
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MessageError(f"xtext {xtext!r} does not decode to UTF-8") from exc


def utf8_addr_xtext_encode(address: str) -> str:
    """Encode an address as RFC 6533 §3 utf-8-addr-xtext.

    Printable ASCII other than ``\\``, ``+`` and ``=`` stands for itself; every
    other character becomes ``\\x{HEX}`` (upper-case hex of the code point, at
    least two digits). The result is 7-bit and valid xtext.
    """
    out: list[str] = []
    for char in address:
        code = ord(char)
        if 0x21 <= code <= 0x7E and char not in "\\+=":
            out.append(char)
        else:
            out.append(f"\\x{{{code:02X}}}")
    return "".join(out)


def utf8_addr_xtext_decode(text: str) -> str:
    """Decode RFC 6533 utf-8-addr-xtext (or -unitext); the inverse of
    :func:`utf8_addr_xtext_encode`.

    Raises:
        MessageError: a malformed ``\\x{...}`` escape or a code point that is
            not a Unicode scalar value.
    """

    def replace(match: re.Match[str]) -> str:
        code = int(match.group(1), 16)
        if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
            raise MessageError(f"invalid code point in {text!r}")
        return chr(code)

    decoded = _UTF8_ADDR_ESCAPE.sub(replace, text)
    if "\\" in _UTF8_ADDR_ESCAPE.sub("", text):
        raise MessageError(f"invalid utf-8-addr-xtext {text!r}: stray backslash")
    return decoded


# -- values -------------------------------------------------------------------


def _address(value: str | Address) -> Address:
    if isinstance(value, Address):
        return value
    return Address.parse(value)


def _optional_address(value: str | Address | None) -> Address | None:
    return None if value is None else _address(value)


def _notify_set(value: NotifyLike) -> frozenset[Notify] | None:
    """Convert NOTIFY input to a set, enforcing RFC 3461 §4.1."""
    if value is None:
        return None
    if isinstance(value, Notify):
        items: list[Notify | str] = [value]
    elif isinstance(value, str):
        items = [part for part in value.split(",") if part.strip()]
    else:
        items = list(value)
    chosen: set[Notify] = set()
    for item in items:
        if isinstance(item, Notify):
            chosen.add(item)
            continue
        try:
            chosen.add(Notify(item.strip().upper()))
        except (ValueError, AttributeError):
            raise MessageError(f"unknown NOTIFY value {item!r}") from None
    if not chosen:
        raise MessageError("NOTIFY needs at least one value (or None for the server's default)")
    # RFC 3461 §4.1: "NEVER" MUST NOT be combined with any other value.
    if Notify.NEVER in chosen and len(chosen) > 1:
        raise MessageError("NOTIFY=NEVER cannot be combined with other values")
    return frozenset(chosen)


def _ret(value: Ret | str | None) -> Ret | None:
    if value is None or isinstance(value, Ret):
        return value
    try:
        return Ret(value.upper())
    except ValueError:
        raise MessageError(f"RET must be FULL or HDRS, not {value!r}") from None


def _check_envid(value: str | None) -> str | None:
    if value is None:
        return None
    # RFC 3461 §4.4: printable (graphic and white space) US-ASCII characters.
    if not value or any(not " " <= char <= "~" for char in value):
        raise MessageError(f"ENVID {value!r} must be non-empty printable US-ASCII")
    if len(xtext_encode(value)) > MAX_ENVID:
        raise MessageError(f"ENVID {value!r} is longer than {MAX_ENVID} characters as xtext")
    return value


@attrs.frozen
class Recipient:
    """One forward-path with its DSN requests.

    Args:
        address: the recipient (``str`` is parsed with :meth:`Address.parse`).
        notify: when to send a DSN for this recipient: a :class:`Notify`, a set
            of them, or text such as ``"SUCCESS,FAILURE"``; ``None`` leaves it
            to the envelope's default, then to the server.
        orcpt: the original recipient (RFC 3461 §4.2) to report in DSNs, e.g.
            the address before forwarding; ``None`` sends no ORCPT.

    Raises:
        InvalidAddress: ``address`` or ``orcpt`` is not a valid address.
        MessageError: an unknown NOTIFY value, or NEVER combined with another.
    """

    address: Address = attrs.field(converter=_address)
    notify: frozenset[Notify] | None = attrs.field(
        default=None, kw_only=True, converter=_notify_set
    )
    orcpt: Address | None = attrs.field(default=None, kw_only=True, converter=_optional_address)

    def rcpt_parameters(self, *, dsn: bool = True, smtputf8: bool = False) -> Parameters:
        """The ``RCPT TO`` parameters, encoded for the wire.

        Args:
            dsn: whether the server offers DSN; without it nothing is sent.
            smtputf8: whether the session uses SMTPUTF8 (chooses the ORCPT form).

        Returns:
            ``NOTIFY`` then ``ORCPT``, each only when set.
        """
        if not dsn:
            return ()
        params: list[tuple[str, str | None]] = []
        if self.notify is not None:
            params.append(("NOTIFY", ",".join(n.value for n in _NOTIFY_ORDER if n in self.notify)))
        if self.orcpt is not None:
            value = _orcpt_value(self.orcpt, smtputf8)
            if value is not None:
                params.append(("ORCPT", value))
        return tuple(params)


def _orcpt_value(orcpt: Address, smtputf8: bool) -> str | None:
    """The ORCPT value for ``orcpt``, or ``None`` when no form fits RFC 3461's 500
    characters ("ORCPT=" not counted, as for ENVID)."""
    if orcpt.needs_smtputf8 or (smtputf8 and not str(orcpt).isascii()):
        # RFC 6533 §3: "utf-8" addr-type with utf-8-addr-xtext, 7-bit safe.
        value = "utf-8;" + utf8_addr_xtext_encode(str(orcpt))
        if len(value) <= MAX_ORCPT:
            return value
        if orcpt.needs_smtputf8:
            return None  # a non-ASCII local part has no rfc822 form
    # RFC 3461 §4.2: "rfc822" addr-type, xtext; A-labels keep it ASCII (at most 7 + 64 * 3
    # + 1 + 253 characters, within the limit).
    return "rfc822;" + xtext_encode(orcpt.smtp_path(False))


RecipientLike: TypeAlias = "str | Address | Recipient"


@attrs.frozen(init=False)
class Envelope:
    """The SMTP envelope of one delivery.

    Args:
        sender: the reverse-path; ``None`` or ``""`` is the null reverse-path
            ``<>`` (for bounces and other automatic replies).
        recipients: the forward-paths, as text, :class:`Address` or
            :class:`Recipient` (a single one may be passed bare). Repeats are
            dropped, the first kept.
        ret: RET for a failure DSN (RFC 3461 §4.3), :class:`Ret` or its name.
        envid: the envelope identifier echoed in DSNs (RFC 3461 §4.4).
        notify: the NOTIFY default for recipients that have none of their own.
        requiretls: ask for REQUIRETLS (RFC 8689): every hop must use TLS.

    Raises:
        MessageError: no recipients, a bad NOTIFY, RET or ENVID.
        InvalidAddress: an invalid sender or recipient address.
    """

    #: the reverse-path; ``None`` for ``<>``
    sender: Address | None
    #: the forward-paths, each with its final NOTIFY and ORCPT
    recipients: tuple[Recipient, ...]
    #: RET parameter, or ``None``
    ret: Ret | None
    #: ENVID parameter (decoded), or ``None``
    envid: str | None
    #: the NOTIFY default given at construction
    notify: frozenset[Notify] | None
    #: whether REQUIRETLS is requested
    requiretls: bool

    def __init__(
        self,
        sender: str | Address | None,
        recipients: RecipientLike | Iterable[RecipientLike],
        *,
        ret: Ret | str | None = None,
        envid: str | None = None,
        notify: NotifyLike = None,
        requiretls: bool = False,
    ) -> None:
        default_notify = _notify_set(notify)
        if isinstance(recipients, str | Address | Recipient):
            recipients = [recipients]
        chosen: list[Recipient] = []
        seen: set[Address] = set()
        for item in recipients:
            if isinstance(item, Address):
                # Recipient(item, notify=default_notify), without its converters' calls.
                if item in seen:
                    continue
                seen.add(item)
                chosen.append(_new_recipient(item, default_notify))
                continue
            recipient = item if isinstance(item, Recipient) else Recipient(item)
            if recipient.address in seen:
                continue
            seen.add(recipient.address)
            if recipient.notify is None and default_notify is not None:
                recipient = attrs.evolve(recipient, notify=default_notify)
            chosen.append(recipient)
        if not chosen:
            raise MessageError("an envelope needs at least one recipient")
        self.__attrs_init__(
            sender=None if sender is None or sender == "" else _address(sender),
            recipients=tuple(chosen),
            ret=_ret(ret),
            envid=_check_envid(envid),
            notify=default_notify,
            requiretls=bool(requiretls),
        )

    @classmethod
    def from_message(cls, message: Message) -> Envelope:
        """Derive the envelope from a message's header fields.

        Without ``Resent-*`` fields: the sender is the first address of
        ``Sender``, else of ``From``; the recipients are ``To``, ``Cc`` and
        ``Bcc`` (including :attr:`Message.bcc`). With them, the most recent
        resent block (the topmost run of ``Resent-*`` fields, RFC 5322 §3.6.6)
        is used instead: ``Resent-Sender`` else ``Resent-From``, and
        ``Resent-To``, ``Resent-Cc``, ``Resent-Bcc``.

        A message from :meth:`Message.build` (without custom ``Sender`` or
        ``Resent-*`` fields) answers from the addresses it was given, which are
        the ones those fields hold, without reading header text.

        Raises:
            MessageError: no sender or no recipient in those fields.
            InvalidAddress: an unusable address in those fields.
        """
        recorded = message._envelope_addresses
        if recorded is not None:
            # Built by Message.build without Sender or Resent-* fields: the
            # addresses it was given are the ones its From, To, Cc and Bcc hold.
            sender, given = recorded
            if not given:
                raise MessageError("the message has no recipient address (To, Cc or Bcc)")
            if cls is Envelope:
                return _plain_envelope(sender, given)
            return cls(sender, given)
        fields = message.headers
        block = _latest_resent_block(fields)
        if block:

            def found(name: str) -> tuple[Address, ...]:
                return _addresses_in(value for field, value in block if field.lower() == name)

            senders = found("resent-sender") or found("resent-from")
            recipients = found("resent-to") + found("resent-cc") + found("resent-bcc")
        else:
            senders = message.get_addresses("Sender") or message.get_addresses("From")
            recipients = (
                message.get_addresses("To")
                + message.get_addresses("Cc")
                + message.get_addresses("Bcc")
                + message.bcc
            )
        if not senders:
            raise MessageError("the message has no sender address (Sender or From)")
        if not recipients:
            raise MessageError("the message has no recipient address (To, Cc or Bcc)")
        return cls(senders[0], recipients)

    def subset(self, positions: Iterable[int]) -> Envelope:
        """This envelope for some of its recipients: those at ``positions`` (indexes into
        :attr:`recipients`), in that order, with the same sender, RET, ENVID, NOTIFY
        default and REQUIRETLS, each recipient keeping its own NOTIFY and ORCPT.

        Raises:
            MessageError: no position given.
            IndexError: a position out of range.
        """
        recipients = self.recipients
        return Envelope(
            self.sender,
            [recipients[i] for i in positions],
            ret=self.ret,
            envid=self.envid,
            notify=self.notify,
            requiretls=self.requiretls,
        )

    @property
    def needs_smtputf8(self) -> bool:
        """Whether the sender or any recipient has a non-ASCII local part."""
        if self.sender is not None and self.sender.needs_smtputf8:
            return True
        return any(r.address.needs_smtputf8 for r in self.recipients)

    def mail_parameters(
        self,
        *,
        size: int | None = None,
        body: str | None = None,
        smtputf8: bool = False,
        dsn: bool = True,
        requiretls: bool = True,
    ) -> Parameters:
        """The ``MAIL FROM`` parameters, encoded for the wire.

        Args:
            size: the message size for SIZE (RFC 1870); ``None`` omits it.
            body: ``"7BIT"``, ``"8BITMIME"`` (RFC 6152) or ``"BINARYMIME"``
                (RFC 3030) for BODY; ``None`` omits it.
            smtputf8: add SMTPUTF8 (RFC 6531).
            dsn: whether the server offers DSN; RET and ENVID only then.
            requiretls: whether REQUIRETLS may be sent (the caller has checked
                the server offers it over TLS); sent only if the envelope asks.

        Returns:
            SIZE, BODY, SMTPUTF8, RET, ENVID, REQUIRETLS, each only when it applies.

        Raises:
            ValueError: a negative size or an unknown body type.
        """
        params: list[tuple[str, str | None]] = []
        if size is not None:
            if size < 0:
                raise ValueError(f"SIZE must not be negative: {size}")
            params.append(("SIZE", str(size)))
        if body is not None:
            if body.upper() not in _BODY_TYPES:
                raise ValueError(f"BODY must be one of {', '.join(_BODY_TYPES)}, not {body!r}")
            params.append(("BODY", body.upper()))
        if smtputf8:
            params.append(("SMTPUTF8", None))
        if dsn and self.ret is not None:
            params.append(("RET", self.ret.value))
        if dsn and self.envid is not None:
            params.append(("ENVID", xtext_encode(self.envid)))
        if self.requiretls and requiretls:
            params.append(("REQUIRETLS", None))
        return tuple(params)


# -- Fast builders --------------------------------------------------------------
#
# Every message sent or tracked gets an envelope, most of them from Envelope.from_message
# for a built message, whose addresses are Address values already: the converters and
# checks of the constructors have nothing to do for them. These builders fill the slots
# directly (mailrelay._slots): the same values as the constructors build, which tests hold.

_set_r_address, _set_r_notify, _set_r_orcpt = slot_setters(
    Recipient, ("address", "notify", "orcpt")
)
(
    _set_e_sender,
    _set_e_recipients,
    _set_e_ret,
    _set_e_envid,
    _set_e_notify,
    _set_e_requiretls,
) = slot_setters(Envelope, ("sender", "recipients", "ret", "envid", "notify", "requiretls"))


def _new_recipient(address: Address, notify: frozenset[Notify] | None) -> Recipient:
    """``Recipient(address, notify=notify)`` for an Address and a checked NOTIFY set."""
    recipient: Recipient = new_instance(Recipient)
    _set_r_address(recipient, address)
    _set_r_notify(recipient, notify)
    _set_r_orcpt(recipient, None)
    return recipient


def _plain_envelope(sender: Address, addresses: tuple[Address, ...]) -> Envelope:
    """``Envelope(sender, addresses)`` for Address values, at least one."""
    if len(addresses) == 1:
        recipients: tuple[Recipient, ...] = (_new_recipient(addresses[0], None),)
    else:
        # Repeats dropped, the first kept (dict keys keep their order).
        recipients = tuple([_new_recipient(a, None) for a in dict.fromkeys(addresses)])
    envelope: Envelope = new_instance(Envelope)
    _set_e_sender(envelope, sender)
    _set_e_recipients(envelope, recipients)
    _set_e_ret(envelope, None)
    _set_e_envid(envelope, None)
    _set_e_notify(envelope, None)
    _set_e_requiretls(envelope, False)
    return envelope


def _latest_resent_block(fields: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
    # RFC 5322 §3.6.6: each resend prepends its block, so the topmost run of
    # Resent-* fields is the most recent one.
    block: list[tuple[str, str]] = []
    for name, value in fields:
        if name.lower().startswith("resent-"):
            block.append((name, value))
        elif block:
            break
    return block
