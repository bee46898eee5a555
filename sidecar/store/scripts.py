from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, ResponseError

from sidecar.store.connect import RedisClient
from sidecar.store.errors import translated, unavailable
from sidecar.store.hotline import HotLine


@functools.cache
def lua(package: str, name: str) -> str:
    """The source of `<package>/<name>.lua`, shipped as package data (read once a process)."""
    return resources.files(package).joinpath(f"{name}.lua").read_text("utf-8")


class Script:
    """A Lua script shipped as package data, loaded once, run by SHA. Every call translates
    the driver's errors (StoreUnavailable)."""

    def __init__(self, package: str, name: str, *, prelude: str = "") -> None:
        """`prelude`: Lua the script's source starts with (shared constants and functions,
        generated from the Python that uses the same values)."""
        self.name = name
        self.source = prelude + ("\n" if prelude else "") + lua(package, name)
        self.sha: str | None = None

    async def load(self, client: RedisClient) -> None:
        with translated():
            self.sha = await client.script_load(self.source)

    async def __call__(self, client: RedisClient, keys: list[str], args: list[Any]) -> Any:
        if self.sha is None:
            await self.load(client)
        with translated():
            try:
                return await client.evalsha(self.sha, len(keys), *keys, *args)  # type: ignore[arg-type]
            except NoScriptError:
                pass
        # The server restarted or was flushed since we loaded it.
        await self.load(client)
        with translated():
            return await client.evalsha(self.sha, len(keys), *keys, *args)  # type: ignore[arg-type]

    def queue(self, pipe: Any, keys: list[str], args: list[Any]) -> None:
        """Add to a pipeline; the caller reloads and retries on NoScriptError."""
        assert self.sha is not None, f"script {self.name} not loaded"
        # Not pipe.evalsha(): redis-py's cluster pipeline refuses that method, though it routes
        # the command by its keys (all in one slot here) like any other.
        pipe.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)


async def load_all(client: RedisClient, scripts: Sequence[Script], connections: int) -> None:
    """Load `scripts`, at most `connections` at once: over the connections already open (what
    `warm` opened), where loading them all at once would open a connection for each."""
    gate = asyncio.Semaphore(max(connections, 1))

    async def load(script: Script) -> None:
        async with gate:
            await script.load(client)

    await asyncio.gather(*(load(script) for script in scripts))


async def pipeline(
    client: RedisClient,
    queue: Callable[[Any], None],
    scripts: Sequence[Script] = (),
    *,
    raise_on_error: bool = True,
) -> list[Any]:
    """Run the commands `queue` adds to a pipeline (not a transaction) and return their
    replies; the scripts it queues are loaded first, and loaded again and the whole pipeline
    sent again once when the server lost them (a restart or a flush: a script that did not run
    changed nothing). With `raise_on_error` false, a command's own error is its reply.
    Raises StoreUnavailable."""
    for script in scripts:
        if script.sha is None:
            await script.load(client)
    for attempt in range(2):
        pipe = client.pipeline(transaction=False)
        queue(pipe)
        with translated():
            try:
                results = list(await pipe.execute(raise_on_error=raise_on_error))
            except NoScriptError:
                if attempt:
                    raise
                results = None
        lost = results is None or any(isinstance(r, NoScriptError) for r in results)
        if results is not None and (attempt or not lost):
            return results
        for script in scripts:
            await script.load(client)
    raise AssertionError("unreachable")


def resp(args: list[Any]) -> bytes:
    """A command in RESP, for strings, bytes and ints, as the client packs it: hiredis's
    packer, in C (1.4 us for a usage write's 21 arguments, against 3.8 for the same loop in
    Python and more for the client's general packer; it runs once per script call)."""
    packed: bytes = hiredis.pack_command(tuple(args))
    return packed


class Coalescer:
    """Calls of one script, written to Redis in batches: a call made while none is in flight
    goes out at once, from its caller's task; calls made while one is in flight wait for it and
    then go out together, as one pipeline. Under load many limit checks share a round trip (and
    its system calls and connection checkout); a lone call pays nothing for it."""

    def __init__(self, client: RedisClient, script: Script, line: HotLine | None = None) -> None:
        """`line`: when given, calls go out on it, each at once (it pipelines by itself)."""
        self.client = client
        self.script = script
        self.line = line
        self._busy = False
        self._queue: list[tuple[list[str], list[Any], asyncio.Future[Any]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def __call__(self, keys: list[str], args: list[Any]) -> Any:
        if self.line is not None:
            return await self.written(keys, args)
        if self._busy:
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._queue.append((keys, args, future))
            return await future
        self._busy = True
        try:
            (result,) = await self._send([(keys, args)])
        finally:
            self._next()
        if isinstance(result, Exception):  # this call's own error (the script failed)
            raise unavailable(result) from result
        return result

    async def written(self, keys: list[str], args: list[Any]) -> Any:
        """On the line: the call is written before this coroutine first yields when the line
        is open (see `write`), and its reply returned."""
        future = self.write(keys, args)
        if future is None:
            future = await self._write_when_open(keys, args)
        return await self.reply(future, keys, args)

    def write(self, keys: list[str], args: list[Any]) -> asyncio.Future[Any] | None:
        """Send the call on the line (on the socket by HotLine.written), without waiting: its
        reply's future (an error reply is its value, see `reply`); None when the line is not
        open or the script not loaded."""
        line, sha = self.line, self.script.sha
        if line is None or sha is None or not line.ready:
            return None
        with translated(replied=False):  # written, not answered
            (future,) = line.send(_packed(sha, [(keys, args)]))
        return future

    async def reply(
        self,
        future: asyncio.Future[Any],
        keys: list[str],
        args: list[Any],
        again: bool = True,
        *,
        shielded: bool = False,
    ) -> Any:
        """The result of a call `write` sent; raises StoreUnavailable (and sends it again
        once when the server had lost the script: a script that did not run changed nothing).
        `shielded`: a caller that gives up (cancelled) leaves the future to get its reply, for
        a callback of its own to deal with."""
        with translated():
            result = await (asyncio.shield(future) if shielded else future)
        if not isinstance(result, ResponseError):
            return result
        if again and _lost_script(result):
            await self.script.load(self.client)  # the server restarted or was flushed
            resent = await self._write_when_open(keys, args)
            return await self.reply(resent, keys, args, again=False, shielded=shielded)
        raise unavailable(result) from result

    async def _write_when_open(self, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        """`write`, once the script is loaded and the line open. Raises StoreUnavailable."""
        assert self.line is not None
        if self.script.sha is None:
            await self.script.load(self.client)
        with translated(replied=False):  # open already, or opened: its handshake told
            await self.line.open()
        future = self.write(keys, args)
        assert future is not None  # open, and no await since
        return future

    def _next(self) -> None:
        """The call or batch in flight is done: send what queued meanwhile, or go idle."""
        if not self._queue:
            self._busy = False
            return
        batch, self._queue = self._queue, []
        task = asyncio.ensure_future(self._follow(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _follow(self, batch: list[tuple[list[str], list[Any], asyncio.Future[Any]]]) -> None:
        batch = [call for call in batch if not call[2].done()]  # callers that gave up: unsent
        try:
            if not batch:
                return
            try:
                results = await self._send([(keys, args) for keys, args, _ in batch])
            except Exception as exc:
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                return
            for (_, _, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue  # its caller gave up (a timeout)
                if isinstance(result, Exception):
                    future.set_exception(unavailable(result))
                else:
                    future.set_result(result)
        finally:
            self._next()

    async def _send(self, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        return await batch(self.client, self.script, calls)


Call = tuple[list[str], list[Any]]  # a script call's keys and arguments


async def batch(
    client: RedisClient,
    script: Script,
    calls: Sequence[Call],
    line: HotLine | None = None,
    *,
    raise_on_error: bool = False,
) -> list[Any]:
    """Each call's reply, or its own error (a value, not raised), the calls written at once;
    raises StoreUnavailable when the batch as a whole failed, and with `raise_on_error` when
    any call failed (the others were applied). The script is loaded first, and the batch sent
    again once when the server had lost it. `line`: a single server's line of the caller's
    own (HotLine.for_client), used instead of a pool connection."""
    if script.sha is None:
        await script.load(client)
    if line is None and isinstance(client, RedisCluster):
        replies = await _pipeline(client, script, calls)  # reloads a lost script itself
    else:
        replies = await _written(client, script, calls, line)
        if any(_lost_script(r) for r in replies):
            await script.load(client)  # the server restarted or was flushed
            replies = await _written(client, script, calls, line)
    if raise_on_error:
        failed = next((r for r in replies if isinstance(r, Exception)), None)
        if failed is not None:
            raise unavailable(failed) from failed
    return replies


async def _written(
    client: RedisClient, script: Script, calls: Sequence[Call], line: HotLine | None
) -> list[Any]:
    """The calls written at once, on `line` or on a pool connection, and their replies."""
    sha = script.sha
    assert sha is not None
    packed = _packed(sha, calls)
    with translated():
        if line is not None:
            return await _on_line(packed, len(calls), line)
        assert not isinstance(client, RedisCluster)  # a cluster's calls go by its pipeline
        return await _direct(client, packed, len(calls))


async def _on_line(packed: bytes, count: int, line: HotLine) -> list[Any]:
    """`count` packed calls on `line`, their replies matched in order as they arrive: no pool
    checkout and release (a tenth of a lone request's instructions in all went to those of its
    usage writes, bench.instr_bench), no read layers. The client's socket timeout bounds the
    whole batch; a reply that comes after it is dropped."""
    # Opened (a pool connection taken) within the client's connect timeout, as any connection
    # is; the batch's own deadline starts once it is written.
    await line.open()
    async with asyncio.timeout(line.timeout):
        futures = line.send(packed, count)
        try:
            return [await future for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()  # its reply, when it comes, is dropped
            raise


def _packed(sha: str, calls: Sequence[Call]) -> bytes:
    """The calls of one script, as EVALSHA commands in RESP, written at once."""
    return b"".join(resp(["EVALSHA", sha, len(keys), *keys, *args]) for keys, args in calls)


def _lost_script(reply: Any) -> bool:
    """An error reply saying the server does not have the script (restarted or flushed):
    redis-py's parser makes it a NoScriptError, hiredis's (the line's) keeps the code."""
    return isinstance(reply, NoScriptError) or (
        isinstance(reply, ResponseError) and str(reply).startswith("NOSCRIPT")
    )


async def _direct(client: Redis, packed: bytes, count: int) -> list[Any]:
    """On one connection of the pool, `count` packed calls written at once and their replies
    read in order: what a pipeline does, without the client's per-command layers (its pipeline
    queues, packs and parses each command through several calls). `bench.batch_bench`, the
    usage writer's batches: 4.2 against 17.9 us of this process's CPU per entry."""
    pool = client.connection_pool
    conn = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        results: list[Any] = []
        # One deadline for the write and all the replies: the client's own, a timeout context
        # per reply, cost 3.3 us more per entry (bench.batch_bench), and its send runs the
        # write in a task of its own (asyncio.wait_for), for every batch.
        async with asyncio.timeout(conn.socket_timeout):
            if not conn.is_connected:
                await conn.connect()
            # redis-py's send without its wait_for (a private method: redis is pinned to 8.1
            # in pyproject.toml; behind Sentinel every usage write goes through here).
            await conn._send_packed_command([packed])
            for _ in range(count):
                try:
                    results.append(await conn.read_response(timeout=math.inf))
                except ResponseError as exc:  # this call's own error; the rest go on
                    results.append(exc)
        return results
    except BaseException:
        await conn.disconnect()  # replies may be in flight: the connection is not reused
        raise
    finally:
        await pool.release(conn)


async def _pipeline(client: RedisClient, script: Script, calls: Sequence[Call]) -> list[Any]:
    def queue(pipe: Any) -> None:
        for keys, args in calls:
            script.queue(pipe, keys, args)

    return await pipeline(client, queue, [script], raise_on_error=False)
