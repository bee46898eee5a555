"""Inference traffic through a sidecar to the mock upstream."""

from __future__ import annotations

from typing import Any

import openai

from tests.support.env import Env

MESSAGES: Any = [{"role": "user", "content": "Say hi"}]


def client(env: Env, **kw: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=env.url + "/v1", api_key="sk-upstream", max_retries=0, **kw)


def tokens(input_tokens: int, output_tokens: int, **more: int) -> dict[str, str]:
    """Headers that make the mock upstream report this usage."""
    headers = {"x-mock-input-tokens": str(input_tokens), "x-mock-output-tokens": str(output_tokens)}
    headers |= {f"x-mock-{k.replace('_', '-')}": str(v) for k, v in more.items()}
    return headers
