"""Inline parts of a built message's HTML (``Attachment.content_id``): RFC 2387
``multipart/related``, RFC 2392 ``cid:`` URLs, in both of ``Message.build``'s writers.

The trees are read back with the standard library's parser (``policy=default``); a
message goes through a real server (aiosmtpd on loopback) unchanged, and a DKIM-signed
one verifies with dkimpy, given the public key the test zone publishes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import dkim  # type: ignore[import-untyped]  # dkimpy ships no type information
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mailrelay.dkim import DKIMSigner
from mailrelay.envelope import Envelope
from mailrelay.errors import MessageError
from mailrelay.message import Attachment, Message
from mailrelay.options import TLS, Timeouts
from tests.peers.aiosmtpd_server import AiosmtpdFactory
from tests.peers.unbound import DKIM_ED25519, DKIM_RSA_2048
from tests.test_message import (
    FIXED,
    boundaries,
    direct_path_only,
    general_path_only,
    parse_back,
    readable,
    same_boundaries,
)
from tests.transport.helpers import FLAVOURS, Flavour, send_with

SENDER = "a@x.example"
LOGO = Attachment(
    filename="logo.png", data=b"\x89PNG\r\n\x1a\n" + bytes(range(256)), content_id="logo@x.example"
)
CHART = Attachment(filename="chart.gif", data=b"GIF89a" + b"\0" * 70, content_id="chart")
PDF = Attachment(filename="report.pdf", data=b"%PDF-1.4\n" * 20)
HTML = '<p><img src="cid:logo@x.example"><img src="cid:chart"></p>'

# Which writer builds the message: the one build() chooses (the direct writer, for
# these shapes) or the email package's.
WRITERS: dict[str, Callable[[], AbstractContextManager[None]]] = {
    "direct": direct_path_only,
    "general": general_path_only,
}


def build(writer: str, **kwargs: Any) -> Message:
    with WRITERS[writer]():
        return Message.build(**{"sender": SENDER, "to": "b@y.example", **FIXED, **kwargs})


# -- the MIME tree ------------------------------------------------------------------

Tree = tuple[Any, ...]


def tree(part: EmailMessage) -> Tree:
    """A part's shape: ``(type, related type=, [children])`` for a multipart, ``(type,
    disposition, filename, Content-ID)`` for a leaf."""
    assert not part.defects, part.defects
    if part.is_multipart():
        children = [tree(child) for child in part.iter_parts()]  # type: ignore[arg-type]
        return (part.get_content_type(), part.get_param("type"), children)
    content_id = part.get("Content-ID")
    return (
        part.get_content_type(),
        part.get_content_disposition(),
        part.get_filename(),
        None if content_id is None else str(content_id),
    )


PLAIN: Tree = ("text/plain", None, None, None)
PAGE: Tree = ("text/html", None, None, None)
LOGO_PART: Tree = ("image/png", "inline", "logo.png", "<logo@x.example>")
CHART_PART: Tree = ("image/gif", "inline", "chart.gif", "<chart>")
PDF_PART: Tree = ("application/pdf", "attachment", "report.pdf", None)
RELATED_1: Tree = ("multipart/related", "text/html", [PAGE, LOGO_PART])
RELATED_2: Tree = ("multipart/related", "text/html", [PAGE, LOGO_PART, CHART_PART])

TREE_CASES = [
    pytest.param({"html": HTML, "attachments": [LOGO]}, RELATED_1, id="html+1"),
    pytest.param({"html": HTML, "attachments": [LOGO, CHART]}, RELATED_2, id="html+2"),
    pytest.param(
        {"text": "t\n", "html": HTML, "attachments": [LOGO]},
        ("multipart/alternative", None, [PLAIN, RELATED_1]),
        id="text+html+1",
    ),
    pytest.param(
        {"text": "t\n", "html": HTML, "attachments": [LOGO, CHART]},
        ("multipart/alternative", None, [PLAIN, RELATED_2]),
        id="text+html+2",
    ),
    pytest.param(
        {"html": HTML, "attachments": [LOGO, PDF]},
        ("multipart/mixed", None, [RELATED_1, PDF_PART]),
        id="html+1+attachment",
    ),
    pytest.param(
        # Inline and plain attachments in any order: each kind keeps its own order.
        {"text": "t\n", "html": HTML, "attachments": [PDF, LOGO, PDF, CHART]},
        (
            "multipart/mixed",
            None,
            [("multipart/alternative", None, [PLAIN, RELATED_2]), PDF_PART, PDF_PART],
        ),
        id="text+html+2+attachments",
    ),
    pytest.param(
        {"text": "t\n", "html": HTML, "attachments": [PDF]},
        ("multipart/mixed", None, [("multipart/alternative", None, [PLAIN, PAGE]), PDF_PART]),
        id="no-inline-unchanged",
    ),
    pytest.param({"html": HTML}, PAGE, id="html-only-unchanged"),
]


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize(("kwargs", "shape"), TREE_CASES)
def test_mime_tree(writer: str, kwargs: dict[str, Any], shape: Tree) -> None:
    message = build(writer, **kwargs)
    parsed = parse_back(message)
    assert tree(parsed) == shape
    wire = message.as_bytes()
    # One boundary per multipart, all different (RFC 2046 §5.1.1), each closed once.
    found = boundaries(wire)
    assert len(found) == len(set(found)) == str(shape).count("multipart/")
    for boundary in found:
        assert wire.count(b"\r\n--" + boundary + b"--\r\n") == 1
    assert (message.needs_8bitmime, message.needs_smtputf8) == (False, False)
    # The inline parts' bytes come back unchanged.
    by_id = {
        str(part["Content-ID"]): part.get_payload(decode=True)
        for part in parsed.walk()
        if part["Content-ID"] is not None
    }
    given = [item for item in kwargs.get("attachments", ()) if item.content_id]
    assert by_id == {f"<{item.content_id}>": item.data for item in given}
    # The HTML is the root: the first part of the related part (RFC 2387 §3.2).
    page = parsed.get_body(("html",))
    assert page is not None
    assert page.get_content() == HTML + "\n"


def test_the_related_content_type_is_folded_and_read_whole() -> None:
    message = build("direct", html=HTML, attachments=[LOGO])
    (content_type,) = message.get_all("Content-Type")
    assert re.fullmatch(
        r'multipart/related; type="text/html"; boundary="=_[0-9a-f]{24}"', content_type
    )
    head = message.as_bytes().partition(b"\r\n\r\n")[0]
    assert b'Content-Type: multipart/related; type="text/html";\r\n boundary="=_' in head
    assert max(len(line) for line in message.as_bytes().split(b"\r\n")) <= 78


@pytest.mark.parametrize(("kwargs", "shape"), TREE_CASES)
def test_both_writers_write_the_same_bytes(kwargs: dict[str, Any], shape: Tree) -> None:
    # As for the shapes without inline parts (tests/test_message.py): ASCII text with
    # short lines gives the very bytes the email package gives, boundaries apart.
    direct = build("direct", **kwargs)
    general = build("general", **kwargs)
    mine, theirs = same_boundaries(direct.as_bytes(), general.as_bytes())
    assert mine == theirs
    # The same unfolded fields, the top-level boundary apart.
    assert [unbounded(field) for field in direct.headers] == [
        unbounded(field) for field in general.headers
    ]


def unbounded(field: tuple[str, str]) -> tuple[str, str]:
    name, value = field
    return name, re.sub(r'boundary="[^"]*"', 'boundary=""', value)


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param(
            {"subject": "Grüße", "text": "Grüße\n", "html": "<p>Grüße</p>" + HTML}, id="rfc2047"
        ),
        pytest.param({"html": "x" * 200 + HTML}, id="long-html-line"),
    ],
)
def test_both_writers_read_the_same(kwargs: dict[str, Any]) -> None:
    files: dict[str, Any] = {
        "attachments": [LOGO, Attachment(filename="Grüße.png", data=b"x", content_id="g")]
    }
    chosen = Message.build(sender=SENDER, to="b@y.example", **FIXED, **kwargs, **files)
    with general_path_only():
        general = Message.build(sender=SENDER, to="b@y.example", **FIXED, **kwargs, **files)
    assert readable(chosen) == readable(general)
    assert [name for name, _ in chosen.headers] == [name for name, _ in general.headers]


def test_smtputf8_form_keeps_the_inline_parts() -> None:
    # A non-ASCII local part: the whole message in RFC 6532 form, by the email package.
    message = Message.build(
        sender="zoë@x.example", to="b@y.example", html=HTML, attachments=[LOGO, CHART]
    )
    assert message.needs_smtputf8
    assert tree(parse_back(message)) == RELATED_2


def test_non_ascii_inline_file_name_uses_rfc2231() -> None:
    item = Attachment(filename="Grüße.png", data=b"x", content_id="g@x.example")
    message = Message.build(sender=SENDER, html='<img src="cid:g@x.example">', attachments=[item])
    assert b"Content-Disposition: inline; filename*=utf-8''Gr%C3%BC%C3%9Fe.png\r\n" in (
        message.as_bytes()
    )
    (part,) = [part for part in parse_back(message).walk() if part["Content-ID"]]
    assert part.get_filename() == "Grüße.png"


def test_the_longest_content_id_fits_a_line() -> None:
    longest = "x" * 980 + "@x.y"
    message = Message.build(
        sender=SENDER,
        html=f'<img src="cid:{longest}">',
        attachments=[Attachment(filename="a.png", data=b"x", content_id=longest)],
    )
    lines = message.as_bytes().split(b"\r\n")
    assert f"Content-ID: <{longest}>".encode() in lines
    assert max(map(len, lines)) == 998  # RFC 5322 §2.1.1


# -- validation -----------------------------------------------------------------------

GOOD_IDS = [
    ("logo", "cid:logo"),
    ("logo@example.org", "cid:logo@example.org"),
    ("part1.06090408.01060107@example.org", "cid:part1.06090408.01060107@example.org"),
    ("a+b=c@[127.0.0.1]", "cid:a+b=c@[127.0.0.1]".replace("[", "%5B").replace("]", "%5D")),
    ("100%@x", "cid:100%25@x"),  # RFC 2392 §2: "%" is written %25
    ("a&b?c#d@x", "cid:a%26b%3Fc%23d@x"),
    ("{x}|y^z`@x", "cid:%7Bx%7D%7Cy%5Ez%60@x"),
    ("x" * 984, "cid:" + "x" * 984),
]


@pytest.mark.parametrize(("content_id", "url"), GOOD_IDS)
def test_good_content_ids(content_id: str, url: str) -> None:
    item = Attachment(filename="a.png", data=b"x", content_id=content_id)
    assert item.cid_url == url
    assert unquote(url.removeprefix("cid:")) == content_id  # RFC 2392 §2, read back
    message = Message.build(sender=SENDER, html=f'<img src="{url}">', attachments=[item])
    (part,) = [part for part in parse_back(message).walk() if part["Content-ID"]]
    assert str(part["Content-ID"]) == f"<{content_id}>"


BAD_IDS = [
    pytest.param("", "invalid content_id", id="empty"),
    pytest.param("<logo@x>", "without angle brackets", id="brackets"),
    pytest.param("<logo", "without angle brackets", id="open-bracket"),
    pytest.param("logo>", "without angle brackets", id="close-bracket"),
    pytest.param("lo<go", "invalid content_id", id="bracket-inside"),
    pytest.param("a@[x<y]", "invalid content_id", id="bracket-in-literal"),
    pytest.param("lo go", "invalid content_id", id="space"),
    pytest.param("logo\r\nX-Evil: 1", "line break", id="crlf"),
    pytest.param("logo\n", "line break", id="lf"),
    pytest.param("lo\x00go", "line break", id="nul"),
    pytest.param("lo\u2028go", "line break", id="line-separator"),
    pytest.param("lo\ud800go", "surrogate", id="surrogate"),
    pytest.param("a@b@c", "invalid content_id", id="two-ats"),
    pytest.param("a..b@x", "invalid content_id", id="double-dot"),
    pytest.param(".a@x", "invalid content_id", id="leading-dot"),
    pytest.param("a.@x", "invalid content_id", id="trailing-dot"),
    pytest.param("a@", "invalid content_id", id="no-right"),
    pytest.param("@x", "invalid content_id", id="no-left"),
    pytest.param('"a"@x', "invalid content_id", id="quoted"),
    pytest.param("a,b@x", "invalid content_id", id="comma"),
    pytest.param("a(b)@x", "invalid content_id", id="comment"),
    pytest.param("logö@x", "invalid content_id", id="non-ascii"),
    pytest.param("x" * 985, "over the limit of 984", id="too-long"),
    pytest.param(b"logo", "must be a string", id="bytes"),
]


@pytest.mark.parametrize(("content_id", "message"), BAD_IDS)
def test_bad_content_ids(content_id: Any, message: str) -> None:
    with pytest.raises(MessageError, match=re.escape(message)):
        Attachment(filename="a.png", data=b"x", content_id=content_id)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param(
            {
                "html": HTML,
                "attachments": [
                    LOGO,
                    Attachment(filename="b", data=b"", content_id="logo@x.example"),
                ],
            },
            "two inline attachments have the content_id 'logo@x.example'",
            id="duplicate",
        ),
        pytest.param(
            {
                "html": HTML,
                "attachments": [CHART, PDF, Attachment(filename="b", data=b"", content_id="CHART")],
            },
            "two inline attachments have the content_id 'CHART'",
            id="duplicate-but-case",
        ),
        pytest.param({"text": "t", "attachments": [LOGO]}, "need html=", id="text-only"),
        pytest.param({"attachments": [PDF, LOGO]}, "need html=", id="no-body"),
    ],
)
def test_build_refuses(kwargs: dict[str, Any], message: str) -> None:
    for writer in WRITERS:
        with pytest.raises(MessageError, match=re.escape(message)):
            build(writer, **kwargs)


def test_an_attachment_has_no_cid_url() -> None:
    with pytest.raises(MessageError, match="no content_id"):
        PDF.cid_url  # noqa: B018  # the property raises


# -- Attachment.inline ----------------------------------------------------------------


def test_inline_makes_fresh_unique_ids() -> None:
    made = [Attachment.inline("logo.png", b"x") for _ in range(50)]
    ids = {item.content_id for item in made}
    assert len(ids) == 50
    for item in made:
        assert re.fullmatch(r"[0-9a-f]{32}@inline\.invalid", item.content_id or "")
        assert item.cid_url == f"cid:{item.content_id}"
        assert item.resolved_content_type() == "image/png"
    branded = Attachment.inline("c.svg", b"<svg/>", "image/svg+xml", domain="news.example.org")
    assert (branded.content_id or "").endswith("@news.example.org")
    assert branded.content_type == "image/svg+xml"


@pytest.mark.parametrize("domain", ["", "a b", "a@b", "x..y", "<x>", "x\r\ny"])
def test_inline_refuses_a_bad_domain(domain: str) -> None:
    with pytest.raises(MessageError):
        Attachment.inline("logo.png", b"x", domain=domain)


# -- property: every build reads back, every cid: resolves ------------------------------

ATEXT = "abcXYZ019!#$%&'*+/=?^_`{|}~-"
dot_atoms = st.lists(
    st.text(st.sampled_from(ATEXT), min_size=1, max_size=6), min_size=1, max_size=3
).map(".".join)
literals = st.text(st.sampled_from("0123456789.:abIPv6!~"), max_size=12).map(
    lambda text: f"[{text}]"
)
content_ids = st.one_of(
    dot_atoms,
    st.tuples(dot_atoms, st.one_of(dot_atoms, literals)).map("@".join),
)
# (Without white space at either end, which the email package's reader strips.)
file_names = (
    st.text(st.sampled_from(list("abc. -_;=()'%*~éü例")), min_size=1, max_size=20)
    .map(str.strip)
    .filter(bool)
)
inline_parts = st.lists(
    st.builds(
        Attachment,
        filename=file_names,
        data=st.binary(max_size=300),
        content_type=st.sampled_from(
            [None, "image/png", "image/gif", "text/css", "application/x-y"]
        ),
        content_id=content_ids,
    ),
    min_size=1,
    max_size=4,
    unique_by=lambda item: (item.content_id or "").lower(),
)
plain_parts = st.lists(
    st.builds(Attachment, filename=file_names, data=st.binary(max_size=100)), max_size=2
)


def cids_in(html: str) -> Iterator[str]:
    """The content ids the ``cid:`` URLs of ``html`` name (RFC 2392 §2: %-decoded)."""
    for url in re.findall(r'src="cid:([^"]*)"', html):
        yield unquote(url)


@given(
    inline=inline_parts,
    plain=plain_parts,
    text=st.none() | st.text(st.sampled_from("ab é\n"), max_size=40),
    before=st.text(st.sampled_from("<p>ab é\n"), max_size=40),
    mixing=st.randoms(use_true_random=False),
    writer=st.sampled_from(["chosen", "general"]),
    utf8=st.booleans(),
)
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_property_inline_parts_read_back(
    *,
    inline: list[Attachment],
    plain: list[Attachment],
    text: str | None,
    before: str,
    mixing: Any,
    writer: str,
    utf8: bool,
) -> None:
    html = before + "".join(f'<img src="{item.cid_url}" alt="">' for item in inline)
    files = [*inline, *plain]
    mixing.shuffle(files)
    context = general_path_only() if writer == "general" else nullcontext()
    with context:
        message = Message.build(
            sender="zoë@x.example" if utf8 else SENDER,
            to="b@y.example",
            text=text,
            html=html,
            attachments=files,
        )
    event(f"{writer} writer, {'SMTPUTF8 form' if utf8 else '7-bit'}")
    assert message.needs_smtputf8 == utf8
    parsed = parse_back(message)
    related = [part for part in parsed.walk() if part.get_content_type() == "multipart/related"]
    assert len(related) == 1
    assert related[0].get_param("type") == "text/html"
    root, *others = related[0].iter_parts()
    assert root.get_content_type() == "text/html"
    # The same parts, in the order given, with the same ids, names and bytes.
    assert [
        (str(part["Content-ID"]), part.get_filename(), part.get_payload(decode=True))
        for part in others
    ] == [(f"<{item.content_id}>", item.filename, item.data) for item in files if item.content_id]
    assert all(part.get_content_disposition() == "inline" for part in others)
    # Plain attachments stay outside the related part, in their order.
    attached = [part for part in parsed.walk() if part.get_content_disposition() == "attachment"]
    assert [part.get_payload(decode=True) for part in attached] == [
        item.data for item in files if not item.content_id
    ]
    # Every cid: URL of the HTML names exactly one part of the message.
    every_id = [str(part["Content-ID"]) for part in parsed.walk() if part["Content-ID"]]
    shown = root.get_content()
    named = list(cids_in(shown))
    assert len(named) == len(inline)
    for content_id in named:
        assert every_id.count(f"<{content_id}>") == 1


# -- through a real server, and DKIM ---------------------------------------------------


def inline_message() -> Message:
    logo = Attachment.inline("logo.png", LOGO.data, domain="x.example")
    return Message.build(
        sender="ann@dkim.test",
        to="bob@mailrelay.test",
        subject="Our logo",
        text="Our logo.\n",
        html=f'<p>Our logo: <img src="{logo.cid_url}" alt="logo"></p>',
        attachments=[logo, PDF],
    )


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_sent_through_a_real_server_unchanged(
    flavour: Flavour, make_aiosmtpd: AiosmtpdFactory
) -> None:
    server = make_aiosmtpd(starttls=False, auth=False)
    message = inline_message()
    result = send_with(
        flavour,
        message,
        Envelope.from_message(message),
        host=server.host,
        port=server.port,
        tls=TLS.NONE,
        timeouts=Timeouts.all(10),
    )
    assert result.ok
    (received,) = server.messages
    assert received.content == message.as_bytes()
    assert not any(
        option.startswith(("BODY=8BITMIME", "SMTPUTF8")) for option in received.mail_options
    )
    assert tree(parse_back(Message.from_bytes(received.content)))[0] == "multipart/mixed"


KEYS = Path(__file__).parent / "data" / "dkim"
RECORDS = {
    b"sel-rsa._domainkey.dkim.test.": DKIM_RSA_2048,
    b"sel-ed._domainkey.dkim.test.": DKIM_ED25519,
}


def published(name: bytes, timeout: float = 5) -> bytes | None:
    """dkimpy's TXT lookup, answered with the records the test zone publishes."""
    record = RECORDS.get(name if name.endswith(b".") else name + b".")
    return None if record is None else record.encode("ascii")


@pytest.mark.parametrize("canonicalization", ["relaxed/relaxed", "simple/simple"])
@pytest.mark.parametrize(
    ("selector", "key"), [("sel-rsa", "rsa2048.pem"), ("sel-ed", "ed25519.pem")]
)
def test_dkim_signed_inline_message_verifies(
    canonicalization: str, selector: str, key: str
) -> None:
    signer = DKIMSigner(
        domain="dkim.test",
        selector=selector,
        private_key=(KEYS / key).read_bytes(),
        canonicalization=canonicalization,
    )
    signed = signer.sign(inline_message()).as_bytes()
    assert dkim.verify(signed, dnsfunc=published)
    # The verifier really checked the body: one changed byte of the image fails.
    body_start = signed.index(b"\r\n\r\n")
    encoded = re.search(rb"Content-ID: <[^>]+>\r\n\r\n(.)", signed[body_start:])
    assert encoded is not None
    at = body_start + encoded.start(1)
    flipped = signed[:at] + (b"A" if signed[at : at + 1] != b"A" else b"B") + signed[at + 1 :]
    assert not dkim.verify(flipped, dnsfunc=published)
