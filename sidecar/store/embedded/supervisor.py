"""Watching the store: when its process dies the store lock frees, and the watcher that takes
the lock restarts it (so with several sidecars exactly one does) and counts the restart."""

from __future__ import annotations

import fcntl
import logging
import threading
import time
from pathlib import Path

import msgspec

from sidecar.store.embedded.datadir import RESTARTS, STORE_LOCK, EmbeddedStoreError, Lock
from sidecar.store.embedded.process import StoreProcess

log = logging.getLogger("sidecar.store")

WATCH_INTERVAL_S = 0.2
RETRY_MAX_S = 30.0  # between attempts to restart a store that will not start


class StoreHealth(msgspec.Struct):
    """Restarts of the embedded store since the first of the sidecars now using it started it."""

    restarts: int = 0
    last_restart: str | None = None  # UTC, RFC 3339


def read_health(data_dir: Path) -> StoreHealth:
    try:
        return msgspec.json.decode((data_dir / RESTARTS).read_bytes(), type=StoreHealth)
    except (OSError, msgspec.DecodeError):
        return StoreHealth()


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Supervisor:
    """A thread that restarts the store whenever it finds it dead, until stopped."""

    def __init__(self, process: StoreProcess) -> None:
        self._process = process
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._watch, name="embedded-redis-watch", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()

    def _watch(self) -> None:
        process = self._process
        lock = Lock(process.file(STORE_LOCK))
        pause = WATCH_INTERVAL_S
        try:
            while not self._stopping.wait(pause):
                process.reap()
                if not lock.take(fcntl.LOCK_EX):
                    continue
                # No store process: it died. This sidecar holds its lock, so only this one
                # restarts it; the others find it running again.
                process.reap()  # a store this process started: how it ended
                try:
                    if not process.answers():  # (one holding no lock: _start_or_share)
                        self._restart(lock)
                    pause = WATCH_INTERVAL_S
                except (EmbeddedStoreError, OSError) as exc:
                    pause = min(max(pause * 2, 1.0), RETRY_MAX_S)
                    log.error(
                        "embedded Redis on %s is down and did not restart: %s; trying again "
                        "in %g s",
                        process.socket,
                        exc,
                        pause,
                    )
                finally:
                    lock.close()
        finally:
            lock.close()

    def _restart(self, lock: Lock) -> None:
        process = self._process
        how = process.how_it_ended()
        process.spawn(lock)
        # Still under the store lock (this process's copy is open): one writer at a time.
        health = read_health(process.data_dir)
        health = StoreHealth(health.restarts + 1, _utc_now())
        temporary = process.file(RESTARTS + ".tmp")
        temporary.write_bytes(msgspec.json.encode(health))
        temporary.replace(process.file(RESTARTS))
        log.warning(
            "embedded Redis on %s %s; restarted it with the data in %s (restart %d)",
            process.socket,
            how,
            process.data_dir,
            health.restarts,
        )
