from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import search_bench


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_search_bench_end_to_end(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "search.json"
    argv = ["--identities", "3000", "--repeats", "1", "--queries", "3", "--scan-queries", "1"]
    assert search_bench.main([*argv, "--json", str(out)]) == 0
    (run,) = json.loads(out.read_text())["sizes"]
    assert run["identities"] == 3000 and run["build"]["indexed"] == 3000
    assert run["build"]["index_bytes_per_identity"] > 0
    reads = run["with_index"]
    assert reads["no match (7 random letters)"]["results_median"] == 0
    assert reads["one match (a random external id)"]["results_median"] == 1
    assert (
        reads["many matches (gmail, smith, john, user_, ann), page of 10"]["results_median"] == 10
    )
    assert reads["list, page of 10"]["results_median"] == 10
    assert run["without_index"]["search, no match (scan)"]["results_median"] == 0
    assert run["changes"]["erase_ms"]["n"] == 200
    assert "| many matches, page of 100 |" in capfd.readouterr().err
