from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import hooks_bench
from tests.support.bench import needs_wrk


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
