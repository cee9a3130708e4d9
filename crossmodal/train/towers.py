"""The two towers of a CLIP-style model as the trainer sees them: features with gradients,
optional freezing (LiT), and a cache for a frozen text tower.

Freezing a tower freezes its encoder and keeps it in eval mode (no dropout), as LiT does; the
projection heads and ``logit_scale`` always train, so a frozen pretrained tower can still be
aligned with the other. A frozen text encoder in eval mode is a fixed function of the caption,
so its pooled output is computed once per distinct caption and reused, which makes training
against a frozen text tower cost about as much as training the image tower alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from services.feature.model import pooled as projected_features


def freeze(module: torch.nn.Module) -> None:
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    module.eval()


class Towers:
    """Image and text features of ``model`` for training, honouring frozen towers."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        freeze_text: bool = False,
        freeze_vision: bool = False,
        max_text_tokens: int,
        device: str = "cpu",
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.freeze_text = freeze_text
        self.freeze_vision = freeze_vision
        self.max_text_tokens = max_text_tokens
        self.device = device
        self._text_cache: dict[str, torch.Tensor] = {}
        # SigLIP-family models were trained on texts padded to the full length (as the
        # feature service pads them); the others on the longest text of the batch.
        model_type = str(getattr(model.config, "model_type", ""))
        self._padding = "max_length" if model_type.startswith("siglip") else "longest"
        if freeze_text:
            freeze(model.text_model)
        if freeze_vision:
            freeze(model.vision_model)
        # Cache the encoder's pooled output and train the projection on top when the model is
        # built that way (CLIP, VisionTextDualEncoder); otherwise cache the final features.
        self._split_text = freeze_text and isinstance(
            getattr(model, "text_projection", None), torch.nn.Module
        )

    def train(self) -> None:
        """Train mode for what trains; frozen encoders stay in eval mode (no dropout)."""
        self.model.train()
        if self.freeze_text:
            self.model.text_model.eval()
        if self.freeze_vision:
            self.model.vision_model.eval()

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = pixel_values.to(self.device)
        if self.freeze_vision and isinstance(
            getattr(self.model, "visual_projection", None), torch.nn.Module
        ):
            with torch.no_grad():
                pooled = self.model.vision_model(pixel_values=pixel_values).pooler_output
            return self.model.visual_projection(pooled)
        return projected_features(self.model.get_image_features(pixel_values=pixel_values))

    def text_features(self, captions: Sequence[str]) -> torch.Tensor:
        if not self.freeze_text:
            return projected_features(self.model.get_text_features(**self._tokenize(captions)))
        missing = list(dict.fromkeys(c for c in captions if c not in self._text_cache))
        if missing:
            self._fill_cache(missing)
        cached = torch.stack([self._text_cache[c] for c in captions]).to(self.device)
        return self.model.text_projection(cached) if self._split_text else cached

    def bank_features(self, captions: Sequence[str]) -> torch.Tensor:
        """Projected features of many cached captions at once (frozen text encoder only)."""
        if not self.freeze_text:
            raise ValueError("a caption bank needs a frozen text encoder (--freeze-text)")
        return self.text_features(captions)

    def precompute_text(self, captions: Sequence[str], batch_size: int = 256) -> None:
        """Fill the frozen-text cache up front (one pass over every distinct caption)."""
        if not self.freeze_text:
            return
        missing = list(dict.fromkeys(c for c in captions if c not in self._text_cache))
        for start in range(0, len(missing), batch_size):
            self._fill_cache(missing[start : start + batch_size])

    @torch.no_grad()
    def _fill_cache(self, captions: list[str]) -> None:
        batch = self._tokenize(captions)
        if self._split_text:
            outputs = self.model.text_model(**batch).pooler_output
        else:
            outputs = projected_features(self.model.get_text_features(**batch))
        for caption, vector in zip(captions, outputs.float().cpu(), strict=True):
            self._text_cache[caption] = vector

    def _tokenize(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(
            list(captions),
            padding=self._padding,
            truncation=True,
            max_length=self.max_text_tokens,
            return_tensors="pt",
        )
        return {k: v.to(self.device) for k, v in encoded.items()}
