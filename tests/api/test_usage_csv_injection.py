"""The CSV usage export never hands a spreadsheet a formula: a text cell (ids, names, tags)
that starts with `=`, `+`, `-`, `@`, tab or carriage return gets a `'` in front; numeric
columns stay numbers; the JSON export is unchanged."""

from __future__ import annotations

import csv
import io
from decimal import Decimal

import httpx
import pytest

from sidecar.api.usage.stream import spreadsheet_text
from tests.support.env import Env, MakeEnv

# external id -> (display name, tags)
HOSTILE = {
    "=cmd|' /C calc'!A0": ('=HYPERLINK("http://evil.example","x")', ["=tag"]),
    "+1+1": ("+name", ["+tag"]),
    "-5": ("-2+3", ["-7"]),
    "@SUM(A1:A9)": ("@name", ["@tag"]),
    "plain": ("a=b, c+d", ["x-y"]),
}
NUMERIC = (
    "requests", "errors", "input_tokens", "cached_input_tokens", "cache_write_tokens",
    "output_tokens", "reasoning_tokens", "unpriced_requests", "rate_limited_requests",
)  # fmt: skip


def guarded(value: str) -> str:
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


async def traffic(env: Env) -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(base_url=env.url) as client:
        for external_id, (name, tags) in HOSTILE.items():
            made = {"external_id": external_id, "display_name": name, "tags": tags}
            r = await env.api.post("/v2/identities", json=made)
            assert r.status_code == 201, r.text
            r = await client.post(
                "/v1/chat/completions", json=body, headers={"X-ORQ-IDENTITY-ID": external_id}
            )
            assert r.status_code == 200, r.text
    await env.settle()


async def table(env: Env, group_by: str) -> list[dict[str, str]]:
    r = await env.api.get("/v2/usage", params={"group_by": group_by, "format": "csv"})
    assert r.status_code == 200, r.text
    return list(csv.DictReader(io.StringIO(r.text)))


def assert_numeric(row: dict[str, str]) -> None:
    for column in NUMERIC:
        assert row[column].isdigit(), (column, row[column])
    assert Decimal(row["cost_usd"]) >= 0 and row["cost_usd"][0].isdigit()


async def test_text_cells_that_start_a_formula_are_quoted(make_env: MakeEnv) -> None:
    env = await make_env()
    await traffic(env)
    rows = {row["_id"]: row for row in await table(env, "identity")}
    data = (await env.api.get("/v2/usage")).json()["data"]
    assert len(rows) == len(data) == len(HOSTILE)
    for expected in data:  # the JSON export holds the values as they are
        name, _ = HOSTILE[expected["external_id"]]
        assert expected["display_name"] == name
        row = rows[expected["_id"]]
        assert row["external_id"] == guarded(expected["external_id"])
        assert row["display_name"] == guarded(name)
        assert_numeric(row)
        assert row["requests"] == str(expected["requests"]) == "1"
        assert row["cost_usd"] == expected["cost_usd"]
    by_external_id = {row["external_id"]: row for row in rows.values()}
    assert by_external_id["'=cmd|' /C calc'!A0"]["display_name"].startswith("'=HYPERLINK(")
    assert by_external_id["'-5"]["display_name"] == "'-2+3"
    assert by_external_id["plain"]["display_name"] == "a=b, c+d"  # not at the start: as it is


async def test_tag_cells_are_quoted_too(make_env: MakeEnv) -> None:
    env = await make_env()
    await traffic(env)
    rows = await table(env, "tag")
    tags = sorted(t for _, ts in HOSTILE.values() for t in ts)
    assert [row["tag"] for row in rows] == [guarded(t) for t in tags]
    assert {row["tag"] for row in rows} >= {"'=tag", "'+tag", "'-7", "'@tag", "x-y"}
    for row in rows:
        assert_numeric(row)
        assert row["identities"] == row["requests"] == "1"
    for cell in (c for row in rows for c in row.values()):
        assert cell[:1] not in ("=", "+", "-", "@", "\t", "\r")


@pytest.mark.parametrize(
    ("value", "written"),
    [
        ("=1+1", "'=1+1"),
        ("+1", "'+1"),
        ("-1", "'-1"),
        ("@A1", "'@A1"),
        ("\tx", "'\tx"),
        ("\rx", "'\rx"),
        ("'=1", "'=1"),  # already text to a spreadsheet
        ("1-1", "1-1"),
        ("", ""),
        ("(untagged)", "(untagged)"),
    ],
)
def test_spreadsheet_text(value: str, written: str) -> None:
    assert spreadsheet_text(value) == written
