"""Many messages on one session, pipelined across transactions (``deliver_many``).

Rules: RFC 2920 §3.1 lets a message's content start a group; the replies are read in order
as the bounded window (:data:`WINDOW_MESSAGES`, :data:`WINDOW_BYTES`) fills. A session that
ends mid-batch leaves later messages without a result. The join limit is read from the
:mod:`mailrelay.flow` package at each use. No I/O here: only requests.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Sequence

import attrs

from mailrelay._shown import Shown
from mailrelay._slots import new_instance, slot_setters
from mailrelay.envelope import Envelope
from mailrelay.errors import (
    ConnectionLost,
    DeliveryError,
    RemoteProtocolError,
    ServerProtocolError,
)
from mailrelay.flow import requests as _requests
from mailrelay.flow.bookkeeping import (
    MAIL_MAX_REASON,
    SESSION_ENDED_REASON,
    TOO_MANY_REASON,
    _SessionClosed,
    _Transaction,
    unsent_positions,
)
from mailrelay.flow.core import _trace, log
from mailrelay.flow.requests import _PEEK, Step, Write, _read_request
from mailrelay.flow.transaction import _APART, _DATA, _Delivery
from mailrelay.message import Message
from mailrelay.protocol import (
    NEED_DATA,
    Bdat,
    Command,
    ConnectionClosed,
    EndOfData,
    MailFrom,
    RcptTo,
    Response,
    Rset,
    ServiceClosing,
)
from mailrelay.reply import Reply
from mailrelay.results import DeliveryResult, Outcome, RecipientResult

#: The most messages whose replies are outstanding in a BDAT window (RFC 3030 with
#: RFC 2920): enough to hide the round trip, few enough that the replies never fill the
#: socket buffers while we are still writing.
WINDOW_MESSAGES = 32
#: The most message bytes outstanding in a BDAT window.
WINDOW_BYTES = 1 << 20
# A message up to this size goes in one BDAT LAST (and may then share the window).
_ONE_CHUNK = 1 << 20
# Over DATA, a message larger than this has its data written as soon as its 354 arrives,
# alone, and its terminator with the next message's envelope: the server reads the data
# while the next envelope is got ready, instead of after, and the data is written as it
# is (no copy joining it to the envelope). For a smaller one, the extra system call would
# cost more than the overlap gains.
_EARLY_DATA = 16384


@attrs.frozen(kw_only=True)
class BatchOutcome:
    """What :meth:`Session.deliver_many` did with each message.

    Attributes:
        results: one entry per message, in order: its result, or ``None`` when it got no
            final answer because the session ended first (see ``error``), or, with
            ``error`` None, because the server's LIMITS MAILMAX (RFC 9422) was reached
            by messages sent in several transactions (send it on another session).
        error: why the session ended before the batch did, or ``None``.
    """

    results: tuple[DeliveryResult | None, ...]
    error: DeliveryError | None = None


# The hot loop yields one flushed Write per message; attrs' frozen __init__ costs more than
# the rest of the request's handling, and Write has no validators or converters, so its
# slots are filled directly (:mod:`mailrelay._slots`, as bookkeeping's builders do, with
# the same import-time check of the fields).
_set_data, _set_phase, _set_flush = slot_setters(Write, ("data", "phase", "flush"))


def _flushed_write(data: bytes, phase: str) -> Write:
    """``Write(data=data, phase=phase, flush=True)``, built directly."""
    request: Write = new_instance(Write)
    _set_data(request, data)
    _set_phase(request, phase)
    _set_flush(request, True)
    return request


def _apply_envelope(transaction: _Transaction, replies: list[Reply], pos: int) -> int:
    """Record the replies to a pipelined MAIL and its RCPTs, from ``replies[pos]`` on (as
    many as arrived); returns the position after them."""
    got = len(replies)
    if pos >= got:
        return pos
    mail_reply = replies[pos]
    pos += 1
    # Reply.is_positive, inlined (twice): this runs for every message.
    mail_ok = 200 <= mail_reply.code < 300
    if not mail_ok:
        # RFC 2920 §3.1: the RCPTs' 503s only echo the refused MAIL.
        transaction.settle_all(mail_reply)
    rcpt_replies = transaction.rcpt_replies
    for index in range(len(rcpt_replies)):
        if pos >= got:
            return pos
        reply = replies[pos]
        pos += 1
        rcpt_replies[index] = reply
        if mail_ok and not 200 <= reply.code < 300:
            transaction.refused(index, reply)
    return pos


def _short(closed: _SessionClosed | DeliveryError | None) -> _SessionClosed | DeliveryError:
    """The reason a collection of replies came up short (to raise once the replies that did
    come are recorded)."""
    assert closed is not None, "replies are only missing when the session ended or a read failed"
    return closed


def _result_of(transactions: list[_Transaction | None], index: int) -> DeliveryResult:
    """The result of message ``index``, now answered; its bookkeeping is let go (see
    ``transactions`` in ``_deliver_many``)."""
    transaction = transactions[index]
    assert transaction is not None
    transactions[index] = None
    return transaction.result()


class _Batch(_Delivery):
    """Many messages, pipelined across transactions."""

    # -- many messages ---------------------------------------------------------------------------

    def deliver_many(self, items: Sequence[tuple[Message, Envelope]]) -> Step[BatchOutcome]:
        """Send several messages, pipelined across messages when the server allows it.

        RFC 2920 §3.1 lets message content be the first "command" of a group, so with
        PIPELINING the next message's RSET (if needed), MAIL, RCPTs and DATA follow the
        previous message's data and terminator in one write, and the previous final reply
        is read with them (one round trip per message instead of two). (A message over
        :data:`_EARLY_DATA` bytes has its data written on its own as soon as its 354
        comes, and only its terminator goes with the next envelope.) With CHUNKING
        (``chunking=True``) a message that fits in one chunk goes as ``BDAT n LAST``, which
        needs no 354, so up to :data:`WINDOW_MESSAGES` such messages (or
        :data:`WINDOW_BYTES` of their data) are in flight at once; replies are read in
        order as the window fills. Each message's result is the one :meth:`deliver` would
        give it alone.

        A session that ends early (421, end of file, timeout, reset, protocol violation)
        does not raise: the outcome records the error, and each message then either has a
        result (when any of its recipients got a final answer; the rest are TRANSIENT) or
        ``None`` (no final answer: it was not sent, or its data got no reply; the caller may
        send it again on a fresh connection).
        """
        # _guarded() inlined: every request of a long batch passes through this frame.
        try:
            self._ended_by = self._closing_error = None
            if self._hello_after_auth_due and not self.closed and self.auth_refusal is None:
                error = yield from self._hello_after_auth_for(items)
                if error is not None:
                    return BatchOutcome(results=(None,) * len(items), error=error)
            ext = self._extensions
            if (
                len(items) > 1
                and self.config.pipelining
                and (self._each_alone or (ext is not None and "BURL" in ext.keywords))
            ):
                log.debug("%s: each message of the batch alone (Dovecot)", self.config.peer)
                return (yield from self._many_within_limits(items, alone=range(len(items))))
            if ext is not None and (ext.rcpt_max is not None or ext.rcpt_domain_max is not None):
                return (yield from self._many_within_limits(items))
            self._too_many_seen = self._apart_seen = False
            outcome = yield from self._deliver_many(items)
            if self._too_many_seen:
                outcome = yield from self._send_the_rest(items, outcome)
            if self._apart_seen:
                outcome = yield from self._send_apart(items, outcome)
            return outcome
        except BaseException:
            self.closed = True
            raise

    def _hello_after_auth_for(
        self, items: Sequence[tuple[Message, Envelope]]
    ) -> Step[DeliveryError | None]:
        """EHLO again after AUTH (:meth:`_hello_after_auth`) before a batch any of whose
        messages needs what the server has not offered; the error that ended the session
        meanwhile (none of the batch was sent), or ``None``."""
        if not any(self._unlocked_by_auth(message, envelope) for message, envelope in items):
            return None
        try:
            yield from self._hello_after_auth()
        except _SessionClosed as closed:
            return self._refuse(closed.reply, "in answer to EHLO after AUTH")
        except DeliveryError as exc:
            # Thrown in by the driver (a timeout, a reset): the session is out of step.
            yield from self._closed()
            return exc
        return None

    def _send_the_rest(
        self, items: Sequence[tuple[Message, Envelope]], outcome: BatchOutcome
    ) -> Step[BatchOutcome]:
        """After a batch: each message's recipients that a server refused as one too many
        (RFC 5321 §4.5.3.1.10) in further transactions on this session (see
        :meth:`_in_parts`), while it lasts."""
        results = list(outcome.results)
        for index, result in enumerate(results):
            if result is None or not any(r.reason == TOO_MANY_REASON for r in result.deferred):
                continue
            if self.closed:
                # These recipients keep their TRANSIENT 452; the batch says why, and the
                # count tells the transport to send them on another connection.
                self._ended_by = (
                    self._ended_by
                    or self._closing_error
                    or ConnectionLost("the session is closed", host=self.config.peer)
                )
                self.left_unsent += sum(
                    1 for left in results[index:] if left is not None and unsent_positions(left)
                )
                break
            message, envelope = items[index]
            results[index] = yield from self._in_parts(message, envelope, [], result)
        # A session that ended between a message's parts ended the batch too.
        return BatchOutcome(results=tuple(results), error=outcome.error or self._ended_by)

    def _send_apart(
        self, items: Sequence[tuple[Message, Envelope]], outcome: BatchOutcome
    ) -> Step[BatchOutcome]:
        """After a batch: each message refused before sending because some of its
        recipients alone need SMTPUTF8, which the server does not offer, goes to the others
        (:meth:`_without`), each alone, while the session lasts and the server's LIMITS
        MAILMAX (RFC 9422) allows. Once it has ended (or has no transaction left), the
        others are left unsent (TRANSIENT, never offered: the count tells the transport to
        send them on another connection), except those of a message whose final reply the
        end lost (it went out whole: the server may have taken it, RFC 1047), TRANSIENT with
        the error, as :meth:`_in_parts` leaves them."""
        self._apart_seen = False
        results = list(outcome.results)
        for index, result in enumerate(results):
            if result is None or result.recipients[0].reason != _APART[0]:
                continue
            message, envelope = items[index]
            # Why the others have no answer: never offered (unless the message went out).
            reply: Reply | None = None
            reason = SESSION_ENDED_REASON
            host = self.config.peer
            if self.closed or self._ended_by is not None:
                self._ended_by = (
                    self._ended_by
                    or self._closing_error
                    or ConnectionLost("the session is closed", host=self.config.peer)
                )
            elif self._mail_max_reached():
                # RFC 9422: the server takes no more transactions on this session (the
                # others of the batch, or of a split message, used them up): as in
                # _in_parts, they wait for another connection.
                reason = MAIL_MAX_REASON
            else:
                try:
                    results[index] = yield from self._without(message, envelope)
                    continue
                except DeliveryError as exc:
                    # None of the others was answered (else there would be a result): the
                    # session is out of step.
                    yield from self._closed()
                    self._ended_by = exc
                    if any(
                        isinstance(command, EndOfData)
                        or (isinstance(command, Bdat) and command.last)
                        for command in self.unanswered
                    ):
                        # The whole message went out and its final reply was lost: the
                        # server may have taken it (RFC 1047). Not "never offered": a pool
                        # would send it to them again (see _in_parts).
                        reply, host = exc.reply, exc.host
                        reason = f"{type(exc).__name__} before a final reply: {exc}"
            apart, keep = self._split_apart(message, envelope)
            unsent = [
                RecipientResult(
                    address=envelope.recipients[i].address,
                    outcome=Outcome.TRANSIENT,
                    reply=reply,
                    reason=reason,
                    host=host,
                )
                for i in keep
            ]
            results[index] = self._merged_apart(envelope, apart, keep, unsent, message.message_id)
            if reason in (SESSION_ENDED_REASON, MAIL_MAX_REASON):
                self.left_unsent += 1
        return BatchOutcome(results=tuple(results), error=outcome.error or self._ended_by)

    def _many_within_limits(
        self, items: Sequence[tuple[Message, Envelope]], alone: Iterable[int] = ()
    ) -> Step[BatchOutcome]:
        """A batch to a server that announced recipient LIMITS (RFC 9422): each run of
        messages whose envelopes keep to them is pipelined as usual; each of the others
        goes alone, in as many transactions as the limits need (:meth:`deliver`). So do
        the messages at ``alone``.

        The messages go in their order: when the session ends early, the messages from the
        first one without a result on were not sent (a pool sends them again on a fresh
        connection, so none after it may have been delivered)."""
        count = len(items)
        over = {i for i, (_, envelope) in enumerate(items) if self._recipient_parts(envelope)}
        over.update(alone)
        results: list[DeliveryResult | None] = [None] * count
        error: DeliveryError | None = None
        index = 0
        while index < count and error is None and self._ended_by is None:
            if self.closed:
                # Ended with the last message answered (a 421 after its final reply).
                error = self._closing_error or ConnectionLost(
                    "the session is closed", host=self.config.peer
                )
                break
            if index and self._mail_max_reached():
                # A split message used up the server's MAILMAX (RFC 9422): the rest are
                # handed back unsent, without an error, for a fresh connection (a pool
                # replaces this one: it is full).
                break
            if index in over:
                try:
                    results[index] = yield from self._deliver(*items[index])
                except DeliveryError as exc:
                    # As in _deliver_many: the session is out of step after an error
                    # thrown in by the driver (one that closed it is closed already).
                    yield from self._closed()
                    error = exc
                index += 1
                continue
            end = index
            while end < count and end not in over:
                end += 1
            chosen = items[index:end]
            self._too_many_seen = self._apart_seen = False
            outcome = yield from self._deliver_many(chosen)
            if self._too_many_seen:
                outcome = yield from self._send_the_rest(chosen, outcome)
            if self._apart_seen:
                outcome = yield from self._send_apart(chosen, outcome)
            results[index:end] = outcome.results
            error = outcome.error
            index = end
        # A session that ended between a message's parts ended the batch too.
        return BatchOutcome(results=tuple(results), error=error or self._ended_by)

    def _deliver_many(self, items: Sequence[tuple[Message, Envelope]]) -> Step[BatchOutcome]:
        self._ensure_ready()
        count = len(items)
        results: list[DeliveryResult | None] = [None] * count
        # Each message's bookkeeping from its first command until its result is recorded;
        # then None: only unanswered messages' is needed (when the session ends early),
        # and every object a long batch keeps alive makes the garbage collector's rounds
        # more frequent and longer.
        transactions: list[_Transaction | None] = [None] * count
        # Messages whose replies are still to be read, oldest first: (index, reader, bytes).
        inflight: deque[tuple[int, Step[None], int]] = deque()
        outstanding = 0
        ext = self.extensions
        pipelined = self.config.pipelining and ext.pipelining
        bdat = self.config.chunking and ext.chunking
        lmtp = self.config.lmtp
        # SMTP over DATA: the message whose final reply is still to be read.
        previous: tuple[int, _Transaction] | None = None
        # ...and its data and terminator, not written yet: they go with the next write.
        carry: tuple[Command, ...] = ()
        # Work done while the server answers (after a flushed write, before the read that
        # waits for it), off the round trip's critical path: a message whose final reply
        # came but is not recorded yet, and the next message's bookkeeping and commands.
        unsettled: tuple[int, _Transaction, Reply] | None = None
        # (index, bookkeeping, its MAIL and RCPTs: None when it will not be sent)
        ahead: tuple[int, _Transaction, tuple[MailFrom, list[RcptTo]] | None] | None = None
        error: DeliveryError | None = None
        reason = ""
        try:
            for index, (message, envelope) in enumerate(items):
                if self.closed:
                    # Ended by the dialogue after an answer (see _Delivery._answered_early):
                    # the rest go on another connection.
                    raise self._closing_error or ConnectionLost(
                        "the session is closed", host=self.config.peer
                    )
                if ahead is not None and ahead[0] == index:
                    transaction = ahead[1]
                else:
                    transaction = self._prepared(message, envelope)
                    ahead = None
                if not transaction.open:  # all_final(), inlined
                    results[index] = transaction.result()
                    continue
                transactions[index] = transaction
                if not pipelined or (bdat and message.size > _ONE_CHUNK):
                    # Nothing overlaps: read what is in flight, then one message alone.
                    # (A DATA message waits in ``previous`` only with PIPELINING, without
                    # BDAT, so never on the way here.)
                    assert previous is None
                    while inflight:
                        done, reader, size = inflight.popleft()
                        yield from reader
                        outstanding -= size
                        results[done] = _result_of(transactions, done)
                    if self._needs_rset:
                        yield from self._rset()
                    yield from self._transaction(message, envelope, transaction)
                    results[index] = _result_of(transactions, index)
                    continue
                if ahead is not None and ahead[2] is not None:
                    mail, rcpts = ahead[2]
                else:
                    mail, rcpts = self._commands(message, envelope)
                ahead = None
                rset = self._needs_rset
                group: list[Command] = [Rset(), mail, *rcpts] if rset else [mail, *rcpts]
                if bdat:
                    # RFC 3030 §2-4: BDAT LAST needs no 354, so it joins the group and the
                    # whole message can be in flight; its replies are read later, in order.
                    data = b"".join(message.chunks())
                    group.append(Bdat(data=data, last=True))
                    yield from self._write(*group, phase="mail")
                    self.transactions += 1
                    # The next group goes before this one's replies are read, and a BDAT
                    # LAST refused (every recipient refused, say) may leave the server's
                    # transaction open (RFC 3030 §2 calls it failed; Dovecot keeps the MAIL
                    # and answers the next one 503): the next group starts with RSET, in
                    # the same write (RFC 2920), at the cost of one short reply a message.
                    self._needs_rset = True
                    inflight.append((index, self._bdat_replies(transaction, rset), len(data)))
                    outstanding += len(data)
                    while len(inflight) > WINDOW_MESSAGES or outstanding > WINDOW_BYTES:
                        done, reader, size = inflight.popleft()
                        yield from reader
                        outstanding -= size
                        results[done] = _result_of(transactions, done)
                    continue
                group.append(_DATA)
                self._needs_rset = True
                if not lmtp:
                    if len(carry) == 1 and previous is not None:
                        # Only the terminator is left (the data went at its 354): has the
                        # server answered before it?
                        yield from self._early_in_batch(previous[1])
                    # One write: the previous message's data and terminator (if any), then
                    # this message's envelope (RFC 2920 §3.1).
                    conn = self._conn
                    commands = [*carry, *group] if carry else group
                    carry = ()
                    # Asked once per message, for the trace of its write and of its replies.
                    debug = log.isEnabledFor(logging.DEBUG)
                    if debug:
                        pieces = [conn.send(command) for command in commands]
                        for command, data in zip(commands, pieces, strict=True):
                            log.debug(">>> %s", _trace(command, data))
                        wire = b"".join(pieces)
                    else:
                        wire = conn.send_group(commands)
                    try:
                        yield _flushed_write(wire, "mail")
                    except DeliveryError as exc:
                        if previous is not None:
                            # The previous message's terminator was in this write or before
                            # it: the server may have answered it (or refused the message
                            # part-way) before it hung up (see _Delivery._cut_short).
                            yield from self._cut_short(exc, previous[1], terminator_sent=True)
                        raise
                    self.transactions += 1
                    # While the server reads that: record the message answered last time,
                    # and get the next one ready (its envelope cannot be sent before this
                    # message's 354, but its bookkeeping and commands can be built now).
                    if unsettled is not None:
                        done, done_transaction, final = unsettled
                        unsettled = None
                        results[done] = done_transaction.finish(final)
                        transactions[done] = None  # answered (see above)
                    following = index + 1
                    if following < count:
                        next_message, next_envelope = items[following]
                        next_transaction = self._prepared(next_message, next_envelope)
                        ahead = (
                            following,
                            next_transaction,
                            # all_final(), inlined: a message refused before sending has
                            # no commands.
                            self._commands(next_message, next_envelope)
                            if next_transaction.open
                            else None,
                        )
                    # The hot path: one collection of replies per message, in FIFO order:
                    # the previous message's final reply, then RSET's, MAIL's, the RCPTs',
                    # and DATA's.
                    expected = len(group) + (previous is not None)
                    replies, closed = yield from self._collect(
                        expected, "data_end" if previous is not None else "mail", debug
                    )
                    got = len(replies)
                    pos = 0
                    if previous is not None:
                        if not got:
                            raise _short(closed)
                        # Recorded after the next write (see above).
                        unsettled = (*previous, replies[0])
                        previous = None
                        pos = 1
                    pos = _apply_envelope(transaction, replies, pos + rset)
                    if transaction.too_many:
                        self._too_many_seen = True
                    if pos >= got:
                        raise _short(closed)
                    data_reply = replies[pos]
                    if (
                        data_reply.code == 354
                        and message.size <= _requests._JOIN_LIMIT
                        and transaction.open  # not all_final(), inlined
                        and not conn.has_unread  # else _data_body ends the session
                    ):
                        # Sent with the next message's envelope (or before the last read).
                        carry = self._data_commands(message, debug)
                        previous = (index, transaction)
                        if message.size > _EARLY_DATA:
                            # The data now, the terminator later (see _EARLY_DATA).
                            try:
                                yield _flushed_write(conn.send_group(carry[:1]), "data_block")
                            except DeliveryError as exc:
                                yield from self._cut_short(exc, transaction)
                                raise
                            carry = carry[1:]
                    elif (yield from self._data_body(message, transaction, data_reply)):
                        previous = (index, transaction)
                    else:
                        results[index] = _result_of(transactions, index)
                    continue
                yield from self._write(*group, phase="mail")
                self.transactions += 1
                # LMTP: the previous message's final replies come first (FIFO), then ours.
                while inflight:
                    done, reader, size = inflight.popleft()
                    yield from reader
                    outstanding -= size
                    results[done] = _result_of(transactions, done)
                if rset:
                    yield from self._rset_reply()
                yield from self._read_envelope_replies(transaction)
                if (yield from self._data_body(message, transaction)):
                    # The final reply is read with the next message's envelope replies.
                    inflight.append((index, self._finals(transaction), 0))
                else:
                    results[index] = _result_of(transactions, index)
            if unsettled is not None:
                done, done_transaction, final = unsettled
                unsettled = None
                done_transaction.settle_all(final)
                results[done] = _result_of(transactions, done)
            while inflight:
                done, reader, size = inflight.popleft()
                yield from reader
                results[done] = _result_of(transactions, done)
            if carry:
                if len(carry) == 1 and previous is not None:
                    yield from self._early_in_batch(previous[1])
                yield Write(data=self._conn.send_group(carry), phase="data_block")
            if previous is not None:
                done, done_transaction = previous
                done_transaction.settle_all((yield from self._reply("data_end")))
                results[done] = _result_of(transactions, done)
            # (Every message has its answers; _send_the_rest may still need the session.)
            self._closing_error = yield from self._close_if_unsolicited()
        except _SessionClosed as closed:
            error = self._refuse(closed.reply, "before every message was answered")
            what = "closed the session (421)" if closed.reply else "closed the connection"
            reason = f"the server {what} before a final reply"
        except DeliveryError as exc:
            yield from self._closed()
            error = exc
            reason = f"{type(exc).__name__} before a final reply: {exc}"
        if unsettled is not None:
            # The session ended before the next write: that final reply still counts.
            done, done_transaction, final = unsettled
            done_transaction.settle_all(final)
            results[done] = _result_of(transactions, done)
        if error is not None:
            for index, begun in enumerate(transactions):
                if results[index] is None and begun is not None and begun.any_final():
                    begun.unfinished(error.reply, reason)
                    results[index] = begun.result()
        return BatchOutcome(results=tuple(results), error=error)

    def _early_in_batch(self, transaction: _Transaction) -> Step[None]:
        """Before a terminator whose data went out before it: a reply that came meanwhile
        answers that message and ends the session (see :meth:`_answered_early`), which
        ends the batch: raises the error that says so."""
        early = yield _PEEK
        if early is not None and (yield from self._answered_early(early, transaction)):
            raise self._closing_error or ConnectionLost(
                "the session is closed", host=self.config.peer
            )

    def _collect(
        self, count: int, phase: str, debug: bool
    ) -> Step[tuple[list[Reply], _SessionClosed | DeliveryError | None]]:
        """The replies to the next ``count`` commands in flight, reading as needed; fewer
        (and the reason) when the server ends the session first (421 or end of file) or a
        read fails (a timeout or reset thrown in by the driver, a protocol violation): the
        replies that came before still count, since one may be the previous message's final
        reply (dropping it would report a delivered message as failed, and a retry would
        deliver it twice).
        ``debug``: trace the replies (the ``mailrelay.flow`` logger's DEBUG level is on)."""
        conn = self._conn
        replies: list[Reply] = []
        # Each reply is waited for under one deadline: a read after bytes that completed
        # no reply resumes the wait (see Read.resume).
        resume = False
        while len(replies) < count:
            # Plain replies to commands in flight, without events; anything else (a 421,
            # the end of file, a need for more bytes) is left to next_event().
            ready = conn.next_replies(count - len(replies))
            if ready:
                if debug:
                    for reply in ready:
                        log.debug("<<< %s", Shown(reply))
                replies += ready
                resume = False
                continue
            try:
                event = conn.next_event()
                if event is NEED_DATA:
                    data = yield _read_request(phase, resume)
                    conn.receive_data(data if data is not None else b"")
                    resume = True
                    continue
            except RemoteProtocolError as exc:
                yield from self._closed()
                error = ServerProtocolError(
                    f"the server broke the protocol: {exc}", host=self.config.peer
                )
                error.__cause__ = exc
                return replies, error
            except DeliveryError as exc:
                return replies, exc
            if type(event) is Response:
                reply = event.reply
                if debug:
                    log.debug("<<< %s", Shown(reply))
                if reply.code != 421:
                    replies.append(reply)
                    resume = False
                    continue
                closed = _SessionClosed(reply)  # RFC 5321 §3.8
            elif isinstance(event, ServiceClosing):
                closed = _SessionClosed(event.reply)
            elif isinstance(event, ConnectionClosed):
                closed = _SessionClosed(None)
            else:  # pragma: no cover - LMTP replies and greetings never come here
                raise AssertionError(f"unexpected event {event!r}")
            yield from self._closed()
            return replies, closed
        return replies, None

    def _bdat_replies(self, transaction: _Transaction, rset: bool) -> Step[None]:
        """The replies to a pipelined [RSET,] MAIL, RCPTs and BDAT LAST, in order."""
        if rset:
            yield from self._rset_reply()
        yield from self._read_envelope_replies(transaction)
        if transaction.all_final():
            yield from self._empty_finals()  # nobody to deliver to
        else:
            yield from self._finals(transaction)
