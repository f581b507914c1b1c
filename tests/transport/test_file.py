"""FileTransport: .eml + .json and Maildir, atomic, streamed."""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.envelope import Envelope, Notify, Recipient, Ret
from mailrelay.errors import ConfigurationError, DeliveryError
from mailrelay.message import Message
from mailrelay.transport import FileTransport
from mailrelay.transport.file import _to_lf
from tests.transport.helpers import make_message, run


def only(directory: Path, pattern: str = "*") -> Path:
    (found,) = directory.glob(pattern)
    return found


def test_eml_and_json_are_written(tmp_path: Path) -> None:
    message = make_message()
    before = dt.datetime.now(dt.UTC)
    result = FileTransport(tmp_path).send(message)
    after = dt.datetime.now(dt.UTC)

    eml = only(tmp_path, "*.eml")
    assert eml.read_bytes() == message.as_bytes()
    record = json.loads(eml.with_suffix(".json").read_text(encoding="utf-8"))
    assert record["id"] == eml.stem
    assert record["sender"] == "alice@example.com"
    assert record["recipients"] == [
        {"address": "bob@example.com", "notify": None, "orcpt": None},
        {"address": "carol@example.org", "notify": None, "orcpt": None},
    ]
    assert record["message_id"] == message.message_id
    assert record["size"] == message.size
    assert before <= dt.datetime.fromisoformat(record["time"]) <= after
    assert result.ok
    assert all(r.reply is not None and eml.name in r.reply.text for r in result.recipients)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([eml.name, f"{eml.stem}.json"])


@pytest.mark.parametrize(
    ("envelope", "expected"),
    [
        (
            Envelope(None, ["bob@example.com"]),
            {"sender": None, "ret": None, "envid": None, "notify": None, "requiretls": False},
        ),
        (
            Envelope(
                "bounces@example.com",
                ["bob@example.com"],
                ret=Ret.HDRS,
                envid="QQ314159",
                notify="FAILURE,DELAY,SUCCESS",
                requiretls=True,
            ),
            {
                "sender": "bounces@example.com",
                "ret": "HDRS",
                "envid": "QQ314159",
                "notify": ["SUCCESS", "FAILURE", "DELAY"],
                "requiretls": True,
            },
        ),
    ],
    ids=["null-sender", "dsn"],
)
def test_the_json_holds_the_envelope(
    tmp_path: Path, envelope: Envelope, expected: dict[str, Any]
) -> None:
    FileTransport(tmp_path).send(make_message(), envelope)
    record = json.loads(only(tmp_path, "*.json").read_text(encoding="utf-8"))
    assert {key: record[key] for key in expected} == expected


def test_per_recipient_dsn_parameters_and_unicode(tmp_path: Path) -> None:
    envelope = Envelope(
        "alice@example.com",
        [
            Recipient("bob@example.com", notify=Notify.NEVER),
            Recipient("björn@bücher.example", orcpt="old@example.com"),
        ],
    )
    FileTransport(tmp_path).send(make_message(), envelope)
    record = json.loads(only(tmp_path, "*.json").read_text(encoding="utf-8"))
    assert record["recipients"] == [
        {"address": "bob@example.com", "notify": ["NEVER"], "orcpt": None},
        {"address": "björn@bücher.example", "notify": None, "orcpt": "old@example.com"},
    ]


def test_maildir_delivery(tmp_path: Path) -> None:
    message = make_message(text="line one\nline two\n")
    transport = FileTransport(tmp_path / "Maildir", format="maildir")
    result = transport.send(message, Envelope(None, ["bob@example.com"]))
    assert result.ok
    maildir = tmp_path / "Maildir"
    assert sorted(p.name for p in maildir.iterdir()) == ["cur", "new", "tmp"]
    assert list((maildir / "tmp").iterdir()) == []
    assert list((maildir / "cur").iterdir()) == []
    delivered = only(maildir / "new")
    assert delivered.read_bytes() == b"Return-Path: <>\n" + message.as_bytes().replace(
        b"\r\n", b"\n"
    )
    # Maildir names: no "/" and no ":" (the ":2," info suffix belongs to readers).
    assert ":" not in delivered.name
    assert delivered.name.split(".")[0].isdigit()


def test_maildir_names_are_unique(tmp_path: Path) -> None:
    transport = FileTransport(tmp_path, format="maildir")
    results = transport.send_many([make_message(subject=str(n)) for n in range(30)])
    assert all(result.ok for result in results)
    assert len(list((tmp_path / "new").iterdir())) == 30


def test_eml_names_are_unique_and_sort_in_sending_order(tmp_path: Path) -> None:
    transport = FileTransport(tmp_path)
    transport.send_many([make_message(subject=str(n)) for n in range(20)])
    names = sorted(tmp_path.glob("*.eml"))
    assert len(names) == 20
    subjects = [Message.from_file(path).get("Subject") for path in names]
    assert subjects == [str(n) for n in range(20)]


def test_messages_are_streamed_never_loaded_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "big.eml"
    line = b"0123456789" * 7 + b"\n"
    with source.open("wb") as out:
        out.write(b"From: alice@example.com\nTo: bob@example.com\nSubject: big\n\n")
        for _ in range(40_000):  # about 3 MB, many 64 KiB chunks
            out.write(line)
    message = Message.from_file(source)
    expected_size = message.size

    def forbidden(self: Message) -> bytes:
        raise AssertionError("FileTransport must stream chunks(), not call as_bytes()")

    monkeypatch.setattr(Message, "as_bytes", forbidden)
    FileTransport(tmp_path / "eml", format="eml").send(message)
    FileTransport(tmp_path / "maildir", format="maildir").send(message)
    eml = only(tmp_path / "eml", "*.eml")
    assert eml.stat().st_size == expected_size
    with eml.open("rb") as written, source.open("rb") as original:
        assert written.read(200) == original.read(200).replace(b"\n", b"\r\n")[:200]
    delivered = only(tmp_path / "maildir" / "new")
    # LF on disk: the size is the wire size minus one CR per line, plus Return-Path.
    header = len(b"Return-Path: <alice@example.com>\n")
    assert delivered.stat().st_size == source.stat().st_size + header


# fsync calls: eml = .eml file, .json file, directory; maildir = file, directory.
@pytest.mark.parametrize(
    ("fmt", "failing_call"),
    [("eml", 1), ("eml", 2), ("eml", 3), ("maildir", 1), ("maildir", 2)],
)
def test_a_failed_write_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, failing_call: int
) -> None:
    transport = FileTransport(tmp_path, format=fmt)  # type: ignore[arg-type]
    real_fsync = os.fsync
    calls = 0

    def fsync(fd: int) -> None:
        nonlocal calls
        calls += 1
        if calls == failing_call:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(DeliveryError, match="No space left") as caught:
        transport.send(make_message())
    assert caught.value.is_transient
    assert isinstance(caught.value.__cause__, OSError)
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert leftovers == []


def test_async_delivery(tmp_path: Path) -> None:
    async def main() -> None:
        async with FileTransport(tmp_path) as transport:
            result = await transport.asend(make_message())
            assert result.ok

    run(main())
    assert len(list(tmp_path.glob("*.eml"))) == 1


def test_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="unknown FileTransport format"):
        FileTransport(tmp_path, format="mbox")  # type: ignore[arg-type]
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigurationError, match="cannot create"):
        FileTransport(blocker / "outbox")


def test_repr(tmp_path: Path) -> None:
    assert repr(FileTransport(tmp_path, format="maildir")) == (
        f"<FileTransport {str(tmp_path)!r} format='maildir'>"
    )


wire_text = st.lists(
    st.binary(max_size=20).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")), max_size=10
).map(lambda lines: b"".join(line + b"\r\n" for line in lines))


@given(wire_text, st.lists(st.integers(min_value=1, max_value=7), max_size=20))
def test_crlf_to_lf_ignores_chunk_boundaries(data: bytes, cuts: list[int]) -> None:
    chunks = []
    rest = data
    for cut in cuts:
        chunks.append(rest[:cut])
        rest = rest[cut:]
    chunks.append(rest)
    assert b"".join(_to_lf(chunks)) == data.replace(b"\r\n", b"\n")
