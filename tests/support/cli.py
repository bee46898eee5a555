"""`sidecar` run as a process, or its commands called in this one against a served app."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.cli import main
from sidecar.testing.serving import ApiClient
from tests.support.auth import ADMIN_TOKEN


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env.update(extra)
    return env


def sidecar(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args], cwd=cwd, env=env or clean_env(),
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`sidecar ARGV...` in a thread (the served app runs in this loop): code, stdout, stderr."""

    def run() -> int:
        try:
            return main(list(argv))
        except SystemExit as exc:  # argparse
            return int(exc.code or 0)

    capsys.readouterr()
    code = await asyncio.to_thread(run)
    out, err = capsys.readouterr()
    return code, out, err


def at(api: ApiClient) -> list[str]:
    return ["--url", str(api.base_url).rstrip("/"), "--token", ADMIN_TOKEN]
