from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from sidecar.quota.profiles import PROFILE_TTL_S
from tests.support.clock import FakeClock
from tests.support.env import MakeEnv
from tests.support.limits import BODY, policy_file
from tests.support.traffic import MESSAGES, tokens


async def test_refusal_shape_and_rate_limit_headers(
    make_env: MakeEnv, tmp_path: Path, clock: FakeClock
) -> None:
    env = await make_env(
        **policy_file(
            tmp_path,
            """
[[policy]]
name = "default"
requests = ["2/minute", "100/day"]
tokens = ["1000/hour"]
cost_usd = ["5/day"]
""",
        )
    )
    clock.now = 1_795_000_040.0  # 20 s into a minute
    async with httpx.AsyncClient(base_url=env.url) as client:
        capped = {**BODY, "max_tokens": 20}  # a reservation of about 50 tokens
        ok = await client.post(
            "/v1/chat/completions",
            json=capped,
            headers={"X-ORQ-IDENTITY-ID": "user_123", **tokens(100, 20)},  # 20: its cap
        )
        assert ok.status_code == 200
        assert ok.headers["x-ratelimit-limit-requests"] == "2"
        assert ok.headers["x-ratelimit-remaining-requests"] == "1"
        assert ok.headers["x-ratelimit-reset-requests"] == "1m40s"
        assert ok.headers["x-ratelimit-limit-tokens"] == "1000"
        # What is left once this request's reservation is counted.
        assert 900 < int(ok.headers["x-ratelimit-remaining-tokens"]) < 1000
        assert ok.headers["x-ratelimit-limit-cost"] == "5"
        await env.settle()
        await client.post(
            "/v1/chat/completions",
            json=capped,
            headers={"X-ORQ-IDENTITY-ID": "user_123", **tokens(10, 0)},
        )
        await env.settle()
        refused = await client.post(
            "/v1/chat/completions", json=capped, headers={"X-ORQ-IDENTITY-ID": "user_123"}
        )
    assert refused.status_code == 429
    assert refused.json() == {
        "error": {
            "message": "Rate limit exceeded: 2 requests per minute for identity user_123 "
            "(policy default)",
            "type": "rate_limit_error",
            "code": "requests_limit_exceeded",
            "param": None,
            "identity": "user_123",
            "policy": "default",
            "dimension": "requests",
            "limit": "2/minute",
        }
    }
    # Two in this minute, 40 s left: 30 s into the next minute this one's two weigh 1 (room in
    # 70 s), but retry-after never exceeds the binding window (60 s).
    assert refused.headers["retry-after"] == "60"
    assert refused.headers["x-ratelimit-reset-requests"] == "1m40s"  # until both slid out
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-remaining-tokens"] == "870"  # 1000 - 120 - 10


@pytest.mark.slow
async def test_openai_client_raises_and_its_retry_honours_retry_after(
    make_env: MakeEnv, tmp_path: Path
) -> None:
    env = await make_env(
        real_clock=True,
        **policy_file(tmp_path, '[[policy]]\nname = "slow"\nrequests = ["1/second"]\n'),
    )
    headers = {"X-ORQ-IDENTITY-ID": "patient"}
    async with openai.AsyncOpenAI(base_url=env.url + "/v1", api_key="k", max_retries=0) as oai:
        await oai.chat.completions.create(model="gpt-4o", messages=MESSAGES, extra_headers=headers)
        with pytest.raises(openai.RateLimitError) as info:
            await oai.chat.completions.create(
                model="gpt-4o", messages=MESSAGES, extra_headers=headers
            )
        retry_after = int(info.value.response.headers["retry-after"])
        assert 1 <= retry_after <= 2
    began = time.monotonic()
    async with openai.AsyncOpenAI(base_url=env.url + "/v1", api_key="k", max_retries=3) as oai:
        response = await oai.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=MESSAGES, extra_headers=headers
        )
    assert response.http_response.status_code == 200
    assert time.monotonic() - began >= 0.9, "the client waited as retry-after asked"


@pytest.mark.parametrize(
    ("match", "read"),
    [('ids = ["user_*"]', False), ('tags = ["pro"]', True), ('metadata = { plan = "pro" }', True)],
)
async def test_a_policy_set_matching_on_no_profile_field_reads_no_profile(
    make_env: MakeEnv,
    tmp_path: Path,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    match: str,
    read: bool,
) -> None:
    """An identity whose profile this process has forgotten is admitted without reading its
    record when no policy matches on tags or metadata; when one does, the record is read."""
    env = await make_env(
        **policy_file(
            tmp_path,
            f"""
[[policy]]
name = "chosen"
requests = ["100/minute"]
match = {{ {match} }}

[[policy]]
name = "rest"
requests = ["50/minute"]
""",
        )
    )
    records = env.app.services.quota.records
    many = records.many
    reads: list[list[str]] = []

    async def counted(ids: list[str]) -> Any:
        reads.append(ids)
        return await many(ids)

    monkeypatch.setattr(records, "many", counted)
    async with httpx.AsyncClient(base_url=env.url) as client:
        headers = {"X-ORQ-IDENTITY-ID": "user_1"}
        first = await client.post("/v1/chat/completions", json=BODY, headers=headers)
        assert first.status_code == 200
        reads.clear()
        clock.now += PROFILE_TTL_S + 1  # the profile is no longer remembered
        again = await client.post("/v1/chat/completions", json=BODY, headers=headers)
    assert again.status_code == 200
    assert bool(reads) is read
    # The stored profile has no tags and no metadata: only the ids policy matches it.
    expected = "100" if match.startswith("ids") else "50"
    assert again.headers["x-ratelimit-limit-requests"] == expected
