"""Tests for mailrelay.protocol.data: CRLF normalization and dot-stuffing, streamed."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.protocol.data import DotStuffer, normalize_line_endings, stuff


@pytest.mark.parametrize(
    ("body", "wire"),
    [
        pytest.param(b"", b".\r\n", id="empty-body"),
        pytest.param(b"hello\r\n", b"hello\r\n.\r\n", id="crlf-ended"),
        pytest.param(b"hello", b"hello\r\n.\r\n", id="no-final-crlf"),
        pytest.param(b".", b"..\r\n.\r\n", id="body-of-only-a-dot"),
        pytest.param(b".\r\n", b"..\r\n.\r\n", id="dot-line"),
        pytest.param(b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n", id="lone-dot-line-inside"),
        pytest.param(b"..x\r\n", b"...x\r\n.\r\n", id="two-leading-dots"),
        pytest.param(b"a.b\r\n", b"a.b\r\n.\r\n", id="inner-dot-untouched"),
        pytest.param(b"a\nb\n", b"a\r\nb\r\n.\r\n", id="bare-lf"),
        pytest.param(b"a\rb\r", b"a\r\nb\r\n.\r\n", id="bare-cr"),
        pytest.param(b"a\r\r\nb", b"a\r\n\r\nb\r\n.\r\n", id="cr-then-crlf"),
        pytest.param(b"a\n\rb", b"a\r\n\r\nb\r\n.\r\n", id="lf-then-cr"),
        pytest.param(b"\n.", b"\r\n..\r\n.\r\n", id="lf-then-dot"),
        pytest.param(b"\r\n", b"\r\n.\r\n", id="only-crlf"),
    ],
)
def test_whole_body(body: bytes, wire: bytes) -> None:
    assert stuff(body) == wire


@pytest.mark.parametrize(
    ("chunks", "wire"),
    [
        pytest.param([b"a\r\n", b".b\r\n"], b"a\r\n..b\r\n.\r\n", id="dot-at-chunk-start"),
        pytest.param([b"a\r", b"\n.b"], b"a\r\n..b\r\n.\r\n", id="crlf-split-then-dot"),
        pytest.param([b"a\r\n", b".", b"\r\n"], b"a\r\n..\r\n.\r\n", id="lone-dot-own-chunk"),
        pytest.param([b"a\r", b"b"], b"a\r\nb\r\n.\r\n", id="bare-cr-at-chunk-end"),
        pytest.param([b"a\r"], b"a\r\n.\r\n", id="body-ends-with-held-cr"),
        pytest.param([b"", b".", b""], b"..\r\n.\r\n", id="empty-chunks"),
        pytest.param([b".", b"."], b"...\r\n.\r\n", id="dot-dot-across-chunks"),
        pytest.param([b"x", b".y"], b"x.y\r\n.\r\n", id="dot-mid-line-across-chunks"),
        pytest.param([b"\r", b"\r", b"\n"], b"\r\n\r\n.\r\n", id="crs-across-chunks"),
    ],
)
def test_chunk_boundaries(chunks: list[bytes], wire: bytes) -> None:
    stuffer = DotStuffer()
    out = b"".join(stuffer.chunk(c) for c in chunks) + stuffer.end()
    assert out == wire


@pytest.mark.parametrize(
    ("data", "normalized"),
    [
        (b"a\r\nb", b"a\r\nb"),
        (b"a\nb", b"a\r\nb"),
        (b"a\rb", b"a\r\nb"),
        (b"\r\r\n\n", b"\r\n\r\n\r\n"),
    ],
)
def test_normalize_line_endings(data: bytes, normalized: bytes) -> None:
    assert normalize_line_endings(data) == normalized


def unstuff(wire: bytes) -> bytes:
    """The receiver's side (RFC 5321 §4.5.2): split lines, stop at the lone dot, un-double."""
    assert wire.endswith(b".\r\n")
    lines = wire.split(b"\r\n")
    assert lines[-1] == b""
    lines = lines[:-1]
    terminator = lines.index(b".")
    assert terminator == len(lines) - 1, "exactly one terminator, at the end"
    body = [line[1:] if line.startswith(b".") else line for line in lines[:terminator]]
    return b"".join(line + b"\r\n" for line in body)


def expected_body(body: bytes) -> bytes:
    normalized = normalize_line_endings(body)
    if normalized and not normalized.endswith(b"\r\n"):
        normalized += b"\r\n"
    return normalized


mail_bytes = st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"x.", b"\x00\xff"])).map(
    b"".join
) | st.binary(max_size=200)


@given(mail_bytes, st.data())
def test_round_trip_any_body_any_chunking(body: bytes, data: st.DataObject) -> None:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=10)))
    chunks = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    stuffer = DotStuffer()
    wire = b"".join(stuffer.chunk(c) for c in chunks) + stuffer.end()
    assert wire == stuff(body), "chunking never changes the output"
    assert unstuff(wire) == expected_body(body)
    # No bare CR or LF anywhere on the wire.
    assert wire.count(b"\r") == wire.count(b"\n") == wire.count(b"\r\n")


@given(body=st.binary(max_size=300))
def test_wire_form_passed_through_gives_the_same_data(body: bytes) -> None:
    first = DotStuffer()
    wire = first.chunk(body) + first.end()
    again = DotStuffer()
    # Everything but the final ".CRLF": it ends a line, so the terminator is the same.
    assert again.stuffed(wire[:-3]) + again.end() == wire


@pytest.mark.parametrize("before", [b"no line end", b"held CR\r"])
def test_wire_form_must_start_a_line(before: bytes) -> None:
    stuffer = DotStuffer()
    stuffer.chunk(before)
    with pytest.raises(ValueError, match="start a line"):
        stuffer.stuffed(b"x\r\n")


@given(first=st.binary(max_size=50), body=st.binary(max_size=200))
def test_reset_starts_over_as_a_new_stuffer(first: bytes, body: bytes) -> None:
    # Whatever the last message left (a held-back CR, a line not ended), a reset stuffer
    # gives what a new one does.
    reused = DotStuffer()
    reused.chunk(first)
    reused.reset()
    fresh = DotStuffer()
    assert reused.chunk(body) + reused.end() == fresh.chunk(body) + fresh.end()


@given(
    st.lists(st.sampled_from([b"a", b".", b"..", b"x.", b"\x00\xff", b""]), max_size=12),
    st.data(),
)
def test_normalized_pieces_give_what_the_checked_ones_do(
    lines: list[bytes], data: st.DataObject
) -> None:
    # What Message.chunks() yields: CRLF line ends, and no piece ends inside a CRLF.
    body = b"\r\n".join(lines) + data.draw(st.sampled_from([b"", b"\r\n"]))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=6)))
    cuts = [cut for cut in cuts if body[cut - 1 : cut + 1] != b"\r\n"]
    chunks = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    checked, trusted = DotStuffer(), DotStuffer()
    assert [trusted.chunk(c, normalized=True) for c in chunks] + [trusted.end()] == [
        checked.chunk(c) for c in chunks
    ] + [checked.end()]
