"""Admission: which policy applies to a request's identity, and whether it is admitted."""

from __future__ import annotations

import re
from typing import Any

import msgspec

from sidecar.errors import Forbidden, StoreUnavailable
from sidecar.identity.identify import Identifier
from sidecar.identity.records import IdentityRecords
from sidecar.identity.resolve import Resolved, Source
from sidecar.quota.decision import BudgetSubjects, Decision, RequestId, Reserve, Subject
from sidecar.quota.limiter import Limiter
from sidecar.quota.live import LiveConfig
from sidecar.quota.policy import Dimension, Match, Policy, choose
from sidecar.quota.profiles import PolicyProfiles


class _Missing:
    """A policy that cannot be chosen before the identity's profile is read."""


MISSING = _Missing()
# A key owner that is a subject only so that it comes before the budgets among a request's
# subjects (whom a request counts for beyond its identity is read in that order): no limits.
_UNLIMITED = Policy("", Match(), (), None, "")
# With `[limits] opaque_input = "one_at_a_time"`: a request whose input its bytes do not carry
# counts against this too, under an id of its identity's own (`_opaque`), so that one such
# request per identity is in flight at a time.
OPAQUE = Policy("opaque_input", Match(), (), 1, "[limits] opaque_input")
OPAQUE_SUFFIX = ":opaque"  # its subject's id: the identity's _id and this
CHOSEN_MAX = 65_536  # identities whose policy choice is kept (Quota._chosen_by_id)


class RateLimitBody(msgspec.Struct):
    message: str
    type: str
    code: str
    param: None
    identity: str
    policy: str | None  # None when a budget refused
    dimension: str
    limit: str
    budget: str | msgspec.UnsetType = msgspec.UNSET  # the budget's _id, when one refused


class RateLimitError(msgspec.Struct):
    error: RateLimitBody


_PER = re.compile(r"\s*(?:/|\bper\b)\s*", re.IGNORECASE)


def refusal(decision: Decision, external_id: str) -> RateLimitError:
    """The 429 body, OpenAI-shaped, naming the subject that refused (the identity, the owner
    of the key it came with, or a budget), its policy or budget, the dimension and the limit."""
    assert decision.dimension is not None
    budget: str | None = None
    if decision.refused_by is not None:
        external_id, policy = decision.refused_by.external_id, decision.refused_by.policy
        budget = decision.refused_by.budget
    else:
        assert decision.policy is not None
        policy = decision.policy
    dimension = decision.dimension
    if policy is OPAQUE:
        return RateLimitError(
            RateLimitBody(
                message=(
                    "Rate limit exceeded: one request at a time whose input the sidecar cannot "
                    "estimate (an image or file by URL or id, previous_response_id, a hosted "
                    f"tool) for identity {external_id} ([limits] opaque_input)"
                ),
                type="rate_limit_error",
                code="concurrency_limit_exceeded",
                param=None,
                identity=external_id,
                policy=OPAQUE.name,
                dimension=dimension.value,
                limit="1",
            )
        )
    if decision.binding is not None:
        text = decision.binding.text
        amount, per = _PER.split(text, maxsplit=1)
        what = f"${amount}" if dimension is Dimension.COST else f"{amount} {dimension.value}"
        # A one-time budget's limit never resets: "50/one_time" is $50 in all.
        per = "in total" if decision.binding.calendar == "once" else f"per {per.strip()}"
        summary = f"{what} {per}"
    else:
        text = str(policy.concurrency)
        summary = f"{text} concurrent requests"
    whose = f"budget {budget}" if budget is not None else f"policy {policy.name}"
    return RateLimitError(
        RateLimitBody(
            message=f"Rate limit exceeded: {summary} for identity {external_id} ({whose})",
            type="rate_limit_error",
            code=f"{dimension.value}_limit_exceeded",
            param=None,
            identity=external_id,
            policy=None if budget is not None else policy.name,
            dimension=dimension.value,
            limit=text,
            budget=msgspec.UNSET if budget is None else budget,
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
        budgets: BudgetSubjects,
        *,
        deny_unpriced: bool = False,
        opaque_one_at_a_time: bool = False,
    ) -> None:
        self.live = live
        self.deny_unpriced = deny_unpriced
        self.opaque_one_at_a_time = opaque_one_at_a_time
        self.limiter = limiter
        self.records = records
        self.identifier = identifier
        self.profiles = profiles
        self.budgets = budgets
        self._reserving_for: object = None
        self._reserving = False
        # external id -> its policy, while no policy matches on tags or metadata (the choice
        # then depends on the id alone), kept for the policies of `_chosen_at` (a reload starts
        # it again, as PolicyProfiles does): on every limited request's path, where matching id
        # globs costs several times the rest of the choice.
        self._chosen: dict[str, Policy | None] = {}
        self._chosen_at = live.generation

    @property
    def active(self) -> bool:
        return self.live.limited or self.budgets.active

    @property
    def reserving(self) -> bool:
        """Whether some policy or budget limits tokens or cost: requests then reserve at
        admission."""
        policies = self.live.policies
        if policies is not self._reserving_for:
            self._reserving_for = policies
            self._reserving = any(
                limit.dimension in (Dimension.TOKENS, Dimension.COST)
                for policy in policies
                for limit in policy.limits
            )
        return self._reserving or self.budgets.charging

    def _known_policy(self, resolved: Resolved) -> Policy | _Missing | None:
        """The policy, when what it depends on is at hand (no store read), else MISSING."""
        live = self.live
        policies = live.policies
        if not policies:
            return None
        # What no policy matches on is not needed: with none matching on tags or metadata (ids
        # and catch-alls only), the profile is never read, from the body or from the store.
        if not (live.match_tags or live.match_keys):
            return self._chosen_by_id(policies, resolved.external_id)
        tags: list[str] | None = None if live.match_tags else []
        metadata: dict[str, Any] | None = None if live.match_keys else {}
        given = resolved.profile
        if given is not None:
            if tags is None and isinstance(given.tags, list):
                tags = given.tags
            if metadata is None and isinstance(given.metadata, dict):
                metadata = given.metadata
        if tags is None or metadata is None:
            cached = self.profiles.get(resolved.external_id)
            if cached is None:
                return MISSING
            tags = cached[0] if tags is None else tags
            metadata = cached[1] if metadata is None else metadata
        return choose(policies, resolved.external_id, tags, metadata)

    def _chosen_by_id(self, policies: tuple[Policy, ...], external_id: str) -> Policy | None:
        """The policy of an identity when no policy matches on tags or metadata."""
        chosen = self._chosen
        if self._chosen_at != self.live.generation or len(chosen) >= CHOSEN_MAX:
            chosen.clear()
            self._chosen_at = self.live.generation
        policy = chosen.get(external_id, MISSING)
        if isinstance(policy, _Missing):
            policy = chosen[external_id] = choose(policies, external_id, [], {})
        return policy

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

    def _known_tags(self, resolved: Resolved) -> list[str] | _Missing:
        """The identity's tags that some budget is scoped to, when at hand without a store
        read (a body identity's own, else the profile cache), else MISSING."""
        if not self.budgets.tags:
            return []
        given = resolved.profile
        if given is not None and isinstance(given.tags, list):
            return given.tags
        cached = self.profiles.get(resolved.external_id)
        return MISSING if cached is None else cached[0]

    async def _tags(self, identity_id: str, resolved: Resolved) -> list[str]:
        tags = self._known_tags(resolved)
        if isinstance(tags, _Missing):
            found = await self.records.many([identity_id])
            self.profiles.remember(
                resolved.external_id, *((found[0].tags, found[0].metadata) if found else ([], {}))
            )
            tags = self._known_tags(resolved)
            assert not isinstance(tags, _Missing)
        return tags

    async def subjects(self, resolved: Resolved, identity_id: str) -> list[Subject]:
        """Whom a request counts against: its identity (when a policy applies to it), its
        key's owner (two levels), then each budget that applies. Raises StoreUnavailable."""
        policy = await self.policy_for(identity_id, resolved)
        out = [Subject(identity_id, resolved.external_id, policy)] if policy is not None else []
        tags = await self._tags(identity_id, resolved)
        budgets = self.budgets.subjects(resolved.external_id, tags, resolved.owner)
        owner = self.owner_of(resolved)
        if owner is not None and (self.live.policies or budgets):
            owner_id = self.identifier.known(owner) or await self.identifier.identify(owner)
            owner_policy = await self.policy_for(owner_id, owner)
            if owner_policy is not None and owner_policy.limited:
                out.append(Subject(owner_id, owner.external_id, owner_policy))
            elif budgets:
                out.append(Subject(owner_id, owner.external_id, _UNLIMITED))
        return out + budgets

    def own_charges(
        self, resolved: Resolved, tokens: int, nanos: int
    ) -> dict[str, tuple[int, int]]:
        """What `tokens` and `nanos` used charge the identity's own token and cost limits, as
        far as the process knows them without a store read, by bucket: (units, lifetime); {}
        when it knows none. Not its key owner's nor its budgets': their buckets are in other
        cluster slots than the identity's usage record these charges go with."""
        known = self.identifier.known_id(resolved) if self.active else None
        subjects = self._known_subjects(resolved, known) if known is not None else None
        own = next((s for s in subjects or () if s.identity_id == known and s.policy.charged), None)
        if own is None:
            return {}
        return {bucket: (u, life) for bucket, u, life in self.limiter.charges(own, tokens, nanos)}

    def _known_subjects(self, resolved: Resolved, identity_id: str) -> list[Subject] | None:
        """`subjects`, when everything it needs is at hand without a store read."""
        policy = self._known_policy(resolved)
        if isinstance(policy, _Missing):
            return None
        out = [Subject(identity_id, resolved.external_id, policy)] if policy is not None else []
        if resolved.owner is None and not self.budgets.active:  # the common case: no one else
            return out
        tags = self._known_tags(resolved)
        if isinstance(tags, _Missing):
            return None
        budgets = self.budgets.subjects(resolved.external_id, tags, resolved.owner)
        owner = self.owner_of(resolved)
        if owner is not None and (self.live.policies or budgets):
            owner_id = self.identifier.known(owner)
            owner_policy = self._known_policy(owner) if owner_id is not None else MISSING
            if owner_id is None or isinstance(owner_policy, _Missing):
                return None
            if owner_policy is not None and owner_policy.limited:
                out.append(Subject(owner_id, owner.external_id, owner_policy))
            elif budgets:
                out.append(Subject(owner_id, owner.external_id, _UNLIMITED))
        return out + budgets

    async def admit(
        self,
        resolved: Resolved,
        request_id: RequestId,
        known: str | None,
        reserve: Reserve | None = None,
        portable: bool = False,
    ) -> tuple[str | None, Decision]:
        """The identity's `_id` (None when the store could not say) and the decision; `known`
        is the `_id` the caller already has (see Identifier.known_id); `request_id`: the
        request's id, or how to make one; `portable`: settled by a report that may come to
        another sidecar (Limiter.admit).

        Finding the identity (an upsert when it is new), its key's owner and their profiles,
        then the limit check, each give up after `timeout_ms`; then `on_error` decides, as for
        the check itself."""
        limiter = self.limiter
        if known is not None:
            subjects = self._known_subjects(resolved, known)
            if subjects is not None:  # the common case: one store call, the check
                subjects = self._checked(subjects, known, resolved, reserve)
                own = _own(subjects, known)
                return known, await limiter.admit(subjects, request_id, own, reserve, portable)
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
        subjects = self._checked(subjects, identity_id, resolved, reserve)
        own = _own(subjects, identity_id)
        return identity_id, await limiter.admit(subjects, request_id, own, reserve, portable)

    def _checked(
        self,
        subjects: list[Subject],
        identity_id: str,
        resolved: Resolved,
        reserve: Reserve | None,
    ) -> list[Subject]:
        """What is settled before a request's limits are checked: its model priced where a
        cost limit needs it (`_check_priced`), and the subjects it counts against with the
        one-at-a-time lease of opaque input (`_opaque`) when that applies."""
        if self.deny_unpriced:
            self._check_priced(subjects, reserve)
        if self.opaque_one_at_a_time and reserve is not None and reserve.opaque:
            return _opaque(subjects, identity_id, resolved)
        return subjects

    def _check_priced(self, subjects: list[Subject], reserve: Reserve | None) -> None:
        """With `[limits] unpriced = "deny"`: Forbidden when the request's model has no price
        and a cost limit applies to it (whose it is: its identity's policy, its key owner's, a
        budget). Its cost would count as 0 unless the upstream reported one: a way around the
        cost limit. Checked before anything is counted."""
        if reserve is None or reserve.priced:
            return
        for subject in subjects:
            if any(limit.dimension is Dimension.COST for limit in subject.policy.limits):
                budget = subject.budget
                whose = f"budget {budget}" if budget else f"policy {subject.policy.name}"
                raise Forbidden(
                    "this request's model has no price the sidecar knows, and a cost limit "
                    f"({whose}) applies to identity {subject.external_id}: add the model to "
                    "[pricing.models], or see [limits] unpriced",
                    param="model",
                    code="model_unpriced",
                )


def _opaque(subjects: list[Subject], identity_id: str, resolved: Resolved) -> list[Subject]:
    """`subjects`, and, when a token or cost limit applies to the request, the lease set of one
    that lets one request with input its estimate cannot see be in flight per identity: its
    estimate may fall short by any amount, and the SPEC bounds what concurrent requests may go
    past a limit by one request's error."""
    if not any(subject.policy.charged for subject in subjects):
        return subjects
    return [*subjects, Subject(identity_id + OPAQUE_SUFFIX, resolved.external_id, OPAQUE)]


def _own(subjects: list[Subject], identity_id: str) -> Policy | None:
    """The identity's own policy among a request's subjects."""
    return subjects[0].policy if subjects and subjects[0].identity_id == identity_id else None
