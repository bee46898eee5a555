from __future__ import annotations

import pytest

from sidecar.observe.counters import MAX_MODELS, Counters, Histogram
from sidecar.observe.prometheus import Exposition
from tests.support.prometheus import parse


def test_model_labels_are_capped_and_escaped() -> None:
    metrics = Counters()
    for n in range(MAX_MODELS + 50):
        metrics.unpriced(f"model-{n}")
    metrics.unpriced("model-0")
    metrics.unpriced('odd"name\\with\nnewline')
    samples = parse(Exposition(metrics).render().decode())
    models = {k: v for k, v in samples.items() if k.startswith("sidecar_unpriced_requests_total")}
    assert len(models) == MAX_MODELS + 1
    assert models['sidecar_unpriced_requests_total{model="model-0"}'] == 2
    assert models['sidecar_unpriced_requests_total{model="other"}'] == 51
    assert sum(models.values()) == MAX_MODELS + 52


def test_histogram_buckets_are_inclusive_upper_bounds() -> None:
    h = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 1.0, 7.0):
        h.observe(value)
    metrics = Counters()
    metrics.upstream = h
    samples = parse(Exposition(metrics).render().decode())
    name = "sidecar_upstream_latency_seconds"
    assert samples[f'{name}_bucket{{le="0.1"}}'] == 2
    assert samples[f'{name}_bucket{{le="1.0"}}'] == 4
    assert samples[f'{name}_bucket{{le="+Inf"}}'] == 5
    assert samples[f"{name}_sum"] == pytest.approx(8.65)
