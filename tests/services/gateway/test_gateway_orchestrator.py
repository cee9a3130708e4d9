"""The orchestrator's item flow against stub services over ASGI: what it asks of each, in what
order, and what it does with their answers."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request

from services.gateway.cache import ResultCache
from services.gateway.orchestrator import Backends, Orchestrator, Upload
from services.gateway.redis_guard import GuardedRedis
from shared.contracts.feature import FeatureClient
from shared.contracts.metadata import CaptionOut, ItemOut, MetadataClient
from shared.contracts.retrieval import RetrievalClient
from shared.contracts.vectors import decode_vectors
from shared.http import ServiceClient
from shared.problems import ServiceUnavailable

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

    backends = Backends(
        auth=_client("auth", FastAPI()),
        feature=FeatureClient(_client("feature", feature)),
        retrieval=RetrievalClient(_client("retrieval", retrieval)),
        metadata=MetadataClient(_client("metadata", metadata)),
    )
    return backends, seen


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
