"""Connection options shared by the dialogue and every transport: the TLS policy and timeouts.

Rules:

* :class:`TLS` is one explicit policy, never a pair of booleans that can contradict each other.
* :class:`Timeouts` holds one limit per phase of the dialogue, in seconds, with the values
  RFC 5321 §4.5.3.2 recommends as defaults. The dialogue (:mod:`mailrelay.flow`) names the
  phase of every read and write it asks for; the driver looks the limit up with
  :meth:`Timeouts.for_phase` and applies it. Nothing here reads a clock.

This is a values-layer module: stdlib, attrs and :mod:`mailrelay.errors` only.
"""

from __future__ import annotations

import enum
import math

import attrs

from mailrelay.errors import ConfigurationError

__all__ = ["TLS", "Timeouts"]


class TLS(enum.Enum):
    """How a connection is protected.

    ``NONE``
        Plain text throughout; STARTTLS is never sent even when offered.
    ``OPPORTUNISTIC``
        STARTTLS when the server offers it, plain text otherwise (RFC 3207; what MX
        delivery does by default). Protects against passive eavesdroppers only.
    ``STARTTLS``
        STARTTLS is required: a server that does not offer it fails with
        :class:`~mailrelay.errors.TLSError` before anything else is sent.
    ``IMPLICIT``
        TLS from the first byte (RFC 8314 §3.3, "submissions" on port 465);
        the dialogue never sends STARTTLS.
    """

    NONE = "none"
    OPPORTUNISTIC = "opportunistic"
    STARTTLS = "starttls"
    IMPLICIT = "implicit"

    @classmethod
    def parse(cls, text: str) -> TLS:
        """Return the policy named by ``text`` (case-insensitive), as used in transport URLs.

        Raises:
            ConfigurationError: when ``text`` names no policy (a ``ValueError``).
        """
        try:
            return cls(text.strip().lower())
        except ValueError:
            names = ", ".join(member.value for member in cls)
            raise ConfigurationError(
                f"unknown TLS policy {text!r} (expected one of: {names})"
            ) from None


def _seconds(instance: Timeouts, attribute: attrs.Attribute[float], value: float) -> None:
    if not math.isfinite(value) or value <= 0:
        raise ConfigurationError(
            f"timeout {attribute.name} must be a positive number of seconds: {value}"
        )


def _to_float(value: float) -> float:
    # bool is an int subclass; True seconds is surely a mistake.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"a timeout is a number of seconds, not {type(value).__name__}")
    return float(value)


def _timeout(default: float) -> float:
    return attrs.field(default=default, converter=_to_float, validator=_seconds)


@attrs.frozen(kw_only=True)
class Timeouts:
    """How long each phase of the dialogue may take, in seconds.

    The defaults are the minimums RFC 5321 §4.5.3.2 asks a client to wait; ``connect`` is ours.

    Attributes:
        connect: opening the connection (and the TLS handshake, for implicit TLS / STARTTLS).
        greeting: waiting for the server's 220 greeting (RFC 5321 §4.5.3.2.1: 5 minutes).
            The driver also uses it for EHLO, STARTTLS, AUTH, RSET and NOOP replies.
        mail: the reply to MAIL FROM (§4.5.3.2.2: 5 minutes).
        rcpt: the reply to each RCPT TO (§4.5.3.2.3: 5 minutes).
        data_init: the 354 after DATA (§4.5.3.2.4: 2 minutes).
        data_block: each write of message data (§4.5.3.2.5: 3 minutes).
        data_end: the final reply after the data (§4.5.3.2.6: 10 minutes).
        quit: sending QUIT and waiting for its reply when a session ends (RFC 5321 sets no
            limit; §4.1.1.10 only asks the client to wait for the reply). Every message is
            answered by then, so this is a courtesy that closing a transport (or the end of
            an event loop) should not wait minutes for: 10 seconds by default.
    """

    connect: float = _timeout(30.0)
    greeting: float = _timeout(300.0)
    mail: float = _timeout(300.0)
    rcpt: float = _timeout(300.0)
    data_init: float = _timeout(120.0)
    data_block: float = _timeout(180.0)
    data_end: float = _timeout(600.0)
    quit: float = _timeout(10.0)

    @classmethod
    def all(cls, seconds: float) -> Timeouts:
        """Every phase limited to ``seconds`` (handy in tests: ``Timeouts.all(5)``)."""
        return cls(
            connect=seconds,
            greeting=seconds,
            mail=seconds,
            rcpt=seconds,
            data_init=seconds,
            data_block=seconds,
            data_end=seconds,
            quit=seconds,
        )

    def for_phase(self, phase: str) -> float:
        """The limit for a dialogue phase name (``"greeting"``, ``"rcpt"``, ``"data_end"``, ...).

        Raises:
            ConfigurationError: when ``phase`` is not one of this class's fields.
        """
        if phase not in _PHASES:
            raise ConfigurationError(f"unknown dialogue phase {phase!r}")
        value: float = getattr(self, phase)
        return value


_PHASES = frozenset(field.name for field in attrs.fields(Timeouts))
