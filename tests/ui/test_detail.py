from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import openai

from tests.support.env import MakeEnv
from tests.support.traffic import MESSAGES, tokens
from tests.support.ui import sign_in


def limit_rows(page: str) -> dict[str, str]:
    return dict(re.findall(r'data-limit="([^"]+)">(.*?)</tr>', page, re.S))


async def test_identity_page_shows_profile_metrics_chart_limits_and_sources(
    make_env: MakeEnv, tmp_path: Path
) -> None:
    policies = tmp_path / "policies.toml"
    policies.write_text(
        '[[policy]]\nname = "pro"\nmatch = { metadata = { plan = "pro" } }\n'
        'requests = ["10/minute"]\ntokens = ["100000/day"]\ncost_usd = ["5/day"]\n'
        "concurrency = 4\n"
    )
    env = await make_env(policies={"paths": [str(policies)]})
    r = await env.api.post(
        "/v2/identities",
        json={"external_id": "team/a b", "display_name": "Team A", "metadata": {"plan": "pro"}},
    )
    assert r.status_code == 201
    async with openai.AsyncOpenAI(
        base_url=env.url + "/v1", api_key="sk-upstream", max_retries=0
    ) as client:
        for _ in range(3):
            await client.chat.completions.create(
                model="gpt-4o",
                messages=MESSAGES,
                extra_headers={"X-ORQ-IDENTITY-ID": "team/a b", **tokens(1000, 500)},
            )
    await env.settle()
    async with httpx.AsyncClient(base_url=env.url) as browser:
        await sign_in(browser)
        page = (await browser.get("/ui/identities/team%2Fa%20b")).text
        again = (await browser.get("/ui/identities/team%2Fa%20b")).text
    assert "<h1>Team A" in page and "<code>team/a b</code>" in page
    assert '<div class="card" id="metric-requests"><b>3</b>' in page
    # gpt-4o: 3 * (1000 * $2.50/M + 500 * $10/M) = $0.0225
    assert '<div class="card" id="metric-cost"><b>$0.0225</b>' in page
    assert '<div class="card" id="metric-tokens"><b>4,500</b>' in page
    assert 'id="metric-unreported"' not in page  # every answer told its usage
    # The chart: 30 days, today's bars hold today's usage.
    cost_chart = page[page.index('id="chart-cost"') : page.index('id="chart-tokens"')]
    days = re.findall(r'data-day="([0-9-]+)" data-value="([0-9.]+)"', cost_chart)
    assert len(days) == 30 and days[-1] == ("2026-11-18", "22500000")
    assert all(value == "0" for _, value in days[:-1])
    tokens_chart = page[page.index('id="chart-tokens"') :]
    assert 'data-day="2026-11-18" data-value="4500"' in tokens_chart
    assert "Policy <b>pro</b>" in page
    limits = limit_rows(page)
    assert set(limits) == {"10/minute", "100000/day", "5/day", "concurrency"}
    assert '<td class="num used">3</td>' in limits["10/minute"]
    assert '<td class="num remaining">7</td>' in limits["10/minute"]
    assert '<td class="num used">4,500</td>' in limits["100000/day"]
    assert '<td class="num used">$0.0225</td>' in limits["5/day"]
    assert '<td class="num used">0</td>' in limits["concurrency"]
    assert limit_rows(again) == limits  # reading the limits consumed nothing
    sources: dict[str, Any] = dict(
        re.findall(r'data-source="(\w+)">.*?<td class="num">([\d,]+)</td>', page, re.S)
    )
    assert sources == {
        "body": "0",
        "user_field": "0",
        "header": "3",
        "api_key": "0",
        "anonymous": "0",
    }
