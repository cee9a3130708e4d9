"""Recall@K of crossmodal.evaluate against an independent implementation of the same protocol.

``clip_benchmark_recall`` below follows the formulation of LAION's CLIP_benchmark
(``clip_benchmark/metrics/zeroshot_retrieval.py``): top-k indices over the text×image score
matrix, a boolean positive-pair mask, and a hit when any positive is among the top k. It is
written here from that description, in torch, and shares no code with the numpy rank-based
implementation under test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crossmodal.evaluate.metrics import (
    image_to_text_ranks,
    recall_at,
    retrieval_recall,
    text_to_image_ranks,
)


def clip_benchmark_recall(
    images: np.ndarray, texts: np.ndarray, text_image: list[int], k: int
) -> tuple[float, float]:
    """(image→text, text→image) recall@k, CLIP_benchmark style."""
    scores = torch.from_numpy(texts) @ torch.from_numpy(images).T  # [texts, images]
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), torch.tensor(text_image)] = True

    def any_positive_in_topk(s: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        top = torch.topk(s, k, dim=1).indices
        hits = torch.gather(pos, 1, top)
        return hits.any(dim=1).float()

    text_retrieval = any_positive_in_topk(scores.T, positive.T).mean().item()  # image→text
    image_retrieval = any_positive_in_topk(scores, positive).mean().item()  # text→image
    return text_retrieval, image_retrieval


def _fixture(seed: int, n_images: int = 60, dim: int = 16) -> tuple[np.ndarray, np.ndarray, list]:
    """Embeddings with some signal (captions near their image) and 1–5 captions per image, so
    recall sits between 0 and 1 and the several-captions rule matters."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n_images, dim))
    text_image = [i for i in range(n_images) for _ in range(rng.integers(1, 6))]
    texts = images[text_image] + rng.normal(scale=1.6, size=(len(text_image), dim))
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    return images.astype(np.float32), texts.astype(np.float32), text_image


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_an_independent_clip_benchmark_style_implementation(seed: int) -> None:
    images, texts, text_image = _fixture(seed)
    ours = retrieval_recall(images, texts, text_image, ks=(1, 5, 10))
    values = []
    for k in (1, 5, 10):
        i2t, t2i = clip_benchmark_recall(images, texts, text_image, k)
        assert ours["image_to_text"][f"R@{k}"] == pytest.approx(i2t, abs=1e-6)
        assert ours["text_to_image"][f"R@{k}"] == pytest.approx(t2i, abs=1e-6)
        values += [i2t, t2i]
    # Tolerance: torch averages in float32; one hit is worth 1/60 or less.
    # The fixture is a real test of agreement: neither trivial nor perfect.
    assert min(values) > 0.05 and max(values) < 0.999


def test_hand_computed_case() -> None:
    # Two images; image 0 has captions 0 and 1, image 1 has caption 2.
    images = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    texts = np.array([[0.6, 0.8], [1.0, 0.0], [0.8, 0.6]], dtype=np.float32)
    text_image = [0, 0, 1]
    # text 0 prefers image 1 (0.8 > 0.6): rank 1; text 1: rank 0; text 2 prefers image 0: rank 1.
    assert text_to_image_ranks(images, texts, text_image).tolist() == [1, 0, 1]
    # image 0's best caption is text 1 (1.0), first; image 1's own caption (0.6) trails text 0
    # (0.8), a caption of image 0: rank 1.
    assert image_to_text_ranks(images, texts, text_image).tolist() == [0, 1]
    result = retrieval_recall(images, texts, text_image, ks=(1, 2))
    assert result["text_to_image"] == {"R@1": pytest.approx(1 / 3), "R@2": 1.0}
    assert result["image_to_text"] == {"R@1": 0.5, "R@2": 1.0}


def test_ties_count_against_the_model() -> None:
    # A collapsed model (every vector equal) must not look perfect.
    images = np.ones((20, 4), dtype=np.float32) / 2
    texts = np.ones((20, 4), dtype=np.float32) / 2
    result = retrieval_recall(images, texts, list(range(20)), ks=(1, 10))
    assert result["text_to_image"] == {"R@1": 0.0, "R@10": 0.0}
    assert result["image_to_text"] == {"R@1": 0.0, "R@10": 0.0}


def test_image_without_captions_is_a_miss() -> None:
    images = np.eye(3, dtype=np.float32)
    texts = np.eye(3, dtype=np.float32)[:2]
    ranks = image_to_text_ranks(images, texts, [0, 1])
    assert ranks.tolist() == [0, 0, 2]
    assert recall_at(ranks, (1,)) == {"R@1": pytest.approx(2 / 3)}


def test_chunking_does_not_change_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    import crossmodal.evaluate.metrics as metrics

    images, texts, text_image = _fixture(3, n_images=50)
    whole = retrieval_recall(images, texts, text_image)
    monkeypatch.setattr(metrics, "_CHUNK", 7)
    assert retrieval_recall(images, texts, text_image) == whole


def test_rejects_inconsistent_inputs() -> None:
    images = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="one image index per text"):
        retrieval_recall(images, images, [0, 1])
    with pytest.raises(ValueError, match="does not exist"):
        retrieval_recall(images, images, [0, 1, 3])
    with pytest.raises(ValueError, match="dims differ"):
        retrieval_recall(images, np.eye(3, 4, dtype=np.float32), [0, 1, 2])
