"""Models to evaluate: whatever the feature service loads, or a random-weights twin of one."""

from __future__ import annotations

from typing import Any

import torch

from services.feature.model import TransformersEmbedder, resolve_device


def load_embedder(
    name: str,
    *,
    device: str = "auto",
    threads: int | None = None,
    batch_size: int = 64,
    random_weights: bool = False,
    seed: int = 0,
) -> TransformersEmbedder:
    """The model ``name`` as the feature service loads it. With ``random_weights`` the same
    architecture, tokenizer and image processor, every weight freshly initialised: the baseline
    that shows what training added (chance level for the dataset's size)."""
    if not random_weights:
        return TransformersEmbedder.load(
            name, device=device, torch_threads=threads, batch_size=batch_size
        )
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(device)
    torch.manual_seed(seed)
    model: Any = AutoModel.from_config(AutoConfig.from_pretrained(name))
    return wrap_model(
        model,
        AutoTokenizer.from_pretrained(name),
        AutoImageProcessor.from_pretrained(name),
        model_id=f"random-weights({name}, seed={seed})",
        device=device,
        batch_size=batch_size,
    )


def wrap_model(
    model: Any,
    tokenizer: Any,
    image_processor: Any,
    *,
    model_id: str,
    device: str = "cpu",
    batch_size: int = 64,
) -> TransformersEmbedder:
    """An in-memory model behind the feature service's embedding code (used for validation
    during training, so validation measures exactly what the service will serve)."""
    model.eval().to(device)
    embedder = TransformersEmbedder(
        model, tokenizer, image_processor, model_id=model_id, device=device, batch_size=batch_size
    )
    embedder.warm_up()
    return embedder
