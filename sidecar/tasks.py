from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


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
