"""Contrastive fine-tuning of CLIP-style models: ``python -m crossmodal.train``.

See ``trainer`` for the objective (symmetric InfoNCE with the model's learnable temperature,
GradCache for accumulated batches), ``towers`` for LiT-style freezing, ``dual_encoder`` for
building a new ViT + pretrained-text-encoder model to train. docs/training.md has the recipes.
"""

from crossmodal.train.loss import clip_loss, contrastive_loss, sigmoid_loss
from crossmodal.train.trainer import TrainConfig, Trainer, TrainSummary, lr_factor, train

__all__ = [
    "TrainConfig",
    "TrainSummary",
    "Trainer",
    "clip_loss",
    "contrastive_loss",
    "lr_factor",
    "sigmoid_loss",
    "train",
]
