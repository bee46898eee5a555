"""Policies in a file, and bursts of chat completions against them."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

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
