"""Settings of the retrieval service (environment prefix ``RETRIEVAL_``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import ByteSize, Field
from pydantic_settings import SettingsConfigDict

from shared.service_auth import InternalServiceSettings


def _half_of_memory() -> int:
    """Half of the memory this process may use: the machine's, or a container's limit."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # pragma: no cover - not Linux
        total = 16 << 30
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total // 2


class RetrievalSettings(InternalServiceSettings):
    model_config = SettingsConfigDict(env_prefix="RETRIEVAL_")

    port: int = Field(8003, ge=1, le=65535)
    # One sub-directory per collection: metadata, the last snapshot and the write-ahead log.
    data_dir: Path = Path("var/retrieval")
    # Defaults for new collections (a collection created with PUT /collections/{name} may set
    # its own). A Faiss factory string, or "auto": Flat while small, HNSW while it fits the
    # memory budget, then IVF-PQ. Indexes are derived from the stored vectors, so changing this
    # needs no migration.
    index_factory: str = Field("auto", min_length=1, max_length=200)
    # Default search depths: IVF lists probed (None: derived from the list count) and HNSW
    # candidate-list size (None: 128). Both can be set per query.
    nprobe: int | None = Field(None, ge=1, le=65_536)
    ef_search: int | None = Field(None, ge=1, le=32_768)
    # Candidates fetched from the index per result, then re-scored exactly (refinement depth);
    # None: by index, 16 for PQ codes, 4 otherwise.
    rescore_factor: int | None = Field(None, ge=1, le=100)
    # Where new collections keep their full vectors: float32 in memory, or float16 in a
    # memory-mapped file (half the bytes, paged by the OS; for very large collections).
    storage: Literal["float32", "float16-mmap"] = "float32"
    # What `auto` may spend on one collection's resident vectors and index (bytes; "8GiB" works).
    # Default: half of the machine's memory.
    memory_budget: ByteSize = Field(default_factory=lambda: ByteSize(_half_of_memory()))
    # Faiss' OpenMP threads per search. Requests already run in parallel on the thread pool, so
    # more than one mostly oversubscribes the cores.
    faiss_threads: int = Field(1, ge=1, le=256)
    # OpenMP threads of the background index builder (one build at a time).
    build_threads: int = Field(1, ge=1, le=256)
    # Index (re)builds of sets up to this many vectors run inline (milliseconds); larger ones
    # in the background while searches go on.
    inline_rebuild_max: int = Field(2000, ge=0)
    # Log records between snapshots; the log is rotated after each snapshot.
    snapshot_every: int = Field(10_000, ge=1)
    # Most vectors (or ids) in one request.
    max_batch: int = Field(4096, ge=1, le=1_000_000)
