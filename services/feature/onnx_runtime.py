"""The ``onnx`` runtime: ONNX Runtime over a folder written by ``export_onnx``.

The folder holds ``text.onnx`` and ``image.onnx`` (each tower with its projection and the L2
normalisation, so a session's output is the final vector; float32 weights), for an int8 export
``text.int8.onnx`` and/or ``image.int8.onnx`` beside them, the tokenizer, the image processor, the
model's ``config.json``, ``parity_probe.npz`` and ``feature_onnx.json``, which records the source
model's id: the vectors are the same model's (cosine >= 0.999 against PyTorch), so they carry the
same id and can be searched against a collection built with PyTorch.

That bound is checked at every load, tower by tower, on the serving machine, against the probe's
float32 PyTorch vectors (``parity``). An int8 tower that misses it there runs from its float32
file instead, with a warning and the reason in ``/model``; a float32 tower that misses it stops
the load.
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
from services.feature.parity import (
    PARITY,
    PROBE_FILE,
    TOWERS,
    Probe,
    fallback_reason,
)

log = logging.getLogger(__name__)


def tower_file(tower: str, weights: str = "float32") -> str:
    """``text.onnx`` / ``image.onnx`` (float32), ``text.int8.onnx`` / ``image.int8.onnx``."""
    return f"{tower}.onnx" if weights == "float32" else f"{tower}.{weights}.onnx"


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
        sessions: dict[str, Any],
        *,
        tokenizer: Any,
        image_processor: Any,
        config: Any,
        model_id: str,
        device: str,
        weights: dict[str, str],
        batch_size: int = 64,
        jpeg_draft: bool = True,
    ) -> None:
        super().__init__(
            tokenizer=tokenizer,
            image_processor=image_processor,
            config=config,
            model_id=model_id,
            device=device,
            precisions=weights,
            batch_size=batch_size,
            jpeg_draft=jpeg_draft,
        )
        self._sessions = sessions
        # The exporter drops inputs a graph does not use (token_type_ids, often).
        self._text_inputs = {i.name for i in sessions["text"].get_inputs()}
        self._image_input = sessions["image"].get_inputs()[0].name

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
        """Load an export folder, warm it up and check each tower's parity. Blocking."""
        started = time.perf_counter()
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            raise ModelLoadError("runtime 'onnx' needs the onnxruntime package") from exc
        folder = Path(path)
        manifest = read_manifest(folder)
        weights = {
            tower: str(manifest.get("weights", {}).get(tower, "float32")) for tower in TOWERS
        }
        device = resolve_device(device)
        probe = _read_probe(folder / PROBE_FILE)
        for tower, kind in weights.items():
            if not (folder / tower_file(tower, kind)).is_file():
                raise ModelLoadError(
                    f"{path} has no {tower_file(tower, kind)} (an export of an earlier version): "
                    "export it again with python -m services.feature.export_onnx"
                )
        try:
            config = AutoConfig.from_pretrained(str(folder))
            tokenizer = load_tokenizer(str(folder))
            image_processor = load_image_processor(str(folder))
            sessions = {
                tower: _session(folder / tower_file(tower, kind), device, threads)
                for tower, kind in weights.items()
            }
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"cannot load the ONNX export {path!r}: {exc}") from exc
        embedder = cls(
            sessions,
            tokenizer=tokenizer,
            image_processor=image_processor,
            config=config,
            model_id=model_id or str(manifest["model_id"]),
            device=device,
            weights=weights,
            batch_size=batch_size,
            jpeg_draft=jpeg_draft,
        )
        embedder.warm_up()
        cosines = embedder.probe_cosines(probe)
        for tower, cosine in cosines.items():
            if cosine >= PARITY or weights[tower] == "float32":
                continue
            reason = fallback_reason(weights[tower], cosine)
            log.warning("the %s tower runs in float32: %s", tower, reason)
            embedder.fall_back(tower, _session(folder / tower_file(tower), device, threads), reason)
            cosines[tower] = embedder.probe_cosines(probe)[tower]
        if min(cosines.values()) < PARITY:
            raise ModelLoadError(
                f"the ONNX export's vectors differ from PyTorch's on this machine: {cosines} "
                f"(minimum cosine {PARITY})"
            )
        embedder.parity = cosines
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

    def fall_back(self, tower: str, session: Any, reason: str) -> None:
        """Serve ``tower`` from its float32 graph from now on."""
        with self._lock:
            self._sessions[tower] = session
            self.set_precision(tower, "float32", reason)

    def _text_forward(self, encoded: dict[str, np.ndarray]) -> np.ndarray:
        feed = {
            k: v.astype(np.int64, copy=False) for k, v in encoded.items() if k in self._text_inputs
        }
        (vectors,) = self._sessions["text"].run(None, feed)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def _image_forward(self, images: Sequence[PreparedImage]) -> list[np.ndarray | Exception]:
        arrays = [x for x in images if not isinstance(x, EncodedJpeg)]
        if len(arrays) != len(images):
            raise TypeError("the onnx runtime takes decoded images only")
        pixels = self.pipeline.to_tensor(arrays, "cpu", _float32()).numpy()
        (vectors,) = self._sessions["image"].run(None, {self._image_input: pixels})
        return list(np.ascontiguousarray(vectors, dtype=np.float32))


def _read_probe(path: Path) -> Probe:
    if not path.is_file():
        raise ModelLoadError(
            f"{path.parent} has no {path.name} (an export of an earlier version): export it "
            "again with python -m services.feature.export_onnx"
        )
    try:
        return Probe.load(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"the export's parity probe {path} is unreadable: {exc}") from exc


def _float32() -> Any:
    import torch

    return torch.float32
