"""How long to wait for the store: its own answer, not this process's lag.

A limit check gives up after `[redis] timeout_ms`, and then `on_error` decides. Measured from the
caller, that deadline also counts the time the event loop took to come back to the check: on a
loaded worker (or one that has just started) a reply that is already in the socket buffer misses
a 50 ms deadline, and an `allow` would forward the request unchecked although Redis is fine.

So the deadline is re-armed, up to a cap, while the store is evidently answering: some reply
came back since it was armed (the store serves, the queue ahead is ours), or the deadline itself
fired late (the loop is lagging: the wait was ours). When neither shows, the store is asked
directly (a PING, one at a time per process) and the deadline re-armed once more: if that
answers, the wait was ours (connections still opening, a queue ahead); if not, the check fails.
A store that is down or hung answers nothing: the check fails after twice `timeout`, and the
breaker counts it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from types import TracebackType

# A check waits at most this many times its timeout while the store looks alive, and never
# less than CAP_MIN_S nor more than CAP_MAX_S (but two timeouts at least).
CAP_FACTOR = 20
CAP_MIN_S = 0.5
CAP_MAX_S = 2.0
# The deadline fired this much of the timeout late: the loop is lagging.
LATE_FRACTION = 0.25


class Liveness:
    """When the store last answered a call (time.monotonic()): every storage call that
    succeeds says so (store.errors.translated)."""

    __slots__ = ("last", "rearmed")

    def __init__(self) -> None:
        self.last = float("-inf")
        self.rearmed = 0  # deadlines extended because the store was answering (a metric)

    def answered(self) -> None:
        self.last = time.monotonic()


# This process's view of its store: one event loop, one store, whatever the caller.
STORE = Liveness()


class StoreDeadline:
    """`async with StoreDeadline(timeout, liveness):` raises TimeoutError like
    `asyncio.timeout(timeout)`, but only when the store has stopped answering (see above)."""

    __slots__ = (
        "_armed_at",
        "_asked",
        "_cap",
        "_handle",
        "_inner",
        "_liveness",
        "_loop",
        "_probe",
        "_start",
        "timeout",
    )

    def __init__(
        self, timeout: float, probe: Callable[[], None], liveness: Liveness = STORE
    ) -> None:
        self.timeout = timeout
        self._probe = probe  # asks the store for a sign of life (its answer tells `liveness`)
        self._asked = False
        self._liveness = liveness
        # Never less than two periods: the one the probe gets must fit.
        self._cap = max(2 * timeout, min(CAP_MAX_S, max(CAP_MIN_S, CAP_FACTOR * timeout)))
        self._inner = asyncio.timeout(None)
        self._handle: asyncio.TimerHandle | None = None

    async def __aenter__(self) -> StoreDeadline:
        await self._inner.__aenter__()
        loop = self._loop = asyncio.get_running_loop()
        self._start = self._armed_at = time.monotonic()
        self._handle = loop.call_at(loop.time() + self.timeout, self._expire)
        return self

    def _expire(self) -> None:
        loop = self._loop
        assert self._handle is not None
        late = loop.time() - self._handle.when()
        now = time.monotonic()
        answering = self._liveness.last > self._armed_at or late > LATE_FRACTION * self.timeout
        if not answering and not self._asked:
            self._asked = answering = True  # one more period, for the probe to answer
            self._probe()
        if answering and now - self._start + self.timeout <= self._cap:
            self._liveness.rearmed += 1
            self._armed_at = now
            self._handle = loop.call_at(loop.time() + self.timeout, self._expire)
        else:
            self._inner.reschedule(loop.time())  # TimeoutError in the task, as asyncio.timeout

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._handle is not None:
            self._handle.cancel()
        await self._inner.__aexit__(exc_type, exc, tb)
