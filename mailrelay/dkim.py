"""DKIM signing (RFC 6376, with Ed25519 from RFC 8463): a ``DKIM-Signature`` for exactly
the bytes mailrelay puts on the wire.

Theory of operation: :meth:`DKIMSigner.sign` reads the message's wire form through
:meth:`Message.chunks <mailrelay.message.Message.chunks>` (CRLF-normalized, ``Bcc``
removed: what the transports send), in one pass. The header block is kept; the body is
canonicalized and hashed as it streams past, so a multi-gigabyte file-backed message is
never held in memory. The header fields named in ``h=`` are canonicalized, the new
``DKIM-Signature`` field (with an empty ``b=``) is appended, and the result is signed
with the private key. The signed message is the original with the field prepended; its
body is not copied (a file-backed message stays file-backed).

Rules this module keeps:

* Canonicalization is RFC 6376 §3.4 to the letter, on bytes (so 8-bit bodies and RFC 6532
  UTF-8 header fields sign as they travel). The code for each rule cites its section.
* ``From`` is always signed (RFC 6376 §5.4). Header fields are chosen from the bottom of
  the header block up (§5.4.2); a name listed once more than it occurs ("oversigning")
  signs the absence of further instances, so none can be added later.
* No body length limit (``l=``): it lets anyone append content to a signed message
  (RFC 6376 §8.2), so it is not offered.
* RSA keys shorter than 1024 bits are refused (RFC 8301 §3.2); 2048 bits is the norm.
  ``rsa-sha1`` is never used (RFC 8301 §3.1).
* The ``cryptography`` package is an optional extra (``pip install "mailrelay[dkim]"``),
  imported only when a signer is created; ``import mailrelay`` never needs it.
* The private key never appears in a ``repr``, a log line or an exception message.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import logging
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final

import attrs
import idna

from mailrelay.address import Address
from mailrelay.errors import ConfigurationError, InvalidAddress, MessageError
from mailrelay.message import MAX_HEADER_BYTES, Message

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

__all__ = [
    "DEFAULT_HEADERS",
    "DKIMSigner",
    "MIN_RSA_BITS",
    "canonicalize_body",
    "canonicalize_header",
]

log = logging.getLogger(__name__)

#: The header fields signed by default, when present: those that carry what a reader sees
#: and what a mail client acts on (RFC 6376 §5.4.1's list, plus the one-click
#: unsubscribe fields of RFC 8058 §3.1, which require that their fields be signed).
DEFAULT_HEADERS: Final = (
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "Reply-To",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "In-Reply-To",
    "References",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
)

#: RFC 8301 §3.2: verifiers must not accept RSA keys shorter than this.
MIN_RSA_BITS: Final = 1024

_INSTALL_HINT = 'DKIM signing needs the "cryptography" package: pip install "mailrelay[dkim]"'

# RFC 5322 §3.6.8: a field name is printable US-ASCII except the colon.
_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")
_FIELD_NAME_BYTES = re.compile(rb"[\x21-\x39\x3b-\x7e]+")
# An ASCII selector label (RFC 6376 §3.1: a selector is a sub-domain, RFC 5321 §4.1.2).
_LDH_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_CANONICALIZATIONS = frozenset({"simple", "relaxed"})
# RFC 5322 §2.1.1: lines of at most 78 characters (CRLF not counted).
_LINE_LIMIT = 78
# How much of the wire form one chunks() step asks for: a whole in-memory message of
# common size in one piece (no copy), small bounded reads for a file-backed one (each piece
# is copied a few times by the canonicalization: 64 KiB keeps a 16 MB file's peak well
# under 1 MB; 1 MiB pieces peaked at 20 MB).
_READ_SIZE = 1 << 16


def _utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def _one_space(data: bytes) -> bytes:
    """Every run of WSP (SP, HTAB) in ``data`` as one SP.

    Bytes methods rather than a regular expression: ``re.sub`` managed 13 MB/s on text
    (a substitution at every space), these about 160 MB/s. Each pass halves the longest
    run, so a run of n spaces costs log2(n) passes.
    """
    data = data.replace(b"\t", b" ")
    while b"  " in data:
        data = data.replace(b"  ", b" ")
    return data


# -- canonicalization (RFC 6376 §3.4) ------------------------------------------------


def canonicalize_header(field: bytes, method: str) -> bytes:
    """Canonicalize one header field as RFC 6376 §3.4.1 / §3.4.2 say.

    Args:
        field: the whole field as it is on the wire: name, colon, value and every
            continuation line, ending in CRLF.
        method: ``"simple"`` or ``"relaxed"``.

    Returns:
        The canonical form, ending in CRLF.

    Raises:
        ConfigurationError (a ``ValueError``): an unknown method.
    """
    if method == "simple":
        return field  # §3.4.1: no change at all
    if method != "relaxed":
        raise ConfigurationError(f"unknown canonicalization {method!r}")
    name, _, value = field.partition(b":")
    # §3.4.2: lower-case the name; unfold (every CRLF in a field is a fold or its end);
    # each run of WSP becomes one SP; no WSP at the value's end or around the colon.
    value = _one_space(value.replace(b"\r\n", b"")).strip(b" ")
    return name.rstrip(b" \t").lower() + b":" + value + b"\r\n"


def canonicalize_body(body: bytes, method: str) -> bytes:
    """Canonicalize a whole body as RFC 6376 §3.4.3 / §3.4.4 say.

    (The signer itself streams the body through the same rules without joining it.)

    Args:
        body: the body with CRLF line ends.
        method: ``"simple"`` or ``"relaxed"``.

    Returns:
        The canonical body.

    Raises:
        ConfigurationError (a ``ValueError``): an unknown method.
    """
    if method not in _CANONICALIZATIONS:
        raise ConfigurationError(f"unknown canonicalization {method!r}")
    parts: list[bytes] = []
    canon = _BodyCanonicalizer(relaxed=method == "relaxed", sink=parts.append)
    canon.feed(body)
    canon.finish()
    return b"".join(parts)


class _BodyCanonicalizer:
    """Streams a body through RFC 6376 §3.4.3 (simple) or §3.4.4 (relaxed) into ``sink``.

    Whole lines are canonicalized as they complete; a run of empty lines is held back
    until a line with content follows it, since empty lines at the end are dropped. A line
    not yet ended goes out as it streams past (a body of one huge line is never held):
    only what its end could still change is kept, a trailing CR (the start of a CRLF) and,
    relaxed, a trailing run of white space (dropped at the line's end, one SP otherwise),
    kept as that one SP.
    """

    def __init__(self, *, relaxed: bool, sink: Callable[[bytes], object]) -> None:
        self._relaxed = relaxed
        self._sink = sink
        self._held = b""  # the unended line's tail, not yet written (see above)
        self._started = False  # some of the unended line has been written
        self._empty_lines = 0
        self._wrote = False

    def feed(self, data: bytes) -> None:
        if self._held:
            data = self._held + data
            self._held = b""
        end = data.rfind(b"\r\n")
        if end >= 0:
            lines, data = data[: end + 2], data[end + 2 :]
            if self._started:
                # The rest of the line begun earlier: never an empty line, whatever is left.
                first = lines.find(b"\r\n") + 2
                self._sink(self._canonical(lines[:first]))
                self._started = False
                self._empty_lines = 0
                lines = lines[first:]
            if lines:
                self._lines(lines)
        if data:
            self._stream(data)

    def _canonical(self, lines: bytes) -> bytes:
        if self._relaxed:
            # §3.4.4: every run of WSP becomes one SP, and none is left at a line's end.
            return _one_space(lines).replace(b" \r\n", b"\r\n")
        return lines

    def _stream(self, data: bytes) -> None:
        """Write what can be written of an unended line; hold what its end may change."""
        if self._relaxed:
            body = data.rstrip(b" \t\r")
            tail = data[len(body) :]
            # A run of WSP is one SP, or nothing at the line's end, whatever its length; a
            # CR ends the tail if anything (the wire form has no bare CR).
            cr = b"\r" if tail.endswith(b"\r") else b""
            self._held = (b" " if tail.rstrip(b"\r") else b"") + cr
            data = body
        elif data.endswith(b"\r"):
            data, self._held = data[:-1], b"\r"
        if not data:
            return
        if not self._started:
            if self._empty_lines:  # not trailing: a line with content follows them
                self._sink(b"\r\n" * self._empty_lines)
                self._empty_lines = 0
            self._started = True
            self._wrote = True
        self._sink(_one_space(data) if self._relaxed else data)

    def _lines(self, lines: bytes) -> None:
        lines = self._canonical(lines)
        text = lines.rstrip(b"\r\n")  # the wire form has no bare CR or LF to strip wrongly
        if not text:
            self._empty_lines += len(lines) // 2
            return
        if self._empty_lines:
            self._sink(b"\r\n" * self._empty_lines)
        self._sink(lines[: len(text) + 2])
        self._empty_lines = (len(lines) - len(text)) // 2 - 1
        self._wrote = True

    def finish(self) -> None:
        if self._held or self._started:
            # The protocol layer ends a message without a final CRLF with one before the
            # dot (RFC 5321 §4.1.1.4), so a verifier sees that line ended: sign it so.
            self.feed(b"\n" if self._held.endswith(b"\r") else b"\r\n")
        # §3.4.3: trailing empty lines are ignored, and an empty body is one CRLF.
        # §3.4.4: trailing empty lines are ignored, and an empty body stays empty.
        if not self._wrote and not self._relaxed:
            self._sink(b"\r\n")


# -- reading the wire form ------------------------------------------------------------


def _read_wire(message: Message, body: _BodyCanonicalizer) -> list[tuple[bytes, bytes]]:
    """Stream ``message``'s wire form: feed its body to ``body``, return its header
    fields as (lower-case name, raw field bytes with every CRLF) in message order."""
    head: bytes | None = None
    buffer = b""
    scanned = 0
    for piece in message.chunks(_READ_SIZE):
        if head is not None:
            body.feed(piece)
            continue
        buffer += piece
        if buffer.startswith(b"\r\n"):
            head, rest = b"", buffer[2:]  # no header fields at all
        else:
            # RFC 5322 §2.1: the header block ends at the first empty line.
            end = buffer.find(b"\r\n\r\n", scanned)
            if end < 0:
                if len(buffer) > MAX_HEADER_BYTES + _READ_SIZE:
                    raise MessageError("cannot DKIM-sign: no empty line ends the header block")
                scanned = max(0, len(buffer) - 3)
                continue
            head, rest = buffer[: end + 2], buffer[end + 4 :]
        buffer = b""
        body.feed(rest)
    if head is None:
        # A message without an empty line is all header fields and no body.
        head = buffer if not buffer or buffer.endswith(b"\r\n") else buffer + b"\r\n"
    body.finish()
    return _fields(head)


def _fields(head: bytes) -> list[tuple[bytes, bytes]]:
    grouped: list[list[bytes]] = []
    for line in head.split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t"):
            if not grouped:
                raise MessageError("cannot DKIM-sign: the header block starts with white space")
            grouped[-1].append(line)  # RFC 5322 §2.2.3: a continuation line
        else:
            grouped.append([line])
    fields: list[tuple[bytes, bytes]] = []
    for lines in grouped:
        name, colon, _ = lines[0].partition(b":")
        name = name.rstrip(b" \t")
        if not colon or not _FIELD_NAME_BYTES.fullmatch(name):
            # A line that is not a field before the empty line: a verifier would read the
            # message's structure differently from us (Message.from_bytes takes such a
            # line as the start of the body), so no signature could be trusted to match.
            raise MessageError(
                "cannot DKIM-sign: a line of the header block is not a header field "
                "(the header block must end with an empty line)"
            )
        fields.append((name.lower(), b"\r\n".join(lines) + b"\r\n"))
    return fields


# -- the DKIM-Signature field ------------------------------------------------------------


class _Folder:
    """Writes a header field in lines of at most :data:`_LINE_LIMIT` characters, folding
    with CRLF TAB only where RFC 6376 §3.5's grammar allows FWS."""

    def __init__(self, start: str) -> None:
        self.lines: list[str] = []
        self.line = start

    def word(self, text: str, separator: str = " ") -> None:
        """Add text that must not be broken, after ``separator`` (or a fold)."""
        if len(self.line) + len(separator) + len(text) <= _LINE_LIMIT:
            self.line += separator + text
        else:
            self.lines.append(self.line)
            self.line = "\t" + text

    def stream(self, text: str) -> None:
        """Add text that may be broken anywhere (base64: §3.5 ignores FWS in it)."""
        while text:
            room = _LINE_LIMIT - len(self.line)
            if room <= 0:
                self.lines.append(self.line)
                self.line = "\t"
                room = _LINE_LIMIT - 1
            self.line += text[:room]
            text = text[room:]

    def text(self) -> str:
        return "\r\n".join([*self.lines, self.line])


def _quoted_printable(text: str) -> str:
    """RFC 6376 §2.11 dkim-quoted-printable (for the local part in ``i=``)."""
    out = []
    for byte in text.encode("utf-8"):
        # dkim-safe-char: %x21-3A / %x3C / %x3E-7E (no ";" and no "=").
        if 0x21 <= byte <= 0x7E and byte not in (0x3B, 0x3D):
            out.append(chr(byte))
        else:
            out.append(f"={byte:02X}")
    return "".join(out)


# -- key handling ----------------------------------------------------------------------


def _load_key(pem: bytes | str) -> tuple[RSAPrivateKey | Ed25519PrivateKey, str, int]:
    """The key, its algorithm (``a=``) and its size in bits. Never puts the key in an error."""
    try:
        from cryptography.exceptions import UnsupportedAlgorithm  # noqa: PLC0415 -- optional extra, imported lazily
        from cryptography.hazmat.primitives.asymmetric import ed25519, rsa  # noqa: PLC0415 -- optional extra, imported lazily
        from cryptography.hazmat.primitives.serialization import load_pem_private_key  # noqa: PLC0415 -- optional extra, imported lazily
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    if isinstance(pem, str):
        if not pem.isascii():
            raise ConfigurationError("private_key is not a PEM private key (non-ASCII text)")
        pem = pem.encode("ascii")
    try:
        key = load_pem_private_key(pem, password=None)
    except TypeError:
        # cryptography raises TypeError for an encrypted key given no password.
        raise ConfigurationError(
            "private_key is encrypted; give the decrypted PEM (openssl pkey -in KEY -out PLAIN)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        # `from None`: the parser's own message is dropped, so nothing of the key can
        # reach a log through the exception chain.
        raise ConfigurationError("private_key is not a PEM private key") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise ConfigurationError(
                f"the RSA key has {key.key_size} bits; DKIM needs at least {MIN_RSA_BITS} "
                "(RFC 8301 §3.2) and 2048 is the norm"
            )
        return key, "rsa-sha256", key.key_size
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key, "ed25519-sha256", 256
    raise ConfigurationError(
        f"DKIM signs with RSA or Ed25519 keys (RFC 6376, RFC 8463), not {type(key).__name__}"
    )


def _check_private_key(_instance: object, _attribute: object, value: bytes | str) -> None:
    # Our own check: attrs' instance_of would print the value in its message.
    if not isinstance(value, bytes | str):
        raise ConfigurationError("private_key must be the PEM text of the key (bytes or str)")


# -- converters -------------------------------------------------------------------------


def _domain(value: str) -> str:
    if not isinstance(value, str):
        raise ConfigurationError("domain must be a str")
    try:
        address = Address.parse("dkim@" + value.rstrip("."))
    except InvalidAddress as exc:
        raise ConfigurationError(f"domain {value!r} is not a domain name: {exc}") from None
    if address.is_literal:
        raise ConfigurationError(f"domain {value!r} is an address literal, not a domain name")
    return address.ascii_domain


def _selector(value: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigurationError("selector must be a non-empty str")
    labels = []
    for label in value.rstrip(".").split("."):
        if label.isascii():
            if not _LDH_LABEL.fullmatch(label):
                raise ConfigurationError(f"selector {value!r} is not a DNS name (RFC 6376 §3.1)")
            labels.append(label.lower())
            continue
        try:
            # RFC 6376 §3.1: an internationalized selector is written in A-labels.
            labels.append(idna.encode(label, uts46=True).decode("ascii"))
        except idna.IDNAError as exc:
            raise ConfigurationError(f"selector {value!r} is not a DNS name: {exc}") from None
    return ".".join(labels)


def _headers(value: Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str | bytes):
        raise ConfigurationError("headers must be a list of field names, not one string")
    names: list[str] = []
    seen: set[str] = set()
    for name in value:
        if not isinstance(name, str) or not _FIELD_NAME.fullmatch(name):
            raise ConfigurationError(f"{name!r} is not a header field name (RFC 5322 §3.6.8)")
        if name.lower() not in seen:
            seen.add(name.lower())
            names.append(name)
    if "from" not in seen:
        names.insert(0, "From")  # RFC 6376 §5.4: From MUST be signed
    return tuple(names)


def _canonicalization(value: str) -> str:
    if not isinstance(value, str):
        raise ConfigurationError("canonicalization must be a str such as 'relaxed/relaxed'")
    header, slash, body = value.strip().lower().partition("/")
    # RFC 6376 §3.5 (c=): one name alone is the header's; the body's is then "simple".
    body = body if slash else "simple"
    if header not in _CANONICALIZATIONS or body not in _CANONICALIZATIONS:
        raise ConfigurationError(
            f"canonicalization {value!r} is not header/body with each simple or relaxed"
        )
    return f"{header}/{body}"


def _check_expiry(_instance: object, _attribute: object, value: _dt.timedelta | None) -> None:
    if value is None:
        return
    if not isinstance(value, _dt.timedelta) or value < _dt.timedelta(seconds=1):
        raise ConfigurationError("expire_after must be a timedelta of at least one second")


# -- the signer ---------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class DKIMSigner:
    """Adds a DKIM signature (RFC 6376) to messages.

    Create one per signing key and use it for every message (it is immutable and
    thread-safe); wrap a transport with
    :class:`~mailrelay.transport.signing.SigningTransport` to sign everything it sends.

    Attributes:
        domain: the signing domain (``d=``); an IDN is written in A-labels.
        selector: the selector (``s=``): the key's public half is published as a TXT
            record at ``<selector>._domainkey.<domain>`` (see :attr:`dns_name`).
        private_key: the private key as PEM text: RSA (at least 1024 bits; 2048 is the
            norm) or Ed25519 (RFC 8463). Never shown in ``repr``.
        canonicalization: ``"header/body"``, each ``simple`` or ``relaxed``
            (RFC 6376 §3.4). ``relaxed/relaxed``, the default, survives the re-folding
            and white space changes that relays make; a single name means that name for
            the header and ``simple`` for the body (RFC 6376 §3.5).
        headers: the header fields to sign when present. ``From`` is always added
            (RFC 6376 §5.4). Names are case-insensitive; repeats are dropped.
        oversign: also list every name in ``headers`` once more than it occurs, so no
            further field of that name can be added without breaking the signature
            (RFC 6376 §5.4.2, §8.15). Off by default: mailing lists that add a
            ``List-Unsubscribe`` would then break it.
        identity: the agent or user identifier (``i=``), ``[local-part]@domain`` with the
            domain :attr:`domain` or a subdomain of it; ``None`` leaves ``i=`` out
            (verifiers then take ``@`` + ``d=``).
        expire_after: how long a signature stays valid (``x=`` = signing time plus
            this); ``None`` gives no expiry.
        now: the clock giving the signing time (``t=``), an aware datetime; inject a
            fixed one in tests.
        algorithm: ``"rsa-sha256"`` or ``"ed25519-sha256"`` (``a=``), from the key.
        key_bits: the key's size in bits (256 for Ed25519).

    Raises:
        ConfigurationError: a key that is not a PEM RSA or Ed25519 private key, an RSA
            key under 1024 bits, an encrypted key, a malformed domain, selector,
            header name or canonicalization, or an identity outside the domain.
        ImportError: the ``cryptography`` package is missing (``pip install
            "mailrelay[dkim]"``).
    """

    domain: str = attrs.field(converter=_domain)
    selector: str = attrs.field(converter=_selector)
    private_key: bytes | str = attrs.field(repr=False, validator=_check_private_key)
    canonicalization: str = attrs.field(default="relaxed/relaxed", converter=_canonicalization)
    headers: tuple[str, ...] = attrs.field(default=DEFAULT_HEADERS, converter=_headers)
    oversign: bool = False
    identity: str | None = None
    expire_after: _dt.timedelta | None = attrs.field(default=None, validator=_check_expiry)
    now: Callable[[], _dt.datetime] = attrs.field(default=_utc_now, repr=False, eq=False)
    algorithm: str = attrs.field(init=False)
    key_bits: int = attrs.field(init=False)
    _key: Any = attrs.field(init=False, repr=False, eq=False)
    _identity_tag: str | None = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        key, algorithm, bits = _load_key(self.private_key)
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "algorithm", algorithm)
        object.__setattr__(self, "key_bits", bits)
        object.__setattr__(self, "_identity_tag", self._check_identity())

    def _check_identity(self) -> str | None:
        if self.identity is None:
            return None
        if not isinstance(self.identity, str):
            raise ConfigurationError("identity must be a str such as 'news@example.org'")
        local, at, domain = self.identity.rpartition("@")
        if not at:
            raise ConfigurationError(f"identity {self.identity!r} has no '@domain'")
        ascii_domain = _domain(domain)
        # RFC 6376 §3.5 (i=): the domain must be d= or a subdomain of it.
        if ascii_domain != self.domain and not ascii_domain.endswith("." + self.domain):
            raise ConfigurationError(
                f"identity {self.identity!r} is outside the signing domain {self.domain!r} "
                "(RFC 6376 §3.5: i= must be in d= or a subdomain of it)"
            )
        return f"{_quoted_printable(local)}@{ascii_domain}"

    # -- DNS ----------------------------------------------------------------------

    @property
    def dns_name(self) -> str:
        """Where the public key is published: ``<selector>._domainkey.<domain>``."""
        return f"{self.selector}._domainkey.{self.domain}"

    @property
    def dns_txt(self) -> str:
        """The TXT record to publish at :attr:`dns_name` (RFC 6376 §3.6.1), e.g.
        ``v=DKIM1; k=rsa; p=MIIBIjANBg...``. DNS splits a TXT record into strings of at
        most 255 octets: most DNS hosting interfaces do that themselves; in a zone file,
        write it as several quoted strings."""
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat  # noqa: PLC0415 -- optional extra, imported lazily

        public = self._key.public_key()
        if self.algorithm == "ed25519-sha256":
            # RFC 8463 §4: the bare 32-byte public key.
            raw = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
            kind = "ed25519"
        else:
            raw = public.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
            kind = "rsa"
        return f"v=DKIM1; k={kind}; p={base64.b64encode(raw).decode('ascii')}"

    # -- signing --------------------------------------------------------------------

    def sign(self, message: Message) -> Message:
        """Return ``message`` with a ``DKIM-Signature`` field prepended.

        The signature covers the message's wire form (:meth:`Message.chunks
        <mailrelay.message.Message.chunks>`), which is what every transport sends. The
        new message keeps everything else of the original (its ``bcc``, and so its
        envelope); a file-backed message stays file-backed.

        Raises:
            MessageError: no ``From`` field, a header block that does not end with an
                empty line, or a file-backed message whose file changed.
            OSError: a file-backed message whose file can no longer be read.
        """
        field = self.signature_header(message)
        raw = field.encode("ascii")
        value = field.partition(":")[2].replace("\r\n", "").strip()
        # Message's constructor is internal to the package: used here so the body is
        # not copied and the blind recipients (which parsing the new bytes would lose,
        # since they are not on the wire) are kept.
        return attrs.evolve(
            message,
            wire=raw + message._wire,
            size=message.size + len(raw),
            headers=(("DKIM-Signature", value), *message.headers),
        )

    def signature_header(self, message: Message) -> str:
        """Return the ``DKIM-Signature`` field for ``message``, to put before its header
        block: ``"DKIM-Signature: v=1; a=...\\r\\n"``, folded into lines of at most 78
        characters, ending in CRLF.

        Raises:
            MessageError, OSError: as :meth:`sign`.
        """
        header_method, body_method = self.canonicalization.split("/")
        body_hash = hashlib.sha256()
        fields = _read_wire(
            message,
            _BodyCanonicalizer(relaxed=body_method == "relaxed", sink=body_hash.update),
        )
        signed_names = self._signed_names(fields)
        when = self.now()
        if when.tzinfo is None:
            raise ConfigurationError("the signer's clock (now) must return an aware datetime")
        timestamp = int(when.timestamp())

        folder = _Folder("DKIM-Signature:")
        tags = [
            ("v", "1"),
            ("a", self.algorithm),
            ("c", self.canonicalization),
            ("d", self.domain),
            ("s", self.selector),
            ("t", str(timestamp)),
        ]
        if self.expire_after is not None:
            tags.append(("x", str(timestamp + int(self.expire_after.total_seconds()))))
        if self._identity_tag is not None:
            tags.append(("i", self._identity_tag))
        for name, tag_value in tags:
            folder.word(f"{name}={tag_value};")
        # h=: FWS is allowed around each colon (§3.5), so the list folds there.
        first, *rest = signed_names
        folder.word(f"h={first}" + (";" if not rest else ""))
        for index, name in enumerate(rest, start=1):
            folder.word(f":{name}" + (";" if index == len(rest) else ""), separator="")
        folder.word("bh=")
        folder.stream(base64.b64encode(body_hash.digest()).decode("ascii") + ";")
        folder.word("b=")
        unsigned = folder.text()

        signed_data = self._header_data(fields, signed_names, header_method, unsigned)
        signature = self._sign_bytes(signed_data)
        folder.stream(base64.b64encode(signature).decode("ascii"))
        log.debug(
            "DKIM-signed message %s: d=%s s=%s a=%s h=%s",
            message.message_id,
            self.domain,
            self.selector,
            self.algorithm,
            ":".join(signed_names),
        )
        return folder.text() + "\r\n"

    def _signed_names(self, fields: list[tuple[bytes, bytes]]) -> list[str]:
        """``h=``: every occurrence of a configured field, in message order, then (when
        oversigning) each configured name once more."""
        wanted = {name.lower() for name in self.headers}
        present = [name.decode("ascii") for name, _raw in fields if name.decode("ascii") in wanted]
        if "from" not in present:
            raise MessageError("cannot DKIM-sign a message without a From field (RFC 6376 §5.4)")
        if self.oversign:
            present += [name.lower() for name in self.headers]
        return present

    @staticmethod
    def _header_data(
        fields: list[tuple[bytes, bytes]], names: list[str], method: str, unsigned: str
    ) -> bytes:
        """What the signature covers (RFC 6376 §3.7): the fields named in ``h=``, then
        the DKIM-Signature field with an empty ``b=`` and no final CRLF."""
        stacks: dict[bytes, list[bytes]] = {}
        for field_name, raw in fields:
            stacks.setdefault(field_name, []).append(raw)
        parts = []
        for name in names:
            # §5.4.2: repeated names take the instances from the bottom up; a name with no
            # instance left stands for none (what oversigning relies on).
            stack = stacks.get(name.encode("ascii"))
            if stack:
                parts.append(canonicalize_header(stack.pop(), method))
        parts.append(canonicalize_header(unsigned.encode("ascii") + b"\r\n", method)[:-2])
        return b"".join(parts)

    def _sign_bytes(self, data: bytes) -> bytes:
        from cryptography.hazmat.primitives import hashes  # noqa: PLC0415 -- optional extra, imported lazily
        from cryptography.hazmat.primitives.asymmetric import padding  # noqa: PLC0415 -- optional extra, imported lazily

        if self.algorithm == "ed25519-sha256":
            # RFC 8463 §3: Ed25519 (PureEdDSA) over the SHA-256 hash of the data.
            return bytes(self._key.sign(hashlib.sha256(data).digest()))
        # RFC 6376 §3.3.1: RSASSA-PKCS1-v1_5 with SHA-256.
        return bytes(self._key.sign(data, padding.PKCS1v15(), hashes.SHA256()))
