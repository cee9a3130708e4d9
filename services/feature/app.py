"""HTTP layer of the feature service: validation, decoding and metrics; the model is in
``model`` and the image safety checks in ``images``.

Inference is CPU/GPU-bound and blocking, so it runs in a worker thread, one request at a time
(an async lock queues the others without holding threads): the event loop stays free for
health checks and metrics while a batch is computed.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Annotated, Any, TypeVar

import anyio
import anyio.to_thread
from fastapi import Depends, FastAPI, File, Request, UploadFile
from PIL import Image
from prometheus_client import Gauge, Histogram
from pydantic import BaseModel, ConfigDict, Field

from services.feature.images import decode_image, too_large
from services.feature.model import Embedder, TransformersEmbedder
from services.feature.settings import FeatureSettings
from shared.app import build_app
from shared.problems import ServiceUnavailable, Unprocessable

INFERENCE_MS = Gauge(
    "multimodal_model_inference_ms",
    "Duration of the most recent model inference (one request's batch), in milliseconds.",
)
INFERENCE_SECONDS = Histogram(
    "feature_inference_seconds",
    "Model inference time per request, by modality (text or image).",
    ["modality"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
BATCH_SIZE = Histogram(
    "feature_batch_size",
    "Inputs embedded per request, by modality.",
    ["modality"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)

_READ_CHUNK = 1024 * 1024
T = TypeVar("T")


@dataclass
class FeatureState:
    settings: FeatureSettings
    embedder: Embedder | None = None
    inference_lock: anyio.Lock = field(default_factory=anyio.Lock)

    def ready_embedder(self) -> Embedder:
        if self.embedder is None or not getattr(self.embedder, "ready", True):
            raise ServiceUnavailable(
                "the model is not loaded yet", code="model_not_ready", headers={"Retry-After": "5"}
            )
        return self.embedder


def _state(request: Request) -> FeatureState:
    return request.app.state.feature


State = Annotated[FeatureState, Depends(_state)]


class TextRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: list[str] = Field(min_length=1, description="1 to max_texts (256) non-blank strings")


class TextEmbeddingResponse(BaseModel):
    model_id: str
    dim: int
    vectors: list[list[float]]
    truncated: list[bool] = Field(description="whether each text was cut to the model's length")


class ImageEmbeddingResponse(BaseModel):
    model_id: str
    dim: int
    vectors: list[list[float]]


class ModelInfo(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_id: str
    dim: int
    image_size: int
    max_text_tokens: int
    device: str
    dtype: str


async def _infer(
    state: FeatureState, modality: str, count: int, fn: Callable[..., T], *args: Any
) -> T:
    async with state.inference_lock:
        started = time.perf_counter()
        result = await anyio.to_thread.run_sync(fn, *args)
        elapsed = time.perf_counter() - started
    INFERENCE_MS.set(elapsed * 1000)
    INFERENCE_SECONDS.labels(modality).observe(elapsed)
    BATCH_SIZE.labels(modality).observe(count)
    return result


async def _read_limited(upload: UploadFile, max_bytes: int, name: str) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := await upload.read(_READ_CHUNK):
        size += len(chunk)
        if size > max_bytes:
            raise too_large(f"{name} is larger than {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _decode_all(
    blobs: Sequence[bytes], names: Sequence[str], settings: FeatureSettings
) -> list[Image.Image]:
    return [
        decode_image(
            blob,
            max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
            name=name,
        )
        for blob, name in zip(blobs, names, strict=True)
    ]


def _upload_name(index: int, upload: UploadFile) -> str:
    filename = (upload.filename or "").strip()
    if filename and len(filename) <= 100 and filename.isprintable():
        return f"images[{index}] ({filename!r})"
    return f"images[{index}]"


def create_app(
    settings: FeatureSettings | None = None, *, embedder: Embedder | None = None
) -> FastAPI:
    """The feature service. ``embedder`` injects an already loaded model (tests share one);
    without it the lifespan loads ``settings.model`` before the app serves requests."""
    settings = settings or FeatureSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = FeatureState(settings, embedder)
        app.state.feature = state
        if state.embedder is None:
            # Loading reads hundreds of MB and warms the model up: keep it off the event loop.
            state.embedder = await anyio.to_thread.run_sync(
                partial(
                    TransformersEmbedder.load,
                    settings.model,
                    model_id=settings.model_id,
                    device=settings.device,
                    torch_threads=settings.torch_threads,
                    batch_size=settings.max_batch,
                )
            )
        yield

    async def readiness(app: FastAPI) -> str | None:
        state: FeatureState | None = getattr(app.state, "feature", None)
        if state is None or state.embedder is None:
            return "the model is not loaded"
        if not getattr(state.embedder, "ready", True):
            return "the model is warming up"
        return None

    app = build_app(
        "feature",
        lifespan=lifespan,
        readiness=readiness,
        description="CLIP inference: texts and images to L2-normalised float32 vectors.",
    )

    @app.post("/embed/text", response_model=TextEmbeddingResponse)
    async def embed_text(state: State, body: TextRequest) -> TextEmbeddingResponse:
        model = state.ready_embedder()
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
        result = await _infer(state, "text", len(body.texts), model.embed_texts, body.texts)
        return TextEmbeddingResponse(
            model_id=model.model_id,
            dim=model.dim,
            vectors=result.vectors.tolist(),
            truncated=result.truncated,
        )

    @app.post("/embed/image", response_model=ImageEmbeddingResponse)
    async def embed_image(
        state: State,
        images: Annotated[list[UploadFile], File(description="one or more image files")],
    ) -> ImageEmbeddingResponse:
        model = state.ready_embedder()
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
        # Decoding is CPU work too, but needs no model: it runs outside the inference lock.
        decoded = await anyio.to_thread.run_sync(_decode_all, blobs, names, settings)
        vectors = await _infer(state, "image", len(decoded), model.embed_images, decoded)
        return ImageEmbeddingResponse(
            model_id=model.model_id, dim=model.dim, vectors=vectors.tolist()
        )

    @app.get("/model", response_model=ModelInfo)
    async def model_info(state: State) -> ModelInfo:
        model = state.ready_embedder()
        return ModelInfo(
            model_id=model.model_id,
            dim=model.dim,
            image_size=model.image_size,
            max_text_tokens=model.max_text_tokens,
            device=model.device,
            dtype=model.dtype,
        )

    return app
