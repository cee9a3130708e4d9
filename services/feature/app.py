"""HTTP layer of the feature service: validation, limits, problems and metrics. The work is in
``service`` (batching, threads), the model in ``model`` and ``onnx_runtime``, and the image safety
checks in ``images``.

Concurrent requests are merged into shared forward passes (see ``batcher``); when more inputs
are waiting than ``max_queue`` allows, a request is answered at once with 503 ``overloaded`` and
a ``Retry-After`` estimate rather than queued without limit.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any

import anyio.to_thread
from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError

from services.feature.batcher import Overloaded
from services.feature.images import too_large
from services.feature.metrics import ERRORS
from services.feature.model import Embedder, load_embedder
from services.feature.service import FeatureService
from services.feature.settings import FeatureSettings
from shared.app import build_app
from shared.contracts.feature import (
    ImageEmbeddings,
    ModelInfo,
    TextEmbeddingRequest,
    TextEmbeddings,
)
from shared.contracts.vectors import VectorEncoding
from shared.problems import ProblemError, ServiceUnavailable, Unprocessable
from shared.service_auth import CallerVerifier, caller
from shared.tokens import KeySource

_READ_CHUNK = 1024 * 1024


@dataclass
class FeatureState:
    settings: FeatureSettings
    service: FeatureService | None = None

    def ready_service(self) -> FeatureService:
        service = self.service
        if service is None or not service.embedder.ready or not service.running:
            raise ServiceUnavailable(
                "the model is not loaded yet", code="model_not_ready", headers={"Retry-After": "5"}
            )
        return service


async def _state(request: Request) -> FeatureState:
    # Async, though it never awaits: FastAPI runs sync dependencies in the thread pool, a
    # hop per request for nothing.
    return request.app.state.feature


State = Annotated[FeatureState, Depends(_state)]


def _overloaded(exc: Overloaded) -> ServiceUnavailable:
    return ServiceUnavailable(
        str(exc), code="overloaded", headers={"Retry-After": str(exc.retry_after)}
    )


async def _read_limited(upload: UploadFile, max_bytes: int, name: str) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := await upload.read(_READ_CHUNK):
        size += len(chunk)
        if size > max_bytes:
            raise too_large(f"{name} is larger than {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _upload_name(index: int, upload: UploadFile) -> str:
    filename = (upload.filename or "").strip()
    if filename and len(filename) <= 100 and filename.isprintable():
        return f"images[{index}] ({filename!r})"
    return f"images[{index}]"


def _count_errors(app: FastAPI) -> None:
    """Wrap the shared problem handlers so every problem also counts in feature_errors_total."""
    for exc_class in (ProblemError, RequestValidationError, Exception):
        inner = app.exception_handlers[exc_class]

        async def counted(request: Request, exc: Exception, inner: Any = inner) -> Any:
            if isinstance(exc, ProblemError):
                code = exc.code
            elif isinstance(exc, RequestValidationError):
                code = "validation_error"
            else:
                code = "internal_error"
            route = request.scope.get("route")
            ERRORS.labels(getattr(route, "path", "unmatched"), code).inc()
            return await inner(request, exc)

        app.add_exception_handler(exc_class, counted)


def create_app(
    settings: FeatureSettings | None = None,
    *,
    embedder: Embedder | None = None,
    token_keys: KeySource | None = None,
) -> FastAPI:
    """The feature service. ``embedder`` injects an already loaded model (tests share one);
    without it the lifespan loads ``settings.model`` before the app serves requests.
    ``token_keys`` verify the callers' service tokens instead of auth's JWKS."""
    settings = settings or FeatureSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = FeatureState(settings)
        app.state.feature = state
        model = embedder
        if model is None:
            # Loading reads hundreds of MB and warms the model up: keep it off the event loop.
            model = await anyio.to_thread.run_sync(
                partial(
                    load_embedder,
                    settings.model,
                    model_id=settings.model_id,
                    device=settings.device,
                    runtime=settings.runtime,
                    torch_threads=settings.torch_threads,
                    batch_size=settings.max_batch_size,
                    jpeg_draft=settings.jpeg_draft,
                    gpu_decode=settings.gpu_decode,
                )
            )
        service = FeatureService(model, settings)
        service.start()
        state.service = service
        try:
            yield
        finally:
            await service.stop()

    async def readiness(app: FastAPI) -> str | None:
        state: FeatureState | None = getattr(app.state, "feature", None)
        if state is None or state.service is None:
            return "the model is not loaded"
        if not state.service.embedder.ready:
            return "the model is warming up"
        if not state.service.running:
            return "the batchers are not running"
        return None

    app = build_app(
        "feature",
        lifespan=lifespan,
        readiness=readiness,
        description="CLIP inference: texts and images to L2-normalised float32 vectors.",
        callers=CallerVerifier.for_settings("feature", settings, keys=token_keys),
    )
    _count_errors(app)

    @app.post(
        "/embed/text",
        response_model=TextEmbeddings,
        response_model_exclude_none=True,
        dependencies=[caller("feature:embed")],
    )
    async def embed_text(state: State, body: TextEmbeddingRequest) -> TextEmbeddings:
        service = state.ready_service()
        if len(body.texts) > settings.max_texts:
            raise Unprocessable(
                f"at most {settings.max_texts} texts per request, got {len(body.texts)}",
                code="too_many_texts",
            )
        blank = [i for i, text in enumerate(body.texts) if not text.strip()]
        if blank:
            raise Unprocessable(
                f"texts[{blank[0]}] is empty or blank; every text needs some content",
                code="blank_text",
                extra={
                    "errors": [
                        {
                            "loc": ["body", "texts", str(i)],
                            "msg": "blank text",
                            "type": "blank_text",
                        }
                        for i in blank
                    ]
                },
            )
        try:
            result = await service.embed_texts(body.texts)
        except Overloaded as exc:
            raise _overloaded(exc) from None
        return TextEmbeddings.of(
            service.embedder.model_id, result.vectors, body.encoding, truncated=result.truncated
        )

    @app.post(
        "/embed/image",
        response_model=ImageEmbeddings,
        response_model_exclude_none=True,
        dependencies=[caller("feature:embed")],
    )
    async def embed_image(
        state: State,
        images: Annotated[list[UploadFile], File(description="one or more image files")],
        encoding: Annotated[VectorEncoding, Form(description="json or base64")] = "json",
    ) -> ImageEmbeddings:
        service = state.ready_service()
        if len(images) > settings.max_batch:
            raise Unprocessable(
                f"at most {settings.max_batch} images per request, got {len(images)}",
                code="too_many_images",
            )
        names = [_upload_name(i, upload) for i, upload in enumerate(images)]
        blobs = [
            await _read_limited(upload, settings.max_image_bytes, name)
            for upload, name in zip(images, names, strict=True)
        ]
        try:
            vectors = await service.embed_image_bytes(blobs, names)
        except Overloaded as exc:
            raise _overloaded(exc) from None
        return ImageEmbeddings.of(service.embedder.model_id, vectors, encoding)

    @app.get("/model", response_model=ModelInfo, dependencies=[caller("feature:embed")])
    async def model_info(state: State) -> ModelInfo:
        model = state.ready_service().embedder
        return ModelInfo(
            model_id=model.model_id,
            dim=model.dim,
            image_size=model.image_size,
            max_text_tokens=model.max_text_tokens,
            device=model.device,
            dtype=model.dtype,
            runtime=model.runtime,
            architecture=model.architecture,
            fallbacks=model.fallbacks,
        )

    return app
