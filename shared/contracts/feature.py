"""The feature service's embedding API (services/feature/app.py) as its callers see it."""

from __future__ import annotations

from typing import Any, Self

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from shared.contracts.vectors import VectorEncoding, decode_vectors, encode_vectors


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
