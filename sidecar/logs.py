"""Log lines: JSON objects (one a line) or text, tagged with the request and identity in hand.

The proxy and the hooks `bind` the request's identity (and request id, when they made one)
once per request, in a contextvar: nothing is formatted unless a line is written, and a line
written anywhere while that request is handled (a task it started included) carries them."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TextIO

import msgspec

from sidecar import ids

FORMATS = ("json", "text")
LEVELS = ("debug", "info", "warning", "error")

_encode = msgspec.json.Encoder(enc_hook=str).encode
# A credential in a line, however it got there: "Bearer <token>" and "x-api-key: <key>" style.
_CREDENTIAL = re.compile(
    r"(?i)(\bbearer\s+|\b(?:x-api-key|x-sidecar-token|authorization|api[_-]?key|token)"
    r"[\"']?\s*[:=]\s*[\"']?(?:(?:bearer|basic)\s+)?)[^\s\"',;]+"
)
_REDACTED = "[redacted]"


class RequestContext:
    __slots__ = ("_request_id", "identity")

    def __init__(self, identity: str | None = None, request_id: str | None = None) -> None:
        self.identity = identity
        self._request_id = request_id

    @property
    def request_id(self) -> str:
        # Made when first needed: most requests write no line at all.
        if self._request_id is None:
            self._request_id = ids.ulid()
        return self._request_id

    @property
    def made(self) -> str | None:
        """The request id, if one was made."""
        return self._request_id


_current: ContextVar[RequestContext | None] = ContextVar("sidecar_request", default=None)


def begin() -> RequestContext:
    """A fresh context for the request being handled (the access log starts one)."""
    context = RequestContext()
    _current.set(context)
    return context


def bind(identity: str, request_id: str | None = None) -> RequestContext:
    """The identity (external id) of the request being handled, and its id when known; the
    request's context (its `request_id`, made when first read)."""
    context = _current.get()
    if context is None:
        context = RequestContext(identity, request_id)
        _current.set(context)
        return context
    context.identity = identity
    if request_id is not None:
        context._request_id = request_id
    return context


def clear() -> None:
    """For a task that outlives the request that started it and works for many."""
    _current.set(None)


def current() -> RequestContext | None:
    return _current.get()


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        context = _current.get()
        if context is not None:
            record.request_id = context.request_id
            record.identity = context.identity
        return True


class _Redacting(logging.Formatter):
    def __init__(self, secrets: list[str], fmt: str | None = None) -> None:
        super().__init__(fmt)
        self.secrets = secrets  # shared with configure(): tokens learnt later are added to it

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, _REDACTED)
        return _CREDENTIAL.sub(lambda m: m.group(1) + _REDACTED, text)


class JsonFormatter(_Redacting):
    """{"time", "level", "logger", "message"}, then "request_id" and "identity" when known,
    the fields a caller passed as `extra={"fields": {...}}`, and "exception" when there is one."""

    def __init__(self, secrets: list[str] | None = None) -> None:
        super().__init__(secrets if secrets is not None else [])

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        line: dict[str, Any] = {
            "time": when.replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            line["request_id"] = request_id
        identity = getattr(record, "identity", None)
        if identity is not None:
            line["identity"] = identity
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                line.setdefault(key, value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return self.redact(_encode(line).decode())


class TextFormatter(_Redacting):
    def __init__(self, secrets: list[str] | None = None) -> None:
        super().__init__(
            secrets if secrets is not None else [], "%(asctime)s %(levelname)s %(name)s %(message)s"
        )

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        tags = []
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            tags.append(f"request_id={request_id}")
        identity = getattr(record, "identity", None)
        if identity is not None:
            tags.append(f"identity={identity!r}")
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            tags += [f"{k}={v}" for k, v in fields.items()]
        if tags:
            head, newline, rest = text.partition("\n")  # a traceback stays below the line
            text = f"{head} [{' '.join(tags)}]{newline}{rest}"
        return self.redact(text)


_secrets: list[str] = []


def redact(*secrets: str | None) -> None:
    """Never write these (the admin and hook tokens) in a line, whatever logs them."""
    for secret in secrets:
        if secret and secret not in _secrets:
            _secrets.append(secret)


def configure(
    format: str = "json",
    level: str = "info",
    *,
    stream: TextIO | None = None,
    secrets: Iterable[str | None] = (),
) -> logging.Handler:
    """One handler on the root logger, replacing any; every logger (uvicorn's, the store
    client's) propagates to it."""
    redact(*secrets)
    handler = logging.StreamHandler(stream or sys.stderr)
    formatter = JsonFormatter(_secrets) if format == "json" else TextFormatter(_secrets)
    handler.setFormatter(formatter)
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler
