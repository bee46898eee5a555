"""The event loop kept polling while a request waits on Redis for a reply.

A process that sleeps in `epoll_wait` until Redis answers is woken by the reply, and on a VM a
sleeping vCPU takes tens of microseconds to wake: measured on the kind of machine the README's
figures come from, a request of an identity admitted at Redis (one that calls now and then)
was answered 80-110 µs sooner (p50) when the loop kept polling through the exchange
(bench/RESULTS.md). So while a reply a request waits for is pending, a callback keeps the loop
busy (each turn then polls with a zero timeout and runs whatever else is ready), for at most
POLL_S per reply: a store farther away than that is waited for asleep, as before. Replies
nobody waits for (usage writes, background work) are not polled for."""

from __future__ import annotations

import asyncio
import time
from typing import Any

POLL_S = 0.001


class Poller:
    """Keeps the running event loop polling while a watched future is pending, each for at
    most `limit_s` after it was watched. One callback a loop turn whatever their number."""

    def __init__(self, limit_s: float = POLL_S) -> None:
        self.limit_s = limit_s
        self._pending: list[tuple[asyncio.Future[Any], float]] = []

    @property
    def polling(self) -> bool:
        return bool(self._pending)

    def watch(self, future: asyncio.Future[Any]) -> None:
        if self.limit_s <= 0 or future.done():
            return
        idle = not self._pending
        self._pending.append((future, time.perf_counter() + self.limit_s))
        if idle:
            future.get_loop().call_soon(self._poll)

    def _poll(self) -> None:
        now = time.perf_counter()
        pending = [(f, until) for f, until in self._pending if not f.done() and until > now]
        self._pending = pending
        if pending:
            pending[0][0].get_loop().call_soon(self._poll)
