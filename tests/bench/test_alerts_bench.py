from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import alerts_bench


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_alerts_bench_end_to_end(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "alerts.json"
    argv = ["--identities", "20", "--minute", "2", "--fail-first", "3", "--json", str(out)]
    assert alerts_bench.main(argv) == 0
    result = json.loads(out.read_text())
    assert (result["expected"], result["delivered"], result["missing"]) == (40, 40, 0)
    assert result["duplicate_ids"] == result["duplicate_alerts"] == result["bad_signatures"] == 0
    assert result["attempts"] == 43 and result["exactly_once"]
    assert 0 < result["latency"]["p50_ms"] <= result["latency"]["max_ms"] < 30_000
    assert "every alert delivered exactly once" in capfd.readouterr().err
