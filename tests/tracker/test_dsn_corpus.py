"""parse_dsn on the sisimai corpus: the scores of benchmarks/dsn_score.py as floors.

The floors are the figures reached when this test was written (rounded down),
so a change that makes the parser worse fails here. Zero false bounces is a
hard rule, not a floor.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from mailrelay.tracker import DSNKind, parse_dsn

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "data" / "sisimai"


def _load_scorer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dsn_score", ROOT / "benchmarks" / "dsn_score.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def scores() -> Any:
    return _load_scorer().score(CORPUS)


def test_corpus_is_complete() -> None:
    rows = (CORPUS / "expected.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 628
    assert len(list((CORPUS / "maildir" / "bsd").glob("*.eml"))) == 590
    assert (CORPUS / "LICENSE").is_file()
    assert (CORPUS / "SOURCE.md").is_file()


def test_zero_false_bounces() -> None:
    result = scores()
    assert result.non_bounce_files == 25
    assert result.false_bounces == []


def test_rfc3464_rows_floor() -> None:
    result = scores()
    assert result.rfc_rows == 317
    assert result.rfc_pct >= 99.0


def test_class_floor() -> None:
    result = scores()
    assert result.class_rows == 628
    assert result.class_pct >= 90.0


def test_message_id_floor() -> None:
    result = scores()
    assert result.msgid_files >= 490
    assert result.msgid_pct >= 96.0


def test_bounce_detection_floor() -> None:
    result = scores()
    assert result.bounces_detected >= 560


def _rows() -> list[dict[str, Any]]:
    lines = (CORPUS / "expected.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


NON_FAILURE_KINDS = {
    "feedback": {DSNKind.FEEDBACK},
    "vacation": {DSNKind.AUTO_REPLY},
    "delivered": {DSNKind.DELIVERED},
}


@pytest.mark.parametrize(
    ("name", "reason"),
    sorted(
        {
            (row["file"], row["sisimai_reason"])
            for row in _rows()
            if row["sisimai_reason"] in NON_FAILURE_KINDS
        }
    ),
)
def test_non_failures_get_their_own_kind(name: str, reason: str) -> None:
    report = parse_dsn((CORPUS / name).read_bytes())
    assert report.kind in NON_FAILURE_KINDS[reason]


@pytest.mark.parametrize(
    "path", sorted((CORPUS / "maildir" / "not").glob("*.eml")), ids=lambda p: p.name
)
def test_plain_messages_are_not_reports(path: Path) -> None:
    assert parse_dsn(path.read_bytes()).kind is DSNKind.NOT_A_REPORT
