"""Result cache in Redis.

A cached page is keyed by everything that decides its content: the query (normalised text, or
the SHA-256 of the image bytes, never the uploaded file's name), target, top_k, filters,
collection, and the collection's write version. Every write through the gateway replaces the
version with a new random one, so older pages become unreachable at once and simply expire; a
version lost with Redis (a restart, an eviction) is replaced by a new random one too, so a lost
version can never make an old page reachable again. Redis trouble never fails a search: the
cache is skipped and counted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from prometheus_client import Counter, Gauge

from services.gateway.redis_guard import GuardedRedis, RedisUnavailable

log = logging.getLogger(__name__)

CACHE_REQUESTS = Counter(
    "gateway_cache_requests_total",
    "Search result cache lookups by outcome (hit, miss, error).",
    ["result"],
)
CACHE_HIT_RATIO = Gauge(
    "multimodal_cache_hit_ratio",
    "Share of search result cache lookups answered from the cache over the last window "
    "(GATEWAY_CACHE_WINDOW_SECONDS, default 5 minutes); NaN when there was no lookup.",
)


class WindowedRatio:
    """Hits over lookups in the last ``window`` seconds, in ``buckets`` time slices (so old
    lookups leave the window a slice at a time, without keeping each one)."""

    def __init__(
        self, window: float, *, buckets: int = 30, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.slice = window / buckets
        self.buckets = buckets
        self._clock = clock
        self._slices: deque[list[int]] = deque()  # [slice index, hits, lookups]

    def _trim(self, now_slice: int) -> None:
        while self._slices and self._slices[0][0] <= now_slice - self.buckets:
            self._slices.popleft()

    def record(self, hit: bool) -> None:
        now_slice = math.floor(self._clock() / self.slice)
        self._trim(now_slice)
        if not self._slices or self._slices[-1][0] != now_slice:
            self._slices.append([now_slice, 0, 0])
        self._slices[-1][1] += int(hit)
        self._slices[-1][2] += 1

    def value(self) -> float:
        self._trim(math.floor(self._clock() / self.slice))
        lookups = sum(s[2] for s in self._slices)
        return sum(s[1] for s in self._slices) / lookups if lookups else math.nan


class ResultCache:
    def __init__(
        self, redis: GuardedRedis, *, prefix: str, ttl_seconds: int, window_seconds: float = 300
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._ttl = ttl_seconds
        self.ratio = WindowedRatio(window_seconds)
        # Collections written while Redis was away: their version must change before any
        # cached page of theirs is served again.
        self._pending_bumps: set[str] = set()
        # The gauge is computed at scrape time, so it decays to NaN when searches stop.
        CACHE_HIT_RATIO.set_function(self.ratio.value)

    def _version_key(self, collection: str) -> str:
        return f"{self._prefix}:version:{collection}"

    async def version(self, collection: str) -> str | None:
        """The collection's write version, or None when Redis is unavailable (no caching)."""
        if collection in self._pending_bumps:
            await self.bump(collection)
            if collection in self._pending_bumps:
                return None
        key = self._version_key(collection)
        fresh = secrets.token_hex(8)
        try:
            # SET NX then GET: a missing version becomes a new random one, never a reused one.
            _, raw = await self._redis.run(
                lambda r: r.pipeline(transaction=False).set(key, fresh, nx=True).get(key).execute()
            )
        except RedisUnavailable as exc:
            log.warning("cache unavailable: %s", exc)
            return None
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    async def bump(self, collection: str) -> None:
        try:
            await self._redis.run(
                lambda r: r.set(self._version_key(collection), secrets.token_hex(8))
            )
        except RedisUnavailable as exc:
            # Without the bump a stale page could be served until its TTL ends: remember it.
            log.error("could not invalidate the cache of %s: %s", collection, exc)
            self._pending_bumps.add(collection)
            return
        self._pending_bumps.discard(collection)

    def key(self, version: str, parts: dict[str, Any]) -> str:
        canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        digest = hashlib.sha256(canonical.encode()).hexdigest()
        return f"{self._prefix}:search:{parts['collection']}:{version}:{digest}"

    async def get(self, key: str) -> dict[str, Any] | None:
        try:
            raw = await self._redis.run(lambda r: r.get(key))
        except RedisUnavailable as exc:
            log.warning("cache read failed: %s", exc)
            CACHE_REQUESTS.labels("error").inc()
            return None
        hit = raw is not None
        CACHE_REQUESTS.labels("hit" if hit else "miss").inc()
        self.ratio.record(hit)
        return json.loads(raw) if raw is not None else None

    async def put(self, key: str, value: dict[str, Any]) -> None:
        if self._ttl <= 0:
            return
        payload = json.dumps(value, ensure_ascii=False)
        try:
            await self._redis.run(lambda r: r.set(key, payload, ex=self._ttl))
        except RedisUnavailable as exc:
            log.warning("cache write failed: %s", exc)
