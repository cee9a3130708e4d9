from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from services.feature.app import create_app
from services.feature.settings import FeatureSettings

MODEL_ID = "demo-tiny-clip"
MAX_IMAGE_BYTES = 256 * 1024


@pytest.fixture(scope="module")
def feature_settings(demo_model_dir: Path) -> FeatureSettings:
    # Small limits so the limit tests need no large payloads.
    return FeatureSettings(
        model=str(demo_model_dir),
        model_id=MODEL_ID,
        device="cpu",
        torch_threads=2,
        max_image_bytes=MAX_IMAGE_BYTES,
        max_batch=8,
        max_texts=16,
    )


@pytest.fixture(scope="module")
def client(feature_settings: FeatureSettings) -> Iterator[TestClient]:
    # The context manager runs the lifespan, which loads and warms the model.
    with TestClient(create_app(feature_settings)) as test_client:
        yield test_client
