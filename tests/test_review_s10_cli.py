"""Session-10 review of ``mailrelay tracker`` (mailrelay/cli_tracker.py): findings
reproduced, then fixed.

Findings (each test failed before its fix):

* An AGE option too long for the calendar (``list --older-than 99999999999d``, ``run
  --max-age 999999999d``, ``--lease``, ``--retry-initial``, ``--delay-warning``) ended
  in an OverflowError: a traceback out of ``main`` when the number overflowed while
  parsing, or status 70 ("a bug") when the date arithmetic did, after the store and the
  transport were opened. Ages are now at most 36,500 days, refused as usage errors.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from mailrelay import cli
from mailrelay.tracker import SQLiteStore, State

Run = Callable[..., tuple[int, str, str]]

MESSAGE = b"From: alice@shop.example\nTo: bob@example.net\nSubject: hi\n\nHello.\n"


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Run:
    """``run(*argv, stdin=None)`` -> (status, stdout, stderr) of ``cli.main`` in-process."""
    monkeypatch.delenv(cli.URL_VARIABLE, raising=False)
    monkeypatch.delenv(cli.PASSWORD_VARIABLE, raising=False)

    def invoke(*argv: str, stdin: bytes | None = None) -> tuple[int, str, str]:
        capsys.readouterr()
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
        status = cli.main(list(argv))
        out, err = capsys.readouterr()
        return status, out, err

    return invoke


@pytest.fixture
def db(tmp_path: Path, run: Run) -> Path:
    """A store holding one queued message."""
    path = tmp_path / "queue.sqlite"
    assert run("tracker", "--db", str(path), "init")[0] == 0
    status, _, err = run("tracker", "--db", str(path), "submit", "-", stdin=MESSAGE)
    assert (status, err) == (0, ""), err
    return path


def states(db: Path) -> list[State]:
    store = SQLiteStore(db)
    try:
        return [r.state for record in store.find() for r in record.recipients]
    finally:
        store.close()


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["list", "--older-than", "99999999999d"], "--older-than"),
        (["list", "--older-than", "3000000d"], "--older-than"),
        (["list", "--older-than", "1" + "0" * 400 + "s"], "--older-than"),
        (["run", "--url", "memory://", "--max-age", "999999999d"], "--max-age"),
        (["run", "--url", "memory://", "--max-age", "99999999999d"], "--max-age"),
        (["run", "--url", "memory://", "--lease", "999999999d"], "--lease"),
        (["run", "--url", "memory://", "--retry-initial", "99999999999w"], "--retry-initial"),
        (["run", "--url", "memory://", "--retry-max-delay", "99999999999w"], "--retry-max-delay"),
        (
            ["run", "--url", "memory://", "--dsn-url", "same", "--delay-warning", "99999999999d"],
            "--delay-warning",
        ),
    ],
)
def test_an_age_too_long_for_the_calendar_is_a_usage_error(
    run: Run, db: Path, argv: list[str], option: str
) -> None:
    status, _, err = run("tracker", "--db", str(db), *argv)
    assert status == cli.EX_USAGE, err
    assert "Traceback" not in err
    assert option in err
    assert "36500d" in err
    assert states(db) == [State.QUEUED]  # nothing was claimed or sent


@pytest.mark.parametrize("age", ["36500d", "5214w", "0s"])
def test_long_ages_within_the_bound_still_work(run: Run, db: Path, age: str) -> None:
    status, out, err = run("tracker", "--db", str(db), "list", "--older-than", age)
    assert (status, err) == (0, "")
    assert out.count("\n") == (1 if age == "0s" else 0)
