"""The recorder against a real Redis: a retried hook report counts once; inline usage waits
to share a write, which `drain` makes at once."""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path

import pytest
from redis.asyncio import Redis

from sidecar.usage import buckets
from sidecar.usage import recorder as recorder_module
from tests.support.clock import FakeClock
from tests.support.usage import KEYS, add, identities, recorder, requests_of


async def test_a_hook_report_retried_counts_once(
    redis: Redis, clock: FakeClock, tmp_path: Path
) -> None:
    ids = await identities(redis, clock, "a")
    rec = recorder(redis, clock, tmp_path)
    first = await rec.record(ids["a"], {"r": 1}, request_id="req-1", external_id="a")
    again = await rec.record(ids["a"], {"r": 1}, request_id="req-1", external_id="a")
    assert (first.counted, again.counted, again.duplicate) == (True, False, True)
    assert (await requests_of(redis, ids["a"], clock))["requests"] == 1


async def test_inline_usage_waits_to_share_a_write_and_drain_writes_it_at_once(
    redis: Redis, clock: FakeClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recorder_module, "FLUSH_INTERVAL", 30.0)
    ids = await identities(redis, clock, "a")
    rec = recorder(redis, clock, tmp_path)
    add(rec, ids["a"], "a")
    add(rec, ids["a"], "a", 2)
    await asyncio.sleep(0.2)
    assert (await requests_of(redis, ids["a"], clock))["requests"] == 0  # still waiting
    await asyncio.wait_for(rec.drain(), timeout=5)  # not the flusher's 30 s
    assert (await requests_of(redis, ids["a"], clock))["requests"] == 3
    assert rec.waiting == 0
    await rec.close()


async def test_a_drain_just_after_an_add_does_not_wait_out_the_flush_interval(
    redis: Redis, clock: FakeClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flusher `add` starts has not begun its nap when `drain` comes straight after (no
    await between them): it skips the nap rather than sleep the interval through."""
    monkeypatch.setattr(recorder_module, "FLUSH_INTERVAL", 30.0)
    ids = await identities(redis, clock, "a")
    rec = recorder(redis, clock, tmp_path)
    for n in (1, 2):
        add(rec, ids["a"], "a")
        async with asyncio.timeout(5):  # in this task, as a caller awaits it (not wait_for's)
            await rec.drain()
        assert (await requests_of(redis, ids["a"], clock))["requests"] == n
    await rec.close()


async def test_close_writes_what_waits_without_waiting_out_the_flush_interval(
    redis: Redis, clock: FakeClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recorder_module, "FLUSH_INTERVAL", 30.0)
    ids = await identities(redis, clock, "a")
    rec = recorder(redis, clock, tmp_path)
    add(rec, ids["a"], "a", 2)
    await asyncio.sleep(0.05)  # the flusher naps
    await asyncio.wait_for(rec.close(grace_s=20), timeout=5)
    assert (await requests_of(redis, ids["a"], clock))["requests"] == 2
    assert rec.spool is not None and not rec.spool.pending  # written, not left to the spool


async def test_counters_stay_exact_past_what_a_double_holds(
    redis: Redis, clock: FakeClock, tmp_path: Path
) -> None:
    """Day, window-sum, hour and by-model counters through record.lua, across 2^52 and 2^53."""
    ids = await identities(redis, clock, "whale")
    rec = recorder(redis, clock, tmp_path)
    total = 0
    for cost in (2**52 - 1, 2, 2**53, 3, 7):  # under 2^52, across it, far past it
        rec.add(
            ids["whale"], {"r": 1, "c": cost}, source="body", external_id="whale", model="gpt-4o"
        )
        await rec.drain()
        total += cost
    day, hour = buckets.day(clock()), buckets.hour(clock())
    days = await redis.hgetall(KEYS.usage_days(ids["whale"]))
    assert (days[f"{day}:c".encode()], days[b"s:c"]) == (b"%d" % total, b"%d" % total)
    assert (days[f"{day}:r".encode()], days[b"s:r"]) == (b"5", b"5")
    hours = await redis.hgetall(KEYS.usage_hours(ids["whale"]) + str(hour))
    assert (hours[b"c"], hours[b"r"]) == (b"%d" % total, b"5")
    models = await redis.hgetall(KEYS.usage_models(ids["whale"]) + str(day))
    slot = models[b"=gpt-4o"]
    assert isinstance(slot, bytes)
    assert (models[slot + b"c"], models[slot + b"r"]) == (b"%d" % total, b"5")
    assert total == 2**53 + 2**52 + 11
    await rec.close()


def test_requests_by_source_are_told_apart_by_their_first_letter() -> None:
    """record.lua keeps them out of the hour buckets by it (buckets.BY_SOURCE_FIRST)."""
    others = {*buckets.USAGE, *buckets.VIA_COUNTERS, *buckets.MODEL_COUNTERS}
    assert all(c[0] == buckets.BY_SOURCE_FIRST for c in buckets.BY_SOURCE.values())
    assert not any(c[0] == buckets.BY_SOURCE_FIRST for c in others)


async def test_hour_buckets_hold_what_the_hourly_series_reads(
    redis: Redis, clock: FakeClock, tmp_path: Path
) -> None:
    """Every USAGE counter, and not the requests by source, which the day counters and the
    window sums keep."""
    ids = await identities(redis, clock, "a")
    rec = recorder(redis, clock, tmp_path)
    counters = {c: n for n, c in enumerate(buckets.USAGE, start=1)}
    rec.add(ids["a"], counters | {buckets.BY_SOURCE["header"]: 1}, source="header", external_id="a")
    await rec.drain()
    day, hour = buckets.day(clock()), buckets.hour(clock())
    hours = await redis.hgetall(KEYS.usage_hours(ids["a"]) + str(hour))
    assert hours == {c.encode(): b"%d" % n for c, n in counters.items()}
    days = await redis.hgetall(KEYS.usage_days(ids["a"]))
    assert (days[f"{day}:sh".encode()], days[b"s:sh"]) == (b"1", b"1")
    assert days[f"{day}:c".encode()] == b"%d" % counters[buckets.COST]
    await rec.close()


async def test_counts_left_for_later_run_together_within_the_tally_interval(
    redis: Redis, clock: FakeClock, tmp_path: Path
) -> None:
    """Recorder.later: what answered requests add is run in one go, TALLY_S after the first;
    until then it counts as waiting."""
    rec = recorder(redis, clock, tmp_path)
    ran: list[int] = []
    done = asyncio.Event()
    for n in range(3):
        rec.later(functools.partial(ran.append, n))
    rec.later(done.set)
    assert (ran, rec.waiting) == ([], 4)
    await asyncio.sleep(recorder_module.TALLY_S / 2)
    assert ran == []
    async with asyncio.timeout(1):
        await done.wait()
    assert (ran, rec.waiting) == ([0, 1, 2], 0)
    await rec.close()


async def test_counts_left_for_later_run_at_once_when_many_wait(
    redis: Redis, clock: FakeClock, tmp_path: Path
) -> None:
    rec = recorder(redis, clock, tmp_path)
    ran: list[int] = []
    for n in range(recorder_module.MAX_LATER):
        rec.later(functools.partial(ran.append, n))
    assert ran == list(range(recorder_module.MAX_LATER))  # no wait for the interval
    assert rec.waiting == 0
    await rec.close()


async def test_drain_and_close_run_the_counts_left_for_later_first(
    redis: Redis, clock: FakeClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recorder_module, "TALLY_S", 30.0)
    ids = await identities(redis, clock, "a")
    rec = recorder(redis, clock, tmp_path)
    rec.later(lambda: add(rec, ids["a"], "a", 2))
    async with asyncio.timeout(5):
        await rec.drain()
    assert (await requests_of(redis, ids["a"], clock))["requests"] == 2
    rec.later(lambda: add(rec, ids["a"], "a", 3))
    async with asyncio.timeout(5):
        await rec.close()
    assert (await requests_of(redis, ids["a"], clock))["requests"] == 5


async def test_a_count_that_fails_is_logged_and_the_others_still_run(
    redis: Redis, clock: FakeClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rec = recorder(redis, clock, tmp_path)
    ran: list[str] = []

    def broken() -> None:
        raise ValueError("a bug")

    rec.later(lambda: ran.append("before"))
    rec.later(broken)
    rec.later(lambda: ran.append("after"))
    await rec.drain()
    assert ran == ["before", "after"]
    assert "usage of a request not recorded" in caplog.text
    await rec.close()
