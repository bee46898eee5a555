"""One sidecar's use of the shared store: joining it (starting it unless it runs), watching it,
and leaving it (stopping it when no other sidecar uses it)."""

from __future__ import annotations

import fcntl
import logging
import time
from pathlib import Path

from sidecar.store.embedded.datadir import (
    RESTARTS,
    STORE_LOCK,
    USERS_LOCK,
    EmbeddedStoreError,
    Lock,
    prepare,
)
from sidecar.store.embedded.process import START_TIMEOUT_S, STOP_TIMEOUT_S, StoreProcess
from sidecar.store.embedded.supervisor import StoreHealth, Supervisor, read_health

log = logging.getLogger("sidecar.store")


def embedded(data_dir: Path) -> EmbeddedRedis:
    """The store for `data_dir`, its directories made and checked; nothing started yet."""
    data_dir, socket = prepare(data_dir)
    return EmbeddedRedis(data_dir, socket)


class EmbeddedRedis:
    """One sidecar's use of the store for a data dir: `open` joins it (starting it unless it
    runs) and watches it; `close` leaves it (stopping it when no other sidecar uses it)."""

    def __init__(self, data_dir: Path, socket: Path) -> None:
        self.data_dir = data_dir
        self.socket = socket
        self._process = StoreProcess(data_dir, socket)
        self._users: Lock | None = None
        self._supervisor: Supervisor | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def _file(self, name: str) -> Path:
        return self.data_dir / name

    def health(self) -> StoreHealth:
        return read_health(self.data_dir)

    def answers(self) -> bool:
        return self._process.answers()

    def open(self, *, watch: bool = True) -> bool:
        """Use the store, starting it unless one runs; True if this call started it."""
        users = Lock(self._file(USERS_LOCK))
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
            self._supervisor = Supervisor(self._process)
            self._supervisor.start()
        return started

    def _start_or_share(self) -> bool:
        lock = Lock(self._file(STORE_LOCK))
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
            self._process.spawn(lock)
            return True
        finally:
            lock.close()

    def close(self) -> bool:
        """Stop using the store; the last sidecar to leave stops it. True if this call did."""
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.stop()
        users, self._users = self._users, None
        try:
            if users is None:
                return False
            if not users.take(fcntl.LOCK_EX):
                log.info("embedded Redis left running: other sidecars use it")
                return False
            # Held exclusively: no sidecar uses the store, and none can join or start one
            # until it is stopped.
            stopped = self._process.stop()
            self._file(RESTARTS).unlink(missing_ok=True)
            return stopped
        finally:
            if users is not None:
                users.close()
            self._process.reap()
