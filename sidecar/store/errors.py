"""The driver's failures, translated once, at the storage edge.

Storage modules (the only code that talks to Redis) run their calls through `translated` or
`call`; everything above them sees StoreUnavailable and never a redis-py exception."""

from __future__ import annotations

from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from typing import Any

from redis.exceptions import RedisError

from sidecar.errors import StoreUnavailable
from sidecar.store.deadline import STORE

# What a Redis call raises when the server is down, hung, failing over or refusing.
DRIVER_ERRORS = (RedisError, OSError)


def unavailable(exc: BaseException, what: str = "store") -> StoreUnavailable:
    return StoreUnavailable(f"{what} unavailable: {type(exc).__name__}")


@contextmanager
def translated(what: str = "store") -> Iterator[None]:
    """Redis errors as StoreUnavailable; a call that succeeds tells the store's liveness."""
    try:
        yield
    except DRIVER_ERRORS as exc:
        raise unavailable(exc, what) from exc
    STORE.answered()


async def call(awaitable: Awaitable[Any], what: str = "store") -> Any:
    """The reply of one driver call (redis-py's own reply types are too loose to be useful:
    callers declare what the command returns)."""
    with translated(what):
        return await awaitable
