"""The inline proxy benchmark: direct, nginx, bare and sidecar targets measured in one run."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Any

from bench.lib.client import (
    ClientError,
    Target,
    admin_get,
    attribution_check,
    measure_sequential,
    measure_streams,
    rotated,
)
from bench.lib.config import parse_env_pairs, sidecar_config
from bench.lib.meta import bare_description, finish, metadata
from bench.lib.payloads import API_KEY, CHAT_PATH, SEQUENTIAL_SCENARIOS, Scenario, scenarios
from bench.lib.processes import Launcher, Proc, StartError, note
from bench.lib.report import added_latency, aggregate, log, ratio, rnd
from bench.lib.sampling import CpuMeter, RedisMemorySampler, RssSampler
from bench.lib.wrk import Load, require_wrk, run_wrk, saturate, wrk_binary

TARGETS = ("direct", "nginx", "bare", "sidecar")
REFERENCES = ("bare", "nginx")


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

    @property
    def load(self) -> Load:
        return Load(self.threads, self.connections)


@dataclass
class Context:
    opts: Options
    targets: list[Target]
    upstream: Target
    scenarios: dict[str, Scenario]
    wrk_env: dict[str, str]
    sidecar: Proc | None = None
    workers: int = 0
    redis_pid: int | None = None
    metered_sent_to_sidecar: int = 0

    def check_alive(self) -> None:
        if self.sidecar is not None:
            self.sidecar.check_alive()

    def count(self, target: str, figures: dict[str, Any]) -> None:
        """Metered 2xx answers through the sidecar, for the attribution check at the end."""
        if target == "sidecar":
            sent = int(figures.get("requests", figures.get("answered", 0)))
            self.metered_sent_to_sidecar += sent - int(figures.get("http_errors", 0))


def saturate_target(
    ctx: Context, target: Target, duration: int, *, series: bool = False
) -> dict[str, Any]:
    sidecar = target.name == "sidecar"
    meter = CpuMeter(
        trees={} if target.name == "direct" else {"proxy": target.pid},
        single={"upstream": [ctx.upstream.pid]}
        | ({"redis": [ctx.redis_pid]} if sidecar and ctx.redis_pid else {}),
    )
    rss = RssSampler(target.pid, ctx.opts.rss_interval) if sidecar else None
    figures = saturate(target, CHAT_PATH, duration, ctx.opts.load, ctx.wrk_env, meter, rss)
    if rss is not None:
        figures["rss"] = rss.result(ctx.workers, series=series)
    ctx.count(target.name, figures)
    return figures


def wrk_sequential(ctx: Context, index: int) -> dict[str, Any]:
    """Sequential requests from a client that costs next to nothing: wrk, one thread, one
    keep-alive connection, the body-identity chat bodies, each target in turn (order rotated
    per run). The reference floor (a bare aiohttp pass-through adds 0.14 ms) was measured this
    way; the Python client shares the cores with what it measures."""
    seconds = ctx.opts.wrk_sequential
    log(f"run {index + 1}: wrk -c1 -d{seconds}s against each target")
    out: dict[str, Any] = {}
    for target in rotated(ctx.targets, index):
        url = f"http://127.0.0.1:{target.port}{CHAT_PATH}"
        figures, _ = run_wrk(url, seconds, Load(1, 1), env=ctx.wrk_env)
        out[target.name] = {k: figures.get(k) for k in ("requests", "p50_ms", "p99_ms")}
        out[target.name]["http_errors"] = figures.get("http_errors", 0)
        ctx.count(target.name, figures)
    ctx.check_alive()
    direct = out.get("direct")
    if direct:
        for name, figures in out.items():
            if name != "direct":
                figures["added_p50_ms"] = rnd(figures["p50_ms"] - direct["p50_ms"])
                figures["added_p99_ms"] = rnd(figures["p99_ms"] - direct["p99_ms"])
    return out


def over_references(values: dict[str, Any], key: str, suffix: str = "") -> dict[str, Any]:
    """The sidecar's figure over each reference's, within one run."""
    side = values.get("sidecar", {}).get(key)
    return {
        f"sidecar_over_{ref}{suffix}": ratio(side, values[ref].get(key))
        for ref in REFERENCES
        if ref in values and side is not None
    }


def run_once(ctx: Context, index: int) -> dict[str, Any]:
    opts = ctx.opts
    run: dict[str, Any] = {"index": index, "loadavg_start": list(os.getloadavg())}
    latency: dict[str, Any] = {}
    for name in SEQUENTIAL_SCENARIOS:
        log(f"run {index + 1}: sequential {name}, {opts.requests} requests per target")
        latency[name] = measure_sequential(
            ctx.targets, ctx.scenarios[name], opts.requests, opts.warmup, opts.block
        )
        ctx.check_alive()
        ctx.count("sidecar", latency[name].get("sidecar", {}))
    run["latency"] = latency
    run["added_latency"] = {name: added_latency(latency[name]) for name in SEQUENTIAL_SCENARIOS}
    if opts.wrk_sequential > 0 and wrk_binary() is not None:
        run["wrk_sequential"] = wrk_sequential(ctx, index)
        run["wrk_sequential_added"] = over_references(
            run["wrk_sequential"], "added_p50_ms", "_p50"
        ) | over_references(run["wrk_sequential"], "added_p99_ms", "_p99")

    log(f"run {index + 1}: {opts.streams} streams per target")
    streams = measure_streams(
        ctx.targets,
        ctx.scenarios["stream_chat"],
        opts.streams,
        opts.stream_warmup,
        max(1, opts.block // 10),
    )
    ctx.check_alive()
    ctx.count("sidecar", streams.get("sidecar", {}))
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
        saturation[target.name] = saturate_target(ctx, target, opts.duration)
        ctx.check_alive()
    run["saturation"] = {t.name: saturation[t.name] for t in ctx.targets}
    run["saturation_ratio"] = over_references(saturation, "requests_per_s")
    run["saturation_p99_ratio"] = over_references(saturation, "p99_ms")
    run["loadavg_end"] = list(os.getloadavg())
    return run


def start_sidecar(launcher: Launcher, ctx: Context, redis_url: str) -> dict[str, Any]:
    """The sidecar target, or why it is not there: a sidecar that does not start or does not
    proxy is reported, and the references are measured all the same."""
    opts = ctx.opts
    config, ctx.workers = sidecar_config(
        launcher.folder("sidecar"), opts.sidecar_config, workers=opts.workers
    )
    env = parse_env_pairs(opts.sidecar_env)
    if opts.server:
        env["SIDECAR_SERVER"] = opts.server
    probe = ctx.scenarios["chat_body_identity"]
    try:
        target = launcher.sidecar("sidecar", config, redis_url, ctx.upstream, probe, env)
    except StartError as exc:
        log(f"sidecar target unavailable: {exc}")
        return note(str(exc), None)
    time.sleep(0.2)  # the probe's identity is written after the answer
    record = None
    with contextlib.suppress(*ClientError, ValueError):
        record = admin_get(target.port, "/v2/identities/bench-user-0")
    ctx.targets.append(target)
    ctx.sidecar = launcher.procs["sidecar"]
    return note(
        "sidecar serve (inline)",
        target,
        workers=ctx.workers,
        server=opts.server or "default",
        redis=redis_url,
        body_identity_upserted=isinstance(record, dict),
    )


def run_benchmark(opts: Options) -> dict[str, Any]:
    """Start everything, run the repeats (and the soak), stop everything; the result as a dict."""
    if "direct" not in opts.targets:
        raise ValueError("the direct target is the baseline and cannot be left out")
    require_wrk()
    options = {k: v for k, v in dataclasses.asdict(opts).items() if k != "command"}
    result: dict[str, Any] = {"meta": metadata(opts.command, options)}
    with Launcher("proxy-bench-", opts.log_dir) as launcher:
        upstream = launcher.mock()
        all_scenarios = scenarios(opts.identities, opts.stream_chunks, opts.chunk_delay_ms)
        probe = all_scenarios["chat_body_identity"]
        launcher.checked(upstream, "the mock upstream", probe)
        info: dict[str, Any] = {"direct": note("sidecar mock-upstream", upstream)}
        references = launcher.references(upstream, probe, opts.targets)
        for target in references:
            what = "nginx, 1 worker" if target.name == "nginx" else bare_description()
            info[target.name] = note(what, target)
        if "nginx" in opts.targets and "nginx" not in info:
            info["nginx"] = note("nginx not installed", None)

        bodies = probe.write_bodies(launcher.workdir / "chat-bodies.jsonl")
        wrk_env = {"WRK_BODIES": str(bodies), "WRK_API_KEY": API_KEY}
        ctx = Context(opts, [upstream, *references], upstream, all_scenarios, wrk_env)
        redis_url = None
        if "sidecar" in opts.targets:
            redis = launcher.redis()
            assert redis.process is not None
            ctx.redis_pid, redis_url = redis.process.pid, redis.url
            info["sidecar"] = start_sidecar(launcher, ctx, redis.url)
        result["targets"] = info

        result["runs"] = [run_once(ctx, index) for index in range(opts.repeats)]
        result["summary"] = aggregate(result["runs"])

        side = next((t for t in ctx.targets if t.name == "sidecar"), None)
        if opts.soak > 0:
            if side is None or redis_url is None:
                result["soak"] = {"skipped": "the sidecar target is unavailable"}
            else:
                log(f"soak: wrk -c{opts.connections} -d{opts.soak}s against the sidecar")
                with RedisMemorySampler(redis_url, opts.rss_interval) as memory:
                    soak = saturate_target(ctx, side, opts.soak, series=True)
                ctx.check_alive()
                result["soak"] = {"requested_s": opts.soak, "redis": memory.result()} | soak
        if side is not None:
            time.sleep(1.0)  # recording is off the response path: let the last writes land
            check = attribution_check(side.port, opts.identities)
            check["metered_2xx_sent"] = ctx.metered_sent_to_sidecar
            result["attribution"] = check
        finish(result["meta"])
        if opts.log_dir:
            result["meta"]["logs"] = str(launcher.workdir)
    return result
