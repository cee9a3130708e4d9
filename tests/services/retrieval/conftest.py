"""Fixtures shared by the retrieval service tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import faiss
import numpy as np
import pytest

MakeVectors = Callable[[int, int], np.ndarray]


@pytest.fixture(autouse=True, scope="session")
def _single_faiss_thread() -> Iterator[None]:
    # Deterministic HNSW builds, and no oversubscription of the shared test machine.
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(previous)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def unit_vectors(rng: np.random.Generator) -> MakeVectors:
    """Random L2-normalised float32 vectors, like the feature service's."""

    def make(n: int, dim: int) -> np.ndarray:
        x = rng.standard_normal((n, dim)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return make
