"""Review 71: FileTransport (mailrelay/transport/file.py) as an attacker and a demanding user.

Finding (the test failed before its fix): ``adeliver``, cancelled, sets the writer's stop
and waits for it, so that nothing is written once the call has ended. Cancelled a second
time while it waited (a timeout, then a task group's cancellation), the wait ended at
once, with the writer still at work: a writer already past its last check (between it and
the rename that completes the message) made the message appear after the caller had been
told it was cancelled, and a retry then delivered it twice. The wait now lasts through
further cancellations.

Finding: the files were created with the process's umask (typically 0644, readable by
every local user) in a directory that already existed (the transport makes the ones it
creates 0700). Mail is private: each file is now created 0600, as mail delivery agents
write a Maildir.
"""

from __future__ import annotations

import asyncio
import os
import stat
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import pytest

from mailrelay.transport import FileTransport
from mailrelay.transport import file as file_module
from tests.transport.helpers import make_message, run

Format = Literal["eml", "maildir"]
FORMATS: tuple[Format, ...] = ("eml", "maildir")
#: The most a test waits for an event that should come at once.
GUARD = 60.0


def everything(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("cancellations", [1, 2, 3])
def test_nothing_appears_after_a_cancelled_send_ends(
    tmp_path: Path, fmt: Format, cancellations: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "out"
    transport = FileTransport(directory, format=fmt)
    reached = threading.Event()
    go = threading.Event()
    write_atomically = file_module._write_atomically

    def held(final: Path, temporary: Path, chunks: Iterable[bytes]) -> None:
        pieces = list(chunks)  # through the writer's last check for a stop
        if final.suffix == ".json" or fmt == "maildir":  # the file that completes it
            # Past the last check, before the rename: the writer completes the message.
            reached.set()
            assert go.wait(GUARD), "the test never let the writer go on"
        write_atomically(final, temporary, pieces)

    monkeypatch.setattr(file_module, "_write_atomically", held)
    when_it_ended: list[str] = []

    async def main() -> None:
        task = asyncio.create_task(transport.asend(make_message(subject="cancelled")))
        assert await asyncio.to_thread(reached.wait, GUARD)
        for _ in range(cancellations):
            task.cancel()
            for _ in range(5):  # the task's turns: the cancellation reaches adeliver
                await asyncio.sleep(0)
        # The writer goes on only once the call could have ended.
        asyncio.get_running_loop().call_soon(go.set)
        with pytest.raises(asyncio.CancelledError):
            await task
        when_it_ended.extend(everything(directory))

    run(main())  # asyncio.run waits for the worker threads too
    assert everything(directory) == when_it_ended, "a file appeared after the call ended"
    # The message was complete before the stop was seen: it was delivered (at least once).
    assert len(when_it_ended) == (2 if fmt == "eml" else 1)


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_uncancelled_async_send_still_lands(tmp_path: Path, fmt: Format) -> None:
    directory = tmp_path / "out"
    transport = FileTransport(directory, format=fmt)
    result = run(transport.asend(make_message()))
    assert result.ok
    landed = [p for p in everything(directory) if p.endswith(".eml") or p.startswith("new/")]
    assert len(landed) == 1


@pytest.mark.parametrize("fmt", FORMATS)
def test_messages_are_private_to_their_owner(tmp_path: Path, fmt: Format) -> None:
    directory = tmp_path / "shared"
    directory.mkdir(mode=0o755)
    if fmt == "maildir":
        for name in ("tmp", "new", "cur"):
            (directory / name).mkdir(mode=0o755)
    previous = os.umask(0o022)  # the common default: files 0644
    try:
        FileTransport(directory, format=fmt).send(make_message())
        run(FileTransport(directory, format=fmt).asend(make_message()))
    finally:
        os.umask(previous)
    files = [p for p in directory.rglob("*") if p.is_file()]
    assert len(files) == (4 if fmt == "eml" else 2)
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name
