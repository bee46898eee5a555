"""A metered request's span: its name and attributes, after OpenTelemetry's GenAI semantic
conventions (gen_ai.*) plus the sidecar's own (sidecar.*). Built once, when the request is
settled and its usage known."""

from __future__ import annotations

from ulid import ULID

from sidecar import money
from sidecar.identity.resolve import Resolved
from sidecar.observe.tracing import Attributes
from sidecar.usage.model import Kind, Usage

# A hook-mode span starts when /hooks/authorize made its request id (a ULID), if that was within
# this long before the report; else when the report came.
HOOK_SPAN_MAX_S = 3600

OPERATIONS = {
    Kind.CHAT: "chat",
    Kind.COMPLETIONS: "text_completion",
    Kind.RESPONSES: "chat",
    Kind.EMBEDDINGS: "embeddings",
    Kind.MESSAGES: "chat",
}


def provider(kind: Kind) -> str:
    """The API the request speaks (what a gateway upstream serves it with may differ)."""
    return "anthropic" if kind is Kind.MESSAGES else "openai"


def name(kind: Kind | None, model: str | None, method: str = "POST") -> str:
    """`{operation} {model}`, as the conventions name a GenAI span; an extra metered path,
    whose operation is unknown, gets its HTTP method."""
    if kind is None:
        return method
    operation = OPERATIONS[kind]
    return f"{operation} {model}" if model else operation


def attributes(
    resolved: Resolved,
    kind: Kind | None,
    model: str | None,
    usage: Usage | None,
    *,
    cost_nanos: int | None,
    policy: str | None,
    status: int | None,
    request_id: str | None = None,
) -> Attributes:
    """`model` is the requested one; `status` what the caller was answered (None: nothing);
    `request_id` the one the sidecar's log lines and usage report carry."""
    out: Attributes = {
        "enduser.id": resolved.external_id,
        "sidecar.identity.source": resolved.source.value,
    }
    if kind is not None:
        system = provider(kind)
        out["gen_ai.operation.name"] = OPERATIONS[kind]
        out["gen_ai.provider.name"] = system
        out["gen_ai.system"] = system  # the name before semantic conventions 1.37
    if model is not None:
        out["gen_ai.request.model"] = model
    if usage is not None:
        if usage.model:
            out["gen_ai.response.model"] = usage.model
        out["gen_ai.usage.input_tokens"] = usage.input_tokens
        out["gen_ai.usage.output_tokens"] = usage.output_tokens
    if cost_nanos is not None:
        out["sidecar.cost_usd"] = money.dollars(cost_nanos)  # for display: the counters are exact
    if policy is not None:
        out["sidecar.policy"] = policy
    if status is not None:
        out["http.response.status_code"] = status
    if request_id is not None:
        out["sidecar.request_id"] = request_id
    return out


def failure(status: int | None) -> str | None:
    """The `error.type` of an upstream answer: its status, when it is an error."""
    return str(status) if status is not None and status >= 400 else None


def authorized_ns(request_id: str, received_ns: int) -> int:
    """When /hooks/authorize made `request_id`, if it did (a ULID from the last
    HOOK_SPAN_MAX_S); else `received_ns`, when the report came."""
    try:
        made_ns = ULID.from_str(request_id).milliseconds * 1_000_000
    except ValueError:
        return received_ns
    if 0 <= received_ns - made_ns <= HOOK_SPAN_MAX_S * 1_000_000_000:
        return made_ns
    return received_ns
