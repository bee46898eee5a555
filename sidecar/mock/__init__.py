"""A fake OpenAI- and Anthropic-compatible upstream for tests, the quickstart and benchmarks."""

from __future__ import annotations

from sidecar.mock.cli import add_arguments, run
from sidecar.mock.model import MockOptions, RecordedRequest
from sidecar.mock.server import MockServer, start_mock

__all__ = ["MockOptions", "MockServer", "RecordedRequest", "add_arguments", "run", "start_mock"]
