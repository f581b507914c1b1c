"""A refused AUTH with a renewable password (an OAuth 2.0 token) in the dialogue: the session
stays open for one retry, and never carries mail while the refusal stands."""

from __future__ import annotations

import base64

import pytest

from mailrelay.errors import AuthenticationError, LocalProtocolError
from mailrelay.flow import Session, Step
from tests.test_flow import GREETING, OK, Driver, config, ehlo, envelope, lines, message

EHLO_AUTH = ehlo("PIPELINING", "AUTH PLAIN XOAUTH2", "ENHANCEDSTATUSCODES")
REFUSED = lines(535, "5.7.8 Username and Password not accepted")
ACCEPTED = lines(235, "2.7.0 Accepted")
BYE = lines(221, "2.0.0 bye")


def renewable_session(*turns: bytes, renewable: bool = True) -> tuple[Session, Driver]:
    session = Session(
        config(
            username="alice@example.org",
            password="old-token",
            password_renewable=renewable,
            allow_insecure_auth=True,
            auth_mechanisms=["PLAIN"],
        )
    )
    return session, Driver([GREETING, EHLO_AUTH, *turns])


def auth_lines(driver: Driver) -> list[bytes]:
    return [w.data for w in driver.writes if w.data.startswith(b"AUTH")]


def plain(password: str) -> bytes:
    return base64.b64encode(f"\0alice@example.org\0{password}".encode())


def test_a_renewable_refusal_leaves_the_session_open_for_one_retry() -> None:
    session, driver = renewable_session(REFUSED, ACCEPTED)
    driver.run(session.open())
    assert isinstance(session.auth_refusal, AuthenticationError)
    assert not session.closed
    assert not session.authenticated
    driver.run(session.retry_authentication("new-token"))
    assert session.authenticated
    assert session.auth_refusal is None
    assert auth_lines(driver) == [
        b"AUTH PLAIN " + plain("old-token") + b"\r\n",
        b"AUTH PLAIN " + plain("new-token") + b"\r\n",
    ]


def test_a_second_refusal_raises_no_third_try() -> None:
    session, driver = renewable_session(REFUSED, REFUSED, BYE)
    driver.run(session.open())
    with pytest.raises(AuthenticationError):
        driver.run(session.retry_authentication("new-token"))
    assert len(auth_lines(driver)) == 2
    assert session.closed


def test_nothing_new_to_try_quits_and_raises_the_refusal() -> None:
    session, driver = renewable_session(REFUSED, BYE)
    driver.run(session.open())
    refusal = session.auth_refusal
    with pytest.raises(AuthenticationError) as info:
        driver.run(session.retry_authentication(None))
    assert info.value is refusal
    assert driver.writes[-1].data == b"QUIT\r\n"
    assert session.closed


@pytest.mark.parametrize("step", ["deliver", "deliver_many", "probe"])
def test_no_mail_while_the_refusal_stands(step: str) -> None:
    # A caller that forgets retry_authentication must not send unauthenticated mail.
    session, driver = renewable_session(REFUSED, OK)
    driver.run(session.open())
    written = len(driver.writes)
    dialogue: Step[object]
    if step == "deliver":
        dialogue = session.deliver(message(), envelope())
    elif step == "deliver_many":
        dialogue = session.deliver_many([(message(), envelope())])
    else:
        dialogue = session.probe(None, [envelope().recipients[0].address])
    with pytest.raises(AuthenticationError):
        driver.run(dialogue)
    assert driver.writes[written:] == []


def test_without_a_renewable_password_the_refusal_raises_at_once() -> None:
    session, driver = renewable_session(REFUSED, BYE, renewable=False)
    with pytest.raises(AuthenticationError):
        driver.run(session.open())
    assert session.auth_refusal is None
    assert session.closed


def test_retry_without_a_refusal_is_a_local_error() -> None:
    session, driver = renewable_session(ACCEPTED)
    driver.run(session.open())
    assert session.authenticated
    with pytest.raises(LocalProtocolError):
        driver.run(session.retry_authentication("new-token"))
