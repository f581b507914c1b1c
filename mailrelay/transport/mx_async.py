"""Delivery straight to each recipient domain's mail exchangers, on asyncio.

The asyncio twin of :mod:`mailrelay.transport.mx`, with the same rules (read that module's
docstring); the planning and bookkeeping are shared, only the I/O loop is written again, with
the asyncio driver (:mod:`mailrelay.transport.async_driver`).

Differences:

* The domains of one envelope are delivered *concurrently*, at most ``concurrency`` at a
  time, each domain trying its targets one after the other. All domains are resolved first;
  then the domains whose first target has the same reuse key
  (:func:`~mailrelay.transport.mx.reuse_key`: the same exchanger under the same TLS
  decisions) form one *lane* and are sent one after the other, so they share one session
  instead of racing to open one each. Cancelling :meth:`AsyncMXTransport.adeliver` cancels
  every domain's attempt and closes its connection.
* The pool of idle sessions belongs to one event loop, with the SMTP pool's keeper task
  (:func:`~mailrelay.transport.async_smtp.keep_pool`): idle sessions expire in the
  background and are QUIT when the loop ends; ``aclose()`` QUITs them all at once; a
  transport that opened connections and is collected unclosed emits a ResourceWarning.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
import warnings
import weakref
from collections.abc import Hashable, Iterable
from typing import Any

from mailrelay.envelope import Envelope
from mailrelay.errors import ConfigurationError, DeliveryError, ResolverError, TLSError
from mailrelay.flow import Session
from mailrelay.message import Message
from mailrelay.options import TLS, Timeouts
from mailrelay.resolver import AsyncResolver, MailHosts
from mailrelay.results import DeliveryResult, RecipientResult
from mailrelay.transport.async_driver import connect
from mailrelay.transport.async_smtp import PooledSession, keep_pool, quit_all
from mailrelay.transport.base import AsyncTransport
from mailrelay.transport.dane import HostState, check_chain, trust_anchor_context
from mailrelay.transport.mx_plan import (
    DEFAULT_MAX_ADDRESSES,
    LOOPBACK_NETWORKS,
    MX_POOL,
    AsyncTLSPolicyHook,
    DomainPlan,
    MXAnswer,
    MXPolicy,
    MXSettings,
    Network,
    OpenSession,
    ReuseIdle,
    Route,
    SendMessage,
    Target,
    TLSReporter,
    Trail,
    Unreachable,
    dane_required,
    dane_ta_failed,
    deliver_plan,
    group_by_domain,
    literal_hosts,
    max_requests,
    merge,
    sub_envelope,
)
from mailrelay.transport.pooling import ExchangerPool, answer_lost, quit_timeout, reply_lost
from mailrelay.transport.proxy import Proxy
from mailrelay.transport.settings import PoolSettings

__all__ = ["DEFAULT_CONCURRENCY", "AsyncMXTransport", "amail_hosts_of"]

log = logging.getLogger(__name__)

#: The most domains of one envelope delivered at the same time.
DEFAULT_CONCURRENCY = 8


async def amail_hosts_of(resolver: AsyncResolver, domain: str) -> MailHosts | ResolverError:
    """The asyncio :func:`~mailrelay.transport.mx.mail_hosts_of`: an address literal's one
    host, or the resolver's answer (its :class:`~mailrelay.errors.ResolverError` returned)."""
    found = literal_hosts(domain)
    if found is not None:
        return found
    try:
        return await resolver.mail_hosts(domain)
    except ResolverError as exc:
        return exc


class AsyncMXTransport(AsyncTransport):
    """Deliver straight to each recipient domain's exchangers, on asyncio.

    Example::

        async with AsyncMXTransport() as mx:
            result = await mx.asend(message)

    Args:
        resolver: the :class:`~mailrelay.resolver.AsyncResolver` to ask; ``None`` makes one
            reading the system's resolver configuration.
        tls_policy: as :class:`~mailrelay.transport.mx.MXTransport`'s, or a coroutine
            function answering the same (awaited before the domain's delivery, so a policy
            that must be looked up, such as
            :class:`~mailrelay.transport.mtasts.AsyncMTASTS`'s, holds from the first one).
        concurrency: the most domains of one envelope delivered at the same time.
        pool: how sessions are reused (:data:`~mailrelay.transport.mx.MX_POOL`).
        tls_reporter: as :class:`~mailrelay.transport.mx.MXTransport`'s (it is called on
            the event loop; a :class:`~mailrelay.transport.tlsrpt.TLSReportCollector` never
            waits there).
        Other arguments: as :class:`~mailrelay.transport.mx.MXTransport`.

    Raises:
        ConfigurationError: when the settings cannot work.
    """

    def __init__(
        self,
        resolver: AsyncResolver | None = None,
        *,
        port: int = 25,
        tls: TLS = TLS.OPPORTUNISTIC,
        ssl_context: ssl.SSLContext | None = None,
        timeouts: Timeouts = Timeouts(),  # noqa: B008 -- an immutable value
        local_hostname: str | None = None,
        source_address: str | None = None,
        tls_policy: AsyncTLSPolicyHook | None = None,
        plaintext_fallback: bool = True,
        pipelining: bool = True,
        chunking: bool = False,
        max_addresses: int = DEFAULT_MAX_ADDRESSES,
        concurrency: int = DEFAULT_CONCURRENCY,
        pool: PoolSettings = MX_POOL,
        tls_reporter: TLSReporter | None = None,
        refused_networks: Iterable[str | Network] = LOOPBACK_NETWORKS,
        proxy: Proxy | str | None = None,
    ) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigurationError(f"concurrency must be at least 1, not {concurrency!r}")
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
        self.resolver = resolver if resolver is not None else AsyncResolver()
        self.concurrency = concurrency
        self._pool: ExchangerPool[PooledSession] = ExchangerPool(pool, logger=log)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._keeper: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<AsyncMXTransport {self.settings.describe()}>"

    def __del__(self, _warn: Any = warnings.warn) -> None:
        pool = getattr(self, "_pool", None)
        if pool is None or pool.closed or not pool.opened:
            return  # closed, never connected, or never fully constructed
        _warn(f"unclosed transport {self!r}: call aclose()", ResourceWarning, source=self)
        self._drop_idle()

    # -- the pool ----------------------------------------------------------------------------

    def _bind(self) -> None:
        """Tie the pool to the running loop (a new loop cannot use the old one's sessions)."""
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        self._drop_idle()
        self._loop = loop
        self._keeper = loop.create_task(
            keep_pool(weakref.ref(self), self._pool.settings.idle_timeout / 2),
            name="mailrelay MX pool",
        )

    def _drop_idle(self) -> None:
        for connection in self._pool.drain():
            try:
                connection.driver.close()
            except RuntimeError:  # pragma: no cover - the connection's loop is already closed
                log.debug("could not close a connection of a closed event loop")

    async def _expire_idle(self) -> None:
        await quit_all(self._pool.expired(time.monotonic()), self._quit_timeout)

    async def _end_idle(self) -> None:
        await quit_all(self._pool.drain(), self._quit_timeout)

    @property
    def _quit_timeout(self) -> float:
        return quit_timeout(self.settings.timeouts)

    async def aclose(self) -> None:
        """QUIT every idle session (all at once, bounded by the ``greeting`` limit) and close
        it; a session in use gets its QUIT when it is given back. Idempotent; never raises
        for a server's sake."""
        self._pool.closed = True
        keeper, self._keeper = self._keeper, None
        if self._loop is not None and self._loop is not asyncio.get_running_loop():
            self._drop_idle()  # another loop's sessions cannot be used from this one
            return
        if keeper is not None:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
        await quit_all(self._pool.drain(), self._quit_timeout)
        await asyncio.sleep(0)  # let the sockets' close callbacks run before the loop ends

    # -- delivery ----------------------------------------------------------------------------

    async def adeliver(self, message: Message, envelope: Envelope) -> DeliveryResult:
        """Deliver to every recipient's exchangers, domains concurrently (bounded).

        Returns:
            one result per envelope recipient, in envelope order (see
            :meth:`MXTransport.deliver <mailrelay.transport.mx.MXTransport.deliver>`).

        Raises:
            TransportClosed: the transport was closed (as for the SMTP transports).
        """
        if self._pool.closed:
            raise self._pool.policy.closed_error(type(self).__name__)
        self._bind()
        gate = asyncio.Semaphore(self.concurrency)
        groups = group_by_domain(envelope)
        unreachable = Unreachable()

        async def route(domain: str, part: Envelope) -> Route | list[RecipientResult]:
            async with gate:
                return await self._route(domain, part)

        async with asyncio.TaskGroup() as group:
            routing = [
                (domain, positions, part, group.create_task(route(domain, part)))
                for domain, positions in groups.items()
                for part in (sub_envelope(envelope, positions),)
            ]
        parts: list[tuple[list[int], list[RecipientResult]]] = []
        lanes: dict[Hashable, list[tuple[str, list[int], Envelope, Route]]] = {}
        for domain, positions, part, task in routing:
            routed = task.result()
            if isinstance(routed, list):
                parts.append((positions, routed))
                continue
            policy, targets = routed
            first = self.settings.reuse_key(targets[0], policy)
            lanes.setdefault(first, []).append((domain, positions, part, routed))

        async def lane(
            domains: list[tuple[str, list[int], Envelope, Route]],
        ) -> list[tuple[list[int], list[RecipientResult]]]:
            # Domains sharing their first exchanger go one after the other: the second
            # finds the first's session idle and sends on it.
            async with gate:
                return [
                    (positions, await self._deliver_domain(domain, routed, message, part, trail))
                    for domain, positions, part, routed in domains
                    for trail in (Trail(domain, unreachable),)
                ]

        async with asyncio.TaskGroup() as group:
            sending = [group.create_task(lane(domains)) for domains in lanes.values()]
        for lane_task in sending:
            parts.extend(lane_task.result())
        return merge(envelope, message, parts)

    async def _route(self, domain: str, envelope: Envelope) -> Route | list[RecipientResult]:
        """The domain's policy and targets, or its recipients' results (a DNS verdict)."""
        settings = self.settings
        policy = await settings.apolicy(domain, requiretls=envelope.requiretls)
        return settings.route(domain, envelope, policy, await amail_hosts_of(self.resolver, domain))

    async def _deliver_domain(
        self, domain: str, routed: Route, message: Message, envelope: Envelope, trail: Trail
    ) -> list[RecipientResult]:
        plan: DomainPlan[PooledSession] = deliver_plan(routed, envelope, trail, self.settings)
        answer: MXAnswer[PooledSession] = None
        for _ in range(max_requests(routed, envelope)):
            try:
                request = plan.send(answer)
            except StopIteration as done:
                results: list[RecipientResult] = done.value
                return results
            if isinstance(request, ReuseIdle):
                answer = await self._reuse(request.key)
            elif isinstance(request, OpenSession):
                try:
                    answer = await self._open(request.target, request.policy, request.tls)
                except DeliveryError as exc:
                    answer = exc
            elif isinstance(request, SendMessage):
                try:
                    answer = await self._send(request.connection, message, request.envelope)
                except DeliveryError as exc:
                    answer = exc
            else:
                await self._give_back(request.key, request.connection)
                answer = None
        raise AssertionError("a domain's plan made too many requests")

    async def _reuse(self, key: Hashable) -> PooledSession | None:
        """An idle session for ``key`` that still works, or ``None``."""
        while True:
            connection, check, stale = self._pool.take(key, time.monotonic())
            await quit_all(stale, self._quit_timeout)
            if connection is None:
                return None
            if connection.driver.has_input():
                self._pool.policy.heard_while_idle()
                connection.driver.close()
                continue
            if not check:
                return connection
            try:
                healthy = await connection.driver.run(connection.session.noop())
            except DeliveryError:
                healthy = False
            if healthy:
                return connection
            self._pool.policy.failed_check()
            connection.driver.close()

    async def _give_back(self, key: Hashable, connection: PooledSession) -> None:
        leaving = self._pool.put(key, connection, time.monotonic())
        await quit_all(leaving, self._quit_timeout)

    async def _open(self, target: Target, policy: MXPolicy, tls: TLS) -> PooledSession:
        connection = await self._connect(target, self.settings.context(policy, tls, target), tls)
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
                connection = await self._connect(
                    target, trust_anchor_context(match.trust_anchor), tls
                )
            except TLSError as exc:
                raise dane_ta_failed(target, exc) from exc
        log.info("DANE: %s authenticated by its TLSA records: %s", target.peer, match)
        return connection

    async def _connect(self, target: Target, context: ssl.SSLContext, tls: TLS) -> PooledSession:
        settings = self.settings
        driver = await connect(
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
            await driver.run(session.open())
        except BaseException:
            driver.close()
            raise
        self._pool.opened += 1
        return PooledSession(driver, session)

    async def _send(
        self, connection: PooledSession, message: Message, envelope: Envelope
    ) -> DeliveryResult:
        try:
            return await connection.driver.run(connection.session.deliver(message, envelope))
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
