"""When to try again: the retry policy for recipients, and per-domain shaping.

Rules of this module:

* Nothing here reads a clock or a random source of its own: the tracker passes
  ``now`` and a ``random() -> float in [0, 1)`` function, so tests are exact and
  never sleep.
* :class:`RetryPolicy`: the *n*-th retry waits ``initial * factor**(n-1)``
  seconds, multiplied by a jitter factor drawn from ``[1 - jitter, 1 + jitter]``
  (so that many messages deferred together do not all come back together),
  and never more than ``max_delay``. A recipient still unresolved ``max_age``
  after submission *expires* (RFC 5321 §4.5.4.1: "the give-up time generally
  needs to be at least 4-5 days"; the default is 5 days). The last retry is
  scheduled at the deadline itself, so every recipient gets a try at its end.
* Errors about our own side defer, even when permanent: ``defer_errors`` (by default
  :class:`~mailrelay.errors.AuthenticationError` and :class:`~mailrelay.errors.TLSError`)
  say that this client cannot deliver now (refused credentials, a TLS policy or
  certificate that cannot be met), which its operator can fix, not that the message or
  its recipients are refused. Bouncing on them would turn one wrong password into a
  bounce for every queued message; like Postfix (``smtp_sasl_auth_soft_bounce``, on by
  default; a failed TLS policy is a deferral there too), they are retried until the
  maximum age. Every other permanent error and reply bounces.
* A hook ``(recipient, reply) -> delay | None`` may choose the delay for a
  particular answer (say, a longer one for ``4.2.2`` mailbox full); ``None``
  means "no opinion" and the exponential schedule applies. The maximum age
  still applies to what the hook chooses. A hook that raises, or returns something
  that is not a delay (not a number, NaN, negative), is logged and the schedule
  applies; an infinite or enormous delay is held to the deadline.
* :class:`DomainShaper` keeps per-domain limits for one tracker: at most
  ``max_concurrent`` deliveries in flight, at most ``per_second`` delivery
  transactions a second, and an adaptive back-off that doubles (up to a cap)
  each time a domain answers 421 or refuses a whole transaction for now, and
  resets on the next success. It is thread-safe; it does not coordinate
  between processes (each worker shapes its own traffic). A hold-off or a rate
  limit's next slot is never further from ``now`` than its length, so a clock
  stepped back does not stretch it by the step.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import threading
from collections.abc import Callable, Iterable

import attrs

from mailrelay.address import Address
from mailrelay.errors import AuthenticationError, ConfigurationError, DeliveryError, TLSError
from mailrelay.reply import Reply

__all__ = ["DomainLimits", "DomainShaper", "RetryHook", "RetryPolicy"]

log = logging.getLogger(__name__)

#: A policy hook: ``(recipient, reply) -> delay`` in seconds (or a timedelta), or ``None``.
RetryHook = Callable[[Address, Reply | None], "float | dt.timedelta | None"]


def _positive(_instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ConfigurationError(f"{attribute.name} must be positive: {value!r}")


def _seconds(value: float | dt.timedelta) -> float:
    return value.total_seconds() if isinstance(value, dt.timedelta) else float(value)


def _int_seconds(value: int) -> float:
    """An int delay as a float; one too large for a float is infinite (held to the deadline)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _error_classes(value: Iterable[type[DeliveryError]]) -> tuple[type[DeliveryError], ...]:
    classes = tuple(value)
    for kind in classes:
        if not (isinstance(kind, type) and issubclass(kind, DeliveryError)):
            raise TypeError(f"defer_errors takes DeliveryError subclasses, not {kind!r}")
    return classes


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """How long to wait before retrying a deferred recipient, and when to give up.

    Args:
        initial: the first retry's delay, in seconds (default 5 minutes).
        factor: how much each further delay grows (default 2).
        max_delay: the cap on any delay, in seconds (default 4 hours).
        jitter: the fraction by which a delay is spread either way (0 to 1; default 0.1).
        max_age: how long after submission a recipient may be retried, in seconds
            (default 5 days, RFC 5321 §4.5.4.1).
        hook: an optional ``(recipient, reply) -> delay | None`` policy hook.
        defer_errors: the :class:`~mailrelay.errors.DeliveryError` classes that defer
            the recipients of their attempt even when permanent (default:
            ``AuthenticationError`` and ``TLSError``, see the module rules); ``()``
            bounces on every permanent error.

    Raises:
        ValueError: a non-positive delay, factor below 1, or jitter outside 0..1.
        TypeError: ``defer_errors`` holds something other than ``DeliveryError`` classes.
    """

    initial: float = attrs.field(default=300.0, converter=_seconds, validator=_positive)
    factor: float = attrs.field(default=2.0, validator=attrs.validators.ge(1.0))
    max_delay: float = attrs.field(default=4 * 3600.0, converter=_seconds, validator=_positive)
    jitter: float = attrs.field(
        default=0.1, validator=[attrs.validators.ge(0.0), attrs.validators.le(1.0)]
    )
    max_age: float = attrs.field(default=5 * 86400.0, converter=_seconds, validator=_positive)
    hook: RetryHook | None = None
    defer_errors: tuple[type[DeliveryError], ...] = attrs.field(
        default=(AuthenticationError, TLSError), converter=_error_classes
    )

    def defers(self, error: DeliveryError) -> bool:
        """Whether ``error`` defers the recipients of its attempt (else it bounces them):
        it is transient, or one of ``defer_errors``."""
        return error.is_transient or isinstance(error, self.defer_errors)

    def defers_class(self, kind: type[DeliveryError]) -> bool:
        """Whether a permanent error of class ``kind`` defers (is one of ``defer_errors``)."""
        return issubclass(kind, self.defer_errors)

    def delay(self, retry: int, random: Callable[[], float]) -> float:
        """The delay before the ``retry``-th retry (1 for the first), in seconds."""
        if retry < 1:
            raise ValueError(f"retries count from 1: {retry}")
        # Cap the exponent's growth before it overflows a float.
        base = min(self.max_delay, self.initial * self.factor ** min(retry - 1, 64))
        spread = 1.0 + self.jitter * (2.0 * random() - 1.0)
        return min(self.max_delay, base * spread)

    def next_attempt(
        self,
        *,
        recipient: Address,
        reply: Reply | None,
        retry: int,
        created_at: dt.datetime,
        now: dt.datetime,
        random: Callable[[], float],
    ) -> dt.datetime | None:
        """When to try a deferred recipient again, or ``None`` to let it expire.

        Args:
            recipient: the deferred recipient.
            reply: the answer that deferred it (``None`` when an error gave none).
            retry: which retry this would be (1 after the first failed attempt).
            created_at: when the message was submitted.
            now: the current time.
            random: a source of floats in ``[0, 1)`` for the jitter.
        """
        deadline = created_at + dt.timedelta(seconds=self.max_age)
        if now >= deadline:
            # RFC 5321 §4.5.4.1: give up after the maximum age.
            return None
        seconds = self._hooked(recipient, reply)
        if seconds is None:
            seconds = self.delay(retry, random)
        left = (deadline - now).total_seconds()
        if seconds >= left:
            # Also what keeps an enormous (or infinite) delay from overflowing a timedelta.
            return deadline
        return now + dt.timedelta(seconds=seconds)

    def _hooked(self, recipient: Address, reply: Reply | None) -> float | None:
        """The hook's delay in seconds, or ``None`` for the schedule's.

        The hook is the application's code, called while a transaction's results are
        decided: if it raised, or returned something that is not a delay (not a number,
        NaN, negative), the whole transaction would be thrown away (its accepted
        recipients sent again at every run, nothing recorded, so it would never expire).
        Such an answer is logged and the schedule decides instead; ``+inf`` or an
        enormous delay means "as late as allowed": the deadline.
        """
        if self.hook is None:
            return None
        try:
            chosen = self.hook(recipient, reply)
            if chosen is None:
                return None
            if isinstance(chosen, dt.timedelta):
                seconds = chosen.total_seconds()
            elif isinstance(chosen, int | float) and not isinstance(chosen, bool):
                seconds = _int_seconds(chosen) if isinstance(chosen, int) else chosen
            else:
                raise TypeError(f"not a delay: {chosen!r}")
        except Exception:
            log.warning(
                "the retry hook failed for %s; the retry schedule decides", recipient, exc_info=True
            )
            return None
        if math.isnan(seconds) or seconds < 0:
            log.warning(
                "the retry hook returned %r for %s, not a delay; the retry schedule decides",
                chosen,
                recipient,
            )
            return None
        return seconds


@attrs.frozen(kw_only=True)
class DomainLimits:
    """Per-domain shaping for the tracker.

    Args:
        max_concurrent: deliveries to one domain in flight at once (``None``: no limit).
        per_second: delivery transactions per second to one domain (``None``: no limit).
        backoff_initial: seconds to hold a domain off after its first 421/4xx refusal.
        backoff_max: the cap on that hold-off as it doubles.
        busy_delay: how long to put work off when a domain is at ``max_concurrent``.
    """

    max_concurrent: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.ge(1))
    )
    per_second: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(_positive)
    )
    backoff_initial: float = attrs.field(default=60.0, converter=_seconds, validator=_positive)
    backoff_max: float = attrs.field(default=3600.0, converter=_seconds, validator=_positive)
    busy_delay: float = attrs.field(default=1.0, converter=_seconds, validator=_positive)


@attrs.define
class _DomainState:
    in_flight: int = 0
    next_slot: dt.datetime | None = None
    backoff: float = 0.0
    blocked_until: dt.datetime | None = None


class DomainShaper:
    """Per-domain concurrency, rate and adaptive back-off (see the module docstring).

    Args:
        limits: the limits; ``per_domain`` overrides them for named domains.
        per_domain: limits for particular domains (keys lower-case, A-label form).
    """

    def __init__(
        self,
        limits: DomainLimits | None = None,
        *,
        per_domain: dict[str, DomainLimits] | None = None,
    ) -> None:
        self.limits = limits or DomainLimits()
        self.per_domain = {k.lower(): v for k, v in (per_domain or {}).items()}
        self._lock = threading.Lock()
        self._domains: dict[str, _DomainState] = {}

    def _limits(self, domain: str) -> DomainLimits:
        return self.per_domain.get(domain, self.limits)

    def _state(self, domain: str) -> _DomainState:
        return self._domains.setdefault(domain, _DomainState())

    def paces(self, domain: str) -> bool:
        """Whether ``domain`` has a concurrency or rate limit (not just the back-off).

        The sync tracker sends the transactions of such a domain one at a time, so that
        the limits count transactions exactly; others go out pipelined in batches.
        """
        limits = self._limits(domain.lower())
        return limits.max_concurrent is not None or limits.per_second is not None

    def acquire(self, domain: str, now: dt.datetime) -> dt.datetime | None:
        """Take a delivery slot for ``domain`` at ``now``.

        Returns:
            ``None`` when the delivery may go ahead (call :meth:`release` after it),
            or the time at which to try again.
        """
        domain = domain.lower()
        limits = self._limits(domain)
        with self._lock:
            state = self._state(domain)
            if state.blocked_until is not None and now < state.blocked_until:
                # Never further than the hold-off from now: a clock stepped back since
                # the refusal would otherwise hold the domain off (and the recipients put
                # back, whose due times are stored) for as long as the step.
                state.blocked_until = min(
                    state.blocked_until, now + dt.timedelta(seconds=state.backoff)
                )
                return state.blocked_until
            if state.next_slot is not None and now < state.next_slot:
                if limits.per_second is not None:  # as above: one spacing at most
                    state.next_slot = min(
                        state.next_slot, now + dt.timedelta(seconds=1.0 / limits.per_second)
                    )
                return state.next_slot
            if limits.max_concurrent is not None and state.in_flight >= limits.max_concurrent:
                return now + dt.timedelta(seconds=limits.busy_delay)
            state.in_flight += 1
            if limits.per_second is not None:
                state.next_slot = now + dt.timedelta(seconds=1.0 / limits.per_second)
            return None

    def release(self, domain: str, now: dt.datetime, *, refused: bool | None) -> None:
        """Give back a slot taken with :meth:`acquire` and learn from how it went.

        Args:
            domain: the domain.
            now: the current time.
            refused: ``True`` when the domain refused the transaction for now
                (421, or every recipient 4xx): back off, doubling the hold-off;
                ``False`` when it accepted something: reset the back-off;
                ``None`` when the attempt said nothing about the domain.
        """
        domain = domain.lower()
        limits = self._limits(domain)
        with self._lock:
            state = self._state(domain)
            state.in_flight = max(0, state.in_flight - 1)
            if refused is True:
                state.backoff = min(
                    limits.backoff_max,
                    state.backoff * 2 if state.backoff else limits.backoff_initial,
                )
                state.blocked_until = now + dt.timedelta(seconds=state.backoff)
            elif refused is False:
                state.backoff = 0.0
                state.blocked_until = None

    def blocked_until(self, domain: str) -> dt.datetime | None:
        """Until when ``domain`` is held off after refusals (``None``: not held off)."""
        with self._lock:
            state = self._domains.get(domain.lower())
            return None if state is None else state.blocked_until

    def in_flight(self, domain: str) -> int:
        """How many deliveries to ``domain`` are in flight."""
        with self._lock:
            state = self._domains.get(domain.lower())
            return 0 if state is None else state.in_flight
