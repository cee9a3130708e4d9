"""Export a CLIP-family checkpoint for the ``onnx`` runtime.

    python -m services.feature.export_onnx --model var/demo/model --out var/demo/model-onnx
    python -m services.feature.export_onnx --model var/demo/model --out DIR --quantize int8
    FEATURE_MODEL=var/demo/model-onnx FEATURE_RUNTIME=onnx python -m services.feature

Writes ``text.onnx`` and ``image.onnx`` (each tower with its projection and the L2
normalisation), the tokenizer, the image processor, ``config.json``, ``feature_onnx.json`` (the
source model's id, so vectors keep it) and ``parity_probe.npz`` (a few texts and images with
PyTorch's fp32 vectors for them), then loads the result with ONNX Runtime and checks it against
those vectors: the export fails unless every vector has cosine >= 0.999 with PyTorch's. The
runtime repeats that check at every load, on the machine that serves the export.

``--quantize int8`` adds ``text.int8.onnx`` and ``image.int8.onnx``: the weights of the matrix
multiplications as int8 (see ``int8``), their inputs quantised per batch at run time. A tower
keeps its int8 file only if it passes the parity probe here; the float32 files stay beside them,
so a serving machine where an int8 tower misses the bound runs that tower in float32.

Uses the TorchScript-based exporter (``dynamo=False``), which needs no extra package.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModel

from services.feature.int8 import quantize_int8
from services.feature.model import (
    ONNX_MANIFEST,
    ModelLoadError,
    TransformersEmbedder,
    default_model_id,
    load_image_processor,
    load_tokenizer,
    pooled,
)
from services.feature.onnx_runtime import OnnxEmbedder, tower_file
from services.feature.parity import PROBE_FILE, TOWERS, Probe

log = logging.getLogger(__name__)

OPSET = 17
QUANTIZATIONS = ("int8",)
_SAMPLE_TEXTS = ["a photo", "a much longer sample text, so that the batch needs padding"]


class _Tower(torch.nn.Module):
    """One tower as a graph: inputs in the given order -> unit-norm float32 vectors."""

    def __init__(self, model: Any, method: str, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.method = method
        self.names = names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        features = pooled(
            getattr(self.model, self.method)(**dict(zip(self.names, inputs, strict=True)))
        )
        return F.normalize(features.float(), dim=-1)


def export(
    model_name: str,
    out: Path,
    *,
    model_id: str | None = None,
    quantize: str | None = None,
    check: bool = True,
) -> dict[str, Any]:
    """Export ``model_name`` (hub id or folder) into ``out``; returns the manifest."""
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ModelLoadError(f"unknown quantization {quantize!r}; choose one of {QUANTIZATIONS}")
    started = time.perf_counter()
    # Eager attention traces into plain ops; the fused kernels' shortcuts (a mask skipped when
    # it is all ones in the example batch, say) would be frozen into the graph.
    model = AutoModel.from_pretrained(model_name, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    tokenizer = load_tokenizer(model_name)
    image_processor = load_image_processor(model_name)
    model_type = str(getattr(model.config, "model_type", ""))
    padding = "max_length" if model_type.startswith("siglip") else "longest"
    max_length = _max_length(model, tokenizer)
    sample = tokenizer(
        _SAMPLE_TEXTS, padding=padding, truncation=True, max_length=max_length, return_tensors="pt"
    )
    text_names = list(sample.keys())
    size = _image_size(model)
    pixels = torch.randn(2, 3, size, size)

    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about every Python-level shape check in transformers (all of them
        # constant for a given checkpoint), and torch about the exporter being the legacy one.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*aten::index.*")
        # In eval mode, wrappers too: the exporter restores the wrapper's mode afterwards, and a
        # fresh Module is in training mode, which would switch the model's dropout back on.
        torch.onnx.export(
            _Tower(model, "get_text_features", text_names).eval(),
            tuple(sample[name] for name in text_names),
            str(out / tower_file("text")),
            input_names=text_names,
            output_names=["text_embeds"],
            dynamic_axes={
                **{name: {0: "batch", 1: "sequence"} for name in text_names},
                "text_embeds": {0: "batch"},
            },
            opset_version=OPSET,
            dynamo=False,
        )
        torch.onnx.export(
            _Tower(model, "get_image_features", ["pixel_values"]).eval(),
            (pixels,),
            str(out / tower_file("image")),
            input_names=["pixel_values"],
            output_names=["image_embeds"],
            dynamic_axes={"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    model.eval()
    tokenizer.save_pretrained(str(out))
    image_processor.save_pretrained(str(out))
    model.config.save_pretrained(str(out))
    # The reference vectors as the service computes them with PyTorch in float32.
    reference = TransformersEmbedder(
        model, tokenizer, image_processor, model_id="reference", device="cpu"
    )
    reference.embed_probe(Probe.inputs()).save(out / PROBE_FILE)
    manifest: dict[str, Any] = {
        "model_id": model_id or default_model_id(model_name),
        "source": model_name,
        "architecture": type(model).__name__,
        "text_inputs": text_names,
        # What was asked (--quantize) and what each tower kept (weights).
        "quantize": quantize,
        "weights": {"text": "float32", "image": "float32"},
        "opset": OPSET,
        "torch": torch.__version__,
    }
    _write_manifest(out, manifest)
    if quantize == "int8":
        for tower in TOWERS:
            quantize_int8(out / tower_file(tower), out / tower_file(tower, "int8"))
            manifest["weights"][tower] = "int8"
        _write_manifest(out, manifest)
    if check:
        # Loading checks the parity probe tower by tower: below the bound an int8 tower falls
        # back to float32 (then its int8 file is dropped), a float32 one fails the export.
        onnx = OnnxEmbedder.load(str(out), threads=torch.get_num_threads())
        for tower, reason in onnx.fallbacks.items():
            log.warning("the %s tower stays float32: %s", tower, reason)
            (out / tower_file(tower, "int8")).unlink()
            manifest["weights"][tower] = "float32"
        manifest["parity"] = onnx.parity
        _write_manifest(out, manifest)
    log.info("exported %s to %s in %.1fs", model_name, out, time.perf_counter() - started)
    return manifest


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    (out / ONNX_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _max_length(model: Any, tokenizer: Any) -> int:
    positions = getattr(getattr(model.config, "text_config", None), "max_position_embeddings", 77)
    tokenizer_max = getattr(tokenizer, "model_max_length", positions)
    return min(int(positions), int(tokenizer_max) if tokenizer_max < 100_000 else int(positions))


def _image_size(model: Any) -> int:
    size = getattr(getattr(model.config, "vision_config", None), "image_size", 224)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.feature.export_onnx",
        description="Export a CLIP-family model for FEATURE_RUNTIME=onnx.",
    )
    parser.add_argument("--model", required=True, help="hub name or save_pretrained folder")
    parser.add_argument("--out", required=True, type=Path, help="folder to write the export to")
    parser.add_argument("--model-id", help="the id vectors carry (default: the source's id)")
    parser.add_argument(
        "--quantize",
        choices=QUANTIZATIONS,
        help="int8: int8 weights for the matrix products of each tower that stays within parity",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing export")
    parser.add_argument(
        "--no-check",
        action="store_true",
        help="skip the parity check here (the service still checks each tower at every load)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.out.exists() and any(args.out.iterdir()):
        if not args.force:
            parser.error(f"{args.out} is not empty; pass --force to replace it")
        if not (args.out / ONNX_MANIFEST).is_file():
            parser.error(f"{args.out} is not an ONNX export; refusing to delete it")
        shutil.rmtree(args.out)
    try:
        manifest = export(
            args.model,
            args.out,
            model_id=args.model_id,
            quantize=args.quantize,
            check=not args.no_check,
        )
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"out": str(args.out), **manifest}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
