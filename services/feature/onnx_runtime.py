"""The ``onnx`` runtime: ONNX Runtime over a folder written by ``export_onnx``.

The folder holds ``text.onnx`` and ``image.onnx`` (each tower with its projection and the L2
normalisation, so a session's output is the final vector; fp32 or int8 weights), the tokenizer,
the image processor, the model's ``config.json``, ``parity_probe.npz`` and ``feature_onnx.json``,
which records the source model's id: the vectors are the same model's (cosine >= 0.999 against
PyTorch), so they carry the same id and can be searched against a collection built with PyTorch.

That bound is checked at every load, on the serving machine, against the probe's fp32 PyTorch
vectors: integer kernels differ between processors (AVX-512 VNNI, AVX2, ARM), so an export that
passed where it was written is not taken on trust elsewhere.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
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
PARITY_PROBE = "parity_probe.npz"
# Minimum cosine with fp32 PyTorch's vector for the same input.
PARITY = 0.999


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
    # Idle pool threads sleep instead of spinning: the decode threads and the HTTP layer need
    # those cores between operators (the same reason the service sets OMP_WAIT_POLICY=PASSIVE).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
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
        weights: str = "float32",
        batch_size: int = 64,
        jpeg_draft: bool = True,
    ) -> None:
        super().__init__(
            tokenizer=tokenizer,
            image_processor=image_processor,
            config=config,
            model_id=model_id,
            device=device,
            dtype=weights,
            batch_size=batch_size,
            jpeg_draft=jpeg_draft,
        )
        self._text = text_session
        self._image = image_session
        # The exporter drops inputs a graph does not use (token_type_ids, often).
        self._text_inputs = {i.name for i in text_session.get_inputs()}
        self._image_input = image_session.get_inputs()[0].name
        self.parity: dict[str, float] = {}

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
            weights=_describe_weights(manifest.get("weights", {})),
            batch_size=batch_size,
            jpeg_draft=jpeg_draft,
        )
        embedder.warm_up()
        embedder.parity = check_parity(embedder, folder / PARITY_PROBE)
        log.info(
            "loaded ONNX export of %s (%s weights) on %s, dim %d, parity %s, in %.1fs",
            embedder.model_id,
            embedder.dtype,
            device,
            embedder.dim,
            embedder.parity,
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


def _describe_weights(weights: dict[str, str]) -> str:
    """``int8`` or ``float32`` when both towers agree, else e.g. ``int8 (image), float32 (text)``."""
    kinds = set(weights.values()) or {"float32"}
    if len(kinds) == 1:
        return kinds.pop()
    return ", ".join(f"{kind} ({tower})" for tower, kind in sorted(weights.items()))


def check_parity(embedder: BaseEmbedder, probe: Path) -> dict[str, float]:
    """Minimum cosine between ``embedder``'s vectors and the probe's fp32 PyTorch vectors for
    the same texts and images; raises ``ModelLoadError`` below ``PARITY``."""
    if not probe.is_file():
        raise ModelLoadError(
            f"{probe.parent} has no {probe.name} (an export of an earlier version): export it "
            "again with python -m services.feature.export_onnx"
        )
    try:
        with np.load(probe) as saved:
            data = {key: saved[key] for key in saved.files}
        texts = [str(t) for t in data["texts"]]
        images = [Image.fromarray(data[f"image_{i}"]) for i in range(len(data["image_vectors"]))]
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"the export's parity probe {probe} is unreadable: {exc}") from exc
    result = {
        "text_min_cosine": float(
            np.min(np.sum(embedder.embed_texts(texts).vectors * data["text_vectors"], axis=1))
        ),
        "image_min_cosine": float(
            np.min(np.sum(embedder.embed_images(images) * data["image_vectors"], axis=1))
        ),
    }
    if min(result.values()) < PARITY:
        raise ModelLoadError(
            f"the ONNX export's vectors differ from PyTorch's on this machine: {result} "
            f"(minimum cosine {PARITY})"
        )
    return result


def _float32() -> Any:
    import torch

    return torch.float32
