"""Listing identities: the order set (creation order, with the text search and tag filters
read), a page at a time; a search goes through the search index once it is built."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sidecar.errors import InvalidRequest
from sidecar.identity.ngram import matches
from sidecar.identity.records import is_ulid
from sidecar.identity.search import SearchIndex
from sidecar.store.connect import RedisClient
from sidecar.store.errors import call
from sidecar.store.keys import Keys
from sidecar.store.scripts import Script, pipeline

_SCAN_BUDGET = 10_000  # members one scan call reads: about 5 ms of Redis time per call


def bound_after(identity_id: str, newest_first: bool) -> str:
    """The lex bound that continues a walk past `identity_id`."""
    return f"({identity_id}" if newest_first else f"({identity_id}\1"


class Listing:
    def __init__(self, client: RedisClient, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self._scan = Script("sidecar.identity.lua", "scan")
        self.index = SearchIndex(client, keys)

    @property
    def scripts(self) -> list[Script]:
        return [self._scan, *self.index.scripts]

    async def check_cursor(self, cursor: str, param: str) -> None:
        """A cursor must be the `_id` of a listed identity (InvalidRequest naming `param`)."""
        if not is_ulid(cursor) or not await call(
            self.client.zrangebylex(self.keys.order, f"[{cursor}\0", f"({cursor}\1", 0, 1)
        ):
            raise InvalidRequest(f"{param}: no identity has _id {cursor[:64]!r}", param=param)

    async def walk(
        self, bound: str, newest_first: bool, needle: str, tags: Sequence[str], want: int
    ) -> list[str]:
        """Up to `want` ids from `bound` on ("+"/"-" for either end), that match."""
        members: list[bytes]
        if needle or tags:
            found = await self.index.walk(bound, newest_first, needle, tags, want)
            if found is not None:
                return found
            members = await self._scan_matching(bound, newest_first, needle, list(tags), want)
        elif newest_first:
            members = await call(
                self.client.zrevrangebylex(self.keys.order, bound, "-", start=0, num=want)
            )
        else:
            members = await call(
                self.client.zrangebylex(self.keys.order, bound, "+", start=0, num=want)
            )
        return [m[:26].decode() for m in members]

    async def page(
        self,
        *,
        limit: int,
        starting_after: str | None,
        ending_before: str | None,
        needle: str,
        tags: Sequence[str],
    ) -> tuple[list[str], bool]:
        """The ids of one page, newest first, and whether there are more."""
        newest_first = ending_before is None
        cursor = starting_after or ending_before
        start = "+" if newest_first else "-"
        bound = bound_after(cursor, newest_first) if cursor else start
        ids = await self.walk(bound, newest_first, needle, tags, limit + 1)
        has_more = len(ids) > limit
        ids = ids[:limit]
        if not newest_first:
            ids.reverse()
        return ids, has_more

    async def _scan_matching(
        self, bound: str, newest_first: bool, needle: str, tags: list[str], want: int
    ) -> list[bytes]:
        found: list[bytes] = []
        while len(found) < want:
            args = [bound, "1" if newest_first else "0", needle, want - len(found), _SCAN_BUDGET]
            members, bound_raw = await self._scan(self.client, [self.keys.order], [*args, *tags])
            found += members
            bound = bound_raw.decode()
            if not bound:
                break
        return found

    async def listed(self, ids: list[str], needle: str, tags: Sequence[str]) -> list[str]:
        """The ids the order set still lists (a deleted identity may linger in a ranking for a
        minute) and that match the search and tags, in order."""
        if not ids:
            return []

        def queue(pipe: Any) -> None:
            for identity_id in ids:
                pipe.zrangebylex(self.keys.order, f"[{identity_id}\0", f"({identity_id}\1", 0, 1)

        replies = await pipeline(self.client, queue)
        return [
            identity_id
            for identity_id, reply in zip(ids, replies, strict=True)
            if reply and matches(reply[0], needle, tags)
        ]

    async def all_ids(self, after: bytes, count: int) -> list[bytes]:
        """Order-set members in creation order after the lex bound `after` (b"-" first)."""
        members: list[bytes] = await call(
            self.client.zrangebylex(self.keys.order, after, b"+", start=0, num=count)
        )
        return members
