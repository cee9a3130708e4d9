"""Contrastive losses over a batch of paired image and text features.

The temperature is the model's own learnable ``logit_scale`` (CLIP stores log(1/τ)): logits are
``exp(logit_scale) · cos``, and nothing else divides them. The tutorial this project grew from
divided by a fixed 0.07 on top, which squares the temperature and freezes its learning.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# CLIP clamps exp(logit_scale) at 100 so the logits cannot blow up.
MAX_LOGIT_SCALE = math.log(100.0)


def clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE: pair ``i`` is the positive, every other item in the batch a negative,
    averaged over the image→text and text→image directions."""
    image = F.normalize(image_features.float(), dim=-1)
    text = F.normalize(text_features.float(), dim=-1)
    logits = logit_scale.float().exp() * text @ image.T  # [texts, images]
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def sigmoid_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss, for models trained with it (they carry ``logit_bias``)."""
    image = F.normalize(image_features.float(), dim=-1)
    text = F.normalize(text_features.float(), dim=-1)
    logits = logit_scale.float().exp() * text @ image.T + logit_bias.float()
    labels = 2 * torch.eye(len(logits), device=logits.device) - 1
    return -F.logsigmoid(labels * logits).sum() / len(logits)


def contrastive_loss(
    model: torch.nn.Module, image_features: torch.Tensor, text_features: torch.Tensor
) -> torch.Tensor:
    """The loss the model was designed for: sigmoid when it has a ``logit_bias``, else InfoNCE."""
    bias = getattr(model, "logit_bias", None)
    if isinstance(bias, torch.Tensor):
        return sigmoid_loss(image_features, text_features, model.logit_scale, bias)
    return clip_loss(image_features, text_features, model.logit_scale)


def caption_bank_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    bank_features: torch.Tensor,
    positives: torch.Tensor,
    logit_scale: torch.Tensor,
) -> torch.Tensor:
    """InfoNCE whose image→text direction ranks each image against every caption of the
    training set (``bank_features``, [captions, dim]) instead of the batch's only; ``positives``
    ([batch, captions], bool) marks each image's own captions, any of which counts (the
    multi-positive form: -log of the positives' share of the softmax). The text→image direction
    stays in-batch. Exact only for a frozen text encoder, whose caption features change through
    the trained projection alone and can therefore be recomputed for the whole bank every step.
    """
    image = F.normalize(image_features.float(), dim=-1)
    text = F.normalize(text_features.float(), dim=-1)
    bank = F.normalize(bank_features.float(), dim=-1)
    scale = logit_scale.float().exp()
    target = torch.arange(len(text), device=text.device)
    text_to_image = F.cross_entropy(scale * text @ image.T, target)
    logits = scale * image @ bank.T  # [batch, captions]
    image_to_text = (
        torch.logsumexp(logits, dim=1)
        - torch.logsumexp(logits.masked_fill(~positives, float("-inf")), dim=1)
    ).mean()
    return (text_to_image + image_to_text) / 2
