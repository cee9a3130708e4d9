"""Where a search runs: on the event loop or on the thread pool.

The thread pool keeps the loop free for other requests and lets concurrent searches use every
core, but the hand-off costs two thread wake-ups each way round. On the 2-core development VM
that is ~0.4 ms, as much as a whole HNSW or IVF search of a million vectors. So a search whose
kind has recently run in under ``INLINE_MAX_SECONDS`` runs on the loop when it is the only
search in flight; a wrong guess delays other requests by about one short search.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable
from typing import TypeVar

from starlette.concurrency import run_in_threadpool

T = TypeVar("T")

INLINE_MAX_SECONDS = 0.002
# Kinds of search remembered (collection, modality, depth, k...); forgotten all at once when
# full, so a client that varies its parameters cannot grow the table.
MAX_KINDS = 1024


class SearchRunner:
    def __init__(self, inline_max_seconds: float = INLINE_MAX_SECONDS) -> None:
        self.inline_max_seconds = inline_max_seconds
        self.in_flight = 0
        self._last_seconds: dict[Hashable, float] = {}

    async def run(self, kind: Hashable | None, work: Callable[[], T]) -> T:
        """Run ``work``; ``kind`` names searches expected to cost alike (None: never inline)."""

        def timed() -> T:
            started = time.perf_counter()
            try:
                return work()
            finally:
                if kind is not None:
                    if len(self._last_seconds) >= MAX_KINDS:
                        self._last_seconds.clear()
                    self._last_seconds[kind] = time.perf_counter() - started

        self.in_flight += 1
        try:
            if kind is not None and self._cheap(kind):
                # Two turns of the loop: a request whose bytes have already arrived gets to
                # its handler, and counts itself in flight, before this one decides.
                await asyncio.sleep(0)
                await asyncio.sleep(0)
                if self.in_flight == 1:
                    return timed()
            return await run_in_threadpool(timed)
        finally:
            self.in_flight -= 1

    def _cheap(self, kind: Hashable) -> bool:
        return self._last_seconds.get(kind, self.inline_max_seconds) < self.inline_max_seconds
