from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import idle_bench


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_idle_bench_end_to_end(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "idle.json"
    argv = ["--repeats", "2", "--identities", "3", "--rounds", "2", "--gap-ms", "5"]
    assert idle_bench.main([*argv, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["identities"] == 3 and result["idle_s"] == 0.01
    assert len(result["runs"]) == 2
    for run in result["runs"]:
        assert run["requests"] == 6  # 3 identities, 2 rounds: the first round is not counted
        for name in ("bare", "plain", "limits"):
            assert run[name]["p50"] > 0
        assert run["limits_over_bare_p50"] == round(run["limits"]["p50"] / run["bare"]["p50"], 3)
    printed = capfd.readouterr()
    assert printed.out == ""
    assert "| limits / bare, added p50 |" in printed.err


def test_a_missing_sidecar_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no such file"):
        idle_bench.main(["--sidecar-config", str(tmp_path / "none.toml")])


def test_a_negative_gap_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        idle_bench.main(["--gap-ms", "-1"])
    assert "must be between 0 and 60000 ms" in capsys.readouterr().err
