from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from sidecar.identity.resolve import Resolved
from sidecar.identity.store import IdentityStore
from sidecar.quota import loader
from sidecar.quota.limiter import Decision, Limiter
from sidecar.quota.policy import Dimension, Policy, choose
from sidecar.settings import ConfigError, Settings, load
from sidecar.store.errors import STORE_OR_TIMEOUT

log = logging.getLogger("sidecar.quota")

Clock = Callable[[], float]
Identify = Callable[[Resolved], Awaitable[str]]


class _Missing:
    """A policy that cannot be chosen before the identity's profile is read."""


MISSING = _Missing()
PROFILE_TTL_S = 10.0  # how long a process matches policies on a profile it read
_PROFILES = 65_536


class RateLimitBody(msgspec.Struct):
    message: str
    type: str
    code: str
    param: None
    identity: str
    policy: str
    dimension: str
    limit: str


class RateLimitError(msgspec.Struct):
    error: RateLimitBody


_PER = re.compile(r"\s*(?:/|\bper\b)\s*", re.IGNORECASE)


def refusal(decision: Decision, external_id: str) -> RateLimitError:
    """The 429 body, OpenAI-shaped, naming the identity, policy, dimension and limit."""
    assert decision.policy is not None and decision.dimension is not None
    dimension = decision.dimension
    if decision.binding is not None:
        text = decision.binding.text
        amount, per = _PER.split(text, maxsplit=1)
        what = f"${amount}" if dimension is Dimension.COST else f"{amount} {dimension.value}"
        summary = f"{what} per {per.strip()}"
    else:
        text = str(decision.policy.concurrency)
        summary = f"{text} concurrent requests"
    return RateLimitError(
        RateLimitBody(
            message=f"Rate limit exceeded: {summary} for identity {external_id} "
            f"(policy {decision.policy.name})",
            type="rate_limit_error",
            code=f"{dimension.value}_limit_exceeded",
            param=None,
            identity=external_id,
            policy=decision.policy.name,
            dimension=dimension.value,
            limit=text,
        )
    )


class Quota:
    """The policies in force, and the limit checks that follow from them."""

    def __init__(
        self,
        settings: Settings,
        limiter: Limiter,
        store: IdentityStore,
        clock: Clock = time.time,
        on_reload: Callable[[Settings], None] | None = None,
    ) -> None:
        self.settings = settings
        self.limiter = limiter
        self.store = store
        self.clock = clock
        self.on_reload = on_reload
        self.policies = loader.load(settings.policies.paths, settings.base_dir).policies
        self.reload_errors = 0
        self.reloads = 0
        self._profiles: dict[str, tuple[list[str], dict[str, Any], float]] = {}
        self._match_tags: frozenset[str] = frozenset()
        self._match_keys: frozenset[str] = frozenset()
        self._matching()
        self._stamp = self._files_stamp()

    def _matching(self) -> None:
        self._match_tags = frozenset(t for p in self.policies for t in p.match.tags)
        self._match_keys = frozenset(k for p in self.policies for k in p.match.metadata)

    @property
    def active(self) -> bool:
        return any(p.limited for p in self.policies)

    def remember_profile(self, external_id: str, tags: list[str], metadata: dict[str, Any]) -> None:
        # Only what some policy matches on is kept: a profile's other tags and metadata (up to
        # tens of KB) would make the cache's memory depend on what clients send.
        tags = [t for t in tags if t in self._match_tags]
        metadata = {k: v for k, v in metadata.items() if k in self._match_keys}
        self._profiles[external_id] = (tags, metadata, self.clock() + PROFILE_TTL_S)
        if len(self._profiles) > _PROFILES:
            del self._profiles[next(iter(self._profiles))]

    def _known_policy(self, resolved: Resolved) -> Policy | _Missing | None:
        """The policy, when what it depends on is at hand (no store read), else MISSING."""
        if not self.policies:
            return None
        given = resolved.profile
        tags: list[str] | None = None
        metadata: dict[str, Any] | None = None
        if given is not None:
            tags = given.tags if isinstance(given.tags, list) else None
            metadata = given.metadata if isinstance(given.metadata, dict) else None
        if tags is None or metadata is None:
            cached = self._profiles.get(resolved.external_id)
            if cached is None or cached[2] < self.clock():
                return MISSING
            tags = cached[0] if tags is None else tags
            metadata = cached[1] if metadata is None else metadata
        return choose(self.policies, resolved.external_id, tags, metadata)

    async def policy_for(self, identity_id: str, resolved: Resolved) -> Policy | None:
        """The first policy matching the identity as stored, with what this request's body
        identity sets (tags and metadata it brings replace the stored ones)."""
        policy = self._known_policy(resolved)
        if not isinstance(policy, _Missing):
            return policy
        record = await self.store.get(identity_id)
        stored = (record.tags, record.metadata) if record is not None else ([], {})
        self.remember_profile(resolved.external_id, *stored)
        policy = self._known_policy(resolved)
        assert not isinstance(policy, _Missing)
        return policy

    async def admit_request(
        self, resolved: Resolved, known: str | None, identify: Identify, request_id: str
    ) -> tuple[str | None, Decision]:
        """The identity's `_id` (None when the store could not say) and the decision.

        Finding the identity (an upsert when it is new) and its profile, then the limit check,
        each give up after `timeout_ms`; then `on_error` decides, as for the check itself."""
        limiter = self.limiter
        if known is not None:
            policy = self._known_policy(resolved)
            if not isinstance(policy, _Missing):  # the common case: one store call, the check
                return known, await limiter.admit(known, policy, request_id)
        if known is None and not limiter.breaker.allow():
            return None, limiter.unavailable(None)
        try:
            async with asyncio.timeout(limiter.timeout):
                identity_id = known or await identify(resolved)
                policy = await self.policy_for(identity_id, resolved)
        except STORE_OR_TIMEOUT as exc:
            limiter.failed(exc)
            return known, limiter.unavailable(None)
        if known is None:
            limiter.breaker.success()
        return identity_id, await limiter.admit(identity_id, policy, request_id)

    # -- reloading -----------------------------------------------------------------------

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
        self._matching()
        self._profiles.clear()  # kept for the old policies' matches
        self.settings = settings
        self.reloads += 1
        if self.on_reload is not None:
            self.on_reload(settings)
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
                    await asyncio.wait_for(hangup.wait(), interval)
                except TimeoutError:
                    if self._files_stamp() == self._stamp:
                        continue
                hangup.clear()
                self.reload()
        finally:
            with contextlib.suppress(RuntimeError, NotImplementedError, ValueError):
                loop.remove_signal_handler(signal.SIGHUP)
