"""`sidecar mock-upstream`: the fake OpenAI/Anthropic upstream, for tests and benchmarks."""

from __future__ import annotations

import argparse
from typing import Any


def mock_upstream(args: argparse.Namespace) -> int:
    from sidecar import mock

    return mock.run(args)


def add_commands(commands: Any) -> None:
    from sidecar import mock

    p = commands.add_parser("mock-upstream", help="a fake OpenAI/Anthropic upstream")
    mock.add_arguments(p)
    p.set_defaults(run=mock_upstream)
