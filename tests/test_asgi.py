"""Reading a request body within its deadline: one timer per loop for every body being read."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from sidecar.asgi import TICK_S, body_deadlines, lowered, read_body
from sidecar.errors import InvalidRequest, PayloadTooLarge, RequestTimeout

SCOPE: Any = {"type": "http", "headers": [(b"content-length", b"5")]}


def chunks(*parts: bytes, then_wait: bool = False) -> Any:
    messages = [
        {"type": "http.request", "body": part, "more_body": i < len(parts) - 1 or then_wait}
        for i, part in enumerate(parts)
    ]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()  # a client that stops sending
        raise AssertionError("unreachable")

    return receive


async def test_a_body_in_parts_is_read_whole_and_leaves_no_deadline_behind() -> None:
    assert await read_body(SCOPE, chunks(b"he", b"llo"), 100, 1.0) == b"hello"
    deadlines = body_deadlines()
    assert not deadlines.pending and not deadlines.expired


async def test_a_body_that_stops_coming_is_given_up_at_its_deadline() -> None:
    began = time.monotonic()
    with pytest.raises(RequestTimeout):
        await read_body(SCOPE, chunks(b"he", then_wait=True), 100, 0.2)
    took = time.monotonic() - began
    assert 0.2 <= took < 0.2 + TICK_S + 0.2
    deadlines = body_deadlines()
    assert not deadlines.pending and not deadlines.expired
    await asyncio.sleep(2 * TICK_S)
    assert deadlines.handle is None  # no body being read: the timer stopped


async def test_a_read_cancelled_from_outside_stays_cancelled() -> None:
    reading = asyncio.ensure_future(read_body(SCOPE, chunks(then_wait=True), 100, 5.0))
    await asyncio.sleep(0.01)
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    assert not body_deadlines().pending


async def test_many_reads_share_the_timer_and_each_gets_its_own_deadline() -> None:
    quick = [read_body(SCOPE, chunks(b"x" * n), 100, 0.3) for n in range(1, 40)]
    stuck = [read_body(SCOPE, chunks(b"a", then_wait=True), 100, 0.15) for _ in range(5)]
    results = await asyncio.gather(*quick, *stuck, return_exceptions=True)
    assert results[:39] == [b"x" * n for n in range(1, 40)]
    assert all(isinstance(r, RequestTimeout) for r in results[39:])


async def test_a_body_over_the_limit_is_refused() -> None:
    with pytest.raises(PayloadTooLarge):
        await read_body(SCOPE, chunks(b"abc", b"def"), 4, 1.0)
    assert not body_deadlines().pending


class Cycle:
    """What uvicorn's request cycle shows of itself: its messages, and an event set while it
    holds one (asgi._ready)."""

    def __init__(self, *parts: bytes, then_wait: bool = False) -> None:
        self.message_event = asyncio.Event()
        self.parts = list(parts)
        self.then_wait = then_wait
        self.deadlines_seen: list[int] = []
        if self.parts:
            self.message_event.set()

    async def receive(self) -> Any:
        self.deadlines_seen.append(len(body_deadlines().pending))
        await self.message_event.wait()
        self.message_event.clear()
        part = self.parts.pop(0)
        more = bool(self.parts) or self.then_wait
        if self.parts:
            asyncio.get_running_loop().call_later(0.01, self.message_event.set)
        return {"type": "http.request", "body": part, "more_body": more}


async def test_a_body_already_in_is_read_without_a_deadline() -> None:
    cycle = Cycle(b"hello")
    assert await read_body(SCOPE, cycle.receive, 100, 1.0) == b"hello"
    assert cycle.deadlines_seen == [0]  # nothing to wait for: no deadline was set
    with pytest.raises(PayloadTooLarge):
        await read_body(SCOPE, Cycle(b"hello").receive, 4, 1.0)


async def test_a_body_still_coming_is_read_under_its_deadline() -> None:
    cycle = Cycle(b"he", b"llo")
    assert await read_body(SCOPE, cycle.receive, 100, 1.0) == b"hello"
    assert cycle.deadlines_seen == [0, 1]  # the first part was in; the rest was waited for
    assert not body_deadlines().pending
    with pytest.raises(RequestTimeout):
        await read_body(SCOPE, Cycle(b"he", then_wait=True).receive, 100, 0.1)
    nothing_yet = Cycle()  # the request began before any of its body was in
    reading = asyncio.ensure_future(read_body(SCOPE, nothing_yet.receive, 100, 1.0))
    await asyncio.sleep(0.01)
    assert nothing_yet.deadlines_seen == [1]
    nothing_yet.parts.append(b"hi")
    nothing_yet.message_event.set()
    assert await reading == b"hi"


def test_a_header_named_single_is_refused_when_repeated_with_different_values() -> None:
    scope: Any = {
        "headers": [
            (b"x-api-key", b"a"),
            (b"accept", b"x"),
            (b"accept", b"y"),
            (b"X-Api-Key", b"a"),
        ]
    }
    single = frozenset({"x-api-key"})
    # Repeated alike, or repeated but not single-valued: the last of each.
    assert lowered(scope, single) == {"x-api-key": "a", "accept": "y"}
    scope["headers"].append((b"x-api-key", b"b"))
    with pytest.raises(InvalidRequest) as refused:
        lowered(scope, single)
    assert (refused.value.code, refused.value.param) == ("ambiguous_header", "x-api-key")
    assert lowered(scope) == {"x-api-key": "b", "accept": "y"}  # nothing named: the last
