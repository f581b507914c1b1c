"""Every legal state transition of a client connection, as tables.

This module is the single source of truth for what the client may send when,
and what each reply does to the connection's state. The connection code only
looks things up here; ``docs/protocol.md`` draws its state diagram from these
tables (``python -m mailrelay.protocol.diagram``), and a test fails when the
drawing is stale.

Theory of operation:

* :data:`SEND` maps ``(state, command kind)`` to the state after sending. A
  pair that is missing is a :class:`~mailrelay.errors.LocalProtocolError`.
  With PIPELINING several commands may be in flight, so this is the client's
  *optimistic* state: it assumes the commands in flight will succeed.
* :data:`REPLY` maps ``(state, command kind, reply kind)`` to the state after
  the reply to that command arrives. A missing entry means "no change". Replies
  correct the optimism: a refused ``MAIL`` closes the transaction again, a
  ``354`` opens the message data. A reply only moves the state when it belongs
  to the current mail transaction, so that a late reply to a previous message's
  pipelined command cannot disturb the next one.
* Rules that hold in every state are not in the tables but named here:
  :data:`CLOSING_CODE` (421 in answer to anything: RFC 5321 §3.8), end of file
  (to ``CLOSED``), and any protocol error (to the absorbing ``ERROR``).
* Pipelining (RFC 2920 §3.1): a command may be sent while others await their
  replies only when the server announced PIPELINING, every command in flight
  is in :data:`PIPELINE_CONTINUES` (its outcome cannot change what may follow)
  and the new command is in :data:`PIPELINE_JOINS`.
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = [
    "CLOSING_CODE",
    "GREETING",
    "LMTP_ONLY",
    "ON_421",
    "ON_EOF",
    "ON_ERROR",
    "ON_TLS_ESTABLISHED",
    "PIPELINE_CONTINUES",
    "PIPELINE_JOINS",
    "REPLY",
    "SEND",
    "SMTP_ONLY",
    "ReplyKind",
    "State",
    "reply_kind",
]


class State(enum.Enum):
    """Where a client connection is in the SMTP/LMTP conversation."""

    #: Connected; waiting for the server's greeting (RFC 5321 §3.1).
    GREETING = "GREETING"
    #: Greeted, but no EHLO/HELO/LHLO accepted yet (again so after STARTTLS).
    CONNECTED = "CONNECTED"
    #: Hello accepted; no mail transaction open.
    READY = "READY"
    #: An AUTH exchange is under way (RFC 4954 §4).
    AUTH = "AUTH"
    #: A mail transaction is open: MAIL sent, RCPTs may follow (RFC 5321 §3.3).
    MAIL = "MAIL"
    #: DATA got its 354: message data is being sent (RFC 5321 §4.1.1.4).
    DATA = "DATA"
    #: BDAT chunks are being sent, the last one not yet (RFC 3030 §2).
    BDAT = "BDAT"
    #: STARTTLS got its 220: waiting for ``tls_established()`` (RFC 3207 §4.2).
    TLS_PENDING = "TLS_PENDING"
    #: QUIT sent or 421 received: waiting for the server to close.
    CLOSING = "CLOSING"
    #: The server closed the connection.
    CLOSED = "CLOSED"
    #: A protocol error happened; the connection is unusable (absorbing).
    ERROR = "ERROR"

    # Members are singletons compared by identity; hash them by identity too, in C
    # (Enum's own __hash__ is Python code, and the tables are looked up per command).
    __hash__ = object.__hash__


class ReplyKind(enum.Enum):
    """The classes of reply that drive transitions (RFC 5321 §4.2.1)."""

    POSITIVE = "2xx"
    INTERMEDIATE = "3xx"
    NEGATIVE = "4xx/5xx"

    __hash__ = object.__hash__


def reply_kind(code: int) -> ReplyKind:
    """The :class:`ReplyKind` of a reply code."""
    if code < 300:
        return ReplyKind.POSITIVE
    if code < 400:
        return ReplyKind.INTERMEDIATE
    return ReplyKind.NEGATIVE


#: The state after a 421 reply to anything (RFC 5321 §3.8), after the end of file,
#: and after any protocol error (absorbing: nothing leaves ERROR).
ON_421: Final = State.CLOSING
ON_EOF: Final = State.CLOSED
ON_ERROR: Final = State.ERROR
#: ``tls_established()``: the only way out of TLS_PENDING (RFC 3207 §4.2: the
#: session starts over, so the client must say EHLO again).
ON_TLS_ESTABLISHED: Final = {State.TLS_PENDING: State.CONNECTED}

#: The pseudo command kind of the greeting in :data:`REPLY`.
GREETING: Final = "greeting"
#: RFC 5321 §3.8: a 421 reply, to any command or as a greeting, means the server
#: is closing the connection.
CLOSING_CODE: Final = 421

S = State
_HELLO = ("EHLO", "HELO", "LHLO")

#: (state, command kind) -> state after sending. Kinds are ``Command.verb``,
#: except that a final BDAT is ``"BDAT-LAST"``.
SEND: Final[dict[tuple[State, str], State]] = {
    # RFC 5321 §4.1.4: the session starts with EHLO/HELO; RSET, NOOP, VRFY and
    # QUIT are allowed at any time outside the message data.
    **{(S.CONNECTED, hello): S.CONNECTED for hello in _HELLO},
    (S.CONNECTED, "RSET"): S.CONNECTED,
    (S.CONNECTED, "NOOP"): S.CONNECTED,
    (S.CONNECTED, "VRFY"): S.CONNECTED,
    (S.CONNECTED, "QUIT"): S.CLOSING,
    **{(S.READY, hello): S.READY for hello in _HELLO},
    (S.READY, "STARTTLS"): S.READY,  # RFC 3207 §4: after EHLO, outside a transaction
    (S.READY, "AUTH"): S.AUTH,  # RFC 4954 §4: not during a mail transaction
    (S.READY, "MAIL"): S.MAIL,
    (S.READY, "RSET"): S.READY,
    (S.READY, "NOOP"): S.READY,
    (S.READY, "VRFY"): S.READY,
    (S.READY, "QUIT"): S.CLOSING,
    # RFC 4954 §4: only a response line or "*" while a challenge is outstanding.
    (S.AUTH, "AUTH-CONTINUE"): S.AUTH,
    (S.AUTH, "AUTH-ABORT"): S.AUTH,
    (S.MAIL, "RCPT"): S.MAIL,
    (S.MAIL, "DATA"): S.MAIL,  # the 354 reply opens DATA
    (S.MAIL, "BDAT"): S.BDAT,
    (S.MAIL, "BDAT-LAST"): S.READY,
    (S.MAIL, "RSET"): S.READY,
    (S.MAIL, "NOOP"): S.MAIL,
    (S.MAIL, "VRFY"): S.MAIL,
    (S.MAIL, "QUIT"): S.CLOSING,
    # RFC 3030 §2: BDAT chunks follow each other until the LAST one; DATA may not mix in.
    (S.BDAT, "BDAT"): S.BDAT,
    (S.BDAT, "BDAT-LAST"): S.READY,
    (S.BDAT, "RSET"): S.READY,
    (S.BDAT, "NOOP"): S.BDAT,
    (S.BDAT, "QUIT"): S.CLOSING,
    # RFC 5321 §4.1.1.4: after 354 only message data, ended by CRLF.CRLF.
    (S.DATA, "DATA-CHUNK"): S.DATA,
    (S.DATA, "END-OF-DATA"): S.READY,
}

R = ReplyKind

#: (state, command kind, reply kind) -> state after that reply. Missing: no change.
REPLY: Final[dict[tuple[State, str, ReplyKind], State]] = {
    # RFC 5321 §3.1: any greeting but 421 leaves the choice to the client (a 554
    # greeting refuses the session, and the client should then QUIT).
    **{(S.GREETING, GREETING, kind): S.CONNECTED for kind in ReplyKind},
    # RFC 5321 §4.1.4: a refused EHLO leaves the server in the state it was in.
    **{(S.CONNECTED, hello, R.POSITIVE): S.READY for hello in _HELLO},
    # RFC 3207 §4.2: after 220 the client starts the TLS handshake at once.
    (S.READY, "STARTTLS", R.POSITIVE): S.TLS_PENDING,
    # RFC 4954 §4: 334 asks for more; any final reply ends the exchange.
    **{
        (S.AUTH, step, kind): S.READY
        for step in ("AUTH", "AUTH-CONTINUE", "AUTH-ABORT")
        for kind in (R.POSITIVE, R.NEGATIVE)
    },
    # A refused MAIL opens no transaction (pipelined RCPTs will get 503s).
    (S.MAIL, "MAIL", R.NEGATIVE): S.READY,
    # RFC 5321 §4.1.1.4: 354 opens the data; anything else ends the attempt.
    # RFC 2920 §3.1: DATA may get 354 even when MAIL or every RCPT was refused
    # (the client then sends a lone "."), hence READY -> DATA too.
    (S.MAIL, "DATA", R.INTERMEDIATE): S.DATA,
    (S.READY, "DATA", R.INTERMEDIATE): S.DATA,
    (S.MAIL, "DATA", R.POSITIVE): S.READY,
    (S.MAIL, "DATA", R.NEGATIVE): S.READY,
    # RFC 3030 §2: after a refused BDAT the client sends no more chunks (and RSETs).
    (S.BDAT, "BDAT", R.NEGATIVE): S.READY,
}

#: RFC 2920 §3.1 (and RFC 3030 §4 for BDAT): commands whose outcome does not
#: change what the client may send next, so more may follow before their reply.
#: Message data counts too: RFC 2920 §3.1 lets it start a new group.
PIPELINE_CONTINUES: Final = frozenset({"MAIL", "RCPT", "RSET", "BDAT", "BDAT-LAST", "END-OF-DATA"})
#: RFC 2920 §3.1: commands that may be sent while others are in flight; those not
#: in PIPELINE_CONTINUES must be the last of their group. STARTTLS (RFC 3207 §4.2),
#: AUTH (RFC 4954 §4) and HELO never join a group.
PIPELINE_JOINS: Final = PIPELINE_CONTINUES | {"DATA", "NOOP", "VRFY", "QUIT", "EHLO", "LHLO"}

#: Commands an LMTP connection never sends (RFC 2033 §4.1: LHLO replaces them).
SMTP_ONLY: Final = frozenset({"EHLO", "HELO"})
#: Commands an SMTP connection never sends.
LMTP_ONLY: Final = frozenset({"LHLO"})
