"""A usage recorder and the stores it writes to, built by hand as services.build does."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from ulid import ULID

from sidecar.catalog import Catalog, open_catalog
from sidecar.identity.identify import Identifier
from sidecar.identity.model import Metrics, Profile
from sidecar.identity.records import IdentityRecords
from sidecar.store.keys import Keys
from sidecar.usage.backlog import Backlog
from sidecar.usage.ranking import Rankings
from sidecar.usage.recorder import Recorder
from sidecar.usage.spool import Spool
from sidecar.usage.writer import UsageWriter
from tests.support.clock import FakeClock

KEYS = Keys("sidecar")


class PatchedPool:
    """A connection pool whose connections, while handed out, have `patch(conn)`'s methods
    (a dict of name to replacement) in place of their own: to see or fail what a batch
    written straight to a connection (sidecar.store.scripts.batch) sends and reads."""

    def __init__(self, pool: Any, patch: Callable[[Any], dict[str, Any]]) -> None:
        self._pool = pool
        self._patch = patch

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    async def get_connection(self) -> Any:
        conn = await self._pool.get_connection()
        for name, method in self._patch(conn).items():
            setattr(conn, name, method)
        return conn

    async def release(self, conn: Any) -> None:
        for name in self._patch(conn):
            conn.__dict__.pop(name, None)  # the class's own again
        await self._pool.release(conn)


class NoPolicies:
    def remember(self, external_id: str, tags: list[str], metadata: dict[str, Any]) -> None:
        pass


async def identities(client: Redis, clock: FakeClock, *names: str) -> dict[str, str]:
    records = IdentityRecords(client, KEYS, clock)
    return {name: (await records.upsert(name, Profile()))[0].id for name in names}


def catalog(client: Redis, clock: FakeClock) -> Catalog:
    return open_catalog(client, KEYS, clock)


async def requests_of(client: Redis, ref: str, clock: FakeClock) -> dict[str, int]:
    found = await catalog(client, clock).get(ref, include_metrics=True)
    assert found is not None and isinstance(found.metrics, Metrics)
    return {"requests": found.metrics.total_requests, "input": found.metrics.input_tokens}


def writer_at(clock: FakeClock) -> str:
    return str(ULID.from_timestamp(clock()))


def recorder(
    client: Any,
    clock: FakeClock,
    spool_dir: Path | None,
    writer: str | None = None,
    spool_bytes: int = 1 << 24,
) -> Recorder:
    writer = writer or writer_at(clock)
    spool = Spool(spool_dir, writer, spool_bytes) if spool_dir else None
    identifier = Identifier(IdentityRecords(client, KEYS, clock), NoPolicies(), clock)
    usage = UsageWriter(client, KEYS, identifier, Rankings(client, KEYS, clock), clock)
    return Recorder(usage, Backlog(usage, spool), identifier, writer_id=writer, clock=clock)


def add(rec: Recorder, identity_id: str | None, external_id: str, n: int = 1) -> None:
    rec.add(identity_id, {"r": n, "i": 10 * n}, source="header", external_id=external_id)
