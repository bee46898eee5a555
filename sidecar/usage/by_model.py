"""Usage by model as the readers see it: per model, the MODEL_COUNTERS sums (in their
order), decoded from the by-model hashes' fields (usage/buckets.py)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from sidecar.usage import buckets

WIDTH = len(buckets.MODEL_COUNTERS)
_INDEX = {counter: i for i, counter in enumerate(buckets.MODEL_COUNTERS)}

ModelSums = dict[str, list[int]]  # model -> MODEL_COUNTERS sums


def decode(flat: Sequence[bytes | str]) -> ModelSums:
    """A flat HGETALL-like reply (field, value, field, value, ...) as sums per model; fields
    that are not '<model>SEP<counter>' of a known counter are skipped."""
    out: ModelSums = {}
    for n in range(0, len(flat) - 1, 2):
        raw, value = flat[n], flat[n + 1]
        field = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        parts = buckets.split_model_field(field)
        if parts is None:
            continue
        i = _INDEX.get(parts[1])
        if i is None:
            continue
        sums = out.get(parts[0])
        if sums is None:
            sums = out[parts[0]] = [0] * WIDTH
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
