"""Drift between the metadata and retrieval services, found and repaired: what the gateway's
background maintenance runs on every collection and ``crossmodal reconcile`` on demand. What can
drift, and the repair:

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
The services are called through their typed clients (shared/contracts).

Also here: the pure comparison ``reconcile()``/``diff()`` over two callables that list ids (what
to build another repair policy on, tested without the services) and the drift metrics
(``crossmodal_reconcile_*``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import numpy as np
from prometheus_client import Counter, Gauge
from pydantic import ValidationError

from shared.contracts.feature import FeatureClient
from shared.contracts.metadata import MetadataClient, StatusUpdate
from shared.contracts.retrieval import DeleteRequest, RetrievalClient, UpsertRequest
from shared.contracts.vectors import encode_vectors
from shared.problems import ProblemError

log = logging.getLogger(__name__)

Modality = Literal["image", "text"]
MODALITIES: tuple[Modality, ...] = ("image", "text")

DRIFT = Gauge(
    "crossmodal_reconcile_drift",
    "Ids present in one of retrieval and metadata but not the other at the last reconcile, by "
    "collection, modality and side (retrieval_only, metadata_only).",
    ["collection", "modality", "side"],
    multiprocess_mode="mostrecent",
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
    multiprocess_mode="max",
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
    attempts: int = 0  # failed indexing attempts so far


@dataclass
class DriftReport:
    collection: str
    counts: dict[str, int]
    retrieval_counts: dict[str, int]
    method: str  # how retrieval's ids were read: "listing" (the whole id list)
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


def _chunks(values: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


class Reconciler:
    """The check and the repair over the services' typed clients (shared/contracts). A call that
    fails raises ``ReconcileError`` with what was being done and the service's problem."""

    def __init__(
        self,
        metadata: MetadataClient,
        retrieval: RetrievalClient,
        feature: FeatureClient | None = None,
    ) -> None:
        self.metadata = metadata
        self.retrieval = retrieval
        self.feature = feature

    # --- reading both sides ---------------------------------------------------------------

    async def metadata_items(self, collection: str) -> list[ItemInfo]:
        items: list[ItemInfo] = []
        after: int | None = None
        while True:
            async with _failing(f"metadata items of {collection!r}"):
                page = await self.metadata.item_states(collection, after=after, limit=5000)
            items.extend(
                ItemInfo(s.id, s.status, tuple(s.caption_ids), s.updated_at, s.attempts)
                for s in page.items
            )
            after = page.next_after
            if after is None:
                return items

    async def collections(self) -> list[str]:
        """Every collection either service knows."""
        async with _failing("listing collections"):
            vectors = await self.retrieval.collections()
            items = await self.metadata.collections()
        return sorted({c.name for c in vectors.collections} | {c.name for c in items.collections})

    # --- check ----------------------------------------------------------------------------

    async def check(
        self, collection: str, *, stale_after: timedelta = timedelta(minutes=10)
    ) -> DriftReport:
        # Retrieval first (see the module doc), then metadata.
        async with _failing(f"retrieval collection {collection!r}"):
            info = await self.retrieval.collection(collection)
            images: set[int] = set()
            texts: set[int] = set()
            if info is not None:
                images = set((await self.retrieval.ids(collection, "image")).tolist())
                texts = set((await self.retrieval.ids(collection, "text")).tolist())
        items = await self.metadata_items(collection)
        counts = {
            s: sum(1 for i in items if i.status == s) for s in ("pending", "indexed", "failed")
        }
        retrieval_counts = info.counts.model_dump() if info is not None else {"image": 0, "text": 0}
        report = DriftReport(collection, counts, retrieval_counts, method="listing")
        report.items = {i.id: i for i in items}
        item_ids = {i.id for i in items}
        caption_ids = {c for i in items for c in i.caption_ids}
        report.orphan_ids = {
            "image": sorted(images - item_ids),
            "text": sorted(texts - caption_ids),
        }
        report.orphans = {k: len(v) for k, v in report.orphan_ids.items()}

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
        # The drift metric, per modality, from the id-level comparison.
        for modality, present in (("image", images), ("text", texts)):
            retrieval_only, metadata_only = diff(present, _expected(items, modality, cutoff))
            DRIFT.labels(collection, modality, "retrieval_only").set(len(retrieval_only))
            DRIFT.labels(collection, modality, "metadata_only").set(len(metadata_only))
        LAST_RUN.labels(collection).set(time.time())
        return report

    # --- repair ---------------------------------------------------------------------------

    async def repair(
        self,
        report: DriftReport,
        *,
        retry_failed: bool = False,
        retry_failed_below: int | None = None,
        limit: int | None = None,
    ) -> RepairReport:
        """Repair what ``report`` found. Failed items are indexed again with ``retry_failed``,
        or those failed fewer than ``retry_failed_below`` times; at most ``limit`` items are
        indexed again in one call (the rest wait for the next), vectors are always deleted."""
        result = RepairReport()
        collection = report.collection
        reindex = list(dict.fromkeys(report.missing + report.stuck))
        if retry_failed or retry_failed_below is not None:
            reindex += [
                i
                for i in report.failed
                if i not in reindex
                and (retry_failed or report.items[i].attempts < (retry_failed_below or 0))
            ]
        if limit is not None:
            reindex = reindex[:limit]
        # Stale vectors first: an item about to be indexed again gets fresh ones anyway.
        for item_id in report.stale:
            if item_id in reindex and self.feature is not None:
                continue
            result.vectors_deleted += await self._delete_vectors(collection, report.items[item_id])
        for item_id in reindex:
            item = report.items[item_id]
            if self.feature is None:
                if item.status != "failed":
                    reason = (
                        "vectors missing from retrieval (found by reconcile)"
                        if item.status == "indexed"
                        else "stuck pending (found by reconcile)"
                    )
                    await self._set_status(item.id, StatusUpdate(status="failed", error=reason))
                    result.vectors_deleted += await self._delete_vectors(collection, item)
                    result.marked_failed.append(item.id)
                continue
            try:
                await self.reindex(collection, item.id)
                result.reindexed.append(item.id)
                REPAIRED.labels(collection, "image", "requeued").inc()
            except ReconcileError as exc:
                result.errors.append(f"item {item.id}: {exc}")
                try:
                    failed = StatusUpdate(status="failed", error=f"reconcile: {exc}"[:4000])
                    await self._set_status(item.id, failed)
                    result.vectors_deleted += await self._delete_vectors(collection, item)
                    result.marked_failed.append(item.id)
                except ReconcileError as again:
                    result.errors.append(f"item {item.id}: {again}")
        for modality, ids in (report.orphan_ids or {}).items():
            for chunk in _chunks(ids, 1000):
                result.vectors_deleted += await self._delete(collection, modality, chunk)
        REPAIRED.labels(collection, "any", "deleted").inc(result.vectors_deleted)
        return result

    async def reindex(self, collection: str, item_id: int) -> None:
        """Embed the item's stored image and captions again, upsert them (durable), then mark it
        indexed: the gateway's item flow, from what metadata already holds."""
        if self.feature is None:
            raise ReconcileError("no feature service to embed with")
        async with _failing(f"item {item_id}"):
            item = await self.metadata.item(item_id)
            image = await self.metadata.image(item_id)
        async with _failing("embedding the image"):
            embedded = await self.feature.embed_images([("image", image.data, item.content_type)])
        model_id = embedded.model_id
        await self._upsert(collection, "image", model_id, [item_id], embedded.matrix())
        if item.captions:
            async with _failing("embedding the captions"):
                texts = await self.feature.embed_texts([c.text for c in item.captions])
            caption_ids = [c.id for c in item.captions]
            await self._upsert(collection, "text", model_id, caption_ids, texts.matrix())
        await self._set_status(item_id, StatusUpdate(status="indexed", model_id=model_id))

    async def _upsert(
        self,
        collection: str,
        modality: Modality,
        model_id: str,
        ids: list[int],
        vectors: np.ndarray,
    ) -> None:
        request = UpsertRequest(
            modality=modality, model_id=model_id, ids=ids, vectors_base64=encode_vectors(vectors)
        )
        async with _failing(f"upserting {modality} vectors"):
            await self.retrieval.upsert(collection, request)

    async def _set_status(self, item_id: int, update: StatusUpdate) -> None:
        async with _failing(f"marking item {item_id} {update.status}"):
            await self.metadata.set_status(item_id, update)

    async def _delete(self, collection: str, modality: Modality, ids: list[int]) -> int:
        if not ids:
            return 0
        async with _failing(f"deleting {modality} vectors"):
            try:
                answer = await self.retrieval.delete(
                    collection, DeleteRequest(ids=ids, modality=modality)
                )
            except ProblemError as exc:
                if exc.code == "collection_not_found":
                    return 0
                raise
        return answer.deleted

    async def _delete_vectors(self, collection: str, item: ItemInfo) -> int:
        return await self._delete(collection, "image", [item.id]) + await self._delete(
            collection, "text", list(item.caption_ids)
        )


@asynccontextmanager
async def _failing(what: str) -> AsyncIterator[None]:
    """A service's problem, or an answer that breaks the contract, as a ``ReconcileError``."""
    try:
        yield
    except ProblemError as exc:
        raise ReconcileError(f"{what}: HTTP {exc.status}: {exc.detail}") from exc
    except ValidationError as exc:
        raise ReconcileError(f"{what}: an answer outside the contract: {exc}") from exc


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
