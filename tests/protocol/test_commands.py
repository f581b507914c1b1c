"""Tests for mailrelay.protocol.commands: wire forms, validation and injection refusal."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.address import Address
from mailrelay.errors import LocalProtocolError
from mailrelay.protocol.commands import (
    Auth,
    AuthAbort,
    AuthContinue,
    Bdat,
    Command,
    Data,
    Ehlo,
    Helo,
    Lhlo,
    MailFrom,
    Noop,
    Quit,
    RcptTo,
    Rset,
    StartTLS,
    Vrfy,
    xtext_encode,
)

A = Address.parse("user@example.org")
IDN = Address.parse("user@bücher.example")
UTF8 = Address.parse("jörg@bücher.example")


@pytest.mark.parametrize(
    ("command", "wire"),
    [
        (Ehlo("client.example"), b"EHLO client.example\r\n"),
        (Ehlo(hostname="[192.0.2.1]"), b"EHLO [192.0.2.1]\r\n"),
        (Ehlo("[IPv6:2001:db8::1]"), b"EHLO [IPv6:2001:db8::1]\r\n"),
        (Helo("client.example"), b"HELO client.example\r\n"),
        (Lhlo("client.example"), b"LHLO client.example\r\n"),
        (StartTLS(), b"STARTTLS\r\n"),
        (Auth("PLAIN"), b"AUTH PLAIN\r\n"),
        (Auth("plain", b"\0u\0p"), b"AUTH PLAIN AHUAcA==\r\n"),
        (Auth("EXTERNAL", b""), b"AUTH EXTERNAL =\r\n"),
        (AuthContinue(b"secret"), b"c2VjcmV0\r\n"),
        (AuthContinue(b""), b"\r\n"),
        (AuthAbort(), b"*\r\n"),
        (MailFrom(A), b"MAIL FROM:<user@example.org>\r\n"),
        (MailFrom(None), b"MAIL FROM:<>\r\n"),
        (
            MailFrom(A, (("SIZE", "1000"), ("BODY", "8BITMIME"))),
            b"MAIL FROM:<user@example.org> SIZE=1000 BODY=8BITMIME\r\n",
        ),
        (MailFrom(A, (("SMTPUTF8", None),)), b"MAIL FROM:<user@example.org> SMTPUTF8\r\n"),
        (MailFrom(IDN), b"MAIL FROM:<user@xn--bcher-kva.example>\r\n"),
        (
            MailFrom(UTF8, (("SMTPUTF8", None),), smtputf8=True),
            "MAIL FROM:<jörg@bücher.example> SMTPUTF8\r\n".encode(),
        ),
        (RcptTo(A), b"RCPT TO:<user@example.org>\r\n"),
        (
            RcptTo(A, (("NOTIFY", "SUCCESS,FAILURE"), ("ORCPT", "rfc822;user@example.org"))),
            b"RCPT TO:<user@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;user@example.org\r\n",
        ),
        (
            RcptTo(UTF8, (("ORCPT", "utf-8;jörg@bücher.example"),), smtputf8=True),
            "RCPT TO:<jörg@bücher.example> ORCPT=utf-8;jörg@bücher.example\r\n".encode(),
        ),
        (Data(), b"DATA\r\n"),
        (Bdat(b"hello"), b"BDAT 5\r\nhello"),
        (Bdat(b"hello", True), b"BDAT 5 LAST\r\nhello"),
        (Bdat(b"", last=True), b"BDAT 0 LAST\r\n"),
        (Bdat(b"a\nb.\r\n.\r\n"), b"BDAT 9\r\na\nb.\r\n.\r\n"),  # verbatim, never stuffed
        (Rset(), b"RSET\r\n"),
        (Noop(), b"NOOP\r\n"),
        (Quit(), b"QUIT\r\n"),
        (Vrfy("postmaster"), b"VRFY postmaster\r\n"),
    ],
)
def test_wire_form(command: Command, wire: bytes) -> None:
    assert command.encode() == wire


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: Ehlo("client\r\nMAIL FROM:<x@y>"), id="ehlo-crlf"),
        pytest.param(lambda: Ehlo("client\n"), id="ehlo-lf"),
        pytest.param(lambda: Ehlo("client\0"), id="ehlo-nul"),
        pytest.param(lambda: Ehlo(""), id="ehlo-empty"),
        pytest.param(lambda: Ehlo("two words"), id="ehlo-space"),
        pytest.param(lambda: Ehlo("bücher.example"), id="ehlo-non-ascii"),
        pytest.param(lambda: Ehlo("[bad\\literal]"), id="ehlo-bad-literal"),
        pytest.param(lambda: Helo("a\rb"), id="helo-cr"),
        pytest.param(lambda: Lhlo("a\nb"), id="lhlo-lf"),
        pytest.param(lambda: Auth("PLAIN\r\nQUIT"), id="auth-crlf"),
        pytest.param(lambda: Auth("TOO-LONG-MECHANISM-NAME-X"), id="auth-too-long"),
        pytest.param(lambda: Auth("PL AIN"), id="auth-space"),
        pytest.param(lambda: Vrfy("a\r\nRSET"), id="vrfy-crlf"),
        pytest.param(lambda: Vrfy("a\0"), id="vrfy-nul"),
        pytest.param(lambda: Vrfy("  "), id="vrfy-blank"),
        pytest.param(lambda: MailFrom(A, (("SIZE", "1\r\nRCPT"),)), id="param-value-crlf"),
        pytest.param(lambda: MailFrom(A, (("SI\nZE", "1"),)), id="param-keyword-lf"),
        pytest.param(lambda: MailFrom(A, (("SIZE", "a b"),)), id="param-value-space"),
        pytest.param(lambda: MailFrom(A, (("SIZE", "a=b"),)), id="param-value-equals"),
        pytest.param(lambda: MailFrom(A, (("SIZE", ""),)), id="param-value-empty"),
        pytest.param(lambda: MailFrom(A, (("-SIZE", "1"),)), id="param-keyword-leading-dash"),
        pytest.param(lambda: MailFrom(A, (("SI_ZE", "1"),)), id="param-keyword-underscore"),
        pytest.param(lambda: MailFrom(A, (("", "1"),)), id="param-keyword-empty"),
        pytest.param(lambda: MailFrom(A, (("ENVID", "jörg"),)), id="param-utf8-without-smtputf8"),
        pytest.param(
            lambda: MailFrom(A, (("ENVID", "a\x85b"),), smtputf8=True), id="param-c1-control"
        ),
        pytest.param(lambda: RcptTo(A, (("NOTIFY", "\0"),)), id="rcpt-param-nul"),
    ],
)
def test_invalid_fields_are_local_errors(build: Callable[[], Command]) -> None:
    with pytest.raises(LocalProtocolError):
        build()


def test_utf8_parameter_value_allowed_with_smtputf8() -> None:
    mail = MailFrom(UTF8, (("ENVID", "jörg"),), smtputf8=True)
    assert mail.encode().endswith(" ENVID=jörg\r\n".encode())


def test_parameters_accept_lists() -> None:
    mail = MailFrom(A, [["SIZE", "5"]])
    assert mail.parameters == (("SIZE", "5"),)


def test_non_ascii_local_part_without_smtputf8_fails_on_encode() -> None:
    with pytest.raises(LocalProtocolError, match="SMTPUTF8"):
        MailFrom(UTF8).encode()
    with pytest.raises(LocalProtocolError, match="SMTPUTF8"):
        RcptTo(UTF8).encode()


def test_auth_repr_hides_credentials() -> None:
    assert "secret" not in repr(Auth("PLAIN", b"secret"))
    assert "c2VjcmV0" not in repr(Auth("PLAIN", b"secret"))
    assert "secret" not in repr(AuthContinue(b"secret"))


@pytest.mark.parametrize(
    ("text", "encoded"),
    [
        ("simple", "simple"),
        ("a+b=c", "a+2Bb+3Dc"),
        ("with space", "with+20space"),
        ("ü", "+C3+BC"),
        ("", ""),
    ],
)
def test_xtext(text: str, encoded: str) -> None:
    assert xtext_encode(text) == encoded


forbidden = st.sampled_from(["\r", "\n", "\0"])


@given(st.text(max_size=10), forbidden, st.text(max_size=10))
def test_cr_lf_nul_in_any_text_field_is_refused(before: str, bad: str, after: str) -> None:
    value = before + bad + after
    builders: list[Callable[[], Command]] = [
        lambda: Ehlo(value),
        lambda: Helo(value),
        lambda: Lhlo(value),
        lambda: Auth(value),
        lambda: Vrfy(value),
        lambda: MailFrom(A, (("X", value),)),
        lambda: MailFrom(A, ((value, None),)),
        lambda: RcptTo(A, (("X", value),), smtputf8=True),
    ]
    for build in builders:
        with pytest.raises(LocalProtocolError):
            build()


@given(st.text(max_size=30))
def test_valid_commands_are_one_line(text: str) -> None:
    try:
        command: Command = Vrfy(text)
    except LocalProtocolError:
        return
    wire = command.encode()
    assert wire.endswith(b"\r\n")
    assert wire.count(b"\r") == wire.count(b"\n") == 1


@pytest.mark.parametrize(
    "parameters",
    [
        pytest.param((("SIZE", ["1"]),), id="unhashable-value"),
        pytest.param((("SIZE", 1),), id="int-value"),
        pytest.param(((b"SIZE", "1"),), id="bytes-keyword"),
        pytest.param((("SIZE", "1", "2"),), id="triple"),
        pytest.param(("SIZE",), id="not-a-pair"),
    ],
)
def test_malformed_parameter_shapes_are_local_errors(parameters: object) -> None:
    with pytest.raises(LocalProtocolError):
        MailFrom(A, parameters)


def test_checked_parameters_encode_the_same_each_time() -> None:
    # Parameter checks are memoized; the second command must be identical on the wire.
    first = MailFrom(A, (("SIZE", "77"), ("RET", None))).encode()
    second = MailFrom(A, (("SIZE", "77"), ("RET", None))).encode()
    assert first == second == b"MAIL FROM:<user@example.org> SIZE=77 RET\r\n"
