"""Image–caption pairs for contrastive training, as a torch ``Dataset``.

Each item is one image with one of its captions, chosen anew every epoch. An image therefore
appears once per epoch and never twice in a batch, so in-batch negatives are never a second view
of the positive (the tutorial's dataset, one row per caption, puts COCO's five captions of an
image into one batch as each other's negatives).

Randomness (caption choice, augmentation) is seeded by (seed, epoch, index): the same run
gives the same batches whatever the number of loader workers, and a resumed run continues with
the batches the uninterrupted one would have seen.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from crossmodal.data.augment import Augment
from crossmodal.data.images import try_read_image
from crossmodal.data.records import ImageRecord


@dataclass(frozen=True)
class Pair:
    index: int  # of the record
    caption: int  # index into the record's captions
    pixels: torch.Tensor  # [3, H, W], already through the model's image processor


@dataclass(frozen=True)
class Batch:
    indices: torch.Tensor  # [B] record indices
    captions: list[str]
    pixels: torch.Tensor  # [B, 3, H, W]
    skipped: list[str]  # paths of images in this batch that failed to decode


class PairDataset(Dataset):
    """``records`` as training pairs. ``cache_side`` keeps decoded images in memory, shrunk so
    their longer side is at most that many pixels (decoding dominates small models' steps);
    ``None`` re-reads every file each epoch, for datasets larger than memory."""

    def __init__(
        self,
        records: Sequence[ImageRecord],
        image_processor: Any,
        *,
        augment: Augment | None = None,
        seed: int = 0,
        cache_side: int | None = None,
    ) -> None:
        self.records = list(records)
        self.image_processor = image_processor
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.cache_side = cache_side
        self._cache: dict[int, Image.Image | None] = {}

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def image(self, index: int) -> Image.Image | None:
        if index in self._cache:
            return self._cache[index]
        image = try_read_image(self.records[index].path)
        if image is not None and self.cache_side is not None:
            image = image.copy()
            image.thumbnail((self.cache_side, self.cache_side), Image.Resampling.BICUBIC)
        if self.cache_side is not None:
            self._cache[index] = image
        return image

    def __getitem__(self, index: int) -> Pair | tuple[int, str]:
        record = self.records[index]
        image = self.image(index)
        if image is None:
            return index, str(record.path)
        rng = random.Random(f"{self.seed}/{self.epoch}/{index}")
        caption = rng.randrange(len(record.captions))
        if self.augment is not None:
            image = self.augment(image, rng)
        pixels = self.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
        return Pair(index, caption, pixels)

    def collate(self, items: list[Pair | tuple[int, str]]) -> Batch:
        """Stack the decodable items; report the others instead of failing the batch."""
        pairs = [p for p in items if isinstance(p, Pair)]
        skipped = [p[1] for p in items if not isinstance(p, Pair)]
        return Batch(
            indices=torch.tensor([p.index for p in pairs], dtype=torch.long),
            captions=[self.records[p.index].captions[p.caption] for p in pairs],
            pixels=torch.stack([p.pixels for p in pairs]) if pairs else torch.empty(0),
            skipped=skipped,
        )
