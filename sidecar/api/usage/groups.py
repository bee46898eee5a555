"""What `/v2/usage` groups by, and reading each grouping's rows.

Every grouping walks the identities in creation order a page at a time (PAGE per round trip
for their records, one for their counters). Per identity (alone or with its models) the rows
of each page are streamed as they come; per tag, cohort or model only the running sums of
each group are held."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec

from sidecar.api.deps import CatalogDep
from sidecar.api.usage import rows
from sidecar.errors import InvalidRequest
from sidecar.identity.model import MAX_METADATA_KEY, Identity, has_control, metadata_text
from sidecar.usage import buckets
from sidecar.usage.by_model import ModelSums

PAGE = 200  # identities per round trip
UNTAGGED = "(untagged)"
NO_VALUE = "(none)"
TAG_NOTE = (
    "an identity with several tags counts in full under each of them, so the rows can add up "
    f"to more than all usage; identities without tags are under {UNTAGGED}"
)
METADATA = "metadata."
KINDS = ("identity", "tag", "api_key_owner", "model", "identity,model")
# Per key owner: its own counters, then what its keys carried for others (buckets.VIA).
_OWNER_COUNTERS = (
    *rows.COUNTERS,
    buckets.BY_SOURCE["api_key"],
    *(buckets.VIA + c for c in rows.COUNTERS),
)


class GroupBy(msgspec.Struct, frozen=True):
    kind: str  # one of KINDS, or "metadata"
    key: str = ""  # the metadata key

    @property
    def name(self) -> str:
        return METADATA + self.key if self.kind == "metadata" else self.kind


def group_by(value: str) -> GroupBy:
    """The `group_by` parameter checked (InvalidRequest naming it)."""
    if value in KINDS:
        return GroupBy(value)
    if value.startswith(METADATA):
        key = value[len(METADATA) :]
        if not key or len(key) > MAX_METADATA_KEY or has_control(key):
            raise InvalidRequest(
                f"group_by: a metadata key is 1-{MAX_METADATA_KEY} printable characters, "
                f"as in metadata.plan",
                param="group_by",
            )
        return GroupBy("metadata", key)
    raise InvalidRequest(
        f"group_by must be one of {', '.join(KINDS)} or metadata.<key>, got {value[:80]!r}",
        param="group_by",
    )


class Export:
    """The rows of one grouping over the UTC days first..last. `start` reads the first page
    (a store that is down fails there, before anything is sent); `pages` then yields lists
    of rows. Raises StoreUnavailable."""

    row_type: type[msgspec.Struct] = rows.IdentityUsage
    note: str | None = None

    def __init__(self, catalog: CatalogDep, first: int, last: int) -> None:
        self.catalog = catalog
        self.first = first
        self.last = last
        self._bound: bytes | None = b"-"
        self._first_page: list[Any] = []

    async def _ids(self) -> list[str]:
        """The next page's _ids; [] at the end (and when the page was the last)."""
        if self._bound is None:
            return []
        members = await self.catalog.listing.all_ids(self._bound, PAGE)
        # Past the last member read, whether or not it is deleted meanwhile.
        self._bound = b"(" + members[-1] if len(members) == PAGE else None
        return [m[:26].decode() for m in members]

    async def _records(self) -> list[Identity]:
        return await self.catalog.records.many(await self._ids())

    async def _with_sums(self) -> list[tuple[Identity, list[int]]]:
        """The next page's identities that have usage in the range, with their sums."""
        found = await self._records()
        days = await self.catalog.counters.days(
            [i.id for i in found], self.first, self.last, rows.COUNTERS
        )
        return [(i, sums) for i, sums in zip(found, days, strict=True) if any(sums)]

    async def _page(self) -> list[Any]:
        """The rows of the next page of identities (none, for a grouping that sums)."""
        return [
            rows.IdentityUsage(
                id=i.id, external_id=i.external_id, display_name=i.display_name, **rows.counts(s)
            )
            for i, s in await self._with_sums()
        ]

    async def start(self) -> None:
        self._first_page = await self._page()

    async def _walk(self) -> AsyncIterator[list[Any]]:
        page, self._first_page = self._first_page, []
        while True:
            if page:
                yield page
            if self._bound is None:
                return
            page = await self._page()

    async def pages(self) -> AsyncIterator[list[Any]]:
        async for page in self._walk():
            yield page


class _Summed(Export):
    """A grouping that sums identities into groups: one list of rows, at the end."""

    def __init__(self, catalog: CatalogDep, first: int, last: int) -> None:
        super().__init__(catalog, first, last)
        self.totals: dict[str, tuple[int, list[int]]] = {}

    def add(self, group: str, sums: list[int]) -> None:
        count, have = self.totals.get(group) or (0, [0] * len(sums))
        self.totals[group] = (count + 1, [a + b for a, b in zip(have, sums, strict=True)])

    def row(self, group: str, identities: int, sums: list[int]) -> msgspec.Struct:
        raise NotImplementedError

    async def pages(self) -> AsyncIterator[list[Any]]:
        async for _ in self._walk():
            pass
        yield [self.row(g, n, sums) for g, (n, sums) in sorted(self.totals.items())]


class _ByOwner(Export):
    """API key owners, each with what requests carrying its keys counted: its own, and
    those it made for others (its VIA counters)."""

    async def _page(self) -> list[Any]:
        found = await self._records()
        days = await self.catalog.counters.days(
            [i.id for i in found], self.first, self.last, _OWNER_COUNTERS
        )
        out = []
        for identity, all_sums in zip(found, days, strict=True):
            width = rows.WIDTH
            own, by_key, via = all_sums[:width], all_sums[width], all_sums[width + 1 :]
            if by_key or any(via):  # an owner: a listed key named it, or carried others
                sums = [a + b for a, b in zip(own, via, strict=True)]
                out.append(
                    rows.IdentityUsage(
                        id=identity.id,
                        external_id=identity.external_id,
                        display_name=identity.display_name,
                        **rows.counts(sums),
                    )
                )
        return out


class _ByTag(_Summed):
    row_type = rows.TagUsage
    note = TAG_NOTE

    async def _page(self) -> list[Any]:
        for identity, sums in await self._with_sums():
            for tag in identity.tags or (UNTAGGED,):
                self.add(tag, sums)
        return []

    def row(self, group: str, identities: int, sums: list[int]) -> msgspec.Struct:
        return rows.TagUsage(tag=group, identities=identities, **rows.counts(sums))


class _ByMetadata(_Summed):
    row_type = rows.CohortUsage

    def __init__(self, catalog: CatalogDep, first: int, last: int, key: str) -> None:
        super().__init__(catalog, first, last)
        self.key = key

    async def _page(self) -> list[Any]:
        for identity, sums in await self._with_sums():
            metadata = identity.metadata
            self.add(metadata_text(metadata[self.key]) if self.key in metadata else NO_VALUE, sums)
        return []

    def row(self, group: str, identities: int, sums: list[int]) -> msgspec.Struct:
        return rows.CohortUsage(value=group, identities=identities, **rows.counts(sums))


class _ByModel(_Summed):
    row_type = rows.ModelUsage

    async def _page(self) -> list[Any]:
        for models in await self.catalog.counters.models(await self._ids(), self.first, self.last):
            for model, sums in models.items():
                if any(sums):
                    self.add(model, sums)
        return []

    def row(self, group: str, identities: int, sums: list[int]) -> msgspec.Struct:
        return rows.ModelUsage(model=group, identities=identities, **rows.counts(sums))


class _ByIdentityModel(Export):
    row_type = rows.IdentityModelUsage

    async def _page(self) -> list[Any]:
        found = await self._records()
        per_identity: list[ModelSums] = await self.catalog.counters.models(
            [i.id for i in found], self.first, self.last
        )
        return [
            rows.IdentityModelUsage(
                id=identity.id,
                external_id=identity.external_id,
                display_name=identity.display_name,
                model=model,
                **rows.counts(models[model]),
            )
            for identity, models in zip(found, per_identity, strict=True)
            for model in sorted(models)
            if any(models[model])
        ]


def export(grouping: GroupBy, catalog: CatalogDep, first: int, last: int) -> Export:
    if grouping.kind == "metadata":
        return _ByMetadata(catalog, first, last, grouping.key)
    kinds: dict[str, type[Export]] = {
        "identity": Export,
        "tag": _ByTag,
        "api_key_owner": _ByOwner,
        "model": _ByModel,
        "identity,model": _ByIdentityModel,
    }
    return kinds[grouping.kind](catalog, first, last)
