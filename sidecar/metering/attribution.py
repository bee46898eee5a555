from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from sidecar.identity.resolve import Resolved, resolve
from sidecar.quota.live import LiveConfig
from sidecar.settings import IdentitySettings
from sidecar.usage.extract import cost_from_header
from sidecar.usage.model import Kind, Usage
from sidecar.usage.pricing import Cost, Pricer

Clock = Callable[[], float]


class Attribution:
    """Who a request is for (the documented resolution order) and what its usage costs."""

    def __init__(
        self,
        config: IdentitySettings,
        live: LiveConfig,
        pricer: Pricer,
        clock: Clock = time.time,
    ) -> None:
        self.header = config.header
        self.required = config.required
        self.live = live
        self.pricer = pricer
        self.clock = clock

    def key_owner(self, digest: str) -> str | None:
        key = self.live.key(digest)
        return key.owner if key is not None else None

    def resolve(self, body: dict[str, Any] | None, headers: Mapping[str, str]) -> Resolved:
        """Raises InvalidField (400) or MissingIdentity (401); removes the body identity."""
        return resolve(
            body, headers, header=self.header, key_owner=self.key_owner, required=self.required
        )

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
