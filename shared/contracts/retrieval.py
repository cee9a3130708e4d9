"""The retrieval service's API (services/retrieval/app.py): its bodies, its bounds, and the typed
client its callers (the gateway, ``crossmodal reconcile``) use."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.contracts.client import ServiceApi
from shared.problems import ProblemError

Modality = Literal["image", "text"]

# Bounds of the API, enforced by the models below and by the service's own checks.
INT64_MAX = 2**63 - 1
MAX_DIM = 8192
MAX_TOP_K = 1000
MAX_NPROBE = 65_536
MAX_EF_SEARCH = 32_768
MAX_RESCORE_FACTOR = 100
MAX_EF_CONSTRUCTION = 4096
MAX_FACTORY_LENGTH = 200
BINARY_IDS = "application/octet-stream"

# Strict: "7", 7.0 and true are not ids; the range is int64 without the negatives (Faiss uses -1
# for "no result").
VectorId = Annotated[int, Field(strict=True, ge=0, le=INT64_MAX)]
Component = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Vector = Annotated[list[Component], Field(min_length=1, max_length=MAX_DIM)]

_BASE64_DOC = (
    "instead of vectors: float32 little-endian rows in base64 (shared/contracts/vectors.py), "
    "what the services send among themselves"
)


class IndexSettings(BaseModel):
    """A collection's index settings; omitted fields keep their current (or default) value."""

    model_config = ConfigDict(extra="forbid")

    factory: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_FACTORY_LENGTH,
        description="Faiss factory string (Flat, HNSW32, IVF1024,Flat, IVF4096,PQ64, …) or auto",
    )
    nprobe: int | None = Field(None, ge=1, le=MAX_NPROBE, description="IVF lists probed")
    ef_search: int | None = Field(None, ge=1, le=MAX_EF_SEARCH, description="HNSW depth")
    rescore_factor: int | None = Field(None, ge=1, le=MAX_RESCORE_FACTOR)
    storage: Literal["float32", "float16-mmap"] | None = None
    ef_construction: int | None = Field(None, ge=8, le=MAX_EF_CONSTRUCTION, description="HNSW")


class CollectionSettings(BaseModel):
    model_id: str = Field(min_length=1, max_length=256)
    dim: int = Field(ge=1, le=MAX_DIM)
    index: IndexSettings | None = None


def _one_encoding(vectors: list[list[float]] | None, encoded: str | None) -> None:
    if (vectors is None) == (encoded is None):
        raise ValueError("give the vectors either as vectors or as vectors_base64")


class UpsertRequest(BaseModel):
    modality: Modality
    model_id: str = Field(min_length=1, max_length=256)
    ids: list[VectorId] = Field(min_length=1)
    vectors: list[Vector] | None = Field(None, min_length=1)
    vectors_base64: str | None = Field(None, min_length=1, description=_BASE64_DOC)
    index: IndexSettings | None = Field(
        None,
        description="settings for the collection when this write creates it; ignored otherwise "
        "(PUT /collections/{collection} changes them)",
    )

    @model_validator(mode="after")
    def _one_vector_per_id(self) -> UpsertRequest:
        _one_encoding(self.vectors, self.vectors_base64)
        if self.vectors is not None and len(self.ids) != len(self.vectors):
            raise ValueError(f"{len(self.ids)} ids but {len(self.vectors)} vectors")
        if len(set(self.ids)) != len(self.ids):
            raise ValueError("ids must be unique within a request")
        return self


class UpsertResponse(BaseModel):
    upserted: int = Field(description="vectors written by this request")
    count: int = Field(description="vectors in the collection's modality afterwards")


class DeleteRequest(BaseModel):
    ids: list[VectorId]
    modality: Modality | None = None

    @model_validator(mode="after")
    def _unique(self) -> DeleteRequest:
        if len(set(self.ids)) != len(self.ids):
            raise ValueError("ids must be unique within a request")
        return self


class DeleteResponse(BaseModel):
    deleted: int


class SearchRequest(BaseModel):
    modality: Modality
    vectors: list[Vector] | None = Field(None, min_length=1)
    vectors_base64: str | None = Field(None, min_length=1, description=_BASE64_DOC)
    top_k: int = Field(10, ge=1, le=MAX_TOP_K)
    allow_ids: list[VectorId] | None = None
    model_id: str | None = None
    # Per-query depth; None: the collection's default.
    nprobe: int | None = Field(None, ge=1, le=MAX_NPROBE)
    ef_search: int | None = Field(None, ge=1, le=MAX_EF_SEARCH)
    rescore_factor: int | None = Field(None, ge=1, le=MAX_RESCORE_FACTOR)

    @model_validator(mode="after")
    def _vectors_given_once(self) -> SearchRequest:
        _one_encoding(self.vectors, self.vectors_base64)
        return self


class Hit(BaseModel):
    id: int
    score: float


class SearchResponse(BaseModel):
    results: list[list[Hit]] = Field(description="one list per query vector, best first")


class Counts(BaseModel):
    image: int
    text: int


class SetStatus(BaseModel):
    count: int
    index: str | None = Field(description="factory of the index in use (what auto chose)")
    index_entries: int
    stale_entries: int
    rebuilding: bool


class CollectionInfo(BaseModel):
    name: str
    model_id: str
    dim: int
    counts: Counts
    index: dict[str, Any]
    status: dict[str, SetStatus]


class CollectionList(BaseModel):
    collections: list[CollectionInfo]


class IdPage(BaseModel):
    ids: list[int]
    next_after: int | None = Field(description="pass as `after` for the next page; null: done")


class CollectionDropped(BaseModel):
    name: str
    dropped: bool = Field(description="false: there was no such collection (nothing to do)")


class RetrievalClient(ServiceApi):
    """The retrieval service as its callers see it: every call returns a parsed answer or
    raises the service's problem (``ProblemError``)."""

    async def search(self, collection: str, request: SearchRequest) -> SearchResponse:
        # A search changes nothing.
        raw = await self.post_json(f"/collections/{collection}/search", request, retry=True)
        return SearchResponse.model_validate_json(raw)

    async def upsert(self, collection: str, request: UpsertRequest) -> UpsertResponse:
        # Idempotent by id: a retry after a lost answer is safe.
        raw = await self.post_json(f"/collections/{collection}/upsert", request, retry=True)
        return UpsertResponse.model_validate_json(raw)

    async def delete(self, collection: str, request: DeleteRequest) -> DeleteResponse:
        # Deleting what is gone deletes nothing.
        raw = await self.post_json(f"/collections/{collection}/delete", request, retry=True)
        return DeleteResponse.model_validate_json(raw)

    async def drop(self, collection: str) -> CollectionDropped:
        # Dropping what is gone drops nothing: safe to repeat.
        response = await self.http.request("DELETE", f"/collections/{collection}", retry=True)
        return CollectionDropped.model_validate_json(response.content)

    async def collection(self, collection: str) -> CollectionInfo | None:
        """The collection's settings and counts; None when it has no vectors yet."""
        try:
            response = await self.http.request("GET", f"/collections/{collection}")
        except ProblemError as exc:
            if exc.code == "collection_not_found":
                return None
            raise
        return CollectionInfo.model_validate_json(response.content)

    async def collections(self) -> CollectionList:
        response = await self.http.request("GET", "/collections")
        return CollectionList.model_validate_json(response.content)

    async def ids(self, collection: str, modality: Modality) -> np.ndarray:
        """Every id of ``modality`` in ascending order, read as one binary stream (int64)."""
        response = await self.http.request(
            "GET",
            f"/collections/{collection}/ids",
            params={"modality": modality},
            headers={"Accept": BINARY_IDS},
        )
        if not response.headers.get("content-type", "").startswith(BINARY_IDS):
            # Only JSON pages: the first page is all there is when next_after is null.
            page = IdPage.model_validate_json(response.content)
            ids = list(page.ids)
            while page.next_after is not None:
                response = await self.http.request(
                    "GET",
                    f"/collections/{collection}/ids",
                    params={"modality": modality, "after": page.next_after, "limit": 100_000},
                )
                page = IdPage.model_validate_json(response.content)
                ids.extend(page.ids)
            return np.asarray(ids, dtype=np.int64)
        return np.frombuffer(response.content, dtype="<i8").astype(np.int64)
