"""Review of the AUTH retry in the dialogue: the server hanging up around the retry.

What must hold: ``retry_authentication`` raises only the library's errors (never the
dialogue's internal signal for a closed session), and leaves the session closed.
"""

from __future__ import annotations

import pytest

from mailrelay.errors import AuthenticationError, ConnectionLost, DeliveryError, SessionRefused
from tests.test_flow import lines
from tests.test_flow_auth_retry import REFUSED, renewable_session


@pytest.mark.parametrize(
    ("after", "expected"),
    [
        (b"", ConnectionLost),  # the end of the connection instead of the retry's reply
        (lines(421, "4.7.0 too many failures"), SessionRefused),
    ],
)
def test_the_server_hanging_up_on_the_retry_is_a_delivery_error(
    after: bytes, expected: type[DeliveryError]
) -> None:
    session, driver = renewable_session(REFUSED, after)
    driver.run(session.open())
    assert session.auth_refusal is not None
    with pytest.raises(expected):
        driver.run(session.retry_authentication("new-token"))
    assert session.closed


def test_a_refusal_then_a_421_raises_the_refusal() -> None:
    # The server refuses the token and says goodbye with it: no retry is possible on this
    # connection, and the news is the refusal, as it is for a password that is not
    # renewable (not SessionRefused, which reads as a server in trouble). (An end of file
    # after the refusal is seen only by the retry: ConnectionLost, tested above.)
    session, driver = renewable_session(REFUSED + lines(421, "4.7.0 too many failures"))
    with pytest.raises(AuthenticationError) as info:
        driver.run(session.open())
    assert info.value.reply is not None
    assert info.value.reply.code == 535
    assert session.closed
    assert session.auth_refusal is None
    with pytest.raises(ConnectionLost):
        driver.run(session.retry_authentication("new-token"))


@pytest.mark.parametrize("after", [b"", lines(421, "4.7.0 too many failures")])
def test_a_password_that_is_not_renewable_gets_the_same_error(after: bytes) -> None:
    session, driver = renewable_session(REFUSED + after, renewable=False)
    with pytest.raises(AuthenticationError):
        driver.run(session.open())
