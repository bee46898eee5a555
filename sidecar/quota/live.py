"""The parts of the config that change without a restart: the policies and the API keys.

Reloaded on SIGHUP and whenever a policy file or the config file changes; a set that does not
load keeps the last good one, and is logged and counted. Everything that reads these reads them
from here, at the time of use."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

from sidecar.identity.model import normalizer
from sidecar.identity.resolve import Grant
from sidecar.quota import loader
from sidecar.quota.policy import Policy
from sidecar.settings import ApiKeyOwner, ConfigError, Settings, load

log = logging.getLogger("sidecar.quota")


class LiveConfig:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.policies: tuple[Policy, ...] = loader.load(
            settings.policies.paths, settings.base_dir
        ).policies
        self.keys = _grants(settings.api_keys, settings.identity.normalize)
        self.reloads = 0
        self.reload_errors = 0
        self.match_tags: frozenset[str] = frozenset()
        self.match_keys: frozenset[str] = frozenset()
        self.generation = 0  # bumped at each reload: caches of matches are dropped
        self._derive()
        self._stamp = self._files_stamp()

    def _derive(self) -> None:
        self.match_tags = frozenset(t for p in self.policies for t in p.match.tags)
        self.match_keys = frozenset(k for p in self.policies for k in p.match.metadata)
        self.limited = any(p.limited for p in self.policies)

    def grant(self, digest: str) -> Grant | None:
        """The listed key with this SHA-256 (hex), if any."""
        return self.keys.get(digest)

    @property
    def owners(self) -> list[str]:
        """Every key owner, once, in the order the config lists them."""
        return list(dict.fromkeys(grant.owner for grant in self.keys.values()))

    def _files_stamp(self) -> tuple[tuple[str, float], ...]:
        files = [
            str(f)
            for f in loader.policy_files(self.settings.policies.paths, self.settings.base_dir)
        ]
        if self.settings.source != "<defaults>":
            files.append(self.settings.source)
        stamp = []
        for name in files:
            try:
                stamp.append((name, os.stat(name).st_mtime))
            except OSError:
                stamp.append((name, -1.0))
        return tuple(stamp)

    def reload(self) -> bool:
        """Read the config's api_keys and the policy files again; a bad set keeps the last
        good one, is logged and counted."""
        self._stamp = self._files_stamp()
        try:
            settings = (
                load(self.settings.source)
                if self.settings.source != "<defaults>"
                else self.settings
            )
            policies = loader.load(settings.policies.paths, settings.base_dir).policies
        except ConfigError as exc:
            self.reload_errors += 1
            for problem in exc.problems:
                log.error("reload refused, keeping the last good policies: %s", problem)
            return False
        self.policies = policies
        self.keys = _grants(settings.api_keys, settings.identity.normalize)
        self.settings = settings
        self._derive()
        self.generation += 1
        self.reloads += 1
        log.info("reloaded %d policies", len(policies))
        return True

    async def watch(self, interval: float = 1.0) -> None:
        """Reload on SIGHUP and whenever a policy file or the config file changes."""
        hangup = asyncio.Event()
        loop = asyncio.get_running_loop()
        # Not possible off the main thread (tests): file changes still reload.
        with contextlib.suppress(RuntimeError, NotImplementedError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, hangup.set)
        try:
            while True:
                try:
                    # Not wait_for: see budgets/notify.py (a cancellation it could swallow).
                    async with asyncio.timeout(interval):
                        await hangup.wait()
                except TimeoutError:
                    if self._files_stamp() == self._stamp:
                        continue
                hangup.clear()
                self.reload()
        finally:
            with contextlib.suppress(RuntimeError, NotImplementedError, ValueError):
                loop.remove_signal_handler(signal.SIGHUP)


def _grants(keys: list[ApiKeyOwner], normalize: str) -> dict[str, Grant]:
    """The listed keys; their owners are external ids, normalized as every other one."""
    owner = normalizer(normalize)
    return {k.sha256: Grant(owner(k.owner), tuple(k.may_assert)) for k in keys}
