"""Cross-request dynamic batching.

Concurrent requests put their inputs into one queue per modality; a collector task takes up to
``max_batch_size`` inputs at a time and runs them through the model in one forward pass, on a
worker thread so the event loop stays free. While a pass runs, new inputs pile up and leave
together as soon as it ends, so under load batches fill by themselves.

Before a pass the collector waits only for inputs it knows are coming: admitted (see below) but
still being prepared, an image being decoded say; and then at most ``max_wait_ms`` after the
oldest queued input, and not at all once the batch is full. A lone request is never held back
for company that may not come, so a single client pays no waiting at all.

A request's inputs may be split over consecutive batches (a 64-image request with batches of 32)
and are put back together in order. Each input can fail on its own (the batch function returns an
exception in its place); a request fails with the first failure among its inputs.

The queue is bounded: ``reserve(n)`` admits a request's ``n`` inputs before any work is done on
them (decoding included) and raises ``Overloaded`` when more than ``max_queue`` inputs would be
admitted and unanswered at once, so an overloaded service answers at once instead of growing a
backlog without limit.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

I = TypeVar("I")  # noqa: E741 - one input
O = TypeVar("O")  # noqa: E741 - its output

# Runs one batch (on the executor's thread): one output, or an exception, per input.
BatchFunction = Callable[[list[Any]], Sequence[Any]]
# Told of each forward pass: (batch size, seconds, seconds it was held back for company).
BatchObserver = Callable[[int, float, float], None]


class Overloaded(Exception):
    """The queue is full; ``retry_after`` is a hint, in whole seconds."""

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


@dataclass(eq=False)
class _Reservation:
    batcher: DynamicBatcher[Any, Any]
    unsubmitted: int


# The reservation of the running task (a request): ``submit`` counts its inputs as arrived.
_RESERVATION: ContextVar[_Reservation | None] = ContextVar("batcher_reservation", default=None)


@dataclass(eq=False)
class _Job:
    items: list[Any]
    future: asyncio.Future[list[Any]]
    enqueued_at: float
    results: list[Any] = field(default_factory=list)
    taken: int = 0  # inputs handed to a batch so far
    done: int = 0  # inputs answered so far

    def __post_init__(self) -> None:
        self.results = [None] * len(self.items)


class DynamicBatcher(Generic[I, O]):
    """One queue and one collector task; ``start()`` inside the event loop that will use it."""

    def __init__(
        self,
        name: str,
        run_batch: BatchFunction,
        *,
        executor: Executor,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue: int,
        on_batch: BatchObserver | None = None,
        on_depth: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1, max_wait_ms >= 0")
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self._run_batch = run_batch
        self._executor = executor
        self._on_batch = on_batch
        self._on_depth = on_depth
        self._jobs: deque[_Job] = deque()
        self._queued = 0  # inputs in _jobs not yet taken
        self._reserved = 0  # inputs admitted and not yet answered
        self._outstanding = 0  # inputs submitted and not yet answered (queued or in a pass)
        self._unsubmitted = 0  # inputs admitted and not submitted yet (being decoded, say)
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        # Seconds per input, smoothed: turns the backlog into a Retry-After estimate.
        self._seconds_per_input = 0.0
        self.batches = 0  # forward passes run, for tests and logs
        # Seconds the last pass was held back for inputs still arriving; 0.0 when it left at
        # once (a lone request, or inputs that queued while the previous pass ran).
        self.last_wait = 0.0

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(
                self._collect(), name=f"batcher-{self.name}"
            )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
        while self._jobs:  # nobody will answer them now
            job = self._jobs.popleft()
            if not job.future.done():
                job.future.set_exception(RuntimeError(f"the {self.name} batcher stopped"))
        self._set_queued(0)
        self._outstanding = 0

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def queued(self) -> int:
        """Inputs waiting for a forward pass."""
        return self._queued

    @property
    def reserved(self) -> int:
        """Inputs admitted and not yet answered (waiting, being decoded or in a pass)."""
        return self._reserved

    @property
    def arriving(self) -> int:
        """Inputs admitted but not submitted yet: the ones worth waiting for. Not those of a
        request already answered whose task has not left ``reserve`` yet: counting them
        (admitted minus unanswered) held passes back for requests that were done."""
        return self._unsubmitted

    # --- admission ------------------------------------------------------------------------

    @contextmanager
    def reserve(self, count: int) -> Iterator[None]:
        """Admit ``count`` inputs for the duration of the block, or raise ``Overloaded``."""
        if self._reserved + count > self.max_queue:
            backlog = self._reserved + count
            retry_after = max(1, math.ceil(backlog * self._seconds_per_input))
            raise Overloaded(
                f"the {self.name} queue is full ({self._reserved} of {self.max_queue} inputs "
                "admitted); retry later",
                retry_after,
            )
        self._reserved += count
        self._unsubmitted += count
        reservation = _Reservation(self, count)
        token = _RESERVATION.set(reservation)
        try:
            yield
        finally:
            _RESERVATION.reset(token)
            self._reserved -= count
            self._unsubmitted -= reservation.unsubmitted
            if self._wakeup is not None:  # the collector may be waiting for these inputs
                self._wakeup.set()

    # --- submission -----------------------------------------------------------------------

    async def submit(self, items: Sequence[I]) -> list[O]:
        """Embed ``items`` as part of whatever batches form; outputs in the same order."""
        if not items:
            return []
        if self._task is None or self._wakeup is None:
            raise RuntimeError(f"the {self.name} batcher is not running")
        loop = asyncio.get_running_loop()
        job = _Job(list(items), loop.create_future(), time.monotonic())
        reservation = _RESERVATION.get()
        if reservation is not None and reservation.batcher is self:
            arrived = min(reservation.unsubmitted, len(job.items))
            reservation.unsubmitted -= arrived
            self._unsubmitted -= arrived
        self._jobs.append(job)
        self._outstanding += len(job.items)
        self._set_queued(self._queued + len(job.items))
        self._wakeup.set()
        try:
            return await job.future
        except asyncio.CancelledError:
            # The client went away: drop what has not reached a batch yet.
            if job in self._jobs:
                self._jobs.remove(job)
                untaken = len(job.items) - job.taken
                self._outstanding -= untaken
                self._set_queued(self._queued - untaken)
            raise

    # --- the collector --------------------------------------------------------------------

    async def _collect(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            while not self._jobs:
                self._wakeup.clear()
                await self._wakeup.wait()
            # Wait only for inputs admitted and still being prepared: with none (a lone request,
            # a text request, whose inputs are submitted as they are admitted) the pass starts
            # at once, whatever max_wait is.
            deadline = self._jobs[0].enqueued_at + self.max_wait
            waiting_since: float | None = None
            while self._queued < self.max_batch_size and self.arriving > 0:
                now = time.monotonic()
                remaining = deadline - now
                if remaining <= 0:
                    break
                if waiting_since is None:
                    waiting_since = now
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            self.last_wait = 0.0 if waiting_since is None else time.monotonic() - waiting_since
            if not self._jobs:  # every waiting request was cancelled meanwhile
                continue
            batch, owners = self._take()
            started = time.perf_counter()
            try:
                outputs = await loop.run_in_executor(self._executor, self._run_batch, batch)
                if len(outputs) != len(batch):
                    raise RuntimeError(f"{len(outputs)} outputs for a batch of {len(batch)}")
            except asyncio.CancelledError:
                for job, _ in owners:
                    if not job.future.done():
                        job.future.cancel()
                raise
            except Exception as exc:  # the whole pass failed: every input in it fails
                log.exception("%s batch of %d failed", self.name, len(batch))
                outputs = [exc] * len(batch)
            elapsed = time.perf_counter() - started
            self._observe(len(batch), elapsed)
            self._outstanding -= len(batch)
            for (job, index), output in zip(owners, outputs, strict=True):
                job.results[index] = output
                job.done += 1
                if job.done == len(job.items) and not job.future.done():
                    failure = next((r for r in job.results if isinstance(r, BaseException)), None)
                    if failure is not None:
                        job.future.set_exception(failure)
                    else:
                        job.future.set_result(job.results)

    def _take(self) -> tuple[list[Any], list[tuple[_Job, int]]]:
        batch: list[Any] = []
        owners: list[tuple[_Job, int]] = []
        while self._jobs and len(batch) < self.max_batch_size:
            job = self._jobs[0]
            count = min(len(job.items) - job.taken, self.max_batch_size - len(batch))
            for index in range(job.taken, job.taken + count):
                batch.append(job.items[index])
                owners.append((job, index))
            job.taken += count
            if job.taken == len(job.items):
                self._jobs.popleft()
        self._set_queued(self._queued - len(batch))
        return batch, owners

    def _observe(self, size: int, seconds: float) -> None:
        self.batches += 1
        per_input = seconds / size
        self._seconds_per_input = (
            per_input
            if self._seconds_per_input == 0
            else 0.8 * self._seconds_per_input + 0.2 * per_input
        )
        if self._on_batch is not None:
            self._on_batch(size, seconds, self.last_wait)

    def _set_queued(self, value: int) -> None:
        self._queued = value
        if self._on_depth is not None:
            self._on_depth(value)
