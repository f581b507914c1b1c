"""The SMTP/ESMTP/LMTP conversation, written once, with no I/O of its own.

Theory of operation
-------------------
A :class:`Session` holds one sans-I/O :class:`~mailrelay.protocol.ClientConnection` and
offers the steps of a session as generator methods: :meth:`Session.open`,
:meth:`Session.deliver`, :meth:`Session.deliver_many`, :meth:`Session.probe`,
:meth:`Session.reset`, :meth:`Session.noop` and :meth:`Session.quit`.
Each generator yields *I/O requests* and its ``return`` value is the step's result. A driver
(blocking sockets or asyncio, in :mod:`mailrelay.transport`) runs a step like this::

    def run(step):
        reply = None
        while True:
            try:
                request = step.send(reply)
            except StopIteration as done:
                return done.value
            if isinstance(request, Write):      # send every byte; reply None
                ...
            elif isinstance(request, Read):     # recv up to 64 KiB; reply the bytes, b"" at EOF
                ...
            elif isinstance(request, StartTLS): # wrap the socket; reply None
                ...                             # on failure: step.throw(exc) instead
            elif isinstance(request, Close):    # close the socket; reply None
                ...
            elif isinstance(request, Peek):     # what has arrived, without waiting;
                ...                             # reply the bytes, or None (always safe)

Every :class:`Write` and :class:`Read` names its *phase* (``"greeting"``, ``"mail"``,
``"rcpt"``, ``"data_init"``, ``"data_block"``, ``"data_end"``, ``"quit"``): the name of the
:class:`~mailrelay.options.Timeouts` field the driver applies (``timeouts.for_phase(phase)``).
Replies to EHLO, HELO, LHLO, STARTTLS, RSET and NOOP use ``"greeting"``
(RFC 5321 §4.5.3.2 names no limit for them; its 5 minutes are the general one); AUTH and
its exchange use ``"auth"``, which the drivers give the greeting limit too, so that a
timeout there says AUTH (servers delay AUTH replies after failures: Dovecot by seconds);
QUIT and its reply use ``"quit"`` (a short limit: every message is answered by then).
A failed TLS handshake is thrown into the generator at its :class:`StartTLS` request; the
generator turns it into :class:`~mailrelay.errors.TLSError`. Any other exception the driver
meets (timeouts, resets) it raises itself, after closing the socket; the session is then dead.

Rules (the RFC sections are cited where they are enforced):

* Greeting: 220 goes on; anything else refuses the session (:class:`SessionRefused`,
  transient for 4xx such as 421, permanent for 554).
* EHLO, falling back to HELO when EHLO is refused with 500, 501, 502, 504 or 550
  (RFC 5321 §4.1.4); LMTP sends LHLO and never falls back (RFC 2033 §4.1). A local host name
  that is an IP address goes out as an address literal (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``,
  RFC 5321 §4.1.3).
* STARTTLS by policy (:class:`~mailrelay.options.TLS`): ``NONE`` never; ``OPPORTUNISTIC`` when
  offered, staying in plain text when not offered or refused — but a handshake that *fails*
  raises a transient :class:`TLSError` (the connection is unusable; the transport may retry in
  plain text); ``STARTTLS`` required raises :class:`TLSError` when not offered or refused;
  ``IMPLICIT`` never sends STARTTLS (the driver has already wrapped the socket). EHLO again
  after TLS (RFC 3207 §4.2).
* AUTH when a user name is configured, never over plain text unless ``allow_insecure_auth``.
  The strongest mechanism both sides offer, unless the caller names its own order; after 534
  "mechanism too weak" (or 504 "not supported") the next one is tried (RFC 4954 §6); other
  refusals raise :class:`AuthenticationError` (with the ``status`` and ``scope`` of an
  XOAUTH2 / OAUTHBEARER JSON error, RFC 7628 §3.2.2). When the password is renewable (an
  OAuth 2.0 token provider), a 535 or 4xx refusal is kept in ``Session.auth_refusal`` instead,
  the connection left open, for the transport to call ``Session.retry_authentication`` once.
* Per message, refused *before sending* with a PERMANENT result for every recipient and a
  ``reason`` when the server lacks what the message needs: SIZE (RFC 1870 §6), SMTPUTF8
  (RFC 6531 §3.4, for the message or any envelope address), 8BITMIME (RFC 6152 §3; we do not
  re-encode to 7 bit), REQUIRETLS (RFC 8689 §4.1: needs an encrypted connection and the
  server's keyword).
* MAIL, every RCPT and DATA (or the first BDAT chunk, RFC 3030 §4) are sent in one write when
  the server offers PIPELINING and the configuration allows it (RFC 2920 §3.1); later BDAT
  chunks each wait for the previous chunk's reply. A refused MAIL gives every recipient the MAIL
  reply (not the 503s that follow). If every RCPT was refused but DATA still got 354, a lone
  "." ends the empty transaction (RFC 2920 §3.1) and each recipient keeps its own reply.
* Many messages (:meth:`Session.deliver_many`): with PIPELINING, the next message's RSET
  (when needed), MAIL, RCPTs and DATA follow the previous message's data and terminator
  before its final reply is read (RFC 2920 §3.1: message content may start a group), so a
  message costs one round trip; with CHUNKING, whole messages sent as ``BDAT n LAST`` (no
  354 to wait for, RFC 3030 §4) share a bounded window (:data:`WINDOW_MESSAGES`,
  :data:`WINDOW_BYTES`) whose replies are read in order as it fills. Each message's result
  is what :meth:`Session.deliver` would have given it alone; when the session ends early,
  messages without any final answer are handed back (``None``) for the transport to send
  again on a fresh connection.
* :meth:`Session.probe`: MAIL and RCPTs, then RSET, never DATA (recipient callouts).
* Message data comes from ``message.chunks()``: a message up to 1 MiB goes out as one
  :class:`Write` with its terminator (its wire form is kept, so the same message sent to
  the next envelope is not dot-stuffed again); a larger one is streamed, one
  :class:`Write` per chunk, and never held whole. BDAT
  (RFC 3030) is used when the server offers CHUNKING *and* the configuration asks for it
  (``chunking=True``); otherwise DATA.
* LMTP: one final reply per accepted recipient, in RCPT order (RFC 2033 §4.2).
* After a transaction that did not reach its end-of-data reply, RSET is sent before the
  next one (RFC 5321 §4.1.1.5).
* 421 anywhere (and an unexpected end of the connection): the session is closed; recipients
  without a final answer become TRANSIENT. If *no* recipient got a final answer of its own,
  :class:`SessionRefused` (421) or :class:`ConnectionLost` (EOF) is raised instead of a
  result, so that a transport may try another host for the whole message. A driver's error
  (timeout, reset) thrown into a delivery is treated alike: once any recipient has a final
  answer (an LMTP final reply, a refused RCPT), the result keeps it and the rest are
  TRANSIENT, because sending the whole message again would deliver it twice.

Wire traces go to the ``mailrelay.flow`` logger at DEBUG; AUTH lines are redacted.

The package's modules, in import order (each imports only the ones before it):

- ``requests``: the I/O requests (:class:`Write`, :class:`Read`, :class:`StartTLS`,
  :class:`Close`) and the :data:`Step` type;
- ``config``: :class:`SessionConfig`;
- ``bookkeeping``: per-message state (which recipient has which reply) and result builders;
- ``core``: the session's state and the low-level read/write/close steps;
- ``opening``: greeting, EHLO/HELO/LHLO, STARTTLS, AUTH;
- ``transaction``: one message (MAIL, RCPT, DATA/BDAT) and the probe;
- ``batch``: many messages pipelined across transactions (:meth:`Session.deliver_many`);
- ``session``: :class:`Session` itself, with RSET, NOOP and QUIT.

Everything is imported from here; the submodules are an implementation detail.
"""

from __future__ import annotations

from mailrelay.flow.batch import WINDOW_BYTES, WINDOW_MESSAGES, BatchOutcome
from mailrelay.flow.bookkeeping import unsent_positions
from mailrelay.flow.config import ServerNotes, SessionConfig
from mailrelay.flow.requests import Close, Peek, Read, Request, StartTLS, Step, Write
from mailrelay.flow.session import Session
from mailrelay.flow.transaction import ProbeResult

__all__ = [
    "WINDOW_BYTES",
    "WINDOW_MESSAGES",
    "BatchOutcome",
    "Close",
    "Peek",
    "ProbeResult",
    "Read",
    "Request",
    "Session",
    "ServerNotes",
    "SessionConfig",
    "StartTLS",
    "Step",
    "Write",
    "unsent_positions",
]

# Private names of the single-module ``flow.py`` this package replaced, still importable
# from here (tests and older code reach for some of them).
from mailrelay.flow.batch import _ONE_CHUNK as _ONE_CHUNK
from mailrelay.flow.batch import _apply_envelope as _apply_envelope
from mailrelay.flow.batch import _result_of as _result_of
from mailrelay.flow.batch import _short as _short
from mailrelay.flow.bookkeeping import _OUTCOME_BY_CLASS as _OUTCOME_BY_CLASS
from mailrelay.flow.bookkeeping import _delivery_result as _delivery_result
from mailrelay.flow.bookkeeping import _recipient_result as _recipient_result
from mailrelay.flow.bookkeeping import _SessionClosed as _SessionClosed
from mailrelay.flow.bookkeeping import _set_address as _set_address
from mailrelay.flow.bookkeeping import _set_host as _set_host
from mailrelay.flow.bookkeeping import _set_message_id as _set_message_id
from mailrelay.flow.bookkeeping import _set_outcome as _set_outcome
from mailrelay.flow.bookkeeping import _set_reason as _set_reason
from mailrelay.flow.bookkeeping import _set_recipients as _set_recipients
from mailrelay.flow.bookkeeping import _set_reply as _set_reply
from mailrelay.flow.bookkeeping import _set_result_host as _set_result_host
from mailrelay.flow.bookkeeping import _Transaction as _Transaction
from mailrelay.flow.config import _check_credentials as _check_credentials
from mailrelay.flow.config import _check_hostname as _check_hostname
from mailrelay.flow.config import _mechanism_tuple as _mechanism_tuple
from mailrelay.flow.core import _NO_EXTENSIONS as _NO_EXTENSIONS
from mailrelay.flow.core import _trace as _trace
from mailrelay.flow.core import log as log
from mailrelay.flow.opening import _HELO_FALLBACK as _HELO_FALLBACK
from mailrelay.flow.opening import _NEXT_MECHANISM as _NEXT_MECHANISM
from mailrelay.flow.opening import _hello_name as _hello_name
from mailrelay.flow.requests import _JOIN_LIMIT as _JOIN_LIMIT
from mailrelay.flow.requests import _READS as _READS
from mailrelay.flow.requests import _T as _T
from mailrelay.flow.requests import _read_request as _read_request
from mailrelay.flow.transaction import _DATA as _DATA
from mailrelay.flow.transaction import _END_OF_DATA as _END_OF_DATA
from mailrelay.flow.transaction import _with_last as _with_last
