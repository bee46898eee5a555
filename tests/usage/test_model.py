from __future__ import annotations

import pytest

from sidecar.usage.model import Kind, kind_for_path


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/v1/chat/completions", Kind.CHAT),
        ("/chat/completions", Kind.CHAT),
        ("/v1/chat/completions/", Kind.CHAT),
        ("/openai/deployments/gpt-4o/chat/completions", Kind.CHAT),
        ("/v1/completions", Kind.COMPLETIONS),
        ("/completions", Kind.COMPLETIONS),
        ("/v1/responses", Kind.RESPONSES),
        ("/v1/embeddings", Kind.EMBEDDINGS),
        ("/v1/messages", Kind.MESSAGES),
        ("/anthropic/v1/messages/", Kind.MESSAGES),
        ("/v1/messages/count_tokens", None),
        ("/v1/responses/resp_123", None),
        ("/v1/models", None),
        ("/v1/xcompletions", None),
        ("/", None),
        ("", None),
    ],
)
def test_kind_for_path(path: str, kind: Kind | None) -> None:
    assert kind_for_path(path) is kind
