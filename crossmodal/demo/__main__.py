"""``python -m crossmodal.demo build-model|write-collection --out DIR``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from crossmodal.demo.build import DEFAULT_MODEL_DIR, ensure_demo_model, read_info

DEFAULT_COLLECTION_DIR = Path("var/demo/collection")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m crossmodal.demo", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build-model", help="train and save the tiny demo CLIP")
    build.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR)
    build.add_argument("--force", action="store_true", help="rebuild even if DIR holds a model")
    collection = commands.add_parser("write-collection", help="write the demo images + manifest")
    collection.add_argument("--out", type=Path, default=DEFAULT_COLLECTION_DIR)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line per step of ours is enough on a terminal

    if args.command == "build-model":
        path = ensure_demo_model(args.out, force=args.force)
        print(json.dumps({"model": str(path), **read_info(path)}))
    else:
        from crossmodal.demo.shapes import write_collection

        manifest = write_collection(args.out)
        print(json.dumps({"manifest": str(manifest)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
