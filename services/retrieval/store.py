"""Vector collections: the domain of the retrieval service.

A ``Store`` holds named ``Collection``s (``model_id``, ``dim``); each collection holds one
``VectorSet`` per modality (``image``, ``text``). In a vector set the float32 vectors keyed by
int64 id are the source of truth; the Faiss index (``IndexIDMap2`` over the configured factory
index, inner product) is derived from them, rebuilt on load and used only to pick candidates,
which are then re-scored exactly against the stored vectors.

On disk, one directory per collection: ``meta.json`` (name, model_id, dim), ``snapshot.npz`` (all
vectors, and the first log generation it does not cover) and ``wal-<generation>.log`` files.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import faiss
import numpy as np

from services.retrieval import wal
from services.retrieval.wal import MODALITIES, Delete, Record, Upsert, WalWriter
from shared.collections import COLLECTION_NAME_PATTERN, is_collection_name
from shared.problems import Conflict, NotFound, ServiceUnavailable, Unprocessable

log = logging.getLogger(__name__)

INT64_MAX = 2**63 - 1
MAX_DIM = 8192

_META = "meta.json"
_SNAPSHOT = "snapshot.npz"
_TMP_PREFIX = ".tmp-"

# Allow-lists up to this many live vectors are searched exactly: cheaper than a filtered index
# search at that size, and exact.
EXACT_FILTER_MAX = 8192
# Indexes that cannot delete (HNSW, or IVF whose ids IndexIDMap cannot compact) keep stale
# entries, hidden from results; the index is rebuilt once they exceed this share of the live
# vectors, so rebuild cost stays proportional to the writes that caused it.
_STALE_SHARE = 4
_STALE_MIN = 1024
# Factories that need training (IVF, PQ, SQ) are trained once enough vectors exist and retrained
# each time the set doubles, on a sample of at most this many vectors; until then searches are
# exact.
_TRAIN_MIN = 1000
_TRAIN_SAMPLE = 100_000
# Bound on the (queries x vectors) score matrix of an exact search, in float32 elements.
_EXACT_BLOCK = 1 << 24

Hit = tuple[int, float]


class CollectionNotFound(NotFound):
    code = "collection_not_found"


class ModelMismatch(Conflict):
    code = "model_mismatch"


class DimensionMismatch(Unprocessable):
    code = "dimension_mismatch"


class CollectionUnavailable(ServiceUnavailable):
    code = "collection_unavailable"


class RWLock:
    """Many readers or one writer; a waiting writer blocks new readers so writes cannot starve."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def new_index(dim: int, factory: str) -> faiss.IndexIDMap2:
    return faiss.IndexIDMap2(faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT))


def _innermost(index: faiss.Index) -> faiss.Index:
    inner = faiss.downcast_index(index.index)
    while isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    return inner


class VectorSet:
    """One modality of a collection. Not thread-safe: ``Collection`` serialises access."""

    def __init__(
        self,
        dim: int,
        factory: str,
        *,
        rescore_factor: int = 4,
        exact_filter_max: int = EXACT_FILTER_MAX,
        ids: np.ndarray | None = None,
        vectors: np.ndarray | None = None,
        build: bool = True,
    ) -> None:
        self.dim = dim
        self.factory = factory
        self.rescore_factor = rescore_factor
        self.exact_filter_max = exact_filter_max
        self._ids = np.empty(0, dtype=np.int64)
        self._vecs = np.empty((0, dim), dtype=np.float32)
        self._n = 0
        self._row: dict[int, int] = {}
        self._index: faiss.IndexIDMap2 | None = None
        self._index_kind = "plain"
        self._compacting = False  # whether the index can really delete
        self._dead: set[int] = set()  # ids with index entries but no live vector
        self._dead_selector: faiss.IDSelector | None = None
        self._needs_training = False
        self._trained_on = 0
        self._deferred = not build  # while replaying a log, build the index once at the end
        if ids is not None and vectors is not None and len(ids):
            self._append(ids, vectors)
        if build:
            self.rebuild()

    def __len__(self) -> int:
        return self._n

    @property
    def ids(self) -> np.ndarray:
        return self._ids[: self._n]

    @property
    def vectors(self) -> np.ndarray:
        return self._vecs[: self._n]

    @property
    def index_size(self) -> int:
        """Entries in the Faiss index, stale ones included; 0 while there is no index."""
        return 0 if self._index is None else int(self._index.ntotal)

    def get(self, id_: int) -> np.ndarray | None:
        row = self._row.get(id_)
        return None if row is None else self._vecs[row].copy()

    def contains(self, ids: np.ndarray) -> bool:
        """Whether any of ``ids`` is stored."""
        return any(i in self._row for i in ids.tolist())

    # -- writes ------------------------------------------------------------------------------

    def upsert(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Insert or replace; ``ids`` must be unique."""
        rows = [self._row.get(i) for i in ids.tolist()]
        old = np.fromiter((r is not None for r in rows), dtype=bool, count=len(rows))
        if old.any():
            self._vecs[[r for r in rows if r is not None]] = vectors[old]
        self._append(ids[~old], vectors[~old])
        if self._index is None:
            self._maybe_train()
            return
        if self._compacting:
            if old.any():
                self._index.remove_ids(faiss.IDSelectorBatch(ids[old]))
        else:
            if self._dead.intersection(ids.tolist()):
                self._dead.difference_update(ids.tolist())
                self._dead_selector = None
        self._index.add_with_ids(vectors, ids)
        self._maybe_compact()

    def delete(self, ids: np.ndarray) -> int:
        removed: list[int] = []
        for id_ in ids.tolist():
            row = self._row.pop(id_, None)
            if row is None:
                continue
            # Move the last vector into the hole, so the arrays stay dense.
            last = self._n - 1
            if row != last:
                moved = int(self._ids[last])
                self._ids[row] = moved
                self._vecs[row] = self._vecs[last]
                self._row[moved] = row
            self._n = last
            removed.append(id_)
        if removed and self._index is not None:
            if self._compacting:
                self._index.remove_ids(faiss.IDSelectorBatch(np.asarray(removed, np.int64)))
            else:
                self._dead.update(removed)
                self._dead_selector = None
                self._maybe_compact()
        if len(self._ids) > 1024 and self._n < len(self._ids) // 4:
            self._resize(2 * self._n)
        return len(removed)

    def _append(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        m = len(ids)
        if not m:
            return
        if self._n + m > len(self._ids):
            self._resize(max(self._n + m, 2 * len(self._ids), 64))
        self._ids[self._n : self._n + m] = ids
        self._vecs[self._n : self._n + m] = vectors
        self._row.update(zip(ids.tolist(), range(self._n, self._n + m), strict=True))
        self._n += m

    def _resize(self, capacity: int) -> None:
        ids = np.empty(capacity, dtype=np.int64)
        vecs = np.empty((capacity, self.dim), dtype=np.float32)
        ids[: self._n] = self._ids[: self._n]
        vecs[: self._n] = self._vecs[: self._n]
        self._ids, self._vecs = ids, vecs

    # -- index ---------------------------------------------------------------------------------

    def finish_load(self) -> None:
        self._deferred = False
        self.rebuild()

    def rebuild(self) -> None:
        """Build a fresh index from the stored vectors (dropping stale entries)."""
        index = new_index(self.dim, self.factory)
        n = self._n
        self._needs_training = not index.is_trained
        if self._needs_training:
            self._trained_on = n
            if n < _TRAIN_MIN:
                self._index = None
                return
            sample = self.vectors
            if n > _TRAIN_SAMPLE:
                rows = np.random.default_rng(n).choice(n, _TRAIN_SAMPLE, replace=False)
                sample = sample[np.sort(rows)]
            try:
                index.train(np.ascontiguousarray(sample))
            except RuntimeError as exc:  # e.g. fewer points than the factory's clusters
                log.info("index %r not trained on %d vectors: %s", self.factory, n, exc)
                self._index = None
                return
        if n:
            index.add_with_ids(self.vectors, self.ids)
        inner = _innermost(index)
        # IndexIDMap can only delete from indexes that compact their storage in order
        # (IndexFlatCodes: Flat, SQ, PQ); IVF would silently misalign ids, HNSW refuses.
        self._compacting = isinstance(inner, faiss.IndexFlatCodes)
        if isinstance(inner, faiss.IndexHNSW):
            self._index_kind = "hnsw"
        elif isinstance(inner, faiss.IndexIVF):
            self._index_kind = "ivf"
        else:
            self._index_kind = "plain"
        self._index = index
        self._dead.clear()
        self._dead_selector = None

    def _maybe_train(self) -> None:
        if not self._deferred and self._n >= max(_TRAIN_MIN, 2 * self._trained_on):
            self.rebuild()

    def _maybe_compact(self) -> None:
        if self._index is None or self._deferred:
            return
        # Retrain as the set doubles, so the quantizer keeps matching the data.
        retrain = (
            self._needs_training
            and self._trained_on < _TRAIN_SAMPLE
            and self._n >= 2 * self._trained_on
        )
        stale = self.index_size - self._n
        if retrain or stale > max(_STALE_MIN, self._n // _STALE_SHARE):
            self.rebuild()

    # -- search --------------------------------------------------------------------------------

    def search(
        self, queries: np.ndarray, k: int, allow: np.ndarray | None = None
    ) -> list[list[Hit]]:
        """Best-first (id, exact score) per query; with ``allow``, only those ids. Returns
        ``min(k, eligible vectors)`` hits per query."""
        empty: list[list[Hit]] = [[] for _ in range(len(queries))]
        if not self._n:
            return empty
        rows: np.ndarray | None = None
        if allow is not None:
            rows = self._rows_of(np.unique(allow))
            if not rows.size:
                return empty
        eligible = self._n if rows is None else rows.size
        fetch = k * self.rescore_factor
        if self.index_size > self._n:
            # Stale entries of overwritten ids take candidate slots in proportion to their share.
            fetch = -(-fetch * self.index_size // self._n)
        if (
            self._index is None
            or fetch >= eligible
            or (rows is not None and rows.size <= self.exact_filter_max)
        ):
            return self._exact(queries, k, rows)
        if rows is not None:
            selector = faiss.IDSelectorBatch(self._ids[rows])
        else:
            selector = self._dead_ids_selector()
        labels = self._index_search(queries, fetch, selector)
        want = min(k, eligible)
        results = []
        for q, query in enumerate(queries):
            hits = self._rescore(query, labels[q], k)
            width = fetch
            # Too few distinct live candidates (stale duplicates, a restrictive filter, an IVF
            # probing few lists): widen the search, and at the end fall back to exact.
            while len(hits) < want and width < self.index_size:
                width = min(2 * width, self.index_size)
                wider = self._index_search(queries[q : q + 1], width, selector)
                hits = self._rescore(query, wider[0], k)
            if len(hits) < want:
                hits = self._exact(queries[q : q + 1], k, rows)[0]
            results.append(hits)
        return results

    def _rows_of(self, ids: np.ndarray) -> np.ndarray:
        get = self._row.get
        rows = [r for r in map(get, ids.tolist()) if r is not None]
        return np.asarray(rows, dtype=np.int64)

    def _dead_ids_selector(self) -> faiss.IDSelector | None:
        if not self._dead:
            return None
        if self._dead_selector is None:
            dead = faiss.IDSelectorBatch(np.fromiter(self._dead, np.int64, len(self._dead)))
            selector = faiss.IDSelectorNot(dead)
            selector.referenced_objects = [dead]  # the C++ object only borrows it
            self._dead_selector = selector
        return self._dead_selector

    def _index_search(
        self, queries: np.ndarray, k: int, selector: faiss.IDSelector | None
    ) -> np.ndarray:
        assert self._index is not None
        if selector is None:
            _, labels = self._index.search(queries, k)
            return labels
        # A new parameter object per call: IndexIDMap swaps its selector during the search, so
        # one shared between threads would race. Each index family takes its own class.
        if self._index_kind == "hnsw":
            params: faiss.SearchParameters = faiss.SearchParametersHNSW(sel=selector)
        elif self._index_kind == "ivf":
            params = faiss.SearchParametersIVF(sel=selector)
        else:
            params = faiss.SearchParameters(sel=selector)
        _, labels = self._index.search(queries, k, params=params)
        return labels

    def _rescore(self, query: np.ndarray, labels: np.ndarray, k: int) -> list[Hit]:
        candidates = np.unique(labels[labels >= 0])  # also folds stale duplicates of an id
        rows = self._rows_of(candidates)
        if not rows.size:
            return []
        ids = self._ids[rows]
        scores = self._vecs[rows] @ query
        return _top(ids, scores, k)

    def _exact(self, queries: np.ndarray, k: int, rows: np.ndarray | None) -> list[list[Hit]]:
        ids = self.ids if rows is None else self._ids[rows]
        vectors = self.vectors if rows is None else self._vecs[rows]
        block = max(1, _EXACT_BLOCK // max(1, len(ids)))
        results: list[list[Hit]] = []
        for start in range(0, len(queries), block):
            scores = queries[start : start + block] @ vectors.T
            results.extend(_top(ids, row, k) for row in scores)
        return results


def _top(ids: np.ndarray, scores: np.ndarray, k: int) -> list[Hit]:
    if len(ids) > k:
        part = np.argpartition(-scores, k - 1)[:k]
        ids, scores = ids[part], scores[part]
    order = np.lexsort((ids, -scores))  # best first; equal scores by id, so answers are stable
    return list(zip(ids[order].tolist(), scores[order].tolist(), strict=True))


def _check_ids(ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise Unprocessable("ids must be a list of integers")
    if ids.size and (ids.min() < 0 or ids.max() > INT64_MAX):
        raise Unprocessable(f"ids must be between 0 and {INT64_MAX}")
    return ids.astype(np.int64, copy=False)


def _check_modality(modality: str) -> None:
    if modality not in MODALITIES:
        raise Unprocessable(f"modality must be one of {', '.join(MODALITIES)}")


class Collection:
    """A named set of image and text vectors of one model. Thread-safe.

    Locks, always taken in this order: ``_snapshot_lock`` (one snapshot at a time), ``_wal_lock``
    (serialises writers, so the log order is the apply order), ``_rw`` (searches share it; a
    writer takes it exclusively only to apply a change already durable in the log, so searches
    never wait on an fsync and never see half a write).
    """

    def __init__(
        self,
        path: Path,
        name: str,
        model_id: str,
        dim: int,
        *,
        index_factory: str = "Flat",
        rescore_factor: int = 4,
        snapshot_every: int = 10_000,
        exact_filter_max: int = EXACT_FILTER_MAX,
    ) -> None:
        self.path = path
        self.name = name
        self.model_id = model_id
        self.dim = dim
        self.snapshot_every = snapshot_every
        self._set_options: dict[str, Any] = {
            "rescore_factor": rescore_factor,
            "exact_filter_max": exact_filter_max,
        }
        self._factory = index_factory
        self._sets: dict[str, VectorSet] = {}
        self._rw = RWLock()
        self._wal_lock = threading.Lock()
        self._snapshot_lock = threading.Lock()
        self._wal: WalWriter | None = None
        self._generation = 1  # of the log being appended to
        self._snapshot_generation = 1  # first log generation the snapshot on disk lacks
        self._older_wal_bytes = 0  # logs already covered by a snapshot in progress
        self._writes = 0  # records since the last snapshot
        self._closed = False
        self.failure: str | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    @classmethod
    def create(cls, root: Path, name: str, model_id: str, dim: int, **options: Any) -> Collection:
        """Create the collection's directory atomically: fully there with its metadata, or
        absent (a crash leaves only a ``.tmp-`` directory, removed on the next load)."""
        tmp = root / f"{_TMP_PREFIX}{name}-{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        meta = json.dumps({"name": name, "model_id": model_id, "dim": dim}).encode()
        wal.atomic_write(tmp / _META, lambda f: f.write(meta))
        tmp.rename(root / name)
        wal.fsync_dir(root)
        return cls.open(root / name, **options)

    @classmethod
    def open(cls, path: Path, **options: Any) -> Collection:
        """Load the snapshot, replay the logs after it and build the indexes."""
        meta = json.loads((path / _META).read_text())
        if meta.get("name") != path.name:
            raise ValueError(f"{path}: metadata names collection {meta.get('name')!r}")
        self = cls(path, meta["name"], str(meta["model_id"]), int(meta["dim"]), **options)
        self._load_snapshot()
        present = wal.generations(path)
        for generation in present:
            if generation < self._snapshot_generation:
                # Covered by the snapshot; left by a crash between the snapshot and the cleanup.
                wal.wal_path(path, generation).unlink()
        replayed = [g for g in present if g >= self._snapshot_generation]
        valid_bytes = 0
        for generation in replayed:
            file = wal.wal_path(path, generation)
            last = generation == replayed[-1]
            result = wal.replay(file, self._apply, allow_torn_tail=last)
            self._writes += result.records
            valid_bytes = result.valid_bytes
            if last and result.discarded_bytes:
                log.warning(
                    "collection %s: discarded a torn log tail of %d bytes in %s",
                    self.name,
                    result.discarded_bytes,
                    file.name,
                )
            if not last:
                self._older_wal_bytes += file.stat().st_size
        self._generation = replayed[-1] if replayed else self._snapshot_generation
        self._wal = WalWriter(wal.wal_path(path, self._generation))
        if replayed:
            # Appends must not land behind a torn record.
            self._wal.truncate(valid_bytes)
        for vector_set in self._sets.values():
            vector_set.finish_load()
        return self

    def _load_snapshot(self) -> None:
        file = self.path / _SNAPSHOT
        if not file.exists():
            for modality in MODALITIES:
                self._sets[modality] = self._new_set(build=False)
            return
        with np.load(file, allow_pickle=False) as data:
            if int(data["dim"]) != self.dim:
                raise ValueError(f"{file}: dimension {int(data['dim'])}, expected {self.dim}")
            self._snapshot_generation = int(data["generation"])
            for modality in MODALITIES:
                ids = data[f"{modality}_ids"]
                if len(np.unique(ids)) != len(ids):
                    raise ValueError(f"{file}: duplicate {modality} ids")
                self._sets[modality] = self._new_set(
                    ids=ids, vectors=data[f"{modality}_vectors"], build=False
                )

    def _new_set(self, **kwargs: Any) -> VectorSet:
        return VectorSet(self.dim, self._factory, **self._set_options, **kwargs)

    def close(self, *, snapshot: bool = True) -> None:
        """Stop accepting writes; with ``snapshot``, first fold the log into a snapshot."""
        if snapshot and not self.failure:
            self.snapshot()
        with self._wal_lock:
            self._closed = True
            if self._wal is not None:
                self._wal.close()

    # -- reads ---------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        with self._rw.read():
            return {m: len(s) for m, s in self._sets.items()}

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model_id": self.model_id,
            "dim": self.dim,
            "counts": self.counts(),
        }

    def get(self, modality: str, id_: int) -> np.ndarray | None:
        _check_modality(modality)
        with self._rw.read():
            return self._sets[modality].get(id_)

    @property
    def wal_bytes(self) -> int:
        current = self._wal.size if self._wal is not None else 0
        return current + self._older_wal_bytes

    @property
    def snapshot_due(self) -> bool:
        return self._writes >= self.snapshot_every

    def check_model(self, model_id: str | None) -> None:
        if model_id is not None and model_id != self.model_id:
            raise ModelMismatch(
                f"collection {self.name!r} holds vectors of model {self.model_id!r}, "
                f"not {model_id!r}"
            )

    def check_dim(self, dim: int) -> None:
        if dim != self.dim:
            raise DimensionMismatch(
                f"collection {self.name!r} holds {self.dim}-dimensional vectors, got {dim}"
            )

    def search(
        self,
        modality: str,
        queries: np.ndarray,
        top_k: int,
        *,
        allow: np.ndarray | None = None,
        model_id: str | None = None,
    ) -> list[list[Hit]]:
        _check_modality(modality)
        self.check_model(model_id)
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2:
            raise Unprocessable("queries must be a matrix")
        self.check_dim(queries.shape[1])
        if not np.isfinite(queries).all():
            raise Unprocessable("query vectors must be finite")
        if not np.all(np.linalg.norm(queries, axis=1) > 0):
            raise Unprocessable("a query vector has zero norm", code="zero_vector")
        if top_k < 1:
            raise Unprocessable("top_k must be at least 1")
        allow_ids = None if allow is None else _check_ids(allow)
        self._check_usable()
        with self._rw.read():
            return self._sets[modality].search(np.ascontiguousarray(queries), top_k, allow_ids)

    # -- writes --------------------------------------------------------------------------------

    def upsert(
        self,
        modality: str,
        ids: np.ndarray,
        vectors: np.ndarray,
        *,
        model_id: str | None = None,
    ) -> int:
        """Insert or replace vectors; returns the modality's count. Durable when it returns."""
        _check_modality(modality)
        self.check_model(model_id)
        ids = _check_ids(ids)
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(ids):
            raise Unprocessable("vectors must be a matrix with one row per id")
        self.check_dim(vectors.shape[1])
        if not np.isfinite(vectors).all():
            raise Unprocessable("vectors must be finite float32 values")
        if len(np.unique(ids)) != len(ids):
            raise Unprocessable("ids must be unique within a request")
        record = Upsert(modality, ids, np.ascontiguousarray(vectors))
        self._write(record)
        return len(self._sets[modality])

    def delete(self, ids: np.ndarray, modality: str | None = None) -> int:
        """Delete ids (from one modality, or both); unknown ids are ignored. Returns how many
        vectors were removed."""
        if modality is not None:
            _check_modality(modality)
        ids = _check_ids(ids)
        modalities = MODALITIES if modality is None else (modality,)
        with self._rw.read():
            present = any(self._sets[m].contains(ids) for m in modalities)
        if not present:
            return 0  # nothing to log
        return self._write(Delete(modalities, ids))

    def _write(self, record: Record) -> int:
        data = wal.encode(record)
        with self._wal_lock:
            self._check_usable()
            assert self._wal is not None
            self._wal.append(data)  # durable from here on
            try:
                with self._rw.write():
                    changed = self._apply(record)
            except Exception as exc:
                # The log has the write but memory may hold half of it: stop serving this
                # collection rather than answer from a state the log does not describe.
                self.failure = f"applying a logged write failed: {exc!r}"
                log.exception("collection %s: %s", self.name, self.failure)
                raise
            self._writes += 1
            return changed

    def _apply(self, record: Record) -> int:
        if isinstance(record, Upsert):
            self._sets[record.modality].upsert(record.ids, record.vectors)
            return len(record.ids)
        return sum(self._sets[m].delete(record.ids) for m in record.modalities)

    def _check_usable(self) -> None:
        if self.failure:
            raise CollectionUnavailable(f"collection {self.name!r} is unavailable; restart")
        if self._closed:
            raise CollectionUnavailable(f"collection {self.name!r} is closed")

    # -- snapshots -----------------------------------------------------------------------------

    def snapshot(self, *, wait: bool = True) -> bool:
        """Write all vectors to a new snapshot and drop the logs it covers. Returns False when
        there was nothing new, or (``wait=False``) another snapshot was running."""
        if not self._snapshot_lock.acquire(blocking=wait):
            return False
        try:
            with self._wal_lock:
                if self._closed or self.failure:
                    return False
                assert self._wal is not None
                if not self._wal.size and self._generation == self._snapshot_generation:
                    return False
                # Copy the arrays and switch to a new log while writers wait; the slow part,
                # writing the file, then runs while writes and searches go on. Until the new
                # snapshot is in place the old one plus every log stays valid for recovery.
                arrays: dict[str, np.ndarray] = {"dim": np.asarray(self.dim)}
                for modality, vector_set in self._sets.items():
                    arrays[f"{modality}_ids"] = vector_set.ids.copy()
                    arrays[f"{modality}_vectors"] = vector_set.vectors.copy()
                generation = self._generation + 1
                arrays["generation"] = np.asarray(generation)
                new_wal = WalWriter(wal.wal_path(self.path, generation))
                self._older_wal_bytes += self._wal.size
                self._wal.close()
                self._wal, self._generation, self._writes = new_wal, generation, 0

            def write(f: BinaryIO) -> None:
                np.savez(f, **arrays)

            wal.atomic_write(self.path / _SNAPSHOT, write)
            self._snapshot_generation = generation
            for old in wal.generations(self.path):
                if old < generation:
                    wal.wal_path(self.path, old).unlink()
            wal.fsync_dir(self.path)
            self._older_wal_bytes = 0
            return True
        finally:
            self._snapshot_lock.release()


class Store:
    """All collections under one data directory."""

    def __init__(
        self,
        root: Path,
        *,
        index_factory: str = "Flat",
        rescore_factor: int = 4,
        snapshot_every: int = 10_000,
        exact_filter_max: int = EXACT_FILTER_MAX,
    ) -> None:
        self.root = Path(root)
        self._options: dict[str, Any] = {
            "index_factory": index_factory,
            "rescore_factor": rescore_factor,
            "snapshot_every": snapshot_every,
            "exact_filter_max": exact_filter_max,
        }
        self._collections: dict[str, Collection] = {}
        self._lock = threading.Lock()
        self.loaded = False

    def load(self) -> None:
        """Open every collection under the root (blocking: run it off the event loop)."""
        self.root.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        for path in sorted(self.root.iterdir()):
            if path.name.startswith(_TMP_PREFIX):
                shutil.rmtree(path)  # a creation interrupted by a crash, never acknowledged
            elif path.is_dir() and is_collection_name(path.name) and (path / _META).exists():
                self._collections[path.name] = Collection.open(path, **self._options)
            else:
                log.warning("ignoring %s in the data directory", path)
        self.loaded = True
        log.info(
            "loaded %d collections in %.2fs",
            len(self._collections),
            time.perf_counter() - started,
        )

    def collections(self) -> list[Collection]:
        with self._lock:
            return [self._collections[name] for name in sorted(self._collections)]

    def get(self, name: str) -> Collection:
        with self._lock:
            collection = self._collections.get(name)
        if collection is None:
            raise CollectionNotFound(f"collection {name!r} does not exist")
        return collection

    def get_or_create(self, name: str, model_id: str, dim: int) -> Collection:
        """The collection, created on first use; its model and dimension must match."""
        if not is_collection_name(name):
            raise Unprocessable(f"collection names must match {COLLECTION_NAME_PATTERN}")
        with self._lock:
            collection = self._collections.get(name)
            if collection is None:
                if not 1 <= dim <= MAX_DIM:
                    raise DimensionMismatch(f"dimension must be between 1 and {MAX_DIM}")
                try:
                    new_index(dim, str(self._options["index_factory"]))
                except RuntimeError:
                    raise DimensionMismatch(
                        f"the index {self._options['index_factory']!r} does not support "
                        f"{dim}-dimensional vectors"
                    ) from None
                collection = Collection.create(self.root, name, model_id, dim, **self._options)
                self._collections[name] = collection
        collection.check_model(model_id)
        collection.check_dim(dim)
        return collection

    def upsert(
        self, name: str, modality: str, model_id: str, ids: np.ndarray, vectors: np.ndarray
    ) -> int:
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2:
            raise Unprocessable("vectors must be a matrix")
        collection = self.get_or_create(name, model_id, vectors.shape[1])
        return collection.upsert(modality, ids, vectors, model_id=model_id)

    def failures(self) -> dict[str, str]:
        return {c.name: c.failure for c in self.collections() if c.failure}

    def close(self, *, snapshot: bool = True) -> None:
        for collection in self.collections():
            try:
                collection.close(snapshot=snapshot)
            except Exception:
                # Its log still holds every acknowledged write; go on closing the others.
                log.exception("closing collection %s failed", collection.name)
