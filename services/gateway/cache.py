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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge

from services.gateway.redis_guard import GuardedRedis, RedisUnavailable, ScriptCall, run_scripts
from shared.metrics import computed_gauge

if TYPE_CHECKING:
    from services.gateway.ratelimit import Charge

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
    # With several workers, the window of the worker that wrote it last (every few seconds).
    multiprocess_mode="livemostrecent",
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


def version_key(prefix: str, collection: str) -> str:
    """Where a collection's write version lives; every cached page of it is keyed under it."""
    return f"{prefix}:version:{collection}"


def invalidate(redis_url: str, prefix: str, collection: str) -> None:
    """What ``ResultCache.bump`` does, for a tool that changes a collection behind the
    gateway's back (``crossmodal reconcile --repair``): a new random version, so every page
    cached for the old one becomes unreachable. Synchronous, short timeouts."""
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.set(version_key(prefix, collection), secrets.token_hex(8))
    finally:
        client.close()


@dataclass(frozen=True)
class CacheLookup:
    """What one round trip to Redis found for a search."""

    # Where the page goes once computed; None when the cache is not usable for this search
    # (Redis away, or a write of the collection not yet applied to its version).
    key: str | None
    # The cached page, JSON as it was sent: served as it is.
    page: bytes | None
    # The value under ``also_get`` when there was no page (the query's embedding).
    extra: bytes | None


# One round trip for a search: the collection's version (a missing one becomes a new random
# one, never a reused one), the page under it, and, on a miss, the query's embedding. The page
# key is built from the version inside the script, so this needs a Redis that is not a cluster
# (or keys in one slot), which is how the gateway uses it.
_LOOKUP = """
redis.call('SET', KEYS[1], ARGV[1], 'NX')
local version = redis.call('GET', KEYS[1])
local page = redis.call('GET', ARGV[2] .. version .. ':' .. ARGV[3])
local extra = false
if not page and ARGV[4] ~= '' then extra = redis.call('GET', ARGV[4]) end
return {version, page, extra}
"""


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
        self._lookup = redis.client.register_script(_LOOKUP)
        # The gauge is computed from the window, so it decays to NaN when searches stop.
        computed_gauge(CACHE_HIT_RATIO, self.ratio.value)

    def _version_key(self, collection: str) -> str:
        return version_key(self._prefix, collection)

    def _page_prefix(self, collection: str) -> str:
        return f"{self._prefix}:search:{collection}:"

    @staticmethod
    def _digest(parts: dict[str, Any]) -> str:
        canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def key(self, version: str, parts: dict[str, Any]) -> str:
        """The page key of ``parts`` (which names the collection) under ``version``."""
        return f"{self._page_prefix(parts['collection'])}{version}:{self._digest(parts)}"

    async def lookup(
        self, parts: dict[str, Any], also_get: str | None = None, charge: Charge | None = None
    ) -> CacheLookup:
        """The cached page of ``parts`` under the collection's current version, and on a miss
        the value under ``also_get``: one round trip, which also carries the request's rate-limit
        ``charge`` (settled first: a refused request raises before anything is served). Redis
        trouble is a miss without a key."""
        collection = parts["collection"]
        if collection in self._pending_bumps:
            await self.bump(collection)
            if collection in self._pending_bumps:
                if charge is not None:
                    await charge.take()
                return CacheLookup(None, None, None)
        digest = self._digest(parts)
        lookup = ScriptCall(
            self._lookup,
            [self._version_key(collection)],
            [secrets.token_hex(8), self._page_prefix(collection), digest, also_get or ""],
        )
        calls = [lookup] if charge is None else [charge.call(), lookup]
        try:
            replies = await self._redis.run(lambda r: run_scripts(r, calls))
        except RedisUnavailable as exc:
            if charge is not None:
                charge.unavailable()
            log.warning("cache unavailable: %s", exc)
            CACHE_REQUESTS.labels("error").inc()
            return CacheLookup(None, None, None)
        if charge is not None:
            charge.settle(replies[0])
        raw_version, page, extra = replies[-1]
        version = raw_version.decode() if isinstance(raw_version, bytes) else str(raw_version)
        hit = page is not None
        CACHE_REQUESTS.labels("hit" if hit else "miss").inc()
        self.ratio.record(hit)
        return CacheLookup(f"{self._page_prefix(collection)}{version}:{digest}", page, extra)

    async def save(
        self, key: str | None, page: bytes, also_set: tuple[str, bytes, int] | None = None
    ) -> None:
        """Store a page under the key ``lookup`` gave (none: not cached) and, in the same round
        trip, ``also_set`` (key, value, ttl seconds). A lost write only costs a later miss."""
        writes: list[tuple[str, bytes, int]] = []
        if key is not None and self._ttl > 0:
            writes.append((key, page, self._ttl))
        if also_set is not None and also_set[2] > 0:
            writes.append(also_set)
        if not writes:
            return

        def store(r: Any) -> Any:
            pipeline = r.pipeline(transaction=False)
            for name, value, ttl in writes:
                pipeline.set(name, value, ex=ttl)
            return pipeline.execute()

        try:
            await self._redis.run(store)
        except RedisUnavailable as exc:
            log.warning("cache write failed: %s", exc)

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
