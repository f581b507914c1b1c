"""The I/O requests a step of the dialogue yields, and the ``Step`` type.

Rules: these are plain values; nothing here performs I/O. A driver answers :class:`Write`,
:class:`StartTLS` and :class:`Close` with ``None``, :class:`Read` with bytes (``b""`` at end
of file) and :class:`Peek` with bytes or ``None``. One :class:`Read` per phase is shared,
since a Read is immutable.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TypeAlias, TypeVar

import attrs

_T = TypeVar("_T")

# -- I/O requests ------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Write:
    """Write all of ``data`` to the connection; the driver sends back ``None``.

    A driver may hold writes back and send them together before the next :class:`Read`
    (one system call for a group); ``flush`` asks it to send this one, with any held before
    it, now: the step has work to do before it reads, which then overlaps the round trip.

    Attributes:
        data: the bytes to write (never shown by ``repr``: they may hold credentials).
        phase: the :class:`~mailrelay.options.Timeouts` field that limits the write.
        flush: send now rather than with the next Read.
    """

    data: bytes = attrs.field(repr=False)
    phase: str
    flush: bool = False


@attrs.frozen(kw_only=True)
class Read:
    """Read what the server has sent (at least one byte); the driver sends back the bytes,
    or ``b""`` at end of file.

    Attributes:
        phase: the :class:`~mailrelay.options.Timeouts` field that limits the wait.
        resume: the wait for the same reply goes on (the bytes read so far did not complete
            it): the driver keeps the deadline of the Read that began the wait instead of
            granting the phase's limit again, so a server that sends a reply a byte at a
            time cannot stretch the wait (RFC 5321 §4.5.3.2 limits the wait for a reply).
    """

    phase: str
    resume: bool = False


@attrs.frozen(kw_only=True)
class StartTLS:
    """Run the TLS handshake on the connection now; the driver sends back ``None``, or
    throws the handshake's exception into the generator.

    Attributes:
        server_hostname: the name to send in SNI and to check the certificate against.
    """

    server_hostname: str


@attrs.frozen(kw_only=True)
class Close:
    """Close the connection; the driver sends back ``None``."""


@attrs.frozen(kw_only=True)
class Peek:
    """Hand back what the server has sent and no Read has taken, without waiting: the driver
    sends back those bytes (at most one Read's worth; ``b""`` at end of file), or ``None``
    when nothing has come. It may send held-back writes first. ``None`` is always a safe
    answer (a driver that cannot tell): the dialogue then goes on as if nothing had come.

    The dialogue asks before it writes the terminator of a message whose data went out
    before it: a reply then came before the end of the data (see
    ``_Delivery._answered_early``).

    Attributes:
        phase: the :class:`~mailrelay.options.Timeouts` field that limits any write sent
            first.
    """

    phase: str


#: Anything a step may yield.
Request: TypeAlias = Write | Read | StartTLS | Close | Peek
#: A step of the session: yields requests, is sent ``bytes`` (for :class:`Read`) or ``None``,
#: and returns its result.
Step: TypeAlias = Generator[Request, bytes | None, _T]


# A Read is immutable and the phases are few: one request per phase (and resume flag)
# serves every read.
_READS: dict[tuple[str, bool], Read] = {}


def _read_request(phase: str, resume: bool = False) -> Read:
    request = _READS.get((phase, resume))
    if request is None:
        request = _READS[phase, resume] = Read(phase=phase, resume=resume)
    return request


# The one Peek the dialogue asks (before a terminator, in the data phase).
_PEEK = Peek(phase="data_block")

# Messages up to this size are sent as one write with their terminator. Read at each use
# (``requests._JOIN_LIMIT``) by the transaction and batch modules, so tests can lower it.
_JOIN_LIMIT = 1 << 20
