"""The per-message bookkeeping: which reply each recipient has, and the results built from it.

Rules: no I/O and no wire knowledge; results are built with the fast slot builders, which
check at import that the result classes' fields are the ones they fill.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from mailrelay._slots import new_instance, slot_setters
from mailrelay.address import Address
from mailrelay.reply import Reply
from mailrelay.results import DeliveryResult, Outcome, RecipientResult

# -- the per-message bookkeeping ---------------------------------------------------------------


# Results are built on the hot path of every message; their classes have no validators
# and no converters that could change known-good values (a tuple stays a tuple), so the
# slots are filled directly, as attrs' __init__ would (a test checks the two agree).
_set_address, _set_outcome, _set_reply, _set_reason, _set_host, _set_enhanced = slot_setters(
    RecipientResult, ("address", "outcome", "reply", "reason", "host", "enhanced")
)
_set_recipients, _set_message_id, _set_result_host, _set_error = slot_setters(
    DeliveryResult, ("recipients", "message_id", "host", "error")
)
# Outcome.from_reply by the code's first digit; Outcome.TRANSIENT for anything else. (The
# default is a global: in CPython 3.11 reading ``Outcome.X`` costs about 100 ns, since
# EnumType defines __getattr__, and this runs for every recipient.)
_OUTCOME_BY_CLASS = {2: Outcome.ACCEPTED, 5: Outcome.PERMANENT}
_TRANSIENT = Outcome.TRANSIENT


#: The reason of a recipient whose RCPT was refused as one too many (:func:`too_many_recipients`):
#: it is sent again in another transaction. A 452 that answers anything else (MAIL, DATA, an
#: LMTP recipient's final reply: "mailbox full") has no such reason, and is not sent again.
TOO_MANY_REASON = "refused as one recipient too many for the transaction (RFC 5321 §4.5.3.1.10)"


#: The reason of a recipient left without a transaction because the server's ``LIMITS
#: MAILMAX`` (RFC 9422) allowed the session no more of them.
MAIL_MAX_REASON = (
    "the server's LIMITS MAILMAX (RFC 9422) allows no more transactions on this connection"
)
#: The reason of a recipient left without a transaction because the session had ended.
SESSION_ENDED_REASON = "the session ended before this recipient's transaction"
#: Reasons of TRANSIENT recipients the server never took a message for (their RCPT was
#: never sent, or refused as one too many): sending the message to them on another
#: connection cannot deliver it twice (:func:`unsent_positions`).
UNSENT_REASONS = frozenset({MAIL_MAX_REASON, SESSION_ENDED_REASON, TOO_MANY_REASON})


def unsent_positions(result: DeliveryResult) -> list[int]:
    """The envelope positions of ``result``'s recipients that the server never took the
    message for, though it answered others: what a transport sends on another connection
    when a message split over several transactions (RFC 5321 §4.5.3.1.10, RFC 9422) ran
    out of them. Empty when every recipient has an answer of its own, or none has (then
    the message as a whole failed, and the caller's retry rules apply)."""
    positions = [
        index
        for index, recipient in enumerate(result.recipients)
        if recipient.reason in UNSENT_REASONS and recipient.outcome is _TRANSIENT
    ]
    return positions if len(positions) < len(result.recipients) else []


def too_many_recipients(reply: Reply) -> bool:
    """Whether a refused RCPT's ``reply`` says the transaction has all the recipients the
    server will take (RFC 5321 §4.5.3.1.10), so that the rest can go in another one.

    The code for it is 452; RFC 821 wrongly listed 552, which some servers still send, and
    a client should take that as temporary too. 452 and 552 also mean other things
    (insufficient storage, a full mailbox), so an enhanced status code, when there is one,
    must be X.5.3 "too many recipients" (RFC 3463 §3.6); without one, a 452 counts, and a
    552 only when its text says so.
    """
    code = reply.code
    if code not in {452, 552}:
        return False
    enhanced = reply.enhanced
    if enhanced is not None:
        return enhanced.subject == 5 and enhanced.detail == 3
    return code == 452 or "too many recipients" in reply.text.lower()


def _recipient_result(
    address: Address, outcome: Outcome, reply: Reply | None, reason: str | None, host: str | None
) -> RecipientResult:
    """``RecipientResult(address=..., ...)`` for values known to be of the right types."""
    result: RecipientResult = new_instance(RecipientResult)
    _set_address(result, address)
    _set_outcome(result, outcome)
    _set_reply(result, reply)
    _set_reason(result, reason)
    _set_host(result, host)
    _set_enhanced(result, None)
    return result


def _delivery_result(
    recipients: tuple[RecipientResult, ...], message_id: str | None, host: str | None
) -> DeliveryResult:
    """``DeliveryResult(recipients=..., ...)`` for a tuple of results (no conversion needed)."""
    result: DeliveryResult = new_instance(DeliveryResult)
    _set_recipients(result, recipients)
    _set_message_id(result, message_id)
    _set_result_host(result, host)
    _set_error(result, None)
    return result


class _Transaction:
    """Which reply each recipient of one message has, and which are final."""

    __slots__ = ("addresses", "final", "message_id", "open", "peer", "rcpt_replies", "too_many")

    def __init__(
        self, recipients: Sequence[Address], peer: str | None, message_id: str | None = None
    ) -> None:
        self.addresses = tuple(recipients)
        self.peer = peer
        self.message_id = message_id
        self.rcpt_replies: list[Reply | None] = [None] * len(self.addresses)
        self.final: list[RecipientResult | None] = [None] * len(self.addresses)
        # How many recipients have no final result yet, kept as ``final`` is filled: every
        # message asks, and ``None in final`` would call each result's (attrs) __eq__.
        self.open = len(self.addresses)
        # Whether a RCPT was refused as one too many (see refused()).
        self.too_many = False

    def refused(self, index: int, reply: Reply) -> None:
        """Recipient ``index``'s RCPT was refused with ``reply`` (after an accepted MAIL):
        its final result, TRANSIENT when the server has reached its recipient limit
        (:func:`too_many_recipients`; RFC 5321 §4.5.3.1.10 asks that a 552 for it be taken
        as temporary), and the transaction notes it so the recipient can be sent in
        another one."""
        if too_many_recipients(reply):
            self.too_many = True
            final = self.final
            if final[index] is None:
                self.open -= 1
            final[index] = _recipient_result(
                self.addresses[index], _TRANSIENT, reply, TOO_MANY_REASON, self.peer
            )
            return
        self.settle(index, reply)

    def settle(self, index: int, reply: Reply, reason: str | None = None) -> None:
        final = self.final
        if final[index] is None:
            self.open -= 1
        final[index] = _recipient_result(
            self.addresses[index],
            _OUTCOME_BY_CLASS.get(reply.code // 100, _TRANSIENT),
            reply,
            reason,
            self.peer,
        )

    def settle_all(self, reply: Reply, reason: str | None = None) -> None:
        """Every recipient still without a final result gets ``reply`` as its own."""
        if not self.open:
            return
        # settle() for each, with what they share looked up once (every message ends here).
        final = self.final
        addresses = self.addresses
        outcome = _OUTCOME_BY_CLASS.get(reply.code // 100, _TRANSIENT)
        peer = self.peer
        for index, result in enumerate(final):
            if result is None:
                final[index] = _recipient_result(addresses[index], outcome, reply, reason, peer)
        self.open = 0

    def finish(self, reply: Reply) -> DeliveryResult:
        """The result, once every recipient still open has taken ``reply`` (the message's
        final reply) as its own: :meth:`settle_all` then :meth:`result`, in one call, as
        every message ends."""
        final = self.final
        if self.open:
            addresses = self.addresses
            outcome = _OUTCOME_BY_CLASS.get(reply.code // 100, _TRANSIENT)
            peer = self.peer
            for index, result in enumerate(final):
                if result is None:
                    final[index] = _recipient_result(addresses[index], outcome, reply, None, peer)
            self.open = 0
        # Every slot is set now (typing.cast would be a function call on every message).
        results: tuple[RecipientResult, ...] = tuple(final)  # type: ignore[arg-type]
        return _delivery_result(results, self.message_id, self.peer)

    def accepted(self) -> list[int]:
        """Indices of recipients whose RCPT was accepted and that have no final result yet."""
        return [
            i
            for i, reply in enumerate(self.rcpt_replies)
            if reply is not None and reply.is_positive and self.final[i] is None
        ]

    def all_final(self) -> bool:
        return not self.open

    def any_final(self) -> bool:
        return self.open < len(self.final)

    def unfinished(self, reply: Reply | None, reason: str) -> None:
        """Every recipient still without a final answer becomes TRANSIENT."""
        for index, result in enumerate(self.final):
            if result is None:
                self.final[index] = RecipientResult(
                    address=self.addresses[index],
                    outcome=Outcome.TRANSIENT,
                    reply=reply,
                    reason=reason,
                    host=self.peer,
                )
        self.open = 0

    def result(self) -> DeliveryResult:
        assert not self.open, "every recipient must be settled"
        results = cast("tuple[RecipientResult, ...]", tuple(self.final))
        return _delivery_result(results, self.message_id, self.peer)


class _SessionClosed(Exception):
    """Internal: the server ended the session (421 or EOF) in the middle of a step."""

    def __init__(self, reply: Reply | None) -> None:
        super().__init__("session closed")
        self.reply = reply
