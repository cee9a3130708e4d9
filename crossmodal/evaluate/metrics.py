"""Recall@K for image↔text retrieval with several captions per image (the COCO/Flickr protocol).

- image→text: a hit at K when any caption of the image ranks in the top K of all captions;
- text→image: a hit at K when the caption's image ranks in the top K of all images.

Scores are cosine similarities of L2-normalised vectors. Ties count against the model: an
item that scores exactly as high as the positive is ranked ahead of it, so a degenerate model
that maps everything to one vector scores zero instead of looking perfect.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)
# Rows of the similarity matrix scored at once: bounds memory on COCO-sized sets
# (25k captions x 5k images would be 500 MB in one piece).
_CHUNK = 2048


def _check(image_vectors: np.ndarray, text_vectors: np.ndarray, text_image: np.ndarray) -> None:
    if image_vectors.ndim != 2 or text_vectors.ndim != 2:
        raise ValueError("vectors must be 2-D arrays")
    if image_vectors.shape[1] != text_vectors.shape[1]:
        raise ValueError(f"dims differ: {image_vectors.shape[1]} vs {text_vectors.shape[1]}")
    if len(text_image) != len(text_vectors):
        raise ValueError("text_image needs one image index per text")
    if len(text_image) and (text_image.min() < 0 or text_image.max() >= len(image_vectors)):
        raise ValueError("text_image refers to an image that does not exist")


def text_to_image_ranks(
    image_vectors: np.ndarray, text_vectors: np.ndarray, text_image: Sequence[int]
) -> np.ndarray:
    """For each text, how many other images score at least as high as its own (0 = first)."""
    pos_image = np.asarray(text_image, dtype=np.int64)
    _check(image_vectors, text_vectors, pos_image)
    ranks = np.empty(len(text_vectors), dtype=np.int64)
    for start in range(0, len(text_vectors), _CHUNK):
        sims = text_vectors[start : start + _CHUNK] @ image_vectors.T
        rows = np.arange(len(sims))
        positive = sims[rows, pos_image[start : start + _CHUNK]]
        # Minus one: the positive itself always satisfies >=.
        ranks[start : start + _CHUNK] = (sims >= positive[:, None]).sum(axis=1) - 1
    return ranks


def image_to_text_ranks(
    image_vectors: np.ndarray, text_vectors: np.ndarray, text_image: Sequence[int]
) -> np.ndarray:
    """For each image, how many captions of other images score at least as high as its best
    caption (0 = one of its own captions is first). An image without captions gets rank
    ``len(text_vectors)``, a miss at every K."""
    pos_image = np.asarray(text_image, dtype=np.int64)
    _check(image_vectors, text_vectors, pos_image)
    ranks = np.empty(len(image_vectors), dtype=np.int64)
    for start in range(0, len(image_vectors), _CHUNK):
        block = image_vectors[start : start + _CHUNK]
        sims = block @ text_vectors.T  # [images, texts]
        own = pos_image[None, :] == np.arange(start, start + len(block))[:, None]
        best = np.where(own, sims, -np.inf).max(axis=1)
        negatives_ahead = ((sims >= best[:, None]) & ~own).sum(axis=1)
        ranks[start : start + _CHUNK] = np.where(
            own.any(axis=1), negatives_ahead, len(text_vectors)
        )
    return ranks


def recall_at(ranks: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    return {f"R@{k}": float((ranks < k).mean()) if len(ranks) else 0.0 for k in ks}


def retrieval_recall(
    image_vectors: np.ndarray,
    text_vectors: np.ndarray,
    text_image: Sequence[int],
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, dict[str, float]]:
    """``{"image_to_text": {"R@1": …}, "text_to_image": {…}}`` as fractions in [0, 1].
    ``text_image[t]`` is the index (into ``image_vectors``) of the image caption ``t`` describes."""
    return {
        "image_to_text": recall_at(
            image_to_text_ranks(image_vectors, text_vectors, text_image), ks
        ),
        "text_to_image": recall_at(
            text_to_image_ranks(image_vectors, text_vectors, text_image), ks
        ),
    }
