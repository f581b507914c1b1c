"""Run a test module's ``main()`` in a child process, bounded in time: the hang guard.

A parse that backtracks in a regular expression holds the GIL, so no thread of the test
process can notice that it runs too long; a child process can be killed. The module's
``main()`` prints one JSON object per input as soon as the input is done (with at least a
``"name"`` key), so when the bound runs out the results so far are kept, and the first
input missing from them is the one that hung.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

#: Seconds the child may take for all of its inputs; a linear parser needs a few.
HANG_BOUND = 60.0

_ROOT = Path(__file__).resolve().parents[1]


def results_of(module: str, bound: float = HANG_BOUND) -> dict[str, dict[str, Any]]:
    """Each input's JSON line from ``python -m module``, by name, within ``bound`` seconds.

    Raises:
        subprocess.CalledProcessError: the child failed (its stderr is in the error).
    """
    command = [sys.executable, "-m", module]
    try:
        done = subprocess.run(
            command, cwd=_ROOT, capture_output=True, text=True, timeout=bound, check=True
        ).stdout
    except subprocess.TimeoutExpired as exc:  # subprocess.run has killed the child
        out = exc.stdout or b""
        done = out.decode() if isinstance(out, bytes) else out
    lines = [json.loads(line) for line in done.splitlines()]
    return {line["name"]: line for line in lines}
