"""Review 72: what a proxy is asked for, whatever the target's name.

A scoped IPv6 target (``fe80::1%eth0``) went into the HTTP ``CONNECT`` request with its zone
id unescaped (RFC 6874 §2 would need ``%25``, and the proxy does not share our interfaces
anyway), and a non-ASCII zone id ended in a bare ``UnicodeEncodeError``; a "name" holding a
colon or a control character went to the proxy as it was (``CONNECT [mx.example:1]:25``,
a vertical tab in the request line). The zone is dropped, as SOCKS5's packed address always
dropped it, and such names are refused with a ConfigurationError.

And the proxy's own host: a non-ASCII name the lookup cannot encode (an empty or over-long
label) raised a bare UnicodeError from getaddrinfo at connect; it is refused at
construction now. And an HTTP proxy's reason phrase, which goes into the error, could
carry our login back (a broken proxy echoing its request): it is scrubbed.
"""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.errors import ConfigurationError, ProxyError
from mailrelay.transport.proxy import Proxy, ProxyHandshake

SECRET = "s3cr3t-pw"


def proxy(scheme: str) -> Proxy:
    return Proxy(scheme=scheme, host="127.0.0.1", port=3128, username="u", password=SECRET)


@pytest.mark.parametrize(
    ("host", "authority"),
    [
        ("fe80::1%eth0", b"[fe80::1]:25"),
        ("fe80::1%\u00e9", b"[fe80::1]:25"),
        ("[fe80::1%eth0]", b"[fe80::1]:25"),
        ("[2001:db8::1]", b"[2001:db8::1]:25"),
    ],
)
def test_http_connect_to_a_scoped_address_sends_no_zone(host: str, authority: bytes) -> None:
    request = ProxyHandshake(proxy("http"), host, 25).data_to_send()
    first, second = request.split(b"\r\n")[:2]
    assert first == b"CONNECT " + authority + b" HTTP/1.1"
    assert second == b"Host: " + authority


@pytest.mark.parametrize("scheme", ["http", "socks5h", "socks5"])
@pytest.mark.parametrize(
    "host",
    ["mx.example:1", "mx.example\x0bX: y", "mx.example\x7f", "[mx.example", "mx]", "a\x1bb"],
)
def test_a_name_a_proxy_cannot_take_is_refused(scheme: str, host: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        ProxyHandshake(proxy(scheme), host, 25)
    assert SECRET not in str(caught.value)


def request_or_refusal(scheme: str, host: str) -> bytes | ConfigurationError:
    try:
        return ProxyHandshake(proxy(scheme), host, 25).data_to_send()
    except ConfigurationError as exc:
        return exc


@given(st.text(min_size=1, max_size=40))
def test_any_target_gives_a_one_line_request_or_a_configuration_error(host: str) -> None:
    for scheme in ("http", "socks5h"):
        request = request_or_refusal(scheme, host)
        if isinstance(request, ConfigurationError):
            assert SECRET not in str(request)
        elif scheme == "http":
            head, _, rest = request.partition(b"\r\n\r\n")
            assert rest == b""
            lines = head.split(b"\r\n")
            assert len(lines) == 3
            assert all(32 <= byte < 127 for line in lines for byte in line)


@pytest.mark.parametrize("host", ["b\u00fc..example", "b\u00fc" + "x" * 70 + ".example"])
def test_a_proxy_host_that_cannot_be_looked_up_is_a_configuration_error(host: str) -> None:
    """A non-ASCII name the lookup cannot encode raised a bare UnicodeError at connect."""
    with pytest.raises(ConfigurationError, match="proxy host"):
        Proxy(scheme="socks5h", host=host, port=1080)
    with pytest.raises(ConfigurationError, match="proxy host"):
        Proxy.parse(f"socks5h://{host}:1080")


@pytest.mark.parametrize("host", ["b\u00fccher.example", "127.0.0.1", "::1", "proxy.example"])
def test_usable_proxy_hosts_stay_usable(host: str) -> None:
    assert Proxy(scheme="http", host=host, port=3128).host == host


def test_a_reason_phrase_echoing_the_credentials_does_not_show_them() -> None:
    """A broken or hostile HTTP proxy may echo what it was sent in its reason phrase: the
    error (logged, shown) must not carry the login it echoes."""
    token = base64.b64encode(f"u:{SECRET}".encode()).decode()
    for reason in (f"Basic {token}", f"bad password {SECRET}", f"u:{SECRET}"):
        handshake = ProxyHandshake(proxy("http"), "mx.example", 25)
        handshake.data_to_send()
        with pytest.raises(ProxyError) as caught:
            handshake.receive_data(f"HTTP/1.1 407 {reason}\r\n\r\n".encode())
        assert SECRET not in str(caught.value)
        assert token not in str(caught.value)
        assert "407" in str(caught.value)
