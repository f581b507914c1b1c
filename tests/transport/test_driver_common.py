"""The pieces the blocking and asyncio drivers share: error texts and write coalescing."""

from __future__ import annotations

import socket
import ssl

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.errors import ConnectError, ConnectionLost, TLSError
from mailrelay.flow import Write
from mailrelay.transport.driver_common import (
    WriteQueue,
    all_addresses_failed,
    attempt_failure,
    before_greeting,
    closed_error,
    implicit_tls_error,
    probe_context,
    resolve_error,
)


@pytest.mark.parametrize(
    ("errno", "transient"),
    [(socket.EAI_NONAME, False), (socket.EAI_AGAIN, True), (socket.EAI_FAIL, True)],
)
def test_resolve_error(errno: int, transient: bool) -> None:
    error = resolve_error(socket.gaierror(errno, "resolver says no"), "mx.example", "mx.example:25")
    assert isinstance(error, ConnectError)
    assert error.is_transient is transient
    assert error.host == "mx.example:25"
    assert str(error) == "cannot resolve 'mx.example': resolver says no"


@pytest.mark.parametrize(
    ("address", "exc", "text"),
    [
        (("127.0.0.1", 25), TimeoutError(), "127.0.0.1:25: timed out"),
        (
            ("::1", 25, 0, 0),
            ConnectionRefusedError(111, "Connection refused"),
            "[::1]:25: Connection refused",
        ),
        (("127.0.0.1", 2525), OSError("no route"), "127.0.0.1:2525: no route"),
    ],
)
def test_attempt_failure(address: tuple[object, ...], exc: BaseException, text: str) -> None:
    assert attempt_failure(address, exc) == text


def test_all_addresses_failed_lists_every_attempt() -> None:
    error = all_addresses_failed("mx.example:25", ["a: timed out", "b: refused"])
    assert str(error) == "could not connect to mx.example:25 (a: timed out; b: refused)"
    assert error.host == "mx.example:25"


def test_closed_and_implicit_tls_errors() -> None:
    closed = closed_error("mx.example:25")
    assert isinstance(closed, ConnectionLost)
    assert str(closed) == "the connection to mx.example:25 is closed"
    tls = implicit_tls_error("mx.example:587")
    assert isinstance(tls, TLSError)
    assert not tls.is_transient
    assert str(tls).startswith("no SMTP greeting from mx.example:587")
    assert str(tls).endswith("use TLS.IMPLICIT")


@pytest.mark.parametrize(
    ("received", "phase", "implicit", "probe"),
    [
        (0, "greeting", False, True),
        (1, "greeting", False, False),
        (0, "ehlo", False, False),
        (0, "greeting", True, False),
    ],
)
def test_before_greeting(received: int, phase: str, implicit: bool, probe: bool) -> None:
    assert before_greeting(received, phase, implicit) is probe


def test_probe_context_checks_nothing() -> None:
    context = probe_context()
    assert not context.check_hostname
    assert context.verify_mode is ssl.CERT_NONE


def test_write_queue_asks_for_a_flush_at_the_limit() -> None:
    queue = WriteQueue(10)
    assert not queue.add(Write(data=b"MAIL\r\n", phase="mail"))
    assert queue.add(Write(data=b"RCPT\r\n", phase="rcpt"))
    assert queue.phase == "rcpt"
    assert queue.take() == b"MAIL\r\nRCPT\r\n"
    assert not queue.chunks
    assert not queue.add(
        Write(data=b"DATA\r\n", phase="data")
    )  # the size starts again after take()
    queue.clear()
    assert not queue.chunks


def test_write_queue_asks_for_a_flush_when_a_write_does() -> None:
    queue = WriteQueue(1 << 20)
    assert not queue.add(Write(data=b"data\r\n.\r\n", phase="data_block"))
    assert queue.add(Write(data=b"MAIL FROM:<>\r\n", phase="mail", flush=True))
    assert queue.take() == b"data\r\n.\r\nMAIL FROM:<>\r\n"  # with what was held before it


@given(st.lists(st.binary(min_size=1, max_size=50), min_size=1, max_size=20))
def test_write_queue_keeps_bytes_in_order(pieces: list[bytes]) -> None:
    queue = WriteQueue(1 << 20)
    for piece in pieces:
        queue.add(Write(data=piece, phase="data"))
    assert queue.take() == b"".join(pieces)
    assert queue.chunks == []
