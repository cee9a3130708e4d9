from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from shared.service_auth import InternalServiceSettings


class FeatureSettings(InternalServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="FEATURE_", extra="ignore", frozen=True, protected_namespaces=()
    )

    port: int = Field(8002, ge=1, le=65535)

    # A hub name (openai/clip-vit-base-patch32), a local folder saved with save_pretrained, or
    # (runtime onnx) a folder written by `python -m services.feature.export_onnx`.
    model: str = "var/demo/model"
    # The name vectors are tagged with; retrieval refuses to mix vectors of different ids.
    # Defaults to the hub name, or for a local folder its name and a hash of its weights (an
    # ONNX export keeps its source's id).
    model_id: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: onnx for an ONNX export, else torch-fp16 on CUDA, torch-bf16 on a CPU with native
    # bfloat16 (AVX512-BF16, AMX) and torch (fp32) on any other CPU.
    runtime: Literal["auto", "torch", "torch-bf16", "torch-fp16", "onnx"] = "auto"
    # Threads of one forward pass (PyTorch intra-op, or ONNX Runtime's); several services share
    # the cores of a small machine.
    torch_threads: int = Field(2, ge=1, le=256)
    # Threads that decode and resize uploaded images, beside the forward pass.
    decode_threads: int = Field(2, ge=1, le=64)

    # Dynamic batching: concurrent requests share forward passes of at most max_batch_size
    # inputs; the oldest waiting input waits at most max_wait_ms for others to join.
    max_batch_size: int = Field(32, ge=1, le=1024)
    max_wait_ms: float = Field(5.0, ge=0, le=1000)
    # Inputs admitted and not yet answered, per modality; beyond it requests get 503 overloaded.
    max_queue: int = Field(512, ge=1)

    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1)
    # Checked from the header before decoding: a small file can claim gigapixels.
    max_image_pixels: int = Field(40_000_000, ge=1)
    # Per request: images in one /embed/image call, texts in one /embed/text call.
    max_batch: int = Field(64, ge=1, le=1024)
    max_texts: int = Field(256, ge=1, le=4096)
    # Decode large JPEGs at a reduced DCT scale (still >= 2x the model's input size).
    jpeg_draft: bool = True
    # On CUDA, decode JPEGs on the GPU (nvJPEG through torchvision, when installed).
    gpu_decode: bool = True

    @model_validator(mode="after")
    def _queue_fits_a_request(self) -> FeatureSettings:
        # A queue smaller than one allowed request would turn that request away forever.
        if self.max_queue < max(self.max_batch, self.max_texts):
            raise ValueError(
                f"max_queue ({self.max_queue}) must be at least max_batch ({self.max_batch}) "
                f"and max_texts ({self.max_texts})"
            )
        return self
