"""The guards of the sidecar's own routes: the admin token (the API, the hooks' usage route)."""

from __future__ import annotations

from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from sidecar.errors import Unauthorized
from sidecar.tokens import bearer, token_matches


class AdminGuard:
    """`Authorization: Bearer <admin token>`."""

    def __init__(self, token: str) -> None:
        self.token = token

    async def __call__(
        self, connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler
    ) -> None:
        if not token_matches(bearer(connection.headers.get("authorization")), self.token):
            raise Unauthorized("missing or invalid admin token (Authorization: Bearer <token>)")


class HookGuard:
    """`x-sidecar-token`: the hooks' Authorization header is the original client's."""

    def __init__(self, token: str) -> None:
        self.token = token

    async def __call__(
        self, connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler
    ) -> None:
        if not token_matches(connection.headers.get("x-sidecar-token"), self.token):
            raise Unauthorized("missing or invalid x-sidecar-token")
