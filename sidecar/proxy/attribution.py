from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import msgspec

from sidecar.identity.model import Profile
from sidecar.identity.resolve import Resolved, Source, resolve
from sidecar.identity.store import IdentityStore
from sidecar.settings import Settings
from sidecar.store.errors import STORE_ERRORS
from sidecar.usage.extract import cost_from_header
from sidecar.usage.model import Kind, Usage
from sidecar.usage.pricing import Cost, Pricer
from sidecar.usage.recorder import Charges, Recorded, Recorder

log = logging.getLogger("sidecar.attribution")

PROFILE_REFRESH_S = 30.0
_WRITTEN_SIZE = 65_536
_encode = msgspec.json.Encoder().encode


def _digest(profile: Profile) -> bytes:
    """16 bytes per identity in the cache, whatever the size of its profile."""
    return hashlib.blake2b(_encode(profile), digest_size=16).digest()


Clock = Callable[[], float]


class Attribution:
    """Who a request is for, and what it cost them: shared by inline and hook mode."""

    def __init__(
        self,
        settings: Settings,
        store: IdentityStore,
        recorder: Recorder,
        pricer: Pricer,
        clock: Clock = time.time,
    ) -> None:
        self.store = store
        self.recorder = recorder
        self.pricer = pricer
        self.clock = clock
        self.header = settings.identity.header
        self.required = settings.identity.required
        self._owners = {k.sha256: k.owner for k in settings.api_keys}
        # external id -> (the profile this process last wrote, when to write it again anyway)
        self._written: dict[str, tuple[bytes, float]] = {}
        self._inflight: dict[tuple[str, bytes], asyncio.Future[str]] = {}
        # Told the tags and metadata of every identity written (the policies match on them).
        self.on_profile: Callable[[str, list[str], dict[str, Any]], None] | None = None
        recorder.resolver = self._identify_later
        recorder.forget = self.forget

    def key_owner(self, digest: str) -> str | None:
        return self._owners.get(digest)

    def resolve(self, body: dict[str, Any] | None, headers: Mapping[str, str]) -> Resolved:
        """Raises InvalidField (400) or MissingIdentity (401); removes the body identity."""
        return resolve(
            body, headers, header=self.header, key_owner=self.key_owner, required=self.required
        )

    def known(self, resolved: Resolved) -> str | None:
        """The `_id`, when nothing needs writing first (see `identify`)."""
        known, stale = self.cached(resolved)
        return None if stale else known

    def cached(self, resolved: Resolved) -> tuple[str | None, bool]:
        """The `_id` this process knows for the identity (None: unknown), and whether the
        body's profile is still to be written (new, changed, or last written over
        PROFILE_REFRESH_S ago). With an `_id` at hand, that write need not hold the request
        up: see `refresh`."""
        known = self.store.known_id(resolved.external_id)
        if known is None:
            return None, True
        if resolved.profile is None:
            return known, False
        seen = self._written.get(resolved.external_id)
        fresh = seen is not None and seen[0] == _digest(resolved.profile) and self.clock() < seen[1]
        return known, not fresh

    async def refresh(self, resolved: Resolved) -> None:
        """Write a known identity's body profile, after its request was answered."""
        try:
            await self.identify(resolved)
        except STORE_ERRORS as exc:  # the next request with it tries again
            log.warning("profile of %s not written now: %s", resolved.external_id, exc)

    async def identify(self, resolved: Resolved) -> str:
        """The `_id` to count under: a body identity upserts; the others get a bare record
        when unknown and never change an existing one.

        A body identity that brings the same fields as the last one this process wrote, less
        than PROFILE_REFRESH_S ago, is not written again: clients send their identity with
        every request, and rewriting identical fields costs a round trip each time. Requests
        that need the same write while it is in flight share it."""
        known = self.known(resolved)
        if known is not None:
            return known
        digest = _digest(resolved.profile) if resolved.profile is not None else b""
        key = (resolved.external_id, digest)
        write = self._inflight.get(key)
        if write is None:
            write = asyncio.ensure_future(self._write_identity(resolved, digest))
            self._inflight[key] = write
            write.add_done_callback(lambda done: self._settled(key, done))
        # Shielded: a caller that gives up (a timeout) does not cancel the others' write.
        return await asyncio.shield(write)

    def _settled(self, key: tuple[str, bytes], write: asyncio.Future[str]) -> None:
        self._inflight.pop(key, None)
        if not write.cancelled():
            write.exception()  # retrieved here: every waiter may have given up

    async def _write_identity(self, resolved: Resolved, digest: bytes) -> str:
        if resolved.profile is not None:
            identity, _ = await self.store.upsert(resolved.external_id, resolved.profile)
            if self.on_profile is not None:
                self.on_profile(resolved.external_id, identity.tags, identity.metadata)
            self._written[resolved.external_id] = (digest, self.clock() + PROFILE_REFRESH_S)
            if len(self._written) > _WRITTEN_SIZE:
                del self._written[next(iter(self._written))]
            return identity.id
        identity, _ = await self.store.upsert(resolved.external_id, Profile())
        return identity.id

    def cost(
        self, kind: Kind | None, model: str | None, usage: Usage | None, header_cost: str | None
    ) -> Cost | None:
        if usage is None and header_cost is None:
            return None
        return self.pricer.cost(
            model=model,
            usage=usage or Usage(),
            kind=kind or Kind.CHAT,
            header_cost_nanos=cost_from_header(header_cost),
            at=datetime.fromtimestamp(self.clock(), UTC),
        )

    async def _identify_later(self, external_id: str, profile: Profile | None) -> str:
        """For usage counted while the store could not say whose it was."""
        source = Source.BODY if profile is not None else Source.HEADER
        return await self.identify(Resolved(external_id, source, profile))

    async def record(
        self,
        identity_id: str | None,
        resolved: Resolved,
        counters: dict[str, int],
        *,
        request_id: str,
        at: float | None = None,
        charges: Charges | None = None,
        within_s: float | None = None,
    ) -> Recorded:
        """Count a reported request now, once per request id. `identity_id` None: the
        store could not say whose it is (the report is kept and counted when it can)."""
        result = await self.recorder.record(
            identity_id,
            counters,
            source=resolved.source.value,
            at=at,
            request_id=request_id,
            charges=charges,
            external_id=resolved.external_id,
            profile=resolved.profile,
            within_s=within_s,
        )
        if identity_id is not None and not (result.counted or result.duplicate or result.spooled):
            # The identity was erased after this process learnt its _id: attribute the request
            # to the identity as it exists now (recreated bare unless the body brings a profile).
            self.forget(resolved.external_id)
            try:
                identity_id = await self.identify(resolved)
            except STORE_ERRORS:
                identity_id = None
            result = await self.recorder.record(
                identity_id,
                counters,
                source=resolved.source.value,
                at=at,
                request_id=request_id,
                external_id=resolved.external_id,
                profile=resolved.profile,
            )
        return result

    def add(
        self,
        identity_id: str | None,
        resolved: Resolved,
        counters: dict[str, int],
        charges: Charges | None = None,
    ) -> None:
        """Count an inline request: written within milliseconds, batched with others.
        `identity_id` None: the store could not say whose it is; found when written."""
        self.recorder.add(
            identity_id,
            counters,
            source=resolved.source.value,
            external_id=resolved.external_id,
            profile=resolved.profile,
            charges=charges,
        )

    def forget(self, external_id: str) -> None:
        self.store.forget(external_id)
        self._written.pop(external_id, None)

    def use_keys(self, settings: Settings) -> None:
        """Take the API key owners of a reloaded config."""
        self._owners = {k.sha256: k.owner for k in settings.api_keys}
