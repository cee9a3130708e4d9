"""Image checks, thumbnails and the content-addressed image store.

Files are named by the SHA-256 of their bytes under two levels of shard folders
(``ab/cd/abcd…``), so identical uploads share one file and no folder grows huge. Thumbnails live
beside them under ``thumbs/`` with the same sharding, named by hash and size, so a change of the
configured size simply makes new ones.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from shared.images import ALLOWED_FORMATS, inspect_image, invalid, too_large

THUMBNAIL_CONTENT_TYPE = "image/jpeg"


@dataclass(frozen=True)
class CheckedImage:
    data: bytes
    sha256: str
    content_type: str


def check_image(data: bytes, *, max_bytes: int, max_pixels: int) -> CheckedImage:
    """Accept ``data`` only if it is an image of an allowed format within the limits."""
    info = inspect_image(data, max_bytes=max_bytes, max_pixels=max_pixels, name="the image")
    return CheckedImage(data, hashlib.sha256(data).hexdigest(), info.content_type)


def make_thumbnail(data: bytes, size: int) -> bytes:
    """A JPEG at most ``size`` pixels on its longer side. ``data`` has passed ``check_image``
    (format and pixel limits); this is the one place the metadata service decodes pixels, so a
    file whose header is fine but whose pixel data is broken is refused here (422)."""
    try:
        with warnings.catch_warnings():
            # The pixel limit was enforced from the header already.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as image:
                # JPEG can decode at 1/2, 1/4 or 1/8 scale directly: much less work for photos.
                image.draft("RGB", (size, size))
                oriented = ImageOps.exif_transpose(image)
                oriented.thumbnail((size, size), Image.Resampling.LANCZOS)
                if oriented.mode in ("RGBA", "LA") or (
                    oriented.mode == "P" and "transparency" in oriented.info
                ):
                    # JPEG has no alpha: transparent parts become white, not black.
                    rgba = oriented.convert("RGBA")
                    flat = Image.new("RGB", rgba.size, (255, 255, 255))
                    flat.paste(rgba, mask=rgba.getchannel("A"))
                    oriented = flat
                else:
                    oriented = oriented.convert("RGB")
                out = io.BytesIO()
                oriented.save(out, format="JPEG", quality=85, optimize=True)
                return out.getvalue()
    except Image.DecompressionBombError as exc:
        raise too_large(f"the image has too many pixels: {exc}") from None
    except Exception as exc:  # Pillow signals bad pixel data with many exception types
        raise invalid(f"the image's pixel data cannot be decoded ({type(exc).__name__})") from None


class ImageStore:
    """Content-addressed files. Callers hold ``lock(sha)`` around "write file + reference it" and
    "drop last reference + delete file" so the two cannot interleave (within this process)."""

    _STRIPES = 64

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._locks = [threading.Lock() for _ in range(self._STRIPES)]

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256[2:4] / sha256

    def thumbnail_path(self, sha256: str, size: int) -> Path:
        return self.root / "thumbs" / sha256[:2] / sha256[2:4] / f"{sha256}-{size}.jpg"

    @contextmanager
    def lock(self, sha256: str) -> Iterator[None]:
        with self._locks[int(sha256[:8], 16) % self._STRIPES]:
            yield

    def put(self, sha256: str, data: bytes) -> bool:
        """Store ``data`` under its hash; True if a new file was written, False if it existed."""
        return _write_once(self.path(sha256), data)

    def put_thumbnail(self, sha256: str, size: int, data: bytes) -> bool:
        return _write_once(self.thumbnail_path(sha256, size), data)

    def remove(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)
        folder = self.thumbnail_path(sha256, 0).parent
        if folder.is_dir():
            for thumb in folder.glob(f"{sha256}-*.jpg"):
                thumb.unlink(missing_ok=True)


def _write_once(target: Path, data: bytes) -> bool:
    if target.exists():
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write a temporary file in the same folder, fsync, then rename: a reader or a crash
    # never sees a partial image under the final name.
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)
    return True


def _fsync_dir(path: Path) -> None:
    # The rename is durable only once the folder entry itself is flushed.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
