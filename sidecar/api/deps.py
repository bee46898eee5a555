"""The services a route handler can take, by parameter name (app.py provides them)."""

from __future__ import annotations

from litestar.di import NamedDependency

from sidecar.catalog import Catalog
from sidecar.metering.authorize import Authorizer
from sidecar.metering.settle import Settlement
from sidecar.quota.limiter import Limiter
from sidecar.quota.service import Quota
from sidecar.ui.session import Sessions
from sidecar.usage.counters import UsageCounters

CatalogDep = NamedDependency[Catalog]
AuthorizerDep = NamedDependency[Authorizer]
SettlementDep = NamedDependency[Settlement]
LimiterDep = NamedDependency[Limiter]
QuotaDep = NamedDependency[Quota]
SessionsDep = NamedDependency[Sessions]
UsageCountersDep = NamedDependency[UsageCounters]
