"""Aliases: the external ids (and `_id`s) of merged identities, each naming its survivor.

Every process keeps the whole alias map in memory (merges are rare, a map of them is small) and
reloads it when the alias generation moves (`watch`, once a second), so that a request naming
a merged external id is counted, limited and budgeted as its survivor without a store read.
Until a process has reloaded, the external-id index (which names the survivor from the merge
on) and the erased record of the merged identity send its writes to the survivor (see
identity/merge.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from sidecar.store.connect import RedisClient
from sidecar.store.errors import call
from sidecar.store.keys import Keys
from sidecar.store.scripts import Script
from sidecar.tasks import keep_refreshed

log = logging.getLogger("sidecar.identity")

REFRESH_S = 1.0  # how often a process checks whether the aliases changed
_ID = 26  # characters of a ULID


class Forgets(Protocol):
    """What a process remembers of external ids (their `_id`s, the profiles it wrote)."""

    def forget(self, external_id: str) -> None: ...


def _same(external_id: str) -> str:
    return external_id


class Aliases:
    def __init__(
        self,
        client: RedisClient,
        keys: Keys,
        memory: Forgets,
        normalize: Callable[[str], str] = _same,
    ) -> None:
        self.client = client
        self.keys = keys
        self.memory = memory
        self.normalize = normalize
        self._unalias = Script("sidecar.identity.lua", "unalias")
        self._names: dict[str, tuple[str, str]] = {}  # alias -> (survivor _id, external id)
        self._generation: int | None = None

    @property
    def scripts(self) -> list[Script]:
        return [self._unalias]

    @property
    def count(self) -> int:
        return len(self._names)

    @property
    def generation(self) -> int | None:
        """The store's aliases generation this process's map was read at (None: not yet)."""
        return self._generation

    def canonical(self, external_id: str) -> str:
        """The external id a request naming `external_id` counts under: normalized
        (`[identity] normalize`), then its survivor's when it is an alias."""
        external_id = self.normalize(external_id)
        found = self._names.get(external_id)
        return found[1] if found is not None else external_id

    # -- the store ---------------------------------------------------------------------------

    async def survivor(self, ref: str) -> tuple[str, str] | None:
        """(survivor `_id`, merged `_id`) when `ref` is a merged identity's external id or
        `_id`, read from the store."""
        by_name, by_id = await call(self.client.hmget(self.keys.aliases, [f"x:{ref}", f"i:{ref}"]))
        if by_name:
            text = by_name.decode()
            return text[:_ID], text[_ID : 2 * _ID]
        if by_id:
            return by_id.decode(), ref
        return None

    async def names(self, identity_id: str) -> list[str]:
        """The external ids merged into the identity, sorted."""
        members = await call(self.client.smembers(self.keys.aliases_of(identity_id)))
        return sorted(m.decode().split(" ", 1)[1] for m in members if m.startswith(b"x:"))

    async def erase(self, identity_id: str) -> None:
        """The survivor's aliases are gone with it (erasure)."""
        keys = [
            self.keys.external_ids,
            self.keys.aliases,
            self.keys.aliases_of(identity_id),
            self.keys.alias_generation,
        ]
        await self._unalias(self.client, keys, [identity_id])
        await self.refresh()

    # -- this process's map -------------------------------------------------------------------

    async def refresh(self) -> bool:
        """Reload the map when the generation moved; True when it did. A newly merged
        external id is forgotten by this process's caches, so its next request finds the
        survivor."""
        generation = int(await call(self.client.get(self.keys.alias_generation)) or 0)
        if generation == self._generation:
            return False
        raw = await call(self.client.hgetall(self.keys.aliases))
        names: dict[str, tuple[str, str]] = {}
        for field, value in raw.items():
            if field.startswith(b"x:"):
                text = value.decode()
                names[field[2:].decode()] = (text[:_ID], text[2 * _ID :])
        for name in names.keys() - self._names.keys():
            self.memory.forget(name)
        self._names, self._generation = names, generation
        return True

    async def watch(self, interval: float = REFRESH_S) -> None:
        await keep_refreshed(self.refresh, interval, "aliases", log)
