"""HTTP API of the retrieval service: thin routes over ``store.Store``.

Faiss and fsync calls block, so every route hands its work to the thread pool; the store's
per-collection locks make concurrent requests safe.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Literal

import anyio.to_thread
import faiss
import numpy as np
from fastapi import BackgroundTasks, Depends, FastAPI, Path, Request
from pydantic import BaseModel, Field, model_validator
from starlette.concurrency import run_in_threadpool

from services.retrieval.metrics import SEARCH_SECONDS, SNAPSHOT_SECONDS, VECTORS, WAL_BYTES
from services.retrieval.settings import RetrievalSettings
from services.retrieval.store import (
    INT64_MAX,
    MAX_DIM,
    Collection,
    DimensionMismatch,
    Store,
)
from shared.app import build_app
from shared.collections import COLLECTION_NAME_PATTERN
from shared.problems import PayloadTooLarge, ServiceUnavailable, Unprocessable

log = logging.getLogger(__name__)

Modality = Literal["image", "text"]
CollectionName = Annotated[
    str, Path(pattern=COLLECTION_NAME_PATTERN, description="collection name")
]
# Strict: "7", 7.0 and true are not ids; the range is int64 without the negatives (Faiss uses -1
# for "no result").
VectorId = Annotated[int, Field(strict=True, ge=0, le=INT64_MAX)]
Component = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Vector = Annotated[list[Component], Field(min_length=1, max_length=MAX_DIM)]


class UpsertRequest(BaseModel):
    modality: Modality
    model_id: str = Field(min_length=1, max_length=256)
    ids: list[VectorId] = Field(min_length=1)
    vectors: list[Vector] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_vector_per_id(self) -> UpsertRequest:
        if len(self.ids) != len(self.vectors):
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
    vectors: list[Vector] = Field(min_length=1)
    top_k: int = Field(10, ge=1, le=1000)
    allow_ids: list[VectorId] | None = None
    model_id: str | None = None


class Hit(BaseModel):
    id: int
    score: float


class SearchResponse(BaseModel):
    results: list[list[Hit]]


class Counts(BaseModel):
    image: int
    text: int


class CollectionInfo(BaseModel):
    name: str
    model_id: str
    dim: int
    counts: Counts


class CollectionList(BaseModel):
    collections: list[CollectionInfo]


@dataclass
class Runtime:
    settings: RetrievalSettings
    store: Store
    loading: asyncio.Task[None] | None = None
    load_error: str | None = None


def _ready_store(request: Request) -> Store:
    runtime: Runtime = request.app.state.retrieval
    if runtime.load_error or not runtime.store.loaded:
        raise ServiceUnavailable(
            "the collections are not loaded", code="not_ready", headers={"Retry-After": "1"}
        )
    return runtime.store


# Module level: route annotations are resolved against the module's globals.
StoreDep = Annotated[Store, Depends(_ready_store)]


def _matrix(rows: list[list[float]]) -> np.ndarray:
    dims = {len(row) for row in rows}
    if len(dims) != 1:
        raise DimensionMismatch(f"vectors of different dimensions in one request: {sorted(dims)}")
    with np.errstate(over="ignore"):
        matrix = np.asarray(rows, dtype=np.float32)
    if not np.isfinite(matrix).all():
        raise Unprocessable("vector components must be finite float32 values")
    return matrix


def _observe(collection: Collection) -> None:
    for modality, count in collection.counts().items():
        VECTORS.labels(collection.name, modality).set(count)
    WAL_BYTES.labels(collection.name).set(collection.wal_bytes)


def _snapshot(collection: Collection, *, wait: bool) -> None:
    started = time.perf_counter()
    try:
        written = collection.snapshot(wait=wait)
    except Exception:
        # The logs are kept until a snapshot succeeds, so nothing is lost; the next one retries.
        log.exception("snapshot of collection %s failed", collection.name)
        return
    if written:
        SNAPSHOT_SECONDS.observe(time.perf_counter() - started)
    _observe(collection)


def create_app(settings: RetrievalSettings | None = None) -> FastAPI:
    settings = settings or RetrievalSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        faiss.omp_set_num_threads(settings.faiss_threads)
        store = Store(
            settings.data_dir,
            index_factory=settings.index_factory,
            rescore_factor=settings.rescore_factor,
            snapshot_every=settings.snapshot_every,
        )
        runtime = Runtime(settings, store)
        app.state.retrieval = runtime
        # Loading may take long (index builds); serve /healthz meanwhile and report not ready.
        runtime.loading = asyncio.create_task(_load(runtime))
        try:
            yield
        finally:
            # The load runs in a thread that cannot be interrupted: let it finish first.
            await runtime.loading
            await anyio.to_thread.run_sync(_close, runtime)

    async def readiness(app: FastAPI) -> str | None:
        runtime: Runtime = app.state.retrieval
        if runtime.load_error:
            return runtime.load_error
        if not runtime.store.loaded:
            return "collections are loading"
        failures = runtime.store.failures()
        if failures:
            return "; ".join(f"collection {n}: {why}" for n, why in failures.items())
        return None

    app = build_app(
        "retrieval",
        lifespan=lifespan,
        readiness=readiness,
        description="Image and text vectors per collection, searched with Faiss.",
    )

    def check_batch(size: int) -> None:
        if size > settings.max_batch:
            raise PayloadTooLarge(
                f"at most {settings.max_batch} vectors or ids per request, got {size}",
                code="batch_too_large",
            )

    def schedule_snapshot(background: BackgroundTasks, collection: Collection) -> None:
        # After the response: the write is already durable in the log.
        if collection.snapshot_due:
            background.add_task(_snapshot, collection, wait=False)

    @app.post("/collections/{collection}/upsert", response_model=UpsertResponse)
    async def upsert(
        collection: CollectionName,
        body: UpsertRequest,
        store: StoreDep,
        background: BackgroundTasks,
    ) -> UpsertResponse:
        check_batch(len(body.ids))

        def work() -> tuple[Collection, int]:
            vectors = _matrix(body.vectors)
            target = store.get_or_create(collection, body.model_id, vectors.shape[1])
            ids = np.asarray(body.ids, dtype=np.int64)
            count = target.upsert(body.modality, ids, vectors, model_id=body.model_id)
            _observe(target)
            return target, count

        target, count = await run_in_threadpool(work)
        schedule_snapshot(background, target)
        return UpsertResponse(upserted=len(body.ids), count=count)

    @app.post("/collections/{collection}/delete", response_model=DeleteResponse)
    async def delete(
        collection: CollectionName,
        body: DeleteRequest,
        store: StoreDep,
        background: BackgroundTasks,
    ) -> DeleteResponse:
        check_batch(len(body.ids))
        target = store.get(collection)

        def work() -> int:
            deleted = target.delete(np.asarray(body.ids, dtype=np.int64), body.modality)
            _observe(target)
            return deleted

        deleted = await run_in_threadpool(work)
        schedule_snapshot(background, target)
        return DeleteResponse(deleted=deleted)

    @app.post("/collections/{collection}/search", response_model=SearchResponse)
    async def search(
        collection: CollectionName, body: SearchRequest, store: StoreDep
    ) -> SearchResponse:
        check_batch(len(body.vectors))
        target = store.get(collection)

        def work() -> list[list[tuple[int, float]]]:
            target.check_model(body.model_id)  # a model mismatch says more than a dimension one
            queries = _matrix(body.vectors)
            allow = None if body.allow_ids is None else np.asarray(body.allow_ids, np.int64)
            started = time.perf_counter()
            hits = target.search(
                body.modality, queries, body.top_k, allow=allow, model_id=body.model_id
            )
            SEARCH_SECONDS.observe(time.perf_counter() - started)
            return hits

        results = await run_in_threadpool(work)
        return SearchResponse(results=[[Hit(id=i, score=s) for i, s in hits] for hits in results])

    @app.get("/collections", response_model=CollectionList)
    async def list_collections(store: StoreDep) -> CollectionList:
        infos = await run_in_threadpool(lambda: [c.info() for c in store.collections()])
        return CollectionList.model_validate({"collections": infos})

    @app.get("/collections/{collection}", response_model=CollectionInfo)
    async def get_collection(collection: CollectionName, store: StoreDep) -> CollectionInfo:
        target = store.get(collection)
        return CollectionInfo.model_validate(await run_in_threadpool(target.info))

    return app


async def _load(runtime: Runtime) -> None:
    try:
        await anyio.to_thread.run_sync(runtime.store.load)
    except Exception as exc:
        log.exception("loading the collections failed")
        runtime.load_error = f"loading the collections failed: {type(exc).__name__}: {exc}"
        return
    for collection in runtime.store.collections():
        _observe(collection)


def _close(runtime: Runtime) -> None:
    # After a failed load the in-memory state is partial: never snapshot it.
    if runtime.load_error is None:
        for collection in runtime.store.collections():
            _snapshot(collection, wait=True)
    runtime.store.close(snapshot=False)
