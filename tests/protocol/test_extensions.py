"""Tests for mailrelay.protocol.extensions: EHLO keywords to Extensions."""

from __future__ import annotations

import pytest

from mailrelay.protocol.extensions import Extensions


def parse(*lines: str) -> Extensions:
    return Extensions.parse(["mx.example greets you", *lines])


def test_full_modern_server() -> None:
    ext = parse(
        "PIPELINING",
        "SIZE 35882577",
        "8BITMIME",
        "SMTPUTF8",
        "STARTTLS",
        "AUTH LOGIN PLAIN XOAUTH2",
        "DSN",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
        "BINARYMIME",
        "REQUIRETLS",
    )
    assert ext.size == 35882577
    assert ext.pipelining
    assert ext.eight_bit_mime
    assert ext.smtputf8
    assert ext.starttls
    assert ext.auth == frozenset({"LOGIN", "PLAIN", "XOAUTH2"})
    assert ext.dsn
    assert ext.enhanced_status_codes
    assert ext.chunking
    assert ext.binary_mime
    assert ext.requiretls


def test_first_line_is_the_greeting_not_a_keyword() -> None:
    ext = Extensions.parse(["PIPELINING"])
    assert not ext.pipelining
    assert "PIPELINING" not in ext


def test_empty_by_default() -> None:
    ext = Extensions()
    assert ext.size is None
    assert not ext.pipelining
    assert ext.auth == frozenset()
    assert dict(ext.keywords) == {}


@pytest.mark.parametrize(
    ("line", "size", "present"),
    [
        ("SIZE 1000", 1000, True),
        ("SIZE", None, True),
        ("SIZE 0", None, True),  # RFC 1870 §4: no fixed maximum
        ("SIZE lots", None, True),
        ("SIZE \uff15", None, True),  # non-ASCII digits are not a number here
        ("SIZE " + "9" * 20, 10**20 - 1, True),
        ("SIZE " + "9" * 5000, None, True),  # over int()'s 4,300 digits: no limit, no error
        ("NOTSIZE 5", None, False),
    ],
)
def test_size(line: str, size: int | None, present: bool) -> None:
    ext = parse(line)
    assert ext.size == size
    assert ("SIZE" in ext) is present


def test_keywords_are_case_insensitive() -> None:
    ext = parse("pipelining", "Auth login Plain", "8bitmime", "starttls")
    assert ext.pipelining
    assert ext.eight_bit_mime
    assert ext.starttls
    assert ext.auth == frozenset({"LOGIN", "PLAIN"})
    assert "Pipelining" in ext
    assert "AUTH" in ext.keywords


def test_old_auth_equals_form() -> None:
    ext = parse("AUTH=LOGIN PLAIN")
    assert ext.auth == frozenset({"LOGIN", "PLAIN"})
    assert ext.keywords["AUTH"] == "LOGIN PLAIN"


def test_old_and_new_auth_forms_merge() -> None:
    ext = parse("AUTH CRAM-MD5", "AUTH=LOGIN")
    assert ext.auth == frozenset({"CRAM-MD5", "LOGIN"})
    assert ext.keywords["AUTH"] == "CRAM-MD5"


def test_unknown_keywords_are_kept_with_parameters() -> None:
    ext = parse("X-EXPS GSSAPI NTLM", "VRFY", "ETRN", "DELIVERBY 300")
    assert ext.keywords["X-EXPS"] == "GSSAPI NTLM"
    assert ext.keywords["VRFY"] == ""
    assert ext.keywords["DELIVERBY"] == "300"
    assert "x-exps" in ext


def test_malformed_lines_are_ignored() -> None:
    ext = parse("", "   ", "-BAD", "!!!", "PIPELINING")
    assert set(ext.keywords) == {"PIPELINING"}


def test_contains_rejects_non_strings() -> None:
    assert 5 not in parse("PIPELINING")


def test_equality() -> None:
    assert parse("PIPELINING", "SIZE 10") == parse("pipelining", "size 10")
    assert parse("PIPELINING") != parse("CHUNKING")
