"""Who may claim an identity, tried from outside: refused claims change nothing; profile
fields come only from accepted claims; the creation cap (docs/trust.md)."""

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

KEY = "sk-tenant-key-000001"
OTHER_KEY = "sk-unlisted-key"
HEADER = "X-ORQ-IDENTITY-ID"
BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


def listed(owner: str = "tenant", may_assert: list[str] | None = None) -> list[dict[str, Any]]:
    return [
        {
            "sha256": hashlib.sha256(KEY.encode()).hexdigest(),
            "owner": owner,
            "may_assert": may_assert or [],
        }
    ]


def policies(tmp_path: Path, text: str) -> dict[str, Any]:
    path = tmp_path / "policies.toml"
    path.write_text(text)
    return {"policies": {"paths": [str(path)]}}


async def chat(
    client: httpx.AsyncClient,
    *,
    who: str | None = None,
    key: str | None = None,
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    sent = dict(headers or {})
    if who is not None:
        sent[HEADER] = who
    if key is not None:
        sent["Authorization"] = f"Bearer {key}"
    return await client.post("/v1/chat/completions", json=body or BODY, headers=sent)


def refused(r: httpx.Response, param: str) -> None:
    assert r.status_code == 403, r.text
    error = r.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "permission_error",
        "identity_not_allowed",
        param,
    )


async def test_with_keys_trust_a_claim_without_a_key_is_refused_and_changes_nothing(
    make_env: MakeEnv, tmp_path: Path
) -> None:
    env: Env = await make_env(
        identity={"trust": "keys"},
        api_keys=listed(may_assert=["tenant-*"]),
        **policies(tmp_path, '[[policy]]\nname = "p"\nrequests = ["3/minute"]\n'),
    )
    async with httpx.AsyncClient(base_url=env.url) as client:
        # A stranger with a bogus key tries to use up the victim's window: 60 times.
        for _ in range(20):
            refused(await chat(client, who="tenant-victim", key=OTHER_KEY), HEADER)
        body = {**BODY, "identity": {"id": "tenant-victim", "metadata": {"plan": "pro"}}}
        refused(await chat(client, body=body), "identity.id")
        assert list(env.mock.requests) == []
        assert (await env.api.get("/v2/identities/tenant-victim")).status_code == 404
        # The victim, with the key, still has its whole window.
        replies = [await chat(client, who="tenant-victim", key=KEY) for _ in range(4)]
    assert [r.status_code for r in replies] == [200, 200, 200, 429]
    record = (await env.api.get("/v2/identities/tenant-victim")).json()
    assert record["metadata"] == {}


async def test_may_assert_globs_bound_what_a_key_may_claim(
    make_env: MakeEnv, tmp_path: Path
) -> None:
    env: Env = await make_env(
        identity={"trust": "keys"}, api_keys=listed("acme", may_assert=["acme-user-*"])
    )
    client = openai.AsyncOpenAI(base_url=env.url + "/v1", api_key=KEY, max_retries=0)
    answer = await client.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={HEADER: "acme-user-1"},
    )
    assert answer.choices
    with pytest.raises(openai.PermissionDeniedError) as denied:
        await client.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"identity": {"id": "globex-user-1"}},
        )
    error: Any = denied.value.body
    assert (error["code"], error["param"]) == ("identity_not_allowed", "identity.id")
    # The key alone is its owner; the owner may always claim itself.
    alone = await client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
    )
    assert alone.choices
    await client.close()
    await env.settle()
    listed_ids = sorted(
        i["external_id"] for i in (await env.api.get("/v2/identities")).json()["data"]
    )
    assert listed_ids == ["acme", "acme-user-1"]


async def test_trusted_networks_may_claim_anything_and_others_nothing(
    make_env: MakeEnv,
) -> None:
    trusted: Env = await make_env(identity={"trust": "keys", "trusted_networks": ["127.0.0.0/8"]})
    async with httpx.AsyncClient(base_url=trusted.url) as client:
        assert (await chat(client, who="anyone-at-all")).status_code == 200
    # `any` with networks set: only those networks' claims count.
    elsewhere: Env = await make_env(identity={"trust": "any", "trusted_networks": ["10.0.0.0/8"]})
    async with httpx.AsyncClient(base_url=elsewhere.url) as client:
        # A client's own X-Forwarded-For names a trusted address: it counts for nothing.
        forged = await chat(client, who="someone", headers={"X-Forwarded-For": "10.1.2.3"})
        refused(forged, HEADER)
        assert (await chat(client)).status_code == 200  # no claim: anonymous


async def test_by_default_any_caller_claims_any_identity(make_env: MakeEnv) -> None:
    env: Env = await make_env()
    async with httpx.AsyncClient(base_url=env.url) as client:
        assert (await chat(client, who="whoever")).status_code == 200


async def test_user_fields_are_a_claim_under_the_same_rules(make_env: MakeEnv) -> None:
    env: Env = await make_env(
        identity={"trust": "keys", "user_fields": True}, api_keys=listed(may_assert=["end-*"])
    )
    async with httpx.AsyncClient(base_url=env.url) as client:
        ok = await chat(client, key=KEY, body={**BODY, "user": "end-7"})
        assert ok.status_code == 200
        refused(await chat(client, key=KEY, body={**BODY, "user": "other-7"}), "user")
        anthropic_shaped = {**BODY, "metadata": {"user_id": "other-8"}}
        refused(await chat(client, key=KEY, body=anthropic_shaped), "metadata.user_id")
    await env.settle()
    record = (await env.api.get("/v2/identities/end-7")).json()
    assert record["external_id"] == "end-7"
    # The upstream still gets `user`: it is the client's own field.
    assert env.mock.requests[0].json()["user"] == "end-7"
    # So a claim named twice is refused: the sidecar would check the last, and an upstream that
    # keeps the first (or a gateway's per-user budgets) would read the other.
    async with httpx.AsyncClient(base_url=env.url) as client:
        for twice in (
            b'"user": "other-7", "user": "end-7"',
            b'"metadata": {"user_id": "other-7", "user_id": "end-7"}',
        ):
            body = b'{"model": "gpt-4o", "messages": [], "max_tokens": 5, ' + twice + b"}"
            r = await client.post(
                "/v1/chat/completions",
                content=body,
                headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
            )
            assert r.status_code == 400, r.text
            assert r.json()["error"]["code"] == "field_repeated"
    assert len(env.mock.requests) == 1


async def test_hooks_apply_the_same_rules(make_env: MakeEnv) -> None:
    env: Env = await make_env(identity={"trust": "keys"}, api_keys=listed(may_assert=["t-*"]))
    token = env.api.headers["authorization"].split(" ", 1)[1]
    async with httpx.AsyncClient(base_url=env.url, headers={"x-sidecar-token": token}) as hooks:
        no_key = await hooks.post("/hooks/authorize", json=BODY, headers={HEADER: "t-1"})
        refused(no_key, HEADER)
        with_key = await hooks.post(
            "/hooks/authorize", json=BODY, headers={HEADER: "t-1", "authorization": f"Bearer {KEY}"}
        )
        assert with_key.status_code == 200, with_key.text
        assert with_key.json()["identity"] == {"external_id": "t-1", "source": "header"}


async def test_creation_cap_per_key_owner_is_global_across_sidecars(make_env: MakeEnv) -> None:
    config: dict[str, Any] = {
        "identity": {"trust": "keys", "max_new_per_minute": 5},
        "api_keys": listed("acme", may_assert=["*"]),
    }
    first: Env = await make_env(**config)
    second: Env = await make_env(**config)
    async with (
        httpx.AsyncClient(base_url=first.url) as a,
        httpx.AsyncClient(base_url=second.url) as b,
    ):
        replies = [await chat(a if n % 2 else b, who=f"fresh-{n}", key=KEY) for n in range(8)]
        statuses = [r.status_code for r in replies]
        # Five new, then 429 (the owner "acme" is written by its usage, uncapped).
        assert statuses == [200] * 5 + [429] * 3
        limited = replies[-1]
        assert limited.json()["error"]["code"] == "identity_creation_limited"
        assert limited.json()["error"]["type"] == "rate_limit_error"
        assert 1 <= int(limited.headers["retry-after"]) <= 60
        # Known identities still pass.
        assert (await chat(b, who="fresh-0", key=KEY)).status_code == 200
    assert len(first.mock.requests) + len(second.mock.requests) == 6
    await first.settle()
    await second.settle()
    ids = [
        i["external_id"] for i in (await first.api.get("/v2/identities?limit=50")).json()["data"]
    ]
    assert sorted(ids) == ["acme"] + [f"fresh-{n}" for n in range(5)]


async def test_creation_cap_without_a_key_counts_per_client_address(
    make_env: MakeEnv, tmp_path: Path
) -> None:
    env: Env = await make_env(
        identity={"max_new_per_minute": 10},
        **policies(tmp_path, '[[policy]]\nname = "p"\nrequests = ["100/minute"]\n'),
    )
    async with httpx.AsyncClient(base_url=env.url, timeout=30) as client:
        replies = await asyncio.gather(*(chat(client, who=f"flood-{n}") for n in range(30)))
    assert Counter(r.status_code for r in replies) == {200: 10, 429: 20}
    assert {r.json()["error"]["code"] for r in replies if r.status_code == 429} == {
        "identity_creation_limited"
    }
    await env.settle()
    listed_ids = (await env.api.get("/v2/identities?limit=50")).json()["data"]
    assert len(listed_ids) == 10
    keys = await env.redis.keys("sidecar:id:*")
    assert len(keys) == 10  # refused candidates left no record behind


def ambiguous(r: httpx.Response, code: str, param: str) -> None:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", code, param)


@pytest.mark.parametrize("header", ["x-goog-api-key", "Ocp-Apim-Subscription-Key"])
async def test_a_key_in_any_header_litellm_authenticates_by_is_its_owners(
    make_env: MakeEnv, tmp_path: Path, header: str
) -> None:
    """LiteLLM's proxy reads a caller's key from these too: one the sidecar did not read there
    was billed to its owner and counted as no one's, past the owner's limits."""
    env: Env = await make_env(
        identity={"trust": "keys"},
        api_keys=listed(),
        **policies(tmp_path, '[[policy]]\nname = "p"\nrequests = ["1/minute"]\n'),
    )
    async with httpx.AsyncClient(base_url=env.url) as client:
        first = await client.post("/v1/chat/completions", json=BODY, headers={header: KEY})
        assert first.status_code == 200, first.text
        again = {"authorization": "Bearer junk", header: f"Bearer {KEY}"}
        r = await client.post("/v1/chat/completions", json=BODY, headers=again)
        ambiguous(r, "ambiguous_api_key", header.lower())
        for headers in ({header: KEY}, {header: f"Bearer {KEY}", "x-api-key": KEY}):
            r = await client.post("/v1/chat/completions", json=BODY, headers=headers)
            assert r.status_code == 429, r.text  # the owner's one request a minute, used
    assert len(env.mock.requests) == 1
    assert (await env.metrics("tenant"))["total_requests"] == 1


async def test_litellms_own_key_header_is_the_key_whatever_else_carries_one(
    make_env: MakeEnv, tmp_path: Path
) -> None:
    """LiteLLM reads `x-litellm-api-key` first, so that `Authorization` or `x-api-key` can
    carry the caller's own provider key past it (bring your own key): that pair is no
    ambiguity, and the LiteLLM key is whose the request is."""
    env: Env = await make_env(
        identity={"trust": "keys"},
        api_keys=listed(),
        **policies(tmp_path, '[[policy]]\nname = "p"\nrequests = ["1/minute"]\n'),
    )
    async with httpx.AsyncClient(base_url=env.url) as client:
        own = {"x-litellm-api-key": f"Bearer {KEY}", "x-api-key": "sk-ant-callers-own"}
        first = await client.post("/v1/chat/completions", json=BODY, headers=own)
        assert first.status_code == 200, first.text
        again = {"x-litellm-api-key": KEY, "authorization": f"Bearer {OTHER_KEY}"}
        r = await client.post("/v1/chat/completions", json=BODY, headers=again)
        assert r.status_code == 429, r.text  # the owner's one request a minute, used
    assert env.mock.requests[0].header("x-api-key") == "sk-ant-callers-own"  # passed on
    assert (await env.metrics("tenant"))["total_requests"] == 1


async def test_a_request_with_two_different_api_keys_is_refused_not_attributed_to_either(
    make_env: MakeEnv, tmp_path: Path
) -> None:
    """An Anthropic upstream bills `x-api-key`, an OpenAI one the bearer token, Azure
    `api-key`, and a server given a header twice reads the first or the last: a request whose
    key the sidecar read otherwise would be limited as an unlisted key's (anonymous) and billed
    to the listed one."""
    env: Env = await make_env(
        identity={"trust": "keys"},
        api_keys=listed(),
        **policies(tmp_path, '[[policy]]\nname = "p"\nrequests = ["1/minute"]\n'),
    )
    messages = {"model": "claude-3-5-haiku-latest", "max_tokens": 8, "messages": BODY["messages"]}
    async with httpx.AsyncClient(base_url=env.url) as client:
        first = await client.post("/v1/messages", json=messages, headers={"x-api-key": KEY})
        assert first.status_code == 200, first.text  # the owner's one request a minute
        walk = {"authorization": f"Bearer {OTHER_KEY}", "x-api-key": KEY}
        r = await client.post("/v1/messages", json=messages, headers=walk)
        ambiguous(r, "ambiguous_api_key", "x-api-key")
        r = await client.post(
            "/v1/messages", json=messages, headers={"api-key": OTHER_KEY, "x-api-key": KEY}
        )
        ambiguous(r, "ambiguous_api_key", "api-key")
        twice = [("x-api-key", KEY), ("x-api-key", OTHER_KEY)]
        ambiguous(
            await client.post("/v1/messages", json=messages, headers=twice),
            "ambiguous_header",
            "x-api-key",
        )
        claims = [(HEADER, "tenant"), (HEADER, "someone-else"), ("x-api-key", KEY)]
        r = await client.post("/v1/chat/completions", json=BODY, headers=claims)
        ambiguous(r, "ambiguous_header", HEADER.lower())
        # A key or a claim with underscores for dashes: a CGI or WSGI server reads it as the
        # header the sidecar did not read.
        for underscored in (
            {"x_api_key": OTHER_KEY, "x-api-key": KEY},
            {"X_ORQ_IDENTITY_ID": "someone-else", "x-api-key": KEY},
        ):
            r = await client.post("/v1/chat/completions", json=BODY, headers=underscored)
            ambiguous(r, "ambiguous_header", next(iter(underscored)).lower())
        # The same key twice, or in Azure's header alone, is the owner's: its minute is used.
        same = {"authorization": f"Bearer {KEY}", "x-api-key": KEY}
        for headers in (same, {"api-key": KEY}, [("x-api-key", KEY), ("x-api-key", KEY)]):
            r = await client.post("/v1/messages", json=messages, headers=headers)
            assert r.status_code == 429, r.text
        token = env.api.headers["authorization"].split(" ", 1)[1]
        hook = await client.post(
            "/hooks/authorize", json=BODY, headers={"x-sidecar-token": token, **walk}
        )
        ambiguous(hook, "ambiguous_api_key", "x-api-key")
    assert len(env.mock.requests) == 1
    assert (await env.metrics("tenant"))["total_requests"] == 1
