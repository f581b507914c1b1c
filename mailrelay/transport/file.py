"""A transport that writes messages to a directory: for development, debugging and hand-off.

Rules of this module:

* Two layouts. ``format="eml"`` writes ``<id>.eml`` (the message exactly as it would go on
  the wire: CRLF line ends, Bcc removed) and ``<id>.json`` (the envelope, which the message
  alone cannot tell: sender, recipients with their DSN parameters, RET, ENVID, REQUIRETLS, and
  the time). ``format="maildir"`` delivers into a Maildir (``tmp/``, ``new/``, ``cur/``) as a
  mail delivery agent would: a ``Return-Path`` header first (RFC 5321 §4.4), LF line ends.
* Files are created 0600 (their owner's alone, whatever the umask); the directories the
  transport creates are 0700.
* Files appear atomically. Each file is written under a temporary name, flushed to disk with
  ``fsync``, then renamed into place, so a reader never sees half a message. For ``eml`` the
  ``.json`` is renamed last: an id is complete once its ``.json`` exists. For Maildir the file
  is written in ``tmp/`` and renamed into ``new/``, as the Maildir specification
  (https://cr.yp.to/proto/maildir.html) requires, under a name unique to this host, process,
  moment and a random part.
* The message is streamed from :meth:`Message.chunks() <mailrelay.message.Message.chunks>`
  to disk; it is never held whole in memory.
* Every recipient is accepted with a synthetic ``250`` reply naming the file. An ``OSError``
  while writing (disk full, permissions) becomes a transient
  :class:`~mailrelay.errors.DeliveryError`, and no partial file is left behind.
* ``adeliver`` writes in a worker thread. Cancelled, it tells the writer to stop before its
  next piece (and before the rename that completes the message) and waits for it: a message
  not complete by then leaves nothing behind, and nothing is written after the call ends
  (else the caller, told the message was not sent, would send it again: twice delivered).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import enum
import json
import os
import secrets
import socket
import threading
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Literal

from mailrelay.address import Address
from mailrelay.envelope import Envelope
from mailrelay.errors import ConfigurationError, DeliveryError
from mailrelay.message import Message
from mailrelay.reply import Reply
from mailrelay.results import DeliveryResult, Outcome, RecipientResult
from mailrelay.transport.base import AsyncTransport, Transport

__all__ = ["FileTransport"]

FORMATS = ("eml", "maildir")
# Windows opens files in text mode unless told; elsewhere the flag does not exist.
_O_BINARY = getattr(os, "O_BINARY", 0)


def _jsonable(value: object) -> object:
    """Envelope values as JSON: addresses as text, enums by value, sets sorted."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Address):
        return str(value)
    if isinstance(value, enum.Enum):
        return _jsonable(value.value)
    if isinstance(value, frozenset | set):
        members = [v for v in value if isinstance(v, enum.Enum)]
        if members and len(members) == len(value):
            # Enum members in their definition order (NOTIFY=SUCCESS,FAILURE,DELAY).
            order: list[enum.Enum] = list(type(members[0]).__members__.values())
            members.sort(key=order.index)
            return [_jsonable(v) for v in members]
        return sorted(str(_jsonable(v)) for v in value)
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return str(value)


def envelope_record(
    envelope: Envelope, *, message: Message, when: dt.datetime
) -> dict[str, object]:
    """The JSON document written next to each ``.eml``: the envelope and when it was written."""
    return {
        "sender": _jsonable(envelope.sender),
        "recipients": [
            {
                "address": str(recipient.address),
                "notify": _jsonable(recipient.notify),
                "orcpt": _jsonable(recipient.orcpt),
            }
            for recipient in envelope.recipients
        ],
        "ret": _jsonable(envelope.ret),
        "envid": _jsonable(envelope.envid),
        "notify": _jsonable(envelope.notify),
        "requiretls": envelope.requiretls,
        "message_id": message.message_id,
        "size": message.size,
        "time": when.isoformat(),
    }


def _to_lf(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """CRLF to LF across chunk boundaries (a chunk may end between the CR and the LF)."""
    held = b""
    for chunk in chunks:
        data = held + chunk
        if data.endswith(b"\r"):
            data, held = data[:-1], b"\r"
        else:
            held = b""
        yield data.replace(b"\r\n", b"\n")
    if held:
        yield held


def _fsync_directory(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk (POSIX).
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Abandoned(Exception):
    """The caller of :meth:`FileTransport.adeliver` was cancelled: stop, leave nothing."""


def _watch(chunks: Iterable[bytes], abandon: threading.Event | None) -> Iterator[bytes]:
    """``chunks``, stopping before each piece and after the last once ``abandon`` is set."""
    if abandon is None:
        yield from chunks
        return
    for chunk in chunks:
        if abandon.is_set():
            raise _Abandoned
        yield chunk
    # Checked once more after the last piece: before the rename that completes the file.
    if abandon.is_set():
        raise _Abandoned


def _write_atomically(final: Path, temporary: Path, chunks: Iterable[bytes]) -> None:
    """Write ``chunks`` to ``temporary``, fsync, then rename it to ``final``."""
    try:
        # O_EXCL: never overwrite; the temporary names are unique, so an existing one is a
        # bug. 0600: mail is its owner's alone, whatever the umask or the directory's mode
        # (one that already existed may be open to every local user).
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY, 0o600)
        with open(fd, "wb") as out:
            _copy(chunks, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, final)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _copy(chunks: Iterable[bytes], out: IO[bytes]) -> None:
    for chunk in chunks:
        out.write(chunk)


def _maildir_hostname() -> str:
    # Maildir spec: "/" and ":" in the host name are written as \057 and \072.
    return socket.gethostname().replace("/", r"\057").replace(":", r"\072") or "localhost"


class FileTransport(Transport, AsyncTransport):
    """Writes each message to a directory, as ``.eml`` + ``.json`` files or into a Maildir.

    Args:
        path: the directory (created, with its parents, when missing).
        format: ``"eml"`` (default) or ``"maildir"``.

    Raises:
        ConfigurationError: for an unknown format, or a directory that cannot be created.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, format: Literal["eml", "maildir"] = "eml"
    ) -> None:
        if format not in FORMATS:
            raise ConfigurationError(
                f"unknown FileTransport format {format!r} (expected one of: {', '.join(FORMATS)})"
            )
        self.path = Path(path)
        self.format = format
        self._counter = 0
        self._lock = threading.Lock()
        directories = [self.path]
        if format == "maildir":
            directories = [self.path / name for name in ("tmp", "new", "cur")]
        try:
            for directory in directories:
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot create the FileTransport directory {self.path}: {exc.strerror}"
            ) from exc

    def __repr__(self) -> str:
        return f"<FileTransport {str(self.path)!r} format={self.format!r}>"

    def _unique(self) -> int:
        with self._lock:
            self._counter += 1
            return self._counter

    def deliver(self, message: Message, envelope: Envelope) -> DeliveryResult:
        """Write the message (streamed) and its envelope; every recipient is accepted.

        Raises:
            DeliveryError: (transient) when the files cannot be written.
        """
        return self._deliver(message, envelope, None)

    def _deliver(
        self, message: Message, envelope: Envelope, abandon: threading.Event | None
    ) -> DeliveryResult:
        now = dt.datetime.now(dt.UTC)
        try:
            if self.format == "maildir":
                name = self._write_maildir(message, envelope, now, abandon)
            else:
                name = self._write_eml(message, envelope, now, abandon)
        except OSError as exc:
            raise DeliveryError(
                f"could not write the message to {self.path}: {exc.strerror or exc}",
                is_transient=True,
            ) from exc
        reply = Reply.of(250, f"2.0.0 Ok: saved as {name}")
        return DeliveryResult(
            recipients=tuple(
                RecipientResult(address=r.address, outcome=Outcome.ACCEPTED, reply=reply)
                for r in envelope.recipients
            ),
            message_id=message.message_id,
        )

    async def adeliver(self, message: Message, envelope: Envelope) -> DeliveryResult:
        """Like :meth:`deliver`, with the disk writes in a worker thread.

        Cancelled, it stops the writer before its next piece and waits for it, so a message
        not complete by then leaves nothing behind and nothing is written after the call.
        """
        abandon = threading.Event()
        writer = asyncio.ensure_future(asyncio.to_thread(self._deliver, message, envelope, abandon))
        try:
            return await asyncio.shield(writer)
        except asyncio.CancelledError:
            abandon.set()
            # The thread cannot be interrupted; it stops at its next piece. Waiting for it
            # means no file appears once the caller has been told the send was cancelled,
            # so the wait goes on through further cancellations (a timeout, then a task
            # group's), which would otherwise end it with the writer still at work.
            while not writer.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([writer])
            if not writer.cancelled():
                writer.exception()  # retrieved: _Abandoned, a DeliveryError or None
            raise

    def _write_eml(
        self,
        message: Message,
        envelope: Envelope,
        now: dt.datetime,
        abandon: threading.Event | None,
    ) -> str:
        # The time first so that a directory listing sorts in sending order.
        ident = f"{now:%Y%m%dT%H%M%S.%fZ}-{uuid.uuid4().hex}"
        eml = self.path / f"{ident}.eml"
        _write_atomically(eml, self.path / f".{ident}.eml.tmp", _watch(message.chunks(), abandon))
        record = json.dumps(
            {"id": ident, **envelope_record(envelope, message=message, when=now)},
            ensure_ascii=False,
            indent=2,
        ).encode("utf-8")
        json_path = self.path / f"{ident}.json"
        try:
            # The .json completes the message: its rename is the last moment to stop.
            _write_atomically(
                json_path, self.path / f".{ident}.json.tmp", _watch([record], abandon)
            )
            _fsync_directory(self.path)
        except BaseException:
            # A failure reported to the caller must leave no message behind, or a retry
            # would deliver it twice.
            json_path.unlink(missing_ok=True)
            eml.unlink(missing_ok=True)
            raise
        return eml.name

    def _write_maildir(
        self,
        message: Message,
        envelope: Envelope,
        now: dt.datetime,
        abandon: threading.Event | None,
    ) -> str:
        # Maildir spec: time, then M<microseconds>P<pid> (and our own counter Q and random R
        # so two deliveries in one microsecond from one process still differ), then host.
        seconds = int(now.timestamp())
        name = (
            f"{seconds}.M{now.microsecond}P{os.getpid()}Q{self._unique()}"
            f"R{secrets.token_hex(8)}.{_maildir_hostname()}"
        )
        sender = "<>" if envelope.sender is None else f"<{envelope.sender}>"
        # RFC 5321 §4.4: the delivering MTA records the reverse-path in Return-Path.
        header = f"Return-Path: {sender}\n".encode()
        chunks = _to_lf(message.chunks())
        delivered = self.path / "new" / name
        pieces = _watch(_prepend(header, chunks), abandon)
        _write_atomically(delivered, self.path / "tmp" / name, pieces)
        try:
            _fsync_directory(self.path / "new")
        except BaseException:
            delivered.unlink(missing_ok=True)  # reported as failed: leave nothing behind
            raise
        return name


def _prepend(first: bytes, rest: Iterable[bytes]) -> Iterator[bytes]:
    yield first
    yield from rest
