from __future__ import annotations

from pathlib import Path

import pytest

from bench.lib import config
from sidecar.settings import load


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
