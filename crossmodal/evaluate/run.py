"""Embed an image–caption dataset with a model and measure recall@K.

Embedding goes through the feature service's own ``TransformersEmbedder`` (the same tokenizer
settings, truncation, image processor and normalisation as in production), so the figures are
those of the served model, not of a reimplementation.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image
from tqdm import tqdm

from crossmodal.data.images import SkippedImages, try_read_image
from crossmodal.data.records import ImageRecord
from crossmodal.evaluate.metrics import DEFAULT_KS, retrieval_recall


class SupportsEmbedding(Protocol):
    model_id: str

    def embed_texts(self, texts: Sequence[str]) -> Any: ...

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray: ...


@dataclass(frozen=True)
class Embedded:
    image_vectors: np.ndarray  # [images, dim]
    text_vectors: np.ndarray  # [texts, dim]
    text_image: np.ndarray  # [texts] index of each text's image
    records: list[ImageRecord]  # the records kept, in the order of image_vectors


@dataclass
class EvalResult:
    model_id: str
    data: str
    images: int
    texts: int
    skipped_images: int
    recall: dict[str, dict[str, float]]
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """Recall in percent, one row per direction, one column per K."""
        ks = list(next(iter(self.recall.values())).keys())
        lines = [
            f"{self.model_id} on {self.data}: {self.images} images, {self.texts} captions"
            + (
                f", {self.skipped_images} images skipped (undecodable)"
                if self.skipped_images
                else ""
            ),
            f"{'recall (%)':<14}" + "".join(f"{k:>8}" for k in ks),
        ]
        for direction, label in (("image_to_text", "image→text"), ("text_to_image", "text→image")):
            row = self.recall[direction]
            lines.append(f"{label:<14}" + "".join(f"{100 * row[k]:>8.1f}" for k in ks))
        return "\n".join(lines)


def embed_records(
    embedder: SupportsEmbedding,
    records: Sequence[ImageRecord],
    *,
    batch_size: int = 64,
    skipped: SkippedImages | None = None,
    progress: bool = False,
) -> Embedded:
    """Embed every decodable image and every caption of those images. Undecodable images are
    left out together with their captions, and recorded in ``skipped``."""
    image_chunks: list[np.ndarray] = []
    kept: list[ImageRecord] = []
    bar = tqdm(total=len(records), desc="images", unit="img", disable=not progress)
    for start in range(0, len(records), batch_size):
        batch, batch_records = [], []
        for record in records[start : start + batch_size]:
            image = try_read_image(record.path, skipped)
            if image is not None:
                batch.append(image)
                batch_records.append(record)
        if batch:
            image_chunks.append(np.asarray(embedder.embed_images(batch), dtype=np.float32))
            kept.extend(batch_records)
        bar.update(min(batch_size, len(records) - start))
    bar.close()
    texts = [caption for record in kept for caption in record.captions]
    text_image = np.array(
        [i for i, record in enumerate(kept) for _ in record.captions], dtype=np.int64
    )
    text_chunks = []
    for start in tqdm(
        range(0, len(texts), batch_size), desc="captions", unit="batch", disable=not progress
    ):
        text_chunks.append(_vectors(embedder.embed_texts(texts[start : start + batch_size])))
    dim = image_chunks[0].shape[1] if image_chunks else 0
    return Embedded(
        image_vectors=np.concatenate(image_chunks) if image_chunks else np.zeros((0, dim)),
        text_vectors=np.concatenate(text_chunks) if text_chunks else np.zeros((0, dim)),
        text_image=text_image,
        records=kept,
    )


def _vectors(output: Any) -> np.ndarray:
    # TransformersEmbedder returns TextEmbeddings(vectors, truncated); a plain array is fine too.
    return np.asarray(getattr(output, "vectors", output), dtype=np.float32)


def evaluate_embedder(
    embedder: SupportsEmbedding,
    records: Sequence[ImageRecord],
    *,
    data_name: str = "",
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = 64,
    progress: bool = False,
) -> EvalResult:
    started = time.perf_counter()
    skipped = SkippedImages()
    embedded = embed_records(
        embedder, records, batch_size=batch_size, skipped=skipped, progress=progress
    )
    if not embedded.records:
        raise ValueError("no decodable image in the dataset: nothing to evaluate")
    recall = retrieval_recall(
        embedded.image_vectors, embedded.text_vectors, embedded.text_image, ks
    )
    return EvalResult(
        model_id=embedder.model_id,
        data=data_name,
        images=len(embedded.records),
        texts=len(embedded.text_vectors),
        skipped_images=len(skipped),
        recall=recall,
        seconds=round(time.perf_counter() - started, 2),
    )


def write_result(result: EvalResult, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result.to_json(), indent=2, ensure_ascii=False) + "\n")
    return out
