"""Synthetic vectors shaped like CLIP embeddings, for scale builds and benchmarks.

CLIP embeddings are L2-normalised, share a common mean direction (two random images have a
cosine of ~0.4), form clusters of very different sizes, and vary within a cluster along a few
dozen directions far more than along the rest. This generator reproduces those traits:

- a common direction ``mu`` mixed into every cluster centre;
- ``clusters`` centres drawn with Zipf-like sizes;
- per point, a low-rank offset (``rank`` global directions with a decaying spectrum) plus a
  weaker isotropic one, scaled per cluster, then normalisation.

Rows are generated in blocks of ``BLOCK`` from per-block seeds, so any range of rows can be made
on its own (resumable builds) and the same arguments always give the same vectors.
"""

from __future__ import annotations

import numpy as np

BLOCK = 1 << 13


class ClipLike:
    def __init__(self, dim: int, *, seed: int = 0, clusters: int | None = None, rank: int = 64):
        self.dim = dim
        self.seed = seed
        rng = np.random.default_rng([seed, 0])
        self.clusters = clusters or 1024
        mu = _normalise(rng.standard_normal(dim))
        raw = _normalise(rng.standard_normal((self.clusters, dim)))
        self.centres = _normalise(1.0 * mu + raw).astype(np.float32)
        weights = 1.0 / np.arange(1, self.clusters + 1) ** 0.7
        self.weights = weights / weights.sum()
        self.spread = rng.uniform(0.5, 1.1, self.clusters).astype(np.float32)
        r = min(rank, dim)
        basis, _ = np.linalg.qr(rng.standard_normal((dim, r)))
        spectrum = 1.0 / np.sqrt(np.arange(1, r + 1))
        self.basis = (basis * spectrum).T.astype(np.float32)  # (r, dim)
        self.rank = r

    def rows(self, start: int, stop: int, *, stream: int = 1) -> np.ndarray:
        """Rows ``start:stop`` of stream ``stream`` (use different streams for base vectors and
        queries, so queries are held out)."""
        out = np.empty((max(0, stop - start), self.dim), dtype=np.float32)
        first, last = start // BLOCK, (stop - 1) // BLOCK if stop > start else start // BLOCK - 1
        for block in range(first, last + 1):
            rows = self._block(block, stream)
            lo = max(start, block * BLOCK)
            hi = min(stop, (block + 1) * BLOCK)
            out[lo - start : hi - start] = rows[lo - block * BLOCK : hi - block * BLOCK]
        return out

    def _block(self, block: int, stream: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, stream, block])
        labels = rng.choice(self.clusters, BLOCK, p=self.weights)
        low = rng.standard_normal((BLOCK, self.rank), dtype=np.float32) @ self.basis
        low /= np.linalg.norm(low, axis=1, keepdims=True)
        iso = rng.standard_normal((BLOCK, self.dim), dtype=np.float32)
        iso /= np.linalg.norm(iso, axis=1, keepdims=True)
        offset = 0.85 * low + 0.5 * iso
        x = self.centres[labels] + self.spread[labels, None] * offset
        return _normalise(x).astype(np.float32)


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)
