"""The composition root: the whole object graph, built in one place from the settings, a Redis
client, the upstream HTTP client and a clock. Every collaborator arrives through a
constructor, so this function shows who talks to whom. Nothing here does I/O: `open` and
`close` (the app's lifespan) do."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from ulid import ULID

from sidecar import __version__
from sidecar.api.auth import AdminGuard, HookGuard
from sidecar.budgets.alerts import AlertScanner
from sidecar.budgets.notify import AlertSender
from sidecar.budgets.outbox import Outbox
from sidecar.budgets.service import BudgetMover, Budgets
from sidecar.budgets.store import BudgetStore
from sidecar.catalog import Catalog
from sidecar.errors import StoreUnavailable
from sidecar.identity.aliases import Aliases
from sidecar.identity.identify import Identifier
from sidecar.identity.indexer import IndexBuilder
from sidecar.identity.listing import Listing
from sidecar.identity.merge import Merger
from sidecar.identity.model import normalizer
from sidecar.identity.records import IdentityRecords
from sidecar.metering.attribution import Attribution
from sidecar.metering.authorize import Authorizer
from sidecar.metering.settle import Settlement
from sidecar.observe.counters import Counters
from sidecar.observe.prometheus import Exposition, Readings
from sidecar.observe.tracing import Tracer
from sidecar.proxy.authorize import RawAuthorize
from sidecar.proxy.inline import InlineProxy
from sidecar.proxy.upstream import Upstream
from sidecar.quota.fold import LimitsMover
from sidecar.quota.limiter import Limiter
from sidecar.quota.live import LiveConfig
from sidecar.quota.profiles import PolicyProfiles
from sidecar.quota.service import Quota
from sidecar.quota.signins import FailedSignIns
from sidecar.settings import Settings
from sidecar.store.connect import RedisClient, warm
from sidecar.store.keys import Keys
from sidecar.store.scripts import Script, load_all
from sidecar.tasks import Background, stop
from sidecar.ui.session import Sessions
from sidecar.usage.backlog import Backlog
from sidecar.usage.counters import UsageCounters
from sidecar.usage.fold import UsageMover
from sidecar.usage.pricing import Pricer
from sidecar.usage.ranking import Rankings
from sidecar.usage.recorder import Recorder
from sidecar.usage.spool import Spool
from sidecar.usage.writer import UsageWriter

log = logging.getLogger("sidecar")

Clock = Callable[[], float]

SHUTDOWN_TASKS_S = 10.0  # background work a request started gets this long at shutdown
SHUTDOWN_USAGE_S = 5.0  # then usage gets this long to reach Redis; the rest is spooled


@dataclass(frozen=True, slots=True)
class Services:
    settings: Settings
    redis: RedisClient
    clock: Clock
    counters: Counters | None  # None: [server] metrics = false
    live: LiveConfig
    records: IdentityRecords
    search_index: IndexBuilder
    identifier: Identifier
    catalog: Catalog
    aliases: Aliases
    merger: Merger
    usage_counters: UsageCounters
    recorder: Recorder
    limiter: Limiter
    budgets: Budgets
    alert_scanner: AlertScanner
    alert_sender: AlertSender
    quota: Quota
    settlement: Settlement
    authorizer: Authorizer
    signins: FailedSignIns
    admin_guard: AdminGuard  # the API's routes
    hook_guard: HookGuard  # the hooks' usage route
    sessions: Sessions
    upstream: Upstream
    background: Background
    proxy: InlineProxy
    raw_authorize: RawAuthorize
    exposition: Exposition | None
    tracer: Tracer | None  # None: [telemetry] enabled = false
    scripts: tuple[Script, ...]
    loops: list[asyncio.Task[None]]  # run from open() to close()

    async def open(self) -> None:
        """Open the I/O: the upstream client, the store's connections and scripts, the
        background loops. It runs before the server listens, so the first requests find the
        connections open and the scripts loaded."""
        await self.upstream.open()
        if self.tracer is not None:
            await self.tracer.open()
        try:
            await self.limiter.open()  # its own connection, besides the warmed ones
            opened = await warm(self.redis, self.settings.redis.warm_connections)
            await load_all(self.redis, self.scripts, opened)
        except StoreUnavailable as exc:
            log.warning(
                "store not reachable at start-up (%s); connections open and scripts load on "
                "first use",
                exc,
            )
        else:
            log.debug("store: %d connections open, %d scripts loaded", opened, len(self.scripts))
        with contextlib.suppress(StoreUnavailable):  # else the watch loads them when it can
            await self.budgets.refresh()
        self.loops.append(asyncio.create_task(self.live.watch()))
        self.loops.append(asyncio.create_task(self.search_index.keep()))
        self.loops.append(asyncio.create_task(self.aliases.watch()))
        self.loops.append(asyncio.create_task(self.budgets.watch()))
        if self.settings.notifiers:
            await self.alert_sender.open()
            self.loops.append(asyncio.create_task(self.alert_scanner.run()))
            self.loops.append(asyncio.create_task(self.alert_sender.run()))
        self.recorder.start()  # replays what earlier processes left in the spool

    async def close(self) -> None:
        for task in self.loops:
            task.cancel()  # they end below (tasks.stop), once what they serve is closed
        self.recorder.tally()  # before the wait: a count may start a task of its own
        await self.background.wait(SHUTDOWN_TASKS_S)
        # What Redis does not take within a few seconds waits in the spool for the next
        # process with this data dir.
        await self.recorder.close(grace_s=SHUTDOWN_USAGE_S)
        await self.upstream.close()
        if self.tracer is not None:  # the spans of the requests just settled go out
            await self.tracer.close()
        await stop(self.loops, log)
        await self.alert_sender.close()  # gives its lease back: another process sends at once
        await self.limiter.close()


def build(
    settings: Settings,
    *,
    redis: RedisClient,
    upstream: Upstream,
    clock: Clock,
    admin_token: str,
) -> Services:
    keys = Keys(settings.redis.key_prefix)
    counters = Counters() if settings.server.metrics else None
    live = LiveConfig(settings)
    budget_store = BudgetStore(redis, keys, clock)
    outbox = Outbox(redis, keys, clock)
    budgets = Budgets(budget_store, outbox, clock)
    alert_sender = AlertSender(outbox, settings.notifiers, clock)
    alert_scanner = AlertScanner(
        budgets, budget_store, outbox, alert_sender, settings.notifiers, clock
    )
    profiles = PolicyProfiles(live, clock, budgets)

    records = IdentityRecords(redis, keys, clock, settings.identity.max_new_per_minute)
    listing = Listing(redis, keys)
    search_index = IndexBuilder(redis, keys)
    identifier = Identifier(records, profiles, clock, counters)
    aliases = Aliases(redis, keys, identifier, normalizer(settings.identity.normalize))

    usage_counters = UsageCounters(redis, keys, clock)
    rankings = Rankings(redis, keys, clock)
    writer = UsageWriter(redis, keys, identifier, rankings, clock)
    writer_id = str(ULID())
    spool = Spool(settings.data_path / "spool", writer_id, settings.metering.spool_max_bytes)
    backlog = Backlog(writer, spool)
    recorder = Recorder(
        writer, backlog, identifier, writer_id=writer_id, clock=clock, counters=counters
    )
    catalog = Catalog(records, listing, usage_counters, rankings, aliases)

    limiter = Limiter(
        redis,
        keys,
        timeout_ms=settings.redis.timeout_ms,
        on_error=settings.redis.on_error,
        # A lease outlives the longest request, then frees its slot if nobody did.
        lease_s=settings.upstream.timeout_s + 30,
        clock=clock,
        counters=counters,
        prefetch=settings.limits.prefetch,
    )
    budgets.on_reset = limiter.void  # quota held ahead in the buckets a reset emptied ends
    one_opaque_at_a_time = settings.limits.opaque_input == "one_at_a_time"
    quota = Quota(
        live,
        limiter,
        records,
        identifier,
        profiles,
        budgets,
        deny_unpriced=settings.limits.unpriced == "deny",
        opaque_one_at_a_time=one_opaque_at_a_time,
    )
    attribution = Attribution(
        settings.identity,
        live,
        Pricer(settings.pricing.models),
        aliases,
        clock,
        settings.limits.default_output_reserve,
        find_opaque=one_opaque_at_a_time,
    )
    usage_mover = UsageMover(redis, keys, usage_counters, rankings, clock)
    limits_mover = LimitsMover(redis, keys, live, clock)
    merger = Merger(records, aliases, [usage_mover, limits_mover, BudgetMover(budgets)], clock)
    background = Background()
    tracer = _tracer(settings)
    settlement = Settlement(attribution, identifier, quota, recorder, background, counters, tracer)
    authorizer = Authorizer(
        attribution, identifier, quota, settlement, cap_output=settings.limits.cap_output
    )
    proxy = InlineProxy(
        settings, upstream, attribution, identifier, quota, settlement, counters, tracer
    )
    signins = FailedSignIns(
        redis,
        keys,
        per_minute=settings.admin.failed_auth_per_minute,
        networks=attribution.networks,
        clock=clock,
        timeout_s=settings.redis.timeout_ms / 1000,
    )
    raw_authorize = RawAuthorize(
        authorizer,
        settings.admin.hook_token or admin_token,
        signins,
        settings.server.body_timeout_s,
    )
    exposition = (
        Exposition(counters, Readings(limiter, recorder, live, tracer))
        if counters is not None
        else None
    )
    scripts = (
        *records.scripts,
        *aliases.scripts,
        *merger.scripts,
        *usage_mover.scripts,
        *limits_mover.scripts,
        *rankings.scripts,
        *listing.scripts,
        *search_index.scripts,
        *usage_counters.scripts,
        writer.script,
        *limiter.scripts,
        signins.script,
        *budget_store.scripts,
        *outbox.scripts,
    )
    return Services(
        settings=settings,
        redis=redis,
        clock=clock,
        counters=counters,
        live=live,
        records=records,
        search_index=search_index,
        identifier=identifier,
        catalog=catalog,
        aliases=aliases,
        merger=merger,
        usage_counters=usage_counters,
        recorder=recorder,
        limiter=limiter,
        budgets=budgets,
        alert_scanner=alert_scanner,
        alert_sender=alert_sender,
        quota=quota,
        settlement=settlement,
        authorizer=authorizer,
        signins=signins,
        admin_guard=AdminGuard(admin_token, signins),
        hook_guard=HookGuard(settings.admin.hook_token or admin_token, signins),
        sessions=Sessions(redis, keys, admin_token, signins),
        upstream=upstream,
        background=background,
        proxy=proxy,
        raw_authorize=raw_authorize,
        exposition=exposition,
        tracer=tracer,
        scripts=scripts,
        loops=[],
    )


def _tracer(settings: Settings) -> Tracer | None:
    telemetry = settings.telemetry
    if not telemetry.enabled:
        return None
    # The `otel` extra, imported only when asked for (the settings checked it is installed).
    from sidecar.observe.otel import OtelTracer
    from sidecar.observe.otel_export import Config

    exporter = Config(
        endpoint=telemetry.endpoint,
        headers=telemetry.headers,
        service_name=telemetry.service_name,
        service_version=__version__,
        timeout_s=telemetry.timeout_s,
        log_format=settings.server.log_format,
        log_level=settings.server.log_level,
    )
    return OtelTracer(exporter, telemetry.sample_ratio)
