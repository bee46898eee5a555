"""The Python keep-alive client: sequential requests and streams, the targets interleaved.

One `http.client` connection per target with Nagle off, no pool, no extra layer. The targets are
measured in blocks whose order rotates, so that drift on a shared machine hits every target alike.
"""

from __future__ import annotations

import contextlib
import gc
import http.client
import json
import re
import socket
import statistics
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bench.lib.payloads import ADMIN_TOKEN, Scenario
from bench.lib.report import latency_stats

# Bounds: no loop below runs longer than these, whatever a target does.
REQUEST_TIMEOUT_S = 30.0
PROBE_TIMEOUT_S = 5.0  # a first metered request slower than this is not working
MEASUREMENT_BUDGET_S = 900.0  # one sequential or stream measurement, all targets
MAX_ERRORS_PER_TARGET = 50  # a target failing this often is dropped from the measurement
MAX_STREAM_READS = 100_000

ClientError = (OSError, http.client.HTTPException)


@dataclass(frozen=True)
class Target:
    name: str
    port: int
    pid: int  # root of the process tree serving it, for CPU and RSS


def rotated(targets: Sequence[Target], n: int) -> list[Target]:
    n %= len(targets)
    return list(targets[n:]) + list(targets[:n])


class LeanClient:
    """One keep-alive HTTP/1.1 connection with Nagle off."""

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

    def request(
        self, method: str, path: str, body: bytes | None, headers: Mapping[str, str]
    ) -> tuple[int, bytes]:
        conn = self.connection()
        conn.request(method, path, body=body, headers=dict(headers))
        response = conn.getresponse()
        return response.status, response.read()

    def post(self, path: str, body: bytes, headers: Mapping[str, str]) -> tuple[int, bytes]:
        return self.request("POST", path, body, headers)

    def get(self, path: str, headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
        return self.request("GET", path, None, headers or {})

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = None


def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def probe_metered(port: int, scenario: Scenario) -> str | None:
    """None when a metered POST answers 200 with a `usage` object, else why not."""
    client = LeanClient(port, timeout=PROBE_TIMEOUT_S)
    request = scenario.request(0)
    try:
        status, data = client.post(scenario.path, request.body, request.headers)
    except ClientError as exc:
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
    """The JSON of an admin GET, None unless it answers 200."""
    client = LeanClient(port, timeout=5)
    try:
        status, data = client.get(path, admin_headers())
    finally:
        client.close()
    return json.loads(data) if status == 200 else None


def metric(port: int, name: str) -> float:
    """A counter or gauge of the sidecar's /metrics, summed over its labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    found = re.findall(rf"^{name}(?:_total)?(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M)
    return sum(float(v) for v in found)


def attribution_check(port: int, identities: int) -> dict[str, Any]:
    """What the sidecar recorded for the bench identities (30-day metrics from Redis)."""
    found = requests = rate_limited = 0
    cursor: str | None = None
    for _ in range(identities // 200 + 2):
        query = {"search": "bench-user-", "limit": "200", "include_metrics": "true"}
        if cursor:
            query["starting_after"] = cursor
        try:
            page = admin_get(port, "/v2/identities?" + urllib.parse.urlencode(query))
        except (*ClientError, ValueError):
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


class Tally:
    """Per target: the clients, what answered, what failed, and whether it was given up on."""

    def __init__(self, targets: Sequence[Target]) -> None:
        self.clients = {t.name: LeanClient(t.port) for t in targets}
        self.answered = {t.name: 0 for t in targets}
        self.errors = {t.name: 0 for t in targets}
        self.kinds: dict[str, dict[str, int]] = {t.name: {} for t in targets}
        self.aborted: set[str] = set()
        self.truncated = False

    def error(self, target: str, what: str) -> None:
        self.errors[target] += 1
        self.kinds[target][what] = self.kinds[target].get(what, 0) + 1
        if self.errors[target] >= MAX_ERRORS_PER_TARGET:
            self.aborted.add(target)

    def failed(self, target: str, exc: BaseException) -> None:
        self.clients[target].close()
        self.error(target, type(exc).__name__)

    def close(self) -> None:
        for client in self.clients.values():
            client.close()

    def summary(self, target: str, n: int) -> dict[str, Any]:
        out: dict[str, Any] = {"n": n, "errors": self.errors[target]}
        if self.errors[target]:
            out["error_kinds"] = self.kinds[target]
        out["reconnects"] = max(0, self.clients[target].connects - 1)
        out["answered"] = self.answered[target]
        if target in self.aborted:
            out["aborted"] = True
        if self.truncated:
            out["truncated"] = True
        return out


One = Callable[[Target, int, bool], None]


def interleaved(
    targets: Sequence[Target], one: One, tally: Tally, warmup: int, count: int, block: int
) -> None:
    """Warm every target up, then `count` requests per target in blocks of `block`, the
    targets' order rotating each block; cut short (and marked so) past the time budget."""
    deadline = time.monotonic() + MEASUREMENT_BUDGET_S
    try:
        for target in targets:
            for i in range(warmup):
                if target.name in tally.aborted:
                    break
                one(target, i, False)
        done = round_no = 0
        while done < count:
            if time.monotonic() > deadline:
                tally.truncated = True
                return
            n = min(block, count - done)
            for target in rotated(targets, round_no):
                if target.name not in tally.aborted:
                    for i in range(done, done + n):
                        one(target, i, True)
            done += n
            round_no += 1
    finally:
        tally.close()


def measure_sequential(
    targets: Sequence[Target], scenario: Scenario, count: int, warmup: int, block: int
) -> dict[str, dict[str, Any]]:
    """Sequential POSTs, one keep-alive connection per target, targets interleaved by block."""
    tally = Tally(targets)
    samples: dict[str, list[int]] = {t.name: [] for t in targets}

    def one(target: Target, i: int, record: bool) -> None:
        request = scenario.request(i)
        began = time.perf_counter_ns()
        try:
            status, _ = tally.clients[target.name].post(
                scenario.path, request.body, request.headers
            )
        except ClientError as exc:
            tally.failed(target.name, exc)
            return
        elapsed = time.perf_counter_ns() - began
        tally.answered[target.name] += 1
        if not 200 <= status < 300:
            tally.error(target.name, str(status))
        elif record:
            samples[target.name].append(elapsed)

    with collector_paused():
        interleaved(targets, one, tally, warmup, count, block)
    return {
        t.name: tally.summary(t.name, len(samples[t.name])) | latency_stats(samples[t.name])
        for t in targets
    }


def measure_streams(
    targets: Sequence[Target], scenario: Scenario, count: int, warmup: int, block: int
) -> dict[str, dict[str, Any]]:
    """Sequential SSE streams: time to the first body byte and to the last, per target."""
    tally = Tally(targets)
    ttfb: dict[str, list[int]] = {t.name: [] for t in targets}
    ttlb: dict[str, list[int]] = {t.name: [] for t in targets}
    reads: dict[str, list[int]] = {t.name: [] for t in targets}

    def one(target: Target, i: int, record: bool) -> None:
        request = scenario.request(i)
        began = time.perf_counter_ns()
        first = n_reads = 0
        tail = b""
        try:
            conn = tally.clients[target.name].connection()
            conn.request("POST", scenario.path, body=request.body, headers=request.headers)
            response = conn.getresponse()
            while n_reads < MAX_STREAM_READS:
                chunk = response.read1(65536)
                if not chunk:
                    break
                first = first or time.perf_counter_ns()
                n_reads += 1
                tail = (tail + chunk)[-64:]
            else:
                raise http.client.HTTPException("stream did not end")
        except ClientError as exc:
            tally.failed(target.name, exc)
            return
        end = time.perf_counter_ns()
        tally.answered[target.name] += 1
        if not 200 <= response.status < 300:
            tally.error(target.name, str(response.status))
        elif b"[DONE]" not in tail or not first:
            tally.error(target.name, "incomplete stream")
        elif record:
            ttfb[target.name].append(first - began)
            ttlb[target.name].append(end - began)
            reads[target.name].append(n_reads)

    with collector_paused():
        interleaved(targets, one, tally, warmup, count, block)
    return {
        t.name: tally.summary(t.name, len(ttfb[t.name]))
        | {
            "ttfb": latency_stats(ttfb[t.name]),
            "last_byte": latency_stats(ttlb[t.name]),
            # Reads that returned data: about one per SSE event unless a hop buffers them.
            "reads_median": statistics.median(reads[t.name]) if reads[t.name] else None,
        }
        for t in targets
    }
