"""Usage by model as the readers see it: per model, the MODEL_COUNTERS sums (in their
order), decoded from the by-model hashes' fields (usage/buckets.py)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from sidecar.usage import buckets

WIDTH = len(buckets.MODEL_COUNTERS)
_INDEX = {counter: i for i, counter in enumerate(buckets.MODEL_COUNTERS)}

ModelSums = dict[str, list[int]]  # model -> MODEL_COUNTERS sums


def decode(day: Mapping[bytes, bytes]) -> ModelSums:
    """One by-model day hash (HGETALL) as sums per model; fields of no known slot or counter
    are skipped."""
    name = buckets.MODEL_NAME.encode()
    models = {
        value: field[1:].decode("utf-8", "replace")
        for field, value in day.items()
        if field.startswith(name)
    }
    out: ModelSums = {}
    for field, value in day.items():
        model = models.get(field[:1])
        i = _INDEX.get(field[1:].decode("ascii", "replace")) if model is not None else None
        if model is None or i is None:
            continue
        sums = out.get(model)
        if sums is None:
            sums = out[model] = [0] * WIDTH
        sums[i] += int(value)
    return out


def decode_rows(flat: Sequence[bytes]) -> ModelSums:
    """lua/models.lua's reply: model, then its WIDTH sums, for each model."""
    step = WIDTH + 1
    return {
        flat[n].decode("utf-8", "replace"): [int(v) for v in flat[n + 1 : n + step]]
        for n in range(0, len(flat), step)
    }


def merge(into: ModelSums, more: ModelSums) -> ModelSums:
    for model, sums in more.items():
        have = into.get(model)
        if have is None:
            into[model] = list(sums)
        else:
            for i, n in enumerate(sums):
                have[i] += n
    return into


def total(parts: Iterable[ModelSums]) -> ModelSums:
    out: ModelSums = {}
    for part in parts:
        merge(out, part)
    return out


def by_cost(sums: ModelSums) -> list[str]:
    """The models, the most expensive first (then by requests, then by name)."""
    cost, requests = _INDEX[buckets.COST], _INDEX[buckets.REQUESTS]
    return sorted(sums, key=lambda m: (-sums[m][cost], -sums[m][requests], m))
