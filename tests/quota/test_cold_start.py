"""Limits that load cannot switch off: a sidecar just started, hit at once by 80 concurrent
requests of one identity against 20 a minute, admits exactly 20, every time, with the default
`timeout_ms` and `on_error = "allow"`."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from sidecar.mock import start_mock
from sidecar.testing.redis_server import RedisServer, free_port

STARTS = 5
BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


def start(tmp: Path, redis_url: str, upstream: str, port: int) -> subprocess.Popen[bytes]:
    policy = tmp / "limits.toml"
    policy.write_text('[[policy]]\nname = "p"\nrequests = ["20/minute"]\n')
    config = tmp / "config.toml"
    config.write_text(f'[policies]\npaths = ["{policy}"]\n')  # timeout_ms, on_error: defaults
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env.update(
        SIDECAR_REDIS_URL=redis_url,
        SIDECAR_UPSTREAM_URL=upstream,
        SIDECAR_PORT=str(port),
        SIDECAR_DATA_DIR=str(tmp / "data"),
        SIDECAR_ADMIN_TOKEN="cold-start-admin-token-0123456789",
    )
    return subprocess.Popen(
        [sys.executable, "-m", "sidecar", "serve", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


async def first_burst(url: str, who: str) -> Counter[int]:
    """80 requests the moment the port accepts connections."""
    limits = httpx.Limits(max_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        deadline = time.monotonic() + 30
        while True:
            try:
                await client.get("/healthz")
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.01)
        replies = await asyncio.gather(
            *(
                client.post("/v1/chat/completions", json=BODY, headers={"x-orq-identity-id": who})
                for _ in range(80)
            )
        )
    return Counter(r.status_code for r in replies)


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_a_cold_start_hit_by_80_admits_exactly_20_every_time(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    mock = await start_mock()
    try:
        for n in range(STARTS):
            folder = tmp_path / f"start-{n}"
            folder.mkdir()
            port = free_port()
            proc = start(folder, redis_server.url, mock.url, port)
            try:
                counts = await first_burst(f"http://127.0.0.1:{port}", f"cold-{n}")
            finally:
                proc.terminate()
                _, err = proc.communicate(timeout=30)
            assert counts == {200: 20, 429: 60}, (n, counts, err.decode()[-2000:])
            assert b"limit check failed" not in err, err.decode()[-2000:]
    finally:
        await mock.close()
