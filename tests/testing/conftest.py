"""Shared by the test server's own tests."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def no_threads_left() -> Iterator[None]:
    """Every test ends with exactly the test-server threads it started with."""
    before = set(threading.enumerate())
    yield
    left = [t for t in set(threading.enumerate()) - before if t.name.startswith("smtp-test")]
    assert not left, f"server threads left running: {left}"
