"""Admission: which policy applies to a request's identity, and whether it is admitted."""

from __future__ import annotations

import re
from typing import Any

import msgspec

from sidecar.errors import StoreUnavailable
from sidecar.identity.identify import Identifier
from sidecar.identity.records import IdentityRecords
from sidecar.identity.resolve import Resolved, Source
from sidecar.quota.decision import Decision, Reserve, Subject
from sidecar.quota.limiter import Limiter
from sidecar.quota.live import LiveConfig
from sidecar.quota.policy import Dimension, Policy, choose
from sidecar.quota.profiles import PolicyProfiles


class _Missing:
    """A policy that cannot be chosen before the identity's profile is read."""


MISSING = _Missing()


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
    """The 429 body, OpenAI-shaped, naming the subject that refused (the identity, or the
    owner of the key it came with), its policy, the dimension and the limit."""
    assert decision.dimension is not None
    if decision.refused_by is not None:
        external_id, policy = decision.refused_by.external_id, decision.refused_by.policy
    else:
        assert decision.policy is not None
        policy = decision.policy
    dimension = decision.dimension
    if decision.binding is not None:
        text = decision.binding.text
        amount, per = _PER.split(text, maxsplit=1)
        what = f"${amount}" if dimension is Dimension.COST else f"{amount} {dimension.value}"
        summary = f"{what} per {per.strip()}"
    else:
        text = str(policy.concurrency)
        summary = f"{text} concurrent requests"
    return RateLimitError(
        RateLimitBody(
            message=f"Rate limit exceeded: {summary} for identity {external_id} "
            f"(policy {policy.name})",
            type="rate_limit_error",
            code=f"{dimension.value}_limit_exceeded",
            param=None,
            identity=external_id,
            policy=policy.name,
            dimension=dimension.value,
            limit=text,
        )
    )


class Quota:
    """The policies in force, and the limit checks that follow from them."""

    def __init__(
        self,
        live: LiveConfig,
        limiter: Limiter,
        records: IdentityRecords,
        identifier: Identifier,
        profiles: PolicyProfiles,
    ) -> None:
        self.live = live
        self.limiter = limiter
        self.records = records
        self.identifier = identifier
        self.profiles = profiles
        self._reserving_for: object = None
        self._reserving = False

    @property
    def active(self) -> bool:
        return self.live.limited

    @property
    def reserving(self) -> bool:
        """Whether some policy limits tokens or cost: requests then reserve at admission."""
        policies = self.live.policies
        if policies is not self._reserving_for:
            self._reserving_for = policies
            self._reserving = any(
                limit.dimension in (Dimension.TOKENS, Dimension.COST)
                for policy in policies
                for limit in policy.limits
            )
        return self._reserving

    def _known_policy(self, resolved: Resolved) -> Policy | _Missing | None:
        """The policy, when what it depends on is at hand (no store read), else MISSING."""
        policies = self.live.policies
        if not policies:
            return None
        given = resolved.profile
        tags: list[str] | None = None
        metadata: dict[str, Any] | None = None
        if given is not None:
            tags = given.tags if isinstance(given.tags, list) else None
            metadata = given.metadata if isinstance(given.metadata, dict) else None
        if tags is None or metadata is None:
            cached = self.profiles.get(resolved.external_id)
            if cached is None:
                return MISSING
            tags = cached[0] if tags is None else tags
            metadata = cached[1] if metadata is None else metadata
        return choose(policies, resolved.external_id, tags, metadata)

    async def policy_for(self, identity_id: str, resolved: Resolved) -> Policy | None:
        """The first policy matching the identity as stored, with what this request's body
        identity sets (tags and metadata it brings replace the stored ones)."""
        policy = self._known_policy(resolved)
        if not isinstance(policy, _Missing):
            return policy
        found = await self.records.many([identity_id])
        stored = (found[0].tags, found[0].metadata) if found else ([], {})
        self.profiles.remember(resolved.external_id, *stored)
        policy = self._known_policy(resolved)
        assert not isinstance(policy, _Missing)
        return policy

    def owner_of(self, resolved: Resolved) -> Resolved | None:
        """The second subject of a request: the owner of the listed key it carries, when that is
        not the identity itself."""
        owner = resolved.owner
        if owner is None or owner == resolved.external_id:
            return None
        # Listed in the config: its record is not counted against any creation cap.
        return Resolved(owner, Source.API_KEY, owner=owner)

    async def subjects(self, resolved: Resolved, identity_id: str) -> list[Subject]:
        """Whom a request counts against: its identity (when a policy applies to it), then its
        key's owner (two levels). Raises StoreUnavailable."""
        policy = await self.policy_for(identity_id, resolved)
        out = [Subject(identity_id, resolved.external_id, policy)] if policy is not None else []
        owner = self.owner_of(resolved)
        if owner is not None and self.live.policies:
            owner_id = self.identifier.known(owner) or await self.identifier.identify(owner)
            owner_policy = await self.policy_for(owner_id, owner)
            if owner_policy is not None and owner_policy.limited:
                out.append(Subject(owner_id, owner.external_id, owner_policy))
        return out

    def _known_subjects(self, resolved: Resolved, identity_id: str) -> list[Subject] | None:
        """`subjects`, when everything it needs is at hand without a store read."""
        policy = self._known_policy(resolved)
        if isinstance(policy, _Missing):
            return None
        out = [Subject(identity_id, resolved.external_id, policy)] if policy is not None else []
        owner = self.owner_of(resolved)
        if owner is not None and self.live.policies:
            owner_id = self.identifier.known(owner)
            owner_policy = self._known_policy(owner) if owner_id is not None else MISSING
            if owner_id is None or isinstance(owner_policy, _Missing):
                return None
            if owner_policy is not None and owner_policy.limited:
                out.append(Subject(owner_id, owner.external_id, owner_policy))
        return out

    async def admit(
        self,
        resolved: Resolved,
        request_id: str,
        known: str | None,
        reserve: Reserve | None = None,
    ) -> tuple[str | None, Decision]:
        """The identity's `_id` (None when the store could not say) and the decision; `known`
        is the `_id` the caller already has (see Identifier.cached).

        Finding the identity (an upsert when it is new), its key's owner and their profiles,
        then the limit check, each give up after `timeout_ms`; then `on_error` decides, as for
        the check itself."""
        limiter = self.limiter
        if known is not None:
            subjects = self._known_subjects(resolved, known)
            if subjects is not None:  # the common case: one store call, the check
                own = _own(subjects, known)
                return known, await limiter.admit(subjects, request_id, own, reserve)
        if known is None and not limiter.breaker.allow():
            return None, limiter.unavailable(None)
        try:
            async with limiter.deadline():
                identity_id = known or await self.identifier.identify(resolved)
                subjects = await self.subjects(resolved, identity_id)
        except (StoreUnavailable, TimeoutError) as exc:
            limiter.failed(exc)
            return known, limiter.unavailable(None)
        if known is None:
            limiter.breaker.success()
        own = _own(subjects, identity_id)
        return identity_id, await limiter.admit(subjects, request_id, own, reserve)


def _own(subjects: list[Subject], identity_id: str) -> Policy | None:
    """The identity's own policy among a request's subjects."""
    return subjects[0].policy if subjects and subjects[0].identity_id == identity_id else None
