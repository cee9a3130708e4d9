"""Query-embedding cache in Redis, keyed by the feature service's model id and the normalised
query text or the SHA-256 of the query image's bytes.

The model id is only known from the feature service: each embedding answer carries it, and
``GET /model`` is asked again in the background once the known id is older than its TTL, so a
model swap is noticed within that time even if every query hits the cache. Vectors of two models
can never mix: the id is part of the key, and the retrieval service refuses vectors of another
model than the collection's. A cached embedding also keeps a repeated query answerable while the
feature service is down.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import unicodedata
from collections.abc import Callable

import numpy as np
from prometheus_client import Counter
from pydantic import ValidationError

from shared.contracts.feature import FeatureClient
from shared.problems import ProblemError

log = logging.getLogger(__name__)

EMBEDDING_CACHE_REQUESTS = Counter(
    "gateway_embedding_cache_requests_total",
    "Query-embedding cache lookups by outcome (hit, miss, error, skipped: model id unknown).",
    ["result"],
)
for _result in ("hit", "miss", "error", "skipped"):
    EMBEDDING_CACHE_REQUESTS.labels(_result)


def normalise_text(text: str) -> str:
    """The text that is both embedded and used as the key: NFC, whitespace runs collapsed.
    Nothing that could change the embedding (case, punctuation) is touched."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def text_digest(text: str) -> str:
    return hashlib.sha256(normalise_text(text).encode()).hexdigest()


class ModelIdCache:
    """The feature service's current model id, trusted for ``ttl`` seconds."""

    def __init__(
        self, feature: FeatureClient, *, ttl: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._feature = feature
        self.ttl = ttl
        self._clock = clock
        self._model_id: str | None = None
        self._learned_at = float("-inf")
        self._refresh: asyncio.Task[None] | None = None

    def learn(self, model_id: str) -> None:
        if self._model_id != model_id:
            if self._model_id is not None:
                log.info("the feature model changed: %s -> %s", self._model_id, model_id)
            self._model_id = model_id
        self._learned_at = self._clock()

    def current(self) -> str | None:
        """The known model id (None before the first answer). When it is stale a background
        refresh starts, and the known id is used meanwhile: a request never waits for it."""
        if self._clock() - self._learned_at >= self.ttl and (
            self._refresh is None or self._refresh.done()
        ):
            self._refresh = asyncio.create_task(self.refresh())
        return self._model_id

    async def refresh(self) -> None:
        try:
            self.learn((await self._feature.model(timeout=2.0)).model_id)
        except (ProblemError, ValidationError) as exc:
            log.info("could not refresh the feature model id: %s", exc)

    async def aclose(self) -> None:
        if self._refresh is not None and not self._refresh.done():
            self._refresh.cancel()


class EmbeddingCache:
    """Keys and values of the query-embedding cache; the reads and writes ride on the result
    cache's round trips (``ResultCache.lookup``'s ``also_get``, ``save``'s ``also_set``)."""

    def __init__(self, *, prefix: str, ttl_seconds: int) -> None:
        self._prefix = prefix
        self.ttl = ttl_seconds

    def key(self, model_id: str, kind: str, digest: str) -> str:
        # The model id is free text (a hub name, a path hash): hashed into the key with the rest.
        scope = hashlib.sha256(f"{model_id}\0{kind}\0{digest}".encode()).hexdigest()
        return f"{self._prefix}:emb:{kind}:{scope}"

    def lookup_key(self, model_id: str | None, kind: str, digest: str) -> str | None:
        """The key to read under the model id the search runs with; None while it is unknown."""
        if model_id is None or self.ttl <= 0:
            EMBEDDING_CACHE_REQUESTS.labels("skipped").inc()
            return None
        return self.key(model_id, kind, digest)

    @staticmethod
    def decode(raw: bytes | None) -> np.ndarray | None:
        """The vector stored by ``entry``; None (a miss) for nothing or a damaged value."""
        EMBEDDING_CACHE_REQUESTS.labels("miss" if raw is None else "hit").inc()
        if not raw or len(raw) % 4:
            return None
        # float32 little-endian: exact for vectors the feature service computed in float32.
        return np.frombuffer(raw, dtype="<f4").astype(np.float32)

    def entry(
        self, model_id: str, kind: str, digest: str, vector: np.ndarray
    ) -> tuple[str, bytes, int]:
        """(key, value, ttl) that stores ``vector`` for later ``lookup_key`` reads."""
        value = np.ascontiguousarray(vector, dtype="<f4").tobytes()
        return self.key(model_id, kind, digest), value, self.ttl
