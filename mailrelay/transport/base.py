"""The transport interface: what every way of sending mail has in common.

Rules of this module:

* A transport has **one** abstract method per flavour: :meth:`Transport.deliver` (blocking)
  and :meth:`AsyncTransport.adeliver` (asyncio). Everything else (``send``, ``send_many``,
  context managers) is concrete here and written once. The sync and async methods have
  different names, so one class may implement both (as ``MemoryTransport`` does), the way
  httpx's transports do.
* ``deliver`` returns a :class:`~mailrelay.results.DeliveryResult` holding exactly one
  :class:`~mailrelay.results.RecipientResult` per envelope recipient, in envelope order,
  whenever the attempt produced an answer per recipient, refusals included. It raises only
  :class:`~mailrelay.errors.DeliveryError` subclasses, and only when the attempt produced no
  answer per recipient (connect, TLS, auth, timeout, lost connection, protocol violation).
* ``send(message)`` derives the envelope from the message's headers with
  :meth:`Envelope.from_message <mailrelay.envelope.Envelope.from_message>` when none is given.
* ``send_many`` never loses a message silently. Its contract:

  1. A batch given as a *sequence* (a list, a tuple) is checked whole before anything is
     sent: every item becomes a ``(message, envelope)`` pair first, so a malformed item (or a
     message whose envelope cannot be derived) raises before any mail leaves, and the caller
     can fix the batch and send it again whole. A batch given as any other iterable (a
     generator, an async iterable) is *streamed*: items are taken one at a time as the
     transport is ready for them, so a mail merge of a million messages never holds them all;
     a bad item then raises when it is reached (see 4).
  2. Items are delivered in order (pooled async transports: several at once), and there is
     one result per item, in item order.
  3. A :class:`~mailrelay.errors.DeliveryError` for one item does not stop the batch: that
     item's result carries the error for each of its recipients (see :func:`failed_result`):
     outcome ``TRANSIENT`` or ``PERMANENT`` per :attr:`DeliveryError.is_transient`, the
     error's reply if it had one, and ``reason`` naming the error. ``result.ok`` is then false.
  4. Any other exception (a bad streamed item, a bug, ``KeyboardInterrupt``, a cancelled
     task) stops the batch and propagates. A note added to it (:pep:`678`) says how many
     messages had already been handed to the transport, so the traceback tells whether
     sending the batch again would duplicate mail.

  Pooled transports override ``send_many`` to reuse and pipeline connections; they keep this
  contract (:class:`AsyncBatch` is the shared, task-safe way to take items).
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Self, TypeAlias

from mailrelay.envelope import Envelope
from mailrelay.errors import DeliveryError
from mailrelay.message import Message
from mailrelay.results import DeliveryResult, Outcome, RecipientResult, error_status

__all__ = [
    "AsyncBatch",
    "AsyncTransport",
    "BatchItem",
    "Transport",
    "failed_result",
    "iter_pairs",
    "note_progress",
    "prepare_batch",
]

#: One item of a batch for ``send_many``: a message (its envelope derived from its headers),
#: or an explicit ``(message, envelope)`` pair.
BatchItem: TypeAlias = Message | tuple[Message, Envelope]


def _pair(item: BatchItem, index: int) -> tuple[Message, Envelope]:
    if type(item) is tuple and len(item) == 2:
        message, envelope = item
        if isinstance(message, Message) and isinstance(envelope, Envelope):
            return item  # already a pair: kept, not copied
    if isinstance(item, Message):
        return item, Envelope.from_message(item)
    if (
        isinstance(item, tuple)
        and len(item) == 2
        and isinstance(item[0], Message)
        and isinstance(item[1], Envelope)
    ):
        return item[0], item[1]
    raise TypeError(
        f"send_many item {index} is {type(item).__name__}: "
        "expected a Message or a (Message, Envelope) pair"
    )


def prepare_batch(items: Iterable[BatchItem]) -> list[tuple[Message, Envelope]]:
    """Turn every item of a batch into a ``(message, envelope)`` pair, before anything is sent.

    Raises:
        TypeError: when an item is neither a message nor a ``(message, envelope)`` pair.
        InvalidAddress, MessageError: when an envelope cannot be derived from a message.
    """
    return [_pair(item, index) for index, item in enumerate(items)]


def failed_result(message: Message, envelope: Envelope, error: DeliveryError) -> DeliveryResult:
    """The result of an attempt that raised ``error``: every recipient carries the failure.

    Used by ``send_many`` so that one failed message does not hide the results of the
    others; a caller retrying ``result.deferred`` retries exactly the recipients it should,
    and ``result.error`` keeps the exception itself.
    """
    outcome = Outcome.TRANSIENT if error.is_transient else Outcome.PERMANENT
    reason = f"{type(error).__name__}: {error}"
    # A reply carries its own status; without one, the status of the failure's kind.
    enhanced = error_status(error) if error.reply is None else None
    return DeliveryResult(
        recipients=tuple(
            RecipientResult(
                address=recipient.address,
                outcome=outcome,
                reply=error.reply,
                reason=reason,
                host=error.host,
                enhanced=enhanced,
            )
            for recipient in envelope.recipients
        ),
        message_id=message.message_id,
        host=error.host,
        error=error,
    )


def note_progress(exc: BaseException, done: int, total: int | None) -> None:
    """Add the "how far did the batch get" note to an exception that stops a batch."""
    of = f" of {total}" if total is not None else ""
    exc.add_note(
        f"send_many: {done}{of} messages had been handed to the transport before this "
        "error; sending the whole batch again may duplicate those"
    )


def iter_pairs(
    items: Iterable[BatchItem],
) -> tuple[Iterator[tuple[Message, Envelope]], int | None]:
    """The batch as pairs and its length when known: a sequence checked whole first
    (it may raise here), anything else streamed."""
    if isinstance(items, Sequence):
        prepared = prepare_batch(items)
        return iter(prepared), len(prepared)
    return (_pair(item, index) for index, item in enumerate(items)), None


class AsyncBatch:
    """The items of an ``asend_many`` batch, taken one at a time by one or more tasks.

    A sequence is checked whole at construction (it may raise there); a plain or async
    iterable is streamed. :meth:`next` is task-safe: concurrent callers each get a
    different item, in order.

    Attributes:
        total: the number of items, when known (a sequence), else ``None``.
    """

    def __init__(self, items: Iterable[BatchItem] | AsyncIterable[BatchItem]) -> None:
        self._sync: Iterator[BatchItem] | None = None
        self._async: AsyncIterator[BatchItem] | None = None
        self.total: int | None = None
        # A sequence's checked pairs (next() and take() index them); None when streamed.
        self._prepared: list[tuple[Message, Envelope]] | None = None
        if isinstance(items, AsyncIterable):
            self._async = aiter(items)
        elif isinstance(items, Sequence):
            self._prepared = prepare_batch(items)
            self.total = len(self._prepared)
        else:
            self._sync = iter(items)
        self._index = 0
        self._lock: asyncio.Lock | None = None

    @property
    def handed_out(self) -> int:
        """How many items :meth:`take` and :meth:`next` have given out so far."""
        return self._index

    def take(self, limit: int) -> tuple[int, list[tuple[Message, Envelope]]] | None:
        """Up to ``limit`` next items at once, without awaiting, for a sequence (checked
        at construction): the first one's index and the pairs, in order (none at the end);
        ``None`` for a streamed batch (use :meth:`next`). Task-safe: it never suspends, so
        concurrent callers each get different items."""
        prepared = self._prepared
        if prepared is None:
            return None
        start = self._index
        end = min(len(prepared), start + max(0, limit))
        self._index = end
        return start, prepared[start:end]

    async def next(self) -> tuple[int, Message, Envelope] | None:
        """The next item's index and pair, or ``None`` when the batch is exhausted.

        Raises:
            TypeError, InvalidAddress, MessageError: for a malformed streamed item.
        """
        prepared = self._prepared
        if prepared is not None:
            # A sequence, checked at construction: no await, so no other task comes in.
            index = self._index
            if index >= len(prepared):
                return None
            self._index = index + 1
            return (index, *prepared[index])
        if self._async is None:
            # A plain iterator is advanced without awaiting, so no other task can come in
            # between: no lock needed.
            assert self._sync is not None
            try:
                item = next(self._sync)
            except StopIteration:
                return None
            index = self._index
            self._index += 1
        else:
            if self._lock is None:
                self._lock = asyncio.Lock()
            # An async generator must not be advanced by two tasks at once.
            async with self._lock:
                index = self._index
                try:
                    item = await anext(self._async)
                except StopAsyncIteration:
                    return None
                self._index += 1
        message, envelope = _pair(item, index)
        return index, message, envelope


class Transport(abc.ABC):
    """A blocking way of sending mail.

    Subclasses implement :meth:`deliver` (and :meth:`close` if they hold resources);
    :meth:`send` and :meth:`send_many` come for free. A transport is a context manager that
    closes itself on exit.
    """

    @abc.abstractmethod
    def deliver(self, message: Message, envelope: Envelope) -> DeliveryResult:
        """Deliver ``message`` to the envelope's recipients.

        Returns:
            One result per envelope recipient, in envelope order; refused recipients are
            results with a transient or permanent outcome.

        Raises:
            DeliveryError: (a subclass of it) only when the attempt produced no answer per
                recipient.
        """

    def send(self, message: Message, envelope: Envelope | None = None) -> DeliveryResult:
        """Send one message; the envelope is derived from its headers when not given.

        Raises:
            DeliveryError: as :meth:`deliver` does.
            InvalidAddress, MessageError: when the envelope cannot be derived from the headers.
        """
        if envelope is None:
            envelope = Envelope.from_message(message)
        return self.deliver(message, envelope)

    def send_many(self, items: Iterable[BatchItem]) -> list[DeliveryResult]:
        """Send many messages and return their results in order (see the module docstring).

        Args:
            items: messages, or ``(message, envelope)`` pairs.

        Returns:
            One result per item; an item whose attempt raised a
            :class:`~mailrelay.errors.DeliveryError` gets a result carrying that error for
            every recipient (:func:`failed_result`).
        """
        pairs, total = iter_pairs(items)
        results: list[DeliveryResult] = []
        while True:
            try:
                pair = next(pairs, None)
            except BaseException as exc:
                note_progress(exc, len(results), total)
                raise
            if pair is None:
                return results
            message, envelope = pair
            try:
                results.append(self.deliver(message, envelope))
            except DeliveryError as error:
                results.append(failed_result(message, envelope, error))
            except BaseException as exc:
                note_progress(exc, len(results), total)
                raise

    def close(self) -> None:  # noqa: B027 -- a no-op default is the point
        """Release whatever the transport holds (connections, files). Idempotent."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncTransport(abc.ABC):
    """An asyncio way of sending mail: :class:`Transport` with awaited, ``a``-prefixed methods.

    Subclasses implement :meth:`adeliver` (and :meth:`aclose` if they hold resources).
    """

    @abc.abstractmethod
    async def adeliver(self, message: Message, envelope: Envelope) -> DeliveryResult:
        """Deliver ``message`` to the envelope's recipients (see :meth:`Transport.deliver`)."""

    async def asend(self, message: Message, envelope: Envelope | None = None) -> DeliveryResult:
        """Send one message; the envelope is derived from its headers when not given."""
        if envelope is None:
            envelope = Envelope.from_message(message)
        return await self.adeliver(message, envelope)

    async def asend_many(
        self, items: Iterable[BatchItem] | AsyncIterable[BatchItem]
    ) -> list[DeliveryResult]:
        """Send many messages and return their results in order (see :meth:`Transport.send_many`).

        Args:
            items: messages or ``(message, envelope)`` pairs, from a plain or an async iterable.
        """
        batch = AsyncBatch(items)
        results: list[DeliveryResult] = []
        while True:
            try:
                taken = await batch.next()
            except BaseException as exc:
                note_progress(exc, len(results), batch.total)
                raise
            if taken is None:
                return results
            _, message, envelope = taken
            try:
                results.append(await self.adeliver(message, envelope))
            except DeliveryError as error:
                results.append(failed_result(message, envelope, error))
            except BaseException as exc:
                note_progress(exc, len(results), batch.total)
                raise

    async def aclose(self) -> None:  # noqa: B027 -- a no-op default is the point
        """Release whatever the transport holds. Idempotent."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
