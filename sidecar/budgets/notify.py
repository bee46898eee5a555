"""Sending budget alerts to the `[[notifiers]]`: one process at a time (the holder of a lease in
the store) takes what is due from the durable outbox and posts it; a failed attempt is retried
with exponential backoff until an hour after the alert fired. At least once: a delivery cut
short by a crash is sent again once its claim lapses."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence

import aiohttp
from ulid import ULID

from sidecar import __version__
from sidecar.budgets.alerts import signature
from sidecar.budgets.outbox import Outbox, Outcome, Pending
from sidecar.errors import StoreUnavailable
from sidecar.settings import NotifierSettings
from sidecar.tasks import stopping

log = logging.getLogger("sidecar.budgets")

Clock = Callable[[], float]

POLL_S = 0.5  # how often the lease holder looks for due deliveries (a local alert wakes it)
LEASE_S = 30.0  # the lease lapses this long after its holder stops renewing it (a crash)
SEND_TIMEOUT_S = 10.0  # one attempt, connection to answer
HOLD_S = 60.0  # a claimed delivery is sent again after this if its attempt never finished
BATCH = 64  # deliveries claimed and sent at once
RETRY_FIRST_S = 1.0  # the first retry; each next waits twice as long, up to RETRY_MAX_S
RETRY_MAX_S = 300.0
GIVE_UP_S = 3600.0  # attempts stop this long after the alert fired


def next_attempt(attempts: int, created_ms: int, now_ms: int) -> int | None:
    """When to try again after `attempts` failed ones (ms), or None to give up: the waits
    double from RETRY_FIRST_S up to RETRY_MAX_S, and the last attempt is an hour after the
    alert fired."""
    deadline = created_ms + int(GIVE_UP_S * 1000)
    if now_ms >= deadline:
        return None
    wait_s = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** max(0, attempts - 1))
    return min(deadline, now_ms + int(wait_s * 1000))


def _described(exc: BaseException) -> str:
    # Never the URL (a Slack webhook's path is its secret): what failed, and how.
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error.strerror or type(exc.os_error).__name__}"
    return type(exc).__name__


class AlertSender:
    def __init__(
        self,
        outbox: Outbox,
        notifiers: Sequence[NotifierSettings],
        clock: Clock = time.time,
        poll_s: float = POLL_S,
    ) -> None:
        self.outbox = outbox
        self.notifiers = {n.name: n for n in notifiers}
        self.clock = clock
        self.poll_s = poll_s
        self.token = str(ULID())
        self.leading = False
        self.sent = 0  # deliveries this process delivered
        self.session: aiohttp.ClientSession | None = None
        self._wake = asyncio.Event()

    async def open(self) -> None:
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=SEND_TIMEOUT_S),
            headers={"user-agent": f"llm-identity-sidecar/{__version__}"},
            cookie_jar=aiohttp.DummyCookieJar(),  # each delivery stands alone
        )

    async def close(self) -> None:
        """Let another process take over at once, and close the HTTP client."""
        if self.leading:
            try:
                await self.outbox.drop(self.token)
            except StoreUnavailable as exc:  # it lapses by itself
                log.warning("alert sender lease not given back (%s)", exc)
            self.leading = False
        if self.session is not None:
            await self.session.close()
            self.session = None

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        failing = False
        while True:
            try:
                more = await self.step()
            except StoreUnavailable as exc:
                stopping()
                if not failing:
                    log.warning("budget alerts not sent now (%s); retrying", exc)
                failing, more = True, False
            else:
                failing = False
            if more:
                continue
            # asyncio.timeout, not wait_for: on Python 3.11 a wait_for whose event is set as
            # the task is cancelled swallows the cancellation, and this loop never stopped.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_s):
                    await self._wake.wait()
            self._wake.clear()

    async def step(self) -> bool:
        """Take or renew the lease and, holding it, send what is due: True when a whole batch
        went (more may be due)."""
        self.leading = await self.outbox.lease(self.token, int(LEASE_S * 1000))
        if not self.leading:
            return False
        claimed = await self.outbox.claim(self.token, BATCH, int(HOLD_S * 1000))
        if claimed is None:
            self.leading = False
            return False
        if not claimed:
            return False
        outcomes = await asyncio.gather(*(self._send(p) for p in claimed))
        await self.outbox.finish(outcomes)
        return len(claimed) == BATCH

    async def _send(self, pending: Pending) -> Outcome:
        notifier = self.notifiers.get(pending.notifier)
        status: int | None = None
        if notifier is None:
            error = f"no notifier named {pending.notifier!r} is configured"
        else:
            answer = await self._post(notifier, pending.body)
            if isinstance(answer, int):
                status, error = answer, "" if 200 <= answer < 300 else f"HTTP {answer}"
            else:
                error = answer
        now_ms = int(self.clock() * 1000)
        if not error:
            self.sent += 1
            return Outcome(id=pending.id, step="delivered", http_status=status)
        attempts = pending.attempts + 1
        retry = next_attempt(attempts, pending.created_ms, now_ms)
        if retry is None:
            log.warning(
                "budget alert delivery %s to notifier %s given up after %d attempts: %s",
                pending.id, pending.notifier, attempts, error,
            )  # fmt: skip
            return Outcome(id=pending.id, step="failed", error=error, http_status=status)
        log.info(
            "budget alert delivery %s to notifier %s failed (attempt %d: %s); retrying",
            pending.id, pending.notifier, attempts, error,
        )  # fmt: skip
        return Outcome(id=pending.id, step="retry", next_ms=retry, error=error, http_status=status)

    async def _post(self, notifier: NotifierSettings, body: bytes) -> int | str:
        """The answer's status, or what went wrong."""
        assert self.session is not None, "AlertSender.open() first"
        headers = {"content-type": "application/json"}
        if notifier.secret:
            headers["x-sidecar-signature"] = signature(notifier.secret, body)
        try:
            async with self.session.post(
                notifier.url, data=body, headers=headers, allow_redirects=False
            ) as answer:
                await answer.content.read(65_536)  # what the receiver says is not kept
                return answer.status
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            return _described(exc)
