"""The model behind the feature service: any transformers checkpoint with ``get_text_features``
and ``get_image_features`` (CLIP and its relatives), loaded through the Auto classes.

Vectors come out float32 and L2-normalised whatever the compute dtype (fp16 on CUDA, fp32 on
CPU). Texts longer than the model's context are truncated, and reported as such.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

log = logging.getLogger(__name__)

# A real text tokenizer has thousands of tokens; a handful means transformers quietly built an
# empty one (a folder without tokenizer files), which would embed every text the same.
MIN_VOCAB_SIZE = 1000
# Longer inputs are cut before tokenising, so a megabyte of text costs no more than a page.
# No real token spans this many characters (only runs of whitespace could, and they collapse).
_MAX_CHARS_PER_TOKEN = 64


class ModelLoadError(RuntimeError):
    """The model, its tokenizer or its image processor could not be loaded or is unusable."""


@dataclass(frozen=True)
class TextEmbeddings:
    vectors: np.ndarray  # [n, dim] float32, unit norm
    truncated: list[bool]


class Embedder(Protocol):
    """What the HTTP layer needs from a model; tests may substitute a fake."""

    model_id: str
    dim: int
    image_size: int
    max_text_tokens: int
    device: str
    dtype: str

    def embed_texts(self, texts: Sequence[str]) -> TextEmbeddings: ...

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray: ...


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was requested but CUDA is not available")
    return device


def _pooled(output: Any) -> torch.Tensor:
    # transformers 5 returns an output object whose pooler_output holds the projected
    # features; older versions (and some models) return the tensor itself.
    if isinstance(output, torch.Tensor):
        return output
    for name in ("pooler_output", "text_embeds", "image_embeds"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"cannot find features in a {type(output).__name__}")


def _normalised(features: torch.Tensor) -> np.ndarray:
    return F.normalize(features.float(), dim=-1).cpu().numpy().astype(np.float32, copy=False)


class TransformersEmbedder:
    """A loaded model, tokenizer and image processor. Thread-safe: one forward pass at a time
    (torch already spreads each pass over ``torch_threads`` cores)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        image_processor: Any,
        *,
        model_id: str,
        device: str,
        batch_size: int = 64,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.model_id = model_id
        self.device = device
        self.batch_size = batch_size
        self._torch_dtype: torch.dtype = next(model.parameters()).dtype
        self.dtype = str(self._torch_dtype).removeprefix("torch.")
        self.max_text_tokens = _max_text_tokens(model.config, tokenizer)
        self.image_size = _image_size(model.config, image_processor)
        # SigLIP-family models were trained on texts padded to the full length.
        model_type = str(getattr(model.config, "model_type", ""))
        self._text_padding = "max_length" if model_type.startswith("siglip") else "longest"
        self._lock = threading.Lock()
        self.dim = 0
        self.ready = False

    @classmethod
    def load(
        cls,
        name: str,
        *,
        model_id: str | None = None,
        device: str = "auto",
        torch_threads: int | None = None,
        batch_size: int = 64,
    ) -> TransformersEmbedder:
        """Load ``name`` (hub id or local folder) and warm it up. Blocking: call it from a
        thread in async code."""
        started = time.perf_counter()
        if torch_threads:
            torch.set_num_threads(torch_threads)
        device = resolve_device(device)
        dtype = torch.float16 if device == "cuda" else torch.float32
        hf_logging.disable_progress_bar()
        try:
            model = AutoModel.from_pretrained(name, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(name)
            image_processor = AutoImageProcessor.from_pretrained(name)
        except (OSError, ValueError) as exc:
            hint = ""
            if not Path(name).exists() and name.startswith(("var/", "./", "/")):
                hint = (
                    f" (build the demo model: python -m crossmodal.demo build-model --out {name})"
                )
            raise ModelLoadError(f"cannot load model {name!r}: {exc}{hint}") from exc
        for method in ("get_text_features", "get_image_features"):
            if not callable(getattr(model, method, None)):
                raise ModelLoadError(
                    f"{type(model).__name__} has no {method}: not a CLIP-like model"
                )
        if len(tokenizer) < MIN_VOCAB_SIZE:
            raise ModelLoadError(
                f"the tokenizer of {name!r} has only {len(tokenizer)} tokens: its files are missing"
            )
        model.eval().to(device)
        embedder = cls(
            model,
            tokenizer,
            image_processor,
            model_id=model_id or default_model_id(name),
            device=device,
            batch_size=batch_size,
        )
        embedder.warm_up()
        log.info(
            "loaded %s on %s (%s, dim %d) in %.1fs",
            embedder.model_id,
            device,
            embedder.dtype,
            embedder.dim,
            time.perf_counter() - started,
        )
        return embedder

    def warm_up(self) -> None:
        """One pass per modality: allocates buffers, fixes ``dim`` and proves the model works
        before the service reports ready."""
        text_dim = self.embed_texts(["warm-up"]).vectors.shape[1]
        blank = Image.new("RGB", (self.image_size, self.image_size), (255, 255, 255))
        image_dim = self.embed_images([blank]).shape[1]
        if text_dim != image_dim:
            raise ModelLoadError(f"text ({text_dim}) and image ({image_dim}) dims differ")
        self.dim = int(text_dim)
        self.ready = True

    def embed_texts(self, texts: Sequence[str]) -> TextEmbeddings:
        max_chars = self.max_text_tokens * _MAX_CHARS_PER_TOKEN
        clipped = [t[:max_chars] for t in texts]
        chunks = []
        # The tokenizer is inside the lock too: a fast tokenizer used from two threads at once
        # fails ("Already borrowed") as each call resets its truncation and padding state.
        with self._lock, torch.inference_mode():
            # Count tokens untruncated first: the only reliable truncation signal.
            encoded = self.tokenizer(clipped, truncation=False, verbose=False)["input_ids"]
            truncated = [
                len(text) > max_chars or len(ids) > self.max_text_tokens
                for text, ids in zip(texts, encoded, strict=True)
            ]
            for start in range(0, len(clipped), self.batch_size):
                batch = self.tokenizer(
                    clipped[start : start + self.batch_size],
                    padding=self._text_padding,
                    truncation=True,
                    max_length=self.max_text_tokens,
                    return_tensors="pt",
                ).to(self.device)
                chunks.append(_normalised(_pooled(self.model.get_text_features(**batch))))
        return TextEmbeddings(np.concatenate(chunks), truncated)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        chunks = []
        with self._lock, torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                pixels = self.image_processor(
                    images=list(images[start : start + self.batch_size]), return_tensors="pt"
                )["pixel_values"].to(self.device, self._torch_dtype)
                chunks.append(
                    _normalised(_pooled(self.model.get_image_features(pixel_values=pixels)))
                )
        return np.concatenate(chunks)

    def info(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "dim": self.dim,
            "image_size": self.image_size,
            "max_text_tokens": self.max_text_tokens,
            "device": self.device,
            "dtype": self.dtype,
        }


def _max_text_tokens(config: Any, tokenizer: Any) -> int:
    # The position table is the hard limit; a tokenizer without model_max_length reports a
    # huge sentinel value, so it only counts when it is smaller.
    candidates = []
    text_config = getattr(config, "text_config", None)
    positions = getattr(text_config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        candidates.append(positions)
    tokenizer_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_max, int) and 0 < tokenizer_max < 100_000:
        candidates.append(tokenizer_max)
    if not candidates:
        raise ModelLoadError("cannot tell the model's maximum text length")
    return min(candidates)


def _image_size(config: Any, image_processor: Any) -> int:
    size = getattr(getattr(config, "vision_config", None), "image_size", None)
    if isinstance(size, (list, tuple)):
        size = size[0]
    if isinstance(size, int) and size > 0:
        return size
    crop = getattr(image_processor, "crop_size", None) or {}
    return int(crop.get("height", 224))


def default_model_id(name: str) -> str:
    """A hub name stands for itself. A local folder is named by its weights' content, not its
    path: the same checkpoint mounted elsewhere keeps its id, and retrained weights get a new one,
    so vectors of two trainings are never mixed."""
    folder = Path(name)
    if not folder.is_dir():
        return name
    digest = hashlib.sha256()
    weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    for path in weights or [folder / "config.json"]:
        digest.update(path.name.encode())
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return f"{folder.resolve().name}@{digest.hexdigest()[:12]}"
