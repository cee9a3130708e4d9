"""How close a runtime's vectors are to float32 PyTorch's, tower by tower.

A lower-precision tower (int8 ONNX weights, bfloat16 autocast) is served only where its vectors
stay within ``PARITY`` (minimum cosine) of float32 for a fixed probe of texts and images, checked
on the machine that serves it: integer and bfloat16 kernels differ between processors (AVX2,
AVX-512 VNNI, AMX, ARM), so a result measured where a model was exported is not taken on trust
elsewhere. A tower that misses the bound runs in float32, and the reason is kept for ``/model``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# Minimum cosine with float32 PyTorch's vector for the same input.
PARITY = 0.999
PROBE_FILE = "parity_probe.npz"
TOWERS = ("text", "image")

_PROBE_TEXTS = ("a red circle", "two dogs playing in the snow, seen from far away", "x")
# Several sizes, so resizing and cropping are part of what is compared.
_PROBE_IMAGE_SIZES = ((240, 320), (300, 200), (64, 64))


@dataclass(frozen=True)
class Probe:
    """Texts and images with float32 vectors for them (``None`` until computed)."""

    texts: list[str]
    images: list[np.ndarray]
    text_vectors: np.ndarray | None = None
    image_vectors: np.ndarray | None = None

    @classmethod
    def inputs(cls) -> Probe:
        rng = np.random.default_rng(0)
        images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in _PROBE_IMAGE_SIZES]
        return cls(list(_PROBE_TEXTS), images)

    def pil_images(self) -> list[Image.Image]:
        return [Image.fromarray(image) for image in self.images]

    def save(self, path: Path) -> None:
        np.savez(
            path,
            texts=np.array(self.texts),
            text_vectors=self.text_vectors,
            image_vectors=self.image_vectors,
            **{f"image_{i}": image for i, image in enumerate(self.images)},
        )

    @classmethod
    def load(cls, path: Path) -> Probe:
        """Raises ``OSError``, ``ValueError`` or ``KeyError`` for a missing or damaged file."""
        with np.load(path) as saved:
            data = {key: saved[key] for key in saved.files}
        count = len(data["image_vectors"])
        return cls(
            texts=[str(t) for t in data["texts"]],
            images=[data[f"image_{i}"] for i in range(count)],
            text_vectors=data["text_vectors"],
            image_vectors=data["image_vectors"],
        )

    def vectors(self, tower: str) -> np.ndarray:
        vectors = self.text_vectors if tower == "text" else self.image_vectors
        if vectors is None:
            raise ValueError("the probe has no reference vectors")
        return vectors


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest row-wise cosine of two stacks of unit vectors."""
    return float(np.min(np.sum(a * b, axis=1)))


def fallback_reason(precision: str, cosine: float) -> str:
    """Why a tower runs in float32: what ``/model`` and the log say."""
    return (
        f"{precision} vectors reach cosine {cosine:.4f} against float32 on this processor, "
        f"below the bound {PARITY}"
    )
