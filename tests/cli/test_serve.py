from __future__ import annotations

import gc
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from sidecar.cli import build_parser
from sidecar.cli.serve import GC_YOUNG, protected_mode, settle_heap
from sidecar.settings import parse
from sidecar.testing.redis_server import free_port
from tests.support.cli import clean_env, sidecar


def test_serve_with_telemetry_and_without_the_otel_extra_stops_on_a_config_error(
    tmp_path: Path,
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        '[telemetry]\nenabled = true\nheaders = { authorization = "Bearer s3cret-1" }\n'
    )
    # The extra's exporter made unimportable, as when it is not installed.
    main = (
        "import sys; sys.modules['opentelemetry.exporter.otlp.proto.http'] = None; "
        "from sidecar.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", main, "serve", "--config", str(config)],
        cwd=tmp_path, env=clean_env(SIDECAR_DATA_DIR=str(tmp_path / "data")),
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"{config}: telemetry.enabled: needs the `otel` extra, which is not installed (pip "
        "install 'llm-identity-sidecar[otel]'): no module "
        "opentelemetry.exporter.otlp.proto.http.trace_exporter"
    ]
    assert not (tmp_path / "data").exists()  # nothing was started


@contextmanager
def serving(
    tmp_path: Path, port: int, stop: signal.Signals = signal.SIGINT
) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    env = clean_env(SIDECAR_DATA_DIR=str(tmp_path / "data"), SIDECAR_PORT=str(port))
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "serve"], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: list[str] = []
    assert proc.stdout is not None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if line.startswith("sidecar listening"):
            break
    for _ in range(200):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.05)
    try:
        yield proc, lines
    finally:
        proc.send_signal(stop)
        rest, _ = proc.communicate(timeout=20)
        lines += rest.splitlines()


@pytest.mark.slow
def test_serve_on_the_embedded_store_keeps_identities_across_restarts(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with serving(tmp_path, port, stop=signal.SIGTERM) as (proc, lines):  # as Docker stops it
        token_lines = [line for line in lines if "shown once" in line]
        assert len(token_lines) == 1, lines
        token = token_lines[0].rsplit(" ", 1)[1]
        assert any("embedded Redis" in line for line in lines), lines
        auth = {"Authorization": f"Bearer {token}"}
        r = httpx.post(f"{url}/v2/identities", json={"external_id": "persisted"}, headers=auth)
        assert r.status_code == 201, r.text
    assert proc.returncode == 0, lines
    token_file = tmp_path / "data" / "admin_token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert token_file.read_text().strip() == token
    assert not (tmp_path / "data" / "redis.sock").exists(), "embedded Redis left running"
    assert any("embedded Redis stopped" in line for line in lines)

    with serving(tmp_path, port) as (_, lines):
        assert not any(token in line for line in lines), "the token is printed only once"
        got = httpx.get(f"{url}/v2/identities/persisted", headers=auth)
        assert got.status_code == 200, got.text
        assert got.json()["external_id"] == "persisted"


def test_protected_mode_refuses_a_public_bind_with_default_trust(tmp_path: Path) -> None:
    env = clean_env(SIDECAR_HOST="0.0.0.0", SIDECAR_DATA_DIR=str(tmp_path / "data"))
    refused = sidecar("serve", cwd=tmp_path, env=env)
    assert refused.returncode == 2
    message = refused.stderr
    assert "refusing to listen on 0.0.0.0" in message
    for way_out in ('trust = "keys"', "trusted_networks", 'trust = "any" written out'):
        assert way_out in message
    assert not (tmp_path / "data").exists()  # refused before anything started


@pytest.mark.parametrize(
    ("host", "extra", "refused"),
    [
        ("127.0.0.1", {}, False),
        ("::1", {}, False),
        ("localhost", {}, False),
        ("0.0.0.0", {}, True),
        ("10.1.2.3", {}, True),
        ("0.0.0.0", {"trust": "keys"}, False),
        ("0.0.0.0", {"trust": "any"}, False),
        ("0.0.0.0", {"trusted_networks": ["10.0.0.0/8"]}, False),
    ],
)
def test_protected_mode_ways_out(host: str, extra: dict[str, Any], refused: bool) -> None:
    settings = parse({"server": {"host": host}, "identity": extra})
    assert (protected_mode(settings) is not None) is refused


@pytest.mark.slow
def test_an_explicit_trust_any_on_a_public_address_starts_with_a_warning(tmp_path: Path) -> None:
    port = free_port()
    env = clean_env(
        SIDECAR_HOST="0.0.0.0",
        SIDECAR_TRUST="any",
        SIDECAR_PORT=str(port),
        SIDECAR_DATA_DIR=str(tmp_path / "data"),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "serve"], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    lines = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if not line or line.startswith("sidecar listening"):
            break
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=20)
    assert any('trust = \\"any\\"' in line or 'trust = "any"' in line for line in lines), lines
    assert any(line.startswith("sidecar listening on http://0.0.0.0") for line in lines), lines


def test_serve_refuses_a_worker_count_below_one(tmp_path: Path) -> None:
    result = sidecar("serve", "--workers", "0", cwd=tmp_path)
    assert result.returncode == 2
    assert "argument --workers: expected a whole number of at least 1, got '0'" in result.stderr
    assert not (tmp_path / ".sidecar").exists()  # nothing was started


@pytest.mark.parametrize("value", ["-1", "two", "1.5"])
def test_the_worker_count_is_a_whole_number_of_at_least_one(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:  # argparse's refusal, before anything runs
        build_parser().parse_args(["serve", "--workers", value])
    assert exited.value.code == 2
    expected = f"argument --workers: expected a whole number of at least 1, got '{value}'"
    assert expected in capsys.readouterr().err


def test_settle_heap_freezes_what_start_up_made_and_raises_the_young_threshold() -> None:
    before = gc.get_threshold()
    try:
        settle_heap()
        assert gc.get_freeze_count() > 1000
        assert gc.get_threshold() == (GC_YOUNG, before[1], before[2])
        made: list[list[int]] = [[] for _ in range(2 * 700)]  # lists: tracked by the collector
        assert gc.get_count()[0] >= len(made)  # no young collection ran
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
