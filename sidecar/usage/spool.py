"""The local spool: usage that Redis could not take waits here, on disk, until it can.

Files live in `<data_dir>/spool/`, one writer (sidecar process) per file name prefix:
`<writer>.<n>.jsonl`, one usage entry per line. A process appends to its newest file and
holds an exclusive `flock` on every file of its own, so another process can tell a file whose
writer died (the lock is free) from one still in use. Appends are fsync'd before the caller
treats the entries as kept.

Replay takes the oldest file, writes its entries to Redis and deletes the file; a file is read
whole, and written again whole when the process dies half-way (every entry carries what makes
its second write a no-op: the writer's sequence number or the request id). Size is capped: at
`max_bytes`, appends are refused and the caller counts what it had to drop.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

log = logging.getLogger("sidecar.spool")

SUFFIX = ".jsonl"


class Entry(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Usage of one identity, hour and model, waiting to be written (in memory, then on
    disk)."""

    at: float  # when (epoch s): picks the day and hour buckets
    source: str
    counters: dict[str, int]
    charges: dict[str, tuple[int, int]] = {}  # rate-limit bucket -> (amount, lifetime s)
    identity: str | None = None  # the _id, when known
    external_id: str | None = None  # when not: resolved (and created) when written
    # What a body identity brought (its profile: a struct in memory, an object once read back
    # from disk), for that upsert; opaque here.
    profile: Any = None
    writer: str = ""  # the sidecar process that counted it, and its sequence number there:
    seq: int = 0  # the store keeps each writer's highest, so a second write is a no-op
    request_id: str | None = None  # hook reports: idempotent by the caller's id instead
    model: str = ""  # counted by model under this name (buckets.model_name); "": not by model


_encode = msgspec.json.Encoder().encode
_decoder = msgspec.json.Decoder(Entry)


class SpoolFull(Exception):
    pass


class _File:
    __slots__ = ("fd", "path", "size")

    def __init__(self, path: Path, fd: int, size: int) -> None:
        self.path = path
        self.fd = fd
        self.size = size


class Spool:
    """Append-only files of entries; not safe for two writers with the same id (they never
    share one: the id is a new ULID per process)."""

    def __init__(self, directory: Path, writer: str, max_bytes: int) -> None:
        self.directory = directory
        self.writer = writer
        self.max_bytes = max_bytes
        self._own: list[_File] = []  # oldest first; the last one takes appends
        self._next = 0
        self.bytes = 0  # of this process's files not yet replayed
        self.appended = 0  # entries, since start
        self.replayed = 0

    # -- this process's files --------------------------------------------------------------

    @property
    def pending(self) -> bool:
        return self.bytes > 0

    def append(self, entries: list[Entry]) -> None:
        """Write and fsync; raises SpoolFull (nothing written) past the cap, OSError."""
        data = b"".join(_encode(e) + b"\n" for e in entries)
        if self.total_bytes() + len(data) > self.max_bytes:
            raise SpoolFull(f"spool at its cap of {self.max_bytes} bytes")
        current = self._own[-1] if self._own else self._open_new()
        os.write(current.fd, data)
        os.fsync(current.fd)
        current.size += len(data)
        self.bytes += len(data)
        self.appended += len(entries)

    def rotate(self) -> Path | None:
        """Close the file taking appends (if it has any) for replay; its path, or None."""
        if not self._own or self._own[-1].size == 0:
            return None
        path = self._own[-1].path
        self._open_new()
        return path

    def oldest(self) -> Path | None:
        """This process's oldest file that no longer takes appends."""
        if len(self._own) < 2:
            return None
        return self._own[0].path

    def done(self, path: Path) -> None:
        """Every entry of `path` (one of ours) is in Redis: delete it."""
        for i, f in enumerate(self._own):
            if f.path == path:
                path.unlink(missing_ok=True)
                os.close(f.fd)
                self.bytes -= f.size
                del self._own[i]
                return

    def _open_new(self) -> _File:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{self.writer}.{self._next:06d}{SUFFIX}"
        self._next += 1
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        file = _File(path, fd, 0)
        self._own.append(file)
        return file

    # -- files other processes left --------------------------------------------------------

    def orphans(self) -> Iterator[tuple[Path, int]]:
        """Files of writers that are gone, each locked for the caller (release with `drop`
        after replaying, or `release` to leave it)."""
        if not self.directory.is_dir():
            return
        own = {f.path for f in self._own}
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            if path in own:
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue  # replayed by another process meanwhile
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)  # its writer (or another replayer) holds it
                continue
            if not path.exists():  # deleted between the glob and the lock
                os.close(fd)
                continue
            yield path, fd

    @staticmethod
    def drop(path: Path, fd: int) -> None:
        path.unlink(missing_ok=True)
        os.close(fd)

    @staticmethod
    def release(fd: int) -> None:
        os.close(fd)

    def total_bytes(self) -> int:
        """This process's unreplayed bytes plus what dead writers left."""
        total = self.bytes
        if self.directory.is_dir():
            own = {f.path for f in self._own}
            for path in self.directory.glob(f"*{SUFFIX}"):
                if path not in own:
                    with contextlib.suppress(FileNotFoundError):  # replayed meanwhile
                        total += path.stat().st_size
        return total

    def close(self) -> None:
        """Release this process's files; empty ones are deleted, the rest wait for replay by
        the next process that starts with this data dir."""
        for f in self._own:
            if f.size == 0:
                f.path.unlink(missing_ok=True)
            os.close(f.fd)
        self._own.clear()
        self.bytes = 0


def read(path: Path) -> list[Entry]:
    """The entries of a spool file; a torn last line (a crash mid-append) is skipped."""
    entries = []
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                log.warning("%s: line %d is incomplete (cut by a crash), skipped", path, number)
                break
            try:
                entries.append(_decoder.decode(line))
            except msgspec.DecodeError as exc:
                log.error("%s: line %d unreadable, skipped: %s", path, number, exc)
    return entries
