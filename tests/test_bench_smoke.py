"""Smoke test of bench/proxy_bench.py: a tiny run against the mock, nginx, the bare proxy and the
sidecar; and the bare proxy (bench/bare_proxy.py) on its own, in process."""

from __future__ import annotations

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

from bench import proxy_bench as pb
from bench.bare_proxy import BareProxy, request_headers, response_headers
from sidecar.mock import start_mock
from sidecar.settings import load
from sidecar.testing.redis_server import free_port
from sidecar.testing.serving import serve

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
    opts = pb.Options(
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
        rss_interval=0.25,
        command="pytest tests/test_bench_smoke.py",
    )
    return pb.run_benchmark(opts)


def check_sequential(stats: Mapping[str, Any], requests: int) -> None:
    assert stats["n"] == requests
    assert stats["errors"] == 0
    assert 0 < stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"] <= stats["max_ms"]


def check_target(result: Mapping[str, Any], target: str) -> None:
    run = result["runs"][0]
    for scenario in pb.SEQUENTIAL_SCENARIOS:
        check_sequential(run["latency"][scenario][target], 40)
    stream = run["stream"][target]
    assert stream["n"] == 4 and stream["errors"] == 0
    assert 0 < stream["ttfb"]["p50_ms"] < stream["last_byte"]["p50_ms"]
    # Four paced content chunks arrive as separate reads unless something buffers them.
    assert stream["reads_median"] >= 4
    wrk = run["saturation"][target]
    assert wrk["source"] == "lua"
    assert wrk["requests"] > 0 and wrk["requests_per_s"] > 0
    assert 0 < wrk["p50_ms"] <= wrk["p99_ms"]
    assert wrk["http_errors"] == 0 and wrk["socket_errors"] == 0
    assert wrk["cpu"]["wrk_cores"] >= 0 and wrk["cpu"]["upstream_cores"] > 0
    assert wrk["cpu"]["machine_busy_cores"] > 0
    assert result["summary"][f"saturation.{target}.requests_per_s"]["median"] > 0


@needs_wrk
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
            assert not pb.port_open(info["port"]), "a target is still listening after the run"


@needs_wrk
@pytest.mark.timeout(120)
def test_nginx(result: dict[str, Any]) -> None:
    if not result["targets"]["nginx"]["available"]:
        pytest.skip(f"nginx: {result['targets']['nginx']['reason']}")
    check_target(result, "nginx")
    added = result["runs"][0]["added_latency"]["chat_body_identity"]
    assert isinstance(added["nginx_minus_direct_p50_ms"], float)
    assert isinstance(result["runs"][0]["stream_added"]["ttfb"]["nginx_minus_direct_p50_ms"], float)


@needs_wrk
@pytest.mark.timeout(120)
def test_bare(result: dict[str, Any]) -> None:
    assert result["targets"]["bare"]["available"]
    assert "uvicorn" in result["targets"]["bare"]["what"]
    check_target(result, "bare")
    run = result["runs"][0]
    added = run["added_latency"]["chat_body_identity"]
    assert isinstance(added["bare_minus_direct_p50_ms"], float)
    assert isinstance(added["bare_minus_direct_p99_ms"], float)
    if result["targets"]["sidecar"]["available"]:
        assert "sidecar_over_bare_p50" in added and "sidecar_over_bare_p99" in added
    assert isinstance(run["stream_added"]["ttfb"]["bare_minus_direct_p50_ms"], float)
    assert run["saturation"]["bare"]["cpu"]["proxy_cores"] > 0
    assert "redis_cores" not in run["saturation"]["bare"]["cpu"]
    assert "rss" not in run["saturation"]["bare"]


@needs_wrk
@pytest.mark.timeout(120)
def test_sidecar(result: dict[str, Any]) -> None:
    info = result["targets"]["sidecar"]
    if not info["available"]:
        pytest.skip(f"sidecar target unavailable: {info['reason']}")
    check_target(result, "sidecar")
    run = result["runs"][0]
    assert "sidecar_minus_direct_p99_ms" in run["added_latency"]["embeddings_body_identity"]
    rss = run["saturation"]["sidecar"]["rss"]
    assert rss["tree"]["start_kb"] > 0 and rss["tree"]["samples"] >= 2
    assert rss["worker_processes"] >= 1 and rss["largest_worker"]["max_kb"] > 0
    assert run["saturation"]["sidecar"]["cpu"]["proxy_cores"] > 0
    assert run["saturation"]["sidecar"]["cpu"]["redis_cores"] >= 0
    assert result["attribution"]["metered_2xx_sent"] > 0


@needs_wrk
@pytest.mark.timeout(120)
def test_markdown(result: dict[str, Any]) -> None:
    text = pb.render_markdown(result)
    assert text.startswith("# Inline proxy benchmark\n")
    assert f"`{result['meta']['commit']}`" in text
    assert "`pytest tests/test_bench_smoke.py`" in text
    for heading in ("## 1. Added latency", "## 2. Saturation", "## 3. Streams", "## 4. Sidecar"):
        assert heading in text
    assert "| chat_body_identity | direct |" in text
    assert "| chat_body_identity | bare |" in text
    assert "| direct |" in text and "| bare |" in text
    assert "| bare - direct p50 | bare - direct p99 |" in text
    assert "(sidecar - direct) / (bare - direct), p99" in text
    assert "| nginx - direct | bare - direct | (sidecar - direct) / (bare - direct) |" in text


def test_markdown_without_the_bare_proxy_has_no_bare_columns() -> None:
    opts = pb.Options(command="x")
    meta = pb.metadata(opts) | {"loadavg_end": [0.0, 0.0, 0.0]}
    targets = {"direct": {"available": True, "port": 1, "what": "mock"}}
    text = pb.render_markdown({"meta": meta, "targets": targets, "runs": [], "summary": {}})
    assert "- **bare**: not requested" in text
    assert "bare - direct" not in text
    assert "| request | sidecar - direct p50 |" in text


def test_wrk_text_report_is_parsed() -> None:
    parsed = pb.parse_wrk(WRK_TEXT)
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
    parsed = pb.parse_wrk(WRK_TEXT + line + "\n")
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
    added = pb.added_latency(by_target)
    assert added["sidecar_minus_direct_p50_ms"] == 0.3
    assert added["nginx_minus_direct_p99_ms"] == 0.1
    assert added["sidecar_over_nginx_p50"] == 6.0
    assert added["bare_minus_direct_p50_ms"] == 0.1
    assert added["bare_minus_direct_p99_ms"] == 0.5
    assert added["sidecar_over_bare_p50"] == 3.0
    assert added["sidecar_over_bare_p99"] == 2.0
    by_target["nginx"] = {"p50_ms": 0.2, "p99_ms": 0.4}
    by_target["bare"] = {"p50_ms": 0.2, "p99_ms": 0.4}
    again = pb.added_latency(by_target)
    assert again["sidecar_over_nginx_p50"] is None
    assert again["sidecar_over_bare_p50"] is None and again["sidecar_over_bare_p99"] is None
    del by_target["bare"]
    assert not any(k.startswith(("bare", "sidecar_over_bare")) for k in pb.added_latency(by_target))


def test_statistics() -> None:
    assert pb.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert pb.percentile(list(map(float, range(1, 101))), 99) == 99.0
    assert pb.slope_per_minute([(0.0, 100.0), (30.0, 150.0), (60.0, 200.0)]) == 100.0
    assert pb.slope_per_minute([(0.0, 1.0)]) is None
    runs: list[dict[str, Any]] = [
        {"a": {"b": 1.0}, "c": True},
        {"a": {"b": 3.0}},
        {"a": {"b": 2.0}},
    ]
    assert pb.aggregate(runs) == {"a.b": {"median": 2.0, "min": 1.0, "max": 3.0, "runs": [1, 3, 2]}}


def test_rss_sampler_reads_a_process_tree() -> None:
    # A process of its own: the test process has children of other tests' fixtures.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pb.RssSampler(child.pid, interval=0.05) as sampler:
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
    written = pb.sidecar_config(pb.Options(sidecar_config=str(given), workers=4), out)
    settings = load(str(written), env={})
    assert settings.server.workers == 4
    assert settings.server.max_body_bytes == 4096
    assert settings.policies.paths == [str(folder / "policies/*.toml")]
    assert settings.api_keys[0].owner == "user_123"
    assert "my-finetune" in settings.pricing.models
    default = pb.sidecar_config(pb.Options(), tmp_path)
    assert load(str(default), env={}).server.workers == 1


def test_sidecar_env_pairs() -> None:
    assert pb.parse_env_pairs(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}
    with pytest.raises(ValueError, match="NAME=VALUE"):
        pb.parse_env_pairs(["nope"])


@pytest.mark.timeout(60)
def test_a_target_that_does_not_meter_is_reported_not_fatal(tmp_path: Path) -> None:
    chat = pb.scenarios(pb.Options(identities=1))["chat_body_identity"]
    reason = pb.probe_metered(free_port(), chat)
    assert reason is not None and "failed" in reason
    proc, port = pb.start_mock(tmp_path)
    try:
        assert pb.probe_metered(port, chat) is None
        nowhere = pb.Scenario("nowhere", "/v1/no-such-route", chat.requests)
        reason = pb.probe_metered(port, nowhere)
        assert reason is not None and "answered 404" in reason
    finally:
        proc.stop()
    assert not proc.alive()


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
        (b"x-custom", b"kept"),
    ]
    assert request_headers(sent) == [("content-type", "application/json"), ("x-custom", "kept")]
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
    chat = pb.chat_body(0)
    try:
        async with serve(BareProxy(mock.url)) as url, aiohttp.ClientSession() as client:
            headers = pb.base_headers() | {
                "Proxy-Authorization": "Basic eA==",
                "TE": "trailers",
                "X-Custom": "kept",
            }
            # Sent as is (no re-quoting on this side): the proxy must not re-quote either.
            raw = URL(url + pb.CHAT_PATH + "?a=1&b=%2F", encoded=True)
            async with client.post(raw, data=chat, headers=headers) as response:
                assert response.status == 200
                body = await response.read()
                assert response.headers["Content-Length"] == str(len(body))
                assert isinstance((await response.json())["usage"], dict)
            paced = pb.base_headers() | {"x-mock-chunks": "3", "x-mock-chunk-delay-ms": "1"}
            async with client.post(
                url + pb.CHAT_PATH, data=pb.chat_body(1, stream=True), headers=paced
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
    assert (first.method, first.path, first.query) == ("POST", pb.CHAT_PATH, "a=1&b=%2F")
    assert first.body == chat
    assert first.header("x-custom") == "kept"
    assert first.header("authorization") == f"Bearer {pb.API_KEY}"
    assert first.header("host") == f"127.0.0.1:{mock.port}"
    assert first.header("proxy-authorization") is None and first.header("te") is None
    assert len(mock.requests) == 3
