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
        writer.writerow("" if v is None else v for v in row)
    return out.getvalue().encode()


async def as_csv(export: Export) -> AsyncIterator[bytes]:
    yield _lines([rows.header(export.row_type)])
    async for page in export.pages():
        yield _lines([msgspec.structs.astuple(row) for row in page])
