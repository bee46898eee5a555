from __future__ import annotations


class SidecarError(Exception):
    """A failure with an HTTP meaning; mapped to the one JSON error shape at the edge."""

    status = 500
    type = "api_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequest(SidecarError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class Unauthorized(SidecarError):
    status = 401
    type = "authentication_error"
    code = "invalid_token"


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


class StoreUnavailable(SidecarError):
    status = 503
    type = "service_unavailable_error"
    code = "store_unavailable"
