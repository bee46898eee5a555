from __future__ import annotations

import sys
from pathlib import Path

import pytest

from sidecar.settings import ConfigError, load, parse

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return str(path)


def problems(path: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(path, env=env or {})
    return info.value.problems


def test_defaults_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load(env={})
    assert settings.server.port == 8080
    assert settings.redis.url is None
    assert settings.identity.header == "X-ORQ-IDENTITY-ID"
    assert settings.source == "<defaults>"


def test_example_config_documents_a_valid_config() -> None:
    settings = load(str(ROOT / "config.example.toml"), env={})
    assert settings.upstream.url == "http://127.0.0.1:4000"
    assert settings.api_keys[0].owner == "tenant-acme"
    assert settings.pricing.models["my-finetune"].output_per_mtok == 2.0


def test_example_config_names_every_key() -> None:
    text = (ROOT / "config.example.toml").read_text()
    from sidecar import settings as module

    for section, struct in module._SECTIONS.items():
        assert f"[{section}" in text
        if section == "pricing":
            continue
        for field in struct.__struct_fields__:
            assert f"{field} =" in text, f"{section}.{field} is not documented"


def test_environment_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nport = 1\n[redis]\nurl = "redis://a:1/0"\n')
    env = {
        "SIDECAR_PORT": "9999",
        "SIDECAR_HOST": "0.0.0.0",
        "SIDECAR_REDIS_URL": "redis://b:2/0",
        "SIDECAR_UPSTREAM_URL": "http://up:4000",
        "SIDECAR_ADMIN_TOKEN": "x" * 20,
        "SIDECAR_DATA_DIR": "/var/lib/sidecar",
        "SIDECAR_WORKERS": "3",
    }
    s = load(path, env=env)
    assert s.server.workers == 3
    assert (s.server.port, s.server.host, s.redis.url) == (9999, "0.0.0.0", "redis://b:2/0")
    assert s.upstream.url == "http://up:4000"
    assert s.admin.token == "x" * 20
    assert s.data_path == Path("/var/lib/sidecar")


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 1234\n")
    assert load(env={"SIDECAR_CONFIG": path}).server.port == 1234


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\ndata_dir = "state"\n')
    assert load(path, env={}).data_path == tmp_path / "state"


def test_every_problem_is_reported_with_file_and_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
prot = 1
[server]
port = "eighty"
[redis]
url = "http://nope"
timeout_ms = 50
colour = "red"
[[api_keys]]
sha256 = "abc"
owner = "x"
[[api_keys]]
owner = "y"
[identity]
required = "yes"
""",
    )
    found = problems(path)
    assert found == [
        f"{path}: prot: unknown key",
        f"{path}: server.port: expected `int`, got `str`",
        f"{path}: redis.colour: unknown key",
        f"{path}: api_keys[1].sha256: required key missing",
        f"{path}: identity.required: expected `bool`, got `str`",
    ]


def test_value_checks(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[server]
port = 70000
[redis]
url = "http://nope"
on_error = "maybe"
""",
    )
    assert problems(path) == [f"{path}: redis.on_error: invalid enum value 'maybe'"]
    path = write(tmp_path, '[limits]\nunpriced = "free"\n')
    assert problems(path) == [f"{path}: limits.unpriced: invalid enum value 'free'"]
    path = write(tmp_path, '[limits]\nopaque_input = "queue"\n')
    assert problems(path) == [f"{path}: limits.opaque_input: invalid enum value 'queue'"]
    path = write(
        tmp_path, '[server]\nport = 70000\n[redis]\nurl = "http://nope"\nwarm_connections = 513\n'
    )
    found = problems(path)
    assert f"{path}: server.port: must be 0-65535" in found
    assert f"{path}: redis.warm_connections: must be 0-512" in found
    assert any(p.startswith(f"{path}: redis.url: scheme must be one of") for p in found)


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[server\n")
    (only,) = problems(path)
    assert only.startswith(f"{path}: invalid TOML")
    assert problems(str(tmp_path / "absent.toml")) == [f"{tmp_path / 'absent.toml'}: no such file"]


def test_bad_environment_value(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    assert problems(path, {"SIDECAR_PORT": "http"}) == [
        f"{path}: SIDECAR_PORT: expected an integer, got 'http'"
    ]
    assert problems(path, {"SIDECAR_WORKERS": "0"}) == [
        f"{path}: server.workers: must be at least 1"
    ]


def test_api_key_digest_must_be_sha256() -> None:
    with pytest.raises(ConfigError) as info:
        parse({"api_keys": [{"sha256": "secret-key", "owner": "u"}]})
    assert info.value.problems == ["api_keys[0].sha256: must be 64 lowercase hex digits"]


def test_notifiers_are_read_and_checked(tmp_path: Path) -> None:
    good = write(
        tmp_path,
        '[[notifiers]]\nname = "ops"\nurl = "https://hooks.example.com/b"\n'
        'secret = "0123456789abcdef"\n\n'
        '[[notifiers]]\nname = "slack"\nurl = "http://127.0.0.1:9/x"\nformat = "slack"\n',
    )
    ops, slack = load(good, env={}).notifiers
    assert (ops.name, ops.format, ops.secret) == ("ops", "json", "0123456789abcdef")
    assert (slack.format, slack.secret) == ("slack", None)
    bad = write(
        tmp_path,
        '[[notifiers]]\nname = "ops"\nurl = "ftp://x"\nsecret = "short"\n\n'
        '[[notifiers]]\nname = "ops"\nurl = "https://x"\nformat = "teams"\n\n'
        '[[notifiers]]\nname = "a b"\nurl = "https://x"\ncolour = 1\n\n'
        '[[notifiers]]\nurl = "https://x"\n',
    )
    found = problems(bad)
    assert all(p.startswith(f"{bad}: notifiers[") for p in found), found
    assert {p.split(": ", 2)[1] for p in found} == {
        "notifiers[1].format",
        "notifiers[2].colour",
        "notifiers[3].name",
    }  # types and unknown keys first; the values are checked once those are right
    fixed = write(
        tmp_path,
        '[[notifiers]]\nname = "ops"\nurl = "ftp://x"\nsecret = "short"\n\n'
        '[[notifiers]]\nname = "ops"\nurl = "https://x"\n\n'
        '[[notifiers]]\nname = "a b"\nurl = "https://x"\n',
    )
    assert [p.split(": ", 2)[1] for p in problems(fixed)] == [
        "notifiers[0].url",
        "notifiers[0].secret",
        "notifiers[1].name",
        "notifiers[2].name",
    ]
    scalar = write(tmp_path, "notifiers = 1\n")
    assert problems(scalar) == [f"{scalar}: notifiers: expected an array of tables ([[notifiers]])"]


def test_telemetry_settings(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[telemetry]\nenabled = true\nendpoint = "https://otel.example.com/v1/traces"\n'
        'headers = { authorization = "Bearer abc", "x-scope-orgid" = "t1" }\nsample_ratio = 0.25\n',
    )
    telemetry = load(path, env={}).telemetry
    assert telemetry.enabled and telemetry.sample_ratio == 0.25
    assert telemetry.headers == {"authorization": "Bearer abc", "x-scope-orgid": "t1"}
    assert telemetry.service_name == "llm-sidecar"
    assert load(write(tmp_path, ""), env={}).telemetry.enabled is False
    text = (
        '[telemetry]\nendpoint = "collector:4318"\nservice_name = " "\nsample_ratio = 1.5\n'
        'timeout_s = 0\nheaders = { "bad name" = "x", ok = "two\\nlines" }\n'
    )
    bad = write(tmp_path, text + "port = 1\n")
    assert problems(bad) == [f"{bad}: telemetry.port: unknown key"]
    bad = write(tmp_path, text)
    assert problems(bad) == [
        f"{bad}: telemetry.endpoint: must be an http:// or https:// URL",
        f"{bad}: telemetry.service_name: must be 1-255 characters",
        f"{bad}: telemetry.headers: 'bad name' is not an HTTP header name",
        f"{bad}: telemetry.headers.ok: must be printable ASCII on one line",
        f"{bad}: telemetry.sample_ratio: must be between 0 and 1",
        f"{bad}: telemetry.timeout_s: must be between 0.1 and 300",
    ]


@pytest.mark.parametrize(
    "module", ["opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http.trace_exporter"]
)
def test_telemetry_without_the_otel_extra_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, module: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: import fails
    with pytest.raises(ConfigError) as info:
        parse({"telemetry": {"enabled": True}})
    assert info.value.problems == [
        "telemetry.enabled: needs the `otel` extra, which is not installed (pip install "
        f"'llm-identity-sidecar[otel]'): no module {module}"
    ]
    assert parse({"telemetry": {"enabled": False}}).telemetry.enabled is False
