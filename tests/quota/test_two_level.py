"""Two levels: a request carrying a listed key for someone else counts against the key's
owner too, atomically with its identity, on one server (the cluster: tests/cluster)."""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.support.env import Env, MakeEnv

KEY = "sk-acme-0123456789"
OWNER = "tenant-acme"
BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


def config(tmp_path: Path, policies: str, **identity: Any) -> dict[str, Any]:
    path = tmp_path / "policies.toml"
    path.write_text(policies)
    return {
        "policies": {"paths": [str(path)]},
        "identity": {"trust": "keys", **identity},
        "api_keys": [
            {
                "sha256": hashlib.sha256(KEY.encode()).hexdigest(),
                "owner": OWNER,
                "may_assert": ["acme-*"],
            }
        ],
    }


OWNER_5 = f"""
[[policy]]
name = "tenant"
match = {{ ids = ["{OWNER}"] }}
requests = ["5/minute"]

[[policy]]
name = "user"
requests = ["100/minute"]
"""


async def post(client: httpx.AsyncClient, who: str | None, key: str | None = KEY) -> httpx.Response:
    headers = {"X-ORQ-IDENTITY-ID": who} if who else {}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return await client.post("/v1/chat/completions", json=BODY, headers=headers)


async def test_fresh_end_user_ids_do_not_escape_the_key_owners_limit(
    make_env: MakeEnv, tmp_path: Path
) -> None:
    env: Env = await make_env(**config(tmp_path, OWNER_5))
    async with httpx.AsyncClient(base_url=env.url) as client:
        replies = [await post(client, f"acme-user-{i}") for i in range(8)]
    assert [r.status_code for r in replies] == [200] * 5 + [429] * 3
    refused = replies[-1].json()["error"]
    assert (refused["identity"], refused["policy"], refused["dimension"]) == (
        OWNER,
        "tenant",
        "requests",
    )
    assert OWNER in refused["message"]
    assert replies[-1].headers["x-ratelimit-remaining-requests"] == "0"
    assert len(env.mock.requests) == 5


@pytest.mark.parametrize("prefetch", [0, 32])
async def test_concurrent_end_users_are_admitted_exactly_to_the_owners_limit(
    make_env: MakeEnv, tmp_path: Path, prefetch: int
) -> None:
    # With prefetch, the owner's allowances come while most of these are at Redis: a request
    # refused counting them is checked once more, with the owner's limit paid from them.
    limits = {"limits": {"prefetch": prefetch}}
    env: Env = await make_env(
        **config(tmp_path, OWNER_5.replace("5/minute", "12/minute")), **limits
    )
    async with httpx.AsyncClient(base_url=env.url, timeout=30) as client:
        replies = await asyncio.gather(*(post(client, f"acme-{i}") for i in range(60)))
    assert Counter(r.status_code for r in replies) == {200: 12, 429: 48}
    assert len(env.mock.requests) == 12


async def test_the_identitys_refusal_names_it_and_takes_nothing_from_the_owner(
    make_env: MakeEnv, tmp_path: Path
) -> None:
    policies = f"""
[[policy]]
name = "tenant"
match = {{ ids = ["{OWNER}"] }}
requests = ["10/minute"]

[[policy]]
name = "user"
requests = ["2/minute"]
"""
    env: Env = await make_env(**config(tmp_path, policies))
    async with httpx.AsyncClient(base_url=env.url) as client:
        replies = [await post(client, "acme-heavy") for _ in range(6)]
        assert [r.status_code for r in replies] == [200, 200, 429, 429, 429, 429]
        assert replies[2].json()["error"]["identity"] == "acme-heavy"
        assert replies[2].json()["error"]["policy"] == "user"
        # The four refusals took nothing from the owner: 8 of its 10 are left.
        others = [await post(client, f"acme-other-{i}") for i in range(9)]
    assert [r.status_code for r in others] == [200] * 8 + [429]
    assert others[-1].json()["error"]["identity"] == OWNER


async def test_the_owners_own_requests_and_its_end_users_share_its_window(
    make_env: MakeEnv, tmp_path: Path
) -> None:
    env: Env = await make_env(**config(tmp_path, OWNER_5))
    async with httpx.AsyncClient(base_url=env.url) as client:
        own = [await post(client, None) for _ in range(3)]  # the key alone: the owner
        users = [await post(client, f"acme-{i}") for i in range(3)]
    assert [r.status_code for r in own + users] == [200] * 5 + [429]


async def test_token_limits_of_the_owner_are_charged_by_end_users_requests(
    make_env: MakeEnv, tmp_path: Path
) -> None:
    policies = f"""
[[policy]]
name = "tenant"
match = {{ ids = ["{OWNER}"] }}
tokens = ["10/hour"]
"""
    env: Env = await make_env(**config(tmp_path, policies))
    client = openai.AsyncOpenAI(base_url=env.url + "/v1", api_key=KEY, max_retries=0)
    first = await client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], user="acme-a"
    )
    assert first.usage is not None and first.usage.total_tokens > 10
    await env.settle()
    with pytest.raises(openai.RateLimitError) as refused:
        await client.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"X-ORQ-IDENTITY-ID": "acme-b"},
        )
    body: Any = refused.value.body
    assert (body["identity"], body["dimension"]) == (OWNER, "tokens")
    await client.close()


async def test_usage_groups_by_api_key_owner(make_env: MakeEnv, tmp_path: Path) -> None:
    env: Env = await make_env(**config(tmp_path, OWNER_5.replace("5/minute", "50/minute")))
    async with httpx.AsyncClient(base_url=env.url) as client:
        for who in ("acme-1", "acme-2", "acme-2", None):
            assert (await post(client, who)).status_code == 200
        # Without a key: a claim "keys" trust refuses, so nothing is counted for anyone.
        assert (await post(client, "acme-3", key=None)).status_code == 403
    await env.settle()
    r = await env.api.get("/v2/usage", params={"group_by": "api_key_owner"})
    assert r.status_code == 200, r.text
    rows = r.json()["data"]
    assert [row["external_id"] for row in rows] == [OWNER]
    assert rows[0]["requests"] == 4
    assert int(rows[0]["input_tokens"]) > 0
    by_identity = await env.api.get("/v2/usage")
    requests = {row["external_id"]: row["requests"] for row in by_identity.json()["data"]}
    assert requests == {OWNER: 1, "acme-1": 1, "acme-2": 2}
    csv = await env.api.get("/v2/usage", params={"group_by": "api_key_owner", "format": "csv"})
    assert csv.text.splitlines()[0].startswith("_id,external_id,display_name,requests")
    assert OWNER in csv.text.splitlines()[1]


async def test_hook_mode_counts_and_charges_the_owner(make_env: MakeEnv, tmp_path: Path) -> None:
    policies = f"""
[[policy]]
name = "tenant"
match = {{ ids = ["{OWNER}"] }}
requests = ["3/minute"]
tokens = ["100/hour"]
"""
    env: Env = await make_env(**config(tmp_path, policies))
    hook = {"x-sidecar-token": env.api.headers["authorization"].split(" ", 1)[1]}
    async with httpx.AsyncClient(base_url=env.url, headers=hook) as client:

        async def authorize(who: str) -> httpx.Response:
            return await client.post(
                "/hooks/authorize",
                json={**BODY, "user": who},
                headers={"authorization": f"Bearer {KEY}", "X-ORQ-IDENTITY-ID": who},
            )

        first = await authorize("acme-h1")
        assert first.status_code == 200, first.text
        report = {
            "request_id": first.json()["request_id"],
            "identity": "acme-h1",
            "model": "gpt-4o",
            "usage": {"prompt_tokens": 60, "completion_tokens": 50, "total_tokens": 110},
        }
        assert (await client.post("/hooks/usage", json=report)).status_code == 202
        assert (await client.post("/hooks/usage", json=report)).json()["duplicate"] is True
        await env.settle()
        refused = await authorize("acme-h2")
    assert refused.status_code == 429
    assert (refused.json()["error"]["identity"], refused.json()["error"]["dimension"]) == (
        OWNER,
        "tokens",
    )
    r = await env.api.get("/v2/usage", params={"group_by": "api_key_owner"})
    (row,) = r.json()["data"]
    assert (row["external_id"], row["requests"], row["input_tokens"]) == (OWNER, 1, 60)
