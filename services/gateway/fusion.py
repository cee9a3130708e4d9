"""Reciprocal rank fusion (Cormack, Clarke and Büttcher, SIGIR 2009): one ranking out of several.

Each ranking gives a document ``weight / (k + rank)`` (ranks from 1); a document's fused score is
the sum over the rankings it appears in. Only ranks matter, so a keyword ranking (BM25 scores) and
a vector ranking (cosine similarities) fuse without calibrating their scores against each other;
``k`` (60 in the paper) damps the influence of the very first places.

Pure functions: the gateway fuses the vector and keyword rankings of ``/search/text`` with
``mode="hybrid"``.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

DEFAULT_K = 60

Id = TypeVar("Id", bound=Hashable)


def reciprocal_rank_fusion(
    rankings: Sequence[Sequence[Id]],
    *,
    k: int = DEFAULT_K,
    weights: Sequence[float] | None = None,
    limit: int | None = None,
) -> list[tuple[Id, float]]:
    """``(id, fused score)`` best first. A repeated id counts once, at its first place in a
    ranking. Ties go to the id with the better single rank, then to the earlier ranking."""
    if k < 0:
        raise ValueError("k must be non-negative")
    if weights is None:
        weights = [1.0] * len(rankings)
    if len(weights) != len(rankings):
        raise ValueError(f"{len(rankings)} rankings but {len(weights)} weights")
    scores: dict[Id, float] = {}
    best_rank: dict[Id, tuple[int, int]] = {}
    for which, (ranking, weight) in enumerate(zip(rankings, weights, strict=True)):
        # Repeats are dropped before ranking: ranks are places among distinct ids.
        for rank, item in enumerate(dict.fromkeys(ranking), start=1):
            scores[item] = scores.get(item, 0.0) + weight / (k + rank)
            best_rank[item] = min(best_rank.get(item, (rank, which)), (rank, which))
    fused = sorted(scores.items(), key=lambda pair: (-pair[1], best_rank[pair[0]]))
    return fused if limit is None else fused[:limit]


@dataclass(frozen=True)
class Ranked:
    """One ranked id before hydration: an item id, or a caption id for target=text."""

    id: int
    score: float


def fuse_hits(
    vector_hits: Iterable[Ranked],
    keyword_hits: Iterable[Ranked],
    *,
    top_k: int,
    k: int = DEFAULT_K,
    weights: tuple[float, float] = (1.0, 1.0),
) -> list[Ranked]:
    """A vector ranking and a keyword ranking, each best first, fused into at most ``top_k``
    ids scored by their fused score: the shape the gateway hydrates into search results."""
    rankings = [[hit.id for hit in vector_hits], [hit.id for hit in keyword_hits]]
    fused = reciprocal_rank_fusion(rankings, k=k, weights=weights, limit=top_k)
    return [Ranked(item, score) for item, score in fused]
