"""``python -m crossmodal.evaluate --model M --data ANNOTATIONS [--images DIR] [--out R.json]``"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from crossmodal.evaluate.metrics import DEFAULT_KS


def build_parser(prog: str = "python -m crossmodal.evaluate") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Recall@K (image→text, text→image) of a model on an image–caption dataset.",
    )
    parser.add_argument(
        "--model", required=True, help="hub name or save_pretrained folder (as FEATURE_MODEL)"
    )
    parser.add_argument(
        "--data",
        required=True,
        type=Path,
        help="COCO captions JSON, a JSON list [{image_id|file, captions}] or a JSONL manifest",
    )
    parser.add_argument(
        "--images", type=Path, help="folder the file names are relative to (default: beside --data)"
    )
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    parser.add_argument("--ks", type=int, nargs="+", default=list(DEFAULT_KS))
    parser.add_argument("--limit", type=int, help="only the first N images (a quick look)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="evaluate a freshly initialised model of the same shape (the chance baseline)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of --random-weights")
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m crossmodal.evaluate") -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from crossmodal.data.records import load_records
    from crossmodal.evaluate.models import load_embedder
    from crossmodal.evaluate.run import evaluate_embedder, write_result

    records = load_records(args.data, args.images)
    if args.limit:
        records = records[: args.limit]
    embedder = load_embedder(
        args.model,
        device=args.device,
        threads=args.threads,
        batch_size=args.batch_size,
        random_weights=args.random_weights,
        seed=args.seed,
    )
    result = evaluate_embedder(
        embedder,
        records,
        data_name=str(args.data),
        ks=args.ks,
        batch_size=args.batch_size,
        progress=sys.stderr.isatty(),
    )
    print(result.table())
    if args.out:
        write_result(result, args.out)
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
