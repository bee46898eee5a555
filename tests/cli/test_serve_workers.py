"""`sidecar serve --workers 2`: two processes on one port, one store. Every limit holds across
them as it does in one process (SPEC "Exactness of token and cost limits"), the usage the
clients were answered with is what the identity API reads back, both processes count usage,
and SIGTERM lets the requests in flight on either finish and their usage be written."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from sidecar.catalog import open_catalog
from sidecar.identity.model import Metrics
from sidecar.mock import MockServer, start_mock
from sidecar.store.keys import Keys
from sidecar.testing.redis_server import RedisServer, free_port
from sidecar.usage import estimate
from sidecar.usage.model import Kind
from tests.support.auth import ADMIN_TOKEN, AUTH
from tests.support.processes import exited

STOPPED = {0, -signal.SIGTERM}  # uvicorn re-raises the SIGTERM it handled
WORKERS = 2
MODEL = "workers-model"
NANOS_IN, NANOS_OUT = 1_000_000, 2_000_000  # a token's price: $1000 and $2000 per million
REQUESTS_LIMIT = 20  # a minute
TOKENS_LIMIT = 600  # an hour
COST_LIMIT_NANOS = 500_000_000  # $0.50 an hour
IN_TOKENS, OUT_TOKENS = 20, 10  # what the mock reports for each request
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": OUT_TOKENS}
PER_IDENTITY = 25  # clients at once for each identity, each sending until refused
POLICIES = f"""
[[policy]]
name = "requests"
match = {{ ids = ["req-*"] }}
requests = ["{REQUESTS_LIMIT}/minute"]

[[policy]]
name = "tokens"
match = {{ ids = ["tok-*"] }}
tokens = ["{TOKENS_LIMIT}/hour"]

[[policy]]
name = "cost"
match = {{ ids = ["cost-*"] }}
cost_usd = ["{COST_LIMIT_NANOS / 1e9}/hour"]
"""


@dataclass
class Seen:
    """What the clients of one identity were answered."""

    statuses: Counter[int] = field(default_factory=Counter)
    dimensions: Counter[str] = field(default_factory=Counter)  # of the 429s
    input_tokens: int = 0
    output_tokens: int = 0

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def cost_nanos(self) -> int:
        return self.input_tokens * NANOS_IN + self.output_tokens * NANOS_OUT

    def take(self, reply: httpx.Response) -> bool:
        """Count the answer; True when admitted."""
        self.statuses[reply.status_code] += 1
        if reply.status_code == 429:
            self.dimensions[reply.json()["error"]["dimension"]] += 1
            return False
        assert reply.status_code == 200, reply.text
        usage = reply.json()["usage"]
        self.input_tokens += usage["prompt_tokens"]
        self.output_tokens += usage["completion_tokens"]
        return True


class Serve:
    """`sidecar serve --workers N` on the given store, in front of the mock."""

    def __init__(self, tmp_path: Path, redis_url: str, upstream: str, extra: str = "") -> None:
        policy = tmp_path / "policies.toml"
        policy.write_text(POLICIES)
        config = tmp_path / "config.toml"
        config.write_text(
            f'[upstream]\nurl = "{upstream}"\n'
            # Limit checks wait for a busy test machine instead of failing open.
            f'[redis]\nurl = "{redis_url}"\ntimeout_ms = 2000\nwarm_connections = 4\n'
            f'[server]\ndata_dir = "{tmp_path / "data"}"\ndrain_s = 10\n'
            f'[policies]\npaths = ["{policy}"]\n'
            f'[pricing.models."{MODEL}"]\ninput_per_mtok = 1000.0\noutput_per_mtok = 2000.0\n'
            + extra
        )
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.spool = tmp_path / "data" / "spool"
        self.log = tmp_path / "sidecar.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
        env |= {"SIDECAR_PORT": str(self.port), "SIDECAR_ADMIN_TOKEN": ADMIN_TOKEN}
        command = ["serve", "--config", str(config), "--workers", str(WORKERS)]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sidecar", *command],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its workers are stopped with it, whatever happens
            )

    async def ready(self, client: httpx.AsyncClient) -> None:
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            try:
                if (await client.get(self.url + "/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)

    async def exited(self, within_s: float) -> int:
        return await exited(self.proc, within_s)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
async def mock() -> AsyncIterator[MockServer]:
    server = await start_mock()
    yield server
    await server.close()


@pytest.fixture
def served(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    redis_server: RedisServer,
    redis: Redis,
    mock: MockServer,
) -> Iterator[Serve]:
    """`serve --workers 2`; config added to its file by indirect parametrization."""
    sidecar = Serve(tmp_path, redis_server.url, mock.url, getattr(request, "param", ""))
    yield sidecar
    sidecar.stop()


def _client() -> httpx.AsyncClient:
    # A new connection per request: the kernel hands them to either worker.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    return httpx.AsyncClient(timeout=30, limits=limits)


def _headers(who: str, latency_ms: int = 30) -> dict[str, str]:
    return {
        "X-ORQ-IDENTITY-ID": who,
        "x-mock-input-tokens": str(IN_TOKENS),
        "x-mock-output-tokens": str(OUT_TOKENS),
        "x-mock-latency-ms": str(latency_ms),
    }


async def _until_refused(client: httpx.AsyncClient, url: str, who: str, seen: Seen) -> None:
    for _ in range(REQUESTS_LIMIT + 5):
        reply = await client.post(url + "/v1/chat/completions", json=BODY, headers=_headers(who))
        if not seen.take(reply):
            return
    raise AssertionError(f"{who}: never refused")


async def _metrics(client: httpx.AsyncClient, url: str, who: str) -> dict[str, Any]:
    reply = await client.get(
        f"{url}/v2/identities/{who}", params={"include_metrics": "true"}, headers=AUTH
    )
    assert reply.status_code == 200, reply.text
    metrics: dict[str, Any] = reply.json()["metrics"]
    return metrics


def _expected(seen: Seen) -> dict[str, Any]:
    return {
        "total_requests": seen.statuses[200],
        "input_tokens": seen.input_tokens,
        "output_tokens": seen.output_tokens,
        "total_tokens": seen.tokens,
        "total_cost": round(seen.cost_nanos / 1e9, 9),
        "rate_limited_requests": seen.statuses[429],
    }


async def _read_back(client: httpx.AsyncClient, url: str, who: str, seen: Seen) -> dict[str, Any]:
    """The identity's metrics once they hold what its clients saw (write-behind), or as last
    read after 5 s."""
    deadline = time.monotonic() + 5
    while True:
        metrics = await _metrics(client, url, who)
        got = {k: metrics[k] for k in _expected(seen)} | {
            "total_cost": round(metrics["total_cost"], 9)
        }
        if got == _expected(seen) or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.1)


async def _writers(redis: Redis, client: httpx.AsyncClient, url: str, ids: list[str]) -> set[str]:
    """The processes whose usage writes reached these identities' day counters."""
    keys, writers = Keys("sidecar"), set[str]()
    for who in ids:
        reply = await client.get(f"{url}/v2/identities/{who}", headers=AUTH)
        fields = await redis.hkeys(keys.usage_days(reply.json()["_id"]))
        writers |= {f.decode() for f in fields if isinstance(f, bytes) and f.startswith(b"w:")}
    return writers


async def _both_serving(redis: Redis, client: httpx.AsyncClient, url: str) -> None:
    """Unlimited requests, 20 at a time, until the usage of both workers shows: /readyz answers
    once one of them is up, and on a loaded machine the other may still be starting (it then
    serves none of a short run, which proves nothing about two)."""
    warm = [f"warm-{n}" for n in range(20)]
    async with asyncio.timeout(30):
        while True:
            replies = await asyncio.gather(
                *(
                    client.post(url + "/v1/chat/completions", json=BODY, headers=_headers(w, 0))
                    for w in warm
                )
            )
            assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
            await asyncio.sleep(0.3)  # their usage written (every 100 ms)
            if len(await _writers(redis, client, url, warm)) == WORKERS:
                return


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_limits_and_usage_are_exact_across_two_workers_and_sigterm_drains_both(
    served: Serve, redis: Redis
) -> None:
    url = served.url
    who = [f"{kind}-{n}" for kind in ("req", "tok", "cost") for n in range(2)]
    seen = {w: Seen() for w in who}
    async with _client() as client:
        await served.ready(client)
        await _both_serving(redis, client, url)
        await asyncio.gather(
            *(_until_refused(client, url, w, seen[w]) for w in who for _ in range(PER_IDENTITY))
        )
        # One request at a time until refused: now nothing is reserved, so a refusal means
        # what was charged leaves no room for one more estimate.
        for w in who[2:]:
            await _until_refused(client, url, w, seen[w])

        body = json.dumps(BODY).encode()
        most_in, most_out = estimate.tokens(Kind.CHAT, BODY, len(body), 1024)
        reserve_tokens = most_in + most_out
        reserve_nanos = most_in * NANOS_IN + most_out * NANOS_OUT
        actual_nanos = IN_TOKENS * NANOS_IN + OUT_TOKENS * NANOS_OUT
        for w in who[:2]:
            assert seen[w].statuses[200] == REQUESTS_LIMIT, (w, seen[w])
            assert set(seen[w].dimensions) == {"requests"}
        for w in who[2:4]:
            # Over by no more than one estimate's error; short by less than one estimate.
            error = reserve_tokens - (IN_TOKENS + OUT_TOKENS)
            assert TOKENS_LIMIT - reserve_tokens < seen[w].tokens <= TOKENS_LIMIT + error, seen[w]
            assert set(seen[w].dimensions) == {"tokens"}
        for w in who[4:]:
            error = reserve_nanos - actual_nanos
            assert (
                COST_LIMIT_NANOS - reserve_nanos < seen[w].cost_nanos <= COST_LIMIT_NANOS + error
            ), seen[w]
            assert set(seen[w].dimensions) == {"cost"}
        for w in who:
            assert await _read_back(client, url, w, seen[w]) == _expected(seen[w]), w
        assert len(await _writers(redis, client, url, who)) == WORKERS  # both served

        # SIGTERM with slow requests in flight on both workers: each is answered, then the
        # workers and `serve` exit, and the usage of every one of them is written.
        slow = asyncio.gather(
            *(
                client.post(
                    url + "/v1/chat/completions", json=BODY, headers=_headers("drain", 1500)
                )
                for _ in range(8)
            )
        )
        await asyncio.sleep(0.7)
        served.proc.send_signal(signal.SIGTERM)
        replies = await slow
        assert [r.status_code for r in replies] == [200] * 8
        assert await served.exited(within_s=30) in STOPPED, served.log.read_text()
    log = served.log.read_text()
    assert "Traceback" not in log, log
    assert not any(p.stat().st_size for p in served.spool.glob("*.jsonl"))
    found = await open_catalog(redis, Keys("sidecar")).get("drain", include_metrics=True)
    assert found is not None and isinstance(found.metrics, Metrics)
    assert found.metrics.total_requests == 8


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("served", ["[limits]\nprefetch = 32\n"], indirect=True)
async def test_with_prefetch_two_workers_never_pass_a_limit_and_reach_it_once_given_back(
    served: Serve,
) -> None:
    # Each worker holds its own allowances (docs/policies.md, prefetch): while one holds units,
    # the other can be refused short of the limit; never past it.
    url = served.url
    who = ["req-p0", "req-p1", "tok-p0", "cost-p0"]
    seen = {w: Seen() for w in who}
    async with _client() as client:
        await served.ready(client)
        await asyncio.gather(
            *(_until_refused(client, url, w, seen[w]) for w in who for _ in range(PER_IDENTITY))
        )
        for w in who[:2]:
            assert seen[w].statuses[200] <= REQUESTS_LIMIT, (w, seen[w])
        # What either worker held ahead goes back within 1.25 s unused; then one request at a
        # time until refused (nothing is granted that close to a limit): every limit reached.
        await asyncio.sleep(1.5)
        for w in who:
            await _until_refused(client, url, w, seen[w])
        body = json.dumps(BODY).encode()
        most_in, most_out = estimate.tokens(Kind.CHAT, BODY, len(body), 1024)
        reserve_tokens = most_in + most_out
        reserve_nanos = most_in * NANOS_IN + most_out * NANOS_OUT
        for w in who[:2]:
            assert seen[w].statuses[200] == REQUESTS_LIMIT, (w, seen[w])
        error = reserve_tokens - (IN_TOKENS + OUT_TOKENS)
        tokens = seen["tok-p0"].tokens
        assert TOKENS_LIMIT - reserve_tokens < tokens <= TOKENS_LIMIT + error, seen["tok-p0"]
        cost = seen["cost-p0"].cost_nanos
        error = reserve_nanos - (IN_TOKENS * NANOS_IN + OUT_TOKENS * NANOS_OUT)
        assert COST_LIMIT_NANOS - reserve_nanos < cost <= COST_LIMIT_NANOS + error, seen["cost-p0"]
        for w in who:
            assert await _read_back(client, url, w, seen[w]) == _expected(seen[w]), w
    assert "Traceback" not in served.log.read_text()
