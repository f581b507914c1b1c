"""Score :func:`mailrelay.tracker.parse_dsn` on the sisimai bounce corpus.

Usage::

    python benchmarks/dsn_score.py [CORPUS_DIR] [--misses]

``CORPUS_DIR`` defaults to ``tests/data/sisimai`` (see its SOURCE.md for the
fields of ``expected.jsonl``). What is counted, and how:

* **RFC 3464 rows**: rows with ``dsn_recipient`` (the per-recipient blocks of
  the file's delivery-status part). Right when one parsed recipient has that
  address (case-insensitively) *and* exactly that ``dsn_status``. Printed over
  all such rows and over those whose ``sisimai_status_is_pseudo`` is false.
* **Class**: every row is expected to be ``hard`` (``sisimai_hardbounce``),
  ``soft`` (any other failure), or ``none`` when sisimai's reason says it is not
  a failure at all (``feedback``, ``vacation``, ``delivered``). Our class is the
  matched recipient's ``is_hard`` (``True`` hard, ``False`` soft, ``None`` none),
  or ``none`` when the report is not a bounce or delay. The recipient is matched
  by ``dsn_recipient`` when the row has one, else by position (``index``).
* **Message-ID**: the expected id of a bounce file is the first ``Message-ID:``
  header line after the file's top-level header block, i.e. the header of the
  returned message or returned headers (found by a plain regular expression on
  the raw bytes, independently of the parser). Files with none are not counted.
* **False bounces**: files in ``maildir/not/`` and files whose every row's reason
  is ``feedback``, ``vacation`` or ``delivered``, reported as a bounce.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from mailrelay.tracker import DSNKind, DSNReport, parse_dsn

NOT_FAILURES = frozenset({"feedback", "vacation", "delivered"})
_MSGID_RE = re.compile(rb"^Message-I[Dd][ \t]*:[ \t]*(.*(?:\r?\n[ \t]+.*)*)", re.MULTILINE)


class Scores:
    """The figures of one scoring run (see the module docstring)."""

    def __init__(self) -> None:
        self.rfc_rows = 0
        self.rfc_right = 0
        self.rfc_rows_real = 0
        self.rfc_right_real = 0
        self.class_rows = 0
        self.class_right = 0
        self.msgid_files = 0
        self.msgid_right = 0
        self.non_bounce_files = 0
        self.false_bounces: list[str] = []
        self.bounce_files = 0
        self.bounces_detected = 0
        self.kinds: collections.Counter[str] = collections.Counter()
        self.formats: collections.Counter[str] = collections.Counter()
        self.misses: list[str] = []

    @staticmethod
    def pct(right: int, total: int) -> float:
        """``right`` as a percentage of ``total`` (0 when there is nothing)."""
        return 100.0 * right / total if total else 0.0

    @property
    def rfc_pct(self) -> float:
        """% of RFC 3464 rows with recipient and status right."""
        return self.pct(self.rfc_right, self.rfc_rows)

    @property
    def class_pct(self) -> float:
        """% of all rows with the right hard/soft/none class."""
        return self.pct(self.class_right, self.class_rows)

    @property
    def msgid_pct(self) -> float:
        """% of bounce files correlated to the right original Message-ID."""
        return self.pct(self.msgid_right, self.msgid_files)


def expected_message_id(raw: bytes) -> str | None:
    """The first Message-ID header after the top-level header block (no brackets)."""
    split = re.search(rb"\r?\n\r?\n", raw)
    if split is None:
        return None
    match = _MSGID_RE.search(raw, split.end())
    if match is None:
        return None
    found = re.search(rb"<([^<>\s]+)>", match.group(1))
    return found.group(1).decode("utf-8", "replace") if found else None


def _our_class(report: DSNReport, row: dict[str, Any]) -> str:
    if report.kind not in (DSNKind.BOUNCE, DSNKind.DELAY):
        return "none"
    recipient = None
    if row["dsn_recipient"]:
        wanted = row["dsn_recipient"].lower()
        recipient = next((r for r in report.recipients if r.address.lower() == wanted), None)
    elif len(report.recipients) >= row["index"]:
        recipient = report.recipients[row["index"] - 1]
    if recipient is None:
        return "missing"
    return {True: "hard", False: "soft", None: "none"}[recipient.is_hard]


def score(corpus: Path) -> Scores:
    """Parse every message of the corpus and compare with ``expected.jsonl``."""
    rows_by_file: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    with (corpus / "expected.jsonl").open(encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            rows_by_file[row["file"]].append(row)
    scores = Scores()
    for name, rows in sorted(rows_by_file.items()):
        raw = (corpus / name).read_bytes()
        report = parse_dsn(raw)
        scores.kinds[report.kind.value] += 1
        scores.formats[report.format] += 1
        not_failure = all(row["sisimai_reason"] in NOT_FAILURES for row in rows)
        if not_failure:
            scores.non_bounce_files += 1
            if report.kind is DSNKind.BOUNCE:
                scores.false_bounces.append(name)
        else:
            scores.bounce_files += 1
            if report.kind in (DSNKind.BOUNCE, DSNKind.DELAY):
                scores.bounces_detected += 1
            expected_id = expected_message_id(raw)
            if expected_id is not None:
                scores.msgid_files += 1
                if report.original_message_id == expected_id:
                    scores.msgid_right += 1
                else:
                    scores.misses.append(
                        f"msgid {name}: want {expected_id} got {report.original_message_id}"
                    )
        for row in rows:
            want = (
                "none"
                if row["sisimai_reason"] in NOT_FAILURES
                else ("hard" if row["sisimai_hardbounce"] else "soft")
            )
            got = _our_class(report, row)
            scores.class_rows += 1
            if got == want:
                scores.class_right += 1
            else:
                scores.misses.append(
                    f"class {name}#{row['index']}: want {want} got {got} "
                    f"({row['sisimai_reason']}, {row['sisimai_status']})"
                )
            if row["dsn_recipient"]:
                right = any(
                    r.address.lower() == row["dsn_recipient"].lower()
                    and r.status == row["dsn_status"]
                    for r in report.recipients
                )
                scores.rfc_rows += 1
                scores.rfc_right += right
                if not row["sisimai_status_is_pseudo"]:
                    scores.rfc_rows_real += 1
                    scores.rfc_right_real += right
                if not right:
                    got_pairs = [(r.address, r.status) for r in report.recipients]
                    scores.misses.append(
                        f"rfc {name}#{row['index']}: want {row['dsn_recipient']} "
                        f"{row['dsn_status']} got {got_pairs}"
                    )
    for path in sorted((corpus / "maildir" / "not").glob("*.eml")):
        report = parse_dsn(path.read_bytes())
        scores.non_bounce_files += 1
        scores.kinds[report.kind.value] += 1
        if report.kind is DSNKind.BOUNCE:
            scores.false_bounces.append(str(path.relative_to(corpus)))
    return scores


_HEAD = b"From: MAILER-DAEMON@x.example\r\nSubject: failure notice\r\n"
#: Inputs that make naive regular expressions go quadratic (about 200 KB each).
HOSTILE = {
    "unclosed <": _HEAD + b"Content-Type: text/html\r\n\r\n" + b"<" * 200_000,
    "unclosed <script>": _HEAD + b"Content-Type: text/html\r\n\r\n" + b"<script>" * 25_000,
    "local-part run": _HEAD + b"\r\nerror " + b"!" * 200_000,
    "@ without domains": _HEAD + b"\r\n" + b"a@" * 100_000,
    "huge To header": b"From: MAILER-DAEMON@x.example\r\nTo: " + b"a" * 200_000 + b"\r\n\r\nerror",
    "huge Diagnostic-Code": b"Content-Type: message/delivery-status\r\n\r\n"
    b"Final-Recipient: rfc822; a@b.example\r\nAction: failed\r\nDiagnostic-Code: smtp; "
    + b"user "
    * 40_000,
    "rule of stars": _HEAD + b"\r\nerror\r\n" + b"*" * 200_000,
    "8-bit words in a 7bit status part": b"Content-Type: message/delivery-status\r\n"
    b"Content-Transfer-Encoding: 7bit\r\n\r\n"
    b"Final-Recipient: rfc822; a@b.example\r\nAction: failed\r\nDiagnostic-Code: smtp; "
    + b"a\xc3\xa9 "
    * 50_000,
    "20000 recipients": _HEAD
    + b"\r\nerror\r\n"
    + b"".join(b"<u%d@example.org>: 550 5.1.1 unknown\r\n" % i for i in range(20_000)),
}


def time_hostile() -> dict[str, float]:
    """Seconds to parse each of :data:`HOSTILE` (linear time keeps them small)."""
    seconds = {}
    for name, raw in HOSTILE.items():
        start = time.perf_counter()
        parse_dsn(raw)
        seconds[name] = time.perf_counter() - start
    return seconds


def main(argv: list[str] | None = None) -> int:
    """Print the scores; ``--misses`` also lists every wrong answer."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    default = Path(__file__).resolve().parent.parent / "tests" / "data" / "sisimai"
    parser.add_argument("corpus", nargs="?", type=Path, default=default)
    parser.add_argument("--misses", action="store_true", help="list every wrong answer")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    scores = score(args.corpus)
    elapsed = time.perf_counter() - start
    print(f"corpus: {args.corpus}")
    print(
        f"RFC 3464 rows, recipient and status right: {scores.rfc_pct:.1f}% "
        f"({scores.rfc_right}/{scores.rfc_rows}); without sisimai pseudo-status rows: "
        f"{scores.pct(scores.rfc_right_real, scores.rfc_rows_real):.1f}% "
        f"({scores.rfc_right_real}/{scores.rfc_rows_real})"
    )
    print(
        f"hard/soft/none class right, all rows: {scores.class_pct:.1f}% "
        f"({scores.class_right}/{scores.class_rows})"
    )
    print(
        f"correlated to the returned Message-ID: {scores.msgid_pct:.1f}% "
        f"({scores.msgid_right}/{scores.msgid_files} bounce files that return one)"
    )
    print(
        f"bounce files reported as bounce or delay: {scores.bounces_detected}/{scores.bounce_files}"
    )
    print(
        f"false bounces among non-bounces and auto-replies: {len(scores.false_bounces)}/"
        f"{scores.non_bounce_files} {scores.false_bounces}"
    )
    total = sum(scores.kinds.values())
    print(f"speed: {total} messages scored in {elapsed:.2f} s ({total / elapsed:.0f} messages/s)")
    hostile = time_hostile()
    print(
        "hostile inputs (~200 KB each), seconds: "
        + ", ".join(f"{name} {seconds:.2f}" for name, seconds in hostile.items())
    )
    print(f"kinds: {dict(scores.kinds)}")
    print(f"formats: {dict(scores.formats)}")
    if args.misses:
        print("\n".join(scores.misses))
    return 0


if __name__ == "__main__":
    sys.exit(main())
