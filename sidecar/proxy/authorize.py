"""`POST /hooks/authorize[/...]` as raw ASGI: the decision of the documented Litestar route
(api/hooks.py, which describes it in the OpenAPI schema), without the framework's
per-request cost, for proxies that ask on every request."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from sidecar.asgi import ClientGone, lowered, read_body, send_error, send_json
from sidecar.errors import SidecarError, Unauthorized
from sidecar.metering.authorize import Authorizer
from sidecar.quota.signins import FailedSignIns

if TYPE_CHECKING:
    from litestar.types import HTTPScope, Receive, Send

MAX_HOOK_BODY = 2 * 1_048_576  # as the other routes (Litestar's request_max_body_size)

_encode = msgspec.json.Encoder().encode


class RawAuthorize:
    def __init__(
        self,
        authorizer: Authorizer,
        hook_token: str,
        signins: FailedSignIns,
        body_timeout_s: float,
    ) -> None:
        self.authorizer = authorizer
        self.expected = hook_token
        self.signins = signins
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: HTTPScope, receive: Receive, send: Send) -> None:
        client = scope.get("client")
        peer = client[0] if client else None
        try:
            headers = lowered(scope, self.authorizer.attribution.single_headers)
            if not await self.signins.verify(
                headers.get("x-sidecar-token"),
                self.expected,
                peer=peer,
                forwarded_for=headers.get("x-forwarded-for"),
                where="hooks",
            ):
                raise Unauthorized("missing or invalid x-sidecar-token")
            raw = await read_body(scope, receive, MAX_HOOK_BODY, self.body_timeout_s)
            decided = await self.authorizer.decide(raw, headers, peer)
        except ClientGone:
            return
        except SidecarError as exc:
            await send_error(send, exc)
            return
        await send_json(send, decided.status, _encode(decided.body), decided.headers)
