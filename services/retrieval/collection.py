"""A collection: image and text vector sets of one model, their write-ahead log and snapshots.

On disk, one directory per collection: ``meta.json`` (name, model_id, dim, index settings), the
newest snapshot (``snapshots.py``) and ``wal-<generation>.log`` files; with memory-mapped storage
also the working files ``work-<modality>.f16``, rebuilt at every start.

Writes use group commit: each writer queues its encoded record; one of them (the leader) appends
every queued record with a single write and a single fdatasync, applies them in log order, and
wakes the others. Every write is still acknowledged only once it is on disk, but concurrent
writers share the fsync instead of queueing for one each.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.retrieval import indexing, snapshots, wal
from services.retrieval.errors import (
    CollectionUnavailable,
    DimensionMismatch,
    IndexSettingsConflict,
    ModelMismatch,
)
from services.retrieval.indexing import STORAGE_FLOAT16_MMAP, IndexSpec, SearchDepth
from services.retrieval.locks import RWLock
from services.retrieval.metrics import SNAPSHOT_SECONDS, WAL_COMMIT_RECORDS
from services.retrieval.storage import DenseVectors, MappedVectors, VectorStorage
from services.retrieval.vectors import (
    DEFAULT_MEMORY_BUDGET,
    EXACT_FILTER_MAX,
    INLINE_REBUILD_MAX,
    Hit,
    Scheduler,
    VectorSet,
)
from services.retrieval.wal import MODALITIES, Delete, Record, Upsert, WalWriter
from shared.contracts.retrieval import INT64_MAX
from shared.problems import Unprocessable

log = logging.getLogger(__name__)

FLOAT16_MAX = 65504.0

META = "meta.json"
TMP_PREFIX = ".tmp-"


@dataclass(eq=False)
class _Pending:
    """One write waiting for the group commit."""

    record: Record
    data: bytes
    done: bool = False
    changed: int = 0
    count: int = 0
    error: BaseException | None = None


class Collection:
    """A named set of image and text vectors of one model. Thread-safe.

    Locks, always taken in this order: ``_snapshot_lock`` (one snapshot at a time), ``_wal_lock``
    (held by the commit leader and by snapshot rotation, so the log order is the apply order),
    ``_rw`` (searches share it; the leader takes it exclusively only to apply writes already
    durable in the log, so searches never wait on an fsync and never see half a write; background
    index builds take it shared while copying rows and exclusively for the final swap).
    ``_commit`` guards only the queue of the group commit.
    """

    def __init__(
        self,
        path: Path,
        name: str,
        model_id: str,
        dim: int,
        *,
        spec: IndexSpec | None = None,
        index_factory: str | None = None,
        rescore_factor: int | None = None,
        snapshot_every: int = 10_000,
        exact_filter_max: int = EXACT_FILTER_MAX,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        scheduler: Scheduler | None = None,
        inline_rebuild_max: int = INLINE_REBUILD_MAX,
    ) -> None:
        spec = spec or IndexSpec()
        if index_factory is not None:
            spec = IndexSpec.from_dict({"factory": index_factory}, spec)
        if rescore_factor is not None:
            spec = IndexSpec.from_dict({"rescore_factor": rescore_factor}, spec)
        self.path = path
        self.name = name
        self.model_id = model_id
        self.dim = dim
        self.spec = spec
        self.snapshot_every = snapshot_every
        self._set_options: dict[str, Any] = {
            "exact_filter_max": exact_filter_max,
            "memory_budget": memory_budget,
            "scheduler": scheduler,
            "inline_rebuild_max": inline_rebuild_max,
        }
        self._sets: dict[str, VectorSet] = {}
        self._rw = RWLock()
        self._wal_lock = threading.Lock()
        self._snapshot_lock = threading.Lock()
        self._commit = threading.Condition(threading.Lock())
        self._queue: list[_Pending] = []
        self._leading = False
        self._wal: WalWriter | None = None
        self._generation = 1  # of the log being appended to
        self._snapshot_generation = 1  # first log generation the snapshot on disk lacks
        self._older_wal_bytes = 0  # logs already covered by a snapshot in progress
        self._writes = 0  # records since the last snapshot
        self._closed = False
        self.failure: str | None = None
        self.last_snapshot_at: float | None = None  # wall clock
        self.last_snapshot_seconds: float | None = None
        self.commits = 0  # fdatasyncs of the log, for group-commit accounting
        self.committed_records = 0

    # -- lifecycle -----------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        root: Path,
        name: str,
        model_id: str,
        dim: int,
        *,
        spec: IndexSpec | None = None,
        **options: Any,
    ) -> Collection:
        """Create the collection's directory atomically: fully there with its metadata, or
        absent (a crash leaves only a ``.tmp-`` directory, removed on the next load)."""
        spec = spec or IndexSpec()
        tmp = root / f"{TMP_PREFIX}{name}-{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        write_meta(tmp, name, model_id, dim, spec)
        tmp.rename(root / name)
        wal.fsync_dir(root)
        return cls.open(root / name, default_spec=spec, **options)

    @classmethod
    def open(
        cls, path: Path, *, default_spec: IndexSpec | None = None, **options: Any
    ) -> Collection:
        """Load the snapshot, replay the logs after it and build (or schedule) the indexes."""
        meta = json.loads((path / META).read_text())
        if meta.get("name") != path.name:
            raise ValueError(f"{path}: metadata names collection {meta.get('name')!r}")
        spec = default_spec or IndexSpec()
        if meta.get("index") is not None:
            spec = IndexSpec.from_dict(meta["index"], IndexSpec())
        self = cls(
            path, meta["name"], str(meta["model_id"]), int(meta["dim"]), spec=spec, **options
        )
        for modality in MODALITIES:
            self._sets[modality] = self._new_set(modality)
        snapshots.clean_unfinished(path)
        loaded = snapshots.load(path, self.dim, self._sets)
        if loaded is not None:
            self._snapshot_generation = loaded.generation
            self.last_snapshot_at = loaded.created_at
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
        with self._rw.write():
            for vector_set in self._sets.values():
                vector_set.finish_load()
        return self

    def _new_set(self, modality: str) -> VectorSet:
        storage: VectorStorage
        if self.spec.storage == STORAGE_FLOAT16_MMAP:
            storage = MappedVectors(self.path / f"work-{modality}.f16", self.dim)
        else:
            storage = DenseVectors(self.dim)
        return VectorSet(
            self.dim,
            self.spec,
            storage=storage,
            lock=self._rw,
            label=f"{self.name}/{modality}",
            build=False,
            **self._set_options,
        )

    def close(self, *, snapshot: bool = True) -> None:
        """Stop accepting writes; with ``snapshot``, first fold the log into a snapshot."""
        if snapshot and not self.failure:
            self.snapshot()
        with self._wal_lock:
            self._closed = True
            if self._wal is not None:
                self._wal.close()
        with self._rw.write():
            for vector_set in self._sets.values():
                vector_set.close()

    # -- reads ---------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        with self._rw.read():
            return {m: len(s) for m, s in self._sets.items()}

    def info(self) -> dict[str, Any]:
        with self._rw.read():
            counts = {m: len(s) for m, s in self._sets.items()}
            status = {m: s.stats() for m, s in self._sets.items()}
        return {
            "name": self.name,
            "model_id": self.model_id,
            "dim": self.dim,
            "counts": counts,
            "index": self.spec.as_dict(),
            "status": status,
        }

    def get(self, modality: str, id_: int) -> np.ndarray | None:
        _check_modality(modality)
        with self._rw.read():
            return self._sets[modality].get(id_)

    def ids(self, modality: str) -> np.ndarray:
        """Every id of a modality, ascending (an array that later writes do not change)."""
        _check_modality(modality)
        with self._rw.read():
            return self._sets[modality].sorted_ids()

    def stats(self, modality: str) -> dict[str, Any]:
        with self._rw.read():
            return self._sets[modality].stats()

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
        depth: SearchDepth | None = None,
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
        depth = depth or SearchDepth()
        depth.validate()
        allow_ids = None if allow is None else _check_ids(allow)
        self._check_usable()
        with self._rw.read():
            return self._sets[modality].search(
                np.ascontiguousarray(queries),
                top_k,
                allow_ids,
                nprobe=depth.nprobe,
                ef_search=depth.ef_search,
                rescore_factor=depth.rescore_factor,
            )

    # -- settings ------------------------------------------------------------------------------

    def update_spec(self, spec: IndexSpec) -> bool:
        """Change the index settings (persisted); a new factory is built like any rebuild.
        The storage cannot change in place. Returns whether anything changed."""
        spec.validate()
        if spec.storage != self.spec.storage:
            raise IndexSettingsConflict(
                f"collection {self.name!r} stores its vectors as {self.spec.storage}; the storage "
                "is chosen when a collection is created"
            )
        indexing.check_factory(self.dim, spec.factory)
        if spec == self.spec:
            return False
        with self._wal_lock:
            self._check_usable()
            write_meta(self.path, self.name, self.model_id, self.dim, spec)
            with self._rw.write():
                self.spec = spec
                for vector_set in self._sets.values():
                    vector_set.set_spec(spec)
        return True

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
        if (
            self.spec.storage == STORAGE_FLOAT16_MMAP
            and vectors.size
            and np.abs(vectors).max() > FLOAT16_MAX
        ):
            raise Unprocessable(
                f"this collection stores float16: components must be ≤ {FLOAT16_MAX}"
            )
        if len(np.unique(ids)) != len(ids):
            raise Unprocessable("ids must be unique within a request")
        record = Upsert(modality, ids, np.ascontiguousarray(vectors))
        return self._write(record).count

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
        return self._write(Delete(modalities, ids)).changed

    def _write(self, record: Record) -> _Pending:
        pending = _Pending(record, wal.encode(record))
        with self._commit:
            self._queue.append(pending)
            while not pending.done:
                if self._leading:
                    self._commit.wait()
                    continue
                # Lead: commit everything queued so far, ours included, in one go.
                self._leading = True
                batch, self._queue = self._queue, []
                self._commit.release()
                try:
                    self._flush(batch)
                finally:
                    self._commit.acquire()
                    self._leading = False
                    self._commit.notify_all()
        if pending.error is not None:
            raise pending.error
        return pending

    def _flush(self, batch: list[_Pending]) -> None:
        """Append, fsync and apply ``batch``; every entry ends done, with a result or error."""
        try:
            with self._wal_lock:
                self._check_usable()
                assert self._wal is not None
                self._wal.append(b"".join(p.data for p in batch))  # durable from here on
                self.commits += 1
                self.committed_records += len(batch)
                WAL_COMMIT_RECORDS.observe(len(batch))
                try:
                    with self._rw.write():
                        for pending in batch:
                            pending.changed = self._apply(pending.record)
                            if isinstance(pending.record, Upsert):
                                pending.count = len(self._sets[pending.record.modality])
                except Exception as exc:
                    # The log has the writes but memory may hold part of them: stop serving
                    # this collection rather than answer from a state the log does not describe.
                    self.failure = f"applying a logged write failed: {exc!r}"
                    log.exception("collection %s: %s", self.name, self.failure)
                    raise
                self._writes += len(batch)
        except BaseException as exc:
            for pending in batch:
                pending.error = exc
        finally:
            for pending in batch:
                pending.done = True

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
        """Write all vectors (and indexes) to a new snapshot and drop the logs it covers. Returns
        False when there was nothing new, or (``wait=False``) another snapshot was running."""
        if not self._snapshot_lock.acquire(blocking=wait):
            return False
        try:
            started = time.perf_counter()
            with self._wal_lock:
                if self._closed or self.failure:
                    return False
                assert self._wal is not None
                if not self._wal.size and self._generation == self._snapshot_generation:
                    return False
                # Capture the sets and switch to a new log while writers wait; the slow part,
                # writing the files, then runs while writes and searches go on. Until the new
                # snapshot is in place the old one plus every log stays valid for recovery.
                generation = self._generation + 1
                tmp = self.path / f"{snapshots.TMP_PREFIX}{generation:010d}"
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
                try:
                    with self._rw.read():  # no index swap while capturing
                        captured = {m: snapshots.capture(tmp, m, s) for m, s in self._sets.items()}
                    new_wal = WalWriter(wal.wal_path(self.path, generation))
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
                self._older_wal_bytes += self._wal.size
                self._wal.close()
                self._wal, self._generation, self._writes = new_wal, generation, 0
            try:
                created = snapshots.write(self.path, tmp, generation, self.dim, captured)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self._snapshot_generation = generation
            snapshots.remove_older(self.path, generation)
            self._older_wal_bytes = 0
            self.last_snapshot_at = created
            self.last_snapshot_seconds = time.perf_counter() - started
            SNAPSHOT_SECONDS.observe(self.last_snapshot_seconds)
            return True
        finally:
            self._snapshot_lock.release()


def write_meta(directory: Path, name: str, model_id: str, dim: int, spec: IndexSpec) -> None:
    meta = json.dumps(
        {"name": name, "model_id": model_id, "dim": dim, "index": spec.as_dict()}
    ).encode()
    wal.atomic_write(directory / META, lambda f: f.write(meta))


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
