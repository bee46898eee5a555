"""A LiteLLM proxy callback: the sidecar resolves and limits each request, then counts its usage.

    litellm_settings:
      callbacks: sidecar.integrations.litellm.handler

Configured from SIDECAR_URL, SIDECAR_HOOK_TOKEN, SIDECAR_TIMEOUT_MS (200) and SIDECAR_FAIL_OPEN
(true), read on first use. The module imports nothing else from this package, so it also works
copied next to config.yaml. docs/integrations.md describes the behaviour.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import random
import time
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urlsplit

import httpx
from fastapi import HTTPException
from litellm.integrations.custom_logger import CustomLogger

if TYPE_CHECKING:
    from litellm.caching.dual_cache import DualCache
    from litellm.proxy._types import UserAPIKeyAuth

__all__ = ["ConfigError", "Settings", "SidecarCallback", "SidecarRefusal", "handler"]

log = logging.getLogger("sidecar.integrations.litellm")

# Our entry in LiteLLM's request metadata: request_id, identity, source, path, the sidecar's
# x-ratelimit-* headers for the client's response, and the client's trace context.
METADATA_KEY = "sidecar"
# The client's W3C trace context, sent with the usage report: the sidecar's span of the request
# (with its [telemetry] on) continues the client's trace.
_TRACE_CONTEXT = ("traceparent", "tracestate")

# Top-level request keys LiteLLM's proxy adds for itself (besides `litellm_*` and `_*`); they are
# not the client's, and `api_key` may hold a provider credential.
_LITELLM_FIELDS = frozenset(
    {
        "proxy_server_request",
        "secret_fields",
        "metadata",
        "standard_logging_object",
        "api_key",
        "api_base",
        "headers",
        "provider_specific_header",
        "user_api_key_dict",
    }
)
# Client headers that describe the hop to LiteLLM, not the request. A client's own
# x-sidecar-token or x-sidecar-deadline must never replace ours.
_NOT_FORWARDED = frozenset(
    {
        "host",
        "content-length",
        "content-type",
        "content-encoding",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "te",
        "trailer",
        "upgrade",
        "expect",
        "accept-encoding",
        "cookie",
        "x-sidecar-token",
        "x-sidecar-deadline",
    }
)
# The inference calls, metered as inline mode meters them: by path, else by LiteLLM's call type.
_METERED_PATHS = ("/completions", "/responses", "/embeddings", "/messages")
# Where a request names its output cap (any API's).
_OUTPUT_CAPS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
_METERED_CALLS = frozenset(
    {
        "completion",
        "acompletion",
        "text_completion",
        "atext_completion",
        "embeddings",
        "aembedding",
        "responses",
        "aresponses",
        "anthropic_messages",
    }
)
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 429: "rate_limit_error"}
_RETRIED_4XX = frozenset({408, 425, 429})
_WARN_EVERY_S = 10.0


class ConfigError(ValueError):
    """The callback's environment is incomplete or malformed."""


# A NamedTuple, not a dataclass: LiteLLM loads a callback file that sits next to config.yaml
# without registering it in sys.modules, and dataclasses looks the module up there to read string
# annotations (this module's, under `from __future__ import annotations`).
class Settings(NamedTuple):
    url: str
    token: str
    timeout_s: float = 0.2  # the whole /hooks/authorize call, on the request's critical path
    fail_open: bool = True
    report_attempts: int = 4
    report_backoff_s: float = 0.25  # doubled after each failed attempt, with jitter
    report_timeout_s: float = 5.0  # reports run in the background: no need to hurry them

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        url = env.get("SIDECAR_URL", "").strip().rstrip("/")
        token = env.get("SIDECAR_HOOK_TOKEN", "").strip()
        given = {"SIDECAR_URL": url, "SIDECAR_HOOK_TOKEN": token}
        missing = [name for name, value in given.items() if not value]
        if missing:
            raise ConfigError(f"{' and '.join(missing)} must be set for the sidecar callback")
        if urlsplit(url).scheme not in ("http", "https"):
            raise ConfigError(f"SIDECAR_URL must be an http:// or https:// URL, not {url!r}")
        return cls(
            url=url,
            token=token,
            timeout_s=_milliseconds(env.get("SIDECAR_TIMEOUT_MS"), 200) / 1000,
            fail_open=_flag(env.get("SIDECAR_FAIL_OPEN"), default=True),
        )


def _milliseconds(raw: str | None, default: float) -> float:
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(
            f"SIDECAR_TIMEOUT_MS must be a positive number of milliseconds, not {raw!r}"
        )
    return value


def _flag(raw: str | None, *, default: bool) -> bool:
    if raw is None or not raw.strip():
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"SIDECAR_FAIL_OPEN must be true or false, not {raw!r}")


class SidecarRefusal(HTTPException):
    """The sidecar refused a request. LiteLLM's proxy answers its client with this status, the
    sidecar's message, type and param, and the headers given (`retry-after`, `x-ratelimit-*`)."""

    def __init__(
        self, status_code: int, error: Mapping[str, Any], headers: Mapping[str, str]
    ) -> None:
        super().__init__(
            status_code=status_code, detail={"error": dict(error)}, headers=dict(headers)
        )
        # LiteLLM copies these attributes into the error body its client receives.
        self.message = str(error.get("message") or "Refused by the identity sidecar")
        self.type = str(error.get("type") or _TYPES.get(status_code, "invalid_request_error"))
        param = error.get("param")
        self.param = param if isinstance(param, str) else None


class SidecarCallback(CustomLogger):
    def __init__(self, settings: Settings | None = None) -> None:
        super().__init__()
        self._settings = settings
        self._client: httpx.AsyncClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._reports: set[asyncio.Task[None]] = set()
        self._quiet_until = 0.0
        self._suppressed = 0

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = Settings.from_env()
        return self._settings

    def _http(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._client.is_closed or self._client_loop is not loop:
            # Connections belong to the loop that opened them; LiteLLM runs one loop per worker.
            self._client = httpx.AsyncClient(
                base_url=self.settings.url,
                limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
            )
            self._client_loop = loop
        return self._client

    async def flush(self) -> None:
        """Wait for the usage reports in flight, retries included."""
        while self._reports:
            await asyncio.gather(*self._reports, return_exceptions=True)

    async def aclose(self) -> None:
        await self.flush()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # -- before the request: who is it for, may it go -----------------------------------------

    async def async_pre_call_hook(
        self,
        user_api_key_dict: UserAPIKeyAuth,
        cache: DualCache,
        data: dict[str, Any],
        call_type: str,
    ) -> dict[str, Any]:
        if not metered(data, call_type):
            # Not an inference call (a stored response read back, a file, a batch...): neither
            # limited nor counted, as in inline mode. The identity still stays here.
            strip_identity(data)
            return data
        settings = self.settings
        body = _encode(client_body(data))
        headers = {
            **client_headers(data),
            "content-type": "application/json",
            "x-sidecar-token": settings.token,
        }
        strip_identity(data)  # whatever the answer, the identity object never goes upstream
        # Past the end of this wait the sidecar drops the decision: a request let through (or
        # refused) without its answer is not charged. Unix time, compared with the sidecar's clock.
        deadline_ms = math.ceil((time.time() + settings.timeout_s) * 1000)
        headers["x-sidecar-deadline"] = str(deadline_ms)
        try:
            answer = await asyncio.wait_for(
                self._http().post(
                    "/hooks/authorize", content=body, headers=headers, timeout=settings.timeout_s
                ),
                settings.timeout_s,
            )
        except (httpx.HTTPError, TimeoutError) as exc:
            return self._unavailable(data, f"{type(exc).__name__}: {exc}".rstrip(": "))
        if answer.status_code == 200:
            grant = _grant(answer)
            if grant is None:
                return self._unavailable(data, "malformed /hooks/authorize answer")
            grant["path"] = request_path(data)
            grant["headers"] = _passed_back(answer.headers)
            trace = {k: headers[k] for k in _TRACE_CONTEXT if k in headers}
            if trace:
                grant["trace"] = trace
            request_metadata(data)[METADATA_KEY] = grant
            cap_output(data, call_type, answer)
            return data
        error = _error(answer)
        status = answer.status_code
        if _is_refusal(status, error.get("code")):
            raise SidecarRefusal(status, error, _passed_back(answer.headers))
        # Anything else (a wrong token, a wrong URL, a sidecar failure) is ours, not the client's.
        return self._unavailable(data, f"HTTP {status}: {error.get('message', '')}")

    def _unavailable(self, data: dict[str, Any], reason: str) -> dict[str, Any]:
        if not self.settings.fail_open:
            log.error("sidecar unavailable (%s): request refused (SIDECAR_FAIL_OPEN=false)", reason)
            error = {
                "message": "The identity service is unavailable; try again shortly.",
                "type": "service_unavailable_error",
                "code": "sidecar_unavailable",
                "param": None,
            }
            raise SidecarRefusal(503, error, {})
        now = time.monotonic()
        if now < self._quiet_until:  # one line per outage, not one per request
            self._suppressed += 1
            return data
        more = f"; {self._suppressed} more since the last warning" if self._suppressed else ""
        log.warning("sidecar unavailable (%s): request let through unattributed%s", reason, more)
        self._quiet_until = now + _WARN_EVERY_S
        self._suppressed = 0
        return data

    # -- after the request: what did it use ---------------------------------------------------

    async def async_log_success_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        try:
            entry = find_entry(kwargs.get("litellm_params"), kwargs)
            if entry is None:  # not authorized by us: the sidecar was down, or not a client call
                return
            report = _report(entry, 200, _model(kwargs.get("model"), response_obj))
            report["usage"] = usage_of(response_obj)
            report["cost_usd"] = cost_of(kwargs.get("response_cost"))
            self._send_later(report, entry.get("trace"))
        except Exception:
            log.exception("usage report not sent")

    # LiteLLM also calls async_log_failure_event, but once per attempt when its router retries:
    # reporting the first failed attempt would hide the retry's success, since the sidecar counts
    # the first report of a request_id. The proxy calls this hook once, with the final error.
    async def async_post_call_failure_hook(
        self,
        request_data: dict[str, Any],
        original_exception: Exception,
        user_api_key_dict: UserAPIKeyAuth,
        traceback_str: str | None = None,
    ) -> None:
        try:
            entry = find_entry(request_data)
            if entry is None:  # refused before the sidecar granted it (by the sidecar, say)
                return None
            model = _model(request_data.get("model"), None)
            self._send_later(
                _report(entry, status_of(original_exception), model), entry.get("trace")
            )
        except Exception:
            log.exception("usage report not sent")
        return None

    async def async_post_call_response_headers_hook(
        self,
        data: dict[str, Any],
        user_api_key_dict: UserAPIKeyAuth,
        response: object,
        request_headers: dict[str, str] | None = None,
        litellm_call_info: dict[str, object] | None = None,
    ) -> dict[str, str] | None:
        # The sidecar's x-ratelimit-* headers, on the answers LiteLLM gives (its newer versions).
        entry = find_entry(data)
        headers = entry.get("headers") if entry is not None else None
        return dict(headers) if isinstance(headers, Mapping) and headers else None

    def _send_later(self, report: dict[str, Any], trace: Any = None) -> None:
        task = asyncio.get_running_loop().create_task(self._send(report, trace))
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def _send(self, report: dict[str, Any], trace: Any = None) -> None:
        settings = self.settings
        body = _encode({k: v for k, v in report.items() if v is not None})
        headers = {"content-type": "application/json", "x-sidecar-token": settings.token}
        if isinstance(trace, Mapping):
            headers |= {
                k: v for k, v in trace.items() if k in _TRACE_CONTEXT and isinstance(v, str)
            }
        delay = settings.report_backoff_s
        problem = "not attempted"
        for attempt in range(1, settings.report_attempts + 1):
            try:
                answer = await self._http().post(
                    "/hooks/usage", content=body, headers=headers, timeout=settings.report_timeout_s
                )
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}".rstrip(": ")
            else:
                if answer.status_code == 202:
                    return
                problem = f"HTTP {answer.status_code}: {answer.text[:200]}"
                if 400 <= answer.status_code < 500 and answer.status_code not in _RETRIED_4XX:
                    break  # the same report would be refused again
            if attempt < settings.report_attempts:
                # Safe to resend: the sidecar counts a request_id once.
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay *= 2
        log.warning("usage of request %s not recorded: %s", report.get("request_id"), problem)


# -- request and response plumbing (pure) -----------------------------------------------------


def metered(data: Mapping[str, Any], call_type: str) -> bool:
    path = request_path(data)
    if path is not None:
        return path.rstrip("/").endswith(_METERED_PATHS)
    return call_type in _METERED_CALLS


def cap_output(data: dict[str, Any], call_type: str, answer: httpx.Response) -> None:
    """Give a request the output cap the sidecar reserved it for (`output_cap`: it named none, and
    a token or cost limit reserved for it), as the sidecar does inline: otherwise its answer could
    run past what was reserved, and concurrent requests past the limit. LiteLLM maps `max_tokens`
    to each provider's own field; the Responses API's is `max_output_tokens`."""
    try:
        cap = answer.json().get("output_cap")
    except (ValueError, AttributeError):
        return
    if type(cap) is not int or cap < 1 or any(data.get(name) is not None for name in _OUTPUT_CAPS):
        return
    path = (request_path(data) or "").rstrip("/")
    if path.endswith("/embeddings") or "embedding" in call_type:
        return  # no output to cap (hook mode does not know the path, so the sidecar offers one)
    responses = path.endswith("/responses") if path else "responses" in call_type
    data["max_output_tokens" if responses else "max_tokens"] = cap


def client_body(data: Mapping[str, Any]) -> dict[str, Any]:
    """The client's request body: `data` without the keys LiteLLM's proxy added."""
    return {
        key: value
        for key, value in data.items()
        if key not in _LITELLM_FIELDS and not key.startswith(("litellm_", "_"))
    }


def client_headers(data: Mapping[str, Any]) -> dict[str, str]:
    """The client's headers, lower-cased, as LiteLLM's proxy recorded them."""
    found: dict[str, str] = {}
    request = data.get("proxy_server_request")
    cleaned = request.get("headers") if isinstance(request, Mapping) else None
    # LiteLLM removes the client's API key from the copy above (and masks other credentials);
    # newer versions keep the raw headers, key included, for internal use.
    secret = data.get("secret_fields")
    raw = secret.get("raw_headers") if isinstance(secret, Mapping) else None
    for source in (cleaned, raw):
        if isinstance(source, Mapping):
            for name, value in source.items():
                if isinstance(name, str) and isinstance(value, str):
                    found[name.lower()] = value
    return {name: value for name, value in found.items() if name not in _NOT_FORWARDED}


def strip_identity(body: MutableMapping[str, Any]) -> None:
    """Remove every identity object the sidecar reads (`identity`, `orq.identity`, `contact`):
    an OpenAI or Anthropic upstream rejects unknown fields."""
    body.pop("identity", None)
    body.pop("contact", None)
    orq = body.get("orq")
    if isinstance(orq, Mapping) and "identity" in orq:
        rest = {key: value for key, value in orq.items() if key != "identity"}  # not in place
        if rest:
            body["orq"] = rest
        else:
            del body["orq"]


def request_metadata(data: dict[str, Any]) -> MutableMapping[str, Any]:
    # /v1/messages, /v1/responses and the batch routes keep LiteLLM's metadata in
    # `litellm_metadata`, where `metadata` is the client's own field; other routes use `metadata`.
    for key in ("litellm_metadata", "metadata"):
        metadata = data.get(key)
        if isinstance(metadata, MutableMapping):
            return metadata
    fresh: dict[str, Any] = {}
    data["metadata"] = fresh
    return fresh


def find_entry(*containers: Any) -> dict[str, Any] | None:
    for container in containers:
        if not isinstance(container, Mapping):
            continue
        for key in ("litellm_metadata", "metadata"):
            metadata = container.get(key)
            entry = metadata.get(METADATA_KEY) if isinstance(metadata, Mapping) else None
            if isinstance(entry, Mapping) and isinstance(entry.get("request_id"), str):
                return dict(entry)
    return None


def request_path(data: Mapping[str, Any]) -> str | None:
    request = data.get("proxy_server_request")
    url = request.get("url") if isinstance(request, Mapping) else None
    if not isinstance(url, str):
        return None
    return urlsplit(url).path or None


def usage_of(response: Any) -> dict[str, Any] | None:
    """The response's usage object as a plain dict (OpenAI- or Anthropic-shaped, as the route
    answers); for a stream LiteLLM hands over the assembled response."""
    usage = (
        response.get("usage") if isinstance(response, Mapping) else getattr(response, "usage", None)
    )
    if isinstance(usage, Mapping):
        return dict(usage)
    dump = getattr(usage, "model_dump", None)
    if callable(dump):
        dumped = dump(exclude_none=True)
        if isinstance(dumped, dict):
            return dumped
    return None


def cost_of(value: Any) -> float | None:
    """LiteLLM's own cost figure, when it has a usable one."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and value >= 0 else None


def status_of(exc: BaseException) -> int:
    for name in ("status_code", "code"):
        value = getattr(exc, name, None)
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and 400 <= value <= 599:
            return value
    return 500


def _report(entry: Mapping[str, Any], status: int, model: str | None) -> dict[str, Any]:
    report = {key: entry.get(key) for key in ("request_id", "identity", "source", "path")}
    report.update(status=status, model=model)
    return report


def _is_refusal(status: int, code: Any) -> bool:
    """Whether the sidecar's answer is about the request (the client's to see), not a failure.
    A 503 `rate_limiter_unavailable` is the sidecar applying its own `on_error = "deny"`."""
    return (
        status in (400, 429)
        or (status == 401 and code == "identity_required")
        or (status == 503 and code == "rate_limiter_unavailable")
    )


def _model(model: Any, response: Any) -> str | None:
    if isinstance(model, str) and model:
        return model
    answered = getattr(response, "model", None)
    return answered if isinstance(answered, str) and answered else None


def _grant(answer: httpx.Response) -> dict[str, Any] | None:
    try:
        doc = answer.json()
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    request_id, identity = doc.get("request_id"), doc.get("identity")
    if not isinstance(request_id, str) or not isinstance(identity, dict):
        return None
    external_id, source = identity.get("external_id"), identity.get("source")
    if not isinstance(external_id, str):
        return None
    grant: dict[str, Any] = {"request_id": request_id, "identity": external_id}
    if isinstance(source, str):
        grant["source"] = source
    return grant


def _error(answer: httpx.Response) -> dict[str, Any]:
    try:
        doc = answer.json()
    except ValueError:
        doc = None
    error = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(error, dict):
        return error
    return {"message": answer.text[:500] or f"HTTP {answer.status_code}", "param": None}


def _passed_back(headers: httpx.Headers) -> dict[str, str]:
    return {
        name: value
        for name, value in headers.items()
        if name == "retry-after" or name.startswith("x-ratelimit-")
    }


def _encode(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str).encode()


handler = SidecarCallback()
