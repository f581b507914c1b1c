"""The reply parser: server bytes in, :class:`~mailrelay.reply.Reply` values out.

Rules (RFC 5321 §4.2 unless noted):

* A reply is one or more lines ``code SP text`` / ``code "-" text`` ending in
  CRLF; every line but the last uses "-", the last uses SP (or has no text at
  all: a bare ``250`` is a whole reply). Every line of one reply must carry the
  same code (§4.2.1); a line that breaks this is a protocol error.
* The code is three ASCII digits from 200 to 599 (§4.2: the first digit is 2-5).
  Anything else -- a short line, a letter, a 1xx or 6xx code, an unknown
  separator -- is a :class:`~mailrelay.errors.RemoteProtocolError`.
* Bare LF is tolerated as a line end (many servers and test fakes send it);
  a CR directly before the LF is removed, other CRs stay in the text.
* Text is decoded as UTF-8 with invalid bytes replaced (RFC 6531 §3.7.3 allows
  UTF-8 in replies; older servers send Latin-1): never a ``UnicodeDecodeError``.
* Enhanced status codes (RFC 3463, RFC 2034 §3): parsed from the start of the
  first line whenever they are well formed *and* their class equals the reply's
  first digit. This does not depend on whether the server announced
  ENHANCEDSTATUSCODES: the greeting and the EHLO reply come before we know, many
  servers send them anyway, and the class check keeps accidental matches out.
* Bounded: a line longer than ``max_line_length`` octets (CRLF excluded), or a
  reply longer than ``max_reply_length`` octets in total, is a
  ``RemoteProtocolError``. An unfinished line is checked as it grows, so a server
  that sends bytes without ever ending the line cannot make the buffer grow past
  the limit (plus at most one ``feed``'s worth of data, which the caller held anyway).

Theory of operation: :meth:`ReplyReader.feed` splits off every complete line
at once (``bytes.split``) and parses it, so the cost is a few C-level calls per
line. Parsed replies wait in a queue until taken with :meth:`ReplyReader.pop`; an
error is queued after the replies that preceded it, so the caller sees
everything the server said correctly before it sees what it said wrong. Small
replies are memoized by their exact bytes: servers repeat the same few
replies ("250 2.1.5 Ok") and a :class:`Reply` is immutable.
"""

from __future__ import annotations

from collections import deque
from typing import Final

from mailrelay.errors import RemoteProtocolError
from mailrelay.reply import EnhancedStatus, Reply

__all__ = ["DEFAULT_MAX_LINE_LENGTH", "DEFAULT_MAX_REPLY_LENGTH", "ReplyReader", "parse_replies"]

#: Default bound on one reply line, CRLF excluded (RFC 5321 §4.5.3.1.5 says 512; real
#: servers send longer EHLO and error lines, so we are generous).
DEFAULT_MAX_LINE_LENGTH: Final = 4096
#: Default bound on a whole multi-line reply.
DEFAULT_MAX_REPLY_LENGTH: Final = 65536

_CACHE_SIZE: Final = 128
_CACHE_LINE: Final = 200
_DIGITS: Final = frozenset(b"0123456789")


def _make_reply(code: int, lines: list[str]) -> Reply:
    enhanced = None
    first = lines[0]
    # RFC 2034 §3 / RFC 3463 §2: only an enhanced code of the reply's own class
    # counts (there is no class 3, so a 354 never has one).
    if first and ord(first[0]) == 48 + code // 100:
        enhanced = EnhancedStatus.search(first)
    return Reply(code=code, lines=tuple(lines), enhanced=enhanced)


class ReplyReader:
    """Incremental parser of server replies with bounded buffering.

    Args:
        max_line_length: the longest line accepted, in octets, CRLF excluded.
        max_reply_length: the longest reply accepted, in octets, all lines included.
    """

    __slots__ = (
        "_buffer",
        "_cache",
        "_code",
        "_error",
        "_lines",
        "_max_line",
        "_max_reply",
        "_replies",
        "_size",
    )

    def __init__(
        self,
        *,
        max_line_length: int = DEFAULT_MAX_LINE_LENGTH,
        max_reply_length: int = DEFAULT_MAX_REPLY_LENGTH,
    ) -> None:
        if max_line_length < 3 or max_reply_length < max_line_length:
            raise ValueError("need max_line_length >= 3 and max_reply_length >= max_line_length")
        self._max_line = max_line_length
        self._max_reply = max_reply_length
        self._buffer = b""
        self._lines: list[str] = []
        self._code = 0
        self._size = 0
        self._replies: deque[Reply] = deque()
        self._error: RemoteProtocolError | None = None
        self._cache: dict[bytes, Reply] = {}

    @property
    def has_data(self) -> bool:
        """Whether any byte has been received that was not yet taken as a reply:
        a queued reply, a partial line or reply, or a queued error."""
        return bool(self._replies or self._buffer or self._lines or self._error)

    @property
    def has_partial(self) -> bool:
        """Whether an unfinished line or multi-line reply is buffered."""
        return bool(self._buffer or self._lines)

    def pop(self) -> Reply | None:
        """The next complete reply, or None when none is ready.

        Raises:
            RemoteProtocolError: the bytes after the replies already taken are malformed.
        """
        if self._replies:
            return self._replies.popleft()
        if self._error is not None:
            raise self._error
        return None

    def feed(self, data: bytes) -> None:
        """Take more bytes from the server and parse every complete line in them."""
        if self._error is not None:
            return  # Nothing after a malformed reply can be trusted.
        buffer = self._buffer + data if self._buffer else data
        end = buffer.rfind(b"\n")
        if end < 0:
            self._buffer = buffer
            self._check_partial()
            return
        self._buffer = buffer[end + 1 :]
        try:
            cache = self._cache
            for line in buffer[:end].split(b"\n"):
                if not self._lines:
                    # Fast path: a single-line reply seen before (same bytes, same value).
                    cached = cache.get(line)
                    if cached is not None:
                        self._replies.append(cached)
                        continue
                self._line(line)
            self._check_partial()
        except RemoteProtocolError as exc:
            self._error = exc
            self._buffer = b""
            self._lines = []

    def _check_partial(self) -> None:
        # The unfinished line may end with the CR of its CRLF: allow one octet more.
        if len(self._buffer) > self._max_line + 1:
            self._error = RemoteProtocolError(
                f"reply line longer than {self._max_line} octets without an end"
            )
            self._buffer = b""
            self._lines = []

    def _line(self, raw: bytes) -> None:
        line = raw
        raw_length = len(line) + 1
        if line.endswith(b"\r"):
            line = line[:-1]
        length = len(line)
        if length > self._max_line:
            raise RemoteProtocolError(f"reply line longer than {self._max_line} octets")
        # RFC 5321 §4.2: Reply-line = *( Reply-code "-" [ textstring ] CRLF )
        #                Reply-code [ SP textstring ] CRLF
        if length < 3 or line[0] not in _DIGITS or line[1] not in _DIGITS or line[2] not in _DIGITS:
            raise RemoteProtocolError(f"malformed reply line {line[:80]!r}")
        code = int(line[:3])
        if code < 200 or code > 599:
            raise RemoteProtocolError(f"reply code out of range 200-599: {code}")
        if self._lines and code != self._code:
            # RFC 5321 §4.2.1: every line of a multi-line reply has the same code.
            raise RemoteProtocolError(
                f"multi-line reply changed its code from {self._code} to {code}"
            )
        self._size += raw_length
        if self._size > self._max_reply:
            raise RemoteProtocolError(f"reply longer than {self._max_reply} octets")
        separator = line[3:4]
        text = line[4:].decode("utf-8", "replace")
        if separator == b"-":
            self._code = code
            self._lines.append(text)
            return
        if separator not in (b" ", b""):
            raise RemoteProtocolError(f"malformed reply line {line[:80]!r}")
        lines = self._lines
        lines.append(text)
        reply = _make_reply(code, lines)
        if len(lines) == 1 and raw_length <= _CACHE_LINE:
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.clear()
            self._cache[raw] = reply
        self._replies.append(reply)
        self._lines = []
        self._size = 0
        self._code = 0


def parse_replies(
    data: bytes,
    *,
    max_line_length: int = DEFAULT_MAX_LINE_LENGTH,
    max_reply_length: int = DEFAULT_MAX_REPLY_LENGTH,
) -> list[Reply]:
    """Parse every complete reply in ``data`` (a convenience for tests and tools).

    Raises:
        RemoteProtocolError: malformed or over-long input, or an unfinished reply at the end.
    """
    reader = ReplyReader(max_line_length=max_line_length, max_reply_length=max_reply_length)
    reader.feed(data)
    replies = []
    while (reply := reader.pop()) is not None:
        replies.append(reply)
    if reader.has_partial:
        raise RemoteProtocolError("unfinished reply at end of data")
    return replies
