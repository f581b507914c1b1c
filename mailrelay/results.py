"""What a delivery attempt produced: one result per envelope recipient.

A transport returns a :class:`DeliveryResult` whenever the server answered for
the recipients, even if it refused some or all of them. Refusals are results,
never exceptions; see :mod:`mailrelay.errors` for the failures that produce no
per-recipient answer.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import TYPE_CHECKING

import attrs

from mailrelay.address import Address
from mailrelay.reply import EnhancedStatus, Reply

if TYPE_CHECKING:
    from mailrelay.errors import DeliveryError, MailRelayError

__all__ = ["DeliveryResult", "Outcome", "RecipientResult", "error_status"]


class Outcome(enum.Enum):
    """What happened to one recipient."""

    #: The server took responsibility for delivering to this recipient.
    ACCEPTED = "accepted"
    #: Refused for now (a 4xx reply, or no final answer): try again later.
    TRANSIENT = "transient"
    #: Refused for good (a 5xx reply, or refused before sending): do not retry.
    PERMANENT = "permanent"

    @classmethod
    def from_reply(cls, reply: Reply) -> Outcome:
        """Map a final reply to an outcome: 2xx accepted, 5xx permanent, anything else transient."""
        if reply.is_positive:
            return cls.ACCEPTED
        if reply.is_permanent:
            return cls.PERMANENT
        return cls.TRANSIENT


# The members as globals for the checks every result gets: in CPython 3.11 reading
# ``Outcome.X`` costs about 100 ns (EnumType defines __getattr__), a global a few.
_ACCEPTED = Outcome.ACCEPTED
_TRANSIENT = Outcome.TRANSIENT
_PERMANENT = Outcome.PERMANENT


@attrs.frozen(kw_only=True)
class RecipientResult:
    """The outcome for one envelope recipient.

    Attributes:
        address: the recipient.
        outcome: accepted, transient or permanent.
        reply: the server reply that decided the outcome, if the server gave one.
        reason: a human-readable explanation when no reply tells the story
            (for example "server lacks SMTPUTF8", "connection lost before DATA").
        host: the server that answered (``host:port``), when known.
        enhanced: for a decision made without a server reply, the RFC 3463 status that
            says it, for the DSNs reporting it: a refusal before sending (``5.3.4`` too big
            for the server's SIZE, ``5.6.7`` an address that needs SMTPUTF8, ``5.6.3`` 8-bit
            data without 8BITMIME, ``5.7.30`` REQUIRETLS not possible), MX delivery's
            verdicts from the DNS (``5.1.10`` a null MX, ``5.1.2`` no such mail domain,
            ``4.4.3`` the DNS failed, ``5.4.4`` no usable exchanger address), and failures
            without a reply (see :func:`error_status`: ``4.4.1`` a connection not answered,
            ``4.4.2`` a timeout or a dropped connection, ``X.7.5`` TLS not established);
            ``None`` otherwise (a reply carries its own in ``reply.enhanced``).
    """

    address: Address
    outcome: Outcome
    reply: Reply | None = None
    reason: str | None = None
    host: str | None = None
    enhanced: EnhancedStatus | None = None

    @property
    def accepted(self) -> bool:
        """True when the outcome is :attr:`Outcome.ACCEPTED`."""
        return self.outcome is _ACCEPTED


def _to_tuple(value: Iterable[RecipientResult]) -> tuple[RecipientResult, ...]:
    return tuple(value)


@attrs.frozen(kw_only=True)
class DeliveryResult:
    """The outcome of sending one message: a result for each envelope recipient.

    Attributes:
        recipients: one :class:`RecipientResult` per envelope recipient, in envelope order.
        message_id: the message's Message-ID, when known.
        host: the server that took the transaction (``host:port``), when known.
        error: when the attempt ended in an exception that the transport turned into this
            result (``send_many`` reports a message's failure so instead of raising it, so
            that the other messages' results are not lost), that exception: a
            :class:`~mailrelay.errors.DeliveryError` (its type and ``is_transient`` tell a
            configuration or authentication problem from a refused recipient), or the
            :class:`~mailrelay.errors.MessageError` of a message that could not be
            DKIM-signed. ``None`` when the server answered. Not compared by ``==``.
    """

    recipients: tuple[RecipientResult, ...] = attrs.field(converter=_to_tuple)
    message_id: str | None = None
    host: str | None = None
    error: MailRelayError | None = attrs.field(default=None, eq=False)

    @property
    def accepted(self) -> tuple[RecipientResult, ...]:
        """The recipients the server accepted."""
        return tuple(r for r in self.recipients if r.outcome is _ACCEPTED)

    @property
    def deferred(self) -> tuple[RecipientResult, ...]:
        """The recipients refused for now (worth retrying)."""
        return tuple(r for r in self.recipients if r.outcome is _TRANSIENT)

    @property
    def rejected(self) -> tuple[RecipientResult, ...]:
        """The recipients refused for good."""
        return tuple(r for r in self.recipients if r.outcome is _PERMANENT)

    @property
    def ok(self) -> bool:
        """True when every recipient was accepted (and there was at least one)."""
        recipients = self.recipients
        # A loop rather than all(r.accepted ...): checked for every message sent in bulk,
        # and a generator plus a property call per recipient cost more than the test.
        for result in recipients:
            if result.outcome is not _ACCEPTED:
                return False
        return bool(recipients)


def error_status(error: DeliveryError, *, transient: bool | None = None) -> EnhancedStatus | None:
    """The RFC 3463 status that describes a failed attempt: the one its server reply
    carries, else the one for its kind of failure when it came without a reply (``X.4.1``
    a connection not answered, ``X.4.2`` a timeout or a dropped connection, ``X.4.4`` no
    route, ``X.7.5`` TLS not established); ``None`` when neither says anything.

    The class of a status for a failure without a reply is 4 when ``transient`` (by default
    the error's own ``is_transient``), else 5, so that it agrees with the outcome reported
    beside it. Used for the results and attempts made from errors (``send_many``'s failed
    messages, MX delivery's exchangers, the tracker's attempt history and DSNs).
    """
    reply = error.reply
    if reply is not None:
        return reply.enhanced
    found = error.status_detail
    if found is None:
        return None
    klass = 4 if (error.is_transient if transient is None else transient) else 5
    return EnhancedStatus(klass=klass, subject=found[0], detail=found[1])
