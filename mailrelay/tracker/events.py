"""Tracker events and the callbacks that receive them.

Rules of this module:

* Events are fired *after* the store has committed the change they report, so a
  callback always sees what :meth:`DeliveryTracker.status` would show, and a
  crash inside a callback can never leave the record half-written.
* A callback that raises is logged (with its traceback) and skipped: it neither
  stops the runner nor stops the other callbacks of the same event. That includes a
  coroutine callback's own ``CancelledError`` (it awaited something that someone
  else cancelled; the async tracker tells it apart, ``own_failure``): only a
  cancellation of the task running the callbacks propagates.
* Sync runners call sync callbacks only (a coroutine function registered with a
  sync tracker is refused when registered). The async runner calls both kinds,
  awaiting the async ones in registration order.
"""

from __future__ import annotations

import enum
import inspect
import logging
from collections.abc import Awaitable, Callable

import attrs

from mailrelay.tracker.dsn import DSNReport
from mailrelay.tracker.store import Attempt, RecipientRecord

__all__ = ["Callback", "EventHub", "EventKind", "TrackerEvent"]

log = logging.getLogger(__name__)


class EventKind(enum.Enum):
    """What happened."""

    #: A server accepted a recipient (or a success DSN confirmed it).
    DELIVERED = "delivered"
    #: A recipient was refused for now and will be retried.
    DEFERRED = "deferred"
    #: A recipient was refused for good (by a reply, an error, or a failure DSN).
    BOUNCED = "bounced"
    #: A recipient ran out of retries (the policy's maximum age).
    EXPIRED = "expired"
    #: A DSN was ingested and matched a tracked message.
    DSN_RECEIVED = "dsn_received"

    # Hashed by identity, in C, as State is (see there): counted per recipient sent.
    __hash__ = object.__hash__


@attrs.frozen(kw_only=True)
class TrackerEvent:
    """One event.

    Attributes:
        kind: what happened.
        tracking_id: the message it happened to.
        recipient: the recipient's record after the change (``None`` for
            :attr:`EventKind.DSN_RECEIVED`, which is about a whole report).
        attempt: the attempt that caused it, when there was one.
        report: the DSN, for :attr:`EventKind.DSN_RECEIVED` and DSN-caused changes.
    """

    kind: EventKind
    tracking_id: str
    recipient: RecipientRecord | None = None
    attempt: Attempt | None = None
    report: DSNReport | None = None


#: A callback: called with the event; may be a coroutine function for the async runner.
Callback = Callable[[TrackerEvent], "Awaitable[None] | None"]


class EventHub:
    """The callbacks registered per event kind.

    Args:
        allow_async: whether coroutine functions may be registered (the async runner).
        own_failure: for :meth:`afire`, whether a ``BaseException`` that is not an
            ``Exception`` is the callback's own failure, logged and skipped like one.
    """

    def __init__(
        self,
        *,
        allow_async: bool,
        own_failure: Callable[[BaseException], bool] | None = None,
    ) -> None:
        self.allow_async = allow_async
        #: For :meth:`afire`: whether an exception that is not an ``Exception`` is still the
        #: callback's own failure (the async tracker: a ``CancelledError`` while the task
        #: running the callbacks is not being cancelled).
        self.own_failure = own_failure
        self._callbacks: dict[EventKind, list[Callback]] = {kind: [] for kind in EventKind}

    def on(self, kind: EventKind | str, callback: Callback) -> Callback:
        """Register ``callback`` for ``kind`` (an :class:`EventKind` or its value).

        Returns:
            The callback, so this works as a decorator factory's inner call.

        Raises:
            TypeError: a coroutine function on a sync tracker.
            ValueError: an unknown event kind.
        """
        kind = EventKind(kind)
        if inspect.iscoroutinefunction(callback) and not self.allow_async:
            raise TypeError(
                "an async callback needs the async tracker; this one calls callbacks synchronously"
            )
        self._callbacks[kind].append(callback)
        return callback

    def wants(self, kind: EventKind) -> bool:
        """Whether any callback is registered for ``kind`` (events nobody hears are not built)."""
        return bool(self._callbacks[kind])

    def off(self, kind: EventKind | str, callback: Callback) -> None:
        """Unregister a callback (no error when it is not registered)."""
        callbacks = self._callbacks[EventKind(kind)]
        if callback in callbacks:
            callbacks.remove(callback)

    def fire(self, event: TrackerEvent) -> None:
        """Call the sync callbacks for ``event``; log and skip any that raises."""
        for callback in list(self._callbacks[event.kind]):
            try:
                result = callback(event)
                # (None, what a sync callback returns, is checked first: it costs less.)
                if result is not None and inspect.isawaitable(result):
                    # Registered while allow_async was on, but fired from sync code.
                    close = getattr(result, "close", None)
                    if close is not None:
                        close()
                    raise TypeError("an async callback cannot run from the sync tracker")
            except Exception:
                log.exception("tracker callback %r failed for %s", callback, event.kind.value)

    async def afire(self, event: TrackerEvent) -> None:
        """Call every callback for ``event``, awaiting async ones; log and skip failures."""
        for callback in list(self._callbacks[event.kind]):
            try:
                result = callback(event)
                if inspect.isawaitable(result):
                    await result
            except BaseException as exc:
                own = self.own_failure
                if not isinstance(exc, Exception) and (own is None or not own(exc)):
                    raise  # KeyboardInterrupt, or the run itself being cancelled
                log.exception("tracker callback %r failed for %s", callback, event.kind.value)
