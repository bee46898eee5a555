"""The external id a request counts under: `[identity] normalize` applied to every source (body,
header, key owner, hook report, the API's paths and bodies), then a merged id's survivor."""

from __future__ import annotations

import hashlib
from typing import Any

import httpx
import pytest

from sidecar.identity.model import normalizer
from tests.support.auth import ADMIN_TOKEN
from tests.support.env import Env, MakeEnv
from tests.support.identities import create
from tests.support.traffic import MESSAGES, tokens

KEY = "sk-normalize-owner-key"
BODY = {"model": "gpt-4o", "messages": MESSAGES}


async def send(
    env: Env, body: dict[str, Any] | None = None, *, who: str = "", key: str = ""
) -> None:
    headers = tokens(1, 1)
    if who:
        headers["X-ORQ-IDENTITY-ID"] = who
    if key:
        headers["Authorization"] = f"Bearer {key}"
    async with httpx.AsyncClient(base_url=env.url, timeout=30) as client:
        r = await client.post(
            "/v1/chat/completions", json={**BODY, **(body or {})}, headers=headers
        )
    assert r.status_code == 200, r.text


async def listed(env: Env) -> dict[str, int]:
    await env.settle()
    page = await env.api.get("/v2/identities", params={"include_metrics": "true"})
    return {i["external_id"]: i["metrics"]["total_requests"] for i in page.json()["data"]}


def test_the_normalizers() -> None:
    assert normalizer("none")(" Alice  X ") == " Alice  X "
    assert normalizer("trim")(" Alice \t X ") == "Alice X"
    assert normalizer("lower")(" Alice@X.COM ") == "alice@x.com"


async def test_lower_makes_every_source_name_one_identity(make_env: MakeEnv) -> None:
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    env = await make_env(
        identity={"normalize": "lower"}, api_keys=[{"sha256": digest, "owner": "Key-Owner"}]
    )
    await send(env, who="Alice@X.com")
    await send(env, {"identity": {"id": "ALICE@x.com", "display_name": "Alice"}})
    assert env.mock.requests[-1].header("x-orq-identity-id") == "alice@x.com"
    await send(env, key=KEY)
    report = {"request_id": "r-1", "identity": "alice@X.COM", "model": "gpt-4o", "status": 200}
    r = await env.api.post("/hooks/usage", json=report, headers={"x-sidecar-token": ADMIN_TOKEN})
    assert r.status_code == 202, r.text
    assert await listed(env) == {"alice@x.com": 3, "key-owner": 1}
    found = (await env.api.get("/v2/identities/ALICE@X.COM")).json()
    assert (found["external_id"], found["display_name"]) == ("alice@x.com", "Alice")
    assert (await create(env.api, external_id="BOB"))["external_id"] == "bob"
    r = await env.api.post("/v2/identities", json={"external_id": "Bob"})
    assert r.status_code == 409


async def test_trim_collapses_blanks_and_none_keeps_case(make_env: MakeEnv) -> None:
    env = await make_env(identity={"normalize": "trim"})
    await send(env, {"identity": {"id": " Bob   Smith "}})
    await send(env, who="Bob Smith")
    assert (await env.api.get("/v2/identities/%20Bob%20%20Smith")).status_code == 200
    assert await listed(env) == {"Bob Smith": 2}
    plain = await make_env()
    await send(plain, who="carol")
    await send(plain, who="Carol")
    assert await listed(plain) == {"Bob Smith": 2, "carol": 1, "Carol": 1}


async def test_ids_stored_before_lower_are_folded_by_a_merge(make_env: MakeEnv) -> None:
    before = await make_env()
    await send(before, who="Dave@X.com")
    await before.settle()
    after = await make_env(identity={"normalize": "lower"})
    await send(after, who="Dave@X.com")
    assert await listed(after) == {"dave@x.com": 1, "Dave@X.com": 1}
    r = await after.api.post("/v2/identities/DAVE@x.com/merge", json={"from": "Dave@X.com"})
    assert r.status_code == 200, r.text
    assert (r.json()["external_id"], r.json()["merged_from"]) == ("dave@x.com", ["Dave@X.com"])
    assert await listed(after) == {"dave@x.com": 2}
    # The process that still runs without normalizing sends the old form to the survivor too.
    await before.app.services.aliases.refresh()
    await send(before, who="Dave@X.com")
    assert before.mock.requests[-1].header("x-orq-identity-id") == "dave@x.com"
    await before.settle()
    assert await listed(after) == {"dave@x.com": 3}


async def test_a_process_that_has_not_reloaded_the_aliases_still_counts_for_the_survivor(
    make_env: MakeEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = await make_env(), await make_env()
    await send(first, who="stale")
    await send(second, who="stale")  # `second` remembers its _id now
    await create(first.api, external_id="fresh")
    await first.settle()
    await second.settle()

    async def not_yet() -> bool:
        return False

    monkeypatch.setattr(second.app.services.aliases, "refresh", not_yet)
    r = await first.api.post("/v2/identities/fresh/merge", json={"from": "stale"})
    assert r.status_code == 200, r.text
    # `second` has not reloaded its aliases: it names the merged _id, whose record is gone;
    # the usage writer counts the request again under the external id's identity.
    assert second.app.services.aliases.canonical("stale") == "stale"
    await send(second, who="stale")
    await second.settle()
    assert await listed(first) == {"fresh": 3}


@pytest.mark.parametrize("value", ["upper", "", "LOWER"])
def test_other_normalize_values_are_refused(value: str) -> None:
    from sidecar.settings import ConfigError, parse

    with pytest.raises(ConfigError) as info:
        parse({"identity": {"normalize": value}})
    assert info.value.problems == [
        'identity.normalize: must be "none", "trim" or "lower" (see docs/configuration.md'
        f"#normalizing-external-ids), not {value!r}"
    ]
