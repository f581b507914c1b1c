"""docs/tracker.md stays true: every Python block in it runs, in order, as one script."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.transport.test_docs import python_blocks

DOC = Path(__file__).resolve().parents[2] / "docs" / "tracker.md"


def test_the_doc_shows_both_trackers() -> None:
    blocks = python_blocks(DOC.read_text(encoding="utf-8"))
    assert any("DeliveryTracker(" in block for block in blocks)
    assert any("AsyncDeliveryTracker(" in block for block in blocks)


def test_every_example_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # the examples' SQLite files go here
    namespace: dict[str, object] = {"__name__": "docs_tracker"}
    for block in python_blocks(DOC.read_text(encoding="utf-8")):
        exec(compile(block, str(DOC), "exec"), namespace)  # our own docs, in order
    printed = capsys.readouterr().out
    assert "ann@example.org" in printed
    assert "delivered: bob@example.net" in printed
