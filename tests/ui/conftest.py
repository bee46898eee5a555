from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from sidecar.testing.serving import ApiClient
from tests.support.ui import CHROMIUM, INSTALL_TIMEOUT_S, sign_in


@pytest.fixture
async def browser_client(api: ApiClient) -> AsyncIterator[httpx.AsyncClient]:
    """A client like a browser: no admin token, keeps cookies, does not follow redirects."""
    async with httpx.AsyncClient(base_url=str(api.base_url)) as client:
        yield client


@pytest.fixture
async def signed_in(browser_client: httpx.AsyncClient) -> str:
    return await sign_in(browser_client)


def _apt(apt: str, deadline: float, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(
        [apt, *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=max(1.0, deadline - time.monotonic()),
        check=False,
    )


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed with apt-get when it is missing (as root): the browser
    test never downloads a browser of its own, and never skips for want of one."""
    if CHROMIUM.exists():
        return str(CHROMIUM)
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        pytest.fail(
            f"the dashboard's browser test needs Debian's chromium at {CHROMIUM}; install it "
            "with `apt-get install -y chromium` (this run cannot: it needs apt-get, as root)"
        )
    deadline = time.monotonic() + INSTALL_TIMEOUT_S
    try:
        done = _apt(apt, deadline, "install", "-y", "-q", "chromium")
        if done.returncode != 0:  # a new machine's package lists may be missing or stale
            _apt(apt, deadline, "update", "-q")
            done = _apt(apt, deadline, "install", "-y", "-q", "chromium")
    except subprocess.TimeoutExpired:
        pytest.fail(f"`apt-get install -y chromium` did not finish within {INSTALL_TIMEOUT_S} s")
    if done.returncode != 0 or not CHROMIUM.exists():
        pytest.fail(
            f"`apt-get install -y chromium` failed ({done.returncode}):\n{done.stderr[-2000:]}"
        )
    return str(CHROMIUM)
