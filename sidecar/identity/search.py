"""Search through the index (sidecar/identity/ngram.py describes it): candidates from the
postings, checked against their order-set members, returned in exact _id order.

A walk reads candidates in seq order from where the page starts and keeps those that match
in a pending list; ngram.py's invariant says how far back in creation time a later seq can
reach (`late`), so each pending match newer (or, walking forwards, older) than the last seq
read by more than that is final, and the page fills in order without reading every
candidate. Seqs in the late set break the invariant and are read on their own."""

from __future__ import annotations

import bisect
import math
from collections.abc import AsyncIterator, Sequence
from typing import Any

from sidecar.identity import ngram
from sidecar.identity.records import ulid_ms
from sidecar.store.connect import RedisClient
from sidecar.store.keys import Keys
from sidecar.store.scripts import Script, pipeline

FETCH_MAX = 2_048  # candidates read per script call (a few us of Redis time each)
MAX_SUFFIXES = 512  # trigrams a two-byte needle may stand for; beyond, the list is scanned
_NARROW = 5  # posting strings intersected per chunk: the rarest and up to four more ...
_NARROW_RATIO = 8  # ... at most this many times as long
_AHEAD = 4  # load the postings of enough chunks to expect this many pages' worth of candidates
SLACK = 8  # candidates read beyond the page's size in a walk's first batch


class SearchIndex:
    def __init__(self, client: RedisClient, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self._members = Script("sidecar.identity.lua", "seqs", prelude=ngram.lua_constants())
        self.slack = SLACK

    @property
    def scripts(self) -> list[Script]:
        return [self._members]

    def posting_key(self, gram: bytes, chunk: int) -> str:
        return f"{self.keys.search_postings}{ngram.key_part(gram)}:{chunk}"

    async def members(self, seqs: Sequence[int]) -> list[bytes | None]:
        """The order-set members of `seqs` (None where gone), a script call per FETCH_MAX."""
        found: list[bytes | None] = []
        keys = [self.keys.order, self.keys.search_ids]
        for at in range(0, len(seqs), FETCH_MAX):
            found += await self._members(self.client, keys, list(seqs[at : at + FETCH_MAX]))
        return found

    async def walk(
        self, bound: str, newest_first: bool, needle: str, tags: Sequence[str], want: int
    ) -> list[str] | None:
        """Up to `want` ids past the lex `bound` ("+" / "-" for either end, else as
        listing.bound_after makes it) whose member matches: the Listing.walk of a search.
        None when the index cannot answer (not built yet, or a one-byte needle), and for
        neither a needle nor tags."""
        plan = ngram.plan(needle, tags)
        if plan is None:
            return None
        cursor = None if bound in ("+", "-") else bound[1:27]
        suffix = plan.suffix[::-1]

        def queue(pipe: Any) -> None:
            pipe.hmget(self.keys.search_meta, "state", "seq", "late")
            pipe.zrange(self.keys.search_late, 0, -1)
            if cursor is not None:
                pipe.zrangebylex(self.keys.order, f"[{cursor}\0", f"({cursor}\1", 0, 1)
            if suffix:
                start = b"[" + suffix
                pipe.zrangebylex(self.keys.search_suffixes, start, start + b"\xff")

        replies = await pipeline(self.client, queue)
        (state, seqs, late), late_seqs = replies[0], replies[1]
        if state != b"ready":
            return None
        cursor_member = replies[2][0] if cursor is not None and replies[2] else None
        groups: list[tuple[bytes, ...]] = [(g,) for g in plan.trigrams]
        unsized = None
        if suffix:
            found = replies[-1]
            if len(found) > MAX_SUFFIXES:
                return None
            unsized = len(groups)
            groups.append(tuple(g[::-1] for g in found))
        if plan.tags:
            groups.append(plan.tags)
        chunks = -(-int(seqs or 0) // ngram.CHUNK)
        if not chunks or any(not group for group in groups):
            return []
        walk = _Walk(
            self,
            groups,
            unsized=unsized,
            chunks=chunks,
            descending=newest_first,
            late_ms=int(late or 0),
            late={int(s) for s in late_seqs},
            needle=needle,
            tags=tags,
        )
        await walk.measure()
        return await walk.run(cursor, cursor_member, want)


class _Walk:
    """One search's walk: the candidates in seq order (loaded a few chunks at a time), the
    members read so far, the matches waiting for their place. Candidates are in every group
    of grams (a group: any of its grams)."""

    def __init__(
        self,
        index: SearchIndex,
        groups: list[tuple[bytes, ...]],
        *,
        unsized: int | None,
        chunks: int,
        descending: bool,
        late_ms: int,
        late: set[int],
        needle: str,
        tags: Sequence[str],
    ) -> None:
        self.index = index
        self.groups = groups
        self.unsized = unsized  # the group whose sizes are not measured (a two-byte needle's)
        self.chunks = chunks
        self.descending = descending
        self.late_ms = late_ms
        self.late = late
        self.needle = needle
        self.tags = tags
        self.sizes: dict[tuple[bytes, int], int] = {}
        self.candidates: dict[int, list[int]] = {}  # chunk -> seqs, ascending
        self.read: dict[int, bytes | None] = {}  # seq -> member
        self.span = 1  # chunks loaded per round trip where sizes are not known

    async def measure(self) -> None:
        """The length of every posting string of the measured groups."""
        pairs = [
            (g, c)
            for n, group in enumerate(self.groups)
            if n != self.unsized
            for g in group
            for c in range(self.chunks)
        ]
        index = self.index

        def queue(pipe: Any) -> None:
            for gram, chunk in pairs:
                pipe.strlen(index.posting_key(gram, chunk))

        sizes = await pipeline(index.client, queue) if pairs else []
        self.sizes = {pair: size // 2 for pair, size in zip(pairs, sizes, strict=True)}

    # -- candidates -----------------------------------------------------------------------

    def _estimate(self, group: int, chunk: int) -> float:
        if group == self.unsized:
            return math.inf
        return sum(self.sizes[(g, chunk)] for g in self.groups[group])

    async def _load(self, first: int, want: int, descending: bool) -> None:
        """Load the candidates of chunk `first` and, in walking order, of enough chunks after
        it to expect `want` of them."""
        step = -1 if descending else 1
        span = [first]
        if self.unsized is None or len(self.groups) > 1:
            expected = min(self._estimate(n, first) for n in range(len(self.groups)))
            nxt = first + step
            while 0 <= nxt < self.chunks and expected < want:
                expected += min(self._estimate(n, nxt) for n in range(len(self.groups)))
                span.append(nxt)
                nxt += step
        else:
            for _ in range(self.span - 1):
                nxt = span[-1] + step
                if not 0 <= nxt < self.chunks:
                    break
                span.append(nxt)
            self.span *= 2
        reads: list[tuple[int, int, bytes]] = []  # chunk, group, gram
        for chunk in span:
            ranked = sorted((self._estimate(n, chunk), n) for n in range(len(self.groups)))
            least = ranked[0][0]
            if least == 0:
                self.candidates[chunk] = []
                continue
            picked = [n for size, n in ranked[:_NARROW] if size <= least * _NARROW_RATIO]
            reads += [(chunk, n, gram) for n in picked for gram in self.groups[n]]
        index = self.index

        def queue(pipe: Any) -> None:
            for chunk, _, gram in reads:
                pipe.get(index.posting_key(gram, chunk))

        data = await pipeline(index.client, queue) if reads else []
        unions: dict[tuple[int, int], set[int]] = {}
        for (chunk, group, _), raw in zip(reads, data, strict=True):
            unions.setdefault((chunk, group), set()).update(ngram.offsets(raw or b""))
        found: dict[int, set[int]] = {}
        for (chunk, _), offsets in unions.items():
            if chunk in found:
                found[chunk].intersection_update(offsets)
            else:
                found[chunk] = offsets
        for chunk in span:
            if chunk not in self.candidates:
                base = chunk * ngram.CHUNK
                self.candidates[chunk] = sorted(base + o for o in found.get(chunk, ()))

    async def seqs(self, start: int | None, descending: bool, want: int) -> AsyncIterator[int]:
        """Candidate seqs past `start` (exclusive; None: from the first or last) in order."""
        chunk = (self.chunks - 1 if descending else 0) if start is None else start // ngram.CHUNK
        while 0 <= chunk < self.chunks:
            if chunk not in self.candidates:
                await self._load(chunk, want * _AHEAD, descending)
            found = self.candidates[chunk]
            if descending:
                end = len(found) if start is None else bisect.bisect_left(found, start)
                for seq in reversed(found[:end]):
                    yield seq
                chunk -= 1
            else:
                begin = 0 if start is None else bisect.bisect_right(found, start)
                for seq in found[begin:]:
                    yield seq
                chunk += 1
            start = None

    async def batches(
        self, start: int | None, descending: bool, want: int
    ) -> AsyncIterator[list[tuple[int, bytes | None]]]:
        """(seq, member) in candidate order, read in growing batches."""
        size = want + self.index.slack
        batch: list[int] = []
        async for seq in self.seqs(start, descending, want):
            batch.append(seq)
            if len(batch) >= size:
                yield await self.fetch(batch)
                batch, size = [], min(size * 2, FETCH_MAX)
        if batch:
            yield await self.fetch(batch)

    async def fetch(self, seqs: list[int]) -> list[tuple[int, bytes | None]]:
        missing = [s for s in seqs if s not in self.read]
        for seq, member in zip(missing, await self.index.members(missing), strict=True):
            if member is not None and ngram.member_seq(member) != seq:
                member = None
            self.read[seq] = member
        return [(seq, self.read[seq]) for seq in seqs]

    # -- the walk -------------------------------------------------------------------------

    async def _start(self, cursor: str, seq: int) -> int | None:
        """Where a walk past `cursor` (at `seq`) can start: the first candidate on the far
        side of it whose time is past the cursor's by more than `late` (every seq beyond that
        one, but the late ones, is past the cursor too). None: from the end."""
        reach = ulid_ms(cursor) + (self.late_ms if self.descending else -self.late_ms)
        async for batch in self.batches(seq, not self.descending, 8):
            for candidate, member in batch:
                if member is None or candidate in self.late:
                    continue
                ms = ulid_ms(member[:26].decode())
                if (ms > reach) if self.descending else (ms < reach):
                    return candidate
        return None

    async def run(self, cursor: str | None, cursor_member: bytes | None, want: int) -> list[str]:
        descending = self.descending
        start = None
        if cursor is not None and cursor_member is not None:
            seq = ngram.member_seq(cursor_member)
            if seq is not None and seq not in self.late:
                start = await self._start(cursor, seq)
        pending: list[str] = []  # matches in _id order, not yet known to be next
        out: list[str] = []

        def consider(member: bytes | None) -> None:
            if member is None or not ngram.matches(member, self.needle, self.tags):
                return
            identity_id = member[:26].decode()
            if cursor is None or ((identity_id < cursor) if descending else (identity_id > cursor)):
                index = bisect.bisect_left(pending, identity_id)
                if index == len(pending) or pending[index] != identity_id:
                    pending.insert(index, identity_id)

        # Late seqs on the side the walk does not cover (or covers without the invariant).
        if descending:
            far = [s for s in self.late if start is not None and s > start]
        else:
            far = [s for s in self.late if start is None or s > start]
        for _, member in await self.fetch(sorted(far)):
            consider(member)
        done = set(far)

        def settle(limit: int) -> bool:
            while pending and len(out) < want:
                identity_id = pending[-1] if descending else pending[0]
                ms = ulid_ms(identity_id)
                if (ms <= limit) if descending else (ms >= limit):
                    break
                out.append(pending.pop() if descending else pending.pop(0))
            return len(out) >= want

        async for batch in self.batches(start, descending, want):
            last = None
            for seq, member in batch:
                if seq not in done:
                    consider(member)
                if member is not None and seq not in self.late:
                    last = ulid_ms(member[:26].decode())
            if last is not None:
                limit = last + self.late_ms if descending else last - self.late_ms
                if settle(limit):
                    return out
        while pending and len(out) < want:
            out.append(pending.pop() if descending else pending.pop(0))
        return out
