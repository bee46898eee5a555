"""Budget alerts in Redis (the `{alerts}` slot): the fired markers, the durable outbox of
deliveries, each budget's delivery log, and the lease of the one process that sends."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import msgspec

from sidecar.identity.model import rfc3339
from sidecar.store.connect import RedisClient
from sidecar.store.errors import call
from sidecar.store.keys import Keys
from sidecar.store.scripts import Script, pipeline

Clock = Callable[[], float]

LOG_KEPT = 200  # deliveries a budget's log lists
KEPT_S = 30 * 86_400  # a delivered or failed delivery is kept this long


class Fire(msgspec.Struct, frozen=True, kw_only=True):
    """An alert to fire, unless its marker says it fired: one delivery per notifier."""

    budget_id: str
    threshold: int
    period: str  # the period's bucket name
    arm: int
    marker_s: int  # how long the marker is kept
    alert_id: str
    identity: str | None
    deliveries: list[tuple[str, str, bytes]]  # (delivery id, notifier name, body)


class Pending(msgspec.Struct, frozen=True, kw_only=True):
    """A claimed delivery, to send."""

    id: str
    notifier: str
    body: bytes
    attempts: int  # made before this one
    created_ms: int


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    step: Literal["delivered", "retry", "failed"]
    next_ms: int = 0  # when to retry
    error: str = ""
    http_status: int | None = None


class Delivery(msgspec.Struct, kw_only=True):
    """One alert's delivery to one notifier, as the delivery log shows it."""

    id: str
    alert_id: str
    notifier: str
    threshold_percent: int
    identity: str | None
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    last_error: str | None
    last_http_status: int | None
    created: str
    last_attempt_at: str | None
    next_attempt_at: str | None
    delivered_at: str | None


def _text(fields: dict[bytes, bytes], name: bytes) -> str | None:
    value = fields.get(name)
    return value.decode() if value else None


def _time(fields: dict[bytes, bytes], name: bytes) -> str | None:
    value = fields.get(name)
    return rfc3339(int(value)) if value else None


def _delivery(delivery_id: str, fields: dict[bytes, bytes]) -> Delivery:
    status = fields[b"status"].decode()
    assert status in ("pending", "delivered", "failed")
    http = fields.get(b"http")
    return Delivery(
        id=delivery_id,
        alert_id=fields[b"alert"].decode(),
        notifier=fields[b"notifier"].decode(),
        threshold_percent=int(fields[b"threshold"]),
        identity=_text(fields, b"identity"),
        status=status,  # type: ignore[arg-type]
        attempts=int(fields.get(b"attempts", 0)),
        last_error=_text(fields, b"error"),
        last_http_status=int(http) if http else None,
        created=rfc3339(int(fields[b"created"])),
        last_attempt_at=_time(fields, b"tried"),
        next_attempt_at=_time(fields, b"next") if status == "pending" else None,
        delivered_at=_time(fields, b"delivered"),
    )


class Outbox:
    def __init__(self, client: RedisClient, keys: Keys, clock: Clock = time.time) -> None:
        self.client = client
        self.keys = keys
        self.clock = clock
        self._fire = Script("sidecar.budgets.lua", "fire")
        self._lease = Script("sidecar.budgets.lua", "lease")
        self._claim = Script("sidecar.budgets.lua", "claim")
        self._finish = Script("sidecar.budgets.lua", "finish")

    @property
    def scripts(self) -> list[Script]:
        return [self._fire, self._lease, self._claim, self._finish]

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    # -- firing --------------------------------------------------------------------------------

    async def note(self, last: dict[str, str]) -> None:
        """The external id of the last request checked against each budget (alerts name it)."""
        if last:
            await call(self.client.hset(self.keys.alert_last, mapping=last))  # type: ignore[arg-type]

    async def last(self, budget_ids: Sequence[str]) -> list[str | None]:
        if not budget_ids:
            return []
        found = await call(self.client.hmget(self.keys.alert_last, list(budget_ids)))
        return [v.decode() if v else None for v in found]

    async def fire(self, alerts: Sequence[Fire]) -> list[bool]:
        """Fire each alert that has not fired (one pipeline): whether it did."""
        keys = self.keys
        now_ms = self._now_ms()

        def queue(pipe: Any) -> None:
            for alert in alerts:
                marker = keys.alert_fired(alert.budget_id, alert.threshold, alert.period, alert.arm)
                script_keys = [marker, keys.alert_outbox, keys.alert_log(alert.budget_id)]
                script_keys += [keys.alert_delivery(d) for d, _, _ in alert.deliveries]
                args: list[Any] = [alert.marker_s, now_ms, LOG_KEPT, alert.alert_id]
                args += [alert.budget_id, alert.threshold, alert.identity or ""]
                for delivery_id, notifier, body in alert.deliveries:
                    args += [delivery_id, notifier, body]
                self._fire.queue(pipe, script_keys, args)

        if not alerts:
            return []
        return [bool(r) for r in await pipeline(self.client, queue, [self._fire])]

    # -- sending -------------------------------------------------------------------------------

    async def lease(self, token: str, lifetime_ms: int) -> bool:
        """Take or renew the sender's lease: whether this process holds it."""
        reply = await self._lease(
            self.client, [self.keys.alert_sender], [token, lifetime_ms, "take"]
        )
        return bool(reply)

    async def drop(self, token: str) -> None:
        await self._lease(self.client, [self.keys.alert_sender], [token, 0, "drop"])

    async def claim(self, token: str, limit: int, hold_ms: int) -> list[Pending] | None:
        """Up to `limit` due deliveries, pushed back by `hold_ms` while they are sent; None
        when this process does not hold the lease."""
        now_ms = self._now_ms()
        keys = [self.keys.alert_sender, self.keys.alert_outbox]
        reply = await self._claim(self.client, keys, [token, now_ms, limit, now_ms + hold_ms])
        if not isinstance(reply, list):
            return None
        ids = [i.decode() for i in reply]
        if not ids:
            return []

        def queue(pipe: Any) -> None:
            for delivery_id in ids:
                pipe.hmget(
                    self.keys.alert_delivery(delivery_id), "notifier", "body", "attempts", "created"
                )

        out = []
        for delivery_id, (notifier, body, attempts, created) in zip(
            ids, await pipeline(self.client, queue), strict=True
        ):
            if notifier is None:  # gone (expired, or deleted by hand): finish drops it
                continue
            out.append(
                Pending(
                    id=delivery_id,
                    notifier=notifier.decode(),
                    body=body,
                    attempts=int(attempts or 0),
                    created_ms=int(created),
                )
            )
        return out

    async def finish(self, outcomes: Sequence[Outcome]) -> None:
        now_ms = self._now_ms()

        def queue(pipe: Any) -> None:
            for o in outcomes:
                keys = [self.keys.alert_delivery(o.id), self.keys.alert_outbox]
                http = "" if o.http_status is None else o.http_status
                args = [o.id, o.step, now_ms, o.next_ms, o.error[:500], http, KEPT_S]
                self._finish.queue(pipe, keys, args)

        if outcomes:
            await pipeline(self.client, queue, [self._finish])

    # -- the delivery log ------------------------------------------------------------------------

    async def log(self, budget_id: str, limit: int) -> list[Delivery]:
        """A budget's latest deliveries, newest first."""
        ids = [
            i.decode()
            for i in await call(self.client.lrange(self.keys.alert_log(budget_id), 0, limit - 1))
        ]

        def queue(pipe: Any) -> None:
            for delivery_id in ids:
                pipe.hgetall(self.keys.alert_delivery(delivery_id))

        replies = await pipeline(self.client, queue) if ids else []
        return [_delivery(i, fields) for i, fields in zip(ids, replies, strict=True) if fields]

    async def forget(self, budget_id: str) -> None:
        """A deleted budget's log (deliveries under way still go out)."""
        await call(self.client.delete(self.keys.alert_log(budget_id)))
