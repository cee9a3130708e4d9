"""The fine-tuning command on the tiny shapes CLIP: objective, GradCache, LiT freezing,
checkpoints, resume, broken images. Each run is a few steps on 32 images (seconds)."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from crossmodal.demo.shapes import write_collection
from crossmodal.train import TrainConfig, Trainer, clip_loss, contrastive_loss, lr_factor, train
from crossmodal.train.loss import MAX_LOGIT_SCALE, caption_bank_loss
from crossmodal.train.trainer import STATE_FILE, resolve_precision


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_collection(tmp_path_factory.mktemp("shapes"))


def _config(model: Path, manifest: Path, out: Path, **overrides: object) -> TrainConfig:
    base = TrainConfig(
        model=str(model),
        train=manifest,
        out=out,
        epochs=2,
        batch_size=8,
        lr=2e-3,
        threads=2,
        cache_side=64,
        progress=False,
    )
    return replace(base, **overrides)


def test_loss_uses_the_models_own_learnable_temperature() -> None:
    torch.manual_seed(0)
    image, text = torch.randn(6, 8), torch.randn(6, 8)
    scale = torch.tensor(math.log(20.0), requires_grad=True)
    loss = clip_loss(image, text, scale)
    logits = 20.0 * F.normalize(text, dim=-1) @ F.normalize(image, dim=-1).T
    target = torch.arange(6)
    expected = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert scale.grad is not None and scale.grad.abs() > 0  # the temperature learns
    # A different scale is a different loss: no fixed temperature hides behind it.
    assert clip_loss(image, text, torch.tensor(0.0)).item() != pytest.approx(loss.item())


def test_sigmoid_loss_for_models_with_a_logit_bias() -> None:
    class SigLike(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
            self.logit_bias = torch.nn.Parameter(torch.tensor(-10.0))

    torch.manual_seed(0)
    image, text = torch.randn(4, 8), torch.randn(4, 8)
    sig = contrastive_loss(SigLike(), image, text)
    logits = 10.0 * F.normalize(text, dim=-1) @ F.normalize(image, dim=-1).T - 10.0
    labels = 2 * torch.eye(4) - 1
    assert sig.item() == pytest.approx((-F.logsigmoid(labels * logits).sum() / 4).item(), 1e-5)


def test_caption_bank_loss_ranks_images_against_every_caption() -> None:
    torch.manual_seed(0)
    image, bank = torch.randn(3, 8), torch.randn(7, 8)
    own = [[0], [2, 5], [6]]  # image 1 has two captions; either is a hit
    positives = torch.zeros(3, 7, dtype=torch.bool)
    for row, columns in enumerate(own):
        positives[row, columns] = True
    text = bank[[0, 5, 6]]  # the captions drawn for this batch
    scale = torch.tensor(math.log(10.0))
    loss = caption_bank_loss(image, text, bank, positives, scale)

    i, t, b = (F.normalize(x, dim=-1) for x in (image, text, bank))
    t2i = F.cross_entropy(10.0 * t @ i.T, torch.arange(3))
    probs = torch.softmax(10.0 * i @ b.T, dim=1)
    i2t = -torch.stack([probs[r, cols].sum().log() for r, cols in enumerate(own)]).mean()
    assert loss.item() == pytest.approx(((t2i + i2t) / 2).item(), rel=1e-5)
    # With only in-batch captions as candidates the loss is another number.
    assert loss.item() != pytest.approx(clip_loss(image, text, scale).item(), rel=1e-3)


def test_caption_bank_needs_a_frozen_text_encoder(
    random_model_dir: Path, shapes: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="freeze_text"):
        Trainer(_config(random_model_dir, shapes, tmp_path, all_text_negatives=True))


def test_schedule_warms_up_then_follows_a_cosine() -> None:
    values = [lr_factor(s, total=100, warmup=10, min_ratio=0.1) for s in range(101)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0)
    assert values[55] == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-9)  # half way down the cosine
    assert values[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(values[10:]))


def test_precision_choice() -> None:
    assert resolve_precision("auto", "cpu") is None
    assert resolve_precision("bf16", "cpu") is torch.bfloat16
    with pytest.raises(ValueError, match="CUDA"):
        resolve_precision("fp16", "cpu")


def _grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_grad_cache_accumulation_equals_one_large_batch(
    random_model_dir: Path, shapes: Path, tmp_path: Path
) -> None:
    config = _config(random_model_dir, shapes, tmp_path, batch_size=16, augment=False)
    whole = Trainer(config)
    batch = next(iter(whole._loader(1)))
    assert len(batch.captions) == 16
    whole.backward(batch)
    expected = _grads(whole)

    cached = Trainer(replace(config, batch_size=4, accumulate=4))
    cached.backward(batch)
    got = _grads(cached)
    assert expected.keys() == got.keys() and "logit_scale" in got
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=name)

    # What plain accumulation computes (in-batch negatives per micro-batch only) is another
    # gradient: the comparison above could fail.
    naive = Trainer(replace(config, batch_size=4))
    for start in range(0, 16, 4):
        image = naive.towers.image_features(batch.pixels[start : start + 4])
        text = naive.towers.text_features(batch.captions[start : start + 4])
        (contrastive_loss(naive.model, image, text) / 4).backward()
    assert not torch.allclose(_grads(naive)["logit_scale"], expected["logit_scale"], rtol=1e-3)


def test_fit_freeze_checkpoint_and_resume(
    random_model_dir: Path, shapes: Path, tmp_path: Path
) -> None:
    from services.feature.model import TransformersEmbedder

    initial = load_file(str(random_model_dir / "model.safetensors"))
    config = _config(
        random_model_dir,
        shapes,
        tmp_path / "run",
        freeze_text=True,
        all_text_negatives=True,
        epochs=3,
        limit=16,
    )
    summary = train(replace(config, stop_after=2))  # interrupted after two of three epochs
    assert [e.epoch for e in summary.epochs] == [1, 2]
    assert summary.best_epoch in (1, 2)
    best = tmp_path / "run" / "best"
    last = tmp_path / "run" / "last"
    assert (last / STATE_FILE).is_file() and not (best / STATE_FILE).exists()
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    assert summary.epochs[-1].steps == 4  # 16 images, 8 a step, 2 epochs

    # LiT: the text encoder is untouched; the image tower and both projections trained.
    trained = load_file(str(last / "model.safetensors"))
    text_keys = [k for k in trained if k.startswith("text_model.")]
    assert text_keys and all(torch.equal(trained[k], initial[k]) for k in text_keys)
    for key in ("visual_projection.weight", "text_projection.weight"):
        assert not torch.equal(trained[key], initial[key]), key
    assert float(trained["logit_scale"]) <= MAX_LOGIT_SCALE + 1e-6

    # The best folder is what the feature service loads, unchanged.
    embedder = TransformersEmbedder.load(str(best), device="cpu")
    assert embedder.dim == 32
    info = json.loads((best / "training.json").read_text())
    assert info["epoch"] == summary.best_epoch

    # Resuming for one more epoch gives the weights of an uninterrupted 3-epoch run.
    resumed = train(replace(config, resume=last))
    assert [e.epoch for e in resumed.epochs] == [1, 2, 3]
    straight = train(replace(config, out=tmp_path / "straight"))
    a = load_file(str(last / "model.safetensors"))
    b = load_file(str(tmp_path / "straight" / "last" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    assert resumed.epochs[-1].steps == straight.epochs[-1].steps


def test_broken_images_are_skipped_and_counted(
    random_model_dir: Path, shapes: Path, tmp_path: Path
) -> None:
    manifest = json.loads(shapes.read_text())
    broken = tmp_path / "broken.png"  # an absolute path in the manifest stays as it is
    broken.write_bytes(b"not an image at all")
    manifest.append({"file": str(broken), "captions": ["a broken image"]})
    annotations = tmp_path / "with-broken.json"
    annotations.write_text(json.dumps(manifest))
    config = _config(
        random_model_dir,
        annotations,
        tmp_path / "run",
        train_images=shapes.parent,
        epochs=1,
        batch_size=33,
        precision="bf16",
    )
    summary = train(config)
    assert list(summary.skipped_images) == [str(broken)]
    assert summary.epochs[0].steps == 1


def test_command_line(random_model_dir: Path, shapes: Path, tmp_path: Path) -> None:
    from crossmodal.train.__main__ import main

    out = tmp_path / "cli"
    args = ["--model", str(random_model_dir), "--train", str(shapes), "--out", str(out)]
    options = ["--epochs", "1", "--batch-size", "8", "--max-steps", "1", "--freeze-text"]
    assert main([*args, *options, "--all-text-negatives", "--no-augment", "--cache-side", "0"]) == 0
    info = json.loads((out / "best" / "training.json").read_text())
    assert info["config"]["all_text_negatives"] is True
    assert info["config"]["augment"] is False and info["config"]["cache_side"] is None
    assert info["steps"] == 1
