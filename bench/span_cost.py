"""What a metered request's span costs the worker, in CPU of its event loop's thread.

    .venv/bin/python -m bench.span_cost [--spans 20000] [--repeats 3]

Runs the worker's side of `[telemetry]` as the proxy does for each request (the span started
from the request's headers, the traceparent for upstream, the attributes built at settlement, the
record queued and sent to the exporter process), with and without a caller's `traceparent`,
against an OTLP/HTTP receiver on loopback, and reports the thread's CPU per span (the exporter
process's is not counted: it runs beside the worker). Spans are made faster than the exporter
takes them, so some are dropped at the end; that does not change the worker's cost.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from bench.lib import cli
from sidecar import __version__
from sidecar.identity.resolve import Resolved, Source
from sidecar.metering import spans
from sidecar.observe.otel import OtelTracer
from sidecar.observe.otel_export import Config
from sidecar.testing.otlp import OtlpReceiver
from sidecar.usage.model import Kind, Usage

MODULE = "bench.span_cost"
CALLER = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
CASES = {"no traceparent": {"content-type": "application/json"}, "with traceparent": CALLER}


async def measure(count: int, repeats: int) -> dict[str, Any]:
    receiver = OtlpReceiver(keep=False)
    url = await receiver.start()
    config = Config(url + "/v1/traces", {}, "llm-sidecar", __version__, timeout_s=5)
    tracer = OtelTracer(config, 1.0)
    await tracer.open()
    resolved = Resolved("user_123", Source.BODY)
    usage = Usage(input_tokens=1000, output_tokens=500, model="gpt-4o-2024-08-06")
    out: dict[str, Any] = {}
    try:
        for case, carrier in CASES.items():
            runs = []
            for _ in range(repeats):
                await tracer.flush(60)
                started = time.thread_time()
                for i in range(count):
                    span = tracer.start("chat gpt-4o", carrier, time.time_ns(), server=True)
                    span.propagation()
                    attributes = spans.attributes(
                        resolved,
                        Kind.CHAT,
                        "gpt-4o",
                        usage,
                        cost_nanos=7_500_000,
                        policy="default",
                        status=200,
                        request_id="01JDQ0000000000000000000AA",
                    )
                    span.finish(attributes, time.time_ns())
                    if i % 200 == 0:
                        await asyncio.sleep(0)  # the send timer runs, as between requests
                runs.append(round((time.thread_time() - started) / count * 1e6, 2))
            out[case] = {"us_per_span": runs, "median": statistics.median(runs)}
    finally:
        await tracer.close()
        await receiver.close()
    out["received"] = receiver.span_count
    out["dropped_by_the_worker"] = tracer.dropped
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = cli.parser(MODULE, __doc__)
    p.add_argument("--spans", type=cli.positive, default=20000, help="spans per run")
    p.add_argument("--repeats", type=cli.positive, default=3, help="runs per case")
    args = p.parse_args(argv)

    def run() -> cli.Outcome:
        result = asyncio.run(measure(args.spans, args.repeats))
        lines = [
            f"{case}: **{result[case]['median']} us** CPU per span in the worker "
            f"(runs: {', '.join(map(str, result[case]['us_per_span']))})"
            for case in CASES
        ]
        return cli.Outcome(result, "\n".join(lines))

    return cli.run(MODULE, "A span's cost to the worker", args, argv, run)


if __name__ == "__main__":
    raise SystemExit(main())
