"""SMTPTestServer against RFC 3461's parameter lengths and RFC 4954's AUTH before EHLO, each
proved with a raw-socket client (so mailrelay's own client is not the judge)."""

from __future__ import annotations

import pytest

from mailrelay.testing.server import EXTENSIONS, SMTPTestServer
from tests.testing.raw_client import RawClient

# -- RFC 3461 §4.4 and §4.2: ENVID and ORCPT lengths ---------------------------------------


@pytest.mark.parametrize(
    ("envid", "reply"),
    [
        (b"e" * 100, b"250 "),
        (b"e" * 101, b"501 5.5.4 "),
        # §4.4 counts the parameter as sent: 34 hexchars are 102 characters, 34 decoded.
        (b"+2B" * 33 + b"e", b"250 "),
        (b"+2B" * 34, b"501 5.5.4 "),
    ],
)
def test_an_envid_over_100_characters_is_refused_with_501(envid: bytes, reply: bytes) -> None:
    # RFC 3461 §4.4: "The ENVID parameter MAY be up to 100 characters in length"; §5.1(a): a
    # value that is not valid gets 501. The server took any length its MAIL line could hold
    # (512 + 100 octets), so a client sending a longer ENVID passed here and failed elsewhere.
    with SMTPTestServer() as server, RawClient(server) as client:
        assert client.exchange(b"EHLO c").startswith(b"250 ")
        answer = client.exchange(b"MAIL FROM:<a@b.example> RET=HDRS ENVID=" + envid)
        assert answer.startswith(reply), answer
        if reply == b"250 ":
            return
        assert b"ENVID" in answer
        # Refused: no transaction was opened, and the next MAIL is taken.
        assert client.exchange(b"RCPT TO:<c@d.example>").startswith(b"503 ")
        assert client.exchange(b"MAIL FROM:<a@b.example>").startswith(b"250 ")
    assert server.messages == []


def test_an_envid_over_100_characters_without_enhanced_codes_is_a_plain_501() -> None:
    # RFC 2034 §3: the enhanced code only from a server that advertises ENHANCEDSTATUSCODES.
    extensions = set(EXTENSIONS) - {"ENHANCEDSTATUSCODES"}
    with SMTPTestServer(extensions=extensions) as server, RawClient(server) as client:
        assert client.exchange(b"EHLO c").startswith(b"250 ")
        answer = client.exchange(b"MAIL FROM:<> ENVID=" + b"e" * 101)
        assert answer == b"501 ENVID parameter longer than 100 characters"


@pytest.mark.parametrize(
    ("orcpt", "reply"),
    [
        (b"rfc822;" + b"o" * 493, b"250 "),  # 500 characters with its address type
        (b"rfc822;" + b"o" * 494, b"501 5.5.4 "),
        # Characters, not octets: 500 characters are 900 octets here.
        (("utf-8;" + "é" * 400 + "o" * 94).encode(), b"250 "),
        (("utf-8;" + "é" * 400 + "o" * 95).encode(), b"501 5.5.4 "),
    ],
)
def test_an_orcpt_over_500_characters_is_refused_with_501(orcpt: bytes, reply: bytes) -> None:
    # RFC 3461 §4.2: "The entire ORCPT parameter MAY be up to 500 characters in length" (its
    # addr-type ";" xtext, as sent); §5.1(b): a value that is not valid gets 501. The RCPT
    # line may hold 512 + 500 octets, so a 501- to 990-character ORCPT was taken.
    with SMTPTestServer() as server, RawClient(server) as client:
        assert client.exchange(b"EHLO c").startswith(b"250 ")
        assert client.exchange(b"MAIL FROM:<a@b.example> SMTPUTF8").startswith(b"250 ")
        answer = client.exchange(b"RCPT TO:<c@d.example> NOTIFY=NEVER ORCPT=" + orcpt)
        assert answer.startswith(reply), answer
        if reply != b"250 ":
            assert b"ORCPT" in answer
            assert client.exchange(b"DATA").startswith(b"554 ")  # not a recipient


# -- RFC 4954 and RFC 5321 §4.2.4: AUTH before EHLO ------------------------------------------


@pytest.mark.parametrize("hello", [None, b"HELO c"])
def test_auth_before_ehlo_is_a_bad_sequence_not_an_unimplemented_command(
    hello: bytes | None,
) -> None:
    # AUTH is an EHLO extension (RFC 4954 §3), so it is out of sequence before EHLO, and after
    # HELO, which negotiates no extensions. The server answered 502 "not implemented"; RFC
    # 5321 §4.2.4 keeps 502 for commands not implemented, which a server advertising AUTH
    # after EHLO may not say: a command out of sequence gets 503 (§4.2.3). The same AUTH
    # after EHLO then goes ahead.
    with (
        SMTPTestServer(auth={"bob": "s3cret"}, allow_insecure_auth=True) as server,
        RawClient(server) as client,
    ):
        if hello is not None:
            assert client.exchange(hello).startswith(b"250 ")
        answer = client.exchange(b"AUTH PLAIN AGJvYgBzM2NyZXQ=")
        assert answer.startswith(b"503 5.5.1 "), answer
        assert client.exchange(b"EHLO c").startswith(b"250 ")
        assert client.exchange(b"AUTH PLAIN AGJvYgBzM2NyZXQ=").startswith(b"235 ")


def test_auth_before_ehlo_needing_tls_is_also_a_bad_sequence() -> None:
    # Before EHLO the sequence is what is wrong, whatever EHLO would then offer (here no AUTH
    # before TLS, where AUTH after EHLO gets 538, RFC 4954 §6).
    with SMTPTestServer(oauth_tokens={"bob": {"t"}}) as server, RawClient(server) as client:
        assert client.exchange(b"AUTH XOAUTH2").startswith(b"503 5.5.1 ")
        assert client.exchange(b"EHLO c").startswith(b"250 ")
        assert client.exchange(b"AUTH XOAUTH2").startswith(b"538 5.7.11 ")


@pytest.mark.parametrize("hello", [None, b"HELO c", b"EHLO c"])
def test_auth_to_a_server_without_it_stays_502(hello: bytes | None) -> None:
    # RFC 5321 §4.2.4: 502 for a command recognized but not implemented, which is what AUTH
    # is to a server given no users or tokens (it never advertises AUTH).
    with SMTPTestServer() as server, RawClient(server) as client:
        if hello is not None:
            assert client.exchange(hello).startswith(b"250 ")
        assert client.exchange(b"AUTH PLAIN").startswith(b"502 5.5.1 ")
