"""MX delivery's policy and plan, shared by :mod:`mailrelay.transport.mx` (blocking) and
:mod:`mailrelay.transport.mx_async` (asyncio), and by :mod:`mailrelay.callout`.

Theory of operation: everything MX delivery decides, with no I/O. :class:`MXPolicy` says how
strict TLS is per domain; :meth:`MXSettings.route` turns a domain's mail hosts (or the DNS's
verdict) into an ordered list of :class:`Target` values (exchanger name + one IP address);
:func:`deliver_plan` is one domain's delivery as a generator that yields requests
(:class:`ReuseIdle`, :class:`OpenSession`, :class:`SendMessage`, :class:`GiveBack`) and is
sent what happened; a :class:`Trail` records each target's failure for the reason text,
:class:`Unreachable` remembers, for one message, the targets that could not be opened, and
:class:`STSVerdicts` remembers, for a while, what verifying an exchanger under an MTA-STS
testing policy gave (RFC 8461 §5: verify and report, deliver anyway). The
two transports only carry the requests out. The rules themselves (routing, order, moving
on, TLS, REQUIRETLS, reuse) are stated in :mod:`mailrelay.transport.mx`, which re-exports
this module's public names (:class:`MXPolicy`, :data:`MX_POOL`, ...): import them from there.
"""

from __future__ import annotations

import enum
import inspect
import ipaddress
import logging
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Generator, Hashable, Iterable
from typing import Any, Final, Generic, Protocol, TypeAlias, TypeVar

import attrs

from mailrelay._shown import Shown
from mailrelay.address import Address
from mailrelay.envelope import Envelope
from mailrelay.errors import (
    ConfigurationError,
    DeliveryError,
    ProxyError,
    ResolverError,
    SessionRefused,
    TLSError,
)
from mailrelay.flow import Session, SessionConfig, unsent_positions
from mailrelay.message import Message
from mailrelay.options import TLS, Timeouts
from mailrelay.reply import EnhancedStatus, Reply
from mailrelay.resolver import DNSStatus, MailHost, MailHosts, Resolver
from mailrelay.results import DeliveryResult, Outcome, RecipientResult, error_status
from mailrelay.transport.dane import DANEHost, DANEPolicy, HostState
from mailrelay.transport.driver_common import check_source_address
from mailrelay.transport.errors_map import peer_name
from mailrelay.transport.pooling import PooledConnection, is_stale_connection_error
from mailrelay.transport.proxy import Proxy, as_proxy
from mailrelay.transport.settings import PoolSettings

# Logged under the transports' name: what users configure is "mailrelay.transport.mx".
log = logging.getLogger("mailrelay.transport.mx")

#: The most addresses tried for one domain in one delivery.
DEFAULT_MAX_ADDRESSES: Final = 10

#: How the MX transports reuse connections by default: at most 8 idle sessions, each idle
#: at most 5 s (Postfix keeps an idle MX session 2 s: a public server's slots are not ours
#: to hold), so a batch and the domains of one message share a session, and nothing lingers.
MX_POOL: Final = PoolSettings(size=8, max_messages=100, idle_timeout=5.0, health_check_after=5.0)

_MX_TLS: Final = frozenset({TLS.NONE, TLS.OPPORTUNISTIC, TLS.STARTTLS})

Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
_IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

#: The exchanger addresses MX delivery refuses by default: the sending host itself. A
#: recipient domain (or an address literal, ``user@[127.0.0.1]``) is anyone's to choose: one
#: whose MX points at loopback makes the sender hand its mail to whatever listens on its own
#: port 25 (an MTA that trusts local clients and relays what they send), and makes a
#: delivery probe of the local host. Exim's default router ignores these exchangers too.
#: ``refused_networks=()`` delivers to them (a test server on loopback).
LOOPBACK_NETWORKS: Final[tuple[str, ...]] = ("127.0.0.0/8", "::1/128")

#: Networks that are not on the public internet (RFC 1918, RFC 6598 shared space,
#: link-local RFC 3927 and RFC 4291, unique-local RFC 4193), for a sender delivering on
#: behalf of others from inside a private network: ``refused_networks=LOOPBACK_NETWORKS +
#: PRIVATE_NETWORKS`` keeps strangers' domains from reaching internal mail servers. Not the
#: default: an organisation's own domains often have private exchangers (split DNS).
PRIVATE_NETWORKS: Final[tuple[str, ...]] = (
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "169.254.0.0/16",
    "fc00::/7",
    "fe80::/10",
)


def refused_networks(value: Iterable[str | Network]) -> tuple[Network, ...]:
    """``value`` checked and parsed: CIDR texts (``"10.0.0.0/8"``, a bare address is one
    host) or network values.

    Raises:
        ConfigurationError: a text that is not a network, or a lone string (one network
            must still be given as a tuple: a string would be read character by character).
    """
    if isinstance(value, str | bytes):
        raise ConfigurationError(
            f"refused_networks must be a tuple of networks, not one string ({value!r}): "
            f"write ({value!r},)"
        )
    networks: list[Network] = []
    for item in value:
        if isinstance(item, ipaddress.IPv4Network | ipaddress.IPv6Network):
            networks.append(item)
            continue
        try:
            networks.append(ipaddress.ip_network(item))
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(
                f'refused_networks: {item!r} is not a network ("10.0.0.0/8", "::1/128")'
            ) from exc
    return tuple(networks)


def networks_from_text(text: str) -> tuple[str, ...]:
    """The networks a comma-separated text names, for URLs and the command line: CIDR
    networks, ``loopback`` (:data:`LOOPBACK_NETWORKS`), ``private``
    (:data:`PRIVATE_NETWORKS`), or ``none`` alone (nothing refused).

    Raises:
        ConfigurationError: anything else.
    """
    names = [name.strip() for name in text.split(",")]
    if names == ["none"]:
        return ()
    networks: list[str] = []
    for name in names:
        if name == "loopback":
            networks += LOOPBACK_NETWORKS
        elif name == "private":
            networks += PRIVATE_NETWORKS
        else:
            networks.append(name)
    try:
        refused_networks(networks)
    except ConfigurationError:
        raise ConfigurationError(
            f"refused_networks takes CIDR networks, loopback, private or none, "
            f"comma-separated, not {text!r}"
        ) from None
    return tuple(networks)


#: RFC 6052 §2.1: NAT64's well-known prefix; its last 32 bits are the IPv4 address reached.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
#: RFC 4291 §2.5.5.1: the deprecated IPv4-compatible addresses (``::127.0.0.1``).
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")


def _reached(ip: _IPAddress) -> list[_IPAddress]:
    """The addresses ``ip`` reaches, to be judged: itself, the IPv4 address an IPv6 form
    carries, and for the unspecified address the loopback address a connection to it lands
    on (Linux and the BSDs connect ``0.0.0.0`` and ``::`` to the local host)."""
    found: list[_IPAddress] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            found.append(ip.ipv4_mapped)
        elif ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 1):
            found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    for each in list(found):
        if each.is_unspecified:
            found.append(
                ipaddress.IPv4Address("127.0.0.1")
                if each.version == 4
                else ipaddress.IPv6Address("::1")
            )
    return found


def is_refused(address: str, networks: tuple[Network, ...]) -> bool:
    """Whether the exchanger address ``address`` reaches a host in one of ``networks``.

    Judged by every address it reaches: an IPv4-mapped (``::ffff:127.0.0.1``),
    IPv4-compatible (``::127.0.0.1``) or NAT64 (``64:ff9b::7f00:1``) IPv6 address by its
    IPv4 address too, and the unspecified address (``0.0.0.0``, ``::``) as loopback, where
    a connection to it lands. Text that is no IP address is refused whenever anything is:
    targets are addresses, and a name would be resolved behind this check's back.
    """
    if not networks:
        return False
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return True
    return any(each in network for each in _reached(ip) for network in networks)


def _check_tls(instance: object, attribute: attrs.Attribute[TLS], value: TLS) -> None:
    if value not in _MX_TLS:
        raise ConfigurationError(
            f"MX delivery supports TLS.NONE, TLS.OPPORTUNISTIC and TLS.STARTTLS, not {value!r} "
            "(port 25 has no implicit TLS)"
        )


def _patterns(value: Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    return tuple(pattern.lower().rstrip(".") for pattern in value)


def _strings(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


def _check_context(
    instance: object, attribute: attrs.Attribute[ssl.SSLContext | None], value: object
) -> None:
    if value is not None and not isinstance(value, ssl.SSLContext):
        raise ConfigurationError("ssl_context must be an ssl.SSLContext")


@attrs.frozen(kw_only=True)
class MXPolicy:
    """How to deliver to one domain: what the ``tls_policy`` hook may return.

    Attributes:
        tls: ``TLS.OPPORTUNISTIC`` (encrypt when offered, certificates not checked),
            ``TLS.STARTTLS`` (encryption with a verified certificate is required) or
            ``TLS.NONE`` (never encrypt).
        ssl_context: the context that verifies certificates under ``TLS.STARTTLS``;
            ``None`` means the transport's ``ssl_context`` (by default the system's CAs).
        plaintext_fallback: under ``TLS.OPPORTUNISTIC``, after a failed handshake, try the
            same address again without TLS (RFC 7435 §3). Never done under ``TLS.STARTTLS``.
        mx_patterns: when not empty, only exchangers whose names match one of these are used
            (``mail.example.com``, or ``*.example.com`` for one label, as MTA-STS's ``mx:``
            lines, RFC 8461 §4.1); the others are skipped.
        dane: what DANE (RFC 7672, :mod:`mailrelay.transport.dane`) demands of the
            exchangers it applies to; they are treated by it whatever ``tls`` says (the
            others follow ``tls``). Made by the :class:`~mailrelay.transport.dane.DANE`
            hooks.
        sts_policy_string: the lines of the MTA-STS policy this policy enforces, for TLS
            reporting (RFC 8460 §4.4's ``policy-string``, :mod:`mailrelay.transport.tlsrpt`);
            empty when no MTA-STS policy made it. Not part of equality: it changes nothing
            about delivery.
        sts_testing: the MTA-STS policy is in ``testing`` mode (RFC 8461 §5): ``mx_patterns``
            skip no exchanger, delivery follows ``tls``; with a ``tls_reporter``, each
            exchanger matching the patterns is first tried with verified TLS (``ssl_context``)
            and the verdict reported, and one that does not match is reported as a failure,
            the message delivered anyway (:func:`deliver_plan`). Made by the MTA-STS hooks.
    """

    tls: TLS = attrs.field(default=TLS.OPPORTUNISTIC, validator=_check_tls)
    ssl_context: ssl.SSLContext | None = attrs.field(default=None, validator=_check_context)
    plaintext_fallback: bool = True
    mx_patterns: tuple[str, ...] = attrs.field(default=(), converter=_patterns)
    dane: DANEPolicy | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of(DANEPolicy))
    )
    sts_policy_string: tuple[str, ...] = attrs.field(default=(), converter=_strings, eq=False)
    sts_testing: bool = False

    def allows(self, host: str) -> bool:
        """Whether the exchanger ``host`` may be used (always, without ``mx_patterns``)."""
        if not self.mx_patterns:
            return True
        host = host.lower().rstrip(".")
        for pattern in self.mx_patterns:
            if pattern.startswith("*."):
                # RFC 8461 §4.1: the wildcard matches exactly one leftmost label.
                head, _, tail = host.partition(".")
                if head and tail == pattern[2:]:
                    return True
            elif host == pattern:
                return True
        return False


#: The per-domain policy hook: ``tls_policy(ascii_domain)`` returns a :class:`TLS` value, an
#: :class:`MXPolicy`, or ``None`` for the transport's defaults.
TLSPolicyHook: TypeAlias = Callable[[str], "TLS | MXPolicy | None"]
#: The asyncio MX transport's hook: the same, or a coroutine function giving the same (so
#: that a policy that must be looked up, such as MTA-STS's, holds from the first delivery).
AsyncTLSPolicyHook: TypeAlias = Callable[
    [str], "TLS | MXPolicy | Awaitable[TLS | MXPolicy | None] | None"
]


def opportunistic_context() -> ssl.SSLContext:
    """A TLS context that encrypts without checking the certificate (RFC 7435).

    Used for opportunistic MX delivery: it defeats passive eavesdropping, which is all
    opportunistic STARTTLS can promise anyway (an active attacker can strip STARTTLS).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


# -- planning (shared with mx_async) ------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Target:
    """One address of one exchanger to try.

    Attributes:
        name: the exchanger's host name (for TLS: SNI and certificate checks).
        address: the IP address to connect to.
        port: the TCP port.
    """

    name: str
    address: str
    port: int

    @property
    def peer(self) -> str:
        """``name[address]:port`` as results and logs show it (``address:port`` for a literal)."""
        if self.name.startswith("["):
            return peer_name(self.address, self.port)
        return f"{self.name}[{self.address}]:{self.port}"

    @property
    def tls_name(self) -> str:
        """The name to check a certificate against: the exchanger, or the bare address."""
        return self.address if self.name.startswith("[") else self.name


@attrs.frozen(kw_only=True)
class TLSAttempt:
    """What happened to TLS on one fresh session to one target, for TLS reporting
    (:mod:`mailrelay.transport.tlsrpt`): told to the transport's ``tls_reporter``.

    Attributes:
        domain: the recipient (policy) domain, A-label form.
        policy: the domain's policy the session was opened under.
        target: the exchanger and address.
        tls: the TLS mode the session was opened with.
        error: the :class:`~mailrelay.errors.TLSError` that ended the attempt, or ``None``
            when a session opened.
        encrypted: whether the session that opened is encrypted.
        sending_ip: our address on the session, when known.
    """

    domain: str
    policy: MXPolicy
    target: Target
    tls: TLS
    error: TLSError | None = None
    encrypted: bool = False
    sending_ip: str | None = None


class TLSReporter(Protocol):
    """What the MX transports' ``tls_reporter`` must do (a
    :class:`~mailrelay.transport.tlsrpt.TLSReportCollector` does): take note of one
    attempt, quickly, without blocking or awaiting (it is called on the event loop)."""

    def tls_attempt(self, attempt: TLSAttempt) -> None:
        """Record ``attempt``."""


# The RFC 3463 statuses of the verdicts made from the DNS, for the DSNs that report them.
# X.1.2 "Bad destination system address": the part after the "@" is "invalid for mail"
# (no such domain, neither MX nor address records, MX records naming no exchanger).
_BAD_DOMAIN: Final = EnhancedStatus(klass=5, subject=1, detail=2)
# RFC 7505 §4.2 (registered in RFC 7505 §5.1): "Recipient address has null MX".
_NULL_MX: Final = EnhancedStatus(klass=5, subject=1, detail=10)
# X.4.3 "Directory server failure": the DNS could not be asked (a timeout, SERVFAIL).
_DNS_FAILED: Final = EnhancedStatus(klass=4, subject=4, detail=3)
# X.4.4 "Unable to route": there are exchangers, but no address this transport may use.
_NO_ROUTE: Final = EnhancedStatus(klass=5, subject=4, detail=4)
# X.7.0 "Other or undefined security status": the domain's MTA-STS policy allows none of
# its exchangers (RFC 8461 §5 makes that a temporary failure).
_POLICY: Final = EnhancedStatus(klass=4, subject=7, detail=0)


@attrs.frozen(kw_only=True)
class Verdict:
    """A domain's recipients settled without a connection (by the DNS or the policy).

    Attributes:
        outcome: TRANSIENT or PERMANENT.
        reason: why, for the results.
        enhanced: the RFC 3463 status that says it, for the DSNs reporting it.
    """

    outcome: Outcome
    reason: str
    enhanced: EnhancedStatus | None = None

    def results(self, recipients: Iterable[Address]) -> list[RecipientResult]:
        """The same result for every recipient."""
        return [
            RecipientResult(
                address=address, outcome=self.outcome, reason=self.reason, enhanced=self.enhanced
            )
            for address in recipients
        ]


def literal_hosts(ascii_domain: str) -> MailHosts | None:
    """The one "exchanger" of an address literal (RFC 5321 §4.1.3), or ``None`` for a name."""
    if not ascii_domain.startswith("["):
        return None
    text = ascii_domain[1:-1]
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    address = ipaddress.ip_address(text)
    v4 = (str(address),) if address.version == 4 else ()
    v6 = (str(address),) if address.version == 6 else ()
    return MailHosts(
        domain=ascii_domain,
        status=DNSStatus.OK,
        hosts=(MailHost(name=ascii_domain, status=DNSStatus.OK, ipv4=v4, ipv6=v6, preference=0),),
        implicit=True,
    )


def mail_hosts_of(resolver: Resolver, domain: str) -> MailHosts | ResolverError:
    """Where ``domain``'s mail goes: an address literal's one host, or the resolver's answer
    (its :class:`~mailrelay.errors.ResolverError` returned, for :func:`plan` to judge)."""
    found = literal_hosts(domain)
    if found is not None:
        return found
    try:
        return resolver.mail_hosts(domain)
    except ResolverError as exc:
        return exc


def plan(
    domain: str,
    found: MailHosts | ResolverError,
    policy: MXPolicy,
    *,
    port: int,
    max_addresses: int,
    refused: tuple[Network, ...] = (),
) -> list[Target] | Verdict:
    """The targets to try for ``domain``, in order, or the verdict when there are none.

    Addresses in ``refused`` (the transport's ``refused_networks``) are never targets; a
    domain left with none because of them is PERMANENT, as a domain with no address is
    (retrying changes nothing while its DNS and our setting stay as they are).
    """
    if isinstance(found, ResolverError):
        if found.is_transient:
            return Verdict(
                outcome=Outcome.TRANSIENT,
                reason=f"DNS lookup failed: {found}",
                enhanced=_DNS_FAILED,
            )
        return Verdict(
            outcome=Outcome.PERMANENT, reason=f"not a mail domain: {found}", enhanced=_BAD_DOMAIN
        )
    if found.null_mx:
        # RFC 7505 §3: a null MX means the domain accepts no mail; fail at once, no retries.
        return Verdict(
            outcome=Outcome.PERMANENT,
            reason=f"{domain} publishes a null MX (RFC 7505): it accepts no mail",
            enhanced=_NULL_MX,
        )
    if found.status is DNSStatus.NXDOMAIN:
        return Verdict(
            outcome=Outcome.PERMANENT,
            reason=f"{domain} does not exist (NXDOMAIN)",
            enhanced=_BAD_DOMAIN,
        )
    if found.status is DNSStatus.NODATA:
        # RFC 5321 §5.1: no MX and no address: there is nowhere to deliver.
        return Verdict(
            outcome=Outcome.PERMANENT,
            reason=f"{domain} has no mail host: neither MX nor address records",
            enhanced=_BAD_DOMAIN,
        )
    if not found.hosts:
        # Every MX target is "." without being RFC 7505's null MX ("MX 10 ."): RFC 5321
        # §5.1, MX records none of which is usable are an error to report.
        return Verdict(
            outcome=Outcome.PERMANENT,
            reason=f"{domain} has no mail host: its MX records name no exchanger",
            enhanced=_BAD_DOMAIN,
        )
    # RFC 8461 §5: a testing policy's mx patterns are reported against, never enforced.
    hosts = [host for host in found.hosts if policy.sts_testing or policy.allows(host.name)]
    if not hosts:
        names = ", ".join(host.name for host in found.hosts)
        return Verdict(
            outcome=Outcome.TRANSIENT,
            reason=f"no exchanger of {domain} ({names}) matches its MX policy",
            enhanced=_POLICY,
        )
    targets: list[Target] = []
    seen: set[str] = set()
    skipped: list[str] = []
    for host in hosts:
        for address in host.addresses:
            if address in seen or len(targets) >= max_addresses:
                continue
            seen.add(address)
            target = Target(name=host.name, address=address, port=port)
            if is_refused(address, refused):
                skipped.append(target.peer)
            else:
                targets.append(target)
    if skipped:
        log.info("%s: not delivering to %s (refused_networks)", domain, ", ".join(skipped[:4]))
    if targets:
        return targets
    failed = [host.name for host in hosts if host.status.is_transient]
    if failed:
        return Verdict(
            outcome=Outcome.TRANSIENT,
            reason=f"address lookups failed for the exchangers of {domain}: {', '.join(failed)}",
            enhanced=_DNS_FAILED,
        )
    if skipped:
        shown = ", ".join(skipped[:4]) + (", ..." if len(skipped) > 4 else "")
        return Verdict(
            outcome=Outcome.PERMANENT,
            reason=(
                f"every exchanger address of {domain} is in a network this transport refuses "
                f"({shown}): loopback by default; see refused_networks"
            ),
            enhanced=_NO_ROUTE,
        )
    names = ", ".join(host.name for host in hosts)
    # RFC 5321 §5.1: MX records none of which is usable is an error to report.
    return Verdict(
        outcome=Outcome.PERMANENT,
        reason=f"no exchanger of {domain} has an address ({names})",
        enhanced=_NO_ROUTE,
    )


def proxy_failed(error: DeliveryError) -> bool:
    """Whether ``error`` is about the proxy itself, so that no other target can be reached
    through it either: it could not be reached at all
    (:attr:`~mailrelay.errors.ProxyError.proxy_unreachable`), or it fails whatever the target
    (:attr:`~mailrelay.errors.ProxyError.proxy_unusable`). ``False`` for a proxy's failure
    about one target (it could not reach that exchanger, or its rules forbid it) and for
    every other error. The rule :class:`Unreachable` and :mod:`mailrelay.callout` share."""
    return isinstance(error, ProxyError) and (error.proxy_unreachable or error.proxy_unusable)


class Unreachable:
    """The targets that could not be opened (connect failure, timeout, refused greeting)
    during one delivery: the message's other domains skip them with the same failure instead
    of waiting for the same timeout again (the domains of one exchanger are sent one after
    the other, to share its session). A proxy that could not be reached at all
    (:attr:`~mailrelay.errors.ProxyError.proxy_unreachable`), or that fails whatever the
    target (:attr:`~mailrelay.errors.ProxyError.proxy_unusable`: it refused our login, or
    does not speak its protocol), makes every further target fail at once with that error:
    through a dead proxy, each would wait out its own connect timeout for nothing, and a
    refusing one would give each the same refusal. A proxy's failure about one target (it
    could not reach that exchanger, or its rules forbid it) is that target's alone."""

    def __init__(self) -> None:
        self._failed: dict[tuple[str, int], DeliveryError] = {}
        self._proxy: DeliveryError | None = None

    def get(self, target: Target) -> DeliveryError | None:
        """How opening ``target`` failed earlier in this delivery, or ``None``."""
        return self._proxy or self._failed.get((target.address, target.port))

    def add(self, target: Target, error: DeliveryError) -> None:
        """Remember that opening ``target`` failed with ``error``."""
        self._failed[target.address, target.port] = error
        if proxy_failed(error):
            self._proxy = error


class Trail:
    """What the targets of one domain did, to explain the outcome when none took the mail.

    Args:
        domain: the domain, for the reason text.
        unreachable: the delivery's memory of targets that could not be opened (shared by
            the trails of one message's domains; a fresh one by default).
    """

    def __init__(self, domain: str, unreachable: Unreachable | None = None) -> None:
        self.domain = domain
        self.notes: list[str] = []
        self.transient = False
        self.last: DeliveryError | None = None
        self.unreachable = unreachable if unreachable is not None else Unreachable()

    def failed(
        self, target: Target, error: DeliveryError, *, transient: bool | None = None
    ) -> None:
        """Record that ``target`` failed with ``error`` (``transient`` overrides its own)."""
        self.notes.append(f"{target.peer}: {error}")
        self.transient = self.transient or (error.is_transient if transient is None else transient)
        self.last = error
        log.info("MX delivery for %s: %s failed: %s", self.domain, target.peer, Shown(error))

    def known_unreachable(self, target: Target) -> bool:
        """Whether opening ``target`` already failed in this delivery (recorded again here)."""
        earlier = self.unreachable.get(target)
        if earlier is None:
            return False
        self.failed(target, earlier, transient=transient_failure(earlier))
        return True

    def open_failed(
        self, target: Target, error: DeliveryError, policy: MXPolicy, tls: TLS
    ) -> TLS | None:
        """Record that opening ``target`` under ``tls`` failed; the TLS mode to try the
        same target again with (plain text, RFC 7435 §3), or ``None`` to move on."""
        if isinstance(error, TLSError):
            if fallback(policy, tls):
                self.notes.append(f"{target.peer}: {error} (retried without TLS)")
                return TLS.NONE
            # RFC 8461 §5: a TLS policy failure is temporary, never a bounce.
            self.failed(target, error, transient=True)
            return None
        self.unreachable.add(target, error)
        self.failed(target, error, transient=transient_failure(error))
        return None

    def send_failed(self, target: Target, error: DeliveryError, *, fresh: bool) -> Stale | None:
        """Record that sending on a session to ``target`` failed, or, for a reused session
        the server had dropped (the pool's stale-connection rule), say to open a fresh one."""
        if not fresh and is_stale_connection_error(error):
            log.info(
                "the reused session to %s was dead (%s); reconnecting", target.peer, Shown(error)
            )
            return Stale.STALE
        self.failed(target, error, transient=transient_failure(error))
        return None

    def results(self, recipients: Iterable[Address]) -> list[RecipientResult]:
        """Every recipient's result after every target failed."""
        outcome = Outcome.TRANSIENT if self.transient or not self.notes else Outcome.PERMANENT
        reason = f"no exchanger of {self.domain} took the message: " + "; ".join(self.notes)
        last = self.last
        reply: Reply | None = last.reply if last is not None else None
        host = last.host if last is not None else None
        # Without a reply, the status of the last failure's kind (a connection not
        # answered, a timeout, TLS), in the class of the outcome reported.
        enhanced = (
            error_status(last, transient=outcome is Outcome.TRANSIENT)
            if last is not None and reply is None
            else None
        )
        return [
            RecipientResult(
                address=address,
                outcome=outcome,
                reply=reply,
                reason=reason,
                host=host,
                enhanced=enhanced,
            )
            for address in recipients
        ]


def group_by_domain(envelope: Envelope) -> dict[str, list[int]]:
    """Envelope positions per recipient domain (A-label form), in first-seen order."""
    groups: dict[str, list[int]] = {}
    for index, recipient in enumerate(envelope.recipients):
        groups.setdefault(recipient.address.ascii_domain.lower(), []).append(index)
    return groups


def sub_envelope(envelope: Envelope, positions: list[int]) -> Envelope:
    """The envelope restricted to the recipients at ``positions``."""
    return Envelope(
        envelope.sender,
        [envelope.recipients[i] for i in positions],
        ret=envelope.ret,
        envid=envelope.envid,
        notify=envelope.notify,
        requiretls=envelope.requiretls,
    )


def merge(
    envelope: Envelope, message: Message, parts: Iterable[tuple[list[int], list[RecipientResult]]]
) -> DeliveryResult:
    """One result, in envelope order, from the per-domain results."""
    merged: list[RecipientResult | None] = [None] * len(envelope.recipients)
    for positions, results in parts:
        for index, result in zip(positions, results, strict=True):
            merged[index] = result
    final = tuple(result for result in merged if result is not None)
    assert len(final) == len(envelope.recipients), "every recipient must have a result"
    hosts = {result.host for result in final}
    return DeliveryResult(
        recipients=final,
        message_id=message.message_id,
        host=hosts.pop() if len(hosts) == 1 else None,
    )


def with_host(results: Iterable[RecipientResult], host: str) -> list[RecipientResult]:
    """Results that name ``host`` when the session did not record one."""
    return [r if r.host is not None else attrs.evolve(r, host=host) for r in results]


class _RequireTLSRefused(DeliveryError):
    """A REQUIRETLS message that must not go over a session (RFC 8689 §5: 5.7.30)."""

    status_detail = (7, 30)


def requiretls_refusal(session: Session, envelope: Envelope, peer: str) -> DeliveryError | None:
    """Why a REQUIRETLS message must not go over ``session`` (so the next exchanger is
    tried), or ``None`` when it may (or the envelope does not ask for REQUIRETLS)."""
    if not envelope.requiretls:
        return None
    # RFC 8689 §4.2.1 (step 5): after STARTTLS, the server MUST offer REQUIRETLS; if not,
    # QUIT and try the next MX host; with none left, do not send (§5: 5.7.30).
    if not session.encrypted:
        why = "the connection is not encrypted"
    elif not session.extensions.requiretls:
        why = "the server does not offer REQUIRETLS"
    else:
        return None
    return _RequireTLSRefused(
        f"REQUIRETLS support required (5.7.30, RFC 8689): {why}", is_transient=False, host=peer
    )


def dane_host(policy: MXPolicy, target: Target) -> DANEHost | None:
    """DANE's verdict on ``target``'s exchanger under ``policy``, or ``None`` (no DANE)."""
    return policy.dane.for_host(target.name) if policy.dane is not None else None


def dane_required(policy: MXPolicy, target: Target) -> DANEHost | None:
    """DANE's verdict when it requires TLS of ``target`` (RFC 7672 §2.2: usable records,
    or only unusable ones), else ``None``."""
    host = dane_host(policy, target)
    if host is not None and host.state in (HostState.AUTHENTICATE, HostState.ENCRYPT):
        return host
    return None


def dane_ta_failed(target: Target, error: TLSError) -> TLSError:
    """The error when the second handshake of DANE-TA failed: the chain did not verify to
    the matched certificate, or the leaf does not name the exchanger (RFC 7672 §3.2.2)."""
    return TLSError(
        f"DANE: {target.peer} did not verify against its DANE-TA certificate: {error}",
        is_transient=True,
        host=target.peer,
    )


def reuse_key(
    target: Target, policy: MXPolicy, context: ssl.SSLContext, *, sts_testing: bool = False
) -> Hashable:
    """What a session to ``target`` under ``policy`` may be reused for: another domain or
    message whose key is equal would make the same decisions at the same exchanger.

    The exchanger's name is part of it (results and the certificate check name it); under
    ``TLS.STARTTLS`` the verifying ``context`` too (held, so its identity cannot be reused),
    under ``TLS.OPPORTUNISTIC`` whether a failed handshake falls back to plain text; for a
    DANE host, the TLSA records its certificate was matched against. ``sts_testing``: the
    session was opened by an MTA-STS testing-mode probe (:func:`deliver_plan`; ``context``
    is then the verifying one): kept apart from plain opportunistic sessions, so that a
    testing domain's fresh sessions are verified and reported, whatever other domains do.
    """
    host = dane_required(policy, target)
    if host is not None:
        return (target.name, target.address, target.port, "DANE", host.state, host.records)
    if sts_testing:
        fallback_ = policy.plaintext_fallback
        return (target.name, target.address, target.port, "STS-testing", context, fallback_)
    if policy.tls is TLS.STARTTLS:
        return (target.name, target.address, target.port, TLS.STARTTLS, context)
    if policy.tls is TLS.OPPORTUNISTIC:
        fallback_ = policy.plaintext_fallback
        return (target.name, target.address, target.port, TLS.OPPORTUNISTIC, fallback_)
    return (target.name, target.address, target.port, policy.tls)


class Stale(enum.Enum):
    """What an attempt on a reused session returns when the session turned out to be dead
    (the server had dropped it): open a fresh one to the same target."""

    STALE = "stale"


# -- one domain's delivery as requests (shared with mx_async) ----------------------------------

#: A routed domain: its policy and the targets to try, in order.
Route: TypeAlias = tuple[MXPolicy, list[Target]]

C = TypeVar("C", bound=PooledConnection[Any])


@attrs.frozen
class ReuseIdle:
    """Take an idle session for ``key`` that still works from the pool (NOOP first when it
    has been idle long). The answer: the session, or ``None``."""

    key: Hashable


@attrs.frozen
class OpenSession:
    """Connect to ``target`` and open a session under ``tls`` (greeting, EHLO, STARTTLS).
    The answer: the session, or the :class:`~mailrelay.errors.DeliveryError` that stopped it."""

    target: Target
    policy: MXPolicy
    tls: TLS


@attrs.frozen
class SendMessage(Generic[C]):
    """Send the message on ``connection`` to ``envelope`` (the domain's recipients, or
    those of them still unsent). The answer: the result, or the
    :class:`~mailrelay.errors.DeliveryError` that ended the attempt (the connection is then
    closed)."""

    connection: C
    envelope: Envelope


@attrs.frozen
class GiveBack(Generic[C]):
    """Give ``connection`` back to the pool under ``key`` (it QUITs what it cannot keep).
    The answer: ``None``."""

    key: Hashable
    connection: C


#: What a domain's plan asks the transport to do, and what it is answered.
MXRequest: TypeAlias = ReuseIdle | OpenSession | SendMessage[C] | GiveBack[C]
MXAnswer: TypeAlias = C | DeliveryResult | DeliveryError | None
DomainPlan: TypeAlias = Generator[MXRequest[C], MXAnswer[C], list[RecipientResult]]
_TargetPlan: TypeAlias = Generator[MXRequest[C], MXAnswer[C], DeliveryResult | None]

#: The most requests one target's plan makes (reuse, send, give back; two opens, send,
#: give back): bounds the transports' loops.
MAX_REQUESTS_PER_TARGET: Final = 8


def max_requests(routed: Route, envelope: Envelope) -> int:
    """The most requests :func:`deliver_plan` makes for ``envelope`` (one round per target,
    and one more per recipient at most, for recipients left unsent): bounds the
    transports' loops."""
    return (len(routed[1]) + len(envelope.recipients)) * MAX_REQUESTS_PER_TARGET + 1


def deliver_plan(
    routed: Route, envelope: Envelope, trail: Trail, settings: MXSettings
) -> DomainPlan[C]:
    """One domain's delivery, every decision of it, as requests the transport carries out.

    The targets are tried in turn (each: a reused session first, then fresh ones, see
    :func:`_target_plan`); the first answer per recipient ends it. Returns the recipients'
    results, naming the target that answered, or the trail's account when none did.
    """
    policy, targets = routed
    results: list[RecipientResult] | None = None
    rest = list(range(len(envelope.recipients)))  # the positions ``part`` holds
    part = envelope
    at = 0
    # Each round either moves to the next target or answers at least one recipient.
    for _ in range(len(targets) + len(rest)):
        if at == len(targets):
            break
        target = targets[at]
        key = settings.reuse_key(target, policy)
        result: DeliveryResult | None = yield from _target_plan(
            key, target, policy, part, trail, settings
        )
        if result is None:
            at += 1
            continue
        answered = with_host(result.recipients, target.peer)
        if results is None:
            results = answered
        else:
            for index, recipient in zip(rest, answered, strict=True):
                results[index] = recipient
        # A message split over several transactions that ran out of them (RFC 9422
        # MAILMAX, the session ended between them): the rest on a fresh session (the
        # pool keeps no full one), or the next target if this one fails them.
        unsent = unsent_positions(result)
        if not unsent:
            break
        rest = [rest[index] for index in unsent]
        part = envelope.subset(rest)
    if results is None:
        return trail.results([r.address for r in envelope.recipients])
    return results


def _target_plan(  # noqa: PLR0917 -- private; the plan's state
    key: Hashable,
    target: Target,
    policy: MXPolicy,
    envelope: Envelope,
    trail: Trail,
    settings: MXSettings | None = None,
) -> _TargetPlan[C]:
    """One target: the result, or ``None`` after ``trail`` recorded why it failed."""
    host = dane_host(policy, target)
    if host is not None and host.state is HostState.FAILED:
        # RFC 7672 §2.1.1: a failed TLSA lookup: neither DANE nor a downgrade; next MX.
        # Checked before the pool is asked: an idle session to this exchanger (opened for a
        # domain without DANE, perhaps in plain text) must not carry this domain's mail.
        why = f"DANE: the TLSA lookup for {target.name} failed ({host.reason})"
        failure = TLSError(why, is_transient=True, host=target.peer)
        if settings is not None:
            settings.report_tls(trail.domain, policy, target, TLS.STARTTLS, failure)
        trail.failed(target, failure, transient=True)
        return None
    if host is not None and host.state is HostState.ENCRYPT and envelope.requiretls:
        # RFC 8689 §4.2.1: REQUIRETLS needs an authenticated server; TLSA records none of
        # which is usable cannot authenticate it (RFC 7672 §2.2). Checked before the pool
        # is asked: an idle session under this key carried mail without REQUIRETLS, and
        # nothing authenticated it.
        why = f"REQUIRETLS: {target.name} cannot be authenticated (its TLSA records are unusable)"
        trail.failed(target, TLSError(why, is_transient=False, host=target.peer), transient=False)
        return None
    idle = yield ReuseIdle(key)
    if isinstance(idle, PooledConnection):
        outcome = yield from _attempt_plan(key, target, idle, envelope, trail, fresh=False)
        if outcome is not Stale.STALE:
            return outcome
    if trail.known_unreachable(target):
        return None
    if settings is not None and settings.sts_probes(policy, target):
        return (yield from _sts_testing_plan(key, target, policy, envelope, trail, settings))
    tls: TLS | None = policy.tls
    if host is not None:
        # RFC 7672 §2.2: a DANE host gets STARTTLS or nothing (never plain text).
        tls = TLS.STARTTLS
    while tls is not None:  # at most twice: with TLS, then in plain text
        opened = yield OpenSession(target, policy, tls)
        if settings is not None:
            settings.report_tls(trail.domain, policy, target, tls, opened)
        if not isinstance(opened, PooledConnection):
            assert isinstance(opened, DeliveryError), "OpenSession gives a session or an error"
            tls = trail.open_failed(target, opened, policy, tls)
            continue
        outcome = yield from _attempt_plan(key, target, opened, envelope, trail, fresh=True)
        return None if outcome is Stale.STALE else outcome
    return None


def _sts_testing_plan(  # noqa: PLR0917 -- private; the plan's state
    key: Hashable,
    target: Target,
    policy: MXPolicy,
    envelope: Envelope,
    trail: Trail,
    settings: MXSettings,
) -> _TargetPlan[C]:
    """One target of a domain whose MTA-STS policy is in testing mode, with a TLS reporter.

    RFC 8461 §5: "testing" asks a sender that supports TLSRPT to report what ``enforce``
    would have refused, and to deliver anyway. So: an exchanger matching the policy's
    ``mx`` patterns is first opened with verified TLS (as ``enforce`` would); the verdict
    is reported under the ``sts`` policy and kept (:class:`STSVerdicts`). Verified, the
    session carries the message. Failed (certificate, name, no STARTTLS), a fresh session
    is opened as opportunistic delivery would (plain text after a failed handshake, when
    the policy allows it) and carries it: never a deferral for testing's sake. An
    exchanger outside the patterns, or one whose failure is still kept, is not probed: its
    fresh session is reported as that failure (it is what ``enforce`` would have met).
    """
    verifying = settings.context(policy, TLS.STARTTLS, target)
    known: TLSError | None
    if not policy.allows(target.name):
        known = mx_mismatch(target, policy)
    else:
        known = settings.sts_verdicts.get(target, policy, verifying)
    if known is None:
        probed = yield OpenSession(target, policy, TLS.STARTTLS)
        settings.report_tls(trail.domain, policy, target, TLS.STARTTLS, probed)
        if isinstance(probed, PooledConnection):
            settings.sts_verdicts.put(target, policy, verifying, None)
            outcome = yield from _attempt_plan(key, target, probed, envelope, trail, fresh=True)
            return None if outcome is Stale.STALE else outcome
        assert isinstance(probed, DeliveryError), "OpenSession gives a session or an error"
        if not isinstance(probed, TLSError):
            # Nothing reached TLS (refused, timed out): the target failed, whatever the mode.
            trail.open_failed(target, probed, policy, TLS.STARTTLS)
            return None
        settings.sts_verdicts.put(target, policy, verifying, probed)
        log.info(
            "MTA-STS testing policy of %s: %s fails verification (%s); delivering anyway",
            trail.domain, target.peer, probed,
        )  # fmt: skip
    tls: TLS | None = policy.tls
    while tls is not None:  # at most twice: opportunistic TLS, then in plain text
        opened = yield OpenSession(target, policy, tls)
        if known is not None and isinstance(opened, PooledConnection | TLSError):
            # One session, one report (RFC 8460 §4.4): the failure enforce would have met;
            # the opportunistic session itself is not a second attempt.
            settings.report_tls(trail.domain, policy, target, TLS.STARTTLS, known)
            known = None
        if not isinstance(opened, PooledConnection):
            assert isinstance(opened, DeliveryError), "OpenSession gives a session or an error"
            tls = trail.open_failed(target, opened, policy, tls)
            continue
        outcome = yield from _attempt_plan(key, target, opened, envelope, trail, fresh=True)
        return None if outcome is Stale.STALE else outcome
    return None


def mx_mismatch(target: Target, policy: MXPolicy) -> TLSError:
    """The failure an MTA-STS policy's exchanger outside its ``mx`` patterns is reported as
    (:mod:`mailrelay.transport.tlsrpt` reads it as ``validation-failure``, ``mx-mismatch``)."""
    return TLSError(
        f"MTA-STS: {target.name} matches no mx pattern of the policy "
        f"({', '.join(policy.mx_patterns)})",
        is_transient=True,
        host=target.peer,
    )


#: Seconds an MTA-STS testing-mode verdict on an exchanger is kept by default.
DEFAULT_STS_VERDICT_TTL: Final = 3600.0
#: The most verdicts kept by default (the least recently stored go first).
DEFAULT_STS_VERDICTS: Final = 1024


class STSVerdicts:
    """What verifying each exchanger gave under an MTA-STS testing policy, for a while, so
    that a failing exchanger is not probed (an extra connection) for every message.

    Keyed by the exchanger (name, address, port), the policy's text and the verifying
    context: a new policy (a changed text) is probed afresh. Thread-safe; bounded in size
    and age.

    Args:
        ttl: seconds a verdict is kept.
        size: the most verdicts kept.
        clock: a monotonic clock in seconds (tests inject one).
    """

    def __init__(
        self,
        *,
        ttl: float = DEFAULT_STS_VERDICT_TTL,
        size: int = DEFAULT_STS_VERDICTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not ttl > 0 or size < 1:
            raise ConfigurationError("an STS verdict cache needs a positive ttl and size")
        self.ttl = ttl
        self.size = size
        self.clock = clock
        self._lock = threading.Lock()
        self._kept: OrderedDict[Hashable, tuple[float, TLSError | None]] = OrderedDict()

    @staticmethod
    def _key(target: Target, policy: MXPolicy, context: ssl.SSLContext) -> Hashable:
        return (target.name, target.address, target.port, policy.sts_policy_string, context)

    def get(self, target: Target, policy: MXPolicy, context: ssl.SSLContext) -> TLSError | None:
        """The failure kept for ``target``, or ``None`` (verified, or nothing kept: probe)."""
        key = self._key(target, policy, context)
        with self._lock:
            kept = self._kept.get(key)
            if kept is None:
                return None
            if self.clock() - kept[0] >= self.ttl:
                del self._kept[key]
                return None
            return kept[1]

    def put(
        self, target: Target, policy: MXPolicy, context: ssl.SSLContext, error: TLSError | None
    ) -> None:
        """Keep the verdict on ``target``: its failure, or ``None`` when it verified."""
        key = self._key(target, policy, context)
        with self._lock:
            self._kept[key] = (self.clock(), error)
            self._kept.move_to_end(key)
            while len(self._kept) > self.size:
                self._kept.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._kept)


def _attempt_plan(
    key: Hashable,
    target: Target,
    connection: C,
    envelope: Envelope,
    trail: Trail,
    *,
    fresh: bool,
) -> Generator[MXRequest[C], MXAnswer[C], DeliveryResult | Stale | None]:
    """Send on ``connection``: the result; ``None`` after recording why the target failed;
    or ``Stale.STALE`` when a reused session turned out to be dead (open a fresh one)."""
    refusal = requiretls_refusal(connection.session, envelope, target.peer)
    if refusal is not None:
        trail.failed(target, refusal, transient=False)
        yield GiveBack(key, connection)  # the session is fine for other mail
        return None
    sent = yield SendMessage(connection, envelope)
    if not isinstance(sent, DeliveryResult):
        assert isinstance(sent, DeliveryError), "SendMessage gives a result or an error"
        return trail.send_failed(target, sent, fresh=fresh)
    connection.messages += 1
    yield GiveBack(key, connection)
    return sent


class MXSettings:
    """The checked configuration shared by the blocking and the asyncio MX transports."""

    def __init__(
        self,
        *,
        port: int,
        tls: TLS,
        ssl_context: ssl.SSLContext | None,
        timeouts: Timeouts,
        local_hostname: str | None,
        tls_policy: TLSPolicyHook | AsyncTLSPolicyHook | None,
        plaintext_fallback: bool,
        pipelining: bool,
        chunking: bool,
        max_addresses: int,
        source_address: str | None = None,
        tls_reporter: TLSReporter | None = None,
        refused: Iterable[str | Network] = LOOPBACK_NETWORKS,
        proxy: Proxy | str | None = None,
    ) -> None:
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ConfigurationError(f"port must be a number from 1 to 65535, not {port!r}")
        if not isinstance(timeouts, Timeouts):
            raise ConfigurationError("timeouts must be a Timeouts value (Timeouts.all(10), ...)")
        if max_addresses < 1:
            raise ConfigurationError("max_addresses must be at least 1")
        if local_hostname is not None and (
            not local_hostname or any(c in local_hostname for c in " \t\r\n\0<>")
        ):
            raise ConfigurationError(f"not a usable local host name: {local_hostname!r}")
        self.port = port
        self.default = MXPolicy(
            tls=tls, ssl_context=ssl_context, plaintext_fallback=plaintext_fallback
        )
        self.timeouts = timeouts
        self.local_hostname = local_hostname
        self.tls_policy = tls_policy
        self.pipelining = pipelining
        self.chunking = chunking
        self.max_addresses = max_addresses
        self.refused = refused_networks(refused)
        self.proxy = as_proxy(proxy)
        if self.proxy is not None and local_hostname is None:
            # Our own address (the EHLO literal otherwise) is not the one receivers see.
            raise ConfigurationError(
                "MX delivery through a proxy needs local_hostname: the exchangers see the "
                "proxy's outgoing address and check the EHLO name against it"
            )
        self.source_address = check_source_address(source_address)
        if tls_reporter is not None and not callable(getattr(tls_reporter, "tls_attempt", None)):
            raise ConfigurationError(
                "tls_reporter must have a tls_attempt(attempt) method (a TLSReportCollector)"
            )
        self.tls_reporter = tls_reporter
        #: MTA-STS testing mode's verdicts (:func:`deliver_plan`), shared by the sessions.
        self.sts_verdicts = STSVerdicts()
        self._opportunistic = opportunistic_context()
        self._verifying: ssl.SSLContext | None = ssl_context

    def policy(self, domain: str, *, requiretls: bool = False) -> MXPolicy:
        """The policy for ``domain``: the hook's answer, or the transport's default.

        A message sent with REQUIRETLS gets verified TLS whatever the policy says
        (RFC 8689 §4.2.1: the server's certificate must be valid for its name).
        """
        if self.tls_policy is None:
            return self._required(self.default, requiretls)
        answer = self.tls_policy(domain)
        if inspect.isawaitable(answer):
            if inspect.iscoroutine(answer):
                answer.close()  # never to be awaited: no "never awaited" warning
            raise ConfigurationError(
                f"tls_policy({domain!r}) returned an awaitable: a coroutine hook (such as "
                "AsyncMTASTS) works with AsyncMXTransport; MXTransport needs a plain one "
                "(such as MTASTS)"
            )
        return self._required(self._decided(domain, answer), requiretls)

    async def apolicy(self, domain: str, *, requiretls: bool = False) -> MXPolicy:
        """:meth:`policy`, for the asyncio transport: a hook's awaitable answer is awaited."""
        if self.tls_policy is None:
            return self._required(self.default, requiretls)
        answer = self.tls_policy(domain)
        if inspect.isawaitable(answer):
            answer = await answer
        return self._required(self._decided(domain, answer), requiretls)

    @staticmethod
    def _required(policy: MXPolicy, requiretls: bool) -> MXPolicy:
        if requiretls and policy.tls is not TLS.STARTTLS:
            policy = attrs.evolve(policy, tls=TLS.STARTTLS, plaintext_fallback=False)
        return policy

    def _decided(self, domain: str, answer: object) -> MXPolicy:
        if answer is None:
            return self.default
        if isinstance(answer, TLS):
            return attrs.evolve(self.default, tls=answer)
        if isinstance(answer, MXPolicy) and answer.sts_testing:
            # RFC 8461 §5: testing mode delivers as the sender would without the policy:
            # the transport's own defaults, with the policy kept for verifying and reporting.
            return attrs.evolve(
                self.default,
                mx_patterns=answer.mx_patterns,
                sts_policy_string=answer.sts_policy_string,
                sts_testing=True,
                dane=answer.dane,
                ssl_context=answer.ssl_context or self.default.ssl_context,
            )
        if isinstance(answer, MXPolicy):
            if answer.dane is not None and answer == MXPolicy(dane=answer.dane):
                # A DANE verdict and nothing else (what the DANE hooks answer): the
                # exchangers DANE does not apply to keep the transport's own defaults.
                return attrs.evolve(self.default, dane=answer.dane)
            return answer
        raise ConfigurationError(
            f"tls_policy({domain!r}) returned {answer!r}: expected TLS, MXPolicy or None"
        )

    def context(self, policy: MXPolicy, tls: TLS, target: Target | None = None) -> ssl.SSLContext:
        """The TLS context for a session under ``tls``: verifying only when TLS is required,
        and then not for a DANE host (``target``'s TLSA records authenticate it, not the
        WebPKI: RFC 7672 §3.1.1; the check runs once the session is open)."""
        if tls is not TLS.STARTTLS or (
            target is not None and dane_required(policy, target) is not None
        ):
            return self._opportunistic
        if policy.ssl_context is not None:
            return policy.ssl_context
        if self._verifying is None:
            self._verifying = ssl.create_default_context()
        return self._verifying

    def sts_probes(self, policy: MXPolicy, target: Target) -> bool:
        """Whether ``target`` gets MTA-STS testing mode's verified probe: a testing policy,
        opportunistic delivery, no DANE for the exchanger (DANE's own rules apply then), and
        a ``tls_reporter`` (without one nobody would learn the verdict: the extra connection
        would be pure cost, so delivery stays exactly opportunistic)."""
        return (
            self.tls_reporter is not None
            and policy.sts_testing
            and policy.tls is TLS.OPPORTUNISTIC
            and dane_host(policy, target) is None
        )

    def reuse_key(self, target: Target, policy: MXPolicy) -> Hashable:
        """:func:`reuse_key` for a session to ``target`` under ``policy`` on this transport."""
        if self.sts_probes(policy, target):
            verifying = self.context(policy, TLS.STARTTLS, target)
            return reuse_key(target, policy, verifying, sts_testing=True)
        return reuse_key(target, policy, self.context(policy, policy.tls))

    def plan(
        self, domain: str, found: MailHosts | ResolverError, policy: MXPolicy
    ) -> list[Target] | Verdict:
        """:func:`plan` with this transport's port and address limit."""
        return plan(
            domain,
            found,
            policy,
            port=self.port,
            max_addresses=self.max_addresses,
            refused=self.refused,
        )

    def route(
        self, domain: str, envelope: Envelope, policy: MXPolicy, found: MailHosts | ResolverError
    ) -> Route | list[RecipientResult]:
        """The domain's policy and targets, or its recipients' results when the DNS (or the
        policy) settles them without a connection."""
        targets = self.plan(domain, found, policy)
        if isinstance(targets, Verdict):
            return targets.results([r.address for r in envelope.recipients])
        return policy, targets

    def session_config(self, target: Target, tls: TLS, local_address: str | None) -> SessionConfig:
        """The dialogue's configuration for one target."""
        return SessionConfig(
            local_hostname=self.local_hostname or local_address or "localhost",
            server_hostname=target.tls_name,
            tls=tls,
            pipelining=self.pipelining,
            chunking=self.chunking,
            peer=target.peer,
        )

    def report_tls(
        self, domain: str, policy: MXPolicy, target: Target, tls: TLS, opened: object
    ) -> None:
        """Tell the ``tls_reporter`` (if any) how TLS went on a fresh session: ``opened`` is
        the session, or the error that stopped it (only TLS failures are TLS attempts: a
        refused connection never reached TLS). A plain-text session the policy chose
        (``TLS.NONE``, the fallback after a failed handshake) is no attempt. A reporter that
        fails is logged, never allowed to change a delivery."""
        if self.tls_reporter is None or tls is TLS.NONE:
            return
        if isinstance(opened, PooledConnection):
            attempt = TLSAttempt(
                domain=domain, policy=policy, target=target, tls=tls,
                encrypted=bool(opened.session.encrypted),
                sending_ip=opened.driver.local_address,
            )  # fmt: skip
        elif isinstance(opened, TLSError):
            attempt = TLSAttempt(
                domain=domain, policy=policy, target=target, tls=tls, error=opened,
                sending_ip=self.source_address,
            )  # fmt: skip
        else:
            return
        try:
            self.tls_reporter.tls_attempt(attempt)
        except Exception:
            log.exception("the TLS reporter failed on %s (delivery goes on)", target.peer)

    def describe(self) -> str:
        """A one-line description for ``repr`` (a proxy shown without its password)."""
        proxy = "" if self.proxy is None else f" proxy={self.proxy!r}"
        return f"port={self.port} tls={self.default.tls.name}{proxy}"


def fallback(policy: MXPolicy, tls: TLS) -> bool:
    """Whether a TLS failure under ``tls`` should be retried in plain text (RFC 7435 §3)."""
    return tls is TLS.OPPORTUNISTIC and policy.plaintext_fallback


def transient_failure(error: DeliveryError) -> bool:
    """Whether a target's failure leaves hope for a later attempt.

    A 5xx greeting or EHLO refusal says "not from you, not ever"; everything else (connect
    failures, timeouts, 421, lost connections, protocol violations) may pass.
    """
    if isinstance(error, SessionRefused) and error.reply is not None:
        return not error.reply.is_permanent
    return True
