"""Safe image decoding: untrusted bytes in, an RGB Pillow image out, or a problem.

The checks of ``shared.images`` come first (size, format, pixel count, structure), then a full
decode. The result is upright (EXIF orientation applied), the first
frame of an animation, and RGB whatever the source mode: transparency is flattened onto white,
16-bit and float greyscale are scaled to 8 bits rather than clipped.

A JPEG much larger than the model's input may be decoded at a reduced DCT scale (``draft``):
the decoder then skips most of the work, which is most of the cost of a phone photo.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps

from shared.images import ALLOWED_FORMATS, inspect_image, invalid, too_large

log = logging.getLogger(__name__)

_BACKGROUND = (255, 255, 255)


# (width, height) of the stored image -> the smallest size it may be decoded at, or None.
DraftSize = Callable[[int, int], tuple[int, int] | None]


def decode_image(
    data: bytes,
    *,
    max_bytes: int,
    max_pixels: int,
    name: str = "image",
    draft: DraftSize | None = None,
) -> Image.Image:
    """Decode untrusted bytes into an upright RGB image.

    Raises ``PayloadTooLarge`` (``image_too_large``) over ``max_bytes`` or ``max_pixels``, and
    ``Unprocessable`` (``invalid_image``) for anything that is not a decodable image."""
    inspect_image(data, max_bytes=max_bytes, max_pixels=max_pixels, name=name)
    try:
        # verify() left the first handle unusable, hence a second open for the pixels.
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as image:
            if draft is not None and image.format in ("JPEG", "MPO"):
                size = draft(*image.size)
                if size is not None:
                    # Keeps the mode; picks the largest DCT scale still >= size in both axes.
                    image.draft(None, size)
            image.load()  # the first frame of an animation
            return to_rgb(_upright(image))
    except Image.DecompressionBombError as exc:
        raise too_large(f"{name} has too many pixels: {exc}") from None
    except Exception as exc:  # Pillow signals bad data with many exception types
        raise invalid(f"{name} could not be decoded as an image ({type(exc).__name__})") from exc


def _upright(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image) or image
    except Exception:  # broken EXIF must not cost the whole image
        log.debug("ignoring unreadable EXIF orientation", exc_info=True)
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB: alpha composited on white, palette expanded, CMYK and
    YCbCr converted, 16/32-bit integer and float greyscale rescaled to 8 bits."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        # A palette image may carry transparency; expanding to RGBA keeps it for compositing.
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_rgb(image)
    return image.convert("RGB")


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    # Pillow's own convert() clips values above 255, turning most 16-bit images white.
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        values = values / 257.0
    else:
        low, high = float(values.min()), float(values.max())
        if low < 0 or high > 255:
            # Assume the 16-bit range when it fits (16-bit PNGs can open as mode "I"),
            # otherwise stretch the actual range.
            if low >= 0 and high <= 65535:
                values = values / 257.0
            else:
                values = (values - low) / max(high - low, 1e-12) * 255.0
    grey = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    return grey.convert("RGB")
