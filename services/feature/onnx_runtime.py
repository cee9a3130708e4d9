"""The ``onnx`` runtime: ONNX Runtime over a folder written by ``export_onnx``.

The folder holds ``text.onnx`` and ``image.onnx`` (each tower with its projection and the L2
normalisation, so a session's output is the final vector), the tokenizer, the image processor,
the model's ``config.json`` and ``feature_onnx.json``, which records the source model's id: the
vectors are the same model's (cosine >= 0.999 against PyTorch), so they carry the same id and can
be searched against a collection built with PyTorch.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoConfig

from services.feature.model import (
    ONNX_MANIFEST,
    BaseEmbedder,
    EncodedJpeg,
    ModelLoadError,
    PreparedImage,
    load_image_processor,
    load_tokenizer,
    resolve_device,
)

log = logging.getLogger(__name__)

TEXT_FILE = "text.onnx"
IMAGE_FILE = "image.onnx"


def read_manifest(path: str | Path) -> dict[str, Any]:
    try:
        return json.loads((Path(path) / ONNX_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} is not an ONNX export: {exc}") from exc


def _session(path: Path, device: str, threads: int | None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if threads:
        options.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ModelLoadError("device 'cuda' with runtime 'onnx' needs onnxruntime-gpu")
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), sess_options=options, providers=providers)


class OnnxEmbedder(BaseEmbedder):
    runtime = "onnx"

    def __init__(
        self,
        text_session: Any,
        image_session: Any,
        *,
        tokenizer: Any,
        image_processor: Any,
        config: Any,
        model_id: str,
        device: str,
        batch_size: int = 64,
        jpeg_draft: bool = True,
    ) -> None:
        super().__init__(
            tokenizer=tokenizer,
            image_processor=image_processor,
            config=config,
            model_id=model_id,
            device=device,
            dtype="float32",
            batch_size=batch_size,
            jpeg_draft=jpeg_draft,
        )
        self._text = text_session
        self._image = image_session
        # The exporter drops inputs a graph does not use (token_type_ids, often).
        self._text_inputs = {i.name for i in text_session.get_inputs()}
        self._image_input = image_session.get_inputs()[0].name

    @classmethod
    def load(
        cls,
        path: str,
        *,
        model_id: str | None = None,
        device: str = "auto",
        threads: int | None = None,
        batch_size: int = 64,
        jpeg_draft: bool = True,
    ) -> OnnxEmbedder:
        """Load an export folder and warm it up. Blocking."""
        started = time.perf_counter()
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            raise ModelLoadError("runtime 'onnx' needs the onnxruntime package") from exc
        folder = Path(path)
        manifest = read_manifest(folder)
        device = resolve_device(device)
        try:
            config = AutoConfig.from_pretrained(str(folder))
            tokenizer = load_tokenizer(str(folder))
            image_processor = load_image_processor(str(folder))
            text = _session(folder / TEXT_FILE, device, threads)
            image = _session(folder / IMAGE_FILE, device, threads)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"cannot load the ONNX export {path!r}: {exc}") from exc
        embedder = cls(
            text,
            image,
            tokenizer=tokenizer,
            image_processor=image_processor,
            config=config,
            model_id=model_id or str(manifest["model_id"]),
            device=device,
            batch_size=batch_size,
            jpeg_draft=jpeg_draft,
        )
        embedder.warm_up()
        log.info(
            "loaded ONNX export of %s on %s, dim %d, in %.1fs",
            embedder.model_id,
            device,
            embedder.dim,
            time.perf_counter() - started,
        )
        return embedder

    def _text_forward(self, encoded: dict[str, np.ndarray]) -> np.ndarray:
        feed = {
            k: v.astype(np.int64, copy=False) for k, v in encoded.items() if k in self._text_inputs
        }
        (vectors,) = self._text.run(None, feed)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def _image_forward(self, images: Sequence[PreparedImage]) -> list[np.ndarray | Exception]:
        arrays = [x for x in images if not isinstance(x, EncodedJpeg)]
        if len(arrays) != len(images):
            raise TypeError("the onnx runtime takes decoded images only")
        pixels = self.pipeline.to_tensor(arrays, "cpu", _float32()).numpy()
        (vectors,) = self._image.run(None, {self._image_input: pixels})
        return list(np.ascontiguousarray(vectors, dtype=np.float32))


def _float32() -> Any:
    import torch

    return torch.float32
