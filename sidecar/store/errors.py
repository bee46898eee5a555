from __future__ import annotations

from redis.exceptions import RedisError

from sidecar.errors import StoreUnavailable

# What a call to the store raises when Redis is down, hung or failing over: the driver's own
# errors, socket errors, and the identity store's translation of them.
STORE_ERRORS = (RedisError, OSError, StoreUnavailable)
# The same, and the timeout of a step bounded by `timeout_ms` (asyncio.timeout).
STORE_OR_TIMEOUT = (RedisError, OSError, StoreUnavailable, TimeoutError)
