"""Result and embedding caches in the real Redis, the windowed hit ratio, and the model-id cache."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY

from services.gateway.cache import CacheLookup, ResultCache, WindowedRatio, invalidate
from services.gateway.embeddings import (
    EmbeddingCache,
    ModelIdCache,
    normalise_text,
    text_digest,
)
from services.gateway.orchestrator import QueryEmbedding
from services.gateway.redis_guard import GuardedRedis
from shared.contracts.feature import FeatureClient, ModelInfo
from shared.http import ServiceClient
from tests.services.gateway.conftest import REDIS_URL

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
    found = await cache.lookup(PARTS)
    assert found.key is not None and found.page is None
    await cache.save(found.key, b'{"results":[1]}')
    again = await cache.lookup(PARTS)
    assert (again.key, again.page) == (found.key, b'{"results":[1]}')
    assert 0 < await guarded.client.ttl(found.key) <= 60
    await cache.bump("c")
    after = await cache.lookup(PARTS)
    assert after.key is not None and after.key != found.key
    assert after.page is None


async def test_a_tool_behind_the_gateway_s_back_invalidates_its_pages(
    guarded: GuardedRedis, prefix: str
) -> None:
    """``crossmodal reconcile --repair`` changes collections without the gateway: it bumps the
    version through the gateway's own module, and the cached pages become unreachable."""
    cache = ResultCache(guarded, prefix=prefix, ttl_seconds=60)
    found = await cache.lookup(PARTS)
    await cache.save(found.key, b'{"results":[]}')
    assert (await cache.lookup(PARTS)).page is not None
    invalidate(REDIS_URL, prefix, "c")
    after = await cache.lookup(PARTS)
    assert after.page is None and after.key != found.key


async def test_every_key_part_matters(guarded: GuardedRedis, prefix: str) -> None:
    cache = ResultCache(guarded, prefix=prefix, ttl_seconds=60)
    keys = {
        cache.key("v1", {**PARTS, **change})
        for change in (
            {},
            {"text": "a blue circle"},
            {"target": "text"},
            {"top_k": 6},
            {"filters": {"shape": "circle"}},
        )
    }
    assert len(keys) == 5
    assert cache.key("v1", dict(reversed(PARTS.items()))) in keys  # order does not matter
    # The lookup's key is the same function of the parts, under the collection's version.
    found = await cache.lookup(PARTS)
    version = await guarded.client.get(f"{prefix}:version:c")
    assert found.key == cache.key(version.decode(), PARTS)


async def test_a_lost_version_never_makes_old_pages_reachable(
    guarded: GuardedRedis, prefix: str
) -> None:
    cache = ResultCache(guarded, prefix=prefix, ttl_seconds=60)
    found = await cache.lookup(PARTS)
    assert found.key is not None
    await cache.save(found.key, b'{"stale":true}')
    await guarded.client.delete(f"{prefix}:version:c")  # evicted, or Redis restarted empty
    fresh = await cache.lookup(PARTS)
    assert fresh.key is not None and fresh.key != found.key
    assert fresh.page is None


async def test_redis_down_skips_the_cache_and_remembers_pending_invalidations(
    dead: GuardedRedis, guarded: GuardedRedis, prefix: str
) -> None:
    down = ResultCache(dead, prefix=prefix, ttl_seconds=60)
    assert await down.lookup(PARTS) == CacheLookup(None, None, None)
    await down.save("any", b"{}")  # no error
    await down.bump("c")  # a write while Redis is away ...
    assert down._pending_bumps == {"c"}
    # ... is applied before the cache is used again (same cache object, Redis back).
    up = ResultCache(guarded, prefix=prefix, ttl_seconds=60)
    before = (await up.lookup(PARTS)).key
    down._redis = guarded
    after = (await down.lookup(PARTS)).key
    assert after is not None and after != before
    assert not down._pending_bumps


async def test_the_breaker_skips_a_dead_redis_at_once(dead: GuardedRedis, prefix: str) -> None:
    cache = ResultCache(dead, prefix=prefix, ttl_seconds=60)
    await cache.lookup(PARTS)
    assert dead.breaker.state == "open"
    name = dead.breaker.name
    before = REGISTRY.get_sample_value(
        "multimodal_circuit_breaker_rejections_total", {"target": name}
    )
    for _ in range(20):
        assert (await cache.lookup(PARTS)).page is None
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
    found = await cache.lookup(PARTS)
    await cache.save(found.key, b'{"r":1}')
    await cache.lookup(PARTS)
    await cache.lookup(PARTS)
    assert REGISTRY.get_sample_value("multimodal_cache_hit_ratio") == pytest.approx(2 / 3)


def test_text_normalisation_keeps_what_changes_an_embedding() -> None:
    assert normalise_text("  a \t red\ncircle ") == "a red circle"
    assert normalise_text("cafe\u0301") == "café"  # NFC
    assert text_digest("A red circle") != text_digest("a red circle")  # case is kept
    assert text_digest("a red circle!") != text_digest("a red circle")


async def test_embeddings_round_trip_as_float32_with_the_page_round_trips(
    guarded: GuardedRedis, prefix: str
) -> None:
    cache = ResultCache(guarded, prefix=prefix, ttl_seconds=60)
    embeddings = EmbeddingCache(prefix=prefix, ttl_seconds=60)
    vector = np.array([0.1, -0.25, 0.3333], dtype=np.float32)
    key, value, ttl = embeddings.entry("model-a", "text", "d1", vector)
    await cache.save(None, b"", (key, value, ttl))  # no page to keep, the embedding still
    found = await cache.lookup(PARTS, also_get=key)
    assert found.page is None
    np.testing.assert_array_equal(embeddings.decode(found.extra), vector)
    assert embeddings.decode(None) is None
    assert embeddings.decode(b"\x00\x00\x80") is None  # not whole float32 values
    # Another model or kind: another key.
    assert key != embeddings.key("model-b", "text", "d1")
    assert key != embeddings.key("model-a", "image", "d1")
    assert 0 < await guarded.client.ttl(key) <= 60
    # A page found: the embedding is not needed and not read.
    await cache.save(found.key, b"{}")
    assert (await cache.lookup(PARTS, also_get=key)).extra is None


def _feature_stub(model_ids: list[str]) -> tuple[FastAPI, dict[str, int]]:
    app = FastAPI()
    calls = {"model": 0}

    @app.get("/model")
    async def model() -> dict[str, Any]:
        calls["model"] += 1
        return ModelInfo(
            model_id=model_ids[0],
            dim=2,
            image_size=32,
            max_text_tokens=16,
            device="cpu",
            dtype="float32",
            runtime="torch",
            architecture="CLIPModel",
        ).model_dump()

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
    client = FeatureClient(
        ServiceClient("feature", "http://f", transport=httpx.ASGITransport(app=app))
    )
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


async def test_a_query_embedding_is_used_under_the_current_model_id_only() -> None:
    app, _ = _feature_stub(["m1"])
    client = FeatureClient(
        ServiceClient("feature", "http://f", transport=httpx.ASGITransport(app=app))
    )
    models = ModelIdCache(client, ttl=300)
    models.learn("m1")
    embeddings = EmbeddingCache(prefix="p", ttl_seconds=60)
    computed = 0

    async def compute() -> tuple[np.ndarray, str]:
        nonlocal computed
        computed += 1
        return np.array([0.5, 0.25], dtype=np.float32), "m1"

    def query() -> QueryEmbedding:
        return QueryEmbedding("text", "d", compute, embeddings, models)

    first = query()
    assert first.key == embeddings.key("m1", "text", "d")
    first.found(None)  # not cached yet
    vector, model_id = await first()
    assert (vector.tolist(), model_id) == ([0.5, 0.25], "m1")
    entry = first.entry()
    assert entry is not None and entry[0] == first.key
    second = query()
    second.found(entry[1])  # what the lookup read under the key
    vector, model_id = await second()
    assert (vector.tolist(), model_id) == ([0.5, 0.25], "m1")
    assert computed == 1 and second.entry() is None  # nothing new to write
    models.learn("m2")  # a new model: the old vector must not be used for it
    third = query()
    assert third.key == embeddings.key("m2", "text", "d") != entry[0]
    third.found(None)
    assert (await third())[1] == "m1"
    assert computed == 2
    await models.aclose()
    await client.aclose()
