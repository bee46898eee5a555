"""The one error shape every answer of the sidecar uses, and the failures that map to it.

`{"error": {"message", "type", "code", "param"}}`, as OpenAI's API shapes its errors, so the
clients users already have read it. Domain code raises a SidecarError; each edge (the raw ASGI
routes, Litestar's exception handler, the dashboard) turns it into a response here or in
sidecar.api.errors, never by hand."""

from __future__ import annotations

import msgspec


class ErrorBody(msgspec.Struct):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorResponse(msgspec.Struct):
    error: ErrorBody


# The `type` of an error by status, where the raiser does not say.
TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    431: "invalid_request_error",
    429: "rate_limit_error",
    502: "api_error",
    503: "service_unavailable_error",
    504: "api_error",
}

_encode = msgspec.json.Encoder().encode


def error_json(
    status: int,
    message: str,
    *,
    type: str | None = None,
    code: str | None = None,
    param: str | None = None,
) -> bytes:
    kind = type or TYPES.get(status, "api_error")
    return _encode(ErrorResponse(ErrorBody(message=message, type=kind, code=code, param=param)))


class SidecarError(Exception):
    """A failure with an HTTP meaning; mapped to the one JSON error shape at the edge."""

    status = 500
    type = "api_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}
        if code is not None:
            self.code = code

    def json(self) -> bytes:
        return error_json(
            self.status, self.message, type=self.type, code=self.code, param=self.param
        )


class InvalidRequest(SidecarError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class Unauthorized(SidecarError):
    status = 401
    type = "authentication_error"
    code = "invalid_token"


class Forbidden(SidecarError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class NotFound(SidecarError):
    status = 404
    type = "not_found_error"
    code = "not_found"


class Conflict(SidecarError):
    status = 409
    type = "conflict_error"
    code = "already_exists"


class RequestTimeout(SidecarError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class PayloadTooLarge(SidecarError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class TooManyRequests(SidecarError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limited"


class IdentityCreationLimited(TooManyRequests):
    """A key owner (or a client address without a listed key) made `[identity]
    max_new_per_minute` identities in the last minute."""

    code = "identity_creation_limited"


class BadGateway(SidecarError):
    status = 502
    type = "api_error"
    code = "upstream_error"


class GatewayTimeout(SidecarError):
    status = 504
    type = "api_error"
    code = "upstream_timeout"


class StoreUnavailable(SidecarError):
    """The store did not answer, or failed: raised by the storage modules only, which
    translate the driver's own errors (see sidecar.store.errors)."""

    status = 503
    type = "service_unavailable_error"
    code = "store_unavailable"
