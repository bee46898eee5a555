from __future__ import annotations

import aiohttp
import anthropic
import openai


async def test_models_list(oai: openai.AsyncOpenAI, claude: anthropic.AsyncAnthropic) -> None:
    models = [model.id async for model in oai.models.list()]
    assert "gpt-4o-mini" in models
    claude_models = [model.id async for model in claude.models.list()]
    assert claude_models and all(name.startswith("claude") for name in claude_models)


async def test_routes_match_by_suffix(http: aiohttp.ClientSession) -> None:
    for prefix in ("/v1", "/openai/v1", "/v3/router", ""):
        async with http.post(prefix + "/chat/completions", json={"model": "m"}) as resp:
            assert resp.status == 200
            assert (await resp.json())["object"] == "chat.completion"


async def test_unknown_route_bad_json_and_wrong_method(http: aiohttp.ClientSession) -> None:
    async with http.get("/v1/nothing") as resp:
        assert resp.status == 404
        error = (await resp.json())["error"]
        assert error["type"] == "invalid_request_error" and "message" in error
    async with http.post(
        "/v1/chat/completions", data=b"{nope", headers={"content-type": "application/json"}
    ) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "invalid_request_error"
    async with http.post("/v1/messages", data=b"[1]") as resp:
        assert resp.status == 400
        assert (await resp.json())["type"] == "error"
    async with http.get("/v1/chat/completions") as resp:
        assert resp.status == 405
        assert resp.headers["allow"] == "POST"
