"""The guards of the sidecar's own routes: the admin token (the API), the hook token (the hooks'
usage route; the raw authorize route checks it itself). Failed attempts are limited per client
address (quota.signins)."""

from __future__ import annotations

from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from sidecar.errors import Unauthorized
from sidecar.quota.signins import FailedSignIns
from sidecar.tokens import bearer


class _TokenGuard:
    where = ""
    refusal = ""

    def __init__(self, token: str, signins: FailedSignIns) -> None:
        self.token = token
        self.signins = signins

    def given(self, connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
        raise NotImplementedError

    async def __call__(
        self, connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler
    ) -> None:
        client = connection.client
        if not await self.signins.verify(
            self.given(connection),
            self.token,
            peer=client.host if client is not None else None,
            forwarded_for=connection.headers.get("x-forwarded-for"),
            where=self.where,
        ):
            raise Unauthorized(self.refusal)


class AdminGuard(_TokenGuard):
    """`Authorization: Bearer <admin token>`."""

    where = "api"
    refusal = "missing or invalid admin token (Authorization: Bearer <token>)"

    def given(self, connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
        return bearer(connection.headers.get("authorization"))


class HookGuard(_TokenGuard):
    """`x-sidecar-token`: the hooks' Authorization header is the original client's."""

    where = "hooks"
    refusal = "missing or invalid x-sidecar-token"

    def given(self, connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
        return connection.headers.get("x-sidecar-token")
