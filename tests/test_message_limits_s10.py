"""Tests for Message.build's size limits and linear folding.

What :meth:`Message.from_bytes` refuses (a header block over ``MAX_HEADER_BYTES``),
``build`` refuses too, before it writes anything; what it accepts reads back. Long
values, long display names and long address lists are written in time linear in their
length (the email package's folder is quadratic: a 1.2 MB custom field used to hang
``build`` for minutes).
"""

from __future__ import annotations

import email.header
import email.headerregistry
import email.policy
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mailrelay import _mime
from mailrelay._buildargs import (
    MAX_DISPLAY_NAME_CHARS,
    MAX_FIELD_NAME_CHARS,
    MAX_FILENAME_CHARS,
    MAX_LINE_CHARS,
    MAX_MAILBOX_TEXT_CHARS,
    MAX_STRUCTURED_CHARS,
    MAX_TYPE_NAME_CHARS,
)
from mailrelay.address import Address
from mailrelay.errors import MessageError
from mailrelay.message import MAX_HEADER_BYTES, Attachment, ListHeaders, Message

SENDER = "a@x.example"


def many_addresses(count: int, domain: str = "example.org") -> list[str]:
    return [f"user{index}@{domain}" for index in range(count)]


def head_of(message: Message) -> bytes:
    wire = message.as_bytes()
    return wire[: wire.find(b"\r\n\r\n") + 4]


def without_bcc(headers: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    return tuple((name, value) for name, value in headers if name.lower() != "bcc")


@contextmanager
def nothing_written() -> Iterator[None]:
    """Fail the test if build() reaches either writer."""
    refuse = AssertionError("a writer was reached")
    with (
        mock.patch("mailrelay.message.MIMEPart", side_effect=refuse),
        mock.patch.object(_mime, "address_list", side_effect=refuse),
        mock.patch.object(_mime, "unstructured", side_effect=refuse),
        mock.patch.object(_mime, "write_body", side_effect=refuse),
    ):
        yield


# Enough mailboxes that their addresses alone pass MAX_HEADER_BYTES.
TOO_MANY = MAX_HEADER_BYTES // len("user10000@example.org, ") + 1000
# Non-white-space text longer than the whole header block may be.
TOO_LONG = "w" * (MAX_HEADER_BYTES + 1)

# (arguments beside sender=, words the error names), all refused before any writing.
REFUSED_UP_FRONT: dict[str, tuple[dict[str, Any], list[str]]] = {
    "To list": ({"to": many_addresses(TOO_MANY)}, ["MAX_HEADER_BYTES", "To"]),
    "Cc list": ({"cc": many_addresses(TOO_MANY)}, ["MAX_HEADER_BYTES", "Cc"]),
    "Bcc list (counted, as the general path parses it)": (
        {"bcc": many_addresses(TOO_MANY)},
        ["MAX_HEADER_BYTES", "Bcc"],
    ),
    "Reply-To list": ({"reply_to": many_addresses(TOO_MANY)}, ["MAX_HEADER_BYTES", "Reply-To"]),
    "SMTPUTF8 To list": (
        {"to": ["ü@x.example", *many_addresses(TOO_MANY)]},
        ["MAX_HEADER_BYTES", "To"],
    ),
    "subject": ({"subject": TOO_LONG}, ["MAX_HEADER_BYTES", "Subject"]),
    "custom field": ({"headers": {"X-Big": TOO_LONG}}, ["MAX_HEADER_BYTES", "X-Big"]),
    "many custom fields": (
        {"headers": [(f"X-F{n}", "v" * 90) for n in range(MAX_HEADER_BYTES // 90)]},
        ["MAX_HEADER_BYTES", "X-F"],
    ),
    "list URIs": (
        {
            "list_headers": ListHeaders(
                help=[f"https://x.example/{n:06}/{'h' * 40}" for n in range(20_000)]
            )
        },
        ["MAX_HEADER_BYTES", "List-Help"],
    ),
    "display name (pair)": (
        {"to": [("n" * (MAX_DISPLAY_NAME_CHARS + 1), "b@x.example")]},
        ["display name", str(MAX_DISPLAY_NAME_CHARS)],
    ),
    "display name (text)": (
        {"to": ['"' + "n " * MAX_DISPLAY_NAME_CHARS + '" <b@x.example>']},
        ["display name", str(MAX_DISPLAY_NAME_CHARS)],
    ),
    "display name of the sender": (
        {"sender": ("é" * (MAX_DISPLAY_NAME_CHARS + 1), SENDER)},
        ["sender", "display name"],
    ),
    "address text": (
        {"cc": ["x" + " " * MAX_MAILBOX_TEXT_CHARS + "<b@x.example>"]},
        ["cc", "address", str(MAX_MAILBOX_TEXT_CHARS)],
    ),
    "address in a pair": (
        {"to": [("N", "b" * MAX_LINE_CHARS + "@x.example")]},
        ["to", "address", str(MAX_LINE_CHARS)],
    ),
    "header name": (
        {"headers": {"X-" + "N" * MAX_FIELD_NAME_CHARS: "v"}},
        ["header name", str(MAX_FIELD_NAME_CHARS)],
    ),
    "structured custom field": (
        {"headers": {"Resent-To": ", ".join(many_addresses(1000))}},
        ["Resent-To", str(MAX_STRUCTURED_CHARS)],
    ),
    "message_id": (
        {"message_id": "m" * MAX_LINE_CHARS + "@x.example"},
        ["message_id", str(MAX_LINE_CHARS)],
    ),
    "message_id line": ({"message_id": "m" * 980 + "@x.example"}, ["message_id", "984"]),
    "lone surrogate": ({"subject": "caf\udce9"}, ["subject", "UTF-8"]),
}


@pytest.mark.parametrize(
    ("kwargs", "words"), list(REFUSED_UP_FRONT.values()), ids=list(REFUSED_UP_FRONT)
)
def test_refused_before_anything_is_written(kwargs: dict[str, Any], words: list[str]) -> None:
    arguments = {"sender": SENDER, "text": "x", **kwargs}
    with nothing_written(), pytest.raises(MessageError) as caught:
        Message.build(**arguments)
    for word in words:
        assert word in str(caught.value)


ATTACHMENTS_REFUSED: dict[str, tuple[Callable[[], object], list[str]]] = {
    "file name": (
        lambda: Attachment(filename="f" * MAX_FILENAME_CHARS + ".txt", data=b"x"),
        ["attachment filename", str(MAX_FILENAME_CHARS)],
    ),
    "subtype name": (
        lambda: Attachment(
            filename="f.bin", data=b"x", content_type="a/" + "b" * (MAX_TYPE_NAME_CHARS + 1)
        ),
        ["RFC 6838", str(MAX_TYPE_NAME_CHARS)],
    ),
    "content type": (
        lambda: Attachment(filename="f.bin", data=b"x", content_type="a/" + "b" * 300),
        ["content type", str(2 * MAX_TYPE_NAME_CHARS + 1)],
    ),
    "file name of a tuple": (
        lambda: Message.build(sender=SENDER, attachments=[("é" * 1000, b"x")]),
        ["attachment filename"],
    ),
}


@pytest.mark.parametrize(
    ("make", "words"), list(ATTACHMENTS_REFUSED.values()), ids=list(ATTACHMENTS_REFUSED)
)
def test_attachment_limits(make: Callable[[], object], words: list[str]) -> None:
    with pytest.raises(MessageError) as caught:
        make()
    for word in words:
        assert word in str(caught.value)


# (arguments) that pass the up-front estimate but grow past the limit when written
# (encoded-words), refused by the check of what was written.
REFUSED_WHEN_WRITTEN: dict[str, dict[str, Any]] = {
    "non-ASCII subject (direct writer)": {"subject": "é" * (MAX_HEADER_BYTES // 2)},
    "spaces around a long value (general path)": {"headers": {"X-Big": "a " * 600_000}},
    "SMTPUTF8 message (general path)": {
        "to": "ü@x.example",
        "headers": {"X-Big": "é" * (MAX_HEADER_BYTES // 2)},
    },
}


@pytest.mark.parametrize(
    "kwargs", list(REFUSED_WHEN_WRITTEN.values()), ids=list(REFUSED_WHEN_WRITTEN)
)
def test_refused_when_the_written_block_passes_the_limit(kwargs: dict[str, Any]) -> None:
    with pytest.raises(MessageError, match="MAX_HEADER_BYTES"):
        Message.build(sender=SENDER, text="x", **kwargs)


# Just under the limit, through both writers: accepted, and read back the same.
ACCEPTED_NEAR_THE_LIMIT: dict[str, dict[str, Any]] = {
    "To list (direct writer)": {"to": many_addresses(40_000)},
    "To list with a Bcc list": {
        "to": many_addresses(20_000),
        "bcc": many_addresses(20_000, "b.example"),
    },
    "SMTPUTF8 To list (general path)": {"to": ["ü@x.example", *many_addresses(20_000)]},
    "long words (direct writer)": {"subject": " ".join(["word"] * 150_000)},
    "long value (general path)": {"headers": {"X-Big": "\tv " * 150_000 + "end"}},
    "long names (general path)": {
        "to": [("Ünïcode " * 100 + str(n), f"u{n}@x.example") for n in range(200)]
    },
}


@pytest.mark.parametrize(
    "kwargs", list(ACCEPTED_NEAR_THE_LIMIT.values()), ids=list(ACCEPTED_NEAR_THE_LIMIT)
)
def test_accepted_under_the_limit_reads_back(kwargs: dict[str, Any]) -> None:
    message = Message.build(sender=SENDER, text="x", **kwargs)
    head = head_of(message)
    assert len(head) <= MAX_HEADER_BYTES
    assert max(len(line) for line in head.split(b"\r\n")) <= MAX_LINE_CHARS
    again = Message.from_bytes(message.as_bytes())
    assert again.headers == without_bcc(message.headers)
    assert again.as_bytes() == message.as_bytes()


def unfold_and_decode(value: str) -> str:
    """What a reader makes of an unstructured value: unfolded (RFC 5322 §2.2.3), then
    its encoded-words decoded (RFC 2047 §6)."""
    unfolded = re.sub(r"\r\n(?=[ \t])", "", value)
    if "=?" not in unfolded:
        return unfolded
    return str(email.header.make_header(email.header.decode_header(unfolded)))


long_text = st.text(
    st.one_of(
        st.sampled_from(list("a Z\t=?_é€😀\x01 ")),
        st.characters(codec="utf-8", exclude_categories=["Cs", "Zl", "Zp"]),
    ),
    min_size=1,
    max_size=3000,
).map(lambda text: re.sub("[\r\n\x00\x0b\x0c\x1c\x1d\x1e\x85]", "", text) or "x")


@given(name=st.sampled_from(["Subject", "X-A", "X-" + "N" * 100]), value=long_text)
def test_property_long_unstructured_is_exact_and_within_line_limits(name: str, value: str) -> None:
    folded = _mime.long_unstructured(name, value)
    assert unfold_and_decode(folded) == value
    lines = f"{name}: {folded}".split("\r\n")
    assert all(len(line) <= MAX_LINE_CHARS for line in lines)
    assert all(line.strip(" \t") for line in lines[1:]), "a line of white space only"


header_values = st.one_of(
    long_text,
    st.text(max_size=1500),
    st.text(st.characters(exclude_categories=()), max_size=100),  # surrogates too
    st.builds(
        lambda word, count: " ".join([word] * count), st.text(max_size=12), st.integers(0, 300)
    ),
)
display_names = st.one_of(st.just(""), st.text(max_size=1100))


@given(
    subject=st.none() | header_values,
    value=header_values,
    name=display_names,
    field=st.one_of(
        st.just("X-Value"),
        st.sampled_from(["Resent-To", "Sender", "Date", "Message-ID", "Comments"]),
        st.text(max_size=30),
    ),
    count=st.integers(0, 120),
    utf8=st.booleans(),
)
@settings(max_examples=80, suppress_health_check=[HealthCheck.too_slow])
def test_property_build_accepts_or_refuses_and_what_it_accepts_reads_back(
    *, subject: str | None, value: str, name: str, field: str, count: int, utf8: bool
) -> None:
    to: list[Any] = [(name, "b@x.example"), *many_addresses(count)]
    if utf8:
        to.append("ü@x.example")
    try:
        message = Message.build(
            sender=(name, SENDER),
            to=to,
            bcc=many_addresses(count, "b.example"),
            subject=subject,
            headers=[(field, value), ("X-Other", value[:50])],
            text="x",
        )
    except MessageError as exc:
        event("refused: " + str(exc).partition(" ")[0])
        return  # (any other exception fails the test)
    event("built" + (" (large header block)" if count > 40 else ""))
    head = head_of(message)
    assert len(head) <= MAX_HEADER_BYTES
    assert max(len(line) for line in head.split(b"\r\n")) <= MAX_LINE_CHARS
    again = Message.from_bytes(message.as_bytes())
    assert again.headers == without_bcc(message.headers)
    assert [field for field, _ in message.headers if field.lower() != "bcc"] == [
        field for field, _ in again.headers
    ]
    assert message.bcc == tuple(message.bcc)  # built from the arguments
    assert len(message.bcc) == count


# Each case once hung build() (minutes, quadratic folding); each now finishes in well
# under a second. Run in a child process, so that a regression fails the test at the
# timeout instead of hanging the suite.
HANG_SCRIPT = textwrap.dedent(
    """
    from mailrelay.errors import MessageError
    from mailrelay.message import Message

    cases = {
        "review repro": dict(headers={"X-Big": "a " * 600_000}),
        "long spaced value": dict(headers={"X-Big": "a " * 200_000}),
        "long subject": dict(subject="é " * 100_000),
        "SMTPUTF8 To list": dict(to=["ü@x.example"] + [f"u{n}@x.example" for n in range(20_000)]),
        "display name": dict(to=[("n " * 200_000, "b@x.example")]),
    }
    for label, kwargs in cases.items():
        try:
            Message.build(sender="a@x.example", text="x", **kwargs)
            print(label, "built")
        except MessageError:
            print(label, "refused")
    """
)


def test_long_fields_do_not_hang_build() -> None:
    done = subprocess.run(
        [sys.executable, "-c", HANG_SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "review repro refused",
        "long spaced value built",
        "long subject built",
        "SMTPUTF8 To list built",
        "display name refused",
    ]


list_names = st.one_of(
    st.just(""),
    st.sampled_from(["Ann Smith", "Doe, J", "  spaced  ", 'q"uote\\', "=?utf-8?q?x?=", "Zoë"]),
    st.text(st.sampled_from(list("ab Z.,;:<>@()\"'\\é例😀\t=?_")), min_size=1, max_size=120),
)


@given(
    boxes=st.lists(
        st.tuples(list_names, st.from_regex(r"[a-z0-9]{1,10}", fullmatch=True)),
        min_size=1,
        max_size=40,
    )
)
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_property_long_address_lists_read_back_exactly(boxes: list[tuple[str, str]]) -> None:
    mailboxes = [(name, f"{local}@x.example") for name, local in boxes]
    folded = _mime.long_address_list("To", mailboxes)
    lines = f"To: {folded}".split("\r\n")
    for line in lines:
        assert len(line) <= (76 if "=?" in line and '"' not in line else MAX_LINE_CHARS)
        assert line.strip(" \t"), "a line of white space only"
    parsed = email.policy.default.header_factory("To", re.sub(r"\r\n(?=[ \t])", "", folded))
    assert isinstance(parsed, email.headerregistry.AddressHeader)
    # Addresses exactly; display names as the email package reads them, which makes
    # a run of white space in an encoded-word one space (and keeps it in a quoted
    # string), and keeps a space between two adjacent encoded-words that RFC 2047 §6.2
    # says to ignore ('=?utf-8?q?a?= =?utf-8?q?b?=' reads as 'a b'): so white space
    # is left out of this comparison...
    shown = [("".join(a.display_name.split()), a.addr_spec) for a in parsed.addresses]
    assert shown == [("".join(name.split()), spec) for name, spec in mailboxes]
    # ...so each name is checked exactly here, decoded as RFC 2047 §6 reads it.
    for name, spec in mailboxes:
        *phrase, last = _mime._mailbox_tokens(name, spec)
        assert last == (f"<{spec}>" if name else spec)
        text = " ".join(phrase)
        if text.startswith("=?"):
            assert unfold_and_decode(text) == name
        elif text.startswith('"'):
            assert re.sub(r"\\(.)", r"\1", text[1:-1]) == name
        else:
            assert text == name


def test_a_large_header_block_is_written_by_the_linear_folders_and_reads_back() -> None:
    names = ["Ann Smith", "Doe, J", "Zoë Ünïcode", "  spaced  ", "=?utf-8?q?x?="]
    to = [(names[n % len(names)], f"u{n}@x.example") for n in range(2000)]
    message = Message.build(sender=SENDER, to=to, subject="Grüße " * 10, text="x")
    parsed = email.message_from_bytes(message.as_bytes(), policy=email.policy.default)
    field = parsed["To"]
    assert isinstance(field, email.headerregistry.AddressHeader)
    assert [(a.display_name, a.addr_spec) for a in field.addresses] == to
    assert str(parsed["Subject"]) == "Grüße " * 10
    assert message.get_addresses("To") == tuple(Address.parse(spec) for _, spec in to)
