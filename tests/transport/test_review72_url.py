"""Review 72: a transport URL's error messages never show the ``?proxy=`` URL's password.

The redaction looked for the literal text ``proxy=`` and decoded its value once: a key
written percent-encoded (``?prox%79=``), which the query parser decodes, or a proxy URL
encoded twice, kept the proxy's password readable in the message of an error about any
other part of the URL.
"""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.errors import ConfigurationError
from mailrelay.transport.url import TransportURL

SECRET = "s3cretpw"
PROXY = f"socks5://user:{SECRET}@127.0.0.1:1080"


@pytest.mark.parametrize(
    "query",
    [
        f"prox%79={quote(PROXY, safe='')}&tls=bogus",
        f"%70roxy={quote(PROXY, safe='')}&tls=bogus",
        f"PROXY={quote(PROXY, safe='')}&tls=bogus",
        f"tls=bogus&proxy={quote(quote(PROXY, safe=''), safe='')}",
        f"proxy={quote(quote(quote(PROXY, safe=''), safe=''), safe='')}&tls=bogus",
        f"proxy={quote(PROXY, safe='')}&tls=bogus",
        f"proxy={PROXY}&tls=bogus",
    ],
)
def test_an_error_never_shows_the_proxy_password(query: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        TransportURL.parse(f"smtp://mail.example:587?{query}")
    assert SECRET not in str(caught.value)


@given(st.integers(min_value=0, max_value=3), st.booleans())
def test_however_often_encoded(times: int, encode_key: bool) -> None:
    value = PROXY
    for _ in range(times):
        value = quote(value, safe="")
    key = "%70%72%6f%78%79" if encode_key else "proxy"
    with pytest.raises(ConfigurationError) as caught:
        TransportURL.parse(f"smtp://mail.example:587?{key}={value}&tls=bogus")
    assert SECRET not in str(caught.value)
