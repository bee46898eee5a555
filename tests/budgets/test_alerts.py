"""Budget alerts against the real store and a real HTTP receiver on loopback: thresholds fire
once per period (again after a rollover, a reset or a changed amount), deliveries are signed,
retried with backoff, logged, sent by one process at a time, and given up after an hour."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
import pytest
from redis.asyncio import Redis

from sidecar.budgets import notify
from sidecar.budgets.alerts import AlertScanner, signature
from sidecar.budgets.model import BudgetCreate, BudgetPatch, BudgetView
from sidecar.budgets.notify import AlertSender, next_attempt
from sidecar.budgets.outbox import Outbox
from sidecar.budgets.service import Budgets
from sidecar.budgets.store import BudgetStore
from sidecar.settings import NotifierSettings
from sidecar.store.keys import Keys
from tests.support.clock import FakeClock
from tests.support.receiver import Receiver

SECRET = "a-shared-secret-0123456789"


@dataclass
class Node:
    """One sidecar's alert machinery."""

    budgets: Budgets
    scanner: AlertScanner
    sender: AlertSender


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    made = await Receiver().start()
    yield made
    await made.close()


class Nodes:
    def __init__(self, redis: Redis, clock: FakeClock, receiver: Receiver) -> None:
        self.redis, self.clock, self.receiver = redis, clock, receiver
        self.made: list[Node] = []

    async def node(
        self, fmt: Literal["json", "slack"] = "json", secret: str | None = SECRET
    ) -> Node:
        keys = Keys("sidecar")
        store = BudgetStore(self.redis, keys, self.clock)
        outbox = Outbox(self.redis, keys, self.clock)
        budgets = Budgets(store, outbox, self.clock)
        notifiers = [
            NotifierSettings(name="ops", url=self.receiver.url + "/hook", secret=secret, format=fmt)
        ]
        sender = AlertSender(outbox, notifiers, self.clock)
        await sender.open()
        made = Node(
            budgets, AlertScanner(budgets, store, outbox, sender, notifiers, self.clock), sender
        )
        self.made.append(made)
        return made

    async def close(self) -> None:
        for node in self.made:
            await node.sender.close()


@pytest.fixture
async def nodes(redis: Redis, clock: FakeClock, receiver: Receiver) -> AsyncIterator[Nodes]:
    made = Nodes(redis, clock, receiver)
    yield made
    await made.close()


async def create(node: Node, **fields: Any) -> BudgetView:
    raw = {"scope": {"kind": "identity", "target": "ann"}, **fields}
    return await node.budgets.create(msgspec.convert(raw, BudgetCreate))


async def charge(redis: Redis, node: Node, budget_id: str, amount: int, clock: FakeClock) -> None:
    """What the settlement adds to the budget's cost bucket (else its token bucket)."""
    stored = await node.budgets.store.get(budget_id)
    assert stored is not None
    keys = node.budgets.store.bucket_keys(stored, int(clock() * 1000))
    key = next(k for k in keys if ":c:" in k or ":t:" in k)
    await redis.incrby(key, amount)


async def cycle(*nodes: Node) -> int:
    """Each node scans, then each sends what is due: the alerts fired."""
    fired = 0
    for node in nodes:
        await node.budgets.refresh()
        fired += await node.scanner.scan()
    for node in nodes:
        await node.sender.step()
    return fired


def test_retries_double_up_to_five_minutes_and_stop_after_an_hour() -> None:
    created = 1_000_000
    waits: list[int] = []
    now = created
    while (retry := next_attempt(len(waits) + 1, created, now)) is not None:
        waits.append((retry - now) // 1000)
        now = retry
    assert waits[:10] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]
    assert set(waits[10:-1]) == {300}
    assert now == created + 3_600_000  # the last attempt is an hour after the alert fired
    assert len(waits) < 25


async def test_a_threshold_fires_once_signed_as_the_spec_says(
    nodes: Nodes, redis: Redis, clock: FakeClock, receiver: Receiver
) -> None:
    node = await nodes.node()
    made = await create(
        node, token_limit=1000, alerts=[{"threshold_percent": 50}, {"threshold_percent": 100}]
    )
    await node.budgets.refresh()
    node.budgets.subjects("ann", [], None)  # a request of ann's was checked against it
    await charge(redis, node, made.id, 499, clock)
    assert await cycle(node) == 0
    await charge(redis, node, made.id, 1, clock)
    assert await cycle(node) == 1
    assert await cycle(node) == 0  # once
    (got,) = receiver.delivered()
    assert got.path == "/hook" and got.headers["Content-Type"] == "application/json"
    expected = hmac.new(SECRET.encode(), got.body, hashlib.sha256).hexdigest()
    assert got.headers["x-sidecar-signature"] == expected == signature(SECRET, got.body)
    body = json.loads(got.body)
    assert set(body) == {
        "event", "id", "budget", "identity", "threshold_percent", "consumed_usd",
        "consumed_tokens", "at",
    }  # fmt: skip
    assert (body["event"], body["identity"], body["threshold_percent"]) == (
        "budget.threshold_crossed", "ann", 50,
    )  # fmt: skip
    assert (body["consumed_usd"], body["consumed_tokens"]) == (None, 500)
    assert body["budget"]["_id"] == made.id and body["budget"]["consumption"]["tokens"] == 500
    assert body["at"] == "2026-11-18T11:06:40Z"

    await charge(redis, node, made.id, 600, clock)
    assert await cycle(node) == 1
    second = receiver.bodies()[-1]
    assert second["threshold_percent"] == 100 and second["id"] != body["id"]
    log = await node.budgets.deliveries(made.id, 10)
    assert [(d.threshold_percent, d.status, d.attempts, d.notifier) for d in log] == [
        (100, "delivered", 1, "ops"), (50, "delivered", 1, "ops"),
    ]  # fmt: skip
    assert log[1].alert_id == body["id"] and log[1].delivered_at is not None
    assert log[1].identity == "ann" and log[1].last_error is None


async def test_again_after_a_reset_a_changed_amount_and_a_rollover(
    nodes: Nodes, redis: Redis, clock: FakeClock, receiver: Receiver
) -> None:
    node = await nodes.node()
    made = await create(node, amount_usd=10, alerts=[{"threshold_percent": 80}])
    await charge(redis, node, made.id, 9 * 10**9, clock)
    assert await cycle(node) == 1
    assert await cycle(node) == 0
    await node.budgets.reset(made.id)
    assert await cycle(node) == 0  # nothing used since the reset
    await charge(redis, node, made.id, 8 * 10**9, clock)
    assert await cycle(node) == 1  # re-armed by the reset
    # A higher amount re-arms: 8 of 20 is under 80%, until it is not.
    await node.budgets.patch(made.id, msgspec.convert({"amount_usd": 20}, BudgetPatch))
    assert await cycle(node) == 0
    await charge(redis, node, made.id, 8 * 10**9, clock)
    assert await cycle(node) == 1
    # A change that is not the amount does not.
    await node.budgets.patch(made.id, msgspec.convert({"requests_per_minute": 5}, BudgetPatch))
    assert await cycle(node) == 0
    # The next month starts empty, and fires again.
    clock.advance(31 * 86_400)
    assert await cycle(node) == 0
    await charge(redis, node, made.id, 17 * 10**9, clock)
    assert await cycle(node) == 1
    assert [b["consumed_usd"] for b in receiver.bodies()] == [9.0, 8.0, 16.0, 17.0]


async def test_two_processes_fire_and_send_each_alert_once(
    nodes: Nodes, redis: Redis, clock: FakeClock, receiver: Receiver
) -> None:
    one, two = await nodes.node(), await nodes.node()
    budgets = [
        await create(
            one, token_limit=100, alerts=[{"threshold_percent": 50}, {"threshold_percent": 90}]
        )
        for _ in range(5)
    ]
    for made in budgets:
        await charge(redis, one, made.id, 95, clock)  # both thresholds at once
    assert await cycle(one, two) == 10
    assert await cycle(two, one) == 0
    assert len(receiver.delivered()) == 10
    assert len({b["id"] for b in receiver.bodies()}) == 10
    # One of them holds the lease and sends; the other does not.
    assert {one.sender.leading, two.sender.leading} == {True, False}
    assert one.sender.sent + two.sender.sent == 10


async def test_a_failing_receiver_is_retried_with_backoff_across_a_restart(
    nodes: Nodes, redis: Redis, clock: FakeClock, receiver: Receiver
) -> None:
    receiver.fail_first = 2
    first = await nodes.node()
    made = await create(first, token_limit=10, alerts=[{"threshold_percent": 100}])
    await charge(redis, first, made.id, 10, clock)
    assert await cycle(first) == 1
    (attempt,) = await first.budgets.deliveries(made.id, 10)
    assert (attempt.status, attempt.attempts, attempt.last_error, attempt.last_http_status) == (
        "pending", 1, "HTTP 503", 503,
    )  # fmt: skip
    assert attempt.next_attempt_at == "2026-11-18T11:06:41Z"  # a second later
    await first.sender.step()
    assert len(receiver.received) == 1  # not due yet
    # The process stops (it gives its lease back); another one takes over the outbox.
    await first.sender.close()
    second = await nodes.node()
    clock.advance(1)
    await second.sender.step()
    assert len(receiver.received) == 2
    (attempt,) = await second.budgets.deliveries(made.id, 10)
    assert (attempt.attempts, attempt.next_attempt_at) == (2, "2026-11-18T11:06:43Z")
    clock.advance(2)
    await second.sender.step()
    (attempt,) = await second.budgets.deliveries(made.id, 10)
    assert (attempt.status, attempt.attempts, attempt.last_error) == ("delivered", 3, None)
    assert attempt.next_attempt_at is None
    assert len(receiver.received) == 3 and len({r.body for r in receiver.received}) == 1
    clock.advance(600)
    await second.sender.step()
    assert len(receiver.received) == 3  # delivered: never again


async def test_a_delivery_is_given_up_an_hour_after_its_alert(
    nodes: Nodes, redis: Redis, clock: FakeClock, receiver: Receiver
) -> None:
    receiver.fail_first = 10**6
    node = await nodes.node()
    made = await create(node, token_limit=10, alerts=[{"threshold_percent": 100}])
    await charge(redis, node, made.id, 10, clock)
    await cycle(node)
    for _ in range(40):
        clock.advance(notify.RETRY_MAX_S)
        await node.sender.step()
    (attempt,) = await node.budgets.deliveries(made.id, 10)
    assert attempt.status == "failed" and attempt.next_attempt_at is None
    # Every 5 minutes for an hour (the short first waits pass unseen between steps).
    assert attempt.attempts == 13
    assert attempt.last_attempt_at is not None
    attempts = len(receiver.received)
    clock.advance(3600)
    await node.sender.step()
    assert len(receiver.received) == attempts


async def test_slack_format_and_an_unreachable_notifier(
    nodes: Nodes, redis: Redis, clock: FakeClock, receiver: Receiver
) -> None:
    node = await nodes.node(fmt="slack", secret=None)
    made = await create(
        node,
        scope={"kind": "tag", "target": "team-a"},
        amount_usd=50,
        token_limit=1000,
        alerts=[{"threshold_percent": 75}],
    )
    await charge(redis, node, made.id, 40 * 10**9, clock)
    assert await cycle(node) == 1
    (got,) = receiver.delivered()
    assert "x-sidecar-signature" not in got.headers
    text = json.loads(got.body)["text"]
    assert text.startswith(f"Budget {made.id} for tag team-a reached 75%: $40.00 of $50.00")
    assert "resets 2026-12-01T00:00:00Z" in text

    await receiver.close()  # nobody listens any more
    other = await create(node, token_limit=10, alerts=[{"threshold_percent": 100}])
    await charge(redis, node, other.id, 10, clock)
    assert await cycle(node) == 1
    (attempt,) = await node.budgets.deliveries(other.id, 10)
    assert attempt.status == "pending" and attempt.last_error is not None
    assert attempt.last_error.startswith("cannot connect")
    assert receiver.url not in attempt.last_error


async def test_no_alert_for_budgets_without_thresholds_or_out_of_force(
    nodes: Nodes, redis: Redis, clock: FakeClock, receiver: Receiver
) -> None:
    node = await nodes.node()
    plain = await create(node, token_limit=10)
    inactive = await create(
        node, token_limit=10, alerts=[{"threshold_percent": 10}], is_active=False
    )
    rpm_only = await create(node, requests_per_minute=1, alerts=[{"threshold_percent": 10}])
    for made in (plain, inactive):
        await charge(redis, node, made.id, 10, clock)
    assert rpm_only.amount_usd is None
    assert await cycle(node) == 0
    assert receiver.received == []
