"""The span exporter process: under `sidecar serve`, the span of the last request goes out when it
stops, and the exporter never outlives it, however it ends; its log stays short when spans are
dropped."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from sidecar.mock import start_mock
from sidecar.observe import otel_export
from sidecar.testing.otlp import OtlpReceiver
from sidecar.testing.redis_server import RedisServer, free_port

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


def exporters(mark: str) -> list[int]:
    """Processes whose environment holds `mark`: the sidecar's exporter, once it is gone."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            environ = Path(entry.path, "environ").read_bytes()
            cmdline = Path(entry.path, "cmdline").read_bytes()
        except OSError:
            continue
        if mark.encode() in environ and b"sidecar.observe.otel_export" in cmdline:
            found.append(int(entry.name))
    return found


@asynccontextmanager
async def serving(
    tmp_path: Path, redis_server: RedisServer, otlp: OtlpReceiver
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str, str]]:
    mock = await start_mock()
    port = free_port()
    mark = f"telemetry-test-{uuid.uuid4().hex}"
    config = tmp_path / "config.toml"
    config.write_text(
        f'[redis]\nurl = "{redis_server.url}"\nkey_prefix = "{mark}"\n'
        f'[upstream]\nurl = "{mock.url}"\n'
        f'[telemetry]\nenabled = true\nendpoint = "{otlp.url}/v1/traces"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env |= {"SIDECAR_PORT": str(port), "SIDECAR_DATA_DIR": str(tmp_path / "data"), "MARK": mark}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "serve", "--config", str(config),
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url) as client:
            for _ in range(400):
                try:
                    if (await client.get("/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)
        yield proc, url, mark
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await mock.close()


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_the_last_spans_go_out_when_serve_stops(
    otlp: OtlpReceiver, redis_server: RedisServer, tmp_path: Path, stop: signal.Signals
) -> None:
    async with serving(tmp_path, redis_server, otlp) as (proc, url, mark):
        async with httpx.AsyncClient(base_url=url) as client:
            r = await client.post(
                "/v1/chat/completions", json=CHAT, headers={"X-ORQ-IDENTITY-ID": "last"}
            )
            assert r.status_code == 200
        assert len(exporters(mark)) == 1
        proc.send_signal(stop)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    # Sent as the worker stopped, well before the processor's 5-second schedule.
    [span] = otlp.spans
    assert span.attributes["enduser.id"] == "last"
    assert exporters(mark) == []


@pytest.mark.slow
async def test_the_exporter_does_not_outlive_a_killed_sidecar(
    otlp: OtlpReceiver, redis_server: RedisServer, tmp_path: Path
) -> None:
    async with serving(tmp_path, redis_server, otlp) as (proc, _, mark):
        assert len(exporters(mark)) == 1
        proc.kill()
        await proc.wait()
        for _ in range(200):  # its input closed: it exits
            if not exporters(mark):
                break
            await asyncio.sleep(0.05)
        assert exporters(mark) == []


def test_the_processors_warnings_are_kept_to_one_a_minute(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    logger = logging.getLogger("sidecar.tests.quiet")
    quiet = otel_export.Quiet()
    logger.addFilter(quiet)
    try:
        with caplog.at_level(logging.WARNING, logger=logger.name):
            for _ in range(5):
                logger.warning("Queue full, dropping %s.", "spans")
            logger.warning("Exporter already shutdown, ignoring batch")
            now[0] += otel_export.QUIET_S
            logger.warning("Queue full, dropping %s.", "spans")
    finally:
        logger.removeFilter(quiet)
    assert [r.getMessage() for r in caplog.records] == [
        "Queue full, dropping spans.",
        "Exporter already shutdown, ignoring batch",
        "Queue full, dropping spans. (4 more like it in the last 60 s)",
    ]
