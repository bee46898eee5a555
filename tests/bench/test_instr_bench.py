from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import instr_bench
from tests.support.bench import needs_callgrind


@needs_callgrind
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_instr_bench_end_to_end(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "instr.json"
    argv = ["--requests", "4", "--warmup", "3", "--repeats", "1", "--pause-ms", "10"]
    assert instr_bench.main([*argv, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    per = result["instructions_per_request"]
    # A proxied request is hundreds of thousands of instructions, the sidecar's more than
    # the bare pass-through's (it parses, attributes and records each one).
    assert 100_000 < per["bare"][0] < per["sidecar"][0] < 50_000_000
    assert result["ratios"]["sidecar / bare"] == [round(per["sidecar"][0] / per["bare"][0], 4)]
    assert "| sidecar |" in capfd.readouterr().err


def test_the_count_is_read_from_the_dump_just_written(tmp_path: Path) -> None:
    old = tmp_path / "callgrind.out.42.1"
    old.write_text("events: Ir\nsummary: 999\n")
    before = set(tmp_path.glob("callgrind.out.42.*"))
    (tmp_path / "callgrind.out.42.2").write_text("events: Ir\nfl=x\n0 5\ntotals: 123456\n")
    (tmp_path / "callgrind.out.7.1").write_text("totals: 1\n")  # another process's
    assert instr_bench.latest_total(tmp_path, 42, before) == 123456
