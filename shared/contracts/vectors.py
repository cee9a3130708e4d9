"""Vectors between services as bytes: float32, little-endian, row after row, base64 in JSON.

A 512-d vector is 2.7 KiB of base64 against about 10 KiB as a JSON list of floats, and neither
side formats or parses hundreds of decimal numbers per vector.
"""

from __future__ import annotations

import base64
import binascii
from typing import Literal

import numpy as np

# How a caller asks for vectors: "json" lists of floats (readable, the default) or "base64".
VectorEncoding = Literal["json", "base64"]

_FLOAT32 = np.dtype("<f4")


class VectorDecodeError(ValueError):
    """The text is not base64, or its bytes are not whole rows of finite float32 values."""


def encode_vectors(vectors: np.ndarray) -> str:
    """Rows of ``vectors`` (any float dtype) as base64 of little-endian float32."""
    return base64.b64encode(np.ascontiguousarray(vectors, dtype=_FLOAT32).tobytes()).decode()


def decode_vectors(text: str, *, dim: int | None = None, rows: int | None = None) -> np.ndarray:
    """The float32 matrix that ``encode_vectors`` wrote, shaped by its row length ``dim`` or
    by its number of ``rows`` (one of the two)."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise VectorDecodeError(f"vectors_base64 is not base64: {exc}") from None
    values = len(raw) // _FLOAT32.itemsize
    if dim is None:
        dim = values // rows if rows else 0
    if not raw or len(raw) % _FLOAT32.itemsize or dim <= 0 or values % dim:
        raise VectorDecodeError(
            f"vectors_base64 holds {len(raw)} bytes, not whole rows of float32 values "
            f"({'of ' + str(dim) if dim else 'for ' + str(rows) + ' rows'})"
        )
    matrix = np.frombuffer(raw, dtype=_FLOAT32).reshape(-1, dim)
    if rows is not None and len(matrix) != rows:
        raise VectorDecodeError(f"vectors_base64 holds {len(matrix)} rows, not {rows}")
    if not np.isfinite(matrix).all():
        raise VectorDecodeError("vector components must be finite float32 values")
    return matrix.astype(np.float32, copy=False)
