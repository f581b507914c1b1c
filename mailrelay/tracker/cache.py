"""The messages a tracker submitted and has not sent yet, kept so they need not be read back.

A tracker that submits a message and sends it soon after (the usual case for an
application that submits and runs in one process) would otherwise read the stored bytes
and record back, and parse them again into a :class:`~mailrelay.message.Message`, before
sending. This module keeps the submitted objects instead: the message, and the record as
submitted, which is still exact when the claim says so (:attr:`Claim.fresh
<mailrelay.tracker.store.Claim.fresh>`: nothing has happened to its recipients yet).

Rules of this module:

* The store stays the only source of truth. An entry is added only after the store has
  committed the message, and it is an *equal* copy: the bytes the store holds are exactly
  the object's wire form, and the record is the one the store was given (the tracker
  uses it only for a fresh claim). A miss (another process submitted it, the entry was evicted,
  this is a retry after a restart) just reads the store.
* Only messages held in memory are kept. One from
  :meth:`~mailrelay.message.Message.from_file` reads its file again on every
  :meth:`~mailrelay.message.Message.chunks`, and the file may change or vanish once
  :meth:`submit` has stored its bytes, so such a message is always read back from the store.
* Only messages up to :data:`MAX_KEPT` bytes are kept: telling an in-memory message
  from a file-backed one costs two reads of the file (see :func:`held_in_memory`), which
  must stay cheap; and for a large message the per-message saving is small next to its
  size anyway.
* An entry is taken out when its message is claimed (:meth:`MessageCache.take_many`): a
  retry reads the store. The cache is bounded in bytes, the oldest entries going first,
  and is thread-safe (submissions may come from other threads than the runner's).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable

from mailrelay.errors import ConfigurationError
from mailrelay.message import Message
from mailrelay.tracker.store import MessageRecord

__all__ = ["MAX_KEPT", "MessageCache", "held_in_memory"]

#: The largest message kept, in bytes.
MAX_KEPT = 1 << 18


def held_in_memory(message: Message) -> bool:
    """Whether ``message`` hands out the same bytes every time (not a file re-read).

    :meth:`Message.as_bytes` returns the one bytes object an in-memory message holds,
    and reads a file-backed message's file again (a new object) on every call. (Message
    has no public flag for this; if its internals change so that every call returns a
    new object, nothing is kept: slower, never wrong.)
    """
    return message.as_bytes() is message.as_bytes()


class MessageCache:
    """Submitted messages by tracking id, at most ``max_bytes`` of them (0 keeps none).

    Args:
        max_bytes: the most message bytes kept in all.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ConfigurationError("max_bytes must not be negative")
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[Message, MessageRecord]] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, message: Message, record: MessageRecord) -> None:
        """Keep a message and its record, just committed (when it fits and is in memory)."""
        self.put_many([(message, record)])

    def put_many(self, entries: Iterable[tuple[Message, MessageRecord]]) -> None:
        """:meth:`put` for each of ``entries``, in order (one lock for them all)."""
        largest = min(self.max_bytes, MAX_KEPT)
        # (held_in_memory's test, written out: this runs for every submitted message; and
        # each entry is kept as given, a tuple already, rather than copied.)
        kept = [
            entry
            for entry in entries
            if entry[0].size <= largest and entry[0].as_bytes() is entry[0].as_bytes()
        ]
        if not kept:
            return
        with self._lock:
            held = self._entries
            total = self._bytes
            for entry in kept:
                tracking_id = entry[1].id
                old = held.pop(tracking_id, None)
                if old is not None:
                    total -= old[0].size
                held[tracking_id] = entry
                total += entry[0].size
                while total > self.max_bytes:
                    _id, (evicted, _record) = held.popitem(last=False)
                    total -= evicted.size
            self._bytes = total

    def take(self, tracking_id: str) -> tuple[Message, MessageRecord] | None:
        """Remove and return what is kept for ``tracking_id`` (``None`` if nothing)."""
        with self._lock:
            entry = self._entries.pop(tracking_id, None)
            if entry is not None:
                self._bytes -= entry[0].size
            return entry

    def take_many(self, tracking_ids: Iterable[str]) -> dict[str, tuple[Message, MessageRecord]]:
        """:meth:`take` for each of ``tracking_ids`` (one lock for them all): what was kept."""
        taken = {}
        with self._lock:
            for tracking_id in tracking_ids:
                entry = self._entries.pop(tracking_id, None)
                if entry is not None:
                    self._bytes -= entry[0].size
                    taken[tracking_id] = entry
        return taken

    def clear(self) -> None:
        """Forget every message."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0
