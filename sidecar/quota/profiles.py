"""What the policies match on (tags, metadata) and the tags budgets are scoped to, per
identity, remembered for a few seconds so that choosing a policy and the budgets costs no store
read."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sidecar.quota.decision import BudgetSubjects
from sidecar.quota.live import LiveConfig

Clock = Callable[[], float]

PROFILE_TTL_S = 10.0  # how long a process matches policies on a profile it read
_PROFILES = 65_536


class PolicyProfiles:
    def __init__(
        self, live: LiveConfig, clock: Clock = time.time, budgets: BudgetSubjects | None = None
    ) -> None:
        self.live = live
        self.clock = clock
        self.budgets = budgets
        self._generation = live.generation
        self._budget_tags = budgets.tags if budgets is not None else frozenset()
        self._profiles: dict[str, tuple[list[str], dict[str, Any], float]] = {}

    def __len__(self) -> int:
        return len(self._profiles)

    def remember(self, external_id: str, tags: list[str], metadata: dict[str, Any]) -> None:
        # Only what some policy matches on is kept: a profile's other tags and metadata (up to
        # tens of KB) would make the cache's memory depend on what clients send.
        self._fresh()
        wanted = self.live.match_tags | self._budget_tags
        tags = [t for t in tags if t in wanted]
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
        """Profiles kept for the old policies' matches go when the policies are reloaded, and
        when the tags budgets are scoped to change."""
        if self._generation != self.live.generation:
            self._profiles.clear()
            self._generation = self.live.generation
        budget_tags = self.budgets.tags if self.budgets is not None else frozenset()
        if budget_tags is not self._budget_tags:  # the budgets were reloaded
            if budget_tags != self._budget_tags:
                self._profiles.clear()
            self._budget_tags = budget_tags
