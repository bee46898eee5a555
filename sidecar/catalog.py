"""The identities as the API and the dashboard show them: records with their 30-day metrics,
listed newest first or ranked by usage, and erased with everything they own."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from sidecar import money
from sidecar.identity.aliases import Aliases
from sidecar.identity.listing import Listing, bound_after
from sidecar.identity.merge import find
from sidecar.identity.model import Identity, MetadataFilter, Metrics, Profile
from sidecar.identity.records import IdentityRecords
from sidecar.store.connect import RedisClient
from sidecar.store.keys import Keys
from sidecar.store.scripts import pipeline
from sidecar.usage import buckets
from sidecar.usage.counters import UsageCounters
from sidecar.usage.ranking import Rankings

Clock = Callable[[], float]

SORTS = ("created", "cost", "requests", "error_rate")
_RANK_CHUNK = 500  # ranked ids looked at per round trip when filters drop some
_META_CHUNK = 500  # ids whose records a metadata filter reads per round trip


class Page(msgspec.Struct):
    data: list[Identity]
    has_more: bool


def metrics(sums: dict[str, int]) -> Metrics:
    requests, errors = sums[buckets.REQUESTS], sums[buckets.ERRORS]
    return Metrics(
        total_cost=money.dollars(sums[buckets.COST]),
        total_tokens=sums[buckets.INPUT] + sums[buckets.OUTPUT],
        total_requests=requests,
        error_rate=round(errors / requests, 4) if requests else 0.0,
        input_tokens=sums[buckets.INPUT],
        output_tokens=sums[buckets.OUTPUT],
        rate_limited_requests=sums[buckets.RATE_LIMITED],
    )


def open_catalog(client: RedisClient, keys: Keys, clock: Clock = time.time) -> Catalog:
    """A catalog on its own, for tools that read the store without a running service."""
    records = IdentityRecords(client, keys, clock)
    return Catalog(
        records,
        Listing(client, keys),
        UsageCounters(client, keys, clock),
        Rankings(client, keys, clock),
        Aliases(client, keys, records),
    )


class Catalog:
    def __init__(
        self,
        records: IdentityRecords,
        listing: Listing,
        counters: UsageCounters,
        rankings: Rankings,
        aliases: Aliases,
    ) -> None:
        self.records = records
        self.aliases = aliases
        self.listing = listing
        self.counters = counters
        self.rankings = rankings
        self.client = records.client

    @property
    def clock(self) -> Clock:
        return self.records.clock

    async def with_metrics(self, ids: list[str]) -> list[Identity]:
        """The records of `ids` that exist, each with its 30-day metrics: one round trip."""
        if not ids:
            return []

        def queue(pipe: Any) -> None:
            for identity_id in ids:
                self.records.queue_read(pipe, identity_id)
                self.counters.queue_sums(pipe, identity_id)

        replies = await pipeline(self.client, queue, self.counters.scripts)
        out = []
        for n, identity_id in enumerate(ids):
            identity = self.records.decode(identity_id, replies[2 * n])
            if identity is None:
                continue  # deleted between the index read and this one
            identity.metrics = metrics(self.counters.sums_of(replies[2 * n + 1]))
            out.append(identity)
        return out

    async def identities(self, ids: list[str], include_metrics: bool) -> list[Identity]:
        return await (self.with_metrics(ids) if include_metrics else self.records.many(ids))

    def normalize(self, external_id: str) -> str:
        return self.aliases.normalize(external_id)

    async def get(self, ref: str, *, include_metrics: bool = False) -> Identity | None:
        """By `_id` or external id (normalized, or as stored); a merged identity's `_id` or
        external id answers with its survivor."""
        identity = await find(self.records, self.aliases, ref)
        if identity is None or not include_metrics:
            return identity
        found = await self.with_metrics([identity.id])
        return found[0] if found else None

    async def create(self, external_id: str, profile: Profile) -> Identity:
        return await self.records.create(self.normalize(external_id), profile)

    async def patch(self, identity: Identity, profile: Profile) -> Identity | None:
        return await self.records.patch(identity, profile)

    async def delete(self, identity: Identity) -> None:
        """Erasure: the record and its index entries, its usage, its places in the rankings.
        The record goes first, so that a usage write arriving meanwhile counts nothing."""
        await self.records.delete(identity)
        await self.aliases.erase(identity.id)
        await self.counters.erase(identity.id)
        await self.rankings.remove(identity.id)

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
        metadata: MetadataFilter | None = None,
    ) -> Page:
        """A page of the list: newest first, or by a 30-day ranking (`sort`, see SORTS).
        `metadata`: only identities it matches (a scan: their records are read in chunks
        until the page is full)."""
        cursor = starting_after or ending_before
        if cursor is not None:
            param = "starting_after" if starting_after else "ending_before"
            await self.listing.check_cursor(cursor, param)
        needle = (search or "").lower()
        if sort == "created" and metadata is not None:
            ids, has_more = await self._filtered(
                limit, cursor, ending_before is None, needle, list(tags), metadata
            )
        elif sort == "created":
            ids, has_more = await self.listing.page(
                limit=limit,
                starting_after=starting_after,
                ending_before=ending_before,
                needle=needle,
                tags=tags,
            )
        else:
            ids, has_more = await self._ranked(
                sort, limit, cursor, ending_before is None, needle, list(tags), metadata
            )
        return Page(data=await self.identities(ids, include_metrics), has_more=has_more)

    async def _kept(self, ids: list[str], metadata: MetadataFilter | None) -> list[str]:
        """The ids, in order, whose records `metadata` matches (all of them without one)."""
        if metadata is None or not ids:
            return ids
        return [i.id for i in await self.records.many(ids) if metadata.matches(i)]

    async def _filtered(
        self,
        limit: int,
        cursor: str | None,
        newest_first: bool,
        needle: str,
        tags: list[str],
        metadata: MetadataFilter,
    ) -> tuple[list[str], bool]:
        """Ids of one page in creation order that the metadata filter keeps."""
        bound = bound_after(cursor, newest_first) if cursor else ("+" if newest_first else "-")
        want = limit + 1
        found: list[str] = []
        while len(found) < want:
            ids = await self.listing.walk(bound, newest_first, needle, tags, _META_CHUNK)
            found += (await self._kept(ids, metadata))[: want - len(found)]
            if len(ids) < _META_CHUNK:
                break
            bound = bound_after(ids[-1], newest_first)
        page = found[:limit]
        return (page if newest_first else page[::-1]), len(found) > limit

    async def _ranked(
        self,
        sort: str,
        limit: int,
        cursor: str | None,
        forward: bool,
        needle: str,
        tags: list[str],
        metadata: MetadataFilter | None = None,
    ) -> tuple[list[str], bool]:
        """Ids of one page of the ranked listing: the ranking (highest first), then every
        identity it leaves out, newest first. A cursor is an `_id`; its place in the ranking
        is where the page continues, so a page is an offset into the ranking."""
        key = await self.rankings.ranking(sort)
        rank = None if cursor is None else await self.rankings.position(key, cursor)
        want = limit + 1
        found: list[str] = []
        if forward:
            if cursor is None or rank is not None:
                start = 0 if rank is None else rank + 1
                if await self._walk_ranking(key, start, None, needle, tags, want, found, metadata):
                    return found[:limit], True
                bound = "+"
            else:
                bound = bound_after(cursor, True)
            await self._walk_rest(key, bound, True, needle, tags, want, found, metadata)
            return found[:limit], len(found) > limit
        if rank is None:
            assert cursor is not None
            bound = bound_after(cursor, False)
            if await self._walk_rest(key, bound, False, needle, tags, want, found, metadata):
                return found[:limit][::-1], True
            end = await self.rankings.size(key)
        else:
            end = rank
        await self._walk_ranking(key, None, end, needle, tags, want, found, metadata)
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
        metadata: MetadataFilter | None = None,
    ) -> bool:
        """Add to `found` the ranked ids that match, from `start` on (or backwards from `end`,
        exclusive) until it holds `want`; True when it does."""
        step = want if not (needle or tags or metadata) else max(want, _RANK_CHUNK)
        while len(found) < want:
            if end is None:
                assert start is not None
                ids = await self.rankings.span(key, start, start + step - 1)
                start += step
            else:
                if end <= 0:
                    return False
                first = max(0, end - step)
                ids = (await self.rankings.span(key, first, end - 1))[::-1]
                end = first
            listed = await self._kept(await self.listing.listed(ids, needle, tags), metadata)
            found += listed[: want - len(found)]
            if end is None and len(ids) < step:
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
        metadata: MetadataFilter | None = None,
    ) -> bool:
        """Add to `found` the identities the ranking leaves out, from `bound` in creation
        order, until it holds `want`; True when it does."""
        while len(found) < want:
            n = want - len(found) if metadata is None else _META_CHUNK
            ids = await self.listing.walk(bound, newest_first, needle, tags, n)
            if not ids:
                break
            unranked = await self._kept(await self.rankings.unranked(key, ids), metadata)
            found += unranked[: want - len(found)]
            if len(ids) < n:
                break
            bound = bound_after(ids[-1], newest_first)
        return len(found) >= want
