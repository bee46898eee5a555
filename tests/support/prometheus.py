"""Reading the Prometheus text format, whatever order it writes labels in."""

from __future__ import annotations

import re
from typing import Any

_SAMPLE = re.compile(r"^([a-z_]+)(\{.*\})? (\S+)$")


_LABEL = re.compile(r'([a-z_]+)="((?:[^"\\]|\\.)*)"')


def canonical(sample: str) -> str:
    """`name{labels}` with its labels in name order: the text format leaves the order open."""
    name, brace, labels = sample.partition("{")
    if not brace:
        return sample
    pairs = sorted(_LABEL.findall(labels[:-1]))
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in pairs) + "}"


class Samples(dict[str, float]):
    """Samples by `name{labels}`, found whatever order a lookup writes the labels in."""

    def __getitem__(self, key: str) -> float:
        return super().__getitem__(canonical(key))

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(canonical(key))

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(canonical(key), default)


def parse(text: str) -> Samples:
    """`name{labels}` -> value, for every sample line; every other line must be a comment."""
    out = Samples()
    for line in text.splitlines():
        if not line or line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        out[canonical(match.group(1) + (match.group(2) or ""))] = float(match.group(3))
    return out
