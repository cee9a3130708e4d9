"""Index settings of a collection, the ``auto`` choice, and the Faiss indexes built from them.

Every index is an inner-product index that maps stable int64 ids. It only *picks candidates*:
the stored vectors re-score them exactly (see ``vectors.VectorSet``), which is what makes lossy
indexes (PQ, SQ) usable and what ``rescore_factor`` (the refinement depth) controls.

Three families behave differently for writes:

- ``flat`` (Flat, SQ, PQ): wrapped in ``IndexIDMap``; deletes compact the storage in order.
- ``ivf`` (IVF-Flat, IVF-PQ, IVF-SQ, with optional pre-transforms): ids are native, deletes scan
  the inverted lists. Needs training.
- ``hnsw``: wrapped in ``IndexIDMap``; Faiss cannot delete from the graph, so deleted and
  overwritten entries stay as stale entries, hidden from results, until a rebuild.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import faiss
import numpy as np

from services.retrieval.errors import InvalidIndexSettings
from shared.contracts.retrieval import (
    MAX_EF_CONSTRUCTION,
    MAX_EF_SEARCH,
    MAX_FACTORY_LENGTH,
    MAX_NPROBE,
    MAX_RESCORE_FACTOR,
)

FACTORY_AUTO = "auto"
STORAGE_FLOAT32 = "float32"
STORAGE_FLOAT16_MMAP = "float16-mmap"
STORAGES = (STORAGE_FLOAT32, STORAGE_FLOAT16_MMAP)

# Candidates re-scored per result when the settings name none: PQ codes rank coarsely and need
# a deep refinement; exact or 8-bit scores need little.
DEFAULT_RESCORE_FACTOR = 4
DEFAULT_PQ_RESCORE_FACTOR = 16
# Recall-first defaults (see docs/retrieval.md for the measured trade-off).
DEFAULT_EF_SEARCH = 128
# HNSW graph quality (Faiss' own default is 40); 100 as in Chroma and hnswlib's examples.
DEFAULT_EF_CONSTRUCTION = 100

# ``auto``: below this many vectors an exact scan costs about a millisecond and needs no build.
AUTO_FLAT_MAX = 20_000
AUTO_HNSW_M = 32
AUTO_HNSW = f"HNSW{AUTO_HNSW_M},SQfp16"

FAMILY_FLAT = "flat"
FAMILY_IVF = "ivf"
FAMILY_HNSW = "hnsw"


@dataclass(frozen=True)
class IndexSpec:
    """A collection's index settings, persisted in its ``meta.json``.

    ``factory`` is a Faiss factory string (``Flat``, ``HNSW32``, ``IVF1024,Flat``,
    ``IVF4096,PQ64``, …) or ``auto``. ``nprobe`` (IVF) and ``ef_search`` (HNSW) are the default
    search depths, ``rescore_factor`` the default refinement depth (candidates fetched per result
    and re-scored exactly). ``storage`` is where the full vectors live: ``float32`` in memory, or
    ``float16-mmap`` in a memory-mapped file (half the bytes, paged in by the OS).
    ``ef_construction`` is HNSW's build depth (graph quality against build time)."""

    factory: str = FACTORY_AUTO
    nprobe: int | None = None
    ef_search: int | None = None
    rescore_factor: int | None = None
    storage: str = STORAGE_FLOAT32
    ef_construction: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, base: IndexSpec | None = None) -> IndexSpec:
        """Settings from JSON; missing keys come from ``base``. Validated except for the factory,
        which needs the dimension (``check_factory``)."""
        spec = base or cls()
        if data:
            unknown = set(data) - set(asdict(spec))
            if unknown:
                raise InvalidIndexSettings(f"unknown index settings: {', '.join(sorted(unknown))}")
            spec = replace(spec, **dict(data))
        spec.validate()
        return spec

    def validate(self) -> None:
        if not isinstance(self.factory, str) or not 0 < len(self.factory) <= MAX_FACTORY_LENGTH:
            raise InvalidIndexSettings("factory must be a Faiss factory string or 'auto'")
        _check_range("nprobe", self.nprobe, 1, MAX_NPROBE, optional=True)
        _check_range("ef_search", self.ef_search, 1, MAX_EF_SEARCH, optional=True)
        _check_range("rescore_factor", self.rescore_factor, 1, MAX_RESCORE_FACTOR, optional=True)
        _check_range("ef_construction", self.ef_construction, 8, MAX_EF_CONSTRUCTION, optional=True)
        if self.storage not in STORAGES:
            raise InvalidIndexSettings(f"storage must be one of {', '.join(STORAGES)}")


def _check_range(name: str, value: Any, low: int, high: int, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidIndexSettings(f"{name} must be an integer from {low} to {high}")


@dataclass(frozen=True)
class SearchDepth:
    """Per-query search settings; ``None`` means the collection's default."""

    nprobe: int | None = None
    ef_search: int | None = None
    rescore_factor: int | None = None

    def validate(self) -> None:
        _check_range("nprobe", self.nprobe, 1, MAX_NPROBE, optional=True)
        _check_range("ef_search", self.ef_search, 1, MAX_EF_SEARCH, optional=True)
        _check_range("rescore_factor", self.rescore_factor, 1, MAX_RESCORE_FACTOR, optional=True)


# -- auto ----------------------------------------------------------------------------------------


def nlist_for(n: int) -> int:
    """IVF lists for ``n`` vectors: about 2·√n, a power of two, so lists hold ~√n/2 vectors."""
    return int(min(65_536, max(64, 2 ** round(math.log2(max(1.0, 2 * math.sqrt(n)))))))


def pq_m_for(dim: int) -> int:
    """PQ sub-quantizers: 4 dimensions each (128 bytes per 512-d vector), a divisor of ``dim``.
    At 10M CLIP-like vectors, where neighbours crowd close, 8 dimensions each (64 bytes) lost 8
    points of recall@10 at the same search depth (docs/retrieval.md, "auto")."""
    for m in range(max(1, dim // 4), 0, -1):
        if dim % m == 0:
            return m
    return 1


def ivfpq_factory(n: int, dim: int) -> str:
    nlist = nlist_for(n)
    # Above a few thousand lists a flat quantizer dominates the cost of adding (every vector is
    # compared with every centroid); an HNSW quantizer finds the nearest lists in ~log time.
    quantizer = "_HNSW32" if nlist >= 4096 else ""
    return f"IVF{nlist}{quantizer},PQ{pq_m_for(dim)}"


def hnsw_bytes(n: int, dim: int) -> int:
    """``HNSW32,SQfp16``: two bytes a component in the graph's storage, ~2·M level-0 links of
    4 bytes, upper levels and bookkeeping."""
    return int(n * (2 * dim + 2 * AUTO_HNSW_M * 4 * 1.1 + 16))


# The id array and the id -> row map of the stored vectors (a Python dict: ~100 bytes an id).
ID_MAP_BYTES = 128


def stored_vector_bytes(n: int, dim: int, storage: str) -> int:
    """Resident bytes of the full-precision vectors and their ids; a memory map is paged by
    the OS, so its rows do not count."""
    rows = 0 if storage == STORAGE_FLOAT16_MMAP else 4 * n * dim
    return rows + ID_MAP_BYTES * n


def choose_factory(n: int, dim: int, *, budget_bytes: int, storage: str) -> str:
    """What ``auto`` builds for ``n`` vectors: exact Flat while small; HNSW (the fastest at high
    recall; float16 rows in the graph, half the memory traffic of float32 for practically the
    same distances, and candidates are re-scored from the stored vectors anyway) while it and
    the stored vectors fit the memory budget; else IVF-PQ, re-scored from the stored vectors."""
    if n < AUTO_FLAT_MAX:
        return "Flat"
    if stored_vector_bytes(n, dim, storage) + hnsw_bytes(n, dim) <= budget_bytes:
        return AUTO_HNSW
    return ivfpq_factory(n, dim)


# -- construction ---------------------------------------------------------------------------------

_IDMAP = re.compile(r"^\s*IDMap", re.IGNORECASE)


def new_index(dim: int, factory: str, *, ef_construction: int | None = None) -> faiss.Index:
    """A new, empty inner-product index for ``factory`` that accepts ids (see module doc)."""
    if _IDMAP.match(factory):
        raise InvalidIndexSettings("leave IDMap out of the factory: ids are mapped already")
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise InvalidIndexSettings(
            f"Faiss cannot build {factory!r} for {dim}-dimensional vectors: {_first_line(exc)}"
        ) from None
    core = core_index(index)
    if isinstance(core, faiss.IndexIVF):
        # Smaller samples than Faiss' 39 points per centroid train well enough for picking
        # candidates that are re-scored anyway; without this it warns on stderr.
        core.cp.min_points_per_centroid = 5
        _quiet_pq(core)
        deepen_quantizer(index)
        return index
    if isinstance(core, faiss.IndexHNSW | faiss.IndexFlatCodes):
        _quiet_pq(core)
        if isinstance(core, faiss.IndexHNSW):
            core.hnsw.efConstruction = ef_construction or DEFAULT_EF_CONSTRUCTION
        return faiss.IndexIDMap(index)
    raise InvalidIndexSettings(
        f"{factory!r} builds a {type(core).__name__}; use a Flat, SQ, PQ, HNSW or IVF factory "
        "(refinement is built in: see rescore_factor)"
    )


def _quiet_pq(core: faiss.Index) -> None:
    pq = getattr(core, "pq", None)
    if pq is not None:
        pq.cp.min_points_per_centroid = 5
    if getattr(core, "do_polysemous_training", False):
        # The factory turns on polysemous training (Hamming-distance filtering we never use):
        # it multiplies the training time for nothing, since candidates are re-scored anyway.
        core.do_polysemous_training = False


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(exc).__name__


def check_factory(dim: int, factory: str) -> None:
    """Raise ``InvalidIndexSettings`` unless ``factory`` (or ``auto``) works for ``dim``."""
    if factory != FACTORY_AUTO:
        new_index(dim, factory)


def core_index(index: faiss.Index) -> faiss.Index:
    """The index under the id map and any pre-transforms (PCA, OPQ)."""
    index = faiss.downcast_index(index)
    while isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2 | faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return index


# HNSW visits rows in graph order, which is random in memory: numbering the rows of one k-means
# cluster together turns many of those visits into cache and TLB hits. Measured at 1M x 512
# (docs/retrieval.md): p50 -10 % at the same recall; the graph and the answers do not change.
LOCALITY_MIN = 65_536
_LOCALITY_ROWS_PER_CLUSTER = 512
_LOCALITY_MAX_CLUSTERS = 1024
_LOCALITY_CHUNK = 65_536


def order_for_locality(index: faiss.Index) -> bool:
    """Renumber the rows of an HNSW index over float or scalar-quantised rows (under its id map)
    so that rows of one k-means cluster sit together in memory. Returns whether it did."""
    outer = faiss.downcast_index(index)
    if not isinstance(outer, faiss.IndexIDMap):
        return False
    core = faiss.downcast_index(outer.index)
    if not isinstance(core, faiss.IndexHNSW) or int(core.ntotal) < LOCALITY_MIN:
        return False
    storage = faiss.downcast_index(core.storage)
    if not isinstance(storage, faiss.IndexFlat | faiss.IndexScalarQuantizer):
        return False
    n, d = int(core.ntotal), int(core.d)
    clusters = min(_LOCALITY_MAX_CLUSTERS, n // _LOCALITY_ROWS_PER_CLUSTER)
    kmeans = faiss.Kmeans(d, clusters, niter=10, seed=1, max_points_per_centroid=64)
    kmeans.train(storage.reconstruct_batch(np.arange(0, n, max(1, n // (64 * clusters)))))
    cluster = np.empty(n, dtype=np.int64)
    for start in range(0, n, _LOCALITY_CHUNK):  # decoded a chunk at a time
        rows = storage.reconstruct_n(start, min(_LOCALITY_CHUNK, n - start))
        cluster[start : start + len(rows)] = kmeans.index.search(rows, 1)[1][:, 0]
    order = np.argsort(cluster, kind="stable").astype(np.int64)
    ids = faiss.vector_to_array(outer.id_map)
    core.permute_entries(order)  # row j now holds what row order[j] held
    faiss.copy_array_to_vector(ids[order], outer.id_map)
    return True


def scores_are_exact(index: faiss.Index) -> bool:
    """Whether ``index`` scores candidates by the exact inner product of float32 rows (Flat,
    IVF-Flat, HNSW over Flat; no transform), so re-scoring them from storage repeats the same
    arithmetic."""
    outer = faiss.downcast_index(index)
    while isinstance(outer, faiss.IndexIDMap | faiss.IndexIDMap2):
        outer = faiss.downcast_index(outer.index)
    if isinstance(outer, faiss.IndexHNSW):
        outer = faiss.downcast_index(outer.storage)
    return (
        isinstance(outer, faiss.IndexFlat | faiss.IndexIVFFlat)
        and outer.metric_type == faiss.METRIC_INNER_PRODUCT
    )


def family(index: faiss.Index) -> str:
    core = core_index(index)
    if isinstance(core, faiss.IndexIVF):
        return FAMILY_IVF
    if isinstance(core, faiss.IndexHNSW):
        return FAMILY_HNSW
    return FAMILY_FLAT


def nlist_of(index: faiss.Index) -> int:
    core = core_index(index)
    return int(core.nlist) if isinstance(core, faiss.IndexIVF) else 0


def min_train_size(index: faiss.Index) -> int:
    """Vectors needed before training is attempted."""
    core = core_index(index)
    need = 1000
    if isinstance(core, faiss.IndexIVF):
        need = max(need, 8 * int(core.nlist))
    pq = getattr(core, "pq", None)
    if pq is not None:
        need = max(need, 8 * int(pq.ksub))
    return need


def train_sample_size(index: faiss.Index) -> int:
    """At most this many vectors are used to train (k-means cost grows with the sample)."""
    return max(100_000, 40 * nlist_of(index))


def default_nprobe(nlist: int) -> int:
    """A 128th of the lists, at least 32 and at most 256. At 10M CLIP-like vectors in 8,192
    lists, 64 lists re-scored 16 times over gave recall@10 0.975 at 8 ms p99, and 256 lists 0.985
    at 27 ms (docs/retrieval.md, "Results")."""
    return max(1, min(nlist, 256, max(32, nlist // 128)))


def default_rescore_factor(index: faiss.Index | None) -> int:
    core = None if index is None else core_index(index)
    if core is not None and getattr(core, "pq", None) is not None:
        return DEFAULT_PQ_RESCORE_FACTOR
    return DEFAULT_RESCORE_FACTOR


# An HNSW quantizer (IVF…_HNSW32) searched at Faiss' default depth (16) is approximate where it
# must not be. Measured on 10M CLIP-like vectors: adding at depth 16 put 10 % of vectors in a list
# other than their nearest, and searching at depth 16 missed the lists of 7.5 % of the true top-10
# neighbours whatever nprobe was (0.4 % at depth 2·nprobe).
QUANTIZER_EF = 128


def _hnsw_quantizer(index: faiss.Index) -> faiss.IndexHNSW | None:
    core = core_index(index)
    if not isinstance(core, faiss.IndexIVF):
        return None
    quantizer = faiss.downcast_index(core.quantizer)
    return quantizer if isinstance(quantizer, faiss.IndexHNSW) else None


def has_hnsw_quantizer(index: faiss.Index) -> bool:
    return _hnsw_quantizer(index) is not None


def deepen_quantizer(index: faiss.Index) -> None:
    """Give an HNSW quantizer the depth that assigns added vectors to their nearest list (the
    setting is saved with the index; indexes made before it get it when loaded)."""
    quantizer = _hnsw_quantizer(index)
    if quantizer is not None and quantizer.hnsw.efSearch < QUANTIZER_EF:
        quantizer.hnsw.efSearch = QUANTIZER_EF


def quantizer_ef(nprobe: int) -> int:
    """Search depth of an HNSW quantizer asked for the ``nprobe`` nearest lists."""
    return max(QUANTIZER_EF, 2 * nprobe)


def search_params(
    kind: str,
    nlist: int,
    selector: faiss.IDSelector | None,
    *,
    nprobe: int | None,
    ef_search: int | None,
    hnsw_quantizer: bool = False,
) -> faiss.SearchParameters | None:
    """A fresh parameter object per search (``IndexIDMap`` swaps its selector during the search,
    so one shared between threads would race). Each family (``family()``, computed once per
    index by the caller) takes its own class."""
    if kind == FAMILY_IVF:
        params = faiss.SearchParametersIVF()
        params.nprobe = nprobe or default_nprobe(nlist)
        params.max_codes = 0
        if hnsw_quantizer:
            # Faiss keeps a reference to the assigned object (faiss >= 1.8 SearchParameters).
            params.quantizer_params = faiss.SearchParametersHNSW(
                efSearch=quantizer_ef(params.nprobe)
            )
    elif kind == FAMILY_HNSW:
        params = faiss.SearchParametersHNSW()
        params.efSearch = ef_search or DEFAULT_EF_SEARCH
    else:
        if selector is None:
            return None
        params = faiss.SearchParameters()
    if selector is not None:
        params.sel = selector
    return params


def supports_selector(index: faiss.Index) -> bool:
    """IndexPQ (plain PQ) refuses search parameters; filtered searches then scan exactly."""
    return not isinstance(core_index(index), faiss.IndexPQ)


_local = threading.local()


def use_threads(n: int) -> None:
    """Set Faiss' OpenMP threads for the calling thread. libgomp keeps this setting per thread,
    so setting it once at start-up does not reach the worker threads that run searches."""
    if getattr(_local, "threads", None) != n:
        faiss.omp_set_num_threads(n)
        _local.threads = n
