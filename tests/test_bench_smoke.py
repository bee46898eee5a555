"""The benchmark harness end to end in short runs (the proxy bench against the mock, nginx, the
bare pass-through and the sidecar; rounds of wrk; the hook bench), its pieces on their own, and
the bare pass-through (bench/bare_proxy.py) in process."""

from __future__ import annotations

import ast
import dataclasses
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from bench import hooks_bench, models_bench
from bench.bare_proxy import BareProxy, request_headers, response_headers
from bench.lib import cli, config, payloads, proxy, proxy_report, report, rounds, wrk
from bench.lib.client import Target, probe_metered
from bench.lib.meta import metadata
from bench.lib.processes import Launcher, StartError, port_open
from bench.lib.sampling import RssSampler
from sidecar.mock import start_mock
from sidecar.settings import load
from sidecar.testing.redis_server import free_port
from sidecar.testing.serving import serve

ROOT = Path(__file__).resolve().parent.parent
needs_wrk = pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")

WRK_TEXT = """Running 2s test @ http://127.0.0.1:38813/v1/chat/completions
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     3.69ms    1.00ms  19.02ms   75.17%
    Req/Sec     8.64k   682.92     9.69k    65.00%
  Latency Distribution
     50%  812.00us
     75%    4.13ms
     90%    4.73ms
     99%    1.22s
  34402 requests in 2.01s, 22.97MB read
  Socket errors: connect 0, read 3, write 0, timeout 2
  Non-2xx or 3xx responses: 7
Requests/sec:  17111.66
Transfer/sec:     11.42MB
"""


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
        command="pytest tests/test_bench_smoke.py",
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
    # Four paced content chunks arrive as separate reads unless something buffers them.
    assert stream["reads_median"] >= 4
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
    assert meta["command"] == "pytest tests/test_bench_smoke.py"
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
    assert "`pytest tests/test_bench_smoke.py`" in text
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


@needs_wrk
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_rounds_give_each_sidecar_its_ratio_to_the_references(tmp_path: Path) -> None:
    with Launcher("rounds-test-", str(tmp_path)) as launcher:
        rig = rounds.rig(launcher, 5)
        assert "bare" in rig.reference_names
        redis = launcher.redis()
        path, workers = config.sidecar_config(launcher.folder("one"))
        assert workers == 1
        one = launcher.sidecar("one", path, redis.url, rig.upstream, rig.probe)
        rig.redis_pids["one"] = [redis.process.pid] if redis.process else []
        measured = rounds.measure(
            rig, [one], repeats=2, duration=1, warmup=0, load=wrk.Load(1, 4), label="test "
        )
        procs = list(launcher.procs.values())
    assert procs and not any(p.alive() for p in procs)
    assert redis.process is not None and redis.process.poll() is not None
    runs = measured["runs"]
    names = [*rig.reference_names, "one"]
    assert runs[0]["order"] == names and runs[1]["order"] == list(reversed(names[1:] + names[:1]))
    for run in runs:
        assert run["one"]["http_errors"] == 0 and run["one"]["cpu"]["redis_cores"] >= 0
        assert run["one"]["cpu"]["proxy_us_per_request"] > 0
    over = measured["summary"]["one"]["over_bare"]
    expected = [round(r["one"]["requests_per_s"] / r["bare"]["requests_per_s"], 3) for r in runs]
    assert over["runs"] == expected and over["min"] <= over["median"] <= over["max"]
    table = "\n".join(rounds.table(measured, rig))
    assert "| target | requests/s | / " in table and "| one |" in table


@needs_wrk
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_hooks_bench_end_to_end(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "hooks.json"
    markdown = tmp_path / "hooks.md"
    argv = ["--repeats", "1", "--duration", "1", "--connections", "4", "--json", str(out)]
    assert hooks_bench.main([*argv, "--markdown", str(markdown)]) == 0
    result = json.loads(out.read_text())
    authorize = result["authorize"][0]
    # Every decision answered 200: the token and identity headers reached the sidecar.
    assert authorize["requests"] > 0 and authorize["http_errors"] == 0
    assert authorize["source"] == "lua"
    assert result["healthz_floor"][0]["requests_per_s"] > 0
    assert result["summary"]["authorize"]["over_healthz"]["runs"] == [
        round(authorize["requests_per_s"] / result["healthz_floor"][0]["requests_per_s"], 3)
    ]
    printed = capfd.readouterr()
    assert printed.out == ""  # with --json FILE, nothing on stdout
    assert "| target | requests/s | / healthz |" in printed.err
    assert "| target | requests/s | / healthz |" in markdown.read_text()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_models_bench_end_to_end(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "models.json"
    argv = ["--memory-identities", "20", "--identities", "30", "--days", "2", "--repeats", "1"]
    assert models_bench.main([*argv, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    memory = result["memory"]
    assert memory["by_model"] is True and memory["memory_usage_model_hash_per_day"] > 0
    assert memory["used_memory_bytes_per_identity_day"] > memory["memory_usage_day_hash_per_day"]
    export = result["export"]
    # Each answer was checked against what was written; here, its size.
    assert export["group_by=model"]["rows"] == 3
    assert export["group_by=identity,model"]["rows"] == 90
    assert export["group_by=identity"]["rows"] == 30
    assert export["group_by=model"]["csv_total_s"] > 0
    assert "| group_by=model | 3 |" in capfd.readouterr().err


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


def test_wrk_text_report_is_parsed() -> None:
    parsed = wrk.parse_wrk(WRK_TEXT)
    assert parsed["source"] == "text"
    assert parsed["requests_per_s"] == 17111.66
    assert parsed["requests"] == 34402
    assert parsed["p50_ms"] == 0.812 and parsed["p99_ms"] == 1220.0
    assert parsed["socket_errors"] == 5 and parsed["http_errors"] == 7


def test_wrk_lua_line_wins() -> None:
    line = (
        'WRK_JSON {"duration_us":2000000,"requests":1000,"bytes":1,"errors":{"connect":1,"read":0,'
        '"write":0,"status":2,"timeout":0},"latency_us":{"min":1,"mean":1500.0,"stdev":1.0,'
        '"max":9000,"p50":1200,"p75":1300,"p90":1400,"p99":2500,"p999":8000}}'
    )
    parsed = wrk.parse_wrk(WRK_TEXT + line + "\n")
    assert parsed["source"] == "lua"
    assert parsed["requests_per_s"] == 500.0
    assert parsed["p50_ms"] == 1.2 and parsed["p99_ms"] == 2.5
    assert parsed["http_errors"] == 2 and parsed["socket_errors"] == 1


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


def test_rss_sampler_reads_a_process_tree() -> None:
    # A process of its own: the test process has children of other tests' fixtures.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with RssSampler(child.pid, interval=0.05) as sampler:
            time.sleep(0.2)
    finally:
        child.kill()
        child.wait()
    out = sampler.result(workers=1, series=True)
    assert out["tree"]["samples"] >= 3 and out["tree"]["start_kb"] > 0
    assert out["worker_processes"] == 1 and out["processes"][0]["role"] == "main"
    assert len(out["series"]) == out["tree"]["samples"]


def test_sidecar_config_keeps_the_given_file_and_sets_workers(tmp_path: Path) -> None:
    folder = tmp_path / "conf"
    folder.mkdir()
    given = folder / "config.toml"
    given.write_text(
        '[server]\nworkers = 2\nmax_body_bytes = 4096\n\n[policies]\npaths = ["policies/*.toml"]\n'
        '\n[pricing.models."my-finetune"]\ninput_per_mtok = 1.0\noutput_per_mtok = 2.0\n'
        '\n[[api_keys]]\nsha256 = "' + "0" * 64 + '"\nowner = "user_123"\n',
        encoding="utf-8",
    )
    out = tmp_path / "out"
    out.mkdir()
    written, workers = config.sidecar_config(
        out, str(given), workers=4, overrides={"server": {"metrics": False}}
    )
    settings = load(str(written), env={})
    assert workers == settings.server.workers == 4
    assert settings.server.max_body_bytes == 4096 and settings.server.metrics is False
    assert settings.policies.paths == [str(folder / "policies/*.toml")]
    assert settings.api_keys[0].owner == "user_123"
    assert "my-finetune" in settings.pricing.models
    default, workers = config.sidecar_config(tmp_path, overrides=config.limits())
    assert workers == 1 and load(str(default), env={}).server.workers == 1
    assert load(str(default), env={}).policies.paths == [str(config.LIMITS_POLICY)]


def test_sidecar_env_pairs() -> None:
    assert config.parse_env_pairs(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}
    with pytest.raises(ValueError, match="NAME=VALUE"):
        config.parse_env_pairs(["nope"])


@pytest.mark.timeout(60)
def test_a_target_that_does_not_answer_as_expected_is_reported(tmp_path: Path) -> None:
    chat = payloads.chat(1)
    reason = probe_metered(free_port(), chat)
    assert reason is not None and "failed" in reason
    with Launcher("probe-test-", str(tmp_path)) as launcher:
        upstream = launcher.mock()
        assert probe_metered(upstream.port, chat) is None
        nowhere = payloads.Scenario("nowhere", "/v1/no-such-route", chat.requests)
        reason = probe_metered(upstream.port, nowhere)
        assert reason is not None and "answered 404" in reason
        with pytest.raises(StartError, match="answered 404"):
            launcher.checked(Target("x", upstream.port, upstream.pid), "x", nowhere)
        mock = launcher.procs["mock-upstream"]
    assert not mock.alive()


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_bench_needs_nothing_from_tests_and_the_sidecar_nothing_from_its_testing_helpers() -> None:
    bench = {p: imports(p) for p in (ROOT / "bench").rglob("*.py")}
    assert bench and not {p: m for p, m in bench.items() if any(i.startswith("tests") for i in m)}
    testing = ROOT / "sidecar" / "testing"
    served = {p: imports(p) for p in (ROOT / "sidecar").rglob("*.py") if testing not in p.parents}
    assert not {p: m for p, m in served.items() if any("sidecar.testing" in i for i in m)}


def test_bare_proxy_header_filters() -> None:
    sent = [
        (b"content-type", b"application/json"),
        (b"Connection", b"keep-alive"),
        (b"keep-alive", b"timeout=5"),
        (b"te", b"trailers"),
        (b"trailer", b"x"),
        (b"transfer-encoding", b"chunked"),
        (b"upgrade", b"h2c"),
        (b"host", b"example.com"),
        (b"content-length", b"12"),
        (b"Proxy-Authorization", b"Basic eA=="),
        (b"proxy-connection", b"keep-alive"),
        (b"X-Custom", b"kept"),
    ]
    assert request_headers(sent) == [("content-type", "application/json"), ("X-Custom", "kept")]
    answered = [
        (b"Content-Type", b"application/json"),
        (b"Content-Length", b"12"),
        (b"Connection", b"close"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Proxy-Authenticate", b"Basic"),
        (b"X-Request-Id", b"abc"),
    ]
    assert response_headers(answered) == [
        (b"content-type", b"application/json"),
        (b"content-length", b"12"),
        (b"x-request-id", b"abc"),
    ]


@pytest.mark.timeout(30)
async def test_bare_proxy_forwards_json_streams_and_errors() -> None:
    mock = await start_mock()
    chat = payloads.chat_body(0)
    try:
        async with serve(BareProxy(mock.url)) as url, aiohttp.ClientSession() as client:
            headers = payloads.base_headers() | {
                "Proxy-Authorization": "Basic eA==",
                "TE": "trailers",
                "X-Custom": "kept",
            }
            # Sent as is (no re-quoting on this side): the proxy must not re-quote either.
            raw = URL(url + payloads.CHAT_PATH + "?a=1&b=%2F", encoded=True)
            async with client.post(raw, data=chat, headers=headers) as response:
                assert response.status == 200
                body = await response.read()
                assert response.headers["Content-Length"] == str(len(body))
                assert isinstance((await response.json())["usage"], dict)
            paced = payloads.base_headers() | {"x-mock-chunks": "3", "x-mock-chunk-delay-ms": "1"}
            async with client.post(
                url + payloads.CHAT_PATH, data=payloads.chat_body(1, stream=True), headers=paced
            ) as response:
                assert response.status == 200
                assert response.headers["Content-Type"].startswith("text/event-stream")
                assert "Content-Length" not in response.headers
                assert (await response.read()).rstrip().endswith(b"data: [DONE]")
            async with client.post(url + "/v1/no-such-route", data=chat) as response:
                assert response.status == 404
        nowhere = BareProxy(f"http://127.0.0.1:{free_port()}")
        async with (
            serve(nowhere) as url,
            aiohttp.ClientSession() as client,
            client.get(url + "/v1/models") as gone,
        ):
            assert gone.status == 502
    finally:
        await mock.close()
    first = mock.requests[0]
    assert (first.method, first.path, first.query) == ("POST", payloads.CHAT_PATH, "a=1&b=%2F")
    assert first.body == chat
    assert first.header("x-custom") == "kept"
    assert first.header("authorization") == f"Bearer {payloads.API_KEY}"
    assert first.header("host") == f"127.0.0.1:{mock.port}"
    assert first.header("proxy-authorization") is None and first.header("te") is None
    assert len(mock.requests) == 3
