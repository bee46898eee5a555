"""The embedded store's process and files, and `sidecar serve` processes that share it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from sidecar.testing.redis_server import free_port
from tests.support.auth import ADMIN_TOKEN, AUTH
from tests.support.processes import exited

# uvicorn re-raises the SIGTERM it handled once it has shut down.
STOPPED = {0, -signal.SIGTERM}


def store_pid(data: Path) -> int:
    return int((data / "store.pid").read_text())


def alive(pid: int) -> bool:
    """Running (a zombie, or a pid that is gone, is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_until(condition: Callable[[], bool], within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def starts_in_log(data: Path) -> list[tuple[int, str]]:
    """(pid, event) from the stores' own log, in order: "start" and "exit"."""
    events = []
    for line in (data / "redis.log").read_text().splitlines():
        pid = line.partition(":")[0]
        if "Redis is starting" in line:
            events.append((int(pid), "start"))
        elif "Redis is now ready to exit" in line:
            events.append((int(pid), "exit"))
    return events


class Sidecar:
    """`sidecar serve` on the embedded store of `data`, in front of `upstream`."""

    def __init__(
        self, tmp_path: Path, data: Path, upstream: str, *, drain_s: float = 10, workers: int = 1
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = tmp_path / f"config-{self.port}.toml"
        config.write_text(
            f'[upstream]\nurl = "{upstream}"\n'
            f'[server]\ndata_dir = "{data}"\ndrain_s = {drain_s}\nworkers = {workers}\n'
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
        self.log = tmp_path / f"sidecar-{self.port}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sidecar", "serve", "--config", str(config)],
                env={**env, "SIDECAR_PORT": str(self.port), "SIDECAR_ADMIN_TOKEN": ADMIN_TOKEN},
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def lines(self, text: str) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if text in line]

    async def get(self, path: str) -> httpx.Response | None:
        async with httpx.AsyncClient(base_url=self.url, headers=AUTH, timeout=5) as client:
            try:
                return await client.get(path)
            except httpx.TransportError:
                return None

    async def answers(self, path: str = "/readyz", *, within_s: float = 30) -> float:
        """Seconds until `path` answers 200."""
        started = time.monotonic()
        while (reply := await self.get(path)) is None or reply.status_code != 200:
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() - started < within_s, f"{path}: {reply and reply.text}"
            await asyncio.sleep(0.02)
        return time.monotonic() - started

    async def health(self) -> Any:
        reply = await self.get("/healthz")
        assert reply is not None and reply.status_code == 200
        return reply.json()["embedded_store"]

    async def exited(self, within_s: float = 30) -> int:
        return await exited(self.proc, within_s, 0.02)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


async def create(sidecar: Sidecar, external_id: str) -> None:
    async with httpx.AsyncClient(base_url=sidecar.url, headers=AUTH) as client:
        reply = await client.post("/v2/identities", json={"external_id": external_id})
        assert reply.status_code == 201, reply.text


async def keeps_answering(sidecar: Sidecar, external_id: str, for_s: float) -> None:
    until = time.monotonic() + for_s
    while True:
        ready = await sidecar.get("/readyz")
        assert ready is not None and ready.status_code == 200, ready and ready.text
        found = await sidecar.get(f"/v2/identities/{external_id}")
        assert found is not None and found.status_code == 200, found and found.text
        if time.monotonic() > until:
            return
        await asyncio.sleep(0.1)
