"""Mailing-list and one-click unsubscribe fields of built messages (``ListHeaders``).

RFC 2369 (``List-*`` URIs between angle brackets), RFC 2919 (``List-Id``) and RFC 8058
(``List-Unsubscribe-Post: List-Unsubscribe=One-Click`` beside one HTTPS URI, DKIM-signed).
Checked here: the written fields exactly (table), the refusals (table), both writers giving
the same bytes, a Hypothesis property that no URI or description text adds a field or
breaks one, a DKIM signature over both one-click fields verified by dkimpy, and the fields
arriving unchanged at a real server (aiosmtpd on loopback).
"""

from __future__ import annotations

import datetime as dt
import email.parser
import email.policy
import re
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import attrs
import dkim  # type: ignore[import-untyped]  # dkimpy ships no type information
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from mailrelay import _mime
from mailrelay.dkim import DEFAULT_HEADERS, DKIMSigner
from mailrelay.errors import MessageError
from mailrelay.message import ListHeaders, Message
from mailrelay.options import Timeouts
from tests.peers.aiosmtpd_server import AiosmtpdServer
from tests.transport.helpers import FLAVOURS, Flavour, send_with

FIXED: dict[str, Any] = {
    "date": dt.datetime(2024, 2, 29, 13, 5, 9, tzinfo=dt.UTC),
    "message_id": "fixed.1@news.example.org",
}
HTTPS = "https://news.example.org/unsubscribe/opaque-7f3a"
MAILTO = "mailto:unsub@news.example.org?subject=unsubscribe"
#: Printable URI characters RFC 3986 §2 allows, none of which may be refused.
URI_SAFE = "-._~:/?#[]@!$&'()*+,;=%20"


def build(list_headers: ListHeaders | None, **kwargs: Any) -> Message:
    arguments: dict[str, Any] = {
        "sender": "news@news.example.org",
        "to": "ann@example.net",
        "subject": "Autumn news",
        "text": "Hello.\n",
        **FIXED,
        **kwargs,
    }
    return Message.build(list_headers=list_headers, **arguments)


def raw_fields(wire: bytes) -> list[tuple[str, str]]:
    """The header block's fields as written: ``(name, value)`` with folds kept (CRLF)."""
    head = wire.split(b"\r\n\r\n", 1)[0].decode("utf-8")
    fields: list[tuple[str, str]] = []
    for line in head.split("\r\n"):
        if line[:1] in (" ", "\t"):
            name, value = fields[-1]
            fields[-1] = (name, value + "\r\n" + line)
        else:
            name, _, value = line.partition(": ")
            fields.append((name, value))
    return fields


def list_part(wire: bytes) -> list[tuple[str, str]]:
    return [(name, value) for name, value in raw_fields(wire) if name.startswith("List-")]


@contextmanager
def general_path_only() -> Iterator[None]:
    """Make Message.build take the email-package path."""

    def refuse(cls: type[Message], /, **kwargs: Any) -> Message:
        raise _mime.Unsupported("forced by the test")

    with mock.patch.object(Message, "_build_direct", classmethod(refuse)):
        yield


# -- what is written -------------------------------------------------------------------

LONG_HTTPS = "https://news.example.org/u/" + "a1b2c3d4" * 10
VALID = [
    pytest.param(
        {"unsubscribe": HTTPS, "one_click": True},
        [
            ("List-Unsubscribe", f"<{HTTPS}>"),
            ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
        ],
        id="one-click-https",
    ),
    pytest.param(
        {"unsubscribe": [MAILTO, HTTPS], "one_click": True},
        [
            ("List-Unsubscribe", f"<{MAILTO}>,\r\n <{HTTPS}>"),
            ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
        ],
        id="mailto-and-https-folded-between-uris",
    ),
    pytest.param(
        {"unsubscribe": ("mailto:u@x.example", "https://x.example/u")},
        [("List-Unsubscribe", "<mailto:u@x.example>, <https://x.example/u>")],
        id="two-uris-one-line",
    ),
    pytest.param(
        {"unsubscribe": "http://x.example/u"},
        [("List-Unsubscribe", "<http://x.example/u>")],
        id="http-without-one-click",
    ),
    pytest.param(
        {"unsubscribe": f"<{HTTPS}>", "one_click": True},
        [
            ("List-Unsubscribe", f"<{HTTPS}>"),
            ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
        ],
        id="given-with-angle-brackets",
    ),
    pytest.param(
        {"unsubscribe": "HTTPS://X.example/U?a=1&b=%2F"},
        [("List-Unsubscribe", "<https://X.example/U?a=1&b=%2F>")],
        id="scheme-lower-cased-rest-kept",
    ),
    pytest.param(
        {"unsubscribe": [MAILTO, LONG_HTTPS], "one_click": True},
        [
            ("List-Unsubscribe", f"<{MAILTO}>,\r\n <{LONG_HTTPS}>"),
            ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
        ],
        id="uri-longer-than-a-line-stays-whole",
    ),
    pytest.param(
        {"unsubscribe": "mailto:zoë@bücher.example?subject=désabonner"},
        [
            (
                "List-Unsubscribe",
                "<mailto:zo%C3%AB@xn--bcher-kva.example?subject=d%C3%A9sabonner>",
            )
        ],
        id="mailto-non-ascii-percent-encoded-idn-a-labels",
    ),
    pytest.param(
        {"unsubscribe": "mailto:a@x.example,b@bücher.example"},
        [("List-Unsubscribe", "<mailto:a@x.example,b@xn--bcher-kva.example>")],
        id="mailto-two-addresses",
    ),
    pytest.param(
        {"id": "news.example.org"},
        [("List-Id", "<news.example.org>")],
        id="list-id-bare",
    ),
    pytest.param(
        {"id": "<news.example.org>"},
        [("List-Id", "<news.example.org>")],
        id="list-id-bracketed",
    ),
    pytest.param(
        {"id": "Autumn news <autumn.news.example.org>"},
        [("List-Id", "Autumn news <autumn.news.example.org>")],
        id="list-id-with-phrase",
    ),
    pytest.param(
        {"id": 'News, "weekly" <news.localhost>'},
        [("List-Id", '"News, \\"weekly\\"" <news.localhost>')],
        id="list-id-quoted-phrase-unmanaged-namespace",
    ),
    pytest.param(
        {"id": "=?utf-8?q?x?= <l.example.org>"},
        [("List-Id", '"=?utf-8?q?x?=" <l.example.org>')],
        id="list-id-phrase-like-an-encoded-word-quoted",
    ),
    pytest.param(
        {"id": "Grüße <gruesse.example.org>"},
        [("List-Id", "=?utf-8?b?R3LDvMOfZQ==?= <gruesse.example.org>")],
        id="list-id-encoded-word-phrase",
    ),
    pytest.param(
        {"id": " ".join(["word"] * 16) + " <l.example.org>"},
        [("List-Id", " ".join(["word"] * 14) + "\r\n word word <l.example.org>")],
        id="list-id-folded-phrase",
    ),
    pytest.param(
        {
            "id": "Autumn news <autumn.news.example.org>",
            "help": "mailto:help@news.example.org",
            "unsubscribe": [MAILTO, HTTPS],
            "one_click": True,
            "subscribe": "https://news.example.org/subscribe",
            "post": "NO",
            "owner": "mailto:owner@news.example.org",
            "archive": ["https://news.example.org/archive"],
        },
        [
            ("List-Id", "Autumn news <autumn.news.example.org>"),
            ("List-Help", "<mailto:help@news.example.org>"),
            ("List-Unsubscribe", f"<{MAILTO}>,\r\n <{HTTPS}>"),
            ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
            ("List-Subscribe", "<https://news.example.org/subscribe>"),
            ("List-Post", "NO"),
            ("List-Owner", "<mailto:owner@news.example.org>"),
            ("List-Archive", "<https://news.example.org/archive>"),
        ],
        id="every-field-in-order",
    ),
    pytest.param(
        {"post": ["mailto:list@news.example.org"]},
        [("List-Post", "<mailto:list@news.example.org>")],
        id="list-post-uri",
    ),
    pytest.param(
        {"unsubscribe": "https://x.example/" + URI_SAFE},
        [("List-Unsubscribe", f"<https://x.example/{URI_SAFE}>")],
        id="every-uri-character",
    ),
    pytest.param({}, [], id="nothing"),
]


@pytest.mark.parametrize(("options", "expected"), VALID)
def test_fields_are_written_exactly(
    options: dict[str, Any], expected: list[tuple[str, str]]
) -> None:
    value = ListHeaders(**options)
    assert value.fields() == expected
    for general in (False, True):
        if general:
            with general_path_only():
                message = build(value)
        else:
            message = build(value)
        assert list_part(message.as_bytes()) == expected
        assert [(n, v) for n, v in message.headers if n.startswith("List-")] == [
            (name, text.replace("\r\n", "")) for name, text in expected
        ]
        # After Message-ID, before MIME-Version (both writers keep this order).
        names = [name for name, _ in message.headers]
        assert names[names.index("Message-ID") + 1 : names.index("MIME-Version")] == [
            name for name, _ in expected
        ]


def test_both_writers_give_the_same_bytes() -> None:
    value = ListHeaders(
        id="Autumn news <autumn.news.example.org>",
        unsubscribe=[MAILTO, LONG_HTTPS],
        one_click=True,
        help="mailto:zoë@bücher.example",
    )
    with mock.patch("mailrelay.message.MIMEPart", side_effect=AssertionError("general path")):
        direct = build(value)
    with general_path_only():
        general = build(value)
    assert direct.as_bytes() == general.as_bytes()
    assert direct.headers == general.headers


SHAPES = [
    pytest.param({}, id="text"),
    pytest.param(
        {
            "sender": ("Zoë Example", "zoë@news.example.org"),
            "subject": "Grüße " * 20,
            "html": "<p>Grüße</p>",
            "attachments": [("résumé.pdf", b"%PDF" * 100)],
            "headers": {"X-Campaign": "autumn " * 15},
        },
        id="smtputf8-mixed-long-fields",
    ),
    pytest.param(
        {"subject": "Grüße " * 20, "html": "<p>x</p>", "attachments": [("a.bin", b"\0")]},
        id="7bit-mixed",
    ),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("general", [False, True])
def test_list_headers_change_nothing_else(shape: dict[str, Any], general: bool) -> None:
    value = ListHeaders(id="n.example.org", unsubscribe=[MAILTO, LONG_HTTPS], one_click=True)
    if general:
        with general_path_only():
            plain, listed = build(None, **shape), build(value, **shape)
    else:
        plain, listed = build(None, **shape), build(value, **shape)
    mine, theirs = listed.as_bytes(), plain.as_bytes()
    for old, new in zip(
        re.findall(rb'boundary="([^"]+)"', mine),
        re.findall(rb'boundary="([^"]+)"', theirs),
        strict=True,
    ):
        mine = mine.replace(old, new)
    after_id = theirs.index(b"\r\n", theirs.index(b"Message-ID:")) + 2
    lines = b"".join(f"{name}: {text}\r\n".encode("ascii") for name, text in value.fields())
    assert mine == theirs[:after_id] + lines + theirs[after_id:]


def test_an_smtputf8_message_carries_the_same_7bit_fields() -> None:
    value = ListHeaders(id="Zoë \u2019s list <z.example.org>", unsubscribe=HTTPS, one_click=True)
    message = build(value, sender="zoë@news.example.org")
    assert message.needs_smtputf8
    assert list_part(message.as_bytes()) == value.fields()
    assert all(text.isascii() for _, text in value.fields())


def test_values_are_stored_encoded_and_evolve() -> None:
    base = ListHeaders(id="news.example.org", help="mailto:hélp@news.example.org")
    assert base.help == ("mailto:h%C3%A9lp@news.example.org",)
    per_recipient = attrs.evolve(base, unsubscribe=HTTPS, one_click=True)
    assert per_recipient.unsubscribe == (HTTPS,)
    assert per_recipient.id == base.id
    assert ListHeaders(unsubscribe=f"<{HTTPS}>") == ListHeaders(unsubscribe=[HTTPS])
    with pytest.raises(MessageError, match="RFC 8058"):
        attrs.evolve(per_recipient, unsubscribe="mailto:u@x.example")


# -- what is refused -------------------------------------------------------------------

INVALID = [
    pytest.param({"one_click": True}, "RFC 8058", id="one-click-without-unsubscribe"),
    pytest.param(
        {"unsubscribe": MAILTO, "one_click": True}, "exactly one https", id="one-click-mailto"
    ),
    pytest.param(
        {"unsubscribe": "http://x.example/u", "one_click": True},
        "exactly one https",
        id="one-click-http",
    ),
    pytest.param(
        {"unsubscribe": [HTTPS, "http://x.example/u"], "one_click": True},
        "no http",
        id="one-click-https-and-http",
    ),
    pytest.param(
        {"unsubscribe": [HTTPS, "https://x.example/u"], "one_click": True},
        "exactly one https",
        id="one-click-two-https",
    ),
    pytest.param({"one_click": 1}, "True or False", id="one-click-not-bool"),
    pytest.param({"unsubscribe": "ftp://x.example/u"}, "mailto:, https:", id="ftp"),
    pytest.param({"unsubscribe": "javascript:alert(1)"}, "mailto:, https:", id="javascript"),
    pytest.param({"unsubscribe": "x.example/unsubscribe"}, "mailto:, https:", id="no-scheme"),
    pytest.param({"unsubscribe": ""}, "mailto:, https:", id="empty"),
    pytest.param({"unsubscribe": "mailto:"}, "no address", id="mailto-empty"),
    pytest.param({"unsubscribe": "https:/x"}, "no host", id="https-no-authority"),
    pytest.param({"unsubscribe": "https://"}, "no host", id="https-empty-host"),
    pytest.param({"unsubscribe": "https://x.example:99999/"}, "list URI", id="https-bad-port"),
    pytest.param({"unsubscribe": f"{HTTPS}\r\nBcc: x@y.example"}, "CR, LF", id="crlf"),
    pytest.param({"unsubscribe": f"{HTTPS}\n"}, "CR, LF", id="lf"),
    pytest.param({"unsubscribe": f"{HTTPS}\x00"}, "CR, LF", id="nul"),
    pytest.param({"unsubscribe": f"{HTTPS}\u2028x"}, "CR, LF", id="line-separator"),
    pytest.param({"unsubscribe": f"{HTTPS}/a b"}, "' '", id="space"),
    pytest.param({"unsubscribe": f"{HTTPS}\tx"}, "'\\t'", id="tab"),
    pytest.param({"unsubscribe": f"{HTTPS}>, <mailto:x@y.example"}, "'>'", id="closing-bracket"),
    pytest.param({"unsubscribe": f"<{HTTPS}"}, "mailto:, https:", id="opening-bracket-only"),
    pytest.param({"unsubscribe": f"{HTTPS}<x"}, "'<'", id="opening-bracket-inside"),
    pytest.param(
        {"unsubscribe": "mailto:a@x.example,,b@x.example"}, "list URI", id="mailto-empty-item"
    ),
    pytest.param(
        {"unsubscribe": "mailto:a%0D%0Ab@x.example"}, "list URI", id="mailto-encoded-crlf"
    ),
    pytest.param({"unsubscribe": f'{HTTPS}"x'}, "'\"'", id="double-quote"),
    pytest.param({"unsubscribe": f"{HTTPS}%zz"}, "two hex digits", id="bad-percent"),
    pytest.param(
        {"unsubscribe": "https://news.example.org/désabonner"}, "non-ASCII", id="https-non-ascii"
    ),
    pytest.param({"unsubscribe": "mailto:u@-bad-.example"}, "list URI", id="mailto-bad-ascii"),
    pytest.param({"unsubscribe": "mailto:u@bü-.example"}, "list URI", id="mailto-bad-idn"),
    pytest.param({"unsubscribe": "mailto:u\ud800@x.example"}, "UTF-8", id="mailto-surrogate"),
    pytest.param({"id": "N\udfff <n.example.org>"}, "UTF-8", id="list-id-surrogate"),
    pytest.param({"unsubscribe": 42}, "string", id="not-a-string"),
    pytest.param({"unsubscribe": [HTTPS, None]}, "string", id="none-in-list"),
    pytest.param({"help": "ftp://x.example/"}, "mailto:, https:", id="help-scheme"),
    pytest.param({"archive": "https://x.example/a b"}, "' '", id="archive-space"),
    pytest.param({"post": ["NO", "mailto:l@x.example"]}, '"NO"', id="post-no-beside-uri"),
    pytest.param({"id": "news"}, "RFC 2919", id="list-id-one-atom"),
    pytest.param({"id": "news..example.org"}, "RFC 2919", id="list-id-double-dot"),
    pytest.param({"id": ".news.example.org"}, "RFC 2919", id="list-id-leading-dot"),
    pytest.param({"id": "news example.org"}, "RFC 2919", id="list-id-space"),
    pytest.param({"id": "News <news.example.org"}, "RFC 2919", id="list-id-unclosed"),
    pytest.param({"id": "News <a.b> <c.d>"}, "RFC 2919", id="list-id-two-ids"),
    pytest.param({"id": "N <bücher.example>"}, "RFC 2919", id="list-id-non-ascii-id"),
    pytest.param({"id": "x." + "a" * 254}, "255 octets", id="list-id-too-long"),
    pytest.param({"id": "News\r\nBcc: x@y.example <n.example.org>"}, "CR, LF", id="list-id-crlf"),
    pytest.param({"id": "News\x01 <n.example.org>"}, "control", id="list-id-control"),
    pytest.param({"id": 7}, "string", id="list-id-not-a-string"),
]


@pytest.mark.parametrize(("options", "message"), INVALID)
def test_refused_at_construction(options: dict[str, Any], message: str) -> None:
    with pytest.raises(MessageError, match=re.escape(message)):
        ListHeaders(**options)


def test_a_255_octet_list_id_is_taken() -> None:
    ident = "x." + "a" * 253
    assert len(ident) == 255
    assert ListHeaders(id=ident).fields() == [("List-Id", f"<{ident}>")]


def test_a_uri_too_long_for_any_line_is_refused_when_written() -> None:
    value = ListHeaders(unsubscribe="https://x.example/" + "a" * 980)
    with pytest.raises(MessageError, match="998"):
        build(value)


@pytest.mark.parametrize(
    "name", ["List-Unsubscribe", "list-unsubscribe-post", "List-Id", "List-Archive"]
)
def test_headers_may_not_repeat_a_list_field(name: str) -> None:
    with pytest.raises(MessageError, match="list_headers"):
        build(ListHeaders(unsubscribe=HTTPS), headers=[(name, "<https://other.example/>")])


def test_without_list_headers_custom_list_fields_still_pass() -> None:
    message = build(None, headers={"List-Unsubscribe": "<mailto:u@x.example>"})
    assert message.get("List-Unsubscribe") == "<mailto:u@x.example>"


def test_list_headers_must_be_a_list_headers_value() -> None:
    with pytest.raises(MessageError, match="ListHeaders"):
        build({"unsubscribe": HTTPS})  # type: ignore[arg-type]


# -- no text breaks out (Hypothesis) -----------------------------------------------------

# Pieces an attacker would try, mixed with arbitrary text.
HOSTILE = [
    "\r\nBcc: evil@x.example",
    "\nX-Injected: 1",
    "\r",
    "\x00",
    "\u2028",
    "\x85",
    ">",
    "<",
    ">, <mailto:evil@x.example>",
    " ",
    "\t",
    '"',
    ",",
    "=?utf-8?q?x?=",
    "%0D%0A",
    "%2",
    "é",
    "\U0001f600",
]
# Mostly characters a URI may hold (so that many URIs are taken and their fields
# checked), with hostile pieces and arbitrary text among them.
safe_text = st.text(alphabet="abcXYZ019-._~:/?#[]@!$&'()*+,;=", max_size=12)
uri_tails = st.lists(
    st.one_of(safe_text, safe_text, safe_text, st.sampled_from(HOSTILE), st.text(max_size=6)),
    max_size=5,
).map("".join)
uris = st.builds(
    "".join,
    st.tuples(
        st.sampled_from(
            ["https://news.example.org/", "http://x.example/", "mailto:u@x.example?subject=", ""]
        ),
        uri_tails,
    ),
)


def parsed_fields(message: Message) -> list[tuple[str, str]]:
    """The fields the stdlib parser reads, values raw (compat32 leaves them as written)."""
    parsed = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(message.as_bytes())
    assert not parsed.defects
    assert parsed.get_payload() == "Hello.\r\n"
    return [(name, re.sub(r"\r?\n", "", value)) for name, value in parsed.items()]


@given(st.lists(uris, min_size=1, max_size=2), st.booleans())
def test_property_no_uri_can_add_or_break_a_field(given_uris: list[str], one_click: bool) -> None:
    try:
        value = ListHeaders(unsubscribe=given_uris, one_click=one_click)
        message = build(value)
    except MessageError:
        event("refused")
        return
    event("built")
    fields = parsed_fields(message)
    expected_names = ["From", "To", "Subject", "Date", "Message-ID", "List-Unsubscribe"]
    expected_names += ["List-Unsubscribe-Post"] if one_click else []
    expected_names += ["MIME-Version", "Content-Type", "Content-Transfer-Encoding"]
    assert [name for name, _ in fields] == expected_names
    unsubscribe = dict(fields)["List-Unsubscribe"]
    # RFC 2369 §2: every item is one angle-bracketed URI, in the order given.
    assert re.findall(r"<([^<>]*)>", unsubscribe) == list(value.unsubscribe)
    assert unsubscribe == ", ".join(f"<{uri}>" for uri in value.unsubscribe)
    for uri in value.unsubscribe:
        assert re.fullmatch(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+", uri)
    lines = message.as_bytes().split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    for line in lines:
        # RFC 5322 §2.1.1: 78 characters, unless one URI alone is longer.
        assert len(line) <= 78 or line.count(b"<") == 1


# RFC 5322 §3.2.3 atext: words of it, single-spaced, are written without quotes.
ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
descriptions = st.lists(st.one_of(st.sampled_from(HOSTILE), st.text(max_size=10)), max_size=6).map(
    "".join
)


@given(descriptions, st.sampled_from(["news.example.org", "a.b", "x_y.localhost"]))
def test_property_no_description_can_add_or_break_the_list_id(description: str, ident: str) -> None:
    try:
        message = build(ListHeaders(id=f"{description} <{ident}>"))
    except MessageError:
        event("refused")
        return
    event("built")
    fields = parsed_fields(message)
    assert [name for name, _ in fields].count("List-Id") == 1
    assert len(fields) == 9
    assert dict(fields)["List-Id"].endswith(f"<{ident}>")
    # Read as a modern reader reads it: the description comes back (RFC 2047 decoded).
    read = email.parser.BytesParser(policy=email.policy.default).parsebytes(message.as_bytes())
    shown = str(read["List-Id"])
    phrase = description.strip(" \t")
    atext_words = re.fullmatch(
        r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+( [A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*", phrase
    )
    if phrase.isascii() and phrase and (not atext_words or "=?" in phrase):
        # Written as a quoted-string: the reader keeps the quotes (checked in the table).
        assert shown.startswith('"')
        return
    assert shown == (f"{phrase} <{ident}>" if phrase else f"<{ident}>")


# -- DKIM (RFC 8058 §4) ----------------------------------------------------------------

KEYS = Path(__file__).parent / "data" / "dkim"


def dkim_signer() -> DKIMSigner:
    return DKIMSigner(
        domain="news.example.org",
        selector="sel",
        private_key=(KEYS / "rsa2048.pem").read_bytes(),
        now=lambda: dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
    )


def verify(data: bytes, signer: DKIMSigner) -> bool:
    """dkimpy's verdict, its key lookup answered with the signer's published record."""

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        return (
            signer.dns_txt.encode("ascii") if name == b"sel._domainkey.news.example.org." else None
        )

    return bool(dkim.verify(data, dnsfunc=dnsfunc))


def test_the_default_signed_fields_include_both_one_click_fields() -> None:
    assert {"List-Unsubscribe", "List-Unsubscribe-Post"} <= set(DEFAULT_HEADERS)


@pytest.mark.parametrize("general", [False, True])
def test_a_one_click_message_is_signed_over_both_fields(general: bool) -> None:
    value = ListHeaders(
        id="Autumn news <autumn.news.example.org>",
        unsubscribe=[MAILTO, LONG_HTTPS],
        one_click=True,
    )
    if general:
        with general_path_only():
            message = build(value)
    else:
        message = build(value)
    signer = dkim_signer()
    signed = signer.sign(message).as_bytes()
    assert verify(signed, signer)
    field = re.match(rb"DKIM-Signature:.*?\r\n(?![ \t])", signed, re.DOTALL)
    assert field is not None
    tags = dict(
        tag.split("=", 1)
        for tag in re.sub(r"\s+", "", field.group().decode("ascii")[15:]).split(";")
        if tag
    )
    signed_names = tags["h"].lower().split(":")
    assert "list-unsubscribe" in signed_names
    assert "list-unsubscribe-post" in signed_names
    # The coverage is real: changing either field breaks the signature.
    for old, new in (
        (b"opaque" if b"opaque" in signed else b"a1b2", b"OPAQUE"),
        (b"List-Unsubscribe=One-Click", b"List-Unsubscribe=One-Clack"),
    ):
        assert old in signed
        assert not verify(signed.replace(old, new, 1), signer)


# -- end to end ------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_the_fields_reach_a_real_server_exactly(
    flavour: Flavour, aiosmtpd_server: AiosmtpdServer
) -> None:
    value = ListHeaders(
        id="Autumn news <autumn.news.example.org>",
        unsubscribe=[MAILTO, LONG_HTTPS],
        one_click=True,
        help="mailto:help@news.example.org",
    )
    message = dkim_signer().sign(build(value, to="ann@mailrelay.test"))
    result = send_with(
        flavour,
        message,
        host=aiosmtpd_server.host,
        port=aiosmtpd_server.port,
        ssl_context=ssl.create_default_context(cafile=str(aiosmtpd_server.ca_file)),
        timeouts=Timeouts.all(10),
    )
    assert result.ok
    (received,) = aiosmtpd_server.messages
    assert received.content == message.as_bytes()
    assert list_part(received.content) == [
        ("List-Id", "Autumn news <autumn.news.example.org>"),
        ("List-Help", "<mailto:help@news.example.org>"),
        ("List-Unsubscribe", f"<{MAILTO}>,\r\n <{LONG_HTTPS}>"),
        ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
    ]
    assert verify(received.content, dkim_signer())
