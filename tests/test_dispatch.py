"""The ASGI app users reach: here, the lifespan it answers itself (the routes' Litestar app is
shared by every app of a process, so its own lifespan is not run)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from redis.asyncio import Redis

from sidecar.app import create_app, routes
from sidecar.dispatch import Sidecar
from sidecar.settings import Settings
from tests.support.auth import ADMIN_TOKEN


async def run_lifespan(app: Sidecar, log: list[str]) -> None:
    """The server's side: start-up, then shutdown once started; every message in `log`."""
    messages = iter(({"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}))

    async def receive() -> Any:
        message = next(messages)
        log.append(message["type"])
        return message

    async def send(message: Any) -> None:
        log.append(message["type"])
        if "message" in message:
            log.append(message["message"].strip().splitlines()[-1])

    await app({"type": "lifespan"}, receive, send)  # type: ignore[arg-type]


def sidecar(settings: Settings, redis: Redis, fails: str | None, log: list[str]) -> Sidecar:
    services = create_app(settings, admin_token=ADMIN_TOKEN, redis=redis).services

    @asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        log.append("open")
        if fails == "open":
            raise RuntimeError("cannot open")
        yield
        log.append("close")
        if fails == "close":
            raise RuntimeError("cannot close")

    return Sidecar(routes(), services, lifespan)


async def test_the_lifespan_opens_before_start_up_completes_and_closes_at_shutdown(
    settings: Settings, redis: Redis
) -> None:
    log: list[str] = []
    await run_lifespan(sidecar(settings, redis, None, log), log)
    assert log == [
        "lifespan.startup",
        "open",
        "lifespan.startup.complete",
        "lifespan.shutdown",
        "close",
        "lifespan.shutdown.complete",
    ]


@pytest.mark.parametrize(
    ("fails", "expected"),
    [
        (
            "open",
            ["lifespan.startup", "open", "lifespan.startup.failed", "RuntimeError: cannot open"],
        ),
        (
            "close",
            [
                "lifespan.startup",
                "open",
                "lifespan.startup.complete",
                "lifespan.shutdown",
                "close",
                "lifespan.shutdown.failed",
                "RuntimeError: cannot close",
            ],
        ),
    ],
)
async def test_a_failure_is_reported_to_the_server_and_raised(
    settings: Settings, redis: Redis, fails: str, expected: list[str]
) -> None:
    log: list[str] = []
    with pytest.raises(RuntimeError, match=f"cannot {fails}"):
        await run_lifespan(sidecar(settings, redis, fails, log), log)
    assert log == expected
