"""Snapshots: every vector of a collection as of one log generation, with the indexes built on them.

A snapshot is a directory ``snapshot-<generation>/`` (``generation``: the first log generation it
does not cover) holding, per modality, ``<modality>.ids.npy``, ``<modality>.vectors`` (raw rows in
the collection's storage dtype), optionally ``<modality>.index`` (the Faiss index, so a restart
need not rebuild it) and ``<modality>.dead.npy`` (HNSW entries hidden from results), and a
``manifest.json`` written last. It is written under ``.tmp-snapshot-<generation>/``, every file
fsync'ed, then renamed into place: a crash leaves the old snapshot or the new one, never a mix.

``snapshot.npz`` (vectors only) is the format of earlier versions; it is still read.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from services.retrieval import wal
from services.retrieval.storage import MappedVectors, copy_bytes
from services.retrieval.vectors import SetState, VectorSet
from services.retrieval.wal import MODALITIES

FORMAT = 2
PREFIX = "snapshot-"
TMP_PREFIX = ".tmp-snapshot-"
LEGACY = "snapshot.npz"
MANIFEST = "manifest.json"


@dataclass
class Captured:
    """One vector set as captured under the collection's locks."""

    ids: np.ndarray
    dtype: str
    vectors: np.ndarray | None  # None: the rows were already copied into the snapshot dir
    index: np.ndarray | None  # serialized Faiss index
    state: SetState


def snapshot_dir(path: Path, generation: int) -> Path:
    return path / f"{PREFIX}{generation:010d}"


def generations(path: Path) -> list[int]:
    found = []
    for p in path.iterdir():
        if p.name.startswith(PREFIX) and (p / MANIFEST).exists():
            suffix = p.name[len(PREFIX) :]
            if suffix.isdigit():
                found.append(int(suffix))
    return sorted(found)


def capture(tmp: Path, modality: str, vector_set: VectorSet) -> Captured:
    """Copy what the snapshot needs; the caller holds the locks that stop writes and swaps.
    Memory-mapped rows are copied into ``tmp`` at once (by the kernel), dense ones in memory."""
    n = len(vector_set)
    state = vector_set.state()
    dtype = vector_set.storage.dtype.name
    vectors: np.ndarray | None
    if isinstance(vector_set.storage, MappedVectors):
        # Rows written through the map are in the page cache, which the copy reads.
        row_bytes = vector_set.dim * vector_set.storage.dtype.itemsize
        with (
            vector_set.storage.path.open("rb") as src,
            (tmp / f"{modality}.vectors").open("wb") as dst,
        ):
            copy_bytes(src.fileno(), dst.fileno(), n * row_bytes)
        vectors = None
    else:
        vectors = vector_set.vectors.copy()
    index = faiss.serialize_index(state.index) if state.index is not None else None
    return Captured(vector_set.ids.copy(), dtype, vectors, index, state)


def write(path: Path, tmp: Path, generation: int, dim: int, sets: Mapping[str, Captured]) -> float:
    """Finish a snapshot captured into ``tmp`` and put it in place. Returns its creation time."""
    created = time.time()
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "generation": generation,
        "dim": dim,
        "created_at": created,
        "sets": {},
    }
    for modality, captured in sets.items():
        _save_npy(tmp / f"{modality}.ids.npy", captured.ids)
        vectors_file = tmp / f"{modality}.vectors"
        if captured.vectors is not None:
            with vectors_file.open("wb") as f:
                np.ascontiguousarray(captured.vectors).tofile(f)
        _fsync_file(vectors_file)
        if captured.index is not None:
            with (tmp / f"{modality}.index").open("wb") as f:
                captured.index.tofile(f)
            _fsync_file(tmp / f"{modality}.index")
        _save_npy(tmp / f"{modality}.dead.npy", captured.state.dead)
        manifest["sets"][modality] = {
            "count": len(captured.ids),
            "dtype": captured.dtype,
            "factory": captured.state.factory,
            "built_n": captured.state.built_n,
            "train_failed_n": captured.state.train_failed_n,
            "index": captured.index is not None,
        }
    data = json.dumps(manifest, indent=1).encode()
    wal.atomic_write(tmp / MANIFEST, lambda f: f.write(data))
    final = snapshot_dir(path, generation)
    shutil.rmtree(final, ignore_errors=True)  # an unfinished one cannot exist, but be sure
    os.rename(tmp, final)
    wal.fsync_dir(path)
    return created


def remove_older(path: Path, generation: int) -> None:
    """Drop snapshots and logs that the snapshot of ``generation`` covers."""
    for old in generations(path):
        if old < generation:
            shutil.rmtree(snapshot_dir(path, old))
    (path / LEGACY).unlink(missing_ok=True)
    for old in wal.generations(path):
        if old < generation:
            wal.wal_path(path, old).unlink()
    wal.fsync_dir(path)


def clean_unfinished(path: Path) -> None:
    for p in path.iterdir():
        if p.name.startswith(TMP_PREFIX):
            shutil.rmtree(p)


@dataclass
class Loaded:
    generation: int
    created_at: float | None


def load(path: Path, dim: int, sets: Mapping[str, VectorSet]) -> Loaded | None:
    """Fill ``sets`` from the newest snapshot; None when there is none."""
    found = generations(path)
    if found:
        return _load_dir(snapshot_dir(path, found[-1]), dim, sets)
    legacy = path / LEGACY
    if legacy.exists():
        return _load_legacy(legacy, dim, sets)
    return None


def _load_dir(directory: Path, dim: int, sets: Mapping[str, VectorSet]) -> Loaded:
    manifest = json.loads((directory / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{directory}: unknown snapshot format {manifest.get('format')!r}")
    if int(manifest["dim"]) != dim:
        raise ValueError(f"{directory}: dimension {manifest['dim']}, expected {dim}")
    for modality in MODALITIES:
        info = manifest["sets"].get(modality)
        if info is None:
            continue
        ids = np.load(directory / f"{modality}.ids.npy", allow_pickle=False)
        if len(ids) != int(info["count"]):
            raise ValueError(f"{directory}: {modality} ids do not match the manifest")
        if len(np.unique(ids)) != len(ids):
            raise ValueError(f"{directory}: duplicate {modality} ids")
        vector_set = sets[modality]
        _load_rows(directory / f"{modality}.vectors", np.dtype(info["dtype"]), ids, vector_set)
        index = None
        if info.get("index"):
            index = faiss.read_index(str(directory / f"{modality}.index"))
        dead = np.load(directory / f"{modality}.dead.npy", allow_pickle=False)
        state = SetState(
            factory=info.get("factory"),
            built_n=int(info.get("built_n", 0)),
            train_failed_n=int(info.get("train_failed_n", 0)),
            index=index,
            dead=dead,
        )
        vector_set.restore(ids, state)
    return Loaded(int(manifest["generation"]), float(manifest["created_at"]))


def _load_rows(file: Path, dtype: np.dtype, ids: np.ndarray, vector_set: VectorSet) -> None:
    n, dim = len(ids), vector_set.dim
    expected = n * dim * dtype.itemsize
    if file.stat().st_size != expected:
        raise ValueError(f"{file}: {file.stat().st_size} bytes, expected {expected}")
    storage = vector_set.storage
    if isinstance(storage, MappedVectors) and dtype == storage.dtype:
        storage.load_from(file, n)
        return
    storage.resize(max(n, 1), 0)
    source = np.memmap(file, dtype=dtype, mode="r", shape=(n, dim)) if n else None
    step = 1 << 16
    for start in range(0, n, step):
        assert source is not None
        storage.array[start : start + step] = source[start : start + step]
    del source


def _load_legacy(file: Path, dim: int, sets: Mapping[str, VectorSet]) -> Loaded:
    with np.load(file, allow_pickle=False) as data:
        if int(data["dim"]) != dim:
            raise ValueError(f"{file}: dimension {int(data['dim'])}, expected {dim}")
        generation = int(data["generation"])
        for modality in MODALITIES:
            ids = data[f"{modality}_ids"]
            if len(np.unique(ids)) != len(ids):
                raise ValueError(f"{file}: duplicate {modality} ids")
            vectors = data[f"{modality}_vectors"]
            storage = sets[modality].storage
            storage.resize(max(len(ids), 1), 0)
            storage.array[: len(ids)] = vectors
            sets[modality].restore(ids, SetState())
    return Loaded(generation, file.stat().st_mtime)


def _save_npy(file: Path, array: np.ndarray) -> None:
    with file.open("wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(file: Path) -> None:
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
