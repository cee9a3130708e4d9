"""Recall@K evaluation of image↔text retrieval on COCO-format data (several captions per image).

``python -m crossmodal.evaluate --model DIR_OR_HUB_NAME --data captions.json --images DIR``
prints a table and writes JSON. See docs/evaluation.md.
"""

from crossmodal.evaluate.metrics import (
    DEFAULT_KS,
    image_to_text_ranks,
    recall_at,
    retrieval_recall,
    text_to_image_ranks,
)
from crossmodal.evaluate.run import EvalResult, embed_records, evaluate_embedder, write_result

__all__ = [
    "DEFAULT_KS",
    "EvalResult",
    "embed_records",
    "evaluate_embedder",
    "image_to_text_ranks",
    "recall_at",
    "retrieval_recall",
    "text_to_image_ranks",
    "write_result",
]
