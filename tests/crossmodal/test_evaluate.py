"""The evaluation command end to end: the model loaded as the feature service loads it, a
COCO-style manifest (two captions per image), a table, JSON, and broken images counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crossmodal.demo.shapes import write_collection
from crossmodal.evaluate.__main__ import main


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_collection(tmp_path_factory.mktemp("shapes-eval"))


def test_trained_model_against_random_weights(
    demo_model_dir: Path, shapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "trained.json"
    assert main(["--model", str(demo_model_dir), "--data", str(shapes), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "text→image" in table and "R@10" in table
    trained = json.loads(out.read_text())
    assert (trained["images"], trained["texts"], trained["skipped_images"]) == (32, 64, 0)
    # The shapes model is trained to >= 0.9 text→image top-1 on these very images.
    assert trained["recall"]["text_to_image"]["R@1"] >= 0.9
    assert trained["recall"]["image_to_text"]["R@1"] >= 0.8

    random_out = tmp_path / "random.json"
    args = ["--model", str(demo_model_dir), "--data", str(shapes), "--out", str(random_out)]
    assert main([*args, "--random-weights"]) == 0
    random = json.loads(random_out.read_text())
    assert random["model_id"].startswith("random-weights(")
    assert random["recall"]["text_to_image"]["R@1"] < 0.3


def test_broken_images_are_counted_not_fatal(
    random_model_dir: Path, shapes: Path, tmp_path: Path
) -> None:
    manifest = json.loads(shapes.read_text())[:5]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    manifest.append({"file": str(tmp_path / "broken.png"), "captions": ["x", "y"]})
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(e) for e in manifest) + "\n")
    out = tmp_path / "r.json"
    args = ["--model", str(random_model_dir), "--data", str(data), "--images", str(shapes.parent)]
    assert main([*args, "--out", str(out), "--ks", "1", "3"]) == 0
    result = json.loads(out.read_text())
    assert (result["images"], result["texts"], result["skipped_images"]) == (5, 10, 1)
    assert set(result["recall"]["image_to_text"]) == {"R@1", "R@3"}
