from __future__ import annotations

import logging
import re
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from sidecar.errors import TYPES, ErrorBody, ErrorResponse, SidecarError

log = logging.getLogger("sidecar.api")

_UNKNOWN = re.compile(r"Object contains unknown field `(.+)`")
_MISSING = re.compile(r"Object missing required field `(.+)`")


def error_response(
    status: int,
    message: str,
    *,
    type: str | None = None,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response[ErrorResponse]:
    body = ErrorBody(
        message=message, type=type or TYPES.get(status, "api_error"), code=code, param=param
    )
    return Response(ErrorResponse(body), status_code=status, headers=headers)


def _validation(exc: ValidationException) -> Response[ErrorResponse]:
    extra = exc.extra if isinstance(exc.extra, list) and exc.extra else None
    if not extra or not isinstance(extra[0], dict):
        message = str(exc.detail).replace("JSON is malformed", "request body is not valid JSON")
        return error_response(400, message, code="invalid_request")
    first: dict[str, Any] = extra[0]
    message, key = str(first.get("message", "invalid value")), first.get("key")
    unknown = _UNKNOWN.fullmatch(message)
    if unknown:
        key, message = unknown.group(1), f"unknown field {unknown.group(1)!r}"
    elif missing := _MISSING.fullmatch(message):
        # A nested object's field is named by its path: "scope.target".
        field = missing.group(1) if key in (None, "data") else f"{key}.{missing.group(1)}"
        key, message = field, f"{field} is required"
    elif key == "data":
        key, message = None, f"request body: {message[0].lower()}{message[1:]}"
    elif key:
        message = f"{key}: {message[0].lower()}{message[1:]}"
    return error_response(400, message, code="invalid_request", param=key)


def handle_exception(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorResponse]:
    if isinstance(exc, SidecarError):
        return error_response(
            exc.status,
            exc.message,
            type=exc.type,
            code=exc.code,
            param=exc.param,
            headers=exc.headers or None,
        )
    if isinstance(exc, ValidationException):
        return _validation(exc)
    if isinstance(exc, HTTPException):
        status = exc.status_code
        message = str(exc.detail)
        if status == 404:
            message = f"no route for {request.method} {request.url.path}"
        elif status == 405:
            message = f"method {request.method} not allowed on {request.url.path}"
        return error_response(status, message, headers=exc.headers)
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal error", type="api_error", code="internal_error")
