"""The resolvers' shared cache: bounded, TTL-expiring, thread-safe, with an injectable clock.

Rules of this module:

- An entry lives for the TTL it was put with; ``ttl <= 0`` means "do not cache". Which TTL an
  answer gets (RFC 2308's negative caching, the short ``failure_ttl``) is decided by
  :mod:`mailrelay.resolver`, not here.
- The cache is bounded: the least recently used entry goes first.
- Time is read only through the injected ``clock`` (``time.monotonic`` by default), so tests
  never sleep. A miss is a private sentinel, never ``None``, so any value can be cached.
- No dnspython object is stored here: values are plain tuples and whole result values.
  :mod:`mailrelay.resolver` re-exports :class:`DNSCache`.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Final

from mailrelay.errors import ConfigurationError

__all__ = ["DNSCache"]

DEFAULT_CACHE_SIZE: Final = 10_000

_MISS: Final = object()


class DNSCache:
    """A thread-safe, size-bounded LRU cache whose entries expire by TTL.

    Args:
        max_size: the most entries kept; the least recently used goes first.
        clock: a monotonic clock in seconds (inject a fake one in tests).
    """

    def __init__(
        self, max_size: int = DEFAULT_CACHE_SIZE, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_size < 1:
            raise ConfigurationError("max_size must be at least 1")
        self.max_size = max_size
        self.clock = clock
        self._entries: OrderedDict[Hashable, tuple[object, float]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> object:
        """The live value under ``key``, or the module's private miss sentinel."""
        return self.get_with_ttl(key)[0]

    def get_with_ttl(self, key: Hashable) -> tuple[object, float]:
        """The live value under ``key`` and the seconds it has left (a TTL counts down while
        the record is cached, RFC 2181 §8), or the private miss sentinel and 0."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return _MISS, 0.0
            left = entry[1] - self.clock()
            if left <= 0:
                del self._entries[key]
                return _MISS, 0.0
            self._entries.move_to_end(key)
            return entry[0], left

    def put(self, key: Hashable, value: object, ttl: float) -> None:
        """Keep ``value`` for ``ttl`` seconds (not at all when ``ttl <= 0``)."""
        if ttl <= 0:
            return
        with self._lock:
            self._entries[key] = (value, self.clock() + ttl)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_size:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forget everything."""
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
