"""Waiting on a child process from a test's event loop."""

from __future__ import annotations

import asyncio
import subprocess
import time
from typing import Any


async def exited(proc: subprocess.Popen[Any], within_s: float, step_s: float = 0.05) -> int:
    """Its exit status, once it has exited; fails the test when it runs on past `within_s`."""
    deadline = time.monotonic() + within_s
    while proc.poll() is None:
        assert time.monotonic() < deadline, "still running"
        await asyncio.sleep(step_s)
    return proc.returncode
