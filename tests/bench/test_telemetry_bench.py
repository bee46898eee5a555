from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import span_cost, telemetry_bench
from tests.support.bench import needs_wrk


@needs_wrk
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_telemetry_bench_end_to_end(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "telemetry.json"
    assert telemetry_bench.main(["--repeats", "1", "--duration", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    [run] = result["runs"]
    assert run["on"]["requests"] > 0 and run["on"]["http_errors"] == 0
    assert run["off"]["requests"] > 0 and run["off"]["http_errors"] == 0
    # The receiver got a span for every request the sidecar with telemetry answered.
    assert result["received"]["spans"] >= result["measured_requests_on"] > 0
    assert len(result["exporter_pids"]) == 1 and result["exporter_us_per_request"][0] > 0
    assert "telemetry on / off" in capfd.readouterr().err


def test_span_cost_measures_both_cases(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "span_cost.json"
    assert span_cost.main(["--spans", "300", "--repeats", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for case in span_cost.CASES:
        [cost] = result[case]["us_per_span"]
        assert 0 < cost < 10_000
    assert result["received"] + result["dropped_by_the_worker"] > 0
    assert "CPU per span in the worker" in capfd.readouterr().err
