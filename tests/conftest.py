"""Fixtures shared by every test package: the offline tiny CLIP models.

``demo_model_dir`` is the trained demo model (built once per session, about 10-30 s on two
cores); ``random_model_dir`` an untrained one (seconds) for tests that only need the plumbing.
Set ``CROSSMODAL_TEST_MODEL_DIR`` to a folder to keep the trained model between sessions.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# No test may reach the Hugging Face hub; set before transformers is imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# OpenMP threads that spin while waiting steal the other core from the services and tests that
# share this machine's two; passive waiting made the feature suite ~10x faster here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from crossmodal.demo import ensure_demo_model

    cached = os.environ.get("CROSSMODAL_TEST_MODEL_DIR")
    target = Path(cached) if cached else tmp_path_factory.mktemp("demo") / "model"
    return ensure_demo_model(target)


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from crossmodal.demo import ensure_random_model

    return ensure_random_model(tmp_path_factory.mktemp("random") / "model")
