from __future__ import annotations

import hashlib
import hmac
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from sidecar.errors import Unauthorized


def token_matches(given: str | None, expected: str) -> bool:
    # Digests first, so that neither the length nor the content leaks through timing.
    if given is None:
        return False
    a = hashlib.sha256(given.encode("utf-8", "surrogateescape")).digest()
    b = hashlib.sha256(expected.encode("utf-8")).digest()
    return hmac.compare_digest(a, b)


def bearer(value: str | None) -> str | None:
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


async def admin_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    expected: str = connection.app.state.admin_token
    if not token_matches(bearer(connection.headers.get("authorization")), expected):
        raise Unauthorized("missing or invalid admin token (Authorization: Bearer <token>)")
