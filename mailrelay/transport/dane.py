"""DANE for SMTP (RFC 7672): exchangers authenticated by DNSSEC-signed TLSA records.

Theory of operation: :class:`DANE` (blocking) and :class:`AsyncDANE` (asyncio) are
``tls_policy`` hooks for the MX transports, siblings of :class:`~mailrelay.transport.mtasts.MTASTS`
(``MXTransport(resolver, tls_policy=DANE(resolver))``). Asked about a domain, the hook looks
up its exchangers (through the transport's resolver, so the transport's own lookup is a cache
hit) and each exchanger's TLSA records, and answers with an
:class:`~mailrelay.transport.mx.MXPolicy` carrying a :class:`DANEPolicy`: what DANE demands
of each exchanger. The transport then connects as usual; for an exchanger with usable TLSA
records it requires STARTTLS, does the handshake *without* WebPKI checks, and, before the
session is used for any transaction (before MAIL FROM), checks the certificates the server
presented against the TLSA records (:func:`check_chain`). The matching is pure code on DER
bytes, no I/O, no dependency beyond the standard library.

Rules of this module (RFC sections cited where they are enforced):

- The resolver must be a *validating* one on a trusted path: DANE reads the AD bit
  (:mod:`mailrelay.resolver`). Without one no answer is secure and DANE never applies.
- RFC 7672 §2.2.1: DANE applies only to exchangers found through a *secure* MX RRset (or,
  for a domain without MX, a secure denial and secure address records). The RFC allows
  DANE for insecure MX RRsets too (a MAY); we do not, as Postfix does not.
- RFC 7672 §2.2.2: an exchanger's TLSA records are looked up only when its address records
  are secure; ``_<port>._tcp.<exchanger>``, port 25 by default. The name is the exchanger's
  name as the MX record gives it (we do not try the CNAME-expanded name first, as §2.2.2
  would for an exchanger that is an alias).
- RFC 7672 §2.2: a secure TLSA RRset with usable records makes the exchanger a *DANE host*:
  STARTTLS is required, and the server's certificate must match one usable record; no
  plain text, ever. A secure TLSA RRset whose records are all unusable still means TLS is
  required (the exchanger announced it supports TLS), but it cannot be authenticated:
  encryption without authentication, never plain text. An insecure RRset, or a secure
  denial (NODATA, NXDOMAIN), means no DANE for that exchanger: the transport's usual
  opportunistic TLS.
- RFC 7672 §2.1.1: a TLSA lookup that fails (SERVFAIL, which is how a validating resolver
  answers bogus data, or a timeout) is not "no records": the exchanger is skipped as if it
  were unreachable (TRANSIENT), never tried without authentication.
- Usable records (RFC 7672 §3.1): usage DANE-TA (2) or DANE-EE (3), selector 0 (whole
  certificate) or 1 (SubjectPublicKeyInfo), matching type 0 (exact), 1 (SHA-256) or
  2 (SHA-512), and a digest of the right length. PKIX-TA (0) and PKIX-EE (1) are unusable
  for SMTP (RFC 7672 §3.1.3): an MTA has no agreed set of CAs.
- DANE-EE (RFC 7672 §3.1.1): the leaf certificate (or its key) must match; the names in
  it and its validity dates are not checked: the DNS binds the key to the exchanger.
- DANE-TA (RFC 7672 §3.1.2, §3.2.2): a certificate the server presented *above* the leaf
  must match the record; the leaf must chain to it (signatures, validity dates) and name the
  exchanger (the TLSA base domain, §3.2.2; a wildcard in the leftmost label is accepted,
  §3.2.3). Python's :mod:`ssl` cannot verify a chain after the handshake, so the transport
  connects a second time with a context trusting only that certificate (partial chains
  allowed, host name checked): OpenSSL then verifies the chain and name. The presented chain
  comes from ``SSLObject.get_unverified_chain()`` (public from Python 3.13, read from the
  private ``_sslobj`` before): where neither exists only the leaf is known, and DANE-TA
  records cannot match (the host fails, it is never sent to unauthenticated).
- A DANE host that fails (no STARTTLS, a failed handshake, no matching record) is skipped;
  the next exchanger is tried; when none takes the message the recipients are TRANSIENT
  with a reason naming DANE (a TLS policy failure defers, it never bounces).
- Precedence over MTA-STS (RFC 8461 §2: where DANE TLSA records apply, they win): when DANE
  applies to at least one exchanger of the domain, the hook answers and ``fallback``
  (an :class:`~mailrelay.transport.mtasts.MTASTS`, say) is never asked; otherwise the
  domain is ``fallback``'s. Exchangers of a DANE domain without TLSA records get the
  transport's defaults (``tls=``, ``plaintext_fallback=``: opportunistic TLS unless told
  otherwise).
"""

from __future__ import annotations

import enum
import hashlib
import inspect
import logging
import ssl
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Final

import attrs

from mailrelay.errors import ConfigurationError, ResolverError, TLSError
from mailrelay.mailhosts import MailHost, MailHosts, TLSARecord, TLSARecords
from mailrelay.options import TLS
from mailrelay.resolver import AsyncResolver, Resolver

if TYPE_CHECKING:
    from mailrelay.transport.mx_plan import AsyncTLSPolicyHook, MXPolicy, TLSPolicyHook

__all__ = [
    "DANE",
    "AsyncDANE",
    "DANEHost",
    "DANEMatch",
    "DANEPolicy",
    "HostState",
    "check_chain",
    "is_usable",
    "matches",
    "spki",
    "trust_anchor_context",
]

log = logging.getLogger(__name__)

#: RFC 6698 §2.1.1 / RFC 7218: certificate usages.
PKIX_TA: Final = 0
PKIX_EE: Final = 1
DANE_TA: Final = 2
DANE_EE: Final = 3
#: RFC 6698 §2.1.3: the digest lengths of matching types 1 (SHA-256) and 2 (SHA-512).
_DIGEST_SIZES: Final = {1: 32, 2: 64}


# -- matching (RFC 6698 §2.1, RFC 7671 §5) -------------------------------------------------------


def _tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """The DER element at ``pos``: (tag, start of its contents, end). ValueError if malformed."""
    if pos + 2 > len(data):
        raise ValueError("truncated DER")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise ValueError("multi-byte DER tags do not occur in a certificate's first fields")
    length = data[pos + 1]
    start = pos + 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or start + count > len(data):
            raise ValueError("bad DER length")
        length = int.from_bytes(data[start : start + count], "big")
        start += count
    end = start + length
    if end > len(data):
        raise ValueError("truncated DER")
    return tag, start, end


def spki(certificate: bytes) -> bytes:
    """The DER SubjectPublicKeyInfo of a DER certificate (RFC 5280 §4.1).

    Certificate = SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL, serialNumber,
    signature, issuer, validity, subject, subjectPublicKeyInfo, ... }, ... }.

    Raises:
        ValueError: ``certificate`` is not a DER certificate.
    """
    tag, start, end = _tlv(certificate, 0)
    if tag != 0x30 or end != len(certificate):
        raise ValueError("not a DER certificate")
    tag, pos, tbs_end = _tlv(certificate, start)
    if tag != 0x30:
        raise ValueError("not a DER certificate")
    tag, _, after = _tlv(certificate, pos)
    if tag == 0xA0:  # the explicit [0] version
        pos = after
    for _field in ("serialNumber", "signature", "issuer", "validity", "subject"):
        _, _, pos = _tlv(certificate, pos)
        if pos > tbs_end:
            raise ValueError("not a DER certificate")
    tag, _, end = _tlv(certificate, pos)
    if tag != 0x30 or end > tbs_end:
        raise ValueError("not a DER certificate")
    return certificate[pos:end]


def is_usable(record: TLSARecord) -> bool:
    """Whether an SMTP client can use ``record`` (RFC 7672 §3.1; §3.1.3: not PKIX-*)."""
    if record.usage not in (DANE_TA, DANE_EE) or record.selector not in (0, 1):
        return False
    if record.matching_type == 0:
        return bool(record.data)
    size = _DIGEST_SIZES.get(record.matching_type)
    # RFC 7671 §5: a digest of the wrong length can never match; treat it as unusable.
    return size is not None and len(record.data) == size


def matches(record: TLSARecord, certificate: bytes) -> bool:
    """Whether ``record``'s selector and matching type applied to ``certificate`` (DER)
    give its association data (RFC 6698 §2.1.2, §2.1.3). A certificate that does not parse
    matches nothing."""
    if record.selector == 0:
        content = certificate
    elif record.selector == 1:
        try:
            content = spki(certificate)
        except ValueError:
            return False
    else:
        return False
    if record.matching_type == 0:
        return content == record.data
    if record.matching_type == 1:
        return hashlib.sha256(content).digest() == record.data
    if record.matching_type == 2:
        return hashlib.sha512(content).digest() == record.data
    return False


# -- what DANE demands of each exchanger ---------------------------------------------------------


class HostState(enum.Enum):
    """What DANE demands of one exchanger."""

    AUTHENTICATE = "authenticate"
    """Secure, usable TLSA records: STARTTLS required, certificate matched against them."""
    ENCRYPT = "encrypt"
    """Secure TLSA records, none usable: STARTTLS required, no authentication possible."""
    FAILED = "failed"
    """The TLSA lookup failed (bogus, SERVFAIL, timeout): do not use this exchanger now."""


@attrs.frozen(kw_only=True)
class DANEHost:
    """DANE's verdict on one exchanger.

    Attributes:
        name: the exchanger's name (as in the MX record).
        state: what is demanded of it.
        records: its usable TLSA records (under ``AUTHENTICATE``).
        reason: why the lookup failed (under ``FAILED``).
    """

    name: str
    state: HostState
    records: tuple[TLSARecord, ...] = ()
    reason: str = ""


@attrs.frozen(kw_only=True)
class DANEPolicy:
    """DANE's verdicts on a domain's exchangers (those without one get the usual TLS).

    Attributes:
        hosts: the exchangers DANE applies to.
    """

    hosts: tuple[DANEHost, ...] = ()

    def for_host(self, name: str) -> DANEHost | None:
        """The verdict on the exchanger ``name``, or ``None`` when DANE does not apply."""
        name = name.lower().rstrip(".")
        for host in self.hosts:
            if host.name == name:
                return host
        return None


@attrs.frozen(kw_only=True)
class DANEMatch:
    """How a server's certificates matched its TLSA records.

    Attributes:
        record: the record that matched.
        trust_anchor: under DANE-TA, the DER certificate that matched (the leaf must still
            be verified to chain to it and to name the exchanger); ``None`` under DANE-EE.
    """

    record: TLSARecord
    trust_anchor: bytes | None = None

    def __str__(self) -> str:
        name = "DANE-TA" if self.record.usage == DANE_TA else "DANE-EE"
        r = self.record
        return f"{name} ({r.usage} {r.selector} {r.matching_type})"


def check_chain(host: DANEHost, chain: Sequence[bytes], *, peer: str | None = None) -> DANEMatch:
    """Match the certificates a server presented (DER, leaf first) against ``host``'s
    usable TLSA records: DANE-EE records against the leaf, DANE-TA records against the
    certificates above it (RFC 7672 §3.1.1, §3.1.2). DANE-EE is preferred when both match:
    it needs no further check.

    Args:
        host: the exchanger's verdict (its usable records).
        chain: the presented certificates, DER, leaf first.
        peer: the target, as errors name it.

    Raises:
        TLSError: (transient) nothing matched, or the server presented no certificate.
    """
    if not chain:
        raise TLSError(f"DANE: {host.name} presented no certificate", is_transient=True, host=peer)
    leaf, above = chain[0], chain[1:]
    for record in host.records:
        if record.usage == DANE_EE and matches(record, leaf):
            return DANEMatch(record=record)
    for record in host.records:
        if record.usage == DANE_TA:
            for certificate in above:
                if matches(record, certificate):
                    return DANEMatch(record=record, trust_anchor=certificate)
    shown = ", ".join(str(record)[:24] + "…" for record in host.records)
    raise TLSError(
        f"DANE: the certificate of {host.name} matches none of its TLSA records ({shown})",
        is_transient=True,
        host=peer,
    )


def trust_anchor_context(trust_anchor: bytes) -> ssl.SSLContext:
    """A context that trusts only ``trust_anchor`` (DER) and checks the host name: the
    second handshake of DANE-TA (RFC 7672 §3.2.2). Partial chains are allowed, since a
    DANE-TA certificate is often an intermediate, not a self-signed root.

    Raises:
        TLSError: (transient) OpenSSL cannot load the certificate as a trust anchor (it
            came from the server: the exchanger fails DANE, never the whole delivery).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cadata=trust_anchor)
    except (ssl.SSLError, ValueError) as exc:
        raise TLSError(
            f"DANE-TA: the matched certificate cannot serve as a trust anchor: {exc}",
            is_transient=True,
        ) from exc
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def _host_verdict(host: MailHost, found: TLSARecords | ResolverError) -> DANEHost | None:
    if isinstance(found, ResolverError):
        # RFC 7672 §2.1.1: a failed TLSA lookup is neither "records" nor "no records".
        return DANEHost(name=host.name, state=HostState.FAILED, reason=str(found))
    if not found.secure or not found.records:
        return None  # RFC 7672 §2.2: insecure records, or none: no DANE for this host
    usable = tuple(record for record in found.records if is_usable(record))
    if not usable:
        # RFC 7672 §2.2: TLS is required all the same; it cannot be authenticated.
        return DANEHost(name=host.name, state=HostState.ENCRYPT)
    return DANEHost(name=host.name, state=HostState.AUTHENTICATE, records=usable)


def _candidates(found: MailHosts) -> list[MailHost]:
    """The exchangers whose TLSA records are to be looked up."""
    if not found.secure:
        return []  # RFC 7672 §2.2.1: DANE only through a secure MX RRset
    # RFC 7672 §2.2.2: only for exchangers whose address records are secure.
    return [host for host in found.hosts if host.secure and host.addresses]


def _policy(hosts: Iterable[DANEHost | None]) -> MXPolicy | None:
    # mx_plan imports this module: a top-level import would be a cycle.
    from mailrelay.transport.mx_plan import MXPolicy  # noqa: PLC0415

    verdicts = tuple(host for host in hosts if host is not None)
    if not verdicts:
        return None
    # Nothing but the verdicts: the transport keeps its defaults for the other exchangers.
    return MXPolicy(dane=DANEPolicy(hosts=verdicts))


def _check_port(port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigurationError(f"port must be a number from 1 to 65535, not {port!r}")
    return port


class DANE:
    """DANE for :class:`~mailrelay.transport.mx.MXTransport`: pass it as ``tls_policy``.

    Args:
        resolver: the resolver (share the transport's, so the exchangers are looked up
            once); it must ask a validating resolver on a trusted path (see the module
            docs); ``None`` makes one reading the system's configuration.
        port: the port whose TLSA records are looked up (``_25._tcp.<exchanger>``). It is
            the port mail goes to; tests that run servers elsewhere keep 25 here.
        fallback: a ``tls_policy`` hook asked for domains DANE does not apply to (an
            :class:`~mailrelay.transport.mtasts.MTASTS`, say: DANE takes precedence).
    """

    def __init__(
        self,
        resolver: Resolver | None = None,
        *,
        port: int = 25,
        fallback: TLSPolicyHook | None = None,
    ) -> None:
        if resolver is not None and not isinstance(resolver, Resolver):
            raise ConfigurationError("DANE needs a mailrelay.resolver.Resolver")
        self.resolver = resolver if resolver is not None else Resolver()
        self.port = _check_port(port)
        self.fallback = fallback

    def __call__(self, domain: str) -> TLS | MXPolicy | None:
        """The ``tls_policy`` answer for ``domain`` (its A-label form)."""
        policy = self.policy(domain)
        if policy is not None:
            return policy
        return self.fallback(domain) if self.fallback is not None else None

    def policy(self, domain: str) -> MXPolicy | None:
        """The DANE policy of ``domain``, or ``None`` when DANE does not apply to it."""
        if domain.startswith("["):
            return None  # an address literal has no MX RRset to be secure
        try:
            found = self.resolver.mail_hosts(domain)
        except ResolverError:
            return None  # the transport meets the same failure: TRANSIENT
        hosts = _candidates(found)
        answers = self.resolver.tlsa_many([host.name for host in hosts], self.port)
        return _policy(map(_host_verdict, hosts, answers))

    def __repr__(self) -> str:
        return f"<DANE port={self.port}>"


class AsyncDANE:
    """DANE for :class:`~mailrelay.transport.mx_async.AsyncMXTransport` (a coroutine
    hook: the transport awaits it before each domain's delivery). The exchangers' TLSA
    records are looked up at the same time. The arguments are :class:`DANE`'s.

    Args:
        resolver: an :class:`~mailrelay.resolver.AsyncResolver` (share the transport's).
        port: as for :class:`DANE`.
        fallback: as for :class:`DANE`; a plain hook or a coroutine function (such as
            :class:`~mailrelay.transport.mtasts.AsyncMTASTS`).
    """

    def __init__(
        self,
        resolver: AsyncResolver | None = None,
        *,
        port: int = 25,
        fallback: AsyncTLSPolicyHook | None = None,
    ) -> None:
        if resolver is not None and not isinstance(resolver, AsyncResolver):
            raise ConfigurationError("AsyncDANE needs a mailrelay.resolver.AsyncResolver")
        self.resolver = resolver if resolver is not None else AsyncResolver()
        self.port = _check_port(port)
        self.fallback = fallback

    async def __call__(self, domain: str) -> TLS | MXPolicy | None:
        """The ``tls_policy`` answer for ``domain``, once its records are looked up."""
        policy = await self.policy(domain)
        if policy is not None:
            return policy
        if self.fallback is None:
            return None
        answer = self.fallback(domain)
        if inspect.isawaitable(answer):
            return await answer
        return answer

    async def policy(self, domain: str) -> MXPolicy | None:
        """The DANE policy of ``domain``, or ``None``; see :meth:`DANE.policy`."""
        if domain.startswith("["):
            return None
        try:
            found = await self.resolver.mail_hosts(domain)
        except ResolverError:
            return None
        hosts = _candidates(found)
        answers = await self.resolver.tlsa_many([host.name for host in hosts], self.port)
        return _policy(map(_host_verdict, hosts, answers))

    def __repr__(self) -> str:
        return f"<AsyncDANE port={self.port}>"
