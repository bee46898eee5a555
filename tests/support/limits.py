"""Policies in a file, and bursts of chat completions against them."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from sidecar.identity.resolve import Resolved, Source
from sidecar.quota.decision import PolicyUsage
from tests.support.env import Env
from tests.support.traffic import MESSAGES

BODY = {"model": "gpt-4o", "messages": MESSAGES}


def policy_file(tmp_path: Path, text: str) -> dict[str, Any]:
    path = tmp_path / "policies.toml"
    path.write_text(text)
    return {"policies": {"paths": [str(path)]}}


async def burst(url: str, n: int, who: str, **headers: str) -> Counter[int]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        replies = await asyncio.gather(
            *(
                client.post(
                    "/v1/chat/completions", json=BODY, headers={"X-ORQ-IDENTITY-ID": who, **headers}
                )
                for _ in range(n)
            )
        )
    return Counter(r.status_code for r in replies)


async def limit_usage(env: Env, who: str) -> PolicyUsage:
    """What the limits of `who`'s policy (a header identity) hold now, as admission and the
    dashboard read them (Limiter.usage)."""
    services = env.app.services
    resolved = Resolved(who, Source.HEADER)
    identity_id = await services.identifier.identify(resolved)
    policy = await services.quota.policy_for(identity_id, resolved)
    assert policy is not None
    return await services.limiter.usage(identity_id, policy)
