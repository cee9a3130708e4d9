"""``python -m crossmodal.train --model M --train ANNOTATIONS --out DIR [options]``

Fine-tunes a CLIP-style model contrastively; ``DIR/best`` is the model to serve. See
docs/training.md.
"""

from __future__ import annotations

import os

# On a machine whose cores other work also uses, OpenMP's default busy-waiting makes torch's
# threads spin while one of them is descheduled: 2 threads ran 3-5x slower than 1 here.
# Passive waiting costs little on an idle machine. Set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import logging
import sys
from pathlib import Path

from crossmodal.train.trainer import TrainConfig


def build_parser(prog: str = "python -m crossmodal.train") -> argparse.ArgumentParser:
    d = TrainConfig(model="", train=Path(), out=Path())
    p = argparse.ArgumentParser(
        prog=prog,
        description="Contrastive fine-tuning (symmetric InfoNCE with the model's own learnable "
        "temperature). Writes OUT/best (best validation epoch, a save_pretrained folder the "
        "feature service loads) and OUT/last (latest epoch + optimiser state, for --resume).",
    )
    p.add_argument("--model", required=True, help="hub name or save_pretrained folder")
    p.add_argument("--train", required=True, type=Path, help="COCO captions, JSON list or JSONL")
    p.add_argument("--train-images", type=Path, help="default: the folder of --train")
    p.add_argument("--val", type=Path, help="validation annotations (default: --train, no aug)")
    p.add_argument("--val-images", type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="pairs per micro-batch")
    p.add_argument(
        "--accumulate",
        type=int,
        default=d.accumulate,
        help="micro-batches per step; the loss spans all of them (GradCache)",
    )
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    p.add_argument("--warmup", type=float, default=d.warmup, help="fraction (<1) or steps")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    p.add_argument("--freeze-text", action="store_true", help="LiT: lock the text encoder")
    p.add_argument("--freeze-vision", action="store_true", help="LiT: lock the image encoder")
    p.add_argument(
        "--all-text-negatives",
        action="store_true",
        help="with --freeze-text: rank each image against every training caption",
    )
    p.add_argument("--precision", default=d.precision, choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--workers", type=int, default=d.workers, help="data loader processes")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-augment", dest="augment", action="store_false")
    p.add_argument("--hflip", action="store_true", help="mirror images (not for text/arrows)")
    p.add_argument("--crop-scale", type=float, default=d.crop_scale)
    p.add_argument("--max-rotation", type=float, default=d.max_rotation)
    p.add_argument(
        "--cache-side",
        type=int,
        default=d.cache_side,
        help="keep decoded images in memory at this size; 0 re-reads files every epoch",
    )
    p.add_argument("--select", default=d.select, help="mean | text_to_image/R@1 | …")
    p.add_argument("--ks", type=int, nargs="+", default=list(d.ks))
    p.add_argument("--max-steps", type=int)
    p.add_argument("--limit", type=int, help="only the first N training images")
    p.add_argument("--resume", type=Path, help="an OUT/last folder to continue from")
    p.add_argument(
        "--stop-after",
        type=int,
        help="end after N epochs, keeping the full schedule (resume later)",
    )
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = vars(args).copy()
    values["ks"] = tuple(values["ks"])
    values["cache_side"] = values["cache_side"] or None
    return TrainConfig(**values)


def main(argv: list[str] | None = None, prog: str = "python -m crossmodal.train") -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    from crossmodal.train.trainer import train

    summary = train(config_from_args(args))
    print(
        json.dumps(
            {
                "best": str(summary.best_dir),
                "best_epoch": summary.best_epoch,
                "best_score": round(summary.best_score, 4),
                "skipped_images": len(summary.skipped_images),
                "seconds": summary.seconds,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
