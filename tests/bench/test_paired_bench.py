from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import paired_bench
from bench.lib.config import ROOT
from tests.support.bench import needs_wrk


@needs_wrk
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_paired_bench_end_to_end(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "paired.json"
    argv = ["--baseline", str(ROOT), "--repeats", "1", "--requests", "30", "--warmup", "5"]
    argv += ["--block", "10", "--streams", "2", "--wrk-repeats", "2", "--duration", "1"]
    argv += ["--connections", "4"]
    assert paired_bench.main([*argv, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["baseline"] == f"the checkout in {ROOT}"
    (run,) = result["sequential"]
    for name in ("bare", "baseline", "change"):
        assert run[name]["p50"] > 0
    assert run["change_over_baseline_p50"] == round(
        run["change"]["p50"] / run["baseline"]["p50"], 3
    )
    (streamed,) = result["streams"]
    assert streamed["change_over_baseline_ttfb"] == round(
        streamed["change"]["ttfb_p50"] / streamed["baseline"]["ttfb_p50"], 3
    )
    # Each wrk round runs both sidecars, the order alternating.
    first, second = result["saturation"]
    assert first["order"] == list(reversed(second["order"]))
    for name in ("baseline", "change"):
        assert first[name]["requests_per_s"] > 0 and first[name]["cpu_us_per_request"] > 0
    printed = capfd.readouterr()
    assert printed.out == ""
    assert "| added p50, change / baseline |" in printed.err


def test_a_baseline_that_is_neither_folder_nor_revision_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="neither a folder nor a git revision"):
        paired_bench.baseline_tree("no-such-revision-anywhere", tmp_path)


def test_a_revision_is_exported_not_checked_out(tmp_path: Path) -> None:
    tree, described = paired_bench.baseline_tree("HEAD", tmp_path)
    assert described.startswith("commit ")
    assert (tree / "sidecar" / "__init__.py").is_file()
    assert tree != ROOT
