"""The gateway's domain logic: search and item writes across feature, retrieval and metadata."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from services.gateway.cache import ResultCache
from services.gateway.embeddings import EmbeddingCache, ModelIdCache, normalise_text, text_digest
from services.gateway.schemas import Filters, Target
from shared.http import ServiceClient
from shared.problems import ProblemError

log = logging.getLogger(__name__)


@dataclass
class Backends:
    auth: ServiceClient
    feature: ServiceClient
    retrieval: ServiceClient
    metadata: ServiceClient

    async def aclose(self) -> None:
        for client in (self.auth, self.feature, self.retrieval, self.metadata):
            await client.aclose()


@dataclass(frozen=True)
class Upload:
    filename: str
    content_type: str
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def as_file(self) -> tuple[str, bytes, str]:
        return (self.filename or "upload", self.data, self.content_type)


@dataclass(frozen=True)
class SearchResult:
    body: dict[str, Any]
    cached: bool


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
        self, query: str, *, target: Target, top_k: int, collection: str, filters: Filters | None
    ) -> SearchResult:
        # The same normalised text is embedded and keys both caches.
        query = normalise_text(query)
        cache_parts = {"text": query}

        async def compute() -> tuple[list[float], str]:
            response = await self.backends.feature.request(
                "POST", "/embed/text", json={"texts": [query]}, retry=True
            )
            body = response.json()
            return body["vectors"][0], body["model_id"]

        async def embed() -> tuple[list[float], str]:
            return await self._embed_query("text", text_digest(query), compute)

        return await self._search(cache_parts, embed, target, top_k, collection, filters)

    async def search_image(
        self, image: Upload, *, target: Target, top_k: int, collection: str, filters: Filters | None
    ) -> SearchResult:
        # Keyed by the bytes' hash, never by the uploaded file's name.
        cache_parts = {"image_sha256": image.sha256}

        async def compute() -> tuple[list[float], str]:
            vectors, model_id = await self._embed_images([image])
            return vectors[0], model_id

        async def embed() -> tuple[list[float], str]:
            return await self._embed_query("image", image.sha256, compute)

        return await self._search(cache_parts, embed, target, top_k, collection, filters)

    async def _embed_query(
        self, kind: str, digest: str, compute: Callable[[], Awaitable[tuple[list[float], str]]]
    ) -> tuple[list[float], str]:
        """The query's vector and model id, from the embedding cache when it has them."""
        if self.embeddings is None or self.models is None:
            return await compute()
        return await self.embeddings.get_or_compute(self.models, kind, digest, compute)

    async def _search(
        self,
        query_parts: dict[str, str],
        embed: Any,
        target: Target,
        top_k: int,
        collection: str,
        filters: Filters | None,
    ) -> SearchResult:
        parts = {
            **query_parts,
            "target": target,
            "top_k": top_k,
            "collection": collection,
            "filters": filters,
        }
        version = await self.cache.version(collection)
        key = self.cache.key(version, parts) if version is not None else None
        if key is not None and (cached := await self.cache.get(key)) is not None:
            return SearchResult(cached, cached=True)

        vector, model_id = await embed()
        allow_ids: list[int] | None = None
        if filters:
            response = await self.backends.metadata.request(
                "POST", f"/collections/{collection}/filter", json={"filters": filters}, retry=True
            )
            allowed = response.json()
            allow_ids = allowed["item_ids"] if target == "image" else allowed["caption_ids"]

        hits: list[dict[str, Any]] = []
        if allow_ids is None or allow_ids:
            response = await self.backends.retrieval.request(
                "POST",
                f"/collections/{collection}/search",
                json={
                    "modality": target,
                    "vectors": [vector],
                    "top_k": top_k,
                    "allow_ids": allow_ids,
                    "model_id": model_id,
                },
                retry=True,
            )
            hits = response.json()["results"][0]

        body = {
            "collection": collection,
            "target": target,
            "top_k": top_k,
            "model_id": model_id,
            "results": await self._hydrate(hits, target),
        }
        if key is not None:
            await self.cache.put(key, body)
        return SearchResult(body, cached=False)

    async def _hydrate(self, hits: list[dict[str, Any]], target: Target) -> list[dict[str, Any]]:
        """Turn (id, score) pairs into results with their items; ids whose item is gone or not
        yet indexed are dropped rather than shown half-made."""
        if not hits:
            return []
        ids = [hit["id"] for hit in hits]
        captions: dict[int, dict[str, Any]] = {}
        if target == "text":
            response = await self.backends.metadata.request(
                "POST", "/captions/lookup", json={"ids": ids}, retry=True
            )
            captions = {c["id"]: c for c in response.json()["captions"]}
            item_ids = list(dict.fromkeys(c["item_id"] for c in captions.values()))
        else:
            item_ids = ids
        response = await self.backends.metadata.request(
            "POST", "/items/lookup", json={"ids": item_ids}, retry=True
        )
        items = {
            item["id"]: public_item(item)
            for item in response.json()["items"]
            if item["status"] == "indexed"
        }
        results: list[dict[str, Any]] = []
        for hit in hits:
            caption = captions.get(hit["id"]) if target == "text" else None
            item_id = caption["item_id"] if caption else hit["id"]
            if (target == "text" and caption is None) or item_id not in items:
                continue
            results.append(
                {
                    "rank": len(results) + 1,
                    "score": hit["score"],
                    "item_id": item_id,
                    "caption": {"id": caption["id"], "text": caption["text"]} if caption else None,
                    "item": items[item_id],
                }
            )
        return results

    async def _embed_images(self, images: list[Upload]) -> tuple[list[list[float]], str]:
        response = await self.backends.feature.request(
            "POST",
            "/embed/image",
            files=[("images", image.as_file()) for image in images],
            retry=True,
        )
        body = response.json()
        return body["vectors"], body["model_id"]

    # -- items ----------------------------------------------------------------------------

    async def add_item(
        self, image: Upload, *, collection: str, captions: list[str], attributes: str | None
    ) -> dict[str, Any]:
        """Store, embed and index one item. Answers only once its vectors are durable in the
        retrieval service; on failure nothing half-made stays searchable."""
        # Embedding first: a corrupt image or a bad caption is refused before anything is stored.
        image_vectors, model_id = await self._embed_images([image])
        caption_vectors: list[list[float]] = []
        if captions:
            response = await self.backends.feature.request(
                "POST", "/embed/text", json={"texts": captions}, retry=True
            )
            caption_vectors = response.json()["vectors"]

        form: dict[str, Any] = {"collection": collection, "caption": captions}
        if attributes is not None:
            form["attributes"] = attributes
        response = await self.backends.metadata.request(
            "POST", "/items", data=form, files={"image": image.as_file()}
        )
        item = response.json()
        caption_ids = [c["id"] for c in item["captions"]]
        try:
            await self._upsert(collection, "image", model_id, [item["id"]], image_vectors)
            if caption_ids:
                await self._upsert(collection, "text", model_id, caption_ids, caption_vectors)
            response = await self.backends.metadata.request(
                "PATCH", f"/items/{item['id']}", json={"status": "indexed"}
            )
        except ProblemError:
            await self._undo_add(collection, item["id"], caption_ids)
            raise
        await self.cache.bump(collection)
        return public_item(response.json())

    async def _upsert(
        self,
        collection: str,
        modality: Target,
        model_id: str,
        ids: list[int],
        vectors: list[list[float]],
    ) -> None:
        # Upserts are idempotent by id, so a retry after a lost answer is safe.
        await self.backends.retrieval.request(
            "POST",
            f"/collections/{collection}/upsert",
            json={"modality": modality, "model_id": model_id, "ids": ids, "vectors": vectors},
            retry=True,
        )

    async def _undo_add(self, collection: str, item_id: int, caption_ids: list[int]) -> None:
        try:
            await self.backends.metadata.request(
                "PATCH", f"/items/{item_id}", json={"status": "failed"}
            )
            await self._delete_vectors(collection, item_id, caption_ids)
        except ProblemError as exc:
            # The item stays 'failed' or 'pending' and is never shown; reconcile repairs it.
            log.error("could not roll back item %s: %s", item_id, exc.detail)

    async def _delete_vectors(self, collection: str, item_id: int, caption_ids: list[int]) -> None:
        # Item ids and caption ids are separate id spaces: delete each in its own modality.
        for modality, ids in (("image", [item_id]), ("text", caption_ids)):
            if ids:
                await self.backends.retrieval.request(
                    "POST",
                    f"/collections/{collection}/delete",
                    json={"ids": ids, "modality": modality},
                    retry=True,
                )

    async def get_item(self, item_id: int) -> dict[str, Any]:
        response = await self.backends.metadata.request("GET", f"/items/{item_id}")
        return public_item(response.json())

    async def delete_item(self, item_id: int) -> None:
        response = await self.backends.metadata.request("GET", f"/items/{item_id}")
        item = response.json()
        # Metadata first: search results are resolved through metadata, so the item disappears
        # from results at once even if removing its vectors fails below.
        await self.backends.metadata.request("DELETE", f"/items/{item_id}")
        await self.cache.bump(item["collection"])
        await self._delete_vectors(item["collection"], item_id, [c["id"] for c in item["captions"]])


def public_item(item: dict[str, Any]) -> dict[str, Any]:
    return {**item, "image_url": f"/items/{item['id']}/image"}
