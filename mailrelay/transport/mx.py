"""Delivery straight to each recipient domain's mail exchangers (RFC 5321 §5), blocking.

Theory of operation: :meth:`MXTransport.deliver` groups the envelope's recipients by domain
(their A-label form) and delivers one copy of the message per domain. For each domain it asks
the resolver for the domain's mail hosts, turns them into an ordered list of *targets*
(exchanger name + one IP address), and tries the targets in turn until one of them gives an
answer per recipient. The per-domain results are merged into one
:class:`~mailrelay.results.DeliveryResult`, in envelope order. The planning and bookkeeping
live in :mod:`mailrelay.transport.mx_plan`, shared with :mod:`mailrelay.transport.mx_async`: a
domain's delivery, every decision of it (reuse or open, TLS fallback, REQUIRETLS, when to
move on), is one generator (:func:`~mailrelay.transport.mx_plan.deliver_plan`) that yields
requests; only the short loops that carry them out with I/O are written twice. The policy
and routing names (:class:`MXPolicy`, :data:`MX_POOL`, ...) are re-exported here.

Rules (RFC sections cited where they are enforced):

* Routing, from the DNS (:mod:`mailrelay.resolver`): a null MX (RFC 7505 §3), NXDOMAIN, a
  domain with neither MX nor address records, and exchangers none of which has an address
  ("dangling MX") are PERMANENT for that domain's recipients, with a ``reason`` saying which.
  DNS trouble (timeout, SERVFAIL, REFUSED, or exchangers whose address lookups failed while
  none resolved) is TRANSIENT: the DNS did not say "no".
* Order (RFC 5321 §5.1): exchangers by preference (the resolver shuffles equal preferences),
  each exchanger's addresses in turn, IPv4 then IPv6; an address already tried for the domain
  is not tried again; at most ``max_addresses`` addresses per domain (as Postfix's
  ``smtp_mx_address_limit``: a domain with fifty dead exchangers must not hold a sender for
  fifty connect timeouts). Address literals (``user@[192.0.2.1]``) go to that address.
* Refused addresses: an exchanger address (or address literal) in ``refused_networks``
  (loopback by default, as Exim's default router ignores it) is never a target: anyone can
  give an address whose domain points at 127.0.0.1 and make a sender deliver to its own
  host's port 25. A domain left with no target because of it is PERMANENT, with a
  ``reason`` naming the refused addresses.
* Moving on (RFC 5321 §4.5.4.1, §5.1): a connect failure, a timeout, a lost connection, a
  421 or any refused greeting/EHLO, a server protocol violation, or a TLS failure makes the
  transport try the next target. An answer per recipient (even all refusals) ends the search:
  a recipient's 4xx is that recipient's TRANSIENT result, not a reason to ask another host.
  When every target failed, the recipients are TRANSIENT, unless every failure was permanent
  (5xx greetings from every host): then PERMANENT. The ``reason`` lists what each target did.
  One exception: a connection that ends (or times out) after the exchanger had the whole
  message, before its final reply, is an answer: the recipients are TRANSIENT and no other
  target (nor a fresh session) is tried, since the exchanger may have taken the message and
  sending it again could deliver it twice (RFC 1047; RFC 5321 §4.5.3.2.6 is why that wait is
  so long).
* TLS (:class:`MXPolicy`): by default opportunistic (RFC 3207, RFC 7435): STARTTLS whenever
  offered, with a context that does not verify certificates, because a public MX's certificate
  rarely matches anything an MTA can check without MTA-STS (RFC 8461) or DANE (RFC 7672), and
  refusing to encrypt is worse than encrypting without authentication. A handshake that fails
  leaves the connection unusable; the same address is then tried once more in plain text
  when the policy's ``plaintext_fallback`` allows it (the default), as RFC 7435 §3 suggests.
  A per-domain ``tls_policy`` hook may demand ``TLS.STARTTLS``: then the certificate is
  verified against the exchanger's name with ``ssl_context`` (the system's CAs by default),
  a failure moves on to the next exchanger and never falls back to plain text, and a domain
  no exchanger of which passes is TRANSIENT (RFC 8461 §5: a policy failure is not a bounce).
  DANE (RFC 7672, :mod:`mailrelay.transport.dane`, opt-in as the hook): an exchanger with
  secure, usable TLSA records gets STARTTLS without WebPKI checks, and its certificate is
  matched against the records once the session is open, before any transaction (no MAIL
  FROM on an unauthenticated session); one that fails is skipped like a failed TLS check;
  one whose TLSA lookup failed is not tried (RFC 7672 §2.1.1).
* REQUIRETLS (RFC 8689 §4.2.1): a message whose envelope asks for it is sent only with
  verified TLS, whatever the policy, and only to a server that offers the REQUIRETLS
  keyword after STARTTLS. A server that lacks it is skipped like a failed target: the next
  exchanger (and address) is tried, and when none qualifies the message is not sent
  (PERMANENT "REQUIRETLS support required", 5.7.30 in RFC 8689 §5, when every target lacked
  the keyword; TRANSIENT when some target could not be reached or failed the TLS check).
  We do not check DNSSEC on the MX lookup, which the RFC also asks for.
* MTA-STS ``testing`` mode (RFC 8461 §5: report failures, deliver anyway), for a policy the
  MTA-STS hooks marked ``sts_testing`` (they do when they have a ``tls_reporter``) and only
  when this transport has a ``tls_reporter`` too (without one nobody would learn anything:
  delivery stays exactly opportunistic, one connection). Under opportunistic delivery and
  without DANE for the exchanger: the policy's ``mx`` patterns skip no exchanger; one that
  matches is first opened with STARTTLS required and its certificate verified against its
  name (the policy's context, as ``enforce`` would); the verdict is reported under the
  ``sts`` policy; verified, that session carries the message; failed (a
  :class:`~mailrelay.errors.TLSError`: certificate, name, no STARTTLS), a fresh
  opportunistic session does (plain text where opportunistic delivery falls back to it):
  never a deferral or a bounce for testing's sake. One that does not match is not probed
  (``enforce`` would not connect) and is reported as ``validation-failure`` (``mx-mismatch``). The
  verdict is kept per exchanger, address, policy text and context for an hour
  (:class:`~mailrelay.transport.mx_plan.STSVerdicts`, bounded): a kept failure means no
  probe, and each fresh session is reported as that failure; such sessions are pooled under
  their own :func:`reuse_key`. A connection that never reached TLS is the target's failure,
  as in any mode.
* TLS reporting (RFC 8460, opt-in): with ``tls_reporter=`` (a
  :class:`~mailrelay.transport.tlsrpt.TLSReportCollector`) the transport tells it how TLS
  went on every fresh session (:class:`~mailrelay.transport.mx_plan.TLSAttempt`: the policy,
  the target, the TLS error or whether the session is encrypted); reused sessions and
  plain-text sessions the policy chose are not attempts. A reporter that raises is logged and
  never changes a delivery. The rules of counting are in :mod:`mailrelay.transport.tlsrpt`.
* Never an exception for the server's sake: :meth:`MXTransport.deliver` returns one result per
  envelope recipient whatever happened, because a message to several domains may reach some
  and not others. ``RecipientResult.host`` names the target that answered, Postfix style:
  ``mx.example.com[192.0.2.1]:25``.
* Connections are reused (:class:`~mailrelay.transport.pooling.ExchangerPool`, settings from
  :class:`~mailrelay.transport.settings.PoolSettings`): after a transaction the session
  stays open, keyed by :func:`reuse_key` (exchanger name, address, port, and the TLS
  decision's inputs: the policy's mode, its verifying context and name under
  ``TLS.STARTTLS``, its plaintext fallback under ``TLS.OPPORTUNISTIC``), so the next domain
  or message that would make the same decisions at the same exchanger sends its
  transaction on it (RSET first when the last one was left open) instead of connecting
  again: domains hosted together, and the messages of a ``send_many`` batch. Idle sessions
  are QUIT after ``idle_timeout`` (5 s by default: a public MX should not be held busy),
  after ``max_messages``, beyond ``size`` idle ones (the least recently used goes), and on
  ``close()``. A reused session found dead while sending (end of file, reset, 421) is
  replaced by a fresh one to the same target, as the SMTP pool does
  (:mod:`mailrelay.transport.pooling`). ``PoolSettings(max_messages=1)`` turns reuse off.
  A target that could not be opened is not tried again for the same message's other
  domains (:class:`Unreachable`): they fail there at once, with the same error.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
import warnings
from collections.abc import Hashable, Iterable
from typing import Any

from mailrelay.envelope import Envelope
from mailrelay.errors import (
    ConfigurationError,
    DeliveryError,
    TLSError,
)
from mailrelay.flow import Session
from mailrelay.message import Message
from mailrelay.options import TLS, Timeouts
from mailrelay.resolver import Resolver
from mailrelay.results import DeliveryResult, RecipientResult
from mailrelay.transport.base import Transport
from mailrelay.transport.dane import HostState, check_chain, trust_anchor_context
from mailrelay.transport.mx_plan import (
    DEFAULT_MAX_ADDRESSES,
    LOOPBACK_NETWORKS,
    MX_POOL,
    PRIVATE_NETWORKS,
    DomainPlan,
    MXAnswer,
    MXPolicy,
    MXSettings,
    Network,
    OpenSession,
    ReuseIdle,
    SendMessage,
    Stale,
    STSVerdicts,
    Target,
    TLSAttempt,
    TLSPolicyHook,
    TLSReporter,
    Trail,
    Unreachable,
    Verdict,
    dane_required,
    dane_ta_failed,
    deliver_plan,
    group_by_domain,
    mail_hosts_of,
    max_requests,
    merge,
    opportunistic_context,
    requiretls_refusal,
    reuse_key,
    sub_envelope,
)
from mailrelay.transport.pooling import ExchangerPool, answer_lost, reply_lost
from mailrelay.transport.proxy import Proxy
from mailrelay.transport.settings import PoolSettings
from mailrelay.transport.smtp import PooledSession, quit_all
from mailrelay.transport.sync_driver import connect

__all__ = [
    "DEFAULT_MAX_ADDRESSES",
    "LOOPBACK_NETWORKS",
    "MX_POOL",
    "PRIVATE_NETWORKS",
    "MXPolicy",
    "MXSettings",
    "MXTransport",
    "STSVerdicts",
    "TLSAttempt",
    "TLSPolicyHook",
    "TLSReporter",
    "Target",
    "Trail",
    "Unreachable",
    "Verdict",
    "opportunistic_context",
    "Stale",
    "requiretls_refusal",
    "reuse_key",
]

log = logging.getLogger(__name__)

# -- the blocking transport ---------------------------------------------------------------------


class MXTransport(Transport):
    """Deliver straight to each recipient domain's mail exchangers (MX), blocking.

    Example::

        with MXTransport() as mx:
            result = mx.send(message)
            for r in result.deferred:
                ...  # retry these later (a queue, or DeliveryTracker, does it for you)

    Args:
        resolver: the :class:`~mailrelay.resolver.Resolver` to ask (share one with a
            :class:`~mailrelay.validate.RecipientValidator` to share its cache); ``None``
            makes one reading the system's resolver configuration.
        port: the exchangers' port: 25, or a loopback test server's.
        tls: the default TLS policy: ``TLS.OPPORTUNISTIC`` (encrypt when offered, certificates
            not checked, see the module docs), ``TLS.STARTTLS`` (verified TLS required) or
            ``TLS.NONE``.
        ssl_context: the context that verifies certificates when TLS is required (default:
            the system's CAs, host names checked against the exchanger's name).
        timeouts: per-phase limits (RFC 5321 §4.5.3.2), for each target.
        local_hostname: the name announced in EHLO (default: our address, as a literal).
        source_address: the local IP address to connect from, on a host with several (the
            one whose reverse DNS and SPF record the receivers check, or a warmed-up one);
            only the exchangers' addresses of its family are tried.
            Receivers check it; give the host's real name in production.
        tls_policy: ``tls_policy(domain) -> TLS | MXPolicy | None``, a stricter policy per
            domain (MTA-STS or DANE results, a static list); ``None`` keeps the defaults.
        plaintext_fallback: under opportunistic TLS, retry an address in plain text after
            its TLS handshake failed.
        pipelining: use PIPELINING when offered (RFC 2920).
        chunking: use BDAT when offered (RFC 3030).
        max_addresses: the most addresses tried per domain and delivery.
        pool: how sessions are reused across domains and messages (:data:`MX_POOL`: at
            most 8 idle, 5 s each); ``PoolSettings(max_messages=1)`` turns reuse off.
        tls_reporter: told how TLS went on every fresh session (a
            :class:`~mailrelay.transport.tlsrpt.TLSReportCollector`, for SMTP TLS Reporting,
            RFC 8460); ``None``: nothing is collected.
        refused_networks: exchanger addresses never connected to (CIDR texts or
            :mod:`ipaddress` networks): :data:`LOOPBACK_NETWORKS` by default, so a domain
            (or an address literal) pointing at the sending host is refused, PERMANENT when
            it leaves no exchanger; add :data:`PRIVATE_NETWORKS` when delivering strangers'
            mail from inside a private network; ``()`` for a test server on loopback.
        proxy: reach the exchangers through this outbound proxy (a
            :class:`~mailrelay.transport.proxy.Proxy` or its URL: ``socks5://host:1080``,
            ``http://host:3128`` for HTTP CONNECT, which many HTTP proxies refuse for port
            25); needs ``local_hostname``, the name of the proxy's outgoing address. TLS and
            DANE still check the exchanger. A proxy's failure about one exchanger moves on
            to the next target; one about the proxy itself (unreachable, refusing our
            login, not speaking its protocol) fails the delivery's other targets at once.

    Raises:
        ConfigurationError: when the settings cannot work.
    """

    def __init__(
        self,
        resolver: Resolver | None = None,
        *,
        port: int = 25,
        tls: TLS = TLS.OPPORTUNISTIC,
        ssl_context: ssl.SSLContext | None = None,
        timeouts: Timeouts = Timeouts(),  # noqa: B008 -- an immutable value
        local_hostname: str | None = None,
        source_address: str | None = None,
        tls_policy: TLSPolicyHook | None = None,
        plaintext_fallback: bool = True,
        pipelining: bool = True,
        chunking: bool = False,
        max_addresses: int = DEFAULT_MAX_ADDRESSES,
        pool: PoolSettings = MX_POOL,
        tls_reporter: TLSReporter | None = None,
        refused_networks: Iterable[str | Network] = LOOPBACK_NETWORKS,
        proxy: Proxy | str | None = None,
    ) -> None:
        if not isinstance(pool, PoolSettings):
            raise ConfigurationError("pool must be a PoolSettings value")
        self.settings = MXSettings(
            port=port,
            tls=tls,
            ssl_context=ssl_context,
            timeouts=timeouts,
            local_hostname=local_hostname,
            source_address=source_address,
            tls_policy=tls_policy,
            plaintext_fallback=plaintext_fallback,
            pipelining=pipelining,
            chunking=chunking,
            max_addresses=max_addresses,
            tls_reporter=tls_reporter,
            refused=refused_networks,
            proxy=proxy,
        )
        self.resolver = resolver if resolver is not None else Resolver()
        self._pool: ExchangerPool[PooledSession] = ExchangerPool(pool, logger=log)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<MXTransport {self.settings.describe()}>"

    def __del__(self, _warn: Any = warnings.warn) -> None:
        pool = getattr(self, "_pool", None)
        if pool is None or pool.closed or not pool.opened:
            return  # closed, never connected, or never fully constructed
        _warn(f"unclosed transport {self!r}: call close()", ResourceWarning, source=self)
        for connection in pool.drain():
            connection.driver.close()

    def close(self) -> None:
        """QUIT every idle session (all at once) and close it; a session in use gets its
        QUIT when it is given back. Idempotent; never raises for a server's sake."""
        with self._lock:
            self._pool.closed = True
            idle = self._pool.drain()
        quit_all(idle)

    def deliver(self, message: Message, envelope: Envelope) -> DeliveryResult:
        """Deliver to every recipient's exchangers, one domain after the other.

        Returns:
            one result per envelope recipient, in envelope order; DNS verdicts, unreachable
            exchangers and refusals are all results (see the module docstring).

        Raises:
            TransportClosed: the transport was closed (as for the SMTP transports).
        """
        if self._pool.closed:
            raise self._pool.policy.closed_error(type(self).__name__)
        parts = []
        unreachable = Unreachable()
        for domain, positions in group_by_domain(envelope).items():
            part = sub_envelope(envelope, positions)
            parts.append((positions, self._deliver_domain(domain, message, part, unreachable)))
        return merge(envelope, message, parts)

    def _deliver_domain(
        self, domain: str, message: Message, envelope: Envelope, unreachable: Unreachable
    ) -> list[RecipientResult]:
        settings = self.settings
        policy = settings.policy(domain, requiretls=envelope.requiretls)
        routed = settings.route(domain, envelope, policy, mail_hosts_of(self.resolver, domain))
        if isinstance(routed, list):
            return routed
        plan: DomainPlan[PooledSession] = deliver_plan(
            routed, envelope, Trail(domain, unreachable), settings
        )
        answer: MXAnswer[PooledSession] = None
        for _ in range(max_requests(routed, envelope)):
            try:
                request = plan.send(answer)
            except StopIteration as done:
                results: list[RecipientResult] = done.value
                return results
            if isinstance(request, ReuseIdle):
                answer = self._reuse(request.key)
            elif isinstance(request, OpenSession):
                try:
                    answer = self._open(request.target, request.policy, request.tls)
                except DeliveryError as exc:
                    answer = exc
            elif isinstance(request, SendMessage):
                try:
                    answer = self._send(request.connection, message, request.envelope)
                except DeliveryError as exc:
                    answer = exc
            else:
                self._give_back(request.key, request.connection)
                answer = None
        raise AssertionError("a domain's plan made too many requests")

    def _reuse(self, key: Hashable) -> PooledSession | None:
        """An idle session for ``key`` that still works, or ``None``."""
        while True:
            with self._lock:
                connection, check, stale = self._pool.take(key, time.monotonic())
            quit_all(stale)
            if connection is None:
                return None
            if connection.driver.has_input():
                self._pool.policy.heard_while_idle()
                connection.driver.close()
                continue
            if not check:
                return connection
            try:
                healthy = connection.driver.run(connection.session.noop())
            except DeliveryError:
                healthy = False
            if healthy:
                return connection
            self._pool.policy.failed_check()
            connection.driver.close()

    def _give_back(self, key: Hashable, connection: PooledSession) -> None:
        with self._lock:
            leaving = self._pool.put(key, connection, time.monotonic())
        quit_all(leaving)

    def _open(self, target: Target, policy: MXPolicy, tls: TLS) -> PooledSession:
        connection = self._connect(target, self.settings.context(policy, tls, target), tls)
        host = dane_required(policy, target)
        if host is None or host.state is not HostState.AUTHENTICATE:
            return connection
        # RFC 7672 §3: the certificate is checked against the TLSA records before the
        # session carries anything (no MAIL FROM on an unauthenticated session).
        try:
            match = check_chain(host, connection.driver.peer_chain(), peer=target.peer)
        except TLSError:
            connection.driver.close()
            raise
        if match.trust_anchor is not None:
            # DANE-TA: OpenSSL verifies the chain to that certificate, and the name.
            connection.driver.close()
            try:
                connection = self._connect(target, trust_anchor_context(match.trust_anchor), tls)
            except TLSError as exc:
                raise dane_ta_failed(target, exc) from exc
        log.info("DANE: %s authenticated by its TLSA records: %s", target.peer, match)
        return connection

    def _connect(self, target: Target, context: ssl.SSLContext, tls: TLS) -> PooledSession:
        settings = self.settings
        driver = connect(
            target.address,
            target.port,
            timeouts=settings.timeouts,
            ssl_context=context,
            server_hostname=target.tls_name,
            source_address=settings.source_address,
            proxy=settings.proxy,
        )
        try:
            session = Session(settings.session_config(target, tls, driver.local_address))
            driver.run(session.open())
        except BaseException:
            driver.close()
            raise
        with self._lock:
            self._pool.opened += 1
        return PooledSession(driver, session)

    def _send(
        self, connection: PooledSession, message: Message, envelope: Envelope
    ) -> DeliveryResult:
        try:
            return connection.driver.run(connection.session.deliver(message, envelope))
        except DeliveryError as exc:
            connection.driver.close()
            if exc.reply is None and answer_lost(connection.session):
                # The exchanger had the whole message when the connection ended: it may
                # have taken it (RFC 1047). Sending it again, on a fresh session or to the
                # next exchanger, could deliver it twice: an answer that ends the search.
                return reply_lost(message, envelope, exc)
            raise
        except BaseException:
            connection.driver.close()
            raise
