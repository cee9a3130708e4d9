"""Model families by configuration (CLIP, SigLIP, a vision-text dual encoder with a real
pretrained text tower) and the model id that keeps their vectors apart."""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from safetensors import safe_open

from crossmodal.demo import ensure_random_model
from crossmodal.demo.shapes import render
from services.feature.app import create_app
from services.feature.model import (
    BaseEmbedder,
    ModelLoadError,
    TransformersEmbedder,
    default_model_id,
    load_embedder,
    pooled,
)
from services.feature.settings import FeatureSettings
from tests.service_tokens import KEYS, service_headers


def load(model_dir: Path) -> BaseEmbedder:
    # The lifespan's own loader, with the settings' values; float32, which the tests below
    # compare with the model's own outputs, whatever this processor's native precisions.
    settings = FeatureSettings(model=str(model_dir), device="cpu", runtime="torch")
    return load_embedder(settings.model, device=settings.device, runtime=settings.runtime)


def served(embedder: Any) -> tuple[dict, dict, dict]:
    """/model, a text answer and an image answer from the app around ``embedder``."""
    buffer = io.BytesIO()
    render("blue", "square").save(buffer, format="PNG")
    with TestClient(
        create_app(FeatureSettings(model="unused"), embedder=embedder, token_keys=KEYS),
        headers=service_headers("feature"),
    ) as client:
        info = client.get("/model").json()
        text = client.post("/embed/text", json={"texts": ["a red circle", "a cat"]}).json()
        files = [("images", ("a.png", buffer.getvalue(), "image/png"))]
        image = client.post("/embed/image", files=files).json()
    return info, text, image


def test_siglip_by_configuration(siglip_model_dir: Path) -> None:
    embedder = load(siglip_model_dir)
    info, text, image = served(embedder)
    assert info["architecture"] == "SiglipModel"
    assert (info["dim"], info["image_size"], info["max_text_tokens"]) == (64, 32, 16)
    assert info["model_id"] == default_model_id(str(siglip_model_dir))
    assert text["model_id"] == image["model_id"] == info["model_id"]
    assert len(text["vectors"][0]) == len(image["vectors"][0]) == 64
    # SigLIP pools the last position, so texts must be padded to the full length as in its
    # training: the service's vector equals the model's on max_length padding, not on none.
    assert isinstance(embedder, TransformersEmbedder)
    tokenizer, model = embedder.tokenizer, embedder.model
    padded = tokenizer(["a red circle"], padding="max_length", max_length=16, return_tensors="pt")
    unpadded = tokenizer(["a red circle"], return_tensors="pt")
    with torch.inference_mode():
        full = F.normalize(pooled(model.get_text_features(**padded)), dim=-1)[0].numpy()
        short = F.normalize(pooled(model.get_text_features(**unpadded)), dim=-1)[0].numpy()
    np.testing.assert_allclose(text["vectors"][0], full, atol=1e-5)
    assert not np.allclose(short, full, atol=1e-3)


def test_dual_encoder_with_a_pretrained_text_tower(
    dual_encoder_model_dir: Path, minilm_dir: Path
) -> None:
    embedder = load(dual_encoder_model_dir)
    info, text, image = served(embedder)
    assert info["architecture"] == "VisionTextDualEncoderModel"
    assert (info["dim"], info["image_size"], info["max_text_tokens"]) == (48, 32, 512)
    assert len(text["vectors"][0]) == len(image["vectors"][0]) == 48
    assert text["truncated"] == [False, False]
    # The text tower holds MiniLM's pretrained weights, not a fresh initialisation.
    assert isinstance(embedder, TransformersEmbedder)
    with safe_open(str(minilm_dir / "model.safetensors"), "np") as weights:
        pretrained = weights.get_tensor("embeddings.word_embeddings.weight")
    loaded = embedder.model.text_model.embeddings.word_embeddings.weight.detach().numpy()
    np.testing.assert_array_equal(loaded, pretrained)
    # BERT's WordPiece tokenizer, 512 positions: longer texts are cut and flagged.
    result = embedder.embed_texts(["word " * 600, "a short one"])
    assert result.truncated == [True, False]
    np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-5)


def test_the_model_id_is_stable_and_distinct_per_weights(
    tmp_path: Path, random_model_dir: Path
) -> None:
    other = ensure_random_model(tmp_path / "other", seed=2)
    moved = tmp_path / "elsewhere" / "model"
    shutil.copytree(random_model_dir, moved)
    # Same weights, same id wherever they are; other weights, another id. Retrieval refuses
    # to mix vectors whose ids differ (409 model_mismatch), so this is what keeps them apart.
    assert load(moved).model_id == default_model_id(str(random_model_dir))
    other_id = load(other).model_id
    assert other_id == default_model_id(str(other)) != default_model_id(str(random_model_dir))


def test_a_model_without_both_towers_is_refused(minilm_dir: Path) -> None:
    # A plain text encoder (BertModel) has no get_image_features.
    with pytest.raises(ModelLoadError, match="not a CLIP-like model"):
        TransformersEmbedder.load(str(minilm_dir), device="cpu")
