from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import instr_bench
from tests.support.bench import needs_callgrind


@needs_callgrind
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_lone_request_costs_the_sidecar_at_most_two_and_a_half_times_the_bare(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A work budget, counted (not timed, so it holds on a busy machine): a chat request with a
    body identity, its usage write included, 2.05x the bare pass-through's instructions since
    the usage writer's line (2.97x at the commit before, bench/RESULTS.md)."""
    out = tmp_path / "instr.json"
    argv = ["--requests", "20", "--warmup", "10", "--identities", "5", "--repeats", "1", "--redis"]
    assert instr_bench.main([*argv, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    per = result["instructions_per_request"]
    # A proxied request is hundreds of thousands of instructions, the sidecar's more than
    # the bare pass-through's (it parses, attributes and records each one).
    assert 100_000 < per["bare"][0] < per["sidecar"][0] < 50_000_000
    assert result["ratios"]["sidecar / bare"] == [round(per["sidecar"][0] / per["bare"][0], 4)]
    assert result["ratios"]["sidecar / bare"][0] < 2.5
    # --redis: what the same requests cost the store, counted over the sidecar's window (the
    # usage write and the index update at least: tens of thousands of instructions).
    assert 10_000 < result["redis_instructions_per_request"]["sidecar"][0] < 50_000_000
    assert "| sidecar |" in capfd.readouterr().err


def test_the_count_is_read_from_the_dump_just_written(tmp_path: Path) -> None:
    old = tmp_path / "callgrind.out.42.1"
    old.write_text("events: Ir\nsummary: 999\n")
    before = set(tmp_path.glob("callgrind.out.42.*"))
    (tmp_path / "callgrind.out.42.2").write_text("events: Ir\nfl=x\n0 5\ntotals: 123456\n")
    (tmp_path / "callgrind.out.7.1").write_text("totals: 1\n")  # another process's
    assert instr_bench.latest_total(tmp_path, 42, before) == 123456
