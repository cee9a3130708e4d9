"""The offline demo: a tiny CLIP trained in seconds on synthetic coloured shapes, and the demo
collection it is meant to search. Used by the tests and by ``make run``; no network needed.

``python -m crossmodal.demo build-model --out var/demo/model`` and
``python -m crossmodal.demo write-collection --out var/demo/collection``.
"""

from crossmodal.demo.build import (
    DEFAULT_MODEL_DIR,
    ensure_demo_model,
    ensure_random_model,
    is_finished_model,
)

__all__ = ["DEFAULT_MODEL_DIR", "ensure_demo_model", "ensure_random_model", "is_finished_model"]
