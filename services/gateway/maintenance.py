"""Work the gateway does in the background, so that the stack repairs itself:

- the steps of collection deletions that their request could not complete (the retrieval service
  was away, the gateway restarted), every ``maintenance_interval_seconds``; every replica looks,
  each step is safe to repeat and to run twice at once;
- drift between metadata and retrieval (shared/reconcile.py): items a crash left ``pending``,
  ``failed`` items worth another try, indexed items missing vectors, vectors nothing names. Every
  ``reconcile_interval_seconds``, by the one replica that takes the round's Redis lease, at most
  ``reconcile_max_items`` items indexed again per collection and round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import timedelta

from prometheus_client import Counter, Gauge

from services.gateway.orchestrator import Orchestrator
from services.gateway.redis_guard import GuardedRedis, RedisUnavailable
from services.gateway.settings import GatewaySettings
from shared.problems import ProblemError
from shared.reconcile import ReconcileError, Reconciler

log = logging.getLogger(__name__)

DELETIONS_FINISHED = Counter(
    "gateway_deletions_finished_total",
    "Collection deletions whose vectors the background maintenance dropped, by outcome",
    ["outcome"],
)
RECONCILE_ROUNDS = Counter(
    "gateway_reconcile_rounds_total",
    "Rounds of the background drift repair, by outcome (done, skipped: another replica's "
    "round, failed: a service was away)",
    ["outcome"],
)
RECONCILE_ITEMS = Counter(
    "gateway_reconcile_items_total",
    "Items the background drift repair handled, by action (reindexed, marked_failed)",
    ["action"],
)
RECONCILE_LAST = Gauge(
    "gateway_reconcile_last_success_timestamp_seconds",
    "Unix time of the last completed round of the background drift repair",
    multiprocess_mode="max",
)


class Maintenance:
    def __init__(
        self,
        orchestrator: Orchestrator,
        redis: GuardedRedis,
        settings: GatewaySettings,
    ) -> None:
        self._orchestrator = orchestrator
        self._backends = orchestrator.backends
        self._redis = redis
        self._settings = settings
        self._lease_key = f"{settings.cache_prefix}:maintenance:reconcile"
        self._next_reconcile = time.monotonic()

    async def run(self) -> None:
        while True:
            with contextlib.suppress(ProblemError):  # a service away: the next round retries
                await self.finish_deletions()
            interval = self._settings.reconcile_interval_seconds
            if interval and time.monotonic() >= self._next_reconcile:
                self._next_reconcile = time.monotonic() + interval
                await self.repair_drift()
            await asyncio.sleep(self._settings.maintenance_interval_seconds)

    async def finish_deletions(self) -> int:
        """Complete every deletion still waiting for its vectors to be dropped."""
        finished = 0
        for waiting in (await self._backends.metadata.deletions("dropping")).deletions:
            try:
                # Read again just before dropping: a deletion another replica completed, whose
                # name may be in use again, must not have its vectors dropped a second time.
                current = await self._backends.metadata.deletion(waiting.id)
                if current.state == "dropping":
                    await self._orchestrator.finish_deletion(current)
                    finished += 1
                    DELETIONS_FINISHED.labels("dropped").inc()
            except ProblemError as exc:
                DELETIONS_FINISHED.labels("failed").inc()
                log.warning("deletion %d of %s: %s", waiting.id, waiting.collection, exc)
        if finished:
            log.info("finished %d collection deletion(s) in the background", finished)
        return finished

    async def repair_drift(self) -> bool:
        """One round over every collection, if this replica takes the round's lease (Redis
        away: every replica runs it, which is safe, only wasteful). True when it ran."""
        if not await self._take_lease():
            RECONCILE_ROUNDS.labels("skipped").inc()
            return False
        reconciler = Reconciler(
            self._backends.metadata, self._backends.retrieval, self._backends.feature
        )
        settings = self._settings
        try:
            names = await reconciler.collections()
        except ReconcileError as exc:
            RECONCILE_ROUNDS.labels("failed").inc()
            log.warning("drift repair: %s", exc)
            return True
        failures = 0
        for name in names:
            try:
                report = await reconciler.check(
                    name, stale_after=timedelta(seconds=settings.reconcile_stuck_seconds)
                )
                repaired = await reconciler.repair(
                    report,
                    retry_failed_below=settings.reconcile_retry_attempts,
                    limit=settings.reconcile_max_items,
                )
            except ReconcileError as exc:
                # A collection being deleted, or a service away: the next round looks again.
                failures += 1
                log.info("drift repair of %s skipped: %s", name, exc)
                continue
            RECONCILE_ITEMS.labels("reindexed").inc(len(repaired.reindexed))
            RECONCILE_ITEMS.labels("marked_failed").inc(len(repaired.marked_failed))
            if repaired.reindexed or repaired.marked_failed or repaired.vectors_deleted:
                await self._orchestrator.cache.bump(name)
                log.info(
                    "drift repair of %s: %d indexed again, %d marked failed, %d vectors deleted",
                    name,
                    len(repaired.reindexed),
                    len(repaired.marked_failed),
                    repaired.vectors_deleted,
                )
        RECONCILE_ROUNDS.labels("failed" if failures else "done").inc()
        if not failures:
            RECONCILE_LAST.set(time.time())
        return True

    async def _take_lease(self) -> bool:
        # Slightly shorter than the interval: the next round's holder is never locked out.
        seconds = max(1, int(self._settings.reconcile_interval_seconds * 0.9))
        try:
            taken = await self._redis.run(
                lambda r: r.set(self._lease_key, "1", nx=True, ex=seconds)
            )
        except RedisUnavailable:
            return True
        return bool(taken)
