from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.lib import cli, report


def test_emit_writes_the_json_and_prints_the_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(report, "OUT", tmp_path / "out")
    written = report.emit("demo", {"a": 1}, "| t |\n")
    assert json.loads(capsys.readouterr().out) == {"a": 1}
    assert written.parent == tmp_path / "out" and written.name.startswith("demo-")
    assert json.loads(written.read_text()) == {"a": 1}
    args = cli.parser("bench.demo", None).parse_args(["--json", str(tmp_path / "x.json")])
    outcome = cli.Outcome({"b": 2}, "| table |\n")
    assert cli.run("bench.demo", "Demo", args, ["--json", "x.json"], lambda: outcome) == 0
    printed = capsys.readouterr()
    assert printed.out == "" and "# Demo\n" in printed.err and "| table |" in printed.err
    result = json.loads((tmp_path / "x.json").read_text())
    assert result["b"] == 2 and result["meta"]["command"].endswith("-m bench.demo --json x.json")
    assert result["meta"]["options"] == {} and len(result["meta"]["loadavg_end"]) == 3

    def interrupted() -> cli.Outcome:
        raise KeyboardInterrupt

    assert cli.run("bench.demo", "Demo", args, [], interrupted) == 130


def test_added_latency_and_ratio() -> None:
    by_target = {
        "direct": {"p50_ms": 0.2, "p99_ms": 0.5},
        "nginx": {"p50_ms": 0.25, "p99_ms": 0.6},
        "bare": {"p50_ms": 0.3, "p99_ms": 1.0},
        "sidecar": {"p50_ms": 0.5, "p99_ms": 1.5},
    }
    added = report.added_latency(by_target)
    assert added["sidecar_minus_direct_p50_ms"] == 0.3
    assert added["nginx_minus_direct_p99_ms"] == 0.1
    assert added["sidecar_over_nginx_p50"] == 6.0
    assert added["bare_minus_direct_p50_ms"] == 0.1
    assert added["bare_minus_direct_p99_ms"] == 0.5
    assert added["sidecar_over_bare_p50"] == 3.0
    assert added["sidecar_over_bare_p99"] == 2.0
    by_target["nginx"] = {"p50_ms": 0.2, "p99_ms": 0.4}
    by_target["bare"] = {"p50_ms": 0.2, "p99_ms": 0.4}
    again = report.added_latency(by_target)
    assert again["sidecar_over_nginx_p50"] is None
    assert again["sidecar_over_bare_p50"] is None and again["sidecar_over_bare_p99"] is None
    del by_target["bare"]
    left = report.added_latency(by_target)
    assert not any(k.startswith(("bare", "sidecar_over_bare")) for k in left)


def test_ratios_are_taken_within_each_run() -> None:
    runs = [
        {"side": {"rps": 100.0}, "bare": {"rps": 400.0}, "nginx": {"rps": 1000.0}},
        {"side": {"rps": 300.0}, "bare": {"rps": 600.0}, "nginx": {"rps": 3000.0}},
        {"side": {"rps": 200.0}, "bare": {"rps": 200.0}},
    ]
    compared = report.compare(runs, "rps", ["side"], ["bare", "nginx"])
    assert compared["side"]["rps"]["median"] == 200.0
    # Not median(side) / median(bare) = 0.5: each run's own ratio, then their median.
    assert compared["side"]["over_bare"] == {
        "median": 0.5,
        "min": 0.25,
        "max": 1.0,
        "runs": [0.25, 0.5, 1.0],
    }
    assert compared["side"]["over_nginx"]["runs"] == [0.1, 0.1]
    assert compared["bare"]["over_nginx"]["runs"] == [0.4, 0.2]
    rows = report.compare_table(compared, "rps", "requests/s", ["bare", "nginx"])
    assert rows[2] == "| side | 200 (100-300) | 0.50 (0.25-1.00) | 0.10 (0.10-0.10) |"
    assert report.spread_text(report.spread([-0.04, -0.01, 0.02])) == "-0.010 (-0.040 to 0.020)"


def test_statistics() -> None:
    assert report.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert report.percentile(list(map(float, range(1, 101))), 99) == 99.0
    assert report.slope_per_minute([(0.0, 100.0), (30.0, 150.0), (60.0, 200.0)]) == 100.0
    assert report.slope_per_minute([(0.0, 1.0)]) is None
    runs: list[dict[str, Any]] = [
        {"a": {"b": 1.0}, "c": True},
        {"a": {"b": 3.0}},
        {"a": {"b": 2.0}},
    ]
    assert report.aggregate(runs) == {
        "a.b": {"median": 2.0, "min": 1.0, "max": 3.0, "runs": [1, 3, 2]}
    }
