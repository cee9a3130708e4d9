"""The feature service's domain: a loaded model behind two dynamic batchers (texts, images),
one inference thread they share, and a pool of decode threads.

Where the work happens, and why:

- the event loop parses requests and answers them, and never computes;
- decode threads check, decode, resize and crop each uploaded image, in parallel (Pillow releases
  the GIL), before the image joins a batch;
- one inference thread runs the forward passes, one at a time for both modalities: a pass
  already uses every configured core, and two at once would only fight over them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from services.feature.batcher import DynamicBatcher
from services.feature.images import decode_image
from services.feature.metrics import ADMITTED, QUEUE_DEPTH, observe_batch
from services.feature.model import Embedder, EncodedJpeg, PreparedImage, TextEmbeddings
from services.feature.settings import FeatureSettings
from shared.images import inspect_image

log = logging.getLogger(__name__)


def _set_threads(threads: int) -> None:
    # Per thread on some builds (OpenMP's setting is per calling thread): set it where the
    # forward passes actually run.
    torch.set_num_threads(threads)


class FeatureService:
    def __init__(self, embedder: Embedder, settings: FeatureSettings) -> None:
        self.embedder = embedder
        self.settings = settings
        self._inference = ThreadPoolExecutor(
            1, "inference", initializer=_set_threads, initargs=(settings.torch_threads,)
        )
        self._decode = ThreadPoolExecutor(settings.decode_threads, "decode")
        self.texts: DynamicBatcher[str, tuple[np.ndarray, bool]] = self._batcher(
            "text", self._run_texts
        )
        self.images: DynamicBatcher[PreparedImage, np.ndarray] = self._batcher(
            "image", self.embedder.embed_prepared
        )

    def _batcher(self, modality: str, run: Any) -> DynamicBatcher[Any, Any]:
        return DynamicBatcher(
            modality,
            run,
            executor=self._inference,
            max_batch_size=self.settings.max_batch_size,
            max_wait_ms=self.settings.max_wait_ms,
            max_queue=self.settings.max_queue,
            on_batch=lambda size, seconds, waited: observe_batch(modality, size, seconds, waited),
            on_depth=QUEUE_DEPTH.labels(modality).set,
        )

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self.texts.start()
        self.images.start()

    async def stop(self) -> None:
        await self.texts.stop()
        await self.images.stop()
        self._decode.shutdown(wait=False, cancel_futures=True)
        self._inference.shutdown(wait=False, cancel_futures=True)

    @property
    def running(self) -> bool:
        return self.texts.running and self.images.running

    # --- work -----------------------------------------------------------------------------

    async def embed_texts(self, texts: Sequence[str]) -> TextEmbeddings:
        with self._admit(self.texts, "text", len(texts)):
            rows = await self.texts.submit(list(texts))
        return TextEmbeddings(
            np.stack([vector for vector, _ in rows]), [truncated for _, truncated in rows]
        )

    async def embed_image_bytes(self, blobs: Sequence[bytes], names: Sequence[str]) -> np.ndarray:
        """Vectors for uploaded images; the first bad image (in request order) raises its
        problem (413 ``image_too_large`` or 422 ``invalid_image``)."""
        with self._admit(self.images, "image", len(blobs)):
            loop = asyncio.get_running_loop()
            prepared = await asyncio.gather(
                *(
                    loop.run_in_executor(self._decode, self._prepare, blob, name)
                    for blob, name in zip(blobs, names, strict=True)
                ),
                return_exceptions=True,
            )
            for item in prepared:
                if isinstance(item, BaseException):
                    raise item
            rows = await self.images.submit(prepared)
        return np.stack(rows)

    def _prepare(self, blob: bytes, name: str) -> PreparedImage:
        """In a decode thread: checks, decoding and the per-image part of preprocessing."""
        settings = self.settings
        if self.embedder.decodes_jpeg:
            info = inspect_image(
                blob,
                max_bytes=settings.max_image_bytes,
                max_pixels=settings.max_image_pixels,
                name=name,
            )
            if info.format == "JPEG":
                return EncodedJpeg(blob, name, settings.max_image_pixels)
        image = decode_image(
            blob,
            max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
            name=name,
            draft=self.embedder.draft_size,
        )
        return self.embedder.prepare_image(image)

    def _run_texts(self, texts: list[str]) -> list[tuple[np.ndarray, bool]]:
        result = self.embedder.embed_texts(texts)
        return list(zip(result.vectors, result.truncated, strict=True))

    @contextmanager
    def _admit(
        self, batcher: DynamicBatcher[Any, Any], modality: str, count: int
    ) -> Iterator[None]:
        with batcher.reserve(count):
            gauge = ADMITTED.labels(modality)
            gauge.inc(count)
            try:
                yield
            finally:
                gauge.dec(count)
