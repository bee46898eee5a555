from __future__ import annotations

from importlib import resources
from typing import Any

from redis.exceptions import NoScriptError

from sidecar.store.connect import RedisClient


class Script:
    """A Lua script shipped as package data, loaded once, run by SHA."""

    def __init__(self, package: str, name: str, *, prelude: str | None = None) -> None:
        """`prelude` ("package/name") is Lua that the script's source starts with."""
        self.name = name
        self.source = resources.files(package).joinpath(f"{name}.lua").read_text("utf-8")
        if prelude is not None:
            where, _, what = prelude.rpartition("/")
            head = resources.files(where).joinpath(f"{what}.lua").read_text("utf-8")
            self.source = head + "\n" + self.source
        self.sha: str | None = None

    async def load(self, client: RedisClient) -> None:
        self.sha = await client.script_load(self.source)

    async def __call__(self, client: RedisClient, keys: list[str], args: list[Any]) -> Any:
        if self.sha is None:
            await self.load(client)
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)  # type: ignore[arg-type]
        except NoScriptError:
            # The server restarted or was flushed since we loaded it.
            await self.load(client)
            return await client.evalsha(self.sha, len(keys), *keys, *args)  # type: ignore[arg-type]

    def queue(self, pipe: Any, keys: list[str], args: list[Any]) -> None:
        """Add to a pipeline; the caller reloads and retries on NoScriptError."""
        assert self.sha is not None, f"script {self.name} not loaded"
        # Not pipe.evalsha(): redis-py's cluster pipeline refuses that method, though it routes
        # the command by its keys (all in one slot here) like any other.
        pipe.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
