"""What every benchmark's command line shares: argument types, the output flags, and a `main`
that stops everything on Ctrl-C or SIGTERM and then writes the result."""

from __future__ import annotations

import argparse
import contextlib
import shlex
import signal
import sys
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.lib.meta import finish, heading, metadata
from bench.lib.report import emit, log


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def between(
    low: float, high: float, unit: str = "", name: str = "number"
) -> Callable[[str], float]:
    """An argument type: a number from `low` to `high` (in `unit`, for the message); `name`
    is what argparse calls a value that is no number."""

    def check(text: str) -> float:
        value = float(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"must be between {low:g} and {high:g}" + (f" {unit}" if unit else "")
            )
        return value

    check.__name__ = name
    return check


def interval(text: str) -> float:
    value = float(text)
    if not 0.05 <= value <= 60:
        raise argparse.ArgumentTypeError("must be between 0.05 and 60 seconds")
    return value


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """The module's docstring as written; a flag's default after its help, when it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        unset = default is None or default is False or default is argparse.SUPPRESS
        if unset or default == [] or "%(" in text:
            return text
        return f"{text} (default: %(default)s)"


def parser(module: str, doc: str | None) -> argparse.ArgumentParser:
    """A parser with the output flags every benchmark takes."""
    p = argparse.ArgumentParser(
        prog=f"python -m {module}", description=doc, formatter_class=_Formatter
    )
    p.add_argument(
        "--json",
        default=None,
        help="write the JSON here instead of stdout and bench/out/NAME-DATE.json",
    )
    p.add_argument("--markdown", default=None, help="write the Markdown report here")
    return p


def wrk_arguments(
    p: argparse.ArgumentParser, *, repeats: int, duration: int, connections: bool = True
) -> None:
    """--repeats, --duration (seconds per wrk run) and, unless left out, --connections."""
    p.add_argument("--repeats", type=positive, default=repeats, help="runs")
    p.add_argument("--duration", type=positive, default=duration, help="seconds per wrk run")
    if connections:
        p.add_argument("--connections", type=positive, default=64, help="wrk connections")


def command_line(module: str, argv: Sequence[str]) -> str:
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(Path.cwd())
    return shlex.join([str(python), "-m", module, *argv])


@dataclass
class Outcome:
    result: dict[str, Any]
    summary: str  # the table printed at the end
    markdown: str | None = None  # the --markdown report, when longer than the summary


def _terminate(signum: int, frame: types.FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(
    module: str,
    title: str,
    args: argparse.Namespace,
    argv: Sequence[str],
    measure: Callable[[], Outcome],
) -> int:
    """Measure, then emit the result with its `meta` (date, commit, machine, the command and its
    options) and the summary under a heading. SIGTERM unwinds like Ctrl-C, so every `with`
    block stops what it started."""
    options = {k: v for k, v in vars(args).items() if k not in ("json", "markdown")}
    meta = metadata(command_line(module, argv), options)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        outcome = measure()
    except KeyboardInterrupt:
        log("interrupted; everything started was stopped")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    if "meta" not in outcome.result:
        finish(meta)
        outcome.result = {"meta": meta, **outcome.result}
    summary = "\n".join(heading(title, outcome.result["meta"])) + "\n" + outcome.summary
    emit(
        module.rpartition(".")[2].removesuffix("_bench"),
        outcome.result,
        summary,
        json_path=args.json,
        markdown_path=args.markdown,
        markdown=outcome.markdown,
    )
    return 0
