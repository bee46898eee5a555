"""Failed admin sign-ins, limited per client address: the admin bearer token on the API, the
hook token on the hooks, the dashboard's sign-in form.

Failures are counted in the store, so the limit holds across every sidecar sharing it. A window
of WINDOW_S starts at an address's first failure; after `per_minute` failures in it, every
attempt from that address, the right token included, is refused until the window ends (a right
token that still worked would tell a guesser when it guessed right). Each process remembers the
addresses it saw blocked, so a blocked address costs no round trip; a right token asks the
store at most once per CLEAR_S per address. While the store does not answer, each process counts
on its own (and says so once) rather than letting guesses through unlimited."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sidecar.errors import SidecarError, StoreUnavailable
from sidecar.identity.caller import Networks
from sidecar.store.connect import RedisClient
from sidecar.store.errors import call
from sidecar.store.keys import Keys
from sidecar.store.scripts import Script
from sidecar.tokens import token_matches

log = logging.getLogger("sidecar.auth")

Clock = Callable[[], float]
T = TypeVar("T")

WINDOW_S = 60
CLEAR_S = 1.0  # how long a store's "not blocked" answer is taken for a right token
LOCAL_MAX = 10_000  # addresses each of the process's tables holds at most
RETRY_STORE_S = 1.0  # after the store failed, it is not asked again for this long


class TooManyFailedSignIns(SidecarError):
    status = 429
    type = "rate_limit_error"
    code = "too_many_failed_authentications"


def _remember(table: dict[str, T], key: str, value: T) -> None:
    """Set, as the newest entry; the oldest goes when the table is full."""
    table.pop(key, None)
    table[key] = value
    if len(table) > LOCAL_MAX:
        del table[next(iter(table))]


class FailedSignIns:
    def __init__(
        self,
        client: RedisClient,
        keys: Keys,
        *,
        per_minute: int,
        networks: Networks,
        clock: Clock,
        timeout_s: float,
    ) -> None:
        self.redis = client
        self.keys = keys
        self.limit = per_minute
        self.networks = networks
        self.clock = clock
        self.timeout = timeout_s
        self.script = Script("sidecar.quota.lua", "failed_signin")
        self._blocked: dict[str, float] = {}  # address -> until (clock time)
        self._clear: dict[str, float] = {}  # address -> until: the store said not blocked
        self._local: dict[str, tuple[float, int]] = {}  # address -> window start, failures
        self._store_down = False
        self._ask_store_at = 0.0  # monotonic: an outage costs one timeout per RETRY_STORE_S

    async def verify(
        self,
        given: str | None,
        expected: str,
        *,
        peer: str | None,
        forwarded_for: str | None,
        where: str,
    ) -> bool:
        """Whether `given` is the `expected` token (compared in constant time). A wrong token
        counts a failure for the client address (the TCP peer, or the address a trusted proxy
        names); no token at all is just False (it guesses nothing). Raises
        TooManyFailedSignIns, before anything is compared, while the address is blocked.
        `where` names the route in the log; the token is never logged."""
        if not given:
            return False
        client = self.networks.client(peer, forwarded_for)
        now = self.clock()
        until = self._blocked.get(client)
        if until is not None:
            if now < until:
                raise self._refusal(until - now)
            del self._blocked[client]
        if token_matches(given, expected):
            await self._clear_to_go(client, now)
            return True
        await self._failed(client, now, where)
        return False

    def _refusal(self, wait_s: float) -> TooManyFailedSignIns:
        retry_after = max(1, math.ceil(wait_s))
        return TooManyFailedSignIns(
            f"too many failed authentications from this address; retry after {retry_after} s",
            headers={"retry-after": str(retry_after)},
        )

    def _block(self, client: str, start: float, now: float) -> None:
        until = start + WINDOW_S
        _remember(self._blocked, client, until)
        self._clear.pop(client, None)
        raise self._refusal(until - now)

    async def _clear_to_go(self, client: str, now: float) -> None:
        """Raises TooManyFailedSignIns when the address is blocked, on any sidecar."""
        if self._clear.get(client, 0.0) > now:
            return
        key = self.keys.failed_signins(client)
        held = await self._stored(lambda: call(self.redis.hmget(key, "s", "n")))
        if held is None:
            start, count = self._local.get(client, (now, 0))
        else:
            start, count = (float(held[0]) / 1000, int(held[1])) if held[1] else (now, 0)
        if count >= self.limit and now < start + WINDOW_S:
            self._block(client, start, now)
        if held is not None:
            _remember(self._clear, client, now + CLEAR_S)

    async def _failed(self, client: str, now: float, where: str) -> None:
        self._clear.pop(client, None)
        keys, args = [self.keys.failed_signins(client)], [int(now * 1000), WINDOW_S * 1000]
        reply = await self._stored(lambda: self.script(self.redis, keys, args))
        if reply is not None:
            start, count = int(reply[0]) / 1000, int(reply[1])
        else:
            start, count = self._local.get(client, (now, 0))
            if now >= start + WINDOW_S:
                start, count = now, 0
            count += 1
            _remember(self._local, client, (start, count))
        if count > self.limit:  # blocked meanwhile, by failures this process did not see
            self._block(client, start, now)
        log.warning(
            "failed admin authentication from %s on %s (%d of %d allowed per minute)",
            client,
            where,
            count,
            self.limit,
            extra={"fields": {"client": client, "route": where, "failures": count}},
        )
        if count == self.limit:
            log.warning(
                "%s: no more admin authentications for %.0f s (%d failed)",
                client,
                start + WINDOW_S - now,
                count,
            )
            _remember(self._blocked, client, start + WINDOW_S)

    async def _stored(self, command: Callable[[], Awaitable[Any]]) -> Any:
        """The store's reply to `command`, or None when it does not answer in time (or is not
        asked: it failed less than RETRY_STORE_S ago, so an outage costs each attempt nothing)."""
        if self._store_down and time.monotonic() < self._ask_store_at:
            return None
        try:
            async with asyncio.timeout(self.timeout):
                reply = await command()
        except (StoreUnavailable, TimeoutError) as exc:
            self._ask_store_at = time.monotonic() + RETRY_STORE_S
            if not self._store_down:
                self._store_down = True
                log.warning(
                    "store unreachable (%s): failed admin sign-ins are counted by this process "
                    "alone until it answers",
                    type(exc).__name__,
                )
            return None
        if self._store_down:
            self._store_down = False
            log.info("store answers again: failed admin sign-ins are counted in it")
        return reply
