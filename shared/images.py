"""Checks on untrusted image bytes, the same wherever an upload arrives.

Guards, in order: the byte size (413), the format (only common raster formats; EPS would run
Ghostscript, for one), the pixel count read from the header before any pixel is decoded (413;
a few KB of PNG can claim gigapixels), then a structural ``verify()`` (422).
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

from PIL import Image

from shared.problems import PayloadTooLarge, Unprocessable

_SAFE_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF")
Image.init()
ALLOWED_FORMATS: tuple[str, ...] = tuple(f for f in _SAFE_FORMATS if f in Image.OPEN)

INVALID_IMAGE = "invalid_image"
IMAGE_TOO_LARGE = "image_too_large"


def too_large(detail: str) -> PayloadTooLarge:
    return PayloadTooLarge(detail, code=IMAGE_TOO_LARGE)


def invalid(detail: str) -> Unprocessable:
    return Unprocessable(detail, code=INVALID_IMAGE)


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int

    @property
    def content_type(self) -> str:
        # Taken from the detected format, never from what the client claimed.
        return Image.MIME.get(self.format, "application/octet-stream")


# How a stored image is served back, by the type detected when it was uploaded. An upload can be
# a valid image and, in the same bytes, a ZIP, HTML or script file (a polyglot): with `nosniff`,
# one of these image types and a sandboxing CSP, a browser shows an image or nothing, never runs
# it. Anything else (a type from an older release, say) is served as an opaque download.
SERVED_IMAGE_TYPES: dict[str, tuple[str, str]] = {
    "image/jpeg": ("image/jpeg", "jpg"),
    "image/mpo": ("image/jpeg", "jpg"),  # a multi-picture JPEG: browsers show its first picture
    "image/png": ("image/png", "png"),
    "image/gif": ("image/gif", "gif"),
    "image/webp": ("image/webp", "webp"),
    "image/bmp": ("image/bmp", "bmp"),
    "image/tiff": ("image/tiff", "tiff"),
    "image/avif": ("image/avif", "avif"),
}
IMAGE_CONTENT_SECURITY_POLICY = "default-src 'none'; sandbox"
_SAFE_FILE_STEM = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class ServedImage:
    """The ``Content-Type`` and headers of a response carrying stored image bytes."""

    media_type: str
    headers: dict[str, str]


def served_image(content_type: str, file_stem: str) -> ServedImage:
    """How to serve bytes stored as ``content_type`` (the detected format, not the client's
    claim), named ``file_stem`` plus the format's extension if saved."""
    stem = _SAFE_FILE_STEM.sub("_", file_stem)[:100] or "image"
    known = SERVED_IMAGE_TYPES.get(content_type.split(";")[0].strip().lower())
    if known is None:
        media_type, disposition = "application/octet-stream", f'attachment; filename="{stem}.bin"'
    else:
        media_type, extension = known
        disposition = f'inline; filename="{stem}.{extension}"'
    return ServedImage(
        media_type,
        {
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": IMAGE_CONTENT_SECURITY_POLICY,
            "Content-Disposition": disposition,
        },
    )


def inspect_image(
    data: bytes, *, max_bytes: int, max_pixels: int, name: str = "image"
) -> ImageInfo:
    """Accept ``data`` only if it is an image of an allowed format within the limits; nothing
    is decoded. Raises ``image_too_large`` (413) or ``invalid_image`` (422) problems."""
    if len(data) > max_bytes:
        raise too_large(f"{name} is {len(data)} bytes; the limit is {max_bytes}")
    if not data:
        raise invalid(f"{name} is empty")
    try:
        with warnings.catch_warnings():
            # Our own pixel limit applies below; Pillow's global one must not warn or raise first.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as image:
                width, height = image.size
                info = ImageInfo(image.format or "", width, height)
                if width <= 0 or height <= 0:
                    raise invalid(f"{name} has no pixels")
                if width * height > max_pixels:
                    raise too_large(
                        f"{name} is {width}x{height} pixels; the limit is {max_pixels} pixels"
                    )
                # verify() checks structure and checksums (e.g. PNG chunk CRCs) without decoding.
                image.verify()
    except (PayloadTooLarge, Unprocessable):
        raise
    except Image.DecompressionBombError as exc:
        raise too_large(f"{name} has too many pixels: {exc}") from None
    except Image.UnidentifiedImageError:
        raise invalid(
            f"{name} is not in a supported image format ({', '.join(ALLOWED_FORMATS)})"
        ) from None
    except Exception as exc:  # Pillow signals bad data with many exception types
        raise invalid(f"{name} is not a valid image ({type(exc).__name__})") from None
    return info
