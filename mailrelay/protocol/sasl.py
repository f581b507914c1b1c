"""SASL client mechanisms for SMTP AUTH (RFC 4954), as plain generators with no I/O.

Theory of operation
-------------------
A mechanism is a small immutable object with a ``name`` (as it appears in the EHLO ``AUTH``
keyword) and a ``start(username, password)`` method returning an *exchange*: a generator that
the dialogue (:mod:`mailrelay.flow`) drives.

* The first value the exchange yields is the initial response for ``AUTH <name> [response]``,
  or ``None`` when the mechanism has none (LOGIN, CRAM-MD5).
* For every ``334`` challenge the dialogue sends the decoded challenge bytes in with
  ``exchange.send(challenge)`` and writes the bytes that come back.
* When the server reports success (``235``) the dialogue sends ``None`` in. The exchange
  returns (``StopIteration``) when it is satisfied, or raises
  :class:`~mailrelay.errors.AuthenticationError` when it is not: SCRAM raises when the server
  never proved that it knows the password (RFC 5802 §5: the client MUST verify the server
  signature).
* A challenge the mechanism did not expect, or one it cannot parse, raises
  :class:`~mailrelay.errors.AuthenticationError`; the dialogue then cancels with ``*``.

Exchanges deal in raw bytes: base64 belongs to the protocol connection (RFC 4954 §4), which
encodes responses and decodes challenges. Nothing here does I/O or reads a clock.

Credentials are passed to ``start`` and live only inside the running generator: no mechanism
object stores them, so no ``repr`` or ``str`` can leak them, and neither does any exception
message raised here.

SASLprep
--------
SCRAM prepares the user name and the password with SASLprep (RFC 4013, a profile of RFC 3454
stringprep) as a "query": unassigned code points are allowed. We implement the whole profile
with the stdlib's :mod:`stringprep` tables and :mod:`unicodedata`'s Unicode 3.2 data:
map non-ASCII spaces (table C.1.2) to SPACE and "commonly mapped to nothing" (B.1) to nothing,
normalize with NFKC, refuse the prohibited tables (C.1.2, C.2.1, C.2.2, C.3 to C.9), and apply
the bidirectional rules (RFC 3454 §6). A password that fails SASLprep raises
:class:`~mailrelay.errors.AuthenticationError` before anything is sent (RFC 5802 §5.1: the
client SHOULD abort).

Choosing a mechanism
--------------------
:func:`candidate_mechanisms` orders the mechanisms both sides support, strongest first:
SCRAM-SHA-256 > CRAM-MD5 > PLAIN > LOGIN. XOAUTH2 and OAUTHBEARER (RFC 7628) take an OAuth 2.0
bearer token instead of a password, so they are used only when the caller names them.
:func:`choose_mechanism` returns the first.

Bearer tokens
-------------
XOAUTH2 and OAUTHBEARER refuse a token that is empty or holds ^A, a control character, a space
or non-ASCII (RFC 6750 §2.1), and a user name with NUL, ^A, CR or LF, before anything is sent.
A refused token is answered with a ``334`` carrying a JSON error document; the exchange sends
the mechanism's dummy response (XOAUTH2: empty; OAUTHBEARER: ``^A``, RFC 7628 §3.2.3) and the
server ends with a 5xx. :func:`oauth_error_details` turns the document into a short, bounded,
printable text (``status``, ``scope``) for the error message; the dialogue adds it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import stringprep
import unicodedata
from collections.abc import Callable, Generator, Iterable, Sequence
from typing import Protocol

import attrs

from mailrelay.errors import AuthenticationError

__all__ = [
    "BEARER_MECHANISMS",
    "CramMD5",
    "Exchange",
    "Login",
    "MAX_OAUTH_ERROR",
    "MECHANISMS",
    "Mechanism",
    "OAuthBearer",
    "Plain",
    "ScramSHA256",
    "XOAuth2",
    "candidate_mechanisms",
    "choose_mechanism",
    "oauth_error_details",
    "saslprep",
]

#: What an exchange yields (a response, or ``None`` for "no initial response") and what it is
#: sent (a decoded 334 challenge, or ``None`` once the server said 235).
Exchange = Generator[bytes | None, bytes | None, None]


class Mechanism(Protocol):
    """A SASL client mechanism: a name and a way to start an exchange."""

    @property
    def name(self) -> str:
        """The mechanism's registered name, upper case (``"PLAIN"``)."""
        ...

    def start(self, username: str, password: str) -> Exchange:
        """Begin an exchange authenticating ``username`` with ``password`` (or a token)."""
        ...


def _unexpected(name: str, what: str) -> AuthenticationError:
    # Never include the challenge text's surroundings that could echo credentials.
    return AuthenticationError(f"{name}: {what}")


def _expect_success(name: str, sent: bytes | None) -> None:
    """After the last response: accept the server's success, refuse any further challenge."""
    if sent is not None:
        raise _unexpected(name, "the server sent a challenge after the exchange was complete")


# -- PLAIN -------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Plain:
    """PLAIN (RFC 4616): ``authzid NUL authcid NUL passwd`` as the initial response.

    Attributes:
        authzid: the identity to act as; empty (the default) means "the one I authenticate as".
    """

    authzid: str = ""
    name: str = attrs.field(default="PLAIN", init=False)

    def start(self, username: str, password: str) -> Exchange:
        """Return the exchange; see the module docstring for the protocol."""
        return self._run(username, password)

    def _run(self, username: str, password: str) -> Exchange:
        # RFC 4616 §2: message = [authzid] UTF8NUL authcid UTF8NUL passwd; none may contain NUL.
        if "\0" in username or "\0" in password or "\0" in self.authzid:
            raise AuthenticationError("PLAIN: a user name or password cannot contain NUL")
        sent = yield b"\0".join((self.authzid.encode(), username.encode(), password.encode()))
        _expect_success(self.name, sent)


# -- LOGIN -------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Login:
    """LOGIN (draft-murchison-sasl-login): the user name and password, one challenge each.

    The server's challenges are conventionally ``Username:`` and ``Password:``; servers vary
    the wording, so the answers go by order, not by text.
    """

    name: str = attrs.field(default="LOGIN", init=False)

    def start(self, username: str, password: str) -> Exchange:
        """Return the exchange; see the module docstring for the protocol."""
        return self._run(username, password)

    def _run(self, username: str, password: str) -> Exchange:
        # A 235 before both answers is odd but means success: nothing to verify in LOGIN.
        if (yield None) is None:
            return
        if (yield username.encode()) is None:
            return
        _expect_success(self.name, (yield password.encode()))


# -- CRAM-MD5 ----------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class CramMD5:
    """CRAM-MD5 (RFC 2195): answer the server's challenge with ``user SP hex(HMAC-MD5)``."""

    name: str = attrs.field(default="CRAM-MD5", init=False)

    def start(self, username: str, password: str) -> Exchange:
        """Return the exchange; see the module docstring for the protocol."""
        return self._run(username, password)

    def _run(self, username: str, password: str) -> Exchange:
        challenge = yield None
        if challenge is None:
            return  # success without a challenge: odd, but nothing to verify
        if not challenge:
            raise _unexpected(self.name, "the server sent an empty challenge")
        # RFC 2195 §2: digest = HMAC-MD5(key=password, text=challenge), as lower-case hex.
        digest = hmac.new(password.encode(), challenge, hashlib.md5).hexdigest()
        _expect_success(self.name, (yield f"{username} {digest}".encode()))


# -- OAuth 2.0 bearer tokens: XOAUTH2 and OAUTHBEARER ----------------------------------------

#: How much of a server's error challenge is parsed as JSON; a longer one is not read.
MAX_OAUTH_ERROR = 4096
#: How many characters of each error field are kept.
_OAUTH_FIELD = 100


def _check_bearer(name: str, username: str, token: str) -> None:
    """Refuse a user name or token that would break the mechanism's framing."""
    if any(c in username for c in "\x00\x01\r\n"):
        raise AuthenticationError(f"{name}: a user name cannot contain NUL, ^A, CR or LF")
    # RFC 6750 §2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"=";
    # we refuse only what breaks the framing or cannot be a token: ^A (the separator), other
    # controls, spaces and non-ASCII. The message never shows the token.
    if not token or not all(0x21 <= ord(c) <= 0x7E for c in token):
        raise AuthenticationError(
            f"{name}: the token is empty or holds a character a bearer token cannot contain "
            "(^A, a control character, a space or non-ASCII)"
        )


def oauth_error_details(challenge: bytes) -> str | None:
    """The useful part of an XOAUTH2 / OAUTHBEARER error challenge, or ``None``.

    RFC 7628 §3.2.2: a refused token is answered with a ``334`` carrying a JSON object with
    ``status`` (an HTTP-style code such as ``"401"`` or ``"invalid_token"``), ``scope`` and
    ``schemes``; Google and Microsoft send the same shape for XOAUTH2. Only ``status`` and
    ``scope`` are kept, each cut to 100 printable characters; anything that is not a small
    JSON object gives ``None``. The challenge never holds the token, but the result is still
    bounded and printable: it goes into an exception message and the logs.
    """
    if len(challenge) > MAX_OAUTH_ERROR:
        return None
    try:
        document = json.loads(challenge.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(document, dict):
        return None
    parts = []
    for key in ("status", "scope"):
        value = document.get(key)
        if isinstance(value, str | int) and not isinstance(value, bool):
            text = "".join(c for c in str(value) if c.isprintable())[:_OAUTH_FIELD]
            if text:
                parts.append(f"{key}={text}")
    return ", ".join(parts) or None


@attrs.frozen(kw_only=True)
class XOAuth2:
    """XOAUTH2 (Google / Microsoft): ``user=<name>^Aauth=Bearer <token>^A^A``.

    The "password" given to :meth:`start` is the OAuth 2.0 access token. When the token is
    refused the server sends a 334 whose challenge is a JSON error document; the client must
    answer it with an empty response, after which the server sends the final 5xx
    (:func:`oauth_error_details` reads the document).
    """

    name: str = attrs.field(default="XOAUTH2", init=False)

    def start(self, username: str, password: str) -> Exchange:
        """Return the exchange; ``password`` is the bearer token."""
        return self._run(username, password)

    def _run(self, username: str, token: str) -> Exchange:
        _check_bearer(self.name, username, token)
        sent = yield f"user={username}\x01auth=Bearer {token}\x01\x01".encode()
        if sent is None:
            return
        # The error JSON: answer with an empty response so that the server sends its 5xx.
        _expect_success(self.name, (yield b""))


@attrs.frozen(kw_only=True)
class OAuthBearer:
    """OAUTHBEARER (RFC 7628): ``n,a=<user>,^A[host=<host>^Aport=<port>^A]auth=Bearer <token>^A^A``.

    The "password" given to :meth:`start` is the OAuth 2.0 access token. The GS2 header
    (RFC 5801 §4) names the user as the authorization identity (``a=``), with ``=`` and ``,``
    escaped as ``=3D`` and ``=2C``; no channel binding (``n``). RFC 7628 §3.1 makes ``host``
    and ``port`` optional; the registered instance (chosen by name) sends neither, as Gmail,
    Microsoft 365 and Dovecot need neither; build ``OAuthBearer(host=..., port=...)`` to send
    them. A refused token is answered with a 334 carrying a JSON error (RFC 7628 §3.2.2); the
    client then sends the dummy response ``^A`` and the server ends with a 5xx (§3.2.3).

    Attributes:
        host: the server's host name to send as ``host=``, or ``None``.
        port: the server's port to send as ``port=``, or ``None``.
    """

    host: str | None = attrs.field(default=None)
    port: int | None = attrs.field(default=None)
    name: str = attrs.field(default="OAUTHBEARER", init=False)

    @host.validator
    def _check_host(self, attribute: attrs.Attribute[str | None], value: str | None) -> None:
        if value is not None and (
            not value or not all(0x21 <= ord(c) <= 0x7E and c != "," for c in value)
        ):
            raise ValueError("OAUTHBEARER: host must be printable ASCII without spaces or ','")

    @port.validator
    def _check_port(self, attribute: attrs.Attribute[int | None], value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not 0 < value < 65536):
            raise ValueError("OAUTHBEARER: port must be a number from 1 to 65535")

    def start(self, username: str, password: str) -> Exchange:
        """Return the exchange; ``password`` is the bearer token."""
        return self._run(username, password)

    def _run(self, username: str, token: str) -> Exchange:
        _check_bearer(self.name, username, token)
        # RFC 7628 §3.1: gs2-header (RFC 5801) then kvpairs, each ended by ^A, then ^A.
        pairs = []
        if self.host is not None:
            pairs.append(f"host={self.host}")
        if self.port is not None:
            pairs.append(f"port={self.port}")
        pairs.append(f"auth=Bearer {token}")
        kvpairs = "".join(f"{pair}\x01" for pair in pairs)
        sent = yield f"n,a={_saslname(username)},\x01{kvpairs}\x01".encode()
        if sent is None:
            return
        # RFC 7628 §3.2.3: the error JSON is answered with the dummy response %x01.
        _expect_success(self.name, (yield b"\x01"))


# -- SCRAM-SHA-256 -----------------------------------------------------------------------------

#: More PBKDF2 iterations than this are refused: a hostile server could otherwise make us
#: spend minutes of CPU. RFC 7677 §4 asks for at least 4096; real servers use 4096 to 100k.
MAX_SCRAM_ITERATIONS = 1_000_000
_POSIT_NUMBER = re.compile(r"[1-9][0-9]{0,6}")  # up to 9,999,999


def _default_nonce() -> str:
    # RFC 5802 §5.1: a printable, comma-free, unpredictable nonce; 24 random bytes.
    return secrets.token_urlsafe(24)


def _saslname(name: str) -> str:
    # RFC 5802 §5.1: "=" and "," in a user name are sent as "=3D" and "=2C".
    return name.replace("=", "=3D").replace(",", "=2C")


def _parse_attributes(name: str, message: bytes) -> dict[str, str]:
    try:
        text = message.decode("utf-8")
    except UnicodeDecodeError:
        raise _unexpected(name, "the server's message is not UTF-8") from None
    attributes: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or len(key) != 1 or key in attributes:
            raise _unexpected(name, "the server's message is malformed")
        attributes[key] = value
    return attributes


def _b64decode(name: str, text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise _unexpected(name, "the server's message holds invalid base64") from None


@attrs.frozen(kw_only=True)
class ScramSHA256:
    """SCRAM-SHA-256 (RFC 5802, RFC 7677) without channel binding.

    The exchange verifies the server's final signature and raises
    :class:`~mailrelay.errors.AuthenticationError` when it is wrong or missing.

    Attributes:
        nonce: returns the client nonce; the default draws from :mod:`secrets`.
            Tests inject a fixed nonce to reproduce RFC 7677 §3.
    """

    nonce: Callable[[], str] = attrs.field(default=_default_nonce, repr=False)
    name: str = attrs.field(default="SCRAM-SHA-256", init=False)

    def start(self, username: str, password: str) -> Exchange:
        """Return the exchange; see the module docstring for the protocol."""
        return self._run(username, password)

    def _run(self, username: str, password: str) -> Exchange:
        name = self.name
        user = _saslname(saslprep(username, what="user name"))
        secret = saslprep(password, what="password").encode()
        client_nonce = self.nonce()
        if not client_nonce or not all(0x21 <= ord(c) <= 0x7E and c != "," for c in client_nonce):
            raise AuthenticationError(f"{name}: the client nonce must be printable ASCII, no ','")

        # RFC 5802 §7: gs2-header "n,," = no channel binding, no authzid.
        client_first_bare = f"n={user},r={client_nonce}"
        server_first = yield f"n,,{client_first_bare}".encode()
        if server_first is None:
            raise _unexpected(name, "the server reported success without a challenge")

        attributes = _parse_attributes(name, server_first)
        if "e" in attributes:
            raise _unexpected(name, f"the server refused: {attributes['e'][:100]}")
        if "m" in attributes:
            # RFC 5802 §5.1: a client MUST fail on reserved-mext it does not understand.
            raise _unexpected(name, "the server requires an extension we do not support")
        try:
            nonce, salt_text, iterations_text = attributes["r"], attributes["s"], attributes["i"]
        except KeyError:
            raise _unexpected(name, "the server's first message lacks r, s or i") from None
        # RFC 5802 §5.1: the server's nonce MUST start with ours (and add something).
        if not nonce.startswith(client_nonce) or len(nonce) == len(client_nonce):
            raise _unexpected(name, "the server's nonce does not extend ours")
        # RFC 5802 §7 posit-number, in ASCII digits (str.isdigit would also take "²", which
        # int() refuses, and other scripts' digits) and short enough for the maximum.
        if _POSIT_NUMBER.fullmatch(iterations_text) is None or not (
            int(iterations_text) <= MAX_SCRAM_ITERATIONS
        ):
            raise _unexpected(name, "the server's iteration count is out of range")
        salt = _b64decode(name, salt_text)

        # RFC 5802 §3: SaltedPassword := Hi(Normalize(password), salt, i) (PBKDF2-HMAC).
        salted = hashlib.pbkdf2_hmac("sha256", secret, salt, int(iterations_text))
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        stored_key = hashlib.sha256(client_key).digest()
        # "biws" is base64("n,,"): the gs2-header echoed as channel-binding data.
        client_final_without_proof = f"c=biws,r={nonce}"
        auth_message = ",".join(
            (client_first_bare, server_first.decode(), client_final_without_proof)
        ).encode()
        client_signature = hmac.digest(stored_key, auth_message, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, client_signature, strict=True))
        server_key = hmac.digest(salted, b"Server Key", "sha256")
        expected = hmac.digest(server_key, auth_message, "sha256")

        proof_text = base64.b64encode(proof).decode()
        server_final = yield f"{client_final_without_proof},p={proof_text}".encode()
        if server_final is None:
            # RFC 5802 §5: the client MUST verify the server signature; a 235 without it
            # means we cannot tell the server from an impostor.
            raise _unexpected(name, "the server reported success without proving its identity")
        final = _parse_attributes(name, server_final)
        if "e" in final:
            raise _unexpected(name, f"the server refused: {final['e'][:100]}")
        if "v" not in final:
            raise _unexpected(name, "the server's final message lacks its signature")
        if not hmac.compare_digest(_b64decode(name, final["v"]), expected):
            raise _unexpected(
                name, "the server's signature is wrong (it does not know the password)"
            )
        # RFC 4954 §4: server-final arrives in a 334; the client answers with an empty response.
        _expect_success(name, (yield b""))


# -- SASLprep ----------------------------------------------------------------------------------

_PROHIBITED = (
    stringprep.in_table_c12,
    stringprep.in_table_c21_c22,
    stringprep.in_table_c3,
    stringprep.in_table_c4,
    stringprep.in_table_c5,
    stringprep.in_table_c6,
    stringprep.in_table_c7,
    stringprep.in_table_c8,
    stringprep.in_table_c9,
)


def saslprep(text: str, *, what: str = "string") -> str:
    """Prepare ``text`` with SASLprep (RFC 4013) as a query (unassigned code points allowed).

    Raises:
        AuthenticationError: when the text holds a prohibited character, breaks the
            bidirectional rules, or is empty after preparation. The message names ``what``
            failed, never the text itself.
    """
    if text.isascii() and all(0x20 <= ord(c) < 0x7F for c in text):
        prepared = text  # the common case: printable ASCII maps to itself
    else:
        # RFC 4013 §2.1: non-ASCII spaces -> SPACE; "commonly mapped to nothing" -> removed.
        mapped = "".join(
            " " if stringprep.in_table_c12(c) else c for c in text if not stringprep.in_table_b1(c)
        )
        # RFC 4013 §2.2: Unicode normalization form KC, with Unicode 3.2 data.
        prepared = unicodedata.ucd_3_2_0.normalize("NFKC", mapped)
        # RFC 4013 §2.3: prohibited output.
        if any(check(c) for c in prepared for check in _PROHIBITED):
            raise AuthenticationError(f"the {what} holds a character SASLprep prohibits")
        # RFC 3454 §6: bidirectional characters.
        has_rtl = any(stringprep.in_table_d1(c) for c in prepared)
        if has_rtl and (
            any(stringprep.in_table_d2(c) for c in prepared)
            or not (stringprep.in_table_d1(prepared[0]) and stringprep.in_table_d1(prepared[-1]))
        ):
            raise AuthenticationError(f"the {what} breaks SASLprep's bidirectional rules")
    if not prepared:
        raise AuthenticationError(f"the {what} is empty after SASLprep")
    return prepared


# -- choosing ----------------------------------------------------------------------------------

#: Every mechanism we implement, by name; the order is our preference, strongest first.
#: XOAUTH2 and OAUTHBEARER come last and are never chosen unless the caller names them.
MECHANISMS: dict[str, Mechanism] = {
    m.name: m for m in (ScramSHA256(), CramMD5(), Plain(), Login(), XOAuth2(), OAuthBearer())
}

#: The mechanisms whose "password" is an OAuth 2.0 bearer token.
BEARER_MECHANISMS = frozenset({"XOAUTH2", "OAUTHBEARER"})

_AUTOMATIC = ("SCRAM-SHA-256", "CRAM-MD5", "PLAIN", "LOGIN")


def candidate_mechanisms(
    offered: Iterable[str], *, preferred: Sequence[str] | None = None
) -> tuple[Mechanism, ...]:
    """The mechanisms to try, in order: the ones both we and the server support.

    Args:
        offered: the server's mechanism names (the EHLO ``AUTH`` keyword's parameters).
        preferred: the caller's choice, in order of preference; ``None`` means "strongest
            first" (SCRAM-SHA-256, CRAM-MD5, PLAIN, LOGIN; never XOAUTH2 or OAUTHBEARER).

    Raises:
        AuthenticationError: when ``preferred`` names a mechanism we do not implement.
    """
    server = {m.upper() for m in offered}
    names = _AUTOMATIC if preferred is None else tuple(n.upper() for n in preferred)
    unknown = [n for n in names if n not in MECHANISMS]
    if unknown:
        raise AuthenticationError(f"unsupported SASL mechanism(s): {', '.join(unknown)}")
    return tuple(MECHANISMS[n] for n in dict.fromkeys(names) if n in server)


def choose_mechanism(
    offered: Iterable[str], *, preferred: Sequence[str] | None = None
) -> Mechanism:
    """The mechanism to use: the first of :func:`candidate_mechanisms`.

    Raises:
        AuthenticationError: when the server offers none of the acceptable mechanisms.
    """
    offered = frozenset(offered)
    candidates = candidate_mechanisms(offered, preferred=preferred)
    if not candidates:
        server = ", ".join(sorted(offered)) or "none"
        raise AuthenticationError(
            f"no SASL mechanism in common with the server (it offers: {server})"
        )
    return candidates[0]
