"""Review 71: hostile input to the command line (mailrelay/cli.py, mailrelay/cli_tracker.py).

Finding (each test failed before its fix): ``parse-dsn``, ``validate --file`` and
``tracker ingest`` read their input whole, however large: an endless or huge standard
input (``parse-dsn - < /dev/zero``, a mailbox of gigabytes piped to ``ingest -``) or a
file such as ``/dev/zero`` grew the process's memory without bound. Each input is now
read up to :data:`mailrelay.cli.MAX_INPUT_BYTES`; more is refused as an input error
(status 66) with one line on stderr, and ``ingest`` goes on with its other files.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from mailrelay import cli
from mailrelay.tracker import DSNAction, DSNRecipient, build_dsn

Run = Callable[..., tuple[int, str, str]]

#: The limit the tests set: small, so that going past it costs little.
LIMIT = 64 * 1024


class EndlessInput(io.RawIOBase):
    """A standard input that never ends (``/dev/zero``): a read of everything never
    returns, so it fails the test instead; bounded reads get what they ask for."""

    def __init__(self, pattern: bytes) -> None:
        self.pattern = pattern
        self.served = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        size = len(buffer)
        if self.served > 16 * LIMIT:
            raise AssertionError("read far past the input limit: the read is unbounded")
        data = (self.pattern * (size // len(self.pattern) + 1))[:size]
        buffer[:size] = data
        self.served += size
        return size


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Run:
    """``run(*argv, stdin=None)`` -> (status, stdout, stderr) of ``cli.main`` in-process."""
    monkeypatch.delenv(cli.URL_VARIABLE, raising=False)
    monkeypatch.delenv(cli.PASSWORD_VARIABLE, raising=False)
    monkeypatch.setattr(cli, "MAX_INPUT_BYTES", LIMIT, raising=False)

    def invoke(*argv: str, stdin: EndlessInput | None = None) -> tuple[int, str, str]:
        capsys.readouterr()
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BufferedReader(stdin)))
        status = cli.main(list(argv))
        out, err = capsys.readouterr()
        return status, out, err

    return invoke


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def db(tmp_path: Path, run: Run) -> Path:
    path = tmp_path / "queue.sqlite"
    assert run("tracker", "--db", str(path), "init")[0] == 0
    return path


COMMANDS = {
    "parse-dsn": lambda db: ["parse-dsn"],
    "validate": lambda db: ["validate", "--file"],
    "tracker ingest": lambda db: ["tracker", "--db", str(db), "ingest"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_endless_standard_input_is_refused(run: Run, db: Path, command: str) -> None:
    endless = EndlessInput(b"a@example.org\nFrom: x\n")
    status, _out, err = run(*COMMANDS[command](db), "-", stdin=endless)
    assert status == cli.EX_NOINPUT
    line = one_error_line(err)
    assert "larger than" in line
    assert endless.served <= LIMIT + 2 * io.DEFAULT_BUFFER_SIZE + 1


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_an_input_file_over_the_limit_is_refused(
    run: Run, db: Path, tmp_path: Path, command: str
) -> None:
    big = tmp_path / "big.txt"
    big.write_bytes(b"a@example.invalid\n" * (LIMIT // 18 + 10))
    status, _out, err = run(*COMMANDS[command](db), str(big))
    assert status == cli.EX_NOINPUT
    assert "larger than" in one_error_line(err)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_an_input_at_the_limit_is_read(run: Run, db: Path, tmp_path: Path, command: str) -> None:
    line = b"a@example.invalid\n"
    exact = tmp_path / "exact.txt"
    exact.write_bytes(line * (LIMIT // len(line)) + b"\n" * (LIMIT % len(line)))
    assert exact.stat().st_size == LIMIT
    status, _out, err = run(*COMMANDS[command](db), str(exact))
    assert "larger than" not in err
    # validate: every address undeliverable (special-use); the others: read, not a report.
    assert status == (cli.UNDELIVERABLE if command == "validate" else cli.EX_OK), err


def test_ingest_goes_on_after_an_input_over_the_limit(run: Run, db: Path, tmp_path: Path) -> None:
    big = tmp_path / "big.eml"
    big.write_bytes(b"x" * (LIMIT + 1))
    small = tmp_path / "small.eml"
    small.write_bytes(b"From: a@example.org\r\nSubject: hi\r\n\r\nhello\r\n")
    status, out, err = run("tracker", "--db", str(db), "ingest", "--json", str(big), str(small))
    assert status == cli.EX_NOINPUT
    assert "larger than" in one_error_line(err)
    assert '"result": "unreadable"' in out
    assert str(small) in out
    assert '"kind": "not-a-report"' in out


# -- output the terminal's encoding cannot show ---------------------------------------------


@pytest.mark.parametrize("json_output", [False, True])
def test_text_the_output_encoding_lacks_is_escaped(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    json_output: bool,
) -> None:
    # A report naming 日本@example.org, printed where the output is Latin-1 (a legacy
    # locale, a Windows pipe, PYTHONIOENCODING): it ended in UnicodeEncodeError, status 70
    # ("a bug"), the report's lines half printed.
    report = build_dsn(
        original=b"From: ann@example.org\r\nMessage-ID: <1@example.org>\r\n\r\nhi\r\n",
        envelope_sender="ann@example.org",
        reporting_mta="mx.example.org",
        recipients=[
            DSNRecipient(address="日本@example.org", action=DSNAction.FAILED, diagnostic="550 ない")
        ],
    )
    path = tmp_path / "report.eml"
    path.write_bytes(report)
    raw = io.BytesIO()
    latin1 = io.TextIOWrapper(raw, encoding="latin-1")  # errors="strict", as a real one
    monkeypatch.setattr(sys, "stdout", latin1)
    status = cli.main(["parse-dsn", *(["--json"] if json_output else []), str(path)])
    latin1.flush()
    err = capsys.readouterr().err
    assert (status, err) == (cli.EX_OK, "")
    printed = raw.getvalue().decode("latin-1")
    assert "\\u65e5\\u672c@example.org" in printed
    assert latin1.errors == "strict"  # main leaves the stream as it found it
