"""Merging one identity into another: its record becomes an alias of the survivor's, and
everything it owns moves into the survivor (docs/api.md#merging-identities).

A merge is a journal (Keys.merge_journal) and a fixed sequence of steps, each safe to run
again, so that a merge cut short (the store went away, the process died) is finished by the
next attempt without counting anything twice:

1. the survivor's slot learns the merged external ids (a profile write naming one of them
   updates the survivor from here on);
2. one script in the `{idx}` slot writes the journal, makes the merged external id and `_id`
   aliases of the survivor (the external-id index names the survivor), and takes the merged
   identity out of the list and the search index: from this step on no request can create it
   again, and every lookup of it finds the survivor;
3. the survivor's empty profile fields are filled from the merged one;
4. the merged record is deleted: a usage write for its `_id` is refused from then on, and the
   writer counts it again under the external id's identity, the survivor (usage/recorder.py);
5. each Mover (usage, limit windows, budgets) moves its part; those that cross slots mark
   in the survivor's slot what they added, in the same script, so a retry adds nothing twice;
6. the journal is marked done.

Merges run one at a time (a lock in the `{idx}` slot), and unfinished ones are finished before
the next starts, so a chain (A into B, then B into C) leaves A's alias naming C."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import msgspec
from ulid import ULID

from sidecar.errors import Conflict, NotFound
from sidecar.identity import model
from sidecar.identity.aliases import Aliases
from sidecar.identity.model import Identity, Profile
from sidecar.identity.records import IdentityRecords, index_prelude, is_ulid
from sidecar.store.errors import call
from sidecar.store.keys import xid_digest
from sidecar.store.scripts import Script, pipeline

Clock = Callable[[], float]

LOCK_MS = 60_000  # a merge holds the lock at most this long (a process that died frees it)
JOURNAL_TTL_S = 30 * 86_400  # a finished merge's journal is kept this long


class MergePlan(NamedTuple):
    merged_id: str
    merged_x: str
    into_id: str
    into_x: str


class Mover(Protocol):
    """Moves one part of a merged identity's state into the survivor; safe to run again."""

    name: str

    async def move(self, plan: MergePlan) -> None: ...


class Merged(NamedTuple):
    identity: Identity  # the survivor
    merged_from: list[str]  # every external id merged into it


class _Fields(msgspec.Struct):
    display_name: str | None = None
    email: str | None = None
    avatar_url: str | None = None
    tags: list[str] = msgspec.field(default_factory=list)
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)


def filled(survivor: Identity, merged: _Fields) -> Profile:
    """What the survivor's profile takes from the merged one: its empty fields filled, the
    tags of both (the survivor's first, up to the cap), the metadata of both (the survivor's
    value where both have a key; up to the cap, the survivor's keys first)."""
    out = Profile()
    for name in ("display_name", "email", "avatar_url"):
        if getattr(survivor, name) is None and getattr(merged, name) is not None:
            setattr(out, name, getattr(merged, name))
    tags = list(survivor.tags)
    tags += [t for t in merged.tags if t not in tags]
    tags = tags[: model.MAX_TAGS]
    if tags != survivor.tags:
        out.tags = tags
    metadata = dict(survivor.metadata)
    for key, value in merged.metadata.items():
        if key not in metadata and len(metadata) < model.MAX_METADATA_KEYS:
            metadata[key] = value
    if metadata != survivor.metadata:
        out.metadata = metadata
    return out


def candidates(aliases: Aliases, ref: str) -> list[str]:
    """What a reference from the API may name, in the order to look: an `_id` as given, else
    the external id normalized (`[identity] normalize`), then as given (an id stored before
    the setting changed, which a merge can then fold into the normalized one)."""
    normalized = aliases.normalize(ref)
    return list(dict.fromkeys([ref, normalized] if is_ulid(ref) else [normalized, ref]))


async def _alias(aliases: Aliases, refs: list[str]) -> tuple[str, str] | None:
    for ref in refs:
        found = await aliases.survivor(ref)
        if found is not None:
            return found
    return None


async def find(records: IdentityRecords, aliases: Aliases, ref: str) -> Identity | None:
    """The identity `ref` names (`_id` or external id), or the survivor it was merged into."""
    refs = candidates(aliases, ref)
    for one in refs:
        identity = await records.get(one)
        if identity is not None:
            return identity
    found = await _alias(aliases, refs)
    if found is None:
        return None
    survivors = await records.many([found[0]])
    return survivors[0] if survivors else None


class Merger:
    def __init__(
        self,
        records: IdentityRecords,
        aliases: Aliases,
        movers: Sequence[Mover],
        clock: Clock = time.time,
    ) -> None:
        self.records = records
        self.aliases = aliases
        self.movers = list(movers)
        self.clock = clock
        self.client = records.client
        self.keys = records.keys
        self._publish = Script("sidecar.identity.lua", "publish", prelude=index_prelude())
        self._unlock = Script("sidecar.identity.lua", "unlock")

    @property
    def scripts(self) -> list[Script]:
        return [self._publish, self._unlock]

    async def merge(self, into_ref: str, from_ref: str) -> Merged:
        """Merge the identity `from_ref` names into the one `into_ref` names (an alias: its
        survivor). Repeating a merge that finished answers as it did and moves nothing.
        Raises NotFound (`param` names the side), Conflict."""
        token = str(ULID())
        locked = await call(self.client.set(self.keys.merge_lock, token, nx=True, px=LOCK_MS))
        if not locked:
            raise Conflict(
                "another merge is running; retry in a moment", param="from", code="merge_running"
            )
        try:
            await self._finish_pending()
            into = await find(self.records, self.aliases, into_ref)
            if into is None:
                raise NotFound(f"no identity with _id or external_id {into_ref!r}", param="id")
            plan, merged = await self._plan(into, from_ref)
            if plan is not None:
                await self._run(plan, merged)
        finally:
            await self._unlock(self.client, [self.keys.merge_lock], [token])
        await self.aliases.refresh()
        survivor = await self.records.many([into.id])
        if not survivor:
            raise NotFound(f"identity {into.external_id!r} was deleted", param="id")
        return Merged(survivor[0], await self.aliases.names(into.id))

    async def _plan(
        self, into: Identity, from_ref: str
    ) -> tuple[MergePlan | None, Identity | None]:
        refs = candidates(self.aliases, from_ref)
        itself = False
        for ref in refs:
            # The form as given, when the normalized one is the survivor: an id stored
            # before `[identity] normalize` changed, folded into its normalized twin.
            merged = await self.records.get(ref)
            if merged is not None and merged.id == into.id:
                itself = True
            elif merged is not None:
                return MergePlan(merged.id, merged.external_id, into.id, into.external_id), merged
        if itself:
            raise Conflict(
                f"{from_ref!r} is the identity merged into; name another one",
                param="from",
                code="merge_into_itself",
            )
        found = await _alias(self.aliases, refs)
        if found is None:
            raise NotFound(f"no identity with _id or external_id {from_ref!r}", param="from")
        survivor_id, merged_id = found
        if survivor_id != into.id:
            raise Conflict(
                f"{from_ref!r} was merged into identity {survivor_id} already; merge that "
                "identity instead",
                param="from",
                code="already_merged",
            )
        journal = await self._journal(merged_id)
        if journal.get("into") == into.id and journal.get("done") != "1":
            return MergePlan(merged_id, journal["from_x"], into.id, into.external_id), None
        return None, None  # merged before: nothing to move

    async def _journal(self, merged_id: str) -> dict[str, str]:
        raw = await call(self.client.hgetall(self.keys.merge_journal(merged_id)))
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def _finish_pending(self) -> None:
        """Merges an earlier attempt left unfinished: finished first, in any order (each
        names its survivor's current `_id` through the aliases)."""
        pending = await call(self.client.smembers(self.keys.merges_pending))
        for raw in pending:
            merged_id = raw.decode()
            journal = await self._journal(merged_id)
            if "into" not in journal or journal.get("done") == "1":
                await call(self.client.srem(self.keys.merges_pending, merged_id))
                continue
            plan = MergePlan(merged_id, journal["from_x"], journal["into"], journal["into_x"])
            await self._run(plan, None)

    async def _run(self, plan: MergePlan, merged: Identity | None) -> None:
        keys = self.keys
        journal_key = keys.merge_journal(plan.merged_id)
        journal = await self._journal(plan.merged_id)
        if "profile" in journal:
            profile = journal["profile"]
        else:
            assert merged is not None
            profile = msgspec.json.encode(
                _Fields(
                    display_name=merged.display_name,
                    email=merged.email,
                    avatar_url=merged.avatar_url,
                    tags=merged.tags,
                    metadata=merged.metadata,
                )
            ).decode()
        if "chain" in journal:
            chain = journal["chain"].split("\n")
        else:
            members = await call(self.client.smembers(keys.aliases_of(plan.merged_id)))
            chain = [m.decode().split(" ", 1)[1] for m in members if m.startswith(b"x:")]
        # 1. The survivor's slot first: once the index names the survivor for these external
        # ids, a profile write naming one of them must find it listed there.
        names = [plan.merged_x, *chain]
        await call(self.client.sadd(keys.alias_names(plan.into_id), *names))
        # 2. Aliases, index and list, in one step.
        index = [keys.external_ids, keys.order, *keys.search_index]
        status = await self._publish(
            self.client,
            [
                *index,
                keys.aliases,
                journal_key,
                keys.aliases_of(plan.into_id),
                keys.aliases_of(plan.merged_id),
                keys.merges_pending,
                keys.alias_generation,
            ],
            [
                plan.merged_id,
                xid_digest(plan.merged_x),
                plan.merged_x,
                plan.into_id,
                plan.into_x,
                profile,
                int(self.clock() * 1000),
            ],
        )
        if status[0] == b"conflict":
            raise Conflict(
                f"{plan.merged_x!r} is being merged into identity {status[1].decode()}",
                param="from",
                code="already_merged",
            )
        # 3. The survivor's empty fields, from the merged profile.
        if journal.get("step:profile") != "1":
            survivor = await self.records.many([plan.into_id])
            if survivor:
                fields = msgspec.json.decode(profile, type=_Fields)
                await self.records.patch(survivor[0], filled(survivor[0], fields))
            await self._mark(journal_key, "profile")

        # 4. The merged record: gone, so no write counts under its _id any more.
        def retire(pipe: Any) -> None:
            pipe.delete(keys.identity(plan.merged_id))
            pipe.delete(keys.alias_names(plan.merged_id))
            pipe.delete(keys.merged_into(plan.merged_id))

        await pipeline(self.client, retire)
        self.records.forget(plan.merged_x)
        # 5. What it owns.
        for mover in self.movers:
            if journal.get(f"step:{mover.name}") != "1":
                await mover.move(plan)
                await self._mark(journal_key, mover.name)

        # 6. Done.
        def finish(pipe: Any) -> None:
            pipe.hset(journal_key, "done", "1")
            pipe.expire(journal_key, JOURNAL_TTL_S)
            pipe.srem(keys.merges_pending, plan.merged_id)

        await pipeline(self.client, finish)

    async def _mark(self, journal_key: str, step: str) -> None:
        await call(self.client.hset(journal_key, f"step:{step}", "1"))
