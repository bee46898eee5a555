"""What the policies match on (tags, metadata), per identity, remembered for a few seconds so
that choosing a policy costs no store read."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sidecar.quota.live import LiveConfig

Clock = Callable[[], float]

PROFILE_TTL_S = 10.0  # how long a process matches policies on a profile it read
_PROFILES = 65_536


class PolicyProfiles:
    def __init__(self, live: LiveConfig, clock: Clock = time.time) -> None:
        self.live = live
        self.clock = clock
        self._generation = live.generation
        self._profiles: dict[str, tuple[list[str], dict[str, Any], float]] = {}

    def __len__(self) -> int:
        return len(self._profiles)

    def remember(self, external_id: str, tags: list[str], metadata: dict[str, Any]) -> None:
        # Only what some policy matches on is kept: a profile's other tags and metadata (up to
        # tens of KB) would make the cache's memory depend on what clients send.
        self._fresh()
        tags = [t for t in tags if t in self.live.match_tags]
        metadata = {k: v for k, v in metadata.items() if k in self.live.match_keys}
        self._profiles[external_id] = (tags, metadata, self.clock() + PROFILE_TTL_S)
        if len(self._profiles) > _PROFILES:
            del self._profiles[next(iter(self._profiles))]

    def get(self, external_id: str) -> tuple[list[str], dict[str, Any]] | None:
        self._fresh()
        cached = self._profiles.get(external_id)
        if cached is None or cached[2] < self.clock():
            return None
        return cached[0], cached[1]

    def _fresh(self) -> None:
        """Profiles kept for the old policies' matches go when the policies are reloaded."""
        if self._generation != self.live.generation:
            self._profiles.clear()
            self._generation = self.live.generation
