"""The tiny CLIP of the demo and the tests: a real ``CLIPModel`` (only small), saved with its
tokenizer and image processor so the folder loads through exactly the ``from_pretrained`` path a
hub checkpoint such as ``openai/clip-vit-base-patch32`` takes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

from crossmodal.demo.build import DEMO_INFO
from crossmodal.demo.tokenizer import VOCAB_SIZE, save_clip_tokenizer

# 32 px with 8 px patches: 16 patches, enough to tell the shapes apart and ~3x cheaper to train
# than 64 px.
IMAGE_SIZE = 32
MAX_TEXT_TOKENS = 32


def tiny_clip_config() -> CLIPConfig:
    """A CLIP small enough to train on two CPU cores in seconds, with CLIP's real vocabulary
    and special-token ids so a genuine CLIP tokenizer drives it."""
    return CLIPConfig(
        text_config={
            "vocab_size": VOCAB_SIZE,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": MAX_TEXT_TOKENS,
            # Pooling takes the first end-of-text token; padding uses the same token, as
            # OpenAI's checkpoints do.
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 49407,
        },
        vision_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": IMAGE_SIZE,
            "patch_size": 8,
        },
        projection_dim=32,
    )


def image_processor(image_size: int = IMAGE_SIZE) -> CLIPImageProcessorPil:
    """CLIP's preprocessing (resize shortest edge, centre crop, OpenAI mean/std) in its Pillow
    flavour: torchvision is not a dependency of this project."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )


def new_model(seed: int = 0) -> CLIPModel:
    torch.manual_seed(seed)
    return CLIPModel(tiny_clip_config()).eval()


def save_model_dir(model: CLIPModel, out: Path, info: dict[str, Any]) -> Path:
    """Save model, tokenizer and image processor into ``out``. ``DEMO_INFO`` is written last:
    its presence marks the folder complete and records how the model was made."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    # Saved afresh (and reloaded as a check) rather than from the training copy, so every
    # folder gets the same files: tokenizer.json, tokenizer_config.json, vocab.json, merges.txt.
    save_clip_tokenizer(out, model.config.text_config.max_position_embeddings)
    image_processor(model.config.vision_config.image_size).save_pretrained(str(out))
    (out / DEMO_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return out


def build_random_model(out: Path, seed: int = 0) -> Path:
    """An untrained tiny CLIP folder: loads and embeds like the real thing, in about a second
    or two, for tests that need the plumbing but not meaningful vectors."""
    return save_model_dir(new_model(seed), out, {"kind": "random", "seed": seed})
