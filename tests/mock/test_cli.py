from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import aiohttp
import pytest

from sidecar.mock import add_arguments


def test_command_line_defaults() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    assert (args.host, args.port, args.latency_ms, args.fail_rate) == ("127.0.0.1", 4000, 0.0, 0.0)
    assert (args.chunks, args.chunk_delay_ms, args.cost) == (5, 0.0, False)
    assert args.seed is None and args.input_tokens is None and args.output_tokens is None
    args = parser.parse_args(["--port", "0", "--cost", "--fail-rate", "0.25", "--chunks", "2"])
    assert (args.port, args.cost, args.fail_rate, args.chunks) == (0, True, 0.25, 2)
    with pytest.raises(SystemExit):
        parser.parse_args(["--fail-rate", "2"])


async def test_run_serves_until_sigterm() -> None:
    script = (
        "import argparse, sys\n"
        "from sidecar.mock import add_arguments, run\n"
        "parser = argparse.ArgumentParser()\n"
        "add_arguments(parser)\n"
        "sys.exit(run(parser.parse_args(sys.argv[1:])))\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        "--port",
        "0",
        "--chunks",
        "2",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
        assert line.startswith("mock-upstream listening on http://127.0.0.1:")
        url = line.rsplit(" ", 1)[1]
        async with aiohttp.ClientSession(url) as session:
            async with session.post("/v1/chat/completions", json={"model": "m"}) as resp:
                data = await resp.json()
            assert data["choices"][0]["message"]["content"] == "Hello from"
            async with session.post("/v1/messages", json={"stream": True}) as resp:
                assert (await resp.read()).endswith(
                    b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
                )
            # A dying stream and a client leaving mid-stream must not log anything.
            async with session.post(
                "/v1/chat/completions", json={"stream": True}, headers={"x-mock-drop-after": "1"}
            ) as resp:
                with pytest.raises(aiohttp.ClientPayloadError):
                    await resp.read()
            async with session.post(
                "/v1/chat/completions",
                json={"stream": True},
                headers={"x-mock-chunk-delay-ms": "50"},
            ) as resp:
                await resp.content.readline()
                resp.close()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        _, stderr = await proc.communicate()
    assert stderr == b""
