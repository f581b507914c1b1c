"""MTA-STS (RFC 8461): authenticated TLS to the domains that publish a policy.

Theory of operation: :class:`MTASTS` (blocking) and :class:`AsyncMTASTS` (asyncio) are
``tls_policy`` hooks for the MX transports (``MXTransport(tls_policy=MTASTS(...))``). Asked
about a domain, they find its policy, keep it, and answer with an
:class:`~mailrelay.transport.mx.MXPolicy` when the policy says ``mode: enforce``. The steps
are written once, without I/O, as a generator (``_Core.refresh_plan``) that yields two kinds
of request, a TXT lookup and a policy fetch; each class carries them out with its own I/O.

Rules of this module:

- Discovery (RFC 8461 §3.1): the TXT records at ``_mta-sts.<domain>``. Records that do not
  begin with ``v=STSv1`` are discarded; when the number left is not one, or that one is not
  valid (``v=STSv1; id=<1 to 32 letters or digits>``), the domain has no policy *now*. A DNS
  failure (timeout, SERVFAIL, REFUSED) is not "no policy": it tells nothing, and a cached
  policy stays in force.
- Fetching (§3.3): ``GET https://mta-sts.<domain>/.well-known/mta-sts.txt``, the host's
  addresses resolved by mailrelay's own :class:`~mailrelay.resolver.Resolver` (never the
  system's resolver), the certificate verified against ``mta-sts.<domain>`` (by default with
  the system's CAs), redirects never followed, only a ``200`` with media type ``text/plain``
  accepted, at most :data:`MAX_POLICY_SIZE` bytes, and the whole fetch bounded by ``timeout``,
  the lookup of ``mta-sts.<domain>``'s addresses included (a lookup still blocked at the
  deadline is left to finish in the background: :mod:`mailrelay.transport._https`).
- Where fetches may go (server-side request forgery): ``mta-sts.<domain>`` is named by the
  recipient domain's DNS, so by default every address it resolves to must be public
  (:func:`~mailrelay.transport.netguard.is_public_address`: no loopback, RFC 1918,
  link-local, CGNAT, unique-local...); one that is not fails the fetch with
  :class:`PolicyFetchError` before any connection, which is then like any other failed
  fetch (no new policy, a cached one kept, ``sts-policy-fetch-error`` for TLS-RPT). The
  connection goes to the very address checked, never resolved again (DNS rebinding).
  ``allow_private_addresses=True`` lifts the guard, for deployments whose policy hosts are
  internal.
- Parsing (§3.2): :meth:`STSPolicy.parse`. ``version: STSv1``, ``mode``, ``max_age``
  (0 to :data:`MAX_MAX_AGE`) and, unless the mode is ``none``, at least one ``mx`` pattern;
  CRLF or LF line ends; unknown keys ignored; a repeated single-valued key keeps its first
  value. Anything else raises :class:`PolicyError`, and an invalid policy is no policy.
- Caching (§5.1, §10.2): the last good policy per domain is kept until its ``max_age`` runs
  out, in memory. An unchanged TXT ``id`` means no fetch, until the policy is older than
  ``refresh_after`` (a day, :data:`DEFAULT_REFRESH_AFTER`): then it is fetched again, so a
  policy in use is renewed long before it expires (§10.2: every discovery is a moment an
  attacker who blocks DNS or HTTPS can exploit; fewer and earlier is safer). A changed ``id``
  means a fetch. A fetch that fails keeps the cached policy (never a downgrade because a
  refresh failed), and the same ``id`` is not fetched again for :data:`FETCH_RETRY_DELAY`
  seconds (§3.3 suggests at least five minutes). A missing or broken TXT record keeps the
  cached policy too: §8.3 removes a policy only through a new one with ``mode: none``.
- Applying (§5): ``enforce`` → ``MXPolicy(tls=TLS.STARTTLS, mx_patterns=<the policy's mx>,
  plaintext_fallback=False)``: only exchangers matching a pattern, verified TLS, and when none
  passes the recipients are ``TRANSIENT`` (§5: a policy failure defers, it never bounces).
  ``none`` keeps the transport's opportunistic default. ``testing`` (§5: report failures,
  deliver anyway): the exchangers that ``enforce`` would skip are logged (a WARNING); with
  ``tls_reporter=`` the answer is :meth:`STSPolicy.testing_policy` (``sts_testing``), and an
  MX transport that has a ``tls_reporter`` too verifies each exchanger once in a while,
  reports the verdict under the ``sts`` policy and delivers under its own defaults whatever
  the verdict (:mod:`mailrelay.transport.mx`); without a reporter the answer is the
  transport's default, as for ``none`` (nobody to tell: no extra connection).
- Reporting (RFC 8460 §4.3.2.2): with ``tls_reporter=`` (a
  :class:`~mailrelay.transport.tlsrpt.TLSReportCollector`), each failed fetch is told to it
  (``sts_policy_failure``): once per fetch attempt, not per message (``retry_delay`` spaces
  them).
- The hook composes: ``fallback=`` is asked for every domain without an ``enforce`` policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import http.client
import logging
import re
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Generator, Hashable, Iterable
from typing import Final, Protocol, TypeAlias

import attrs

from mailrelay._shown import Shown
from mailrelay.errors import ConfigurationError, PolicyError, PolicyFetchError, ResolverError
from mailrelay.options import TLS
from mailrelay.resolver import AsyncResolver, Resolver
from mailrelay.transport import _https
from mailrelay.transport.mx_plan import MXPolicy, TLSPolicyHook

__all__ = [
    "DEFAULT_FETCH_TIMEOUT",
    "DEFAULT_REFRESH_AFTER",
    "FETCH_RETRY_DELAY",
    "MAX_MAX_AGE",
    "MAX_POLICY_SIZE",
    "MTASTS",
    "POLICY_PATH",
    "AsyncMTASTS",
    "CachedPolicy",
    "Mode",
    "PolicyCache",
    "PolicyError",
    "PolicyFetchError",
    "STSPolicy",
    "STSRecord",
    "fetch_policy",
]

log = logging.getLogger(__name__)

#: Seconds one policy fetch may take in all (address lookup, connect, TLS, request, body).
#: RFC 8461 §3.3 asks for a timeout "on the order of a minute".
DEFAULT_FETCH_TIMEOUT: Final = 60.0
#: RFC 8461 §3.3: a policy larger than 64 KB is not a policy.
MAX_POLICY_SIZE: Final = 64 * 1024
#: RFC 8461 §3.2: the largest ``max_age``, about a year.
MAX_MAX_AGE: Final = 31_557_600
#: Seconds before a failed fetch of the same policy ``id`` is tried again (RFC 8461 §3.3:
#: "five minutes or longer per version ID").
FETCH_RETRY_DELAY: Final = 300.0
#: Seconds after which a cached policy whose ``id`` is unchanged is fetched again, to renew
#: it long before its ``max_age`` runs out.
DEFAULT_REFRESH_AFTER: Final = 86_400.0
#: The well-known path of the policy (RFC 8461 §3.2).
POLICY_PATH: Final = "/.well-known/mta-sts.txt"

_DEFAULT_CACHE_SIZE: Final = 10_000
_STSV1: Final = "STSv1"
_WSP: Final = " \t"
# RFC 8461 §3.1 (ABNF of the TXT record).
_TXT_SEP: Final = re.compile(r"[ \t]*;[ \t]*")
_TXT_ID: Final = re.compile(r"id=([A-Za-z0-9]{1,32})")
_TXT_EXTENSION: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}=[\x21-\x3a\x3c\x3e-\x7e]+")
# RFC 8461 §3.2 (ABNF of the policy).
_POLICY_KEY: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_MAX_AGE: Final = re.compile(r"[0-9]{1,10}")
_LABEL: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


class Mode(enum.Enum):
    """What a policy asks of senders (RFC 8461 §5)."""

    ENFORCE = "enforce"
    """Deliver only over verified TLS to exchangers matching an ``mx`` pattern."""
    TESTING = "testing"
    """Deliver as usual; senders report failures (TLS-RPT). With a ``tls_reporter`` on the
    hook and the transport, each exchanger is verified (now and then) and the verdict
    counted under the ``sts`` policy; without one the sessions are plain opportunistic
    ones, counted (if at all) as ``no-policy-found``."""
    NONE = "none"
    """No policy: the way a domain withdraws one (RFC 8461 §8.3)."""


@attrs.frozen(kw_only=True)
class STSRecord:
    """The ``_mta-sts`` TXT record of a domain (RFC 8461 §3.1).

    Attributes:
        id: the policy's version: 1 to 32 letters or digits; a new ``id`` means a new policy.
    """

    id: str = attrs.field(validator=attrs.validators.matches_re(r"[A-Za-z0-9]{1,32}"))

    @classmethod
    def parse(cls, text: str) -> STSRecord:
        """Parse one TXT record's text (its strings joined).

        Raises:
            PolicyError: the text is not a valid ``v=STSv1`` record with one ``id``.
        """
        parts = _TXT_SEP.split(text)
        if parts[0] != "v=STSv1":
            raise PolicyError(f"not an MTA-STS record (must begin with v=STSv1): {text!r}")
        fields = parts[1:]
        if fields and fields[-1] == "":
            fields.pop()  # RFC 8461 §3.1: a trailing separator is allowed
        ids: list[str] = []
        for field in fields:
            found = _TXT_ID.fullmatch(field)
            if found is not None:
                ids.append(found.group(1))
            elif field.startswith("id=") or not _TXT_EXTENSION.fullmatch(field):
                raise PolicyError(f"malformed field {field!r} in MTA-STS record {text!r}")
        if len(ids) != 1:
            raise PolicyError(f"an MTA-STS record needs exactly one id: {text!r}")
        return cls(id=ids[0])

    @classmethod
    def select(cls, texts: Iterable[str]) -> STSRecord:
        """The one record among a name's TXT records (RFC 8461 §3.1).

        Records that do not begin with ``v=STSv1`` are discarded.

        Raises:
            PolicyError: none is left, several are, or the one left is not valid.
        """
        candidates = [text for text in texts if text.startswith("v=STSv1")]
        if len(candidates) != 1:
            raise PolicyError(f"{len(candidates)} MTA-STS records, not one")
        return cls.parse(candidates[0])


def _pattern(value: str) -> str:
    """One ``mx`` value, checked (RFC 8461 §3.2: ``["*."] Domain``), in lower case."""
    name = value.lower()
    if name.endswith("."):
        name = name[:-1]
    labels = name[2:].split(".") if name.startswith("*.") else name.split(".")
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise PolicyError(f"not an MX pattern: {value!r}")
    return name


def _patterns(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(_pattern(pattern) for pattern in value)


def _check_max_age(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not 0 <= value <= MAX_MAX_AGE:
        raise PolicyError(f"max_age must be 0 to {MAX_MAX_AGE} seconds, not {value!r}")


def _check_mx(
    instance: STSPolicy, attribute: attrs.Attribute[tuple[str, ...]], value: object
) -> None:
    if not value and instance.mode is not Mode.NONE:
        raise PolicyError(f"a policy in mode {instance.mode.value} needs at least one mx pattern")


@attrs.frozen(kw_only=True)
class STSPolicy:
    """A domain's MTA-STS policy (RFC 8461 §3.2).

    Attributes:
        mode: enforce, testing or none.
        mx: the patterns of the exchangers allowed (``mail.example.com``, or
            ``*.example.com``, whose ``*`` stands for exactly one leftmost label).
        max_age: seconds the policy may be kept after it was fetched (0 to
            :data:`MAX_MAX_AGE`).
    """

    mode: Mode = attrs.field(validator=attrs.validators.instance_of(Mode))
    max_age: int = attrs.field(validator=_check_max_age)
    mx: tuple[str, ...] = attrs.field(default=(), converter=_patterns, validator=_check_mx)

    @classmethod
    def parse(cls, text: str | bytes) -> STSPolicy:
        """Parse a policy file.

        Args:
            text: the body served at ``/.well-known/mta-sts.txt`` (UTF-8 when bytes).

        Raises:
            PolicyError: the text is not a valid policy.
        """
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise PolicyError(f"the policy is not UTF-8: {exc}") from None
        fields: dict[str, str] = {}
        mx: list[str] = []
        # RFC 8461 §3.2: lines end in LF or CRLF.
        for number, raw in enumerate(text.split("\n"), start=1):
            line = raw.removesuffix("\r")
            if not line.strip(_WSP):
                continue  # blank lines (a final line end, say) carry nothing
            key, colon, value = line.partition(":")
            if not colon or not _POLICY_KEY.fullmatch(key):
                raise PolicyError(f"line {number} is not 'key: value': {line[:80]!r}")
            value = value.strip(_WSP)
            if key == "mx":
                mx.append(value)
            elif key in {"version", "mode", "max_age"}:
                fields.setdefault(key, value)
            # RFC 8461 §3.2: unknown fields are ignored (extensions).
        version = fields.get("version")
        if version != _STSV1:
            raise PolicyError(f"version must be {_STSV1}, not {version!r}")
        try:
            mode = Mode(fields.get("mode"))
        except ValueError:
            raise PolicyError(
                f"mode must be enforce, testing or none, not {fields.get('mode')!r}"
            ) from None
        max_age = fields.get("max_age")
        if max_age is None or not _MAX_AGE.fullmatch(max_age):
            raise PolicyError(f"max_age must be a number of seconds, not {max_age!r}")
        return cls(mode=mode, max_age=int(max_age), mx=tuple(mx))

    def allows(self, host: str) -> bool:
        """Whether the exchanger ``host`` matches one of the ``mx`` patterns (RFC 8461 §4.1)."""
        return MXPolicy(mx_patterns=self.mx).allows(host) if self.mx else False

    def mx_policy(self, ssl_context: ssl.SSLContext | None = None) -> MXPolicy | None:
        """What the MX transports must do under this policy: an :class:`MXPolicy` demanding
        verified TLS to matching exchangers for ``enforce``, ``None`` (the defaults) else.

        Args:
            ssl_context: the context verifying the exchangers' certificates (``None``: the
                transport's ``ssl_context``, by default the system's CAs).
        """
        if self.mode is not Mode.ENFORCE:
            return None
        # RFC 8461 §4.2: the certificate must be valid for the exchanger's name and chain
        # to a trusted root; §5: no plain-text fallback.
        return MXPolicy(
            tls=TLS.STARTTLS,
            mx_patterns=self.mx,
            ssl_context=ssl_context,
            plaintext_fallback=False,
            sts_policy_string=self.policy_string(),
        )

    def testing_policy(self, ssl_context: ssl.SSLContext | None = None) -> MXPolicy | None:
        """For a ``testing`` policy, what the MX transports need to verify and report
        without enforcing (RFC 8461 §5): an :class:`MXPolicy` marked ``sts_testing`` (the
        transports deliver under their own defaults, see :mod:`mailrelay.transport.mx`);
        ``None`` for the other modes.

        Args:
            ssl_context: the context verifying the exchangers' certificates for the report
                (``None``: the transport's ``ssl_context``).
        """
        if self.mode is not Mode.TESTING:
            return None
        return MXPolicy(
            tls=TLS.OPPORTUNISTIC,
            mx_patterns=self.mx,
            ssl_context=ssl_context,
            sts_policy_string=self.policy_string(),
            sts_testing=True,
        )

    def policy_string(self) -> tuple[str, ...]:
        """The policy as TLS reports show it (RFC 8460 §4.4 ``policy-string``): one string
        per line, each ``mx`` pattern on a line of its own, in the order of RFC 8461 §3.2."""
        return (
            "version: STSv1",
            f"mode: {self.mode.value}",
            *(f"mx: {pattern}" for pattern in self.mx),
            f"max_age: {self.max_age}",
        )


@attrs.frozen(kw_only=True)
class CachedPolicy:
    """A policy as the cache keeps it.

    Attributes:
        domain: the policy domain (A-label form, lower case).
        id: the TXT record's ``id`` the policy was fetched under.
        policy: the policy.
        fetched_at: when it was fetched, on the cache's clock.
    """

    domain: str
    id: str
    policy: STSPolicy
    fetched_at: float

    @property
    def expires_at(self) -> float:
        """When the policy stops being valid (RFC 8461 §3.2: ``max_age`` after the fetch)."""
        return self.fetched_at + self.policy.max_age


class PolicyCache:
    """The last good policy per domain, until it expires; safe to share between threads.

    Args:
        size: the most domains kept; the least recently used goes first.
    """

    def __init__(self, size: int = _DEFAULT_CACHE_SIZE) -> None:
        if size < 1:
            raise ConfigurationError("the policy cache size must be at least 1")
        self.size = size
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, CachedPolicy] = OrderedDict()

    def get(self, domain: str, now: float) -> CachedPolicy | None:
        """The policy of ``domain`` valid at ``now``, or ``None`` (an expired one is dropped)."""
        with self._lock:
            entry = self._entries.get(domain)
            if entry is None:
                return None
            if now >= entry.expires_at:
                del self._entries[domain]
                return None
            self._entries.move_to_end(domain)
            return entry

    def put(self, entry: CachedPolicy) -> None:
        """Keep ``entry`` as its domain's policy, replacing any earlier one."""
        with self._lock:
            self._entries[entry.domain] = entry
            self._entries.move_to_end(entry.domain)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


# -- the steps, written once ---------------------------------------------------------------


@attrs.frozen
class _LookupTXT:
    """Look up the TXT records at ``name``: answered with their texts, or a ResolverError."""

    name: str


@attrs.frozen
class _Fetch:
    """Fetch ``domain``'s policy: answered with an STSPolicy or a PolicyFetchError."""

    domain: str


_Request: TypeAlias = _LookupTXT | _Fetch
_Answer: TypeAlias = tuple[str, ...] | ResolverError | STSPolicy | PolicyFetchError
_Plan: TypeAlias = Generator[_Request, _Answer, CachedPolicy | None]


def _policy_domain(domain: str) -> str | None:
    """The domain in the form policies are looked up under, or ``None`` when it cannot have
    a policy (an address literal, a name that is not a host name)."""
    name = domain.lower().rstrip(".")
    if not name or name.startswith("[") or not all(_LABEL.fullmatch(p) for p in name.split(".")):
        return None
    return name


class _Core:
    """Configuration, cache and the plan shared by :class:`MTASTS` and :class:`AsyncMTASTS`."""

    def __init__(
        self,
        *,
        port: int,
        timeout: float,
        ssl_context: ssl.SSLContext | None,
        mx_ssl_context: ssl.SSLContext | None,
        clock: Callable[[], float] | None,
        cache: PolicyCache | None,
        fallback: TLSPolicyHook | None,
        retry_delay: float,
        refresh_after: float,
        tls_reporter: STSFailureReporter | None = None,
        allow_private_addresses: bool = False,
    ) -> None:
        if tls_reporter is not None and not callable(
            getattr(tls_reporter, "sts_policy_failure", None)
        ):
            raise ConfigurationError(
                "tls_reporter must have an sts_policy_failure method (a TLSReportCollector)"
            )
        self.tls_reporter = tls_reporter
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ConfigurationError(f"port must be a number from 1 to 65535, not {port!r}")
        if not timeout > 0:
            raise ConfigurationError("the fetch timeout must be positive")
        for name, context in (("ssl_context", ssl_context), ("mx_ssl_context", mx_ssl_context)):
            if context is not None and not isinstance(context, ssl.SSLContext):
                raise ConfigurationError(f"{name} must be an ssl.SSLContext")
        self.port = port
        self.timeout = timeout
        self.allow_private_addresses = bool(allow_private_addresses)
        self.ssl_context = ssl_context
        self.mx_ssl_context = mx_ssl_context
        self.clock = clock if clock is not None else time.monotonic
        self.cache = cache if cache is not None else PolicyCache()
        self.fallback = fallback
        self.retry_delay = retry_delay
        self.refresh_after = refresh_after
        self._failed_lock = threading.Lock()
        self._failed: dict[tuple[str, str], float] = {}  # (domain, id) -> when it failed
        self._findings: set[Hashable] = set()  # testing-mode findings already logged

    def context(self) -> ssl.SSLContext:
        """The context verifying ``mta-sts.<domain>``'s certificate (system CAs by default)."""
        if self.ssl_context is None:
            self.ssl_context = ssl.create_default_context()
        return self.ssl_context

    def refresh_plan(self, domain: str) -> _Plan:
        """RFC 8461 §3 and §5.1: the domain's current policy, fetched when needed."""
        now = self.clock()
        cached = self.cache.get(domain, now)
        answer = yield _LookupTXT(f"_mta-sts.{domain}")
        if isinstance(answer, ResolverError):
            # A failed lookup tells nothing: the cached policy (if any) stays in force.
            log.info("MTA-STS: TXT lookup for %s failed (%s)", domain, answer)
            return cached
        assert isinstance(answer, tuple), "a TXT lookup gives texts or a ResolverError"
        try:
            record = STSRecord.select(answer)
        except PolicyError as exc:
            # RFC 8461 §3.1: treat as no policy; §8.3: a cached one is removed only by a
            # newer policy, not by a vanished or broken record.
            if answer:
                log.info("MTA-STS: %s publishes no usable record: %s", domain, Shown(exc))
            return cached
        if cached is not None and cached.id == record.id:
            if now - cached.fetched_at < self.refresh_after:
                return cached  # RFC 8461 §5.1: same id, same policy: no fetch
            log.info("MTA-STS: renewing the policy of %s (id %s)", domain, record.id)
        if self._recently_failed(domain, record.id, now):
            return cached
        fetched = yield _Fetch(domain)
        if isinstance(fetched, PolicyFetchError):
            self._remember_failure(domain, record.id, now)
            self._report(domain, fetched)
            # RFC 8461 §5.1: a failed refresh never downgrades a valid cached policy.
            log.warning(
                "MTA-STS: could not fetch the policy of %s (id %s): %s%s",
                domain,
                record.id,
                fetched,
                "; keeping the cached one" if cached is not None else "",
            )
            return cached
        assert isinstance(fetched, STSPolicy), "a fetch gives a policy or a PolicyFetchError"
        entry = CachedPolicy(domain=domain, id=record.id, policy=fetched, fetched_at=now)
        self.cache.put(entry)
        log.info(
            "MTA-STS: policy of %s (id %s): mode %s, mx %s, max_age %d",
            domain,
            record.id,
            fetched.mode.value,
            ", ".join(fetched.mx) or "-",
            fetched.max_age,
        )
        return entry

    def _report(self, domain: str, error: PolicyFetchError) -> None:
        """Tell the TLS reporter (RFC 8460 §4.3.2.2); a reporter that fails is only logged."""
        if self.tls_reporter is None:
            return
        try:
            self.tls_reporter.sts_policy_failure(domain, error)
        except Exception:
            log.exception("MTA-STS: the TLS reporter failed on %s", domain)

    def _recently_failed(self, domain: str, record_id: str, now: float) -> bool:
        with self._failed_lock:
            when = self._failed.get((domain, record_id))
            if when is None:
                return False
            if now - when >= self.retry_delay:
                del self._failed[domain, record_id]
                return False
            return True

    def _remember_failure(self, domain: str, record_id: str, now: float) -> None:
        if self.retry_delay <= 0:
            return
        with self._failed_lock:
            if len(self._failed) >= _DEFAULT_CACHE_SIZE:
                self._failed.clear()  # bounded: at worst some fetches are tried early
            self._failed[domain, record_id] = now

    def _reported(self, finding: Hashable) -> bool:
        """Whether ``finding`` was logged before (and remember it from now on)."""
        with self._failed_lock:
            if finding in self._findings:
                return True
            if len(self._findings) >= _DEFAULT_CACHE_SIZE:
                self._findings.clear()  # bounded: at worst a finding is logged again
            self._findings.add(finding)
            return False

    def decide(
        self, domain: str, entry: CachedPolicy | None, mx_hosts: Iterable[str] | None
    ) -> TLS | MXPolicy | None:
        """The hook's answer for ``domain`` given its current policy."""
        if entry is not None:
            policy = entry.policy
            enforced = policy.mx_policy(self.mx_ssl_context)
            if enforced is not None:
                log.debug("MTA-STS: enforcing the policy of %s", domain)
                return enforced
            if policy.mode is Mode.TESTING and mx_hosts is not None:
                refused = [host for host in mx_hosts if not policy.allows(host)]
                if refused:
                    # RFC 8461 §5: testing mode delivers anyway; say what enforce would not
                    # (a WARNING once per policy and finding, then at DEBUG: not per message).
                    finding = (domain, entry.id, entry.fetched_at, tuple(refused))
                    log.log(
                        logging.DEBUG if self._reported(finding) else logging.WARNING,
                        "MTA-STS testing policy of %s: enforce would skip %s (mx: %s)",
                        domain,
                        ", ".join(refused),
                        ", ".join(policy.mx),
                    )
            if policy.mode is Mode.TESTING and self.tls_reporter is not None:
                return self._testing(domain, policy)
        return self.fallback(domain) if self.fallback is not None else None

    def _testing(self, domain: str, policy: STSPolicy) -> TLS | MXPolicy | None:
        """A testing policy's answer when there is a reporter to tell (RFC 8461 §5): the
        policy marked for verifying and reporting, composed with the fallback's answer (a
        DANE verdict is kept beside it; any other answer of the fallback wins, as without
        a reporter)."""
        testing = policy.testing_policy(self.mx_ssl_context)
        assert testing is not None, "a testing policy has a testing MXPolicy"
        other = self.fallback(domain) if self.fallback is not None else None
        if other is None:
            return testing
        if (
            isinstance(other, MXPolicy)
            and other.dane is not None
            and other == MXPolicy(dane=other.dane)
        ):
            return attrs.evolve(testing, dane=other.dane)
        return other


# -- fetching over HTTPS (stdlib only; the machinery is transport._https's) ----------------


def _read_body(
    response: http.client.HTTPResponse, conn: http.client.HTTPConnection, deadline: float
) -> bytes:
    """The body, at most MAX_POLICY_SIZE bytes, read before ``deadline``."""
    length = response.getheader("Content-Length")
    if length is not None and length.strip().isdigit() and int(length) > MAX_POLICY_SIZE:
        raise PolicyFetchError(f"the policy is {int(length)} bytes, more than {MAX_POLICY_SIZE}")
    try:
        # One byte more than a policy may have tells a policy too large.
        body = _https.read_limited(response, conn, deadline, MAX_POLICY_SIZE + 1)
    except TimeoutError:
        raise PolicyFetchError("timed out reading the policy") from None
    if len(body) > MAX_POLICY_SIZE:
        raise PolicyFetchError(f"the policy is more than {MAX_POLICY_SIZE} bytes")
    return body


def _fetch_at(
    host: str, address: str, port: int, context: ssl.SSLContext, deadline: float
) -> bytes:
    with _https.pinned_connection(host, (address,), port, context, deadline) as conn:
        try:
            conn.request(
                "GET",
                POLICY_PATH,
                headers={"Accept": "text/plain", "User-Agent": "mailrelay (MTA-STS)"},
            )
            response = conn.getresponse()
            # RFC 8461 §3.3: redirects MUST NOT be followed; only a 200 is a policy.
            refusal = _https.status_refusal(response, lambda status: status == 200)
            if refusal is not None:
                raise PolicyFetchError(refusal)
            kind = response.getheader("Content-Type")
            # RFC 8461 §3.2: the policy is served as text/plain (parameters such as charset
            # allowed).
            if kind is None or kind.split(";", 1)[0].strip().lower() != "text/plain":
                raise PolicyFetchError(f"media type {kind!r}, not text/plain")
            return _read_body(response, conn, deadline)
        except (OSError, http.client.HTTPException) as exc:
            if time.monotonic() >= deadline:
                raise PolicyFetchError(f"timed out ({type(exc).__name__}: {exc})") from None
            raise


def fetch_policy(
    domain: str,
    addresses: Iterable[str],
    *,
    port: int,
    context: ssl.SSLContext,
    timeout: float,
    allow_private_addresses: bool = False,
) -> STSPolicy:
    """Fetch and parse ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` (RFC 8461 §3.3).

    Args:
        domain: the policy domain (A-label form).
        addresses: the addresses of ``mta-sts.<domain>``, tried in turn until one answers.
        port: the HTTPS port (443; tests use another).
        context: the context verifying the certificate against ``mta-sts.<domain>``.
        timeout: seconds the whole fetch may take.
        allow_private_addresses: connect to addresses that are not public too (loopback,
            private networks...); by default one such address fails the fetch before any
            connection (a guard against server-side request forgery).

    Raises:
        PolicyFetchError: an address is not public (unless allowed), or no address answered
            with a valid policy.
    """
    host = f"mta-sts.{domain}"
    addresses = tuple(addresses)
    _https.refuse_private(
        host, addresses, allow_private_addresses=allow_private_addresses,
        error=PolicyFetchError, action="fetch from",
    )  # fmt: skip
    deadline = time.monotonic() + timeout
    failures: list[str] = []
    for address in addresses:
        if time.monotonic() >= deadline:
            failures.append("timed out")
            break
        try:
            body = _fetch_at(host, address, port, context, deadline)
        except PolicyFetchError as exc:
            failures.append(f"{address}: {exc}")
            continue
        except ssl.SSLError as exc:  # before OSError: it is one
            failures.append(f"{address}: TLS failure: {exc}")
            continue
        except (OSError, http.client.HTTPException) as exc:
            failures.append(f"{address}: {type(exc).__name__}: {exc}")
            continue
        try:
            return STSPolicy.parse(body)
        except PolicyError as exc:
            raise PolicyFetchError(f"{host} serves an invalid policy: {exc}") from None
    if not failures:
        raise PolicyFetchError(f"{host} has no address")
    raise PolicyFetchError(f"https://{host}{POLICY_PATH}: " + "; ".join(failures))


# -- the hooks -------------------------------------------------------------------------------

_MAX_PLAN_STEPS: Final = 3


def _lookup_timed_out(host: str, timeout: float) -> PolicyFetchError:
    """The failed fetch of a policy host whose addresses were not found within ``timeout``."""
    return PolicyFetchError(f"{host}: timed out resolving the name ({timeout:g} s)")


class STSFailureReporter(Protocol):
    """What the hooks' ``tls_reporter`` must do (a
    :class:`~mailrelay.transport.tlsrpt.TLSReportCollector` does): take note of a failed
    policy fetch, quickly, without blocking or awaiting."""

    def sts_policy_failure(self, domain: str, error: PolicyFetchError) -> None:
        """Record that ``domain``'s policy could not be fetched (or parsed)."""


class MTASTS:
    """MTA-STS for :class:`~mailrelay.transport.mx.MXTransport`: pass it as ``tls_policy``.

    Calling it with a domain (as the transport does, once per domain and delivery) looks up
    the domain's ``_mta-sts`` TXT record, fetches the policy when it is new, and returns an
    :class:`~mailrelay.transport.mx.MXPolicy` demanding verified TLS to the listed exchangers
    for an ``enforce`` policy; otherwise ``fallback(domain)``, or ``None`` (the transport's
    opportunistic default). Safe to share between threads.

    Args:
        resolver: the resolver that finds the TXT record and ``mta-sts.<domain>``'s
            addresses (share the transport's); ``None`` makes one reading the system's
            resolver configuration.
        port: the HTTPS port of the policy hosts (443; tests point it elsewhere).
        timeout: seconds one policy fetch may take in all, the lookup of
            ``mta-sts.<domain>``'s addresses included.
        ssl_context: the context verifying the policy hosts' certificates; ``None``: the
            system's CAs.
        mx_ssl_context: the context verifying exchangers under an ``enforce`` policy;
            ``None``: the transport's ``ssl_context``, by default the system's CAs.
        clock: a monotonic clock in seconds, for ``max_age`` (tests inject one).
        cache: a :class:`PolicyCache` to share; ``None`` makes one.
        fallback: a ``tls_policy`` hook asked for domains without an ``enforce`` policy.
        retry_delay: seconds before a policy whose fetch failed is fetched again.
        refresh_after: seconds after which a cached policy is fetched again even though its
            ``id`` is unchanged (renewing it before it expires; a failure keeps it).
        tls_reporter: told about each failed policy fetch, for TLS reporting (RFC 8460,
            a :class:`~mailrelay.transport.tlsrpt.TLSReportCollector`); ``None``: not told.
            With one, a ``testing`` policy is answered with
            :meth:`STSPolicy.testing_policy`, so that an MX transport given the same
            reporter verifies and reports its exchangers (and still delivers).
        allow_private_addresses: fetch policies from hosts that resolve to addresses that
            are not public (loopback, RFC 1918, link-local, CGNAT, unique-local...). By
            default such a fetch fails (a :class:`PolicyFetchError`, like any failed fetch)
            before any connection: the domain's DNS chooses the host, and must not make
            the sender reach internal services. Set it for internal deployments only.
    """

    def __init__(
        self,
        resolver: Resolver | None = None,
        *,
        port: int = 443,
        timeout: float = DEFAULT_FETCH_TIMEOUT,
        ssl_context: ssl.SSLContext | None = None,
        mx_ssl_context: ssl.SSLContext | None = None,
        clock: Callable[[], float] | None = None,
        cache: PolicyCache | None = None,
        fallback: TLSPolicyHook | None = None,
        retry_delay: float = FETCH_RETRY_DELAY,
        refresh_after: float = DEFAULT_REFRESH_AFTER,
        tls_reporter: STSFailureReporter | None = None,
        allow_private_addresses: bool = False,
    ) -> None:
        if resolver is not None and not isinstance(resolver, Resolver):
            raise ConfigurationError("MTASTS needs a mailrelay.resolver.Resolver")
        self.resolver = resolver if resolver is not None else Resolver()
        self._core = _Core(
            port=port, timeout=timeout, ssl_context=ssl_context, mx_ssl_context=mx_ssl_context,
            clock=clock, cache=cache, fallback=fallback, retry_delay=retry_delay,
            refresh_after=refresh_after, tls_reporter=tls_reporter,
            allow_private_addresses=allow_private_addresses,
        )  # fmt: skip
        # Striped locks: one domain's refreshes run one at a time (the second finds the
        # first's policy cached); different domains rarely wait for each other.
        self._locks = tuple(threading.Lock() for _ in range(32))

    @property
    def cache(self) -> PolicyCache:
        """The policies kept."""
        return self._core.cache

    def __call__(self, domain: str) -> TLS | MXPolicy | None:
        """The ``tls_policy`` answer for ``domain`` (its A-label form).

        It waits for DNS and HTTPS: give :class:`AsyncMTASTS` to an ``AsyncMXTransport``.
        """
        name = _policy_domain(domain)
        if name is None:
            return self._core.fallback(domain) if self._core.fallback is not None else None
        entry = self.policy(name)
        hosts = None
        if entry is not None and entry.policy.mode is Mode.TESTING:
            hosts = self._mx_hosts(name)
        return self._core.decide(name, entry, hosts)

    def policy(self, domain: str) -> CachedPolicy | None:
        """The domain's current policy (looked up, fetched when new), or ``None``."""
        name = _policy_domain(domain)
        if name is None:
            return None
        with self._locks[hash(name) % len(self._locks)]:
            plan = self._core.refresh_plan(name)
            answer: _Answer | None = None
            for _ in range(_MAX_PLAN_STEPS):
                try:
                    request = plan.send(answer) if answer is not None else next(plan)
                except StopIteration as done:
                    result: CachedPolicy | None = done.value
                    return result
                answer = self._carry_out(request)
        raise AssertionError("the MTA-STS plan took more steps than it can")

    def _carry_out(self, request: _Request) -> _Answer:
        if isinstance(request, _LookupTXT):
            try:
                return self.resolver.txt(request.name)
            except ResolverError as exc:
                return exc
        core = self._core
        host = f"mta-sts.{request.domain}"
        # The lookup of the policy host counts against the fetch's timeout: it runs in a
        # worker thread, waited for until the deadline (see transport._https).
        deadline = time.monotonic() + core.timeout
        try:
            found = _https.resolve_before(deadline, lambda: self.resolver.addresses(host))
        except ResolverError as exc:
            return PolicyFetchError(f"{host}: {exc}")
        except TimeoutError:
            return _lookup_timed_out(host, core.timeout)
        try:
            return fetch_policy(
                request.domain, found.addresses, port=core.port, context=core.context(),
                timeout=max(deadline - time.monotonic(), 0.0),
                allow_private_addresses=core.allow_private_addresses,
            )  # fmt: skip
        except PolicyFetchError as exc:
            return exc

    def _mx_hosts(self, domain: str) -> tuple[str, ...] | None:
        # The transport looks the exchangers up right after asking us: this fills the
        # shared cache it then reads, so it costs no extra query.
        try:
            return tuple(host.name for host in self.resolver.mail_hosts(domain).hosts)
        except ResolverError:
            return None

    def __repr__(self) -> str:
        return f"<MTASTS port={self._core.port} cached={len(self._core.cache)}>"


class AsyncMTASTS:
    """MTA-STS for :class:`~mailrelay.transport.mx_async.AsyncMXTransport`.

    A coroutine-function hook: the transport awaits it before each domain's delivery, so a
    domain's policy holds from its first delivery, as with :class:`MTASTS`. The check is
    :class:`MTASTS`'s (DNS through the :class:`~mailrelay.resolver.AsyncResolver`, the
    HTTPS fetch in a worker thread, so the event loop never blocks); concurrent deliveries
    to one domain share one check. ``await mta_sts.prepare(domains)`` checks domains ahead
    of time, at the same time. The arguments are :class:`MTASTS`'s.

    Args:
        resolver: an :class:`~mailrelay.resolver.AsyncResolver` (share the transport's).
        port: as for :class:`MTASTS`.
        timeout: as for :class:`MTASTS`.
        ssl_context: as for :class:`MTASTS`.
        mx_ssl_context: as for :class:`MTASTS`.
        clock: as for :class:`MTASTS`.
        cache: as for :class:`MTASTS`.
        fallback: as for :class:`MTASTS`.
        retry_delay: as for :class:`MTASTS`.
        refresh_after: as for :class:`MTASTS`.
        tls_reporter: as for :class:`MTASTS`.
        allow_private_addresses: as for :class:`MTASTS`.
    """

    def __init__(
        self,
        resolver: AsyncResolver | None = None,
        *,
        port: int = 443,
        timeout: float = DEFAULT_FETCH_TIMEOUT,
        ssl_context: ssl.SSLContext | None = None,
        mx_ssl_context: ssl.SSLContext | None = None,
        clock: Callable[[], float] | None = None,
        cache: PolicyCache | None = None,
        fallback: TLSPolicyHook | None = None,
        retry_delay: float = FETCH_RETRY_DELAY,
        refresh_after: float = DEFAULT_REFRESH_AFTER,
        tls_reporter: STSFailureReporter | None = None,
        allow_private_addresses: bool = False,
    ) -> None:
        if resolver is not None and not isinstance(resolver, AsyncResolver):
            raise ConfigurationError("AsyncMTASTS needs a mailrelay.resolver.AsyncResolver")
        self.resolver = resolver if resolver is not None else AsyncResolver()
        self._core = _Core(
            port=port, timeout=timeout, ssl_context=ssl_context, mx_ssl_context=mx_ssl_context,
            clock=clock, cache=cache, fallback=fallback, retry_delay=retry_delay,
            refresh_after=refresh_after, tls_reporter=tls_reporter,
            allow_private_addresses=allow_private_addresses,
        )  # fmt: skip
        self._checks: dict[str, asyncio.Task[CachedPolicy | None]] = {}

    @property
    def cache(self) -> PolicyCache:
        """The policies kept."""
        return self._core.cache

    async def __call__(self, domain: str) -> TLS | MXPolicy | None:
        """The ``tls_policy`` answer for ``domain``, once its check (when due) is done."""
        name = _policy_domain(domain)
        if name is None:
            return self._core.fallback(domain) if self._core.fallback is not None else None
        # Shielded: a cancelled delivery must not cancel the check others await. A check
        # that failed is logged by _check_done; what the cache holds decides.
        with contextlib.suppress(Exception):
            await asyncio.shield(self._check_in_background(name))
        entry = self._core.cache.get(name, self._core.clock())
        hosts = None
        if entry is not None and entry.policy.mode is Mode.TESTING:
            found = self.resolver.cached_mail_hosts(name)
            hosts = tuple(h.name for h in found.hosts) if found is not None else None
        return self._core.decide(name, entry, hosts)

    def _check_in_background(self, name: str) -> asyncio.Task[CachedPolicy | None]:
        """The check of ``name`` under way in this loop, or a new one: overlapping checks of
        one domain share one lookup and fetch."""
        loop = asyncio.get_running_loop()
        running = self._checks.get(name)
        if running is not None and not running.done() and running.get_loop() is loop:
            return running
        task = loop.create_task(self._refresh(name), name=f"mta-sts {name}")
        self._checks[name] = task
        task.add_done_callback(lambda done: self._check_done(name, done))
        return task

    def _check_done(self, name: str, task: asyncio.Task[CachedPolicy | None]) -> None:
        if self._checks.get(name) is task:
            del self._checks[name]
        if not task.cancelled() and task.exception() is not None:
            log.error("MTA-STS: the check of %s failed", name, exc_info=task.exception())

    async def apolicy(self, domain: str) -> CachedPolicy | None:
        """The domain's current policy (looked up, fetched when new), or ``None``."""
        name = _policy_domain(domain)
        if name is None:
            return None
        # Shielded: one caller's cancellation must not cancel the check others await.
        return await asyncio.shield(self._check_in_background(name))

    async def _refresh(self, name: str) -> CachedPolicy | None:
        plan = self._core.refresh_plan(name)
        answer: _Answer | None = None
        for _ in range(_MAX_PLAN_STEPS):
            try:
                request = plan.send(answer) if answer is not None else next(plan)
            except StopIteration as done:
                result: CachedPolicy | None = done.value
                return result
            answer = await self._carry_out(request)
        raise AssertionError("the MTA-STS plan took more steps than it can")

    async def prepare(self, domains: Iterable[str]) -> None:
        """Check ``domains`` now (at the same time), so that their first delivery already
        has their policies: ``await mta_sts.prepare(a.ascii_domain for a in recipients)``."""
        names = {name for name in map(_policy_domain, domains) if name is not None}
        async with asyncio.TaskGroup() as group:
            for name in names:
                group.create_task(self.apolicy(name))

    async def _carry_out(self, request: _Request) -> _Answer:
        if isinstance(request, _LookupTXT):
            try:
                return await self.resolver.txt(request.name)
            except ResolverError as exc:
                return exc
        core = self._core
        host = f"mta-sts.{request.domain}"
        # The lookup of the policy host counts against the fetch's timeout.
        deadline = time.monotonic() + core.timeout
        try:
            found = await asyncio.wait_for(self.resolver.addresses(host), core.timeout)
        except ResolverError as exc:
            return PolicyFetchError(f"{host}: {exc}")
        except TimeoutError:
            return _lookup_timed_out(host, core.timeout)
        try:
            # http.client blocks: the fetch runs in a worker thread, not on the loop.
            return await asyncio.to_thread(
                fetch_policy, request.domain, found.addresses, port=core.port,
                context=core.context(), timeout=max(deadline - time.monotonic(), 0.0),
                allow_private_addresses=core.allow_private_addresses,
            )  # fmt: skip
        except PolicyFetchError as exc:
            return exc

    def __repr__(self) -> str:
        return f"<AsyncMTASTS port={self._core.port} cached={len(self._core.cache)}>"
