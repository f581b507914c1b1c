"""TLS-RPT (RFC 8460) end to end: both MX transports feed the collector, against real peers.

DANE: the validating unbound of :mod:`tests.peers.dnssec` (signed zone ``dane.test``, which
also publishes ``_smtp._tls`` records for a few domains) and aiosmtpd exchangers on 127.0.0.1
and 127.0.0.2 presenting good or bad certificates, or no STARTTLS. MTA-STS: the plain test
unbound (``_mta-sts`` and ``_smtp._tls`` records under ``sts.test``), the loopback HTTPS
policy server, and an aiosmtpd exchanger with a trusted, an untrusted, or a wrongly named
certificate. The reports are then discovered in the DNS and delivered: the email through
an MX transport to an aiosmtpd exchanger, the HTTPS POST to the loopback HTTPS server.
"""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import gzip
import json
import socket
import ssl
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from mailrelay.envelope import Envelope
from mailrelay.errors import ConfigurationError, ReportError
from mailrelay.message import Message
from mailrelay.options import Timeouts
from mailrelay.resolver import AsyncResolver, Resolver
from mailrelay.results import DeliveryResult
from mailrelay.transport.dane import DANE, AsyncDANE
from mailrelay.transport.mtasts import MTASTS, AsyncMTASTS
from mailrelay.transport.mx import MXTransport
from mailrelay.transport.mx_async import AsyncMXTransport
from mailrelay.transport.tlsrpt import (
    PolicyType,
    ReportPolicy,
    SessionRecord,
    TLSReport,
    TLSReportCollector,
    adiscover,
    apost_report,
    discover,
    post_report,
    report_message,
)
from tests.peers.aiosmtpd_server import HOSTNAME, RecordingHandler
from tests.peers.dnssec import SECOND, SIGNED, DNSSECServer, serve_dnssec
from tests.peers.https_policy import PolicyServer, Response, issue_certificate
from tests.peers.tls import TLSFiles
from tests.peers.unbound import UnboundServer
from tests.transport.helpers import FLAVOURS, Flavour, run

pytestmark = pytest.mark.unbound

FIRST = "127.0.0.1"
START = dt.datetime(2026, 11, 28, tzinfo=dt.UTC)
END = dt.datetime(2026, 11, 28, 23, 59, 59, tzinfo=dt.UTC)
ENFORCE = "enforce.sts.test"
REPORTS_HOST = "reports.mailrelay.test"


def free_port() -> int:
    """A TCP port free on both 127.0.0.1 and 127.0.0.2."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((FIRST, 0))
            port = int(probe.getsockname()[1])
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other:
                other.bind((SECOND, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on 127.0.0.1 and 127.0.0.2 in 50 tries")


@pytest.fixture(scope="module")
def dnssec(tls_files: TLSFiles) -> Iterator[DNSSECServer]:
    yield from serve_dnssec(tls_files)


@pytest.fixture(scope="module")
def certs(
    tls_files: TLSFiles, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, Path]]:
    """(chain, key) files the exchangers and the HTTPS server can present."""
    other = issue_certificate(tls_files, ["other.mailrelay.test"], tmp_path_factory.mktemp("o"))
    names = [f"mta-sts.{ENFORCE}", REPORTS_HOST]
    https = issue_certificate(tls_files, names, tmp_path_factory.mktemp("h"))
    return {
        "leaf": (tls_files.cert_file, tls_files.key_file),
        "untrusted": (tls_files.untrusted_cert_file, tls_files.untrusted_key_file),
        "other-name": other,
        "https": https,
    }


ServerFactory = Callable[..., RecordingHandler]


@pytest.fixture
def smtp_port() -> int:
    return free_port()


@pytest.fixture
def mx_server(smtp_port: int, certs: dict[str, tuple[Path, Path]]) -> Iterator[ServerFactory]:
    """``mx_server(address, cert)``: aiosmtpd at ``address:smtp_port`` presenting ``cert``
    after STARTTLS (``None``: no STARTTLS offered)."""
    controllers: list[Controller] = []

    def start(address: str = FIRST, cert: str | None = "leaf") -> RecordingHandler:
        handler = RecordingHandler()
        context = None
        if cert is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*certs[cert])
        controller = Controller(
            handler, hostname=address, port=smtp_port, server_hostname=HOSTNAME,
            decode_data=False, require_starttls=False, tls_context=context, timeout=10,
        )  # fmt: skip
        controller.start()
        controllers.append(controller)
        return handler

    yield start
    for controller in controllers:
        controller.stop()


@pytest.fixture
def https_server(certs: dict[str, tuple[Path, Path]]) -> Iterator[PolicyServer]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certs["https"])
    server = PolicyServer(context).start()
    yield server
    server.stop()


def message_to(domain: str) -> tuple[Message, Envelope]:
    message = Message.build(
        sender="sender@mailrelay.test", to=[f"bob@{domain}"], subject="TLS-RPT", text="Hi\n"
    )
    return message, Envelope.from_message(message)


def deliver_dane(
    flavour: Flavour, dnssec: DNSSECServer, port: int, domain: str, collector: TLSReportCollector
) -> DeliveryResult:
    """One message to ``bob@<domain>`` under DANE, reporting to ``collector``."""
    message, envelope = message_to(domain)
    options: dict[str, Any] = {
        "port": port,
        "timeouts": Timeouts.all(3),
        "tls_reporter": collector,
        "source_address": FIRST,
    }
    if flavour == "sync":
        resolver = dnssec.resolver(timeout=2.0)
        with MXTransport(
            resolver, tls_policy=DANE(resolver), **options, refused_networks=()
        ) as transport:
            return transport.send(message, envelope)

    async def main() -> DeliveryResult:
        aresolver = dnssec.async_resolver(timeout=2.0)
        async with AsyncMXTransport(
            aresolver, tls_policy=AsyncDANE(aresolver), **options, refused_networks=()
        ) as t:
            return await t.asend(message, envelope)

    return run(main())


def deliver_sts(
    flavour: Flavour,
    unbound: UnboundServer,
    https_port: int,
    tls_files: TLSFiles,
    *,
    smtp_port: int,
    collector: TLSReportCollector,
) -> DeliveryResult:
    """One message to ``bob@enforce.sts.test`` under MTA-STS, reporting to ``collector``."""
    message, envelope = message_to(ENFORCE)
    options: dict[str, Any] = {
        "port": smtp_port,
        "timeouts": Timeouts.all(2),
        "ssl_context": tls_files.client_context(),
        "tls_reporter": collector,
    }
    sts_options: dict[str, Any] = {
        "port": https_port,
        "ssl_context": tls_files.client_context(),
        "timeout": 5.0,
        "allow_private_addresses": True,  # the policy server is on loopback
    }
    if flavour == "sync":
        resolver = unbound.resolver(timeout=1.0)
        with MXTransport(
            resolver, tls_policy=MTASTS(resolver, **sts_options), **options, refused_networks=()
        ) as t:
            return t.send(message, envelope)

    async def main() -> DeliveryResult:
        aresolver = unbound.async_resolver(timeout=1.0)
        hook = AsyncMTASTS(aresolver, **sts_options)
        async with AsyncMXTransport(
            aresolver, tls_policy=hook, **options, refused_networks=()
        ) as transport:
            return await transport.asend(message, envelope)

    return run(main())


def only_report(collector: TLSReportCollector) -> dict[str, Any]:
    [report] = collector.reports(START, END, organization="mailrelay tests", contact="t@t.test")
    decoded: dict[str, Any] = json.loads(report.to_json())
    return decoded


def by_mx(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The report's policies keyed by their first ``mx-host``."""
    return {entry["policy"]["mx-host"][0]: entry for entry in report["policies"]}


def summary(entry: dict[str, Any]) -> tuple[int, int]:
    counts = entry["summary"]
    return counts["total-successful-session-count"], counts["total-failure-session-count"]


# -- DANE ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_dane_success_is_counted_with_its_tlsa_policy(
    flavour: Flavour, dnssec: DNSSECServer, smtp_port: int, mx_server: ServerFactory
) -> None:
    mx_server(FIRST, "leaf")
    collector = TLSReportCollector()
    for _ in range(2):
        assert deliver_dane(flavour, dnssec, smtp_port, f"ee.{SIGNED}", collector).ok
    report = only_report(collector)
    [entry] = report["policies"]
    policy = entry["policy"]
    assert policy["policy-type"] == "tlsa"
    assert policy["policy-domain"] == f"ee.{SIGNED}"
    assert policy["mx-host"] == [f"mx-ee.{SIGNED}"]
    [tlsa] = policy["policy-string"]
    assert tlsa.startswith("3 1 1 ")
    assert summary(entry) == (2, 0)
    assert "failure-details" not in entry


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_dane_mismatch_is_a_validation_failure(
    flavour: Flavour, dnssec: DNSSECServer, smtp_port: int, mx_server: ServerFactory
) -> None:
    handler = mx_server(FIRST, "untrusted")  # the record names the leaf's key, not this one
    collector = TLSReportCollector()
    result = deliver_dane(flavour, dnssec, smtp_port, f"ee.{SIGNED}", collector)
    assert not result.ok
    assert handler.messages == []
    [entry] = only_report(collector)["policies"]
    assert summary(entry) == (0, 1)
    assert entry["failure-details"] == [
        {
            "result-type": "validation-failure",
            "sending-mta-ip": FIRST,
            "receiving-mx-hostname": f"mx-ee.{SIGNED}",
            "receiving-ip": FIRST,
            "failed-session-count": 1,
        }
    ]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_no_starttls_under_dane_is_starttls_not_supported(
    flavour: Flavour, dnssec: DNSSECServer, smtp_port: int, mx_server: ServerFactory
) -> None:
    mx_server(FIRST, None)
    collector = TLSReportCollector()
    assert not deliver_dane(flavour, dnssec, smtp_port, f"notls.{SIGNED}", collector).ok
    [entry] = only_report(collector)["policies"]
    assert entry["policy"]["policy-type"] == "tlsa"
    assert summary(entry) == (0, 1)
    assert [row["result-type"] for row in entry["failure-details"]] == ["starttls-not-supported"]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_bogus_tlsa_rrset_is_dnssec_invalid(
    flavour: Flavour, dnssec: DNSSECServer, smtp_port: int, mx_server: ServerFactory
) -> None:
    handler = mx_server(FIRST, "leaf")
    collector = TLSReportCollector()
    assert not deliver_dane(flavour, dnssec, smtp_port, f"bogus.{SIGNED}", collector).ok
    assert handler.messages == []
    [entry] = only_report(collector)["policies"]
    assert entry["policy"]["policy-type"] == "tlsa"
    assert "policy-string" not in entry["policy"]  # no records could be read
    assert [row["result-type"] for row in entry["failure-details"]] == ["dnssec-invalid"]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_failover_reports_each_exchanger_under_its_own_policy(
    flavour: Flavour, dnssec: DNSSECServer, smtp_port: int, mx_server: ServerFactory
) -> None:
    mx_server(FIRST, "leaf")  # mx-bad: its TLSA record names another certificate
    mx_server(SECOND, "leaf")  # mx-good2
    collector = TLSReportCollector()
    assert deliver_dane(flavour, dnssec, smtp_port, f"failover.{SIGNED}", collector).ok
    entries = by_mx(only_report(collector))
    assert summary(entries[f"mx-bad.{SIGNED}"]) == (0, 1)
    assert summary(entries[f"mx-good2.{SIGNED}"]) == (1, 0)
    [row] = entries[f"mx-bad.{SIGNED}"]["failure-details"]
    assert row["result-type"] == "validation-failure"


# -- MTA-STS ---------------------------------------------------------------------------------------

STS_TEXT = "version: STSv1\r\nmode: enforce\r\nmx: *.mailrelay.test\r\nmax_age: 86400\r\n"


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize(
    ("cert", "successes", "result_type"),
    [
        ("leaf", 1, None),
        ("untrusted", 0, "certificate-not-trusted"),
        ("other-name", 0, "certificate-host-mismatch"),
    ],
)
def test_mta_sts_enforce_sessions_are_counted_by_result(  # noqa: PLR0917 -- fixtures and table columns
    flavour: Flavour,
    cert: str,
    successes: int,
    result_type: str | None,
    unbound: UnboundServer,
    https_server: PolicyServer,
    tls_files: TLSFiles,
    smtp_port: int,
    mx_server: ServerFactory,
) -> None:
    https_server.serve(ENFORCE, STS_TEXT)
    handler = mx_server(FIRST, cert)
    collector = TLSReportCollector()
    result = deliver_sts(
        flavour, unbound, https_server.port, tls_files, smtp_port=smtp_port, collector=collector
    )
    assert result.ok is (result_type is None)
    assert len(handler.messages) == successes
    [entry] = only_report(collector)["policies"]
    assert entry["policy"] == {
        "policy-type": "sts",
        "policy-string": [
            "version: STSv1", "mode: enforce", "mx: *.mailrelay.test", "max_age: 86400",
        ],
        "policy-domain": ENFORCE,
        "mx-host": ["*.mailrelay.test"],
    }  # fmt: skip
    # The exchanger's other address (::1) refuses connections: no TLS, nothing counted.
    assert summary(entry) == (successes, 0 if result_type is None else 1)
    rows = entry.get("failure-details", [])
    assert [row["result-type"] for row in rows] == ([result_type] if result_type else [])
    for row in rows:
        assert row["receiving-mx-hostname"] == "mx.mailrelay.test"
        assert row["receiving-ip"] == FIRST


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize(
    ("domain", "served", "result_type"),
    [
        (ENFORCE, "version: STSv1\r\nmode: enforce\r\n", "sts-policy-invalid"),  # no max_age
        (ENFORCE, None, "sts-policy-fetch-error"),  # HTTP 404
        ("noaddr.sts.test", STS_TEXT, "sts-policy-fetch-error"),  # no mta-sts host address
        ("badcert.sts.test", STS_TEXT, "sts-webpki-invalid"),  # the certificate names others
    ],
)
def test_failed_policy_fetches_are_reported(  # noqa: PLR0917 -- fixtures and table columns
    flavour: Flavour,
    domain: str,
    served: str | None,
    result_type: str,
    unbound: UnboundServer,
    https_server: PolicyServer,
    tls_files: TLSFiles,
) -> None:
    if served is not None:
        https_server.serve(domain, served)
    collector = TLSReportCollector()
    options: dict[str, Any] = {
        "port": https_server.port,
        "ssl_context": tls_files.client_context(),
        "timeout": 5.0,
        "tls_reporter": collector,
        "allow_private_addresses": True,
    }
    if flavour == "sync":
        sts = MTASTS(unbound.resolver(timeout=1.0), **options)
        assert sts(domain) is None  # no policy: the transport's defaults
        assert sts(domain) is None  # not fetched again at once: not reported again
    else:

        async def main() -> None:
            asts = AsyncMTASTS(unbound.async_resolver(timeout=1.0), **options)
            assert await asts(domain) is None
            assert await asts(domain) is None

        run(main())
    [entry] = only_report(collector)["policies"]
    assert entry["policy"] == {"policy-type": "sts", "policy-domain": domain}
    assert summary(entry) == (0, 1)
    assert entry["failure-details"] == [{"result-type": result_type, "failed-session-count": 1}]


# -- opportunistic TLS (no policy), reuse, a failing reporter ------------------------------------


def deliver_plain(
    flavour: Flavour, unbound: UnboundServer, smtp_port: int, reporter: Any, messages: int = 1
) -> list[DeliveryResult]:
    """``messages`` messages to ``bob@mailrelay.test`` through one opportunistic MX transport."""
    batch = [message_to("mailrelay.test") for _ in range(messages)]
    options: dict[str, Any] = {
        "port": smtp_port,
        "timeouts": Timeouts.all(2),
        "tls_reporter": reporter,
    }
    if flavour == "sync":
        with MXTransport(
            unbound.resolver(timeout=1.0), **options, refused_networks=()
        ) as transport:
            return [transport.send(message, envelope) for message, envelope in batch]

    async def main() -> list[DeliveryResult]:
        async with AsyncMXTransport(
            unbound.async_resolver(timeout=1.0), **options, refused_networks=()
        ) as transport:
            return [await transport.asend(message, envelope) for message, envelope in batch]

    return run(main())


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize(("cert", "expected"), [("untrusted", (1, 0)), (None, (0, 1))])
def test_opportunistic_sessions_count_once_per_connection(  # noqa: PLR0917 -- fixtures, table
    flavour: Flavour,
    cert: str | None,
    expected: tuple[int, int],
    unbound: UnboundServer,
    smtp_port: int,
    mx_server: ServerFactory,
) -> None:
    # No policy: any certificate will do (RFC 7435); no STARTTLS is starttls-not-supported.
    # The second and third messages reuse the first one's session: not new TLS sessions.
    handler = mx_server(FIRST, cert)
    collector = TLSReportCollector()
    results = deliver_plain(flavour, unbound, smtp_port, collector, messages=3)
    assert all(result.ok for result in results)
    assert len(handler.messages) == 3
    [entry] = only_report(collector)["policies"]
    assert entry["policy"] == {"policy-type": "no-policy-found", "policy-domain": "mailrelay.test"}
    assert summary(entry) == expected
    rows = entry.get("failure-details", [])
    assert [row["result-type"] for row in rows] == ["starttls-not-supported"] * expected[1]


class BrokenReporter:
    """A reporter that fails every time."""

    def __init__(self) -> None:
        self.calls = 0

    def tls_attempt(self, attempt: object) -> None:
        self.calls += 1
        raise RuntimeError("reporter bug")


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_failing_reporter_never_changes_a_delivery(
    flavour: Flavour,
    unbound: UnboundServer,
    smtp_port: int,
    mx_server: ServerFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    handler = mx_server(FIRST, "leaf")
    reporter = BrokenReporter()
    with caplog.at_level("ERROR", logger="mailrelay.transport.mx"):
        [result] = deliver_plain(flavour, unbound, smtp_port, reporter)
    assert result.ok
    assert len(handler.messages) == 1
    assert reporter.calls == 1
    assert any("TLS reporter failed" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("transport", [MXTransport, AsyncMXTransport])
def test_a_reporter_must_take_attempts(transport: Any) -> None:
    with pytest.raises(ConfigurationError, match="tls_attempt"):
        transport(tls_reporter=object())


# -- discovery and delivery of the reports ---------------------------------------------------------


@pytest.mark.parametrize(
    ("domain", "rua"),
    [
        (ENFORCE, ("mailto:tlsrpt@mailrelay.test", f"https://{REPORTS_HOST}/tlsrpt")),
        ("testing.sts.test", ("mailto:tlsrpt@mailrelay.test",)),  # two strings, joined
        ("mismatch.sts.test", None),  # two TLSRPTv1 records
        ("malformed.sts.test", None),  # no usable URI
        ("notxt.sts.test", None),  # no record
        ("nosuchdomain.sts.test", None),  # NXDOMAIN
        ("slow.timeout.test", None),  # the lookup fails: no report this time
    ],
)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_discovery(
    flavour: Flavour, unbound: UnboundServer, domain: str, rua: tuple[str, ...] | None
) -> None:
    if flavour == "sync":
        record = discover(unbound.resolver(timeout=0.5), domain)
    else:
        record = run(adiscover(unbound.async_resolver(timeout=0.5), domain))
    assert (record.rua if record is not None else None) == rua


def send_report(flavour: Flavour, resolver: Any, port: int, message: Message) -> DeliveryResult:
    """Send a report email through an MX transport (no reporter: RFC 8460 §5.3 says the
    report's own delivery is not to be reported)."""
    options: dict[str, Any] = {"port": port, "timeouts": Timeouts.all(3)}
    if flavour == "sync":
        assert isinstance(resolver, Resolver)
        with MXTransport(resolver, **options, refused_networks=()) as transport:
            return transport.send(message)

    async def main() -> DeliveryResult:
        assert isinstance(resolver, AsyncResolver)
        async with AsyncMXTransport(resolver, **options, refused_networks=()) as transport:
            return await transport.asend(message)

    return run(main())


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_the_report_email_reaches_the_domains_rua(
    flavour: Flavour, dnssec: DNSSECServer, smtp_port: int, mx_server: ServerFactory
) -> None:
    handler = mx_server(FIRST, "leaf")
    collector = TLSReportCollector()
    assert deliver_dane(flavour, dnssec, smtp_port, f"ee.{SIGNED}", collector).ok
    [report] = collector.reports(START, END, organization="mailrelay tests", contact="t@t.test")
    if flavour == "sync":
        resolver: Any = dnssec.resolver(timeout=2.0)
        record = discover(resolver, report.policy_domain)
    else:
        resolver = dnssec.async_resolver(timeout=2.0)
        record = run(adiscover(resolver, report.policy_domain))
    assert record is not None
    assert [str(a) for a in record.mailto] == [f"tlsrpt@ee.{SIGNED}"]
    message = report_message(
        report, sender="tlsrpt@mailrelay.test", to=record.mailto, submitter="mailrelay.test"
    )
    assert send_report(flavour, resolver, smtp_port, message).ok
    received = handler.messages[-1]
    assert received.rcpt_tos == (f"tlsrpt@ee.{SIGNED}",)
    parsed = email.message_from_bytes(received.content, policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "tlsrpt"
    assert parsed["TLS-Report-Domain"] == f"ee.{SIGNED}"
    [attachment] = [p for p in parsed.walk() if p.get_content_type() == "application/tlsrpt+gzip"]
    payload = attachment.get_payload(decode=True)
    assert isinstance(payload, bytes)
    assert json.loads(gzip.decompress(payload)) == report.to_dict()


def _a_report() -> TLSReport:
    collector = TLSReportCollector()
    policy = ReportPolicy(policy_type=PolicyType.NO_POLICY_FOUND, policy_domain=ENFORCE)
    collector.record(SessionRecord(policy=policy))
    [report] = collector.reports(START, END, organization="mailrelay tests", contact="t@t.test")
    return report


def test_the_report_is_posted_to_the_https_rua(
    unbound: UnboundServer, https_server: PolicyServer, tls_files: TLSFiles
) -> None:
    record = discover(unbound.resolver(timeout=1.0), ENFORCE)
    assert record is not None
    [url] = record.https
    https_server.accept_posts(REPORTS_HOST)
    report = _a_report()
    status = post_report(
        report, url, context=tls_files.client_context(), timeout=5.0, address=FIRST,
        port=https_server.port, allow_private_addresses=True,
    )  # fmt: skip
    assert status == 200
    [posted] = https_server.posts
    assert (posted.host, posted.path) == (REPORTS_HOST, "/tlsrpt")
    assert posted.content_type == "application/tlsrpt+gzip"
    assert json.loads(gzip.decompress(posted.body)) == report.to_dict()


@pytest.mark.parametrize(
    ("response", "complaint"),
    [
        (Response(status=302, headers=(("Location", "https://elsewhere.test/"),)), "redirect"),
        (Response(status=500), "HTTP 500"),
        (Response(status=404), "HTTP 404"),
    ],
)
def test_a_post_that_is_not_taken_is_an_error(
    https_server: PolicyServer, tls_files: TLSFiles, response: Response, complaint: str
) -> None:
    https_server.accept_posts(REPORTS_HOST, response)
    with pytest.raises(ReportError, match=complaint):
        post_report(
            _a_report(), f"https://{REPORTS_HOST}/tlsrpt", context=tls_files.client_context(),
            timeout=5.0, address=FIRST, port=https_server.port, allow_private_addresses=True,
        )  # fmt: skip
    assert len(https_server.posts) == 1  # the redirect was not followed


def test_the_report_is_posted_from_asyncio(https_server: PolicyServer, tls_files: TLSFiles) -> None:
    https_server.accept_posts(REPORTS_HOST, Response(status=202))
    report = _a_report()
    url = f"https://{REPORTS_HOST}/v1/tlsrpt?x=1"
    context = tls_files.client_context()
    posting = apost_report(
        report, url, context=context, address=FIRST, port=https_server.port,
        allow_private_addresses=True,
    )  # fmt: skip
    assert run(posting) == 202
    [posted] = https_server.posts
    assert posted.path == "/v1/tlsrpt?x=1"
    assert json.loads(gzip.decompress(posted.body)) == report.to_dict()


def test_a_post_checks_the_servers_certificate(https_server: PolicyServer) -> None:
    https_server.accept_posts(REPORTS_HOST)
    with pytest.raises(ReportError, match="TLS failure"):
        post_report(
            _a_report(), f"https://{REPORTS_HOST}/tlsrpt", context=ssl.create_default_context(),
            timeout=5.0, address=FIRST, port=https_server.port, allow_private_addresses=True,
        )  # fmt: skip
    assert https_server.posts == []


@pytest.mark.parametrize(
    "url", ["http://reports.test/x", "mailto:a@b.test", "https:///x", "https://r.test:99999/x"]
)
def test_only_https_urls_are_posted_to(url: str) -> None:
    with pytest.raises(ReportError):
        post_report(_a_report(), url)


# -- where POSTs may go: no private networks by default (server-side request forgery) ------------


@pytest.fixture
def tried(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every connection attempt from now on, recorded and refused (none leaves the test)."""
    attempts: list[tuple[str, int]] = []

    def refuse(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        attempts.append((str(address[0]), int(address[1])))
        raise ConnectionRefusedError("refused by the test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


def _post(flavour: Flavour, url: str, **kwargs: Any) -> int:
    if flavour == "sync":
        return post_report(_a_report(), url, timeout=5.0, **kwargs)
    return run(apost_report(_a_report(), url, timeout=5.0, **kwargs))


_SECRET_URL = "https://{host}/v1/tlsrpt?token=s3cret"


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize(
    ("host", "address", "named"),
    [
        ("127.0.0.2", None, "127.0.0.2"),
        ("[::1]", None, "::1"),
        ("10.1.2.3:8443", None, "10.1.2.3"),
        ("localhost", None, None),  # the system's resolver: 127.0.0.1 and/or ::1
        (REPORTS_HOST, "169.254.169.254", "169.254.169.254"),
        (REPORTS_HOST, "fd00::1", "fd00::1"),
        (REPORTS_HOST, "100.64.0.1", "100.64.0.1"),
        (REPORTS_HOST, "::ffff:127.0.0.1", "::ffff:127.0.0.1"),
    ],
)
def test_a_rua_on_a_private_address_is_refused_without_a_connection(
    flavour: Flavour, host: str, address: str | None, named: str | None, tried: list[object]
) -> None:
    url = _SECRET_URL.format(host=host)
    with pytest.raises(ReportError, match="not a public address: refused") as caught:
        _post(flavour, url, address=address)
    assert tried == []
    text = str(caught.value)
    assert f"{urllib.parse.urlsplit(url).hostname} resolves to" in text
    if named is not None:
        assert named in text
    # The URL's path and query are not repeated: a query may carry a token.
    assert "s3cret" not in text
    assert "/v1/tlsrpt" not in text


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_an_allowed_private_rua_is_connected_to(flavour: Flavour, tried: list[object]) -> None:
    # The control for the test above: the same attempt is seen once allowed.
    with pytest.raises(ReportError, match="ConnectionRefusedError"):
        _post(flavour, _SECRET_URL.format(host="127.0.0.2"), allow_private_addresses=True)
    assert tried == [("127.0.0.2", 443)]


def _resolving_to(monkeypatch: pytest.MonkeyPatch, addresses: tuple[str, ...]) -> list[str]:
    """Make the system's resolver answer ``addresses`` for any name; the names asked."""
    asked: list[str] = []

    def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        asked.append(host)
        return [
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (a, port, 0, 0))
            if ":" in a
            else (socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
            for a in addresses
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return asked


@pytest.mark.parametrize(
    "addresses",
    [
        ("93.184.216.34", "10.0.0.1"),
        ("2606:2800:220:1::1", "93.184.216.34", "169.254.169.254"),
        ("93.184.216.34", "93.184.216.34", "fd00::1"),
    ],
)
def test_every_address_of_the_rua_host_is_checked(
    addresses: tuple[str, ...], monkeypatch: pytest.MonkeyPatch, tried: list[object]
) -> None:
    _resolving_to(monkeypatch, addresses)
    with pytest.raises(ReportError, match=f"{REPORTS_HOST} resolves to {addresses[-1]}, not"):
        post_report(_a_report(), f"https://{REPORTS_HOST}/tlsrpt")
    assert tried == []


def test_a_public_rua_is_tried_at_its_checked_addresses_only(
    monkeypatch: pytest.MonkeyPatch, tried: list[tuple[str, int]]
) -> None:
    public = ("93.184.216.34", "2606:2800:220:1::1", "93.184.216.34")
    asked = _resolving_to(monkeypatch, public)
    with pytest.raises(ReportError, match="ConnectionRefusedError"):
        post_report(_a_report(), f"https://{REPORTS_HOST}/tlsrpt")
    assert asked == [REPORTS_HOST]  # resolved once: no second answer to be rebound
    assert tried == [("93.184.216.34", 443), ("2606:2800:220:1::1", 443)]
