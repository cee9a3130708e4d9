"""HTTP API of the retrieval service: thin routes over ``store.Store``.

Faiss and fsync calls block, so routes hand their work to the thread pool (a lone short search
runs on the event loop instead: see ``runner``); the store's per-collection locks make
concurrent requests safe.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import anyio.to_thread
import numpy as np
from fastapi import BackgroundTasks, Depends, FastAPI, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from services.retrieval import metrics
from services.retrieval.indexing import IndexSpec, SearchDepth, use_threads
from services.retrieval.metrics import SEARCH_SECONDS, VECTORS, WAL_BYTES
from services.retrieval.runner import SearchRunner
from services.retrieval.settings import RetrievalSettings
from services.retrieval.store import Collection, CollectionNotFound, DimensionMismatch, Store
from shared.app import build_app
from shared.collections import COLLECTION_NAME_PATTERN
from shared.contracts.retrieval import (
    BINARY_IDS,
    INT64_MAX,
    CollectionDropped,
    CollectionInfo,
    CollectionList,
    CollectionSettings,
    DeleteRequest,
    DeleteResponse,
    IdPage,
    IndexSettings,
    Modality,
    SearchRequest,
    SearchResponse,
    UpsertRequest,
    UpsertResponse,
)
from shared.contracts.vectors import VectorDecodeError, decode_vectors
from shared.problems import PayloadTooLarge, ServiceUnavailable, Unprocessable
from shared.service_auth import CallerVerifier, caller
from shared.tokens import KeySource

log = logging.getLogger(__name__)

CollectionName = Annotated[
    str, Path(pattern=COLLECTION_NAME_PATTERN, description="collection name")
]


def _index_spec(settings: IndexSettings, base: IndexSpec) -> IndexSpec:
    return IndexSpec.from_dict(settings.model_dump(exclude_unset=True), base)


@dataclass
class Runtime:
    settings: RetrievalSettings
    store: Store
    loading: asyncio.Task[None] | None = None
    load_error: str | None = None


async def _ready_store(request: Request) -> Store:
    # Async, though it never awaits: FastAPI runs sync dependencies in the thread pool, and that
    # extra thread hop cost more than the rest of a small search.
    runtime: Runtime = request.app.state.retrieval
    if runtime.load_error or not runtime.store.loaded:
        raise ServiceUnavailable(
            "the collections are not loaded", code="not_ready", headers={"Retry-After": "1"}
        )
    return runtime.store


# Module level: route annotations are resolved against the module's globals.
StoreDep = Annotated[Store, Depends(_ready_store)]


Body = TypeVar("Body", bound=BaseModel)


def _json_body(model: type[Body]) -> Callable[[Request], Awaitable[Body]]:
    """A dependency that parses the request body with pydantic-core's own JSON parser: for the
    hundreds of floats of a vector it is ~8x faster than FastAPI's ``json.loads`` followed by
    validation, the largest cost of a small search over HTTP. Errors are the usual 422s."""

    async def parse(request: Request) -> Body:
        raw = await request.body()
        try:
            return model.model_validate_json(raw)
        except ValidationError as exc:
            errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
            raise RequestValidationError(errors) from None

    return parse


def _json_request_body(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI description of a body read by ``_json_body`` (FastAPI cannot see it)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)  # nested models are in the components through other routes
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _request_matrix(
    vectors: list[list[float]] | None, encoded: str | None, **shape: int
) -> np.ndarray:
    """The request's vectors as a float32 matrix; base64 rows are shaped by ``dim`` or ``rows``."""
    if encoded is None:
        assert vectors is not None  # the request models require one of the two
        return _matrix(vectors)
    try:
        return decode_vectors(encoded, **shape)
    except VectorDecodeError as exc:
        raise Unprocessable(str(exc), code="invalid_vectors") from None


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
    try:
        collection.snapshot(wait=wait)
    except Exception:
        # The logs are kept until a snapshot succeeds, so nothing is lost; the next one retries.
        log.exception("snapshot of collection %s failed", collection.name)
        return
    _observe(collection)


def create_app(
    settings: RetrievalSettings | None = None, *, token_keys: KeySource | None = None
) -> FastAPI:
    """The app; ``token_keys`` verify the callers' service tokens instead of auth's JWKS."""
    settings = settings or RetrievalSettings()
    threads = settings.faiss_threads

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = Store(
            settings.data_dir,
            index_factory=settings.index_factory,
            rescore_factor=settings.rescore_factor,
            nprobe=settings.nprobe,
            ef_search=settings.ef_search,
            storage=settings.storage,
            snapshot_every=settings.snapshot_every,
            memory_budget=int(settings.memory_budget),
            build_threads=settings.build_threads,
            inline_rebuild_max=settings.inline_rebuild_max,
        )
        runtime = Runtime(settings, store)
        app.state.retrieval = runtime
        metrics.track(store)
        # Loading may take long (index builds); serve /healthz meanwhile and report not ready.
        runtime.loading = asyncio.create_task(_load(runtime))
        try:
            yield
        finally:
            # The load runs in a thread that cannot be interrupted: let it finish first.
            await runtime.loading
            await anyio.to_thread.run_sync(_close, runtime)
            metrics.untrack(store)

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
        callers=CallerVerifier.for_settings("retrieval", settings, keys=token_keys),
    )

    searches = SearchRunner()

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

    @app.put(
        "/collections/{collection}",
        response_model=CollectionInfo,
        dependencies=[caller("retrieval:write")],
    )
    async def put_collection(
        collection: CollectionName, body: CollectionSettings, store: StoreDep, response: Response
    ) -> CollectionInfo:
        """Create a collection with its index settings, or change the settings of an existing
        one (a new factory is built in the background; the storage cannot change)."""

        def work() -> tuple[dict[str, Any], bool]:
            try:
                base = store.get(collection).spec
            except CollectionNotFound:
                base = store.default_spec
            spec = _index_spec(body.index, base) if body.index is not None else None
            target, created = store.ensure(collection, body.model_id, body.dim, spec)
            _observe(target)
            return target.info(), created

        info, created = await run_in_threadpool(work)
        response.status_code = 201 if created else 200
        return CollectionInfo.model_validate(info)

    @app.post(
        "/collections/{collection}/upsert",
        response_model=UpsertResponse,
        dependencies=[caller("retrieval:write")],
        openapi_extra=_json_request_body(UpsertRequest),
    )
    async def upsert(
        collection: CollectionName,
        body: Annotated[UpsertRequest, Depends(_json_body(UpsertRequest))],
        store: StoreDep,
        background: BackgroundTasks,
    ) -> UpsertResponse:
        check_batch(len(body.ids))

        def work() -> tuple[Collection, int]:
            use_threads(threads)
            vectors = _request_matrix(body.vectors, body.vectors_base64, rows=len(body.ids))
            spec = _index_spec(body.index, store.default_spec) if body.index is not None else None
            target = store.get_or_create(collection, body.model_id, vectors.shape[1], spec)
            ids = np.asarray(body.ids, dtype=np.int64)
            count = target.upsert(body.modality, ids, vectors, model_id=body.model_id)
            _observe(target)
            return target, count

        target, count = await run_in_threadpool(work)
        schedule_snapshot(background, target)
        return UpsertResponse(upserted=len(body.ids), count=count)

    @app.post(
        "/collections/{collection}/delete",
        response_model=DeleteResponse,
        dependencies=[caller("retrieval:write")],
    )
    async def delete(
        collection: CollectionName,
        body: DeleteRequest,
        store: StoreDep,
        background: BackgroundTasks,
    ) -> DeleteResponse:
        check_batch(len(body.ids))
        target = store.get(collection)

        def work() -> int:
            use_threads(threads)
            deleted = target.delete(np.asarray(body.ids, dtype=np.int64), body.modality)
            _observe(target)
            return deleted

        deleted = await run_in_threadpool(work)
        schedule_snapshot(background, target)
        return DeleteResponse(deleted=deleted)

    @app.post(
        "/collections/{collection}/search",
        response_model=SearchResponse,
        dependencies=[caller("retrieval:search")],
        openapi_extra=_json_request_body(SearchRequest),
    )
    async def search(
        collection: CollectionName,
        body: Annotated[SearchRequest, Depends(_json_body(SearchRequest))],
        store: StoreDep,
    ) -> Response:
        target = store.get(collection)
        target.check_model(body.model_id)  # a model mismatch says more than a dimension one
        # Base64 rows are only copied out of the text: cheap enough for the event loop, and
        # their count is known before any work. Float lists are converted in the worker.
        encoded = None
        if body.vectors_base64 is not None:
            encoded = _request_matrix(None, body.vectors_base64, dim=target.dim)
        count = len(encoded) if encoded is not None else len(body.vectors or ())
        check_batch(count)
        depth = SearchDepth(body.nprobe, body.ef_search, body.rescore_factor)

        def work() -> list[list[tuple[int, float]]]:
            use_threads(threads)
            queries = encoded if encoded is not None else _request_matrix(body.vectors, None)
            allow = None if body.allow_ids is None else np.asarray(body.allow_ids, np.int64)
            started = time.perf_counter()
            hits = target.search(
                body.modality,
                queries,
                body.top_k,
                allow=allow,
                model_id=body.model_id,
                depth=depth,
            )
            SEARCH_SECONDS.observe(time.perf_counter() - started)
            return hits

        # Searches of one shape cost alike; filtered ones vary with the allow-list.
        kind = None
        if count == 1 and body.allow_ids is None:
            kind = (collection, body.modality, body.top_k, depth)
        results = await searches.run(kind, work)
        # Serialised here rather than through the response model: on this hot path FastAPI's
        # model validation and encoding cost more than the search of a small collection.
        body = {"results": [[{"id": i, "score": s} for i, s in hits] for hits in results]}
        return Response(json.dumps(body, separators=(",", ":")), media_type="application/json")

    @app.get(
        "/collections/{collection}/ids",
        response_model=IdPage,
        dependencies=[caller("retrieval:read")],
        responses={200: {"content": {BINARY_IDS: {}}}},
    )
    async def list_ids(
        collection: CollectionName,
        store: StoreDep,
        request: Request,
        modality: Annotated[Modality, Query()],
        after: Annotated[int, Query(ge=-1, le=INT64_MAX)] = -1,
        limit: Annotated[int, Query(ge=1, le=100_000)] = 10_000,
    ) -> Any:
        """Ids of a modality in ascending order after ``after``: JSON pages of ``limit`` ids, or,
        with ``Accept: application/octet-stream``, all of them as little-endian int64 (8 bytes
        an id; ``X-Id-Count`` tells how many)."""
        target = store.get(collection)
        ids = await run_in_threadpool(target.ids, modality)
        start = int(np.searchsorted(ids, after, side="right"))
        if BINARY_IDS in request.headers.get("accept", ""):
            rest = ids[start:]

            def chunks() -> Iterator[bytes]:
                step = 1 << 16
                for i in range(0, len(rest), step):
                    yield rest[i : i + step].astype("<i8").tobytes()

            return StreamingResponse(
                chunks(), media_type=BINARY_IDS, headers={"X-Id-Count": str(len(rest))}
            )
        page = ids[start : start + limit]
        more = start + limit < len(ids)
        return IdPage(ids=page.tolist(), next_after=int(page[-1]) if more and len(page) else None)

    @app.delete(
        "/collections/{collection}",
        response_model=CollectionDropped,
        dependencies=[caller("retrieval:write")],
    )
    async def drop_collection(collection: CollectionName, store: StoreDep) -> CollectionDropped:
        """Remove the collection and every vector in it; answers the same whether it existed
        or not, so that a deletion can be repeated until it is known to be done."""
        dropped = await run_in_threadpool(store.drop, collection)
        if dropped:
            log.info("collection %s dropped", collection)
        return CollectionDropped(name=collection, dropped=dropped)

    @app.get("/collections", response_model=CollectionList, dependencies=[caller("retrieval:read")])
    async def list_collections(store: StoreDep) -> CollectionList:
        infos = await run_in_threadpool(lambda: [c.info() for c in store.collections()])
        return CollectionList.model_validate({"collections": infos})

    @app.get(
        "/collections/{collection}",
        response_model=CollectionInfo,
        dependencies=[caller("retrieval:read")],
    )
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
    if runtime.load_error is None and runtime.store.loaded:
        if runtime.store.worker is not None:
            runtime.store.worker.stop()  # a build in progress would only delay the stop
        for collection in runtime.store.collections():
            _snapshot(collection, wait=True)
    runtime.store.close(snapshot=False)
