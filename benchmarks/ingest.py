"""Ingestion throughput, end to end through the gateway: items/s for N images from a folder.

    .venv/bin/python benchmarks/ingest.py --count 10000          # what `make bench` runs
    .venv/bin/python benchmarks/ingest.py --count 50             # a smoke run
    .venv/bin/python benchmarks/ingest.py --gateway http://127.0.0.1:8000 --token "$TOKEN"

Without ``--gateway`` it starts a private stack (the five services as processes on free loopback
ports, the emoji demo model that ``make run`` serves, the Redis at ``--redis-url``) in a temporary folder. It writes N
distinct synthetic images (jittered coloured shapes, each with a caption) into a folder and runs
the same pipeline as ``crossmodal index`` on it (read, hash, upload with ``--concurrency``
uploads in flight; every item embedded by the feature service, upserted durably into retrieval
and marked indexed in metadata before it counts). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

# Run as a script from the repository root: make the project importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crossmodal.client import GatewayClient
from crossmodal.demo.shapes import COLOURS, SHAPES, render
from crossmodal.ingest import IngestOptions, Ingestor, Journal, load_records
from crossmodal.stack import SERVICES, LocalStack


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def write_images(folder: Path, count: int, size: int) -> None:
    """``count`` distinct PNGs with a caption sidecar each (seeded: the same set every run)."""
    folder.mkdir(parents=True, exist_ok=True)
    concepts = [(c, s) for c in COLOURS for s in SHAPES]
    for i in range(count):
        path = folder / f"{i:06d}.png"
        if path.exists():
            continue
        colour, shape = concepts[i % len(concepts)]
        render(colour, shape, size=size, rng=random.Random(i)).save(path, format="PNG")
        path.with_suffix(".txt").write_text(f"a {colour} {shape}\nimage number {i}\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000, help="images to index")
    parser.add_argument("--concurrency", type=int, default=8, help="uploads in flight")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--gateway", help="use a running gateway instead of a private stack")
    parser.add_argument("--token", default=os.environ.get("CROSSMODAL_TOKEN"))
    parser.add_argument(
        "--model", help="FEATURE_MODEL for the private stack (default: the emoji demo)"
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument(
        "--work-dir", type=Path, help="keep images and stack state here (else a temporary folder)"
    )
    parser.add_argument("--collection", default=f"bench-{uuid.uuid4().hex[:8]}")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="crossmodal-bench-"))
    images = work / "images"
    started = time.monotonic()
    write_images(images, args.count, args.size)
    print(f"{args.count} images in {images} ({time.monotonic() - started:.1f}s)", file=sys.stderr)

    stack: LocalStack | None = None
    gateway = args.gateway
    try:
        if gateway is None:
            from crossmodal.demo import DEFAULT_EMOJI_MODEL_DIR, ensure_emoji_model

            model = args.model or str(ensure_emoji_model(DEFAULT_EMOJI_MODEL_DIR))
            ports = dict(zip((s.name for s in SERVICES), free_ports(len(SERVICES)), strict=True))
            stack = LocalStack(
                work / "stack",
                model=model,
                redis_url=args.redis_url,
                ports=ports,
                extra_env={"GATEWAY_CACHE_PREFIX": f"bench-{uuid.uuid4().hex[:8]}"},
            )
            print("starting a private stack…", file=sys.stderr)
            stack.start()
            gateway = stack.url("gateway")
        token = args.token
        if not token:
            with GatewayClient(gateway) as anonymous:
                token = anonymous.password_token("demo", "demo-password").access_token

        records = load_records(images, "folder")
        options = IngestOptions(
            collection=args.collection,
            concurrency=args.concurrency,
            batch_size=args.batch_size,
        )
        done = 0

        def progress(_outcome: object) -> None:
            nonlocal done
            done += 1
            if not args.quiet and (done % 100 == 0 or done == len(records)):
                print(f"  {done}/{len(records)}", file=sys.stderr)

        with (
            GatewayClient(gateway, token=token) as client,
            Journal(work / f"{args.collection}.journal.jsonl", args.collection) as journal,
        ):
            report = Ingestor(client, options, journal, on_progress=progress).run(records)
        result = {
            "benchmark": "ingest",
            "count": args.count,
            "indexed": report.indexed,
            "merged": report.merged,
            "duplicates": report.duplicates,
            "failed": len(report.failures),
            "seconds": round(report.seconds, 2),
            "items_per_second": round(report.items_per_second, 2),
            "concurrency": args.concurrency,
            "image_size": args.size,
            "gateway": "private stack" if stack else gateway,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        }
        for failure in report.failures[:5]:
            print(f"failed: {failure.key}: {failure.error}", file=sys.stderr)
        print(json.dumps(result))
        if report.failures or report.processed != len(records):
            raise SystemExit(1)
    finally:
        if stack is not None:
            stack.stop()
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
