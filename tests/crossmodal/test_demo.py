"""The offline demo: tokenizer, tiny CLIP folder, synthetic shapes and the trained model."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer, CLIPModel

from crossmodal.demo import ensure_demo_model, ensure_random_model, is_finished_model
from crossmodal.demo.__main__ import main
from crossmodal.demo.build import read_info
from crossmodal.demo.shapes import COLOURS, MANIFEST, SHAPES, demo_collection, render
from crossmodal.demo.tokenizer import VOCAB_SIZE, load_tokenizer
from crossmodal.demo.train import TrainingFailed, evaluate, train


def test_tokenizer_is_clips_with_the_full_vocabulary(demo_model_dir: Path) -> None:
    tokenizer = load_tokenizer(demo_model_dir)
    assert len(tokenizer) == VOCAB_SIZE == 49408
    # The same ids OpenAI's CLIP tokenizer gives (openai/clip-vit-base-patch32).
    assert tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    ids = tokenizer("A Red   Circle")["input_ids"]
    assert ids == [49406, 320, 736, 7117, 49407]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a red circle"
    for text in ("a photo of a purple star", "pink triangle"):
        assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text


def test_tokenizer_truncates_to_the_models_context(demo_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    config = AutoConfig.from_pretrained(demo_model_dir)
    assert tokenizer.model_max_length == config.text_config.max_position_embeddings
    ids = tokenizer("word " * 200, truncation=True)["input_ids"]
    assert len(ids) == tokenizer.model_max_length
    assert ids[0] == 49406 and ids[-1] == 49407


def test_model_folder_loads_like_a_hub_checkpoint(random_model_dir: Path) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.json", "merges.txt"):
        assert (random_model_dir / name).is_file(), name
    model = AutoModel.from_pretrained(random_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(random_model_dir)
    processor = AutoImageProcessor.from_pretrained(random_model_dir)
    assert isinstance(model, CLIPModel)
    assert len(tokenizer) == VOCAB_SIZE
    size = model.config.vision_config.image_size
    pixels = processor(images=[render("red", "circle")], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, size, size)
    with torch.inference_mode():
        image = model.get_image_features(pixel_values=pixels).pooler_output
        text = model.get_text_features(**tokenizer(["a red circle"], return_tensors="pt"))
    assert image.shape == text.pooler_output.shape == (1, model.config.projection_dim)


def test_trained_model_aligns_text_and_images(demo_model_dir: Path) -> None:
    model = AutoModel.from_pretrained(demo_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    processor = AutoImageProcessor.from_pretrained(demo_model_dir)
    items = demo_collection()
    with torch.inference_mode():
        pixels = processor(images=[i.image for i in items], return_tensors="pt")["pixel_values"]
        images = model.get_image_features(pixel_values=pixels).pooler_output
        text = model.get_text_features(**tokenizer(["a red circle"], return_tensors="pt"))
    images = torch.nn.functional.normalize(images, dim=-1)
    query = torch.nn.functional.normalize(text.pooler_output, dim=-1)
    ranking = (query @ images.T)[0].argsort(descending=True).tolist()
    assert items[ranking[0]].caption == "a red circle"

    t2i, i2t = evaluate(model, tokenizer)
    assert t2i >= 0.9 and i2t >= 0.8
    info = read_info(demo_model_dir)
    assert info["kind"] == "trained" and info["text_to_image_top1"] >= 0.9


def test_alignment_check_can_fail(random_model_dir: Path) -> None:
    # An untrained model must not pass the check the trained one passes.
    model = AutoModel.from_pretrained(random_model_dir)
    t2i, _ = evaluate(model, load_tokenizer(random_model_dir))
    assert t2i < 0.5
    with pytest.raises(TrainingFailed):
        train(steps=1, rounds=1)


def test_ensure_demo_model_skips_a_finished_folder(demo_model_dir: Path) -> None:
    before = (demo_model_dir / "model.safetensors").stat().st_mtime_ns
    started = time.perf_counter()
    assert ensure_demo_model(demo_model_dir) == demo_model_dir
    assert main(["build-model", "--out", str(demo_model_dir)]) == 0
    assert time.perf_counter() - started < 2
    assert (demo_model_dir / "model.safetensors").stat().st_mtime_ns == before


def test_builder_never_replaces_a_foreign_folder(tmp_path: Path) -> None:
    foreign = tmp_path / "model"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        ensure_random_model(foreign)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_random_model_build_is_atomic_and_idempotent(tmp_path: Path) -> None:
    target = tmp_path / "model"
    assert ensure_random_model(target) == target
    assert is_finished_model(target)
    assert not list(tmp_path.glob("model.tmp-*"))
    first = (target / "model.safetensors").read_bytes()
    ensure_random_model(target, seed=1)  # finished already: left alone
    assert (target / "model.safetensors").read_bytes() == first
    ensure_random_model(target, seed=1, force=True)
    assert (target / "model.safetensors").read_bytes() != first
    assert read_info(target)["seed"] == 1


def test_demo_collection_is_deterministic() -> None:
    first, second = demo_collection(), demo_collection()
    assert len(first) == len(COLOURS) * len(SHAPES) == 32
    assert len({i.caption for i in first}) == 32
    for a, b in zip(first, second, strict=True):
        assert a.caption == b.caption
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    # Every concept is visibly different from the others.
    arrays = [np.asarray(i.image, dtype=np.int16) for i in first]
    assert all(np.abs(arrays[0] - other).max() > 100 for other in arrays[1:])


def test_write_collection(tmp_path: Path) -> None:
    assert main(["write-collection", "--out", str(tmp_path)]) == 0
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert len(manifest) == 32
    entry = next(e for e in manifest if e["attributes"] == {"colour": "red", "shape": "circle"})
    assert entry["file"] == "red-circle.png"
    assert entry["captions"][0] == "a red circle"
    assert all((tmp_path / e["file"]).is_file() for e in manifest)


def test_the_served_export_is_made_once_and_replaced_for_other_weights(
    demo_model_dir: Path, tmp_path: Path
) -> None:
    """What `make run` serves: the demo model's ONNX export, made once and reused."""
    from crossmodal.demo.emoji_model import ensure_served_export
    from services.feature.model import ONNX_MANIFEST, default_model_id, resolve_runtime

    out = tmp_path / "export"
    assert ensure_served_export(demo_model_dir, out) == out
    manifest_path = out / ONNX_MANIFEST
    manifest = json.loads(manifest_path.read_text())
    # The export's vectors carry the checkpoint's id: a collection indexed with either serves.
    assert manifest["model_id"] == default_model_id(str(demo_model_dir))
    assert manifest["weights"]["image"] == "int8"
    assert resolve_runtime("auto", "cpu", str(out)) == "onnx"
    assert not out.with_name("export.tmp").exists()
    made = manifest_path.stat().st_mtime_ns
    ensure_served_export(demo_model_dir, out)
    assert manifest_path.stat().st_mtime_ns == made  # reused, not made again
    # The export of other weights, or one made without int8, is replaced.
    for stale in ({"model_id": "other-weights"}, {"quantize": None}):
        manifest_path.write_text(json.dumps({**manifest, **stale}))
        ensure_served_export(demo_model_dir, out)
        remade = json.loads(manifest_path.read_text())
        assert (remade["model_id"], remade["quantize"]) == (manifest["model_id"], "int8")
    # A folder that is not an export is never deleted.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        ensure_served_export(demo_model_dir, foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
