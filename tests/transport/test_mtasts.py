"""MTA-STS (RFC 8461) against the real test DNS (unbound) and real HTTPS and SMTP servers.

The unbound zone (tests/peers/unbound.py, ``STS_DOMAINS``) publishes ``_mta-sts`` TXT records
and ``mta-sts.<domain> A 127.0.0.1`` for a few domains under ``sts.test``, whose exchanger is
``mx.mailrelay.test`` (127.0.0.1 and ::1). Policies are served by an HTTPS server on
loopback (tests/peers/https_policy.py) with a certificate the test CA signed for those
``mta-sts`` names; the hooks are given its port. Clocks are injected: nothing sleeps.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.envelope import Envelope
from mailrelay.errors import ConfigurationError, PolicyFetchError
from mailrelay.message import Message
from mailrelay.options import TLS, Timeouts
from mailrelay.results import DeliveryResult, Outcome
from mailrelay.transport.mtasts import (
    MAX_MAX_AGE,
    MAX_POLICY_SIZE,
    MTASTS,
    AsyncMTASTS,
    CachedPolicy,
    Mode,
    PolicyCache,
    PolicyError,
    STSPolicy,
    STSRecord,
    fetch_policy,
)
from mailrelay.transport.mx import MXPolicy, MXTransport
from mailrelay.transport.mx_async import AsyncMXTransport
from mailrelay.transport.tlsrpt import ResultType, sts_result_of
from tests.peers.aiosmtpd_server import HOSTNAME, RecordingHandler
from tests.peers.https_policy import PolicyServer, Response, closed_port, issue_certificate
from tests.peers.tls import TLSFiles
from tests.peers.unbound import REFUSED_ZONE, SSRF_STS_DOMAINS, STS_DOMAINS, UnboundServer
from tests.transport.helpers import FLAVOURS, Flavour, run

pytestmark = pytest.mark.unbound

ENFORCE = "enforce.sts.test"
MX = "mx.mailrelay.test"


def policy_text(mode: str = "enforce", mx: tuple[str, ...] = (MX,), max_age: int = 86400) -> str:
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), f"max_age: {max_age}"]
    return "\r\n".join(lines) + "\r\n"


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- peers -----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def policy_cert(tls_files: TLSFiles, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A certificate naming every ``mta-sts.<domain>`` of the zone but badcert's (and
    noaddr's, which has no address anyway)."""
    names = [
        f"mta-sts.{d}" for d in STS_DOMAINS if d not in {"badcert.sts.test", "noaddr.sts.test"}
    ]
    return issue_certificate(tls_files, names, tmp_path_factory.mktemp("mta-sts"))


def start_server(cert: Path, key: Path) -> PolicyServer:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return PolicyServer(context).start()


@pytest.fixture
def server(policy_cert: tuple[Path, Path]) -> Iterator[PolicyServer]:
    """The HTTPS policy server (CA-signed certificate for the zone's policy hosts)."""
    policy_server = start_server(*policy_cert)
    yield policy_server
    policy_server.stop()


@pytest.fixture
def self_signed_server(tls_files: TLSFiles) -> Iterator[PolicyServer]:
    """A policy server whose certificate is self-signed (not from the test CA)."""
    policy_server = start_server(tls_files.untrusted_cert_file, tls_files.untrusted_key_file)
    yield policy_server
    policy_server.stop()


def hook(unbound: UnboundServer, server_port: int, tls_files: TLSFiles, **kwargs: Any) -> MTASTS:
    kwargs.setdefault("timeout", 5.0)
    # The policy server is on loopback: the hook must be allowed to reach it.
    kwargs.setdefault("allow_private_addresses", True)
    return MTASTS(
        unbound.resolver(timeout=1.0),
        port=server_port,
        ssl_context=tls_files.client_context(),
        **kwargs,
    )


def seeded(
    domain: str, record_id: str, *, fetched_at: float = 1000.0, max_age: int = 86400
) -> CachedPolicy:
    """A cached enforce policy for ``domain`` under ``record_id``."""
    return CachedPolicy(
        domain=domain,
        id=record_id,
        policy=STSPolicy(mode=Mode.ENFORCE, max_age=max_age, mx=("cached.example",)),
        fetched_at=fetched_at,
    )


# -- parsing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (policy_text(), STSPolicy(mode=Mode.ENFORCE, max_age=86400, mx=(MX,))),
        # LF line ends, no final line end, a wildcard, upper case, extra spaces.
        (
            "version: STSv1\nmode: testing\nmx:   *.Example.NET  \nmx: a.example\nmax_age:0",
            STSPolicy(mode=Mode.TESTING, max_age=0, mx=("*.example.net", "a.example")),
        ),
        # Unknown keys ignored; order free; the first of a repeated key counts.
        (
            "mode: enforce\r\nfuture_key: anything at all\r\nversion: STSv1\r\nmx: m.example\r\n"
            f"max_age: {MAX_MAX_AGE}\r\nmode: none\r\n",
            STSPolicy(mode=Mode.ENFORCE, max_age=MAX_MAX_AGE, mx=("m.example",)),
        ),
        # Mode none needs no mx.
        ("version: STSv1\nmode: none\nmax_age: 60\n", STSPolicy(mode=Mode.NONE, max_age=60)),
        (b"version: STSv1\nmode: none\nmax_age: 1\n", STSPolicy(mode=Mode.NONE, max_age=1)),
    ],
)
def test_policy_parses(text: str | bytes, expected: STSPolicy) -> None:
    assert STSPolicy.parse(text) == expected


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "version"),
        ("mode: enforce\nmx: a.example\nmax_age: 1\n", "version"),
        (policy_text().replace("STSv1", "STSv2"), "version"),
        (policy_text(mode="strict"), "mode"),
        (policy_text(mode="Enforce"), "mode"),
        (policy_text(max_age=MAX_MAX_AGE + 1), "max_age"),
        (policy_text().replace("max_age: 86400", "max_age: -1"), "max_age"),
        (policy_text().replace("max_age: 86400", "max_age: 1h"), "max_age"),
        (policy_text().replace("max_age: 86400\r\n", ""), "max_age"),
        (policy_text(mx=()), "mx"),
        (policy_text(mode="testing", mx=()), "mx"),
        (policy_text(mx=("*.*.example",)), "MX pattern"),
        (policy_text(mx=("a..example",)), "MX pattern"),
        (policy_text(mx=("mail.example.com:25",)), "MX pattern"),
        (policy_text(mx=("",)), "MX pattern"),
        (policy_text() + "this line has no colon\r\n", "key: value"),
        (policy_text() + ": no key\r\n", "key: value"),
        (b"version: STSv1\nmode: none\nmax_age: 1\n\xff\n", "UTF-8"),
    ],
)
def test_invalid_policies_are_refused(text: str | bytes, complaint: str) -> None:
    with pytest.raises(PolicyError, match=complaint):
        STSPolicy.parse(text)


@given(st.one_of(st.text(), st.binary()))
def test_the_policy_parser_raises_only_policy_error(text: str | bytes) -> None:
    try:
        policy = STSPolicy.parse(text)
    except PolicyError:
        return
    assert policy.mode is Mode.NONE or policy.mx


@given(
    st.sampled_from(list(Mode)),
    st.integers(0, MAX_MAX_AGE),
    st.lists(
        st.from_regex(r"(\*\.)?[a-z0-9]{1,10}(\.[a-z0-9]{1,10}){0,3}", fullmatch=True),
        min_size=1,
        max_size=4,
    ),
    st.sampled_from(["\n", "\r\n"]),
)
def test_a_written_policy_parses_back(mode: Mode, max_age: int, mx: list[str], end: str) -> None:
    text = end.join(policy_text(mode.value, tuple(mx), max_age).split("\r\n"))
    assert STSPolicy.parse(text) == STSPolicy(mode=mode, max_age=max_age, mx=tuple(mx))


@pytest.mark.parametrize(
    ("text", "record_id"),
    [
        ("v=STSv1; id=20160831085700Z;", "20160831085700Z"),
        ("v=STSv1;id=abc", "abc"),
        ("v=STSv1; id=abc ;  ext-1=x;", "abc"),
        ("v=STSv1; future=1; id=" + "a" * 32, "a" * 32),
    ],
)
def test_txt_record_parses(text: str, record_id: str) -> None:
    assert STSRecord.parse(text) == STSRecord(id=record_id)


@pytest.mark.parametrize(
    "text",
    [
        "v=STSv1",
        "v=STSv1;",
        "v=STSv1; id=",
        "v=STSv1; id=" + "a" * 33,
        "v=STSv1; id=a-b",
        "v=STSv1; id=a; id=b",
        "v=STSv2; id=a",
        " v=STSv1; id=a",
        "v=STSv1; id=a; bad value=1",
        "v=spf1 -all",
    ],
)
def test_invalid_txt_records_are_refused(text: str) -> None:
    with pytest.raises(PolicyError):
        STSRecord.parse(text)


@pytest.mark.parametrize(
    ("texts", "record_id"),
    [
        (("v=STSv1; id=one",), "one"),
        (("v=spf1 -all", "v=STSv1; id=one", "google-site-verification=x"), "one"),
        (("v=STSv1; id=one", "v=STSv1; id=two"), None),
        (("v=spf1 -all",), None),
        ((), None),
    ],
)
def test_select_keeps_the_one_stsv1_record(texts: tuple[str, ...], record_id: str | None) -> None:
    if record_id is None:
        with pytest.raises(PolicyError):
            STSRecord.select(texts)
    else:
        assert STSRecord.select(texts).id == record_id


@given(st.text())
def test_the_record_parser_raises_only_policy_error(text: str) -> None:
    try:
        record = STSRecord.parse(text)
    except PolicyError:
        return
    assert record.id.isascii()
    assert record.id.isalnum()


@pytest.mark.parametrize(
    ("patterns", "host", "allowed"),
    [
        ((MX,), MX, True),
        ((MX,), "MX.MAILRELAY.TEST.", True),
        (("*.mailrelay.test",), MX, True),
        (("*.mailrelay.test",), "a.mx.mailrelay.test", False),
        (("*.mailrelay.test",), "mailrelay.test", False),
        (("other.test",), MX, False),
    ],
)
def test_mx_patterns(patterns: tuple[str, ...], host: str, allowed: bool) -> None:
    policy = STSPolicy(mode=Mode.ENFORCE, max_age=1, mx=patterns)
    assert policy.allows(host) is allowed


def test_only_enforce_gives_an_mx_policy() -> None:
    context = ssl.create_default_context()
    enforce = STSPolicy(mode=Mode.ENFORCE, max_age=1, mx=(MX,))
    assert enforce.mx_policy(context) == MXPolicy(
        tls=TLS.STARTTLS, mx_patterns=(MX,), ssl_context=context, plaintext_fallback=False
    )
    assert STSPolicy(mode=Mode.TESTING, max_age=1, mx=(MX,)).mx_policy() is None
    assert STSPolicy(mode=Mode.NONE, max_age=1).mx_policy() is None


@pytest.mark.parametrize(
    "kwargs",
    [{"port": 0}, {"port": 65536}, {"port": True}, {"timeout": 0}, {"ssl_context": "yes"}],
)
def test_bad_configuration_is_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        MTASTS(**kwargs)


def test_the_resolver_must_match_the_hook(unbound: UnboundServer) -> None:
    with pytest.raises(ConfigurationError, match="AsyncResolver"):
        AsyncMTASTS(unbound.resolver())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="Resolver"):
        MTASTS(unbound.async_resolver())  # type: ignore[arg-type]


def test_the_async_hook_is_refused_by_the_blocking_transport(unbound: UnboundServer) -> None:
    sts = AsyncMTASTS(unbound.async_resolver())
    message = Message.build(sender="a@mailrelay.test", to=[f"bob@{ENFORCE}"], text="Hi\n")
    with (
        MXTransport(unbound.resolver(), tls_policy=sts, refused_networks=()) as transport,  # type: ignore[arg-type]
        pytest.raises(ConfigurationError, match=r"returned an awaitable: .*MTASTS"),
    ):
        transport.send(message)


def test_the_cache_is_bounded_and_drops_expired_policies() -> None:
    cache = PolicyCache(size=2)
    for name in ("a.test", "b.test", "c.test"):
        cache.put(seeded(name, "id1", max_age=10))
    assert len(cache) == 2
    assert cache.get("a.test", 1000.0) is None  # the least recently used went first
    assert cache.get("c.test", 1009.9) is not None
    assert cache.get("c.test", 1010.0) is None  # RFC 8461 §3.2: max_age after the fetch
    assert len(cache) == 1


# -- discovery and fetching against the real DNS and HTTPS servers -------------------------


def test_policy_is_fetched_and_applied(
    unbound: UnboundServer, server: PolicyServer, tls_files: TLSFiles
) -> None:
    server.serve(ENFORCE, policy_text(mx=(MX, "*.backup.test")))
    sts = hook(unbound, server.port, tls_files)
    answer = sts(ENFORCE)
    assert answer == MXPolicy(
        tls=TLS.STARTTLS, mx_patterns=(MX, "*.backup.test"), plaintext_fallback=False
    )
    assert server.requests == [(f"mta-sts.{ENFORCE}", "/.well-known/mta-sts.txt")]
    entry = sts.cache.get(ENFORCE, 0.0)
    assert entry is not None
    assert entry.id == "enforce1"


@pytest.mark.parametrize(
    ("domain", "has_policy"),
    [
        ("malformed.sts.test", False),  # id with characters outside ALPHA / DIGIT
        ("twotxt.sts.test", False),  # RFC 8461 §3.1: more than one STSv1 record
        ("notxt.sts.test", False),
        ("spf.sts.test", True),  # the SPF record is discarded, one STSv1 record is left
    ],
)
def test_discovery(
    unbound: UnboundServer,
    server: PolicyServer,
    tls_files: TLSFiles,
    domain: str,
    has_policy: bool,
) -> None:
    server.serve(domain, policy_text())  # served in every case: only discovery decides
    sts = hook(unbound, server.port, tls_files)
    assert (sts(domain) is not None) is has_policy
    assert server.fetches(domain) == (1 if has_policy else 0)


def test_unchanged_id_is_not_fetched_again(
    unbound: UnboundServer, server: PolicyServer, tls_files: TLSFiles
) -> None:
    server.serve(ENFORCE, policy_text())
    clock = Clock()
    sts = hook(unbound, server.port, tls_files, clock=clock)
    first = sts(ENFORCE)
    clock.now += 3600
    assert sts(ENFORCE) == first
    assert server.fetches(ENFORCE) == 1


@pytest.mark.parametrize("domain", [ENFORCE, "notxt.sts.test", "nosuchdomain.sts.test"])
def test_txt_answers_are_cached(
    unbound: UnboundServer, server: PolicyServer, tls_files: TLSFiles, domain: str
) -> None:
    server.serve(domain, policy_text())
    sts = hook(unbound, server.port, tls_files)
    before = unbound.queries_for(f"_mta-sts.{domain}")
    for _ in range(3):
        sts(domain)
    # Positive answers for their TTL, NODATA and NXDOMAIN for the negative TTL (RFC 2308).
    assert unbound.queries_for(f"_mta-sts.{domain}") == before + 1


def test_threads_asking_at_once_share_one_fetch(
    unbound: UnboundServer, server: PolicyServer, tls_files: TLSFiles
) -> None:
    server.serve(ENFORCE, policy_text())
    sts = hook(unbound, server.port, tls_files)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(sts, [ENFORCE] * 8, timeout=30))
    assert all(isinstance(answer, MXPolicy) for answer in answers)
    assert server.fetches(ENFORCE) == 1


def test_a_policy_in_use_is_renewed_before_it_expires(
    unbound: UnboundServer, server: PolicyServer, tls_files: TLSFiles
) -> None:
    server.serve(ENFORCE, policy_text(max_age=7 * 86400))
    clock = Clock()
    sts = hook(unbound, server.port, tls_files, clock=clock, refresh_after=86400.0)
    assert sts(ENFORCE) is not None
    clock.now += 86399
    assert sts(ENFORCE) is not None
    assert server.fetches(ENFORCE) == 1
    clock.now += 1  # a day old: fetched again though the id is unchanged
    assert sts(ENFORCE) is not None
    assert server.fetches(ENFORCE) == 2
    entry = sts.cache.get(ENFORCE, clock.now)
    assert entry is not None
    assert entry.fetched_at == clock.now  # max_age counts from the renewal
    # A renewal that fails keeps the policy in force.
    server.serve(ENFORCE, FAILURES["404"])
    clock.now += 86400
    answer = sts(ENFORCE)
    assert isinstance(answer, MXPolicy)
    assert server.fetches(ENFORCE) == 3


def test_changed_id_is_fetched_again(
    unbound: UnboundServer, server: PolicyServer, tls_files: TLSFiles
) -> None:
    server.serve(ENFORCE, policy_text(mx=("new.example",)))
    sts = hook(unbound, server.port, tls_files, clock=Clock())
    sts.cache.put(seeded(ENFORCE, "older1"))
    answer = sts(ENFORCE)
    assert isinstance(answer, MXPolicy)
    assert answer.mx_patterns == ("new.example",)
    assert server.fetches(ENFORCE) == 1
    entry = sts.cache.get(ENFORCE, 1000.0)
    assert entry is not None
    assert entry.id == "enforce1"


def test_policy_expires_after_max_age(
    unbound: UnboundServer, server: PolicyServer, tls_files: TLSFiles
) -> None:
    server.serve(ENFORCE, policy_text(max_age=100))
    clock = Clock()
    sts = hook(unbound, server.port, tls_files, clock=clock)
    assert sts(ENFORCE) is not None
    clock.now += 99
    assert sts(ENFORCE) is not None
    assert server.fetches(ENFORCE) == 1
    clock.now += 1  # max_age seconds after the fetch: expired, fetched anew
    assert sts(ENFORCE) is not None
    assert server.fetches(ENFORCE) == 2


BIG = policy_text() + "x: " + "y" * MAX_POLICY_SIZE + "\r\n"
FAILURES = {
    "404": Response(status=404, body=b"gone\n"),
    "redirect": Response(status=301, headers=(("Location", "https://elsewhere.test/mta-sts.txt"),)),
    "oversized": Response(body=BIG.encode()),
    "html": Response(body=policy_text().encode(), content_type="text/html"),
    "no media type": Response(body=policy_text().encode(), content_type=None),
    "invalid policy": Response(body=b"version: STSv1\r\nmode: enforce\r\n"),
    "500": Response(status=500, body=b"oops\n"),
}


@pytest.mark.parametrize("cached", [False, True], ids=["uncached", "cached"])
@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_failed_fetch_is_no_policy_unless_one_is_cached(
    unbound: UnboundServer, server: PolicyServer, tls_files: TLSFiles, failure: str, cached: bool
) -> None:
    server.serve(ENFORCE, FAILURES[failure])
    sts = hook(unbound, server.port, tls_files, clock=Clock())
    if cached:
        sts.cache.put(seeded(ENFORCE, "older1"))
    answer = sts(ENFORCE)
    assert server.fetches(ENFORCE) == 1
    if cached:  # RFC 8461 §5.1: a failed refresh never downgrades
        assert isinstance(answer, MXPolicy)
        assert answer.mx_patterns == ("cached.example",)
    else:  # RFC 8461 §3.3: as though the domain had no policy
        assert answer is None


@pytest.mark.parametrize("cached", [False, True], ids=["uncached", "cached"])
@pytest.mark.parametrize("failure", ["server down", "wrong name", "self-signed", "no address"])
def test_failed_connection_is_no_policy_unless_one_is_cached(  # noqa: PLR0917 -- fixtures and table columns
    unbound: UnboundServer,
    server: PolicyServer,
    self_signed_server: PolicyServer,
    tls_files: TLSFiles,
    failure: str,
    cached: bool,
) -> None:
    domain, port = ENFORCE, server.port
    if failure == "server down":
        port = closed_port()
    elif failure == "wrong name":
        domain = "badcert.sts.test"  # the certificate does not name mta-sts.badcert.sts.test
    elif failure == "self-signed":
        port = self_signed_server.port
    else:
        domain = "noaddr.sts.test"
    for policy_server in (server, self_signed_server):
        policy_server.serve(domain, policy_text())
    sts = hook(unbound, port, tls_files, clock=Clock())
    if cached:
        sts.cache.put(seeded(domain, "older1"))
    answer = sts(domain)
    assert server.fetches(domain) == 0
    assert self_signed_server.fetches(domain) == 0
    if cached:
        assert isinstance(answer, MXPolicy)
        assert answer.mx_patterns == ("cached.example",)
    else:
        assert answer is None


def test_a_fetch_has_one_deadline_however_slowly_the_server_talks(
    unbound: UnboundServer, server: PolicyServer, tls_files: TLSFiles
) -> None:
    # Each byte comes well within a read timeout, but all of them take 10 s: the fetch's
    # deadline (0.5 s) cuts it off.
    server.serve(ENFORCE, Response(body=policy_text().encode(), drip=0.01))
    sts = hook(unbound, server.port, tls_files, timeout=0.5)
    assert sts(ENFORCE) is None
    assert server.fetches(ENFORCE) == 1
    assert server.drip_done.wait(15)
    assert server.drips == ["cut"]  # we hung up before the server had sent its headers


def test_failed_fetch_is_not_retried_at_once(
    unbound: UnboundServer, server: PolicyServer, tls_files: TLSFiles
) -> None:
    server.serve(ENFORCE, FAILURES["404"])
    clock = Clock()
    sts = hook(unbound, server.port, tls_files, clock=clock, retry_delay=300.0)
    assert sts(ENFORCE) is None
    server.serve(ENFORCE, policy_text())
    clock.now += 299
    assert sts(ENFORCE) is None
    assert server.fetches(ENFORCE) == 1
    clock.now += 1  # RFC 8461 §3.3: five minutes later, the same id is tried again
    assert isinstance(sts(ENFORCE), MXPolicy)
    assert server.fetches(ENFORCE) == 2


def test_dns_failure_is_not_no_policy(
    unbound: UnboundServer, server: PolicyServer, tls_files: TLSFiles
) -> None:
    domain = f"x.{REFUSED_ZONE}"  # the server answers REFUSED for the TXT lookup
    clock = Clock()
    sts = hook(unbound, server.port, tls_files, clock=clock)
    assert sts(domain) is None  # nothing known
    sts.cache.put(seeded(domain, "older1", max_age=10))
    assert isinstance(sts(domain), MXPolicy)  # the cached policy stays in force
    clock.now += 10
    assert sts(domain) is None  # until it expires


def test_testing_mode_delivers_as_usual_and_logs_what_enforce_would_skip(
    unbound: UnboundServer,
    server: PolicyServer,
    tls_files: TLSFiles,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server.serve("testing.sts.test", policy_text(mode="testing", mx=("mx.elsewhere.test",)))
    sts = hook(unbound, server.port, tls_files)
    with caplog.at_level(logging.DEBUG, logger="mailrelay.transport.mtasts"):
        for _ in range(3):
            assert sts("testing.sts.test") is None
    findings = [r for r in caplog.records if f"enforce would skip {MX}" in r.getMessage()]
    # A WARNING once, then DEBUG: not one warning per message.
    assert [r.levelno for r in findings] == [logging.WARNING, logging.DEBUG, logging.DEBUG]


def test_fallback_answers_for_domains_without_an_enforce_policy(
    unbound: UnboundServer, server: PolicyServer, tls_files: TLSFiles
) -> None:
    server.serve(ENFORCE, policy_text())
    own = MXPolicy(tls=TLS.STARTTLS, ssl_context=tls_files.client_context())
    strict = {"notxt.sts.test": own, "[127.0.0.1]": TLS.NONE}
    sts = hook(unbound, server.port, tls_files, fallback=strict.get)
    assert sts("notxt.sts.test") is own
    assert sts("[127.0.0.1]") is TLS.NONE  # an address literal has no policy
    assert sts("nomail.test") is None
    enforced = sts(ENFORCE)
    assert isinstance(enforced, MXPolicy)
    assert enforced.mx_patterns == (MX,)


def test_async_hook_waits_for_the_check_then_answers_from_the_cache(
    unbound: UnboundServer, server: PolicyServer, tls_files: TLSFiles
) -> None:
    server.serve(ENFORCE, policy_text())

    async def main() -> tuple[object, object, object, object]:
        sts = AsyncMTASTS(
            unbound.async_resolver(timeout=1.0),
            port=server.port,
            ssl_context=tls_files.client_context(),
            timeout=5.0,
            allow_private_addresses=True,
        )
        first = await sts(ENFORCE)  # nothing cached: the check runs, and decides
        second = await sts(ENFORCE)  # the same id in DNS: no fetch
        none = await sts("notxt.sts.test")
        await sts.prepare([ENFORCE, "notxt.sts.test", "[127.0.0.1]"])
        return first, second, none, await sts.apolicy(ENFORCE)

    first, second, none, entry = run(main())
    assert isinstance(first, MXPolicy)
    assert first.tls is TLS.STARTTLS
    assert first.mx_patterns == (MX,)
    assert second == first
    assert none is None
    assert isinstance(entry, CachedPolicy)
    assert entry.id == "enforce1"
    assert server.fetches(ENFORCE) == 1


def test_a_cancelled_delivery_does_not_cancel_the_shared_check(
    unbound: UnboundServer, server: PolicyServer, tls_files: TLSFiles
) -> None:
    server.serve(ENFORCE, policy_text())

    async def main() -> object:
        sts = AsyncMTASTS(
            unbound.async_resolver(timeout=1.0),
            port=server.port,
            ssl_context=tls_files.client_context(),
            timeout=5.0,
            allow_private_addresses=True,
        )
        first = asyncio.ensure_future(sts(ENFORCE))
        second = asyncio.ensure_future(sts(ENFORCE))
        await asyncio.sleep(0)
        first.cancel()
        return await asyncio.wait_for(second, 10)

    assert isinstance(run(main()), MXPolicy)
    assert server.fetches(ENFORCE) == 1


def test_overlapping_async_checks_share_one_fetch(
    unbound: UnboundServer, server: PolicyServer, tls_files: TLSFiles
) -> None:
    server.serve(ENFORCE, policy_text())

    async def main() -> list[CachedPolicy | None]:
        sts = AsyncMTASTS(
            unbound.async_resolver(timeout=1.0),
            port=server.port,
            ssl_context=tls_files.client_context(),
            allow_private_addresses=True,
        )
        return await asyncio.gather(*(sts.apolicy(ENFORCE) for _ in range(5)))

    entries = run(main())
    assert len({id(entry) for entry in entries}) == 1
    assert entries[0] is not None
    assert server.fetches(ENFORCE) == 1


# -- delivery end to end -------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on 127.0.0.1 and ::1 (the exchanger's two addresses)."""
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


@pytest.fixture
def smtp_port() -> int:
    return free_port()


@pytest.fixture
def mx_server(smtp_port: int, tls_files: TLSFiles) -> Iterator[Any]:
    """``mx_server(trusted=True)``: aiosmtpd with STARTTLS on 127.0.0.1 at ``smtp_port``."""
    controllers: list[Controller] = []

    def start(*, trusted: bool = True) -> RecordingHandler:
        handler = RecordingHandler()
        controller = Controller(
            handler,
            hostname="127.0.0.1",
            port=smtp_port,
            server_hostname=HOSTNAME,
            decode_data=False,
            require_starttls=False,
            tls_context=tls_files.server_context(trusted=trusted),
            timeout=10,
        )
        controller.start()
        controllers.append(controller)
        return handler

    yield start
    for controller in controllers:
        controller.stop()


class World:
    """The peers of one end-to-end test: DNS, the policy server, the MX's port and TLS files."""

    def __init__(
        self, unbound: UnboundServer, server: PolicyServer, tls_files: TLSFiles, smtp_port: int
    ) -> None:
        self.unbound = unbound
        self.server = server
        self.tls_files = tls_files
        self.smtp_port = smtp_port

    def deliver(
        self, flavour: Flavour, domain: str, *, allow_private_addresses: bool = True
    ) -> DeliveryResult:
        """Send one message to ``bob@<domain>`` through an MX transport under MTA-STS (the
        policy server is on loopback: the hook may reach it unless told otherwise)."""
        message = Message.build(
            sender="sender@mailrelay.test", to=[f"bob@{domain}"], subject="STS", text="Hi\n"
        )
        envelope = Envelope.from_message(message)
        options: dict[str, Any] = {
            "port": self.smtp_port,
            "timeouts": Timeouts.all(2),
            "ssl_context": self.tls_files.client_context(),  # verifies the MX under enforce
        }
        sts_options: dict[str, Any] = {
            "port": self.server.port,
            "ssl_context": self.tls_files.client_context(),
            "timeout": 5.0,
            "allow_private_addresses": allow_private_addresses,
        }
        if flavour == "sync":
            resolver = self.unbound.resolver(timeout=1.0)
            sts = MTASTS(resolver, **sts_options)
            with MXTransport(resolver, tls_policy=sts, **options, refused_networks=()) as transport:
                return transport.send(message, envelope)

        async def main() -> DeliveryResult:
            aresolver = self.unbound.async_resolver(timeout=1.0)
            # No prepare(): the transport awaits the hook, so the first delivery is checked.
            asts = AsyncMTASTS(aresolver, **sts_options)
            async with AsyncMXTransport(
                aresolver, tls_policy=asts, **options, refused_networks=()
            ) as transport:
                return await transport.asend(message, envelope)

        return run(main())


@pytest.fixture
def world(
    unbound: UnboundServer, server: PolicyServer, tls_files: TLSFiles, smtp_port: int
) -> World:
    return World(unbound, server, tls_files, smtp_port)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_enforce_delivers_over_verified_tls(flavour: Flavour, world: World, mx_server: Any) -> None:
    server = world.server
    server.serve(ENFORCE, policy_text(mx=("*.mailrelay.test",)))
    handler = mx_server(trusted=True)
    result = world.deliver(flavour, ENFORCE)
    assert result.ok, result.recipients
    [received] = handler.messages
    assert received.tls
    assert received.rcpt_tos == (f"bob@{ENFORCE}",)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_enforce_refuses_a_certificate_that_does_not_verify(
    flavour: Flavour, world: World, mx_server: Any
) -> None:
    server = world.server
    server.serve(ENFORCE, policy_text())
    handler = mx_server(trusted=False)
    result = world.deliver(flavour, ENFORCE)
    [recipient] = result.recipients
    # RFC 8461 §5: a policy failure defers; it never bounces and never goes in plain text.
    assert recipient.outcome is Outcome.TRANSIENT
    assert handler.messages == []


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_enforce_refuses_an_mx_the_policy_does_not_list(
    flavour: Flavour, world: World, mx_server: Any
) -> None:
    server = world.server
    server.serve("mismatch.sts.test", policy_text(mx=("mx.elsewhere.test",)))
    handler = mx_server(trusted=True)
    result = world.deliver(flavour, "mismatch.sts.test")
    [recipient] = result.recipients
    assert recipient.outcome is Outcome.TRANSIENT
    assert recipient.reason is not None
    assert "matches its MX policy" in recipient.reason
    assert handler.messages == []


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_testing_mode_delivers_opportunistically(
    flavour: Flavour, world: World, mx_server: Any
) -> None:
    server = world.server
    server.serve("testing.sts.test", policy_text(mode="testing", mx=("mx.elsewhere.test",)))
    handler = mx_server(trusted=False)  # neither the name nor the certificate would pass
    result = world.deliver(flavour, "testing.sts.test")
    assert result.ok, result.recipients
    [received] = handler.messages
    assert received.tls  # encrypted, unauthenticated (RFC 7435)
    assert server.fetches("testing.sts.test") == 1


# -- where fetches may go: no private networks by default (server-side request forgery) ----------

_LOOPBACK_FAMILIES = {"127.0.0.2": socket.AF_INET, "::1": socket.AF_INET6}


class Listeners:
    """Plain TCP listeners, one port, on the loopback addresses among a policy host's: they
    never answer, they only show whether anything connected."""

    def __init__(self, addresses: tuple[str, ...]) -> None:
        self.sockets: list[socket.socket] = []
        wanted = [a for a in addresses if a in _LOOPBACK_FAMILIES]
        for _ in range(50):
            self.port = free_port()
            try:
                for address in wanted:
                    listener = socket.socket(_LOOPBACK_FAMILIES[address], socket.SOCK_STREAM)
                    self.sockets.append(listener)
                    listener.bind((address, self.port))
                    listener.listen(8)
                    listener.setblocking(False)
                return
            except OSError:
                self.close()
        raise RuntimeError("no port free on the loopback addresses in 50 tries")

    def connections(self) -> int:
        """How many connections arrived (each accepted and closed)."""
        count = 0
        for listener in self.sockets:
            for _ in range(100):
                try:
                    accepted, _peer = listener.accept()
                except BlockingIOError:
                    break
                accepted.close()
                count += 1
        return count

    def close(self) -> None:
        for listener in self.sockets:
            listener.close()
        self.sockets = []


class FailureLog:
    """A ``tls_reporter`` that keeps the failed fetches' errors."""

    def __init__(self) -> None:
        self.errors: list[tuple[str, PolicyFetchError]] = []

    def sts_policy_failure(self, domain: str, error: PolicyFetchError) -> None:
        self.errors.append((domain, error))


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every ``socket.create_connection`` from now on, recorded; made for real to loopback
    only (a guard that let one through must not send the test off the machine)."""
    made: list[tuple[str, int]] = []
    real = socket.create_connection

    def recording(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        made.append((str(address[0]), int(address[1])))
        if address[0] not in {"127.0.0.1", "127.0.0.2", "::1"}:
            raise ConnectionRefusedError("the tests connect to loopback only")
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", recording)
    return made


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("domain", sorted(SSRF_STS_DOMAINS))
def test_a_policy_host_on_a_private_address_is_never_contacted(
    flavour: Flavour,
    domain: str,
    unbound: UnboundServer,
    tls_files: TLSFiles,
    connects: list[tuple[str, int]],
) -> None:
    addresses = SSRF_STS_DOMAINS[domain]
    listeners = Listeners(addresses)
    failures = FailureLog()
    options: dict[str, Any] = {
        "port": listeners.port,
        "ssl_context": tls_files.client_context(),
        "timeout": 5.0,
        "tls_reporter": failures,
    }
    try:
        if flavour == "sync":
            sts = MTASTS(unbound.resolver(timeout=1.0), **options)
            answer = sts(domain)
            entry = sts.policy(domain)  # not fetched again at once either
        else:

            async def main() -> tuple[TLS | MXPolicy | None, CachedPolicy | None]:
                asts = AsyncMTASTS(unbound.async_resolver(timeout=1.0), **options)
                return await asts(domain), await asts.apolicy(domain)

            answer, entry = run(main())
        assert answer is None  # no policy: the transport's defaults
        assert entry is None
        assert listeners.connections() == 0
    finally:
        listeners.close()
    assert [port for _host, port in connects if port == listeners.port] == []
    [(failed_domain, error)] = failures.errors
    assert failed_domain == domain
    text = str(error)
    assert f"mta-sts.{domain}" in text
    assert "not a public address" in text
    for address in addresses:
        assert address in text
    # RFC 8460 §4.3.2.2: counted as a failed fetch, like any other.
    assert sts_result_of(text) is ResultType.STS_POLICY_FETCH_ERROR


def test_allowed_private_addresses_are_contacted(
    unbound: UnboundServer, tls_files: TLSFiles
) -> None:
    # The control for the test above: the same listener does see the fetch once allowed.
    domain = "loopback.ssrf.sts.test"
    listeners = Listeners(SSRF_STS_DOMAINS[domain])
    try:
        sts = MTASTS(
            unbound.resolver(timeout=1.0),
            port=listeners.port,
            ssl_context=tls_files.client_context(),
            timeout=0.5,  # the listener never answers the TLS handshake
            allow_private_addresses=True,
        )
        assert sts(domain) is None
        assert listeners.connections() == 1
    finally:
        listeners.close()


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_refused_fetch_keeps_the_cached_policy(
    flavour: Flavour, unbound: UnboundServer, tls_files: TLSFiles
) -> None:
    domain = "metadata.ssrf.sts.test"
    cache = PolicyCache()
    cache.put(seeded(domain, "old1"))  # DNS now says id=ssrf1: a fetch is due, and refused
    failures = FailureLog()
    options: dict[str, Any] = {
        "port": closed_port(),
        "ssl_context": tls_files.client_context(),
        "cache": cache,
        "clock": Clock(),
        "tls_reporter": failures,
    }
    if flavour == "sync":
        answer = MTASTS(unbound.resolver(timeout=1.0), **options)(domain)
    else:
        answer = run(AsyncMTASTS(unbound.async_resolver(timeout=1.0), **options)(domain))
    assert isinstance(answer, MXPolicy)
    assert answer.mx_patterns == ("cached.example",)
    [(_domain, error)] = failures.errors  # the fetch was due, and refused
    assert "169.254.169.254, not a public address" in str(error)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_delivery_goes_on_as_without_a_policy(
    flavour: Flavour, world: World, mx_server: Any
) -> None:
    handler = mx_server(trusted=False)  # what no policy accepts: opportunistic TLS
    result = world.deliver(flavour, "rfc1918.ssrf.sts.test", allow_private_addresses=False)
    assert result.ok, result.recipients
    [received] = handler.messages
    assert received.tls
    assert received.rcpt_tos == ("bob@rfc1918.ssrf.sts.test",)


@pytest.mark.parametrize(
    "addresses",
    [
        ("93.184.216.34", "127.0.0.2"),
        ("169.254.169.254", "93.184.216.34"),
        ("2606:2800:220:1::1", "::ffff:10.0.0.1"),
        ("64:ff9b::7f00:1",),
    ],
)
def test_fetch_policy_checks_every_address_before_the_first_connection(
    addresses: tuple[str, ...], connects: list[tuple[str, int]], tls_files: TLSFiles
) -> None:
    with pytest.raises(PolicyFetchError, match="not a public address") as caught:
        fetch_policy(
            "example.test", addresses, port=closed_port(), context=tls_files.client_context(),
            timeout=5.0,
        )  # fmt: skip
    assert connects == []
    assert "mta-sts.example.test" in str(caught.value)


def test_fetch_policy_connects_to_public_addresses_in_turn(
    monkeypatch: pytest.MonkeyPatch, tls_files: TLSFiles
) -> None:
    # The guard lets public addresses through, and the fetch goes to exactly those
    # (no connection is made: the test refuses each one itself).
    tried: list[tuple[str, int]] = []

    def refuse(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        tried.append((str(address[0]), int(address[1])))
        raise ConnectionRefusedError("refused by the test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    public = ("93.184.216.34", "2606:2800:220:1::1")
    with pytest.raises(PolicyFetchError, match="ConnectionRefusedError"):
        fetch_policy(
            "example.test", public, port=443, context=tls_files.client_context(), timeout=5.0
        )
    assert tried == [(address, 443) for address in public]
