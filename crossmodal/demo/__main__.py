"""``python -m crossmodal.demo COMMAND``: the offline demo models and collections.

The shapes demo (tests and the original ``make run``): ``build-model``, ``write-collection``.
The emoji demo: ``write-emoji-collection``, ``build-emoji-model`` (assemble the shipped
weights, seconds), ``train-emoji`` (reproduce those weights from scratch), ``emoji-experiment``
(generalisation to held-out emoji concepts).
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

from crossmodal.demo.build import DEFAULT_MODEL_DIR, ensure_demo_model, read_info

DEFAULT_COLLECTION_DIR = Path("var/demo/collection")


def main(argv: list[str] | None = None) -> int:
    from crossmodal.demo.emoji_model import (
        DEFAULT_EMOJI_COLLECTION_DIR,
        DEFAULT_EMOJI_MODEL_DIR,
        SHIPPED_WEIGHTS,
    )

    parser = argparse.ArgumentParser(prog="python -m crossmodal.demo", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build-model", help="train and save the tiny demo CLIP")
    build.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR)
    build.add_argument("--force", action="store_true", help="rebuild even if DIR holds a model")
    collection = commands.add_parser("write-collection", help="write the demo images + manifest")
    collection.add_argument("--out", type=Path, default=DEFAULT_COLLECTION_DIR)

    emoji_collection = commands.add_parser(
        "write-emoji-collection", help="render the OpenMoji collection + manifest.json"
    )
    emoji_collection.add_argument("--out", type=Path, default=DEFAULT_EMOJI_COLLECTION_DIR)
    emoji_collection.add_argument(
        "--split", action="store_true", help="also write train/val/test.json (by concept)"
    )
    emoji_model = commands.add_parser(
        "build-emoji-model", help="assemble the emoji model from models/emoji-demo (seconds)"
    )
    emoji_model.add_argument("--out", type=Path, default=DEFAULT_EMOJI_MODEL_DIR)
    emoji_model.add_argument("--weights", type=Path, default=SHIPPED_WEIGHTS)
    train_emoji = commands.add_parser(
        "train-emoji", help="reproduce the shipped emoji weights from scratch (~15 min, 2 cores)"
    )
    train_emoji.add_argument("--out", type=Path, default=SHIPPED_WEIGHTS)
    train_emoji.add_argument("--work", type=Path, default=Path("var/emoji-training"))
    train_emoji.add_argument("--max-steps", type=int, help="stop early (a smoke test)")
    experiment = commands.add_parser(
        "emoji-experiment", help="train on some emoji concepts, test on unseen ones"
    )
    experiment.add_argument("--work", type=Path, default=Path("var/emoji-experiment"))
    experiment.add_argument("--max-steps", type=int, help="stop early (a smoke test)")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line per step of ours is enough on a terminal

    if args.command == "build-model":
        path = ensure_demo_model(args.out, force=args.force)
        print(json.dumps({"model": str(path), **read_info(path)}))
    elif args.command == "write-collection":
        from crossmodal.demo.shapes import write_collection

        manifest = write_collection(args.out)
        print(json.dumps({"manifest": str(manifest)}))
    elif args.command == "write-emoji-collection":
        from crossmodal.demo.emoji import write_collection as write_emoji
        from crossmodal.demo.emoji import write_split

        paths = write_split(args.out) if args.split else {"manifest": write_emoji(args.out)}
        print(json.dumps({k: str(v) for k, v in paths.items()}))
    elif args.command == "build-emoji-model":
        from crossmodal.demo.emoji_model import ensure_emoji_model

        path = ensure_emoji_model(args.out, weights=args.weights)
        print(json.dumps({"model": str(path)}))
    elif args.command == "train-emoji":
        from crossmodal.demo.emoji_model import train_emoji_model

        out = train_emoji_model(args.out, work=args.work, max_steps=args.max_steps)
        print(json.dumps({"weights": str(out)}))
    else:
        from crossmodal.demo.emoji_model import run_experiment

        results = run_experiment(args.work, max_steps=args.max_steps)
        print(json.dumps({"results": str(args.work / "results.json"), "model": results["model"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
