"""Work the gateway finishes in the background: the steps of collection deletions that their
request could not complete (the retrieval service was away, the gateway restarted). Every
replica runs it; each step is safe to repeat and to run twice at once."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from prometheus_client import Counter

from services.gateway.orchestrator import Orchestrator
from shared.contracts.metadata import MetadataClient
from shared.problems import ProblemError

log = logging.getLogger(__name__)

DELETIONS_FINISHED = Counter(
    "gateway_deletions_finished_total",
    "Collection deletions whose vectors the background maintenance dropped, by outcome",
    ["outcome"],
)


class Maintenance:
    def __init__(
        self, orchestrator: Orchestrator, metadata: MetadataClient, *, interval_seconds: float
    ) -> None:
        self._orchestrator = orchestrator
        self._metadata = metadata
        self._interval = interval_seconds

    async def run(self) -> None:
        while True:
            with contextlib.suppress(ProblemError):  # a service away: the next round retries
                await self.finish_deletions()
            await asyncio.sleep(self._interval)

    async def finish_deletions(self) -> int:
        """Complete every deletion still waiting for its vectors to be dropped."""
        finished = 0
        for waiting in (await self._metadata.deletions("dropping")).deletions:
            try:
                # Read again just before dropping: a deletion another replica completed, whose
                # name may be in use again, must not have its vectors dropped a second time.
                current = await self._metadata.deletion(waiting.id)
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
