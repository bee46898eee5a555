"""What a limit check decides, and about whom."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import msgspec

from sidecar.quota.allowances import Lent
from sidecar.quota.policy import Dimension, Limit, Policy


class Subject(NamedTuple):
    """Someone a request counts against: its identity, the owner of the API key it carries
    when that is someone else (two levels), and each runtime budget that applies. A budget's
    `identity_id` is its `_id` (its buckets are keyed by it), its `external_id` the identity
    it gates (the request's, or the key owner's), and its policy is made from its limits."""

    identity_id: str
    external_id: str
    policy: Policy
    budget: str | None = None  # the budget's _id, when the subject is one


class BudgetSubjects(Protocol):
    """The runtime budgets in force (sidecar.budgets.service.Budgets), as admission sees them."""

    @property
    def active(self) -> bool:
        """Whether any budget is in force."""
        ...

    @property
    def tags(self) -> frozenset[str]:
        """The tags some budget in force is scoped to."""
        ...

    @property
    def charging(self) -> bool:
        """Whether some budget in force limits tokens or cost (requests then reserve)."""
        ...

    def subjects(self, external_id: str, tags: Sequence[str], owner: str | None) -> list[Subject]:
        """One subject per budget that applies to a request of `external_id` with `tags`,
        carrying `owner`'s key (None: no listed key)."""
        ...

    def subject(self, budget_id: str) -> Subject | None:
        """The subject of one budget in force, by its `_id` (None: gone since)."""
        ...


# A request's id, or how to make one: an admission from allowances this process holds needs none
# (an id costs as much as the rest of such an admission), one at Redis names its leases and
# reservations with it.
RequestId = str | Callable[[], str]


def made(request_id: RequestId) -> str:
    """The request id, made now if it was not yet."""
    return request_id if isinstance(request_id, str) else request_id()


class Reserve(NamedTuple):
    """What a request is expected to use at most: reserved at admission against every token
    and cost limit, replaced by the actual once it is answered."""

    tokens: int
    nanos: int
    # Whether its model has a price (an override or the catalogue): False, its cost is unknown
    # (`nanos` 0) until the upstream reports one (see [limits] unpriced).
    priced: bool = True
    # Whether it brings in input its bytes do not carry (usage.estimate.opaque): its estimate
    # may fall short by any amount (see [limits] opaque_input).
    opaque: bool = False


class Decision(msgspec.Struct, kw_only=True):
    admitted: bool
    policy: Policy | None = None  # the request's identity's
    subjects: tuple[Subject, ...] = ()  # whom it counts against, the identity first
    refused_by: Subject | None = None  # the subject whose limit refused
    binding: Limit | None = None  # the limit that refused (None for concurrency)
    dimension: Dimension | None = None  # what refused
    retry_after: int = 0  # whole seconds, >= 1 when refused
    headers: list[tuple[bytes, bytes]] = msgspec.field(default_factory=list)  # x-ratelimit-*
    # Admitted from allowances: the figures `headers` are worked out from, on first use
    # (packing.headers_of), which the proxy makes once the request is on its way upstream.
    rows: list[tuple[Subject, Limit, int, int, int, int]] | None = None
    # Concurrency slots to give back when the request ends: (identity _id, lease).
    leases: tuple[tuple[str, str], ...] = ()
    store_failed: bool = False  # Redis did not answer; `admitted` is what on_error says
    # Admitted from allowances this process holds: what its token and cost limits took of them,
    # settled against them (Limiter.settle_lent).
    lent: tuple[Lent, ...] = ()
    # Whether a token or cost limit of a subject applies (Policy.charged of one of `subjects`):
    # set by the limiter, which has just read their limits (a __post_init__ working it out
    # costs more than the rest of the decision's making).
    charged: bool = False
    # Let through unchecked (the store down, on_error = "allow"): the subjects whose token and
    # cost limits are charged what it used once the store is back (Limiter.owe).
    unchecked: tuple[Subject, ...] = ()


def charged(subjects: Sequence[Subject]) -> bool:
    """Whether a token or cost limit of one of `subjects` applies (Decision.charged)."""
    return any(subject.policy.charged for subject in subjects)


class LimitUsage(msgspec.Struct, kw_only=True):
    limit: Limit
    used: float  # requests, tokens or nano-dollars the window holds now
    remaining: float
    reset_ms: int  # until the count is back to zero


class PolicyUsage(msgspec.Struct, kw_only=True):
    limits: list[LimitUsage]
    in_flight: int | None = None  # concurrency leases held, when the policy limits them


class Admission(msgspec.Struct, array_like=True):
    """A hook-mode admission of a request carrying a listed key for someone else."""

    owner: str  # the key owner's external id
    subjects: list[tuple[str, str]]  # (_id, policy name) of the subjects beyond the identity
