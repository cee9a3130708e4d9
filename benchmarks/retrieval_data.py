"""Data and measurement helpers of ``benchmarks/retrieval.py``: the cached CLIP-like data set and
its exact ground truth, resident memory, and latency/throughput timing."""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from services.retrieval.synthetic import ClipLike  # noqa: E402

_CHUNK = 1 << 16


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Dataset:
    base: np.ndarray  # (n, dim) float32, memory-mapped
    queries: np.ndarray  # (q, dim) float32
    truth: np.ndarray  # (q, 100) int64: exact inner-product neighbours, best first
    signature: str

    @property
    def n(self) -> int:
        return len(self.base)

    @property
    def dim(self) -> int:
        return int(self.base.shape[1])


def load_dataset(cache: Path, n: int, dim: int, queries: int, seed: int) -> Dataset:
    """Base vectors, held-out queries (another stream of the same generator) and exact top-100
    ground truth, made once and cached; an interrupted generation resumes."""
    signature = f"clip-like-n{n}-d{dim}-q{queries}-s{seed}"
    directory = cache / signature
    directory.mkdir(parents=True, exist_ok=True)
    generator = ClipLike(dim, seed=seed)
    base_file, progress_file = directory / "base.f32", directory / "base.progress"
    done = int(progress_file.read_text()) if progress_file.exists() else 0
    mode = "r+" if base_file.exists() and base_file.stat().st_size == n * dim * 4 else "w+"
    if mode == "w+":
        done = 0
    base = np.memmap(base_file, dtype=np.float32, mode=mode, shape=(n, dim))
    while done < n:
        stop = min(n, done + _CHUNK)
        base[done:stop] = generator.rows(done, stop, stream=1)
        base.flush()
        done = stop
        progress_file.write_text(str(done))
        say(f"  data: {done:,}/{n:,} vectors")
    base = np.memmap(base_file, dtype=np.float32, mode="r", shape=(n, dim))
    query_file = directory / "queries.npy"
    if not query_file.exists():
        np.save(query_file, generator.rows(0, queries, stream=2))
    held_out = np.load(query_file)
    truth_file = directory / "truth.npy"
    if not truth_file.exists():
        say(f"  exact ground truth for {queries:,} queries over {n:,} vectors ...")
        np.save(truth_file, exact_neighbours(base, held_out, min(100, n)))
    truth = np.load(truth_file)
    return Dataset(base, held_out, truth, signature)


def exact_neighbours(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Top-k by inner product, exactly (Faiss' flat kernel), over the base in chunks."""
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_ids = np.empty((len(queries), 0), dtype=np.int64)
    step = 1 << 18
    for start in range(0, len(base), step):
        chunk = np.ascontiguousarray(base[start : start + step], dtype=np.float32)
        scores, ids = faiss.knn(
            queries, chunk, min(k, len(chunk)), metric=faiss.METRIC_INNER_PRODUCT
        )
        scores = np.concatenate((best_scores, scores), axis=1)
        ids = np.concatenate((best_ids, ids + start), axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(scores, order, axis=1)
        best_ids = np.take_along_axis(ids, order, axis=1)
    return best_ids


def recall_at(found: Sequence[Sequence[int]], truth: np.ndarray, k: int = 10) -> float:
    hits = [
        len(set(list(f)[:k]) & set(t[:k].tolist())) / k for f, t in zip(found, truth, strict=True)
    ]
    return float(np.mean(hits))


def rss_bytes() -> int:
    """Resident memory of this process and its children (some engines run helper processes)."""
    total = 0
    for pid in [os.getpid(), *_descendants(os.getpid())]:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found.append(child)
            found.extend(_descendants(child))
    return found


@dataclass
class Timing:
    recall: float
    p50_ms: float
    p99_ms: float


def time_queries(
    search: Callable[[np.ndarray], Sequence[int]], queries: np.ndarray, truth: np.ndarray
) -> Timing:
    """Single queries one after another: recall@10 and latency percentiles."""
    for q in queries[: min(20, len(queries))]:  # warm up caches and lazy initialisation
        search(q)
    found, latencies = [], []
    for q in queries:
        started = time.perf_counter()
        found.append(search(q))
        latencies.append(time.perf_counter() - started)
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    return Timing(recall_at(found, truth), 1000 * statistics.median(latencies), 1000 * p99)


def queries_per_second(
    search: Callable[[np.ndarray], Sequence[int]], queries: np.ndarray, threads: int
) -> float:
    """Single queries from ``threads`` threads at once, each over the whole query set."""
    barrier = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def work(offset: int) -> None:
        barrier.wait()
        try:
            for i in range(len(queries)):
                search(queries[(i + offset) % len(queries)])
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(t * 7,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    barrier.wait()
    started = time.perf_counter()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return threads * len(queries) / elapsed


def load_results(path: Path) -> dict[str, dict]:
    return json.loads(path.read_text()) if path.exists() else {}


def save_results(path: Path, results: dict[str, dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, path)
