"""transport_from_url and TransportURL: schemes, defaults, errors, and no leaked passwords."""

from __future__ import annotations

import logging
import ssl
import traceback
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.errors import ConfigurationError
from mailrelay.options import TLS, Timeouts
from mailrelay.reply import Reply
from mailrelay.results import Outcome
from mailrelay.transport import (
    AsyncLMTPTransport,
    AsyncSMTPTransport,
    AsyncTransport,
    FileTransport,
    LMTPTransport,
    MemoryTransport,
    SMTPTransport,
    TransportURL,
    async_transport_from_url,
    transport_from_url,
)
from mailrelay.transport.mx import MXTransport
from mailrelay.transport.mx_async import AsyncMXTransport
from tests.peers.unbound import UnboundServer
from tests.transport.helpers import make_message, run


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("smtp://smtp.example.com", {"host": "smtp.example.com", "port": 587, "tls": TLS.STARTTLS}),
        (
            "smtp://user:pass@smtp.example.com:2525?tls=opportunistic",
            {"username": "user", "password": "pass", "port": 2525, "tls": TLS.OPPORTUNISTIC},
        ),
        ("SMTP://Smtp.Example.COM?TLS=NONE", {"host": "smtp.example.com", "tls": TLS.NONE}),
        ("smtp://h?tls=implicit", {"port": 587, "tls": TLS.IMPLICIT}),
        ("smtps://h", {"port": 465, "tls": TLS.IMPLICIT}),
        ("smtps://h:4650?tls=implicit", {"port": 4650, "tls": TLS.IMPLICIT}),
        (
            "smtp://alice%40example.com:p%40ss%3Aw%2Frd%20x@h",
            {"username": "alice@example.com", "password": "p@ss:w/rd x"},
        ),
        ("smtp://alice@h", {"username": "alice", "password": None}),
        ("smtp://alice:@h", {"username": "alice", "password": ""}),
        ("smtp://[::1]:2525", {"host": "::1", "port": 2525}),
        ("smtp://127.0.0.1:25/", {"host": "127.0.0.1", "port": 25}),
        ("smtp://h?timeout=2.5", {"timeouts": Timeouts.all(2.5)}),
        ("smtp://h?local_hostname=client.example", {"local_hostname": "client.example"}),
        ("lmtp://mailstore.example", {"host": "mailstore.example", "port": 24, "tls": TLS.NONE}),
        ("lmtp://mailstore.example:2003?tls=starttls", {"port": 2003, "tls": TLS.STARTTLS}),
        ("lmtp:///run/dovecot/lmtp", {"host": None, "port": None, "path": "/run/dovecot/lmtp"}),
        ("lmtp:///run/my%20socket", {"path": "/run/my socket"}),
        ("mx://", {"host": None, "port": None, "tls": TLS.OPPORTUNISTIC}),
        ("mx://?port=2525&tls=none", {"port": 2525, "tls": TLS.NONE}),
        ("mx://?tls_policy=dane", {"tls_policies": ("dane",)}),
        ("mx://?tls_policy=MTA-STS,dane", {"tls_policies": ("mta-sts", "dane")}),
        ("mx://?tls_policy=dane,dane", {"tls_policies": ("dane",)}),
        ("memory://", {"host": None, "path": None, "tls": None}),
        ("file:///var/mail/out", {"path": "/var/mail/out", "format": "eml"}),
        (
            "file://localhost/var/mail/out?format=maildir",
            {"path": "/var/mail/out", "format": "maildir"},
        ),
    ],
)
def test_parse(url: str, expected: dict[str, Any]) -> None:
    parsed = TransportURL.parse(url)
    assert {key: getattr(parsed, key) for key in expected} == expected


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("http://example.com", "unknown transport URL scheme 'http'"),
        ("smtp.example.com", "unknown transport URL scheme ''"),
        ("smtp://", "needs a host"),
        ("smtp://:pw@", "password without a user name"),
        ("smtp://h:0", "not a valid transport URL"),
        ("smtp://h:99999", "not a valid transport URL"),
        ("smtp://h:abc", "not a valid transport URL"),
        ("smtp://[::1", "not a valid transport URL"),
        ("smtp://h/path", "takes no path"),
        ("smtp://h#frag", "no #fragment"),
        ("smtp://h?tls=sometimes", "unknown TLS policy 'sometimes'"),
        ("smtp://h?tls=none&tls=starttls", "given twice"),
        ("smtp://h?format=eml", "unknown parameter 'format' for smtp://"),
        ("smtp://h?port=25", "unknown parameter 'port'"),
        ("smtp://h?timeout=0", "positive number"),
        ("smtp://h?timeout=soon", "positive number"),
        ("smtp://h?timeout=inf", "positive number"),
        ("smtp://h?local_hostname=", "empty local_hostname"),
        ("smtp://h?tls", "malformed query"),
        ("smtps://h?tls=starttls", "smtps:// means implicit TLS"),
        ("lmtp://", "needs a host"),
        ("lmtp:///", "needs a host"),
        ("mx://mx.example.com", "takes no host"),
        ("mx://?port=70000", "port must be a number"),
        ("mx://?port=x", "port must be a number"),
        ("mx://?port=\u00b25", "port must be a number"),  # int() refuses it: not a ValueError
        ("mx://?port=\u0662\u0665", "port must be a number"),  # not read as 25
        ("mx://?port=" + "9" * 5000, "port must be a number"),  # over int()'s 4,300 digits
        ("mx://u:p@", "takes no user name"),
        ("mx://?tls_policy=", "tls_policy must name dane, mta-sts or both"),
        ("mx://?tls_policy=dnssec", "tls_policy must name dane, mta-sts or both"),
        ("mx://?tls_policy=dane,", "tls_policy must name dane, mta-sts or both"),
        ("smtp://h?tls_policy=dane", "unknown parameter 'tls_policy'"),
        ("memory://somewhere", "takes no host"),
        ("memory://?x=1", "unknown parameter 'x' for memory:// .* \\(allowed: none\\)"),
        ("file://", "needs a directory path"),
        ("file://otherhost/var/mail", "local directory"),
        ("file:///x?format=mbox", "unknown file format 'mbox'"),
    ],
)
def test_parse_errors(url: str, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        TransportURL.parse(url)


def test_memory_url_builds_a_memory_transport_with_overrides() -> None:
    transport = transport_from_url(
        "memory://", handler=lambda m, e: {"bob@example.com": Outcome.TRANSIENT}
    )
    assert isinstance(transport, MemoryTransport)
    result = transport.send(make_message())
    assert [r.outcome for r in result.recipients] == [Outcome.TRANSIENT, Outcome.ACCEPTED]


@pytest.mark.parametrize(("query", "fmt"), [("", "eml"), ("?format=maildir", "maildir")])
def test_file_url_builds_a_file_transport(tmp_path: Path, query: str, fmt: str) -> None:
    transport = transport_from_url(tmp_path.as_uri() + query)
    assert isinstance(transport, FileTransport)
    assert transport.path == tmp_path
    assert transport.format == fmt


def test_a_path_like_url_and_overrides_win(tmp_path: Path) -> None:
    transport = transport_from_url(tmp_path.as_uri() + "?format=maildir", format="eml")
    assert isinstance(transport, FileTransport)
    assert transport.format == "eml"


def test_an_unknown_override_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match=r"memory:// transport does not accept .*colour"):
        transport_from_url("memory://", colour="blue")


@pytest.mark.parametrize("asynchronous", [False, True])
def test_mx_urls_build_mx_transports(asynchronous: bool) -> None:
    build = async_transport_from_url if asynchronous else transport_from_url
    transport = build("mx://?port=2525&tls=none&timeout=9&local_hostname=out.example")
    assert type(transport) is (AsyncMXTransport if asynchronous else MXTransport)
    assert isinstance(transport, MXTransport | AsyncMXTransport)
    settings = transport.settings
    assert (settings.port, settings.default.tls, settings.timeouts) == (
        2525,
        TLS.NONE,
        Timeouts.all(9),
    )
    assert settings.local_hostname == "out.example"
    default = transport_from_url("mx://")
    assert isinstance(default, MXTransport)
    assert (default.settings.port, default.settings.default.tls) == (25, TLS.OPPORTUNISTIC)


@pytest.mark.parametrize("asynchronous", [False, True])
@pytest.mark.parametrize(
    ("query", "first", "fallback"),
    [
        ("dane", "DANE", None),
        ("mta-sts", "MTASTS", None),
        ("dane,mta-sts", "DANE", "MTASTS"),
        ("mta-sts,dane", "DANE", "MTASTS"),  # DANE decides first whatever the order
    ],
)
def test_mx_url_tls_policies_share_the_transport_resolver(
    asynchronous: bool, query: str, first: str, fallback: str | None
) -> None:
    build = async_transport_from_url if asynchronous else transport_from_url
    transport = build(f"mx://?tls_policy={query}")
    assert isinstance(transport, MXTransport | AsyncMXTransport)
    hook = transport.settings.tls_policy
    prefix = "Async" if asynchronous else ""
    assert type(hook).__name__ == prefix + first
    assert hook.resolver is transport.resolver  # type: ignore[union-attr]
    chained = getattr(hook, "fallback", None)
    if fallback is None:
        assert chained is None
    else:
        assert type(chained).__name__ == prefix + fallback
        assert chained.resolver is transport.resolver  # type: ignore[union-attr]


def test_mx_url_tls_policy_yields_to_an_override() -> None:
    def mine(domain: str) -> TLS:
        return TLS.STARTTLS

    transport = transport_from_url("mx://?tls_policy=dane", tls_policy=mine)
    assert isinstance(transport, MXTransport)
    assert transport.settings.tls_policy is mine


@pytest.mark.parametrize(
    ("url", "cls", "expected"),
    [
        (
            "smtp://alice:s3cret@smtp.example.com",
            SMTPTransport,
            {"host": "smtp.example.com", "port": 587, "tls": TLS.STARTTLS, "username": "alice"},
        ),
        (
            "smtps://alice:s3cret@smtp.example.com?timeout=7&local_hostname=me.example",
            SMTPTransport,
            {"port": 465, "tls": TLS.IMPLICIT, "timeouts": Timeouts.all(7)},
        ),
        (
            "lmtp://alice:s3cret@store.example",
            LMTPTransport,
            {"host": "store.example", "port": 24, "tls": TLS.NONE, "lmtp": True},
        ),
        (
            "lmtp:///run/lmtp.sock",
            LMTPTransport,
            {"host": None, "port": None, "unix_path": "/run/lmtp.sock", "lmtp": True},
        ),
    ],
)
def test_network_urls_build_their_transports(
    url: str, cls: type[SMTPTransport | LMTPTransport], expected: dict[str, Any]
) -> None:
    transport = transport_from_url(url)
    assert type(transport) is cls
    assert isinstance(transport, SMTPTransport | LMTPTransport)
    settings = transport.settings
    assert {key: getattr(settings, key) for key in expected} == expected
    if "s3cret" in url:
        assert settings.password == "s3cret"
    assert "s3cret" not in repr(transport)
    assert "s3cret" not in repr(settings)


@pytest.mark.parametrize(
    ("url", "cls"),
    [
        ("smtp://h", AsyncSMTPTransport),
        ("smtps://h", AsyncSMTPTransport),
        ("lmtp://h", AsyncLMTPTransport),
        ("lmtp:///run/lmtp.sock", AsyncLMTPTransport),
        ("memory://", MemoryTransport),
    ],
)
def test_async_urls(url: str, cls: type[AsyncTransport]) -> None:
    assert type(async_transport_from_url(url)) is cls


def test_overrides_reach_the_smtp_transport() -> None:
    context = ssl.create_default_context()
    transport = transport_from_url("smtp://h?tls=none", ssl_context=context, tls=TLS.STARTTLS)
    assert isinstance(transport, SMTPTransport)
    assert transport.settings.ssl_context is context
    assert transport.settings.tls is TLS.STARTTLS
    with pytest.raises(ConfigurationError, match="does not accept"):
        transport_from_url("smtp://u:s3cret@h", handler=None)


def test_repr_and_redacted_hide_the_password() -> None:
    url = TransportURL.parse("smtp://alice%40example.com:hunter%32@[::1]:2525?tls=none")
    assert url.password == "hunter2"
    assert repr(url) == "TransportURL('smtp://alice%40example.com:***@[::1]:2525')"
    assert "hunter" not in repr(url)
    assert "hunter" not in str(url)


@pytest.mark.parametrize(
    "url",
    [
        "smtp://alice:hunter2@h?tls=bogus",
        "smtp://alice:hunter2@h:notaport",
        "smtp://alice:hunt/er2@h",  # an unencoded "/" breaks the URL's structure
        "smtp://alice:hunt#er2@h",
        "smtp://alice:hunt?er2@h",
        "smtp://alice:hunt@er2@h/x",
        "gopher://alice:hunter2@h",
        "mx://alice:hunter2@",
        "smtp://alice:hunter2@h?unknown=1",
        "smtp://alice:hunter2\uff03@h",  # urllib refuses the netloc (NFKC), quoting it whole
        "smtp://alice:hunter2@[::1",
        "smtp://alice:hunter2@h:99999",
        "smtp://alice:hunter2@h?tls&&",
    ],
)
def test_errors_never_show_the_password(url: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        transport_from_url(url)
    message = str(caught.value)
    # Nor anywhere in the traceback an application would log (chained errors included).
    logged = "".join(traceback.format_exception(caught.value))
    for fragment in ("hunter", "er2"):
        assert fragment not in message
        assert fragment not in logged
    assert "***" in message


passwords = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=30
).map(lambda s: "Zq" + s)
usernames = st.from_regex(r"[a-y0-9.]{1,12}", fullmatch=True)


@given(usernames, passwords)
def test_credentials_round_trip_and_never_show(username: str, password: str) -> None:
    encoded = f"smtp://{quote(username, safe='')}:{quote(password, safe='')}@mail.example:587"
    parsed = TransportURL.parse(encoded)
    assert (parsed.username, parsed.password) == (username, password)
    shown = repr(parsed) + parsed.redacted()
    assert password not in shown
    assert quote(password, safe="") not in shown
    with pytest.raises(ConfigurationError) as caught:
        transport_from_url(encoded + "?tls=never")
    assert password not in str(caught.value)
    assert quote(password, safe="") not in str(caught.value)


@given(st.text(max_size=60))
def test_garbage_is_a_configuration_error_or_a_url(text: str) -> None:
    try:
        parsed = TransportURL.parse(text)
    except ConfigurationError:
        return
    assert parsed.scheme in {"smtp", "smtps", "lmtp", "mx", "memory", "file"}


def test_reply_import_is_used() -> None:
    # transport_from_url passes handler overrides straight through: a Reply script works.
    transport = transport_from_url(
        "memory://", handler=lambda m, e: {"carol@example.org": Reply.of(550, "5.1.1 no")}
    )
    assert transport.send(make_message()).rejected[0].reply == Reply.of(550, "5.1.1 no")


@pytest.mark.unbound
@pytest.mark.parametrize("asynchronous", [False, True])
@pytest.mark.parametrize("query", ["mta-sts", "dane,mta-sts"])
def test_mx_url_mta_sts_hooks_keep_the_private_address_guard(
    asynchronous: bool, query: str, unbound: UnboundServer, caplog: pytest.LogCaptureFixture
) -> None:
    # mta-sts.loopback.ssrf.sts.test is 127.0.0.2 in the test zone: a URL-built hook refuses it.
    domain = "loopback.ssrf.sts.test"
    with caplog.at_level(logging.WARNING, logger="mailrelay.transport.mtasts"):
        if asynchronous:
            transport = async_transport_from_url(
                f"mx://?tls_policy={query}", resolver=unbound.async_resolver(timeout=1.0)
            )
            assert isinstance(transport, AsyncMXTransport)
            hook: Any = transport.settings.tls_policy
            answer = run(hook(domain))
        else:
            built = transport_from_url(
                f"mx://?tls_policy={query}", resolver=unbound.resolver(timeout=1.0)
            )
            assert isinstance(built, MXTransport)
            answer = built.settings.tls_policy(domain)  # type: ignore[misc]
    assert answer is None
    assert "mta-sts.loopback.ssrf.sts.test resolves to 127.0.0.2, not a public" in caplog.text
