from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
from msgspec import UNSET
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, RedisError
from ulid import ULID

from sidecar.errors import Conflict, InvalidRequest, StoreUnavailable
from sidecar.identity.model import Identity, Metrics, Profile, rfc3339
from sidecar.store.connect import RedisClient
from sidecar.store.keys import Keys, xid_digest
from sidecar.store.scripts import Script
from sidecar.usage import buckets
from sidecar.usage.buckets import COUNTERS_LUA
from sidecar.usage.recorder import RANKED

Clock = Callable[[], float]

_ULID = re.compile(r"[0-7][0-9A-HJKMNP-TV-Z]{25}")
_FIELDS = {"display_name": "n", "email": "e", "avatar_url": "a"}
_SCAN_BUDGET = 10_000  # members one scan call reads: about 5 ms of Redis time per call
_CACHE_SIZE = 65_536  # external id -> _id mappings remembered per process
# List orders: creation (the order set), or a 30-day ranking from the top-spenders index.
SORTS = ("created", "cost", "requests", "error_rate")
RANKING_TTL_S = 60  # a ranking is built at most once a minute: pages of one listing agree
_RANKED_BY = {"cost": buckets.COST, "requests": buckets.REQUESTS}
_RANK_CHUNK = 500  # ranked ids looked at per round trip when filters drop some

_encode = msgspec.json.Encoder().encode
_decode_tags = msgspec.json.Decoder(list[str]).decode
_decode_metadata = msgspec.json.Decoder(dict[str, Any]).decode


def is_ulid(value: str) -> bool:
    return _ULID.fullmatch(value) is not None


_CROCKFORD = {c: n for n, c in enumerate("0123456789ABCDEFGHJKMNPQRSTVWXYZ")}


def ulid_ms(identity_id: str) -> int:
    """The creation time a ULID carries (its first ten characters), in epoch milliseconds."""
    ms = 0
    for char in identity_id[:10]:
        ms = ms * 32 + _CROCKFORD[char]
    return ms


def order_member(identity: Identity) -> str:
    """The identity's entry in the order set: its _id, then what search and tag filters read."""
    text = (identity.external_id, identity.display_name or "", identity.email or "")
    head = "\0".join(t.lower() for t in text)
    return f"{identity.id}\0{head}\1" + "".join(f"{t}\1" for t in identity.tags)


class Page(msgspec.Struct):
    data: list[Identity]
    has_more: bool


class IdentityStore:
    """Identity records and their indexes; the only code that knows their Redis layout."""

    def __init__(self, client: RedisClient, keys: Keys, clock: Clock = time.time) -> None:
        self.client = client
        self.keys = keys
        self.clock = clock
        # A single server runs a pipeline's commands in order; a cluster's nodes do not.
        self._in_order = not isinstance(client, RedisCluster)
        # An external id keeps its _id until the identity is deleted, so the mapping can be
        # remembered; every use checks the record's external id, and a stale entry is dropped.
        self._ids: OrderedDict[str, str] = OrderedDict()
        lua = "sidecar.identity.lua"
        self._merge, self._claim, self._reindex, self._unindex, self._scan, self._erase = (
            Script(lua, name) for name in ("merge", "claim", "reindex", "unindex", "scan", "erase")
        )
        self._read = Script(lua, "read", prelude=COUNTERS_LUA)

    async def load_scripts(self) -> None:
        for script in (
            self._merge,
            self._claim,
            self._reindex,
            self._unindex,
            self._scan,
            self._read,
            self._erase,
        ):
            await script.load(self.client)

    # -- reads ------------------------------------------------------------------------------

    async def id_for(self, external_id: str) -> str | None:
        raw = await self._call(self.client.hget(self.keys.external_ids, xid_digest(external_id)))
        if not raw:
            return None
        identity_id: str = raw.decode()
        self._remember(external_id, identity_id)
        return identity_id

    def known_id(self, external_id: str) -> str | None:
        """The `_id` this process last saw for the external id, without asking Redis."""
        return self._ids.get(external_id)

    def forget(self, external_id: str) -> None:
        self._ids.pop(external_id, None)

    def _remember(self, external_id: str, identity_id: str) -> None:
        self._ids[external_id] = identity_id
        self._ids.move_to_end(external_id)
        if len(self._ids) > _CACHE_SIZE:
            self._ids.popitem(last=False)

    async def get(self, ref: str, *, include_metrics: bool = False) -> Identity | None:
        """By `_id`, else by external id."""
        if is_ulid(ref):
            found = await self._records([ref], include_metrics)
            if found:
                return found[0]
        cached = self._ids.get(ref)
        if cached is not None:
            found = await self._records([cached], include_metrics)
            if found and found[0].external_id == ref:
                return found[0]
            self._ids.pop(ref, None)
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
        sort: str = "created",
    ) -> Page:
        """A page of the list: newest first, or by a 30-day ranking (`sort`, see SORTS)."""
        cursor = starting_after or ending_before
        if cursor is not None:
            param = "starting_after" if starting_after else "ending_before"
            if not is_ulid(cursor) or not await self._call(
                self.client.zrangebylex(self.keys.order, f"[{cursor}\0", f"({cursor}\1", 0, 1)
            ):
                raise InvalidRequest(f"{param}: no identity has _id {cursor[:64]!r}", param=param)
        if sort != "created":
            ids, has_more = await self._ranked(
                sort, limit, cursor, ending_before is None, (search or "").lower(), list(tags)
            )
            return Page(data=await self._records(ids, include_metrics), has_more=has_more)
        newest_first = ending_before is None
        if cursor:
            bound = f"({cursor}" if newest_first else f"({cursor}\1"
        else:
            bound = "+" if newest_first else "-"
        needle = (search or "").lower()
        if needle or tags:
            members = await self._scan_matching(bound, newest_first, needle, list(tags), limit + 1)
        elif newest_first:
            members = await self._call(
                self.client.zrevrangebylex(self.keys.order, bound, "-", start=0, num=limit + 1)
            )
        else:
            members = await self._call(
                self.client.zrangebylex(self.keys.order, bound, "+", start=0, num=limit + 1)
            )
        has_more = len(members) > limit
        ids = [m[:26].decode() for m in members[:limit]]
        if not newest_first:
            ids.reverse()
        return Page(data=await self._records(ids, include_metrics), has_more=has_more)

    async def _scan_matching(
        self, bound: str, newest_first: bool, needle: str, tags: list[str], want: int
    ) -> list[bytes]:
        found: list[bytes] = []
        while len(found) < want:
            args = [bound, "1" if newest_first else "0", needle, want - len(found), _SCAN_BUDGET]
            members, bound_raw = await self._run(self._scan, [self.keys.order], [*args, *tags])
            found += members
            bound = bound_raw.decode()
            if not bound:
                break
        return found

    # -- rankings (the top-spenders index the recorder keeps) -------------------------------

    async def ranking(self, sort: str) -> str:
        """The key of today's 30-day ranking for `sort` (_id -> score, zero scores left out),
        built from the daily top sets when it is missing or older than RANKING_TTL_S."""
        if sort not in _RANKED_BY and sort != "error_rate":
            raise ValueError(f"no ranking {sort!r}")
        now = self.clock()
        key = self.keys.ranking(sort, buckets.day(now))
        if await self._call(self.client.exists(key)):
            return key
        days = range(buckets.window(now)[0], buckets.day(now) + 1)
        if sort in _RANKED_BY:
            sources = [self.keys.top(_RANKED_BY[sort], day) for day in days]

            def union(pipe: Any) -> None:
                pipe.zunionstore(key, sources)
                pipe.expire(key, RANKING_TTL_S)

            await self._pipeline(union, [])
            return key
        # Errors / requests per identity; those without errors are not in it, so they follow.
        requests = await self.ranking("requests")
        errors = [self.keys.top(buckets.ERRORS, day) for day in days]
        failed = _pairs(await self._call(self.client.zunion(errors, withscores=True)))
        if not failed:
            return key
        members: list[Any] = [m for m, _ in failed]
        totals = await self._call(self.client.zmscore(requests, members))
        rates = {
            m: min(1.0, e / float(r)) if r else 1.0
            for (m, e), r in zip(failed, totals, strict=True)
        }
        staging = f"{key}:{ULID()}"

        def swap(pipe: Any) -> None:
            pipe.zadd(staging, rates)
            pipe.expire(staging, RANKING_TTL_S)
            pipe.rename(staging, key)  # readers see the old ranking or the new one, whole

        await self._pipeline(swap, [])
        return key

    async def _ranked(
        self, sort: str, limit: int, cursor: str | None, forward: bool, needle: str, tags: list[str]
    ) -> tuple[list[str], bool]:
        """Ids of one page of the ranked listing: the ranking (highest first), then every
        identity it leaves out, newest first. A cursor is an `_id`; its place in the ranking
        (ZREVRANK) is where the page continues, so a page is an offset into the ranking."""
        key = await self.ranking(sort)
        rank = None if cursor is None else await self._call(self.client.zrevrank(key, cursor))
        want = limit + 1
        found: list[str] = []
        if forward:
            if cursor is None or rank is not None:
                start = 0 if rank is None else int(rank) + 1
                if await self._walk_ranking(key, start, None, needle, tags, want, found):
                    return found[:limit], True
                bound = "+"
            else:
                bound = f"({cursor}"
            await self._walk_rest(key, bound, True, needle, tags, want, found)
            return found[:limit], len(found) > limit
        if rank is None:
            assert cursor is not None
            if await self._walk_rest(key, f"({cursor}\1", False, needle, tags, want, found):
                return found[:limit][::-1], True
            end = int(await self._call(self.client.zcard(key)))
        else:
            end = int(rank)
        await self._walk_ranking(key, None, end, needle, tags, want, found)
        return found[:limit][::-1], len(found) > limit

    async def _walk_ranking(
        self,
        key: str,
        start: int | None,
        end: int | None,
        needle: str,
        tags: list[str],
        want: int,
        found: list[str],
    ) -> bool:
        """Add to `found` the ranked ids that match, from `start` on (or backwards from `end`,
        exclusive) until it holds `want`; True when it does."""
        step = want if not (needle or tags) else max(want, _RANK_CHUNK)
        while len(found) < want:
            if end is None:
                assert start is not None
                raw = await self._call(self.client.zrevrange(key, start, start + step - 1))
                start += step
            else:
                if end <= 0:
                    return False
                first = max(0, end - step)
                raw = (await self._call(self.client.zrevrange(key, first, end - 1)))[::-1]
                end = first
            ids = [m.decode() for m in raw]
            found += (await self._listed(ids, needle, tags))[: want - len(found)]
            if end is None and len(raw) < step:
                break
        return len(found) >= want

    async def _walk_rest(
        self,
        key: str,
        bound: str,
        newest_first: bool,
        needle: str,
        tags: list[str],
        want: int,
        found: list[str],
    ) -> bool:
        """Add to `found` the identities the ranking leaves out, from `bound` in the order
        set, until it holds `want`; True when it does."""
        while len(found) < want:
            n = want - len(found)
            if needle or tags:
                members = await self._scan_matching(bound, newest_first, needle, tags, n)
            elif newest_first:
                members = await self._call(
                    self.client.zrevrangebylex(self.keys.order, bound, "-", start=0, num=n)
                )
            else:
                members = await self._call(
                    self.client.zrangebylex(self.keys.order, bound, "+", start=0, num=n)
                )
            if not members:
                break
            ids = [m[:26].decode() for m in members]
            scores = await self._call(self.client.zmscore(key, ids))
            found += [i for i, score in zip(ids, scores, strict=True) if score is None]
            if len(members) < n:
                break
            bound = f"({ids[-1]}" if newest_first else f"({ids[-1]}\1"
        return len(found) >= want

    async def _listed(self, ids: list[str], needle: str, tags: list[str]) -> list[str]:
        """The ids the order set still lists (a deleted identity may linger in a ranking for a
        minute) and that match the search and tags, in order."""
        if not ids:
            return []

        def queue(pipe: Any) -> None:
            for identity_id in ids:
                pipe.zrangebylex(self.keys.order, f"[{identity_id}\0", f"({identity_id}\1", 0, 1)

        replies = await self._pipeline(queue, [])
        return [
            identity_id
            for identity_id, reply in zip(ids, replies, strict=True)
            if reply and _matches(reply[0], needle, tags)
        ]

    async def _records(self, ids: list[str], include_metrics: bool) -> list[Identity]:
        if not ids:
            return []
        today = buckets.day(self.clock())

        def queue(pipe: Any) -> None:
            for identity_id in ids:
                keys = [self.keys.identity(identity_id)]
                if include_metrics:
                    keys.append(self.keys.usage_days(identity_id))
                self._read.queue(pipe, keys, [today])

        replies = await self._pipeline(queue, [self._read])
        out = []
        for identity_id, reply in zip(ids, replies, strict=True):
            if not reply[0]:
                continue  # deleted between the index read and this one
            identity = _identity(identity_id, reply[0])
            if include_metrics:
                identity.metrics = _metrics(reply[1])
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
        cached = self._ids.get(external_id)
        if cached is not None:
            updated = await self._update(cached, external_id, profile)
            if updated is not None:
                return updated, False
            self._ids.pop(external_id, None)
        for _ in range(5):
            candidate, args = self._candidate(external_id, profile)
            if self._in_order:
                # One round trip: write a candidate record and claim the external id for it.
                # A new identity is then done; a known one discards the candidate below.
                member = order_member(_fresh(candidate, external_id, profile))

                def write_and_claim(
                    pipe: Any,
                    candidate: str = candidate,
                    args: list[Any] = args,
                    member: str = member,
                ) -> None:
                    self._merge.queue(pipe, [self.keys.identity(candidate)], args)
                    self._claim.queue(
                        pipe,
                        [self.keys.external_ids, self.keys.order],
                        [xid_digest(external_id), candidate, member],
                    )

                scripts = [self._merge, self._claim]
                (_, _, record), owner = await self._pipeline(write_and_claim, scripts)
                if owner.decode() == candidate:
                    self._remember(external_id, candidate)
                    return _identity(candidate, record), True
                discard: str | None = candidate
            else:
                # On a cluster the record and the index live on different nodes, and a pipeline
                # does not order them: the record must exist before the claim makes it visible.
                def lookup_and_write(
                    pipe: Any, candidate: str = candidate, args: list[Any] = args
                ) -> None:
                    pipe.hget(self.keys.external_ids, xid_digest(external_id))
                    self._merge.queue(pipe, [self.keys.identity(candidate)], args)

                owner, (_, _, record) = await self._pipeline(lookup_and_write, [self._merge])
                discard = candidate
                if owner is None:
                    identity, created = await self._claim_for(
                        external_id, _identity(candidate, record)
                    )
                    if created:
                        return identity, True
                    owner, discard = identity.id.encode(), None
            updated = await self._update(owner.decode(), external_id, profile, discard=discard)
            if updated is not None:
                self._remember(external_id, updated.id)
                return updated, False
            await self._drop_stale(external_id, owner.decode())
        raise StoreUnavailable(f"identity {external_id!r} changed too often to update; retry")

    async def patch(self, identity: Identity, profile: Profile) -> Identity | None:
        if profile.is_empty():
            return identity
        return await self._update(identity.id, identity.external_id, profile)

    async def delete(self, identity: Identity) -> None:
        """Erase the record, its index entries and its usage buckets."""
        await self._run(
            self._unindex,
            [self.keys.external_ids, self.keys.order],
            [xid_digest(identity.external_id), identity.id],
        )
        self._ids.pop(identity.external_id, None)
        # Every hour bucket younger than its retention (and a margin) goes; older ones expired.
        last_hour = buckets.hour(self.clock())
        first_hour = last_hour - buckets.HOUR_RETENTION - 24
        await self._run(
            self._erase,
            [self.keys.identity(identity.id), self.keys.usage_days(identity.id)],
            [self.keys.usage_hours(identity.id), first_hour, last_hour + 1],
        )
        # The top-spenders index lives in the `{idx}` slot, out of the erase script's reach:
        # its days (and a day's margin each side), and the rankings built from them.
        today = buckets.day(self.clock())
        days = range(today - buckets.METRICS_DAYS - 1, today + 2)

        def unrank(pipe: Any) -> None:
            for day in days:
                for counter in RANKED:
                    pipe.zrem(self.keys.top(counter, day), identity.id)
            for sort in SORTS[1:]:
                for day in (today - 1, today, today + 1):
                    pipe.zrem(self.keys.ranking(sort, day), identity.id)

        await self._pipeline(unrank, [])

    def _candidate(self, external_id: str, profile: Profile) -> tuple[str, list[Any]]:
        candidate = str(ULID.from_timestamp(self.clock()))
        return candidate, [self._now_ms(), "1", external_id, *_field_args(profile)]

    async def _create(self, external_id: str, profile: Profile) -> tuple[Identity, bool]:
        """Write a new record, then claim the external id; the loser of a race backs out."""
        candidate, args = self._candidate(external_id, profile)
        status, _, record = await self._run(self._merge, [self.keys.identity(candidate)], args)
        assert status == b"created", status
        return await self._claim_for(external_id, _identity(candidate, record))

    async def _claim_for(self, external_id: str, identity: Identity) -> tuple[Identity, bool]:
        """Claim the external id for a freshly written record, or discard it for the owner's."""
        owner = await self._run(
            self._claim,
            [self.keys.external_ids, self.keys.order],
            [xid_digest(external_id), identity.id, order_member(identity)],
        )
        if owner.decode() == identity.id:
            self._remember(external_id, identity.id)
            return identity, True
        await self._discard(identity.id)
        identity.id = owner.decode()
        return identity, False

    async def _discard(self, candidate: str) -> None:
        await self._call(self.client.delete(self.keys.identity(candidate)))

    async def _update(
        self, identity_id: str, external_id: str, profile: Profile, *, discard: str | None = None
    ) -> Identity | None:
        """Overwrite the given fields; `discard` names an unused candidate record to delete in
        the same round trip."""

        def queue(pipe: Any) -> None:
            if discard is not None:
                pipe.delete(self.keys.identity(discard))
            self._merge.queue(
                pipe,
                [self.keys.identity(identity_id)],
                [self._now_ms(), "0", external_id, *_field_args(profile)],
            )

        status, _, record = (await self._pipeline(queue, [self._merge]))[-1]
        if status in (b"missing", b"conflict"):
            return None
        identity = _identity(identity_id, record)
        if status == b"updated" and (
            profile.display_name is not UNSET
            or profile.email is not UNSET
            or profile.tags is not UNSET
        ):
            await self._run(self._reindex, [self.keys.order], [identity_id, order_member(identity)])
        return identity

    async def _drop_stale(self, external_id: str, identity_id: str) -> None:
        """The index names a record that is gone (evicted, or lost to a crash): forget it."""
        await self._run(
            self._unindex,
            [self.keys.external_ids, self.keys.order],
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


def _fresh(identity_id: str, external_id: str, profile: Profile) -> Identity:
    """The record a create with this profile writes (for its index entry, before it exists)."""
    return Identity(
        id=identity_id,
        external_id=external_id,
        display_name=profile.display_name or None,
        email=profile.email or None,
        tags=profile.tags or [],
        created="",
        updated="",
    )


def _matches(member: bytes, needle: str, tags: Sequence[str]) -> bool:
    """scan.lua's test of an order-set member: the needle inside one of its text fields (which
    end at the first \\1), and any of the tags."""
    end = member.find(b"\1", 27)
    if needle and member.find(needle.encode(), 27, end) < 0:
        return False
    return not tags or any(f"\1{tag}\1".encode() in member[end:] for tag in tags)


def _pairs(reply: Any) -> list[tuple[bytes, float]]:
    """(member, score) pairs from a WITHSCORES reply, flat or paired (RESP2 or RESP3)."""
    if reply and not isinstance(reply[0], list | tuple):
        return [(reply[i], float(reply[i + 1])) for i in range(0, len(reply), 2)]
    return [(member, float(score)) for member, score in reply]


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
    created = ulid_ms(identity_id)
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
