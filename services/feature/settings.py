from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings


class FeatureSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="FEATURE_", extra="ignore", frozen=True, protected_namespaces=()
    )

    port: int = Field(8002, ge=1, le=65535)

    # A hub name (openai/clip-vit-base-patch32) or a local folder saved with save_pretrained.
    model: str = "var/demo/model"
    # The name vectors are tagged with; retrieval refuses to mix vectors of different ids.
    # Defaults to the hub name, or for a local folder its name and a hash of its weights.
    model_id: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: int = Field(2, ge=1, le=256)

    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1)
    # Checked from the header before decoding: a small file can claim gigapixels.
    max_image_pixels: int = Field(40_000_000, ge=1)
    max_batch: int = Field(64, ge=1, le=1024)
    max_texts: int = Field(256, ge=1, le=4096)
