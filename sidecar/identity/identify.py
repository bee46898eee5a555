"""The `_id` a resolved request counts under: found, or created (a body identity upserts).

Clients send their identity with every request, so the common case must cost no round trip:
this process remembers the `_id` of every external id it saw and the profile it last wrote."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from typing import Any, Protocol

import msgspec

from sidecar.identity.model import Identity, Profile
from sidecar.identity.records import IdentityRecords
from sidecar.identity.resolve import Resolved, Source
from sidecar.observe.counters import Counters

Clock = Callable[[], float]

PROFILE_REFRESH_S = 30.0
# Known identities' profiles due to be written again wait this long, to go out together and
# off the way of the requests that come right after theirs (`refresh_later`).
REFRESH_DELAY_S = 0.05
_WRITTEN_SIZE = 65_536
_encode = msgspec.json.Encoder().encode


class ProfileSink(Protocol):
    """Told the tags and metadata of every identity written (the policies match on them)."""

    def remember(self, external_id: str, tags: list[str], metadata: dict[str, Any]) -> None: ...


def _digest(profile: Profile) -> bytes:
    """16 bytes per identity in the cache, whatever the size of its profile."""
    return hashlib.blake2b(_encode(profile), digest_size=16).digest()


class Identifier:
    def __init__(
        self,
        records: IdentityRecords,
        profiles: ProfileSink,
        clock: Clock = time.time,
        counters: Counters | None = None,
    ) -> None:
        self.records = records
        self.profiles = profiles
        self.clock = clock
        self.counters = counters
        # external id -> (the digest of the profile this process last wrote, when to write it
        # again anyway, that profile)
        self._written: dict[str, tuple[bytes, float, Profile | None]] = {}
        self._inflight: dict[tuple[str, bytes], asyncio.Future[str]] = {}
        self._due: dict[str, Resolved] = {}  # external id -> its latest stale body identity

    @property
    def remembered_profiles(self) -> int:
        return len(self._written)

    def known(self, resolved: Resolved) -> str | None:
        """The `_id`, when nothing needs writing first (see `identify` and `stale`)."""
        known = self.records.known_id(resolved.external_id)
        return None if known is None or self.stale(resolved) else known

    def known_id(self, resolved: Resolved) -> str | None:
        """The `_id` this process knows for the identity, None when unknown. A known one's
        profile may still be due to be written (`stale`); that write need not hold its
        request up, so a proxied request asks only once it is answered."""
        return self.records.known_id(resolved.external_id)

    def stale(self, resolved: Resolved) -> bool:
        """Whether the body's profile is still to be written: new, changed, or last written
        over PROFILE_REFRESH_S ago."""
        if resolved.profile is None:
            return False
        seen = self._written.get(resolved.external_id)
        if seen is None or self.clock() >= seen[1]:
            return True
        # The very profile written (resolutions are kept: see resolve.Resolver) needs no digest.
        return seen[2] is not resolved.profile and seen[0] != _digest(resolved.profile)

    async def identify(self, resolved: Resolved) -> str:
        """The `_id` to count under: a body identity upserts; the others get a bare record
        when unknown and never change an existing one.

        A body identity that brings the same fields as the last one this process wrote, less
        than PROFILE_REFRESH_S ago, is not written again: clients send their identity with
        every request, and rewriting identical fields costs a round trip each time. Requests
        that need the same write while it is in flight share it. Raises StoreUnavailable."""
        known = self.known(resolved)
        if known is not None:
            return known
        digest = _digest(resolved.profile) if resolved.profile is not None else b""
        key = (resolved.external_id, digest)
        write = self._inflight.get(key)
        if write is None:
            write = asyncio.ensure_future(self._write(resolved, digest))
            self._inflight[key] = write
            write.add_done_callback(lambda done: self._settled(key, done))
        # Shielded: a caller that gives up (a timeout) does not cancel the others' write.
        return await asyncio.shield(write)

    async def ensure(self, external_id: str, profile: object) -> str:
        """For usage counted while the store could not say whose it was: `profile` is what a
        body identity brought (a Profile, or its fields as read back from the spool), or None."""
        if profile is None:
            return await self.identify(Resolved(external_id, Source.HEADER))
        given = profile if isinstance(profile, Profile) else msgspec.convert(profile, Profile)
        return await self.identify(Resolved(external_id, Source.BODY, given))

    def refresh_later(self, resolved: Resolved) -> bool:
        """Queue a known identity's stale body profile (`stale`) for `refresh_due`; True when
        none was queued before it, so that the caller runs `refresh_due` for all of them.

        Its request was answered: the write need not hold it up, nor the requests that follow
        (a client's next call comes as soon as it has the answer). Written together after
        REFRESH_DELAY_S, a burst of them costs one round trip."""
        first = not self._due
        self._due[resolved.external_id] = resolved  # a later request's profile replaces it
        return first

    async def refresh_due(self) -> None:
        """Write what `refresh_later` queued, REFRESH_DELAY_S from now, in one round trip; an
        identity whose record is gone or changed hands is identified again. Raises
        StoreUnavailable, or what `identify` raises: each profile not written stays due, and
        is written with its identity's next request."""
        await asyncio.sleep(REFRESH_DELAY_S)
        due = list(self._due.values())
        self._due.clear()
        known: list[tuple[Resolved, Profile]] = []
        updates: list[tuple[str, str, Profile]] = []
        again: list[Resolved] = []
        for resolved in due:
            identity_id = self.records.known_id(resolved.external_id)
            if identity_id is None or resolved.profile is None:
                again.append(resolved)
            else:
                known.append((resolved, resolved.profile))
                updates.append((identity_id, resolved.external_id, resolved.profile))
        written = await self.records.update_known(updates) if updates else []
        for (resolved, profile), identity in zip(known, written, strict=True):
            if identity is None:
                again.append(resolved)
            else:
                self._wrote(resolved, _digest(profile), identity)
        for resolved in again:
            await self.identify(resolved)

    def forget(self, external_id: str) -> None:
        self.records.forget(external_id)
        self._written.pop(external_id, None)

    def _created(self, created: bool) -> None:
        if created and self.counters is not None:
            self.counters.identities_created += 1

    def _settled(self, key: tuple[str, bytes], write: asyncio.Future[str]) -> None:
        self._inflight.pop(key, None)
        if not write.cancelled():
            write.exception()  # retrieved here: every waiter may have given up

    async def _write(self, resolved: Resolved, digest: bytes) -> str:
        creator = resolved.creator or None
        if resolved.profile is None:
            identity, created = await self.records.upsert(resolved.external_id, Profile(), creator)
            self._created(created)
            return identity.id
        identity, created = await self.records.upsert(
            resolved.external_id, resolved.profile, creator
        )
        self._created(created)
        self._wrote(resolved, digest, identity)
        return identity.id

    def _wrote(self, resolved: Resolved, digest: bytes, identity: Identity) -> None:
        """A body identity's profile is written: the policies see its tags and metadata, and
        the same profile is not written again for PROFILE_REFRESH_S."""
        self.profiles.remember(resolved.external_id, identity.tags, identity.metadata)
        self._written[resolved.external_id] = (
            digest,
            self.clock() + PROFILE_REFRESH_S,
            resolved.profile,
        )
        if len(self._written) > _WRITTEN_SIZE:
            del self._written[next(iter(self._written))]
