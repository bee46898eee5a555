from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.cli import sidecar


@pytest.mark.slow
def test_check_config_ok_and_bad(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[server]\nport = 9000\n[upstream]\nurl = "http://127.0.0.1:4000"\n')
    ok = sidecar("check-config", "--config", str(good), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"{good}: ok"

    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nport = "x"\nbogus = 1\n[upstreams]\nurl = "x"\n')
    result = sidecar("check-config", "--config", str(bad), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"{bad}: server.bogus: unknown key",
        f"{bad}: server.port: expected `int`, got `str`",
        f"{bad}: upstreams: unknown key",
    ]  # fmt: skip


def test_check_config_reads_config_toml_in_the_working_folder(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("[nope]\n")
    result = sidecar("check-config", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "config.toml: nope: unknown key"
