"""MTA-STS ``testing`` mode with TLS reporting (RFC 8461 §5, RFC 8460), end to end.

Real peers: the unbound test DNS (``testing.sts.test`` → ``mx.mailrelay.test``, 127.0.0.1
and ::1), the loopback HTTPS policy server (a certificate from the test CA), and an
aiosmtpd exchanger on 127.0.0.1 that counts its connections and presents a certificate the
test CA signed for its name (``leaf``), one it signed for another name (``other-name``), a
self-signed one (``untrusted``) or no STARTTLS at all. A testing policy with a reporter on
the hook and the transport must deliver every message whatever the exchanger presents, and
report what ``enforce`` would have met under the ``sts`` policy; without a reporter it must
be exactly opportunistic delivery (one connection per session).
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from mailrelay.envelope import Envelope
from mailrelay.message import Message
from mailrelay.options import TLS, Timeouts
from mailrelay.results import DeliveryResult
from mailrelay.transport.dane import DANEHost, DANEPolicy, HostState
from mailrelay.transport.mtasts import MTASTS, AsyncMTASTS
from mailrelay.transport.mx import MXPolicy, MXTransport
from mailrelay.transport.mx_async import AsyncMXTransport
from mailrelay.transport.settings import PoolSettings
from mailrelay.transport.tlsrpt import TLSReportCollector
from tests.peers.https_policy import PolicyServer, issue_certificate
from tests.peers.tls import TLSFiles
from tests.peers.unbound import UnboundServer
from tests.transport.counting_server import CountingHandler, start_counting
from tests.transport.helpers import FLAVOURS, Flavour, run

pytestmark = pytest.mark.unbound

TESTING = "testing.sts.test"
MX = "mx.mailrelay.test"
START = dt.datetime(2026, 11, 28, tzinfo=dt.UTC)
END = dt.datetime(2026, 11, 28, 23, 59, 59, tzinfo=dt.UTC)
NO_REUSE = PoolSettings(max_messages=1)


def policy_text(mx: tuple[str, ...] = ("*.mailrelay.test",)) -> str:
    lines = ["version: STSv1", "mode: testing", *(f"mx: {m}" for m in mx), "max_age: 86400"]
    return "\r\n".join(lines) + "\r\n"


def policy_string(mx: tuple[str, ...] = ("*.mailrelay.test",)) -> list[str]:
    return ["version: STSv1", "mode: testing", *(f"mx: {m}" for m in mx), "max_age: 86400"]


def free_port() -> int:
    """A TCP port free on both 127.0.0.1 and ::1 (the exchanger's two addresses)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as other:
                other.bind(("::1", port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on 127.0.0.1 and ::1 in 50 tries")


@pytest.fixture(scope="module")
def certs(
    tls_files: TLSFiles, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, Path]]:
    """(chain, key) files the exchanger and the policy server can present."""
    other = issue_certificate(tls_files, ["other.mailrelay.test"], tmp_path_factory.mktemp("o"))
    https = issue_certificate(tls_files, [f"mta-sts.{TESTING}"], tmp_path_factory.mktemp("h"))
    return {
        "leaf": (tls_files.cert_file, tls_files.key_file),
        "untrusted": (tls_files.untrusted_cert_file, tls_files.untrusted_key_file),
        "other-name": other,
        "https": https,
    }


@pytest.fixture
def https_server(certs: dict[str, tuple[Path, Path]]) -> Iterator[PolicyServer]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certs["https"])
    server = PolicyServer(context).start()
    yield server
    server.stop()


@pytest.fixture
def smtp_port() -> int:
    return free_port()


ServerFactory = Callable[[str | None], CountingHandler]


@pytest.fixture
def mx_server(smtp_port: int, certs: dict[str, tuple[Path, Path]]) -> Iterator[ServerFactory]:
    """``mx_server(cert)``: a counting aiosmtpd on 127.0.0.1 presenting ``cert`` after
    STARTTLS (``None``: no STARTTLS offered)."""
    controllers: list[Controller] = []

    def start(cert: str | None) -> CountingHandler:
        context = None
        if cert is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*certs[cert])
        handler = CountingHandler()
        controllers.append(start_counting(handler, port=smtp_port, tls_context=context))
        return handler

    yield start
    for controller in controllers:
        controller.stop()


def deliver(
    flavour: Flavour,
    unbound: UnboundServer,
    https_server: PolicyServer,
    tls_files: TLSFiles,
    smtp_port: int,
    *,
    hook_reporter: TLSReportCollector | None,
    transport_reporter: TLSReportCollector | None,
    messages: int = 1,
    pool: PoolSettings | None = None,
) -> list[DeliveryResult]:
    """``messages`` messages to ``bob@testing.sts.test``, one after the other, through one
    MX transport under MTA-STS."""
    batch = []
    for number in range(messages):
        message = Message.build(
            sender="sender@mailrelay.test", to=[f"bob@{TESTING}"], subject=f"#{number}", text="Hi\n"
        )
        batch.append((message, Envelope.from_message(message)))
    options: dict[str, Any] = {
        "port": smtp_port,
        "timeouts": Timeouts.all(2),
        "ssl_context": tls_files.client_context(),  # what a verified attempt trusts
        "tls_reporter": transport_reporter,
    }
    if pool is not None:
        options["pool"] = pool
    sts_options: dict[str, Any] = {
        "port": https_server.port,
        "ssl_context": tls_files.client_context(),
        "timeout": 5.0,
        "tls_reporter": hook_reporter,
        "allow_private_addresses": True,  # the policy server is on loopback
    }
    if flavour == "sync":
        resolver = unbound.resolver(timeout=1.0)
        with MXTransport(
            resolver, tls_policy=MTASTS(resolver, **sts_options), **options, refused_networks=()
        ) as t:
            return [t.send(message, envelope) for message, envelope in batch]

    async def main() -> list[DeliveryResult]:
        aresolver = unbound.async_resolver(timeout=1.0)
        hook = AsyncMTASTS(aresolver, **sts_options)
        async with AsyncMXTransport(
            aresolver, tls_policy=hook, **options, refused_networks=()
        ) as transport:
            return [await transport.asend(message, envelope) for message, envelope in batch]

    return run(main())


def only_report(collector: TLSReportCollector) -> dict[str, Any]:
    [report] = collector.reports(START, END, organization="mailrelay tests", contact="t@t.test")
    decoded: dict[str, Any] = json.loads(report.to_json())
    return decoded


def summary(entry: dict[str, Any]) -> tuple[int, int]:
    counts = entry["summary"]
    return counts["total-successful-session-count"], counts["total-failure-session-count"]


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize(
    ("cert", "result_type", "encrypted"),
    [
        ("untrusted", "certificate-not-trusted", True),
        ("other-name", "certificate-host-mismatch", True),
        (None, "starttls-not-supported", False),  # delivered in plain text, as opportunistic
    ],
)
def test_a_failed_verification_is_reported_and_the_message_delivered(  # noqa: PLR0917
    flavour: Flavour,
    cert: str | None,
    result_type: str,
    encrypted: bool,
    unbound: UnboundServer,
    https_server: PolicyServer,
    tls_files: TLSFiles,
    smtp_port: int,
    mx_server: ServerFactory,
) -> None:
    https_server.serve(TESTING, policy_text())
    handler = mx_server(cert)
    collector = TLSReportCollector()
    [result] = deliver(
        flavour, unbound, https_server, tls_files, smtp_port,
        hook_reporter=collector, transport_reporter=collector,
    )  # fmt: skip
    # RFC 8461 §5: testing mode never defers or bounces for the policy's sake.
    assert result.ok, result.recipients
    [received] = handler.messages
    assert received.rcpt_tos == (f"bob@{TESTING}",)
    assert received.tls is encrypted
    # The verified attempt, then the opportunistic session that carried the message.
    assert len(handler.connections) == 2
    [entry] = only_report(collector)["policies"]
    assert entry["policy"] == {
        "policy-type": "sts",
        "policy-string": policy_string(),
        "policy-domain": TESTING,
        "mx-host": ["*.mailrelay.test"],
    }
    assert summary(entry) == (0, 1)
    [row] = entry["failure-details"]
    assert row["result-type"] == result_type
    assert row["receiving-mx-hostname"] == MX
    assert row["receiving-ip"] == "127.0.0.1"
    assert row["failed-session-count"] == 1


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_verified_exchanger_is_counted_as_a_success_under_sts(  # noqa: PLR0917
    flavour: Flavour,
    unbound: UnboundServer,
    https_server: PolicyServer,
    tls_files: TLSFiles,
    smtp_port: int,
    mx_server: ServerFactory,
) -> None:
    https_server.serve(TESTING, policy_text())
    handler = mx_server("leaf")
    collector = TLSReportCollector()
    [result] = deliver(
        flavour, unbound, https_server, tls_files, smtp_port,
        hook_reporter=collector, transport_reporter=collector,
    )  # fmt: skip
    assert result.ok, result.recipients
    [received] = handler.messages
    assert received.tls
    assert len(handler.connections) == 1  # the verified session carried the message
    [entry] = only_report(collector)["policies"]
    assert entry["policy"]["policy-type"] == "sts"
    assert entry["policy"]["policy-string"] == policy_string()
    assert summary(entry) == (1, 0)
    assert "failure-details" not in entry


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_an_exchanger_outside_the_mx_patterns_is_reported_and_used(  # noqa: PLR0917
    flavour: Flavour,
    unbound: UnboundServer,
    https_server: PolicyServer,
    tls_files: TLSFiles,
    smtp_port: int,
    mx_server: ServerFactory,
) -> None:
    mx = ("mx.elsewhere.test",)
    https_server.serve(TESTING, policy_text(mx))
    handler = mx_server("leaf")
    collector = TLSReportCollector()
    [result] = deliver(
        flavour, unbound, https_server, tls_files, smtp_port,
        hook_reporter=collector, transport_reporter=collector,
    )  # fmt: skip
    assert result.ok, result.recipients
    assert len(handler.messages) == 1
    assert len(handler.connections) == 1  # enforce would not connect at all: no probe
    [entry] = only_report(collector)["policies"]
    assert entry["policy"]["policy-string"] == policy_string(mx)
    assert entry["policy"]["mx-host"] == list(mx)
    assert summary(entry) == (0, 1)
    [row] = entry["failure-details"]
    assert row["result-type"] == "validation-failure"
    assert row["failure-reason-code"] == "mx-mismatch"
    assert row["receiving-mx-hostname"] == MX


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("reporter_on", ["neither", "hook", "transport"])
def test_without_a_reporter_on_both_delivery_is_plain_opportunistic(  # noqa: PLR0917
    flavour: Flavour,
    reporter_on: str,
    unbound: UnboundServer,
    https_server: PolicyServer,
    tls_files: TLSFiles,
    smtp_port: int,
    mx_server: ServerFactory,
) -> None:
    https_server.serve(TESTING, policy_text())
    handler = mx_server("untrusted")
    collector = TLSReportCollector()
    [result] = deliver(
        flavour, unbound, https_server, tls_files, smtp_port,
        hook_reporter=collector if reporter_on == "hook" else None,
        transport_reporter=collector if reporter_on == "transport" else None,
    )  # fmt: skip
    assert result.ok, result.recipients
    [received] = handler.messages
    assert received.tls
    assert len(handler.connections) == 1  # no verified attempt: nobody would learn of it
    reports = collector.reports(START, END, organization="mailrelay tests", contact="t@t.test")
    if reporter_on == "transport":
        # The hook answered as without the policy: an opportunistic session, no policy.
        [report] = reports
        [entry] = json.loads(report.to_json())["policies"]
        assert entry["policy"] == {"policy-type": "no-policy-found", "policy-domain": TESTING}
        assert summary(entry) == (1, 0)
    else:
        assert reports == []


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize(
    ("cert", "pool", "connections", "counts"),
    [
        # Reuse: one verified-then-opportunistic pair, then the same session for the rest.
        ("untrusted", None, 2, (0, 1)),
        # No reuse: the failure is kept, so each later message has one connection, and each
        # fresh session is counted as the failure enforce would have met.
        ("untrusted", NO_REUSE, 4, (0, 3)),
        ("leaf", None, 1, (1, 0)),
        ("leaf", NO_REUSE, 3, (3, 0)),  # each fresh session is a verified one
    ],
)
def test_the_verification_is_not_repeated_per_message(  # noqa: PLR0917
    flavour: Flavour,
    cert: str,
    pool: PoolSettings | None,
    connections: int,
    counts: tuple[int, int],
    unbound: UnboundServer,
    https_server: PolicyServer,
    tls_files: TLSFiles,
    smtp_port: int,
    mx_server: ServerFactory,
) -> None:
    https_server.serve(TESTING, policy_text())
    handler = mx_server(cert)
    collector = TLSReportCollector()
    results = deliver(
        flavour, unbound, https_server, tls_files, smtp_port,
        hook_reporter=collector, transport_reporter=collector, messages=3, pool=pool,
    )  # fmt: skip
    assert all(result.ok for result in results), results
    assert len(handler.messages) == 3
    assert len(handler.connections) == connections
    [entry] = only_report(collector)["policies"]
    assert entry["policy"]["policy-type"] == "sts"
    assert summary(entry) == counts


DANE_ELSEWHERE = DANEPolicy(hosts=(DANEHost(name="mx.other.test", state=HostState.ENCRYPT),))


@pytest.mark.parametrize(
    ("fallback", "expected"),
    [
        (None, "testing"),
        (MXPolicy(dane=DANE_ELSEWHERE), "testing+dane"),  # DANE's verdict kept beside it
        (TLS.NONE, "fallback"),  # any other answer of the fallback wins, as without reporter
    ],
)
def test_the_hook_answers_a_testing_policy_when_it_has_a_reporter(
    fallback: TLS | MXPolicy | None,
    expected: str,
    unbound: UnboundServer,
    https_server: PolicyServer,
    tls_files: TLSFiles,
) -> None:
    https_server.serve(TESTING, policy_text())
    sts = MTASTS(
        unbound.resolver(timeout=1.0),
        port=https_server.port,
        ssl_context=tls_files.client_context(),
        timeout=5.0,
        tls_reporter=TLSReportCollector(),
        fallback=(lambda domain: fallback),
        allow_private_addresses=True,
    )
    answer = sts(TESTING)
    if expected == "fallback":
        assert answer is fallback
        return
    assert isinstance(answer, MXPolicy)
    assert answer.sts_testing
    assert answer.mx_patterns == ("*.mailrelay.test",)
    assert list(answer.sts_policy_string) == policy_string()
    assert answer.dane == (DANE_ELSEWHERE if expected == "testing+dane" else None)
