"""HTTP layer of the gateway: authentication, validation and routing; the work is in
``orchestrator``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import redis.asyncio as redis
from fastapi import Depends, FastAPI, File, Form, Request, Response, UploadFile
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from services.gateway.cache import ResultCache
from services.gateway.orchestrator import Backends, Orchestrator, Upload
from services.gateway.schemas import (
    SearchResponse,
    Target,
    TextSearchRequest,
    check_collection,
    parse_filters_form,
)
from services.gateway.settings import GatewaySettings
from shared.app import build_app
from shared.collections import COLLECTION_NAME_PATTERN
from shared.http import ServiceClient
from shared.problems import PayloadTooLarge, ProblemError, UnsupportedMediaType
from shared.tokens import Principal, TokenVerifier, bearer_token

_UPLOAD_CHUNK = 1024 * 1024


@dataclass
class GatewayState:
    settings: GatewaySettings
    backends: Backends
    redis: redis.Redis
    verifier: TokenVerifier
    orchestrator: Orchestrator


def _state(request: Request) -> GatewayState:
    return request.app.state.gateway


State = Annotated[GatewayState, Depends(_state)]
_bearer = HTTPBearer(auto_error=False, description="Access token from POST /auth/token")


async def _principal(
    state: State,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    header = f"{credentials.scheme} {credentials.credentials}" if credentials else None
    return await state.verifier.verify(bearer_token(header))


def require(scope: str) -> Callable[..., Awaitable[Principal]]:
    async def dependency(principal: Annotated[Principal, Depends(_principal)]) -> Principal:
        principal.require(scope)
        return principal

    return dependency


async def read_upload(upload: UploadFile, max_bytes: int) -> Upload:
    content_type = (upload.content_type or "").split(";")[0].strip().lower()
    if not content_type.startswith("image/"):
        raise UnsupportedMediaType(
            f"the upload must be an image (image/*), not {content_type or 'untyped data'}",
            code="unsupported_media_type",
        )
    chunks: list[bytes] = []
    size = 0
    while chunk := await upload.read(_UPLOAD_CHUNK):
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(
                f"the image is larger than {max_bytes} bytes", code="image_too_large"
            )
        chunks.append(chunk)
    if size == 0:
        raise ProblemError("the image is empty", status=422, code="invalid_image")
    return Upload(upload.filename or "upload", content_type, b"".join(chunks))


def _make_lifespan(
    settings: GatewaySettings,
) -> Callable[[FastAPI], Any]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        timeout = settings.upstream_timeout_seconds
        backends = Backends(
            auth=ServiceClient("auth", settings.auth_url, timeout=timeout),
            feature=ServiceClient(
                "feature", settings.feature_url, timeout=settings.feature_timeout_seconds
            ),
            retrieval=ServiceClient("retrieval", settings.retrieval_url, timeout=timeout),
            metadata=ServiceClient("metadata", settings.metadata_url, timeout=timeout),
        )
        redis_client = redis.Redis.from_url(
            settings.redis_url,
            socket_timeout=settings.redis_timeout_seconds,
            socket_connect_timeout=settings.redis_timeout_seconds,
        )
        cache = ResultCache(
            redis_client, prefix=settings.cache_prefix, ttl_seconds=settings.cache_ttl_seconds
        )
        app.state.gateway = GatewayState(
            settings=settings,
            backends=backends,
            redis=redis_client,
            verifier=TokenVerifier(
                backends.auth, issuer=settings.jwt_issuer, audience=settings.jwt_audience
            ),
            orchestrator=Orchestrator(backends, cache),
        )
        try:
            yield
        finally:
            await backends.aclose()
            await redis_client.aclose()

    return lifespan


async def _readiness(app: FastAPI) -> str | None:
    state: GatewayState = app.state.gateway
    backends = state.backends

    async def check(client: ServiceClient) -> str | None:
        try:
            await client.request("GET", "/readyz", retry=False)
        except ProblemError as exc:
            return f"{client.name}: {exc.detail}"
        return None

    problems = await asyncio.gather(
        *(
            check(c)
            for c in (backends.auth, backends.feature, backends.retrieval, backends.metadata)
        )
    )
    # Redis is not required: searches are answered without the cache when it is down.
    return "; ".join(p for p in problems if p) or None


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()
    app = build_app(
        "gateway",
        lifespan=_make_lifespan(settings),
        readiness=_readiness,
        description="Search images by text, captions by image and images by image.",
    )
    max_upload = settings.max_upload_bytes

    @app.post("/auth/token", tags=["auth"], summary="Get an access token (OAuth2 form)")
    async def token(request: Request, state: State) -> Response:
        body = await request.body()
        response = await state.backends.auth.request(
            "POST",
            "/token",
            content=body,
            headers={"Content-Type": request.headers.get("content-type", "")},
        )
        return Response(
            response.content,
            status_code=response.status_code,
            media_type="application/json",
            headers={"Cache-Control": "no-store"},
        )

    @app.post(
        "/search/text",
        tags=["search"],
        response_model=SearchResponse,
        summary="Search by text: images (target=image) or captions (target=text). Scope search:text.",
    )
    async def search_text(
        body: TextSearchRequest,
        response: Response,
        state: State,
        _: Annotated[Principal, Depends(require("search:text"))],
    ) -> dict[str, Any]:
        result = await state.orchestrator.search_text(
            body.query,
            target=body.target,
            top_k=body.top_k,
            collection=body.collection,
            filters=body.filters,
        )
        response.headers["X-Cache"] = "hit" if result.cached else "miss"
        return result.body

    @app.post(
        "/search/image",
        tags=["search"],
        response_model=SearchResponse,
        summary="Search by image: captions (target=text) or similar images (target=image). "
        "Scope search:image.",
    )
    async def search_image(
        response: Response,
        state: State,
        _: Annotated[Principal, Depends(require("search:image"))],
        image: Annotated[UploadFile, File(description="The query image.")],
        top_k: Annotated[int, Form(ge=1, le=100)] = 10,
        target: Annotated[Target, Form()] = "text",
        collection: Annotated[str, Form(pattern=COLLECTION_NAME_PATTERN)] = "demo",
        filters: Annotated[str | None, Form(description="JSON object")] = None,
    ) -> dict[str, Any]:
        upload = await read_upload(image, max_upload)
        result = await state.orchestrator.search_image(
            upload,
            target=target,
            top_k=top_k,
            collection=collection,
            filters=parse_filters_form(filters),
        )
        response.headers["X-Cache"] = "hit" if result.cached else "miss"
        return result.body

    @app.post("/items", tags=["items"], status_code=201, summary="Add an item. Scope items:write.")
    async def add_item(
        state: State,
        _: Annotated[Principal, Depends(require("items:write"))],
        image: Annotated[UploadFile, File()],
        collection: Annotated[str, Form()] = "demo",
        caption: Annotated[list[str] | None, Form(description="Repeat for several.")] = None,
        attributes: Annotated[str | None, Form(description="JSON object")] = None,
    ) -> dict[str, Any]:
        check_collection(collection)
        upload = await read_upload(image, max_upload)
        return await state.orchestrator.add_item(
            upload, collection=collection, captions=caption or [], attributes=attributes
        )

    @app.get("/items/{item_id}", tags=["items"], summary="Get an item. Scope items:read.")
    async def get_item(
        item_id: int, state: State, _: Annotated[Principal, Depends(require("items:read"))]
    ) -> dict[str, Any]:
        return await state.orchestrator.get_item(item_id)

    @app.get("/items/{item_id}/image", tags=["items"], summary="An item's image. Scope items:read.")
    async def get_item_image(
        item_id: int, state: State, _: Annotated[Principal, Depends(require("items:read"))]
    ) -> Response:
        upstream = await state.backends.metadata.request("GET", f"/items/{item_id}/image")
        headers = {k: v for k, v in upstream.headers.items() if k.lower() in ("etag",)}
        return Response(
            upstream.content,
            media_type=upstream.headers.get("content-type"),
            headers={**headers, "Cache-Control": "private, max-age=3600"},
        )

    @app.delete(
        "/items/{item_id}",
        tags=["items"],
        status_code=204,
        summary="Delete an item. Scope items:write.",
    )
    async def delete_item(
        item_id: int, state: State, _: Annotated[Principal, Depends(require("items:write"))]
    ) -> Response:
        await state.orchestrator.delete_item(item_id)
        return Response(status_code=204)

    return app
