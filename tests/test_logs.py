from __future__ import annotations

import asyncio
import contextvars
import hashlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from sidecar import logs
from sidecar.mock import start_mock
from sidecar.settings import ConfigError, parse
from sidecar.testing.redis_server import RedisServer, free_port

TOKEN = "sk-sidecar-admin-0123456789abcdef"
API_KEY = "sk-client-live-9f8e7d6c5b4a"


def capture(formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    handler.addFilter(logs.ContextFilter())
    logger = logging.getLogger(f"sidecar.test.{id(out)}")
    logger.propagate = False
    logger.handlers = [handler]
    logger.setLevel(logging.INFO)
    return logger, out


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_json_lines_carry_the_request_and_identity_when_known() -> None:
    logger, out = capture(logs.JsonFormatter())

    def in_a_request() -> None:
        logs.bind("user_123", "01JDQ6ZK3N4X8V2B7C9D0E1F2G")
        logger.warning("usage of %s not recorded", "user_123")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")

    contextvars.copy_context().run(in_a_request)
    logger.info("between requests", extra={"fields": {"spool_bytes": 12}})
    first, second, third = lines(out)
    assert list(first) == ["time", "level", "logger", "message", "request_id", "identity"]
    assert first["level"] == "WARNING"
    assert first["logger"] == logger.name
    assert first["message"] == "usage of user_123 not recorded"
    assert (first["request_id"], first["identity"]) == ("01JDQ6ZK3N4X8V2B7C9D0E1F2G", "user_123")
    assert first["time"].endswith("Z")
    assert datetime.fromisoformat(first["time"].replace("Z", "+00:00")).tzinfo is not None
    assert "ValueError: boom" in second["exception"]
    assert "request_id" not in third and "identity" not in third
    assert third["spool_bytes"] == 12


def test_a_request_id_is_made_when_a_line_needs_one() -> None:
    logger, out = capture(logs.JsonFormatter())

    def in_a_request() -> None:
        logs.bind("team-a")
        logger.info("one")
        logger.info("two")

    contextvars.copy_context().run(in_a_request)
    one, two = lines(out)
    assert len(one["request_id"]) == 26
    assert one["request_id"] == two["request_id"]  # one request, one id


def test_tokens_and_keys_are_redacted_whatever_logs_them() -> None:
    logger, out = capture(logs.JsonFormatter([TOKEN]))
    logger.warning("the token is %s", TOKEN)
    logger.warning("headers: Authorization: Bearer %s, x-api-key: %s", API_KEY, API_KEY)
    logger.warning("retrying with token=%s", "abcdefghijklmnop")
    text = out.getvalue()
    assert TOKEN not in text and API_KEY not in text and "abcdefghijklmnop" not in text
    assert [line["message"] for line in lines(out)] == [
        "the token is [redacted]",
        "headers: Authorization: Bearer [redacted], x-api-key: [redacted]",
        "retrying with token=[redacted]",
    ]


def test_text_format_appends_the_context() -> None:
    logger, out = capture(logs.TextFormatter([TOKEN]))

    def in_a_request() -> None:
        logs.bind("user 1", "req-1")
        logger.warning("slow %s", TOKEN)

    contextvars.copy_context().run(in_a_request)
    text = out.getvalue().strip()
    tail = " slow [redacted] [request_id=req-1 identity='user 1']"
    assert text.endswith(f"WARNING {logger.name}{tail}")


def test_log_settings_are_checked() -> None:
    settings = parse({"server": {"log_format": "text", "log_level": "warning"}})
    assert (settings.server.log_format, settings.server.log_level) == ("text", "warning")
    assert (parse({}).server.log_format, parse({}).server.access_log) == ("json", False)
    with pytest.raises(ConfigError) as bad:
        parse({"server": {"log_format": "xml", "log_level": "loud"}})
    assert any(p.startswith("server.log_format") for p in bad.value.problems), bad.value.problems


@pytest.mark.slow
async def test_serve_writes_json_lines_and_an_access_log_without_secrets(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    mock = await start_mock()
    port = free_port()
    key_digest = hashlib.sha256(API_KEY.encode()).hexdigest()
    config = tmp_path / "config.toml"
    config.write_text(
        f'[server]\nport = {port}\ndata_dir = "{tmp_path / "data"}"\naccess_log = true\n'
        f'[upstream]\nurl = "{mock.url}"\n'
        f'[redis]\nurl = "{redis_server.url}"\nkey_prefix = "logtest"\n'
        f'[[api_keys]]\nsha256 = "{key_digest}"\nowner = "key-owner-1"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env["SIDECAR_ADMIN_TOKEN"] = TOKEN
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            for _ in range(200):
                try:
                    if (await client.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)
            chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
            r = await client.post(
                "/v1/chat/completions?trace=1",
                json=chat,
                headers={"Authorization": f"Bearer {API_KEY}"},
            )
            assert r.status_code == 200, r.text
            r = await client.get("/v1/models", headers={"x-api-key": API_KEY})
            assert r.status_code == 200
            r = await client.get("/v2/identities", headers={"Authorization": f"Bearer {TOKEN}"})
            assert r.status_code == 200
            r = await client.get("/v2/identities", headers={"Authorization": "Bearer wrong-one"})
            assert r.status_code == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
        await mock.close()
    assert TOKEN not in stdout + stderr
    assert API_KEY not in stdout + stderr
    records = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records), stderr
    access = [r for r in records if r["logger"] == "sidecar.access"]
    assert [(r["method"], r["path"], r["status"]) for r in access] == [
        ("POST", "/v1/chat/completions", 200),
        ("GET", "/v1/models", 200),
    ]
    chat_line = access[0]
    assert chat_line["identity"] == "key-owner-1"
    assert len(chat_line["request_id"]) == 26
    assert chat_line["duration_ms"] > 0
    assert "identity" not in access[1]  # not metered: nobody to name
