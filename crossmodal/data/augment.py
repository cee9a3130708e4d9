"""Train-time augmentation that keeps an image's meaning, so its caption stays true.

Geometry only, and mild: a random resized crop that keeps most of the image (a crop that drops
the subject would pair the caption with something else), a small rotation, and an optional
horizontal flip. No colour changes at all: a hue shift turns "a red heart" into a blue one and
skin-tone emoji into each other; brightness and saturation jitter blur the same distinctions.
The flip is off by default: it mirrors text, arrows ("right arrow" becomes a left arrow),
and hand emoji ("left-facing fist"); turn it on for natural photos, where left and right are
rarely in the caption.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image

WHITE = (255, 255, 255)


@dataclass(frozen=True)
class Augment:
    """A random, meaning-preserving view of an image; deterministic given the ``rng``."""

    # Fraction of the image area the crop keeps, and the range of its aspect ratio.
    scale: tuple[float, float] = (0.7, 1.0)
    ratio: tuple[float, float] = (0.85, 1.0 / 0.85)
    # Degrees either way; corners uncovered by the rotation are filled with ``fill``.
    max_rotation: float = 8.0
    hflip: bool = False
    fill: tuple[int, int, int] = WHITE

    def __post_init__(self) -> None:
        low, high = self.scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"bad aspect ratio range {self.ratio}")
        if not 0 <= self.max_rotation <= 30:
            raise ValueError("max_rotation beyond 30 degrees changes what many images show")

    def __call__(self, image: Image.Image, rng: random.Random) -> Image.Image:
        if self.max_rotation > 0:
            angle = rng.uniform(-self.max_rotation, self.max_rotation)
            image = image.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=self.fill)
        image = image.crop(self._crop_box(image.width, image.height, rng))
        if self.hflip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image

    def _crop_box(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        # torchvision's RandomResizedCrop recipe: retry a few times, then fall back to a
        # centre crop of the nearest allowed aspect ratio.
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                left = rng.randint(0, width - w)
                top = rng.randint(0, height - h)
                return left, top, left + w, top + h
        aspect = min(max(width / height, self.ratio[0]), self.ratio[1])
        w, h = (
            (width, round(width / aspect))
            if width / height < aspect
            else (round(height * aspect), height)
        )
        w, h = min(w, width), min(h, height)
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h
