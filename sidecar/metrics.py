"""Counters for `GET /metrics`, in Prometheus' text format 0.0.4.

Plain ints, dicts and lists, bumped on the request path with O(1) work and turned into text
only when scraped. prometheus_client would add a lock and a label-set lookup per increment,
and a dependency, for nothing a single-threaded event loop needs. Values are per process: with
`server.workers > 1` each worker counts its own (as Prometheus' client libraries do)."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from sidecar.quota.policy import Policy

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

ROUTES = ("proxy", "hooks_authorize", "hooks_usage", "api", "ui", "ops")
UPSTREAM_ERROR = "upstream_error"  # the proxy's 502 and 504
NO_RESPONSE = "no_response"  # the client left, or the connection broke, before a status
_STATUS_CLASS = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}

# Seconds. Upstream: time to the response's headers, from a cached answer to a long generation.
UPSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# One round trip to Redis, about 0.1 ms when healthy; the limit check gives up at timeout_ms.
REDIS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
# One batch of usage writes (a pipeline of up to 512 script calls), or a spool replay.
WRITE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

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


class Sample(NamedTuple):
    """A value read from elsewhere when scraped (a gauge, or a counter kept by its owner)."""

    name: str
    kind: str  # "counter" | "gauge"
    help: str
    value: int | float
    labels: tuple[tuple[str, str], ...] = ()


class Metrics:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, str], int] = {}
        # (policy, dimension, "admitted" | "refused") -> checks
        self.decisions: dict[tuple[str, str, str], int] = {}
        self.unpriced_models: dict[str, int] = {}
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
            keys = tuple((policy.name, d, "admitted") for d in dimensions)
            cached = self._admit_keys[id(policy)] = (policy, keys)
        decisions = self.decisions
        for key in cached[1]:
            decisions[key] = decisions.get(key, 0) + 1

    def refused(self, policy: str, dimension: str) -> None:
        key = (policy, dimension, "refused")
        self.decisions[key] = self.decisions.get(key, 0) + 1

    def unpriced(self, model: str | None) -> None:
        name = (model or "unknown")[:_MAX_LABEL]
        models = self.unpriced_models
        if name not in models and len(models) >= MAX_MODELS:
            name = OTHER
        models[name] = models.get(name, 0) + 1

    # -- when scraped --------------------------------------------------------------------------

    def render(self, samples: Iterable[Sample] = ()) -> bytes:
        out: list[str] = []

        def family(name: str, kind: str, text: str) -> None:
            out.append(f"# HELP {name} {text}")
            out.append(f"# TYPE {name} {kind}")

        family(
            "sidecar_requests_total",
            "counter",
            "HTTP requests by route class and outcome (status class; upstream_error: the "
            "proxy's 502/504)",
        )
        requests = dict.fromkeys(((r, c) for r in ROUTES for c in ("2xx", "4xx", "5xx")), 0)
        requests[("proxy", UPSTREAM_ERROR)] = 0
        requests.update(self.requests)
        for (route, outcome), n in sorted(requests.items()):
            out.append(f'sidecar_requests_total{{route="{route}",outcome="{outcome}"}} {n}')

        family(
            "sidecar_limit_decisions_total",
            "counter",
            "Limit checks by policy and dimension: admitted (each dimension of the policy) "
            "or refused (the dimension that refused)",
        )
        for (policy, dimension, decision), n in sorted(self.decisions.items()):
            labels = _labels(policy=policy, dimension=dimension, decision=decision)
            out.append(f"sidecar_limit_decisions_total{labels} {n}")

        family(
            "sidecar_unpriced_requests_total",
            "counter",
            f"Requests with tokens but no known price, by model (the first {MAX_MODELS} "
            f"models seen; later ones as {OTHER!r})",
        )
        for model, n in sorted(self.unpriced_models.items()):
            out.append(f"sidecar_unpriced_requests_total{_labels(model=model)} {n}")

        _histogram(
            out,
            "sidecar_upstream_latency_seconds",
            "Time from sending a request upstream to its response headers",
            self.upstream,
        )
        _histogram(
            out,
            "sidecar_redis_limit_check_seconds",
            "Round trip of a limit check's script call",
            self.limit_check,
        )
        _histogram(
            out,
            "sidecar_redis_usage_write_seconds",
            "One batch of usage writes to Redis",
            self.usage_write,
        )

        seen: set[str] = set()
        for sample in samples:
            if sample.name not in seen:
                seen.add(sample.name)
                family(sample.name, sample.kind, sample.help)
            labels = _labels(**dict(sample.labels)) if sample.labels else ""
            out.append(f"{sample.name}{labels} {_number(sample.value)}")
        out.append("")
        return "\n".join(out).encode()


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else repr(float(value))


def _histogram(out: list[str], name: str, text: str, histogram: Histogram) -> None:
    out.append(f"# HELP {name} {text}")
    out.append(f"# TYPE {name} histogram")
    cumulative = 0
    for bound, n in zip(histogram.bounds, histogram.counts, strict=False):
        cumulative += n
        out.append(f'{name}_bucket{{le="{bound!r}"}} {cumulative}')
    cumulative += histogram.counts[-1]
    out.append(f'{name}_bucket{{le="+Inf"}} {cumulative}')
    out.append(f"{name}_sum {histogram.total!r}")
    out.append(f"{name}_count {cumulative}")
