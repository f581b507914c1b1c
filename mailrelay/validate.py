"""Recipient validation: is an address worth sending to, judged by its syntax and the DNS?

Rules of this module:

- Syntax first: an address that :meth:`Address.parse <mailrelay.address.Address.parse>`
  refuses is ``BAD_SYNTAX`` and no DNS query is made.
- Special-use names next (RFC 6761 §6: ``test``, ``example``, ``invalid``, ``localhost`` and
  ``example.com/net/org``; RFC 6762 ``local``; RFC 7686 ``onion``; RFC 8375 ``home.arpa``;
  RFC 9476 ``alt``): no public mail goes there, so they are ``SPECIAL_USE_DOMAIN`` without a
  query. The set is a parameter, so tests can allow ``.test``.
- Address literals (``user@[192.0.2.1]``) name no domain to look up: ``UNKNOWN`` with reason
  ``ADDRESS_LITERAL``. Whether to mail a bare IP address is the caller's policy, not a fact
  the DNS can confirm.
- Then the domain's mail hosts (RFC 5321 §5.1, via :mod:`mailrelay.resolver`): NXDOMAIN is
  ``NO_SUCH_DOMAIN``, RFC 7505 null MX is ``NULL_MX``, no MX and no address (or no exchanger
  with an address) is ``NO_MAIL_HOST``: all ``UNDELIVERABLE``, because the DNS said so.
- A domain whose mail hosts' addresses all lie in ``refused_networks`` (loopback by default,
  as :class:`~mailrelay.transport.mx.MXTransport` refuses them) is ``REFUSED_MAIL_HOST``,
  ``UNDELIVERABLE``: MX delivery would not connect to any of them (an MX at 127.0.0.1 is
  also how some domains said "no mail" before RFC 7505's null MX).
- DNS trouble (timeouts, SERVFAIL, REFUSED, or exchangers whose lookups failed while none
  resolved) is ``TEMPFAIL`` with verdict ``UNKNOWN``: never ``UNDELIVERABLE`` (a broken
  resolver must not purge a list) and never ``DELIVERABLE`` (a bad address must not pass
  because a lookup timed out).
- ``validate_many`` keeps input order, looks each domain up once, and runs at most
  ``concurrency`` lookups at a time (threads for the blocking validator, tasks for the
  async one). Its ``timeout`` bounds the whole call: a domain not looked up by then is
  ``TEMPFAIL`` (we could not tell in time), never a hard verdict; the lookups still
  running end in the background within their own timeouts, and their answers are cached.
- An SMTP callout (:mod:`mailrelay.callout`) is off by default. When one is given, every
  ``DELIVERABLE`` address is also probed at its mail server (RCPT, never DATA); a 5xx to RCPT
  makes it ``UNDELIVERABLE`` with reason ``MAILBOX_REFUSED``; any other answer keeps the DNS
  verdict, and the probe's result is in :attr:`Validation.callout`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import math
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Final, cast

import attrs

from mailrelay.address import Address
from mailrelay.errors import ConfigurationError, InvalidAddress, ResolverError
from mailrelay.resolver import AsyncResolver, DNSStatus, MailHosts, Resolver, _start_each
from mailrelay.transport.mx_plan import LOOPBACK_NETWORKS, Network, is_refused, refused_networks

if TYPE_CHECKING:
    # Only for annotations: the validator calls the callout it is given, and importing the
    # transports here would cost every validator user their import time.
    from mailrelay.callout import AsyncCallout, Callout, CalloutResult

__all__ = [
    "DEFAULT_SPECIAL_USE",
    "AsyncRecipientValidator",
    "Reason",
    "RecipientValidator",
    "Validation",
    "Verdict",
]

#: Domains (and everything below them) that never receive public mail.
DEFAULT_SPECIAL_USE: Final = frozenset(
    {
        # RFC 6761 §6.2-6.5
        "test",
        "localhost",
        "invalid",
        "example",
        "example.com",
        "example.net",
        "example.org",
        # RFC 6762 §3 (multicast DNS)
        "local",
        # RFC 7686 (Tor)
        "onion",
        # RFC 8375 (home networks)
        "home.arpa",
        # RFC 9476 (alternative name systems)
        "alt",
    }
)

DEFAULT_CONCURRENCY: Final = 32


class Verdict(enum.Enum):
    """Whether mail to an address can be expected to reach a mail server."""

    #: Syntax is fine and the domain has a mail host with an address.
    DELIVERABLE = "deliverable"
    #: Mail cannot be delivered: bad syntax, or the DNS says the domain takes no mail.
    UNDELIVERABLE = "undeliverable"
    #: We could not tell (DNS trouble, an address literal).
    UNKNOWN = "unknown"


class Reason(enum.Enum):
    """Why a :class:`Validation` has its verdict."""

    #: The domain has at least one mail host with an address.
    OK = "ok"
    #: The text is not a valid envelope address (no DNS query was made).
    BAD_SYNTAX = "bad-syntax"
    #: The domain is special-use (RFC 6761 and friends) and never gets public mail.
    SPECIAL_USE_DOMAIN = "special-use-domain"
    #: The domain does not exist (NXDOMAIN).
    NO_SUCH_DOMAIN = "no-such-domain"
    #: The domain publishes a null MX (RFC 7505): it accepts no mail.
    NULL_MX = "null-mx"
    #: No MX and no address, or no exchanger of the domain has an address.
    NO_MAIL_HOST = "no-mail-host"
    #: The DNS could not answer (timeout, SERVFAIL, REFUSED); try again later.
    TEMPFAIL = "tempfail"
    #: The domain is an address literal such as ``[192.0.2.1]``: nothing to look up.
    ADDRESS_LITERAL = "address-literal"
    #: The mail server refused the address at RCPT (5xx) during an SMTP callout.
    MAILBOX_REFUSED = "mailbox-refused"
    #: Every address of the domain's mail hosts is in the validator's ``refused_networks``
    #: (loopback by default): MX delivery would not connect to any of them.
    REFUSED_MAIL_HOST = "refused-mail-host"

    @property
    def verdict(self) -> Verdict:
        """The verdict this reason leads to."""
        return _VERDICTS[self]


_VERDICTS: Final = {
    Reason.OK: Verdict.DELIVERABLE,
    Reason.BAD_SYNTAX: Verdict.UNDELIVERABLE,
    Reason.SPECIAL_USE_DOMAIN: Verdict.UNDELIVERABLE,
    Reason.NO_SUCH_DOMAIN: Verdict.UNDELIVERABLE,
    Reason.NULL_MX: Verdict.UNDELIVERABLE,
    Reason.NO_MAIL_HOST: Verdict.UNDELIVERABLE,
    Reason.TEMPFAIL: Verdict.UNKNOWN,
    Reason.ADDRESS_LITERAL: Verdict.UNKNOWN,
    Reason.MAILBOX_REFUSED: Verdict.UNDELIVERABLE,
    Reason.REFUSED_MAIL_HOST: Verdict.UNDELIVERABLE,
}


def _matches_reason(
    instance: Validation, attribute: attrs.Attribute[Verdict], value: Verdict
) -> None:
    if value is not _VERDICTS[instance.reason]:
        raise ValueError(f"verdict {value} does not follow from reason {instance.reason}")


@attrs.frozen(kw_only=True)
class Validation:
    """The result of validating one address.

    Attributes:
        verdict: deliverable, undeliverable or unknown (follows from ``reason``).
        reason: why.
        input: the text that was validated, unchanged.
        address: the normalized address, or ``None`` when the syntax is bad.
        mail_hosts: what the DNS said about the domain, when it was asked and answered.
        detail: a human-readable explanation (the syntax error, the DNS failure).
        callout: the SMTP callout's answer, when a callout was configured and ran.
    """

    # attrs runs validators after every field is set, so the verdict can check the reason.
    verdict: Verdict = attrs.field(validator=_matches_reason)
    reason: Reason
    input: str
    address: Address | None = None
    mail_hosts: MailHosts | None = None
    detail: str = ""
    callout: CalloutResult | None = None

    @property
    def is_deliverable(self) -> bool:
        """Whether the verdict is :attr:`Verdict.DELIVERABLE`."""
        return self.verdict is Verdict.DELIVERABLE


def _result(
    reason: Reason,
    text: str,
    address: Address | None = None,
    mail_hosts: MailHosts | None = None,
    detail: str = "",
) -> Validation:
    return Validation(
        reason=reason,
        verdict=_VERDICTS[reason],
        input=text,
        address=address,
        mail_hosts=mail_hosts,
        detail=detail,
    )


def _is_special(ascii_domain: str, special_use: frozenset[str]) -> bool:
    # Check the domain and each of its parents: "a.b.example.com" -> "b.example.com" -> ...
    name = ascii_domain
    for _ in range(128):  # a domain has at most 127 labels (RFC 1035 §3.1, 255 octets)
        if name in special_use:
            return True
        dot = name.find(".")
        if dot < 0:
            return False
        name = name[dot + 1 :]
    return False


def _with_callout(validation: Validation, probe: CalloutResult) -> Validation:
    """Fold a callout's answer into a DNS verdict: only a 5xx to RCPT changes it."""
    if probe.refused:
        return attrs.evolve(
            validation,
            reason=Reason.MAILBOX_REFUSED,
            verdict=Verdict.UNDELIVERABLE,
            detail=f"{probe.host} refused it: {probe.reply}",
            callout=probe,
        )
    return attrs.evolve(validation, callout=probe)


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None and not (timeout > 0 and not math.isnan(timeout)):
        raise ConfigurationError(f"timeout must be a positive number of seconds, not {timeout!r}")


def _overdue(domain: str, timeout: float | None) -> ResolverError:
    """What a domain not looked up within ``validate_many``'s ``timeout`` gets (or, with
    no timeout, whose lookup was cancelled)."""
    when = "was cancelled" if timeout is None else f"timeout ({timeout:g} s) passed"
    return ResolverError(
        f"the bulk validation's {when} before {domain} was looked up",
        name=domain,
        is_transient=True,
    )


def _deliverable(results: list[Validation]) -> tuple[list[int], list[Address]]:
    """The positions and addresses of the results the DNS found deliverable."""
    chosen = [(i, v.address) for i, v in enumerate(results) if v.reason is Reason.OK]
    return [i for i, _ in chosen], [a for _, a in chosen if a is not None]


class _ValidatorBase:
    def __init__(
        self,
        special_use: Iterable[str],
        concurrency: int,
        refused: Iterable[str | Network] = LOOPBACK_NETWORKS,
    ) -> None:
        if concurrency < 1:
            raise ConfigurationError("concurrency must be at least 1")
        self.special_use = frozenset(name.lower().rstrip(".") for name in special_use)
        self.concurrency = concurrency
        self.refused_networks = refused_networks(refused)

    def _check_syntax(self, text: str) -> Address | Validation:
        """The address to look up, or the final verdict when no lookup is needed."""
        try:
            address = Address.parse(text)
        except InvalidAddress as exc:
            return _result(Reason.BAD_SYNTAX, text, detail=str(exc))
        if address.is_literal:
            return _result(
                Reason.ADDRESS_LITERAL, text, address, detail="an address literal has no DNS"
            )
        if _is_special(address.ascii_domain, self.special_use):
            return _result(
                Reason.SPECIAL_USE_DOMAIN,
                text,
                address,
                detail=f"{address.domain} is a special-use domain name",
            )
        return address

    def _judge(self, text: str, address: Address, found: MailHosts | ResolverError) -> Validation:
        if isinstance(found, ResolverError):
            if found.is_transient:
                return _result(Reason.TEMPFAIL, text, address, detail=str(found))
            return _result(Reason.BAD_SYNTAX, text, address, detail=str(found))
        if found.null_mx:
            return _result(Reason.NULL_MX, text, address, found, "the domain accepts no mail")
        if found.status is DNSStatus.NXDOMAIN:
            return _result(Reason.NO_SUCH_DOMAIN, text, address, found)
        if found.status is DNSStatus.NODATA:
            return _result(
                Reason.NO_MAIL_HOST, text, address, found, "no MX and no address records"
            )
        if not found.hosts:
            # MX records whose targets are all "." without being a null MX (RFC 7505 §3).
            detail = "its MX records name no exchanger"
            return _result(Reason.NO_MAIL_HOST, text, address, found, detail)
        refused: list[str] = []
        for host in found.hosts:
            for ip in host.addresses:
                if not is_refused(ip, self.refused_networks):
                    return _result(Reason.OK, text, address, found)
                refused.append(f"{host.name}[{ip}]")
        failed = [host.name for host in found.hosts if host.status.is_transient]
        if failed:
            detail = f"address lookups failed for {', '.join(failed)}"
            return _result(Reason.TEMPFAIL, text, address, found, detail)
        if refused:
            shown = ", ".join(refused[:4]) + (", ..." if len(refused) > 4 else "")
            detail = f"every mail host address is in refused_networks ({shown})"
            return _result(Reason.REFUSED_MAIL_HOST, text, address, found, detail)
        return _result(Reason.NO_MAIL_HOST, text, address, found, "no exchanger has an address")

    def _sort(
        self, addresses: Iterable[str]
    ) -> tuple[list[Validation | Address], dict[str, list[int]]]:
        """Syntax results in input order, and the positions waiting on each domain."""
        pending: list[Validation | Address] = []
        by_domain: dict[str, list[int]] = {}
        for index, text in enumerate(addresses):
            checked = self._check_syntax(text)
            pending.append(checked)
            if isinstance(checked, Address):
                by_domain.setdefault(checked.ascii_domain, []).append(index)
        return pending, by_domain

    @staticmethod
    def _cached(
        resolver: Resolver | AsyncResolver, by_domain: dict[str, list[int]]
    ) -> tuple[dict[str, MailHosts | ResolverError], list[str]]:
        """What the resolver's cache already knows, and the domains it does not know yet."""
        found: dict[str, MailHosts | ResolverError] = {}
        missing: list[str] = []
        for domain in by_domain:
            try:
                hit = resolver.cached_mail_hosts(domain)
            except ResolverError as exc:
                found[domain] = exc
                continue
            if hit is None:
                missing.append(domain)
            else:
                found[domain] = hit
        return found, missing

    def _finish(
        self,
        texts: list[str],
        pending: list[Validation | Address],
        by_domain: dict[str, list[int]],
        found: Iterable[MailHosts | ResolverError],
    ) -> list[Validation]:
        results = list(pending)
        for positions, mail_hosts in zip(by_domain.values(), found, strict=True):
            for index in positions:
                address = pending[index]
                assert isinstance(address, Address)
                results[index] = self._judge(texts[index], address, mail_hosts)
        # Every Address in `pending` sat at a position of some domain and was replaced.
        return cast(list[Validation], results)


class RecipientValidator(_ValidatorBase):
    """Validates recipient addresses by syntax and DNS; blocking and thread-safe.

    Args:
        resolver: the :class:`~mailrelay.resolver.Resolver` to ask (and whose cache to use);
            ``None`` makes one that reads the system's resolver configuration.
        special_use: domains (with everything below them) refused without a lookup.
        concurrency: the most DNS lookups :meth:`validate_many` runs at the same time.
        callout: an SMTP :class:`~mailrelay.callout.Callout` to probe deliverable addresses
            with (off by default: read its caveats first).
        refused_networks: mail host addresses that do not count (CIDR texts or
            :mod:`ipaddress` networks): a domain with no other is ``REFUSED_MAIL_HOST``.
            Loopback by default, as for :class:`~mailrelay.transport.mx.MXTransport`; ``()``
            counts every address (a test DNS pointing at 127.0.0.x).
    """

    def __init__(
        self,
        resolver: Resolver | None = None,
        *,
        special_use: Iterable[str] = DEFAULT_SPECIAL_USE,
        concurrency: int = DEFAULT_CONCURRENCY,
        callout: Callout | None = None,
        refused_networks: Iterable[str | Network] = LOOPBACK_NETWORKS,
    ) -> None:
        super().__init__(special_use, concurrency, refused_networks)
        self.resolver = resolver if resolver is not None else Resolver()
        self.callout = callout

    def validate(self, address: str) -> Validation:
        """Validate one address; see the module documentation for the verdicts."""
        checked = self._check_syntax(address)
        if isinstance(checked, Validation):
            return checked
        result = self._judge(address, checked, self._lookup(checked.ascii_domain))
        if self.callout is not None and result.reason is Reason.OK:
            result = _with_callout(result, self.callout.probe(checked))
        return result

    def validate_many(
        self, addresses: Iterable[str], *, timeout: float | None = None
    ) -> list[Validation]:
        """Validate many addresses: results in input order, each domain looked up once.

        Args:
            addresses: the addresses, as text.
            timeout: seconds the DNS part of the whole call may take (``None``: no bound
                but the lookups' own). A domain not looked up by then is ``UNKNOWN`` with
                reason ``TEMPFAIL`` and a ``detail`` saying the timeout passed; its lookup
                ends in the background (within the resolver's timeout) and is cached, so
                a later call may find it. A configured callout runs afterwards, with its
                own timeouts.

        Raises:
            ConfigurationError (a ``ValueError``): ``timeout`` is not a positive number.
        """
        _check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        texts = list(addresses)
        pending, by_domain = self._sort(texts)
        found, missing = self._cached(self.resolver, by_domain)
        if len(missing) == 1 and timeout is None:
            found[missing[0]] = self._lookup(missing[0])
        elif missing:
            # Blocking lookups overlap only in threads; the pool lives for this call only.
            workers = min(self.concurrency, len(missing))
            pool = ThreadPoolExecutor(workers, thread_name_prefix="mailrelay-validate")
            try:
                futures = _start_each(pool, self._lookup, missing)
                left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                concurrent.futures.wait(futures, timeout=left)
                for domain, future in zip(missing, futures, strict=True):
                    done = future.done()
                    found[domain] = future.result() if done else _overdue(domain, timeout)
            finally:
                # Past the timeout nobody waits for the lookups still running (each ends
                # within the resolver's timeout); those not started are dropped.
                pool.shutdown(wait=deadline is None, cancel_futures=True)
        results = self._finish(texts, pending, by_domain, [found[d] for d in by_domain])
        if self.callout is not None:
            chosen, probed = _deliverable(results)
            probes = self.callout.probe_many(probed)
            for index, probe in zip(chosen, probes, strict=True):
                results[index] = _with_callout(results[index], probe)
        return results

    def _lookup(self, domain: str) -> MailHosts | ResolverError:
        try:
            return self.resolver.mail_hosts(domain)
        except ResolverError as exc:
            return exc


class AsyncRecipientValidator(_ValidatorBase):
    """The asyncio twin of :class:`RecipientValidator`: the same arguments, awaited methods.

    Args:
        resolver: the :class:`~mailrelay.resolver.AsyncResolver` to ask; ``None`` makes one
            that reads the system's resolver configuration.
        special_use: domains (with everything below them) refused without a lookup.
        concurrency: the most DNS lookups :meth:`validate_many` runs at the same time.
        callout: an :class:`~mailrelay.callout.AsyncCallout` to probe deliverable addresses
            with (off by default).
        refused_networks: as :class:`RecipientValidator`'s.
    """

    def __init__(
        self,
        resolver: AsyncResolver | None = None,
        *,
        special_use: Iterable[str] = DEFAULT_SPECIAL_USE,
        concurrency: int = DEFAULT_CONCURRENCY,
        callout: AsyncCallout | None = None,
        refused_networks: Iterable[str | Network] = LOOPBACK_NETWORKS,
    ) -> None:
        super().__init__(special_use, concurrency, refused_networks)
        self.resolver = resolver if resolver is not None else AsyncResolver()
        self.callout = callout

    async def validate(self, address: str) -> Validation:
        """Validate one address; see :meth:`RecipientValidator.validate`."""
        checked = self._check_syntax(address)
        if isinstance(checked, Validation):
            return checked
        result = self._judge(address, checked, await self._lookup(checked.ascii_domain))
        if self.callout is not None and result.reason is Reason.OK:
            result = _with_callout(result, await self.callout.probe(checked))
        return result

    async def validate_many(
        self, addresses: Iterable[str], *, timeout: float | None = None
    ) -> list[Validation]:
        """Validate many addresses; see :meth:`RecipientValidator.validate_many`.

        Raises:
            ConfigurationError (a ``ValueError``): ``timeout`` is not a positive number.
        """
        _check_timeout(timeout)
        texts = list(addresses)
        pending, by_domain = self._sort(texts)
        gate = asyncio.Semaphore(self.concurrency)

        async def gated(domain: str) -> MailHosts | ResolverError:
            async with gate:
                return await self._lookup(domain)

        found, missing = self._cached(self.resolver, by_domain)
        if missing:
            tasks = [asyncio.ensure_future(gated(domain)) for domain in missing]
            try:
                await asyncio.wait(tasks, timeout=timeout)
            finally:
                # Only the waits end: the resolver's lookups are shielded from their
                # waiters, finish in the loop and are cached.
                late = [task for task in tasks if not task.done()]
                for task in late:
                    task.cancel()
                if late:
                    await asyncio.wait(late)
            for domain, task in zip(missing, tasks, strict=True):
                found[domain] = task.result() if not task.cancelled() else _overdue(domain, timeout)
        results = self._finish(texts, pending, by_domain, [found[d] for d in by_domain])
        if self.callout is not None:
            chosen, probed = _deliverable(results)
            probes = await self.callout.probe_many(probed)
            for index, probe in zip(chosen, probes, strict=True):
                results[index] = _with_callout(results[index], probe)
        return results

    async def _lookup(self, domain: str) -> MailHosts | ResolverError:
        try:
            return await self.resolver.mail_hosts(domain)
        except ResolverError as exc:
            return exc
