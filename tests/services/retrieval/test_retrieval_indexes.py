"""Index choice: every index type answers correctly (filters included), search depth and
refinement depth per query, ``auto``, and background rebuilds that lose no write."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import pytest

from services.retrieval import indexing
from services.retrieval.errors import InvalidIndexSettings
from services.retrieval.indexing import IndexSpec, SearchDepth, choose_factory
from services.retrieval.store import Store
from services.retrieval.synthetic import ClipLike
from services.retrieval.vectors import VectorSet

MakeVectors = Callable[[int, int], np.ndarray]
DIM = 16
MODEL = "clip-test"
# One factory per index family the service offers (PQ2 on 16-d: 8 dimensions a code byte).
FACTORIES = ["Flat", "HNSW32", "IVF16,Flat", "IVF16,PQ2", "PQ2", "SQ8"]


def brute_force(ids: np.ndarray, vectors: np.ndarray, query: np.ndarray, k: int) -> list[int]:
    scores = vectors @ query
    order = np.lexsort((ids, -scores))[:k]
    return ids[order].tolist()


def clustered(n: int, dim: int = DIM, seed: int = 3) -> np.ndarray:
    return ClipLike(dim, seed=seed, clusters=32, rank=8).rows(0, n)


def recall(results: list[list[tuple[int, float]]], truth: list[list[int]]) -> float:
    hits = [len({i for i, _ in r} & set(t)) / len(t) for r, t in zip(results, truth, strict=True)]
    return float(np.mean(hits))


@pytest.mark.parametrize("factory", FACTORIES)
def test_every_index_type_answers_k_exactly_scored_results(factory: str) -> None:
    vectors = clustered(3000)
    ids = np.arange(10_000, 13_000, dtype=np.int64)
    vs = VectorSet(DIM, IndexSpec(factory=factory, rescore_factor=16))
    vs.upsert(ids, vectors)
    assert vs.index_factory == factory and vs.index_size == 3000  # the index path is tested
    queries = clustered(30, seed=4)
    results = vs.search(queries, 10, nprobe=16)
    truth = [brute_force(ids, vectors, q, 10) for q in queries]
    for query, hits in zip(queries, results, strict=True):
        assert len(hits) == 10 and len({i for i, _ in hits}) == 10
        for i, score in hits:  # re-scored exactly against the stored vectors, best first
            assert score == pytest.approx(float(vectors[i - 10_000] @ query), abs=1e-5)
        assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
    assert recall(results, truth) >= 0.9


@pytest.mark.parametrize("factory", FACTORIES)
@pytest.mark.parametrize("allowed", [25, 1500])
def test_filtered_search_returns_k_allowed_results_for_every_index_type(
    factory: str, allowed: int, rng: np.random.Generator
) -> None:
    # exact_filter_max=0 forces the filtered index search (Faiss ID selectors) instead of the
    # exact scan used for small allow-lists.
    vs = VectorSet(DIM, factory, exact_filter_max=0)
    vectors = clustered(3000)
    ids = np.arange(3000, dtype=np.int64)
    vs.upsert(ids, vectors)
    allow = np.sort(rng.choice(ids, allowed, replace=False))
    unknown = np.array([99_999], dtype=np.int64)
    queries = clustered(10, seed=5)
    results = vs.search(queries, 10, allow=np.concatenate((allow, unknown)), nprobe=1)
    for query, hits in zip(queries, results, strict=True):
        got = [i for i, _ in hits]
        assert len(got) == 10 and set(got) <= set(allow.tolist())
        if factory == "Flat":
            assert got == brute_force(allow, vectors[allow], query, 10)


def test_ivf_pq_with_refinement_reaches_exact_answers_with_depth() -> None:
    vectors = clustered(4000)
    ids = np.arange(4000, dtype=np.int64)
    vs = VectorSet(DIM, IndexSpec(factory="IVF32,PQ2"))
    vs.upsert(ids, vectors)
    queries = clustered(40, seed=6)
    truth = [brute_force(ids, vectors, q, 10) for q in queries]
    shallow = recall(vs.search(queries, 10, nprobe=1, rescore_factor=1), truth)
    deep = recall(vs.search(queries, 10, nprobe=32, rescore_factor=50), truth)
    # PQ codes alone rank coarsely; probing every list and re-scoring 500 candidates per query
    # with the stored vectors gives the exact answer.
    assert shallow < 0.9
    assert deep == 1.0


def test_search_depth_per_query_changes_recall() -> None:
    vectors = clustered(4000)
    ids = np.arange(4000, dtype=np.int64)
    queries = clustered(40, seed=7)
    truth = [brute_force(ids, vectors, q, 10) for q in queries]
    ivf = VectorSet(DIM, IndexSpec(factory="IVF64,Flat", rescore_factor=1))
    ivf.upsert(ids, vectors)
    assert recall(ivf.search(queries, 10, nprobe=1), truth) < 0.9
    assert recall(ivf.search(queries, 10, nprobe=64), truth) == 1.0  # every list: exhaustive
    # The collection default applies when the query sets none.
    ivf.set_spec(IndexSpec(factory="IVF64,Flat", rescore_factor=1, nprobe=64))
    assert recall(ivf.search(queries, 10), truth) == 1.0


def test_search_depth_is_validated(tmp_path: Path, unit_vectors: MakeVectors) -> None:
    store = Store(tmp_path)
    store.load()
    store.upsert("c", "image", MODEL, np.arange(3), unit_vectors(3, DIM))
    c = store.get("c")
    for depth in (
        SearchDepth(nprobe=0),
        SearchDepth(ef_search=10**6),
        SearchDepth(rescore_factor=0),
    ):
        with pytest.raises(InvalidIndexSettings) as raised:
            c.search("image", unit_vectors(1, DIM), 1, depth=depth)
        assert raised.value.status == 422 and raised.value.code == "invalid_index"
    store.close()


@pytest.mark.parametrize(
    "settings",
    [
        {"factory": ""},
        {"nprobe": 0},
        {"ef_search": 40_000},
        {"rescore_factor": 101},
        {"storage": "float8"},
        {"colour": "red"},
        {"nprobe": True},
        {"ef_construction": 4},
    ],
)
def test_invalid_index_settings(settings: dict[str, object]) -> None:
    with pytest.raises(InvalidIndexSettings):
        IndexSpec.from_dict(settings)


@pytest.mark.parametrize("factory", ["NoSuchIndex", "IDMap,Flat", "IVF16,Flat,RFlat", "PQ5"])
def test_factories_the_service_cannot_use_are_refused(factory: str) -> None:
    with pytest.raises(InvalidIndexSettings):
        indexing.check_factory(DIM, factory)


@pytest.mark.parametrize(
    ("factory", "exact"),
    [
        ("Flat", True),
        ("HNSW32", True),
        ("IVF16,Flat", True),
        ("HNSW32,SQ8", False),
        ("IVF16,PQ2", False),
        ("SQ8", False),
        ("PCA8,Flat", False),
    ],
)
def test_only_indexes_of_float32_rows_have_their_scores_trusted(factory: str, exact: bool) -> None:
    assert indexing.scores_are_exact(indexing.new_index(DIM, factory)) is exact


@pytest.mark.parametrize("factory", ["HNSW32", "IVF16,Flat", "Flat"])
def test_index_scores_are_not_trusted_while_stale_entries_remain(factory: str) -> None:
    # Exact-scoring indexes skip the re-scoring from storage, but an HNSW graph keeps the old
    # entry of an overwritten or deleted id: its score must not be taken from that entry.
    vectors = clustered(2000)
    ids = np.arange(2000, dtype=np.int64)
    vs = VectorSet(DIM, IndexSpec(factory=factory, rescore_factor=1))
    vs.upsert(ids, vectors)
    moved, deleted = 7, 8
    vs.upsert(np.array([moved]), -vectors[moved : moved + 1])
    vs.delete(np.array([deleted]))
    for target in (moved, deleted):
        hits = vs.search(vectors[target : target + 1], 10, ef_search=64)[0]
        assert target not in [i for i, _ in hits]
        for i, score in hits:
            assert score == pytest.approx(float(vectors[i] @ vectors[target]), abs=1e-5)
    (top,) = vs.search(-vectors[moved : moved + 1], 1, ef_search=64)[0]
    assert top == (moved, pytest.approx(1.0, abs=1e-5))


@pytest.mark.parametrize("factory", ["HNSW32", "HNSW32,SQfp16", "HNSW32,SQ8"])
def test_locality_order_renumbers_hnsw_rows_without_changing_answers(
    monkeypatch: pytest.MonkeyPatch, factory: str
) -> None:
    monkeypatch.setattr(indexing, "LOCALITY_MIN", 1000)
    monkeypatch.setattr(indexing, "_LOCALITY_CHUNK", 700)  # several chunks
    vectors = clustered(3000)
    ids = np.arange(50_000, 53_000, dtype=np.int64)
    index = indexing.new_index(DIM, factory)
    index.train(vectors)
    index.add_with_ids(vectors, ids)
    stored = indexing.core_index(index).reconstruct_n(0, 3000)
    queries = clustered(50, seed=6)
    before = index.search(queries, 10)
    assert indexing.order_for_locality(index)
    id_map = faiss.vector_to_array(faiss.downcast_index(index).id_map)
    assert not np.array_equal(id_map, ids)  # renumbered ...
    core = indexing.core_index(index)
    assert np.array_equal(core.reconstruct_n(0, 3000), stored[id_map - 50_000])  # ... rows too
    after = index.search(queries, 10)
    assert np.array_equal(before[1], after[1]) and np.allclose(before[0], after[0])


def test_locality_order_leaves_other_indexes_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(indexing, "LOCALITY_MIN", 1000)
    vectors = clustered(3000)
    for factory in ("HNSW32,PQ8x4", "IVF16,Flat", "Flat"):
        index = indexing.new_index(DIM, factory)
        index.train(vectors)
        index.add_with_ids(vectors, np.arange(3000))
        assert not indexing.order_for_locality(index)
    small = indexing.new_index(DIM, "HNSW32")
    small.add_with_ids(vectors[:999], np.arange(999))
    assert not indexing.order_for_locality(small)


def test_hnsw_build_depth_is_set_from_the_settings() -> None:
    vs = VectorSet(DIM, IndexSpec(factory="HNSW16", ef_construction=48))
    vs.upsert(np.arange(10), clustered(10))
    assert indexing.core_index(vs._index).hnsw.efConstruction == 48  # type: ignore[arg-type]
    default = VectorSet(DIM, IndexSpec(factory="HNSW16"))
    assert indexing.core_index(default._index).hnsw.efConstruction == (  # type: ignore[arg-type]
        indexing.DEFAULT_EF_CONSTRUCTION
    )


def test_auto_picks_by_size_and_memory_budget() -> None:
    gib = 1 << 30
    assert choose_factory(5_000, 512, budget_bytes=gib, storage="float32") == "Flat"
    # 1M x 512: 2 GB of vectors, 0.13 GB of ids, 1.3 GB of HNSW with float16 rows: 8 GiB yes,
    # 2 GiB no.
    assert choose_factory(1_000_000, 512, budget_bytes=8 * gib, storage="float32") == (
        "HNSW32,SQfp16"
    )
    assert choose_factory(1_000_000, 512, budget_bytes=2 * gib, storage="float32") == (
        "IVF2048,PQ128"
    )
    # Memory-mapped float16 vectors are paged by the OS, not counted against the budget.
    assert choose_factory(1_000_000, 512, budget_bytes=2 * gib, storage="float16-mmap") == (
        "HNSW32,SQfp16"
    )
    assert choose_factory(10_000_000, 512, budget_bytes=8 * gib, storage="float16-mmap") == (
        "IVF8192_HNSW32,PQ128"
    )


def test_auto_moves_a_growing_set_through_the_index_types(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(indexing, "AUTO_FLAT_MAX", 500)
    # Budget for HNSW up to ~1100 vectors of 16-d, IVF-PQ beyond.
    per_vector = indexing.stored_vector_bytes(1, DIM, "float32") + indexing.hnsw_bytes(1, DIM)
    vs = VectorSet(DIM, IndexSpec(factory="auto"), memory_budget=1100 * per_vector)
    vectors = clustered(4000)
    seen = []
    for start in range(0, 4000, 250):
        vs.upsert(np.arange(start, start + 250, dtype=np.int64), vectors[start : start + 250])
        seen.append(vs.index_factory)
    assert seen[0] == "Flat"
    assert "HNSW32,SQfp16" in seen
    assert seen[-1] is not None and seen[-1].startswith("IVF") and seen[-1].endswith(",PQ4")
    queries = clustered(10, seed=8)
    truth = [brute_force(np.arange(4000), vectors, q, 5) for q in queries]
    assert recall(vs.search(queries, 5, nprobe=1024, rescore_factor=50), truth) == 1.0


# -- background rebuilds ------------------------------------------------------------------------


def open_store(root: Path, **options: object) -> Store:
    store = Store(root, inline_rebuild_max=0, **options)  # type: ignore[arg-type]
    store.load()
    return store


def test_writes_made_during_a_background_rebuild_are_not_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(tmp_path)
    spec = IndexSpec(factory="IVF16,Flat", nprobe=16)
    collection, _ = store.ensure("c", MODEL, DIM, spec)
    vectors = clustered(3000)
    collection.upsert("image", np.arange(1500), vectors[:1500])
    assert store.wait_idle()
    vs = collection._sets["image"]
    assert vs.index_factory == "IVF16,Flat" and vs.index_size == 1500

    # Retraining is due at 3000 vectors. While the new index is being filled (after the
    # worker copied the ids to build from), other writes arrive, and searches go on.
    during: dict[str, object] = {}
    build = VectorSet._build
    fresh = clustered(200, seed=9)

    def build_with_writes(self: VectorSet, *args: object, **kwargs: object) -> object:
        index = build(self, *args, **kwargs)  # type: ignore[arg-type]
        collection.upsert("image", np.arange(3000, 3100), fresh[:100])  # new ids
        collection.upsert("image", np.arange(0, 100), fresh[100:])  # overwrites
        collection.delete(np.arange(100, 200), "image")
        during["hits"] = collection.search("image", fresh[:1], 5)[0]
        during["rebuilding"] = collection.stats("image")["rebuilding"]
        return index

    monkeypatch.setattr(VectorSet, "_build", build_with_writes)
    collection.upsert("image", np.arange(1500, 3000), vectors[1500:])
    assert store.wait_idle()
    monkeypatch.undo()

    assert during["rebuilding"] is True
    assert next(i for i, _ in during["hits"]) == 3000  # type: ignore[index]
    live_ids = np.concatenate((np.arange(0, 100), np.arange(200, 3100)))
    live = np.concatenate((fresh[100:], vectors[200:3000], fresh[:100]))
    # The new index holds exactly the live vectors: replayed writes, no deleted or stale entry.
    assert vs.index_size == len(live_ids) == len(vs)
    assert vs._built_n == 3000
    hits = collection.search("image", live, 1, depth=SearchDepth(nprobe=16))
    assert [h[0][0] for h in hits] == live_ids.tolist()
    assert all(h[0][1] == pytest.approx(1.0, abs=1e-5) for h in hits)
    store.close()


def test_searches_and_writes_go_on_during_background_rebuilds(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    collection, _ = store.ensure("c", MODEL, DIM, IndexSpec(factory="HNSW16"))
    vectors = clustered(6100)
    expected: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []
    stop = threading.Event()

    def search() -> None:
        try:
            while not stop.is_set():
                for hits in collection.search("image", vectors[:4], 10):
                    # Every answer has k hits while the collection holds ≥ k vectors.
                    assert len(hits) == 10 or len(hits) == collection.counts()["image"]
        except BaseException as exc:  # collected for the main thread
            errors.append(exc)

    collection.upsert("image", np.arange(20), vectors[:20])
    expected.update(zip(range(20), vectors[:20], strict=True))
    reader = threading.Thread(target=search, daemon=True)
    reader.start()
    rng = np.random.default_rng(0)
    rebuilt = 0
    try:
        for step in range(40):
            new = np.arange(20 + step * 150, 20 + (step + 1) * 150)
            collection.upsert("image", new, vectors[new])
            expected.update(zip(new.tolist(), vectors[new], strict=True))
            # Overwrite and delete, so HNSW collects stale entries and rebuilds in the background.
            old = rng.choice(sorted(expected), 60, replace=False)
            collection.upsert("image", old[:30], vectors[old[30:]])
            expected.update(zip(old[:30].tolist(), vectors[old[30:]], strict=True))
            collection.delete(old[30:], "image")
            for i in old[30:].tolist():
                expected.pop(i)
            rebuilt += int(collection.stats("image")["rebuilding"])
    finally:
        stop.set()
        reader.join(10)
    assert store.wait_idle()
    assert not errors, errors[0]
    assert rebuilt > 0  # a rebuild was running during some of the writes
    vs = collection._sets["image"]
    assert sorted(vs.ids.tolist()) == sorted(expected)
    stored = dict(zip(vs.ids.tolist(), vs.vectors, strict=True))
    for i, v in expected.items():
        np.testing.assert_array_equal(stored[i], v)
    assert vs.index_size - len(vs) <= max(1024, len(vs) // 4)  # stale entries stay bounded
    store.close()


def test_a_background_rebuild_is_cancelled_when_the_store_closes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(tmp_path)
    collection, _ = store.ensure("c", MODEL, DIM, IndexSpec(factory="IVF16,Flat"))
    started = threading.Event()
    current = VectorSet._current_rows

    def slow(self: VectorSet, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        started.set()
        time.sleep(0.05)
        return current(self, ids)

    monkeypatch.setattr("services.retrieval.vectors._BUILD_CHUNK", 10)
    monkeypatch.setattr(VectorSet, "_current_rows", slow)
    collection.upsert("image", np.arange(1200), clustered(1200))
    assert started.wait(10)
    began = time.monotonic()
    store.close()  # does not wait for 120 slow chunks
    assert time.monotonic() - began < 5


def test_an_hnsw_quantizer_assigns_and_probes_the_nearest_lists() -> None:
    """IVF…_HNSW32 (what auto builds from 4,096 lists): at Faiss' default depth the quantizer
    files vectors under lists that are not their nearest, and a search probes the wrong ones."""
    import faiss

    x = ClipLike(32, seed=5).rows(0, 20_000)
    index = indexing.new_index(32, "IVF1024_HNSW32,Flat")
    index.train(x)
    ivf = faiss.extract_index_ivf(index)
    quantizer = faiss.downcast_index(ivf.quantizer)
    assert quantizer.hnsw.efSearch >= indexing.QUANTIZER_EF
    exact = faiss.IndexFlatIP(32)
    exact.add(quantizer.reconstruct_n(0, ivf.nlist))
    _, nearest = exact.search(x[:2000], 1)
    _, assigned = quantizer.search(x[:2000], 1)
    assert (assigned == nearest).mean() > 0.99

    params = indexing.search_params(
        indexing.FAMILY_IVF, 1024, None, nprobe=100, ef_search=None, hnsw_quantizer=True
    )
    assert params.nprobe == 100
    assert params.quantizer_params is not None
    assert indexing.quantizer_ef(100) == 200 and indexing.quantizer_ef(8) == indexing.QUANTIZER_EF

    # An index saved before this setting existed is deepened when a vector set takes it.
    quantizer.hnsw.efSearch = 16
    vs = VectorSet(32, IndexSpec(factory="IVF1024_HNSW32,Flat"))
    vs._install(index, "IVF1024_HNSW32,Flat", 0, set())
    assert quantizer.hnsw.efSearch == indexing.QUANTIZER_EF
