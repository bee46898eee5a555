"""Usage by model in the store: written in the same script call as the day counters, bounded
per identity and day, exact, erased and expiring with the identity's other counters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest
from redis.asyncio import Redis

from sidecar.usage import buckets, by_model
from sidecar.usage.counters import UsageCounters
from sidecar.usage.spool import Entry
from tests.support.clock import FakeClock
from tests.support.usage import KEYS, PatchedPool, catalog, identities, recorder

WIDTH = len(buckets.MODEL_COUNTERS)


class Counting:
    """A client that notes what reaches Redis: per round trip (a batch written at once on a
    connection, or a script run on its own), the SHA of each script it runs."""

    def __init__(self, client: Redis) -> None:
        self._client = client
        self.round_trips: list[list[str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def evalsha(self, sha: str, *args: Any) -> Any:
        self.round_trips.append([sha])
        return await self._client.evalsha(sha, *args)

    @property
    def connection_pool(self) -> Any:
        def counted(conn: Any) -> dict[str, Any]:
            send = type(conn)._send_packed_command  # what sidecar.store.scripts.batch calls

            async def _send_packed_command(packed: list[bytes], *args: Any, **kw: Any) -> Any:
                # Each command is RESP: *N, $7 EVALSHA, then the SHA as the next bulk string.
                parts = b"".join(packed).split(b"\r\n")
                shas = [parts[i + 2].decode() for i, p in enumerate(parts) if p == b"EVALSHA"]
                self.round_trips.append(shas)
                return await send(conn, packed, *args, **kw)

            return {"_send_packed_command": _send_packed_command}

        return PatchedPool(self._client.connection_pool, counted)


def sums(
    requests: int = 0, errors: int = 0, input_tokens: int = 0, cost: int = 0, output: int = 0
) -> list[int]:
    out = [0] * WIDTH
    out[buckets.MODEL_COUNTERS.index(buckets.OUTPUT)] = output
    out[buckets.MODEL_COUNTERS.index(buckets.REQUESTS)] = requests
    out[buckets.MODEL_COUNTERS.index(buckets.ERRORS)] = errors
    out[buckets.MODEL_COUNTERS.index(buckets.INPUT)] = input_tokens
    out[buckets.MODEL_COUNTERS.index(buckets.COST)] = cost
    return out


async def models(client: Redis, clock: FakeClock, identity_id: str, days: int = 1) -> Any:
    today = buckets.day(clock())
    (found,) = await UsageCounters(client, KEYS, clock).models(
        [identity_id], today - days + 1, today
    )
    return found


async def test_models_are_counted_apart_in_one_round_trip_and_add_up(
    redis: Redis, clock: FakeClock, tmp_path: Path
) -> None:
    ids = await identities(redis, clock, "ann", "bob")
    counting = Counting(redis)
    rec = recorder(counting, clock, tmp_path)
    for model, n in (("gpt-4o", 1), ("claude-sonnet-4", 2), ("gpt-4o", 3), ("o3-mini", 4)):
        rec.add(ids["ann"], {"r": 1, "i": n, "c": 10 * n, "sh": 1}, source="header",
                external_id="ann", model=model)  # fmt: skip
    rec.add(ids["bob"], {"r": 1, "e": 1}, source="header", external_id="bob", model="gpt-4o")
    # A refused request, and a key owner's copy, count by no model.
    rec.add(ids["ann"], {"rl": 1}, source="header", external_id="ann")
    rec.add(ids["bob"], {"kr": 1}, source="", external_id="bob")
    await rec.drain()
    # Four identity-model entries (ann's two gpt-4o requests merged) and two others: one
    # pipeline of six script calls (the top-spenders index, in its own slot, is another call).
    record = rec.writer.script.sha
    assert [trip.count(record) for trip in counting.round_trips if record in trip] == [6]
    ann = await models(redis, clock, ids["ann"])
    assert ann == {
        "gpt-4o": sums(requests=2, input_tokens=4, cost=40),
        "claude-sonnet-4": sums(requests=1, input_tokens=2, cost=20),
        "o3-mini": sums(requests=1, input_tokens=4, cost=40),
    }
    assert await models(redis, clock, ids["bob"]) == {"gpt-4o": sums(requests=1, errors=1)}
    # Together the models are the identity's own counters (the source counters aside).
    (day_sums,) = await UsageCounters(redis, KEYS, clock).sums([ids["ann"]])
    total = by_model.total([ann])
    for i, counter in enumerate(buckets.MODEL_COUNTERS):
        assert sum(s[i] for s in total.values()) == day_sums[counter], counter
    assert day_sums[buckets.RATE_LIMITED] == 1


async def test_at_most_16_models_a_day_then_other(
    redis: Redis, clock: FakeClock, tmp_path: Path
) -> None:
    ids = await identities(redis, clock, "many")
    rec = recorder(redis, clock, tmp_path)
    names = [f"model-{n:02d}" for n in range(buckets.MAX_MODELS + 4)]
    for name in names:
        rec.add(ids["many"], {"r": 1, "o": 5}, source="header", external_id="many", model=name)
    await rec.drain()
    found = await models(redis, clock, ids["many"])
    kept = names[: buckets.MAX_MODELS]
    assert sorted(found) == sorted([*kept, buckets.OTHER_MODEL])
    assert found[buckets.OTHER_MODEL][0] == 4
    # A model the day already counts keeps its name; a new one still goes to (other).
    rec.add(ids["many"], {"r": 1}, source="header", external_id="many", model=kept[3])
    rec.add(ids["many"], {"r": 1}, source="header", external_id="many", model="late")
    await rec.drain()
    found = await models(redis, clock, ids["many"])
    assert (found[kept[3]][0], found[buckets.OTHER_MODEL][0]) == (2, 5)
    assert "late" not in found
    # The next day starts with room again.
    clock.advance(buckets.DAY)
    rec.add(ids["many"], {"r": 1}, source="header", external_id="many", model="late")
    await rec.drain()
    assert await models(redis, clock, ids["many"]) == {"late": sums(requests=1)}
    assert (await models(redis, clock, ids["many"], days=2))["late"][0] == 1
    day = await redis.hgetall(KEYS.usage_models(ids["many"]) + str(buckets.day(clock())))
    assert day == {b"=late": b"a", b"ar": b"1", b"\x1fn": b"1"}  # its slot, requests, count


@pytest.mark.parametrize(
    "raw",
    ["gpt 4o 1 r 9", "r", "n", "\x1fn", "x\x1fr", "a\x00b\nc", "  padded  ", "(other)", "é" * 300],
)
async def test_no_model_name_breaks_the_counters(
    redis: Redis, clock: FakeClock, tmp_path: Path, raw: str
) -> None:
    ids = await identities(redis, clock, "odd")
    rec = recorder(redis, clock, tmp_path)
    name = buckets.model_name(raw)
    rec.add(ids["odd"], {"r": 1, "i": 7, "c": 3}, source="header", external_id="odd", model=name)
    rec.add(ids["odd"], {"r": 1, "i": 1}, source="header", external_id="odd", model="plain")
    await rec.drain()
    found = await models(redis, clock, ids["odd"])
    assert found == {name: sums(requests=1, input_tokens=7, cost=3), "plain": sums(1, 0, 1)}
    (day_sums,) = await UsageCounters(redis, KEYS, clock).sums([ids["odd"]])
    assert (day_sums["r"], day_sums["i"], day_sums["c"]) == (2, 8, 3)


def test_model_names_are_bounded_and_printable() -> None:
    assert buckets.model_name("  gpt-4o\n") == "gpt-4o"
    assert buckets.model_name("a\x00b\x1fc\x7fd\x85e") == "abcde"
    assert buckets.model_name("x" * 500) == "x" * buckets.MAX_MODEL_NAME
    assert buckets.model_name(None) == buckets.model_name("") == buckets.UNKNOWN_MODEL
    assert buckets.model_name("\x01\x02") == buckets.UNKNOWN_MODEL
    assert buckets.model_name(42) == buckets.UNKNOWN_MODEL


def test_the_day_layout_reads_back() -> None:
    # A name that looks like fields first: its one field, "==x ar", holds its slot.
    usage = {"=x ar": {"r": 7}}
    usage |= {f"m{n}": {"r": n + 1, "c": 10, "sh": 1} for n in range(buckets.MAX_MODELS + 1)}
    day = buckets.model_day(usage)
    assert day[buckets.MODEL_COUNT] == buckets.MAX_MODELS
    assert (day["==x ar"], day["ar"], day["=m0"], day["br"]) == ("a", 7, "b", 1)
    raw = {k.encode(): str(v).encode() for k, v in day.items()}
    raw[b"zr"] = b"5"  # a slot no model holds
    raw[b"azz"] = b"9"  # a counter not kept by model
    found = by_model.decode(raw)
    named = ["=x ar", *(f"m{n}" for n in range(buckets.MAX_MODELS - 1))]
    assert sorted(found) == sorted([*named, buckets.OTHER_MODEL])
    assert (found["=x ar"], found["m0"]) == (sums(requests=7), sums(requests=1, cost=10))
    # m15 and m16 had no slot left: (other), together.
    assert found[buckets.OTHER_MODEL] == sums(requests=16 + 17, cost=20)


async def test_sums_are_exact_past_what_a_lua_number_holds(
    redis: Redis, clock: FakeClock, tmp_path: Path
) -> None:
    ids = await identities(redis, clock, "rich")
    rec = recorder(redis, clock, tmp_path)
    big = 2**53 + 1  # a double would make it 2**53
    for _ in range(3):
        rec.add(ids["rich"], {"r": 1, "c": big}, source="header", external_id="rich", model="m")
        await rec.drain()
        clock.advance(buckets.DAY)
    rec.add(ids["rich"], {"r": 1, "c": 999_999_999}, source="header", external_id="rich",
            model="m")  # fmt: skip
    await rec.drain()
    found = await models(redis, clock, ids["rich"], days=4)
    assert found["m"][buckets.MODEL_COUNTERS.index(buckets.COST)] == 3 * big + 999_999_999
    assert found["m"][0] == 4


async def test_erased_with_the_identity_and_expiring_with_the_day_counters(
    redis: Redis, clock: FakeClock, tmp_path: Path
) -> None:
    ids = await identities(redis, clock, "gone", "stays")
    rec = recorder(redis, clock, tmp_path)
    first_day, written = buckets.day(clock()), clock()
    for offset in (0, 1, 2):
        if offset:
            clock.advance(buckets.DAY)
        for who in ("gone", "stays"):
            rec.add(ids[who], {"r": 1}, source="header", external_id=who, model="m")
        await rec.drain()
    ttl = await redis.ttl(KEYS.usage_models(ids["stays"]) + str(first_day))
    # Set by the writer's clock (the last write of that day): gone when the day leaves the
    # 32 days kept, as the day counters' fields are.
    expected = (first_day + buckets.RETENTION_DAYS) * buckets.DAY - written
    assert abs(ttl - expected) <= 2
    assert 31 * buckets.DAY < ttl <= 32 * buckets.DAY

    cat = catalog(redis, clock)
    found = await cat.get("gone")
    assert found is not None
    await cat.delete(found)
    assert await redis.keys(f"sidecar:u:{{{ids['gone']}}}*") == []
    assert len(await redis.keys(f"sidecar:u:{{{ids['stays']}}}:m:*")) == 3
    assert (await models(redis, clock, ids["stays"], days=3))["m"][0] == 3


async def test_a_day_past_retention_is_not_written(
    redis: Redis, clock: FakeClock, tmp_path: Path
) -> None:
    ids = await identities(redis, clock, "late")
    rec = recorder(redis, clock, tmp_path)
    old = clock() - buckets.RETENTION_DAYS * buckets.DAY
    rec.add(ids["late"], {"r": 1}, source="header", external_id="late", model="m", at=old)
    await rec.drain()
    assert await redis.keys("sidecar:u:*:m:*") == []


async def test_hook_reports_count_by_model_once(redis: Redis, clock: FakeClock) -> None:
    ids = await identities(redis, clock, "hooked")
    rec = recorder(redis, clock, None)
    for _ in range(2):  # a retried report
        await rec.record(ids["hooked"], {"r": 1, "o": 9}, request_id="req-1", model="gpt-4o")
    found = await models(redis, clock, ids["hooked"])
    assert found == {"gpt-4o": sums(requests=1, output=9)}


def test_spooled_entries_keep_their_model() -> None:
    entry = Entry(at=1.0, source="header", counters={"r": 1}, identity="x", model="gpt-4o")
    encoded = msgspec.json.encode(entry)
    assert msgspec.json.decode(encoded, type=Entry).model == "gpt-4o"
    # A spool file written before models were counted replays without one.
    older = b'{"at":1.0,"source":"header","counters":{"r":1},"identity":"x"}'
    assert msgspec.json.decode(older, type=Entry).model == ""


def test_model_names_worked_out_before_are_kept_and_stay_bounded() -> None:
    buckets._NAMED.clear()
    assert buckets.model_name(" gpt-4o\x00 ") == "gpt-4o"
    assert buckets._NAMED == {" gpt-4o\x00 ": "gpt-4o"}
    assert buckets.model_name(" gpt-4o\x00 ") == "gpt-4o"
    long = "m" * (4 * buckets.MAX_MODEL_NAME + 1)
    assert buckets.model_name(long) == "m" * buckets.MAX_MODEL_NAME
    assert long not in buckets._NAMED  # too long to be kept
    buckets._NAMED.clear()
    for n in range(buckets._NAMED_MAX):
        buckets.model_name(f"model-{n}")
    assert len(buckets._NAMED) == buckets._NAMED_MAX
    assert buckets.model_name("one-more") == "one-more"
    assert len(buckets._NAMED) == 1
    buckets._NAMED.clear()
