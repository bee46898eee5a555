"""Inline proxy overhead: added latency, saturation, stream time to first byte, worker RSS.

    .venv/bin/python -m bench.proxy_bench [--repeats 3] [--duration 10] [--workers 1] [--soak 0] \\
        --markdown bench/out/proxy.md

Four targets, all in one run so that ratios come from the same conditions:

- direct:  the mock upstream (`sidecar mock-upstream`),
- nginx:   one nginx worker proxying to that mock (the floor for a proxy hop),
- bare:    `bench/bare_proxy.py`, a raw ASGI pass-through on the sidecar's stack (uvicorn,
           uvloop, httptools, one pooled aiohttp session) in front of that mock: the floor for
           any Python proxy on this machine,
- sidecar: `sidecar serve` in inline mode in front of that mock, on a private redis-server.

Per repeat: sequential requests on one keep-alive connection per target (chat completion with a
body identity, the same with the identity header, an embedding), interleaved in blocks so that
drift on a shared machine hits every target alike; sequential SSE streams (time to first and last
body byte); then `wrk` at 64 connections against each target in turn, sampling the sidecar's RSS.
`--soak SECONDS` adds one long `wrk` run against the sidecar with RSS sampled every second.

Everything started here (mock, nginx, bare proxy, redis-server, sidecar, wrk) is stopped on exit,
error or Ctrl-C; load goes only to 127.0.0.1. JSON goes to stdout (or --json FILE), progress to
stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import gc
import http.client
import importlib.metadata
import json
import math
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import types
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sidecar.testing.redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent
WRK_SCRIPT = Path(__file__).resolve().parent / "wrk" / "post_json.lua"
ADMIN_TOKEN = "bench-admin-token-0123456789"
API_KEY = "sk-bench-0123456789abcdef"
IDENTITY_HEADER = "X-ORQ-IDENTITY-ID"
TARGETS = ("direct", "nginx", "bare", "sidecar")
CHAT_PATH = "/v1/chat/completions"
EMBEDDINGS_PATH = "/v1/embeddings"
SEQUENTIAL_SCENARIOS = ("chat_body_identity", "chat_header_identity", "embeddings_body_identity")

# Bounds: no loop below runs longer than these, whatever a target does.
REQUEST_TIMEOUT_S = 30.0
PROBE_TIMEOUT_S = 5.0  # a first metered request slower than this is not working
MEASUREMENT_BUDGET_S = 900.0  # one sequential or stream measurement, all targets
MAX_ERRORS_PER_TARGET = 50  # a target failing this often is dropped from the measurement
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
MAX_RSS_SAMPLES = 100_000
MAX_STREAM_READS = 100_000


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- options ------------------------------------------------------------------------------------


@dataclass
class Options:
    repeats: int = 3
    requests: int = 2000
    warmup: int = 200
    block: int = 100
    streams: int = 200
    stream_warmup: int = 5
    stream_chunks: int = 20
    chunk_delay_ms: float = 5.0
    duration: int = 10
    connections: int = 64
    threads: int = 2
    identities: int = 100
    workers: int | None = None
    server: str | None = None
    sidecar_config: str | None = None
    sidecar_env: list[str] = field(default_factory=list)
    soak: int = 0
    wrk_sequential: int = 5  # seconds of wrk -c1 per target and run (0: skip)
    rss_interval: float = 1.0
    targets: tuple[str, ...] = TARGETS
    log_dir: str | None = None
    command: str = ""


# -- request bodies -----------------------------------------------------------------------------


def identity(k: int) -> dict[str, Any]:
    return {
        "id": f"bench-user-{k}",
        "display_name": f"Bench User {k}",
        "email": f"bench-user-{k}@example.com",
        "tags": ["bench"],
        "metadata": [{"plan": "pro"}],
    }


def chat_body(k: int, *, with_identity: bool = True, stream: bool = False) -> bytes:
    body: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "Summarise the plot of Hamlet in two sentences."},
        ],
        "max_tokens": 64,
        "temperature": 0.2,
    }
    if stream:
        body["stream"] = True
    if with_identity:
        body["identity"] = identity(k)
    return json.dumps(body, separators=(",", ":")).encode()


def embeddings_body(k: int) -> bytes:
    body = {
        "model": "text-embedding-3-small",
        "input": "The food was delicious and the waiter was very friendly.",
        "identity": identity(k),
    }
    return json.dumps(body, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Request:
    body: bytes
    headers: Mapping[str, str]


@dataclass(frozen=True)
class Scenario:
    name: str
    path: str
    requests: tuple[Request, ...]  # cycled; one per bench identity

    def request(self, i: int) -> Request:
        return self.requests[i % len(self.requests)]


def base_headers() -> dict[str, str]:
    return {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}


def scenarios(opts: Options) -> dict[str, Scenario]:
    ks = range(max(1, opts.identities))
    plain = base_headers()
    paced = plain | {
        "x-mock-chunks": str(opts.stream_chunks),
        "x-mock-chunk-delay-ms": f"{opts.chunk_delay_ms:g}",
    }
    return {
        "chat_body_identity": Scenario(
            "chat_body_identity", CHAT_PATH, tuple(Request(chat_body(k), plain) for k in ks)
        ),
        "chat_header_identity": Scenario(
            "chat_header_identity",
            CHAT_PATH,
            tuple(
                Request(
                    chat_body(k, with_identity=False), plain | {IDENTITY_HEADER: f"bench-user-{k}"}
                )
                for k in ks
            ),
        ),
        "embeddings_body_identity": Scenario(
            "embeddings_body_identity",
            EMBEDDINGS_PATH,
            tuple(Request(embeddings_body(k), plain) for k in ks),
        ),
        "stream_chat": Scenario(
            "stream_chat", CHAT_PATH, tuple(Request(chat_body(k, stream=True), paced) for k in ks)
        ),
    }


# -- statistics ---------------------------------------------------------------------------------


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest rank on sorted samples; q in [0, 100]."""
    if not ordered:
        raise ValueError("no samples")
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def latency_stats(samples_ns: Sequence[int]) -> dict[str, float]:
    if not samples_ns:
        return {}
    ordered = sorted(s / 1e6 for s in samples_ns)
    return {
        "p50_ms": round(percentile(ordered, 50), 4),
        "p90_ms": round(percentile(ordered, 90), 4),
        "p99_ms": round(percentile(ordered, 99), 4),
        "mean_ms": round(statistics.fmean(ordered), 4),
        "max_ms": round(ordered[-1], 4),
    }


def slope_per_minute(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per minute."""
    if len(points) < 2:
        return None
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    mx = statistics.fmean(xs)
    my = statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    return sxy / sxx * 60


def rnd(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


# -- processes ----------------------------------------------------------------------------------


def clean_env() -> dict[str, str]:
    """This process's environment without any SIDECAR_* setting that could leak into a target."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}


class Proc:
    """A child in its own session (so its whole process group can be stopped), output to a file."""

    def __init__(
        self, name: str, args: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.name = name
        self.args = list(args)
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        self._stopped = False
        try:
            self.popen = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=ROOT,
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


def exit_status(proc: Proc) -> str:
    code = proc.popen.returncode
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        return f"was killed by {name}, not by this harness"
    return f"exited with status {code}"


def wait_for(what: str, proc: Proc, ready: Any, timeout: float = START_TIMEOUT_S) -> Any:
    """Poll ready() until it returns something truthy; fail if proc exits or time runs out.

    On any failure (Ctrl-C included) the process is stopped before the error goes on."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            result = ready()
            if result:
                return result
            if not proc.alive():
                raise RuntimeError(f"{what} {exit_status(proc)}:\n{proc.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not ready after {timeout:.0f} s:\n{proc.log_tail()}")
            time.sleep(0.02)
    except BaseException:
        proc.stop()
        raise


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def http_get(port: int, path: str, headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers=dict(headers or {}))
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def http_ok(port: int, path: str) -> bool:
    try:
        return http_get(port, path)[0] == 200
    except (OSError, http.client.HTTPException):
        return False


# `sidecar mock-upstream ...` and `sidecar serve ...`, started through the same entry points but
# with command lines that a `pkill -f "sidecar serve"` run elsewhere on a shared machine does not
# match: a benchmark's targets must not vanish because someone restarts their own sidecar.
MOCK_MAIN = "import sys; from sidecar.mock.cli import main; sys.exit(main(sys.argv[1:]))"
SIDECAR_MAIN = "import sys; from sidecar.cli import main; sys.exit(main(sys.argv[1:]))"


def start_mock(workdir: Path) -> tuple[Proc, int]:
    proc = Proc(
        "mock-upstream",
        [sys.executable, "-c", MOCK_MAIN, "--host", "127.0.0.1", "--port", "0"],
        workdir / "mock-upstream.log",
        env=clean_env(),
    )

    def bound() -> int | None:
        match = re.search(r"mock-upstream listening on http://[^\s]+:(\d+)", proc.log_text())
        return int(match.group(1)) if match else None

    port: int = wait_for("mock-upstream", proc, bound)
    return proc, port


def nginx_binary() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


def nginx_conf(directory: Path, port: int, upstream_port: int) -> str:
    d = directory
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""{user}worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{
    worker_connections 1024;
}}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 1000000;
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


def start_nginx(workdir: Path, upstream_port: int) -> tuple[Proc, int]:
    binary = nginx_binary()
    if binary is None:
        raise FileNotFoundError("nginx not found")
    directory = workdir / "nginx"
    directory.mkdir()
    port = free_port()
    conf = directory / "nginx.conf"
    conf.write_text(nginx_conf(directory, port, upstream_port), encoding="utf-8")
    proc = Proc(
        "nginx",
        [binary, "-c", str(conf), "-p", str(directory), "-e", str(directory / "error.log")],
        workdir / "nginx.log",
        env=clean_env(),
    )
    wait_for("nginx", proc, lambda: port_open(port))
    return proc, port


def start_bare(workdir: Path, upstream_port: int) -> tuple[Proc, int]:
    """bench/bare_proxy.py in front of the mock, on a port of its own."""
    port = free_port()
    proc = Proc(
        "bare",
        [
            sys.executable,
            "-m",
            "bench.bare_proxy",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--upstream",
            f"http://127.0.0.1:{upstream_port}",
        ],
        workdir / "bare.log",
        env=clean_env(),
    )
    wait_for("bare proxy", proc, lambda: port_open(port))
    return proc, port


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def bare_description() -> str:
    return (
        f"raw ASGI + aiohttp {package_version('aiohttp')} under uvicorn "
        f"{package_version('uvicorn')} (uvloop, httptools), 1 process"
    )


def toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def toml_dumps(data: Mapping[str, Any]) -> str:
    """Enough TOML for a sidecar config: top-level tables, anything deeper inline."""
    lines = [f"{toml_key(k)} = {toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for key, table in data.items():
        if isinstance(table, dict):
            lines.append(f"\n[{toml_key(key)}]")
            lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def sidecar_config(opts: Options, directory: Path) -> Path:
    """The config the sidecar runs with: the given file (if any) with `[server] workers` set.

    Written to a temp file, so relative policy paths are made absolute against the original
    file's folder. Ports, URLs, token and data dir come from the environment, which wins.
    """
    raw: dict[str, Any] = {}
    if opts.sidecar_config:
        source = Path(opts.sidecar_config).resolve()
        raw = tomllib.loads(source.read_text(encoding="utf-8"))
        policies = raw.get("policies")
        if isinstance(policies, dict) and isinstance(policies.get("paths"), list):
            policies["paths"] = [
                os.path.normpath(source.parent / p)
                if isinstance(p, str) and not Path(p).is_absolute()
                else p
                for p in policies["paths"]
            ]
    server = raw.setdefault("server", {})
    if not isinstance(server, dict):
        raise ValueError("[server] in the sidecar config is not a table")
    if opts.workers is not None:
        server["workers"] = opts.workers
    server.setdefault("workers", 1)
    path = directory / "sidecar.toml"
    path.write_text(toml_dumps(raw), encoding="utf-8")
    return path


def parse_env_pairs(pairs: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"--sidecar-env expects NAME=VALUE, got {pair!r}")
        out[name] = value
    return out


@dataclass
class Sidecar:
    proc: Proc | None
    port: int | None
    workers: int
    available: bool
    reason: str | None = None
    attribution_probe: dict[str, Any] | None = None


def start_sidecar(opts: Options, workdir: Path, upstream_port: int, redis_url: str) -> Sidecar:
    config = sidecar_config(opts, workdir)
    workers = int(tomllib.loads(config.read_text(encoding="utf-8"))["server"]["workers"])
    port = free_port()
    env = clean_env() | {
        "SIDECAR_HOST": "127.0.0.1",
        "SIDECAR_PORT": str(port),
        "SIDECAR_UPSTREAM_URL": f"http://127.0.0.1:{upstream_port}",
        "SIDECAR_REDIS_URL": redis_url,
        "SIDECAR_ADMIN_TOKEN": ADMIN_TOKEN,
        "SIDECAR_DATA_DIR": str(workdir / "sidecar-data"),
    }
    if opts.server:
        env["SIDECAR_SERVER"] = opts.server
    env |= parse_env_pairs(opts.sidecar_env)
    proc = Proc(
        "sidecar",
        [sys.executable, "-c", SIDECAR_MAIN, "serve", "--config", str(config)],
        workdir / "sidecar.log",
        env=env,
    )
    try:
        wait_for("sidecar", proc, lambda: http_ok(port, "/healthz"))
    except RuntimeError as exc:  # already stopped
        return Sidecar(None, None, workers, False, f"did not start: {exc}")
    return Sidecar(proc, port, workers, True)


def probe_metered(port: int, scenario: Scenario) -> str | None:
    """None when a metered POST answers 200 with a `usage` object, else why not."""
    client = LeanClient(port, timeout=PROBE_TIMEOUT_S)
    request = scenario.request(0)
    try:
        status, data = client.post(scenario.path, request.body, request.headers)
    except (OSError, http.client.HTTPException) as exc:
        return f"POST {scenario.path} failed: {type(exc).__name__}: {exc}"
    finally:
        client.close()
    if status != 200:
        return f"POST {scenario.path} answered {status}: {data[:200].decode(errors='replace')}"
    try:
        usage = json.loads(data).get("usage")
    except (ValueError, AttributeError):
        usage = None
    if not isinstance(usage, dict):
        return f"POST {scenario.path} answered 200 without a usage object"
    return None


def admin_get(port: int, path: str) -> Any:
    status, data = http_get(port, path, {"Authorization": f"Bearer {ADMIN_TOKEN}"})
    if status != 200:
        return None
    return json.loads(data)


def attribution_check(port: int, identities: int) -> dict[str, Any]:
    """What the sidecar recorded for the bench identities (30-day metrics from Redis)."""
    found = 0
    requests = 0
    rate_limited = 0
    cursor: str | None = None
    for _ in range(identities // 200 + 2):
        query = {"search": "bench-user-", "limit": "200", "include_metrics": "true"}
        if cursor:
            query["starting_after"] = cursor
        try:
            page = admin_get(port, "/v2/identities?" + urllib.parse.urlencode(query))
        except (OSError, http.client.HTTPException, ValueError):
            page = None
        if not isinstance(page, dict) or not isinstance(page.get("data"), list):
            return {"available": False}
        for record in page["data"]:
            found += 1
            metrics = record.get("metrics") or {}
            requests += int(metrics.get("total_requests", 0))
            rate_limited += int(metrics.get("rate_limited_requests", 0))
        if not page.get("has_more") or not page["data"]:
            break
        cursor = page["data"][-1].get("_id")
    return {
        "available": True,
        "identities": found,
        "recorded_requests": requests,
        "rate_limited_requests": rate_limited,
    }


# -- /proc: process trees, RSS, CPU ---------------------------------------------------------------


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: split after the last ')'.
    return text[text.rfind(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """root and all its descendants, root first."""
    children: dict[int, list[int]] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                fields = _stat_fields(int(entry.name))
                if fields:
                    children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree = [root]
    i = 0
    while i < len(tree) and i < 10_000:
        tree += children.get(tree[i], [])
        i += 1
    return tree


def rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def cpu_seconds(pid: int) -> float:
    fields = _stat_fields(pid)
    if not fields:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    fields += [0] * (8 - len(fields))
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    busy = user + nice + system + irq + softirq + steal
    return busy / CLOCK_TICKS, steal / CLOCK_TICKS


def tree_cpu_seconds(root: int) -> float:
    return sum(cpu_seconds(pid) for pid in process_tree(root))


def process_role(pid: int, root: int) -> str:
    if pid == root:
        return "main"
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "gone"
    helper = b"resource_tracker" in cmdline or b"semaphore_tracker" in cmdline
    return "helper" if helper else "worker"


class RssSampler:
    """Samples VmRSS of a process tree every `interval` seconds in a thread, bounded in count."""

    def __init__(self, root: int, interval: float = 1.0) -> None:
        self.root = root
        self.interval = interval
        self.samples: list[tuple[float, dict[int, int]]] = []
        self.roles: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._began = 0.0

    def sample(self) -> None:
        now = time.monotonic() - self._began
        reading: dict[int, int] = {}
        for pid in process_tree(self.root):
            kb = rss_kb(pid)
            if kb is not None:
                reading[pid] = kb
                if pid not in self.roles:
                    self.roles[pid] = process_role(pid, self.root)
        self.samples.append((now, reading))

    def _run(self) -> None:
        while not self._stop.wait(self.interval) and len(self.samples) < MAX_RSS_SAMPLES:
            self.sample()

    def __enter__(self) -> RssSampler:
        self._began = time.monotonic()
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.sample()

    def result(self, workers: int, *, series: bool = False) -> dict[str, Any]:
        def stats(points: list[tuple[float, float]]) -> dict[str, Any]:
            if not points:
                return {}
            values = [p[1] for p in points]
            half = [p for p in points if p[0] >= points[-1][0] / 2]
            return {
                "start_kb": int(values[0]),
                "end_kb": int(values[-1]),
                "max_kb": int(max(values)),
                "slope_kb_per_min": rnd(slope_per_minute(points), 1),
                "slope_second_half_kb_per_min": rnd(slope_per_minute(half), 1),
                "samples": len(points),
            }

        total = [(t, float(sum(r.values()))) for t, r in self.samples]
        pids = sorted({pid for _, r in self.samples for pid in r})
        worker_pids = [p for p in pids if self.roles.get(p) == "worker"] or [self.root]
        processes: list[dict[str, Any]] = []
        for pid in pids:
            points = [(t, float(r[pid])) for t, r in self.samples if pid in r]
            processes.append({"pid": pid, "role": self.roles.get(pid, "?")} | stats(points))
        per_worker = [p for p in processes if p["pid"] in worker_pids]
        largest = max(per_worker, key=lambda p: float(p.get("max_kb", 0)), default=None)
        out: dict[str, Any] = {
            "interval_s": self.interval,
            "workers_configured": workers,
            "worker_processes": len(per_worker),
            "tree": stats(total),
            # The worker that peaked highest: with one worker, the serve process itself.
            "largest_worker": (
                {k: v for k, v in largest.items() if k not in ("pid", "role")} if largest else {}
            ),
            "processes": processes,
        }
        if series:
            out["series"] = [
                {"t_s": round(t, 1), "tree_kb": sum(r.values())} for t, r in self.samples
            ]
        return out


KEY_CLASSES = (  # sidecar key classes (see sidecar/store/keys.py) -> what they hold
    ("usage", re.compile(rb"^sidecar:u:")),
    ("limits", re.compile(rb"^sidecar:(rl|cc):")),
    ("requests", re.compile(rb"^sidecar:rq:")),
    ("identities", re.compile(rb"^sidecar:(id:|\{idx\})")),
)


class RedisMemorySampler:
    """Samples Redis's used_memory every `interval` seconds; at both ends, the keys and their
    memory by class, so that growth of the usage buckets (expected) shows apart from the rest."""

    def __init__(self, url: str, interval: float = 1.0) -> None:
        import redis as redis_sync

        self.client = redis_sync.Redis.from_url(url, socket_timeout=5)
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self.classes: dict[str, dict[str, dict[str, int]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="redis-sampler", daemon=True)
        self._began = 0.0

    def sample(self) -> None:
        used = int(self.client.info("memory")["used_memory"])
        self.samples.append((time.monotonic() - self._began, float(used)))

    def by_class(self) -> dict[str, dict[str, int]]:
        out = {name: {"keys": 0, "bytes": 0} for name, _ in KEY_CLASSES}
        out["other"] = {"keys": 0, "bytes": 0}
        for key in self.client.scan_iter(count=1000):
            name = next((n for n, pattern in KEY_CLASSES if pattern.match(key)), "other")
            out[name]["keys"] += 1
            out[name]["bytes"] += int(self.client.memory_usage(key, samples=0) or 0)
        return out

    def _run(self) -> None:
        while not self._stop.wait(self.interval) and len(self.samples) < MAX_RSS_SAMPLES:
            self.sample()

    def __enter__(self) -> RedisMemorySampler:
        self._began = time.monotonic()
        self.classes["start"] = self.by_class()
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.sample()
        self.classes["end"] = self.by_class()
        self.client.close()

    def result(self) -> dict[str, Any]:
        values = [v for _, v in self.samples]
        half = [p for p in self.samples if p[0] >= self.samples[-1][0] / 2]
        return {
            "used_memory_start": int(values[0]),
            "used_memory_end": int(values[-1]),
            "used_memory_max": int(max(values)),
            "slope_bytes_per_min": rnd(slope_per_minute(self.samples), 0),
            "slope_second_half_bytes_per_min": rnd(slope_per_minute(half), 0),
            "by_class": self.classes,
        }


# -- the lean client ----------------------------------------------------------------------------


class LeanClient:
    """One keep-alive HTTP/1.1 connection with Nagle off: http.client, no pool, no extra layer."""

    def __init__(self, port: int, timeout: float = REQUEST_TIMEOUT_S) -> None:
        self.port = port
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None
        self.connects = 0

    def connection(self) -> http.client.HTTPConnection:
        conn = self.conn
        if conn is None or conn.sock is None:
            if conn is not None:
                conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            conn.connect()
            assert conn.sock is not None
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.conn = conn
            self.connects += 1
        return conn

    def post(self, path: str, body: bytes, headers: Mapping[str, str]) -> tuple[int, bytes]:
        conn = self.connection()
        conn.request("POST", path, body=body, headers=dict(headers))
        response = conn.getresponse()
        return response.status, response.read()

    def reset(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = None

    def close(self) -> None:
        self.reset()


@dataclass(frozen=True)
class Target:
    name: str
    port: int
    pid: int  # root of the process tree serving it, for CPU and RSS


def rotated(targets: Sequence[Target], n: int) -> list[Target]:
    n %= len(targets)
    return list(targets[n:]) + list(targets[:n])


class Tally:
    def __init__(self, targets: Sequence[Target]) -> None:
        self.samples: dict[str, list[int]] = {t.name: [] for t in targets}
        self.errors: dict[str, int] = {t.name: 0 for t in targets}
        self.statuses: dict[str, dict[str, int]] = {t.name: {} for t in targets}
        self.aborted: set[str] = set()

    def error(self, target: str, what: str) -> None:
        self.errors[target] += 1
        self.statuses[target][what] = self.statuses[target].get(what, 0) + 1
        if self.errors[target] >= MAX_ERRORS_PER_TARGET:
            self.aborted.add(target)


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No garbage-collector pauses inside a timed loop (the client's jitter is not the server's)."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def interleaved(
    targets: Sequence[Target],
    one: Callable[..., None],
    tally: Tally,
    warmup: int,
    count: int,
    block: int,
    deadline: float,
) -> bool:
    """Warm every target up, then run `count` requests per target in blocks of `block`, the
    targets' order rotating each block. True when the time budget cut it short."""
    for target in targets:
        for i in range(warmup):
            if target.name in tally.aborted:
                break
            one(target, i, record=False)
    done = 0
    round_no = 0
    while done < count:
        if time.monotonic() > deadline:
            return True
        n = min(block, count - done)
        for target in rotated(targets, round_no):
            if target.name in tally.aborted:
                continue
            for i in range(done, done + n):
                one(target, i, record=True)
        done += n
        round_no += 1
    return False


def measure_sequential(
    targets: Sequence[Target], scenario: Scenario, count: int, warmup: int, block: int
) -> dict[str, dict[str, Any]]:
    """Sequential POSTs, one keep-alive connection per target, targets interleaved by block."""
    clients = {t.name: LeanClient(t.port) for t in targets}
    tally = Tally(targets)
    deadline = time.monotonic() + MEASUREMENT_BUDGET_S
    truncated = False
    sent: dict[str, int] = {t.name: 0 for t in targets}

    def one(target: Target, i: int, record: bool) -> None:
        request = scenario.request(i)
        client = clients[target.name]
        began = time.perf_counter_ns()
        try:
            status, _ = client.post(scenario.path, request.body, request.headers)
        except (OSError, http.client.HTTPException) as exc:
            client.reset()
            tally.error(target.name, type(exc).__name__)
            return
        elapsed = time.perf_counter_ns() - began
        sent[target.name] += 1
        if not 200 <= status < 300:
            tally.error(target.name, str(status))
        elif record:
            tally.samples[target.name].append(elapsed)

    try:
        truncated = interleaved(targets, one, tally, warmup, count, block, deadline)
    finally:
        for client in clients.values():
            client.close()
    out: dict[str, dict[str, Any]] = {}
    for t in targets:
        out[t.name] = {
            "n": len(tally.samples[t.name]),
            "errors": tally.errors[t.name],
            **({"error_kinds": tally.statuses[t.name]} if tally.errors[t.name] else {}),
            "reconnects": max(0, clients[t.name].connects - 1),
            "answered": sent[t.name],
            **latency_stats(tally.samples[t.name]),
        }
        if t.name in tally.aborted:
            out[t.name]["aborted"] = True
        if truncated:
            out[t.name]["truncated"] = True
    return out


def measure_streams(
    targets: Sequence[Target], scenario: Scenario, count: int, warmup: int, block: int
) -> dict[str, dict[str, Any]]:
    """Sequential SSE streams: time to the first body byte and to the last, per target."""
    clients = {t.name: LeanClient(t.port) for t in targets}
    tally = Tally(targets)
    ttfb: dict[str, list[int]] = {t.name: [] for t in targets}
    ttlb: dict[str, list[int]] = {t.name: [] for t in targets}
    reads: dict[str, list[int]] = {t.name: [] for t in targets}
    sent: dict[str, int] = {t.name: 0 for t in targets}
    deadline = time.monotonic() + MEASUREMENT_BUDGET_S
    truncated = False

    def one(target: Target, i: int, record: bool) -> None:
        request = scenario.request(i)
        client = clients[target.name]
        began = time.perf_counter_ns()
        first = 0
        n_reads = 0
        tail = b""
        try:
            conn = client.connection()
            conn.request("POST", scenario.path, body=request.body, headers=dict(request.headers))
            response = conn.getresponse()
            status = response.status
            while n_reads < MAX_STREAM_READS:
                chunk = response.read1(65536)
                if not chunk:
                    break
                if not first:
                    first = time.perf_counter_ns()
                n_reads += 1
                tail = (tail + chunk)[-64:]
            else:
                raise http.client.HTTPException("stream did not end")
        except (OSError, http.client.HTTPException) as exc:
            client.reset()
            tally.error(target.name, type(exc).__name__)
            return
        end = time.perf_counter_ns()
        sent[target.name] += 1
        if not 200 <= status < 300:
            tally.error(target.name, str(status))
        elif b"[DONE]" not in tail or not first:
            tally.error(target.name, "incomplete stream")
        elif record:
            ttfb[target.name].append(first - began)
            ttlb[target.name].append(end - began)
            reads[target.name].append(n_reads)

    try:
        truncated = interleaved(targets, one, tally, warmup, count, block, deadline)
    finally:
        for client in clients.values():
            client.close()
    out: dict[str, dict[str, Any]] = {}
    for t in targets:
        first_stats = latency_stats(ttfb[t.name])
        last_stats = latency_stats(ttlb[t.name])
        out[t.name] = {
            "n": len(ttfb[t.name]),
            "errors": tally.errors[t.name],
            **({"error_kinds": tally.statuses[t.name]} if tally.errors[t.name] else {}),
            "answered": sent[t.name],
            "ttfb": first_stats,
            "last_byte": last_stats,
            # Reads that returned data: about one per SSE event unless a hop buffers them.
            "reads_median": statistics.median(reads[t.name]) if reads[t.name] else None,
        }
        if t.name in tally.aborted:
            out[t.name]["aborted"] = True
        if truncated:
            out[t.name]["truncated"] = True
    return out


def added_latency(
    by_target: Mapping[str, Mapping[str, Any]], key: str | None = None
) -> dict[str, Any]:
    """Differences to direct (ms); (sidecar - direct) over (nginx - direct) and (bare - direct)."""

    def get(target: str, q: str) -> float | None:
        stats = by_target.get(target)
        if not stats:
            return None
        if key is not None:
            stats = stats.get(key) or {}
        value = stats.get(f"{q}_ms")
        return float(value) if value is not None else None

    out: dict[str, Any] = {}
    for q in ("p50", "p99"):
        direct = get("direct", q)
        if direct is None:
            continue
        side = get("sidecar", q)
        hop = get("nginx", q)
        bare = get("bare", q)
        if side is not None:
            out[f"sidecar_minus_direct_{q}_ms"] = round(side - direct, 4)
        if hop is not None:
            out[f"nginx_minus_direct_{q}_ms"] = round(hop - direct, 4)
        if side is not None and hop is not None:
            # Undefined when the nginx hop measured as free (or cheaper than direct): noise.
            out[f"sidecar_over_nginx_{q}"] = (
                round((side - direct) / (hop - direct), 2) if hop - direct > 0 else None
            )
        if bare is not None:
            out[f"bare_minus_direct_{q}_ms"] = round(bare - direct, 4)
        if side is not None and bare is not None:
            # Likewise undefined when the bare proxy measured as free.
            out[f"sidecar_over_bare_{q}"] = (
                round((side - direct) / (bare - direct), 2) if bare - direct > 0 else None
            )
    return out


# -- wrk ----------------------------------------------------------------------------------------


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not match:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk_text(text: str) -> dict[str, Any]:
    """The figures of wrk's human-readable `--latency` report (rounded by wrk)."""
    out: dict[str, Any] = {}
    if m := re.search(r"Requests/sec:\s*([\d.]+)", text):
        out["requests_per_s"] = float(m.group(1))
    if m := re.search(r"(\d+) requests in ([\d.]+\w+),", text):
        out["requests"] = int(m.group(1))
        out["duration_s"] = _ms(m.group(2)) / 1000
    if "Latency Distribution" in text:
        dist = text.split("Latency Distribution", 1)[1]
        for pct, value in re.findall(r"^\s*(\d+)%\s+([\d.]+\w+)\s*$", dist, re.M):
            out[f"p{pct}_ms"] = round(_ms(value), 4)
    errors = {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    if m := re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    ):
        errors = dict(zip(errors, map(int, m.groups()), strict=True))
    out["socket_errors"] = sum(errors.values())
    out["socket_error_kinds"] = errors
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    out["http_errors"] = int(m.group(1)) if m else 0
    return out


def parse_wrk(text: str) -> dict[str, Any]:
    """Exact figures from the script's WRK_JSON line; the text report when that is missing."""
    match = re.search(r"^WRK_JSON (\{.*\})\s*$", text, re.M)
    if not match:
        parsed = parse_wrk_text(text)
        parsed["source"] = "text"
        return parsed
    raw = json.loads(match.group(1))
    lat = raw["latency_us"]
    errors = {k: raw["errors"][k] for k in ("connect", "read", "write", "timeout")}
    duration_s = raw["duration_us"] / 1e6
    return {
        "requests": raw["requests"],
        "duration_s": round(duration_s, 3),
        "requests_per_s": round(raw["requests"] / duration_s, 1) if duration_s else 0.0,
        "p50_ms": lat["p50"] / 1000,
        "p90_ms": lat["p90"] / 1000,
        "p99_ms": lat["p99"] / 1000,
        "p999_ms": lat["p999"] / 1000,
        "mean_ms": round(lat["mean"] / 1000, 4),
        "max_ms": lat["max"] / 1000,
        # wrk counts status > 399 here; the text report calls them "Non-2xx or 3xx responses".
        "http_errors": raw["errors"]["status"],
        "socket_errors": sum(errors.values()),
        "socket_error_kinds": errors,
        "source": "lua",
    }


def wrk_binary() -> str | None:
    return shutil.which("wrk")


def run_wrk(
    port: int, path: str, bodies_file: Path, opts: Options, duration: int
) -> tuple[dict[str, Any], float]:
    """One wrk run; returns its figures and the CPU seconds wrk itself used."""
    binary = wrk_binary()
    if binary is None:
        raise FileNotFoundError("wrk not found")
    args = [
        binary,
        f"-t{opts.threads}",
        f"-c{opts.connections}",
        f"-d{duration}s",
        "--timeout",
        "5s",
        "--latency",
        "-s",
        str(WRK_SCRIPT),
        f"http://127.0.0.1:{port}{path}",
    ]
    env = clean_env() | {"WRK_BODIES": str(bodies_file), "WRK_API_KEY": API_KEY}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    # run() kills wrk on timeout and on any exception (Ctrl-C included).
    done = subprocess.run(
        args, capture_output=True, text=True, env=env, timeout=duration + 60, check=False
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()[:500]}")
    return parse_wrk(done.stdout), cpu


# -- one run ------------------------------------------------------------------------------------


@dataclass
class Context:
    opts: Options
    workdir: Path
    targets: list[Target]
    upstream_pid: int
    sidecar: Sidecar
    scenarios: dict[str, Scenario]
    bodies_file: Path
    redis_pid: int | None = None
    redis_url: str | None = None
    metered_sent_to_sidecar: int = 0


def saturate(
    ctx: Context, target: Target, duration: int, *, series: bool = False
) -> dict[str, Any]:
    proxy_pid = target.pid if target.name != "direct" else None
    redis_pid = ctx.redis_pid if target.name == "sidecar" else None
    upstream_before = cpu_seconds(ctx.upstream_pid)
    proxy_before = tree_cpu_seconds(proxy_pid) if proxy_pid else 0.0
    redis_before = cpu_seconds(redis_pid) if redis_pid else 0.0
    machine_before = machine_cpu_seconds()
    sampler: RssSampler | None = None
    with contextlib.ExitStack() as stack:
        if target.name == "sidecar":
            sampler = stack.enter_context(RssSampler(target.pid, ctx.opts.rss_interval))
        figures, wrk_cpu = run_wrk(target.port, CHAT_PATH, ctx.bodies_file, ctx.opts, duration)
    wall = max(figures.get("duration_s") or duration, 1e-3)
    cpu = {
        "wrk_cores": round(wrk_cpu / wall, 2),
        "upstream_cores": round((cpu_seconds(ctx.upstream_pid) - upstream_before) / wall, 2),
    }
    if proxy_pid:
        cpu["proxy_cores"] = round((tree_cpu_seconds(proxy_pid) - proxy_before) / wall, 2)
    if redis_pid:
        cpu["redis_cores"] = round((cpu_seconds(redis_pid) - redis_before) / wall, 2)
    # Everything on the machine, other tenants and loopback softirq included; steal apart.
    busy, steal = (a - b for a, b in zip(machine_cpu_seconds(), machine_before, strict=True))
    cpu["machine_busy_cores"] = round(busy / wall, 2)
    cpu["machine_steal_cores"] = round(steal / wall, 2)
    figures["cpu"] = cpu
    if sampler is not None:
        figures["rss"] = sampler.result(ctx.sidecar.workers, series=series)
        ctx.metered_sent_to_sidecar += int(figures.get("requests", 0)) - int(
            figures.get("http_errors", 0)
        )
    return figures


def check_alive(ctx: Context) -> None:
    proc = ctx.sidecar.proc
    if proc is None or not any(t.name == "sidecar" for t in ctx.targets):
        return
    if not proc.alive():
        raise RuntimeError(f"the sidecar {exit_status(proc)}:\n{proc.log_tail()}")


def wrk_sequential(ctx: Context, index: int) -> dict[str, Any]:
    """Sequential requests from a client that costs next to nothing: wrk, one thread, one
    keep-alive connection, the body-identity chat bodies, each target in turn (order rotated
    per run). The issue's reference floor (a bare aiohttp pass-through adds 0.14 ms) was
    measured this way; the Python client above shares the two cores with what it measures."""
    opts = ctx.opts
    one = dataclasses.replace(opts, threads=1, connections=1)
    log(f"run {index + 1}: wrk -c1 -d{opts.wrk_sequential}s against each target")
    out: dict[str, Any] = {}
    for target in rotated(ctx.targets, index):
        figures, _ = run_wrk(target.port, CHAT_PATH, ctx.bodies_file, one, opts.wrk_sequential)
        out[target.name] = {
            "requests": figures.get("requests"),
            "p50_ms": figures.get("p50_ms"),
            "p99_ms": figures.get("p99_ms"),
            "http_errors": figures.get("http_errors", 0),
        }
        if target.name == "sidecar":
            ctx.metered_sent_to_sidecar += int(figures.get("requests", 0)) - int(
                figures.get("http_errors", 0)
            )
    check_alive(ctx)
    direct = out.get("direct")
    if direct:
        for name, figures in out.items():
            if name != "direct":
                figures["added_p50_ms"] = rnd(figures["p50_ms"] - direct["p50_ms"])
                figures["added_p99_ms"] = rnd(figures["p99_ms"] - direct["p99_ms"])
    return out


def run_once(ctx: Context, index: int) -> dict[str, Any]:
    opts = ctx.opts
    run: dict[str, Any] = {"index": index, "loadavg_start": list(os.getloadavg())}
    latency: dict[str, Any] = {}
    for name in SEQUENTIAL_SCENARIOS:
        log(f"run {index + 1}: sequential {name}, {opts.requests} requests per target")
        with collector_paused():
            latency[name] = measure_sequential(
                ctx.targets, ctx.scenarios[name], opts.requests, opts.warmup, opts.block
            )
        check_alive(ctx)
        if "sidecar" in latency[name]:
            ctx.metered_sent_to_sidecar += latency[name]["sidecar"]["answered"]
    run["latency"] = latency
    run["added_latency"] = {name: added_latency(latency[name]) for name in SEQUENTIAL_SCENARIOS}
    if opts.wrk_sequential > 0 and wrk_binary() is not None:
        run["wrk_sequential"] = wrk_sequential(ctx, index)

    log(f"run {index + 1}: {opts.streams} streams per target")
    with collector_paused():
        streams = measure_streams(
            ctx.targets,
            ctx.scenarios["stream_chat"],
            opts.streams,
            opts.stream_warmup,
            max(1, opts.block // 10),
        )
    check_alive(ctx)
    if "sidecar" in streams:
        ctx.metered_sent_to_sidecar += streams["sidecar"]["answered"]
    run["stream"] = streams
    run["stream_added"] = {
        "ttfb": added_latency(streams, "ttfb"),
        "last_byte": added_latency(streams, "last_byte"),
    }

    saturation: dict[str, Any] = {}
    order = rotated(ctx.targets, index)
    run["saturation_order"] = [t.name for t in order]
    for target in order:
        log(f"run {index + 1}: wrk -c{opts.connections} -d{opts.duration}s against {target.name}")
        saturation[target.name] = saturate(ctx, target, opts.duration)
        check_alive(ctx)
    run["saturation"] = {t.name: saturation[t.name] for t in ctx.targets}
    run["loadavg_end"] = list(os.getloadavg())
    return run


# -- aggregation over repeats -------------------------------------------------------------------


def flatten(obj: Any, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in ("processes", "series", "error_kinds", "socket_error_kinds", "index"):
                continue
            out |= flatten(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, int | float) and not isinstance(obj, bool):
        out[prefix] = float(obj)
    return out


def aggregate(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per figure: the median over runs, min, max and every run's value."""
    flat = [flatten(run) for run in runs]
    keys: list[str] = []
    for f in flat:
        keys += [k for k in f if k not in keys]
    out: dict[str, dict[str, Any]] = {}
    for key in keys:
        values = [f[key] for f in flat if key in f]
        out[key] = {
            "median": round(statistics.median(values), 4),
            "min": round(min(values), 4),
            "max": round(max(values), 4),
            "runs": [round(v, 4) for v in values],
        }
    return out


# -- metadata -----------------------------------------------------------------------------------


def git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def tool_version(args: Sequence[str]) -> str | None:
    try:
        done = subprocess.run(list(args), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (done.stdout + done.stderr).strip()
    if not text:
        return None
    line = re.sub(r"\s*Copyright.*", "", text.splitlines()[0])
    return line.removeprefix("nginx version: ")


def cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def metadata(opts: Options) -> dict[str, Any]:
    status = git("status", "--porcelain", "--untracked-files=no")
    wrk = wrk_binary()
    nginx = nginx_binary()
    return {
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ"),
        "commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted_changes": bool(status) if status is not None else None,
        "command": opts.command,
        "machine": {
            "nproc": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)),
            "cpu_model": cpu_model(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            "kernel": platform.release(),
        },
        "versions": {
            "python": platform.python_version(),
            "wrk": tool_version([wrk, "-v"]) if wrk else None,
            "nginx": tool_version([nginx, "-v"]) if nginx else None,
        },
        "options": {k: v for k, v in asdict(opts).items() if k != "command"},
    }


# -- the whole benchmark ------------------------------------------------------------------------


def run_benchmark(opts: Options) -> dict[str, Any]:
    """Start everything, run the repeats (and the soak), stop everything; the result as a dict."""
    if "direct" not in opts.targets:
        raise ValueError("the direct target is the baseline and cannot be left out")
    if wrk_binary() is None:
        raise FileNotFoundError("wrk is required (apt-get install wrk)")
    result: dict[str, Any] = {"meta": metadata(opts)}
    with contextlib.ExitStack() as stack:
        if opts.log_dir:
            workdir = Path(opts.log_dir).resolve()
            workdir.mkdir(parents=True, exist_ok=True)
            workdir = Path(tempfile.mkdtemp(prefix="proxy-bench-", dir=workdir))
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="proxy-bench-")))

        mock, upstream_port = start_mock(workdir)
        stack.callback(mock.stop)
        targets = [Target("direct", upstream_port, mock.pid)]
        info: dict[str, Any] = {
            "direct": {"available": True, "port": upstream_port, "what": "sidecar mock-upstream"}
        }
        log(f"mock upstream on 127.0.0.1:{upstream_port}")

        all_scenarios = scenarios(opts)
        probe = all_scenarios["chat_body_identity"]
        if reason := probe_metered(upstream_port, probe):
            raise RuntimeError(f"the mock upstream does not answer as expected: {reason}")

        if "nginx" in opts.targets:
            if nginx_binary() is None:
                info["nginx"] = {"available": False, "reason": "nginx not installed"}
            else:
                nginx, nginx_port = start_nginx(workdir, upstream_port)
                stack.callback(nginx.stop)
                if reason := probe_metered(nginx_port, probe):
                    raise RuntimeError(f"nginx does not proxy as expected: {reason}")
                targets.append(Target("nginx", nginx_port, nginx.pid))
                info["nginx"] = {"available": True, "port": nginx_port, "what": "nginx, 1 worker"}
                log(f"nginx on 127.0.0.1:{nginx_port}")

        if "bare" in opts.targets:
            bare, bare_port = start_bare(workdir, upstream_port)
            stack.callback(bare.stop)
            if reason := probe_metered(bare_port, probe):
                raise RuntimeError(f"the bare proxy does not proxy as expected: {reason}")
            targets.append(Target("bare", bare_port, bare.pid))
            info["bare"] = {"available": True, "port": bare_port, "what": bare_description()}
            log(f"bare proxy on 127.0.0.1:{bare_port}")

        sidecar = Sidecar(None, None, 0, False, "not requested")
        redis: RedisServer | None = None
        if "sidecar" in opts.targets:
            redis = RedisServer(workdir)
            stack.callback(redis.kill)
            redis.start()
            sidecar = start_sidecar(opts, workdir, upstream_port, redis.url)
            if sidecar.proc is not None:
                stack.callback(sidecar.proc.stop)
            if (
                sidecar.available
                and sidecar.port is not None
                and (reason := probe_metered(sidecar.port, probe))
            ):
                sidecar.available = False
                sidecar.reason = f"inline mode not working: {reason}"
                assert sidecar.proc is not None
                sidecar.proc.stop(grace=3)  # it may hold the hung request open
            if sidecar.available and sidecar.port is not None and sidecar.proc is not None:
                time.sleep(0.2)
                record = None
                with contextlib.suppress(OSError, http.client.HTTPException, ValueError):
                    record = admin_get(sidecar.port, "/v2/identities/bench-user-0")
                targets.append(Target("sidecar", sidecar.port, sidecar.proc.pid))
                info["sidecar"] = {
                    "available": True,
                    "port": sidecar.port,
                    "what": "sidecar serve (inline)",
                    "workers": sidecar.workers,
                    "server": opts.server or "default",
                    "redis": redis.url,
                    "body_identity_upserted": isinstance(record, dict),
                }
                log(f"sidecar on 127.0.0.1:{sidecar.port} ({sidecar.workers} worker(s))")
            else:
                info["sidecar"] = {"available": False, "reason": sidecar.reason}
                log(f"sidecar target unavailable: {sidecar.reason}")
        result["targets"] = info

        bodies_file = workdir / "chat-bodies.jsonl"
        bodies_file.write_bytes(
            b"".join(r.body + b"\n" for r in all_scenarios["chat_body_identity"].requests)
        )
        ctx = Context(opts, workdir, targets, mock.pid, sidecar, all_scenarios, bodies_file)
        if redis is not None and redis.process is not None:
            ctx.redis_pid = redis.process.pid
            ctx.redis_url = redis.url

        runs = []
        for index in range(opts.repeats):
            runs.append(run_once(ctx, index))
        result["runs"] = runs
        result["summary"] = aggregate(runs)

        side = next((t for t in targets if t.name == "sidecar"), None)
        if opts.soak > 0:
            if side is None:
                result["soak"] = {"skipped": "the sidecar target is unavailable"}
            else:
                log(f"soak: wrk -c{opts.connections} -d{opts.soak}s against the sidecar")
                assert ctx.redis_url is not None
                with RedisMemorySampler(ctx.redis_url, opts.rss_interval) as memory:
                    soak = saturate(ctx, side, opts.soak, series=True)
                check_alive(ctx)
                result["soak"] = {"requested_s": opts.soak, "redis": memory.result()} | soak
        if side is not None:
            time.sleep(1.0)  # recording is off the response path: let the last writes land
            check = attribution_check(side.port, opts.identities)
            check["metered_2xx_sent"] = ctx.metered_sent_to_sidecar
            result["attribution"] = check
        result["meta"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        if opts.log_dir:
            result["meta"]["logs"] = str(workdir)
    return result


# -- Markdown -----------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def cell(summary: Mapping[str, Mapping[str, Any]], key: str, digits: int = 3) -> str:
    entry = summary.get(key)
    if not entry:
        return "-"
    if len(entry["runs"]) == 1:
        return fmt(entry["median"], digits)
    return (
        f"{fmt(entry['median'], digits)} ({fmt(entry['min'], digits)}-{fmt(entry['max'], digits)})"
    )


def total(summary: Mapping[str, Mapping[str, Any]], key: str) -> str:
    """A count summed over runs (errors: one in any run matters)."""
    entry = summary.get(key)
    return "-" if not entry else f"{sum(entry['runs']):,.0f}"


def spread(values: Sequence[float]) -> str:
    """Median (min-max) of a few runs."""
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(statistics.median(values))} ({fmt(min(values))}-{fmt(max(values))})"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
    ]


def render_markdown(result: Mapping[str, Any]) -> str:
    meta = result["meta"]
    summary: Mapping[str, Mapping[str, Any]] = result.get("summary", {})
    opts = meta["options"]
    targets = [t for t in TARGETS if result["targets"].get(t, {}).get("available")]
    repeats = len(result.get("runs", []))
    machine = meta["machine"]
    out = [
        "# Inline proxy benchmark",
        "",
        f"- Date (UTC): {meta['date_utc']}",
        f"- Commit: `{meta['commit']}`"
        + (" (with uncommitted changes)" if meta.get("uncommitted_changes") else ""),
        f"- Machine: {machine['nproc']} CPUs ({machine.get('cpu_model') or 'unknown'}), "
        f"load average at start {' / '.join(f'{x:.2f}' for x in machine['loadavg_start'])}"
        + (
            f", at end {' / '.join(f'{x:.2f}' for x in meta['loadavg_end'])}"
            if meta.get("loadavg_end")
            else ""
        ),
        f"- Tools: Python {meta['versions']['python']}, {meta['versions'].get('wrk') or 'no wrk'}, "
        f"{meta['versions'].get('nginx') or 'no nginx'}",
        f"- Command: `{meta['command']}`",
        "",
        "Targets, all in front of the same `sidecar mock-upstream` process:",
        "",
    ]
    for name in TARGETS:
        info = result["targets"].get(name)
        if info is None:
            out.append(f"- **{name}**: not requested")
        elif info.get("available"):
            extra = ""
            if name == "sidecar":
                extra = f", {info['workers']} worker(s), server: {info['server']}"
            out.append(f"- **{name}**: {info['what']}{extra}")
        else:
            out.append(f"- **{name}**: unavailable ({info.get('reason')})")
    out += [
        "",
        f"Figures are the median of {repeats} run(s)"
        + (", with the min-max over runs in parentheses." if repeats > 1 else ".")
        + " Latencies in ms; error counts are totals over all runs.",
        "",
        "## 1. Added latency, sequential requests on one keep-alive connection",
        "",
        f"{opts['requests']} requests per target after {opts['warmup']} warm-up ones; targets "
        f"interleaved in blocks of {opts['block']}; `http.client` with TCP_NODELAY. Every target "
        f"gets the same bytes ({opts['identities']} bench identities in rotation).",
        "",
    ]
    rows = []
    for scenario in SEQUENTIAL_SCENARIOS:
        for t in targets:
            base = f"latency.{scenario}.{t}"
            rows.append(
                [
                    scenario,
                    t,
                    cell(summary, f"{base}.p50_ms"),
                    cell(summary, f"{base}.p90_ms"),
                    cell(summary, f"{base}.p99_ms"),
                    total(summary, f"{base}.errors"),
                ]
            )
    out += table(["request", "target", "p50", "p90", "p99", "errors"], rows)
    # The bare proxy's columns only when it ran: without it the tables stay as they were.
    bare = "bare" in targets
    rows = []
    for scenario in SEQUENTIAL_SCENARIOS:
        base = f"added_latency.{scenario}"
        row = [
            scenario,
            cell(summary, f"{base}.sidecar_minus_direct_p50_ms"),
            cell(summary, f"{base}.sidecar_minus_direct_p99_ms"),
            cell(summary, f"{base}.nginx_minus_direct_p50_ms"),
            cell(summary, f"{base}.nginx_minus_direct_p99_ms"),
            cell(summary, f"{base}.sidecar_over_nginx_p50", 1),
        ]
        if bare:
            row += [
                cell(summary, f"{base}.bare_minus_direct_p50_ms"),
                cell(summary, f"{base}.bare_minus_direct_p99_ms"),
                cell(summary, f"{base}.sidecar_over_bare_p50", 1),
                cell(summary, f"{base}.sidecar_over_bare_p99", 1),
            ]
        rows.append(row)
    header = [
        "request",
        "sidecar - direct p50",
        "sidecar - direct p99",
        "nginx - direct p50",
        "nginx - direct p99",
        "(sidecar - direct) / (nginx - direct), p50",
    ]
    if bare:
        header += [
            "bare - direct p50",
            "bare - direct p99",
            "(sidecar - direct) / (bare - direct), p50",
            "(sidecar - direct) / (bare - direct), p99",
        ]
    out += [
        "Added over direct (issue 4 targets for the sidecar: p50 <= 0.4 ms, p99 <= 2 ms):",
        "",
        *table(header, rows),
    ]
    if bare:
        out += [
            "bare - direct is the floor for any Python proxy on this machine (the sidecar's "
            "server and HTTP client with nothing in between); the last two columns say how "
            "many of those floors the sidecar costs.",
            "",
        ]

    wrk_runs = [r["wrk_sequential"] for r in result.get("runs", []) if r.get("wrk_sequential")]
    if wrk_runs:
        out += [
            "### 1b. The same with wrk as the client",
            "",
            f"`wrk -t1 -c1 -d{opts.get('wrk_sequential')}s --latency` with the body-identity chat "
            "bodies, each target in turn: a client that costs next to nothing, as the issue's "
            "reference floor was measured. Milliseconds; median (range) over the runs.",
            "",
        ]
        rows = []
        for name in [t for t in TARGETS if any(t in r for r in wrk_runs)]:
            cells = [name]
            for key in ("p50_ms", "p99_ms", "added_p50_ms", "added_p99_ms"):
                values = [r[name][key] for r in wrk_runs if name in r and key in r[name]]
                cells.append(spread(values) if values else "-")
            rows.append(cells)
        out += table(["target", "p50", "p99", "added p50", "added p99"], rows)

    out += [
        "## 2. Saturation",
        "",
        f"`wrk -t{opts['threads']} -c{opts['connections']} -d{opts['duration']}s --latency` with "
        f"`bench/wrk/post_json.lua` (the body-identity chat completion), each target in turn "
        f"(order rotated per run). wrk, the mock and the target share the machine's "
        f"{machine['nproc']} CPUs; the CPU columns say how many cores each used (from /proc; "
        "machine busy counts everything, other tenants and loopback networking included).",
        "",
    ]
    rows = []
    for t in targets:
        base = f"saturation.{t}"
        rows.append(
            [
                t,
                cell(summary, f"{base}.requests_per_s", 0),
                cell(summary, f"{base}.p50_ms"),
                cell(summary, f"{base}.p99_ms"),
                total(summary, f"{base}.http_errors"),
                total(summary, f"{base}.socket_errors"),
                cell(summary, f"{base}.cpu.wrk_cores", 2),
                cell(summary, f"{base}.cpu.upstream_cores", 2),
                cell(summary, f"{base}.cpu.proxy_cores", 2),
                cell(summary, f"{base}.cpu.redis_cores", 2),
                cell(summary, f"{base}.cpu.machine_busy_cores", 2),
            ]
        )
    out += table(
        [
            "target",
            "requests/s",
            "p50",
            "p99",
            "status >= 400",
            "socket errors",
            "wrk cores",
            "mock cores",
            "proxy cores",
            "redis cores",
            "machine busy cores",
        ],
        rows,
    )

    out += [
        "## 3. Streams: time to first and last body byte",
        "",
        f"{opts['streams']} sequential streamed chat completions per target (mock paced: "
        f"`x-mock-chunks: {opts['stream_chunks']}`, `x-mock-chunk-delay-ms: "
        f"{opts['chunk_delay_ms']:g}`), one keep-alive connection each.",
        "",
    ]
    rows = []
    for t in targets:
        base = f"stream.{t}"
        rows.append(
            [
                t,
                cell(summary, f"{base}.ttfb.p50_ms"),
                cell(summary, f"{base}.ttfb.p99_ms"),
                cell(summary, f"{base}.last_byte.p50_ms", 2),
                cell(summary, f"{base}.last_byte.p99_ms", 2),
                cell(summary, f"{base}.reads_median", 0),
                total(summary, f"{base}.errors"),
            ]
        )
    out += table(
        ["target", "TTFB p50", "TTFB p99", "last byte p50", "last byte p99", "reads", "errors"],
        rows,
    )
    header = ["", "sidecar - direct", "nginx - direct"]
    if bare:
        header += ["bare - direct", "(sidecar - direct) / (bare - direct)"]
    rows = []
    for q in ("p50", "p99"):
        row = [
            q,
            cell(summary, f"stream_added.ttfb.sidecar_minus_direct_{q}_ms"),
            cell(summary, f"stream_added.ttfb.nginx_minus_direct_{q}_ms"),
        ]
        if bare:
            row += [
                cell(summary, f"stream_added.ttfb.bare_minus_direct_{q}_ms"),
                cell(summary, f"stream_added.ttfb.sidecar_over_bare_{q}", 1),
            ]
        rows.append(row)
    out += [
        "TTFB added over direct (issue 4 target for the sidecar: within 1 ms):",
        "",
        *table(header, rows),
    ]

    out += ["## 4. Sidecar RSS", ""]
    if "sidecar" not in targets:
        out += ["Not measured: the sidecar target is unavailable.", ""]
    else:
        out += [
            f"VmRSS of the `sidecar serve` process tree, sampled every {opts['rss_interval']:g} s "
            "during each saturation run (KB; slope by least squares).",
            "",
        ]
        rows = []
        base = "saturation.sidecar.rss"
        rows.append(
            [
                "process tree",
                cell(summary, f"{base}.tree.start_kb", 0),
                cell(summary, f"{base}.tree.end_kb", 0),
                cell(summary, f"{base}.tree.max_kb", 0),
                cell(summary, f"{base}.tree.slope_kb_per_min", 0),
            ]
        )
        rows.append(
            [
                "largest worker",
                cell(summary, f"{base}.largest_worker.start_kb", 0),
                cell(summary, f"{base}.largest_worker.end_kb", 0),
                cell(summary, f"{base}.largest_worker.max_kb", 0),
                cell(summary, f"{base}.largest_worker.slope_kb_per_min", 0),
            ]
        )
        out += table(["", "start", "end", "max", "slope KB/min"], rows)
        out += [
            f"A {opts['duration']} s saturation run mostly shows warm-up growth; flatness is "
            "judged on the soak.",
            "",
        ]
        soak = result.get("soak")
        if soak and "rss" in soak:
            rss = soak["rss"]
            out += [
                f"Soak: `wrk -c{opts['connections']} -d{soak['requested_s']}s` against the "
                f"sidecar, {fmt(soak.get('requests_per_s'), 0)} requests/s, "
                f"{soak.get('http_errors', 0)} status >= 400, {soak.get('socket_errors', 0)} "
                "socket errors.",
                "",
            ]
            rows = [
                [
                    f"{p['role']} (pid {p['pid']})",
                    fmt(p.get("start_kb"), 0),
                    fmt(p.get("end_kb"), 0),
                    fmt(p.get("max_kb"), 0),
                    fmt(p.get("slope_kb_per_min"), 0),
                    fmt(p.get("slope_second_half_kb_per_min"), 0),
                ]
                for p in rss["processes"]
            ]
            tree = rss["tree"]
            rows.append(
                [
                    "process tree",
                    fmt(tree.get("start_kb"), 0),
                    fmt(tree.get("end_kb"), 0),
                    fmt(tree.get("max_kb"), 0),
                    fmt(tree.get("slope_kb_per_min"), 0),
                    fmt(tree.get("slope_second_half_kb_per_min"), 0),
                ]
            )
            out += table(
                ["process", "start", "end", "max", "slope KB/min", "slope, 2nd half"], rows
            )
            memory = soak.get("redis")
            if memory:
                out += [
                    f"Redis used_memory: {memory['used_memory_start']:,} B at the start, "
                    f"{memory['used_memory_end']:,} B at the end, slope "
                    f"{fmt(memory['slope_bytes_per_min'], 0)} B/min "
                    f"({fmt(memory['slope_second_half_bytes_per_min'], 0)} B/min over the "
                    "second half). Keys and their memory by class:",
                    "",
                ]
                start, end = memory["by_class"]["start"], memory["by_class"]["end"]
                out += table(
                    ["class", "keys at start", "bytes at start", "keys at end", "bytes at end"],
                    [
                        [
                            name,
                            f"{start[name]['keys']:,}",
                            f"{start[name]['bytes']:,}",
                            f"{end[name]['keys']:,}",
                            f"{end[name]['bytes']:,}",
                        ]
                        for name in end
                    ],
                )
        elif soak:
            out += [f"Soak skipped: {soak.get('skipped')}.", ""]
        else:
            out += ["No soak run (`--soak SECONDS`).", ""]
        attribution = result.get("attribution")
        if attribution and attribution.get("available"):
            out += [
                f"Attribution check after the run: {attribution['identities']} bench identities "
                f"in the store, {attribution['recorded_requests']:,} requests recorded for them "
                f"(the harness saw {attribution['metered_2xx_sent']:,} metered 2xx answers "
                f"through the sidecar, warm-ups and wrk included), "
                f"{attribution['rate_limited_requests']} rate-limited.",
                "",
            ]

    if repeats > 1:
        out += ["## Each run", ""]
        header = ["run", "load avg (1 min)"]
        if "sidecar" in targets:
            header += [f"added p50, {s}" for s in SEQUENTIAL_SCENARIOS]
        header += [f"{t} req/s" for t in targets]
        rows = []
        for run in result["runs"]:
            row = [str(run["index"] + 1), f"{run['loadavg_start'][0]:.2f}"]
            if "sidecar" in targets:
                row += [
                    fmt(run["added_latency"][s].get("sidecar_minus_direct_p50_ms"))
                    for s in SEQUENTIAL_SCENARIOS
                ]
            row += [fmt(run["saturation"][t].get("requests_per_s"), 0) for t in targets]
            rows.append(row)
        out += table(header, rows)
    return "\n".join(out).rstrip() + "\n"


# -- command line -------------------------------------------------------------------------------


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _interval(text: str) -> float:
    value = float(text)
    if not 0.05 <= value <= 60:
        raise argparse.ArgumentTypeError("must be between 0.05 and 60 seconds")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.proxy_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--repeats", type=_positive, default=3, help="runs of 1-3 (default 3)")
    p.add_argument(
        "--requests",
        type=_positive,
        default=2000,
        help="sequential requests per target and request kind (default 2000)",
    )
    p.add_argument(
        "--warmup",
        type=_non_negative,
        default=200,
        help="warm-up requests per target before each sequential measurement",
    )
    p.add_argument(
        "--block",
        type=_positive,
        default=100,
        help="requests per target before switching to the next (interleaving)",
    )
    p.add_argument("--streams", type=_positive, default=200, help="streams per target per run")
    p.add_argument(
        "--stream-chunks",
        type=_non_negative,
        default=20,
        help="x-mock-chunks for the streams (default 20)",
    )
    p.add_argument(
        "--chunk-delay-ms",
        type=float,
        default=5.0,
        help="x-mock-chunk-delay-ms for the streams (default 5)",
    )
    p.add_argument("--duration", type=_positive, default=10, help="seconds per wrk run")
    p.add_argument("--connections", type=_positive, default=64, help="wrk connections")
    p.add_argument("--threads", type=_positive, default=2, help="wrk threads")
    p.add_argument(
        "--identities",
        type=_positive,
        default=100,
        help="distinct bench identities cycled through (default 100)",
    )
    p.add_argument(
        "--workers",
        type=_positive,
        default=None,
        help="sidecar [server] workers (default: the config's, else 1)",
    )
    p.add_argument(
        "--server",
        choices=["uvicorn", "granian"],
        default=None,
        help="passed to the sidecar as SIDECAR_SERVER",
    )
    p.add_argument(
        "--sidecar-config",
        default=None,
        help="a sidecar config TOML to start from (policies, pricing, ...)",
    )
    p.add_argument(
        "--sidecar-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the sidecar (repeatable)",
    )
    p.add_argument(
        "--soak",
        type=_non_negative,
        default=0,
        help="seconds of wrk load on the sidecar with RSS sampled (0 = no soak)",
    )
    p.add_argument(
        "--wrk-sequential",
        type=_non_negative,
        default=5,
        help="seconds of wrk with one connection per target and run (0 = skip)",
    )
    p.add_argument(
        "--rss-interval", type=_interval, default=1.0, help="seconds between RSS samples"
    )
    p.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help="comma-separated subset of direct,nginx,bare,sidecar (direct is required)",
    )
    p.add_argument(
        "--log-dir", default=None, help="keep the targets' logs and configs under this folder"
    )
    p.add_argument("--json", default=None, help="write the JSON here instead of stdout")
    p.add_argument("--markdown", default=None, help="write the Markdown summary here")
    return p


def command_line(argv: Sequence[str]) -> str:
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(Path.cwd())
    return shlex.join([str(python), "-m", "bench.proxy_bench", *argv])


def options_from_args(args: argparse.Namespace, argv: Sequence[str]) -> Options:
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise SystemExit(f"unknown target(s): {', '.join(unknown)}")
    return Options(
        repeats=args.repeats,
        requests=args.requests,
        warmup=args.warmup,
        block=args.block,
        streams=args.streams,
        stream_chunks=args.stream_chunks,
        chunk_delay_ms=args.chunk_delay_ms,
        duration=args.duration,
        connections=args.connections,
        threads=args.threads,
        identities=args.identities,
        workers=args.workers,
        server=args.server,
        sidecar_config=args.sidecar_config,
        sidecar_env=list(args.sidecar_env),
        soak=args.soak,
        wrk_sequential=args.wrk_sequential,
        rss_interval=args.rss_interval,
        targets=targets,
        log_dir=args.log_dir,
        command=command_line(argv),
    )


def _terminate(signum: int, frame: types.FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    opts = options_from_args(args, argv)
    parse_env_pairs(opts.sidecar_env)  # fail before starting anything
    # SIGTERM unwinds like Ctrl-C, so every `finally` stops what it started.
    signal.signal(signal.SIGTERM, _terminate)
    try:
        result = run_benchmark(opts)
    except KeyboardInterrupt:
        log("interrupted; everything started was stopped")
        return 130
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n", encoding="utf-8")
        log(f"JSON written to {args.json}")
    else:
        print(text)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(render_markdown(result), encoding="utf-8")
        log(f"Markdown written to {args.markdown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
