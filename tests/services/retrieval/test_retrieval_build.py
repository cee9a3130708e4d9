"""The bulk build command: what it writes is what the service loads, and it resumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.retrieval import build as build_module
from services.retrieval.build import BuildError, Progress, Source, build, main, synthetic_source
from services.retrieval.indexing import IndexSpec, SearchDepth
from services.retrieval.store import DataDirectoryLocked, Store
from services.retrieval.synthetic import ClipLike

DIM = 16


def recall_at_10(store: Store, name: str, n: int, depth: SearchDepth) -> float:
    generator = ClipLike(DIM, seed=0)
    base = generator.rows(0, n, stream=1)
    queries = generator.rows(0, 20, stream=2)
    truth = np.argsort(-(queries @ base.T), axis=1)[:, :10]
    results = store.get(name).search("image", queries, 10, depth=depth)
    return float(
        np.mean(
            [
                len({i for i, _ in r} & set(t.tolist())) / 10
                for r, t in zip(results, truth, strict=False)
            ]
        )
    )


def test_a_built_collection_is_what_the_service_loads(tmp_path: Path) -> None:
    spec = IndexSpec(factory="IVF16,PQ2", storage="float16-mmap", nprobe=16, rescore_factor=20)
    lines: list[tuple[str, int, int]] = []
    path = build(
        tmp_path,
        "big",
        model_id="m",
        modality="image",
        source=synthetic_source(4000, DIM, 0),
        spec=spec,
        memory_budget=1 << 30,
        progress=lambda stage, done, total: lines.append((stage, done, total)),
    )
    assert path == tmp_path / "big"
    assert {stage for stage, _, _ in lines} == {"ingest", "train", "add", "write"}
    assert ("add", 4000, 4000) in lines
    assert not list(tmp_path.glob(".build-*"))
    store = Store(tmp_path)
    store.load()
    c = store.get("big")
    assert c.spec == spec and c.model_id == "m" and c.dim == DIM
    status = c.info()["status"]["image"]
    assert status["count"] == 4000 and status["index"] == "IVF16,PQ2"
    assert c._sets["image"].last_build_seconds is None  # the built index was loaded as is
    # The collection's own depth settings (all 16 lists, 20 candidates a result) apply.
    default = recall_at_10(store, "big", 4000, SearchDepth())
    assert default >= 0.9
    assert recall_at_10(store, "big", 4000, SearchDepth(nprobe=1, rescore_factor=1)) < default
    c.upsert("image", np.array([10**6]), np.ones((1, DIM), np.float32))  # writable as usual
    store.close()
    with pytest.raises(BuildError, match="already exists"):
        build(
            tmp_path,
            "big",
            model_id="m",
            modality="image",
            source=synthetic_source(10, DIM, 0),
            spec=spec,
            memory_budget=1 << 30,
        )


def test_an_interrupted_build_resumes_where_it_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(build_module, "_INGEST_CHUNK", 500)
    monkeypatch.setattr(build_module, "_INGEST_CHECKPOINT", 1000)
    inner = synthetic_source(3000, DIM, 0)
    reads: list[int] = []

    def read(start: int, stop: int) -> np.ndarray:
        reads.append(start)
        return inner.read(start, stop)

    source = Source(inner.n, inner.dim, read, inner.ids, inner.description)
    spec = IndexSpec(factory="IVF8,Flat", nprobe=8)

    def run(stop_after: tuple[str, int] | None) -> Path:
        return build(
            tmp_path,
            "c",
            model_id="m",
            modality="image",
            source=source,
            spec=spec,
            memory_budget=1 << 30,
            checkpoint_every=1000,
            stop_after=(lambda stage, done: (stage, done) == stop_after) if stop_after else None,
        )

    # Stopped at 1,500 rows: the rows past the last checkpoint (1,000) are read again.
    run(("ingest", 1500))
    assert not (tmp_path / "c").exists()
    reads.clear()
    run(("add", 1000))  # ingest finished, trained, 1,000 added and checkpointed
    assert reads[0] == 1000
    assert not (tmp_path / "c").exists()
    reads.clear()
    store_lock = Store(tmp_path)
    store_lock.load()  # the service loads, ignoring the unfinished build ...
    assert store_lock.collections() == []
    with pytest.raises(DataDirectoryLocked):  # ... and a build cannot run beside it
        run(None)
    store_lock.close()
    run(None)
    assert reads == []  # nothing was read again: rows and partial index came from checkpoints
    store = Store(tmp_path)
    store.load()
    assert store.get("c").counts()["image"] == 3000
    assert recall_at_10(store, "c", 3000, SearchDepth(nprobe=8)) == 1.0
    store.close()


def test_a_build_with_other_settings_does_not_resume_a_different_one(tmp_path: Path) -> None:
    common = {"model_id": "m", "modality": "image", "memory_budget": 1 << 30}
    build(
        tmp_path,
        "c",
        source=synthetic_source(2000, DIM, 0),
        spec=IndexSpec(factory="Flat"),
        stop_after=lambda stage, done: stage == "ingest",
        **common,  # type: ignore[arg-type]
    )
    with pytest.raises(BuildError, match="other settings"):
        build(
            tmp_path,
            "c",
            source=synthetic_source(2000, DIM, 1),
            spec=IndexSpec(factory="Flat"),
            **common,  # type: ignore[arg-type]
        )


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vectors = ClipLike(DIM, seed=1).rows(0, 1500)
    np.save(tmp_path / "v.npy", vectors)
    np.save(tmp_path / "ids.npy", np.arange(100, 1600, dtype=np.int64))
    data = tmp_path / "data"
    argv = ["--data-dir", str(data), "--collection", "photos", "--model-id", "m"]
    files = ["--vectors", str(tmp_path / "v.npy"), "--ids", str(tmp_path / "ids.npy")]
    assert main([*argv, *files, "--index", "auto", "--threads", "1"]) == 0
    out = capsys.readouterr()
    assert "built" in out.out and "1,500 vectors" in out.out
    assert "add" in out.err and "100.0%" in out.err  # the progress display
    store = Store(data)
    store.load()
    c = store.get("photos")
    assert c.info()["status"]["image"]["index"] == "Flat"  # auto, for 1,500 vectors
    assert c.search("image", vectors[:1], 1)[0][0][0] == 100
    store.close()
    assert main([*argv, *files]) == 1  # exists already
    assert "already exists" in capsys.readouterr().err


def test_progress_line(capsys: pytest.CaptureFixture[str]) -> None:
    progress = Progress(interval=0)
    progress("add", 0, 200)
    progress("add", 200, 200)
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("add") and "200/200" in err[-1] and "100.0%" in err[-1]
