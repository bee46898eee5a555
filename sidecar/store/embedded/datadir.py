"""The embedded store's files under the data dir, the checks on who owns them, and the flocks
its lifecycle rests on."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import stat
import tempfile
import time
from pathlib import Path

SOCKET = "redis.sock"
STORE_LOCK = "store.lock"
USERS_LOCK = "store.users"
PIDFILE = "store.pid"
RESTARTS = "store.restarts"
LOG = "redis.log"


class EmbeddedStoreError(RuntimeError):
    pass


class Lock:
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


def prepare(data_dir: Path) -> tuple[Path, Path]:
    """The data dir and the socket's path, their directories made and checked."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    data_dir = data_dir.resolve()
    _check_dir(data_dir, "the data dir")
    socket = socket_path(data_dir)
    if socket.parent != data_dir:
        with contextlib.suppress(FileExistsError):  # a file there: refused just below
            socket.parent.mkdir(mode=0o700)
        _check_dir(socket.parent, "the embedded Redis socket's directory")
    return data_dir, socket
