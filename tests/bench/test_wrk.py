from __future__ import annotations

from bench.lib import wrk

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
