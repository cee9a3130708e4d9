"""HTTP layer of the gateway: routing, validation and the policies around each request
(``security``: tokens, scopes, rate limits; the per-request time budget; CORS; body size limits).
The work is in ``orchestrator``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, File, Form, Path, Query, Request, Response, UploadFile
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from services.gateway import admin
from services.gateway.cache import ResultCache
from services.gateway.embeddings import EmbeddingCache, ModelIdCache
from services.gateway.maintenance import Maintenance
from services.gateway.openapi import SECURED, install_openapi, links, problems
from services.gateway.orchestrator import Backends, Orchestrator, SearchResult
from services.gateway.ratelimit import RateLimiter
from services.gateway.redis_guard import GuardedRedis, make_redis_client
from services.gateway.revocations import RevocationList
from services.gateway.schemas import (
    MAX_CAPTIONS,
    MAX_TAGS,
    NOT_EMPTY,
    CaptionText,
    MergedItem,
    MergeRequest,
    PublicItem,
    SearchResponse,
    SourceUri,
    Tag,
    TextSearchRequest,
    check_attributes_form,
    image_search_form_schema,
    not_null,
    one_or_many,
    parse_filters_form,
)
from services.gateway.security import (
    Admission,
    limit_login,
    limit_token_requests,
    refuse_service_audience,
    require,
    require_deferred,
    settle_admission,
)
from services.gateway.settings import GatewaySettings
from services.gateway.uploads import read_image_search_form, read_upload
from shared.app import BodySizeLimitMiddleware, build_app
from shared.collections import COLLECTION_NAME_PATTERN
from shared.contracts.auth import AuthClient
from shared.contracts.feature import FeatureClient
from shared.contracts.filters import component_schema
from shared.contracts.metadata import (
    CollectionCreate,
    CollectionDeletion,
    CollectionOut,
    CollectionsOut,
    HashesOut,
    HashesRequest,
    MetadataClient,
)
from shared.contracts.retrieval import RetrievalClient
from shared.http import CircuitBreaker, ServiceClient, request_deadline
from shared.images import served_image
from shared.metrics import refresh_computed_gauges
from shared.oauth import REVOKE_REQUEST_DOC, TOKEN_REQUEST_DOC
from shared.problems import ProblemError
from shared.service_tokens import ServiceTokens
from shared.tokens import JwksKeySource, Principal, TokenVerifier

log = logging.getLogger(__name__)

# Headers of the auth service's token answers that the client must see as they are.
_TOKEN_HEADERS = ("cache-control", "pragma", "www-authenticate", "retry-after")
# Tokens whose verification the gateway remembers (until each one's exp; revocation is still
# checked on every request): a client sends the same token with every request.
_TOKEN_MEMO_SIZE = 4096


@dataclass
class GatewayState:
    settings: GatewaySettings
    backends: Backends
    redis: GuardedRedis
    verifier: TokenVerifier
    revocations: RevocationList
    limiter: RateLimiter | None
    models: ModelIdCache
    orchestrator: Orchestrator


async def _state(request: Request) -> GatewayState:
    # Async, though it never awaits: FastAPI runs sync dependencies in the thread pool, a
    # hop per request for nothing.
    return request.app.state.gateway


State = Annotated[GatewayState, Depends(_state)]
CollectionName = Annotated[str, Path(pattern=COLLECTION_NAME_PATTERN)]


class BudgetMiddleware:
    """Give each request its time budget (``shared.http.request_deadline``): every downstream
    call of a search shares ``search_seconds``; other requests get ``default_seconds``. A search
    takes its rate-limit charge with its cache lookup (``security.admit``); one refused before
    that, for its input, is charged here once answered, as ``authorize`` would have charged it."""

    def __init__(self, app: ASGIApp, *, search_seconds: float, default_seconds: float) -> None:
        self.app = app
        self.search_seconds = search_seconds
        self.default_seconds = default_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not scope.get("path", "").startswith("/search/"):
            with request_deadline(self.default_seconds):
                await self.app(scope, receive, send)
            return
        try:
            with request_deadline(self.search_seconds):
                await self.app(scope, receive, send)
        finally:
            await settle_admission(scope)


def _make_lifespan(settings: GatewaySettings) -> Callable[[FastAPI], Any]:
    def breaker(name: str) -> CircuitBreaker:
        return CircuitBreaker(
            name,
            failure_threshold=settings.breaker_failure_threshold,
            reset_seconds=settings.breaker_reset_seconds,
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        timeout = settings.upstream_timeout_seconds
        auth_breaker = breaker("auth")
        # Plain: the token endpoints and admin routes carry the caller's own credentials, and
        # the gateway's service tokens are fetched through it.
        auth = ServiceClient("auth", settings.auth_url, timeout=timeout, breaker=auth_breaker)
        tokens = ServiceTokens(auth, "gateway", settings.client_secret.get_secret_value())
        backends = Backends(
            auth=auth,
            feature=FeatureClient(
                ServiceClient(
                    "feature",
                    settings.feature_url,
                    timeout=settings.feature_timeout_seconds,
                    breaker=breaker("feature"),
                    credentials=tokens.credentials("feature"),
                )
            ),
            retrieval=RetrievalClient(
                ServiceClient(
                    "retrieval",
                    settings.retrieval_url,
                    timeout=timeout,
                    breaker=breaker("retrieval"),
                    credentials=tokens.credentials("retrieval"),
                )
            ),
            metadata=MetadataClient(
                ServiceClient(
                    "metadata",
                    settings.metadata_url,
                    timeout=timeout,
                    breaker=breaker("metadata"),
                    credentials=tokens.credentials("metadata"),
                )
            ),
        )
        # The revocation feed takes the gateway's service token for auth.
        feed = ServiceClient(
            "auth",
            settings.auth_url,
            timeout=timeout,
            breaker=auth_breaker,
            credentials=tokens.credentials("auth"),
        )
        # One failure is enough to stop using Redis for a moment: every search touches it
        # several times, and a hanging Redis must not eat the search's budget.
        redis = GuardedRedis(
            make_redis_client(
                settings.redis_url,
                settings.redis_timeout_seconds,
                settings.redis_password.get_secret_value() if settings.redis_password else None,
            ),
            CircuitBreaker(
                "redis", failure_threshold=1, reset_seconds=settings.redis_retry_seconds
            ),
        )
        revocations = RevocationList(
            AuthClient(feed),
            poll_seconds=settings.revocation_poll_seconds,
            max_staleness=settings.revocation_max_staleness_seconds,
            fail_open_reads=settings.fail_open_reads,
            fail_open_writes=settings.fail_open_writes,
        )
        models = ModelIdCache(backends.feature, ttl=settings.model_id_ttl_seconds)
        state = GatewayState(
            settings=settings,
            backends=backends,
            redis=redis,
            verifier=TokenVerifier(
                JwksKeySource(
                    backends.auth,
                    cache_seconds=settings.jwks_cache_seconds,
                    min_refresh_interval=settings.jwks_min_refresh_seconds,
                ),
                issuer=settings.jwt_issuer,
                audience=settings.jwt_audience,
                revocations=revocations,
                memo_size=_TOKEN_MEMO_SIZE,
            ),
            revocations=revocations,
            limiter=(
                RateLimiter(
                    redis,
                    prefix=settings.cache_prefix,
                    fail_open_reads=settings.fail_open_reads,
                    fail_open_writes=settings.fail_open_writes,
                )
                if settings.rate_limit_enabled
                else None
            ),
            models=models,
            orchestrator=Orchestrator(
                backends,
                ResultCache(
                    redis,
                    prefix=settings.cache_prefix,
                    ttl_seconds=settings.cache_ttl_seconds,
                    window_seconds=settings.cache_window_seconds,
                ),
                embeddings=EmbeddingCache(
                    prefix=settings.cache_prefix,
                    ttl_seconds=settings.embedding_cache_ttl_seconds,
                ),
                models=models,
            ),
        )
        app.state.gateway = state
        # A first copy of the revocation list before serving, when the auth service answers.
        with contextlib.suppress(ProblemError, TimeoutError, KeyError, ValueError):
            async with asyncio.timeout(3.0):
                await revocations.poll()
        poller = asyncio.create_task(revocations.run(), name="revocation-poller")
        maintenance = asyncio.create_task(
            Maintenance(state.orchestrator, redis, settings).run(),
            name="maintenance",
        )
        gauges = asyncio.create_task(refresh_computed_gauges(), name="computed-gauges")
        try:
            yield
        finally:
            for task in (poller, maintenance, gauges):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await models.aclose()
            await tokens.aclose()
            await feed.aclose()
            await backends.aclose()
            await redis.aclose()

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

    problems_found = await asyncio.gather(*(check(c) for c in backends.http_clients()))
    # Redis is not required: searches are answered without the cache when it is down.
    return "; ".join(p for p in problems_found if p) or None


_TOKEN_RESPONSE = {
    200: {
        "description": "An access token; with the password and refresh_token grants also the "
        "next refresh token (rotated on every use).",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["access_token", "token_type", "expires_in", "scope"],
                    "properties": {
                        "access_token": {"type": "string"},
                        "token_type": {"type": "string", "enum": ["Bearer"]},
                        "expires_in": {"type": "integer"},
                        "scope": {"type": "string"},
                        "refresh_token": {"type": "string"},
                        "refresh_token_expires_in": {"type": "integer"},
                    },
                }
            }
        },
    }
}


def _search_response(result: SearchResult) -> Response:
    # The page's JSON as built once (and cached as it is): SearchResponse documents it, and
    # FastAPI would only validate and encode it again.
    return Response(
        result.body,
        media_type="application/json",
        headers={"X-Cache": "hit" if result.cached else "miss"},
    )


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()
    middleware: list[Middleware] = []
    if settings.cors_allow_origins:
        # Outermost of ours, so refusals (401, 413, 429) carry CORS headers a browser can read.
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.cors_allow_origins),
                allow_credentials=settings.cors_allow_credentials,
                allow_methods=["GET", "POST", "PATCH", "DELETE"],
                allow_headers=[
                    "Authorization",
                    "Content-Type",
                    "X-Request-ID",
                    "traceparent",
                    "tracestate",
                ],
                expose_headers=["X-Request-ID", "traceresponse", "X-Cache", "Retry-After"],
                max_age=600,
            )
        )
    middleware += [
        Middleware(
            BodySizeLimitMiddleware,
            max_bytes=settings.effective_max_request_bytes,
            max_json_bytes=settings.max_json_bytes,
        ),
        Middleware(
            BudgetMiddleware,
            search_seconds=settings.search_timeout_seconds,
            default_seconds=settings.request_timeout_seconds,
        ),
    ]
    app = build_app(
        "gateway",
        lifespan=_make_lifespan(settings),
        readiness=_readiness,
        description="Search images by text, captions by image and images by image. Every route "
        "but the token endpoints needs a bearer token with the scope its summary names; every "
        "error is an RFC 9457 problem body (`Problem`) with a stable `code`.",
        middleware=middleware,
    )
    install_openapi(app, {"ImageSearchForm": image_search_form_schema()})
    max_upload = settings.max_upload_bytes
    upload_types = settings.allowed_upload_types
    # The image part's media types, in the document as the settings allow them.
    image_encoding = {"image": {"contentType": ", ".join(upload_types)}}
    image_part = {"requestBody": {"content": {"multipart/form-data": {"encoding": image_encoding}}}}
    image_search_body = {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"$ref": "#/components/schemas/ImageSearchForm"},
                    "encoding": image_encoding,
                }
            },
        }
    }

    async def forward_form(request: Request, state: GatewayState, path: str) -> Response:
        headers = {"Content-Type": request.headers.get("content-type", "")}
        if "authorization" in request.headers:  # HTTP Basic client credentials
            headers["Authorization"] = request.headers["authorization"]
        upstream = await state.backends.auth.request(
            "POST",
            path,
            content=await request.body(),
            headers=headers,
            retry=False,
            allow_client_errors=True,
        )
        answer = {"cache-control": "no-store"}  # tokens are never cached, whatever happens
        answer |= {k.lower(): v for k, v in upstream.headers.items() if k.lower() in _TOKEN_HEADERS}
        return Response(
            upstream.content,
            status_code=upstream.status_code,
            # None when the answer has no body (a revocation): no Content-Type then.
            media_type=upstream.headers.get("content-type"),
            headers=answer,
        )

    @app.post(
        "/auth/token",
        tags=["auth"],
        summary="Get an access token (OAuth2 token endpoint: password, client_credentials or "
        "refresh_token grant)",
        openapi_extra=TOKEN_REQUEST_DOC,
        responses={**_TOKEN_RESPONSE, **problems(400, 401, 413, 429, 503)},
        dependencies=[Depends(limit_token_requests)],
    )
    async def token(request: Request, state: State) -> Response:
        # Per IP (the dependency), then per account: a locked account is refused here.
        await refuse_service_audience(request)
        return await limit_login(request, lambda: forward_form(request, state, "/token"))

    @app.post(
        "/auth/revoke",
        response_class=Response,
        tags=["auth"],
        summary="Revoke a refresh token (its whole family) or an access token (RFC 7009); "
        "answers 200 for unknown tokens too",
        openapi_extra=REVOKE_REQUEST_DOC,
        responses={200: {"description": "Revoked, or nothing to revoke"}}
        | problems(400, 413, 429, 503),
        dependencies=[Depends(limit_token_requests)],
    )
    async def revoke(request: Request, state: State) -> Response:
        return await forward_form(request, state, "/revoke")

    @app.post(
        "/search/text",
        tags=["search"],
        response_model=SearchResponse,
        responses=problems(*SECURED, 404, 409),
        summary="Search by text: images (target=image) or captions (target=text). "
        "Scope search:text.",
    )
    async def search_text(
        body: TextSearchRequest,
        state: State,
        admission: Annotated[Admission, require_deferred("search:text")],
    ) -> Response:
        result = await state.orchestrator.search_text(
            body.query,
            target=body.target,
            top_k=body.top_k,
            collection=body.collection,
            filters=body.filters,
            mode=body.mode,
            charge=admission.charge,
        )
        return _search_response(result)

    @app.post(
        "/search/image",
        tags=["search"],
        response_model=SearchResponse,
        responses=problems(*SECURED, 404, 409, 413, 415),
        summary="Search by image: captions (target=text) or similar images (target=image). "
        "Scope search:image.",
        openapi_extra=image_search_body,
    )
    async def search_image(
        request: Request,
        state: State,
        admission: Annotated[Admission, require_deferred("search:image")],
    ) -> Response:
        query = await read_image_search_form(request, max_upload, upload_types)
        fields = query.fields
        result = await state.orchestrator.search_image(
            query.image,
            target=fields.target,
            top_k=fields.top_k,
            collection=fields.collection,
            filters=parse_filters_form(fields.filters),
            charge=admission.charge,
        )
        return _search_response(result)

    @app.post(
        "/items",
        tags=["items"],
        status_code=201,
        response_model=PublicItem,
        responses={
            201: {
                "description": "The item, indexed",
                "links": links(
                    "item_id",
                    "/id",
                    ("get", "/items/{item_id}"),
                    ("get", "/items/{item_id}/image"),
                    ("post", "/items/{item_id}/merge"),
                    ("delete", "/items/{item_id}"),
                ),
            }
        }
        | problems(*SECURED, 404, 409, 413, 415),
        summary="Add an item. Scope items:write. An image the collection holds is refused: 409 "
        "duplicate_item with its item_id (merge into it with POST /items/{item_id}/merge).",
        openapi_extra=image_part,
    )
    async def add_item(
        state: State,
        _: Annotated[Principal, require("items:write")],
        image: Annotated[UploadFile, File(json_schema_extra=NOT_EMPTY)],
        collection: Annotated[str, Form(pattern=COLLECTION_NAME_PATTERN)] = "demo",
        caption: Annotated[
            list[CaptionText] | None,
            Form(
                description="Repeat for several.",
                max_length=MAX_CAPTIONS,
                json_schema_extra=one_or_many,
            ),
        ] = None,
        attributes: Annotated[
            str | None,
            Form(
                description="The item's attributes (JSON object)",
                json_schema_extra=component_schema("Attributes"),
            ),
        ] = None,
        tag: Annotated[
            list[Tag] | None,
            Form(
                description="Repeat for several.",
                max_length=MAX_TAGS,
                json_schema_extra=one_or_many,
            ),
        ] = None,
        source_uri: Annotated[
            SourceUri | None,
            Form(description="Where the image came from", json_schema_extra=not_null),
        ] = None,
    ) -> dict[str, Any]:
        attributes = check_attributes_form(attributes)
        upload = await read_upload(image, max_upload, upload_types)
        return await state.orchestrator.add_item(
            upload,
            collection=collection,
            captions=caption or [],
            attributes=attributes,
            tags=tag or [],
            source_uri=source_uri,
        )

    @app.post(
        "/items/{item_id}/merge",
        tags=["items"],
        response_model=MergedItem,
        responses=problems(*SECURED, 404, 409),
        summary="Add what a duplicate of an indexed item brings: the captions and tags it lacks "
        "(new captions embedded), and attributes of keys it lacks (its own values are kept). "
        "Scope items:write.",
    )
    async def merge_item(
        item_id: int,
        body: MergeRequest,
        state: State,
        _: Annotated[Principal, require("items:write")],
    ) -> dict[str, Any]:
        return await state.orchestrator.merge_item(item_id, body.contract())

    @app.get(
        "/items/{item_id}",
        tags=["items"],
        response_model=PublicItem,
        responses=problems(*SECURED, 404),
        summary="Get an item. Scope items:read.",
    )
    async def get_item(
        item_id: int, state: State, _: Annotated[Principal, require("items:read")]
    ) -> dict[str, Any]:
        return await state.orchestrator.get_item(item_id)

    @app.get(
        "/items/{item_id}/image",
        tags=["items"],
        responses={
            200: {
                "description": "The stored image bytes, as the format detected at upload (an "
                "unknown one as a download), with nosniff and a sandboxing CSP",
                "content": {"image/*": {}, "application/octet-stream": {}},
            }
        }
        | problems(*SECURED, 404),
        summary="An item's image, or its thumbnail with size=thumb. Scope items:read.",
    )
    async def get_item_image(
        item_id: int,
        state: State,
        _: Annotated[Principal, require("items:read")],
        size: Annotated[Literal["original", "thumb"], Query()] = "original",
    ) -> Response:
        stored = await state.backends.metadata.image(item_id, size=size)
        # Re-derived here, not copied from metadata's answer: this is the public door.
        served = served_image(
            stored.content_type, f"item-{item_id}{'-thumb' if size == 'thumb' else ''}"
        )
        headers = {"Cache-Control": "private, max-age=3600", **served.headers}
        if stored.etag is not None:
            headers["ETag"] = stored.etag
        return Response(stored.data, media_type=served.media_type, headers=headers)

    @app.delete(
        "/items/{item_id}",
        tags=["items"],
        status_code=204,
        responses=problems(*SECURED, 404),
        summary="Delete an item. Scope items:write.",
    )
    async def delete_item(
        item_id: int, state: State, _: Annotated[Principal, require("items:write")]
    ) -> Response:
        await state.orchestrator.delete_item(item_id)
        return Response(status_code=204)

    @app.get(
        "/collections",
        tags=["collections"],
        responses=problems(*SECURED),
        summary="List collections with their item counts. Scope items:read.",
    )
    async def list_collections(
        state: State, _: Annotated[Principal, require("items:read")]
    ) -> CollectionsOut:
        return await state.backends.metadata.collections()

    @app.get(
        "/collections/{collection}",
        tags=["collections"],
        responses=problems(*SECURED, 404),
        summary="Describe a collection: item counts by status, model id, index settings. "
        "Scope items:read.",
    )
    async def get_collection(
        collection: CollectionName, state: State, _: Annotated[Principal, require("items:read")]
    ) -> CollectionOut:
        return await state.backends.metadata.collection(collection)

    @app.post(
        "/collections",
        tags=["collections"],
        status_code=201,
        responses={
            201: {
                "description": "The collection, empty",
                "links": links(
                    "collection",
                    "/name",
                    ("get", "/collections/{collection}"),
                    ("post", "/collections/{collection}/hashes"),
                    ("delete", "/collections/{collection}"),
                ),
            }
        }
        | problems(*SECURED, 409),
        summary="Create a collection with its model id and index settings. Scope admin.",
    )
    async def create_collection(
        body: CollectionCreate, state: State, _: Annotated[Principal, require("admin")]
    ) -> CollectionOut:
        return await state.backends.metadata.create_collection(body)

    @app.delete(
        "/collections/{collection}",
        tags=["collections"],
        status_code=202,
        response_model=CollectionDeletion,
        responses=problems(*SECURED, 404),
        summary="Delete a collection, its items and their vectors: gone from every answer at "
        "once, removed in the background (GET /deletions/{id} follows it). Scope admin.",
    )
    async def delete_collection(
        collection: CollectionName,
        state: State,
        response: Response,
        _: Annotated[Principal, require("admin")],
    ) -> CollectionDeletion:
        deletion = await state.orchestrator.delete_collection(collection)
        response.headers["Location"] = f"/deletions/{deletion.id}"
        return deletion

    @app.get(
        "/deletions/{deletion_id}",
        tags=["collections"],
        response_model=CollectionDeletion,
        responses=problems(*SECURED, 404),
        summary="A collection deletion: dropping (its vectors), purging (its items and images), "
        "done (the name is free). Scope admin.",
    )
    async def get_deletion(
        deletion_id: Annotated[int, Path(ge=1, le=2**63 - 1)],
        state: State,
        _: Annotated[Principal, require("admin")],
    ) -> CollectionDeletion:
        return await state.backends.metadata.deletion(deletion_id)

    @app.post(
        "/collections/{collection}/hashes",
        tags=["collections"],
        responses=problems(*SECURED, 404),
        summary="Which of these image SHA-256 hashes the collection already holds (lets a client "
        "skip known images). Scope items:write.",
    )
    async def find_hashes(
        collection: CollectionName,
        body: HashesRequest,
        state: State,
        _: Annotated[Principal, require("items:write")],
    ) -> HashesOut:
        return await state.backends.metadata.find_hashes(collection, body)

    app.include_router(admin.router)
    return app
