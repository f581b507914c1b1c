"""SMTP TLS Reporting (TLS-RPT, RFC 8460) for the MX transports: collect, report, send.

Theory of operation: a :class:`TLSReportCollector` is given to the MX transports
(:class:`~mailrelay.transport.mx.MXTransport`,
:class:`~mailrelay.transport.mx_async.AsyncMXTransport`) as ``tls_reporter=``.
The transports tell it how TLS went on every *fresh* session to an exchanger
(:class:`~mailrelay.transport.mx_plan.TLSAttempt`); it classifies the attempt
(:func:`classify`: which policy applied, success or which RFC 8460 §4.3 result type) and
adds it to per-policy counters. Once a day the application calls
:meth:`TLSReportCollector.reports`, which closes the period and returns one
:class:`TLSReport` per policy domain; for each, :func:`discover` / :func:`adiscover` read
the domain's ``_smtp._tls`` TXT record, and the report goes to each ``rua`` URI: a
``mailto:`` one as the email :func:`report_message` builds (sent with any transport; DKIM
signing, RFC 8460 §5.3's MUST, is the caller's
:class:`~mailrelay.transport.signing.SigningTransport`), an ``https:`` one by
:func:`post_report`.

Rules of this module (RFC 8460 sections cited where they are enforced):

- What counts (§4.4 ``summary``): one session per fresh connection whose TLS was attempted
  (TLS required, DANE, or opportunistic). A reused pooled session is not a new TLS
  negotiation and is not counted; neither is a plain-text session the policy chose (``TLS.NONE``,
  or the plain-text retry after a failed opportunistic handshake, which was already counted as
  the failure it was), nor a connection that never reached TLS (refused, timed out). Under
  an MTA-STS ``testing`` policy the session counted is the verified attempt (or the known
  failure, see :mod:`mailrelay.transport.mx`); the opportunistic session that then carries
  the message is the same session for the report, not a second one.
- Which policy (§4.4 ``policy-type``): ``tlsa`` when DANE applied to the exchanger (its
  usable TLSA records as ``policy-string``, the exchanger as ``mx-host``); ``sts`` when an
  MTA-STS ``enforce`` policy made the domain's policy, or a ``testing`` one whose exchangers
  were verified for the report (its lines as ``policy-string``, its ``mx`` patterns as
  ``mx-host``); ``no-policy-found`` otherwise (a ``testing`` policy whose transport or hook
  has no reporter is not seen here).
- Result types (§4.3), from what the transports saw: STARTTLS not offered or refused, or an
  opportunistic session that stayed plain text, ``starttls-not-supported``; a WebPKI check that
  failed on the name ``certificate-host-mismatch``, on the dates ``certificate-expired``, on
  anything else ``certificate-not-trusted``; a DANE certificate that matches no TLSA record
  (or a DANE-TA chain that does not verify) ``validation-failure`` (§4.3.1: the general
  failure; ``tlsa-invalid`` is kept for records none of which is usable); secure TLSA records
  none of which is usable (encryption without authentication) ``tlsa-invalid``; an
  exchanger outside an MTA-STS ``testing`` policy's ``mx`` patterns ``validation-failure``
  with the reason code ``mx-mismatch`` (no certificate was presented: §4.3.1's general
  failure, not ``certificate-host-mismatch``); a TLSA lookup
  that failed (bogus or SERVFAIL) ``dnssec-invalid``; any other failed handshake
  ``validation-failure``. MTA-STS policy fetches are the MTA-STS hooks' (their
  ``tls_reporter=``, :meth:`TLSReportCollector.sts_policy_failure`): a policy that does not
  parse ``sts-policy-invalid``, a policy host whose certificate fails ``sts-webpki-invalid``,
  any other failure ``sts-policy-fetch-error`` (§4.3.2.2), one per fetch attempt, counted
  under an ``sts`` policy without text. ``dane-required`` is never seen (no DANE-only mode):
  :meth:`TLSReportCollector.record` takes it, and anything else, from the application.
- Aggregation (§4.4): counters per (policy domain, policy); failure details per (result
  type, sending IP, exchanger, receiving IP, reason code) with ``failed-session-count``.
- Bounded memory: at most ``max_failure_details`` detail rows per policy (100 by default;
  failures beyond it are still counted in ``total-failure-session-count``, without a row)
  and at most ``max_policies`` policies per period (10,000; sessions of further policies
  are dropped and counted in :attr:`TLSReportCollector.dropped`), so a hostile receiver
  cannot grow either without limit.
- Thread- and asyncio-safe: one lock held for dictionary updates only, never across I/O
  or an ``await``.
- Discovery (§3): the TXT records at ``_smtp._tls.<domain>``; those not beginning with
  ``v=TLSRPTv1`` are discarded; unless exactly one is left, and it parses strictly, the domain
  gets no report. A record's strings are joined without spaces. ``rua`` must appear exactly
  once; URIs other than ``mailto:`` and ``https:`` are ignored, and a record left with none
  is no record.
- Email (§5.3): ``multipart/report; report-type="tlsrpt"``, a ``text/plain`` part for people
  and the gzipped JSON as ``application/tlsrpt+gzip`` named
  ``submitter!policy-domain!begin!end!id.json.gz``; ``TLS-Report-Domain`` and
  ``TLS-Report-Submitter`` headers; Subject ``Report Domain: … Submitter: … Report-ID: <…>``.
- HTTPS (§5.4): POST of the gzipped JSON, ``Content-Type: application/tlsrpt+gzip``, the
  server's certificate verified, redirects not followed, the whole exchange bounded in time
  (the host's name resolution included: :mod:`mailrelay.transport._https`) and the answer
  read to at most 64 KiB; any 2xx is success.
- Where POSTs may go (server-side request forgery): the ``rua`` host is named by the
  recipient domain's DNS, so by default every address it resolves to (or the ``address=``
  given) must be public (:func:`~mailrelay.transport.netguard.is_public_address`: no
  loopback, RFC 1918, link-local, CGNAT, unique-local...); one that is not raises
  :class:`~mailrelay.errors.ReportError` before any connection. The connection goes only to
  the addresses checked, never resolved again (DNS rebinding).
  ``allow_private_addresses=True`` lifts the guard, for internal deployments.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import enum
import gzip
import http.client
import json
import logging
import re
import socket
import ssl
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterable
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import formatdate, make_msgid
from typing import Any, Final

import attrs

from mailrelay._shown import Shown
from mailrelay.address import Address
from mailrelay.errors import (
    ConfigurationError,
    InvalidAddress,
    PolicyError,
    PolicyFetchError,
    ReportError,
    ResolverError,
)
from mailrelay.message import Message
from mailrelay.resolver import AsyncResolver, Resolver
from mailrelay.transport import _https
from mailrelay.transport.dane import HostState
from mailrelay.transport.mx_plan import TLSAttempt

__all__ = [
    "DEFAULT_MAX_FAILURE_DETAILS",
    "DEFAULT_MAX_POLICIES",
    "FailureDetail",
    "PolicyResult",
    "PolicyType",
    "ReportPolicy",
    "ResultType",
    "SessionRecord",
    "TLSRPTRecord",
    "TLSReport",
    "TLSReportCollector",
    "adiscover",
    "apost_report",
    "classify",
    "discover",
    "post_report",
    "report_message",
    "result_of",
    "sts_result_of",
]

log = logging.getLogger(__name__)

#: The most failure-detail rows kept per policy and period.
DEFAULT_MAX_FAILURE_DETAILS: Final = 100
#: The most policies (per domain and policy text) kept per period.
DEFAULT_MAX_POLICIES: Final = 10_000
#: The media type of a gzipped report (RFC 8460 §6.4).
GZIP_MEDIA_TYPE: Final = "application/tlsrpt+gzip"
#: The most bytes of an HTTPS report server's answer read.
MAX_RESPONSE_SIZE: Final = 64 * 1024
#: Seconds an HTTPS report submission may take in all, by default.
DEFAULT_POST_TIMEOUT: Final = 30.0


class PolicyType(enum.Enum):
    """RFC 8460 §4.4 ``policy-type``."""

    STS = "sts"
    TLSA = "tlsa"
    NO_POLICY_FOUND = "no-policy-found"


class ResultType(enum.Enum):
    """RFC 8460 §4.3 result types (§4.3.1 negotiation, §4.3.2 policy failures)."""

    STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
    CERTIFICATE_HOST_MISMATCH = "certificate-host-mismatch"
    CERTIFICATE_EXPIRED = "certificate-expired"
    CERTIFICATE_NOT_TRUSTED = "certificate-not-trusted"
    VALIDATION_FAILURE = "validation-failure"
    TLSA_INVALID = "tlsa-invalid"
    DNSSEC_INVALID = "dnssec-invalid"
    DANE_REQUIRED = "dane-required"
    STS_POLICY_FETCH_ERROR = "sts-policy-fetch-error"
    STS_POLICY_INVALID = "sts-policy-invalid"
    STS_WEBPKI_INVALID = "sts-webpki-invalid"


def _domain(value: str) -> str:
    return value.lower().rstrip(".")


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DOMAIN_TEXT = re.compile(r"[a-z0-9_.\[\]:-]+")
_REPORT_ID = re.compile(r"[A-Za-z0-9._-]{1,200}")


def _check_text(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    # Values that reach mail headers and file names: CR/LF injection dies here.
    if not isinstance(value, str) or _CONTROL.search(value):
        raise ConfigurationError(f"{attribute.name} must be text without control characters")


def _check_domain(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not _DOMAIN_TEXT.fullmatch(value):
        raise ConfigurationError(f"{attribute.name} is not a domain (A-label form): {value!r}")


def _check_report_id(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not _REPORT_ID.fullmatch(value):
        raise ConfigurationError("report_id: 1 to 200 letters, digits, '.', '_' or '-'")


def _check_time(instance: object, attribute: attrs.Attribute[_dt.datetime], value: object) -> None:
    if not isinstance(value, _dt.datetime) or value.tzinfo is None:
        raise ConfigurationError(f"{attribute.name} must be a timezone-aware datetime")


def _strings(value: Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        raise TypeError("a sequence of strings, not one string")
    return tuple(value)


@attrs.frozen(kw_only=True)
class ReportPolicy:
    """The policy a session was evaluated against (RFC 8460 §4.4 ``policy``).

    Attributes:
        policy_type: ``sts``, ``tlsa`` or ``no-policy-found``.
        policy_domain: the recipient domain (A-label form, lower case).
        policy_string: the policy, one string per line (MTA-STS) or record (TLSA).
        mx_host: the MX patterns (MTA-STS) or the exchanger (TLSA) the policy covers.
    """

    policy_type: PolicyType = attrs.field(validator=attrs.validators.instance_of(PolicyType))
    policy_domain: str = attrs.field(converter=_domain, validator=_check_domain)
    policy_string: tuple[str, ...] = attrs.field(default=(), converter=_strings)
    mx_host: tuple[str, ...] = attrs.field(default=(), converter=_strings)

    def to_json(self) -> dict[str, Any]:
        """The ``policy`` object; ``policy-string`` and ``mx-host`` only when not empty."""
        out: dict[str, Any] = {"policy-type": self.policy_type.value}
        if self.policy_string:
            out["policy-string"] = list(self.policy_string)
        out["policy-domain"] = self.policy_domain
        if self.mx_host:
            out["mx-host"] = list(self.mx_host)
        return out


@attrs.frozen(kw_only=True)
class SessionRecord:
    """One classified session, as :meth:`TLSReportCollector.record` takes it.

    Attributes:
        policy: the policy that applied.
        result: ``None`` for a successful session, else its failure type.
        receiving_mx_hostname: the exchanger's name.
        receiving_ip: the exchanger's address.
        sending_ip: our address, when known.
        failure_reason_code: a short reason (an OpenSSL verify message, say), or ``None``.
    """

    policy: ReportPolicy
    result: ResultType | None = None
    receiving_mx_hostname: str | None = None
    receiving_ip: str | None = None
    sending_ip: str | None = None
    failure_reason_code: str | None = None


@attrs.frozen(kw_only=True)
class FailureDetail:
    """One ``failure-details`` row (RFC 8460 §4.4).

    Attributes:
        result_type: the failure type.
        sending_mta_ip: our address, when known.
        receiving_mx_hostname: the exchanger's name.
        receiving_ip: the exchanger's address.
        failed_session_count: sessions that failed this way.
        failure_reason_code: a short reason, or ``None``.
    """

    result_type: ResultType
    failed_session_count: int
    sending_mta_ip: str | None = None
    receiving_mx_hostname: str | None = None
    receiving_ip: str | None = None
    failure_reason_code: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The row, without the fields that are unknown."""
        out: dict[str, Any] = {"result-type": self.result_type.value}
        for key, value in (
            ("sending-mta-ip", self.sending_mta_ip),
            ("receiving-mx-hostname", self.receiving_mx_hostname),
            ("receiving-ip", self.receiving_ip),
        ):
            if value is not None:
                out[key] = value
        out["failed-session-count"] = self.failed_session_count
        if self.failure_reason_code is not None:
            out["failure-reason-code"] = self.failure_reason_code
        return out


@attrs.frozen(kw_only=True)
class PolicyResult:
    """One element of a report's ``policies`` (RFC 8460 §4.4).

    Attributes:
        policy: the policy.
        successful: ``total-successful-session-count``.
        failed: ``total-failure-session-count``.
        failure_details: the rows (at most the collector's cap).
    """

    policy: ReportPolicy
    successful: int = 0
    failed: int = 0
    failure_details: tuple[FailureDetail, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The ``policies`` element."""
        out: dict[str, Any] = {
            "policy": self.policy.to_json(),
            "summary": {
                "total-successful-session-count": self.successful,
                "total-failure-session-count": self.failed,
            },
        }
        if self.failure_details:
            out["failure-details"] = [detail.to_json() for detail in self.failure_details]
        return out


def _rfc3339(moment: _dt.datetime) -> str:
    if moment.tzinfo is None:
        raise ConfigurationError("report times must be timezone-aware (UTC)")
    return moment.astimezone(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@attrs.frozen(kw_only=True)
class TLSReport:
    """One aggregate report for one policy domain (RFC 8460 §4.4).

    Attributes:
        organization_name: who sends it.
        start: the period's start (timezone-aware).
        end: the period's end (timezone-aware).
        contact_info: whom to ask about it (an address, say).
        report_id: a unique identifier.
        policy_domain: the domain it is about.
        policies: its policies' results.
    """

    organization_name: str = attrs.field(validator=_check_text)
    start: _dt.datetime = attrs.field(validator=_check_time)
    end: _dt.datetime = attrs.field(validator=_check_time)
    contact_info: str = attrs.field(validator=_check_text)
    report_id: str = attrs.field(validator=_check_report_id)
    policy_domain: str = attrs.field(converter=_domain, validator=_check_domain)
    policies: tuple[PolicyResult, ...] = ()

    def __attrs_post_init__(self) -> None:
        if self.end < self.start:
            raise ConfigurationError("a report's period ends before it starts")

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON values, in the order of RFC 8460 §4.4."""
        return {
            "organization-name": self.organization_name,
            "date-range": {
                "start-datetime": _rfc3339(self.start),
                "end-datetime": _rfc3339(self.end),
            },
            "contact-info": self.contact_info,
            "report-id": self.report_id,
            "policies": [policy.to_json() for policy in self.policies],
        }

    def to_json(self) -> str:
        """The report as JSON text (RFC 8460 §4.4, I-JSON: ASCII-safe, no NaN)."""
        return json.dumps(self.to_dict(), allow_nan=False)

    def gzipped(self) -> bytes:
        """The JSON, gzip-compressed (RFC 8460 §5.1), with a fixed mtime (reproducible)."""
        return gzip.compress(self.to_json().encode("utf-8"), mtime=0)

    def filename(self, submitter: str) -> str:
        """RFC 8460 §5.3's file name: ``submitter!policy-domain!begin!end!id.json.gz``
        (times in seconds since the epoch; the id without characters the name cannot take)."""
        unique = self.report_id[:64]
        begin, end = int(self.start.timestamp()), int(self.end.timestamp())
        return f"{_domain(submitter)}!{self.policy_domain}!{begin}!{end}!{unique}.json.gz"


# -- classifying what the transports saw --------------------------------------------------------


def _policy_of(attempt: TLSAttempt) -> tuple[ReportPolicy, HostState | None]:
    policy, target = attempt.policy, attempt.target
    host = policy.dane.for_host(target.name) if policy.dane is not None else None
    if host is not None:
        records = tuple(
            f"{r.usage} {r.selector} {r.matching_type} {r.data.hex().upper()}" for r in host.records
        )
        return (
            ReportPolicy(
                policy_type=PolicyType.TLSA,
                policy_domain=attempt.domain,
                policy_string=records,
                mx_host=(_domain(target.name),),
            ),
            host.state,
        )
    if policy.sts_policy_string:
        return (
            ReportPolicy(
                policy_type=PolicyType.STS,
                policy_domain=attempt.domain,
                policy_string=policy.sts_policy_string,
                mx_host=policy.mx_patterns,
            ),
            None,
        )
    return ReportPolicy(policy_type=PolicyType.NO_POLICY_FOUND, policy_domain=attempt.domain), None


# What the transports' TLSError texts say, most specific first (their makers: the dialogue's
# STARTTLS step, errors_map.map_tls_error with OpenSSL's verify message, dane.check_chain,
# mx_plan.dane_ta_failed and the failed-TLSA-lookup step).
_ERROR_TEXTS: Final = (
    # An exchanger outside an MTA-STS policy's mx patterns (mx_plan.mx_mismatch's text): no
    # certificate was presented (enforce would not connect), so not certificate-host-mismatch
    # (RFC 8460 §4.3.1: "the certificate presented did not adhere..."), but the general
    # validation-failure with a reason code, as the §4.3.1 SHOULD asks.
    ("matches no mx pattern", ResultType.VALIDATION_FAILURE),
    ("the TLSA lookup for", ResultType.DNSSEC_INVALID),
    ("does not offer STARTTLS", ResultType.STARTTLS_NOT_SUPPORTED),
    ("refused STARTTLS", ResultType.STARTTLS_NOT_SUPPORTED),
    ("matches none of its TLSA records", ResultType.VALIDATION_FAILURE),
    ("presented no certificate", ResultType.VALIDATION_FAILURE),
    ("certificate has expired", ResultType.CERTIFICATE_EXPIRED),
    ("Hostname mismatch", ResultType.CERTIFICATE_HOST_MISMATCH),
    ("IP address mismatch", ResultType.CERTIFICATE_HOST_MISMATCH),
    ("DANE-TA certificate", ResultType.VALIDATION_FAILURE),
    ("failed verification", ResultType.CERTIFICATE_NOT_TRUSTED),
)
_VERIFY_MESSAGE = re.compile(r"failed verification for '[^']*': (.*?)(?: \(pass ssl_context=|$)")


def result_of(text: str) -> tuple[ResultType, str | None]:
    """The RFC 8460 §4.3 result type of a :class:`~mailrelay.errors.TLSError`'s text, and a
    short reason code (OpenSSL's verify message) when there is one."""
    found = _VERIFY_MESSAGE.search(text)
    code = found.group(1)[:100] if found else None
    if code is None and "matches no mx pattern" in text:
        code = "mx-mismatch"
    for needle, result in _ERROR_TEXTS:
        if needle in text:
            return result, code
    # RFC 8460 §4.3.1: "validation-failure" is the general failure for any other reason.
    return ResultType.VALIDATION_FAILURE, code


def sts_result_of(text: str) -> ResultType:
    """The RFC 8460 §4.3.2.2 result type of a :class:`~mailrelay.errors.PolicyFetchError`'s
    text: a policy that does not parse ``sts-policy-invalid``; a policy host whose
    certificate failed verification ``sts-webpki-invalid``; anything else (no address, no
    connection, an HTTP error, a timeout) ``sts-policy-fetch-error``."""
    if "serves an invalid policy" in text:
        return ResultType.STS_POLICY_INVALID
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return ResultType.STS_WEBPKI_INVALID
    return ResultType.STS_POLICY_FETCH_ERROR


def classify(attempt: TLSAttempt) -> SessionRecord:
    """What an MX transport's attempt means for the report (see the module rules)."""
    policy, dane_state = _policy_of(attempt)
    target = attempt.target
    common: dict[str, Any] = {
        "policy": policy,
        "receiving_mx_hostname": None if target.name.startswith("[") else _domain(target.name),
        "receiving_ip": target.address,
        "sending_ip": attempt.sending_ip,
    }
    if attempt.error is not None:
        result, code = result_of(str(attempt.error))
        return SessionRecord(result=result, failure_reason_code=code, **common)
    if not attempt.encrypted:
        # Opportunistic TLS and the server offered no STARTTLS (or refused it).
        return SessionRecord(result=ResultType.STARTTLS_NOT_SUPPORTED, **common)
    if dane_state is HostState.ENCRYPT:
        # RFC 7672 §2.2 / RFC 8460 §4.3.2.1: secure TLSA records, none usable: encrypted but
        # not authenticated, not what the policy promised.
        return SessionRecord(result=ResultType.TLSA_INVALID, **common)
    return SessionRecord(**common)


# -- collecting ---------------------------------------------------------------------------------


class _Tally:
    __slots__ = ("details", "failed", "successful")

    def __init__(self) -> None:
        self.successful = 0
        self.failed = 0
        self.details: dict[tuple[ResultType, str | None, str | None, str | None, str | None], int]
        self.details = {}


class TLSReportCollector:
    """Counts TLS sessions per policy for RFC 8460 reports: the MX transports' ``tls_reporter``.

    Example::

        collector = TLSReportCollector()
        mx = MXTransport(resolver, tls_policy=DANE(resolver), tls_reporter=collector)
        ...  # once a day:
        for report in collector.reports(start, end, organization="Example", contact="tls@ex"):
            record = discover(resolver, report.policy_domain)
            ...  # report_message(...) for mailto: URIs, post_report(...) for https: ones

    Args:
        max_failure_details: the most failure-detail rows per policy and period.
        max_policies: the most policies per period.

    Raises:
        ConfigurationError: a limit below 1.
    """

    def __init__(
        self,
        *,
        max_failure_details: int = DEFAULT_MAX_FAILURE_DETAILS,
        max_policies: int = DEFAULT_MAX_POLICIES,
    ) -> None:
        if max_failure_details < 1 or max_policies < 1:
            raise ConfigurationError("max_failure_details and max_policies must be at least 1")
        self.max_failure_details = max_failure_details
        self.max_policies = max_policies
        self._lock = threading.Lock()
        self._tallies: dict[ReportPolicy, _Tally] = {}
        #: Sessions dropped in this period because ``max_policies`` was reached.
        self.dropped = 0

    def tls_attempt(self, attempt: TLSAttempt) -> None:
        """What the MX transports call: classify ``attempt`` and count it."""
        self.record(classify(attempt))

    def sts_policy_failure(self, domain: str, error: PolicyFetchError) -> None:
        """What the MTA-STS hooks call when a policy fetch failed (their ``tls_reporter``):
        counted as one failure under an ``sts`` policy without text (RFC 8460 §4.3.2.2)."""
        self.record(
            SessionRecord(
                policy=ReportPolicy(policy_type=PolicyType.STS, policy_domain=domain),
                result=sts_result_of(str(error)),
            )
        )

    def record(self, session: SessionRecord) -> None:
        """Count one session (the application's way to add policy failures the transports
        cannot see, such as ``sts-policy-fetch-error``)."""
        with self._lock:  # dictionary updates only: never I/O, never an await
            tally = self._tallies.get(session.policy)
            if tally is None:
                if len(self._tallies) >= self.max_policies:
                    self.dropped += 1
                    return
                tally = self._tallies[session.policy] = _Tally()
            if session.result is None:
                tally.successful += 1
                return
            tally.failed += 1
            row = (
                session.result,
                session.sending_ip,
                session.receiving_mx_hostname,
                session.receiving_ip,
                session.failure_reason_code,
            )
            if row in tally.details or len(tally.details) < self.max_failure_details:
                tally.details[row] = tally.details.get(row, 0) + 1

    def reports(
        self,
        start: _dt.datetime,
        end: _dt.datetime,
        *,
        organization: str,
        contact: str,
    ) -> list[TLSReport]:
        """Close the period: one report per policy domain seen since the last call (sorted
        by domain), and the counters start again from zero.

        Args:
            start: the period's start (RFC 8460 §4.1 suggests whole UTC days).
            end: its end.
            organization: ``organization-name``.
            contact: ``contact-info``.
        """
        # Refuse what cannot make a report before dropping anything.
        if start.tzinfo is None or end.tzinfo is None or end < start:
            raise ConfigurationError("start and end: timezone-aware, end not before start")
        for name, text in (("organization", organization), ("contact", contact)):
            if _CONTROL.search(text):
                raise ConfigurationError(f"{name} must be text without control characters")
        with self._lock:
            tallies, self._tallies = self._tallies, {}
            self.dropped = 0
        by_domain: dict[str, list[PolicyResult]] = {}
        for policy, tally in tallies.items():
            details = tuple(
                FailureDetail(
                    result_type=result,
                    sending_mta_ip=sending,
                    receiving_mx_hostname=mx,
                    receiving_ip=receiving,
                    failure_reason_code=code,
                    failed_session_count=count,
                )
                for (result, sending, mx, receiving, code), count in tally.details.items()
            )
            by_domain.setdefault(policy.policy_domain, []).append(
                PolicyResult(
                    policy=policy,
                    successful=tally.successful,
                    failed=tally.failed,
                    failure_details=details,
                )
            )
        return [
            TLSReport(
                organization_name=organization,
                start=start,
                end=end,
                contact_info=contact,
                report_id=f"{start.astimezone(_dt.UTC):%Y%m%d%H%M%S}.{uuid.uuid4().hex}",
                policy_domain=domain,
                policies=tuple(by_domain[domain]),
            )
            for domain in sorted(by_domain)
        ]

    def __repr__(self) -> str:
        return f"<TLSReportCollector policies={len(self._tallies)}>"


# -- discovery (RFC 8460 §3) --------------------------------------------------------------------

_WSP = " \t"
_EXT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_EXT_VALUE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+")
# RFC 3986 URI characters ("," ";" and "!" must be %-encoded in a tlsrpt-uri).
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[A-Za-z0-9\-._~%:/?#\[\]@$&'()*+=]+")


@attrs.frozen(kw_only=True)
class TLSRPTRecord:
    """A domain's ``_smtp._tls`` TXT record (RFC 8460 §3).

    Attributes:
        rua: the report URIs, ``mailto:`` and ``https:`` only, in the record's order.
    """

    rua: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> TLSRPTRecord:
        """Parse one record strictly (the strings of a TXT record joined without spaces).

        Raises:
            PolicyError: not a valid TLSRPTv1 record, or one without a usable URI.
        """
        if not text.startswith("v=TLSRPTv1"):
            raise PolicyError("a TLS-RPT record starts with v=TLSRPTv1")
        fields = text.split(";")
        if fields[0].rstrip(_WSP) != "v=TLSRPTv1":
            raise PolicyError(f"not a TLSRPTv1 record: {text[:60]!r}")
        if fields[-1].strip(_WSP) == "":
            fields = fields[:-1]  # RFC 8460 §3: a final field-delim is allowed
        rua: list[str] | None = None
        if len(fields) < 2:
            raise PolicyError("a TLS-RPT record needs a rua field")
        for raw in fields[1:]:
            field = raw.strip(_WSP)
            name, equals, value = field.partition("=")
            if not equals:
                raise PolicyError(f"not a name=value field: {field[:40]!r}")
            if name == "rua":
                if rua is not None:
                    raise PolicyError("more than one rua field")
                rua = cls._uris(value)
            elif not _EXT_NAME.fullmatch(name) or not _EXT_VALUE.fullmatch(value):
                # RFC 8460 §3: unknown fields are ignored, but must still be well-formed.
                raise PolicyError(f"malformed field {field[:40]!r}")
        if rua is None:
            raise PolicyError("a TLS-RPT record needs a rua field")
        usable = tuple(uri for uri in rua if uri.split(":", 1)[0].lower() in ("mailto", "https"))
        if not usable:
            raise PolicyError("no mailto: or https: URI in rua")
        return cls(rua=usable)

    @staticmethod
    def _uris(value: str) -> list[str]:
        uris = [part.strip(_WSP) for part in value.split(",")]
        for uri in uris:
            if not _URI.fullmatch(uri):
                raise PolicyError(f"not a URI: {uri[:60]!r}")
        return uris

    @classmethod
    def select(cls, texts: Iterable[str]) -> TLSRPTRecord | None:
        """The domain's record from its TXT answers, or ``None`` (no reports for it).

        RFC 8460 §3: records not beginning with ``v=TLSRPTv1`` are discarded; unless
        exactly one is left and it is valid, the domain does not implement TLS-RPT.
        """
        candidates = [text for text in texts if text.startswith("v=TLSRPTv1")]
        if len(candidates) != 1:
            return None
        try:
            return cls.parse(candidates[0])
        except PolicyError as exc:
            log.info("TLS-RPT: ignoring an invalid record: %s", Shown(exc))
            return None

    @property
    def mailto(self) -> tuple[Address, ...]:
        """The addresses of the ``mailto:`` URIs (percent-decoded; invalid ones left out)."""
        found: list[Address] = []
        for uri in self.rua:
            scheme, _, rest = uri.partition(":")
            if scheme.lower() != "mailto":
                continue
            path = urllib.parse.unquote(rest.split("?", 1)[0])
            for text in path.split(","):
                try:
                    found.append(Address.parse(text.strip()))
                except InvalidAddress:
                    log.info("TLS-RPT: ignoring %r: not an address", text)
        return tuple(found)

    @property
    def https(self) -> tuple[str, ...]:
        """The ``https:`` URIs."""
        return tuple(uri for uri in self.rua if uri.split(":", 1)[0].lower() == "https")


def _record_name(domain: str) -> str:
    return f"_smtp._tls.{_domain(domain)}"


def discover(resolver: Resolver, domain: str) -> TLSRPTRecord | None:
    """``domain``'s TLS-RPT record through ``resolver``, or ``None`` (no valid record, or
    the lookup failed: try again with the next report)."""
    try:
        texts = resolver.txt(_record_name(domain))
    except ResolverError as exc:
        log.info("TLS-RPT: no record for %s: %s", domain, Shown(exc))
        return None
    return TLSRPTRecord.select(texts)


async def adiscover(resolver: AsyncResolver, domain: str) -> TLSRPTRecord | None:
    """:func:`discover` through an :class:`~mailrelay.resolver.AsyncResolver`."""
    try:
        texts = await resolver.txt(_record_name(domain))
    except ResolverError as exc:
        log.info("TLS-RPT: no record for %s: %s", domain, Shown(exc))
        return None
    return TLSRPTRecord.select(texts)


# -- the report email (RFC 8460 §5.3) -----------------------------------------------------------


def _summary_text(report: TLSReport, submitter: str) -> str:
    lines = [
        f"This is an aggregate TLS report (RFC 8460) from {report.organization_name} "
        f"({submitter}) for {report.policy_domain},",
        f"covering {_rfc3339(report.start)} to {_rfc3339(report.end)}.",
        "",
    ]
    for result in report.policies:
        lines.append(
            f"{result.policy.policy_type.value}: {result.successful} successful, "
            f"{result.failed} failed sessions"
        )
    lines += ["", f"The report is attached as {GZIP_MEDIA_TYPE} (gzipped JSON).", ""]
    return "\n".join(lines)


def report_message(
    report: TLSReport,
    *,
    sender: str,
    to: Iterable[str | Address],
    submitter: str,
    date: _dt.datetime | None = None,
) -> Message:
    """The report as an email for a ``mailto:`` rua (RFC 8460 §5.3).

    Args:
        report: the report.
        sender: the From address (the submitter's reporting mailbox).
        to: the recipients (:attr:`TLSRPTRecord.mailto`).
        submitter: the submitter's domain (``TLS-Report-Submitter``, the file name).
        date: the Date header (default: now).

    Returns:
        A message any transport can send (sign it with DKIM: RFC 8460 §5.3).
    """
    try:
        recipients = [str(a if isinstance(a, Address) else Address.parse(a)) for a in to]
        sender = str(Address.parse(sender))
    except InvalidAddress as exc:
        raise ConfigurationError(f"not a usable report address: {exc}") from None
    if not recipients:
        raise ConfigurationError("a report message needs at least one recipient")
    submitter = _domain(submitter)
    if not _DOMAIN_TEXT.fullmatch(submitter):
        raise ConfigurationError(f"submitter is not a domain: {submitter!r}")
    outer = MIMEMultipart("report", report_type="tlsrpt")
    outer["From"] = sender
    outer["To"] = ", ".join(recipients)
    # RFC 8460 §5.3: "Report Domain: <domain> Submitter: <domain> Report-ID: <id>".
    outer["Subject"] = (
        f"Report Domain: {report.policy_domain} Submitter: {submitter} "
        f"Report-ID: <{report.report_id}@{submitter}>"
    )
    outer["Date"] = formatdate((date or _dt.datetime.now(_dt.UTC)).timestamp(), usegmt=True)
    outer["Message-ID"] = make_msgid(domain=submitter)
    outer["TLS-Report-Domain"] = report.policy_domain
    outer["TLS-Report-Submitter"] = submitter
    outer.attach(MIMEText(_summary_text(report, submitter), "plain", "utf-8"))
    attachment = MIMEApplication(report.gzipped(), "tlsrpt+gzip")
    attachment.add_header("Content-Disposition", "attachment", filename=report.filename(submitter))
    outer.attach(attachment)
    return Message.from_email(outer)


# -- the HTTPS POST (RFC 8460 §5.4; the machinery is transport._https's) ------------------------


def _now() -> float:
    # Looked up through this module's ``time`` at each call, so that a clock set on this
    # module drives the POST's deadline (tests move it by hand).
    return time.monotonic()


def _addresses_of(host: str, port: int) -> tuple[str, ...]:
    """``host``'s addresses from the system's resolver, in its order, without repeats."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise ReportError(f"{host}: cannot resolve: {exc}") from None
    return tuple(dict.fromkeys(str(info[4][0]) for info in found))


def post_report(
    report: TLSReport,
    url: str,
    *,
    context: ssl.SSLContext | None = None,
    timeout: float = DEFAULT_POST_TIMEOUT,
    address: str | None = None,
    port: int | None = None,
    allow_private_addresses: bool = False,
) -> int:
    """POST the gzipped report to an ``https:`` rua (RFC 8460 §5.4).

    Args:
        report: the report.
        url: the ``https:`` URI from the record.
        context: verifies the server's certificate (default: the system's CAs).
        timeout: seconds the whole exchange may take, the host's name resolution included
            (a resolution still blocked then is left to finish in the background, in one of
            a few daemon threads: the call returns at the deadline all the same).
        address: the IP address to connect to (default: the host's, from the system's
            resolver, tried in turn).
        port: the port to connect to instead of the URL's (tests use another).
        allow_private_addresses: connect to addresses that are not public too (loopback,
            private networks...). By default one such address among the host's (or
            ``address``) raises :class:`~mailrelay.errors.ReportError` before any
            connection: the recipient domain's DNS chooses the host, and must not make the
            sender reach internal services. Set it for internal deployments only.

    Returns:
        The 2xx status the server answered.

    Raises:
        ReportError: not an https URL, a name that does not resolve (in time), an address
            that is not public (unless allowed), a connection or TLS failure, a redirect
            (not followed), a status other than 2xx, or the time ran out.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() != "https" or not parts.hostname:
        raise ReportError(f"not an https: URL: {url!r}")
    host = parts.hostname
    try:
        port = port if port is not None else (parts.port or 443)
    except ValueError:  # urlsplit's port: not a number, or out of range
        raise ReportError(f"not a usable port in {url!r}") from None
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    context = context if context is not None else ssl.create_default_context()
    body = report.gzipped()
    deadline = _now() + timeout
    if address is not None:
        addresses: tuple[str, ...] = (address,)
    else:
        try:
            addresses = _https.resolve_before(
                deadline, lambda: _addresses_of(host, port), clock=_now
            )
        except TimeoutError:
            raise ReportError(f"{host}: cannot resolve: timed out") from None
    # The URL itself is not named: its query may hold a token.
    _https.refuse_private(
        host, addresses, allow_private_addresses=allow_private_addresses, error=ReportError,
        action="post to",
    )  # fmt: skip
    try:
        with _https.pinned_connection(host, addresses, port, context, deadline, clock=_now) as conn:
            conn.request(
                "POST",
                path,
                body=body,
                headers={"Content-Type": GZIP_MEDIA_TYPE, "User-Agent": "mailrelay (TLS-RPT)"},
            )
            response = conn.getresponse()
            # Bounded: the answer carries nothing we need.
            _https.read_limited(response, conn, deadline, MAX_RESPONSE_SIZE, clock=_now)
            refusal = _https.status_refusal(response, lambda status: 200 <= status < 300)
            if refusal is not None:
                raise ReportError(refusal)
            return response.status
    except ssl.SSLError as exc:
        raise ReportError(f"{url}: TLS failure: {exc}") from exc
    except (OSError, http.client.HTTPException) as exc:
        if _now() >= deadline:
            raise ReportError(f"{url}: timed out") from exc
        raise ReportError(f"{url}: {type(exc).__name__}: {exc}") from exc


async def apost_report(
    report: TLSReport,
    url: str,
    *,
    context: ssl.SSLContext | None = None,
    timeout: float = DEFAULT_POST_TIMEOUT,
    address: str | None = None,
    port: int | None = None,
    allow_private_addresses: bool = False,
) -> int:
    """:func:`post_report` from asyncio: it runs in a worker thread (``http.client`` blocks,
    and so does the system's resolver), so the event loop never waits on the network. The
    arguments are :func:`post_report`'s, ``allow_private_addresses`` included; the timeout
    bounds it the same way (name resolution included)."""
    return await asyncio.to_thread(
        post_report, report, url, context=context, timeout=timeout, address=address, port=port,
        allow_private_addresses=allow_private_addresses,
    )  # fmt: skip
