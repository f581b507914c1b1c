"""The proxy value and the sans-I/O handshake (:mod:`mailrelay.transport.proxy`), without
sockets: URL parsing, the bytes sent, every reply outcome, splits and garbage."""

from __future__ import annotations

import base64
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.errors import ConfigurationError, ConnectError, ProxyError
from mailrelay.options import TLS, Timeouts
from mailrelay.transport.proxy import (
    MAX_HTTP_REPLY,
    SOCKS5_REPLIES,
    Proxy,
    ProxyHandshake,
    all_targets_failed,
    as_proxy,
    tunnel_targets,
)
from mailrelay.transport.settings import ConnectionSettings
from mailrelay.transport.url import TransportURL, transport_from_url

SECRET = "s3cr3t-pw"
GREETING = b"220 mx.mailrelay.test ESMTP\r\n"
SOCKS_OK_IPV4 = b"\x05\x00\x00\x01\x7f\x00\x00\x01\x04\x38"
HTTP_OK = b"HTTP/1.1 200 Connection established\r\nProxy-agent: test\r\n\r\n"


def feed(handshake: ProxyHandshake, stream: bytes, *, max_steps: int = 100_000) -> bytes:
    """Run ``handshake`` as a driver does (never reading more than ``read_limit``) over the
    proxy's ``stream`` (an end of file after it); returns what was left unread."""
    handshake.data_to_send()
    for _ in range(max_steps):
        if handshake.done:
            return stream
        limit = handshake.read_limit
        assert limit > 0
        piece, stream = stream[:limit], stream[limit:]
        handshake.receive_data(piece)
    raise AssertionError("the handshake did not end")


def socks(login: bool = False, scheme: str = "socks5h") -> Proxy:
    return Proxy(
        scheme=scheme,
        host="127.0.0.1",
        port=1080,
        username="user" if login else None,
        password=SECRET if login else None,
    )


def http(login: bool = False) -> Proxy:
    return Proxy(
        scheme="http",
        host="proxy.example",
        port=3128,
        username="user" if login else None,
        password=SECRET if login else None,
    )


# -- Proxy values and URLs --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("socks5://127.0.0.1", ("socks5", "127.0.0.1", 1080, None, None)),
        ("SOCKS5H://Proxy.Example:1081", ("socks5h", "proxy.example", 1081, None, None)),
        ("http://proxy.example", ("http", "proxy.example", 80, None, None)),
        ("http://proxy.example:3128/", ("http", "proxy.example", 3128, None, None)),
        ("socks5h://user:pa%40ss@127.0.0.1:1080", ("socks5h", "127.0.0.1", 1080, "user", "pa@ss")),
        ("socks5://[::1]:9050", ("socks5", "::1", 9050, None, None)),
        ("http://us%3Aer%C3%A9:p%3Aw@[::1]", None),  # a colon in an HTTP user name
        ("http://user:@proxy.example:3128", ("http", "proxy.example", 3128, "user", "")),
        ("http://user@proxy.example:3128", ("http", "proxy.example", 3128, "user", "")),
        ("http://%C3%A9l%C3%A8ve:pw@proxy.example:1", ("http", "proxy.example", 1, "élève", "pw")),
    ],
)
def test_parse(url: str, expected: tuple[object, ...] | None) -> None:
    if expected is None:
        with pytest.raises(ConfigurationError):
            Proxy.parse(url)
        return
    proxy = Proxy.parse(url)
    assert (proxy.scheme, proxy.host, proxy.port, proxy.username, proxy.password) == expected


@pytest.mark.parametrize(
    "url",
    [
        "ftp://127.0.0.1:21",
        "https://proxy.example:443",
        "socks4://127.0.0.1",
        "127.0.0.1:1080",
        "socks5://",
        "socks5://127.0.0.1:0",
        "socks5://127.0.0.1:65536",
        "socks5://127.0.0.1:port",
        "socks5://127.0.0.1:1080/path",
        "socks5://127.0.0.1:1080?x=1",
        "socks5://127.0.0.1:1080#frag",
        f"socks5://user:{SECRET}\r\n@127.0.0.1",
        f"socks5://user:{SECRET}%0D%0A@127.0.0.1",
        f"socks5://user:{SECRET}%00@127.0.0.1",
        f"socks5://user:{SECRET}%FF@127.0.0.1",
        f"socks5://{'u' * 256}:{SECRET}@127.0.0.1",
        f"socks5://user:{'p' * 256}@127.0.0.1",
        "socks5://user@127.0.0.1",  # RFC 1929: a password of at least one byte
        f"socks5://{'é' * 128}:{SECRET}@127.0.0.1",  # 256 bytes in UTF-8
    ],
)
def test_parse_refuses_without_showing_the_password(url: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Proxy.parse(url)
    assert SECRET not in str(caught.value)


def test_rfc_1929_limit_is_in_bytes() -> None:
    assert Proxy.parse(f"socks5://{'u' * 255}:{'p' * 255}@h").username == "u" * 255
    assert Proxy(scheme="http", host="h", port=1, username="u" * 1000, password="p").port == 1


@pytest.mark.parametrize(
    "fields",
    [
        {"scheme": "socks5", "host": "", "port": 1},
        {"scheme": "socks5", "host": "a b", "port": 1},
        {"scheme": "socks5", "host": "h", "port": True},
        {"scheme": "socks5", "host": "h", "port": 1, "username": "u"},
        {"scheme": "socks5", "host": "h", "port": 1, "password": SECRET},
        {"scheme": "http", "host": "h", "port": 1, "username": "u\n", "password": SECRET},
        {"scheme": "socks4a", "host": "h", "port": 1},
    ],
)
def test_construction_refuses(fields: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Proxy(**fields)  # type: ignore[arg-type]
    assert SECRET not in str(caught.value)


def test_the_password_never_shows() -> None:
    proxy = Proxy.parse(f"socks5h://user:{SECRET}@127.0.0.1:1080")
    assert SECRET not in repr(proxy)
    assert str(proxy) == "socks5h://user@127.0.0.1:1080"
    assert str(Proxy.parse("socks5://[::1]")) == "socks5://[::1]:1080"
    assert SECRET not in repr(ProxyHandshake(proxy, "mx.example", 25))


def test_as_proxy() -> None:
    proxy = socks()
    assert as_proxy(proxy) is proxy
    assert as_proxy(None) is None
    assert as_proxy("socks5h://127.0.0.1:1080") == proxy
    with pytest.raises(ConfigurationError):
        as_proxy(1080)


def test_settings_take_a_proxy_and_never_show_its_password() -> None:
    settings = ConnectionSettings(
        host="smtp.example",
        port=587,
        tls=TLS.STARTTLS,
        timeouts=Timeouts(),
        proxy=f"http://user:{SECRET}@proxy.example:3128",
    )
    assert settings.proxy == Proxy.parse(f"http://user:{SECRET}@proxy.example:3128")
    assert SECRET not in repr(settings)
    assert "proxy=http://user@proxy.example:3128" in repr(settings)


def test_a_unix_socket_takes_no_proxy() -> None:
    with pytest.raises(ConfigurationError, match="proxy"):
        ConnectionSettings(
            host=None,
            port=None,
            unix_path="/run/lmtp.sock",
            tls=TLS.NONE,
            timeouts=Timeouts(),
            proxy="socks5://127.0.0.1",
        )


def test_url_proxy_parameter() -> None:
    url = (
        f"smtp://me:{SECRET}@smtp.example:587"
        f"?proxy=socks5h%3A%2F%2Fuser%3A{SECRET}%2540x%40127.0.0.1%3A1080"
    )
    parsed = TransportURL.parse(url)
    assert parsed.proxy == Proxy(
        scheme="socks5h", host="127.0.0.1", port=1080, username="user", password=f"{SECRET}@x"
    )
    assert SECRET not in repr(parsed)
    with transport_from_url(url) as transport:
        assert transport.settings.proxy == parsed.proxy  # type: ignore[attr-defined]
        assert SECRET not in repr(transport)


@pytest.mark.parametrize(
    "url",
    [
        f"smtp://me:{SECRET}@smtp.example?proxy=ftp%3A%2F%2Fuser%3A{SECRET}%40h",
        f"lmtp:///run/lmtp.sock?proxy=socks5%3A%2F%2Fuser%3A{SECRET}%40h",
        f"smtp://smtp.example?proxy=socks5%3A%2F%2Fh&proxy=socks5%3A%2F%2Fu%3A{SECRET}%40h2",
        f"memory://?proxy=socks5%3A%2F%2Fuser%3A{SECRET}%40h",
        f"smtp://smtp.example?proxy=socks5%3A%2F%2Fuser%3A{SECRET}%40h%2Fpath",
        f"smtp://smtp.example?proxy=socks5://user:{SECRET}@h:1080/x",
    ],
)
def test_url_proxy_refusals_hide_both_passwords(url: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        transport_from_url(url)
    assert SECRET not in str(caught.value)


def test_proxy_error_is_a_connect_error_and_pickles() -> None:
    error = ProxyError("no tunnel", is_transient=False, host="mx:25", proxy="127.0.0.1:1080")
    assert isinstance(error, ConnectError)
    assert isinstance(error, ConnectionError)
    assert pickle.loads(pickle.dumps(error)) == error
    assert pickle.loads(pickle.dumps(error)).proxy == "127.0.0.1:1080"


def test_tunnel_targets() -> None:
    infos = [
        (10, 1, 6, "", ("::1", 25, 0, 0)),
        (2, 1, 6, "", ("127.0.0.1", 25)),
        (2, 1, 6, "", ("127.0.0.1", 25)),
        (10, 1, 6, "", ("fe80::1%eth0", 25, 0, 2)),
    ]
    assert tunnel_targets(socks(scheme="socks5"), "mx", infos) == ["::1", "127.0.0.1", "fe80::1"]
    assert tunnel_targets(socks(scheme="socks5h"), "mx", None) == ["mx"]
    assert tunnel_targets(http(), "mx", None) == ["mx"]


@pytest.mark.parametrize(
    ("codes", "transient"), [((8, 8), False), ((8, 5), True), ((4, 5), True), ((8,), False)]
)
def test_all_targets_failed_is_transient_when_any_failure_was(
    codes: tuple[int, ...], transient: bool
) -> None:
    failures = []
    for number, code in enumerate(codes):
        handshake = ProxyHandshake(socks(scheme="socks5"), f"192.0.2.{number}", 25)
        with pytest.raises(ProxyError) as caught:
            feed(handshake, b"\x05\x00\x05" + bytes((code,)))
        assert handshake.target_failed
        failures.append(caught.value)
    error = all_targets_failed(socks(scheme="socks5"), "mx.example:25", failures)
    assert error.is_transient is transient
    assert all(str(each) in str(error) for each in failures)


# -- SOCKS5 -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scheme", "host", "destination"),
    [
        ("socks5", "192.0.2.1", b"\x01\xc0\x00\x02\x01"),
        ("socks5h", "192.0.2.1", b"\x01\xc0\x00\x02\x01"),
        ("socks5", "2001:db8::1", b"\x04" + bytes.fromhex("20010db8" + "0" * 23 + "1")),
        ("socks5h", "mx.example", b"\x03\x0amx.example"),
        ("socks5h", "bücher.example", b"\x03\x15xn--bcher-kva.example"),
    ],
)
def test_socks5_connect_request(scheme: str, host: str, destination: bytes) -> None:
    handshake = ProxyHandshake(socks(scheme=scheme), host, 25)
    assert handshake.data_to_send() == b"\x05\x01\x00"  # RFC 1928 §3: no authentication
    assert handshake.read_limit == 2
    handshake.receive_data(b"\x05\x00")
    assert handshake.data_to_send() == b"\x05\x01\x00" + destination + b"\x00\x19"
    handshake.receive_data(SOCKS_OK_IPV4)
    assert handshake.done
    assert handshake.leftover == b""


def test_socks5_login() -> None:
    handshake = ProxyHandshake(socks(login=True), "mx.example", 25)
    assert handshake.data_to_send() == b"\x05\x02\x00\x02"
    handshake.receive_data(b"\x05\x02")
    # RFC 1929 §2: VER=1 ULEN UNAME PLEN PASSWD
    assert handshake.data_to_send() == b"\x01\x04user\x09" + SECRET.encode()
    handshake.receive_data(b"\x01\x00")
    assert handshake.data_to_send().startswith(b"\x05\x01\x00\x03")
    assert feed(handshake, SOCKS_OK_IPV4 + GREETING) == GREETING


def test_a_proxy_may_choose_no_authentication_when_we_offer_a_login() -> None:
    handshake = ProxyHandshake(socks(login=True), "mx.example", 25)
    assert feed(handshake, b"\x05\x00" + SOCKS_OK_IPV4) == b""
    assert handshake.done


@pytest.mark.parametrize(
    ("bound", "size"),
    [
        (b"\x01\x7f\x00\x00\x01", 4),
        (b"\x04" + bytes(16), 16),
        (b"\x03\x10" + b"relay.proxy.test", 17),
        (b"\x03\x00", 1),
        (b"\x03\xff" + b"a" * 255, 256),
    ],
)
def test_the_bound_address_is_consumed_exactly(bound: bytes, size: int) -> None:
    reply = b"\x05\x00\x00" + bound + b"\x04\x38"
    assert len(reply) == 3 + 1 + size + 2
    # A driver keeping to read_limit leaves the greeting unread...
    handshake = ProxyHandshake(socks(), "mx.example", 25)
    assert feed(handshake, b"\x05\x00" + reply + GREETING) == GREETING
    assert handshake.leftover == b""
    # ... and one that reads everything at once gets it back, whole.
    handshake = ProxyHandshake(socks(), "mx.example", 25)
    handshake.receive_data(b"\x05\x00")
    handshake.receive_data(reply + GREETING)
    assert handshake.done
    assert handshake.leftover == GREETING
    handshake.receive_data(b"more")
    assert handshake.leftover == GREETING + b"more"


#: RFC 1928 §6 reply codes and whether trying again later may help; from the RFC's text.
REPLY_CLASSES = {
    0x01: True,  # general SOCKS server failure
    0x02: False,  # connection not allowed by ruleset
    0x03: True,  # network unreachable
    0x04: True,  # host unreachable
    0x05: True,  # connection refused
    0x06: True,  # TTL expired
    0x07: False,  # command not supported
    0x08: False,  # address type not supported
    0x09: True,  # unassigned: not known to be final
    0xFF: True,
}


@pytest.mark.parametrize(("code", "transient"), sorted(REPLY_CLASSES.items()))
def test_every_socks5_reply_code(code: int, transient: bool) -> None:
    handshake = ProxyHandshake(socks(login=True), "mx.example", 25)
    with pytest.raises(ProxyError) as caught:
        feed(handshake, b"\x05\x02\x01\x00\x05" + bytes((code,)) + b"\x00\x01" + bytes(6))
    error = caught.value
    assert error.is_transient is transient
    assert error.proxy == "127.0.0.1:1080"
    assert error.host == "mx.example:25"
    text = str(error)
    assert "127.0.0.1:1080" in text
    assert "mx.example:25" in text
    assert SECRET not in text
    assert SECRET not in repr(error)
    assert (code in SOCKS5_REPLIES) is ("unassigned" not in text)
    assert ("retrying will not help" in text) is not transient
    # Only "this address cannot be reached" lets a driver try the host's next address.
    assert handshake.target_failed is (code in {3, 4, 5, 6, 8})
    # The error stays: no later input revives the handshake.
    with pytest.raises(ProxyError):
        handshake.receive_data(SOCKS_OK_IPV4)
    assert handshake.read_limit == 0


@pytest.mark.parametrize(
    ("login", "stream", "transient", "words"),
    [
        (False, b"\x04\x00", False, "version is 4"),
        (False, b"HTTP/1.0 400 Bad Request\r\n\r\n", False, "is it a SOCKS5 proxy"),
        (False, b"\x05\xff", False, "none of our methods (no authentication)"),
        (True, b"\x05\xff", False, "none of our methods (our user name and password)"),
        (False, b"\x05\x02", False, "did not offer"),
        (False, b"\x05\x01", False, "did not offer"),
        (True, b"\x05\x02\x01\x01", False, "refused our user name and password"),
        (True, b"\x05\x02\x05\x00", False, "login reply's version is 5"),
        (False, b"\x05\x00\x04\x00", False, "version is 4"),
        (False, b"\x05\x00\x05\x00\x00\x02" + bytes(20), False, "address type is 0x02"),
        (False, b"", True, "closed the connection"),
        (False, b"\x05", True, "closed the connection"),
        (False, b"\x05\x00\x05\x00\x00\x01\x7f\x00", True, "closed the connection"),
    ],
)
def test_socks5_failures(login: bool, stream: bytes, transient: bool, words: str) -> None:
    handshake = ProxyHandshake(socks(login=login), "mx.example", 25)
    with pytest.raises(ProxyError) as caught:
        feed(handshake, stream)
    assert words in str(caught.value)
    assert caught.value.is_transient is transient
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize(
    ("proxy", "host"),
    [
        (socks(), "a" * 256),
        (socks(), "mx.example\r\nX: y"),
        (http(), "mx.example HTTP/1.1\r\nX: y"),
        (http(), ""),
        (http(), "bücher_.example"),
    ],
)
def test_a_target_that_cannot_be_asked_for(proxy: Proxy, host: str) -> None:
    with pytest.raises(ConfigurationError):
        ProxyHandshake(proxy, host, 25)


# -- HTTP CONNECT -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "authority"),
    [
        ("mx.example", "mx.example:587"),
        ("192.0.2.1", "192.0.2.1:587"),
        ("2001:db8::1", "[2001:db8::1]:587"),
        ("bücher.example", "xn--bcher-kva.example:587"),
    ],
)
def test_http_connect_request(host: str, authority: str) -> None:
    handshake = ProxyHandshake(http(), host, 587)
    assert handshake.data_to_send() == (
        f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
    )


def test_http_connect_request_with_basic_credentials() -> None:
    handshake = ProxyHandshake(http(login=True), "mx.example", 25)
    token = base64.b64encode(f"user:{SECRET}".encode()).decode()
    assert (
        handshake.data_to_send()
        == (
            "CONNECT mx.example:25 HTTP/1.1\r\nHost: mx.example:25\r\n"
            f"Proxy-Authorization: Basic {token}\r\n\r\n"
        ).encode()
    )


@pytest.mark.parametrize(
    "reply",
    [
        HTTP_OK,
        b"HTTP/1.0 200 Connection established\r\n\r\n",
        b"HTTP/1.1 204\r\n\r\n",
        b"HTTP/1.1 200 OK\nVia: x\n\n",  # bare LF line ends (RFC 9112 §2.2)
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n",  # ignored (RFC 9110 §9.3.6)
    ],
)
def test_http_tunnel_opens_and_leaves_the_greeting(reply: bytes) -> None:
    handshake = ProxyHandshake(http(), "mx.example", 25)
    assert feed(handshake, reply + GREETING) == GREETING
    assert handshake.done
    assert handshake.leftover == b""


@pytest.mark.parametrize(
    ("login", "reply", "transient", "words"),
    [
        (True, b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n", False, "refused our user"),
        (False, b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n", False, "requires a user"),
        (True, b"HTTP/1.0 401 Unauthorized\r\n\r\n", False, "refused our user"),
        (False, b"HTTP/1.1 403 Access violation\r\n\r\n", False, "rules forbid"),
        (False, b"HTTP/1.1 405 Method Not Allowed\r\n\r\n", False, "405 Method Not Allowed"),
        (False, b"HTTP/1.1 302 Found\r\nLocation: x\r\n\r\n", False, "302 Found"),
        (False, b"HTTP/1.1 502 Bad Gateway\r\n\r\n", True, "502 Bad Gateway"),
        (False, b"HTTP/1.1 503 Service Unavailable\r\n\r\n", True, "503"),
        (False, b"HTTP/1.1 504 Gateway Timeout\r\n\r\n", True, "504"),
        (False, b"HTTP/1.1 429 Too Many Requests\r\n\r\n", True, "429"),
        (False, b"\x05\x00\r\n\r\n", False, "not an HTTP/1.x status line"),
        (False, b"HTTP/2 200\r\n\r\n", False, "not an HTTP/1.x status line"),
        (False, b"HTTP/1.1 20 OK\r\n\r\n", False, "not an HTTP/1.x status line"),
        (False, b"HTTP/1.1 2000 OK\r\n\r\n", False, "not an HTTP/1.x status line"),
        (False, b"HTTP/1.1 200 OK\r\n", True, "before the end of its reply"),
        (False, b"", True, "before the end of its reply"),
    ],
)
def test_http_failures(login: bool, reply: bytes, transient: bool, words: str) -> None:
    handshake = ProxyHandshake(http(login=login), "mx.example", 25)
    with pytest.raises(ProxyError) as caught:
        feed(handshake, reply)
    text = str(caught.value)
    assert words in text
    assert caught.value.is_transient is transient
    assert ("retrying will not help" in text) is not transient
    assert "proxy.example:3128" in text
    assert "mx.example:25" in text
    assert SECRET not in text
    assert base64.b64encode(f"user:{SECRET}".encode()).decode() not in text


def test_the_reason_phrase_is_cut_and_printable() -> None:
    handshake = ProxyHandshake(http(), "mx.example", 25)
    with pytest.raises(ProxyError) as caught:
        feed(handshake, b"HTTP/1.1 403 \x1b[31m" + b"x" * 5000 + b"\r\n\r\n")
    assert "\x1b" not in str(caught.value)
    assert len(str(caught.value)) < 400


def test_an_endless_header_is_refused_at_the_bound() -> None:
    handshake = ProxyHandshake(http(), "mx.example", 25)
    endless = b"HTTP/1.1 200 OK\r\n" + b"X-Filler: " + b"y" * (2 * MAX_HTTP_REPLY)
    with pytest.raises(ProxyError, match="longer than 16384 bytes") as caught:
        feed(handshake, endless)
    assert caught.value.is_transient is False
    # Fed at once, it is refused too, and nothing keeps growing.
    handshake = ProxyHandshake(http(), "mx.example", 25)
    with pytest.raises(ProxyError, match="longer than"):
        handshake.receive_data(endless + b"\r\n\r\n")


def test_a_header_of_exactly_the_bound_is_read() -> None:
    head = b"HTTP/1.1 200 OK\r\nX: "
    reply = head + b"y" * (MAX_HTTP_REPLY - len(head) - 4) + b"\r\n\r\n"
    assert len(reply) == MAX_HTTP_REPLY
    handshake = ProxyHandshake(http(), "mx.example", 25)
    assert feed(handshake, reply + GREETING) == GREETING


# -- properties ---------------------------------------------------------------------------------


VALID_STREAMS = [
    (socks(), b"\x05\x00" + SOCKS_OK_IPV4),
    (socks(), b"\x05\x00\x05\x00\x00\x03\x05relay\x00\x19"),
    (socks(login=True), b"\x05\x02\x01\x00\x05\x00\x00\x04" + bytes(18)),
    (socks(login=True), b"\x05\x02\x01\x01"),
    (socks(), b"\x05\x00\x05\x05\x00\x01" + bytes(6)),
    (http(), HTTP_OK),
    (http(), b"HTTP/1.1 200 OK\nA: b\r\n\n"),
    (http(login=True), b"HTTP/1.1 407 No\r\nProxy-Authenticate: Basic\r\n\r\n"),
]


def outcome(handshake: ProxyHandshake, pieces: list[bytes]) -> tuple[object, ...]:
    try:
        for piece in pieces:
            handshake.receive_data(piece)
        handshake.receive_data(b"")
    except ProxyError as exc:
        return ("error", str(exc), exc.is_transient, handshake.target_failed)
    return ("done", handshake.done, handshake.leftover)


@given(
    case=st.sampled_from(VALID_STREAMS),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=20),
    tail=st.sampled_from([b"", GREETING]),
)
def test_any_split_gives_the_same_outcome(
    case: tuple[Proxy, bytes], cuts: list[int], tail: bytes
) -> None:
    proxy, stream = case
    stream += tail
    whole = ProxyHandshake(proxy, "mx.example", 25)
    expected = outcome(whole, [stream])
    points = sorted({min(cut, len(stream)) for cut in cuts})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    split = ProxyHandshake(proxy, "mx.example", 25)
    assert outcome(split, [piece for piece in pieces if piece]) == expected
    # A driver that keeps to read_limit ends the same way and leaves exactly the tail.
    exact = exact_outcome(ProxyHandshake(proxy, "mx.example", 25), stream)
    if expected[0] == "error":
        assert exact == ("error", expected[1])
    else:
        assert expected == ("done", True, tail)
        assert exact == ("done", tail)


def exact_outcome(handshake: ProxyHandshake, stream: bytes) -> tuple[str, object]:
    try:
        return ("done", feed(handshake, stream))
    except ProxyError as exc:
        return ("error", str(exc))


@given(
    proxy=st.sampled_from([socks(), socks(login=True), http(), http(login=True)]),
    garbage=st.binary(max_size=2000)
    | st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=8), st.integers(1, 5000)),
)
def test_garbage_ends_in_an_error_or_a_tunnel_within_bounds(proxy: Proxy, garbage: bytes) -> None:
    handshake = ProxyHandshake(proxy, "mx.example", 25)
    handshake.data_to_send()
    steps = 0
    stream = garbage
    failed = False
    while not handshake.done and not failed:
        steps += 1
        assert steps <= MAX_HTTP_REPLY + 10  # never a hang
        limit = handshake.read_limit
        assert 0 < limit <= 256  # never asks for much
        piece, stream = stream[:limit], stream[limit:]
        failed = not fed(handshake, piece)
        assert len(handshake._buffer) <= MAX_HTTP_REPLY  # the bound itself
    assert len(garbage) - len(stream) <= MAX_HTTP_REPLY
    assert failed or handshake.leftover == b""


def fed(handshake: ProxyHandshake, piece: bytes) -> bool:
    """Whether ``piece`` was taken without an error (whose message names the target)."""
    try:
        handshake.receive_data(piece)
    except ProxyError as exc:
        assert "mx.example:25" in str(exc)  # noqa: PT017 -- a property: no one exception
        return False
    return True
