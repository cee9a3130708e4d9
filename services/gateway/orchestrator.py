"""The gateway's domain logic: search and item writes across feature, retrieval and metadata."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import orjson
from prometheus_client import Histogram

from services.gateway.cache import ResultCache
from services.gateway.embeddings import EmbeddingCache, ModelIdCache, normalise_text, text_digest
from services.gateway.fusion import Ranked, fuse_hits
from services.gateway.ratelimit import Charge
from services.gateway.schemas import Filters, SearchMode, Target
from shared.contracts.feature import FeatureClient
from shared.contracts.metadata import (
    CollectionDeletion,
    FilterRequest,
    HitsRequest,
    ItemForm,
    ItemMerge,
    ItemOut,
    KeywordSearchRequest,
    MetadataClient,
    StatusUpdate,
)
from shared.contracts.retrieval import DeleteRequest, RetrievalClient, SearchRequest, UpsertRequest
from shared.contracts.vectors import encode_vectors
from shared.http import ServiceClient
from shared.problems import ProblemError, ServiceUnavailable

log = logging.getLogger(__name__)

SEARCH_STAGE_SECONDS = Histogram(
    "gateway_search_stage_seconds",
    "Time a search spent in each stage, seen from the gateway: cache_lookup (Redis, before), "
    "embed (the feature service, when the query's vector was not cached), filter (metadata's "
    "allow-list), search (retrieval), keyword (metadata's full-text ranking), hydrate "
    "(metadata's items for the page), cache_save (Redis, after). Stages can overlap.",
    ["stage"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
# Bound once (and so present at 0 before the first search).
_STAGES = {
    stage: SEARCH_STAGE_SECONDS.labels(stage)
    for stage in ("cache_lookup", "embed", "filter", "search", "keyword", "hydrate", "cache_save")
}


@contextmanager
def _stage(name: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        _STAGES[name].observe(time.perf_counter() - started)


# Candidates taken from each ranking before a hybrid search fuses them.
HYBRID_CANDIDATES = 100
Embed = Callable[[], Awaitable[tuple[np.ndarray, str]]]


@dataclass
class Backends:
    """The services behind the gateway, each behind its typed client (shared/contracts); auth
    is plain HTTP, as its token endpoints are proxied byte for byte."""

    auth: ServiceClient
    feature: FeatureClient
    retrieval: RetrievalClient
    metadata: MetadataClient

    def http_clients(self) -> tuple[ServiceClient, ...]:
        return (self.auth, self.feature.http, self.retrieval.http, self.metadata.http)

    async def aclose(self) -> None:
        for client in self.http_clients():
            await client.aclose()


@dataclass(frozen=True)
class Upload:
    filename: str
    content_type: str
    data: bytes

    @cached_property
    def sha256(self) -> str:
        # Read for the page key and the embedding key: hashed once.
        return hashlib.sha256(self.data).hexdigest()

    def as_file(self) -> tuple[str, bytes, str]:
        return (self.filename or "upload", self.data, self.content_type)


@dataclass(frozen=True)
class SearchResult:
    # The page's JSON: sent as it is, and cached as it is.
    body: bytes
    cached: bool


def _retrieve_outcome(task: asyncio.Future[Any]) -> None:
    # An embedding abandoned for a refused filter may still fail; its error is not news.
    if not task.cancelled():
        task.exception()


class QueryEmbedding:
    """A search's query vector: read from the embedding cache in the same round trip as the
    page (``key``), else computed once by ``compute``, learnt, and written with the page."""

    def __init__(
        self,
        kind: str,
        digest: str,
        compute: Embed,
        embeddings: EmbeddingCache | None,
        models: ModelIdCache | None,
    ) -> None:
        self._kind = kind
        self._digest = digest
        self._compute = compute
        self._embeddings = embeddings
        self._models = models
        # The id the key is made with is the one a vector found under it belongs to, even if
        # a background refresh learns another id meanwhile.
        self._model_id = models.current() if models is not None else None
        self.key = (
            embeddings.lookup_key(self._model_id, kind, digest) if embeddings is not None else None
        )
        self._vector: tuple[np.ndarray, str] | None = None
        self._computed = False

    def found(self, raw: bytes | None) -> None:
        """What the lookup found under ``key``."""
        if self.key is None or self._embeddings is None or self._model_id is None:
            return
        vector = self._embeddings.decode(raw)
        if vector is not None:
            self._vector = (vector, self._model_id)

    async def __call__(self) -> tuple[np.ndarray, str]:
        if self._vector is None:
            with _stage("embed"):
                vector, model_id = await self._compute()
            if self._models is not None:
                self._models.learn(model_id)
            self._vector, self._computed = (vector, model_id), True
        return self._vector

    def entry(self) -> tuple[str, bytes, int] | None:
        """The cache write for a vector computed by this search, if any."""
        if not self._computed or self._embeddings is None or self._vector is None:
            return None
        vector, model_id = self._vector
        return self._embeddings.entry(model_id, self._kind, self._digest, vector)


class Orchestrator:
    def __init__(
        self,
        backends: Backends,
        cache: ResultCache,
        *,
        embeddings: EmbeddingCache | None = None,
        models: ModelIdCache | None = None,
    ) -> None:
        self.backends = backends
        self.cache = cache
        self.embeddings = embeddings
        self.models = models

    # -- search ---------------------------------------------------------------------------

    async def search_text(
        self,
        query: str,
        *,
        target: Target,
        top_k: int,
        collection: str,
        filters: Filters | None,
        mode: SearchMode = "vector",
        charge: Charge | None = None,
    ) -> SearchResult:
        # The same normalised text is embedded and keys both caches.
        query = normalise_text(query)
        cache_parts = {"text": query, "mode": mode}

        async def compute() -> tuple[np.ndarray, str]:
            vectors, model_id = await self._embed_texts([query])
            return vectors[0], model_id

        embed = (
            None
            if mode == "keyword"
            else self._query_embedding("text", text_digest(query), compute)
        )

        async def rank() -> tuple[list[Ranked], str | None]:
            if embed is None:
                return await self._keyword_hits(query, target, top_k, collection, filters), None
            if mode == "vector":
                return await self._vector_hits(embed, target, top_k, collection, filters)
            depth = max(top_k, HYBRID_CANDIDATES)
            (vector_hits, model_id), keyword_hits = await asyncio.gather(
                self._vector_hits(embed, target, depth, collection, filters),
                self._keyword_hits(query, target, depth, collection, filters),
            )
            return fuse_hits(vector_hits, keyword_hits, top_k=top_k), model_id

        return await self._search(
            cache_parts, rank, embed, target, top_k, collection, filters, charge
        )

    async def search_image(
        self,
        image: Upload,
        *,
        target: Target,
        top_k: int,
        collection: str,
        filters: Filters | None,
        charge: Charge | None = None,
    ) -> SearchResult:
        # Keyed by the bytes' hash, never by the uploaded file's name.
        cache_parts = {"image_sha256": image.sha256}

        async def compute() -> tuple[np.ndarray, str]:
            vectors, model_id = await self._embed_images([image])
            return vectors[0], model_id

        embed = self._query_embedding("image", image.sha256, compute)

        async def rank() -> tuple[list[Ranked], str | None]:
            return await self._vector_hits(embed, target, top_k, collection, filters)

        return await self._search(
            cache_parts, rank, embed, target, top_k, collection, filters, charge
        )

    def _query_embedding(self, kind: str, digest: str, compute: Embed) -> QueryEmbedding:
        return QueryEmbedding(kind, digest, compute, self.embeddings, self.models)

    async def _search(
        self,
        query_parts: dict[str, str],
        rank: Callable[[], Awaitable[tuple[list[Ranked], str | None]]],
        embed: QueryEmbedding | None,
        target: Target,
        top_k: int,
        collection: str,
        filters: Filters | None,
        charge: Charge | None,
    ) -> SearchResult:
        """One page of results: from the cache, or ranked by ``rank`` and hydrated. Redis is
        asked once before (the request's rate-limit ``charge``, the page, else the query's
        embedding) and once after (both kept)."""
        parts = {
            **query_parts,
            "target": target,
            "top_k": top_k,
            "collection": collection,
            "filters": filters,
        }
        with _stage("cache_lookup"):
            found = await self.cache.lookup(parts, embed.key if embed is not None else None, charge)
        if found.page is not None:
            return SearchResult(found.page, cached=True)
        if embed is not None:
            embed.found(found.extra)
        hits, model_id = await rank()
        body = {
            "collection": collection,
            "target": target,
            "top_k": top_k,
            "model_id": model_id,
            "results": await self._hydrate(collection, hits, target),
        }
        page = orjson.dumps(body)
        with _stage("cache_save"):
            await self.cache.save(found.key, page, embed.entry() if embed is not None else None)
        return SearchResult(page, cached=False)

    async def _vector_hits(
        self, embed: Embed, target: Target, top_k: int, collection: str, filters: Filters | None
    ) -> tuple[list[Ranked], str]:
        """Nearest neighbours of the query vector, restricted by the filters' allow-list."""
        allow_ids: list[int] | None = None
        if filters:
            # The query is embedded while metadata applies the filters; a filter it refuses
            # (a client's 4xx) cancels the embedding instead of waiting for it.
            embedding = asyncio.ensure_future(embed())
            embedding.add_done_callback(_retrieve_outcome)
            try:
                with _stage("filter"):
                    allowed = await self.backends.metadata.filter(
                        collection, FilterRequest(filters=filters, target=target)
                    )
            except BaseException:
                embedding.cancel()
                raise
            allow_ids = allowed.item_ids if target == "image" else allowed.caption_ids
            vector, model_id = await embedding
            if not allow_ids:
                return [], model_id
        else:
            vector, model_id = await embed()
        with _stage("search"):
            found = await self.backends.retrieval.search(
                collection,
                SearchRequest(
                    modality=target,
                    vectors_base64=encode_vectors(vector[np.newaxis]),
                    top_k=top_k,
                    allow_ids=allow_ids,
                    model_id=model_id,
                ),
            )
        return [Ranked(hit.id, hit.score) for hit in found.results[0]], model_id

    async def _keyword_hits(
        self, query: str, target: Target, top_k: int, collection: str, filters: Filters | None
    ) -> list[Ranked]:
        """Full-text matches over captions and tags, best first (the metadata service ranks)."""
        with _stage("keyword"):
            found = await self.backends.metadata.keyword_search(
                collection,
                KeywordSearchRequest(query=query, top_k=top_k, target=target, filters=filters),
            )
        return [Ranked(hit.id, hit.score) for hit in found.results]

    async def _hydrate(
        self, collection: str, hits: list[Ranked], target: Target
    ) -> list[dict[str, Any]]:
        """Turn (id, score) pairs into results with their items, in one metadata call; ids whose
        item is gone or not yet indexed are dropped rather than shown half-made."""
        if not hits:
            return []
        with _stage("hydrate"):
            answer = await self.backends.metadata.hits(
                collection, HitsRequest(target=target, ids=[hit.id for hit in hits])
            )
        found = {entry.id: entry for entry in answer.hits}
        results: list[dict[str, Any]] = []
        for hit in hits:
            if (entry := found.get(hit.id)) is None:
                continue
            results.append(
                {
                    "rank": len(results) + 1,
                    "score": hit.score,
                    "item_id": entry.item.id,
                    "caption": entry.caption.model_dump() if entry.caption else None,
                    "item": public_item(entry.item),
                }
            )
        return results

    async def _embed_images(self, images: list[Upload]) -> tuple[np.ndarray, str]:
        answer = await self.backends.feature.embed_images([image.as_file() for image in images])
        return answer.matrix(), answer.model_id

    async def _embed_texts(self, texts: list[str]) -> tuple[np.ndarray, str]:
        answer = await self.backends.feature.embed_texts(texts)
        return answer.matrix(), answer.model_id

    # -- items ----------------------------------------------------------------------------

    async def add_item(
        self,
        image: Upload,
        *,
        collection: str,
        captions: list[str],
        attributes: str | None,
        tags: list[str] | None = None,
        source_uri: str | None = None,
    ) -> dict[str, Any]:
        """Store, embed and index one item. Answers only once its vectors are durable in the
        retrieval service; on failure nothing half-made stays searchable."""

        # Embedding first: a corrupt image or a bad caption is refused before anything is stored.
        # The image and its captions at once: two forward passes the feature service can run
        # side by side (or merge with other requests'), not one after the other.
        async def embed_captions() -> tuple[np.ndarray | None, str | None]:
            if not captions:
                return None, None
            return await self._embed_texts(captions)

        image_task = asyncio.ensure_future(self._embed_images([image]))
        captions_task = asyncio.ensure_future(embed_captions())
        await asyncio.gather(image_task, captions_task, return_exceptions=True)
        # Both are awaited to the end; a bad image is reported before a bad caption.
        image_vectors, model_id = image_task.result()
        caption_vectors, caption_model_id = captions_task.result()
        if caption_model_id not in (None, model_id):
            raise ServiceUnavailable(
                "the feature model changed while this item was embedded; send it again",
                code="model_changed",
                headers={"Retry-After": "1"},
            )

        form = ItemForm(
            collection=collection,
            captions=captions,
            attributes=attributes,
            tags=tags or [],
            source_uri=source_uri,
        )
        item = await self.backends.metadata.create_item(form, image.as_file())
        caption_ids = [c.id for c in item.captions]
        try:
            await self._upsert(collection, "image", model_id, [item.id], image_vectors)
            if caption_ids and caption_vectors is not None:
                await self._upsert(collection, "text", model_id, caption_ids, caption_vectors)
            indexed = await self.backends.metadata.set_status(
                item.id, StatusUpdate(status="indexed", model_id=model_id)
            )
        except ProblemError as exc:
            await self._undo_add(collection, item.id, caption_ids, f"{exc.code}: {exc.detail}")
            raise
        await self.cache.bump(collection)
        return public_item(indexed)

    async def merge_item(self, item_id: int, merge: ItemMerge) -> dict[str, Any]:
        """Add what a duplicate brings to an indexed item (docs/metadata.md): metadata merges
        it, then the captions it added are embedded and upserted, as an upload's are. Answers
        once they are searchable. If their vectors cannot be stored, those captions are taken
        back and the error returned; tags and attributes need no vectors and stay merged."""
        merged = await self.backends.metadata.merge_item(item_id, merge)
        item = merged.item
        added = [caption.id for caption in merged.added_captions]
        try:
            if added:
                try:
                    vectors, model_id = await self._embed_texts(
                        [caption.text for caption in merged.added_captions]
                    )
                    await self._upsert(item.collection, "text", model_id, added, vectors)
                except ProblemError as exc:
                    await self._take_back(item, added, f"{exc.code}: {exc.detail}")
                    raise
        finally:
            if merged.changed:
                await self.cache.bump(item.collection)
        return {**merged.model_dump(mode="json"), "item": public_item(item)}

    async def _take_back(self, item: ItemOut, caption_ids: list[int], reason: str) -> None:
        log.warning("taking back captions %s of item %s: %s", caption_ids, item.id, reason)
        try:
            await self.backends.metadata.delete_captions(item.id, caption_ids)
            await self._delete_vectors(item.collection, [], caption_ids)
        except ProblemError as exc:
            # Captions without vectors (reconcile's "missing", re-embedded by its repair) or
            # vectors without captions (its "orphans").
            log.error("could not take back captions of item %s: %s", item.id, exc.detail)

    async def _upsert(
        self,
        collection: str,
        modality: Target,
        model_id: str,
        ids: list[int],
        vectors: np.ndarray,
    ) -> None:
        await self.backends.retrieval.upsert(
            collection,
            UpsertRequest(
                modality=modality,
                model_id=model_id,
                ids=ids,
                vectors_base64=encode_vectors(vectors),
            ),
        )

    async def _undo_add(
        self, collection: str, item_id: int, caption_ids: list[int], reason: str
    ) -> None:
        try:
            await self.backends.metadata.set_status(
                item_id, StatusUpdate(status="failed", error=reason[:4000])
            )
            await self._delete_vectors(collection, [item_id], caption_ids)
        except ProblemError as exc:
            # The item stays 'failed' or 'pending' and is never shown; reconcile repairs it.
            log.error("could not roll back item %s: %s", item_id, exc.detail)

    async def _delete_vectors(
        self, collection: str, item_ids: list[int], caption_ids: list[int]
    ) -> None:
        # Item ids and caption ids are separate id spaces: delete each in its own modality.
        modalities: tuple[tuple[Target, list[int]], ...] = (
            ("image", item_ids),
            ("text", caption_ids),
        )
        for modality, ids in modalities:
            if ids:
                await self.backends.retrieval.delete(
                    collection, DeleteRequest(ids=ids, modality=modality)
                )

    async def get_item(self, item_id: int) -> dict[str, Any]:
        return public_item(await self.backends.metadata.item(item_id))

    async def delete_item(self, item_id: int) -> None:
        item = await self.backends.metadata.item(item_id)
        # Metadata first: search results are resolved through metadata, so the item disappears
        # from results at once even if removing its vectors fails below.
        await self.backends.metadata.delete_item(item_id)
        await self.cache.bump(item.collection)
        await self._delete_vectors(item.collection, [item_id], [c.id for c in item.captions])

    # -- collections ------------------------------------------------------------------------

    async def delete_collection(self, collection: str) -> CollectionDeletion:
        """Start the collection's deletion: metadata hides it at once (every answer is a 404
        from then on) and its cached pages become unreachable; then its vectors are dropped and
        metadata purges its rows in the background. A failure after the start leaves the
        deletion ``dropping``, which ``finish_deletion`` completes later (``Maintenance``)."""
        deletion = await self.backends.metadata.delete_collection(collection)
        await self.cache.bump(collection)
        try:
            return await self.finish_deletion(deletion)
        except ProblemError as exc:
            if exc.status < 500:
                raise
            log.warning(
                "deletion %d of %s: vectors not dropped yet (%s); retried in the background",
                deletion.id,
                collection,
                exc.code,
            )
            return deletion

    async def finish_deletion(self, deletion: CollectionDeletion) -> CollectionDeletion:
        """Drop a ``dropping`` deletion's vectors and report it to metadata, which then purges
        the rows and frees the name. Safe to repeat, and to run from two places at once."""
        if deletion.state != "dropping":
            return deletion
        await self.backends.retrieval.drop(deletion.collection)
        return await self.backends.metadata.vectors_dropped(deletion.id)


def public_item(item: ItemOut) -> dict[str, Any]:
    """An item as the public API shows it: metadata's fields and the gateway's image URL."""
    return {**item.model_dump(mode="json"), "image_url": f"/items/{item.id}/image"}
