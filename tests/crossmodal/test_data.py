"""Annotation formats, image decoding that skips broken files, and augmentation."""

from __future__ import annotations

import colorsys
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from crossmodal.data import (
    AnnotationError,
    Augment,
    PairDataset,
    SkippedImages,
    load_records,
    try_read_image,
    write_jsonl,
)


def _png(path: Path, colour: tuple[int, int, int] = (200, 30, 30)) -> Path:
    Image.new("RGB", (40, 30), colour).save(path)
    return path


def test_coco_captions(tmp_path: Path) -> None:
    _png(tmp_path / "000000000139.jpg")
    _png(tmp_path / "000000000285.jpg")
    coco = {
        "images": [
            {"id": 139, "file_name": "000000000139.jpg"},
            {"id": 285, "file_name": "000000000285.jpg"},
            {"id": 999, "file_name": "no-captions.jpg"},
        ],
        "annotations": [
            {"id": 1, "image_id": 139, "caption": "A woman in a kitchen. "},
            {"id": 2, "image_id": 285, "caption": "A big bear."},
            {"id": 3, "image_id": 139, "caption": "A room with a stove."},
        ],
    }
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    records = load_records(tmp_path / "captions.json")
    assert [r.key for r in records] == ["139", "285"]  # the caption-less image is dropped
    assert records[0].captions == ("A woman in a kitchen.", "A room with a stove.")
    assert records[0].path == tmp_path / "000000000139.jpg"


def test_tutorial_list_and_manifest(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (tmp_path / "tutorial.json").write_text(
        json.dumps([{"image_id": "cat01", "captions": ["a cat", "a sleeping cat"]}])
    )
    (tmp_path / "manifest.json").write_text(
        json.dumps([{"file": "red.png", "captions": ["red"], "attributes": {"colour": "red"}}])
    )
    tutorial = load_records(tmp_path / "tutorial.json", images)
    assert tutorial[0].path == images / "cat01.jpg"  # the tutorial's <image_id>.jpg layout
    assert tutorial[0].captions == ("a cat", "a sleeping cat")
    manifest = load_records(tmp_path / "manifest.json")
    assert manifest[0].attributes == {"colour": "red"}
    assert manifest[0].path == tmp_path / "red.png"


def test_jsonl_round_trip(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text(
        '{"image": "a.png", "caption": "one"}\n\n{"file": "b.png", "captions": ["two", " "]}\n'
    )
    records = load_records(tmp_path / "in.jsonl")
    assert [r.captions for r in records] == [("one",), ("two",)]
    out = write_jsonl(records, tmp_path / "out.jsonl", tmp_path)
    assert load_records(out) == records


def test_unknown_format_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text('{"foo": 1}')
    with pytest.raises(AnnotationError):
        load_records(tmp_path / "x.json")
    (tmp_path / "y.json").write_text('[{"captions": ["no image"]}]')
    with pytest.raises(AnnotationError, match="names no image"):
        load_records(tmp_path / "y.json")


def test_undecodable_images_are_skipped_and_counted(tmp_path: Path) -> None:
    _png(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "m.json").write_text(
        json.dumps(
            [
                {"file": "good.png", "captions": ["good"]},
                {"file": "broken.png", "captions": ["broken"]},
                {"file": "missing.png", "captions": ["missing"]},
            ]
        )
    )
    skipped = SkippedImages()
    records = load_records(tmp_path / "m.json")
    assert try_read_image(records[0].path, skipped) is not None
    assert try_read_image(records[1].path, skipped) is None
    assert try_read_image(records[2].path, skipped) is None
    assert len(skipped) == 2 and records[1].path in skipped

    from transformers import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size=16)
    dataset = PairDataset(records, processor, augment=Augment())
    batch = dataset.collate([dataset[i] for i in range(3)])
    assert batch.captions == ["good"]
    assert batch.pixels.shape == (1, 3, 16, 16)
    assert sorted(batch.skipped) == sorted(str(r.path) for r in records[1:])


def test_dataset_randomness_is_seeded_by_epoch_and_index(tmp_path: Path) -> None:
    from transformers import CLIPImageProcessorPil

    _png(tmp_path / "a.png")
    (tmp_path / "m.json").write_text(
        json.dumps([{"file": "a.png", "captions": [f"caption {i}" for i in range(8)]}])
    )
    processor = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size=16)
    dataset = PairDataset(load_records(tmp_path / "m.json"), processor, augment=Augment())
    chosen = []
    for epoch in range(6):
        dataset.set_epoch(epoch)
        first, again = dataset[0], dataset[0]
        assert first.caption == again.caption  # same epoch, same draw
        chosen.append(first.caption)
    assert len(set(chosen)) > 1  # a new caption draw each epoch


def _arrow() -> Image.Image:
    # A dark arrow pointing right on white: its mass sits on the right of the image.
    image = Image.new("RGB", (96, 96), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((10, 42, 60, 54), fill=(20, 20, 20))
    draw.polygon([(60, 28), (88, 48), (60, 68)], fill=(20, 20, 20))
    return image


def _points_right(image: Image.Image) -> bool:
    """Whether the arrow points right: its tallest dark column (the head) lies right of the
    centre of its dark pixels. Independent of where a crop put the arrow."""
    dark = np.asarray(image.convert("L"), dtype=np.float64) < 128
    heights = dark.sum(axis=0)
    return float(np.argmax(heights)) > float(np.nonzero(dark)[1].mean())


def test_augmentation_keeps_direction_unless_flip_is_asked_for() -> None:
    rng = random.Random(0)
    arrow = _arrow()
    assert _points_right(arrow)
    assert all(_points_right(Augment()(arrow, rng)) for _ in range(30))
    flipped = [not _points_right(Augment(hflip=True)(arrow, rng)) for _ in range(30)]
    assert any(flipped) and not all(flipped)


def test_augmentation_never_changes_hue() -> None:
    red = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(red).ellipse((8, 8, 56, 56), fill=(220, 30, 30))
    rng = random.Random(1)
    for _ in range(20):
        out = Augment(max_rotation=15)(red, rng)
        assert 0.55 * 64 <= out.width <= 64 and 0.55 * 64 <= out.height <= 64
        pixels = np.asarray(out, dtype=np.float64).reshape(-1, 3) / 255
        coloured = pixels[pixels.min(axis=1) < 0.9]  # not (near) white
        hues = [colorsys.rgb_to_hsv(*p)[0] for p in coloured]
        # Red's hue is ~0 (or ~1, wrapping); edge pixels blend with white, never another hue.
        assert all(h < 0.02 or h > 0.98 for h in hues)


def test_augment_rejects_meaning_changing_settings() -> None:
    with pytest.raises(ValueError):
        Augment(scale=(0.0, 1.0))
    with pytest.raises(ValueError):
        Augment(max_rotation=90)
