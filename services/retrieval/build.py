"""``python -m services.retrieval.build``: bulk-build a large collection offline, resumably.

Loading ten million vectors through the HTTP API would log and fsync every batch; this command
writes the collection directory the service loads instead, with the same pieces the service
uses: the index settings and ``auto`` choice (``indexing``), the same training sample and
incremental ``add_with_ids``, and the same snapshot format and writer (``snapshots``). The
service must not run on the data directory meanwhile (both take its lock).

The work happens in ``<data-dir>/.build-<collection>/`` and is checkpointed: the rows ingested so
far, the trained index, and the partly filled index every ``--checkpoint-every`` vectors. Run
the same command again after an interruption and it resumes; when done, the collection appears
in the data directory in one rename.

    python -m services.retrieval.build --data-dir var/retrieval --collection big \\
        --model-id my-clip --synthetic 10000000 --dim 512 --storage float16-mmap
    python -m services.retrieval.build --data-dir var/retrieval --collection photos \\
        --model-id my-clip --vectors image.npy --ids image_ids.npy
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import faiss
import numpy as np

from services.retrieval import snapshots, wal
from services.retrieval.collection import write_meta
from services.retrieval.indexing import (
    FACTORY_AUTO,
    STORAGE_FLOAT16_MMAP,
    STORAGES,
    IndexSpec,
    choose_factory,
    min_train_size,
    new_index,
    order_for_locality,
    train_sample_size,
)
from services.retrieval.store import BUILD_PREFIX, lock_data_directory
from services.retrieval.synthetic import ClipLike
from services.retrieval.vectors import SetState
from services.retrieval.wal import MODALITIES
from shared.collections import is_collection_name
from shared.contracts.retrieval import MAX_DIM

STATE = "build.json"
_INGEST_CHUNK = 1 << 16
# Rows between checkpoints of the ingest (a flush of the rows file and of the state).
_INGEST_CHECKPOINT = 1 << 20


class BuildError(RuntimeError):
    pass


class Progress:
    """One status line per stage on stderr: count, share, rate and time left. Redrawn in place
    on a terminal, printed every ``interval`` seconds otherwise (logs, CI)."""

    def __init__(self, stream: TextIO | None = None, *, interval: float = 2.0) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = 0.2 if self.tty else interval
        self._stage: str | None = None
        self._started = 0.0
        self._last = 0.0
        self._first_done = 0
        self._finished: set[str] = set()

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if stage != self._stage:
            self._stage, self._started, self._first_done, self._last = stage, now, done, 0.0
        finished = done >= total
        if finished:
            if stage in self._finished:
                return  # one closing line per stage
            self._finished.add(stage)
        elif now - self._last < self.interval:
            return
        self._last = now
        elapsed = now - self._started
        rate = (done - self._first_done) / elapsed if elapsed > 0 else 0.0
        left = (total - done) / rate if rate > 0 else float("nan")
        share = 100.0 * done / total if total else 100.0
        line = (
            f"{stage:<7} {done:>12,}/{total:,} {share:5.1f}%  {rate:>10,.0f}/s  "
            f"elapsed {_duration(elapsed)}  left {_duration(left)}"
        )
        if self.tty:
            self.stream.write("\r" + line + ("\n" if finished else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):  # NaN: unknown yet
        return "--:--"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return (
        f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
        if hours
        else f"{rest // 60:02d}:{rest % 60:02d}"
    )


@dataclass
class Source:
    """Where the rows come from: a .npy matrix (memory-mapped) or the synthetic generator."""

    n: int
    dim: int
    read: Callable[[int, int], np.ndarray]
    ids: Callable[[], np.ndarray]
    description: dict[str, Any]


def npy_source(vectors: Path, ids: Path | None) -> Source:
    matrix = np.load(vectors, mmap_mode="r", allow_pickle=False)
    if matrix.ndim != 2:
        raise BuildError(f"{vectors}: expected a 2-d matrix, got shape {matrix.shape}")
    n, dim = matrix.shape

    def read_ids() -> np.ndarray:
        if ids is None:
            return np.arange(n, dtype=np.int64)
        loaded = np.load(ids, allow_pickle=False).astype(np.int64)
        if loaded.shape != (n,):
            raise BuildError(f"{ids}: {loaded.shape[0]} ids for {n} vectors")
        if loaded.size and (loaded.min() < 0 or len(np.unique(loaded)) != n):
            raise BuildError(f"{ids}: ids must be unique and non-negative")
        return loaded

    return Source(
        n,
        dim,
        lambda a, b: np.asarray(matrix[a:b], dtype=np.float32),
        read_ids,
        {"vectors": str(vectors.resolve()), "ids": str(ids.resolve()) if ids else None},
    )


def synthetic_source(n: int, dim: int, seed: int) -> Source:
    generator = ClipLike(dim, seed=seed)
    return Source(
        n,
        dim,
        lambda a, b: generator.rows(a, b, stream=1),
        lambda: np.arange(n, dtype=np.int64),
        {"synthetic": n, "seed": seed},
    )


def build(
    data_dir: Path,
    collection: str,
    *,
    model_id: str,
    modality: str,
    source: Source,
    spec: IndexSpec,
    memory_budget: int,
    progress: Callable[[str, int, int], None] | None = None,
    checkpoint_every: int = 1_000_000,
    stop_after: Callable[[str, int], bool] | None = None,
) -> Path:
    """Build (or resume building) ``collection``; returns its directory. ``stop_after`` lets
    tests interrupt at a checkpoint, as a crash would."""
    if not is_collection_name(collection):
        raise BuildError(f"invalid collection name {collection!r}")
    if modality not in MODALITIES:
        raise BuildError(f"modality must be one of {', '.join(MODALITIES)}")
    if not 1 <= source.dim <= MAX_DIM:
        raise BuildError(f"dimension must be between 1 and {MAX_DIM}")
    spec.validate()
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_data_directory(data_dir)
    try:
        if (data_dir / collection).exists():
            raise BuildError(f"collection {collection!r} already exists in {data_dir}")
        factory = spec.factory
        if factory == FACTORY_AUTO:
            factory = choose_factory(
                source.n, source.dim, budget_bytes=memory_budget, storage=spec.storage
            )
        new_index(source.dim, factory)  # fail now on a factory that cannot work
        plan = {
            "collection": collection,
            "model_id": model_id,
            "modality": modality,
            "n": source.n,
            "dim": source.dim,
            "source": source.description,
            "spec": spec.as_dict(),
            "factory": factory,
        }
        work = data_dir / f"{BUILD_PREFIX}{collection}"
        state = _resume(work, plan)
        return _run(
            work, data_dir, plan, state, source, spec, progress, checkpoint_every, stop_after
        )
    finally:
        os.close(lock)


def _resume(work: Path, plan: dict[str, Any]) -> dict[str, Any]:
    state_file = work / STATE
    if state_file.exists():
        state = json.loads(state_file.read_text())
        if state["plan"] != plan:
            raise BuildError(
                f"{work} holds an unfinished build with other settings; remove it to start over"
            )
        return state
    shutil.rmtree(work, ignore_errors=True)
    (work / "collection").mkdir(parents=True)
    state = {"plan": plan, "ingested": 0, "trained": False, "added": 0}
    _save_state(work, state)
    return state


def _save_state(work: Path, state: dict[str, Any]) -> None:
    data = json.dumps(state, indent=1).encode()
    wal.atomic_write(work / STATE, lambda f: f.write(data))


def _run(
    work: Path,
    data_dir: Path,
    plan: dict[str, Any],
    state: dict[str, Any],
    source: Source,
    spec: IndexSpec,
    progress: Callable[[str, int, int], None] | None,
    checkpoint_every: int,
    stop_after: Callable[[str, int], bool] | None,
) -> Path:
    report = progress or (lambda stage, done, total: None)
    stop = stop_after or (lambda stage, done: False)
    n, dim, modality = source.n, source.dim, plan["modality"]
    dtype = np.dtype(np.float16 if spec.storage == STORAGE_FLOAT16_MMAP else np.float32)
    collection_dir = work / "collection"
    tmp = collection_dir / f"{snapshots.TMP_PREFIX}{1:010d}"
    tmp.mkdir(exist_ok=True)
    rows_file = tmp / f"{modality}.vectors"

    # 1. Rows, in the collection's storage dtype, straight into the snapshot being made.
    with rows_file.open("ab") as f:
        # Rows past the checkpoint may be half written: drop them, then make room for all.
        f.truncate(state["ingested"] * dim * dtype.itemsize)
        f.truncate(n * dim * dtype.itemsize)
    rows = np.memmap(rows_file, dtype=dtype, mode="r+", shape=(n, dim)) if n else None
    start = state["ingested"]
    report("ingest", start, n)
    while start < n:
        stop_row = min(n, start + _INGEST_CHUNK)
        assert rows is not None
        chunk = source.read(start, stop_row)
        if not np.isfinite(chunk).all():
            raise BuildError(f"rows {start}..{stop_row} hold non-finite values")
        rows[start:stop_row] = chunk
        start = stop_row
        if start == n or start % _INGEST_CHECKPOINT == 0:
            rows.flush()
            state["ingested"] = start
            _save_state(work, state)
        report("ingest", start, n)
        if stop("ingest", start):
            return work
    report("ingest", n, n)
    ids = source.ids()

    # 2. Training, on the same sample size the service uses.
    trained_file, partial_file = work / "trained.index", work / "partial.index"
    if state["added"]:
        index = faiss.read_index(str(partial_file))
    elif state["trained"]:
        index = faiss.read_index(str(trained_file))
    else:
        index = new_index(dim, plan["factory"], ef_construction=spec.ef_construction)
        if not index.is_trained:
            if n < min_train_size(index):
                raise BuildError(
                    f"{plan['factory']} needs {min_train_size(index)} vectors to train"
                )
            size = min(n, train_sample_size(index))
            picked = np.sort(np.random.default_rng(n).choice(n, size, replace=False))
            assert rows is not None
            sample = np.ascontiguousarray(rows[picked], dtype=np.float32)
            report("train", 0, size)
            index.train(sample)
            del sample
            report("train", size, size)
        faiss.write_index(index, str(trained_file))
        state["trained"] = True
        _save_state(work, state)
        if stop("train", n):
            return work

    # 3. Filling, with a checkpoint of the partial index now and then.
    added = state["added"]
    since = 0
    report("add", added, n)
    while added < n:
        assert rows is not None
        stop_row = min(n, added + _INGEST_CHUNK)
        index.add_with_ids(
            np.ascontiguousarray(rows[added:stop_row], dtype=np.float32), ids[added:stop_row]
        )
        since += stop_row - added
        added = stop_row
        report("add", added, n)
        if since >= checkpoint_every and added < n:
            faiss.write_index(index, str(partial_file) + ".tmp")
            os.replace(str(partial_file) + ".tmp", partial_file)
            state["added"] = added
            _save_state(work, state)
            since = 0
            if stop("add", added):
                return work
    report("add", n, n)
    order_for_locality(index)

    # 4. The snapshot and metadata, then the collection appears in one rename.
    del rows
    captured = {}
    for m in MODALITIES:
        if m == modality:
            set_state = SetState(factory=plan["factory"], built_n=n, index=index)
            captured[m] = snapshots.Captured(
                ids, dtype.name, None, faiss.serialize_index(index), set_state
            )
        else:
            empty = np.empty((0, dim), dtype=dtype)
            captured[m] = snapshots.Captured(
                np.empty(0, np.int64), dtype.name, empty, None, SetState()
            )
    report("write", 0, 1)
    snapshots.write(collection_dir, tmp, 1, dim, captured)
    write_meta(collection_dir, plan["collection"], plan["model_id"], dim, spec)
    final = data_dir / plan["collection"]
    os.rename(collection_dir, final)
    wal.fsync_dir(data_dir)
    shutil.rmtree(work)
    report("write", 1, 1)
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.retrieval.build",
        description="Bulk-build a collection for the retrieval service (resumable).",
    )
    parser.add_argument("--data-dir", type=Path, default=Path("var/retrieval"))
    parser.add_argument("--collection", required=True)
    parser.add_argument("--model-id", required=True)
    parser.add_argument("--modality", choices=MODALITIES, default="image")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--vectors", type=Path, help="a .npy float matrix, one row per vector")
    source.add_argument("--synthetic", type=int, metavar="N", help="N CLIP-like vectors")
    parser.add_argument("--ids", type=Path, help="a .npy int64 vector of ids (default 0..n-1)")
    parser.add_argument("--dim", type=int, default=512, help="with --synthetic")
    parser.add_argument("--seed", type=int, default=0, help="with --synthetic")
    parser.add_argument("--index", default=FACTORY_AUTO, help="Faiss factory string or auto")
    parser.add_argument("--storage", choices=STORAGES, default="float32")
    parser.add_argument("--nprobe", type=int)
    parser.add_argument("--ef-search", type=int)
    parser.add_argument("--rescore-factor", type=int, default=4)
    parser.add_argument("--ef-construction", type=int)
    parser.add_argument("--memory-budget-gib", type=float, default=8.0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--checkpoint-every", type=int, default=1_000_000)
    args = parser.parse_args(argv)

    faiss.omp_set_num_threads(args.threads)
    spec = IndexSpec.from_dict(
        {
            "factory": args.index,
            "storage": args.storage,
            "nprobe": args.nprobe,
            "ef_search": args.ef_search,
            "rescore_factor": args.rescore_factor,
            "ef_construction": args.ef_construction,
        }
    )
    if args.vectors is not None:
        src = npy_source(args.vectors, args.ids)
    else:
        src = synthetic_source(args.synthetic, args.dim, args.seed)
    started = time.monotonic()
    try:
        path = build(
            args.data_dir,
            args.collection,
            model_id=args.model_id,
            modality=args.modality,
            source=src,
            spec=spec,
            memory_budget=int(args.memory_budget_gib * (1 << 30)),
            progress=Progress(),
            checkpoint_every=args.checkpoint_every,
        )
    except Exception as exc:
        print(f"build failed: {exc}", file=sys.stderr)
        return 1
    print(f"built {path} ({src.n:,} vectors) in {_duration(time.monotonic() - started)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
