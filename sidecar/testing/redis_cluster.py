"""Real multi-process Redis topologies on loopback: a Redis Cluster, and a Sentinel set.

Every process is started with PR_SET_PDEATHSIG, so that it dies with the test process even when
that one is killed before its fixtures can stop anything; `stop()` ends them in the normal case.
Spawn them from the main thread: the signal fires when the spawning thread ends.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from redis.crc import key_slot

from sidecar.testing.redis_server import free_port, redis_binary

_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def until(what: str, ready: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """Poll `ready` until it returns something truthy; its errors count as not ready yet."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            result = ready()
            if result:
                return result
        except (redis.RedisError, OSError) as exc:
            last = exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s (last error: {last!r})")
        time.sleep(interval)


def _client(port: int) -> redis.Redis:
    return redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=2, decode_responses=True)


def _call(port: int, *args: Any) -> Any:
    with _client(port) as client:
        return client.execute_command(*args)


@dataclass
class Process:
    """One redis-server (or sentinel) process with its own folder and log."""

    port: int
    directory: Path
    args: list[str] = field(default_factory=list)
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.popen = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,  # spawned from the main thread: see the module doc
        )

    def wait_up(self, timeout: float = 10) -> None:
        def up() -> bool:
            assert self.popen is not None
            if self.popen.poll() is not None:
                raise RuntimeError(f"redis on {self.port} exited; see {self.directory}")
            return bool(_call(self.port, "PING"))

        until(f"redis on port {self.port}", up, timeout)

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGCONT)
            self.popen.kill()
        if self.popen is not None:
            self.popen.wait()


def _server_args(port: int, directory: Path, *extra: str) -> list[str]:
    return [
        redis_binary(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(directory),
        "--logfile",
        str(directory / "redis.log"),
        "--save",
        "",
        "--appendonly",
        "yes",
        # A replica syncs at once instead of waiting 5 s for others to share the transfer.
        "--repl-diskless-sync",
        "yes",
        "--repl-diskless-sync-delay",
        "0",
        *extra,
    ]


def info(port: int, section: str) -> dict[str, str]:
    """An INFO section as text fields."""
    with _client(port) as client:
        raw = client.execute_command("INFO", section)
    return {str(k): str(v) for k, v in raw.items()}


@dataclass(frozen=True)
class ClusterNode:
    node_id: str
    port: int
    flags: frozenset[str]
    master_id: str | None
    slots: tuple[tuple[int, int], ...]

    @property
    def is_master(self) -> bool:
        return "master" in self.flags and not self.failed

    @property
    def failed(self) -> bool:
        return bool(self.flags & {"fail", "fail?", "noaddr"})

    def owns(self, slot: int) -> bool:
        return any(first <= slot <= last for first, last in self.slots)


def parse_cluster_nodes(text: str) -> list[ClusterNode]:
    nodes = []
    for line in text.splitlines():
        if not line.strip():
            continue
        node_id, address, flags, master, _ping, _pong, _epoch, _link, *slots = line.split()
        port = int(address.split("@")[0].rpartition(":")[2])
        ranges = []
        for item in slots:
            if item.startswith("["):
                continue  # a slot being migrated or imported
            first, _, last = item.partition("-")
            ranges.append((int(first), int(last or first)))
        nodes.append(
            ClusterNode(
                node_id=node_id,
                port=port,
                flags=frozenset(flags.split(",")),
                master_id=None if master == "-" else master,
                slots=tuple(ranges),
            )
        )
    return nodes


class LocalCluster:
    """`masters` masters with `replicas` replicas each, made by `redis-cli --cluster create`."""

    SLOTS = 16384

    def __init__(
        self, directory: Path, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 1000
    ) -> None:
        self.directory = directory
        self.masters = masters
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.nodes: dict[int, Process] = {}
        for _ in range(masters * (1 + replicas)):
            port, bus = free_port(), free_port()
            folder = directory / f"node-{port}"
            self.nodes[port] = Process(
                port,
                folder,
                _server_args(
                    port,
                    folder,
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(folder / "nodes.conf"),
                    "--cluster-node-timeout",
                    str(node_timeout_ms),
                    "--cluster-port",
                    str(bus),
                    # A replica may take over however long it was cut off from its master.
                    "--cluster-replica-validity-factor",
                    "0",
                ),
            )

    @property
    def url(self) -> str:
        """Two startup nodes, as a deployment would list a few; the rest are discovered."""
        first, second = list(self.nodes)[:2]
        return f"redis+cluster://127.0.0.1:{first},127.0.0.1:{second}"

    def start(self, timeout: float = 30) -> None:
        try:
            for node in self.nodes.values():
                node.start()
            for node in self.nodes.values():
                node.wait_up()
            create = [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{port}" for port in self.nodes),
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ]
            done = subprocess.run(create, capture_output=True, timeout=timeout, check=False)
            if done.returncode != 0:
                output = (done.stdout + done.stderr).decode(errors="replace")
                raise RuntimeError(f"redis-cli --cluster create failed:\n{output}")
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for node in self.nodes.values():
            node.kill()

    # -- topology ----------------------------------------------------------------------------

    def alive(self) -> list[int]:
        return [port for port, node in self.nodes.items() if node.alive]

    def topology(self, port: int | None = None) -> list[ClusterNode]:
        """CLUSTER NODES as `port` (default: the first live node) sees it."""
        port = port if port is not None else self.alive()[0]
        return parse_cluster_nodes(_call(port, "CLUSTER", "NODES"))

    def master_ports(self) -> list[int]:
        return [n.port for n in self.topology() if n.is_master and n.slots]

    def master_of(self, key: str) -> int:
        """The port of the master that serves the key's slot."""
        slot = key_slot(key.encode())
        for node in self.topology():
            if node.is_master and node.owns(slot):
                return node.port
        raise LookupError(f"no master serves slot {slot}")

    def replica_of(self, master_port: int) -> int:
        nodes = self.topology()
        master = next(n for n in nodes if n.port == master_port)
        for node in nodes:
            if node.master_id == master.node_id and not node.failed:
                return node.port
        raise LookupError(f"master {master_port} has no live replica")

    def wait_healthy(self, timeout: float = 30) -> None:
        """Every live node says cluster_state:ok and agrees on the masters; replicas in sync."""
        live = self.alive()

        def healthy() -> bool:
            views = set()
            for port in live:
                state = _call(port, "CLUSTER", "INFO")
                if "cluster_state:ok" not in state or f"cluster_slots_ok:{self.SLOTS}" not in state:
                    return False
                nodes = self.topology(port)
                views.add(tuple(sorted((n.port, n.slots) for n in nodes if n.is_master)))
                me = next(n for n in nodes if "myself" in n.flags)
                if not me.is_master:
                    replication = info(port, "replication")
                    if replication.get("master_link_status") != "up":
                        return False
                    if replication.get("master_sync_in_progress") != "0":
                        return False
            return len(views) == 1

        until("cluster healthy", healthy, timeout)

    # -- operations --------------------------------------------------------------------------

    def keys(self, pattern: str = "*") -> dict[str, int]:
        """Every key matching `pattern`, with the port of the master holding it."""
        return {key: port for port in self.master_ports() for key in _call(port, "KEYS", pattern)}

    def call(self, key: str, *args: Any) -> Any:
        """A command run on the master that serves `key` (given as an argument too)."""
        return _call(self.master_of(key), *args)

    def flushall(self) -> None:
        for port in self.master_ports():
            _call(port, "FLUSHALL")

    def wait_replicated(self, timeout_ms: int = 2000) -> None:
        """WAIT on every master until its replicas acknowledged everything written so far."""
        nodes = self.topology()
        for master in (n for n in nodes if n.is_master and n.slots):
            expected = sum(1 for n in nodes if n.master_id == master.node_id and not n.failed)
            acked = int(_call(master.port, "WAIT", str(expected), str(timeout_ms)))
            if acked < expected:
                raise AssertionError(f"master {master.port}: {acked} of {expected} replicas")

    def kill(self, port: int) -> None:
        self.nodes[port].kill()

    def fail_over(self, master_port: int, timeout: float = 20) -> int:
        """SIGKILL the master; return its replica's port once promoted and the cluster is ok."""
        replica = self.replica_of(master_port)
        self.kill(master_port)
        self.wait_promoted(replica, timeout)
        return replica

    def wait_promoted(self, replica: int, timeout: float = 20) -> None:
        def promoted() -> bool:
            return all(
                any(n.port == replica and n.is_master and n.slots for n in self.topology(port))
                for port in self.alive()
            )

        until(f"replica {replica} promoted", promoted, timeout)
        self.wait_healthy(timeout)

    def revive(self, port: int, timeout: float = 30) -> None:
        """Restart a killed node: it rejoins as a replica of whoever took its slots."""
        node = self.nodes[port]
        node.start()
        node.wait_up()

        def rejoined() -> bool:
            me = next(n for n in self.topology(port) if "myself" in n.flags)
            return me.master_id is not None

        until(f"node {port} rejoined as a replica", rejoined, timeout)
        self.wait_healthy(timeout)


class SentinelSet:
    """One master, one replica and three sentinels (quorum 2) watching them."""

    def __init__(
        self,
        directory: Path,
        service: str = "sidecar-test",
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
    ) -> None:
        self.directory = directory
        self.service = service
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        master_port, replica_port = free_port(), free_port()
        self.servers: dict[int, Process] = {
            master_port: Process(
                master_port, directory / "a", _server_args(master_port, directory / "a")
            ),
            replica_port: Process(
                replica_port,
                directory / "b",
                _server_args(
                    replica_port, directory / "b", "--replicaof", "127.0.0.1", str(master_port)
                ),
            ),
        }
        self.first_master = master_port
        self.sentinels: dict[int, Process] = {}
        for n in range(3):
            port = free_port()
            folder = directory / f"sentinel-{n}"
            self.sentinels[port] = Process(
                port, folder, [redis_binary(), str(folder / "sentinel.conf"), "--sentinel"]
            )

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}"

    def _write_conf(self, sentinel: Process) -> None:
        sentinel.directory.mkdir(parents=True, exist_ok=True)
        name = self.service
        (sentinel.directory / "sentinel.conf").write_text(
            f"port {sentinel.port}\n"
            "bind 127.0.0.1\n"
            "daemonize no\n"
            f"dir {sentinel.directory}\n"
            f"logfile {sentinel.directory / 'sentinel.log'}\n"
            f"sentinel monitor {name} 127.0.0.1 {self.first_master} 2\n"
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}\n"
            f"sentinel failover-timeout {name} {self.failover_timeout_ms}\n"
            f"sentinel parallel-syncs {name} 1\n"
        )

    def start(self, timeout: float = 30) -> None:
        try:
            for server in self.servers.values():
                server.start()
            for server in self.servers.values():
                server.wait_up()
            until("replica in sync", lambda: self._in_sync(self.first_master), timeout)
            for sentinel in self.sentinels.values():
                self._write_conf(sentinel)
                sentinel.start()
            for sentinel in self.sentinels.values():
                sentinel.wait_up()
            until("sentinels agree", lambda: self._settled(self.first_master), timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for process in [*self.sentinels.values(), *self.servers.values()]:
            process.kill()

    def master_port(self, sentinel: int | None = None) -> int:
        """The master as a sentinel (default: the first live one) names it."""
        sentinel = sentinel if sentinel is not None else self._live_sentinels()[0]
        _host, port = _call(sentinel, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        return int(port)

    def other(self, port: int) -> int:
        return next(p for p in self.servers if p != port)

    def _live_sentinels(self) -> list[int]:
        return [port for port, process in self.sentinels.items() if process.alive]

    def _in_sync(self, master: int) -> bool:
        replica = self.other(master)
        replication = info(replica, "replication")
        return (
            replication.get("master_port") == str(master)
            and replication.get("master_link_status") == "up"
            and replication.get("master_sync_in_progress") == "0"
        )

    def _settled(self, master: int, with_replica: bool = True) -> bool:
        """Every sentinel names `master`, knows the other two and (optionally) the replica."""
        for sentinel in self._live_sentinels():
            if self.master_port(sentinel) != master:
                return False
            fields = _call(sentinel, "SENTINEL", "MASTER", self.service)
            if not isinstance(fields, dict):  # redis-py parses this reply in some versions
                fields = dict(zip(fields[::2], fields[1::2], strict=True))
            if "s_down" in str(fields["flags"]) or "o_down" in str(fields["flags"]):
                return False
            if int(fields["num-other-sentinels"]) != len(self._live_sentinels()) - 1:
                return False
            if with_replica and int(fields["num-slaves"]) < 1:
                return False
        return True

    def wait_replicated(self, timeout_ms: int = 2000) -> None:
        master = self.master_port()
        acked = int(_call(master, "WAIT", "1", str(timeout_ms)))
        if acked < 1:
            raise AssertionError(f"master {master}: the replica did not catch up")

    def failover(self, timeout: float = 30) -> int:
        """SENTINEL FAILOVER; return the new master once every sentinel names it.

        The old master goes on answering as a master (and accepting writes) until Sentinel
        demotes it, some 10 s later: see `wait_demoted`."""
        old = self.master_port()
        _call(self._live_sentinels()[0], "SENTINEL", "FAILOVER", self.service)
        new = self.other(old)
        until("sentinels name the new master", lambda: self._settled(new, False), timeout)
        return new

    def wait_demoted(self, old: int, timeout: float = 30) -> None:
        """Until the old master replicates from the new one, in sync."""
        until("old master follows the new one", lambda: self._in_sync(self.other(old)), timeout)

    def kill(self, port: int) -> None:
        self.servers[port].kill()

    def wait_master(self, new: int, timeout: float = 30) -> None:
        """Until every sentinel names `new`, and it answers as a master."""
        until("sentinels name the new master", lambda: self._settled(new, False), timeout)
        until("the new master answers as one", lambda: role(new) == "master", timeout)


def role(port: int) -> str:
    return info(port, "replication")["role"]
