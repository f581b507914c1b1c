"""TLS-RPT (RFC 8460) without the network: records, classification, counting, the JSON, the email.

The JSON check (:func:`check_report`) is written from RFC 8460 §4.4 by hand: the field names,
which are required, their JSON types, the enumerations of §4.3 and §4.4, RFC 3339 times.
"""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import gzip
import ipaddress
import json
import re
import ssl
import threading
from email.message import EmailMessage
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.errors import ConfigurationError, PolicyError, TLSError
from mailrelay.mailhosts import TLSARecord
from mailrelay.options import TLS
from mailrelay.transport.dane import DANEHost, DANEPolicy, HostState, check_chain
from mailrelay.transport.errors_map import map_tls_error
from mailrelay.transport.mtasts import Mode, STSPolicy
from mailrelay.transport.mx_plan import MXPolicy, Target, TLSAttempt, dane_ta_failed
from mailrelay.transport.tlsrpt import (
    PolicyType,
    ReportPolicy,
    ResultType,
    SessionRecord,
    TLSReport,
    TLSReportCollector,
    TLSRPTRecord,
    classify,
    report_message,
    result_of,
    sts_result_of,
)

START = dt.datetime(2026, 11, 28, tzinfo=dt.UTC)
END = dt.datetime(2026, 11, 28, 23, 59, 59, tzinfo=dt.UTC)

# -- the RFC 8460 §4.4 schema, checked by hand ------------------------------------------------

_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})")
_POLICY_TYPES = {"sts", "tlsa", "no-policy-found"}
_RESULT_TYPES = {
    "starttls-not-supported", "certificate-host-mismatch", "certificate-expired",
    "certificate-not-trusted", "validation-failure", "tlsa-invalid", "dnssec-invalid",
    "dane-required", "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid",
}  # fmt: skip


def _keys(obj: dict[str, Any], required: set[str], optional: set[str]) -> None:
    assert required <= obj.keys(), f"missing {required - obj.keys()}"
    assert obj.keys() <= required | optional, f"unknown {obj.keys() - required - optional}"


def _count(value: object) -> int:
    assert isinstance(value, int), value
    assert not isinstance(value, bool), value
    assert value >= 0, value
    return value


def _strings(value: object) -> None:
    assert isinstance(value, list), value
    assert all(isinstance(item, str) for item in value), value


def check_report(report: object) -> None:
    """Fail unless ``report`` is an RFC 8460 §4.4 report, as JSON values."""
    assert isinstance(report, dict)
    top = {"organization-name", "date-range", "contact-info", "report-id", "policies"}
    _keys(report, top, set())
    for key in ("organization-name", "contact-info", "report-id"):
        assert isinstance(report[key], str)
    dates = report["date-range"]
    assert isinstance(dates, dict)
    _keys(dates, {"start-datetime", "end-datetime"}, set())
    assert all(_RFC3339.fullmatch(dates[key]) for key in dates)
    assert dates["start-datetime"] <= dates["end-datetime"]
    assert isinstance(report["policies"], list)
    for entry in report["policies"]:
        _keys(entry, {"policy", "summary"}, {"failure-details"})
        policy = entry["policy"]
        _keys(policy, {"policy-type", "policy-domain"}, {"policy-string", "mx-host"})
        assert policy["policy-type"] in _POLICY_TYPES
        assert isinstance(policy["policy-domain"], str)
        for key in ("policy-string", "mx-host"):
            if key in policy:
                _strings(policy[key])
        summary = entry["summary"]
        _keys(summary, {"total-successful-session-count", "total-failure-session-count"}, set())
        failures = _count(summary["total-failure-session-count"])
        _count(summary["total-successful-session-count"])
        rows = entry.get("failure-details", [])
        assert isinstance(rows, list)
        for row in rows:
            _keys(
                row,
                {"result-type", "failed-session-count"},
                {"sending-mta-ip", "receiving-mx-hostname", "receiving-mx-helo",
                 "receiving-ip", "additional-information", "failure-reason-code"},
            )  # fmt: skip
            assert row["result-type"] in _RESULT_TYPES
            assert _count(row["failed-session-count"]) >= 1
            for key in ("sending-mta-ip", "receiving-ip"):
                if key in row:
                    ipaddress.ip_address(row[key])
            for key in ("receiving-mx-hostname", "failure-reason-code"):
                if key in row:
                    assert isinstance(row[key], str)
        assert sum(row["failed-session-count"] for row in rows) <= failures


# -- discovery: the record (RFC 8460 §3) --------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "rua"),
    [
        ("v=TLSRPTv1; rua=mailto:reports@example.com", ("mailto:reports@example.com",)),
        ("v=TLSRPTv1;rua=https://reporting.example.com/v1/tlsrpt",
         ("https://reporting.example.com/v1/tlsrpt",)),
        ("v=TLSRPTv1; rua=mailto:a@example.com, https://r.example.com/x;",
         ("mailto:a@example.com", "https://r.example.com/x")),
        ("v=TLSRPTv1 ;\trua=mailto:a@example.com ; ext-1.x=val", ("mailto:a@example.com",)),
        # Unsupported schemes are left out; one usable URI is enough.
        ("v=TLSRPTv1; rua=ftp://x.example.com/r,mailto:a@example.com", ("mailto:a@example.com",)),
        ("v=TLSRPTv1; rua=mailto:a%21b@example.com", ("mailto:a%21b@example.com",)),
    ],
)  # fmt: skip
def test_record_parses(text: str, rua: tuple[str, ...]) -> None:
    assert TLSRPTRecord.parse(text).rua == rua


@pytest.mark.parametrize(
    "text",
    [
        "",
        "v=TLSRPTv1",  # no rua
        "v=TLSRPTv1;",
        "v=TLSRPTv2; rua=mailto:a@example.com",
        "v=TLSRPTv1x; rua=mailto:a@example.com",
        " v=TLSRPTv1; rua=mailto:a@example.com",  # the version comes first
        "rua=mailto:a@example.com; v=TLSRPTv1",
        "v=TLSRPTv1; rua=mailto:a@example.com; rua=mailto:b@example.com",  # twice
        "v=TLSRPTv1; rua=ftp://x.example.com/r",  # no usable URI
        "v=TLSRPTv1; rua=",
        "v=TLSRPTv1; rua=mailto:a@example.com;; x=1",  # an empty field
        "v=TLSRPTv1; rua=not a uri",
        "v=TLSRPTv1; rua=mailto:a@example.com; bad name=1",
        "v=TLSRPTv1; rua=mailto:a@example.com; ext=",
        "v=TLSRPTv1; rua=mailto:a@example.com; ext=a=b",
        "v=TLSRPTv1; RUA=mailto:a@example.com",  # %s: names are case-sensitive
    ],
)
def test_invalid_records_are_refused(text: str) -> None:
    with pytest.raises(PolicyError):
        TLSRPTRecord.parse(text)


@pytest.mark.parametrize(
    ("texts", "rua"),
    [
        (("v=TLSRPTv1; rua=mailto:a@example.com",), ("mailto:a@example.com",)),
        (("v=spf1 -all", "v=TLSRPTv1; rua=mailto:a@example.com"), ("mailto:a@example.com",)),
        (("v=TLSRPTv1; rua=mailto:a@example.com", "v=TLSRPTv1; rua=mailto:b@example.com"), None),
        ((), None),
        (("v=spf1 -all",), None),
        (("v=TLSRPTv1; rua=gopher://x",), None),
    ],
)
def test_select_keeps_exactly_one_valid_record(
    texts: tuple[str, ...], rua: tuple[str, ...] | None
) -> None:
    record = TLSRPTRecord.select(texts)
    assert (record.rua if record is not None else None) == rua


def test_mailto_and_https_uris_are_told_apart() -> None:
    record = TLSRPTRecord.parse(
        "v=TLSRPTv1; rua=mailto:tls%2Breports@example.com?subject=x,https://r.example.com/p"
    )
    assert [str(a) for a in record.mailto] == ["tls+reports@example.com"]
    assert record.https == ("https://r.example.com/p",)


@given(st.text(max_size=80))
def test_the_record_parser_raises_only_policy_error(text: str) -> None:
    try:
        record = TLSRPTRecord.parse(text)
    except PolicyError:
        return
    assert record.rua
    assert all(uri.split(":")[0].lower() in ("mailto", "https") for uri in record.rua)


# -- what the transports saw -> RFC 8460 §4.3 result types ---------------------------------------

TARGET = Target(name="mx.example.com", address="192.0.2.1", port=25)


def _verify_error(message: str) -> TLSError:
    exc = ssl.SSLCertVerificationError(1, f"certificate verify failed: {message}")
    exc.verify_message = message
    error = map_tls_error(exc, peer=TARGET.peer, server_hostname=TARGET.name)
    assert isinstance(error, TLSError)
    return error


def _dane_mismatch() -> TLSError:
    record = TLSARecord(usage=3, selector=1, matching_type=1, data=b"\x01" * 32)
    host = DANEHost(name=TARGET.name, state=HostState.AUTHENTICATE, records=(record,))
    with pytest.raises(TLSError) as caught:
        check_chain(host, [b"\x30\x03\x02\x01\x00"], peer=TARGET.peer)
    return caught.value


@pytest.mark.parametrize(
    ("make", "result"),
    [
        (lambda: _verify_error("certificate has expired"), ResultType.CERTIFICATE_EXPIRED),
        (lambda: _verify_error("Hostname mismatch, certificate is not valid for 'x'."),
         ResultType.CERTIFICATE_HOST_MISMATCH),
        (lambda: _verify_error("IP address mismatch, certificate is not valid for '1.2.3.4'."),
         ResultType.CERTIFICATE_HOST_MISMATCH),
        (lambda: _verify_error("self-signed certificate"), ResultType.CERTIFICATE_NOT_TRUSTED),
        (lambda: _verify_error("unable to get local issuer certificate"),
         ResultType.CERTIFICATE_NOT_TRUSTED),
        (lambda: map_tls_error(ConnectionResetError(104, "reset"), peer="p",
                               server_hostname="h"), ResultType.VALIDATION_FAILURE),
        (_dane_mismatch, ResultType.VALIDATION_FAILURE),
        (lambda: dane_ta_failed(TARGET, _verify_error("Hostname mismatch, not valid for 'x'.")),
         ResultType.CERTIFICATE_HOST_MISMATCH),
        (lambda: dane_ta_failed(TARGET, _verify_error("unable to get local issuer certificate")),
         ResultType.VALIDATION_FAILURE),
    ],
)  # fmt: skip
def test_transport_errors_map_onto_result_types(make: Any, result: ResultType) -> None:
    assert result_of(str(make()))[0] is result


@pytest.mark.parametrize(
    ("text", "result"),
    [
        ("mta-sts.example.com serves an invalid policy: line 1 is not 'key: value'",
         ResultType.STS_POLICY_INVALID),
        ("https://mta-sts.example.com/.well-known/mta-sts.txt: 192.0.2.1: TLS failure: "
         "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: Hostname mismatch",
         ResultType.STS_WEBPKI_INVALID),
        ("https://mta-sts.example.com/.well-known/mta-sts.txt: 192.0.2.1: HTTP 404 Not Found",
         ResultType.STS_POLICY_FETCH_ERROR),
        ("mta-sts.example.com has no address", ResultType.STS_POLICY_FETCH_ERROR),
    ],
)  # fmt: skip
def test_policy_fetch_failures_map_onto_sts_result_types(text: str, result: ResultType) -> None:
    assert sts_result_of(text) is result


def test_the_verify_message_is_the_reason_code() -> None:
    assert result_of(str(_verify_error("certificate has expired")))[1] == "certificate has expired"


STS = STSPolicy(mode=Mode.ENFORCE, max_age=86400, mx=("mx.example.com", "*.backup.example"))


def _attempt(policy: MXPolicy, **kwargs: Any) -> TLSAttempt:
    return TLSAttempt(
        domain="Example.COM", policy=policy, target=TARGET, tls=TLS.STARTTLS, **kwargs
    )


def test_an_mta_sts_session_reports_the_policy_text() -> None:
    mx_policy = STS.mx_policy()
    assert mx_policy is not None
    record = classify(_attempt(mx_policy, encrypted=True, sending_ip="192.0.2.9"))
    assert record == SessionRecord(
        policy=ReportPolicy(
            policy_type=PolicyType.STS,
            policy_domain="example.com",
            policy_string=(
                "version: STSv1",
                "mode: enforce",
                "mx: mx.example.com",
                "mx: *.backup.example",
                "max_age: 86400",
            ),
            mx_host=("mx.example.com", "*.backup.example"),
        ),
        receiving_mx_hostname="mx.example.com",
        receiving_ip="192.0.2.1",
        sending_ip="192.0.2.9",
    )
    # What the policy string says parses back to the policy (RFC 8460 §4.4: the policy text).
    assert STSPolicy.parse("\n".join(record.policy.policy_string)) == STS


@pytest.mark.parametrize(
    ("state", "kwargs", "result"),
    [
        (HostState.AUTHENTICATE, {"encrypted": True}, None),
        (HostState.ENCRYPT, {"encrypted": True}, ResultType.TLSA_INVALID),
        (HostState.AUTHENTICATE, {"error": _dane_mismatch()}, ResultType.VALIDATION_FAILURE),
    ],
)
def test_a_dane_session_reports_the_tlsa_records(
    state: HostState, kwargs: dict[str, Any], result: ResultType | None
) -> None:
    record_ = TLSARecord(usage=3, selector=1, matching_type=1, data=bytes(range(32)))
    records = (record_,) if state is HostState.AUTHENTICATE else ()
    host = DANEHost(name="mx.example.com", state=state, records=records)
    policy = MXPolicy(dane=DANEPolicy(hosts=(host,)))
    record = classify(_attempt(policy, **kwargs))
    assert record.policy.policy_type is PolicyType.TLSA
    assert record.policy.mx_host == ("mx.example.com",)
    assert record.policy.policy_string == tuple(f"3 1 1 {bytes(range(32)).hex().upper()}"
                                                for _ in records)  # fmt: skip
    assert record.result is result


def test_an_opportunistic_session_without_starttls_is_reported_as_such() -> None:
    attempt = TLSAttempt(domain="example.com", policy=MXPolicy(), target=TARGET,
                         tls=TLS.OPPORTUNISTIC, encrypted=False)  # fmt: skip
    record = classify(attempt)
    assert record.policy.policy_type is PolicyType.NO_POLICY_FOUND
    assert record.result is ResultType.STARTTLS_NOT_SUPPORTED


_error_texts = st.sampled_from([
    str(_verify_error("certificate has expired")),
    str(_verify_error("self-signed certificate")),
    str(_dane_mismatch()),
    "TLS is required but the server does not offer STARTTLS",
    "DANE: the TLSA lookup for mx.example.com failed (SERVFAIL)",
    "the TLS handshake with x failed: EOF",
])  # fmt: skip


@given(
    st.sampled_from(["none", "sts", "dane-authenticate", "dane-encrypt"]),
    st.one_of(st.none(), _error_texts),
    st.booleans(),
)
def test_classification_is_total_and_consistent(
    kind: str, error_text: str | None, encrypted: bool
) -> None:
    if kind == "sts":
        policy = STS.mx_policy()
        assert policy is not None
    elif kind.startswith("dane"):
        state = HostState.AUTHENTICATE if kind == "dane-authenticate" else HostState.ENCRYPT
        host = DANEHost(name=TARGET.name, state=state)
        policy = MXPolicy(dane=DANEPolicy(hosts=(host,)))
    else:
        policy = MXPolicy()
    error = TLSError(error_text, host=TARGET.peer) if error_text is not None else None
    record = classify(_attempt(policy, error=error, encrypted=encrypted and error is None))
    expected_type = {"none": PolicyType.NO_POLICY_FOUND, "sts": PolicyType.STS}.get(
        kind, PolicyType.TLSA
    )
    assert record.policy.policy_type is expected_type
    success = error is None and encrypted and kind != "dane-encrypt"
    assert (record.result is None) is success
    assert record.receiving_ip == TARGET.address


# -- counting -----------------------------------------------------------------------------------

POLICY = ReportPolicy(policy_type=PolicyType.NO_POLICY_FOUND, policy_domain="example.com")


def _failure(index: int, policy: ReportPolicy = POLICY) -> SessionRecord:
    return SessionRecord(
        policy=policy,
        result=ResultType.CERTIFICATE_NOT_TRUSTED,
        receiving_mx_hostname=f"mx{index}.example.com",
        receiving_ip="192.0.2.1",
    )


def test_failure_details_are_capped_but_every_failure_is_counted() -> None:
    collector = TLSReportCollector(max_failure_details=3)
    for index in range(10):
        collector.record(_failure(index))
    collector.record(_failure(0))
    collector.record(SessionRecord(policy=POLICY))
    [report] = collector.reports(START, END, organization="Org", contact="tls@example.org")
    [result] = report.policies
    assert (result.successful, result.failed) == (1, 11)
    assert len(result.failure_details) == 3
    assert sorted(d.failed_session_count for d in result.failure_details) == [1, 1, 2]


def test_policies_are_capped() -> None:
    collector = TLSReportCollector(max_policies=2)
    for index in range(5):
        domain = f"d{index}.example"
        collector.record(SessionRecord(policy=ReportPolicy(
            policy_type=PolicyType.NO_POLICY_FOUND, policy_domain=domain)))  # fmt: skip
    assert collector.dropped == 3
    reports = collector.reports(START, END, organization="Org", contact="c")
    assert [r.policy_domain for r in reports] == ["d0.example", "d1.example"]
    assert collector.dropped == 0


def test_reports_close_the_period() -> None:
    collector = TLSReportCollector()
    collector.record(_failure(1))
    assert len(collector.reports(START, END, organization="Org", contact="c")) == 1
    assert collector.reports(START, END, organization="Org", contact="c") == []


def test_naive_times_are_refused_before_anything_is_dropped() -> None:
    collector = TLSReportCollector()
    collector.record(_failure(1))
    with pytest.raises(ConfigurationError):
        collector.reports(START.replace(tzinfo=None), END, organization="Org", contact="c")
    assert len(collector.reports(START, END, organization="Org", contact="c")) == 1


def test_threads_recording_at_once_lose_nothing() -> None:
    collector = TLSReportCollector()
    per_thread = 500

    def work(index: int) -> None:
        for n in range(per_thread):
            collector.record(_failure(n % 7) if n % 2 else SessionRecord(policy=POLICY))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    [report] = collector.reports(START, END, organization="Org", contact="c")
    [result] = report.policies
    assert result.successful == result.failed == 4 * per_thread // 2
    assert sum(d.failed_session_count for d in result.failure_details) == result.failed


# -- the JSON (RFC 8460 §4.4) -------------------------------------------------------------------

_domains = st.sampled_from(["a.example", "b.example", "xn--caf-dma.example"])
_policies = st.builds(
    ReportPolicy,
    policy_type=st.sampled_from(PolicyType),
    policy_domain=_domains,
    policy_string=st.lists(st.text(max_size=20), max_size=3).map(tuple),
    mx_host=st.lists(st.sampled_from(["mx.a.example", "*.b.example"]), max_size=2).map(tuple),
)
_ips = st.one_of(st.none(), st.ip_addresses().map(str))
_sessions = st.builds(
    SessionRecord,
    policy=_policies,
    result=st.one_of(st.none(), st.sampled_from(ResultType)),
    receiving_mx_hostname=st.one_of(st.none(), st.sampled_from(["mx1.a.example", "mx2"])),
    receiving_ip=_ips,
    sending_ip=_ips,
    failure_reason_code=st.one_of(st.none(), st.text(max_size=10)),
)


@given(st.lists(_sessions, max_size=40), st.integers(1, 5))
def test_reports_follow_the_rfc_schema_and_count_every_session(
    sessions: list[SessionRecord], cap: int
) -> None:
    collector = TLSReportCollector(max_failure_details=cap)
    for session in sessions:
        collector.record(session)
    reports = collector.reports(START, END, organization="Org", contact="mailto:tls@org.example")
    assert len(reports) == len({s.policy.policy_domain for s in sessions})
    for report in reports:
        decoded = json.loads(report.to_json())
        check_report(decoded)
        assert json.loads(gzip.decompress(report.gzipped())) == decoded
        for entry in decoded["policies"]:
            mine = [s for s in sessions if s.policy.to_json() == entry["policy"]]
            summary = entry["summary"]
            assert summary["total-successful-session-count"] == sum(s.result is None for s in mine)
            assert summary["total-failure-session-count"] == sum(s.result is not None for s in mine)
            assert len(entry.get("failure-details", [])) <= cap


def test_the_rfc_example_shape() -> None:
    collector = TLSReportCollector()
    mx_policy = STS.mx_policy()
    assert mx_policy is not None
    collector.tls_attempt(_attempt(mx_policy, encrypted=True, sending_ip="198.51.100.62"))
    collector.tls_attempt(
        _attempt(mx_policy, error=_verify_error("certificate has expired"), sending_ip=None)
    )
    [report] = collector.reports(START, END, organization="Company-X", contact="sts@x.example")
    decoded = json.loads(report.to_json())
    check_report(decoded)
    assert decoded["date-range"] == {
        "start-datetime": "2026-11-28T00:00:00Z",
        "end-datetime": "2026-11-28T23:59:59Z",
    }
    [entry] = decoded["policies"]
    assert entry["policy"]["policy-type"] == "sts"
    assert entry["policy"]["mx-host"] == ["mx.example.com", "*.backup.example"]
    assert entry["summary"] == {
        "total-successful-session-count": 1,
        "total-failure-session-count": 1,
    }
    assert entry["failure-details"] == [
        {
            "result-type": "certificate-expired",
            "receiving-mx-hostname": "mx.example.com",
            "receiving-ip": "192.0.2.1",
            "failed-session-count": 1,
            "failure-reason-code": "certificate has expired",
        }
    ]


# -- the email (RFC 8460 §5.3) ------------------------------------------------------------------


def _report() -> TLSReport:
    collector = TLSReportCollector()
    collector.record(_failure(1))
    [report] = collector.reports(START, END, organization="Org", contact="tls@org.example")
    return report


def test_the_report_email_has_the_rfc_form() -> None:
    report = _report()
    message = report_message(
        report, sender="tlsrpt@sender.example", to=["tls@example.com"], submitter="Sender.Example"
    )
    parsed = email.message_from_bytes(message.as_bytes(), policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "tlsrpt"
    assert parsed["TLS-Report-Domain"] == "example.com"
    assert parsed["TLS-Report-Submitter"] == "sender.example"
    assert parsed["Subject"] == (
        f"Report Domain: example.com Submitter: sender.example "
        f"Report-ID: <{report.report_id}@sender.example>"
    )
    text, attachment = parsed.iter_parts()
    assert text.get_content_type() == "text/plain"
    assert attachment.get_content_type() == "application/tlsrpt+gzip"
    filename = attachment.get_filename()
    assert filename is not None
    begin, end = int(START.timestamp()), int(END.timestamp())
    assert re.fullmatch(
        rf"sender\.example!example\.com!{begin}!{end}![A-Za-z0-9._-]+\.json\.gz", filename
    )
    payload = attachment.get_payload(decode=True)
    assert isinstance(payload, bytes)
    assert json.loads(gzip.decompress(payload)) == report.to_dict()


def test_a_report_email_needs_a_recipient() -> None:
    with pytest.raises(ConfigurationError):
        report_message(_report(), sender="a@b.example", to=[], submitter="b.example")


@pytest.mark.parametrize(
    "changes",
    [
        {"organization_name": "Org\r\nBcc: x@y.example"},
        {"contact_info": "a@b.example\n"},
        {"report_id": "id\r\nX-Injected: 1"},
        {"report_id": ""},
        {"policy_domain": "example.com\r\nBcc: x@y.example"},
        {"start": START.replace(tzinfo=None)},
        {"end": START - dt.timedelta(seconds=1)},
    ],
)
def test_reports_refuse_values_that_could_inject_headers(changes: dict[str, Any]) -> None:
    fields: dict[str, Any] = {
        "organization_name": "Org", "start": START, "end": END, "contact_info": "c@o.example",
        "report_id": "r1", "policy_domain": "example.com",
    }  # fmt: skip
    fields.update(changes)
    with pytest.raises(ConfigurationError):
        TLSReport(**fields)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sender": "not an address"},
        {"to": ["bob@example.com\r\nBcc: x@y.example"]},
        {"submitter": "sender.example\r\nX: y"},
    ],
)
def test_the_report_email_refuses_bad_addresses(kwargs: dict[str, Any]) -> None:
    options: dict[str, Any] = {
        "sender": "a@b.example", "to": ["tls@example.com"], "submitter": "b.example",
    }  # fmt: skip
    options.update(kwargs)
    with pytest.raises(ConfigurationError):
        report_message(_report(), **options)
