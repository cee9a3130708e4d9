"""Domain tests: vector sets, collections, the store, and their durability."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from services.retrieval import snapshots, wal
from services.retrieval import store as store_module
from services.retrieval.errors import IndexSettingsConflict, InvalidIndexSettings
from services.retrieval.indexing import IndexSpec, SearchDepth
from services.retrieval.store import (
    Collection,
    DataDirectoryLocked,
    DimensionMismatch,
    ModelMismatch,
    Store,
    VectorSet,
)
from shared.problems import Unprocessable

MakeVectors = Callable[[int, int], np.ndarray]
DIM = 16
MODEL = "clip-test"


def brute_force(
    live: dict[int, np.ndarray], query: np.ndarray, k: int, allow: set[int] | None = None
) -> list[tuple[int, float]]:
    ids = [i for i in live if allow is None or i in allow]
    scores = np.array([float(live[i] @ query) for i in ids])
    order = np.lexsort((np.array(ids), -scores))[:k]
    return [(ids[j], float(scores[j])) for j in order]


def assert_hits(got: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    assert [i for i, _ in got] == [i for i, _ in expected]
    assert [s for _, s in got] == pytest.approx([s for _, s in expected], abs=1e-5)


def open_store(root: Path, **options: object) -> Store:
    store = Store(root, **options)  # type: ignore[arg-type]
    store.load()
    return store


def crash(store: Store) -> None:
    """Drop the store the way a killed process would: no snapshot, nothing flushed."""
    store.close(snapshot=False)


# -- search correctness ------------------------------------------------------------------------


@pytest.mark.parametrize("factory", ["Flat", "HNSW32"])
def test_search_matches_brute_force_after_overwrites_and_deletes(
    factory: str, unit_vectors: MakeVectors, rng: np.random.Generator
) -> None:
    vs = VectorSet(DIM, factory, rescore_factor=4)
    ids = np.arange(1, 601, dtype=np.int64)
    vectors = unit_vectors(600, DIM)
    vs.upsert(ids, vectors)
    live = dict(zip(ids.tolist(), vectors, strict=True))
    # Overwrite 100 ids and delete 100 others: the index must not answer with stale vectors.
    overwritten = rng.choice(ids, 100, replace=False)
    fresh = unit_vectors(100, DIM)
    vs.upsert(overwritten, fresh)
    live.update(zip(overwritten.tolist(), fresh, strict=True))
    deleted = [i for i in ids.tolist() if i not in set(overwritten.tolist())][:100]
    assert vs.delete(np.asarray([*deleted, 99_999], dtype=np.int64)) == 100
    for i in deleted:
        live.pop(i)
    assert len(vs) == len(live) == 500

    queries = unit_vectors(20, DIM)
    results = vs.search(queries, 10)
    recall = []
    for query, hits in zip(queries, results, strict=True):
        expected = brute_force(live, query, 10)
        got_ids = [i for i, _ in hits]
        assert len(hits) == 10 and len(set(got_ids)) == 10
        assert not set(got_ids) & set(deleted)
        # Re-scored exactly against the stored (current) vectors, best first.
        for i, score in hits:
            assert score == pytest.approx(float(live[i] @ query), abs=1e-5)
        assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
        recall.append(len(set(got_ids) & {i for i, _ in expected}) / 10)
        if factory == "Flat":
            assert got_ids == [i for i, _ in expected]
    assert np.mean(recall) >= 0.9


def test_rescoring_replaces_approximate_scores(unit_vectors: MakeVectors) -> None:
    # SQ4 stores 4-bit codes: its own scores are visibly off, the returned ones must be exact.
    vs = VectorSet(DIM, "SQ4", rescore_factor=4)
    ids = np.arange(1200, dtype=np.int64)
    vectors = unit_vectors(1200, DIM)
    vs.upsert(ids, vectors)
    assert vs.index_size == 1200  # trained and in use, so the index path is what is tested
    queries = unit_vectors(5, DIM)
    approx, _ = vs._index.search(queries, 10)  # type: ignore[union-attr]
    exact_top = np.sort(queries @ vectors.T, axis=1)[:, ::-1][:, :10]
    assert np.abs(approx - exact_top).max() > 1e-3
    for query, hits in zip(queries, vs.search(queries, 10), strict=True):
        assert len(hits) == 10
        for i, score in hits:
            assert score == pytest.approx(float(vectors[i] @ query), abs=1e-5)


@pytest.mark.parametrize("factory", ["Flat", "HNSW32"])
def test_allow_list_returns_k_allowed_results(
    factory: str, unit_vectors: MakeVectors, rng: np.random.Generator
) -> None:
    # exact_filter_max=0 forces the filtered Faiss search (IDSelectorBatch) instead of the
    # exact scan used for small allow-lists.
    vs = VectorSet(DIM, factory, exact_filter_max=0)
    ids = np.arange(2000, dtype=np.int64)
    vectors = unit_vectors(2000, DIM)
    vs.upsert(ids, vectors)
    live = dict(zip(ids.tolist(), vectors, strict=True))
    allow = rng.choice(ids, 25, replace=False)
    queries = unit_vectors(8, DIM)
    for query, hits in zip(queries, vs.search(queries, 10, allow=allow), strict=True):
        got = [i for i, _ in hits]
        assert len(got) == 10
        assert set(got) <= set(allow.tolist())
        if factory == "Flat":
            assert got == [i for i, _ in brute_force(live, query, 10, set(allow.tolist()))]
    # Fewer allowed (and live) than k: all of them; unknown ids in the list are ignored.
    few = np.array([3, 5, 7, 123_456], dtype=np.int64)
    assert sorted(i for i, _ in vs.search(queries[:1], 10, allow=few)[0]) == [3, 5, 7]
    assert vs.search(queries[:1], 10, allow=np.array([], dtype=np.int64)) == [[]]


def test_small_allow_lists_are_searched_exactly(unit_vectors: MakeVectors) -> None:
    vs = VectorSet(DIM, "HNSW32")
    vectors = unit_vectors(500, DIM)
    vs.upsert(np.arange(500, dtype=np.int64), vectors)
    live = dict(enumerate(vectors))
    allow = set(range(0, 500, 7))
    query = unit_vectors(1, DIM)
    hits = vs.search(query, 5, allow=np.array(sorted(allow)))[0]
    assert_hits(hits, brute_force(live, query[0], 5, allow))


def test_stale_entries_of_an_index_without_delete_are_hidden_then_rebuilt(
    unit_vectors: MakeVectors, rng: np.random.Generator
) -> None:
    vs = VectorSet(DIM, "HNSW32", rescore_factor=4)  # HNSW cannot delete: stale entries stay
    ids = np.arange(2000, dtype=np.int64)
    vectors = unit_vectors(2000, DIM)
    vs.upsert(ids, vectors)

    def nudge(v: np.ndarray) -> np.ndarray:
        # A new vector close to the old one, so both entries of an id compete as candidates.
        moved = v + 0.05 * rng.standard_normal(v.shape).astype(np.float32)
        return moved / np.linalg.norm(moved, axis=1, keepdims=True)

    latest = vectors.copy()
    latest[:400] = nudge(vectors[:400])
    vs.upsert(ids[:400], latest[:400])
    assert vs.index_size == 2400  # under the rebuild threshold: the old entries are still there
    live = dict(enumerate(latest))
    queries = latest[:40:4]
    recall = []
    for q, hits in zip(range(0, 40, 4), vs.search(queries, 10), strict=True):
        got = [i for i, _ in hits]
        assert len(set(got)) == 10 and got[0] == q  # each id once, its latest vector first
        for i, score in hits:
            assert score == pytest.approx(float(live[i] @ latest[q]), abs=1e-5)
        recall.append(len(set(got) & {i for i, _ in brute_force(live, latest[q], 10)}) / 10)
    assert np.mean(recall) >= 0.9

    for _ in range(2):
        latest[:400] = nudge(latest[:400])
        vs.upsert(ids[:400], latest[:400])
    assert vs.index_size == 2000  # 1200 stale entries passed the threshold: rebuilt
    vs.delete(ids[:40])  # now dead entries in the index
    assert vs.index_size == 2000
    for hits in vs.search(latest[:40:4], 10):
        assert len(hits) == 10 and all(i >= 40 for i, _ in hits)


def test_filtered_search_falls_back_to_exact_when_the_index_finds_too_few(
    unit_vectors: MakeVectors, rng: np.random.Generator
) -> None:
    # IVF probes one of 8 lists, holding only ~1/8 of the allowed ids: widening k cannot help,
    # the exact scan must complete the answer.
    vs = VectorSet(DIM, "IVF8,Flat", exact_filter_max=0, rescore_factor=1)
    vectors = unit_vectors(2000, DIM)
    vs.upsert(np.arange(2000, dtype=np.int64), vectors)
    assert vs.index_size == 2000
    allow = set(rng.choice(2000, 30, replace=False).tolist())  # more than k * factor
    queries = unit_vectors(5, DIM)
    results = vs.search(queries, 10, allow=np.array(sorted(allow)))
    for query, hits in zip(queries, results, strict=True):
        assert_hits(hits, brute_force(dict(enumerate(vectors)), query, 10, allow))


def test_trained_factory_searches_exactly_until_trained(unit_vectors: MakeVectors) -> None:
    vs = VectorSet(DIM, "IVF4,Flat")
    vectors = unit_vectors(1500, DIM)
    vs.upsert(np.arange(500, dtype=np.int64), vectors[:500])
    assert vs.index_size == 0  # too few vectors to train: no index yet
    query = unit_vectors(1, DIM)
    live = dict(enumerate(vectors[:500]))
    assert_hits(vs.search(query, 5)[0], brute_force(live, query[0], 5))
    vs.upsert(np.arange(500, 1500, dtype=np.int64), vectors[500:])
    assert vs.index_size == 1500
    hits = vs.search(query, 5)[0]
    assert len(hits) == 5
    for i, score in hits:
        assert score == pytest.approx(float(vectors[i] @ query[0]), abs=1e-5)


def test_empty_modality_answers_empty_results(tmp_path: Path, unit_vectors: MakeVectors) -> None:
    store = open_store(tmp_path)
    store.upsert("c", "image", MODEL, np.array([1]), unit_vectors(1, DIM))
    assert store.get("c").search("text", unit_vectors(2, DIM), 5) == [[], []]


def test_collection_rejects_invalid_input(tmp_path: Path, unit_vectors: MakeVectors) -> None:
    store = open_store(tmp_path)
    store.upsert("c", "image", MODEL, np.array([1, 2]), unit_vectors(2, DIM))
    c = store.get("c")
    with pytest.raises(ModelMismatch) as mismatch:
        store.upsert("c", "image", "other-model", np.array([3]), unit_vectors(1, DIM))
    assert mismatch.value.code == "model_mismatch" and mismatch.value.status == 409
    with pytest.raises(ModelMismatch):
        c.search("image", unit_vectors(1, DIM), 1, model_id="other-model")
    with pytest.raises(DimensionMismatch) as dim:
        store.upsert("c", "image", MODEL, np.array([3]), unit_vectors(1, DIM + 1))
    assert dim.value.code == "dimension_mismatch" and dim.value.status == 422
    with pytest.raises(DimensionMismatch):
        c.search("image", unit_vectors(1, DIM - 1), 1)
    with pytest.raises(Unprocessable) as zero:
        c.search("image", np.zeros((1, DIM), np.float32), 1)
    assert zero.value.code == "zero_vector"
    with pytest.raises(Unprocessable):
        c.upsert("image", np.array([5, 5]), unit_vectors(2, DIM))
    bad = unit_vectors(1, DIM)
    bad[0, 3] = np.nan
    with pytest.raises(Unprocessable):
        c.upsert("image", np.array([5]), bad)
    with pytest.raises(Unprocessable):
        c.upsert("image", np.array([-1]), unit_vectors(1, DIM))
    assert c.counts() == {"image": 2, "text": 0}  # nothing above was applied


# -- durability ----------------------------------------------------------------------------------


def _contents(store: Store, name: str) -> dict[tuple[str, int], np.ndarray]:
    c = store.get(name)
    out = {}
    for modality, vs in c._sets.items():
        for i, v in zip(vs.ids.tolist(), vs.vectors, strict=True):
            out[(modality, i)] = v.copy()
    return out


def _assert_same(
    a: dict[tuple[str, int], np.ndarray], b: dict[tuple[str, int], np.ndarray]
) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def _write_some(store: Store, unit_vectors: MakeVectors) -> None:
    store.upsert("c", "image", MODEL, np.arange(10), unit_vectors(10, DIM))
    store.upsert("c", "text", MODEL, np.arange(100, 130), unit_vectors(30, DIM))
    store.upsert("c", "image", MODEL, np.array([3, 4, 50]), unit_vectors(3, DIM))
    store.get("c").delete(np.array([5, 100, 101]))  # both modalities
    store.get("c").delete(np.array([6]), "text")  # no text vector 6: a no-op


def test_reopen_after_graceful_close_uses_the_snapshot(
    tmp_path: Path, unit_vectors: MakeVectors
) -> None:
    store = open_store(tmp_path)
    _write_some(store, unit_vectors)
    before = _contents(store, "c")
    store.close()
    assert snapshots.generations(tmp_path / "c") == [2]
    assert wal.wal_path(tmp_path / "c", 2).stat().st_size == 0  # the log was rotated
    reopened = open_store(tmp_path)
    c = reopened.get("c")
    assert (c.model_id, c.dim) == (MODEL, DIM)
    assert c.counts() == {"image": 10, "text": 28}
    _assert_same(before, _contents(reopened, "c"))


def test_log_replay_without_snapshot(tmp_path: Path, unit_vectors: MakeVectors) -> None:
    store = open_store(tmp_path)
    _write_some(store, unit_vectors)
    before = _contents(store, "c")
    crash(store)
    assert snapshots.generations(tmp_path / "c") == []
    reopened = open_store(tmp_path)
    _assert_same(before, _contents(reopened, "c"))
    # Search works on the rebuilt index.
    v = before[("image", 50)]
    assert reopened.get("c").search("image", v[None], 1)[0][0][0] == 50


def test_torn_tail_record_is_discarded_and_later_appends_survive(
    tmp_path: Path, unit_vectors: MakeVectors
) -> None:
    store = open_store(tmp_path)
    _write_some(store, unit_vectors)
    before = _contents(store, "c")
    crash(store)
    log_file = wal.wal_path(tmp_path / "c", 1)
    intact = log_file.stat().st_size
    torn = wal.encode(wal.Upsert("image", np.array([77]), unit_vectors(1, DIM)))
    with log_file.open("ab") as f:
        f.write(torn[: len(torn) // 2])  # the process died mid-write
    reopened = open_store(tmp_path)
    _assert_same(before, _contents(reopened, "c"))  # nothing of record 77, nothing else lost
    assert log_file.stat().st_size == intact  # the torn bytes were cut off
    reopened.upsert("c", "image", MODEL, np.array([78]), unit_vectors(1, DIM))
    crash(reopened)
    again = open_store(tmp_path)
    assert again.get("c").get("image", 78) is not None
    assert again.get("c").get("image", 77) is None


def test_last_record_with_bad_checksum_is_discarded(
    tmp_path: Path, unit_vectors: MakeVectors
) -> None:
    store = open_store(tmp_path)
    store.upsert("c", "image", MODEL, np.array([1]), unit_vectors(1, DIM))
    store.upsert("c", "image", MODEL, np.array([2]), unit_vectors(1, DIM))
    crash(store)
    log_file = wal.wal_path(tmp_path / "c", 1)
    data = bytearray(log_file.read_bytes())
    data[-1] ^= 0xFF
    log_file.write_bytes(bytes(data))
    reopened = open_store(tmp_path)
    assert reopened.get("c").counts()["image"] == 1
    assert reopened.get("c").get("image", 1) is not None


def test_damage_before_the_tail_refuses_to_load(tmp_path: Path, unit_vectors: MakeVectors) -> None:
    store = open_store(tmp_path)
    store.upsert("c", "image", MODEL, np.array([1]), unit_vectors(1, DIM))
    store.upsert("c", "image", MODEL, np.array([2]), unit_vectors(1, DIM))
    crash(store)
    log_file = wal.wal_path(tmp_path / "c", 1)
    data = bytearray(log_file.read_bytes())
    data[20] ^= 0xFF  # inside the first record: acknowledged data is damaged
    log_file.write_bytes(bytes(data))
    with pytest.raises(wal.WalCorruptError):
        open_store(tmp_path)


def test_zero_filled_tail_is_treated_as_torn(tmp_path: Path, unit_vectors: MakeVectors) -> None:
    store = open_store(tmp_path)
    store.upsert("c", "image", MODEL, np.array([1]), unit_vectors(1, DIM))
    crash(store)
    with wal.wal_path(tmp_path / "c", 1).open("ab") as f:
        f.write(bytes(4096))  # file size extended but the data never written
    assert open_store(tmp_path).get("c").counts()["image"] == 1


def test_snapshot_rotates_the_log(tmp_path: Path, unit_vectors: MakeVectors) -> None:
    store = open_store(tmp_path, snapshot_every=3)
    store.upsert("c", "image", MODEL, np.array([1]), unit_vectors(1, DIM))
    store.upsert("c", "image", MODEL, np.array([2]), unit_vectors(1, DIM))
    c = store.get("c")
    assert not c.snapshot_due
    store.upsert("c", "text", MODEL, np.array([3]), unit_vectors(1, DIM))
    assert c.snapshot_due and c.wal_bytes > 0
    assert c.snapshot()
    assert not c.snapshot_due and c.wal_bytes == 0
    assert wal.generations(tmp_path / "c") == [2]
    assert not c.snapshot()  # nothing new since
    c.delete(np.array([1]))
    store.upsert("c", "image", MODEL, np.array([4]), unit_vectors(1, DIM))
    before = _contents(store, "c")
    crash(store)
    reopened = open_store(tmp_path)
    _assert_same(before, _contents(reopened, "c"))  # snapshot + replay of generation 2
    assert set(before) == {("image", 2), ("image", 4), ("text", 3)}


def test_crash_between_log_rotation_and_snapshot_loses_nothing(
    tmp_path: Path, unit_vectors: MakeVectors, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(tmp_path)
    store.upsert("c", "image", MODEL, np.array([1, 2]), unit_vectors(2, DIM))
    c = store.get("c")

    def fail(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(store_module.wal, "atomic_write", fail)
    with pytest.raises(OSError):
        c.snapshot()
    monkeypatch.undo()
    # The log was rotated but the snapshot never written: both logs must be kept.
    assert wal.generations(tmp_path / "c") == [1, 2]
    store.upsert("c", "image", MODEL, np.array([3]), unit_vectors(1, DIM))
    before = _contents(store, "c")
    crash(store)
    reopened = open_store(tmp_path)
    _assert_same(before, _contents(reopened, "c"))
    assert reopened.get("c").snapshot()
    assert wal.generations(tmp_path / "c") == [3]


def test_interrupted_collection_creation_is_cleaned_up(tmp_path: Path) -> None:
    leftover = tmp_path / ".tmp-c-123"
    leftover.mkdir()
    (leftover / "meta.json").write_text("{}")
    store = open_store(tmp_path)
    assert not leftover.exists()
    assert store.collections() == []


def test_collection_metadata_is_persisted(tmp_path: Path, unit_vectors: MakeVectors) -> None:
    store = open_store(tmp_path)
    store.upsert("a", "text", "model-a", np.array([1]), unit_vectors(1, 8))
    store.upsert("b", "image", "model-b", np.array([1]), unit_vectors(1, DIM))
    crash(store)
    reopened = open_store(tmp_path)
    keys = ("name", "model_id", "dim", "counts")
    assert [{k: c.info()[k] for k in keys} for c in reopened.collections()] == [
        {"name": "a", "model_id": "model-a", "dim": 8, "counts": {"image": 0, "text": 1}},
        {"name": "b", "model_id": "model-b", "dim": DIM, "counts": {"image": 1, "text": 0}},
    ]
    with pytest.raises(ModelMismatch):
        reopened.upsert("a", "text", "model-b", np.array([2]), unit_vectors(1, 8))


def test_collection_refuses_writes_after_close(tmp_path: Path, unit_vectors: MakeVectors) -> None:
    c = Collection.create(tmp_path, "c", MODEL, DIM)
    c.close()
    with pytest.raises(store_module.CollectionUnavailable):
        c.upsert("image", np.array([1]), unit_vectors(1, DIM))


def test_torn_record_in_an_older_log_generation_refuses_to_load(
    tmp_path: Path, unit_vectors: MakeVectors, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only the newest log can have been cut by a crash; an older one ends where it was rotated.
    store = open_store(tmp_path)
    store.upsert("c", "image", MODEL, np.array([1]), unit_vectors(1, DIM))

    def fail(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(store_module.wal, "atomic_write", fail)
    with pytest.raises(OSError):
        store.get("c").snapshot()  # rotated to generation 2, generation 1 kept
    monkeypatch.undo()
    store.upsert("c", "image", MODEL, np.array([2]), unit_vectors(1, DIM))
    crash(store)
    assert wal.generations(tmp_path / "c") == [1, 2]
    intact = open_store(tmp_path)
    assert intact.get("c").counts()["image"] == 2
    crash(intact)
    with wal.wal_path(tmp_path / "c", 1).open("ab") as f:
        f.write(b"\x10\x00\x00")
    with pytest.raises(wal.WalCorruptError):
        open_store(tmp_path)


def test_concurrent_searches_never_see_half_an_upsert(
    tmp_path: Path, unit_vectors: MakeVectors
) -> None:
    store = open_store(tmp_path)
    direction = unit_vectors(1, DIM)[0]
    # Unrelated vectors (scores < 1) make the collection large enough to search the index.
    others = unit_vectors(300, DIM)
    store.upsert("c", "image", MODEL, np.arange(1000, 1300), others)
    ids = np.arange(20, dtype=np.int64)
    store.upsert("c", "image", MODEL, ids, np.tile(direction, (20, 1)))
    c = store.get("c")
    stop = threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        scale = 1.0
        while not stop.is_set():
            scale = scale % 7 + 1  # every upsert gives all 20 ids one new, shared score
            c.upsert("image", ids, np.tile(direction * scale, (20, 1)))

    def read() -> None:
        try:
            while not stop.is_set():
                hits = c.search("image", direction[None], 20)[0]
                assert {i for i, _ in hits} == set(range(20)), hits
                assert len({round(s, 4) for _, s in hits}) == 1, hits
        except BaseException as exc:  # collected for the main thread
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=write)] + [threading.Thread(target=read) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join(10)
    assert not errors, errors[0]
    assert c.counts()["image"] == 320


# -- group commit, persisted indexes, storage, settings ------------------------------------------


def test_concurrent_writers_share_fsyncs_and_all_survive_a_crash(
    tmp_path: Path, unit_vectors: MakeVectors, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(tmp_path)
    store.upsert("c", "image", MODEL, np.array([0]), unit_vectors(1, DIM))
    c = store.get("c")
    datasync = wal._datasync

    def slow_datasync(fd: int) -> None:
        time.sleep(0.02)  # a slow disk: writers pile up behind the fsync in flight
        datasync(fd)

    monkeypatch.setattr(wal, "_datasync", slow_datasync)
    commits_before = c.commits
    vectors = unit_vectors(8 * 10, DIM)
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def writer(t: int) -> None:
        try:
            barrier.wait()
            for j in range(10):
                i = t * 10 + j
                c.upsert("image", np.array([1000 + i]), vectors[i : i + 1])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors[0]
    commits = c.commits - commits_before
    assert commits <= 40  # 80 acknowledged writes, at most half as many fsyncs
    before = _contents(store, "c")
    assert len(before) == 81
    crash(store)
    _assert_same(before, _contents(open_store(tmp_path), "c"))


def test_snapshot_keeps_the_index_so_a_restart_does_not_rebuild_it(
    tmp_path: Path, unit_vectors: MakeVectors
) -> None:
    store = open_store(tmp_path)
    store.ensure("c", MODEL, DIM, IndexSpec(factory="HNSW16"))
    vectors = unit_vectors(1500, DIM)
    store.upsert("c", "image", MODEL, np.arange(1500), vectors)
    store.get("c").delete(np.arange(10))  # HNSW keeps them as hidden entries
    queries = unit_vectors(5, DIM)
    before = store.get("c").search("image", queries, 10)
    store.close()  # snapshot with the index
    reopened = open_store(tmp_path)
    vs = reopened.get("c")._sets["image"]
    assert vs.index_factory == "HNSW16" and vs.index_size == 1500
    assert vs.last_build_seconds is None  # loaded, not built
    assert reopened.get("c").search("image", queries, 10) == before
    # Writes after the snapshot are replayed onto the loaded index.
    reopened.upsert("c", "image", MODEL, np.array([5000]), queries[:1])
    crash(reopened)
    again = open_store(tmp_path)
    assert again.get("c").search("image", queries[:1], 1)[0][0][0] == 5000
    assert again.get("c")._sets["image"].index_size == 1501


def test_float16_memory_mapped_storage(tmp_path: Path, unit_vectors: MakeVectors) -> None:
    store = open_store(tmp_path, storage="float16-mmap")
    store.ensure("c", MODEL, DIM, IndexSpec(factory="IVF16,PQ2", storage="float16-mmap"))
    vectors = unit_vectors(3000, DIM)
    store.upsert("c", "image", MODEL, np.arange(3000), vectors)
    assert store.wait_idle()  # 3000 vectors: trained in the background
    c = store.get("c")
    vs = c._sets["image"]
    assert vs.index_factory == "IVF16,PQ2"
    assert vs.vectors.dtype == np.float16 and isinstance(vs.vectors, np.memmap)
    assert (tmp_path / "c" / "work-image.f16").stat().st_size >= 3000 * DIM * 2
    queries = unit_vectors(5, DIM)
    depth = SearchDepth(nprobe=16, rescore_factor=50)
    hits = c.search("image", queries, 10, depth=depth)
    for query, row in zip(queries, hits, strict=True):
        expected = np.sort(vectors @ query)[::-1][:10]
        # Re-scored from float16 rows: exact up to float16 rounding.
        assert [s for _, s in row] == pytest.approx(expected.tolist(), abs=2e-3)
    with pytest.raises(Unprocessable):
        c.upsert("image", np.array([1]), np.full((1, DIM), 1e5, np.float32))
    c.delete(np.arange(100))
    c.snapshot()
    store.upsert("c", "image", MODEL, np.array([7]), queries[:1])
    before = _contents(store, "c")
    crash(store)
    assert not (tmp_path / "c" / "work-image.f16").exists()  # a working file, not state
    reopened = open_store(tmp_path)
    _assert_same(before, _contents(reopened, "c"))
    assert reopened.get("c").search("image", queries[:1], 1)[0][0][0] == 7
    assert reopened.get("c")._sets["image"].index_factory == "IVF16,PQ2"


def test_snapshots_of_earlier_versions_are_still_read(
    tmp_path: Path, unit_vectors: MakeVectors
) -> None:
    directory = tmp_path / "c"
    directory.mkdir()
    (directory / "meta.json").write_text('{"name": "c", "model_id": "m", "dim": 16}')
    vectors = unit_vectors(3, DIM)
    np.savez(
        directory / "snapshot.npz",
        dim=np.asarray(DIM),
        generation=np.asarray(4),
        image_ids=np.array([1, 2, 3]),
        image_vectors=vectors,
        text_ids=np.empty(0, np.int64),
        text_vectors=np.empty((0, DIM), np.float32),
    )
    wal.wal_path(directory, 4).write_bytes(wal.encode(wal.Delete(("image",), np.array([2]))))
    store = open_store(tmp_path)
    c = store.get("c")
    assert c.counts() == {"image": 2, "text": 0}
    assert c.spec.factory == "auto"  # no settings stored: the store's default
    np.testing.assert_array_equal(c.get("image", 3), vectors[2])
    assert c.snapshot()
    assert not (directory / "snapshot.npz").exists()
    assert snapshots.generations(directory) == [5]
    store.close()


def test_index_settings_change_is_persisted_and_built(
    tmp_path: Path, unit_vectors: MakeVectors
) -> None:
    store = open_store(tmp_path)
    collection, created = store.ensure("c", MODEL, DIM, IndexSpec(factory="Flat"))
    assert created
    store.upsert("c", "image", MODEL, np.arange(1200), unit_vectors(1200, DIM))
    assert collection._sets["image"].index_factory == "Flat"
    assert collection.update_spec(IndexSpec(factory="IVF8,Flat", nprobe=8))
    assert not collection.update_spec(IndexSpec(factory="IVF8,Flat", nprobe=8))  # no change
    store.wait_idle()
    assert collection._sets["image"].index_factory == "IVF8,Flat"
    with pytest.raises(IndexSettingsConflict) as conflict:
        collection.update_spec(IndexSpec(factory="IVF8,Flat", storage="float16-mmap"))
    assert conflict.value.status == 409
    with pytest.raises(InvalidIndexSettings):
        collection.update_spec(IndexSpec(factory="IVF8,Nope"))
    _, created = store.ensure("c", MODEL, DIM, None)
    assert not created
    crash(store)
    reopened = open_store(tmp_path)
    assert reopened.get("c").spec == IndexSpec(factory="IVF8,Flat", nprobe=8)


def test_ids_are_listed_in_order(tmp_path: Path, unit_vectors: MakeVectors) -> None:
    store = open_store(tmp_path)
    store.upsert("c", "image", MODEL, np.array([9, 3, 7, 1]), unit_vectors(4, DIM))
    store.upsert("c", "text", MODEL, np.array([2]), unit_vectors(1, DIM))
    c = store.get("c")
    assert c.ids("image").tolist() == [1, 3, 7, 9]
    listed = c.ids("image")
    c.delete(np.array([3]), "image")
    assert listed.tolist() == [1, 3, 7, 9]  # a listing already handed out does not change
    assert c.ids("image").tolist() == [1, 7, 9]
    assert c.ids("text").tolist() == [2]
    store.close()


def test_a_data_directory_is_used_by_one_process_at_a_time(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    with pytest.raises(DataDirectoryLocked):
        open_store(tmp_path)
    store.close()
    open_store(tmp_path).close()  # released by close


def test_float16_storage_survives_shrinking_and_growing_again(
    tmp_path: Path, unit_vectors: MakeVectors
) -> None:
    store = open_store(tmp_path, storage="float16-mmap")
    vectors = unit_vectors(3000, DIM)
    store.upsert("c", "image", MODEL, np.arange(3000), vectors)
    c = store.get("c")
    view = c._sets["image"].vectors  # a view held across the shrink must stay readable
    c.delete(np.arange(100, 3000))  # far below a quarter of the capacity: the arrays shrink
    assert float(np.abs(view[:100].astype(np.float32)).sum()) > 0
    store.upsert("c", "image", MODEL, np.arange(5000, 7000), unit_vectors(2000, DIM))
    assert c.counts()["image"] == 2100
    hits = c.search("image", vectors[:5], 1)
    assert [h[0][0] for h in hits] == [0, 1, 2, 3, 4]
    store.close()
