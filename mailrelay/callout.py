"""SMTP callout: ask a recipient's own mail server whether it would take mail for an address.

Theory of operation: :meth:`Callout.probe_many` groups the addresses by domain and, per
domain, finds the mail exchangers exactly as MX delivery does (:mod:`mailrelay.transport.mx`:
RFC 5321 §5.1 order, failover after a connect failure, 421 or refused greeting), opens one
session with the dialogue (:mod:`mailrelay.flow`: greeting, EHLO, opportunistic STARTTLS) and
then runs a *probe*: ``MAIL FROM:<>`` (or the configured sender), one ``RCPT TO`` per address,
one more ``RCPT TO`` for a random local part at the same domain (catch-all detection), then
``RSET`` and ``QUIT``. ``DATA`` is never sent: nothing is delivered.

Rules:

* A result is :attr:`CalloutStatus.ACCEPTED` only for a 2xx RCPT reply and
  :attr:`CalloutStatus.REFUSED` only for a 5xx RCPT reply (RFC 5321 §4.2.1: permanent).
  Everything else is :attr:`CalloutStatus.UNKNOWN`, with the reply or a ``detail``: a 4xx
  (greylisting, RFC 6647, answers 4xx to the first attempt of every unknown client on
  purpose), a refused ``MAIL`` (the server refuses *us*, not the address), a session that
  ended early, no exchanger reachable, or DNS trouble. A callout never guesses.
* Catch-all detection: when the random local part is accepted too, the domain accepts
  everything at RCPT time (and may bounce later), so an ACCEPTED result carries
  ``catch_all=True`` and proves nothing about the mailbox. ``catch_all`` is ``False`` when the
  random local part got a 5xx, ``None`` when we could not tell.
* Bounded: one session per domain per call; at most ``max_recipients`` RCPTs per transaction
  (RFC 5321 §4.5.3.1.8 makes servers accept at least 100), the decoy on top, and never more
  than a server announces in ``LIMITS RCPTMAX`` (RFC 9422), the decoy included (left out
  when only one RCPT fits); RSET between transactions;
  every wait is bounded by ``timeouts``; at most ``max_addresses`` exchanger addresses tried.
* Through a proxy, as MX delivery (:class:`~mailrelay.transport.mx_plan.Unreachable`): a
  failure about the proxy itself (it cannot be reached at all, or it refuses our login or
  does not speak its protocol: :func:`~mailrelay.transport.mx_plan.proxy_failed`) is
  remembered for the rest of the call, and every further exchanger, of this domain and of
  the call's other domains, is reported as not tried, with that error, instead of waiting
  out its own connect timeout or asking the proxy for the same refusal. A proxy's failure
  about one exchanger (it could not reach it, or its rules forbid it) moves on to the next.

Caveats (say them to your users):

* Servers that accept everything at RCPT time (catch-alls, many large providers, and anyone
  who answers after DATA) make ACCEPTED weak; only REFUSED is strong evidence.
* Greylisting answers 4xx on the first attempt: UNKNOWN, not REFUSED.
* Probing looks like a directory-harvest attack: many callouts from one address get it
  rate-limited or **blocklisted**, which then hurts that address's real mail. Probe from a
  host that does not send your mail, slowly, and cache the answers.
* Port 25 is blocked outbound on most consumer and many cloud networks.

The probe is the dialogue's own :meth:`Session.probe <mailrelay.flow.Session.probe>` step
(MAIL, RCPTs, RSET; never DATA); see :func:`_probe`. Every decision is written once, for both
classes: which exchanger to try next and what a failure means (``_CalloutBase._plan``, a
generator), and the probes of one session (``_CalloutBase._probe_all``, a dialogue step);
:class:`Callout` and :class:`AsyncCallout` only connect, look up and wait.
"""

from __future__ import annotations

import enum
import logging
import random as _random
from collections.abc import Generator, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import attrs

from mailrelay._shown import Shown
from mailrelay.address import Address
from mailrelay.errors import ConfigurationError, DeliveryError, ResolverError, TLSError
from mailrelay.flow import Session, Step
from mailrelay.options import TLS, Timeouts
from mailrelay.reply import Reply
from mailrelay.resolver import AsyncResolver, MailHosts, Resolver
from mailrelay.transport import async_driver, sync_driver
from mailrelay.transport.mx_async import amail_hosts_of
from mailrelay.transport.mx_plan import (
    LOOPBACK_NETWORKS,
    MXSettings,
    Network,
    Target,
    Unreachable,
    Verdict,
    fallback,
    mail_hosts_of,
    proxy_failed,
)
from mailrelay.transport.proxy import Proxy

if TYPE_CHECKING:
    import ssl  # noqa: TID251 -- annotations only, never imported at run time

__all__ = [
    "DEFAULT_TIMEOUTS",
    "AsyncCallout",
    "Callout",
    "CalloutResult",
    "CalloutStatus",
    "acallout",
    "callout",
]

log = logging.getLogger(__name__)

#: Probing should not wait the minutes RFC 5321 §4.5.3.2 allows a real delivery.
DEFAULT_TIMEOUTS: Final = Timeouts(
    connect=10, greeting=30, mail=30, rcpt=30, data_init=30, data_block=30, data_end=30
)
#: RCPTs per transaction (RFC 5321 §4.5.3.1.8: servers take at least 100).
DEFAULT_MAX_RECIPIENTS: Final = 50
#: Exchanger addresses tried per domain.
DEFAULT_MAX_ADDRESSES: Final = 3


class CalloutStatus(enum.Enum):
    """What the recipient's server said about an address."""

    #: RCPT got a 2xx reply (see ``catch_all`` before trusting it).
    ACCEPTED = "accepted"
    #: RCPT got a 5xx reply: the server refuses mail for this address.
    REFUSED = "refused"
    #: No verdict: a 4xx reply (greylisting?), MAIL refused, no server reached, DNS trouble.
    UNKNOWN = "unknown"


@attrs.frozen(kw_only=True)
class CalloutResult:
    """The answer of one probe.

    Attributes:
        address: the address probed.
        status: accepted, refused or unknown.
        reply: the reply that decided it (the RCPT reply, or MAIL's when MAIL was refused).
        host: the exchanger that answered (``name[address]:port``), when one did.
        catch_all: ``True`` when the server also accepted a random local part at the same
            domain (so acceptance proves nothing), ``False`` when it refused it, ``None``
            when that could not be told.
        detail: a human-readable explanation.
    """

    address: Address
    status: CalloutStatus
    reply: Reply | None = None
    host: str | None = None
    catch_all: bool | None = None
    detail: str = ""

    @property
    def refused(self) -> bool:
        """Whether the server refused the address (a 5xx to RCPT)."""
        return self.status is CalloutStatus.REFUSED

    @property
    def conclusive(self) -> bool:
        """A refusal, or an acceptance by a server known not to accept everything."""
        if self.status is CalloutStatus.REFUSED:
            return True
        return self.status is CalloutStatus.ACCEPTED and self.catch_all is False


@attrs.frozen(kw_only=True)
class _Probe:
    """What one probe transaction got: ``None`` for replies that never came."""

    mail: Reply | None
    rcpts: tuple[Reply | None, ...]
    decoy: Reply | None
    ended: str = ""


def _probe(
    session: Session, sender: Address | None, recipients: Sequence[Address], decoy: Address | None
) -> Step[_Probe]:
    """MAIL, one RCPT per recipient and the decoy, then RSET: never DATA
    (:meth:`Session.probe <mailrelay.flow.Session.probe>`)."""
    asked = [*recipients, *([decoy] if decoy is not None else [])]
    probe = yield from session.probe(sender, asked)
    replies = list(probe.recipients)
    decoy_reply = replies.pop() if decoy is not None else None
    ended = "the server ended the session during the probe" if probe.ended else ""
    return _Probe(mail=probe.mail, rcpts=tuple(replies), decoy=decoy_reply, ended=ended)


def _judge(recipients: Sequence[Address], probe: _Probe, host: str) -> list[CalloutResult]:
    catch_all: bool | None = None
    if probe.decoy is not None and probe.decoy.is_positive:
        catch_all = True
    elif probe.decoy is not None and probe.decoy.is_permanent:
        catch_all = False
    results = []
    for address, reply in zip(recipients, probe.rcpts, strict=True):
        if probe.mail is None or not probe.mail.is_positive:
            results.append(
                CalloutResult(
                    address=address,
                    status=CalloutStatus.UNKNOWN,
                    reply=probe.mail,
                    host=host,
                    detail="the server refused our MAIL FROM (it refuses the prober, "
                    "not the address)"
                    if probe.mail is not None
                    else probe.ended or "no reply to MAIL FROM",
                )
            )
        elif reply is None:
            # Unanswered with MAIL accepted and the session going on: never asked, since
            # the address needs SMTPUTF8 and the server does not offer it.
            unasked = "the server does not offer SMTPUTF8 (RFC 6531), which this address needs"
            results.append(
                CalloutResult(
                    address=address,
                    status=CalloutStatus.UNKNOWN,
                    host=host,
                    catch_all=catch_all,
                    detail=probe.ended
                    or (unasked if address.needs_smtputf8 else "no reply to RCPT"),
                )
            )
        else:
            if reply.is_positive:
                status = CalloutStatus.ACCEPTED
                detail = (
                    "accepted, but so is a random address: the server accepts everything"
                    if catch_all
                    else "accepted"
                )
            elif reply.is_permanent:
                status, detail = CalloutStatus.REFUSED, "refused"
            else:
                status = CalloutStatus.UNKNOWN
                detail = "a temporary refusal (greylisting?): ask again later"
            results.append(
                CalloutResult(
                    address=address,
                    status=status,
                    reply=reply,
                    host=host,
                    catch_all=catch_all,
                    detail=detail,
                )
            )
    return results


#: One domain's callout (:meth:`_CalloutBase._plan`): yields what to probe, receives how it went.
_DomainPlan: TypeAlias = Generator[
    tuple[Target, TLS], list[CalloutResult] | DeliveryError | None, list[CalloutResult]
]


def _unknown(recipients: Iterable[Address], detail: str) -> list[CalloutResult]:
    return [
        CalloutResult(address=a, status=CalloutStatus.UNKNOWN, detail=detail) for a in recipients
    ]


def _batches(items: Sequence[Address], size: int) -> list[Sequence[Address]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class _CalloutBase:
    def __init__(
        self,
        *,
        sender: str | Address | None,
        port: int,
        tls: TLS,
        ssl_context: ssl.SSLContext | None,
        timeouts: Timeouts,
        local_hostname: str | None,
        detect_catch_all: bool,
        max_recipients: int,
        max_addresses: int,
        random: _random.Random | None,
        source_address: str | None = None,
        refused_networks: Iterable[str | Network] = LOOPBACK_NETWORKS,
        proxy: Proxy | str | None = None,
    ) -> None:
        self.sender: Address | None
        if sender is None or sender == "":
            self.sender = None  # the null reverse-path <>
        elif isinstance(sender, Address):
            self.sender = sender
        else:
            self.sender = Address.parse(sender)
        self.settings = MXSettings(
            port=port,
            tls=tls,
            ssl_context=ssl_context,
            timeouts=timeouts,
            local_hostname=local_hostname,
            source_address=source_address,
            tls_policy=None,
            plaintext_fallback=True,
            pipelining=False,
            chunking=False,
            max_addresses=max_addresses,
            refused=refused_networks,
            proxy=proxy,
        )
        if max_recipients < 1:
            raise ConfigurationError("max_recipients must be at least 1")
        self.detect_catch_all = detect_catch_all
        self.max_recipients = max_recipients
        self._random = random if random is not None else _random.SystemRandom()

    def _group(
        self, addresses: Iterable[str | Address]
    ) -> tuple[list[Address], dict[str, list[int]]]:
        parsed = [a if isinstance(a, Address) else Address.parse(a) for a in addresses]
        groups: dict[str, list[int]] = {}
        for index, address in enumerate(parsed):
            groups.setdefault(address.ascii_domain.lower(), []).append(index)
        return parsed, groups

    def _decoy(self, domain: str) -> Address | None:
        if not self.detect_catch_all:
            return None
        token = "".join(
            self._random.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(16)
        )
        return Address.parse(f"nobody-{token}@{domain}")

    def _plan(
        self,
        domain: str,
        found: MailHosts | ResolverError,
        recipients: Sequence[Address],
        unreachable: Unreachable | None = None,
    ) -> _DomainPlan:
        """One domain's callout, every decision of it: yields the (target, TLS mode) to probe
        next and receives the results or the :class:`~mailrelay.errors.DeliveryError` that
        stopped the session; returns the recipients' results.

        The exchangers are tried in order (RFC 5321 §5.1, as MX delivery does); a failed
        handshake is retried in plain text when the policy allows (RFC 7435 §3); any other
        failure moves on to the next exchanger, except a failure about the proxy itself
        (:func:`~mailrelay.transport.mx_plan.proxy_failed`): it is kept in ``unreachable``
        (shared by the domains of one call; a fresh one by default), and every further
        exchanger is reported as not tried, with that error.
        """
        if unreachable is None:
            unreachable = Unreachable()
        if isinstance(found, ResolverError):
            return _unknown(recipients, f"DNS lookup failed: {found}")
        policy = self.settings.default
        targets = self.settings.plan(domain, found, policy)
        if isinstance(targets, Verdict):
            return _unknown(recipients, f"no server to ask: {targets.reason}")
        failures = []
        for target in targets:
            # Only the proxy's own failures are kept (Unreachable remembers what it is
            # given): through a dead or refusing proxy, no exchanger can be reached.
            earlier = unreachable.get(target)
            if earlier is not None:
                failures.append(f"{target.peer}: not tried, the proxy failed: {earlier}")
                continue
            tls = policy.tls
            for _ in range(2):  # with TLS, then (after a failed handshake) in plain text
                outcome = yield target, tls
                if not isinstance(outcome, DeliveryError):
                    assert outcome is not None, "an attempt gives results or an error"
                    return outcome
                failures.append(f"{target.peer}: {outcome}")
                if proxy_failed(outcome):
                    unreachable.add(target, outcome)
                if not isinstance(outcome, TLSError) or not fallback(policy, tls):
                    break
                tls = TLS.NONE
        return _unknown(recipients, "no exchanger answered: " + "; ".join(failures))

    def _probe_all(
        self, session: Session, domain: str, recipients: Sequence[Address], peer: str
    ) -> Step[list[CalloutResult]]:
        """Probe every recipient on an open session, ``max_recipients`` per transaction,
        with the catch-all decoy in the first."""
        results: list[CalloutResult] = []
        decoy: Address | None = self._decoy(domain)
        size = first = self.max_recipients
        announced = session.extensions.rcpt_max
        if announced is not None:
            # RFC 9422: the server takes at most RCPTMAX RCPTs a transaction, the decoy's
            # included; with room for only one, the decoy is left out (catch_all unknown).
            size = first = min(size, announced)
            if decoy is not None and size + 1 > announced:
                first = size - 1
                if not first:
                    decoy, first = None, size
        batches = [recipients[:first], *_batches(recipients[first:], size)]
        for batch in batches:
            if session.closed:
                results += _unknown(batch, "the server ended the session")
                continue
            probe = yield from _probe(session, self.sender, batch, decoy)
            results += _judge(batch, probe, peer)
            decoy = None  # once per domain is enough
        _carry_catch_all(results)
        return results

    @staticmethod
    def _merge(
        parsed: list[Address], parts: Iterable[tuple[list[int], list[CalloutResult]]]
    ) -> list[CalloutResult]:
        merged: list[CalloutResult | None] = [None] * len(parsed)
        for positions, results in parts:
            for index, result in zip(positions, results, strict=True):
                merged[index] = result
        return [r for r in merged if r is not None]


class Callout(_CalloutBase):
    """SMTP callouts, blocking (read the module docstring's caveats first).

    Example::

        callout = Callout(resolver, sender="probe@example.com", local_hostname="probe.example.com")
        result = callout.probe("someone@example.org")
        if result.status is CalloutStatus.REFUSED: ...

    Args:
        resolver: the :class:`~mailrelay.resolver.Resolver` to find the exchangers with.
        sender: the MAIL FROM address; ``None`` (the default) sends the null path ``<>``,
            which servers must accept (RFC 5321 §4.5.5) but some refuse.
        port: the exchangers' port (25; a loopback port in tests).
        tls: ``TLS.OPPORTUNISTIC`` (default), ``TLS.STARTTLS`` or ``TLS.NONE``.
        ssl_context: the verifying context for ``TLS.STARTTLS``.
        timeouts: per-phase limits (shorter than a delivery's by default).
        local_hostname: the EHLO name (give the probing host's real name: servers check it).
        source_address: the local IP address to probe from (one that does not send your
            mail: see the caveats above); by default the system's choice.
        detect_catch_all: also probe a random local part at each domain.
        max_recipients: RCPTs per transaction.
        max_addresses: exchanger addresses tried per domain.
        random: the source of the random local part (tests inject a seeded one).
        refused_networks: exchanger addresses never probed, as for
            :class:`~mailrelay.transport.mx.MXTransport` (loopback by default; ``()`` for a
            test server on loopback).
        proxy: probe through this outbound proxy, as
            :class:`~mailrelay.transport.mx.MXTransport` delivers (needs ``local_hostname``).
            A proxy's failure about one exchanger (it could not reach it, or its rules
            forbid it) moves on to the next; one about the proxy itself (it cannot be
            reached, refuses our login, or does not speak its protocol) ends the probe's
            attempts, for every domain of the ``probe_many`` call: the remaining exchangers
            are not tried, and the results are ``UNKNOWN`` with the proxy's error (never its
            password) in ``detail``.
    """

    def __init__(
        self,
        resolver: Resolver | None = None,
        *,
        sender: str | Address | None = None,
        port: int = 25,
        tls: TLS = TLS.OPPORTUNISTIC,
        ssl_context: ssl.SSLContext | None = None,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        local_hostname: str | None = None,
        source_address: str | None = None,
        detect_catch_all: bool = True,
        max_recipients: int = DEFAULT_MAX_RECIPIENTS,
        max_addresses: int = DEFAULT_MAX_ADDRESSES,
        random: _random.Random | None = None,
        refused_networks: Iterable[str | Network] = LOOPBACK_NETWORKS,
        proxy: Proxy | str | None = None,
    ) -> None:
        super().__init__(
            sender=sender, port=port, tls=tls, ssl_context=ssl_context, timeouts=timeouts,
            local_hostname=local_hostname, source_address=source_address,
            detect_catch_all=detect_catch_all,
            max_recipients=max_recipients, max_addresses=max_addresses, random=random,
            refused_networks=refused_networks, proxy=proxy,
        )  # fmt: skip
        self.resolver = resolver if resolver is not None else Resolver()

    def probe(self, address: str | Address) -> CalloutResult:
        """Probe one address.

        Raises:
            InvalidAddress: when ``address`` is not a valid address.
        """
        return self.probe_many([address])[0]

    def probe_many(self, addresses: Iterable[str | Address]) -> list[CalloutResult]:
        """Probe many addresses, one session per domain; results in input order.

        Raises:
            InvalidAddress: when an address is not valid (before anything is sent).
        """
        parsed, groups = self._group(addresses)
        parts = []
        unreachable = Unreachable()  # the proxy's own failure, for every domain of the call
        for domain, positions in groups.items():
            recipients = [parsed[i] for i in positions]
            parts.append((positions, self._domain(domain, recipients, unreachable)))
        return self._merge(parsed, parts)

    def _domain(
        self, domain: str, recipients: list[Address], unreachable: Unreachable
    ) -> list[CalloutResult]:
        found = mail_hosts_of(self.resolver, domain)
        plan = self._plan(domain, found, recipients, unreachable)
        outcome: list[CalloutResult] | DeliveryError | None = None
        for _ in range(2 * self.settings.max_addresses + 1):
            try:
                target, tls = plan.send(outcome)
            except StopIteration as done:
                results: list[CalloutResult] = done.value
                return results
            try:
                outcome = self._session(target, tls, domain, recipients)
            except DeliveryError as exc:
                outcome = exc
        raise AssertionError("a callout plan made too many attempts")

    def _session(
        self, target: Target, tls: TLS, domain: str, recipients: list[Address]
    ) -> list[CalloutResult]:
        settings = self.settings
        driver = sync_driver.connect(
            target.address,
            target.port,
            timeouts=settings.timeouts,
            ssl_context=settings.context(settings.default, tls),
            server_hostname=target.tls_name,
            source_address=settings.source_address,
            proxy=settings.proxy,
        )
        try:
            session = Session(settings.session_config(target, tls, driver.local_address))
            driver.run(session.open())
            results = driver.run(self._probe_all(session, domain, recipients, target.peer))
            try:
                driver.run(session.quit())
            except DeliveryError as exc:
                log.debug("QUIT to %s failed: %s", target.peer, Shown(exc))
            return results
        finally:
            driver.close()


class AsyncCallout(_CalloutBase):
    """SMTP callouts on asyncio: :class:`Callout` with awaited methods.

    Args:
        resolver: the :class:`~mailrelay.resolver.AsyncResolver` to find the exchangers with.
        Other arguments: as :class:`Callout`.
    """

    def __init__(
        self,
        resolver: AsyncResolver | None = None,
        *,
        sender: str | Address | None = None,
        port: int = 25,
        tls: TLS = TLS.OPPORTUNISTIC,
        ssl_context: ssl.SSLContext | None = None,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        local_hostname: str | None = None,
        source_address: str | None = None,
        detect_catch_all: bool = True,
        max_recipients: int = DEFAULT_MAX_RECIPIENTS,
        max_addresses: int = DEFAULT_MAX_ADDRESSES,
        random: _random.Random | None = None,
        refused_networks: Iterable[str | Network] = LOOPBACK_NETWORKS,
        proxy: Proxy | str | None = None,
    ) -> None:
        super().__init__(
            sender=sender, port=port, tls=tls, ssl_context=ssl_context, timeouts=timeouts,
            local_hostname=local_hostname, source_address=source_address,
            detect_catch_all=detect_catch_all,
            max_recipients=max_recipients, max_addresses=max_addresses, random=random,
            refused_networks=refused_networks, proxy=proxy,
        )  # fmt: skip
        self.resolver = resolver if resolver is not None else AsyncResolver()

    async def probe(self, address: str | Address) -> CalloutResult:
        """Probe one address; see :meth:`Callout.probe`."""
        return (await self.probe_many([address]))[0]

    async def probe_many(self, addresses: Iterable[str | Address]) -> list[CalloutResult]:
        """Probe many addresses, one session per domain, domains one after the other.

        Domains are probed in turn rather than all at once: a burst of callouts is what gets
        a prober blocklisted.
        """
        parsed, groups = self._group(addresses)
        parts = []
        unreachable = Unreachable()  # the proxy's own failure, for every domain of the call
        for domain, positions in groups.items():
            recipients = [parsed[i] for i in positions]
            parts.append((positions, await self._domain(domain, recipients, unreachable)))
        return self._merge(parsed, parts)

    async def _domain(
        self, domain: str, recipients: list[Address], unreachable: Unreachable
    ) -> list[CalloutResult]:
        found = await amail_hosts_of(self.resolver, domain)
        plan = self._plan(domain, found, recipients, unreachable)
        outcome: list[CalloutResult] | DeliveryError | None = None
        for _ in range(2 * self.settings.max_addresses + 1):
            try:
                target, tls = plan.send(outcome)
            except StopIteration as done:
                results: list[CalloutResult] = done.value
                return results
            try:
                outcome = await self._session(target, tls, domain, recipients)
            except DeliveryError as exc:
                outcome = exc
        raise AssertionError("a callout plan made too many attempts")

    async def _session(
        self, target: Target, tls: TLS, domain: str, recipients: list[Address]
    ) -> list[CalloutResult]:
        settings = self.settings
        driver = await async_driver.connect(
            target.address,
            target.port,
            timeouts=settings.timeouts,
            ssl_context=settings.context(settings.default, tls),
            server_hostname=target.tls_name,
            source_address=settings.source_address,
            proxy=settings.proxy,
        )
        try:
            session = Session(settings.session_config(target, tls, driver.local_address))
            await driver.run(session.open())
            results = await driver.run(self._probe_all(session, domain, recipients, target.peer))
            try:
                await driver.run(session.quit())
            except DeliveryError as exc:
                log.debug("QUIT to %s failed: %s", target.peer, Shown(exc))
            return results
        finally:
            driver.close()


def _carry_catch_all(results: list[CalloutResult]) -> None:
    """The decoy went with the first batch; later batches of the domain learn its answer."""
    known = next((r.catch_all for r in results if r.catch_all is not None), None)
    if known is None:
        return
    for index, result in enumerate(results):
        if result.catch_all is None and result.status is not CalloutStatus.UNKNOWN:
            results[index] = attrs.evolve(
                result,
                catch_all=known,
                detail=(
                    "accepted, but so is a random address: the server accepts everything"
                    if known and result.status is CalloutStatus.ACCEPTED
                    else result.detail
                ),
            )


def callout(
    address: str | Address, resolver: Resolver | None = None, **options: Any
) -> CalloutResult:
    """Probe one address with a one-off :class:`Callout` (``options`` as its arguments)."""
    return Callout(resolver, **options).probe(address)


async def acallout(
    address: str | Address, resolver: AsyncResolver | None = None, **options: Any
) -> CalloutResult:
    """Probe one address with a one-off :class:`AsyncCallout` (``options`` as its arguments)."""
    return await AsyncCallout(resolver, **options).probe(address)
