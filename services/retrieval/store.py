"""The store: every collection under one data directory, and the background index builder.

The domain is split across modules: ``indexing`` (index settings, ``auto``, Faiss construction),
``storage`` (float32 or memory-mapped float16 rows), ``vectors`` (one modality: ids, rows, index,
search), ``collection`` (write-ahead log with group commit, snapshots), ``snapshots`` (the
snapshot format) and ``wal`` (the log format). The names tests and callers used from this
module before the split are re-exported here.
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from services.retrieval import wal
from services.retrieval.collection import (
    META,
    TMP_PREFIX,
    Collection,
)
from services.retrieval.errors import (
    CollectionNotFound,
    CollectionUnavailable,
    DimensionMismatch,
    InvalidIndexSettings,
    ModelMismatch,
)
from services.retrieval.indexing import IndexSpec, check_factory, use_threads
from services.retrieval.locks import RWLock
from services.retrieval.vectors import (
    DEFAULT_MEMORY_BUDGET,
    EXACT_FILTER_MAX,
    INLINE_REBUILD_MAX,
    VectorSet,
)
from shared.collections import COLLECTION_NAME_PATTERN, is_collection_name
from shared.contracts.retrieval import INT64_MAX, MAX_DIM
from shared.problems import Unprocessable

__all__ = [
    "EXACT_FILTER_MAX",
    "INT64_MAX",
    "MAX_DIM",
    "Collection",
    "CollectionNotFound",
    "CollectionUnavailable",
    "DataDirectoryLocked",
    "DimensionMismatch",
    "InvalidIndexSettings",
    "ModelMismatch",
    "RWLock",
    "RebuildWorker",
    "Store",
    "VectorSet",
    "wal",
]

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
BUILD_PREFIX = ".build-"


class DataDirectoryLocked(RuntimeError):
    """Another process (a running service, a build) uses the data directory."""


def lock_data_directory(root: Path) -> int:
    """Take the data directory's lock (released when the returned descriptor is closed), so a
    service and a build never write one directory at once."""
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DataDirectoryLocked(
            f"{root} is in use by another process (a running service or a build)"
        ) from None
    return fd


class RebuildWorker:
    """One background thread that builds indexes, one at a time: builds are CPU-heavy, and on a
    small machine two at once would only slow searches down further."""

    def __init__(self, threads: int = 1) -> None:
        self.threads = threads
        self._queue: queue.Queue[VectorSet | None] = queue.Queue()
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, vector_set: VectorSet) -> None:
        with self._lock:
            if self._cancel.is_set():
                return
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="retrieval-index-builder", daemon=True
                )
                self._thread.start()
        self._queue.put(vector_set)

    def _run(self) -> None:
        use_threads(self.threads)
        while True:
            vector_set = self._queue.get()
            try:
                if vector_set is None:
                    return
                try:
                    vector_set.rebuild_in_background(self._cancel)
                except Exception:
                    log.exception("%s: background index build failed", vector_set.label)
                    vector_set.build_failed()
                if not self._cancel.is_set():
                    vector_set.maybe_schedule()
            finally:
                self._queue.task_done()

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Wait until no build is queued or running (tests, the build command)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def stop(self) -> None:
        """Cancel the running build (it stops at its next chunk) and end the thread."""
        with self._lock:
            self._cancel.set()
            thread = self._thread
        if thread is not None:
            self._queue.put(None)
            thread.join(60)


class Store:
    """All collections under one data directory."""

    def __init__(
        self,
        root: Path,
        *,
        index_factory: str = "auto",
        rescore_factor: int | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        storage: str = "float32",
        snapshot_every: int = 10_000,
        exact_filter_max: int = EXACT_FILTER_MAX,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        background: bool = True,
        inline_rebuild_max: int = INLINE_REBUILD_MAX,
        build_threads: int = 1,
    ) -> None:
        self.root = Path(root)
        self.default_spec = IndexSpec.from_dict(
            {
                "factory": index_factory,
                "rescore_factor": rescore_factor,
                "nprobe": nprobe,
                "ef_search": ef_search,
                "storage": storage,
            }
        )
        self.worker = RebuildWorker(build_threads) if background else None
        self._options: dict[str, Any] = {
            "snapshot_every": snapshot_every,
            "exact_filter_max": exact_filter_max,
            "memory_budget": memory_budget,
            "scheduler": self.worker.submit if self.worker else None,
            "inline_rebuild_max": inline_rebuild_max,
        }
        self._collections: dict[str, Collection] = {}
        self._lock = threading.Lock()
        self._lock_fd: int | None = None
        self.loaded = False

    def load(self) -> None:
        """Open every collection under the root (blocking: run it off the event loop)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock_directory()
        started = time.perf_counter()
        try:
            for path in sorted(self.root.iterdir()):
                if path.name.startswith(TMP_PREFIX):
                    shutil.rmtree(path)  # a creation interrupted by a crash, never acknowledged
                elif path.name == LOCK_FILE or path.name.startswith(BUILD_PREFIX):
                    continue  # ours; a build in progress is resumed by the build command
                elif path.is_dir() and is_collection_name(path.name) and (path / META).exists():
                    self._collections[path.name] = Collection.open(
                        path, default_spec=self.default_spec, **self._options
                    )
                else:
                    log.warning("ignoring %s in the data directory", path)
        except BaseException:
            # Nothing is snapshotted from a partial load; the lock goes with it.
            self.close(snapshot=False)
            raise
        self.loaded = True
        log.info(
            "loaded %d collections in %.2fs",
            len(self._collections),
            time.perf_counter() - started,
        )

    def _lock_directory(self) -> None:
        self._lock_fd = lock_data_directory(self.root)

    def collections(self) -> list[Collection]:
        with self._lock:
            return [self._collections[name] for name in sorted(self._collections)]

    def get(self, name: str) -> Collection:
        with self._lock:
            collection = self._collections.get(name)
        if collection is None:
            raise CollectionNotFound(f"collection {name!r} does not exist")
        return collection

    def get_or_create(
        self, name: str, model_id: str, dim: int, spec: IndexSpec | None = None
    ) -> Collection:
        """The collection, created on first use (with ``spec``, else the store's default
        settings); its model and dimension must match."""
        return self.ensure(name, model_id, dim, spec, update=False)[0]

    def ensure(
        self,
        name: str,
        model_id: str,
        dim: int,
        spec: IndexSpec | None = None,
        *,
        update: bool = True,
    ) -> tuple[Collection, bool]:
        """Create the collection, or (``update``) apply ``spec`` to the existing one. Returns
        the collection and whether it was created."""
        if not is_collection_name(name):
            raise Unprocessable(f"collection names must match {COLLECTION_NAME_PATTERN}")
        created = False
        with self._lock:
            collection = self._collections.get(name)
            if collection is None:
                if not 1 <= dim <= MAX_DIM:
                    raise DimensionMismatch(f"dimension must be between 1 and {MAX_DIM}")
                spec = spec or self.default_spec
                try:
                    check_factory(dim, spec.factory)
                except InvalidIndexSettings as exc:
                    if spec is self.default_spec:
                        # The service's own setting: a dimension this factory cannot take.
                        raise DimensionMismatch(exc.detail) from None
                    raise
                collection = Collection.create(
                    self.root, name, model_id, dim, spec=spec, **self._options
                )
                self._collections[name] = collection
                created = True
        collection.check_model(model_id)
        collection.check_dim(dim)
        if update and not created and spec is not None:
            collection.update_spec(spec)
        return collection, created

    def drop(self, name: str) -> bool:
        """Remove the collection with all its vectors; False when there is none. The directory
        is renamed aside at once (the drop is durable then: a crash before the files are gone
        leaves a temporary name, removed by the next load) and deleted afterwards. A write that
        raced the drop fails with CollectionUnavailable; one after it creates a new collection."""
        with self._lock:
            collection = self._collections.pop(name, None)
        if collection is None:
            return False
        collection.close(snapshot=False)
        trash = self.root / f"{TMP_PREFIX}dropped-{name}-{uuid.uuid4().hex}"
        os.replace(collection.path, trash)
        wal.fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)
        return True

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

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Wait for background index builds to finish (tests, the build command)."""
        return self.worker.wait_idle(timeout) if self.worker else True

    def close(self, *, snapshot: bool = True) -> None:
        if self.worker is not None:
            self.worker.stop()
        for collection in self.collections():
            try:
                collection.close(snapshot=snapshot)
            except Exception:
                # Its log still holds every acknowledged write; go on closing the others.
                log.exception("closing collection %s failed", collection.name)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
