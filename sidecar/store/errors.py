"""The driver's failures, translated once, at the storage edge.

Storage modules (the only code that talks to Redis) run their calls through `translated` or
`call`; everything above them sees StoreUnavailable and never a redis-py exception."""

from __future__ import annotations

from collections.abc import Awaitable
from types import TracebackType
from typing import Any

from redis.exceptions import RedisError

from sidecar.errors import StoreUnavailable
from sidecar.store.deadline import STORE

# What a Redis call raises when the server is down, hung, failing over or refusing.
DRIVER_ERRORS = (RedisError, OSError)


def unavailable(exc: BaseException, what: str = "store") -> StoreUnavailable:
    return StoreUnavailable(f"{what} unavailable: {type(exc).__name__}")


class translated:
    """Redis errors as StoreUnavailable; a call that succeeds tells the store's liveness, unless
    `replied` is False: what succeeds without the store's answer (a call written to a socket
    buffer, a connection already open) says nothing of it. Counted as a sign of life, every
    request written while the store hung kept every check in flight waiting (deadline.py).

    A class rather than a @contextmanager: it is entered several times on a limited request's
    path, and a generator-based one costs a generator and a helper object each time."""

    __slots__ = ("replied", "what")

    def __init__(self, what: str = "store", replied: bool = True) -> None:
        self.what = what
        self.replied = replied

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            if self.replied:
                STORE.answered()
        elif isinstance(exc, DRIVER_ERRORS):
            raise unavailable(exc, self.what) from exc


async def call(awaitable: Awaitable[Any], what: str = "store") -> Any:
    """The reply of one driver call (redis-py's own reply types are too loose to be useful:
    callers declare what the command returns)."""
    with translated(what):
        return await awaitable
