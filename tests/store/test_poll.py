"""The event loop kept polling while a request waits on a reply, and only then."""

from __future__ import annotations

import asyncio

from sidecar.store.poll import Poller


async def turns_while(seconds: float) -> int:
    """How many turns the loop takes in `seconds` of `sleep(0)` (each is one turn)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    turns = 0
    while loop.time() < end:
        await asyncio.sleep(0)
        turns += 1
    return turns


async def test_polls_while_a_watched_reply_is_pending_and_stops_when_it_comes() -> None:
    loop = asyncio.get_running_loop()
    poller = Poller(limit_s=1.0)
    reply: asyncio.Future[str] = loop.create_future()
    poller.watch(reply)
    assert poller.polling
    await asyncio.sleep(0.02)  # a sleep the poller keeps polling through
    assert poller.polling
    reply.set_result("OK")
    await turns_while(0.005)
    assert not poller.polling


async def test_gives_up_after_its_limit_and_watches_each_reply_for_its_own() -> None:
    loop = asyncio.get_running_loop()
    poller = Poller(limit_s=0.02)
    first: asyncio.Future[str] = loop.create_future()
    poller.watch(first)
    await asyncio.sleep(0.015)
    second: asyncio.Future[str] = loop.create_future()
    poller.watch(second)
    await asyncio.sleep(0.01)  # past the first's limit, within the second's
    assert poller.polling
    await asyncio.sleep(0.03)
    assert not poller.polling  # neither came: a store that slow is waited for asleep
    assert not first.done() and not second.done()


async def test_nothing_is_polled_for_a_done_reply_or_with_no_limit() -> None:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[str] = loop.create_future()
    done.set_result("OK")
    poller = Poller(limit_s=1.0)
    poller.watch(done)
    assert not poller.polling
    off = Poller(limit_s=0)
    off.watch(loop.create_future())
    assert not off.polling
