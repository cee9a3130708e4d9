"""Result cache in Redis.

A cached page is keyed by everything that decides its content: the query (text, or the SHA-256
of the image bytes), target, top_k, filters, collection, and the collection's write version.
Every write through the gateway bumps the version, so older pages become unreachable at once
and simply expire. Redis trouble never fails a search: the cache is skipped and counted.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import redis.asyncio as redis
from prometheus_client import Counter, Gauge
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

CACHE_REQUESTS = Counter(
    "gateway_cache_requests_total",
    "Search result cache lookups by outcome (hit, miss, error).",
    ["result"],
)
CACHE_HIT_RATIO = Gauge(
    "multimodal_cache_hit_ratio",
    "Share of search result cache lookups answered from the cache since start.",
)


class ResultCache:
    def __init__(self, client: redis.Redis, *, prefix: str, ttl_seconds: int) -> None:
        self._redis = client
        self._prefix = prefix
        self._ttl = ttl_seconds
        self._hits = 0
        self._lookups = 0

    def _version_key(self, collection: str) -> str:
        return f"{self._prefix}:version:{collection}"

    async def version(self, collection: str) -> int | None:
        """The collection's write version, or None when Redis is unavailable (no caching)."""
        try:
            raw = await self._redis.get(self._version_key(collection))
        except RedisError as exc:
            log.warning("cache unavailable: %s", exc)
            return None
        return int(raw) if raw is not None else 0

    async def bump(self, collection: str) -> None:
        try:
            await self._redis.incr(self._version_key(collection))
        except RedisError as exc:
            # Without the bump a stale page could be served until its TTL ends.
            log.error("could not invalidate the cache of %s: %s", collection, exc)

    def key(self, version: int, parts: dict[str, Any]) -> str:
        canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        digest = hashlib.sha256(canonical.encode()).hexdigest()
        return f"{self._prefix}:search:{parts['collection']}:{version}:{digest}"

    async def get(self, key: str) -> dict[str, Any] | None:
        try:
            raw = await self._redis.get(key)
        except RedisError as exc:
            log.warning("cache read failed: %s", exc)
            CACHE_REQUESTS.labels("error").inc()
            return None
        self._lookups += 1
        if raw is None:
            CACHE_REQUESTS.labels("miss").inc()
        else:
            self._hits += 1
            CACHE_REQUESTS.labels("hit").inc()
        CACHE_HIT_RATIO.set(self._hits / self._lookups)
        return json.loads(raw) if raw is not None else None

    async def put(self, key: str, value: dict[str, Any]) -> None:
        if self._ttl <= 0:
            return
        try:
            await self._redis.set(key, json.dumps(value, ensure_ascii=False), ex=self._ttl)
        except RedisError as exc:
            log.warning("cache write failed: %s", exc)
