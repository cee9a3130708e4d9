"""Where searches run: the event loop only for a lone search of a kind known to be short."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from services.retrieval.runner import SearchRunner


def _thread_of(runner: SearchRunner, kind: object) -> int:
    return asyncio.run(runner.run(kind, threading.get_ident))


def test_a_lone_search_runs_on_the_loop_once_its_kind_is_known_to_be_short() -> None:
    runner = SearchRunner()
    loop_thread = threading.get_ident()  # asyncio.run drives the loop from this thread
    assert _thread_of(runner, "k") != loop_thread  # cost unknown: the pool
    assert _thread_of(runner, "k") == loop_thread
    assert _thread_of(runner, "other") != loop_thread
    assert runner.in_flight == 0


def test_work_without_a_kind_and_slow_kinds_stay_off_the_loop() -> None:
    runner = SearchRunner(inline_max_seconds=0.001)
    loop_thread = threading.get_ident()

    def slow() -> int:
        time.sleep(0.005)
        return threading.get_ident()

    for _ in range(3):
        assert _thread_of(runner, None) != loop_thread
        assert asyncio.run(runner.run("slow", slow)) != loop_thread


def test_a_search_goes_to_the_pool_while_another_is_in_flight() -> None:
    runner = SearchRunner()
    _thread_of(runner, "k")  # now known to be short
    release = threading.Event()

    async def both() -> tuple[int, int]:
        blocked = asyncio.ensure_future(runner.run(None, lambda: release.wait(10)))
        while runner.in_flight == 0:
            await asyncio.sleep(0)
        try:
            return threading.get_ident(), await runner.run("k", threading.get_ident)
        finally:
            release.set()
            await blocked

    loop_thread, search_thread = asyncio.run(both())
    assert search_thread != loop_thread
    assert runner.in_flight == 0


def test_an_error_inline_reaches_the_caller_and_is_not_counted_in_flight() -> None:
    runner = SearchRunner()
    _thread_of(runner, "k")

    def fail() -> None:
        raise ValueError("bad vector")

    with pytest.raises(ValueError, match="bad vector"):
        asyncio.run(runner.run("k", fail))
    assert runner.in_flight == 0
    assert _thread_of(runner, "k") == threading.get_ident()
