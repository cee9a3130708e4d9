"""Contrastive training of the tiny CLIP on the synthetic shapes, in seconds on two CPU cores.

Symmetric InfoNCE over a batch holding every concept exactly once (so there are no false
negatives), scaled by the model's own learnable ``logit_scale`` as CLIP does. After training the
model is checked on the canonical demo collection and a model that does not align is refused.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import CLIPModel, PreTrainedTokenizerBase

from crossmodal.demo.model import MAX_TEXT_TOKENS, image_processor, new_model
from crossmodal.demo.shapes import TEMPLATES, concepts, demo_collection, training_samples
from crossmodal.demo.tokenizer import build_clip_tokenizer
from services.feature.model import pooled

log = logging.getLogger(__name__)

MIN_TEXT_TO_IMAGE_TOP1 = 0.9


class TrainingFailed(RuntimeError):
    """The trained model does not align text and images well enough to be used."""


@dataclass(frozen=True)
class TrainResult:
    model: CLIPModel
    tokenizer: PreTrainedTokenizerBase
    text_to_image_top1: float
    image_to_text_top1: float
    steps: int
    seconds: float

    def info(self) -> dict[str, object]:
        return {
            "kind": "trained",
            "text_to_image_top1": round(self.text_to_image_top1, 4),
            "image_to_text_top1": round(self.image_to_text_top1, 4),
            "steps": self.steps,
            "train_seconds": round(self.seconds, 2),
        }


def _pixel_bank(rounds: int, seed: int, size: int) -> torch.Tensor:
    """``rounds`` batches of jittered images, one per concept each, already preprocessed by the
    same image processor the saved model ships, so training sees what inference will see."""
    processor = image_processor(size)
    samples = training_samples(seed)
    n = len(concepts())
    bank = torch.empty(rounds, n, 3, size, size)
    for r in range(rounds):
        images = [None] * n
        for _ in range(n):
            index, image = next(samples)
            images[index] = image
        bank[r] = processor(images=images, return_tensors="pt")["pixel_values"]
    return bank


def _caption_bank(tokenizer: PreTrainedTokenizerBase) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and masks for every (concept, template): shape [concepts, templates, length]."""
    texts = [t.format(colour=c, shape=s) for c, s in concepts() for t in TEMPLATES]
    encoded = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    shape = (len(concepts()), len(TEMPLATES), -1)
    return encoded["input_ids"].view(shape), encoded["attention_mask"].view(shape)


@contextmanager
def _compact_token_embedding(model: CLIPModel, ids: torch.Tensor) -> Iterator[torch.Tensor]:
    """Train only the embedding rows the captions use. The full 49408-row table would make
    every optimiser step update ~3M parameters, by far the slowest part of a step on a CPU.
    Yields ``ids`` remapped into the compact table; the rows are written back on exit."""
    text = model.text_model
    full = text.embeddings.token_embedding
    used = torch.unique(ids)
    remap = torch.full((full.num_embeddings,), -1, dtype=torch.long)
    remap[used] = torch.arange(len(used))
    compact = torch.nn.Embedding(len(used), full.embedding_dim)
    with torch.no_grad():
        compact.weight.copy_(full.weight[used])
    eos_token_id = text.eos_token_id
    text.embeddings.token_embedding = compact
    # Pooling looks for the end-of-text id in input_ids, so it must follow the remapping.
    text.eos_token_id = int(remap[eos_token_id])
    try:
        yield remap[ids]
    finally:
        with torch.no_grad():
            full.weight[used] = compact.weight
        text.embeddings.token_embedding = full
        text.eos_token_id = eos_token_id


@torch.inference_mode()
def evaluate(model: CLIPModel, tokenizer: PreTrainedTokenizerBase) -> tuple[float, float]:
    """Top-1 accuracy of text→image and image→text retrieval over the canonical collection."""
    model.eval()
    items = demo_collection()
    size = model.config.vision_config.image_size
    pixels = image_processor(size)(images=[i.image for i in items], return_tensors="pt")
    text = tokenizer([i.caption for i in items], padding=True, truncation=True, return_tensors="pt")
    image_vectors = F.normalize(pooled(model.get_image_features(**pixels)), dim=-1)
    text_vectors = F.normalize(pooled(model.get_text_features(**text)), dim=-1)
    similarity = text_vectors @ image_vectors.T
    target = torch.arange(len(items))
    t2i = (similarity.argmax(dim=1) == target).float().mean().item()
    i2t = (similarity.argmax(dim=0) == target).float().mean().item()
    return t2i, i2t


def train(
    *,
    seed: int = 0,
    steps: int = 500,
    rounds: int = 48,
    lr: float = 3e-3,
    threads: int = 2,
    min_text_to_image_top1: float = MIN_TEXT_TO_IMAGE_TOP1,
) -> TrainResult:
    """Train a fresh tiny CLIP and check it. Raises ``TrainingFailed`` when text→image top-1 on
    the canonical collection stays below ``min_text_to_image_top1``."""
    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        rng = random.Random(seed)
        tokenizer = build_clip_tokenizer(MAX_TEXT_TOKENS)
        model = new_model(seed)
        size = model.config.vision_config.image_size
        pixel_bank = _pixel_bank(rounds, seed, size)
        ids_bank, mask_bank = _caption_bank(tokenizer)
        n = len(concepts())
        target = torch.arange(n)
        with _compact_token_embedding(model, ids_bank) as compact_ids:
            optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
            warmup = max(1, steps // 10)
            schedule = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 1 - s / steps)
            )
            model.train()
            for step in range(steps):
                templates = torch.tensor([rng.randrange(len(TEMPLATES)) for _ in range(n)])
                out = model(
                    input_ids=compact_ids[target, templates],
                    attention_mask=mask_bank[target, templates],
                    pixel_values=pixel_bank[step % rounds],
                )
                # The logits already carry exp(logit_scale): no extra temperature here.
                loss = (
                    F.cross_entropy(out.logits_per_text, target)
                    + F.cross_entropy(out.logits_per_image, target)
                ) / 2
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                with torch.no_grad():  # CLIP caps the scale at 100 to keep training stable
                    model.logit_scale.clamp_(0, 4.6052)
                if step % 100 == 0 or step == steps - 1:
                    log.info("step %d loss %.4f", step, loss.item())
        model.eval()
        t2i, i2t = evaluate(model, tokenizer)
    finally:
        torch.set_num_threads(previous_threads)
    seconds = time.perf_counter() - started
    result = TrainResult(model, tokenizer, t2i, i2t, steps, seconds)
    log.info("trained in %.1fs: text→image %.3f, image→text %.3f", seconds, t2i, i2t)
    if t2i < min_text_to_image_top1:
        raise TrainingFailed(
            f"text→image top-1 is {t2i:.3f} (< {min_text_to_image_top1}) after {steps} steps"
        )
    return result
