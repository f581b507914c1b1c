"""DESIGN.md §2, enforced: which mailrelay module may import what.

Every module of the package is given a layer; every import it makes (outside
``if TYPE_CHECKING:`` blocks, which never run) must be allowed for that layer.
A new module that fits no layer fails the test until it is placed, so the map
below stays the one true description of the architecture.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mailrelay"

# The value types, lowest first: a value module may import only values of a lower rank.
VALUE_RANK = {
    "mailrelay.errors": 0,
    # Private helper of the fast value builders (attrs only).
    "mailrelay._slots": 0,
    # Private helper: text from outside escaped for logs and output (stdlib only).
    "mailrelay._shown": 0,
    "mailrelay.address": 1,
    "mailrelay.options": 1,
    # Private helpers of mailrelay.message (bytes and MIME text only).
    "mailrelay._wire": 1,
    "mailrelay._mime": 1,
    # Private helpers of mailrelay.message that work on addresses.
    "mailrelay._buildargs": 2,
    "mailrelay.message": 3,
    "mailrelay.envelope": 4,
    "mailrelay.reply": 5,
    "mailrelay.results": 6,
}

# Standard-library modules that do I/O or read clocks: never in the protocol core or the dialogue.
IO_MODULES = {"socket", "ssl", "asyncio", "selectors", "sqlite3", "dns"}
CORE_FORBIDDEN = IO_MODULES | {"time", "threading", "subprocess"}

THIRD_PARTY_OK = {"attrs", "idna", "typing_extensions"}


def layer_of(module: str) -> str:
    """The layer a mailrelay module belongs to (DESIGN.md §2)."""
    if module in VALUE_RANK:
        return "values"
    parts = module.split(".")
    if module == "mailrelay":
        return "root"
    top = parts[1]
    named = {
        "protocol": "protocol",
        "flow": "flow",
        "transport": "transport",
        "resolver": "resolver",
        # The resolver's own helpers: result values and the cache (no dnspython in either).
        "mailhosts": "resolver",
        "dnscache": "resolver",
        "validate": "validation",
        "callout": "validation",
        "tracker": "tracker",
        # DKIM signing (RFC 6376): works on messages only; the one user of `cryptography`.
        "dkim": "dkim",
        "testing": "testing",
        "cli": "cli",
        "cli_tracker": "cli",
        "__main__": "cli",
    }
    if top in named:
        return named[top]
    raise AssertionError(f"{module} has no layer: place it in tests/test_layering.py")


def allowed(importer: str, imported: str) -> str | None:
    """None when ``importer`` may import ``imported``; otherwise the reason it may not."""
    layer = layer_of(importer)
    root = imported.split(".", maxsplit=1)[0]
    if root == "mailrelay":
        if imported == "mailrelay":
            return (
                None if layer in {"root", "testing", "cli"} else "import submodules, not the root"
            )
        target = layer_of(imported)
        if layer == "values":
            if target != "values":
                return f"a value type may not import the {target} layer"
            if VALUE_RANK[imported] >= VALUE_RANK[importer]:
                return "values import only lower-ranked values"
            return None
        permitted = {
            "protocol": {"values", "protocol"},
            "flow": {"values", "protocol", "flow"},
            "transport": {"values", "protocol", "flow", "resolver", "transport", "dkim"},
            "dkim": {"values"},
            "resolver": {"values", "resolver"},
            "validation": {"values", "resolver", "protocol", "flow", "transport"},
            "tracker": {"values", "tracker", "transport"},
            "testing": {
                "values",
                "protocol",
                "flow",
                "transport",
                "resolver",
                "validation",
                "tracker",
                "dkim",
                "testing",
                "root",
            },
            "cli": {
                "values",
                "protocol",
                "flow",
                "transport",
                "resolver",
                "validation",
                "tracker",
                "dkim",
                "testing",
                "root",
                "cli",
            },
            "root": {
                "values",
                "protocol",
                "flow",
                "transport",
                "resolver",
                "validation",
                "tracker",
                "dkim",
                "testing",
                "root",
            },
        }[layer]
        if target not in permitted:
            return f"the {layer} layer may not import the {target} layer"
        # The tracker sees transports only through the base interface.
        if layer == "tracker" and target == "transport" and imported != "mailrelay.transport.base":
            return "the tracker may use only mailrelay.transport.base"
        return None
    if root == "dns" and importer != "mailrelay.resolver":
        return "only mailrelay.resolver imports dnspython"
    if root == "sqlite3" and not (layer == "tracker" and importer.endswith("store")):
        return "only the tracker's store module imports sqlite3"
    if layer in {"values", "protocol", "flow"} and root in CORE_FORBIDDEN:
        return f"the {layer} layer does no I/O and reads no clock ({root})"
    if layer == "dkim" and root in IO_MODULES:
        return f"DKIM signing works on bytes only and does no I/O ({root})"
    if layer in {"validation", "tracker"} and root in {"socket", "ssl", "selectors"}:
        return f"the {layer} layer reaches the network only through transports/resolver"
    # Optional extras, each behind one module: signatures (mailrelay[dkim]) and the
    # Hypothesis strategies for users' tests (mailrelay[testing]).
    if root == "cryptography":
        return None if layer == "dkim" else "only mailrelay.dkim imports cryptography"
    if root == "hypothesis":
        return None if layer == "testing" else "only mailrelay.testing imports hypothesis"
    if root == "psycopg":  # mailrelay[postgres]
        if importer == "mailrelay.tracker.postgres_store":
            return None
        return "only mailrelay.tracker.postgres_store imports psycopg"
    if root in sys.stdlib_module_names or root in THIRD_PARTY_OK:
        return None
    if root == "dns":
        return None
    return f"{root} is not a runtime dependency"


def _runtime_imports(tree: ast.AST, module: str) -> Iterator[tuple[int, str]]:
    """Yield (line, imported module) for every import outside TYPE_CHECKING blocks."""

    def visit(node: ast.AST) -> Iterator[tuple[int, str]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                yield from (x for stmt in child.orelse for x in visit_stmt(stmt))
                continue
            yield from visit_stmt(child)

    def visit_stmt(node: ast.AST) -> Iterator[tuple[int, str]]:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node.level, node.module)
            # In "from pkg import x", x may be a submodule: judge the submodule then.
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                yield node.lineno, candidate if _is_module(candidate) else base
        else:
            yield from visit(node)

    yield from visit(tree)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(module: str, level: int, name: str | None) -> str:
    if not level:
        return name or ""
    parts = module.split(".")
    is_package = (PACKAGE.parent / Path(*parts) / "__init__.py").exists()
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, name] if name else base)


def _is_module(name: str) -> bool:
    if not name.startswith("mailrelay"):
        return False
    path = PACKAGE.parent / Path(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def package_modules() -> list[tuple[str, Path]]:
    """Every module of the package with its file."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        found.append((".".join(parts), path))
    return found


def violations(module: str, source: str) -> list[str]:
    """The forbidden imports in one module's source."""
    tree = ast.parse(source)
    found = []
    for line, imported in _runtime_imports(tree, module):
        reason = allowed(module, imported)
        if reason is not None:
            found.append(f"{module}:{line} imports {imported}: {reason}")
    return found


@pytest.mark.parametrize(("module", "path"), package_modules(), ids=str)
def test_module_respects_layering(module: str, path: Path) -> None:
    assert violations(module, path.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("mailrelay.protocol.connection", "import socket", "does no I/O"),
        ("mailrelay.protocol.connection", "import time", "reads no clock"),
        ("mailrelay.protocol.connection", "from mailrelay.transport import base", "transport"),
        ("mailrelay.flow", "import asyncio", "does no I/O"),
        ("mailrelay.flow.transaction", "import time", "reads no clock"),
        ("mailrelay.address", "import dns.resolver", "only mailrelay.resolver"),
        ("mailrelay.address", "from mailrelay import reply", "lower-ranked"),
        ("mailrelay.validate", "import sqlite3", "only the tracker's store"),
        ("mailrelay.tracker.engine", "from mailrelay.protocol import connection", "protocol"),
        ("mailrelay.tracker.engine", "from mailrelay.transport.smtp import X", "base"),
        ("mailrelay.resolver", "import requests", "not a runtime dependency"),
        ("mailrelay.message", "import cryptography", "only mailrelay.dkim"),
        ("mailrelay.transport.smtp", "from cryptography.hazmat import x", "only mailrelay.dkim"),
        ("mailrelay.dkim", "from mailrelay.transport import base", "transport"),
        ("mailrelay.dkim", "import socket", "does no I/O"),
        ("mailrelay.tracker.engine", "import hypothesis", "only mailrelay.testing"),
        ("mailrelay.cli", "from hypothesis import strategies", "only mailrelay.testing"),
        ("mailrelay.tracker.sqlite_store", "import psycopg", "only mailrelay.tracker.postgres"),
    ],
)
def test_forbidden_edges_are_caught(module: str, source: str, expected: str) -> None:
    found = violations(module, source)
    assert found
    assert expected in found[0]


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("mailrelay.dkim", "from cryptography.hazmat.primitives import hashes"),
        ("mailrelay.dkim", "from mailrelay.message import Message"),
        ("mailrelay.transport.signing", "from mailrelay.dkim import DKIMSigner"),
        ("mailrelay.testing.strategies", "from hypothesis import strategies as st"),
        ("mailrelay.tracker.postgres_store", "from psycopg import sql"),
    ],
)
def test_optional_extras_stay_behind_their_modules(module: str, source: str) -> None:
    assert violations(module, source) == []


def test_type_checking_imports_are_exempt() -> None:
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import socket\n"
    assert violations("mailrelay.protocol.connection", source) == []


def test_unplaced_module_fails() -> None:
    with pytest.raises(AssertionError, match="has no layer"):
        layer_of("mailrelay.mystery")
