"""The gateway's copy of the revocation list, polled from the auth service.

Every ``poll_seconds`` the gateway asks ``GET /revocations?since=…`` for the entries recorded
since its previous poll (with an overlap, deduplicated), and every ``resync_seconds`` for the
whole live list; checks are then in memory, with no call per request and no Redis. A revoked
token is refused within one poll interval (2 s by default) on every replica.

If the auth service cannot be reached the last copy keeps being used. Once it is older than
``max_staleness`` the fail-open settings decide: by default reads go on, writes get a 503
``revocations_unavailable``, because a token revoked meanwhile could not be refused.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from prometheus_client import Gauge

from shared.contracts.auth import AuthClient
from shared.metrics import computed_gauge
from shared.problems import ProblemError, ServiceUnavailable
from shared.tokens import Principal, RevocationSet, token_revoked

log = logging.getLogger(__name__)

REVOCATIONS_KNOWN = Gauge(
    "gateway_revocations",
    "Revocation entries (token ids and subjects) the gateway holds.",
    multiprocess_mode="livemax",
)
REVOCATIONS_AGE = Gauge(
    "gateway_revocation_list_age_seconds",
    "Seconds since the revocation list was last fetched from the auth service.",
    # With several workers, the stalest one's list.
    multiprocess_mode="livemax",
)

# Entries recorded while a poll was in flight are fetched again by the next one.
_OVERLAP_SECONDS = 30.0


class RevocationList:
    def __init__(
        self,
        auth: AuthClient,
        *,
        poll_seconds: float = 2.0,
        max_staleness: float = 60.0,
        resync_seconds: float = 300.0,
        fail_open_reads: bool = True,
        fail_open_writes: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._auth = auth
        self.poll_seconds = poll_seconds
        self.max_staleness = max_staleness
        self.resync_seconds = resync_seconds
        self.fail_open_reads = fail_open_reads
        self.fail_open_writes = fail_open_writes
        self._clock = clock
        self._set = RevocationSet()
        self._since: float | None = None  # the auth service's clock, from its answers
        self._last_full = float("-inf")
        self._fetched_at = clock()  # a fresh start counts as fresh for max_staleness
        self._failing = False
        computed_gauge(REVOCATIONS_AGE, lambda: self.age)

    @property
    def age(self) -> float:
        return self._clock() - self._fetched_at

    async def poll(self) -> None:
        """Fetch the changes (or, now and then, the whole list). Raises ``ProblemError``."""
        full = self._since is None or self._clock() - self._last_full >= self.resync_seconds
        since = None if full or self._since is None else self._since - _OVERLAP_SECONDS
        feed = await self._auth.revocation_feed(since, timeout=5.0)
        entries = [entry.model_dump(exclude_none=True) for entry in feed.revocations]
        if full:
            fresh = RevocationSet()
            fresh.apply(entries)
            self._set = fresh
            self._last_full = self._clock()
        else:
            self._set.apply(entries)
        now = feed.now
        self._set.prune(now)
        self._since = now
        self._fetched_at = self._clock()
        REVOCATIONS_KNOWN.set(len(self._set.jtis) + len(self._set.subjects))

    async def run(self) -> None:
        """Poll forever (the lifespan runs this as a task and cancels it at shutdown)."""
        while True:
            try:
                await self.poll()
                if self._failing:
                    log.info("revocation list fetched again")
                self._failing = False
            except (ProblemError, KeyError, TypeError, ValueError) as exc:
                if not self._failing:  # one line per outage, not one per poll
                    log.warning("could not fetch the revocation list: %s", exc)
                self._failing = True
            await asyncio.sleep(self.poll_seconds)

    async def check(self, principal: Principal) -> None:
        """``shared.tokens.RevocationCheck``: refuse a revoked token."""
        if self._set.is_revoked(principal):
            raise token_revoked()

    def ensure_fresh(self, *, write: bool) -> None:
        """Refuse (503) when the list is too old to trust and the policy says fail closed."""
        if self.age <= self.max_staleness:
            return
        if self.fail_open_writes if write else self.fail_open_reads:
            return
        raise ServiceUnavailable(
            "the revocation list is out of date (auth service unreachable); retry shortly",
            code="revocations_unavailable",
            headers={"Retry-After": str(max(1, round(self.poll_seconds)))},
        )
