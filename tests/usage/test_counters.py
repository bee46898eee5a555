from __future__ import annotations

from typing import cast

import openai
import pytest
from redis.asyncio import Redis

from sidecar.testing.serving import ApiClient as Client
from tests.support.clock import FakeClock
from tests.support.env import Env
from tests.support.identities import create
from tests.support.traffic import MESSAGES, client, tokens


async def seed_days(
    redis: Redis, identity_id: str, today: int, days: dict[int, dict[str, int]]
) -> str:
    """Day counters and their window sums as the recorder leaves them on `today`."""
    key = "sidecar:u:{" + identity_id + "}:d"
    sums: dict[str, int] = {}
    for day, counters in days.items():
        await redis.hset(key, mapping={f"{day}:{k}": v for k, v in counters.items()})
        if today - 30 < day <= today:
            for k, v in counters.items():
                sums[k] = sums.get(k, 0) + v
    await redis.hset(key, mapping={"s:day": today, **{f"s:{k}": v for k, v in sums.items()}})
    return key


async def test_metrics_sum_the_last_30_days(api: Client, redis: Redis, clock: FakeClock) -> None:
    made = await create(api, external_id="spender")
    # Day 20775 (2026-11-18) is today on the fake clock; 20746 is the 30th day back.
    key = await seed_days(redis, made["_id"], 20775, {
        20775: {"r": 2, "e": 1, "i": 600, "o": 300, "c": 4_500_000, "rl": 1},
        20746: {"r": 1, "i": 400, "o": 200, "c": 3_000_000, "ci": 77},
        20745: {"r": 50, "i": 1, "c": 99},
    })  # fmt: skip
    got = (await api.get("/v2/identities/spender?include_metrics=true")).json()["metrics"]
    assert got == {
        "total_cost": 0.0075,
        "total_tokens": 1500,
        "total_requests": 3,
        "error_rate": 0.3333,
        "input_tokens": 1000,
        "output_tokens": 500,
        "rate_limited_requests": 1,
    }
    # A day later, day 20746 has left the window.
    clock.advance(86_400)
    got = (await api.get("/v2/identities/spender?include_metrics=true")).json()["metrics"]
    assert (got["total_requests"], got["total_tokens"], got["total_cost"]) == (2, 900, 0.0045)
    assert await redis.hget(key, "20746:r") == b"1", "kept until the retention ends"
    # Forty days later nothing is left in the window, and days past retention are gone.
    clock.advance(40 * 86_400)
    got = (await api.get("/v2/identities", params={"include_metrics": "true"})).json()
    assert got["data"][0]["metrics"]["total_requests"] == 0
    assert got["data"][0]["metrics"]["total_cost"] == 0.0
    fields = cast(list[bytes], await redis.hkeys(key))
    assert [f for f in fields if not f.startswith(b"s:")] == []


async def test_cost_sums_stay_exact_beyond_float_precision(api: Client, redis: Redis) -> None:
    made = await create(api, external_id="whale")
    await seed_days(redis, made["_id"], 20775, {
        20775: {"c": 9_007_199_254_740_993, "r": 1},  # 2**53 + 1
        20774: {"c": 1_999_999_999, "r": 1},
        20745: {"c": 7, "r": 1},
    })  # fmt: skip
    from sidecar.store.keys import Keys
    from sidecar.usage.counters import UsageCounters

    day = [20775]
    counters = UsageCounters(redis, Keys("sidecar"), lambda: day[0] * 86_400.0)
    (sums,) = await counters.sums([made["_id"]])
    assert (sums["r"], sums["e"], sums["c"]) == (2, 0, 9_007_201_254_740_992)
    day[0] = 20804  # day 20774 leaves the window, exactly
    (sums,) = await counters.sums([made["_id"]])
    assert (sums["r"], sums["e"], sums["c"]) == (1, 0, 9_007_199_254_740_993)


async def test_daily_and_hourly_series_with_sources(env: Env, clock: FakeClock) -> None:
    async with client(env) as oai:
        headers = {"X-ORQ-IDENTITY-ID": "charted", **tokens(100, 10)}
        await oai.chat.completions.create(model="gpt-4o", messages=MESSAGES, extra_headers=headers)
        with pytest.raises(openai.InternalServerError):
            await oai.chat.completions.create(
                model="gpt-4o", messages=MESSAGES, extra_headers={**headers, "x-mock-status": "503"}
            )
        await env.settle()
        clock.advance(86_400)
        await oai.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            extra_body={"identity": {"id": "charted"}},
            extra_headers=tokens(7, 3),
        )
    await env.settle()
    r = await env.api.get("/v2/identities/charted/metrics")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "identity.metrics"
    assert body["identity"]["external_id"] == "charted"
    assert body["totals"]["total_requests"] == 3
    assert body["totals"]["error_rate"] == 0.3333
    series = body["series"]
    assert series["granularity"] == "day"
    points = series["points"]
    assert len(points) == 30
    assert points[-1]["start"] == "2026-11-19T00:00:00Z"
    assert (points[-1]["requests"], points[-1]["input_tokens"], points[-1]["output_tokens"]) == (
        1, 7, 3)  # fmt: skip
    assert (points[-2]["requests"], points[-2]["errors"], points[-2]["input_tokens"]) == (2, 1, 100)
    assert body["totals"]["input_tokens"] == 107
    assert sum(p["requests"] for p in points[:-2]) == 0
    assert points[-1]["cost_nanos"] > 0
    assert series["by_source"] == {
        "body": 1,
        "user_field": 0,
        "header": 2,
        "api_key": 0,
        "anonymous": 0,
    }
    assert series["last_source"] == "body"
    assert series["last_seen"] == "2026-11-19T11:06:40Z"

    hourly = (await env.api.get("/v2/identities/charted/metrics?granularity=hour")).json()
    hours = hourly["series"]["points"]
    assert len(hours) == 72
    assert hours[-1]["start"] == "2026-11-19T11:00:00Z" and hours[-1]["requests"] == 1
    assert hours[-25]["requests"] == 2
    assert sum(p["requests"] for p in hours) == 3
