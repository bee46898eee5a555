from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from sidecar.testing.redis_server import free_port
from sidecar.testing.serving import ApiClient, serve
from tests.support.auth import ADMIN_TOKEN
from tests.support.cli import at, cli
from tests.support.env import MakeEnv


async def create(api: ApiClient, **fields: Any) -> dict[str, Any]:
    r = await api.post("/v2/identities", json=fields)
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    api.app.services.clock.advance(0.01)  # ULIDs of one ms do not sort
    return body


async def test_list_and_get_print_an_identity_created_through_the_api(
    api: ApiClient, capsys: pytest.CaptureFixture[str]
) -> None:
    ada = await create(
        api, external_id="ada", display_name="Ada Lovelace", tags=["math", "vip"],
        metadata={"plan": "pro"},
    )  # fmt: skip
    await create(api, external_id="charles-babbage-the-second")
    code, out, err = await cli(capsys, "identities", "list", *at(api))
    assert (code, err) == (0, "")
    header, first, second = out.splitlines()
    assert header.split() == [
        "_ID", "EXTERNAL_ID", "NAME", "TAGS", "REQUESTS", "COST_USD", "TOKENS", "ERRORS",
    ]  # fmt: skip
    assert first.split()[1] == "charles-babbage-the-second"  # newest first
    assert second.split()[:5] == [ada["_id"], "ada", "Ada", "Lovelace", "math,vip"]
    # Aligned: every column starts at the same place on every line.
    for title in ("EXTERNAL_ID", "TAGS"):
        column = header.index(title)
        assert second[column - 2 : column] == "  " and second[column] != " "
    for title, shown in (("REQUESTS", "0"), ("COST_USD", "0.00"), ("ERRORS", "0.0%")):
        end = header.index(title) + len(title)  # numbers end under their title's end
        assert second[end - len(shown) - 1 : end] == " " + shown
    assert len(header) == len(second)

    code, out, err = await cli(capsys, "identities", "get", "ada", *at(api))
    assert (code, err) == (0, "")
    fields = dict(line.split(None, 1) for line in out.splitlines() if len(line.split()) > 1)
    assert fields["_id"] == ada["_id"]
    assert fields["display_name"] == "Ada Lovelace"
    assert fields["tags"] == "math, vip"
    assert fields["metadata"] == '{"plan": "pro"}'
    assert fields["requests"] == "0"
    assert fields["cost_usd"] == "0.00"

    code, out, _ = await cli(capsys, "identities", "get", ada["_id"], "--json", *at(api))
    assert code == 0
    shown = json.loads(out)
    assert shown == (await api.get(f"/v2/identities/{ada['_id']}?include_metrics=true")).json()


@pytest.mark.slow
async def test_the_installed_command_prints_only_the_table(
    api: ApiClient, capsys: pytest.CaptureFixture[str]
) -> None:
    await create(api, external_id="solo", display_name="Solo")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "identities", "list", *at(api),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert (proc.returncode, err.decode()) == (0, "")
    assert out.decode().splitlines()[1].split()[1:3] == ["solo", "Solo"]


async def test_list_filters_and_pages(api: ApiClient, capsys: pytest.CaptureFixture[str]) -> None:
    ids = [
        (await create(api, external_id=f"p{n}", tags=["t"] if n else []))["_id"] for n in range(3)
    ]
    code, out, err = await cli(capsys, "identities", "list", "--limit", "2", *at(api))
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()[1:]] == [ids[2], ids[1]]
    assert err.strip() == f"(more: --after {ids[1]})"
    code, out, err = await cli(
        capsys, "identities", "list", "--limit", "2", "--after", ids[1], *at(api)
    )
    assert [line.split()[0] for line in out.splitlines()[1:]] == [ids[0]]
    assert (code, err) == (0, "")
    code, out, _ = await cli(capsys, "identities", "list", "--tag", "t", "--search", "P1", *at(api))
    assert [line.split()[1] for line in out.splitlines()[1:]] == ["p1"]
    code, out, _ = await cli(capsys, "identities", "list", "--json", "--limit", "1", *at(api))
    page = json.loads(out)
    assert (page["object"], page["has_more"], page["data"][0]["_id"]) == ("list", True, ids[2])
    assert "metrics" in page["data"][0]


async def test_top_ranks_by_30_day_cost(
    make_env: MakeEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    env = await make_env()
    chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(base_url=env.url) as client:
        for who, output_tokens in (("small", 10), ("big", 5000), ("medium", 700)):
            r = await client.post(
                "/v1/chat/completions",
                json=chat,
                headers={"X-ORQ-IDENTITY-ID": who, "x-mock-output-tokens": str(output_tokens)},
            )
            assert r.status_code == 200
    await env.settle()
    code, out, err = await cli(capsys, "identities", "top", "--limit", "2", *at(env.api))
    assert (code, err) == (0, ""), err
    header, *rows = out.splitlines()
    assert header.split()[:3] == ["#", "_ID", "EXTERNAL_ID"]
    assert [row.split()[:3:2] for row in rows] == [["1", "big"], ["2", "medium"]]


async def test_top_says_so_when_the_sidecar_cannot_rank(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async def old_sidecar(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = json.dumps(
            {
                "error": {
                    "message": "sort: unknown",
                    "type": "invalid_request_error",
                    "param": "sort",
                }
            }
        ).encode()
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 400, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async with serve(old_sidecar) as url:
        code, out, err = await cli(capsys, "identities", "top", "--url", url, "--token", "x" * 20)
    assert (code, out) == (2, "")
    assert "cannot rank identities by cost" in err
    assert err.count("\n") == 1


async def test_clear_errors_exit_2(api: ApiClient, capsys: pytest.CaptureFixture[str]) -> None:
    url = str(api.base_url).rstrip("/")
    code, out, err = await cli(capsys, "identities", "list", "--url", url, "--token", "wrong" * 4)
    assert (code, out) == (2, "")
    assert "refused the admin token" in err and "wrong" not in err

    code, out, err = await cli(capsys, "identities", "get", "nobody", *at(api))
    assert (code, out) == (2, "")
    assert err == "sidecar identities: no identity with _id or external_id 'nobody'\n"

    dead = f"http://127.0.0.1:{free_port()}"
    code, out, err = await cli(capsys, "identities", "list", "--url", dead, "--token", ADMIN_TOKEN)
    assert (code, out) == (2, "")
    assert err.startswith(f"sidecar identities: cannot reach the sidecar at {dead}")


async def test_odd_external_ids_round_trip(
    api: ApiClient, capsys: pytest.CaptureFixture[str]
) -> None:
    for external_id in ("a/b c?d#e", "..", "ünï"):
        created = await create(api, external_id=external_id)
        code, out, err = await cli(capsys, "identities", "get", external_id, "--json", *at(api))
        assert (code, err) == (0, "")
        assert json.loads(out)["_id"] == created["_id"]


async def test_the_token_comes_from_the_environment_or_the_data_dir(
    api: ApiClient,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    url = str(api.base_url).rstrip("/")
    monkeypatch.chdir(tmp_path)  # no ./config.toml
    monkeypatch.delenv("SIDECAR_CONFIG", raising=False)
    monkeypatch.setenv("SIDECAR_URL", url)
    monkeypatch.setenv("SIDECAR_ADMIN_TOKEN", ADMIN_TOKEN)
    code, _, err = await cli(capsys, "identities", "list")
    assert (code, err) == (0, "")

    monkeypatch.delenv("SIDECAR_ADMIN_TOKEN")
    monkeypatch.setenv("SIDECAR_DATA_DIR", str(tmp_path / "data"))
    code, _, err = await cli(capsys, "identities", "list")
    assert code == 2 and "no admin token" in err
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "admin_token").write_text(ADMIN_TOKEN + "\n")
    code, _, err = await cli(capsys, "identities", "list")
    assert (code, err) == (0, "")


async def test_merge_prints_the_survivor_and_names_a_missing_side(
    api: ApiClient, capsys: pytest.CaptureFixture[str]
) -> None:
    kept = await create(api, external_id="kept")
    await create(api, external_id="Kept ")
    code, out, err = await cli(capsys, "identities", "merge", "kept", "Kept", *at(api))
    assert (code, err) == (0, "")
    assert out.split() == [kept["_id"], "kept", "(merged", "from:", "Kept)"]
    assert (await api.get("/v2/identities/Kept")).json()["_id"] == kept["_id"]
    code, out, err = await cli(capsys, "identities", "merge", "kept", "nobody", *at(api))
    assert (code, out) == (2, "")
    assert "no identity with _id or external_id 'nobody'" in err
