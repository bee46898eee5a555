"""Background loops stop when asked, even one that went on after its first cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest

from sidecar import tasks
from sidecar.errors import StoreUnavailable
from sidecar.tasks import keep_refreshed, stop

log = logging.getLogger("tests.tasks")


async def test_a_loop_that_swallowed_its_cancellation_is_cancelled_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tasks, "STOP_S", 0.05)
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1  # as a store client that turned it into an error did

    loop = asyncio.create_task(stubborn())
    calm = asyncio.create_task(asyncio.sleep(10))
    await asyncio.sleep(0)
    await asyncio.wait_for(stop([loop, calm], log), 1)
    assert swallowed == 1 and loop.cancelled() and calm.cancelled()


async def test_a_loop_that_never_stops_is_logged_and_left(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(tasks, "STOP_S", 0.02)

    async def deaf() -> None:
        while True:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(10)

    loop = asyncio.create_task(deaf(), name="deaf-loop")
    await asyncio.sleep(0)
    await asyncio.wait_for(stop([loop], log), 1)
    assert not loop.done()
    assert "deaf-loop" in caplog.text
    loop.get_coro().close()  # gone for good: no pending-task warning
    loop.cancel()


async def test_keep_refreshed_ends_when_cancelled_inside_a_failing_refresh() -> None:
    calls = 0

    async def refresh() -> None:
        nonlocal calls
        calls += 1
        task = asyncio.current_task()
        assert task is not None
        task.cancel()  # the cancellation arrives ...
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            raise StoreUnavailable("store unavailable: TimeoutError") from None  # ... as this

    watcher = asyncio.create_task(keep_refreshed(refresh, 60, "things", log))
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(watcher, 1)
    assert calls == 1
