"""The services the API's route handlers take, by parameter name (app.py provides them)."""

from __future__ import annotations

from litestar.di import NamedDependency

from sidecar.budgets.service import Budgets
from sidecar.catalog import Catalog
from sidecar.identity.merge import Merger
from sidecar.metering.authorize import Authorizer
from sidecar.metering.settle import Settlement
from sidecar.quota.limiter import Limiter
from sidecar.usage.counters import UsageCounters

BudgetsDep = NamedDependency[Budgets]
CatalogDep = NamedDependency[Catalog]
MergerDep = NamedDependency[Merger]
AuthorizerDep = NamedDependency[Authorizer]
SettlementDep = NamedDependency[Settlement]
LimiterDep = NamedDependency[Limiter]
UsageCountersDep = NamedDependency[UsageCounters]
