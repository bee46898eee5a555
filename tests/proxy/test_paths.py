"""Which paths cost money: `[metering] extra_paths` (globs) are metered, and with
`other_paths = "deny"` nothing unmetered can be spent through the sidecar."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from sidecar.proxy.inline import upstream_target
from sidecar.proxy.upstream import Upstream
from tests.support.env import Env, MakeEnv
from tests.support.limits import policy_file
from tests.support.rawhttp import RawConnection

BODY = {"model": "rerank-1", "query": "q", "documents": ["a", "b"]}


async def test_extra_path_globs_are_metered_and_the_rest_forwarded(make_env: MakeEnv) -> None:
    env: Env = await make_env(metering={"extra_paths": ["/v1/rerank*", "/custom/*/score"]})
    async with httpx.AsyncClient(base_url=env.url) as client:
        for path in ("/v1/rerank", "/v1/reranking", "/custom/x/score"):
            r = await client.post(path, json=BODY, headers={"X-ORQ-IDENTITY-ID": "ranker"})
            assert r.status_code in (200, 404), r.text  # the mock may not know the path
        unmetered = await client.post(
            "/v1/images/generations", json={"prompt": "p"}, headers={"X-ORQ-IDENTITY-ID": "ranker"}
        )
    assert unmetered.status_code != 403
    metrics = await env.metrics("ranker")
    assert metrics["total_requests"] == 3  # the image request passed through uncounted


async def test_other_paths_deny_refuses_unmetered_posts_and_lets_reads_through(
    make_env: MakeEnv,
) -> None:
    env: Env = await make_env(metering={"other_paths": "deny"})
    async with httpx.AsyncClient(base_url=env.url) as client:
        for path in ("/v1/batches", "/v1/images/generations", "/v1/audio/speech", "/v1/files"):
            r = await client.post(path, json={"x": 1})
            assert r.status_code == 403, (path, r.text)
            error = r.json()["error"]
            assert (error["type"], error["code"]) == ("permission_error", "path_not_metered")
        assert list(env.mock.requests) == []
        listed = await client.get("/v1/models")
        assert listed.status_code != 403
        chat = await client.post(
            "/v1/chat/completions",
            json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert chat.status_code == 200


async def test_path_and_query_go_upstream_byte_for_byte(env: Env) -> None:
    conn = await RawConnection.open(env.url)
    try:
        for target in ("/v1/models/%67pt-4o?a=%41&b=c%20d", "/v1/files//x;y"):
            await conn.head("GET", target, {"content-length": "0"})
            answered = await conn.answer(within=5)
            assert answered.status < 500, answered.body
    finally:
        await conn.close()
    seen = [(r.path, r.query) for r in env.mock.requests]
    assert seen == [("/v1/models/%67pt-4o", "a=%41&b=c%20d"), ("/v1/files//x;y", "")]


async def answered(
    conn: RawConnection, method: str, target: str, headers: dict[str, str], body: bytes = b""
) -> int:
    """The status `target` answers `method` with."""
    await conn.head(method, target, headers)
    if body:
        await conn.send(body)
    return (await conn.answer(within=5)).status


async def refused_as_not_normalized(
    conn: RawConnection, targets: tuple[str, ...], headers: dict[str, str], body: bytes
) -> None:
    """POST `body` to each target: each is answered 400 `path_not_normalized`."""
    for target in targets:
        await conn.head("POST", target, headers)
        await conn.send(body)
        answered = await conn.answer(within=5)
        assert answered.status == 400, (target, answered.body)
        error = answered.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert error["code"] == "path_not_normalized"


async def test_a_path_with_dot_segments_is_refused_not_resolved(
    make_env: MakeEnv, tmp_path: Path
) -> None:
    """`/v1/chat/completions/x/..` is no metered path as sent, but an upstream that resolved its
    segments would serve a chat completion: unmetered, past every limit."""
    env: Env = await make_env(
        **policy_file(tmp_path, '[[policy]]\nname = "one"\nrequests = ["1/minute"]\n')
    )
    conn = await RawConnection.open(env.url)
    body = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}'
    headers = {"content-type": "application/json", "content-length": str(len(body))}
    headers["x-orq-identity-id"] = "walker"
    try:
        targets = (
            "/v1/chat/completions/x/..",
            "/v1/chat/completions/.",
            "/v1/x/%2e%2e/chat/completions/%2E",
            "/v1/./models",
        )
        await refused_as_not_normalized(conn, targets, headers, body)
        # Names that only start with a dot are no dot segments.
        assert await answered(conn, "GET", "/v1/.well-known/x..y", {"content-length": "0"}) != 400
        # None of the refused counted: the one request a minute is still there.
        assert await answered(conn, "POST", "/v1/chat/completions", headers, body) == 200
    finally:
        await conn.close()
    paths = [r.path for r in env.mock.requests]
    assert paths == ["/v1/.well-known/x..y", "/v1/chat/completions"]


async def test_a_metered_path_in_another_spelling_is_refused_not_forwarded(
    make_env: MakeEnv, tmp_path: Path
) -> None:
    """`/v1/Chat/Completions` is no metered path as sent, but an upstream that folds case (or
    drops `;` parameters, reads a backslash as a slash, trims trailing dots, merges slashes,
    decodes once more) would serve a chat completion: unmetered, past every limit."""
    env: Env = await make_env(
        **policy_file(tmp_path, '[[policy]]\nname = "one"\nrequests = ["1/minute"]\n')
    )
    conn = await RawConnection.open(env.url)
    body = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}'
    headers = {"content-type": "application/json", "content-length": str(len(body))}
    headers["x-orq-identity-id"] = "speller"
    azure = {**headers, "x-orq-identity-id": "deployer"}
    try:
        targets = (
            "/v1/Chat/Completions",
            "/V1/CHAT/COMPLETIONS",
            "/v1/chat/completions;x=1",
            "/v1/chat;a/completions",
            "/v1/chat/completions%3B",
            "/v1%5Cchat%5Ccompletions",
            "/v1/chat/completions.",
            "/v1/chat/completions%20",
            "/v1/Embeddings",
            "/v1/MESSAGES",
            "/v1/chat/completion%C5%BF",  # U+017F, a long s: an S to .NET's ignore-case
            "/v1/chat/%EF%BD%83ompletions",  # U+FF43, a fullwidth c
            "/v1/chat//completions",  # one slash to nginx (merge_slashes)
            "/v1/chat/%2Fcompletions",
            "/v1/chat%252Fcompletions",  # a slash to a server that decodes once more
            "/v1%255Cchat%255Ccompletions",
            "/v1/chat/completions%09",  # a tab, trimmed as whitespace
            "/v1/chat/completions%00",
            "/v1/chat/completions%20%0D",
            "/v1/chat/completions%3Fx=1",  # a `?` to a server that decodes before it splits
            "/v1/chat/completions%23",
            "/v1/chat/completions%C2%85",  # U+0085, a C1 control Python's strip takes
            "/v1/chat/completions%C2%80",
            "/v1/chat/completions%E1%9A%80",  # U+1680, an ogham space mark
            "/v1/chat/completions%E2%80%A8",  # U+2028, a line separator
            "/v1/chat/completions%E2%80%A9.",
        )
        await refused_as_not_normalized(conn, targets, headers, body)
        # A read in another case, a POST that is no metered path in any spelling, and a
        # deployment's name in capitals before a metered path as the API names it, go through.
        deployed = "/openai/deployments/GPT-4o/chat/completions"
        assert await answered(conn, "POST", deployed, azure, body) == 200
        # A slash too many where the path is metered as sent is metered, as the same kind.
        doubled = {**headers, "x-orq-identity-id": "doubler"}
        assert await answered(conn, "POST", "//v1/chat/completions/", doubled, body) == 200
        assert await answered(conn, "GET", "/v1/Chat/Completions", {"content-length": "0"}) != 400
        assert await answered(conn, "POST", "/v1/files;x", headers, body) != 400
        # None of the refused counted: the one request a minute is still there.
        assert await answered(conn, "POST", "/v1/chat/completions", headers, body) == 200
    finally:
        await conn.close()
    paths = [r.path for r in env.mock.requests]
    assert paths == [
        "/openai/deployments/GPT-4o/chat/completions",
        "//v1/chat/completions/",
        "/v1/Chat/Completions",
        "/v1/files;x",
        "/v1/chat/completions",
    ]
    assert (await env.metrics("doubler"))["total_requests"] == 1


def test_a_byte_that_is_not_ascii_goes_upstream_percent_encoded() -> None:
    scope: Any = {"path": "/v1/models/é", "raw_path": b"/v1/models/\xe9%41"}
    scope["query_string"] = b"q=\xe9"
    assert upstream_target(scope) == "/v1/models/%E9%41?q=%E9"
    scope = {"path": "/v1/models", "raw_path": None, "query_string": b""}
    assert upstream_target(scope) == "/v1/models"


def test_the_configured_upstream_is_encoded_once_and_paths_appended_as_sent() -> None:
    assert Upstream("http://up:4000/open ai/", 5).url == "http://up:4000/open%20ai"
    assert Upstream("http://up:4000", 5).url == "http://up:4000"
    assert Upstream(None, 5).url == ""


async def test_a_metered_path_asked_for_as_another_method_with_an_override_is_refused(
    make_env: MakeEnv,
) -> None:
    """Some servers take X-HTTP-Method-Override (and its variants) as the method: a GET to the
    chat path that says POST there would be a call nobody metered or limited."""
    env: Env = await make_env(metering={"extra_paths": ["/v1/rerank"]})
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(base_url=env.url) as client:
        for method, path in (
            ("GET", "/v1/chat/completions"),
            ("PUT", "/v1/rerank"),
            ("GET", "/v1/Chat/Completions"),
        ):
            for header in ("X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override"):
                r = await client.request(
                    method, path, json=body, headers={header: "POST", "X-ORQ-IDENTITY-ID": "m"}
                )
                assert r.status_code == 400, (method, path, header, r.text)
                error = r.json()["error"]
                assert (error["type"], error["code"]) == (
                    "invalid_request_error",
                    "method_override_refused",
                )
        assert list(env.mock.requests) == []
        # Without one, or to a path that is not metered, a read goes through as before.
        plain = await client.get("/v1/chat/completions")
        models = await client.get("/v1/models", headers={"X-HTTP-Method-Override": "POST"})
    assert plain.status_code != 400 and models.status_code != 400
    assert len(env.mock.requests) == 2
