"""Tests for mailrelay.protocol.sasl: the SASL mechanisms as generators, with RFC test vectors."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.errors import AuthenticationError
from mailrelay.protocol.sasl import (
    MECHANISMS,
    CramMD5,
    Exchange,
    Login,
    Plain,
    ScramSHA256,
    XOAuth2,
    candidate_mechanisms,
    choose_mechanism,
    saslprep,
)


def run(exchange: Exchange, challenges: list[bytes]) -> list[bytes | None]:
    """Drive an exchange: the initial response, one response per challenge, then success."""
    responses = [next(exchange)]
    responses.extend(exchange.send(c) for c in challenges)
    with pytest.raises(StopIteration):
        exchange.send(None)
    return responses


# -- PLAIN -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("authzid", "user", "password", "wire"),
    [
        # RFC 4616 §4, the two examples.
        ("", "tim", "tanstaaftanstaaf", b"\0tim\0tanstaaftanstaaf"),
        ("Ursel", "Kurt", "xipj3plmq", b"Ursel\0Kurt\0xipj3plmq"),
        ("", "jörg", "pässwörd", "\0jörg\0pässwörd".encode()),
    ],
)
def test_plain_rfc_4616(authzid: str, user: str, password: str, wire: bytes) -> None:
    assert run(Plain(authzid=authzid).start(user, password), []) == [wire]


text_without_nul = st.text(st.characters(blacklist_characters="\0", codec="utf-8"))


@given(user=text_without_nul, password=text_without_nul)
def test_plain_round_trip(user: str, password: str) -> None:
    (wire,) = run(Plain().start(user, password), [])
    assert wire is not None
    authzid, authcid, passwd = wire.split(b"\0")
    assert (authzid, authcid.decode(), passwd.decode()) == (b"", user, password)


def test_plain_refuses_nul() -> None:
    with pytest.raises(AuthenticationError, match="NUL"):
        next(Plain().start("a\0b", "c"))


def test_plain_refuses_a_challenge() -> None:
    exchange = Plain().start("tim", "secret")
    next(exchange)
    with pytest.raises(AuthenticationError, match="challenge"):
        exchange.send(b"more?")


# -- LOGIN -------------------------------------------------------------------------------------


def test_login_answers_by_order() -> None:
    responses = run(Login().start("tim", "tanstaaf"), [b"Username:", b"Password:"])
    assert responses == [None, b"tim", b"tanstaaf"]


def test_login_ignores_challenge_wording() -> None:
    responses = run(Login().start("tim", "tanstaaf"), [b"User Name\0", b""])
    assert responses == [None, b"tim", b"tanstaaf"]


def test_login_refuses_a_third_challenge() -> None:
    exchange = Login().start("tim", "tanstaaf")
    next(exchange)
    exchange.send(b"Username:")
    exchange.send(b"Password:")
    with pytest.raises(AuthenticationError, match="after the exchange was complete"):
        exchange.send(b"Again:")


# -- CRAM-MD5 ----------------------------------------------------------------------------------


def test_cram_md5_rfc_2195_example() -> None:
    # RFC 2195 §2.
    challenge = b"<1896.697170952@postoffice.reston.mci.net>"
    responses = run(CramMD5().start("tim", "tanstaaftanstaaf"), [challenge])
    assert responses == [None, b"tim b913a602c7eda7a495b4e6e7334d3890"]


@given(challenge=st.binary(min_size=1), password=st.text())
def test_cram_md5_is_hmac_md5(challenge: bytes, password: str) -> None:
    exchange = CramMD5().start("u", password)
    next(exchange)
    response = exchange.send(challenge)
    assert response == b"u " + hmac.new(password.encode(), challenge, "md5").hexdigest().encode()


def test_cram_md5_refuses_empty_challenge() -> None:
    exchange = CramMD5().start("tim", "x")
    next(exchange)
    with pytest.raises(AuthenticationError, match="empty challenge"):
        exchange.send(b"")


# -- XOAUTH2 -----------------------------------------------------------------------------------


def test_xoauth2_initial_response() -> None:
    responses = run(
        XOAuth2().start("someuser@example.com", "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg"), []
    )
    assert responses == [
        b"user=someuser@example.com\x01"
        b"auth=Bearer ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg\x01\x01"
    ]


def test_xoauth2_answers_error_json_with_empty_response() -> None:
    exchange = XOAuth2().start("u@example.com", "expired")
    next(exchange)
    error = b'{"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}'
    assert exchange.send(error) == b""
    with pytest.raises(AuthenticationError):
        exchange.send(b"again")


def test_xoauth2_refuses_control_a() -> None:
    with pytest.raises(AuthenticationError, match=r"\^A"):
        next(XOAuth2().start("u", "tok\x01en"))


# -- SCRAM-SHA-256 -----------------------------------------------------------------------------

# RFC 7677 §3.
RFC7677_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC7677_SERVER_FIRST = (
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
RFC7677_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC7677_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def rfc7677() -> ScramSHA256:
    return ScramSHA256(nonce=lambda: RFC7677_NONCE)


def test_scram_sha_256_rfc_7677_example() -> None:
    exchange = rfc7677().start("user", "pencil")
    responses = run(exchange, [RFC7677_SERVER_FIRST, RFC7677_SERVER_FINAL])
    assert responses == [b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO", RFC7677_CLIENT_FINAL, b""]


def scram_at_final(password: str = "pencil") -> Exchange:
    exchange = rfc7677().start("user", password)
    next(exchange)
    exchange.send(RFC7677_SERVER_FIRST)
    return exchange


def test_scram_refuses_wrong_server_signature() -> None:
    forged = base64.b64encode(b"\0" * 32)
    with pytest.raises(AuthenticationError, match="signature is wrong"):
        scram_at_final().send(b"v=" + forged)


def test_scram_with_wrong_password_refuses_the_real_servers_signature() -> None:
    with pytest.raises(AuthenticationError, match="signature is wrong"):
        scram_at_final("pencil2").send(RFC7677_SERVER_FINAL)


def test_scram_refuses_success_without_server_signature() -> None:
    with pytest.raises(AuthenticationError, match="without proving"):
        scram_at_final().send(None)


@pytest.mark.parametrize(
    ("server_first", "match"),
    [
        (b"r=someoneelse123,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", "nonce"),
        (b"r=rOprNGfwEbeRWgbNEkqO,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", "nonce"),
        (b"r=rOprNGfwEbeRWgbNEkqOxx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=0", "iteration"),
        (b"r=rOprNGfwEbeRWgbNEkqOxx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=99999999", "iteration"),
        (b"r=rOprNGfwEbeRWgbNEkqOxx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=x", "iteration"),
        # Digits str.isdigit takes but int() refuses or RFC 5802 does not allow, and more
        # digits than int() converts: each once escaped as a bare ValueError.
        ("r=rOprNGfwEbeRWgbNEkqOxx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=\u00b2".encode(), "iteration"),
        (
            "r=rOprNGfwEbeRWgbNEkqOxx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=\u0661\u0662".encode(),
            "iteration",
        ),
        (b"r=rOprNGfwEbeRWgbNEkqOxx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=" + b"9" * 5000, "iteration"),
        (b"r=rOprNGfwEbeRWgbNEkqOxx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=04096", "iteration"),
        (b"r=rOprNGfwEbeRWgbNEkqOxx,s=!!!,i=4096", "base64"),
        (b"r=rOprNGfwEbeRWgbNEkqOxx,i=4096", "lacks"),
        (b"m=ext,r=rOprNGfwEbeRWgbNEkqOxx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", "extension"),
        (b"e=unknown-user", "refused"),
        (b"garbage", "malformed"),
        (b"\xff\xfe", "UTF-8"),
    ],
)
def test_scram_refuses_bad_server_first(server_first: bytes, match: str) -> None:
    exchange = rfc7677().start("user", "pencil")
    next(exchange)
    with pytest.raises(AuthenticationError, match=match):
        exchange.send(server_first)


def test_scram_reports_server_final_error() -> None:
    with pytest.raises(AuthenticationError, match="invalid-proof"):
        scram_at_final().send(b"e=invalid-proof")


def test_scram_escapes_user_name() -> None:
    first = next(ScramSHA256(nonce=lambda: "abc").start("a=b,c", "p"))
    assert first == b"n,,n=a=3Db=2Cc,r=abc"


def test_scram_default_nonce_is_random() -> None:
    firsts = {next(ScramSHA256().start("user", "pencil")) for _ in range(3)}
    assert len(firsts) == 3


@pytest.mark.parametrize("nonce", ["", "a,b", "caf\u00e9", "a b"])
def test_scram_refuses_bad_injected_nonce(nonce: str) -> None:
    with pytest.raises(AuthenticationError, match="nonce"):
        next(ScramSHA256(nonce=lambda: nonce).start("user", "pencil"))


@given(
    password=st.text(
        st.characters(codec="ascii", min_codepoint=0x20, max_codepoint=0x7E), min_size=1
    )
)
def test_scram_client_proof_verifies_like_a_server(password: str) -> None:
    # The server side computed independently from RFC 5802 §3's definitions.
    salt, iterations = b"NaCl-salt", 4096
    exchange = ScramSHA256(nonce=lambda: "clientnonce").start("user", password)
    next(exchange)
    server_first = b"r=clientnonceSERVER,s=" + base64.b64encode(salt) + b",i=4096"
    final = exchange.send(server_first)
    assert final is not None
    without_proof, _, proof_text = final.rpartition(b",p=")
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    stored_key = hashlib.sha256(hmac.digest(salted, b"Client Key", "sha256")).digest()
    auth_message = b"n=user,r=clientnonce," + server_first + b"," + without_proof
    signature = hmac.digest(stored_key, auth_message, "sha256")
    client_key = bytes(a ^ b for a, b in zip(base64.b64decode(proof_text), signature, strict=True))
    assert hashlib.sha256(client_key).digest() == stored_key
    server_signature = hmac.digest(
        hmac.digest(salted, b"Server Key", "sha256"), auth_message, "sha256"
    )
    assert exchange.send(b"v=" + base64.b64encode(server_signature)) == b""


# -- SASLprep ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "prepared"),
    [
        # RFC 4013 §3 examples.
        ("I\u00adX", "IX"),  # SOFT HYPHEN mapped to nothing
        ("user", "user"),
        ("USER", "USER"),  # case preserved
        ("\u00aa", "a"),  # NFKC
        ("\u2168", "IX"),  # NFKC
        ("a\u00a0b", "a b"),  # non-ASCII space mapped to SPACE
        ("\u0627\u0031\u0628", "\u0627\u0031\u0628"),  # RandALCat at both ends
    ],
)
def test_saslprep(text: str, prepared: str) -> None:
    assert saslprep(text) == prepared


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("\u0007", "prohibits"),  # RFC 4013 §3: control character
        ("a\u2028b", "prohibits"),
        ("\u0627\u0031", "bidirectional"),  # RFC 4013 §3: RandALCat not at the end
        ("\u00ad", "empty"),
        ("", "empty"),
    ],
)
def test_saslprep_refuses(text: str, match: str) -> None:
    with pytest.raises(AuthenticationError, match=match):
        saslprep(text, what="password")


def test_saslprep_error_never_shows_the_text() -> None:
    with pytest.raises(AuthenticationError) as info:
        saslprep("s3cret\u0007", what="password")
    assert "s3cret" not in str(info.value)


def test_scram_normalizes_password() -> None:
    # A password given as "I<soft hyphen>X" authenticates like "IX".
    def final_for(password: str) -> bytes | None:
        exchange = rfc7677().start("user", password)
        next(exchange)
        return exchange.send(RFC7677_SERVER_FIRST)

    assert final_for("I\u00adX") == final_for("IX")


# -- choosing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offered", "preferred", "chosen"),
    [
        ({"PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256"}, None, "SCRAM-SHA-256"),
        ({"PLAIN", "LOGIN", "CRAM-MD5"}, None, "CRAM-MD5"),
        ({"LOGIN", "PLAIN"}, None, "PLAIN"),
        ({"login"}, None, "LOGIN"),
        ({"PLAIN", "XOAUTH2"}, None, "PLAIN"),
        ({"PLAIN", "XOAUTH2"}, ["xoauth2"], "XOAUTH2"),
        ({"PLAIN", "CRAM-MD5", "GSSAPI"}, ["LOGIN", "PLAIN"], "PLAIN"),
    ],
)
def test_choose_mechanism(offered: set[str], preferred: list[str] | None, chosen: str) -> None:
    assert choose_mechanism(frozenset(offered), preferred=preferred).name == chosen


def test_candidates_in_preference_order() -> None:
    names = [m.name for m in candidate_mechanisms({"LOGIN", "PLAIN", "SCRAM-SHA-256", "XOAUTH2"})]
    assert names == ["SCRAM-SHA-256", "PLAIN", "LOGIN"]


def test_choose_mechanism_with_nothing_in_common() -> None:
    with pytest.raises(AuthenticationError, match="GSSAPI"):
        choose_mechanism({"GSSAPI"})


def test_choose_mechanism_refuses_unknown_preference() -> None:
    with pytest.raises(AuthenticationError, match="NTLM"):
        choose_mechanism({"PLAIN"}, preferred=["NTLM"])


# -- secrecy -----------------------------------------------------------------------------------

PASSWORD = "Tr0ub4dor&3-secret"


@pytest.mark.parametrize("name", sorted(MECHANISMS))
def test_credentials_never_in_repr_or_str(name: str) -> None:
    mechanism = MECHANISMS[name]
    exchange = mechanism.start("someone", PASSWORD)
    next(exchange)
    for shown in (repr(mechanism), str(mechanism), repr(exchange), str(exchange)):
        assert PASSWORD not in shown
        assert "someone" not in shown
