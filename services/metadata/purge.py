"""The background half of collection deletions: removes the rows and images of every deletion
in state ``purging``, a batch per transaction. Woken when a deletion reaches that state, and
every ``purge_poll_seconds`` besides, so that a deletion cut short by a restart (of this replica
or another) is resumed without anyone asking."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.concurrency import run_in_threadpool

from services.metadata.repository import Repository
from services.metadata.settings import MetadataSettings

log = logging.getLogger(__name__)


class Purger:
    def __init__(self, repository: Repository, settings: MetadataSettings) -> None:
        self._repository = repository
        self._batch = settings.purge_batch
        self._poll_seconds = settings.purge_poll_seconds
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Purger]:
        task = asyncio.create_task(self._run(), name="metadata-purger")
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            self._wake.clear()  # before looking: a wake-up during the round starts another
            try:
                await self.purge_all()
            except Exception:
                # The database may be away for a moment: the next round tries again.
                log.exception("purging collection deletions failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll_seconds)

    async def purge_all(self) -> None:
        for deletion in await run_in_threadpool(self._repository.deletions, "purging"):
            while await run_in_threadpool(self._repository.purge_step, deletion.id, self._batch):
                pass
