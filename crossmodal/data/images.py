"""Reading image files for training and evaluation, with the feature service's own decoder.

The same decoding as at inference (EXIF orientation applied, transparency flattened onto white,
first frame of an animation), so a model is trained and measured on what it will be served.
A file that does not decode is skipped and counted, never fatal: one broken JPEG must not end a
training run of hours.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from PIL import Image

from services.feature.images import decode_image
from shared.problems import ProblemError

log = logging.getLogger(__name__)

# Far above any real training image; the point is to refuse decompression bombs, not photos.
MAX_IMAGE_BYTES = 64 * 1024 * 1024
MAX_IMAGE_PIXELS = 120_000_000


class SkippedImages:
    """Which images failed to decode, and why. Thread-safe; one entry per distinct path."""

    def __init__(self) -> None:
        self._reasons: dict[str, str] = {}
        self._lock = threading.Lock()

    def add(self, path: str | Path, reason: str) -> None:
        with self._lock:
            if str(path) not in self._reasons:
                log.warning("skipping %s: %s", path, reason)
            self._reasons[str(path)] = reason

    def __len__(self) -> int:
        return len(self._reasons)

    def __contains__(self, path: object) -> bool:
        return str(path) in self._reasons

    def as_dict(self) -> dict[str, str]:
        with self._lock:
            return dict(self._reasons)


def read_image(path: str | Path) -> Image.Image:
    """Decode ``path`` into an upright RGB image. Raises ``OSError`` or ``ValueError``."""
    data = Path(path).read_bytes()
    try:
        return decode_image(
            data, max_bytes=MAX_IMAGE_BYTES, max_pixels=MAX_IMAGE_PIXELS, name=str(path)
        )
    except ProblemError as exc:
        raise ValueError(exc.detail) from None


def try_read_image(path: str | Path, skipped: SkippedImages | None = None) -> Image.Image | None:
    """``read_image``, or ``None`` (recorded in ``skipped``) when the file is missing or broken."""
    try:
        return read_image(path)
    except (OSError, ValueError) as exc:
        if skipped is not None:
            skipped.add(path, f"{type(exc).__name__}: {exc}")
        return None
