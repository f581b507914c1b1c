"""Where the tracker keeps its work: the :class:`Store` protocol, records, :class:`MemoryStore`.

The tracker engine (:mod:`mailrelay.tracker.engine`) holds no state of its own
between calls: every message, recipient state and attempt lives in a store. The
protocol is small, and written so that several workers (threads, processes, or
later machines sharing a PostgreSQL store) can share one store safely.

Rules of this module:

* Records are immutable values. A store hands out copies; changing a
  recipient goes through :meth:`Store.apply`, atomically, never by mutation.
  (The fast builders that follow the value classes fill a new value's slots
  directly, for the tracker's hot paths; they build exactly what the constructors
  build, checked at import and by tests, and never change a value once built.)
* **Claims are leases.** :meth:`Store.claim` atomically moves every due
  recipient of up to ``limit`` messages to :attr:`State.SENDING`, stamped with
  the worker's id and a lease expiry. No two claims ever hold the same recipient
  while a lease is current. A worker that dies leaves its leases to expire;
  an expired ``SENDING`` recipient is due again and the next claim takes it
  (delivery is therefore at-least-once: the dead worker may have sent it).
* A change made *for a claim* (``worker`` given to :meth:`Store.apply`) applies
  only to recipients still leased by that worker. When the lease was lost (it
  expired and another worker reclaimed it, or the message was cancelled), the
  attempt is still appended to the history but the state is left alone.
* Due means: ``QUEUED`` or ``DEFERRED`` with ``next_attempt_at`` at or before
  now, or ``SENDING`` with ``lease_until`` at or before now.
* Terminal states (DELIVERED, BOUNCED, EXPIRED, CANCELLED) change only through
  an explicit ``expect`` on the change (the tracker uses it for DSNs that report
  what happened after relay, DESIGN.md §7).
* A change that sets ``confirmed`` and would leave a recipient's state and ``confirmed``
  as they are (a report confirmed twice at the same moment) is not a change: its attempt
  goes to the history, and it is not reported as changed (:func:`repeats_confirmation`).
* Times are timezone-aware UTC :class:`~datetime.datetime` values, kept to the
  microsecond, so every store returns exactly what it was given.
* The message bytes are written with :meth:`Store.add` from an iterable of
  chunks (streamed where the store can), in the same atomic step as the record:
  a store never holds a record without its message or the reverse.
* Messages that follow from changes (the failure DSNs the tracker generates for
  recipients that bounced or expired) are added by :meth:`Store.apply_many`'s
  ``then``, in the same atomic step as the changes: a bounce is recorded if and only
  if its report is queued, so a crash can lose neither alone.
* A recipient's ``delay_warned`` mark (a delay warning was queued for it) is set by a
  change's ``delay_warned``, only when that change applies, and in the same step as the
  warning ``then`` queues: the mark is stored if and only if the warning is, so a
  recipient is warned about at most once, and a crash loses neither alone.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from json.encoder import encode_basestring as _json_str  # json's own string quoting
from typing import Any, Final, Protocol, TypeVar

import attrs

from mailrelay._slots import new_instance, slot_setters
from mailrelay.address import Address
from mailrelay.envelope import Envelope, Recipient
from mailrelay.errors import InvalidAddress

__all__ = [
    "Attempt",
    "Change",
    "Claim",
    "DUE_STATES",
    "FINAL_STATES",
    "FollowUp",
    "MemoryStore",
    "MessageRecord",
    "RecipientRecord",
    "State",
    "Store",
    "cached_address",
    "remember_address",
    "repeats_confirmation",
    "row_for",
    "envelope_from_json",
    "envelope_to_json",
    "attempt_values",
    "from_micros",
    "micros_or_none",
    "recipient_lookup",
    "records_from_rows",
    "time_or_none",
    "to_micros",
]


class State(enum.Enum):
    """Where one recipient of a tracked message stands."""

    #: Waiting for its first attempt.
    QUEUED = "queued"
    #: Claimed by a worker that is trying to deliver it now.
    SENDING = "sending"
    #: A server took responsibility for it (2xx).
    DELIVERED = "delivered"
    #: Refused for now (4xx or a transient error); retried at ``next_attempt_at``.
    DEFERRED = "deferred"
    #: Refused for good (5xx, a permanent error, or a failure DSN after relay).
    BOUNCED = "bounced"
    #: Still refused when the retry policy's maximum age ran out.
    EXPIRED = "expired"
    #: Cancelled by the application before it was resolved.
    CANCELLED = "cancelled"

    # Members are singletons, equal only to themselves: hashing by identity agrees with
    # equality and stays in C (Enum's own __hash__, of the name, is a Python function, and
    # the tracker looks states up in sets and dicts several times per message).
    __hash__ = object.__hash__

    @property
    def is_final(self) -> bool:
        """Whether the tracker will never try this recipient again."""
        return self in FINAL_STATES


# Members the hot paths use, read once: in Python 3.11 every ``State.X`` goes through
# EnumType.__getattr__ (several hundred instructions per read), a module global does not.
_QUEUED = State.QUEUED
_SENDING = State.SENDING

#: States from which nothing more is attempted.
FINAL_STATES = frozenset({State.DELIVERED, State.BOUNCED, State.EXPIRED, State.CANCELLED})
#: States that become due at ``next_attempt_at``.
DUE_STATES = frozenset({State.QUEUED, State.DEFERRED})


def _utc(value: dt.datetime) -> dt.datetime:
    if value.tzinfo is dt.UTC:
        return value  # already UTC: the common case, and astimezone would copy it
    if value.tzinfo is None:
        raise ValueError(f"times must be timezone-aware: {value!r}")
    return value.astimezone(dt.UTC)


def _opt_utc(value: dt.datetime | None) -> dt.datetime | None:
    return None if value is None else _utc(value)


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def to_micros(value: dt.datetime) -> int:
    """Microseconds since the Unix epoch: the exact integer form stores keep."""
    delta = _utc(value) - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(value: int) -> dt.datetime:
    """The inverse of :func:`to_micros`."""
    return _EPOCH + dt.timedelta(microseconds=value)


def micros_or_none(value: dt.datetime | None) -> int | None:
    """:func:`to_micros`, or ``None`` for ``None`` (an optional time column)."""
    return None if value is None else to_micros(value)


def time_or_none(value: int | None) -> dt.datetime | None:
    """:func:`from_micros`, or ``None`` for ``None`` (an optional time column)."""
    return None if value is None else from_micros(value)


#: The most characters of an attempt's text kept (a server's reply, an error, a report's
#: diagnostic). A reply may be 64 KiB (:data:`~mailrelay.protocol.reader.DEFAULT_MAX_REPLY_LENGTH`)
#: and a recipient collects an attempt per retry for days: kept whole, a server answering
#: every RCPT with 64 KiB would make the store grow by that much per recipient and retry.
MAX_ATTEMPT_TEXT: Final = 4096


#: The most characters of an attempt's host kept (a returned report's Remote-MTA is
#: anyone's text).
MAX_ATTEMPT_HOST: Final = 1024


# The note a cut text ends with, right after its first MAX_ATTEMPT_TEXT characters.
_CUT_NOTE = re.compile(r" \[\.\.\. [1-9][0-9]* characters not kept\]")


def _bounded_text(text: str) -> str:
    # A server's reply may hold NUL, which PostgreSQL's text columns cannot: every store
    # keeps the same text, U+FFFD where it was.
    if "\0" in text:
        text = text.replace("\0", "\ufffd")
    if len(text) <= MAX_ATTEMPT_TEXT:
        return text
    # Already cut (an attempt read back from a store): kept as it is, or each read would
    # cut its note off and count that as what was lost.
    if _CUT_NOTE.fullmatch(text, MAX_ATTEMPT_TEXT) is not None:
        return text
    return f"{text[:MAX_ATTEMPT_TEXT]} [... {len(text) - MAX_ATTEMPT_TEXT} characters not kept]"


def _bounded_host(host: str | None) -> str | None:
    if host is None:
        return None
    return host[:MAX_ATTEMPT_HOST].replace("\0", "\ufffd")


@attrs.frozen(kw_only=True)
class Attempt:
    """One thing that happened to a recipient: an SMTP answer, an error, or a DSN.

    Attributes:
        at: when it happened.
        host: the server that answered (``host:port``), or the DSN's remote MTA (at most
            :data:`MAX_ATTEMPT_HOST` characters of it, NUL as U+FFFD).
        code: the SMTP reply code, when there was one.
        enhanced: the RFC 3463 enhanced status (``"4.2.2"``), when known.
        text: the server's text, the error's description, or the DSN's diagnostic; at
            most :data:`MAX_ATTEMPT_TEXT` characters are kept, and a longer text is cut
            there and says how much was not kept; a NUL is kept as U+FFFD (PostgreSQL's
            text cannot hold it).
        source: ``"reply"`` (a per-recipient answer), ``"error"`` (the attempt
            raised a delivery error) or ``"dsn"`` (a report that came back later).
    """

    at: dt.datetime = attrs.field(converter=_utc)
    host: str | None = attrs.field(default=None, converter=_bounded_host)
    code: int | None = None
    enhanced: str | None = None
    text: str = attrs.field(default="", converter=_bounded_text)
    source: str = attrs.field(
        default="reply", validator=attrs.validators.in_(("reply", "error", "dsn"))
    )


@attrs.frozen(kw_only=True)
class RecipientRecord:
    """One recipient of a tracked message and its history.

    Attributes:
        address: the recipient.
        state: where it stands.
        attempts: everything that happened to it, oldest first.
        next_attempt_at: when it is due (for QUEUED and DEFERRED).
        confirmed: whether a success DSN from the destination confirmed a DELIVERED
            recipient ("delivered and confirmed").
        lease_owner: the worker holding it while SENDING.
        lease_until: when that worker's lease expires.
        delay_warned: whether a delay warning (an RFC 3464 ``Action: delayed`` report
            to the sender) was queued for it; set once, never cleared by the tracker.
    """

    address: Address
    state: State
    attempts: tuple[Attempt, ...] = ()
    next_attempt_at: dt.datetime | None = attrs.field(default=None, converter=_opt_utc)
    confirmed: bool = False
    lease_owner: str | None = None
    lease_until: dt.datetime | None = attrs.field(default=None, converter=_opt_utc)
    delay_warned: bool = False

    def is_due(self, now: dt.datetime) -> bool:
        """Whether a claim at ``now`` would take this recipient."""
        if self.state in DUE_STATES:
            return self.next_attempt_at is None or self.next_attempt_at <= now
        if self.state is _SENDING:
            return self.lease_until is None or self.lease_until <= now
        return False

    @property
    def due_at(self) -> dt.datetime | None:
        """When this recipient becomes due (``None`` once it is final)."""
        if self.state in DUE_STATES:
            return self.next_attempt_at
        if self.state is _SENDING:
            return self.lease_until
        return None


@attrs.frozen(kw_only=True)
class MessageRecord:
    """A tracked message: its envelope, a few facts about its content, and its recipients.

    Attributes:
        id: the tracking id (opaque text).
        created_at: when it was submitted.
        envelope: the envelope as the tracker sends it (with DSN requests and
            VERP sender when configured).
        message_id: the message's Message-ID (without brackets), for correlating DSNs.
        size: the length of the stored message bytes.
        recipients: one record per envelope recipient, in envelope order.
        notification: whether the tracker generated this message (a failure DSN to the
            original sender) rather than the application: it goes out through the
            tracker's ``dsn_transport`` and fires no events.
    """

    id: str
    created_at: dt.datetime = attrs.field(converter=_utc)
    envelope: Envelope
    message_id: str | None = None
    size: int = 0
    recipients: tuple[RecipientRecord, ...] = ()
    notification: bool = False

    @property
    def is_final(self) -> bool:
        """Whether every recipient is in a final state."""
        return all(r.state.is_final for r in self.recipients)

    def recipient(self, address: Address | str) -> RecipientRecord:
        """The record of one recipient.

        Raises:
            KeyError: when ``address`` is not a recipient of this message.
        """
        wanted = address if isinstance(address, Address) else Address.parse(address)
        for record in self.recipients:
            if record.address == wanted:
                return record
        raise KeyError(str(wanted))

    def states(self) -> dict[State, int]:
        """How many recipients are in each state (states with none left out)."""
        counts: dict[State, int] = {}
        for record in self.recipients:
            counts[record.state] = counts.get(record.state, 0) + 1
        return counts


@attrs.frozen(kw_only=True)
class Claim:
    """Due recipients of one message, leased to a worker.

    Attributes:
        tracking_id: the message.
        worker: the worker holding the lease.
        lease_until: when the lease expires.
        addresses: the claimed recipients, in envelope order.
        fresh: whether no claimed recipient has any attempt in its history (nor a
            confirmation): each is then exactly as submitted apart from its state,
            lease and due time, so a worker that still holds the submitted record
            need not read it back.
    """

    tracking_id: str
    worker: str
    lease_until: dt.datetime = attrs.field(converter=_utc)
    addresses: tuple[Address, ...]
    fresh: bool = False


@attrs.frozen(kw_only=True)
class Change:
    """A change to one recipient, applied atomically with the others of the same call.

    Attributes:
        address: the recipient.
        state: its new state.
        attempt: an attempt to append to its history.
        next_attempt_at: when it is next due (kept for QUEUED/DEFERRED, cleared otherwise).
        confirmed: a new value for ``confirmed`` (``None`` keeps it).
        expect: apply only when the recipient is in one of these states
            (``None``: any non-final state).
        delay_warned: a new value for the recipient's ``delay_warned`` (``None`` keeps
            it); set with the delay warning queued in the same step (see the module
            docstring).
    """

    address: Address
    state: State
    attempt: Attempt | None = None
    next_attempt_at: dt.datetime | None = attrs.field(default=None, converter=_opt_utc)
    confirmed: bool | None = None
    expect: frozenset[State] | None = None
    delay_warned: bool | None = None


# -- Fast builders for the tracker's hot paths ------------------------------------------
#
# The tracker builds a few of these values for every message it submits and sends. attrs'
# __init__ runs each field's converter (``_utc``, ``_opt_utc``) on every call; where the
# values are known to be in final form already (UTC times, tuples), these builders fill the
# slots directly, as __init__ would (:mod:`mailrelay._slots`). The field check at import
# keeps them in step with the classes, and tests hold them equal to the constructors.


(
    _set_r_address,
    _set_r_state,
    _set_r_attempts,
    _set_r_next,
    _set_r_confirmed,
    _set_r_owner,
    _set_r_until,
    _set_r_warned,
) = slot_setters(
    RecipientRecord,
    (
        "address",
        "state",
        "attempts",
        "next_attempt_at",
        "confirmed",
        "lease_owner",
        "lease_until",
        "delay_warned",
    ),
)
(
    _set_m_id,
    _set_m_created,
    _set_m_envelope,
    _set_m_message_id,
    _set_m_size,
    _set_m_recipients,
    _set_m_notification,
) = slot_setters(
    MessageRecord,
    ("id", "created_at", "envelope", "message_id", "size", "recipients", "notification"),
)
(
    _set_c_address,
    _set_c_state,
    _set_c_attempt,
    _set_c_next,
    _set_c_confirmed,
    _set_c_expect,
    _set_c_warned,
) = slot_setters(
    Change,
    ("address", "state", "attempt", "next_attempt_at", "confirmed", "expect", "delay_warned"),
)
_set_l_id, _set_l_worker, _set_l_until, _set_l_addresses, _set_l_fresh = slot_setters(
    Claim, ("tracking_id", "worker", "lease_until", "addresses", "fresh")
)


def queued_record(
    *,
    id: str,
    created_at: dt.datetime,
    envelope: Envelope,
    message_id: str | None,
    size: int,
    addresses: Iterable[Address],
    notification: bool = False,
) -> MessageRecord:
    """A new message's record, every recipient QUEUED and due at ``created_at``.

    Equal to ``MessageRecord(..., recipients=tuple(RecipientRecord(address=a,
    state=State.QUEUED, next_attempt_at=created_at) for a in addresses))``, built without
    attrs' __init__ (see above): the one conversion there is, of ``created_at`` to UTC,
    is made once for the record and its recipients.
    """
    if created_at.tzinfo is not dt.UTC:
        created_at = _utc(created_at)
    recipients = []
    for address in addresses:
        recipient: RecipientRecord = new_instance(RecipientRecord)
        _set_r_address(recipient, address)
        _set_r_state(recipient, _QUEUED)
        _set_r_attempts(recipient, ())
        _set_r_next(recipient, created_at)
        _set_r_confirmed(recipient, False)
        _set_r_owner(recipient, None)
        _set_r_until(recipient, None)
        _set_r_warned(recipient, False)
        recipients.append(recipient)
    record: MessageRecord = new_instance(MessageRecord)
    _set_m_id(record, id)
    _set_m_created(record, created_at)
    _set_m_envelope(record, envelope)
    _set_m_message_id(record, message_id)
    _set_m_size(record, size)
    _set_m_recipients(record, tuple(recipients))
    _set_m_notification(record, notification)
    return record


def new_change(
    address: Address,
    state: State,
    attempt: Attempt | None = None,
    next_attempt_at: dt.datetime | None = None,
) -> Change:
    """``Change(address=..., state=..., attempt=..., next_attempt_at=...)``, built directly.

    The same value as the constructor's (see above); ``next_attempt_at`` is converted to UTC
    as there, without the call when it already is (the common case).
    """
    change: Change = new_instance(Change)
    _set_c_address(change, address)
    _set_c_state(change, state)
    _set_c_attempt(change, attempt)
    _set_c_next(
        change,
        next_attempt_at
        if next_attempt_at is None or next_attempt_at.tzinfo is dt.UTC
        else _utc(next_attempt_at),
    )
    _set_c_confirmed(change, None)
    _set_c_expect(change, None)
    _set_c_warned(change, None)
    return change


def new_claim(
    tracking_id: str,
    worker: str,
    lease_until: dt.datetime,
    addresses: tuple[Address, ...],
    fresh: bool,
) -> Claim:
    """``Claim(tracking_id=..., ...)`` for a store's claim, built directly (see above)."""
    claim: Claim = new_instance(Claim)
    _set_l_id(claim, tracking_id)
    _set_l_worker(claim, worker)
    _set_l_until(claim, lease_until if lease_until.tzinfo is dt.UTC else _utc(lease_until))
    _set_l_addresses(claim, addresses)
    _set_l_fresh(claim, fresh)
    return claim


#: New messages that follow from applied changes (see :meth:`Store.apply_many`): given
#: the addresses changed per entry of the batch, the records and contents to add.
FollowUp = Callable[
    [Sequence[tuple[Address, ...]]], Sequence[tuple[MessageRecord, Iterable[bytes]]]
]


class Store(Protocol):
    """Persistent storage for the tracker (see the module docstring for the rules)."""

    def add(self, record: MessageRecord, content: Iterable[bytes]) -> None:
        """Store a new message and its bytes atomically and durably.

        Args:
            record: the new record; ``record.size`` is the total length of ``content``.
            content: the message bytes in chunks.

        Raises:
            ValueError: a record with this id exists, or the chunks do not add up
                to ``record.size``.
        """
        ...

    def add_many(self, entries: Sequence[tuple[MessageRecord, Iterable[bytes]]]) -> None:
        """Store several new messages in one atomic, durable step (all or none).

        Raises:
            ValueError: as :meth:`add`, for any entry; then nothing is stored.
        """
        ...

    def get(self, tracking_id: str) -> MessageRecord | None:
        """The record with this id, or ``None``."""
        ...

    def get_many(self, tracking_ids: Sequence[str]) -> dict[str, MessageRecord]:
        """The records with these ids (ids without a record are left out)."""
        ...

    def content(self, tracking_id: str) -> bytes:
        """The stored message bytes.

        Raises:
            KeyError: no such message.
        """
        ...

    def claim(
        self, *, worker: str, now: dt.datetime, lease: dt.timedelta, limit: int
    ) -> list[Claim]:
        """Atomically lease every due recipient of up to ``limit`` messages, oldest due first."""
        ...

    def apply(
        self,
        tracking_id: str,
        changes: Sequence[Change],
        *,
        worker: str | None = None,
    ) -> tuple[Address, ...]:
        """Apply changes to one message's recipients in one transaction.

        Returns:
            The addresses whose state changed (a change for a lost lease or an
            unexpected state, or a confirmation already made, only appends its
            attempt, if any).
        """
        ...

    def apply_many(
        self,
        batch: Sequence[tuple[str, Sequence[Change]]],
        *,
        worker: str | None = None,
        then: FollowUp | None = None,
    ) -> list[tuple[Address, ...]]:
        """:meth:`apply` for several messages in one transaction (one commit).

        Args:
            batch: per message, its changes.
            worker: as for :meth:`apply`.
            then: called inside the transaction with what this call returns; the new
                messages it returns are added (as by :meth:`add_many`) in the same
                transaction, so they are stored if and only if the changes are. If it
                raises, nothing is stored and the exception propagates. It runs while
                the store holds its write lock, so it must not call the store.

        Returns:
            For each entry of ``batch``, in order, the addresses whose state changed.
        """
        ...

    def lookup(self, *, envid: str | None = None, message_id: str | None = None) -> list[str]:
        """Tracking ids of messages with this ENVID or Message-ID."""
        ...

    def find(
        self,
        *,
        state: State | None = None,
        created_before: dt.datetime | None = None,
        limit: int | None = None,
    ) -> list[MessageRecord]:
        """Messages having a recipient in ``state``, created before a time, oldest first."""
        ...

    def next_due(self) -> dt.datetime | None:
        """The earliest time at which some recipient is or becomes due."""
        ...

    def close(self) -> None:
        """Release the store's resources."""
        ...


# ---------------------------------------------------------------------------
# Envelope serialization, shared by the stores that keep text


_Row = TypeVar("_Row")

# Addresses by their canonical text (str(address)), for cached_address.
_ADDRESSES: dict[str, Address] = {}
_ADDRESS_CACHE_SIZE = 4096


def cached_address(text: str) -> Address:
    """:meth:`Address.parse`, remembered: stores read the same addresses over and over
    (every record of a sender, every claim of a message just stored), and an
    :class:`Address` is immutable.

    Raises:
        InvalidAddress: as :meth:`Address.parse` (failures are not remembered).
    """
    found = _ADDRESSES.get(text)
    if found is None:
        found = Address.parse(text)
        remember_address(text, found)
    return found


def row_for(rows: dict[str, _Row], address: Address) -> _Row | None:
    """The row of ``address`` among a message's recipient rows keyed by their stored
    address text, or ``None``.

    Stores write ``str(address)``, so the text finds it (the common case). A row written
    in another spelling (by an older version, or another writer: an A-label or
    upper-case domain) is found by the address it parses to: missing it would drop the
    change, leaving the recipient as it was (SENDING, re-sent at every lease and never
    expiring; a cancel that cancels nothing).
    """
    row = rows.get(str(address))
    if row is not None:
        return row
    for text, candidate in rows.items():
        try:
            if cached_address(text) == address:
                return candidate
        except InvalidAddress:  # a row no address can match
            continue
    return None


def remember_address(text: str, address: Address) -> None:
    """Let :func:`cached_address` answer ``text`` (which is ``str(address)``) at once."""
    if len(_ADDRESSES) >= _ADDRESS_CACHE_SIZE:
        _ADDRESSES.clear()  # simpler than LRU; the addresses in use come back at once
    _ADDRESSES[text] = address


def _json_notify(notify: Iterable[enum.Enum] | None) -> str:
    if notify is None:
        return "null"
    return "[" + ",".join(_json_str(v) for v in sorted(n.value for n in notify)) + "]"


def envelope_to_json(envelope: Envelope) -> str:
    """The envelope as JSON text (every recipient with its final NOTIFY and ORCPT).

    The text is exactly ``json.dumps(data, ensure_ascii=False, sort_keys=True,
    separators=(",", ":"))`` of the envelope's fields (the form stored since the first
    schema; a test holds the two equal), written out directly: this runs once per
    submitted message, and building the dicts for the general encoder cost more than
    the encoding itself. (One f-string per object, and no call for an absent NOTIFY, for
    the same reason.)
    """
    if len(envelope.recipients) == 1:
        # The common case, without the comprehension's call and the join.
        (r,) = envelope.recipients
        recipients = (
            f'{{"address":{_json_str(str(r.address))},"notify":'
            f'{"null" if r.notify is None else _json_notify(r.notify)},"orcpt":'
            f"{'null' if r.orcpt is None else _json_str(str(r.orcpt))}}}"
        )
    else:
        recipients = ",".join(
            [
                f'{{"address":{_json_str(str(r.address))},"notify":'
                f'{"null" if r.notify is None else _json_notify(r.notify)},"orcpt":'
                f"{'null' if r.orcpt is None else _json_str(str(r.orcpt))}}}"
                for r in envelope.recipients
            ]
        )
    envid, notify, ret, sender = envelope.envid, envelope.notify, envelope.ret, envelope.sender
    return (
        f'{{"envid":{"null" if envid is None else _json_str(envid)},'
        f'"notify":{"null" if notify is None else _json_notify(notify)},'
        f'"recipients":[{recipients}],'
        f'"requiretls":{"true" if envelope.requiretls else "false"},'
        f'"ret":{"null" if ret is None else _json_str(ret.value)},'
        f'"sender":{"null" if sender is None else _json_str(str(sender))}}}'
    )


def envelope_from_json(text: str) -> Envelope:
    """The inverse of :func:`envelope_to_json`."""
    data = json.loads(text)
    recipients = [
        Recipient(
            cached_address(item["address"]),
            notify=item["notify"],
            orcpt=None if item["orcpt"] is None else cached_address(item["orcpt"]),
        )
        for item in data["recipients"]
    ]
    sender = data["sender"]
    return Envelope(
        None if sender is None else cached_address(sender),
        recipients,
        ret=data["ret"],
        envid=data["envid"],
        notify=data["notify"],
        requiretls=data["requiretls"],
    )


# ---------------------------------------------------------------------------
# Rows, shared by the stores that keep records as SQL rows (SQLite, PostgreSQL)


def attempt_values(attempt: Attempt) -> tuple[Any, ...]:
    """An attempt's columns after ``(message, position, seq)``: at (µs), host, code,
    enhanced, text, source."""
    return (
        to_micros(attempt.at),
        attempt.host,
        attempt.code,
        attempt.enhanced,
        attempt.text,
        attempt.source,
    )


def records_from_rows(
    messages: Iterable[Sequence[Any]],
    attempt_rows: Iterable[Sequence[Any]],
    recipient_rows: Iterable[Sequence[Any]],
) -> dict[str, MessageRecord]:
    """The records a store's rows describe, by tracking id.

    Args:
        messages: ``(id, created_at µs, envelope JSON, message_id, size, notification)``.
        attempt_rows: ``(message, position, at µs, host, code, enhanced, text, source)``,
            in ``(message, position, seq)`` order.
        recipient_rows: ``(message, position, address, state, next_attempt_at µs,
            confirmed, lease_owner, lease_until µs, delay_warned)``, in
            ``(message, position)`` order.
    """
    attempts: dict[tuple[str, int], list[Attempt]] = {}
    for message, position, at, host, code, enhanced, text, source in attempt_rows:
        attempts.setdefault((message, position), []).append(
            Attempt(
                at=from_micros(at),
                host=host,
                code=code,
                enhanced=enhanced,
                text=text,
                source=source,
            )
        )
    rows: dict[str, list[Sequence[Any]]] = {}
    for row in recipient_rows:
        rows.setdefault(row[0], []).append(row)
    found = {}
    for tracking_id, created_at, envelope_json, message_id, size, notification in messages:
        envelope = envelope_from_json(envelope_json)
        # The envelope's recipients are already parsed: reuse them rather than parse again.
        known = {str(r.address): r.address for r in envelope.recipients}
        recipients = tuple(
            RecipientRecord(
                address=known.get(address) or cached_address(address),
                state=State(state),
                attempts=tuple(attempts.get((tracking_id, position), ())),
                next_attempt_at=time_or_none(next_at),
                confirmed=bool(confirmed),
                lease_owner=owner,
                lease_until=time_or_none(until),
                delay_warned=bool(warned),
            )
            for _m, position, address, state, next_at, confirmed, owner, until, warned in rows.get(
                tracking_id, []
            )
        )
        found[tracking_id] = MessageRecord(
            id=tracking_id,
            created_at=from_micros(created_at),
            envelope=envelope,
            message_id=message_id,
            size=size,
            recipients=recipients,
            notification=bool(notification),
        )
    return found


def apply_change(
    record: RecipientRecord, change: Change, *, worker: str | None
) -> tuple[RecipientRecord, bool]:
    """Apply one change by the rules of the module docstring (for stores to share).

    Returns:
        The new record and whether its state changed.
    """
    attempts = record.attempts + ((change.attempt,) if change.attempt is not None else ())
    if worker is not None:
        allowed = record.state is _SENDING and record.lease_owner == worker
    elif change.expect is not None:
        allowed = record.state in change.expect
    else:
        allowed = not record.state.is_final
    if not allowed:
        return attrs.evolve(record, attempts=attempts), False
    # What ``attrs.evolve`` would build, filled directly (see the fast builders): this
    # runs for every event the tracker reports. Every value comes from a record or a
    # change, whose times are UTC already.
    after: RecipientRecord = new_instance(RecipientRecord)
    _set_r_address(after, record.address)
    _set_r_state(after, change.state)
    _set_r_attempts(after, attempts)
    _set_r_next(after, change.next_attempt_at if change.state in DUE_STATES else None)
    _set_r_confirmed(after, record.confirmed if change.confirmed is None else change.confirmed)
    _set_r_owner(after, None)
    _set_r_until(after, None)
    _set_r_warned(
        after, record.delay_warned if change.delay_warned is None else change.delay_warned
    )
    return after, True


#: Up to this many recipients, a record's recipient is found by a scan (nothing to build).
_SCAN_LIMIT = 8


def recipient_lookup(record: MessageRecord) -> Callable[[Address], RecipientRecord]:
    """A function that finds a recipient of ``record`` by address, as
    :meth:`MessageRecord.recipient` does (``KeyError`` when it has none).

    For code that looks up every recipient of a message: a scan each would make that
    work grow with the square of the recipients (a message to a few thousand of them, a
    newsletter's long Bcc, took seconds an attempt), so a large record is indexed once.
    A small one is scanned, by identity first (the tracker's changes carry the record's
    own Address objects), which costs less than building the index.
    """
    recipients = record.recipients
    if len(recipients) > _SCAN_LIMIT:
        by_address = {r.address: r for r in recipients}

        def indexed(address: Address) -> RecipientRecord:
            found = by_address.get(address)
            if found is None:
                raise KeyError(str(address))
            return found

        return indexed

    def scanned(address: Address) -> RecipientRecord:
        for recipient in recipients:
            if recipient.address is address:
                return recipient
        return record.recipient(address)

    return scanned


def repeats_confirmation(state: State, confirmed: bool, change: Change) -> bool:
    """Whether ``change`` would confirm a recipient already confirmed in that state.

    Such a change (a report ingested twice at the same moment, both copies read before
    either was written) is history only: stores append its attempt and report no change
    (see the module docstring).
    """
    return change.confirmed is not None and change.state is state and change.confirmed is confirmed


def _joined(
    entries: Sequence[tuple[MessageRecord, Iterable[bytes]]],
) -> list[tuple[MessageRecord, bytes]]:
    """Each entry's content in one piece, checked against its record's size."""
    ready = []
    for record, content in entries:
        data = b"".join(content)
        if len(data) != record.size:
            raise ValueError(f"the content is {len(data)} bytes, the record says {record.size}")
        ready.append((record, data))
    return ready


class MemoryStore:
    """A thread-safe store in memory: for tests and for processes that may lose their queue.

    Nothing survives the process; use :class:`~mailrelay.tracker.sqlite_store.SQLiteStore`
    when submitted mail must not be lost.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, MessageRecord] = {}
        self._content: dict[str, bytes] = {}

    def __repr__(self) -> str:
        return f"<MemoryStore messages={len(self._records)}>"

    def add(self, record: MessageRecord, content: Iterable[bytes]) -> None:
        """See :meth:`Store.add`."""
        self.add_many([(record, content)])

    def add_many(self, entries: Sequence[tuple[MessageRecord, Iterable[bytes]]]) -> None:
        """See :meth:`Store.add_many`."""
        ready = _joined(entries)
        with self._lock:
            self._add_ready(ready)

    def _add_ready(self, ready: Sequence[tuple[MessageRecord, bytes]]) -> None:
        ids = [record.id for record, _ in ready]
        if len(set(ids)) != len(ids) or any(i in self._records for i in ids):
            raise ValueError("a message with one of these ids is already stored")
        for record, data in ready:
            self._records[record.id] = record
            self._content[record.id] = data

    def get(self, tracking_id: str) -> MessageRecord | None:
        """See :meth:`Store.get`."""
        with self._lock:
            return self._records.get(tracking_id)

    def get_many(self, tracking_ids: Sequence[str]) -> dict[str, MessageRecord]:
        """See :meth:`Store.get_many`."""
        with self._lock:
            return {i: self._records[i] for i in tracking_ids if i in self._records}

    def content(self, tracking_id: str) -> bytes:
        """See :meth:`Store.content`."""
        with self._lock:
            return self._content[tracking_id]

    def claim(
        self, *, worker: str, now: dt.datetime, lease: dt.timedelta, limit: int
    ) -> list[Claim]:
        """See :meth:`Store.claim`."""
        until = _utc(now) + lease
        with self._lock:
            candidates: list[tuple[dt.datetime, str]] = []
            for record in self._records.values():
                due = [r.due_at or _EPOCH for r in record.recipients if r.is_due(now)]
                if due:
                    # A due time of None sorts first (SQL stores order it as 0, too).
                    candidates.append((min(due), record.id))
            candidates.sort()
            claims = []
            for _when, tracking_id in candidates[: max(limit, 0)]:
                record = self._records[tracking_id]
                taken = []
                recipients = []
                fresh = True
                for recipient in record.recipients:
                    if recipient.is_due(now):
                        taken.append(recipient.address)
                        fresh = fresh and not recipient.attempts and not recipient.confirmed
                        recipients.append(
                            attrs.evolve(
                                recipient,
                                state=State.SENDING,
                                lease_owner=worker,
                                lease_until=until,
                            )
                        )
                    else:
                        recipients.append(recipient)
                self._records[tracking_id] = attrs.evolve(record, recipients=tuple(recipients))
                claims.append(
                    Claim(
                        tracking_id=tracking_id,
                        worker=worker,
                        lease_until=until,
                        addresses=tuple(taken),
                        fresh=fresh,
                    )
                )
            return claims

    def apply(
        self,
        tracking_id: str,
        changes: Sequence[Change],
        *,
        worker: str | None = None,
    ) -> tuple[Address, ...]:
        """See :meth:`Store.apply`."""
        return self.apply_many([(tracking_id, changes)], worker=worker)[0]

    def apply_many(
        self,
        batch: Sequence[tuple[str, Sequence[Change]]],
        *,
        worker: str | None = None,
        then: FollowUp | None = None,
    ) -> list[tuple[Address, ...]]:
        """See :meth:`Store.apply_many`."""
        with self._lock:
            missing = [tracking_id for tracking_id, _ in batch if tracking_id not in self._records]
            if missing:
                raise KeyError(missing[0])
            if then is None:
                return [self._apply(tracking_id, changes, worker) for tracking_id, changes in batch]
            # All or nothing: the records as they were, restored if ``then`` fails.
            before = {tracking_id: self._records[tracking_id] for tracking_id, _ in batch}
            try:
                changed = [
                    self._apply(tracking_id, changes, worker) for tracking_id, changes in batch
                ]
                self._add_ready(_joined(then(changed)))
            except BaseException:
                self._records.update(before)
                raise
            return changed

    def _apply(
        self, tracking_id: str, changes: Sequence[Change], worker: str | None
    ) -> tuple[Address, ...]:
        record = self._records[tracking_id]
        recipients = list(record.recipients)
        # Each recipient's position, found once (not a scan per change: see recipient_lookup).
        positions = {recipient.address: index for index, recipient in enumerate(recipients)}
        changed = []
        for change in changes:
            index = positions.get(change.address)
            if index is None:
                continue
            recipient = recipients[index]
            recipients[index], did = apply_change(recipient, change, worker=worker)
            if did and repeats_confirmation(recipient.state, recipient.confirmed, change):
                recipients[index] = attrs.evolve(recipient, attempts=recipients[index].attempts)
                did = False
            if did:
                changed.append(change.address)
        self._records[tracking_id] = attrs.evolve(record, recipients=tuple(recipients))
        return tuple(changed)

    def lookup(self, *, envid: str | None = None, message_id: str | None = None) -> list[str]:
        """See :meth:`Store.lookup`."""
        with self._lock:
            records = sorted(self._records.values(), key=lambda r: (r.created_at, r.id))
        found = []
        for record in records:
            if (envid is not None and record.envelope.envid == envid) or (
                message_id is not None and record.message_id == message_id
            ):
                found.append(record.id)
        return found

    def find(
        self,
        *,
        state: State | None = None,
        created_before: dt.datetime | None = None,
        limit: int | None = None,
    ) -> list[MessageRecord]:
        """See :meth:`Store.find`."""
        with self._lock:
            records = sorted(self._records.values(), key=lambda r: (r.created_at, r.id))
        chosen = [
            record
            for record in records
            if (state is None or any(r.state is state for r in record.recipients))
            and (created_before is None or record.created_at < created_before)
        ]
        return chosen if limit is None else chosen[:limit]

    def next_due(self) -> dt.datetime | None:
        """See :meth:`Store.next_due`."""
        with self._lock:
            times = [
                r.due_at
                for record in self._records.values()
                for r in record.recipients
                if r.due_at is not None
            ]
        return min(times, default=None)

    def close(self) -> None:
        """Nothing to release."""
