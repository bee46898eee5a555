from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from sidecar.errors import StoreUnavailable


class Background:
    """Work a request starts and does not wait for (usage writes, profile refreshes, lease
    releases); shutdown waits for it."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def wait(self, timeout_s: float | None = None) -> None:
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=timeout_s)


async def keep_refreshed(
    refresh: Callable[[], Awaitable[Any]], interval: float, what: str, log: logging.Logger
) -> None:
    """Run `refresh` every `interval` seconds until cancelled; while the store does not answer,
    what was last loaded stays in force (said once per outage)."""
    failing = False
    while True:
        try:
            await refresh()
        except StoreUnavailable as exc:
            if not failing:
                log.warning("%s not reloaded (%s); the last ones loaded stay", what, exc)
            failing = True
        else:
            failing = False
        await asyncio.sleep(interval)
