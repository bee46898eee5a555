"""One pipelined connection for the calls on a request's path: limit checks and settlements.

Each call is written to the socket at once, from its caller, and its reply is matched in order
(Redis answers a connection's commands in the order it sent them); replies are parsed by hiredis
in the protocol's own callback, so a reply wakes its caller directly, with no reader task in
between. Against redis-py's per-call path (a pool checkout, its send and read layers, a
release) an admission and its settlement take 0.6 of the CPU (90 against 150 us) and 0.7 of the
wall time, measured with bench.line_bench (see docs/benchmarks.md). Because admissions and
settlements share the line, Redis sees a settlement this process wrote before any admission it
writes afterwards: a settlement can be written without waiting for its reply, and the next
check still counts it.

The connection is opened by redis-py (address, TLS, AUTH, SELECT as configured), then taken
out of its pool and its transport handed to this protocol. Only for a single server or a
unix socket without TLS: on a cluster each call goes to its slot's node, and behind Sentinel
the master moves (both keep redis-py's paths, as `rediss://` does)."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any

import hiredis
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import SSLConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from sidecar.store.connect import RedisClient
from sidecar.store.deadline import STORE

log = logging.getLogger("sidecar.store")

# A reply this late (the oldest call waiting) means the connection is not coming back: it is
# closed, its callers fail, and the next call opens a new one.
STALE_S = 5.0


class _Protocol(asyncio.Protocol):
    __slots__ = ("line", "replaced")

    def __init__(self, line: HotLine, replaced: asyncio.BaseProtocol) -> None:
        self.line = line
        self.replaced = replaced  # the stream's, told of the end too: its writer's close waits

    def data_received(self, data: bytes) -> None:
        self.line._received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.line._lost(exc)
        self.replaced.connection_lost(exc)


class HotLine:
    """`send(packed)` writes RESP commands and returns their replies' futures (error replies
    are ResponseError values, not raised). A lost connection fails the calls in flight with
    redis-py's ConnectionError; the next send opens another."""

    def __init__(self, client: Redis) -> None:
        self.client = client
        self._transport: asyncio.Transport | None = None
        self._conn: Any = None  # the redis-py connection the transport came from
        self._waiting: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self._reader = hiredis.Reader(replyError=ResponseError)
        self._opening: asyncio.Future[None] | None = None
        self._buffer: list[bytes] = []  # calls made while others were in flight, to write
        self._flush_waiters: list[asyncio.Future[None]] = []  # see `written`
        self._returning: asyncio.Future[None] | None = None  # a lost connection, to its pool
        # The client's socket timeout (seconds), for callers that bound their calls by it.
        timeout = client.connection_pool.connection_kwargs.get("socket_timeout")
        self.timeout = float(timeout) if timeout is not None else None

    @classmethod
    def for_client(cls, client: RedisClient) -> HotLine | None:
        """A line for a single server; None for a cluster or Sentinel."""
        if not isinstance(client, Redis):
            return None
        pool = client.connection_pool
        if type(pool) is not ConnectionPool:  # Sentinel's pools are subclasses
            return None
        if issubclass(pool.connection_class, SSLConnection):
            return None  # TLS keeps redis-py's path: its transport is not handed over here
        return cls(client)

    @property
    def ready(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    async def open(self) -> None:
        """Connect, unless connected; one opening at a time. Raises redis-py's errors."""
        while not self.ready:
            if self._opening is not None:
                await asyncio.shield(self._opening)
                continue
            self._opening = asyncio.get_running_loop().create_future()
            try:
                await self._take_connection()
                self._opening.set_result(None)
            except BaseException as exc:
                self._opening.set_exception(exc)
                self._opening.exception()  # retrieved: waiters get it through the shield
                raise
            finally:
                self._opening = None

    async def _take_connection(self) -> None:
        pool = self.client.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        writer = getattr(conn, "_writer", None)
        if writer is None:
            await pool.release(conn)
            raise RedisConnectionError("the connection did not open")
        transport: asyncio.Transport = writer.transport
        self._reader = hiredis.Reader(replyError=ResponseError)
        transport.set_protocol(_Protocol(self, transport.get_protocol()))
        self._transport, self._conn = transport, conn

    def send(self, packed: bytes, count: int = 1) -> list[asyncio.Future[Any]]:
        """Write `count` commands packed in RESP; their replies, in order. The line must be
        ready (see `open`). A call on an idle line is written now; calls made while others
        are in flight are written together once this turn of the event loop is done (one
        system call for many under load; their replies queue behind the ones in flight
        anyway), and `written` waits for that."""
        transport = self._transport
        if transport is None or transport.is_closing():
            raise RedisConnectionError("the hot line is not open")
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        if self._waiting and now - self._waiting[0][1] > STALE_S:
            self.close(RedisConnectionError(f"no reply from Redis for {STALE_S:g} s"))
            raise RedisConnectionError("no reply from Redis")
        futures = [loop.create_future() for _ in range(count)]
        idle = not self._waiting
        self._waiting.extend((future, now) for future in futures)
        buffer = self._buffer
        if buffer:  # after what is buffered, in order
            buffer.append(packed)
        elif idle:
            transport.write(packed)
        else:
            buffer.append(packed)
            loop.call_soon(self._flush)
        return futures

    async def written(self) -> None:
        """Returns once every call sent so far is written to the socket (or has failed with
        the connection): a call that must reach Redis before the caller answers its client
        waits here. Under load the calls of one turn of the event loop go out in one system
        call, where writing each at once cost /hooks/authorize (whose reservations are
        recorded so) a fifth of its CPU (py-spy under bench.hooks_bench)."""
        if not self._buffer:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._flush_waiters.append(waiter)
        await waiter

    def _flush(self) -> None:
        buffer = self._buffer
        if buffer:
            transport = self._transport
            if transport is not None and not transport.is_closing():
                transport.write(b"".join(buffer))
            buffer.clear()  # else: their calls fail with the connection (connection_lost)
        self._wake_writers()

    def _wake_writers(self) -> None:
        waiters, self._flush_waiters = self._flush_waiters, []
        for waiter in waiters:
            if not waiter.done():  # not cancelled
                waiter.set_result(None)

    def _received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        waiting = self._waiting
        got = False
        while (reply := reader.gets()) is not False:
            got = True
            if not waiting:
                self.close(RedisConnectionError("a reply nobody asked for"))
                return
            future = waiting.popleft()[0]
            if not future.done():  # not a caller that gave up
                future.set_result(reply)
        if got:
            STORE.answered()

    def _lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._buffer.clear()
        self._wake_writers()  # what they waited for fails on its own futures, below
        error = RedisConnectionError(f"connection to Redis lost: {exc or 'closed'}")
        while self._waiting:
            future = self._waiting.popleft()[0]
            if not future.done():
                future.set_exception(error)
        conn, self._conn = self._conn, None
        if conn is not None:
            self._returning = asyncio.ensure_future(self._give_back(conn))

    async def _give_back(self, conn: Any) -> None:
        """The taken connection returns to the pool closed; it reopens when handed out."""
        try:
            await conn.disconnect(nowait=True)
        finally:
            await self.client.connection_pool.release(conn)

    async def aclose(self) -> None:
        """Close the line and give its connection back to the pool (before the pool closes)."""
        transport, conn = self._transport, self._conn
        if transport is None:
            return
        self._conn = None
        transport.abort()
        await asyncio.sleep(0)  # connection_lost runs: what was in flight fails
        await self._give_back(conn)

    def close(self, exc: Exception | None = None) -> None:
        transport = self._transport
        if transport is not None:
            if exc is not None:
                log.warning("Redis hot line closed: %s", exc)
            transport.abort()  # connection_lost fails what is in flight
