from __future__ import annotations

import openai
import pytest

from tests.support.clock import FakeClock
from tests.support.env import Env
from tests.support.traffic import MESSAGES, client, tokens


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


async def test_series_errors(env: Env) -> None:
    await env.api.post("/v2/identities", json={"external_id": "x"})
    r = await env.api.get("/v2/identities/x/metrics?granularity=week")
    assert r.status_code == 400 and r.json()["error"]["param"] == "granularity"
    assert (await env.api.get("/v2/identities/nobody/metrics")).status_code == 404
    assert (await env.api.get("/v2/identities/x/other")).status_code == 404
