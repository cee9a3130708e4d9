"""Result and embedding caches in the real Redis, the windowed hit ratio, and the model-id cache."""

from __future__ import annotations

import asyncio
import math
import struct
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY

from services.gateway.cache import ResultCache, WindowedRatio
from services.gateway.embeddings import (
    EmbeddingCache,
    ModelIdCache,
    normalise_text,
    text_digest,
)
from services.gateway.redis_guard import GuardedRedis
from shared.http import ServiceClient

pytestmark = pytest.mark.anyio

PARTS = {"text": "a red circle", "target": "image", "top_k": 5, "collection": "c", "filters": None}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_a_page_is_found_again_until_the_collection_is_written(
    guarded: GuardedRedis, prefix: str
) -> None:
    cache = ResultCache(guarded, prefix=prefix, ttl_seconds=60)
    version = await cache.version("c")
    assert version is not None
    key = cache.key(version, PARTS)
    assert await cache.get(key) is None
    await cache.put(key, {"results": [1]})
    assert await cache.get(cache.key(await cache.version("c"), PARTS)) == {"results": [1]}
    await cache.bump("c")
    new_version = await cache.version("c")
    assert new_version != version
    assert await cache.get(cache.key(new_version, PARTS)) is None


async def test_every_key_part_matters(guarded: GuardedRedis, prefix: str) -> None:
    cache = ResultCache(guarded, prefix=prefix, ttl_seconds=60)
    version = await cache.version("c")
    assert version is not None
    keys = {
        cache.key(version, {**PARTS, **change})
        for change in (
            {},
            {"text": "a blue circle"},
            {"target": "text"},
            {"top_k": 6},
            {"filters": {"shape": "circle"}},
        )
    }
    assert len(keys) == 5
    assert cache.key(version, dict(reversed(PARTS.items()))) in keys  # order does not matter


async def test_a_lost_version_never_makes_old_pages_reachable(
    guarded: GuardedRedis, prefix: str
) -> None:
    cache = ResultCache(guarded, prefix=prefix, ttl_seconds=60)
    version = await cache.version("c")
    assert version is not None
    await cache.put(cache.key(version, PARTS), {"stale": True})
    await guarded.client.delete(f"{prefix}:version:c")  # evicted, or Redis restarted empty
    fresh = await cache.version("c")
    assert fresh is not None and fresh != version
    assert await cache.get(cache.key(fresh, PARTS)) is None


async def test_redis_down_skips_the_cache_and_remembers_pending_invalidations(
    dead: GuardedRedis, guarded: GuardedRedis, prefix: str
) -> None:
    down = ResultCache(dead, prefix=prefix, ttl_seconds=60)
    assert await down.version("c") is None
    assert await down.get("any") is None
    await down.put("any", {"x": 1})  # no error
    await down.bump("c")  # a write while Redis is away ...
    # ... is applied before the cache is used again (same cache object, Redis back).
    up = ResultCache(guarded, prefix=prefix, ttl_seconds=60)
    before = await up.version("c")
    down._redis = guarded
    down._pending_bumps = {"c"}
    after = await down.version("c")
    assert after is not None and after != before
    assert not down._pending_bumps


async def test_the_breaker_skips_a_dead_redis_at_once(dead: GuardedRedis, prefix: str) -> None:
    cache = ResultCache(dead, prefix=prefix, ttl_seconds=60)
    await cache.get("k")
    assert dead.breaker.state == "open"
    name = dead.breaker.name
    before = REGISTRY.get_sample_value(
        "multimodal_circuit_breaker_rejections_total", {"target": name}
    )
    for _ in range(20):
        assert await cache.get("k") is None
    # Every one refused by the breaker: no connection attempt while it is open.
    after = REGISTRY.get_sample_value(
        "multimodal_circuit_breaker_rejections_total", {"target": name}
    )
    assert after == (before or 0) + 20


def test_windowed_ratio_forgets_old_lookups() -> None:
    clock = Clock()
    ratio = WindowedRatio(60, buckets=6, clock=clock)
    assert math.isnan(ratio.value())
    for hit in (True, True, True, False):
        ratio.record(hit)
    assert ratio.value() == 0.75
    clock.now = 30
    ratio.record(False)
    ratio.record(False)
    assert ratio.value() == 0.5
    clock.now = 65  # the first slice (0-10 s) has left the window
    assert ratio.value() == 0.0
    clock.now = 200
    assert math.isnan(ratio.value())


async def test_hit_ratio_gauge_reports_the_window(guarded: GuardedRedis, prefix: str) -> None:
    cache = ResultCache(guarded, prefix=prefix, ttl_seconds=60)
    version = await cache.version("c")
    assert version is not None
    key = cache.key(version, PARTS)
    await cache.get(key)
    await cache.put(key, {"r": 1})
    await cache.get(key)
    await cache.get(key)
    assert REGISTRY.get_sample_value("multimodal_cache_hit_ratio") == pytest.approx(2 / 3)


def test_text_normalisation_keeps_what_changes_an_embedding() -> None:
    assert normalise_text("  a \t red\ncircle ") == "a red circle"
    assert normalise_text("cafe\u0301") == "café"  # NFC
    assert text_digest("A red circle") != text_digest("a red circle")  # case is kept
    assert text_digest("a red circle!") != text_digest("a red circle")


async def test_embeddings_round_trip_as_float32(guarded: GuardedRedis, prefix: str) -> None:
    cache = EmbeddingCache(guarded, prefix=prefix, ttl_seconds=60)
    vector = [struct.unpack("<f", struct.pack("<f", x))[0] for x in (0.1, -0.25, 0.3333)]
    await cache.put("model-a", "text", "d1", vector)
    assert await cache.get("model-a", "text", "d1") == vector
    assert await cache.get("model-b", "text", "d1") is None  # another model: another key
    assert await cache.get("model-a", "image", "d1") is None
    ttl = await guarded.client.ttl(cache.key("model-a", "text", "d1"))
    assert 0 < ttl <= 60


def _feature_stub(model_ids: list[str]) -> tuple[FastAPI, dict[str, int]]:
    app = FastAPI()
    calls = {"model": 0}

    @app.get("/model")
    async def model() -> dict[str, Any]:
        calls["model"] += 1
        return {"model_id": model_ids[0]}

    return app, calls


async def _until(condition: Callable[[], bool], seconds: float = 30.0) -> None:
    """Poll ``condition`` on the running loop until it holds; fail after ``seconds``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not condition():
        assert loop.time() < deadline, f"not true after {seconds}s"
        await asyncio.sleep(0.01)


async def test_model_id_is_learned_and_refreshed_in_the_background() -> None:
    model_ids = ["m1"]
    app, calls = _feature_stub(model_ids)
    client = ServiceClient("feature", "http://f", transport=httpx.ASGITransport(app=app))
    clock = Clock()
    models = ModelIdCache(client, ttl=30, clock=clock)
    assert models.current() is None  # unknown: a refresh starts, the caller does not wait
    await _until(lambda: models.current() == "m1")  # no second refresh while one is out
    assert calls["model"] == 1
    clock.now = 29
    assert models.current() == "m1" and calls["model"] == 1  # still trusted
    model_ids[0] = "m2"  # the feature service was restarted with another model
    clock.now = 31
    assert models.current() == "m1"  # stale: used once more while the refresh runs
    await _until(lambda: models.current() == "m2")
    assert calls["model"] == 2
    models.learn("m3")  # any embedding answer teaches it too
    assert models.current() == "m3"
    await client.aclose()


async def test_get_or_compute_uses_the_current_model_id(guarded: GuardedRedis, prefix: str) -> None:
    app, _ = _feature_stub(["m1"])
    client = ServiceClient("feature", "http://f", transport=httpx.ASGITransport(app=app))
    models = ModelIdCache(client, ttl=300)
    cache = EmbeddingCache(guarded, prefix=prefix, ttl_seconds=60)
    computed = 0

    async def compute() -> tuple[list[float], str]:
        nonlocal computed
        computed += 1
        return [0.5, 0.25], "m1"

    assert await cache.get_or_compute(models, "text", "d", compute) == ([0.5, 0.25], "m1")
    assert await cache.get_or_compute(models, "text", "d", compute) == ([0.5, 0.25], "m1")
    assert computed == 1
    models.learn("m2")  # a new model: the old vector must not be used for it
    assert (await cache.get_or_compute(models, "text", "d", compute))[1] == "m1"
    assert computed == 2
    await models.aclose()
    await client.aclose()
