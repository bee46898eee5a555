"""SIGTERM: in-flight streams finish, usage is written or spooled, and a restart replays it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from sidecar.catalog import open_catalog
from sidecar.identity.model import Metrics
from sidecar.mock import MockServer, start_mock
from sidecar.store.keys import Keys
from sidecar.testing.redis_server import RedisServer, free_port
from tests.support.auth import ADMIN_TOKEN
from tests.support.processes import exited

STREAM = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "a slow answer"}],
    "stream": True,
}
# uvicorn re-raises the SIGTERM it handled once it has shut down, so that a supervisor sees
# the process end by the signal it sent.
STOPPED = {0, -signal.SIGTERM}
SLOW = {"x-mock-chunks": "20", "x-mock-chunk-delay-ms": "100", "X-ORQ-IDENTITY-ID": "streamer"}


class Sidecar:
    def __init__(self, tmp_path: Path, upstream: str, redis_url: str, data_dir: Path) -> None:
        self.port = free_port()
        config = tmp_path / f"config-{self.port}.toml"
        config.write_text(
            f'[upstream]\nurl = "{upstream}"\n[redis]\nurl = "{redis_url}"\n'
            "[server]\ndrain_s = 10\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
        self.log = tmp_path / f"sidecar-{self.port}.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sidecar", "serve", "--config", str(config)],
                env={
                    **env,
                    "SIDECAR_PORT": str(self.port),
                    "SIDECAR_ADMIN_TOKEN": ADMIN_TOKEN,
                    "SIDECAR_DATA_DIR": str(data_dir),
                },
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.url = f"http://127.0.0.1:{self.port}"

    async def ready(self) -> None:
        async with httpx.AsyncClient() as client:
            for _ in range(300):
                try:
                    if (await client.get(self.url + "/healthz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                assert self.proc.poll() is None, self.log.read_text()
                await asyncio.sleep(0.05)
        raise AssertionError("sidecar did not start")

    async def exited(self, within_s: float) -> int:
        return await exited(self.proc, within_s)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
async def mock() -> AsyncIterator[MockServer]:
    server = await start_mock()
    yield server
    await server.close()


async def stream_then_sigterm(sidecar: Sidecar) -> bytes:
    """A slow stream; SIGTERM once its first event arrived; the whole stream it got."""
    received = b""
    async with (
        httpx.AsyncClient(base_url=sidecar.url, timeout=30) as client,
        client.stream("POST", "/v1/chat/completions", json=STREAM, headers=SLOW) as reply,
    ):
        assert reply.status_code == 200
        async for chunk in reply.aiter_raw():
            if not received:
                sidecar.proc.send_signal(signal.SIGTERM)
            received += chunk
    return received


async def metrics_of(client: Redis, external_id: str) -> Metrics:
    found = await open_catalog(client, Keys("sidecar")).get(external_id, include_metrics=True)
    assert found is not None and isinstance(found.metrics, Metrics)
    return found.metrics


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_sigterm_lets_a_stream_finish_and_writes_its_usage(
    tmp_path: Path, mock: MockServer, redis_server: RedisServer, redis: Redis
) -> None:
    sidecar = Sidecar(tmp_path, mock.url, redis_server.url, tmp_path / "data")
    try:
        await sidecar.ready()
        received = await stream_then_sigterm(sidecar)
        assert received.count(b"data: ") >= 20 and b"data: [DONE]" in received
        assert await sidecar.exited(within_s=20) in STOPPED
    finally:
        sidecar.stop()
    metrics = await metrics_of(redis, "streamer")
    assert metrics.total_requests == 1 and metrics.output_tokens > 0
    assert not any(p.stat().st_size for p in (tmp_path / "data" / "spool").glob("*"))


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_usage_spooled_at_shutdown_is_replayed_by_the_next_process(
    tmp_path: Path, mock: MockServer
) -> None:
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis", "--appendonly", "yes")
    server.start()
    data = tmp_path / "data"
    first = Sidecar(tmp_path, mock.url, server.url, data)
    second: Sidecar | None = None
    try:
        await first.ready()
        async with httpx.AsyncClient(base_url=first.url) as client:  # known before the crash
            reply = await client.post(
                "/v1/chat/completions", json={**STREAM, "stream": False}, headers=SLOW
            )
            assert reply.status_code == 200
        await asyncio.sleep(0.2)  # written
        server.crash()
        received = await stream_then_sigterm(first)
        assert b"data: [DONE]" in received
        assert await first.exited(within_s=30) in STOPPED
        spooled = [p for p in (data / "spool").glob("*.jsonl") if p.stat().st_size]
        assert spooled, first.log.read_text()
        server.start()
        second = Sidecar(tmp_path, mock.url, server.url, data)
        await second.ready()
        async with Redis.from_url(server.url) as client:
            deadline = time.monotonic() + 20
            while (await metrics_of(client, "streamer")).total_requests < 2:
                assert time.monotonic() < deadline, second.log.read_text()
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)  # nothing more arrives: counted once
            assert (await metrics_of(client, "streamer")).total_requests == 2
        assert not any(p.exists() for p in spooled)
    finally:
        first.stop()
        if second is not None:
            second.stop()
        server.kill()
