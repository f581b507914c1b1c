"""DANE for SMTP (RFC 7672) through both MX transports, against a real validating resolver.

The DNS is the validating unbound of :mod:`tests.peers.dnssec`: the zone ``dane.test`` is
signed at set-up and its TLSA records are digests of the test certificates
(:mod:`tests.peers.tls`); ``insecure.test`` is unsigned; one TLSA RRset is bogus. The
exchangers are aiosmtpd servers on 127.0.0.1 and 127.0.0.2 at one free port; the hooks look
up ``_25._tcp`` records (``DANE(port=25)``, the default) while the transport connects to the
test port. Every server records the MAIL commands it received, so "nothing was sent" is
checked where it happens, not inferred.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from mailrelay.envelope import Envelope as MailEnvelope
from mailrelay.message import Message
from mailrelay.options import TLS, Timeouts
from mailrelay.resolver import AsyncResolver
from mailrelay.results import DeliveryResult, Outcome
from mailrelay.transport.dane import DANE, AsyncDANE, HostState
from mailrelay.transport.mtasts import (
    MTASTS,
    AsyncMTASTS,
    CachedPolicy,
    Mode,
    PolicyCache,
    STSPolicy,
)
from mailrelay.transport.mx import MXPolicy, MXTransport
from mailrelay.transport.mx_async import AsyncMXTransport
from tests.peers.aiosmtpd_server import HOSTNAME, RecordingHandler
from tests.peers.dnssec import (
    INSECURE,
    SECOND,
    SIGNED,
    DNSSECServer,
    serve_dnssec,
)
from tests.peers.tls import TLSFiles
from tests.transport.helpers import FLAVOURS, Flavour, run

pytestmark = pytest.mark.unbound


@pytest.fixture(scope="module")
def dnssec(tls_files: TLSFiles) -> Iterator[DNSSECServer]:
    """The validating resolver serving the signed test zone (tests.peers.dnssec)."""
    yield from serve_dnssec(tls_files)


FIRST = "127.0.0.1"


class MailCountingHandler(RecordingHandler):
    """A recording handler that also counts MAIL commands (accepted or not)."""

    def __init__(self) -> None:
        super().__init__()
        self.mail_commands = 0

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        self.mail_commands += 1
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"


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
def chains(
    tls_files: TLSFiles, dnssec: DNSSECServer, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, Path]]:
    """Certificate files (chain, key) the servers can present."""
    directory = tmp_path_factory.mktemp("dane-chains")
    leaf_and_ca = directory / "server-chain.pem"
    leaf_and_ca.write_text(tls_files.cert_file.read_text() + tls_files.ca_file.read_text())
    return {
        "leaf": (tls_files.cert_file, tls_files.key_file),
        "untrusted": (tls_files.untrusted_cert_file, tls_files.untrusted_key_file),
        "leaf+ca": (leaf_and_ca, tls_files.key_file),
        "ta": (dnssec.certs.ta_chain, dnssec.certs.ta_key),
        "expired": (dnssec.certs.expired, dnssec.certs.expired_key),
    }


ServerFactory = Callable[..., MailCountingHandler]


@pytest.fixture
def smtp_port() -> int:
    return free_port()


@pytest.fixture
def mx_server(smtp_port: int, chains: dict[str, tuple[Path, Path]]) -> Iterator[ServerFactory]:
    """``world.server(address, cert="leaf")``: aiosmtpd at ``address:smtp_port``; ``cert`` names
    what it presents after STARTTLS (``None``: no STARTTLS at all)."""
    controllers: list[Controller] = []

    def start(address: str = FIRST, cert: str | None = "leaf") -> MailCountingHandler:
        handler = MailCountingHandler()
        context = None
        if cert is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*chains[cert])
        controller = Controller(
            handler,
            hostname=address,
            port=smtp_port,
            server_hostname=HOSTNAME,
            decode_data=False,
            require_starttls=False,
            tls_context=context,
            timeout=10,
        )
        controller.start()
        controllers.append(controller)
        return handler

    yield start
    for controller in controllers:
        controller.stop()


class World:
    """The peers of one test: the validating DNS, the exchangers' port and their factory."""

    def __init__(self, dnssec: DNSSECServer, port: int, servers: ServerFactory) -> None:
        self.dnssec = dnssec
        self.port = port
        self.server = servers

    def deliver(
        self,
        flavour: Flavour,
        domain: str,
        *,
        fallback: Callable[[Any], Any] | None = None,
        requiretls: bool = False,
    ) -> DeliveryResult:
        """Send one message to ``bob@<domain>`` through an MX transport under DANE."""
        return deliver(
            flavour, self.dnssec, self.port, domain, fallback=fallback, requiretls=requiretls
        )


@pytest.fixture
def world(dnssec: DNSSECServer, smtp_port: int, mx_server: ServerFactory) -> World:
    return World(dnssec, smtp_port, mx_server)


def deliver(
    flavour: Flavour,
    dnssec: DNSSECServer,
    port: int,
    domain: str,
    *,
    fallback: Callable[[Any], Any] | None = None,
    requiretls: bool = False,
) -> DeliveryResult:
    """Send one message to ``bob@<domain>`` through an MX transport under DANE."""
    message = Message.build(
        sender="sender@mailrelay.test", to=[f"bob@{domain}"], subject="DANE", text="Hi\n"
    )
    envelope = attrs.evolve(MailEnvelope.from_message(message), requiretls=requiretls)
    options: dict[str, Any] = {"port": port, "timeouts": Timeouts.all(3)}
    if flavour == "sync":
        resolver = dnssec.resolver(timeout=2.0)
        hook = DANE(resolver, fallback=fallback(resolver) if fallback else None)
        with MXTransport(resolver, tls_policy=hook, **options, refused_networks=()) as transport:
            return transport.send(message, envelope)

    async def main() -> DeliveryResult:
        aresolver = dnssec.async_resolver(timeout=2.0)
        ahook = AsyncDANE(aresolver, fallback=fallback(aresolver) if fallback else None)
        async with AsyncMXTransport(
            aresolver, tls_policy=ahook, **options, refused_networks=()
        ) as transport:
            return await transport.asend(message, envelope)

    return run(main())


def deferred_reason(result: DeliveryResult) -> str:
    [recipient] = result.recipients
    assert recipient.outcome is Outcome.TRANSIENT, recipient
    assert recipient.reason is not None
    return recipient.reason


# -- DANE-EE ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("domain", ["ee", "ee301", "ee312"])
def test_a_matching_dane_ee_record_authenticates_the_exchanger(
    flavour: Flavour,
    domain: str,
    world: World,
    caplog: pytest.LogCaptureFixture,
) -> None:
    handler = world.server(FIRST, "leaf")
    with caplog.at_level("INFO", logger="mailrelay.transport"):
        result = world.deliver(flavour, f"{domain}.{SIGNED}")
    assert result.ok, result.recipients
    [received] = handler.messages
    assert received.tls
    assert received.rcpt_tos == (f"bob@{domain}.{SIGNED}",)
    assert b"Subject: DANE" in received.content
    assert any(
        "authenticated by its TLSA records: DANE-EE" in r.getMessage() for r in caplog.records
    )


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_dane_ee_checks_neither_names_nor_dates(flavour: Flavour, world: World) -> None:
    # RFC 7672 §3.1.1: an expired, self-signed certificate for another name is fine when its
    # key is the one the signed TLSA record names.
    handler = world.server(FIRST, "expired")
    result = world.deliver(flavour, f"expired.{SIGNED}")
    assert result.ok, result.recipients
    assert len(handler.messages) == 1
    assert handler.messages[0].tls


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_dane_ee_ignores_the_webpki(
    flavour: Flavour,
    world: World,
) -> None:
    # The record names the leaf: a server presenting the self-signed certificate (same names,
    # another key) fails, although a WebPKI-less client would have accepted either.
    handler = world.server(FIRST, "untrusted")
    reason = deferred_reason(world.deliver(flavour, f"ee.{SIGNED}"))
    assert "DANE" in reason
    assert "matches none of its TLSA records" in reason
    assert handler.mail_commands == 0


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_mismatching_exchanger_is_skipped_for_the_next(
    flavour: Flavour,
    world: World,
) -> None:
    first = world.server(FIRST, "leaf")  # mx-bad: its TLSA names the untrusted certificate
    second = world.server(SECOND, "leaf")  # mx-good2: its TLSA names the leaf
    result = world.deliver(flavour, f"failover.{SIGNED}")
    assert result.ok, result.recipients
    assert first.mail_commands == 0
    assert len(second.messages) == 1
    assert result.recipients[0].host == f"mx-good2.{SIGNED}[{SECOND}]:{world.port}"


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_when_no_exchanger_authenticates_nothing_is_sent(
    flavour: Flavour,
    world: World,
) -> None:
    first = world.server(FIRST, "leaf")
    second = world.server(SECOND, "leaf")
    reason = deferred_reason(world.deliver(flavour, f"allbad.{SIGNED}"))
    assert reason.count("DANE") == 2, reason
    assert first.mail_commands == second.mail_commands == 0


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_dane_host_without_starttls_gets_nothing_in_plain_text(
    flavour: Flavour,
    world: World,
) -> None:
    handler = world.server(FIRST, None)
    reason = deferred_reason(world.deliver(flavour, f"notls.{SIGNED}"))
    assert "STARTTLS" in reason
    assert handler.mail_commands == 0


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_bogus_tlsa_rrset_defers(
    flavour: Flavour,
    world: World,
) -> None:
    handler = world.server(FIRST, "leaf")  # would match the records the zone signed
    reason = deferred_reason(world.deliver(flavour, f"bogus.{SIGNED}"))
    assert "TLSA lookup" in reason
    assert handler.mail_commands == 0


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_bogus_mx_rrset_defers(flavour: Flavour, world: World) -> None:
    handler = world.server(FIRST, "leaf")
    reason = deferred_reason(world.deliver(flavour, f"bogusmx.{SIGNED}"))
    assert "DNS lookup failed" in reason
    assert handler.mail_commands == 0


# -- no DANE: the usual opportunistic TLS ----------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_insecure_tlsa_records_are_ignored(
    flavour: Flavour,
    world: World,
) -> None:
    # The unsigned zone's record names the untrusted certificate; the server presents the
    # leaf. Were the record used, delivery would fail.
    handler = world.server(FIRST, "leaf")
    result = world.deliver(flavour, f"plain.{INSECURE}")
    assert result.ok, result.recipients
    [received] = handler.messages
    assert received.tls


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("cert", ["untrusted", None])
def test_a_secure_mx_without_tlsa_records_is_opportunistic(
    flavour: Flavour,
    cert: str | None,
    world: World,
) -> None:
    handler = world.server(FIRST, cert)
    result = world.deliver(flavour, f"notlsa.{SIGNED}")
    assert result.ok, result.recipients
    [received] = handler.messages
    assert received.tls is (cert is not None)


# -- unusable records: TLS required, not authenticated ---------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_only_pkix_records_require_tls_without_authentication(
    flavour: Flavour,
    world: World,
) -> None:
    handler = world.server(FIRST, "untrusted")  # matches none of the (unusable) records
    result = world.deliver(flavour, f"pkix.{SIGNED}")
    assert result.ok, result.recipients
    [received] = handler.messages
    assert received.tls


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_only_pkix_records_still_refuse_plain_text(
    flavour: Flavour,
    world: World,
) -> None:
    handler = world.server(FIRST, None)
    reason = deferred_reason(world.deliver(flavour, f"pkix.{SIGNED}"))
    assert "STARTTLS" in reason
    assert handler.mail_commands == 0


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_requiretls_is_not_met_by_unusable_records(flavour: Flavour, world: World) -> None:
    # RFC 8689 §4.2.1: REQUIRETLS needs an authenticated server; unusable TLSA records
    # cannot authenticate one.
    handler = world.server(FIRST, "untrusted")
    result = world.deliver(flavour, f"pkix.{SIGNED}", requiretls=True)
    [recipient] = result.recipients
    assert recipient.outcome is Outcome.PERMANENT
    assert recipient.reason is not None
    assert "REQUIRETLS" in recipient.reason
    assert handler.mail_commands == 0


# -- DANE-TA ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_dane_ta_record_authenticates_a_chain_to_the_test_ca(
    flavour: Flavour,
    world: World,
    caplog: pytest.LogCaptureFixture,
) -> None:
    handler = world.server(FIRST, "ta")  # a leaf naming mx-ta.dane.test, then the CA
    with caplog.at_level("INFO", logger="mailrelay.transport"):
        result = world.deliver(flavour, f"ta.{SIGNED}")
    assert result.ok, result.recipients
    assert len(handler.messages) == 1
    assert handler.messages[0].tls
    assert any("DANE-TA (2 0 1)" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize(
    ("cert", "complaint"),
    [
        # The CA is in the chain, but the leaf names mx.mailrelay.test (RFC 7672 §3.2.2).
        ("leaf+ca", "did not verify against its DANE-TA certificate"),
        # The leaf chains to the CA, but the server does not present the CA.
        ("leaf", "matches none of its TLSA records"),
    ],
)
def test_dane_ta_needs_the_anchor_in_the_chain_and_the_exchanger_s_name(
    flavour: Flavour,
    cert: str,
    complaint: str,
    world: World,
) -> None:
    handler = world.server(FIRST, cert)
    reason = deferred_reason(world.deliver(flavour, f"ta.{SIGNED}"))
    assert complaint in reason
    assert handler.mail_commands == 0


# -- precedence over MTA-STS (RFC 8461 §2) ---------------------------------------------------------


def sts_hook(domains: list[str]) -> Callable[[Any], Any]:
    """An MTA-STS hook whose cache holds an enforce policy for ``domains`` that lists no
    exchanger of theirs: alone, it defers their mail."""

    def make(resolver: Any) -> Any:
        cache = PolicyCache()
        for domain in domains:
            cache.put(
                CachedPolicy(
                    domain=domain,
                    id="seeded1",
                    policy=STSPolicy(mode=Mode.ENFORCE, max_age=86400, mx=("mx.elsewhere.test",)),
                    fetched_at=1000.0,
                )
            )
        if isinstance(resolver, AsyncResolver):
            return AsyncMTASTS(resolver, cache=cache, clock=lambda: 1000.0)
        return MTASTS(resolver, cache=cache, clock=lambda: 1000.0)

    return make


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_dane_takes_precedence_over_mta_sts(
    flavour: Flavour,
    world: World,
) -> None:
    handler = world.server(FIRST, "leaf")
    domain = f"ee.{SIGNED}"
    result = world.deliver(flavour, domain, fallback=sts_hook([domain]))
    assert result.ok, result.recipients
    assert len(handler.messages) == 1


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_mta_sts_applies_where_dane_does_not(
    flavour: Flavour,
    world: World,
) -> None:
    handler = world.server(FIRST, "leaf")
    domain = f"notlsa.{SIGNED}"
    reason = deferred_reason(world.deliver(flavour, domain, fallback=sts_hook([domain])))
    assert "matches its MX policy" in reason
    assert handler.mail_commands == 0


# -- the hook's answers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        (f"ee.{SIGNED}", {f"mx-ee.{SIGNED}": HostState.AUTHENTICATE}),
        (f"pkix.{SIGNED}", {f"mx-pkix.{SIGNED}": HostState.ENCRYPT}),
        (f"bogus.{SIGNED}", {f"mx-bogus.{SIGNED}": HostState.FAILED}),
        (
            f"failover.{SIGNED}",
            {
                f"mx-bad.{SIGNED}": HostState.AUTHENTICATE,
                f"mx-good2.{SIGNED}": HostState.AUTHENTICATE,
            },
        ),
        (f"notlsa.{SIGNED}", None),
        (f"plain.{INSECURE}", None),
        ("[127.0.0.1]", None),
        (f"nowhere.{SIGNED}", None),
    ],
)
def test_the_hook_s_verdicts(
    domain: str, expected: dict[str, HostState] | None, dnssec: DNSSECServer
) -> None:
    policy = DANE(dnssec.resolver()).policy(domain)
    apolicy = run(AsyncDANE(dnssec.async_resolver()).policy(domain))
    for found in (policy, apolicy):
        if expected is None:
            assert found is None
            continue
        assert isinstance(found, MXPolicy)
        assert found.dane is not None
        assert {host.name: host.state for host in found.dane.hosts} == expected
        assert found.tls is TLS.OPPORTUNISTIC
