"""One mail transaction: MAIL, RCPT, DATA or BDAT, the final replies; and the probe.

Rules: a message the server cannot take (size, 8BITMIME, SMTPUTF8, REQUIRETLS) is refused
before anything is sent; a recipient keeps a final answer once it has one; a refusal the
server sent before a write of the data failed (it replied early and hung up) is that
answer (``_cut_short``), a positive reply there never is. The join limit
is read from :mod:`mailrelay.flow.requests` at each use, so there is one value to tune.
No I/O here: only requests.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import cast

import attrs

from mailrelay._shown import Shown
from mailrelay.address import Address
from mailrelay.envelope import Envelope
from mailrelay.errors import (
    ConnectionLost,
    DeliveryError,
    ProtocolError,
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
from mailrelay.flow.core import _NO_EXTENSIONS, log
from mailrelay.flow.opening import _Opening
from mailrelay.flow.requests import _PEEK, Step, Write
from mailrelay.message import Message
from mailrelay.protocol import (
    Bdat,
    Command,
    Data,
    DataChunk,
    DotStuffer,
    EndOfData,
    Extensions,
    MailFrom,
    RcptTo,
)
from mailrelay.reply import EnhancedStatus, Reply
from mailrelay.results import DeliveryResult, Outcome, RecipientResult

_DATA = Data()
_END_OF_DATA = EndOfData()


@attrs.frozen(kw_only=True)
class ProbeResult:
    """What :meth:`Session.probe` learnt.

    Attributes:
        mail: the reply to MAIL, or ``None`` when the session ended before it came.
        recipients: one reply per recipient, in order; ``None`` where no RCPT was answered
            (MAIL refused, or the session ended first).
        ended: whether the session ended during the probe (421 or end of file).
    """

    mail: Reply | None
    recipients: tuple[Reply | None, ...]
    ended: bool = False


def _unfinished(
    envelope: Envelope,
    *,
    finals: list[RecipientResult | None],
    parts: Iterable[list[int]],
    reply: Reply | None,
    reason: str,
    host: str | None,
) -> None:
    """The recipients of ``parts`` that have no result yet are TRANSIENT: the session
    ended before their transaction did. (One already refused as too many keeps that
    TRANSIENT result.)"""
    for part in parts:
        for index in part:
            if finals[index] is None:
                finals[index] = RecipientResult(
                    address=envelope.recipients[index].address,
                    outcome=Outcome.TRANSIENT,
                    reply=reply,
                    reason=reason,
                    host=host,
                )


#: The reason of a recipient refused before sending because its address needs SMTPUTF8
#: (RFC 6531), which the server does not offer.
SMTPUTF8_ADDRESS_REASON = "the address needs SMTPUTF8 (RFC 6531), which the server does not offer"
# RFC 6531 §3.7: "Non-ASCII addresses not permitted for that sender/recipient".
_NON_ASCII_ADDRESS = EnhancedStatus.parse("5.6.7")
# The refusal _precheck gives a message only some of whose recipients need SMTPUTF8 (and so
# that _prepared notes in _apart_seen): never a final result; the caller sends to the others.
_APART = (
    "some recipients need SMTPUTF8 (RFC 6531), which the server does not offer",
    _NON_ASCII_ADDRESS,
)
#: Why a message cannot be sent to a server at all, and the RFC 3463 status that says it.
_Refusal = tuple[str, EnhancedStatus]
_REQUIRETLS = EnhancedStatus.parse("5.7.30")
# RFC 3463 §3.4, §3.7: "message too big for system", "other media error", "conversion
# required but not supported".
_TOO_BIG = EnhancedStatus.parse("5.3.4")
_MEDIA = EnhancedStatus.parse("5.6.0")
_NO_CONVERSION = EnhancedStatus.parse("5.6.3")


def _asks_for_dsn(envelope: Envelope) -> bool:
    """Whether ``envelope`` asks for anything of RFC 3461 (RET, ENVID, NOTIFY, ORCPT)."""
    if envelope.ret is not None or envelope.envid is not None:
        return True
    return any(r.notify is not None or r.orcpt is not None for r in envelope.recipients)


def _with_last(chunks: Iterator[bytes]) -> Iterator[tuple[bytes, bool]]:
    """Each chunk with a flag telling whether it is the last; one empty chunk for no data."""
    previous: bytes | None = None
    for chunk in chunks:
        if previous is not None:
            yield previous, False
        previous = chunk
    yield (previous if previous is not None else b""), True


class _Delivery(_Opening):
    """One message (or one probe) per transaction."""

    # -- per message ---------------------------------------------------------------------------

    def deliver(self, message: Message, envelope: Envelope) -> Step[DeliveryResult]:
        """Send one message to the envelope's recipients.

        Returns:
            one result per envelope recipient, in envelope order.

        Raises:
            SessionRefused: 421 before any recipient got a final answer.
            ConnectionLost: the connection ended before any recipient got a final answer,
                or the session was already closed.
            ServerProtocolError: the server broke the protocol.
        """
        return (yield from self._guarded(self._deliver(message, envelope)))

    def _deliver(self, message: Message, envelope: Envelope) -> Step[DeliveryResult]:
        self._ensure_ready()
        if self._hello_after_auth_due and self._unlocked_by_auth(message, envelope):
            try:
                yield from self._hello_after_auth()
            except _SessionClosed as closed:
                raise self._refuse(closed.reply, "in answer to EHLO after AUTH") from None
        parts = self._recipient_parts(envelope)
        if parts is None:
            self._apart_seen = False
            transaction = yield from self._attempt(message, envelope)
            if self._apart_seen:
                # Refused before sending, for recipients that alone need SMTPUTF8.
                return (yield from self._without(message, envelope))
            if not transaction.too_many:
                return transaction.result()
            first = transaction.result()
            return (yield from self._in_parts(message, envelope, [], first))
        if self._smtputf8_apart(message, envelope) is not None:
            return (yield from self._without(message, envelope))
        return (yield from self._in_parts(message, envelope, parts, None))

    def _attempt(self, message: Message, envelope: Envelope) -> Step[_Transaction]:
        """One transaction for every recipient of ``envelope``; its bookkeeping, settled."""
        transaction = self._prepared(message, envelope)
        if transaction.all_final():
            return transaction
        try:
            if self._needs_rset:
                yield from self._rset()
            yield from self._transaction(message, envelope, transaction)
            unasked = yield from self._close_if_unsolicited()
            if unasked is not None:
                self._closing_error = unasked
        except _SessionClosed as closed:
            if not transaction.any_final():
                raise self._refuse(closed.reply, "before any recipient was answered") from None
            what = "closed the session (421)" if closed.reply else "closed the connection"
            transaction.unfinished(closed.reply, f"the server {what} before a final reply")
            self._closing_error = self._refuse(closed.reply, "before every recipient was answered")
        except DeliveryError as exc:
            # A timeout or reset thrown in by the driver (or a protocol violation). Answers
            # already given (LMTP finals, refused RCPTs) must not be lost with it: a retry of
            # the whole message would deliver twice (RFC 2033 §4.2). The rest are TRANSIENT.
            if not transaction.any_final():
                raise
            yield from self._closed()
            transaction.unfinished(exc.reply, f"{type(exc).__name__} before a final reply: {exc}")
            self._closing_error = exc
        return transaction

    # -- recipients the server cannot take ------------------------------------------------------

    def _smtputf8_apart(self, message: Message, envelope: Envelope) -> list[int] | None:
        """The positions of the recipients whose addresses alone need SMTPUTF8 (RFC 6531),
        when the server does not offer it and the rest of the message could go without it:
        an ASCII message and sender, and at least one ASCII recipient. ``None`` otherwise
        (then either nothing needs SMTPUTF8, or the whole message does)."""
        ext = self._extensions
        if ext is None:
            ext = _NO_EXTENSIONS
        if ext.smtputf8 or message.needs_smtputf8:
            return None
        sender = envelope.sender
        if sender is not None and sender.needs_smtputf8:
            return None
        recipients = envelope.recipients
        apart = [i for i, r in enumerate(recipients) if r.address.needs_smtputf8]
        if not apart or len(apart) == len(recipients):
            return None
        return apart

    def _without(self, message: Message, envelope: Envelope) -> Step[DeliveryResult]:
        """The message to the envelope's recipients but those whose addresses alone need
        SMTPUTF8, which the server does not offer (RFC 6531 §3.2 forbids sending to them:
        each is PERMANENT); the others go as if they were the whole envelope (and raise as
        :meth:`deliver` does when none of them has an answer)."""
        apart, keep = self._split_apart(message, envelope)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%d recipients need SMTPUTF8, which the server lacks", len(apart))
        result = yield from self._deliver(message, envelope.subset(keep))
        return self._merged_apart(envelope, apart, keep, result.recipients, result.message_id)

    def _split_apart(self, message: Message, envelope: Envelope) -> tuple[list[int], list[int]]:
        """The positions of the recipients that alone need SMTPUTF8 (see
        :meth:`_smtputf8_apart`, which must have found some), and of the others."""
        apart = self._smtputf8_apart(message, envelope)
        assert apart is not None
        refused = frozenset(apart)
        return apart, [i for i in range(len(envelope.recipients)) if i not in refused]

    def _merged_apart(
        self,
        envelope: Envelope,
        apart: list[int],
        keep: list[int],
        kept: Sequence[RecipientResult],
        message_id: str | None,
    ) -> DeliveryResult:
        """One result for the whole envelope: ``kept`` (the results of the recipients at
        ``keep``) and a PERMANENT refusal for each of those at ``apart``."""
        finals: list[RecipientResult | None] = [None] * len(envelope.recipients)
        for index, recipient in zip(keep, kept, strict=True):
            finals[index] = recipient
        for index in apart:
            finals[index] = RecipientResult(
                address=envelope.recipients[index].address,
                outcome=Outcome.PERMANENT,
                reply=None,
                reason=SMTPUTF8_ADDRESS_REASON,
                host=self.config.peer,
                enhanced=_NON_ASCII_ADDRESS,
            )
        recipients = cast("tuple[RecipientResult, ...]", tuple(finals))
        return DeliveryResult(recipients=recipients, message_id=message_id, host=self.config.peer)

    # -- recipient limits ----------------------------------------------------------------------

    def _recipient_parts(self, envelope: Envelope) -> list[list[int]] | None:
        """The envelope's recipient positions in groups that keep to the server's LIMITS
        (RFC 9422: ``RCPTMAX``, ``RCPTDOMAINMAX``), or None when one transaction may take
        them all.

        Recipients are grouped by domain (A-label form, in order of first appearance) so
        that a domain limit costs as few transactions as it can; each group is filled up
        to ``RCPTMAX``.
        """
        ext = self._extensions
        if ext is None:
            return None
        most, domains = ext.rcpt_max, ext.rcpt_domain_max
        if most is None and domains is None:
            return None
        recipients = envelope.recipients
        few = most is None or len(recipients) <= most
        if few and (domains is None or len(recipients) <= domains):
            return None
        by_domain: dict[str, list[int]] = {}
        for index, recipient in enumerate(recipients):
            by_domain.setdefault(recipient.address.ascii_domain.lower(), []).append(index)
        if few and (domains is None or len(by_domain) <= domains):
            return None
        parts: list[list[int]] = []
        current: list[int] = []
        seen = 0  # domains in ``current``
        for positions in by_domain.values():
            if current and domains is not None and seen >= domains:
                parts.append(current)
                current, seen = [], 0
            seen += 1
            for index in positions:
                if most is not None and len(current) >= most:
                    parts.append(current)
                    current, seen = [], 1
                current.append(index)
        if current:
            parts.append(current)
        return parts

    def _in_parts(
        self,
        message: Message,
        envelope: Envelope,
        parts: list[list[int]],
        first: DeliveryResult | None,
    ) -> Step[DeliveryResult]:
        """The message to the envelope's recipients in several transactions on this session:
        the ``parts`` (recipient positions) in turn, after ``first`` (the result of a
        transaction for every recipient, already made), and again for the recipients a
        server refused as one too many (RFC 5321 §4.5.3.1.10: "the client ... sends the
        remaining recipients in another transaction"), for as long as each transaction
        gets at least one of its recipients answered otherwise.

        Raises the errors of :meth:`deliver` only when no recipient has an answer yet.
        """
        count = len(envelope.recipients)
        finals: list[RecipientResult | None] = [None] * count
        queue = deque(parts)
        if first is not None:
            self._record_part(finals, range(count), first.recipients, queue)
        while queue:
            positions = queue.popleft()
            if self.closed:
                self._ended_by = self._closing_error or ConnectionLost(
                    "the session is closed", host=self.config.peer
                )
                _unfinished(
                    envelope,
                    finals=finals,
                    parts=[positions, *queue],
                    reply=None,
                    reason=SESSION_ENDED_REASON,
                    host=self.config.peer,
                )
                break
            if self._mail_max_reached() and any(result is not None for result in finals):
                # RFC 9422: the server takes no more transactions on this session (it
                # would refuse the MAIL, often with 421). The rest wait for another
                # connection; the answers so far stand.
                _unfinished(
                    envelope,
                    finals=finals,
                    parts=[positions, *queue],
                    reply=None,
                    reason=MAIL_MAX_REASON,
                    host=self.config.peer,
                )
                break
            try:
                transaction = yield from self._attempt(message, envelope.subset(positions))
            except DeliveryError as exc:
                if all(result is None for result in finals):
                    raise
                # A timeout or reset thrown in by the driver leaves the session open but
                # out of step (_attempt re-raises it when this part had no answer yet):
                # the answers so far stand, and the session must not be used again.
                yield from self._closed()
                self._ended_by = exc
                if any(
                    isinstance(command, EndOfData) or (isinstance(command, Bdat) and command.last)
                    for command in self.unanswered
                ):
                    # The server may have taken this part's message (its final reply was
                    # lost, RFC 1047): a recipient an earlier transaction refused as one
                    # too many was offered again, so that older result must not stand
                    # (it would read as "never sent", and be sent a second time).
                    for index in positions:
                        finals[index] = None
                reason = f"{type(exc).__name__} before a final reply: {exc}"
                _unfinished(
                    envelope,
                    finals=finals,
                    parts=[positions],
                    reply=exc.reply,
                    reason=reason,
                    host=exc.host,
                )
                # The parts not begun were never offered to the server.
                _unfinished(
                    envelope,
                    finals=finals,
                    parts=queue,
                    reply=None,
                    reason=SESSION_ENDED_REASON,
                    host=self.config.peer,
                )
                break
            self._record_part(finals, positions, transaction.result().recipients, queue)
        results = cast("tuple[RecipientResult, ...]", tuple(finals))
        result = DeliveryResult(
            recipients=results, message_id=message.message_id, host=self.config.peer
        )
        if unsent_positions(result):
            self.left_unsent += 1
        return result

    def _mail_max_reached(self) -> bool:
        """Whether the session has begun as many transactions as the server's LIMITS
        MAILMAX (RFC 9422) allows."""
        ext = self._extensions
        most = ext.mail_max if ext is not None else None
        return most is not None and self.transactions >= most

    @staticmethod
    def _record_part(
        finals: list[RecipientResult | None],
        positions: Iterable[int],
        results: Sequence[RecipientResult],
        queue: deque[list[int]],
    ) -> None:
        """Record one transaction's results; its recipients refused as too many go to the
        front of ``queue`` when the transaction answered any of the others (else they
        keep their TRANSIENT result: a server that takes none would refuse them forever)."""
        again: list[int] = []
        for index, result in zip(positions, results, strict=True):
            finals[index] = result
            # Only a RCPT refused as too many (not a 452 to MAIL, DATA, or an LMTP
            # recipient's final reply, which may say "mailbox full").
            if result.reason == TOO_MANY_REASON:
                again.append(index)
        if again and len(again) < len(results):
            queue.appendleft(again)

    def _prepared(self, message: Message, envelope: Envelope) -> _Transaction:
        """The message's bookkeeping; already final when it cannot be sent here at all (or
        has no recipient)."""
        last = self._last_message
        # self.extensions, without the property call (this runs for every message).
        ext = self._extensions
        if ext is None:
            ext = _NO_EXTENSIONS
        if last is not None and last[0] is message and last[1] is envelope and last[2] is ext:
            # The same pair again (one message, one list, many sends): nothing to re-derive.
            message_id, refusal, addresses = last[3], last[4], last[5]
        else:
            message_id = message.message_id
            refusal = self._precheck(message, envelope, ext)
            addresses = tuple(r.address for r in envelope.recipients)
            self._last_message = (message, envelope, ext, message_id, refusal, addresses)
        transaction = _Transaction(addresses, self.config.peer, message_id)
        if refusal is not None:
            if refusal is _APART:
                self._apart_seen = True
            reason, status = refusal
            if log.isEnabledFor(logging.DEBUG):
                log.debug("refusing the message before sending: %s", reason)
            transaction.unfinished(None, reason)
            for index, result in enumerate(transaction.final):
                assert result is not None
                transaction.final[index] = attrs.evolve(
                    result, outcome=Outcome.PERMANENT, enhanced=status
                )
        return transaction

    def _precheck(self, message: Message, envelope: Envelope, ext: Extensions) -> _Refusal | None:
        """Why the message cannot be sent to this server at all (which offered ``ext``),
        with the RFC 3463 status that says so, or None."""
        if ext.size and message.size > ext.size:
            # RFC 1870 §6: the message is bigger than the server's fixed limit.
            # RFC 3463 §3.4: X.3.4 "message too big for system".
            return (
                f"the message is {message.size} bytes; the server accepts at most {ext.size} "
                "(SIZE, RFC 1870)",
                _TOO_BIG,
            )
        if self._needs_smtputf8(message, envelope) and not ext.smtputf8:
            if self._smtputf8_apart(message, envelope) is not None:
                # Only some recipients need it: the caller sends to the others (_without).
                return _APART
            # X.6.7 when an address needs it; X.6.0 (other media error) for the header.
            address = envelope.needs_smtputf8
            return (
                "the message or an envelope address needs SMTPUTF8 (RFC 6531), "
                "which the server does not offer",
                _NON_ASCII_ADDRESS if address else _MEDIA,
            )
        if message.needs_8bitmime and not ext.eight_bit_mime:
            # RFC 3463 §3.7: X.6.3 "conversion required but not supported".
            return (
                "the message has 8-bit content and the server does not offer 8BITMIME (RFC 6152)",
                _NO_CONVERSION,
            )
        if envelope.requiretls:
            # RFC 8689 §4.1: only over TLS, and only to a server that offers REQUIRETLS;
            # §5: 5.7.30 "REQUIRETLS support required".
            if not self.encrypted:
                return (
                    "REQUIRETLS was requested but the connection is not encrypted (RFC 8689)",
                    _REQUIRETLS,
                )
            if not ext.requiretls:
                return (
                    "REQUIRETLS was requested but the server does not offer it (RFC 8689)",
                    _REQUIRETLS,
                )
        return None

    def _unlocked_by_auth(self, message: Message, envelope: Envelope) -> bool:
        """Whether the message would lose something for want of an extension the server
        has not offered (so far): its DSN requests dropped, or itself refused for SMTPUTF8,
        8BITMIME or REQUIRETLS. After AUTH, that is worth an EHLO again
        (:meth:`_hello_after_auth`)."""
        ext = self.extensions
        return (
            (not ext.dsn and _asks_for_dsn(envelope))
            or (not ext.smtputf8 and self._needs_smtputf8(message, envelope))
            or (not ext.eight_bit_mime and message.needs_8bitmime)
            or (envelope.requiretls and not ext.requiretls)
        )

    @staticmethod
    def _needs_smtputf8(message: Message, envelope: Envelope) -> bool:
        return message.needs_smtputf8 or envelope.needs_smtputf8

    def _commands(self, message: Message, envelope: Envelope) -> tuple[MailFrom, list[RcptTo]]:
        """MAIL (with its parameters for this server) and one RCPT per recipient.

        The commands for the last envelope are kept: the same envelope again (a batch to
        one list of recipients) reuses them, and so their encoded lines
        (:class:`~mailrelay.protocol.MailFrom` encodes itself once).
        """
        ext = self._extensions  # self.extensions, without the property call (per message)
        if ext is None:
            ext = _NO_EXTENSIONS
        smtputf8 = ext.smtputf8 and self._needs_smtputf8(message, envelope)
        body = "8BITMIME" if message.needs_8bitmime else None
        key = (message.size, body, smtputf8)
        cached = self._last_commands
        if cached is not None and cached[0] is envelope and cached[1] is ext and cached[2] == key:
            return cached[3], cached[4]
        if not ext.dsn and not self._dsn_dropped_said and _asks_for_dsn(envelope):
            # RFC 3461 §4: no DSN parameters to a server that does not offer DSN. The
            # request is dropped, not the message; said once a session. (After AUTH the
            # server was asked again first: see _hello_after_auth.)
            self._dsn_dropped_said = True
            log.info(
                "%s does not offer DSN (RFC 3461): the envelopes' NOTIFY, RET, ENVID and "
                "ORCPT are not sent on this session",
                self.config.peer,
            )
        mail = MailFrom(
            sender=envelope.sender,
            parameters=envelope.mail_parameters(
                size=message.size if "SIZE" in ext else None,  # RFC 1870 §6
                body=body,
                smtputf8=smtputf8,
                dsn=ext.dsn,
                requiretls=envelope.requiretls and ext.requiretls,
            ),
            smtputf8=smtputf8,
        )
        dsn = ext.dsn
        rcpts = [
            RcptTo(
                recipient=r.address,
                parameters=r.rcpt_parameters(dsn=dsn, smtputf8=smtputf8),
                smtputf8=smtputf8,
            )
            for r in envelope.recipients
        ]
        self._last_commands = (envelope, ext, key, mail, rcpts)
        return mail, rcpts

    def _transaction(
        self, message: Message, envelope: Envelope, transaction: _Transaction
    ) -> Step[None]:
        ext = self.extensions
        bdat = self.config.chunking and ext.chunking
        mail, rcpts = self._commands(message, envelope)
        # The transaction is open until its end-of-data reply: RSET before the next one if
        # anything stops it earlier (RFC 5321 §4.1.1.5).
        self._needs_rset = True
        self.transactions += 1
        chunks = _with_last(message.chunks())  # consumed only for BDAT
        first: Bdat | None = None
        pipelined = self.config.pipelining and ext.pipelining
        if pipelined:
            # RFC 2920 §3.1: MAIL, every RCPT and DATA (or the first BDAT, RFC 3030 §4)
            # in one write; the replies come back in the same order.
            group: list[Command] = [mail, *rcpts]
            if bdat:
                data, last = next(chunks)
                first = Bdat(data=data, last=last)
                group.append(first)
            else:
                group.append(Data())
            yield from self._write(*group, phase="mail")
            yield from self._read_envelope_replies(transaction)
        else:
            yield from self._send_envelope(mail, rcpts, transaction)
        if bdat:
            yield from self._send_bdat(chunks, first, transaction)
        else:
            yield from self._send_data(message, transaction, data_sent=pipelined)

    def _read_envelope_replies(self, transaction: _Transaction) -> Step[None]:
        """Read the replies to a pipelined group's MAIL and RCPTs."""
        mail_reply = yield from self._reply("mail")
        if not mail_reply.is_positive:
            # RFC 2920 §3.1: the RCPTs' 503s only echo the refused MAIL; the MAIL reply is
            # what each recipient needs to know.
            transaction.settle_all(mail_reply)
        for index in range(len(transaction.addresses)):
            reply = yield from self._reply("rcpt")
            transaction.rcpt_replies[index] = reply
            if mail_reply.is_positive and not reply.is_positive:
                transaction.refused(index, reply)
                if transaction.too_many:
                    self._too_many_seen = True

    def _send_envelope(
        self, mail: MailFrom, rcpts: list[RcptTo], transaction: _Transaction
    ) -> Step[None]:
        """MAIL and each RCPT, one at a time (no PIPELINING)."""
        yield from self._write(mail, phase="mail")
        mail_reply = yield from self._sole_reply("mail", "MAIL")
        if not mail_reply.is_positive:
            transaction.settle_all(mail_reply)
            return
        for index, rcpt in enumerate(rcpts):
            yield from self._write(rcpt, phase="rcpt")
            reply = yield from self._sole_reply("rcpt", "RCPT")
            transaction.rcpt_replies[index] = reply
            if not reply.is_positive:
                transaction.refused(index, reply)
                if transaction.too_many:
                    self._too_many_seen = True

    def _send_data(
        self, message: Message, transaction: _Transaction, *, data_sent: bool
    ) -> Step[None]:
        """DATA (unless pipelined already), the message after 354, and the final reply(s)."""
        if not data_sent:
            if transaction.all_final():
                return  # MAIL or every RCPT refused: no DATA
            yield from self._write(Data(), phase="data_init")
        if (yield from self._data_body(message, transaction)):
            yield from self._finals(transaction)

    def _data_body(
        self, message: Message, transaction: _Transaction, data_reply: Reply | None = None
    ) -> Step[bool]:
        """DATA's reply (read here unless given), then the message and its terminator after
        a 354.

        Returns:
            whether the final reply(s) are still to be read (the message was sent).
        """
        if data_reply is None:
            data_reply = yield from self._reply("data_init")
        if transaction.all_final():
            # RFC 2920 §3.1: DATA was pipelined and got 354 although nobody was accepted:
            # end the empty message with a lone "."; every recipient keeps its own reply.
            if data_reply.code == 354:
                if self._conn.has_unread:
                    # Out of step, as below: the "." would be answered by what came with
                    # the 354. Every recipient keeps its own reply; the session ends.
                    yield from self._closed()
                    raise ServerProtocolError(
                        "the server sent more after its 354 to DATA, before the empty "
                        "message; its replies no longer match the commands",
                        reply=data_reply,
                        host=self.config.peer,
                    )
                yield from self._write(EndOfData(), phase="data_block")
                yield from self._empty_finals()
                self._needs_rset = False
            return False
        if data_reply.code != 354:
            if data_reply.is_positive:
                # Not a go-ahead, whatever its code says: the message was not sent. And no
                # answer DATA may get (RFC 5321 §4.3.2: 354, or a refusal): replies and
                # commands no longer match (a server that answered something twice, say),
                # so every later reply would answer the wrong command. End the session;
                # messages without an answer can go again on a fresh connection.
                transaction.unfinished(data_reply, "the server answered DATA without 354")
                yield from self._closed()
                raise ServerProtocolError(
                    f"the server answered DATA with {data_reply} (RFC 5321 §4.3.2: 354 or "
                    "a refusal); its replies no longer match the commands",
                    reply=data_reply,
                    host=self.config.peer,
                )
            else:
                transaction.settle_all(data_reply)
            return False
        if self._conn.has_unread:
            # After 354 the server waits for the data (RFC 5321 §4.1.1.4): nothing it sends
            # now answers anything, and it would be read as the message's final reply, a
            # delivery the server never confirmed. The session is out of step: end it.
            transaction.unfinished(None, "the server sent more after its 354")
            yield from self._closed()
            raise ServerProtocolError(
                "the server sent more after its 354 to DATA, before the message; its "
                "replies no longer match the commands",
                reply=data_reply,
                host=self.config.peer,
            )
        try:
            if message.size <= _requests._JOIN_LIMIT:
                # A small message goes out as one request with its terminator.
                yield Write(data=self._data_wire(message), phase="data_block")
                return True
            # Streamed: one request per chunk, so a huge message is never held whole.
            conn = self._conn
            for chunk in message.chunks():
                yield Write(data=conn.send(DataChunk(data=chunk)), phase="data_block")
            early = yield _PEEK
            if early is not None and (yield from self._answered_early(early, transaction)):
                return False
            yield Write(data=conn.send(EndOfData()), phase="data_block")
        except DeliveryError as exc:
            yield from self._cut_short(exc, transaction)
            raise
        if log.isEnabledFor(logging.DEBUG):
            log.debug(">>> <%d bytes of message data and the terminator>", message.size)
        self._needs_rset = False
        return True

    def _data_wire(self, message: Message) -> bytes:
        """A small message's data and terminator, as one piece of wire bytes (after 354)."""
        return self._conn.send_group(self._data_commands(message))

    def _data_commands(
        self, message: Message, debug: bool | None = None
    ) -> tuple[DataChunk, EndOfData]:
        """A small message's data, in wire form, and its terminator: the commands that send
        it after 354 (``send_group`` turns them into exactly the bytes ``send()`` would give
        for its chunks and ``EndOfData()``). ``debug``: whether to trace them, when the
        caller has asked the logger already.

        The same message again (one message, many envelopes) reuses its wire form: it is
        not dot-stuffed a second time.
        """
        last = self._last_data
        if debug if debug is not None else log.isEnabledFor(logging.DEBUG):
            log.debug(">>> <%d bytes of message data and the terminator>", message.size)
        self._needs_rset = False
        if last is not None and last[0] is message:
            return last[1]
        # The connection's stuffer is a fresh one after 354, so a fresh one here gives the
        # same bytes (RFC 5321 §4.5.2). Message.chunks() yields CRLF-normalized pieces, none
        # ending inside a CRLF (as BDAT relies on too), so the stuffer need not check them.
        stuffer = DotStuffer()
        pieces = [stuffer.chunk(chunk, normalized=True) for chunk in message.chunks()]
        # Kept without the final ".CRLF" (but with any line end the terminator added), so
        # that it ends a line and EndOfData() gives the same terminator again. (Cut from
        # the terminator, not from the joined bytes: one copy of the message, not two.)
        pieces.append(stuffer.end()[:-3])
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        commands = (DataChunk(data=data, stuffed=True), _END_OF_DATA)
        self._last_data = (message, commands)
        return commands

    def _send_bdat(
        self,
        chunks: Iterator[tuple[bytes, bool]],
        first: Bdat | None,
        transaction: _Transaction,
    ) -> Step[None]:
        """The message in BDAT chunks (RFC 3030 §2), each chunk's reply read before the next.

        ``first`` is the chunk already sent in the pipelined group, if any.
        """
        if first is not None:
            if first.last:
                if transaction.all_final():
                    # One reply, a refusal: nobody to deliver to. RFC 3030 §2: the
                    # transaction failed, which need not end it (Dovecot keeps the MAIL and
                    # answers the next one "503 5.5.0 MAIL already given"): RSET first.
                    yield from self._reply("data_end")
                else:
                    self._needs_rset = False
                    yield from self._finals(transaction)
                return
            reply = yield from self._chunk_reply(transaction)
            if transaction.all_final():
                return
            if not reply.is_positive:
                transaction.settle_all(reply)
                return
        elif transaction.all_final():
            return
        for data, last in chunks:
            try:
                yield from self._write(Bdat(data=data, last=last), phase="data_block")
            except DeliveryError as exc:
                yield from self._cut_short(exc, transaction)
                raise
            if last:
                self._needs_rset = False
                yield from self._finals(transaction)
                return
            reply = yield from self._chunk_reply(transaction)
            if not reply.is_positive:
                # RFC 3030 §2: after a refused chunk, send no more (the RSET comes next time).
                transaction.settle_all(reply)
                return

    def _answered_early(self, data: bytes, transaction: _Transaction) -> Step[bool]:
        """Before the terminator of a message whose data went out before it: ``data``, what
        the server sent meanwhile (a :class:`~mailrelay.flow.requests.Peek`'s answer).

        Nothing is owed before the end of the data (RFC 5321 §4.1.1.4: the reply follows
        the terminator), so a complete reply now came early: a size limit or a content
        filter refusing the message part-way. A refusal settles the recipients still open
        (4xx TRANSIENT, 5xx PERMANENT; LMTP: that one reply for every recipient, RFC 2033
        §4.2's per-recipient replies follow an end of data the server never saw). A
        positive reply cannot be a delivery: they stay open (TRANSIENT). Either way the
        terminator is not sent and the session ends: the server may or may not answer the
        end of the data as well, and a reply beyond the one read would answer the next
        command on this connection (the server, seeing the connection end mid-data, keeps
        nothing).

        Returns:
            whether it did that (the caller stops); ``False`` when no complete reply came
            (its start, or an end of file, is kept for the reads after the terminator).
        """
        conn = self._conn
        conn.receive_data(data)
        if not conn.replies_ready:
            return False
        conn.abandon_data()
        event = yield from self._event("data_end")  # complete already: no read
        reply = yield from self._check_closing(event)
        log.debug("the server answered before the end of the data: %s", Shown(reply))
        if reply.is_positive:
            transaction.unfinished(reply, "the server answered before the end of the data")
        else:
            transaction.settle_all(reply)
        yield from self._closed()
        self._closing_error = ConnectionLost(
            "the server answered before the end of the data; the session was ended "
            "(a second answer would be misread)",
            host=self.config.peer,
        )
        return True

    def _cut_short(
        self, exc: DeliveryError, transaction: _Transaction, *, terminator_sent: bool = False
    ) -> Step[None]:
        """After ``exc``, an I/O error the driver threw in while the message data went out
        (or while its reply was awaited): the answers the server gave before it.

        A server may refuse a message part-way through its data (``552`` for its size,
        ``554`` from a content filter) and close the connection (RFC 5321 §3.8,
        §4.2.5); the client's next write then fails before the reply is read. The driver
        keeps what had arrived (:meth:`_leftovers`). A complete reply there answers the
        data as its end's reply would (``ClientConnection.abandon_data``): it settles the
        recipients still open (5xx PERMANENT, 4xx TRANSIENT, with the server's text), and a
        refused BDAT chunk does the same (RFC 3030 §2). A positive reply counts only when
        the terminator may have reached the server (``terminator_sent``: it went out
        before, or early in, the write that failed); when it was the failed write's last
        bytes (or never written) the server cannot have taken the message. The caller
        raises ``exc`` after all: the session is over, and the answers given stand (see
        ``_attempt``). Without a complete reply nothing changes, and ``exc`` is what the
        caller reports. An error the dialogue raised itself (it closed the session first)
        is left alone.
        """
        if self.closed:
            return
        conn = self._conn
        received = yield from self._leftovers()
        try:
            if received:
                conn.receive_data(received)
        except ProtocolError:
            return  # after an end of file (a Peek saw it): nothing more can be trusted
        if not conn.replies_ready:
            return
        log.debug("the server replied before the end of the data; reading it after %s", Shown(exc))
        conn.abandon_data()
        conn.receive_data(b"")  # the driver has closed the connection
        # The end of file (or an unreadable rest) after the replies that came ends it.
        with contextlib.suppress(_SessionClosed, ServerProtocolError):
            yield from self._answers_after_cut(transaction, terminator_sent)
        yield from self._closed()

    def _answers_after_cut(self, transaction: _Transaction, terminator_sent: bool) -> Step[None]:
        """The replies to the data (or to the BDAT chunk) cut short, from the bytes the
        driver kept: see :meth:`_cut_short`."""
        pending = self._conn.pending
        if not pending:
            return
        head = pending[0]
        if isinstance(head, Bdat) and not head.last:
            reply = yield from self._reply("data_block")
            if not reply.is_positive:
                transaction.settle_all(reply)  # RFC 3030 §2: the message is refused
            return
        if not isinstance(head, EndOfData | Bdat):
            return  # the data was not reached (the envelope's replies are another matter)
        # Unless the terminator may have gone out, the server never saw the end of the
        # data, so a positive reply cannot mean it took the message (RFC 5321 §4.1.1.4:
        # the reply comes after the end of the data): only refusals count then, and a
        # recipient "accepted" that way stays open (TRANSIENT).
        if not self.config.lmtp:
            reply = yield from self._reply("data_end")
            if terminator_sent or not reply.is_positive:
                transaction.settle_all(reply)
            return
        # LMTP owes one reply per accepted recipient after the end of the data (RFC 2033
        # §4.2). A server that stopped reading the data cannot have delivered it to
        # anyone: one refusal before it hung up is its word on the whole message.
        accepted = transaction.accepted()
        replies: list[tuple[int, Reply]] = []
        try:
            for index in accepted:
                event = yield from self._event("data_end")
                replies.append((index, (yield from self._check_closing(event))))
        finally:
            lone = len(replies) == 1 and len(accepted) > 1 and not replies[0][1].is_positive
            if lone and not terminator_sent:
                transaction.settle_all(replies[0][1])
            else:
                for index, reply in replies:
                    if terminator_sent or not reply.is_positive:
                        transaction.settle(index, reply)

    def _chunk_reply(self, transaction: _Transaction) -> Step[Reply]:
        """The reply to a BDAT chunk that is not the last, alone in flight (RFC 3030 §2).

        A reply beyond it, already received with it, would be taken for the next chunk's,
        and the last chunk's for the message's final reply: a delivery the server never
        confirmed. The session is out of step: it ends, and the recipients still open are
        TRANSIENT (the last chunk was not sent, so the server cannot have taken the message).
        """
        reply = yield from self._reply("data_block")
        unasked = yield from self._close_if_unsolicited("after a BDAT chunk")
        if unasked is not None:
            if isinstance(unasked, ServerProtocolError):
                transaction.unfinished(None, "the server sent more after its reply to a chunk")
            raise unasked
        return reply

    def _empty_finals(self) -> Step[None]:
        """The reply(s) after the data of a transaction nobody is delivered in (every
        recipient already has its answer): one for SMTP. LMTP owes one per RCPT the server
        answered 2xx (RFC 2033 §4.2), which a broken server may do even after refusing
        MAIL, or one when it accepted none; the connection expects exactly that many, and
        reading fewer would leave the rest to answer the next command."""
        owed = len(self._conn.accepted_recipients) if self.config.lmtp else 0
        for _ in range(max(1, owed)):
            yield from self._reply("data_end")

    def _finals(self, transaction: _Transaction) -> Step[None]:
        """The reply after the message data: one for SMTP; for LMTP one per accepted
        recipient, in RCPT order (RFC 2033 §4.2)."""
        if not self.config.lmtp:
            reply = yield from self._reply("data_end")
            transaction.settle_all(reply)
            return
        for index in transaction.accepted():
            event = yield from self._event("data_end")
            reply = yield from self._check_closing(event)
            transaction.settle(index, reply)

    # -- probing -------------------------------------------------------------------------------

    def probe(self, sender: Address | None, recipients: Sequence[Address]) -> Step[ProbeResult]:
        """Ask whether the server would take mail for ``recipients``, sending none: MAIL,
        one RCPT per recipient, then RSET (RFC 5321 §4.1.1.5); never DATA.

        Commands go one at a time (no pipelining): a probe is short, and a server that
        drops the connection after too many refused RCPTs then leaves clear, partial
        answers. A 421 or end of file ends the probe early instead of raising. To a server
        without SMTPUTF8, an address that needs it (RFC 6531) is never sent: its reply stays
        ``None`` (for the sender: no MAIL at all, and every reply ``None``).

        Raises:
            ConnectionLost: the session was already closed.
            ServerProtocolError: the server broke the protocol before the RSET.
        """
        return (yield from self._guarded(self._probe(sender, tuple(recipients))))

    def _probe(self, sender: Address | None, recipients: tuple[Address, ...]) -> Step[ProbeResult]:
        self._ensure_ready()
        utf8 = self.extensions.smtputf8 and (
            (sender is not None and sender.needs_smtputf8)
            or any(a.needs_smtputf8 for a in recipients)
        )
        params: tuple[tuple[str, str | None], ...] = (("SMTPUTF8", None),) if utf8 else ()
        mail: Reply | None = None
        replies: list[Reply | None] = [None] * len(recipients)
        if not utf8 and sender is not None and sender.needs_smtputf8:
            # RFC 6531 §3.2: no MAIL from an address the server cannot take.
            return ProbeResult(mail=None, recipients=tuple(replies), ended=False)
        try:
            if self._needs_rset:
                yield from self._rset()
            self._needs_rset = True
            yield from self._write(
                MailFrom(sender=sender, parameters=params, smtputf8=utf8), phase="mail"
            )
            self.transactions += 1
            mail = yield from self._reply("mail")
            yield from self._nothing_more("MAIL")
            if mail.is_positive:
                for index, address in enumerate(recipients):
                    if address.needs_smtputf8 and not utf8:
                        continue  # RFC 6531 §3.2: not to a server without SMTPUTF8; None
                    yield from self._write(RcptTo(recipient=address, smtputf8=utf8), phase="rcpt")
                    replies[index] = yield from self._sole_reply("rcpt", "RCPT")
            try:
                yield from self._rset()  # RFC 5321 §4.1.1.5: abandon it; no mail is sent
            except ServerProtocolError as exc:
                log.debug("RSET after a probe failed: %s", Shown(exc))  # the answers are in already
        except _SessionClosed:
            pass  # partial answers; the session is closed
        except ServerProtocolError as exc:
            if not self.closed:
                raise
            # A reply beyond the one owed (_sole_reply): the answers read before it stand,
            # the rest are unknown; the session is closed.
            log.debug("probe ended: %s", Shown(exc))
        return ProbeResult(mail=mail, recipients=tuple(replies), ended=self.closed)
