from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.mock import MockServer, start_mock
from tests.support.embedded import (
    Sidecar,
    alive,
    store_pid,
)


@pytest.fixture
def data(tmp_path: Path) -> Iterator[Path]:
    data = tmp_path / "data"
    yield data
    # A test that failed half-way may leave its store running: end it (it is this test's).
    with contextlib.suppress(OSError, ValueError):
        pid = store_pid(data)
        if alive(pid) and Path(f"/proc/{pid}/cwd").resolve() == data.resolve():
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def sidecars(tmp_path: Path, data: Path) -> Iterator[Callable[..., Sidecar]]:
    started: list[Sidecar] = []

    def start(upstream: str = "http://127.0.0.1:9", **options: Any) -> Sidecar:
        sidecar = Sidecar(tmp_path, data, upstream, **options)
        started.append(sidecar)
        return sidecar

    yield start
    for sidecar in started:
        sidecar.kill()


@pytest.fixture
async def mock() -> AsyncIterator[MockServer]:
    server = await start_mock()
    yield server
    await server.close()
