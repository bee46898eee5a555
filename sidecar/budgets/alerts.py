"""Budget alerts: what each notifier is sent, and the scanner that finds crossed thresholds.

Off the request path: every process scans the budgets in force with alert thresholds every
SCAN_S (one pipelined read of their current buckets); a crossed threshold fires once per
budget, threshold, period and arming (a reset or a changed amount re-arms), whichever process
sees it first, and its deliveries go into the durable outbox in the same step (outbox.fire)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import msgspec
from ulid import ULID

from sidecar import money
from sidecar.budgets import model
from sidecar.budgets.model import Budget, BudgetView, Used
from sidecar.budgets.outbox import Fire, Outbox
from sidecar.budgets.service import Budgets
from sidecar.budgets.store import BudgetStore
from sidecar.errors import StoreUnavailable
from sidecar.identity.model import rfc3339
from sidecar.quota import windows
from sidecar.settings import NotifierSettings
from sidecar.tasks import stopping

log = logging.getLogger("sidecar.budgets")

Clock = Callable[[], float]

EVENT = "budget.threshold_crossed"
SCAN_S = 2.0
_FIRED_KEPT = 100_000  # fired markers a process remembers, not to ask Redis again


class Event(msgspec.Struct, kw_only=True):
    """The JSON body of an alert."""

    event: str
    id: str  # the alert's: the same to every notifier, for idempotency
    budget: BudgetView
    identity: str | None  # the external id whose request it last counted
    threshold_percent: int
    consumed_usd: float | None
    consumed_tokens: int | None
    at: str


_encode = msgspec.json.Encoder().encode


def signature(secret: str, body: bytes) -> str:
    """x-sidecar-signature: the hex HMAC-SHA256 of the body."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def event(
    alert_id: str, budget: Budget, used: Used, threshold: int, identity: str | None, at_ms: int
) -> Event:
    return Event(
        event=EVENT,
        id=alert_id,
        budget=model.view(budget, used),
        identity=identity,
        threshold_percent=threshold,
        consumed_usd=None if used.cost_nanos is None else money.dollars(used.cost_nanos),
        consumed_tokens=used.tokens,
        at=rfc3339(at_ms),
    )


def slack_text(budget: Budget, used: Used, threshold: int, identity: str | None) -> str:
    scope = budget.scope
    parts = []
    if budget.amount_nanos is not None and used.cost_nanos is not None:
        parts.append(f"{money.display(used.cost_nanos)} of {money.display(budget.amount_nanos)}")
    if budget.token_limit is not None and used.tokens is not None:
        parts.append(f"{used.tokens:,} of {budget.token_limit:,} tokens")
    period = "in total" if used.end_ms is None else f"this period (resets {rfc3339(used.end_ms)})"
    who = f" (last request: {identity})" if identity else ""
    return (
        f"Budget {budget.id} for {scope.kind} {scope.target} reached {threshold}%{who}: "
        f"{' and '.join(parts)} {period}, {budget.period}."
    )


def body(notifier: NotifierSettings, alert: Event, budget: Budget, used: Used) -> bytes:
    if notifier.format == "slack":
        return _encode({"text": slack_text(budget, used, alert.threshold_percent, alert.identity)})
    return _encode(alert)


class Waker(Protocol):
    """The sender (notify.AlertSender): told when an alert fired, not to wait for its poll."""

    def wake(self) -> None: ...


class AlertScanner:
    def __init__(
        self,
        budgets: Budgets,
        store: BudgetStore,
        outbox: Outbox,
        sender: Waker,
        notifiers: Sequence[NotifierSettings],
        clock: Clock = time.time,
        interval_s: float = SCAN_S,
    ) -> None:
        self.budgets = budgets
        self.store = store
        self.outbox = outbox
        self.sender = sender
        self.notifiers = list(notifiers)
        self.clock = clock
        self.interval_s = interval_s
        self.fired = 0  # alerts this process fired
        self._seen: set[tuple[str, int, str, int]] = set()  # markers known to be set

    async def scan(self) -> int:
        """Fire every crossed threshold that has not fired: how many this call fired."""
        await self.outbox.note(self.budgets.take_touched())
        entries = self.budgets.with_alerts()
        if not entries or not self.notifiers:
            return 0
        now_ms = int(self.clock() * 1000)
        used = await self.store.consumption([e.budget for e in entries], now_ms)
        crossed: list[tuple[Budget, Used, int, int]] = []
        for entry, reading in zip(entries, used, strict=True):
            for threshold in model.crossed(entry.budget, reading):
                if (entry.budget.id, threshold, reading.period, entry.arm) not in self._seen:
                    crossed.append((entry.budget, reading, threshold, entry.arm))
        if not crossed:
            return 0
        ids = list(dict.fromkeys(budget.id for budget, _, _, _ in crossed))
        by_budget = dict(zip(ids, await self.outbox.last(ids), strict=True))
        alerts = []
        for budget, reading, threshold, arm in crossed:
            identity = by_budget.get(budget.id)
            if identity is None and budget.scope.kind != "tag":
                identity = budget.scope.target
            alert_id = str(ULID.from_timestamp(now_ms / 1000))
            payload = event(alert_id, budget, reading, threshold, identity, now_ms)
            alerts.append(
                Fire(
                    budget_id=budget.id,
                    threshold=threshold,
                    period=reading.period,
                    arm=arm,
                    marker_s=_marker_s(reading, now_ms),
                    alert_id=alert_id,
                    identity=identity,
                    deliveries=[
                        (
                            str(ULID.from_timestamp(now_ms / 1000)),
                            n.name,
                            body(n, payload, budget, reading),
                        )
                        for n in self.notifiers
                    ],
                )
            )
        results = await self.outbox.fire(alerts)
        if len(self._seen) > _FIRED_KEPT:
            self._seen.clear()
        for alert in alerts:
            self._seen.add((alert.budget_id, alert.threshold, alert.period, alert.arm))
        fired = sum(results)
        if fired:
            self.fired += fired
            log.info("budget alerts fired: %d", fired)
            self.sender.wake()
        return fired

    async def run(self) -> None:
        failing = False
        while True:
            try:
                await self.scan()
            except StoreUnavailable as exc:
                stopping()
                if not failing:
                    log.warning("budget alert scan failed (%s); retrying", exc)
                failing = True
            else:
                failing = False
            await asyncio.sleep(self.interval_s)


def _marker_s(used: Used, now_ms: int) -> int:
    """A fired marker outlives its period by a day; a one-time budget's, ten years."""
    if used.end_ms is None:
        return windows.CALENDARS["once"]
    return max(1, (used.end_ms - now_ms) // 1000) + 86_400
