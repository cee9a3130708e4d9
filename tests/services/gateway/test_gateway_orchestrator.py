"""The orchestrator's item flow against stub services over ASGI: what it asks of each, in what
order, and what it does with their answers."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import REGISTRY

from services.gateway.cache import ResultCache, version_key
from services.gateway.orchestrator import Backends, Orchestrator, Upload
from services.gateway.redis_guard import GuardedRedis
from shared.contracts.feature import FeatureClient
from shared.contracts.metadata import CaptionOut, ItemMerge, ItemOut, MetadataClient
from shared.contracts.retrieval import RetrievalClient
from shared.contracts.vectors import decode_vectors
from shared.http import ServiceClient
from shared.problems import ProblemError, ServiceUnavailable

pytestmark = pytest.mark.anyio

ITEM = ItemOut(
    id=7,
    collection="c",
    captions=[CaptionOut(id=70, text="a red circle")],
    attributes={},
    tags=[],
    status="pending",
    image_sha256="0" * 64,
    content_type="image/png",
    source_uri=None,
    model_id=None,
    error=None,
    attempts=1,
    created_at=datetime(2026, 12, 4, tzinfo=UTC),
    updated_at=datetime(2026, 12, 4, tzinfo=UTC),
    indexed_at=None,
).model_dump(mode="json")


def _client(name: str, app: FastAPI) -> ServiceClient:
    return ServiceClient(name, f"http://{name}", transport=httpx.ASGITransport(app=app))


def _backends(feature: ServiceClient, retrieval: FastAPI, metadata: FastAPI) -> Backends:
    return Backends(
        auth=_client("auth", FastAPI()),
        feature=FeatureClient(feature),
        retrieval=RetrievalClient(_client("retrieval", retrieval)),
        metadata=MetadataClient(_client("metadata", metadata)),
    )


def _stubs(text_model_id: str = "m1") -> tuple[Backends, dict[str, Any]]:
    seen: dict[str, Any] = {"upserts": [], "text_started": asyncio.Event()}
    feature, retrieval, metadata = FastAPI(), FastAPI(), FastAPI()

    @feature.post("/embed/image")
    async def embed_image() -> dict[str, Any]:
        # Answers only once the caption call has arrived: sequential calls would never finish.
        await asyncio.wait_for(seen["text_started"].wait(), timeout=10)
        return {"model_id": "m1", "dim": 2, "vectors": [[1.0, 0.0]]}

    @feature.post("/embed/text")
    async def embed_text(request: Request) -> dict[str, Any]:
        seen["text_started"].set()
        texts = (await request.json())["texts"]
        rows = [[0.0, 1.0]] * len(texts)
        return {"model_id": text_model_id, "dim": 2, "vectors": rows, "truncated": [False]}

    @metadata.post("/items", status_code=201)
    async def create_item() -> dict[str, Any]:
        return ITEM

    @metadata.patch("/items/{item_id}")
    async def update_item(item_id: int, request: Request) -> dict[str, Any]:
        seen["status"] = (await request.json())["status"]
        return {**ITEM, "status": seen["status"]}

    @retrieval.post("/collections/{collection}/upsert")
    async def upsert(collection: str, request: Request) -> dict[str, int]:
        seen["upserts"].append(await request.json())
        return {"upserted": 1, "count": 1}

    @retrieval.post("/collections/{collection}/delete")
    async def delete(collection: str) -> dict[str, int]:
        return {"deleted": 1}

    return _backends(_client("feature", feature), retrieval, metadata), seen


IMAGE = Upload("a.png", "image/png", b"\x89PNG fake")


async def test_an_item_s_image_and_captions_are_embedded_at_once(
    guarded: GuardedRedis, prefix: str
) -> None:
    backends, seen = _stubs()
    orchestrator = Orchestrator(backends, ResultCache(guarded, prefix=prefix, ttl_seconds=60))
    item = await orchestrator.add_item(
        IMAGE, collection="c", captions=["a red circle"], attributes=None
    )
    assert item["status"] == "indexed" and item["image_url"] == "/items/7/image"
    # Vectors travel to retrieval as float32 rows in base64.
    assert [
        (u["modality"], u["ids"], decode_vectors(u["vectors_base64"], dim=2).tolist())
        for u in seen["upserts"]
    ] == [("image", [7], [[1.0, 0.0]]), ("text", [70], [[0.0, 1.0]])]
    await backends.aclose()


async def test_captions_embedded_by_another_model_are_refused(
    guarded: GuardedRedis, prefix: str
) -> None:
    backends, seen = _stubs(text_model_id="m2")
    orchestrator = Orchestrator(backends, ResultCache(guarded, prefix=prefix, ttl_seconds=60))
    with pytest.raises(ServiceUnavailable) as raised:
        await orchestrator.add_item(IMAGE, collection="c", captions=["x"], attributes=None)
    assert raised.value.code == "model_changed"
    assert seen["upserts"] == [] and "status" not in seen  # nothing stored or indexed
    await backends.aclose()


INDEXED = {**ITEM, "status": "indexed", "model_id": "m1"}
ADDED = [{"id": 71, "text": "flag: St. Martin"}, {"id": 72, "text": "flag: Clipperton"}]


def _merge_stubs(
    added: list[dict[str, Any]], *, upsert_status: int = 200, added_tags: list[str] | None = None
) -> tuple[Backends, dict[str, Any]]:
    """Metadata answers a merge that added ``added``; retrieval answers upserts with
    ``upsert_status``. Every call is recorded in ``seen``."""
    seen: dict[str, Any] = {"calls": [], "upserts": [], "texts": []}
    feature, retrieval, metadata = FastAPI(), FastAPI(), FastAPI()

    @metadata.post("/items/{item_id}/merge")
    async def merge(item_id: int, request: Request) -> dict[str, Any]:
        seen["calls"].append(("merge", item_id, await request.json()))
        item = {**INDEXED, "captions": [*INDEXED["captions"], *added]}
        return {
            "item": item,
            "added_captions": added,
            "added_tags": added_tags or [],
            "added_attributes": [],
            "conflicts": [{"key": "emoji", "kept": "FR", "offered": "MF"}],
        }

    @metadata.post("/items/{item_id}/captions/delete")
    async def take_back(item_id: int, request: Request) -> dict[str, Any]:
        seen["calls"].append(("take back", item_id, (await request.json())["ids"]))
        return INDEXED

    @feature.post("/embed/text")
    async def embed_text(request: Request) -> dict[str, Any]:
        texts = (await request.json())["texts"]
        seen["texts"].append(texts)
        rows = [[0.0, 1.0]] * len(texts)
        return {"model_id": "m1", "dim": 2, "vectors": rows, "truncated": [False] * len(texts)}

    @retrieval.post("/collections/{collection}/upsert")
    async def upsert(collection: str, request: Request) -> Any:
        seen["upserts"].append(await request.json())
        if upsert_status != 200:
            return JSONResponse(
                {"title": "x", "status": 503, "code": "disk_full", "detail": "no room"},
                status_code=upsert_status,
                media_type="application/problem+json",
            )
        return {"upserted": 2, "count": 3}

    @retrieval.post("/collections/{collection}/delete")
    async def delete(collection: str, request: Request) -> dict[str, int]:
        seen["calls"].append(("delete vectors", collection, await request.json()))
        return {"deleted": 2}

    return _backends(_client("feature", feature), retrieval, metadata), seen


async def _version(guarded: GuardedRedis, prefix: str) -> Any:
    return await guarded.client.get(version_key(prefix, "c"))


async def test_a_merge_embeds_and_indexes_the_captions_it_added(
    guarded: GuardedRedis, prefix: str
) -> None:
    backends, seen = _merge_stubs(ADDED)
    orchestrator = Orchestrator(backends, ResultCache(guarded, prefix=prefix, ttl_seconds=60))
    before = await _version(guarded, prefix)
    merge = ItemMerge(captions=["flag: France", "flag: St. Martin", "flag: Clipperton"])
    answer = await orchestrator.merge_item(7, merge)
    assert seen["calls"] == [("merge", 7, merge.model_dump())]
    # Only the added captions are embedded (the first was there), in one call, and upserted
    # under their caption ids.
    assert seen["texts"] == [["flag: St. Martin", "flag: Clipperton"]]
    assert [(u["modality"], u["ids"], u["model_id"]) for u in seen["upserts"]] == [
        ("text", [71, 72], "m1")
    ]
    assert answer["added_captions"] == ADDED
    assert answer["conflicts"] == [{"key": "emoji", "kept": "FR", "offered": "MF"}]
    assert answer["item"]["image_url"] == "/items/7/image"
    assert [c["text"] for c in answer["item"]["captions"]] == [
        "a red circle",
        "flag: St. Martin",
        "flag: Clipperton",
    ]
    # The collection was written: its cached pages are unreachable.
    assert await _version(guarded, prefix) != before
    await backends.aclose()


async def test_a_merge_that_adds_nothing_embeds_nothing_and_keeps_the_cache(
    guarded: GuardedRedis, prefix: str
) -> None:
    backends, seen = _merge_stubs([])
    orchestrator = Orchestrator(backends, ResultCache(guarded, prefix=prefix, ttl_seconds=60))
    await ResultCache(guarded, prefix=prefix, ttl_seconds=60).bump("c")
    before = await _version(guarded, prefix)
    answer = await orchestrator.merge_item(7, ItemMerge(captions=["a red circle"]))
    assert answer["added_captions"] == [] and seen["texts"] == [] and seen["upserts"] == []
    assert await _version(guarded, prefix) == before
    await backends.aclose()


async def test_a_merge_whose_vectors_cannot_be_stored_takes_its_captions_back(
    guarded: GuardedRedis, prefix: str
) -> None:
    backends, seen = _merge_stubs(ADDED, upsert_status=503, added_tags=["caribbean"])
    orchestrator = Orchestrator(backends, ResultCache(guarded, prefix=prefix, ttl_seconds=60))
    before = await _version(guarded, prefix)
    with pytest.raises(ProblemError) as raised:
        await orchestrator.merge_item(7, ItemMerge(captions=["flag: St. Martin"]))
    assert raised.value.status == 503
    # The captions go from metadata first (no search shows them), then their vectors, which
    # the failed upsert may have stored in part.
    assert seen["calls"][1:] == [
        ("take back", 7, [71, 72]),
        ("delete vectors", "c", {"ids": [71, 72], "modality": "text"}),
    ]
    # The tags it added stay, so the collection's pages are stale all the same.
    assert await _version(guarded, prefix) != before
    await backends.aclose()


class _SlowModel(httpx.AsyncBaseTransport):
    """The feature service of a filtered search, as a transport (what the gateway's client sees
    of it): it answers only once the filter call has arrived (a search that waited for one
    before sending the other would never finish), after ``delay`` seconds, and records whether
    the gateway abandoned the call."""

    def __init__(self, seen: dict[str, Any], delay: float) -> None:
        self.seen, self.delay = seen, delay

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.seen["embed_started"].set()
        try:
            # Not asyncio.wait_for: on Python 3.11 it can swallow a cancellation that arrives
            # as the awaited event is set (the very moment this test makes).
            await self.seen["filter_started"].wait()
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.seen["embed_cancelled"] = True
            raise
        body = {"model_id": "m1", "dim": 2, "vectors": [[0.0, 1.0]], "truncated": [False]}
        return httpx.Response(200, json=body)


def _search_stubs(filter_status: int) -> tuple[Backends, dict[str, Any]]:
    seen: dict[str, Any] = {
        "filter_started": asyncio.Event(),
        "embed_started": asyncio.Event(),
        "embed_cancelled": False,
    }
    metadata = FastAPI()

    @metadata.post("/collections/{collection}/filter")
    async def filter_items(collection: str) -> Any:
        seen["filter_started"].set()
        if filter_status != 200:
            # Refused once the model is at work, so that there is an embedding to abandon.
            await asyncio.wait_for(seen["embed_started"].wait(), timeout=10)
            return JSONResponse(
                {
                    "type": "about:blank",
                    "title": "bad filter",
                    "status": filter_status,
                    "code": "invalid_filter",
                    "detail": "too many values",
                },
                status_code=filter_status,
                media_type="application/problem+json",
            )
        return {"item_ids": [], "caption_ids": None}

    model = _SlowModel(seen, delay=0 if filter_status == 200 else 10)
    feature = ServiceClient("feature", "http://feature", transport=model)
    return _backends(feature, FastAPI(), metadata), seen


async def test_a_filtered_search_embeds_while_metadata_filters(
    guarded: GuardedRedis, prefix: str
) -> None:
    backends, seen = _search_stubs(200)
    orchestrator = Orchestrator(backends, ResultCache(guarded, prefix=prefix, ttl_seconds=60))
    before = _stage_counts()
    result = await asyncio.wait_for(
        orchestrator.search_text(
            "a red circle", target="image", top_k=5, collection="c", filters={"colour": "red"}
        ),
        timeout=20,
    )
    # Nothing passes the filter: an empty page, with the model that embedded the query.
    page = orjson.loads(result.body)
    assert page["results"] == [] and page["model_id"] == "m1"
    assert not seen["embed_cancelled"]
    # Each stage it went through is timed once; retrieval and hydration were never asked.
    grown = {stage: n - before[stage] for stage, n in _stage_counts().items()}
    assert grown == {
        "cache_lookup": 1,
        "embed": 1,
        "filter": 1,
        "search": 0,
        "keyword": 0,
        "hydrate": 0,
        "cache_save": 1,
    }
    await backends.aclose()


def _stage_counts() -> dict[str, float]:
    stages = ("cache_lookup", "embed", "filter", "search", "keyword", "hydrate", "cache_save")
    return {
        stage: REGISTRY.get_sample_value("gateway_search_stage_seconds_count", {"stage": stage})
        or 0.0
        for stage in stages
    }


async def test_a_refused_filter_abandons_the_embedding(guarded: GuardedRedis, prefix: str) -> None:
    backends, seen = _search_stubs(422)
    orchestrator = Orchestrator(backends, ResultCache(guarded, prefix=prefix, ttl_seconds=60))
    with pytest.raises(ProblemError) as raised:
        await asyncio.wait_for(
            orchestrator.search_text(
                "a red circle", target="image", top_k=5, collection="c", filters={"x": 1}
            ),
            timeout=5,  # the stub model takes 10 s: only an abandoned embedding answers sooner
        )
    assert raised.value.status == 422 and raised.value.code == "invalid_filter"
    await asyncio.sleep(0.1)  # the embedding's task learns of it when it runs next
    assert seen["embed_cancelled"]
    await backends.aclose()
