"""The export's answer as JSON or CSV, streamed a page of rows at a time."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from sidecar.api.usage import rows
from sidecar.api.usage.groups import Export

_encode = msgspec.json.Encoder().encode

# What a spreadsheet may read as the start of a formula (OWASP, CSV injection). A text cell
# starting with one of them gets a `'` in front, which spreadsheets read as "text" and do not
# show. Numeric columns stay as they are: they hold digits (a cost is never negative). Model
# names and metadata values come from clients as much as ids and names do.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_TEXT_COLUMNS = frozenset({"_id", "external_id", "display_name", "tag", "model", "value"})


def spreadsheet_text(value: str) -> str:
    return "'" + value if value.startswith(_FORMULA_START) else value


async def as_json(head: rows.UsageExport, export: Export) -> AsyncIterator[bytes]:
    start = _encode(head)
    assert start.endswith(b"[]}")
    yield start[:-2]
    separator = b""
    async for page in export.pages():
        if page:
            yield separator + b",".join(_encode(row) for row in page)
            separator = b","
    yield b"]}"


def _lines(table: list[Any]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    for row in table:
        writer.writerow(row)
    return out.getvalue().encode()


async def as_csv(export: Export) -> AsyncIterator[bytes]:
    header = rows.header(export.row_type)
    text = [name in _TEXT_COLUMNS for name in header]
    yield _lines([header])
    async for page in export.pages():
        yield _lines(
            [
                [
                    "" if v is None else spreadsheet_text(v) if is_text else v
                    for v, is_text in zip(msgspec.structs.astuple(row), text, strict=True)
                ]
                for row in page
            ]
        )
