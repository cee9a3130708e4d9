"""Image preprocessing: an RGB Pillow image in, the model's pixel tensor out, split in two halves
so that each half runs where it is cheapest.

``prepare`` runs per image in the decode threads (Pillow releases the GIL while it resizes), and
``to_tensor`` runs once per batch in the inference thread, on the model's device.

For the standard pipeline of a transformers image processor (resize, centre crop, rescale,
normalise: CLIP, SigLIP, ViT and most others) ``FastPipeline`` does the same operations as the
processor's Pillow backend, with the same Pillow calls, so the pixels are identical, but keeps
uint8 until the batch is assembled and then rescales and normalises through one lookup table
(bit-identical to the processor's float arithmetic, and a quarter of the bytes to move to a GPU).
Any other processor goes through ``ProcessorPipeline``: the processor itself, per image.

On CUDA, ``DeviceJpegDecoder`` decodes JPEG bytes on the GPU (nvJPEG through torchvision, when it
is installed) and ``resize_crop_tensor`` resizes there; both are optional and guarded.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

log = logging.getLogger(__name__)

# A JPEG is decoded at a reduced DCT scale (1/2, 1/4, 1/8) only while that keeps at least this
# many times the model's input resolution, so the final resize still has pixels to average:
# a 12-megapixel photo then decodes in a tenth of the time for a practically equal vector.
DRAFT_MARGIN = 2


class ImagePipeline(Protocol):
    """What the embedders need from preprocessing."""

    #: (height, width) of the model input.
    input_size: tuple[int, int]

    def draft_size(self, width: int, height: int) -> tuple[int, int] | None:
        """The smallest size a JPEG may be decoded at (``Image.draft``), or None for full size."""
        ...

    def prepare(self, image: Image.Image) -> np.ndarray:
        """Per image, thread-safe, CPU: an RGB image to an array ``to_tensor`` accepts."""
        ...

    def to_tensor(
        self, batch: Sequence[np.ndarray], device: str | torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """Per batch: the prepared arrays to normalised ``[n, 3, h, w]`` pixel values."""
        ...


@dataclass(frozen=True)
class _Resize:
    shortest_edge: int | None
    height: int | None
    width: int | None

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after resizing, as transformers computes it (``int()``, not round)."""
        if self.shortest_edge is not None:
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
            return (new_short, new_long) if width <= height else (new_long, new_short)
        assert self.height is not None and self.width is not None
        return self.width, self.height


def _size_dict(value: Any) -> dict[str, int]:
    if value is None:
        return {}
    if hasattr(value, "items"):
        return {k: int(v) for k, v in value.items() if v is not None}
    return {k: int(v) for k, v in vars(value).items() if isinstance(v, int) and v is not None}


class FastPipeline:
    """The standard transformers pipeline (see the module docstring), done faster."""

    def __init__(
        self,
        *,
        resize: _Resize | None,
        resample: int,
        crop: tuple[int, int] | None,
        rescale_factor: float | None,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        jpeg_draft: bool = True,
    ) -> None:
        self.resize = resize
        self.resample = resample
        self.crop = crop  # (height, width)
        self.jpeg_draft = jpeg_draft
        if crop is not None:
            self.input_size = crop
        elif resize is not None and resize.shortest_edge is None:
            self.input_size = (int(resize.height or 0), int(resize.width or 0))
        else:
            raise ValueError("the input size must be fixed: a centre crop or a fixed resize")
        self._lut = _lookup_table(rescale_factor, mean, std)
        scale = 1.0 if rescale_factor is None else rescale_factor
        mean64 = np.zeros(3) if mean is None else np.asarray(mean, dtype=np.float64)
        std64 = np.ones(3) if std is None else np.asarray(std, dtype=np.float64)
        self._slope = (scale / std64).astype(np.float32)
        self._intercept = (-mean64 / std64).astype(np.float32)
        # Per device: the table, and the same map as y = slope * x + intercept per channel for
        # GPUs, where a gather over int64 indices costs more memory traffic than arithmetic.
        self._on_device: dict[str, tuple[torch.Tensor, ...]] = {}

    @classmethod
    def from_processor(cls, processor: Any, *, jpeg_draft: bool = True) -> FastPipeline | None:
        """A fast pipeline equivalent to ``processor``, or None when it does anything else."""
        if not _has_standard_pipeline(processor):
            return None
        # (do_convert_rgb does not matter: every image arrives here as RGB already.)
        if getattr(processor, "do_pad", False):
            return None
        resize = None
        if getattr(processor, "do_resize", False):
            size = _size_dict(getattr(processor, "size", None))
            if set(size) == {"shortest_edge"}:
                resize = _Resize(size["shortest_edge"], None, None)
            elif set(size) == {"height", "width"}:
                resize = _Resize(None, size["height"], size["width"])
            else:
                return None  # longest_edge, max_height...: variable sizes, not batchable as is
        crop = None
        if getattr(processor, "do_center_crop", False):
            crop_size = _size_dict(getattr(processor, "crop_size", None))
            if set(crop_size) != {"height", "width"}:
                return None
            crop = (crop_size["height"], crop_size["width"])
        resample = getattr(processor, "resample", None)
        resample = int(resample) if resample is not None else int(Image.Resampling.BILINEAR)
        mean = std = None
        if getattr(processor, "do_normalize", False):
            mean, std = processor.image_mean, processor.image_std
            if isinstance(mean, (int, float)):
                mean, std = [mean] * 3, [std] * 3  # type: ignore[list-item]
        rescale = (
            float(processor.rescale_factor) if getattr(processor, "do_rescale", False) else None
        )
        try:
            return cls(
                resize=resize,
                resample=resample,
                crop=crop,
                rescale_factor=rescale,
                mean=mean,
                std=std,
                jpeg_draft=jpeg_draft,
            )
        except ValueError:
            return None

    def draft_size(self, width: int, height: int) -> tuple[int, int] | None:
        if not self.jpeg_draft:
            return None
        if self.resize is not None:
            target_w, target_h = self.resize.output_size(width, height)
        else:
            target_h, target_w = self.input_size
        return target_w * DRAFT_MARGIN, target_h * DRAFT_MARGIN

    def prepare(self, image: Image.Image) -> np.ndarray:
        if image.mode != "RGB":
            image = image.convert("RGB")
        if self.resize is not None:
            size = self.resize.output_size(*image.size)
            if size != image.size:
                image = image.resize(size, resample=self.resample)
        pixels = np.asarray(image)
        if self.crop is not None:
            pixels = _center_crop(pixels, *self.crop)
        return np.ascontiguousarray(pixels)  # [h, w, 3] uint8

    def to_tensor(
        self, batch: Sequence[np.ndarray], device: str | torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        pixels = torch.from_numpy(np.stack(batch))  # [n, h, w, 3] uint8
        if str(device).startswith("cuda"):
            pixels = pixels.pin_memory().to(device, non_blocking=True)
        return self.normalise(pixels.permute(0, 3, 1, 2), dtype)

    def normalise(self, pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """uint8 ``[n, 3, h, w]`` (on any device) to the model's normalised input."""
        if pixels.device.type == "cpu":
            return self.lookup(pixels).to(dtype)
        return self.affine(pixels).to(dtype)

    def lookup(self, pixels: torch.Tensor) -> torch.Tensor:
        """A table lookup: bit-identical to the processor's float64-then-float32 arithmetic."""
        lut, offsets, _, _ = self._tables(pixels.device)
        return lut[pixels.long() + offsets]

    def affine(self, pixels: torch.Tensor) -> torch.Tensor:
        """The same map as arithmetic (within float32 rounding), cheaper on a GPU."""
        _, _, slope, intercept = self._tables(pixels.device)
        return pixels.to(torch.float32) * slope + intercept

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = tuple(
                t.to(device)
                for t in (
                    torch.from_numpy(self._lut),
                    torch.arange(3).view(1, 3, 1, 1) * 256,
                    torch.from_numpy(self._slope).view(1, 3, 1, 1),
                    torch.from_numpy(self._intercept).view(1, 3, 1, 1),
                )
            )
        return self._on_device[key]


def _has_standard_pipeline(processor: Any) -> bool:
    # Only processors that use the backend's own resize/crop/rescale/normalise loop qualify; a
    # model-specific _preprocess (tiling, padding, ...) means something else happens.
    try:
        from transformers.image_processing_backends import PilBackend, TorchvisionBackend
    except ImportError:  # an older transformers: trust only the classic CLIP processor
        return type(processor).__name__ in ("CLIPImageProcessor", "CLIPImageProcessorPil")
    for backend in (PilBackend, TorchvisionBackend):
        if isinstance(processor, backend):
            return type(processor)._preprocess is backend._preprocess
    return False


def _lookup_table(
    rescale: float | None, mean: Sequence[float] | None, std: Sequence[float] | None
) -> np.ndarray:
    """[3 * 256] float32: the processor's output for each channel and byte value, computed with
    its own numpy arithmetic (rescale in float64 then float32, normalise in float32)."""
    values = np.arange(256, dtype=np.float64)
    values = (values * rescale if rescale is not None else values).astype(np.float32)
    table = np.repeat(values[None, :], 3, axis=0)
    if mean is not None and std is not None:
        mean32 = np.asarray(mean, dtype=np.float32)[:, None]
        std32 = np.asarray(std, dtype=np.float32)[:, None]
        table = (table - mean32) / std32
    return np.ascontiguousarray(table.astype(np.float32).reshape(-1))


def _center_crop(pixels: np.ndarray, crop_height: int, crop_width: int) -> np.ndarray:
    """transformers' centre crop: zero padding where the image is smaller than the crop."""
    height, width = pixels.shape[:2]
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    if top >= 0 and left >= 0:
        return pixels[top : top + crop_height, left : left + crop_width]
    new_h, new_w = max(crop_height, height), max(crop_width, width)
    canvas = np.zeros((new_h, new_w, pixels.shape[2]), dtype=pixels.dtype)
    pad_top, pad_left = math.ceil((new_h - height) / 2), math.ceil((new_w - width) / 2)
    canvas[pad_top : pad_top + height, pad_left : pad_left + width] = pixels
    top, left = top + pad_top, left + pad_left
    return canvas[top : top + crop_height, left : left + crop_width]


class ProcessorPipeline:
    """Any other image processor: called per image in the decode threads, stacked per batch."""

    def __init__(self, processor: Any, input_size: tuple[int, int]) -> None:
        self.processor = processor
        self.input_size = input_size

    def draft_size(self, width: int, height: int) -> tuple[int, int] | None:
        return None  # the processor may need the full resolution

    def prepare(self, image: Image.Image) -> np.ndarray:
        out = self.processor(images=[image], return_tensors="np")["pixel_values"]
        return np.ascontiguousarray(out[0], dtype=np.float32)  # [3, h, w]

    def to_tensor(
        self, batch: Sequence[np.ndarray], device: str | torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        return torch.from_numpy(np.stack(batch)).to(device=device, dtype=dtype)


def make_pipeline(
    processor: Any, input_size: tuple[int, int], *, jpeg_draft: bool = True
) -> ImagePipeline:
    fast = FastPipeline.from_processor(processor, jpeg_draft=jpeg_draft)
    if fast is not None and fast.input_size == input_size:
        return fast
    log.info("using %s per image (no fast path for it)", type(processor).__name__)
    return ProcessorPipeline(processor, input_size)


# --- GPU decoding and resizing (CUDA machines with torchvision; optional) --------------------


def resize_crop_tensor(pixels: torch.Tensor, pipeline: FastPipeline) -> torch.Tensor:
    """One decoded image, uint8 ``[3, h, w]`` on any device, resized and cropped as ``prepare``
    does (bicubic with antialiasing, rounded back to uint8 like Pillow), still uint8."""
    _, height, width = pixels.shape
    if pipeline.resize is not None:
        new_w, new_h = pipeline.resize.output_size(width, height)
        if (new_w, new_h) != (width, height):
            mode = "bicubic" if pipeline.resample == int(Image.Resampling.BICUBIC) else "bilinear"
            resized = F.interpolate(
                pixels[None].float(), size=(new_h, new_w), mode=mode, antialias=True
            )[0]
            pixels = resized.round_().clamp_(0, 255).to(torch.uint8)
    if pipeline.crop is not None:
        crop_h, crop_w = pipeline.crop
        _, height, width = pixels.shape
        if height < crop_h or width < crop_w:  # rare: pad as the CPU path does
            array = _center_crop(pixels.permute(1, 2, 0).cpu().numpy(), crop_h, crop_w)
            return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).to(pixels.device)
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        pixels = pixels[:, top : top + crop_h, left : left + crop_w]
    return pixels


class DeviceJpegDecoder:
    """Batched JPEG decoding on the GPU with torchvision's nvJPEG binding. ``available()`` says
    whether this torch/torchvision build can do it; nothing here is imported otherwise."""

    def __init__(self, device: str) -> None:
        from torchvision.io import ImageReadMode, decode_jpeg

        self._decode_jpeg = decode_jpeg
        self._mode = ImageReadMode.RGB
        self.device = device

    @staticmethod
    def available(device: str) -> bool:
        if not device.startswith("cuda") or not torch.cuda.is_available():
            return False
        try:
            import torchvision.io  # noqa: F401
        except Exception:  # torchvision missing, or built for another torch
            return False
        return True

    def decode(self, blobs: Sequence[bytes]) -> list[torch.Tensor]:
        """uint8 ``[3, h, w]`` tensors on the GPU, EXIF orientation applied. Raises on any
        failure (CMYK, lossless, a corrupt stream): the caller falls back to Pillow."""
        data = [torch.frombuffer(bytearray(blob), dtype=torch.uint8) for blob in blobs]
        try:
            decoded = self._decode_jpeg(
                data, mode=self._mode, device=self.device, apply_exif_orientation=True
            )
        except TypeError:  # torchvision < 0.19 has no apply_exif_orientation on the GPU
            raise RuntimeError(
                "this torchvision cannot apply EXIF orientation on the GPU"
            ) from None
        return list(decoded) if isinstance(decoded, (list, tuple)) else [decoded]
