"""The README and docs/ against the code: every TOML snippet passes `sidecar check-config`, every
shell snippet is valid shell whose `sidecar` commands the real parser accepts, every Python
snippet compiles, every relative link and anchor resolves, and the config page names every key."""

from __future__ import annotations

import argparse
import functools
import io
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

from sidecar import cli, settings
from sidecar.usage.pricing import ModelPrice

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELLS = {"sh", "bash", "shell", "console"}
CHECKED = {"toml", "python", *SHELLS}

_FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w+-]*)")
_MARKER = re.compile(r"^<!--\s*(.*?)\s*-->$")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, from 1
    lang: str
    text: str
    marker: str | None  # the HTML comment on the line before the fence

    def __str__(self) -> str:
        page = self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page.name
        return f"{page}:{self.line}"


def fenced(page: Path) -> tuple[list[Block], list[str]]:
    """The fenced blocks of a page, and its lines with every block blanked out."""
    lines = page.read_text(encoding="utf-8").splitlines()
    prose = list(lines)
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence, lang = opening.groups()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == fence), None)
        if end is None:
            raise ValueError(f"{page.name}:{i + 1}: a ``` fence that is never closed")
        before = lines[i - 1].strip() if i else ""
        marker = _MARKER.match(before)
        text = "\n".join(lines[i + 1 : end]) + "\n"
        found.append(Block(page, i + 1, lang.lower(), text, marker.group(1) if marker else None))
        prose[i : end + 1] = [""] * (end + 1 - i)
        i = end + 1
    return found, prose


def all_blocks(*langs: str) -> list[Block]:
    return [b for page in PAGES for b in fenced(page)[0] if b.lang in langs]


# -- TOML: whole configs and policy files through check-config, marked fragments parse ------


def check_config(config: Path) -> tuple[int, str]:
    """`sidecar check-config --config <config>`, in process: its exit code and its output."""
    args = parser().parse_args(["check-config", "--config", str(config)])
    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(out):
        try:
            code = args.run(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue()


def toml_problems(block: Block, workdir: Path) -> list[str]:
    try:
        raw = tomllib.loads(block.text)
    except tomllib.TOMLDecodeError as exc:
        return [f"{block}: not valid TOML: {exc}"]
    if block.marker == "fragment":
        return []
    if "policy" in raw:
        policy = workdir / "policy.toml"
        policy.write_text(block.text, encoding="utf-8")
        config = workdir / "policy-config.toml"
        config.write_text('[policies]\npaths = ["policy.toml"]\n', encoding="utf-8")
    else:
        # As if the file sat in a checkout, so "policies/*.toml" names the example policies.
        if not (workdir / "policies").exists():
            shutil.copytree(ROOT / "policies", workdir / "policies")
        config = workdir / "config.toml"
        config.write_text(block.text, encoding="utf-8")
    code, output = check_config(config)
    if code != 0:
        hint = "" if "policy" in raw else " (a fragment shown on purpose needs <!-- fragment -->)"
        return [f"{block}: check-config failed{hint}:\n{output}"]
    return []


@pytest.fixture(autouse=True)
def _no_sidecar_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("SIDECAR_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize("block", [pytest.param(b, id=str(b)) for b in all_blocks("toml")])
def test_toml_snippet_passes_check_config(block: Block, tmp_path: Path) -> None:
    assert toml_problems(block, tmp_path) == []


# -- shell: valid syntax, and every `sidecar` command accepted by the real parser ------------


@functools.cache
def parser() -> argparse.ArgumentParser:
    return cli.build_parser()


def _script(block: Block) -> str:
    if block.lang != "console":
        return block.text
    commands, continued = [], False
    for line in block.text.splitlines():
        if line.startswith("$ ") or continued:
            commands.append(line.removeprefix("$ "))
            continued = line.endswith("\\")
    return "\n".join(commands) + "\n"


def _uncomment(line: str) -> str:
    """The line without a trailing comment, as bash reads it: a `#` that starts a word."""
    quote, escaped = "", False
    for i, char in enumerate(line):
        if escaped:
            escaped = False
        elif char == "\\" and quote != "'":
            escaped = True
        elif quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1] in " \t;|&("):
            return line[:i]
    return line


def command_lines(script: str) -> list[str]:
    """Logical command lines: backslash continuations joined, quotes spanning lines kept whole."""
    logical: list[str] = []
    pending = ""
    for raw in script.splitlines():
        line = pending + raw
        if line.endswith("\\"):
            pending = line[:-1]
            continue
        try:
            shlex.split(_uncomment(line))
        except ValueError:
            pending = line + "\n"  # a quote still open: the next line belongs to it
            continue
        pending = ""
        if line.strip():
            logical.append(_uncomment(line))
    if pending:
        shlex.split(_uncomment(pending))  # raises: a quote left open at the end
    return logical


def simple_commands(line: str) -> list[list[str]]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars="|&;")
    lexer.whitespace_split = True
    lexer.commenters = ""
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token and set(token) <= set("|&;"):
            commands.append([])
        else:
            commands[-1].append(token)
    result = []
    for words in commands:
        while words and (words[0] in {"do", "then", "else", "!"} or re.match(r"\w+=", words[0])):
            words = words[1:]
        if words:
            result.append(words)
    return result


def sidecar_args(words: list[str]) -> list[str] | None:
    """The arguments of a `sidecar ...` or `python -m sidecar ...` command, else None."""
    program = Path(words[0]).name
    if program == "sidecar":
        return words[1:]
    if re.fullmatch(r"python[\d.]*", program) and words[1:3] == ["-m", "sidecar"]:
        return words[3:]
    return None


def shell_problems(block: Block) -> list[str]:
    script = _script(block)
    syntax = subprocess.run(
        ["bash", "-n"], input=script, capture_output=True, text=True, timeout=10, check=False
    )
    if syntax.returncode != 0:
        return [f"{block}: bash -n: {syntax.stderr.strip()}"]
    try:
        lines = command_lines(script)
    except ValueError as exc:
        return [f"{block}: {exc}"]
    problems = []
    for line in lines:
        for words in simple_commands(line):
            args = sidecar_args(words)
            if args is None:
                continue
            errors = io.StringIO()
            with redirect_stdout(io.StringIO()), redirect_stderr(errors):
                try:
                    parser().parse_args(args)
                except SystemExit as exc:
                    if exc.code:
                        problems.append(f"{block}: `{shlex.join(words)}`: {errors.getvalue()}")
    return problems


@pytest.mark.parametrize("block", [pytest.param(b, id=str(b)) for b in all_blocks(*SHELLS)])
def test_shell_snippet_parses_and_its_sidecar_commands_are_accepted(block: Block) -> None:
    assert shell_problems(block) == []


@pytest.mark.parametrize("block", [pytest.param(b, id=str(b)) for b in all_blocks("python")])
def test_python_snippet_compiles(block: Block) -> None:
    compile(block.text, str(block), "exec")


# -- links ---------------------------------------------------------------------------------

_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in fenced(page)[1]:
        heading = _HEADING.match(line)
        if heading is None:
            continue
        base = slug(heading.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def link_problems(page: Path) -> list[str]:
    problems = []
    for number, line in enumerate(fenced(page)[1], 1):
        line = re.sub(r"`[^`]*`", "code", line)
        for target in _LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue  # http:, https:, mailto:
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            where = f"{page.name}:{number}: {target}"
            if not file.exists():
                problems.append(f"{where}: no such file")
            elif anchor and (file.suffix != ".md" or anchor not in anchors(file)):
                problems.append(f"{where}: no such anchor")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_and_anchors_resolve(page: Path) -> None:
    assert link_problems(page) == []


# -- the pages themselves ------------------------------------------------------------------


def test_every_doc_page_opens_with_one_line_saying_what_it_covers() -> None:
    for page in PAGES[1:]:
        lines = page.read_text(encoding="utf-8").splitlines()
        assert lines[0].startswith("# "), page.name
        assert lines[1] == "" and lines[2].strip() and lines[3] == "", (
            f"{page.name}: the title, then one line saying what the page covers"
        )


def test_configuration_page_names_every_config_key() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    missing = [
        f"{section}.{field}"
        for section, struct in settings._SECTIONS.items()
        if section != "pricing"
        for field in struct.__struct_fields__
        if f"`{section}.{field}`" not in text
    ]
    for table, struct in (("[[api_keys]]", settings.ApiKeyOwner), ("[pricing.models", ModelPrice)):
        assert table in text
        missing += [f"{table} {f}" for f in struct.__struct_fields__ if f"`{f}`" not in text]
    assert missing == []


def test_readme_test_command_is_the_one_ci_runs() -> None:
    readme = fenced(ROOT / "README.md")[0]
    run, test = (b.text.strip() for b in readme[:2])
    assert "sidecar serve" in run
    assert test in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()


def test_every_fence_names_a_known_language() -> None:
    # The checks above run on what they find: a fence with no language, or one spelt otherwise
    # (```py, ```shell-session), would escape them unseen.
    used = {b.lang for page in PAGES for b in fenced(page)[0]}
    assert used - CHECKED <= {"text", "json", "yaml", "nginx"}
    assert {"toml", "python", "sh", "console"} <= used


# -- the checks catch what they are for ----------------------------------------------------


def _page(tmp_path: Path, text: str) -> Path:
    page = tmp_path / "page.md"
    page.write_text(text, encoding="utf-8")
    return page


def test_a_misspelt_key_or_an_unmarked_fragment_fails(tmp_path: Path) -> None:
    (tmp_path / "w").mkdir()
    page = _page(
        tmp_path,
        "```toml\n[server]\nprot = 1\n```\n\n"
        '```toml\n[[api_keys]]\nsha256 = "<the digest>"\nowner = "a"\n```\n\n'
        '<!-- fragment -->\n```toml\n[[api_keys]]\nsha256 = "<the digest>"\nowner = "a"\n```\n\n'
        '```toml\n[[policy]]\nname = "x"\nrequests = ["5/fortnight"]\n```\n',
    )
    misspelt, unmarked, marked, policy = (toml_problems(b, tmp_path / "w") for b in fenced(page)[0])
    assert "server.prot: unknown key" in misspelt[0]
    assert "api_keys[0].sha256" in unmarked[0] and "<!-- fragment -->" in unmarked[0]
    assert marked == []
    assert "'5/fortnight' is not a limit" in policy[0]


def test_a_bad_sidecar_command_or_broken_shell_fails(tmp_path: Path) -> None:
    page = _page(
        tmp_path,
        "```sh\nSIDECAR_PORT=1 .venv/bin/sidecar serve --bogus &\n```\n\n"
        "```sh\necho ok && sidecar identities top \\\n  --by speed\n```\n\n"
        "```console\n$ python -m sidecar check-config --config 'a b.toml'\nok # out\n```\n\n"
        "```sh\ncurl -d '{\"a\":\n  1}' x | sidecar identities get  # ok\n```\n\n"
        "```bash\nif true; then\n```\n",
    )
    bogus, speed, ok, quoted, broken = (shell_problems(b) for b in fenced(page)[0])
    assert "unrecognized arguments: --bogus" in bogus[0]
    assert "invalid choice: 'speed'" in speed[0]
    assert ok == []
    assert "the following arguments are required: id" in quoted[0]
    assert "bash -n" in broken[0]


def test_a_missing_file_or_anchor_fails(tmp_path: Path) -> None:
    page = _page(
        tmp_path,
        "# Top\n\n## A `code` heading (with parens)\n\n"
        "[ok](#a-code-heading-with-parens) [ok](page.md#top) [web](https://example.com/#x)\n"
        "[gone](nowhere.md) [bad](#nope) [`x`](page.md#top)\n"
        "```sh\n[not a link](nowhere.md)\n```\n",
    )
    assert link_problems(page) == [
        "page.md:6: nowhere.md: no such file",
        "page.md:6: #nope: no such anchor",
    ]
