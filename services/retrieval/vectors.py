"""One modality of a collection: vectors keyed by int64 id, and the Faiss index derived from them.

The stored vectors (``storage.DenseVectors`` or ``storage.MappedVectors``) are the source of
truth; the index only picks candidates, which are then re-scored exactly against them. Rows stay
dense (a delete moves the last row into the hole), and ``_row`` maps ids to rows.

Index (re)builds run inline for small sets or when no scheduler is given, and otherwise in the
background (``rebuild_in_background``), while searches go on against the current index and
writes keep updating it. Every id written during the build is recorded in ``_touched`` and
replayed onto the new index before it is swapped in under the exclusive lock, so no write made
during a rebuild is lost.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from services.retrieval import indexing
from services.retrieval.indexing import (
    FACTORY_AUTO,
    FAMILY_HNSW,
    IndexSpec,
    choose_factory,
    family,
    new_index,
)
from services.retrieval.locks import RWLock
from services.retrieval.metrics import INDEX_BUILD_SECONDS
from services.retrieval.storage import SCAN_ROWS, DenseVectors, VectorStorage, as_float32

log = logging.getLogger(__name__)

# Allow-lists up to this many live vectors are searched exactly: cheaper than a filtered index
# search at that size, and exact.
EXACT_FILTER_MAX = 8192
# HNSW cannot delete: deleted and overwritten entries stay in the graph, hidden from results; the
# index is rebuilt once they exceed this share of the live vectors, so rebuild cost stays
# proportional to the writes that caused it.
_STALE_SHARE = 4
_STALE_MIN = 1024
# Sets up to this many vectors rebuild inline (milliseconds); larger ones in the background.
INLINE_REBUILD_MAX = 2000
# Rows copied per step of a background build; the read lock is held only while copying.
_BUILD_CHUNK = 16_384
# A background build replays the writes made meanwhile in rounds outside the exclusive lock until
# at most this many ids are left, which the final round replays while searches wait.
_FINAL_CATCH_UP = 2048
_CATCH_UP_ROUNDS = 4
# Bound on the (queries x vectors) score matrix of an exact search, in float32 elements.
_EXACT_BLOCK = 1 << 24
# Default budget for ``auto`` when none is given.
DEFAULT_MEMORY_BUDGET = 8 << 30

Hit = tuple[int, float]
Scheduler = Callable[["VectorSet"], None]


class BuildCancelled(Exception):
    """The service is stopping; a background build gave up."""


@dataclass
class SetState:
    """What a snapshot stores of one vector set besides its rows."""

    factory: str | None = None  # of the index, None when there is none
    built_n: int = 0  # vectors when the index was planned
    train_failed_n: int = 0  # vectors when training last failed (0: never)
    index: faiss.Index | None = None
    dead: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))


class VectorSet:
    """One modality of a collection. Not thread-safe by itself: ``Collection`` holds ``lock``
    shared for searches and exclusively for writes; background builds take it as they need."""

    def __init__(
        self,
        dim: int,
        spec: IndexSpec | str = "Flat",
        *,
        rescore_factor: int | None = None,
        exact_filter_max: int = EXACT_FILTER_MAX,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        storage: VectorStorage | None = None,
        lock: RWLock | None = None,
        scheduler: Scheduler | None = None,
        inline_rebuild_max: int = INLINE_REBUILD_MAX,
        label: str = "",
        ids: np.ndarray | None = None,
        vectors: np.ndarray | None = None,
        build: bool = True,
    ) -> None:
        if isinstance(spec, str):
            spec = IndexSpec(factory=spec)
        if rescore_factor is not None:
            spec = IndexSpec(**{**spec.as_dict(), "rescore_factor": rescore_factor})
        self.dim = dim
        self.spec = spec
        self.exact_filter_max = exact_filter_max
        self.memory_budget = memory_budget
        self.label = label
        self.inline_rebuild_max = inline_rebuild_max
        self._lock = lock or RWLock()
        self._scheduler = scheduler
        self._store: VectorStorage = storage or DenseVectors(dim)
        self._ids = np.empty(0, dtype=np.int64)
        self._n = 0
        self._row: dict[int, int] = {}
        self._version = 0  # bumped by every write: keys the sorted-ids cache
        self._sorted: tuple[int, np.ndarray] | None = None
        self._index: faiss.Index | None = None
        self._family = indexing.FAMILY_FLAT
        self._nlist = 0
        self._hnsw_quantizer = False
        self._default_rescore = indexing.DEFAULT_RESCORE_FACTOR
        self._selector_ok = True
        self._scores_exact = False
        self._factory_built: str | None = None
        self._built_n = 0
        self._train_failed_n = 0
        self._build_failed_n = 0  # vectors when a build last failed (0: never)
        self._dead: set[int] = set()  # HNSW: ids with index entries but no live vector
        self._dead_selector: faiss.IDSelector | None = None
        self._touched: set[int] | None = None  # ids written while a background build runs
        self._rebuild_pending = False
        self._closed = False
        self.last_build_seconds: float | None = None
        self._deferred = not build  # while replaying a log, decide about the index at the end
        if ids is not None and vectors is not None and len(ids):
            self._append(np.asarray(ids, dtype=np.int64), vectors)
        if build:
            self.rebuild()

    def __len__(self) -> int:
        return self._n

    @property
    def ids(self) -> np.ndarray:
        return self._ids[: self._n]

    @property
    def vectors(self) -> np.ndarray:
        """The stored rows, in the storage's dtype (float32, or float16 when memory-mapped)."""
        return self._store.array[: self._n]

    @property
    def storage(self) -> VectorStorage:
        return self._store

    @property
    def index_size(self) -> int:
        """Entries in the Faiss index, stale ones included; 0 while there is no index."""
        return 0 if self._index is None else int(self._index.ntotal)

    @property
    def index_factory(self) -> str | None:
        """The factory of the index in use (what ``auto`` chose), None while there is none."""
        return self._factory_built

    @property
    def rebuilding(self) -> bool:
        return self._rebuild_pending

    def get(self, id_: int) -> np.ndarray | None:
        row = self._row.get(id_)
        return None if row is None else as_float32(self._store.array[row]).copy()

    def contains(self, ids: np.ndarray) -> bool:
        """Whether any of ``ids`` is stored."""
        return any(i in self._row for i in ids.tolist())

    def sorted_ids(self) -> np.ndarray:
        """All ids, ascending (cached until the next write)."""
        cached = self._sorted
        if cached is None or cached[0] != self._version:
            cached = (self._version, np.sort(self.ids))
            self._sorted = cached
        return cached[1]

    def stats(self) -> dict[str, Any]:
        return {
            "count": self._n,
            "index": self._factory_built,
            "index_entries": self.index_size,
            "stale_entries": max(0, self.index_size - self._n) if self._index is not None else 0,
            "rebuilding": self._rebuild_pending,
        }

    # -- writes ------------------------------------------------------------------------------

    def upsert(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Insert or replace; ``ids`` must be unique."""
        rows = [self._row.get(i) for i in ids.tolist()]
        old = np.fromiter((r is not None for r in rows), dtype=bool, count=len(rows))
        if old.any():
            self._store.array[[r for r in rows if r is not None]] = vectors[old]
        self._append(ids[~old], vectors[~old])
        self._version += 1
        if self._touched is not None:
            self._touched.update(ids.tolist())
        if self._index is not None:
            if self._family != FAMILY_HNSW:
                if old.any():
                    self._index.remove_ids(faiss.IDSelectorBatch(ids[old]))
            elif self._dead.intersection(ids.tolist()):
                self._dead.difference_update(ids.tolist())
                self._dead_selector = None
            self._index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)
        self._after_write()

    def delete(self, ids: np.ndarray) -> int:
        removed: list[int] = []
        array = self._store.array
        for id_ in ids.tolist():
            row = self._row.pop(id_, None)
            if row is None:
                continue
            # Move the last vector into the hole, so the rows stay dense.
            last = self._n - 1
            if row != last:
                moved = int(self._ids[last])
                self._ids[row] = moved
                array[row] = array[last]
                self._row[moved] = row
            self._n = last
            removed.append(id_)
        if not removed:
            return 0
        self._version += 1
        if self._touched is not None:
            self._touched.update(removed)
        if self._index is not None:
            if self._family != FAMILY_HNSW:
                self._index.remove_ids(faiss.IDSelectorBatch(np.asarray(removed, np.int64)))
            else:
                self._dead.update(removed)
                self._dead_selector = None
        if len(self._ids) > 1024 and self._n < len(self._ids) // 4:
            self._resize(2 * self._n)
        self._after_write()
        return len(removed)

    def _append(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        m = len(ids)
        if not m:
            return
        if self._n + m > len(self._ids):
            self._resize(max(self._n + m, 2 * len(self._ids), 64))
        self._ids[self._n : self._n + m] = ids
        self._store.array[self._n : self._n + m] = vectors
        self._row.update(zip(ids.tolist(), range(self._n, self._n + m), strict=True))
        self._n += m

    def _resize(self, capacity: int) -> None:
        ids = np.empty(capacity, dtype=np.int64)
        ids[: self._n] = self._ids[: self._n]
        self._ids = ids
        self._store.resize(capacity, self._n)

    def restore(self, ids: np.ndarray, state: SetState) -> None:
        """Adopt rows already placed in the storage (a snapshot's) and the index saved with
        them. The caller filled the first ``len(ids)`` rows of the storage."""
        n = len(ids)
        self._ids = np.array(ids, dtype=np.int64, copy=True)
        self._n = n
        self._row = dict(zip(self._ids.tolist(), range(n), strict=True))
        if len(self._row) != n:
            raise ValueError("duplicate ids")
        self._version += 1
        self._train_failed_n = state.train_failed_n
        if state.index is not None and state.factory is not None:
            self._install(state.index, state.factory, state.built_n, set(state.dead.tolist()))

    # -- index: planning -----------------------------------------------------------------------

    def set_spec(self, spec: IndexSpec) -> None:
        """New settings; a changed factory is built like any other rebuild."""
        self.spec = spec
        self._after_write()

    def desired_factory(self) -> str:
        """The factory the index should have now (``auto`` re-decides as the set doubles or
        halves, so the choice does not flap around a threshold)."""
        if self.spec.factory != FACTORY_AUTO:
            return self.spec.factory
        n, built = self._n, self._built_n
        if self._factory_built is not None and built // 2 <= n < 2 * max(built, 1):
            return self._factory_built
        return choose_factory(
            n, self.dim, budget_bytes=self.memory_budget, storage=self.spec.storage
        )

    def rebuild_reason(self) -> str | None:
        """Why the index should be rebuilt now, or None."""
        n = self._n
        if self._build_failed_n and n < 2 * self._build_failed_n:
            return None  # a failed build is retried once the set has doubled
        desired = self.desired_factory()
        if desired != self._factory_built:
            probe = _template(self.dim, desired)
            if not probe.is_trained:
                if n < indexing.min_train_size(probe):
                    return None  # searched exactly, or with the current index, until then
                if self._train_failed_n and n < 2 * self._train_failed_n:
                    return None
            return "new index" if self._factory_built is None else "index choice"
        if self._index is None:
            return None
        if not _template(self.dim, desired).is_trained:
            # Retrain as the set doubles, so the quantizer keeps matching the data.
            cap = indexing.train_sample_size(self._index)
            if self._built_n < cap and n >= 2 * self._built_n:
                return "retrain"
        stale = self.index_size - n
        if stale > max(_STALE_MIN, n // _STALE_SHARE):
            return "stale entries"
        return None

    def _after_write(self) -> None:
        if self._deferred or self._rebuild_pending or self._closed:
            return
        reason = self.rebuild_reason()
        if reason is None:
            return
        if self._scheduler is None or self._n <= self.inline_rebuild_max:
            self.rebuild()
        else:
            log.info("%s: index rebuild scheduled (%s, %d vectors)", self.label, reason, self._n)
            self._rebuild_pending = True
            self._scheduler(self)

    def finish_load(self) -> None:
        """End of log replay: build or schedule the index the set should have."""
        self._deferred = False
        if self._index is None and (self._scheduler is None or self._n <= self.inline_rebuild_max):
            self.rebuild()
        else:
            self._after_write()

    def build_failed(self) -> None:
        """A background build raised: do not retry at every write."""
        self._build_failed_n = max(1, self._n)

    def maybe_schedule(self) -> None:
        """Check again (after a background build: the set may have grown meanwhile)."""
        with self._lock.write():
            self._after_write()

    # -- index: building -----------------------------------------------------------------------

    def rebuild(self) -> None:
        """Build a fresh index from the stored vectors, inline (the caller holds the lock
        exclusively, or owns the set)."""
        factory = self.desired_factory()
        started = time.perf_counter()
        built = self._build(factory, self.ids.copy(), nullcontext, None)
        if built is not None:
            self._install(built, factory, self._n, set())
            self._observe_build(time.perf_counter() - started)

    def rebuild_in_background(self, cancel: threading.Event | None = None) -> bool:
        """Build the index the set should have while searches and writes go on, then swap it in.
        Returns whether an index was installed."""
        started = time.perf_counter()
        try:
            with self._lock.read():
                if self._closed:
                    return False
                factory = self.desired_factory()
                n = self._n
                ids = self.ids.copy()
                self._touched = set()
            index = self._build(factory, ids, self._lock.read, cancel)
            if index is None:
                return False
            dead: set[int] = set()
            for _ in range(_CATCH_UP_ROUNDS):
                with self._lock.read():
                    touched, self._touched = self._touched or set(), set()
                    batch = self._current(touched)
                self._replay(index, touched, batch, dead)
                if len(touched) <= _FINAL_CATCH_UP:
                    break
            with self._lock.write():
                if self._closed:
                    return False
                touched = self._touched or set()
                self._replay(index, touched, self._current(touched), dead)
                self._touched = None
                self._install(index, factory, n, dead)
            elapsed = time.perf_counter() - started
            self._observe_build(elapsed)
            log.info(
                "%s: index %s built in the background on %d vectors in %.1fs",
                self.label,
                factory,
                n,
                elapsed,
            )
            return True
        except BuildCancelled:
            return False
        finally:
            self._touched = None
            self._rebuild_pending = False

    def _build(
        self,
        factory: str,
        ids: np.ndarray,
        locked: Callable[[], AbstractContextManager[Any]],
        cancel: threading.Event | None,
        progress: Callable[[str, int, int], None] | None = None,
    ) -> faiss.Index | None:
        index = new_index(self.dim, factory, ef_construction=self.spec.ef_construction)
        n = len(ids)
        if not index.is_trained:
            if n < indexing.min_train_size(index):
                return None
            sample_ids = _sample(ids, indexing.train_sample_size(index))
            with locked():
                sample = self._current(set(sample_ids.tolist()))[1]
            if progress:
                progress("train", 0, len(sample))
            try:
                index.train(np.ascontiguousarray(sample))
            except RuntimeError as exc:  # e.g. fewer points than the factory's clusters
                log.info("%s: index %r not trained on %d vectors: %s", self.label, factory, n, exc)
                self._train_failed_n = n
                return None
            if progress:
                progress("train", len(sample), len(sample))
        for start in range(0, n, _BUILD_CHUNK):
            if cancel is not None and cancel.is_set():
                raise BuildCancelled
            with locked():
                chunk_ids, chunk = self._current_rows(ids[start : start + _BUILD_CHUNK])
            if len(chunk_ids):
                index.add_with_ids(chunk, chunk_ids)
            if progress:
                progress("add", min(n, start + _BUILD_CHUNK), n)
        indexing.order_for_locality(index)
        return index

    def _current_rows(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ids of ``ids`` that are stored now, and their float32 vectors (copies)."""
        rows = self._rows_of(ids)
        if rows.size and rows.size == self._n and np.array_equal(rows, np.arange(self._n)):
            return self._ids[: self._n].copy(), as_float32(self._store.array[: self._n]).copy()
        rows.sort()  # memory order: kinder to a memory map
        return self._ids[rows], np.ascontiguousarray(as_float32(self._store.array[rows]))

    def _current(self, ids: set[int]) -> tuple[np.ndarray, np.ndarray]:
        return self._current_rows(np.fromiter(ids, dtype=np.int64, count=len(ids)))

    def _replay(
        self,
        index: faiss.Index,
        touched: set[int],
        batch: tuple[np.ndarray, np.ndarray],
        dead: set[int],
    ) -> None:
        """Make ``index`` reflect the current vectors of ``touched`` ids."""
        if not touched:
            return
        present_ids, vectors = batch
        if family(index) != FAMILY_HNSW:
            index.remove_ids(
                faiss.IDSelectorBatch(np.fromiter(touched, np.int64, count=len(touched)))
            )
        else:
            # Entries added earlier for these ids stay; the live ones are re-scored by id, the
            # deleted ones hidden.
            present = set(present_ids.tolist())
            dead.update(touched - present)
            dead.difference_update(present)
        if len(present_ids):
            index.add_with_ids(vectors, present_ids)

    def _install(self, index: faiss.Index, factory: str, built_n: int, dead: set[int]) -> None:
        self._index = index
        self._family = family(index)
        self._nlist = indexing.nlist_of(index)
        self._hnsw_quantizer = indexing.has_hnsw_quantizer(index)
        indexing.deepen_quantizer(index)
        self._default_rescore = indexing.default_rescore_factor(index)
        self._selector_ok = indexing.supports_selector(index)
        self._scores_exact = indexing.scores_are_exact(index)
        self._factory_built = factory
        self._built_n = built_n
        self._dead = dead
        self._dead_selector = None
        if index.is_trained and not _template(self.dim, factory).is_trained:
            self._train_failed_n = 0

    def _observe_build(self, seconds: float) -> None:
        self.last_build_seconds = seconds
        INDEX_BUILD_SECONDS.observe(seconds)

    def state(self) -> SetState:
        """The index and its bookkeeping, for a snapshot (the caller holds the lock)."""
        return SetState(
            factory=self._factory_built if self._index is not None else None,
            built_n=self._built_n,
            train_failed_n=self._train_failed_n,
            index=self._index,
            dead=np.fromiter(self._dead, dtype=np.int64, count=len(self._dead)),
        )

    def close(self) -> None:
        self._closed = True
        self._index = None
        self._store.close()

    # -- search --------------------------------------------------------------------------------

    def search(
        self,
        queries: np.ndarray,
        k: int,
        allow: np.ndarray | None = None,
        *,
        nprobe: int | None = None,
        ef_search: int | None = None,
        rescore_factor: int | None = None,
    ) -> list[list[Hit]]:
        """Best-first (id, exact score) per query; with ``allow``, only those ids. Returns
        ``min(k, eligible vectors)`` hits per query, whatever the index."""
        empty: list[list[Hit]] = [[] for _ in range(len(queries))]
        if not self._n:
            return empty
        rows: np.ndarray | None = None
        if allow is not None:
            rows = self._rows_of(np.unique(allow))
            if not rows.size:
                return empty
            rows.sort()
        eligible = self._n if rows is None else rows.size
        fetch = k * (rescore_factor or self.spec.rescore_factor or self._default_rescore)
        index = self._index
        if index is not None and index.ntotal > self._n:
            # Stale entries of overwritten ids take candidate slots in proportion to their share.
            fetch = -(-fetch * int(index.ntotal) // self._n)
        if (
            index is None
            or fetch >= eligible
            or (rows is not None and (rows.size <= self.exact_filter_max or not self._selector_ok))
        ):
            return self._exact(queries, k, rows)
        selector = (
            faiss.IDSelectorBatch(self._ids[rows])
            if rows is not None
            else self._dead_ids_selector()
        )
        nprobe = nprobe or self.spec.nprobe
        ef = max(ef_search or self.spec.ef_search or indexing.DEFAULT_EF_SEARCH, fetch)
        # Without stale entries (an overwritten or deleted id still in an HNSW graph), an index
        # that scores by the exact inner product needs no second scoring from storage.
        trust_scores = self._scores_exact and int(index.ntotal) == self._n
        scores, labels = self._index_search(index, queries, fetch, selector, nprobe, ef)
        want = min(k, eligible)
        nlist = self._nlist
        results = []
        for q, query in enumerate(queries):
            hits = self._hits(query, scores[q], labels[q], k, trust_scores)
            width, probe, depth = fetch, nprobe or indexing.default_nprobe(nlist), ef
            # Too few distinct live candidates (stale duplicates, a restrictive filter, an IVF
            # probing few lists): search wider and deeper, and at the end fall back to exact.
            while len(hits) < want and (width < index.ntotal or probe < nlist):
                width = min(2 * width, int(index.ntotal))
                probe, depth = min(2 * probe, max(nlist, 1)), max(depth, width)
                wider = self._index_search(index, queries[q : q + 1], width, selector, probe, depth)
                hits = self._hits(query, wider[0][0], wider[1][0], k, trust_scores)
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
        self,
        index: faiss.Index,
        queries: np.ndarray,
        k: int,
        selector: faiss.IDSelector | None,
        nprobe: int | None,
        ef_search: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Scores and ids of the index's best ``k`` per query (-1 where it has fewer)."""
        params = indexing.search_params(
            self._family,
            self._nlist,
            selector,
            nprobe=nprobe,
            ef_search=ef_search,
            hnsw_quantizer=self._hnsw_quantizer,
        )
        if params is None:
            return index.search(queries, k)
        return index.search(queries, k, params=params)

    def _hits(
        self, query: np.ndarray, scores: np.ndarray, labels: np.ndarray, k: int, trusted: bool
    ) -> list[Hit]:
        if not trusted:
            return self._rescore(query, labels, k)
        live = np.fromiter((i >= 0 and i in self._row for i in labels.tolist()), bool, len(labels))
        return _top(labels[live], scores[live], k)

    def _rescore(self, query: np.ndarray, labels: np.ndarray, k: int) -> list[Hit]:
        candidates = np.unique(labels[labels >= 0])  # also folds stale duplicates of an id
        rows = self._rows_of(candidates)
        if not rows.size:
            return []
        ids = self._ids[rows]
        scores = as_float32(self._store.array[rows]) @ query
        return _top(ids, scores, k)

    def _exact(self, queries: np.ndarray, k: int, rows: np.ndarray | None) -> list[list[Hit]]:
        total = self._n if rows is None else rows.size
        step = max(1024, min(SCAN_ROWS, _EXACT_BLOCK // max(1, len(queries))))
        best: list[tuple[np.ndarray, np.ndarray]] = [
            (np.empty(0, np.int64), np.empty(0, np.float32)) for _ in range(len(queries))
        ]
        for ids, block in self._blocks(rows, total, step):
            scores = queries @ as_float32(block).T
            for q in range(len(queries)):
                cand_ids = np.concatenate((best[q][0], ids))
                cand_scores = np.concatenate((best[q][1], scores[q]))
                if len(cand_ids) > k:
                    keep = np.argpartition(-cand_scores, k - 1)[:k]
                    cand_ids, cand_scores = cand_ids[keep], cand_scores[keep]
                best[q] = (cand_ids, cand_scores)
        return [_top(ids, scores, k) for ids, scores in best]

    def _blocks(
        self, rows: np.ndarray | None, total: int, step: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, total, step):
            if rows is None:
                stop = min(total, start + step)
                yield self._ids[start:stop], self._store.array[start:stop]
            else:
                part = rows[start : start + step]
                yield self._ids[part], self._store.array[part]


def _top(ids: np.ndarray, scores: np.ndarray, k: int) -> list[Hit]:
    if len(ids) > k:
        part = np.argpartition(-scores, k - 1)[:k]
        ids, scores = ids[part], scores[part]
    order = np.lexsort((ids, -scores))  # best first; equal scores by id, so answers are stable
    return list(zip(ids[order].tolist(), scores[order].tolist(), strict=True))


def _sample(ids: np.ndarray, size: int) -> np.ndarray:
    if len(ids) <= size:
        return ids
    rows = np.random.default_rng(len(ids)).choice(len(ids), size, replace=False)
    return ids[np.sort(rows)]


_templates: dict[tuple[int, str], faiss.Index] = {}
_templates_lock = threading.Lock()


def _template(dim: int, factory: str) -> faiss.Index:
    """An empty index of ``factory``, to ask it about training (cached; never searched)."""
    key = (dim, factory)
    with _templates_lock:
        template = _templates.get(key)
        if template is None:
            template = new_index(dim, factory)
            if len(_templates) > 256:
                _templates.clear()
            _templates[key] = template
        return template
