"""parse_dsn on hostile input: every shape is read in time linear in its size.

A bounce is mail from anyone: a tracker that ingests returned mail must not let one
message stall it. Regular expressions that backtrack can take time quadratic (or worse)
in a line's length; a mutation fuzzer over the sisimai corpus found one (a rule line of
stars: 40 KB took 163 s). These tests feed shapes built to trigger that kind of
backtracking at a size where a quadratic parser would run for hours, and fail if a parse
has not finished within a bound thousands of times what a linear one needs: a hang
guard, not a speed measurement. The parses run in a child process (``python -m`` this
module): a regular expression holds the GIL while it backtracks, so a thread of the test
process could not even notice the bound passing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.tracker import DSNKind, parse_dsn
from mailrelay.tracker.bounce_formats import (
    _RETURNED_MARKER_RE,
    _RULED_MARKER_RE,
    _is_returned_marker,
)
from tests.hang_guard import HANG_BOUND, results_of

#: Seconds a parse may take before it counts as hung; a linear parse of these inputs
#: takes well under one on this project's CI machine.
#: Characters in the hostile runs: a quadratic step over this many is ~10^11 operations.
RUN = 300_000


def notice(body: str) -> bytes:
    """A plain-text failure notice from a mail system, with ``body`` as its text."""
    head = (
        "From: Mail Delivery System <MAILER-DAEMON@relay.example.net>\r\n"
        "To: shop@shop.example\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\n"
    )
    return (head + body.replace("\n", "\r\n")).encode("utf-8")


FAILED = "I could not deliver to <gone@example.org>: 550 5.1.1 user unknown\n\n"

HOSTILE = {
    "rule of stars": FAILED + "*" * RUN + "\n",
    "rule then words": FAILED + "-" * RUN + " original message\n",
    "rule of mixed marks": FAILED + "-=_*>|" * (RUN // 6) + "\n",
    "whitespace run": FAILED + " " * RUN + "x\n",
    "whitespace between rules": FAILED + "- " * (RUN // 2) + "\n",
    "at signs": FAILED + "@" * RUN + "\n",
    "address-like run": FAILED + "a." * (RUN // 2) + "@" + "b." * (RUN // 2) + "\n",
    "angle brackets": FAILED + "<" * RUN + "\n",
    "parentheses": FAILED + "(" * RUN + "\n",
    "status-like run": FAILED + "5." * (RUN // 2) + "\n",
    "words without spaces": FAILED + "delivery" * (RUN // 8) + "\n",
    "failure words": FAILED + "delivery to " + "x" * RUN + "\n",
    "repeated lines": FAILED + "550 5.1.1 <a@example.org>: no\n" * 20_000,
}


def hostile_html() -> bytes:
    return (
        "From: MAILER-DAEMON@relay.example.net\r\nSubject: Undeliverable\r\n"
        "Content-Type: text/html\r\n\r\n" + FAILED + "<p " * (RUN // 3) + "\r\n"
    ).encode()


def status_report(encoding: str, field: bytes) -> bytes:
    """A multipart/report whose status part (under ``encoding``) has ``field``."""
    status = (
        b"Reporting-MTA: dns; relay.example.net\r\n\r\n"
        b"Final-Recipient: rfc822; gone@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        + field
        + b"\r\n"
    )
    return (
        (
            "From: MAILER-DAEMON@relay.example.net\r\nTo: shop@shop.example\r\n"
            "Subject: failure\r\nMIME-Version: 1.0\r\n"
            "Content-Type: multipart/report; report-type=delivery-status; boundary=B\r\n\r\n"
            "--B\r\nContent-Type: text/plain\r\n\r\nIt failed.\r\n"
            "--B\r\nContent-Type: message/delivery-status\r\n"
            f"Content-Transfer-Encoding: {encoding}\r\n\r\n"
        ).encode()
        + status
        + b"--B--\r\n"
    )


def inputs() -> Iterator[tuple[str, bytes]]:
    """Every hostile input, by name."""
    for name, body in HOSTILE.items():
        yield name, notice(body)
    # Many short 8-bit words in one field: the standard library's generator folds such
    # a field in quadratic time (80 KB took 34 s when the parser still used it).
    words = b"Diagnostic-Code: smtp; 550 " + b"a\xc3\xa9 " * (RUN // 4)
    for encoding in ("7bit", "quoted-printable"):
        yield f"long 8-bit field, {encoding} status part", status_report(encoding, words)
    yield "html of unclosed tags", hostile_html()


def main() -> None:
    """The child: parse each input, one JSON line per result as soon as it is known."""
    for name, raw in inputs():
        report = parse_dsn(raw)
        line = {
            "name": name,
            "kind": report.kind.name,
            "to": [r.address for r in report.recipients],
        }
        print(json.dumps(line), flush=True)


@pytest.fixture(scope="module")
def parsed() -> dict[str, dict[str, object]]:
    """Each input's result from the child (none for those it had not reached)."""
    return results_of("tests.tracker.test_dsn_hostile")


@pytest.mark.parametrize("name", [name for name, _ in inputs()])
def test_hostile_shapes_finish(name: str, parsed: dict[str, dict[str, object]]) -> None:
    if name not in parsed:
        pytest.fail(f"parse_dsn had not finished {name!r} after {HANG_BOUND} s (all inputs)")
    if name != "html of unclosed tags":
        assert parsed[name]["kind"] == DSNKind.BOUNCE.name
        assert "gone@example.org" in parsed[name]["to"]  # type: ignore[operator]


# The returned-copy marker as one regular expression, the way it was once written (and
# backtracked): any decoration, then the words, or two rule characters and the ruled
# words. The word lists are the module's own; what is checked is the decoration
# handling that replaced it (fine to backtrack on the short lines drawn here).
MARKER_SPEC = re.compile(
    rf"^[\s\-=_*>|]*(?:{_RETURNED_MARKER_RE.pattern}|[-=_*]{{2,}}\s*{_RULED_MARKER_RE.pattern})",
    re.IGNORECASE,
)
MARKER_PIECES = st.sampled_from(
    [
        "-", "=", "_", "*", ">", "|", " ", "\t", "\u00a0", "\u2003", "x", "The ",
        "the ", "original", "Original ", "returned ", "unsent ", "message", " message",
        "follows", "below", "this line is a copy", "Below ", "content-type: message/rfc822",
        "headers of the returned", "here is a copy", "Your original message is attached",
    ]
)  # fmt: skip


@given(st.lists(MARKER_PIECES, max_size=12).map("".join))
def test_returned_marker_means_the_spec(line: str) -> None:
    assert _is_returned_marker(line) == bool(MARKER_SPEC.match(line))


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("------ Original message ------", True),
        ("> -- The original message", True),
        ("*** Returned message", True),
        ("-Original message", False),  # one rule character is not a rule
        ("Below this line is a copy of the message.", True),
        ("  |  content-type: message/rfc822", True),
        ("The original message was 2 KB", False),
        ("---- nothing here", False),
    ],
)
def test_returned_marker_examples(line: str, expected: bool) -> None:
    assert _is_returned_marker(line) is expected


if __name__ == "__main__":
    main()
