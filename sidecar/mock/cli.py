from __future__ import annotations

import argparse
import asyncio
import gc
import signal
import sys
from collections.abc import Callable

from sidecar.mock.model import MockOptions
from sidecar.mock.server import start_mock


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--port",
        type=_non_negative_int,
        default=4000,
        help="port to listen on; 0 picks a free one (printed on start)",
    )
    parser.add_argument(
        "--latency-ms",
        type=_non_negative_float,
        default=0.0,
        help="delay before each response starts",
    )
    parser.add_argument(
        "--fail-rate", type=_fraction, default=0.0, help="fraction of requests answered with a 500"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed for --fail-rate")
    parser.add_argument(
        "--chunks", type=_non_negative_int, default=5, help="content chunks per streamed response"
    )
    parser.add_argument(
        "--chunk-delay-ms",
        type=_non_negative_float,
        default=0.0,
        help="delay before each streamed content chunk",
    )
    parser.add_argument(
        "--cost", action="store_true", help="add usage.cost (USD) to OpenAI-shaped usage"
    )
    parser.add_argument(
        "--input-tokens",
        type=_non_negative_int,
        default=None,
        help="fixed input token count (default: request bytes / 4)",
    )
    parser.add_argument(
        "--output-tokens",
        type=_non_negative_int,
        default=None,
        help="fixed output token count (default: max tokens asked, up to 64, else 16)",
    )


def options_from_args(args: argparse.Namespace) -> MockOptions:
    return MockOptions(
        latency_ms=args.latency_ms,
        fail_rate=args.fail_rate,
        seed=args.seed,
        chunks=args.chunks,
        chunk_delay_ms=args.chunk_delay_ms,
        cost=args.cost,
        input_tokens=args.input_tokens,
        output_tokens=args.output_tokens,
    )


async def _serve(args: argparse.Namespace) -> int:
    try:
        options = options_from_args(args)
    except ValueError as exc:
        print(f"mock-upstream: {exc}", file=sys.stderr)
        return 2
    try:
        server = await start_mock(args.host, args.port, options)
    except OSError as exc:
        print(f"mock-upstream: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # A long-lived benchmark target: keep the collector off the objects loaded at start.
    gc.freeze()
    print(f"mock-upstream listening on {server.url}", flush=True)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await server.close()
    return 0


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(args: argparse.Namespace) -> int:
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(_serve(args))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sidecar mock-upstream",
        description="A fake OpenAI- and Anthropic-compatible upstream.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
