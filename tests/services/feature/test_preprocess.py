"""The fast image pipeline gives the processor's exact pixels; JPEG draft decoding and the GPU
resize path stay close to them."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil, ViTImageProcessorPil

from crossmodal.demo.shapes import render
from services.feature.images import decode_image
from services.feature.preprocess import (
    FastPipeline,
    ProcessorPipeline,
    make_pipeline,
    resize_crop_tensor,
)


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth random content: like a photo, JPEG-compressible, different at every scale."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


def jpeg(image: Image.Image, quality: int = 92) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


PROCESSORS = {
    "clip-224": lambda: CLIPImageProcessorPil(),
    "clip-32": lambda: CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ),
    # A shortest edge below the crop: the crop pads with zeros.
    "clip-pad": lambda: CLIPImageProcessorPil(
        size={"shortest_edge": 24}, crop_size={"height": 32, "width": 32}
    ),
    "siglip": lambda: SiglipImageProcessorPil(size={"height": 64, "width": 64}),
    "vit-bilinear": lambda: ViTImageProcessorPil(size={"height": 48, "width": 48}),
}
SIZES = [(640, 480), (300, 500), (224, 224), (33, 97), (7, 5)]


@pytest.mark.parametrize("name", PROCESSORS)
def test_fast_pipeline_equals_the_processor(name: str) -> None:
    processor = PROCESSORS[name]()
    fast = FastPipeline.from_processor(processor, jpeg_draft=False)
    assert fast is not None
    images = [photo(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    expected = processor(images=images, return_tensors="np")["pixel_values"]
    got = fast.to_tensor([fast.prepare(i) for i in images], "cpu", torch.float32).numpy()
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)  # bit for bit, not merely close


@pytest.mark.parametrize("name", PROCESSORS)
def test_the_gpu_normalisation_matches_the_table(name: str) -> None:
    fast = FastPipeline.from_processor(PROCESSORS[name]())
    assert fast is not None
    every_value = torch.arange(256, dtype=torch.uint8).repeat(3, 1).view(1, 3, 16, 16)
    table = fast.lookup(every_value)
    np.testing.assert_allclose(fast.affine(every_value).numpy(), table.numpy(), atol=2e-6)
    assert float(table.min()) < -0.5  # normalised, not merely rescaled to [0, 1]


def test_other_processors_fall_back_to_the_processor_itself() -> None:
    # do_pad: variable output sizes, not the standard pipeline.
    padded = CLIPImageProcessorPil(do_pad=True, pad_size={"height": 240, "width": 240})
    assert FastPipeline.from_processor(padded) is None

    class Custom(CLIPImageProcessorPil):
        def _preprocess(self, images, **kwargs):  # type: ignore[no-untyped-def]
            return super()._preprocess(images, **kwargs)

    assert FastPipeline.from_processor(Custom()) is None
    pipeline = make_pipeline(Custom(), (224, 224))
    assert isinstance(pipeline, ProcessorPipeline)
    image = photo(320, 240)
    got = pipeline.to_tensor([pipeline.prepare(image)], "cpu", torch.float32).numpy()
    np.testing.assert_array_equal(
        got, Custom()(images=[image], return_tensors="np")["pixel_values"]
    )
    # A standard ViT processor qualifies.
    assert isinstance(make_pipeline(ViTImageProcessorPil(), (224, 224)), FastPipeline)


def test_draft_decoding_of_large_jpegs() -> None:
    processor = CLIPImageProcessorPil()
    fast = FastPipeline.from_processor(processor)
    assert fast is not None
    big = jpeg(photo(2000, 1500))
    full = decode_image(big, max_bytes=1 << 24, max_pixels=1 << 24)
    drafted = decode_image(big, max_bytes=1 << 24, max_pixels=1 << 24, draft=fast.draft_size)
    # 1/2 scale still leaves at least twice the 224-pixel input: 1000x750.
    assert full.size == (2000, 1500) and drafted.size == (1000, 750)
    a, b = (fast.to_tensor([fast.prepare(i)], "cpu", torch.float32)[0] for i in (full, drafted))
    assert (a - b).abs().mean() < 0.02  # normalised units: a fraction of one grey level
    # A JPEG already near the input size is decoded whole.
    small = decode_image(
        jpeg(photo(640, 480)), max_bytes=1 << 24, max_pixels=1 << 24, draft=fast.draft_size
    )
    assert small.size == (640, 480)
    assert FastPipeline.from_processor(processor, jpeg_draft=False).draft_size(2000, 1500) is None


def test_tensor_resize_matches_pillow_closely() -> None:
    """The GPU path (here on the CPU): bicubic with antialiasing in torch against Pillow."""
    fast = FastPipeline.from_processor(CLIPImageProcessorPil())
    assert fast is not None
    for image in (photo(640, 480), photo(300, 500, seed=1), render("red", "star", size=160)):
        chw = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
        on_tensor = resize_crop_tensor(chw, fast)
        assert on_tensor.dtype == torch.uint8 and tuple(on_tensor.shape) == (3, 224, 224)
        reference = torch.from_numpy(fast.prepare(image).copy()).permute(2, 0, 1)
        difference = (on_tensor.int() - reference.int()).abs().float()
        assert difference.mean() < 1.5 and difference.max() <= 40
