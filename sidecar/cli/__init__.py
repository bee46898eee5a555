"""The `sidecar` command. Each command group is a module with an `add_commands(commands)` that
adds its subcommands; `build_parser` calls each one."""

from __future__ import annotations

import argparse
import logging

from sidecar.cli import budgets, config, identities, mock_upstream, serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sidecar", description="LLM identity sidecar")
    commands = parser.add_subparsers(dest="command", required=True)
    serve.add_commands(commands)
    config.add_commands(commands)
    mock_upstream.add_commands(commands)
    identities.add_commands(commands)
    budgets.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = build_parser().parse_args(argv)
    result: int = args.run(args)
    return result


__all__ = ["build_parser", "main"]
