"""The CUDA image path (JPEG bytes decoded and resized on the device) exercised on the CPU: a
stand-in decoder replaces nvJPEG, everything after it is the code a GPU runs."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image, ImageOps

from crossmodal.demo.shapes import render
from services.feature.app import create_app
from services.feature.model import TransformersEmbedder
from services.feature.preprocess import DeviceJpegDecoder
from services.feature.settings import FeatureSettings
from tests.service_tokens import KEYS, service_headers


class PillowAsDevice:
    """Decodes like nvJPEG (uint8 [3, h, w] tensors, EXIF applied) and, like it, refuses CMYK."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def decode(self, blobs: Sequence[bytes]) -> list[torch.Tensor]:
        self.batches.append(len(blobs))
        decoded = []
        for blob in blobs:
            with Image.open(io.BytesIO(blob)) as image:
                if image.mode == "CMYK":
                    raise RuntimeError("unsupported colour space")
                upright = ImageOps.exif_transpose(image).convert("RGB")
            decoded.append(torch.from_numpy(np.array(upright)).permute(2, 0, 1))
        return decoded


def jpeg(image: Image.Image, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, **params)
    return buffer.getvalue()


def test_jpegs_decoded_on_the_device(demo_embedder: TransformersEmbedder) -> None:
    device_decoding = TransformersEmbedder(
        demo_embedder.model,
        demo_embedder.tokenizer,
        demo_embedder.image_processor,
        model_id=demo_embedder.model_id,
        device="cpu",
    )
    decoder = PillowAsDevice()
    device_decoding._jpeg_decoder = decoder  # type: ignore[assignment]
    device_decoding.decodes_jpeg = True
    device_decoding.warm_up()

    upright = render("green", "star", size=300)
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways = jpeg(upright.transpose(Image.Transpose.ROTATE_90), exif=exif)
    cmyk = jpeg(render("blue", "square", size=300).convert("CMYK"))
    png = io.BytesIO()
    render("red", "circle", size=300).save(png, format="PNG")
    blobs = [jpeg(upright), sideways, cmyk, png.getvalue()]
    files = [("images", (f"{i}", b, "application/octet-stream")) for i, b in enumerate(blobs)]

    settings = FeatureSettings(model="unused", max_wait_ms=0.0)
    with TestClient(
        create_app(settings, embedder=device_decoding, token_keys=KEYS),
        headers=service_headers("feature"),
    ) as client:
        response = client.post("/embed/image", files=files)
        truncated = jpeg(upright)[:600]
        broken = client.post("/embed/image", files=[("images", ("x.jpg", truncated, "image/jpeg"))])
    with TestClient(
        create_app(settings, embedder=demo_embedder, token_keys=KEYS),
        headers=service_headers("feature"),
    ) as client:
        reference = client.post("/embed/image", files=files).json()["vectors"]

    assert response.status_code == 200, response.text
    got, expected = np.asarray(response.json()["vectors"]), np.asarray(reference)
    # The device path resizes with torch's antialiased bicubic, not Pillow's: close, not equal.
    assert (np.sum(got * expected, axis=1) > 0.99).all()
    assert got[0] @ got[1] > 0.999  # upright: EXIF applied on the device path
    np.testing.assert_allclose(got[3], expected[3], atol=1e-5)  # a PNG never goes to the device
    # The batch failed on the CMYK image, then went image by image; the PNG never came here.
    assert decoder.batches[:1] == [3] and decoder.batches[1:] == [1, 1, 1]
    # A corrupt JPEG fails nvJPEG and Pillow alike: a 422 for its request alone.
    assert broken.status_code == 422 and broken.json()["code"] == "invalid_image"


@pytest.mark.skipif(
    not DeviceJpegDecoder.available("cuda"), reason="needs CUDA and torchvision (nvJPEG)"
)
def test_nvjpeg_on_a_gpu(demo_model_dir: Path, demo_embedder: TransformersEmbedder) -> None:
    gpu = TransformersEmbedder.load(str(demo_model_dir), device="cuda", runtime="torch-fp16")
    assert gpu.decodes_jpeg and gpu.device == "cuda" and gpu.dtype == "float16"
    blobs = [jpeg(render(c, s, size=300)) for c, s in (("red", "circle"), ("blue", "star"))]
    blobs.append(jpeg(render("green", "square", size=300).convert("CMYK")))  # Pillow fallback
    files = [("images", (f"{i}.jpg", b, "image/jpeg")) for i, b in enumerate(blobs)]
    settings = FeatureSettings(model="unused", device="cuda")
    with TestClient(
        create_app(settings, embedder=gpu, token_keys=KEYS), headers=service_headers("feature")
    ) as client:
        got = np.asarray(client.post("/embed/image", files=files).json()["vectors"])
    with TestClient(
        create_app(settings, embedder=demo_embedder, token_keys=KEYS),
        headers=service_headers("feature"),
    ) as client:
        expected = np.asarray(client.post("/embed/image", files=files).json()["vectors"])
    assert (np.sum(got * expected, axis=1) > 0.99).all()
