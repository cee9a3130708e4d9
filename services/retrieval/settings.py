"""Settings of the retrieval service (environment prefix ``RETRIEVAL_``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings


class RetrievalSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="RETRIEVAL_")

    port: int = Field(8003, ge=1, le=65535)
    # One sub-directory per collection: metadata, the last snapshot and the write-ahead log.
    data_dir: Path = Path("var/retrieval")
    # Any Faiss factory string; the index is derived from the stored vectors and rebuilt on load,
    # so changing it needs no migration.
    index_factory: str = Field("Flat", min_length=1)
    # Faiss' OpenMP threads per search. Requests already run in parallel on the thread pool, so
    # more than one mostly oversubscribes the cores.
    faiss_threads: int = Field(1, ge=1, le=256)
    # Candidates fetched from the index per result, then re-scored exactly.
    rescore_factor: int = Field(4, ge=1, le=100)
    # Log records between snapshots; the log is rotated after each snapshot.
    snapshot_every: int = Field(10_000, ge=1)
    # Most vectors (or ids) in one request.
    max_batch: int = Field(4096, ge=1, le=1_000_000)
