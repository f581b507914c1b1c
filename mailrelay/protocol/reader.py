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
at once and parses them in one loop, so the cost is a few C-level calls per line.
Replies are nearly always ASCII: then the whole block of lines is decoded in one
call and split as text, and a line's characters are its octets. A block holding
any other octet is split as bytes and decoded line by line, and the limits are
checked on its octets in a first pass. Parsed replies wait in a queue until taken
with :meth:`ReplyReader.pop`; an error is queued after the replies that preceded
it, so the caller sees everything the server said correctly before it sees what
it said wrong.

Servers repeat themselves, and two bounded caches use that:

* A line's *head* (its code, whether it ends its reply, and its enhanced status
  code) is looked up by the line's first ten characters, which decide it for the
  usual ``250 2.1.5 ...`` form. A line whose text cannot start with a status code
  takes its head from the table of prefixes instead, and only fills free room in
  the cache, so texts that vary from their first character cannot flush it.
* Small single-line replies are memoized by their exact text ("250 2.1.5 Ok" comes
  back for every recipient; a :class:`Reply` is immutable). When a feed brings
  mostly new replies, the memo is paused for a while: looking up and storing
  replies that never come back costs more than it saves.

A :class:`Reply` is built by filling its slots directly, as attrs does, once the
reader has checked what Reply's validators would.
"""

from __future__ import annotations

from collections import deque
from typing import Final

from mailrelay._slots import new_instance, slot_setters
from mailrelay.errors import RemoteProtocolError
from mailrelay.reply import EnhancedStatus, Reply

__all__ = ["DEFAULT_MAX_LINE_LENGTH", "DEFAULT_MAX_REPLY_LENGTH", "ReplyReader", "parse_replies"]

#: Default bound on one reply line, CRLF excluded (RFC 5321 §4.5.3.1.5 says 512; real
#: servers send longer EHLO and error lines, so we are generous).
DEFAULT_MAX_LINE_LENGTH: Final = 4096
#: Default bound on a whole multi-line reply.
DEFAULT_MAX_REPLY_LENGTH: Final = 65536

# The memo of single-line replies, per reader: entries, and the longest line kept.
_MEMO_SIZE: Final = 128
_MEMO_LINE: Final = 200
# Judging the memo by one feed takes this many new replies; when it pays less than
# one hit in four, it is left off for the next _MEMO_PAUSE lines.
_MEMO_PROBE: Final = 32
_MEMO_PAUSE: Final = 2048
# The cache of line heads, shared by all readers (heads do not depend on limits;
# its values are immutable, so a race between threads can only cost a lookup).
_HEADS_SIZE: Final = 512
_HEAD_KEY: Final = 10

# What str.splitlines() ends a line at, in ASCII, besides CR and LF. ("" is in it:
# an empty block is also split the slow way.)
_OTHER_BREAKS: Final = "\x0b\x0c\x1c\x1d\x1e"

# A line's head: its code, whether it is its reply's last, and the enhanced status
# code that starts its text.
_Head = tuple[int, bool, EnhancedStatus | None]
_HEADS: dict[str, _Head] = {}

# RFC 5321 §4.2: "ddd " ends a reply, "ddd-" continues it, and a bare "ddd" is a
# complete last line. One dict lookup on a line's first four characters checks the
# digits, the 200-599 range and the separator, and gives the head of a line whose
# text starts with no enhanced status code.
_PREFIXES: Final[dict[str, _Head]] = {
    f"{code}{separator}": (code, separator != "-", None)
    for code in range(200, 600)
    for separator in (" ", "-", "")
}

_new = new_instance
# Reply is a slotted attrs class: its fields are member descriptors, and setting
# through them directly is the cheapest way to fill a new instance.
_set_code, _set_lines, _set_enhanced = slot_setters(Reply, ("code", "lines", "enhanced"))


def _make_reply(code: int, lines: tuple[str, ...], enhanced: EnhancedStatus | None) -> Reply:
    # Reply's validators check the code range and a non-empty ``lines`` tuple;
    # the reader has checked both, so fill in the frozen instance directly, as
    # attrs' own __init__ does for frozen classes (it bypasses __setattr__ too).
    reply: Reply = _new(Reply)
    _set_code(reply, code)
    _set_lines(reply, lines)
    _set_enhanced(reply, enhanced)
    return reply


def _malformed(line: str) -> RemoteProtocolError:
    # A short line, a non-digit, a code outside 200-599 or an unknown separator.
    return RemoteProtocolError(f"malformed reply line {line[:80]!r}")


def _code_changed(code: int, new_code: int) -> RemoteProtocolError:
    return RemoteProtocolError(f"multi-line reply changed its code from {code} to {new_code}")


def _head(line: str) -> _Head:
    """Parse the head of the first line of a reply; cache it when its start decides it."""
    # RFC 5321 §4.2: Reply-line = *( Reply-code "-" [ textstring ] CRLF )
    #                Reply-code [ SP textstring ] CRLF
    prefix = _PREFIXES.get(line[:4])
    if prefix is None:
        raise _malformed(line)
    code, last, _ = prefix
    text = line[4:]
    enhanced = None
    token = ""
    # RFC 2034 §3 / RFC 3463 §2: only an enhanced code of the reply's own class
    # counts (there is no class 3, so a 354 never has one); "d." starts every code.
    if text[1:2] == "." and text[:1] == line[:1] and line[:1] != "3":
        # The code can only span the text up to the first space.
        token = text.partition(" ")[0]
        enhanced = EnhancedStatus.search(token)
    head = (code, last, enhanced)
    # Another line with the same first ten characters has the same head when the
    # line is shorter than that, or when no code can start it, or when the code's
    # token and the space after it lie within them ("250 2.1.5 ", not "250 2.1.50").
    # Only a line with a status code may flush a full cache to make room.
    if len(line) < _HEAD_KEY or len(token) <= _HEAD_KEY - 5:
        if len(_HEADS) >= _HEADS_SIZE:
            if enhanced is None:
                return head
            _HEADS.clear()
        _HEADS[line[:_HEAD_KEY]] = head
    return head


class ReplyReader:
    """Incremental parser of server replies with bounded buffering.

    Args:
        max_line_length: the longest line accepted, in octets, CRLF excluded.
        max_reply_length: the longest reply accepted, in octets, all lines included.

    Attributes:
        replies: parsed replies not yet taken, oldest first.
        error: the error in the bytes after those replies (``pop()`` raises it once they
            are taken), or ``None``. Read-only for callers.
    """

    __slots__ = (
        "_buffer",
        "_code",
        "_enhanced",
        "_lines",
        "_max_line",
        "_max_reply",
        "_memo",
        "_memo_pause",
        "_single_line",
        "_size",
        "error",
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
        # A single-line reply is at most this long: within the line limit, and
        # within the reply limit with its CRLF.
        self._single_line = min(max_line_length, max_reply_length - 2)
        self._buffer = b""
        # The multi-line reply being read: its text so far, code, size in octets
        # and the enhanced status from its first line.
        self._lines: list[str] = []
        self._code = 0
        self._size = 0
        self._enhanced: EnhancedStatus | None = None
        #: Parsed replies not yet taken, oldest first (``pop()`` takes them in order).
        self.replies: deque[Reply] = deque()
        self.error: RemoteProtocolError | None = None
        self._memo: dict[str, Reply] = {}
        # Lines to parse before the memo is used again (see _parse_lines).
        self._memo_pause = 0

    @property
    def has_data(self) -> bool:
        """Whether any byte has been received that was not yet taken as a reply:
        a queued reply, a partial line or reply, or a queued error."""
        return bool(self.replies or self._buffer or self._lines or self.error)

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
        replies = self.replies
        if replies:
            return replies.popleft()
        if self.error is not None:
            raise self.error
        return None

    def feed(self, data: bytes) -> None:
        """Take more bytes from the server and parse every complete line in them."""
        if self.error is not None:
            return  # Nothing after a malformed reply can be trusted.
        buffer = self._buffer + data if self._buffer else data
        end = buffer.rfind(b"\n")
        if end < 0:
            self._buffer = buffer
            self._check_partial()
            return
        self._buffer = buffer[end + 1 :]
        complete = buffer[:end]
        try:
            if complete.isascii():
                # Characters are octets here: decode all lines in one call.
                text = complete.decode("ascii")
                # splitlines() also ends a line at a lone CR, VT, FF and FS/GS/RS.
                # One of those inside the text makes one line more than there are
                # LFs; at its very end (where a CR is the one of a CRLF) it would be
                # dropped silently, so that is checked apart.
                lines = text.splitlines()
                if len(lines) != text.count("\n") + 1 or text[-1:] in _OTHER_BREAKS:
                    lines = [line[:-1] if line[-1:] == "\r" else line for line in text.split("\n")]
                self._parse_lines(lines)
            else:
                self._parse_octets(complete)
        except RemoteProtocolError as exc:
            self.error = exc
            self._buffer = b""
            self._lines = []
            return
        if len(self._buffer) > self._max_line + 1:
            self._check_partial()

    def _parse_octets(self, complete: bytes) -> None:
        # Lines holding other octets than ASCII are decoded one by one, and their
        # characters are no longer octets: the limits are checked here, on the
        # octets, in a first pass; the main loop's own checks on characters (never
        # more than octets) then cannot fail, except where this pass says so.
        raw_lines = [line[:-1] if line[-1:] == b"\r" else line for line in complete.split(b"\n")]
        lines = [line.decode("utf-8", "replace") for line in raw_lines]
        max_line = self._max_line
        max_reply = self._max_reply
        size = self._size if self._lines else 0
        for index, raw in enumerate(raw_lines):
            length = len(raw)
            size += length + 2
            if length > max_line or size > max_reply:
                # The lines before are parsed (and may fail) first, as in the main loop.
                self._parse_lines(lines[:index])
                if length > max_line:
                    raise RemoteProtocolError(f"reply line longer than {max_line} octets")
                # A malformed line is reported as such, in the main loop's order.
                line = lines[index]
                prefix = _PREFIXES.get(line[:4])
                if prefix is None:
                    raise _malformed(line)
                if self._lines and prefix[0] != self._code:
                    raise _code_changed(self._code, prefix[0])
                raise RemoteProtocolError(f"reply longer than {max_reply} octets")
            if raw[3:4] != b"-":
                size = 0  # The last line of a reply (or a malformed one: see above).
        self._parse_lines(lines)
        self._size = size

    def _parse_lines(self, lines: list[str]) -> None:
        # One loop with everything in locals: this is the hot path of the reader.
        # Every line is CR-stripped; its length in characters is its length in
        # octets (for ASCII), or _parse_octets has checked the limits on octets.
        memo = self._memo
        memo_get = memo.get
        room = start_room = _MEMO_SIZE - len(memo)
        hits = cleared = 0
        memo_on = self._memo_pause <= 0
        memo_line = _MEMO_LINE if memo_on else -1
        heads = _HEADS
        heads_get = heads.get
        add_reply = self.replies.append
        max_line = self._max_line
        max_reply = self._max_reply
        single_line = self._single_line
        text_lines = self._lines
        code = self._code
        size = self._size
        enhanced = self._enhanced
        for line in lines:
            if text_lines:
                # The next line of a multi-line reply.
                length = len(line)
                if length > max_line:
                    raise RemoteProtocolError(f"reply line longer than {max_line} octets")
                try:
                    prefix = _PREFIXES[line[:4]]
                except KeyError:
                    raise _malformed(line) from None
                if prefix[0] != code:
                    # RFC 5321 §4.2.1: every line of a multi-line reply has the same code.
                    raise _code_changed(code, prefix[0])
                size += length + 2
                if size > max_reply:
                    raise RemoteProtocolError(f"reply longer than {max_reply} octets")
                text_lines.append(line[4:])
                if prefix[1]:
                    add_reply(_make_reply(code, tuple(text_lines), enhanced))
                    text_lines = []
                continue
            if memo_on:
                # A single-line reply seen before: same text, same (immutable) value.
                reply = memo_get(line)
                if reply is not None:
                    hits += 1
                    add_reply(reply)
                    continue
            length = len(line)
            if length > single_line:
                if length > max_line:
                    raise RemoteProtocolError(f"reply line longer than {max_line} octets")
                _head(line)  # A malformed line is reported as such.
                raise RemoteProtocolError(f"reply longer than {max_reply} octets")
            key = line[:_HEAD_KEY]
            head = heads_get(key)
            if head is None:
                if line[5:6] == ".":
                    # An enhanced status code may start the text ("d.", RFC 3463 §2).
                    head = _head(line)
                else:
                    # No code can: the head is in the prefix. Texts that vary from
                    # their start could flood the cache, so only fill free room.
                    try:
                        head = _PREFIXES[line[:4]]
                    except KeyError:
                        raise _malformed(line) from None
                    if len(heads) < _HEADS_SIZE:
                        heads[key] = head
            code, last, enhanced = head
            if not last:
                text_lines = [line[4:]]
                size = length + 2
                continue
            # A new single-line reply ("250 2.1.5 Ok"), the common case, built inline.
            reply = _new(Reply)
            _set_code(reply, code)
            _set_lines(reply, (line[4:],))
            _set_enhanced(reply, enhanced)
            if length <= memo_line:
                if room:
                    room -= 1
                else:
                    memo.clear()
                    room = _MEMO_SIZE - 1
                    cleared += 1
                memo[line] = reply
            add_reply(reply)
        self._lines = text_lines
        self._code = code
        self._size = size
        self._enhanced = enhanced
        if memo_on:
            # The memo costs a lookup and an insertion per new reply: when the server
            # hardly ever repeats itself, leave it off for a while, then try again.
            misses = start_room - room + cleared * _MEMO_SIZE
            if misses >= _MEMO_PROBE and hits * 4 < misses:
                self._memo_pause = _MEMO_PAUSE
        else:
            self._memo_pause -= len(lines)

    def _check_partial(self) -> None:
        # The unfinished line may end with the CR of its CRLF: allow one octet more.
        if len(self._buffer) > self._max_line + 1:
            self.error = RemoteProtocolError(
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
