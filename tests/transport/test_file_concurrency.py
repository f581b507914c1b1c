"""Many writers at once into one FileTransport directory, while a reader watches.

Apps hand one output directory to several threads, tasks and processes (a dev server with
workers, a test suite run in parallel). Writers here are threads sharing one
:class:`~mailrelay.transport.FileTransport`, threads each with their own, asyncio tasks
(``asend`` / ``asend_many``, some cancelled) and other processes running this module
(``python -m tests.transport.test_file_concurrency DIR FORMAT PREFIX COUNT``), in both
formats, all into one directory at once. A reader thread polls the directory meanwhile.
What must hold (``docs/transports.md``, the module docstring of
:mod:`mailrelay.transport.file`):

- every message lands exactly once, under a name no other message has;
- what the reader can see is always complete: a ``.json`` only once its ``.eml`` is whole,
  an ``.eml`` only whole, a file in ``new/`` only whole (never a file still being written);
- the JSON always describes its own ``.eml`` (id, Message-ID, size);
- no writer gets an exception, and nothing is left in ``tmp/`` or under a temporary name;
- a cancelled ``asend`` leaves the message there once and whole, or not at all.

Messages are a few hundred kilobytes, so each is written in several pieces and a reader
has time to look at a file in the making. Every loop, join and wait is bounded.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Literal

import pytest

from mailrelay.message import Message
from mailrelay.transport import FileTransport
from mailrelay.transport import file as file_module
from tests.transport.helpers import run

Format = Literal["eml", "maildir"]
FORMATS: tuple[Format, ...] = ("eml", "maildir")

#: Writer threads, messages per thread, writer processes and messages per process.
THREADS = 4
PER_THREAD = 6
PROCESSES = 2
PER_PROCESS = 6
#: asyncio tasks sending at once, and how many of them are cancelled at a random moment.
TASKS = 8
#: A hang guard for every join and wait, in seconds (a loaded CI machine with 2 cores).
GUARD = 60.0
#: Lines of body text: a few hundred kilobytes, several 64 KiB pieces.
LINES = 3000

SENDER = "alice@example.com"
_MESSAGE_ID = re.compile(rb"^Message-ID: <([^>]+)>", re.MULTILINE | re.IGNORECASE)


def make(tag: str) -> Message:
    """The message called ``tag``: the same bytes in every process."""
    body = "".join(f"{tag} line {n:05d} " + "x" * 48 + "\n" for n in range(LINES))
    return Message.build(
        sender=SENDER,
        to=["bob@example.com", "carol@example.org"],
        subject=tag,
        text=body + f"end of {tag}\n",
        message_id=f"{tag}@concurrency.test",
        date=dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
    )


def expected_bytes(tag: str, fmt: Format) -> bytes:
    """What the file of message ``tag`` must hold, whole."""
    wire = make(tag).as_bytes()
    if fmt == "eml":
        return wire
    return f"Return-Path: <{SENDER}>\n".encode() + wire.replace(b"\r\n", b"\n")


def tag_of(data: bytes) -> str:
    found = _MESSAGE_ID.search(data)
    assert found is not None, data[:200]
    return found.group(1).decode().partition("@")[0]


def landed(directory: Path, fmt: Format) -> list[Path]:
    """The delivered files: ``.eml`` files, or the files in ``new/``."""
    if fmt == "eml":
        return sorted(directory.glob("*.eml"))
    return sorted((directory / "new").iterdir())


class Reader:
    """A thread that polls the directory and records anything incomplete it sees."""

    def __init__(self, directory: Path, fmt: Format, known: dict[str, bytes]) -> None:
        self.directory = directory
        self.fmt = fmt
        self.known = known
        self.problems: list[str] = []
        self.looked = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def __enter__(self) -> Reader:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(GUARD)
        assert not self._thread.is_alive(), "the reader did not stop"

    def _run(self) -> None:
        deadline = time.monotonic() + GUARD
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                self._look()
            except Exception as exc:  # recorded: the test fails on it below
                self.problems.append(f"reader: {exc!r}")
            time.sleep(0.001)

    def _whole(self, path: Path) -> None:
        data = path.read_bytes()
        self.looked += 1
        tag = tag_of(data)
        if data != self.known.get(tag):
            self.problems.append(f"{path.name}: {len(data)} bytes, not the whole of {tag}")

    def _look(self) -> None:
        if self.fmt == "maildir":
            for path in (self.directory / "new").iterdir():
                self._whole(path)
            return
        for path in self.directory.glob("*.json"):
            record = json.loads(path.read_text(encoding="utf-8"))
            eml = path.with_suffix(".eml")
            if not eml.exists():
                self.problems.append(f"{path.name} without its .eml")
                continue
            self._whole(eml)
            check_record(record, path, eml.read_bytes())
        for path in self.directory.glob("*.eml"):
            try:
                self._whole(path)
            except FileNotFoundError:
                # An .eml whose .json is not there yet is not a message yet (the .json is
                # renamed last): a cancelled writer removes it again. With its .json, it
                # must never vanish.
                if path.with_suffix(".json").exists():
                    raise


def check_record(record: dict[str, object], path: Path, eml: bytes) -> None:
    """The JSON describes its own .eml."""
    assert record["id"] == path.stem
    assert record["message_id"] == f"{tag_of(eml)}@concurrency.test"
    assert record["size"] == len(eml)
    assert record["sender"] == SENDER


def check_directory(directory: Path, fmt: Format, tags: list[str], maybe: list[str]) -> None:
    """Each of ``tags`` landed once, whole; each of ``maybe`` at most once, whole; nothing else."""
    files = landed(directory, fmt)
    names = [path.name for path in files]
    assert len(set(names)) == len(names)
    seen: dict[str, int] = {}
    for path in files:
        data = path.read_bytes()
        tag = tag_of(data)
        assert data == expected_bytes(tag, fmt), f"{path.name} is not the whole of {tag}"
        seen[tag] = seen.get(tag, 0) + 1
        if fmt == "eml":
            json_path = path.with_suffix(".json")
            check_record(json.loads(json_path.read_text(encoding="utf-8")), json_path, data)
    assert dict.fromkeys(tags, 1).items() <= seen.items(), sorted(set(tags) - set(seen))
    extra = {tag: count for tag, count in seen.items() if tag not in tags}
    assert set(extra) <= set(maybe), sorted(set(extra) - set(maybe))
    assert all(count == 1 for count in extra.values()), extra
    if fmt == "eml":
        everything = sorted(p.name for p in directory.iterdir())
        assert everything == sorted([*names, *(Path(n).with_suffix(".json").name for n in names)])
    else:
        assert list((directory / "tmp").iterdir()) == []
        assert list((directory / "cur").iterdir()) == []


def spawn(directory: Path, fmt: Format, prefix: str, count: int) -> subprocess.Popen[bytes]:
    root = Path(__file__).resolve().parents[2]
    module = "tests.transport.test_file_concurrency"
    return subprocess.Popen(
        [sys.executable, "-m", module, str(directory), fmt, prefix, str(count)],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def threaded(workers: list[Callable[[], None]]) -> list[BaseException]:
    """Run each worker in its own thread; the exceptions they raised."""
    errors: list[BaseException] = []

    def wrap(worker: Callable[[], None]) -> Callable[[], None]:
        def body() -> None:
            try:
                worker()
            except BaseException as exc:  # reported by the caller
                errors.append(exc)

        return body

    threads = [threading.Thread(target=wrap(worker)) for worker in workers]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + GUARD
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), "a writer outlived its guard"
    return errors


@pytest.mark.parametrize("fmt", FORMATS)
def test_threads_and_processes_write_into_one_directory(tmp_path: Path, fmt: Format) -> None:
    directory = tmp_path / "out"
    shared = FileTransport(directory, format=fmt)
    thread_tags = [[f"t{t}m{m}" for m in range(PER_THREAD)] for t in range(THREADS)]
    process_tags = [[f"p{p}m{m}" for m in range(PER_PROCESS)] for p in range(PROCESSES)]
    tags = [tag for group in [*thread_tags, *process_tags] for tag in group]
    known = {tag: expected_bytes(tag, fmt) for tag in tags}
    messages = {tag: make(tag) for group in thread_tags for tag in group}

    def sender(group: list[str], index: int) -> Callable[[], None]:
        def work() -> None:
            # Half the threads share one transport, the others each make their own.
            transport = shared if index % 2 else FileTransport(directory, format=fmt)
            if index % 4 < 2:
                for tag in group:
                    result = transport.send(messages[tag])
                    assert result.ok
            else:
                results = transport.send_many([messages[tag] for tag in group])
                assert [r.ok for r in results] == [True] * len(group)

        return work

    with Reader(directory, fmt, known) as reader:
        processes = [spawn(directory, fmt, f"p{p}", PER_PROCESS) for p in range(PROCESSES)]
        try:
            errors = threaded([sender(group, i) for i, group in enumerate(thread_tags)])
        finally:
            outputs = [process.communicate(timeout=GUARD) for process in processes]
    assert errors == []
    for process, (out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, (out, err)
    assert reader.problems == []
    check_directory(directory, fmt, tags, [])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("seed", [1, 2])
def test_tasks_some_cancelled_write_into_one_directory(
    tmp_path: Path, fmt: Format, seed: int
) -> None:
    directory = tmp_path / "out"
    rng = random.Random(seed)
    groups = [[f"a{t}m{m}" for m in range(rng.randint(1, 3))] for t in range(TASKS)]
    tags = [tag for group in groups for tag in group]
    messages = {tag: make(tag) for tag in tags}
    known = {tag: expected_bytes(tag, fmt) for tag in tags}
    cancelled = set(rng.sample(range(TASKS), TASKS // 2))
    # Some before the task's first turn, most while its files are being written.
    delays = [rng.choice([0.0, rng.uniform(0.0, 0.03)]) for _ in groups]

    async def send(transport: FileTransport, group: list[str], index: int) -> None:
        if index % 2:
            for tag in group:
                assert (await transport.asend(messages[tag])).ok
        else:
            results = await transport.asend_many([messages[tag] for tag in group])
            assert [r.ok for r in results] == [True] * len(group)

    transport = FileTransport(directory, format=fmt)  # the directory, before the reader looks

    async def main() -> list[BaseException | None]:
        tasks = [asyncio.create_task(send(transport, g, i)) for i, g in enumerate(groups)]

        async def cancel(index: int) -> None:
            await asyncio.sleep(delays[index])
            tasks[index].cancel()

        async with asyncio.timeout(GUARD):
            await asyncio.gather(*(cancel(index) for index in cancelled))
            return await asyncio.gather(*tasks, return_exceptions=True)

    with Reader(directory, fmt, known) as reader:
        outcomes = run(main())
    sure: list[str] = []
    maybe: list[str] = []
    for index, (group, outcome) in enumerate(zip(groups, outcomes, strict=True)):
        if outcome is None:
            sure += group
        else:
            assert index in cancelled, outcome
            assert isinstance(outcome, asyncio.CancelledError), outcome
            maybe += group
    assert reader.problems == []
    check_directory(directory, fmt, sure, maybe)


def main(argv: list[str]) -> int:
    """Write ``COUNT`` messages called ``PREFIX`` + ``m<n>`` into ``DIR`` in ``FORMAT``."""
    directory, fmt, prefix, count = argv
    assert fmt in FORMATS
    transport = FileTransport(directory, format="eml" if fmt == "eml" else "maildir")
    for n in range(int(count)):
        if not transport.send(make(f"{prefix}m{n}")).ok:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_cancelled_asend_writes_nothing_after_it_ends(
    tmp_path: Path, fmt: Format, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: ``adeliver`` left its worker thread writing after the caller was
    cancelled (or timed out), so the message appeared later, once the caller had been told
    it was not sent; a retry then delivered it twice. Now the writer is stopped at its next
    piece and waited for: a message not complete when the call was cancelled leaves nothing
    behind. Deterministic: the writer is held at its first piece until the cancellation has
    been delivered."""
    directory = tmp_path / "out"
    transport = FileTransport(directory, format=fmt)
    started = threading.Event()
    go = threading.Event()
    copy = file_module._copy

    def held_copy(chunks: Iterable[bytes], out: IO[bytes]) -> None:
        if not started.is_set():  # the message's first file only
            started.set()
            assert go.wait(GUARD), "the test never let the writer go on"
        copy(chunks, out)

    monkeypatch.setattr(file_module, "_copy", held_copy)

    async def main() -> None:
        task = asyncio.create_task(transport.asend(make("cancelled")))
        assert await asyncio.to_thread(started.wait, GUARD)
        task.cancel()
        for _ in range(5):  # the task's turns: the cancellation reaches adeliver
            await asyncio.sleep(0)
        go.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        check_directory(directory, fmt, [], [])  # the writer has stopped: nothing, not half

    run(main())  # asyncio.run waits for the worker threads too
    check_directory(directory, fmt, [], [])  # and nothing came later
    assert started.is_set()
