"""The emoji demo: the OpenMoji collection, the concept split, the dual encoder built from a
small ViT and the packaged MiniLM, and the shipped demo model's quality."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from crossmodal.data.records import load_records
from crossmodal.demo.emoji import (
    IMAGE_SIZE,
    catalogue,
    concept_split,
    demo_set,
    display_name,
    is_drawn,
    render,
    write_collection,
)
from crossmodal.demo.emoji_groups import concept_key


def _by_char() -> dict[str, object]:
    return {e.char: e for e in catalogue()}


def test_catalogue_names_groups_and_concepts() -> None:
    emoji = catalogue()
    assert len(emoji) > 3900  # every fully-qualified emoji OpenMoji draws (3944 in v17)
    assert len({e.name for e in emoji}) == len(emoji)
    assert len({e.file for e in emoji}) == len(emoji)
    by_char = _by_char()
    assert by_char["🍕"].name == "pizza"  # type: ignore[attr-defined]
    assert by_char["🍕"].group == "Food & Drink"  # type: ignore[attr-defined]
    assert by_char["❤️"].name == "red heart"  # type: ignore[attr-defined]
    assert by_char["😢"].subgroup == "face-concerned"  # type: ignore[attr-defined]
    assert by_char["🇫🇷"].name == "flag: France"  # type: ignore[attr-defined]
    assert (
        display_name("🏴\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f", ":Scotland:")
        == "flag: Scotland"
    )
    assert concept_key("👋🏽") == concept_key("👋") == by_char["👋🏿"].concept  # type: ignore[attr-defined]


def test_demo_set_is_every_emoji_without_skin_tone_variants() -> None:
    demo = demo_set()
    assert not any(e.has_skin_tone for e in demo)
    # A dozen concepts exist only with skin tones (two people of given tones holding hands).
    toned_only = {e.concept for e in catalogue()} - {e.concept for e in demo}
    assert 0 < len(toned_only) < 20
    assert all(e.has_skin_tone for e in catalogue() if e.concept in toned_only)
    assert len(demo) == len({e.concept for e in demo}) > 1800  # one emoji per concept


def test_split_keeps_every_skin_tone_variant_with_its_concept() -> None:
    sides = concept_split(catalogue())
    concepts = {side: {e.concept for e in items} for side, items in sides.items()}
    assert not concepts["train"] & concepts["test"]
    assert not concepts["train"] & concepts["val"]
    assert not concepts["val"] & concepts["test"]
    assert sum(len(v) for v in sides.values()) == len(catalogue())
    waving = {side for side, items in sides.items() for e in items if e.concept == "👋"}
    assert len(waving) == 1
    share = len(sides["test"]) / len(catalogue())
    assert 0.08 < share < 0.25
    assert concept_split(catalogue()) == sides  # deterministic


def test_render_is_deterministic_coloured_and_square() -> None:
    first, again = render("🍕"), render("🍕")
    assert first.size == (IMAGE_SIZE, IMAGE_SIZE) and first.mode == "RGB"
    assert np.array_equal(np.asarray(first), np.asarray(again))
    pixels = np.asarray(first, dtype=np.int16)
    assert (pixels.max(axis=2) - pixels.min(axis=2)).max() > 100  # in colour, not greyscale
    # Skin tones differ in colour only: their images must differ.
    assert not np.array_equal(np.asarray(render("👋🏻")), np.asarray(render("👋🏿")))
    assert is_drawn("🍕") and not is_drawn("\U000f0000")  # a private-use code point


def test_write_collection_manifest_loads_as_training_data(tmp_path: Path) -> None:
    subset = [e for e in catalogue() if e.char in ("🍕", "😢", "❤️")]
    manifest = write_collection(tmp_path, subset)
    entries = json.loads(manifest.read_text())
    assert [e["captions"] for e in entries] == [[e.name] for e in subset]
    assert entries[0]["attributes"].keys() == {"emoji", "group", "subgroup", "concept"}
    records = load_records(manifest)
    assert all(r.path.is_file() for r in records)


def test_dual_encoder_folder_loads_in_the_feature_service(tmp_path: Path) -> None:
    from crossmodal.train.dual_encoder import VisionShape, build_dual_encoder
    from services.feature.model import TransformersEmbedder

    shape = VisionShape(image_size=16, patch_size=8, hidden_size=32, layers=1, heads=1)
    folder = build_dual_encoder(tmp_path / "m", vision=shape, projection_dim=24)
    embedder = TransformersEmbedder.load(str(folder), device="cpu")
    assert (embedder.dim, embedder.image_size) == (24, 16)
    vectors = embedder.embed_texts(["pizza", "red heart"]).vectors
    assert vectors.shape == (2, 24)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)


@pytest.fixture(scope="module")
def shipped_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from crossmodal.demo.emoji_model import ensure_emoji_model

    return ensure_emoji_model(tmp_path_factory.mktemp("emoji") / "model")


def test_shipped_model_finds_emoji_by_name_and_names_by_emoji(
    shipped_model: Path, tmp_path: Path
) -> None:
    from crossmodal.evaluate.run import evaluate_embedder
    from services.feature.model import TransformersEmbedder

    embedder = TransformersEmbedder.load(str(shipped_model), device="cpu")
    # Every 4th emoji of the demo collection plus the README's examples: ~480 images.
    wanted = {"🍕", "😢", "❤️"}
    subset = [e for i, e in enumerate(demo_set()) if i % 4 == 0 or e.char in wanted]
    records = load_records(write_collection(tmp_path, subset))
    result = evaluate_embedder(embedder, records)
    assert result.recall["text_to_image"]["R@1"] >= 0.8
    assert result.recall["image_to_text"]["R@1"] >= 0.8

    images = embedder.embed_images([render(e.char) for e in subset])
    for query in ("pizza", "crying face", "red heart"):
        top = int(np.argmax(images @ embedder.embed_texts([query]).vectors[0]))
        assert subset[top].name == query


def test_assembling_refuses_a_foreign_folder_and_another_text_encoder(tmp_path: Path) -> None:
    import shutil

    from crossmodal.demo.emoji_model import SHIPPED_WEIGHTS, ensure_emoji_model

    foreign = tmp_path / "model"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        ensure_emoji_model(foreign)
    assert (foreign / "notes.txt").read_text() == "mine"

    weights = tmp_path / "weights"
    shutil.copytree(SHIPPED_WEIGHTS, weights)
    info = json.loads((weights / "training.json").read_text())
    info["text_encoder_sha256"] = "0" * 64
    (weights / "training.json").write_text(json.dumps(info))
    with pytest.raises(RuntimeError, match="not the text encoder"):
        ensure_emoji_model(tmp_path / "other", weights=weights)
    assert not (tmp_path / "other").exists()
