"""What the benchmarks send: the bench identities, chat and embedding bodies, request scenarios."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ADMIN_TOKEN = "bench-admin-token-0123456789"
API_KEY = "sk-bench-0123456789abcdef"
IDENTITY_HEADER = "X-ORQ-IDENTITY-ID"
CHAT_PATH = "/v1/chat/completions"
EMBEDDINGS_PATH = "/v1/embeddings"
SEQUENTIAL_SCENARIOS = ("chat_body_identity", "chat_header_identity", "embeddings_body_identity")


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


def base_headers() -> dict[str, str]:
    return {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}


@dataclass(frozen=True)
class Request:
    body: bytes
    headers: dict[str, str]


@dataclass(frozen=True)
class Scenario:
    name: str
    path: str
    requests: tuple[Request, ...]  # cycled; one per bench identity

    def request(self, i: int) -> Request:
        return self.requests[i % len(self.requests)]

    def write_bodies(self, path: Path) -> Path:
        """One body a line, for bench/wrk/post_json.lua (WRK_BODIES)."""
        path.write_bytes(b"".join(r.body + b"\n" for r in self.requests))
        return path


def scenarios(
    identities: int, stream_chunks: int = 20, chunk_delay_ms: float = 5.0
) -> dict[str, Scenario]:
    ks = range(max(1, identities))
    plain = base_headers()
    paced = plain | {
        "x-mock-chunks": str(stream_chunks),
        "x-mock-chunk-delay-ms": f"{chunk_delay_ms:g}",
    }
    header_requests = tuple(
        Request(chat_body(k, with_identity=False), plain | {IDENTITY_HEADER: f"bench-user-{k}"})
        for k in ks
    )
    return {
        "chat_body_identity": Scenario(
            "chat_body_identity", CHAT_PATH, tuple(Request(chat_body(k), plain) for k in ks)
        ),
        "chat_header_identity": Scenario("chat_header_identity", CHAT_PATH, header_requests),
        "embeddings_body_identity": Scenario(
            "embeddings_body_identity",
            EMBEDDINGS_PATH,
            tuple(Request(embeddings_body(k), plain) for k in ks),
        ),
        "stream_chat": Scenario(
            "stream_chat", CHAT_PATH, tuple(Request(chat_body(k, stream=True), paced) for k in ks)
        ),
    }


def chat(identities: int) -> Scenario:
    """The chat completion with a body identity: what every saturation run sends."""
    return scenarios(identities)["chat_body_identity"]


def scenario_named(identities: int, name: str) -> Scenario:
    """One of `scenarios`, by name; SystemExit naming the others when there is none."""
    chosen = scenarios(identities)
    if name not in chosen:
        raise SystemExit(f"--scenario: one of {', '.join(sorted(chosen))}")
    return chosen[name]
