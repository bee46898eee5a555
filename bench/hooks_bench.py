"""Hook-mode decisions per second: /hooks/authorize with three limits checked per decision.

    .venv/bin/python -m bench.hooks_bench [--repeats 3] [--duration 10] [--connections 64]

Starts a private redis-server and a `sidecar serve` with bench/limits-policy.toml; wrk drives
POST /hooks/authorize for 100 identities (header source). In the same run, /healthz on the
same server gives the floor (the HTTP stack alone) for the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from sidecar.testing.redis_server import RedisServer, free_port

TOKEN = "bench-admin-token-0123456789"
HERE = Path(__file__).resolve().parent

AUTHORIZE_LUA = f"""
wrk.method = "POST"
wrk.body = '{{"model":"gpt-4o","messages":[{{"role":"user","content":"hi"}}]}}'
wrk.headers["content-type"] = "application/json"
wrk.headers["x-sidecar-token"] = "{TOKEN}"
request = function()
  wrk.headers["X-ORQ-IDENTITY-ID"] = "hook-user-" .. math.random(0, 99)
  return wrk.format(nil, "/hooks/authorize")
end
"""


def parse(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    rate = re.search(r"Requests/sec:\s+([\d.]+)", text)
    out["requests_per_s"] = float(rate.group(1)) if rate else 0.0
    for name, pct in (("p50_ms", "50%"), ("p99_ms", "99%")):
        match = re.search(rf"\s{pct}\s+([\d.]+)(us|ms|s)", text)
        if match:
            value = float(match.group(1))
            out[name] = (
                value / 1000
                if match.group(2) == "us"
                else value * (1000 if match.group(2) == "s" else 1)
            )
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    out["non_2xx"] = float(errors.group(1)) if errors else 0.0
    return out


def wrk(url: str, script: Path | None, duration: int, connections: int) -> dict[str, float]:
    args = ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency", url]
    if script is not None:
        args[1:1] = ["-s", str(script)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=duration + 30, check=True)
    return parse(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        redis = RedisServer(work)
        redis.start()
        config = work / "config.toml"
        config.write_text(
            f'[redis]\nurl = "{redis.url}"\n[policies]\npaths = ["{HERE / "limits-policy.toml"}"]\n'
        )
        script = work / "authorize.lua"
        script.write_text(AUTHORIZE_LUA)
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
        env |= {
            "SIDECAR_PORT": str(port),
            "SIDECAR_ADMIN_TOKEN": TOKEN,
            "SIDECAR_DATA_DIR": str(work / "data"),
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "serve", "--config", str(config)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(200):
                try:
                    if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.05)
            wrk(base, script, 2, args.connections)  # warm-up: the identities exist after it
            authorize, floor = [], []
            for _ in range(args.repeats):
                authorize.append(wrk(base, script, args.duration, args.connections))
                floor.append(wrk(base + "/healthz", None, args.duration, args.connections))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            redis.kill()
    rates = [r["requests_per_s"] for r in authorize]
    floors = [r["requests_per_s"] for r in floor]
    result: dict[str, Any] = {
        "authorize": authorize,
        "healthz_floor": floor,
        "authorize_per_s_median": statistics.median(rates),
        "authorize_per_s_range": [min(rates), max(rates)],
        "authorize_over_healthz": round(statistics.median(rates) / statistics.median(floors), 3),
        "load_average": os.getloadavg(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
