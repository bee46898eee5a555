"""The Redis layout of budgets and alerts: the keys, their slots and their lifetimes."""

from __future__ import annotations

import msgspec
from redis.asyncio import Redis

from sidecar.budgets import model
from sidecar.budgets.model import Budget, BudgetCreate
from sidecar.budgets.outbox import KEPT_S, Fire, Outbox, Outcome
from sidecar.budgets.store import BudgetStore
from sidecar.quota.decision import Subject
from sidecar.quota.limiter import Limiter
from sidecar.quota.windows import ONCE_DAYS
from sidecar.store.keys import Keys, xid_digest
from tests.support.clock import FakeClock

ID = "01JDQ6ZK3N4X8V2B7C9D0E1F2G"


async def names(redis: Redis) -> list[str]:
    return sorted(k.decode() if isinstance(k, bytes) else k for k in await redis.keys("*"))


def budget(clock: FakeClock, **fields: object) -> Budget:
    raw = {"scope": {"kind": "tag", "target": "team:{a}"}, "amount_usd": 5, **fields}
    data = msgspec.convert(raw, BudgetCreate)
    return model.created(data, budget_id=ID, now_ms=int(clock() * 1000))


async def test_records_and_indexes_share_one_slot_and_bump_the_generation(
    redis: Redis, clock: FakeClock
) -> None:
    store = BudgetStore(redis, Keys("sidecar"), clock)
    made = budget(clock)
    await store.create(made)
    digest = xid_digest("team:{a}")  # no key embeds a raw target
    assert await names(redis) == [
        "sidecar:{budgets}:all",
        f"sidecar:{{budgets}}:b:{ID}",
        "sidecar:{budgets}:gen",
        "sidecar:{budgets}:k:tag",
        f"sidecar:{{budgets}}:s:tag:{digest}",
    ]
    raw = await redis.get(f"sidecar:{{budgets}}:b:{ID}")
    assert raw is not None and msgspec.json.decode(raw, type=Budget) == made
    assert await redis.ttl(f"sidecar:{{budgets}}:b:{ID}") == -1  # kept until deleted
    assert await store.generation() == 1
    assert await store.update(msgspec.structs.replace(made, amount_nanos=1), rearm=True)
    assert await store.arm(ID) == 1 and await store.generation() == 2
    assert await store.delete(made)
    assert await names(redis) == ["sidecar:{budgets}:gen"]
    assert await store.generation() == 3
    assert not await store.update(made, rearm=False)  # gone: nothing written
    assert not await store.delete(made)
    assert await names(redis) == ["sidecar:{budgets}:gen"]


async def test_buckets_are_the_limiters_and_a_one_time_one_lives_ten_years(
    redis: Redis, clock: FakeClock
) -> None:
    keys = Keys("sidecar")
    store = BudgetStore(redis, keys, clock)
    limiter = Limiter(redis, keys, timeout_ms=1000, on_error="allow", lease_s=60, clock=clock)
    credit = budget(clock, period="one_time", token_limit=100, requests_per_minute=5)
    subject = Subject(ID, "ann", model.as_policy(credit), budget=ID)
    decision = await limiter.admit([subject], "01JDQ6ZK3N4X8V2B7C9D0E1F2H")
    assert decision.admitted
    now_ms = int(clock() * 1000)
    cost, tokens, current, previous = store.bucket_keys(credit, now_ms)
    assert (cost, tokens) == (f"sidecar:rl:{{{ID}}}:c:once:0", f"sidecar:rl:{{{ID}}}:t:once:0")
    assert await redis.get(current) == b"1"  # the request admission counted
    assert previous.startswith(f"sidecar:rl:{{{ID}}}:r:60:")
    # What the settlement charges lands in them, and a one-time bucket lives ten years.
    await limiter.settle([subject], "01JDQ6ZK3N4X8V2B7C9D0E1F2H", 40, 10**9)
    for key in (cost, tokens):
        assert await redis.ttl(key) >= (ONCE_DAYS - 1) * 86_400
    # What the API shows is what the limiter reads.
    (used,) = await store.consumption([credit], now_ms)
    usage = await limiter.usage(ID, subject.policy)
    assert (used.cost_nanos, used.tokens) == (10**9, 40)
    assert [item.used for item in usage.limits] == [10**9, 40, 1]
    await redis.set(cost, 10**9)
    assert await store.reset(credit) is False  # not stored: the buckets go, nothing re-arms
    assert await redis.exists(cost, tokens, current) == 0


async def test_a_fired_marker_lasts_its_period_and_a_finished_delivery_30_days(
    redis: Redis, clock: FakeClock
) -> None:
    outbox = Outbox(redis, Keys("sidecar"), clock)
    fire = Fire(
        budget_id=ID, threshold=80, period="202611", arm=0, marker_s=12 * 86_400 + 86_400,
        alert_id="A", identity="ann", deliveries=[("D1", "ops", b"{}"), ("D2", "slack", b"{}")],
    )  # fmt: skip
    assert await outbox.fire([fire, fire]) == [True, False]  # the second saw the marker
    marker = f"sidecar:{{alerts}}:f:{ID}:80:202611:0"
    assert 13 * 86_400 - 5 <= await redis.ttl(marker) <= 13 * 86_400
    assert await redis.zrange("sidecar:{alerts}:outbox", 0, -1) == [b"D1", b"D2"]
    assert await redis.lrange(f"sidecar:{{alerts}}:log:{ID}", 0, -1) == [b"D2", b"D1"]
    assert await redis.ttl("sidecar:{alerts}:d:D1") == -1  # pending: kept
    assert await outbox.lease("me", 30_000) and not await outbox.lease("you", 30_000)
    assert await outbox.claim("you", 10, 60_000) is None
    claimed = await outbox.claim("me", 10, 60_000)
    assert claimed is not None and [p.id for p in claimed] == ["D1", "D2"]
    assert await outbox.claim("me", 10, 60_000) == []  # held while they are sent
    await outbox.finish([Outcome(id="D1", step="delivered", http_status=204)])
    assert KEPT_S - 5 <= await redis.ttl("sidecar:{alerts}:d:D1") <= KEPT_S
    assert await redis.zrange("sidecar:{alerts}:outbox", 0, -1) == [b"D2"]
    await outbox.drop("me")
    assert await redis.exists("sidecar:{alerts}:sender") == 0
