"""`GET /metrics`: a prometheus_client collector that reads the sidecar's own O(1) counters
(observe/counters.py) and the figures other parts keep, when scraped. Nothing here runs on the
request path."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import CollectorRegistry

from sidecar import __version__
from sidecar.observe.counters import (
    MAX_MODELS,
    OTHER,
    ROUTES,
    SOURCES,
    UPSTREAM_ERROR,
    Counters,
    Histogram,
)
from sidecar.usage.model import Kind

KINDS = tuple(kind.value for kind in Kind)  # every metered kind, each shown from 0

if TYPE_CHECKING:
    from sidecar.observe.tracing import Tracer
    from sidecar.quota.limiter import Limiter
    from sidecar.quota.live import LiveConfig
    from sidecar.usage.recorder import Recorder

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4


def _histogram(name: str, text: str, histogram: Histogram) -> HistogramMetricFamily:
    buckets = []
    cumulative = 0
    for bound, n in zip(histogram.bounds, histogram.counts, strict=False):
        cumulative += n
        buckets.append((repr(bound), cumulative))
    buckets.append(("+Inf", cumulative + histogram.counts[-1]))
    return HistogramMetricFamily(name, text, buckets=buckets, sum_value=histogram.total)


class Exposition:
    """The registry `/metrics` renders: the counters, and what other parts keep."""

    def __init__(self, counters: Counters, readings: Readings | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(CounterFamilies(counters))
        if readings is not None:
            self.registry.register(readings)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class CounterFamilies:
    def __init__(self, counters: Counters) -> None:
        self.counters = counters

    def collect(self) -> Iterator[Metric]:
        counters = self.counters
        requests = CounterMetricFamily(
            "sidecar_requests",
            "HTTP requests by route class and outcome (status class; upstream_error: the "
            "proxy's 502/504)",
            labels=["route", "outcome"],
        )
        seen = dict.fromkeys(((r, c) for r in ROUTES for c in ("2xx", "4xx", "5xx")), 0)
        seen[("proxy", UPSTREAM_ERROR)] = 0
        seen.update(counters.requests)
        for (route, outcome), n in sorted(seen.items()):
            requests.add_metric([route, outcome], n)
        yield requests

        decisions = CounterMetricFamily(
            "sidecar_limit_decisions",
            "Limit checks by policy and dimension: admitted (each dimension of the policy) "
            "or refused (the dimension that refused)",
            labels=["policy", "dimension", "decision"],
        )
        for (policy, dimension, decision), n in sorted(counters.decisions.items()):
            decisions.add_metric([policy, dimension, decision], n)
        yield decisions

        unpriced = CounterMetricFamily(
            "sidecar_unpriced_requests",
            f"Requests with tokens but no known price, by model (the first {MAX_MODELS} "
            f"models seen; later ones as {OTHER!r})",
            labels=["model"],
        )
        for model, n in sorted(counters.unpriced_models.items()):
            unpriced.add_metric([model], n)
        yield unpriced

        unread = CounterMetricFamily(
            "sidecar_usage_unread_requests",
            "Metered answers of success (2xx) whose usage could not be read (none in the "
            "answer, no cost header): counted as requests without tokens or cost; a limited "
            "identity's limits are charged what the request reserved",
            labels=["kind"],
        )
        for kind in KINDS:
            unread.add_metric([kind], counters.usage_unread.get(kind, 0))
        yield unread

        metered = CounterMetricFamily(
            "sidecar_metered_requests",
            "Metered requests (answered, refused or reported) by where their identity came from",
            labels=["source"],
        )
        for source in SOURCES:
            metered.add_metric([source], counters.metered.get(source, 0))
        yield metered
        yield CounterMetricFamily(
            "sidecar_identities_created",
            "Identities created by traffic (an external id seen for the first time)",
            value=counters.identities_created,
        )

        yield _histogram(
            "sidecar_upstream_latency_seconds",
            "Time from sending a request upstream to its response headers",
            counters.upstream,
        )
        yield _histogram(
            "sidecar_redis_limit_check_seconds",
            "Round trip of a limit check's script call",
            counters.limit_check,
        )
        yield _histogram(
            "sidecar_redis_usage_write_seconds",
            "One batch of usage writes to Redis",
            counters.usage_write,
        )


class Readings:
    """What other parts count themselves, read when scraped."""

    def __init__(
        self, limiter: Limiter, recorder: Recorder, live: LiveConfig, tracer: Tracer | None = None
    ) -> None:
        self.limiter = limiter
        self.recorder = recorder
        self.live = live
        self.tracer = tracer

    def collect(self) -> Iterator[Metric]:
        recorder = self.recorder
        spool = recorder.backlog.spool
        live = self.live

        def counter(name: str, text: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, text, value=value)

        def gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, text, value=value)

        yield counter(
            "sidecar_redis_limit_check_errors",
            "Limit checks (with the identity lookup before them) Redis did not answer in "
            "time; on_error decided them",
            self.limiter.errors,
        )
        yield counter(
            "sidecar_limit_checks_ahead",
            "Limit checks admitted from quota this process holds ahead ([limits] prefetch), "
            "with no Redis exchange",
            self.limiter.ahead,
        )
        yield counter(
            "sidecar_redis_usage_write_errors",
            "Usage writes that failed; their entries waited in memory or the spool",
            recorder.write_errors,
        )
        yield gauge(
            "sidecar_usage_waiting_entries",
            "Usage in memory, not yet written: entries (identity, hour and model) and requests "
            "not yet counted",
            recorder.waiting,
        )
        yield gauge(
            "sidecar_usage_spool_bytes",
            "Usage waiting on disk for Redis (this process's spool files)",
            spool.bytes if spool is not None else 0,
        )
        yield counter(
            "sidecar_usage_spooled_entries",
            "Usage entries written to the spool",
            spool.appended if spool is not None else 0,
        )
        yield counter(
            "sidecar_usage_replayed_entries",
            "Usage entries replayed from spool files into Redis",
            spool.replayed if spool is not None else 0,
        )
        yield counter(
            "sidecar_ranking_index_errors",
            "Updates of the top-spenders index that failed (it orders the list only)",
            recorder.writer.rankings.errors,
        )
        yield counter(
            "sidecar_usage_dropped",
            "Usage entries given up (memory or spool full)",
            recorder.dropped,
        )
        if self.tracer is not None:
            yield counter(
                "sidecar_spans_dropped",
                "Spans given up before export: the exporter process was not running or not "
                "keeping up ([telemetry] enabled only)",
                self.tracer.dropped,
            )
        yield gauge("sidecar_policies", "Policies in force", len(live.policies))
        reloads = CounterMetricFamily(
            "sidecar_policy_reloads",
            "Policy reloads: ok, or refused (the last good policies stayed)",
            labels=["result"],
        )
        reloads.add_metric(["ok"], live.reloads)
        reloads.add_metric(["refused"], live.reload_errors)
        yield reloads
        info = GaugeMetricFamily("sidecar_build_info", "The sidecar's version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
