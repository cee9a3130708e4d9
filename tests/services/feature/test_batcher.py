"""The dynamic batcher alone, with a fake model: merging, limits, order, failures, overload."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from services.feature.batcher import DynamicBatcher, Overloaded


class FakeModel:
    """Doubles its inputs; records each batch; can be held mid-pass to let a queue build up."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds
        self.batches: list[list[Any]] = []
        self.release = threading.Event()
        self.release.set()
        self.entered = threading.Event()

    def __call__(self, batch: list[Any]) -> list[Any]:
        self.entered.set()
        self.release.wait(5)
        time.sleep(self.seconds)
        self.batches.append(list(batch))
        return [ValueError(f"bad {x}") if x == "bad" else x * 2 for x in batch]


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(1)
    yield pool
    pool.shutdown(wait=False, cancel_futures=True)


def run(
    model: FakeModel,
    executor: ThreadPoolExecutor,
    scenario: Callable[[DynamicBatcher[Any, Any]], Awaitable[Any]],
    **options: Any,
) -> Any:
    settings = {"max_batch_size": 8, "max_wait_ms": 20.0, "max_queue": 64, **options}

    async def main() -> Any:
        batcher: DynamicBatcher[Any, Any] = DynamicBatcher(
            "test", model, executor=executor, **settings
        )
        batcher.start()
        try:
            return await scenario(batcher)
        finally:
            await batcher.stop()

    return asyncio.run(main())


def test_concurrent_requests_share_forward_passes(executor: ThreadPoolExecutor) -> None:
    model = FakeModel()

    async def scenario(batcher: DynamicBatcher[Any, Any]) -> list[list[int]]:
        return await asyncio.gather(*(batcher.submit([i]) for i in range(6)))

    assert run(model, executor, scenario) == [[i * 2] for i in range(6)]
    assert len(model.batches) == 1 and sorted(model.batches[0]) == list(range(6))


def test_batches_never_exceed_the_maximum_and_requests_stay_whole(
    executor: ThreadPoolExecutor,
) -> None:
    model = FakeModel()

    async def scenario(batcher: DynamicBatcher[Any, Any]) -> list[list[int]]:
        # 3 + 10 + 4 inputs with batches of 4: the middle request spans three passes.
        return await asyncio.gather(
            batcher.submit([1, 2, 3]), batcher.submit(list(range(10))), batcher.submit([7] * 4)
        )

    small, big, last = run(model, executor, scenario, max_batch_size=4)
    assert small == [2, 4, 6] and big == [x * 2 for x in range(10)] and last == [14] * 4
    assert [len(b) for b in model.batches] == [4, 4, 4, 4, 1]


def test_a_lone_request_does_not_wait(executor: ThreadPoolExecutor) -> None:
    model = FakeModel()

    async def scenario(batcher: DynamicBatcher[Any, Any]) -> tuple[float, float]:
        started = time.perf_counter()
        with batcher.reserve(1):
            assert await batcher.submit(["a"]) == ["aa"]
        return time.perf_counter() - started, batcher.last_wait

    # Nothing else is admitted, so nothing is worth waiting for, however long max_wait is: the
    # pass leaves at once (10 s would be waited out under a wait-for-company policy, on any
    # machine), and the batcher records no wait at all.
    elapsed, waited = run(model, executor, scenario, max_wait_ms=10_000.0)
    assert elapsed < 5.0
    assert waited == 0.0
    assert model.batches == [["a"]]


def test_one_client_after_another_never_waits(executor: ThreadPoolExecutor) -> None:
    """A single client's requests, one after another (what one searcher sends)."""
    model = FakeModel()

    async def scenario(batcher: DynamicBatcher[Any, Any]) -> tuple[float, list[float]]:
        waits = []
        started = time.perf_counter()
        for i in range(5):
            with batcher.reserve(1):
                assert await batcher.submit([i]) == [i * 2]
            waits.append(batcher.last_wait)
        return time.perf_counter() - started, waits

    elapsed, waits = run(model, executor, scenario, max_wait_ms=10_000.0)
    assert elapsed < 5.0 and waits == [0.0] * 5
    assert model.batches == [[i] for i in range(5)]


def test_inputs_still_being_prepared_are_waited_for(executor: ThreadPoolExecutor) -> None:
    model = FakeModel()

    async def scenario(batcher: DynamicBatcher[Any, Any]) -> list[Any]:
        async def request(item: str, preparing: float) -> list[Any]:
            with batcher.reserve(1):
                await asyncio.sleep(preparing)  # decoding, say
                return await batcher.submit([item])

        return await asyncio.gather(request("a", 0.0), request("b", 0.05))

    assert run(model, executor, scenario, max_wait_ms=2_000.0) == [["aa"], ["bb"]]
    assert model.batches == [["a", "b"]]


def test_the_recorded_wait_is_the_wait_for_company(executor: ThreadPoolExecutor) -> None:
    model = FakeModel()

    async def scenario(batcher: DynamicBatcher[Any, Any]) -> float:
        async def request(item: str, preparing: float) -> list[Any]:
            with batcher.reserve(1):
                await asyncio.sleep(preparing)
                return await batcher.submit([item])

        await asyncio.gather(request("a", 0.0), request("b", 0.1))
        return batcher.last_wait

    # "a" waited for "b" (admitted, then 0.1 s of preparation) and no longer than max_wait.
    assert 0.05 <= run(model, executor, scenario, max_wait_ms=2_000.0) < 2.0
    assert model.batches == [["a", "b"]]


def test_the_wait_is_bounded_by_max_wait(executor: ThreadPoolExecutor) -> None:
    model = FakeModel()

    async def scenario(batcher: DynamicBatcher[Any, Any]) -> float:
        with batcher.reserve(1):  # admitted, and never submitted
            started = time.perf_counter()
            with batcher.reserve(1):
                await batcher.submit(["a"])
            return time.perf_counter() - started

    assert 0.045 <= run(model, executor, scenario, max_wait_ms=50.0) < 1.0
    # A full batch leaves at once, whatever the wait.
    full_model = FakeModel()

    async def full(batcher: DynamicBatcher[Any, Any]) -> float:
        with batcher.reserve(1):
            started = time.perf_counter()
            with batcher.reserve(8):
                await batcher.submit(list(range(8)))
            return time.perf_counter() - started

    assert run(full_model, executor, full, max_wait_ms=5_000.0) < 1.0


def test_inputs_arriving_during_a_pass_leave_together(executor: ThreadPoolExecutor) -> None:
    model = FakeModel()
    model.release.clear()

    async def scenario(batcher: DynamicBatcher[Any, Any]) -> list[list[int]]:
        first = asyncio.ensure_future(batcher.submit([0]))
        await asyncio.get_running_loop().run_in_executor(None, model.entered.wait, 5)
        rest = [asyncio.ensure_future(batcher.submit([i])) for i in range(1, 6)]
        await asyncio.sleep(0.05)
        assert batcher.queued == 5
        model.release.set()
        return await asyncio.gather(first, *rest)

    assert run(model, executor, scenario, max_wait_ms=0.0) == [[i * 2] for i in range(6)]
    assert model.batches == [[0], [1, 2, 3, 4, 5]]


def test_inputs_that_queued_during_a_pass_leave_when_it_ends(
    executor: ThreadPoolExecutor,
) -> None:
    """They have waited already: the next pass takes them at once, however long max_wait is,
    and they all share it."""
    model = FakeModel()
    model.release.clear()

    async def scenario(batcher: DynamicBatcher[Any, Any]) -> tuple[list[Any], float, float]:
        async def request(i: int) -> list[Any]:
            with batcher.reserve(1):
                return await batcher.submit([i])

        first = asyncio.ensure_future(request(0))
        await asyncio.get_running_loop().run_in_executor(None, model.entered.wait, 5)
        rest = [asyncio.ensure_future(request(i)) for i in range(1, 6)]
        await asyncio.sleep(0.05)
        model.release.set()
        released = time.perf_counter()
        results = await asyncio.gather(first, *rest)
        return results, time.perf_counter() - released, batcher.last_wait

    results, after_release, waited = run(model, executor, scenario, max_wait_ms=10_000.0)
    assert results == [[i * 2] for i in range(6)]
    assert model.batches == [[0], [1, 2, 3, 4, 5]]
    assert after_release < 5.0 and waited == 0.0


def test_a_request_answered_but_still_reserved_is_not_waited_for(
    executor: ThreadPoolExecutor,
) -> None:
    """Between its answer and the end of its ``reserve`` block a request is admitted and
    unanswered, yet nothing more of it will arrive: the next request must not wait for it."""
    model = FakeModel()

    async def scenario(batcher: DynamicBatcher[Any, Any]) -> tuple[float, float]:
        with batcher.reserve(1):
            assert await batcher.submit(["a"]) == ["aa"]
            # "a" is answered and still inside its reservation when "b" comes.
            started = time.perf_counter()
            with batcher.reserve(1):
                assert await batcher.submit(["b"]) == ["bb"]
            return time.perf_counter() - started, batcher.last_wait

    elapsed, waited = run(model, executor, scenario, max_wait_ms=10_000.0)
    assert waited == 0.0
    assert elapsed < 5.0


def test_a_failing_input_fails_only_its_request(executor: ThreadPoolExecutor) -> None:
    model = FakeModel()

    async def scenario(batcher: DynamicBatcher[Any, Any]) -> list[Any]:
        return await asyncio.gather(
            batcher.submit(["x", "bad"]), batcher.submit(["y"]), return_exceptions=True
        )

    failed, fine = run(model, executor, scenario)
    assert isinstance(failed, ValueError) and str(failed) == "bad bad"
    assert fine == ["yy"]
    assert len(model.batches) == 1


def test_a_crashing_pass_fails_its_requests_and_the_batcher_goes_on(
    executor: ThreadPoolExecutor,
) -> None:
    calls = []

    def flaky(batch: list[int]) -> list[int]:
        calls.append(batch)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return batch

    async def scenario(batcher: DynamicBatcher[Any, Any]) -> list[Any]:
        first = await asyncio.gather(batcher.submit([1]), return_exceptions=True)
        return [*first, await batcher.submit([2])]

    settings = {"max_batch_size": 8, "max_wait_ms": 0.0, "max_queue": 64}

    async def main() -> list[Any]:
        batcher: DynamicBatcher[int, int] = DynamicBatcher(
            "t", flaky, executor=executor, **settings
        )
        batcher.start()
        try:
            return await scenario(batcher)
        finally:
            await batcher.stop()

    crashed, fine = asyncio.run(main())
    assert isinstance(crashed, RuntimeError) and fine == [2]


def test_the_queue_is_bounded(executor: ThreadPoolExecutor) -> None:
    model = FakeModel(seconds=0.01)

    async def scenario(batcher: DynamicBatcher[Any, Any]) -> None:
        with batcher.reserve(6):
            assert batcher.reserved == 6
            with pytest.raises(Overloaded) as caught, batcher.reserve(5):
                pass
            assert caught.value.retry_after >= 1
            with batcher.reserve(4):  # exactly full is fine
                assert batcher.reserved == 10
            await batcher.submit(list(range(6)))
        assert batcher.reserved == 0
        with batcher.reserve(10):
            pass

    run(model, executor, scenario, max_queue=10)


def test_retry_after_grows_with_the_backlog(executor: ThreadPoolExecutor) -> None:
    model = FakeModel(seconds=0.2)

    async def scenario(batcher: DynamicBatcher[Any, Any]) -> int:
        await batcher.submit([1])  # 0.2 s per input, measured
        with batcher.reserve(20), pytest.raises(Overloaded) as caught, batcher.reserve(1):
            pass
        return caught.value.retry_after

    # 21 inputs at 0.2 s each or more (the pass sleeps 0.2 s): at least ceil(4.2) = 5 s; the
    # upper bound leaves a loaded machine 0.18 s of overhead on top of each measured 0.2 s.
    assert 5 <= run(model, executor, scenario, max_queue=20) <= 8


def test_a_cancelled_request_leaves_the_queue(executor: ThreadPoolExecutor) -> None:
    model = FakeModel()
    model.release.clear()

    async def scenario(batcher: DynamicBatcher[Any, Any]) -> list[int]:
        first = asyncio.ensure_future(batcher.submit([0]))
        await asyncio.get_running_loop().run_in_executor(None, model.entered.wait, 5)
        doomed = asyncio.ensure_future(batcher.submit([1, 2, 3]))
        kept = asyncio.ensure_future(batcher.submit([4]))
        await asyncio.sleep(0.02)
        assert batcher.queued == 4
        doomed.cancel()
        await asyncio.sleep(0.02)
        assert batcher.queued == 1
        model.release.set()
        await first
        return await kept

    assert run(model, executor, scenario, max_wait_ms=0.0) == [8]
    assert model.batches == [[0], [4]]


def test_submitting_to_a_stopped_batcher_fails(executor: ThreadPoolExecutor) -> None:
    batcher: DynamicBatcher[int, int] = DynamicBatcher(
        "t", FakeModel(), executor=executor, max_batch_size=1, max_wait_ms=0, max_queue=1
    )
    with pytest.raises(RuntimeError, match="not running"):
        asyncio.run(batcher.submit([1]))
    with pytest.raises(ValueError):
        DynamicBatcher(
            "t", FakeModel(), executor=executor, max_batch_size=0, max_wait_ms=0, max_queue=1
        )
