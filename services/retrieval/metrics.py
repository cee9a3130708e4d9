"""Prometheus metrics of the retrieval service (the request metrics come from shared.metrics).

Gauges that describe the current state of every collection (snapshot age, index entries, builds
in progress) are computed at scrape time by a collector over the stores registered with
``track``, so they are never stale between writes.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client import REGISTRY, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

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
INDEX_BUILD_SECONDS = Histogram(
    "retrieval_index_build_seconds",
    "Time to build (train and fill) one Faiss index, inline or in the background.",
    buckets=(0.01, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 1800, 3600),
)
WAL_COMMIT_RECORDS = Histogram(
    "retrieval_wal_commit_records",
    "Write requests made durable by one fdatasync of the log (group commit).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)


class _Observable(Protocol):
    def collections(self) -> list[Any]: ...


_stores: weakref.WeakSet[Any] = weakref.WeakSet()


def track(store: _Observable) -> None:
    """Report ``store``'s collections at every scrape (until it is garbage or ``untrack``ed)."""
    _stores.add(store)


def untrack(store: _Observable) -> None:
    _stores.discard(store)


class _StateCollector(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily]:
        age = GaugeMetricFamily(
            "retrieval_snapshot_age_seconds",
            "Seconds since the collection's last snapshot was written.",
            labels=["collection"],
        )
        last = GaugeMetricFamily(
            "retrieval_last_snapshot_timestamp_seconds",
            "Unix time of the collection's last snapshot.",
            labels=["collection"],
        )
        entries = GaugeMetricFamily(
            "retrieval_index_entries",
            "Entries in the Faiss index (stale HNSW entries included), by collection and modality.",
            labels=["collection", "modality"],
        )
        rebuilding = GaugeMetricFamily(
            "retrieval_index_rebuilding",
            "1 while an index is being built in the background, by collection and modality.",
            labels=["collection", "modality"],
        )
        now = time.time()
        for store in list(_stores):
            for collection in store.collections():
                if collection.last_snapshot_at is not None:
                    age.add_metric([collection.name], max(0.0, now - collection.last_snapshot_at))
                    last.add_metric([collection.name], collection.last_snapshot_at)
                for modality, status in collection.info()["status"].items():
                    entries.add_metric([collection.name, modality], status["index_entries"])
                    rebuilding.add_metric([collection.name, modality], int(status["rebuilding"]))
        yield from (age, last, entries, rebuilding)


REGISTRY.register(_StateCollector())
