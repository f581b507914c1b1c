"""The other docs stay true: their ```python blocks run, in order, as one script per doc.

``docs/transports.md`` and ``docs/tracker.md`` have their own tests; this one covers the
remaining docs with examples. ```py blocks are the examples that need a real mail server or
real DNS: those are only compiled, and their imports executed, so a renamed name still fails.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.transport.test_docs import python_blocks, server_blocks

DOCS = Path(__file__).resolve().parents[1] / "docs"
NAMES = (
    "address.md",
    "dialogue.md",
    "dsn.md",
    "messages.md",
    "mx.md",
    "protocol.md",
    "testing.md",
    "validation.md",
)


def _text(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


@pytest.mark.parametrize("name", NAMES)
def test_the_doc_has_examples(name: str) -> None:
    text = _text(name)
    assert python_blocks(text) or server_blocks(text)


@pytest.mark.parametrize("name", NAMES)
def test_every_example_runs(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # anything an example writes lands here
    namespace: dict[str, object] = {"__name__": f"docs_{name.removesuffix('.md')}"}
    for number, block in enumerate(python_blocks(_text(name)), start=1):
        exec(compile(block, f"{name} block {number}", "exec"), namespace)  # our own docs, in order


@pytest.mark.parametrize("name", NAMES)
def test_server_examples_compile_and_their_imports_resolve(name: str) -> None:
    for number, block in enumerate(server_blocks(_text(name)), start=1):
        label = f"{name} server block {number}"
        tree = ast.parse(block, label)
        imports = ast.Module(
            body=[node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)],
            type_ignores=[],
        )
        exec(compile(imports, label, "exec"), {})
