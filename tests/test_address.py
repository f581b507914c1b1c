"""Address: RFC 5321 §4.1.2 envelope addresses with RFC 6531 and IDNA 2008."""

from __future__ import annotations

import pickle
import string
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import NamedTuple

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.address import Address, _parse, _render_local
from mailrelay.errors import InvalidAddress

ATEXT_SPECIALS = "!#$%&'*+-/=?^_`{|}~"
ATEXT = string.ascii_letters + string.digits + ATEXT_SPECIALS
LOCAL_64 = "l" * 64
# 63 + 1 + 63 + 1 + 61 = 189 octets; with a 64-octet local part and "@": 254.
DOMAIN_189 = "a" * 63 + "." + "b" * 63 + "." + "c" * 61


class Accepted(NamedTuple):
    text: str
    local_part: str
    domain: str
    ascii_domain: str
    canonical: str


ACCEPT = [
    pytest.param(
        Accepted("user@example.com", "user", "example.com", "example.com", "user@example.com"),
        id="plain",
    ),
    pytest.param(
        Accepted(
            "first.last@example.com",
            "first.last",
            "example.com",
            "example.com",
            "first.last@example.com",
        ),
        id="dotted",
    ),
    pytest.param(
        Accepted(
            "user+tag@example.com", "user+tag", "example.com", "example.com", "user+tag@example.com"
        ),
        id="plus-tag",
    ),
    pytest.param(
        Accepted(
            f"Az09{ATEXT_SPECIALS}@example.com",
            f"Az09{ATEXT_SPECIALS}",
            "example.com",
            "example.com",
            f"Az09{ATEXT_SPECIALS}@example.com",
        ),
        id="every-atext-character",
    ),
    pytest.param(
        Accepted(
            "Jo.Doe@Example.COM", "Jo.Doe", "example.com", "example.com", "Jo.Doe@example.com"
        ),
        id="domain-lowercased-local-case-kept",
    ),
    pytest.param(
        Accepted(
            "postmaster@localhost", "postmaster", "localhost", "localhost", "postmaster@localhost"
        ),
        id="single-label-domain",
    ),
    pytest.param(
        Accepted("a@123.example", "a", "123.example", "123.example", "a@123.example"),
        id="numeric-label-below-tld",
    ),
    pytest.param(
        Accepted("a@c--n.com", "a", "c--n.com", "c--n.com", "a@c--n.com"),
        id="double-hyphen-inside-label",
    ),
    pytest.param(
        Accepted(
            "a@" + "b" * 63 + ".com",
            "a",
            "b" * 63 + ".com",
            "b" * 63 + ".com",
            "a@" + "b" * 63 + ".com",
        ),
        id="label-of-63-octets",
    ),
    pytest.param(
        Accepted(LOCAL_64 + "@x.org", LOCAL_64, "x.org", "x.org", LOCAL_64 + "@x.org"),
        id="local-part-of-64-octets",
    ),
    pytest.param(
        Accepted(
            f"{LOCAL_64}@{DOMAIN_189}", LOCAL_64, DOMAIN_189, DOMAIN_189, f"{LOCAL_64}@{DOMAIN_189}"
        ),
        id="address-of-254-octets",
    ),
    pytest.param(
        Accepted('"joe"@example.com', "joe", "example.com", "example.com", "joe@example.com"),
        id="needless-quotes-removed",
    ),
    pytest.param(
        Accepted('"a.b"@x.org', "a.b", "x.org", "x.org", "a.b@x.org"),
        id="quoted-dot-string-unquoted",
    ),
    pytest.param(
        Accepted('"jo doe"@x.org', "jo doe", "x.org", "x.org", '"jo doe"@x.org'),
        id="quoted-space-kept-quoted",
    ),
    pytest.param(
        Accepted('"a..b"@x.org', "a..b", "x.org", "x.org", '"a..b"@x.org'),
        id="quoted-double-dot",
    ),
    pytest.param(
        Accepted('".a"@x.org', ".a", "x.org", "x.org", '".a"@x.org'),
        id="quoted-leading-dot",
    ),
    pytest.param(
        Accepted('"a@b"@x.org', "a@b", "x.org", "x.org", '"a@b"@x.org'),
        id="quoted-at-sign",
    ),
    pytest.param(
        Accepted('""@x.org', "", "x.org", "x.org", '""@x.org'),
        id="quoted-empty-local-part",
    ),
    pytest.param(
        Accepted('"\\a"@x.org', "a", "x.org", "x.org", "a@x.org"),
        id="needless-quoted-pair-removed",
    ),
    pytest.param(
        Accepted('"a\\"b"@x.org', 'a"b', "x.org", "x.org", '"a\\"b"@x.org'),
        id="quoted-pair-dquote",
    ),
    pytest.param(
        Accepted('"a\\\\b"@x.org', "a\\b", "x.org", "x.org", '"a\\\\b"@x.org'),
        id="quoted-pair-backslash",
    ),
    pytest.param(
        Accepted('"a\\ b"@x.org', "a b", "x.org", "x.org", '"a b"@x.org'),
        id="quoted-pair-space",
    ),
    pytest.param(
        Accepted('"(x)[y],z;"@x.org', "(x)[y],z;", "x.org", "x.org", '"(x)[y],z;"@x.org'),
        id="quoted-specials",
    ),
    pytest.param(
        Accepted(
            "δοκιμή@example.com", "δοκιμή", "example.com", "example.com", "δοκιμή@example.com"
        ),
        id="utf8-local-part",
    ),
    pytest.param(
        Accepted('"δοκ ιμή"@x.org', "δοκ ιμή", "x.org", "x.org", '"δοκ ιμή"@x.org'),
        id="utf8-quoted-local-part",
    ),
    pytest.param(
        Accepted("Ünïcödé@x.org", "Ünïcödé", "x.org", "x.org", "Ünïcödé@x.org"),
        id="utf8-local-case-kept",
    ),
    pytest.param(
        Accepted("e\u0301@x.org", "\u00e9", "x.org", "x.org", "\u00e9@x.org"),
        id="local-part-nfc",
    ),
    pytest.param(
        Accepted("a\u200db@x.org", "a\u200db", "x.org", "x.org", "a\u200db@x.org"),
        id="zero-width-joiner",
    ),
    pytest.param(
        Accepted("user@bücher.de", "user", "bücher.de", "xn--bcher-kva.de", "user@bücher.de"),
        id="u-label-domain",
    ),
    pytest.param(
        Accepted("user@BÜCHER.DE", "user", "bücher.de", "xn--bcher-kva.de", "user@bücher.de"),
        id="u-label-domain-lowercased",
    ),
    pytest.param(
        Accepted("user@bu\u0308cher.de", "user", "bücher.de", "xn--bcher-kva.de", "user@bücher.de"),
        id="u-label-domain-nfc",
    ),
    pytest.param(
        Accepted(
            "user@xn--bcher-kva.de", "user", "bücher.de", "xn--bcher-kva.de", "user@bücher.de"
        ),
        id="a-label-decoded",
    ),
    pytest.param(
        Accepted(
            "user@XN--BCHER-KVA.DE", "user", "bücher.de", "xn--bcher-kva.de", "user@bücher.de"
        ),
        id="a-label-uppercase",
    ),
    pytest.param(
        Accepted(
            "δοκιμή@παράδειγμα.δοκιμή",
            "δοκιμή",
            "παράδειγμα.δοκιμή",
            "xn--hxajbheg2az3al.xn--jxalpdlp",
            "δοκιμή@παράδειγμα.δοκιμή",
        ),
        id="utf8-everywhere",
    ),
    pytest.param(
        Accepted("u@xn--0be.com", "u", "\u13e1.com", "xn--0be.com", "u@\u13e1.com"),
        id="u-label-with-pvalid-capital",
    ),
    pytest.param(
        Accepted("a@[192.0.2.1]", "a", "[192.0.2.1]", "[192.0.2.1]", "a@[192.0.2.1]"),
        id="ipv4-literal",
    ),
    pytest.param(
        Accepted(
            "a@[IPv6:2001:DB8:0:0:0:0:0:1]",
            "a",
            "[IPv6:2001:db8::1]",
            "[IPv6:2001:db8::1]",
            "a@[IPv6:2001:db8::1]",
        ),
        id="ipv6-literal-full-compressed",
    ),
    pytest.param(
        Accepted(
            "a@[ipv6:2001:db8::1]",
            "a",
            "[IPv6:2001:db8::1]",
            "[IPv6:2001:db8::1]",
            "a@[IPv6:2001:db8::1]",
        ),
        id="ipv6-tag-any-case",
    ),
    pytest.param(
        Accepted("a@[IPv6:::]", "a", "[IPv6:::]", "[IPv6:::]", "a@[IPv6:::]"),
        id="ipv6-unspecified",
    ),
    pytest.param(
        Accepted(
            "a@[IPv6:1:2:3:4:5::8]",
            "a",
            "[IPv6:1:2:3:4:5::8]",
            "[IPv6:1:2:3:4:5::8]",
            "a@[IPv6:1:2:3:4:5::8]",
        ),
        id="ipv6-double-colon-for-two-groups",
    ),
    pytest.param(
        Accepted(
            "a@[IPv6:1:2:3:4:5:6:1.2.3.4]",
            "a",
            "[IPv6:1:2:3:4:5:6:102:304]",
            "[IPv6:1:2:3:4:5:6:102:304]",
            "a@[IPv6:1:2:3:4:5:6:102:304]",
        ),
        id="ipv6v4-full",
    ),
    pytest.param(
        Accepted(
            "a@[IPv6:1::1.2.3.4]",
            "a",
            "[IPv6:1::102:304]",
            "[IPv6:1::102:304]",
            "a@[IPv6:1::102:304]",
        ),
        id="ipv6v4-compressed",
    ),
    pytest.param(
        Accepted(
            "a@[IPv6:::FFFF:192.0.2.1]",
            "a",
            "[IPv6:::ffff:192.0.2.1]",
            "[IPv6:::ffff:192.0.2.1]",
            "a@[IPv6:::ffff:192.0.2.1]",
        ),
        id="ipv6-ipv4-mapped-dotted",
    ),
]


@pytest.mark.parametrize("case", ACCEPT)
def test_parse_accepts(case: Accepted) -> None:
    address = Address.parse(case.text)
    assert address.local_part == case.local_part
    assert address.domain == case.domain
    assert address.ascii_domain == case.ascii_domain
    assert address.needs_smtputf8 == (not case.local_part.isascii())
    assert address.is_literal == case.domain.startswith("[")
    assert str(address) == case.canonical
    assert Address.parse(case.canonical) == address


REJECT = [
    pytest.param("", "the address is empty", id="empty"),
    pytest.param("user", "there is no '@'", id="no-at"),
    pytest.param("@example.com", "local part is missing", id="no-local-part"),
    pytest.param("user@", "domain is missing", id="no-domain"),
    pytest.param("a@b@x.org", "more than one '@'", id="two-at-signs"),
    pytest.param(".a@x.org", "local part starts with a dot", id="local-leading-dot"),
    pytest.param("a.@x.org", "local part ends with a dot", id="local-trailing-dot"),
    pytest.param("a..b@x.org", "two dots in a row", id="local-double-dot"),
    pytest.param("a@example.com.", "domain ends with a dot", id="domain-trailing-dot"),
    pytest.param("a@.example.com", "domain starts with a dot", id="domain-leading-dot"),
    pytest.param("a@example..com", "two dots in a row", id="domain-double-dot"),
    pytest.param("a@-x.com", "starts with a hyphen", id="label-leading-hyphen"),
    pytest.param("a@x-.com", "ends with a hyphen", id="label-trailing-hyphen"),
    pytest.param("a@ex_ample.com", "'_' is not allowed in a domain", id="domain-underscore"),
    pytest.param("a@exa!mple.com", "'!' is not allowed in a domain", id="domain-punctuation"),
    pytest.param("a@192.0.2.1", "top-level domain is all digits", id="numeric-tld"),
    pytest.param("a@" + "b" * 64 + ".com", "64 octets long, more than 63", id="label-too-long"),
    pytest.param("a" * 65 + "@x.org", "local part is 65 octets", id="local-too-long"),
    pytest.param("é" * 33 + "@x.org", "local part is 66 octets", id="utf8-local-too-long"),
    pytest.param(
        '"' + "a" * 63 + '"@x.org', "local part is 65 octets", id="quoted-local-too-long-as-written"
    ),
    pytest.param(f"{LOCAL_64}@{DOMAIN_189}x", "address is 255 octets", id="address-too-long"),
    pytest.param("a@" + "ü" * 60 + ".de", "too long", id="a-label-too-long"),
    pytest.param("a\r@x.org", "CR and LF", id="cr"),
    pytest.param("a@x.org\n", "CR and LF", id="lf"),
    pytest.param("a@x.org\r\nRCPT TO:<b@y.org>", "CR and LF", id="crlf-injection"),
    pytest.param('"a\r\nb"@x.org', "CR and LF", id="crlf-in-quotes"),
    pytest.param("a\r\n @x.org", "CR and LF", id="folding-whitespace"),
    pytest.param("a\x00@x.org", "U+0000", id="nul"),
    pytest.param('"a\x00"@x.org', "U+0000", id="nul-in-quotes"),
    pytest.param("a\t@x.org", "U+0009", id="tab"),
    pytest.param("a\x7f@x.org", "U+007F", id="del"),
    pytest.param("a\x85@x.org", "U+0085", id="c1-control"),
    pytest.param('"a\\\x07"@x.org', "U+0007", id="quoted-pair-control"),
    pytest.param('"a\\é"@x.org', "may only escape printable ASCII", id="quoted-pair-non-ascii"),
    pytest.param("a\ud800@x.org", "lone surrogate", id="lone-surrogate"),
    pytest.param("a b@x.org", "unquoted space in the local part", id="unquoted-space"),
    pytest.param("a\u00a0b@x.org", "unquoted space in the local part", id="unquoted-nbsp"),
    pytest.param("a@x .org", "unquoted space in the domain", id="space-in-domain"),
    pytest.param(" a@x.org", "leading or trailing whitespace", id="leading-space"),
    pytest.param("a@x.org ", "leading or trailing whitespace", id="trailing-space"),
    pytest.param("<a@x.org>", "'<' and '>'", id="angle-brackets"),
    pytest.param("a<b@x.org", "'<' and '>'", id="angle-in-local-part"),
    pytest.param("a@x>y.org", "'<' and '>'", id="angle-in-domain"),
    pytest.param('"a>b"@x.org', "'<' and '>'", id="angle-in-quotes"),
    pytest.param("a(comment)@x.org", "comments are not allowed", id="comment-in-local-part"),
    pytest.param("(c)a@x.org", "comments are not allowed", id="leading-comment"),
    pytest.param("a@x.org(comment)", "comments are not allowed", id="comment-after-domain"),
    pytest.param('"a" @x.org', "comments and whitespace", id="space-after-quoted"),
    pytest.param(
        '"a".b@x.org', "quoted string must be the whole local part", id="quoted-then-atom"
    ),
    pytest.param(
        'a."b"@x.org', "quoted string must be the whole local part", id="atom-then-quoted"
    ),
    pytest.param('"ab@x.org', "no closing quote", id="unclosed-quote"),
    pytest.param('"ab\\', "no closing quote", id="backslash-at-end"),
    pytest.param('"a"b@x.org', "unexpected 'b'", id="text-after-quoted"),
    pytest.param('"a"', "no '@' and domain", id="quoted-without-domain"),
    pytest.param("a\\b@x.org", "must be quoted", id="unquoted-backslash"),
    pytest.param("a,b@x.org", "must be quoted", id="unquoted-comma"),
    pytest.param("a\u200b@x.org", "U+200B", id="zero-width-space"),
    pytest.param("a\u202e@x.org", "U+202E", id="bidi-override"),
    pytest.param("a\ue000@x.org", "U+E000", id="private-use"),
    pytest.param("a@xn--example.com", "internationalized domain label", id="invalid-a-label"),
    pytest.param("a@ex\u2764ample.com", "internationalized domain label", id="disallowed-idn"),
    pytest.param("a@bücher\u3002de", "internationalized domain label", id="ideographic-dot"),
    pytest.param("a@bü_cher.de", "'_' is not allowed in a domain", id="idn-underscore"),
    pytest.param("a@[192.0.2.1", "no closing ']'", id="literal-unclosed"),
    pytest.param("a@[192.0.2.1]x", "text follows the address literal", id="literal-trailing-text"),
    pytest.param("a@[192.0.2.256]", "not a valid IPv4 address", id="ipv4-octet-too-big"),
    pytest.param("a@[192.0.2.01]", "not a valid IPv4 address", id="ipv4-leading-zero"),
    pytest.param("a@[192.0.2]", "must be an IPv4 address like", id="ipv4-three-parts"),
    pytest.param("a@[2001:db8::1]", "needs the tag", id="ipv6-without-tag"),
    pytest.param("a@[x-tag:content]", "general address literals", id="general-literal"),
    pytest.param("a@[IPv6:fe80::1%eth0]", "hex digits", id="ipv6-zone-index"),
    pytest.param(
        "a@[IPv6:1:2:3:4:5:6::8]", "at least two zero groups", id="ipv6-double-colon-one-group"
    ),
    pytest.param("a@[IPv6:1::2::3]", "only once", id="ipv6-two-double-colons"),
    pytest.param("a@[IPv6:1:2:3:4:5:6:7]", "exactly 8 groups", id="ipv6-seven-groups"),
    pytest.param("a@[IPv6:1:2:3:4:5:6:7:8:9]", "exactly 8 groups", id="ipv6-nine-groups"),
    pytest.param("a@[IPv6:1:2:3:4:5:6:7:g]", "hex digits", id="ipv6-bad-hex"),
    pytest.param("a@[IPv6:12345::1]", "hex digits", id="ipv6-five-digit-group"),
    pytest.param("a@[IPv6::1:2:3:4:5:6:7]", "hex digits", id="ipv6-leading-single-colon"),
    pytest.param("a@[IPv6:1:2:3:4:5:6:7:]", "hex digits", id="ipv6-trailing-single-colon"),
    pytest.param("a@[IPv6:1:2:3:4:5:6:7:1.2.3.4]", "exactly 8 groups", id="ipv6v4-too-many-groups"),
    pytest.param("a@[IPv6:::1.2.3.256]", "not a valid IPv4 address", id="ipv6v4-bad-ipv4"),
    pytest.param("a@[IPv6:]", "exactly 8 groups", id="ipv6-empty"),
]


@pytest.mark.parametrize(("text", "problem"), REJECT)
def test_parse_rejects(text: str, problem: str) -> None:
    with pytest.raises(InvalidAddress) as info:
        Address.parse(text)
    assert problem in str(info.value)
    assert info.value.address == text


def test_invalid_address_is_a_value_error_that_pickles() -> None:
    with pytest.raises(ValueError, match="there is no '@'") as info:
        Address.parse("nobody")
    error = info.value
    assert isinstance(error, InvalidAddress)
    assert pickle.loads(pickle.dumps(error)) == error


def test_parse_refuses_non_str() -> None:
    with pytest.raises(TypeError, match="needs a str"):
        Address.parse(b"a@example.com")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param("User@EXAMPLE.com", "User@example.com", id="domain-case"),
        pytest.param('"joe"@x.org', "joe@x.org", id="needless-quotes"),
        pytest.param("user@xn--bcher-kva.de", "user@BÜCHER.de", id="a-label-vs-u-label"),
        pytest.param("e\u0301@x.org", "\u00e9@x.org", id="nfd-vs-nfc"),
        pytest.param("a@[IPv6:2001:db8:0:0:0:0:0:1]", "a@[IPv6:2001:DB8::1]", id="ipv6-forms"),
    ],
)
def test_equal_after_normalization(first: str, second: str) -> None:
    a, b = Address.parse(first), Address.parse(second)
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b}) == 1


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param("User@example.com", "user@example.com", id="local-part-case"),
        pytest.param("a@[192.0.2.1]", "a@[IPv6:::ffff:192.0.2.1]", id="ipv4-vs-mapped"),
    ],
)
def test_distinct_addresses_differ(first: str, second: str) -> None:
    assert Address.parse(first) != Address.parse(second)


@pytest.mark.parametrize(
    ("text", "with_smtputf8", "without_smtputf8"),
    [
        pytest.param("a@example.com", "a@example.com", "a@example.com", id="ascii"),
        pytest.param("a@bücher.de", "a@bücher.de", "a@xn--bcher-kva.de", id="idn-domain"),
        pytest.param('"a b"@x.org', '"a b"@x.org', '"a b"@x.org', id="quoted"),
        pytest.param("a@[IPv6:::1]", "a@[IPv6:::1]", "a@[IPv6:::1]", id="literal"),
    ],
)
def test_smtp_path(text: str, with_smtputf8: str, without_smtputf8: str) -> None:
    address = Address.parse(text)
    assert address.smtp_path(smtputf8=True) == with_smtputf8
    assert address.smtp_path(smtputf8=False) == without_smtputf8


def test_smtp_path_refuses_utf8_local_part_without_smtputf8() -> None:
    address = Address.parse("δοκιμή@bücher.de")
    assert address.needs_smtputf8
    assert address.smtp_path(smtputf8=True) == "δοκιμή@bücher.de"
    with pytest.raises(InvalidAddress, match="SMTPUTF8") as info:
        address.smtp_path(smtputf8=False)
    assert info.value.address == "δοκιμή@bücher.de"


def test_constructor_takes_normalized_parts() -> None:
    address = Address(local_part="jo doe", domain="bücher.de")
    assert address == Address.parse('"jo doe"@xn--bcher-kva.de')
    assert address.ascii_domain == "xn--bcher-kva.de"
    assert not address.needs_smtputf8
    assert str(address) == '"jo doe"@bücher.de'


@pytest.mark.parametrize(
    ("local_part", "domain", "problem"),
    [
        pytest.param("a", "Example.com", "expected 'example.com'", id="domain-uppercase"),
        pytest.param("a", "xn--bcher-kva.de", "expected 'bücher.de'", id="domain-a-label"),
        pytest.param("a", "[IPv6:0::1]", "expected '[IPv6:::1]'", id="literal-not-compressed"),
        pytest.param("e\u0301", "x.org", "not NFC", id="local-part-nfd"),
        pytest.param("a\r\n", "x.org", "U+000D", id="local-part-crlf"),
        pytest.param("a", "x.org\r\n", "U+000D", id="domain-crlf"),
        pytest.param("a>", "x.org", "'<' and '>'", id="local-part-angle"),
        pytest.param("a" * 65, "x.org", "65 octets", id="local-part-too-long"),
        pytest.param("a", "x..org", "two dots", id="domain-invalid"),
        pytest.param("a", "", "domain is missing", id="domain-empty"),
    ],
)
def test_constructor_refuses_bad_parts(local_part: str, domain: str, problem: str) -> None:
    with pytest.raises(InvalidAddress, match="invalid address parts") as info:
        Address(local_part=local_part, domain=domain)
    assert problem in str(info.value)


def test_constructor_refuses_non_str() -> None:
    with pytest.raises(TypeError, match="needs str values"):
        Address(local_part=b"a", domain="x.org")  # type: ignore[arg-type]


def test_evolve_validates_and_instances_are_frozen() -> None:
    address = Address.parse("a@example.com")
    assert attrs.evolve(address, local_part="b") == Address.parse("b@example.com")
    with pytest.raises(InvalidAddress):
        attrs.evolve(address, local_part="b\r\nDATA")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        address.local_part = "c"  # type: ignore[misc]


def test_pickle_round_trip() -> None:
    address = Address.parse("δοκιμή@παράδειγμα.δοκιμή")
    copy = pickle.loads(pickle.dumps(address))
    assert copy == address
    assert copy.ascii_domain == address.ascii_domain
    assert copy.needs_smtputf8


# --- Hypothesis properties -------------------------------------------------

UNICODE_LETTERS = "éßñøÄ日本語δ"
atoms = st.text(alphabet=ATEXT + UNICODE_LETTERS, min_size=1, max_size=6)
dot_strings = st.lists(atoms, min_size=1, max_size=3).map(".".join)
QUOTABLE = "".join(chr(c) for c in range(32, 127) if chr(c) not in "<>") + UNICODE_LETTERS


@st.composite
def quoted_strings(draw: st.DrawFn) -> str:
    """A quoted local part, with some needless quoted pairs thrown in."""
    chars = draw(st.lists(st.tuples(st.sampled_from(QUOTABLE), st.booleans()), max_size=20))
    out = []
    for ch, escape in chars:
        # RFC 5321 §4.1.2: '"' and '\' must be escaped, other ASCII may be.
        must = ch in '"\\'
        out.append("\\" + ch if must or (escape and ch.isascii()) else ch)
    return '"' + "".join(out) + '"'


ldh_labels = st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,8}[a-zA-Z0-9])?", fullmatch=True).filter(
    lambda label: label[2:4] != "--"
)
idn_labels = st.sampled_from(
    [
        "bücher",
        "BÜCHER",
        "παράδειγμα",
        "пример",
        "例え",
        "münchen",
        "xn--bcher-kva",
        "XN--MNCHEN-3YA",
        "xn--0be",
    ]
)
tlds = st.from_regex(r"[a-zA-Z]{2,6}", fullmatch=True) | idn_labels
domain_names = st.builds(
    lambda labels, tld: ".".join([*labels, tld]),
    st.lists(ldh_labels | idn_labels, max_size=3),
    tlds,
)
literals = st.ip_addresses(v=4).map(lambda ip: f"[{ip}]") | st.ip_addresses(v=6).map(
    lambda ip: f"[IPv6:{ip.exploded}]"
)
addresses = st.builds(
    lambda local, domain: f"{local}@{domain}",
    dot_strings | quoted_strings(),
    domain_names | literals,
)


@given(addresses)
def test_valid_addresses_round_trip(text: str) -> None:
    address = Address.parse(text)
    again = Address.parse(str(address))
    assert again == address
    assert str(again) == str(address)
    assert again.ascii_domain == address.ascii_domain
    assert Address(local_part=address.local_part, domain=address.domain) == address


@given(addresses)
def test_fast_path_agrees_with_careful_path(text: str) -> None:
    address = Address.parse(text)
    assert (address.local_part, address.domain, address.ascii_domain) == _parse(text)


@given(
    addresses,
    st.sampled_from(["\r", "\n", "\x00", "\r\n"]),
    st.integers(min_value=0, max_value=200),
)
def test_cr_lf_nul_anywhere_is_refused(text: str, bad: str, where: int) -> None:
    where %= len(text) + 1
    with pytest.raises(InvalidAddress):
        Address.parse(text[:where] + bad + text[where:])


MAILISH = 'ab.@"\\[]:()<> \r\n\x00-xnéü9IPv6'


@given(st.text() | st.text(alphabet=MAILISH, max_size=40))
def test_arbitrary_text_gives_address_or_invalid_address(text: str) -> None:
    try:
        address = Address.parse(text)
    except InvalidAddress as error:
        refused: InvalidAddress | None = error
    else:
        refused = None
        assert Address.parse(str(address)) == address
    assert refused is None or refused.address == text


# --- The isemail corpus ----------------------------------------------------

ISEMAIL = Path(__file__).parent / "data" / "isemail"
USABLE = {"ISEMAIL_VALID_CATEGORY", "ISEMAIL_DNSWARN", "ISEMAIL_RFC5321"}
# Usable by isemail's lights, refused here on purpose (docs/address.md says why).
DELIBERATELY_REFUSED = {
    "tests.xml#23": "numeric TLD",
    "tests.xml#24": "numeric TLD",
    "tests-original.xml#48": "numeric TLD",
    "tests-original.xml#97": "numeric TLD",
    "tests-original.xml#216": "numeric TLD",
    "tests-original.xml#279": "invalid A-label",
}


class Case(NamedTuple):
    key: str
    address: str
    category: str


def load_isemail() -> list[Case]:
    meta = ET.parse(ISEMAIL / "meta.xml").getroot()
    category = {item.get("id"): item.findtext("category") for item in meta.iter("item")}
    cases = []
    for name in ("tests.xml", "tests-original.xml"):
        for test in ET.parse(ISEMAIL / name).getroot().iter("test"):
            encoded = test.findtext("address") or ""
            # SOURCE.md: control character n is written as U+2400 + n.
            text = "".join(
                chr(ord(c) - 0x2400) if 0x2400 <= ord(c) <= 0x2432 else c for c in encoded
            )
            diagnosis = test.findtext("diagnosis")
            found = category.get(diagnosis)
            assert found is not None, diagnosis
            cases.append(Case(f"{name}#{test.get('id')}", text, found))
    return cases


ISEMAIL_CASES = load_isemail()


def test_isemail_corpus_is_complete() -> None:
    assert len(ISEMAIL_CASES) == 164 + 279
    assert set(DELIBERATELY_REFUSED) <= {case.key for case in ISEMAIL_CASES}


@pytest.mark.parametrize(
    "case", [c for c in ISEMAIL_CASES if c.category not in USABLE], ids=lambda c: c.key
)
def test_isemail_unusable_addresses_are_refused(case: Case) -> None:
    with pytest.raises(InvalidAddress):
        Address.parse(case.address)


@pytest.mark.parametrize(
    "case", [c for c in ISEMAIL_CASES if c.category in USABLE], ids=lambda c: c.key
)
def test_isemail_usable_addresses_are_accepted(case: Case) -> None:
    if case.key in DELIBERATELY_REFUSED:
        with pytest.raises(InvalidAddress):
            Address.parse(case.address)
    else:
        address = Address.parse(case.address)
        assert Address.parse(str(address)) == address


@given(addresses)
def test_kept_text_is_the_rendering_of_the_parts(text: str) -> None:
    # str() and smtp_path() answer from the canonical text kept at construction: it must be
    # what rendering the parts gives, however the address was made.
    address = Address.parse(text)
    local = _render_local(address.local_part)
    made = [
        address,
        Address(local_part=address.local_part, domain=address.domain),
        attrs.evolve(address),
        pickle.loads(pickle.dumps(address)),
    ]
    for each in made:
        assert str(each) == f"{local}@{address.domain}"
        assert each.smtp_path(True) == f"{local}@{address.domain}"
        if address.needs_smtputf8:
            with pytest.raises(InvalidAddress):
                each.smtp_path(False)
        else:
            assert each.smtp_path(False) == f"{local}@{address.ascii_domain}"
        assert each == address
        assert hash(each) == hash(address)
        parts = f"local_part={address.local_part!r}, domain={address.domain!r}"
        assert repr(each) == f"Address({parts})"
