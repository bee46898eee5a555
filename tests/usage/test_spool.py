from __future__ import annotations

import os
from pathlib import Path

import pytest

from sidecar.usage.spool import Entry, Spool, SpoolFull, read


def entry(n: int, **fields: object) -> Entry:
    return Entry(at=1_795_000_000.0 + n, source="header", counters={"r": 1, "i": n}, **fields)  # type: ignore[arg-type]


def test_entries_come_back_as_written(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", "W1", 1 << 20)
    first = [entry(1, identity="A", writer="W1", seq=1, charges={"k": (5, 60)})]
    second = [entry(2, external_id="x/y", profile={"display_name": "X", "tags": ["t"]})]
    spool.append(first)
    spool.append(second)
    assert spool.pending
    path = spool.rotate()
    assert path is not None and spool.oldest() == path
    assert read(path) == first + second
    spool.done(path)
    assert not spool.pending and not path.exists()
    assert spool.rotate() is None  # the new file has nothing yet


def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "W1", 1 << 20)
    spool.append([entry(1, identity="A")])
    path = spool.rotate()
    assert path is not None
    with path.open("ab") as f:
        f.write(b'{"at": 1.0, "sou')  # a crash mid-append
    assert read(path) == [entry(1, identity="A")]


def test_appends_past_the_cap_are_refused_whole(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "W1", 400)
    spool.append([entry(1, identity="A")])
    size = spool.bytes
    with pytest.raises(SpoolFull):
        spool.append([entry(n, identity="A") for n in range(10)])
    assert spool.bytes == size  # nothing of the refused append was written


def test_only_files_of_dead_writers_are_orphans(tmp_path: Path) -> None:
    alive = Spool(tmp_path, "ALIVE", 1 << 20)
    alive.append([entry(1, identity="A")])
    dead = Spool(tmp_path, "DEAD", 1 << 20)
    dead.append([entry(2, identity="B")])
    dead.close()  # its process is gone: its lock with it
    reader = Spool(tmp_path, "READER", 1 << 20)
    assert reader.total_bytes() == alive.bytes + os.path.getsize(tmp_path / "DEAD.000000.jsonl")
    found = list(reader.orphans())
    assert [p.name for p, _ in found] == ["DEAD.000000.jsonl"]
    path, fd = found[0]
    assert list(Spool(tmp_path, "OTHER", 1 << 20).orphans()) == []  # locked by the reader
    assert read(path) == [entry(2, identity="B")]
    Spool.drop(path, fd)
    assert not path.exists()
    alive.close()


def test_closing_deletes_empty_files_and_keeps_the_rest(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "W1", 1 << 20)
    spool.append([entry(1, identity="A")])
    spool.rotate()  # a second, empty file takes appends
    spool.close()
    assert [p.name for p in tmp_path.iterdir()] == ["W1.000000.jsonl"]
