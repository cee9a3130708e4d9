"""Prometheus metrics of the retrieval service (the request metrics come from shared.metrics)."""

from __future__ import annotations

from prometheus_client import Gauge, Histogram

VECTORS = Gauge(
    "retrieval_vectors",
    "Vectors stored, by collection and modality.",
    ["collection", "modality"],
)
WAL_BYTES = Gauge(
    "retrieval_wal_bytes",
    "Bytes of write-ahead log not yet folded into a snapshot, by collection.",
    ["collection"],
)
SEARCH_SECONDS = Histogram(
    "retrieval_search_seconds",
    "Time to answer one search request (all its query vectors), excluding queueing.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
SNAPSHOT_SECONDS = Histogram(
    "retrieval_snapshot_seconds",
    "Time to write one collection snapshot.",
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300),
)
