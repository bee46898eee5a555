"""Counters for `GET /metrics`: plain ints, dicts and lists, bumped on the request path with
O(1) work and read by the Prometheus collector (observe/prometheus.py) only when scraped.
prometheus_client's own Counter would add a lock and a label-set lookup per increment, for
nothing a single-threaded event loop needs. Values are per process: with `server.workers > 1`
each worker counts its own (as Prometheus' client libraries do)."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sidecar.quota.policy import Policy

ROUTES = ("proxy", "hooks_authorize", "hooks_usage", "api", "ui", "ops")
# Where a metered request's identity came from (identity.resolve.Source's values).
SOURCES = ("body", "user_field", "header", "api_key", "anonymous")
UPSTREAM_ERROR = "upstream_error"  # the proxy's 502 and 504
NO_RESPONSE = "no_response"  # the client left, or the connection broke, before a status
_STATUS_CLASS = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}

# Seconds. Upstream: time to the response's headers, from a cached answer to a long generation.
UPSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# One round trip to Redis, about 0.1 ms when healthy; the limit check gives up at timeout_ms.
REDIS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
# One batch of usage writes (a pipeline of up to 512 script calls), or a spool replay.
WRITE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

# Runtime budgets' policies are named "budget:<_id>" (quota.policy.BUDGET_PREFIX): counted under
# one label, so that the series do not grow with the number of budgets.
BUDGETS = "budget"
MAX_MODELS = 100  # distinct model labels on the unpriced counter; the rest count as OTHER
OTHER = "other"
_MAX_LABEL = 128  # characters of a model name kept in its label


class Histogram:
    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        # `le` is inclusive: the first bound >= the value.
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds


class Counters:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, str], int] = {}
        # (policy, dimension, "admitted" | "refused") -> checks
        self.decisions: dict[tuple[str, str, str], int] = {}
        self.unpriced_models: dict[str, int] = {}
        self.metered: dict[str, int] = {}  # identity source -> metered requests
        # kind -> metered answers of success whose usage could not be read
        self.usage_unread: dict[str, int] = {}
        self.identities_created = 0  # by traffic: ids seen for the first time
        self.upstream = Histogram(UPSTREAM_BUCKETS)
        self.limit_check = Histogram(REDIS_BUCKETS)
        self.usage_write = Histogram(WRITE_BUCKETS)
        # id(policy) -> (policy, its "admitted" keys): kept alive here, so the id is not reused
        self._admit_keys: dict[int, tuple[Policy, tuple[tuple[str, str, str], ...]]] = {}

    # -- on the request path: O(1) each ------------------------------------------------------

    def request(self, route: str, status: int) -> None:
        if route == "proxy" and (status == 502 or status == 504):
            outcome = UPSTREAM_ERROR
        else:
            outcome = _STATUS_CLASS.get(status // 100, NO_RESPONSE)
        key = (route, outcome)
        self.requests[key] = self.requests.get(key, 0) + 1

    def admitted(self, policy: Policy) -> None:
        """A limit check of `policy` admitted: one for each dimension it limits."""
        cached = self._admit_keys.get(id(policy))
        if cached is None or cached[0] is not policy:
            if len(self._admit_keys) >= 256:  # policies reloaded many times over
                self._admit_keys.clear()
            dimensions = dict.fromkeys(limit.dimension.value for limit in policy.limits)
            if policy.concurrency:
                dimensions["concurrency"] = None
            name = _label(policy.name)
            keys = tuple((name, d, "admitted") for d in dimensions)
            cached = self._admit_keys[id(policy)] = (policy, keys)
        decisions = self.decisions
        for key in cached[1]:
            decisions[key] = decisions.get(key, 0) + 1

    def refused(self, policy: str, dimension: str) -> None:
        key = (_label(policy), dimension, "refused")
        self.decisions[key] = self.decisions.get(key, 0) + 1

    def metered_request(self, source: str) -> None:
        self.metered[source] = self.metered.get(source, 0) + 1

    def unread(self, kind: str) -> None:
        self.usage_unread[kind] = self.usage_unread.get(kind, 0) + 1

    def unpriced(self, model: str | None) -> None:
        name = (model or "unknown")[:_MAX_LABEL]
        models = self.unpriced_models
        if name not in models and len(models) >= MAX_MODELS:
            name = OTHER
        models[name] = models.get(name, 0) + 1


def _label(policy: str) -> str:
    return BUDGETS if policy.startswith(BUDGETS + ":") else policy
