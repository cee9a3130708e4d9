"""``crossmodal reconcile``: find and repair drift between the metadata and retrieval services.

An operator's tool: it talks to the internal services directly (metadata, retrieval, and the
feature service to re-embed), not to the gateway. What can drift, and the repair:

- ``missing``: an item is ``indexed`` but its image vector or a caption vector is absent from
  retrieval (e.g. a retrieval volume restored from an older snapshot). Re-embedded from the stored
  image and captions and upserted; without a feature service, marked ``failed`` instead, so it is
  never served half-made and the next ``crossmodal index`` retries it.
- ``stuck``: an item ``pending`` for longer than ``stale_after`` (the gateway died mid-upload):
  indexed the same way, or marked ``failed``.
- ``stale``: a ``failed`` (or stuck) item still has vectors (a rollback that could not reach
  retrieval): the vectors are deleted.
- ``failed``: with ``retry_failed``, failed items are indexed again from their stored image.
- ``orphans``: vectors whose ids no metadata item has (an item deleted while retrieval was down).
  Listed by retrieval (``GET /collections/{c}/ids``, docs/retrieval.md) and deleted.

Retrieval is read *before* metadata: vectors are only written after their item exists, so an item
added between the two readings can only look missing (re-indexing is idempotent), never orphaned.
Without the id listing (an older retrieval service), presence is checked by probing retrieval's
search with the ids as ``allow_ids`` (``top_k`` = number of ids), which returns exactly the
present ones, and orphans are only counted.

Also here: the pure comparison ``reconcile()``/``diff()`` over two callables that list ids (what
to build another repair policy on, tested without the services), the drift metrics
(``crossmodal_reconcile_*``), and ``python -m crossmodal.reconcile`` (one JSON summary per
collection; ``--interval`` and ``--metrics-port`` make it a long-running reconciler).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import httpx
import numpy as np
from prometheus_client import Counter, Gauge, start_http_server

log = logging.getLogger(__name__)

PROBE_CHUNK = 1000  # retrieval's largest top_k

Modality = Literal["image", "text"]
MODALITIES: tuple[Modality, ...] = ("image", "text")

DRIFT = Gauge(
    "crossmodal_reconcile_drift",
    "Ids present in one of retrieval and metadata but not the other at the last reconcile, by "
    "collection, modality and side (retrieval_only, metadata_only).",
    ["collection", "modality", "side"],
)
REPAIRED = Counter(
    "crossmodal_reconcile_repaired_total",
    "Ids repaired by reconcile, by collection, modality and action (deleted, requeued).",
    ["collection", "modality", "action"],
)
LAST_RUN = Gauge(
    "crossmodal_reconcile_last_run_timestamp_seconds",
    "Unix time of the last completed reconcile, by collection.",
    ["collection"],
)


@dataclass(frozen=True)
class MetadataIds:
    """What metadata says about one modality: ids that must have a vector, and ids that may or
    may not have one right now (writes in flight)."""

    expected: frozenset[int]
    tolerated: frozenset[int] = frozenset()


# (collection, modality) -> ids. A metadata lister may return a plain set: all expected.
RetrievalLister = Callable[[str, Modality], Iterable[int]]
MetadataLister = Callable[[str, Modality], "MetadataIds | Iterable[int]"]
# (collection, modality, ids) -> how many were repaired.
Repair = Callable[[str, Modality, list[int]], int]


@dataclass
class Drift:
    collection: str
    modality: Modality
    retrieval_only: list[int] = field(default_factory=list)
    metadata_only: list[int] = field(default_factory=list)
    deleted: int = 0
    requeued: int = 0

    @property
    def count(self) -> int:
        return len(self.retrieval_only) + len(self.metadata_only)

    @property
    def remaining(self) -> int:
        return self.count - self.deleted - self.requeued


def diff(
    retrieval: Iterable[int], metadata: MetadataIds | Iterable[int]
) -> tuple[list[int], list[int]]:
    """(retrieval_only, metadata_only), each sorted."""
    if not isinstance(metadata, MetadataIds):
        metadata = MetadataIds(frozenset(metadata))
    have = set(retrieval)
    retrieval_only = have - metadata.expected - metadata.tolerated
    metadata_only = metadata.expected - have
    return sorted(retrieval_only), sorted(metadata_only)


def reconcile(
    collection: str,
    *,
    retrieval_ids: RetrievalLister,
    metadata_ids: MetadataLister,
    delete_vectors: Repair | None = None,
    requeue: Repair | None = None,
    repair: bool = False,
    modalities: Sequence[Modality] = MODALITIES,
) -> list[Drift]:
    """Find (and with ``repair``, fix) the drift of one collection; sets the drift metrics.

    ``retrieval_ids`` is called before ``metadata_ids`` for each modality (see the module doc:
    that order is what makes deleting ``retrieval_only`` vectors safe). Repairs need
    ``delete_vectors`` and ``requeue``; without one, that side is only reported."""
    report = []
    for modality in modalities:
        have = set(retrieval_ids(collection, modality))
        retrieval_only, metadata_only = diff(have, metadata_ids(collection, modality))
        drift = Drift(collection, modality, retrieval_only, metadata_only)
        if repair and retrieval_only and delete_vectors is not None:
            drift.deleted = delete_vectors(collection, modality, retrieval_only)
            REPAIRED.labels(collection, modality, "deleted").inc(drift.deleted)
        if repair and metadata_only and requeue is not None:
            drift.requeued = requeue(collection, modality, metadata_only)
            REPAIRED.labels(collection, modality, "requeued").inc(drift.requeued)
        # The gauge tells what is still wrong after this run.
        DRIFT.labels(collection, modality, "retrieval_only").set(
            len(retrieval_only) - drift.deleted
        )
        DRIFT.labels(collection, modality, "metadata_only").set(len(metadata_only) - drift.requeued)
        if drift.count:
            log.warning(
                "collection %s/%s: %d vectors without metadata, %d items without vectors "
                "(deleted %d, requeued %d)",
                collection,
                modality,
                len(retrieval_only),
                len(metadata_only),
                drift.deleted,
                drift.requeued,
            )
        report.append(drift)
    LAST_RUN.labels(collection).set(time.time())
    return report


class ReconcileError(Exception):
    pass


@dataclass(frozen=True)
class ItemInfo:
    id: int
    status: str
    caption_ids: tuple[int, ...]
    updated_at: datetime


@dataclass
class DriftReport:
    collection: str
    counts: dict[str, int]
    retrieval_counts: dict[str, int]
    method: str  # "listing" or "probe"
    missing: list[int] = field(default_factory=list)
    stuck: list[int] = field(default_factory=list)
    stale: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    orphans: dict[str, int] = field(default_factory=lambda: {"image": 0, "text": 0})
    orphan_ids: dict[str, list[int]] | None = None
    items: dict[int, ItemInfo] = field(default_factory=dict, repr=False)

    @property
    def clean(self) -> bool:
        return not (self.missing or self.stuck or self.stale) and not any(self.orphans.values())

    def summary(self) -> dict[str, Any]:
        return {
            "collection": self.collection,
            "metadata": self.counts,
            "retrieval": self.retrieval_counts,
            "method": self.method,
            "missing": self.missing,
            "stuck": self.stuck,
            "stale": self.stale,
            "failed": self.failed,
            "orphans": self.orphans,
            "clean": self.clean,
        }


@dataclass
class RepairReport:
    reindexed: list[int] = field(default_factory=list)
    marked_failed: list[int] = field(default_factory=list)
    vectors_deleted: int = 0
    errors: list[str] = field(default_factory=list)


def _raise_for(response: httpx.Response, what: str) -> None:
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        raise ReconcileError(f"{what}: HTTP {response.status_code}: {detail}")


def _chunks(values: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


class Reconciler:
    def __init__(
        self,
        metadata: httpx.Client,
        retrieval: httpx.Client,
        feature: httpx.Client | None = None,
    ) -> None:
        self.metadata = metadata
        self.retrieval = retrieval
        self.feature = feature

    # --- reading both sides ---------------------------------------------------------------

    def metadata_items(self, collection: str) -> list[ItemInfo]:
        items: list[ItemInfo] = []
        after: int | None = None
        while True:
            params: dict[str, Any] = {"limit": 5000}
            if after is not None:
                params["after"] = after
            response = self.metadata.get(f"/collections/{collection}/items", params=params)
            _raise_for(response, f"metadata items of {collection!r}")
            page = response.json()
            for entry in page["items"]:
                updated = datetime.fromisoformat(entry["updated_at"].replace("Z", "+00:00"))
                items.append(
                    ItemInfo(entry["id"], entry["status"], tuple(entry["caption_ids"]), updated)
                )
            after = page.get("next_after")
            if after is None:
                return items

    def retrieval_collection(self, collection: str) -> dict[str, Any] | None:
        response = self.retrieval.get(f"/collections/{collection}")
        if response.status_code == 404:
            return None
        _raise_for(response, f"retrieval collection {collection!r}")
        return response.json()  # type: ignore[no-any-return]

    def listed_ids(self, collection: str, modality: str) -> set[int] | None:
        """Every id retrieval holds in ``modality``, or None if it cannot list them."""
        response = self.retrieval.get(
            f"/collections/{collection}/ids",
            params={"modality": modality},
            headers={"Accept": "application/octet-stream"},
        )
        if response.status_code in (404, 405):
            body = response.json() if response.content else {}
            if response.status_code == 405 or body.get("code") == "not_found":
                return None  # no such route: an older retrieval service
        _raise_for(response, f"retrieval ids of {collection!r}")
        if response.headers.get("content-type", "").startswith("application/octet-stream"):
            return set(np.frombuffer(response.content, dtype="<i8").tolist())
        ids: set[int] = set()  # a service that only pages JSON
        page = response.json()
        while True:
            ids.update(page["ids"])
            after = page.get("next_after")
            if after is None:
                return ids
            response = self.retrieval.get(
                f"/collections/{collection}/ids",
                params={"modality": modality, "after": after, "limit": 10_000},
            )
            _raise_for(response, f"retrieval ids of {collection!r}")
            page = response.json()

    # The listers of ``reconcile()``.

    def retrieval_ids(self, collection: str, modality: Modality) -> set[int]:
        if self.retrieval_collection(collection) is None:
            return set()
        listed = self.listed_ids(collection, modality)
        if listed is None:
            raise ReconcileError("the retrieval service cannot list ids")
        return listed

    def metadata_ids(
        self, collection: str, modality: Modality, *, stale_after: timedelta = timedelta(minutes=10)
    ) -> MetadataIds:
        """Ids that must have vectors (indexed items, stuck pending ones, and their captions),
        and ids that may (pending items younger than ``stale_after``)."""
        cutoff = datetime.now(UTC) - stale_after
        return _expected(self.metadata_items(collection), modality, cutoff)

    def collections(self) -> list[str]:
        """Every collection either service knows."""
        names: set[str] = set()
        for client, what in ((self.retrieval, "retrieval"), (self.metadata, "metadata")):
            response = client.get("/collections")
            _raise_for(response, f"{what} collections")
            names.update(c["name"] for c in response.json()["collections"])
        return sorted(names)

    def probe(self, collection: str, modality: str, ids: list[int], dim: int) -> set[int]:
        """Which of ``ids`` retrieval holds: a search restricted to them returns exactly those."""
        present: set[int] = set()
        unit = [1.0] + [0.0] * (dim - 1)
        for chunk in _chunks(sorted(set(ids)), PROBE_CHUNK):
            response = self.retrieval.post(
                f"/collections/{collection}/search",
                json={
                    "modality": modality,
                    "vectors": [unit],
                    "top_k": len(chunk),
                    "allow_ids": chunk,
                },
            )
            _raise_for(response, f"probing {modality} vectors of {collection!r}")
            present.update(hit["id"] for hit in response.json()["results"][0])
        return present

    # --- check ----------------------------------------------------------------------------

    def check(
        self, collection: str, *, stale_after: timedelta = timedelta(minutes=10)
    ) -> DriftReport:
        # Retrieval first (see the module doc), then metadata.
        info = self.retrieval_collection(collection)
        listed_images = listed_texts = None
        if info is not None:
            listed_images = self.listed_ids(collection, "image")
            listed_texts = (
                self.listed_ids(collection, "text") if listed_images is not None else None
            )
        items = self.metadata_items(collection)
        counts = {
            s: sum(1 for i in items if i.status == s) for s in ("pending", "indexed", "failed")
        }
        retrieval_counts = dict(info["counts"]) if info else {"image": 0, "text": 0}
        report = DriftReport(collection, counts, retrieval_counts, method="listing")
        report.items = {i.id: i for i in items}
        item_ids = [i.id for i in items]
        caption_ids = [c for i in items for c in i.caption_ids]

        images: set[int] = set()
        texts: set[int] = set()
        if info is not None:
            if listed_images is not None and listed_texts is not None:
                images, texts = listed_images, listed_texts
                report.orphan_ids = {
                    "image": sorted(images - set(item_ids)),
                    "text": sorted(texts - set(caption_ids)),
                }
                report.orphans = {k: len(v) for k, v in report.orphan_ids.items()}
            else:
                report.method = "probe"
                dim = int(info["dim"])
                images = self.probe(collection, "image", item_ids, dim) if item_ids else set()
                texts = self.probe(collection, "text", caption_ids, dim) if caption_ids else set()
                report.orphans = {
                    "image": max(0, retrieval_counts.get("image", 0) - len(images)),
                    "text": max(0, retrieval_counts.get("text", 0) - len(texts)),
                }

        cutoff = datetime.now(UTC) - stale_after
        for item in items:
            has_image = item.id in images
            has_captions = [c in texts for c in item.caption_ids]
            if item.status == "indexed":
                if not has_image or not all(has_captions):
                    report.missing.append(item.id)
                continue
            if item.status == "failed":
                report.failed.append(item.id)
            is_stuck = item.status == "pending" and item.updated_at < cutoff
            if is_stuck:
                report.stuck.append(item.id)
            # A pending item that is not stuck may be mid-upload: its vectors are legitimate.
            if (item.status == "failed" or is_stuck) and (has_image or any(has_captions)):
                report.stale.append(item.id)
        if report.method == "listing":
            # The drift metric, per modality, from the id-level comparison.
            for modality, present in (("image", images), ("text", texts)):
                retrieval_only, metadata_only = diff(present, _expected(items, modality, cutoff))
                DRIFT.labels(collection, modality, "retrieval_only").set(len(retrieval_only))
                DRIFT.labels(collection, modality, "metadata_only").set(len(metadata_only))
        LAST_RUN.labels(collection).set(time.time())
        return report

    # --- repair ---------------------------------------------------------------------------

    def repair(self, report: DriftReport, *, retry_failed: bool = False) -> RepairReport:
        result = RepairReport()
        collection = report.collection
        reindex = list(dict.fromkeys(report.missing + report.stuck))
        if retry_failed:
            reindex += [i for i in report.failed if i not in reindex]
        # Stale vectors first: an item about to be indexed again gets fresh ones anyway.
        for item_id in report.stale:
            if item_id in reindex and self.feature is not None:
                continue
            result.vectors_deleted += self._delete_vectors(collection, report.items[item_id])
        for item_id in reindex:
            item = report.items[item_id]
            if self.feature is None:
                if item.status != "failed":
                    reason = (
                        "vectors missing from retrieval (found by reconcile)"
                        if item.status == "indexed"
                        else "stuck pending (found by reconcile)"
                    )
                    self._set_status(item.id, "failed", error=reason)
                    result.vectors_deleted += self._delete_vectors(collection, item)
                    result.marked_failed.append(item.id)
                continue
            try:
                self.reindex(collection, item.id)
                result.reindexed.append(item.id)
                REPAIRED.labels(collection, "image", "requeued").inc()
            except ReconcileError as exc:
                result.errors.append(f"item {item.id}: {exc}")
                try:
                    self._set_status(item.id, "failed", error=f"reconcile: {exc}"[:4000])
                    result.vectors_deleted += self._delete_vectors(collection, item)
                    result.marked_failed.append(item.id)
                except ReconcileError as again:
                    result.errors.append(f"item {item.id}: {again}")
        if report.orphan_ids:
            for modality, ids in report.orphan_ids.items():
                for chunk in _chunks(ids, 1000):
                    result.vectors_deleted += self._delete(collection, modality, chunk)
        REPAIRED.labels(collection, "any", "deleted").inc(result.vectors_deleted)
        return result

    def reindex(self, collection: str, item_id: int) -> None:
        """Embed the item's stored image and captions again, upsert them (durable), then mark it
        indexed: the gateway's item flow, from what metadata already holds."""
        if self.feature is None:
            raise ReconcileError("no feature service to embed with")
        response = self.metadata.get(f"/items/{item_id}")
        _raise_for(response, f"item {item_id}")
        item = response.json()
        image = self.metadata.get(f"/items/{item_id}/image")
        _raise_for(image, f"image of item {item_id}")
        embedded = self.feature.post(
            "/embed/image",
            files=[("images", ("image", image.content, item["content_type"]))],
        )
        _raise_for(embedded, "embedding the image")
        model_id = embedded.json()["model_id"]
        self._upsert(collection, "image", model_id, [item_id], embedded.json()["vectors"])
        captions = item["captions"]
        if captions:
            texts = self.feature.post("/embed/text", json={"texts": [c["text"] for c in captions]})
            _raise_for(texts, "embedding the captions")
            self._upsert(
                collection, "text", model_id, [c["id"] for c in captions], texts.json()["vectors"]
            )
        self._set_status(item_id, "indexed", model_id=model_id)

    def _upsert(
        self, collection: str, modality: str, model_id: str, ids: list[int], vectors: list[Any]
    ) -> None:
        response = self.retrieval.post(
            f"/collections/{collection}/upsert",
            json={"modality": modality, "model_id": model_id, "ids": ids, "vectors": vectors},
        )
        _raise_for(response, f"upserting {modality} vectors")

    def _set_status(
        self, item_id: int, status: str, *, model_id: str | None = None, error: str | None = None
    ) -> None:
        body: dict[str, Any] = {"status": status}
        if model_id is not None:
            body["model_id"] = model_id
        if error is not None:
            body["error"] = error
        response = self.metadata.patch(f"/items/{item_id}", json=body)
        _raise_for(response, f"marking item {item_id} {status}")

    def _delete(self, collection: str, modality: str, ids: list[int]) -> int:
        if not ids:
            return 0
        response = self.retrieval.post(
            f"/collections/{collection}/delete", json={"ids": ids, "modality": modality}
        )
        if response.status_code == 404:
            return 0
        _raise_for(response, f"deleting {modality} vectors")
        return int(response.json().get("deleted", 0))

    def _delete_vectors(self, collection: str, item: ItemInfo) -> int:
        return self._delete(collection, "image", [item.id]) + self._delete(
            collection, "text", list(item.caption_ids)
        )


def _expected(items: Iterable[ItemInfo], modality: str, cutoff: datetime) -> MetadataIds:
    expected: set[int] = set()
    tolerated: set[int] = set()
    for item in items:
        if item.status == "indexed" or (item.status == "pending" and item.updated_at < cutoff):
            target = expected
        elif item.status == "pending":
            target = tolerated  # may be mid-add
        else:
            continue  # failed: must not have vectors
        if modality == "image":
            target.add(item.id)
        else:
            target.update(item.caption_ids)
    return MetadataIds(frozenset(expected), frozenset(tolerated))


# -- command line --------------------------------------------------------------------------------


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m crossmodal.reconcile``."""
    env = os.environ.get
    parser.add_argument("--collection", action="append", help="repeatable; default: all")
    parser.add_argument("--repair", action="store_true", help="fix what the check finds")
    parser.add_argument("--retry-failed", action="store_true", help="with --repair")
    parser.add_argument(
        "--retrieval-url", default=env("CROSSMODAL_RETRIEVAL_URL", "http://127.0.0.1:8003")
    )
    parser.add_argument(
        "--metadata-url", default=env("CROSSMODAL_METADATA_URL", "http://127.0.0.1:8004")
    )
    parser.add_argument(
        "--feature-url",
        default=env("CROSSMODAL_FEATURE_URL"),
        help="re-embed with this feature service; without it, drifted items are marked failed",
    )
    parser.add_argument("--stale-after", type=float, default=600.0, help="seconds")
    parser.add_argument("--redis-url", help="after repairs, invalidate the gateway's cache")
    parser.add_argument("--cache-prefix", default="crossmodal")
    parser.add_argument("--interval", type=float, help="run every INTERVAL seconds")
    parser.add_argument("--metrics-port", type=int, help="serve /metrics on this port")


def run(args: argparse.Namespace) -> int:
    """0: clean (or repaired without errors); 1: drift left or repair errors; 2: a service
    failed. With ``--interval``, runs until interrupted."""
    if args.metrics_port:
        start_http_server(args.metrics_port)
    while True:
        status = _run_once(args)
        if args.interval is None:
            return status
        time.sleep(args.interval)


def _run_once(args: argparse.Namespace) -> int:
    timeout = httpx.Timeout(60.0, connect=5.0)
    status = 0
    with (
        httpx.Client(base_url=args.metadata_url, timeout=timeout) as metadata,
        httpx.Client(base_url=args.retrieval_url, timeout=timeout) as retrieval,
        httpx.Client(base_url=args.feature_url or "http://invalid", timeout=timeout) as feature,
    ):
        reconciler = Reconciler(metadata, retrieval, feature if args.feature_url else None)
        try:
            names = args.collection or reconciler.collections()
            for name in names:
                report = reconciler.check(name, stale_after=timedelta(seconds=args.stale_after))
                summary = report.summary()
                if args.repair:
                    repaired = reconciler.repair(report, retry_failed=args.retry_failed)
                    summary["repair"] = asdict(repaired)
                    changed = repaired.reindexed or repaired.marked_failed
                    if args.redis_url and (changed or repaired.vectors_deleted):
                        # The gateway's cache keys are the gateway's: its module bumps them.
                        from services.gateway.cache import invalidate

                        invalidate(args.redis_url, args.cache_prefix, name)
                    if repaired.errors:
                        status = 1
                elif not report.clean:
                    status = 1
                print(json.dumps(summary), flush=True)
        except (ReconcileError, httpx.HTTPError) as exc:
            print(f"reconcile failed: {exc}", file=sys.stderr)
            return 2
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m crossmodal.reconcile",
        description="Find and repair drift between the metadata and retrieval services; "
        "prints one JSON summary per collection.",
    )
    configure_parser(parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
