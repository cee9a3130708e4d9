"""HTTP layer of the metadata service: thin routes over ``Repository``.

Routes are plain ``def`` functions, so FastAPI runs them (and their blocking SQLAlchemy and file
work) in its worker threads, off the event loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, FastAPI, File, Form, Query, Request, Response, UploadFile
from fastapi.responses import FileResponse
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from services.metadata.db import make_engine, upgrade
from services.metadata.images import ImageStore
from services.metadata.purge import Purger
from services.metadata.repository import Repository
from services.metadata.settings import MetadataSettings
from shared.app import build_app
from shared.contracts.metadata import (
    CaptionsOut,
    CollectionCreate,
    CollectionDeletion,
    CollectionDeletionsOut,
    CollectionOut,
    CollectionsOut,
    DeletionState,
    FilterOut,
    FilterRequest,
    HashesOut,
    HashesRequest,
    HitsOut,
    HitsRequest,
    IdsRequest,
    ItemMerge,
    ItemMerged,
    ItemOut,
    ItemsOut,
    ItemStatesOut,
    ItemStatus,
    KeywordSearchOut,
    KeywordSearchRequest,
    StatusUpdate,
)
from shared.images import served_image
from shared.problems import PayloadTooLarge
from shared.service_auth import CallerVerifier, caller
from shared.tokens import KeySource

# Room for the form fields around the image (captions, attributes, multipart framing).
_FORM_OVERHEAD = 1024 * 1024


async def _repository(request: Request) -> Repository:
    # Async, though it never awaits: FastAPI runs sync dependencies in the thread pool, a
    # hop per request for nothing.
    return request.app.state.repository


Repo = Annotated[Repository, Depends(_repository)]


class _UploadRoute(APIRoute):
    """Refuses an upload whose declared Content-Length is already too large, before FastAPI
    spools the whole multipart body to disk. The exact limit is enforced on the image itself."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def limited(request: Request) -> Response:
            max_bytes = request.app.state.settings.max_image_bytes
            length = request.headers.get("content-length", "")
            if length.isdigit() and int(length) > max_bytes + _FORM_OVERHEAD:
                raise PayloadTooLarge(
                    f"the upload is larger than the {max_bytes}-byte image limit allows",
                    code="image_too_large",
                )
            return await handler(request)

        return limited


uploads = APIRouter(route_class=_UploadRoute)
router = APIRouter()


@uploads.post(
    "/items",
    status_code=201,
    dependencies=[caller("metadata:write")],
    responses={409: {"description": "duplicate_item or duplicate_pending (docs/metadata.md)"}},
)
def create_item(
    repo: Repo,
    collection: Annotated[str, Form()],
    image: Annotated[UploadFile, File()],
    caption: Annotated[list[str] | None, Form()] = None,
    attributes: Annotated[str | None, Form(description="JSON object of scalar values")] = None,
    tag: Annotated[list[str] | None, Form(description="Repeat for several.")] = None,
    source_uri: Annotated[str | None, Form(description="Where the image came from")] = None,
) -> ItemOut:
    # One byte past the limit is enough to know the image is too large.
    data = image.file.read(repo.settings.max_image_bytes + 1)
    return repo.create_item(
        collection, caption or [], attributes, data, tags=tag or [], source_uri=source_uri
    )


@router.get("/items/{item_id}", dependencies=[caller("metadata:read")])
def get_item(repo: Repo, item_id: int) -> ItemOut:
    return repo.get_item(item_id)


@router.get(
    "/items/{item_id}/image", response_class=Response, dependencies=[caller("metadata:read")]
)
def get_item_image(
    repo: Repo,
    item_id: int,
    request: Request,
    size: Annotated[Literal["original", "thumb"], Query()] = "original",
) -> Response:
    stored = repo.image(item_id, thumbnail=size == "thumb")
    served = served_image(
        stored.content_type, f"item-{item_id}{'-thumb' if size == 'thumb' else ''}"
    )
    # Files are named by their content's hash, so the hash is a strong validator of the bytes.
    etag = stored.etag
    headers = {"ETag": etag, **served.headers}
    client_tags = {
        tag.strip().removeprefix("W/")
        for tag in request.headers.get("if-none-match", "").split(",")
    }
    if etag in client_tags or "*" in client_tags:
        return Response(status_code=304, headers=headers)
    return FileResponse(stored.path, media_type=served.media_type, headers=headers)


@router.patch("/items/{item_id}", dependencies=[caller("metadata:write")])
def update_item(repo: Repo, item_id: int, body: StatusUpdate) -> ItemOut:
    return repo.set_status(item_id, body.status, model_id=body.model_id, error=body.error)


@router.delete(
    "/items/{item_id}",
    status_code=204,
    response_class=Response,
    dependencies=[caller("metadata:write")],
)
def delete_item(repo: Repo, item_id: int) -> Response:
    repo.delete_item(item_id)
    return Response(status_code=204)


@router.post(
    "/items/{item_id}/merge",
    dependencies=[caller("metadata:write")],
    responses={409: {"description": "item_not_indexed or item_limit (docs/metadata.md)"}},
)
def merge_item(repo: Repo, item_id: int, body: ItemMerge) -> ItemMerged:
    return repo.merge_item(item_id, body)


@router.post("/items/{item_id}/captions/delete", dependencies=[caller("metadata:write")])
def delete_captions(repo: Repo, item_id: int, body: IdsRequest) -> ItemOut:
    return repo.delete_captions(item_id, body.ids)


@router.post("/items/lookup", dependencies=[caller("metadata:read")])
def lookup_items(repo: Repo, body: IdsRequest) -> ItemsOut:
    return ItemsOut(items=repo.lookup_items(body.ids))


@router.post("/captions/lookup", dependencies=[caller("metadata:read")])
def lookup_captions(repo: Repo, body: IdsRequest) -> CaptionsOut:
    return CaptionsOut(captions=repo.lookup_captions(body.ids))


@router.post("/collections", status_code=201, dependencies=[caller("metadata:write")])
def create_collection(repo: Repo, body: CollectionCreate) -> CollectionOut:
    return repo.create_collection(body)


@router.get("/collections", dependencies=[caller("metadata:read")])
def list_collections(repo: Repo) -> CollectionsOut:
    return CollectionsOut(collections=repo.list_collections())


@router.get("/collections/{collection}", dependencies=[caller("metadata:read")])
def get_collection(repo: Repo, collection: str) -> CollectionOut:
    return repo.get_collection(collection)


@router.delete(
    "/collections/{collection}", status_code=202, dependencies=[caller("metadata:write")]
)
def delete_collection(repo: Repo, collection: str) -> CollectionDeletion:
    """Start deleting the collection (or return the deletion under way): gone from every
    answer at once; its rows go once the caller reports its vectors dropped."""
    return repo.delete_collection(collection)


@router.get("/deletions", dependencies=[caller("metadata:read")])
def list_deletions(repo: Repo, state: DeletionState) -> CollectionDeletionsOut:
    return CollectionDeletionsOut(deletions=repo.deletions(state))


@router.get("/deletions/{deletion_id}", dependencies=[caller("metadata:read")])
def get_deletion(repo: Repo, deletion_id: int) -> CollectionDeletion:
    return repo.deletion(deletion_id)


@router.post("/deletions/{deletion_id}/vectors-dropped", dependencies=[caller("metadata:write")])
def vectors_dropped(repo: Repo, request: Request, deletion_id: int) -> CollectionDeletion:
    deletion = repo.vectors_dropped(deletion_id)
    request.app.state.purger.wake()
    return deletion


@router.post("/collections/{collection}/filter", dependencies=[caller("metadata:read")])
def filter_collection(repo: Repo, collection: str, body: FilterRequest) -> FilterOut:
    return repo.filter_items(collection, body.filters, body.target)


@router.post(
    "/collections/{collection}/hits",
    response_model=HitsOut,
    dependencies=[caller("metadata:read")],
)
async def hits(repo: Repo, collection: str, body: HitsRequest) -> Response:
    # On every uncached search: the repository writes the HitsOut JSON itself, in one thread
    # hop (a sync route takes a second one to validate and serialise its answer).
    answer = await run_in_threadpool(repo.hits_json, collection, body.target, body.ids)
    return Response(answer, media_type="application/json")


@router.post("/collections/{collection}/keyword-search", dependencies=[caller("metadata:read")])
def keyword_search(repo: Repo, collection: str, body: KeywordSearchRequest) -> KeywordSearchOut:
    hits = repo.keyword_search(
        collection, body.query, top_k=body.top_k, target=body.target, raw_filters=body.filters
    )
    return KeywordSearchOut(target=body.target, results=hits)


@router.get("/collections/{collection}/items", dependencies=[caller("metadata:read")])
def list_item_states(
    repo: Repo,
    collection: str,
    status: Annotated[ItemStatus | None, Query()] = None,
    after: Annotated[int | None, Query(ge=0, le=2**63 - 1)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    updated_before: Annotated[datetime | None, Query()] = None,
) -> ItemStatesOut:
    return repo.item_states(
        collection, status=status, after=after, limit=limit, updated_before=updated_before
    )


@router.post("/collections/{collection}/hashes", dependencies=[caller("metadata:read")])
def find_hashes(repo: Repo, collection: str, body: HashesRequest) -> HashesOut:
    return HashesOut(items=repo.find_hashes(collection, body.sha256))


def create_app(
    settings: MetadataSettings | None = None, *, token_keys: KeySource | None = None
) -> FastAPI:
    """The app; ``token_keys`` verify the callers' service tokens instead of auth's JWKS."""
    settings = settings or MetadataSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings.database_url)
        try:
            # Migrations, not create_all: an existing database is brought up to date in place.
            await run_in_threadpool(upgrade, engine)
            images = await run_in_threadpool(ImageStore, settings.image_dir)
            repository = Repository(engine, images, settings)
            await run_in_threadpool(repository.refresh_gauge)
            app.state.repository = repository
            async with Purger(repository, settings).running() as purger:
                app.state.purger = purger
                yield
        finally:
            engine.dispose()

    async def readiness(app: FastAPI) -> str | None:
        repository: Repository | None = getattr(app.state, "repository", None)
        if repository is None:
            return "the database is not set up yet"
        await run_in_threadpool(repository.ping)
        return None

    app = build_app(
        "metadata",
        lifespan=lifespan,
        readiness=readiness,
        description="Collections, items, captions, tags and their images; filters and keyword "
        "search.",
        callers=CallerVerifier.for_settings("metadata", settings, keys=token_keys),
    )
    app.state.settings = settings
    app.include_router(uploads)
    app.include_router(router)
    return app
