"""docs/transports.md stays true: every Python block in it runs, in order, as one script."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "transports.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)
_SERVER_BLOCK = re.compile(r"^```py\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python fenced blocks of a Markdown text, in order."""
    return [match.group(1) for match in _BLOCK.finditer(text)]


def server_blocks(text: str) -> list[str]:
    """The bodies of the ```py blocks: examples that need a real mail server."""
    return [match.group(1) for match in _SERVER_BLOCK.finditer(text)]


def test_block_extraction() -> None:
    text = "intro\n```python\nx = 1\n```\n\n```sh\nls\n```\n```python\ny = 2\n```\n"
    assert python_blocks(text) == ["x = 1\n", "y = 2\n"]


def test_the_doc_has_a_custom_transport_example() -> None:
    blocks = python_blocks(DOC.read_text(encoding="utf-8"))
    assert any("class QueueRelay(Transport)" in block for block in blocks)


def test_every_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "docs_transports"}
    blocks = python_blocks(DOC.read_text(encoding="utf-8"))
    assert len(blocks) >= 5
    for number, block in enumerate(blocks, start=1):
        code = compile(block, f"{DOC.name} block {number}", "exec")
        exec(code, namespace)  # the doc's own examples: running them is the test


def test_server_examples_compile_and_their_imports_resolve() -> None:
    blocks = server_blocks(DOC.read_text(encoding="utf-8"))
    assert len(blocks) >= 2
    for number, block in enumerate(blocks, start=1):
        tree = ast.parse(block, f"{DOC.name} server block {number}")
        imports = ast.Module(
            body=[node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)],
            type_ignores=[],
        )
        exec(compile(imports, f"{DOC.name} server block {number}", "exec"), {})
