"""Request ids are ULIDs: the library parses them back to the time and bits they were made
of, they sort by time, never repeat, and a forked child does not make its parent's."""

from __future__ import annotations

import os
import time
import warnings

from ulid import ULID

from sidecar import ids


def test_an_id_is_a_ulid_of_its_time_and_random_bits() -> None:
    before = time.time_ns() // 1_000_000
    made = ids.ulid()
    after = time.time_ns() // 1_000_000
    parsed = ULID.from_str(made)
    assert str(parsed) == made and len(made) == 26
    assert before <= parsed.milliseconds <= after
    assert ULID.from_str(ids.ulid(0)).milliseconds == 0
    top = ids.ulid(2**48 - 1)
    assert ULID.from_str(top).milliseconds == 2**48 - 1 and top[0] == "7"


def test_the_encoding_is_the_librarys_for_any_bits() -> None:
    for _ in range(2000):
        theirs = ULID()
        ids._pool.extend(ids.random_parts(theirs.bytes[6:]))
        assert ids.ulid(theirs.milliseconds) == str(theirs)


def test_the_time_part_is_the_librarys_for_any_time() -> None:
    # What the usage writer prunes old writers' marks by (usage/writer.writer_floor).
    from sidecar.usage.writer import WRITER_MARK_TTL, writer_floor

    for seconds in (0.0, 0.0015, 1.999, 1_700_000_000.123, 2**47 / 1000 + 0.5, time.time()):
        assert ids.time_part(int(seconds * 1000)) == str(ULID.from_timestamp(seconds))[:10]
        later = seconds + WRITER_MARK_TTL
        assert writer_floor(later) == str(ULID.from_timestamp(later - WRITER_MARK_TTL))[:10]
    assert writer_floor(1.0) == str(ULID.from_timestamp(0.0))[:10]  # never before the epoch


def test_ids_never_repeat_and_sort_by_time() -> None:
    made = [ids.ulid(1_000 + n // 500) for n in range(5_000)]  # several refills
    assert len(set(made)) == len(made)
    assert [m[:10] for m in made] == sorted(m[:10] for m in made)


def test_a_forked_child_draws_its_own_bits() -> None:
    ids.ulid()  # the pool holds bits the child must not reuse
    assert ids._pool
    read, write = os.pipe()
    with warnings.catch_warnings():  # newer Pythons warn of forking a threaded process
        warnings.simplefilter("ignore", DeprecationWarning)
        child = os.fork()
    if child == 0:  # pragma: no cover - the child's side
        os.close(read)
        os.write(write, ids.ulid(5).encode())
        os._exit(0)
    os.close(write)
    theirs = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(child, 0)
    ours = ids.ulid(5)
    assert theirs != ours and len(theirs) == 26
