from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from redis.asyncio import Redis

from sidecar.testing.redis_server import free_port
from tests.support.auth import ADMIN_TOKEN
from tests.support.env import MakeEnv
from tests.support.limits import policy_file
from tests.support.prometheus import Samples, parse

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


async def scrape(url: str) -> tuple[Samples, str]:
    async with httpx.AsyncClient(base_url=url) as client:  # no token: /metrics needs none
        r = await client.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return parse(r.text), r.text


def histogram(samples: dict[str, float], name: str) -> tuple[list[float], float]:
    buckets = [v for k, v in samples.items() if k.startswith(f"{name}_bucket{{")]
    assert buckets == sorted(buckets), "buckets are cumulative"
    assert buckets[-1] == samples[f"{name}_count"]
    return buckets, samples[f"{name}_count"]


async def test_metrics_count_requests_refusals_latency_and_unpriced_models(
    make_env: MakeEnv, tmp_path: Path
) -> None:
    env = await make_env(
        **policy_file(
            tmp_path,
            '[[policy]]\nname = "trial"\nrequests = ["3/minute"]\ntokens = ["100000/hour"]\n',
        )
    )
    async with httpx.AsyncClient(base_url=env.url) as client:
        statuses = []
        for _ in range(5):
            r = await client.post(
                "/v1/chat/completions", json=CHAT, headers={"X-ORQ-IDENTITY-ID": "ident-alpha-7"}
            )
            statuses.append(r.status_code)
        assert statuses == [200, 200, 200, 429, 429]
        unpriced = {**CHAT, "model": 'acme-"private"-model'}
        r = await client.post(
            "/v1/chat/completions", json=unpriced, headers={"X-ORQ-IDENTITY-ID": "ident-beta-9"}
        )
        assert r.status_code == 200
        r = await client.get("/v1/models")
        assert r.status_code == 200  # not metered: forwarded, never limited
    await env.settle()
    assert (await env.api.get("/v2/identities")).status_code == 200
    assert (await env.api.get("/v2/identities/nobody")).status_code == 404

    samples, text = await scrape(env.url)
    assert samples['sidecar_requests_total{route="proxy",outcome="2xx"}'] == 5
    assert samples['sidecar_requests_total{route="proxy",outcome="4xx"}'] == 2
    assert samples['sidecar_requests_total{route="proxy",outcome="upstream_error"}'] == 0
    assert samples['sidecar_requests_total{route="api",outcome="2xx"}'] == 1
    assert samples['sidecar_requests_total{route="api",outcome="4xx"}'] == 1
    admitted = 'sidecar_limit_decisions_total{policy="trial",dimension="%s",decision="admitted"}'
    assert samples[admitted % "requests"] == 4  # three, and ident-beta-9's
    assert samples[admitted % "tokens"] == 4
    refused = (
        'sidecar_limit_decisions_total{policy="trial",dimension="requests",decision="refused"}'
    )
    assert samples[refused] == 2
    assert 'dimension="tokens",decision="refused"' not in text
    assert samples['sidecar_unpriced_requests_total{model="acme-\\"private\\"-model"}'] == 1
    assert len([k for k in samples if k.startswith("sidecar_unpriced_requests_total")]) == 1
    _, forwarded = histogram(samples, "sidecar_upstream_latency_seconds")
    assert forwarded == 5
    _, checks = histogram(samples, "sidecar_redis_limit_check_seconds")
    assert checks == 6
    _, writes = histogram(samples, "sidecar_redis_usage_write_seconds")
    assert writes >= 1
    assert samples["sidecar_policies"] == 1
    assert samples['sidecar_policy_reloads_total{result="ok"}'] == 0
    assert samples["sidecar_redis_limit_check_errors_total"] == 0
    assert samples["sidecar_usage_dropped_total"] == 0
    # No identity appears in any label.
    assert "ident-alpha-7" not in text and "ident-beta-9" not in text

    again, _ = await scrape(env.url)
    assert again['sidecar_requests_total{route="ops",outcome="2xx"}'] == 1  # the first scrape


async def test_metered_requests_by_identity_source_and_identities_created(
    make_env: MakeEnv, tmp_path: Path
) -> None:
    env = await make_env(
        **policy_file(tmp_path, '[[policy]]\nname = "one"\nrequests = ["1/minute"]\n')
    )
    hook = {"x-sidecar-token": ADMIN_TOKEN}
    async with httpx.AsyncClient(base_url=env.url) as client:
        statuses = [
            (await client.post("/v1/chat/completions", json=body, headers=headers)).status_code
            for body, headers in [
                ({**CHAT, "identity": {"id": "src-body"}}, {}),
                (CHAT, {"X-ORQ-IDENTITY-ID": "src-header"}),
                (CHAT, {"X-ORQ-IDENTITY-ID": "src-header"}),  # refused: counted all the same
                (CHAT, {}),
            ]
        ]
        assert statuses == [200, 200, 429, 200]
        report = {"request_id": "r-9", "identity": "src-hook", "source": "api_key"}
        for _ in range(2):  # a retried report counts once
            r = await client.post("/hooks/usage", json=report, headers=hook)
            assert r.status_code == 202, r.text
    await env.settle()
    samples, _ = await scrape(env.url)
    metered = 'sidecar_metered_requests_total{source="%s"}'
    assert samples[metered % "body"] == 1
    assert samples[metered % "header"] == 2
    assert samples[metered % "anonymous"] == 1
    assert samples[metered % "api_key"] == 1
    assert samples[metered % "user_field"] == 0
    # src-body, src-header, anonymous and src-hook were new; src-header's second request was not.
    assert samples["sidecar_identities_created_total"] == 4


async def test_hooks_are_counted_apart(make_env: MakeEnv) -> None:
    env = await make_env()
    hook = {"x-sidecar-token": ADMIN_TOKEN}
    async with httpx.AsyncClient(base_url=env.url) as client:
        r = await client.post("/hooks/authorize", json={"identity": {"id": "h1"}}, headers=hook)
        assert r.status_code == 200
        r = await client.post("/hooks/authorize", json={"identity": {"id": "h1"}})
        assert r.status_code == 401
        report = {
            "request_id": "r-1",
            "identity": "h1",
            "model": "in-house-llm",
            "usage": {"prompt_tokens": 10, "completion_tokens": 5},
        }
        r = await client.post("/hooks/usage", json=report, headers=hook)
        assert r.status_code == 202, r.text
    samples, _ = await scrape(env.url)
    assert samples['sidecar_requests_total{route="hooks_authorize",outcome="2xx"}'] == 1
    assert samples['sidecar_requests_total{route="hooks_authorize",outcome="4xx"}'] == 1
    assert samples['sidecar_requests_total{route="hooks_usage",outcome="2xx"}'] == 1
    assert samples['sidecar_requests_total{route="proxy",outcome="2xx"}'] == 0
    assert samples['sidecar_unpriced_requests_total{model="in-house-llm"}'] == 1


async def test_an_unreachable_upstream_is_an_upstream_error(make_env: MakeEnv) -> None:
    env = await make_env(upstream_url=f"http://127.0.0.1:{free_port()}")
    async with httpx.AsyncClient(base_url=env.url) as client:
        r = await client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 502
    samples, _ = await scrape(env.url)
    assert samples['sidecar_requests_total{route="proxy",outcome="upstream_error"}'] == 1
    assert samples['sidecar_requests_total{route="proxy",outcome="5xx"}'] == 0
    assert samples["sidecar_upstream_latency_seconds_count"] == 0  # no headers came back


async def test_redis_failures_show_as_errors_and_spooled_usage(
    make_env: MakeEnv, tmp_path: Path
) -> None:
    dead = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")
    env = await make_env(
        redis_client=dead,
        redis={"timeout_ms": 200},
        **policy_file(tmp_path, '[[policy]]\nname = "p"\nrequests = ["100/minute"]\n'),
    )
    try:
        async with httpx.AsyncClient(base_url=env.url) as client:
            r = await client.post(
                "/v1/chat/completions", json=CHAT, headers={"X-ORQ-IDENTITY-ID": "who"}
            )
        assert r.status_code == 200  # on_error = "allow"
        recorder = env.app.services.recorder
        for _ in range(200):
            if recorder.write_errors and recorder.spool.bytes:
                break
            await asyncio.sleep(0.01)
        samples, _ = await scrape(env.url)
        assert samples["sidecar_redis_limit_check_errors_total"] == 1
        assert samples["sidecar_redis_usage_write_errors_total"] >= 1
        assert samples["sidecar_usage_spool_bytes"] > 0
        assert samples["sidecar_usage_spooled_entries_total"] == 1
        assert samples["sidecar_redis_limit_check_seconds_count"] == 0
    finally:
        await dead.aclose()


async def test_metrics_off_is_a_404_and_the_proxy_still_works(make_env: MakeEnv) -> None:
    env = await make_env(server={"metrics": False})
    assert env.app.services.counters is None
    async with httpx.AsyncClient(base_url=env.url) as client:
        r = await client.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200
        r = await client.get("/metrics")
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "not_found_error"
