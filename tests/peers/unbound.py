"""A real DNS server for the tests: Debian's ``unbound`` on loopback, serving a zone we own.

Rules of this module:

- unbound runs in the foreground (``unbound -d -c <conf>``) as a child of the test process,
  listening on ``127.0.0.1`` at a free port picked at start-up, UDP and TCP. It is stopped by
  its own PID and nothing else.
- It never talks to the outside world: ``"."`` is a static local zone, so every name we do not
  define is NXDOMAIN, and the only forwarder (for ``servfail.test``) is a closed loopback port.
- ``test.`` carries an SOA record (TTL :data:`SOA_TTL`, MINIMUM :data:`SOA_MINIMUM`), so
  negative answers come with it and have a negative-caching TTL (RFC 2308 §5) of
  :data:`NEGATIVE_TTL`.
- Exchangers point at 127.0.0.x addresses, so transports can run real SMTP servers there.
- The zone is described once, in :data:`RECORDS` and the special zones below; tests read the
  same constants instead of repeating addresses.

Use it as the session fixture ``unbound`` (list ``"tests.peers.unbound"`` in
``pytest_plugins``), or without pytest through :func:`start_unbound` (the benchmark does).
If ``unbound`` is not installed the fixture fails with the command that installs it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest

from mailrelay.resolver import AsyncResolver, Resolver

HOST = "127.0.0.1"
INSTALL_HINT = "DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends unbound"

SOA_TTL = 120
SOA_MINIMUM = 45
#: RFC 2308 §5: the negative TTL is the smaller of the SOA's TTL and its MINIMUM field.
NEGATIVE_TTL = min(SOA_TTL, SOA_MINIMUM)

#: The TTL of ordinary records.
TTL = 300
#: The TTL of the short-lived records under ``ttl.test``.
SHORT_TTL = 5

#: Bulk domains ``domNN.test`` for throughput runs: each has ``MX 10 mx.domNN.test``.
BULK_DOMAINS = tuple(f"dom{i:02d}.test" for i in range(60))

#: The DKIM key records (RFC 6376 §3.6.1) of the public test keys in ``tests/data/dkim``.
DKIM_RSA_2048 = (
    "v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAy1K+oMMh"
    "QenGWU9tvO1ZG9UbJCNPfLR8wA2itzAsOwvrCkas1tOQEV1qfpAUdccjIMsHcvJJqO2+Dv"
    "dGOq3HFwsCMGq6X9X1iqjG74UMsJBX9WGNe9tZP68f8jazKb1HWt1yHl2CW2/H1Qz3WY7m"
    "ZPRSQlBDMYqp4Oab1DGwyo+BqmakWqHfiZwruZIznU1goKiaGlkLCpdJnNRzHSVhNybLPF"
    "vOvPS7aLeupNXl+U6uBG9NIhrIqLkHpD75n6qnNKzFYxgi77sd3NfQ0KYHKfQbP6ZL4zKP"
    "AGdkyD0UxfxcCsyt+VCWevjK6VsNKHJPYHIa4Ke6RTFtqQFglkbdsQIDAQAB"
)
DKIM_ED25519 = "v=DKIM1; k=ed25519; p=dh7PQGuZ6JAVgoIv0DnNc1AAqWLoXNyLG5E+E/HD+vQ="
DKIM_RSA_1024 = (
    "v=DKIM1; k=rsa; p=MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQC2MwENB2B6vrMv"
    "pQnAZbTk4UN+MVbDBSC/sU3bQyCWdnDs9pWl/eyWXwldeShxgLVCdzO0naqL7wUsceNpKT"
    "nOYFX34O9actoNBecNBxpge0/ke6COGcsrlRzQmfT1r00F5BgAmLidXYqVb217TUHGa5wS"
    "v7n3R9vPZyRLmJfknwIDAQAB"
)


#: MTA-STS test domains (tests/transport/test_mtasts.py): each has ``MX 10 mx.mailrelay.test``
#: and ``mta-sts.<domain> A 127.0.0.1`` (where the tests' HTTPS policy server listens), and
#: these ``_mta-sts.<domain>`` TXT records (RFC 8461 §3.1). ``notxt`` has none;
#: ``malformed`` has a bad id; ``twotxt`` has two STSv1 records (so: no policy); ``spf`` has
#: one next to an SPF record (which is discarded); ``badcert``'s policy host is not named in
#: the tests' certificate; ``noaddr`` has a record but no ``mta-sts`` host address.
STS_DOMAINS: dict[str, tuple[str, ...]] = {
    "enforce.sts.test": ("v=STSv1; id=enforce1",),
    "mismatch.sts.test": ("v=STSv1; id=mismatch1",),
    "testing.sts.test": ("v=STSv1; id=testing1;",),
    "malformed.sts.test": ("v=STSv1; id=not_alnum!",),
    "twotxt.sts.test": ("v=STSv1; id=first1", "v=STSv1; id=second2"),
    "spf.sts.test": ("v=spf1 -all", "v=STSv1; id=spf1"),
    "notxt.sts.test": (),
    "badcert.sts.test": ("v=STSv1; id=badcert1",),
    "noaddr.sts.test": ("v=STSv1; id=noaddr1",),
}
#: The address of every ``mta-sts.<domain>`` above (except ``noaddr``'s, which has none).
STS_POLICY_HOST = "127.0.0.1"

#: MTA-STS domains whose policy host is on a network a hostile domain must not make the
#: sender reach (server-side request forgery, tests/transport/test_mtasts_ssrf.py): each has
#: ``MX 10 mx.mailrelay.test``, a valid ``_mta-sts`` TXT record and ``mta-sts.<domain>`` at
#: these addresses (A or AAAA by their form).
SSRF_STS_DOMAINS: dict[str, tuple[str, ...]] = {
    "loopback.ssrf.sts.test": ("127.0.0.2",),
    "rfc1918.ssrf.sts.test": ("10.20.30.40",),
    "metadata.ssrf.sts.test": ("169.254.169.254",),
    "ipv6loop.ssrf.sts.test": ("::1",),
    "ula.ssrf.sts.test": ("fd00::1",),
    "mixed.ssrf.sts.test": ("127.0.0.2", "10.20.30.40", "::1"),
}


def txt_strings(text: str) -> str:
    """TXT rdata for ``text``: quoted strings of at most 255 octets each (RFC 1035 §3.3)."""
    return " ".join(f'"{text[i : i + 255]}"' for i in range(0, len(text), 255))


#: TLS-RPT (RFC 8460 §3) records, ``_smtp._tls.<domain>``: as for ``_mta-sts``, each domain's
#: TXT strings (tests/transport/test_tlsrpt.py). ``enforce`` has a valid record with a
#: mailto and an https URI; ``mismatch`` two TLSRPTv1 records (so: none); ``testing`` one
#: record split across two strings (joined) next to an unrelated one; ``malformed`` one whose
#: only URI has an unsupported scheme.
TLSRPT_RECORDS: dict[str, tuple[tuple[str, ...], ...]] = {
    "enforce.sts.test": (
        ("v=TLSRPTv1; rua=mailto:tlsrpt@mailrelay.test,https://reports.mailrelay.test/tlsrpt",),
    ),
    "mismatch.sts.test": (
        ("v=TLSRPTv1; rua=mailto:one@mailrelay.test",),
        ("v=TLSRPTv1; rua=mailto:two@mailrelay.test",),
    ),
    "testing.sts.test": (("v=TLSRPTv1;", "rua=mailto:tlsrpt@mailrelay.test"), ("v=spf1 -all",)),
    "malformed.sts.test": (("v=TLSRPTv1; rua=ftp://reports.mailrelay.test/x",),),
}

#: (owner, ttl, type, rdata) of every record in the zone.
RECORDS: tuple[tuple[str, int, str, str], ...] = (
    ("test.", SOA_TTL, "SOA", f"ns.test. hostmaster.test. 1 3600 900 86400 {SOA_MINIMUM}"),
    # An ordinary domain; also the Postfix test instance's domain.
    ("mailrelay.test.", TTL, "MX", "10 mx.mailrelay.test."),
    ("mx.mailrelay.test.", TTL, "A", "127.0.0.1"),
    ("mx.mailrelay.test.", TTL, "AAAA", "::1"),
    ("sink.mailrelay.test.", TTL, "MX", "10 mx.mailrelay.test."),
    # Two preferences: failover from 127.0.0.1 to 127.0.0.2.
    ("mx2.test.", TTL, "MX", "10 mx1.mx2.test."),
    ("mx2.test.", TTL, "MX", "20 mx2.mx2.test."),
    ("mx1.mx2.test.", TTL, "A", "127.0.0.1"),
    ("mx1.mx2.test.", TTL, "AAAA", "::1"),
    ("mx2.mx2.test.", TTL, "A", "127.0.0.2"),
    # The preferred exchanger is on an address where nothing listens (for MX failover tests).
    ("failover.test.", TTL, "MX", "10 down.failover.test."),
    ("failover.test.", TTL, "MX", "20 up.failover.test."),
    ("down.failover.test.", TTL, "A", "127.0.0.3"),
    ("up.failover.test.", TTL, "A", "127.0.0.1"),
    # Three equal preferences and a backup.
    ("samepref.test.", TTL, "MX", "10 a.samepref.test."),
    ("samepref.test.", TTL, "MX", "10 b.samepref.test."),
    ("samepref.test.", TTL, "MX", "10 c.samepref.test."),
    ("samepref.test.", TTL, "MX", "20 backup.samepref.test."),
    ("a.samepref.test.", TTL, "A", "127.0.0.1"),
    ("b.samepref.test.", TTL, "A", "127.0.0.4"),
    ("c.samepref.test.", TTL, "A", "127.0.0.5"),
    ("backup.samepref.test.", TTL, "A", "127.0.0.6"),
    # RFC 7505 null MX.
    ("nullmx.test.", TTL, "MX", "0 ."),
    # RFC 5321 §5.1 implicit MX.
    ("a-only.test.", TTL, "A", "127.0.0.1"),
    ("aaaa-only.test.", TTL, "AAAA", "::1"),
    ("both.test.", TTL, "A", "127.0.0.1"),
    ("both.test.", TTL, "AAAA", "::1"),
    # The name exists but has no mail records at all (NODATA for MX, A and AAAA).
    ("nomail.test.", TTL, "TXT", '"v=spf1 -all"'),
    # Exchangers that do not resolve: all of them, or only the preferred one.
    ("dangling.test.", TTL, "MX", "10 missing.dangling.test."),
    ("halfdangling.test.", TTL, "MX", "10 missing.halfdangling.test."),
    ("halfdangling.test.", TTL, "MX", "20 mx.mailrelay.test."),
    # An exchanger whose address lookups time out.
    ("slowmx.test.", TTL, "MX", "10 mx.timeout.test."),
    # MX target behind a CNAME (RFC 2181 §10.3 forbids it; everyone follows it anyway).
    ("mxcname.test.", TTL, "MX", "10 alias.mxcname.test."),
    ("alias.mxcname.test.", TTL, "CNAME", "mx.mailrelay.test."),
    # The domain itself is an alias.
    ("cname.test.", TTL, "CNAME", "mailrelay.test."),
    # IDN: café.test.
    ("xn--caf-dma.test.", TTL, "MX", "10 mx.mailrelay.test."),
    # Short TTLs for cache tests.
    ("short.ttl.test.", SHORT_TTL, "MX", "10 mx.ttl.test."),
    ("mx.ttl.test.", 60, "A", "127.0.0.1"),
    # DKIM public keys of the test keys in tests/data/dkim (tests/test_dkim.py). DNS
    # splits TXT data into strings of at most 255 octets, so a long record is several
    # quoted strings; verifiers join them (RFC 6376 §3.6.2.2).
    ("sel-rsa._domainkey.dkim.test.", TTL, "TXT", txt_strings(DKIM_RSA_2048)),
    ("sel-ed._domainkey.dkim.test.", TTL, "TXT", txt_strings(DKIM_ED25519)),
    ("sel-rsa1024._domainkey.dkim.test.", TTL, "TXT", txt_strings(DKIM_RSA_1024)),
    # MTA-STS (RFC 8461) test domains: see STS_DOMAINS.
    *(
        record
        for domain, texts in STS_DOMAINS.items()
        for record in (
            (f"{domain}.", TTL, "MX", "10 mx.mailrelay.test."),
            *((f"_mta-sts.{domain}.", TTL, "TXT", txt_strings(text)) for text in texts),
            *(
                ((f"mta-sts.{domain}.", TTL, "A", STS_POLICY_HOST),)
                if domain != "noaddr.sts.test"
                else ()
            ),
        )
    ),
    *(
        record
        for domain, addresses in SSRF_STS_DOMAINS.items()
        for record in (
            (f"{domain}.", TTL, "MX", "10 mx.mailrelay.test."),
            (f"_mta-sts.{domain}.", TTL, "TXT", '"v=STSv1; id=ssrf1"'),
            *(
                (f"mta-sts.{domain}.", TTL, "AAAA" if ":" in address else "A", address)
                for address in addresses
            ),
        )
    ),
    *(
        (f"_smtp._tls.{domain}.", TTL, "TXT", " ".join(f'"{part}"' for part in strings))
        for domain, records in TLSRPT_RECORDS.items()
        for strings in records
    ),
    *(
        record
        for index, domain in enumerate(BULK_DOMAINS)
        for record in (
            (f"{domain}.", TTL, "MX", f"10 mx.{domain}."),
            (f"mx.{domain}.", TTL, "A", f"127.0.{index // 250 + 1}.{index % 250 + 1}"),
        )
    ),
)

#: Names whose queries are dropped (the client times out), answered REFUSED, or SERVFAIL.
TIMEOUT_ZONE = "timeout.test"
REFUSED_ZONE = "refused.test"
SERVFAIL_ZONE = "servfail.test"

_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 5.0


def find_unbound() -> str | None:
    """The path of the ``unbound`` binary (``/usr/sbin`` is often not on a user's PATH)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    return shutil.which("unbound", path=path)


def server_lines(directory: Path, port: int, *, verbosity: int) -> list[str]:
    """The start of a ``server:`` clause every test unbound shares: loopback ``HOST:port``
    only, in the foreground, everything in ``directory``, one thread, no IPv6."""
    return [
        "server:",
        f"    interface: {HOST}@{port}",
        f"    port: {port}",
        "    do-daemonize: no",
        '    username: ""',
        '    chroot: ""',
        f'    directory: "{directory}"',
        '    pidfile: ""',
        "    use-syslog: no",
        f'    logfile: "{directory / "unbound.log"}"',
        f"    verbosity: {verbosity}",
        "    num-threads: 1",
        "    do-ip6: no",
        f"    access-control: {HOST}/8 allow",
    ]


def config_text(directory: Path, port: int, *, log_queries: bool = False) -> str:
    """The unbound configuration serving the test zone on ``HOST:port``."""
    lines = [
        *server_lines(directory, port, verbosity=0),
        f"    log-queries: {'yes' if log_queries else 'no'}",
        '    module-config: "iterator"',
        # The servfail.test forwarder is a loopback port; allow it and make it fail fast.
        "    do-not-query-localhost: no",
        "    infra-cache-max-rtt: 100",
        "    outbound-msg-retry: 1",
        "    minimal-responses: no",
        '    local-zone: "." static',
        '    local-zone: "test." static',
        f'    local-zone: "{TIMEOUT_ZONE}." deny',
        f'    local-zone: "{REFUSED_ZONE}." refuse',
        f'    local-zone: "{SERVFAIL_ZONE}." transparent',
    ]
    lines += [
        f"    local-data: '{owner} {ttl} IN {rtype} {rdata}'"
        for owner, ttl, rtype, rdata in RECORDS
    ]
    lines += [
        "remote-control:",
        "    control-enable: no",
        "forward-zone:",
        f'    name: "{SERVFAIL_ZONE}."',
        # Port 9 (discard) on loopback: nothing answers, so unbound reports SERVFAIL.
        f"    forward-addr: {HOST}@9",
    ]
    return "\n".join(lines) + "\n"


def free_port() -> int:
    """A loopback port that is free for both UDP and TCP right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((HOST, 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((HOST, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free loopback port for unbound")


class UnboundServer:
    """A running unbound serving the test zone.

    Attributes:
        host: the loopback address it listens on.
        port: the UDP/TCP port.
        pid: the process ID of the unbound child.
        directory: where its configuration and log live.
    """

    def __init__(self, process: subprocess.Popen[bytes], directory: Path, port: int) -> None:
        self._process = process
        self.directory = directory
        self.host = HOST
        self.port = port
        self.pid = process.pid

    def resolver(self, **kwargs: Any) -> Resolver:
        """A :class:`~mailrelay.resolver.Resolver` asking only this server."""
        kwargs.setdefault("timeout", 2.0)
        return Resolver(nameservers=[self.host], port=self.port, **kwargs)

    def async_resolver(self, **kwargs: Any) -> AsyncResolver:
        """An :class:`~mailrelay.resolver.AsyncResolver` asking only this server."""
        kwargs.setdefault("timeout", 2.0)
        return AsyncResolver(nameservers=[self.host], port=self.port, **kwargs)

    def queries_for(self, name: str) -> int:
        """How many queries for ``name`` (any type) the server has received so far.

        Counts the lines ``log-queries`` writes; only meaningful when the server was started
        with ``log_queries=True``. unbound writes each line as the query arrives.
        """
        log = self.directory / "unbound.log"
        # Lines read "[time] unbound[pid:0] info: 127.0.0.1 name. TYPE IN".
        needle = f" {name.rstrip('.')}. ".lower()
        with log.open(encoding="utf-8", errors="replace") as lines:
            return sum(1 for line in lines if " info: " in line and needle in line.lower())

    def answers(self) -> bool:
        """Whether the server answers a query right now."""
        query = dns.message.make_query("mx.mailrelay.test.", "A")
        try:
            response = dns.query.udp(query, self.host, port=self.port, timeout=0.2)
        except (dns.exception.DNSException, OSError):
            return False
        return response.rcode() == dns.rcode.NOERROR

    def stop(self) -> None:
        """Stop this server's process (and only it) and wait for it to exit."""
        if self._process.poll() is not None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=_STOP_TIMEOUT)


def start_unbound(directory: Path, *, log_queries: bool = False) -> UnboundServer:
    """Write the configuration into ``directory``, start unbound, and wait until it answers.

    Raises:
        FileNotFoundError: when unbound is not installed (the message says how to install it).
        RuntimeError: when it does not come up within a few seconds.
    """
    return launch(
        directory,
        lambda port: config_text(directory, port, log_queries=log_queries),
        UnboundServer,
        "unbound",
    )


_S = TypeVar("_S", bound=UnboundServer)


def launch(directory: Path, config: Callable[[int], str], server_class: type[_S], what: str) -> _S:
    """Start unbound in ``directory`` with ``config(port)`` on a free loopback port and wait
    until it answers (another port, up to three times, when the one picked was taken
    meanwhile); stopped by PID if it never does.

    Raises:
        FileNotFoundError: when unbound is not installed (the message says how to install it).
        RuntimeError: when it does not come up within a few seconds.
    """
    binary = find_unbound()
    if binary is None:
        raise FileNotFoundError(f"unbound is not installed; install it with: {INSTALL_HINT}")
    for _attempt in range(3):
        port = free_port()
        conf = directory / "unbound.conf"
        conf.write_text(config(port), encoding="utf-8")
        stderr = directory / "unbound.stderr"
        with stderr.open("wb") as sink:
            process = subprocess.Popen(  # the binary path is ours, the arguments fixed
                [binary, "-d", "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=sink,
            )
        server = server_class(process, directory, port)
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline and process.poll() is None:
            if server.answers():
                return server
            time.sleep(0.05)
        server.stop()
        error = stderr.read_text(errors="replace")
        log = directory / "unbound.log"
        if log.exists():
            error += log.read_text(errors="replace")
        if "bind" not in error and "address already in use" not in error.lower():
            raise RuntimeError(f"{what} did not start on {HOST}:{port}: {error.strip()}")
    raise RuntimeError(f"{what} could not bind a loopback port after 3 attempts")


@pytest.fixture(scope="session")
def unbound() -> Iterator[UnboundServer]:
    """The test DNS server, started once per session; queries are logged for counting."""
    if find_unbound() is None:
        where = "CI must install it" if os.environ.get("CI") == "true" else "install it"
        pytest.fail(f"unbound (the test DNS server) is missing; {where}: {INSTALL_HINT}")
    with tempfile.TemporaryDirectory(prefix="mailrelay-unbound-") as tmp:
        server = start_unbound(Path(tmp), log_queries=True)
        try:
            yield server
        finally:
            server.stop()
