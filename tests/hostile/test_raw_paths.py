"""Identity routes given paths no client library would send: bytes that are not UTF-8 once
percent-decoded, truncated escapes, encoded NULs and CR/LF. Each gets a 4xx JSON error, never
a 500."""

from __future__ import annotations

import pytest

from sidecar.testing.serving import ApiClient
from tests.support.auth import ADMIN_TOKEN
from tests.support.rawhttp import RawConnection

REFS = ["%ff", "%C3", "a%E2%82", "%ED%A0%80", "%00", "%0D%0AX-Evil:%201", "%", "%zz"]


async def send(url: str, method: str, path: str) -> tuple[int, dict[str, object]]:
    conn = await RawConnection.open(url)
    try:
        body = b"{}" if method == "PATCH" else b""
        headers = {
            "authorization": f"Bearer {ADMIN_TOKEN}",
            "content-type": "application/json",
            "content-length": str(len(body)),
        }
        await conn.head(method, path, headers)
        await conn.send(body)
        answer = await conn.answer(within=5)
    finally:
        await conn.close()
    error: dict[str, object] = answer.json()["error"]
    return answer.status, error


@pytest.mark.parametrize("method", ["GET", "PATCH", "DELETE"])
async def test_undecodable_refs_are_client_errors(api: ApiClient, method: str) -> None:
    paths = [f"/v2/identities/{ref}" for ref in REFS]
    if method == "GET":
        paths += [f"/v2/identities/{ref}/metrics" for ref in REFS]
    for path in paths:
        status, error = await send(str(api.base_url), method, path)
        assert 400 <= status < 500, (method, path, status, error)
        assert error["type"] in ("invalid_request_error", "not_found_error"), error
    status, error = await send(str(api.base_url), method, "/v2/identities/%ff")
    assert (status, error["param"]) == (400, "id")
