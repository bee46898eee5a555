from __future__ import annotations

import pytest
from ulid import ULID

from sidecar.identity.resolve import Resolved, Source
from sidecar.metering import spans
from sidecar.usage.model import Kind, Usage


@pytest.mark.parametrize(
    ("kind", "model", "name"),
    [
        (Kind.CHAT, "gpt-4o", "chat gpt-4o"),
        (Kind.RESPONSES, "gpt-4o", "chat gpt-4o"),
        (Kind.MESSAGES, "claude-sonnet-4", "chat claude-sonnet-4"),
        (Kind.COMPLETIONS, "gpt-3.5-turbo-instruct", "text_completion gpt-3.5-turbo-instruct"),
        (Kind.EMBEDDINGS, None, "embeddings"),
        (None, "gpt-4o", "POST"),  # an extra metered path: its operation is unknown
    ],
)
def test_span_name_is_operation_and_model(kind: Kind | None, model: str | None, name: str) -> None:
    assert spans.name(kind, model) == name


def test_attributes_of_an_answered_anthropic_request() -> None:
    usage = Usage(input_tokens=1200, cached_input_tokens=200, output_tokens=300, model="claude-x-1")
    attributes = spans.attributes(
        Resolved("user_1", Source.API_KEY),
        Kind.MESSAGES,
        "claude-x",
        usage,
        cost_nanos=1_234_567,
        policy="pro",
        status=200,
        request_id="01JDQ0000000000000000000AA",
    )
    assert attributes == {
        "enduser.id": "user_1",
        "sidecar.identity.source": "api_key",
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "anthropic",
        "gen_ai.system": "anthropic",
        "gen_ai.request.model": "claude-x",
        "gen_ai.response.model": "claude-x-1",
        "gen_ai.usage.input_tokens": 1200,  # cached ones included, as the conventions count
        "gen_ai.usage.output_tokens": 300,
        "sidecar.cost_usd": 0.001234567,
        "sidecar.policy": "pro",
        "http.response.status_code": 200,
        "sidecar.request_id": "01JDQ0000000000000000000AA",
    }


def test_what_is_not_known_is_left_out() -> None:
    attributes = spans.attributes(
        Resolved("anonymous", Source.ANONYMOUS),
        None,
        None,
        None,
        cost_nanos=None,
        policy=None,
        status=None,
    )
    assert attributes == {"enduser.id": "anonymous", "sidecar.identity.source": "anonymous"}


def test_openai_kinds_name_their_operation() -> None:
    for kind, operation in [
        (Kind.CHAT, "chat"),
        (Kind.RESPONSES, "chat"),
        (Kind.COMPLETIONS, "text_completion"),
        (Kind.EMBEDDINGS, "embeddings"),
    ]:
        attributes = spans.attributes(
            Resolved("u", Source.HEADER), kind, "m", Usage(), cost_nanos=0, policy=None, status=200
        )
        assert attributes["gen_ai.operation.name"] == operation
        assert attributes["gen_ai.provider.name"] == "openai"
        assert attributes["sidecar.cost_usd"] == 0.0
        assert "gen_ai.response.model" not in attributes  # the response named none


def test_a_hook_span_starts_when_authorize_made_its_request_id() -> None:
    now_ns = 1_800_000_000_000 * 1_000_000  # a fixed instant, in ns
    made = str(ULID.from_timestamp((now_ns - 2_500_000_000) / 1e9))  # 2.5 s before
    assert spans.authorized_ns(made, now_ns) == now_ns - 2_500_000_000
    later = str(ULID.from_timestamp((now_ns + 1_000_000_000) / 1e9))  # a clock ahead of ours
    stale = str(ULID.from_timestamp((now_ns - 2 * 3600 * 1_000_000_000) / 1e9))  # 2 h old
    for request_id in (later, stale, "proxy-own-id", ""):
        assert spans.authorized_ns(request_id, now_ns) == now_ns


def test_an_upstream_error_is_its_status() -> None:
    assert [spans.failure(s) for s in (None, 200, 399, 400, 503)] == [
        None,
        None,
        None,
        "400",
        "503",
    ]
