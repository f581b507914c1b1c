"""Wire-form helpers for :mod:`mailrelay.message`: line endings, chunking, header blocks.

Private to the package. Everything here works on bytes and knows nothing of
addresses or MIME; :mod:`mailrelay.message` builds its values from these pieces.

Rules this module keeps:

* Normalized data ends every line in CRLF: a bare CR or a bare LF becomes CRLF
  (RFC 5321 §2.3.8 forbids sending them bare).
* A chunk never ends between the CR and the LF of a line ending, so every chunk
  of normalized data is itself free of bare CR and LF.
* The header block ends after its first empty line (RFC 5322 §2.1), or, in a
  malformed message, before the first line that is neither a field nor a
  continuation (the :mod:`email` package reads such messages the same way).
* ``Bcc`` and ``Resent-Bcc`` fields are kept as values but left out of the wire
  form (RFC 5322 §3.6.3, §3.6.6).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

__all__ = [
    "BLIND_FIELDS",
    "READ_SIZE",
    "Normalizer",
    "find_head_end",
    "normalize",
    "rechunk",
    "scan_head",
    "slices",
    "split_head",
]

#: How much a streaming reader asks for at a time.
READ_SIZE = 1 << 16

#: Fields whose addresses go in the envelope only (RFC 5322 §3.6.3, §3.6.6).
BLIND_FIELDS = frozenset({"bcc", "resent-bcc"})

# RFC 5321 §2.3.8: lines end in CRLF; a bare CR or LF is normalized to CRLF.
_LINE_END = re.compile(rb"\r\n|\r|\n")
# RFC 5322 §2.2: a field name is printable US-ASCII except the colon. The
# obsolete syntax (RFC 5322 §4.5) allows white space before the colon.
_FIELD_START = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")
_UNFOLD = re.compile(rb"\r\n(?=[ \t])")


class Normalizer:
    """Turns a stream of raw pieces into CRLF-normalized pieces.

    A CR at the end of a piece is held back until the next piece shows whether
    an LF follows, so no output piece ends in a bare CR.
    """

    def __init__(self) -> None:
        self._pending_cr = False

    def feed(self, data: bytes) -> bytes:
        """Return the normalized form of ``data`` (less a trailing CR, held back)."""
        if self._pending_cr:
            data = b"\r" + data
            self._pending_cr = False
        if data.endswith(b"\r"):
            data = data[:-1]
            self._pending_cr = True
        return normalize(data)

    def flush(self) -> bytes:
        """Return what is held back at the end of the stream."""
        if self._pending_cr:
            self._pending_cr = False
            return b"\r\n"
        return b""


def normalize(data: bytes) -> bytes:
    """Return ``data`` with every bare CR or LF turned into CRLF."""
    if b"\r" not in data:
        # The common Unix case: only LFs, each bare.
        return data.replace(b"\n", b"\r\n")
    return _LINE_END.sub(b"\r\n", data)


def _cut(data: bytes | bytearray, start: int, size: int) -> int:
    # Normalized data has an LF after every CR, so moving the cut back by one
    # when it would fall between them keeps each CRLF in one piece.
    end = start + size
    if end < len(data) and data[end - 1] == 0x0D:
        end -= 1
    return end


def slices(data: bytes, size: int) -> Iterator[bytes]:
    """Yield normalized ``data`` in pieces of at most ``size`` (>= 2) bytes."""
    if len(data) <= size:
        # The common case for in-memory messages: the bytes object itself.
        if data:
            yield data
        return
    start = 0
    while start < len(data):
        end = _cut(data, start, size)
        yield data[start:end]
        start = end


def rechunk(pieces: Iterable[bytes], size: int) -> Iterator[bytes]:
    """Regroup normalized ``pieces`` into pieces of at most ``size`` bytes."""
    buffer = bytearray()
    for piece in pieces:
        buffer += piece
        # Keep at least one byte beyond a cut so _cut can see what follows.
        while len(buffer) > size:
            end = _cut(buffer, 0, size)
            yield bytes(buffer[:end])
            del buffer[:end]
    if buffer:
        yield bytes(buffer)


def find_head_end(data: bytes, *, final: bool) -> int | None:
    """Return where the body starts in raw ``data``, or ``None`` if more is needed.

    The header block ends after its first empty line (RFC 5322 §2.1), or, in a
    malformed message, before the first line that is neither a field nor a
    continuation (the email package reads such messages the same way).
    """
    return scan_head(data, final=final)[0]


def scan_head(data: bytes, *, final: bool, start: int = 0) -> tuple[int | None, int]:
    """:func:`find_head_end` for data that grows: scan ``data`` from ``start``.

    Returns:
        where the body starts (or ``None`` if more is needed), and where to start the
        scan of the same data with more appended: the lines before it are all header
        lines, so a streaming reader scans each byte once, not once per read.
    """
    pos = start
    while True:
        match = _LINE_END.search(data, pos)
        if match is None:
            if not final:
                return None, pos
            line = data[pos:]
            return (len(data) if not line or _is_head_line(line, pos == 0) else pos), pos
        if not final and match.group() == b"\r" and match.end() == len(data):
            return None, pos  # a CR at the end may be the first half of a CRLF
        line = data[pos : match.start()]
        if not line:
            return match.end(), pos
        if not _is_head_line(line, pos == 0):
            return pos, pos
        pos = match.end()


def _is_head_line(line: bytes, first: bool) -> bool:
    if line[:1] in (b" ", b"\t"):
        return not first  # RFC 5322 §2.2.3: a folded continuation line
    return _FIELD_START.match(line) is not None


def split_head(head: bytes) -> tuple[tuple[tuple[str, str], ...], bytes]:
    """Split a normalized header block into its fields and its wire form.

    Field values are unfolded (RFC 5322 §2.2.3), stripped and decoded as UTF-8;
    the wire form leaves out the blind fields.
    """
    # Each field's lines are collected and joined once: adding every continuation line to
    # the field so far would copy the field at each line, quadratic in a hostile field of
    # many short continuation lines (a 1 MiB header block took half a minute).
    raw_fields: list[list[bytes]] = []
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and raw_fields and raw_fields[-1][0] != b"\r\n":
            raw_fields[-1].append(line)
        else:
            raw_fields.append([line])
    fields: list[tuple[str, str]] = []
    wire: list[bytes] = []
    for lines in raw_fields:
        raw = lines[0] if len(lines) == 1 else b"".join(lines)
        name, colon, value = raw.partition(b":")
        if not colon or raw == b"\r\n":
            wire.append(raw)
            continue
        field_name = name.rstrip(b" \t").decode("ascii")
        field_value = _UNFOLD.sub(b"", value).strip(b" \t\r\n").decode("utf-8", "replace")
        fields.append((field_name, field_value))
        if field_name.lower() not in BLIND_FIELDS:
            wire.append(raw)
    return tuple(fields), b"".join(wire)
