"""Identity records and the external-id index: the only code that writes them."""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
from msgspec import UNSET
from redis.asyncio.cluster import RedisCluster
from ulid import ULID

from sidecar.errors import Conflict, IdentityCreationLimited, StoreUnavailable
from sidecar.identity import ngram
from sidecar.identity.model import Identity, Profile, rfc3339
from sidecar.store.connect import RedisClient
from sidecar.store.errors import call
from sidecar.store.keys import Keys, xid_digest
from sidecar.store.scripts import Script, batch, lua, pipeline

Clock = Callable[[], float]

_ULID = re.compile(r"[0-7][0-9A-HJKMNP-TV-Z]{25}")
_FIELDS = {"display_name": "n", "email": "e", "avatar_url": "a"}
_CACHE_SIZE = 65_536  # external id -> _id mappings remembered per process
_CROCKFORD = {c: n for n, c in enumerate("0123456789ABCDEFGHJKMNPQRSTVWXYZ")}

_encode = msgspec.json.Encoder().encode
_decode_tags = msgspec.json.Decoder(list[str]).decode
_decode_metadata = msgspec.json.Decoder(dict[str, Any]).decode


def index_prelude() -> str:
    """What every script that writes the order set starts with: the search index's writes."""
    return ngram.lua_constants() + lua("sidecar.identity.lua", "ngram")


def is_ulid(value: str) -> bool:
    return _ULID.fullmatch(value) is not None


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


class IdentityRecords:
    """Create, read, update and delete identities; the external-id index and the order set
    (see Keys) are kept with them."""

    def __init__(
        self,
        client: RedisClient,
        keys: Keys,
        clock: Clock = time.time,
        max_new_per_minute: int | None = None,
    ) -> None:
        self.client = client
        self.keys = keys
        self.clock = clock
        # Identities one creator (see Resolved.creator) may make per minute, sliding.
        self.max_new_per_minute = max_new_per_minute
        # A single server runs a pipeline's commands in order; a cluster's nodes do not.
        self.in_order = not isinstance(client, RedisCluster)
        # An external id keeps its _id until the identity is deleted, so the mapping can be
        # remembered; every use checks the record's external id, and a stale entry is dropped.
        self._ids: OrderedDict[str, str] = OrderedDict()
        package = "sidecar.identity.lua"
        self._merge = Script(package, "merge")
        prelude = index_prelude()
        self._claim, self._reindex, self._unindex = (
            Script(package, name, prelude=prelude) for name in ("claim", "reindex", "unindex")
        )

    @property
    def scripts(self) -> list[Script]:
        return [self._merge, self._claim, self._reindex, self._unindex]

    @property
    def _index_keys(self) -> list[str]:
        """claim.lua's and unindex.lua's first keys: both indexes, then the search index's."""
        return [self.keys.external_ids, self.keys.order, *self.keys.search_index]

    # -- the process's memory of external ids -----------------------------------------------

    def known_id(self, external_id: str) -> str | None:
        """The `_id` this process last saw for the external id, without asking Redis."""
        return self._ids.get(external_id)

    def forget(self, external_id: str) -> None:
        self._ids.pop(external_id, None)

    @property
    def remembered(self) -> int:
        return len(self._ids)

    def _remember(self, external_id: str, identity_id: str) -> None:
        self._ids[external_id] = identity_id
        self._ids.move_to_end(external_id)
        if len(self._ids) > _CACHE_SIZE:
            self._ids.popitem(last=False)

    # -- reads ------------------------------------------------------------------------------

    async def id_for(self, external_id: str) -> str | None:
        raw: bytes | None = await call(
            self.client.hget(self.keys.external_ids, xid_digest(external_id))
        )
        if not raw:
            return None
        identity_id = raw.decode()
        self._remember(external_id, identity_id)
        return identity_id

    def queue_read(self, pipe: Any, identity_id: str) -> None:
        """Add the read of one record to a pipeline (decode its reply with `decode`)."""
        pipe.hgetall(self.keys.identity(identity_id))

    @staticmethod
    def decode(identity_id: str, reply: Any) -> Identity | None:
        return _identity(identity_id, reply) if reply else None

    async def many(self, ids: list[str]) -> list[Identity]:
        """The records that exist of `ids`, in order."""
        if not ids:
            return []

        def queue(pipe: Any) -> None:
            for identity_id in ids:
                self.queue_read(pipe, identity_id)

        replies = await pipeline(self.client, queue)
        found = (self.decode(i, r) for i, r in zip(ids, replies, strict=True))
        return [identity for identity in found if identity is not None]

    async def get(self, ref: str) -> Identity | None:
        """By `_id`, else by external id."""
        if is_ulid(ref):
            found = await self.many([ref])
            if found:
                return found[0]
        cached = self._ids.get(ref)
        if cached is not None:
            found = await self.many([cached])
            if found and found[0].external_id == ref:
                return found[0]
            self._ids.pop(ref, None)
        identity_id = await self.id_for(ref)
        if identity_id is None:
            return None
        found = await self.many([identity_id])
        return found[0] if found and found[0].external_id == ref else None

    async def exists(self, identity_id: str) -> bool:
        return bool(await call(self.client.exists(self.keys.identity(identity_id))))

    # -- writes -----------------------------------------------------------------------------

    async def create(self, external_id: str, profile: Profile) -> Identity:
        owner = await self.id_for(external_id)
        if owner is not None:
            if await self.exists(owner):
                raise Conflict(f"identity {external_id!r} already exists", param="external_id")
            await self._drop_stale(external_id, owner)
        candidate, args = self._candidate(external_id, profile)
        status, _, record = await self._merge(self.client, [self.keys.identity(candidate)], args)
        assert status == b"created", status
        identity, created = await self._claim_for(external_id, _identity(candidate, record))
        if not created:
            raise Conflict(f"identity {external_id!r} already exists", param="external_id")
        return identity

    async def upsert(
        self, external_id: str, profile: Profile, creator: str | None = None
    ) -> tuple[Identity, bool]:
        """Create the identity, or overwrite the given fields; True when it was created. A new
        identity made for `creator` counts against its creation cap: IdentityCreationLimited
        (a 429) beyond it."""
        cached = self._ids.get(external_id)
        if cached is not None:
            updated = await self._update(cached, external_id, profile)
            if updated is not None:
                return updated, False
            self._ids.pop(external_id, None)
        for _ in range(5):
            candidate, args = self._candidate(external_id, profile)
            if self.in_order:
                # One round trip: write a candidate record and claim the external id for it.
                # A new identity is then done; a known one discards the candidate below.
                def write_and_claim(pipe: Any, candidate: str = candidate) -> None:
                    self.queue_create(pipe, candidate, external_id, profile, creator)

                replies = await pipeline(self.client, write_and_claim, self.create_scripts)
                (_, _, record), owner = replies
                if not owner:
                    await call(self.client.delete(self.keys.identity(candidate)))
                    raise self._limited(creator)
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

                owner, (_, _, record) = await pipeline(self.client, lookup_and_write, [self._merge])
                discard = candidate
                if owner is None:
                    identity, created = await self._claim_for(
                        external_id, _identity(candidate, record), creator
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

    @property
    def create_scripts(self) -> list[Script]:
        """The scripts `queue_create` queues (load them before the pipeline runs)."""
        return [self._merge, self._claim]

    def queue_create(
        self,
        pipe: Any,
        candidate: str,
        external_id: str,
        profile: Profile,
        creator: str | None = None,
    ) -> None:
        """Add to a pipeline the writes of a new identity on a single server: its record under
        the `candidate` _id, then the claim of its external id (whose reply is the _id that
        owns it, or '' when `creator` is over its cap). Two replies: merge.lua's and
        claim.lua's."""
        self.queue_record(pipe, candidate, external_id, profile)
        member = order_member(_fresh(candidate, external_id, profile))
        self._claim.queue(pipe, *self._claim_call(external_id, candidate, member, creator))

    def queue_record(self, pipe: Any, candidate: str, external_id: str, profile: Profile) -> None:
        """Add the record's write alone (merge.lua, creating) to a pipeline."""
        args = [self._now_ms(), "1", external_id, *_field_args(profile)]
        self._merge.queue(pipe, [self.keys.identity(candidate)], args)

    async def patch(self, identity: Identity, profile: Profile) -> Identity | None:
        if profile.is_empty():
            return identity
        return await self._update(identity.id, identity.external_id, profile)

    async def delete(self, identity: Identity) -> None:
        """Out of the indexes, then the record: a usage write that comes later finds no record
        and counts nothing (see usage/lua/record.lua)."""
        await self._unindex(
            self.client, self._index_keys, [xid_digest(identity.external_id), identity.id]
        )
        self._ids.pop(identity.external_id, None)
        keys = self.keys
        await call(
            self.client.delete(
                keys.identity(identity.id),
                keys.alias_names(identity.id),
                keys.merged_into(identity.id),
            )
        )

    def _candidate(self, external_id: str, profile: Profile) -> tuple[str, list[Any]]:
        candidate = str(ULID.from_timestamp(self.clock()))
        return candidate, [self._now_ms(), "1", external_id, *_field_args(profile)]

    def _claim_call(
        self, external_id: str, candidate: str, member: str, creator: str | None
    ) -> tuple[list[str], list[Any]]:
        """claim.lua's keys and arguments; with the creator's cap when it has one."""
        keys = self._index_keys
        args: list[Any] = [xid_digest(external_id), candidate, member]
        if creator and self.max_new_per_minute is not None:
            now_ms = int(self.clock() * 1000)
            minute = now_ms // 60_000
            keys += [self.keys.created(creator, minute), self.keys.created(creator, minute - 1)]
            args += [self.max_new_per_minute, now_ms % 60_000]
        return keys, args

    def _limited(self, creator: str | None) -> IdentityCreationLimited:
        wait = 60 - int(self.clock()) % 60
        who = "key owner" if creator and creator.startswith("key:") else "client address"
        return IdentityCreationLimited(
            f"this {who} created {self.max_new_per_minute} identities in the last minute "
            "([identity] max_new_per_minute); use an existing identity or retry later",
            headers={"retry-after": str(max(1, wait))},
        )

    async def _claim_for(
        self, external_id: str, identity: Identity, creator: str | None = None
    ) -> tuple[Identity, bool]:
        """Claim the external id for a freshly written record, or discard it for the owner's."""
        owner = await self._claim(
            self.client,
            *self._claim_call(external_id, identity.id, order_member(identity), creator),
        )
        if not owner:
            await call(self.client.delete(self.keys.identity(identity.id)))
            raise self._limited(creator)
        if owner.decode() == identity.id:
            self._remember(external_id, identity.id)
            return identity, True
        await call(self.client.delete(self.keys.identity(identity.id)))
        identity.id = owner.decode()
        return identity, False

    async def update_known(
        self, updates: Sequence[tuple[str, str, Profile]]
    ) -> list[Identity | None]:
        """Overwrite the given fields of identities whose `_id` is known, (`_id`, external id,
        profile) each, in one round trip; None for one that is gone, or whose external id is
        no longer its own. Raises StoreUnavailable (what Redis took is applied)."""
        calls = [
            (
                [self.keys.identity(identity_id), self.keys.alias_names(identity_id)],
                [self._now_ms(), "0", external_id, *_field_args(profile)],
            )
            for identity_id, external_id, profile in updates
        ]
        # Packed, not through the client's pipeline: a body identity's profile is written
        # again every PROFILE_REFRESH_S by every process that sees it (bench.instr_bench).
        replies = await batch(self.client, self._merge, calls, raise_on_error=True)
        return [
            await self._updated(identity_id, profile, reply)
            for (identity_id, _, profile), reply in zip(updates, replies, strict=True)
        ]

    async def _update(
        self, identity_id: str, external_id: str, profile: Profile, *, discard: str | None = None
    ) -> Identity | None:
        """Overwrite the given fields; `discard` names an unused candidate record to delete in
        the same round trip."""
        if discard is None:
            (identity,) = await self.update_known([(identity_id, external_id, profile)])
            return identity
        keys = [self.keys.identity(identity_id), self.keys.alias_names(identity_id)]
        args = [self._now_ms(), "0", external_id, *_field_args(profile)]

        def queue(pipe: Any) -> None:
            pipe.delete(self.keys.identity(discard))
            self._merge.queue(pipe, keys, args)

        reply = (await pipeline(self.client, queue, [self._merge]))[-1]
        return await self._updated(identity_id, profile, reply)

    async def _updated(self, identity_id: str, profile: Profile, reply: Any) -> Identity | None:
        """The record merge.lua answered, its search text indexed again when it changed."""
        status, _, record = reply
        if status in (b"missing", b"conflict"):
            return None
        identity = _identity(identity_id, record)
        if status == b"updated" and (
            profile.display_name is not UNSET
            or profile.email is not UNSET
            or profile.tags is not UNSET
        ):
            member = order_member(identity)
            keys = [self.keys.order, *self.keys.search_index]
            await self._reindex(self.client, keys, [identity_id, member])
        return identity

    async def _drop_stale(self, external_id: str, identity_id: str) -> None:
        """The index names a record that is gone (evicted, or lost to a crash): forget it."""
        await self._unindex(self.client, self._index_keys, [xid_digest(external_id), identity_id])

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)


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
    return Identity(
        id=identity_id,
        external_id=text["x"].decode(),
        display_name=text["n"].decode() if "n" in text else None,
        email=text["e"].decode() if "e" in text else None,
        avatar_url=text["a"].decode() if "a" in text else None,
        tags=_decode_tags(text["t"]) if "t" in text else [],
        metadata=_decode_metadata(text["m"]) if "m" in text else {},
        created=rfc3339(ulid_ms(identity_id)),
        updated=rfc3339(int(text["u"])),
    )
