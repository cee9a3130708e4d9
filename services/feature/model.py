"""The model behind the feature service: any transformers checkpoint with ``get_text_features``
and ``get_image_features`` (CLIPModel, SiglipModel, VisionTextDualEncoderModel and their kin),
loaded through the Auto classes, and run by one of several runtimes:

- ``torch``: PyTorch in float32 (CPU or CUDA);
- ``torch-bf16``: bfloat16 autocast on CPUs that support it (matmuls in bf16, norms and
  softmax in fp32; a tower whose vectors miss the parity bound against float32 at load runs
  without it), bfloat16 weights on CUDA;
- ``torch-fp16``: float16 weights, CUDA only;
- ``onnx``: ONNX Runtime over a folder written by ``python -m services.feature.export_onnx``
  (see ``onnx_runtime``).

Vectors come out float32 and L2-normalised whatever the compute dtype. Texts longer than the
model's context are truncated, and reported as such.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

from services.feature.parity import PARITY, TOWERS, Probe, fallback_reason, min_cosine
from services.feature.preprocess import (
    DeviceJpegDecoder,
    FastPipeline,
    ImagePipeline,
    make_pipeline,
    resize_crop_tensor,
)

log = logging.getLogger(__name__)

# A real text tokenizer has thousands of tokens; a handful means transformers quietly built an
# empty one (a folder without tokenizer files), which would embed every text the same.
MIN_VOCAB_SIZE = 1000
# Longer inputs are cut before tokenising, so a megabyte of text costs no more than a page.
# No real token spans this many characters (only runs of whitespace could, and they collapse).
_MAX_CHARS_PER_TOKEN = 64

RUNTIMES = ("torch", "torch-bf16", "torch-fp16", "onnx")
ONNX_MANIFEST = "feature_onnx.json"


class ModelLoadError(RuntimeError):
    """The model, its tokenizer or its image processor could not be loaded or is unusable."""


@dataclass(frozen=True)
class TextEmbeddings:
    vectors: np.ndarray  # [n, dim] float32, unit norm
    truncated: list[bool]


@dataclass(frozen=True)
class EncodedJpeg:
    """An image left encoded for the model's device to decode (CUDA with nvJPEG)."""

    data: bytes
    name: str
    max_pixels: int  # the limit it was admitted under, for a fallback decode with Pillow


# What an image is between decoding and the forward pass: a prepared array, or JPEG bytes.
PreparedImage = np.ndarray | EncodedJpeg


class Embedder(Protocol):
    """What the service needs from a model; tests may substitute a fake."""

    model_id: str
    dim: int
    image_size: int
    max_text_tokens: int
    device: str
    dtype: str
    runtime: str
    architecture: str
    #: Towers running in float32 where the runtime offers less, with the reason.
    fallbacks: dict[str, str]
    ready: bool
    #: Whether ``embed_prepared`` accepts ``EncodedJpeg`` (decoding on the device).
    decodes_jpeg: bool

    def draft_size(self, width: int, height: int) -> tuple[int, int] | None: ...

    def prepare_image(self, image: Image.Image) -> np.ndarray: ...

    def embed_texts(self, texts: Sequence[str]) -> TextEmbeddings: ...

    def embed_prepared(self, images: Sequence[PreparedImage]) -> list[np.ndarray | Exception]: ...

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray: ...


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was requested but CUDA is not available")
    return device


def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bfloat16 arithmetic (AVX512-BF16 or AMX), which oneDNN uses
    under autocast; without it bf16 is emulated and slower than fp32."""
    try:
        return bool(
            torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        )
    except (AttributeError, RuntimeError):
        return False


def is_onnx_export(path: str | Path) -> bool:
    return (Path(path) / ONNX_MANIFEST).is_file()


def resolve_runtime(runtime: str, device: str, model: str) -> str:
    """The concrete runtime for a setting (``auto`` included) on a resolved device. ``auto``
    takes the fastest runtime this processor runs natively: an ONNX export as it is (its int8
    towers where they keep parity), fp16 on CUDA, bf16 autocast on a CPU with native bfloat16
    (AVX512-BF16 or AMX; each tower still checked against float32 at load), else float32."""
    if runtime == "auto":
        if is_onnx_export(model):
            return "onnx"
        if device == "cuda":
            return "torch-fp16"
        return "torch-bf16" if cpu_supports_bf16() else "torch"
    if runtime not in RUNTIMES:
        raise ModelLoadError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if runtime == "torch-fp16" and device != "cuda":
        raise ModelLoadError("runtime 'torch-fp16' needs CUDA; on a CPU use 'torch-bf16'")
    if runtime == "torch-bf16" and device == "cpu" and not cpu_supports_bf16():
        raise ModelLoadError(
            "runtime 'torch-bf16' needs a CPU with bfloat16 support (AVX512-BF16 or AMX); "
            "use 'torch' or 'onnx'"
        )
    if runtime == "onnx" and not is_onnx_export(model):
        raise ModelLoadError(
            f"{model!r} is not an ONNX export (no {ONNX_MANIFEST}); write one with "
            f"python -m services.feature.export_onnx --model {model} --out DIR"
        )
    return runtime


def pooled(output: Any) -> torch.Tensor:
    """The projected features from ``get_*_features``: transformers 5 returns an output object
    whose ``pooler_output`` holds them; older versions (and some models) the tensor itself."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("pooler_output", "text_embeds", "image_embeds"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"cannot find features in a {type(output).__name__}")


def _normalised(features: torch.Tensor) -> np.ndarray:
    return F.normalize(features.float(), dim=-1).cpu().numpy().astype(np.float32, copy=False)


def load_tokenizer(name: str) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(name)
    if len(tokenizer) < MIN_VOCAB_SIZE:
        raise ModelLoadError(
            f"the tokenizer of {name!r} has only {len(tokenizer)} tokens: its files are missing"
        )
    return tokenizer


def load_image_processor(name: str) -> Any:
    # The Pillow backend everywhere: the torchvision one is unusable without torchvision, and
    # one backend on every machine keeps the pixels, hence the vectors, the same.
    try:
        return AutoImageProcessor.from_pretrained(name, backend="pil")
    except (TypeError, ValueError):  # an older transformers without backends
        return AutoImageProcessor.from_pretrained(name)


class BaseEmbedder:
    """Tokenising, truncation, image preparation and warm-up, shared by every runtime; a runtime
    implements ``_text_forward`` and ``_image_forward``. Thread-safe: one forward pass at a time
    (each pass already spreads over the configured threads)."""

    runtime = "torch"
    decodes_jpeg = False

    def __init__(
        self,
        *,
        tokenizer: Any,
        image_processor: Any,
        config: Any,
        model_id: str,
        device: str,
        precisions: dict[str, str],
        batch_size: int = 64,
        jpeg_draft: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.model_id = model_id
        self.device = device
        # Per tower ("text", "image"): the compute precision, e.g. float32, bfloat16, int8.
        self.precisions = dict(precisions)
        # Towers moved to float32 because their lower precision missed the parity bound here.
        self.fallbacks: dict[str, str] = {}
        # Each tower's minimum cosine against float32 on the parity probe, where checked.
        self.parity: dict[str, float] = {}
        self.batch_size = batch_size
        self.architecture = _architecture(config)
        self.max_text_tokens = _max_text_tokens(config, tokenizer)
        self.image_size = _image_size(config, image_processor)
        self.pipeline: ImagePipeline = make_pipeline(
            image_processor, (self.image_size, self.image_size), jpeg_draft=jpeg_draft
        )
        # SigLIP-family models were trained on texts padded to the full length.
        model_type = str(getattr(config, "model_type", ""))
        self._text_padding = "max_length" if model_type.startswith("siglip") else "longest"
        self._lock = threading.Lock()
        self.dim = 0
        self.ready = False

    # --- what a runtime implements --------------------------------------------------------

    def _text_forward(self, encoded: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def _image_forward(self, images: Sequence[PreparedImage]) -> list[np.ndarray | Exception]:
        raise NotImplementedError

    # --- shared ---------------------------------------------------------------------------

    @property
    def dtype(self) -> str:
        """``int8`` when both towers agree, else e.g. ``int8 (image), float32 (text)``."""
        kinds = set(self.precisions.values())
        if len(kinds) == 1:
            return kinds.pop()
        return ", ".join(f"{kind} ({tower})" for tower, kind in sorted(self.precisions.items()))

    def set_precision(self, tower: str, precision: str, reason: str) -> None:
        self.precisions[tower] = precision
        self.fallbacks[tower] = reason

    def embed_probe(self, probe: Probe) -> Probe:
        """``probe`` with this embedder's vectors as its reference."""
        return dataclasses.replace(
            probe,
            text_vectors=self.embed_texts(probe.texts).vectors,
            image_vectors=self.embed_images(probe.pil_images()),
        )

    def probe_cosines(self, probe: Probe) -> dict[str, float]:
        """Each tower's minimum cosine against the probe's reference vectors."""
        ours = self.embed_probe(probe)
        return {tower: min_cosine(ours.vectors(tower), probe.vectors(tower)) for tower in TOWERS}

    def warm_up(self) -> None:
        """Passes of one and two inputs per modality: allocates buffers and kernels, fixes
        ``dim`` and proves the model works before the service reports ready."""
        text_dim = self.embed_texts(["warm-up"]).vectors.shape[1]
        self.embed_texts(["a warm-up text", "a longer warm-up text with padding"])
        blank = Image.new("RGB", (self.image_size, self.image_size), (255, 255, 255))
        image_dim = self.embed_images([blank]).shape[1]
        self.embed_images([blank, blank])
        if text_dim != image_dim:
            raise ModelLoadError(f"text ({text_dim}) and image ({image_dim}) dims differ")
        self.dim = int(text_dim)
        self.ready = True

    def draft_size(self, width: int, height: int) -> tuple[int, int] | None:
        return self.pipeline.draft_size(width, height)

    def prepare_image(self, image: Image.Image) -> np.ndarray:
        return self.pipeline.prepare(image)

    def embed_texts(self, texts: Sequence[str]) -> TextEmbeddings:
        max_chars = self.max_text_tokens * _MAX_CHARS_PER_TOKEN
        clipped = [t[:max_chars] for t in texts]
        chunks = []
        # The tokenizer is inside the lock too: a fast tokenizer used from two threads at once
        # fails ("Already borrowed") as each call resets its truncation and padding state.
        with self._lock:
            # Count tokens untruncated first: the only reliable truncation signal.
            encoded = self.tokenizer(clipped, truncation=False, verbose=False)["input_ids"]
            truncated = [
                len(text) > max_chars or len(ids) > self.max_text_tokens
                for text, ids in zip(texts, encoded, strict=True)
            ]
            for start in range(0, len(clipped), self.batch_size):
                batch = self.tokenizer(
                    clipped[start : start + self.batch_size],
                    padding=self._text_padding,
                    truncation=True,
                    max_length=self.max_text_tokens,
                    return_tensors="np",
                )
                chunks.append(self._text_forward(dict(batch)))
        return TextEmbeddings(np.concatenate(chunks), truncated)

    def embed_prepared(self, images: Sequence[PreparedImage]) -> list[np.ndarray | Exception]:
        """One vector (or the exception that stopped it) per prepared image."""
        rows: list[np.ndarray | Exception] = []
        with self._lock:
            for start in range(0, len(images), self.batch_size):
                rows.extend(self._image_forward(images[start : start + self.batch_size]))
        return rows

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        rows = self.embed_prepared([self.prepare_image(image) for image in images])
        for row in rows:
            if isinstance(row, Exception):
                raise row
        return np.stack(rows)  # type: ignore[arg-type]

    def info(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "dim": self.dim,
            "image_size": self.image_size,
            "max_text_tokens": self.max_text_tokens,
            "device": self.device,
            "dtype": self.dtype,
            "runtime": self.runtime,
            "architecture": self.architecture,
            "fallbacks": dict(self.fallbacks),
        }


class TransformersEmbedder(BaseEmbedder):
    """A transformers model run by PyTorch (runtimes ``torch``, ``torch-bf16``, ``torch-fp16``)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        image_processor: Any,
        *,
        model_id: str,
        device: str,
        runtime: str = "torch",
        batch_size: int = 64,
        jpeg_draft: bool = True,
        gpu_decode: bool = True,
    ) -> None:
        self.model = model
        self.runtime = runtime
        weights = next(model.parameters()).dtype
        # CPU bf16 keeps fp32 weights and lets autocast pick bf16 per operation, tower by tower
        # (a tower whose bf16 vectors miss the parity bound runs without it).
        self._autocast: set[str] = (
            set(TOWERS) if runtime == "torch-bf16" and device == "cpu" else set()
        )
        compute = torch.bfloat16 if self._autocast else weights
        self._input_dtype: torch.dtype = weights
        super().__init__(
            tokenizer=tokenizer,
            image_processor=image_processor,
            config=model.config,
            model_id=model_id,
            device=device,
            precisions=dict.fromkeys(TOWERS, str(compute).removeprefix("torch.")),
            batch_size=batch_size,
            jpeg_draft=jpeg_draft,
        )
        self._jpeg_decoder: DeviceJpegDecoder | None = None
        if (
            gpu_decode
            and isinstance(self.pipeline, FastPipeline)
            and DeviceJpegDecoder.available(device)
        ):
            self._jpeg_decoder = DeviceJpegDecoder(device)
            self.decodes_jpeg = True

    @classmethod
    def load(
        cls,
        name: str,
        *,
        model_id: str | None = None,
        device: str = "auto",
        runtime: str = "torch",
        torch_threads: int | None = None,
        batch_size: int = 64,
        jpeg_draft: bool = True,
        gpu_decode: bool = True,
    ) -> TransformersEmbedder:
        """Load ``name`` (hub id or local folder) and warm it up. Blocking: call it from a
        thread in async code. Float32 unless ``runtime`` says otherwise, so that evaluations
        and tests compute the same vectors on every processor; the service passes its
        setting (``auto`` by default) through ``load_embedder``."""
        started = time.perf_counter()
        if torch_threads:
            torch.set_num_threads(torch_threads)
        device = resolve_device(device)
        runtime = resolve_runtime(runtime, device, name)
        if runtime == "onnx":
            raise ModelLoadError("an ONNX export is loaded by OnnxEmbedder, not PyTorch")
        dtype = {"torch-fp16": torch.float16, "torch-bf16": torch.bfloat16}.get(
            runtime, torch.float32
        )
        if device == "cpu":
            dtype = torch.float32  # bf16 on a CPU is autocast over fp32 weights
        hf_logging.disable_progress_bar()
        try:
            model = AutoModel.from_pretrained(name, dtype=dtype)
            # Before the tokenizer and processor: a text-only model fails here, clearly.
            for method in ("get_text_features", "get_image_features"):
                if not callable(getattr(model, method, None)):
                    raise ModelLoadError(
                        f"{type(model).__name__} has no {method}: not a CLIP-like model"
                    )
            tokenizer = load_tokenizer(name)
            image_processor = load_image_processor(name)
        except (OSError, ValueError) as exc:
            hint = ""
            if not Path(name).exists() and name.startswith(("var/", "./", "/")):
                hint = (
                    f" (build the demo model: python -m crossmodal.demo build-model --out {name})"
                )
            raise ModelLoadError(f"cannot load model {name!r}: {exc}{hint}") from exc
        model.eval().to(device)
        embedder = cls(
            model,
            tokenizer,
            image_processor,
            model_id=model_id or default_model_id(name),
            device=device,
            runtime=runtime,
            batch_size=batch_size,
            jpeg_draft=jpeg_draft,
            gpu_decode=gpu_decode,
        )
        embedder.warm_up()
        if embedder._autocast:
            embedder.check_autocast()
        log.info(
            "loaded %s (%s) on %s, runtime %s (%s), dim %d, in %.1fs",
            embedder.model_id,
            embedder.architecture,
            device,
            runtime,
            embedder.dtype,
            embedder.dim,
            time.perf_counter() - started,
        )
        return embedder

    def check_autocast(self) -> None:
        """Keep bf16 autocast only for the towers whose vectors stay within the parity bound
        of this model's own float32 vectors, on the probe, on this processor."""
        autocast, self._autocast = self._autocast, set()
        reference = self.embed_probe(Probe.inputs())
        self._autocast = autocast
        self.parity = self.probe_cosines(reference)
        for tower, cosine in self.parity.items():
            if cosine < PARITY:
                reason = fallback_reason("bfloat16", cosine)
                log.warning("the %s tower runs in float32: %s", tower, reason)
                self._autocast.discard(tower)
                self.set_precision(tower, "float32", reason)
                self.parity[tower] = 1.0

    @contextlib.contextmanager
    def _inference(self, tower: str) -> Iterator[None]:
        with torch.inference_mode():
            if tower in self._autocast:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    yield
            else:
                yield

    def _text_forward(self, encoded: dict[str, np.ndarray]) -> np.ndarray:
        inputs = {k: torch.from_numpy(v).to(self.device) for k, v in encoded.items()}
        with self._inference("text"):
            return _normalised(pooled(self.model.get_text_features(**inputs)))

    def _image_forward(self, images: Sequence[PreparedImage]) -> list[np.ndarray | Exception]:
        rows: list[np.ndarray | Exception | None] = [None] * len(images)
        arrays = [(i, x) for i, x in enumerate(images) if isinstance(x, np.ndarray)]
        encoded = [(i, x) for i, x in enumerate(images) if isinstance(x, EncodedJpeg)]
        on_device: list[tuple[int, torch.Tensor]] = []
        if encoded:
            on_device, on_cpu, failures = self._decode_on_device(encoded)
            arrays.extend(on_cpu)
            for i, exc in failures:
                rows[i] = exc
        with self._inference("image"):
            if arrays:
                pixels = self.pipeline.to_tensor(
                    [x for _, x in arrays], self.device, self._input_dtype
                )
                vectors = _normalised(pooled(self.model.get_image_features(pixel_values=pixels)))
                for (i, _), vector in zip(arrays, vectors, strict=True):
                    rows[i] = vector
            if on_device:
                assert isinstance(self.pipeline, FastPipeline)
                pixels = self.pipeline.normalise(
                    torch.stack([t for _, t in on_device]), self._input_dtype
                )
                vectors = _normalised(pooled(self.model.get_image_features(pixel_values=pixels)))
                for (i, _), vector in zip(on_device, vectors, strict=True):
                    rows[i] = vector
        return rows  # type: ignore[return-value]

    def _decode_on_device(
        self, encoded: list[tuple[int, EncodedJpeg]]
    ) -> tuple[
        list[tuple[int, torch.Tensor]], list[tuple[int, np.ndarray]], list[tuple[int, Exception]]
    ]:
        """nvJPEG for the batch at once; if that fails, image by image, and whatever nvJPEG
        cannot decode (CMYK, lossless, corrupt) goes through Pillow instead, so it still works
        or fails alone, as a 422. Returns (on the GPU, prepared on the CPU, failures)."""
        from services.feature.images import decode_image

        decoder, pipeline = self._jpeg_decoder, self.pipeline
        assert decoder is not None and isinstance(pipeline, FastPipeline)
        try:
            decoded = decoder.decode([item.data for _, item in encoded])
            resized = [resize_crop_tensor(x, pipeline) for x in decoded]
            return [(i, x) for (i, _), x in zip(encoded, resized, strict=True)], [], []
        except Exception:
            log.debug("batched GPU JPEG decoding failed; trying image by image", exc_info=True)
        on_device, on_cpu, failures = [], [], []
        for i, item in encoded:
            try:
                (pixels,) = decoder.decode([item.data])
                on_device.append((i, resize_crop_tensor(pixels, pipeline)))
                continue
            except Exception:
                pass
            try:
                image = decode_image(
                    item.data, max_bytes=len(item.data), max_pixels=item.max_pixels, name=item.name
                )
                on_cpu.append((i, self.prepare_image(image)))
            except Exception as exc:
                failures.append((i, exc))
        return on_device, on_cpu, failures


def load_embedder(
    name: str,
    *,
    model_id: str | None = None,
    device: str = "auto",
    runtime: str = "auto",
    torch_threads: int | None = None,
    batch_size: int = 64,
    jpeg_draft: bool = True,
    gpu_decode: bool = True,
) -> BaseEmbedder:
    """Load ``name`` with the runtime its settings ask for, warmed up. Blocking."""
    resolved = resolve_runtime(runtime, resolve_device(device), name)
    if resolved == "onnx":
        from services.feature.onnx_runtime import OnnxEmbedder

        return OnnxEmbedder.load(
            name,
            model_id=model_id,
            device=device,
            threads=torch_threads,
            batch_size=batch_size,
            jpeg_draft=jpeg_draft,
        )
    return TransformersEmbedder.load(
        name,
        model_id=model_id,
        device=device,
        runtime=resolved,
        torch_threads=torch_threads,
        batch_size=batch_size,
        jpeg_draft=jpeg_draft,
        gpu_decode=gpu_decode,
    )


def _architecture(config: Any) -> str:
    architectures = getattr(config, "architectures", None) or []
    return str(architectures[0]) if architectures else str(getattr(config, "model_type", ""))


def _max_text_tokens(config: Any, tokenizer: Any) -> int:
    # The position table is the hard limit; a tokenizer without model_max_length reports a
    # huge sentinel value, so it only counts when it is smaller.
    candidates = []
    text_config = getattr(config, "text_config", None)
    positions = getattr(text_config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        candidates.append(positions)
    tokenizer_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_max, int) and 0 < tokenizer_max < 100_000:
        candidates.append(tokenizer_max)
    if not candidates:
        raise ModelLoadError("cannot tell the model's maximum text length")
    return min(candidates)


def _image_size(config: Any, image_processor: Any) -> int:
    size = getattr(getattr(config, "vision_config", None), "image_size", None)
    if isinstance(size, (list, tuple)):
        size = size[0]
    if isinstance(size, int) and size > 0:
        return size
    crop = getattr(image_processor, "crop_size", None) or {}
    return int(crop.get("height", 224))


def default_model_id(name: str) -> str:
    """A hub name stands for itself. A local folder is named by its weights' content, not its
    path: the same checkpoint mounted elsewhere keeps its id, and retrained weights get a new one,
    so vectors of two trainings are never mixed."""
    folder = Path(name)
    if not folder.is_dir():
        return name
    digest = hashlib.sha256()
    weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    for path in weights or [folder / "config.json"]:
        digest.update(path.name.encode())
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return f"{folder.resolve().name}@{digest.hexdigest()[:12]}"
