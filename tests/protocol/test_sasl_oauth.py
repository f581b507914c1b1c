"""The bearer-token mechanisms, sans I/O: XOAUTH2 and OAUTHBEARER (RFC 7628) wire forms, their
failure path (334 JSON error, dummy response, 5xx) and :func:`oauth_error_details`."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.errors import AuthenticationError
from mailrelay.protocol.sasl import (
    BEARER_MECHANISMS,
    MAX_OAUTH_ERROR,
    MECHANISMS,
    OAuthBearer,
    XOAuth2,
    candidate_mechanisms,
    oauth_error_details,
)

GOOGLE_ERROR = b'{"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}'


def initial(mechanism: XOAuth2 | OAuthBearer, user: str, token: str) -> bytes | None:
    return next(mechanism.start(user, token))


# -- wire forms --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mechanism", "user", "token", "expected"),
    [
        (
            XOAuth2(),
            "someuser@example.com",
            "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg",
            b"user=someuser@example.com\x01"
            b"auth=Bearer ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg\x01\x01",
        ),
        # RFC 7628 §4.1's example, without host and port (our default).
        (
            OAuthBearer(),
            "user@example.com",
            "vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg==",
            b"n,a=user@example.com,\x01"
            b"auth=Bearer vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg==\x01\x01",
        ),
        # ... and with them, exactly as RFC 7628 §4.1 shows it.
        (
            OAuthBearer(host="server.example.com", port=143),
            "user@example.com",
            "vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg==",
            b"n,a=user@example.com,\x01host=server.example.com\x01port=143\x01"
            b"auth=Bearer vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg==\x01\x01",
        ),
        (OAuthBearer(port=587), "u", "t", b"n,a=u,\x01port=587\x01auth=Bearer t\x01\x01"),
        # RFC 5801 §4: "," and "=" in the authzid are escaped.
        (OAuthBearer(), "a,b=c", "t", b"n,a=a=2Cb=3Dc,\x01auth=Bearer t\x01\x01"),
        (XOAuth2(), "a,b=c", "t", b"user=a,b=c\x01auth=Bearer t\x01\x01"),
        # A JWT (Microsoft) is three base64url parts joined by dots.
        (
            XOAuth2(),
            "u@contoso.com",
            "eyJ0.eyJ1.c2ln",
            b"user=u@contoso.com\x01auth=Bearer eyJ0.eyJ1.c2ln\x01\x01",
        ),
    ],
)
def test_initial_response(
    mechanism: XOAuth2 | OAuthBearer, user: str, token: str, expected: bytes
) -> None:
    exchange = mechanism.start(user, token)
    assert next(exchange) == expected
    with pytest.raises(StopIteration):
        exchange.send(None)  # 235: done


@pytest.mark.parametrize(("mechanism", "dummy"), [(XOAuth2(), b""), (OAuthBearer(), b"\x01")])
def test_the_error_challenge_is_answered_with_the_dummy_response(
    mechanism: XOAuth2 | OAuthBearer, dummy: bytes
) -> None:
    exchange = mechanism.start("u@example.com", "expired")
    next(exchange)
    # RFC 7628 §3.2.2-3: the server's 334 JSON error, then the client's dummy response.
    assert exchange.send(GOOGLE_ERROR) == dummy
    with pytest.raises(AuthenticationError, match="after the exchange was complete"):
        exchange.send(b"another challenge")


@pytest.mark.parametrize("mechanism", [XOAuth2(), OAuthBearer()])
@pytest.mark.parametrize(
    ("user", "token", "match"),
    [
        ("u", "tok\x01en", "bearer token cannot contain"),
        ("u", "tok en", "bearer token cannot contain"),
        ("u", "tok\r\nen", "bearer token cannot contain"),
        ("u", "tøken", "bearer token cannot contain"),
        ("u", "", "bearer token cannot contain"),
        ("u\x01", "secret-token", "user name cannot contain"),
        ("u\r\n", "secret-token", "user name cannot contain"),
        ("u\0", "secret-token", "user name cannot contain"),
    ],
)
def test_unusable_user_names_and_tokens_are_refused_before_sending(
    mechanism: XOAuth2 | OAuthBearer, user: str, token: str, match: str
) -> None:
    with pytest.raises(AuthenticationError, match=match) as caught:
        initial(mechanism, user, token)
    if token:
        assert token not in str(caught.value)


@pytest.mark.parametrize(
    ("host", "port"),
    [("", None), ("a b", None), ("a,b", None), (None, 0), (None, 65536), (None, True)],
)
def test_oauthbearer_host_and_port_are_checked(host: str | None, port: int | None) -> None:
    with pytest.raises(ValueError, match="OAUTHBEARER"):
        OAuthBearer(host=host, port=port)


def test_bearer_mechanisms_are_chosen_only_by_name() -> None:
    offered = {"PLAIN", "LOGIN", "XOAUTH2", "OAUTHBEARER"}
    assert [m.name for m in candidate_mechanisms(offered)] == ["PLAIN", "LOGIN"]
    assert [m.name for m in candidate_mechanisms({"XOAUTH2", "OAUTHBEARER"})] == []
    named = candidate_mechanisms(offered, preferred=["oauthbearer", "XOAUTH2"])
    assert [m.name for m in named] == ["OAUTHBEARER", "XOAUTH2"]
    assert {"XOAUTH2", "OAUTHBEARER"} == BEARER_MECHANISMS
    assert set(MECHANISMS) >= BEARER_MECHANISMS


def test_no_mechanism_shows_a_token_in_its_repr() -> None:
    exchange = OAuthBearer().start("u", "secret-token")
    next(exchange)
    assert "secret-token" not in repr(OAuthBearer()) + repr(exchange)


# -- the error document ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("challenge", "expected"),
    [
        (GOOGLE_ERROR, "status=401, scope=https://mail.google.com/"),
        (
            b'{"status":"invalid_token","scope":"example_scope",'
            b'"openid-configuration":"https://example.com/.well-known/openid-configuration"}',
            "status=invalid_token, scope=example_scope",
        ),  # RFC 7628 §4.3
        (b'{"status":401}', "status=401"),
        (b'{"scope":"a b"}', "scope=a b"),
        (b'{"status":"4\\n0\\u00001"}', "status=401"),  # control characters dropped
        (b'{"status":"' + b"x" * 500 + b'"}', "status=" + "x" * 100),
        (b'{"status":true}', None),
        (b'{"status":null,"scope":["a"]}', None),
        (b'{"schemes":"bearer"}', None),
        (b"[1, 2]", None),
        (b"not json", None),
        (b"\xff\xfe", None),
        (b"", None),
        (b"[" * 10_000, None),  # too long to parse at all
        (b'{"status":"' + b"x" * MAX_OAUTH_ERROR + b'"}', None),
    ],
)
def test_oauth_error_details(challenge: bytes, expected: str | None) -> None:
    assert oauth_error_details(challenge) == expected


@given(st.binary(max_size=MAX_OAUTH_ERROR + 10))
def test_error_details_never_raise_and_stay_short_and_printable(challenge: bytes) -> None:
    details = oauth_error_details(challenge)
    if details is not None:
        assert details.isprintable()
        assert len(details) <= 2 * 100 + len("status=, scope=")


@given(
    st.dictionaries(
        st.sampled_from(["status", "scope", "schemes", "other"]),
        st.one_of(st.text(max_size=200), st.integers(), st.none(), st.booleans()),
    )
)
def test_error_details_from_any_json_object(document: dict[str, object]) -> None:
    details = oauth_error_details(json.dumps(document).encode())
    assert details is None or details.startswith(("status=", "scope="))


# -- properties --------------------------------------------------------------------------------

TOKENS = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1)
USERS = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\0\x01\r\n"),
    min_size=1,
)


def parse_oauthbearer(response: bytes) -> tuple[str, str]:
    """A reference reading of RFC 7628 §3.1 (gs2-header, kvpairs, final ^A)."""
    text = response.decode("utf-8")
    header, _, rest = text.partition("\x01")
    flag, authzid, empty = header.split(",")
    assert (flag, empty) == ("n", "")
    assert authzid.startswith("a=")
    user = authzid[2:].replace("=2C", ",").replace("=3D", "=")
    assert rest.endswith("\x01\x01")
    pairs = dict(pair.split("=", 1) for pair in rest[:-2].split("\x01"))
    assert pairs["auth"].startswith("Bearer ")
    return user, pairs["auth"].removeprefix("Bearer ")


def parse_xoauth2(response: bytes) -> tuple[str, str]:
    text = response.decode("utf-8")
    assert text.endswith("\x01\x01")
    user, auth = text[:-2].split("\x01")
    return user.removeprefix("user="), auth.removeprefix("auth=Bearer ")


@given(USERS, TOKENS)
def test_oauthbearer_round_trips_and_never_emits_cr_lf(user: str, token: str) -> None:
    response = initial(OAuthBearer(), user, token)
    assert response is not None
    assert b"\r" not in response
    assert b"\n" not in response
    assert b"\0" not in response
    assert parse_oauthbearer(response) == (user, token)


@given(USERS, TOKENS)
def test_xoauth2_round_trips_and_never_emits_cr_lf(user: str, token: str) -> None:
    response = initial(XOAuth2(), user, token)
    assert response is not None
    assert b"\r" not in response
    assert b"\n" not in response
    assert parse_xoauth2(response) == (user, token)


def usable(token: str) -> bool:
    return bool(token) and all(0x21 <= ord(c) <= 0x7E for c in token)


@given(st.sampled_from([XOAuth2(), OAuthBearer()]), USERS, st.text())
def test_any_token_is_either_sent_intact_or_refused_without_showing_it(
    mechanism: XOAuth2 | OAuthBearer, user: str, token: str
) -> None:
    if not usable(token):
        with pytest.raises(AuthenticationError) as caught:
            initial(mechanism, user, token)
        # The message is the same whatever the token: it cannot show it.
        with pytest.raises(AuthenticationError) as reference:
            initial(mechanism, user, "\x01")
        assert str(caught.value) == str(reference.value)
        return
    response = initial(mechanism, user, token)
    assert response is not None
    assert f"Bearer {token}\x01".encode() in response
    assert b"\r" not in response
    assert b"\n" not in response
