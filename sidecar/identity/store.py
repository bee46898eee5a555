from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
from msgspec import UNSET
from redis.exceptions import NoScriptError, RedisError
from ulid import ULID

from sidecar.errors import Conflict, InvalidRequest, StoreUnavailable
from sidecar.identity.model import Identity, Metrics, Profile, rfc3339
from sidecar.store.connect import RedisClient
from sidecar.store.keys import Keys, xid_digest
from sidecar.store.scripts import Script
from sidecar.usage import buckets

Clock = Callable[[], float]

_ULID = re.compile(r"[0-7][0-9A-HJKMNP-TV-Z]{25}")
_FIELDS = {"display_name": "n", "email": "e", "avatar_url": "a"}
_SCAN_BUDGET = 2048  # identities one scan call looks at: bounds how long one call holds Redis
_METRIC_FIELDS = [
    buckets.REQUESTS,
    buckets.ERRORS,
    buckets.INPUT,
    buckets.OUTPUT,
    buckets.COST,
    buckets.RATE_LIMITED,
]

_encode = msgspec.json.Encoder().encode
_decode_tags = msgspec.json.Decoder(list[str]).decode
_decode_metadata = msgspec.json.Decoder(dict[str, Any]).decode


def is_ulid(value: str) -> bool:
    return _ULID.fullmatch(value) is not None


def search_text(external_id: str, name: str | None, email: str | None, tags: list[str]) -> str:
    head = "\0".join((external_id.lower(), (name or "").lower(), (email or "").lower()))
    return head + "\1" + "".join(f"{t}\1" for t in tags)


class Page(msgspec.Struct):
    data: list[Identity]
    has_more: bool


class IdentityStore:
    """Identity records and their indexes; the only code that knows their Redis layout."""

    def __init__(self, client: RedisClient, keys: Keys, clock: Clock = time.time) -> None:
        self.client = client
        self.keys = keys
        self.clock = clock
        self._merge = Script("sidecar.identity.lua", "merge")
        self._claim = Script("sidecar.identity.lua", "claim")
        self._reindex = Script("sidecar.identity.lua", "reindex")
        self._unindex = Script("sidecar.identity.lua", "unindex")
        self._scan = Script("sidecar.identity.lua", "scan")
        self._metrics = Script("sidecar.usage.lua", "metrics")
        self._scripts = [self._merge, self._claim, self._reindex, self._unindex, self._scan]

    async def load_scripts(self) -> None:
        for script in [*self._scripts, self._metrics]:
            await script.load(self.client)

    # -- reads ------------------------------------------------------------------------------

    async def id_for(self, external_id: str) -> str | None:
        raw = await self._call(self.client.hget(self.keys.external_ids, xid_digest(external_id)))
        return raw.decode() if raw else None

    async def get(self, ref: str, *, include_metrics: bool = False) -> Identity | None:
        """By `_id`, else by external id."""
        if is_ulid(ref):
            found = await self._records([ref], include_metrics)
            if found:
                return found[0]
        identity_id = await self.id_for(ref)
        if identity_id is None:
            return None
        found = await self._records([identity_id], include_metrics)
        if found and found[0].external_id == ref:
            return found[0]
        return None

    async def page(
        self,
        *,
        limit: int = 10,
        starting_after: str | None = None,
        ending_before: str | None = None,
        search: str | None = None,
        tags: Sequence[str] = (),
        include_metrics: bool = False,
    ) -> Page:
        cursor = starting_after or ending_before
        if cursor is not None:
            param = "starting_after" if starting_after else "ending_before"
            exists = is_ulid(cursor) and await self._call(
                self.client.zscore(self.keys.order, cursor)
            )
            if exists is None or exists is False:
                raise InvalidRequest(f"{param}: no identity has _id {cursor[:64]!r}", param=param)
        newest_first = ending_before is None
        bound = f"({cursor}" if cursor else ("+" if newest_first else "-")
        needle = (search or "").lower()
        if needle or tags:
            ids = await self._scan_matching(bound, newest_first, needle, list(tags), limit + 1)
        elif newest_first:
            raw = await self._call(
                self.client.zrevrangebylex(self.keys.order, bound, "-", start=0, num=limit + 1)
            )
            ids = [i.decode() for i in raw]
        else:
            raw = await self._call(
                self.client.zrangebylex(self.keys.order, bound, "+", start=0, num=limit + 1)
            )
            ids = [i.decode() for i in raw]
        has_more = len(ids) > limit
        ids = ids[:limit]
        if not newest_first:
            ids.reverse()
        return Page(data=await self._records(ids, include_metrics), has_more=has_more)

    async def _scan_matching(
        self, bound: str, newest_first: bool, needle: str, tags: list[str], want: int
    ) -> list[str]:
        found: list[str] = []
        while len(found) < want:
            args = [bound, "1" if newest_first else "0", needle, want - len(found), _SCAN_BUDGET]
            ids, bound_raw = await self._run(
                self._scan, [self.keys.order, self.keys.search], [*args, *tags]
            )
            found += [i.decode() for i in ids]
            bound = bound_raw.decode()
            if not bound:
                break
        return found

    async def _records(self, ids: list[str], include_metrics: bool) -> list[Identity]:
        if not ids:
            return []
        days = buckets.last_days(self.clock()) if include_metrics else []

        def queue(pipe: Any) -> None:
            for identity_id in ids:
                pipe.hgetall(self.keys.identity(identity_id))
                if include_metrics:
                    day_keys = [self.keys.usage_day(identity_id, d) for d in days]
                    self._metrics.queue(pipe, day_keys, _METRIC_FIELDS)

        replies = await self._pipeline(queue, [self._metrics] if include_metrics else [])
        step = 2 if include_metrics else 1
        out = []
        for n, identity_id in enumerate(ids):
            record = replies[n * step]
            if not record:
                continue  # deleted between the index read and this one
            identity = _identity(identity_id, record)
            if include_metrics:
                identity.metrics = _metrics(replies[n * step + 1])
            out.append(identity)
        return out

    # -- writes -----------------------------------------------------------------------------

    async def create(self, external_id: str, profile: Profile) -> Identity:
        owner = await self.id_for(external_id)
        if owner is not None:
            if await self._exists(owner):
                raise Conflict(f"identity {external_id!r} already exists", param="external_id")
            await self._drop_stale(external_id, owner)
        identity, created = await self._create(external_id, profile)
        if not created:
            raise Conflict(f"identity {external_id!r} already exists", param="external_id")
        return identity

    async def upsert(self, external_id: str, profile: Profile) -> tuple[Identity, bool]:
        """Create the identity, or overwrite the given fields; True when it was created."""
        for _ in range(5):
            owner = await self.id_for(external_id)
            if owner is not None:
                updated = await self._update(owner, external_id, profile)
                if updated is not None:
                    return updated, False
                await self._drop_stale(external_id, owner)
            identity, created = await self._create(external_id, profile)
            if created:
                return identity, True
            updated = await self._update(identity.id, external_id, profile)
            if updated is not None:
                return updated, False
        raise StoreUnavailable(f"identity {external_id!r} changed too often to update; retry")

    async def patch(self, identity: Identity, profile: Profile) -> Identity | None:
        if profile.is_empty():
            return identity
        return await self._update(identity.id, identity.external_id, profile)

    async def delete(self, identity: Identity) -> None:
        """Erase the record, its index entries and its usage buckets."""
        await self._run(
            self._unindex,
            [self.keys.external_ids, self.keys.order, self.keys.search],
            [xid_digest(identity.external_id), identity.id],
        )
        now = self.clock()
        keys = [self.keys.identity(identity.id)]
        keys += [self.keys.usage_day(identity.id, d) for d in buckets.last_days(now, 40)]
        keys += [self.keys.usage_hour(identity.id, h) for h in buckets.last_hours(now, 40 * 24)]
        # Every key shares the identity's hash tag, so one DEL is one slot even on a cluster.
        await self._call(self.client.delete(*keys))

    async def _create(self, external_id: str, profile: Profile) -> tuple[Identity, bool]:
        """Write a new record, then claim the external id; the loser of a race backs out."""
        candidate = str(ULID.from_timestamp(self.clock()))
        status, _, record = await self._run(
            self._merge,
            [self.keys.identity(candidate)],
            [self._now_ms(), "1", external_id, *_field_args(profile)],
        )
        assert status == b"created", status
        identity = _identity(candidate, record)
        text = search_text(external_id, identity.display_name, identity.email, identity.tags)
        owner = await self._run(
            self._claim,
            [self.keys.external_ids, self.keys.order, self.keys.search],
            [xid_digest(external_id), candidate, text],
        )
        if owner.decode() == candidate:
            return identity, True
        await self._call(self.client.delete(self.keys.identity(candidate)))
        identity.id = owner.decode()
        return identity, False

    async def _update(
        self, identity_id: str, external_id: str, profile: Profile
    ) -> Identity | None:
        status, _, record = await self._run(
            self._merge,
            [self.keys.identity(identity_id)],
            [self._now_ms(), "0", external_id, *_field_args(profile)],
        )
        if status in (b"missing", b"conflict"):
            return None
        identity = _identity(identity_id, record)
        if status == b"updated" and (
            profile.display_name is not UNSET
            or profile.email is not UNSET
            or profile.tags is not UNSET
        ):
            text = search_text(external_id, identity.display_name, identity.email, identity.tags)
            await self._run(self._reindex, [self.keys.order, self.keys.search], [identity_id, text])
        return identity

    async def _drop_stale(self, external_id: str, identity_id: str) -> None:
        """The index names a record that is gone (evicted, or lost to a crash): forget it."""
        await self._run(
            self._unindex,
            [self.keys.external_ids, self.keys.order, self.keys.search],
            [xid_digest(external_id), identity_id],
        )

    async def _exists(self, identity_id: str) -> bool:
        return bool(await self._call(self.client.exists(self.keys.identity(identity_id))))

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    # -- Redis edge -------------------------------------------------------------------------

    async def _call(self, awaitable: Any) -> Any:
        try:
            return await awaitable
        except RedisError as exc:
            raise StoreUnavailable(f"identity store unavailable: {type(exc).__name__}") from exc

    async def _run(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        return await self._call(script(self.client, keys, args))

    async def _pipeline(self, queue: Callable[[Any], None], scripts: list[Script]) -> list[Any]:
        for script in scripts:
            if script.sha is None:
                await self._call(script.load(self.client))
        for attempt in range(2):
            pipe = self.client.pipeline(transaction=False)
            queue(pipe)
            try:
                return list(await pipe.execute())
            except NoScriptError:
                if attempt:
                    raise
                for script in scripts:
                    await self._call(script.load(self.client))
            except RedisError as exc:
                raise StoreUnavailable(f"identity store unavailable: {type(exc).__name__}") from exc
        raise AssertionError("unreachable")


def _field_args(profile: Profile) -> list[str]:
    args: list[str] = []
    for name, field in _FIELDS.items():
        value = getattr(profile, name)
        if value is not UNSET:
            args += [field, value or ""]
    if profile.tags is not UNSET:
        args += ["t", _encode(profile.tags).decode() if profile.tags else ""]
    if profile.metadata is not UNSET:
        args += ["m", _encode(profile.metadata).decode() if profile.metadata else ""]
    return args


def _identity(identity_id: str, record: Any) -> Identity:
    if isinstance(record, list):
        record = dict(zip(record[::2], record[1::2], strict=True))
    text = {k.decode(): v for k, v in record.items()}
    created = ULID.from_str(identity_id).milliseconds
    return Identity(
        id=identity_id,
        external_id=text["x"].decode(),
        display_name=text["n"].decode() if "n" in text else None,
        email=text["e"].decode() if "e" in text else None,
        avatar_url=text["a"].decode() if "a" in text else None,
        tags=_decode_tags(text["t"]) if "t" in text else [],
        metadata=_decode_metadata(text["m"]) if "m" in text else {},
        created=rfc3339(created),
        updated=rfc3339(int(text["u"])),
    )


def _metrics(sums: list[bytes]) -> Metrics:
    requests, errors, input_tokens, output_tokens, cost, limited = (int(v) for v in sums)
    return Metrics(
        total_cost=cost / 1e9,
        total_tokens=input_tokens + output_tokens,
        total_requests=requests,
        error_rate=round(errors / requests, 4) if requests else 0.0,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        rate_limited_requests=limited,
    )
