"""The exception tree: builtin bases, transience, pickling, and the drawn tree."""

from __future__ import annotations

import inspect
import pickle

import pytest

from mailrelay import errors
from mailrelay.errors import (
    AuthenticationError,
    ConnectError,
    ConnectionLost,
    DeliveryError,
    DeliveryTimeout,
    InvalidAddress,
    MailRelayError,
    MessageError,
    NoRoute,
    RemoteProtocolError,
    ResolverError,
    SessionRefused,
    StoreError,
    TLSError,
)
from mailrelay.reply import Reply

ALL_ERRORS = [
    obj for _, obj in inspect.getmembers(errors, inspect.isclass) if issubclass(obj, MailRelayError)
]


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.__name__)
def test_every_error_is_drawn_in_the_module_docstring(cls: type[MailRelayError]) -> None:
    assert errors.__doc__ is not None
    assert cls.__name__ in errors.__doc__
    assert cls.__name__ in errors.__all__


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (InvalidAddress, ValueError),
        (MessageError, ValueError),
        (DeliveryTimeout, TimeoutError),
        (ConnectError, ConnectionError),
        (ConnectionLost, ConnectionError),
    ],
)
def test_errors_subclass_the_builtin_they_resemble(
    cls: type[MailRelayError], builtin: type[Exception]
) -> None:
    assert issubclass(cls, builtin)
    assert issubclass(cls, MailRelayError)


def _samples() -> list[MailRelayError]:
    return [
        InvalidAddress("bad address", address="a b@c"),
        MessageError("CR in header"),
        RemoteProtocolError("junk"),
        ResolverError("timed out", name="example.test", is_transient=True),
        DeliveryError("boom"),
        ConnectError("refused", host="127.0.0.1:25"),
        DeliveryTimeout("greeting", host="[::1]:25"),
        TLSError("bad cert"),
        AuthenticationError("535", reply=Reply.of(535, "5.7.8 no")),
        SessionRefused("421", reply=Reply.of(421, "4.3.2 shutting down")),
        NoRoute("null MX"),
        StoreError("the SQLite store could not store a message: database or disk is full"),
        StoreError("the SQLite store could not open the database", is_transient=False),
    ]


@pytest.mark.parametrize("exc", _samples(), ids=lambda e: type(e).__name__)
def test_errors_pickle_and_unpickle_equal(exc: MailRelayError) -> None:
    clone = pickle.loads(pickle.dumps(exc))
    assert type(clone) is type(exc)
    assert clone == exc
    assert str(clone) == str(exc)
    assert clone.__dict__ == exc.__dict__


def test_errors_compare_by_content() -> None:
    assert DeliveryError("x", host="a") != DeliveryError("x", host="b")
    assert DeliveryError("x") != ConnectError("x")
    assert hash(DeliveryError("x")) == hash(DeliveryError("x"))


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (ConnectError("x"), True),
        (DeliveryTimeout("x"), True),
        (ConnectionLost("x"), True),
        (TLSError("x"), False),
        (AuthenticationError("x"), False),
        (NoRoute("x"), False),
        (SessionRefused("x", reply=Reply.of(421, "bye")), True),
        (SessionRefused("x", reply=Reply.of(554, "go away")), False),
        (NoRoute("x", is_transient=True), True),
    ],
)
def test_transience(exc: DeliveryError, transient: bool) -> None:
    assert exc.is_transient is transient
