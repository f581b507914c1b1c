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

# RFC 5321 §4.2: "ddd " ends a reply, "ddd-" continues it. One dict lookup on a
# line's first four octets checks the digits, the 200-599 range and the separator.
_PREFIXES: Final[dict[bytes, tuple[int, bool]]] = {
    b"%d%s" % (code, separator): (code, separator == b" ")
    for code in range(200, 600)
    for separator in (b" ", b"-")
}

_STATUS_CACHE: dict[str, EnhancedStatus | None] = {}

_new = object.__new__
# Reply is a slotted attrs class: its fields are member descriptors, and setting
# through them directly is the cheapest way to fill a new instance.
_set_code = Reply.__dict__["code"].__set__
_set_lines = Reply.__dict__["lines"].__set__
_set_enhanced = Reply.__dict__["enhanced"].__set__


def _make_reply(code: int, lines: list[str]) -> Reply:
    enhanced = None
    first = lines[0]
    # RFC 2034 §3 / RFC 3463 §2: only an enhanced code of the reply's own class
    # counts (there is no class 3, so a 354 never has one). "d." starts every code.
    if first[1:2] == "." and ord(first[0]) == 48 + code // 100:
        # The code can only span the text up to the first space, and servers
        # repeat a handful of codes: look that token up before parsing it.
        token = first.partition(" ")[0]
        try:
            enhanced = _STATUS_CACHE[token]
        except KeyError:
            enhanced = EnhancedStatus.search(token)
            if len(_STATUS_CACHE) >= _CACHE_SIZE:
                _STATUS_CACHE.clear()
            _STATUS_CACHE[token] = enhanced
    # Reply's validators check the code range and a non-empty ``lines`` tuple;
    # the reader has checked both, so fill in the frozen instance directly, as
    # attrs' own __init__ does for frozen classes (it bypasses __setattr__ too).
    reply: Reply = _new(Reply)
    _set_code(reply, code)
    _set_lines(reply, tuple(lines))
    _set_enhanced(reply, enhanced)
    return reply


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
        "_size",
        "replies",
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
        #: Parsed replies not yet taken, oldest first (``pop()`` takes them in order).
        self.replies: deque[Reply] = deque()
        self._error: RemoteProtocolError | None = None
        self._cache: dict[bytes, Reply] = {}

    @property
    def has_data(self) -> bool:
        """Whether any byte has been received that was not yet taken as a reply:
        a queued reply, a partial line or reply, or a queued error."""
        return bool(self.replies or self._buffer or self._lines or self._error)

    @property
    def has_partial(self) -> bool:
        """Whether an unfinished line or multi-line reply is buffered."""
        return bool(self._buffer or self._lines)

    @property
    def buffered(self) -> int:
        """How many octets of unfinished line are buffered (never above the line limit + 1)."""
        return len(self._buffer)

    def pop(self) -> Reply | None:
        """The next complete reply, or None when none is ready.

        Raises:
            RemoteProtocolError: the bytes after the replies already taken are malformed.
        """
        if self.replies:
            return self.replies.popleft()
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
        complete = buffer[:end]
        # Usually every line ends in CRLF: split on it and skip the per-line CR check.
        if complete.count(b"\r\n") == complete.count(b"\n") and complete.endswith(b"\r"):
            lines = complete[:-1].split(b"\r\n")
            crlf = True
        else:
            lines = complete.split(b"\n")
            crlf = False
        try:
            self._parse_lines(lines, crlf)
        except RemoteProtocolError as exc:
            self._error = exc
            self._buffer = b""
            self._lines = []
            return
        self._check_partial()

    def _parse_lines(self, lines: list[bytes], crlf: bool) -> None:
        # One loop with everything in locals: this is the hot path of the reader.
        cache = self._cache
        cache_get = cache.get
        prefix_get = _PREFIXES.get
        add_reply = self.replies.append
        max_line = self._max_line
        max_reply = self._max_reply
        text_lines = self._lines
        code = self._code
        size = self._size
        for raw in lines:
            if not text_lines:
                # A single-line reply seen before: same bytes, same (immutable) value.
                cached = cache_get(raw)
                if cached is not None:
                    add_reply(cached)
                    continue
                if crlf and len(raw) <= max_line:
                    head = prefix_get(raw[:4])
                    if head is not None and head[1] and len(raw) + 2 <= max_reply:
                        # A new single-line reply ("250 text"): the common case,
                        # with the checks below that cannot fail for it skipped.
                        reply = _make_reply(head[0], [raw[4:].decode("utf-8", "replace")])
                        if len(raw) <= _CACHE_LINE:
                            if len(cache) >= _CACHE_SIZE:
                                cache.clear()
                            cache[raw] = reply
                        add_reply(reply)
                        continue
            line = raw[:-1] if not crlf and raw[-1:] == b"\r" else raw
            length = len(line)
            if length > max_line:
                raise RemoteProtocolError(f"reply line longer than {max_line} octets")
            # RFC 5321 §4.2: Reply-line = *( Reply-code "-" [ textstring ] CRLF )
            #                Reply-code [ SP textstring ] CRLF
            head = prefix_get(line[:4])
            if head is None:
                # A bare "250" is a complete last line; anything else is malformed
                # (short line, non-digit, code outside 200-599, unknown separator).
                head = prefix_get(line + b" ") if length == 3 else None
                if head is None:
                    raise RemoteProtocolError(f"malformed reply line {line[:80]!r}")
            line_code, last = head
            if text_lines and line_code != code:
                # RFC 5321 §4.2.1: every line of a multi-line reply has the same code.
                raise RemoteProtocolError(
                    f"multi-line reply changed its code from {code} to {line_code}"
                )
            code = line_code
            size += length + 2
            if size > max_reply:
                raise RemoteProtocolError(f"reply longer than {max_reply} octets")
            text_lines.append(line[4:].decode("utf-8", "replace"))
            if last:
                reply = _make_reply(code, text_lines)
                if length <= _CACHE_LINE and len(text_lines) == 1:
                    if len(cache) >= _CACHE_SIZE:
                        cache.clear()
                    cache[raw] = reply
                add_reply(reply)
                text_lines = []
                size = 0
        self._lines = text_lines
        self._code = code
        self._size = size

    def _check_partial(self) -> None:
        # The unfinished line may end with the CR of its CRLF: allow one octet more.
        if len(self._buffer) > self._max_line + 1:
            self._error = RemoteProtocolError(
                f"reply line longer than {self._max_line} octets without an end"
            )
            self._buffer = b""
            self._lines = []


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
