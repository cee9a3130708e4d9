"""The feature service's API (services/feature/app.py): its bodies and the typed client its
callers (the gateway, ``crossmodal reconcile``) use."""

from __future__ import annotations

from typing import Any, Self

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from shared.contracts.client import JSON_HEADERS, ServiceApi
from shared.contracts.vectors import VectorEncoding, decode_vectors, encode_vectors

# An image sent for embedding: (file name, bytes, content type).
ImageFile = tuple[str, bytes, str]


class TextEmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: list[str] = Field(min_length=1, description="1 to max_texts (256) non-blank strings")
    encoding: VectorEncoding = Field(
        "json",
        description="json: vectors as lists of floats; base64: vectors_base64, float32 "
        "little-endian rows (what the services use among themselves)",
    )


class Embeddings(BaseModel):
    model_id: str
    dim: int
    vectors: list[list[float]] | None = Field(None, description="encoding=json")
    vectors_base64: str | None = Field(None, description="encoding=base64")

    @classmethod
    def of(cls, model_id: str, matrix: np.ndarray, encoding: VectorEncoding, **extra: Any) -> Self:
        """The answer for ``matrix`` in the encoding the caller asked for."""
        dim = int(matrix.shape[1])
        if encoding == "base64":
            return cls(model_id=model_id, dim=dim, vectors_base64=encode_vectors(matrix), **extra)
        return cls(model_id=model_id, dim=dim, vectors=matrix.tolist(), **extra)

    def matrix(self) -> np.ndarray:
        """The vectors as a float32 matrix, whichever the encoding."""
        if self.vectors_base64 is not None:
            return decode_vectors(self.vectors_base64, dim=self.dim)
        return np.asarray(self.vectors, dtype=np.float32).reshape(-1, self.dim)


class TextEmbeddings(Embeddings):
    truncated: list[bool] = Field(description="whether each text was cut to the model's length")


class ImageEmbeddings(Embeddings):
    pass


class ModelInfo(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_id: str
    dim: int
    image_size: int
    max_text_tokens: int
    device: str
    dtype: str = Field(
        description="the compute precision: float32, bfloat16, float16 or int8, or one per tower "
        "where they differ, e.g. 'int8 (image), float32 (text)'"
    )
    runtime: str = Field(description="torch, torch-bf16, torch-fp16 or onnx")
    architecture: str = Field(description="the model class, e.g. CLIPModel or SiglipModel")
    fallbacks: dict[str, str] = Field(
        default_factory=dict,
        description="towers ('text', 'image') that run in float32 on this machine although the "
        "runtime offers a lower precision, each with the reason (its vectors missed the parity "
        "bound against float32)",
    )


class FeatureClient(ServiceApi):
    """The feature service as its callers see it. Vectors travel as base64 float32 rows; an
    embedding changes nothing, so every call may be retried."""

    async def embed_texts(self, texts: list[str]) -> TextEmbeddings:
        request = TextEmbeddingRequest(texts=texts, encoding="base64")
        response = await self.http.request(
            "POST",
            "/embed/text",
            content=request.model_dump_json(),
            headers=JSON_HEADERS,
            retry=True,
        )
        return TextEmbeddings.model_validate_json(response.content)

    async def embed_images(self, images: list[ImageFile]) -> ImageEmbeddings:
        response = await self.http.request(
            "POST",
            "/embed/image",
            data={"encoding": "base64"},
            files=[("images", image) for image in images],
            retry=True,
        )
        return ImageEmbeddings.model_validate_json(response.content)

    async def model(self, *, timeout: float | None = None) -> ModelInfo:
        response = await self.http.request("GET", "/model", retry=False, timeout=timeout)
        return ModelInfo.model_validate_json(response.content)
