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
  Counted from retrieval's per-collection counts; deleted when retrieval can list ids
  (``GET /collections/{c}/ids``, see docs/metadata.md), which tells them apart.

Without that id listing, presence is checked by probing retrieval's search with the ids as
``allow_ids`` (``top_k`` = number of ids), which returns exactly the present ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

PROBE_CHUNK = 1000  # retrieval's largest top_k


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
        ids: set[int] = set()
        after: int | None = None
        while True:
            params: dict[str, Any] = {"modality": modality, "limit": 10_000}
            if after is not None:
                params["after"] = after
            response = self.retrieval.get(f"/collections/{collection}/ids", params=params)
            if response.status_code in (404, 405) and not ids:
                body = response.json() if response.content else {}
                if response.status_code == 405 or body.get("code") == "not_found":
                    return None  # no such route: an older retrieval service
            _raise_for(response, f"retrieval ids of {collection!r}")
            page = response.json()
            ids.update(page["ids"])
            after = page.get("next_after")
            if after is None:
                return ids

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
        items = self.metadata_items(collection)
        info = self.retrieval_collection(collection)
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
            listed_images = self.listed_ids(collection, "image")
            listed_texts = (
                self.listed_ids(collection, "text") if listed_images is not None else None
            )
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


def bump_cache_version(redis_url: str, prefix: str, collection: str) -> None:
    """Make the gateway's cached search pages of ``collection`` unreachable, as a write through
    the gateway does, since repairs bypass it: the pages are keyed by the collection's version
    in ``<prefix>:version:<collection>``, which gets a new random value (a counter, as older
    gateways keep, is incremented instead)."""
    import secrets

    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
    key = f"{prefix}:version:{collection}"
    try:
        current = client.get(key)
        if current is not None and current.isdigit():
            client.incr(key)
        else:
            client.set(key, secrets.token_hex(8))
    finally:
        client.close()
