from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Generic, TypeVar

from sidecar.errors import StoreUnavailable

STOP_S = 2.0  # how long `stop` waits for loops before cancelling the ones left again
STOP_TRIES = 3


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


T = TypeVar("T")


class Batch(Generic[T]):
    """Items gathered on the event loop and handed to `flush` together: `every_s` after the
    first of them, or at once when `size` wait; `send` hands them over now."""

    def __init__(self, size: int, every_s: float, flush: Callable[[list[T]], None]) -> None:
        self.size = size
        self.every_s = every_s
        self._flush = flush
        self.items: list[T] = []
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self.items)

    def add(self, item: T) -> None:
        items = self.items
        items.append(item)
        if len(items) >= self.size:
            self.send()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.every_s, self.send)

    def send(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        items, self.items = self.items, []
        if items:
            self._flush(items)


class Nap:
    """A sleep that `wake` ends early (the usage writer's flush interval, the index's pace):
    a drain writes what waits at once instead of waiting the interval out."""

    def __init__(self) -> None:
        self._wake: asyncio.Future[None] | None = None

    async def __call__(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        self._wake = wake = loop.create_future()
        timer = loop.call_later(delay, _woken, wake)
        try:
            await wake
        finally:
            timer.cancel()
            self._wake = None

    def wake(self) -> None:
        if self._wake is not None:
            _woken(self._wake)


def _woken(wake: asyncio.Future[None]) -> None:
    if not wake.done():
        wake.set_result(None)


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
            stopping()
            if not failing:
                log.warning("%s not reloaded (%s); the last ones loaded stay", what, exc)
            failing = True
        else:
            failing = False
        await asyncio.sleep(interval)


def stopping() -> None:
    """Raise CancelledError when this task was asked to stop. For a loop that goes on after a
    store error: a cancellation that reached the task inside the store's client can come back
    out as that error, and the loop would otherwise run on for ever."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def stop(tasks: Sequence[asyncio.Task[Any]], log: logging.Logger) -> None:
    """Cancel `tasks` and wait for them to end. One still running STOP_S later (it went on
    after its cancellation) is cancelled again, up to STOP_TRIES times; one that outlives
    that is logged and left, so that shutdown always ends."""
    pending = {task for task in tasks if not task.done()}
    for _ in range(STOP_TRIES):
        if not pending:
            break
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=STOP_S)
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: what a loop died of was logged where it happened
    if pending:
        names = ", ".join(sorted(task.get_name() for task in pending))
        log.error("background loops still running at shutdown, left behind: %s", names)
