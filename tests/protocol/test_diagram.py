"""The state diagram in docs/protocol.md is generated from the transition tables and current."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailrelay.protocol.diagram import BEGIN, END, main, render_mermaid, update_document
from mailrelay.protocol.transitions import REPLY, SEND, State

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def test_docs_diagram_is_current() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert update_document(text) == text, (
        "docs/protocol.md's state diagram is stale: run "
        "`python -m mailrelay.protocol.diagram --write docs/protocol.md`"
    )


def test_diagram_shows_every_state_and_every_transition() -> None:
    diagram = render_mermaid()
    for state in State:
        assert state.name in diagram
    for (_, kind), _ in SEND.items():
        assert kind in diagram
    for (_, kind, reply), _ in REPLY.items():
        assert reply.value in diagram
        assert kind in diagram


def test_update_replaces_only_the_block() -> None:
    old = f"intro\n{BEGIN}\nstale\n{END}\noutro\n"
    new = update_document(old)
    assert new.startswith("intro\n")
    assert new.endswith("outro\n")
    assert "stale" not in new
    assert render_mermaid() in new
    assert update_document(new) == new


def test_update_needs_markers() -> None:
    with pytest.raises(ValueError, match="markers"):
        update_document("no diagram here")


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main([])
    assert capsys.readouterr().out == render_mermaid()
    doc = tmp_path / "doc.md"
    doc.write_text(f"{BEGIN}\n{END}\n", encoding="utf-8")
    main(["--write", str(doc)])
    assert render_mermaid() in doc.read_text(encoding="utf-8")
