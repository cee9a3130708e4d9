"""Peer vector engines for ``benchmarks/retrieval.py``, behind one small interface.

Each is built on the same vectors with comparable settings: HNSW engines with M = 32 neighbours
and an efConstruction of 100 (as our HNSW), IVF engines with our list count; each sweeps its own
search-depth knob. A peer whose package is missing is skipped with a line saying so.

Pins this was written against: hnswlib 0.8.0, usearch 2.26.6, milvus-lite 3.2.2,
chromadb 1.5.9, lancedb 0.40.0 (with pyarrow 26).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

HNSW_M = 32
EF_CONSTRUCTION = 100
EF_SWEEP = [10, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 256, 384, 512, 768]
# IVF engines: (lists probed, candidates re-scored per result), shallow to deep.
IVF_SWEEP = [(8, 4), (16, 4), (16, 8), (32, 8), (32, 16), (64, 16), (64, 32), (128, 32), (256, 64)]
_CHUNK = 50_000


class Engine(Protocol):
    name: str
    index: str  # what it builds, for the table

    def build(self, ids: np.ndarray, vectors: np.ndarray) -> None: ...
    def settings(self) -> list[dict[str, Any]]: ...
    def configure(self, setting: dict[str, Any]) -> None: ...
    def search(self, query: np.ndarray, k: int) -> Sequence[int]: ...
    def close(self) -> None: ...


class Missing(Exception):
    """The peer's package is not installed."""


def _chunks(n: int, size: int = _CHUNK) -> range:
    return range(0, n, size)


class Hnswlib:
    name = "hnswlib"
    index = f"HNSW M={HNSW_M} efC={EF_CONSTRUCTION}"

    def __init__(self, threads: int) -> None:
        try:
            import hnswlib
        except ImportError as exc:
            raise Missing("pip install hnswlib") from exc
        self._hnswlib = hnswlib
        self.threads = threads

    def build(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.p = self._hnswlib.Index(space="ip", dim=vectors.shape[1])
        self.p.init_index(max_elements=len(ids), ef_construction=EF_CONSTRUCTION, M=HNSW_M)
        for start in _chunks(len(ids)):
            stop = start + _CHUNK
            self.p.add_items(
                np.asarray(vectors[start:stop]), ids[start:stop], num_threads=self.threads
            )

    def settings(self) -> list[dict[str, Any]]:
        return [{"ef": ef} for ef in EF_SWEEP]

    def configure(self, setting: dict[str, Any]) -> None:
        self.p.set_ef(setting["ef"])

    def search(self, query: np.ndarray, k: int) -> Sequence[int]:
        labels, _ = self.p.knn_query(query, k=k, num_threads=1)
        return labels[0].tolist()

    def close(self) -> None:
        self.p = None


class Usearch:
    name = "usearch"
    index = f"HNSW M={HNSW_M} efC={EF_CONSTRUCTION} f32"

    def __init__(self, threads: int) -> None:
        try:
            from usearch.index import Index
        except ImportError as exc:
            raise Missing("pip install usearch") from exc
        self._index_class = Index
        self.threads = threads

    def build(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.idx = self._index_class(
            ndim=vectors.shape[1],
            metric="ip",
            dtype="f32",
            connectivity=HNSW_M,
            expansion_add=EF_CONSTRUCTION,
            expansion_search=64,
        )
        for start in _chunks(len(ids)):
            stop = start + _CHUNK
            self.idx.add(ids[start:stop], np.asarray(vectors[start:stop]), threads=self.threads)

    def settings(self) -> list[dict[str, Any]]:
        return [{"expansion_search": ef} for ef in EF_SWEEP]

    def configure(self, setting: dict[str, Any]) -> None:
        self.idx.expansion_search = setting["expansion_search"]

    def search(self, query: np.ndarray, k: int) -> Sequence[int]:
        return self.idx.search(query, k, threads=1).keys.tolist()

    def close(self) -> None:
        self.idx = None


class Chroma:
    name = "chromadb"
    index = f"HNSW M={HNSW_M} efC={EF_CONSTRUCTION}"

    def __init__(self, threads: int) -> None:
        os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")  # no network calls
        try:
            import chromadb
        except ImportError as exc:
            raise Missing("pip install chromadb") from exc
        self._chromadb = chromadb
        self.threads = threads
        self.directory = tempfile.mkdtemp(prefix="bench-chroma-")

    def build(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        settings = self._chromadb.config.Settings(anonymized_telemetry=False)
        self.client = self._chromadb.PersistentClient(path=self.directory, settings=settings)
        hnsw = {
            "space": "ip",
            "max_neighbors": HNSW_M,
            "ef_construction": EF_CONSTRUCTION,
            "ef_search": 64,
        }
        self.collection = self.client.create_collection(
            "bench", configuration={"hnsw": hnsw}, embedding_function=None
        )
        batch = self.client.get_max_batch_size()
        for start in range(0, len(ids), batch):
            stop = start + batch
            self.collection.add(
                ids=[str(i) for i in ids[start:stop]], embeddings=np.asarray(vectors[start:stop])
            )

    def settings(self) -> list[dict[str, Any]]:
        return [{"ef_search": ef} for ef in EF_SWEEP]

    def configure(self, setting: dict[str, Any]) -> None:
        self.collection.modify(configuration={"hnsw": {"ef_search": setting["ef_search"]}})
        # Chroma 1.5 keeps searching the loaded index with its old ef_search; the new value only
        # applies to an index opened afresh, so drop the cached system and open it again.
        # Stop the old system first: dropped from the cache while running, it keeps its copy of
        # the index in memory (at 1M x 512 eight sweep steps ran a 24 GB machine out of memory).
        from chromadb.api.client import SharedSystemClient

        old = self.client._system
        SharedSystemClient.clear_system_cache()
        old.stop()
        settings = self._chromadb.config.Settings(anonymized_telemetry=False)
        self.client = self._chromadb.PersistentClient(path=self.directory, settings=settings)
        self.collection = self.client.get_collection("bench", embedding_function=None)

    def search(self, query: np.ndarray, k: int) -> Sequence[int]:
        found = self.collection.query(query_embeddings=query[None], n_results=k, include=[])
        return [int(i) for i in found["ids"][0]]

    def close(self) -> None:
        self.collection = None
        self.client = None
        shutil.rmtree(self.directory, ignore_errors=True)


class MilvusLite:
    name = "milvus-lite"
    index = f"HNSW M={HNSW_M} efC={EF_CONSTRUCTION}"

    def __init__(self, threads: int) -> None:
        try:
            import milvus_lite
        except ImportError as exc:
            raise Missing("pip install milvus-lite") from exc
        self._milvus = milvus_lite
        self.threads = threads
        self.directory = tempfile.mkdtemp(prefix="bench-milvus-")

    def build(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        m = self._milvus
        self.db = m.MilvusLite(self.directory)
        schema = m.CollectionSchema(
            fields=[
                m.FieldSchema(name="id", dtype=m.DataType.INT64, is_primary=True),
                m.FieldSchema(name="vec", dtype=m.DataType.FLOAT_VECTOR, dim=vectors.shape[1]),
            ]
        )
        self.collection = self.db.create_collection("bench", schema)
        for start in range(0, len(ids), 10_000):
            rows = np.asarray(vectors[start : start + 10_000])
            part = ids[start : start + 10_000].tolist()
            self.collection.insert(
                [{"id": i, "vec": v} for i, v in zip(part, rows.tolist(), strict=True)]
            )
        self.collection.flush()  # into segments: load() indexes segments, not the memtable
        params = {"M": HNSW_M, "efConstruction": EF_CONSTRUCTION}
        self.collection.create_index(
            "vec", {"index_type": "HNSW", "metric_type": "IP", "params": params}
        )
        self.collection.load()
        self.ef = 64

    def settings(self) -> list[dict[str, Any]]:
        return [{"ef": ef} for ef in EF_SWEEP]

    def configure(self, setting: dict[str, Any]) -> None:
        self.ef = setting["ef"]

    def search(self, query: np.ndarray, k: int) -> Sequence[int]:
        found = self.collection.search(
            [query.tolist()],
            top_k=k,
            metric_type="IP",
            output_fields=["id"],
            search_params={"ef": self.ef},
        )
        return [int(hit["id"]) for hit in found[0]]

    def close(self) -> None:
        self.db.close()
        shutil.rmtree(self.directory, ignore_errors=True)


class Lance:
    name = "lancedb"

    def __init__(self, threads: int, *, nlist: int) -> None:
        try:
            import lancedb
            import pyarrow
        except ImportError as exc:
            raise Missing("pip install lancedb") from exc
        self._lancedb, self._pa = lancedb, pyarrow
        self.nlist = nlist
        self.threads = threads
        self.directory = tempfile.mkdtemp(prefix="bench-lance-")

    @property
    def index(self) -> str:
        return f"IVF_PQ {self.nlist} lists, dim/8 sub-vectors, refine"

    def build(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        pa = self._pa
        dim = vectors.shape[1]
        self.db = self._lancedb.connect(self.directory)
        schema = pa.schema(
            [pa.field("id", pa.int64()), pa.field("vector", pa.list_(pa.float32(), dim))]
        )
        self.table = self.db.create_table("bench", schema=schema)
        for start in _chunks(len(ids)):
            rows = np.ascontiguousarray(vectors[start : start + _CHUNK], dtype=np.float32)
            column = pa.FixedSizeListArray.from_arrays(pa.array(rows.ravel()), dim)
            self.table.add(
                pa.table({"id": pa.array(ids[start : start + _CHUNK]), "vector": column})
            )
        self.table.create_index(
            metric="dot",
            index_type="IVF_PQ",
            num_partitions=self.nlist,
            num_sub_vectors=max(1, dim // 8),
        )
        self.setting = {"nprobes": 16, "refine_factor": 4}

    def settings(self) -> list[dict[str, Any]]:
        return [{"nprobes": p, "refine_factor": r} for p, r in IVF_SWEEP]

    def configure(self, setting: dict[str, Any]) -> None:
        self.setting = setting

    def search(self, query: np.ndarray, k: int) -> Sequence[int]:
        found = (
            self.table.search(query)
            .distance_type("dot")
            .limit(k)
            .nprobes(self.setting["nprobes"])
            .refine_factor(self.setting["refine_factor"])
            .select(["id"])
            .to_arrow()
        )
        return found["id"].to_pylist()

    def close(self) -> None:
        self.table = None
        self.db = None
        shutil.rmtree(self.directory, ignore_errors=True)


PEERS = {
    "hnswlib": Hnswlib,
    "usearch": Usearch,
    "milvus-lite": MilvusLite,
    "chromadb": Chroma,
    "lancedb": Lance,
}
