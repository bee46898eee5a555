"""Starting and stopping what a benchmark measures: the mock upstream, nginx, the bare
pass-through, private redis-servers, the sidecar. Each child runs in its own session with its
output in a file; a `Launcher` stops everything it started on exit, on any error and on Ctrl-C."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from bench.lib.client import Target, probe_metered
from bench.lib.config import sidecar_config
from bench.lib.payloads import ADMIN_TOKEN, Scenario
from bench.lib.report import log
from sidecar.testing.redis_cluster import LocalCluster
from sidecar.testing.redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent.parent
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0

# `sidecar mock-upstream ...` and `sidecar serve ...`, started through the same entry points but
# with command lines that a `pkill -f "sidecar serve"` run elsewhere on a shared machine does not
# match: a benchmark's targets must not vanish because someone restarts their own sidecar.
MOCK_MAIN = "import sys; from sidecar.mock.cli import main; sys.exit(main(sys.argv[1:]))"
SIDECAR_MAIN = "import sys; from sidecar.cli import main; sys.exit(main(sys.argv[1:]))"

T = TypeVar("T")


class StartError(RuntimeError):
    """A target did not start, or does not answer as it should."""


@contextlib.contextmanager
def private_redis() -> Iterator[str]:
    """A redis-server of its own, in a temporary folder, for an in-process bench: its URL."""
    with tempfile.TemporaryDirectory() as folder:
        server = RedisServer(Path(folder))
        server.start()
        try:
            yield server.url
        finally:
            server.kill()


def clean_env() -> dict[str, str]:
    """This process's environment without any SIDECAR_* setting that could leak into a target."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}


class Proc:
    """A child in its own session (so its whole process group can be stopped), output to a file."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path = ROOT,
    ) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        self._stopped = False
        try:
            self.popen = subprocess.Popen(
                list(args),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else clean_env(),
                cwd=cwd,
                start_new_session=True,
            )
        except BaseException:
            self._log.close()
            raise

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def exit_status(self) -> str:
        code = self.popen.returncode
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = str(-code)
            return f"was killed by {name}, not by this harness"
        return f"exited with status {code}"

    def check_alive(self) -> None:
        if not self.alive():
            raise RuntimeError(f"the {self.name} {self.exit_status()}:\n{self.log_tail()}")

    def stop(self, grace: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM to the group, SIGKILL to whatever is left of it after a grace period."""
        if self._stopped:
            return
        self._stopped = True
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=grace)
        # Workers of a server whose leader already left, or a leader that ignored SIGTERM.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)
        self._log.close()


def wait_for(
    what: str, proc: Proc, ready: Callable[[], T | None], timeout: float = START_TIMEOUT_S
) -> T:
    """Poll ready() until it returns something truthy; fail if proc exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        result = ready()
        if result:
            return result
        if not proc.alive():
            raise StartError(f"{what} {proc.exit_status()}:\n{proc.log_tail()}")
        if time.monotonic() > deadline:
            raise StartError(f"{what} not ready after {timeout:.0f} s:\n{proc.log_tail()}")
        time.sleep(0.02)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def http_ok(port: int, path: str) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def nginx_binary() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


def nginx_conf(d: Path, port: int, upstream_port: int) -> str:
    user = "user root;\n" if os.geteuid() == 0 else ""
    temp = "".join(f"    {kind}_temp_path {d}/{kind};\n" for kind in ("fastcgi", "uwsgi", "scgi"))
    return f"""{user}worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
{temp}    keepalive_requests 1000000;
    keepalive_timeout 300s;
    upstream mock {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""


class Launcher:
    """Starts a benchmark's processes in one folder (temporary unless `keep_under` is given)
    and stops every one of them when the `with` block ends, however it ends."""

    def __init__(self, prefix: str, keep_under: str | None = None) -> None:
        self.prefix = prefix
        self.keep_under = keep_under
        self.stack = contextlib.ExitStack()
        self.workdir = Path()
        self.procs: dict[str, Proc] = {}

    def __enter__(self) -> Self:
        if self.keep_under:
            parent = Path(self.keep_under).resolve()
            parent.mkdir(parents=True, exist_ok=True)
            self.workdir = Path(tempfile.mkdtemp(prefix=self.prefix, dir=parent))
        else:
            temp = tempfile.TemporaryDirectory(prefix=self.prefix)
            self.workdir = Path(self.stack.enter_context(temp))
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stack.close()

    def folder(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def start(
        self,
        name: str,
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: Path = ROOT,
    ) -> Proc:
        """`cwd` is where it runs, and so which checkout's `sidecar` package a
        `python -c` child imports."""
        proc = Proc(name, args, self.workdir / f"{name}.log", env, cwd)
        self.stack.callback(proc.stop)
        self.procs[name] = proc
        return proc

    def stop(self, name: str) -> None:
        """Stop one process before the others (it is not stopped twice)."""
        self.procs.pop(name).stop()

    def mock(self) -> Target:
        """`sidecar mock-upstream` on a port it picks itself (read back from its log)."""
        args = [sys.executable, "-c", MOCK_MAIN, "--host", "127.0.0.1", "--port", "0"]
        proc = self.start("mock-upstream", args)

        def bound() -> int | None:
            match = re.search(r"mock-upstream listening on http://[^\s]+:(\d+)", proc.log_text())
            return int(match.group(1)) if match else None

        port = wait_for("mock-upstream", proc, bound)
        log(f"mock upstream on 127.0.0.1:{port}")
        return Target("direct", port, proc.pid)

    def checked(self, target: Target, what: str, probe: Scenario | None) -> Target:
        if probe is not None and (reason := probe_metered(target.port, probe)):
            raise StartError(f"{what} does not answer as expected: {reason}")
        log(f"{target.name} ({what}) on 127.0.0.1:{target.port}")
        return target

    def nginx(self, upstream: Target, probe: Scenario | None = None) -> Target | None:
        """One nginx worker proxying to the upstream; None when nginx is not installed."""
        binary = nginx_binary()
        if binary is None:
            return None
        directory = self.folder("nginx")
        port = free_port()
        conf = directory / "nginx.conf"
        conf.write_text(nginx_conf(directory, port, upstream.port), encoding="utf-8")
        args = [binary, "-c", str(conf), "-p", str(directory), "-e", str(directory / "error.log")]
        proc = self.start("nginx", args)
        wait_for("nginx", proc, lambda: port_open(port))
        return self.checked(Target("nginx", port, proc.pid), "nginx, 1 worker", probe)

    def bare(
        self,
        upstream: Target,
        probe: Scenario | None = None,
        wrap: Sequence[str] = (),
        timeout: float = START_TIMEOUT_S,
    ) -> Target:
        """bench/bare_proxy.py in front of the upstream; `wrap`: a command it runs under (a
        profiler), given `timeout` to start."""
        port = free_port()
        args = [*wrap, sys.executable, "-m", "bench.bare_proxy", "--port", str(port)]
        proc = self.start("bare", [*args, "--upstream", f"http://127.0.0.1:{upstream.port}"])
        wait_for("bare proxy", proc, lambda: port_open(port), timeout)
        return self.checked(Target("bare", port, proc.pid), "the bare pass-through", probe)

    def references(self, upstream: Target, probe: Scenario, names: Sequence[str]) -> list[Target]:
        """The bare pass-through and, when installed, an nginx hop (of those in `names`)."""
        found = [self.bare(upstream, probe)] if "bare" in names else []
        if "nginx" in names:
            hop = self.nginx(upstream, probe)
            if hop is None:
                log("nginx is not installed: no nginx reference in this run")
            else:
                found.append(hop)
        return found

    def otlp(self, name: str = "otlp") -> int:
        """An OTLP/HTTP traces receiver (sidecar.testing.otlp) counting what it is sent; its
        port (`GET /stats` answers the counts)."""
        port = free_port()
        args = [sys.executable, "-m", "sidecar.testing.otlp", "--port", str(port)]
        proc = self.start(name, args)
        wait_for("OTLP receiver", proc, lambda: port_open(port))
        return port

    def redis(
        self, name: str = "redis", *extra: str, wrap: Sequence[str] = (), timeout: float = 10.0
    ) -> RedisServer:
        """A private redis-server; `wrap`: a command it runs under (a profiler), given
        `timeout` to start."""
        server = RedisServer(self.folder(name), *extra, wrap=wrap, start_s=timeout)
        self.stack.callback(server.kill)
        server.start()
        return server

    def cluster(self, name: str = "redis-cluster") -> LocalCluster:
        cluster = LocalCluster(self.folder(name))
        self.stack.callback(cluster.stop)
        log("starting a 3-master Redis Cluster with 3 replicas")
        cluster.start()
        return cluster

    def sidecar(
        self,
        name: str,
        config: Path,
        redis_url: str,
        upstream: Target | None = None,
        probe: Scenario | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path = ROOT,
        wrap: Sequence[str] = (),
        timeout: float = START_TIMEOUT_S,
    ) -> Target:
        """`sidecar serve --config CONFIG` (the code of the checkout at `cwd`), ready (Redis
        reachable) and, with a probe, proxying a metered request; on failure it is stopped
        again and StartError says why. `wrap`: a command it runs under (a profiler), given
        `timeout` to start."""
        port = free_port()
        settings = {
            "SIDECAR_HOST": "127.0.0.1",
            "SIDECAR_PORT": str(port),
            "SIDECAR_REDIS_URL": redis_url,
            "SIDECAR_ADMIN_TOKEN": ADMIN_TOKEN,
            "SIDECAR_DATA_DIR": str(self.folder(name) / "data"),
        }
        if upstream is not None:
            settings["SIDECAR_UPSTREAM_URL"] = f"http://127.0.0.1:{upstream.port}"
        args = [*wrap, sys.executable, "-c", SIDECAR_MAIN, "serve", "--config", str(config)]
        proc = self.start(name, args, clean_env() | settings | dict(env or {}), cwd)
        try:
            wait_for(name, proc, lambda: http_ok(port, "/readyz"), timeout)
            return self.checked(Target(name, port, proc.pid), "the sidecar", probe)
        except StartError:
            proc.stop(grace=3)  # it may hold a hung request open
            raise

    def sidecars(
        self,
        trees: Sequence[tuple[str, Path]],
        config_source: str | None,
        redis: RedisServer,
        upstream: Target,
        probe: Scenario | None = None,
        wrap: Sequence[str] = (),
        timeout: float = START_TIMEOUT_S,
    ) -> list[Target]:
        """One sidecar per (name, source tree), in that order, each with the config made from
        `config_source` and on its own database of `redis` (the first on 0): versions side
        by side on one store without sharing a key."""
        started = []
        for db, (name, cwd) in enumerate(trees):
            config, _ = sidecar_config(self.folder(name), config_source)
            url = redis.url.rpartition("/")[0] + f"/{db}"
            started.append(
                self.sidecar(
                    name, config, url, upstream, probe, cwd=cwd, wrap=wrap, timeout=timeout
                )
            )
        return started


def note(what: str, target: Target | None, **extra: Any) -> dict[str, Any]:
    """A target's line in a result's `targets`."""
    if target is None:
        return {"available": False, "reason": what}
    return {"available": True, "port": target.port, "what": what, **extra}
