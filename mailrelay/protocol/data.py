"""Message data for DATA: CRLF normalization and dot-stuffing, streamed.

Rules:

* RFC 5321 §2.3.8: lines end in CRLF and nowhere else is CR or LF allowed, so a
  bare CR, a bare LF and CRLF each become one CRLF.
* RFC 5321 §4.5.2: a line that starts with "." gets one more "." in front, so
  that the only line consisting of a single "." is the terminator.
* RFC 5321 §4.1.1.4: the data ends with exactly one ``CRLF . CRLF``; if the body
  did not end with CRLF, one is added first (an empty body sends only ``.CRLF``).

Theory of operation: each chunk is transformed with whole-buffer ``bytes``
operations (``count``, ``replace`` and one compiled regular expression when the
line endings are mixed), never a Python loop per byte. A caller whose pieces are
already CRLF-normalized (``Message.chunks()``) says so, and the line endings are
then not counted again. Two facts survive
between chunks, which is all a chunk boundary can split:

* a trailing CR is held back, because the next chunk may start with its LF;
* whether the output so far ends at the start of a line, because a "." at the
  very start of the next chunk then needs stuffing.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["DotStuffer", "normalize_line_endings", "stuff"]

_LINE_BREAK: Final = re.compile(rb"\r\n|\r|\n")


def normalize_line_endings(data: bytes) -> bytes:
    """Turn every CRLF, bare CR and bare LF in ``data`` into CRLF."""
    crlf = data.count(b"\r\n")
    if crlf == data.count(b"\r") and crlf == data.count(b"\n"):
        return data  # Already CRLF throughout: the common case for Message.chunks().
    if b"\r" not in data:
        return data.replace(b"\n", b"\r\n")
    return _LINE_BREAK.sub(b"\r\n", data)


class DotStuffer:
    """Streaming encoder for one message's DATA section.

    Feed the message in pieces of any size with :meth:`chunk`, then call
    :meth:`end` once; concatenating all the returned bytes gives the exact wire
    form of the data, terminator included.
    """

    __slots__ = ("_at_line_start", "_held_cr")

    def __init__(self) -> None:
        self._at_line_start = True
        self._held_cr = False

    def reset(self) -> None:
        """Start over for a new message (as a new DotStuffer would)."""
        self._at_line_start = True
        self._held_cr = False

    def chunk(self, data: bytes, *, normalized: bool = False) -> bytes:
        """Return the wire bytes for the next piece of the message.

        Args:
            data: the piece.
            normalized: ``data`` is known to hold no bare CR or LF (``Message.chunks()``
                promises it for every piece): the line endings are not checked again, which
                is most of the cost of a piece. Wrong bytes would go out as they are.
        """
        if self._held_cr:
            data = b"\r" + data
            self._held_cr = False
        if data.endswith(b"\r"):
            # The LF that would complete this CRLF may be in the next chunk.
            data = data[:-1]
            self._held_cr = True
        if not data:
            return b""
        if not normalized:
            data = normalize_line_endings(data)
        # RFC 5321 §4.5.2: a leading period on any line is doubled.
        data = data.replace(b"\r\n.", b"\r\n..")
        if self._at_line_start and data[0] == 0x2E:
            data = b"." + data
        self._at_line_start = data.endswith(b"\r\n")
        return data

    def stuffed(self, data: bytes) -> bytes:
        """Pass through bytes already in wire form (from an earlier :meth:`chunk` of the same
        content), keeping track of where the line ends.

        Raises:
            ValueError: a chunk boundary is pending (a held-back CR, or not at the start of
                a line), so wire-form bytes cannot simply follow.
        """
        if self._held_cr or not self._at_line_start:
            raise ValueError("wire-form data must start a line")
        if data:
            self._at_line_start = data.endswith(b"\r\n")
        return data

    def end(self) -> bytes:
        """Return the bytes that finish the data: any held-back line end, a CRLF
        if the body did not end with one, and the ``.CRLF`` terminator."""
        out = b""
        if self._held_cr:
            # A bare CR at the very end is a line break like any other.
            self._held_cr = False
            out = b"\r\n"
        elif not self._at_line_start:
            out = b"\r\n"
        self._at_line_start = True
        return out + b".\r\n"


def stuff(body: bytes) -> bytes:
    """The whole DATA section for ``body`` in one call (normalized, stuffed, terminated)."""
    stuffer = DotStuffer()
    return stuffer.chunk(body) + stuffer.end()
