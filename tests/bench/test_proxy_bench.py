"""The proxy bench end to end in a short run (against the mock, nginx, the bare pass-through
and the sidecar), so that the harness keeps working, and its report."""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Mapping
from typing import Any

import pytest

from bench.lib import payloads, proxy, proxy_report
from bench.lib.meta import metadata
from bench.lib.processes import port_open
from tests.support.bench import needs_wrk


@pytest.fixture(scope="module")
def result() -> dict[str, Any]:
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed")
    opts = proxy.Options(
        repeats=1,
        requests=40,
        warmup=5,
        block=10,
        streams=4,
        stream_warmup=1,
        stream_chunks=4,
        chunk_delay_ms=2,
        duration=1,
        connections=8,
        threads=1,
        identities=5,
        wrk_sequential=1,
        rss_interval=0.25,
        command="pytest tests/bench/test_proxy_bench.py",
    )
    return proxy.run_benchmark(opts)


def check_sequential(stats: Mapping[str, Any], requests: int) -> None:
    assert stats["n"] == requests
    assert stats["errors"] == 0
    assert 0 < stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"] <= stats["max_ms"]


def check_target(result: Mapping[str, Any], target: str) -> None:
    run = result["runs"][0]
    for scenario in payloads.SEQUENTIAL_SCENARIOS:
        check_sequential(run["latency"][scenario][target], 40)
    stream = run["stream"][target]
    assert stream["n"] == 4 and stream["errors"] == 0
    assert 0 < stream["ttfb"]["p50_ms"] < stream["last_byte"]["p50_ms"]
    # Four paced content chunks arrive as separate reads unless something buffers them; on a
    # loaded machine two of them may land in one read now and then, a buffering proxy gives 1.
    assert stream["reads_median"] >= 3
    assert run["wrk_sequential"][target]["requests"] > 0
    assert run["wrk_sequential"][target]["http_errors"] == 0
    saturation = run["saturation"][target]
    assert saturation["source"] == "lua"
    assert saturation["requests"] > 0 and saturation["requests_per_s"] > 0
    assert 0 < saturation["p50_ms"] <= saturation["p99_ms"]
    assert saturation["http_errors"] == 0 and saturation["socket_errors"] == 0
    assert saturation["cpu"]["wrk_cores"] >= 0 and saturation["cpu"]["upstream_cores"] > 0
    assert saturation["cpu"]["machine_busy_cores"] > 0
    assert result["summary"][f"saturation.{target}.requests_per_s"]["median"] > 0


@needs_wrk
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_direct_shape_and_everything_stopped(result: dict[str, Any]) -> None:
    meta = result["meta"]
    assert meta["command"] == "pytest tests/bench/test_proxy_bench.py"
    assert meta["machine"]["nproc"] >= 1 and len(meta["machine"]["loadavg_start"]) == 3
    assert isinstance(meta["commit"], str) and meta["commit"]
    assert time.strptime(meta["date_utc"], "%Y-%m-%d %H:%M:%SZ")
    assert len(result["runs"]) == 1
    assert result["targets"]["direct"]["available"]
    check_target(result, "direct")
    entry = result["summary"]["latency.chat_body_identity.direct.p50_ms"]
    assert entry["median"] == entry["min"] == entry["max"] == entry["runs"][0] > 0
    for info in result["targets"].values():
        if info.get("available"):
            assert not port_open(info["port"]), "a target is still listening after the run"


@needs_wrk
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_nginx(result: dict[str, Any]) -> None:
    if not result["targets"]["nginx"]["available"]:
        pytest.skip(f"nginx: {result['targets']['nginx']['reason']}")
    check_target(result, "nginx")
    added = result["runs"][0]["added_latency"]["chat_body_identity"]
    assert isinstance(added["nginx_minus_direct_p50_ms"], float)
    assert isinstance(result["runs"][0]["stream_added"]["ttfb"]["nginx_minus_direct_p50_ms"], float)
    assert result["runs"][0]["saturation_ratio"]["sidecar_over_nginx"] > 0


@needs_wrk
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_bare(result: dict[str, Any]) -> None:
    assert result["targets"]["bare"]["available"]
    assert "uvicorn" in result["targets"]["bare"]["what"]
    check_target(result, "bare")
    run = result["runs"][0]
    added = run["added_latency"]["chat_body_identity"]
    assert isinstance(added["bare_minus_direct_p50_ms"], float)
    assert isinstance(added["bare_minus_direct_p99_ms"], float)
    assert "sidecar_over_bare_p50" in added and "sidecar_over_bare_p99" in added
    assert isinstance(run["stream_added"]["ttfb"]["bare_minus_direct_p50_ms"], float)
    assert run["saturation"]["bare"]["cpu"]["proxy_cores"] > 0
    assert "redis_cores" not in run["saturation"]["bare"]["cpu"]
    assert "rss" not in run["saturation"]["bare"]
    # The sidecar's throughput as a share of the bare pass-through's, within the same run.
    rps = {t: run["saturation"][t]["requests_per_s"] for t in ("sidecar", "bare")}
    assert run["saturation_ratio"]["sidecar_over_bare"] == round(rps["sidecar"] / rps["bare"], 3)


@needs_wrk
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sidecar(result: dict[str, Any]) -> None:
    info = result["targets"]["sidecar"]
    assert info["available"], info
    assert info["body_identity_upserted"]
    check_target(result, "sidecar")
    run = result["runs"][0]
    assert "sidecar_minus_direct_p99_ms" in run["added_latency"]["embeddings_body_identity"]
    rss = run["saturation"]["sidecar"]["rss"]
    assert rss["tree"]["start_kb"] > 0 and rss["tree"]["samples"] >= 2
    assert rss["worker_processes"] >= 1 and rss["largest_worker"]["max_kb"] > 0
    assert run["saturation"]["sidecar"]["cpu"]["proxy_cores"] > 0
    assert run["saturation"]["sidecar"]["cpu"]["redis_cores"] >= 0
    check = result["attribution"]
    assert check["identities"] == 5
    # Every metered 2xx the harness saw was recorded (a few more may have been in flight).
    assert check["recorded_requests"] >= check["metered_2xx_sent"] > 0


@needs_wrk
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_summary_and_markdown(result: dict[str, Any]) -> None:
    summary = "\n".join(proxy_report.summary_table(result))
    header = "| figure | direct | nginx | bare | sidecar | sidecar / bare | sidecar / nginx |"
    if not result["targets"]["nginx"]["available"]:
        header = "| figure | direct | bare | sidecar | sidecar / bare |"
    assert header in summary
    assert "| added p50, chat_body_identity (ms) |" in summary
    assert "| saturation (requests/s) |" in summary
    ratio = result["runs"][0]["saturation_ratio"]["sidecar_over_bare"]
    saturation = next(line for line in summary.splitlines() if "saturation" in line)
    assert saturation.split(" | ")[-2 if "sidecar / nginx" in header else -1].strip(" |") == (
        f"{ratio:.2f}"
    )
    text = proxy_report.render_markdown(result)
    assert text.startswith("# Inline proxy benchmark\n")
    assert f"`{result['meta']['commit']}`" in text
    assert "`pytest tests/bench/test_proxy_bench.py`" in text
    for heading in ("## Summary", "## 1. Sequential", "## 2. Saturation", "## 3. Streams"):
        assert heading in text
    assert "## 4. Sidecar RSS" in text and "| process tree |" in text
    assert "| chat_body_identity | direct |" in text
    assert "| chat_body_identity | bare |" in text
    assert "Attribution check after the run: 5 bench identities" in text


def test_markdown_without_references_has_no_ratio_columns() -> None:
    meta = metadata("x", {}) | {"loadavg_end": [0.0, 0.0, 0.0]}
    meta["options"] = dataclasses.asdict(proxy.Options())
    targets = {"direct": {"available": True, "port": 1, "what": "mock"}}
    text = proxy_report.render_markdown({"meta": meta, "targets": targets, "runs": []})
    assert "- **bare**: not requested" in text
    assert "sidecar / bare" not in text and "| bare |" not in text
    assert "wrk -c1" not in text  # rows of figures the run did not measure are left out
