"""The offline demos, no network needed.

- Shapes: a tiny CLIP trained in seconds on synthetic coloured shapes, and its 32-image
  collection (the tests' model). ``python -m crossmodal.demo build-model --out var/demo/model``,
  ``python -m crossmodal.demo write-collection --out var/demo/collection``.
- Emoji: a small image tower trained against the frozen all-MiniLM-L6-v2 text encoder on 1,914
  OpenMoji emoji, shipped as weights in ``models/emoji-demo``.
  ``python -m crossmodal.demo build-emoji-model --out var/demo/emoji-model`` (seconds),
  ``python -m crossmodal.demo write-emoji-collection --out var/demo/emoji``.
"""

from crossmodal.demo.build import (
    DEFAULT_MODEL_DIR,
    ensure_demo_model,
    ensure_random_model,
    is_finished_model,
)
from crossmodal.demo.emoji_model import (
    DEFAULT_EMOJI_COLLECTION_DIR,
    DEFAULT_EMOJI_MODEL_DIR,
    ensure_emoji_model,
)

__all__ = [
    "DEFAULT_EMOJI_COLLECTION_DIR",
    "DEFAULT_EMOJI_MODEL_DIR",
    "DEFAULT_MODEL_DIR",
    "ensure_demo_model",
    "ensure_emoji_model",
    "ensure_random_model",
    "is_finished_model",
]
