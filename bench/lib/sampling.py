"""What the measured processes use while they run: RSS and CPU from /proc, Redis's memory."""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Self

from bench.lib.report import rnd, slope_per_minute

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MAX_SAMPLES = 100_000


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


def tree_cpu_seconds(root: int) -> float:
    return sum(cpu_seconds(pid) for pid in process_tree(root))


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


class CpuMeter:
    """CPU used by named groups of processes (each a tree root, or several single processes)
    and by the whole machine between `start()` and `stop()`."""

    def __init__(
        self, trees: Mapping[str, int], single: Mapping[str, Iterable[int]] | None = None
    ) -> None:
        self.trees = dict(trees)
        self.single = {name: list(pids) for name, pids in (single or {}).items()}
        self.used: dict[str, float] = {}
        self._before: dict[str, float] = {}
        self._machine = (0.0, 0.0)

    def _now(self) -> dict[str, float]:
        now = {name: tree_cpu_seconds(root) for name, root in self.trees.items()}
        return now | {name: sum(map(cpu_seconds, pids)) for name, pids in self.single.items()}

    def start(self) -> None:
        self._before = self._now()
        self._machine = machine_cpu_seconds()

    def stop(self) -> None:
        now = self._now()
        self.used = {name: now[name] - self._before[name] for name in now}
        busy, steal = (a - b for a, b in zip(machine_cpu_seconds(), self._machine, strict=True))
        # Everything on the machine, other tenants and loopback softirq included; steal apart.
        self.used |= {"machine_busy": busy, "machine_steal": steal}

    def cores(self, wall: float) -> dict[str, float]:
        return {f"{name}_cores": round(s / max(wall, 1e-3), 2) for name, s in self.used.items()}


def process_role(pid: int, root: int) -> str:
    if pid == root:
        return "main"
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "gone"
    helper = b"resource_tracker" in cmdline or b"semaphore_tracker" in cmdline
    return "helper" if helper else "worker"


def memory_stats(points: list[tuple[float, float]], unit: str = "kb") -> dict[str, Any]:
    """First, last and largest of (seconds, value) points, and their slope per minute."""
    if not points:
        return {}
    values = [p[1] for p in points]
    half = [p for p in points if p[0] >= points[-1][0] / 2]
    return {
        f"start_{unit}": int(values[0]),
        f"end_{unit}": int(values[-1]),
        f"max_{unit}": int(max(values)),
        f"slope_{unit}_per_min": rnd(slope_per_minute(points), 1),
        f"slope_second_half_{unit}_per_min": rnd(slope_per_minute(half), 1),
        "samples": len(points),
    }


class PeriodicSampler:
    """Calls `sample()` on entry, every `interval` seconds in a thread, and on exit."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.began = 0.0
        self._count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def elapsed(self) -> float:
        return time.monotonic() - self.began

    def _run(self) -> None:
        while not self._stop.wait(self.interval) and self._count < MAX_SAMPLES:
            self.sample()
            self._count += 1

    def __enter__(self) -> Self:
        self.began = time.monotonic()
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.sample()


class RssSampler(PeriodicSampler):
    """VmRSS of every process in a tree."""

    def __init__(self, root: int, interval: float = 1.0) -> None:
        super().__init__(interval)
        self.root = root
        self.samples: list[tuple[float, dict[int, int]]] = []
        self.roles: dict[int, str] = {}

    def sample(self) -> None:
        reading: dict[int, int] = {}
        for pid in process_tree(self.root):
            kb = rss_kb(pid)
            if kb is not None:
                reading[pid] = kb
                self.roles.setdefault(pid, process_role(pid, self.root))
        self.samples.append((self.elapsed(), reading))

    def result(self, workers: int, *, series: bool = False) -> dict[str, Any]:
        pids = sorted({pid for _, r in self.samples for pid in r})
        processes: list[dict[str, Any]] = []
        for pid in pids:
            points = [(t, float(r[pid])) for t, r in self.samples if pid in r]
            processes.append({"pid": pid, "role": self.roles.get(pid, "?")} | memory_stats(points))
        worker_pids = [p for p in pids if self.roles.get(p) == "worker"] or [self.root]
        per_worker = [p for p in processes if p["pid"] in worker_pids]
        largest = max(per_worker, key=lambda p: float(p.get("max_kb", 0)), default=None)
        out: dict[str, Any] = {
            "interval_s": self.interval,
            "workers_configured": workers,
            "worker_processes": len(per_worker),
            "tree": memory_stats([(t, float(sum(r.values()))) for t, r in self.samples]),
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


class RedisMemorySampler(PeriodicSampler):
    """Redis's used_memory; at both ends the keys and their memory by class, so that growth of
    the usage buckets (expected) shows apart from the rest."""

    def __init__(self, url: str, interval: float = 1.0) -> None:
        import redis as redis_sync

        super().__init__(interval)
        self.client = redis_sync.Redis.from_url(url, socket_timeout=5)
        self.samples: list[tuple[float, float]] = []
        self.classes: dict[str, dict[str, dict[str, int]]] = {}

    def sample(self) -> None:
        used = int(self.client.info("memory")["used_memory"])
        self.samples.append((self.elapsed(), float(used)))

    def by_class(self) -> dict[str, dict[str, int]]:
        out = {name: {"keys": 0, "bytes": 0} for name, _ in KEY_CLASSES}
        out["other"] = {"keys": 0, "bytes": 0}
        for key in self.client.scan_iter(count=1000):
            name = next((n for n, pattern in KEY_CLASSES if pattern.match(key)), "other")
            out[name]["keys"] += 1
            out[name]["bytes"] += int(self.client.memory_usage(key, samples=0) or 0)
        return out

    def __enter__(self) -> Self:
        self.classes["start"] = self.by_class()
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self.classes["end"] = self.by_class()
        self.client.close()

    def result(self) -> dict[str, Any]:
        stats = memory_stats(self.samples, "bytes")
        return {
            "used_memory_start": stats["start_bytes"],
            "used_memory_end": stats["end_bytes"],
            "used_memory_max": stats["max_bytes"],
            "slope_bytes_per_min": rnd(stats["slope_bytes_per_min"], 0),
            "slope_second_half_bytes_per_min": rnd(stats["slope_second_half_bytes_per_min"], 0),
            "by_class": self.classes,
        }
