"""Review 71: DKIM signing (mailrelay/dkim.py) of hostile bodies, checked against dkimpy.

Finding (the memory test failed before its fix): the body canonicalizer kept a line's
pieces until the line ended, so a body with one huge line (no line break in megabytes: a
hostile or broken message, which ``Message.from_file`` takes) was held whole in memory,
two or three times over, though the module promises that a file-backed message is
streamed. A line is now canonicalized as it streams past; only a trailing run of white
space (which relaxed canonicalization may drop) is held, collapsed to one space.

The properties check the streaming against dkimpy's own canonicalization, with lines
long and short, runs of white space across the pieces, and a signature over a long-line
message verified by dkimpy.
"""

from __future__ import annotations

import datetime as dt
import tracemalloc
from pathlib import Path

import dkim  # type: ignore[import-untyped]  # dkimpy ships no type information
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.dkim import DKIMSigner, _BodyCanonicalizer, canonicalize_body
from mailrelay.message import Message

KEYS = Path(__file__).parent / "data" / "dkim"
SIGNED_AT = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


def signer(canonicalization: str) -> DKIMSigner:
    return DKIMSigner(
        domain="dkim.test",
        selector="sel-ed",
        private_key=(KEYS / "ed25519.pem").read_bytes(),
        canonicalization=canonicalization,
        now=lambda: SIGNED_AT,
    )


@pytest.mark.parametrize("method", ["relaxed/relaxed", "simple/simple"])
def test_a_huge_line_is_streamed(tmp_path: Path, method: str) -> None:
    path = tmp_path / "one-line.eml"
    piece = b"0123456789 abcdef\t  " * 1024
    with path.open("wb") as out:
        out.write(b"From: ann@dkim.test\nTo: bob@example.net\n\n")
        for _ in range(16 * 1024 * 1024 // len(piece)):
            out.write(piece)  # 16 MB and not one line break
        out.write(b"the end\n")
    message = Message.from_file(path)
    signing = signer(method)
    tracemalloc.start()
    try:
        signing.signature_header(message)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert message.size > 16_000_000
    assert peak < 4_000_000  # as for a body of short lines (test_dkim.py)


_WSP_RUN = st.text(alphabet=" \t", min_size=1, max_size=300).map(str.encode)
_WORD = st.one_of(
    st.binary(min_size=1, max_size=300).map(
        lambda data: bytes(b if b not in b"\r\n \t" else 0x78 for b in data)
    ),
    st.sampled_from([b".", b"x", b"\xc3\xa9", b"--"]),
)
_LINE = st.lists(st.one_of(_WSP_RUN, _WORD), max_size=20).map(b"".join)


def _pieces(body: bytes, cuts: list[int]) -> list[bytes]:
    # Anywhere but between CR and LF (the wire form's chunks are never cut there).
    pieces, start = [], 0
    for cut in sorted({c for c in cuts if 0 < c < len(body)}):
        if body[cut - 1 : cut + 1] != b"\r\n":
            pieces.append(body[start:cut])
            start = cut
    pieces.append(body[start:])
    return pieces


@given(
    lines=st.lists(_LINE, max_size=8),
    trailing=st.integers(0, 3),
    ended=st.booleans(),
    cuts=st.lists(st.integers(0, 6000), max_size=40),
)
def test_streamed_canonicalization_matches_dkimpy(
    lines: list[bytes], trailing: int, ended: bool, cuts: list[int]
) -> None:
    body = b"\r\n".join(lines + [b""] * trailing) + (b"\r\n" if ended else b"")
    # What a server receives: the data ends with CRLF (RFC 5321 §4.1.1.4).
    wire = body if not body or body.endswith(b"\r\n") else body + b"\r\n"
    for method, theirs in (
        ("simple", dkim.canonicalization.Simple),
        ("relaxed", dkim.canonicalization.Relaxed),
    ):
        expected = theirs.canonicalize_body(wire)
        assert canonicalize_body(body, method) == expected
        out: list[bytes] = []
        canon = _BodyCanonicalizer(relaxed=method == "relaxed", sink=out.append)
        for piece in _pieces(body, cuts):
            canon.feed(piece)
        canon.finish()
        assert b"".join(out) == expected


@pytest.mark.parametrize("method", ["relaxed/relaxed", "simple/simple", "relaxed/simple"])
@pytest.mark.parametrize(
    "body",
    [
        b"word  \t " * 40_000 + b"\n",  # one line of 320 kB, white space at every cut
        b" \t" * 100_000,  # white space only, unended
        b"x" * 200_000 + b"   \n\n\n",  # trailing white space, then empty lines
        b"\n\n" + b"a \t" * 70_000 + b"\n \t \n",
    ],
    ids=["runs", "only-white-space", "trailing", "empty-lines-around"],
)
def test_long_lines_sign_and_verify(method: str, body: bytes) -> None:
    message = Message.from_bytes(b"From: ann@dkim.test\nTo: bob@example.net\n\n" + body)
    signing = signer(method)
    signed = signing.sign(message).as_bytes()
    wire = signed if signed.endswith(b"\r\n") else signed + b"\r\n"
    record = signing.dns_txt.encode("ascii")
    assert dkim.verify(wire, dnsfunc=lambda name, timeout=5: record)
