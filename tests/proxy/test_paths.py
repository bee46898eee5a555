"""Which paths cost money: `[metering] extra_paths` (globs) are metered, and with
`other_paths = "deny"` nothing unmetered can be spent through the sidecar."""

from __future__ import annotations

import httpx

from tests.support.env import Env, MakeEnv

BODY = {"model": "rerank-1", "query": "q", "documents": ["a", "b"]}


async def test_extra_path_globs_are_metered_and_the_rest_forwarded(make_env: MakeEnv) -> None:
    env: Env = await make_env(metering={"extra_paths": ["/v1/rerank*", "/custom/*/score"]})
    async with httpx.AsyncClient(base_url=env.url) as client:
        for path in ("/v1/rerank", "/v1/reranking", "/custom/x/score"):
            r = await client.post(path, json=BODY, headers={"X-ORQ-IDENTITY-ID": "ranker"})
            assert r.status_code in (200, 404), r.text  # the mock may not know the path
        unmetered = await client.post(
            "/v1/images/generations", json={"prompt": "p"}, headers={"X-ORQ-IDENTITY-ID": "ranker"}
        )
    assert unmetered.status_code != 403
    metrics = await env.metrics("ranker")
    assert metrics["total_requests"] == 3  # the image request passed through uncounted


async def test_other_paths_deny_refuses_unmetered_posts_and_lets_reads_through(
    make_env: MakeEnv,
) -> None:
    env: Env = await make_env(metering={"other_paths": "deny"})
    async with httpx.AsyncClient(base_url=env.url) as client:
        for path in ("/v1/batches", "/v1/images/generations", "/v1/audio/speech", "/v1/files"):
            r = await client.post(path, json={"x": 1})
            assert r.status_code == 403, (path, r.text)
            error = r.json()["error"]
            assert (error["type"], error["code"]) == ("permission_error", "path_not_metered")
        assert list(env.mock.requests) == []
        listed = await client.get("/v1/models")
        assert listed.status_code != 403
        chat = await client.post(
            "/v1/chat/completions",
            json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert chat.status_code == 200
