"""Contrastive fine-tuning of any CLIP-style model the feature service loads.

One optimiser step sees ``batch_size × accumulate`` pairs. With ``accumulate > 1`` the step uses
gradient caching (Gao et al., 2021, "GradCache"): every micro-batch is first embedded without
gradients, the loss is computed over the whole effective batch (so every pair has all the other
pairs of the step as negatives, exactly as one big batch would), and each micro-batch is then
embedded again with gradients and back-propagated with its slice of the feature gradients.
Summing per-micro-batch losses instead would only give each pair the negatives of its own
micro-batch: a different, weaker objective than the large batch it pretends to be.

Each epoch ends with validation recall@K on the validation set (canonical images, no
augmentation); the best epoch by the selection metric is kept as a ``save_pretrained`` folder
(``OUT/best``) that the feature service loads unchanged. ``OUT/last`` holds the latest epoch and
the optimiser, schedule and random states to resume from.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from crossmodal.data.augment import Augment
from crossmodal.data.dataset import Batch, PairDataset
from crossmodal.data.images import SkippedImages, try_read_image
from crossmodal.data.records import load_records
from crossmodal.evaluate.metrics import DEFAULT_KS, retrieval_recall
from crossmodal.train.loss import MAX_LOGIT_SCALE, caption_bank_loss, contrastive_loss
from crossmodal.train.towers import Towers

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
SUMMARY_FILE = "training.json"


@dataclass
class TrainConfig:
    model: str  # hub name or save_pretrained folder to start from
    train: Path  # annotations (COCO captions, JSON list or JSONL)
    out: Path
    train_images: Path | None = None
    val: Path | None = None  # without it, validation uses the training images un-augmented
    val_images: Path | None = None
    epochs: int = 10
    batch_size: int = 128  # pairs per micro-batch
    accumulate: int = 1  # micro-batches per optimiser step (GradCache)
    lr: float = 5e-4
    min_lr_ratio: float = 0.0  # the cosine ends at lr × this
    warmup: float = 0.05  # fraction of all steps (< 1) or a number of steps (>= 1)
    weight_decay: float = 0.1
    max_grad_norm: float | None = 1.0
    freeze_text: bool = False
    freeze_vision: bool = False
    # With freeze_text: rank each image against every training caption, not only the batch's.
    all_text_negatives: bool = False
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    device: str = "auto"
    threads: int | None = None
    workers: int = 0
    seed: int = 0
    augment: bool = True
    hflip: bool = False
    crop_scale: float = 0.7  # smallest fraction of the image area a crop keeps
    max_rotation: float = 8.0
    cache_side: int | None = 256  # keep decoded images in memory at this size (None: re-read)
    select: str = "mean"  # mean (of every R@K both ways) | image_to_text/R@1 | text_to_image/R@1 …
    ks: tuple[int, ...] = DEFAULT_KS
    max_steps: int | None = None  # stop early (smoke tests)
    limit: int | None = None  # use only the first N training images
    resume: Path | None = None  # an OUT/last folder
    stop_after: int | None = None  # end this run after N epochs (resume later), schedule intact
    progress: bool | None = None  # None: a bar on a terminal, one log line per epoch otherwise

    def to_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


@dataclass
class EpochReport:
    epoch: int
    steps: int
    loss: float
    images_per_second: float
    logit_scale: float
    validation: dict[str, dict[str, float]]
    score: float
    seconds: float


@dataclass
class TrainSummary:
    best_dir: Path
    best_epoch: int
    best_score: float
    epochs: list[EpochReport] = field(default_factory=list)
    skipped_images: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def resolve_precision(precision: str, device: str) -> torch.dtype | None:
    """The autocast dtype, or ``None`` for full fp32. ``auto`` picks bf16 on a CUDA device that
    supports it, fp16 on older CUDA devices, and fp32 on CPUs (where bf16 autocast is often
    slower than fp32 without AMX, and fp16 is not supported)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device != "cuda":
            raise ValueError("fp16 autocast needs a CUDA device; use bf16 or fp32 on a CPU")
        return torch.float16
    if precision != "auto":
        raise ValueError(f"unknown precision {precision!r}")
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then a cosine down to ``min_ratio`` at ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # As CLIP: no decay on biases, norms, embeddings' gains and the temperature.
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if parameter.ndim < 2 or "logit_scale" in name or "logit_bias" in name:
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    def __init__(self, config: TrainConfig) -> None:
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        from services.feature.model import resolve_device

        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = resolve_device(config.device)
        self.autocast_dtype = resolve_precision(config.precision, self.device)
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        source = str(config.resume) if config.resume else config.model
        self.model: Any = AutoModel.from_pretrained(source).to(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.image_processor = AutoImageProcessor.from_pretrained(source)
        self.model_source = config.model
        self.towers = Towers(
            self.model,
            self.tokenizer,
            freeze_text=config.freeze_text,
            freeze_vision=config.freeze_vision,
            max_text_tokens=_max_text_tokens(self.model, self.tokenizer),
            device=self.device,
        )
        if config.all_text_negatives and not config.freeze_text:
            raise ValueError("all_text_negatives needs freeze_text (a frozen text encoder)")
        if config.all_text_negatives and config.accumulate > 1:
            raise ValueError("all_text_negatives already sees every caption: use accumulate 1")
        self.skipped = SkippedImages()
        self.train_records = load_records(config.train, config.train_images)
        if config.limit:
            self.train_records = self.train_records[: config.limit]
        if config.val is not None:
            self.val_records = load_records(config.val, config.val_images)
        else:
            self.val_records = self.train_records
        augment = (
            Augment(
                scale=(config.crop_scale, 1.0),
                max_rotation=config.max_rotation,
                hflip=config.hflip,
            )
            if config.augment
            else None
        )
        # The caption bank: every distinct training caption, and each record's own ones.
        self.bank = list(dict.fromkeys(c for r in self.train_records for c in r.captions))
        bank_index = {c: i for i, c in enumerate(self.bank)}
        self.record_captions = [[bank_index[c] for c in r.captions] for r in self.train_records]
        self.dataset = PairDataset(
            self.train_records,
            self.image_processor,
            augment=augment,
            seed=config.seed,
            cache_side=config.cache_side,
        )
        micro = config.batch_size
        self.step_batch = micro * config.accumulate
        if len(self.dataset) < 2:
            raise ValueError("contrastive training needs at least two training images")
        # Full steps only: a last batch of a few pairs would be a trivially easy task with a
        # noisy gradient. A dataset smaller than one step trains on all of it at once.
        self.steps_per_epoch = max(1, len(self.dataset) // self.step_batch)
        self.total_steps = self.steps_per_epoch * config.epochs
        if config.max_steps:
            self.total_steps = min(self.total_steps, config.max_steps)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("nothing to train: both towers frozen and no projection")
        self.optimizer = torch.optim.AdamW(
            _param_groups(self.model, config.weight_decay), lr=config.lr, betas=(0.9, 0.98)
        )
        warmup = (
            int(config.warmup)
            if config.warmup >= 1
            else max(1, round(config.warmup * self.total_steps))
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_factor(step, self.total_steps, warmup, config.min_lr_ratio),
        )
        self.scaler = torch.amp.GradScaler(
            self.device, enabled=self.autocast_dtype == torch.float16
        )
        self.epoch = 0  # epochs completed
        self.step = 0
        self.best_score = -1.0
        self.best_epoch = 0
        self.history: list[EpochReport] = []
        if config.resume:
            self._load_state(config.resume)

    # ----------------------------------------------------------------- one optimiser step
    def _autocast(self) -> AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device, dtype=self.autocast_dtype)

    def _step(self, batch: Batch) -> float:
        """One optimiser step on ``batch``; returns the loss of the whole batch."""
        loss = self.backward(batch)
        self.scaler.unscale_(self.optimizer)
        if self.config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], self.config.max_grad_norm
            )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        return loss

    def backward(self, batch: Batch) -> float:
        """Accumulate into ``.grad`` the gradient of the loss over the whole of ``batch``, in
        micro-batches of ``batch_size`` (GradCache when there is more than one)."""
        micro = self.config.batch_size
        chunks = [
            (batch.pixels[i : i + micro], batch.captions[i : i + micro])
            for i in range(0, len(batch.captions), micro)
        ]
        if self.config.all_text_negatives:
            with self._autocast():
                image = self.towers.image_features(batch.pixels)
                text = self.towers.text_features(batch.captions)
                bank = self.towers.bank_features(self.bank)
            positives = torch.zeros(len(image), len(self.bank), dtype=torch.bool)
            for row, index in enumerate(batch.indices.tolist()):
                positives[row, self.record_captions[index]] = True
            loss = caption_bank_loss(
                image, text, bank, positives.to(image.device), self.model.logit_scale
            )
            self.scaler.scale(loss).backward()
        elif len(chunks) == 1:
            with self._autocast():
                image = self.towers.image_features(batch.pixels)
                text = self.towers.text_features(batch.captions)
            loss = contrastive_loss(self.model, image, text)
            self.scaler.scale(loss).backward()
        else:
            loss = self._grad_cache_backward(chunks)
        return float(loss.detach())

    def _grad_cache_backward(self, chunks: list[tuple[torch.Tensor, list[str]]]) -> torch.Tensor:
        # 1. Features of every micro-batch without a graph; remember each one's random state
        #    so the second pass sees the same dropout masks.
        states, images, texts = [], [], []
        with torch.no_grad():
            for pixels, captions in chunks:
                states.append(_rng_state())
                with self._autocast():
                    images.append(self.towers.image_features(pixels).float())
                    texts.append(self.towers.text_features(captions).float())
        # 2. The loss over the whole effective batch, back to the features (and logit_scale).
        image_all = torch.cat(images).requires_grad_()
        text_all = torch.cat(texts).requires_grad_()
        loss = contrastive_loss(self.model, image_all, text_all)
        self.scaler.scale(loss).backward()
        assert image_all.grad is not None and text_all.grad is not None
        # 3. Each micro-batch again, with a graph, driven by its slice of those gradients.
        offset = 0
        after = _rng_state()
        for (pixels, captions), state in zip(chunks, states, strict=True):
            _set_rng_state(state)
            n = len(captions)
            with self._autocast():
                image = self.towers.image_features(pixels).float()
                text = self.towers.text_features(captions).float()
            outputs = [t for t in (image, text) if t.requires_grad]
            grads = [
                g
                for t, g in (
                    (image, image_all.grad[offset : offset + n]),
                    (text, text_all.grad[offset : offset + n]),
                )
                if t.requires_grad
            ]
            if outputs:
                torch.autograd.backward(outputs, grads)
            offset += n
        _set_rng_state(after)
        return loss

    # ------------------------------------------------------------------------ the loop
    def _loader(self, epoch: int) -> Iterator[Batch]:
        self.dataset.set_epoch(epoch)
        generator = torch.Generator().manual_seed(self.config.seed * 100_003 + epoch)
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        step_batch = min(self.step_batch, len(order))
        batches = [
            order[i : i + step_batch]
            for i in range(0, self.steps_per_epoch * step_batch, step_batch)
        ]
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=batches,
            collate_fn=self.dataset.collate,
            num_workers=self.config.workers,
        )
        yield from loader

    def fit(self) -> TrainSummary:
        config = self.config
        started = time.perf_counter()
        config.out.mkdir(parents=True, exist_ok=True)
        self.towers.precompute_text([c for r in self.train_records for c in r.captions])
        val_data = self._validation_data()
        show_bar = config.progress if config.progress is not None else sys.stderr.isatty()
        stop_at = min(config.epochs, config.stop_after or config.epochs)
        while self.epoch < stop_at and self.step < self.total_steps:
            epoch = self.epoch + 1
            epoch_started = time.perf_counter()
            self.towers.train()
            losses, seen, compute = [], 0, 0.0
            bar = tqdm(
                total=self.steps_per_epoch,
                desc=f"epoch {epoch}/{config.epochs}",
                unit="step",
                disable=not show_bar,
                dynamic_ncols=True,
            )
            for batch in self._loader(epoch):
                for path in batch.skipped:
                    self.skipped.add(path, "could not be decoded")
                if len(batch.captions) < 2:
                    continue
                tick = time.perf_counter()
                losses.append(self._step(batch))
                compute += time.perf_counter() - tick
                seen += len(batch.captions)
                self.step += 1
                bar.update(1)
                bar.set_postfix(
                    loss=f"{losses[-1]:.3f}",
                    img_s=f"{seen / max(compute, 1e-9):.0f}",
                    lr=f"{self.scheduler.get_last_lr()[0]:.1e}",
                    T=f"{1 / float(self.model.logit_scale.detach().exp()):.3f}",
                )
                if self.step >= self.total_steps:
                    break
            bar.close()
            validation = self.validate(val_data)
            score = _score(validation, config.select)
            self.epoch = epoch
            report = EpochReport(
                epoch=epoch,
                steps=self.step,
                loss=float(np.mean(losses)) if losses else float("nan"),
                images_per_second=round(seen / max(compute, 1e-9), 1),
                logit_scale=round(float(self.model.logit_scale.detach().exp()), 3),
                validation=validation,
                score=score,
                seconds=round(time.perf_counter() - epoch_started, 1),
            )
            self.history.append(report)
            log.info(
                "epoch %d: loss %.4f, %.0f img/s, val %s %.4f (text→image R@1 %.3f) in %.0fs",
                epoch,
                report.loss,
                report.images_per_second,
                config.select,
                score,
                validation["text_to_image"].get("R@1", float("nan")),
                report.seconds,
            )
            if score > self.best_score:
                self.best_score, self.best_epoch = score, epoch
                best = self._write_model(config.out / "best", {"epoch": epoch, "score": score})
                self._install(best, config.out / "best")
            self._save_checkpoint(config.out / "last")
            self._append_metrics(report)
        summary = TrainSummary(
            best_dir=config.out / "best",
            best_epoch=self.best_epoch,
            best_score=self.best_score,
            epochs=self.history,
            skipped_images=self.skipped.as_dict(),
            seconds=round(time.perf_counter() - started, 1),
        )
        if self.skipped:
            log.warning("%d images could not be decoded and were skipped", len(self.skipped))
        return summary

    # ---------------------------------------------------------------------- validation
    def _validation_data(self) -> tuple[list[torch.Tensor], list[str], np.ndarray]:
        """Preprocessed validation images (in chunks) and their captions, decoded once."""
        chunks, captions, text_image = [], [], []
        kept = 0
        pending: list[Any] = []
        for record in self.val_records:
            image = try_read_image(record.path, self.skipped)
            if image is None:
                continue
            pending.append(image)
            captions.extend(record.captions)
            text_image.extend([kept] * len(record.captions))
            kept += 1
            if len(pending) == 256:
                chunks.append(self._pixels(pending))
                pending = []
        if pending:
            chunks.append(self._pixels(pending))
        return chunks, captions, np.asarray(text_image, dtype=np.int64)

    def _pixels(self, images: Sequence[Any]) -> torch.Tensor:
        return self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def validate(
        self, data: tuple[list[torch.Tensor], list[str], np.ndarray]
    ) -> dict[str, dict[str, float]]:
        """Recall@K on the validation set with the model as it is now. Same features as the
        feature service computes (projected, L2-normalised), from the towers' own paths."""
        chunks, captions, text_image = data
        self.model.eval()
        try:
            with self._autocast():
                images = torch.cat([self.towers.image_features(c).float().cpu() for c in chunks])
                texts = torch.cat(
                    [
                        self.towers.text_features(captions[i : i + 256]).float().cpu()
                        for i in range(0, len(captions), 256)
                    ]
                )
        finally:
            self.towers.train()
        image_vectors = torch.nn.functional.normalize(images, dim=-1).numpy()
        text_vectors = torch.nn.functional.normalize(texts, dim=-1).numpy()
        return retrieval_recall(image_vectors, text_vectors, text_image, self.config.ks)

    # ------------------------------------------------------------------ saving, resuming
    def _write_model(self, target: Path, extra: dict[str, Any] | None = None) -> Path:
        """A complete ``save_pretrained`` folder (model, tokenizer, image processor), written
        beside ``target`` and renamed into place so a crash never leaves half a model."""
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.model.save_pretrained(str(tmp))
        self.tokenizer.save_pretrained(str(tmp))
        self.image_processor.save_pretrained(str(tmp))
        summary = {
            "trained_from": self.model_source,
            "epochs_completed": self.epoch,
            "steps": self.step,
            "config": self.config.to_json(),
            "history": [asdict(h) for h in self.history],
            **(extra or {}),
        }
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        return tmp

    def _install(self, tmp: Path, target: Path) -> None:
        old = target.with_name(target.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)

    def _save_checkpoint(self, target: Path) -> None:
        tmp = self._write_model(target)
        torch.save(
            {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "epoch": self.epoch,
                "step": self.step,
                "best_score": self.best_score,
                "best_epoch": self.best_epoch,
                "history": [asdict(h) for h in self.history],
                "rng": _rng_state(),
            },
            tmp / STATE_FILE,
        )
        self._install(tmp, target)

    def _load_state(self, checkpoint: Path) -> None:
        state = torch.load(checkpoint / STATE_FILE, weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch = state["epoch"]
        self.step = state["step"]
        self.best_score = state["best_score"]
        self.best_epoch = state["best_epoch"]
        self.history = [EpochReport(**h) for h in state["history"]]
        _set_rng_state(state["rng"])
        log.info("resumed from %s after epoch %d (step %d)", checkpoint, self.epoch, self.step)

    def _append_metrics(self, report: EpochReport) -> None:
        with (self.config.out / "metrics.jsonl").open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(asdict(report)) + "\n")


def _score(validation: dict[str, dict[str, float]], select: str) -> float:
    if select == "mean":
        values = [v for direction in validation.values() for v in direction.values()]
        return float(np.mean(values))
    direction, _, k = select.partition("/")
    try:
        return validation[direction][k]
    except KeyError:
        raise ValueError(
            f"unknown selection metric {select!r}: 'mean' or e.g. 'text_to_image/R@1'"
        ) from None


def _max_text_tokens(model: Any, tokenizer: Any) -> int:
    # The feature service's rule: the position table bounds it, and so does the tokenizer's
    # own limit when it states a real one (a missing limit reads as a huge sentinel).
    limits = []
    positions = getattr(getattr(model.config, "text_config", None), "max_position_embeddings", 0)
    if isinstance(positions, int) and positions > 0:
        limits.append(positions)
    tokenizer_max = getattr(tokenizer, "model_max_length", 0)
    if isinstance(tokenizer_max, int) and 0 < tokenizer_max < 100_000:
        limits.append(tokenizer_max)
    return min(limits) if limits else 77


def train(config: TrainConfig) -> TrainSummary:
    """Run a whole training (or the rest of a resumed one). Returns the per-epoch reports."""
    trainer = Trainer(config)
    return trainer.fit()
