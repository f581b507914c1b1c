"""The commands a client sends, as frozen values that know their own wire form.

Rules:

* Every field is checked when the command is built, so nothing that could
  split a command line ever reaches ``ClientConnection.send``: CR, LF or NUL in
  any text field raises :class:`~mailrelay.errors.LocalProtocolError` (RFC 5321
  §2.3.8 forbids them outside the CRLF that ends a line; a stray CR or LF is
  how command injection happens).
* ``MAIL FROM`` / ``RCPT TO`` parameters follow RFC 5321 §4.1.2: the keyword is
  ``esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")`` and the value
  ``esmtp-value = 1*(%d33-60 / %d62-126)``; RFC 6531 §3.3 adds UTF-8 characters to
  the value when the command is sent with SMTPUTF8. Values arrive already
  encoded (xtext, RFC 3461 §4; utf-8-addr, RFC 6533 §3): see
  :func:`xtext_encode` for callers that need it.
* Message data is not a command line: ``DataChunk`` and ``EndOfData`` are encoded
  by the connection, which keeps the dot-stuffing state across chunks
  (:mod:`mailrelay.protocol.data`); ``Bdat`` carries its octets verbatim
  (RFC 3030 §2: BDAT data is never dot-stuffed or altered).
* Commands may be built positionally as well as by keyword (``Ehlo("mx.example")``),
  matching the signatures agreed in PROTOCOL_API.md.
"""

from __future__ import annotations

import base64
import re
from typing import Any, ClassVar, Final

import attrs

from mailrelay.address import Address
from mailrelay.errors import InvalidAddress, LocalProtocolError

__all__ = [
    "Auth",
    "AuthAbort",
    "AuthContinue",
    "Bdat",
    "Command",
    "Data",
    "DataChunk",
    "Ehlo",
    "EndOfData",
    "Helo",
    "Lhlo",
    "MailFrom",
    "Noop",
    "Parameters",
    "Quit",
    "RcptTo",
    "Rset",
    "StartTLS",
    "Vrfy",
    "xtext_encode",
]

#: ``MAIL``/``RCPT`` parameters: (keyword, value or None) pairs, in sending order.
Parameters = tuple[tuple[str, str | None], ...]

# RFC 5321 §4.1.2 esmtp-keyword.
_KEYWORD: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
# RFC 5321 §4.1.2 esmtp-value: printable ASCII but "=" and space.
_VALUE_ASCII: Final = re.compile(r"[\x21-\x3c\x3e-\x7e]+")
# RFC 6531 §3.3: with SMTPUTF8, esmtp-value also takes UTF8-non-ascii. C1 controls
# are still refused: no MTA wants them and they hide in logs.
_VALUE_UTF8: Final = re.compile(r"[\x21-\x3c\x3e-\x7e\xa0-\U0010ffff]+")
# EHLO/HELO/LHLO argument: a domain or an address literal (RFC 5321 §4.1.1.1, §4.1.3).
# Underscores are tolerated because real hosts are named with them.
_HOSTNAME: Final = re.compile(
    r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?)*"
    r"|\[[\x21-\x5a\x5e-\x7e]+\]"  # RFC 5321 §4.1.3: dcontent excludes "[", "\" and "]"
)
# RFC 4422 §3.1: a SASL mechanism name is 1 to 20 of A-Z, 0-9, "-" and "_".
_MECHANISM: Final = re.compile(r"[A-Za-z0-9_-]{1,20}")
_FORBIDDEN: Final = re.compile(r"[\r\n\x00]")


def _no_line_breaks(what: str, value: str) -> None:
    # RFC 5321 §2.3.8: CR and LF only ever appear together, ending a line.
    if _FORBIDDEN.search(value) is not None:
        raise LocalProtocolError(f"{what} must not contain CR, LF or NUL: {value!r}")


def _check_hostname(instance: Any, attribute: attrs.Attribute[str], value: str) -> None:
    _no_line_breaks(attribute.name, value)
    if _HOSTNAME.fullmatch(value) is None:
        raise LocalProtocolError(
            f"{attribute.name} must be an ASCII domain or an address literal, got {value!r}"
        )


def check_parameters(parameters: Parameters, *, smtputf8: bool) -> None:
    """Check ``MAIL``/``RCPT`` parameters against RFC 5321 §4.1.2 (and RFC 6531 §3.3).

    Raises:
        LocalProtocolError: a keyword or value outside the grammar.
    """
    value_pattern = _VALUE_UTF8 if smtputf8 else _VALUE_ASCII
    for pair in parameters:
        if type(pair) is not tuple or len(pair) != 2:
            raise LocalProtocolError(f"an ESMTP parameter is a (keyword, value) pair: {pair!r}")
        keyword, value = pair
        if not isinstance(keyword, str) or _KEYWORD.fullmatch(keyword) is None:
            raise LocalProtocolError(f"invalid ESMTP parameter keyword {keyword!r}")
        if value is not None and (
            not isinstance(value, str) or value_pattern.fullmatch(value) is None
        ):
            raise LocalProtocolError(f"invalid value for ESMTP parameter {keyword}: {value!r}")


# Parameter tuples already found valid, with their wire text: a dialogue sends the
# same few (SIZE=..., BODY=8BITMIME, NOTIFY=...) over and over. Bounded.
_CHECKED: dict[tuple[Parameters, bool], str] = {}
_CHECKED_SIZE: Final = 512


def _check_parameters(instance: Any, attribute: attrs.Attribute[Parameters], value: Any) -> None:
    key = (value, instance.smtputf8)
    try:
        if key in _CHECKED:
            return
    except TypeError:  # an unhashable value inside: check it the long way (and fail)
        check_parameters(value, smtputf8=instance.smtputf8)
        return
    check_parameters(value, smtputf8=instance.smtputf8)
    if len(_CHECKED) >= _CHECKED_SIZE:
        _CHECKED.clear()
    _CHECKED[key] = "".join(f" {k}" if v is None else f" {k}={v}" for k, v in value)


def _to_parameters(value: Any) -> Any:
    # Tuples pass through untouched (the validator checks their shape); other
    # iterables of pairs become tuples of tuples.
    if type(value) is tuple:
        return value
    return tuple(tuple(pair) for pair in value)


def _encode_parameters(parameters: Parameters, smtputf8: bool) -> str:
    text = _CHECKED.get((parameters, smtputf8))
    if text is None:
        text = "".join(f" {k}" if v is None else f" {k}={v}" for k, v in parameters)
    return text


def _path(address: Address, smtputf8: bool) -> str:
    try:
        return address.smtp_path(smtputf8)
    except InvalidAddress as exc:
        raise LocalProtocolError(str(exc)) from exc


def xtext_encode(text: str) -> str:
    """Encode ``text`` as RFC 3461 §4 xtext (``+XX`` for "+", "=", and non-printables).

    Non-ASCII characters are encoded as the ``+XX`` of each UTF-8 octet.
    """
    out = []
    for byte in text.encode("utf-8"):
        if 33 <= byte <= 126 and byte not in (0x2B, 0x3D):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)


class Command:
    """Base class of every command; ``send()`` accepts only these."""

    __slots__ = ()

    #: The verb, used in error messages and the state tables.
    verb: ClassVar[str] = ""

    def encode(self) -> bytes:
        """The command line, CRLF included."""
        return f"{self.verb}\r\n".encode("ascii")


@attrs.frozen
class Ehlo(Command):
    """``EHLO hostname`` (RFC 5321 §4.1.1.1).

    Attributes:
        hostname: our domain name or address literal (e.g. ``[192.0.2.1]``).
    """

    verb: ClassVar[str] = "EHLO"
    hostname: str = attrs.field(validator=_check_hostname)

    def encode(self) -> bytes:
        """``EHLO <hostname>\\r\\n``."""
        return f"EHLO {self.hostname}\r\n".encode("ascii")


@attrs.frozen
class Helo(Command):
    """``HELO hostname`` (RFC 5321 §4.1.1.1), the fallback when EHLO is refused.

    Attributes:
        hostname: our domain name or address literal.
    """

    verb: ClassVar[str] = "HELO"
    hostname: str = attrs.field(validator=_check_hostname)

    def encode(self) -> bytes:
        """``HELO <hostname>\\r\\n``."""
        return f"HELO {self.hostname}\r\n".encode("ascii")


@attrs.frozen
class Lhlo(Command):
    """``LHLO hostname`` (RFC 2033 §4.1), LMTP's EHLO.

    Attributes:
        hostname: our domain name or address literal.
    """

    verb: ClassVar[str] = "LHLO"
    hostname: str = attrs.field(validator=_check_hostname)

    def encode(self) -> bytes:
        """``LHLO <hostname>\\r\\n``."""
        return f"LHLO {self.hostname}\r\n".encode("ascii")


@attrs.frozen
class StartTLS(Command):
    """``STARTTLS`` (RFC 3207 §4)."""

    verb: ClassVar[str] = "STARTTLS"


@attrs.frozen
class Auth(Command):
    """``AUTH mechanism [initial-response]`` (RFC 4954 §4).

    Attributes:
        mechanism: the SASL mechanism name (sent upper-cased).
        initial_response: raw bytes the connection base64-encodes; ``b""`` is sent
            as ``=`` (RFC 4954 §4: an empty initial response), ``None`` sends none.
    """

    verb: ClassVar[str] = "AUTH"
    mechanism: str = attrs.field()
    initial_response: bytes | None = None

    @mechanism.validator
    def _check_mechanism(self, attribute: attrs.Attribute[str], value: str) -> None:
        _no_line_breaks("mechanism", value)
        if _MECHANISM.fullmatch(value) is None:
            raise LocalProtocolError(f"invalid SASL mechanism name {value!r} (RFC 4422 §3.1)")

    def encode(self) -> bytes:
        """``AUTH <MECH>[ <base64>]\\r\\n``."""
        line = b"AUTH " + self.mechanism.upper().encode("ascii")
        if self.initial_response is not None:
            # RFC 4954 §4: "=" stands for an initial response of zero length.
            line += b" " + (base64.b64encode(self.initial_response) or b"=")
        return line + b"\r\n"

    def __repr__(self) -> str:
        # Initial responses carry credentials: keep them out of logs and tracebacks.
        shown = "None" if self.initial_response is None else "<redacted>"
        return f"Auth(mechanism={self.mechanism!r}, initial_response={shown})"


@attrs.frozen
class AuthContinue(Command):
    """The answer to a ``334`` challenge (RFC 4954 §4): base64 of ``data`` on its own line.

    Attributes:
        data: the raw response bytes (may be empty: an empty line).
    """

    verb: ClassVar[str] = "AUTH-CONTINUE"
    data: bytes

    def encode(self) -> bytes:
        """``<base64>\\r\\n``."""
        return base64.b64encode(self.data) + b"\r\n"

    def __repr__(self) -> str:
        return "AuthContinue(data=<redacted>)"


@attrs.frozen
class AuthAbort(Command):
    """``*``: cancel an AUTH exchange (RFC 4954 §4); the server answers 501."""

    verb: ClassVar[str] = "AUTH-ABORT"

    def encode(self) -> bytes:
        """``*\\r\\n``."""
        return b"*\r\n"


@attrs.frozen
class MailFrom(Command):
    """``MAIL FROM:<reverse-path> [parameters]`` (RFC 5321 §4.1.1.2).

    Attributes:
        sender: the reverse-path; ``None`` is the null path ``<>`` (bounces, DSNs).
        parameters: ESMTP parameters, already encoded (``(("SIZE", "1234"),
            ("BODY", "8BITMIME"))``); a ``None`` value sends the keyword alone.
        smtputf8: send the path with U-labels and allow UTF-8 (RFC 6531). The
            ``SMTPUTF8`` parameter itself must be among ``parameters``.
    """

    verb: ClassVar[str] = "MAIL"
    sender: Address | None
    parameters: Parameters = attrs.field(
        default=(), converter=_to_parameters, validator=_check_parameters
    )
    smtputf8: bool = False
    _wire: bytes | None = attrs.field(init=False, default=None, eq=False, repr=False)

    def encode(self) -> bytes:
        """``MAIL FROM:<path>[ params]\\r\\n``; raises LocalProtocolError for a
        non-ASCII local part without ``smtputf8``."""
        if self._wire is not None:
            return self._wire
        path = "" if self.sender is None else _path(self.sender, self.smtputf8)
        line = f"MAIL FROM:<{path}>{_encode_parameters(self.parameters, self.smtputf8)}\r\n"
        wire = line.encode("utf-8" if self.smtputf8 else "ascii")
        # A command is immutable, so its wire form is too: a command reused for many
        # messages (the same sender or recipient again) is encoded once.
        object.__setattr__(self, "_wire", wire)
        return wire


@attrs.frozen
class RcptTo(Command):
    """``RCPT TO:<forward-path> [parameters]`` (RFC 5321 §4.1.1.3).

    Attributes:
        recipient: the forward-path.
        parameters: ESMTP parameters, already encoded (``NOTIFY``, ``ORCPT``, ...).
        smtputf8: send the path with U-labels and allow UTF-8 (RFC 6531).
    """

    verb: ClassVar[str] = "RCPT"
    recipient: Address
    parameters: Parameters = attrs.field(
        default=(), converter=_to_parameters, validator=_check_parameters
    )
    smtputf8: bool = False
    _wire: bytes | None = attrs.field(init=False, default=None, eq=False, repr=False)

    def encode(self) -> bytes:
        """``RCPT TO:<path>[ params]\\r\\n``."""
        if self._wire is not None:
            return self._wire
        path = _path(self.recipient, self.smtputf8)
        line = f"RCPT TO:<{path}>{_encode_parameters(self.parameters, self.smtputf8)}\r\n"
        wire = line.encode("utf-8" if self.smtputf8 else "ascii")
        # A command is immutable, so its wire form is too: a command reused for many
        # messages (the same sender or recipient again) is encoded once.
        object.__setattr__(self, "_wire", wire)
        return wire


@attrs.frozen
class Data(Command):
    """``DATA`` (RFC 5321 §4.1.1.4); a ``354`` reply opens the message data."""

    verb: ClassVar[str] = "DATA"


@attrs.frozen
class DataChunk(Command):
    """A piece of the message after DATA's ``354``.

    ``send()`` returns it CRLF-normalized and dot-stuffed (RFC 5321 §4.5.2);
    chunk boundaries may fall anywhere, even inside a CRLF.

    Attributes:
        data: the message bytes.
        stuffed: ``data`` is already in wire form, so it passes through unchanged: what
            ``send()`` returned for the same message before, with the terminator's output
            but its final ``.CRLF`` (so it ends a line). It must start a line. This lets a
            client send one message to many envelopes without stuffing it again.
    """

    verb: ClassVar[str] = "DATA-CHUNK"
    data: bytes
    stuffed: bool = attrs.field(default=False, kw_only=True)

    def __repr__(self) -> str:
        return f"DataChunk(<{len(self.data)} bytes>)"


@attrs.frozen
class EndOfData(Command):
    """The end of the message data: ``send()`` returns exactly one ``CRLF.CRLF``
    (RFC 5321 §4.1.1.4), adding the CRLF the body lacked if it did not end in one."""

    verb: ClassVar[str] = "END-OF-DATA"


@attrs.frozen
class Bdat(Command):
    """``BDAT <size> [LAST]`` followed by exactly ``size`` octets (RFC 3030 §2).

    The data goes out verbatim: no dot-stuffing and no line-ending changes, which
    is what BINARYMIME (RFC 3030 §3) requires and what CRLF-normalized message
    chunks (``Message.chunks()``) already satisfy.

    Attributes:
        data: the chunk's octets (may be empty, e.g. for ``BDAT 0 LAST``).
        last: whether this is the message's final chunk.
    """

    verb: ClassVar[str] = "BDAT"
    data: bytes
    last: bool = False

    def encode(self) -> bytes:
        """``BDAT <n>[ LAST]\\r\\n`` followed by the data."""
        head = b"BDAT %d LAST\r\n" if self.last else b"BDAT %d\r\n"
        return head % len(self.data) + self.data

    def __repr__(self) -> str:
        return f"Bdat(<{len(self.data)} bytes>, last={self.last})"


@attrs.frozen
class Rset(Command):
    """``RSET`` (RFC 5321 §4.1.1.5): abort the mail transaction."""

    verb: ClassVar[str] = "RSET"


@attrs.frozen
class Noop(Command):
    """``NOOP`` (RFC 5321 §4.1.1.9): a health check."""

    verb: ClassVar[str] = "NOOP"


@attrs.frozen
class Quit(Command):
    """``QUIT`` (RFC 5321 §4.1.1.10)."""

    verb: ClassVar[str] = "QUIT"


@attrs.frozen
class Vrfy(Command):
    """``VRFY text`` (RFC 5321 §4.1.1.6).

    Attributes:
        text: the user name or mailbox to verify (UTF-8 goes out as UTF-8, RFC 6531 §3.7.4).
    """

    verb: ClassVar[str] = "VRFY"
    text: str = attrs.field()

    @text.validator
    def _check_text(self, attribute: attrs.Attribute[str], value: str) -> None:
        _no_line_breaks("text", value)
        if not value.strip():
            raise LocalProtocolError("VRFY needs an argument")

    def encode(self) -> bytes:
        """``VRFY <text>\\r\\n``."""
        return f"VRFY {self.text}\r\n".encode()
