"""Reciprocal rank fusion, the hybrid search's ranking (crossmodal.fusion)."""

from __future__ import annotations

import pytest

from services.gateway.fusion import Ranked, fuse_hits, reciprocal_rank_fusion


def test_scores_are_sums_of_reciprocal_ranks() -> None:
    fused = dict(reciprocal_rank_fusion([[1, 2, 3], [3, 1]], k=60))
    assert fused[1] == pytest.approx(1 / 61 + 1 / 62)
    assert fused[2] == pytest.approx(1 / 62)
    assert fused[3] == pytest.approx(1 / 63 + 1 / 61)


def test_agreement_beats_one_strong_ranking() -> None:
    vector = [10, 11, 12, 13]
    keyword = [13, 20, 21]
    # 13 is last by vectors but first by keywords: ranked by both, it wins over 10 (one list).
    assert [item for item, _ in reciprocal_rank_fusion([vector, keyword])][:2] == [13, 10]


def test_ties_prefer_the_better_single_rank_then_the_first_ranking() -> None:
    # 1 and 2 both sum 1/61 + 1/62; 3 and 4 are first and second in one list each.
    assert [i for i, _ in reciprocal_rank_fusion([[1, 2], [2, 1]])] == [1, 2]
    assert [i for i, _ in reciprocal_rank_fusion([["a"], ["b"]])] == ["a", "b"]


def test_weights_limit_and_repeats() -> None:
    fused = reciprocal_rank_fusion([[1, 1, 2], [2]], weights=[1.0, 3.0], limit=1)
    assert fused == [(2, pytest.approx(1 / 62 + 3 / 61))]
    with pytest.raises(ValueError, match="weights"):
        reciprocal_rank_fusion([[1]], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="k"):
        reciprocal_rank_fusion([[1]], k=-1)
    assert reciprocal_rank_fusion([]) == []


def test_fuse_hits_keeps_the_gateway_shape() -> None:
    vector_hits = [Ranked(7, 0.9), Ranked(8, 0.8)]
    keyword_hits = [Ranked(9, 12.0), Ranked(8, 3.0)]
    fused = fuse_hits(vector_hits, keyword_hits, top_k=2)
    assert [hit.id for hit in fused] == [8, 7]
    assert fused[0].score == pytest.approx(1 / 62 + 1 / 62)
