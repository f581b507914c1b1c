"""Delivery straight to each recipient domain's mail exchangers, on asyncio.

The asyncio twin of :mod:`mailrelay.transport.mx`, with the same rules (read that module's
docstring); the planning and bookkeeping are shared, only the I/O loop is written again, with
the asyncio driver (:mod:`mailrelay.transport.async_driver`).

One difference: the domains of one envelope are delivered *concurrently*, at most
``concurrency`` at a time, each domain trying its targets one after the other. Cancelling
:meth:`AsyncMXTransport.adeliver` cancels every domain's attempt and closes its connection.
"""

from __future__ import annotations

import asyncio
import logging
import ssl

from mailrelay.address import Address
from mailrelay.envelope import Envelope
from mailrelay.errors import ConfigurationError, DeliveryError, ResolverError, TLSError
from mailrelay.flow import Session
from mailrelay.message import Message
from mailrelay.options import TLS, Timeouts
from mailrelay.resolver import AsyncResolver
from mailrelay.results import DeliveryResult, RecipientResult
from mailrelay.transport.async_driver import connect
from mailrelay.transport.base import AsyncTransport
from mailrelay.transport.mx import (
    DEFAULT_MAX_ADDRESSES,
    MXPolicy,
    MXSettings,
    Target,
    TLSPolicyHook,
    Trail,
    Verdict,
    fallback,
    group_by_domain,
    literal_hosts,
    merge,
    sub_envelope,
    transient_failure,
    with_host,
)

__all__ = ["DEFAULT_CONCURRENCY", "AsyncMXTransport"]

log = logging.getLogger(__name__)

#: The most domains of one envelope delivered at the same time.
DEFAULT_CONCURRENCY = 8


class AsyncMXTransport(AsyncTransport):
    """Deliver straight to each recipient domain's exchangers, on asyncio.

    Example::

        async with AsyncMXTransport() as mx:
            result = await mx.asend(message)

    Args:
        resolver: the :class:`~mailrelay.resolver.AsyncResolver` to ask; ``None`` makes one
            reading the system's resolver configuration.
        concurrency: the most domains of one envelope delivered at the same time.
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
        tls_policy: TLSPolicyHook | None = None,
        plaintext_fallback: bool = True,
        pipelining: bool = True,
        chunking: bool = False,
        max_addresses: int = DEFAULT_MAX_ADDRESSES,
        concurrency: int = DEFAULT_CONCURRENCY,
    ) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigurationError(f"concurrency must be at least 1, not {concurrency!r}")
        self.settings = MXSettings(
            port=port,
            tls=tls,
            ssl_context=ssl_context,
            timeouts=timeouts,
            local_hostname=local_hostname,
            tls_policy=tls_policy,
            plaintext_fallback=plaintext_fallback,
            pipelining=pipelining,
            chunking=chunking,
            max_addresses=max_addresses,
        )
        self.resolver = resolver if resolver is not None else AsyncResolver()
        self.concurrency = concurrency

    def __repr__(self) -> str:
        return f"<AsyncMXTransport {self.settings.describe()}>"

    async def adeliver(self, message: Message, envelope: Envelope) -> DeliveryResult:
        """Deliver to every recipient's exchangers, domains concurrently (bounded).

        Returns:
            one result per envelope recipient, in envelope order (see
            :meth:`MXTransport.deliver <mailrelay.transport.mx.MXTransport.deliver>`).
        """
        gate = asyncio.Semaphore(self.concurrency)
        groups = group_by_domain(envelope)

        async def one(domain: str, positions: list[int]) -> list[RecipientResult]:
            async with gate:
                return await self._deliver_domain(
                    domain, message, sub_envelope(envelope, positions)
                )

        async with asyncio.TaskGroup() as group:
            tasks = [
                (positions, group.create_task(one(domain, positions)))
                for domain, positions in groups.items()
            ]
        return merge(envelope, message, [(positions, task.result()) for positions, task in tasks])

    async def _deliver_domain(
        self, domain: str, message: Message, envelope: Envelope
    ) -> list[RecipientResult]:
        recipients: list[Address] = [r.address for r in envelope.recipients]
        settings = self.settings
        policy = settings.policy(domain, requiretls=envelope.requiretls)
        found = literal_hosts(domain)
        if found is None:
            try:
                found = await self.resolver.mail_hosts(domain)
            except ResolverError as exc:
                verdict = settings.plan(domain, exc, policy)
                assert isinstance(verdict, Verdict)
                return verdict.results(recipients)
        targets = settings.plan(domain, found, policy)
        if isinstance(targets, Verdict):
            return targets.results(recipients)
        trail = Trail(domain)
        for target in targets:
            result = await self._try(target, policy, message, envelope, trail)
            if result is not None:
                return with_host(result.recipients, target.peer)
        return trail.results(recipients)

    async def _try(
        self,
        target: Target,
        policy: MXPolicy,
        message: Message,
        envelope: Envelope,
        trail: Trail,
    ) -> DeliveryResult | None:
        tls = policy.tls
        for _ in range(2):  # at most: once with TLS, once in plain text
            try:
                return await self._session(target, policy, tls, message, envelope)
            except TLSError as exc:
                if fallback(policy, tls):
                    trail.notes.append(f"{target.peer}: {exc} (retried without TLS)")
                    tls = TLS.NONE
                    continue
                trail.failed(target, exc, transient=True)  # RFC 8461 §5
                return None
            except DeliveryError as exc:
                trail.failed(target, exc, transient=transient_failure(exc))
                return None
        return None  # pragma: no cover - the loop returns on its second pass

    async def _session(
        self,
        target: Target,
        policy: MXPolicy,
        tls: TLS,
        message: Message,
        envelope: Envelope,
    ) -> DeliveryResult:
        settings = self.settings
        driver = await connect(
            target.address,
            target.port,
            timeouts=settings.timeouts,
            ssl_context=settings.context(policy, tls),
            server_hostname=target.tls_name,
        )
        try:
            session = Session(settings.session_config(target, tls, driver.local_address))
            await driver.run(session.open())
            result = await driver.run(session.deliver(message, envelope))
            try:
                await driver.run(session.quit())
            except DeliveryError as exc:
                log.debug("QUIT to %s failed: %s", target.peer, exc)
            return result
        finally:
            driver.close()
