"""The alert sender's loop stops when cancelled, whatever wakes it at that moment."""

from __future__ import annotations

import asyncio
from typing import Any

from sidecar.budgets.notify import AlertSender


class NotLeading:
    """An outbox whose lease is always someone else's: the sender only waits."""

    async def lease(self, token: str, ms: int) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the sender used the outbox's {name} without the lease")


async def test_a_wake_as_the_sender_is_cancelled_does_not_keep_it_running() -> None:
    # On Python 3.11 asyncio.wait_for swallows a cancellation that arrives as the event it
    # waits for is set; a sidecar's shutdown then waited for this loop for ever.
    for _ in range(50):
        sender = AlertSender(NotLeading(), [], poll_s=0.5)  # type: ignore[arg-type]
        task = asyncio.create_task(sender.run())
        for _ in range(3):
            await asyncio.sleep(0)  # into its wait
        sender.wake()
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=2)
        assert done == {task} and task.cancelled()
