"""What an attempt did to each recipient: the tracker's state transitions, with no I/O.

Rules of this module (DESIGN.md §7; the diagram is in ``docs/tracker.md``):

* These functions only decide. They turn what a transport returned (or raised) into
  :class:`~mailrelay.tracker.store.Change` values, each carrying the
  :class:`~mailrelay.tracker.store.Attempt` to record; the runners commit them through
  the store, so every transition is decided here and nowhere else.
* Each recipient's fate comes from its own reply: ``ACCEPTED`` → DELIVERED,
  ``PERMANENT`` → BOUNCED, ``TRANSIENT`` → DEFERRED until the
  :class:`~mailrelay.tracker.retry.RetryPolicy` gives up, then EXPIRED. A recipient the
  transport left without a result is treated as TRANSIENT (the transport broke its
  contract; retrying loses nothing).
* A :class:`~mailrelay.errors.DeliveryError` decides for every recipient of the attempt
  by its ``is_transient``, except that the policy's ``defer_errors`` (refused credentials,
  TLS: our side, not the recipients) defer even when permanent
  (:meth:`~mailrelay.tracker.retry.RetryPolicy.defers`). Through ``send_many`` such an
  error arrives as that message's result (:func:`~mailrelay.transport.base.failed_result`:
  every recipient's ``reason`` is ``"<error class>: <error>"``); it is recorded the same
  way, as an ``"error"`` attempt, and decided the same way.
* Putting work back (an unexpected exception, or per-domain shaping holding a domain
  off) records no attempt: a recipient never tried goes back to QUEUED, one tried
  before to DEFERRED, due at the given time.
* The retry count excludes DSN history: only replies and errors are tries.
* Each decision also says what the per-domain shaper should learn (``refused``): a 421,
  or a transaction refused whole for now, backs the domain off; an acceptance resets it.
* Delay warnings (``delay_warning_after``, off when ``None``) are decided with the
  deferral that calls for one (:func:`wants_delay_warning`): a recipient that an attempt
  leaves DEFERRED gets a change with ``delay_warned=True`` when the message is at least
  that old, it has not been warned about, its NOTIFY asks for delays and the sender is
  not the null reverse-path. The change carries the mark; the runner queues the warning
  in the transaction that stores it. Putting work back (no attempt) never warns, and an
  expiry is a failure, reported as one.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Sequence

import attrs

from mailrelay._slots import new_instance, slot_setters
from mailrelay.address import Address
from mailrelay.envelope import Notify, Recipient
from mailrelay.errors import DeliveryError
from mailrelay.reply import Reply
from mailrelay.results import DeliveryResult, Outcome, RecipientResult, error_status
from mailrelay.tracker.retry import RetryPolicy
from mailrelay.tracker.store import (
    Attempt,
    Change,
    MessageRecord,
    RecipientRecord,
    State,
    new_change,
    recipient_lookup,
)

__all__ = [
    "AttemptMemo",
    "Decision",
    "from_error",
    "from_result",
    "put_back",
    "wants_delay_warning",
]


@attrs.frozen
class Decision:
    """The changes one delivery transaction produced, and what the shaper should learn.

    Attributes:
        changes: one change per recipient of the transaction.
        refused: ``True`` when the domain refused (back off), ``False`` when it
            accepted something (reset), ``None`` when neither.
    """

    changes: tuple[Change, ...]
    refused: bool | None


_set_changes, _set_refused = slot_setters(Decision, ("changes", "refused"))


def new_decision(changes: tuple[Change, ...], refused: bool | None) -> Decision:
    """``Decision(changes, refused)``, built without attrs' ``__init__`` (one per
    transaction sent; see :mod:`mailrelay._slots`)."""
    decision: Decision = new_instance(Decision)
    _set_changes(decision, changes)
    _set_refused(decision, refused)
    return decision


def _delivery_error_classes() -> list[type[DeliveryError]]:
    """:class:`DeliveryError` and every subclass defined now (an application may add its
    own at any time, so they are looked up at each use)."""
    found: list[type[DeliveryError]] = []
    todo: list[type[DeliveryError]] = [DeliveryError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def _error_name(found: RecipientResult) -> str | None:
    """The error class name ``failed_result`` put in ``found``'s reason, if it looks like one."""
    reason = found.reason
    if reason is None or found.outcome is _ACCEPTED:
        return None
    name, colon, _rest = reason.partition(": ")
    return name if colon else None


def _from_error_result(found: RecipientResult) -> bool:
    """Whether ``found`` is what ``failed_result`` made of a :class:`DeliveryError`."""
    name = _error_name(found)
    return name is not None and any(cls.__name__ == name for cls in _delivery_error_classes())


def _deferring_error(found: RecipientResult, retry: RetryPolicy) -> bool:
    """Whether a PERMANENT ``found`` is what ``failed_result`` made of one of the policy's
    ``defer_errors`` (so it defers, as :func:`from_error` decides for the error itself)."""
    name = _error_name(found) if retry.defer_errors else None
    if name is None:
        return False
    return any(
        cls.__name__ == name and retry.defers_class(cls) for cls in _delivery_error_classes()
    )


def put_back(
    record: MessageRecord, addresses: Iterable[Address], when: dt.datetime
) -> list[Change]:
    """Changes that make ``addresses`` due again at ``when``, recording no attempt."""
    states = {r.address: r for r in record.recipients}
    changes = []
    for address in addresses:
        previous = states[address]
        tried = any(a.source != "dsn" for a in previous.attempts)
        changes.append(
            Change(
                address=address,
                state=State.DEFERRED if tried else State.QUEUED,
                next_attempt_at=when,
            )
        )
    return changes


def wants_delay_warning(
    record: MessageRecord,
    recipient: RecipientRecord,
    *,
    now: dt.datetime,
    after: dt.timedelta,
) -> bool:
    """Whether deferring ``recipient`` of ``record`` at ``now`` calls for a delay warning.

    Yes when the message was submitted at least ``after`` ago, the recipient has not been
    warned about (``delay_warned``: once ever), the sender is not the null reverse-path
    (RFC 3461 §6.2) and the recipient's NOTIFY asks for delays: NOTIFY=DELAY, or no NOTIFY
    at all, which RFC 3461 §4.1 lets an MTA read as FAILURE,DELAY (as Postfix does; a
    failure report is sent without a NOTIFY too).
    """
    if recipient.delay_warned or now - record.created_at < after:
        return False
    envelope = record.envelope
    if envelope.sender is None:
        return False
    for wanted in envelope.recipients:
        if wanted.address == recipient.address:
            # RFC 3461 §4.1: NOTIFY without DELAY (NEVER, or SUCCESS/FAILURE only) asks
            # for no delay report.
            return wanted.notify is None or Notify.DELAY in wanted.notify
    return False


def _failure_change(
    record: MessageRecord,
    previous: RecipientRecord,
    attempt: Attempt,
    reply: Reply | None,
    *,
    now: dt.datetime,
    retry: RetryPolicy,
    random: Callable[[], float],
    delay_warning_after: dt.timedelta | None = None,
) -> Change:
    address = previous.address
    tries = sum(1 for a in previous.attempts if a.source != "dsn") + 1
    when = retry.next_attempt(
        recipient=address,
        reply=reply,
        retry=tries,
        created_at=record.created_at,
        now=now,
        random=random,
    )
    if when is None:
        return new_change(address, _EXPIRED, attempt)
    change = new_change(address, _DEFERRED, attempt, when)
    if delay_warning_after is not None and wants_delay_warning(
        record, previous, now=now, after=delay_warning_after
    ):
        # The mark travels with the deferral: stored with it, and with the warning the
        # runner queues for it (see the module docstring).
        return attrs.evolve(change, delay_warned=True)
    return change


# Members read for every result, as globals: in CPython 3.11 reading ``Outcome.X`` or
# ``State.X`` costs about 100 ns (EnumType defines __getattr__), a global a few.
_ACCEPTED = Outcome.ACCEPTED
_PERMANENT = Outcome.PERMANENT
_DELIVERED = State.DELIVERED
_BOUNCED = State.BOUNCED
_DEFERRED = State.DEFERRED
_EXPIRED = State.EXPIRED

#: Attempts already built, for :func:`from_result`'s ``attempts`` argument.
AttemptMemo = dict[tuple[object, ...], Attempt]


def _about_one_mailbox(reply: Reply | None) -> bool:
    """Whether a transient refusal concerns the recipient's address or mailbox only, not
    the server or domain: an enhanced status about addressing or the mailbox (RFC 3463 §3.2,
    §3.3: X.1.x, X.2.x, such as 4.2.2 mailbox full), or, without one, ``450`` (mailbox
    unavailable, RFC 5321 §4.2.3). Such a reply defers that recipient and does not back the
    domain off; no reply (a failed connection, a timeout) is about the server."""
    if reply is None:
        return False
    enhanced = reply.enhanced
    if enhanced is not None:
        return enhanced.subject in (1, 2)
    return reply.code == 450


def _matched(
    recipients: Sequence[Recipient], result: DeliveryResult
) -> list[RecipientResult | None]:
    """Each recipient's result. The base contract puts them in envelope order, which is
    checked here (the common case, no dict built); otherwise they are found by address."""
    found = result.recipients
    if len(found) == len(recipients):
        # A loop rather than all(generator): this runs for every message sent.
        for f, r in zip(found, recipients, strict=True):
            if f.address is not r.address and f.address != r.address:
                break
        else:
            return list(found)
    by_address: dict[Address, RecipientResult] = {r.address: r for r in found}
    return [by_address.get(r.address) for r in recipients]


def _enhanced(found: RecipientResult) -> str | None:
    """The RFC 3463 status of a result: its reply's, or the one a refusal made before
    sending carries."""
    reply = found.reply
    status = found.enhanced if reply is None else reply.enhanced
    return None if status is None else str(status)


def _attempt(
    found: RecipientResult, host: str | None, now: dt.datetime, memo: AttemptMemo | None
) -> Attempt:
    reply = found.reply
    # Results of one send_many call often carry equal answers ("250 2.0.0 Ok" from one
    # host): an Attempt is immutable, so one object serves them all.
    # Everything the attempt is made of: the host, the outcome and reason (which say
    # whether it came from an error), and the reply's code and lines; ``at`` is checked.
    answer = None if reply is None else (reply.code, reply.lines)
    # The outcome by identity (its members are singletons): Enum's own __hash__ is a Python
    # function, and this key is hashed for every recipient.
    key = (host, id(found.outcome), found.reason, answer, found.enhanced)
    if memo is not None:
        known = memo.get(key)
        if known is not None and known.at == now:
            return known
    if found.reason is not None and _from_error_result(found):
        text, source = found.reason, "error"
    else:
        text = (reply.text if reply is not None else "") or (found.reason or "")
        source = "reply"
    attempt = Attempt(
        at=now,
        host=host,
        code=None if reply is None else reply.code,
        enhanced=_enhanced(found),
        text=text,
        source=source,
    )
    if memo is not None:
        memo[key] = attempt
    return attempt


def from_result(
    record: MessageRecord,
    recipients: Sequence[Recipient],
    result: DeliveryResult,
    *,
    now: dt.datetime,
    retry: RetryPolicy,
    random: Callable[[], float],
    attempts: AttemptMemo | None = None,
    delay_warning_after: dt.timedelta | None = None,
) -> Decision:
    """What a transaction's per-recipient results do to ``recipients`` of ``record``.

    ``attempts``, a dict kept across the results of one ``send_many`` call, lets equal
    answers share one :class:`Attempt` object. With ``delay_warning_after``, a deferral
    that calls for a delay warning carries ``delay_warned=True`` (see the module docstring).
    """
    found_all = result.recipients
    if len(recipients) == 1 and len(found_all) == 1:
        # One recipient, accepted: the common case, decided without the general loop's
        # bookkeeping (the same decision it would reach).
        only = found_all[0]
        address = recipients[0].address
        if only.outcome is _ACCEPTED and (only.address is address or only.address == address):
            reply = only.reply
            attempt = _attempt(only, only.host or result.host, now, attempts)
            return new_decision(
                (new_change(address, _DELIVERED, attempt),),
                reply is not None and reply.code == 421,  # 421: back off all the same
            )
    changes = []
    any_accepted = False
    all_transient = True
    about_the_server = False  # a transient refusal that is not about one mailbox
    saw_421 = False
    find: Callable[[Address], RecipientRecord] | None = None  # made at the first refusal
    for recipient, matched in zip(recipients, _matched(recipients, result), strict=True):
        found = matched
        if found is None:
            # A transport that skipped a recipient broke its contract: retry it.
            found = RecipientResult(
                address=recipient.address,
                outcome=Outcome.TRANSIENT,
                reason="the transport returned no result for this recipient",
                host=result.host,
            )
        reply = found.reply
        attempt = _attempt(found, found.host or result.host, now, attempts)
        saw_421 = saw_421 or (reply is not None and reply.code == 421)
        if found.outcome is _ACCEPTED:
            any_accepted = True
            all_transient = False
            changes.append(new_change(recipient.address, _DELIVERED, attempt))
        elif found.outcome is _PERMANENT and not _deferring_error(found, retry):
            all_transient = False
            changes.append(new_change(recipient.address, _BOUNCED, attempt))
        else:
            about_the_server = about_the_server or not _about_one_mailbox(reply)
            if find is None:
                find = recipient_lookup(record)
            changes.append(
                _failure_change(
                    record,
                    find(recipient.address),
                    attempt,
                    reply,
                    now=now,
                    retry=retry,
                    random=random,
                    delay_warning_after=delay_warning_after,
                )
            )
    refused: bool | None
    if saw_421 or (all_transient and about_the_server):
        refused = True
    elif any_accepted:
        refused = False
    else:
        refused = None
    return new_decision(tuple(changes), refused)


def from_error(
    record: MessageRecord,
    recipients: Sequence[Recipient],
    error: DeliveryError,
    *,
    now: dt.datetime,
    retry: RetryPolicy,
    random: Callable[[], float],
    delay_warning_after: dt.timedelta | None = None,
) -> Decision:
    """What a transaction that raised ``error`` does to ``recipients`` of ``record``
    (``delay_warning_after`` as for :func:`from_result`)."""
    reply = error.reply
    # The reply's status, or the one of the failure's kind (X.4.1 a connection not
    # answered, X.4.2 a timeout, ...): what the attempt history and the DSNs report.
    status = error_status(error)
    attempt = Attempt(
        at=now,
        host=error.host,
        code=None if reply is None else reply.code,
        enhanced=None if status is None else str(status),
        text=f"{type(error).__name__}: {error}",
        source="error",
    )
    defers = retry.defers(error)
    find = recipient_lookup(record) if defers else None
    changes = []
    for recipient in recipients:
        if find is not None:
            changes.append(
                _failure_change(
                    record,
                    find(recipient.address),
                    attempt,
                    reply,
                    now=now,
                    retry=retry,
                    random=random,
                    delay_warning_after=delay_warning_after,
                )
            )
        else:
            changes.append(Change(address=recipient.address, state=State.BOUNCED, attempt=attempt))
    return Decision(tuple(changes), True if defers else None)
