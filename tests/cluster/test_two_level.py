"""Two levels on a real cluster: a request's identity and its key's owner live in different
slots, so each is admitted in turn and given back on refusal; never over-admitted."""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from sidecar.identity.resolve import Resolved, Source
from sidecar.testing.redis_cluster import LocalCluster
from tests.support.cluster import MakeSide
from tests.support.traffic import MESSAGES

KEY = "sk-cluster-tenant-key"
OWNER = "tenant-acme"


def config(tmp_path: Path, owner_limit: str, user_limit: str) -> dict[str, Any]:
    path = tmp_path / "policies.toml"
    path.write_text(
        f'[[policy]]\nname = "tenant"\nmatch = {{ ids = ["{OWNER}"] }}\n'
        f'requests = ["{owner_limit}"]\n\n'
        f'[[policy]]\nname = "user"\nrequests = ["{user_limit}"]\n'
    )
    return {
        "policies": {"paths": [str(path)]},
        "identity": {"trust": "keys"},
        "api_keys": [
            {
                "sha256": hashlib.sha256(KEY.encode()).hexdigest(),
                "owner": OWNER,
                "may_assert": ["acme-*"],
            }
        ],
    }


async def burst(url: str, users: list[str]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        return await asyncio.gather(
            *(
                client.post(
                    "/v1/chat/completions",
                    json={"model": "gpt-4o", "messages": MESSAGES},
                    headers={"X-ORQ-IDENTITY-ID": who, "Authorization": f"Bearer {KEY}"},
                )
                for who in users
            )
        )


async def test_fresh_end_users_are_admitted_exactly_to_the_owners_limit(
    fresh_cluster: LocalCluster, make_side: MakeSide, tmp_path: Path
) -> None:
    side = await make_side(fresh_cluster.url, **config(tmp_path, "10/minute", "5/minute"))
    replies = await burst(side.url, [f"acme-{i}" for i in range(40)])
    assert Counter(r.status_code for r in replies) == {200: 10, 429: 30}
    assert {r.json()["error"]["identity"] for r in replies if r.status_code == 429} == {OWNER}
    assert len(side.mock.requests) == 10


async def test_mixed_refusals_never_over_admit_and_give_back_what_they_took(
    fresh_cluster: LocalCluster, make_side: MakeSide, tmp_path: Path
) -> None:
    side = await make_side(fresh_cluster.url, **config(tmp_path, "12/minute", "3/minute"))
    users = [f"acme-{i % 8}" for i in range(80)]  # 8 users, 10 requests each
    replies = await burst(side.url, users)
    admitted = Counter(who for who, r in zip(users, replies, strict=True) if r.status_code == 200)
    assert sum(admitted.values()) <= 12
    assert all(n <= 3 for n in admitted.values())
    assert len(side.mock.requests) == sum(admitted.values())
    # Every refused request gave back what it took: the windows hold the admitted requests only.
    services = side.app.services
    limiter = services.limiter
    owner = Resolved(OWNER, Source.API_KEY)
    owner_id = await services.identifier.identify(owner)
    policy = await services.quota.policy_for(owner_id, owner)
    assert policy is not None
    (used,) = (await limiter.usage(owner_id, policy)).limits
    assert used.used == sum(admitted.values())
    for who in set(users):
        resolved = Resolved(who, Source.HEADER)
        identity_id = await services.identifier.identify(resolved)
        user_policy = await services.quota.policy_for(identity_id, resolved)
        assert user_policy is not None
        (mine,) = (await limiter.usage(identity_id, user_policy)).limits
        assert mine.used == admitted[who], who
    # The subjects live on different nodes.
    where = fresh_cluster.keys("sidecar:rl:*")
    assert len(set(where.values())) >= 2


async def test_refused_claims_and_the_creation_cap_hold_on_the_cluster(
    fresh_cluster: LocalCluster, make_side: MakeSide, tmp_path: Path
) -> None:
    raw = config(tmp_path, "1000/minute", "1000/minute")
    raw["identity"]["max_new_per_minute"] = 6
    side = await make_side(fresh_cluster.url, **raw)
    limits = httpx.Limits(max_connections=None)
    async with httpx.AsyncClient(base_url=side.url, timeout=30, limits=limits) as client:
        stranger = await client.post(
            "/v1/chat/completions",
            json={"model": "gpt-4o", "messages": MESSAGES},
            headers={"X-ORQ-IDENTITY-ID": "acme-victim", "Authorization": "Bearer sk-bogus"},
        )
        assert stranger.status_code == 403
        assert stranger.json()["error"]["code"] == "identity_not_allowed"
    replies = await burst(side.url, [f"acme-new-{i}" for i in range(20)])
    assert Counter(r.status_code for r in replies) == {200: 6, 429: 14}, replies[0].text
    codes = {r.json()["error"]["code"] for r in replies if r.status_code == 429}
    assert codes == {"identity_creation_limited"}
    assert len(side.mock.requests) == 6
    assert not any("acme-victim" in key for key in fresh_cluster.keys("sidecar:*"))
