"""Tests for mailrelay.envelope: recipients, DSN parameters, xtext, from_message."""

from __future__ import annotations

import re
from typing import Any, cast
from unittest import mock

import attrs
import pytest
from attrs import AttrsInstance
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.address import Address
from mailrelay.envelope import (
    Envelope,
    Notify,
    Recipient,
    Ret,
    _new_recipient,
    _plain_envelope,
    utf8_addr_xtext_decode,
    utf8_addr_xtext_encode,
    xtext_decode,
    xtext_encode,
)
from mailrelay.errors import InvalidAddress, MessageError
from mailrelay.message import Message


def addr(text: str) -> Address:
    return Address.parse(text)


# -- xtext (RFC 3461 §4) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "xtext"),
    [
        pytest.param("abc", "abc", id="plain"),
        pytest.param("a+b", "a+2Bb", id="plus"),
        pytest.param("a=b", "a+3Db", id="equals"),
        pytest.param("a b", "a+20b", id="space"),
        pytest.param("!~", "!~", id="range-ends"),
        pytest.param("\x7f\x00\t", "+7F+00+09", id="controls"),
        pytest.param("é", "+C3+A9", id="utf-8"),
        pytest.param("", "", id="empty"),
        pytest.param("<x@y>", "<x@y>", id="brackets"),
    ],
)
def test_xtext_encode(text: str, xtext: str) -> None:
    assert xtext_encode(text) == xtext
    assert xtext_decode(xtext) == text


def test_xtext_decode_accepts_lower_case_hex() -> None:
    assert xtext_decode("a+2bb+3d") == "a+b="


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param("+", id="lone-plus"),
        pytest.param("a+4", id="one-digit"),
        pytest.param("+GG", id="not-hex"),
        pytest.param("a b", id="space"),
        pytest.param("a=b", id="equals"),
        pytest.param("é", id="non-ascii"),
        pytest.param("+C3", id="not-utf-8"),
        pytest.param("a\r\n", id="crlf"),
    ],
)
def test_xtext_decode_refuses(bad: str) -> None:
    with pytest.raises(MessageError):
        xtext_decode(bad)


@given(st.text())
def test_property_xtext_round_trips(text: str) -> None:
    try:
        encoded = xtext_encode(text)
    except UnicodeEncodeError:
        assert any(0xD800 <= ord(c) <= 0xDFFF for c in text)
        return
    assert re.fullmatch(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})*", encoded)
    assert xtext_decode(encoded) == text


# -- utf-8-addr-xtext (RFC 6533 §3) ------------------------------------------------


@pytest.mark.parametrize(
    ("text", "encoded"),
    [
        pytest.param("a@b.example", "a@b.example", id="ascii"),
        pytest.param("ü@x", "\\x{FC}@x", id="two-digit"),
        pytest.param("δ@x", "\\x{3B4}@x", id="three-digit"),
        pytest.param("例@x", "\\x{4F8B}@x", id="four-digit"),
        pytest.param("\U0001f600@x", "\\x{1F600}@x", id="five-digit"),
        pytest.param("a+b=c\\d", "a\\x{2B}b\\x{3D}c\\x{5C}d", id="specials"),
        pytest.param('"a b"@x', '"a\\x{20}b"@x', id="space"),
    ],
)
def test_utf8_addr_xtext(text: str, encoded: str) -> None:
    assert utf8_addr_xtext_encode(text) == encoded
    assert utf8_addr_xtext_decode(encoded) == text
    # The result is 7-bit and valid xtext, so it fits in ORCPT without SMTPUTF8.
    assert encoded.isascii()
    assert xtext_decode(encoded) == encoded


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param("\\x{D800}", id="surrogate"),
        pytest.param("\\x{110000}", id="too-large"),
        pytest.param("a\\b", id="stray-backslash"),
        pytest.param("\\x{}", id="empty-escape"),
    ],
)
def test_utf8_addr_xtext_decode_refuses(bad: str) -> None:
    with pytest.raises(MessageError):
        utf8_addr_xtext_decode(bad)


@given(st.text(st.characters(exclude_categories=["Cs"])))
def test_property_utf8_addr_xtext_round_trips(text: str) -> None:
    encoded = utf8_addr_xtext_encode(text)
    assert encoded.isascii()
    assert "+" not in encoded
    assert "=" not in encoded
    assert utf8_addr_xtext_decode(encoded) == text


# -- Recipient and NOTIFY ------------------------------------------------------------


@pytest.mark.parametrize(
    ("given_notify", "expected"),
    [
        pytest.param(None, None, id="none"),
        pytest.param(Notify.NEVER, {Notify.NEVER}, id="enum"),
        pytest.param("never", {Notify.NEVER}, id="text-lower"),
        pytest.param("SUCCESS,FAILURE", {Notify.SUCCESS, Notify.FAILURE}, id="text-list"),
        pytest.param(" delay , failure ", {Notify.DELAY, Notify.FAILURE}, id="text-spaces"),
        pytest.param(
            [Notify.SUCCESS, "delay"], {Notify.SUCCESS, Notify.DELAY}, id="mixed-iterable"
        ),
        pytest.param((Notify.FAILURE, Notify.FAILURE), {Notify.FAILURE}, id="repeated-value-once"),
    ],
)
def test_notify_forms(given_notify: Any, expected: set[Notify] | None) -> None:
    recipient = Recipient("a@x.example", notify=given_notify)
    assert recipient.notify == (None if expected is None else frozenset(expected))


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param("NEVER,SUCCESS", id="never-with-success"),
        pytest.param([Notify.NEVER, Notify.DELAY], id="never-with-delay"),
        pytest.param("SOMETIMES", id="unknown"),
        pytest.param([], id="empty-list"),
        pytest.param("", id="empty-text"),
        pytest.param([42], id="not-text"),
    ],
)
def test_notify_refuses(bad: Any) -> None:
    with pytest.raises(MessageError):
        Recipient("a@x.example", notify=bad)


RCPT_CASES = [
    pytest.param(Recipient("a@x.example"), {}, (), id="nothing"),
    pytest.param(
        Recipient("a@x.example", notify=Notify.NEVER), {}, (("NOTIFY", "NEVER"),), id="never"
    ),
    pytest.param(
        Recipient("a@x.example", notify="delay,success,failure"),
        {},
        (("NOTIFY", "SUCCESS,FAILURE,DELAY"),),
        id="notify-stable-order",
    ),
    pytest.param(
        Recipient("a@x.example", notify="FAILURE"), {"dsn": False}, (), id="no-dsn-no-params"
    ),
    pytest.param(
        Recipient("a@x.example", orcpt="orig+tag@x.example"),
        {},
        (("ORCPT", "rfc822;orig+2Btag@x.example"),),
        id="orcpt-rfc822-xtext",
    ),
    pytest.param(
        Recipient("a@x.example", orcpt='"a b=c"@x.example'),
        {},
        (("ORCPT", 'rfc822;"a+20b+3Dc"@x.example'),),
        id="orcpt-quoted-local",
    ),
    pytest.param(
        Recipient("a@x.example", orcpt="o@bücher.example"),
        {},
        (("ORCPT", "rfc822;o@xn--bcher-kva.example"),),
        id="orcpt-idn-as-a-labels",
    ),
    pytest.param(
        Recipient("a@x.example", orcpt="o@bücher.example"),
        {"smtputf8": True},
        (("ORCPT", "utf-8;o@b\\x{FC}cher.example"),),
        id="orcpt-idn-smtputf8",
    ),
    pytest.param(
        Recipient("a@x.example", orcpt="jörg@x.example"),
        {"smtputf8": True},
        (("ORCPT", "utf-8;j\\x{F6}rg@x.example"),),
        id="orcpt-utf8-local-smtputf8",
    ),
    pytest.param(
        Recipient("a@x.example", orcpt="jörg@x.example"),
        {"smtputf8": False},
        (("ORCPT", "utf-8;j\\x{F6}rg@x.example"),),
        id="orcpt-utf8-local-7bit-safe",
    ),
    pytest.param(
        Recipient("a@x.example", orcpt="o@x.example"),
        {"smtputf8": True},
        (("ORCPT", "rfc822;o@x.example"),),
        id="orcpt-ascii-smtputf8",
    ),
    pytest.param(
        Recipient("a@x.example", notify="SUCCESS", orcpt="o@x.example"),
        {},
        (("NOTIFY", "SUCCESS"), ("ORCPT", "rfc822;o@x.example")),
        id="notify-then-orcpt",
    ),
]


# A domain of four 16-character Japanese labels: 198 octets, 182 as A-labels, 522
# characters in utf-8-addr-xtext (8 for each non-ASCII character).
_LONG_IDN = ".".join(["日本語テスト例え" * 2] * 4) + ".jp"


def test_an_orcpt_over_500_characters_takes_the_ascii_form_when_it_has_one() -> None:
    """RFC 3461 §4.2: the whole ORCPT parameter is at most 500 characters; the utf-8 form
    of this address is longer, its rfc822 form (A-labels) is the same address and fits."""
    recipient = Recipient("a@x.example", orcpt=f"o@{_LONG_IDN}")
    [(keyword, value)] = recipient.rcpt_parameters(smtputf8=True)
    assert keyword == "ORCPT"
    assert value is not None
    assert value.startswith("rfc822;o@xn--")
    assert len(value) <= 500
    assert addr(xtext_decode(value.partition(";")[2])) == recipient.orcpt


def test_an_orcpt_with_no_form_within_500_characters_is_left_out() -> None:
    """A non-ASCII local part has only the utf-8 form: too long, it is not sent (ORCPT only
    informs DSNs; an over-long one may get the recipient refused), NOTIFY still is."""
    recipient = Recipient("a@x.example", notify="FAILURE", orcpt=f"日本語日本語@{_LONG_IDN}")
    for smtputf8 in (True, False):
        assert recipient.rcpt_parameters(smtputf8=smtputf8) == (("NOTIFY", "FAILURE"),)
    short = Recipient("a@x.example", orcpt="日本語@例え.jp")
    [(_, value)] = short.rcpt_parameters(smtputf8=True)
    assert value == "utf-8;\\x{65E5}\\x{672C}\\x{8A9E}@\\x{4F8B}\\x{3048}.jp"


@pytest.mark.parametrize(("recipient", "kwargs", "expected"), RCPT_CASES)
def test_rcpt_parameters(
    recipient: Recipient, kwargs: dict[str, bool], expected: tuple[tuple[str, str | None], ...]
) -> None:
    assert recipient.rcpt_parameters(**kwargs) == expected


def test_recipient_parses_addresses() -> None:
    recipient = Recipient("A@Example.COM", orcpt=addr("o@x.example"))
    assert recipient.address == addr("A@example.com")
    assert recipient.orcpt == addr("o@x.example")
    with pytest.raises(InvalidAddress):
        Recipient("not an address")
    with pytest.raises(InvalidAddress):
        Recipient("a@x.example", orcpt="bad")


# -- Envelope --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sender", "expected"),
    [
        pytest.param(None, None, id="none-is-null-path"),
        pytest.param("", None, id="empty-is-null-path"),
        pytest.param("S@Example.org", addr("S@example.org"), id="text"),
        pytest.param(addr("s@x.example"), addr("s@x.example"), id="address"),
    ],
)
def test_sender(sender: Any, expected: Address | None) -> None:
    assert Envelope(sender, ["r@x.example"]).sender == expected


def test_recipients_are_converted_and_deduplicated() -> None:
    envelope = Envelope(
        "s@x.example",
        [
            "b@x.example",
            addr("a@x.example"),
            Recipient("b@X.EXAMPLE", notify="SUCCESS"),
            "a@x.example",
            Recipient("c@x.example", notify="NEVER"),
        ],
    )
    assert [r.address for r in envelope.recipients] == [
        addr("b@x.example"),
        addr("a@x.example"),
        addr("c@x.example"),
    ]
    # The first occurrence wins, with its own (absent) NOTIFY.
    assert envelope.recipients[0].notify is None


@pytest.mark.parametrize(
    "single",
    [pytest.param("r@x.example", id="str"), pytest.param(addr("r@x.example"), id="address")],
)
def test_a_single_recipient_may_be_bare(single: Any) -> None:
    assert Envelope(None, single).recipients == (Recipient("r@x.example"),)
    assert Envelope(None, Recipient("r@x.example")).recipients == (Recipient("r@x.example"),)


def test_envelope_notify_is_the_default_for_recipients() -> None:
    envelope = Envelope(
        "s@x.example",
        ["a@x.example", Recipient("b@x.example", notify="NEVER")],
        notify="FAILURE,DELAY",
    )
    assert envelope.notify == frozenset({Notify.FAILURE, Notify.DELAY})
    assert envelope.recipients[0].notify == frozenset({Notify.FAILURE, Notify.DELAY})
    assert envelope.recipients[0].rcpt_parameters() == (("NOTIFY", "FAILURE,DELAY"),)
    assert envelope.recipients[1].rcpt_parameters() == (("NOTIFY", "NEVER"),)


@pytest.mark.parametrize(
    ("args", "kwargs", "error"),
    [
        pytest.param(("s@x.example", []), {}, MessageError, id="no-recipients"),
        pytest.param(("s@x.example", ["bad"]), {}, InvalidAddress, id="bad-recipient"),
        pytest.param(("bad", ["r@x.example"]), {}, InvalidAddress, id="bad-sender"),
        pytest.param((None, ["r@x.example"]), {"ret": "ALL"}, MessageError, id="bad-ret"),
        pytest.param((None, ["r@x.example"]), {"notify": "NEVER,DELAY"}, MessageError, id="never+"),
        pytest.param((None, ["r@x.example"]), {"envid": ""}, MessageError, id="empty-envid"),
        pytest.param((None, ["r@x.example"]), {"envid": "é"}, MessageError, id="non-ascii-envid"),
        pytest.param((None, ["r@x.example"]), {"envid": "a\r\nb"}, MessageError, id="crlf-envid"),
        pytest.param((None, ["r@x.example"]), {"envid": "x" * 101}, MessageError, id="long-envid"),
        pytest.param(
            (None, ["r@x.example"]), {"envid": "+" * 34}, MessageError, id="long-once-encoded"
        ),
    ],
)
def test_envelope_refuses(
    args: tuple[Any, ...], kwargs: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        Envelope(*args, **kwargs)


@pytest.mark.parametrize(
    "envid",
    [
        pytest.param("x" * 100, id="100-chars"),
        pytest.param("+" * 33, id="99-once-encoded"),
        pytest.param("a b~!", id="printable-with-space"),
    ],
)
def test_envid_accepted(envid: str) -> None:
    assert Envelope(None, "r@x.example", envid=envid).envid == envid


def test_ret_forms() -> None:
    assert Envelope(None, "r@x.example", ret="hdrs").ret is Ret.HDRS
    assert Envelope(None, "r@x.example", ret=Ret.FULL).ret is Ret.FULL


FULL = Envelope("s@x.example", "r@x.example", ret=Ret.HDRS, envid="id 1+2=3", requiretls=True)
PLAIN = Envelope("s@x.example", "r@x.example")

MAIL_CASES = [
    pytest.param(PLAIN, {}, (), id="nothing"),
    pytest.param(PLAIN, {"size": 0}, (("SIZE", "0"),), id="size-zero"),
    pytest.param(PLAIN, {"size": 12345}, (("SIZE", "12345"),), id="size"),
    pytest.param(PLAIN, {"body": "8BITMIME"}, (("BODY", "8BITMIME"),), id="body-8bitmime"),
    pytest.param(PLAIN, {"body": "binarymime"}, (("BODY", "BINARYMIME"),), id="body-binarymime"),
    pytest.param(PLAIN, {"body": "7bit"}, (("BODY", "7BIT"),), id="body-7bit"),
    pytest.param(PLAIN, {"smtputf8": True}, (("SMTPUTF8", None),), id="smtputf8"),
    pytest.param(PLAIN, {"requiretls": True}, (), id="requiretls-not-asked"),
    pytest.param(
        FULL,
        {},
        (("RET", "HDRS"), ("ENVID", "id+201+2B2+3D3"), ("REQUIRETLS", None)),
        id="ret-envid-requiretls",
    ),
    pytest.param(FULL, {"dsn": False}, (("REQUIRETLS", None),), id="no-dsn-drops-ret-envid"),
    pytest.param(
        FULL,
        {"requiretls": False},
        (("RET", "HDRS"), ("ENVID", "id+201+2B2+3D3")),
        id="requiretls-not-allowed",
    ),
    pytest.param(
        FULL,
        {"size": 99, "body": "8BITMIME", "smtputf8": True},
        (
            ("SIZE", "99"),
            ("BODY", "8BITMIME"),
            ("SMTPUTF8", None),
            ("RET", "HDRS"),
            ("ENVID", "id+201+2B2+3D3"),
            ("REQUIRETLS", None),
        ),
        id="all-in-stable-order",
    ),
    pytest.param(Envelope(None, "r@x.example", ret="FULL"), {}, (("RET", "FULL"),), id="ret-full"),
]


@pytest.mark.parametrize(("envelope", "kwargs", "expected"), MAIL_CASES)
def test_mail_parameters(
    envelope: Envelope, kwargs: dict[str, Any], expected: tuple[tuple[str, str | None], ...]
) -> None:
    assert envelope.mail_parameters(**kwargs) == expected


@pytest.mark.parametrize(
    "kwargs",
    [pytest.param({"size": -1}, id="negative-size"), pytest.param({"body": "8BIT"}, id="bad-body")],
)
def test_mail_parameters_refuse(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - plain ValueError by design
        PLAIN.mail_parameters(**kwargs)


@pytest.mark.parametrize(
    ("sender", "recipients", "expected"),
    [
        pytest.param("s@x.example", ["r@x.example"], False, id="ascii"),
        pytest.param("jörg@x.example", ["r@x.example"], True, id="utf8-sender"),
        pytest.param(None, ["r@x.example", "δ@x.example"], True, id="utf8-recipient"),
        pytest.param("s@bücher.example", ["r@bücher.example"], False, id="idn-only"),
    ],
)
def test_envelope_needs_smtputf8(sender: Any, recipients: list[str], expected: bool) -> None:
    assert Envelope(sender, recipients).needs_smtputf8 is expected


def test_envelopes_are_values() -> None:
    one = Envelope("s@x.example", ["r@x.example"], notify="FAILURE")
    two = Envelope("s@x.example", [Recipient("r@x.example", notify="FAILURE")], notify="FAILURE")
    assert one == two
    assert hash(one) == hash(two)
    assert attrs.evolve(one, requiretls=True).requiretls is True
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        one.requiretls = True  # type: ignore[misc]


# -- from_message --------------------------------------------------------------------------

FROM_MESSAGE_CASES = [
    pytest.param(
        b"From: A <a@x.example>\nTo: b@x.example, C <c@x.example>\n\n",
        "a@x.example",
        ["b@x.example", "c@x.example"],
        id="from-to",
    ),
    pytest.param(
        b"From: a@x.example\nSender: s@x.example\nTo: b@x.example\n\n",
        "s@x.example",
        ["b@x.example"],
        id="sender-wins",
    ),
    pytest.param(
        b"From: a@x.example, z@x.example\nTo: b@x.example\n\n",
        "a@x.example",
        ["b@x.example"],
        id="first-from",
    ),
    pytest.param(
        b"From: a@x.example\nTo: b@x.example\nCc: c@x.example\nBcc: d@x.example\n\n",
        "a@x.example",
        ["b@x.example", "c@x.example", "d@x.example"],
        id="to-cc-bcc",
    ),
    pytest.param(
        b"From: a@x.example\nTo: undisclosed-recipients:;\nBcc: d@x.example, b@x.example\n\n",
        "a@x.example",
        ["d@x.example", "b@x.example"],
        id="only-bcc",
    ),
    pytest.param(
        b"From: a@x.example\nTo: b@x.example, b@X.example\nCc: b@x.example\n\n",
        "a@x.example",
        ["b@x.example"],
        id="duplicates",
    ),
    pytest.param(
        b"Resent-From: r@x.example\nResent-To: t1@x.example\nResent-Cc: t2@x.example\n"
        b"Resent-Bcc: t3@x.example\nFrom: a@x.example\nTo: b@x.example\n\n",
        "r@x.example",
        ["t1@x.example", "t2@x.example", "t3@x.example"],
        id="resent",
    ),
    pytest.param(
        b"Resent-Sender: rs@x.example\nResent-From: r@x.example\nResent-To: t1@x.example\n"
        b"From: a@x.example\nTo: b@x.example\n\n",
        "rs@x.example",
        ["t1@x.example"],
        id="resent-sender-wins",
    ),
    pytest.param(
        b"Resent-From: new@x.example\nResent-To: n@x.example\nReceived: by relay\n"
        b"Resent-From: old@x.example\nResent-To: o@x.example\n"
        b"From: a@x.example\nTo: b@x.example\n\n",
        "new@x.example",
        ["n@x.example"],
        id="most-recent-resent-block",
    ),
]


@pytest.mark.parametrize(("raw", "sender", "recipients"), FROM_MESSAGE_CASES)
def test_from_message(raw: bytes, sender: str, recipients: list[str]) -> None:
    envelope = Envelope.from_message(Message.from_bytes(raw + b"body\n"))
    assert envelope.sender == addr(sender)
    assert [r.address for r in envelope.recipients] == [addr(r) for r in recipients]


def test_from_message_includes_built_bcc() -> None:
    message = Message.build(
        sender="a@x.example", to="b@x.example", bcc=["hidden@x.example"], text="t"
    )
    envelope = Envelope.from_message(message)
    assert [r.address for r in envelope.recipients] == [
        addr("b@x.example"),
        addr("hidden@x.example"),
    ]
    assert b"hidden" not in message.as_bytes()


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        pytest.param(b"To: b@x.example\n\n", MessageError, id="no-sender"),
        pytest.param(b"From: a@x.example\n\n", MessageError, id="no-recipient"),
        pytest.param(b"From: a@x.example\nTo: nobody\n\n", InvalidAddress, id="bad-recipient"),
        pytest.param(
            b"Resent-From: r@x.example\nFrom: a@x.example\nTo: b@x.example\n\n",
            MessageError,
            id="resent-block-without-recipients",
        ),
    ],
)
def test_from_message_refuses(raw: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        Envelope.from_message(Message.from_bytes(raw))


# -- property: from_message agrees with the header fields -------------------------------------

local_parts = st.from_regex(r"[a-z0-9]{1,6}(\.[a-z0-9]{1,6})?", fullmatch=True)
domains = st.sampled_from(["x.example", "y.test", "bücher.example", "[192.0.2.7]"])
addresses = st.builds(lambda local, domain: addr(f"{local}@{domain}"), local_parts, domains)
address_lists = st.lists(addresses, max_size=3)
display_names = st.sampled_from(["", "Ann", "Doe, J", "Zoë"])


def render(name: str, addresses: list[Address], names: list[str]) -> bytes:
    parts = []
    for address, display in zip(addresses, names, strict=False):
        text = f"{address.local_part}@{address.ascii_domain}"
        parts.append(f'"{display}" <{text}>' if display else text)
    value = ", ".join(parts) if parts else "undisclosed-recipients:;"
    return f"{name}: {value}\r\n".encode()


@st.composite
def header_sets(draw: st.DrawFn) -> tuple[bytes, dict[str, list[Address]], bool]:
    """A header block of address fields, the addresses per field, and whether
    a resent block was written on top."""
    fields: dict[str, list[Address]] = {}
    raw = b""
    resent = draw(st.booleans())
    names = ["From", "Sender", "To", "Cc", "Bcc"]
    if resent:
        names = ["Resent-From", "Resent-Sender", "Resent-To", "Resent-Cc", "Resent-Bcc", *names]
    for name in names:
        if draw(st.booleans()):
            continue
        found = draw(address_lists)
        fields[name] = found
        labels = draw(st.lists(display_names, min_size=len(found), max_size=len(found)))
        raw += render(name, found, labels)
        if resent and name == "Resent-Bcc":
            raw += b"Received: from relay by relay; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    return raw + b"\r\nbody\r\n", fields, resent


@given(header_sets())
def test_property_from_message_agrees_with_the_headers(
    case: tuple[bytes, dict[str, list[Address]], bool],
) -> None:
    raw, fields, resent = case
    message = Message.from_bytes(raw)
    prefix = "Resent-" if resent and any(k.startswith("Resent-") for k in fields) else ""
    senders = fields.get(prefix + "Sender") or fields.get(prefix + "From") or []
    expected: list[Address] = []
    for name in ("To", "Cc", "Bcc"):
        for address in fields.get(prefix + name, []):
            if address not in expected:
                expected.append(address)
    if not senders or not expected:
        with pytest.raises(MessageError):
            Envelope.from_message(message)
        return
    envelope = Envelope.from_message(message)
    assert envelope.sender == senders[0]
    assert [r.address for r in envelope.recipients] == expected
    # Blind fields never reach the wire, whatever the block.
    assert b"Bcc" not in message.as_bytes()


# -- from_message on built messages: the recorded addresses ---------------------------------

BUILT_CASES = [
    pytest.param({"to": "b@x.example"}, id="to"),
    pytest.param(
        {"to": ["b@x.example", ("Doe, J", "j@y.test")], "cc": "c@x.example", "bcc": "d@x.example"},
        id="to-cc-bcc",
    ),
    pytest.param({"bcc": ["d@x.example", "b@x.example"]}, id="only-bcc"),
    pytest.param({"to": ["b@x.example", "B@x.example"], "cc": "b@x.example"}, id="duplicates"),
    pytest.param({"to": "zoë@bücher.example"}, id="smtputf8-general-path"),
    pytest.param({"to": "b@x.example", "subject": "=?x?="}, id="general-path"),
]


@pytest.mark.parametrize("kwargs", BUILT_CASES)
def test_from_message_uses_the_addresses_build_was_given(kwargs: dict[str, Any]) -> None:
    message = Message.build(sender=("Ann", "a@x.example"), text="t", **kwargs)
    # No header text is parsed for a built message ...
    with mock.patch("mailrelay.message._ADDRESS_PARSER", side_effect=AssertionError("parsed")):
        envelope = Envelope.from_message(message)
    # ... and the result is what reading the header fields gives.
    assert envelope == Envelope.from_message(attrs.evolve(message, envelope_addresses=None))
    assert envelope.sender == addr("a@x.example")


@pytest.mark.parametrize(
    ("headers", "sender", "recipients"),
    [
        pytest.param({"Sender": "s@x.example"}, "s@x.example", ["b@x.example"], id="sender"),
        pytest.param(
            {"Resent-From": "r@x.example", "Resent-To": "t@x.example"},
            "r@x.example",
            ["t@x.example"],
            id="resent",
        ),
    ],
)
def test_built_messages_with_sender_or_resent_fields_read_their_headers(
    headers: dict[str, str], sender: str, recipients: list[str]
) -> None:
    message = Message.build(sender="a@x.example", to="b@x.example", headers=headers)
    envelope = Envelope.from_message(message)
    assert envelope.sender == addr(sender)
    assert [r.address for r in envelope.recipients] == [addr(r) for r in recipients]


def test_built_message_without_recipients_is_refused() -> None:
    message = Message.build(sender="a@x.example", text="t")
    with pytest.raises(MessageError, match="no recipient"):
        Envelope.from_message(message)


# -- fast builders: the same values as the constructors --------------------------------------


def _rendered(value: object) -> object:
    """What ``repr`` shows of ``value``, with each set's members in a fixed order (a set's
    own repr follows its iteration order, which two equal sets need not share)."""
    if attrs.has(type(value)):
        cls = cast("type[AttrsInstance]", type(value))
        return (
            cls.__name__,
            tuple(
                (field.name, _rendered(getattr(value, field.name)))
                for field in attrs.fields(cls)
                if field.repr
            ),
        )
    if isinstance(value, frozenset | set):
        return (type(value).__name__, tuple(sorted(repr(member) for member in value)))
    if isinstance(value, tuple | list):
        return (type(value).__name__, tuple(_rendered(member) for member in value))
    return repr(value)


def same_value(fast: Envelope | Recipient, slow: Envelope | Recipient) -> None:
    """Equal, of the same class, every field equal in value and type, same hash, and the
    same repr (up to the order in which a set lists its members)."""
    assert type(fast) is type(slow)
    assert fast == slow
    for field in attrs.fields(type(slow)):
        a, b = getattr(fast, field.name), getattr(slow, field.name)
        assert type(a) is type(b), field.name
        assert a == b, field.name
    assert hash(fast) == hash(slow)
    assert _rendered(fast) == _rendered(slow)
    assert repr(fast).startswith(f"{type(slow).__name__}(")


notify_sets = st.none() | st.sampled_from(
    [
        frozenset({Notify.NEVER}),
        frozenset({Notify.SUCCESS, Notify.FAILURE}),
        frozenset({Notify.SUCCESS, Notify.FAILURE, Notify.DELAY}),
    ]
)


@given(addresses, st.lists(addresses, min_size=1, max_size=4))
def test_plain_envelope_equals_the_constructor(sender: Address, recipients: list[Address]) -> None:
    fast = _plain_envelope(sender, tuple(recipients))
    slow = Envelope(str(sender), [str(a) for a in recipients])
    same_value(fast, slow)
    for fast_recipient, slow_recipient in zip(fast.recipients, slow.recipients, strict=True):
        same_value(fast_recipient, slow_recipient)


@given(st.lists(addresses, min_size=1, max_size=4), notify_sets)
def test_address_recipients_equal_parsed_ones(
    recipients: list[Address], notify: frozenset[Notify] | None
) -> None:
    # Envelope builds the Recipient of an Address item directly (_new_recipient).
    fast = Envelope(None, recipients, notify=notify)
    slow = Envelope(None, [Recipient(str(a)) for a in recipients], notify=notify)
    same_value(fast, slow)
    for fast_recipient, slow_recipient in zip(fast.recipients, slow.recipients, strict=True):
        same_value(fast_recipient, slow_recipient)
    for address in recipients:
        same_value(_new_recipient(address, notify), Recipient(address, notify=notify))


@given(addresses, st.lists(addresses, min_size=1, max_size=3), st.lists(addresses, max_size=2))
def test_from_message_of_a_built_message_equals_the_constructor(
    sender: Address, to: list[Address], bcc: list[Address]
) -> None:
    message = Message.build(sender=sender, to=to, bcc=bcc, text="t")
    fast = Envelope.from_message(message)
    slow = Envelope(str(sender), [str(a) for a in (*to, *bcc)])
    same_value(fast, slow)
    for fast_recipient, slow_recipient in zip(fast.recipients, slow.recipients, strict=True):
        same_value(fast_recipient, slow_recipient)


def test_from_message_builds_the_class_it_is_called_on() -> None:
    class Mine(Envelope):
        pass

    message = Message.build(sender="a@x.example", to="b@x.example", text="t")
    envelope = Mine.from_message(message)
    assert type(envelope) is Mine
    assert attrs.astuple(envelope, recurse=False) == attrs.astuple(
        Envelope("a@x.example", "b@x.example"), recurse=False
    )
