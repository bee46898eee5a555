from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from sidecar.identity.model import Profile
from sidecar.identity.resolve import Resolved, Source, resolve
from sidecar.identity.store import IdentityStore
from sidecar.settings import Settings
from sidecar.usage import buckets
from sidecar.usage.extract import cost_from_header
from sidecar.usage.model import Kind, Usage
from sidecar.usage.pricing import Cost, Pricer
from sidecar.usage.recorder import Recorded, Recorder

log = logging.getLogger("sidecar.attribution")

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

    def key_owner(self, digest: str) -> str | None:
        return self._owners.get(digest)

    def resolve(self, body: dict[str, Any] | None, headers: Mapping[str, str]) -> Resolved:
        """Raises InvalidField (400) or MissingIdentity (401); removes the body identity."""
        return resolve(
            body, headers, header=self.header, key_owner=self.key_owner, required=self.required
        )

    async def identify(self, resolved: Resolved) -> str:
        """The `_id` to count under: a body identity upserts; the others get a bare record
        when unknown and never change an existing one."""
        if resolved.profile is not None:
            identity, _ = await self.store.upsert(resolved.external_id, resolved.profile)
            return identity.id
        known = self.store.known_id(resolved.external_id)
        if known is not None:
            return known
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

    async def record(
        self,
        identity_id: str,
        resolved: Resolved,
        counters: dict[str, int],
        *,
        at: float | None = None,
        request_id: str | None = None,
    ) -> Recorded:
        result = await self.recorder.record(
            identity_id, counters, source=resolved.source.value, at=at, request_id=request_id
        )
        if not result.counted and not result.duplicate:
            # The identity was erased after this process learnt its _id: attribute the request
            # to the identity as it exists now (recreated bare unless the body brings a profile).
            self.store.forget(resolved.external_id)
            identity_id = await self.identify(resolved)
            result = await self.recorder.record(
                identity_id, counters, source=resolved.source.value, at=at, request_id=request_id
            )
        return result

    @staticmethod
    def counters(
        source: Source, *, failed: bool, usage: Usage | None, cost: Cost | None
    ) -> dict[str, int]:
        return buckets.increments(source=source, failed=failed, usage=usage, cost=cost)
